//! Zero-config dev mode: generated keys in the data directory, a dev JWT issuer,
//! and dev clients for each role. Never for production: the keys sit unencrypted
//! next to the data, and every dev client may act for every tenant.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::config::{
    AuthSettings, ClientEntry, DEFAULT_MAX_BODY_BYTES, JwtAlg, JwtKey, KeystoreSettings, LogFormat, Mode, ProviderKind,
    Settings,
};
use crate::domain::scope::Scope;
use crate::domain::tenant::TenantId;
use crate::keys::keystore::{Keystore, KeystoreError, RootKey, write_private};
use crate::keys::provider::{KeyProvider, SoftwareRoot};

pub const DEV_ISSUER: &str = "tokenvault-dev";
pub const DEV_AUDIENCE: &str = "tokenvault";
pub const DEV_KID: &str = "dev-ed25519-1";

/// The dev roles and what each may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// The masking/IVR edge: tokens:create, tokens:update (a reissued card's new expiry).
    Edge,
    /// CRM and order systems: tokens:read, tokens:delete.
    Crm,
    /// The PSP connector: tokens:detokenize, charges:create, charges:read, charges:capture,
    /// charges:refund, charges:cancel.
    Psp,
    /// A security officer: keys:admin.
    Officer,
    /// A second security officer (dual control): keys:admin.
    Officer2,
    /// A bulk importer (migration from a legacy file): tokens:create, tokens:dedupe.
    Importer,
    /// A tenant's audit reader: audit:read (not a global admin: its JWT tenant's records only).
    Siem,
    /// The SRE who takes backups: vault:backup (global: a backup spans every tenant).
    Operator,
}

impl Role {
    pub const ALL: [Role; 8] = [
        Role::Edge,
        Role::Crm,
        Role::Psp,
        Role::Officer,
        Role::Officer2,
        Role::Importer,
        Role::Siem,
        Role::Operator,
    ];

    pub fn sub(self) -> &'static str {
        match self {
            Role::Edge => "dev-edge",
            Role::Crm => "dev-crm",
            Role::Psp => "dev-psp",
            Role::Officer => "dev-officer",
            Role::Officer2 => "dev-officer-2",
            Role::Importer => "dev-importer",
            Role::Siem => "dev-siem",
            Role::Operator => "dev-operator",
        }
    }

    pub fn scopes(self) -> &'static [Scope] {
        match self {
            Role::Edge => &[Scope::TokensCreate, Scope::TokensUpdate],
            Role::Crm => &[Scope::TokensRead, Scope::TokensDelete],
            Role::Psp => &[
                Scope::TokensDetokenize,
                Scope::ChargesCreate,
                Scope::ChargesRead,
                Scope::ChargesCapture,
                Scope::ChargesRefund,
                Scope::ChargesCancel,
            ],
            Role::Officer | Role::Officer2 => &[Scope::KeysAdmin, Scope::AuditRead],
            Role::Operator => &[Scope::VaultBackup],
            Role::Importer => &[Scope::TokensCreate, Scope::TokensDedupe],
            Role::Siem => &[Scope::AuditRead],
        }
    }

    /// Officers and the operator are global administrators in the dev registry.
    pub fn global_admin(self) -> bool {
        matches!(self, Role::Officer | Role::Officer2 | Role::Operator)
    }
}

/// Why dev mode could not start or mint a token.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("{0} is not a dev-mode data directory (no dev/DEV-MODE.json); refusing")]
    NotDevDir(PathBuf),
    #[error("{0} holds a vault but no dev-mode marker: it is not a dev data directory; refusing")]
    ForeignData(PathBuf),
    #[error("dev mode I/O error at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Keystore(#[from] KeystoreError),
    #[error("invalid tenant id (1-64 characters of A-Z a-z 0-9 . _ -)")]
    Tenant,
    #[error("could not sign the dev token")]
    Sign,
}

#[derive(Serialize, Deserialize)]
struct Marker {
    issuer: String,
    audience: String,
    kid: String,
}

/// Where dev mode keeps its files inside the data directory.
#[derive(Debug, Clone)]
pub struct DevPaths {
    pub marker: PathBuf,
    pub root_key: PathBuf,
    pub keystore: PathBuf,
    pub issuer_private: PathBuf,
    pub issuer_public: PathBuf,
    /// The dev voice connector's Basic password (dev only) and its Argon2 hash.
    pub voice_password: PathBuf,
    pub voice_hash: PathBuf,
}

impl DevPaths {
    pub fn new(data_dir: &Path) -> DevPaths {
        DevPaths {
            marker: data_dir.join("dev/DEV-MODE.json"),
            root_key: data_dir.join("keys/dev-root.key"),
            keystore: data_dir.join("keys/keystore.json"),
            issuer_private: data_dir.join("dev/issuer-ed25519.pem"),
            issuer_public: data_dir.join("dev/issuer-ed25519.pub.pem"),
            voice_password: data_dir.join("dev/voice-password"),
            voice_hash: data_dir.join("dev/voice-password.argon2"),
        }
    }
}

/// Prepares a dev data directory (generating what is missing) and returns the
/// settings to serve it, plus the files created on this start.
pub fn bootstrap(data_dir: &Path, listen: std::net::SocketAddr) -> Result<(Settings, Vec<PathBuf>), DevError> {
    let paths = DevPaths::new(data_dir);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DevError::Io { path, source }
    };
    if !paths.marker.exists() && data_dir.join("sled").exists() {
        return Err(DevError::ForeignData(data_dir.to_owned()));
    }
    fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    restrict_dir(data_dir)?;
    let mut created = Vec::new();
    if !paths.marker.exists() {
        let marker = Marker {
            issuer: DEV_ISSUER.into(),
            audience: DEV_AUDIENCE.into(),
            kid: DEV_KID.into(),
        };
        let json = serde_json::to_vec_pretty(&marker).unwrap_or_default();
        write_private(&paths.marker, &json)?;
        created.push(paths.marker.clone());
    }
    let root = if paths.root_key.exists() {
        RootKey::load(&paths.root_key)?
    } else {
        created.push(paths.root_key.clone());
        RootKey::generate(&paths.root_key)?
    };
    if !paths.keystore.exists() {
        Keystore::create(&paths.keystore, dev_provider(&root), None, "dev-bootstrap")?;
        created.push(paths.keystore.clone());
    }
    if !paths.issuer_private.exists() {
        let mut seed = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(seed.as_mut());
        let signing = SigningKey::from_bytes(&seed);
        let private_pem = signing.to_pkcs8_pem(LineEnding::LF).map_err(|_| DevError::Sign)?;
        let public_pem = signing
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|_| DevError::Sign)?;
        let _ = fs::remove_file(&paths.issuer_public);
        write_private(&paths.issuer_private, private_pem.as_bytes())?;
        write_private(&paths.issuer_public, public_pem.as_bytes())?;
        created.push(paths.issuer_private.clone());
        created.push(paths.issuer_public.clone());
    }
    if !paths.voice_hash.exists() {
        let mut raw = Zeroizing::new([0u8; 18]);
        rand::rngs::OsRng.fill_bytes(raw.as_mut());
        let password = Zeroizing::new(base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            raw.as_ref(),
        ));
        let hash = hash_password(password.as_bytes()).map_err(|_| DevError::Sign)?;
        write_private(&paths.voice_password, password.as_bytes())?;
        write_private(&paths.voice_hash, hash.as_bytes())?;
        created.push(paths.voice_password.clone());
    }
    Ok((settings_for(data_dir, listen).0, created))
}

/// The dev voice connector's user name (HTTP Basic).
pub const VOICE_USER: &str = "voice";

/// An Argon2id PHC string of `password` (fresh random salt, the crate's defaults).
pub fn hash_password(password: &[u8]) -> Result<String, argon2::password_hash::Error> {
    use argon2::PasswordHasher;
    let salt = argon2::password_hash::SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Ok(argon2::Argon2::default().hash_password(password, &salt)?.to_string())
}

/// The dev voice connector client (tenant `default`; creates tokens and charges),
/// if its credential exists.
fn voice_client(paths: &DevPaths) -> Option<ClientEntry> {
    let hash = fs::read_to_string(&paths.voice_hash).ok()?;
    Some(ClientEntry {
        sub: VOICE_USER.into(),
        scopes: [Scope::TokensCreate, Scope::ChargesCreate].into_iter().collect(),
        tenants: ["default".to_owned()].into_iter().collect(),
        cert_sha256: None,
        global_admin: false,
        basic_password_hash: Some(hash.trim().to_owned()),
    })
}

/// `USER:PASSWORD` of the dev voice connector in a dev data directory.
pub fn voice_credentials(data_dir: &Path) -> Result<Zeroizing<String>, DevError> {
    let paths = DevPaths::new(data_dir);
    if !paths.marker.exists() {
        return Err(DevError::NotDevDir(data_dir.to_owned()));
    }
    let password = Zeroizing::new(
        fs::read_to_string(&paths.voice_password).map_err(|source| DevError::Io {
            path: paths.voice_password.clone(),
            source,
        })?,
    );
    Ok(Zeroizing::new(format!("{VOICE_USER}:{}", password.trim())))
}

/// The settings that serve an existing dev data directory (nothing is generated).
pub fn settings_for(data_dir: &Path, listen: std::net::SocketAddr) -> (Settings, DevPaths) {
    let paths = DevPaths::new(data_dir);
    let settings = Settings {
        mode: Mode::Dev,
        listen,
        data_dir: data_dir.to_owned(),
        auth: AuthSettings {
            issuer: DEV_ISSUER.into(),
            audience: DEV_AUDIENCE.into(),
            keys: vec![JwtKey {
                kid: DEV_KID.into(),
                alg: JwtAlg::EdDSA,
                public_key_file: paths.issuer_public.clone(),
            }],
            leeway_secs: 30,
            allow_rs256: false,
            cache_capacity: 10_000,
            max_token_lifetime_secs: 24 * 3600,
        },
        clients: Role::ALL
            .iter()
            .map(|r| ClientEntry {
                sub: r.sub().into(),
                scopes: r.scopes().iter().copied().collect(),
                tenants: ["*".to_owned()].into_iter().collect(),
                cert_sha256: None,
                global_admin: r.global_admin(),
                basic_password_hash: None,
            })
            .chain(voice_client(&paths))
            .collect(),
        keystore: KeystoreSettings {
            path: paths.keystore.clone(),
            provider: ProviderKind::Sealed,
            pkcs11: None,
            cryptoperiod: None,
            dev_root_key_file: Some(paths.root_key.clone()),
        },
        max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        log_format: LogFormat::Pretty,
        workers: None,
        psp: None,
        cvv_ttl: crate::config::DEFAULT_CVV_TTL,
        idempotency_window: crate::config::DEFAULT_IDEMPOTENCY_WINDOW,
        rate_limits: None,
        allow_root: true,
        mlockall: false,
        tls: None,
        anomaly_guard: None,
        enumeration_guard: Some(crate::limits::EnumerationParams::default()),
        metrics_listen: None,
        auth_failures: crate::limits::FailureParams::default(),
        config_file: None,
        kek_wrap_limit: crate::config::DEFAULT_KEK_WRAP_LIMIT,
        deletion_epoch: None,
        store: Default::default(),
        cvv_redis: None,
        cvv_redis_file: None,
        lifecycle: crate::config::Lifecycle::default(),
    };
    (settings, paths)
}

/// Claims of a dev token.
#[derive(Serialize)]
struct DevClaims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    scope: String,
    tenant: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
}

/// Mints a JWT for a dev role, signed by the data directory's dev issuer key.
pub fn mint_token(data_dir: &Path, role: Role, tenant: &str, ttl: Duration) -> Result<String, DevError> {
    let paths = DevPaths::new(data_dir);
    if !paths.marker.is_file() {
        return Err(DevError::NotDevDir(data_dir.to_owned()));
    }
    let tenant = TenantId::parse(tenant).ok_or(DevError::Tenant)?;
    let pem = Zeroizing::new(fs::read(&paths.issuer_private).map_err(|source| DevError::Io {
        path: paths.issuer_private.clone(),
        source,
    })?);
    let key = EncodingKey::from_ed_pem(&pem).map_err(|_| DevError::Sign)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = DevClaims {
        iss: DEV_ISSUER,
        aud: DEV_AUDIENCE,
        sub: role.sub(),
        scope: role.scopes().iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" "),
        tenant: tenant.as_str(),
        iat: now,
        nbf: now,
        exp: now + ttl.as_secs().max(1),
    };
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(DEV_KID.into());
    jsonwebtoken::encode(&header, &claims, &key).map_err(|_| DevError::Sign)
}

/// The dev root of trust: the root key file, auto-unsealing (never in production).
pub fn dev_provider(root: &RootKey) -> std::sync::Arc<dyn KeyProvider> {
    std::sync::Arc::new(SoftwareRoot::new(root.key(), "dev-root-file"))
}

/// Whether `data_dir` was set up by dev mode.
pub fn is_dev_dir(data_dir: &Path) -> bool {
    DevPaths::new(data_dir).marker.exists()
}

fn restrict_dir(dir: &Path) -> Result<(), DevError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| DevError::Io {
        path: dir.to_owned(),
        source,
    })
}
