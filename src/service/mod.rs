//! The vault service: tokenize, read metadata, detokenize, delete.
//!
//! It composes the keyring (envelope sealing, fingerprints) with the store
//! (insert-if-absent, group commit). Blocking work (crypto, sled) runs on the
//! blocking pool; a created or deleted record is durable before the call returns.

mod backup;
mod budget;
mod charges;
mod cvv;
mod export;
mod keyadmin;
mod lifecycle;
mod modifications;
pub mod views;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use time::OffsetDateTime;

use crate::audit::{AuditError, AuditEvent, AuditLog};
use crate::domain::card::{Brand, CardPayload};
use crate::domain::tenant::TenantId;
use crate::domain::token::{Candidates, Token, TokenFormat, candidates};
use crate::keys::KeyError;
use crate::keys::keystore::KeystoreError;
use crate::keys::manager::{KeyManager, Sealed};
use crate::limits::{EnumerationGuard, EnumerationVerdict};
use crate::store::{Applied, AuditSeal, Change, Unit};
use crate::store::{InsertMode, InsertOutcome, Store, StoreDamage, StoreError, StoredRecord};

/// Why a vault operation failed. Variants carry no card data.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("token not found")]
    NotFound,
    #[error("no free token left in this format for this BIN and last four")]
    TokenSpaceExhausted,
    #[error("the record's key version has been destroyed")]
    KeyDestroyed,
    #[error("the record's key version is not usable")]
    KeyUnavailable,
    #[error("the record failed its integrity check")]
    Integrity,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("background task failed")]
    Task,
    #[error("the vault is sealed")]
    Sealed,
    #[error("key operation refused: {0}")]
    KeyRefused(String),
    #[error("keystore error: {0}")]
    Keystore(#[source] KeystoreError),
    #[error("no PSP is configured")]
    PspNotConfigured,
    #[error("the Idempotency-Key was already used with a different request")]
    IdempotencyMismatch,
    /// The charge's state does not allow this modification (e.g. cancelling a
    /// captured charge). The message names states and amounts only.
    #[error("{0}")]
    ChargeState(String),
    /// The amount does not fit the charge (its currency, or more than can be
    /// captured or refunded). The message names amounts only.
    #[error("{0}")]
    AmountRefused(String),
    #[error("token not found in a store that lost records: it may be one of them")]
    RecordLost,
    #[error("the store is damaged: new cards and charges are refused")]
    StoreDamaged,
    /// Many distinct cards behind one BIN + last four from this client: a walk of
    /// the hidden digits. `flagged` is true for the request that tripped the guard.
    #[error("tokenize refused: card-number enumeration suspected")]
    EnumerationSuspected { flagged: bool, wait: std::time::Duration },
}

impl VaultError {
    /// The store cannot be reached right now: nothing was changed, the request may be retried.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, VaultError::Store(StoreError::Unavailable(_)))
    }

    /// A stored record (or the store's own framing of it) failed its integrity check.
    pub fn is_integrity(&self) -> bool {
        matches!(self, VaultError::Integrity | VaultError::Store(StoreError::Corrupt))
    }
}

impl From<Sealed> for VaultError {
    fn from(_: Sealed) -> Self {
        VaultError::Sealed
    }
}

impl From<AuditError> for VaultError {
    fn from(e: AuditError) -> Self {
        match e {
            AuditError::Store(e) => VaultError::Store(e),
            // Not the record's integrity: the trail could not be written (500).
            AuditError::Corrupt => VaultError::Store(StoreError::Backend("audit trail unwritable".into())),
        }
    }
}

impl From<KeystoreError> for VaultError {
    fn from(e: KeystoreError) -> Self {
        match e {
            KeystoreError::Refused(m) => VaultError::KeyRefused(m),
            other => VaultError::Keystore(other),
        }
    }
}

impl From<KeyError> for VaultError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Destroyed => VaultError::KeyDestroyed,
            KeyError::UnknownVersion | KeyError::Retired => VaultError::KeyUnavailable,
            KeyError::Integrity => VaultError::Integrity,
        }
    }
}

/// What a caller asked to tokenize, already parsed into domain types.
#[derive(Debug)]
pub struct TokenizeInput {
    pub card: CardPayload,
    pub format: TokenFormat,
    /// Held in memory only, for the next charge (never stored).
    pub cvv: Option<crate::domain::card::Cvv>,
    /// When the new token stops existing (unix seconds; `None`: until deleted).
    pub expires_at: Option<i64>,
}

/// Who asks to tokenize, and whether they may learn the tenant's existing token.
#[derive(Debug, Clone)]
pub struct TokenizeCaller {
    pub client: String,
    pub tenant: TenantId,
    /// `tokens:dedupe`: a known card answers with its existing token. Without it
    /// every tokenize stores and returns a new token, so the answer tells nothing
    /// about which cards the tenant already holds.
    pub dedupe: bool,
}

/// Public metadata of a token: never the PAN.
#[derive(Debug, Clone)]
pub struct TokenMetadata {
    pub token: Token,
    pub format: TokenFormat,
    pub brand: Brand,
    pub bin: String,
    pub last4: String,
    pub exp_month: u8,
    pub exp_year: u16,
    pub fingerprint: String,
    pub created_at: OffsetDateTime,
    /// Whether a CVV waits in memory for the next charge.
    pub cvv_held: bool,
    /// When the token stops existing (unix seconds), if it was given a lifetime.
    pub expires_at: Option<i64>,
    /// When the card was last used (tokenized, charged or detokenized; unix
    /// seconds, to the vault's use granularity). Filled in by reads and listings.
    pub last_used_at: Option<i64>,
}

/// Whether tokenize stored a new card or found the tenant's existing one.
#[derive(Debug)]
pub enum Tokenized {
    Created(TokenMetadata),
    Existing(TokenMetadata),
}

/// A detokenized card: only for the PSP connector path.
#[derive(Debug)]
pub struct Revealed {
    pub token: Token,
    pub card: CardPayload,
}

pub use charges::{ChargeFilter, ChargeInput, ChargeOutcome, STATUS_PENDING, psp_idempotency_key};
pub use export::{ExportFile, ExportView, MAX_RECIPIENT_KEY, RecipientError, check_recipient_key};
pub use keyadmin::{DestroyOutcome, EPOCH_OFFICER, EpochStep, KeyStatus, RewrapProgress, VersionStatus};
pub use lifecycle::{RETENTION_PRINCIPAL, TokenPage};
pub use modifications::{ModificationInput, ModificationOutcome, derived_status};

/// The vault. Cheap to clone.
#[derive(Clone)]
pub struct Vault {
    store: Arc<dyn Store>,
    /// The trail the hot paths' units of work seal their audit records with, in
    /// the same store write (and the same durable wait) as the change they record.
    seal: Arc<dyn AuditSeal>,
    /// Records sealed under a KEK version but not yet stored: a version is not
    /// retired or destroyed under them.
    sealing: Arc<SealingCounts>,
    keys: Arc<KeyManager>,
    stored: Arc<AtomicI64>,
    admin: Arc<keyadmin::AdminState>,
    cvv: Arc<cvv::CvvHold>,
    psp: Option<Arc<dyn crate::psp::Psp>>,
    inflight: Arc<charges::Inflight>,
    idempotency_window: std::time::Duration,
    enumeration: Option<Arc<EnumerationGuard>>,
    budget: Arc<budget::WrapBudget>,
    lifecycle: Arc<crate::config::Lifecycle>,
    /// Where an online backup is spooled (unnamed) before it is streamed out.
    spool_dir: Arc<std::path::PathBuf>,
    /// How long a unit of work takes to be applied and made durable (the store's
    /// commit latency as requests see it).
    unit_seconds: prometheus::Histogram,
    /// Units of work (each with its audit record) that failed to be made durable.
    unit_failures: prometheus::IntCounter,
}

/// What a vault needs besides its store and keys.
#[derive(Clone)]
pub struct VaultOptions {
    pub cryptoperiod: Option<std::time::Duration>,
    pub cvv_ttl: std::time::Duration,
    pub idempotency_window: std::time::Duration,
    pub psp: Option<Arc<dyn crate::psp::Psp>>,
    /// The tokenize enumeration guard (None: off).
    pub enumeration: Option<crate::limits::EnumerationParams>,
    /// Wraps per KEK version before it is rotated (random-nonce budget).
    pub kek_wrap_limit: u64,
    /// A memory-only Redis that holds CVVs for every replica (None: this process's memory).
    /// (A URL may carry a password: kept secret, never in `Debug`.)
    pub cvv_redis: Option<secrecy::SecretString>,
    /// Token lifetime bounds and per-tenant retention of unused cards.
    pub lifecycle: crate::config::Lifecycle,
    /// Where an online backup is spooled before it is streamed out (the data directory).
    pub spool_dir: std::path::PathBuf,
}

impl Default for VaultOptions {
    fn default() -> Self {
        VaultOptions {
            cryptoperiod: None,
            cvv_ttl: crate::config::DEFAULT_CVV_TTL,
            idempotency_window: crate::config::DEFAULT_IDEMPOTENCY_WINDOW,
            psp: None,
            enumeration: Some(crate::limits::EnumerationParams::default()),
            kek_wrap_limit: budget::DEFAULT_LIMIT,
            cvv_redis: None,
            lifecycle: crate::config::Lifecycle::default(),
            spool_dir: std::env::temp_dir(),
        }
    }
}

impl Vault {
    /// Builds the vault over `audit` (opened on the same store and keys); counts the
    /// stored records once (for the gauge).
    pub fn new(
        store: Arc<dyn Store>,
        keys: Arc<KeyManager>,
        audit: AuditLog,
        options: VaultOptions,
    ) -> Result<Vault, VaultError> {
        let n = store.count()?;
        let cvv = match &options.cvv_redis {
            None => cvv::CvvHold::Local(cvv::CvvCache::new(options.cvv_ttl)),
            Some(url) => {
                use secrecy::ExposeSecret;
                cvv::CvvHold::Redis(cvv::RedisCvv::connect(
                    url.expose_secret(),
                    keys.clone(),
                    options.cvv_ttl,
                )?)
            }
        };
        let budget = Arc::new(budget::WrapBudget::new(store.clone(), options.kek_wrap_limit));
        Ok(Vault {
            budget,
            seal: Arc::new(audit),
            sealing: Arc::new(SealingCounts::default()),
            store,
            keys,
            stored: Arc::new(AtomicI64::new(n as i64)),
            admin: Arc::new(keyadmin::AdminState::new(options.cryptoperiod)),
            cvv: Arc::new(cvv),
            psp: options.psp,
            inflight: Arc::new(std::sync::Mutex::new(std::collections::HashMap::new())),
            idempotency_window: options.idempotency_window,
            enumeration: options.enumeration.map(|p| Arc::new(EnumerationGuard::new(p))),
            lifecycle: Arc::new(options.lifecycle),
            spool_dir: Arc::new(options.spool_dir),
            unit_seconds: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new(
                    "store_unit_seconds",
                    "Time to apply a unit of work (a change and its audit record) and make it durable",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
            )
            .map_err(|_| VaultError::Task)?,
            unit_failures: prometheus::IntCounter::new(
                "store_unit_failures_total",
                "Units of work (a change with its audit record) that failed and were not made durable",
            )
            .map_err(|_| VaultError::Task)?,
        })
    }

    /// The store's availability counters (for metrics).
    pub fn store_availability(&self) -> crate::store::Availability {
        self.store.availability()
    }

    /// Damage the store found at open, if any. While there is, a token that is not
    /// found may have been lost (fail closed, never 404), and nothing new is issued:
    /// a fresh token could reuse a lost one that callers still hold, and lost
    /// idempotency records could let a retried charge through twice.
    pub fn store_damage(&self) -> Option<StoreDamage> {
        self.store.damage()
    }

    /// Refuses new cards and charges while the store is damaged.
    fn refuse_if_damaged(&self) -> Result<(), VaultError> {
        match self.store.damage() {
            Some(_) => Err(VaultError::StoreDamaged),
            None => Ok(()),
        }
    }

    /// What a missing token means: not found, or possibly lost in a damaged store.
    fn missing(&self) -> VaultError {
        match self.store.damage() {
            Some(_) => VaultError::RecordLost,
            None => VaultError::NotFound,
        }
    }

    /// The key manager (sealed state, unseal).
    pub fn keys(&self) -> &KeyManager {
        &self.keys
    }

    /// The store and key manager, for components that share them (the audit trail).
    pub fn parts(&self) -> (Arc<dyn Store>, Arc<KeyManager>) {
        (self.store.clone(), self.keys.clone())
    }

    /// Number of records the vault holds.
    pub fn tokens_stored(&self) -> i64 {
        self.stored.load(Ordering::Relaxed)
    }

    /// Store reachable and keys unsealed: for readiness. Spends no encryption (an
    /// unauthenticated probe must not eat a KEK's random-nonce budget); the keys'
    /// round trip is checked once when they are loaded.
    pub async fn ready(&self) -> bool {
        let (store, keys) = (self.store.clone(), self.keys.clone());
        tokio::task::spawn_blocking(move || store.check().is_ok() && keys.ring().is_some())
            .await
            .unwrap_or(false)
    }

    /// Wraps counted per KEK version, and the limit (metrics, key status).
    pub async fn wrap_counts(&self) -> Result<(Vec<(u32, u64)>, u64), VaultError> {
        let Some(ring) = self.keys.ring() else {
            return Ok((Vec::new(), self.budget.limit()));
        };
        let versions: Vec<u32> = ring
            .versions()
            .iter()
            .filter(|v| {
                matches!(
                    v.state,
                    crate::keys::KeyState::Active | crate::keys::KeyState::DecryptOnly
                )
            })
            .map(|v| v.version)
            .collect();
        let budget = self.budget.clone();
        let counts = tokio::task::spawn_blocking(move || budget.snapshot(&versions))
            .await
            .map_err(|_| VaultError::Task)??;
        Ok((counts, self.budget.limit()))
    }

    /// Rotates the KEK when the active version has spent its wrap budget.
    pub async fn rotate_if_budget_spent(&self) -> Result<Option<u32>, VaultError> {
        let Some(ring) = self.keys.ring() else { return Ok(None) };
        let active = ring.active_version();
        let budget = self.budget.clone();
        let spent = tokio::task::spawn_blocking(move || budget.exhausted(active))
            .await
            .map_err(|_| VaultError::Task)??;
        if !spent {
            return Ok(None);
        }
        self.rotate_key("auto-rotation (nonce budget)").await.map(Some)
    }

    /// Tokenizes a card for the caller's tenant; with `dedupe`, returns the token
    /// the tenant already has for it. `event` is the caller's audit record (its
    /// outcome and token are filled in here): the store writes it with the record,
    /// atomically, and both are durable before this returns (one durable wait).
    /// A failure is the caller's to audit.
    pub async fn tokenize(
        &self,
        caller: TokenizeCaller,
        mut input: TokenizeInput,
        event: AuditEvent,
    ) -> Result<Tokenized, VaultError> {
        self.refuse_if_damaged()?;
        let cvv = input.cvv.take();
        let (caller, input) = (Arc::new(caller), Arc::new(input));
        // The token candidates, kept across attempts (a small space is enumerated
        // once, in random order, so every free token is tried).
        let mut tokens: Option<Candidates> = None;
        let mut outcome = loop {
            // Without dedupe, preparing touches no store (memory and crypto only, a few
            // microseconds): it runs right here, saving two thread hand-offs. With
            // dedupe (store reads), or when the wrap budget must be reserved in the
            // store, it runs on the blocking pool.
            let inline = if caller.dedupe {
                None
            } else {
                match self.tokenize_prepare(&caller, &input, &mut tokens, true) {
                    Ok(Prepared::NeedsStore) => None,
                    other => Some(other),
                }
            };
            let prepared = match inline {
                Some(prepared) => prepared,
                None => {
                    let (this, who, card) = (self.clone(), caller.clone(), input.clone());
                    let mut slot = tokens.take();
                    let (prepared, slot) = tokio::task::spawn_blocking(move || {
                        let prepared = this.tokenize_prepare(&who, &card, &mut slot, false);
                        (prepared, slot)
                    })
                    .await
                    .map_err(|_| VaultError::Task)?;
                    tokens = slot;
                    prepared
                }
            };
            let prepared = prepared?;
            let (record, meta, sealing) = match prepared {
                Prepared::Existing(meta) => break self.existing(meta, &event).await?,
                Prepared::Expired(tenant, token) => {
                    self.sweep_one(tenant, token, "token.expire", EXPIRY_PRINCIPAL).await?;
                    continue;
                }
                Prepared::Updated(meta) => {
                    self.store.commit().await?;
                    self.audited(outcome_event(&event, "existing-updated", &meta.token))
                        .await?;
                    break Tokenized::Existing(meta);
                }
                Prepared::New { record, meta, sealing } => (record, meta, sealing),
                Prepared::NeedsStore => return Err(VaultError::Task),
            };
            let unit = Unit {
                audit: outcome_event(&event, "created", &record.token),
                change: Change::Insert {
                    record,
                    mode: caller.mode(),
                },
                // Counted until the store has applied it, even if this request is dropped.
                held: Some(Box::new(sealing)),
            };
            // Durable before we answer: a 201 and its audit record survive a crash right after it.
            match self.apply(unit).await? {
                Applied::Inserted(InsertOutcome::Inserted) => {
                    self.stored.fetch_add(1, Ordering::Relaxed);
                    break Tokenized::Created(meta);
                }
                // Another card holds this token: seal under the next candidate.
                Applied::Inserted(InsertOutcome::TokenTaken) => continue,
                // A concurrent request stored this card first.
                Applied::Inserted(InsertOutcome::FingerprintExists(token)) => {
                    let (this, tenant) = (self.clone(), caller.tenant.clone());
                    let meta = tokio::task::spawn_blocking(move || this.metadata_blocking(&tenant, &token))
                        .await
                        .map_err(|_| VaultError::Task)??
                        .ok_or(VaultError::NotFound)?;
                    break self.existing(meta, &event).await?;
                }
                Applied::Deleted(_) | Applied::Audited | Applied::Read(_) | Applied::Unreadable => {
                    return Err(VaultError::Task);
                }
            }
        };
        let meta = match &mut outcome {
            Tokenized::Created(m) | Tokenized::Existing(m) => m,
        };
        if let Some(cvv) = &cvv
            && let Err(e) = self.cvv.put(&meta.token, cvv).await
        {
            // The card is stored; only its CVV could not be held (the answer says so).
            tracing::warn!(error = %e, "cannot hold the CVV for the next charge");
        }
        meta.cvv_held = self.cvv.holds(&meta.token).await;
        Ok(outcome)
    }

    /// Tokenizes once per connector transaction (a voice platform's
    /// `transaction_id`, which it resends on a timeout): a retry answers the first
    /// one's token for the idempotency window, another card under the same id is
    /// [`VaultError::IdempotencyMismatch`]. The request is recognised by the card's
    /// keyed fingerprint and expiry (no unkeyed digest of a PAN is stored).
    /// [`Tokenized::Existing`] is the replay of an earlier request.
    pub async fn tokenize_once(
        &self,
        caller: TokenizeCaller,
        transaction: &str,
        input: TokenizeInput,
        event: AuditEvent,
    ) -> Result<Tokenized, VaultError> {
        use sha2::Digest;
        let scope = charges::idempotency_scope(&[
            caller.client.as_bytes(),
            caller.tenant.as_str().as_bytes(),
            b"tokenize",
            transaction.as_bytes(),
        ]);
        let fingerprint = self
            .keys
            .ring()
            .ok_or(VaultError::Sealed)?
            .fingerprint(&caller.tenant, &input.card.pan);
        let mut h = sha2::Sha256::new();
        h.update(fingerprint);
        h.update(input.card.expiry.year().to_be_bytes());
        h.update([input.card.expiry.month(), input.format.to_u8()]);
        let request_hash: [u8; 32] = h.finalize().into();
        self.one_per_key(scope, async move {
            let now = OffsetDateTime::now_utc().unix_timestamp();
            let live_since = now - self.idempotency_window.as_secs() as i64;
            let store = self.store.clone();
            let prior = tokio::task::spawn_blocking(move || store.get_idempotency(&scope))
                .await
                .map_err(|_| VaultError::Task)??
                .filter(|p| p.created_at >= live_since);
            if let Some(prior) = prior {
                if prior.request_hash != request_hash {
                    return Err(VaultError::IdempotencyMismatch);
                }
                let token = prior
                    .charge_id
                    .strip_prefix("tok:")
                    .and_then(Token::parse)
                    .ok_or(VaultError::Integrity)?;
                let (this, tenant) = (self.clone(), caller.tenant.clone());
                let mut meta = tokio::task::spawn_blocking(move || this.metadata_blocking(&tenant, &token))
                    .await
                    .map_err(|_| VaultError::Task)??
                    .ok_or(VaultError::NotFound)?;
                if let Some(cvv) = &input.cvv
                    && !self.cvv.holds(&meta.token).await
                    && let Err(e) = self.cvv.put(&meta.token, cvv).await
                {
                    tracing::warn!(error = %e, "cannot hold the CVV for the next charge");
                }
                meta.cvv_held = self.cvv.holds(&meta.token).await;
                self.audited(outcome_event(&event, "replayed", &meta.token)).await?;
                return Ok(Tokenized::Existing(meta));
            }
            let meta = match self.tokenize(caller, input, event).await? {
                Tokenized::Created(m) | Tokenized::Existing(m) => m,
            };
            let entry = crate::store::IdempotencyRecord {
                request_hash,
                charge_id: format!("tok:{}", meta.token),
                created_at: now,
            };
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.remember(&scope, &entry, live_since))
                .await
                .map_err(|_| VaultError::Task)??;
            self.store.commit().await?;
            Ok(Tokenized::Created(meta))
        })
        .await
    }

    /// Answers with the tenant's existing token, audited durably.
    async fn existing(&self, meta: TokenMetadata, event: &AuditEvent) -> Result<Tokenized, VaultError> {
        self.audited(outcome_event(event, "existing", &meta.token)).await?;
        Ok(Tokenized::Existing(meta))
    }

    /// The record for `token` if it belongs to `tenant` and has not expired: an
    /// expired token is gone for every caller, before the sweeper deletes it.
    pub(crate) fn live_record(&self, tenant: &TenantId, token: &Token) -> Result<Option<StoredRecord>, VaultError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        Ok(self.store.get(tenant, token)?.filter(|r| !r.expired_at(now)))
    }

    /// Deletes up to `limit` expired tokens (each with its audit record, as one
    /// unit of work) and drops their waiting CVVs; returns how many went.
    pub async fn sweep_expired(&self, limit: usize) -> Result<usize, VaultError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let store = self.store.clone();
        let due = tokio::task::spawn_blocking(move || store.expired(now, limit))
            .await
            .map_err(|_| VaultError::Task)??;
        let mut gone = 0;
        for (tenant, token) in due {
            if self.sweep_one(tenant, token, "token.expire", EXPIRY_PRINCIPAL).await? {
                gone += 1;
            }
        }
        Ok(gone)
    }

    /// Deletes one token for a sweeper (expiry, retention) with its audit record
    /// (`action`, by `principal`; one unit of work) and drops its waiting CVV.
    /// `false`: it was gone already.
    async fn sweep_one(
        &self,
        tenant: TenantId,
        token: Token,
        action: &'static str,
        principal: &'static str,
    ) -> Result<bool, VaultError> {
        let unit = Unit {
            audit: AuditEvent {
                action,
                outcome: "deleted".into(),
                principal: Some(principal.into()),
                tenant: Some(tenant.as_str().to_owned()),
                token: Some(token.to_string()),
                ..Default::default()
            },
            change: Change::Delete {
                tenant,
                token: token.clone(),
            },
            held: None,
        };
        let deleted = self.apply(unit).await? == Applied::Deleted(true);
        if deleted {
            self.stored.fetch_sub(1, Ordering::Relaxed);
        }
        if let Err(e) = self.cvv.take(&token).await {
            tracing::warn!(error = %e, "cannot drop a swept card's waiting CVV (its TTL will)");
        }
        Ok(deleted)
    }

    /// The unit-of-work latency histogram and failure counter (registered with the metrics).
    pub fn unit_metrics(&self) -> (prometheus::Histogram, prometheus::IntCounter) {
        (self.unit_seconds.clone(), self.unit_failures.clone())
    }

    /// Applies a unit of work through the store and waits until it is durable.
    async fn apply(&self, unit: Unit) -> Result<Applied, crate::store::StoreError> {
        let timer = self.unit_seconds.start_timer();
        let applied = self.store.apply(unit, self.seal.clone()).await;
        timer.observe_duration();
        if applied.is_err() {
            self.unit_failures.inc();
        }
        applied
    }

    /// Appends an audit record as its own unit of work, durably.
    async fn audited(&self, event: AuditEvent) -> Result<(), VaultError> {
        let unit = Unit {
            change: Change::Nothing,
            audit: event,
            held: None,
        };
        self.apply(unit).await?;
        Ok(())
    }

    /// The blocking half of tokenize: checks, lookups and sealing (under a steady
    /// keyring), for the next of the token candidates in `tokens` (drawn at the
    /// first attempt).
    /// `inline`: on an async worker; answers [`Prepared::NeedsStore`] instead of
    /// touching the store (then it is called again on the blocking pool).
    fn tokenize_prepare(
        &self,
        caller: &TokenizeCaller,
        input: &TokenizeInput,
        tokens: &mut Option<Candidates>,
        inline: bool,
    ) -> Result<Prepared, VaultError> {
        let tenant = &caller.tenant;
        let guard = self.keys.read();
        let ring = guard.as_ref().ok_or(VaultError::Sealed)?;
        let pan = &input.card.pan;
        let fingerprint = ring.fingerprint(tenant, pan);
        // Before anything is looked up or stored: a refused guess leaves no record.
        if let Some(enumeration) = &self.enumeration {
            match enumeration.check(&caller.client, tenant.as_str(), pan.bin6(), pan.last4(), &fingerprint) {
                EnumerationVerdict::Allow => {}
                EnumerationVerdict::Flagged { .. } => {
                    return Err(VaultError::EnumerationSuspected {
                        flagged: true,
                        wait: enumeration.cooldown(),
                    });
                }
                EnumerationVerdict::Throttled(wait) => {
                    return Err(VaultError::EnumerationSuspected { flagged: false, wait });
                }
            }
        }
        if caller.dedupe
            && let Some(token) = self.store.find_fingerprint(tenant, &fingerprint)?
            && let Some(record) = self.store.get(tenant, &token)?
        {
            if record.expired_at(created_at_now()) {
                // The tenant's token for this card has expired: it goes now (as the
                // sweeper would), and the card gets a new token.
                return Ok(Prepared::Expired(tenant.clone(), token));
            }
            let card = ring.open(tenant, &token, &record.metadata_binding(), &record.sealed)?;
            // Tokenizing a known card is a use of it (retention).
            self.note_use(tenant, &token);
            let stored_expiry = (card.expiry.year(), card.expiry.month());
            let given = (input.card.expiry.year(), input.card.expiry.month());
            // A reissued card (a newer expiry) updates the token instead of silently
            // keeping the old date; the name follows when one is given.
            if given > stored_expiry {
                let updated = CardPayload {
                    pan: card.pan.clone(),
                    expiry: input.card.expiry,
                    name: input.card.name.clone().or_else(|| card.name.clone()),
                };
                if let Some(meta) = self.reseal(ring, &record, &updated)? {
                    return Ok(Prepared::Updated(meta));
                }
            }
            return Ok(Prepared::Existing(metadata(&record, &card)));
        }
        let created_at = now_seconds();
        let binding = crate::store::metadata_binding(
            input.format,
            pan.brand(),
            pan.bin6(),
            pan.last4(),
            &fingerprint,
            created_at,
        );
        // The wrap is counted first (conservative: counted even if no token is left).
        let version = ring.active_version();
        if inline {
            if self.budget.try_count(version, 1).is_none() {
                return Ok(Prepared::NeedsStore);
            }
        } else {
            self.budget.count(version, 1)?;
        }
        let token = tokens
            .get_or_insert_with(|| candidates(input.format, pan))
            .next()
            .ok_or(VaultError::TokenSpaceExhausted)?;
        let sealed = ring.seal(tenant, &token, &binding, &input.card);
        debug_assert_eq!(sealed.key_version, version);
        // Counted while the keyring is held: a retire or destroy (which takes it
        // exclusively) sees this record until it is stored.
        let sealing = self.sealing.hold(sealed.key_version);
        let record = StoredRecord {
            tenant: tenant.clone(),
            sealed,
            token,
            format: input.format,
            brand: pan.brand(),
            bin: pan.bin6().to_owned(),
            last4: pan.last4().to_owned(),
            fingerprint,
            created_at,
            network_tx_id: None,
            expires_at: input.expires_at,
        };
        let meta = metadata(&record, &input.card);
        Ok(Prepared::New {
            record: Box::new(record),
            meta,
            sealing,
        })
    }

    /// Records a reissued card under the same token (same PAN, new expiry, and a
    /// new cardholder name if given): the payload is sealed again under a fresh DEK
    /// and the active KEK, and replaces the old envelope (compare-and-swap; the old
    /// ciphertext is no longer in the record). `event` is appended durably after.
    pub async fn update_card(
        &self,
        tenant: TenantId,
        token: Token,
        expiry: crate::domain::card::Expiry,
        name: Option<crate::domain::card::CardholderName>,
        event: AuditEvent,
    ) -> Result<TokenMetadata, VaultError> {
        let this = self.clone();
        let meta = tokio::task::spawn_blocking(move || -> Result<TokenMetadata, VaultError> {
            for _ in 0..8 {
                let guard = this.keys.read();
                let ring = guard.as_ref().ok_or(VaultError::Sealed)?;
                let record = this.live_record(&tenant, &token)?.ok_or_else(|| this.missing())?;
                let card = ring.open(&tenant, &token, &record.metadata_binding(), &record.sealed)?;
                let updated = CardPayload {
                    pan: card.pan.clone(),
                    expiry,
                    name: name.clone().or_else(|| card.name.clone()),
                };
                if let Some(meta) = this.reseal(ring, &record, &updated)? {
                    this.note_use(&tenant, &token);
                    return Ok(meta);
                }
                // Changed meanwhile (a rewrap, another update): read it again.
            }
            Err(VaultError::Store(crate::store::StoreError::Backend(
                "the record kept changing during a card update".into(),
            )))
        })
        .await
        .map_err(|_| VaultError::Task)??;
        self.store.commit().await?;
        self.audited(outcome_event(&event, "ok", &meta.token)).await?;
        Ok(meta)
    }

    /// Seals `card` again for `record`'s token under a fresh DEK and swaps it in
    /// (`None`: the record changed meanwhile, nothing was written). Durable with
    /// the next commit. The caller holds the keyring steady.
    fn reseal(
        &self,
        ring: &crate::keys::Keyring,
        record: &StoredRecord,
        card: &CardPayload,
    ) -> Result<Option<TokenMetadata>, VaultError> {
        let sealed = ring.seal(&record.tenant, &record.token, &record.metadata_binding(), card);
        self.budget.count(sealed.key_version, 1)?;
        let _sealing = self.sealing.hold(sealed.key_version);
        if self.store.replace_sealed(&[(record.clone(), sealed.clone())])? == 0 {
            return Ok(None);
        }
        let stored = StoredRecord {
            sealed,
            ..record.clone()
        };
        Ok(Some(metadata(&stored, card)))
    }

    /// Metadata of a token (decrypts the payload for the expiry, then drops it).
    /// `event` (outcome `ok`) is appended and durable before this returns.
    pub async fn metadata(
        &self,
        tenant: TenantId,
        token: Token,
        event: AuditEvent,
    ) -> Result<TokenMetadata, VaultError> {
        let found = self.read_audited(&tenant, &token, &event, None).await?;
        let card = self.open_read(&tenant, &token, &found.record)?;
        let mut meta = metadata(&found.record, &card);
        meta.last_used_at = found.last_used;
        meta.cvv_held = self.cvv.holds(&meta.token).await;
        Ok(meta)
    }

    fn metadata_blocking(&self, tenant: &TenantId, token: &Token) -> Result<Option<TokenMetadata>, VaultError> {
        let ring = self.keys.ring().ok_or(VaultError::Sealed)?;
        self.metadata_with(&ring, tenant, token)
    }

    /// Metadata under a keyring the caller already holds (no second lock).
    fn metadata_with(
        &self,
        ring: &crate::keys::Keyring,
        tenant: &TenantId,
        token: &Token,
    ) -> Result<Option<TokenMetadata>, VaultError> {
        let Some(record) = self.live_record(tenant, token)? else {
            return Ok(None);
        };
        let card = ring.open(tenant, token, &record.metadata_binding(), &record.sealed)?;
        let mut meta = metadata(&record, &card);
        meta.last_used_at = self.store.last_used(tenant, token)?;
        Ok(Some(meta))
    }

    /// Reveals the card behind a token. `event` (outcome `ok`) is appended and
    /// durable before the card is returned.
    pub async fn detokenize(&self, tenant: TenantId, token: Token, event: AuditEvent) -> Result<Revealed, VaultError> {
        let found = self
            .read_audited(&tenant, &token, &event, Some(self.use_granularity()))
            .await?;
        let card = self.open_read(&tenant, &token, &found.record)?;
        Ok(Revealed { token, card })
    }

    /// Reads a tenant's live record and appends `event` (outcome `ok`) in one
    /// unit of work, durable before this returns: the committer reads, so a read
    /// costs no extra thread hand-off. With `touch`, the read records a use.
    /// Nothing is audited here when the record is absent (the caller audits the
    /// error).
    async fn read_audited(
        &self,
        tenant: &TenantId,
        token: &Token,
        event: &AuditEvent,
        touch: Option<i64>,
    ) -> Result<Box<crate::store::ReadRecord>, VaultError> {
        // A sealed vault could not open the card: refuse before anything is audited.
        if self.keys.is_sealed() {
            return Err(VaultError::Sealed);
        }
        let unit = Unit {
            audit: outcome_event(event, "ok", token),
            change: Change::Read {
                tenant: tenant.clone(),
                token: token.clone(),
                at: OffsetDateTime::now_utc().unix_timestamp(),
                touch,
            },
            held: None,
        };
        match self.apply(unit).await? {
            Applied::Read(Some(found)) => Ok(found),
            Applied::Read(None) => Err(self.missing()),
            Applied::Unreadable => Err(VaultError::Store(StoreError::Corrupt)),
            _ => Err(VaultError::Task),
        }
    }

    /// Opens a card read by [`Vault::read_audited`]: memory and crypto only (a few
    /// microseconds), so it runs on the calling worker.
    fn open_read(&self, tenant: &TenantId, token: &Token, record: &StoredRecord) -> Result<CardPayload, VaultError> {
        let ring = self.keys.ring().ok_or(VaultError::Sealed)?;
        Ok(ring.open(tenant, token, &record.metadata_binding(), &record.sealed)?)
    }

    /// Deletes a token for good: record and fingerprint entry, with `event`
    /// (outcome `deleted`) in the same atomic write, durably.
    pub async fn delete(&self, tenant: TenantId, token: Token, event: AuditEvent) -> Result<(), VaultError> {
        if self.keys.is_sealed() {
            return Err(VaultError::Sealed);
        }
        let unit = Unit {
            audit: outcome_event(&event, "deleted", &token),
            change: Change::Delete {
                tenant,
                token: token.clone(),
            },
            held: None,
        };
        if self.apply(unit).await? != Applied::Deleted(true) {
            return Err(self.missing());
        }
        // A deleted card takes its waiting CVV with it.
        if let Err(e) = self.cvv.take(&token).await {
            tracing::warn!(error = %e, "cannot drop the deleted card's waiting CVV (its TTL will)");
        }
        self.stored.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }
}

/// What the blocking half of tokenize found or made.
enum Prepared {
    Existing(TokenMetadata),
    /// The tenant's existing token, its card updated to the newer expiry given.
    Updated(TokenMetadata),
    /// The tenant's token for this card expired: delete it, then try again.
    Expired(TenantId, Token),
    New {
        record: Box<StoredRecord>,
        meta: TokenMetadata,
        sealing: Sealing,
    },
    /// Prepared inline: the next step needs the store (the blocking pool's job).
    NeedsStore,
}

impl TokenizeCaller {
    fn mode(&self) -> InsertMode {
        if self.dedupe {
            InsertMode::Dedupe
        } else {
            InsertMode::Fresh
        }
    }
}

/// Records sealed per KEK version and not yet stored.
#[derive(Default)]
pub(crate) struct SealingCounts(std::sync::Mutex<std::collections::HashMap<u32, u64>>);

impl SealingCounts {
    fn hold(self: &Arc<Self>, version: u32) -> Sealing {
        *self.lock().entry(version).or_insert(0) += 1;
        Sealing {
            counts: self.clone(),
            version,
        }
    }

    /// Records sealed under `version` that are on their way to the store.
    pub(crate) fn in_flight(&self, version: u32) -> u64 {
        self.lock().get(&version).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u32, u64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One sealed record on its way to the store (counted until dropped).
pub(crate) struct Sealing {
    counts: Arc<SealingCounts>,
    version: u32,
}

impl Drop for Sealing {
    fn drop(&mut self) {
        let mut counts = self.counts.lock();
        if let Some(n) = counts.get_mut(&self.version) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.version);
            }
        }
    }
}

/// The caller's audit event with the outcome and token of what happened.
fn outcome_event(event: &AuditEvent, outcome: &str, token: &Token) -> AuditEvent {
    AuditEvent {
        outcome: outcome.to_owned(),
        token: Some(token.to_string()),
        ..event.clone()
    }
}

fn metadata(record: &StoredRecord, card: &CardPayload) -> TokenMetadata {
    TokenMetadata {
        token: record.token.clone(),
        format: record.format,
        brand: record.brand,
        bin: record.bin.clone(),
        last4: record.last4.clone(),
        exp_month: card.expiry.month(),
        exp_year: card.expiry.year(),
        fingerprint: hex::encode(record.fingerprint),
        created_at: record.created_at,
        cvv_held: false,
        expires_at: record.expires_at,
        last_used_at: None,
    }
}

/// Who the sweeper's deletions of expired tokens are recorded as.
pub const EXPIRY_PRINCIPAL: &str = "system:token-expiry";

fn created_at_now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn now_seconds() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}
