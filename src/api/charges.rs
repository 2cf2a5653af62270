//! Detokenize-and-charge (PSP connector only): `POST /v1/charges` with an
//! `Idempotency-Key`, `GET /v1/charges/{id}` for the stored outcome, and the
//! payment's life after it: `POST /v1/charges/{id}/captures`, `/refunds` and
//! `/cancel`, each with an `Idempotency-Key` and a scope of its own.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::extract::{ApiJson, Caller, ChargesCancel, ChargesCapture, ChargesCreate, ChargesRead, ChargesRefund};
use super::problem::ApiError;
use crate::domain::token::Token;
use crate::psp::{Amount, ModificationKind, Recurring, ShopperInteraction};
use crate::service::views::{ChargeView, ModificationView, charge_view as view, modification_view};
use crate::service::{ChargeFilter, ChargeInput, ModificationInput};

/// Active ISO 4217 currency codes.
const ISO_4217: &str = "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN BWP \
BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ \
GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD \
MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR \
RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH \
UGX USD UYU UZS VES VND VUV WST XAF XCD XOF XPF YER ZAR ZMW ZWL";

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ChargeBody {
    token: String,
    amount: Amount,
    reference: String,
    shopper_interaction: ShopperInteraction,
    #[serde(default)]
    recurring: Option<Recurring>,
    /// `automatic` (default: the PSP captures at once) or `manual`.
    #[serde(default)]
    capture: Option<CaptureMode>,
}

#[derive(Deserialize, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum CaptureMode {
    Automatic,
    Manual,
}

/// `POST /v1/charges/{id}/captures`.
#[derive(Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct CaptureBody {
    #[serde(default)]
    amount: Option<Amount>,
}

/// `POST /v1/charges/{id}/refunds`.
#[derive(Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RefundBody {
    #[serde(default)]
    amount: Option<Amount>,
    #[serde(default)]
    reason: Option<String>,
}

/// A metric label for a PSP refusal reason: one of a fixed set (Adyen's common
/// `refusalReason` values), never the PSP's free text, so the label space stays
/// bounded whatever a PSP sends.
pub(super) fn refusal_label(reason: Option<&str>) -> &'static str {
    const KNOWN: &[(&str, &str)] = &[
        ("insufficient funds", "insufficient_funds"),
        ("not enough balance", "insufficient_funds"),
        ("do not honor", "do_not_honor"),
        ("card declined", "declined"),
        ("declined non generic", "declined"),
        ("refused", "declined"),
        ("expired card", "expired_card"),
        ("invalid card number", "invalid_card"),
        ("cvc declined", "cvc_declined"),
        ("blocked card", "blocked_card"),
        ("restricted card", "restricted_card"),
        ("withdrawal amount exceeded", "amount_limit"),
        ("withdrawal count exceeded", "amount_limit"),
        ("fraud", "fraud"),
        ("issuer unavailable", "issuer_unavailable"),
        ("acquirer error", "acquirer_error"),
        ("3d not authenticated", "authentication"),
    ];
    let Some(r) = reason else { return "none" };
    let r = r.trim().to_ascii_lowercase();
    KNOWN
        .iter()
        .find(|(text, _)| r == *text || r.starts_with(&format!("{text} ")) || r.starts_with(&format!("{text}-")))
        .map_or("other", |(_, label)| label)
}

fn idempotency_key(req: &HttpRequest) -> Result<String, ApiError> {
    req.headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .ok_or(ApiError::IdempotencyKeyRequired)
}

/// Whether `code` is an active ISO 4217 currency code.
pub(super) fn is_currency(code: &str) -> bool {
    code.len() == 3 && ISO_4217.split_whitespace().any(|c| c == code)
}

fn check_amount(amount: &Amount) -> Result<(), ApiError> {
    if amount.value == 0 || amount.value > 10_000_000_000 {
        return Err(ApiError::InvalidField(
            "amount.value must be 1 to 10000000000 minor units",
        ));
    }
    let c = &amount.currency;
    if c.len() != 3 || !ISO_4217.split_whitespace().any(|code| code == c) {
        return Err(ApiError::InvalidField(
            "amount.currency must be an ISO 4217 code such as EUR",
        ));
    }
    Ok(())
}

pub(super) fn parse(body: ChargeBody) -> Result<ChargeInput, ApiError> {
    let token = Token::parse(&body.token).ok_or(ApiError::NotFound)?;
    check_amount(&body.amount)?;
    let r = &body.reference;
    if r.is_empty() || r.chars().count() > 80 || r.chars().any(char::is_control) {
        return Err(ApiError::InvalidField(
            "reference must be 1 to 80 characters without control characters",
        ));
    }
    // A reference travels to the PSP and into charge records: it must not carry a
    // card number, however it is grouped.
    if crate::domain::card::contains_pan(r) {
        return Err(ApiError::InvalidField("reference must not contain a card number"));
    }
    if body.shopper_interaction == ShopperInteraction::ContAuth && body.recurring.is_none() {
        return Err(ApiError::InvalidField(
            "cont_auth charges need recurring: {model, sequence}",
        ));
    }
    Ok(ChargeInput {
        token,
        amount: body.amount,
        reference: body.reference,
        interaction: body.shopper_interaction,
        recurring: body.recurring,
        manual_capture: body.capture == Some(CaptureMode::Manual),
    })
}

/// Validates a modification body (amounts as for charges; a refund reason is
/// bounded free text that must not carry a card number).
pub(super) fn parse_modification(
    kind: ModificationKind,
    amount: Option<Amount>,
    reason: Option<String>,
) -> Result<ModificationInput, ApiError> {
    if let Some(a) = &amount {
        check_amount(a)?;
    }
    if let Some(r) = &reason
        && (r.is_empty() || r.chars().count() > 200 || r.chars().any(char::is_control))
    {
        return Err(ApiError::InvalidField(
            "reason must be 1 to 200 characters without control characters",
        ));
    }
    if reason.as_deref().is_some_and(crate::domain::card::contains_pan) {
        return Err(ApiError::InvalidField("reason must not contain a card number"));
    }
    Ok(ModificationInput { kind, amount, reason })
}

/// A refund body's validation (for the fuzz entry point).
#[doc(hidden)]
pub(super) fn parse_refund_body(body: RefundBody) -> Result<ModificationInput, ApiError> {
    parse_modification(ModificationKind::Refund, body.amount, body.reason)
}

/// Whether `id` can be a charge id (anything else is neither looked up nor audited as is).
fn bogus_charge_id(id: &str) -> bool {
    !id.starts_with("ch_")
        || id.len() > 64
        || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        || crate::domain::card::contains_pan(id)
}

#[derive(Serialize)]
struct ModificationAnswer<'a> {
    #[serde(flatten)]
    modification: ModificationView<'a>,
    charge: ChargeView<'a>,
}

/// The shared body of the three modification endpoints.
async fn modify(
    req: HttpRequest,
    state: web::Data<AppState>,
    principal: &crate::auth::Principal,
    event: impl Fn(&'static str, String) -> crate::audit::AuditEvent,
    id: String,
    parsed: Result<ModificationInput, ApiError>,
    kind: ModificationKind,
) -> Result<HttpResponse, ApiError> {
    let action = match kind {
        ModificationKind::Capture => "charge.capture",
        ModificationKind::Refund => "charge.refund",
        ModificationKind::Cancel => "charge.cancel",
    };
    let bogus = bogus_charge_id(&id);
    let prepared = if bogus {
        Err(ApiError::NotFound)
    } else {
        idempotency_key(&req).and_then(|key| parsed.map(|input| (key, input)))
    };
    let result = match prepared {
        Ok((key, input)) => state
            .vault
            .modify_charge(&principal.sub, principal.tenant.clone(), &id, &key, input)
            .await
            .map_err(ApiError::from),
        Err(e) => Err(e),
    };
    let op = kind.as_str();
    let outcome = match result {
        Ok(o) => o,
        Err(e) => {
            state.metrics.modifications.with_label_values(&[op, "rejected"]).inc();
            let mut ev = event(action, e.code().to_owned());
            ev.detail = (!bogus).then(|| format!("charge {id}"));
            state.audit(ev).await?;
            return Err(e);
        }
    };
    let m = &outcome.modification;
    let c = &outcome.charge;
    if outcome.replayed {
        state.metrics.modifications.with_label_values(&[op, "replayed"]).inc();
    } else {
        state
            .metrics
            .modifications
            .with_label_values(&[op, m.status.as_str()])
            .inc();
        if let Some(secs) = outcome.psp_seconds {
            state.metrics.psp_duration.with_label_values(&[op]).observe(secs);
        }
        for e in &outcome.psp_errors {
            state.metrics.psp_errors.with_label_values(&[e.kind()]).inc();
        }
        if kind == ModificationKind::Refund && m.status == "received" {
            state
                .metrics
                .refunded
                .with_label_values(&[c.currency.as_str()])
                .inc_by(m.amount_value.unwrap_or(0));
        }
    }
    let mut ev = event(
        action,
        if outcome.replayed {
            "replayed".to_owned()
        } else {
            m.status.clone()
        },
    );
    ev.detail = Some(match m.amount_value {
        Some(v) => format!("charge {} {} {v} {}", c.id, m.id, c.currency),
        None => format!("charge {} {}", c.id, m.id),
    });
    state.audit(ev).await?;
    // 202: reserved and sent, outcome unknown; a retry with the same key reconciles.
    let mut res = if m.status == crate::service::STATUS_PENDING {
        HttpResponse::Accepted()
    } else {
        HttpResponse::Created()
    };
    res.insert_header((header::LOCATION, format!("/v1/charges/{}", c.id)));
    if outcome.replayed {
        res.insert_header(("Idempotent-Replayed", "true"));
    }
    Ok(res.json(ModificationAnswer {
        modification: modification_view(c, m),
        charge: view(c),
    }))
}

/// POST /v1/charges/{id}/captures
pub(super) async fn capture(
    req: HttpRequest,
    state: web::Data<AppState>,
    caller: Caller<ChargesCapture>,
    path: web::Path<String>,
    body: ApiJson<CaptureBody>,
) -> Result<HttpResponse, ApiError> {
    let parsed = parse_modification(ModificationKind::Capture, body.0.amount, None);
    let event = |action, outcome| caller.event(action, outcome, None);
    modify(
        req,
        state,
        &caller.principal,
        event,
        path.into_inner(),
        parsed,
        ModificationKind::Capture,
    )
    .await
}

/// POST /v1/charges/{id}/refunds
pub(super) async fn refund(
    req: HttpRequest,
    state: web::Data<AppState>,
    caller: Caller<ChargesRefund>,
    path: web::Path<String>,
    body: ApiJson<RefundBody>,
) -> Result<HttpResponse, ApiError> {
    let b = body.0;
    let parsed = parse_modification(ModificationKind::Refund, b.amount, b.reason);
    let event = |action, outcome| caller.event(action, outcome, None);
    modify(
        req,
        state,
        &caller.principal,
        event,
        path.into_inner(),
        parsed,
        ModificationKind::Refund,
    )
    .await
}

/// POST /v1/charges/{id}/cancel (no body: the whole authorisation is released)
pub(super) async fn cancel(
    req: HttpRequest,
    state: web::Data<AppState>,
    caller: Caller<ChargesCancel>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let parsed = parse_modification(ModificationKind::Cancel, None, None);
    let event = |action, outcome| caller.event(action, outcome, None);
    modify(
        req,
        state,
        &caller.principal,
        event,
        path.into_inner(),
        parsed,
        ModificationKind::Cancel,
    )
    .await
}

/// POST /v1/charges
pub(super) async fn create(
    req: HttpRequest,
    state: web::Data<AppState>,
    caller: Caller<ChargesCreate>,
    body: ApiJson<ChargeBody>,
) -> Result<HttpResponse, ApiError> {
    let shown = Token::parse(&body.0.token).map(|t| t.to_string());
    let prepared = idempotency_key(&req).and_then(|key| parse(body.0).map(|input| (key, input)));
    let result = match prepared {
        Ok((key, input)) => {
            let p = &caller.principal;
            state
                .vault
                .charge(&p.sub, p.tenant.clone(), &key, input)
                .await
                .map_err(ApiError::from)
        }
        Err(e) => Err(e),
    };
    let outcome = match result {
        Ok(o) => o,
        Err(e) => {
            state.metrics.charges.with_label_values(&["rejected"]).inc();
            state.audit(caller.event("charge", e.code(), shown)).await?;
            return Err(e);
        }
    };
    note_charge(&state, caller.event("charge", "", shown), &outcome).await?;
    let c = &outcome.charge;
    // 202: reserved and sent, but the PSP's verdict is not known yet; a retry with
    // the same Idempotency-Key reconciles (one authorisation at most).
    let mut res = if c.status == crate::service::STATUS_PENDING {
        HttpResponse::Accepted()
    } else {
        HttpResponse::Created()
    };
    res.insert_header((header::LOCATION, format!("/v1/charges/{}", c.id)));
    if outcome.replayed {
        res.insert_header(("Idempotent-Replayed", "true"));
    }
    Ok(res.json(view(c)))
}

/// Counts a charge's outcome (status, refusal reason, PSP latency and errors) and
/// appends `event` with it, durably.
pub(super) async fn note_charge(
    state: &AppState,
    event: crate::audit::AuditEvent,
    outcome: &crate::service::ChargeOutcome,
) -> Result<(), ApiError> {
    let c = &outcome.charge;
    if outcome.replayed {
        state.metrics.charges.with_label_values(&["replayed"]).inc();
    } else {
        state.metrics.charges.with_label_values(&[c.status.as_str()]).inc();
        if c.status == "refused" {
            state
                .metrics
                .refusals
                .with_label_values(&[refusal_label(c.refusal_reason.as_deref())])
                .inc();
        }
        if let Some(secs) = outcome.psp_seconds {
            state
                .metrics
                .psp_duration
                .with_label_values(&["authorise"])
                .observe(secs);
        }
        for e in &outcome.psp_errors {
            state.metrics.psp_errors.with_label_values(&[e.kind()]).inc();
        }
    }
    let event = crate::audit::AuditEvent {
        outcome: if outcome.replayed {
            "replayed".to_owned()
        } else {
            c.status.clone()
        },
        detail: Some(format!("charge {}", c.id)),
        ..event
    };
    state.audit(event).await
}

/// GET /v1/charges/{id}
pub(super) async fn read(
    state: web::Data<AppState>,
    caller: Caller<ChargesRead>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    // An id that is not a charge id (or carries a card number) is neither looked up
    // nor written to the audit trail.
    let bogus = bogus_charge_id(&id);
    let result = if bogus {
        Err(ApiError::NotFound)
    } else {
        state
            .vault
            .get_charge(caller.principal.tenant.clone(), id.clone())
            .await
            .map_err(ApiError::from)
    };
    let mut event = caller.event("charge.read", result.as_ref().map_or_else(|e| e.code(), |_| "ok"), None);
    event.detail = (!bogus).then(|| format!("charge {id}"));
    state.audit(event).await?;
    Ok(HttpResponse::Ok().json(view(&result?)))
}

/// `GET /v1/charges` query: one of `token` or `reference`, a cursor, a page size.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    reference: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<String>,
}

#[derive(Serialize)]
struct ChargePage<'a> {
    items: Vec<ChargeView<'a>>,
    next_cursor: Option<String>,
}

/// A charge listing's filter, cursor (creation time, id) and page size.
type ChargeListing = (ChargeFilter, Option<(i64, String)>, usize);

/// What a charge listing asks for, checked.
fn parse_list(q: ListQuery) -> Result<ChargeListing, ApiError> {
    let of = match (q.token, q.reference) {
        (Some(t), None) => ChargeFilter::Token(
            Token::parse(&t)
                .ok_or(ApiError::InvalidField("token must be a token of this vault"))?
                .to_string(),
        ),
        (None, Some(r)) => {
            if r.is_empty()
                || r.chars().count() > 80
                || r.chars().any(char::is_control)
                || crate::domain::card::contains_pan(&r)
            {
                return Err(ApiError::InvalidField(
                    "reference must be 1 to 80 characters without control characters or a card number",
                ));
            }
            ChargeFilter::Reference(r)
        }
        _ => return Err(ApiError::InvalidField("give exactly one of token and reference")),
    };
    let after = q
        .cursor
        .as_deref()
        .map(|c| {
            let bytes = super::tokens::decode_cursor(c)?;
            let bad = || ApiError::InvalidField("cursor must be a next_cursor this listing returned");
            let (at, id) = bytes.split_at_checked(8).ok_or_else(bad)?;
            let id = std::str::from_utf8(id).map_err(|_| bad())?;
            if bogus_charge_id(id) {
                return Err(bad());
            }
            Ok((i64::from_be_bytes(at.try_into().map_err(|_| bad())?), id.to_owned()))
        })
        .transpose()?;
    Ok((of, after, super::tokens::parse_limit(q.limit.as_deref())?))
}

/// GET /v1/charges?token=…|reference=…&cursor=…&limit=…
pub(super) async fn list(
    state: web::Data<AppState>,
    caller: Caller<ChargesRead>,
    query: Result<web::Query<ListQuery>, actix_web::Error>,
) -> Result<HttpResponse, ApiError> {
    let parsed = query
        .map_err(|_| ApiError::InvalidField("the query takes token or reference, cursor and limit, each at most once"))
        .and_then(|q| parse_list(q.into_inner()));
    let result = match parsed {
        Ok((of, after, limit)) => state
            .vault
            .list_charges(caller.principal.tenant.clone(), of, after, limit)
            .await
            .map(|page| (page, limit))
            .map_err(ApiError::from),
        Err(e) => Err(e),
    };
    let mut event = caller.event("charge.list", result.as_ref().map_or_else(|e| e.code(), |_| "ok"), None);
    if let Ok((page, _)) = &result {
        event.detail = Some(format!("{} charges listed", page.len()));
    }
    state.audit(event).await?;
    let (page, limit) = result?;
    let next_cursor = (page.len() == limit).then(|| {
        let last = &page[page.len() - 1];
        let mut bytes = last.created_at.to_be_bytes().to_vec();
        bytes.extend_from_slice(last.id.as_bytes());
        super::tokens::encode_cursor(&bytes)
    });
    Ok(HttpResponse::Ok().json(ChargePage {
        items: page.iter().map(view).collect(),
        next_cursor,
    }))
}

#[cfg(test)]
mod tests {
    use super::refusal_label;

    #[test]
    fn refusal_reasons_map_to_a_bounded_label_set() {
        assert_eq!(refusal_label(Some("Insufficient funds")), "insufficient_funds");
        assert_eq!(refusal_label(Some("Do not honor")), "do_not_honor");
        assert_eq!(refusal_label(Some("Card declined")), "declined");
        assert_eq!(refusal_label(Some("FRAUD-RESULT")), "fraud");
        assert_eq!(refusal_label(None), "none");
        // Free text, however creative, is one label.
        assert_eq!(refusal_label(Some("call 4111111111111111 now")), "other");
        assert_eq!(refusal_label(Some("insufficient fundsX")), "other");
    }
}
