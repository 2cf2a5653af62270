//! The officers' admin API (`/v1/admin/…`, scope `keys:admin`): what the
//! `tokenvault keys` CLI drives while the vault keeps serving.

use actix_web::{HttpResponse, web};
use serde::Deserialize;

use super::AppState;
use super::extract::{ApiJson, AuditRead, Caller, KeysAdmin, SecretJson, VaultBackup};
use super::problem::ApiError;
use crate::service::DestroyOutcome;

/// Largest rewrap batch one request may ask for.
const MAX_BATCH: usize = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RewrapBody {
    #[serde(default, deserialize_with = "optional_integral")]
    batch: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UnsealBody {
    share: secrecy::SecretString,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RotateRootBody {
    key_label: String,
}

/// Accepts `v3` or `3`.
fn parse_version(s: &str) -> Result<u32, ApiError> {
    crate::keys::parse_version(s).ok_or(ApiError::NotFound)
}

/// GET /v1/admin/keys
pub(super) async fn status(state: web::Data<AppState>, caller: Caller<KeysAdmin>) -> Result<HttpResponse, ApiError> {
    let result = state.vault.key_status().await.map_err(ApiError::from);
    audit(&state, &caller, "key.status", &result, None).await?;
    Ok(HttpResponse::Ok().json(result?))
}

/// Records a key operation's outcome in the audit trail.
async fn audit<T>(
    state: &AppState,
    caller: &Caller<KeysAdmin>,
    action: &'static str,
    result: &Result<T, ApiError>,
    detail: Option<String>,
) -> Result<(), ApiError> {
    let mut event = caller.event(action, result.as_ref().map_or_else(|e| e.code(), |_| "ok"), None);
    event.detail = detail;
    state.audit(event).await
}

/// POST /v1/admin/keys/rotate
pub(super) async fn rotate(state: web::Data<AppState>, caller: Caller<KeysAdmin>) -> Result<HttpResponse, ApiError> {
    let result = state
        .vault
        .rotate_key(&caller.principal.sub)
        .await
        .map_err(ApiError::from);
    audit(
        &state,
        &caller,
        "key.rotate",
        &result,
        result.as_ref().ok().map(|v| format!("v{v} active")),
    )
    .await?;
    let version = result?;
    tracing::warn!(version, officer = %caller.principal.sub, "KEK rotated");
    state.metrics.key_ops.with_label_values(&["rotate"]).inc();
    Ok(HttpResponse::Ok().json(serde_json::json!({"active": version})))
}

/// POST /v1/admin/keys/rewrap
pub(super) async fn rewrap(
    state: web::Data<AppState>,
    caller: Caller<KeysAdmin>,
    body: ApiJson<RewrapBody>,
) -> Result<HttpResponse, ApiError> {
    let batch = body.0.batch.unwrap_or(1000);
    let result = if batch == 0 || batch > MAX_BATCH {
        Err(ApiError::InvalidField("batch must be between 1 and 10000"))
    } else {
        state.vault.rewrap_batch(batch).await.map_err(ApiError::from)
    };
    let detail = result
        .as_ref()
        .ok()
        .map(|p| format!("{} rewrapped, {} remaining", p.rewrapped, p.remaining));
    audit(&state, &caller, "key.rewrap", &result, detail).await?;
    let progress = result?;
    state.metrics.rewrapped.inc_by(progress.rewrapped);
    Ok(HttpResponse::Ok().json(progress))
}

/// POST /v1/admin/keys/{version}/retire
pub(super) async fn retire(
    state: web::Data<AppState>,
    caller: Caller<KeysAdmin>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let version = parse_version(&path);
    let result = match version {
        Ok(v) => state
            .vault
            .retire_key(v, &caller.principal.sub)
            .await
            .map_err(ApiError::from)
            .map(|_| v),
        Err(e) => Err(e),
    };
    audit(
        &state,
        &caller,
        "key.retire",
        &result,
        Some(format!("version {}", path.as_str())),
    )
    .await?;
    let version = result?;
    tracing::warn!(version, officer = %caller.principal.sub, "KEK retired");
    state.metrics.key_ops.with_label_values(&["retire"]).inc();
    Ok(HttpResponse::Ok().json(serde_json::json!({"version": version, "state": "retired"})))
}

/// POST /v1/admin/keys/{version}/destroy — dual control: 202 for the request,
/// 200 once a second officer approves.
pub(super) async fn destroy(
    state: web::Data<AppState>,
    caller: Caller<KeysAdmin>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let result = match parse_version(&path) {
        Ok(v) => state
            .vault
            .destroy_key(v, &caller.principal.sub)
            .await
            .map_err(ApiError::from),
        Err(e) => Err(e),
    };
    let (action, detail) = match &result {
        Ok(DestroyOutcome::PendingApproval { .. }) => ("key.destroy.request", None),
        Ok(DestroyOutcome::Destroyed { requested_by, .. }) => {
            ("key.destroy", Some(format!("requested by {requested_by}")))
        }
        Err(_) => ("key.destroy", None),
    };
    let detail = Some(format!(
        "version {}{}",
        path.as_str(),
        detail.map(|d| format!(", {d}")).unwrap_or_default()
    ));
    audit(&state, &caller, action, &result, detail).await?;
    let outcome = result?;
    Ok(match &outcome {
        DestroyOutcome::PendingApproval { requested_by, version } => {
            tracing::warn!(version, officer = %requested_by, "KEK destruction requested; awaiting a second officer");
            state.metrics.key_ops.with_label_values(&["destroy_requested"]).inc();
            HttpResponse::Accepted().json(&outcome)
        }
        DestroyOutcome::Destroyed {
            requested_by,
            approved_by,
            version,
        } => {
            tracing::warn!(version, requested_by = %requested_by, approved_by = %approved_by, "KEK destroyed (crypto-shredded)");
            state.metrics.key_ops.with_label_values(&["destroy"]).inc();
            HttpResponse::Ok().json(&outcome)
        }
    })
}

/// POST /v1/admin/keys/rotate-root — PKCS#11 only: a new HSM key wraps every KEK.
pub(super) async fn rotate_root(
    state: web::Data<AppState>,
    caller: Caller<KeysAdmin>,
    body: ApiJson<RotateRootBody>,
) -> Result<HttpResponse, ApiError> {
    let label = body.0.key_label;
    let valid = !label.is_empty()
        && label.len() <= 64
        && label.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    let result = if !valid {
        Err(ApiError::InvalidField(
            "key_label must be 1-64 characters of A-Z a-z 0-9 - _ .",
        ))
    } else if let Some(hsm) = state.pkcs11.clone() {
        state
            .vault
            .rotate_root(hsm, label, &caller.principal.sub)
            .await
            .map_err(ApiError::from)
    } else {
        Err(ApiError::KeyRefused("rotate-root needs the pkcs11 provider".into()))
    };
    audit(
        &state,
        &caller,
        "key.rotate_root",
        &result,
        result.as_ref().ok().map(|r| format!("root {r}")),
    )
    .await?;
    let root_id = result?;
    tracing::warn!(root = %root_id, officer = %caller.principal.sub, "root key rotated");
    state.metrics.key_ops.with_label_values(&["rotate_root"]).inc();
    Ok(HttpResponse::Ok().json(serde_json::json!({"root_id": root_id})))
}

/// POST /v1/admin/unseal — one custodian share per call (the share is never logged or audited).
pub(super) async fn unseal(
    state: web::Data<AppState>,
    caller: Caller<KeysAdmin>,
    body: SecretJson<UnsealBody>,
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
            let mut event = caller.event("unseal", outcome, None);
            event.detail = Some(format!("{} of {} shares", progress.shares_received, progress.threshold));
            state.audit(event).await?;
            Ok(HttpResponse::Ok().json(progress))
        }
        Err(e) => {
            state.metrics.unseal.with_label_values(&["refused"]).inc();
            tracing::warn!(officer = %caller.principal.sub, reason = %e, "unseal share refused");
            let e: ApiError = e.into();
            state.audit(caller.event("unseal", e.code(), None)).await?;
            Err(e)
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExportQuery {
    /// RFC 3339: start at the first record at or after this time (found by a
    /// binary search over sequence numbers, not a scan from record 1).
    #[serde(default)]
    since: Option<String>,
    /// Sequence cursor: start after this record (what a SIEM resumes from).
    #[serde(default)]
    after_seq: Option<u64>,
    /// At most this many records (default: all).
    #[serde(default)]
    limit: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PruneBody {
    /// Remove records up to and including this one...
    #[serde(deserialize_with = "super::extract::integral")]
    through_seq: u64,
    /// ...whose chain hash the SIEM holds from its verified export (proof that the
    /// records were exported before they are removed).
    hash: String,
}

/// GET /v1/admin/audit/verify — checks the whole trail, names the first broken link.
/// Needs `audit:read` and a global-admin grant (the trail spans every tenant).
pub(super) async fn audit_verify(
    state: web::Data<AppState>,
    caller: Caller<AuditRead>,
) -> Result<HttpResponse, ApiError> {
    if !caller.principal.global_admin {
        let e = ApiError::Auth(crate::auth::AuthError::GlobalAdminRequired);
        state.audit(caller.event("audit.verify", e.code(), None)).await?;
        return Err(e);
    }
    let st = state.clone();
    let report = tokio::task::spawn_blocking(move || st.audit.verify_stored())
        .await
        .map_err(|_| ApiError::Internal)?
        .map_err(|e| {
            tracing::error!(error = %e, "audit verify failed");
            ApiError::Internal
        })?;
    let outcome = if report.first_broken.is_some() {
        "broken"
    } else {
        "intact"
    };
    let mut event = caller.event("audit.verify", outcome, None);
    event.detail = Some(format!("{} records", report.records));
    state.audit(event).await?;
    Ok(HttpResponse::Ok().json(report))
}

/// GET /v1/admin/audit/export — JSON lines for a SIEM, streamed in batches from a
/// sequence cursor (bounded memory whatever the trail's size). A global admin
/// gets every record; anyone else only their JWT tenant's.
pub(super) async fn audit_export(
    state: web::Data<AppState>,
    caller: Caller<AuditRead>,
    query: web::Query<ExportQuery>,
) -> Result<HttpResponse, ApiError> {
    let since = match &query.since {
        None => None,
        Some(s) if s.len() > 64 => {
            return Err(ApiError::InvalidField(
                "since must be an RFC 3339 time of at most 64 characters",
            ));
        }
        Some(s) => Some(
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|_| ApiError::InvalidField("since must be an RFC 3339 time, e.g. 2026-11-01T00:00:00Z"))?,
        ),
    };
    // The documented range is int64's (what JSON and most SIEM clients can hold).
    if query.after_seq.is_some_and(|n| n > i64::MAX as u64) || query.limit.is_some_and(|n| n > i64::MAX as u64) {
        return Err(ApiError::InvalidField(
            "after_seq and limit must be 0 to 9223372036854775807",
        ));
    }
    let st = state.clone();
    let after = query.after_seq.unwrap_or(0);
    let start = tokio::task::spawn_blocking(move || match since {
        Some(t) => st.audit.first_at_or_after(t).map(|s| s.max(after + 1)),
        None => Ok(after + 1),
    })
    .await
    .map_err(|_| ApiError::Internal)?
    .map_err(|e| {
        tracing::error!(error = %e, "audit export failed");
        ApiError::Internal
    })?;
    let tenant = (!caller.principal.global_admin).then(|| caller.principal.tenant.to_string());
    let mut event = caller.event("audit.export", "ok", None);
    event.detail = Some(format!(
        "from record {start}{}",
        tenant
            .as_ref()
            .map_or_else(String::new, |t| format!(", tenant {t} only"))
    ));
    state.audit(event).await?;
    let remaining = query.limit.unwrap_or(u64::MAX);
    let stream = futures_util::stream::unfold(
        (state.clone(), start, remaining, tenant),
        |(state, from, remaining, tenant)| async move {
            if remaining == 0 {
                return None;
            }
            let st = state.clone();
            let filter = tenant.clone();
            let batch = tokio::task::spawn_blocking(move || st.audit.export_batch(from, 500, filter.as_deref())).await;
            match batch {
                Ok(Ok((mut lines, next))) => {
                    if lines.is_empty() && next == from {
                        return None;
                    }
                    let mut out = Vec::new();
                    let mut left = remaining;
                    for line in lines.drain(..) {
                        if left == 0 {
                            break;
                        }
                        out.extend(line);
                        out.push(b'\n');
                        left -= 1;
                    }
                    Some((
                        Ok::<_, actix_web::Error>(actix_web::web::Bytes::from(out)),
                        (state, next, left, tenant),
                    ))
                }
                _ => {
                    tracing::error!("audit export failed mid-stream");
                    None
                }
            }
        },
    );
    Ok(HttpResponse::Ok()
        .content_type("application/x-ndjson")
        .streaming(stream))
}

/// POST /v1/admin/audit/prune — retention after a verified SIEM export: removes
/// records through `through_seq` once the trail verifies up to there and the
/// caller proves it holds that record's chain hash. A checkpoint (sequence, hash)
/// keeps the remaining trail verifiable. Needs `keys:admin` (global).
pub(super) async fn audit_prune(
    state: web::Data<AppState>,
    caller: Caller<KeysAdmin>,
    body: ApiJson<PruneBody>,
) -> Result<HttpResponse, ApiError> {
    let PruneBody { through_seq, hash } = body.0;
    // The documented bounds (int64, a SHA-256 in hex), refused before the trail is read.
    if through_seq == 0 || through_seq > i64::MAX as u64 {
        return Err(ApiError::InvalidField("through_seq must be 1 to 9223372036854775807"));
    }
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::InvalidField(
            "hash must be the record's chain hash: 64 hex digits",
        ));
    }
    let st = state.clone();
    let result = tokio::task::spawn_blocking(move || st.audit.prune(through_seq, &hash))
        .await
        .map_err(|_| ApiError::Internal)?
        .map_err(|e| match e {
            crate::audit::PruneError::Refused(why) => ApiError::KeyRefused(why),
            crate::audit::PruneError::Audit(e) => {
                tracing::error!(error = %e, "audit prune failed");
                ApiError::Internal
            }
        });
    let mut event = caller.event("audit.prune", result.as_ref().map_or_else(|e| e.code(), |_| "ok"), None);
    event.detail = Some(format!("through record {through_seq}"));
    state.audit(event).await?;
    let removed = result?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"removed": removed, "checkpoint_seq": through_seq})))
}

fn optional_integral<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    super::extract::integral(d).map(Some)
}

/// `POST /v1/admin/exports`: the tenant and the recipient's OpenPGP public key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExportBody {
    tenant: String,
    recipient_key: String,
}

/// An export id as the server makes them (`exp_` + 24 hex digits).
fn export_id(s: &str) -> Result<&str, ApiError> {
    let ok = s.len() == 28 && s.starts_with("exp_") && s[4..].bytes().all(|b| b.is_ascii_hexdigit());
    if ok { Ok(s) } else { Err(ApiError::NotFound) }
}

/// POST /v1/admin/exports — officer 1 requests a tenant's cards for a recipient key.
pub(super) async fn export_request(
    state: web::Data<AppState>,
    caller: Caller<KeysAdmin>,
    body: ApiJson<ExportBody>,
) -> Result<HttpResponse, ApiError> {
    let ExportBody { tenant, recipient_key } = body.0;
    let key_check = crate::service::check_recipient_key(&recipient_key);
    let result = match (crate::domain::tenant::TenantId::parse(&tenant), key_check) {
        (None, _) => Err(ApiError::InvalidField("tenant must be a tenant id")),
        (_, Err(why)) => Err(ApiError::InvalidValue(why.to_string())),
        (Some(t), Ok(_)) => state
            .vault
            .request_export(&caller.principal.sub, t, recipient_key)
            .await
            .map_err(ApiError::from),
    };
    let detail = result.as_ref().ok().map(|v| {
        format!(
            "export {} of tenant {} to recipient key {}",
            v.id, v.tenant, v.fingerprint
        )
    });
    audit(&state, &caller, "export.request", &result, detail).await?;
    let view = result?;
    tracing::warn!(export = %view.id, tenant = %view.tenant, recipient = %view.fingerprint, "card export requested; awaiting a second officer");
    Ok(HttpResponse::Created().json(view))
}

/// GET /v1/admin/exports — the open requests.
pub(super) async fn export_list(
    state: web::Data<AppState>,
    caller: Caller<KeysAdmin>,
) -> Result<HttpResponse, ApiError> {
    let items = state.vault.exports();
    audit(&state, &caller, "export.list", &Ok::<(), ApiError>(()), None).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "items": items })))
}

/// POST /v1/admin/exports/{id}/approve — a second, different officer approves.
pub(super) async fn export_approve(
    state: web::Data<AppState>,
    caller: Caller<KeysAdmin>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let result = match export_id(&path) {
        Ok(id) => state
            .vault
            .approve_export(&caller.principal.sub, id)
            .await
            .map_err(ApiError::from),
        Err(e) => Err(e),
    };
    let detail = Some(match &result {
        Ok(v) => format!(
            "export {} of tenant {} to recipient key {}, requested by {}",
            v.id, v.tenant, v.fingerprint, v.requested_by
        ),
        Err(_) => format!("export {}", export_id(&path).unwrap_or("(not an export id)")),
    });
    audit(&state, &caller, "export.approve", &result, detail).await?;
    Ok(HttpResponse::Ok().json(result?))
}

/// GET /v1/admin/exports/{id}/file — the encrypted file of an approved export, once.
pub(super) async fn export_fetch(
    state: web::Data<AppState>,
    caller: Caller<KeysAdmin>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let result = match export_id(&path) {
        Ok(id) => state
            .vault
            .fetch_export(&caller.principal.sub, id)
            .await
            .map_err(ApiError::from),
        Err(e) => Err(e),
    };
    let detail = Some(match &result {
        Ok(f) => format!(
            "export {} of tenant {} to recipient key {}: {} cards",
            f.request.id, f.request.tenant, f.request.fingerprint, f.cards
        ),
        Err(_) => format!("export {}", export_id(&path).unwrap_or("(not an export id)")),
    });
    audit(&state, &caller, "export.fetch", &result, detail).await?;
    let file = result?;
    tracing::warn!(export = %file.request.id, cards = file.cards, "card export fetched");
    Ok(HttpResponse::Ok()
        .content_type("application/pgp-encrypted")
        .insert_header(("Cache-Control", "no-store"))
        .insert_header((
            "Content-Disposition",
            format!("attachment; filename=\"{}.csv.pgp\"", file.request.id),
        ))
        .insert_header(("X-Export-Cards", file.cards.to_string()))
        .insert_header(("X-Recipient-Fingerprint", file.request.fingerprint.clone()))
        .body(file.ciphertext))
}

/// POST /v1/admin/backup — an online backup of the store and keystore, streamed
/// (`tokenvault backup`). Needs `vault:backup` and a global-admin grant. The copy
/// is taken into an unnamed spool file first (writes wait for the copy, never for
/// the download); the audit record names its size and audit head.
pub(super) async fn backup(state: web::Data<AppState>, caller: Caller<VaultBackup>) -> Result<HttpResponse, ApiError> {
    // One at a time, held until the download ends (it moves into the stream below):
    // a stolen operator credential cannot fill the disk with parallel spool files.
    let Ok(permit) = state.backups.clone().try_acquire_owned() else {
        let e = ApiError::RateLimited(std::time::Duration::from_secs(60));
        state.audit(caller.event("backup.create", "busy", None)).await?;
        return Err(e);
    };
    let result = match state.vault.backup().await {
        Ok(Some(b)) => Ok(b),
        Ok(None) => Err(ApiError::NotSupported(
            "this vault runs on PostgreSQL: back it up with the database's own tools (README, \"Backups\")",
        )),
        Err(e) => Err(ApiError::from(e)),
    };
    let mut event = caller.event(
        "backup.create",
        result.as_ref().map_or_else(|e| e.code(), |_| "ok"),
        None,
    );
    event.detail = result.as_ref().ok().map(|b| {
        format!(
            "{} records, audit head {}, {} bytes, writes paused {} ms",
            b.summary.records,
            b.summary.audit_head.as_ref().map_or(0, |h| h.seq),
            b.bytes,
            b.summary.write_pause_ms
        )
    });
    state.audit(event).await?;
    let b = result?;
    tracing::warn!(
        records = b.summary.records,
        bytes = b.bytes,
        pause_ms = b.summary.write_pause_ms,
        "backup taken"
    );
    let name = format!("tokenvault-{}.tvbackup", b.summary.taken_at);
    let chunks = futures_util::stream::unfold(Some((b.file, permit)), |open| async move {
        let (mut file, permit) = open?;
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; 1 << 20];
            let n = std::io::Read::read(&mut file, &mut buf)?;
            buf.truncate(n);
            Ok::<_, std::io::Error>((buf, file))
        })
        .await;
        match read {
            Ok(Ok((buf, _))) if buf.is_empty() => None,
            Ok(Ok((buf, file))) => Some((Ok(web::Bytes::from(buf)), Some((file, permit)))),
            Ok(Err(e)) => Some((Err(actix_web::error::ErrorInternalServerError(e)), None)),
            Err(_) => Some((
                Err(actix_web::error::ErrorInternalServerError("backup read task failed")),
                None,
            )),
        }
    });
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .insert_header(("Cache-Control", "no-store"))
        .insert_header(("Content-Disposition", format!("attachment; filename=\"{name}\"")))
        .insert_header(("X-Backup-Records", b.summary.records.to_string()))
        .insert_header(("X-Backup-Write-Pause-Ms", b.summary.write_pause_ms.to_string()))
        .no_chunking(b.bytes)
        .streaming(chunks))
}
