//! Prometheus metrics. Labels are fixed vocabularies (route patterns, outcome
//! names, reasons): never a raw path, token, tenant or anything from a card.

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Every metric the vault exports, registered in its own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub tokenize: IntCounterVec,
    pub reads: IntCounterVec,
    pub detokenize: IntCounterVec,
    pub delete: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub tokens_stored: IntGauge,
    pub key_ops: IntCounterVec,
    pub rewrapped: prometheus::IntCounter,
    pub expired: prometheus::IntCounter,
    pub retention_deleted: prometheus::IntCounter,
    pub voice_pay: IntCounterVec,
    pub unseal: IntCounterVec,
    pub sealed: IntGauge,
    pub store_damaged: IntGauge,
    pub store_unavailable: prometheus::IntCounter,
    pub store_reconnects: prometheus::IntCounter,
    pub charges: IntCounterVec,
    pub psp_duration: prometheus::HistogramVec,
    pub modifications: IntCounterVec,
    pub refusals: IntCounterVec,
    pub refunded: IntCounterVec,
    pub psp_errors: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub anomalies: IntCounterVec,
    pub enumeration: IntCounterVec,
    pub kek_wraps: prometheus::IntGaugeVec,
    pub kek_wrap_limit: IntGauge,
    /// 1 while `/readyz` would answer ready (refreshed at every scrape).
    pub ready: IntGauge,
    pub kek_active_age: IntGauge,
    /// 0: no cryptoperiod configured.
    pub kek_cryptoperiod: IntGauge,
    pub kek_records: prometheus::IntGaugeVec,
    pub audit_failures: prometheus::IntCounter,
}

/// Building a metric only fails on an invalid name or duplicate registration,
/// both fixed at compile time here; a failure is a programming error.
#[allow(clippy::expect_used)]
impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("tokenvault".into()), None).expect("valid prefix");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            registry.register(Box::new(c.clone())).expect("unique counter");
            c
        };
        let http_requests = counter(
            "http_requests_total",
            "HTTP requests by method, route pattern and status",
            &["method", "route", "status"],
        );
        let tokenize = counter("tokenize_total", "Tokenize outcomes", &["outcome"]);
        let reads = counter("token_reads_total", "Token metadata read outcomes", &["outcome"]);
        let detokenize = counter("detokenize_total", "Detokenize outcomes", &["outcome"]);
        let delete = counter("delete_total", "Token delete outcomes", &["outcome"]);
        let auth_failures = counter(
            "auth_failures_total",
            "Authentication and authorization failures",
            &["reason"],
        );
        let charges = counter("charges_total", "Charges by outcome", &["status"]);
        let rate_limited = counter("rate_limited_total", "Requests refused by a rate limit", &["class"]);
        let anomalies = counter(
            "detokenize_anomalies_total",
            "Clients flagged and throttled for detokenize volume far above their baseline",
            &["kind"],
        );
        let enumeration = counter(
            "enumeration_suspected_total",
            "Tokenize refused: many distinct cards behind one BIN and last four from one client (flagged, refused)",
            &["kind"],
        );
        let psp_errors = counter("psp_errors_total", "PSP calls without a verdict, by kind", &["kind"]);
        let psp_duration = prometheus::HistogramVec::new(
            HistogramOpts::new(
                "psp_request_duration_seconds",
                "PSP call latency by operation (authorise, capture, refund, cancel), including safe retries",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["operation"],
        )
        .expect("valid histogram");
        let modifications = counter(
            "charge_modifications_total",
            "Captures, refunds and cancels by operation and outcome (received, refused, error, pending, replayed, \
             rejected)",
            &["operation", "outcome"],
        );
        let refusals = counter(
            "charge_refusals_total",
            "Charges the PSP refused, by reason (a fixed set of the PSP's refusal reasons; anything else is `other`)",
            &["reason"],
        );
        let refunded = counter(
            "refunded_minor_units_total",
            "Refunded amounts the PSP acknowledged, in minor units, by ISO 4217 currency",
            &["currency"],
        );
        registry
            .register(Box::new(psp_duration.clone()))
            .expect("unique histogram");
        let key_ops = counter("key_operations_total", "Key management operations", &["operation"]);
        let unseal = counter(
            "unseal_attempts_total",
            "Unseal share submissions by outcome",
            &["outcome"],
        );
        let rewrapped = prometheus::IntCounter::new("rewrapped_total", "DEKs rewrapped under the active KEK")
            .expect("valid counter");
        registry.register(Box::new(rewrapped.clone())).expect("unique counter");
        let expired = prometheus::IntCounter::new(
            "tokens_expired_total",
            "Tokens deleted by the sweeper because their ttl/expires_at passed",
        )
        .expect("valid counter");
        registry.register(Box::new(expired.clone())).expect("unique counter");
        let voice_pay = IntCounterVec::new(
            Opts::new(
                "voice_pay_requests_total",
                "Voice-platform <Pay> connector requests by method (tokenize, charge, unknown) and outcome (ok or the error_code answered)",
            ),
            &["method", "outcome"],
        )
        .expect("valid counter");
        registry.register(Box::new(voice_pay.clone())).expect("unique counter");
        let retention_deleted = prometheus::IntCounter::new(
            "tokens_retention_deleted_total",
            "Cards deleted by the retention sweeper (unused for their tenant's retention period)",
        )
        .expect("valid counter");
        registry
            .register(Box::new(retention_deleted.clone()))
            .expect("unique counter");
        let sealed = IntGauge::new("sealed", "1 while the vault is sealed").expect("valid gauge");
        registry.register(Box::new(sealed.clone())).expect("unique gauge");
        let store_damaged = IntGauge::new(
            "store_damaged",
            "1 when the store was found damaged at start (acknowledged writes missing)",
        )
        .expect("valid gauge");
        registry
            .register(Box::new(store_damaged.clone()))
            .expect("unique gauge");
        let store_unavailable = prometheus::IntCounter::new(
            "store_unavailable_total",
            "Store calls answered \"unavailable\" (the database restarting, failing over, or out of connections)",
        )
        .expect("valid counter");
        registry
            .register(Box::new(store_unavailable.clone()))
            .expect("unique counter");
        let store_reconnects = prometheus::IntCounter::new(
            "store_reconnects_total",
            "Reconnections of the store's writer after its database connection was lost (restarts, failovers)",
        )
        .expect("valid counter");
        registry
            .register(Box::new(store_reconnects.clone()))
            .expect("unique counter");
        let http_duration = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency by route pattern").buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["method", "route"],
        )
        .expect("valid histogram");
        registry
            .register(Box::new(http_duration.clone()))
            .expect("unique histogram");
        let kek_wraps = prometheus::IntGaugeVec::new(
            Opts::new(
                "kek_wraps",
                "DEK wraps (AES-GCM encryptions with random nonces) counted per KEK version",
            ),
            &["version"],
        )
        .expect("valid gauge");
        registry.register(Box::new(kek_wraps.clone())).expect("unique gauge");
        let kek_wrap_limit = IntGauge::new(
            "kek_wrap_limit",
            "Wraps per KEK version before automatic rotation (random-nonce budget)",
        )
        .expect("valid gauge");
        registry
            .register(Box::new(kek_wrap_limit.clone()))
            .expect("unique gauge");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid gauge");
            registry.register(Box::new(g.clone())).expect("unique gauge");
            g
        };
        let ready = gauge(
            "ready",
            "1 while the vault is ready to serve (unsealed, store reachable and undamaged)",
        );
        let kek_active_age = gauge("kek_active_age_seconds", "Age of the active KEK version");
        let kek_cryptoperiod = gauge(
            "kek_cryptoperiod_seconds",
            "The configured KEK cryptoperiod (0: none): the active KEK rotates when older",
        );
        let kek_records = prometheus::IntGaugeVec::new(
            Opts::new(
                "kek_records",
                "Records whose DEK is wrapped under each KEK version that holds key material",
            ),
            &["version"],
        )
        .expect("valid gauge");
        registry.register(Box::new(kek_records.clone())).expect("unique gauge");
        let audit_failures = prometheus::IntCounter::new(
            "audit_append_failures_total",
            "Audit records that could not be made durable (the request that needed one failed closed)",
        )
        .expect("valid counter");
        registry
            .register(Box::new(audit_failures.clone()))
            .expect("unique counter");
        let tokens_stored = IntGauge::new("tokens_stored", "Tokens held by the vault").expect("valid gauge");
        registry
            .register(Box::new(tokens_stored.clone()))
            .expect("unique gauge");
        Metrics {
            registry,
            http_requests,
            http_duration,
            tokenize,
            reads,
            detokenize,
            delete,
            auth_failures,
            tokens_stored,
            key_ops,
            rewrapped,
            expired,
            retention_deleted,
            voice_pay,
            unseal,
            sealed,
            store_damaged,
            store_unavailable,
            store_reconnects,
            charges,
            psp_duration,
            modifications,
            refusals,
            refunded,
            psp_errors,
            rate_limited,
            anomalies,
            enumeration,
            kek_wraps,
            kek_wrap_limit,
            ready,
            kek_active_age,
            kek_cryptoperiod,
            kek_records,
            audit_failures,
        }
    }

    /// Registers a collector another component owns (the store's unit-of-work latency).
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        let _ = self.registry.register(collector);
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
