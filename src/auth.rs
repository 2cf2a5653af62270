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

use crate::config::{AuthSettings, ClientEntry, JwtAlg, Scope};
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
}

impl AuthError {
    /// 401 for a credential that does not verify, 403 for one that does but is not allowed.
    pub fn is_forbidden(self) -> bool {
        matches!(
            self,
            AuthError::ClientUnknown | AuthError::ScopeDenied | AuthError::TenantDenied
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
        }
    }
}

/// Why the authenticator could not be built from configuration.
#[derive(Debug, thiserror::Error)]
#[error("auth configuration error: {0}")]
pub struct AuthConfigError(String);

/// An authenticated, authorized caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub sub: String,
    pub tenant: TenantId,
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
    all_tenants: bool,
    tenants: BTreeSet<String>,
}

/// Verifies bearer tokens and checks them against the client registry.
pub struct Authenticator {
    keys: HashMap<String, VerifyKey>,
    registry: HashMap<String, Grant>,
    cache: quick_cache::sync::Cache<[u8; 32], Arc<Verified>>,
}

impl Authenticator {
    pub fn new(
        settings: &AuthSettings,
        clients: &[ClientEntry],
    ) -> Result<Authenticator, AuthConfigError> {
        let mut keys = HashMap::new();
        for k in &settings.keys {
            let pem = fs::read(&k.public_key_file).map_err(|e| {
                AuthConfigError(format!(
                    "cannot read JWT key {}: {e}",
                    k.public_key_file.display()
                ))
            })?;
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
        let registry = clients
            .iter()
            .map(|c| {
                let grant = Grant {
                    scopes: c.scopes.clone(),
                    all_tenants: c.tenants.contains("*"),
                    tenants: c.tenants.clone(),
                };
                (c.sub.clone(), grant)
            })
            .collect();
        Ok(Authenticator {
            keys,
            registry,
            cache: quick_cache::sync::Cache::new(settings.cache_capacity.max(16)),
        })
    }

    /// Authenticates the `Authorization` header value and authorizes `scope`.
    pub fn authorize(&self, header: Option<&[u8]>, scope: Scope) -> Result<Principal, AuthError> {
        let verified = self.authenticate(header)?;
        let grant = self
            .registry
            .get(&verified.sub)
            .ok_or(AuthError::ClientUnknown)?;
        if !verified.scopes.contains(&scope) || !grant.scopes.contains(&scope) {
            return Err(AuthError::ScopeDenied);
        }
        let tenant = verified.tenant.clone().ok_or(AuthError::TenantDenied)?;
        if !grant.all_tenants && !grant.tenants.contains(tenant.as_str()) {
            return Err(AuthError::TenantDenied);
        }
        Ok(Principal {
            sub: verified.sub.clone(),
            tenant,
        })
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
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
            .map_err(|e| classify(&e))?;
        let claims = data.claims;
        Ok(Verified {
            sub: claims.sub,
            scopes: claims
                .scope
                .split_whitespace()
                .filter_map(Scope::parse)
                .collect(),
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
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm => AuthError::AlgorithmNotAllowed,
        _ => AuthError::Malformed,
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
