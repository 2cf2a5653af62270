//! The `tokenvault` command line.

mod backup;
mod demo;
mod import;
mod keys;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{ConfigError, Mode, PspSettings, Settings};
use crate::dev::{self, Role};
use crate::startup::Application;
use crate::telemetry;

#[derive(Parser)]
#[command(
    name = "tokenvault",
    version,
    about = "Card tokenization vault",
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the vault. Without --config: zero-config dev mode (loopback HTTP, generated keys).
    Serve(ServeArgs),
    /// Key management for security officers (online through the admin API, or --offline).
    Keys {
        #[command(flatten)]
        conn: keys::Conn,
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// The audit trail: verify the hash chain and MACs, export JSON lines for a SIEM.
    Audit {
        #[command(flatten)]
        conn: keys::Conn,
        #[command(subcommand)]
        command: keys::AuditCommand,
    },
    /// Submit one custodian share to a sealed vault (read from a file, a hidden prompt or stdin; never argv).
    Unseal(keys::UnsealArgs),
    /// The store of a stopped vault: check it against its anchor, salvage it, or accept a loss after damage.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Export a tenant's cards to a new PSP or vault, encrypted to its OpenPGP key, under dual
    /// control: one officer requests, a second approves, the file is fetched once.
    Export {
        #[command(flatten)]
        conn: keys::Conn,
        #[command(subcommand)]
        command: keys::ExportCommand,
    },
    /// Take an online backup of a running vault (sled): `backup --out FILE`; check one:
    /// `backup verify FILE`.
    Backup(backup::BackupArgs),
    /// Restore a backup into an empty data directory (then start the vault there with its
    /// key provider: a backup holds no root key material).
    Restore(backup::RestoreArgs),
    /// Import a legacy card file (CSV or JSON lines) into a running vault through the batch API:
    /// resumable, with a map of id → token for the CRM and a reject report (never card data).
    Import(import::ImportArgs),
    /// The first five minutes: a dev vault and the PSP simulator on free loopback ports, the
    /// whole story walked through (tokenize, read, a denied detokenize, charges, a refund, a key
    /// rotation and rewrap), then both stopped and their temporary directory removed.
    Demo,
    /// Dev-mode helpers (refuse to work on a production data directory).
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Production mode: TOML config file (TOKENVAULT_* env vars override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen address [dev default: 127.0.0.1:8080; dev mode refuses non-loopback].
    #[arg(long, env = "TOKENVAULT_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Data directory [dev default: ./data].
    #[arg(long, env = "TOKENVAULT_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Store: sled:PATH [default: <data-dir>/sled] or postgres://… (overrides [store] url).
    #[arg(long, env = "TOKENVAULT_STORE", value_name = "URL")]
    store: Option<String>,
    /// A memory-only Redis (redis://…) holding CVVs for every replica [default: this process's memory].
    #[arg(long, env = "TOKENVAULT_CVV_REDIS", value_name = "URL")]
    cvv_redis: Option<String>,
    /// Dev mode: the PSP base URL (e.g. the mock PSP, http://127.0.0.1:8081); its host is allow-listed.
    #[arg(long, env = "TOKENVAULT_PSP_URL", value_name = "URL")]
    psp_url: Option<String>,
    /// Dev mode: PSP read timeout [default: 5s]; a timed-out call is retried once with the same idempotency key.
    #[arg(long, env = "TOKENVAULT_PSP_TIMEOUT", value_name = "DURATION", requires = "psp_url")]
    psp_timeout: Option<String>,
    /// Per-client rate limits, e.g. tokenize=200,detokenize=50,charges=20,other=100
    /// [dev default: unlimited; production default: those].
    #[arg(long, env = "TOKENVAULT_RATE_LIMITS", value_name = "SPEC")]
    rate_limits: Option<String>,
    /// Detokenize anomaly guard, e.g. window=60s,factor=10,floor=600,cooldown=15m
    /// [dev default: off; production default: those].
    #[arg(long, env = "TOKENVAULT_ANOMALY_GUARD", value_name = "SPEC")]
    anomaly_guard: Option<String>,
    /// How long a CVV may wait in memory for its charge [default: 15m].
    #[arg(long, env = "TOKENVAULT_CVV_TTL", value_name = "DURATION")]
    cvv_ttl: Option<String>,
    /// KEK cryptoperiod, e.g. 90d: the active KEK rotates automatically when older.
    #[arg(long, env = "TOKENVAULT_CRYPTOPERIOD", value_name = "DURATION")]
    cryptoperiod: Option<String>,
    /// Serve /metrics, /healthz and /readyz on this separate internal address (not on the API listener).
    #[arg(long, env = "TOKENVAULT_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Tokenize enumeration guard: "off", or max distinct cards per BIN + last four per client
    /// and tenant in the window, e.g. max=5,window=1h,cooldown=15m [default: those].
    #[arg(long, env = "TOKENVAULT_ENUMERATION_GUARD", value_name = "SPEC")]
    enumeration_guard: Option<String>,
    /// Failed authentications one source may make per window before it is refused
    /// unauthenticated, e.g. max=1000,window=60s [default: those].
    #[arg(long, env = "TOKENVAULT_AUTH_FAILURES", value_name = "SPEC")]
    auth_failures: Option<String>,
    /// DEK wraps per KEK version before it rotates automatically (random-nonce budget) [default: 2^31].
    #[arg(long, env = "TOKENVAULT_KEK_WRAP_LIMIT", value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    kek_wrap_limit: Option<u64>,
    /// Deletion epoch, e.g. 7d, or "off": rotate, rewrap and destroy old KEKs so a deleted
    /// card is unrecoverable within two epochs [dev default: off; production default: 7d].
    #[arg(long, env = "TOKENVAULT_DELETION_EPOCH", value_name = "DURATION")]
    deletion_epoch: Option<String>,
    /// Retention for a tenant, e.g. acme=400d: its cards unused (not tokenized, charged or
    /// detokenized) that long are deleted [default: kept]. Repeat for more tenants.
    #[arg(long, value_name = "TENANT=DURATION")]
    retention: Vec<String>,
    /// Shortest lifetime a tokenize may give a token (ttl/expires_at) [default: 1s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    token_ttl_min: Option<std::time::Duration>,
    /// Longest lifetime a tokenize may give a token (ttl/expires_at) [default and most: 400d].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    token_ttl_max: Option<std::time::Duration>,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Compare the store with its anchor (the durably written audit head).
    /// Exit 0: intact; 3: damaged (acknowledged writes are missing or history differs); 2: cannot be opened.
    Check {
        /// Data directory of the stopped vault.
        #[arg(long, env = "TOKENVAULT_DATA_DIR", value_name = "DIR")]
        data_dir: PathBuf,
    },
    /// Salvage a store sled refuses to open (a damaged log after a clean stop): copy
    /// it aside, drop sled's snapshot so that sled replays its log up to the damage,
    /// and report what the anchor finds. Exit 0: it opens now (or already did); 2: it
    /// cannot be recovered, restore from backup.
    Salvage {
        /// Data directory of the stopped vault.
        #[arg(long, env = "TOKENVAULT_DATA_DIR", value_name = "DIR")]
        data_dir: PathBuf,
    },
    /// Copy a stopped sled vault's store into PostgreSQL (records, fingerprint index,
    /// charges, idempotency entries, audit trail, key metadata), then verify the copy.
    /// Resumable: run it again after an interruption. Exit 0: copied and verified;
    /// 1: failed (the message says where); 2: cannot open a side.
    Copy {
        /// The source, `sled:DIR` (the stopped vault's `<data-dir>/sled`).
        #[arg(long, value_name = "sled:DIR")]
        from: String,
        /// The target, `postgres://…` (its schema is created or migrated).
        #[arg(long, value_name = "URL")]
        to: String,
        /// The vault's data directory (dev mode): its keys open every record before it is copied.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Production config: the keystore that opens every record, and `[store]` password/CA files for the target.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Create or migrate a PostgreSQL store's schema now (vaults also do it at start,
    /// under the same row lock), e.g. with a more privileged database role than the
    /// replicas use. Exit 0: at this build's schema version; 2: refused (a newer
    /// schema, or the database cannot be reached).
    Migrate {
        /// The database, `postgres://…`.
        #[arg(long, env = "TOKENVAULT_STORE", value_name = "URL")]
        store: String,
        /// Production config: `[store]` password and CA files.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Accept the loss in a damaged store: move its anchor back to what the store
    /// holds now, so the vault issues new tokens again. Prefer restoring the data
    /// directory from backup; the next start writes a `store.reanchor` audit event.
    Reanchor {
        /// Data directory of the stopped vault.
        #[arg(long, env = "TOKENVAULT_DATA_DIR", value_name = "DIR")]
        data_dir: PathBuf,
        /// Confirms that the missing records are given up.
        #[arg(long)]
        accept_loss: bool,
    },
}

#[derive(Subcommand)]
enum DevCommand {
    /// Print a JWT for a dev client, signed by the data directory's dev issuer key.
    Token {
        /// Which dev client: edge (tokens:create), crm (tokens:read tokens:delete),
        /// psp (tokens:detokenize charges:*), officer and officer2 (keys:admin audit:read; two officers for
        /// dual control), importer (tokens:create tokens:dedupe), siem (audit:read, its tenant only).
        #[arg(long, value_enum)]
        role: Role,
        /// Tenant claim.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Lifetime, e.g. 15m, 1h, 8h.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Data directory of the dev vault.
        #[arg(long, env = "TOKENVAULT_DATA_DIR", default_value = "./data", value_name = "DIR")]
        data_dir: PathBuf,
    },
    /// Print the dev voice connector's HTTP Basic credential as USER:PASSWORD (dev data
    /// directories only): what a Twilio or SignalWire <Pay> connector would be configured with.
    VoiceCredentials {
        /// Data directory of the dev vault.
        #[arg(long, env = "TOKENVAULT_DATA_DIR", default_value = "./data", value_name = "DIR")]
        data_dir: PathBuf,
    },
    /// Hash a connector password (read from stdin) into the Argon2id PHC string a
    /// production registry's `basic_password_hash` takes.
    HashPassword,
}

/// Entry point of the binary.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Keys { conn, command } => keys::run_keys(conn, command),
        Command::Unseal(args) => keys::run_unseal(args),
        Command::Audit { conn, command } => keys::run_audit(conn, command),
        Command::Store { command } => store(command),
        Command::Import(args) => import::run(args),
        Command::Demo => demo::run(),
        Command::Export { conn, command } => keys::run_export(conn, command),
        Command::Backup(args) => backup::run_backup(args),
        Command::Restore(args) => backup::run_restore(args),
        Command::Dev {
            command:
                DevCommand::Token {
                    role,
                    tenant,
                    ttl,
                    data_dir,
                },
        } => match dev::mint_token(&data_dir, role, &tenant, ttl) {
            Ok(jwt) => {
                println!("{jwt}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Dev {
            command: DevCommand::VoiceCredentials { data_dir },
        } => match dev::voice_credentials(&data_dir) {
            Ok(credential) => {
                println!("{}", credential.as_str());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Dev {
            command: DevCommand::HashPassword,
        } => {
            let mut line = zeroize::Zeroizing::new(String::new());
            if std::io::stdin().read_line(&mut line).is_err() || line.trim().len() < 16 {
                eprintln!("error: give the password (at least 16 characters) on stdin");
                return ExitCode::from(2);
            }
            match dev::hash_password(line.trim().as_bytes()) {
                Ok(hash) => {
                    println!("{hash}");
                    ExitCode::SUCCESS
                }
                Err(_) => {
                    eprintln!("error: cannot hash the password");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// `tokenvault store copy`.
fn copy_store(from: &str, to: &str, data_dir: Option<&std::path::Path>, config: Option<&std::path::Path>) -> ExitCode {
    use std::sync::Arc;

    use crate::keys::keystore::KeystoreAt;
    use crate::store::copy::{Progress, copy, copy_keystore};
    use crate::store::{PgStore, SledStore, Store, StoreKeystore, StoreLocation};
    let Some(src_dir) = from.strip_prefix("sled:") else {
        eprintln!("error: --from must be sled:DIR");
        return ExitCode::from(2);
    };
    let (mut store_settings, keystore) = match (config, data_dir) {
        (Some(file), _) => match Settings::production(file) {
            Ok(s) => (s.store, Some(s.keystore)),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        (None, Some(dir)) if dev::is_dev_dir(dir) => {
            let (s, _) = dev::settings_for(dir, SocketAddr::from(([127, 0, 0, 1], 0)));
            (s.store, Some(s.keystore))
        }
        (None, Some(dir)) => {
            eprintln!(
                "error: {} is not a dev data directory: pass --config FILE",
                dir.display()
            );
            return ExitCode::from(2);
        }
        (None, None) => (Default::default(), None),
    };
    store_settings.url = Some(to.to_owned());
    let pg = match store_settings.location(std::path::Path::new(".")) {
        Ok(StoreLocation::Postgres(pg)) => pg,
        Ok(_) => {
            eprintln!("error: --to must be postgres://… or postgresql://…");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let src = match SledStore::open(std::path::Path::new(src_dir)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot open {src_dir} ({e}); is the vault still running?");
            return ExitCode::from(2);
        }
    };
    let dst = match PgStore::open(&pg) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("error: cannot open the target ({}): {e}", pg.describe());
            return ExitCode::from(2);
        }
    };
    match &keystore {
        Some(ks) => {
            let target = KeystoreAt::Shared(Arc::new(StoreKeystore(dst.clone() as Arc<dyn Store>)));
            match copy_keystore(&KeystoreAt::File(ks.path.clone()), &target) {
                Ok(true) => eprintln!("keystore {} placed in {target}", ks.path.display()),
                Ok(false) => eprintln!("keystore already in {target} (an earlier run)"),
                Err(e) => {
                    eprintln!("error: keystore: {e}");
                    return ExitCode::from(1);
                }
            }
        }
        None => eprintln!(
            "note: no keystore given (--data-dir or --config): the target gets none, and a vault over it needs one"
        ),
    }
    let keys = keystore.and_then(|ks| crate::startup::open_keys(&ks, KeystoreAt::File(ks.path.clone())).ok());
    let ring = keys.as_ref().and_then(|k| k.ring());
    if ring.is_none() {
        eprintln!("note: no unsealed keys given: records are copied byte for byte without opening them");
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("records");
    let result = copy(&src, &dst, ring.as_deref(), |p| match p {
        Progress::Records { done, total } => {
            bar.set_length(total);
            bar.set_position(done);
        }
        Progress::Rest(what) => bar.set_message(what),
    });
    bar.finish_and_clear();
    match result {
        Ok(r) => {
            println!(
                "copied and verified: {} records ({} new in this run, {} opened with the keys), {} charges, \
                 {} idempotency entries, {} audit records into {}",
                r.records,
                r.new_records,
                r.opened,
                r.charges,
                r.idempotency,
                r.audit_records,
                pg.describe()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `tokenvault store migrate`.
fn migrate_store(url: &str, config: Option<&std::path::Path>) -> ExitCode {
    use crate::store::{PgStore, StoreLocation};
    let mut store_settings = match config.map(Settings::production).transpose() {
        Ok(s) => s.map(|s| s.store).unwrap_or_default(),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    store_settings.url = Some(url.to_owned());
    let pg = match store_settings.location(std::path::Path::new(".")) {
        Ok(StoreLocation::Postgres(pg)) => pg,
        Ok(_) => {
            eprintln!("error: --store must be postgres://… or postgresql://… (sled needs no migration)");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match PgStore::open(&pg) {
        Ok(_) => {
            println!(
                "{}: schema at version {} (this build's)",
                pg.describe(),
                crate::store::SCHEMA_VERSION
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e}", pg.describe());
            ExitCode::from(2)
        }
    }
}

fn store(command: StoreCommand) -> ExitCode {
    use crate::store::{Salvage, SledStore, Store};
    let opened = |dir: &std::path::Path| {
        SledStore::open(&dir.join("sled")).map_err(|e| {
            eprintln!(
                "error: cannot open the store in {} ({e}); is the vault still running?",
                dir.display()
            );
            ExitCode::from(2)
        })
    };
    match command {
        StoreCommand::Copy {
            from,
            to,
            data_dir,
            config,
        } => copy_store(&from, &to, data_dir.as_deref(), config.as_deref()),
        StoreCommand::Migrate { store, config } => migrate_store(&store, config.as_deref()),
        StoreCommand::Check { data_dir } => match opened(&data_dir) {
            Err(code) => code,
            Ok(store) => match store.damage() {
                None => {
                    println!("store intact: it holds everything its anchor records");
                    ExitCode::SUCCESS
                }
                Some(damage) => {
                    println!("store DAMAGED ({}): {damage}", damage.kind());
                    ExitCode::from(3)
                }
            },
        },
        StoreCommand::Salvage { data_dir } => match SledStore::salvage(&data_dir.join("sled")) {
            Ok(Salvage::NotNeeded) => {
                println!("the store opens as it is: nothing to salvage (see `tokenvault store check`)");
                ExitCode::SUCCESS
            }
            Ok(Salvage::Recovered { kept, damage }) => {
                println!(
                    "salvaged: sled replayed its log; the damaged store is kept in {}",
                    kept.display()
                );
                match damage {
                    Some(d) => println!(
                        "store DAMAGED ({}): {d}\nthe vault will start damaged: restore from backup, or accept the \
                         loss with `tokenvault store reanchor --accept-loss`",
                        d.kind()
                    ),
                    None => println!("the store holds everything its anchor records"),
                }
                ExitCode::SUCCESS
            }
            Ok(Salvage::Unrecoverable { kept }) => {
                eprintln!(
                    "error: sled cannot recover this log even by replaying it; restore from backup (the damaged \
                     store is kept in {})",
                    kept.display()
                );
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!(
                    "error: cannot salvage the store in {} ({e}); is the vault still running?",
                    data_dir.display()
                );
                ExitCode::from(2)
            }
        },
        StoreCommand::Reanchor { accept_loss: false, .. } => {
            eprintln!("error: reanchor gives up the missing records; confirm with --accept-loss");
            ExitCode::from(2)
        }
        StoreCommand::Reanchor { data_dir, .. } => match SledStore::reanchor(&data_dir.join("sled")) {
            Ok(None) => {
                println!("store intact: nothing to reanchor");
                ExitCode::SUCCESS
            }
            Ok(Some((old, new))) => {
                let old = old.map_or_else(|| "an unreadable anchor".to_owned(), |o| format!("audit record {o}"));
                println!(
                    "anchor moved back from {old} to audit record {new}; the next start records this in the audit trail"
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "error: cannot reanchor the store in {} ({e}); is the vault still running?",
                    data_dir.display()
                );
                ExitCode::from(2)
            }
        },
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let settings = match args.config {
        Some(file) => Settings::production(&file).map(|mut s| {
            if let Some(listen) = args.listen {
                s.listen = listen;
            }
            if let Some(dir) = args.data_dir.clone() {
                s.data_dir = dir;
            }
            s
        }),
        None => {
            let listen = args.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
            let data_dir = args.data_dir.unwrap_or_else(|| PathBuf::from("./data"));
            if !listen.ip().is_loopback() {
                eprintln!(
                    "error: dev mode only listens on a loopback address (got {listen}); use --config for production"
                );
                return ExitCode::from(2);
            }
            match dev::bootstrap(&data_dir, listen) {
                Ok((settings, created)) => {
                    print_dev_banner(&settings, &created);
                    Ok(settings)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    let settings = settings.and_then(|mut s| {
        if let Some(url) = &args.cvv_redis {
            s.cvv_redis = Some(secrecy::SecretString::from(url.clone()));
        }
        if let Some(url) = &args.store {
            s.store.url = Some(url.clone());
            if let crate::store::StoreLocation::Postgres(pg) = s.store.location(&s.data_dir)?
                && s.mode == crate::config::Mode::Production
            {
                pg.production_check()
                    .map_err(|e| ConfigError::Invalid(format!("--store: {e}")))?;
            }
        }
        if let Some(p) = args.cryptoperiod.clone() {
            s.keystore.cryptoperiod = Some(p);
        }
        if let Some(spec) = &args.anomaly_guard {
            s.anomaly_guard = Some(
                crate::limits::AnomalyParams::parse(spec)
                    .map_err(|e| ConfigError::Invalid(format!("--anomaly-guard: {e}")))?,
            );
        }
        if let Some(spec) = &args.rate_limits {
            s.rate_limits = Some(
                crate::limits::RateLimits::parse(spec)
                    .map_err(|e| ConfigError::Invalid(format!("--rate-limits: {e}")))?,
            );
        }
        if let Some(spec) = &args.deletion_epoch {
            s.deletion_epoch = match spec.as_str() {
                "off" => None,
                d => Some(
                    humantime::parse_duration(d)
                        .ok()
                        .filter(|d| *d >= std::time::Duration::from_secs(1))
                        .ok_or_else(|| ConfigError::Invalid("--deletion-epoch must be a duration such as 7d".into()))?,
                ),
            };
        }
        if let Some(n) = args.kek_wrap_limit {
            s.kek_wrap_limit = n;
        }
        for spec in &args.retention {
            s.lifecycle.add_retention(spec)?;
        }
        if let Some(d) = args.token_ttl_min {
            s.lifecycle.min_ttl = d;
        }
        if let Some(d) = args.token_ttl_max {
            s.lifecycle.max_ttl = d;
        }
        s.lifecycle.validate()?;
        if let Some(addr) = args.metrics_listen {
            s.metrics_listen = Some(addr);
        }
        if let Some(spec) = &args.enumeration_guard {
            s.enumeration_guard = crate::limits::EnumerationParams::parse(spec)
                .map_err(|e| ConfigError::Invalid(format!("--enumeration-guard: {e}")))?;
        }
        if let Some(spec) = &args.auth_failures {
            s.auth_failures = crate::limits::FailureParams::parse(spec)
                .map_err(|e| ConfigError::Invalid(format!("--auth-failures: {e}")))?;
        }
        if let Some(ttl) = &args.cvv_ttl {
            s.cvv_ttl = humantime::parse_duration(ttl)
                .map_err(|_| ConfigError::Invalid("--cvv-ttl must be a duration such as 15m".into()))?;
        }
        if let Some(url) = &args.psp_url {
            if s.mode != Mode::Dev {
                return Err(ConfigError::Invalid(
                    "--psp-url is for dev mode; configure [psp] in the config file".into(),
                ));
            }
            let host = reqwest::Url::parse(url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .ok_or_else(|| ConfigError::Invalid("--psp-url must be a URL such as http://127.0.0.1:8081".into()))?;
            s.psp = Some(PspSettings {
                base_url: url.clone(),
                api_key_file: PathBuf::new(),
                merchant_account: "TokenvaultDev".into(),
                allowed_hosts: vec![host],
                connect_timeout_ms: 2_000,
                timeout_ms: match &args.psp_timeout {
                    None => 5_000,
                    Some(t) => humantime::parse_duration(t)
                        .map_err(|_| ConfigError::Invalid("--psp-timeout must be a duration such as 2s".into()))?
                        .as_millis() as u64,
                },
                dev_api_key: Some(crate::psp::DEV_API_KEY.into()),
            });
        }
        Ok(s)
    });
    let settings = match settings.and_then(|s| s.validate().map(|_| s)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(settings.log_format);
    match crate::hardening::apply(&settings) {
        Ok(done) => {
            for d in done {
                tracing::info!("{d}");
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    let result = actix_web::rt::System::new().block_on(async move {
        let app = Application::build(&settings).map_err(|e| e.to_string())?;
        let mode = if settings.mode == Mode::Dev {
            "dev"
        } else {
            "production"
        };
        tracing::info!(addr = %app.local_addr(), mode, "tokenvault listening");
        println!("tokenvault listening on {}", app.base_url());
        if let Some(ops) = app.ops_addr() {
            println!("tokenvault operations (metrics, health) on http://{ops}");
        }
        app.run_until_stopped().await.map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_dev_banner(settings: &Settings, created: &[PathBuf]) {
    let mark = |p: &PathBuf| {
        if created.contains(p) { " (generated now)" } else { "" }
    };
    let paths = dev::DevPaths::new(&settings.data_dir);
    let line = "=".repeat(78);
    eprintln!("{line}");
    eprintln!("  TOKENVAULT DEV MODE: NOT FOR PRODUCTION, NEVER FOR REAL CARD DATA");
    eprintln!("  Keys are generated into the data directory unprotected, and the dev");
    eprintln!("  clients may act for every tenant. Production: tokenvault serve --config FILE");
    eprintln!("{line}");
    eprintln!("  data dir         {}", settings.data_dir.display());
    eprintln!(
        "  root key         {}{}",
        paths.root_key.display(),
        mark(&paths.root_key)
    );
    eprintln!(
        "  keystore         {}{}",
        paths.keystore.display(),
        mark(&paths.keystore)
    );
    eprintln!(
        "  JWT issuer key   {}{}",
        paths.issuer_private.display(),
        mark(&paths.issuer_private)
    );
    eprintln!(
        "  JWT public key   {}{}",
        paths.issuer_public.display(),
        mark(&paths.issuer_public)
    );
    eprintln!(
        "  dev tokens       tokenvault dev token --role edge|crm|psp|officer --data-dir {}",
        settings.data_dir.display()
    );
    eprintln!("{line}");
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap's own consistency checks (unique flags, valid defaults) for every subcommand.
    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
