//! Tokenize, read, detokenize and delete over HTTP: the walkthrough, token
//! formats, dedupe, tenant isolation and every rejection path.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn walkthrough_tokenize_read_detokenize_delete() {
    let app = TestApp::spawn().await;
    let edge = app.cli_jwt("edge", "default");
    let crm = app.cli_jwt("crm", "default");
    let psp = app.cli_jwt("psp", "default");
    let body = json!({"pan": "4111111111111111", "exp_month": 12, "exp_year": 2030, "cardholder_name": "Ada Lovelace"});

    let res = app.tokenize_as(&edge, body.clone()).await;
    assert_eq!(res.status(), 201);
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    let created: Value = res.json().await.unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/v1/tokens/{token}"));
    assert_eq!(created["format"], "bin6_last4");
    assert_eq!(created["brand"], "visa");
    assert_eq!(created["bin"], "411111");
    assert_eq!(created["last4"], "1111");
    assert_eq!(created["exp_month"], 12);
    assert_eq!(created["exp_year"], 2030);
    assert!(
        created.get("fingerprint").is_none(),
        "no fingerprint for a client without tokens:dedupe"
    );
    assert!(created["created_at"].as_str().unwrap().ends_with('Z'));
    assert_ne!(token, "4111111111111111");

    // The edge (no tokens:dedupe) cannot tell a known card from a new one: the
    // same PAN again is another 201 with another token (no PAN oracle).
    let res = app.tokenize_as(&edge, body.clone()).await;
    assert_eq!(res.status(), 201);
    let again: Value = res.json().await.unwrap();
    assert_ne!(again["token"], created["token"]);
    assert!(again.get("fingerprint").is_none());
    let second = again["token"].as_str().unwrap().to_owned();

    // A client granted tokens:dedupe (the importer) gets the tenant's first token: 200.
    let importer = app.cli_jwt("importer", "default");
    let res = app.tokenize_as(&importer, body).await;
    assert_eq!(res.status(), 200);
    let deduped: Value = res.json().await.unwrap();
    assert_eq!(deduped["token"], created["token"]);
    assert_eq!(deduped["fingerprint"].as_str().unwrap().len(), 64);
    let fingerprint = deduped["fingerprint"].clone();

    // CRM reads metadata: never the PAN.
    let res = app
        .client
        .get(app.url(&location))
        .bearer_auth(&crm)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert!(!text.contains("4111111111111111"));
    assert!(!text.contains("Ada"));
    // The tokenize answer, and when the card was last used: its tokenize.
    let mut expected = created.clone();
    expected["last_used_at"] = created["created_at"].clone();
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), expected);

    // PSP detokenizes: the PAN, not cacheable.
    let res = app
        .client
        .post(app.url("/v1/detokenize"))
        .bearer_auth(&psp)
        .json(&json!({"token": token}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "no-store");
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
    let revealed: Value = res.json().await.unwrap();
    assert_eq!(
        revealed,
        json!({"token": token, "pan": "4111111111111111", "exp_month": 12, "exp_year": 2030, "cardholder_name": "Ada Lovelace"})
    );

    // CRM deletes: 204, then 404 everywhere, and the fingerprint is gone too.
    let res = app
        .client
        .delete(app.url(&location))
        .bearer_auth(&crm)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    assert_problem(
        app.client
            .get(app.url(&location))
            .bearer_auth(&crm)
            .send()
            .await
            .unwrap(),
        404,
        "not-found",
    )
    .await;
    assert_problem(app.detokenize("default", &token).await, 404, "not-found").await;
    assert_problem(
        app.client
            .delete(app.url(&location))
            .bearer_auth(&crm)
            .send()
            .await
            .unwrap(),
        404,
        "not-found",
    )
    .await;
    // The edge's second token for the card still works; the index entry went with the first.
    assert_eq!(app.detokenize("default", &second).await.status(), 200);
    let res = app
        .tokenize_as(
            &importer,
            json!({"pan": "4111111111111111", "exp_month": 12, "exp_year": 2030}),
        )
        .await;
    assert_eq!(
        res.status(),
        201,
        "after delete the card is new again to the dedupe index"
    );
    let fresh: Value = res.json().await.unwrap();
    assert_eq!(fresh["fingerprint"], fingerprint);
    assert_ne!(fresh["token"], created["token"]);

    assert_eq!(app.metric("tokenvault_tokenize_total{outcome=\"created\"}").await, 3.0);
    assert_eq!(app.metric("tokenvault_tokenize_total{outcome=\"existing\"}").await, 1.0);
    assert_eq!(app.metric("tokenvault_detokenize_total{outcome=\"ok\"}").await, 2.0);
    assert_eq!(app.metric("tokenvault_delete_total{outcome=\"deleted\"}").await, 1.0);
    assert_eq!(app.metric("tokenvault_tokens_stored").await, 2.0);
    // Route labels are patterns, never raw paths holding a token.
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("route=\"/v1/tokens/{token}\""));
    assert!(!metrics.contains(&token));
}

/// Major brands and every length 12–19, over HTTP: length, BIN and last four
/// kept, digits only, Luhn fails, and the token detokenizes to the PAN.
#[tokio::test]
async fn token_formats_for_every_length_and_brand() {
    let app = TestApp::spawn().await;
    let mut pans: Vec<String> = TEST_PANS.iter().map(|s| s.to_string()).collect();
    pans.extend(
        [
            "2223003122003222",
            "3530111333300000",
            "36227206271667",
            "6200000000000005",
            "4222222222222",
        ]
        .map(String::from),
    );
    for len in 12..=19 {
        pans.push(with_check_digit(&format!("50{}", "7".repeat(len - 3))));
        pans.push(with_check_digit(&format!("9{}", "1".repeat(len - 2))));
    }
    pans.retain(|p| luhn_valid(p));
    let mut lengths = std::collections::BTreeSet::new();
    for pan in &pans {
        for format in ["bin6_last4", "last4"] {
            let tenant = format!("fmt-{format}");
            let (status, body) = app.tokenize(&tenant, pan, Some(format)).await;
            assert_eq!(status, 201, "len {} {format}: {body}", pan.len());
            let token = body["token"].as_str().unwrap();
            assert_eq!(token.len(), pan.len());
            assert!(token.bytes().all(|b| b.is_ascii_digit()));
            assert!(!luhn_valid(token), "a token must fail Luhn");
            assert_eq!(&token[token.len() - 4..], &pan[pan.len() - 4..]);
            if format == "bin6_last4" {
                assert_eq!(&token[..6], &pan[..6]);
            }
            assert_eq!(body["bin"], &pan[..6]);
            let res = app.detokenize(&tenant, token).await;
            assert_eq!(res.json::<Value>().await.unwrap()["pan"], pan.as_str());
            lengths.insert(pan.len());
        }
    }
    assert_eq!(lengths.into_iter().collect::<Vec<_>>(), (12..=19).collect::<Vec<_>>());

    let (status, body) = app.tokenize("fmt-opaque", "5555555555554444", Some("opaque")).await;
    assert_eq!(status, 201);
    let token = body["token"].as_str().unwrap();
    assert!(token.starts_with("tok_") && token.len() == 26, "{token}");
    assert_eq!(body["format"], "opaque");
    assert_eq!(body["last4"], "4444");
    assert_eq!(
        app.detokenize("fmt-opaque", token).await.json::<Value>().await.unwrap()["pan"],
        "5555555555554444"
    );
}

#[tokio::test]
async fn dedupe_within_a_tenant_and_isolation_across_tenants() {
    let app = TestApp::spawn().await;
    let (s1, a) = app
        .tokenize_by("importer", "merchant-a", "5555555555554444", None)
        .await;
    let (s2, a2) = app
        .tokenize_by("importer", "merchant-a", "5555555555554444", Some("opaque"))
        .await;
    let (s3, b) = app
        .tokenize_by("importer", "merchant-b", "5555555555554444", None)
        .await;
    assert_eq!((s1, s2, s3), (201, 200, 201));
    assert_eq!(
        a2["token"], a["token"],
        "dedupe returns the existing token whatever format is asked"
    );
    assert_ne!(b["token"], a["token"], "another tenant gets its own token");
    assert_ne!(b["fingerprint"], a["fingerprint"], "fingerprints are keyed per tenant");

    // Another tenant's token does not exist for you: 404 on every operation.
    let a_token = a["token"].as_str().unwrap();
    assert_problem(app.read("merchant-b", a_token).await, 404, "not-found").await;
    assert_problem(app.detokenize("merchant-b", a_token).await, 404, "not-found").await;
    assert_problem(app.delete("merchant-b", a_token).await, 404, "not-found").await;
    assert_eq!(
        app.read("merchant-a", a_token).await.status(),
        200,
        "a failed cross-tenant delete changed nothing"
    );
}

/// Concurrent tokenizations of one PAN in one tenant converge on one token.
#[tokio::test]
async fn concurrent_dedupe_yields_one_token() {
    let app = TestApp::spawn().await;
    let futs = (0..16).map(|_| app.tokenize_by("importer", "default", "6011111111111117", None));
    let results = futures_util::future::join_all(futs).await;
    let tokens: std::collections::BTreeSet<_> = results.iter().map(|(_, b)| b["token"].to_string()).collect();
    assert_eq!(tokens.len(), 1, "{results:?}");
    assert_eq!(results.iter().filter(|(s, _)| *s == 201).count(), 1);
    assert_eq!(app.metric("tokenvault_tokens_stored").await, 1.0);
}

/// The assessor's attack: an edge credential plus a token (BIN and last four
/// visible) walks the hidden middle digits. Before the fix a guess of the right
/// card answered 200 with the victim's token. Now the answer is the same for
/// right and wrong guesses (201, a fresh token, no fingerprint), and the
/// enumeration guard throttles, audits and counts the walk after a handful.
#[tokio::test]
async fn dedupe_is_no_pan_oracle_and_enumeration_is_throttled() {
    let app = TestApp::spawn().await;
    let victim = "4111111111111111";
    // The victim's card is on file (tokenized by the IVR edge earlier).
    let (status, held) = app.tokenize("default", victim, None).await;
    assert_eq!(status, 201);
    let held_token = held["token"].as_str().unwrap().to_owned();

    // The attacker knows BIN 411111 and last four 1111 from the token and guesses
    // Luhn-valid middles; the right card is among the first guesses.
    let mut guesses = vec![victim.to_owned()];
    let mut middle = 0u64;
    while guesses.len() < 8 {
        let candidate = with_check_digit(&format!("411111{middle:06}111"));
        // Keep only candidates that end in 1111 (the check digit is the last one).
        middle += 1;
        if candidate.ends_with("1111") && candidate != victim {
            guesses.push(candidate);
        }
    }
    let edge = app.jwt("edge", "default");
    let mut answers = Vec::new();
    for pan in &guesses {
        let res = app
            .tokenize_as(&edge, json!({"pan": pan, "exp_month": 12, "exp_year": 2031}))
            .await;
        let status = res.status().as_u16();
        let retry_after = res.headers().get("retry-after").is_some();
        let body: Value = res.json().await.unwrap();
        answers.push((status, body, retry_after));
    }
    // No oracle: the right guess looks like any other new card.
    let (right_status, right, _) = &answers[0];
    assert_eq!(*right_status, 201, "{right}");
    assert_ne!(
        right["token"],
        held_token.as_str(),
        "the victim's token must not come back"
    );
    assert!(right.get("fingerprint").is_none());
    for (status, body, _) in &answers[1..5] {
        assert_eq!(*status, 201, "{body}");
        assert!(body.get("fingerprint").is_none());
    }
    // The guard: 5 distinct cards behind 411111…1111 are allowed, the 6th is refused
    // (429 enumeration-suspected with Retry-After) and stores nothing; so is the next.
    for (status, body, retry_after) in &answers[5..] {
        assert_eq!(*status, 429, "{body}");
        assert_eq!(body["type"], "urn:tokenvault:problem:enumeration-suspected");
        assert!(*retry_after);
    }
    // The throttle covers the client's tokenize for this tenant, not only this BIN.
    let (status, _) = app.tokenize("default", "5555555555554444", None).await;
    assert_eq!(status, 429);
    // Other clients (and the same client in another tenant) are unaffected.
    let (status, _) = app.tokenize("other-tenant", "5555555555554444", None).await;
    assert_eq!(status, 201);
    assert_eq!(
        app.metric("tokenvault_enumeration_suspected_total{kind=\"flagged\"}")
            .await,
        1.0
    );
    assert_eq!(
        app.metric("tokenvault_enumeration_suspected_total{kind=\"refused\"}")
            .await,
        3.0
    );
    // 1 victim + 5 allowed guesses + 1 other tenant: refused guesses stored nothing.
    assert_eq!(app.metric("tokenvault_tokens_stored").await, 7.0);
    let trail = app.audit_export();
    let flagged: Vec<&Value> = trail.iter().filter(|r| r["action"] == "anomaly.enumeration").collect();
    assert_eq!(flagged.len(), 1, "one audit record when the guard trips");
    assert_eq!(flagged[0]["principal"], "dev-edge");
    assert_eq!(flagged[0]["tenant"], "default");
    // The victim's token still opens to the victim's card.
    let res = app.detokenize("default", &held_token).await;
    assert_eq!(res.json::<Value>().await.unwrap()["pan"], victim);
}

#[tokio::test]
async fn invalid_cards_are_rejected_and_change_nothing() {
    let app = TestApp::spawn().await;
    let edge = app.jwt("edge", "default");
    let cases: &[(Value, &str)] = &[
        (
            json!({"pan": "4111111111111112", "exp_month": 12, "exp_year": 2030}),
            "invalid-card-number",
        ),
        (
            json!({"pan": "4111 1111 1111 1111", "exp_month": 12, "exp_year": 2030}),
            "invalid-card-number",
        ),
        (
            json!({"pan": "4111-1111-1111-1111", "exp_month": 12, "exp_year": 2030}),
            "invalid-card-number",
        ),
        (
            json!({"pan": "٤١١١١١١١١١١١١١١١", "exp_month": 12, "exp_year": 2030}),
            "invalid-card-number",
        ),
        (
            json!({"pan": "４１１１１１１１１１１１１１１１", "exp_month": 12, "exp_year": 2030}),
            "invalid-card-number",
        ),
        (
            json!({"pan": "", "exp_month": 12, "exp_year": 2030}),
            "invalid-card-number",
        ),
        (
            json!({"pan": "41111111118", "exp_month": 12, "exp_year": 2030}),
            "invalid-card-number",
        ),
        (
            json!({"pan": "41111111111111111113", "exp_month": 12, "exp_year": 2030}),
            "invalid-card-number",
        ),
        (
            json!({"pan": " 4111111111111111", "exp_month": 12, "exp_year": 2030}),
            "invalid-card-number",
        ),
        (
            json!({"pan": "4111111111111111", "exp_month": 0, "exp_year": 2030}),
            "invalid-expiry",
        ),
        (
            json!({"pan": "4111111111111111", "exp_month": 13, "exp_year": 2030}),
            "invalid-expiry",
        ),
        (
            json!({"pan": "4111111111111111", "exp_month": 1, "exp_year": 2001}),
            "invalid-expiry",
        ),
        (
            json!({"pan": "4111111111111111", "exp_month": 1, "exp_year": 30}),
            "invalid-expiry",
        ),
        (
            json!({"pan": "4111111111111111", "exp_month": 1, "exp_year": 2030, "cardholder_name": ""}),
            "invalid-field",
        ),
    ];
    for (body, code) in cases {
        let mut problem = assert_problem(app.tokenize_as(&edge, body.clone()).await, 422, code).await;
        // The request id is random hex and may contain any digits; the rest must not echo the input.
        problem.as_object_mut().unwrap().remove("request_id");
        let text = problem.to_string();
        assert!(!text.contains("4111"), "problem must not echo the input: {text}");
    }
    // JSON escapes in a card body are refused before parsing (serde would unescape the
    // card number through a scratch buffer it never zeroizes): 400, nothing stored.
    for raw in [
        r#"{"pan": "\u0034111111111111111", "exp_month": 12, "exp_year": 2030}"#,
        r#"{"pan": "4111111111111111", "exp_month": 1, "exp_year": 2030, "cardholder_name": "a\u0007b"}"#,
        r#"{"pan": "4111111111111111", "exp_month": 1, "exp_year": 2030, "cardholder_name": "Ada \"Lovelace\""}"#,
    ] {
        let res = app
            .client
            .post(app.url("/v1/tokens"))
            .bearer_auth(&edge)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        let problem = assert_problem(res, 400, "malformed-request").await;
        assert!(problem["detail"].as_str().unwrap().contains("escapes"), "{problem}");
    }
    // Malformed JSON, wrong types, unknown or missing fields: 400, input never echoed.
    for raw in [
        "{",
        "[]",
        r#"{"pan": 4111111111111111, "exp_month": 12, "exp_year": 2030}"#,
        r#"{"pan": "4111111111111111", "exp_month": 12, "exp_year": 2030, "cvv2": "123"}"#,
        r#"{"pan": "4111111111111111", "exp_month": 12}"#,
        r#"{"pan": "4111111111111111", "exp_month": 12, "exp_year": 2030, "format": "plain"}"#,
        r#"{"pan": "4111111111111111", "exp_month": "12", "exp_year": 2030}"#,
    ] {
        let res = app
            .client
            .post(app.url("/v1/tokens"))
            .bearer_auth(&edge)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        let mut problem = assert_problem(res, 400, "malformed-request").await;
        problem.as_object_mut().unwrap().remove("request_id");
        assert!(!problem.to_string().contains("4111"));
    }
    // Wrong content type: 415. Too large: 413 (declared and streamed).
    let res = app
        .client
        .post(app.url("/v1/tokens"))
        .bearer_auth(&edge)
        .header("content-type", "text/plain")
        .body(r#"{"pan":"4111111111111111","exp_month":12,"exp_year":2030}"#)
        .send()
        .await
        .unwrap();
    assert_problem(res, 415, "unsupported-media-type").await;
    let res = app
        .client
        .post(app.url("/v1/tokens"))
        .bearer_auth(&edge)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_problem(res, 415, "unsupported-media-type").await;
    let big =
        json!({"pan": "4111111111111111", "exp_month": 12, "exp_year": 2030, "cardholder_name": "x".repeat(20_000)});
    assert_problem(app.tokenize_as(&edge, big).await, 413, "payload-too-large").await;
    let stream =
        futures_util::stream::iter((0..40).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 1024]))));
    let res = app
        .client
        .post(app.url("/v1/tokens"))
        .bearer_auth(&edge)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_problem(res, 413, "payload-too-large").await;

    // Nothing was stored.
    assert_eq!(app.metric("tokenvault_tokens_stored").await, 0.0);
    assert_eq!(app.metric("tokenvault_tokenize_total{outcome=\"created\"}").await, 0.0);
    assert!(app.metric("tokenvault_tokenize_total{outcome=\"rejected\"}").await >= 14.0);
}

#[tokio::test]
async fn token_lookups_reject_non_tokens_and_unknown_routes() {
    let app = TestApp::spawn().await;
    // A Luhn-valid number is never a token: 404 without a lookup.
    assert_problem(app.read("default", "4111111111111111").await, 404, "not-found").await;
    assert_problem(app.read("default", "4111110000001112").await, 404, "not-found").await;
    assert_problem(app.read("default", "tok_nope").await, 404, "not-found").await;
    assert_problem(app.detokenize("default", "4111111111111111").await, 404, "not-found").await;
    let res = app.client.get(app.url("/v1/nothing")).send().await.unwrap();
    assert_problem(res, 404, "not-found").await;
    let res = app
        .client
        .put(app.url("/v1/tokens"))
        .bearer_auth(app.jwt("edge", "default"))
        .send()
        .await
        .unwrap();
    assert_problem(res, 405, "method-not-allowed").await;
    let res = app.client.get(app.url("/v1/detokenize")).send().await.unwrap();
    assert_problem(res, 405, "method-not-allowed").await;
    // A caller-supplied request id is echoed when well-formed, replaced otherwise.
    let res = app
        .client
        .get(app.url("/v1/nothing"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "abc-123");
    let res = app
        .client
        .get(app.url("/v1/nothing"))
        .header("x-request-id", "bad id\tx")
        .send()
        .await
        .unwrap();
    assert_ne!(res.headers()["x-request-id"], "bad id\tx");
    // The server's own ids: random v4 UUIDs, a fresh one per request.
    let mut ids = std::collections::HashSet::new();
    for _ in 0..20 {
        let res = app.client.get(app.url("/v1/nothing")).send().await.unwrap();
        let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
        let uuid = uuid::Uuid::parse_str(&id).expect("a UUID");
        assert_eq!(uuid.get_version_num(), 4, "{id}");
        assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122, "{id}");
        ids.insert(id);
    }
    assert_eq!(ids.len(), 20, "request ids repeat");
}

/// A 12-digit PAN in `bin6_last4` has 90 Luhn-failing tokens. Tokens are unique
/// vault-wide, so the same card in 91 tenants exhausts the space: a clear 503.
#[tokio::test]
async fn exhausted_token_space_is_a_clear_problem() {
    let app = TestApp::spawn().await;
    let pan = with_check_digit("50000000001");
    assert_eq!(pan.len(), 12);
    let mut tokens = std::collections::BTreeSet::new();
    for i in 0..90 {
        let (status, body) = app.tokenize(&format!("t{i}"), &pan, None).await;
        assert_eq!(status, 201, "{body}");
        tokens.insert(body["token"].as_str().unwrap().to_owned());
    }
    assert_eq!(tokens.len(), 90);
    let res = app
        .tokenize_as(
            &app.jwt("edge", "t90"),
            json!({"pan": pan, "exp_month": 12, "exp_year": 2031}),
        )
        .await;
    assert_problem(res, 503, "token-space-exhausted").await;
    let (status, body) = app.tokenize("t90", &pan, Some("opaque")).await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn health_and_readiness() {
    let app = TestApp::spawn().await;
    let res = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["status"], "ready");
    let res = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert!(res.headers().get("server").is_none(), "no version banner");
    assert!(
        app.log_shows("core dumps disabled").await,
        "process hardening applied at start"
    );
}

/// Expiring tokens: a 2-second token (with a CVV) is gone for every caller once its
/// time passes, and the sweeper deletes it (audited, counted), also when the vault
/// was down at the moment it expired; a 15-minute token says when it ends; bad
/// lifetimes change nothing; a dedupe caller whose token expired gets a new one.
#[tokio::test]
async fn expiring_tokens_are_gone_when_their_time_passes_also_across_a_restart() {
    let mut app = TestApp::spawn().await;
    app.watch("4111111111111111");
    app.watch("5555555555554444");
    let edge = app.jwt("edge", "default");
    let card = |extra: Value| {
        let mut b = json!({"pan": "4111111111111111", "exp_month": 12, "exp_year": 2031, "cvv": "123"});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    // Bad lifetimes: refused, nothing stored.
    let before = app.metric("tokenvault_tokenize_total{outcome=\"created\"}").await;
    for bad in [
        json!({"ttl": "0s"}),
        json!({"ttl": "401d"}),
        json!({"ttl": "soon"}),
        json!({"ttl": "15m", "expires_at": "2099-01-01T00:00:00Z"}),
        json!({"expires_at": "2020-01-01T00:00:00Z"}),
        json!({"expires_at": "tomorrow"}),
    ] {
        let res = app.tokenize_as(&edge, card(bad.clone())).await;
        assert_problem(res, 422, "invalid-field").await;
    }
    assert_eq!(
        app.metric("tokenvault_tokenize_total{outcome=\"created\"}").await,
        before,
        "bad lifetimes stored nothing"
    );

    // A token for one IVR call: 15 minutes.
    let res = app.tokenize_as(&edge, card(json!({"ttl": "15m"}))).await;
    assert_eq!(res.status(), 201);
    let call: Value = res.json().await.unwrap();
    let ends = time::OffsetDateTime::parse(
        call["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let left = (ends - time::OffsetDateTime::now_utc()).whole_seconds();
    assert!((890..=900).contains(&left), "15 minutes: {left} s left");

    // A 2-second token with a CVV.
    let res = app.tokenize_as(&edge, card(json!({"ttl": "2s"}))).await;
    assert_eq!(res.status(), 201);
    let short: Value = res.json().await.unwrap();
    let token = short["token"].as_str().unwrap().to_owned();
    assert_eq!(short["cvv_held"], true);
    assert_eq!(app.read("default", &token).await.status(), 200);
    assert_eq!(app.detokenize("default", &token).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    assert_problem(app.read("default", &token).await, 404, "not-found").await;
    assert_problem(app.detokenize("default", &token).await, 404, "not-found").await;
    // The sweeper deletes it within a second or so, audited.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while app.metric("tokenvault_tokens_expired_total").await < 1.0 {
        assert!(std::time::Instant::now() < deadline, "never swept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        app.audit_export()
            .iter()
            .any(|r| r["action"] == "token.expire" && r["token"] == token.as_str()),
        "the expiry is in the audit trail"
    );
    // The 15-minute token is still there.
    assert_eq!(app.read("default", call["token"].as_str().unwrap()).await.status(), 200);

    // A token that expires while the vault is down is deleted when it starts.
    let res = app
        .tokenize_as(
            &edge,
            json!({"pan": "5555555555554444", "exp_month": 1, "exp_year": 2032, "ttl": "2s"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let down: Value = res.json().await.unwrap();
    let down_token = down["token"].as_str().unwrap().to_owned();
    app.kill();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let app = TestApp::restart_on(&app.data_dir);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while app.metric("tokenvault_tokens_expired_total").await < 1.0 {
        assert!(std::time::Instant::now() < deadline, "not swept after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_problem(app.read("default", &down_token).await, 404, "not-found").await;
    assert!(
        app.audit_export()
            .iter()
            .any(|r| r["action"] == "token.expire" && r["token"] == down_token.as_str())
    );

    // Dedupe: the tenant's token for a card expired; the card gets a new one.
    let importer = app.jwt("importer", "default");
    let imported = |ttl: Option<&str>| {
        let mut b = json!({"pan": "4012888888881881", "exp_month": 6, "exp_year": 2032});
        if let Some(t) = ttl {
            b["ttl"] = json!(t);
        }
        app.tokenize_as(&importer, b)
    };
    app.watch("4012888888881881");
    let first: Value = imported(Some("1s")).await.json().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let res = imported(None).await;
    assert_eq!(res.status(), 201, "a new token, not the expired one");
    let second: Value = res.json().await.unwrap();
    assert_ne!(second["token"], first["token"]);
    assert!(second.get("expires_at").is_none());
}
