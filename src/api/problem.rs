//! RFC 9457 problem details. Every error response is `application/problem+json`
//! with a stable `type` URI per cause, a fixed `title`, the status, a safe
//! `detail` and the request id. Internal causes go to the log, never here.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::auth::AuthError;
use crate::domain::card::{ExpiryError, PanError};

/// Prefix of every problem `type`.
pub const TYPE_PREFIX: &str = "urn:tokenvault:problem:";

tokio::task_local! {
    /// The current request's id, set by the request middleware.
    pub static REQUEST_ID: String;
}

/// Everything that can go wrong in a request, as the client may see it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed request")]
    Malformed,
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("payload too large")]
    PayloadTooLarge,
    #[error("invalid card number")]
    InvalidPan(PanError),
    #[error("invalid expiry")]
    InvalidExpiry(ExpiryError),
    #[error("invalid field")]
    InvalidField(&'static str),
    /// As `InvalidField`, with a message built from configuration (bounds).
    #[error("invalid field")]
    InvalidValue(String),
    #[error("authentication failed")]
    Auth(AuthError),
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("token space exhausted")]
    TokenSpaceExhausted,
    #[error("key destroyed")]
    KeyDestroyed,
    #[error("key unavailable")]
    KeyUnavailable,
    #[error("integrity failure")]
    Integrity,
    #[error("record possibly lost")]
    RecordLost,
    #[error("store damaged")]
    StoreDamaged,
    #[error("store unavailable")]
    StoreUnavailable,
    #[error("not ready")]
    NotReady,
    #[error("sealed")]
    Sealed,
    #[error("idempotency key required")]
    IdempotencyKeyRequired,
    #[error("idempotency key reused")]
    IdempotencyMismatch,
    #[error("charge state conflict")]
    ChargeState(String),
    #[error("amount not allowed")]
    AmountRefused(String),
    #[error("invalid cvv")]
    InvalidCvv,
    #[error("psp not configured")]
    PspNotConfigured,
    #[error("rate limited")]
    RateLimited(std::time::Duration),
    #[error("anomaly throttled")]
    AnomalyThrottled(std::time::Duration),
    #[error("enumeration suspected")]
    EnumerationSuspected(std::time::Duration),
    #[error("escaped card field")]
    EscapesRefused,
    #[error("key operation refused")]
    KeyRefused(String),
    #[error("unseal refused")]
    Unseal(&'static str, StatusCode, &'static str),
    /// This vault's backend does not do this (the detail says what to use instead).
    #[error("not supported")]
    NotSupported(&'static str),
    #[error("internal error")]
    Internal,
}

/// Every problem code the API can return (kept in step with openapi.yaml by a test).
pub const PROBLEM_CODES: &[&str] = &[
    "malformed-request",
    "unsupported-media-type",
    "payload-too-large",
    "invalid-card-number",
    "invalid-expiry",
    "invalid-field",
    "unauthenticated",
    "forbidden",
    "not-found",
    "method-not-allowed",
    "token-space-exhausted",
    "key-destroyed",
    "key-unavailable",
    "integrity-failure",
    "store-damaged",
    "store-unavailable",
    "not-ready",
    "sealed",
    "idempotency-key-required",
    "idempotency-key-reused",
    "charge-state-conflict",
    "amount-not-allowed",
    "invalid-cvv",
    "psp-not-configured",
    "rate-limited",
    "anomaly-throttled",
    "enumeration-suspected",
    "key-operation-refused",
    "invalid-share",
    "duplicate-share",
    "wrong-shares",
    "not-sealed",
    "not-supported",
    "internal-error",
];

impl ApiError {
    /// The stable problem code (last segment of `type`).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Malformed | ApiError::EscapesRefused => "malformed-request",
            ApiError::UnsupportedMediaType => "unsupported-media-type",
            ApiError::PayloadTooLarge => "payload-too-large",
            ApiError::InvalidPan(_) => "invalid-card-number",
            ApiError::InvalidExpiry(_) => "invalid-expiry",
            ApiError::InvalidField(_) | ApiError::InvalidValue(_) => "invalid-field",
            ApiError::Auth(e) if e.is_forbidden() => "forbidden",
            ApiError::Auth(_) => "unauthenticated",
            ApiError::NotFound => "not-found",
            ApiError::MethodNotAllowed => "method-not-allowed",
            ApiError::TokenSpaceExhausted => "token-space-exhausted",
            ApiError::KeyDestroyed => "key-destroyed",
            ApiError::KeyUnavailable => "key-unavailable",
            ApiError::Integrity | ApiError::RecordLost => "integrity-failure",
            ApiError::StoreDamaged => "store-damaged",
            ApiError::StoreUnavailable => "store-unavailable",
            ApiError::NotReady => "not-ready",
            ApiError::Sealed => "sealed",
            ApiError::IdempotencyKeyRequired => "idempotency-key-required",
            ApiError::IdempotencyMismatch => "idempotency-key-reused",
            ApiError::ChargeState(_) => "charge-state-conflict",
            ApiError::AmountRefused(_) => "amount-not-allowed",
            ApiError::InvalidCvv => "invalid-cvv",
            ApiError::PspNotConfigured => "psp-not-configured",
            ApiError::RateLimited(_) => "rate-limited",
            ApiError::AnomalyThrottled(_) => "anomaly-throttled",
            ApiError::EnumerationSuspected(_) => "enumeration-suspected",
            ApiError::KeyRefused(_) => "key-operation-refused",
            ApiError::Unseal(code, _, _) => code,
            ApiError::NotSupported(_) => "not-supported",
            ApiError::Internal => "internal-error",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            ApiError::Malformed | ApiError::EscapesRefused => "The request body is not valid JSON for this endpoint",
            ApiError::UnsupportedMediaType => "The request body must be application/json",
            ApiError::PayloadTooLarge => "The request body is too large",
            ApiError::InvalidPan(_) => "The card number is not valid",
            ApiError::InvalidExpiry(_) => "The expiry date is not valid",
            ApiError::InvalidField(_) | ApiError::InvalidValue(_) => "A field is not valid",
            ApiError::Auth(e) if e.is_forbidden() => "The caller is not allowed to do this",
            ApiError::Auth(_) => "Authentication required",
            ApiError::NotFound => "Not found",
            ApiError::MethodNotAllowed => "Method not allowed",
            ApiError::TokenSpaceExhausted => "No token is left in this format for this card's BIN and last four",
            ApiError::KeyDestroyed => "The key protecting this record has been destroyed",
            ApiError::KeyUnavailable => "The key protecting this record is not available",
            ApiError::Integrity => "The stored record failed its integrity check",
            ApiError::RecordLost => "The store lost records, and this token may be one of them",
            ApiError::StoreDamaged => "The store is damaged: new cards and charges are refused until it is restored",
            ApiError::StoreUnavailable => "The store cannot be reached right now: retry shortly",
            ApiError::NotReady => "The vault is not ready",
            ApiError::Sealed => "The vault is sealed: custodians must unseal it",
            ApiError::IdempotencyKeyRequired => "An Idempotency-Key header is required",
            ApiError::IdempotencyMismatch => "This Idempotency-Key was already used with a different request",
            ApiError::ChargeState(_) => "The charge's state does not allow this",
            ApiError::AmountRefused(_) => "The amount does not fit this charge",
            ApiError::InvalidCvv => "The CVV is not valid",
            ApiError::PspNotConfigured => "No payment service provider is configured",
            ApiError::RateLimited(_) => "Too many requests from this client",
            ApiError::AnomalyThrottled(_) => "Detokenize volume far above this client's usual; throttled",
            ApiError::EnumerationSuspected(_) => {
                "Too many distinct cards behind one BIN and last four from this client; tokenize throttled"
            }
            ApiError::KeyRefused(_) => "The key operation was refused",
            ApiError::Unseal(_, _, title) => title,
            ApiError::NotSupported(_) => "This vault's storage backend does not support this operation",
            ApiError::Internal => "Internal error",
        }
    }

    /// Safe, value-free detail for the client.
    fn detail(&self) -> Option<String> {
        match self {
            ApiError::InvalidPan(e) => Some(e.to_string()),
            ApiError::InvalidExpiry(e) => Some(e.to_string()),
            ApiError::InvalidField(what) => Some((*what).to_owned()),
            ApiError::InvalidValue(what) => Some(what.clone()),
            ApiError::Malformed => Some("the body must be a JSON object with exactly the documented fields".into()),
            // An unauthenticated caller learns nothing about why its credential failed
            // (the reason is in the log, the metric and the audit trail).
            ApiError::Auth(e) if !e.is_forbidden() => Some("the bearer token is missing or not valid".into()),
            ApiError::Auth(e) => Some(e.to_string()),
            ApiError::EscapesRefused => {
                Some("card fields must be plain JSON strings without backslash escapes (send UTF-8 as is)".into())
            }
            ApiError::TokenSpaceExhausted => Some("use another token format, such as opaque".into()),
            ApiError::InvalidCvv => Some("cvv must be 3 ASCII digits (4 for American Express)".into()),
            ApiError::IdempotencyKeyRequired => {
                Some("send a unique Idempotency-Key header (1-255 visible ASCII characters) per charge".into())
            }
            ApiError::RecordLost | ApiError::StoreDamaged => Some(
                "the vault found its store damaged at start; an operator must restore it from backup \
                 (see SECURITY.md, raw-file corruption)"
                    .into(),
            ),
            // Key-operation refusals name versions and record counts: no secrets.
            ApiError::KeyRefused(why) => Some(why.clone()),
            ApiError::NotSupported(what) => Some((*what).to_owned()),
            // States and amounts only.
            ApiError::ChargeState(why) | ApiError::AmountRefused(why) => Some(why.clone()),
            _ => None,
        }
    }
}

impl From<crate::service::VaultError> for ApiError {
    /// Maps a service error to a client problem; internal detail goes to the log only.
    fn from(e: crate::service::VaultError) -> ApiError {
        use crate::service::VaultError;
        match e {
            VaultError::NotFound => ApiError::NotFound,
            VaultError::TokenSpaceExhausted => ApiError::TokenSpaceExhausted,
            VaultError::KeyDestroyed => ApiError::KeyDestroyed,
            VaultError::Sealed => ApiError::Sealed,
            VaultError::KeyRefused(why) => ApiError::KeyRefused(why),
            VaultError::PspNotConfigured => ApiError::PspNotConfigured,
            VaultError::IdempotencyMismatch => ApiError::IdempotencyMismatch,
            VaultError::ChargeState(why) => ApiError::ChargeState(why),
            VaultError::AmountRefused(why) => ApiError::AmountRefused(why),
            VaultError::RecordLost => {
                tracing::error!("token not found in a damaged store: possibly lost");
                ApiError::RecordLost
            }
            VaultError::StoreDamaged => ApiError::StoreDamaged,
            VaultError::EnumerationSuspected { wait, .. } => ApiError::EnumerationSuspected(wait),
            VaultError::KeyUnavailable => {
                tracing::error!("record key version unavailable");
                ApiError::KeyUnavailable
            }
            e if e.is_integrity() => {
                tracing::error!("record failed its integrity check");
                ApiError::Integrity
            }
            e if e.is_unavailable() => {
                tracing::warn!(error = %e, "store unavailable");
                ApiError::StoreUnavailable
            }
            // Integrity failures were taken above; the guard keeps the match exhaustive.
            VaultError::Integrity | VaultError::Store(_) => {
                tracing::error!(error = %e, "store error");
                ApiError::Internal
            }
            VaultError::Keystore(e) => {
                tracing::error!(error = %e, "keystore error");
                ApiError::Internal
            }
            VaultError::Task => {
                tracing::error!("blocking task failed");
                ApiError::Internal
            }
        }
    }
}

impl From<crate::keys::manager::UnsealError> for ApiError {
    fn from(e: crate::keys::manager::UnsealError) -> ApiError {
        use crate::keys::manager::UnsealError;
        match e {
            UnsealError::Malformed => ApiError::Unseal(
                "invalid-share",
                StatusCode::UNPROCESSABLE_ENTITY,
                "Not a valid key share",
            ),
            UnsealError::Duplicate => ApiError::Unseal(
                "duplicate-share",
                StatusCode::CONFLICT,
                "This share was already submitted",
            ),
            UnsealError::WrongShares => ApiError::Unseal(
                "wrong-shares",
                StatusCode::UNPROCESSABLE_ENTITY,
                "The shares do not rebuild the root key; all submitted shares were discarded",
            ),
            UnsealError::NotSealed | UnsealError::NotShamir => ApiError::Unseal(
                "not-sealed",
                StatusCode::CONFLICT,
                "The vault is not waiting for key shares",
            ),
            UnsealError::Keystore(crate::keys::keystore::KeystoreError::Refused(why)) => {
                tracing::error!(reason = %why, "unseal refused");
                ApiError::KeyRefused(why)
            }
            UnsealError::Keystore(e) => {
                tracing::error!(error = %e, "keystore error during unseal");
                ApiError::Internal
            }
        }
    }
}

#[derive(Serialize)]
pub struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
}

impl ApiError {
    /// The RFC 9457 body of this error (also used inline, for one item of a batch).
    pub fn problem(&self) -> Problem<'_> {
        Problem {
            kind: format!("{TYPE_PREFIX}{}", self.code()),
            title: self.title(),
            status: self.status_code().as_u16(),
            detail: self.detail(),
            request_id: None,
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Malformed | ApiError::EscapesRefused => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::InvalidPan(_)
            | ApiError::InvalidExpiry(_)
            | ApiError::InvalidField(_)
            | ApiError::InvalidValue(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Auth(e) if e.is_forbidden() => StatusCode::FORBIDDEN,
            ApiError::Auth(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TokenSpaceExhausted
            | ApiError::NotReady
            | ApiError::Sealed
            | ApiError::PspNotConfigured
            | ApiError::StoreDamaged
            | ApiError::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::IdempotencyKeyRequired => StatusCode::BAD_REQUEST,
            ApiError::RateLimited(_) | ApiError::AnomalyThrottled(_) | ApiError::EnumerationSuspected(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::IdempotencyMismatch | ApiError::InvalidCvv | ApiError::AmountRefused(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::KeyRefused(_) | ApiError::ChargeState(_) => StatusCode::CONFLICT,
            ApiError::Unseal(_, status, _) => *status,
            ApiError::KeyDestroyed => StatusCode::GONE,
            ApiError::NotSupported(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::KeyUnavailable | ApiError::Integrity | ApiError::RecordLost | ApiError::Internal => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let body = Problem {
            request_id: REQUEST_ID.try_with(Clone::clone).ok(),
            ..self.problem()
        };
        let mut res = HttpResponse::build(status);
        res.insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        ));
        if let ApiError::RateLimited(wait) | ApiError::AnomalyThrottled(wait) | ApiError::EnumerationSuspected(wait) =
            self
        {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            res.insert_header((header::RETRY_AFTER, secs.max(1).to_string()));
        }
        if let ApiError::StoreUnavailable = self {
            res.insert_header((header::RETRY_AFTER, HeaderValue::from_static("1")));
        }
        if let ApiError::Auth(e) = self
            && !e.is_forbidden()
        {
            res.insert_header((
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            ));
        }
        res.body(serde_json::to_vec(&body).unwrap_or_default())
    }
}
