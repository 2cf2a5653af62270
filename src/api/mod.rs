//! The HTTP API (v1) and the operational endpoints.
//!
//! A request passes the [`middleware`] (request id, access log, metrics by route
//! pattern), then the handler's extractors in order: [`extract::Caller`] (JWT +
//! registry; nothing is read before it passes), then [`extract::ApiJson`] (bounded
//! body), then the handler, which calls the [`crate::service::Vault`].

mod admin;
mod charges;
pub mod extract;
pub mod problem;
mod tokens;
mod voice;

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::{DefaultHeaders, Next};
use actix_web::{HttpMessage, HttpResponse, web};

use crate::auth::{Authenticator, Principal};
use crate::domain::scope::Scope;
use crate::metrics::Metrics;
use crate::service::Vault;
use problem::{ApiError, REQUEST_ID};

/// Fuzzing entry point: parses `data` as each request body the API accepts and
/// runs the same validation the handlers do. Must never panic, whatever the bytes.
#[doc(hidden)]
pub fn fuzz_request_bodies(data: &[u8]) {
    if let Ok(body) = serde_json::from_slice::<tokens::TokenizeBody>(data) {
        let _ = tokens::parse_tokenize(&body, &crate::config::Lifecycle::default());
    }
    if let Ok(body) = serde_json::from_slice::<charges::ChargeBody>(data) {
        let _ = charges::parse(body);
    }
    if let Ok(body) = serde_json::from_slice::<charges::RefundBody>(data) {
        let _ = charges::parse_refund_body(body);
    }
    let _ = serde_json::from_slice::<tokens::DetokenizeBody>(data);
    if let Ok(body) = serde_json::from_slice::<tokens::CardUpdateBody>(data) {
        let _ = tokens::parse_card_update(&body);
    }
}

/// Shared state of every worker.
pub struct AppState {
    pub vault: Vault,
    pub limiter: crate::limits::Limiter,
    pub anomaly: Option<crate::limits::AnomalyGuard>,
    /// Failed authentications per source: pre-auth blocking and audit aggregation.
    pub failures: crate::limits::FailureTracker,
    pub audit: crate::audit::AuditLog,
    /// HSM settings, for `rotate-root` (PKCS#11 provider only).
    pub pkcs11: Option<crate::config::Pkcs11Settings>,
    pub auth: std::sync::Arc<Authenticator>,
    pub metrics: Metrics,
    pub max_body_bytes: usize,
    /// HTTP Basic (Argon2) checks running at once, at most: a flood of wrong
    /// passwords queues here instead of taking every core.
    pub basic_checks: tokio::sync::Semaphore,
    /// One online backup at a time (its spool file lives until its download ends):
    /// a stolen operator credential cannot fill the disk with parallel copies.
    pub backups: std::sync::Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// Writes one aggregated audit record per source whose failure window ended.
    pub async fn flush_failure_summaries(&self, force: bool) {
        let summaries = self.failures.drain_ended(force);
        if summaries.is_empty() {
            return;
        }
        for s in &summaries {
            let reasons: Vec<String> = s.reasons.iter().map(|(r, n)| format!("{r}={n}")).collect();
            let event = crate::audit::AuditEvent {
                action: "auth.failure.summary",
                outcome: "aggregated".into(),
                source: Some(s.source.clone()),
                detail: Some(format!(
                    "{} failed requests in a {}s window ({}); the first of each reason was audited on its own",
                    s.total,
                    s.window_secs,
                    reasons.join(", ")
                )),
                ..Default::default()
            };
            if let Err(e) = self.audit.record(event).await {
                tracing::error!(error = %e, "cannot audit an auth-failure summary");
            }
        }
        tracing::warn!(sources = summaries.len(), "failed-authentication summaries audited");
    }

    /// Appends an audit record durably; if that fails the request fails (closed).
    pub async fn audit(&self, event: crate::audit::AuditEvent) -> Result<(), ApiError> {
        let recorded = self.audit.record(event).await;
        if recorded.is_err() {
            self.metrics.audit_failures.inc();
        }
        recorded.map_err(|e| {
            if e.is_unavailable() {
                // The store is down (a database restarting or failing over): retry later.
                tracing::warn!(error = %e, "audit trail unavailable");
                ApiError::StoreUnavailable
            } else {
                tracing::error!(error = %e, "audit trail write failed");
                ApiError::Internal
            }
        })
    }
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Unauthenticated (the operational routes).
    Public,
    /// A bearer JWT carrying this scope, which the client registry also grants.
    Bearer(Scope),
    /// HTTP Basic: a voice platform's connector (registry password hash, one tenant).
    Basic,
}

/// Every (method, path) the server routes, who may call it and its handler: the one
/// table the router is built from ([`configure_with`]) and that openapi.yaml (routes and
/// security), the 405 `Allow` header and the authorization matrix are checked against.
pub const ROUTES: &[(&str, &str, Access, Handler)] = &[
    (
        "POST",
        "/v1/tokens",
        Access::Bearer(Scope::TokensCreate),
        Handler(|r| r.to(tokens::tokenize)),
    ),
    (
        "GET",
        "/v1/tokens",
        Access::Bearer(Scope::TokensRead),
        Handler(|r| r.to(tokens::list)),
    ),
    (
        "POST",
        "/v1/tokens/batch",
        Access::Bearer(Scope::TokensCreate),
        Handler(|r| r.to(tokens::batch)),
    ),
    (
        "GET",
        "/v1/tokens/{token}",
        Access::Bearer(Scope::TokensRead),
        Handler(|r| r.to(tokens::read)),
    ),
    (
        "DELETE",
        "/v1/tokens/{token}",
        Access::Bearer(Scope::TokensDelete),
        Handler(|r| r.to(tokens::delete)),
    ),
    (
        "PATCH",
        "/v1/tokens/{token}",
        Access::Bearer(Scope::TokensUpdate),
        Handler(|r| r.to(tokens::update)),
    ),
    (
        "POST",
        "/v1/detokenize",
        Access::Bearer(Scope::TokensDetokenize),
        Handler(|r| r.to(tokens::detokenize)),
    ),
    (
        "POST",
        "/v1/connectors/voice-pay",
        Access::Basic,
        Handler(|r| r.to(voice::voice_pay)),
    ),
    (
        "POST",
        "/v1/charges",
        Access::Bearer(Scope::ChargesCreate),
        Handler(|r| r.to(charges::create)),
    ),
    (
        "GET",
        "/v1/charges",
        Access::Bearer(Scope::ChargesRead),
        Handler(|r| r.to(charges::list)),
    ),
    (
        "GET",
        "/v1/charges/{id}",
        Access::Bearer(Scope::ChargesRead),
        Handler(|r| r.to(charges::read)),
    ),
    (
        "POST",
        "/v1/charges/{id}/captures",
        Access::Bearer(Scope::ChargesCapture),
        Handler(|r| r.to(charges::capture)),
    ),
    (
        "POST",
        "/v1/charges/{id}/refunds",
        Access::Bearer(Scope::ChargesRefund),
        Handler(|r| r.to(charges::refund)),
    ),
    (
        "POST",
        "/v1/charges/{id}/cancel",
        Access::Bearer(Scope::ChargesCancel),
        Handler(|r| r.to(charges::cancel)),
    ),
    ("GET", "/healthz", Access::Public, Handler(|r| r.to(healthz))),
    ("GET", "/readyz", Access::Public, Handler(|r| r.to(readyz))),
    ("GET", "/metrics", Access::Public, Handler(|r| r.to(metrics))),
    (
        "GET",
        "/v1/admin/keys",
        Access::Bearer(Scope::KeysAdmin),
        Handler(|r| r.to(admin::status)),
    ),
    (
        "POST",
        "/v1/admin/keys/rotate",
        Access::Bearer(Scope::KeysAdmin),
        Handler(|r| r.to(admin::rotate)),
    ),
    (
        "POST",
        "/v1/admin/keys/rewrap",
        Access::Bearer(Scope::KeysAdmin),
        Handler(|r| r.to(admin::rewrap)),
    ),
    (
        "POST",
        "/v1/admin/keys/{version}/retire",
        Access::Bearer(Scope::KeysAdmin),
        Handler(|r| r.to(admin::retire)),
    ),
    (
        "POST",
        "/v1/admin/keys/{version}/destroy",
        Access::Bearer(Scope::KeysAdmin),
        Handler(|r| r.to(admin::destroy)),
    ),
    (
        "POST",
        "/v1/admin/keys/rotate-root",
        Access::Bearer(Scope::KeysAdmin),
        Handler(|r| r.to(admin::rotate_root)),
    ),
    (
        "POST",
        "/v1/admin/unseal",
        Access::Bearer(Scope::KeysAdmin),
        Handler(|r| r.to(admin::unseal)),
    ),
    (
        "POST",
        "/v1/admin/backup",
        Access::Bearer(Scope::VaultBackup),
        Handler(|r| r.to(admin::backup)),
    ),
    (
        "POST",
        "/v1/admin/exports",
        Access::Bearer(Scope::KeysAdmin),
        Handler(|r| r.to(admin::export_request)),
    ),
    (
        "GET",
        "/v1/admin/exports",
        Access::Bearer(Scope::KeysAdmin),
        Handler(|r| r.to(admin::export_list)),
    ),
    (
        "POST",
        "/v1/admin/exports/{id}/approve",
        Access::Bearer(Scope::KeysAdmin),
        Handler(|r| r.to(admin::export_approve)),
    ),
    (
        "GET",
        "/v1/admin/exports/{id}/file",
        Access::Bearer(Scope::KeysAdmin),
        Handler(|r| r.to(admin::export_fetch)),
    ),
    (
        "GET",
        "/v1/admin/audit/verify",
        Access::Bearer(Scope::AuditRead),
        Handler(|r| r.to(admin::audit_verify)),
    ),
    (
        "GET",
        "/v1/admin/audit/export",
        Access::Bearer(Scope::AuditRead),
        Handler(|r| r.to(admin::audit_export)),
    ),
    (
        "POST",
        "/v1/admin/audit/prune",
        Access::Bearer(Scope::KeysAdmin),
        Handler(|r| r.to(admin::audit_prune)),
    ),
];

/// What serves a route: its handler, given the method's `web::Route` to attach to.
#[derive(Clone, Copy)]
pub struct Handler(fn(actix_web::Route) -> actix_web::Route);

/// Registers one resource per path of [`ROUTES`] whose access `keep` accepts, in the
/// table's order (a literal path such as `/v1/tokens/batch` before `/v1/tokens/{token}`),
/// each with every method the table lists for it; other methods get a 405 problem.
fn register(cfg: &mut web::ServiceConfig, keep: impl Fn(Access) -> bool) {
    let mut done: Vec<&str> = Vec::new();
    for &(_, path, access, _) in ROUTES {
        if !keep(access) || done.contains(&path) {
            continue;
        }
        done.push(path);
        let mut resource = web::resource(path);
        for &(method, _, _, Handler(handler)) in ROUTES.iter().filter(|r| r.1 == path) {
            let method = match method {
                "GET" => Method::GET,
                "POST" => Method::POST,
                "PATCH" => Method::PATCH,
                "DELETE" => Method::DELETE,
                other => unreachable!("ROUTES lists an unsupported method {other}"),
            };
            resource = resource.route(handler(web::route().method(method)));
        }
        cfg.service(resource.default_service(web::to(method_not_allowed)));
    }
}

/// The operational routes alone, for a separate internal listener (`metrics_listen`).
pub fn configure_ops(cfg: &mut web::ServiceConfig) {
    register(cfg, |access| access == Access::Public);
    cfg.default_service(web::to(not_found));
}

/// Registers the API routes, and the operational ones unless they have their own
/// listener (`metrics_listen`). Wrong methods get a 405 problem, unknown paths a 404.
pub fn configure_with(cfg: &mut web::ServiceConfig, ops_here: bool) {
    register(cfg, |access| ops_here || access != Access::Public);
    cfg.default_service(web::to(not_found));
}

/// Registers every route on one listener.
pub fn configure(cfg: &mut web::ServiceConfig) {
    configure_with(cfg, true);
}

/// Headers on every response: nothing is cacheable, nothing is sniffed.
pub fn security_headers() -> DefaultHeaders {
    DefaultHeaders::new()
        .add((header::CACHE_CONTROL, "no-store"))
        .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .add((header::X_FRAME_OPTIONS, "DENY"))
        .add((
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; frame-ancestors 'none'",
        ))
}

/// Request id, access log and HTTP metrics. The route label is the matched
/// pattern (`/v1/tokens/{token}`), never the raw path, which can hold a token.
pub async fn middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        // Logged and audited: a bounded safe charset, and never anything shaped
        // like a card number (otherwise the server's own id is used).
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !crate::domain::card::contains_pan(v)
        })
        .map(str::to_owned)
        // A v4 UUID from the thread's CSPRNG: a request id is no secret, and it
        // need not cost a `getrandom` call per request.
        .unwrap_or_else(|| uuid::Builder::from_random_bytes(rand::random()).into_uuid().to_string());
    let start = Instant::now();
    // A fixed vocabulary: a client-chosen method must not mint metric series.
    let method = method_label(req.method());
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let span = tracing::info_span!("request", request_id = %request_id);
    let id = request_id.clone();
    let mut res = REQUEST_ID
        .scope(id, tracing::Instrument::instrument(next.call(req), span.clone()))
        .await?
        .map_into_boxed_body();
    // An extractor appended an audit record (e.g. an authentication failure):
    // it is durable before the response leaves; if it cannot be, the request fails.
    let pending = res.request().extensions_mut().remove::<extract::AuditPending>();
    if let (Some(extract::AuditPending(event)), Some(state)) = (pending, &state)
        && let Err(e) = state.audit.record(event).await
    {
        tracing::error!(error = %e, "audit trail flush failed");
        let (req, _) = res.into_parts();
        return Ok(ServiceResponse::new(
            req,
            actix_web::ResponseError::error_response(&ApiError::Internal),
        ));
    }
    let route = res.request().match_pattern().unwrap_or_else(|| "unmatched".to_owned());
    if res.status() == actix_web::http::StatusCode::METHOD_NOT_ALLOWED {
        // RFC 9110: a 405 lists the methods the resource supports.
        let allow: Vec<&str> = ROUTES
            .iter()
            .filter(|(_, p, _, _)| *p == route)
            .map(|(m, _, _, _)| *m)
            .collect();
        if let Ok(v) = HeaderValue::from_str(&allow.join(", ")) {
            res.headers_mut().insert(header::ALLOW, v);
        }
    }
    let status = res.status();
    let elapsed = start.elapsed();
    if let Some(state) = state {
        state
            .metrics
            .http_requests
            .with_label_values(&[method, &route, status.as_str()])
            .inc();
        state
            .metrics
            .http_duration
            .with_label_values(&[method, &route])
            .observe(elapsed.as_secs_f64());
    }
    let sub = res.request().extensions().get::<Principal>().map(|p| p.sub.clone());
    span.in_scope(|| {
        tracing::info!(
            method = %method,
            route = %route,
            status = status.as_u16(),
            latency_ms = elapsed.as_secs_f64() * 1e3,
            sub = sub.as_deref().unwrap_or("-"),
            "request"
        )
    });
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        res.headers_mut()
            .insert(header::HeaderName::from_static("x-request-id"), v);
    }
    Ok(res)
}

/// The metric label of an HTTP method: the standard ones, `other` for the rest.
pub fn method_label(m: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if state.vault.ready().await {
        Ok(HttpResponse::Ok().json(serde_json::json!({"status": "ready"})))
    } else {
        Err(ApiError::NotReady)
    }
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    state.metrics.tokens_stored.set(state.vault.tokens_stored());
    let a = state.vault.store_availability();
    let m = &state.metrics;
    m.store_unavailable
        .inc_by(a.unavailable.saturating_sub(m.store_unavailable.get()));
    m.store_reconnects
        .inc_by(a.reconnects.saturating_sub(m.store_reconnects.get()));
    state.metrics.sealed.set(i64::from(state.vault.keys().is_sealed()));
    state.metrics.ready.set(i64::from(state.vault.ready().await));
    if let Ok(status) = state.vault.key_status().await {
        let active = status.versions.iter().find(|v| Some(v.version) == status.active);
        m.kek_active_age
            .set(active.map_or(0, |v| i64::try_from(v.age_secs).unwrap_or(i64::MAX)));
        m.kek_cryptoperiod.set(
            status
                .cryptoperiod_secs
                .map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX)),
        );
        // Versions that still hold key material only: bounded as versions are destroyed.
        m.kek_records.reset();
        for v in status
            .versions
            .iter()
            .filter(|v| v.state != crate::keys::KeyState::Destroyed)
        {
            m.kek_records
                .with_label_values(&[&v.version.to_string()])
                .set(i64::try_from(v.records).unwrap_or(i64::MAX));
        }
    }
    if let Ok((counts, limit)) = state.vault.wrap_counts().await {
        state
            .metrics
            .kek_wrap_limit
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
        // Only versions that still hold key material: the series set stays bounded
        // as the deletion epoch destroys versions.
        state.metrics.kek_wraps.reset();
        for (version, n) in counts {
            state
                .metrics
                .kek_wraps
                .with_label_values(&[&version.to_string()])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}
