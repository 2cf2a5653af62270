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
use super::problem::ApiError;
use crate::auth::Principal;
use crate::config::Scope;

/// A scope an endpoint requires, as a type.
pub trait RequiredScope {
    const SCOPE: Scope;
}

macro_rules! scope_marker {
    ($name:ident, $scope:expr) => {
        pub struct $name;
        impl RequiredScope for $name {
            const SCOPE: Scope = $scope;
        }
    };
}

scope_marker!(TokensCreate, Scope::TokensCreate);
scope_marker!(TokensRead, Scope::TokensRead);
scope_marker!(TokensDelete, Scope::TokensDelete);
scope_marker!(TokensDetokenize, Scope::TokensDetokenize);
scope_marker!(KeysAdmin, Scope::KeysAdmin);
scope_marker!(ChargesCreate, Scope::ChargesCreate);
scope_marker!(ChargesRead, Scope::ChargesRead);

/// The authorized caller of an endpoint that requires scope `S`.
pub struct Caller<S> {
    pub principal: Principal,
    _scope: PhantomData<S>,
}

impl<S: RequiredScope> FromRequest for Caller<S> {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let Some(state) = req.app_data::<web::Data<AppState>>() else {
            return ready(Err(ApiError::Internal));
        };
        let header = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
        ready(match state.auth.authorize(header, S::SCOPE) {
            Ok(principal) => {
                req.extensions_mut().insert(principal.clone());
                Ok(Caller {
                    principal,
                    _scope: PhantomData,
                })
            }
            Err(e) => {
                state.metrics.auth_failures.with_label_values(&[e.reason()]).inc();
                tracing::warn!(reason = e.reason(), scope = S::SCOPE.as_str(), "request denied");
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
        let limit = req
            .app_data::<web::Data<AppState>>()
            .map(|s| s.max_body_bytes)
            .unwrap_or(crate::config::DEFAULT_MAX_BODY_BYTES);
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return Box::pin(ready(Err(ApiError::UnsupportedMediaType)));
        }
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
            serde_json::from_slice::<T>(&buf)
                .map(ApiJson)
                .map_err(|_| ApiError::Malformed)
        })
    }
}
