//! A card's life after tokenize, through the real server: the tenant listing CRM
//! and recurring billing page through (cards expiring before a month), retention
//! of unused cards, the configured token lifetime bounds, and charge listings.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::charges::{charge, charge_body, vault_with_psp};
use crate::helpers::*;

async fn list(app: &TestApp, role: &str, tenant: &str, query: &str) -> reqwest::Response {
    app.client
        .get(app.url(&format!("/v1/tokens{query}")))
        .bearer_auth(app.jwt(role, tenant))
        .send()
        .await
        .unwrap()
}

/// Every page of a listing, following `next_cursor`; the items in order.
async fn all_pages(app: &TestApp, tenant: &str, query: &str) -> (Vec<Value>, usize) {
    let (mut items, mut pages, mut cursor) = (Vec::new(), 0, None::<String>);
    loop {
        let q = match &cursor {
            None => format!("?{query}"),
            Some(c) => format!("?{query}&cursor={c}"),
        };
        let res = list(app, "crm", tenant, &q).await;
        assert_eq!(res.status(), 200);
        let page: Value = res.json().await.unwrap();
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return (items, pages),
        }
        assert!(pages < 1_000, "the listing never ends");
    }
}

/// 2 500 cards with expiries spread over 2027-01..2031-12, in a tenant beside
/// another: the expiring-cards listing pages through exactly the matching ones,
/// with no duplicate and no gap, never showing a PAN; the plain listing gives
/// every card; bad parameters are refused; only `tokens:read` may list.
#[tokio::test]
async fn the_expiring_cards_listing_pages_through_2500_tokens_without_duplicates_or_gaps() {
    let app = TestApp::spawn().await;
    let edge = app.jwt("edge", "billing");
    let month = |i: u64| (2027 + (i / 12) % 5, 1 + i % 12);
    let made: Vec<(String, (u64, u64), String)> = futures_util::stream::iter(0..2_500u64)
        .map(|i| {
            let (app, edge) = (&app, edge.clone());
            async move {
                let pan = pan_for(10_000 + i);
                let (y, m) = month(i);
                let res = app
                    .tokenize_as(&edge, json!({"pan": pan, "exp_month": m, "exp_year": y}))
                    .await;
                assert_eq!(res.status(), 201);
                let token = res.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
                (token, (y, m), pan)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let others = seed(&app, "other", 50_000, 20).await;

    // Cards expiring before 2029-07: 2027-01 .. 2029-06.
    let due: BTreeSet<String> = made
        .iter()
        .filter(|(_, ym, _)| *ym < (2029, 7))
        .map(|(t, _, _)| t.clone())
        .collect();
    assert!(due.len() > 1_000 && due.len() < 2_500);
    let (items, pages) = all_pages(&app, "billing", "expiring_before=2029-07&limit=100").await;
    let listed: Vec<String> = items.iter().map(|i| i["token"].as_str().unwrap().to_owned()).collect();
    let unique: BTreeSet<String> = listed.iter().cloned().collect();
    assert_eq!(unique.len(), listed.len(), "no token twice");
    assert_eq!(unique, due, "exactly the cards expiring before 2029-07");
    assert!(pages >= due.len() / 100, "paged: {pages} pages");
    let expected: BTreeMap<&str, (u64, u64)> = made.iter().map(|(t, ym, _)| (t.as_str(), *ym)).collect();
    for item in &items {
        let ym = (item["exp_year"].as_u64().unwrap(), item["exp_month"].as_u64().unwrap());
        assert_eq!(expected[item["token"].as_str().unwrap()], ym);
        assert!(item["last_used_at"].is_string(), "{item}");
        assert!(item.get("pan").is_none());
    }
    let text = serde_json::to_string(&items).unwrap();
    for (_, _, pan) in &made {
        assert!(!text.contains(pan.as_str()), "a PAN in a listing");
    }

    // Without a filter: every card of the tenant once, in token order, none of another's.
    let (everything, pages) = all_pages(&app, "billing", "limit=500").await;
    let tokens: Vec<&str> = everything.iter().map(|i| i["token"].as_str().unwrap()).collect();
    assert_eq!(tokens.len(), 2_500);
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "token order, no duplicate");
    assert!(pages >= 5);
    assert!(others.iter().all(|(t, _)| !tokens.contains(&t.as_str())));
    let (theirs, _) = all_pages(&app, "other", "").await;
    assert_eq!(theirs.len(), 20);

    // Bad parameters: a clear 422, and no page.
    for bad in [
        "?expiring_before=2029-13",
        "?expiring_before=2029-7",
        "?expiring_before=soon",
        "?limit=0",
        "?limit=501",
        "?limit=ten",
        "?cursor=***",
        "?cursor=AAAA",
        "?pan=4111111111111111",
        "?limit=5&limit=6",
    ] {
        assert_problem(list(&app, "crm", "billing", bad).await, 422, "invalid-field").await;
    }
    // The edge submits cards and the PSP connector charges them: neither lists.
    for role in ["edge", "psp"] {
        assert_problem(list(&app, role, "billing", "").await, 403, "forbidden").await;
    }
    // Each listing is audited with what it showed.
    assert!(
        app.audit_export()
            .iter()
            .any(|r| r["action"] == "token.list" && r["outcome"] == "ok" && r["tenant"] == "billing")
    );
    app.assert_logs_clean();
}

/// A tenant with a retention period loses a card nobody used for that long and
/// keeps one that is used (detokenized); a tenant without a period keeps all.
/// The deletion is audited and counted, and `last_used_at` follows the uses.
#[tokio::test]
async fn retention_deletes_an_unused_card_and_keeps_a_used_one() {
    let app = TestApp::spawn_with(&["--retention", "default=3s"]);
    let (status, unused) = app.tokenize("default", "4111111111111111", None).await;
    assert_eq!(status, 201);
    let (status, used) = app.tokenize("default", "5555555555554444", None).await;
    assert_eq!(status, 201);
    let (status, elsewhere) = app.tokenize("keeps", "4111111111111111", None).await;
    assert_eq!(status, 201);
    let unused = unused["token"].as_str().unwrap().to_owned();
    let used = used["token"].as_str().unwrap().to_owned();
    let elsewhere = elsewhere["token"].as_str().unwrap().to_owned();

    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    while app.metric("tokenvault_tokens_retention_deleted_total").await < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "retention never deleted the unused card"
        );
        assert_eq!(app.detokenize("default", &used).await.status(), 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Another sweep or two must pass with the used card still there.
    for _ in 0..8 {
        assert_eq!(app.detokenize("default", &used).await.status(), 200);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_problem(app.read("default", &unused).await, 404, "not-found").await;
    let res = app.read("default", &used).await;
    assert_eq!(res.status(), 200);
    let meta: Value = res.json().await.unwrap();
    let last = time::OffsetDateTime::parse(
        meta["last_used_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let age = (time::OffsetDateTime::now_utc() - last).whole_seconds();
    assert!(age <= 3, "last_used_at follows the uses: {age} s old");
    assert_eq!(app.read("keeps", &elsewhere).await.status(), 200, "no period: kept");
    assert_eq!(app.metric("tokenvault_tokens_retention_deleted_total").await, 1.0);
    let trail = app.audit_export();
    let deleted: Vec<&Value> = trail.iter().filter(|r| r["action"] == "token.retention").collect();
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    assert_eq!(deleted[0]["token"], unused.as_str());
    assert_eq!(deleted[0]["principal"], "system:retention");
    assert_eq!(deleted[0]["outcome"], "deleted");
    // Tokenizing the deleted card again gives a new token (its index entry went too).
    let (status, again) = app.tokenize("default", "4111111111111111", None).await;
    assert_eq!(status, 201);
    assert_ne!(again["token"], unused.as_str());
    app.assert_logs_clean();
}

/// A bad retention or lifetime configuration stops the vault before it serves.
#[test]
fn bad_lifecycle_settings_are_refused_at_start() {
    for args in [
        ["--retention", "default"],
        ["--retention", "default=0s"],
        ["--retention", "no tenant=3d"],
        ["--token-ttl-max", "401d"],
        ["--token-ttl-min", "0s"],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let (code, _, err) = run_cli(
            &["serve", "--data-dir", d, "--listen", "127.0.0.1:0", args[0], args[1]],
            &[],
        );
        assert_eq!(code, 2, "{args:?} was accepted: {err}");
        // clap refuses what does not parse, the settings' validation what is out of bounds.
        assert!(
            err.contains("configuration error")
                || err.contains(&format!("invalid value '{}' for '{}", args[1], args[0])),
            "{args:?}: {err}"
        );
    }
}

/// The lifetimes a tokenize may ask for are the configured ones.
#[tokio::test]
async fn token_lifetimes_are_held_to_the_configured_bounds() {
    let app = TestApp::spawn_with(&["--token-ttl-min", "1m", "--token-ttl-max", "1h"]);
    let edge = app.jwt("edge", "default");
    let card = |ttl: &str| json!({"pan": "4111111111111111", "exp_month": 12, "exp_year": 2031, "ttl": ttl});
    for bad in ["30s", "2h"] {
        let p = assert_problem(app.tokenize_as(&edge, card(bad)).await, 422, "invalid-field").await;
        assert!(p["detail"].as_str().unwrap().contains("1m to 1h"), "{p}");
    }
    let res = app.tokenize_as(&edge, card("59m")).await;
    assert_eq!(res.status(), 201);
}

/// A tenant's charges listed by token and by merchant reference, oldest first,
/// paged; another tenant sees none; only `charges:read` lists; bad queries 422.
#[tokio::test]
async fn charges_are_listed_by_token_and_by_reference() {
    let (app, _psp) = vault_with_psp(&[]);
    let (status, meta) = app.tokenize("default", "4111111111111111", None).await;
    assert_eq!(status, 201);
    let token = meta["token"].as_str().unwrap();
    let (status, other) = app.tokenize("default", "5555555555554444", None).await;
    assert_eq!(status, 201);
    let mut ids = Vec::new();
    for (i, value) in [1_000u64, 2_000, 3_000].into_iter().enumerate() {
        let res = charge(
            &app,
            "psp",
            "default",
            Some(&format!("k{i}")),
            &charge_body(token, value, "moto", None),
        )
        .await;
        assert_eq!(res.status(), 201);
        ids.push(res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
        tokio::time::sleep(Duration::from_millis(1_100)).await;
    }
    let res = charge(
        &app,
        "psp",
        "default",
        Some("k-other"),
        &charge_body(other["token"].as_str().unwrap(), 2_000, "moto", None),
    )
    .await;
    assert_eq!(res.status(), 201);
    let other_id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();

    let get = |role: &'static str, tenant: &'static str, q: String| {
        let app = &app;
        async move {
            app.client
                .get(app.url(&format!("/v1/charges?{q}")))
                .bearer_auth(app.jwt(role, tenant))
                .send()
                .await
                .unwrap()
        }
    };
    let page = |v: &Value| {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let res = get("psp", "default", format!("token={token}")).await;
    assert_eq!(res.status(), 200);
    let all: Value = res.json().await.unwrap();
    assert_eq!(page(&all), ids, "the token's charges, oldest first");
    assert_eq!(all["items"][0]["amount"]["value"], 1_000);
    assert!(all["next_cursor"].is_null());
    // Paged one at a time.
    let mut seen = Vec::new();
    let mut q = format!("token={token}&limit=1");
    loop {
        let v: Value = get("psp", "default", q.clone()).await.json().await.unwrap();
        seen.extend(page(&v));
        match v["next_cursor"].as_str() {
            Some(c) => q = format!("token={token}&limit=1&cursor={c}"),
            None => break,
        }
        assert!(seen.len() <= 4);
    }
    assert_eq!(seen, ids);
    // By reference: both cards' charges of 20.00 share "order-2000".
    let v: Value = get("psp", "default", "reference=order-2000".into())
        .await
        .json()
        .await
        .unwrap();
    let mut both = page(&v);
    both.sort();
    let mut want = vec![ids[1].clone(), other_id];
    want.sort();
    assert_eq!(both, want);
    // Another tenant: nothing.
    let v: Value = get("psp", "acme", format!("token={token}")).await.json().await.unwrap();
    assert_eq!(page(&v), Vec::<String>::new());
    // Roles without charges:read.
    for role in ["edge", "crm"] {
        assert_problem(get(role, "default", format!("token={token}")).await, 403, "forbidden").await;
    }
    // Bad queries.
    for bad in [
        String::new(),
        format!("token={token}&reference=order-2000"),
        "token=4111111111111111".into(),
        "reference=".into(),
        "reference=card%204111%201111%201111%201111".into(),
        format!("token={token}&limit=0"),
        format!("token={token}&cursor=%21%21"),
        format!("token={token}&cursor=AAAAAAAAAAA"),
    ] {
        assert_problem(get("psp", "default", bad).await, 422, "invalid-field").await;
    }
    assert!(
        app.audit_export()
            .iter()
            .any(|r| r["action"] == "charge.list" && r["outcome"] == "ok")
    );
}
