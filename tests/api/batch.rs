//! `POST /v1/tokens/batch`: a thousand cards in one call, answered in order with
//! a token or a problem each, tenant-isolated, durable before the answer.

use serde_json::{Value, json};

use crate::helpers::*;

async fn batch(app: &TestApp, role: &str, tenant: &str, body: &Value) -> reqwest::Response {
    app.client
        .post(app.url("/v1/tokens/batch"))
        .bearer_auth(app.jwt(role, tenant))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// 1 000 cards with bad ones in the middle (a Luhn failure, an expired card, a
/// bad month, an id carrying a card number): every good card gets its token in
/// its place, every bad one its own problem; each token opens to its PAN in its
/// tenant only; the same file again through a dedupe importer finds them all.
#[tokio::test]
async fn a_thousand_cards_in_one_call_with_bad_ones_in_the_middle() {
    let app = TestApp::spawn().await;
    let mut items: Vec<Value> = (0..1_000u64)
        .map(|i| json!({"id": format!("cust-{i}"), "pan": pan_for(700_000 + i), "exp_month": 1 + i % 12, "exp_year": 2030}))
        .collect();
    let bad_luhn = {
        let p = pan_for(1);
        let last = (p.as_bytes()[15] - b'0' + 1) % 10;
        format!("{}{last}", &p[..15])
    };
    items[100]["pan"] = json!(bad_luhn);
    items[500]["exp_year"] = json!(2020);
    items[777]["exp_month"] = json!(13);
    items[300]["id"] = json!(format!("note {}", pan_for(9)));
    let body = json!({ "items": items });
    let res = batch(&app, "importer", "acme", &body).await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert!(!text.contains(&pan_for(9)), "a card number in an id is never echoed");
    assert!(!text.contains(&pan_for(700_000)), "no PAN in the answer");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (answer["created"].as_u64(), answer["failed"].as_u64()),
        (Some(996), Some(4))
    );
    let results = answer["items"].as_array().unwrap();
    assert_eq!(results.len(), 1_000);
    for (i, r) in results.iter().enumerate() {
        match i {
            100 | 500 | 777 => {
                assert_eq!(r["id"], format!("cust-{i}"));
                assert_eq!(r["status"], 422, "{r}");
                assert!(
                    r["problem"]["type"]
                        .as_str()
                        .unwrap()
                        .starts_with("urn:tokenvault:problem:")
                );
                assert!(r.get("token").is_none());
            }
            300 => {
                assert!(r["id"].is_null());
                assert_eq!(r["problem"]["type"], "urn:tokenvault:problem:invalid-field");
            }
            _ => {
                assert_eq!(r["id"], format!("cust-{i}"), "in order");
                assert_eq!(r["status"], 201);
                assert_eq!(r["token"]["last4"], &pan_for(700_000 + i as u64)[12..]);
            }
        }
    }
    // Each token is the tenant's, opens to its PAN, and is another tenant's 404.
    for i in [0usize, 1, 499, 501, 999] {
        let token = results[i]["token"]["token"].as_str().unwrap();
        let res = app.detokenize("acme", token).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<Value>().await.unwrap()["pan"], pan_for(700_000 + i as u64));
        assert_eq!(app.detokenize("other", token).await.status(), 404);
    }
    // The same cards again: the importer (tokens:dedupe) gets the existing tokens;
    // another tenant gets its own.
    let again: Value = batch(&app, "importer", "acme", &body).await.json().await.unwrap();
    assert_eq!(
        (again["existing"].as_u64(), again["created"].as_u64()),
        (Some(996), Some(0))
    );
    assert_eq!(again["items"][0]["status"], 200);
    assert_eq!(again["items"][0]["token"]["token"], results[0]["token"]["token"]);
    let other: Value = batch(&app, "importer", "other", &body).await.json().await.unwrap();
    assert_eq!(other["created"], 996);
    assert_ne!(other["items"][0]["token"]["token"], results[0]["token"]["token"]);
    // Every stored card and the batch itself are in the audit trail.
    let trail = app.audit_export();
    assert!(
        trail
            .iter()
            .any(|r| r["action"] == "tokenize.batch" && r["tenant"] == "acme")
    );
    assert!(
        trail
            .iter()
            .filter(|r| r["action"] == "tokenize" && r["outcome"] == "created")
            .count()
            >= 1_992
    );
    app.assert_logs_clean();
}

/// Empty, oversized and malformed batches change nothing; only tokens:create
/// may send one.
#[tokio::test]
async fn bad_batches_are_refused_whole() {
    let app = TestApp::spawn().await;
    let card = |i: u64| json!({"id": format!("c{i}"), "pan": pan_for(i), "exp_month": 1, "exp_year": 2031});
    assert_problem(
        batch(&app, "edge", "default", &json!({"items": []})).await,
        422,
        "invalid-field",
    )
    .await;
    let many: Vec<Value> = (0..1_001).map(card).collect();
    assert_problem(
        batch(&app, "edge", "default", &json!({"items": many})).await,
        422,
        "invalid-field",
    )
    .await;
    let bloated = json!({"items": [{"id": "x".repeat(1 << 20), "pan": pan_for(1), "exp_month": 1, "exp_year": 2031}]});
    assert_eq!(batch(&app, "edge", "default", &bloated).await.status(), 413);
    let unknown = json!({"items": [{"id": "a", "pan": pan_for(1), "exp_month": 1, "exp_year": 2031, "cvv": "123"}]});
    assert_problem(batch(&app, "edge", "default", &unknown).await, 400, "malformed-request").await;
    for role in ["crm", "psp"] {
        assert_problem(
            batch(&app, role, "default", &json!({"items": [card(1)]})).await,
            403,
            "forbidden",
        )
        .await;
    }
    assert_eq!(app.metric("tokenvault_tokenize_total{outcome=\"created\"}").await, 0.0);
    // An ordinary edge client: a new token for every card (no dedupe).
    let two: Value = batch(&app, "edge", "default", &json!({"items": [card(1), card(1)]}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(two["created"], 2);
    assert_ne!(two["items"][0]["token"]["token"], two["items"][1]["token"]["token"]);
}

/// The answer means durable: a SIGKILL right after it loses no card.
#[tokio::test]
async fn an_answered_batch_survives_sigkill() {
    let mut app = TestApp::spawn().await;
    let keep = app.keep_data();
    let dir = app.data_dir.clone();
    let items: Vec<Value> = (0..1_000u64)
        .map(|i| json!({"id": i.to_string(), "pan": pan_for(800_000 + i), "exp_month": 6, "exp_year": 2031}))
        .collect();
    let answer: Value = batch(&app, "edge", "default", &json!({ "items": items }))
        .await
        .json()
        .await
        .unwrap();
    app.kill();
    assert_eq!(answer["created"], 1_000);
    drop(app);
    let app = TestApp::restart_on(&dir);
    for (i, r) in answer["items"].as_array().unwrap().iter().enumerate() {
        let res = app.detokenize("default", r["token"]["token"].as_str().unwrap()).await;
        assert_eq!(res.status(), 200, "card {i} lost");
        assert_eq!(res.json::<Value>().await.unwrap()["pan"], pan_for(800_000 + i as u64));
    }
    drop(keep);
}
