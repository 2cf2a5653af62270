//! Corruption suite: records damaged at rest (bytes flipped, truncated, relabelled,
//! metadata altered, two records swapped) fail closed with an integrity problem —
//! never a wrong PAN — the others keep working, and metrics and the audit trail
//! report it.

use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn damaged_records_fail_closed_and_the_rest_keep_working() {
    let mut app = TestApp::spawn().await;
    let keep = app.keep_data();
    let dir = app.data_dir.clone();
    let tokens = seed(&app, "default", 70_000, 12).await;
    app.kill();
    drop(app);

    // Damage six records directly in the store.
    {
        let db = sled::open(dir.join("sled")).unwrap();
        let tree = db.open_tree("tokens").unwrap();
        let get = |t: &str| tree.get(t.as_bytes()).unwrap().unwrap().to_vec();
        let put = |t: &str, v: Vec<u8>| {
            tree.insert(t.as_bytes(), v).unwrap();
        };
        let mut v = get(&tokens[0].0);
        let n = v.len();
        v[n - 3] ^= 0x01; // inside the payload's GCM tag
        put(&tokens[0].0, v);
        let mut v = get(&tokens[1].0);
        let mid = v.len() / 2;
        v[mid] ^= 0x80; // wrapped DEK / ciphertext
        put(&tokens[1].0, v);
        let mut v = get(&tokens[2].0);
        let last4 = tokens[2].1.as_bytes()[12..].to_vec();
        let at = v
            .windows(4)
            .position(|w| w == last4.as_slice())
            .expect("last four stored in the record");
        v[at] = if v[at] == b'9' { b'0' } else { v[at] + 1 }; // metadata shown to CRM
        put(&tokens[2].0, v);
        let v = get(&tokens[3].0);
        put(&tokens[3].0, v[..v.len() - 5].to_vec()); // truncated
        let mut v = get(&tokens[4].0);
        v[0] = 9; // unknown record version
        put(&tokens[4].0, v);
        let other = get(&tokens[11].0);
        put(&tokens[5].0, other); // another record's envelope moved here
        db.flush().unwrap();
    }

    let app = TestApp::restart_on(&dir);
    for (i, (token, pan)) in tokens.iter().enumerate() {
        app.watch(pan);
        let res = app.detokenize("default", token).await;
        if i < 6 {
            let p = assert_problem(res, 500, "integrity-failure").await;
            let shown = format!("{}{}", p["title"], p["detail"]);
            assert!(!shown.contains(&pan[6..]), "no card data in the problem");
            assert_problem(app.read("default", token).await, 500, "integrity-failure").await;
        } else {
            assert_eq!(res.status(), 200, "undamaged record {i}");
            assert_eq!(res.json::<Value>().await.unwrap()["pan"], pan.as_str());
        }
    }
    assert_eq!(
        app.metric("tokenvault_detokenize_total{outcome=\"integrity\"}").await,
        6.0
    );
    assert_eq!(
        app.metric("tokenvault_token_reads_total{outcome=\"integrity\"}").await,
        6.0
    );
    assert!(app.log_shows("record failed its integrity check").await);

    // The audit trail names each damaged token.
    let trail = app.audit_export();
    let failed: Vec<&Value> = trail
        .iter()
        .filter(|r| r["action"] == "detokenize" && r["outcome"] == "integrity-failure")
        .collect();
    assert_eq!(failed.len(), 6);
    for (token, _) in &tokens[..6] {
        assert!(
            failed.iter().any(|r| r["token"] == token.as_str()),
            "{token} not in the audit trail"
        );
    }
    // A damaged record whose bytes still decode is read (its read recorded) before
    // the card fails to open in memory: its `ok` record is followed by the error's.
    // One whose bytes do not decode (3: truncated, 4: unknown version) is not read.
    for (i, (token, _)) in tokens[..6].iter().enumerate() {
        let outcomes: Vec<&str> = trail
            .iter()
            .filter(|r| r["action"] == "detokenize" && r["token"] == token.as_str())
            .map(|r| r["outcome"].as_str().unwrap())
            .collect();
        let expected: &[&str] = if i == 3 || i == 4 {
            &["integrity-failure"]
        } else {
            &["ok", "integrity-failure"]
        };
        assert_eq!(outcomes, expected, "damaged record {i}");
    }

    // A record that does not decode fails its own reads only: the reads beside it
    // (applied in the same commit batches) succeed.
    let shared = &app;
    let bad = (0..24).map(|_| shared.detokenize("default", &tokens[3].0));
    let good = tokens[6..].iter().cycle().take(48).map(|(t, pan)| async move {
        let res = shared.detokenize("default", t).await;
        assert_eq!(res.status(), 200, "an undamaged record beside a damaged one");
        assert_eq!(res.json::<Value>().await.unwrap()["pan"], pan.as_str());
    });
    let (bad, _) = tokio::join!(
        futures_util::future::join_all(bad),
        futures_util::future::join_all(good)
    );
    for res in bad {
        assert_problem(res, 500, "integrity-failure").await;
    }
    drop(app);
    drop(keep);
}

/// Raw damage inside sled's own log file, one flipped byte per case, at positions
/// spread over the log's used part of a pristine copy.
///
/// - After a crash (SIGKILL), sled's recovery replays the log, stops at the first
///   message whose checksum fails and drops everything after it, acknowledged
///   writes included. The store's anchor (the durably written audit head, kept
///   beside sled's files) catches that at start: `tokenvault store check` exits 1,
///   the vault raises `tokenvault_store_damaged` and a `store.damage` audit event,
///   every missing token fails closed with `integrity-failure` (never a 404, never
///   another PAN), the others open to their own PAN, and new cards are refused.
/// - After a clean stop, sled refuses to open a damaged log at all: the vault
///   refuses to start, with an error that names the store. `tokenvault store
///   salvage` copies the store aside and drops sled's snapshot, so that sled
///   replays its log up to the damage; from there it is the case above.
///
/// Then one damaged store is accepted with `tokenvault store reanchor`.
#[tokio::test]
async fn raw_log_damage_is_detected_and_lost_tokens_fail_closed() {
    let mut app = TestApp::spawn().await;
    let keep = app.keep_data();
    let dir = app.data_dir.clone();
    // One at a time: each token's audit record follows it in the log.
    let mut tokens = Vec::new();
    for i in 0..24 {
        let pan = pan_for(71_000 + i);
        let (status, body) = app.tokenize("default", &pan, None).await;
        assert_eq!(status, 201);
        tokens.push((body["token"].as_str().unwrap().to_owned(), pan));
    }
    app.kill();
    drop(app);
    // A cleanly closed copy (opened and closed by `store check`).
    let closed = dir.with_file_name("closed");
    copy_dir(&dir, &closed);
    let (code, out, _) = run_cli(&["store", "check", "--data-dir", closed.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "the undamaged store checks intact: {out}");
    let (code, out, _) = run_cli(
        &["store", "check", "--json", "--data-dir", closed.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        serde_json::json!({"intact": true})
    );
    let (code, out, _) = run_cli(&["store", "salvage", "--data-dir", closed.to_str().unwrap()], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("nothing to salvage"), "{out}");

    let cases = 8;
    let (mut intact, mut damaged, mut refused, mut salvaged, mut lost_tokens) = (0, 0, 0, 0, 0);
    let mut accepted = None;
    for (origin, source) in [("crashed", &dir), ("closed", &closed)] {
        let db = std::fs::read(source.join("sled/db")).unwrap();
        let used = db.iter().rposition(|&b| b != 0).unwrap() + 1;
        for k in 1..=cases {
            let case = dir.with_file_name(format!("{origin}{k}"));
            copy_dir(source, &case);
            let at = used * k / (cases + 1);
            let mut bytes = db.clone();
            bytes[at] ^= 0x01;
            std::fs::write(case.join("sled/db"), &bytes).unwrap();
            let case_arg = case.to_str().unwrap().to_owned();
            let (mut code, mut out, mut err) = run_cli(&["store", "check", "--data-dir", &case_arg], &[]);
            if code == 2 {
                // sled refuses to open the damaged log: so does the vault.
                assert!(err.contains("cannot open the store"), "{err}");
                let serve = run_cli(&["serve", "--listen", "127.0.0.1:0", "--data-dir", &case_arg], &[]);
                assert_ne!(serve.0, 0);
                assert!(
                    serve.2.contains("cannot open the store: stored record is corrupt"),
                    "{}",
                    serve.2
                );
                refused += 1;
                // Salvage: sled replays its log without the snapshot, up to the damage.
                let salvage = run_cli(&["store", "salvage", "--data-dir", &case_arg], &[]);
                eprintln!(
                    "{origin} {k}: byte {at} of {used}: sled refuses to open; salvage exit {}",
                    salvage.0
                );
                if salvage.0 == 2 {
                    assert!(salvage.2.contains("restore from backup"), "{}", salvage.2);
                    continue;
                }
                assert_eq!(salvage.0, 0, "{}{}", salvage.1, salvage.2);
                assert!(
                    salvage.1.contains("salvaged") && salvage.1.contains("damaged store is kept in"),
                    "{}",
                    salvage.1
                );
                salvaged += 1;
                (code, out, err) = run_cli(&["store", "check", "--data-dir", &case_arg], &[]);
            }
            assert!(code == 0 || code == 1, "store check: {code} {out} {err}");
            if code == 1 {
                // The same verdict as one JSON object (before the vault below takes the store's lock).
                let (json_code, json_out, json_err) =
                    run_cli(&["store", "check", "--data-dir", &case_arg, "--json"], &[]);
                let report: Value = serde_json::from_str(&json_out)
                    .unwrap_or_else(|e| panic!("{e}: exit {json_code}: {json_out} {json_err}"));
                assert_eq!(
                    (json_code, &report["intact"], &report["damage"]),
                    (1, &Value::Bool(false), &Value::from("records_lost"))
                );
            }
            let app = TestApp::restart_on(&case);
            let (mut opened, mut failed) = (0, 0);
            for (token, pan) in &tokens {
                app.watch(pan);
                let res = app.detokenize("default", token).await;
                if res.status() == 200 {
                    assert_eq!(res.json::<Value>().await.unwrap()["pan"], pan.as_str());
                    opened += 1;
                } else {
                    let p = assert_problem(res, 500, "integrity-failure").await;
                    assert!(!format!("{}{}", p["title"], p["detail"]).contains(&pan[6..]));
                    failed += 1;
                }
            }
            let flagged = app.metric("tokenvault_store_damaged").await;
            eprintln!("{origin} {k}: byte {at} of {used}: check exit {code}, {opened} open, {failed} fail closed");
            if code == 1 {
                damaged += 1;
                assert!(out.contains("store DAMAGED (records_lost)"), "{out}");
                assert_eq!(flagged, 1.0);
                // Audit records were lost in any case; tokens, if written after the damage.
                lost_tokens += failed;
                assert_eq!(
                    app.metric("tokenvault_detokenize_total{outcome=\"lost\"}").await,
                    failed as f64
                );
                assert!(app.log_shows("STORE DAMAGED").await);
                let (status, body) = app.tokenize("default", &pan_for(72_000 + k as u64), None).await;
                assert_eq!(
                    (status, body["type"].as_str()),
                    (503, Some("urn:tokenvault:problem:store-damaged"))
                );
                // Charges may be lost too: a missing one is not a plain 404 either.
                let res = app
                    .client
                    .get(app.url("/v1/charges/ch_AAAAAAAAAAAAAAAAAAAAAA"))
                    .bearer_auth(app.jwt("psp", "default"))
                    .send()
                    .await
                    .unwrap();
                assert_problem(res, 500, "integrity-failure").await;
                let trail = app.audit_export();
                let alarm: Vec<&Value> = trail.iter().filter(|r| r["action"] == "store.damage").collect();
                assert_eq!(alarm.len(), 1, "one store.damage event");
                assert_eq!(alarm[0]["outcome"], "records_lost");
                let lost_reads = trail
                    .iter()
                    .filter(|r| r["action"] == "detokenize" && r["outcome"] == "integrity-failure")
                    .count();
                assert_eq!(lost_reads, failed);
                if accepted.is_none() && failed > 0 {
                    accepted = Some((case.clone(), opened));
                }
            } else {
                intact += 1;
                assert_eq!((flagged, failed), (0.0, 0), "an intact store serves every token");
            }
            drop(app);
        }
    }
    eprintln!(
        "raw log damage: {} cases: {damaged} detected as damaged ({lost_tokens} lost tokens failed closed), \
         {intact} intact, {refused} refused by sled ({salvaged} of them salvaged)",
        2 * cases
    );
    assert!(
        damaged >= 1,
        "flips in a crashed store's log make sled drop acknowledged writes"
    );

    // Accepting the loss: reanchor the stopped vault, then it issues tokens again,
    // missing tokens are plain 404s, and the audit trail records the acceptance.
    let (case, opened) = accepted.unwrap();
    let case_arg = case.to_str().unwrap();
    let (code, _, err) = run_cli(&["store", "reanchor", "--data-dir", case_arg], &[]);
    assert_eq!(code, 2, "reanchor needs --accept-loss");
    assert!(err.contains("--accept-loss"));
    let (code, out, err) = run_cli(&["store", "reanchor", "--data-dir", case_arg, "--accept-loss"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("anchor moved back"), "{out}");
    let (code, _, _) = run_cli(&["store", "check", "--data-dir", case_arg], &[]);
    assert_eq!(code, 0);
    let app = TestApp::restart_on(&case);
    assert_eq!(app.metric("tokenvault_store_damaged").await, 0.0);
    let (mut ok, mut gone) = (0, 0);
    for (token, _) in &tokens {
        match app.detokenize("default", token).await.status().as_u16() {
            200 => ok += 1,
            404 => gone += 1,
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!((ok, gone), (opened, tokens.len() - opened));
    let (status, _) = app.tokenize("default", &pan_for(73_000), None).await;
    assert_eq!(status, 201);
    let trail = app.audit_export();
    assert!(
        trail
            .iter()
            .any(|r| r["action"] == "store.reanchor" && r["outcome"] == "accepted")
    );
    drop(app);
    drop(keep);
}
