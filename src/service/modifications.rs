//! Captures, refunds and cancels of a charge. They act on the PSP reference of
//! the authorisation and never open the card.
//!
//! Each is idempotent per (client, tenant, charge, kind, Idempotency-Key) and
//! reserved durably before the PSP sees it: the reservation is a `pending`
//! modification written into the charge by compare-and-set, so concurrent
//! modifications of one charge — on one replica or several — are decided one
//! after the other against the amounts already captured and refunded (never an
//! over-refund), and a retry after a crash or a timeout resends under the same PSP
//! idempotency key (one PSP operation at most).

use std::time::Instant;

use base64::Engine as _;
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::{STATUS_PENDING, Vault, VaultError};
use crate::domain::tenant::TenantId;
use crate::psp::{Amount, ModificationKind, ModificationRequest, PspError, PspStatus};
use crate::store::{ChargeRecord, Modification};

/// Modifications one charge may carry. Refused and failed ones stay in its
/// history too, so without a bound a caller holding a modification grant could
/// grow one charge record (rewritten whole by every compare-and-set) without end.
pub(super) const MAX_MODIFICATIONS: usize = 100;

/// Compare-and-set attempts before giving up (each loses only to another change
/// of the same charge that landed in between).
const SWAP_ATTEMPTS: usize = 16;

/// A parsed modification request.
#[derive(Debug, Clone, Serialize)]
pub struct ModificationInput {
    pub kind: ModificationKind,
    /// Captures and refunds: the amount (none: all that is left).
    pub amount: Option<Amount>,
    /// Refunds: why (free text, checked for card numbers by the API).
    pub reason: Option<String>,
}

/// What a modification call did.
#[derive(Debug)]
pub struct ModificationOutcome {
    /// The charge as it is now (its state and every modification).
    pub charge: ChargeRecord,
    /// This request's modification.
    pub modification: Modification,
    pub replayed: bool,
    pub psp_errors: Vec<PspError>,
    pub psp_seconds: Option<f64>,
}

/// Amounts already spoken for: captured (automatic captures count in full), and
/// refunded, counting modifications still `pending` (their outcome is unknown, so
/// they keep their share until it is known).
fn committed(charge: &ChargeRecord, kind: &str) -> u64 {
    charge
        .modifications
        .iter()
        .filter(|m| m.kind == kind && matches!(m.status.as_str(), "pending" | "received"))
        .filter_map(|m| m.amount_value)
        .sum()
}

fn captured_total(charge: &ChargeRecord) -> u64 {
    if charge.capture == "manual" {
        committed(charge, "capture")
    } else {
        charge.amount_value
    }
}

fn has_live(charge: &ChargeRecord, kind: &str) -> bool {
    charge
        .modifications
        .iter()
        .any(|m| m.kind == kind && matches!(m.status.as_str(), "pending" | "received"))
}

/// The charge's state from its authorisation and acknowledged modifications.
pub fn derived_status(charge: &ChargeRecord) -> String {
    if !matches!(
        charge.status.as_str(),
        "authorised" | "captured" | "partially_refunded" | "refunded" | "cancelled"
    ) {
        return charge.status.clone();
    }
    let received = |kind: &str| -> Vec<&Modification> {
        charge
            .modifications
            .iter()
            .filter(|m| m.kind == kind && m.status == "received")
            .collect()
    };
    let refunded: u64 = received("refund").iter().filter_map(|m| m.amount_value).sum();
    let captured = if charge.capture == "manual" {
        received("capture").iter().filter_map(|m| m.amount_value).sum()
    } else {
        charge.amount_value
    };
    if !received("cancel").is_empty() {
        "cancelled".into()
    } else if refunded > 0 && refunded >= captured {
        "refunded".into()
    } else if refunded > 0 {
        "partially_refunded".into()
    } else if charge.capture == "manual" && captured > 0 {
        "captured".into()
    } else {
        "authorised".into()
    }
}

/// Checks `input` against the charge as it is; returns the amount to send.
fn check(charge: &ChargeRecord, input: &ModificationInput) -> Result<Option<u64>, VaultError> {
    let state = |m: String| Err(VaultError::ChargeState(m));
    if charge.psp_reference.is_none()
        || !matches!(
            charge.status.as_str(),
            "authorised" | "captured" | "partially_refunded" | "refunded" | "cancelled"
        )
    {
        return state(format!(
            "the charge is {}: only an authorised charge can be modified",
            charge.status
        ));
    }
    if has_live(charge, "cancel") {
        return state("the charge was cancelled".into());
    }
    if charge.modifications.len() >= MAX_MODIFICATIONS {
        return state(format!(
            "the charge already has {MAX_MODIFICATIONS} captures, refunds and cancels (the most one charge may carry)"
        ));
    }
    if let Some(a) = &input.amount
        && a.currency != charge.currency
    {
        return Err(VaultError::AmountRefused(format!(
            "amount.currency must be the charge's currency ({})",
            charge.currency
        )));
    }
    let amount = input.amount.as_ref().map(|a| a.value);
    match input.kind {
        ModificationKind::Capture => {
            if charge.capture != "manual" {
                return state("the charge was captured automatically at authorisation: refund it instead".into());
            }
            if has_live(charge, "capture") {
                return state("the charge was already captured (one capture per authorisation)".into());
            }
            let value = amount.unwrap_or(charge.amount_value);
            if value > charge.amount_value {
                return Err(VaultError::AmountRefused(format!(
                    "the capture ({value}) is more than the authorised amount ({})",
                    charge.amount_value
                )));
            }
            Ok(Some(value))
        }
        ModificationKind::Refund => {
            let captured = captured_total(charge);
            if captured == 0 {
                return state("nothing is captured yet: cancel the authorisation instead".into());
            }
            let refunded = committed(charge, "refund");
            let left = captured.saturating_sub(refunded);
            if left == 0 {
                return state("the charge is already refunded in full".into());
            }
            let value = amount.unwrap_or(left);
            if value > left {
                return Err(VaultError::AmountRefused(format!(
                    "refunds would exceed the captured amount: captured {captured}, refunded {refunded}, \
                     at most {left} left"
                )));
            }
            Ok(Some(value))
        }
        ModificationKind::Cancel => {
            if captured_total(charge) > 0 {
                return state("the charge is captured: refund it instead of cancelling".into());
            }
            Ok(None)
        }
    }
}

impl Vault {
    /// Captures, refunds or cancels a charge of `tenant`, once per Idempotency-Key.
    pub async fn modify_charge(
        &self,
        client: &str,
        tenant: TenantId,
        charge_id: &str,
        idempotency_key: &str,
        input: ModificationInput,
    ) -> Result<ModificationOutcome, VaultError> {
        let psp = self.psp.clone().ok_or(VaultError::PspNotConfigured)?;
        self.refuse_if_damaged()?;
        let scope = super::charges::idempotency_scope(&[
            client.as_bytes(),
            tenant.as_str().as_bytes(),
            charge_id.as_bytes(),
            input.kind.as_str().as_bytes(),
            idempotency_key.as_bytes(),
        ]);
        let request_hash: [u8; 32] = Sha256::digest(serde_json::to_vec(&input).map_err(|_| VaultError::Task)?).into();
        self.one_per_key(
            scope,
            self.modify_locked(&*psp, client, &tenant, charge_id, scope, request_hash, input),
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn modify_locked(
        &self,
        psp: &dyn crate::psp::Psp,
        client: &str,
        tenant: &TenantId,
        charge_id: &str,
        scope: [u8; 32],
        request_hash: [u8; 32],
        input: ModificationInput,
    ) -> Result<ModificationOutcome, VaultError> {
        for _ in 0..SWAP_ATTEMPTS {
            let charge = self.get_charge(tenant.clone(), charge_id.to_owned()).await?;
            if let Some(prior) = charge.modifications.iter().find(|m| m.scope == scope).cloned() {
                if prior.request_hash != request_hash {
                    return Err(VaultError::IdempotencyMismatch);
                }
                if prior.status != STATUS_PENDING {
                    return Ok(ModificationOutcome {
                        charge,
                        modification: prior,
                        replayed: true,
                        psp_errors: Vec::new(),
                        psp_seconds: None,
                    });
                }
                // Outcome unknown (a timeout, a crash, another replica calling now):
                // sent again under its own PSP idempotency key.
                return self.drive_modification(psp, tenant, charge, prior).await;
            }
            let amount_value = check(&charge, &input)?;
            let now = OffsetDateTime::now_utc().unix_timestamp();
            let modification = Modification {
                id: format!(
                    "mod_{}",
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>())
                ),
                kind: input.kind.as_str().into(),
                amount_value,
                reason: input.reason.clone(),
                status: STATUS_PENDING.into(),
                psp_reference: None,
                failure_reason: None,
                client: client.to_owned(),
                created_at: now,
                updated_at: now,
                scope,
                request_hash,
            };
            let mut reserved = charge.clone();
            reserved.modifications.push(modification.clone());
            if self.swap(&charge, &reserved).await? {
                // Durable before the PSP sees anything.
                self.store.commit().await?;
                return self.drive_modification(psp, tenant, reserved, modification).await;
            }
            // Another modification of this charge landed first: decide again on it.
        }
        Err(VaultError::ChargeState(
            "the charge is being modified by many requests at once: retry".into(),
        ))
    }

    async fn swap(&self, old: &ChargeRecord, new: &ChargeRecord) -> Result<bool, VaultError> {
        let (this, old, new) = (self.clone(), old.clone(), new.clone());
        tokio::task::spawn_blocking(move || this.store.swap_charge(&old, &new))
            .await
            .map_err(|_| VaultError::Task)?
            .map_err(VaultError::from)
    }

    /// Sends a reserved modification under its stable PSP idempotency key and
    /// stores the outcome (compare-and-set, retried against concurrent changes).
    async fn drive_modification(
        &self,
        psp: &dyn crate::psp::Psp,
        tenant: &TenantId,
        charge: ChargeRecord,
        modification: Modification,
    ) -> Result<ModificationOutcome, VaultError> {
        let kind = match modification.kind.as_str() {
            "capture" => ModificationKind::Capture,
            "refund" => ModificationKind::Refund,
            "cancel" => ModificationKind::Cancel,
            _ => return Err(VaultError::Integrity),
        };
        let payment = charge.psp_reference.clone().ok_or(VaultError::Integrity)?;
        let amount = modification.amount_value.map(|value| Amount {
            value,
            currency: charge.currency.clone(),
        });
        let psp_key = super::psp_idempotency_key(&modification.id);
        let started = Instant::now();
        let call = psp
            .modify(ModificationRequest {
                kind,
                payment_psp_reference: &payment,
                amount: amount.as_ref(),
                reference: &charge.reference,
                idempotency_key: &psp_key,
            })
            .await;
        let psp_seconds = started.elapsed().as_secs_f64();
        let (status, psp_reference, failure_reason) = match call.result {
            Ok(o) => match o.status {
                PspStatus::Received => ("received", o.psp_reference, None),
                PspStatus::Refused => ("refused", None, o.refusal_reason),
                PspStatus::Authorised | PspStatus::Error => (
                    "error",
                    o.psp_reference,
                    Some("the PSP's answer was not an acknowledgement".into()),
                ),
            },
            Err(e) if e.outcome_unknown() => (
                STATUS_PENDING,
                None,
                Some(format!(
                    "outcome unknown: {e}; retry with the same Idempotency-Key to reconcile with the PSP"
                )),
            ),
            Err(e) => ("error", None, Some(format!("{e}; nothing was changed"))),
        };
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut current = charge;
        for _ in 0..SWAP_ATTEMPTS {
            let mut next = current.clone();
            let Some(m) = next.modifications.iter_mut().find(|m| m.id == modification.id) else {
                return Err(VaultError::Integrity);
            };
            if m.status != STATUS_PENDING {
                // Settled meanwhile (another replica resent it): its answer stands.
                let settled = m.clone();
                return Ok(ModificationOutcome {
                    charge: current,
                    modification: settled,
                    replayed: true,
                    psp_errors: call.failed_attempts,
                    psp_seconds: Some(psp_seconds),
                });
            }
            m.status = status.into();
            m.psp_reference = psp_reference.clone();
            m.failure_reason = failure_reason.clone();
            m.updated_at = now;
            let settled = m.clone();
            next.status = derived_status(&next);
            if self.swap(&current, &next).await? {
                self.store.commit().await?;
                return Ok(ModificationOutcome {
                    charge: next,
                    modification: settled,
                    replayed: false,
                    psp_errors: call.failed_attempts,
                    psp_seconds: Some(psp_seconds),
                });
            }
            current = self.get_charge(tenant.clone(), current.id.clone()).await?;
        }
        Err(VaultError::ChargeState(
            "the charge is being modified by many requests at once: retry".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(capture: &str) -> ChargeRecord {
        ChargeRecord {
            id: "ch_1".into(),
            tenant: "t".into(),
            client: "psp".into(),
            token: "4111110000001112".into(),
            amount_value: 10_000,
            currency: "EUR".into(),
            reference: "order".into(),
            shopper_interaction: "moto".into(),
            recurring: None,
            status: "authorised".into(),
            psp_reference: Some("PSP1".into()),
            refusal_reason: None,
            network_transaction_id: None,
            cvv_sent: false,
            created_at: 0,
            capture: capture.into(),
            modifications: Vec::new(),
        }
    }

    fn with(mut c: ChargeRecord, kind: &str, amount: Option<u64>, status: &str) -> ChargeRecord {
        c.modifications.push(Modification {
            id: format!("mod_{}", c.modifications.len()),
            kind: kind.into(),
            amount_value: amount,
            reason: None,
            status: status.into(),
            psp_reference: None,
            failure_reason: None,
            client: "psp".into(),
            created_at: 0,
            updated_at: 0,
            scope: [c.modifications.len() as u8; 32],
            request_hash: [0; 32],
        });
        c.status = derived_status(&c);
        c
    }

    fn input(kind: ModificationKind, value: Option<u64>) -> ModificationInput {
        ModificationInput {
            kind,
            amount: value.map(|value| Amount {
                value,
                currency: "EUR".into(),
            }),
            reason: None,
        }
    }

    #[test]
    fn the_state_machine_refuses_what_the_money_does_not_allow() {
        use ModificationKind::*;
        let manual = charge("manual");
        assert_eq!(check(&manual, &input(Capture, None)).unwrap(), Some(10_000));
        assert!(matches!(
            check(&manual, &input(Capture, Some(10_001))),
            Err(VaultError::AmountRefused(_))
        ));
        assert!(matches!(
            check(&manual, &input(Refund, Some(1))),
            Err(VaultError::ChargeState(_))
        ));
        assert_eq!(check(&manual, &input(Cancel, None)).unwrap(), None);
        let mut other = input(Capture, Some(5));
        other.amount.as_mut().unwrap().currency = "USD".into();
        assert!(matches!(check(&manual, &other), Err(VaultError::AmountRefused(_))));

        let captured = with(manual.clone(), "capture", Some(6_000), "received");
        assert_eq!(captured.status, "captured");
        assert!(matches!(
            check(&captured, &input(Capture, Some(1))),
            Err(VaultError::ChargeState(_))
        ));
        assert!(matches!(
            check(&captured, &input(Cancel, None)),
            Err(VaultError::ChargeState(_))
        ));
        let part = with(captured, "refund", Some(2_500), "received");
        assert_eq!(part.status, "partially_refunded");
        // A pending refund keeps its share: 6000 - 2500 - 3000 = 500 left.
        let pending = with(part, "refund", Some(3_000), "pending");
        assert_eq!(pending.status, "partially_refunded");
        assert!(matches!(
            check(&pending, &input(Refund, Some(501))),
            Err(VaultError::AmountRefused(_))
        ));
        assert_eq!(check(&pending, &input(Refund, None)).unwrap(), Some(500));
        // A refused refund frees its share again.
        let refused = with(pending.clone(), "refund", Some(500), "refused");
        assert_eq!(check(&refused, &input(Refund, Some(500))).unwrap(), Some(500));
        let full = with(pending, "refund", Some(500), "received");
        assert!(matches!(
            check(&full, &input(Refund, None)),
            Err(VaultError::ChargeState(_))
        ));

        let cancelled = with(charge("manual"), "cancel", None, "received");
        assert_eq!(cancelled.status, "cancelled");
        assert!(matches!(
            check(&cancelled, &input(Capture, None)),
            Err(VaultError::ChargeState(_))
        ));

        let auto = charge("automatic");
        assert!(matches!(
            check(&auto, &input(Capture, None)),
            Err(VaultError::ChargeState(_))
        ));
        assert!(matches!(
            check(&auto, &input(Cancel, None)),
            Err(VaultError::ChargeState(_))
        ));
        let refunded = with(auto, "refund", Some(10_000), "received");
        assert_eq!(refunded.status, "refunded");

        // A charge's history is bounded: PSP-refused attempts count too.
        let mut busy = charge("automatic");
        for _ in 0..MAX_MODIFICATIONS {
            busy = with(busy, "refund", Some(1), "refused");
        }
        assert!(matches!(
            check(&busy, &input(Refund, Some(1))),
            Err(VaultError::ChargeState(_))
        ));

        let mut refused_auth = charge("manual");
        refused_auth.status = "refused".into();
        assert!(matches!(
            check(&refused_auth, &input(Cancel, None)),
            Err(VaultError::ChargeState(_))
        ));
    }
}
