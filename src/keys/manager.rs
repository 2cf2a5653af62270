//! The live key state of a running vault: sealed or unsealed, the keyring in force,
//! and the keystore that officers change. Hot paths take a cheap read lock on the
//! keyring; key changes take the write lock, so a change (e.g. retiring a version
//! once no record uses it) cannot race with a record being sealed under it.

use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use super::Keyring;
use super::keystore::{DestroyRequest, KeyEvent, Keystore, KeystoreAt, KeystoreError, ProviderInfo};
use super::provider::{KeyProvider, SoftwareRoot};
use super::shares::{self, Share};

/// Why an unseal attempt did not unseal. Never includes share material.
#[derive(Debug, thiserror::Error)]
pub enum UnsealError {
    #[error("the vault is not sealed")]
    NotSealed,
    #[error("this keystore is not protected by custodian shares")]
    NotShamir,
    #[error("not a valid key share")]
    Malformed,
    #[error("a share with this index was already submitted")]
    Duplicate,
    #[error("the shares do not rebuild the root key; all submitted shares were discarded")]
    WrongShares,
    #[error(transparent)]
    Keystore(#[from] KeystoreError),
}

/// The vault is sealed: no key is available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the vault is sealed")]
pub struct Sealed;

/// Progress of an unseal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct UnsealProgress {
    pub sealed: bool,
    pub shares_received: u8,
    pub threshold: u8,
}

/// Where the vault keeps the highest keystore generation it has seen, outside the
/// keystore file (the store). `check` refuses an older keystore (a restored copy)
/// and records a newer one durably.
pub trait GenerationGuard: Send + Sync {
    fn check(&self, generation: u64) -> Result<(), KeystoreError>;
}

/// The vault's keys, sealed or unsealed.
/// A check run with the keyring before an unseal takes effect (the audit trail's
/// head, which can only be verified with a key); `Err` keeps the vault sealed.
pub type UnsealCheck = Arc<dyn Fn(&Keyring) -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send + Sync>;

pub struct KeyManager {
    guard: Mutex<Option<Arc<dyn GenerationGuard>>>,
    unseal_check: Mutex<Option<UnsealCheck>>,
    at: KeystoreAt,
    info: Mutex<ProviderInfo>,
    ring: RwLock<Option<Arc<Keyring>>>,
    keystore: Mutex<Option<Keystore>>,
    pending: Mutex<Vec<Share>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl KeyManager {
    /// An unsealed manager over an opened keystore.
    pub fn unsealed(keystore: Keystore) -> Result<KeyManager, KeystoreError> {
        let ring = Arc::new(keystore.keyring()?);
        Ok(KeyManager {
            guard: Mutex::new(None),
            unseal_check: Mutex::new(None),
            at: keystore.location().clone(),
            info: Mutex::new(keystore.provider_info().clone()),
            ring: RwLock::new(Some(ring)),
            keystore: Mutex::new(Some(keystore)),
            pending: Mutex::new(Vec::new()),
        })
    }

    /// A sealed manager: nothing can be decrypted until enough shares arrive.
    pub fn sealed(at: KeystoreAt) -> Result<KeyManager, KeystoreError> {
        let info = Keystore::peek(&at)?;
        Ok(KeyManager {
            guard: Mutex::new(None),
            unseal_check: Mutex::new(None),
            at,
            info: Mutex::new(info),
            ring: RwLock::new(None),
            keystore: Mutex::new(None),
            pending: Mutex::new(Vec::new()),
        })
    }

    /// Installs the rollback guard and checks the open keystore against it (while
    /// sealed, the check runs at unseal, once the keystore is authenticated).
    pub fn set_generation_guard(&self, guard: Arc<dyn GenerationGuard>) -> Result<(), KeystoreError> {
        if let Some(ks) = lock(&self.keystore).as_ref() {
            guard.check(ks.generation())?;
        }
        *lock(&self.guard) = Some(guard);
        Ok(())
    }

    /// Installs the check that runs with the keyring before an unseal takes effect.
    pub fn set_unseal_check(&self, check: UnsealCheck) {
        *lock(&self.unseal_check) = Some(check);
    }

    fn check_generation(&self, generation: u64) -> Result<(), KeystoreError> {
        match lock(&self.guard).as_ref() {
            Some(g) => g.check(generation),
            None => Ok(()),
        }
    }

    /// The keystore as stored (KEKs wrapped by the root, MACed), for a backup.
    pub fn keystore_bytes(&self) -> Result<zeroize::Zeroizing<Vec<u8>>, KeystoreError> {
        self.at.read_bytes().map(zeroize::Zeroizing::new)
    }

    /// The keyring in force, or `None` while sealed.
    pub fn ring(&self) -> Option<Arc<Keyring>> {
        self.read().clone()
    }

    /// Holds the keyring steady while a record is sealed and stored under it.
    pub fn read(&self) -> RwLockReadGuard<'_, Option<Arc<Keyring>>> {
        self.ring.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_sealed(&self) -> bool {
        self.read().is_none()
    }

    pub fn provider_info(&self) -> ProviderInfo {
        lock(&self.info).clone()
    }

    pub fn events(&self) -> Vec<KeyEvent> {
        lock(&self.keystore)
            .as_ref()
            .map(|k| k.events().to_vec())
            .unwrap_or_default()
    }

    /// Destroy requests awaiting a second officer (from the keystore in force).
    pub fn destroy_requests(&self, window: time::Duration) -> Vec<DestroyRequest> {
        lock(&self.keystore)
            .as_ref()
            .map(|k| k.destroy_requests(time::OffsetDateTime::now_utc(), window))
            .unwrap_or_default()
    }

    /// The open export requests (lapsed ones left out).
    pub fn export_requests(&self, window: time::Duration) -> Vec<crate::keys::keystore::ExportRequest> {
        lock(&self.keystore)
            .as_ref()
            .map(|k| k.export_requests(time::OffsetDateTime::now_utc(), window))
            .unwrap_or_default()
    }

    /// Runs a keystore change under the keyring's write lock: `check` sees the
    /// current keyring first (and may refuse), then `change` edits and saves the
    /// keystore, then the new keyring takes effect for every later request.
    pub fn update<R, E>(
        &self,
        check: impl FnOnce(&Keyring) -> Result<(), E>,
        change: impl FnOnce(&mut Keystore) -> Result<R, KeystoreError>,
    ) -> Result<R, E>
    where
        E: From<KeystoreError> + From<Sealed>,
    {
        let mut ring = self.ring.write().unwrap_or_else(|p| p.into_inner());
        let mut ks_guard = lock(&self.keystore);
        // Another replica sharing the keystore may have changed it since: build on
        // its generation, never over it.
        if let Some(ks) = ks_guard.as_mut() {
            let newer = ks.reopen()?;
            if newer.generation() > ks.generation() {
                self.check_generation(newer.generation())?;
                *ring = Some(Arc::new(newer.keyring()?));
                *ks = newer;
            }
        }
        let (Some(current), Some(ks)) = (ring.as_ref(), ks_guard.as_mut()) else {
            return Err(Sealed.into());
        };
        check(current)?;
        let out = change(ks)?;
        self.check_generation(ks.generation())?;
        *ring = Some(Arc::new(ks.keyring()?));
        *lock(&self.info) = ks.provider_info().clone();
        Ok(out)
    }

    /// Takes a newer keystore generation written by another process sharing the
    /// keystore (a vault replica): the rollback guard checks it, then its keyring
    /// takes effect for every later request. Returns the generation taken, if any.
    /// While sealed there is nothing to refresh (unseal reads the file).
    pub fn refresh(&self) -> Result<Option<u64>, KeystoreError> {
        let (current, claimed) = match lock(&self.keystore).as_ref() {
            Some(ks) => (ks.generation(), ks.stored_generation()?),
            None => return Ok(None),
        };
        // Cheap check first (no unwrap through the root of trust unless it changed).
        if claimed <= current {
            return Ok(None);
        }
        let Some(newer) = lock(&self.keystore).as_ref().map(Keystore::reopen).transpose()? else {
            return Ok(None);
        };
        if newer.generation() <= current {
            return Ok(None);
        }
        self.check_generation(newer.generation())?;
        let ring = Arc::new(newer.keyring()?);
        let mut ring_guard = self.ring.write().unwrap_or_else(|p| p.into_inner());
        let mut ks_guard = lock(&self.keystore);
        if ks_guard.as_ref().is_none_or(|ks| ks.generation() >= newer.generation()) {
            return Ok(None);
        }
        let generation = newer.generation();
        *lock(&self.info) = newer.provider_info().clone();
        *ks_guard = Some(newer);
        *ring_guard = Some(ring);
        Ok(Some(generation))
    }

    /// Accepts one custodian share; unseals once the threshold is reached and the
    /// rebuilt root opens the keystore. Wrong shares discard every pending share.
    pub fn submit_share(&self, text: &str) -> Result<UnsealProgress, UnsealError> {
        let share = Share::parse(text).map_err(|_| UnsealError::Malformed)?;
        let info = self.provider_info();
        let shamir = info.shamir.ok_or(UnsealError::NotShamir)?;
        if !self.is_sealed() {
            return Err(UnsealError::NotSealed);
        }
        let mut pending = lock(&self.pending);
        if pending.iter().any(|s| s.index() == share.index()) {
            return Err(UnsealError::Duplicate);
        }
        pending.push(share);
        let received = pending.len() as u8;
        if received < shamir.threshold {
            return Ok(UnsealProgress {
                sealed: true,
                shares_received: received,
                threshold: shamir.threshold,
            });
        }
        let attempt = shares::combine(&pending, shamir.threshold)
            .ok()
            .map(|root| Arc::new(SoftwareRoot::new(&root, info.root_id.clone())) as Arc<dyn KeyProvider>)
            .and_then(|provider| Keystore::open(&self.at, provider).ok());
        pending.clear();
        let Some(keystore) = attempt else {
            return Err(UnsealError::WrongShares);
        };
        self.check_generation(keystore.generation())?;
        let ring = Arc::new(keystore.keyring()?);
        if let Some(check) = lock(&self.unseal_check).clone() {
            check(&ring).map_err(|e| {
                // The refusal reaches the officer as one line: the check's error and its causes.
                let mut why = format!("unseal refused: {e}");
                let mut cause = e.source();
                while let Some(c) = cause {
                    why.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                KeystoreError::Refused(why)
            })?;
        }
        *lock(&self.keystore) = Some(keystore);
        *self.ring.write().unwrap_or_else(|p| p.into_inner()) = Some(ring);
        Ok(UnsealProgress {
            sealed: false,
            shares_received: received,
            threshold: shamir.threshold,
        })
    }

    /// Shares received so far while sealed.
    pub fn unseal_progress(&self) -> UnsealProgress {
        let threshold = self.provider_info().shamir.map_or(0, |s| s.threshold);
        UnsealProgress {
            sealed: self.is_sealed(),
            shares_received: lock(&self.pending).len() as u8,
            threshold,
        }
    }
}
