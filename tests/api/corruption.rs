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
    let mut tokens = Vec::new();
    for i in 0..12 {
        let pan = pan_for(70_000 + i);
        let (status, body) = app.tokenize("default", &pan, None).await;
        assert_eq!(status, 201);
        tokens.push((body["token"].as_str().unwrap().to_owned(), pan));
    }
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
    assert!(app.logs().contains("record failed its integrity check"));

    // The audit trail names each damaged token.
    let token_file = app.token_file("officer", "default");
    let (code, out, err) = run_cli(
        &[
            "audit",
            "--url",
            &app.base,
            "--token-file",
            token_file.to_str().unwrap(),
            "export",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let failed: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["action"] == "detokenize" && r["outcome"] == "integrity-failure")
        .collect();
    assert_eq!(failed.len(), 6);
    for (token, _) in &tokens[..6] {
        assert!(
            failed.iter().any(|r| r["token"] == token.as_str()),
            "{token} not in the audit trail"
        );
    }
    drop(app);
    drop(keep);
}
