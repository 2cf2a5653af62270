//! What a caller sees of a charge: the service's view of its stored record, rendered by the
//! API as JSON (amounts in the charge's currency, times in RFC 3339, the modification history
//! with its acknowledged sums). Never card data: a charge record holds none.

use serde::Serialize;

use crate::psp::Amount;
use crate::store::{ChargeRecord, Modification};

#[derive(Serialize)]
pub struct ChargeView<'a> {
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
    capture: &'a str,
    captured_amount: Amount,
    refunded_amount: Amount,
    /// Captures, refunds and cancels, oldest first.
    history: Vec<ModificationView<'a>>,
}

#[derive(Serialize)]
pub struct ModificationView<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    status: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    amount: Option<Amount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    psp_reference: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure_reason: Option<&'a str>,
    created_at: String,
    updated_at: String,
}

fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

pub fn modification_view<'a>(c: &ChargeRecord, m: &'a Modification) -> ModificationView<'a> {
    ModificationView {
        id: &m.id,
        kind: &m.kind,
        status: &m.status,
        amount: m.amount_value.map(|value| Amount {
            value,
            currency: c.currency.clone(),
        }),
        reason: m.reason.as_deref(),
        psp_reference: m.psp_reference.as_deref(),
        failure_reason: m.failure_reason.as_deref(),
        created_at: rfc3339(m.created_at),
        updated_at: rfc3339(m.updated_at),
    }
}

/// The acknowledged sum of one kind of modification.
fn received_sum(c: &ChargeRecord, kind: &str) -> u64 {
    c.modifications
        .iter()
        .filter(|m| m.kind == kind && m.status == "received")
        .filter_map(|m| m.amount_value)
        .sum()
}

pub fn charge_view(c: &ChargeRecord) -> ChargeView<'_> {
    ChargeView {
        id: &c.id,
        status: &c.status,
        psp_reference: c.psp_reference.as_deref(),
        refusal_reason: c.refusal_reason.as_deref(),
        network_transaction_id: c.network_transaction_id.as_deref(),
        created_at: rfc3339(c.created_at),
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
        capture: &c.capture,
        captured_amount: Amount {
            value: match (c.capture.as_str(), c.status.as_str()) {
                ("manual", _) => received_sum(c, "capture"),
                (_, "authorised" | "partially_refunded" | "refunded") => c.amount_value,
                _ => 0,
            },
            currency: c.currency.clone(),
        },
        refunded_amount: Amount {
            value: received_sum(c, "refund"),
            currency: c.currency.clone(),
        },
        history: c.modifications.iter().map(|m| modification_view(c, m)).collect(),
    }
}
