//! The keystore file: every KEK version and the index key, each wrapped by the
//! root key, with a MAC over the whole file so that a keystore edited on disk
//! (a key substituted, a version relabelled, a state changed) is refused at load.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::{DEK_WRAP_INFO, Kek, KeyState, Keyring};
use crate::crypto::{Key256, aad};

const FORMAT: u32 = 1;
const KEK_WRAP_INFO: &[u8] = b"tokenvault/v1/purpose/kek-wrap";
const KEYSTORE_MAC_INFO: &[u8] = b"tokenvault/v1/purpose/keystore-mac";
const AAD_KEK: &str = "tokenvault/v1/aad/kek";
const AAD_INDEX: &str = "tokenvault/v1/aad/index-key";

/// Why the keystore could not be used. Never includes key material.
#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    #[error("keystore I/O error at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("keystore at {0} is malformed")]
    Malformed(PathBuf),
    #[error("keystore at {0} failed its integrity check (edited, or a different root key)")]
    Integrity(PathBuf),
    #[error("root key file {0} must hold exactly 32 bytes, base64-encoded")]
    RootKey(PathBuf),
    #[error("keystore at {0} has no usable active KEK version")]
    NoActiveKey(PathBuf),
}

/// The root key that wraps every KEK. Read from a file (a Kubernetes secret in
/// production, a generated file in dev mode); never from argv or the environment.
pub struct RootKey(Key256);

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RootKey([REDACTED])")
    }
}

impl RootKey {
    pub fn load(path: &Path) -> Result<RootKey, KeystoreError> {
        let text =
            Zeroizing::new(
                fs::read_to_string(path).map_err(|source| KeystoreError::Io {
                    path: path.to_owned(),
                    source,
                })?,
            );
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
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeystoreFile {
    body: Body,
    mac: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    format: u32,
    active: u32,
    index_key: String,
    keks: Vec<KekEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KekEntry {
    version: u32,
    state: KeyState,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    /// The KEK wrapped by the root key; absent once destroyed.
    wrapped: Option<String>,
}

/// Creates a keystore with KEK v1 active and a fresh index key.
pub fn create(path: &Path, root: &RootKey) -> Result<Keyring, KeystoreError> {
    let kek = Key256::random();
    let index = Key256::random();
    let kek_wrap = root.0.derive(KEK_WRAP_INFO);
    let body =
        Body {
            format: FORMAT,
            active: 1,
            index_key: B64.encode(kek_wrap.seal(&aad(AAD_INDEX, &[]), index.expose_bytes())),
            keks: vec![KekEntry {
                version: 1,
                state: KeyState::Active,
                created_at: OffsetDateTime::now_utc(),
                wrapped: Some(B64.encode(
                    kek_wrap.seal(&aad(AAD_KEK, &[&1u32.to_be_bytes()]), kek.expose_bytes()),
                )),
            }],
        };
    let file = KeystoreFile {
        mac: mac(root, &body, path)?,
        body,
    };
    let json =
        serde_json::to_vec_pretty(&file).map_err(|_| KeystoreError::Malformed(path.to_owned()))?;
    write_private(path, &json)?;
    load(path, root)
}

/// Loads and authenticates a keystore, unwrapping every live KEK version.
pub fn load(path: &Path, root: &RootKey) -> Result<Keyring, KeystoreError> {
    let bytes = fs::read(path).map_err(|source| KeystoreError::Io {
        path: path.to_owned(),
        source,
    })?;
    let file: KeystoreFile =
        serde_json::from_slice(&bytes).map_err(|_| KeystoreError::Malformed(path.to_owned()))?;
    let tag = B64
        .decode(&file.mac)
        .map_err(|_| KeystoreError::Malformed(path.to_owned()))?;
    let body_bytes =
        serde_json::to_vec(&file.body).map_err(|_| KeystoreError::Malformed(path.to_owned()))?;
    root.0
        .derive(KEYSTORE_MAC_INFO)
        .verify_hmac(&body_bytes, &tag)
        .map_err(|_| KeystoreError::Integrity(path.to_owned()))?;
    let body = file.body;
    if body.format != FORMAT {
        return Err(KeystoreError::Malformed(path.to_owned()));
    }
    let kek_wrap = root.0.derive(KEK_WRAP_INFO);
    let unwrap = |sealed_b64: &str, aad_bytes: &[u8]| -> Result<Key256, KeystoreError> {
        let sealed = B64
            .decode(sealed_b64)
            .map_err(|_| KeystoreError::Malformed(path.to_owned()))?;
        let raw = kek_wrap
            .open(aad_bytes, &sealed)
            .map_err(|_| KeystoreError::Integrity(path.to_owned()))?;
        Key256::from_slice(&raw).ok_or_else(|| KeystoreError::Integrity(path.to_owned()))
    };
    let index_key = unwrap(&body.index_key, &aad(AAD_INDEX, &[]))?;
    let mut keks = BTreeMap::new();
    for entry in &body.keks {
        let dek_wrap = match (&entry.wrapped, entry.state) {
            (_, KeyState::Destroyed) | (None, _) => None,
            (Some(w), _) => Some(
                unwrap(w, &aad(AAD_KEK, &[&entry.version.to_be_bytes()]))?.derive(DEK_WRAP_INFO),
            ),
        };
        let kek = Kek {
            state: entry.state,
            created_at: entry.created_at,
            dek_wrap,
        };
        if keks.insert(entry.version, kek).is_some() {
            return Err(KeystoreError::Malformed(path.to_owned()));
        }
    }
    let active_ok = keks
        .get(&body.active)
        .is_some_and(|k| k.state == KeyState::Active && k.dek_wrap.is_some());
    let one_active = keks
        .values()
        .filter(|k| k.state == KeyState::Active)
        .count()
        == 1;
    if !active_ok || !one_active {
        return Err(KeystoreError::NoActiveKey(path.to_owned()));
    }
    Ok(Keyring {
        keks,
        active: body.active,
        index_key,
    })
}

fn mac(root: &RootKey, body: &Body, path: &Path) -> Result<String, KeystoreError> {
    let bytes = serde_json::to_vec(body).map_err(|_| KeystoreError::Malformed(path.to_owned()))?;
    Ok(B64.encode(root.0.derive(KEYSTORE_MAC_INFO).hmac(&bytes)))
}

/// Writes a file only its owner can read, atomically (temp file, fsync, rename,
/// fsync of the directory), refusing to overwrite an existing file.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeystoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| KeystoreError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io)?;
    if path.exists() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "refusing to overwrite",
        )));
    }
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

    #[test]
    fn create_load_and_refuse_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let root_path = dir.path().join("root.key");
        let ks_path = dir.path().join("keystore.json");
        let root = RootKey::generate(&root_path).unwrap();
        let ring = create(&ks_path, &root).unwrap();
        assert_eq!(ring.active_version(), 1);
        assert!(ring.self_test());

        // Reloads with the same root key.
        let root2 = RootKey::load(&root_path).unwrap();
        assert!(load(&ks_path, &root2).unwrap().self_test());

        // A different root key is refused.
        let other = RootKey::generate(&dir.path().join("other.key")).unwrap();
        assert!(matches!(
            load(&ks_path, &other),
            Err(KeystoreError::Integrity(_))
        ));

        // Any edit of the body is refused: a state change, a version relabel.
        let original = fs::read_to_string(&ks_path).unwrap();
        for (from, to) in [
            ("\"active\",", "\"retired\","),
            ("\"version\": 1", "\"version\": 2"),
        ] {
            assert!(original.contains(from), "{from}");
            fs::write(&ks_path, original.replacen(from, to, 1)).unwrap();
            assert!(
                matches!(load(&ks_path, &root), Err(KeystoreError::Integrity(_))),
                "{from}"
            );
        }
        fs::write(&ks_path, "{not json").unwrap();
        assert!(matches!(
            load(&ks_path, &root),
            Err(KeystoreError::Malformed(_))
        ));
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
    }

    #[test]
    fn never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("root.key");
        RootKey::generate(&p).unwrap();
        assert!(RootKey::generate(&p).is_err());
    }
}
