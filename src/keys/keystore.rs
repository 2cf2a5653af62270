//! The keystore file: every KEK version, the index key and the keystore's own MAC
//! key, each wrapped by the [`KeyProvider`] (the root of trust), plus the key
//! lifecycle history and the destroy requests awaiting a second officer. An HMAC
//! over the whole body (under the MAC key, which only the root can unwrap) makes a
//! keystore edited on disk or in the database — a key substituted, a version
//! relabelled, a state changed, an event removed, a request forged — fail at load.
//!
//! It lives in a file ([`KeystoreAt::File`]: one vault over sled) or in the shared
//! database ([`KeystoreAt::Shared`]: every PostgreSQL replica sees one keystore;
//! each save is a compare-and-set on its generation, so two replicas changing keys
//! at once cannot overwrite each other).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::provider::{KeyProvider, ProviderError};
use super::{DEK_WRAP_INFO, Kek, KeyState, Keyring};
use crate::crypto::{Key256, aad};

const FORMAT: u32 = 1;
const AAD_KEK: &str = "tokenvault/v1/aad/kek";
const AAD_INDEX: &str = "tokenvault/v1/aad/index-key";
const AAD_MAC: &str = "tokenvault/v1/aad/keystore-mac-key";

/// Why the keystore could not be used or changed. Never includes key material.
#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    #[error("keystore I/O error at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("keystore in {0} is malformed")]
    Malformed(String),
    #[error("keystore in {0} failed its integrity check (edited, or a different root key)")]
    Integrity(String),
    #[error("root key file {0} must hold exactly 32 bytes, base64-encoded")]
    RootKey(PathBuf),
    #[error("keystore in {0} has no usable active KEK version")]
    NoActiveKey(String),
    #[error("no keystore in {0}; create one with `tokenvault keys init`")]
    Missing(String),
    #[error("cannot reach the keystore in {at}")]
    Shared {
        at: String,
        #[source]
        source: SharedError,
    },
    /// Another process (a vault replica, `keys --offline`) saved the keystore
    /// between this one's read and its save: nothing was changed here.
    #[error("the keystore was changed by another vault replica at the same moment; nothing was changed: retry")]
    Conflict,
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Provider(#[from] ProviderError),
}

/// Where the keystore is kept.
#[derive(Clone)]
pub enum KeystoreAt {
    /// A file written atomically (one vault over sled).
    File(PathBuf),
    /// A row of the shared database (vault replicas over PostgreSQL).
    Shared(Arc<dyn SharedKeystore>),
}

/// A keystore kept in a shared database: one serialized keystore and its
/// generation, replaced only by compare-and-set.
pub trait SharedKeystore: Send + Sync {
    /// Where it is, for messages (never a password).
    fn describe(&self) -> String;
    /// The stored keystore, if there is one.
    fn load(&self) -> Result<Option<Vec<u8>>, SharedError>;
    /// The stored generation only (cheap: replicas poll it).
    fn generation(&self) -> Result<Option<u64>, SharedError>;
    /// Stores `bytes` as `generation` if the stored generation is `expected`
    /// (`None`: no keystore yet). `false`: it was not, and nothing changed.
    fn save(&self, expected: Option<u64>, generation: u64, bytes: &[u8]) -> Result<bool, SharedError>;
}

/// A shared keystore's backend error (the store's own type, kept as the cause).
pub type SharedError = Box<dyn std::error::Error + Send + Sync>;

impl std::fmt::Display for KeystoreAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeystoreAt::File(p) => write!(f, "{}", p.display()),
            KeystoreAt::Shared(s) => f.write_str(&s.describe()),
        }
    }
}

impl std::fmt::Debug for KeystoreAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeystoreAt({self})")
    }
}

impl From<&Path> for KeystoreAt {
    fn from(p: &Path) -> KeystoreAt {
        KeystoreAt::File(p.to_owned())
    }
}

impl From<&PathBuf> for KeystoreAt {
    fn from(p: &PathBuf) -> KeystoreAt {
        KeystoreAt::File(p.clone())
    }
}

impl From<&KeystoreAt> for KeystoreAt {
    fn from(at: &KeystoreAt) -> KeystoreAt {
        at.clone()
    }
}

impl KeystoreAt {
    fn shared_error(&self, source: SharedError) -> KeystoreError {
        KeystoreError::Shared {
            at: self.to_string(),
            source,
        }
    }

    /// Whether a keystore exists here.
    pub fn exists(&self) -> Result<bool, KeystoreError> {
        match self {
            KeystoreAt::File(p) => Ok(p.exists()),
            KeystoreAt::Shared(s) => Ok(s.generation().map_err(|e| self.shared_error(e))?.is_some()),
        }
    }

    /// The stored keystore as bytes (`tokenvault store copy` moves them as they are).
    pub fn read_bytes(&self) -> Result<Vec<u8>, KeystoreError> {
        match self {
            KeystoreAt::File(path) => fs::read(path).map_err(|source| KeystoreError::Io {
                path: path.clone(),
                source,
            }),
            KeystoreAt::Shared(s) => s
                .load()
                .map_err(|e| self.shared_error(e))?
                .ok_or_else(|| KeystoreError::Missing(self.to_string())),
        }
    }

    fn read(&self) -> Result<KeystoreFile, KeystoreError> {
        let bytes = self.read_bytes()?;
        serde_json::from_slice(&bytes).map_err(|_| KeystoreError::Malformed(self.to_string()))
    }

    /// The generation stored here, unauthenticated: only a hint that it changed.
    fn generation_hint(&self) -> Result<u64, KeystoreError> {
        match self {
            KeystoreAt::File(_) => Ok(self.read()?.body.generation),
            KeystoreAt::Shared(s) => s
                .generation()
                .map_err(|e| self.shared_error(e))?
                .ok_or_else(|| KeystoreError::Missing(self.to_string())),
        }
    }

    /// Stores a keystore where there is none (never overwrites). Taking bytes as
    /// they are (not re-serialized) keeps their MAC valid: used by `store copy`.
    pub fn write_new(&self, bytes: &[u8]) -> Result<(), KeystoreError> {
        match self {
            KeystoreAt::File(p) => write_private(p, bytes),
            KeystoreAt::Shared(s) => {
                let generation = serde_json::from_slice::<KeystoreFile>(bytes)
                    .map_err(|_| KeystoreError::Malformed(self.to_string()))?
                    .body
                    .generation;
                if s.save(None, generation, bytes).map_err(|e| self.shared_error(e))? {
                    Ok(())
                } else {
                    Err(KeystoreError::Refused(format!(
                        "{self} already holds a keystore; a key ceremony never overwrites a keystore"
                    )))
                }
            }
        }
    }

    /// Replaces generation `expected` with `bytes` (generation `expected + 1`).
    fn replace(&self, expected: u64, bytes: &[u8]) -> Result<(), KeystoreError> {
        match self {
            KeystoreAt::File(p) => {
                // Best effort between processes sharing a file (the database form
                // is an atomic compare-and-set).
                if self.generation_hint()? != expected {
                    return Err(KeystoreError::Conflict);
                }
                replace_private(p, bytes)
            }
            KeystoreAt::Shared(s) => {
                if s.save(Some(expected), expected + 1, bytes)
                    .map_err(|e| self.shared_error(e))?
                {
                    Ok(())
                } else {
                    Err(KeystoreError::Conflict)
                }
            }
        }
    }
}

/// A root key read from a file: dev mode only (production roots come from
/// custodian shares or an HSM).
pub struct RootKey(Key256);

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RootKey([REDACTED])")
    }
}

impl RootKey {
    pub fn load(path: &Path) -> Result<RootKey, KeystoreError> {
        let text = Zeroizing::new(fs::read_to_string(path).map_err(|source| KeystoreError::Io {
            path: path.to_owned(),
            source,
        })?);
        let bytes = Zeroizing::new(
            B64.decode(text.trim())
                .map_err(|_| KeystoreError::RootKey(path.to_owned()))?,
        );
        Key256::from_slice(&bytes)
            .map(RootKey)
            .ok_or_else(|| KeystoreError::RootKey(path.to_owned()))
    }

    /// Generates a root key into a new file readable only by its owner.
    pub fn generate(path: &Path) -> Result<RootKey, KeystoreError> {
        let key = Key256::random();
        let text = Zeroizing::new(format!("{}\n", B64.encode(key.expose_bytes())));
        write_private(path, text.as_bytes())?;
        Ok(RootKey(key))
    }

    pub fn key(&self) -> &Key256 {
        &self.0
    }
}

/// Which root of trust protects the keystore (public; read before unsealing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderInfo {
    pub kind: String,
    pub root_id: String,
    /// For a sealed root: shares needed and shares issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shamir: Option<Shamir>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shamir {
    pub threshold: u8,
    pub shares: u8,
}

/// One entry of the key lifecycle history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEvent {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// The officers who performed (and, for dual control, approved) it.
    pub officers: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeystoreFile {
    body: Body,
    mac: String,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    format: u32,
    /// Bumped by every save. The vault keeps the highest generation it has seen
    /// outside this file (in its store) and refuses an older keystore: a restored
    /// copy from before a destroy would bring the destroyed KEK back. Absent (0) in
    /// keystores written before it existed, so their MAC still verifies.
    #[serde(default, skip_serializing_if = "is_zero")]
    generation: u64,
    provider: ProviderInfo,
    active: u32,
    mac_key: String,
    index_key: String,
    keks: Vec<KekEntry>,
    events: Vec<KeyEvent>,
    /// Destroy requests awaiting a second officer. Kept in the keystore (so under
    /// its MAC, and shared by every replica): a request cannot be forged by
    /// editing the file or the database row, and an approval may reach another
    /// replica than the request. Absent when empty (older keystores verify).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pending: Vec<DestroyRequest>,
    /// Card exports under dual control (requested, approved, fetched once), kept
    /// here for the same reasons. Absent when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    exports: Vec<ExportRequest>,
}

/// A tenant's cards, to be sent encrypted to a recipient's OpenPGP key: one
/// officer requests, a second approves, and the file can be fetched once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    pub id: String,
    pub tenant: String,
    /// The recipient key's fingerprint (hex, upper case).
    pub fingerprint: String,
    /// The recipient's public key (ASCII armor), as it was requested.
    pub recipient_key: String,
    pub requested_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    #[serde(default)]
    pub approved_by: Option<String>,
    #[serde(default)]
    pub fetched: bool,
}

/// Open export requests a keystore holds at most.
pub const MAX_EXPORTS: usize = 16;

/// A destroy request awaiting its second officer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestroyRequest {
    pub version: u32,
    pub requested_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KekEntry {
    version: u32,
    state: KeyState,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    /// The KEK wrapped by the root; absent once destroyed.
    wrapped: Option<String>,
}

/// An opened, authenticated keystore that can be changed and saved.
pub struct Keystore {
    at: KeystoreAt,
    body: Body,
    provider: Arc<dyn KeyProvider>,
    mac_key: Key256,
}

fn kek_aad(version: u32) -> Vec<u8> {
    aad(AAD_KEK, &[&version.to_be_bytes()])
}

impl Keystore {
    /// Creates a keystore with KEK v1 active and fresh index and MAC keys.
    pub fn create(
        at: impl Into<KeystoreAt>,
        provider: Arc<dyn KeyProvider>,
        shamir: Option<Shamir>,
        officer: &str,
    ) -> Result<Keystore, KeystoreError> {
        let mac_key = Key256::random();
        let now = OffsetDateTime::now_utc();
        let body = Body {
            format: FORMAT,
            generation: 1,
            provider: ProviderInfo {
                kind: provider.kind().into(),
                root_id: provider.root_id(),
                shamir,
            },
            active: 1,
            mac_key: B64.encode(provider.wrap(&aad(AAD_MAC, &[]), &mac_key)?),
            index_key: B64.encode(provider.wrap(&aad(AAD_INDEX, &[]), &Key256::random())?),
            keks: vec![KekEntry {
                version: 1,
                state: KeyState::Active,
                created_at: now,
                wrapped: Some(B64.encode(provider.wrap(&kek_aad(1), &Key256::random())?)),
            }],
            events: vec![KeyEvent {
                at: now,
                action: "init".into(),
                version: Some(1),
                officers: vec![officer.into()],
            }],
            pending: Vec::new(),
            exports: Vec::new(),
        };
        let ks = Keystore {
            at: at.into(),
            body,
            provider,
            mac_key,
        };
        let bytes = ks.serialize()?;
        ks.at.write_new(&bytes)?;
        Keystore::open(&ks.at, ks.provider)
    }

    /// Reads the provider section without authenticating anything (to know how to
    /// unseal). Everything else is only trusted after [`Keystore::open`].
    pub fn peek(at: impl Into<KeystoreAt>) -> Result<ProviderInfo, KeystoreError> {
        Ok(at.into().read()?.body.provider)
    }

    /// Loads and authenticates a keystore with the given root of trust.
    pub fn open(at: impl Into<KeystoreAt>, provider: Arc<dyn KeyProvider>) -> Result<Keystore, KeystoreError> {
        let at = at.into();
        let file = at.read()?;
        let integrity = || KeystoreError::Integrity(at.to_string());
        let malformed = || KeystoreError::Malformed(at.to_string());
        let wrapped_mac = B64.decode(&file.body.mac_key).map_err(|_| malformed())?;
        let mac_key = provider.unwrap(&aad(AAD_MAC, &[]), &wrapped_mac).map_err(|e| match e {
            ProviderError::Unwrap => integrity(),
            other => KeystoreError::Provider(other),
        })?;
        let tag = B64.decode(&file.mac).map_err(|_| malformed())?;
        let body_bytes = serde_json::to_vec(&file.body).map_err(|_| malformed())?;
        mac_key.verify_hmac(&body_bytes, &tag).map_err(|_| integrity())?;
        if file.body.format != FORMAT {
            return Err(malformed());
        }
        let ks = Keystore {
            at,
            body: file.body,
            provider,
            mac_key,
        };
        ks.keyring()?;
        Ok(ks)
    }

    /// The generation stored now, unauthenticated: only a hint that it changed
    /// ([`Keystore::reopen`] authenticates it).
    pub fn stored_generation(&self) -> Result<u64, KeystoreError> {
        self.at.generation_hint()
    }

    /// Where this keystore is kept.
    pub fn location(&self) -> &KeystoreAt {
        &self.at
    }

    /// The keystore as it is stored now (another process — a vault replica
    /// sharing it, or `keys --offline` — may have changed it), authenticated with
    /// this keystore's root of trust.
    pub fn reopen(&self) -> Result<Keystore, KeystoreError> {
        Keystore::open(&self.at, self.provider.clone())
    }

    /// Unwraps every live KEK version into a keyring.
    pub fn keyring(&self) -> Result<Keyring, KeystoreError> {
        let integrity = || KeystoreError::Integrity(self.at.to_string());
        let unwrap = |b64: &str, aad_bytes: &[u8]| -> Result<Key256, KeystoreError> {
            let sealed = B64
                .decode(b64)
                .map_err(|_| KeystoreError::Malformed(self.at.to_string()))?;
            self.provider.unwrap(aad_bytes, &sealed).map_err(|e| match e {
                ProviderError::Unwrap => integrity(),
                other => KeystoreError::Provider(other),
            })
        };
        let index_key = unwrap(&self.body.index_key, &aad(AAD_INDEX, &[]))?;
        let mut keks = BTreeMap::new();
        for entry in &self.body.keks {
            let dek_wrap = match (&entry.wrapped, entry.state) {
                (_, KeyState::Destroyed) | (None, _) => None,
                (Some(w), _) => Some(unwrap(w, &kek_aad(entry.version))?.derive(DEK_WRAP_INFO)),
            };
            let kek = Kek {
                state: entry.state,
                created_at: entry.created_at,
                dek_wrap,
            };
            if keks.insert(entry.version, kek).is_some() {
                return Err(KeystoreError::Malformed(self.at.to_string()));
            }
        }
        let active_ok = keks
            .get(&self.body.active)
            .is_some_and(|k| k.state == KeyState::Active && k.dek_wrap.is_some());
        let one_active = keks.values().filter(|k| k.state == KeyState::Active).count() == 1;
        if !active_ok || !one_active {
            return Err(KeystoreError::NoActiveKey(self.at.to_string()));
        }
        Ok(Keyring {
            keks,
            active: self.body.active,
            index_key,
        })
    }

    pub fn provider_info(&self) -> &ProviderInfo {
        &self.body.provider
    }

    /// The keystore's generation (bumped by every save).
    pub fn generation(&self) -> u64 {
        self.body.generation
    }

    pub fn events(&self) -> &[KeyEvent] {
        &self.body.events
    }

    /// The destroy requests made within `window` of `now` (older ones lapsed).
    pub fn destroy_requests(&self, now: OffsetDateTime, window: time::Duration) -> Vec<DestroyRequest> {
        self.body
            .pending
            .iter()
            .filter(|r| now - r.at < window)
            .cloned()
            .collect()
    }

    /// Records `officer`'s request to destroy `version` (lapsed requests are
    /// dropped on the way). Saved before it returns.
    pub fn request_destroy(
        &mut self,
        version: u32,
        officer: &str,
        now: OffsetDateTime,
        window: time::Duration,
    ) -> Result<(), KeystoreError> {
        let mut next = self.clone_body();
        next.pending.retain(|r| now - r.at < window && r.version != version);
        next.pending.push(DestroyRequest {
            version,
            requested_by: officer.into(),
            at: now,
        });
        push_event(&mut next, "destroy-request", Some(version), &[officer]);
        self.commit(next)
    }

    /// The export requests made within `window` of `now` (older ones lapsed).
    pub fn export_requests(&self, now: OffsetDateTime, window: time::Duration) -> Vec<ExportRequest> {
        self.body
            .exports
            .iter()
            .filter(|r| now - r.at < window)
            .cloned()
            .collect()
    }

    /// Records an export request (lapsed ones are dropped on the way; at most
    /// [`MAX_EXPORTS`] are open). Saved before it returns.
    pub fn request_export(
        &mut self,
        request: ExportRequest,
        now: OffsetDateTime,
        window: time::Duration,
    ) -> Result<(), KeystoreError> {
        let mut next = self.clone_body();
        next.exports.retain(|r| now - r.at < window);
        if next.exports.len() >= MAX_EXPORTS {
            return Err(refused(format!(
                "{MAX_EXPORTS} export requests are open: wait for them to be fetched or to lapse"
            )));
        }
        let officer = request.requested_by.clone();
        push_event(&mut next, "export-request", None, &[&officer]);
        next.exports.push(request);
        self.commit(next)
    }

    /// A second officer approves an export (dual control). Saved before it returns.
    pub fn approve_export(
        &mut self,
        id: &str,
        officer: &str,
        now: OffsetDateTime,
        window: time::Duration,
    ) -> Result<ExportRequest, KeystoreError> {
        let mut next = self.clone_body();
        let r = open_export(&mut next, id, now, window)?;
        if r.approved_by.is_some() {
            return Err(refused(format!("export {id} is already approved")));
        }
        if r.requested_by == officer {
            return Err(refused(format!(
                "dual control: export {id} was requested by {officer}; a different officer must approve"
            )));
        }
        r.approved_by = Some(officer.to_owned());
        let (out, requester) = (r.clone(), r.requested_by.clone());
        push_event(&mut next, "export-approve", None, &[&requester, officer]);
        self.commit(next)?;
        Ok(out)
    }

    /// Marks an approved export fetched (it can be fetched once): saved before it
    /// returns, so a second fetch is refused even if this one fails midway.
    pub fn take_export(
        &mut self,
        id: &str,
        officer: &str,
        now: OffsetDateTime,
        window: time::Duration,
    ) -> Result<ExportRequest, KeystoreError> {
        let mut next = self.clone_body();
        let r = open_export(&mut next, id, now, window)?;
        if r.approved_by.is_none() {
            return Err(refused(format!(
                "export {id} is not approved: a second officer must approve it first"
            )));
        }
        if r.fetched {
            return Err(refused(format!(
                "export {id} was already fetched: it can be fetched once"
            )));
        }
        r.fetched = true;
        let out = r.clone();
        push_event(&mut next, "export-fetch", None, &[officer]);
        self.commit(next)?;
        Ok(out)
    }

    /// Creates a new KEK version and makes it active; the previous active version
    /// becomes decrypt-only. Saved before it returns.
    pub fn rotate(&mut self, officers: &[&str]) -> Result<u32, KeystoreError> {
        let mut next = self.clone_body();
        let version = next.keks.iter().map(|k| k.version).max().unwrap_or(0) + 1;
        for k in next.keks.iter_mut().filter(|k| k.state == KeyState::Active) {
            k.state = KeyState::DecryptOnly;
        }
        next.keks.push(KekEntry {
            version,
            state: KeyState::Active,
            created_at: OffsetDateTime::now_utc(),
            wrapped: Some(B64.encode(self.provider.wrap(&kek_aad(version), &Key256::random())?)),
        });
        next.active = version;
        push_event(&mut next, "rotate", Some(version), officers);
        self.commit(next)?;
        Ok(version)
    }

    /// Marks a decrypt-only version retired: it decrypts nothing afterwards. The
    /// caller must have checked that no record is still wrapped under it.
    pub fn retire(&mut self, version: u32, officers: &[&str]) -> Result<(), KeystoreError> {
        let mut next = self.clone_body();
        let entry = find(&mut next, version)?;
        match entry.state {
            KeyState::DecryptOnly => entry.state = KeyState::Retired,
            KeyState::Active => return Err(refused(format!("v{version} is the active version; rotate first"))),
            KeyState::Retired => return Err(refused(format!("v{version} is already retired"))),
            KeyState::Destroyed => return Err(refused(format!("v{version} is destroyed"))),
        }
        push_event(&mut next, "retire", Some(version), officers);
        self.commit(next)
    }

    /// Crypto-shreds a retired version: its wrapped key is removed from the
    /// keystore for good. `officers` are the requester and the approver.
    pub fn destroy(&mut self, version: u32, officers: &[&str]) -> Result<(), KeystoreError> {
        let mut next = self.clone_body();
        let entry = find(&mut next, version)?;
        if entry.state != KeyState::Retired {
            return Err(refused(format!("v{version} must be retired before it is destroyed")));
        }
        entry.state = KeyState::Destroyed;
        entry.wrapped = None;
        next.pending.retain(|r| r.version != version);
        push_event(&mut next, "destroy", Some(version), officers);
        // A fresh MAC key with every destruction: the file is re-authenticated under
        // a key no earlier copy was MACed with. (What refuses an earlier copy is the
        // generation check: an old copy carries its own, still valid, MAC key.)
        let mac_key = Key256::random();
        next.mac_key = B64.encode(self.provider.wrap(&aad(AAD_MAC, &[]), &mac_key)?);
        let old_mac = std::mem::replace(&mut self.mac_key, mac_key);
        if let Err(e) = self.commit(next) {
            self.mac_key = old_mac;
            return Err(e);
        }
        Ok(())
    }

    /// Re-wraps every key under a new root of trust (root-key rotation).
    pub fn change_provider(&mut self, new: Arc<dyn KeyProvider>, officers: &[&str]) -> Result<(), KeystoreError> {
        let mut next = self.clone_body();
        let integrity = || KeystoreError::Integrity(self.at.to_string());
        let rewrap = |b64: &mut String, aad_bytes: &[u8]| -> Result<(), KeystoreError> {
            let sealed = B64
                .decode(&*b64)
                .map_err(|_| KeystoreError::Malformed(self.at.to_string()))?;
            let key = self.provider.unwrap(aad_bytes, &sealed).map_err(|_| integrity())?;
            *b64 = B64.encode(new.wrap(aad_bytes, &key)?);
            Ok(())
        };
        rewrap(&mut next.mac_key, &aad(AAD_MAC, &[]))?;
        rewrap(&mut next.index_key, &aad(AAD_INDEX, &[]))?;
        for k in next.keks.iter_mut() {
            if let Some(w) = k.wrapped.as_mut() {
                rewrap(w, &kek_aad(k.version))?;
            }
        }
        next.provider = ProviderInfo {
            kind: new.kind().into(),
            root_id: new.root_id(),
            shamir: next.provider.shamir,
        };
        push_event(&mut next, "rotate-root", None, officers);
        let old = std::mem::replace(&mut self.provider, new);
        if let Err(e) = self.commit(next) {
            self.provider = old;
            return Err(e);
        }
        Ok(())
    }

    fn clone_body(&self) -> Body {
        self.body.clone()
    }

    /// Saves `next` atomically (one generation later, only over the generation
    /// this keystore was read at), then adopts it.
    fn commit(&mut self, mut next: Body) -> Result<(), KeystoreError> {
        let expected = self.body.generation;
        next.generation = expected + 1;
        let old = std::mem::replace(&mut self.body, next);
        let saved = self.serialize().and_then(|bytes| self.at.replace(expected, &bytes));
        if let Err(e) = saved {
            self.body = old;
            return Err(e);
        }
        Ok(())
    }

    fn serialize(&self) -> Result<Vec<u8>, KeystoreError> {
        let malformed = || KeystoreError::Malformed(self.at.to_string());
        let body_bytes = serde_json::to_vec(&self.body).map_err(|_| malformed())?;
        let file = KeystoreFile {
            body: self.body.clone(),
            mac: B64.encode(self.mac_key.hmac(&body_bytes)),
        };
        serde_json::to_vec_pretty(&file).map_err(|_| malformed())
    }
}

fn refused(msg: String) -> KeystoreError {
    KeystoreError::Refused(msg)
}

fn find(body: &mut Body, version: u32) -> Result<&mut KekEntry, KeystoreError> {
    body.keks
        .iter_mut()
        .find(|k| k.version == version)
        .ok_or_else(|| refused(format!("no key version v{version}")))
}

/// The open export `id` of `body` (lapsed requests are dropped first).
fn open_export<'a>(
    body: &'a mut Body,
    id: &str,
    now: OffsetDateTime,
    window: time::Duration,
) -> Result<&'a mut ExportRequest, KeystoreError> {
    body.exports.retain(|r| now - r.at < window);
    body.exports
        .iter_mut()
        .find(|r| r.id == id)
        .ok_or_else(|| refused(format!("no open export {id}")))
}

fn push_event(body: &mut Body, action: &str, version: Option<u32>, officers: &[&str]) {
    body.events.push(KeyEvent {
        at: OffsetDateTime::now_utc(),
        action: action.into(),
        version,
        officers: officers.iter().map(|s| s.to_string()).collect(),
    });
}

/// Writes a new file only its owner can read, atomically, refusing to overwrite.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeystoreError> {
    if path.exists() {
        return Err(KeystoreError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "refusing to overwrite"),
        });
    }
    replace_private(path, bytes)
}

/// Atomically replaces `path` (temp file, fsync, rename, fsync of the directory).
pub(crate) fn replace_private(path: &Path, bytes: &[u8]) -> Result<(), KeystoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| KeystoreError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io)?;
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::provider::SoftwareRoot;

    fn root(seed: u8) -> Arc<dyn KeyProvider> {
        Arc::new(SoftwareRoot::new(&Key256::from_slice(&[seed; 32]).unwrap(), "test"))
    }

    #[test]
    fn create_open_and_refuse_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keystore.json");
        let ks = Keystore::create(&path, root(1), None, "officer-a").unwrap();
        assert_eq!(ks.keyring().unwrap().active_version(), 1);
        assert!(ks.keyring().unwrap().self_test());
        assert!(Keystore::open(&path, root(1)).is_ok());
        assert!(
            matches!(Keystore::open(&path, root(2)), Err(KeystoreError::Integrity(_))),
            "other root"
        );

        let original = fs::read_to_string(&path).unwrap();
        for (from, to) in [
            ("\"active\",", "\"retired\","),
            ("\"version\": 1", "\"version\": 2"),
            ("\"officer-a\"", "\"officer-b\""),
        ] {
            assert!(original.contains(from), "{from}");
            fs::write(&path, original.replacen(from, to, 1)).unwrap();
            assert!(
                matches!(Keystore::open(&path, root(1)), Err(KeystoreError::Integrity(_))),
                "{from}"
            );
        }
        fs::write(&path, "{not json").unwrap();
        assert!(matches!(
            Keystore::open(&path, root(1)),
            Err(KeystoreError::Malformed(_))
        ));
    }

    #[test]
    fn lifecycle_rotate_retire_destroy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keystore.json");
        let mut ks = Keystore::create(&path, root(1), None, "a").unwrap();
        assert!(ks.retire(1, &["a"]).is_err(), "the active version cannot be retired");
        assert_eq!(ks.rotate(&["a"]).unwrap(), 2);
        assert!(ks.destroy(1, &["a", "b"]).is_err(), "destroy needs retire first");
        ks.retire(1, &["a"]).unwrap();
        ks.destroy(1, &["a", "b"]).unwrap();
        // Reopened from disk: the same states, v1's key material is gone.
        let ks = Keystore::open(&path, root(1)).unwrap();
        let states: Vec<_> = ks
            .keyring()
            .unwrap()
            .versions()
            .iter()
            .map(|v| (v.version, v.state))
            .collect();
        assert_eq!(states, vec![(1, KeyState::Destroyed), (2, KeyState::Active)]);
        assert!(!fs::read_to_string(&path).unwrap().contains("\"wrapped\": \"") || states.len() == 2);
        let actions: Vec<_> = ks.events().iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["init", "rotate", "retire", "destroy"]);
        assert_eq!(ks.events()[3].officers, ["a", "b"]);
    }

    #[test]
    fn change_provider_moves_every_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keystore.json");
        let mut ks = Keystore::create(&path, root(1), None, "a").unwrap();
        ks.rotate(&["a"]).unwrap();
        let before = ks.keyring().unwrap();
        ks.change_provider(root(3), &["a"]).unwrap();
        assert!(matches!(
            Keystore::open(&path, root(1)),
            Err(KeystoreError::Integrity(_))
        ));
        let after = Keystore::open(&path, root(3)).unwrap().keyring().unwrap();
        let pan = crate::domain::card::Pan::parse("4111111111111111").unwrap();
        let t = crate::domain::tenant::TenantId::parse("t").unwrap();
        assert_eq!(before.fingerprint(&t, &pan), after.fingerprint(&t, &pan));
    }

    #[test]
    fn root_key_file_must_be_32_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("short.key");
        fs::write(&p, B64.encode([1u8; 16])).unwrap();
        assert!(matches!(RootKey::load(&p), Err(KeystoreError::RootKey(_))));
        assert_eq!(
            format!("{:?}", RootKey::generate(&dir.path().join("k")).unwrap()),
            "RootKey([REDACTED])"
        );
        assert!(RootKey::generate(&dir.path().join("k")).is_err(), "never overwrites");
    }
}
