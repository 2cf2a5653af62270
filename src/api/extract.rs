//! Request extractors: [`Caller`] authenticates and authorizes before anything
//! else is read; [`ApiJson`] reads a bounded JSON body into a zeroizing buffer.

use std::marker::PhantomData;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};
use futures_util::StreamExt;
use futures_util::future::{LocalBoxFuture, Ready, ready};
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use super::AppState;
use super::problem::{ApiError, REQUEST_ID};
use crate::audit::AuditEvent;
use crate::auth::Principal;
pub use crate::domain::json::integral;
use crate::domain::scope::Scope;
use crate::limits::LimitClass;

/// A scope an endpoint requires, as a type.
pub trait RequiredScope {
    const SCOPE: Scope;
    /// The rate-limit budget the endpoint draws from.
    const CLASS: LimitClass;
}

macro_rules! scope_marker {
    ($name:ident, $scope:expr, $class:expr) => {
        pub struct $name;
        impl RequiredScope for $name {
            const SCOPE: Scope = $scope;
            const CLASS: LimitClass = $class;
        }
    };
}

scope_marker!(TokensCreate, Scope::TokensCreate, LimitClass::Tokenize);
scope_marker!(TokensRead, Scope::TokensRead, LimitClass::Other);
scope_marker!(TokensDelete, Scope::TokensDelete, LimitClass::Other);
scope_marker!(TokensUpdate, Scope::TokensUpdate, LimitClass::Tokenize);
scope_marker!(TokensDetokenize, Scope::TokensDetokenize, LimitClass::Detokenize);
scope_marker!(KeysAdmin, Scope::KeysAdmin, LimitClass::Other);
scope_marker!(ChargesCreate, Scope::ChargesCreate, LimitClass::Charges);
scope_marker!(ChargesRead, Scope::ChargesRead, LimitClass::Other);
scope_marker!(ChargesCapture, Scope::ChargesCapture, LimitClass::Charges);
scope_marker!(ChargesRefund, Scope::ChargesRefund, LimitClass::Charges);
scope_marker!(ChargesCancel, Scope::ChargesCancel, LimitClass::Charges);
scope_marker!(AuditRead, Scope::AuditRead, LimitClass::Other);
scope_marker!(VaultBackup, Scope::VaultBackup, LimitClass::Other);

/// The authorized caller of an endpoint that requires scope `S`.
pub struct Caller<S> {
    pub principal: Principal,
    /// The peer address, for the audit trail.
    pub source: Option<String>,
    _scope: PhantomData<S>,
}

impl<S> Caller<S> {
    /// An audit event by this caller.
    pub fn event(&self, action: &'static str, outcome: impl Into<String>, token: Option<String>) -> AuditEvent {
        AuditEvent {
            action,
            outcome: outcome.into(),
            principal: Some(self.principal.sub.clone()),
            tenant: Some(self.principal.tenant.to_string()),
            token,
            request_id: REQUEST_ID.try_with(Clone::clone).ok(),
            source: self.source.clone(),
            detail: None,
        }
    }
}

/// An audit record decided by an extractor (an authentication failure); the
/// request middleware appends it off the async workers and makes it durable
/// before the response leaves (or fails the request closed).
pub struct AuditPending(pub AuditEvent);

impl<S: RequiredScope> FromRequest for Caller<S> {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let Some(state) = req.app_data::<web::Data<AppState>>() else {
            return ready(Err(ApiError::Internal));
        };
        let source = req.peer_addr().map(|a| a.ip().to_string());
        let source_key = source.as_deref().unwrap_or("unknown");
        // A source that spent its failure budget is refused before any JWT is
        // parsed: a flood of junk credentials costs a hash lookup, not a signature
        // check, and writes nothing (it is counted in the source's summary record).
        // A credential that already verified (a cache hit) still passes, so a
        // flood from a shared address does not lock out a legitimate client.
        let header = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
        if !state.auth.known_good(header)
            && let Some(wait) = state.failures.blocked(source_key)
        {
            state.metrics.rate_limited.with_label_values(&["source"]).inc();
            return ready(Err(ApiError::RateLimited(wait)));
        }
        let peer = req.conn_data::<crate::tls::PeerSpki>().map(|p| p.0);
        ready(match state.auth.authorize(header, S::SCOPE, peer) {
            Ok(principal) => {
                if let Err(wait) = state.limiter.check(S::CLASS, &principal.sub) {
                    state.metrics.rate_limited.with_label_values(&[S::CLASS.as_str()]).inc();
                    tracing::warn!(class = S::CLASS.as_str(), sub = %principal.sub, "rate limited");
                    return ready(Err(ApiError::RateLimited(wait)));
                }
                req.extensions_mut().insert(principal.clone());
                Ok(Caller {
                    principal,
                    source,
                    _scope: PhantomData,
                })
            }
            Err(e) => {
                state.metrics.auth_failures.with_label_values(&[e.reason()]).inc();
                // Only the first failure of a source in a window is audited (and
                // logged) on its own; the rest become one aggregated record when the
                // window ends, so junk cannot fill the disk or the log.
                if state.failures.record(source_key, e.reason()) == crate::limits::FailureVerdict::Counted {
                    return ready(Err(ApiError::Auth(e)));
                }
                tracing::warn!(reason = e.reason(), scope = S::SCOPE.as_str(), "request denied");
                let action = if e.is_forbidden() {
                    "authz.failure"
                } else {
                    "auth.failure"
                };
                let event = AuditEvent {
                    action,
                    outcome: e.reason().to_owned(),
                    request_id: REQUEST_ID.try_with(Clone::clone).ok(),
                    source,
                    detail: Some(format!(
                        "scope {}; first such failure from this source in the window (later ones are aggregated)",
                        S::SCOPE.as_str()
                    )),
                    ..AuditEvent::default()
                };
                // Decided synchronously (so no other extractor's error can race
                // ahead of the 401/403); written and made durable by the middleware.
                req.extensions_mut().insert(AuditPending(event));
                Err(ApiError::Auth(e))
            }
        })
    }
}

/// A JSON body of type `T`: `application/json` only, at most the configured
/// size, unknown fields rejected (by `T`'s serde attributes). The raw bytes sit
/// in a zeroizing buffer; parse errors are mapped to a fixed problem and never
/// echoed, because serde's messages quote the offending input.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for ApiJson<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        read_json(req, payload, false, 0)
    }
}

/// Like [`ApiJson`], for bodies that carry card data or other secrets (a key
/// share): a body with any backslash escape is refused before parsing. serde_json
/// unescapes a string through a scratch buffer it never zeroizes, so
/// `"\u0034111…"` would leave a card number behind in freed memory; refusing
/// escapes keeps secret fields in the zeroizing body.
pub struct SecretJson<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for SecretJson<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let fut = read_json::<T>(req, payload, true, 0);
        Box::pin(async move { fut.await.map(|ApiJson(t)| SecretJson(t)) })
    }
}

/// A JSON body for a webhook whose sender may omit or misstate its content type
/// (a voice platform): any content type, escapes refused as for [`SecretJson`],
/// the size limit kept. Never fails the request: the handler gets the status it
/// would have answered (400, 413) and authenticates first.
pub struct LenientSecretJson<T>(pub Result<T, actix_web::http::StatusCode>);

impl<T: DeserializeOwned + 'static> FromRequest for LenientSecretJson<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let fut = read_body::<T>(req, payload, true, 0);
        Box::pin(async move {
            use actix_web::ResponseError;
            Ok(LenientSecretJson(
                fut.await.map(|ApiJson(t)| t).map_err(|e| e.status_code()),
            ))
        })
    }
}

/// The most a batch body may hold, whatever the single-request limit.
pub const BATCH_BODY_BYTES: usize = 1 << 20;

/// A [`SecretJson`] body of up to [`BATCH_BODY_BYTES`] (a batch of cards).
pub struct BatchJson<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for BatchJson<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let fut = read_json::<T>(req, payload, true, BATCH_BODY_BYTES);
        Box::pin(async move { fut.await.map(|ApiJson(t)| BatchJson(t)) })
    }
}

fn read_json<T: DeserializeOwned + 'static>(
    req: &HttpRequest,
    payload: &mut Payload,
    no_escapes: bool,
    at_least: usize,
) -> LocalBoxFuture<'static, Result<ApiJson<T>, ApiError>> {
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Box::pin(ready(Err(ApiError::UnsupportedMediaType)));
    }
    read_body(req, payload, no_escapes, at_least)
}

/// Reads a bounded body (whatever its content type) into a zeroizing buffer and
/// parses it as JSON.
fn read_body<T: DeserializeOwned + 'static>(
    req: &HttpRequest,
    payload: &mut Payload,
    no_escapes: bool,
    at_least: usize,
) -> LocalBoxFuture<'static, Result<ApiJson<T>, ApiError>> {
    let limit = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.max_body_bytes)
        .unwrap_or(crate::config::DEFAULT_MAX_BODY_BYTES)
        .max(at_least);
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Box::pin(ready(Err(ApiError::PayloadTooLarge)));
    }
    let mut payload = payload.take();
    Box::pin(async move {
        // Sized up front so the buffer never reallocates (a reallocation would
        // free an unzeroized copy).
        let mut buf = Zeroizing::new(Vec::with_capacity(declared.unwrap_or(limit).min(limit)));
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|_| ApiError::Malformed)?;
            if buf.len() + chunk.len() > limit {
                return Err(ApiError::PayloadTooLarge);
            }
            buf.extend_from_slice(&chunk);
        }
        if no_escapes && buf.contains(&b'\\') {
            return Err(ApiError::EscapesRefused);
        }
        serde_json::from_slice::<T>(&buf)
            .map(ApiJson)
            .map_err(|_| ApiError::Malformed)
    })
}
