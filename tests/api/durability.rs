//! Durability and data-at-rest: a 201 survives SIGKILL; the data directory never
//! holds a PAN or cardholder name in clear; key files are private.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use futures_util::StreamExt;
use serde_json::Value;

use crate::helpers::*;

/// Concurrent tokenizations, SIGKILL the moment the last 201 arrives, restart;
/// three rounds. Every acknowledged token is there and opens to its PAN.
#[tokio::test]
async fn acknowledged_tokens_survive_sigkill() {
    let mut app = TestApp::spawn().await;
    let keep = app.keep_data();
    let dir = app.data_dir.clone();
    let per_round = 300u64;
    let mut acked: Vec<(String, String)> = Vec::new();
    for round in 0..3u64 {
        let edge = app.jwt("edge", "default");
        let burst: Vec<(String, String)> = futures_util::stream::iter(round * per_round..(round + 1) * per_round)
            .map(|i| {
                let pan = pan_for(i);
                let body = serde_json::json!({"pan": pan, "exp_month": 12, "exp_year": 2031});
                let app = &app;
                let edge = &edge;
                async move {
                    let res = app.tokenize_as(edge, body).await;
                    assert_eq!(res.status(), 201);
                    let token = res.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
                    (token, pan)
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        app.kill();
        acked.extend(burst);
        drop(app);
        app = TestApp::restart_on(&dir);
        let mut lost = Vec::new();
        for (token, pan) in &acked {
            app.watch(pan);
            let res = app.detokenize("default", token).await;
            if res.status() != 200 {
                lost.push((token.clone(), res.status().as_u16()));
                continue;
            }
            assert_eq!(res.json::<Value>().await.unwrap()["pan"], pan.as_str());
        }
        assert!(
            lost.is_empty(),
            "round {round}: {} of {} acknowledged tokens lost after SIGKILL: {lost:?}",
            lost.len(),
            acked.len()
        );
        assert_eq!(app.metric("tokenvault_tokens_stored").await, acked.len() as f64);
    }
    drop(app);
    drop(keep);
}

fn scan(dir: &Path, needles: &BTreeMap<String, Vec<u8>>, hits: &mut Vec<String>, bytes_scanned: &mut usize) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            scan(&path, needles, hits, bytes_scanned);
        } else {
            let data = std::fs::read(&path).unwrap();
            *bytes_scanned += data.len();
            for (label, needle) in needles {
                if data.windows(needle.len()).any(|w| w == needle.as_slice()) {
                    hits.push(format!("{label} in {}", path.display()));
                }
            }
        }
    }
}

#[tokio::test]
async fn data_dir_never_holds_a_pan_in_clear() {
    let mut app = TestApp::spawn().await;
    let mut pans: Vec<String> = TEST_PANS.iter().map(|s| s.to_string()).collect();
    pans.extend((0..50).map(|i| pan_for(10_000 + i)));
    let edge = app.jwt("edge", "default");
    for pan in &pans {
        let body =
            serde_json::json!({"pan": pan, "exp_month": 12, "exp_year": 2031, "cardholder_name": "Zebulon Quixote"});
        assert_eq!(app.tokenize_as(&edge, body).await.status(), 201);
    }
    let mut needles = BTreeMap::new();
    for pan in &pans {
        needles.insert(format!("PAN {}…", &pan[..6]), pan.as_bytes().to_vec());
        // Also as raw digit values and as packed BCD, in case of a "clever" encoding.
        needles.insert(
            format!("digit-bytes PAN {}…", &pan[..6]),
            pan.bytes().map(|b| b - b'0').collect(),
        );
        let bcd: Vec<u8> = pan
            .as_bytes()
            .chunks(2)
            .map(|c| ((c[0] - b'0') << 4) | c.get(1).map_or(0xF, |d| d - b'0'))
            .collect();
        needles.insert(format!("BCD PAN {}…", &pan[..6]), bcd);
    }
    needles.insert("cardholder name".into(), b"Zebulon Quixote".to_vec());

    // While running (after the group commit flushed) and after a SIGKILL.
    for phase in ["running", "killed"] {
        if phase == "killed" {
            app.kill();
        }
        let mut hits = Vec::new();
        let mut scanned = 0;
        scan(&app.data_dir, &needles, &mut hits, &mut scanned);
        assert!(scanned > 10_000, "scanned only {scanned} bytes");
        assert!(hits.is_empty(), "{phase}: clear card data found: {hits:?}");
    }

    // Key material and the data directory are private to the vault's user.
    let mode = |p: &str| std::fs::metadata(app.data_dir.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(""), 0o700);
    for f in ["keys/dev-root.key", "keys/keystore.json", "dev/issuer-ed25519.pem"] {
        assert_eq!(mode(f), 0o600, "{f}");
    }
}
