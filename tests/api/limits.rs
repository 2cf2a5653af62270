//! Per-client rate limits: 429 with Retry-After, per client, counted in metrics.

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn detokenize_is_rate_limited_per_client_with_retry_after() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let args = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.to_str().unwrap(),
        "--rate-limits",
        "detokenize=3,tokenize=1000",
    ];
    let app = TestApp::start(&args, dir.clone());
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
