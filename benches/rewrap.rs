//! Rewrap throughput with 100k+ records, through the real binary: online (the
//! CLI driving a running vault's admin API) and offline (`keys --offline` on the
//! stopped vault's data directory). Baseline, measured in the same run: a raw
//! sled pass of the same shape (get + rewrite of a ~200-byte value per record,
//! one flush per 1000), i.e. the storage floor without crypto or bookkeeping.
//!
//! Run: `cargo bench --bench rewrap` (env BENCH_RECORDS, default 100000).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(unreachable_pub)] // shared with the `common` bench target, where these are its root items
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_tokenvault");

fn luhn_pan(i: u64) -> String {
    common::luhn_pan("47", i)
}

fn serve(dir: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", dir.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let base = loop {
        let line = lines.next().unwrap().unwrap();
        if let Some(b) = line.strip_prefix("tokenvault listening on ") {
            break b.trim().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, base)
}

fn cli(args: &[&str]) -> Value {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn raw_sled_baseline(n: u64) -> f64 {
    let tmp = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(tmp.path())
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(None)
        .open()
        .unwrap();
    let tree = db.open_tree("t").unwrap();
    for i in 0..n {
        tree.insert(i.to_be_bytes(), vec![1u8; 200]).unwrap();
    }
    db.flush().unwrap();
    let start = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        for i in chunk {
            let mut v = tree.get(i.to_be_bytes()).unwrap().unwrap().to_vec();
            v[0] = v[0].wrapping_add(1);
            tree.insert(i.to_be_bytes(), v).unwrap();
        }
        db.flush().unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let n: u64 = std::env::var("BENCH_RECORDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let d = dir.to_str().unwrap().to_owned();
    let (mut server, base) = serve(&dir);
    let token = tmp.path().join("officer.jwt");
    let edge = {
        let out = Command::new(BIN)
            .args(["dev", "token", "--role", "edge", "--data-dir", &d])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let out = Command::new(BIN)
        .args(["dev", "token", "--role", "officer", "--data-dir", &d])
        .output()
        .unwrap();
    std::fs::write(&token, out.stdout).unwrap();
    let t = token.to_str().unwrap().to_owned();

    // Populate over HTTP (untimed for the ratios, reported for context).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let populate = Instant::now();
    rt.block_on(async {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        futures_util::stream::iter(0..n)
            .map(|i| {
                let (client, edge, base) = (client.clone(), edge.clone(), base.clone());
                async move {
                    let body = json!({"pan": luhn_pan(i), "exp_month": 12, "exp_year": 2031});
                    let res = client
                        .post(format!("{base}/v1/tokens"))
                        .bearer_auth(edge)
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(res.status(), 201);
                }
            })
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await;
    });
    let populate_rate = n as f64 / populate.elapsed().as_secs_f64();

    let online_args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["keys", "--url", &base, "--token-file", &t]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |args: Vec<String>| cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    run(online_args(&["rotate", "--json"]));
    let online = run(online_args(&["rewrap", "--batch", "1000", "--json"]));
    assert_eq!(online["rewrapped"].as_u64().unwrap(), n);
    run(online_args(&["rotate", "--json"]));

    // Stop the vault gracefully, then rewrap offline.
    Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    server.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let offline = cli(&[
        "keys",
        "--offline",
        "--data-dir",
        &d,
        "rewrap",
        "--batch",
        "1000",
        "--json",
    ]);
    assert_eq!(offline["rewrapped"].as_u64().unwrap(), n);
    let status = cli(&["keys", "--offline", "--data-dir", &d, "status", "--json"]);
    let under_v3 = status["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == 3)
        .unwrap()["records"]
        .clone();
    assert_eq!(under_v3.as_u64().unwrap(), n);

    let baseline = raw_sled_baseline(n);
    let online_rate = online["records_per_sec"].as_f64().unwrap();
    let offline_rate = offline["records_per_sec"].as_f64().unwrap();
    println!("tokenvault rewrap benchmark: {n} records, batch 1000, 2-core box");
    println!("{:<44} {:>12} {:>10}", "scenario", "records/s", "vs raw");
    println!(
        "{:<44} {:>12.0} {:>9.2}x",
        "raw sled get+rewrite, flush per 1000 (baseline)", baseline, 1.0
    );
    println!(
        "{:<44} {:>12.0} {:>9.2}x",
        "rewrap online (CLI → admin API, live vault)",
        online_rate,
        online_rate / baseline
    );
    println!(
        "{:<44} {:>12.0} {:>9.2}x",
        "rewrap offline (keys --offline, stopped vault)",
        offline_rate,
        offline_rate / baseline
    );
    println!("(populating {n} tokens over HTTP ran at {populate_rate:.0} tokenize/s)");
}
