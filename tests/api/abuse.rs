//! Junk traffic must not grow anything without bound: metric series, the audit
//! trail, the store, memory. And the audit trail's readers are scoped.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::*;

fn series_count(metrics: &str) -> usize {
    metrics.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count()
}

async fn metrics_text(app: &TestApp, url: &str) -> String {
    app.client.get(url).send().await.unwrap().text().await.unwrap()
}

/// Before the fix every client-chosen HTTP method became a label value: 300
/// requests with random methods made thousands of series. Now methods outside the
/// standard set are `other` and unmatched paths are `unmatched`.
#[tokio::test]
async fn odd_methods_and_paths_mint_no_metric_series() {
    let app = TestApp::spawn().await;
    let warm = app.tokenize("default", "4111111111111111", None).await;
    assert_eq!(warm.0, 201);
    // Every route once with a standard method, so its series exist.
    let _ = app
        .client
        .get(app.url("/v1/tokens/tok_AAAAAAAAAAAAAAAAAAAAAA"))
        .send()
        .await;
    let before = series_count(&metrics_text(&app, &app.url("/metrics")).await);
    let mut rounds = Vec::new();
    for round in 0..2u32 {
        for i in 0..300u32 {
            let method = reqwest::Method::from_bytes(format!("X{round}{i:04}ZZ").as_bytes()).unwrap();
            let path = match i % 3 {
                0 => "/v1/tokens".to_owned(),
                1 => format!("/v1/tokens/{round}{i:015}"),
                _ => format!("/random/{round}/{i}/path"),
            };
            let res = app.client.request(method, app.url(&path)).send().await.unwrap();
            assert!(res.status().is_client_error(), "{}", res.status());
            let res = app
                .client
                .get(app.url(&format!("/nope/{round}/{i}")))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 404);
        }
        rounds.push(series_count(&metrics_text(&app, &app.url("/metrics")).await));
    }
    let text = metrics_text(&app, &app.url("/metrics")).await;
    eprintln!(
        "metric series: {before} before, {} after 600 odd requests, {} after 600 more",
        rounds[0], rounds[1]
    );
    // The first round adds the fixed `other`/`unmatched` series (histogram buckets
    // included); 600 more odd requests add none.
    assert!(rounds[0] - before <= 150, "{before} → {} series:\n{text}", rounds[0]);
    assert_eq!(rounds[1], rounds[0], "series must not grow with odd requests:\n{text}");
    assert!(!text.contains("X0001ZZ"), "a client-chosen method must not be a label");
    assert!(!text.contains("/random/"), "a raw path must not be a label");
    assert!(text.contains("method=\"other\""));
}

/// `/metrics` (and health) can move to an internal listener; the API listener
/// then no longer serves them.
#[tokio::test]
async fn metrics_on_a_separate_internal_listener() {
    let app = TestApp::spawn_with(&["--metrics-listen", "127.0.0.1:0"]);
    let ops = app
        .logs()
        .lines()
        .find_map(|l| l.strip_prefix("tokenvault operations (metrics, health) on "))
        .map(|s| s.trim().to_owned());
    let ops = match ops {
        Some(o) => o,
        None => {
            // The line follows the listening line; give the log reader a moment.
            tokio::time::sleep(Duration::from_millis(300)).await;
            app.logs()
                .lines()
                .find_map(|l| l.strip_prefix("tokenvault operations (metrics, health) on "))
                .unwrap()
                .trim()
                .to_owned()
        }
    };
    let (status, _) = app.tokenize("default", "4111111111111111", None).await;
    assert_eq!(status, 201);
    let res = app.client.get(format!("{ops}/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.text().await.unwrap().contains("tokenvault_http_requests_total"));
    assert_eq!(
        app.client.get(format!("{ops}/readyz")).send().await.unwrap().status(),
        200
    );
    assert_problem(
        app.client.get(app.url("/metrics")).send().await.unwrap(),
        404,
        "not-found",
    )
    .await;
    assert_eq!(
        app.client
            .get(format!("{ops}/v1/tokens/x"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let m = e.metadata().unwrap();
            if m.is_dir() { dir_size(&e.path()) } else { m.len() }
        })
        .sum()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

/// Before the fix every 401 appended a durable audit record before any limit:
/// 86 000 junk requests wrote 86 000 records (77 MB) in 10 s. Now a source gets
/// a failure budget per window (then 429 before any JWT is parsed), only the first
/// failure of each reason is audited on its own, and the rest become one summary
/// record per source and window. The flood runs `TOKENVAULT_FLOOD_SECS` seconds
/// (15 in the suite; CI also runs it for 60).
#[tokio::test]
async fn unauthenticated_flood_leaves_store_and_memory_bounded() {
    let secs: u64 = std::env::var("TOKENVAULT_FLOOD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let window = 5;
    let app = TestApp::spawn_with(&[
        "--auth-failures-max",
        "1000",
        "--auth-failures-window",
        &format!("{window}s"),
    ]);
    // A legitimate client from the same address, verified before the flood.
    let edge = app.jwt("edge", "default");
    let ok = app
        .tokenize_as(
            &edge,
            json!({"pan": "4111111111111111", "exp_month": 12, "exp_year": 2031}),
        )
        .await;
    assert_eq!(ok.status(), 201);
    let records_before = app.audit_export().len();
    let sled = app.data_dir.join("sled");
    let disk_before = dir_size(&sled);
    let rss_before = rss_kib(app.pid());

    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut workers = Vec::new();
    for w in 0..16 {
        let client = app.client.clone();
        let url = app.url("/v1/tokens");
        workers.push(tokio::spawn(async move {
            let (mut n401, mut n429, mut other) = (0u64, 0u64, 0u64);
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                let bearer = if i.is_multiple_of(2) {
                    "x".to_owned()
                } else {
                    format!("junk.{w}.{i}")
                };
                match client
                    .post(&url)
                    .bearer_auth(bearer)
                    .header("content-type", "application/json")
                    .body("{}")
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 401 => n401 += 1,
                    Ok(r) if r.status() == 429 => n429 += 1,
                    _ => other += 1,
                }
            }
            (n401, n429, other)
        }));
    }
    // The legitimate client keeps working during the flood.
    let mut legit_ok = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let res = app
            .tokenize_as(
                &edge,
                json!({"pan": "5555555555554444", "exp_month": 12, "exp_year": 2031}),
            )
            .await;
        if res.status() == 201 {
            legit_ok += 1;
        }
    }
    let (mut n401, mut n429, mut other) = (0, 0, 0);
    for w in workers {
        let (a, b, c) = w.await.unwrap();
        n401 += a;
        n429 += b;
        other += c;
    }
    // Let the last window end and its summary be written.
    tokio::time::sleep(Duration::from_secs(window + 2)).await;
    let trail = app.audit_export();
    let added = trail.len() - records_before;
    let disk_after = dir_size(&sled);
    let rss_after = rss_kib(app.pid());
    let summaries: Vec<&Value> = trail.iter().filter(|r| r["action"] == "auth.failure.summary").collect();
    let total = n401 + n429 + other;
    eprintln!(
        "flood: {secs} s, {total} junk requests ({n401} × 401, {n429} × 429 refused before authentication, \
         {other} other); audit records added {added} ({} summaries); store {} KiB → {} KiB; RSS {} MiB → {} MiB; \
         legitimate client {legit_ok} × 201 during the flood",
        summaries.len(),
        disk_before / 1024,
        disk_after / 1024,
        rss_before / 1024,
        rss_after / 1024
    );
    assert!(total > 2_000, "the flood must be a flood: {total}");
    assert!(n429 > n401, "most junk is refused before authentication");
    assert_eq!(other, 0);
    assert!(
        legit_ok >= 1,
        "a verified client is not locked out by a flood from its address"
    );
    // Bounded: per window one record per failure reason plus one summary (and the
    // legitimate tokenizes), whatever the request count.
    let windows = secs / window + 2;
    assert!(
        (added as u64) <= windows * 3 + legit_ok + 10,
        "{added} audit records for {total} junk requests"
    );
    assert!(!summaries.is_empty());
    let counted: u64 = summaries
        .iter()
        .map(|r| {
            r["detail"]
                .as_str()
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert!(
        counted + 20 >= n401 + n429,
        "summaries count every failure: {counted} of {}",
        n401 + n429
    );
    assert!(
        disk_after < disk_before + 4 * 1024 * 1024,
        "store grew {disk_before} → {disk_after}"
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew {rss_before} → {rss_after} KiB"
    );
    // The trail still verifies.
    let (code, out, err) = run_cli(
        &[
            "audit",
            "--url",
            &app.base,
            "--token-file",
            app.token_file("officer", "default").to_str().unwrap(),
            "verify",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
}

/// `audit:read` is its own scope; a tenant-scoped reader sees only its tenant's
/// records, a global admin everything; the export streams from a cursor; and a
/// verified export can be pruned (retention) with the rest still verifying.
#[tokio::test]
async fn audit_readers_are_scoped_and_retention_follows_a_verified_export() {
    let app = TestApp::spawn().await;
    for (tenant, pan) in [("acme", "4111111111111111"), ("globex", "5555555555554444")] {
        assert_eq!(app.tokenize(tenant, pan, None).await.0, 201);
    }
    let export = |jwt: String, query: &'static str| {
        let client = app.client.clone();
        let url = app.url(&format!("/v1/admin/audit/export{query}"));
        async move {
            let res = client.get(url).bearer_auth(jwt).send().await.unwrap();
            let status = res.status().as_u16();
            let text = res.text().await.unwrap();
            let lines: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
            (status, lines)
        }
    };
    // An `audit:read` client of tenant acme without the global grant: acme only.
    let acme_reader = app.sign(
        &json!({"iss": "tokenvault-dev", "aud": "tokenvault", "sub": "dev-crm", "scope": "audit:read",
                "tenant": "acme", "iat": now(), "exp": now() + 600}),
        Some("dev-ed25519-1"),
    );
    // The dev CRM client is not granted audit:read by the registry: 403.
    let (status, _) = export(acme_reader, "").await;
    assert_eq!(status, 403);
    // keys:admin alone no longer reads the trail: audit:read is its own grant.
    let admin_only = app.sign(
        &json!({"iss": "tokenvault-dev", "aud": "tokenvault", "sub": "dev-officer", "scope": "keys:admin",
                "tenant": "acme", "iat": now(), "exp": now() + 600}),
        Some("dev-ed25519-1"),
    );
    let (status, _) = export(admin_only, "").await;
    assert_eq!(status, 403);
    // A tenant's reader (dev `siem`: audit:read, no global grant) sees only acme's
    // records; nothing without a tenant (auth failures, key operations) either.
    let (status, mine) = export(app.jwt("siem", "acme"), "").await;
    assert_eq!(status, 200);
    assert!(!mine.is_empty());
    assert!(mine.iter().all(|r| r["tenant"] == "acme"), "{mine:?}");
    // It cannot verify the whole trail (that spans tenants): 403.
    let res = app
        .client
        .get(app.url("/v1/admin/audit/verify"))
        .bearer_auth(app.jwt("siem", "acme"))
        .send()
        .await
        .unwrap();
    assert_problem(res, 403, "forbidden").await;
    // An officer (global admin) sees both tenants.
    let (status, all) = export(app.jwt("officer", "acme"), "").await;
    assert_eq!(status, 200);
    let tenants: std::collections::BTreeSet<&str> = all.iter().filter_map(|r| r["tenant"].as_str()).collect();
    assert!(tenants.contains("acme") && tenants.contains("globex"), "{tenants:?}");
    // The cursor: after_seq and limit.
    let (_, page) = export(app.jwt("officer", "acme"), "?after_seq=1&limit=1").await;
    assert_eq!(page.len(), 1);
    assert_eq!(page[0]["seq"], 2);

    // Retention: prune through record 2 with its chain hash (what a SIEM holds).
    let hash = all[1]["hash"].as_str().unwrap().to_owned();
    let officer = app.jwt("officer", "acme");
    let prune = |body: Value| {
        let client = app.client.clone();
        let url = app.url("/v1/admin/audit/prune");
        let officer = officer.clone();
        async move { client.post(url).bearer_auth(officer).json(&body).send().await.unwrap() }
    };
    let wrong = prune(json!({"through_seq": 2, "hash": "00".repeat(32)})).await;
    assert_problem(wrong, 409, "key-operation-refused").await;
    let siem_prune = app
        .client
        .post(app.url("/v1/admin/audit/prune"))
        .bearer_auth(app.jwt("siem", "acme"))
        .json(&json!({"through_seq": 2, "hash": hash}))
        .send()
        .await
        .unwrap();
    assert_problem(siem_prune, 403, "forbidden").await;
    let res = prune(json!({"through_seq": 2, "hash": hash})).await;
    let status = res.status();
    let body: Value = res.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["removed"], 2, "{body}");
    let (_, rest) = export(app.jwt("officer", "acme"), "").await;
    assert_eq!(rest[0]["seq"], 3, "records 1 and 2 are gone");
    let res = app
        .client
        .get(app.url("/v1/admin/audit/verify"))
        .bearer_auth(app.jwt("officer", "acme"))
        .send()
        .await
        .unwrap();
    let report: Value = res.json().await.unwrap();
    assert!(report["first_broken"].is_null(), "{report}");
    assert!(report["records"].as_u64().unwrap() >= 3);
    // Pruning the head is refused.
    let last = rest.last().unwrap()["seq"].as_u64().unwrap();
    let head = prune(json!({"through_seq": last + 5, "hash": hash})).await;
    assert_problem(head, 409, "key-operation-refused").await;
}
