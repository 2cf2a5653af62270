//! Detokenize-and-charge: the card is opened in memory, sent to the PSP through
//! the connector, and dropped (zeroized). Idempotent per client, tenant and
//! Idempotency-Key: a replay returns the stored outcome without a second PSP call;
//! concurrent duplicates wait for the first and replay it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::{Vault, VaultError};
use crate::domain::tenant::TenantId;
use crate::domain::token::Token;
use crate::psp::{Amount, PspError, PspRequest, PspStatus, Recurring, Sequence, ShopperInteraction};
use crate::store::{ChargeRecord, IdempotencyRecord};

/// A reserved charge whose PSP outcome is not known yet.
pub const STATUS_PENDING: &str = "pending";

/// The PSP idempotency key of a charge: derived from the durable reservation, so
/// every resend (after a timeout, a crash, on a retry) carries the same key.
pub fn psp_idempotency_key(charge_id: &str) -> String {
    format!("tv-{charge_id}")
}

/// The digest an Idempotency-Key is stored under: its parts (client, tenant,
/// …, the key), each followed by a zero byte so that no two tuples collide.
pub(super) fn idempotency_scope(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            h.update([0]);
        }
        h.update(part);
    }
    h.finalize().into()
}

/// Which charges a listing asks for: those of one token, or of one merchant reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeFilter {
    Token(String),
    Reference(String),
}

/// A parsed charge request.
#[derive(Debug, Clone, Serialize)]
pub struct ChargeInput {
    pub token: Token,
    pub amount: Amount,
    pub reference: String,
    pub interaction: ShopperInteraction,
    pub recurring: Option<Recurring>,
    /// The PSP captures at authorisation (`false`), or a capture call follows.
    pub manual_capture: bool,
}

impl Serialize for Token {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The stored charge, and whether this answer is a replay.
#[derive(Debug)]
pub struct ChargeOutcome {
    pub charge: ChargeRecord,
    pub replayed: bool,
    /// Every failed PSP attempt, including ones a safe retry recovered (for metrics).
    pub psp_errors: Vec<PspError>,
    pub psp_seconds: Option<f64>,
}

pub(super) type Inflight = std::sync::Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>;

impl Vault {
    /// Charges a token through the PSP, once per Idempotency-Key.
    pub async fn charge(
        &self,
        client: &str,
        tenant: TenantId,
        idempotency_key: &str,
        input: ChargeInput,
    ) -> Result<ChargeOutcome, VaultError> {
        let psp = self.psp.clone().ok_or(VaultError::PspNotConfigured)?;
        self.refuse_if_damaged()?;
        let scope = idempotency_scope(&[
            client.as_bytes(),
            tenant.as_str().as_bytes(),
            idempotency_key.as_bytes(),
        ]);
        let request_hash: [u8; 32] = Sha256::digest(serde_json::to_vec(&input).map_err(|_| VaultError::Task)?).into();

        // One request per key at a time; duplicates wait here, then replay.
        self.one_per_key(
            scope,
            self.charge_locked(&*psp, client, &tenant, scope, request_hash, input),
        )
        .await
    }

    /// Runs `work` while no other request of this process holds idempotency
    /// `scope` (duplicates wait, then find the first one's outcome; between
    /// replicas the store decides).
    pub(super) async fn one_per_key<T>(&self, scope: [u8; 32], work: impl std::future::Future<Output = T>) -> T {
        let lock = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(scope).or_default().clone()
        };
        let guard = lock.lock().await;
        let result = work.await;
        drop(guard);
        {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if map.get(&scope).is_some_and(|l| Arc::strong_count(l) <= 2) {
                map.remove(&scope);
            }
        }
        result
    }

    async fn charge_locked(
        &self,
        psp: &dyn crate::psp::Psp,
        client: &str,
        tenant: &TenantId,
        scope: [u8; 32],
        request_hash: [u8; 32],
        input: ChargeInput,
    ) -> Result<ChargeOutcome, VaultError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let window = self.idempotency_window.as_secs() as i64;
        let this = self.clone();
        let t = tenant.clone();
        let prior = tokio::task::spawn_blocking(move || -> Result<_, VaultError> {
            match this.store.get_idempotency(&scope)? {
                Some(prior) if prior.created_at + window > now => {
                    let charge = this
                        .store
                        .get_charge(&t, &prior.charge_id)?
                        .ok_or(VaultError::Integrity)?;
                    Ok(Some((prior, charge)))
                }
                _ => Ok(None),
            }
        })
        .await
        .map_err(|_| VaultError::Task)??;
        if let Some((prior, charge)) = prior {
            return self.resume(psp, tenant, request_hash, prior, charge).await;
        }

        // Reserve durably *before* the PSP sees anything: a crash from here on
        // leaves a `pending` charge whose PSP idempotency key (derived from its id)
        // every retry reuses, so the card is authorised at most once.
        let cit = input.interaction.is_customer_initiated();
        let this = self.clone();
        let t = tenant.clone();
        let token = input.token.clone();
        let record = tokio::task::spawn_blocking(move || this.live_record(&t, &token))
            .await
            .map_err(|_| VaultError::Task)??
            .ok_or_else(|| self.missing())?;
        let mit = !cit || input.recurring.is_some_and(|r| r.sequence == Sequence::Subsequent);
        let nti = if mit { record.network_tx_id.clone() } else { None };
        let charge = ChargeRecord {
            id: format!(
                "ch_{}",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>())
            ),
            tenant: tenant.as_str().to_owned(),
            client: client.to_owned(),
            token: input.token.to_string(),
            amount_value: input.amount.value,
            currency: input.amount.currency.clone(),
            reference: input.reference.clone(),
            shopper_interaction: serde_json::to_value(input.interaction)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            recurring: input.recurring.map(|r| {
                let s = |v: serde_json::Value| v.as_str().unwrap_or_default().to_owned();
                (
                    s(serde_json::to_value(r.model).unwrap_or_default()),
                    s(serde_json::to_value(r.sequence).unwrap_or_default()),
                )
            }),
            status: STATUS_PENDING.to_owned(),
            psp_reference: None,
            refusal_reason: None,
            // The scheme id this charge sends (MIT); replaced by the one the PSP returns.
            network_transaction_id: nti,
            cvv_sent: false,
            created_at: now,
            capture: if input.manual_capture { "manual" } else { "automatic" }.into(),
            modifications: Vec::new(),
        };
        let idem = IdempotencyRecord {
            request_hash,
            charge_id: charge.id.clone(),
            created_at: now,
        };
        let this = self.clone();
        let reserved = charge.clone();
        let t = tenant.clone();
        let taken = tokio::task::spawn_blocking(move || -> Result<_, VaultError> {
            match this.store.reserve_charge(&reserved, &scope, &idem, now - window + 1)? {
                None => Ok(None),
                Some(prior) => {
                    let charge = this
                        .store
                        .get_charge(&t, &prior.charge_id)?
                        .ok_or(VaultError::Integrity)?;
                    Ok(Some((prior, charge)))
                }
            }
        })
        .await
        .map_err(|_| VaultError::Task)??;
        if let Some((prior, charge)) = taken {
            // Another replica reserved this key a moment ago: its charge, not a second one.
            return self.resume(psp, tenant, request_hash, prior, charge).await;
        }
        self.store.commit().await?;
        // The CVV is used by this charge and destroyed, whatever happens next; it is
        // only ever sent on a customer-initiated charge.
        let cvv = self.cvv.take(&input.token).await?;
        self.drive(psp, tenant, charge, cvv).await
    }

    /// The answer for a key already reserved: a replay, a refusal for another
    /// body, or (outcome unknown: the PSP did not answer, a vault stopped mid-call,
    /// or another replica is calling right now) the reservation sent again under
    /// its own PSP idempotency key, so the PSP replays or processes it once.
    async fn resume(
        &self,
        psp: &dyn crate::psp::Psp,
        tenant: &TenantId,
        request_hash: [u8; 32],
        prior: IdempotencyRecord,
        charge: ChargeRecord,
    ) -> Result<ChargeOutcome, VaultError> {
        if prior.request_hash != request_hash {
            return Err(VaultError::IdempotencyMismatch);
        }
        if charge.status != STATUS_PENDING {
            return Ok(ChargeOutcome {
                charge,
                replayed: true,
                psp_errors: Vec::new(),
                psp_seconds: None,
            });
        }
        self.drive(psp, tenant, charge, None).await
    }

    /// Sends a reserved charge to the PSP under its stable PSP idempotency key and
    /// stores the outcome durably. An unknown outcome keeps the charge `pending`.
    async fn drive(
        &self,
        psp: &dyn crate::psp::Psp,
        tenant: &TenantId,
        mut charge: ChargeRecord,
        cvv: Option<crate::domain::card::Cvv>,
    ) -> Result<ChargeOutcome, VaultError> {
        let token = Token::parse(&charge.token).ok_or(VaultError::Integrity)?;
        let this = self.clone();
        let (t, tok) = (tenant.clone(), token.clone());
        let opened = tokio::task::spawn_blocking(move || -> Result<_, VaultError> {
            let record = this.live_record(&t, &tok)?.ok_or_else(|| this.missing())?;
            let ring = this.keys.ring().ok_or(VaultError::Sealed)?;
            let card = ring.open(&t, &tok, &record.metadata_binding(), &record.sealed)?;
            this.note_use(&t, &tok);
            Ok((record, card))
        })
        .await
        .map_err(|_| VaultError::Task)??;
        let (record, card) = opened;
        let interaction: ShopperInteraction =
            serde_json::from_value(serde_json::Value::String(charge.shopper_interaction.clone()))
                .map_err(|_| VaultError::Integrity)?;
        let recurring: Option<Recurring> = match &charge.recurring {
            None => None,
            Some((m, q)) => Some(
                serde_json::from_value(serde_json::json!({"model": m, "sequence": q}))
                    .map_err(|_| VaultError::Integrity)?,
            ),
        };
        let cit = interaction.is_customer_initiated();
        let send_cvv = if cit { cvv.as_ref() } else { None };
        let nti = charge.network_transaction_id.clone();
        let psp_key = psp_idempotency_key(&charge.id);
        let amount = Amount {
            value: charge.amount_value,
            currency: charge.currency.clone(),
        };
        let started = Instant::now();
        let call = psp
            .authorise(PspRequest {
                card: &card,
                cvv: send_cvv,
                amount: &amount,
                reference: &charge.reference,
                interaction,
                recurring,
                network_tx_reference: nti.as_deref(),
                idempotency_key: &psp_key,
                manual_capture: charge.capture == "manual",
            })
            .await;
        let psp_seconds = started.elapsed().as_secs_f64();
        drop(card);
        charge.cvv_sent |= send_cvv.is_some();
        drop(cvv);

        let (status, network_tx) = match call.result {
            Ok(o) => {
                charge.psp_reference = o.psp_reference;
                charge.refusal_reason = o.refusal_reason;
                let status = match o.status {
                    PspStatus::Authorised => "authorised",
                    PspStatus::Refused => "refused",
                    // Not an answer an authorisation gets.
                    PspStatus::Error | PspStatus::Received => "error",
                };
                (status, o.network_tx_reference)
            }
            Err(e) if e.outcome_unknown() => {
                // The PSP may have authorised: stay pending; a retry with the same
                // Idempotency-Key resends under the same PSP key and learns the truth.
                charge.refusal_reason = Some(format!(
                    "outcome unknown: {e}; retry with the same Idempotency-Key to reconcile with the PSP"
                ));
                (STATUS_PENDING, None)
            }
            Err(e) => {
                // Nothing was charged (never sent, or refused as a bad request).
                charge.refusal_reason = Some(format!("{e}; not charged"));
                ("error", None)
            }
        };
        charge.status = status.to_owned();
        // Card-on-file: the first successful customer-initiated charge records the
        // scheme's transaction id for later merchant-initiated charges.
        let set_nti = (status == "authorised" && cit && record.network_tx_id.is_none())
            .then(|| network_tx.clone())
            .flatten();
        if let Some(id) = network_tx {
            charge.network_transaction_id = Some(id);
        }
        let this = self.clone();
        let stored = charge.clone();
        let t = tenant.clone();
        let settled = tokio::task::spawn_blocking(move || -> Result<Option<ChargeRecord>, VaultError> {
            if let Some(id) = &set_nti {
                this.store.set_network_tx_id(&t, &token, id)?;
            }
            // Only over the pending reservation: another replica resending the same
            // charge may have settled it first, and captures or refunds may already
            // follow; those are never overwritten.
            for _ in 0..16 {
                let current = this.store.get_charge(&t, &stored.id)?.ok_or(VaultError::Integrity)?;
                if current.status != STATUS_PENDING {
                    return Ok(Some(current));
                }
                if this.store.swap_charge(&current, &stored)? {
                    return Ok(None);
                }
            }
            Err(VaultError::ChargeState(
                "the charge changed too often meanwhile: retry".into(),
            ))
        })
        .await
        .map_err(|_| VaultError::Task)??;
        self.store.commit().await?;
        if let Some(current) = settled {
            return Ok(ChargeOutcome {
                charge: current,
                replayed: true,
                psp_errors: call.failed_attempts,
                psp_seconds: Some(psp_seconds),
            });
        }
        Ok(ChargeOutcome {
            charge,
            replayed: false,
            psp_errors: call.failed_attempts,
            psp_seconds: Some(psp_seconds),
        })
    }

    /// A stored charge of `tenant` (in a damaged store, a missing one may be lost).
    pub async fn get_charge(&self, tenant: TenantId, id: String) -> Result<ChargeRecord, VaultError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.get_charge(&tenant, &id))
            .await
            .map_err(|_| VaultError::Task)??
            .ok_or_else(|| self.missing())
    }

    /// A page of the tenant's charges for one token or merchant reference, oldest
    /// first, after the cursor (creation time, id) of the previous page's last.
    pub async fn list_charges(
        &self,
        tenant: TenantId,
        of: ChargeFilter,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> Result<Vec<ChargeRecord>, VaultError> {
        let store = self.store.clone();
        let of = match of {
            ChargeFilter::Token(t) => crate::store::ChargesOf::Token(t),
            ChargeFilter::Reference(r) => crate::store::ChargesOf::Reference(r),
        };
        Ok(
            tokio::task::spawn_blocking(move || store.charges_of(&tenant, &of, after.as_ref(), limit))
                .await
                .map_err(|_| VaultError::Task)??,
        )
    }

    /// Whether a live CVV is held for `token`.
    pub async fn cvv_held(&self, token: &Token) -> bool {
        self.cvv.holds(token).await
    }

    /// Drops expired CVVs (called periodically).
    pub fn purge_expired_cvvs(&self) -> usize {
        self.cvv.purge_expired()
    }
}
