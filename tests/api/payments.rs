//! A payment's life after its authorisation, end to end against the mock PSP:
//! captures, refunds and cancels, each idempotent (one PSP call per key), scoped,
//! tenant-isolated, audited, and held to the money (never an over-capture or an
//! over-refund).

use serde_json::{Value, json};

use crate::charges::{MockPsp, charge, charge_body, vault_with_psp};
use crate::helpers::*;

async fn modify(
    app: &TestApp,
    role: &str,
    tenant: &str,
    id: &str,
    op: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> reqwest::Response {
    let mut req = app
        .client
        .post(app.url(&format!("/v1/charges/{id}/{op}")))
        .bearer_auth(app.jwt(role, tenant));
    if let Some(b) = body {
        req = req.json(&b);
    }
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    req.send().await.unwrap()
}

fn eur(value: u64) -> Value {
    json!({"value": value, "currency": "EUR"})
}

/// A fresh card and an authorised charge on it (`capture`: automatic or manual).
async fn authorised(app: &TestApp, tenant: &str, value: u64, capture: &str, key: &str) -> Value {
    let (status, meta) = app.tokenize(tenant, "4111111111111111", None).await;
    assert_eq!(status, 201);
    let mut body = charge_body(meta["token"].as_str().unwrap(), value, "moto", None);
    body["capture"] = json!(capture);
    let res = charge(app, "psp", tenant, Some(key), &body).await;
    assert_eq!(res.status(), 201);
    let c: Value = res.json().await.unwrap();
    assert_eq!(c["status"], "authorised", "{c}");
    assert_eq!(c["capture"], capture);
    c
}

/// PSP calls the mock received for one operation, replays excluded.
async fn psp_calls(psp: &MockPsp, op: &str) -> Vec<Value> {
    psp.received()
        .await
        .into_iter()
        .filter(|r| r["operation"] == op && r["replay"] == false)
        .collect()
}

async fn get(app: &TestApp, tenant: &str, id: &str) -> Value {
    let res = app
        .client
        .get(app.url(&format!("/v1/charges/{id}")))
        .bearer_auth(app.jwt("psp", tenant))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

/// Manual authorisation → partial capture → two partial refunds → an over-refund
/// refused → the rest refunded. Every step retried with its key replays without a
/// second PSP call; the charge's state and history follow.
#[tokio::test]
async fn manual_capture_partial_refunds_and_no_over_refund() {
    let (app, psp) = vault_with_psp(&[]);
    let c = authorised(&app, "default", 10_000, "manual", "auth-1").await;
    let id = c["id"].as_str().unwrap();
    assert_eq!(c["captured_amount"], eur(0));
    let auth = psp.received().await;
    assert_eq!(
        auth[0]["request"]["additionalData"]["manualCapture"], "true",
        "manual capture asked of the PSP"
    );

    // Capture 60.00 of 100.00: the rest is released.
    let res = modify(
        &app,
        "psp",
        "default",
        id,
        "captures",
        Some("cap-1"),
        Some(json!({"amount": eur(6_000)})),
    )
    .await;
    assert_eq!(res.status(), 201);
    let cap: Value = res.json().await.unwrap();
    assert_eq!(
        (cap["type"].as_str(), cap["status"].as_str()),
        (Some("capture"), Some("received"))
    );
    assert!(cap["id"].as_str().unwrap().starts_with("mod_"));
    assert!(cap["psp_reference"].is_string());
    assert_eq!(cap["charge"]["status"], "captured");
    assert_eq!(cap["charge"]["captured_amount"], eur(6_000));
    // The same key again: the stored answer, no PSP call.
    let again = modify(
        &app,
        "psp",
        "default",
        id,
        "captures",
        Some("cap-1"),
        Some(json!({"amount": eur(6_000)})),
    )
    .await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap()["id"], cap["id"]);
    // The same key with another body: refused, nothing sent.
    let other = modify(
        &app,
        "psp",
        "default",
        id,
        "captures",
        Some("cap-1"),
        Some(json!({"amount": eur(5_000)})),
    )
    .await;
    assert_problem(other, 422, "idempotency-key-reused").await;
    // A second capture (another key) is refused: one capture per authorisation.
    let twice = modify(&app, "psp", "default", id, "captures", Some("cap-2"), Some(json!({}))).await;
    assert_problem(twice, 409, "charge-state-conflict").await;
    assert_eq!(psp_calls(&psp, "capture").await.len(), 1);
    let sent = &psp_calls(&psp, "capture").await[0];
    assert_eq!(sent["payment_psp_reference"], c["psp_reference"]);
    assert_eq!(sent["request"]["amount"], eur(6_000));
    assert!(
        !sent["request"].to_string().contains("4111111111111111"),
        "a capture carries no card data"
    );

    // Two partial refunds, each retried once.
    for (key, value) in [("ref-1", 2_000), ("ref-2", 3_000)] {
        let body = json!({"amount": eur(value), "reason": "damaged in transit"});
        let res = modify(&app, "psp", "default", id, "refunds", Some(key), Some(body.clone())).await;
        assert_eq!(res.status(), 201);
        let r: Value = res.json().await.unwrap();
        assert_eq!(r["status"], "received");
        assert_eq!(r["reason"], "damaged in transit");
        let replay = modify(&app, "psp", "default", id, "refunds", Some(key), Some(body)).await;
        assert_eq!(replay.headers()["idempotent-replayed"], "true");
        assert_eq!(replay.json::<Value>().await.unwrap()["id"], r["id"]);
    }
    assert_eq!(psp_calls(&psp, "refund").await.len(), 2);
    let now = get(&app, "default", id).await;
    assert_eq!(now["status"], "partially_refunded");
    assert_eq!(now["refunded_amount"], eur(5_000));
    // 1 000 left: 1 001 is refused by the vault, before the PSP.
    let over = modify(
        &app,
        "psp",
        "default",
        id,
        "refunds",
        Some("ref-3"),
        Some(json!({"amount": eur(1_001)})),
    )
    .await;
    let p = assert_problem(over, 422, "amount-not-allowed").await;
    assert!(p["detail"].as_str().unwrap().contains("1000 left"), "{p}");
    let wrong_currency = json!({"amount": {"value": 10, "currency": "USD"}});
    let res = modify(
        &app,
        "psp",
        "default",
        id,
        "refunds",
        Some("ref-4"),
        Some(wrong_currency),
    )
    .await;
    assert_problem(res, 422, "amount-not-allowed").await;
    assert_eq!(
        psp_calls(&psp, "refund").await.len(),
        2,
        "refused requests never reach the PSP"
    );
    // Without an amount: the rest.
    let rest = modify(&app, "psp", "default", id, "refunds", Some("ref-5"), Some(json!({}))).await;
    assert_eq!(rest.status(), 201);
    let rest: Value = rest.json().await.unwrap();
    assert_eq!(rest["amount"], eur(1_000));
    assert_eq!(rest["charge"]["status"], "refunded");
    let done = modify(&app, "psp", "default", id, "refunds", Some("ref-6"), Some(json!({}))).await;
    assert_problem(done, 409, "charge-state-conflict").await;

    let history: Vec<(String, String)> = get(&app, "default", id).await["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["type"].as_str().unwrap().into(), m["status"].as_str().unwrap().into()))
        .collect();
    let expected = [
        ("capture", "received"),
        ("refund", "received"),
        ("refund", "received"),
        ("refund", "received"),
    ];
    assert_eq!(history, expected.map(|(a, b)| (a.to_owned(), b.to_owned())).to_vec());
    assert_eq!(
        app.metric("tokenvault_refunded_minor_units_total{currency=\"EUR\"}")
            .await,
        6_000.0
    );
    assert_eq!(
        app.metric("tokenvault_charge_modifications_total{operation=\"refund\",outcome=\"replayed\"}")
            .await,
        2.0
    );
    assert!(
        app.metric("tokenvault_psp_request_duration_seconds_count{operation=\"capture\"}")
            .await
            >= 1.0
    );
    // Audited: who captured and refunded what.
    let export = app.audit_export();
    for action in ["charge.capture", "charge.refund"] {
        assert!(
            export
                .iter()
                .any(|r| r["action"] == action && r["principal"] == "dev-psp"),
            "{action} audited"
        );
    }
}

/// Cancel releases a manual authorisation; nothing can be captured after it; a
/// captured (automatic) charge cannot be cancelled and is refunded instead.
#[tokio::test]
async fn cancel_and_what_cannot_follow_it() {
    let (app, psp) = vault_with_psp(&[]);
    let manual = authorised(&app, "default", 4_000, "manual", "auth-m").await;
    let id = manual["id"].as_str().unwrap();
    let res = modify(&app, "psp", "default", id, "cancel", Some("can-1"), None).await;
    assert_eq!(res.status(), 201);
    let c: Value = res.json().await.unwrap();
    assert_eq!(
        (c["status"].as_str(), c["charge"]["status"].as_str()),
        (Some("received"), Some("cancelled"))
    );
    assert!(c.get("amount").is_none());
    let replay = modify(&app, "psp", "default", id, "cancel", Some("can-1"), None).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    for (op, body) in [
        ("captures", Some(json!({}))),
        ("refunds", Some(json!({}))),
        ("cancel", None),
    ] {
        let res = modify(&app, "psp", "default", id, op, Some(&format!("after-{op}")), body).await;
        assert_problem(res, 409, "charge-state-conflict").await;
    }
    assert_eq!(psp_calls(&psp, "cancel").await.len(), 1);

    let auto = authorised(&app, "default", 2_400, "automatic", "auth-a").await;
    let aid = auto["id"].as_str().unwrap();
    let res = modify(&app, "psp", "default", aid, "cancel", Some("can-a"), None).await;
    let p = assert_problem(res, 409, "charge-state-conflict").await;
    assert!(p["detail"].as_str().unwrap().contains("refund"), "{p}");
    let res = modify(&app, "psp", "default", aid, "captures", Some("cap-a"), Some(json!({}))).await;
    assert_problem(res, 409, "charge-state-conflict").await;
    let res = modify(&app, "psp", "default", aid, "refunds", Some("ref-a"), Some(json!({}))).await;
    assert_eq!(res.status(), 201);
    assert_eq!(res.json::<Value>().await.unwrap()["charge"]["status"], "refunded");
    assert_eq!(
        psp_calls(&psp, "cancel").await.len(),
        1,
        "refused cancels never reached the PSP"
    );
}

/// Only the grants for each operation; another tenant's charge does not exist;
/// bad input changes nothing; a PSP refusal and a PSP timeout are states.
#[tokio::test]
async fn scopes_tenants_bad_input_and_psp_outcomes() {
    let (app, psp) = vault_with_psp(&["--psp-timeout", "1s"]);
    let c = authorised(&app, "default", 9_000, "manual", "auth-s").await;
    let id = c["id"].as_str().unwrap();
    for role in ["crm", "edge", "officer", "importer"] {
        for (op, body) in [
            ("captures", Some(json!({}))),
            ("refunds", Some(json!({}))),
            ("cancel", None),
        ] {
            let res = modify(&app, role, "default", id, op, Some("k"), body).await;
            assert_problem(res, 403, "forbidden").await;
        }
    }
    for (op, body) in [
        ("captures", Some(json!({}))),
        ("refunds", Some(json!({}))),
        ("cancel", None),
    ] {
        let res = modify(&app, "psp", "other-tenant", id, op, Some("k"), body.clone()).await;
        assert_problem(res, 404, "not-found").await;
        let res = modify(&app, "psp", "default", "ch_doesnotexist", op, Some("k"), body.clone()).await;
        assert_problem(res, 404, "not-found").await;
        let res = modify(&app, "psp", "default", id, op, None, body).await;
        assert_problem(res, 400, "idempotency-key-required").await;
    }
    for bad in [
        json!({"amount": {"value": 0, "currency": "EUR"}}),
        json!({"amount": {"value": 10, "currency": "XXX"}}),
        json!({"amount": {"value": 10.5, "currency": "EUR"}}),
        json!({"amount": eur(10), "extra": true}),
    ] {
        let res = modify(&app, "psp", "default", id, "captures", Some("bad"), Some(bad)).await;
        assert!(matches!(res.status().as_u16(), 400 | 422), "{}", res.status());
    }
    let res = modify(
        &app,
        "psp",
        "default",
        id,
        "refunds",
        Some("bad-reason"),
        Some(json!({"reason": "card 4111 1111 1111 1111"})),
    )
    .await;
    assert_problem(res, 422, "invalid-field").await;
    assert_eq!(psp.received().await.len(), 1, "only the authorisation reached the PSP");
    assert_eq!(
        get(&app, "default", id).await["history"],
        json!([]),
        "bad input changed nothing"
    );

    // The PSP refuses a capture (mock rule: value % 1000 == 151): a state, not an error.
    let res = modify(
        &app,
        "psp",
        "default",
        id,
        "captures",
        Some("cap-r"),
        Some(json!({"amount": eur(1_151)})),
    )
    .await;
    assert_eq!(res.status(), 201);
    let r: Value = res.json().await.unwrap();
    assert_eq!(r["status"], "refused");
    assert!(r["failure_reason"].as_str().unwrap().contains("901"), "{r}");
    assert_eq!(
        r["charge"]["status"], "authorised",
        "a refused capture captured nothing"
    );
    // The PSP answers late (mock rule 504: after 30 s): the vault times out after 1 s,
    // resends once under the same PSP key and gets the stored answer: captured once.
    let res = modify(
        &app,
        "psp",
        "default",
        id,
        "captures",
        Some("cap-t"),
        Some(json!({"amount": eur(2_504)})),
    )
    .await;
    assert_eq!(res.status(), 201);
    let t: Value = res.json().await.unwrap();
    assert_eq!(t["status"], "received", "{t}");
    assert_eq!(t["charge"]["captured_amount"], eur(2_504));
    let sent: Vec<Value> = psp
        .received()
        .await
        .into_iter()
        .filter(|r| r["operation"] == "capture" && r["request"]["amount"]["value"] == 2_504)
        .collect();
    assert_eq!(sent.len(), 2, "the timed-out capture and its resend: {sent:?}");
    assert_eq!(sent[0]["idempotency_key"], sent[1]["idempotency_key"]);
    assert_eq!(
        sent.iter().filter(|r| r["replay"] == false).count(),
        1,
        "one capture at the PSP"
    );
}

/// A reissued card (same PAN, new expiry) recorded with `PATCH /v1/tokens/{token}`:
/// the token stays, its metadata shows the new date, and the next charge sends the
/// new expiry to the PSP. Only `tokens:update` may do it; bad input changes nothing;
/// a dedupe tokenize with a newer expiry updates the same way, an older one does not.
#[tokio::test]
async fn a_reissued_card_keeps_its_token_and_the_next_charge_sends_the_new_expiry() {
    let (app, psp) = vault_with_psp(&[]);
    app.watch("4111111111111111");
    let (status, meta) = app.tokenize("default", "4111111111111111", None).await;
    assert_eq!(status, 201);
    let token = meta["token"].as_str().unwrap().to_owned();
    let patch = |role: &str, tenant: &str, body: Value| {
        app.client
            .patch(app.url(&format!("/v1/tokens/{token}")))
            .bearer_auth(app.jwt(role, tenant))
            .json(&body)
            .send()
    };
    let before: Value = app.read("default", &token).await.json().await.unwrap();
    for role in ["crm", "psp", "officer"] {
        let res = patch(role, "default", json!({"exp_month": 9, "exp_year": 2033}))
            .await
            .unwrap();
        assert_problem(res, 403, "forbidden").await;
    }
    let res = patch("edge", "other-tenant", json!({"exp_month": 9, "exp_year": 2033}))
        .await
        .unwrap();
    assert_problem(res, 404, "not-found").await;
    for (bad, code) in [
        (json!({"exp_month": 13, "exp_year": 2033}), "invalid-expiry"),
        (json!({"exp_month": 1, "exp_year": 2020}), "invalid-expiry"),
        (json!({"exp_month": 9}), "malformed-request"),
        (
            json!({"exp_month": 9, "exp_year": 2033, "pan": "4111111111111111"}),
            "malformed-request",
        ),
        // A control character needs a JSON escape: card fields refuse escapes.
        (
            json!({"exp_month": 9, "exp_year": 2033, "cardholder_name": "A\u{7}B"}),
            "malformed-request",
        ),
        (
            json!({"exp_month": 9, "exp_year": 2033, "cardholder_name": "x".repeat(129)}),
            "invalid-field",
        ),
    ] {
        let res = patch("edge", "default", bad.clone()).await.unwrap();
        let status = res.status().as_u16();
        let p: Value = res.json().await.unwrap();
        assert!(matches!(status, 400 | 422), "{bad}: {status}");
        assert!(p["type"].as_str().unwrap().ends_with(code), "{bad}: {p}");
    }
    let unchanged: Value = app.read("default", &token).await.json().await.unwrap();
    assert_eq!(unchanged, before, "bad input changed nothing");

    let res = patch(
        "edge",
        "default",
        json!({"exp_month": 9, "exp_year": 2033, "cardholder_name": "Grace Hopper"}),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let updated: Value = res.json().await.unwrap();
    assert_eq!(updated["token"], token.as_str());
    assert_eq!(
        (updated["exp_month"].as_u64(), updated["exp_year"].as_u64()),
        (Some(9), Some(2033))
    );
    assert_eq!(updated["last4"], before["last4"]);
    let read: Value = app.read("default", &token).await.json().await.unwrap();
    assert_eq!(
        (read["exp_month"].as_u64(), read["exp_year"].as_u64()),
        (Some(9), Some(2033))
    );

    // The next charge carries the new expiry and name, and the same PAN.
    let res = charge(
        &app,
        "psp",
        "default",
        Some("after-reissue"),
        &charge_body(&token, 1_200, "moto", None),
    )
    .await;
    assert_eq!(res.status(), 201);
    let sent = &psp.received().await[0]["request"]["paymentMethod"];
    assert_eq!(sent["number"], "4111111111111111");
    assert_eq!(
        (sent["expiryMonth"].as_str(), sent["expiryYear"].as_str()),
        (Some("09"), Some("2033"))
    );
    assert_eq!(sent["holderName"], "Grace Hopper");
    let export = app.audit_export();
    assert!(
        export
            .iter()
            .any(|r| r["action"] == "token.update" && r["outcome"] == "ok" && r["principal"] == "dev-edge"),
        "the update is audited"
    );

    // Dedupe tokenize (the importer): a newer expiry updates the tenant's token,
    // an older one keeps the newer date.
    let importer = app.jwt("importer", "default");
    let import = |month: u32, year: u32| {
        app.tokenize_as(
            &importer,
            json!({"pan": "5555555555554444", "exp_month": month, "exp_year": year}),
        )
    };
    let first: Value = import(3, 2030).await.json().await.unwrap();
    let t2 = first["token"].as_str().unwrap().to_owned();
    let newer: Value = import(4, 2032).await.json().await.unwrap();
    assert_eq!(newer["token"], t2.as_str());
    assert_eq!(
        (newer["exp_month"].as_u64(), newer["exp_year"].as_u64()),
        (Some(4), Some(2032))
    );
    let older: Value = import(1, 2031).await.json().await.unwrap();
    assert_eq!(older["token"], t2.as_str());
    assert_eq!(
        (older["exp_month"].as_u64(), older["exp_year"].as_u64()),
        (Some(4), Some(2032))
    );
    app.watch("5555555555554444");
}
