//! The root of trust behind one trait. A [`KeyProvider`] wraps and unwraps the
//! keystore's keys (KEKs, the index key, the keystore MAC key); the root key itself
//! never leaves it.
//!
//! - [`SoftwareRoot`]: a root key held in memory — rebuilt from M-of-N custodian
//!   shares when a sealed vault is unsealed, or read from a file in dev mode.
//! - `pkcs11` ([`super::pkcs11`]): a non-extractable AES key inside an HSM; wrap and
//!   unwrap run inside the HSM.

use std::fmt;

use crate::crypto::Key256;

const ROOT_WRAP_INFO: &[u8] = b"tokenvault/v1/purpose/root-wrap";

/// Why the provider could not wrap or unwrap. Carries no key material.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    #[error("unwrap failed: wrong root key or corrupted keystore")]
    Unwrap,
    #[error("key provider error: {0}")]
    Device(String),
}

/// Wraps and unwraps 256-bit keys under the root key, binding associated data.
pub trait KeyProvider: Send + Sync {
    /// `sealed` (software root from custodian shares or a dev file) or `pkcs11`.
    fn kind(&self) -> &'static str;
    /// Which root key is in use (recorded in the keystore; no secret).
    fn root_id(&self) -> String;
    /// Encrypts `key` under the root key with `aad` bound.
    fn wrap(&self, aad: &[u8], key: &Key256) -> Result<Vec<u8>, ProviderError>;
    /// Reverses [`KeyProvider::wrap`]; fails on any change of bytes, `aad` or root key.
    fn unwrap(&self, aad: &[u8], wrapped: &[u8]) -> Result<Key256, ProviderError>;
}

/// A root key held in process memory (zeroized on drop).
pub struct SoftwareRoot {
    wrap: Key256,
    id: String,
}

impl SoftwareRoot {
    /// Uses `root` (from shares or a dev file); only its HKDF purpose key is kept.
    pub fn new(root: &Key256, id: impl Into<String>) -> SoftwareRoot {
        SoftwareRoot {
            wrap: root.derive(ROOT_WRAP_INFO),
            id: id.into(),
        }
    }
}

impl fmt::Debug for SoftwareRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SoftwareRoot({}, [REDACTED])", self.id)
    }
}

impl KeyProvider for SoftwareRoot {
    fn kind(&self) -> &'static str {
        "sealed"
    }

    fn root_id(&self) -> String {
        self.id.clone()
    }

    fn wrap(&self, aad: &[u8], key: &Key256) -> Result<Vec<u8>, ProviderError> {
        Ok(self.wrap.seal(aad, key.expose_bytes()))
    }

    fn unwrap(&self, aad: &[u8], wrapped: &[u8]) -> Result<Key256, ProviderError> {
        let raw = self.wrap.open(aad, wrapped).map_err(|_| ProviderError::Unwrap)?;
        Key256::from_slice(&raw).ok_or(ProviderError::Unwrap)
    }
}
