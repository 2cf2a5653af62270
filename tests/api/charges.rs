//! Detokenize-and-charge end to end: the real vault, the real mock PSP, curl-like
//! HTTP. The mock PSP records what it received, so the tests see which card,
//! CVV and network transaction id actually left the vault.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

/// `tokenvault-mock-psp` as a child process.
pub(crate) struct MockPsp {
    pub base: String,
    child: Child,
    client: reqwest::Client,
}

impl MockPsp {
    pub(crate) fn spawn() -> MockPsp {
        let mut child = Command::new(MOCK_PSP_BIN)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let base = loop {
            let line = lines.next().expect("mock-psp started").unwrap();
            if let Some(b) = line.strip_prefix("mock-psp listening on ") {
                break b.trim().to_owned();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        MockPsp {
            base,
            child,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    pub(crate) async fn received(&self) -> Vec<Value> {
        let v: Value = self
            .client
            .get(format!("{}/__received", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["requests"].as_array().unwrap().clone()
    }
}

impl Drop for MockPsp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A dev vault wired to a fresh mock PSP.
pub(crate) fn vault_with_psp(extra: &[&str]) -> (TestApp, MockPsp) {
    let psp = MockPsp::spawn();
    let mut args = vec!["--psp-url", psp.base.as_str()];
    args.extend_from_slice(extra);
    (TestApp::spawn_with(&args), psp)
}

pub(crate) async fn charge(
    app: &TestApp,
    role: &str,
    tenant: &str,
    key: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut req = app
        .client
        .post(app.url("/v1/charges"))
        .bearer_auth(app.jwt(role, tenant))
        .json(body);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    req.send().await.unwrap()
}

pub(crate) fn charge_body(token: &str, value: u64, interaction: &str, recurring: Option<(&str, &str)>) -> Value {
    let mut b = json!({"token": token, "amount": {"value": value, "currency": "EUR"}, "reference": format!("order-{value}"),
                       "shopper_interaction": interaction});
    if let Some((model, sequence)) = recurring {
        b["recurring"] = json!({"model": model, "sequence": sequence});
    }
    b
}

pub(crate) async fn tokenize_with_cvv(app: &TestApp, pan: &str, cvv: &str) -> Value {
    let res = app
        .tokenize_as(
            &app.jwt("edge", "default"),
            json!({"pan": pan, "exp_month": 7, "exp_year": 2031, "cardholder_name": "Grace Hopper", "cvv": cvv}),
        )
        .await;
    assert_eq!(res.status(), 201);
    res.json().await.unwrap()
}

/// A digit run equal to `needle`, delimited by non-digits (so a CVV is not
/// "found" inside a timestamp).
fn has_digit_run(haystack: &str, needle: &str) -> bool {
    haystack.split(|c: char| !c.is_ascii_digit()).any(|run| run == needle)
}

#[tokio::test]
async fn cvv_once_then_card_on_file_with_network_transaction_id() {
    let (app, psp) = vault_with_psp(&[]);
    let pan = "378282246310005";
    let tok = tokenize_with_cvv(&app, pan, "8642").await;
    assert_eq!(tok["cvv_held"], true);
    let token = tok["token"].as_str().unwrap();

    // First, customer-initiated (MOTO: the call center), first of a subscription.
    let res = charge(
        &app,
        "psp",
        "default",
        Some("order-1"),
        &charge_body(token, 1999, "moto", Some(("subscription", "first"))),
    )
    .await;
    assert_eq!(res.status(), 201);
    assert!(res.headers().get("idempotent-replayed").is_none());
    let first: Value = res.json().await.unwrap();
    assert_eq!(first["status"], "authorised");
    assert_eq!(first["cvv_sent"], true);
    let nti = first["network_transaction_id"].as_str().unwrap().to_owned();
    assert!(nti.starts_with("NTI"));
    assert!(first["id"].as_str().unwrap().starts_with("ch_"));
    // The CVV is gone after that one charge.
    assert_eq!(
        app.read("default", token).await.json::<Value>().await.unwrap()["cvv_held"],
        false
    );

    // Then merchant-initiated: no CVV, the network transaction id is sent.
    let res = charge(
        &app,
        "psp",
        "default",
        Some("order-2"),
        &charge_body(token, 1999, "cont_auth", Some(("subscription", "subsequent"))),
    )
    .await;
    let second: Value = res.json().await.unwrap();
    assert_eq!(second["status"], "authorised");
    assert_eq!(second["cvv_sent"], false);

    let seen = psp.received().await;
    assert_eq!(seen.len(), 2);
    let (a, b) = (&seen[0]["request"], &seen[1]["request"]);
    for r in [a, b] {
        assert_eq!(r["paymentMethod"]["number"], pan, "the right card reached the PSP");
        assert_eq!(r["paymentMethod"]["expiryMonth"], "07");
        assert_eq!(r["paymentMethod"]["expiryYear"], "2031");
        assert_eq!(r["paymentMethod"]["holderName"], "Grace Hopper");
        assert_eq!(r["amount"], json!({"value": 1999, "currency": "EUR"}));
        assert_eq!(r["recurringProcessingModel"], "Subscription");
    }
    assert_eq!(a["shopperInteraction"], "Moto");
    assert_eq!(a["paymentMethod"]["cvc"], "8642", "CVV forwarded on the first charge");
    assert!(a.get("networkTxReference").is_none());
    assert_eq!(b["shopperInteraction"], "ContAuth");
    assert!(
        b["paymentMethod"].get("cvc").is_none(),
        "no CVV on a merchant-initiated charge"
    );
    assert_eq!(b["networkTxReference"], nti.as_str());
    assert_ne!(seen[0]["idempotency_key"], seen[1]["idempotency_key"]);

    // The stored outcome, never card data.
    let res = app
        .client
        .get(app.url(&format!("/v1/charges/{}", first["id"].as_str().unwrap())))
        .bearer_auth(app.jwt("psp", "default"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), first);
    assert!(!text.contains(pan) && !has_digit_run(&text, "8642"));

    // Nothing in logs, metrics or the sled files.
    app.watch(pan);
    let logs = app.logs();
    assert!(!has_digit_run(&logs, "8642"), "CVV in the logs");
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains(pan) && !has_digit_run(&metrics, "8642"));
    assert_eq!(app.metric("tokenvault_charges_total{status=\"authorised\"}").await, 2.0);
    assert!(
        app.metric("tokenvault_psp_request_duration_seconds_count{operation=\"authorise\"}")
            .await
            >= 2.0
    );
    let mut files = Vec::new();
    collect(&app.data_dir, &mut files);
    for f in files {
        let data = std::fs::read(&f).unwrap();
        assert!(
            !data.windows(pan.len()).any(|w| w == pan.as_bytes()),
            "the PAN in {}",
            f.display()
        );
        // The CVV: in a text file (the keystore's hex and base64 key material holds
        // "8642" by chance in about one run in a hundred) as a value of its own, not
        // inside a longer run of letters and digits; in a binary file, anywhere.
        let cvv = match std::str::from_utf8(&data) {
            Ok(text) => text
                .split(|c: char| !c.is_ascii_alphanumeric())
                .any(|run| run == "8642"),
            Err(_) => data.windows(4).any(|w| w == b"8642"),
        };
        assert!(!cvv, "the CVV in {}", f.display());
    }
}

fn collect(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { collect(&p, out) } else { out.push(p) }
    }
}

#[tokio::test]
async fn only_the_psp_connector_charges_and_tenants_are_isolated() {
    let (app, psp) = vault_with_psp(&[]);
    let (_, tok) = app.tokenize("merchant-a", "5555555555554444", None).await;
    let token = tok["token"].as_str().unwrap();
    let body = charge_body(token, 1000, "ecommerce", None);
    for role in ["edge", "crm", "officer"] {
        assert_problem(
            charge(&app, role, "merchant-a", Some("k"), &body).await,
            403,
            "forbidden",
        )
        .await;
        let res = app
            .client
            .get(app.url("/v1/charges/ch_x"))
            .bearer_auth(app.jwt(role, "merchant-a"))
            .send()
            .await
            .unwrap();
        assert_problem(res, 403, "forbidden").await;
    }
    for role in ["edge", "crm"] {
        let res = app
            .client
            .post(app.url("/v1/detokenize"))
            .bearer_auth(app.jwt(role, "merchant-a"))
            .json(&json!({"token": token}))
            .send()
            .await
            .unwrap();
        assert_problem(res, 403, "forbidden").await;
    }
    assert_problem(
        app.client
            .post(app.url("/v1/charges"))
            .json(&body)
            .send()
            .await
            .unwrap(),
        401,
        "unauthenticated",
    )
    .await;
    // Another tenant's token: not found, and nothing reaches the PSP.
    assert_problem(
        charge(&app, "psp", "merchant-b", Some("k"), &body).await,
        404,
        "not-found",
    )
    .await;
    // Bad requests change nothing either.
    assert_problem(
        charge(&app, "psp", "merchant-a", None, &body).await,
        400,
        "idempotency-key-required",
    )
    .await;
    for bad in [
        charge_body(token, 0, "ecommerce", None),
        json!({"token": token, "amount": {"value": 10, "currency": "EURO"}, "reference": "r", "shopper_interaction": "moto"}),
        json!({"token": token, "amount": {"value": 10, "currency": "XYZ"}, "reference": "r", "shopper_interaction": "moto"}),
        json!({"token": token, "amount": {"value": 10, "currency": "EUR"}, "reference": "", "shopper_interaction": "moto"}),
        charge_body(token, 1000, "cont_auth", None),
        json!({"token": token, "amount": {"value": 10, "currency": "EUR"}, "reference": "order 5555555555554444", "shopper_interaction": "moto"}),
    ] {
        assert_problem(
            charge(&app, "psp", "merchant-a", Some("bad"), &bad).await,
            422,
            "invalid-field",
        )
        .await;
    }
    let res = charge(
        &app,
        "psp",
        "merchant-a",
        Some("k2"),
        &json!({"token": token, "amount": {"value": 10}}),
    )
    .await;
    assert_problem(res, 400, "malformed-request").await;
    assert!(psp.received().await.is_empty(), "no request reached the PSP");
    // A charge of tenant A is invisible to tenant B.
    let res = charge(&app, "psp", "merchant-a", Some("ok"), &body).await;
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let res = app
        .client
        .get(app.url(&format!("/v1/charges/{id}")))
        .bearer_auth(app.jwt("psp", "merchant-b"))
        .send()
        .await
        .unwrap();
    assert_problem(res, 404, "not-found").await;
}

#[tokio::test]
async fn twenty_concurrent_duplicates_make_one_psp_call() {
    let (app, psp) = vault_with_psp(&[]);
    let (_, tok) = app.tokenize("default", "6011111111111117", None).await;
    let body = charge_body(tok["token"].as_str().unwrap(), 4200, "ecommerce", None);
    let results = futures_util::future::join_all((0..20).map(|_| async {
        let res = charge(&app, "psp", "default", Some("same-key-20"), &body).await;
        let replayed = res.headers().get("idempotent-replayed").is_some();
        (res.status().as_u16(), replayed, res.json::<Value>().await.unwrap())
    }))
    .await;
    assert!(results.iter().all(|(s, _, _)| *s == 201));
    let first = &results[0].2;
    assert!(results.iter().all(|(_, _, b)| b == first), "20 identical answers");
    assert_eq!(
        results.iter().filter(|(_, r, _)| !r).count(),
        1,
        "one original, 19 replays"
    );
    let seen = psp.received().await;
    assert_eq!(seen.len(), 1, "exactly one PSP call: {seen:?}");
    // Same key, different body: refused. Another client's same key is independent.
    let other = charge_body(tok["token"].as_str().unwrap(), 4300, "ecommerce", None);
    assert_problem(
        charge(&app, "psp", "default", Some("same-key-20"), &other).await,
        422,
        "idempotency-key-reused",
    )
    .await;
    assert_eq!(psp.received().await.len(), 1);
    assert_eq!(app.metric("tokenvault_charges_total{status=\"replayed\"}").await, 19.0);
}

#[tokio::test]
async fn psp_failures_are_clear_counted_and_never_charge_twice() {
    let (app, psp) = vault_with_psp(&["--psp-timeout", "400ms"]);
    let (_, tok) = app.tokenize("default", "4012888888881881", None).await;
    let token = tok["token"].as_str().unwrap();

    // Timeout: the safe retry re-sends with the same PSP idempotency key; the PSP
    // answers with the outcome of the first attempt (a replay), so the card is
    // charged once. The timeout is still counted.
    let res = charge(
        &app,
        "psp",
        "default",
        Some("t-1"),
        &charge_body(token, 1504, "ecommerce", None),
    )
    .await;
    assert_eq!(res.status(), 201);
    let timeout: Value = res.json().await.unwrap();
    assert_eq!(timeout["status"], "authorised", "{timeout}");
    // A PSP that never answers: one safe retry, then the charge stays `pending`
    // (202): the PSP may have authorised, so the caller must not move to a new key.
    let res = charge(
        &app,
        "psp",
        "default",
        Some("t-0"),
        &charge_body(token, 1508, "ecommerce", None),
    )
    .await;
    assert_eq!(res.status(), 202);
    let lost: Value = res.json().await.unwrap();
    assert_eq!(lost["status"], "pending", "{lost}");
    assert!(
        lost["refusal_reason"]
            .as_str()
            .unwrap()
            .contains("did not answer in time"),
        "{lost}"
    );
    assert!(lost["psp_reference"].is_null());
    // 500 on every attempt: outcome unknown too, `pending`.
    let res = charge(
        &app,
        "psp",
        "default",
        Some("t-2"),
        &charge_body(token, 2500, "ecommerce", None),
    )
    .await;
    assert_eq!(res.status(), 202);
    let failed: Value = res.json().await.unwrap();
    assert_eq!(failed["status"], "pending");
    assert!(failed["refusal_reason"].as_str().unwrap().contains("HTTP 500"));
    // A transient 502: the safe retry (same PSP idempotency key) succeeds — one charge at the PSP.
    let res = charge(
        &app,
        "psp",
        "default",
        Some("t-3"),
        &charge_body(token, 3502, "ecommerce", None),
    )
    .await;
    assert_eq!(res.json::<Value>().await.unwrap()["status"], "authorised");
    // A refusal carries the reason.
    let res = charge(
        &app,
        "psp",
        "default",
        Some("t-4"),
        &charge_body(token, 4151, "ecommerce", None),
    )
    .await;
    let refused: Value = res.json().await.unwrap();
    assert_eq!(refused["status"], "refused");
    assert_eq!(refused["refusal_reason"], "Insufficient funds");

    // Replaying the timed-out charge returns the stored outcome: no new PSP call.
    let before = psp.received().await.len();
    let res = charge(
        &app,
        "psp",
        "default",
        Some("t-1"),
        &charge_body(token, 1504, "ecommerce", None),
    )
    .await;
    assert_eq!(res.json::<Value>().await.unwrap(), timeout);
    assert_eq!(psp.received().await.len(), before);

    let seen = psp.received().await;
    let attempts = |value: u64| -> Vec<&Value> {
        seen.iter()
            .filter(|r| r["request"]["amount"]["value"] == value)
            .collect()
    };
    for value in [1504, 1508, 2500, 3502] {
        let a = attempts(value);
        assert_eq!(a.len(), 2, "one safe retry for {value}");
        assert_eq!(
            a[0]["idempotency_key"], a[1]["idempotency_key"],
            "retried with the same PSP idempotency key"
        );
    }
    let charged_3502 = attempts(3502).iter().filter(|r| r["outcome"] == "Authorised").count();
    assert_eq!(charged_3502, 1, "never charged twice");
    assert_eq!(attempts(4151).len(), 1, "a refusal is not retried");
    assert_eq!(
        app.metric("tokenvault_psp_errors_total{kind=\"timeout\"}").await,
        3.0,
        "1504 once, 1508 twice"
    );
    assert_eq!(
        app.metric("tokenvault_psp_errors_total{kind=\"5xx\"}").await,
        3.0,
        "500 twice, 502 once"
    );
    assert_eq!(app.metric("tokenvault_charges_total{status=\"pending\"}").await, 2.0);
    assert_eq!(app.metric("tokenvault_charges_total{status=\"authorised\"}").await, 2.0);
    assert_eq!(app.metric("tokenvault_charges_total{status=\"refused\"}").await, 1.0);
    // 4151 is refused "Insufficient funds": counted by a bounded reason label.
    assert_eq!(
        app.metric("tokenvault_charge_refusals_total{reason=\"insufficient_funds\"}")
            .await,
        1.0
    );

    // The truth of a pending charge: GET shows it, and a retry with the same
    // Idempotency-Key resends under the reservation's PSP key (never a new one).
    let id = failed["id"].as_str().unwrap();
    let shown: Value = app
        .client
        .get(app.url(&format!("/v1/charges/{id}")))
        .bearer_auth(app.jwt("psp", "default"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["status"], "pending");
    let res = charge(
        &app,
        "psp",
        "default",
        Some("t-2"),
        &charge_body(token, 2500, "ecommerce", None),
    )
    .await;
    assert_eq!(res.status(), 202, "the PSP still fails: still pending");
    let again: Value = res.json().await.unwrap();
    assert_eq!(again["id"], failed["id"], "the same reservation");
    let seen = psp.received().await;
    let keys: std::collections::BTreeSet<String> = seen
        .iter()
        .filter(|r| r["request"]["amount"]["value"] == 2500)
        .map(|r| r["idempotency_key"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(keys.len(), 1, "every resend under one PSP key: {keys:?}");
    assert_eq!(
        keys.into_iter().next().unwrap(),
        format!("tv-{id}"),
        "the PSP key derives from the reservation"
    );
}

/// The assessor's double charge: the PSP key held the current time and nothing
/// was stored before the PSP call, so a vault killed while the PSP authorised got a
/// retry under a new PSP key: two authorisations. Now the reservation is durable
/// before the call and the PSP key derives from it: the retry after SIGKILL resends
/// under the same key and the PSP replays its one authorisation.
#[tokio::test]
async fn sigkill_during_a_charge_then_retry_charges_once() {
    let (mut app, psp) = vault_with_psp(&["--psp-timeout", "20s"]);
    let tok = tokenize_with_cvv(&app, "5555555555554444", "737").await;
    let token = tok["token"].as_str().unwrap().to_owned();
    // Amount ending 504: the mock stores its authorisation, then answers only after 30 s.
    let body = charge_body(&token, 7504, "moto", None);
    let client = app.client.clone();
    let url = app.url("/v1/charges");
    let jwt = app.jwt("psp", "default");
    let sent = body.clone();
    let in_flight = tokio::spawn(async move {
        client
            .post(url)
            .bearer_auth(jwt)
            .header("Idempotency-Key", "order-7504")
            .json(&sent)
            .send()
            .await
    });
    // Wait until the PSP holds the authorisation, then kill the vault mid-call.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while psp.received().await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "the PSP never saw the charge");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.kill();
    assert!(in_flight.await.unwrap().is_err(), "the caller never got an answer");

    // The caller retries with the same Idempotency-Key on the restarted vault.
    let data_dir = app.data_dir.clone();
    let _keep = app.keep_data();
    let psp_url = psp.base.clone();
    let dir = data_dir.to_str().unwrap().to_owned();
    let again = TestApp::start(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &dir,
            "--psp-url",
            &psp_url,
        ],
        data_dir.clone(),
    );
    let res = charge(&again, "psp", "default", Some("order-7504"), &body).await;
    assert_eq!(res.status(), 201);
    let outcome: Value = res.json().await.unwrap();
    assert_eq!(outcome["status"], "authorised", "{outcome}");
    // Once more: a plain replay from the vault, no PSP call.
    let res = charge(&again, "psp", "default", Some("order-7504"), &body).await;
    assert_eq!(res.headers()["idempotent-replayed"], "true");

    let seen = psp.received().await;
    let originals = seen.iter().filter(|r| r["replay"] == false).count();
    assert_eq!(originals, 1, "one PSP authorisation: {seen:?}");
    assert_eq!(seen.len(), 2, "the original and one replayed resend: {seen:?}");
    assert_eq!(seen[0]["idempotency_key"], seen[1]["idempotency_key"]);
    assert_eq!(
        seen[1]["idempotency_key"],
        format!("tv-{}", outcome["id"].as_str().unwrap())
    );
    // The CVV went once, with the first attempt; the resend had none left to send.
    assert_eq!(seen[0]["request"]["paymentMethod"]["cvc"], "737");
    assert!(seen[1]["request"]["paymentMethod"].get("cvc").is_none());
    app.watch("5555555555554444");
}

#[tokio::test]
async fn cvv_expires_after_its_ttl_and_without_a_psp_charges_are_refused() {
    let (app, psp) = vault_with_psp(&["--cvv-ttl", "1s"]);
    let tok = tokenize_with_cvv(&app, "4111111111111111", "314").await;
    assert_eq!(tok["cvv_held"], true);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let token = tok["token"].as_str().unwrap();
    assert_eq!(
        app.read("default", token).await.json::<Value>().await.unwrap()["cvv_held"],
        false
    );
    let res = charge(
        &app,
        "psp",
        "default",
        Some("k"),
        &charge_body(token, 1000, "ecommerce", None),
    )
    .await;
    assert_eq!(res.json::<Value>().await.unwrap()["cvv_sent"], false);
    assert!(psp.received().await[0]["request"]["paymentMethod"].get("cvc").is_none());
    // A CVV of the wrong length for the brand is refused; nothing is stored.
    let res = app
        .tokenize_as(
            &app.jwt("edge", "default"),
            json!({"pan": "378282246310005", "exp_month": 1, "exp_year": 2031, "cvv": "123"}),
        )
        .await;
    assert_problem(res, 422, "invalid-cvv").await;

    // A vault without a PSP refuses charges clearly.
    let plain = TestApp::spawn().await;
    let (_, t) = plain.tokenize("default", "4111111111111111", None).await;
    let res = charge(
        &plain,
        "psp",
        "default",
        Some("k"),
        &charge_body(t["token"].as_str().unwrap(), 1000, "moto", None),
    )
    .await;
    assert_problem(res, 503, "psp-not-configured").await;
}

/// Card numbers hidden in free text: a grouped PAN in a reference was accepted,
/// stored, returned and logged on a PSP retry; a client's X-Request-Id was logged
/// and audited verbatim. Now both are refused or replaced, and a charge id that
/// carries a card number is neither looked up nor audited.
#[tokio::test]
async fn card_numbers_in_free_text_are_refused_and_never_logged() {
    let (app, psp) = vault_with_psp(&[]);
    let (_, tok) = app.tokenize("default", "4012888888881881", None).await;
    let token = tok["token"].as_str().unwrap();
    app.watch("4111111111111111");
    for (i, reference) in [
        "pay 4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "order 12 4111.1111.1111.1111",
    ]
    .into_iter()
    .enumerate()
    {
        let mut body = charge_body(token, 1000, "moto", None);
        body["reference"] = json!(reference);
        let res = charge(&app, "psp", "default", Some(&format!("k-{i}")), &body).await;
        let problem = assert_problem(res, 422, "invalid-field").await;
        assert!(problem["detail"].as_str().unwrap().contains("card number"));
    }
    assert!(psp.received().await.is_empty(), "nothing reached the PSP");
    // A client request id shaped like a card number is replaced by the server's own.
    let res = app
        .client
        .get(app.url("/v1/charges/ch_4111111111111111"))
        .bearer_auth(app.jwt("psp", "default"))
        .header("X-Request-Id", "4111111111111111")
        .send()
        .await
        .unwrap();
    let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_ne!(id, "4111111111111111");
    assert_problem(res, 404, "not-found").await;
    // A safe client id is kept (for correlation with the caller's logs).
    let res = app
        .client
        .get(app.url("/healthz"))
        .header("X-Request-Id", "ivr-call-42")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "ivr-call-42");
    let trail = app.audit_export();
    let text = serde_json::to_string(&trail).unwrap();
    assert!(
        !text.contains("4111111111111111") && !text.contains("4111 1111"),
        "{text}"
    );
}
