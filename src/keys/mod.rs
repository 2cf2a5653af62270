//! The key hierarchy and the envelope scheme.
//!
//! ```text
//! root of trust (KeyProvider: custodian-share root in memory, or an HSM key)
//!   ├─ KEK v1, v2, … (random 256-bit, stored wrapped by the root, each with a state)
//!   │    └─ dek-wrap purpose key (HKDF) ── wraps each record's random DEK
//!   ├─ index key (random 256-bit) ── per-tenant fingerprint keys (HKDF) ── HMAC-SHA256(PAN)
//!   └─ keystore MAC key ── authenticates the keystore file
//! ```
//!
//! Associated data binds the wrapped DEK to its tenant, token and KEK version, and
//! the payload to its tenant and token, so a ciphertext copied into another record
//! (or relabelled with another version) fails to open — and a rewrap under a new
//! KEK changes only the wrapped DEK, never the payload. [`keystore`] persists the
//! wrapped keys; [`provider`] is the root of trust.

pub mod keystore;
pub mod manager;
pub mod pkcs11;
pub mod provider;
pub mod shares;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::crypto::{Key256, aad};
use crate::domain::card::{CardPayload, Pan};
use crate::domain::tenant::TenantId;
use crate::domain::token::Token;

/// Parses a KEK version label: `v3` or `3` (never 0).
pub fn parse_version(label: &str) -> Option<u32> {
    label
        .strip_prefix('v')
        .unwrap_or(label)
        .parse::<u32>()
        .ok()
        .filter(|v| *v > 0)
}

/// Opens (or, with `generate`, creates) the HSM root key `label`.
pub fn open_pkcs11(
    hsm: &pkcs11::Pkcs11Settings,
    label: &str,
    generate: bool,
) -> Result<std::sync::Arc<dyn provider::KeyProvider>, provider::ProviderError> {
    let p = if generate {
        pkcs11::Pkcs11Provider::generate(hsm, label)?
    } else {
        pkcs11::Pkcs11Provider::open(hsm, label)?
    };
    Ok(std::sync::Arc::new(p))
}

const AUDIT_MAC_INFO: &[u8] = b"tokenvault/v1/purpose/audit-mac";
const CVV_HOLD_INFO: &[u8] = b"tokenvault/v1/purpose/cvv-hold";
const DEK_WRAP_INFO: &[u8] = b"tokenvault/v1/purpose/dek-wrap";
const FINGERPRINT_INFO: &str = "tokenvault/v1/purpose/fingerprint/tenant=";
const AAD_DEK: &str = "tokenvault/v1/aad/dek";
const AAD_PAYLOAD: &str = "tokenvault/v1/aad/payload";

/// Lifecycle state of a KEK version (PCI DSS 3.6/3.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Wraps new DEKs and unwraps old ones. Exactly one version is active.
    Active,
    /// Unwraps existing DEKs only (after a rotation, until rewrapped).
    DecryptOnly,
    /// No longer used for anything; kept until destroyed.
    Retired,
    /// Crypto-shredded: the key material is gone.
    Destroyed,
}

/// Why a record could not be opened. Carries no key or data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the record's key version is unknown to this keyring")]
    UnknownVersion,
    #[error("the record's key version has been destroyed")]
    Destroyed,
    #[error("the record's key version is retired")]
    Retired,
    #[error("the record failed its integrity check")]
    Integrity,
}

/// One KEK version in memory: only the derived purpose key is kept.
#[derive(Debug)]
struct Kek {
    state: KeyState,
    created_at: OffsetDateTime,
    dek_wrap: Option<Key256>,
}

/// Summary of one KEK version, without key material.
#[derive(Debug, Clone, Serialize)]
pub struct KekInfo {
    pub version: u32,
    pub state: KeyState,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// A record's sealed envelope: the wrapped DEK, the KEK version that wrapped it,
/// and the payload sealed under the DEK.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedCard {
    pub key_version: u32,
    pub wrapped_dek: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for SealedCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealedCard(v{}, {} bytes)", self.key_version, self.ciphertext.len())
    }
}

/// All KEK versions plus the index key, unwrapped in memory.
#[derive(Debug)]
pub struct Keyring {
    keks: BTreeMap<u32, Kek>,
    active: u32,
    index_key: Key256,
}

impl Keyring {
    /// The version new DEKs are wrapped under.
    pub fn active_version(&self) -> u32 {
        self.active
    }

    /// Every version with its state, oldest first.
    pub fn versions(&self) -> Vec<KekInfo> {
        self.keks
            .iter()
            .map(|(&version, k)| KekInfo {
                version,
                state: k.state,
                created_at: k.created_at,
            })
            .collect()
    }

    /// Seals a card for (`tenant`, `token`): a fresh DEK encrypts the payload and is
    /// wrapped by the active KEK. `metadata` (the record's public fields) is bound
    /// into the payload's associated data, so a changed BIN, last four, brand or
    /// fingerprint makes the record fail to open instead of being served.
    pub fn seal(&self, tenant: &TenantId, token: &Token, metadata: &[u8], payload: &CardPayload) -> SealedCard {
        let dek = Key256::random();
        let record = [tenant.as_str().as_bytes(), token.as_str().as_bytes(), metadata];
        let ciphertext = dek.seal(&aad(AAD_PAYLOAD, &record), &payload.encode());
        let (key_version, wrapped_dek) = self.wrap_dek(tenant, token, &dek);
        SealedCard {
            key_version,
            wrapped_dek,
            ciphertext,
        }
    }

    /// Opens a sealed card; fails closed on any mismatch of key, version, tenant,
    /// token or bytes.
    pub fn open(
        &self,
        tenant: &TenantId,
        token: &Token,
        metadata: &[u8],
        sealed: &SealedCard,
    ) -> Result<CardPayload, KeyError> {
        let dek = self.unwrap_dek(tenant, token, sealed)?;
        let record = [tenant.as_str().as_bytes(), token.as_str().as_bytes(), metadata];
        let plain = dek
            .open(&aad(AAD_PAYLOAD, &record), &sealed.ciphertext)
            .map_err(|_| KeyError::Integrity)?;
        CardPayload::decode(&plain).ok_or(KeyError::Integrity)
    }

    /// Moves a record's DEK under the active KEK. The payload is untouched: that is
    /// the point of the envelope. Fails closed like [`Keyring::open`].
    pub fn rewrap(&self, tenant: &TenantId, token: &Token, sealed: &SealedCard) -> Result<SealedCard, KeyError> {
        let dek = self.unwrap_dek(tenant, token, sealed)?;
        let (key_version, wrapped_dek) = self.wrap_dek(tenant, token, &dek);
        Ok(SealedCard {
            key_version,
            wrapped_dek,
            ciphertext: sealed.ciphertext.clone(),
        })
    }

    fn wrap_dek(&self, tenant: &TenantId, token: &Token, dek: &Key256) -> (u32, Vec<u8>) {
        let version = self.active;
        let v = version.to_be_bytes();
        let binding = [tenant.as_str().as_bytes(), token.as_str().as_bytes(), &v[..]];
        (
            version,
            self.wrap_key(version).seal(&aad(AAD_DEK, &binding), dek.expose_bytes()),
        )
    }

    fn unwrap_dek(&self, tenant: &TenantId, token: &Token, sealed: &SealedCard) -> Result<Key256, KeyError> {
        let kek = self.keks.get(&sealed.key_version).ok_or(KeyError::UnknownVersion)?;
        let wrap = match (kek.state, &kek.dek_wrap) {
            (KeyState::Destroyed, _) | (_, None) => return Err(KeyError::Destroyed),
            (KeyState::Retired, _) => return Err(KeyError::Retired),
            (_, Some(w)) => w,
        };
        let v = sealed.key_version.to_be_bytes();
        let binding = [tenant.as_str().as_bytes(), token.as_str().as_bytes(), &v[..]];
        let dek_bytes = wrap
            .open(&aad(AAD_DEK, &binding), &sealed.wrapped_dek)
            .map_err(|_| KeyError::Integrity)?;
        Key256::from_slice(&dek_bytes).ok_or(KeyError::Integrity)
    }

    /// The keyed fingerprint of a PAN within a tenant (HMAC-SHA256 under a key
    /// derived per tenant from the index key): equal PANs in one tenant match,
    /// and fingerprints are useless across tenants or without the key.
    pub fn fingerprint(&self, tenant: &TenantId, pan: &Pan) -> [u8; 32] {
        let info = format!("{FINGERPRINT_INFO}{}", tenant.as_str());
        self.index_key
            .derive(info.as_bytes())
            .hmac(pan.expose_digits().as_bytes())
    }

    /// The audit-trail MAC key: an HKDF purpose key of the long-lived index key, so
    /// audit records stay verifiable across KEK rotation and destruction.
    pub fn audit_key(&self) -> Key256 {
        self.index_key.derive(AUDIT_MAC_INFO)
    }

    /// The key that seals CVVs held for the next charge outside this process (in a
    /// memory-only Redis shared by replicas): an HKDF purpose key of the index key,
    /// so every replica has it and it outlives KEK rotation.
    pub fn cvv_hold_key(&self) -> Key256 {
        self.index_key.derive(CVV_HOLD_INFO)
    }

    /// A round trip through the active key: readiness means keys are usable.
    pub fn self_test(&self) -> bool {
        let Some(tenant) = TenantId::parse("selftest") else {
            return false;
        };
        let Some(token) = Token::parse("tok_AAAAAAAAAAAAAAAAAAAAAA") else {
            return false;
        };
        let Ok(pan) = Pan::parse("4111111111111111") else {
            return false;
        };
        let Some(expiry) = crate::domain::card::Expiry::from_stored(1, 2030) else {
            return false;
        };
        let payload = CardPayload {
            pan,
            expiry,
            name: None,
        };
        let sealed = self.seal(&tenant, &token, b"selftest", &payload);
        self.open(&tenant, &token, b"selftest", &sealed)
            .is_ok_and(|p| p.pan.expose_digits() == payload.pan.expose_digits())
    }

    fn wrap_key(&self, version: u32) -> &Key256 {
        // Invariant (checked when the keyring is built): the active version exists
        // and holds key material.
        #[allow(clippy::expect_used)]
        self.keks
            .get(&version)
            .and_then(|k| k.dek_wrap.as_ref())
            .expect("active KEK version is present and not destroyed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::card::Expiry;

    pub(crate) fn test_keyring() -> Keyring {
        let mut keks = BTreeMap::new();
        for v in 1..=2 {
            keks.insert(
                v,
                Kek {
                    state: if v == 2 {
                        KeyState::Active
                    } else {
                        KeyState::DecryptOnly
                    },
                    created_at: OffsetDateTime::UNIX_EPOCH,
                    dek_wrap: Some(Key256::random().derive(DEK_WRAP_INFO)),
                },
            );
        }
        Keyring {
            keks,
            active: 2,
            index_key: Key256::random(),
        }
    }

    fn payload(pan: &str) -> CardPayload {
        CardPayload {
            pan: Pan::parse(pan).unwrap(),
            expiry: Expiry::from_stored(12, 2031).unwrap(),
            name: None,
        }
    }

    #[test]
    fn envelope_binds_tenant_token_and_version() {
        let ring = test_keyring();
        let t1 = TenantId::parse("t1").unwrap();
        let t2 = TenantId::parse("t2").unwrap();
        let a = Token::parse("4111110000001112").unwrap();
        let b = Token::parse("4111110000002112").unwrap();
        let sealed = ring.seal(&t1, &a, b"m", &payload("4111111111111111"));
        assert_eq!(sealed.key_version, 2);
        assert_eq!(
            ring.open(&t1, &a, b"m", &sealed).unwrap().pan.expose_digits(),
            "4111111111111111"
        );
        // Moved to another record or tenant: fails.
        assert_eq!(ring.open(&t1, &b, b"m", &sealed).unwrap_err(), KeyError::Integrity);
        assert_eq!(ring.open(&t2, &a, b"m", &sealed).unwrap_err(), KeyError::Integrity);
        // Relabelled with another version: fails.
        let relabelled = SealedCard {
            key_version: 1,
            ..sealed.clone()
        };
        assert_eq!(ring.open(&t1, &a, b"m", &relabelled).unwrap_err(), KeyError::Integrity);
        // Payload of one record with the DEK of another: fails.
        let other = ring.seal(&t1, &a, b"m", &payload("5555555555554444"));
        let spliced = SealedCard {
            ciphertext: other.ciphertext,
            ..sealed.clone()
        };
        assert_eq!(ring.open(&t1, &a, b"m", &spliced).unwrap_err(), KeyError::Integrity);
        // Unknown version.
        let unknown = SealedCard {
            key_version: 9,
            ..sealed
        };
        assert_eq!(
            ring.open(&t1, &a, b"m", &unknown).unwrap_err(),
            KeyError::UnknownVersion
        );
    }

    #[test]
    fn rewrap_moves_the_dek_and_leaves_the_payload_untouched() {
        let mut ring = test_keyring();
        let t = TenantId::parse("t1").unwrap();
        let tok = Token::parse("4111110000001112").unwrap();
        ring.active = 1;
        ring.keks.get_mut(&1).unwrap().state = KeyState::Active;
        ring.keks.get_mut(&2).unwrap().state = KeyState::DecryptOnly;
        let old = ring.seal(&t, &tok, b"m", &payload("4111111111111111"));
        assert_eq!(old.key_version, 1);
        ring.active = 2;
        ring.keks.get_mut(&1).unwrap().state = KeyState::DecryptOnly;
        ring.keks.get_mut(&2).unwrap().state = KeyState::Active;
        let new = ring.rewrap(&t, &tok, &old).unwrap();
        assert_eq!(new.key_version, 2);
        assert_eq!(new.ciphertext, old.ciphertext, "payload bytes are not re-encrypted");
        assert_ne!(new.wrapped_dek, old.wrapped_dek);
        assert_eq!(
            ring.open(&t, &tok, b"m", &new).unwrap().pan.expose_digits(),
            "4111111111111111"
        );
        // A rewrapped record cannot be opened under another record's identity either.
        let other = Token::parse("4111110000002112").unwrap();
        assert_eq!(ring.open(&t, &other, b"m", &new).unwrap_err(), KeyError::Integrity);
        // Retired and destroyed versions decrypt nothing.
        ring.keks.get_mut(&1).unwrap().state = KeyState::Retired;
        assert_eq!(ring.open(&t, &tok, b"m", &old).unwrap_err(), KeyError::Retired);
        assert_eq!(ring.rewrap(&t, &tok, &old).unwrap_err(), KeyError::Retired);
        let k1 = ring.keks.get_mut(&1).unwrap();
        k1.state = KeyState::Destroyed;
        k1.dek_wrap = None;
        assert_eq!(ring.open(&t, &tok, b"m", &old).unwrap_err(), KeyError::Destroyed);
    }

    #[test]
    fn metadata_is_bound_into_the_payload() {
        let ring = test_keyring();
        let t = TenantId::parse("t1").unwrap();
        let tok = Token::parse("4111110000001112").unwrap();
        let sealed = ring.seal(&t, &tok, b"bin=411111;last4=1111", &payload("4111111111111111"));
        assert!(ring.open(&t, &tok, b"bin=411111;last4=1111", &sealed).is_ok());
        assert_eq!(
            ring.open(&t, &tok, b"bin=411111;last4=9999", &sealed).unwrap_err(),
            KeyError::Integrity
        );
    }

    #[test]
    fn fingerprints_are_per_tenant() {
        let ring = test_keyring();
        let pan = Pan::parse("4111111111111111").unwrap();
        let t1 = TenantId::parse("t1").unwrap();
        let t2 = TenantId::parse("t2").unwrap();
        assert_eq!(ring.fingerprint(&t1, &pan), ring.fingerprint(&t1, &pan));
        assert_ne!(ring.fingerprint(&t1, &pan), ring.fingerprint(&t2, &pan));
        let other = Pan::parse("4012888888881881").unwrap();
        assert_ne!(ring.fingerprint(&t1, &pan), ring.fingerprint(&t1, &other));
    }

    #[test]
    fn self_test_passes() {
        assert!(test_keyring().self_test());
    }
}
