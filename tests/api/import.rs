//! `tokenvault import`: a legacy card file into a running vault, killed at 40 %
//! and resumed with no duplicate and no gap; the dry run's reject report.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

/// A distinct valid PAN per index, spread over BINs (a migration's cards do not
/// share one BIN and last four, which the enumeration guard would rightly stop).
fn card(i: u64) -> String {
    with_check_digit(&format!("4{:05}{:09}", i % 100_000, i))
}

/// A CSV of `n` cards; every 997th has a broken check digit, one has expired, one
/// lacks its expiry, one id carries a card number. Returns the file and the
/// (line, id) of every row that must be rejected.
fn legacy_csv(dir: &std::path::Path, n: u64) -> (std::path::PathBuf, BTreeSet<u64>) {
    let mut text = String::from("id,pan,exp_month,exp_year,name\n");
    let mut bad = BTreeSet::new();
    for i in 0..n {
        let line = i + 2;
        let mut pan = card(i);
        let (mut month, mut year) = ((i % 12 + 1).to_string(), "2031".to_owned());
        let mut id = format!("cust-{i}");
        if i % 997 == 500 {
            let last = (pan.as_bytes()[15] - b'0' + 1) % 10;
            pan = format!("{}{last}", &pan[..15]);
            bad.insert(line);
        } else if i == 1_234 {
            year = "2020".into();
            bad.insert(line);
        } else if i == 2_345 {
            month.clear();
            bad.insert(line);
        } else if i == 3_456 {
            id = format!("see {}", card(999_999));
            bad.insert(line);
        }
        let name = if i % 3 == 0 { "\"Lovelace, Ada\"" } else { "" };
        text.push_str(&format!("{id},{pan},{month},{year},{name}\n"));
    }
    let path = dir.join("legacy.csv");
    std::fs::write(&path, text).unwrap();
    (path, bad)
}

#[tokio::test]
async fn an_import_killed_at_40_percent_resumes_with_no_duplicate_and_no_gap() {
    let app = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let n = 20_000u64;
    let (file, bad) = legacy_csv(dir.path(), n);
    let map = dir.path().join("map.csv");
    let token = app.token_file("importer", "migrated");
    let args = |extra: &[&str]| {
        let mut a = vec![
            "import".to_owned(),
            file.to_str().unwrap().to_owned(),
            "--format".into(),
            "csv".into(),
            "--url".into(),
            app.base.clone(),
            "--token-file".into(),
            token.to_str().unwrap().to_owned(),
            "--map-out".into(),
            map.to_str().unwrap().to_owned(),
            "--batch".into(),
            "250".into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };

    // The dry run: every bad row by its line number and reason, never a PAN; nothing sent.
    let out = Command::new(BIN)
        .args(args(&["--dry-run"]))
        .env_remove("TOKENVAULT_TOKEN_FILE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = String::from_utf8(out.stdout).unwrap();
    let lines: BTreeSet<u64> = report
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(lines, bad, "{report}");
    assert!(report.contains("not a valid card number") && report.contains("the card has expired"));
    assert!(
        !report.contains(&card(999_999)),
        "an id with a card number is not reported"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("{} valid", n - bad.len() as u64)));
    assert_eq!(app.metric("tokenvault_tokenize_total{outcome=\"created\"}").await, 0.0);
    assert!(!map.exists());

    // The import, killed once 40 % of the records are checkpointed.
    let mut child = Command::new(BIN)
        .args(args(&[]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let checkpoint = dir.path().join("map.csv.checkpoint");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let done = std::fs::read(&checkpoint)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["records"].as_u64())
            .unwrap_or(0);
        if done >= n * 4 / 10 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the import ended before 40 %");
        assert!(std::time::Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before: Value = serde_json::from_slice(&std::fs::read(&checkpoint).unwrap()).unwrap();
    assert!(before["records"].as_u64().unwrap() < n, "killed midway");

    // The rerun continues from the checkpoint and finishes.
    let out = Command::new(BIN).args(args(&["--json"])).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["records"], n);
    assert_eq!(summary["imported"], n - bad.len() as u64);
    assert_eq!(summary["rejected"], bad.len() as u64);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("resuming after") && stderr.contains("shred"),
        "{stderr}"
    );

    // The map: every good id once, every token distinct, no PAN anywhere.
    let map_text = std::fs::read_to_string(&map).unwrap();
    let rows: Vec<Vec<&str>> = map_text.lines().skip(1).map(|l| l.split(',').collect()).collect();
    let ids: BTreeSet<&str> = rows.iter().map(|r| r[0]).collect();
    let tokens: BTreeSet<&str> = rows.iter().map(|r| r[1]).collect();
    assert_eq!(rows.len() as u64, n - bad.len() as u64, "no duplicate line");
    assert_eq!(ids.len(), rows.len());
    assert_eq!(tokens.len(), rows.len(), "no card stored twice");
    let expected: BTreeSet<String> = (0..n)
        .filter(|i| !bad.contains(&(i + 2)))
        .map(|i| format!("cust-{i}"))
        .collect();
    assert_eq!(ids, expected.iter().map(String::as_str).collect(), "no gap");
    let rejects = std::fs::read_to_string(dir.path().join("map.csv.rejects.csv")).unwrap();
    assert_eq!(rejects.lines().count() - 1, bad.len(), "{rejects}");
    for i in (0..n).step_by(1_000) {
        assert!(
            !map_text.contains(&card(i)) && !rejects.contains(&card(i)),
            "a PAN was written"
        );
    }
    // The vault holds exactly the good cards, once each, each opening to its PAN.
    let mut listed = 0;
    let mut cursor = String::new();
    loop {
        let page: Value = app
            .client
            .get(app.url(&format!("/v1/tokens?limit=500{cursor}")))
            .bearer_auth(app.jwt("crm", "migrated"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        listed += page["items"].as_array().unwrap().len();
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(listed as u64, n - bad.len() as u64, "no duplicate in the vault");
    for row in rows.iter().step_by(2_000) {
        let i: u64 = row[0].trim_start_matches("cust-").parse().unwrap();
        let res = app.detokenize("migrated", row[1]).await;
        assert_eq!(res.json::<Value>().await.unwrap()["pan"], card(i));
    }
}

/// JSON lines work the same; a client without tokens:dedupe is stopped after its
/// first batch (a resumed import could otherwise store a card twice).
#[tokio::test]
async fn jsonl_imports_and_a_client_without_dedupe_is_stopped() {
    let app = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("legacy.jsonl");
    let text: String = (0..50u64)
        .map(|i| {
            format!(
                "{{\"id\": {i}, \"pan\": \"{}\", \"exp_month\": \"07\", \"exp_year\": 2032}}\n",
                card(i)
            )
        })
        .collect();
    std::fs::write(&file, text).unwrap();
    let run = |role: &str, map: &str| {
        Command::new(BIN)
            .args([
                "import",
                file.to_str().unwrap(),
                "--format",
                "jsonl",
                "--url",
                &app.base,
                "--token-file",
                app.token_file(role, "j").to_str().unwrap(),
                "--map-out",
                dir.path().join(map).to_str().unwrap(),
            ])
            .output()
            .unwrap()
    };
    let out = run("importer", "map.csv");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let map = std::fs::read_to_string(dir.path().join("map.csv")).unwrap();
    assert_eq!(map.lines().count(), 51);
    assert!(map.lines().nth(1).unwrap().starts_with("0,"));
    let out = run("edge", "edge-map.csv");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokens:dedupe"));
}
