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

/// A parsed charge request.
#[derive(Debug, Clone, Serialize)]
pub struct ChargeInput {
    pub token: Token,
    pub amount: Amount,
    pub reference: String,
    pub interaction: ShopperInteraction,
    pub recurring: Option<Recurring>,
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
        let scope: [u8; 32] = Sha256::new()
            .chain_update(client.as_bytes())
            .chain_update([0])
            .chain_update(tenant.as_str().as_bytes())
            .chain_update([0])
            .chain_update(idempotency_key.as_bytes())
            .finalize()
            .into();
        let request_hash: [u8; 32] = Sha256::digest(serde_json::to_vec(&input).map_err(|_| VaultError::Task)?).into();

        // One request per key at a time; duplicates wait here, then replay.
        let lock = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(scope).or_default().clone()
        };
        let guard = lock.lock().await;
        let result = self
            .charge_locked(&*psp, client, &tenant, scope, request_hash, input)
            .await;
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
        if let Some(prior) = self.store.get_idempotency(&scope)?
            && prior.created_at + window > now
        {
            if prior.request_hash != request_hash {
                return Err(VaultError::IdempotencyMismatch);
            }
            let charge = self
                .store
                .get_charge(tenant, &prior.charge_id)?
                .ok_or(VaultError::Integrity)?;
            return Ok(ChargeOutcome {
                charge,
                replayed: true,
                psp_errors: Vec::new(),
                psp_seconds: None,
            });
        }

        let ring = self.keys.ring().ok_or(VaultError::Sealed)?;
        let record = self.store.get(tenant, &input.token)?.ok_or_else(|| self.missing())?;
        let card = ring.open(tenant, &input.token, &record.metadata_binding(), &record.sealed)?;
        // The CVV is used by this charge and destroyed, whatever happens next; it is
        // only ever sent on a customer-initiated charge.
        let cvv = self.cvv.take(&input.token);
        let cit = input.interaction.is_customer_initiated();
        let send_cvv = if cit { cvv.as_ref() } else { None };
        let mit = !cit || input.recurring.is_some_and(|r| r.sequence == Sequence::Subsequent);
        let nti = if mit { record.network_tx_id.as_deref() } else { None };
        let psp_key = format!("tv-{}-{now}", hex::encode(&scope[..12]));
        let started = Instant::now();
        let call = psp
            .authorise(PspRequest {
                card: &card,
                cvv: send_cvv,
                amount: &input.amount,
                reference: &input.reference,
                interaction: input.interaction,
                recurring: input.recurring,
                network_tx_reference: nti,
                idempotency_key: &psp_key,
            })
            .await;
        let psp_seconds = started.elapsed().as_secs_f64();
        drop(card);
        let cvv_sent = send_cvv.is_some();
        drop(cvv);

        let (status, psp_reference, refusal_reason, network_tx) = match call.result {
            Ok(o) => (o.status, o.psp_reference, o.refusal_reason, o.network_tx_reference),
            Err(e) => (PspStatus::Error, None, Some(e.to_string()), None),
        };
        // Card-on-file: the first successful customer-initiated charge records the
        // scheme's transaction id for later merchant-initiated charges.
        if status == PspStatus::Authorised
            && cit
            && record.network_tx_id.is_none()
            && let Some(id) = &network_tx
        {
            self.store.set_network_tx_id(tenant, &input.token, id)?;
        }
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
            status: match status {
                PspStatus::Authorised => "authorised",
                PspStatus::Refused => "refused",
                PspStatus::Error => "error",
            }
            .to_owned(),
            psp_reference,
            refusal_reason,
            network_transaction_id: network_tx.or_else(|| nti.map(str::to_owned)),
            cvv_sent,
            created_at: now,
        };
        let idem = IdempotencyRecord {
            request_hash,
            charge_id: charge.id.clone(),
            created_at: now,
        };
        self.store.put_charge(&charge, &scope, &idem)?;
        self.store.commit().await?;
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

    /// Whether a live CVV is held for `token`.
    pub fn cvv_held(&self, token: &Token) -> bool {
        self.cvv.holds(token)
    }

    /// Drops expired CVVs (called periodically).
    pub fn purge_expired_cvvs(&self) -> usize {
        self.cvv.purge_expired()
    }
}
