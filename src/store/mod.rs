//! Persistence behind the [`Store`] trait. Its types carry nothing of sled, so
//! other backends (PostgreSQL) can implement it; the store never sees a PAN, only
//! tokens, public metadata and sealed envelopes.

mod anchor;
pub mod backup;
mod codec;
pub mod copy;
mod postgres;
mod sled_store;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use time::OffsetDateTime;
use tokio::sync::oneshot;

pub use anchor::KeyedMark;
pub use postgres::{PgConfigError, PgOptions, PgStore, SCHEMA_VERSION};
pub use sled_store::{Salvage, SledStore};

use crate::crypto::Key256;
use crate::domain::card::Brand;
use crate::domain::tenant::TenantId;
use crate::domain::token::{Token, TokenFormat};
use crate::keys::SealedCard;
use crate::keys::keystore::SharedError;

/// See [`Store::availability`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Availability {
    pub unavailable: u64,
    pub reconnects: u64,
}

/// Where a vault keeps its data.
#[derive(Debug, Clone)]
pub enum StoreLocation {
    /// The embedded sled database in this directory (one process owns it), with
    /// its page cache in bytes (`None`: sled's default, 1 GiB).
    Sled(std::path::PathBuf, Option<u64>),
    /// A PostgreSQL database shared by any number of vault replicas.
    Postgres(PgOptions),
}

impl StoreLocation {
    /// Opens the backend (PostgreSQL: connects and migrates the schema).
    pub fn open(&self) -> Result<Arc<dyn Store>, StoreError> {
        Ok(match self {
            StoreLocation::Sled(dir, cache) => Arc::new(SledStore::open_with(dir, *cache)?),
            StoreLocation::Postgres(pg) => Arc::new(PgStore::open(pg)?),
        })
    }

    /// For banners and logs: the backend and where, never a password.
    pub fn describe(&self) -> String {
        match self {
            StoreLocation::Sled(dir, _) => format!("sled {}", dir.display()),
            StoreLocation::Postgres(pg) => format!("postgres {}", pg.describe()),
        }
    }
}

/// One tokenized card as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub tenant: TenantId,
    pub token: Token,
    pub format: TokenFormat,
    pub brand: Brand,
    /// First six digits (displayable under PCI DSS 3.4.1).
    pub bin: String,
    /// Last four digits (displayable under PCI DSS 3.4.1).
    pub last4: String,
    /// Keyed HMAC of the PAN within the tenant (dedupe index).
    pub fingerprint: [u8; 32],
    pub created_at: OffsetDateTime,
    pub sealed: SealedCard,
    /// The card scheme's transaction id from the first customer-initiated charge
    /// (card-on-file); sent with later merchant-initiated charges. Not card data.
    pub network_tx_id: Option<String>,
    /// When the token stops existing (unix seconds; `None`: it lives until deleted).
    /// Past it the record is absent for every caller, and the sweeper deletes it.
    pub expires_at: Option<i64>,
}

impl StoredRecord {
    /// Whether the token has expired at `now` (unix seconds).
    pub fn expired_at(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// The public fields bound into the payload's associated data (everything but
    /// the envelope and the card-on-file id, which is set later).
    pub fn metadata_binding(&self) -> Vec<u8> {
        metadata_binding(
            self.format,
            self.brand,
            &self.bin,
            &self.last4,
            &self.fingerprint,
            self.created_at,
        )
    }
}

/// [`Store::set_network_tx_id`] for every backend: read the record, and if it has no
/// id yet, compare-and-swap its encoded bytes for ones with `id` (`cas` answers
/// whether the swap happened); a record changed meanwhile (a rewrap) is read again.
fn set_once(
    get: impl Fn() -> Result<Option<StoredRecord>, StoreError>,
    cas: impl Fn(Vec<u8>, Vec<u8>) -> Result<bool, StoreError>,
    id: &str,
) -> Result<bool, StoreError> {
    loop {
        let Some(current) = get()? else {
            return Ok(false);
        };
        if current.network_tx_id.is_some() {
            return Ok(false);
        }
        let expected = codec::encode(&current)?;
        let next = codec::encode(&StoredRecord {
            network_tx_id: Some(id.to_owned()),
            ..current
        })?;
        if cas(expected, next)? {
            return Ok(true);
        }
    }
}

/// See [`StoredRecord::metadata_binding`]; usable before the record exists.
pub fn metadata_binding(
    format: TokenFormat,
    brand: Brand,
    bin: &str,
    last4: &str,
    fingerprint: &[u8; 32],
    created_at: OffsetDateTime,
) -> Vec<u8> {
    crate::crypto::aad(
        "tokenvault/v1/record-metadata",
        &[
            &[format.to_u8(), brand.to_u8()],
            bin.as_bytes(),
            last4.as_bytes(),
            fingerprint,
            &created_at.unix_timestamp().to_be_bytes(),
        ],
    )
}

/// A charge as stored: the outcome, never card data.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChargeRecord {
    pub id: String,
    pub tenant: String,
    pub client: String,
    pub token: String,
    pub amount_value: u64,
    pub currency: String,
    pub reference: String,
    pub shopper_interaction: String,
    pub recurring: Option<(String, String)>,
    pub status: String,
    pub psp_reference: Option<String>,
    pub refusal_reason: Option<String>,
    pub network_transaction_id: Option<String>,
    pub cvv_sent: bool,
    pub created_at: i64,
    /// `automatic` (the PSP captures at authorisation) or `manual` (a capture
    /// call follows, or a cancel releases the funds).
    pub capture: String,
    /// Captures, refunds and cancels, in the order they were made.
    pub modifications: Vec<Modification>,
}

/// A capture, refund or cancel of a charge: reserved (`pending`) durably before
/// the PSP sees it, then its outcome. Never card data.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Modification {
    /// `mod_…`; the PSP idempotency key derives from it.
    pub id: String,
    /// `capture`, `refund` or `cancel`.
    pub kind: String,
    /// Minor units in the charge's currency (none for a cancel).
    pub amount_value: Option<u64>,
    /// A refund's reason, as given.
    pub reason: Option<String>,
    /// `pending` (outcome unknown), `received` (the PSP acknowledged it),
    /// `refused` (the PSP refused it; nothing changed) or `error` (never sent).
    pub status: String,
    pub psp_reference: Option<String>,
    pub failure_reason: Option<String>,
    pub client: String,
    pub created_at: i64,
    pub updated_at: i64,
    /// Digest of (client, tenant, charge, kind, Idempotency-Key).
    pub scope: [u8; 32],
    /// Digest of the request: the same key with another body is refused.
    pub request_hash: [u8; 32],
}

/// Which charges [`Store::charges_of`] lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargesOf {
    Token(String),
    Reference(String),
}

/// What an Idempotency-Key resolved to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdempotencyRecord {
    /// SHA-256 of the canonical request: same key with another body is refused.
    pub request_hash: [u8; 32],
    pub charge_id: String,
    pub created_at: i64,
}

/// An audit record the audit layer prepared (opaque bytes to the store), stored in
/// the same atomic write as the change it records: both or neither.
#[derive(Debug, Clone)]
pub struct AuditAppend {
    /// Consecutive sequence number assigned by the audit layer.
    pub seq: u64,
    pub record: Vec<u8>,
    /// For a MACed record, the audit key its keyed mark is computed under (see
    /// [`AuditAppend::keyed_mac`]).
    pub keyed: Option<MarkKey>,
    /// The record's chain hash (the audit layer's head; the store ignores it).
    pub hash: [u8; 32],
}

impl AuditAppend {
    /// For a MACed record, the MAC over its sequence and digest that the store
    /// anchors as the keyed mark. Computed on demand: a store anchors only the last
    /// MACed record of a write, so the others never pay for it.
    pub fn keyed_mac(&self) -> Option<[u8; 32]> {
        self.keyed
            .as_ref()
            .map(|k| keyed_mark_mac(&k.0, self.seq, &self.record))
    }
}

/// The audit key, shared by the records one sealing batch MACs (no copy per record).
#[derive(Clone)]
pub struct MarkKey(Arc<Key256>);

impl MarkKey {
    pub(crate) fn new(key: Key256) -> MarkKey {
        MarkKey(Arc::new(key))
    }

    pub(crate) fn key(&self) -> &Key256 {
        &self.0
    }
}

impl std::fmt::Debug for MarkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MarkKey([REDACTED])")
    }
}

/// The MAC a keyed anchor mark carries: over the record's sequence and the
/// SHA-256 of its stored bytes, under the audit key.
pub fn keyed_mark_mac(key: &Key256, seq: u64, stored: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let digest: [u8; 32] = Sha256::digest(stored).into();
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(b"tokenvault/v1/anchor-keyed-mark");
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(&digest);
    key.hmac(&msg)
}

/// What one request changes in the store: the data change and the audit record
/// that records it, applied atomically (both or neither) and durable together.
pub struct Unit {
    pub change: Change,
    /// The audit record to store if the change is made (an insert that finds the
    /// token taken or the card known, or a delete that finds nothing, stores none).
    pub audit: AuditEvent,
    /// Kept until the backend has applied the unit, then dropped (even if its
    /// caller has gone meanwhile): e.g. the count of records sealed under a KEK
    /// version that a retire must wait for.
    pub held: Option<Box<dyn Send>>,
}

impl std::fmt::Debug for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unit")
            .field("change", &self.change)
            .field("audit", &self.audit)
            .finish_non_exhaustive()
    }
}

/// The data change of a [`Unit`].
#[derive(Debug, Clone)]
pub enum Change {
    /// Insert-if-absent, as [`Store::insert`].
    Insert {
        record: Box<StoredRecord>,
        mode: InsertMode,
    },
    /// Remove a record and its index entries, as [`Store::delete`].
    Delete { tenant: TenantId, token: Token },
    /// Nothing but the audit record (a read).
    Nothing,
    /// Reads a tenant's record, audited in the same unit: the audit record is
    /// stored only when the record is there, belongs to `tenant` and has not
    /// expired at `at`. With `touch` (a granularity in seconds) the read records a
    /// use as [`Store::touch`] does. One hand-off for a read and its audit record
    /// instead of a read on the blocking pool, then a unit.
    Read {
        tenant: TenantId,
        token: Token,
        at: i64,
        touch: Option<i64>,
    },
}

/// A record as a [`Change::Read`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRecord {
    pub record: StoredRecord,
    /// When the record was last used (after this read's own use, if it recorded one).
    pub last_used: Option<i64>,
}

/// What a [`Unit`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Inserted(InsertOutcome),
    Deleted(bool),
    Audited,
    /// The record read (`None`: absent, another tenant's or expired; no audit record).
    Read(Option<Box<ReadRecord>>),
    /// The record's stored bytes do not decode (damaged): no audit record. The
    /// other units of the batch go on (an error would fail them all).
    Unreadable,
}

impl Applied {
    /// Whether the change was made (and its audit record stored).
    pub fn made(&self) -> bool {
        matches!(
            self,
            Applied::Inserted(InsertOutcome::Inserted)
                | Applied::Deleted(true)
                | Applied::Audited
                | Applied::Read(Some(_))
        )
    }
}

/// Seals audit records in the order the store writes them. The audit layer
/// implements it (sequence numbers, chain hashes, MACs); the store only decides
/// which records are written, in one atomic write with their changes.
pub trait AuditSeal: Send + Sync {
    /// Locks the trail's head for one atomic write.
    fn begin(&self) -> Box<dyn SealBatch + '_>;
}

/// Records sealed for one atomic write, after the head [`AuditSeal::begin`] locked.
pub trait SealBatch {
    /// The write is attempted again (a backend may retry a transaction): start over.
    fn restart(&mut self);
    /// The next records for `event` (an opening marker may precede it).
    fn seal(&mut self, event: &AuditEvent) -> Result<Vec<AuditAppend>, StoreError>;
    /// The records of the last [`SealBatch::seal`] were not written: drop them.
    fn unseal_last(&mut self);
    /// The write is stored: what was sealed becomes the trail's head.
    fn commit(self: Box<Self>);
    /// The trail in the store ends at this record (another writer — a vault replica
    /// over the same database — appended it): seal after it from now on.
    fn follow(&mut self, seq: u64, record: &[u8]) -> Result<(), StoreError>;
}

/// Resolves to a unit's outcome once it is applied and durable.
pub type Applying = Pending<Applied>;

/// Resolves when the writes before it are on stable storage.
pub type Commit = Pending<()>;

/// An answer from a backend's writer: resolves once the work is durable.
pub struct Pending<T>(PendingInner<T>);

enum PendingInner<T> {
    Waiting(oneshot::Receiver<Result<T, StoreError>>),
    Failed(Option<StoreError>),
}

impl<T> Pending<T> {
    pub(crate) fn waiting(rx: oneshot::Receiver<Result<T, StoreError>>) -> Pending<T> {
        Pending(PendingInner::Waiting(rx))
    }

    pub(crate) fn failed(e: StoreError) -> Pending<T> {
        Pending(PendingInner::Failed(Some(e)))
    }
}

impl<T> Future for Pending<T> {
    type Output = Result<T, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            PendingInner::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or_else(|_| Err(StoreError::Backend("commit thread stopped".into())))),
            PendingInner::Failed(e) => Poll::Ready(Err(e
                .take()
                .unwrap_or_else(|| StoreError::Backend("polled twice".into())))),
        }
    }
}

/// Whether an insert honours the tenant's fingerprint index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertMode {
    /// Refuse when the tenant already holds this card ([`InsertOutcome::FingerprintExists`]).
    Dedupe,
    /// Always store a new token; the index keeps pointing at the card's first token
    /// (so the answer never tells a new card from a known one).
    Fresh,
}

/// What an insert-if-absent did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    Inserted,
    /// The token is already in use (by any tenant): draw another.
    TokenTaken,
    /// The tenant already holds this card, under this token.
    FingerprintExists(Token),
}

/// What a store found wrong with itself at open: acknowledged writes may be gone.
/// Carries sequence numbers only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreDamage {
    #[error(
        "records lost: the audit trail ends at record {found}, but record {anchored} was durably written \
         (the store's log was damaged and its recovery dropped everything after the damage)"
    )]
    RecordsLost { anchored: u64, found: u64 },
    #[error(
        "history differs: audit record {anchored} is not the one that was durably written \
         (an older copy of the store was restored, or it was altered); the trail ends at {found}"
    )]
    HistoryDiffers { anchored: u64, found: u64 },
    #[error("the store's anchor file is missing, but its audit trail holds {found} records")]
    AnchorMissing { found: u64 },
    #[error("the store's anchor file is unreadable (both copies fail their checksum); the trail ends at {found}")]
    AnchorUnreadable { found: u64 },
}

impl StoreDamage {
    /// A fixed label for metrics and audit outcomes.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreDamage::RecordsLost { .. } => "records_lost",
            StoreDamage::HistoryDiffers { .. } => "history_differs",
            StoreDamage::AnchorMissing { .. } => "anchor_missing",
            StoreDamage::AnchorUnreadable { .. } => "anchor_unreadable",
        }
    }
}

/// What happened, as the caller describes it (the audit trail's input; the
/// trail itself lives in `audit`, above the store). No card data.
#[derive(Debug, Clone, Default)]
pub struct AuditEvent {
    pub action: &'static str,
    pub outcome: String,
    pub principal: Option<String>,
    pub tenant: Option<String>,
    pub token: Option<String>,
    pub request_id: Option<String>,
    pub source: Option<String>,
    pub detail: Option<String>,
}

/// A storage failure. The detail is for logs only, never for clients.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("storage backend error: {0}")]
    Backend(String),
    /// An I/O or embedded-database error, with what the store was doing; the error is
    /// kept as the source. (PostgreSQL's errors are reduced to their SQLSTATE and message
    /// instead: a driver error's detail can quote row data.)
    #[error("storage backend error: {context}")]
    Io {
        context: String,
        #[source]
        source: std::sync::Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The backend cannot be reached right now (a database restarting or failing
    /// over, a full pool): nothing was changed; the request may be retried.
    #[error("storage backend unavailable: {0}")]
    Unavailable(String),
    #[error("stored record is corrupt")]
    Corrupt,
}

/// Any error, kept whole as a cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl StoreError {
    /// An I/O or embedded-database error and what the store was doing.
    pub fn io(context: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> StoreError {
        StoreError::Io {
            context: context.into(),
            source: std::sync::Arc::new(source),
        }
    }
}

/// The storage interface. Methods are blocking; callers run them off the async
/// executor. Writes become durable when a later [`Store::commit`] resolves.
pub trait Store: Send + Sync + 'static {
    /// Inserts the record and its fingerprint entry atomically, unless the token
    /// is taken or (in [`InsertMode::Dedupe`]) the tenant already holds this
    /// fingerprint. In [`InsertMode::Fresh`] a known fingerprint keeps its entry.
    /// `audit`, if given, is stored in the same atomic write, only if the record is.
    /// For tests and tools: the service writes through [`Store::apply`].
    fn insert(
        &self,
        record: &StoredRecord,
        mode: InsertMode,
        audit: Option<&AuditAppend>,
    ) -> Result<InsertOutcome, StoreError>;
    /// The record for `token` if it belongs to `tenant`; `None` otherwise, so that
    /// another tenant's token is indistinguishable from an unknown one.
    fn get(&self, tenant: &TenantId, token: &Token) -> Result<Option<StoredRecord>, StoreError>;
    /// The token a tenant holds for a fingerprint.
    fn find_fingerprint(&self, tenant: &TenantId, fingerprint: &[u8; 32]) -> Result<Option<Token>, StoreError>;
    /// Removes the record, and its fingerprint entry if that names this token,
    /// atomically; `false` if absent. `audit`, if given, is stored in the same
    /// atomic write, only if the record was removed. For tests and tools: the
    /// service writes through [`Store::apply`].
    fn delete(&self, tenant: &TenantId, token: &Token, audit: Option<&AuditAppend>) -> Result<bool, StoreError>;
    /// Number of stored records (may be slow: call at start-up only).
    fn count(&self) -> Result<u64, StoreError>;
    /// Up to `limit` tokens whose expiry is at or before `now` (unix seconds),
    /// soonest first, for the sweeper to delete.
    fn expired(&self, now: i64, limit: usize) -> Result<Vec<(TenantId, Token)>, StoreError>;
    /// Up to `limit` of a tenant's records in token order after `after` (a cursor:
    /// no rescans), each with when it was last used (unix seconds: its creation,
    /// or a later [`Store::touch`]). With `used_before`, only records last used
    /// before it (the scan still goes on to `limit` matches or the tenant's end).
    fn tenant_records(
        &self,
        tenant: &TenantId,
        after: Option<&Token>,
        limit: usize,
        used_before: Option<i64>,
    ) -> Result<Vec<(StoredRecord, i64)>, StoreError>;
    /// When a tenant's record was last used (`None`: no such record).
    fn last_used(&self, tenant: &TenantId, token: &Token) -> Result<Option<i64>, StoreError>;
    /// Records a use of a tenant's record at `at` if its last use is older than
    /// `at - granularity` (so a busy token costs a write per granularity, not per
    /// use); a record that is gone stays gone. Durable with the next commit.
    fn touch(&self, tenant: &TenantId, token: &Token, at: i64, granularity: i64) -> Result<(), StoreError>;
    /// Up to `limit` of a tenant's charges for one token or one merchant
    /// reference, oldest first, after `after` (the cursor: creation time and id
    /// of the last charge of the previous page).
    fn charges_of(
        &self,
        tenant: &TenantId,
        of: &ChargesOf,
        after: Option<&(i64, String)>,
        limit: usize,
    ) -> Result<Vec<ChargeRecord>, StoreError>;
    /// Records per KEK version (cheap: key status and every rewrap step ask).
    fn count_by_version(&self) -> Result<std::collections::BTreeMap<u32, u64>, StoreError>;
    /// Up to `limit` records whose DEK is wrapped under `version`, in token order,
    /// starting after the token `after` (a cursor: no rescans). sled walks its
    /// records (it keeps no version index: one random-key write fewer per
    /// tokenize); PostgreSQL reads its `(key_version, token)` index.
    fn records_under_version(
        &self,
        version: u32,
        after: Option<&Token>,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, StoreError>;
    /// Replaces the envelopes of many records, each only if the record is still
    /// exactly as read (compare-and-swap per record; a record that changed or was
    /// deleted meanwhile is left alone), and moves its count to the new version.
    /// Returns how many were replaced. Durable with the next commit.
    fn replace_sealed(&self, moves: &[(StoredRecord, SealedCard)]) -> Result<u64, StoreError>;
    /// Sets a record's card-on-file network transaction id if it has none yet.
    fn set_network_tx_id(&self, tenant: &TenantId, token: &Token, id: &str) -> Result<bool, StoreError>;
    /// Reserves an idempotency key for a charge: stores the charge and the entry
    /// that names it, atomically, unless the key already holds an entry created at
    /// or after `live_since` (then nothing is written and that entry is returned:
    /// another request, on any replica, reserved it first). An older entry is
    /// replaced (its window is over).
    fn reserve_charge(
        &self,
        charge: &ChargeRecord,
        idempotency_key: &[u8; 32],
        idem: &IdempotencyRecord,
        live_since: i64,
    ) -> Result<Option<IdempotencyRecord>, StoreError>;
    /// Replaces a stored charge (its outcome, after the PSP answered).
    fn update_charge(&self, charge: &ChargeRecord) -> Result<(), StoreError>;
    /// Replaces the stored charge with `new` only if it is still `old`
    /// (compare-and-set: two requests, on any replicas, modifying one charge
    /// cannot lose either's change). `false`: it changed meanwhile, nothing was
    /// written. Durable once a later [`Store::commit`] resolves (PostgreSQL: at once).
    fn swap_charge(&self, old: &ChargeRecord, new: &ChargeRecord) -> Result<bool, StoreError>;
    /// A charge of `tenant` by id.
    fn get_charge(&self, tenant: &TenantId, id: &str) -> Result<Option<ChargeRecord>, StoreError>;
    /// The idempotency entry for a (client, tenant, key) digest.
    fn get_idempotency(&self, idempotency_key: &[u8; 32]) -> Result<Option<IdempotencyRecord>, StoreError>;
    /// Stores an idempotency entry that names something other than a charge (a
    /// connector's token), unless the key holds one created at or after
    /// `live_since` (then nothing is written and that one is returned). Durable
    /// with the next commit.
    fn remember(
        &self,
        idempotency_key: &[u8; 32],
        idem: &IdempotencyRecord,
        live_since: i64,
    ) -> Result<Option<IdempotencyRecord>, StoreError>;
    /// Appends one audit record (the caller assigns consecutive sequence numbers).
    /// `keyed_mac`, for a MACed record, is the audit layer's MAC over the record's
    /// sequence and digest: the store anchors it as the keyed mark.
    fn audit_append(&self, seq: u64, record: &[u8], keyed_mac: Option<[u8; 32]>) -> Result<(), StoreError>;
    /// Appends one audit event on its own (no data change), sealed by `seal` in the
    /// store's order; durable with the next [`Store::commit`] (PostgreSQL: on return).
    fn audit_event(&self, event: &AuditEvent, seal: Arc<dyn AuditSeal>) -> Result<(), StoreError> {
        let mut batch = seal.begin();
        let records = batch.seal(event)?;
        let written = records
            .iter()
            .try_for_each(|r| self.audit_append(r.seq, &r.record, r.keyed_mac()));
        if written.is_err() {
            batch.unseal_last();
        }
        batch.commit();
        written
    }
    /// The keyed mark the store was anchored with when it opened (the last MACed
    /// audit record then), if any.
    fn audit_keyed_mark(&self) -> Option<KeyedMark> {
        None
    }
    /// Whether the anchor read at open predates keyed marks (written by an older
    /// version): then a missing keyed mark is expected, once.
    fn audit_anchor_legacy(&self) -> bool {
        false
    }
    /// The last audit record, if any.
    fn audit_last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError>;
    /// Audit records with sequence ≥ `from`, in order, at most `limit`.
    fn audit_scan(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// The highest keystore generation this store has seen (0: none yet).
    fn keystore_generation(&self) -> Result<u64, StoreError>;
    /// Records a keystore generation, durably before it returns.
    fn set_keystore_generation(&self, generation: u64) -> Result<(), StoreError>;
    /// Wraps durably reserved under a KEK version (its random-nonce budget), 0 if none.
    fn kek_wraps(&self, version: u32) -> Result<u64, StoreError>;
    /// Records the wraps reserved under a KEK version (durable with the next commit).
    fn set_kek_wraps(&self, version: u32, reserved: u64) -> Result<(), StoreError>;
    /// The audit retention checkpoint (opaque to the store), if records were pruned.
    fn audit_checkpoint(&self) -> Result<Option<Vec<u8>>, StoreError>;
    /// Stores `checkpoint`, then removes audit records with sequence ≤ `through`;
    /// returns how many were removed.
    fn audit_prune(&self, through: u64, checkpoint: &[u8]) -> Result<u64, StoreError>;
    /// Applies one request's unit of work (its change and its audit record, atomically)
    /// and resolves once both are durable: the request's one durable wait. Never
    /// blocks; backends batch concurrent units into one write and one flush.
    fn apply(&self, unit: Unit, seal: Arc<dyn AuditSeal>) -> Applying;
    /// A ticket that resolves once every write made before this call is durable.
    /// Concurrent callers share one flush (group commit).
    fn commit(&self) -> Commit;
    /// Cheap liveness check of the backend, for readiness probes.
    fn check(&self) -> Result<(), StoreError>;
    /// Whether the keystore lives in this store (a database every vault replica
    /// shares) rather than in a file beside it (sled: one vault).
    fn holds_keystore(&self) -> bool {
        false
    }
    /// The keystore kept in this store, if there is one.
    fn keystore_load(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(None)
    }
    /// The generation of the keystore kept in this store (cheap: replicas poll it).
    fn keystore_stored_generation(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
    /// Stores the keystore as `generation` if the stored generation is `expected`
    /// (`None`: none stored yet), atomically; `false` if it was not.
    fn keystore_save(&self, _expected: Option<u64>, _generation: u64, _bytes: &[u8]) -> Result<bool, StoreError> {
        Err(StoreError::Backend("this store keeps no keystore".into()))
    }
    /// Counters for metrics: calls answered "unavailable", and reconnections of
    /// the backend's writer after its connection was lost (a database restart or
    /// failover). Zero for an embedded backend.
    fn availability(&self) -> Availability {
        Availability::default()
    }
    /// Damage found at open: writes acknowledged earlier may be missing.
    fn damage(&self) -> Option<StoreDamage> {
        None
    }
    /// An online backup of the whole store into `out` ([`backup`] format), with the
    /// keystore `keystore` reads; `None` for a backend that is backed up with its
    /// own tools (PostgreSQL: see README, "Backups").
    #[allow(clippy::type_complexity)]
    fn backup(
        &self,
        _out: &mut dyn std::io::Write,
        _keystore: &dyn Fn() -> Result<zeroize::Zeroizing<Vec<u8>>, BoxError>,
    ) -> Result<Option<(backup::Summary, u64)>, StoreError> {
        Ok(None)
    }
    /// Set when an operator accepted a loss (`tokenvault store reanchor`) since the
    /// last start: the anchored sequence number it was moved back from.
    fn reanchored_from(&self) -> Option<u64> {
        None
    }
}

/// The keystore kept in a store that holds one ([`Store::holds_keystore`]).
pub struct StoreKeystore(pub Arc<dyn Store>);

impl crate::keys::keystore::SharedKeystore for StoreKeystore {
    fn describe(&self) -> String {
        "the database (table tv_keystore)".into()
    }

    fn load(&self) -> Result<Option<Vec<u8>>, SharedError> {
        Ok(self.0.keystore_load()?)
    }

    fn generation(&self) -> Result<Option<u64>, SharedError> {
        Ok(self.0.keystore_stored_generation()?)
    }

    fn save(&self, expected: Option<u64>, generation: u64, bytes: &[u8]) -> Result<bool, SharedError> {
        Ok(self.0.keystore_save(expected, generation, bytes)?)
    }
}

#[cfg(test)]
pub(crate) mod conformance {
    //! The storage conformance suite: every backend must pass it.

    use super::*;

    pub(crate) fn record(tenant: &str, token: &str, fp: u8) -> StoredRecord {
        StoredRecord {
            tenant: TenantId::parse(tenant).unwrap(),
            token: Token::parse(token).unwrap(),
            format: TokenFormat::Bin6Last4,
            brand: Brand::Visa,
            bin: "411111".into(),
            last4: "1111".into(),
            fingerprint: [fp; 32],
            created_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            sealed: SealedCard {
                key_version: 1,
                wrapped_dek: vec![1; 60],
                ciphertext: vec![2; 50],
            },
            network_tx_id: None,
            expires_at: None,
        }
    }

    /// An authorised, automatically captured charge of 1.00 EUR on `record`'s token.
    pub(crate) fn charge(id: &str, record: &StoredRecord, reference: &str) -> ChargeRecord {
        ChargeRecord {
            id: id.into(),
            tenant: record.tenant.to_string(),
            client: "psp".into(),
            token: record.token.to_string(),
            amount_value: 100,
            currency: "EUR".into(),
            reference: reference.into(),
            shopper_interaction: "moto".into(),
            recurring: None,
            status: "authorised".into(),
            psp_reference: None,
            refusal_reason: None,
            network_transaction_id: None,
            cvv_sent: false,
            created_at: 5,
            capture: "automatic".into(),
            modifications: Vec::new(),
        }
    }

    /// Seals an event as its outcome's bytes, numbered after the store's trail.
    pub(crate) struct TestSeal(std::sync::Mutex<u64>);

    impl TestSeal {
        pub(crate) fn after(store: &dyn Store) -> TestSeal {
            TestSeal(std::sync::Mutex::new(store.audit_last().unwrap().map_or(0, |(s, _)| s)))
        }
    }

    struct TestBatch<'a> {
        head: std::sync::MutexGuard<'a, u64>,
        start: u64,
        at: u64,
    }

    impl AuditSeal for TestSeal {
        fn begin(&self) -> Box<dyn SealBatch + '_> {
            let head = self.0.lock().unwrap();
            let start = *head;
            Box::new(TestBatch { head, start, at: start })
        }
    }

    impl SealBatch for TestBatch<'_> {
        fn restart(&mut self) {
            self.at = self.start;
        }

        fn seal(&mut self, event: &AuditEvent) -> Result<Vec<AuditAppend>, StoreError> {
            self.at += 1;
            Ok(vec![AuditAppend {
                seq: self.at,
                record: event.outcome.clone().into_bytes(),
                keyed: None,
                hash: [0; 32],
            }])
        }

        fn unseal_last(&mut self) {
            self.at -= 1;
        }

        fn commit(mut self: Box<Self>) {
            *self.head = self.at;
        }

        fn follow(&mut self, seq: u64, _record: &[u8]) -> Result<(), StoreError> {
            self.start = seq;
            self.at = seq;
            Ok(())
        }
    }

    pub(crate) async fn run(store: &dyn Store) {
        let a = record("t1", "4111110000001112", 1);
        assert_eq!(
            store.insert(&a, InsertMode::Dedupe, None).unwrap(),
            InsertOutcome::Inserted
        );
        store.commit().await.unwrap();
        assert_eq!(store.get(&a.tenant, &a.token).unwrap().as_ref(), Some(&a));
        assert_eq!(
            store.find_fingerprint(&a.tenant, &[1; 32]).unwrap(),
            Some(a.token.clone())
        );

        // Another tenant sees nothing.
        let t2 = TenantId::parse("t2").unwrap();
        assert_eq!(store.get(&t2, &a.token).unwrap(), None);
        assert_eq!(store.find_fingerprint(&t2, &[1; 32]).unwrap(), None);
        assert!(!store.delete(&t2, &a.token, None).unwrap());

        // Same token in any tenant: taken. Same fingerprint in the tenant: exists.
        let same_token = record("t2", "4111110000001112", 9);
        assert_eq!(
            store.insert(&same_token, InsertMode::Dedupe, None).unwrap(),
            InsertOutcome::TokenTaken
        );
        let same_fp = record("t1", "4111110000002112", 1);
        assert_eq!(
            store.insert(&same_fp, InsertMode::Dedupe, None).unwrap(),
            InsertOutcome::FingerprintExists(a.token.clone())
        );
        // Fresh mode stores a second token for the same card; the index keeps the first,
        // and deleting the second leaves the first's index entry alone.
        let second = record("t1", "4111110000005112", 1);
        assert_eq!(
            store.insert(&second, InsertMode::Fresh, None).unwrap(),
            InsertOutcome::Inserted
        );
        assert_eq!(
            store.find_fingerprint(&a.tenant, &[1; 32]).unwrap(),
            Some(a.token.clone())
        );
        assert!(store.delete(&second.tenant, &second.token, None).unwrap());
        assert_eq!(
            store.find_fingerprint(&a.tenant, &[1; 32]).unwrap(),
            Some(a.token.clone())
        );
        // Same fingerprint in another tenant is independent.
        let other_tenant = record("t2", "4111110000003112", 1);
        assert_eq!(
            store.insert(&other_tenant, InsertMode::Dedupe, None).unwrap(),
            InsertOutcome::Inserted
        );
        assert_eq!(store.count().unwrap(), 2);

        // Delete removes record and fingerprint; a second delete finds nothing.
        assert!(store.delete(&a.tenant, &a.token, None).unwrap());
        store.commit().await.unwrap();
        assert_eq!(store.get(&a.tenant, &a.token).unwrap(), None);
        assert_eq!(store.find_fingerprint(&a.tenant, &[1; 32]).unwrap(), None);
        assert!(!store.delete(&a.tenant, &a.token, None).unwrap());
        assert_eq!(store.count().unwrap(), 1);
        store.check().unwrap();

        // The version counts follow inserts, rewraps and deletes.
        let c = record("t3", "4111110000004112", 3);
        assert_eq!(
            store.insert(&c, InsertMode::Dedupe, None).unwrap(),
            InsertOutcome::Inserted
        );
        assert_eq!(store.count_by_version().unwrap(), [(1, 2)].into_iter().collect());
        let under = store.records_under_version(1, None, 10).unwrap();
        assert_eq!(under.len(), 2);
        assert!(under[0].token.as_str() < under[1].token.as_str(), "token order");
        let first = store.records_under_version(1, None, 1).unwrap();
        assert_eq!(first, under[..1]);
        // The cursor continues after the token it is given.
        assert_eq!(
            store.records_under_version(1, Some(&first[0].token), 10).unwrap(),
            under[1..]
        );
        assert_eq!(store.records_under_version(1, Some(&under[1].token), 10).unwrap(), []);
        let moved = SealedCard {
            key_version: 2,
            wrapped_dek: vec![7; 60],
            ciphertext: c.sealed.ciphertext.clone(),
        };
        assert_eq!(store.replace_sealed(&[(c.clone(), moved.clone())]).unwrap(), 1);
        assert_eq!(
            store.replace_sealed(&[(c.clone(), moved.clone())]).unwrap(),
            0,
            "CAS: the record changed"
        );
        assert_eq!(store.get(&c.tenant, &c.token).unwrap().unwrap().sealed, moved);
        assert_eq!(
            store.count_by_version().unwrap(),
            [(1, 1), (2, 1)].into_iter().collect()
        );
        assert_eq!(store.records_under_version(2, None, 10).unwrap()[0].token, c.token);
        assert!(store.delete(&c.tenant, &c.token, None).unwrap());
        assert_eq!(store.count_by_version().unwrap(), [(1, 1)].into_iter().collect());
        let gone = StoredRecord {
            sealed: moved.clone(),
            ..c.clone()
        };
        assert_eq!(
            store.replace_sealed(&[(gone, c.sealed.clone())]).unwrap(),
            0,
            "CAS: the record was deleted"
        );
        // A batch replaces every record still as read and skips the rest.
        let (p, q) = (
            record("t3", "4111110000009112", 11),
            record("t3", "4111110000010112", 12),
        );
        for r in [&p, &q] {
            assert_eq!(
                store.insert(r, InsertMode::Dedupe, None).unwrap(),
                InsertOutcome::Inserted
            );
        }
        let stale = StoredRecord {
            network_tx_id: Some("changed since".into()),
            ..q.clone()
        };
        assert_eq!(
            store
                .replace_sealed(&[(p.clone(), moved.clone()), (stale, moved.clone())])
                .unwrap(),
            1
        );
        assert_eq!(store.get(&p.tenant, &p.token).unwrap().unwrap().sealed, moved);
        assert_eq!(store.get(&q.tenant, &q.token).unwrap().unwrap().sealed, q.sealed);
        assert_eq!(
            store.count_by_version().unwrap(),
            [(1, 2), (2, 1)].into_iter().collect()
        );
        for r in [&p, &q] {
            assert!(store.delete(&r.tenant, &r.token, None).unwrap());
        }

        // Card-on-file id: set once, never overwritten, tenant-scoped.
        let d = record("t4", "4111110000006112", 4);
        assert_eq!(
            store.insert(&d, InsertMode::Dedupe, None).unwrap(),
            InsertOutcome::Inserted
        );
        assert!(!store.set_network_tx_id(&t2, &d.token, "NTI1").unwrap());
        assert!(store.set_network_tx_id(&d.tenant, &d.token, "NTI1").unwrap());
        assert!(!store.set_network_tx_id(&d.tenant, &d.token, "NTI2").unwrap());
        assert_eq!(
            store
                .get(&d.tenant, &d.token)
                .unwrap()
                .unwrap()
                .network_tx_id
                .as_deref(),
            Some("NTI1")
        );

        // Audited writes: the audit record is stored with the change, or not at all.
        let entry = |seq: u64, what: &str| AuditAppend {
            seq,
            record: format!("audit {seq} {what}").into_bytes(),
            keyed: None,
            hash: [0; 32],
        };
        let head = store.audit_last().unwrap().map_or(0, |(s, _)| s);
        let e = record("t5", "4111110000007112", 5);
        let inserted = entry(head + 1, "insert");
        assert_eq!(
            store.insert(&e, InsertMode::Dedupe, Some(&inserted)).unwrap(),
            InsertOutcome::Inserted
        );
        assert_eq!(store.audit_last().unwrap(), Some((head + 1, inserted.record.clone())));
        let taken = record("t5", "4111110000007112", 6);
        assert_eq!(
            store
                .insert(&taken, InsertMode::Dedupe, Some(&entry(head + 2, "taken")))
                .unwrap(),
            InsertOutcome::TokenTaken
        );
        let known = record("t5", "4111110000008112", 5);
        assert_eq!(
            store
                .insert(&known, InsertMode::Dedupe, Some(&entry(head + 2, "known")))
                .unwrap(),
            InsertOutcome::FingerprintExists(e.token.clone())
        );
        assert!(
            !store
                .delete(&t2, &e.token, Some(&entry(head + 2, "other tenant")))
                .unwrap()
        );
        assert_eq!(
            store.audit_last().unwrap().map(|(s, _)| s),
            Some(head + 1),
            "a refused change stores no audit record"
        );
        let deleted = entry(head + 2, "delete");
        assert!(store.delete(&e.tenant, &e.token, Some(&deleted)).unwrap());
        store.commit().await.unwrap();
        assert_eq!(store.get(&e.tenant, &e.token).unwrap(), None);
        assert_eq!(
            store.audit_scan(head + 1, 10).unwrap(),
            vec![(head + 1, inserted.record), (head + 2, deleted.record)]
        );

        // Units of work: the change and its audit record together, sealed in the
        // order they are written; a unit that changes nothing stores no record.
        let seal: Arc<dyn AuditSeal> = Arc::new(TestSeal::after(store));
        let f = record("t6", "4111110000011112", 6);
        let event = |what: &str| AuditEvent {
            action: "test",
            outcome: what.into(),
            ..Default::default()
        };
        let insert = |r: &StoredRecord, what: &str| Unit {
            change: Change::Insert {
                record: Box::new(r.clone()),
                mode: InsertMode::Dedupe,
            },
            audit: event(what),
            held: None,
        };
        let before = store.audit_last().unwrap().map_or(0, |(s, _)| s);
        // What a unit holds is released once it is applied, not before.
        let held = Arc::new(());
        let created = Unit {
            held: Some(Box::new(held.clone())),
            ..insert(&f, "created")
        };
        let (one, two, three, four) = tokio::join!(
            store.apply(created, seal.clone()),
            store.apply(
                insert(&record("t6", "4111110000011112", 7), "token taken"),
                seal.clone()
            ),
            store.apply(insert(&record("t6", "4111110000012112", 6), "card known"), seal.clone()),
            store.apply(
                Unit {
                    change: Change::Nothing,
                    audit: event("read"),
                    held: None,
                },
                seal.clone()
            ),
        );
        assert_eq!(one.unwrap(), Applied::Inserted(InsertOutcome::Inserted));
        assert_eq!(
            Arc::strong_count(&held),
            1,
            "the unit's hold is dropped after it is applied"
        );
        assert_eq!(two.unwrap(), Applied::Inserted(InsertOutcome::TokenTaken));
        assert_eq!(
            three.unwrap(),
            Applied::Inserted(InsertOutcome::FingerprintExists(f.token.clone()))
        );
        assert_eq!(four.unwrap(), Applied::Audited);
        let delete = |tenant: &str| Unit {
            change: Change::Delete {
                tenant: TenantId::parse(tenant).unwrap(),
                token: f.token.clone(),
            },
            audit: event(&format!("deleted by {tenant}")),
            held: None,
        };
        assert_eq!(
            store.apply(delete("t2"), seal.clone()).await.unwrap(),
            Applied::Deleted(false)
        );
        assert_eq!(
            store.apply(delete("t6"), seal.clone()).await.unwrap(),
            Applied::Deleted(true)
        );
        assert_eq!(store.get(&f.tenant, &f.token).unwrap(), None);
        assert_eq!(store.find_fingerprint(&f.tenant, &f.fingerprint).unwrap(), None);
        let trail: Vec<String> = store
            .audit_scan(before + 1, 10)
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(i, (seq, bytes))| {
                assert_eq!(seq, before + 1 + i as u64, "consecutive sequence numbers");
                String::from_utf8(bytes).unwrap()
            })
            .collect();
        assert_eq!(trail, ["created", "read", "deleted by t6"]);

        // Charges and idempotency entries.
        let charge = ChargeRecord {
            id: "ch_1".into(),
            tenant: "t4".into(),
            client: "psp".into(),
            token: d.token.to_string(),
            amount_value: 1000,
            currency: "EUR".into(),
            reference: "r".into(),
            shopper_interaction: "moto".into(),
            recurring: None,
            status: "authorised".into(),
            psp_reference: Some("P".into()),
            refusal_reason: None,
            network_transaction_id: Some("NTI1".into()),
            cvv_sent: true,
            created_at: 1,
            capture: "manual".into(),
            modifications: Vec::new(),
        };
        let idem = IdempotencyRecord {
            request_hash: [5; 32],
            charge_id: "ch_1".into(),
            created_at: 1,
        };
        assert_eq!(store.reserve_charge(&charge, &[9; 32], &idem, 0).unwrap(), None);
        store.commit().await.unwrap();
        // The key is taken: a second reservation stores nothing and learns the first.
        let rival = ChargeRecord {
            id: "ch_2".into(),
            ..charge.clone()
        };
        let rival_idem = IdempotencyRecord {
            charge_id: "ch_2".into(),
            ..idem.clone()
        };
        assert_eq!(
            store.reserve_charge(&rival, &[9; 32], &rival_idem, 0).unwrap(),
            Some(idem.clone())
        );
        assert_eq!(store.get_charge(&d.tenant, "ch_2").unwrap(), None);
        // An entry older than the window is replaced.
        let third = ChargeRecord {
            id: "ch_3".into(),
            ..charge.clone()
        };
        let later = IdempotencyRecord {
            charge_id: "ch_3".into(),
            created_at: 5,
            ..idem.clone()
        };
        assert_eq!(store.reserve_charge(&rival, &[7; 32], &rival_idem, 0).unwrap(), None);
        assert_eq!(store.reserve_charge(&third, &[7; 32], &later, 2).unwrap(), None);
        assert_eq!(store.get_idempotency(&[7; 32]).unwrap(), Some(later));
        assert_eq!(store.get_charge(&d.tenant, "ch_3").unwrap(), Some(third));
        assert_eq!(store.get_charge(&d.tenant, "ch_1").unwrap(), Some(charge));
        assert_eq!(store.get_charge(&t2, "ch_1").unwrap(), None);
        assert_eq!(store.get_idempotency(&[9; 32]).unwrap(), Some(idem));
        assert_eq!(store.get_idempotency(&[8; 32]).unwrap(), None);
        // Entries that name no charge: stored once per window, the first kept.
        let first = IdempotencyRecord {
            request_hash: [1; 32],
            charge_id: "tok:first".into(),
            created_at: 10,
        };
        let second = IdempotencyRecord {
            charge_id: "tok:second".into(),
            created_at: 11,
            ..first.clone()
        };
        assert_eq!(store.remember(&[6; 32], &first, 0).unwrap(), None);
        assert_eq!(store.remember(&[6; 32], &second, 5).unwrap(), Some(first.clone()));
        assert_eq!(store.get_idempotency(&[6; 32]).unwrap(), Some(first.clone()));
        assert_eq!(
            store.remember(&[6; 32], &second, 11).unwrap(),
            None,
            "the first one's window is over"
        );
        assert_eq!(store.get_idempotency(&[6; 32]).unwrap(), Some(second));
        // Keystore generation: 0 until set, then what was set.
        assert_eq!(store.keystore_generation().unwrap(), 0);
        store.set_keystore_generation(7).unwrap();
        assert_eq!(store.keystore_generation().unwrap(), 7);
        // KEK wrap budgets: absent is 0; set values read back per version.
        assert_eq!(store.kek_wraps(1).unwrap(), 0);
        store.set_kek_wraps(1, 10_000).unwrap();
        store.set_kek_wraps(2, 20_000).unwrap();
        assert_eq!(
            (store.kek_wraps(1).unwrap(), store.kek_wraps(2).unwrap()),
            (10_000, 20_000)
        );
        // A reservation's outcome replaces it; the idempotency entry still names it.
        let done = ChargeRecord {
            status: "refused".into(),
            ..store.get_charge(&d.tenant, "ch_1").unwrap().unwrap()
        };
        store.update_charge(&done).unwrap();
        store.commit().await.unwrap();
        assert_eq!(store.get_charge(&d.tenant, "ch_1").unwrap(), Some(done.clone()));
        assert_eq!(store.get_idempotency(&[9; 32]).unwrap().unwrap().charge_id, "ch_1");
        // Modifications: compare-and-set on the whole charge. A swap from a stale
        // copy (someone else's change landed first) writes nothing.
        let captured = ChargeRecord {
            status: "captured".into(),
            modifications: vec![Modification {
                id: "mod_1".into(),
                kind: "capture".into(),
                amount_value: Some(600),
                reason: None,
                status: "pending".into(),
                psp_reference: None,
                failure_reason: None,
                client: "psp".into(),
                created_at: 2,
                updated_at: 2,
                scope: [3; 32],
                request_hash: [4; 32],
            }],
            ..done.clone()
        };
        assert!(store.swap_charge(&done, &captured).unwrap());
        store.commit().await.unwrap();
        let stale = ChargeRecord {
            status: "cancelled".into(),
            ..done.clone()
        };
        assert!(!store.swap_charge(&done, &stale).unwrap(), "a stale copy is refused");
        assert_eq!(store.get_charge(&d.tenant, "ch_1").unwrap(), Some(captured.clone()));
        let missing = ChargeRecord {
            id: "ch_missing".into(),
            ..done
        };
        assert!(!store.swap_charge(&missing, &captured).unwrap());

        // Expiring records: found by `expired` once due, soonest first, with the
        // expiry stored; gone from it once deleted. Records without one never are.
        let token_with = |n: u32| {
            (0..10)
                .map(|d| format!("41111177{n:04}111{d}"))
                .find(|t| Token::parse(t).is_some())
                .unwrap()
        };
        let mut soon = record("t7", &token_with(1), 71);
        soon.expires_at = Some(1_000);
        let mut later = record("t7", &token_with(2), 72);
        later.expires_at = Some(5_000);
        let forever = record("t7", &token_with(3), 73);
        for r in [&later, &soon, &forever] {
            assert_eq!(
                store.insert(r, InsertMode::Dedupe, None).unwrap(),
                InsertOutcome::Inserted
            );
        }
        store.commit().await.unwrap();
        assert_eq!(store.get(&soon.tenant, &soon.token).unwrap(), Some(soon.clone()));
        let due = |r: &StoredRecord| (r.tenant.clone(), r.token.clone());
        assert_eq!(store.expired(999, 10).unwrap(), vec![]);
        assert_eq!(store.expired(1_000, 10).unwrap(), vec![due(&soon)]);
        assert_eq!(store.expired(9_999, 10).unwrap(), vec![due(&soon), due(&later)]);
        assert_eq!(store.expired(9_999, 1).unwrap(), vec![due(&soon)]);
        assert!(store.delete(&soon.tenant, &soon.token, None).unwrap());
        store.commit().await.unwrap();
        assert_eq!(store.expired(9_999, 10).unwrap(), vec![due(&later)]);

        // A tenant's records in token order with their last use (creation until
        // touched), paged by cursor, filtered by last use; never another tenant's.
        let t8 = TenantId::parse("t8").unwrap();
        let mut mine: Vec<StoredRecord> = (10..15).map(|n| record("t8", &token_with(n), 80 + n as u8)).collect();
        for r in &mine {
            assert_eq!(
                store.insert(r, InsertMode::Dedupe, None).unwrap(),
                InsertOutcome::Inserted
            );
        }
        store
            .insert(&record("t9", &token_with(20), 99), InsertMode::Dedupe, None)
            .unwrap();
        store.commit().await.unwrap();
        mine.sort_by(|a, b| a.token.as_str().cmp(b.token.as_str()));
        let created = mine[0].created_at.unix_timestamp();
        let tokens = |page: &[(StoredRecord, i64)]| page.iter().map(|(r, _)| r.token.clone()).collect::<Vec<_>>();
        let all = store.tenant_records(&t8, None, 100, None).unwrap();
        assert_eq!(tokens(&all), mine.iter().map(|r| r.token.clone()).collect::<Vec<_>>());
        assert!(all.iter().all(|(r, used)| *used == created && mine.contains(r)));
        let first = store.tenant_records(&t8, None, 2, None).unwrap();
        let rest = store.tenant_records(&t8, Some(&first[1].0.token), 100, None).unwrap();
        assert_eq!([tokens(&first), tokens(&rest)].concat(), tokens(&all));
        assert_eq!(
            store.tenant_records(&t2, None, 100, None).unwrap().len(),
            1,
            "t2's own record only"
        );
        // A use moves the last use forward, once per granularity; reads see it.
        store.touch(&t8, &mine[1].token, created + 100, 60).unwrap();
        store.touch(&t8, &mine[1].token, created + 130, 60).unwrap();
        store.touch(&t2, &mine[2].token, created + 500, 60).unwrap();
        store.commit().await.unwrap();
        assert_eq!(store.last_used(&t8, &mine[1].token).unwrap(), Some(created + 100));
        assert_eq!(
            store.last_used(&t8, &mine[2].token).unwrap(),
            Some(created),
            "another tenant's touch"
        );
        assert_eq!(store.last_used(&t2, &mine[2].token).unwrap(), None);
        store.touch(&t8, &mine[1].token, created + 200, 60).unwrap();
        assert_eq!(store.last_used(&t8, &mine[1].token).unwrap(), Some(created + 200));
        let unused = store.tenant_records(&t8, None, 100, Some(created + 1)).unwrap();
        assert_eq!(unused.len(), 4);
        assert!(unused.iter().all(|(r, _)| r.token != mine[1].token));
        let one = store.tenant_records(&t8, None, 1, Some(created + 1)).unwrap();
        assert_eq!(tokens(&one), tokens(&unused[..1]));
        // A deleted record leaves the listing, and a touch does not bring it back.
        assert!(store.delete(&t8, &mine[0].token, None).unwrap());
        store.touch(&t8, &mine[0].token, created + 900, 60).unwrap();
        store.commit().await.unwrap();
        assert_eq!(store.last_used(&t8, &mine[0].token).unwrap(), None);
        assert_eq!(
            tokens(&store.tenant_records(&t8, None, 100, None).unwrap()),
            tokens(&all[1..])
        );

        // A tenant's charges by token and by reference, oldest first, paged.
        let t4 = TenantId::parse("t4").unwrap();
        let of_d = ChargesOf::Token(d.token.to_string());
        let ids = |v: Vec<ChargeRecord>| v.into_iter().map(|c| c.id).collect::<Vec<_>>();
        let mut late = ChargeRecord {
            id: "ch_0".into(),
            created_at: 9,
            reference: "other".into(),
            ..captured.clone()
        };
        late.modifications.clear();
        store.update_charge(&late).unwrap();
        store.commit().await.unwrap();
        assert_eq!(
            ids(store.charges_of(&t4, &of_d, None, 10).unwrap()),
            ["ch_1", "ch_2", "ch_3", "ch_0"]
        );
        assert_eq!(store.charges_of(&t4, &of_d, None, 10).unwrap()[0], captured);
        let page = store.charges_of(&t4, &of_d, None, 2).unwrap();
        let cursor = (page[1].created_at, page[1].id.clone());
        assert_eq!(
            ids(store.charges_of(&t4, &of_d, Some(&cursor), 10).unwrap()),
            ["ch_3", "ch_0"]
        );
        assert_eq!(
            ids(store
                .charges_of(&t4, &ChargesOf::Reference("r".into()), None, 10)
                .unwrap()),
            ["ch_1", "ch_2", "ch_3"]
        );
        assert_eq!(
            ids(store
                .charges_of(&t4, &ChargesOf::Reference("other".into()), None, 10)
                .unwrap()),
            ["ch_0"]
        );
        assert!(
            store
                .charges_of(&t4, &ChargesOf::Reference("o".into()), None, 10)
                .unwrap()
                .is_empty()
        );
        assert!(store.charges_of(&t2, &of_d, None, 10).unwrap().is_empty());

        // A read inside a unit: audited only when the tenant's live record is
        // there; with a granularity it records a use at most once per granularity.
        let created = 1_700_000_000;
        let live = record("t7", "4111110000021112", 21);
        let mut expiring = record("t7", "4111110000031112", 22);
        expiring.expires_at = Some(created + 500);
        for r in [&live, &expiring] {
            assert_eq!(
                store.apply(insert(r, "stored"), seal.clone()).await.unwrap(),
                Applied::Inserted(InsertOutcome::Inserted)
            );
        }
        let read = |tenant: &str, r: &StoredRecord, at: i64, touch: Option<i64>| Unit {
            change: Change::Read {
                tenant: TenantId::parse(tenant).unwrap(),
                token: r.token.clone(),
                at,
                touch,
            },
            audit: event(&format!("read {tenant} {}", at - created)),
            held: None,
        };
        let mark = store.audit_last().unwrap().map_or(0, |(s, _)| s);
        let absent = record("t7", "4111110000041112", 23);
        for (tenant, r, at) in [
            ("t2", &live, created + 10),
            ("t7", &expiring, created + 500),
            ("t7", &absent, created),
        ] {
            assert_eq!(
                store.apply(read(tenant, r, at, Some(60)), seal.clone()).await.unwrap(),
                Applied::Read(None),
                "another tenant's, an expired or an absent record is not read"
            );
        }
        assert_eq!(
            store.audit_last().unwrap().map_or(0, |(s, _)| s),
            mark,
            "a read that finds nothing stores no audit record"
        );
        assert_eq!(store.last_used(&live.tenant, &live.token).unwrap(), Some(created));
        let found = |a: Applied| match a {
            Applied::Read(Some(f)) => *f,
            other => panic!("expected a record, got {other:?}"),
        };
        let first = found(
            store
                .apply(read("t7", &live, created + 10, Some(60)), seal.clone())
                .await
                .unwrap(),
        );
        assert_eq!(first.record, live);
        assert_eq!(
            first.last_used,
            Some(created),
            "used within the granularity: not rewritten"
        );
        let second = found(
            store
                .apply(read("t7", &live, created + 100, Some(60)), seal.clone())
                .await
                .unwrap(),
        );
        assert_eq!(second.last_used, Some(created + 100), "an older use moves to this read");
        let third = found(
            store
                .apply(read("t7", &live, created + 400, None), seal.clone())
                .await
                .unwrap(),
        );
        assert_eq!(
            third.last_used,
            Some(created + 100),
            "a read without a granularity records no use"
        );
        let early = found(
            store
                .apply(read("t7", &expiring, created + 499, None), seal.clone())
                .await
                .unwrap(),
        );
        assert_eq!(early.record, expiring, "read until its expiry");
        store.commit().await.unwrap();
        assert_eq!(store.last_used(&live.tenant, &live.token).unwrap(), Some(created + 100));
        let trail: Vec<String> = store
            .audit_scan(mark + 1, 10)
            .unwrap()
            .into_iter()
            .map(|(_, bytes)| String::from_utf8(bytes).unwrap())
            .collect();
        assert_eq!(trail, ["read t7 10", "read t7 100", "read t7 400", "read t7 499"]);
    }
}
