//! Authentication (JWT) and authorization (scope ∧ client registry ∧ tenant).
//!
//! Deny by default: a request is allowed only if the JWT verifies under a
//! configured key (selected by `kid`, with that key's one asymmetric algorithm),
//! its `iss`/`aud`/`exp`/`nbf` check out, its `scope` carries the permission, and
//! the vault's own registry grants that `sub` the permission for the JWT's tenant.
//! Verified tokens are cached (bounded, keyed by a hash, never past `exp`).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::{AuthSettings, ClientEntry, JwtAlg};
use crate::domain::scope::Scope;
use crate::domain::tenant::TenantId;

/// Why a request was refused. `reason()` is a fixed label for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed bearer token")]
    Malformed,
    #[error("token algorithm not allowed")]
    AlgorithmNotAllowed,
    #[error("unknown key id")]
    UnknownKid,
    #[error("bad signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("wrong issuer")]
    BadIssuer,
    #[error("wrong audience")]
    BadAudience,
    #[error("client not registered")]
    ClientUnknown,
    #[error("scope not granted")]
    ScopeDenied,
    #[error("tenant not allowed")]
    TenantDenied,
    #[error("client certificate does not match the registry's pin")]
    ClientCertificate,
    #[error("token lifetime exceeds the configured maximum")]
    LifetimeTooLong,
    #[error("this operation needs a global-admin grant in the registry")]
    GlobalAdminRequired,
    #[error("client revoked")]
    Revoked,
    #[error("wrong user name or password")]
    BadPassword,
}

impl AuthError {
    /// 401 for a credential that does not verify, 403 for one that does but is not allowed.
    pub fn is_forbidden(self) -> bool {
        matches!(
            self,
            AuthError::ClientUnknown
                | AuthError::ScopeDenied
                | AuthError::TenantDenied
                | AuthError::ClientCertificate
                | AuthError::GlobalAdminRequired
                | AuthError::Revoked
        )
    }

    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::AlgorithmNotAllowed => "algorithm",
            AuthError::UnknownKid => "unknown_kid",
            AuthError::BadSignature => "signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::BadIssuer => "issuer",
            AuthError::BadAudience => "audience",
            AuthError::ClientUnknown => "client",
            AuthError::ScopeDenied => "scope",
            AuthError::TenantDenied => "tenant",
            AuthError::ClientCertificate => "client_cert",
            AuthError::LifetimeTooLong => "lifetime",
            AuthError::GlobalAdminRequired => "global_admin",
            AuthError::Revoked => "revoked",
            AuthError::BadPassword => "password",
        }
    }
}

/// Verified in place of an unknown user's hash so that an unknown user costs the
/// same as a wrong password (the Argon2id hash of a random, discarded password).
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0Fd1Y8q0Rz3k0dVUoSnnGrmXlYcZ3bhQjBCBVOYGbOQ";

/// Why the authenticator could not be built from configuration.
#[derive(Debug, thiserror::Error)]
#[error("auth configuration error: {0}")]
pub struct AuthConfigError(String);

/// An authenticated, authorized caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub sub: String,
    pub tenant: TenantId,
    /// Scopes both the JWT and the registry grant (bits of [`Scope::bit`]).
    pub granted: u32,
    /// The registry marks this client as a global administrator (every tenant's
    /// audit records; key custody, which spans tenants).
    pub global_admin: bool,
}

impl Principal {
    /// Whether the caller holds `scope` (JWT and registry both).
    pub fn may(&self, scope: Scope) -> bool {
        self.granted & scope.bit() != 0
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    scope: String,
    #[serde(default)]
    tenant: Option<String>,
}

/// A verified token as cached: its claims, reduced to what authorization needs.
#[derive(Debug)]
struct Verified {
    sub: String,
    scopes: BTreeSet<Scope>,
    tenant: Option<TenantId>,
    exp: u64,
}

struct VerifyKey {
    key: DecodingKey,
    validation: Validation,
}

struct Grant {
    scopes: BTreeSet<Scope>,
    global_admin: bool,
    all_tenants: bool,
    tenants: BTreeSet<String>,
    /// SHA-256 of the SPKI of the client certificate this client must present.
    pin: Option<[u8; 32]>,
    /// An HTTP Basic client's password hash (Argon2id PHC string).
    basic: Option<String>,
}

/// Verifies bearer tokens and checks them against the client registry. The
/// registry can be replaced while serving ([`Authenticator::reload_registry`], on
/// SIGHUP): a revoked client is refused from the next request on.
pub struct Authenticator {
    keys: HashMap<String, VerifyKey>,
    registry: std::sync::RwLock<Arc<HashMap<String, Grant>>>,
    cache: quick_cache::sync::Cache<[u8; 32], Arc<Verified>>,
    /// Longest lifetime (exp − now) a JWT may have.
    max_lifetime_secs: u64,
    /// HTTP Basic credentials that verified recently: SHA-256 of the header → the
    /// client and until when (an Argon2 check per retry would be a CPU lever).
    /// Emptied when the registry is reloaded.
    basic_cache: quick_cache::sync::Cache<[u8; 32], (String, u64)>,
}

/// How long a verified HTTP Basic credential is remembered.
const BASIC_CACHE_SECS: u64 = 300;

fn build_registry(clients: &[ClientEntry]) -> HashMap<String, Grant> {
    clients
        .iter()
        .map(|c| {
            let grant = Grant {
                scopes: c.scopes.clone(),
                global_admin: c.global_admin,
                all_tenants: c.tenants.contains("*"),
                tenants: c.tenants.clone(),
                pin: c
                    .cert_sha256
                    .as_deref()
                    .and_then(|h| hex::decode(h).ok())
                    .and_then(|b| b.try_into().ok()),
                basic: c.basic_password_hash.clone(),
            };
            (c.sub.clone(), grant)
        })
        .collect()
}

impl Authenticator {
    pub fn new(settings: &AuthSettings, clients: &[ClientEntry]) -> Result<Authenticator, AuthConfigError> {
        let mut keys = HashMap::new();
        for k in &settings.keys {
            let pem = fs::read(&k.public_key_file)
                .map_err(|e| AuthConfigError(format!("cannot read JWT key {}: {e}", k.public_key_file.display())))?;
            let (alg, key) = match k.alg {
                JwtAlg::EdDSA => (Algorithm::EdDSA, DecodingKey::from_ed_pem(&pem)),
                JwtAlg::ES256 => (Algorithm::ES256, DecodingKey::from_ec_pem(&pem)),
                JwtAlg::RS256 => (Algorithm::RS256, DecodingKey::from_rsa_pem(&pem)),
            };
            let key = key.map_err(|_| {
                AuthConfigError(format!(
                    "JWT key {} is not a {:?} public key",
                    k.public_key_file.display(),
                    k.alg
                ))
            })?;
            let mut validation = Validation::new(alg);
            validation.algorithms = vec![alg];
            validation.leeway = settings.leeway_secs;
            validation.validate_exp = true;
            validation.validate_nbf = true;
            validation.set_issuer(&[&settings.issuer]);
            validation.set_audience(&[&settings.audience]);
            validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            keys.insert(k.kid.clone(), VerifyKey { key, validation });
        }
        Ok(Authenticator {
            keys,
            registry: std::sync::RwLock::new(Arc::new(build_registry(clients))),
            cache: quick_cache::sync::Cache::new(settings.cache_capacity.max(16)),
            max_lifetime_secs: settings.max_token_lifetime_secs,
            basic_cache: quick_cache::sync::Cache::new(1_024),
        })
    }

    /// Replaces the client registry (a revoked client is refused from now on).
    pub fn reload_registry(&self, clients: &[ClientEntry]) -> usize {
        let fresh = Arc::new(build_registry(clients));
        let n = fresh.len();
        *self.registry.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        self.basic_cache.clear();
        n
    }

    /// Whether this `Authorization` header is an HTTP Basic credential that
    /// verified recently (no hash computed).
    pub fn basic_known(&self, header: Option<&[u8]>) -> bool {
        header.is_some_and(|h| {
            let key: [u8; 32] = Sha256::digest(h).into();
            self.basic_cache.get(&key).is_some_and(|(_, until)| now_secs() < until)
        })
    }

    /// Authenticates an HTTP Basic `Authorization` header against the registry's
    /// `basic_password_hash` clients and authorizes `scope` for the client's one
    /// tenant. Blocking: an Argon2 check takes tens of milliseconds (unless the
    /// credential verified recently); run it off the async workers. An unknown
    /// user costs the same check as a wrong password (no user enumeration by time).
    pub fn authorize_basic(
        &self,
        header: Option<&[u8]>,
        scope: Scope,
        peer_spki: Option<[u8; 32]>,
    ) -> Result<Principal, AuthError> {
        use argon2::PasswordVerifier;
        let header = header.ok_or(AuthError::Missing)?;
        let cache_key: [u8; 32] = Sha256::digest(header).into();
        let registry = self.registry.read().unwrap_or_else(|p| p.into_inner()).clone();
        let now = now_secs();
        let sub = match self.basic_cache.get(&cache_key) {
            Some((sub, until)) if now < until => sub,
            _ => {
                let encoded = std::str::from_utf8(header)
                    .ok()
                    .and_then(|h| h.strip_prefix("Basic ").or_else(|| h.strip_prefix("basic ")))
                    .map(str::trim)
                    .filter(|t| !t.is_empty() && t.len() <= 1024)
                    .ok_or(AuthError::Malformed)?;
                let decoded = zeroize::Zeroizing::new(
                    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, encoded)
                        .map_err(|_| AuthError::Malformed)?,
                );
                let text = std::str::from_utf8(&decoded).map_err(|_| AuthError::Malformed)?;
                let (user, password) = text.split_once(':').ok_or(AuthError::Malformed)?;
                let hash = registry
                    .get(user)
                    .and_then(|g| g.basic.as_deref())
                    .unwrap_or(DUMMY_HASH);
                let parsed = argon2::PasswordHash::new(hash).map_err(|_| AuthError::BadPassword)?;
                let ok = argon2::Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok();
                if !ok || hash == DUMMY_HASH {
                    return Err(AuthError::BadPassword);
                }
                self.basic_cache
                    .insert(cache_key, (user.to_owned(), now + BASIC_CACHE_SECS));
                user.to_owned()
            }
        };
        let grant = registry.get(&sub).ok_or(AuthError::ClientUnknown)?;
        if grant.basic.is_none() {
            return Err(AuthError::BadPassword);
        }
        if !grant.scopes.contains(&scope) {
            return Err(AuthError::ScopeDenied);
        }
        let tenant = grant
            .tenants
            .iter()
            .next()
            .and_then(|t| TenantId::parse(t))
            .ok_or(AuthError::TenantDenied)?;
        if let Some(pin) = &grant.pin {
            use subtle::ConstantTimeEq;
            if !peer_spki.is_some_and(|p| bool::from(p.ct_eq(pin))) {
                return Err(AuthError::ClientCertificate);
            }
        }
        Ok(Principal {
            sub,
            tenant,
            granted: grant.scopes.iter().fold(0, |bits, s| bits | s.bit()),
            global_admin: false,
        })
    }

    /// Authenticates the `Authorization` header value and authorizes `scope`.
    /// `peer_spki` is the SPKI hash of the TLS client certificate, if one was presented.
    pub fn authorize(
        &self,
        header: Option<&[u8]>,
        scope: Scope,
        peer_spki: Option<[u8; 32]>,
    ) -> Result<Principal, AuthError> {
        let verified = self.authenticate(header)?;
        let registry = self.registry.read().unwrap_or_else(|p| p.into_inner()).clone();
        let grant = registry.get(&verified.sub).ok_or(AuthError::ClientUnknown)?;
        if !verified.scopes.contains(&scope) || !grant.scopes.contains(&scope) {
            return Err(AuthError::ScopeDenied);
        }
        // Key custody and backups span every tenant: they need an explicit global grant.
        if matches!(scope, Scope::KeysAdmin | Scope::VaultBackup) && !grant.global_admin {
            return Err(AuthError::GlobalAdminRequired);
        }
        let tenant = verified.tenant.clone().ok_or(AuthError::TenantDenied)?;
        if !grant.all_tenants && !grant.tenants.contains(tenant.as_str()) {
            return Err(AuthError::TenantDenied);
        }
        if let Some(pin) = &grant.pin {
            use subtle::ConstantTimeEq;
            let matches = peer_spki.is_some_and(|p| bool::from(p.ct_eq(pin)));
            if !matches {
                return Err(AuthError::ClientCertificate);
            }
        }
        let granted = verified
            .scopes
            .iter()
            .filter(|s| grant.scopes.contains(s))
            .fold(0, |bits, s| bits | s.bit());
        Ok(Principal {
            sub: verified.sub.clone(),
            tenant,
            granted,
            global_admin: grant.global_admin,
        })
    }

    /// Whether this `Authorization` header carries a token that already verified
    /// and has not expired (a cache lookup: no signature check). A source blocked
    /// for its failures still lets such a known-good credential through.
    pub fn known_good(&self, header: Option<&[u8]>) -> bool {
        let Some(token) = header
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
        else {
            return false;
        };
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.cache.get(&key).is_some_and(|v| now_secs() < v.exp)
    }

    fn authenticate(&self, header: Option<&[u8]>) -> Result<Arc<Verified>, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let header = std::str::from_utf8(header).map_err(|_| AuthError::Malformed)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= 8192)
            .ok_or(AuthError::Malformed)?;
        let cache_key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = now_secs();
        if let Some(hit) = self.cache.get(&cache_key) {
            if now < hit.exp {
                return Ok(hit);
            }
            self.cache.remove(&cache_key);
        }
        let verified = Arc::new(self.verify(token)?);
        // A stolen long-lived token is a standing credential: refuse it.
        if verified.exp > now + self.max_lifetime_secs {
            return Err(AuthError::LifetimeTooLong);
        }
        if now < verified.exp {
            self.cache.insert(cache_key, verified.clone());
        }
        Ok(verified)
    }

    fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| classify(&e))?;
        let kid = header.kid.as_deref().ok_or(AuthError::UnknownKid)?;
        let key = self.keys.get(kid).ok_or(AuthError::UnknownKid)?;
        if !key.validation.algorithms.contains(&header.alg) {
            return Err(AuthError::AlgorithmNotAllowed);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation).map_err(|e| classify(&e))?;
        let claims = data.claims;
        Ok(Verified {
            sub: claims.sub,
            scopes: claims.scope.split_whitespace().filter_map(Scope::parse).collect(),
            tenant: claims.tenant.as_deref().and_then(TenantId::parse),
            exp: claims.exp,
        })
    }
}

fn classify(e: &jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::BadIssuer,
        ErrorKind::InvalidAudience => AuthError::BadAudience,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => {
            AuthError::AlgorithmNotAllowed
        }
        _ => AuthError::Malformed,
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use ed25519_dalek::SigningKey;
    use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
    use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;
    use crate::config::JwtKey;

    /// Writes a fresh Ed25519 public key for `kid` and returns the signing key.
    fn keypair(dir: &Path, kid: &str, seed: u8) -> (JwtKey, EncodingKey) {
        let signing = SigningKey::from_bytes(&[seed; 32]);
        let public_key_file = dir.join(format!("{kid}.pub.pem"));
        std::fs::write(
            &public_key_file,
            signing.verifying_key().to_public_key_pem(LineEnding::LF).unwrap(),
        )
        .unwrap();
        let enc = EncodingKey::from_ed_pem(signing.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
        (
            JwtKey {
                kid: kid.into(),
                alg: JwtAlg::EdDSA,
                public_key_file,
            },
            enc,
        )
    }

    fn authenticator(keys: Vec<JwtKey>, leeway_secs: u64) -> Authenticator {
        let settings = AuthSettings {
            issuer: "iss".into(),
            audience: "aud".into(),
            keys,
            leeway_secs,
            allow_rs256: false,
            cache_capacity: 100,
            max_token_lifetime_secs: 3600,
        };
        let clients = [
            ClientEntry {
                sub: "edge".into(),
                scopes: [Scope::TokensCreate].into_iter().collect(),
                tenants: ["acme".to_owned()].into_iter().collect(),
                cert_sha256: None,
                global_admin: false,
                basic_password_hash: None,
            },
            ClientEntry {
                sub: "voice".into(),
                scopes: [Scope::TokensCreate].into_iter().collect(),
                tenants: ["acme".to_owned()].into_iter().collect(),
                cert_sha256: None,
                global_admin: false,
                basic_password_hash: Some(crate::dev::hash_password(b"correct horse battery").unwrap()),
            },
        ];
        Authenticator::new(&settings, &clients).unwrap()
    }

    #[test]
    fn basic_credentials_verify_against_the_registry_hash_only() {
        let dir = tempfile::tempdir().unwrap();
        let (k, _) = keypair(dir.path(), "k", 1);
        let auth = authenticator(vec![k], 30);
        let basic = |user_pass: &str| {
            format!(
                "Basic {}",
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, user_pass)
            )
            .into_bytes()
        };
        let p = auth
            .authorize_basic(Some(&basic("voice:correct horse battery")), Scope::TokensCreate, None)
            .unwrap();
        assert_eq!((p.sub.as_str(), p.tenant.as_str()), ("voice", "acme"));
        assert!(p.may(Scope::TokensCreate) && !p.may(Scope::ChargesCreate));
        // Remembered: the same header verifies without a hash; a reload forgets it.
        assert!(auth.basic_known(Some(&basic("voice:correct horse battery"))));
        let check = |h: &[u8], scope| auth.authorize_basic(Some(h), scope, None).map(|_| ()).unwrap_err();
        assert_eq!(
            check(&basic("voice:Correct horse battery"), Scope::TokensCreate),
            AuthError::BadPassword
        );
        assert_eq!(
            check(&basic("nobody:correct horse battery"), Scope::TokensCreate),
            AuthError::BadPassword
        );
        // A JWT client has no password: Basic never authenticates it.
        assert_eq!(check(&basic("edge:"), Scope::TokensCreate), AuthError::BadPassword);
        assert_eq!(check(b"Basic !!!", Scope::TokensCreate), AuthError::Malformed);
        assert_eq!(check(&basic("no colon"), Scope::TokensCreate), AuthError::Malformed);
        assert_eq!(check(b"Bearer x.y.z", Scope::TokensCreate), AuthError::Malformed);
        assert_eq!(
            check(&basic("voice:correct horse battery"), Scope::KeysAdmin),
            AuthError::ScopeDenied
        );
        assert!(
            argon2::PasswordHash::new(DUMMY_HASH).is_ok(),
            "the stand-in hash verifies like a real one"
        );
        auth.reload_registry(&[]);
        assert!(!auth.basic_known(Some(&basic("voice:correct horse battery"))));
        assert_eq!(
            check(&basic("voice:correct horse battery"), Scope::TokensCreate),
            AuthError::BadPassword,
            "a revoked connector is refused"
        );
    }

    fn jwt(key: &EncodingKey, kid: &str, exp: u64) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.into());
        let claims =
            json!({"iss": "iss", "aud": "aud", "sub": "edge", "scope": "tokens:create", "tenant": "acme", "exp": exp});
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }

    fn bearer(t: &str) -> Vec<u8> {
        format!("Bearer {t}").into_bytes()
    }

    #[test]
    fn kid_selects_the_key_so_issuers_can_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let (old, old_key) = keypair(dir.path(), "2026-10", 1);
        let (new, new_key) = keypair(dir.path(), "2026-11", 2);
        let auth = authenticator(vec![old, new], 30);
        let exp = now_secs() + 600;
        for (key, kid) in [(&old_key, "2026-10"), (&new_key, "2026-11")] {
            assert!(
                auth.authorize(Some(&bearer(&jwt(key, kid, exp))), Scope::TokensCreate, None)
                    .is_ok(),
                "{kid}"
            );
        }
        // A signature by one key presented under the other's kid fails.
        let crossed = jwt(&old_key, "2026-11", exp);
        assert_eq!(
            auth.authorize(Some(&bearer(&crossed)), Scope::TokensCreate, None)
                .unwrap_err(),
            AuthError::BadSignature
        );
        // The registry still decides the scope and tenant.
        let ok = jwt(&new_key, "2026-11", exp);
        assert_eq!(
            auth.authorize(Some(&bearer(&ok)), Scope::TokensRead, None).unwrap_err(),
            AuthError::ScopeDenied
        );
    }

    #[test]
    fn cache_never_serves_a_token_past_its_exp() {
        let dir = tempfile::tempdir().unwrap();
        let (k, key) = keypair(dir.path(), "k1", 3);
        let auth = authenticator(vec![k], 0);
        let exp = now_secs() + 2;
        let token = bearer(&jwt(&key, "k1", exp));
        assert!(auth.authorize(Some(&token), Scope::TokensCreate, None).is_ok());
        assert_eq!(auth.cache.len(), 1, "a verified token is cached");
        assert!(auth.authorize(Some(&token), Scope::TokensCreate, None).is_ok());
        assert_eq!(auth.cache.len(), 1);
        while now_secs() <= exp {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert_eq!(
            auth.authorize(Some(&token), Scope::TokensCreate, None).unwrap_err(),
            AuthError::Expired
        );
        assert_eq!(auth.cache.len(), 0, "the expired entry is dropped, not served");
    }

    #[test]
    fn long_lived_tokens_are_refused_and_revocation_needs_no_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (k, key) = keypair(dir.path(), "k1", 5);
        let auth = authenticator(vec![k], 0);
        let long = bearer(&jwt(&key, "k1", now_secs() + 7200));
        assert_eq!(
            auth.authorize(Some(&long), Scope::TokensCreate, None).unwrap_err(),
            AuthError::LifetimeTooLong
        );
        assert_eq!(auth.cache.len(), 0, "a refused token is not cached");
        let ok = bearer(&jwt(&key, "k1", now_secs() + 600));
        let p = auth.authorize(Some(&ok), Scope::TokensCreate, None).unwrap();
        assert!(p.may(Scope::TokensCreate) && !p.may(Scope::TokensDedupe));
        // Revoked by a registry reload: the cached token no longer passes.
        assert_eq!(auth.reload_registry(&[]), 0);
        assert_eq!(
            auth.authorize(Some(&ok), Scope::TokensCreate, None).unwrap_err(),
            AuthError::ClientUnknown
        );
    }

    #[test]
    fn failures_are_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let (k, key) = keypair(dir.path(), "k1", 4);
        let auth = authenticator(vec![k], 30);
        let token = bearer(&jwt(&key, "other", now_secs() + 600));
        assert_eq!(
            auth.authorize(Some(&token), Scope::TokensCreate, None).unwrap_err(),
            AuthError::UnknownKid
        );
        assert_eq!(auth.cache.len(), 0);
        assert_eq!(
            auth.authorize(None, Scope::TokensCreate, None).unwrap_err(),
            AuthError::Missing
        );
        assert_eq!(
            auth.authorize(Some(b"Basic abc"), Scope::TokensCreate, None)
                .unwrap_err(),
            AuthError::Malformed
        );
    }
}
