//! Typed configuration.
//!
//! Dev mode needs none: [`Settings::dev`] builds everything from a data
//! directory the dev bootstrap fills. Production mode reads a TOML file, then
//! `TOKENVAULT_*` environment overrides (`__` separates sections, e.g.
//! `TOKENVAULT_AUTH__ISSUER`), and refuses to start unless JWT verification keys,
//! issuer, audience, the client registry and the keystore are all explicit.
//! Secrets are referenced by file path (Kubernetes secrets), never given inline.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};

use crate::domain::scope::Scope;
/// The HSM settings are the key layer's own type; the config file carries them.
pub use crate::keys::pkcs11::Pkcs11Settings;
/// The PSP connector's settings are the connector's own type; the config file carries them.
pub use crate::psp::PspSettings;

/// Default request-body limit: a tokenize body is a few hundred bytes.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024;

/// Whether the vault runs with generated dev keys or with explicit production config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Dev,
    Production,
}

/// Signature algorithms the vault can be configured to accept. HMAC and `none`
/// are not representable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlg {
    EdDSA,
    ES256,
    RS256,
}

/// One issuer public key, selected by the JWT's `kid`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKey {
    pub kid: String,
    pub alg: JwtAlg,
    /// PEM file with the public key.
    pub public_key_file: PathBuf,
}

/// JWT verification settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub issuer: String,
    pub audience: String,
    pub keys: Vec<JwtKey>,
    /// Clock-skew allowance for `exp` and `nbf`.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Allow RS256 keys (off unless asked for).
    #[serde(default)]
    pub allow_rs256: bool,
    /// Verified-token cache size.
    #[serde(default = "default_cache")]
    pub cache_capacity: usize,
    /// Longest lifetime a JWT may have (its `exp` at most this far ahead), so a
    /// stolen token is not a standing credential. Default 1 hour.
    #[serde(default = "default_max_lifetime")]
    pub max_token_lifetime_secs: u64,
}

fn default_max_lifetime() -> u64 {
    3600
}

fn default_leeway() -> u64 {
    30
}

fn default_cache() -> usize {
    10_000
}

/// A client-registry entry: what one `sub` may do, for which tenants.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientEntry {
    pub sub: String,
    pub scopes: BTreeSet<Scope>,
    /// Tenant ids; `"*"` (every tenant) is accepted only in dev mode.
    pub tenants: BTreeSet<String>,
    /// Pin: SHA-256 (hex) of the SubjectPublicKeyInfo of the client certificate this
    /// client must present over mutual TLS.
    #[serde(default)]
    pub cert_sha256: Option<String>,
    /// A global administrator: `keys:admin` (key custody spans tenants) needs it,
    /// and with `audit:read` it reads every tenant's audit records (otherwise only
    /// its JWT tenant's).
    #[serde(default)]
    pub global_admin: bool,
    /// A voice platform's payment connector (`POST /v1/connectors/voice-pay`)
    /// authenticates as this client with HTTP Basic: `sub` is the user name and
    /// this the Argon2 hash (PHC string, `$argon2id$…`) of its password. Such a
    /// client lists exactly one tenant.
    #[serde(default)]
    pub basic_password_hash: Option<String>,
}

/// Who terminates TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// The vault terminates TLS itself (rustls, ring provider).
    Native,
    /// A sidecar or ingress terminates TLS in front of the vault (client-certificate
    /// pins cannot be enforced by the vault then).
    Upstream,
}

/// Transport security. Production requires this section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    pub mode: TlsMode,
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// CA certificates that sign client certificates: enables mutual TLS.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Refuse connections without a client certificate (otherwise only pinned clients need one).
    #[serde(default)]
    pub require_client_cert: bool,
}

/// Which root of trust protects the keystore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// Root key split among custodians; the vault starts sealed until M shares arrive.
    Sealed,
    /// Root key is a non-extractable AES key in an HSM (PKCS#11).
    Pkcs11,
}

/// Where the keystore lives and what protects it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeystoreSettings {
    /// The keystore file beside a sled store. Unused (and may be left out) with a
    /// PostgreSQL store, which keeps the keystore in the database.
    #[serde(default)]
    pub path: PathBuf,
    pub provider: ProviderKind,
    #[serde(default)]
    pub pkcs11: Option<Pkcs11Settings>,
    /// KEK cryptoperiod, e.g. "90d": the active KEK is rotated automatically when older.
    #[serde(default, with = "humantime_serde")]
    pub cryptoperiod: Option<Duration>,
    /// Dev mode only: the root key file that auto-unseals the vault.
    #[serde(skip)]
    pub dev_root_key_file: Option<PathBuf>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Everything the server needs to start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub auth: AuthSettings,
    pub clients: Vec<ClientEntry>,
    pub keystore: KeystoreSettings,
    pub max_body_bytes: usize,
    pub log_format: LogFormat,
    pub workers: Option<usize>,
    pub psp: Option<PspSettings>,
    /// How long a CVV may wait in memory for its charge (PCI DSS 3.3.1).
    pub cvv_ttl: std::time::Duration,
    /// How long an Idempotency-Key is remembered.
    pub idempotency_window: std::time::Duration,
    /// Per-client rate limits (None: unlimited, the dev default).
    pub rate_limits: Option<crate::limits::RateLimits>,
    /// Production only: allow running as root (refused by default).
    pub allow_root: bool,
    /// Lock all memory (mlockall) so secrets never reach swap.
    pub mlockall: bool,
    /// Transport security (None: plain HTTP, dev mode only).
    pub tls: Option<TlsSettings>,
    /// Detokenize anomaly guard (None: off, the dev default).
    pub anomaly_guard: Option<crate::limits::AnomalyParams>,
    /// Tokenize enumeration guard (None: off). On by default in both modes.
    pub enumeration_guard: Option<crate::limits::EnumerationParams>,
    /// Serve `/metrics` (and `/healthz`, `/readyz`) on this separate, internal
    /// listener instead of the main one.
    pub metrics_listen: Option<SocketAddr>,
    /// Unauthenticated-flood defences: per-source failure budget and aggregation.
    pub auth_failures: crate::limits::FailureParams,
    /// The production config file (re-read on SIGHUP for the client registry).
    pub config_file: Option<PathBuf>,
    /// DEK wraps per KEK version before it is rotated (its random-nonce budget).
    pub kek_wrap_limit: u64,
    /// Deletion epoch: the KEK is rotated this often, live records are rewrapped
    /// and versions wrapping nothing live are destroyed, so a deleted card cannot be
    /// opened from the data directory after at most two epochs (None: off).
    pub deletion_epoch: Option<std::time::Duration>,
    /// Where the data lives: sled in the data directory (default) or PostgreSQL.
    pub store: StoreSettings,
    /// A memory-only Redis (`redis://…`) that holds CVVs for every replica (None:
    /// each process's own memory, fine for one vault).
    pub cvv_redis: Option<secrecy::SecretString>,
    /// A file holding that URL (read at start; exclusive with `cvv_redis`).
    pub cvv_redis_file: Option<PathBuf>,
    /// Token lifetimes and card retention.
    pub lifecycle: Lifecycle,
}

/// How long tokens may be given to live, and how long unused cards are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifecycle {
    /// The shortest `ttl`/`expires_at` a tokenize may ask for.
    pub min_ttl: std::time::Duration,
    /// The longest.
    pub max_ttl: std::time::Duration,
    /// Per tenant: a card not used (tokenized, charged or detokenized) for this
    /// long is deleted (PCI DSS 3.2.1). A tenant not listed keeps its cards.
    pub retention: BTreeMap<String, std::time::Duration>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            min_ttl: std::time::Duration::from_secs(1),
            max_ttl: MAX_TOKEN_TTL,
            retention: BTreeMap::new(),
        }
    }
}

/// The longest any token may be given to live (and the default bound).
pub const MAX_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(400 * 86_400);

impl Lifecycle {
    /// Checks the bounds and the retention periods (each at least 1s, tenants valid).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.min_ttl < std::time::Duration::from_secs(1)
            || self.min_ttl > self.max_ttl
            || self.max_ttl > MAX_TOKEN_TTL
        {
            return Err(ConfigError::Invalid(
                "tokens: need 1s <= min_ttl <= max_ttl <= 400d".into(),
            ));
        }
        for (tenant, period) in &self.retention {
            if crate::domain::tenant::TenantId::parse(tenant).is_none() {
                return Err(ConfigError::Invalid(format!(
                    "retention: {tenant:?} is not a valid tenant id"
                )));
            }
            if *period < std::time::Duration::from_secs(1) {
                return Err(ConfigError::Invalid(format!("retention.{tenant} must be at least 1s")));
            }
        }
        Ok(())
    }
}

/// `[tokens]` in the production file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default, with = "humantime_serde")]
    min_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max_ttl: Option<Duration>,
}

impl Settings {
    /// The CVV Redis URL: inline, or read from `cvv_redis_file`.
    pub fn cvv_redis_url(&self) -> Result<Option<secrecy::SecretString>, ConfigError> {
        match (&self.cvv_redis, &self.cvv_redis_file) {
            (Some(_), Some(_)) => Err(ConfigError::Invalid(
                "cvv_redis and cvv_redis_file are exclusive: set one".into(),
            )),
            (url, None) => Ok(url.clone()),
            (None, Some(file)) => {
                let text = zeroize::Zeroizing::new(std::fs::read_to_string(file).map_err(|e| {
                    ConfigError::Invalid(format!("cannot read cvv_redis_file {}: {e}", file.display()))
                })?);
                Ok(Some(secrecy::SecretString::from(text.trim().to_owned())))
            }
        }
    }
}

/// `[store]`: the storage backend.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    /// `sled:PATH` (default: `<data_dir>/sled`) or `postgres://…` / `postgresql://…`.
    #[serde(default)]
    pub url: Option<String>,
    /// PostgreSQL: a file holding the password (production: required instead of a password in the URL).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PostgreSQL: PEM CA certificate(s) that sign the server's certificate (default: the system's roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PostgreSQL: connections in each replica's read pool (default 16).
    #[serde(default)]
    pub pool_size: Option<usize>,
    /// PostgreSQL: statement, connect and pool-wait limit, e.g. "5s" (the default).
    #[serde(default, with = "humantime_serde")]
    pub statement_timeout: Option<Duration>,
    /// sled: the page cache in MiB (default 1024, sled's own), 16 to 1048576. Ignored with
    /// PostgreSQL (`store copy` reads a sled vault's file and points it at a database).
    #[serde(default)]
    pub cache_mb: Option<u64>,
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: only its scheme is shown.
        let scheme = self.url.as_deref().map(|u| u.split(':').next().unwrap_or(""));
        f.debug_struct("StoreSettings")
            .field("scheme", &scheme)
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .field("cache_mb", &self.cache_mb)
            .finish()
    }
}

/// The sizes sled's page cache may take, in MiB (`[store] cache_mb`, `--sled-cache-mb`).
const SLED_CACHE_MIN_MB: u64 = 16;
const SLED_CACHE_MAX_MB: u64 = 1 << 20;

impl StoreSettings {
    /// sled's page cache in bytes (`None`: sled's default), checked.
    pub fn sled_cache_bytes(&self) -> Result<Option<u64>, ConfigError> {
        match self.cache_mb {
            None => Ok(None),
            Some(mb) if (SLED_CACHE_MIN_MB..=SLED_CACHE_MAX_MB).contains(&mb) => Ok(Some(mb << 20)),
            Some(_) => Err(ConfigError::Invalid(format!(
                "store.cache_mb (sled's page cache) must be {SLED_CACHE_MIN_MB}..={SLED_CACHE_MAX_MB} MiB"
            ))),
        }
    }

    /// The backend these settings name, for a vault whose data directory is `data_dir`.
    pub fn location(&self, data_dir: &Path) -> Result<crate::store::StoreLocation, ConfigError> {
        let cache = self.sled_cache_bytes()?;
        let url = match self.url.as_deref() {
            None | Some("") => return Ok(crate::store::StoreLocation::Sled(data_dir.join("sled"), cache)),
            Some(u) => u,
        };
        if let Some(path) = url.strip_prefix("sled:") {
            if path.is_empty() {
                return Err(ConfigError::Invalid("store url: sled:PATH needs a path".into()));
            }
            return Ok(crate::store::StoreLocation::Sled(PathBuf::from(path), cache));
        }
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError::Invalid(
                "store url must be sled:PATH, postgres://… or postgresql://…".into(),
            ));
        }
        let mut pg = crate::store::PgOptions::new(url);
        pg.password_file = self.password_file.clone();
        pg.ca_file = self.ca_file.clone();
        if let Some(n) = self.pool_size {
            if n == 0 || n > 1000 {
                return Err(ConfigError::Invalid("store.pool_size must be 1..=1000".into()));
            }
            pg.pool_size = n;
        }
        pg.statement_timeout = self.statement_timeout.unwrap_or(pg.statement_timeout);
        if pg.statement_timeout < std::time::Duration::from_millis(100) {
            return Err(ConfigError::Invalid(
                "store.statement_timeout must be at least 100ms".into(),
            ));
        }
        pg.check()?;
        Ok(crate::store::StoreLocation::Postgres(pg))
    }
}

/// Default CVV lifetime in memory.
pub const DEFAULT_CVV_TTL: std::time::Duration = std::time::Duration::from_secs(15 * 60);
/// Default deletion epoch (production): a deleted card is unrecoverable within two.
pub const DEFAULT_DELETION_EPOCH: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);
/// Default KEK wrap budget: half of SP 800-38D's 2^32 random-nonce bound.
pub const DEFAULT_KEK_WRAP_LIMIT: u64 = 1 << 31;
/// Default idempotency window.
pub const DEFAULT_IDEMPOTENCY_WINDOW: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Why configuration was refused. Names the problem, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value serde accepted but the vault refuses (the message names the key).
    #[error("configuration error: {0}")]
    Invalid(String),
    /// The file or an environment override does not parse (figment names the key and source).
    #[error("configuration error: {0}")]
    File(#[from] Box<figment::Error>),
    /// `[psp]` names a connector the vault cannot set up.
    #[error("configuration error: psp: {0}")]
    Psp(#[from] crate::psp::PspSetupError),
    /// `[store]` (or `--store`) names a PostgreSQL store the vault refuses.
    #[error("configuration error: store url: {0}")]
    Store(#[from] crate::store::PgConfigError),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProductionFile {
    listen: SocketAddr,
    data_dir: PathBuf,
    auth: AuthSettings,
    clients: Vec<ClientEntry>,
    keystore: KeystoreSettings,
    #[serde(default = "default_body")]
    max_body_bytes: usize,
    #[serde(default = "default_log_format")]
    log_format: LogFormat,
    #[serde(default)]
    workers: Option<usize>,
    #[serde(default)]
    psp: Option<PspSettings>,
    #[serde(default, with = "humantime_serde")]
    cvv_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    idempotency_window: Option<Duration>,
    /// `[rate_limits]`: requests per second per client and class (default: 200/50/20/100).
    #[serde(default)]
    rate_limits: Option<RateLimitsFile>,
    #[serde(default)]
    allow_root: bool,
    #[serde(default)]
    mlockall: bool,
    #[serde(default)]
    tls: Option<TlsSettings>,
    /// `[anomaly_guard]`: detokenize bursts far above a client's own baseline.
    #[serde(default)]
    anomaly_guard: Option<AnomalyGuardFile>,
    #[serde(default)]
    enumeration_guard: Option<EnumerationGuardFile>,
    #[serde(default)]
    metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    auth_failures: Option<AuthFailuresFile>,
    /// Wraps per KEK version before automatic rotation (default 2^31).
    #[serde(default)]
    kek_wrap_limit: Option<u64>,
    /// e.g. "7d" (the default), or "off".
    #[serde(default)]
    deletion_epoch: Option<OffOr>,
    #[serde(default)]
    store: StoreSettings,
    #[serde(default)]
    cvv_redis: Option<secrecy::SecretString>,
    /// A file holding the Redis URL (it may carry a password): how a deployment
    /// mounts it from a secret. Exclusive with `cvv_redis`.
    #[serde(default)]
    cvv_redis_file: Option<PathBuf>,
    /// `[tokens]`: `min_ttl`, `max_ttl` of expiring tokens.
    #[serde(default)]
    tokens: TokensFile,
    /// `[retention]`: tenant = "400d" (cards unused that long are deleted).
    #[serde(default)]
    retention: BTreeMap<String, humantime_serde::Serde<Duration>>,
}

/// `[rate_limits]`: requests per second per client, by class (the burst is one second's worth).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitsFile {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    tokenize: Option<std::num::NonZeroU32>,
    #[serde(default)]
    detokenize: Option<std::num::NonZeroU32>,
    #[serde(default)]
    charges: Option<std::num::NonZeroU32>,
    #[serde(default)]
    other: Option<std::num::NonZeroU32>,
}

impl RateLimitsFile {
    fn limits(self) -> Option<crate::limits::RateLimits> {
        use crate::limits::LimitClass;
        if !self.enabled {
            return None;
        }
        let mut limits = crate::limits::RateLimits::production_defaults();
        for (class, n) in [
            (LimitClass::Tokenize, self.tokenize),
            (LimitClass::Detokenize, self.detokenize),
            (LimitClass::Charges, self.charges),
            (LimitClass::Other, self.other),
        ] {
            if let Some(n) = n {
                limits.0.insert(class, n.get());
            }
        }
        Some(limits)
    }
}

/// `[anomaly_guard]`: a client's detokenize count per window against its own baseline.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnomalyGuardFile {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default, with = "humantime_serde")]
    window: Option<Duration>,
    #[serde(default)]
    factor: Option<f64>,
    #[serde(default)]
    floor: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    cooldown: Option<Duration>,
}

impl AnomalyGuardFile {
    fn params(self) -> Result<Option<crate::limits::AnomalyParams>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        let d = crate::limits::AnomalyParams::production_defaults();
        let p = crate::limits::AnomalyParams {
            window: self.window.unwrap_or(d.window),
            factor: self.factor.unwrap_or(d.factor),
            floor: self.floor.unwrap_or(d.floor),
            cooldown: self.cooldown.unwrap_or(d.cooldown),
        };
        p.check()
            .map_err(|e| ConfigError::Invalid(format!("anomaly_guard: {e}")))?;
        Ok(Some(p))
    }
}

/// A duration, or `off`: how `deletion_epoch` is written in the file and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct OffOr(pub Option<Duration>);

impl std::str::FromStr for OffOr {
    type Err = String;

    fn from_str(s: &str) -> Result<OffOr, String> {
        match s.trim() {
            "off" => Ok(OffOr(None)),
            d => humantime::parse_duration(d)
                .map(|d| OffOr(Some(d)))
                .map_err(|_| format!("expected a duration such as \"7d\", or \"off\"; got {s:?}")),
        }
    }
}

impl TryFrom<String> for OffOr {
    type Error = String;

    fn try_from(s: String) -> Result<OffOr, String> {
        s.parse()
    }
}

/// `[enumeration_guard]`: distinct cards per BIN + last four per client and tenant.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnumerationGuardFile {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    max_distinct: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    window: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    cooldown: Option<Duration>,
}

/// `[auth_failures]`: how many failed requests one source may make per window
/// before it is refused unauthenticated, and the aggregation window.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFailuresFile {
    #[serde(default)]
    max_per_source: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    window: Option<Duration>,
}

fn yes() -> bool {
    true
}

impl EnumerationGuardFile {
    fn params(self) -> Result<Option<crate::limits::EnumerationParams>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        let d = crate::limits::EnumerationParams::default();
        let p = crate::limits::EnumerationParams {
            max_distinct: self.max_distinct.unwrap_or(d.max_distinct),
            window: self.window.unwrap_or(d.window),
            cooldown: self.cooldown.unwrap_or(d.cooldown),
        };
        p.check()
            .map_err(|e| ConfigError::Invalid(format!("enumeration_guard: {e}")))?;
        Ok(Some(p))
    }
}

fn default_body() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

fn default_log_format() -> LogFormat {
    LogFormat::Json
}

/// Environment overrides honoured in production mode.
const ENV_KEYS: &[&str] = &[
    "listen",
    "data_dir",
    "log_format",
    "workers",
    "max_body_bytes",
    "auth.issuer",
    "auth.audience",
    "auth.leeway_secs",
    "keystore.path",
    "keystore.provider",
    "keystore.cryptoperiod",
    "keystore.pkcs11.module",
    "keystore.pkcs11.token_label",
    "keystore.pkcs11.pin_file",
    "cvv_ttl",
    "idempotency_window",
    "rate_limits.enabled",
    "rate_limits.tokenize",
    "rate_limits.detokenize",
    "rate_limits.charges",
    "rate_limits.other",
    "allow_root",
    "anomaly_guard.enabled",
    "anomaly_guard.window",
    "anomaly_guard.factor",
    "anomaly_guard.floor",
    "anomaly_guard.cooldown",
    "metrics_listen",
    "kek_wrap_limit",
    "deletion_epoch",
    "mlockall",
    "psp.base_url",
    "psp.api_key_file",
    "psp.merchant_account",
    "cvv_redis",
    "cvv_redis_file",
    "store.url",
    "store.password_file",
    "store.ca_file",
    "store.pool_size",
    "store.statement_timeout",
    "store.cache_mb",
];

impl Settings {
    /// Loads production settings from `file` plus `TOKENVAULT_*` overrides.
    pub fn production(file: &Path) -> Result<Settings, ConfigError> {
        if !file.is_file() {
            return Err(ConfigError::Invalid(format!(
                "config file {} not found",
                file.display()
            )));
        }
        let parsed: ProductionFile = Figment::new()
            .merge(Toml::file(file))
            .merge(Env::prefixed("TOKENVAULT_").split("__").only(ENV_KEYS))
            .extract()
            .map_err(Box::new)?;
        let settings = Settings {
            mode: Mode::Production,
            listen: parsed.listen,
            data_dir: parsed.data_dir,
            auth: parsed.auth,
            clients: parsed.clients,
            keystore: parsed.keystore,
            max_body_bytes: parsed.max_body_bytes,
            log_format: parsed.log_format,
            workers: parsed.workers,
            psp: parsed.psp,
            allow_root: parsed.allow_root,
            tls: parsed.tls,
            anomaly_guard: match parsed.anomaly_guard {
                None => Some(crate::limits::AnomalyParams::production_defaults()),
                Some(f) => f.params()?,
            },
            mlockall: parsed.mlockall,
            enumeration_guard: match parsed.enumeration_guard {
                None => Some(crate::limits::EnumerationParams::default()),
                Some(f) => f.params()?,
            },
            metrics_listen: parsed.metrics_listen,
            auth_failures: match parsed.auth_failures {
                None => crate::limits::FailureParams::default(),
                Some(f) => {
                    let d = crate::limits::FailureParams::default();
                    crate::limits::FailureParams {
                        max_per_source: f.max_per_source.unwrap_or(d.max_per_source),
                        window: f.window.unwrap_or(d.window),
                    }
                }
            },
            config_file: Some(file.to_owned()),
            store: parsed.store,
            cvv_redis: parsed.cvv_redis,
            cvv_redis_file: parsed.cvv_redis_file,
            lifecycle: {
                let d = Lifecycle::default();
                let lifecycle = Lifecycle {
                    min_ttl: parsed.tokens.min_ttl.unwrap_or(d.min_ttl),
                    max_ttl: parsed.tokens.max_ttl.unwrap_or(d.max_ttl),
                    retention: parsed
                        .retention
                        .into_iter()
                        .map(|(tenant, period)| (tenant, period.into_inner()))
                        .collect(),
                };
                lifecycle.validate()?;
                lifecycle
            },
            kek_wrap_limit: parsed.kek_wrap_limit.unwrap_or(DEFAULT_KEK_WRAP_LIMIT).max(1),
            deletion_epoch: parsed.deletion_epoch.map_or(Some(DEFAULT_DELETION_EPOCH), |e| e.0),
            rate_limits: match parsed.rate_limits {
                None => Some(crate::limits::RateLimits::production_defaults()),
                Some(f) => f.limits(),
            },
            cvv_ttl: parsed.cvv_ttl.unwrap_or(DEFAULT_CVV_TTL),
            idempotency_window: parsed.idempotency_window.unwrap_or(DEFAULT_IDEMPOTENCY_WINDOW),
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what serde cannot: non-empty registries, explicit tenants, sane limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.auth.issuer.trim().is_empty() || self.auth.audience.trim().is_empty() {
            return bad("auth.issuer and auth.audience must be set");
        }
        if self.auth.keys.is_empty() {
            return bad("auth.keys must list at least one JWT verification key");
        }
        let on_sled = !self
            .store
            .url
            .as_deref()
            .is_some_and(|u| u.starts_with("postgres://") || u.starts_with("postgresql://"));
        if on_sled && self.keystore.path.as_os_str().is_empty() {
            return bad("keystore.path must be set with a sled store (PostgreSQL keeps the keystore in the database)");
        }
        let mut kids = BTreeSet::new();
        for k in &self.auth.keys {
            if k.kid.is_empty() || !kids.insert(k.kid.as_str()) {
                return bad("auth.keys: every key needs a unique, non-empty kid");
            }
            if k.alg == JwtAlg::RS256 && !self.auth.allow_rs256 {
                return bad("auth.keys: RS256 keys need auth.allow_rs256 = true");
            }
        }
        if self.auth.leeway_secs > 300 {
            return bad("auth.leeway_secs must be at most 300");
        }
        if self.clients.is_empty() {
            return bad("clients: the client registry must list at least one client");
        }
        let mut subs = BTreeSet::new();
        for c in &self.clients {
            if c.sub.is_empty() || !subs.insert(c.sub.as_str()) {
                return bad("clients: every client needs a unique, non-empty sub");
            }
            if c.tenants.is_empty() {
                return bad("clients: every client must list its tenants");
            }
            if self.mode == Mode::Production && c.tenants.contains("*") {
                return bad("clients: the \"*\" tenant wildcard is only for dev mode");
            }
            if let Some(hash) = &c.basic_password_hash {
                if c.tenants.len() != 1 || c.tenants.contains("*") {
                    return bad("clients: a client with basic_password_hash lists exactly one tenant");
                }
                if !hash.starts_with("$argon2id$") || argon2::PasswordHash::new(hash).is_err() {
                    return bad("clients: basic_password_hash must be an Argon2id PHC string ($argon2id$…)");
                }
                if c.sub.contains(':') {
                    return bad("clients: a Basic client's sub must not contain ':'");
                }
            }
        }
        if self.keystore.cryptoperiod.is_some_and(|d| d < Duration::from_secs(1)) {
            return bad("keystore.cryptoperiod must be at least 1s");
        }
        if self.deletion_epoch.is_some_and(|d| d < Duration::from_secs(1)) {
            return bad("deletion_epoch must be at least 1s");
        }
        if let Some(p) = &self.anomaly_guard {
            p.check()
                .map_err(|e| ConfigError::Invalid(format!("anomaly_guard: {e}")))?;
        }
        if let Some(p) = &self.enumeration_guard {
            p.check()
                .map_err(|e| ConfigError::Invalid(format!("enumeration_guard: {e}")))?;
        }
        if self.auth_failures.max_per_source == 0 || self.auth_failures.window.is_zero() {
            return bad("auth_failures: max_per_source and window must be positive");
        }
        self.lifecycle.validate()?;
        if self.keystore.provider == ProviderKind::Pkcs11 && self.keystore.pkcs11.is_none() {
            return bad("keystore.provider = \"pkcs11\" needs a [keystore.pkcs11] section");
        }
        if self.mode == Mode::Production && self.keystore.dev_root_key_file.is_some() {
            return bad("a root key file is for dev mode only");
        }
        if let crate::store::StoreLocation::Postgres(pg) = self.store.location(&self.data_dir)?
            && self.mode == Mode::Production
        {
            pg.production_check()?;
        }
        match (&self.tls, self.mode) {
            (None, Mode::Production) => {
                return bad(
                    "production requires a [tls] section (mode = \"native\" with cert_file and key_file, or mode = \"upstream\" when a sidecar/ingress terminates TLS)",
                );
            }
            (Some(t), _) if t.mode == TlsMode::Native && (t.cert_file.is_none() || t.key_file.is_none()) => {
                return bad("tls: mode = \"native\" needs cert_file and key_file");
            }
            _ => {}
        }
        let pins = self.clients.iter().filter(|c| c.cert_sha256.is_some()).count();
        for c in &self.clients {
            if let Some(pin) = &c.cert_sha256
                && (pin.len() != 64 || hex::decode(pin).is_err())
            {
                return bad("clients: cert_sha256 must be 64 hex characters (SHA-256 of the certificate's SPKI)");
            }
        }
        if pins > 0
            && !self
                .tls
                .as_ref()
                .is_some_and(|t| t.mode == TlsMode::Native && t.client_ca_file.is_some())
        {
            return bad(
                "clients pin certificates: that needs [tls] mode = \"native\" with client_ca_file (mutual TLS)",
            );
        }
        if let Some(psp) = &self.psp {
            crate::psp::check_allowed(&psp.base_url, &psp.allowed_hosts)?;
            if self.mode == Mode::Production && !psp.base_url.starts_with("https://") {
                return bad("psp.base_url must be https:// in production (card data crosses the network)");
            }
            if self.mode == Mode::Production && psp.dev_api_key.is_some() {
                return bad("psp: an inline API key is for dev mode only");
            }
        }
        if self.cvv_ttl > std::time::Duration::from_secs(3600) || self.cvv_ttl.is_zero() {
            return bad("cvv_ttl must be between 1s and 1h (PCI DSS 3.3.1: keep it short)");
        }
        if !(1024..=1024 * 1024).contains(&self.max_body_bytes) {
            return bad("max_body_bytes must be between 1 KiB and 1 MiB");
        }
        if self.mode == Mode::Dev && !self.listen.ip().is_loopback() {
            return bad("dev mode only listens on a loopback address; use --config for production");
        }
        Ok(())
    }
}

/// A switch for a guard: `on` turns it on with its defaults (or the file's values), `off` off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (a duration such as 15m, 2s, 90d)"))
}

fn rate_arg(s: &str) -> Result<(crate::limits::LimitClass, std::num::NonZeroU32), String> {
    use clap::ValueEnum;
    let (class, n) = s
        .split_once('=')
        .ok_or_else(|| "expected CLASS=PER_SECOND such as detokenize=50".to_owned())?;
    let class = crate::limits::LimitClass::from_str(class, false)
        .map_err(|_| format!("unknown class {class:?}: tokenize, detokenize, charges or other"))?;
    let n = n
        .parse()
        .map_err(|_| format!("{n:?} is not a positive number of requests per second"))?;
    Ok((class, n))
}

fn retention_arg(s: &str) -> Result<(String, Duration), String> {
    let (tenant, period) = s
        .split_once('=')
        .ok_or_else(|| "expected TENANT=DURATION such as acme=400d".to_owned())?;
    if crate::domain::tenant::TenantId::parse(tenant).is_none() {
        return Err(format!("{tenant:?} is not a valid tenant id"));
    }
    Ok((tenant.to_owned(), duration_arg(period)?))
}

/// `tokenvault serve` flags that override the settings: the same keys as the production
/// file's, typed by clap, merged into the one [`Settings`] by [`Settings::merge`] in both modes
/// (dev: over the dev defaults; production: over the file and its environment overrides).
#[derive(Default, clap::Args)]
pub struct Overrides {
    /// Store: sled:PATH [default: <data-dir>/sled] or postgres://… (overrides [store] url).
    #[arg(long, env = "TOKENVAULT_STORE", hide_env_values = true, value_name = "URL")]
    store: Option<String>,
    /// sled's page cache in MiB, 16 to 1048576 [default: 1024]: it bounds most of the memory a
    /// large store takes (overrides [store] cache_mb).
    #[arg(long, env = "TOKENVAULT_SLED_CACHE_MB", value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(SLED_CACHE_MIN_MB..=SLED_CACHE_MAX_MB))]
    sled_cache_mb: Option<u64>,
    /// A memory-only Redis (redis://…) holding CVVs for every replica [default: this process's memory].
    #[arg(long, env = "TOKENVAULT_CVV_REDIS", hide_env_values = true, value_name = "URL")]
    cvv_redis: Option<String>,
    /// Dev mode: the PSP base URL (e.g. the mock PSP, http://127.0.0.1:8081); its host is allow-listed.
    #[arg(long, env = "TOKENVAULT_PSP_URL", value_name = "URL")]
    psp_url: Option<reqwest::Url>,
    /// Dev mode: PSP read timeout [default: 5s]; a timed-out call is retried once with the same idempotency key.
    #[arg(long, env = "TOKENVAULT_PSP_TIMEOUT", value_name = "DURATION", requires = "psp_url", value_parser = duration_arg)]
    psp_timeout: Option<Duration>,
    /// A per-client rate limit, CLASS=PER_SECOND with CLASS one of tokenize, detokenize, charges,
    /// other; repeat for more classes ([rate_limits] in the file) [dev default: unlimited;
    /// production default: tokenize=200 detokenize=50 charges=20 other=100].
    #[arg(long, value_name = "CLASS=N", value_parser = rate_arg)]
    rate_limit: Vec<(crate::limits::LimitClass, std::num::NonZeroU32)>,
    /// Detokenize anomaly guard ([anomaly_guard] in the file) [dev default: off; production: on].
    #[arg(long, env = "TOKENVAULT_ANOMALY_GUARD", value_name = "SWITCH")]
    anomaly_guard: Option<Switch>,
    /// Anomaly guard: the counting window [default: 60s]. Any --anomaly-* tuning flag turns the
    /// guard on (with --anomaly-guard it is refused: a tuned guard is on).
    #[arg(long, value_name = "DURATION", value_parser = duration_arg, conflicts_with = "anomaly_guard")]
    anomaly_window: Option<Duration>,
    /// Anomaly guard: flag a window this many times the client's own average [default: 10].
    #[arg(long, value_name = "FACTOR", conflicts_with = "anomaly_guard")]
    anomaly_factor: Option<f64>,
    /// Anomaly guard: never flag at or below this count per window [default: 600].
    #[arg(long, value_name = "N", conflicts_with = "anomaly_guard")]
    anomaly_floor: Option<u32>,
    /// Anomaly guard: how long a flagged client is throttled [default: 15m].
    #[arg(long, value_name = "DURATION", value_parser = duration_arg, conflicts_with = "anomaly_guard")]
    anomaly_cooldown: Option<Duration>,
    /// How long a CVV may wait in memory for its charge [default: 15m].
    #[arg(long, env = "TOKENVAULT_CVV_TTL", value_name = "DURATION", value_parser = duration_arg)]
    cvv_ttl: Option<Duration>,
    /// KEK cryptoperiod, e.g. 90d: the active KEK rotates automatically when older.
    #[arg(long, env = "TOKENVAULT_CRYPTOPERIOD", value_name = "DURATION", value_parser = duration_arg)]
    cryptoperiod: Option<Duration>,
    /// Serve /metrics, /healthz and /readyz on this separate internal address (not on the API listener).
    #[arg(long, env = "TOKENVAULT_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Tokenize enumeration guard ([enumeration_guard] in the file) [default: on in both modes].
    #[arg(long, env = "TOKENVAULT_ENUMERATION_GUARD", value_name = "SWITCH")]
    enumeration_guard: Option<Switch>,
    /// Enumeration guard: distinct cards per BIN + last four per client and tenant in the window [default: 5].
    /// Any --enumeration-* tuning flag turns the guard on (with --enumeration-guard it is refused).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "enumeration_guard")]
    enumeration_max: Option<u32>,
    /// Enumeration guard: the window [default: 1h].
    #[arg(long, value_name = "DURATION", value_parser = duration_arg, conflicts_with = "enumeration_guard")]
    enumeration_window: Option<Duration>,
    /// Enumeration guard: how long a flagged client is throttled [default: 15m].
    #[arg(long, value_name = "DURATION", value_parser = duration_arg, conflicts_with = "enumeration_guard")]
    enumeration_cooldown: Option<Duration>,
    /// Failed authentications one source may make per window before it is refused
    /// unauthenticated ([auth_failures] max_per_source) [default: 1000].
    #[arg(long, env = "TOKENVAULT_AUTH_FAILURES_MAX", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    auth_failures_max: Option<u32>,
    /// That window, also the audit trail's aggregation window [default: 60s].
    #[arg(long, env = "TOKENVAULT_AUTH_FAILURES_WINDOW", value_name = "DURATION", value_parser = duration_arg)]
    auth_failures_window: Option<Duration>,
    /// DEK wraps per KEK version before it rotates automatically (random-nonce budget) [default: 2^31].
    #[arg(long, env = "TOKENVAULT_KEK_WRAP_LIMIT", value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    kek_wrap_limit: Option<u64>,
    /// Deletion epoch, e.g. 7d, or "off": rotate, rewrap and destroy old KEKs so a deleted
    /// card is unrecoverable within two epochs [dev default: off; production default: 7d].
    #[arg(long, env = "TOKENVAULT_DELETION_EPOCH", value_name = "DURATION")]
    deletion_epoch: Option<OffOr>,
    /// Retention for a tenant, e.g. acme=400d: its cards unused (not tokenized, charged or
    /// detokenized) that long are deleted [default: kept]. Repeat for more tenants.
    #[arg(long, value_name = "TENANT=DURATION", value_parser = retention_arg)]
    retention: Vec<(String, Duration)>,
    /// Shortest lifetime a tokenize may give a token (ttl/expires_at) [default: 1s].
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    token_ttl_min: Option<Duration>,
    /// Longest lifetime a tokenize may give a token (ttl/expires_at) [default and most: 400d].
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    token_ttl_max: Option<Duration>,
}

impl Settings {
    /// Merges the command line's overrides into these settings and validates the result: the
    /// one way flags reach the settings, in dev and production alike.
    pub fn merge(mut self, o: Overrides) -> Result<Settings, ConfigError> {
        if let Some(url) = o.cvv_redis {
            self.cvv_redis = Some(secrecy::SecretString::from(url));
        }
        if let Some(mb) = o.sled_cache_mb {
            self.store.cache_mb = Some(mb);
        }
        if let Some(url) = o.store {
            self.store.url = Some(url);
        }
        if let Some(p) = o.cryptoperiod {
            self.keystore.cryptoperiod = Some(p);
        }
        if !o.rate_limit.is_empty() {
            let mut limits = self
                .rate_limits
                .take()
                .unwrap_or_else(|| crate::limits::RateLimits(std::collections::HashMap::new()));
            for (class, n) in o.rate_limit {
                limits.0.insert(class, n.get());
            }
            self.rate_limits = Some(limits);
        }
        let tuned = o.anomaly_window.is_some()
            || o.anomaly_factor.is_some()
            || o.anomaly_floor.is_some()
            || o.anomaly_cooldown.is_some();
        match o.anomaly_guard {
            Some(Switch::Off) => self.anomaly_guard = None,
            Some(Switch::On) | None if tuned || o.anomaly_guard.is_some() => {
                let mut p = self
                    .anomaly_guard
                    .unwrap_or_else(crate::limits::AnomalyParams::production_defaults);
                p.window = o.anomaly_window.unwrap_or(p.window);
                p.factor = o.anomaly_factor.unwrap_or(p.factor);
                p.floor = o.anomaly_floor.unwrap_or(p.floor);
                p.cooldown = o.anomaly_cooldown.unwrap_or(p.cooldown);
                self.anomaly_guard = Some(p);
            }
            _ => {}
        }
        let tuned = o.enumeration_max.is_some() || o.enumeration_window.is_some() || o.enumeration_cooldown.is_some();
        match o.enumeration_guard {
            Some(Switch::Off) => self.enumeration_guard = None,
            Some(Switch::On) | None if tuned || o.enumeration_guard.is_some() => {
                let mut p = self.enumeration_guard.unwrap_or_default();
                p.max_distinct = o.enumeration_max.unwrap_or(p.max_distinct);
                p.window = o.enumeration_window.unwrap_or(p.window);
                p.cooldown = o.enumeration_cooldown.unwrap_or(p.cooldown);
                self.enumeration_guard = Some(p);
            }
            _ => {}
        }
        if let Some(n) = o.auth_failures_max {
            self.auth_failures.max_per_source = n;
        }
        if let Some(w) = o.auth_failures_window {
            self.auth_failures.window = w;
        }
        if let Some(e) = o.deletion_epoch {
            self.deletion_epoch = e.0;
        }
        if let Some(n) = o.kek_wrap_limit {
            self.kek_wrap_limit = n;
        }
        self.lifecycle.retention.extend(o.retention);
        if let Some(d) = o.token_ttl_min {
            self.lifecycle.min_ttl = d;
        }
        if let Some(d) = o.token_ttl_max {
            self.lifecycle.max_ttl = d;
        }
        if let Some(addr) = o.metrics_listen {
            self.metrics_listen = Some(addr);
        }
        if let Some(ttl) = o.cvv_ttl {
            self.cvv_ttl = ttl;
        }
        if let Some(url) = o.psp_url {
            if self.mode != Mode::Dev {
                return Err(ConfigError::Invalid(
                    "--psp-url is for dev mode; configure [psp] in the config file".into(),
                ));
            }
            let host = url
                .host_str()
                .map(str::to_owned)
                .ok_or_else(|| ConfigError::Invalid("--psp-url must be a URL such as http://127.0.0.1:8081".into()))?;
            self.psp = Some(PspSettings {
                base_url: url.as_str().trim_end_matches('/').to_owned(),
                api_key_file: PathBuf::new(),
                merchant_account: "TokenvaultDev".into(),
                allowed_hosts: vec![host],
                connect_timeout_ms: 2_000,
                timeout_ms: o.psp_timeout.map_or(5_000, |t| t.as_millis() as u64),
                dev_api_key: Some(crate::psp::DEV_API_KEY.into()),
            });
        }
        self.validate()?;
        Ok(self)
    }
}
