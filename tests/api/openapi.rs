//! openapi.yaml and the server stay in step: the same routes, the same scopes,
//! the same problem codes, and live responses carry exactly the documented fields.

use std::collections::BTreeSet;
use tokenvault::api::Access;

use serde_json::Value;

use crate::helpers::*;

fn spec() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    serde_yaml_ng::from_str(&text).unwrap()
}

fn schema_fields(spec: &Value, name: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let s = &spec["components"]["schemas"][name];
    let props = s["properties"].as_object().unwrap().keys().cloned().collect();
    let required = s["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    (props, required)
}

#[test]
fn routes_and_scopes_match_the_server() {
    let spec = spec();
    assert_eq!(spec["openapi"], "3.1.0");
    let mut documented = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            documented.insert((method.to_uppercase(), path.clone()));
            let scopes: Vec<&str> = op["security"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|s| s["bearer"].as_array().into_iter().flatten())
                .map(|v| v.as_str().unwrap())
                .collect();
            // The scopes come from the server's own route table.
            let access = tokenvault::api::ROUTES
                .iter()
                .find(|(m, p, _, _)| m.eq_ignore_ascii_case(method) && p == path)
                .map(|(_, _, a, _)| *a);
            let expected: Vec<&str> = match access {
                Some(Access::Bearer(scope)) => vec![scope.as_str()],
                _ => vec![],
            };
            if access == Some(Access::Basic) {
                assert!(
                    op["security"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|s| s.get("connectorBasic").is_some()),
                    "{method} {path}: HTTP Basic"
                );
            }
            assert_eq!(scopes, expected, "{method} {path}");
        }
    }
    let served: BTreeSet<(String, String)> = tokenvault::api::ROUTES
        .iter()
        .map(|(m, p, _, _)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served);
}

#[test]
fn problem_codes_match_the_server() {
    let spec = spec();
    let documented: BTreeSet<String> = spec["components"]["schemas"]["Problem"]["properties"]["type"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap()
                .trim_start_matches(tokenvault::api::problem::TYPE_PREFIX)
                .to_owned()
        })
        .collect();
    let served: BTreeSet<String> = tokenvault::api::problem::PROBLEM_CODES
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(documented, served);
}

#[tokio::test]
async fn live_responses_have_exactly_the_documented_fields() {
    let spec = spec();
    let app = TestApp::spawn().await;
    let (status, meta) = app.tokenize("default", "4111111111111111", None).await;
    assert_eq!(status, 201);
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<BTreeSet<_>>();
    let (props, required) = schema_fields(&spec, "TokenMetadata");
    // The fingerprint is shown only to callers granted tokens:dedupe.
    let mut without_fp = props.clone();
    without_fp.remove("fingerprint");
    // `expires_at` only for a token given a lifetime, `last_used_at` only in
    // reads and listings (both checked below).
    let mut props = props;
    props.remove("expires_at");
    without_fp.remove("expires_at");
    props.remove("last_used_at");
    without_fp.remove("last_used_at");
    assert_eq!(keys(&meta), without_fp);
    assert_eq!(required, without_fp);
    let timed: Value = app
        .tokenize_as(
            &app.jwt("edge", "default"),
            serde_json::json!({"pan": "4012888888881881", "exp_month": 6, "exp_year": 2032, "ttl": "1h"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let mut with_expiry = without_fp.clone();
    with_expiry.insert("expires_at".to_owned());
    assert_eq!(keys(&timed), with_expiry);
    let (_, deduped) = app.tokenize_by("importer", "default", "5555555555554444", None).await;
    assert_eq!(keys(&deduped), props);
    let token = meta["token"].as_str().unwrap();
    let read: Value = app.read("default", token).await.json().await.unwrap();
    let mut in_reads = without_fp.clone();
    in_reads.insert("last_used_at".to_owned());
    assert_eq!(keys(&read), in_reads);
    let listed: Value = app
        .client
        .get(app.url("/v1/tokens"))
        .bearer_auth(app.jwt("crm", "default"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(keys(&listed), ["items", "next_cursor"].map(str::to_owned).into());
    let item = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["token"] == token)
        .unwrap();
    assert_eq!(keys(item), in_reads);
    let revealed: Value = app.detokenize("default", token).await.json().await.unwrap();
    assert_eq!(keys(&revealed), schema_fields(&spec, "RevealedCard").0);
    let problem: Value = app
        .read("default", "tok_AAAAAAAAAAAAAAAAAAAAAA")
        .await
        .json()
        .await
        .unwrap();
    let (pprops, prequired) = schema_fields(&spec, "Problem");
    assert!(prequired.is_subset(&keys(&problem)));
    assert!(keys(&problem).is_subset(&pprops));
    let brands: BTreeSet<&str> = spec["components"]["schemas"]["TokenMetadata"]["properties"]["brand"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(brands.contains(meta["brand"].as_str().unwrap()));
}
