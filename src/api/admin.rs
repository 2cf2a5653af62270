//! The officers' admin API (`/v1/admin/…`, scope `keys:admin`): what the
//! `tokenvault keys` CLI drives while the vault keeps serving.

use actix_web::{HttpResponse, web};
use serde::Deserialize;

use super::AppState;
use super::extract::{ApiJson, Caller, KeysAdmin};
use super::problem::ApiError;
use crate::service::DestroyOutcome;

/// Largest rewrap batch one request may ask for.
const MAX_BATCH: usize = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewrapBody {
    #[serde(default)]
    batch: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnsealBody {
    share: secrecy::SecretString,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateRootBody {
    key_label: String,
}

/// Accepts `v3` or `3`.
fn parse_version(s: &str) -> Result<u32, ApiError> {
    s.strip_prefix('v')
        .unwrap_or(s)
        .parse::<u32>()
        .ok()
        .filter(|v| *v > 0)
        .ok_or(ApiError::NotFound)
}

/// GET /v1/admin/keys
pub async fn status(state: web::Data<AppState>, _caller: Caller<KeysAdmin>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.vault.key_status().await?))
}

/// POST /v1/admin/keys/rotate
pub async fn rotate(state: web::Data<AppState>, caller: Caller<KeysAdmin>) -> Result<HttpResponse, ApiError> {
    let version = state.vault.rotate_key(&caller.principal.sub).await?;
    tracing::warn!(version, officer = %caller.principal.sub, "KEK rotated");
    state.metrics.key_ops.with_label_values(&["rotate"]).inc();
    Ok(HttpResponse::Ok().json(serde_json::json!({"active": version})))
}

/// POST /v1/admin/keys/rewrap
pub async fn rewrap(
    state: web::Data<AppState>,
    _caller: Caller<KeysAdmin>,
    body: ApiJson<RewrapBody>,
) -> Result<HttpResponse, ApiError> {
    let batch = body.0.batch.unwrap_or(1000);
    if batch == 0 || batch > MAX_BATCH {
        return Err(ApiError::InvalidField("batch must be between 1 and 10000"));
    }
    let progress = state.vault.rewrap_batch(batch).await?;
    state.metrics.rewrapped.inc_by(progress.rewrapped);
    Ok(HttpResponse::Ok().json(progress))
}

/// POST /v1/admin/keys/{version}/retire
pub async fn retire(
    state: web::Data<AppState>,
    caller: Caller<KeysAdmin>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let version = parse_version(&path)?;
    state.vault.retire_key(version, &caller.principal.sub).await?;
    tracing::warn!(version, officer = %caller.principal.sub, "KEK retired");
    state.metrics.key_ops.with_label_values(&["retire"]).inc();
    Ok(HttpResponse::Ok().json(serde_json::json!({"version": version, "state": "retired"})))
}

/// POST /v1/admin/keys/{version}/destroy — dual control: 202 for the request,
/// 200 once a second officer approves.
pub async fn destroy(
    state: web::Data<AppState>,
    caller: Caller<KeysAdmin>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let version = parse_version(&path)?;
    let outcome = state.vault.destroy_key(version, &caller.principal.sub).await?;
    Ok(match &outcome {
        DestroyOutcome::PendingApproval { requested_by, .. } => {
            tracing::warn!(version, officer = %requested_by, "KEK destruction requested; awaiting a second officer");
            state.metrics.key_ops.with_label_values(&["destroy_requested"]).inc();
            HttpResponse::Accepted().json(&outcome)
        }
        DestroyOutcome::Destroyed {
            requested_by,
            approved_by,
            ..
        } => {
            tracing::warn!(version, requested_by = %requested_by, approved_by = %approved_by, "KEK destroyed (crypto-shredded)");
            state.metrics.key_ops.with_label_values(&["destroy"]).inc();
            HttpResponse::Ok().json(&outcome)
        }
    })
}

/// POST /v1/admin/keys/rotate-root — PKCS#11 only: a new HSM key wraps every KEK.
pub async fn rotate_root(
    state: web::Data<AppState>,
    caller: Caller<KeysAdmin>,
    body: ApiJson<RotateRootBody>,
) -> Result<HttpResponse, ApiError> {
    let label = body.0.key_label;
    if label.is_empty() || label.len() > 64 || !label.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(ApiError::InvalidField(
            "key_label must be 1-64 characters of A-Z a-z 0-9 - _ .",
        ));
    }
    let Some(hsm) = state.pkcs11.clone() else {
        return Err(ApiError::KeyRefused("rotate-root needs the pkcs11 provider".into()));
    };
    let root_id = state.vault.rotate_root(hsm, label, &caller.principal.sub).await?;
    tracing::warn!(root = %root_id, officer = %caller.principal.sub, "root key rotated");
    state.metrics.key_ops.with_label_values(&["rotate_root"]).inc();
    Ok(HttpResponse::Ok().json(serde_json::json!({"root_id": root_id})))
}

/// POST /v1/admin/unseal — one custodian share per call.
pub async fn unseal(
    state: web::Data<AppState>,
    caller: Caller<KeysAdmin>,
    body: ApiJson<UnsealBody>,
) -> Result<HttpResponse, ApiError> {
    use secrecy::ExposeSecret;
    let vault = state.vault.clone();
    let share = body.0.share;
    let result = tokio::task::spawn_blocking(move || vault.keys().submit_share(share.expose_secret()))
        .await
        .map_err(|_| ApiError::Internal)?;
    match result {
        Ok(progress) => {
            let outcome = if progress.sealed { "accepted" } else { "unsealed" };
            state.metrics.unseal.with_label_values(&[outcome]).inc();
            tracing::warn!(
                officer = %caller.principal.sub,
                received = progress.shares_received,
                threshold = progress.threshold,
                sealed = progress.sealed,
                "unseal share accepted"
            );
            Ok(HttpResponse::Ok().json(progress))
        }
        Err(e) => {
            state.metrics.unseal.with_label_values(&["refused"]).inc();
            tracing::warn!(officer = %caller.principal.sub, reason = %e, "unseal share refused");
            Err(e.into())
        }
    }
}
