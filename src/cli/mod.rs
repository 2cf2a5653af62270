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

use crate::config::{Mode, Settings};
use crate::dev::{self, Role};
use crate::startup::Application;
use crate::telemetry;

/// The exit codes every subcommand shares (README, "Exit codes").
pub(crate) mod exit {
    /// Done; a check found nothing wrong.
    pub(crate) const OK: u8 = 0;
    /// The operation failed, or a check found a problem (a broken audit chain, an invalid
    /// backup, a damaged store, a failed copy).
    pub(crate) const FAILED: u8 = 1;
    /// Bad arguments or configuration, or a local file, directory or store that cannot be
    /// opened (nothing was attempted). clap's own usage errors exit 2 as well.
    pub(crate) const USAGE: u8 = 2;
    /// The vault refused the credential (401/403) or cannot be reached.
    pub(crate) const REFUSED: u8 = 3;
    /// The vault is sealed: unseal it first.
    pub(crate) const SEALED: u8 = 4;
    /// A dual-control request was recorded and waits for a second officer.
    pub(crate) const PENDING: u8 = 10;
}

const EXIT_CODES: &str = "Exit codes (every subcommand): 0 done or intact; 1 failed, or a check found a problem; \
2 bad arguments or configuration, or a local file or store cannot be opened; 3 the vault refused the credential or \
cannot be reached; 4 the vault is sealed; 10 a dual-control request waits for a second officer.";

#[derive(Parser)]
#[command(
    name = "tokenvault",
    version,
    about = "Card tokenization vault",
    after_help = EXIT_CODES,
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the vault. Without --config: zero-config dev mode (loopback HTTP, generated keys).
    Serve(Box<ServeArgs>),
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
        /// Machine-readable output: one JSON object on stdout.
        #[arg(long, global = true)]
        json: bool,
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
    #[command(flatten)]
    overrides: crate::config::Overrides,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Compare the store with its anchor (the durably written audit head).
    /// Exit 0: intact; 1: damaged (acknowledged writes are missing or history differs); 2: cannot be opened.
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
        #[arg(long, env = "TOKENVAULT_STORE", hide_env_values = true, value_name = "URL")]
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
        Command::Serve(args) => serve(*args),
        Command::Keys { conn, command } => keys::run_keys(conn, command),
        Command::Unseal(args) => keys::run_unseal(args),
        Command::Audit { conn, command } => keys::run_audit(conn, command),
        Command::Store { json, command } => store(command, json),
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
                eprintln!("error: {}", keys::chain(&e));
                ExitCode::from(exit::USAGE)
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
                eprintln!("error: {}", keys::chain(&e));
                ExitCode::from(exit::USAGE)
            }
        },
        Command::Dev {
            command: DevCommand::HashPassword,
        } => {
            let mut line = zeroize::Zeroizing::new(String::new());
            if std::io::stdin().read_line(&mut line).is_err() || line.trim().len() < 16 {
                eprintln!("error: give the password (at least 16 characters) on stdin");
                return ExitCode::from(exit::USAGE);
            }
            match dev::hash_password(line.trim().as_bytes()) {
                Ok(hash) => {
                    println!("{hash}");
                    ExitCode::SUCCESS
                }
                Err(_) => {
                    eprintln!("error: cannot hash the password");
                    ExitCode::from(exit::FAILED)
                }
            }
        }
    }
}

/// `tokenvault store copy`.
/// Prints a report: the JSON object with `--json`, else the human line.
fn say(json: bool, value: serde_json::Value, human: &str) {
    if json {
        println!("{value}");
    } else {
        println!("{human}");
    }
}

fn copy_store(
    from: &str,
    to: &str,
    data_dir: Option<&std::path::Path>,
    config: Option<&std::path::Path>,
    json: bool,
) -> ExitCode {
    use std::sync::Arc;

    use crate::keys::keystore::KeystoreAt;
    use crate::store::copy::{Progress, copy, copy_keystore};
    use crate::store::{PgStore, SledStore, Store, StoreKeystore, StoreLocation};
    let Some(src_dir) = from.strip_prefix("sled:") else {
        eprintln!("error: --from must be sled:DIR");
        return ExitCode::from(exit::USAGE);
    };
    let (mut store_settings, keystore) = match (config, data_dir) {
        (Some(file), _) => match Settings::production(file) {
            Ok(s) => (s.store, Some(s.keystore)),
            Err(e) => {
                eprintln!("error: {}", keys::chain(&e));
                return ExitCode::from(exit::USAGE);
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
            return ExitCode::from(exit::USAGE);
        }
        (None, None) => (Default::default(), None),
    };
    store_settings.url = Some(to.to_owned());
    let pg = match store_settings.location(std::path::Path::new(".")) {
        Ok(StoreLocation::Postgres(pg)) => pg,
        Ok(_) => {
            eprintln!("error: --to must be postgres://… or postgresql://…");
            return ExitCode::from(exit::USAGE);
        }
        Err(e) => {
            eprintln!("error: {}", keys::chain(&e));
            return ExitCode::from(exit::USAGE);
        }
    };
    // The source gets the page cache its config sets (the maintenance pod's memory
    // limit is the vault's); `location` above has already checked the size.
    let cache = store_settings.sled_cache_bytes().ok().flatten();
    let src = match SledStore::open_with(std::path::Path::new(src_dir), cache) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot open {src_dir} ({e}); is the vault still running?");
            return ExitCode::from(exit::USAGE);
        }
    };
    let dst = match PgStore::open(&pg) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("error: cannot open the target ({}): {e}", pg.describe());
            return ExitCode::from(exit::USAGE);
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
                    return ExitCode::from(exit::FAILED);
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
            let human = format!(
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
            let value = serde_json::json!({
                "verified": true,
                "records": r.records,
                "new_records": r.new_records,
                "opened": r.opened,
                "charges": r.charges,
                "idempotency": r.idempotency,
                "audit_records": r.audit_records,
                "target": pg.describe(),
            });
            say(json, value, &human);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", keys::chain(&e));
            ExitCode::from(exit::FAILED)
        }
    }
}

/// `tokenvault store migrate`.
fn migrate_store(url: &str, config: Option<&std::path::Path>, json: bool) -> ExitCode {
    use crate::store::{PgStore, StoreLocation};
    let mut store_settings = match config.map(Settings::production).transpose() {
        Ok(s) => s.map(|s| s.store).unwrap_or_default(),
        Err(e) => {
            eprintln!("error: {}", keys::chain(&e));
            return ExitCode::from(exit::USAGE);
        }
    };
    store_settings.url = Some(url.to_owned());
    let pg = match store_settings.location(std::path::Path::new(".")) {
        Ok(StoreLocation::Postgres(pg)) => pg,
        Ok(_) => {
            eprintln!("error: --store must be postgres://… or postgresql://… (sled needs no migration)");
            return ExitCode::from(exit::USAGE);
        }
        Err(e) => {
            eprintln!("error: {}", keys::chain(&e));
            return ExitCode::from(exit::USAGE);
        }
    };
    match PgStore::open(&pg) {
        Ok(_) => {
            let human = format!(
                "{}: schema at version {} (this build's)",
                pg.describe(),
                crate::store::SCHEMA_VERSION
            );
            let value = serde_json::json!({"database": pg.describe(), "schema_version": crate::store::SCHEMA_VERSION});
            say(json, value, &human);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e}", pg.describe());
            ExitCode::from(exit::USAGE)
        }
    }
}

fn store(command: StoreCommand, json: bool) -> ExitCode {
    use crate::store::{Salvage, SledStore, Store};
    use serde_json::json;
    let opened = |dir: &std::path::Path| {
        SledStore::open(&dir.join("sled")).map_err(|e| {
            eprintln!(
                "error: cannot open the store in {} ({e}); is the vault still running?",
                dir.display()
            );
            ExitCode::from(exit::USAGE)
        })
    };
    match command {
        StoreCommand::Copy {
            from,
            to,
            data_dir,
            config,
        } => copy_store(&from, &to, data_dir.as_deref(), config.as_deref(), json),
        StoreCommand::Migrate { store, config } => migrate_store(&store, config.as_deref(), json),
        StoreCommand::Check { data_dir } => match opened(&data_dir) {
            Err(code) => code,
            Ok(store) => match store.damage() {
                None => {
                    let human = "store intact: it holds everything its anchor records";
                    say(json, json!({"intact": true}), human);
                    ExitCode::SUCCESS
                }
                Some(damage) => {
                    let human = format!("store DAMAGED ({}): {damage}", damage.kind());
                    let value = json!({"intact": false, "damage": damage.kind(), "detail": damage.to_string()});
                    say(json, value, &human);
                    ExitCode::from(exit::FAILED)
                }
            },
        },
        StoreCommand::Salvage { data_dir } => match SledStore::salvage(&data_dir.join("sled")) {
            Ok(Salvage::NotNeeded) => {
                let human = "the store opens as it is: nothing to salvage (see `tokenvault store check`)";
                say(json, json!({"salvaged": false, "opens": true}), human);
                ExitCode::SUCCESS
            }
            Ok(Salvage::Recovered { kept, damage }) => {
                let mut human = format!(
                    "salvaged: sled replayed its log; the damaged store is kept in {}\n",
                    kept.display()
                );
                human.push_str(&match &damage {
                    Some(d) => format!(
                        "store DAMAGED ({}): {d}\nthe vault will start damaged: restore from backup, or accept the \
                         loss with `tokenvault store reanchor --accept-loss`",
                        d.kind()
                    ),
                    None => "the store holds everything its anchor records".to_owned(),
                });
                let value = json!({
                    "salvaged": true,
                    "opens": true,
                    "kept": kept,
                    "intact": damage.is_none(),
                    "damage": damage.as_ref().map(|d| d.kind()),
                    "detail": damage.as_ref().map(ToString::to_string),
                });
                say(json, value, &human);
                ExitCode::SUCCESS
            }
            Ok(Salvage::Unrecoverable { kept }) => {
                eprintln!(
                    "error: sled cannot recover this log even by replaying it; restore from backup (the damaged \
                     store is kept in {})",
                    kept.display()
                );
                ExitCode::from(exit::USAGE)
            }
            Err(e) => {
                eprintln!(
                    "error: cannot salvage the store in {} ({e}); is the vault still running?",
                    data_dir.display()
                );
                ExitCode::from(exit::USAGE)
            }
        },
        StoreCommand::Reanchor { accept_loss: false, .. } => {
            eprintln!("error: reanchor gives up the missing records; confirm with --accept-loss");
            ExitCode::from(exit::USAGE)
        }
        StoreCommand::Reanchor { data_dir, .. } => match SledStore::reanchor(&data_dir.join("sled")) {
            Ok(None) => {
                say(
                    json,
                    json!({"reanchored": false, "intact": true}),
                    "store intact: nothing to reanchor",
                );
                ExitCode::SUCCESS
            }
            Ok(Some((old, new))) => {
                let value = json!({"reanchored": true, "from": old, "to": new});
                let old = old.map_or_else(|| "an unreadable anchor".to_owned(), |o| format!("audit record {o}"));
                let human = format!(
                    "anchor moved back from {old} to audit record {new}; the next start records this in the audit trail"
                );
                say(json, value, &human);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "error: cannot reanchor the store in {} ({e}); is the vault still running?",
                    data_dir.display()
                );
                ExitCode::from(exit::USAGE)
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
                return ExitCode::from(exit::USAGE);
            }
            match dev::bootstrap(&data_dir, listen) {
                Ok((settings, created)) => {
                    print_dev_banner(&settings, &created);
                    Ok(settings)
                }
                Err(e) => {
                    eprintln!("error: {}", keys::chain(&e));
                    return ExitCode::from(exit::USAGE);
                }
            }
        }
    };
    let settings = match settings.and_then(|s| s.merge(args.overrides)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {}", keys::chain(&e));
            return ExitCode::from(exit::USAGE);
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
            eprintln!("error: {}", keys::chain(&e));
            return ExitCode::from(exit::USAGE);
        }
    }
    let result = actix_web::rt::System::new().block_on(async move {
        let app = Application::build(&settings).map_err(|e| keys::chain(&e))?;
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
        app.run_until_stopped().await.map_err(|e| keys::chain(&e))
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
