//! Online backups (sled): taken under load through the real CLI, verified without
//! keys, restored into an empty directory; the restored vault opens every card
//! acknowledged before the backup began and its audit trail verifies.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};

use crate::helpers::*;

async fn backup_cli(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_cli(&args, &[])
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_backup_under_load_restores_every_acknowledged_card_and_its_trail_verifies() {
    // (The busy check at the end stores 24 000 cards behind few BINs: no enumeration guard.)
    let app = TestApp::spawn_with(&["--enumeration-guard", "off"]);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("vault.tvbackup");
    let operator = app.token_file("operator", "default");
    let take = |out: &std::path::Path, token: &std::path::Path| {
        vec![
            "backup".to_owned(),
            "--url".into(),
            app.base.clone(),
            "--token-file".into(),
            token.to_str().unwrap().into(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ]
    };
    if on_postgres() {
        // PostgreSQL is backed up with its own tools: a clear 501, no file left behind.
        let (code, _, err) = backup_cli(take(&out, &operator)).await;
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("PostgreSQL"), "{err}");
        assert!(!out.exists());
        return;
    }
    let before = seed(&app, "acme", 700_000, 300).await;
    for (_, pan) in &before {
        app.watch(pan);
    }

    // Traffic that does not stop for the backup: tokenize and detokenize.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (client, base, stop) = (app.client.clone(), app.base.clone(), stop.clone());
        let (edge, psp) = (app.jwt("edge", "acme"), app.jwt("psp", "acme"));
        let old: Vec<String> = before.iter().map(|(t, _)| t.clone()).collect();
        tokio::spawn(async move {
            let (mut during, mut reads, mut i) = (Vec::new(), 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let pan = pan_for(800_000 + i);
                let res = client
                    .post(format!("{base}/v1/tokens"))
                    .bearer_auth(&edge)
                    .json(&json!({"pan": pan, "exp_month": 12, "exp_year": 2031}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 201, "tokenize keeps working during the backup");
                let token = res.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
                during.push((token, pan));
                let res = client
                    .post(format!("{base}/v1/detokenize"))
                    .bearer_auth(&psp)
                    .json(&json!({"token": old[(i as usize) % old.len()]}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 200, "detokenize keeps working during the backup");
                reads += 1;
                i += 1;
            }
            (during, reads)
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    // Denied: no scope (crm), and an existing --out is never overwritten.
    let crm = app.token_file("crm", "acme");
    let denied = tmp.path().join("denied.tvbackup");
    let (code, _, err) = backup_cli(take(&denied, &crm)).await;
    assert_eq!(code, 3, "{err}");
    assert!(!denied.exists(), "nothing left behind");
    std::fs::write(&denied, b"keep me").unwrap();
    let (code, _, err) = backup_cli(take(&denied, &operator)).await;
    assert_eq!(code, 2, "{err}");
    assert_eq!(std::fs::read(&denied).unwrap(), b"keep me");

    let (code, stdout, err) = backup_cli(take(&out, &operator)).await;
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("backup written to"), "{stdout}");
    assert!(stdout.contains("chain intact"), "{stdout}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (during, reads) = load.await.unwrap();
    assert!(!during.is_empty() && reads > 0, "the load ran through the backup");
    for (_, pan) in &during {
        app.watch(pan);
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&out).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "the backup file is readable by its owner only");

    // The backup holds sealed records only: no PAN in its bytes.
    let bytes = std::fs::read(&out).unwrap();
    for (_, pan) in before.iter().chain(&during) {
        assert!(
            !bytes.windows(pan.len()).any(|w| w == pan.as_bytes()),
            "no PAN in a backup"
        );
    }

    // verify: valid, and it names what it holds.
    let o = out.to_str().unwrap().to_owned();
    let (code, stdout, err) = backup_cli(vec!["backup".into(), "verify".into(), o.clone(), "--json".into()]).await;
    assert_eq!(code, 0, "{stdout}{err}");
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["valid"], true);
    let records = report["records"].as_u64().unwrap();
    assert!(records >= 300, "{report}");
    assert!(report["audit_records_verified"].as_u64().unwrap() >= 300, "{report}");
    assert_eq!(report["kek_versions"][0]["version"], 1, "{report}");

    // A damaged copy is refused by verify and by restore, which leaves nothing behind.
    let damaged = tmp.path().join("damaged.tvbackup");
    let mut bad = bytes.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    std::fs::write(&damaged, &bad).unwrap();
    let d = damaged.to_str().unwrap().to_owned();
    let (code, _, err) = backup_cli(vec!["backup".into(), "verify".into(), d.clone()]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not a valid backup"), "{err}");
    let nowhere = tmp.path().join("nowhere");
    let (code, _, err) = backup_cli(vec![
        "restore".into(),
        d,
        "--data-dir".into(),
        nowhere.to_str().unwrap().into(),
    ])
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(!nowhere.join("sled").exists() && !nowhere.join("keys/keystore.json").exists());

    // Restore into an empty directory; a second restore over it is refused.
    let restored = tmp.path().join("restored");
    let r = restored.to_str().unwrap().to_owned();
    let restore = vec!["restore".to_owned(), o.clone(), "--data-dir".into(), r.clone()];
    let (code, stdout, err) = backup_cli(restore.clone()).await;
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("no root key material"), "{stdout}");
    let (code, _, err) = backup_cli(restore).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not empty"), "{err}");

    // The audit trail records the backup (after it was taken) with its pause.
    let trail = app.audit_export();
    let taken = trail
        .iter()
        .find(|r| r["action"] == "backup.create" && r["outcome"] == "ok")
        .expect("backup.create audited");
    assert!(
        taken["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("{records} records")),
        "{taken}"
    );
    assert!(
        trail.iter().any(|r| r["action"] == "authz.failure"
            && r["outcome"] == "scope"
            && r["detail"].as_str().unwrap().contains("scope vault:backup")),
        "the denied attempt is audited too"
    );

    // A dev vault's root key is not in the backup: bring it as an operator would
    // bring the HSM or the custodians.
    copy_dir(&app.data_dir.join("dev"), &restored.join("dev"));
    std::fs::copy(
        app.data_dir.join("keys/dev-root.key"),
        restored.join("keys/dev-root.key"),
    )
    .unwrap();
    let copy = TestApp::restart_on(&restored);
    for (token, pan) in &before {
        copy.watch(pan);
        let res = copy.detokenize("acme", token).await;
        assert_eq!(res.status(), 200, "every card acknowledged before the backup opens");
        assert_eq!(res.json::<Value>().await.unwrap()["pan"], pan.as_str());
    }
    // Cards tokenized while it ran are there whole or not at all.
    let mut present = 0;
    for (token, pan) in &during {
        copy.watch(pan);
        let res = copy.detokenize("acme", token).await;
        match res.status().as_u16() {
            200 => {
                assert_eq!(res.json::<Value>().await.unwrap()["pan"], pan.as_str());
                present += 1;
            }
            404 => {}
            other => panic!("a card tokenized during the backup answered {other}"),
        }
    }
    assert_eq!(
        copy.metric("tokenvault_tokens_stored").await as u64,
        records,
        "the restored vault holds exactly the backup's records"
    );
    assert!(present <= during.len());
    drop(copy);
    let (code, stdout, err) = run_cli(&["audit", "--offline", "--data-dir", &r, "verify"], &[]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("intact"), "{stdout}");

    // One backup at a time: while a download is open (a backup of ≈ 14 MB that the
    // client does not read, far beyond what the sockets buffer), another is refused
    // with 429 and audited; once it is gone the next one is taken.
    let edge = app.jwt("edge", "acme");
    for k in 0..24u64 {
        let items: Vec<Value> = (0..1000u64)
            .map(|i| {
                json!({"id": format!("c{k}-{i}"), "pan": pan_for(1_000_000 + k * 1000 + i),
                            "exp_month": 12, "exp_year": 2031})
            })
            .collect();
        let res = app
            .client
            .post(app.url("/v1/tokens/batch"))
            .bearer_auth(&edge)
            .json(&json!({"items": items}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let start = || {
        app.client
            .post(app.url("/v1/admin/backup"))
            .bearer_auth(app.jwt("operator", "default"))
            .send()
    };
    let held = start().await.unwrap();
    assert_eq!(held.status(), 200);
    let busy = start().await.unwrap();
    assert_eq!(busy.headers()["retry-after"], "60");
    assert_problem(busy, 429, "rate-limited").await;
    assert!(
        app.audit_export()
            .iter()
            .any(|r| r["action"] == "backup.create" && r["outcome"] == "busy"),
        "the refused backup is audited"
    );
    let whole = held.bytes().await.unwrap();
    assert!(whole.len() > 10_000_000, "{} bytes", whole.len());
    let again = start().await.unwrap();
    assert_eq!(
        again.status(),
        200,
        "the next backup is taken once the first is downloaded"
    );
    assert!(again.bytes().await.unwrap().len() >= whole.len());
}
