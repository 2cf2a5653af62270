//! `tokenvault store copy`: a stopped sled vault's store into PostgreSQL.
//!
//! Everything the store holds comes along as it is (records byte for byte, the
//! fingerprint entries that name them, charges, idempotency entries, the audit
//! trail with its sequence numbers, keyed mark and retention checkpoint, the
//! keystore generation and the wrap budgets), so the audit chain verifies on the
//! copy and every envelope opens under the same keys. The keystore file moves into
//! the database first ([`copy_keystore`]), byte for byte (its MAC still verifies).
//! Every import is idempotent: a copy killed midway is run again and carries on.

use super::{ChargeRecord, PgStore, SledStore, Store, StoreError};
use crate::keys::Keyring;
use crate::keys::keystore::{KeystoreAt, KeystoreError};

/// Places the source's keystore in the target (first, before any record: a target
/// that holds another vault's keystore is refused before anything is written).
/// `Ok(true)`: copied now; `Ok(false)`: the same keystore was there already.
pub fn copy_keystore(src: &KeystoreAt, dst: &KeystoreAt) -> Result<bool, KeystoreError> {
    let bytes = src.read_bytes()?;
    if dst.exists()? {
        if dst.read_bytes()? == bytes {
            return Ok(false);
        }
        return Err(KeystoreError::Refused(format!(
            "{dst} already holds a different keystore (another vault's, or one changed since an earlier \
             copy): refusing to mix two vaults"
        )));
    }
    dst.write_new(&bytes)?;
    Ok(true)
}

/// What a copy did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CopyReport {
    /// Records in the source (its version index).
    pub records: u64,
    /// Of those, stored by this run (the rest were there from an earlier run).
    pub new_records: u64,
    /// Records opened with the keys (0 when no keys were given).
    pub opened: u64,
    pub charges: u64,
    pub idempotency: u64,
    pub audit_records: u64,
}

/// Which part is being copied, and how far (for a progress bar).
pub enum Progress {
    Records { done: u64, total: u64 },
    Rest(&'static str),
}

const BATCH: usize = 1000;

/// Copies `src` into `dst`. With `ring`, every record is opened before it is
/// copied (a record that does not open stops the copy). The source must not be
/// damaged; the target must be empty or an earlier copy of this source.
pub fn copy(
    src: &SledStore,
    dst: &PgStore,
    ring: Option<&Keyring>,
    mut progress: impl FnMut(Progress),
) -> Result<CopyReport, StoreError> {
    if let Some(damage) = src.damage() {
        return Err(StoreError::Backend(format!(
            "the source store is damaged ({damage}): restore it first"
        )));
    }
    let mut report = CopyReport::default();
    let versions = src.count_by_version()?;
    report.records = versions.values().sum();
    let mut done = 0;
    for &version in versions.keys() {
        let mut after = None;
        loop {
            let batch = src.records_under_version(version, after.as_ref(), BATCH)?;
            let Some(last) = batch.last() else { break };
            after = Some(last.token.clone());
            for r in &batch {
                if let Some(ring) = ring {
                    ring.open(&r.tenant, &r.token, &r.metadata_binding(), &r.sealed)
                        .map_err(|_| {
                            StoreError::Backend(format!(
                                "a record under KEK v{} does not open with these keys: nothing after it was copied",
                                r.sealed.key_version
                            ))
                        })?;
                    report.opened += 1;
                }
                let indexed = src.find_fingerprint(&r.tenant, &r.fingerprint)?.as_ref() == Some(&r.token);
                let used = src.last_used(&r.tenant, &r.token)?;
                report.new_records += u64::from(dst.import_record(r, indexed, used)?);
            }
            done += batch.len() as u64;
            progress(Progress::Records {
                done,
                total: report.records,
            });
        }
    }
    progress(Progress::Rest("charges"));
    let mut after: Option<String> = None;
    loop {
        let batch: Vec<ChargeRecord> = src.charges_after(after.as_deref(), BATCH)?;
        let Some(last) = batch.last() else { break };
        after = Some(last.id.clone());
        for c in &batch {
            dst.update_charge(c)?;
            report.charges += 1;
        }
    }
    progress(Progress::Rest("idempotency entries"));
    let mut after: Option<[u8; 32]> = None;
    loop {
        let batch = src.idempotency_after(after.as_ref(), BATCH)?;
        let Some((last, _)) = batch.last() else { break };
        after = Some(*last);
        for (key, idem) in &batch {
            dst.import_idempotency(key, idem)?;
            report.idempotency += 1;
        }
    }
    progress(Progress::Rest("audit trail"));
    let mut from = 0;
    loop {
        let batch = src.audit_scan(from, BATCH)?;
        let Some((last, _)) = batch.last() else { break };
        from = last + 1;
        dst.import_audit(&batch)?;
        report.audit_records += batch.len() as u64;
    }
    dst.import_marks(src.audit_keyed_mark(), src.audit_checkpoint()?)?;
    progress(Progress::Rest("key metadata"));
    let generation = src.keystore_generation()?;
    if generation > dst.keystore_generation()? {
        dst.set_keystore_generation(generation)?;
    }
    // Wrap budgets per KEK version: the keyring's versions, or every plausible one.
    let known: Vec<u32> = match ring {
        Some(r) => r.versions().iter().map(|v| v.version).collect(),
        None => (1..=1024).collect(),
    };
    for v in known {
        let w = src.kek_wraps(v)?;
        if w > dst.kek_wraps(v)? {
            dst.set_kek_wraps(v, w)?;
        }
    }
    verify(src, dst, &report)?;
    Ok(report)
}

/// The copy holds what the source holds: the same records per KEK version, the
/// same audit head, every charge.
fn verify(src: &SledStore, dst: &PgStore, report: &CopyReport) -> Result<(), StoreError> {
    let (a, b) = (src.count_by_version()?, dst.count_by_version()?);
    if a != b {
        return Err(StoreError::Backend(format!(
            "verification failed: records per KEK version differ (source {a:?}, copy {b:?})"
        )));
    }
    if src.audit_last()? != dst.audit_last()? {
        return Err(StoreError::Backend(
            "verification failed: the audit trails end differently".into(),
        ));
    }
    let mut missing = 0;
    let mut after: Option<String> = None;
    loop {
        let batch = src.charges_after(after.as_deref(), BATCH)?;
        let Some(last) = batch.last() else { break };
        after = Some(last.id.clone());
        for c in &batch {
            let tenant = crate::domain::tenant::TenantId::parse(&c.tenant).ok_or(StoreError::Corrupt)?;
            if dst.get_charge(&tenant, &c.id)?.as_ref() != Some(c) {
                missing += 1;
            }
        }
    }
    if missing > 0 {
        return Err(StoreError::Backend(format!(
            "verification failed: {missing} of {} charges differ",
            report.charges
        )));
    }
    Ok(())
}
