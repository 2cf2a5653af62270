//! Per-client rate limits: 429 with Retry-After, per client, counted in metrics.

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn detokenize_is_rate_limited_per_client_with_retry_after() {
    let app = TestApp::spawn_with(&["--rate-limit", "detokenize=3", "--rate-limit", "tokenize=1000"]);
    let (_, tok) = app.tokenize("default", "4111111111111111", None).await;
    let token = tok["token"].as_str().unwrap();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let res = app.detokenize("default", token).await;
        if res.status() == 429 {
            let retry: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=2).contains(&retry), "Retry-After {retry}");
            assert_problem(res, 429, "rate-limited").await;
            statuses.push(429);
        } else {
            statuses.push(res.status().as_u16());
        }
    }
    assert_eq!(&statuses[..3], &[200, 200, 200], "{statuses:?}");
    assert!(statuses[3..].iter().all(|s| *s == 429), "{statuses:?}");
    // Another client, another budget: the edge keeps tokenizing.
    let res = app
        .tokenize_as(
            &app.jwt("edge", "default"),
            json!({"pan": "5555555555554444", "exp_month": 1, "exp_year": 2031}),
        )
        .await;
    assert_eq!(res.status(), 201);
    assert!(app.metric("tokenvault_rate_limited_total{class=\"detokenize\"}").await >= 3.0);
    // The bucket refills.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(app.detokenize("default", token).await.status(), 200);
}

/// A client far above its own usual detokenize volume is throttled; an audit
/// event and a metric flag it; its cooldown ends.
#[tokio::test]
async fn detokenize_anomaly_guard_flags_and_throttles() {
    let app = TestApp::spawn_with(&[
        "--anomaly-window",
        "400ms",
        "--anomaly-factor",
        "3",
        "--anomaly-floor",
        "5",
        "--anomaly-cooldown",
        "1500ms",
    ]);
    let (_, tok) = app.tokenize("default", "4012888888881881", None).await;
    let token = tok["token"].as_str().unwrap();
    // A usual volume: two per window.
    for _ in 0..3 {
        for _ in 0..2 {
            assert_eq!(app.detokenize("default", token).await.status(), 200);
        }
        tokio::time::sleep(std::time::Duration::from_millis(420)).await;
    }
    // A burst: flagged once it passes max(floor, 3 × baseline).
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(app.detokenize("default", token).await.status().as_u16());
    }
    let first_refused = statuses.iter().position(|s| *s == 429).expect("the burst is throttled");
    assert!((3..=7).contains(&first_refused), "{statuses:?}");
    assert!(statuses[first_refused..].iter().all(|s| *s == 429), "{statuses:?}");
    let res = app.detokenize("default", token).await;
    assert!(res.headers().contains_key("retry-after"));
    assert_problem(res, 429, "anomaly-throttled").await;
    assert_eq!(
        app.metric("tokenvault_detokenize_anomalies_total{kind=\"flagged\"}")
            .await,
        1.0
    );
    // Other clients are unaffected; the cooldown ends.
    assert_eq!(app.read("default", token).await.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
    assert_eq!(app.detokenize("default", token).await.status(), 200);
    assert!(
        app.audit_export()
            .iter()
            .any(|r| r["action"] == "anomaly.detokenize" && r.to_string().contains("dev-psp")),
        "audit event"
    );
}
