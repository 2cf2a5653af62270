//! The API contract, enforced both ways: openapi.yaml bounds every value (a lint over
//! the whole spec), and the server refuses a value one past each bound of every JSON
//! body, query and path parameter it declares (a walk over the spec, sent to a real
//! vault with a PSP simulator behind it).

use serde_json::{Value, json};
use tokenvault::api::{Access, ROUTES};
use tokenvault::dev::Role;

use crate::charges::{charge, vault_with_psp};

fn spec() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    serde_yaml_ng::from_str(&text).unwrap()
}

fn resolve<'a>(spec: &'a Value, v: &'a Value) -> &'a Value {
    match v["$ref"].as_str() {
        Some(r) => {
            let mut cur = spec;
            for part in r.trim_start_matches("#/").split('/') {
                cur = &cur[part];
            }
            resolve(spec, cur)
        }
        None => v,
    }
}

fn types(s: &Value) -> Vec<&str> {
    match &s["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    }
}

/// Every unbounded value in the spec, as "where: what" (empty when the spec is tight).
fn unbounded(spec: &Value, s: &Value, at: &str, out: &mut Vec<String>, depth: usize) {
    if depth > 12 {
        return;
    }
    let s = resolve(spec, s);
    for k in ["oneOf", "anyOf", "allOf"] {
        for x in s[k].as_array().into_iter().flatten() {
            unbounded(spec, x, at, out, depth + 1);
        }
    }
    let ts = types(s);
    let fixed = s.get("enum").is_some() || s.get("const").is_some();
    if ts.contains(&"string") && !fixed && s["format"] != "binary" && s.get("maxLength").is_none() {
        out.push(format!("{at}: a string without maxLength"));
    }
    if ts.contains(&"integer") {
        for k in ["format", "minimum", "maximum"] {
            if s.get(k).is_none() {
                out.push(format!("{at}: an integer without {k}"));
            }
        }
    }
    if ts.contains(&"array") && s.get("maxItems").is_none() {
        out.push(format!("{at}: an array without maxItems"));
    }
    for (k, v) in s["properties"].as_object().into_iter().flatten() {
        unbounded(spec, v, &format!("{at}.{k}"), out, depth + 1);
    }
    if s["items"].is_object() {
        unbounded(spec, &s["items"], &format!("{at}[]"), out, depth + 1);
    }
    if s["additionalProperties"].is_object() {
        unbounded(spec, &s["additionalProperties"], &format!("{at}{{}}"), out, depth + 1);
    }
}

#[test]
fn the_spec_bounds_every_value_and_declares_every_problem() {
    let spec = spec();
    assert!(
        spec["servers"][0]["url"].as_str().unwrap().starts_with("https://"),
        "the production server entry comes first and is https"
    );
    let mut gaps = Vec::new();
    let (mut operations, mut values) = (0, 0);
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            operations += 1;
            let at = format!("{method} {path}");
            let params = item["parameters"]
                .as_array()
                .into_iter()
                .chain(op["parameters"].as_array());
            for p in params.flatten() {
                let p = resolve(&spec, p);
                values += 1;
                unbounded(&spec, &p["schema"], &format!("{at} {}", p["name"]), &mut gaps, 0);
            }
            // The batch's items are validated one by one, each answered inside the 200
            // (the request's own bounds are its size and its item count).
            let body = &op["requestBody"]["content"]["application/json"]["schema"];
            if path != "/v1/tokens/batch" {
                values += 1;
                unbounded(&spec, body, &format!("{at} body"), &mut gaps, 0);
            }
            for (code, r) in op["responses"].as_object().unwrap() {
                let r = resolve(&spec, r);
                for (_, c) in r["content"].as_object().into_iter().flatten() {
                    values += 1;
                    unbounded(&spec, &c["schema"], &format!("{at} {code}"), &mut gaps, 0);
                }
                for (h, hv) in r["headers"].as_object().into_iter().flatten() {
                    values += 1;
                    unbounded(
                        &spec,
                        &resolve(&spec, hv)["schema"],
                        &format!("{at} {code} {h}"),
                        &mut gaps,
                        0,
                    );
                }
            }
            // The problems every operation can meet.
            let responses = op["responses"].as_object().unwrap();
            let mut needed = vec![];
            if op["security"].as_array().is_some_and(|s| !s.is_empty()) {
                needed.extend(["401", "403", "429"]);
            }
            if op.get("requestBody").is_some() {
                needed.extend(["413", "415", "422"]);
            }
            if path.contains('{') {
                needed.push("404");
            }
            if path.starts_with("/v1/") {
                needed.push("503");
            }
            for code in needed {
                if !responses.contains_key(code) {
                    gaps.push(format!("{at}: no {code} response"));
                }
            }
            if responses.contains_key("429") {
                let r = resolve(&spec, &responses["429"]);
                assert!(r["headers"].get("Retry-After").is_some(), "{at}: 429 names Retry-After");
            }
        }
    }
    assert!(
        operations >= 32 && values > 200,
        "{operations} operations, {values} values"
    );
    assert!(gaps.is_empty(), "{} gaps:\n{}", gaps.len(), gaps.join("\n"));
}

/// A value one past `s`'s bound: (what, value) for each bound it has.
fn past_bounds(s: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let ts = types(s);
    if ts.contains(&"string") {
        let digits = s["pattern"].as_str().is_some_and(|p| p.starts_with("^[0-9]"));
        let fill = |n: u64| -> Value {
            let c = if digits { "1" } else { "a" };
            json!(c.repeat(n as usize))
        };
        if let Some(n) = s["maxLength"].as_u64() {
            out.push((format!("maxLength {n} + 1"), fill(n + 1)));
        }
        if let Some(n) = s["minLength"].as_u64().filter(|n| *n > 0) {
            out.push((format!("minLength {n} - 1"), fill(n - 1)));
        }
    } else if ts.contains(&"integer") {
        if let Some(n) = s["maximum"].as_u64() {
            out.push((format!("maximum {n} + 1"), json!(n as u128 + 1)));
        }
        if let Some(n) = s["minimum"].as_i64() {
            out.push((format!("minimum {n} - 1"), json!(n - 1)));
        }
    }
    out
}

/// Every bounded leaf of a body schema: (JSON pointer, its schema), objects followed.
fn leaves<'a>(spec: &'a Value, s: &'a Value, at: String, out: &mut Vec<(String, &'a Value)>) {
    let s = resolve(spec, s);
    if let Some(props) = s["properties"].as_object() {
        for (k, v) in props {
            leaves(spec, v, format!("{at}/{k}"), out);
        }
    } else if !past_bounds(s).is_empty() {
        out.push((at, s));
    }
}

fn set(body: &mut Value, pointer: &str, v: Value) {
    let mut cur = body;
    let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    for (i, p) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            cur[*p] = v;
            return;
        }
        if !cur[*p].is_object() {
            cur[*p] = json!({});
        }
        cur = &mut cur[*p];
    }
}

#[tokio::test]
async fn the_server_refuses_a_value_one_past_every_bound() {
    let spec = spec();
    let (app, _psp) = vault_with_psp(&[]);
    app.watch("4111111111111111");
    let (_, body) = app.tokenize("default", "4111111111111111", None).await;
    let token = body["token"].as_str().unwrap().to_owned();
    let res = charge(
        &app,
        "psp",
        "default",
        Some("contract-charge"),
        &json!({"token": token, "amount": {"value": 1000, "currency": "EUR"}, "reference": "order-contract",
                "shopper_interaction": "moto", "capture": "manual"}),
    )
    .await;
    assert_eq!(res.status(), 201);
    let charge_id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    // A valid request per operation; each walked value replaces one field of it.
    let amount = json!({"value": 100, "currency": "EUR"});
    let base = |method: &str, path: &str| -> Option<Value> {
        Some(match (method, path) {
            ("POST", "/v1/tokens") => json!({"pan": "4111111111111111", "exp_month": 12, "exp_year": 2031}),
            ("PATCH", "/v1/tokens/{token}") => json!({"exp_month": 9, "exp_year": 2033}),
            ("POST", "/v1/detokenize") => json!({"token": token}),
            ("POST", "/v1/charges") => json!({"token": token, "amount": amount, "reference": "order-x",
                                              "shopper_interaction": "moto"}),
            ("POST", "/v1/charges/{id}/captures") => json!({"amount": amount}),
            ("POST", "/v1/charges/{id}/refunds") => json!({"amount": amount, "reason": "returned"}),
            ("POST", "/v1/admin/keys/rewrap") => json!({"batch": 10}),
            ("POST", "/v1/admin/keys/rotate-root") => json!({"key_label": "root-2"}),
            ("POST", "/v1/admin/audit/prune") => json!({"through_seq": 1, "hash": "00".repeat(32)}),
            ("POST", "/v1/admin/unseal") => json!({"share": "tvs1.x.y"}),
            ("POST", "/v1/admin/exports") => json!({"tenant": "default", "recipient_key": "k"}),
            _ => return None,
        })
    };
    let (mut walked, mut operations) = (0, 0);
    for &(method, path, access, _) in ROUTES {
        let Access::Bearer(scope) = access else { continue };
        let role = Role::ALL.into_iter().find(|r| r.scopes().contains(&scope)).unwrap();
        let mut claims = app.claims("edge", "default");
        let scopes: Vec<&str> = role.scopes().iter().map(|s| s.as_str()).collect();
        claims["sub"] = json!(role.sub());
        claims["scope"] = json!(scopes.join(" "));
        let jwt = app.sign(&claims, Some("dev-ed25519-1"));
        let op = &spec["paths"][path][method.to_lowercase()];
        let url = |path: &str| {
            app.url(
                &path
                    .replace("{token}", &token)
                    .replace("{id}", &charge_id)
                    .replace("{version}", "v1"),
            )
        };
        let send = |method: &str, url: String, body: Option<&Value>, query: Option<(&str, String)>| {
            let mut req = match method {
                "GET" => app.client.get(url),
                "DELETE" => app.client.delete(url),
                "PATCH" => app.client.patch(url),
                _ => app.client.post(url),
            }
            .bearer_auth(&jwt)
            .header("Idempotency-Key", format!("contract-{}", rand_key()));
            if let Some(b) = body {
                req = req.json(b);
            }
            if let Some((k, v)) = query {
                req = req.query(&[(k, v)]);
            }
            req.send()
        };
        let mut touched = false;
        // Query and path parameters.
        let params = spec["paths"][path]["parameters"]
            .as_array()
            .into_iter()
            .chain(op["parameters"].as_array());
        for p in params.flatten() {
            let p = resolve(&spec, p);
            let name = p["name"].as_str().unwrap();
            for (what, bad) in past_bounds(resolve(&spec, &p["schema"])) {
                let value = bad.as_str().map_or_else(|| bad.to_string(), str::to_owned);
                let res = match p["in"].as_str() {
                    Some("query") => {
                        let body = base(method, path);
                        send(method, url(path), body.as_ref(), Some((name, value)))
                            .await
                            .unwrap()
                    }
                    Some("path") => {
                        let body = base(method, path);
                        let u = app.url(
                            &path
                                .replace(&format!("{{{name}}}"), &value)
                                .replace("{token}", &token)
                                .replace("{id}", &charge_id)
                                .replace("{version}", "v1"),
                        );
                        send(method, u, body.as_ref(), None).await.unwrap()
                    }
                    _ => continue,
                };
                let status = res.status().as_u16();
                assert!(
                    matches!(status, 400 | 404 | 422),
                    "{method} {path} {name} ({what}): answered {status}"
                );
                walked += 1;
                touched = true;
            }
        }
        // JSON body fields.
        if let Some(valid) = base(method, path) {
            let schema = &op["requestBody"]["content"]["application/json"]["schema"];
            let mut fields = Vec::new();
            leaves(&spec, schema, String::new(), &mut fields);
            for (pointer, s) in fields {
                for (what, bad) in past_bounds(s) {
                    let mut body = valid.clone();
                    set(&mut body, &pointer, bad);
                    let res = send(method, url(path), Some(&body), None).await.unwrap();
                    let status = res.status().as_u16();
                    // A `token` that cannot be a token is simply not found (as in a path).
                    let refused = matches!(status, 400 | 422) || (status == 404 && pointer.ends_with("/token"));
                    assert!(refused, "{method} {path} {pointer} ({what}): answered {status}");
                    walked += 1;
                    touched = true;
                }
            }
        }
        operations += usize::from(touched);
    }
    println!("contract: {walked} values one past a bound, over {operations} operations, all refused");
    assert!(
        walked >= 40 && operations >= 12,
        "{walked} values over {operations} operations"
    );
}

fn rand_key() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed)
}
