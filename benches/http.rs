//! HTTP throughput benchmark: tokenize and detokenize through the real vault
//! (dev-mode settings, real JWTs, durable group commit), each printed as a ratio
//! against a bare actix-web JSON handler measured in the same run on the same
//! machine (absolute numbers drift on shared machines; ratios are what to compare).
//!
//! Run: `cargo bench --bench http` (env: BENCH_SECS per scenario, default 5;
//! BENCH_CONCURRENCY, default 32).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix_web::{App, HttpResponse, HttpServer, web};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokenvault::dev::{self, Role};
use tokenvault::startup::Application;

#[derive(Deserialize, Serialize)]
struct Card {
    pan: String,
    exp_month: u8,
    exp_year: u16,
}

/// The baseline: parse a JSON body of the same shape and answer JSON.
async fn bare_json(body: web::Json<Card>) -> HttpResponse {
    HttpResponse::Created().json(json!({"token": body.pan, "exp_month": body.exp_month, "exp_year": body.exp_year}))
}

fn start_bare() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let server = HttpServer::new(|| App::new().route("/json", web::post().to(bare_json)))
                .bind("127.0.0.1:0")
                .unwrap();
            tx.send(server.addrs()[0]).unwrap();
            server.run().await.unwrap();
        })
    });
    rx.recv().unwrap()
}

fn start_vault(dir: &std::path::Path) -> SocketAddr {
    let (settings, _) = dev::bootstrap(dir, "127.0.0.1:0".parse().unwrap()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let app = Application::build(&settings).unwrap();
            tx.send(app.local_addr()).unwrap();
            app.run_until_stopped().await.unwrap();
        })
    });
    rx.recv().unwrap()
}

fn luhn_pan(i: u64) -> String {
    common::luhn_pan("48", i)
}

struct Outcome {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

/// Drives `make_request` from `concurrency` tasks for `secs` seconds.
async fn drive<F, Fut>(concurrency: usize, secs: f64, make_request: F) -> Outcome
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let make_request = Arc::new(make_request);
    let seq = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    // Warm-up, not measured.
    let warm = Instant::now() + Duration::from_millis(500);
    let deadline = warm + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (make_request, seq, errors) = (make_request.clone(), seq.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let start = Instant::now();
                if start >= deadline {
                    break;
                }
                let ok = make_request(seq.fetch_add(1, Ordering::Relaxed)).await;
                if start >= warm {
                    if ok {
                        lat.push(start.elapsed());
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    Outcome {
        rps: all.len() as f64 / secs,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        errors: errors.load(Ordering::Relaxed),
    }
}

fn main() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let concurrency: usize = std::env::var("BENCH_CONCURRENCY")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let bare = start_bare();
    let vault = start_vault(&dir);
    let edge = dev::mint_token(&dir, Role::Edge, "bench", Duration::from_secs(3600)).unwrap();
    let psp = dev::mint_token(&dir, Role::Psp, "bench", Duration::from_secs(3600)).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(concurrency)
            .build()
            .unwrap();

        let c = client.clone();
        let bare_out = drive(concurrency, secs, move |i| {
            let c = c.clone();
            async move {
                let body = json!({"pan": luhn_pan(i), "exp_month": 12, "exp_year": 2031});
                c.post(format!("http://{bare}/json"))
                    .json(&body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 201)
            }
        })
        .await;

        let (c, jwt) = (client.clone(), edge.clone());
        let tokenize_out = drive(concurrency, secs, move |i| {
            let (c, jwt) = (c.clone(), jwt.clone());
            async move {
                let body = json!({"pan": luhn_pan(i), "exp_month": 12, "exp_year": 2031});
                c.post(format!("http://{vault}/v1/tokens"))
                    .bearer_auth(jwt)
                    .json(&body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 201)
            }
        })
        .await;

        // A working set of tokens to detokenize.
        let mut tokens = Vec::new();
        for i in 0..1000u64 {
            let body = json!({"pan": luhn_pan(10_000_000 + i), "exp_month": 12, "exp_year": 2031});
            let res = client
                .post(format!("http://{vault}/v1/tokens"))
                .bearer_auth(&edge)
                .json(&body)
                .send()
                .await
                .unwrap();
            let v: serde_json::Value = res.json().await.unwrap();
            tokens.push(v["token"].as_str().unwrap().to_owned());
        }
        let tokens = Arc::new(tokens);
        let (c, jwt) = (client.clone(), psp.clone());
        let detokenize_out = drive(concurrency, secs, move |i| {
            let (c, jwt, tokens) = (c.clone(), jwt.clone(), tokens.clone());
            async move {
                let token = &tokens[(i % tokens.len() as u64) as usize];
                c.post(format!("http://{vault}/v1/detokenize"))
                    .bearer_auth(jwt)
                    .json(&json!({"token": token}))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
            }
        })
        .await;

        println!("tokenvault HTTP benchmark: concurrency {concurrency}, {secs} s per scenario, keep-alive, 2-core box");
        println!(
            "{:<34} {:>10} {:>9} {:>9} {:>7} {:>9}",
            "scenario", "req/s", "p50 ms", "p99 ms", "errors", "vs bare"
        );
        for (name, o) in [
            ("bare actix-web JSON handler", &bare_out),
            ("tokenize (JWT, seal, durable)", &tokenize_out),
            ("detokenize (JWT, open)", &detokenize_out),
        ] {
            println!(
                "{:<34} {:>10.0} {:>9.2} {:>9.2} {:>7} {:>8.2}x",
                name,
                o.rps,
                o.p50_ms,
                o.p99_ms,
                o.errors,
                o.rps / bare_out.rps
            );
        }
    });
    drop(tmp);
    std::process::exit(0);
}
