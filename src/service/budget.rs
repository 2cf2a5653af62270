//! The random-nonce budget of each KEK version. DEKs are wrapped under a KEK with
//! AES-256-GCM and random 96-bit nonces; NIST SP 800-38D bounds such a key at
//! 2^32 encryptions. The vault counts every wrap per version (tokenize, rewrap),
//! keeps the count durable by reserving it in blocks ahead of use (so a crash can
//! only over-count), and rotates the KEK once the active version reaches its limit
//! (2^31 by default: half the bound). Readiness checks spend none of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::store::{Store, StoreError};

/// Default limit: half of SP 800-38D's 2^32 random-nonce bound.
pub(super) const DEFAULT_LIMIT: u64 = crate::config::DEFAULT_KEK_WRAP_LIMIT;
/// Wraps reserved durably at a time.
const BLOCK: u64 = 10_000;

/// Per-version wrap counters backed by the store.
pub(super) struct WrapBudget {
    store: Arc<dyn Store>,
    limit: u64,
    /// version → (counted, durably reserved)
    counts: Mutex<HashMap<u32, (u64, u64)>>,
}

impl WrapBudget {
    pub(super) fn new(store: Arc<dyn Store>, limit: u64) -> WrapBudget {
        WrapBudget {
            store,
            limit: limit.max(1),
            counts: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn limit(&self) -> u64 {
        self.limit
    }

    /// Counts `n` wraps under `version` (reserving durably first when the block
    /// is spent); returns the version's count. Blocking: may write the store.
    pub(super) fn count(&self, version: u32, n: u64) -> Result<u64, StoreError> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let entry = match counts.get_mut(&version) {
            Some(e) => e,
            None => {
                // After a restart every reserved wrap counts as spent (conservative).
                let reserved = self.store.kek_wraps(version)?;
                counts.entry(version).or_insert((reserved, reserved))
            }
        };
        let next = entry.0 + n;
        if next > entry.1 {
            let reserved = next + BLOCK;
            // Written before the record that spends it; the same (or an earlier)
            // group commit makes both durable, in order.
            self.store.set_kek_wraps(version, reserved)?;
            entry.1 = reserved;
        }
        entry.0 = next;
        Ok(next)
    }

    /// [`WrapBudget::count`] without touching the store: `None` when the version's
    /// count is not loaded yet or its reserved block is spent (then call `count` off
    /// the async workers). Never blocks on I/O.
    pub(super) fn try_count(&self, version: u32, n: u64) -> Option<u64> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let entry = counts.get_mut(&version)?;
        let next = entry.0 + n;
        if next > entry.1 {
            return None;
        }
        entry.0 = next;
        Some(next)
    }

    /// The counts seen so far (for metrics and `keys status`), loading unknown
    /// versions from the store.
    pub(super) fn snapshot(&self, versions: &[u32]) -> Result<Vec<(u32, u64)>, StoreError> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(versions.len());
        for v in versions {
            let n = match counts.get(v) {
                Some((n, _)) => *n,
                None => {
                    let reserved = self.store.kek_wraps(*v)?;
                    counts.insert(*v, (reserved, reserved));
                    reserved
                }
            };
            out.push((*v, n));
        }
        Ok(out)
    }

    /// Whether `version` has reached its limit.
    pub(super) fn exhausted(&self, version: u32) -> Result<bool, StoreError> {
        Ok(self
            .snapshot(&[version])?
            .first()
            .is_some_and(|(_, n)| *n >= self.limit))
    }
}
