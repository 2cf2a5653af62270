//! The voice <Pay> connector (`POST /v1/connectors/voice-pay`) answering the
//! documented request shapes of Twilio's Generic Pay Connector and SignalWire's
//! `payment_connector_url`, against the mock PSP: tokenize and charge, success
//! and each error, retries by `transaction_id`, credentials and grants.

use serde_json::{Value, json};

use crate::charges::{MockPsp, vault_with_psp};
use crate::cli::{prod_layout, unseal_with};
use crate::helpers::*;

/// The dev voice connector's `USER:PASSWORD`, as `tokenvault dev voice-credentials` prints it.
fn credentials(app: &TestApp) -> (String, String) {
    let (code, out, err) = run_cli(
        &["dev", "voice-credentials", "--data-dir", app.data_dir.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let (user, password) = out.trim().split_once(':').unwrap();
    (user.to_owned(), password.to_owned())
}

/// Posts as a platform does: JSON without a content type, HTTP Basic.
async fn post(app: &TestApp, auth: Option<(&str, &str)>, body: &Value) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = app
        .client
        .post(app.url("/v1/connectors/voice-pay"))
        .body(serde_json::to_vec(body).unwrap());
    if let Some((u, p)) = auth {
        req = req.basic_auth(u, Some(p));
    }
    let res = req.send().await.unwrap();
    let (status, headers) = (res.status().as_u16(), res.headers().clone());
    let text = res.text().await.unwrap();
    assert!(
        !text.contains("4111111111111111") && !text.contains("\"cvv\""),
        "{text}"
    );
    (status, serde_json::from_str(&text).unwrap(), headers)
}

fn twilio(method: &str, tx: &str, card: &str) -> Value {
    let mut b = json!({
        "method": method, "transaction_id": tx, "cardnumber": card, "cvv": "123",
        "expiry_month": "08", "expiry_year": "39", "description": "pizza", "postal_code": "94111",
        "parameters": {"order": "A-17"}
    });
    if method == "charge" {
        b["amount"] = json!("10.0");
        b["currency_code"] = json!("USD");
    }
    b
}

async fn authorisations(psp: &MockPsp) -> Vec<Value> {
    psp.received()
        .await
        .into_iter()
        .filter(|r| r["operation"] == "authorise" && r["replay"] == false)
        .collect()
}

#[tokio::test]
async fn twilio_and_signalwire_shapes_tokenize_and_charge_once_per_transaction() {
    let (app, psp) = vault_with_psp(&[]);
    app.watch("4111111111111111");
    let (user, password) = credentials(&app);
    let auth = Some((user.as_str(), password.as_str()));

    // Twilio tokenize: a token in the tenant of the connector's registry entry.
    let (status, body, headers) = post(&app, auth, &twilio("tokenize", "tw-tok-1", "4111111111111111")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(
        (body["error_code"].clone(), body["error_message"].clone()),
        (Value::Null, Value::Null)
    );
    let token = body["token_id"].as_str().unwrap().to_owned();
    let res = app.detokenize("default", &token).await;
    assert_eq!(res.status(), 200);
    let card: Value = res.json().await.unwrap();
    assert_eq!(
        (card["exp_month"].as_u64(), card["exp_year"].as_u64()),
        (Some(8), Some(2039))
    );
    // The platform resends after a timeout: the same token, nothing new stored.
    let created = app.metric("tokenvault_tokenize_total{outcome=\"created\"}").await;
    let (_, again, _) = post(&app, auth, &twilio("tokenize", "tw-tok-1", "4111111111111111")).await;
    assert_eq!(again["token_id"], token.as_str());
    assert_eq!(
        app.metric("tokenvault_tokenize_total{outcome=\"created\"}").await,
        created
    );
    // The same transaction id with another card: refused, never a second token.
    let (status, body, _) = post(&app, auth, &twilio("tokenize", "tw-tok-1", "5555555555554444")).await;
    assert_eq!(
        (status, body["error_code"].as_str()),
        (409, Some("duplicate_transaction"))
    );
    assert!(body["token_id"].is_null());

    // Twilio charge: "10.0" USD is 1000 cents, one authorisation with the CVV.
    let (status, body, _) = post(&app, auth, &twilio("charge", "tw-ch-1", "4111111111111111")).await;
    assert_eq!(status, 200, "{body}");
    let charge_id = body["charge_id"].as_str().unwrap().to_owned();
    assert!(charge_id.starts_with("ch_"));
    let auths = authorisations(&psp).await;
    assert_eq!(auths.len(), 1);
    assert_eq!(auths[0]["request"]["amount"], json!({"value": 1000, "currency": "USD"}));
    assert_eq!(auths[0]["request"]["shopperInteraction"], "Moto");
    assert_eq!(auths[0]["request"]["paymentMethod"]["cvc"], "123");
    // Retried (up to five times by Twilio): one charge, the same id.
    for _ in 0..3 {
        let (status, body, _) = post(&app, auth, &twilio("charge", "tw-ch-1", "4111111111111111")).await;
        assert_eq!((status, body["charge_id"].as_str()), (200, Some(charge_id.as_str())));
    }
    assert_eq!(authorisations(&psp).await.len(), 1, "one PSP call for one transaction");
    let stored: Value = app
        .client
        .get(app.url(&format!("/v1/charges/{charge_id}")))
        .bearer_auth(app.jwt("psp", "default"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stored["amount"], json!({"value": 1000, "currency": "USD"}));
    assert_eq!(stored["shopper_interaction"], "moto");

    // SignalWire SWML: method "credit-card", chargeAmount as a string, lower-case currency.
    let swml = json!({
        "transaction_id": "sw-1", "method": "credit-card", "cardnumber": "5555555555554444", "cvv": "321",
        "postal_code": "123456", "description": "Payment description", "chargeAmount": "10.55",
        "token_type": "reusable", "expiry_month": "12", "expiry_year": "39", "currency_code": "usd"
    });
    let (status, body, _) = post(&app, auth, &swml).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["charge_id"].as_str().unwrap().starts_with("ch_"));
    let auths = authorisations(&psp).await;
    assert_eq!(
        auths.last().unwrap()["request"]["amount"],
        json!({"value": 1055, "currency": "USD"})
    );
    // SignalWire cXML: a number amount; no method and amount 0 is a tokenize.
    let cxml_charge = json!({
        "transaction_id": "sw-2", "method": "credit-card", "cardnumber": "4111111111111111", "cvv": "123",
        "postal_code": "12345", "description": "renew plan", "chargeAmount": 123.45, "expiry_month": "01",
        "expiry_year": "38", "currency_code": "USD", "parameters": {"custom1": "value1"}
    });
    let (status, _, _) = post(&app, auth, &cxml_charge).await;
    assert_eq!(status, 200);
    assert_eq!(
        authorisations(&psp).await.last().unwrap()["request"]["amount"],
        json!({"value": 12345, "currency": "USD"})
    );
    let cxml_tokenize = json!({
        "transaction_id": "sw-3", "cardnumber": "4111111111111111", "cvv": "123", "postal_code": "12345",
        "description": "save card", "amount": 0, "token_type": "one-time", "expiry_month": "01",
        "expiry_year": "38", "currency_code": "USD"
    });
    let (status, body, _) = post(&app, auth, &cxml_tokenize).await;
    assert_eq!(status, 200, "{body}");
    let one_time = body["token_id"].as_str().unwrap();
    let meta: Value = app.read("default", one_time).await.json().await.unwrap();
    assert!(
        meta["expires_at"].is_string(),
        "a one-time token lives for the call: {meta}"
    );
    assert_eq!(authorisations(&psp).await.len(), 3, "a tokenize charges nothing");

    // Errors, in the platforms' shape, echoing nothing.
    let mut bad_luhn = twilio("charge", "e-1", "4111111111111112");
    let (status, body, _) = post(&app, auth, &bad_luhn).await;
    assert_eq!(
        (status, body["error_code"].as_str()),
        (400, Some("invalid_card_number"))
    );
    assert!(body["charge_id"].is_null() && body["error_message"].is_string());
    bad_luhn["cardnumber"] = json!("4111111111111111");
    bad_luhn["expiry_year"] = json!("20");
    let (status, body, _) = post(&app, auth, &bad_luhn).await;
    assert_eq!((status, body["error_code"].as_str()), (400, Some("expired_card")));
    let mut declined = twilio("charge", "e-2", "4111111111111111");
    declined["amount"] = json!("1.51");
    let (status, body, _) = post(&app, auth, &declined).await;
    assert_eq!(
        (status, body["error_code"].as_str()),
        (402, Some("card_declined")),
        "{body}"
    );
    for (field, value, code) in [
        ("amount", json!("1.999"), "invalid_amount"),
        ("amount", json!("-5"), "invalid_amount"),
        ("currency_code", json!("XYZ"), "invalid_currency"),
        ("cvv", json!("12"), "invalid_cvv"),
        ("expiry_month", json!("13"), "invalid_expiry_date"),
        ("method", json!("refund"), "invalid_request"),
        ("transaction_id", json!(""), "invalid_request"),
    ] {
        let mut b = twilio("charge", "e-3", "4111111111111111");
        b[field] = value;
        let (status, body, _) = post(&app, auth, &b).await;
        assert_eq!((status, body["error_code"].as_str()), (400, Some(code)), "{field}");
    }
    let (status, body, _) = post(
        &app,
        auth,
        &json!({"transaction_id": "ach", "method": "charge",
        "bankaccountnumber": "12345678", "routingnumber": "021000021", "amount": "5.00", "currency_code": "USD"}),
    )
    .await;
    assert_eq!((status, body["error_code"].as_str()), (400, Some("invalid_request")));
    // Wrong, missing or bearer credentials: 401 with a Basic challenge.
    for creds in [
        Some((user.as_str(), "wrong")),
        Some(("nobody", password.as_str())),
        None,
    ] {
        let (status, body, headers) = post(&app, creds, &twilio("tokenize", "x", "4111111111111111")).await;
        assert_eq!((status, body["error_code"].as_str()), (401, Some("unauthorized")));
        assert_eq!(headers["www-authenticate"], "Basic realm=\"tokenvault\"");
    }
    let res = app
        .client
        .post(app.url("/v1/connectors/voice-pay"))
        .bearer_auth(app.jwt("edge", "default"))
        .json(&twilio("tokenize", "x", "4111111111111111"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401, "a JWT is not a connector credential");
    assert!(
        app.metric("tokenvault_voice_pay_requests_total{method=\"charge\",outcome=\"ok\"}")
            .await
            >= 3.0
    );
    assert!(
        app.metric("tokenvault_voice_pay_requests_total{method=\"charge\",outcome=\"card_declined\"}")
            .await
            >= 1.0
    );
    let trail = app.audit_export();
    assert!(
        trail
            .iter()
            .any(|r| r["action"] == "connector.voice-pay" && r["outcome"] == "card_declined")
    );
    assert!(
        trail
            .iter()
            .any(|r| r["action"] == "charge" && r["principal"] == "voice")
    );
    app.assert_logs_clean();
}

/// Without a PSP a charge is `psp_unavailable` (and a tokenize still works).
#[tokio::test]
async fn a_charge_without_a_psp_is_psp_unavailable() {
    let app = TestApp::spawn().await;
    let (user, password) = credentials(&app);
    let auth = Some((user.as_str(), password.as_str()));
    let (status, body, headers) = post(&app, auth, &twilio("charge", "n-1", "4111111111111111")).await;
    assert_eq!((status, body["error_code"].as_str()), (503, Some("psp_unavailable")));
    assert_eq!(headers["retry-after"], "1");
    let (status, body, _) = post(&app, auth, &twilio("tokenize", "n-2", "4111111111111111")).await;
    assert_eq!(status, 200, "{body}");
}

/// A production registry's connector client granted tokens:create only: it
/// tokenizes, and a charge is refused (403) before anything is stored or sent.
#[tokio::test]
async fn a_connector_without_charges_create_cannot_charge() {
    let dev = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let (code, hash, err) = {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tokenvault"))
            .args(["dev", "hash-password"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"a long connector password\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    assert_eq!(code, 0, "{err}");
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let config = prod_layout(&dev, dir.path()).replace(
        "[keystore]",
        &format!(
            "[[clients]]\nsub = \"ivr\"\nscopes = [\"tokens:create\"]\ntenants = [\"acme\"]\nbasic_password_hash = \"{}\"\n\n[keystore]",
            hash.trim()
        ),
    );
    let path = dir.path().join("tokenvault.toml");
    std::fs::write(&path, config).unwrap();
    let prod = TestApp::start(&["serve", "--config", path.to_str().unwrap()], dir.path().join("data"));
    for share in [1, 2] {
        let (code, _, err) = unseal_with(
            &prod,
            &dev,
            dir.path(),
            &dir.path().join(format!("shares/share-{share}.txt")),
        );
        assert_eq!(code, 0, "{err}");
    }
    let auth = Some(("ivr", "a long connector password"));
    let (status, body, _) = post(&prod, auth, &twilio("charge", "p-1", "4111111111111111")).await;
    assert_eq!(
        (status, body["error_code"].as_str()),
        (403, Some("not_permitted")),
        "{body}"
    );
    assert_eq!(
        prod.metric("tokenvault_tokenize_total{outcome=\"created\"}").await,
        0.0,
        "nothing stored"
    );
    let (status, body, _) = post(&prod, auth, &twilio("tokenize", "p-2", "4111111111111111")).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = post(
        &prod,
        Some(("ivr", "a long connector passwor")),
        &twilio("tokenize", "p-3", "4111111111111111"),
    )
    .await;
    assert_eq!(status, 401);
}
