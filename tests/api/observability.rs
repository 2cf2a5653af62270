//! The gauges the dashboard and the alerts read, from a live vault.

use crate::helpers::*;

#[tokio::test]
async fn readiness_key_state_and_unit_latency_are_exported() {
    let app = TestApp::spawn_with(&["--cryptoperiod", "90d"]);
    for i in 0..3 {
        let (status, _) = app.tokenize("default", &pan_for(i), None).await;
        assert_eq!(status, 201);
    }
    assert_eq!(app.metric("tokenvault_ready").await, 1.0);
    assert_eq!(app.metric("tokenvault_sealed").await, 0.0);
    assert_eq!(app.metric("tokenvault_kek_records{version=\"1\"}").await, 3.0);
    assert_eq!(app.metric("tokenvault_kek_cryptoperiod_seconds").await, 90.0 * 86_400.0);
    let age = app.metric("tokenvault_kek_active_age_seconds").await;
    assert!((0.0..3_600.0).contains(&age), "{age}");
    assert!(app.metric("tokenvault_store_unit_seconds_count").await >= 3.0);
    assert_eq!(app.metric("tokenvault_store_unit_failures_total").await, 0.0);
    assert_eq!(app.metric("tokenvault_audit_append_failures_total").await, 0.0);
}
