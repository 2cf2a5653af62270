//! Detokenize-and-charge (PSP connector only): `POST /v1/charges` with an
//! `Idempotency-Key`, and `GET /v1/charges/{id}` for the stored outcome.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::extract::{ApiJson, Caller, ChargesCreate, ChargesRead};
use super::problem::ApiError;
use crate::domain::token::Token;
use crate::psp::{Amount, Recurring, ShopperInteraction};
use crate::service::ChargeInput;
use crate::store::ChargeRecord;

/// Active ISO 4217 currency codes.
const ISO_4217: &str = "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN BWP \
BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ \
GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD \
MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR \
RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH \
UGX USD UYU UZS VES VND VUV WST XAF XCD XOF XPF YER ZAR ZMW ZWL";

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChargeBody {
    token: String,
    amount: Amount,
    reference: String,
    shopper_interaction: ShopperInteraction,
    #[serde(default)]
    recurring: Option<Recurring>,
}

#[derive(Serialize)]
struct ChargeView<'a> {
    id: &'a str,
    status: &'a str,
    psp_reference: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refusal_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    network_transaction_id: Option<&'a str>,
    created_at: String,
    token: &'a str,
    amount: Amount,
    reference: &'a str,
    shopper_interaction: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    recurring: Option<serde_json::Value>,
    cvv_sent: bool,
}

fn view(c: &ChargeRecord) -> ChargeView<'_> {
    ChargeView {
        id: &c.id,
        status: &c.status,
        psp_reference: c.psp_reference.as_deref(),
        refusal_reason: c.refusal_reason.as_deref(),
        network_transaction_id: c.network_transaction_id.as_deref(),
        created_at: time::OffsetDateTime::from_unix_timestamp(c.created_at)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_default(),
        token: &c.token,
        amount: Amount {
            value: c.amount_value,
            currency: c.currency.clone(),
        },
        reference: &c.reference,
        shopper_interaction: &c.shopper_interaction,
        recurring: c
            .recurring
            .as_ref()
            .map(|(m, s)| serde_json::json!({"model": m, "sequence": s})),
        cvv_sent: c.cvv_sent,
    }
}

fn idempotency_key(req: &HttpRequest) -> Result<String, ApiError> {
    req.headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .ok_or(ApiError::IdempotencyKeyRequired)
}

pub(super) fn parse(body: ChargeBody) -> Result<ChargeInput, ApiError> {
    let token = Token::parse(&body.token).ok_or(ApiError::NotFound)?;
    if body.amount.value == 0 || body.amount.value > 10_000_000_000 {
        return Err(ApiError::InvalidField(
            "amount.value must be 1 to 10000000000 minor units",
        ));
    }
    let c = &body.amount.currency;
    if c.len() != 3 || !ISO_4217.split_whitespace().any(|code| code == c) {
        return Err(ApiError::InvalidField(
            "amount.currency must be an ISO 4217 code such as EUR",
        ));
    }
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
    })
}

/// POST /v1/charges
pub async fn create(
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
    let c = &outcome.charge;
    if outcome.replayed {
        state.metrics.charges.with_label_values(&["replayed"]).inc();
    } else {
        state.metrics.charges.with_label_values(&[c.status.as_str()]).inc();
        if let Some(secs) = outcome.psp_seconds {
            state.metrics.psp_duration.observe(secs);
        }
        for e in &outcome.psp_errors {
            state.metrics.psp_errors.with_label_values(&[e.kind()]).inc();
        }
    }
    let mut event = caller.event(
        "charge",
        if outcome.replayed {
            "replayed"
        } else {
            c.status.as_str()
        },
        shown,
    );
    event.detail = Some(format!("charge {}", c.id));
    state.audit(event).await?;
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

/// GET /v1/charges/{id}
pub async fn read(
    state: web::Data<AppState>,
    caller: Caller<ChargesRead>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    // An id that is not a charge id (or carries a card number) is neither looked up
    // nor written to the audit trail.
    let bogus = !id.starts_with("ch_")
        || id.len() > 64
        || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        || crate::domain::card::contains_pan(&id);
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
