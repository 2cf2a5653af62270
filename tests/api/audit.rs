//! The audit trail through the real binary: what gets recorded, and that
//! `tokenvault audit verify` catches every kind of tampering — on an export and
//! in the stopped vault's own store.

use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::charges::{charge, vault_with_psp};
use crate::helpers::*;

/// The canonical body the chain hash covers (field order matters).
#[derive(Serialize)]
struct Body<'a> {
    seq: u64,
    at: &'a Value,
    action: &'a Value,
    outcome: &'a Value,
    principal: &'a Value,
    tenant: &'a Value,
    token: &'a Value,
    request_id: &'a Value,
    source: &'a Value,
    detail: &'a Value,
}

/// Recomputes the chain from `from` on, as an attacker without the MAC key would.
fn rechain(records: &mut [Value]) {
    let mut prev = [0u8; 32];
    for r in records.iter_mut() {
        r["prev"] = json!(hex::encode(prev));
        let body = Body {
            seq: r["seq"].as_u64().unwrap(),
            at: &r["at"],
            action: &r["action"],
            outcome: &r["outcome"],
            principal: &r["principal"],
            tenant: &r["tenant"],
            token: &r["token"],
            request_id: &r["request_id"],
            source: &r["source"],
            detail: &r["detail"],
        };
        let hash: [u8; 32] = Sha256::new()
            .chain_update(prev)
            .chain_update(serde_json::to_vec(&body).unwrap())
            .finalize()
            .into();
        r["hash"] = json!(hex::encode(hash));
        prev = hash;
    }
}

fn lines(records: &[Value]) -> String {
    records.iter().map(|r| format!("{r}\n")).collect()
}

#[tokio::test]
async fn every_action_is_recorded_and_tampering_is_caught() {
    let (mut app, _psp) = vault_with_psp(&[]);
    let keep = app.keep_data();
    let pan = "4111111111111111";
    let (_, tok) = app.tokenize("default", pan, None).await;
    let token = tok["token"].as_str().unwrap().to_owned();
    assert_eq!(app.read("default", &token).await.status(), 200);
    assert_eq!(app.detokenize("default", &token).await.status(), 200);
    let body = json!({"token": token, "amount": {"value": 1000, "currency": "EUR"}, "reference": "a-1", "shopper_interaction": "moto"});
    assert_eq!(charge(&app, "psp", "default", Some("a-1"), &body).await.status(), 201);
    assert_eq!(
        app.client.get(app.url("/v1/tokens/x")).send().await.unwrap().status(),
        401
    );
    let res = app
        .client
        .post(app.url("/v1/detokenize"))
        .bearer_auth(app.jwt("crm", "default"))
        .json(&json!({"token": token}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(app.keys_cli("officer", &["rotate"]).0, 0);
    assert_eq!(app.delete("default", &token).await.status(), 204);

    // Online verify and export.
    let token_file = app.token_file("officer", "default");
    let tf = token_file.to_str().unwrap();
    let (code, out, err) = run_cli(&["audit", "--url", &app.base, "--token-file", tf, "verify"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("audit trail intact"), "{out}");
    let export = app.data_dir.with_file_name("audit.jsonl");
    let (code, _, err) = run_cli(
        &[
            "audit",
            "--url",
            &app.base,
            "--token-file",
            tf,
            "export",
            "--output",
            export.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&export).unwrap();
    assert!(!text.contains(pan), "no PAN in the audit trail");
    let records: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let actions: Vec<(&str, &str)> = records
        .iter()
        .map(|r| (r["action"].as_str().unwrap(), r["outcome"].as_str().unwrap()))
        .collect();
    for expected in [
        ("tokenize", "created"),
        ("token.read", "ok"),
        ("detokenize", "ok"),
        ("charge", "authorised"),
        ("auth.failure", "missing"),
        ("authz.failure", "scope"),
        ("key.rotate", "ok"),
        ("token.delete", "deleted"),
    ] {
        assert!(actions.contains(&expected), "{expected:?} missing from {actions:?}");
    }
    let detok = records.iter().find(|r| r["action"] == "detokenize").unwrap();
    assert_eq!(detok["principal"], "dev-psp");
    assert_eq!(detok["tenant"], "default");
    assert_eq!(detok["token"], token.as_str());
    assert_eq!(detok["source"], "127.0.0.1");
    assert!(detok["request_id"].as_str().unwrap().len() >= 8);
    assert!(
        records.iter().all(|r| r["mac"].is_string()),
        "an unsealed vault MACs every record"
    );
    assert!(records.len() >= 9);

    // Stop the vault: offline verification with the keys (MACs included).
    app.kill();
    let d = app.data_dir.to_str().unwrap().to_owned();
    let verify_file = |recs: &[Value]| {
        let f = app.data_dir.with_file_name("tampered.jsonl");
        std::fs::write(&f, lines(recs)).unwrap();
        run_cli(
            &[
                "audit",
                "--offline",
                "--data-dir",
                &d,
                "verify",
                "--file",
                f.to_str().unwrap(),
            ],
            &[],
        )
    };
    let (code, out, _) = verify_file(&records);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("{} MACs verified", records.len())), "{out}");

    let cases: Vec<(&str, Vec<Value>, &str)> = vec![
        (
            "edited",
            {
                let mut r = records.clone();
                r[2]["outcome"] = json!("not_found");
                r
            },
            "BROKEN at record 3: content does not match",
        ),
        (
            "edited with the chain recomputed",
            {
                let mut r = records.clone();
                r[2]["outcome"] = json!("not_found");
                rechain(&mut r);
                r
            },
            "BROKEN at record 3: MAC does not verify",
        ),
        (
            // The assessor's forgery: edit, recompute the chain, drop every MAC from
            // there on. Before the fix this verified ("written while sealed").
            "edited with the chain recomputed and the MACs dropped",
            {
                let mut r = records.clone();
                r[2]["outcome"] = json!("not_found");
                rechain(&mut r);
                for rec in r.iter_mut().skip(2) {
                    rec["mac"] = Value::Null;
                }
                r
            },
            "BROKEN at record 3: no MAC outside a sealed period",
        ),
        (
            "deleted",
            {
                let mut r = records.clone();
                r.remove(3);
                r
            },
            "BROKEN at record 5: sequence jumps",
        ),
        (
            "inserted",
            {
                let mut r = records.clone();
                let copy = r[1].clone();
                r.insert(3, copy);
                r
            },
            "BROKEN at record 2: sequence goes back",
        ),
        (
            "reordered",
            {
                let mut r = records.clone();
                r.swap(4, 5);
                r
            },
            "BROKEN at record 6: sequence jumps",
        ),
    ];
    for (name, recs, expected) in cases {
        let (code, out, _) = verify_file(&recs);
        assert_eq!(code, 1, "{name}: {out}");
        assert!(out.contains(expected), "{name}: {out}");
    }

    // Tampering with the vault's own trail in sled.
    {
        let db = sled::open(app.data_dir.join("sled")).unwrap();
        let tree = db.open_tree("audit").unwrap();
        let key = 3u64.to_be_bytes();
        let mut rec = stored(&tree.get(key).unwrap().unwrap());
        rec["principal"] = json!("someone-else");
        tree.insert(key, to_store(&rec)).unwrap();
        db.flush().unwrap();
    }
    let (code, out, _) = run_cli(&["audit", "--offline", "--data-dir", &d, "verify"], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("BROKEN at record 3"), "{out}");
    {
        let db = sled::open(app.data_dir.join("sled")).unwrap();
        let tree = db.open_tree("audit").unwrap();
        tree.insert(3u64.to_be_bytes(), to_store(&records[2])).unwrap();
        tree.remove(6u64.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let (code, out, _) = run_cli(&["audit", "--offline", "--data-dir", &d, "verify"], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("BROKEN at record 7: sequence jumps from 5 to 7"), "{out}");
    drop(app);
    drop(keep);
}

/// The same forgery made to look like a sealed period (the edited record turned
/// into a period opener), written into the stopped vault's own store: the file
/// verifier can no longer tell, but the anchor's keyed mark (MACed under the audit
/// key) can. The vault refuses to start and chain onto the forged head.
/// A stored audit record as JSON (the vault stores them compactly).
fn stored(bytes: &[u8]) -> Value {
    serde_json::to_value(tokenvault::audit::decode_stored(bytes).unwrap()).unwrap()
}

/// The bytes the vault would store for `rec`.
fn to_store(rec: &Value) -> Vec<u8> {
    tokenvault::audit::encode_stored(&serde_json::from_value(rec.clone()).unwrap()).unwrap()
}

#[tokio::test]
async fn a_forged_sealed_period_cannot_be_chained_onto() {
    let mut app = TestApp::spawn().await;
    for pan in TEST_PANS {
        assert_eq!(app.tokenize("default", pan, None).await.0, 201);
    }
    let dir = app.data_dir.clone();
    let _keep = app.keep_data();
    app.kill();
    {
        let db = sled::open(dir.join("sled")).unwrap();
        let tree = db.open_tree("audit").unwrap();
        let mut records: Vec<Value> = tree.iter().values().map(|v| stored(&v.unwrap())).collect();
        assert!(records.len() >= 5);
        records[2]["action"] = json!("audit.sealed_period");
        records[2]["outcome"] = json!("opened");
        records[3]["principal"] = json!("someone-else");
        rechain(&mut records);
        for rec in records.iter_mut().skip(2) {
            rec["mac"] = Value::Null;
        }
        for rec in &records {
            let seq = rec["seq"].as_u64().unwrap();
            tree.insert(seq.to_be_bytes(), to_store(rec)).unwrap();
        }
        db.flush().unwrap();
    }
    // The attacker also rewrites the anchor's (checksummed, unkeyed) head mark so
    // the store looks intact; keeping the keyed mark or zeroing it, the vault will
    // not chain onto the forged head.
    let head = {
        let db = sled::open(dir.join("sled")).unwrap();
        let tree = db.open_tree("audit").unwrap();
        let (k, v) = tree.last().unwrap().unwrap();
        (u64::from_be_bytes(k.as_ref().try_into().unwrap()), v.to_vec())
    };
    let anchor = dir.join("sled/anchor");
    let original = std::fs::read(&anchor).unwrap();
    assert_eq!(original.len(), 2 * 168, "a v2 anchor");
    for (case, keep_keyed, expected) in [
        ("keyed mark kept", true, "does not verify"),
        ("keyed mark zeroed", false, "has no keyed mark"),
    ] {
        let best = (0..2)
            .map(|i| &original[i * 168..(i + 1) * 168])
            .max_by_key(|s| u64::from_be_bytes(s[8..16].try_into().unwrap()))
            .unwrap();
        let mut slot = best.to_vec();
        let generation = u64::from_be_bytes(slot[8..16].try_into().unwrap()) + 1;
        slot[8..16].copy_from_slice(&generation.to_be_bytes());
        slot[16..24].copy_from_slice(&head.0.to_be_bytes());
        slot[24..56].copy_from_slice(&Sha256::digest(&head.1));
        if !keep_keyed {
            slot[64..136].fill(0);
        }
        let check = Sha256::digest(&slot[..136]);
        slot[136..].copy_from_slice(&check);
        let mut forged = slot.clone();
        forged.extend_from_slice(&slot);
        std::fs::write(&anchor, &forged).unwrap();
        // The store itself now looks intact...
        let (code, out, err) = run_cli(&["store", "check", "--data-dir", dir.to_str().unwrap()], &[]);
        assert_eq!(code, 0, "{case}: {out}{err}");
        // ...but the vault refuses to start on the forged head.
        let (code, _, err) = run_cli(
            &["serve", "--listen", "127.0.0.1:0", "--data-dir", dir.to_str().unwrap()],
            &[("RUST_LOG", "error")],
        );
        assert_ne!(code, 0, "{case}");
        assert!(err.contains("the audit trail's head does not verify"), "{case}: {err}");
        assert!(err.contains(expected), "{case}: {err}");
    }
}
