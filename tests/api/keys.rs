//! Key management through the real CLI and admin API: the full lifecycle under
//! load, dual control, records under a destroyed key, resumable rewrap, the
//! sealed vault and custodian shares, automatic rotation, officer-only access.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

fn status_json(app: &TestApp) -> Value {
    let (code, out, err) = app.keys_cli("officer", &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn version(status: &Value, v: u64) -> Value {
    status["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["version"] == v)
        .cloned()
        .unwrap()
}

/// rotate → rewrap → retire v1 → destroy v1 (two officers) while clients keep
/// tokenizing and detokenizing: zero failed requests, every token still opens
/// to its PAN, and v1 ends destroyed with 0 records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_key_cycle_under_continuous_traffic() {
    let app = Arc::new(TestApp::spawn().await);
    let seeded = Arc::new(seed(&app, "default", 0, 400).await);
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let created = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut traffic = Vec::new();
    for worker in 0..4u64 {
        let (app, seeded, stop, failures, requests, created) = (
            app.clone(),
            seeded.clone(),
            stop.clone(),
            failures.clone(),
            requests.clone(),
            created.clone(),
        );
        traffic.push(tokio::spawn(async move {
            let edge = app.jwt("edge", "default");
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let pan = pan_for(1_000_000 + worker * 100_000 + i);
                let res = app
                    .tokenize_as(&edge, json!({"pan": pan, "exp_month": 11, "exp_year": 2032}))
                    .await;
                requests.fetch_add(1, Ordering::Relaxed);
                if res.status() != 201 {
                    failures.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let token = res.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
                created.lock().unwrap().push((token, pan));
                let (token, pan) = &seeded[(i as usize * 7 + worker as usize) % seeded.len()];
                let res = app.detokenize("default", token).await;
                requests.fetch_add(1, Ordering::Relaxed);
                let ok = res.status() == 200 && res.json::<Value>().await.unwrap()["pan"] == pan.as_str();
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let cli = |role: &'static str, args: &'static [&'static str]| {
        let app = app.clone();
        tokio::task::spawn_blocking(move || app.keys_cli(role, args))
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (code, out, err) = cli("officer", &["rotate"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("v2 is now active"), "{out}");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Retire is refused while records remain, and says how many.
    let (code, _, err) = cli("officer", &["retire", "v1"]).await.unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("still wraps") && err.contains("record"), "{err}");

    let (code, out, err) = cli("officer", &["rewrap", "--batch", "100"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rewrapped") && out.contains("0 failed"), "{out}");
    let (code, _, err) = cli("officer", &["retire", "v1"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Dual control: the requester cannot approve; a second officer can.
    let (code, out, _) = cli("officer", &["destroy", "v1"]).await.unwrap();
    assert_eq!(code, 10, "pending approval: {out}");
    let (code, _, err) = cli("officer", &["destroy", "v1"]).await.unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("different officer"), "{err}");
    let (code, out, err) = cli("officer2", &["destroy", "v1"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("requested by dev-officer, approved by dev-officer-2"),
        "{out}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    stop.store(true, Ordering::Relaxed);
    for t in traffic {
        t.await.unwrap();
    }
    let total = requests.load(Ordering::Relaxed);
    assert!(total > 100, "traffic ran: {total} requests");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "failed requests during the key cycle (of {total})"
    );

    // Every token, old and new, still opens to its PAN.
    let created = created.lock().unwrap().clone();
    for (token, pan) in seeded.iter().chain(created.iter()) {
        app.watch(pan);
        let res = app.detokenize("default", token).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<Value>().await.unwrap()["pan"], pan.as_str());
    }
    let status = status_json(&app);
    let v1 = version(&status, 1);
    assert_eq!(v1["state"], "destroyed");
    assert_eq!(v1["records"], 0);
    assert_eq!(version(&status, 2)["state"], "active");
    assert_eq!(version(&status, 2)["records"], (seeded.len() + created.len()) as u64);
    let actions: Vec<&str> = status["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["init", "rotate", "retire", "destroy-request", "destroy"]);
    assert_eq!(status["events"][3]["officers"], json!(["dev-officer"]));
    let destroy = &status["events"][4];
    assert_eq!(destroy["officers"], json!(["dev-officer", "dev-officer-2"]));
    // Human status output.
    let (_, human, _) = app.keys_cli("officer", &["status"]);
    assert!(
        human.contains("destroyed") && human.contains("active KEK: v2"),
        "{human}"
    );
    assert!(app.metric("tokenvault_rewrapped_total").await >= seeded.len() as f64);
    eprintln!(
        "key cycle under load: {total} requests, 0 failures, {} tokens verified",
        seeded.len() + created.len()
    );
}

/// A record still wrapped under a destroyed version (restored from an old backup)
/// fails closed with a key-destroyed problem: never a panic, never a wrong PAN.
#[tokio::test]
async fn record_under_destroyed_version_fails_closed() {
    let mut app = TestApp::spawn().await;
    let keep = app.keep_data();
    let dir = app.data_dir.clone();
    let tokens = seed(&app, "default", 5_000, 5).await;
    app.kill();
    let backup = dir.with_file_name("sled-backup");
    copy_dir(&dir.join("sled"), &backup);
    drop(app);

    let app = TestApp::restart_on(&dir);
    for args in [&["rotate"][..], &["rewrap"], &["retire", "v1"], &["destroy", "v1"]] {
        let (code, _, err) = app.keys_cli("officer", args);
        assert!(code == 0 || code == 10, "{args:?}: {err}");
    }
    let (code, _, err) = app.keys_cli("officer2", &["destroy", "v1"]);
    assert_eq!(code, 0, "{err}");
    let mut app = app;
    app.kill();
    drop(app);

    std::fs::remove_dir_all(dir.join("sled")).unwrap();
    copy_dir(&backup, &dir.join("sled"));
    let app = TestApp::restart_on(&dir);
    for (token, pan) in &tokens {
        app.watch(pan);
        let p = assert_problem(app.detokenize("default", token).await, 410, "key-destroyed").await;
        assert!(!format!("{}{}", p["title"], p["detail"]).contains(&pan[6..12]));
        assert_problem(app.read("default", token).await, 410, "key-destroyed").await;
    }
    assert_eq!(
        app.client.get(app.url("/healthz")).send().await.unwrap().status(),
        200,
        "still serving"
    );
    assert_eq!(
        app.metric("tokenvault_detokenize_total{outcome=\"key_destroyed\"}")
            .await,
        5.0
    );
    drop(app);
    drop(keep);
}

/// Offline rewrap SIGKILLed midway, then run again: completes, and every record opens.
#[tokio::test]
async fn offline_rewrap_killed_midway_then_resumed() {
    let mut app = TestApp::spawn().await;
    let keep = app.keep_data();
    let dir = app.data_dir.clone();
    let tokens = seed(&app, "default", 20_000, 1500).await;
    assert_eq!(app.keys_cli("officer", &["rotate"]).0, 0);
    app.kill();
    drop(app);

    let d = dir.to_str().unwrap();
    let mut child = std::process::Command::new(BIN)
        .envs(store_of(&dir).map(|url| ("TOKENVAULT_STORE", url)))
        .args([
            "keys",
            "--offline",
            "--data-dir",
            d,
            "rewrap",
            "--batch",
            "50",
            "--rate",
            "1000",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    child.kill().unwrap();
    child.wait().unwrap();

    let (code, out, err) = run_cli(&["keys", "--offline", "--data-dir", d, "status", "--json"], &[]);
    assert_eq!(code, 0, "{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    let left = version(&status, 1)["records"].as_u64().unwrap();
    assert!(left > 0 && left < 1500, "killed midway: {left} of 1500 still under v1");
    assert_eq!(version(&status, 2)["records"].as_u64().unwrap() + left, 1500);

    let (code, out, err) = run_cli(&["keys", "--offline", "--data-dir", d, "rewrap", "--batch", "500"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("rewrapped {left} records")), "{out}");
    // A second run is harmless.
    let (code, out, _) = run_cli(&["keys", "--offline", "--data-dir", d, "rewrap"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("rewrapped 0 records"), "{out}");

    let app = TestApp::restart_on(&dir);
    for (token, pan) in &tokens {
        app.watch(pan);
        let res = app.detokenize("default", token).await;
        assert_eq!(res.json::<Value>().await.unwrap()["pan"], pan.as_str());
    }
    let status = status_json(&app);
    assert_eq!(version(&status, 1)["records"], 0);
    assert_eq!(version(&status, 2)["records"], 1500);
    drop(app);
    drop(keep);
}

#[tokio::test]
async fn admin_api_is_for_officers_only() {
    let app = TestApp::spawn().await;
    let calls: [(&str, &str, Option<Value>); 9] = [
        ("GET", "/v1/admin/keys", None),
        ("POST", "/v1/admin/keys/rotate", None),
        ("POST", "/v1/admin/keys/rewrap", Some(json!({}))),
        ("POST", "/v1/admin/keys/v1/retire", None),
        ("POST", "/v1/admin/keys/v1/destroy", None),
        ("POST", "/v1/admin/keys/rotate-root", Some(json!({"key_label": "x"}))),
        ("POST", "/v1/admin/unseal", Some(json!({"share": "x"}))),
        ("GET", "/v1/admin/audit/verify", None),
        ("GET", "/v1/admin/audit/export", None),
    ];
    for (method, path, body) in &calls {
        for role in ["edge", "crm", "psp"] {
            let mut req = if *method == "GET" {
                app.client.get(app.url(path))
            } else {
                app.client.post(app.url(path))
            };
            req = req.bearer_auth(app.jwt(role, "default"));
            if let Some(b) = body {
                req = req.json(b);
            }
            assert_problem(req.send().await.unwrap(), 403, "forbidden").await;
        }
        let req = if *method == "GET" {
            app.client.get(app.url(path))
        } else {
            app.client.post(app.url(path))
        };
        assert_problem(req.send().await.unwrap(), 401, "unauthenticated").await;
    }
    // Officers: the refusals are clear problems.
    let officer = app.jwt("officer", "default");
    let res = app
        .client
        .post(app.url("/v1/admin/keys/v1/retire"))
        .bearer_auth(&officer)
        .send()
        .await
        .unwrap();
    assert!(
        assert_problem(res, 409, "key-operation-refused").await["detail"]
            .as_str()
            .unwrap()
            .contains("active")
    );
    let res = app
        .client
        .post(app.url("/v1/admin/keys/v1/destroy"))
        .bearer_auth(&officer)
        .send()
        .await
        .unwrap();
    assert!(
        assert_problem(res, 409, "key-operation-refused").await["detail"]
            .as_str()
            .unwrap()
            .contains("retired")
    );
    let res = app
        .client
        .post(app.url("/v1/admin/keys/v9/retire"))
        .bearer_auth(&officer)
        .send()
        .await
        .unwrap();
    assert_problem(res, 409, "key-operation-refused").await;
    let res = app
        .client
        .post(app.url("/v1/admin/keys/rotate-root"))
        .bearer_auth(&officer)
        .json(&json!({"key_label": "r2"}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 409, "key-operation-refused").await;
    let res = app
        .client
        .post(app.url("/v1/admin/unseal"))
        .bearer_auth(&officer)
        .json(&json!({"share": "tvs1.AAAA.00000000"}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 422, "invalid-share").await;
    let res = app
        .client
        .post(app.url("/v1/admin/keys/rewrap"))
        .bearer_auth(&officer)
        .json(&json!({"batch": 0}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 422, "invalid-field").await;
    // No CLI credential: a usage error, exit 2.
    let (code, _, err) = run_cli(&["keys", "--url", &app.base, "status"], &[]);
    assert_eq!(code, 2, "{err}");
    // Offline on a running vault's data directory is refused (sled lock). PostgreSQL
    // has no such lock: there, officers stop the replicas first (SECURITY.md).
    if on_postgres() {
        return;
    }
    let (code, _, err) = run_cli(
        &[
            "keys",
            "--offline",
            "--data-dir",
            app.data_dir.to_str().unwrap(),
            "status",
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("still running"), "{err}");
}

#[tokio::test]
async fn cryptoperiod_rotates_automatically() {
    let app = TestApp::spawn_with(&["--cryptoperiod", "2s"]);
    let (_, first) = app.tokenize("default", "4111111111111111", None).await;
    let mut status = status_json(&app);
    assert_eq!(status["cryptoperiod_secs"], 2);
    for _ in 0..60 {
        if status["active"] != 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        status = status_json(&app);
    }
    assert!(
        status["active"].as_u64().unwrap() >= 2,
        "rotated without an officer: {status}"
    );
    let rotate = status["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "rotate")
        .unwrap();
    assert!(rotate["officers"][0].as_str().unwrap().starts_with("auto-rotation"));
    // Old tokens still open; new ones use the new key.
    assert_eq!(
        app.detokenize("default", first["token"].as_str().unwrap())
            .await
            .status(),
        200
    );
    assert!(app.log_shows("KEK rotated automatically").await);
}

#[tokio::test]
async fn keystore_edited_on_disk_is_refused_at_start() {
    let mut app = TestApp::spawn().await;
    let keep = app.keep_data();
    let dir = app.data_dir.clone();
    app.kill();
    drop(app);
    let path = dir.join("keys/keystore.json");
    let original = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, original.replacen("\"active\",", "\"decrypt_only\",", 1)).unwrap();
    let (code, _, err) = run_cli(
        &["serve", "--listen", "127.0.0.1:0", "--data-dir", dir.to_str().unwrap()],
        &[("RUST_LOG", "error")],
    );
    assert_ne!(code, 0);
    assert!(err.contains("integrity"), "{err}");
    drop(keep);
}

/// A production vault starts sealed; wrong, duplicated or too few shares keep it
/// sealed; M shares unseal it; no share ever reaches the logs.
#[tokio::test]
async fn sealed_vault_needs_threshold_valid_shares() {
    use crate::cli::{prod_layout, unseal_with};
    let dev = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let config = prod_layout(&dev, dir.path());
    let cfg = dir.path().join("tokenvault.toml");
    std::fs::write(&cfg, config).unwrap();
    // A second, unrelated ceremony: its shares are valid shares of the wrong root.
    let foreign = dir.path().join("foreign");
    let (code, _, _) = run_cli(
        &[
            "keys",
            "init",
            "--shares",
            "3",
            "--threshold",
            "2",
            "--keystore",
            foreign.join("ks.json").to_str().unwrap(),
            "--share-dir",
            foreign.join("shares").to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0);
    let share = |i: u32| dir.path().join(format!("shares/share-{i}.txt"));
    let share_texts: Vec<String> = (1..=3)
        .map(|i| std::fs::read_to_string(share(i)).unwrap().trim().to_owned())
        .collect();
    assert!(share_texts.iter().all(|s| s.starts_with("tvs1.")));
    assert_eq!(
        std::fs::metadata(share(1))
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap(),
        0o600
    );

    let prod = TestApp::start(&["serve", "--config", cfg.to_str().unwrap()], dir.path().join("data"));
    let edge = dev.jwt("edge", "acme");
    let body = json!({"pan": "4012888888881881", "exp_month": 12, "exp_year": 2031});
    prod.watch("4012888888881881");
    let sealed_tokenize = || {
        prod.client
            .post(prod.url("/v1/tokens"))
            .bearer_auth(&edge)
            .json(&body)
            .send()
    };
    assert_problem(sealed_tokenize().await.unwrap(), 503, "sealed").await;
    assert_problem(
        prod.client.get(prod.url("/readyz")).send().await.unwrap(),
        503,
        "not-ready",
    )
    .await;
    assert_eq!(prod.metric("tokenvault_sealed").await, 1.0);

    // A mistyped share: refused on its own.
    let typo = dir.path().join("typo.txt");
    let mut t = share_texts[0].clone();
    t.replace_range(10..11, if &t[10..11] == "A" { "B" } else { "A" });
    std::fs::write(&typo, t).unwrap();
    let (code, _, err) = unseal_with(&prod, &dev, dir.path(), &typo);
    assert_eq!(code, 1);
    assert!(err.contains("Not a valid key share"), "{err}");
    // One valid share: still sealed. The same share again: refused as a duplicate.
    let (code, out, _) = unseal_with(&prod, &dev, dir.path(), &share(1));
    assert_eq!(code, 0);
    assert!(out.contains("1 of 2 received; still sealed"), "{out}");
    let (code, _, err) = unseal_with(&prod, &dev, dir.path(), &share(1));
    assert_eq!(code, 1);
    assert!(err.contains("already submitted"), "{err}");
    // A share of another root: the pair does not open the keystore; both are discarded.
    let (code, _, err) = unseal_with(&prod, &dev, dir.path(), &foreign.join("shares/share-2.txt"));
    assert_eq!(code, 1);
    assert!(err.contains("do not rebuild the root key"), "{err}");
    assert_problem(sealed_tokenize().await.unwrap(), 503, "sealed").await;
    // Too few: one share after the reset keeps it sealed.
    let (code, out, _) = unseal_with(&prod, &dev, dir.path(), &share(2));
    assert_eq!(code, 0);
    assert!(out.contains("1 of 2"), "{out}");
    assert_problem(sealed_tokenize().await.unwrap(), 503, "sealed").await;
    // The threshold: unsealed, serving.
    let (code, out, err) = unseal_with(&prod, &dev, dir.path(), &share(3));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("unsealed"), "{out}");
    assert_eq!(sealed_tokenize().await.unwrap().status(), 201);
    assert_eq!(prod.client.get(prod.url("/readyz")).send().await.unwrap().status(), 200);
    assert_eq!(prod.metric("tokenvault_sealed").await, 0.0);
    assert_eq!(
        prod.metric("tokenvault_unseal_attempts_total{outcome=\"refused\"}")
            .await,
        3.0
    );

    // No share (nor its body) in any log line.
    let logs = prod.logs();
    for s in share_texts.iter().chain(std::iter::once(
        &std::fs::read_to_string(foreign.join("shares/share-2.txt"))
            .unwrap()
            .trim()
            .to_owned(),
    )) {
        let body = s.split('.').nth(1).unwrap();
        assert!(!logs.contains(body), "a key share appeared in the logs");
    }
    assert!(logs.contains("unseal share refused") && logs.contains("unseal share accepted"));
}

/// The random-nonce budget of a KEK: every wrap is counted per version, readiness
/// probes spend none, and the KEK rotates before its limit (here 5 wraps).
#[tokio::test]
async fn kek_rotates_before_its_nonce_budget_and_readiness_spends_none() {
    let app = TestApp::spawn_with(&["--kek-wrap-limit", "5"]);
    for _ in 0..50 {
        assert_eq!(app.client.get(app.url("/readyz")).send().await.unwrap().status(), 200);
    }
    assert_eq!(
        app.metric("tokenvault_kek_wraps{version=\"1\"}").await,
        0.0,
        "readiness encrypts nothing"
    );
    for pan in TEST_PANS {
        assert_eq!(app.tokenize("default", pan, None).await.0, 201);
    }
    assert_eq!(app.metric("tokenvault_kek_wraps{version=\"1\"}").await, 5.0);
    assert_eq!(app.metric("tokenvault_kek_wrap_limit").await, 5.0);
    // The budget check runs every second: v2 takes over.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (code, out, _) = app.keys_cli("officer", &["status", "--json"]);
        assert_eq!(code, 0);
        let status: serde_json::Value = serde_json::from_str(&out).unwrap();
        if status["active"] == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no rotation: {status}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(app.tokenize("default", "36227206271667", None).await.0, 201);
    assert_eq!(app.metric("tokenvault_kek_wraps{version=\"2\"}").await, 1.0);
    assert!(app.log_shows("wrap (nonce) budget reached").await);
}

/// The assessor's rollback: the keystore's MAC key never changed, so a copy of
/// `keystore.json` from before a destroy verified and brought the destroyed KEK
/// back. Now every save bumps the keystore's generation, the vault keeps the
/// highest one it has seen in its store, and an older keystore is refused.
#[tokio::test]
async fn a_restored_old_keystore_cannot_undo_a_destroy() {
    let mut app = TestApp::spawn().await;
    let (_, tok) = app.tokenize("default", "4111111111111111", None).await;
    let token = tok["token"].as_str().unwrap().to_owned();
    let keystore = app.data_dir.join("keys/keystore.json");
    let before = std::fs::read(&keystore).unwrap();
    for (role, args) in [
        ("officer", &["rotate"][..]),
        ("officer", &["rewrap"]),
        ("officer", &["retire", "v1"]),
        ("officer", &["destroy", "v1"]),
        ("officer2", &["destroy", "v1"]),
    ] {
        let (code, out, err) = app.keys_cli(role, args);
        assert!(code == 0 || code == 10, "{args:?}: {out}{err}");
    }
    let after = std::fs::read(&keystore).unwrap();
    let mac = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap()["body"]["mac_key"].clone();
    assert_ne!(mac(&before), mac(&after), "destroy rotates the keystore's MAC key");
    let dir = app.data_dir.clone();
    let _keep = app.keep_data();
    app.kill();

    // The old keystore (v1 alive) put back: refused at start, nothing served.
    std::fs::write(&keystore, &before).unwrap();
    let (code, _, err) = run_cli(
        &["serve", "--listen", "127.0.0.1:0", "--data-dir", dir.to_str().unwrap()],
        &[("RUST_LOG", "error")],
    );
    assert_ne!(code, 0);
    assert!(err.contains("keystore rollback refused"), "{err}");
    // Offline key commands refuse it too.
    let (code, _, err) = run_cli(
        &["keys", "--offline", "--data-dir", dir.to_str().unwrap(), "status"],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("keystore rollback refused"), "{err}");

    // The current keystore back: the vault starts and the card opens (under v2).
    std::fs::write(&keystore, &after).unwrap();
    let app = TestApp::restart_on(&dir);
    let res = app.detokenize("default", &token).await;
    assert_eq!(res.status(), 200);
    app.watch("4111111111111111");
}

/// The assessor's finding: after DELETE the envelope stayed in sled's log under a
/// still-active KEK, so the data directory plus the keys opened it. With a deletion
/// epoch the KEK rotates, live records are rewrapped and the old KEK is destroyed:
/// the deleted card's envelope (here taken from a copy of the disk made before the
/// delete, standing for what stays in the log) no longer opens with the vault's keys.
#[tokio::test]
async fn deleted_cards_become_unrecoverable_within_the_deletion_epoch() {
    let mut app = TestApp::spawn_with(&["--deletion-epoch", "3s"]);
    let (_, gone) = app.tokenize("default", "4111111111111111", None).await;
    let (_, kept) = app.tokenize("default", "5555555555554444", None).await;
    let gone = gone["token"].as_str().unwrap().to_owned();
    let kept = kept["token"].as_str().unwrap().to_owned();
    // The bytes an attacker could recover from the disk: the card's envelope as
    // stored (a copy of the data directory holds it, as sled's log does after a delete).
    let dir = app.data_dir.clone();
    let _keep = app.keep_data();
    app.kill();
    let snapshot = dir.with_file_name("snapshot");
    copy_dir(&dir, &snapshot);

    let app = TestApp::restart_on_with(&dir, &["--deletion-epoch", "3s"]);
    assert_eq!(app.delete("default", &gone).await.status(), 204);
    // The epoch passes: v2 active, the live card rewrapped, v1 destroyed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, out, _) = app.keys_cli("officer", &["status", "--json"]);
        let status: serde_json::Value = serde_json::from_str(&out).unwrap();
        let v1 = status["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["version"] == 1)
            .cloned();
        if v1.as_ref().is_some_and(|v| v["state"] == "destroyed") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no deletion epoch: {status}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    assert_eq!(
        app.detokenize("default", &kept).await.status(),
        200,
        "live cards keep working"
    );
    let trail = app.audit_export();
    assert!(
        trail
            .iter()
            .any(|r| r["action"] == "key.destroy" && r["principal"] == "system:deletion-epoch"),
        "the shredding is audited"
    );
    let keystore = std::fs::read(dir.join("keys/keystore.json")).unwrap();
    drop(app);

    // The old bytes with today's keys: the deleted card's envelope was wrapped
    // under the destroyed v1 and no longer opens (before the fix: 200 and the PAN).
    std::fs::write(snapshot.join("keys/keystore.json"), &keystore).unwrap();
    let old = TestApp::restart_on(&snapshot);
    assert_problem(old.detokenize("default", &gone).await, 410, "key-destroyed").await;
    old.watch("4111111111111111");
    old.watch("5555555555554444");
}
