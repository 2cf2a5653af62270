//! The PostgreSQL backend: several stateless vault replicas over one database.
//!
//! Tables (schema `tv_*`, created by the embedded migrations below): `tv_tokens`
//! (token → tenant, KEK version, the record encoded exactly as sled stores it),
//! `tv_fingerprints` (tenant + HMAC → token, unique per tenant), `tv_charges`,
//! `tv_idempotency`, `tv_audit` (sequence → audit record) and `tv_meta`
//! (keystore generation, wrap budgets, the audit checkpoint and keyed mark).
//!
//! Durability comes from the database (`synchronous_commit`, its WAL and its
//! standbys): a unit is acknowledged after the transaction that holds it
//! committed. One committer thread takes every unit waiting and applies them in
//! one transaction (group commit): concurrent requests share one durable wait.
//! Reads run on a small pool on the store's own runtime, never on an actix worker.
//!
//! Token order is byte order (`COLLATE "C"`), as in sled, so the rewrap cursor
//! means the same on both backends. The SQL avoids advisory locks and
//! LISTEN/NOTIFY: the migration lock is a row lock (`SELECT … FOR UPDATE`).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, GenericClient};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::anchor::{KeyedMark, Mark};
use super::codec::{decode, encode, read_live};
use super::{
    Applied, Applying, AuditAppend, AuditSeal, Availability, Change, ChargeRecord, ChargesOf, Commit,
    IdempotencyRecord, InsertMode, InsertOutcome, ReadRecord, Store, StoreError, StoredRecord, Unit,
};
use crate::domain::tenant::TenantId;
use crate::domain::token::Token;
use crate::keys::SealedCard;

/// The schema versions this build knows, in order; each runs in the migration's
/// transaction. A database at a higher version is refused (a newer vault migrated it).
const MIGRATIONS: &[&str] = &[
    // 1: tokens, index, charges, idempotency, audit trail, metadata.
    r#"
    CREATE TABLE tv_tokens (
        token TEXT COLLATE "C" PRIMARY KEY,
        tenant TEXT NOT NULL,
        key_version BIGINT NOT NULL,
        record BYTEA NOT NULL
    );
    CREATE INDEX tv_tokens_by_version ON tv_tokens (key_version, token);
    CREATE TABLE tv_fingerprints (
        tenant TEXT NOT NULL,
        fingerprint BYTEA NOT NULL,
        token TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (tenant, fingerprint)
    );
    CREATE TABLE tv_charges (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        record BYTEA NOT NULL
    );
    CREATE TABLE tv_idempotency (
        key BYTEA PRIMARY KEY,
        record BYTEA NOT NULL
    );
    CREATE TABLE tv_audit (
        seq BIGINT PRIMARY KEY,
        record BYTEA NOT NULL
    );
    CREATE TABLE tv_meta (
        name TEXT PRIMARY KEY,
        value BYTEA NOT NULL
    );
    "#,
    // 2: the audit chain's lock row: writers (vault replicas) append one at a time.
    r#"
    INSERT INTO tv_meta (name, value) VALUES ('audit_lock', '\x') ON CONFLICT (name) DO NOTHING;
    "#,
    // 3: an idempotency entry's creation time, for the window check in SQL.
    r#"
    ALTER TABLE tv_idempotency ADD COLUMN created_at BIGINT NOT NULL DEFAULT 0;
    "#,
    // 4: the keystore, shared by every replica (one row; saves compare-and-set
    // on its generation).
    r#"
    CREATE TABLE tv_keystore (
        id SMALLINT PRIMARY KEY CHECK (id = 1),
        generation BIGINT NOT NULL,
        body BYTEA NOT NULL
    );
    "#,
    // 5: expiring tokens, found by the sweeper.
    r#"
    ALTER TABLE tv_tokens ADD COLUMN expires_at BIGINT;
    CREATE INDEX tv_tokens_expires_at ON tv_tokens (expires_at) WHERE expires_at IS NOT NULL;
    "#,
    // 6: a tenant's tokens in order with their last use (listing, retention); a
    // tenant's charges by token and by merchant reference (listing). Records
    // stored before count as used at the migration (retention never deletes
    // early); charges stored before get their columns from their records.
    r#"
    ALTER TABLE tv_tokens ADD COLUMN last_used_at BIGINT;
    UPDATE tv_tokens SET last_used_at = extract(epoch FROM now())::BIGINT;
    ALTER TABLE tv_tokens ALTER COLUMN last_used_at SET NOT NULL;
    CREATE INDEX tv_tokens_by_tenant ON tv_tokens (tenant, token);
    ALTER TABLE tv_charges ADD COLUMN token TEXT, ADD COLUMN reference TEXT, ADD COLUMN created_at BIGINT;
    CREATE INDEX tv_charges_by_token ON tv_charges (tenant, token, created_at, id);
    CREATE INDEX tv_charges_by_reference ON tv_charges (tenant, reference, created_at, id);
    "#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const KEYSTORE_GENERATION: &str = "keystore_generation";
const CHECKPOINT: &str = "audit_checkpoint";
const KEYED_MARK: &str = "audit_keyed_mark";
/// Units applied in one transaction at most.
const MAX_BATCH: usize = 256;

/// How to reach the database.
#[derive(Clone)]
pub struct PgOptions {
    /// `postgres://…` / `postgresql://…` (several hosts and `target_session_attrs` allowed).
    pub url: String,
    /// The password, read from a file (never from the URL in production).
    pub password_file: Option<PathBuf>,
    /// PEM CA certificates that sign the server's certificate (default: the system's roots).
    pub ca_file: Option<PathBuf>,
    /// Connections in the read pool.
    pub pool_size: usize,
    /// Each statement's limit (`statement_timeout`), also the pool's wait and connect limit.
    pub statement_timeout: Duration,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never printed.
        f.debug_struct("PgOptions")
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .finish_non_exhaustive()
    }
}

/// Why a PostgreSQL store setting is refused (never quoting the URL: it may hold a password).
#[derive(Debug, thiserror::Error)]
pub enum PgConfigError {
    #[error("the PostgreSQL URL does not parse")]
    Unparsable,
    #[error("put the database password in store.password_file, not in the URL")]
    PasswordInUrl,
    #[error("a remote database needs TLS: add sslmode=require to the URL")]
    NeedsTls,
}

impl PgOptions {
    pub fn new(url: &str) -> PgOptions {
        PgOptions {
            url: url.to_owned(),
            password_file: None,
            ca_file: None,
            pool_size: 16,
            statement_timeout: Duration::from_secs(5),
        }
    }

    /// Hosts and database, for banners (never the password).
    pub fn describe(&self) -> String {
        let Ok(config) = self.url.parse::<tokio_postgres::Config>() else {
            return "(unparsable URL)".into();
        };
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let port = config
                    .get_ports()
                    .get(i)
                    .or(config.get_ports().first())
                    .copied()
                    .unwrap_or(5432);
                match h {
                    tokio_postgres::config::Host::Tcp(n) => format!("{n}:{port}"),
                    tokio_postgres::config::Host::Unix(p) => format!("{}:{port}", p.display()),
                }
            })
            .collect();
        format!("{}/{}", hosts.join(","), config.get_dbname().unwrap_or(""))
    }

    /// Whether the URL parses (the message never quotes it: it may hold a password).
    pub fn check(&self) -> Result<(), PgConfigError> {
        self.url
            .parse::<tokio_postgres::Config>()
            .map(|_| ())
            .map_err(|_| PgConfigError::Unparsable)
    }

    /// What production demands: the password from a file, not the URL, and TLS
    /// (`sslmode=require`) to any host that is not this machine.
    pub fn production_check(&self) -> Result<(), PgConfigError> {
        let config: tokio_postgres::Config = self.url.parse().map_err(|_| PgConfigError::Unparsable)?;
        if config.get_password().is_some() {
            return Err(PgConfigError::PasswordInUrl);
        }
        if !all_local(&config) && config.get_ssl_mode() != tokio_postgres::config::SslMode::Require {
            return Err(PgConfigError::NeedsTls);
        }
        Ok(())
    }

    /// The driver's configuration: URL, password file, timeouts.
    fn config(&self) -> Result<tokio_postgres::Config, StoreError> {
        let mut config: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|_| StoreError::Backend("the PostgreSQL URL does not parse".into()))?;
        if let Some(file) = &self.password_file {
            let text = zeroize::Zeroizing::new(std::fs::read_to_string(file).map_err(|e| {
                StoreError::Backend(format!(
                    "cannot read the database password file {}: {e}",
                    file.display()
                ))
            })?);
            config.password(text.trim_end_matches(['\r', '\n']));
        }
        if config.get_user().is_none() {
            // As libpq: the operating-system user.
            config.user(std::env::var("USER").unwrap_or_else(|_| "postgres".into()));
        }
        // TLS on this machine's loopback protects nothing: unless the URL asks for
        // it, only remote hosts get it (and production demands `sslmode=require` for them).
        if config.get_ssl_mode() == tokio_postgres::config::SslMode::Prefer && all_local(&config) {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        }
        if config.get_application_name().is_none() {
            config.application_name("tokenvault");
        }
        let ms = self.statement_timeout.as_millis();
        config.options(format!(
            "-c statement_timeout={ms} -c idle_in_transaction_session_timeout={ms}"
        ));
        config.connect_timeout(self.statement_timeout);
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        Ok(config)
    }

    /// TLS through rustls on ring, verifying the server's certificate and name.
    fn tls(&self) -> Result<MakeRustlsConnect, StoreError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(file) => {
                use rustls_pki_types::pem::PemObject;
                let certs = rustls_pki_types::CertificateDer::pem_file_iter(file)
                    .map_err(|e| StoreError::io(format!("cannot read {}", file.display()), e))?;
                for cert in certs {
                    let cert = cert.map_err(|e| StoreError::io(file.display().to_string(), e))?;
                    roots
                        .add(cert)
                        .map_err(|e| StoreError::io(file.display().to_string(), e))?;
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::io("TLS", e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }
}

/// Whether every host is this machine (loopback or a Unix socket).
fn all_local(config: &tokio_postgres::Config) -> bool {
    config.get_hosts().iter().all(|h| match h {
        tokio_postgres::config::Host::Tcp(name) => {
            name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        tokio_postgres::config::Host::Unix(_) => true,
    }) && config.get_hostaddrs().iter().all(|a| a.is_loopback())
}

/// Where a unit's answer goes: an async waiter, or a blocking caller (an audit
/// event appended on its own, possibly from a thread that must not await).
enum Reply {
    Async(oneshot::Sender<Result<Applied, StoreError>>),
    Blocking(std::sync::mpsc::SyncSender<Result<Applied, StoreError>>),
}

impl Reply {
    fn send(self, r: Result<Applied, StoreError>) {
        match self {
            Reply::Async(tx) => drop(tx.send(r)),
            Reply::Blocking(tx) => drop(tx.send(r)),
        }
    }
}

struct Job {
    unit: Box<Unit>,
    seal: Arc<dyn AuditSeal>,
    reply: Reply,
}

/// The store's own runtime, shut down without waiting when dropped (a store may
/// be dropped, or fail to open, on an async thread, where waiting is not allowed).
struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// PostgreSQL-backed [`Store`].
pub struct PgStore {
    runtime: OwnedRuntime,
    pool: Pool,
    committer: Option<mpsc::UnboundedSender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    keyed_at_open: Option<KeyedMark>,
    counters: Arc<Counters>,
}

/// See [`Store::availability`].
#[derive(Default)]
struct Counters {
    unavailable: std::sync::atomic::AtomicU64,
    reconnects: std::sync::atomic::AtomicU64,
}

impl Counters {
    fn note<T>(&self, r: &Result<T, StoreError>) {
        if let Err(StoreError::Unavailable(_)) = r {
            self.unavailable.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A database error as a store error: its SQLSTATE and message, never its
/// detail (which can quote a row's values).
fn db(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(d) => {
            let code = d.code().code();
            let text = format!("PostgreSQL {code}: {}", d.message());
            // Connection exceptions, a server shutting down or starting, a standby
            // that refuses writes (a failover under way), too many connections, a
            // statement cut by its timeout: the database is unavailable, not wrong.
            if code.starts_with("08")
                || code.starts_with("57P")
                || code == "25006"
                || code == "53300"
                || code == "57014"
            {
                StoreError::Unavailable(text)
            } else {
                StoreError::Backend(text)
            }
        }
        // No answer from the server at all (connection refused, reset, closed).
        None => StoreError::Unavailable(format!("PostgreSQL: {}", short(&e))),
    }
}

/// The driver's error without its source chain's row data (connection errors only).
fn short(e: &tokio_postgres::Error) -> String {
    let mut s = e.to_string();
    if let Some(src) = std::error::Error::source(e) {
        s.push_str(": ");
        s.push_str(&src.to_string());
    }
    s
}

/// Whether the database rolled the transaction back on its own (SQLSTATE class
/// 40: serialization failure, deadlock): safe to run again.
fn rolled_back(e: &StoreError) -> bool {
    matches!(e, StoreError::Backend(m) if m.starts_with("PostgreSQL 40"))
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db(e),
        // Timed out waiting for, creating or recycling a connection.
        other => StoreError::Unavailable(format!("PostgreSQL pool: {other}")),
    }
}

impl PgStore {
    /// Connects, applies the embedded migrations (under a row lock, so replicas
    /// starting together migrate once) and starts the committer.
    pub fn open(options: &PgOptions) -> Result<PgStore, StoreError> {
        let config = options.config()?;
        let tls = options.tls()?;
        let runtime = OwnedRuntime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("pg-store")
                .enable_all()
                .build()
                .map_err(|e| StoreError::io("cannot start the store runtime", e))?,
        ));
        let Some(rt) = &runtime.0 else {
            return Err(StoreError::Backend("the store runtime is gone".into()));
        };
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(options.statement_timeout))
            .create_timeout(Some(options.statement_timeout))
            .recycle_timeout(Some(options.statement_timeout))
            .build()
            .map_err(|e| StoreError::io("PostgreSQL pool", e))?;
        let keyed_at_open = {
            let pool = pool.clone();
            block(rt, async move {
                let mut client = pool.get().await.map_err(pool_error)?;
                migrate(&mut client).await?;
                keyed_mark(&**client).await
            })?
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name("pg-commit".into())
            .spawn(move || committer(config, tls, rx, c))
            .map_err(|e| StoreError::io("cannot start the commit thread", e))?;
        Ok(PgStore {
            runtime,
            pool,
            committer: Some(tx),
            thread: Some(thread),
            keyed_at_open,
            counters,
        })
    }

    /// Runs `f` with a pooled connection on the store's runtime and waits for it
    /// (store methods are blocking; callers run them off the async executor).
    fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(deadpool_postgres::Object) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let Some(runtime) = &self.runtime.0 else {
            return Err(StoreError::Backend("the store is closed".into()));
        };
        let pool = self.pool.clone();
        let r = block(runtime, async move {
            let client = pool.get().await.map_err(pool_error)?;
            f(client).await
        });
        self.counters.note(&r);
        r
    }
}

/// The driver's client inside a pooled connection (its own transactions take `&mut`).
fn raw(o: &mut deadpool_postgres::Object) -> &mut Client {
    o
}

/// Imports for `tokenvault store copy` (a stopped sled vault into this database).
/// Each is idempotent, so a copy killed midway is simply run again.
impl PgStore {
    /// Stores a record as it is (and its fingerprint entry if `indexed`); `false` if
    /// the token was already there with exactly these bytes; an error if it holds
    /// something else (the target is not a copy of this source).
    /// `last_used`: when the source last saw it used (default: its creation).
    pub fn import_record(
        &self,
        record: &StoredRecord,
        indexed: bool,
        last_used: Option<i64>,
    ) -> Result<bool, StoreError> {
        let value = encode(record)?;
        let (token, tenant, fp, version, expires_at) = (
            record.token.as_str().to_owned(),
            record.tenant.as_str().to_owned(),
            record.fingerprint,
            i64::from(record.sealed.key_version),
            record.expires_at,
        );
        let created = last_used.unwrap_or_else(|| record.created_at.unix_timestamp());
        self.run(move |mut c| async move {
            let tx = raw(&mut c).transaction().await.map_err(db)?;
            let n = tx
                .execute(
                    "INSERT INTO tv_tokens (token, tenant, key_version, record, expires_at, last_used_at) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (token) DO NOTHING",
                    &[&token, &tenant, &version, &value, &expires_at, &created],
                )
                .await
                .map_err(db)?;
            if n == 0 {
                let row = tx
                    .query_one("SELECT record FROM tv_tokens WHERE token = $1", &[&token])
                    .await
                    .map_err(db)?;
                let there: &[u8] = row.get(0);
                if there != value.as_slice() {
                    return Err(StoreError::Backend(
                        "the target holds another record under a token of the source".into(),
                    ));
                }
            }
            if indexed {
                tx.execute(
                    "INSERT INTO tv_fingerprints (tenant, fingerprint, token) VALUES ($1, $2, $3) \
                     ON CONFLICT (tenant, fingerprint) DO NOTHING",
                    &[&tenant, &&fp[..], &token],
                )
                .await
                .map_err(db)?;
            }
            tx.commit().await.map_err(db)?;
            Ok(n == 1)
        })
    }

    /// Stores an idempotency entry as it is.
    pub fn import_idempotency(&self, key: &[u8; 32], idem: &IdempotencyRecord) -> Result<(), StoreError> {
        let i = postcard::to_stdvec(idem).map_err(|_| StoreError::Corrupt)?;
        let (key, created) = (*key, idem.created_at);
        self.run(move |c| async move {
            c.execute(
                "INSERT INTO tv_idempotency (key, record, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (key) DO UPDATE SET record = EXCLUDED.record, created_at = EXCLUDED.created_at",
                &[&&key[..], &i, &created],
            )
            .await
            .map_err(db)?;
            Ok(())
        })
    }

    /// Stores audit records as they are (same sequence numbers and bytes: the
    /// chain verifies on the copy), skipping those already there.
    pub fn import_audit(&self, records: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        let seqs: Vec<i64> = records.iter().map(|(s, _)| seq_i64(*s)).collect::<Result<_, _>>()?;
        let bodies: Vec<Vec<u8>> = records.iter().map(|(_, r)| r.clone()).collect();
        self.run(move |c| async move {
            c.execute(
                "INSERT INTO tv_audit (seq, record) SELECT * FROM UNNEST($1::BIGINT[], $2::BYTEA[]) \
                 ON CONFLICT (seq) DO NOTHING",
                &[&seqs, &bodies],
            )
            .await
            .map_err(db)?;
            Ok(())
        })
    }

    /// Sets the trail's keyed mark (the source's: the last MACed record) and the
    /// retention checkpoint, if any.
    pub fn import_marks(&self, keyed: Option<KeyedMark>, checkpoint: Option<Vec<u8>>) -> Result<(), StoreError> {
        self.run(move |c| async move {
            if let Some(k) = keyed {
                let mut v = Vec::with_capacity(72);
                v.extend_from_slice(&k.seq.to_be_bytes());
                v.extend_from_slice(&k.digest);
                v.extend_from_slice(&k.mac);
                put_meta(&**c, KEYED_MARK, &v).await?;
            }
            if let Some(cp) = checkpoint {
                put_meta(&**c, CHECKPOINT, &cp).await?;
            }
            Ok(())
        })
    }
}

/// Spawns `fut` on `runtime` and blocks this (non-async) thread until it is done.
fn block<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .unwrap_or_else(|_| Err(StoreError::Backend("the store runtime stopped".into())))
}

/// Brings the schema to [`SCHEMA_VERSION`]: the version row is locked for the
/// whole migration, so concurrent starts wait for the first and then find it done.
async fn migrate(client: &mut deadpool_postgres::Object) -> Result<(), StoreError> {
    // Two replicas creating the table at the same instant: one may fail on the
    // catalog's unique index; the second attempt finds the table.
    for attempt in 0..3 {
        let created = client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS tv_schema (id INTEGER PRIMARY KEY, version BIGINT NOT NULL);
                 INSERT INTO tv_schema (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;",
            )
            .await;
        match created {
            Ok(()) => break,
            Err(e) if attempt < 2 => {
                tracing::debug!(error = %db(e), "schema table race; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(db(e)),
        }
    }
    let tx = raw(client).transaction().await.map_err(db)?;
    let row = tx
        .query_one("SELECT version FROM tv_schema WHERE id = 1 FOR UPDATE", &[])
        .await
        .map_err(db)?;
    let version: i64 = row.get(0);
    if version > SCHEMA_VERSION {
        return Err(StoreError::Backend(format!(
            "the database schema is version {version}, newer than this vault knows ({SCHEMA_VERSION}): \
             a newer tokenvault migrated it; run that version"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(sql).await.map_err(db)?;
        tracing::info!(version = i + 1, "PostgreSQL schema migrated");
    }
    if version < 6 {
        backfill_charges(&tx).await?;
    }
    if version < SCHEMA_VERSION {
        tx.execute("UPDATE tv_schema SET version = $1 WHERE id = 1", &[&SCHEMA_VERSION])
            .await
            .map_err(db)?;
    }
    tx.commit().await.map_err(db)
}

/// Migration 6's second half (in its transaction): the listing columns of the
/// charges stored before it, read from their records.
async fn backfill_charges(tx: &impl GenericClient) -> Result<(), StoreError> {
    let rows = tx
        .query("SELECT id, record FROM tv_charges WHERE token IS NULL", &[])
        .await
        .map_err(db)?;
    for row in rows {
        let id: String = row.get(0);
        let charge = super::codec::decode_charge(row.get(1))?;
        tx.execute(
            "UPDATE tv_charges SET token = $2, reference = $3, created_at = $4 WHERE id = $1",
            &[&id, &charge.token, &charge.reference, &charge.created_at],
        )
        .await
        .map_err(db)?;
    }
    Ok(())
}

async fn keyed_mark(client: &impl GenericClient) -> Result<Option<KeyedMark>, StoreError> {
    let row = client
        .query_opt("SELECT value FROM tv_meta WHERE name = $1", &[&KEYED_MARK])
        .await
        .map_err(db)?;
    let Some(row) = row else { return Ok(None) };
    let v: Vec<u8> = row.get(0);
    if v.len() != 72 {
        return Err(StoreError::Corrupt);
    }
    let mut digest = [0; 32];
    let mut mac = [0; 32];
    digest.copy_from_slice(&v[8..40]);
    mac.copy_from_slice(&v[40..72]);
    Ok(Some(KeyedMark {
        seq: u64::from_be_bytes(v[..8].try_into().map_err(|_| StoreError::Corrupt)?),
        digest,
        mac,
    }))
}

fn mark_bytes(a: &AuditAppend, mac: [u8; 32]) -> Vec<u8> {
    let mut v = Vec::with_capacity(72);
    v.extend_from_slice(&a.seq.to_be_bytes());
    v.extend_from_slice(&Mark::of(a.seq, &a.record).digest);
    v.extend_from_slice(&mac);
    v
}

fn seq_i64(seq: u64) -> Result<i64, StoreError> {
    i64::try_from(seq).map_err(|_| StoreError::Corrupt)
}

/// The statements of the write path, prepared once per connection (the commit
/// thread's lives long: the server parses and plans each of them once, not once
/// per unit).
struct Sql {
    fp_get: tokio_postgres::Statement,
    token_ins: tokio_postgres::Statement,
    fp_ins: tokio_postgres::Statement,
    token_del: tokio_postgres::Statement,
    token_del_of: tokio_postgres::Statement,
    fp_del: tokio_postgres::Statement,
    audit_lock: tokio_postgres::Statement,
    audit_last: tokio_postgres::Statement,
    audit_ins: tokio_postgres::Statement,
    meta_put: tokio_postgres::Statement,
    token_read: tokio_postgres::Statement,
}

impl Sql {
    async fn prepare(c: &impl GenericClient) -> Result<Sql, StoreError> {
        let p = |q: &'static str| async move { c.prepare(q).await.map_err(db) };
        let (fp_get, token_ins, fp_ins, token_del, token_del_of) = tokio::try_join!(
            p("SELECT token FROM tv_fingerprints WHERE tenant = $1 AND fingerprint = $2"),
            p(
                "INSERT INTO tv_tokens (token, tenant, key_version, record, expires_at, last_used_at) \
               VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (token) DO NOTHING"
            ),
            p(
                "INSERT INTO tv_fingerprints (tenant, fingerprint, token) VALUES ($1, $2, $3) \
               ON CONFLICT (tenant, fingerprint) DO NOTHING"
            ),
            p("DELETE FROM tv_tokens WHERE token = $1"),
            p("DELETE FROM tv_tokens WHERE token = $1 AND tenant = $2 RETURNING record"),
        )?;
        let (fp_del, audit_lock, audit_last, audit_ins, meta_put, token_read) = tokio::try_join!(
            p("DELETE FROM tv_fingerprints WHERE tenant = $1 AND fingerprint = $2 AND token = $3"),
            p("SELECT 1 FROM tv_meta WHERE name = 'audit_lock' FOR UPDATE"),
            p("SELECT seq, record FROM tv_audit ORDER BY seq DESC LIMIT 1"),
            p("INSERT INTO tv_audit (seq, record) SELECT * FROM UNNEST($1::BIGINT[], $2::BYTEA[])"),
            p(
                "INSERT INTO tv_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value"
            ),
            // A read that records a use when the last one is older than $4 (one
            // statement; the SELECT sees the row as before the UPDATE, hence COALESCE).
            // The use is skipped when another transaction holds the row (another
            // replica's batch, a rewrap, a delete): a batch never waits on a row lock
            // for a use, so two replicas' batches touching the same cards in opposite
            // orders cannot deadlock. `record_skipped_uses` records it after the commit.
            p("WITH due AS (SELECT token FROM tv_tokens \
               WHERE token = $1 AND tenant = $2 AND last_used_at <= $4 \
               AND (expires_at IS NULL OR expires_at > $3) FOR UPDATE SKIP LOCKED), \
               used AS (UPDATE tv_tokens t SET last_used_at = $3 FROM due \
               WHERE t.token = due.token RETURNING t.last_used_at) \
               SELECT record, COALESCE((SELECT last_used_at FROM used), last_used_at) \
               FROM tv_tokens WHERE token = $1 AND tenant = $2"),
        )?;
        Ok(Sql {
            fp_get,
            token_ins,
            fp_ins,
            token_del,
            token_del_of,
            fp_del,
            audit_lock,
            audit_last,
            audit_ins,
            meta_put,
            token_read,
        })
    }
}

/// Writes audit records (and the keyed mark of the last MACed one) in `client`'s transaction.
async fn write_audit(client: &impl GenericClient, sql: &Sql, records: &[AuditAppend]) -> Result<(), StoreError> {
    if records.is_empty() {
        return Ok(());
    }
    let seqs: Vec<i64> = records.iter().map(|a| seq_i64(a.seq)).collect::<Result<_, _>>()?;
    let bodies: Vec<&[u8]> = records.iter().map(|a| a.record.as_slice()).collect();
    client.execute(&sql.audit_ins, &[&seqs, &bodies]).await.map_err(db)?;
    // The keyed mark's MAC is computed for that one record only.
    if let Some(k) = records.iter().filter(|a| a.keyed.is_some()).max_by_key(|a| a.seq)
        && let Some(mac) = k.keyed_mac()
    {
        put_mark(client, sql, k, mac).await?;
    }
    Ok(())
}

/// Stores `a` as the keyed mark, with the MAC `mac` over it.
async fn put_mark(client: &impl GenericClient, sql: &Sql, a: &AuditAppend, mac: [u8; 32]) -> Result<(), StoreError> {
    let value = mark_bytes(a, mac);
    client
        .execute(&sql.meta_put, &[&KEYED_MARK, &value])
        .await
        .map_err(db)?;
    Ok(())
}

async fn put_meta(client: &impl GenericClient, name: &str, value: &[u8]) -> Result<(), StoreError> {
    client
        .execute(
            "INSERT INTO tv_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            &[&name, &value],
        )
        .await
        .map_err(db)?;
    Ok(())
}

async fn get_meta(client: &impl GenericClient, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(client
        .query_opt("SELECT value FROM tv_meta WHERE name = $1", &[&name])
        .await
        .map_err(db)?
        .map(|r| r.get(0)))
}

fn u64_of(v: Option<Vec<u8>>) -> Result<u64, StoreError> {
    match v {
        None => Ok(0),
        Some(b) => Ok(u64::from_be_bytes(
            b.as_slice().try_into().map_err(|_| StoreError::Corrupt)?,
        )),
    }
}

fn token_of(s: &str) -> Result<Token, StoreError> {
    Token::parse(s).ok_or(StoreError::Corrupt)
}

/// Applies one unit's change in the batch's transaction; `None` when it changes
/// nothing (then it stores no audit record).
async fn change(client: &impl GenericClient, sql: &Sql, change: &Change) -> Result<(Applied, bool), StoreError> {
    match change {
        Change::Insert { record, mode } => {
            let tenant = record.tenant.as_str();
            let fp = &record.fingerprint[..];
            let known = client
                .query_opt(&sql.fp_get, &[&tenant, &fp])
                .await
                .map_err(db)?
                .map(|r| token_of(r.get(0)))
                .transpose()?;
            if *mode == InsertMode::Dedupe
                && let Some(existing) = known
            {
                return Ok((Applied::Inserted(InsertOutcome::FingerprintExists(existing)), false));
            }
            let value = encode(record)?;
            let inserted = client
                .execute(
                    &sql.token_ins,
                    &[
                        &record.token.as_str(),
                        &tenant,
                        &i64::from(record.sealed.key_version),
                        &value,
                        &record.expires_at,
                        &record.created_at.unix_timestamp(),
                    ],
                )
                .await
                .map_err(db)?;
            if inserted == 0 {
                return Ok((Applied::Inserted(InsertOutcome::TokenTaken), false));
            }
            if known.is_none() {
                // Another replica may have stored this card meanwhile: the unique
                // key decides, and a deduplicating insert yields to the first.
                let indexed = client
                    .execute(&sql.fp_ins, &[&tenant, &fp, &record.token.as_str()])
                    .await
                    .map_err(db)?;
                if indexed == 0 && *mode == InsertMode::Dedupe {
                    client
                        .execute(&sql.token_del, &[&record.token.as_str()])
                        .await
                        .map_err(db)?;
                    let row = client.query_one(&sql.fp_get, &[&tenant, &fp]).await.map_err(db)?;
                    return Ok((
                        Applied::Inserted(InsertOutcome::FingerprintExists(token_of(row.get(0))?)),
                        false,
                    ));
                }
            }
            Ok((Applied::Inserted(InsertOutcome::Inserted), true))
        }
        Change::Delete { tenant, token } => {
            let row = client
                .query_opt(&sql.token_del_of, &[&token.as_str(), &tenant.as_str()])
                .await
                .map_err(db)?;
            let Some(row) = row else {
                return Ok((Applied::Deleted(false), false));
            };
            let record = decode(token, row.get(0))?;
            client
                .execute(
                    &sql.fp_del,
                    &[&tenant.as_str(), &&record.fingerprint[..], &token.as_str()],
                )
                .await
                .map_err(db)?;
            Ok((Applied::Deleted(true), true))
        }
        Change::Nothing => Ok((Applied::Audited, true)),
        Change::Read {
            tenant,
            token,
            at,
            touch,
        } => {
            // No use recorded: no row is older than i64::MIN.
            let older_than = touch.map_or(i64::MIN, |g| at.saturating_sub(g));
            let row = client
                .query_opt(&sql.token_read, &[&token.as_str(), &tenant.as_str(), at, &older_than])
                .await
                .map_err(db)?;
            let Some(row) = row else {
                return Ok((Applied::Read(None), false));
            };
            let record = match read_live(token, row.get(0), tenant, *at) {
                Ok(record) => record,
                Err(outcome) => return Ok((outcome, false)),
            };
            let last_used = Some(row.get::<_, i64>(1));
            Ok((Applied::Read(Some(Box::new(ReadRecord { record, last_used }))), true))
        }
    }
}

/// Applies a batch of units sharing one audit trail in one transaction: first
/// every change, then, holding the chain's lock row, the audit records of the
/// units that changed something, sealed after whatever record the trail ends
/// with (another replica may have appended since). The lock is held until
/// `COMMIT`: the trail stays one chain with several writers. A failed commit
/// seals nothing (every unit of the batch hears the error).
async fn apply_batch(
    client: &mut Client,
    sql: &Sql,
    units: &[&Unit],
    seal: &dyn AuditSeal,
) -> Result<Vec<Applied>, StoreError> {
    let mut sealer = seal.begin();
    let tx = client.transaction().await.map_err(db)?;
    // Pipelined: every unit's statements go out without waiting for the others'
    // answers (one connection executes them in the order sent). Each statement is
    // atomic and each unit's logic settles conflicts by the database's unique keys,
    // so two units of one batch on the same card still give one token.
    let results = futures_util::future::join_all(units.iter().map(|unit| change(&tx, sql, &unit.change))).await;
    let mut out = Vec::with_capacity(units.len());
    let mut made = Vec::with_capacity(units.len());
    for r in results {
        let (applied, changed) = r?;
        out.push(applied);
        made.push(changed);
    }
    let mut records = Vec::with_capacity(units.len());
    if made.iter().any(|m| *m) {
        follow_trail(&tx, sql, &mut *sealer).await?;
        for (unit, changed) in units.iter().zip(&made) {
            if *changed {
                records.append(&mut sealer.seal(&unit.audit)?);
            }
        }
        write_audit(&tx, sql, &records).await?;
    }
    tx.commit().await.map_err(db)?;
    sealer.commit();
    Ok(out)
}

/// A use a read skipped recording: tenant, token, when, and "older than".
type SkippedUse = (String, String, i64, i64);

/// The reads of a batch whose row another transaction held, so that they skipped
/// recording their use (see `token_read`).
fn skipped_uses(units: &[&Unit], out: &[Applied]) -> Vec<SkippedUse> {
    let mut skipped = Vec::new();
    for (unit, applied) in units.iter().zip(out) {
        if let (
            Change::Read {
                tenant,
                token,
                at,
                touch: Some(g),
            },
            Applied::Read(Some(found)),
        ) = (&unit.change, applied)
        {
            let older_than = at.saturating_sub(*g);
            if found.last_used.is_none_or(|last| last <= older_than) {
                skipped.push((tenant.as_str().to_owned(), token.as_str().to_owned(), *at, older_than));
            }
        }
    }
    skipped
}

/// Records the uses the reads skipped, after their batch committed and was
/// answered, holding no lock (waiting for the row cannot deadlock), as
/// [`Store::touch`] does. Rare: only while a rewrap, a card update, a delete or
/// another replica's batch holds the same row. A failure is logged.
async fn record_skipped_uses(client: &Client, skipped: Vec<SkippedUse>) {
    for (tenant, token, at, older_than) in skipped {
        let done = client
            .execute(
                "UPDATE tv_tokens SET last_used_at = $3 WHERE token = $1 AND tenant = $2 AND last_used_at <= $4",
                &[&token, &tenant, &at, &older_than],
            )
            .await;
        if let Err(e) = done {
            tracing::warn!(error = %db(e), "cannot record a card's use (retention counts from the last recorded one)");
        }
    }
}

/// Takes the audit chain's lock (until the transaction ends) and moves the
/// sealer to the trail's last record.
async fn follow_trail(
    client: &impl GenericClient,
    sql: &Sql,
    sealer: &mut dyn crate::store::SealBatch,
) -> Result<(), StoreError> {
    client.query_one(&sql.audit_lock, &[]).await.map_err(db)?;
    let last = client.query_opt(&sql.audit_last, &[]).await.map_err(db)?;
    if let Some(row) = last {
        let seq: i64 = row.get(0);
        let record: &[u8] = row.get(1);
        sealer.follow(seq as u64, record)?;
    }
    Ok(())
}

/// The commit thread: its own connection on its own single-threaded runtime
/// (the audit trail's head lock is held across the transaction's awaits).
fn committer(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    mut rx: mpsc::UnboundedReceiver<Job>,
    counters: Arc<Counters>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the PostgreSQL commit runtime");
            return;
        }
    };
    runtime.block_on(async move {
        let mut client: Option<Client> = None;
        let mut prepared: Option<Sql> = None;
        let mut connected_before = false;
        while let Some(first) = rx.recv().await {
            let mut applies = vec![first];
            while applies.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => applies.push(job),
                    Err(_) => break,
                }
            }
            let applies: Vec<_> = applies
                .into_iter()
                .map(|Job { unit, seal, reply }| (unit, seal, reply))
                .collect();
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                prepared = None;
                client = match config.connect(tls.clone()).await {
                    Ok((c, connection)) => {
                        if connected_before {
                            counters.reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::warn!("PostgreSQL commit connection re-established");
                        }
                        connected_before = true;
                        tokio::spawn(async move {
                            if let Err(e) = connection.await {
                                tracing::warn!(error = %db(e), "PostgreSQL commit connection closed");
                            }
                        });
                        Some(c)
                    }
                    Err(e) => {
                        let e = db(e);
                        counters.note::<()>(&Err(e.clone()));
                        for (_, _, reply) in applies {
                            reply.send(Err(e.clone()));
                        }
                        continue;
                    }
                };
            }
            let Some(c) = client.as_mut() else { continue };
            if prepared.is_none() {
                match Sql::prepare(&*c).await {
                    Ok(p) => prepared = Some(p),
                    Err(e) => {
                        counters.note::<()>(&Err(e.clone()));
                        for (_, _, reply) in applies {
                            reply.send(Err(e.clone()));
                        }
                        continue;
                    }
                }
            }
            let Some(sql) = prepared.as_ref() else { continue };
            // Units sharing an audit trail are applied as one transaction.
            let mut outcomes: Vec<Result<Applied, StoreError>> = Vec::with_capacity(applies.len());
            let mut skipped = Vec::new();
            let mut start = 0;
            while start < applies.len() {
                let seal = applies[start].1.clone();
                let end = applies[start..]
                    .iter()
                    .position(|(_, s, _)| !Arc::ptr_eq(s, &seal))
                    .map_or(applies.len(), |n| start + n);
                let units: Vec<&Unit> = applies[start..end].iter().map(|(u, _, _)| &**u).collect();
                let mut result = apply_batch(c, sql, &units, &*seal).await;
                // A deadlock or serialization failure (another replica's batch
                // touched the same cards in another order) rolled everything back
                // and sealed nothing: the batch is simply run again.
                for _ in 0..3 {
                    match &result {
                        Err(e) if rolled_back(e) => result = apply_batch(c, sql, &units, &*seal).await,
                        _ => break,
                    }
                }
                match result {
                    Ok(done) => {
                        skipped.extend(skipped_uses(&units, &done));
                        outcomes.extend(done.into_iter().map(Ok));
                    }
                    Err(e) => {
                        counters.note::<()>(&Err(e.clone()));
                        tracing::warn!(error = %e, units = units.len(), "PostgreSQL batch failed");
                        outcomes.extend((start..end).map(|_| Err(e.clone())));
                    }
                }
                start = end;
            }
            for ((unit, _, reply), outcome) in applies.into_iter().zip(outcomes) {
                drop(unit); // its hold is released once applied
                reply.send(outcome);
            }
            if !skipped.is_empty() {
                record_skipped_uses(&*c, skipped).await;
            }
        }
    });
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.committer.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn insert_one(
    client: &mut deadpool_postgres::Object,
    record: StoredRecord,
    mode: InsertMode,
    audit: Option<AuditAppend>,
) -> Result<InsertOutcome, StoreError> {
    let tx = raw(client).transaction().await.map_err(db)?;
    let sql = Sql::prepare(&tx).await?;
    let record = Box::new(record);
    let (applied, made) = change(&tx, &sql, &Change::Insert { record, mode }).await?;
    if made && let Some(a) = audit {
        write_audit(&tx, &sql, &[a]).await?;
    }
    tx.commit().await.map_err(db)?;
    match applied {
        Applied::Inserted(o) => Ok(o),
        _ => Err(StoreError::Backend("unexpected outcome".into())),
    }
}

impl Store for PgStore {
    fn insert(
        &self,
        record: &StoredRecord,
        mode: InsertMode,
        audit: Option<&AuditAppend>,
    ) -> Result<InsertOutcome, StoreError> {
        let (record, audit) = (record.clone(), audit.cloned());
        self.run(move |mut c| async move { insert_one(&mut c, record, mode, audit).await })
    }

    fn get(&self, tenant: &TenantId, token: &Token) -> Result<Option<StoredRecord>, StoreError> {
        let (tenant, token) = (tenant.clone(), token.clone());
        self.run(move |c| async move {
            // Prepared once per pooled connection (the hot read path).
            let stmt = c
                .prepare_cached("SELECT record FROM tv_tokens WHERE token = $1 AND tenant = $2")
                .await
                .map_err(db)?;
            let row = c
                .query_opt(&stmt, &[&token.as_str(), &tenant.as_str()])
                .await
                .map_err(db)?;
            match row {
                None => Ok(None),
                Some(r) => {
                    let record = decode(&token, r.get(0))?;
                    Ok((record.tenant == tenant).then_some(record))
                }
            }
        })
    }

    fn find_fingerprint(&self, tenant: &TenantId, fingerprint: &[u8; 32]) -> Result<Option<Token>, StoreError> {
        let (tenant, fp) = (tenant.clone(), *fingerprint);
        self.run(move |c| async move {
            let stmt = c
                .prepare_cached("SELECT token FROM tv_fingerprints WHERE tenant = $1 AND fingerprint = $2")
                .await
                .map_err(db)?;
            c.query_opt(&stmt, &[&tenant.as_str(), &&fp[..]])
                .await
                .map_err(db)?
                .map(|r| token_of(r.get(0)))
                .transpose()
        })
    }

    fn delete(&self, tenant: &TenantId, token: &Token, audit: Option<&AuditAppend>) -> Result<bool, StoreError> {
        let (tenant, token, audit) = (tenant.clone(), token.clone(), audit.cloned());
        self.run(move |mut c| async move {
            let tx = raw(&mut c).transaction().await.map_err(db)?;
            let sql = Sql::prepare(&tx).await?;
            let (applied, made) = change(&tx, &sql, &Change::Delete { tenant, token }).await?;
            if made && let Some(a) = audit {
                write_audit(&tx, &sql, &[a]).await?;
            }
            tx.commit().await.map_err(db)?;
            Ok(applied == Applied::Deleted(true))
        })
    }

    fn count(&self) -> Result<u64, StoreError> {
        self.run(|c| async move {
            let n: i64 = c
                .query_one("SELECT count(*) FROM tv_tokens", &[])
                .await
                .map_err(db)?
                .get(0);
            Ok(n as u64)
        })
    }

    fn expired(&self, now: i64, limit: usize) -> Result<Vec<(TenantId, Token)>, StoreError> {
        let limit = limit as i64;
        self.run(move |c| async move {
            let rows = c
                .query(
                    "SELECT tenant, token FROM tv_tokens WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2",
                    &[&now, &limit],
                )
                .await
                .map_err(db)?;
            rows.iter()
                .map(|r| {
                    let tenant = TenantId::parse(r.get::<_, &str>(0)).ok_or(StoreError::Corrupt)?;
                    let token = Token::parse(r.get::<_, &str>(1)).ok_or(StoreError::Corrupt)?;
                    Ok((tenant, token))
                })
                .collect()
        })
    }

    fn tenant_records(
        &self,
        tenant: &TenantId,
        after: Option<&Token>,
        limit: usize,
        used_before: Option<i64>,
    ) -> Result<Vec<(StoredRecord, i64)>, StoreError> {
        let (tenant, after) = (tenant.clone(), after.map(|t| t.as_str().to_owned()).unwrap_or_default());
        let limit = limit as i64;
        self.run(move |c| async move {
            let rows = c
                .query(
                    "SELECT token, record, last_used_at FROM tv_tokens \
                     WHERE tenant = $1 AND token > $2 AND ($3::BIGINT IS NULL OR last_used_at < $3) \
                     ORDER BY token LIMIT $4",
                    &[&tenant.as_str(), &after, &used_before, &limit],
                )
                .await
                .map_err(db)?;
            rows.iter()
                .map(|r| {
                    let token = token_of(r.get(0))?;
                    let record = decode(&token, r.get(1))?;
                    if record.tenant != tenant {
                        return Err(StoreError::Corrupt);
                    }
                    Ok((record, r.get::<_, i64>(2)))
                })
                .collect()
        })
    }

    fn last_used(&self, tenant: &TenantId, token: &Token) -> Result<Option<i64>, StoreError> {
        let (tenant, token) = (tenant.clone(), token.clone());
        self.run(move |c| async move {
            Ok(c.query_opt(
                "SELECT last_used_at FROM tv_tokens WHERE token = $1 AND tenant = $2",
                &[&token.as_str(), &tenant.as_str()],
            )
            .await
            .map_err(db)?
            .map(|r| r.get::<_, i64>(0)))
        })
    }

    fn touch(&self, tenant: &TenantId, token: &Token, at: i64, granularity: i64) -> Result<(), StoreError> {
        let (tenant, token) = (tenant.clone(), token.clone());
        let older_than = at.saturating_sub(granularity);
        self.run(move |c| async move {
            let stmt = c
                .prepare_cached(
                    "UPDATE tv_tokens SET last_used_at = $3 WHERE token = $1 AND tenant = $2 AND last_used_at <= $4",
                )
                .await
                .map_err(db)?;
            c.execute(&stmt, &[&token.as_str(), &tenant.as_str(), &at, &older_than])
                .await
                .map_err(db)?;
            Ok(())
        })
    }

    fn charges_of(
        &self,
        tenant: &TenantId,
        of: &ChargesOf,
        after: Option<&(i64, String)>,
        limit: usize,
    ) -> Result<Vec<ChargeRecord>, StoreError> {
        let (column, value) = match of {
            ChargesOf::Token(t) => ("token", t.clone()),
            ChargesOf::Reference(r) => ("reference", r.clone()),
        };
        let (after_at, after_id) = after.cloned().unwrap_or((i64::MIN, String::new()));
        let (tenant, limit) = (tenant.clone(), limit as i64);
        let sql = format!(
            "SELECT record FROM tv_charges WHERE tenant = $1 AND {column} = $2 \
             AND (created_at, id) > ($3, $4) ORDER BY created_at, id LIMIT $5"
        );
        self.run(move |c| async move {
            let rows = c
                .query(&sql, &[&tenant.as_str(), &value, &after_at, &after_id, &limit])
                .await
                .map_err(db)?;
            rows.iter().map(|r| super::codec::decode_charge(r.get(0))).collect()
        })
    }

    fn count_by_version(&self) -> Result<std::collections::BTreeMap<u32, u64>, StoreError> {
        self.run(|c| async move {
            let rows = c
                .query("SELECT key_version, count(*) FROM tv_tokens GROUP BY key_version", &[])
                .await
                .map_err(db)?;
            rows.into_iter()
                .map(|r| {
                    let v: i64 = r.get(0);
                    let n: i64 = r.get(1);
                    Ok((u32::try_from(v).map_err(|_| StoreError::Corrupt)?, n as u64))
                })
                .collect()
        })
    }

    fn records_under_version(
        &self,
        version: u32,
        after: Option<&Token>,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let after = after.map(|t| t.as_str().to_owned()).unwrap_or_default();
        self.run(move |c| async move {
            let rows = c
                .query(
                    "SELECT token, record FROM tv_tokens WHERE key_version = $1 AND token > $2 \
                     ORDER BY token LIMIT $3",
                    &[&i64::from(version), &after, &(limit as i64)],
                )
                .await
                .map_err(db)?;
            rows.iter().map(|r| decode(&token_of(r.get(0))?, r.get(1))).collect()
        })
    }

    fn replace_sealed(&self, moves: &[(StoredRecord, SealedCard)]) -> Result<u64, StoreError> {
        let mut prepared = Vec::with_capacity(moves.len());
        for (current, sealed) in moves {
            let expected = encode(current)?;
            let next = encode(&StoredRecord {
                sealed: sealed.clone(),
                ..current.clone()
            })?;
            prepared.push((
                current.token.as_str().to_owned(),
                i64::from(sealed.key_version),
                expected,
                next,
            ));
        }
        self.run(move |mut c| async move {
            let tx = raw(&mut c).transaction().await.map_err(db)?;
            let stmt = tx
                .prepare("UPDATE tv_tokens SET record = $4, key_version = $2 WHERE token = $1 AND record = $3")
                .await
                .map_err(db)?;
            // Pipelined: every update is sent before the first answer is awaited.
            type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);
            let params: Vec<[Param<'_>; 4]> = prepared
                .iter()
                .map(|(token, version, expected, next)| [token as Param<'_>, version, expected, next])
                .collect();
            let updates = params.iter().map(|p| tx.execute(&stmt, p));
            let counts = futures_util::future::try_join_all(updates).await.map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(counts.into_iter().sum())
        })
    }

    fn set_network_tx_id(&self, tenant: &TenantId, token: &Token, id: &str) -> Result<bool, StoreError> {
        super::set_once(
            || self.get(tenant, token),
            |expected, next| {
                let key = token.as_str().to_owned();
                let n = self.run(move |c| async move {
                    c.execute(
                        "UPDATE tv_tokens SET record = $3 WHERE token = $1 AND record = $2",
                        &[&key, &expected, &next],
                    )
                    .await
                    .map_err(db)
                })?;
                Ok(n == 1)
            },
            id,
        )
    }

    fn reserve_charge(
        &self,
        charge: &ChargeRecord,
        idempotency_key: &[u8; 32],
        idem: &IdempotencyRecord,
        live_since: i64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let c = super::codec::encode_charge(charge)?;
        let i = postcard::to_stdvec(idem).map_err(|_| StoreError::Corrupt)?;
        let (id, tenant, key, created) = (
            charge.id.clone(),
            charge.tenant.clone(),
            *idempotency_key,
            idem.created_at,
        );
        let (token, reference, charge_created) = (charge.token.clone(), charge.reference.clone(), charge.created_at);
        self.run(move |mut client| async move {
            let tx = raw(&mut client).transaction().await.map_err(db)?;
            // The key's row decides between replicas: a concurrent reservation waits
            // for this one to commit, then finds it live and takes nothing.
            let reserved = tx
                .query_opt(
                    "INSERT INTO tv_idempotency (key, record, created_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (key) DO UPDATE SET record = EXCLUDED.record, created_at = EXCLUDED.created_at \
                     WHERE tv_idempotency.created_at < $4 RETURNING key",
                    &[&&key[..], &i, &created, &live_since],
                )
                .await
                .map_err(db)?;
            if reserved.is_none() {
                let row = tx
                    .query_one("SELECT record FROM tv_idempotency WHERE key = $1", &[&&key[..]])
                    .await
                    .map_err(db)?;
                let prior: IdempotencyRecord = postcard::from_bytes(row.get(0)).map_err(|_| StoreError::Corrupt)?;
                return Ok(Some(prior));
            }
            tx.execute(
                "INSERT INTO tv_charges (id, tenant, record, token, reference, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&id, &tenant, &c, &token, &reference, &charge_created],
            )
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(None)
        })
    }

    fn swap_charge(&self, old: &ChargeRecord, new: &ChargeRecord) -> Result<bool, StoreError> {
        let (old, c) = (old.clone(), super::codec::encode_charge(new)?);
        self.run(move |mut client| async move {
            let tx = raw(&mut client).transaction().await.map_err(db)?;
            // The row lock serializes modifications of one charge across replicas.
            let Some(row) = tx
                .query_opt("SELECT record FROM tv_charges WHERE id = $1 FOR UPDATE", &[&old.id])
                .await
                .map_err(db)?
            else {
                return Ok(false);
            };
            if super::codec::decode_charge(row.get(0))? != old {
                return Ok(false);
            }
            tx.execute("UPDATE tv_charges SET record = $2 WHERE id = $1", &[&old.id, &c])
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(true)
        })
    }

    fn update_charge(&self, charge: &ChargeRecord) -> Result<(), StoreError> {
        let c = super::codec::encode_charge(charge)?;
        let (id, tenant) = (charge.id.clone(), charge.tenant.clone());
        let (token, reference, created) = (charge.token.clone(), charge.reference.clone(), charge.created_at);
        self.run(move |client| async move {
            client
                .execute(
                    "INSERT INTO tv_charges (id, tenant, record, token, reference, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (id) DO UPDATE SET tenant = EXCLUDED.tenant, record = EXCLUDED.record, \
                     token = EXCLUDED.token, reference = EXCLUDED.reference, created_at = EXCLUDED.created_at",
                    &[&id, &tenant, &c, &token, &reference, &created],
                )
                .await
                .map_err(db)?;
            Ok(())
        })
    }

    fn get_charge(&self, tenant: &TenantId, id: &str) -> Result<Option<ChargeRecord>, StoreError> {
        let (tenant, id) = (tenant.clone(), id.to_owned());
        self.run(move |c| async move {
            let row = c
                .query_opt(
                    "SELECT record FROM tv_charges WHERE id = $1 AND tenant = $2",
                    &[&id, &tenant.as_str()],
                )
                .await
                .map_err(db)?;
            match row {
                None => Ok(None),
                Some(r) => {
                    let charge = super::codec::decode_charge(r.get(0))?;
                    Ok((charge.tenant == tenant.as_str()).then_some(charge))
                }
            }
        })
    }

    fn get_idempotency(&self, idempotency_key: &[u8; 32]) -> Result<Option<IdempotencyRecord>, StoreError> {
        let key = *idempotency_key;
        self.run(move |c| async move {
            match c
                .query_opt("SELECT record FROM tv_idempotency WHERE key = $1", &[&&key[..]])
                .await
                .map_err(db)?
            {
                None => Ok(None),
                Some(r) => postcard::from_bytes(r.get(0))
                    .map(Some)
                    .map_err(|_| StoreError::Corrupt),
            }
        })
    }

    fn remember(
        &self,
        idempotency_key: &[u8; 32],
        idem: &IdempotencyRecord,
        live_since: i64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let i = postcard::to_stdvec(idem).map_err(|_| StoreError::Corrupt)?;
        let (key, created) = (*idempotency_key, idem.created_at);
        self.run(move |client| async move {
            let stored = client
                .query_opt(
                    "INSERT INTO tv_idempotency (key, record, created_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (key) DO UPDATE SET record = EXCLUDED.record, created_at = EXCLUDED.created_at \
                     WHERE tv_idempotency.created_at < $4 RETURNING key",
                    &[&&key[..], &i, &created, &live_since],
                )
                .await
                .map_err(db)?;
            if stored.is_some() {
                return Ok(None);
            }
            let row = client
                .query_one("SELECT record FROM tv_idempotency WHERE key = $1", &[&&key[..]])
                .await
                .map_err(db)?;
            Ok(Some(postcard::from_bytes(row.get(0)).map_err(|_| StoreError::Corrupt)?))
        })
    }

    fn audit_append(&self, seq: u64, record: &[u8], keyed_mac: Option<[u8; 32]>) -> Result<(), StoreError> {
        let a = AuditAppend {
            seq,
            record: record.to_vec(),
            keyed: None,
            hash: [0; 32],
        };
        self.run(move |mut c| async move {
            let tx = raw(&mut c).transaction().await.map_err(db)?;
            let sql = Sql::prepare(&tx).await?;
            write_audit(&tx, &sql, std::slice::from_ref(&a)).await?;
            if let Some(mac) = keyed_mac {
                put_mark(&tx, &sql, &a, mac).await?;
            }
            tx.commit().await.map_err(db)
        })
    }

    fn audit_event(&self, event: &super::AuditEvent, seal: Arc<dyn AuditSeal>) -> Result<(), StoreError> {
        // Through the commit thread like a unit, so it chains after every replica's records.
        let (reply, rx) = std::sync::mpsc::sync_channel(1);
        let unit = Unit {
            change: Change::Nothing,
            audit: event.clone(),
            held: None,
        };
        let sent = self.committer.as_ref().is_some_and(|c| {
            c.send(Job {
                unit: Box::new(unit),
                seal,
                reply: Reply::Blocking(reply),
            })
            .is_ok()
        });
        if !sent {
            return Err(StoreError::Backend("commit thread unavailable".into()));
        }
        rx.recv()
            .unwrap_or_else(|_| Err(StoreError::Backend("commit thread stopped".into())))
            .map(|_| ())
    }

    fn audit_keyed_mark(&self) -> Option<KeyedMark> {
        // The mark as it is now, not as it was at open: other replicas move it
        // with every batch they commit (a replica unsealed after another one wrote
        // MACed records must check the head against that replica's mark).
        match self.run(|c| async move { keyed_mark(&**c).await }) {
            Ok(mark) => mark,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the audit keyed mark now: using the one read at open");
                self.keyed_at_open
            }
        }
    }

    fn audit_last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        self.run(|c| async move {
            let row = c
                .query_opt("SELECT seq, record FROM tv_audit ORDER BY seq DESC LIMIT 1", &[])
                .await
                .map_err(db)?;
            Ok(row.map(|r| (r.get::<_, i64>(0) as u64, r.get(1))))
        })
    }

    fn audit_scan(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let from = i64::try_from(from).unwrap_or(i64::MAX);
        self.run(move |c| async move {
            let rows = c
                .query(
                    "SELECT seq, record FROM tv_audit WHERE seq >= $1 ORDER BY seq LIMIT $2",
                    &[&from, &(limit as i64)],
                )
                .await
                .map_err(db)?;
            Ok(rows
                .into_iter()
                .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
                .collect())
        })
    }

    fn keystore_generation(&self) -> Result<u64, StoreError> {
        self.run(|c| async move { u64_of(get_meta(&**c, KEYSTORE_GENERATION).await?) })
    }

    fn set_keystore_generation(&self, generation: u64) -> Result<(), StoreError> {
        self.run(move |c| async move { put_meta(&**c, KEYSTORE_GENERATION, &generation.to_be_bytes()).await })
    }

    fn holds_keystore(&self) -> bool {
        true
    }

    fn keystore_load(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.run(|c| async move {
            let row = c
                .query_opt("SELECT body FROM tv_keystore WHERE id = 1", &[])
                .await
                .map_err(db)?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn keystore_stored_generation(&self) -> Result<Option<u64>, StoreError> {
        self.run(|c| async move {
            let row = c
                .query_opt("SELECT generation FROM tv_keystore WHERE id = 1", &[])
                .await
                .map_err(db)?;
            Ok(row.map(|r| r.get::<_, i64>(0) as u64))
        })
    }

    fn keystore_save(&self, expected: Option<u64>, generation: u64, bytes: &[u8]) -> Result<bool, StoreError> {
        let bytes = bytes.to_vec();
        let generation = seq_i64(generation)?;
        let expected = expected.map(seq_i64).transpose()?;
        self.run(move |c| async move {
            let n = match expected {
                None => c
                    .execute(
                        "INSERT INTO tv_keystore (id, generation, body) VALUES (1, $1, $2) ON CONFLICT (id) DO NOTHING",
                        &[&generation, &bytes],
                    )
                    .await
                    .map_err(db)?,
                Some(expected) => c
                    .execute(
                        "UPDATE tv_keystore SET generation = $2, body = $3 WHERE id = 1 AND generation = $1",
                        &[&expected, &generation, &bytes],
                    )
                    .await
                    .map_err(db)?,
            };
            Ok(n == 1)
        })
    }

    fn kek_wraps(&self, version: u32) -> Result<u64, StoreError> {
        self.run(move |c| async move { u64_of(get_meta(&**c, &format!("kek_wraps/{version}")).await?) })
    }

    fn set_kek_wraps(&self, version: u32, reserved: u64) -> Result<(), StoreError> {
        self.run(move |c| async move { put_meta(&**c, &format!("kek_wraps/{version}"), &reserved.to_be_bytes()).await })
    }

    fn audit_checkpoint(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.run(|c| async move { get_meta(&**c, CHECKPOINT).await })
    }

    fn audit_prune(&self, through: u64, checkpoint: &[u8]) -> Result<u64, StoreError> {
        let checkpoint = checkpoint.to_vec();
        let through = seq_i64(through)?;
        self.run(move |mut c| async move {
            // One transaction: the checkpoint and the removal land together.
            let tx = raw(&mut c).transaction().await.map_err(db)?;
            put_meta(&tx, CHECKPOINT, &checkpoint).await?;
            let n = tx
                .execute("DELETE FROM tv_audit WHERE seq <= $1", &[&through])
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(n)
        })
    }

    fn apply(&self, unit: Unit, seal: Arc<dyn AuditSeal>) -> Applying {
        let (reply, rx) = oneshot::channel();
        let sent = self.committer.as_ref().is_some_and(|c| {
            c.send(Job {
                unit: Box::new(unit),
                seal,
                reply: Reply::Async(reply),
            })
            .is_ok()
        });
        if sent {
            Applying::waiting(rx)
        } else {
            Applying::failed(StoreError::Backend("commit thread unavailable".into()))
        }
    }

    fn commit(&self) -> Commit {
        // Every write is its own committed transaction (or a unit's batch) before it
        // returns: whatever was written before this call is already durable.
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Ok(()));
        Commit::waiting(rx)
    }

    fn availability(&self) -> Availability {
        use std::sync::atomic::Ordering::Relaxed;
        Availability {
            unavailable: self.counters.unavailable.load(Relaxed),
            reconnects: self.counters.reconnects.load(Relaxed),
        }
    }

    fn check(&self) -> Result<(), StoreError> {
        self.run(|c| async move {
            let v: i64 = c
                .query_one("SELECT version FROM tv_schema WHERE id = 1", &[])
                .await
                .map_err(db)?
                .get(0);
            if v == SCHEMA_VERSION {
                Ok(())
            } else {
                Err(StoreError::Backend(format!(
                    "schema version {v}, expected {SCHEMA_VERSION}"
                )))
            }
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh, empty database on the machine's PostgreSQL for one test
    /// (`TOKENVAULT_TEST_PG`, default `postgres://postgres@127.0.0.1:5432/postgres`).
    /// Outside CI a test skips when the server is unreachable; in CI it fails.
    pub(crate) fn fresh_database(name: &str) -> Option<String> {
        let admin = std::env::var("TOKENVAULT_TEST_PG")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let db = format!("tv_test_{name}_{}", std::process::id());
        let made = std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(async {
                    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await?;
                    tokio::spawn(conn);
                    client.batch_execute(&format!("DROP DATABASE IF EXISTS {db}")).await?;
                    client.batch_execute(&format!("CREATE DATABASE {db}")).await?;
                    Ok::<_, tokio_postgres::Error>(())
                })
                .map_err(|e| e.to_string())
            })
            .join()
        });
        match made {
            Ok(Ok(())) => {}
            other => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "PostgreSQL unreachable in CI ({admin}): {other:?}"
                );
                eprintln!("skipped: PostgreSQL unreachable at {admin}");
                return None;
            }
        }
        let mut url: tokio_postgres::Config = admin.parse().ok()?;
        url.dbname(&db);
        let host = match url.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".into(),
        };
        let port = url.get_ports().first().copied().unwrap_or(5432);
        let user = url.get_user().unwrap_or("postgres").to_owned();
        Some(format!("postgres://{user}@{host}:{port}/{db}?sslmode=disable"))
    }

    #[tokio::test]
    async fn postgres_passes_conformance() {
        let Some(url) = fresh_database("conformance") else {
            return;
        };
        let store = PgStore::open(&PgOptions::new(&url)).unwrap();
        crate::store::conformance::run(&store).await;
    }

    #[tokio::test]
    async fn migrations_run_once_and_a_newer_schema_is_refused() {
        let Some(url) = fresh_database("migrate") else { return };
        // Replicas starting together: all open, the schema is migrated once.
        let opened: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|_| s.spawn(|| PgStore::open(&PgOptions::new(&url)).map(|_| ())))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for o in opened {
            o.unwrap();
        }
        let store = PgStore::open(&PgOptions::new(&url)).unwrap();
        store.check().unwrap();
        store
            .run(|c| async move {
                c.execute("UPDATE tv_schema SET version = version + 1 WHERE id = 1", &[])
                    .await
                    .map_err(db)
            })
            .unwrap();
        assert!(
            store.check().is_err(),
            "a schema this build does not know is not healthy"
        );
        drop(store);
        let refused = PgStore::open(&PgOptions::new(&url)).err().unwrap();
        assert!(refused.to_string().contains("newer than this vault knows"), "{refused}");
    }

    /// A unit of `change` with a test audit event.
    fn test_unit(change: Change) -> Unit {
        Unit {
            change,
            audit: crate::store::AuditEvent {
                action: "test",
                outcome: "ok".into(),
                ..Default::default()
            },
            held: None,
        }
    }

    /// A fresh database's store holding `records` (each stored by a unit), its URL
    /// and a test seal; `None` without a PostgreSQL server.
    async fn holding(name: &str, records: &[&StoredRecord]) -> Option<(String, PgStore, Arc<dyn AuditSeal>)> {
        let url = fresh_database(name)?;
        let store = PgStore::open(&PgOptions::new(&url)).unwrap();
        let seal: Arc<dyn AuditSeal> = Arc::new(crate::store::conformance::TestSeal::after(&store));
        for r in records {
            let insert = Change::Insert {
                record: Box::new((*r).clone()),
                mode: InsertMode::Fresh,
            };
            assert!(store.apply(test_unit(insert), seal.clone()).await.unwrap().made());
        }
        Some((url, store, seal))
    }

    /// A read of `r` at `at` that records a use older than a minute.
    fn read_unit(r: &StoredRecord, at: i64) -> Unit {
        test_unit(Change::Read {
            tenant: r.tenant.clone(),
            token: r.token.clone(),
            at,
            touch: Some(60),
        })
    }

    /// A record whose bytes no longer decode fails its own read only: the units
    /// applied beside it in the same transaction are not failed with it.
    #[tokio::test]
    async fn a_damaged_record_fails_only_its_own_read() {
        use crate::store::conformance::record;
        let (a, b) = (record("t1", "4111110000001112", 1), record("t1", "4111110000011112", 2));
        let Some((_, store, seal)) = holding("unreadable", &[&a, &b]).await else {
            return;
        };
        let damaged = a.token.to_string();
        store
            .run(move |c| async move {
                c.execute(
                    "UPDATE tv_tokens SET record = '\\x00'::bytea WHERE token = $1",
                    &[&damaged],
                )
                .await
                .map_err(db)
            })
            .unwrap();
        let at = 1_700_000_100;
        let before = store.audit_last().unwrap().map_or(0, |(s, _)| s);
        let (bad, good) = tokio::join!(
            store.apply(read_unit(&a, at), seal.clone()),
            store.apply(read_unit(&b, at), seal.clone())
        );
        assert_eq!(bad.unwrap(), Applied::Unreadable);
        match good.unwrap() {
            Applied::Read(Some(found)) => assert_eq!(found.record, b),
            other => panic!("the undamaged record beside it: {other:?}"),
        }
        assert_eq!(
            store.audit_last().unwrap().map_or(0, |(s, _)| s),
            before + 1,
            "only the read that found its record is audited"
        );
    }

    /// A read never waits for a row another transaction holds (another replica's
    /// batch, a delete): it returns the record and skips recording the use, so two
    /// replicas' batches touching the same cards cannot deadlock.
    #[tokio::test]
    async fn a_read_does_not_wait_for_a_locked_row() {
        let a = crate::store::conformance::record("t1", "4111110000001112", 1);
        let Some((url, store, seal)) = holding("readlock", &[&a]).await else {
            return;
        };
        let created = a.created_at.unix_timestamp();
        let (config, tls) = {
            let o = PgOptions::new(&url);
            (o.config().unwrap(), o.tls().unwrap())
        };
        let (mut other, conn) = config.connect(tls).await.unwrap();
        tokio::spawn(conn);
        let holder = other.transaction().await.unwrap();
        holder
            .execute(
                "SELECT 1 FROM tv_tokens WHERE token = $1 FOR UPDATE",
                &[&a.token.as_str()],
            )
            .await
            .unwrap();
        let held = tokio::time::timeout(
            Duration::from_secs(5),
            store.apply(read_unit(&a, created + 100), seal.clone()),
        )
        .await
        .expect("a read waited for a locked row")
        .unwrap();
        match held {
            Applied::Read(Some(found)) => {
                assert_eq!(found.record, a);
                assert_eq!(
                    found.last_used,
                    Some(created),
                    "the use is skipped in the batch, not waited for"
                );
            }
            other => panic!("expected the record, got {other:?}"),
        }
        // Recorded after the commit, once the row is free (never lost: retention
        // counts from it).
        holder.rollback().await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.last_used(&a.tenant, &a.token).unwrap() != Some(created + 100) {
            assert!(
                std::time::Instant::now() < deadline,
                "the skipped use was never recorded"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Migration 6 on a database holding tokens and charges: the tokens count as
    /// used at the migration (never earlier), the charges get their listing columns.
    #[tokio::test]
    async fn migration_6_lists_what_an_older_schema_stored() {
        let Some(url) = fresh_database("migrate6") else { return };
        let (config, tls) = {
            let o = PgOptions::new(&url);
            (o.config().unwrap(), o.tls().unwrap())
        };
        let (mut client, conn) = config.connect(tls).await.unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(
                "CREATE TABLE tv_schema (id INTEGER PRIMARY KEY, version BIGINT NOT NULL);
                 INSERT INTO tv_schema (id, version) VALUES (1, 5);",
            )
            .await
            .unwrap();
        let tx = client.transaction().await.unwrap();
        for sql in &MIGRATIONS[..5] {
            tx.batch_execute(sql).await.unwrap();
        }
        tx.commit().await.unwrap();
        let a = super::super::conformance::record("t1", "4111110000001112", 1);
        let charge = super::super::conformance::charge("ch_old", &a, "order-1");
        client
            .execute(
                "INSERT INTO tv_tokens (token, tenant, key_version, record) VALUES ($1, $2, 1, $3)",
                &[&a.token.as_str(), &"t1", &encode(&a).unwrap()],
            )
            .await
            .unwrap();
        client
            .execute(
                "INSERT INTO tv_charges (id, tenant, record) VALUES ($1, $2, $3)",
                &[&"ch_old", &"t1", &super::super::codec::encode_charge(&charge).unwrap()],
            )
            .await
            .unwrap();
        let before = time::OffsetDateTime::now_utc().unix_timestamp();
        let store = PgStore::open(&PgOptions::new(&url)).unwrap();
        let t1 = TenantId::parse("t1").unwrap();
        let listed = store.tenant_records(&t1, None, 10, None).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].0, a);
        assert!(listed[0].1 >= before, "used at the migration, not at its creation");
        let of = ChargesOf::Token(a.token.to_string());
        assert_eq!(store.charges_of(&t1, &of, None, 10).unwrap(), vec![charge]);
    }

    /// The shared keystore: created once, replaced only over the generation it was
    /// read at (two replicas saving at once: one wins, the other is told), and
    /// keys changed through one store open through another.
    #[test]
    fn the_keystore_in_the_database_is_compare_and_set() {
        use crate::keys::keystore::{Keystore, KeystoreAt, KeystoreError};
        use crate::keys::provider::{KeyProvider, SoftwareRoot};
        let Some(url) = fresh_database("keystore") else { return };
        let shared = |s: PgStore| {
            let store: Arc<dyn Store> = Arc::new(s);
            KeystoreAt::Shared(Arc::new(crate::store::StoreKeystore(store)))
        };
        let a = shared(PgStore::open(&PgOptions::new(&url)).unwrap());
        let b = shared(PgStore::open(&PgOptions::new(&url)).unwrap());
        let root = || {
            Arc::new(SoftwareRoot::new(
                &crate::crypto::Key256::from_slice(&[7; 32]).unwrap(),
                "t",
            )) as Arc<dyn KeyProvider>
        };
        assert!(!a.exists().unwrap());
        assert!(matches!(Keystore::open(&a, root()), Err(KeystoreError::Missing(_))));
        let mut ka = Keystore::create(&a, root(), None, "officer-a").unwrap();
        assert!(
            Keystore::create(&b, root(), None, "officer-b").is_err(),
            "a second ceremony never overwrites the keystore"
        );
        let mut kb = Keystore::open(&b, root()).unwrap();
        assert_eq!(ka.rotate(&["officer-a"]).unwrap(), 2);
        // b read generation 1; its save would overwrite a's rotation: refused.
        assert!(matches!(kb.rotate(&["officer-b"]), Err(KeystoreError::Conflict)));
        assert_eq!(kb.stored_generation().unwrap(), 2);
        let kb = kb.reopen().unwrap();
        assert_eq!(kb.keyring().unwrap().active_version(), 2);
        // The row is authenticated: an edit in the database fails at open.
        let store = PgStore::open(&PgOptions::new(&url)).unwrap();
        store
            .run(|c| async move {
                c.execute(
                    "UPDATE tv_keystore SET body = \
                     convert_to(replace(convert_from(body, 'UTF8'), 'officer-a', 'officer-x'), 'UTF8')",
                    &[],
                )
                .await
                .map_err(db)
            })
            .unwrap();
        assert!(matches!(Keystore::open(&b, root()), Err(KeystoreError::Integrity(_))));
    }

    #[test]
    fn concurrent_inserts_of_one_card_through_two_stores_keep_one_token() {
        let Some(url) = fresh_database("dedupe") else { return };
        let (a, b) = (
            PgStore::open(&PgOptions::new(&url)).unwrap(),
            PgStore::open(&PgOptions::new(&url)).unwrap(),
        );
        let tenant = TenantId::parse("t1").unwrap();
        for i in 0..40u32 {
            let card = |n: u32| {
                // A token must fail the Luhn check: the first last digit that does.
                let token = (0..10)
                    .map(|d| format!("41111100{:04}111{d}", 2 * i + n))
                    .find(|t| Token::parse(t).is_some())
                    .unwrap();
                let mut r = crate::store::conformance::record("t1", &token, 0);
                r.fingerprint = [i as u8; 32];
                r
            };
            let barrier = std::sync::Barrier::new(2);
            let (ca, cb) = (card(0), card(1));
            let outcomes: Vec<InsertOutcome> = std::thread::scope(|s| {
                let x = s.spawn(|| {
                    barrier.wait();
                    a.insert(&ca, InsertMode::Dedupe, None).unwrap()
                });
                let y = s.spawn(|| {
                    barrier.wait();
                    b.insert(&cb, InsertMode::Dedupe, None).unwrap()
                });
                vec![x.join().unwrap(), y.join().unwrap()]
            });
            let winner = a.find_fingerprint(&tenant, &[i as u8; 32]).unwrap().unwrap();
            let inserted = outcomes.iter().filter(|o| **o == InsertOutcome::Inserted).count();
            assert_eq!(inserted, 1, "exactly one store inserts card {i}: {outcomes:?}");
            assert!(
                outcomes.contains(&InsertOutcome::FingerprintExists(winner.clone())),
                "the other is told the winner's token: {outcomes:?}"
            );
        }
        assert_eq!(a.count().unwrap(), 40, "one record per card, no orphan");
    }
}
