//! Token endpoints: tokenize and card update (edge), metadata (CRM), detokenize
//! (PSP), delete (CRM).

use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{HttpResponse, web};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::AppState;
use super::extract::{
    ApiJson, Caller, SecretJson, TokensCreate, TokensDelete, TokensDetokenize, TokensRead, TokensUpdate,
};
use super::problem::ApiError;
use crate::domain::card::{CardPayload, CardholderName, Expiry, Pan};
use crate::domain::scope::Scope;
use crate::domain::token::{Token, TokenFormat};
use crate::service::{TokenMetadata, TokenizeCaller, TokenizeInput, Tokenized, VaultError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TokenizeBody {
    pan: SecretString,
    #[serde(deserialize_with = "super::extract::integral")]
    exp_month: i64,
    #[serde(deserialize_with = "super::extract::integral")]
    exp_year: i64,
    #[serde(default)]
    cardholder_name: Option<SecretString>,
    #[serde(default)]
    format: Option<TokenFormat>,
    /// Held in memory only, for the next charge.
    #[serde(default)]
    cvv: Option<SecretString>,
    /// The token lives this long (e.g. "15m" for one IVR call), then is gone.
    #[serde(default)]
    ttl: Option<String>,
    /// Or until then (RFC 3339).
    #[serde(default)]
    expires_at: Option<String>,
}

/// When a new token expires (unix seconds), from `ttl` or `expires_at`, within
/// the vault's bounds (a token without either lives until deleted).
fn parse_expiry_time(
    ttl: Option<&str>,
    at: Option<&str>,
    now: i64,
    bounds: &crate::config::Lifecycle,
) -> Result<Option<i64>, ApiError> {
    let (min, max) = (bounds.min_ttl.as_secs() as i64, bounds.max_ttl.as_secs() as i64);
    let bad = || {
        ApiError::InvalidValue(format!(
            "ttl must be a duration from {} to {} (such as 15m), or expires_at an RFC 3339 time that far ahead; \
             not both",
            humantime::format_duration(bounds.min_ttl),
            humantime::format_duration(bounds.max_ttl),
        ))
    };
    let secs = match (ttl, at) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => return Err(bad()),
        (Some(t), None) => humantime::parse_duration(t)
            .ok()
            .and_then(|d| i64::try_from(d.as_secs()).ok())
            .filter(|s| *s >= 1)
            .ok_or_else(bad)?,
        (None, Some(a)) => {
            OffsetDateTime::parse(a, &time::format_description::well_known::Rfc3339)
                .map_err(|_| bad())?
                .unix_timestamp()
                - now
        }
    };
    if !(min..=max).contains(&secs) {
        return Err(bad());
    }
    Ok(Some(now + secs))
}

/// `PATCH /v1/tokens/{token}`: a reissued card (same PAN).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CardUpdateBody {
    #[serde(deserialize_with = "super::extract::integral")]
    exp_month: i64,
    #[serde(deserialize_with = "super::extract::integral")]
    exp_year: i64,
    #[serde(default)]
    cardholder_name: Option<SecretString>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DetokenizeBody {
    token: String,
}

#[derive(Serialize)]
struct TokenBody<'a> {
    token: &'a str,
    format: &'static str,
    brand: &'static str,
    bin: &'a str,
    last4: &'a str,
    exp_month: u8,
    exp_year: u16,
    /// Only for callers granted `tokens:dedupe`: equal fingerprints mean the same
    /// card, so showing them to anyone else would make every tokenize an oracle.
    #[serde(skip_serializing_if = "Option::is_none")]
    fingerprint: Option<&'a str>,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    cvv_held: bool,
    /// Only for a token given a `ttl` or `expires_at`.
    #[serde(skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    expires_at: Option<OffsetDateTime>,
    /// In reads and listings: when the card was last tokenized, charged or detokenized.
    #[serde(skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    last_used_at: Option<OffsetDateTime>,
}

impl<'a> TokenBody<'a> {
    fn new(m: &'a TokenMetadata, show_fingerprint: bool) -> Self {
        TokenBody {
            token: m.token.as_str(),
            format: m.format.as_str(),
            brand: m.brand.as_str(),
            bin: &m.bin,
            last4: &m.last4,
            exp_month: m.exp_month,
            exp_year: m.exp_year,
            fingerprint: show_fingerprint.then_some(m.fingerprint.as_str()),
            created_at: m.created_at,
            cvv_held: m.cvv_held,
            expires_at: m.expires_at.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok()),
            last_used_at: m.last_used_at.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok()),
        }
    }
}

#[derive(Serialize)]
struct RevealedBody<'a> {
    token: &'a str,
    pan: &'a str,
    exp_month: u8,
    exp_year: u16,
    cardholder_name: Option<&'a str>,
}

/// POST /v1/tokens
pub(super) async fn tokenize(
    state: web::Data<AppState>,
    caller: Caller<TokensCreate>,
    body: SecretJson<TokenizeBody>,
) -> Result<HttpResponse, ApiError> {
    let input = match parse_tokenize(&body.0, state.vault.lifecycle()) {
        Ok(input) => input,
        Err(e) => {
            state.metrics.tokenize.with_label_values(&["rejected"]).inc();
            state.audit(caller.event("tokenize", e.code(), None)).await?;
            return Err(e);
        }
    };
    let dedupe = caller.principal.may(Scope::TokensDedupe);
    let who = TokenizeCaller {
        client: caller.principal.sub.clone(),
        tenant: caller.principal.tenant.clone(),
        dedupe,
    };
    // On success the vault stores the audit record with the card (one durable wait).
    let result = state
        .vault
        .tokenize(who, input, caller.event("tokenize", "", None))
        .await;
    let (status, meta, outcome) = match result {
        Ok(Tokenized::Created(m)) => (StatusCode::CREATED, m, "created"),
        Ok(Tokenized::Existing(m)) => (StatusCode::OK, m, "existing"),
        Err(e) => {
            state.metrics.tokenize.with_label_values(&[error_outcome(&e)]).inc();
            if let VaultError::EnumerationSuspected { flagged, .. } = &e {
                let kind = if *flagged { "flagged" } else { "refused" };
                state.metrics.enumeration.with_label_values(&[kind]).inc();
                if *flagged {
                    tracing::warn!(
                        sub = %caller.principal.sub,
                        "card-number enumeration suspected: tokenize throttled for this client and tenant"
                    );
                    let mut event = caller.event("anomaly.enumeration", "throttled", None);
                    event.detail = Some("too many distinct cards behind one BIN and last four in the window".into());
                    state.audit(event).await?;
                }
            }
            let e = vault_error(e);
            state.audit(caller.event("tokenize", e.code(), None)).await?;
            return Err(e);
        }
    };
    state.metrics.tokenize.with_label_values(&[outcome]).inc();
    Ok(HttpResponse::build(status)
        .insert_header((header::LOCATION, format!("/v1/tokens/{}", meta.token)))
        .json(TokenBody::new(&meta, dedupe)))
}

/// One card of `POST /v1/tokens/batch`, with the caller's own id for it. No CVV
/// (a migration must not carry one: PCI DSS 3.3.1) and no lifetime.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchItem {
    id: String,
    pan: SecretString,
    #[serde(deserialize_with = "super::extract::integral")]
    exp_month: i64,
    #[serde(deserialize_with = "super::extract::integral")]
    exp_year: i64,
    #[serde(default)]
    cardholder_name: Option<SecretString>,
    #[serde(default)]
    format: Option<TokenFormat>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchBody {
    items: Vec<BatchItem>,
}

/// The most cards one batch may carry.
pub(super) const MAX_BATCH: usize = 1_000;

#[derive(Serialize)]
struct BatchResult<'a> {
    /// The caller's id (absent when it was refused: it must not carry a card number).
    id: Option<&'a str>,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<TokenBody<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<super::problem::Problem<'a>>,
}

#[derive(Serialize)]
struct BatchAnswer<'a> {
    items: Vec<BatchResult<'a>>,
    created: usize,
    existing: usize,
    failed: usize,
}

/// Validates one batch item as a tokenize body.
fn parse_batch_item(item: &BatchItem) -> Result<TokenizeInput, ApiError> {
    if item.id.is_empty()
        || item.id.chars().count() > 128
        || item.id.chars().any(char::is_control)
        || crate::domain::card::contains_pan(&item.id)
    {
        return Err(ApiError::InvalidField(
            "id must be 1 to 128 characters without control characters or a card number",
        ));
    }
    let pan = Pan::parse(item.pan.expose_secret()).map_err(ApiError::InvalidPan)?;
    let (expiry, name) = parse_expiry_and_name(item.exp_month, item.exp_year, item.cardholder_name.as_ref())?;
    Ok(TokenizeInput {
        expires_at: None,
        cvv: None,
        card: CardPayload { pan, expiry, name },
        format: item.format.unwrap_or_default(),
    })
}

/// POST /v1/tokens/batch: up to [`MAX_BATCH`] cards, each tokenized as by
/// `POST /v1/tokens` (same dedupe and tenant rules, each audited) and answered in
/// order with its token or its own problem; one bad card fails only itself. Every
/// stored card is durable before the answer (the units share group commits).
pub(super) async fn batch(
    state: web::Data<AppState>,
    caller: Caller<TokensCreate>,
    body: super::extract::BatchJson<BatchBody>,
) -> Result<HttpResponse, ApiError> {
    use futures_util::StreamExt;
    let items = body.0.items;
    if items.is_empty() || items.len() > MAX_BATCH {
        state
            .audit(caller.event("tokenize.batch", "invalid-field", None))
            .await?;
        return Err(ApiError::InvalidField("a batch carries 1 to 1000 items"));
    }
    let dedupe = caller.principal.may(Scope::TokensDedupe);
    let who = TokenizeCaller {
        client: caller.principal.sub.clone(),
        tenant: caller.principal.tenant.clone(),
        dedupe,
    };
    let outcomes: Vec<Result<(StatusCode, TokenMetadata), ApiError>> = futures_util::stream::iter(items.iter())
        .map(|item| {
            let (state, who, event) = (&state, who.clone(), caller.event("tokenize", "", None));
            async move {
                let input = match parse_batch_item(item) {
                    Ok(input) => input,
                    Err(e) => {
                        state.metrics.tokenize.with_label_values(&["rejected"]).inc();
                        return Err(e);
                    }
                };
                match state.vault.tokenize(who, input, event).await {
                    Ok(Tokenized::Created(m)) => {
                        state.metrics.tokenize.with_label_values(&["created"]).inc();
                        Ok((StatusCode::CREATED, m))
                    }
                    Ok(Tokenized::Existing(m)) => {
                        state.metrics.tokenize.with_label_values(&["existing"]).inc();
                        Ok((StatusCode::OK, m))
                    }
                    Err(e) => {
                        state.metrics.tokenize.with_label_values(&[error_outcome(&e)]).inc();
                        Err(vault_error(e))
                    }
                }
            }
        })
        .buffered(64)
        .collect()
        .await;
    let (mut created, mut existing, mut failed) = (0, 0, 0);
    let results = items
        .iter()
        .zip(&outcomes)
        .map(|(item, outcome)| match outcome {
            Ok((status, meta)) => {
                if *status == StatusCode::CREATED {
                    created += 1;
                } else {
                    existing += 1;
                }
                BatchResult {
                    id: Some(item.id.as_str()),
                    status: status.as_u16(),
                    token: Some(TokenBody::new(meta, dedupe)),
                    problem: None,
                }
            }
            Err(e) => {
                failed += 1;
                let p = e.problem();
                BatchResult {
                    // An id holding a card number is refused, never echoed.
                    id: (!crate::domain::card::contains_pan(&item.id)).then_some(item.id.as_str()),
                    status: p.status,
                    token: None,
                    problem: Some(p),
                }
            }
        })
        .collect();
    let mut event = caller.event("tokenize.batch", "ok", None);
    event.detail = Some(format!("{created} created, {existing} existing, {failed} failed"));
    state.audit(event).await?;
    Ok(HttpResponse::Ok().json(BatchAnswer {
        items: results,
        created,
        existing,
        failed,
    }))
}

/// An expiry (not in the past) and an optional cardholder name, as tokenize and
/// card updates take them.
fn parse_expiry_and_name(
    exp_month: i64,
    exp_year: i64,
    name: Option<&SecretString>,
) -> Result<(Expiry, Option<CardholderName>), ApiError> {
    let now = OffsetDateTime::now_utc();
    let expiry =
        Expiry::parse(exp_month, exp_year, (now.year(), u8::from(now.month()))).map_err(ApiError::InvalidExpiry)?;
    let name = name
        .map(|n| CardholderName::parse(n.expose_secret()))
        .transpose()
        .map_err(|_| {
            ApiError::InvalidField("cardholder_name must be 1 to 128 characters without control characters")
        })?;
    Ok((expiry, name))
}

pub(super) fn parse_tokenize(
    body: &TokenizeBody,
    bounds: &crate::config::Lifecycle,
) -> Result<TokenizeInput, ApiError> {
    let pan = Pan::parse(body.pan.expose_secret()).map_err(ApiError::InvalidPan)?;
    let (expiry, name) = parse_expiry_and_name(body.exp_month, body.exp_year, body.cardholder_name.as_ref())?;
    let cvv = body
        .cvv
        .as_ref()
        .map(|c| crate::domain::card::Cvv::parse(c.expose_secret(), pan.brand()))
        .transpose()
        .map_err(|_| ApiError::InvalidCvv)?;
    let expires_at = parse_expiry_time(
        body.ttl.as_deref(),
        body.expires_at.as_deref(),
        OffsetDateTime::now_utc().unix_timestamp(),
        bounds,
    )?;
    Ok(TokenizeInput {
        expires_at,
        cvv,
        card: CardPayload { pan, expiry, name },
        format: body.format.unwrap_or_default(),
    })
}

/// `GET /v1/tokens` query: a page of the tenant's tokens.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    /// `YYYY-MM`: only cards whose expiry month is earlier.
    #[serde(default)]
    expiring_before: Option<String>,
    /// From a previous page's `next_cursor`.
    #[serde(default)]
    cursor: Option<String>,
    /// Items per page, 1..=500 (default 100).
    #[serde(default)]
    limit: Option<String>,
}

/// The largest page a listing gives.
pub(super) const MAX_PAGE: usize = 500;
/// The page size when none is asked for.
pub(super) const DEFAULT_PAGE: usize = 100;

/// A listing's `limit`, 1..=[`MAX_PAGE`].
pub(super) fn parse_limit(limit: Option<&str>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or(ApiError::InvalidField("limit must be an integer from 1 to 500")),
    }
}

/// A listing's opaque cursor: the URL-safe base64 of what the page ended on.
pub(super) fn encode_cursor(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes a cursor made by [`encode_cursor`] (at most 256 bytes).
pub(super) fn decode_cursor(cursor: &str) -> Result<Vec<u8>, ApiError> {
    use base64::Engine;
    let bad = || ApiError::InvalidField("cursor must be a next_cursor this listing returned");
    if cursor.len() > 344 {
        return Err(bad());
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| bad())
}

/// `YYYY-MM` (a month from 2000-01 to 2099-12).
fn parse_month(s: &str) -> Result<(u16, u8), ApiError> {
    let bad = || ApiError::InvalidField("expiring_before must be a month, YYYY-MM (2000-01 to 2099-12)");
    let (y, m) = s.split_once('-').ok_or_else(bad)?;
    if y.len() != 4 || m.len() != 2 || !y.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let (y, m): (u16, u8) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if !(2000..=2099).contains(&y) || !(1..=12).contains(&m) {
        return Err(bad());
    }
    Ok((y, m))
}

#[derive(Serialize)]
struct TokenPageBody<'a> {
    items: Vec<TokenBody<'a>>,
    next_cursor: Option<String>,
}

/// GET /v1/tokens?expiring_before=YYYY-MM&cursor=…&limit=…
pub(super) async fn list(
    state: web::Data<AppState>,
    caller: Caller<TokensRead>,
    query: Result<web::Query<ListQuery>, actix_web::Error>,
) -> Result<HttpResponse, ApiError> {
    let parsed = (|| {
        let q = query.map_err(|_| {
            ApiError::InvalidField("the query takes expiring_before, cursor and limit, each at most once")
        })?;
        let before = q.expiring_before.as_deref().map(parse_month).transpose()?;
        let after = q
            .cursor
            .as_deref()
            .map(|c| {
                let bytes = decode_cursor(c)?;
                std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(Token::parse)
                    .ok_or(ApiError::InvalidField(
                        "cursor must be a next_cursor this listing returned",
                    ))
            })
            .transpose()?;
        Ok::<_, ApiError>((before, after, parse_limit(q.limit.as_deref())?))
    })();
    let (before, after, limit) = match parsed {
        Ok(p) => p,
        Err(e) => {
            state.audit(caller.event("token.list", e.code(), None)).await?;
            return Err(e);
        }
    };
    let page = state
        .vault
        .list_tokens(
            caller.principal.tenant.clone(),
            before,
            after,
            limit,
            caller.event("token.list", "", None),
        )
        .await;
    match page {
        Ok(page) => {
            let dedupe = caller.principal.may(Scope::TokensDedupe);
            Ok(HttpResponse::Ok().json(TokenPageBody {
                items: page.items.iter().map(|m| TokenBody::new(m, dedupe)).collect(),
                next_cursor: page.next.map(|t| encode_cursor(t.as_str().as_bytes())),
            }))
        }
        Err(e) => {
            let e = vault_error(e);
            state.audit(caller.event("token.list", e.code(), None)).await?;
            Err(e)
        }
    }
}

/// GET /v1/tokens/{token}
pub(super) async fn read(
    state: web::Data<AppState>,
    caller: Caller<TokensRead>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let result = match parse_token(&path, &state, "read") {
        Ok(token) => state
            .vault
            .metadata(
                caller.principal.tenant.clone(),
                token,
                caller.event("token.read", "", None),
            )
            .await
            .map_err(|e| {
                state.metrics.reads.with_label_values(&[error_outcome(&e)]).inc();
                vault_error(e)
            }),
        Err(e) => Err(e),
    };
    let shown = Token::parse(&path).map(|t| t.to_string());
    match result {
        Ok(meta) => {
            // Audited (durably) by the vault with the read.
            state.metrics.reads.with_label_values(&["ok"]).inc();
            Ok(HttpResponse::Ok().json(TokenBody::new(&meta, caller.principal.may(Scope::TokensDedupe))))
        }
        Err(e) => {
            state.audit(caller.event("token.read", e.code(), shown)).await?;
            Err(e)
        }
    }
}

/// POST /v1/detokenize
pub(super) async fn detokenize(
    state: web::Data<AppState>,
    caller: Caller<TokensDetokenize>,
    body: ApiJson<DetokenizeBody>,
) -> Result<HttpResponse, ApiError> {
    let shown = Token::parse(&body.0.token).map(|t| t.to_string());
    if let Some(guard) = &state.anomaly {
        use crate::limits::AnomalyVerdict;
        let refused = match guard.check(&caller.principal.sub) {
            AnomalyVerdict::Allow => None,
            AnomalyVerdict::Flagged { count, threshold } => {
                state.metrics.anomalies.with_label_values(&["flagged"]).inc();
                tracing::warn!(sub = %caller.principal.sub, count, threshold, "detokenize anomaly: client throttled");
                let mut event = caller.event("anomaly.detokenize", "throttled", None);
                event.detail = Some(format!(
                    "{count} detokenize requests in the window, threshold {threshold}"
                ));
                state.audit(event).await?;
                Some(ApiError::AnomalyThrottled(guard.cooldown()))
            }
            AnomalyVerdict::Throttled(wait) => {
                state.metrics.anomalies.with_label_values(&["refused"]).inc();
                Some(ApiError::AnomalyThrottled(wait))
            }
        };
        if let Some(e) = refused {
            state.metrics.detokenize.with_label_values(&["throttled"]).inc();
            state.audit(caller.event("detokenize", e.code(), shown)).await?;
            return Err(e);
        }
    }
    let result = match parse_token(&body.0.token, &state, "detokenize") {
        Ok(token) => state
            .vault
            .detokenize(
                caller.principal.tenant.clone(),
                token,
                caller.event("detokenize", "", None),
            )
            .await
            .map_err(|e| {
                state.metrics.detokenize.with_label_values(&[error_outcome(&e)]).inc();
                vault_error(e)
            }),
        Err(e) => Err(e),
    };
    match result {
        Ok(revealed) => {
            // Audited (durably) by the vault before it returned the card.
            state.metrics.detokenize.with_label_values(&["ok"]).inc();
            let body = RevealedBody {
                token: revealed.token.as_str(),
                pan: revealed.card.pan.expose_digits(),
                exp_month: revealed.card.expiry.month(),
                exp_year: revealed.card.expiry.year(),
                cardholder_name: revealed.card.name.as_ref().map(CardholderName::expose),
            };
            Ok(HttpResponse::Ok().json(body))
        }
        Err(e) => {
            state.audit(caller.event("detokenize", e.code(), shown)).await?;
            Err(e)
        }
    }
}

/// Validates a card update (expiry not in the past; the name as for tokenize).
pub(super) fn parse_card_update(body: &CardUpdateBody) -> Result<(Expiry, Option<CardholderName>), ApiError> {
    parse_expiry_and_name(body.exp_month, body.exp_year, body.cardholder_name.as_ref())
}

/// PATCH /v1/tokens/{token}
pub(super) async fn update(
    state: web::Data<AppState>,
    caller: Caller<TokensUpdate>,
    path: web::Path<String>,
    body: SecretJson<CardUpdateBody>,
) -> Result<HttpResponse, ApiError> {
    let shown = Token::parse(&path).map(|t| t.to_string());
    let result = match (
        Token::parse(&path).ok_or(ApiError::NotFound),
        parse_card_update(&body.0),
    ) {
        (Ok(token), Ok((expiry, name))) => state
            .vault
            .update_card(
                caller.principal.tenant.clone(),
                token,
                expiry,
                name,
                caller.event("token.update", "", None),
            )
            .await
            .map_err(vault_error),
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    match result {
        // Audited (durably) by the vault after the update.
        Ok(meta) => Ok(HttpResponse::Ok().json(TokenBody::new(&meta, caller.principal.may(Scope::TokensDedupe)))),
        Err(e) => {
            state.audit(caller.event("token.update", e.code(), shown)).await?;
            Err(e)
        }
    }
}

/// DELETE /v1/tokens/{token}
pub(super) async fn delete(
    state: web::Data<AppState>,
    caller: Caller<TokensDelete>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let shown = Token::parse(&path).map(|t| t.to_string());
    let result = match parse_token(&path, &state, "delete") {
        Ok(token) => state
            .vault
            .delete(
                caller.principal.tenant.clone(),
                token,
                caller.event("token.delete", "", None),
            )
            .await
            .map_err(|e| {
                state.metrics.delete.with_label_values(&[error_outcome(&e)]).inc();
                vault_error(e)
            }),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => {
            // Audited by the vault in the same write as the deletion.
            state.metrics.delete.with_label_values(&["deleted"]).inc();
            Ok(HttpResponse::NoContent().finish())
        }
        Err(e) => {
            state.audit(caller.event("token.delete", e.code(), shown)).await?;
            Err(e)
        }
    }
}

/// A string that does not have a token's shape cannot name a token: 404 without
/// a lookup (and without logging it: it might be a PAN sent by mistake).
fn parse_token(s: &str, state: &AppState, op: &'static str) -> Result<Token, ApiError> {
    Token::parse(s).ok_or_else(|| {
        let counter = match op {
            "read" => &state.metrics.reads,
            "detokenize" => &state.metrics.detokenize,
            _ => &state.metrics.delete,
        };
        counter.with_label_values(&["not_found"]).inc();
        ApiError::NotFound
    })
}

fn error_outcome(e: &VaultError) -> &'static str {
    match e {
        VaultError::NotFound => "not_found",
        VaultError::TokenSpaceExhausted => "exhausted",
        VaultError::KeyDestroyed => "key_destroyed",
        VaultError::KeyUnavailable => "key_unavailable",
        e if e.is_integrity() => "integrity",
        VaultError::Sealed => "sealed",
        VaultError::RecordLost => "lost",
        VaultError::StoreDamaged => "store_damaged",
        VaultError::EnumerationSuspected { .. } => "enumeration",
        VaultError::PspNotConfigured
        | VaultError::IdempotencyMismatch
        | VaultError::ChargeState(_)
        | VaultError::AmountRefused(_) => "error",
        VaultError::Integrity
        | VaultError::Store(_)
        | VaultError::Task
        | VaultError::KeyRefused(_)
        | VaultError::Keystore(_) => "error",
    }
}

fn vault_error(e: VaultError) -> ApiError {
    ApiError::from(e)
}
