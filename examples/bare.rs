//! The benchmark's baseline: a bare actix-web JSON handler, built with the same
//! release profile as the vault. It parses the body tokenize takes (`pan`,
//! `exp_month`, `exp_year`) and answers JSON, on the same runtime defaults (one
//! worker per core). `bench/run.py` starts it and alternates it with the vault.
//!
//! Run: `cargo run --release --example bare -- 127.0.0.1:8090`

#![forbid(unsafe_code)]

use actix_web::{App, HttpResponse, HttpServer, web};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Card {
    pan: String,
    exp_month: u8,
    exp_year: u16,
}

#[derive(Serialize)]
struct Answer<'a> {
    token: &'a str,
    exp_month: u8,
    exp_year: u16,
}

async fn bare_json(body: web::Json<Card>) -> HttpResponse {
    HttpResponse::Created().json(Answer {
        token: &body.pan,
        exp_month: body.exp_month,
        exp_year: body.exp_year,
    })
}

fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8090".to_owned());
    actix_web::rt::System::new().block_on(async move {
        HttpServer::new(|| App::new().route("/{any:.*}", web::post().to(bare_json)))
            .bind(addr)?
            .run()
            .await
    })
}
