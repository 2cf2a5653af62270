//! The authorization matrix (every dev role × every endpoint) and the JWT attack set.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde_json::{Value, json};

use crate::helpers::*;

const ROLES: [&str; 5] = ["edge", "crm", "psp", "officer", "officer2"];

/// The scope each endpoint requires, and the one role holding it.
const ENDPOINTS: [(&str, &str, &str); 14] = [
    ("POST", "/v1/tokens", "edge"),
    ("POST", "/v1/tokens/batch", "edge"),
    ("GET", "/v1/tokens", "crm"),
    ("GET", "/v1/tokens/{token}", "crm"),
    ("DELETE", "/v1/tokens/{token}", "crm"),
    ("PATCH", "/v1/tokens/{token}", "edge"),
    ("POST", "/v1/detokenize", "psp"),
    ("POST", "/v1/charges", "psp"),
    ("GET", "/v1/charges", "psp"),
    ("GET", "/v1/charges/{id}", "psp"),
    ("POST", "/v1/charges/{id}/captures", "psp"),
    ("POST", "/v1/charges/{id}/refunds", "psp"),
    ("POST", "/v1/charges/{id}/cancel", "psp"),
    ("GET", "/v1/admin/keys", "officer"),
];

async fn call(app: &TestApp, method: &str, path: &str, jwt: Option<&str>, token: &str) -> reqwest::Response {
    let url = app.url(&path.replace("{token}", token).replace("{id}", "ch_unknown"));
    let mut req = match method {
        "POST" if path == "/v1/charges" => app.client.post(url).header("Idempotency-Key", format!("k-{token}")).json(
            &json!({"token": token, "amount": {"value": 100, "currency": "EUR"}, "reference": "r", "shopper_interaction": "moto"}),
        ),
        "POST" if path.starts_with("/v1/charges/") => {
            app.client.post(url).header("Idempotency-Key", format!("k-{token}")).json(&json!({}))
        }
        "POST" if path == "/v1/tokens" => app
            .client
            .post(url)
            .json(&json!({"pan": "4012888888881881", "exp_month": 6, "exp_year": 2032})),
        "POST" if path == "/v1/tokens/batch" => app.client.post(url).json(
            &json!({"items": [{"id": "a", "pan": "4012888888881881", "exp_month": 6, "exp_year": 2032}]}),
        ),
        "POST" => app.client.post(url).json(&json!({"token": token})),
        "PATCH" => app.client.patch(url).json(&json!({"exp_month": 9, "exp_year": 2033})),
        "GET" if path == "/v1/charges" => app.client.get(url).query(&[("token", token)]),
        "GET" => app.client.get(url),
        "DELETE" => app.client.delete(url),
        _ => unreachable!(),
    };
    if let Some(jwt) = jwt {
        req = req.bearer_auth(jwt);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn every_role_on_every_endpoint() {
    let app = TestApp::spawn().await;
    app.watch("4012888888881881");
    for (method, path, allowed) in ENDPOINTS {
        for role in ROLES {
            // A fresh token per call so that DELETE has something to delete.
            let (_, body) = app.tokenize("default", &pan_for(rand_index()), None).await;
            let token = body["token"].as_str().unwrap().to_owned();
            let res = call(&app, method, path, Some(&app.jwt(role, "default")), &token).await;
            if role == allowed || (allowed == "officer" && role == "officer2") {
                let expected = match (method, path) {
                    ("POST", "/v1/tokens") => [200, 201].contains(&res.status().as_u16()),
                    ("DELETE", _) => res.status() == 204,
                    // Authorized; no PSP is configured in this vault / no such charge.
                    ("POST", p) if p.starts_with("/v1/charges") => res.status() == 503,
                    ("GET", "/v1/charges/{id}") => res.status() == 404,
                    _ => res.status() == 200,
                };
                assert!(expected, "{role} {method} {path}: {}", res.status());
            } else {
                let p = assert_problem(res, 403, "forbidden").await;
                assert_eq!(p["detail"], "scope not granted", "{role} {method} {path}");
            }
            // No credential at all: 401 for everyone.
            let res = call(&app, method, path, None, &token).await;
            assert_eq!(res.headers()["www-authenticate"], "Bearer error=\"invalid_token\"");
            assert_problem(res, 401, "unauthenticated").await;
        }
    }
    // 14 endpoints × 5 roles: 15 allowed (officer and officer2 share one), 55 refused by scope.
    assert_eq!(
        app.metric("tokenvault_auth_failures_total{reason=\"scope\"}").await,
        55.0
    );
    assert_eq!(
        app.metric("tokenvault_auth_failures_total{reason=\"missing\"}").await,
        70.0
    );
}

fn rand_index() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1000);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Every forged, stale or misdirected credential is refused with 401 (or 403 when
/// it verifies but the registry says no), on a detokenize of a real token.
#[tokio::test]
async fn jwt_attacks_are_refused() {
    let app = TestApp::spawn().await;
    let (_, body) = app.tokenize("default", "378282246310005", None).await;
    let token = body["token"].as_str().unwrap().to_owned();
    let good = app.claims("psp", "default");
    let n = now();
    let with = |patch: Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let kid = Some("dev-ed25519-1");
    let valid = app.sign(&good, kid);

    // Sanity: the unmodified token works.
    assert_eq!(
        call(&app, "POST", "/v1/detokenize", Some(&valid), &token)
            .await
            .status(),
        200
    );

    // alg: none, HS256 signed with the public key as secret (key confusion), tampered signature.
    let header_none = B64URL.encode(br#"{"alg":"none","typ":"JWT","kid":"dev-ed25519-1"}"#);
    let payload = B64URL.encode(good.to_string());
    let alg_none = format!("{header_none}.{payload}.");
    let public_pem = std::fs::read(app.data_dir.join("dev/issuer-ed25519.pub.pem")).unwrap();
    let mut hs_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    hs_header.kid = kid.map(str::to_owned);
    let hs256 = jsonwebtoken::encode(&hs_header, &good, &jsonwebtoken::EncodingKey::from_secret(&public_pem)).unwrap();
    let mut tampered = valid.clone().into_bytes();
    let last = tampered.len() - 5;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    // Claims swapped under a valid signature.
    let parts: Vec<&str> = valid.split('.').collect();
    let escalated = format!(
        "{}.{}.{}",
        parts[0],
        B64URL.encode(with(json!({"sub": "dev-edge"})).to_string()),
        parts[2]
    );

    let unauthenticated: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            app.sign(&with(json!({"exp": n - 120, "nbf": n - 600})), kid),
            "expired",
        ),
        (
            "not yet valid",
            app.sign(&with(json!({"nbf": n + 600, "exp": n + 1200})), kid),
            "not_yet_valid",
        ),
        (
            "wrong audience",
            app.sign(&with(json!({"aud": "someone-else"})), kid),
            "audience",
        ),
        ("wrong issuer", app.sign(&with(json!({"iss": "evil"})), kid), "issuer"),
        ("no audience", app.sign(&with(json!({"aud": null})), kid), "malformed"),
        ("no exp", app.sign(&with(json!({"exp": null})), kid), "malformed"),
        ("alg none", alg_none, "malformed"),
        ("HS256", hs256, "algorithm"),
        ("unknown kid", app.sign(&good, Some("other-key")), "unknown_kid"),
        ("no kid", app.sign(&good, None), "unknown_kid"),
        ("tampered signature", tampered, "signature"),
        ("swapped claims", escalated, "signature"),
        ("garbage", "not.a.jwt".to_owned(), "malformed"),
    ];
    for (name, jwt, reason) in &unauthenticated {
        let before = app
            .metric(&format!("tokenvault_auth_failures_total{{reason=\"{reason}\"}}"))
            .await;
        let res = call(&app, "POST", "/v1/detokenize", Some(jwt), &token).await;
        let p = assert_problem(res, 401, "unauthenticated").await;
        assert!(!p.to_string().contains("378282246310005"), "{name}");
        let after = app
            .metric(&format!("tokenvault_auth_failures_total{{reason=\"{reason}\"}}"))
            .await;
        assert_eq!(after, before + 1.0, "{name} counted as {reason}");
    }
    // The same forgeries against every authenticated endpoint (admin and charges included): all 401.
    for (method, path) in tokenvault::api::ROUTES.iter().filter(|(_, p)| p.starts_with("/v1/")) {
        let url = app.url(
            &path
                .replace("{token}", &token)
                .replace("{id}", "ch_x")
                .replace("{version}", "v1"),
        );
        for (name, jwt, _) in &unauthenticated {
            let req = match *method {
                "GET" => app.client.get(&url),
                "DELETE" => app.client.delete(&url),
                "PATCH" => app.client.patch(&url).json(&json!({})),
                _ => app.client.post(&url).header("Idempotency-Key", "k").json(&json!({})),
            };
            let res = req.bearer_auth(jwt).send().await.unwrap();
            assert_eq!(res.status(), 401, "{name} on {method} {path}");
        }
    }
    // Wrong scheme.
    let res = app
        .client
        .post(app.url("/v1/detokenize"))
        .header("authorization", format!("Basic {valid}"))
        .json(&json!({"token": token}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 401, "unauthenticated").await;

    // Verifies, but the registry says no: 403.
    let forbidden = [
        ("unregistered client", with(json!({"sub": "intruder"})), "client"),
        (
            "scope the registry does not grant",
            with(json!({"sub": "dev-edge", "scope": "tokens:detokenize"})),
            "scope",
        ),
        ("no tenant claim", with(json!({"tenant": null})), "tenant"),
        ("malformed tenant", with(json!({"tenant": "../other"})), "tenant"),
    ];
    for (name, claims, reason) in forbidden {
        let res = call(&app, "POST", "/v1/detokenize", Some(&app.sign(&claims, kid)), &token).await;
        let p = assert_problem(res, 403, "forbidden").await;
        assert_eq!(
            p["detail"].as_str().unwrap().split(' ').next_back(),
            Some(match reason {
                "client" => "registered",
                "scope" => "granted",
                _ => "allowed",
            }),
            "{name}"
        );
    }

    // Wrong tenant: verifies and is allowed, but the token is not theirs.
    let res = call(
        &app,
        "POST",
        "/v1/detokenize",
        Some(&app.jwt("psp", "other-merchant")),
        &token,
    )
    .await;
    assert_problem(res, 404, "not-found").await;
}
