//! `POST /v1/connectors/voice-pay`: the payment-connector webhook of voice
//! platforms' `<Pay>` (Twilio's Generic Pay Connector, SignalWire's
//! `payment_connector_url`). The platform captures the card by DTMF, masked from
//! the agent, and posts it here; the vault answers with a token, or charges it
//! through the configured PSP, in the platform's own answer shape.
//!
//! - Authentication: HTTP Basic against a registry client with a
//!   `basic_password_hash` (Argon2id; verified off the async workers, a few at a
//!   time, remembered for 5 minutes); deny by default, failure-budgeted per source
//!   like every credential, optional certificate pin.
//! - `transaction_id` is the idempotency key: the platforms resend it on a
//!   timeout, and a resend answers the first outcome (one token, one charge).
//! - The two platforms differ: Twilio sends `method` `charge`/`tokenize` and
//!   `amount`; SignalWire sends `method` `credit-card` (or none) and
//!   `chargeAmount`, a string or a number, and means tokenize when it is 0 or
//!   missing. Years come as two digits, amounts as decimal strings, converted
//!   exactly (never through floating point) by the currency's minor-unit exponent.
//! - Failures answer non-200 with `{charge_id|token_id, error_code,
//!   error_message}` from a fixed vocabulary; nothing a caller sent is echoed.

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::AppState;
use super::problem::REQUEST_ID;
use crate::audit::AuditEvent;
use crate::auth::{AuthError, Principal};
use crate::domain::card::{CardPayload, Cvv, Expiry, ExpiryError, Pan};
use crate::domain::scope::Scope;
use crate::limits::LimitClass;
use crate::psp::{Amount, ShopperInteraction};
use crate::service::{ChargeInput, TokenizeCaller, TokenizeInput, VaultError};

/// What a platform posts. Fields not listed (`postal_code`, `description`,
/// `parameters`, …) are ignored: the platforms add fields. ACH (bank account
/// fields) is not supported and answers `invalid_request`.
#[derive(Deserialize)]
pub(super) struct VoicePayBody {
    #[serde(default)]
    transaction_id: Option<String>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    cardnumber: Option<SecretString>,
    #[serde(default)]
    cvv: Option<SecretString>,
    #[serde(default)]
    expiry_month: Option<Value>,
    #[serde(default)]
    expiry_year: Option<Value>,
    #[serde(default)]
    amount: Option<Value>,
    #[serde(default, rename = "chargeAmount")]
    charge_amount: Option<Value>,
    #[serde(default)]
    currency_code: Option<String>,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    bankaccountnumber: Option<IgnoredAny>,
}

/// Tokenize or charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Tokenize,
    Charge,
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::Tokenize => "tokenize",
            Op::Charge => "charge",
        }
    }
}

/// A failure in the platforms' vocabulary: status, `error_code`, `error_message`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Failure(StatusCode, &'static str, &'static str);

const INVALID_REQUEST: Failure = Failure(
    StatusCode::BAD_REQUEST,
    "invalid_request",
    "the request is not a card payment this connector understands",
);
const INVALID_CARD: Failure = Failure(
    StatusCode::BAD_REQUEST,
    "invalid_card_number",
    "the card number is not valid",
);
const EXPIRED_CARD: Failure = Failure(StatusCode::BAD_REQUEST, "expired_card", "the card has expired");
const INVALID_EXPIRY: Failure = Failure(
    StatusCode::BAD_REQUEST,
    "invalid_expiry_date",
    "the expiry date is not valid",
);
const INVALID_CVV: Failure = Failure(StatusCode::BAD_REQUEST, "invalid_cvv", "the security code is not valid");
const INVALID_AMOUNT: Failure = Failure(
    StatusCode::BAD_REQUEST,
    "invalid_amount",
    "the amount is not a valid amount in that currency",
);
const INVALID_CURRENCY: Failure = Failure(
    StatusCode::BAD_REQUEST,
    "invalid_currency",
    "the currency is not an ISO 4217 code",
);
const UNAUTHORIZED: Failure = Failure(
    StatusCode::UNAUTHORIZED,
    "unauthorized",
    "the connector credentials are not valid",
);
const NOT_PERMITTED: Failure = Failure(
    StatusCode::FORBIDDEN,
    "not_permitted",
    "this connector client may not do this",
);
const RATE_LIMITED: Failure = Failure(
    StatusCode::TOO_MANY_REQUESTS,
    "rate_limited",
    "too many requests; retry later",
);
const DECLINED: Failure = Failure(
    StatusCode::PAYMENT_REQUIRED,
    "card_declined",
    "the payment was declined",
);
const DUPLICATE: Failure = Failure(
    StatusCode::CONFLICT,
    "duplicate_transaction",
    "this transaction_id was already used for another request",
);
const PSP_UNAVAILABLE: Failure = Failure(
    StatusCode::SERVICE_UNAVAILABLE,
    "psp_unavailable",
    "the payment provider could not be reached; retry with the same transaction_id",
);
const PSP_ERROR: Failure = Failure(
    StatusCode::BAD_GATEWAY,
    "processing_error",
    "the payment provider did not accept the request; nothing was charged",
);
const VAULT_UNAVAILABLE: Failure = Failure(
    StatusCode::SERVICE_UNAVAILABLE,
    "vault_unavailable",
    "the vault cannot take payments right now; retry later",
);
const INTERNAL: Failure = Failure(
    StatusCode::INTERNAL_SERVER_ERROR,
    "internal_error",
    "the request failed",
);

/// The platforms' answer: the id (or null) and the error fields.
fn answer(op: Op, status: StatusCode, id: Option<&str>, error: Option<Failure>) -> HttpResponse {
    let id_field = match op {
        Op::Tokenize => "token_id",
        Op::Charge => "charge_id",
    };
    let mut body = json!({
        "error_code": error.map(|f| f.1),
        "error_message": error.map(|f| f.2),
    });
    body[id_field] = id.map_or(Value::Null, |i| Value::String(i.to_owned()));
    let mut res = HttpResponse::build(status);
    if status == StatusCode::UNAUTHORIZED {
        res.insert_header((header::WWW_AUTHENTICATE, "Basic realm=\"tokenvault\""));
    }
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        res.insert_header((header::RETRY_AFTER, "1"));
    }
    res.insert_header((header::CACHE_CONTROL, "no-store"));
    res.json(body)
}

/// A month (1–12) or a year (two or four digits) as a string or a number.
fn number_of(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) if !s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
        _ => None,
    }
}

/// The expiry, with two-digit years in the 2000s.
fn expiry_of(body: &VoicePayBody) -> Result<Expiry, Failure> {
    let month = number_of(body.expiry_month.as_ref()).ok_or(INVALID_EXPIRY)?;
    let year = number_of(body.expiry_year.as_ref()).ok_or(INVALID_EXPIRY)?;
    let year = if (0..100).contains(&year) { 2000 + year } else { year };
    let now = OffsetDateTime::now_utc();
    Expiry::parse(month, year, (now.year(), u8::from(now.month()))).map_err(|e| match e {
        ExpiryError::Expired => EXPIRED_CARD,
        ExpiryError::Month | ExpiryError::Year => INVALID_EXPIRY,
    })
}

/// ISO 4217 minor-unit exponent (0 and 3 listed; every other active code has 2).
fn exponent(currency: &str) -> u32 {
    const ZERO: &str = "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX VND VUV XAF XOF XPF";
    const THREE: &str = "BHD IQD JOD KWD LYD OMR TND";
    if ZERO.split(' ').any(|c| c == currency) {
        0
    } else if THREE.split(' ').any(|c| c == currency) {
        3
    } else {
        2
    }
}

/// A decimal amount (`"19.99"`, `19.99`, `"20"`) in minor units of a currency
/// with `exp` decimals, exactly: more decimals than the currency has (other than
/// trailing zeros), a sign, an exponent or anything but digits is refused.
fn minor_units(v: &Value, exp: u32) -> Option<u64> {
    let text = match v {
        Value::String(s) => s.trim().to_owned(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    if text.is_empty() || text.len() > 24 {
        return None;
    }
    let (int, frac) = text.split_once('.').unwrap_or((&text, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac = frac.trim_end_matches('0');
    if frac.len() > exp as usize {
        return None;
    }
    let scale = 10u64.checked_pow(exp)?;
    let whole: u64 = int.parse().ok()?;
    let part: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse::<u64>().ok()? * 10u64.pow(exp - frac.len() as u32)
    };
    whole.checked_mul(scale)?.checked_add(part)
}

/// What the platform asked for, checked.
struct Request {
    op: Op,
    transaction: String,
    card: CardPayload,
    cvv: Option<Cvv>,
    amount: Option<Amount>,
    one_time: bool,
}

fn parse(body: &VoicePayBody) -> Result<Request, (Op, Failure)> {
    let amount_field = body.amount.as_ref().or(body.charge_amount.as_ref());
    let positive = amount_field.is_some_and(|v| minor_units(v, 3).is_none_or(|m| m > 0));
    let op = match body.method.as_deref() {
        Some("charge") => Op::Charge,
        Some("tokenize") => Op::Tokenize,
        Some("credit-card") | None if positive => Op::Charge,
        Some("credit-card") | None => Op::Tokenize,
        Some(_) => return Err((Op::Tokenize, INVALID_REQUEST)),
    };
    let fail = |f: Failure| (op, f);
    let transaction = body
        .transaction_id
        .as_deref()
        .filter(|t| {
            !t.is_empty()
                && t.len() <= 128
                && t.bytes().all(|b| b.is_ascii_graphic())
                && !crate::domain::card::contains_pan(t)
        })
        .ok_or(fail(INVALID_REQUEST))?
        .to_owned();
    if body.bankaccountnumber.is_some() {
        return Err(fail(INVALID_REQUEST));
    }
    let pan = Pan::parse(body.cardnumber.as_ref().ok_or(fail(INVALID_CARD))?.expose_secret())
        .map_err(|_| fail(INVALID_CARD))?;
    let expiry = expiry_of(body).map_err(fail)?;
    let cvv = match &body.cvv {
        None => None,
        Some(c) if c.expose_secret().is_empty() => None,
        Some(c) => Some(Cvv::parse(c.expose_secret(), pan.brand()).map_err(|_| fail(INVALID_CVV))?),
    };
    let amount = match op {
        Op::Tokenize => None,
        Op::Charge => {
            let currency = body
                .currency_code
                .as_deref()
                .map(str::to_ascii_uppercase)
                .filter(|c| super::charges::is_currency(c))
                .ok_or(fail(INVALID_CURRENCY))?;
            let value = amount_field
                .and_then(|v| minor_units(v, exponent(&currency)))
                .filter(|v| (1..=10_000_000_000).contains(v))
                .ok_or(fail(INVALID_AMOUNT))?;
            Some(Amount { value, currency })
        }
    };
    Ok(Request {
        op,
        transaction,
        card: CardPayload {
            pan,
            expiry,
            name: None,
        },
        cvv,
        amount,
        one_time: body.token_type.as_deref() == Some("one-time"),
    })
}

/// The audit record of a refused request.
fn refusal(req: &HttpRequest, principal: Option<&Principal>, op: Op, f: Failure) -> AuditEvent {
    AuditEvent {
        action: "connector.voice-pay",
        outcome: f.1.to_owned(),
        principal: principal.map(|p| p.sub.clone()),
        tenant: principal.map(|p| p.tenant.to_string()),
        token: None,
        request_id: REQUEST_ID.try_with(Clone::clone).ok(),
        source: req.peer_addr().map(|a| a.ip().to_string()),
        detail: Some(format!("method {}", op.label())),
    }
}

/// Why the platform was not let in: the credential's failure (audited only when
/// `audit`: the first of its source in the failure window, as for bearer
/// credentials, so junk cannot fill the trail), or a refusal of its own.
struct Denied {
    error: AuthError,
    failure: Option<Failure>,
    audit: bool,
}

/// Authenticates the platform (HTTP Basic), off the async workers for the hash.
async fn authenticate(state: &AppState, req: &HttpRequest) -> Result<Principal, Denied> {
    let denied = |failure| Denied {
        error: AuthError::Missing,
        failure: Some(failure),
        audit: false,
    };
    let header = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes().to_vec());
    let source = req.peer_addr().map(|a| a.ip().to_string());
    let source_key = source.as_deref().unwrap_or("unknown").to_owned();
    if !state.auth.basic_known(header.as_deref())
        && let Some(_wait) = state.failures.blocked(&source_key)
    {
        state.metrics.rate_limited.with_label_values(&["source"]).inc();
        return Err(denied(RATE_LIMITED));
    }
    let peer = req.conn_data::<crate::tls::PeerSpki>().map(|p| p.0);
    let auth = state.auth.clone();
    let permit = state.basic_checks.acquire().await.map_err(|_| denied(INTERNAL))?;
    let verdict =
        tokio::task::spawn_blocking(move || auth.authorize_basic(header.as_deref(), Scope::TokensCreate, peer))
            .await
            .map_err(|_| denied(INTERNAL))?;
    drop(permit);
    verdict.map_err(|e| {
        state.metrics.auth_failures.with_label_values(&[e.reason()]).inc();
        let counted = state.failures.record(&source_key, e.reason()) == crate::limits::FailureVerdict::Counted;
        Denied {
            error: e,
            failure: None,
            audit: !counted,
        }
    })
}

/// POST /v1/connectors/voice-pay
pub(super) async fn voice_pay(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: super::extract::LenientSecretJson<VoicePayBody>,
) -> HttpResponse {
    let principal = match authenticate(&state, &req).await {
        Ok(p) => p,
        Err(denied) => {
            let e = denied.error;
            let f = denied
                .failure
                .unwrap_or(if e.is_forbidden() { NOT_PERMITTED } else { UNAUTHORIZED });
            state.metrics.voice_pay.with_label_values(&["unknown", f.1]).inc();
            if denied.audit {
                tracing::warn!(reason = e.reason(), "voice connector request denied");
                let mut event = refusal(&req, None, Op::Tokenize, f);
                event.action = if e.is_forbidden() {
                    "authz.failure"
                } else {
                    "auth.failure"
                };
                event.outcome = e.reason().to_owned();
                if state.audit(event).await.is_err() {
                    return answer(Op::Tokenize, VAULT_UNAVAILABLE.0, None, Some(VAULT_UNAVAILABLE));
                }
            }
            return answer(Op::Tokenize, f.0, None, Some(f));
        }
    };
    let (op, result) = match body.0 {
        Err(status) => {
            let f = if status == StatusCode::PAYLOAD_TOO_LARGE {
                Failure(status, "payload_too_large", "the request is too large")
            } else {
                INVALID_REQUEST
            };
            (Op::Tokenize, Err(f))
        }
        Ok(body) => match parse(&body) {
            Err((op, f)) => (op, Err(f)),
            Ok(request) => (request.op, serve(&state, &principal, request).await),
        },
    };
    match result {
        Ok(id) => {
            state.metrics.voice_pay.with_label_values(&[op.label(), "ok"]).inc();
            answer(op, StatusCode::OK, Some(&id), None)
        }
        Err(f) => {
            state.metrics.voice_pay.with_label_values(&[op.label(), f.1]).inc();
            if state.audit(refusal(&req, Some(&principal), op, f)).await.is_err() {
                return answer(op, VAULT_UNAVAILABLE.0, None, Some(VAULT_UNAVAILABLE));
            }
            answer(op, f.0, None, Some(f))
        }
    }
}

/// Tokenizes (once per transaction), and for a charge charges the token through
/// the PSP (once per transaction). Returns the token or the vault's charge id.
async fn serve(state: &AppState, principal: &Principal, request: Request) -> Result<String, Failure> {
    let class = match request.op {
        Op::Tokenize => LimitClass::Tokenize,
        Op::Charge => LimitClass::Charges,
    };
    if request.op == Op::Charge && !principal.may(Scope::ChargesCreate) {
        state.metrics.auth_failures.with_label_values(&["scope"]).inc();
        return Err(NOT_PERMITTED);
    }
    if state.limiter.check(class, &principal.sub).is_err() {
        state.metrics.rate_limited.with_label_values(&[class.as_str()]).inc();
        return Err(RATE_LIMITED);
    }
    let event = AuditEvent {
        action: "tokenize",
        outcome: String::new(),
        principal: Some(principal.sub.clone()),
        tenant: Some(principal.tenant.to_string()),
        token: None,
        request_id: REQUEST_ID.try_with(Clone::clone).ok(),
        source: None,
        detail: Some("voice connector".into()),
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let input = TokenizeInput {
        card: request.card,
        format: Default::default(),
        cvv: request.cvv,
        // A one-time token lives for the call (15 minutes), within the bounds.
        expires_at: request.one_time.then(|| {
            let bounds = state.vault.lifecycle();
            now + (15 * 60i64).clamp(bounds.min_ttl.as_secs() as i64, bounds.max_ttl.as_secs() as i64)
        }),
    };
    let caller = TokenizeCaller {
        client: principal.sub.clone(),
        tenant: principal.tenant.clone(),
        dedupe: false,
    };
    let meta = match state
        .vault
        .tokenize_once(caller, &request.transaction, input, event.clone())
        .await
        .map_err(vault_failure)?
    {
        crate::service::Tokenized::Created(m) => {
            state.metrics.tokenize.with_label_values(&["created"]).inc();
            m
        }
        crate::service::Tokenized::Existing(m) => m,
    };
    let Some(amount) = request.amount else {
        return Ok(meta.token.to_string());
    };
    let input = ChargeInput {
        token: meta.token.clone(),
        amount,
        reference: format!("voice {}", request.transaction).chars().take(80).collect(),
        interaction: ShopperInteraction::Moto,
        recurring: None,
        manual_capture: false,
    };
    let key = format!("voice-pay:{}", request.transaction);
    let outcome = match state
        .vault
        .charge(&principal.sub, principal.tenant.clone(), &key, input)
        .await
    {
        Ok(o) => o,
        Err(e) => {
            state.metrics.charges.with_label_values(&["rejected"]).inc();
            return Err(vault_failure(e));
        }
    };
    let charge_event = AuditEvent {
        action: "charge",
        token: Some(meta.token.to_string()),
        ..event
    };
    super::charges::note_charge(state, charge_event, &outcome)
        .await
        .map_err(|_| VAULT_UNAVAILABLE)?;
    match outcome.charge.status.as_str() {
        "refused" => Err(DECLINED),
        crate::service::STATUS_PENDING => Err(PSP_UNAVAILABLE),
        "error" => Err(PSP_ERROR),
        _ => Ok(outcome.charge.id),
    }
}

fn vault_failure(e: VaultError) -> Failure {
    match e {
        VaultError::IdempotencyMismatch => DUPLICATE,
        VaultError::PspNotConfigured => PSP_UNAVAILABLE,
        VaultError::EnumerationSuspected { .. } => RATE_LIMITED,
        VaultError::Sealed | VaultError::StoreDamaged | VaultError::Store(_) => VAULT_UNAVAILABLE,
        _ => INTERNAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_convert_exactly_by_the_currency_exponent() {
        let s = |t: &str| Value::String(t.into());
        assert_eq!(minor_units(&s("19.99"), 2), Some(1999));
        assert_eq!(minor_units(&s("10.0"), 2), Some(1000));
        assert_eq!(minor_units(&s("10.550"), 2), Some(1055));
        assert_eq!(minor_units(&s("20"), 2), Some(2000));
        assert_eq!(minor_units(&s("1500"), 0), Some(1500));
        assert_eq!(minor_units(&s("1.234"), 3), Some(1234));
        assert_eq!(minor_units(&json!(123.45), 2), Some(12345));
        assert_eq!(
            minor_units(&json!(0.1), 2),
            Some(10),
            "0.1 is not 0.1000000000000000055"
        );
        for bad in ["1.999", "-1.00", "1e3", "", ".5", "1.2.3", "12,50", "١٢"] {
            assert_eq!(minor_units(&s(bad), 2), None, "{bad}");
        }
        assert_eq!(minor_units(&s("10.5"), 0), None, "no decimals in JPY");
        assert_eq!(minor_units(&s("99999999999999999999"), 2), None, "overflow");
        assert_eq!((exponent("JPY"), exponent("KWD"), exponent("EUR")), (0, 3, 2));
    }

    proptest::proptest! {
        /// Any amount written with two decimals converts to exactly its cents.
        #[test]
        fn written_cents_convert_exactly(cents in 0u64..10_000_000_000_000) {
            let text = format!("{}.{:02}", cents / 100, cents % 100);
            proptest::prop_assert_eq!(minor_units(&Value::String(text), 2), Some(cents));
        }
    }

    #[test]
    fn two_digit_years_and_string_months() {
        let body = |m: Value, y: Value| VoicePayBody {
            transaction_id: None,
            method: None,
            cardnumber: None,
            cvv: None,
            expiry_month: Some(m),
            expiry_year: Some(y),
            amount: None,
            charge_amount: None,
            currency_code: None,
            token_type: None,
            bankaccountnumber: None,
        };
        let e = expiry_of(&body(json!("08"), json!("39"))).unwrap();
        assert_eq!((e.month(), e.year()), (8, 2039));
        let e = expiry_of(&body(json!(12), json!(2040))).unwrap();
        assert_eq!((e.month(), e.year()), (12, 2040));
        assert_eq!(expiry_of(&body(json!("13"), json!("39"))).unwrap_err(), INVALID_EXPIRY);
        assert_eq!(expiry_of(&body(json!("01"), json!("20"))).unwrap_err(), EXPIRED_CARD);
        assert_eq!(expiry_of(&body(json!("ab"), json!("39"))).unwrap_err(), INVALID_EXPIRY);
    }
}
