//! Key administration: status, rotation, rewrap, retirement and destruction under
//! dual control (PCI DSS 3.6/3.7). Every change goes through the key manager's
//! write lock, so it cannot race with a record being sealed.

use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;

use super::{Vault, VaultError};
use crate::domain::token::Token;
use crate::keys::KeyState;
use crate::keys::keystore::{KeyEvent, KeystoreError, Shamir};
use crate::keys::manager::UnsealProgress;

/// How long a destroy request waits for its second officer.
const APPROVAL_WINDOW: time::Duration = time::Duration::hours(1);

/// Records a rewrap reads per step of its cursor.
pub(super) const REWRAP_CHUNK: usize = 512;

/// Who the deletion epoch's key operations are recorded as.
pub const EPOCH_OFFICER: &str = "system:deletion-epoch";

/// What one deletion-epoch step did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EpochStep {
    pub rotated_to: Option<u32>,
    pub rewrapped: u64,
    pub destroyed: Vec<u32>,
}

pub(super) struct AdminState {
    cryptoperiod: Option<Duration>,
    /// Where the last rewrap call stopped, per decrypt-only version (the last token
    /// it read), so the next call goes on from there instead of reading again the
    /// records already moved.
    rewrap_cursors: std::sync::Mutex<std::collections::BTreeMap<u32, Token>>,
}

impl AdminState {
    pub(super) fn new(cryptoperiod: Option<Duration>) -> AdminState {
        AdminState {
            cryptoperiod,
            rewrap_cursors: std::sync::Mutex::default(),
        }
    }

    fn cursors(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u32, Token>> {
        self.rewrap_cursors.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One KEK version as officers see it.
#[derive(Debug, Clone, Serialize)]
pub struct VersionStatus {
    pub version: u32,
    pub state: KeyState,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub age_secs: u64,
    /// Active past its cryptoperiod.
    pub overdue: bool,
    /// Records whose DEK is wrapped under this version.
    pub records: u64,
}

/// A destroy request waiting for a second officer.
#[derive(Debug, Clone, Serialize)]
pub struct PendingDestroy {
    pub version: u32,
    pub requested_by: String,
}

/// Everything `tokenvault keys status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct KeyStatus {
    pub sealed: bool,
    pub provider: String,
    pub root_id: String,
    pub shamir: Option<Shamir>,
    pub unseal: UnsealProgress,
    pub active: Option<u32>,
    pub cryptoperiod_secs: Option<u64>,
    pub versions: Vec<VersionStatus>,
    pub pending_destroy: Vec<PendingDestroy>,
    pub events: Vec<KeyEvent>,
}

/// Result of one rewrap batch.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RewrapProgress {
    pub rewrapped: u64,
    /// Records still wrapped under a non-active version that rewrap can move.
    pub remaining: u64,
    /// Records that failed to open (integrity) and were left as they are.
    pub failed: u64,
}

/// What a destroy call did.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum DestroyOutcome {
    /// Recorded; a second, different officer must approve.
    PendingApproval { version: u32, requested_by: String },
    /// Crypto-shredded, with both officers recorded.
    Destroyed {
        version: u32,
        requested_by: String,
        approved_by: String,
    },
}

impl Vault {
    /// Key versions, states, ages and record counts.
    pub async fn key_status(&self) -> Result<KeyStatus, VaultError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.key_status_blocking())
            .await
            .map_err(|_| VaultError::Task)?
    }

    fn key_status_blocking(&self) -> Result<KeyStatus, VaultError> {
        let info = self.keys.provider_info();
        let counts = self.store.count_by_version()?;
        let now = OffsetDateTime::now_utc();
        let ring = self.keys.ring();
        let versions = ring
            .as_ref()
            .map(|r| r.versions())
            .unwrap_or_default()
            .into_iter()
            .map(|v| {
                let age = (now - v.created_at).max(time::Duration::ZERO);
                let age_secs = age.whole_seconds().max(0) as u64;
                let overdue =
                    v.state == KeyState::Active && self.admin.cryptoperiod.is_some_and(|p| age_secs >= p.as_secs());
                VersionStatus {
                    version: v.version,
                    state: v.state,
                    created_at: v.created_at,
                    age_secs,
                    overdue,
                    records: counts.get(&v.version).copied().unwrap_or(0),
                }
            })
            .collect();
        let pending_destroy = self
            .keys
            .destroy_requests(APPROVAL_WINDOW)
            .into_iter()
            .map(|r| PendingDestroy {
                version: r.version,
                requested_by: r.requested_by,
            })
            .collect();
        Ok(KeyStatus {
            sealed: ring.is_none(),
            provider: info.kind,
            root_id: info.root_id,
            shamir: info.shamir,
            unseal: self.keys.unseal_progress(),
            active: ring.as_ref().map(|r| r.active_version()),
            cryptoperiod_secs: self.admin.cryptoperiod.map(|p| p.as_secs()),
            versions,
            pending_destroy,
            events: self.keys.events(),
        })
    }

    /// A new KEK version becomes active at once; the old one becomes decrypt-only.
    pub async fn rotate_key(&self, officer: &str) -> Result<u32, VaultError> {
        let (this, officer) = (self.clone(), officer.to_owned());
        tokio::task::spawn_blocking(move || {
            this.keys
                .update(|_| Ok::<(), VaultError>(()), |ks| ks.rotate(&[&officer]))
        })
        .await
        .map_err(|_| VaultError::Task)?
    }

    /// Rotates when the active KEK is older than the cryptoperiod.
    pub async fn rotate_if_due(&self) -> Result<Option<u32>, VaultError> {
        let Some(period) = self.admin.cryptoperiod else {
            return Ok(None);
        };
        let Some(ring) = self.keys.ring() else { return Ok(None) };
        let now = OffsetDateTime::now_utc();
        let due = ring
            .versions()
            .iter()
            .any(|v| v.state == KeyState::Active && (now - v.created_at).whole_seconds() >= period.as_secs() as i64);
        if !due {
            return Ok(None);
        }
        self.rotate_key("auto-rotation (cryptoperiod)").await.map(Some)
    }

    /// Rewraps up to `limit` DEKs from older versions under the active KEK,
    /// durably: [`REWRAP_CHUNK`] records per step, each compare-and-swapped, one
    /// durable wait for the call. Payloads are not touched. Idempotent and resumable.
    pub async fn rewrap_batch(&self, limit: usize) -> Result<RewrapProgress, VaultError> {
        let this = self.clone();
        let progress = tokio::task::spawn_blocking(move || this.rewrap_blocking(limit.max(1)))
            .await
            .map_err(|_| VaultError::Task)??;
        self.store.commit().await?;
        Ok(progress)
    }

    fn rewrap_blocking(&self, limit: usize) -> Result<RewrapProgress, VaultError> {
        let ring = self.keys.ring().ok_or(VaultError::Sealed)?;
        let movable: Vec<u32> = ring
            .versions()
            .iter()
            .filter(|v| v.state == KeyState::DecryptOnly)
            .map(|v| v.version)
            .collect();
        let mut progress = RewrapProgress::default();
        let mut budget = limit;
        for version in &movable {
            // A cursor in token order, kept across calls. No record is ever sealed
            // again under a decrypt-only version, so none appears behind it. A call
            // that started mid-way and reaches the end goes round once more from the
            // beginning, for the records a concurrent change kept back; a record
            // that fails to open is counted once per call.
            let mut after: Option<Token> = self.admin.cursors().get(version).cloned();
            let mut may_go_round = after.is_some();
            let mut failed = std::collections::HashSet::new();
            while budget > 0 {
                let want = budget.min(REWRAP_CHUNK);
                let batch = self.store.records_under_version(*version, after.as_ref(), want)?;
                let reached_end = batch.len() < want;
                after = if reached_end {
                    None
                } else {
                    batch.last().map(|r| r.token.clone())
                };
                budget = budget.saturating_sub(batch.len());
                let mut moves = Vec::with_capacity(batch.len());
                for record in batch {
                    match ring.rewrap(&record.tenant, &record.token, &record.sealed) {
                        Ok(sealed) => moves.push((record, sealed)),
                        Err(_) => {
                            if failed.insert(record.token.clone()) {
                                progress.failed += 1;
                                tracing::error!(token = %record.token, version, "rewrap: record failed to open; left as is");
                            }
                        }
                    }
                }
                if let Some((_, sealed)) = moves.first() {
                    self.budget.count(sealed.key_version, moves.len() as u64)?;
                }
                // A record changed meanwhile keeps its envelope and is moved by a later pass.
                progress.rewrapped += self.store.replace_sealed(&moves)?;
                if reached_end && !std::mem::take(&mut may_go_round) {
                    break;
                }
            }
            match after {
                Some(t) => self.admin.cursors().insert(*version, t),
                None => self.admin.cursors().remove(version),
            };
        }
        let counts = self.store.count_by_version()?;
        progress.remaining = movable
            .iter()
            .map(|v| counts.get(v).copied().unwrap_or(0))
            .sum::<u64>()
            .saturating_sub(progress.failed);
        Ok(progress)
    }

    /// Retires a decrypt-only version, refusing while any record is wrapped under it.
    pub async fn retire_key(&self, version: u32, officer: &str) -> Result<(), VaultError> {
        let (this, officer) = (self.clone(), officer.to_owned());
        tokio::task::spawn_blocking(move || {
            this.keys
                .update(|_| this.require_unused(version), |ks| ks.retire(version, &[&officer]))
        })
        .await
        .map_err(|_| VaultError::Task)?
    }

    /// Dual control: the first officer's call records a request; a second,
    /// different officer's call approves and crypto-shreds the version.
    pub async fn destroy_key(&self, version: u32, officer: &str) -> Result<DestroyOutcome, VaultError> {
        let (this, officer) = (self.clone(), officer.to_owned());
        tokio::task::spawn_blocking(move || this.destroy_blocking(version, &officer))
            .await
            .map_err(|_| VaultError::Task)?
    }

    fn destroy_blocking(&self, version: u32, officer: &str) -> Result<DestroyOutcome, VaultError> {
        let ring = self.keys.ring().ok_or(VaultError::Sealed)?;
        let state = ring.versions().iter().find(|v| v.version == version).map(|v| v.state);
        match state {
            None => return Err(VaultError::KeyRefused(format!("no key version v{version}"))),
            Some(KeyState::Retired) => {}
            Some(KeyState::Destroyed) => {
                return Err(VaultError::KeyRefused(format!("v{version} is already destroyed")));
            }
            Some(_) => {
                return Err(VaultError::KeyRefused(format!(
                    "v{version} must be retired before it is destroyed"
                )));
            }
        }
        self.require_unused(version)?;
        // The request lives in the keystore (shared by every replica, under its
        // MAC): the approval may come through another replica than the request.
        self.keys.update(
            |_| self.require_unused(version),
            |ks| {
                let now = OffsetDateTime::now_utc();
                let request = ks
                    .destroy_requests(now, APPROVAL_WINDOW)
                    .into_iter()
                    .find(|r| r.version == version);
                match request {
                    None => {
                        ks.request_destroy(version, officer, now, APPROVAL_WINDOW)?;
                        Ok(DestroyOutcome::PendingApproval {
                            version,
                            requested_by: officer.to_owned(),
                        })
                    }
                    Some(r) if r.requested_by == officer => Err(KeystoreError::Refused(format!(
                        "dual control: v{version}'s destruction was requested by {officer}; a different officer \
                         must approve"
                    ))),
                    Some(r) => {
                        ks.destroy(version, &[&r.requested_by, officer])?;
                        Ok(DestroyOutcome::Destroyed {
                            version,
                            requested_by: r.requested_by,
                            approved_by: officer.to_owned(),
                        })
                    }
                }
            },
        )
    }

    /// One step of the deletion epoch (a bound on how long a deleted card stays
    /// recoverable from the data directory): once the active KEK is older than
    /// `epoch` it is rotated; then every live record is rewrapped under the new
    /// version, and each older version that no longer wraps any record is retired
    /// and destroyed. A deleted card's envelope (still in the store's log until it
    /// is compacted away) was wrapped under such an older version, so it can no
    /// longer be opened: deletion is real within two epochs. Destroying a version
    /// that wraps no live record needs no second officer (nothing live depends on
    /// it); the schedule itself is the officers' configuration. Audited by the caller.
    pub async fn deletion_epoch_step(&self, epoch: Duration) -> Result<EpochStep, VaultError> {
        let mut step = EpochStep::default();
        let Some(ring) = self.keys.ring() else {
            return Ok(step);
        };
        let now = OffsetDateTime::now_utc();
        let due = ring
            .versions()
            .iter()
            .any(|v| v.state == KeyState::Active && (now - v.created_at).whole_seconds() >= epoch.as_secs() as i64);
        if due {
            step.rotated_to = Some(self.rotate_key(EPOCH_OFFICER).await?);
        }
        let pending_old = self.keys.ring().is_some_and(|r| {
            r.versions()
                .iter()
                .any(|v| matches!(v.state, KeyState::DecryptOnly | KeyState::Retired))
        });
        if !pending_old {
            return Ok(step);
        }
        loop {
            let progress = self.rewrap_batch(1000).await?;
            step.rewrapped += progress.rewrapped;
            if progress.remaining == 0 || progress.rewrapped == 0 {
                break;
            }
        }
        let Some(ring) = self.keys.ring() else {
            return Ok(step);
        };
        let old: Vec<u32> = ring
            .versions()
            .iter()
            .filter(|v| matches!(v.state, KeyState::DecryptOnly | KeyState::Retired))
            .map(|v| v.version)
            .collect();
        for version in old {
            let this = self.clone();
            let shredded = tokio::task::spawn_blocking(move || -> Result<bool, VaultError> {
                if this.store.count_by_version()?.get(&version).copied().unwrap_or(0) > 0 {
                    return Ok(false);
                }
                this.keys.update(
                    |ring| {
                        this.require_unused(version)?;
                        match ring.versions().iter().find(|v| v.version == version).map(|v| v.state) {
                            Some(KeyState::DecryptOnly | KeyState::Retired) => Ok(()),
                            _ => Err(VaultError::KeyRefused(format!("v{version} changed meanwhile"))),
                        }
                    },
                    |ks| {
                        if ks
                            .keyring()?
                            .versions()
                            .iter()
                            .any(|v| v.version == version && v.state == KeyState::DecryptOnly)
                        {
                            ks.retire(version, &[EPOCH_OFFICER])?;
                        }
                        ks.destroy(version, &[EPOCH_OFFICER])
                    },
                )?;
                Ok(true)
            })
            .await
            .map_err(|_| VaultError::Task)??;
            if shredded {
                step.destroyed.push(version);
            }
        }
        Ok(step)
    }

    fn require_unused(&self, version: u32) -> Result<(), VaultError> {
        // Records sealed under it but not yet stored count too.
        let n = self.store.count_by_version()?.get(&version).copied().unwrap_or(0) + self.sealing.in_flight(version);
        if n > 0 {
            return Err(VaultError::KeyRefused(format!(
                "v{version} still wraps {n} record(s); run `tokenvault keys rewrap` first"
            )));
        }
        Ok(())
    }
}

impl Vault {
    /// Moves every keystore key under a new HSM key (PKCS#11 root rotation).
    pub async fn rotate_root(
        &self,
        hsm: crate::config::Pkcs11Settings,
        key_label: String,
        officer: &str,
    ) -> Result<String, VaultError> {
        let (this, officer) = (self.clone(), officer.to_owned());
        tokio::task::spawn_blocking(move || {
            this.keys.update(
                |_| Ok::<(), VaultError>(()),
                |ks| {
                    if ks.provider_info().kind != "pkcs11" {
                        return Err(crate::keys::keystore::KeystoreError::Refused(
                            "rotate-root needs the pkcs11 provider".into(),
                        ));
                    }
                    let old = ks.provider_info().root_id.clone();
                    let provider = crate::keys::open_pkcs11(&hsm, &key_label, true)?;
                    let id = provider.root_id();
                    ks.change_provider(provider, &[&officer])?;
                    // The keystore is saved under the new key: nothing depends on the
                    // old one any more, except old keystore copies, which must not
                    // open again (they hold destroyed KEKs). Destroy it in the HSM.
                    if old != id {
                        crate::keys::pkcs11::destroy_root_key(&hsm, &old).map_err(KeystoreError::from)?;
                    }
                    Ok(id)
                },
            )
        })
        .await
        .map_err(|_| VaultError::Task)?
    }
}
