//! The audit trail (PCI DSS 10): every tokenize, metadata read, detokenize,
//! delete, charge, key operation, unseal attempt and authentication or
//! authorization failure becomes a record — time, principal, tenant, action,
//! token (never a PAN), outcome, request id, source address.
//!
//! Records are hash-chained (each carries the SHA-256 of its predecessor's chain
//! hash and its own canonical body) and MACed (HMAC-SHA256 under an HKDF purpose
//! key of the index key). While the vault is sealed no key is available: those
//! records are chained but un-MACed, and the first MACed record after unseal
//! covers them through the chain. Appends are made durable (group commit) before
//! the response is sent. [`verify`] checks a whole trail and names the first
//! broken link: an edited, deleted, inserted or reordered record breaks it.
//! Truncating the tail leaves a valid shorter chain: the store's anchor
//! (`store::anchor`, the durably written head) catches that at start, and a SIEM
//! export anchors the head off the box.
//!
//! Stored compactly ([`encode_stored`]: a tag byte, then postcard with the three
//! hashes as raw bytes, ≈ 40 % of the JSON); exports and the verifier see the
//! same [`AuditRecord`] and its JSON as before. Records stored as JSON by earlier
//! releases stay readable ([`decode_stored`] tells the two apart by their first
//! byte), and the chain hash is over the same canonical JSON body either way.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::crypto::Key256;
use crate::keys::manager::KeyManager;
pub use crate::store::AuditEvent;
use crate::store::{AuditAppend, MarkKey, Store, StoreError, keyed_mark_mac};

/// One stored audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub seq: u64,
    pub at: String,
    pub action: String,
    pub outcome: String,
    pub principal: Option<String>,
    pub tenant: Option<String>,
    pub token: Option<String>,
    pub request_id: Option<String>,
    pub source: Option<String>,
    pub detail: Option<String>,
    /// Chain hash of the previous record (hex; zeros for the first).
    pub prev: String,
    /// SHA-256(prev ‖ canonical body) (hex).
    pub hash: String,
    /// HMAC-SHA256(audit key, hash) (hex); absent for records written while sealed.
    pub mac: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    seq: u64,
    at: &'a str,
    action: &'a str,
    outcome: &'a str,
    principal: &'a Option<String>,
    tenant: &'a Option<String>,
    token: &'a Option<String>,
    request_id: &'a Option<String>,
    source: &'a Option<String>,
    detail: &'a Option<String>,
}

impl AuditRecord {
    fn chain_hash(&self, prev: &[u8; 32]) -> [u8; 32] {
        let body = Body {
            seq: self.seq,
            at: &self.at,
            action: &self.action,
            outcome: &self.outcome,
            principal: &self.principal,
            tenant: &self.tenant,
            token: &self.token,
            request_id: &self.request_id,
            source: &self.source,
            detail: &self.detail,
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        Sha256::new().chain_update(prev).chain_update(&bytes).finalize().into()
    }
}

/// The tag byte of a compactly stored record (a JSON record starts with `{`).
const STORED_V2: u8 = 0xA2;

/// The stored form: the record's fields, its hashes as raw bytes.
#[derive(Serialize, Deserialize)]
struct StoredV2 {
    seq: u64,
    at: String,
    action: String,
    outcome: String,
    principal: Option<String>,
    tenant: Option<String>,
    token: Option<String>,
    request_id: Option<String>,
    source: Option<String>,
    detail: Option<String>,
    prev: [u8; 32],
    hash: [u8; 32],
    mac: Option<[u8; 32]>,
}

/// Why stored audit bytes are not a record.
#[derive(Debug, thiserror::Error)]
#[error("not a valid stored audit record")]
pub struct NotARecord;

/// [`StoredV2`] borrowed, for writing (postcard encodes `&str` as `String`).
#[derive(Serialize)]
struct StoredV2Ref<'a> {
    seq: u64,
    at: &'a str,
    action: &'a str,
    outcome: &'a str,
    principal: Option<&'a str>,
    tenant: Option<&'a str>,
    token: Option<&'a str>,
    request_id: Option<&'a str>,
    source: Option<&'a str>,
    detail: Option<&'a str>,
    prev: [u8; 32],
    hash: [u8; 32],
    mac: Option<[u8; 32]>,
}

/// The bytes a record is stored as.
pub fn encode_stored(rec: &AuditRecord) -> Result<Vec<u8>, NotARecord> {
    let raw = |h: &str| -> Result<[u8; 32], NotARecord> {
        hex::decode(h).ok().and_then(|b| b.try_into().ok()).ok_or(NotARecord)
    };
    let mac = rec.mac.as_deref().map(raw).transpose()?;
    encode_raw(rec, raw(&rec.prev)?, raw(&rec.hash)?, mac)
}

/// The stored bytes of `rec`'s fields with its hashes given raw (its own hex
/// fields are not read).
fn encode_raw(rec: &AuditRecord, prev: [u8; 32], hash: [u8; 32], mac: Option<[u8; 32]>) -> Result<Vec<u8>, NotARecord> {
    let v = StoredV2Ref {
        seq: rec.seq,
        at: &rec.at,
        action: &rec.action,
        outcome: &rec.outcome,
        principal: rec.principal.as_deref(),
        tenant: rec.tenant.as_deref(),
        token: rec.token.as_deref(),
        request_id: rec.request_id.as_deref(),
        source: rec.source.as_deref(),
        detail: rec.detail.as_deref(),
        prev,
        hash,
        mac,
    };
    let mut out = Vec::with_capacity(256);
    out.push(STORED_V2);
    postcard::to_extend(&v, out).map_err(|_| NotARecord)
}

/// A stored record: the compact form, or the JSON of earlier releases.
pub fn decode_stored(bytes: &[u8]) -> Result<AuditRecord, NotARecord> {
    match bytes.split_first() {
        Some((&STORED_V2, body)) => {
            let v: StoredV2 = postcard::from_bytes(body).map_err(|_| NotARecord)?;
            Ok(AuditRecord {
                seq: v.seq,
                at: v.at,
                action: v.action,
                outcome: v.outcome,
                principal: v.principal,
                tenant: v.tenant,
                token: v.token,
                request_id: v.request_id,
                source: v.source,
                detail: v.detail,
                prev: hex::encode(v.prev),
                hash: hex::encode(v.hash),
                mac: v.mac.map(hex::encode),
            })
        }
        Some((b'{', _)) => serde_json::from_slice(bytes).map_err(|_| NotARecord),
        _ => Err(NotARecord),
    }
}

/// Why the audit trail could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the audit trail's last record is unreadable")]
    Corrupt,
}

/// Why the trail's head does not verify against the anchor's keyed mark.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("cannot read the audit trail")]
    Store(#[from] StoreError),
    #[error("the anchor has no keyed mark, but audit record {0} is MACed: the anchor was replaced")]
    AnchorReplaced(u64),
    #[error("audit record {0} (the anchor's keyed mark) is missing")]
    MarkMissing(u64),
    #[error("the anchor's keyed mark for audit record {0} does not verify (record or anchor altered)")]
    MarkMismatch(u64),
    #[error("audit record {0} is corrupt")]
    Corrupt(u64),
    #[error("audit record {0} after the keyed mark: {1}")]
    Broken(u64, String),
}

impl AuditError {
    /// The store cannot be reached right now (a database restarting or failing over):
    /// nothing was written, and the request may be retried.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, AuditError::Store(StoreError::Unavailable(_)))
    }
}

/// Why a retention prune was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// Where a pruned trail resumes: the last removed record's sequence and chain hash.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Checkpoint {
    seq: u64,
    hash: String,
}

/// The appender. One per process (clones share it); appends are serialized.
#[derive(Clone)]
pub struct AuditLog {
    store: Arc<dyn Store>,
    keys: Arc<KeyManager>,
    /// (sequence, chain hash, inside a sealed period) of the newest record.
    head: Arc<Mutex<(u64, [u8; 32], bool)>>,
}

/// The action of the record that opens a sealed period: records after it are
/// written without a key (none is available while sealed) until the next MACed
/// record. An un-MACed record anywhere else is refused by the verifier.
pub const SEALED_PERIOD: &str = "audit.sealed_period";

/// The audit log seals records for the store's atomic writes (units of work).
impl crate::store::AuditSeal for AuditLog {
    fn begin(&self) -> Box<dyn crate::store::SealBatch + '_> {
        let key = self.keys.ring().map(|r| MarkKey::new(r.audit_key()));
        let head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        let start = *head;
        Box::new(Sealing {
            head,
            start,
            at: start,
            before_last: start,
            key,
        })
    }
}

/// Records sealed for one store write; the trail's head stays locked meanwhile.
struct Sealing<'a> {
    head: std::sync::MutexGuard<'a, (u64, [u8; 32], bool)>,
    start: (u64, [u8; 32], bool),
    at: (u64, [u8; 32], bool),
    before_last: (u64, [u8; 32], bool),
    key: Option<MarkKey>,
}

impl crate::store::SealBatch for Sealing<'_> {
    fn restart(&mut self) {
        self.at = self.start;
    }

    fn seal(&mut self, event: &AuditEvent) -> Result<Vec<AuditAppend>, StoreError> {
        let corrupt = |_| StoreError::Backend("audit record could not be encoded".into());
        self.before_last = self.at;
        let mut out = Vec::with_capacity(1);
        if self.key.is_none() && !self.at.2 {
            // No key: open a sealed period explicitly before the first un-MACed record.
            let marker = prepare(&self.at, None, sealed_period_marker()).map_err(corrupt)?;
            self.at = (marker.seq, marker.hash, true);
            out.push(marker);
        }
        let record = prepare(&self.at, self.key.as_ref(), event.clone()).map_err(corrupt)?;
        self.at = (record.seq, record.hash, self.key.is_none());
        out.push(record);
        Ok(out)
    }

    fn unseal_last(&mut self) {
        self.at = self.before_last;
    }

    fn commit(mut self: Box<Self>) {
        *self.head = self.at;
    }

    fn follow(&mut self, seq: u64, record: &[u8]) -> Result<(), StoreError> {
        let head = head_of(seq, record).map_err(|_| StoreError::Corrupt)?;
        self.start = head;
        self.at = head;
        self.before_last = head;
        Ok(())
    }
}

/// (sequence, chain hash, inside a sealed period) of a stored record.
fn head_of(seq: u64, bytes: &[u8]) -> Result<(u64, [u8; 32], bool), AuditError> {
    let rec = decode_stored(bytes).map_err(|_| AuditError::Corrupt)?;
    let hash: [u8; 32] = hex::decode(&rec.hash)
        .ok()
        .and_then(|h| h.try_into().ok())
        .ok_or(AuditError::Corrupt)?;
    // An un-MACed head continues the sealed period it belongs to (the head check
    // at start, or at unseal, decides whether that is genuine).
    Ok((seq, hash, rec.mac.is_none()))
}

fn sealed_period_marker() -> AuditEvent {
    AuditEvent {
        action: SEALED_PERIOD,
        outcome: "opened".into(),
        detail: Some("the vault is sealed: records up to the next MACed one carry no MAC".into()),
        ..Default::default()
    }
}

/// Builds the next record after `head`: chained, MACed under `key` if there is one.
fn prepare(head: &(u64, [u8; 32], bool), key: Option<&MarkKey>, event: AuditEvent) -> Result<AuditAppend, AuditError> {
    let seq = head.0 + 1;
    let at = OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let rec = AuditRecord {
        seq,
        at,
        action: event.action.to_owned(),
        outcome: event.outcome,
        principal: event.principal,
        tenant: event.tenant,
        token: event.token,
        request_id: event.request_id,
        source: event.source,
        detail: event.detail,
        prev: String::new(),
        hash: String::new(),
        mac: None,
    };
    let hash = rec.chain_hash(&head.1);
    let mac = key.map(|k| k.key().hmac(&hash));
    let record = encode_raw(&rec, head.1, hash, mac).map_err(|_| AuditError::Corrupt)?;
    Ok(AuditAppend {
        seq,
        record,
        keyed: key.cloned(),
        hash,
    })
}

impl AuditLog {
    /// Opens the trail, continuing after its last record.
    pub fn open(store: Arc<dyn Store>, keys: Arc<KeyManager>) -> Result<AuditLog, AuditError> {
        let head = match store.audit_last()? {
            None => (0, [0u8; 32], false),
            Some((seq, bytes)) => head_of(seq, &bytes)?,
        };
        Ok(AuditLog {
            store,
            keys,
            head: Arc::new(Mutex::new(head)),
        })
    }

    /// Appends an event on its own (not part of a unit of work), not yet durable:
    /// await [`AuditLog::durable`] (or use [`AuditLog::record`]) before answering.
    /// Sealed like a unit's record; a record that cannot be written does not move
    /// the head.
    pub fn append(&self, event: AuditEvent) -> Result<(), AuditError> {
        Ok(self.store.audit_event(&event, Arc::new(self.clone()))?)
    }

    /// Checks the trail's head against the anchor's keyed mark: its MAC verifies
    /// under the audit key, the record it names is still there byte for byte, and
    /// every later record chains from it and is MACed or inside a recorded sealed
    /// period. Run at start (when the keys are there) and at unseal. `Err` names
    /// what is wrong; the vault then refuses to go on (fail closed).
    pub fn verify_head(&self, key: &Key256) -> Result<HeadCheck, HeadError> {
        if self.store.damage().is_some() {
            // Already flagged loudly (damaged mode): records may be missing, the
            // keyed one among them. The SIEM's copy is the reference then.
            return Ok(HeadCheck::StoreDamaged);
        }
        let Some(mark) = self.store.audit_keyed_mark() else {
            // An anchor from before keyed marks, or one an operator reset with
            // `store reanchor` (audited): no keyed mark is expected, once.
            if self.store.audit_anchor_legacy() || self.store.reanchored_from().is_some() {
                return Ok(HeadCheck::NoKeyedMark);
            }
            // No keyed mark is genuine only while no record has ever been MACed.
            let mut from = 0;
            loop {
                let batch = self.store.audit_scan(from, 1000)?;
                let Some((last, _)) = batch.last() else { break };
                from = last + 1;
                for (seq, b) in batch {
                    let maced = decode_stored(&b).map_or(true, |r| r.mac.is_some());
                    if maced {
                        return Err(HeadError::AnchorReplaced(seq));
                    }
                }
            }
            return Ok(HeadCheck::NoKeyedMark);
        };
        use subtle::ConstantTimeEq;
        let rows = self.store.audit_scan(mark.seq, 1)?;
        let Some((seq, bytes)) = rows.into_iter().next().filter(|(s, _)| *s == mark.seq) else {
            return Err(HeadError::MarkMissing(mark.seq));
        };
        let expected = keyed_mark_mac(key, seq, &bytes);
        if !bool::from(expected.ct_eq(&mark.mac)) {
            return Err(HeadError::MarkMismatch(seq));
        }
        let first = decode_stored(&bytes).map_err(|_| HeadError::Corrupt(seq))?;
        let prev: [u8; 32] = hex::decode(&first.hash)
            .ok()
            .and_then(|h| h.try_into().ok())
            .ok_or(HeadError::Corrupt(seq))?;
        let mut verifier = Verifier::resume(Some(key.clone()), seq + 1, prev);
        let mut from = seq + 1;
        loop {
            let batch = self.store.audit_scan(from, 1000)?;
            let Some((last, _)) = batch.last() else { break };
            from = last + 1;
            for (s, b) in batch {
                match decode_stored(&b) {
                    Ok(rec) => verifier.push(&rec),
                    Err(_) => verifier.fail(s, "record is not a valid audit record"),
                }
            }
            if let Some((s, why)) = &verifier.report.first_broken {
                return Err(HeadError::Broken(*s, why.clone()));
            }
        }
        Ok(HeadCheck::Verified {
            keyed_seq: seq,
            after: verifier.report.records,
        })
    }

    /// Appends an event (on the blocking pool: the store write may do I/O) and
    /// waits until it is durable.
    pub async fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.append(event))
            .await
            .map_err(|_| AuditError::Store(StoreError::Backend("audit append task failed".into())))??;
        self.store.commit().await?;
        Ok(())
    }

    /// Waits until every record appended so far is durable.
    pub async fn durable(&self) -> Result<(), AuditError> {
        self.store.commit().await?;
        Ok(())
    }

    /// Records in order from `from`, at most `limit`.
    pub fn scan(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, AuditError> {
        self.store
            .audit_scan(from, limit)?
            .into_iter()
            .map(|(_, b)| decode_stored(&b).map_err(|_| AuditError::Corrupt))
            .collect()
    }

    fn checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        match self.store.audit_checkpoint()? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b).map(Some).map_err(|_| AuditError::Corrupt),
        }
    }

    /// A verifier positioned at the trail's start (after a retention checkpoint).
    fn start(&self) -> Result<(Verifier, u64), AuditError> {
        let key = self.keys.ring().map(|r| r.audit_key());
        Ok(match self.checkpoint()? {
            None => (Verifier::new(key), 1),
            Some(cp) => {
                let prev: [u8; 32] = hex::decode(&cp.hash)
                    .ok()
                    .and_then(|h| h.try_into().ok())
                    .ok_or(AuditError::Corrupt)?;
                (Verifier::resume(key, cp.seq + 1, prev), cp.seq + 1)
            }
        })
    }

    /// The first sequence number whose record is at or after `t` (binary search:
    /// records are appended in time order).
    pub fn first_at_or_after(&self, t: OffsetDateTime) -> Result<u64, AuditError> {
        let Some((last, _)) = self.store.audit_last()? else {
            return Ok(1);
        };
        let first = self.store.audit_scan(0, 1)?.first().map_or(1, |(s, _)| *s);
        let (mut lo, mut hi) = (first, last + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let at = match self.store.audit_scan(mid, 1)?.into_iter().next() {
                Some((_, b)) => decode_stored(&b)
                    .ok()
                    .and_then(|r| OffsetDateTime::parse(&r.at, &time::format_description::well_known::Rfc3339).ok()),
                None => None,
            };
            match at {
                Some(at) if at < t => lo = mid + 1,
                _ => hi = mid,
            }
        }
        Ok(lo)
    }

    /// Up to `limit` records from `from` as JSON lines (only `tenant`'s when
    /// given), and the cursor after them. Each line is the record's JSON, however
    /// it is stored.
    pub fn export_batch(
        &self,
        from: u64,
        limit: usize,
        tenant: Option<&str>,
    ) -> Result<(Vec<Vec<u8>>, u64), AuditError> {
        let batch = self.store.audit_scan(from, limit)?;
        let next = batch.last().map_or(from, |(s, _)| s + 1);
        let mut lines = Vec::with_capacity(batch.len());
        for (_, bytes) in batch {
            let rec = match decode_stored(&bytes) {
                Ok(rec) => rec,
                // JSON an earlier release stored that no longer parses goes out as it
                // is (as it always did): the SIEM's verifier names the broken record.
                Err(_) if tenant.is_none() && bytes.first() == Some(&b'{') => {
                    lines.push(bytes);
                    continue;
                }
                Err(_) => return Err(AuditError::Corrupt),
            };
            if tenant.is_none_or(|t| rec.tenant.as_deref() == Some(t)) {
                lines.push(serde_json::to_vec(&rec).map_err(|_| AuditError::Corrupt)?);
            }
        }
        Ok((lines, next))
    }

    /// Retention: removes records through `through` after checking that the trail
    /// verifies up to there and that `hash` is that record's chain hash (the SIEM
    /// proves it holds a verified export). The head is never removed.
    pub fn prune(&self, through: u64, hash: &str) -> Result<u64, PruneError> {
        let refused = |m: &str| Err(PruneError::Refused(m.to_owned()));
        let Some((last, _)) = self.store.audit_last().map_err(AuditError::from)? else {
            return refused("the audit trail is empty");
        };
        if through >= last {
            return refused("the newest audit record cannot be pruned");
        }
        let (mut verifier, mut from) = self.start()?;
        if through < from {
            return refused("those records were already pruned");
        }
        if verifier.key.is_none() {
            return refused("the vault is sealed: the trail's MACs cannot be checked");
        }
        let mut target = None;
        while from <= through {
            let batch = self.store.audit_scan(from, 1000).map_err(AuditError::from)?;
            let Some((l, _)) = batch.last() else { break };
            from = l + 1;
            for (seq, bytes) in batch {
                if seq > through {
                    break;
                }
                match decode_stored(&bytes) {
                    Ok(rec) => {
                        verifier.push(&rec);
                        if seq == through {
                            target = Some(rec.hash.clone());
                        }
                    }
                    Err(_) => verifier.fail(seq, "record is not a valid audit record"),
                }
            }
            if let Some((seq, why)) = &verifier.report.first_broken {
                return refused(&format!("the trail is broken at record {seq} ({why}); nothing pruned"));
            }
        }
        if verifier.report.unmaced_tail > 0 {
            return refused("the records to prune end inside a sealed period; prune through a MACed record");
        }
        match target {
            Some(h) if h.eq_ignore_ascii_case(hash) => {}
            Some(_) => return refused("hash is not the chain hash of that record in this trail"),
            None => return refused("no such record"),
        }
        let cp = serde_json::to_vec(&Checkpoint {
            seq: through,
            hash: hash.to_ascii_lowercase(),
        })
        .map_err(|_| AuditError::Corrupt)?;
        Ok(self.store.audit_prune(through, &cp).map_err(AuditError::from)?)
    }

    /// Verifies the whole stored trail (from the retention checkpoint, if any).
    pub fn verify_stored(&self) -> Result<VerifyReport, AuditError> {
        let (mut verifier, mut from) = self.start()?;
        loop {
            let batch = self.store.audit_scan(from, 1000)?;
            let Some((last, _)) = batch.last() else { break };
            from = last + 1;
            for (seq, bytes) in batch {
                match decode_stored(&bytes) {
                    Ok(rec) => verifier.push(&rec),
                    Err(_) => verifier.fail(seq, "record is not a valid audit record"),
                }
                if verifier.report.first_broken.is_some() {
                    return Ok(verifier.finish());
                }
            }
        }
        Ok(verifier.finish())
    }
}

/// What [`AuditLog::verify_head`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadCheck {
    /// No MACed record has been anchored yet (a new trail, or one written before
    /// keyed marks existed).
    NoKeyedMark,
    /// The keyed mark verifies and `after` later records chain from it.
    Verified { keyed_seq: u64, after: u64 },
    /// The store is damaged (records lost): not checked here.
    StoreDamaged,
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub records: u64,
    pub macs_checked: u64,
    /// The first broken link: (sequence number, reason).
    pub first_broken: Option<(u64, String)>,
    /// Records at the end written while sealed, not yet covered by a MAC.
    pub unmaced_tail: u64,
}

/// Checks records in order; stops at the first broken link.
pub struct Verifier {
    key: Option<Key256>,
    expected: u64,
    prev: [u8; 32],
    report: VerifyReport,
    /// Inside a sealed period (opened by a [`SEALED_PERIOD`] record).
    in_period: bool,
}

impl Verifier {
    /// `key` checks MACs; without it only the chain is checked.
    pub fn new(key: Option<Key256>) -> Verifier {
        Verifier::resume(key, 1, [0; 32])
    }

    /// Continues a trail at `seq`, after a record whose chain hash was `prev`
    /// (a retention checkpoint, or the last record of an earlier export).
    pub fn resume(key: Option<Key256>, seq: u64, prev: [u8; 32]) -> Verifier {
        Verifier {
            key,
            expected: seq,
            prev,
            report: VerifyReport::default(),
            // Resuming mid-trail (after a checkpoint or keyed mark, both MACed
            // records): not inside a period.
            in_period: false,
        }
    }

    /// A keyless (chain-only) verifier for a trail whose retention checkpoint, as
    /// the store keeps it, is `checkpoint` (`None`: the trail starts at 1).
    pub fn after_checkpoint(checkpoint: Option<&[u8]>) -> Option<Verifier> {
        let Some(bytes) = checkpoint else {
            return Some(Verifier::new(None));
        };
        let cp: Checkpoint = serde_json::from_slice(bytes).ok()?;
        let prev: [u8; 32] = hex::decode(&cp.hash).ok()?.try_into().ok()?;
        Some(Verifier::resume(None, cp.seq + 1, prev))
    }

    fn fail(&mut self, seq: u64, why: &str) {
        if self.report.first_broken.is_none() {
            self.report.first_broken = Some((seq, why.to_owned()));
        }
    }

    /// Checks the next record.
    pub fn push(&mut self, rec: &AuditRecord) {
        if self.report.first_broken.is_some() {
            return;
        }
        if rec.seq != self.expected {
            let why = if rec.seq > self.expected {
                format!(
                    "sequence jumps from {} to {} (records deleted)",
                    self.expected - 1,
                    rec.seq
                )
            } else {
                format!(
                    "sequence goes back to {} after {} (records inserted or reordered)",
                    rec.seq,
                    self.expected - 1
                )
            };
            return self.fail(rec.seq, &why);
        }
        if rec.prev != hex::encode(self.prev) {
            return self.fail(rec.seq, "does not link to the previous record");
        }
        let hash = rec.chain_hash(&self.prev);
        if rec.hash != hex::encode(hash) {
            return self.fail(rec.seq, "content does not match its hash (edited)");
        }
        match (&rec.mac, &self.key) {
            (Some(mac), Some(key)) => {
                let ok = hex::decode(mac).is_ok_and(|m| key.verify_hmac(&hash, &m).is_ok());
                if !ok {
                    return self.fail(rec.seq, "MAC does not verify (forged or recomputed)");
                }
                self.report.macs_checked += 1;
                self.report.unmaced_tail = 0;
                self.in_period = false;
            }
            (Some(_), None) => {
                self.report.unmaced_tail = 0;
                self.in_period = false;
            }
            (None, _) => {
                // A record without a MAC is genuine only inside a sealed period that
                // a record of its own opened; anywhere else its MAC was removed.
                if rec.action == SEALED_PERIOD {
                    self.in_period = true;
                } else if !self.in_period {
                    return self.fail(rec.seq, "no MAC outside a sealed period (MAC removed?)");
                }
                self.report.unmaced_tail += 1;
            }
        }
        self.prev = hash;
        self.expected += 1;
        self.report.records += 1;
    }

    pub fn finish(self) -> VerifyReport {
        self.report
    }
}

/// Verifies a sequence of records (e.g. an export).
pub fn verify<'a>(records: impl IntoIterator<Item = &'a AuditRecord>, key: Option<Key256>) -> VerifyReport {
    let mut v = Verifier::new(key);
    for r in records {
        v.push(r);
    }
    v.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(i: u32) -> AuditEvent {
        AuditEvent {
            action: "tokenize",
            outcome: "ok".into(),
            principal: Some("edge".into()),
            tenant: Some("default".into()),
            token: Some(format!("41111100{i:04}1112")),
            request_id: Some("0b7c6f2e-8f0e-4c55-9d1e-3c1b1c1d2e3f".into()),
            source: Some("10.0.0.7".into()),
            detail: None,
        }
    }

    /// A trail stored compactly, with a record an earlier release stored as JSON
    /// in its middle, verifies whole; the compact form is well under the JSON's size.
    #[test]
    fn compact_and_json_records_chain_and_verify_together() {
        let key = Key256::random();
        let mark = MarkKey::new(key.clone());
        let mut head = (0u64, [0u8; 32], false);
        let mut stored = Vec::new();
        for i in 0..6 {
            let a = prepare(&head, Some(&mark), event(i)).unwrap();
            // The keyed mark is computed on demand, over the record as stored.
            assert_eq!(a.keyed_mac(), Some(keyed_mark_mac(&key, a.seq, &a.record)));
            head = (a.seq, a.hash, false);
            stored.push(a.record);
        }
        let unkeyed = prepare(&head, None, event(6)).unwrap();
        assert_eq!(unkeyed.keyed_mac(), None);
        let json = serde_json::to_vec(&decode_stored(&stored[3]).unwrap()).unwrap();
        assert!(
            stored[3].len() * 10 < json.len() * 6,
            "compact {} bytes vs JSON {}",
            stored[3].len(),
            json.len()
        );
        stored[3] = json;
        let records: Vec<AuditRecord> = stored.iter().map(|b| decode_stored(b).unwrap()).collect();
        let report = verify(&records, Some(key.clone()));
        assert_eq!(report.first_broken, None);
        assert_eq!((report.records, report.macs_checked), (6, 6));

        // An edit to a compactly stored record breaks the chain where it is.
        let mut edited = records.clone();
        edited[4].principal = Some("someone-else".into());
        let again = decode_stored(&encode_stored(&edited[4]).unwrap()).unwrap();
        assert_eq!(again, edited[4]);
        edited[4] = again;
        assert_eq!(verify(&edited, Some(key)).first_broken.map(|(s, _)| s), Some(5));
    }

    #[test]
    fn bytes_that_are_not_a_record_are_refused() {
        for bad in [&[][..], &[STORED_V2], &[STORED_V2, 1, 2, 3], b"{\"seq\":1}", &[7, 1, 2]] {
            assert!(decode_stored(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        /// Whatever the fields hold, the compact form gives the same record back.
        #[test]
        fn the_compact_form_round_trips(
            seq in any::<u64>(),
            at in ".{0,40}",
            action in "[a-z._]{1,30}",
            fields in proptest::collection::vec(proptest::option::of(".{0,60}"), 6),
            hashes in any::<([u8; 32], [u8; 32], Option<[u8; 32]>)>(),
        ) {
            let rec = AuditRecord {
                seq,
                at,
                action,
                outcome: "ok".into(),
                principal: fields[0].clone(),
                tenant: fields[1].clone(),
                token: fields[2].clone(),
                request_id: fields[3].clone(),
                source: fields[4].clone(),
                detail: fields[5].clone(),
                prev: hex::encode(hashes.0),
                hash: hex::encode(hashes.1),
                mac: hashes.2.map(hex::encode),
            };
            let bytes = encode_stored(&rec).unwrap();
            prop_assert_eq!(bytes[0], STORED_V2);
            prop_assert_eq!(decode_stored(&bytes).unwrap(), rec);
        }
    }
}
