//! The embedded sled backend.
//!
//! Trees: `tokens` (token → record), `fingerprints` (tenant ‖ 0x00 ‖ HMAC →
//! token), `meta` (schema version). Records per KEK version are counted in
//! memory (a scan of `tokens` at open, then every committed change); rewrap walks
//! `tokens` with a cursor. (Stores written before kept a `by_version` index: one
//! more random-key write per tokenize, dropped at open.) Records are
//! postcard-encoded and compact (sled roughly doubles what it stores on disk).
//!
//! Durability: sled writes land in its page cache; `Db::flush` makes them durable.
//! A single committer thread takes every waiting writer, flushes once, then wakes
//! them all (group commit): one fsync serves a whole burst of requests.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use tokio::sync::oneshot;

use super::anchor::{AnchorFile, Found, KeyedMark, Mark};
use super::backup;
use super::codec::{decode, encode, read_live};
use super::{
    Applied, Applying, AuditAppend, AuditSeal, BoxError, Change, ChargeRecord, ChargesOf, Commit, IdempotencyRecord,
    InsertMode, InsertOutcome, ReadRecord, SealBatch, Store, StoreDamage, StoreError, StoredRecord, Unit,
};
use crate::domain::tenant::TenantId;
use crate::domain::token::Token;
use crate::keys::SealedCard;

const SCHEMA_KEY: &[u8] = b"schema";
const SCHEMA_V1: &[u8] = b"1";
/// Set once the tenant and charge indexes cover every record (stores written
/// before they existed get them built at open).
const INDEXES_KEY: &[u8] = b"indexes_v1";
pub(crate) const CHECKPOINT_KEY: &[u8] = b"audit_checkpoint";
const KEYSTORE_GENERATION_KEY: &[u8] = b"keystore_generation";

type Waiter = oneshot::Sender<Result<(), StoreError>>;

/// Work for the committer thread.
enum Job {
    /// Answer once everything written so far is durable.
    Flush(Waiter),
    /// Apply a unit of work (batched with the others waiting), then answer once durable.
    Apply {
        unit: Box<Unit>,
        seal: Arc<dyn AuditSeal>,
        reply: oneshot::Sender<Result<Applied, StoreError>>,
    },
}

/// sled-backed [`Store`]. One process owns the data directory.
pub struct SledStore {
    db: sled::Db,
    tokens: sled::Tree,
    fingerprints: sled::Tree,
    /// Expiry index: (expires_at, token) → tenant, for the sweeper. An entry whose
    /// record is gone is dropped when the sweeper meets it.
    expiries: sled::Tree,
    charges: sled::Tree,
    /// Charges by token and by merchant reference, per tenant (see [`charge_index_key`]).
    charge_index: sled::Tree,
    /// A tenant's records in token order: (tenant, token) → last use (i64 big-endian).
    by_tenant: sled::Tree,
    idempotency: sled::Tree,
    audit: sled::Tree,
    meta: sled::Tree,
    writer: Writer,
    committer: Mutex<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The audit head appended so far (anchored after the next flush).
    head: Arc<Mutex<Option<Mark>>>,
    /// Records per KEK version: counted from the records at open, then kept in
    /// step with every change to a record (each one a compare-and-swap or an
    /// insert-if-absent, so the count moves only with what was written).
    versions: Arc<Mutex<std::collections::BTreeMap<u32, u64>>>,
    damage: Option<StoreDamage>,
    reanchored_from: Option<u64>,
    keyed_at_open: Option<KeyedMark>,
    legacy_anchor: bool,
    /// Held by a backup for its whole copy and by audit pruning: the trail's start
    /// does not move while a backup copies it.
    history: Mutex<()>,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, with sled's default page cache (1 GiB).
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        SledStore::open_with(dir, None)
    }

    /// Opens (or creates) the store in `dir` with a page cache of `cache_bytes`
    /// (`None`: sled's default, 1 GiB). The cache is most of the process's memory
    /// once the store outgrows it: this is what bounds RSS.
    pub fn open_with(dir: &Path, cache_bytes: Option<u64>) -> Result<SledStore, StoreError> {
        let mut config = sled::Config::new();
        if let Some(bytes) = cache_bytes {
            config = config.cache_capacity(bytes);
        }
        let db = config
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            // Group commit decides when to flush; sled's own timer would flush anyway.
            .flush_every_ms(None)
            .open()
            .map_err(backend)?;
        let tokens = db.open_tree("tokens").map_err(backend)?;
        let fingerprints = db.open_tree("fingerprints").map_err(backend)?;
        // The version index of earlier releases (counts and rewrap now use the records).
        if db.tree_names().iter().any(|n| n.as_ref() == b"by_version") {
            db.drop_tree("by_version").map_err(backend)?;
        }
        let expiries = db.open_tree("expiries").map_err(backend)?;
        let charges = db.open_tree("charges").map_err(backend)?;
        let charge_index = db.open_tree("charge_index").map_err(backend)?;
        let by_tenant = db.open_tree("by_tenant").map_err(backend)?;
        let idempotency = db.open_tree("idempotency").map_err(backend)?;
        let audit = db.open_tree("audit").map_err(backend)?;
        let meta = db.open_tree("meta").map_err(backend)?;
        match meta.get(SCHEMA_KEY).map_err(backend)? {
            None => {
                meta.insert(SCHEMA_KEY, SCHEMA_V1).map_err(backend)?;
                db.flush().map_err(backend)?;
            }
            Some(v) if v.as_ref() == SCHEMA_V1 => {}
            Some(_) => return Err(StoreError::Backend("unsupported schema version".into())),
        }
        build_indexes(&db, &meta, &tokens, &by_tenant, &charges, &charge_index)?;
        let legacy_anchor = super::anchor::is_legacy(dir);
        let found = AnchorFile::read(dir).map_err(anchor_io)?;
        let damage = check_anchor(&audit, &found)?;
        let reanchored_from = match found {
            Found::Mark(m) if m.moved_back_from != 0 => Some(m.moved_back_from),
            _ => None,
        };
        let (keyed_at_open, found_mark) = match &found {
            Found::Mark(m) => (
                m.keyed,
                Some(Mark {
                    moved_back_from: 0,
                    ..*m
                }),
            ),
            _ => (None, None),
        };
        // A damaged store's anchor stays frozen: the alarm outlives restarts.
        let anchor = match (&damage, found) {
            (Some(_), _) => None,
            (None, Found::Missing) => {
                let mut file = AnchorFile::open(dir).map_err(anchor_io)?;
                file.write(&Mark::EMPTY).map_err(anchor_io)?;
                file.sync_dir().map_err(anchor_io)?;
                Some(file)
            }
            (None, _) => Some(AnchorFile::open(dir).map_err(anchor_io)?),
        };
        // Starts from the anchored mark, so a process that never MACs (sealed)
        // carries the last keyed mark forward.
        let head = Arc::new(Mutex::new(if damage.is_none() { found_mark } else { None }));
        let versions = Arc::new(Mutex::new(scan_versions(&tokens)?));
        let (tx, rx) = mpsc::channel::<Job>();
        let writer = Writer {
            tokens: tokens.clone(),
            fingerprints: fingerprints.clone(),
            expiries: expiries.clone(),
            by_tenant: by_tenant.clone(),
            audit: audit.clone(),
            head: head.clone(),
            versions: versions.clone(),
            gate: Arc::new(RwLock::new(())),
        };
        let flush_db = db.clone();
        let anchored = head.clone();
        let thread = std::thread::Builder::new()
            .name("sled-commit".into())
            .spawn({
                let writer = writer.clone();
                move || committer(flush_db, rx, anchor, anchored, writer)
            })
            .map_err(|e| StoreError::io("cannot start the commit thread", e))?;
        Ok(SledStore {
            db,
            tokens,
            fingerprints,
            expiries,
            charges,
            charge_index,
            by_tenant,
            idempotency,
            audit,
            meta,
            writer,
            committer: Mutex::new(tx),
            thread: Some(thread),
            head,
            versions,
            damage,
            reanchored_from,
            keyed_at_open,
            legacy_anchor,
            history: Mutex::new(()),
        })
    }

    /// Copies the whole store into `out` as a backup: under the write gate (writes
    /// wait, reads go on) every tree but the audit trail, the audit head and the
    /// keystore `keystore` reads; then, with writes flowing again, the audit trail up
    /// to that head (those records never change). `out` should be fast local storage
    /// (the caller streams it to its client afterwards), so the pause is the copy of
    /// the records and their indexes alone.
    pub fn backup_to(
        &self,
        out: &mut dyn std::io::Write,
        keystore: &dyn Fn() -> Result<zeroize::Zeroizing<Vec<u8>>, BoxError>,
    ) -> Result<(backup::Summary, u64), StoreError> {
        if let Some(damage) = &self.damage {
            return Err(StoreError::Backend(format!(
                "the store is damaged ({damage}): a backup of it would carry the damage"
            )));
        }
        let io = |e: std::io::Error| StoreError::io("cannot write the backup", e);
        let mut w = backup::BackupWriter::new(std::io::BufWriter::with_capacity(1 << 20, out)).map_err(io)?;
        let _history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let gate = self.writer.gate.write().unwrap_or_else(|p| p.into_inner());
        let paused = std::time::Instant::now();
        // Under the gate: every tree but the audit trail, the meta tree first (a reader
        // meets the trail's checkpoint before the trail).
        let mut names: Vec<sled::IVec> = self.db.tree_names();
        names.retain(|n| n.as_ref() != backup::AUDIT_TREE.as_bytes());
        names.sort_by_key(|n| (n.as_ref() != backup::META_TREE.as_bytes(), n.clone()));
        for name in names {
            let tree = self.db.open_tree(&name).map_err(backend)?;
            let name = String::from_utf8(name.to_vec()).map_err(|_| StoreError::Corrupt)?;
            for kv in tree.iter() {
                let (k, v) = kv.map_err(backend)?;
                w.entry(&name, &k, &v).map_err(io)?;
            }
        }
        let head = *self.head.lock().unwrap_or_else(|p| p.into_inner());
        // Read last, under the gate: it knows every KEK version a copied record uses.
        let keys = keystore().map_err(|e| StoreError::Io {
            context: "cannot read the keystore".into(),
            source: e.into(),
        })?;
        drop(gate);
        let pause = paused.elapsed();
        // The trail up to the head taken under the gate, after it: records at or below
        // the head never change (appends go above it; pruning waits for `history`).
        if let Some(head) = &head {
            for kv in self.audit.range(..=head.seq.to_be_bytes()) {
                let (k, v) = kv.map_err(backend)?;
                w.entry(backup::AUDIT_TREE, &k, &v).map_err(io)?;
            }
        }
        w.file(backup::KEYSTORE, &keys).map_err(io)?;
        let summary = backup::Summary {
            format: backup::FORMAT,
            taken_at: time::OffsetDateTime::now_utc().unix_timestamp(),
            vault_version: env!("CARGO_PKG_VERSION").into(),
            trees: w.trees().clone(),
            records: w.trees().get("tokens").copied().unwrap_or(0),
            audit_head: head.as_ref().map(backup::HeadMark::of),
            keystore_sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&keys[..])),
            kek_versions: backup::kek_states(&keys),
            write_pause_ms: u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
        };
        let (_, size) = w.finish(&summary).map_err(io)?;
        Ok((summary, size))
    }

    /// Salvages a store sled refuses to open. After a clean stop sled recovers
    /// from its snapshot, and a damaged log then fails the open outright; without
    /// the snapshot sled replays the log, stops at the damage and drops the rest,
    /// which the anchor then reports. The store is first copied aside whole
    /// (`sled.damaged-<unix time>` next to it), then its snapshot files are
    /// removed and it is opened again; if even that fails, the snapshot files are
    /// put back. The vault must be stopped.
    pub fn salvage(dir: &Path) -> Result<Salvage, StoreError> {
        match SledStore::open(dir) {
            Ok(_) => return Ok(Salvage::NotNeeded),
            Err(StoreError::Corrupt) => {}
            Err(e) => return Err(e),
        }
        let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
        let name = format!(
            "{}.damaged-{stamp}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("sled")
        );
        let kept = dir.with_file_name(name);
        copy_tree(dir, &kept).map_err(salvage_io)?;
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(salvage_io)? {
            let path = entry.map_err(salvage_io)?.path();
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("snap."))
            {
                std::fs::remove_file(&path).map_err(salvage_io)?;
                removed.push(path);
            }
        }
        match SledStore::open(dir) {
            Ok(store) => Ok(Salvage::Recovered {
                kept,
                damage: store.damage(),
            }),
            Err(StoreError::Corrupt) => {
                for path in removed {
                    if let Some(name) = path.file_name() {
                        std::fs::copy(kept.join(name), &path).map_err(salvage_io)?;
                    }
                }
                Ok(Salvage::Unrecoverable { kept })
            }
            Err(e) => Err(e),
        }
    }

    /// Accepts the loss in a damaged store: moves its anchor to the audit trail's
    /// current head (recording where it was moved back from, for the next start to
    /// audit). The vault must be stopped (sled locks its files). Returns the old
    /// and new anchored sequence numbers, or `None` when the store is not damaged.
    /// Up to `limit` charges with ids after `after`, in id order (for `store copy`).
    pub fn charges_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<ChargeRecord>, StoreError> {
        let start = after.map_or_else(Vec::new, |a| {
            let mut k = a.as_bytes().to_vec();
            k.push(0);
            k
        });
        let mut out = Vec::new();
        for item in self.charges.range(start..).take(limit) {
            let (_, v) = item.map_err(backend)?;
            out.push(super::codec::decode_charge(&v)?);
        }
        Ok(out)
    }

    /// Up to `limit` idempotency entries with keys after `after`, in key order (for `store copy`).
    pub fn idempotency_after(
        &self,
        after: Option<&[u8; 32]>,
        limit: usize,
    ) -> Result<Vec<([u8; 32], IdempotencyRecord)>, StoreError> {
        let start = after.map_or_else(Vec::new, |a| {
            let mut k = a.to_vec();
            k.push(0);
            k
        });
        let mut out = Vec::new();
        for item in self.idempotency.range(start..).take(limit) {
            let (k, v) = item.map_err(backend)?;
            let key: [u8; 32] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt)?;
            out.push((key, postcard::from_bytes(&v).map_err(|_| StoreError::Corrupt)?));
        }
        Ok(out)
    }

    pub fn reanchor(dir: &Path) -> Result<Option<(Option<u64>, u64)>, StoreError> {
        let store = SledStore::open(dir)?;
        if store.damage.is_none() {
            return Ok(None);
        }
        let old = match AnchorFile::read(dir).map_err(anchor_io)? {
            Found::Mark(m) => Some(m.seq),
            Found::Missing | Found::Unreadable => None,
        };
        let mut mark = match store.audit.last().map_err(backend)? {
            Some((k, v)) => Mark::of(audit_seq(&k)?, &v),
            None => Mark::EMPTY,
        };
        // Non-zero marks a reanchor; u64::MAX when the old anchor was unreadable.
        mark.moved_back_from = old.unwrap_or(u64::MAX).max(1);
        let new = mark.seq;
        drop(store);
        let mut file = AnchorFile::open(dir).map_err(anchor_io)?;
        file.write(&mark).map_err(anchor_io)?;
        file.sync_dir().map_err(anchor_io)?;
        Ok(Some((old, new)))
    }
}

/// Moves `n` records from KEK version `from` (none: new records) to `to` (none: deleted).
fn note_versions(versions: &Mutex<std::collections::BTreeMap<u32, u64>>, from: Option<u32>, to: Option<u32>, n: u64) {
    let mut counts = versions.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(v) = from
        && let Some(c) = counts.get_mut(&v)
    {
        *c = c.saturating_sub(n);
        if *c == 0 {
            counts.remove(&v);
        }
    }
    if let Some(v) = to {
        *counts.entry(v).or_insert(0) += n;
    }
}

/// Moves the audit head the next flush anchors (after an audit record was written).
fn note_head(head: &Mutex<Option<Mark>>, seq: u64, record: &[u8], keyed_mac: Option<[u8; 32]>) {
    let mut head = head.lock().unwrap_or_else(|p| p.into_inner());
    if head.is_none_or(|h| h.seq < seq) {
        let mut mark = Mark::of(seq, record);
        mark.keyed = match keyed_mac {
            Some(mac) => Some(KeyedMark {
                seq,
                digest: mark.digest,
                mac,
            }),
            None => head.and_then(|h| h.keyed),
        };
        *head = Some(mark);
    }
}

/// The expiry index key: expiry (big-endian, so in time order), then the token.
fn expiry_key(expires_at: i64, token: &Token) -> Vec<u8> {
    let mut k = (expires_at.max(0) as u64).to_be_bytes().to_vec();
    k.extend_from_slice(token.as_str().as_bytes());
    k
}

/// The trees a unit of work writes, and the in-memory state that follows them.
#[derive(Clone)]
struct Writer {
    tokens: sled::Tree,
    fingerprints: sled::Tree,
    expiries: sled::Tree,
    by_tenant: sled::Tree,
    audit: sled::Tree,
    head: Arc<Mutex<Option<Mark>>>,
    versions: Arc<Mutex<std::collections::BTreeMap<u32, u64>>>,
    /// Every write holds it shared; a backup holds it alone for its copy, so the
    /// copy is the store at one instant (reads never take it).
    gate: Arc<RwLock<()>>,
}

/// What one change did inside a transaction, for the in-memory state after it commits.
enum Effect {
    None,
    Added(u32),
    Removed(u32),
}

type TxTree = sled::transaction::TransactionalTree;
type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

/// Insert-if-absent inside a transaction; `audit` gives the records to store with
/// it, asked only when the record is inserted.
fn tx_insert(
    (tokens, fps, trail): (&TxTree, &TxTree, &TxTree),
    record: &StoredRecord,
    mode: InsertMode,
    audit: &mut dyn FnMut() -> Result<Vec<AuditAppend>, StoreError>,
) -> TxResult<(InsertOutcome, Vec<AuditAppend>)> {
    let token_key = record.token.as_str().as_bytes();
    let fpk = fp_key(&record.tenant, &record.fingerprint);
    // An index entry naming a token that is gone (deleted) does not count.
    let known = match fps.get(&fpk)? {
        Some(t) if tokens.get(&t)?.is_some() => Some(t),
        _ => None,
    };
    if mode == InsertMode::Dedupe
        && let Some(existing) = known.clone()
    {
        let s = std::str::from_utf8(&existing).map_err(|_| abort(StoreError::Corrupt))?;
        let token = Token::parse(s).ok_or_else(|| abort(StoreError::Corrupt))?;
        return Ok((InsertOutcome::FingerprintExists(token), Vec::new()));
    }
    if tokens.get(token_key)?.is_some() {
        return Ok((InsertOutcome::TokenTaken, Vec::new()));
    }
    let records = audit().map_err(abort)?;
    tokens.insert(token_key, encode(record).map_err(abort)?)?;
    if known.is_none() {
        fps.insert(fpk.as_slice(), token_key)?;
    }
    for a in &records {
        trail.insert(&a.seq.to_be_bytes(), a.record.as_slice())?;
    }
    Ok((InsertOutcome::Inserted, records))
}

/// Delete inside a transaction: `Some(version)` if the tenant's record was removed.
fn tx_delete(
    (tokens, fps, trail): (&TxTree, &TxTree, &TxTree),
    tenant: &TenantId,
    token: &Token,
    audit: &mut dyn FnMut() -> Result<Vec<AuditAppend>, StoreError>,
) -> TxResult<(Option<u32>, Vec<AuditAppend>)> {
    let token_key = token.as_str().as_bytes();
    let Some(bytes) = tokens.get(token_key)? else {
        return Ok((None, Vec::new()));
    };
    let record = decode(token, &bytes).map_err(abort)?;
    if record.tenant != *tenant {
        return Ok((None, Vec::new()));
    }
    let records = audit().map_err(abort)?;
    tokens.remove(token_key)?;
    let fpk = fp_key(tenant, &record.fingerprint);
    if fps.get(&fpk)?.is_some_and(|t| t.as_ref() == token_key) {
        fps.remove(fpk)?;
    }
    for a in &records {
        trail.insert(&a.seq.to_be_bytes(), a.record.as_slice())?;
    }
    Ok((Some(record.sealed.key_version), records))
}

fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

fn tx_error(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => backend(e),
    }
}

impl Writer {
    /// Held across one write (a whole batch of units, for the committer).
    fn writing(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    fn trees(&self) -> (&sled::Tree, &sled::Tree, &sled::Tree) {
        (&self.tokens, &self.fingerprints, &self.audit)
    }

    /// Follows a committed write: version counts and the audit head.
    fn committed(&self, effects: &[Effect], records: &[AuditAppend]) {
        for e in effects {
            match e {
                Effect::None => {}
                Effect::Added(v) => note_versions(&self.versions, None, Some(*v), 1),
                Effect::Removed(v) => note_versions(&self.versions, Some(*v), None, 1),
            }
        }
        if let Some(last) = records.iter().max_by_key(|a| a.seq) {
            // The keyed mark is the last MACed record's.
            // (Its MAC is computed here, once per write, not once per record.)
            let keyed = records.iter().filter(|a| a.keyed.is_some()).max_by_key(|a| a.seq);
            if let Some(k) = keyed
                && k.seq != last.seq
            {
                note_head(&self.head, k.seq, &k.record, k.keyed_mac());
            }
            note_head(&self.head, last.seq, &last.record, last.keyed_mac());
        }
    }

    /// Applies a batch of units (the committer is their only writer, so an
    /// insert's check and its writes cannot interleave with another unit's).
    ///
    /// No sled transaction: each one rolls sled's log buffer twice and takes a
    /// global write lock, which costs more than the whole request. Atomicity on a
    /// crash comes from write order instead: sled recovers a prefix of its log, so
    /// each unit writes its audit record first, then the record, then its index
    /// entries (a delete: the record, then its index entries). A crash inside a
    /// unit (never acknowledged) leaves at worst an audit record of a change that
    /// is not there, a record without index entries (no client holds its token), or
    /// index entries naming a deleted token; readers treat such an entry as absent
    /// (and the tenant listing and the expiry sweeper clear it). An acknowledged
    /// unit is always whole: the flush covers all of it.
    fn apply_batch(&self, units: &[&Unit], seal: &dyn AuditSeal) -> Result<Vec<Applied>, StoreError> {
        let _writing = self.writing();
        let mut sealer = seal.begin();
        let mut out = Vec::with_capacity(units.len());
        let mut records = Vec::with_capacity(units.len());
        let mut effects = Vec::with_capacity(units.len());
        let mut failed = None;
        for unit in units {
            match self.apply_one(unit, &mut *sealer) {
                Ok((applied, effect, mut r)) => {
                    out.push(applied);
                    effects.push(effect);
                    records.append(&mut r);
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        sealer.commit();
        self.committed(&effects, &records);
        match failed {
            None => Ok(out),
            Some(e) => Err(e),
        }
    }

    /// One unit; on an error its audit records are unsealed (the head stays at
    /// the last record written).
    fn apply_one(
        &self,
        unit: &Unit,
        sealer: &mut dyn SealBatch,
    ) -> Result<(Applied, Effect, Vec<AuditAppend>), StoreError> {
        let mut records = Vec::new();
        let mut audit = |sealer: &mut dyn SealBatch| -> Result<(), StoreError> {
            records = sealer.seal(&unit.audit)?;
            for a in &records {
                if let Err(e) = self.audit.insert(a.seq.to_be_bytes(), a.record.as_slice()) {
                    sealer.unseal_last();
                    return Err(backend(e));
                }
            }
            Ok(())
        };
        let (applied, effect) = match &unit.change {
            Change::Insert { record, mode } => {
                let token_key = record.token.as_str().as_bytes();
                let fpk = fp_key(&record.tenant, &record.fingerprint);
                // An index entry naming a token that is gone does not count.
                let known = match self.fingerprints.get(&fpk).map_err(backend)? {
                    Some(t) if self.tokens.get(&t).map_err(backend)?.is_some() => Some(t),
                    _ => None,
                };
                if *mode == InsertMode::Dedupe
                    && let Some(existing) = known
                {
                    let s = std::str::from_utf8(&existing).map_err(|_| StoreError::Corrupt)?;
                    let token = Token::parse(s).ok_or(StoreError::Corrupt)?;
                    return Ok((
                        Applied::Inserted(InsertOutcome::FingerprintExists(token)),
                        Effect::None,
                        Vec::new(),
                    ));
                }
                if self.tokens.get(token_key).map_err(backend)?.is_some() {
                    return Ok((Applied::Inserted(InsertOutcome::TokenTaken), Effect::None, Vec::new()));
                }
                let value = encode(record)?;
                audit(sealer)?;
                self.tokens.insert(token_key, value).map_err(backend)?;
                if known.is_none() {
                    self.fingerprints.insert(fpk, token_key).map_err(backend)?;
                }
                self.by_tenant
                    .insert(
                        tenant_key(&record.tenant, &record.token),
                        &record.created_at.unix_timestamp().to_be_bytes(),
                    )
                    .map_err(backend)?;
                if let Some(at) = record.expires_at {
                    self.expiries
                        .insert(expiry_key(at, &record.token), record.tenant.as_str().as_bytes())
                        .map_err(backend)?;
                }
                (
                    Applied::Inserted(InsertOutcome::Inserted),
                    Effect::Added(record.sealed.key_version),
                )
            }
            Change::Delete { tenant, token } => {
                let token_key = token.as_str().as_bytes();
                let Some(mut bytes) = self.tokens.get(token_key).map_err(backend)? else {
                    return Ok((Applied::Deleted(false), Effect::None, Vec::new()));
                };
                let mut record = decode(token, &bytes)?;
                if record.tenant != *tenant {
                    return Ok((Applied::Deleted(false), Effect::None, Vec::new()));
                }
                audit(sealer)?;
                // Compare-and-swap: a rewrap may move the record to another KEK version
                // meanwhile, and the count must lose the version actually removed.
                loop {
                    match self
                        .tokens
                        .compare_and_swap(token_key, Some(&bytes), None as Option<&[u8]>)
                        .map_err(backend)?
                    {
                        Ok(()) => break,
                        Err(sled::CompareAndSwapError { current: Some(now), .. }) => {
                            record = decode(token, &now)?;
                            bytes = now;
                        }
                        Err(sled::CompareAndSwapError { current: None, .. }) => {
                            return Ok((Applied::Deleted(false), Effect::None, records));
                        }
                    }
                }
                let fpk = fp_key(tenant, &record.fingerprint);
                // Only this token's own entry (compare-and-swap: never another's).
                let _ = self
                    .fingerprints
                    .compare_and_swap(fpk, Some(token_key), None as Option<&[u8]>)
                    .map_err(backend)?;
                self.by_tenant.remove(tenant_key(tenant, token)).map_err(backend)?;
                if let Some(at) = record.expires_at {
                    self.expiries.remove(expiry_key(at, token)).map_err(backend)?;
                }
                (Applied::Deleted(true), Effect::Removed(record.sealed.key_version))
            }
            Change::Nothing => {
                audit(sealer)?;
                (Applied::Audited, Effect::None)
            }
            Change::Read {
                tenant,
                token,
                at,
                touch,
            } => {
                let Some(bytes) = self.tokens.get(token.as_str().as_bytes()).map_err(backend)? else {
                    return Ok((Applied::Read(None), Effect::None, Vec::new()));
                };
                let record = match read_live(token, &bytes, tenant, *at) {
                    Ok(record) => record,
                    Err(outcome) => return Ok((outcome, Effect::None, Vec::new())),
                };
                audit(sealer)?;
                let last_used = touch_entry(&self.by_tenant, &tenant_key(tenant, token), *at, *touch)?;
                (
                    Applied::Read(Some(Box::new(ReadRecord { record, last_used }))),
                    Effect::None,
                )
            }
        };
        Ok((applied, effect, records))
    }
}

impl Drop for SledStore {
    /// Stops the committer (it finishes its batch), so the files are unlocked on return.
    fn drop(&mut self) {
        if let Ok(mut sender) = self.committer.lock() {
            *sender = mpsc::channel().0;
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What [`SledStore::salvage`] did.
#[derive(Debug)]
pub enum Salvage {
    /// The store opens as it is.
    NotNeeded,
    /// It opens now; what the anchor says of it (damage is expected).
    Recovered { kept: PathBuf, damage: Option<StoreDamage> },
    /// sled cannot recover even by replaying the log: restore from backup.
    Unrecoverable { kept: PathBuf },
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

fn salvage_io(e: std::io::Error) -> StoreError {
    StoreError::io("salvage", e)
}

/// Compares the anchored audit head with what the store holds now.
fn check_anchor(audit: &sled::Tree, found: &Found) -> Result<Option<StoreDamage>, StoreError> {
    let last = match audit.last().map_err(backend)? {
        Some((k, _)) => audit_seq(&k)?,
        None => 0,
    };
    Ok(match found {
        Found::Missing if last == 0 => None,
        Found::Missing => Some(StoreDamage::AnchorMissing { found: last }),
        Found::Unreadable => Some(StoreDamage::AnchorUnreadable { found: last }),
        Found::Mark(m) if m.seq == 0 => None,
        Found::Mark(m) => match audit.get(m.seq.to_be_bytes()).map_err(backend)? {
            None => Some(StoreDamage::RecordsLost {
                anchored: m.seq,
                found: last,
            }),
            Some(v) if Mark::of(m.seq, &v).digest != m.digest => Some(StoreDamage::HistoryDiffers {
                anchored: m.seq,
                found: last,
            }),
            Some(_) => None,
        },
    })
}

/// Counts the records per KEK version (at open). A damaged record that no longer
/// decodes is not counted (it fails closed when read, under any key); the store
/// still opens, and says how many it met.
fn scan_versions(tokens: &sled::Tree) -> Result<std::collections::BTreeMap<u32, u64>, StoreError> {
    let mut counts = std::collections::BTreeMap::new();
    let mut damaged = 0u64;
    for item in tokens.iter() {
        let (key, value) = item.map_err(backend)?;
        match token_of(&key).and_then(|t| decode(&t, &value)) {
            Ok(record) => *counts.entry(record.sealed.key_version).or_insert(0) += 1,
            Err(_) => damaged += 1,
        }
    }
    if damaged > 0 {
        tracing::warn!(
            damaged,
            "records that do not decode (damaged): not counted under any KEK version"
        );
    }
    Ok(counts)
}

/// The token a `tokens` key names.
fn token_of(key: &[u8]) -> Result<Token, StoreError> {
    std::str::from_utf8(key)
        .ok()
        .and_then(Token::parse)
        .ok_or(StoreError::Corrupt)
}

fn audit_seq(key: &[u8]) -> Result<u64, StoreError> {
    let seq: [u8; 8] = key.try_into().map_err(|_| StoreError::Corrupt)?;
    Ok(u64::from_be_bytes(seq))
}

/// An answer that waits for the next flush.
enum Durable {
    Flush(Waiter),
    Applied(
        oneshot::Sender<Result<Applied, StoreError>>,
        Result<Applied, StoreError>,
    ),
}

/// Takes every job that has queued up and applies the units among them, in
/// order, then hands their answers to the flusher thread and goes on with the
/// next jobs while it flushes: applying a batch and flushing the one before
/// overlap (a pipeline of two), and each answer still waits for a flush that
/// began after its writes.
fn committer(
    db: sled::Db,
    rx: mpsc::Receiver<Job>,
    anchor: Option<AnchorFile>,
    head: Arc<Mutex<Option<Mark>>>,
    writer: Writer,
) {
    let (to_flush, flushes) = mpsc::channel::<Vec<Durable>>();
    let flusher = std::thread::Builder::new()
        .name("sled-flush".into())
        .spawn(move || flusher(db, flushes, anchor, head));
    let Ok(flusher) = flusher else {
        // No flusher thread: nothing can become durable; every caller hears so.
        for job in rx {
            let e = StoreError::Backend("cannot start the flush thread".into());
            match job {
                Job::Flush(w) => drop(w.send(Err(e))),
                Job::Apply { reply, .. } => drop(reply.send(Err(e))),
            }
        }
        return;
    };
    while let Ok(first) = rx.recv() {
        let mut answers = Vec::new();
        let mut applies = Vec::new();
        for job in std::iter::once(first).chain(rx.try_iter()) {
            match job {
                Job::Flush(w) => answers.push(Durable::Flush(w)),
                Job::Apply { unit, seal, reply } => applies.push((unit, seal, reply)),
            }
        }
        // Units sharing an audit trail are applied as one batch.
        let mut outcomes: Vec<Result<Applied, StoreError>> = Vec::with_capacity(applies.len());
        let mut start = 0;
        while start < applies.len() {
            let seal = applies[start].1.clone();
            let end = applies[start..]
                .iter()
                .position(|(_, s, _)| !Arc::ptr_eq(s, &seal))
                .map_or(applies.len(), |n| start + n);
            let units: Vec<&Unit> = applies[start..end].iter().map(|(u, _, _)| &**u).collect();
            match writer.apply_batch(&units, &*seal) {
                Ok(done) => outcomes.extend(done.into_iter().map(Ok)),
                Err(e) => outcomes.extend((start..end).map(|_| Err(e.clone()))),
            }
            start = end;
        }
        for ((_, _, reply), outcome) in applies.into_iter().zip(outcomes) {
            answers.push(Durable::Applied(reply, outcome));
        }
        if to_flush.send(answers).is_err() {
            break;
        }
    }
    drop(to_flush);
    let _ = flusher.join();
}

/// Flushes once for every batch of answers that queued up, anchors the audit head
/// that flush made durable, then answers them all.
fn flusher(
    db: sled::Db,
    rx: mpsc::Receiver<Vec<Durable>>,
    mut anchor: Option<AnchorFile>,
    head: Arc<Mutex<Option<Mark>>>,
) {
    let mut anchored: Option<Mark> = None;
    while let Ok(first) = rx.recv() {
        let mut answers = first;
        for more in rx.try_iter() {
            answers.extend(more);
        }
        // Taken before the flush: everything up to this head is in it.
        let target = *head.lock().unwrap_or_else(|p| p.into_inner());
        let mut result = db.flush().map(|_| ()).map_err(backend);
        if let (Ok(()), Some(file), Some(mark)) = (&result, anchor.as_mut(), target)
            && anchored != Some(mark)
        {
            result = file.write(&mark).map_err(anchor_io);
            if result.is_ok() {
                anchored = Some(mark);
            }
        }
        for answer in answers {
            match answer {
                Durable::Flush(w) => drop(w.send(result.clone())),
                Durable::Applied(reply, outcome) => drop(reply.send(match &result {
                    Ok(()) => outcome,
                    Err(e) => Err(e.clone()),
                })),
            }
        }
    }
}

fn backend(e: sled::Error) -> StoreError {
    match e {
        // sled's own checksum caught damaged bytes when reading them in.
        sled::Error::Corruption { .. } => StoreError::Corrupt,
        e => StoreError::io("sled", e),
    }
}

fn anchor_io(e: std::io::Error) -> StoreError {
    StoreError::io("store anchor", e)
}

fn wraps_key(version: u32) -> Vec<u8> {
    let mut k = b"kek_wraps/".to_vec();
    k.extend_from_slice(&version.to_be_bytes());
    k
}

/// Reads a record's last use from its `by_tenant` entry and, with a
/// `granularity`, moves it to `at` when it is older than `at - granularity`;
/// answers the last use after that (`None`: no entry). The caller holds the
/// writing lock.
fn touch_entry(
    by_tenant: &sled::Tree,
    key: &[u8],
    at: i64,
    granularity: Option<i64>,
) -> Result<Option<i64>, StoreError> {
    loop {
        let Some(current) = by_tenant.get(key).map_err(backend)? else {
            return Ok(None);
        };
        let last = be_i64(&current)?;
        if granularity.is_none_or(|g| last > at.saturating_sub(g)) {
            return Ok(Some(last));
        }
        // Compare-and-swap: a deleted record's entry is never brought back.
        if by_tenant
            .compare_and_swap(key, Some(current), Some(&at.to_be_bytes()[..]))
            .map_err(backend)?
            .is_ok()
        {
            return Ok(Some(at));
        }
    }
}

/// `by_tenant` key: the tenant, a zero byte, the token (token order within a tenant).
fn tenant_key(tenant: &TenantId, token: &Token) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.as_str().len() + 1 + token.as_str().len());
    k.extend_from_slice(tenant.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(token.as_str().as_bytes());
    k
}

/// `charge_index` key prefix: tenant, zero byte, `t` (token) or `r` (reference),
/// the value's length (2 bytes) and the value; the full key adds the creation
/// time (8 bytes, big-endian) and the charge id, so a prefix lists oldest first.
fn charge_index_prefix(tenant: &str, of: &ChargesOf) -> Vec<u8> {
    let (kind, value) = match of {
        ChargesOf::Token(t) => (b't', t.as_str()),
        ChargesOf::Reference(r) => (b'r', r.as_str()),
    };
    let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
    let mut k = Vec::with_capacity(tenant.len() + 4 + value.len() + 8 + 32);
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.push(kind);
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(&value.as_bytes()[..usize::from(len)]);
    k
}

fn charge_index_key(tenant: &str, of: &ChargesOf, created_at: i64, id: &str) -> Vec<u8> {
    let mut k = charge_index_prefix(tenant, of);
    k.extend_from_slice(&(created_at.max(0) as u64).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// Lists a charge under its token and its reference (idempotent).
fn index_charge(index: &sled::Tree, charge: &ChargeRecord) -> Result<(), StoreError> {
    for of in [
        ChargesOf::Token(charge.token.clone()),
        ChargesOf::Reference(charge.reference.clone()),
    ] {
        index
            .insert(
                charge_index_key(&charge.tenant, &of, charge.created_at, &charge.id),
                &[] as &[u8],
            )
            .map_err(backend)?;
    }
    Ok(())
}

/// Builds the indexes a store written by an older vault lacks (once: a mark in
/// `meta` says they are complete). Records count as last used when they were created.
fn build_indexes(
    db: &sled::Db,
    meta: &sled::Tree,
    tokens: &sled::Tree,
    by_tenant: &sled::Tree,
    charges: &sled::Tree,
    charge_index: &sled::Tree,
) -> Result<(), StoreError> {
    if meta.get(INDEXES_KEY).map_err(backend)?.is_some() {
        return Ok(());
    }
    for item in tokens.iter() {
        let (k, v) = item.map_err(backend)?;
        let token = std::str::from_utf8(&k)
            .ok()
            .and_then(Token::parse)
            .ok_or(StoreError::Corrupt)?;
        let record = decode(&token, &v)?;
        let key = tenant_key(&record.tenant, &token);
        let used = record.created_at.unix_timestamp().to_be_bytes();
        by_tenant
            .compare_and_swap(key, None as Option<&[u8]>, Some(&used[..]))
            .map_err(backend)?
            .ok();
    }
    for item in charges.iter() {
        let (_, v) = item.map_err(backend)?;
        index_charge(charge_index, &super::codec::decode_charge(&v)?)?;
    }
    meta.insert(INDEXES_KEY, &[1u8][..]).map_err(backend)?;
    db.flush().map_err(backend)?;
    Ok(())
}

fn be_i64(v: &[u8]) -> Result<i64, StoreError> {
    Ok(i64::from_be_bytes(v.try_into().map_err(|_| StoreError::Corrupt)?))
}

fn fp_key(tenant: &TenantId, fp: &[u8; 32]) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.as_str().len() + 33);
    k.extend_from_slice(tenant.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(fp);
    k
}

impl Store for SledStore {
    fn insert(
        &self,
        record: &StoredRecord,
        mode: InsertMode,
        audit: Option<&AuditAppend>,
    ) -> Result<InsertOutcome, StoreError> {
        let _writing = self.writer.writing();
        let (outcome, records) = self
            .writer
            .trees()
            .transaction(|(a, b, c)| {
                tx_insert((a, b, c), record, mode, &mut || {
                    Ok(audit.cloned().into_iter().collect())
                })
            })
            .map_err(tx_error)?;
        if outcome == InsertOutcome::Inserted {
            self.by_tenant
                .insert(
                    tenant_key(&record.tenant, &record.token),
                    &record.created_at.unix_timestamp().to_be_bytes(),
                )
                .map_err(backend)?;
            if let Some(at) = record.expires_at {
                self.expiries
                    .insert(expiry_key(at, &record.token), record.tenant.as_str().as_bytes())
                    .map_err(backend)?;
            }
            self.writer
                .committed(&[Effect::Added(record.sealed.key_version)], &records);
        }
        Ok(outcome)
    }

    fn get(&self, tenant: &TenantId, token: &Token) -> Result<Option<StoredRecord>, StoreError> {
        let Some(bytes) = self.tokens.get(token.as_str().as_bytes()).map_err(backend)? else {
            return Ok(None);
        };
        let record = decode(token, &bytes)?;
        Ok((record.tenant == *tenant).then_some(record))
    }

    fn find_fingerprint(&self, tenant: &TenantId, fingerprint: &[u8; 32]) -> Result<Option<Token>, StoreError> {
        match self.fingerprints.get(fp_key(tenant, fingerprint)).map_err(backend)? {
            None => Ok(None),
            Some(v) => {
                let s = std::str::from_utf8(&v).map_err(|_| StoreError::Corrupt)?;
                Token::parse(s).map(Some).ok_or(StoreError::Corrupt)
            }
        }
    }

    fn delete(&self, tenant: &TenantId, token: &Token, audit: Option<&AuditAppend>) -> Result<bool, StoreError> {
        let _writing = self.writer.writing();
        let (gone, records) = self
            .writer
            .trees()
            .transaction(|(a, b, c)| {
                tx_delete((a, b, c), tenant, token, &mut || {
                    Ok(audit.cloned().into_iter().collect())
                })
            })
            .map_err(tx_error)?;
        if let Some(version) = gone {
            self.by_tenant.remove(tenant_key(tenant, token)).map_err(backend)?;
            self.writer.committed(&[Effect::Removed(version)], &records);
        }
        Ok(gone.is_some())
    }

    fn count(&self) -> Result<u64, StoreError> {
        Ok(self.tokens.len() as u64)
    }

    fn expired(&self, now: i64, limit: usize) -> Result<Vec<(TenantId, Token)>, StoreError> {
        let _writing = self.writer.writing();
        let end = (now.max(-1) + 1).max(0) as u64;
        let mut out = Vec::new();
        for item in self.expiries.range(..end.to_be_bytes().to_vec()) {
            if out.len() >= limit {
                break;
            }
            let (key, tenant) = item.map_err(backend)?;
            let token = std::str::from_utf8(&key[8.min(key.len())..])
                .ok()
                .and_then(Token::parse);
            let tenant = std::str::from_utf8(&tenant).ok().and_then(TenantId::parse);
            let live = match (&token, &tenant) {
                (Some(token), Some(tenant)) => self.get(tenant, token)?.is_some_and(|r| {
                    r.expired_at(now) && r.expires_at.map(|t| expiry_key(t, token)) == Some(key.to_vec())
                }),
                _ => false,
            };
            match (live, token, tenant) {
                (true, Some(token), Some(tenant)) => out.push((tenant, token)),
                // Its record is gone (deleted) or changed: the entry is stale.
                _ => {
                    self.expiries.remove(&key).map_err(backend)?;
                }
            }
        }
        Ok(out)
    }

    fn tenant_records(
        &self,
        tenant: &TenantId,
        after: Option<&Token>,
        limit: usize,
        used_before: Option<i64>,
    ) -> Result<Vec<(StoredRecord, i64)>, StoreError> {
        let _writing = self.writer.writing();
        let mut prefix = tenant.as_str().as_bytes().to_vec();
        prefix.push(0);
        let start = match after {
            Some(t) => {
                let mut k = tenant_key(tenant, t);
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        let mut end = tenant.as_str().as_bytes().to_vec();
        end.push(1);
        let mut out = Vec::with_capacity(limit.min(1024));
        for item in self.by_tenant.range(start..end) {
            if out.len() >= limit {
                break;
            }
            let (key, used) = item.map_err(backend)?;
            let used = be_i64(&used)?;
            if used_before.is_some_and(|b| used >= b) {
                continue;
            }
            let token = std::str::from_utf8(&key[prefix.len()..])
                .ok()
                .and_then(Token::parse)
                .ok_or(StoreError::Corrupt)?;
            match self.get(tenant, &token)? {
                Some(record) => out.push((record, used)),
                // A crash between a delete's steps left the entry: cleared here.
                None => {
                    self.by_tenant.remove(&key).map_err(backend)?;
                }
            }
        }
        Ok(out)
    }

    fn last_used(&self, tenant: &TenantId, token: &Token) -> Result<Option<i64>, StoreError> {
        match self.by_tenant.get(tenant_key(tenant, token)).map_err(backend)? {
            None => Ok(None),
            Some(v) => be_i64(&v).map(Some),
        }
    }

    fn touch(&self, tenant: &TenantId, token: &Token, at: i64, granularity: i64) -> Result<(), StoreError> {
        let _writing = self.writer.writing();
        touch_entry(&self.by_tenant, &tenant_key(tenant, token), at, Some(granularity)).map(|_| ())
    }

    fn charges_of(
        &self,
        tenant: &TenantId,
        of: &ChargesOf,
        after: Option<&(i64, String)>,
        limit: usize,
    ) -> Result<Vec<ChargeRecord>, StoreError> {
        let prefix = charge_index_prefix(tenant.as_str(), of);
        let start = match after {
            Some((at, id)) => {
                let mut k = charge_index_key(tenant.as_str(), of, *at, id);
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        let mut out = Vec::with_capacity(limit.min(256));
        for item in self.charge_index.range(start..) {
            if out.len() >= limit {
                break;
            }
            let (key, _) = item.map_err(backend)?;
            if !key.starts_with(&prefix) {
                break;
            }
            let id = key.get(prefix.len() + 8..).ok_or(StoreError::Corrupt)?;
            let id = std::str::from_utf8(id).map_err(|_| StoreError::Corrupt)?;
            if let Some(charge) = self.get_charge(tenant, id)? {
                out.push(charge);
            }
        }
        Ok(out)
    }

    fn count_by_version(&self) -> Result<std::collections::BTreeMap<u32, u64>, StoreError> {
        Ok(self.versions.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    fn records_under_version(
        &self,
        version: u32,
        after: Option<&Token>,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let _writing = self.writer.writing();
        // A cursor over the records in token order: no index to keep in step with
        // every tokenize, and nothing stale to meet.
        let records = match after {
            Some(t) => self.tokens.range::<&[u8], _>((
                std::ops::Bound::Excluded(t.as_str().as_bytes()),
                std::ops::Bound::Unbounded,
            )),
            None => self.tokens.iter(),
        };
        let mut out = Vec::with_capacity(limit.min(4096));
        for item in records {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item.map_err(backend)?;
            // A damaged record cannot be rewrapped either: passed over (it fails
            // closed when read).
            if let Ok(record) = token_of(&key).and_then(|t| decode(&t, &value))
                && record.sealed.key_version == version
            {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn replace_sealed(&self, moves: &[(StoredRecord, SealedCard)]) -> Result<u64, StoreError> {
        let _writing = self.writer.writing();
        // No sled transaction (each would roll the log buffer twice): every record
        // is compare-and-swapped on its own, and the in-memory count moves with it.
        let mut moved = 0;
        for (current, sealed) in moves {
            let expected = encode(current)?;
            let next = encode(&StoredRecord {
                sealed: sealed.clone(),
                ..current.clone()
            })?;
            let key = current.token.as_str().as_bytes();
            if self
                .tokens
                .compare_and_swap(key, Some(expected), Some(next))
                .map_err(backend)?
                .is_err()
            {
                continue; // changed or deleted meanwhile
            }
            note_versions(
                &self.versions,
                Some(current.sealed.key_version),
                Some(sealed.key_version),
                1,
            );
            moved += 1;
        }
        Ok(moved)
    }

    fn set_network_tx_id(&self, tenant: &TenantId, token: &Token, id: &str) -> Result<bool, StoreError> {
        let _writing = self.writer.writing();
        super::set_once(
            || self.get(tenant, token),
            |expected, next| {
                Ok(self
                    .tokens
                    .compare_and_swap(token.as_str().as_bytes(), Some(expected), Some(next))
                    .map_err(backend)?
                    .is_ok())
            },
            id,
        )
    }

    fn reserve_charge(
        &self,
        charge: &ChargeRecord,
        idempotency_key: &[u8; 32],
        idem: &IdempotencyRecord,
        live_since: i64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let _writing = self.writer.writing();
        let c = super::codec::encode_charge(charge)?;
        let i = postcard::to_stdvec(idem).map_err(|_| StoreError::Corrupt)?;
        let result = (&self.charges, &self.idempotency).transaction(|(charges, idempotency)| {
            if let Some(bytes) = idempotency.get(&idempotency_key[..])? {
                let prior: IdempotencyRecord = postcard::from_bytes(&bytes)
                    .map_err(|_| ConflictableTransactionError::Abort(StoreError::Corrupt))?;
                if prior.created_at >= live_since {
                    return Ok(Some(prior));
                }
            }
            charges.insert(charge.id.as_bytes(), c.as_slice())?;
            idempotency.insert(&idempotency_key[..], i.as_slice())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(None)
        });
        if let Ok(None) = result {
            index_charge(&self.charge_index, charge)?;
        }
        result.map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => backend(e),
        })
    }

    fn update_charge(&self, charge: &ChargeRecord) -> Result<(), StoreError> {
        let _writing = self.writer.writing();
        let c = super::codec::encode_charge(charge)?;
        self.charges.insert(charge.id.as_bytes(), c).map_err(backend)?;
        index_charge(&self.charge_index, charge)
    }

    fn swap_charge(&self, old: &ChargeRecord, new: &ChargeRecord) -> Result<bool, StoreError> {
        let _writing = self.writer.writing();
        let Some(current) = self.charges.get(old.id.as_bytes()).map_err(backend)? else {
            return Ok(false);
        };
        // Compared decoded (an older encoding of the same charge is the same
        // charge), then swapped against the exact bytes read.
        if super::codec::decode_charge(&current)? != *old {
            return Ok(false);
        }
        let c = super::codec::encode_charge(new)?;
        Ok(self
            .charges
            .compare_and_swap(old.id.as_bytes(), Some(current), Some(c))
            .map_err(backend)?
            .is_ok())
    }

    fn get_charge(&self, tenant: &TenantId, id: &str) -> Result<Option<ChargeRecord>, StoreError> {
        let Some(bytes) = self.charges.get(id.as_bytes()).map_err(backend)? else {
            return Ok(None);
        };
        let charge = super::codec::decode_charge(&bytes)?;
        Ok((charge.tenant == tenant.as_str()).then_some(charge))
    }

    fn get_idempotency(&self, idempotency_key: &[u8; 32]) -> Result<Option<IdempotencyRecord>, StoreError> {
        match self.idempotency.get(&idempotency_key[..]).map_err(backend)? {
            None => Ok(None),
            Some(bytes) => postcard::from_bytes(&bytes).map(Some).map_err(|_| StoreError::Corrupt),
        }
    }

    fn remember(
        &self,
        idempotency_key: &[u8; 32],
        idem: &IdempotencyRecord,
        live_since: i64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let _writing = self.writer.writing();
        let value = postcard::to_stdvec(idem).map_err(|_| StoreError::Corrupt)?;
        loop {
            let current = self.idempotency.get(&idempotency_key[..]).map_err(backend)?;
            if let Some(bytes) = &current {
                let prior: IdempotencyRecord = postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt)?;
                if prior.created_at >= live_since {
                    return Ok(Some(prior));
                }
            }
            if self
                .idempotency
                .compare_and_swap(&idempotency_key[..], current, Some(value.as_slice()))
                .map_err(backend)?
                .is_ok()
            {
                return Ok(None);
            }
        }
    }

    fn audit_append(&self, seq: u64, record: &[u8], keyed_mac: Option<[u8; 32]>) -> Result<(), StoreError> {
        let _writing = self.writer.writing();
        self.audit.insert(seq.to_be_bytes(), record).map_err(backend)?;
        note_head(&self.head, seq, record, keyed_mac);
        Ok(())
    }

    fn audit_keyed_mark(&self) -> Option<KeyedMark> {
        self.keyed_at_open
    }

    fn audit_anchor_legacy(&self) -> bool {
        self.legacy_anchor
    }

    fn backup(
        &self,
        out: &mut dyn std::io::Write,
        keystore: &dyn Fn() -> Result<zeroize::Zeroizing<Vec<u8>>, BoxError>,
    ) -> Result<Option<(backup::Summary, u64)>, StoreError> {
        self.backup_to(out, keystore).map(Some)
    }

    fn damage(&self) -> Option<StoreDamage> {
        self.damage.clone()
    }

    fn reanchored_from(&self) -> Option<u64> {
        self.reanchored_from
    }

    fn audit_last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        match self.audit.last().map_err(backend)? {
            None => Ok(None),
            Some((k, v)) => {
                let seq: [u8; 8] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt)?;
                Ok(Some((u64::from_be_bytes(seq), v.to_vec())))
            }
        }
    }

    fn audit_scan(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.audit.range(from.to_be_bytes()..).take(limit) {
            let (k, v) = item.map_err(backend)?;
            let seq: [u8; 8] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt)?;
            out.push((u64::from_be_bytes(seq), v.to_vec()));
        }
        Ok(out)
    }

    fn keystore_generation(&self) -> Result<u64, StoreError> {
        match self.meta.get(KEYSTORE_GENERATION_KEY).map_err(backend)? {
            None => Ok(0),
            Some(v) => {
                let b: [u8; 8] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt)?;
                Ok(u64::from_be_bytes(b))
            }
        }
    }

    fn set_keystore_generation(&self, generation: u64) -> Result<(), StoreError> {
        let _writing = self.writer.writing();
        self.meta
            .insert(KEYSTORE_GENERATION_KEY, &generation.to_be_bytes())
            .map_err(backend)?;
        self.db.flush().map_err(backend)?;
        Ok(())
    }

    fn kek_wraps(&self, version: u32) -> Result<u64, StoreError> {
        match self.meta.get(wraps_key(version)).map_err(backend)? {
            None => Ok(0),
            Some(v) => {
                let b: [u8; 8] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt)?;
                Ok(u64::from_be_bytes(b))
            }
        }
    }

    fn set_kek_wraps(&self, version: u32, reserved: u64) -> Result<(), StoreError> {
        let _writing = self.writer.writing();
        self.meta
            .insert(wraps_key(version), &reserved.to_be_bytes())
            .map_err(backend)?;
        Ok(())
    }

    fn audit_checkpoint(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.meta.get(CHECKPOINT_KEY).map_err(backend)?.map(|v| v.to_vec()))
    }

    fn audit_prune(&self, through: u64, checkpoint: &[u8]) -> Result<u64, StoreError> {
        let _history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let _writing = self.writer.writing();
        // Checkpoint first: a crash midway leaves records the verifier skips.
        self.meta.insert(CHECKPOINT_KEY, checkpoint).map_err(backend)?;
        self.db.flush().map_err(backend)?;
        let mut removed = 0;
        loop {
            let keys: Vec<sled::IVec> = self
                .audit
                .range(..=through.to_be_bytes())
                .keys()
                .take(10_000)
                .collect::<Result<_, _>>()
                .map_err(backend)?;
            if keys.is_empty() {
                break;
            }
            let mut batch = sled::Batch::default();
            for k in &keys {
                batch.remove(k);
            }
            self.audit.apply_batch(batch).map_err(backend)?;
            removed += keys.len() as u64;
        }
        self.db.flush().map_err(backend)?;
        Ok(removed)
    }

    fn apply(&self, unit: Unit, seal: Arc<dyn AuditSeal>) -> Applying {
        let (reply, rx) = oneshot::channel();
        let sent = match self.committer.lock() {
            Ok(sender) => sender
                .send(Job::Apply {
                    unit: Box::new(unit),
                    seal,
                    reply,
                })
                .is_ok(),
            Err(_) => false,
        };
        if sent {
            Applying::waiting(rx)
        } else {
            Applying::failed(StoreError::Backend("commit thread unavailable".into()))
        }
    }

    fn commit(&self) -> Commit {
        let (tx, rx) = oneshot::channel();
        let sent = match self.committer.lock() {
            Ok(sender) => sender.send(Job::Flush(tx)).is_ok(),
            Err(_) => false,
        };
        if sent {
            Commit::waiting(rx)
        } else {
            Commit::failed(StoreError::Backend("commit thread unavailable".into()))
        }
    }

    fn check(&self) -> Result<(), StoreError> {
        let _ = &self.db;
        match self.meta.get(SCHEMA_KEY).map_err(backend)? {
            Some(v) if v.as_ref() == SCHEMA_V1 => Ok(()),
            _ => Err(StoreError::Backend("schema marker missing".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[tokio::test]
    async fn sled_passes_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        conformance::run(&store).await;
    }

    #[tokio::test]
    async fn group_commit_serves_many_waiters() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path()).unwrap());
        let mut waits = Vec::new();
        for i in 0..64u32 {
            let token = format!("41111100{:04}1112", i);
            let Some(t) = Token::parse(&token) else {
                continue;
            };
            let mut r = conformance::record("t1", t.as_str(), (i % 250) as u8);
            r.fingerprint[1] = 7;
            r.fingerprint[2] = i as u8;
            assert_eq!(
                store.insert(&r, InsertMode::Dedupe, None).unwrap(),
                InsertOutcome::Inserted
            );
            waits.push(store.commit());
        }
        for w in waits {
            w.await.unwrap();
        }
    }

    /// Appends `n` audit records and waits for them (and the anchor) to be durable.
    async fn audited(dir: &Path, from: u64, n: u64) {
        let store = SledStore::open(dir).unwrap();
        assert_eq!(store.damage(), None);
        for seq in from..from + n {
            store
                .audit_append(seq, format!("record {seq}").as_bytes(), None)
                .unwrap();
        }
        store.commit().await.unwrap();
    }

    #[tokio::test]
    async fn the_anchor_catches_lost_rewritten_and_missing_history() {
        let dir = tempfile::tempdir().unwrap();
        audited(dir.path(), 1, 5).await;
        let backup = tempfile::tempdir().unwrap();
        for name in ["conf", "db", "anchor"] {
            std::fs::copy(dir.path().join(name), backup.path().join(name)).unwrap();
        }
        audited(dir.path(), 6, 3).await;

        // The anchor of a newer state over an older store: records lost.
        std::fs::copy(dir.path().join("anchor"), backup.path().join("anchor")).unwrap();
        let old = SledStore::open(backup.path()).unwrap();
        assert_eq!(old.damage(), Some(StoreDamage::RecordsLost { anchored: 8, found: 5 }));
        // Frozen: new writes do not move the anchor, so the alarm outlives restarts.
        old.audit_append(6, b"another history", None).unwrap();
        old.commit().await.unwrap();
        drop(old);
        let old = SledStore::open(backup.path()).unwrap();
        assert_eq!(old.damage(), Some(StoreDamage::RecordsLost { anchored: 8, found: 6 }));
        old.audit_append(7, b"x", None).unwrap();
        old.audit_append(8, b"y", None).unwrap();
        old.commit().await.unwrap();
        drop(old);
        // Record 8 exists again, but it is not the one that was anchored.
        let old = SledStore::open(backup.path()).unwrap();
        assert_eq!(
            old.damage(),
            Some(StoreDamage::HistoryDiffers { anchored: 8, found: 8 })
        );
        drop(old);

        // Accepting the loss moves the anchor to what the store holds; reported once.
        assert_eq!(SledStore::reanchor(backup.path()).unwrap(), Some((Some(8), 8)));
        let healed = SledStore::open(backup.path()).unwrap();
        assert_eq!(healed.damage(), None);
        assert_eq!(healed.reanchored_from(), Some(8));
        healed.audit_append(9, b"z", None).unwrap();
        healed.commit().await.unwrap();
        drop(healed);
        let healed = SledStore::open(backup.path()).unwrap();
        assert_eq!((healed.damage(), healed.reanchored_from()), (None, None));
        drop(healed);
        assert_eq!(SledStore::reanchor(backup.path()).unwrap(), None, "nothing to accept");

        // A deleted or spoiled anchor is damage too, never silently re-created.
        std::fs::remove_file(dir.path().join("anchor")).unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.damage(), Some(StoreDamage::AnchorMissing { found: 8 }));
        drop(store);
        std::fs::write(dir.path().join("anchor"), [7u8; 192]).unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.damage(), Some(StoreDamage::AnchorUnreadable { found: 8 }));
    }

    /// Counts come from the records themselves at open; the version index an
    /// earlier release kept (stale entries included) is dropped, not trusted; a
    /// damaged record does not stop the open.
    #[tokio::test]
    async fn versions_are_counted_from_the_records_and_the_old_index_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let a = conformance::record("t1", "4111110000001112", 1);
        let b = StoredRecord {
            sealed: SealedCard {
                key_version: 2,
                ..a.sealed.clone()
            },
            ..conformance::record("t1", "4111110000003112", 2)
        };
        {
            let store = SledStore::open(dir.path()).unwrap();
            for r in [&a, &b] {
                assert_eq!(
                    store.insert(r, InsertMode::Dedupe, None).unwrap(),
                    InsertOutcome::Inserted
                );
            }
            // What an earlier release's index could hold after a crash: entries naming
            // a gone token and a moved record.
            let old = store.db.open_tree("by_version").unwrap();
            old.insert([0, 0, 0, 1, b'x'], &[] as &[u8]).unwrap();
            old.insert([0, 0, 0, 3, b'y'], &[] as &[u8]).unwrap();
            // A damaged record: the store still opens, and it is counted nowhere.
            store.tokens.insert(b"4111110000005112", &[9u8, 1, 2][..]).unwrap();
            store.commit().await.unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert!(
            !store.db.tree_names().iter().any(|n| n.as_ref() == b"by_version"),
            "the old index is dropped at open"
        );
        assert_eq!(
            store.count_by_version().unwrap(),
            [(1, 1), (2, 1)].into_iter().collect()
        );
        assert_eq!(store.records_under_version(1, None, 10).unwrap(), vec![a.clone()]);
        assert_eq!(store.records_under_version(2, None, 10).unwrap(), vec![b.clone()]);
        assert_eq!(store.records_under_version(3, None, 10).unwrap(), vec![]);
    }

    /// A store written before the tenant and charge indexes existed gets them at
    /// its next open: its records listed (used when created), its charges found.
    #[tokio::test]
    async fn indexes_are_built_for_a_store_written_before_them() {
        let dir = tempfile::tempdir().unwrap();
        let a = conformance::record("t1", "4111110000001112", 1);
        let charge = conformance::charge("ch_old", &a, "order-1");
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.insert(&a, InsertMode::Dedupe, None).unwrap();
            store.update_charge(&charge).unwrap();
            // As an older vault left it: no index entries, no mark.
            store.by_tenant.clear().unwrap();
            store.charge_index.clear().unwrap();
            store.meta.remove(INDEXES_KEY).unwrap();
            store.commit().await.unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        let t1 = TenantId::parse("t1").unwrap();
        assert_eq!(
            store.tenant_records(&t1, None, 10, None).unwrap(),
            vec![(a.clone(), a.created_at.unix_timestamp())]
        );
        let of = ChargesOf::Reference("order-1".into());
        assert_eq!(store.charges_of(&t1, &of, None, 10).unwrap(), vec![charge]);
    }

    #[test]
    fn corrupt_bytes_are_reported_not_panicked() {
        let t = Token::parse("4111110000001112").unwrap();
        assert!(matches!(decode(&t, &[]), Err(StoreError::Corrupt)));
        assert!(matches!(decode(&t, &[1, 2, 3]), Err(StoreError::Corrupt)));
        assert!(matches!(decode(&t, &[9]), Err(StoreError::Corrupt)));
    }
}
