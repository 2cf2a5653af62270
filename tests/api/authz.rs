//! The authorization matrix (every dev role × every endpoint) and the JWT attack set.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde_json::{Value, json};

use tokenvault::api::Access;
use tokenvault::dev::Role;

use crate::helpers::*;

async fn call(app: &TestApp, method: &str, path: &str, jwt: Option<&str>, token: &str) -> reqwest::Response {
    let url = app.url(
        &path
            .replace("{token}", token)
            .replace("{id}", "ch_unknown")
            .replace("{version}", "v999"),
    );
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

/// A JWT for a dev role, built from the server's own role table (its sub and scopes).
fn role_jwt(app: &TestApp, role: Role) -> String {
    let mut claims = app.claims("edge", "default");
    let scopes: Vec<&str> = role.scopes().iter().map(|s| s.as_str()).collect();
    claims["sub"] = json!(role.sub());
    claims["scope"] = json!(scopes.join(" "));
    app.sign(&claims, Some("dev-ed25519-1"))
}

/// Every route of the server's route table × every dev role, plus no credential:
/// a role holding the route's scope gets past authorization (for the endpoints
/// whose outcome is fixed here, exactly that outcome), every other role gets
/// `403 forbidden` "scope not granted", and no credential gets `401`.
#[tokio::test]
async fn every_role_on_every_endpoint() {
    let app = TestApp::spawn().await;
    app.watch("4012888888881881");
    let (mut allowed, mut refused, mut anonymous, mut routes) = (0u32, 0u32, 0u32, 0u32);
    for &(method, path, access, _) in tokenvault::api::ROUTES {
        let Access::Bearer(scope) = access else {
            continue;
        };
        routes += 1;
        for role in Role::ALL {
            // A fresh token per call so that DELETE has something to delete.
            let (_, body) = app.tokenize("default", &pan_for(rand_index()), None).await;
            let token = body["token"].as_str().unwrap().to_owned();
            let res = call(&app, method, path, Some(&role_jwt(&app, role)), &token).await;
            let status = res.status().as_u16();
            if role.scopes().contains(&scope) {
                allowed += 1;
                let exact = match (method, path) {
                    // (A dedupe-granted importer gets 200 for a card the tenant holds.)
                    ("POST", "/v1/tokens") if role == Role::Importer => Some(if status == 200 { 200 } else { 201 }),
                    ("POST", "/v1/tokens") => Some(201),
                    ("DELETE", _) => Some(204),
                    ("GET", "/v1/tokens/{token}") | ("PATCH", _) | ("POST", "/v1/detokenize") => Some(200),
                    // No PSP is configured in this vault; no such charge.
                    ("POST", p) if p.starts_with("/v1/charges") => Some(503),
                    ("GET", "/v1/charges/{id}") => Some(404),
                    // PostgreSQL is backed up with its own tools.
                    ("POST", "/v1/admin/backup") => Some(if on_postgres() { 501 } else { 200 }),
                    _ => None,
                };
                match exact {
                    Some(code) => assert_eq!(status, code, "{role:?} {method} {path}"),
                    None => {
                        assert_ne!(status, 401, "{role:?} {method} {path}");
                        if status == 403 {
                            let p = res.json::<Value>().await.unwrap();
                            assert_ne!(p["detail"], "scope not granted", "{role:?} {method} {path}");
                        }
                    }
                }
            } else {
                refused += 1;
                let p = assert_problem(res, 403, "forbidden").await;
                assert_eq!(p["detail"], "scope not granted", "{role:?} {method} {path}");
            }
            // No credential at all: 401.
            let res = call(&app, method, path, None, &token).await;
            assert_eq!(res.headers()["www-authenticate"], "Bearer error=\"invalid_token\"");
            assert_problem(res, 401, "unauthenticated").await;
            anonymous += 1;
        }
    }
    let bearer = tokenvault::api::ROUTES
        .iter()
        .filter(|(_, _, a, _)| matches!(a, Access::Bearer(_)))
        .count();
    assert!(allowed > 0 && refused > allowed);
    assert_eq!(
        app.metric("tokenvault_auth_failures_total{reason=\"scope\"}").await,
        f64::from(refused)
    );
    assert_eq!(
        app.metric("tokenvault_auth_failures_total{reason=\"missing\"}").await,
        f64::from(anonymous)
    );
    assert_eq!(anonymous as usize, bearer * Role::ALL.len());
    // The rest of the table: public operational routes answer anyone; the voice
    // connector takes HTTP Basic only (a valid bearer JWT is not a password).
    for &(method, path, access, _) in tokenvault::api::ROUTES {
        let res = match access {
            Access::Bearer(_) => continue,
            Access::Public => {
                assert_eq!(
                    call(&app, method, path, None, "none").await.status(),
                    200,
                    "{method} {path}"
                );
                routes += 1;
                continue;
            }
            Access::Basic => call(&app, method, path, None, "none").await,
        };
        // (The connector answers in the voice platforms' own error shape.)
        assert_eq!(res.status(), 401, "{method} {path}");
        let res = call(&app, method, path, Some(&role_jwt(&app, Role::Edge)), "none").await;
        assert_eq!(
            res.status(),
            401,
            "{method} {path}: a bearer JWT is not a connector password"
        );
        routes += 1;
    }
    // The matrix covers every route the server has.
    assert_eq!(routes as usize, tokenvault::api::ROUTES.len());
    assert!(routes >= 32, "{routes} routes");
    println!(
        "authz matrix: {routes} routes × {} roles: {allowed} allowed, {refused} refused by scope, {anonymous} anonymous",
        Role::ALL.len()
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
    for (method, path, _, _) in tokenvault::api::ROUTES
        .iter()
        .filter(|(_, p, _, _)| p.starts_with("/v1/"))
    {
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
