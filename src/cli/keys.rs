//! `tokenvault keys …` and `tokenvault unseal`: the security officers' CLI.
//!
//! Online (default) it drives a running vault through the admin API with an
//! officer JWT; `--offline --data-dir DIR` acts on a stopped vault's data
//! directory directly (sled lets one process own it).
//!
//! Exit codes: 0 done; 1 refused by the vault (e.g. retire while records remain)
//! or failed; 2 usage or configuration error; 3 cannot reach or authenticate to
//! the vault; 4 the vault is sealed; 10 destroy recorded, awaiting a second officer.

use super::exit;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::config::Settings;
use crate::crypto::Key256;
use crate::keys::keystore::{Keystore, KeystoreAt, Shamir};
use crate::keys::manager::KeyManager;
use crate::keys::provider::{KeyProvider, SoftwareRoot};
use crate::keys::shares;
use crate::service::Vault;

/// How a command that only calls a running vault's API reaches it.
#[derive(Args, Clone)]
pub(super) struct Remote {
    /// The vault's URL.
    #[arg(long, env = "TOKENVAULT_URL", default_value = "http://127.0.0.1:8080")]
    pub(super) url: String,
    /// File holding the caller's JWT (see the command's help for the scope it needs).
    #[arg(long, env = "TOKENVAULT_TOKEN_FILE", value_name = "FILE")]
    pub(super) token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the vault's TLS certificate, if not a public one.
    #[arg(long, env = "TOKENVAULT_CA_FILE", value_name = "FILE")]
    pub(super) ca_file: Option<PathBuf>,
}

/// The HTTP client the CLI calls the vault with (no proxy; the given CA trusted).
pub(super) fn http_client(ca_file: Option<&std::path::Path>) -> Result<reqwest::Client, Failure> {
    let mut builder = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(120));
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).map_err(|e| usage(format!("cannot read {}: {e}", ca.display())))?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| usage(format!("{}: {e}", ca.display())))?;
        builder = builder.add_root_certificate(cert);
    }
    builder.build().map_err(|e| Failure(exit::REFUSED, e.to_string()))
}

/// Reads a JWT from its file into zeroizing memory; `missing` says what to pass.
pub(super) fn read_jwt(path: Option<&std::path::Path>, missing: &str) -> Result<Zeroizing<String>, Failure> {
    let path = path.ok_or_else(|| usage(missing))?;
    Ok(Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?
            .trim()
            .to_owned(),
    ))
}

/// How to reach the vault.
#[derive(Args, Clone)]
pub(super) struct Conn {
    /// The vault's URL.
    #[arg(long, env = "TOKENVAULT_URL", default_value = "http://127.0.0.1:8080", global = true)]
    pub(super) url: String,
    /// File holding an officer JWT (e.g. from `tokenvault dev token --role officer`).
    #[arg(long, env = "TOKENVAULT_TOKEN_FILE", value_name = "FILE", global = true)]
    pub(super) token_file: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub(super) json: bool,
    /// Act on a stopped vault's data directory instead of the admin API.
    #[arg(long, global = true, requires = "data_dir")]
    pub(super) offline: bool,
    /// Data directory (with --offline).
    #[arg(long, env = "TOKENVAULT_DATA_DIR", value_name = "DIR", global = true)]
    pub(super) data_dir: Option<PathBuf>,
    /// Production config (with --offline, for the keystore location and provider).
    #[arg(long, value_name = "FILE", global = true)]
    pub(super) config: Option<PathBuf>,
    /// With --offline: the store, as for `serve --store` [default: the config's, or sled in the data directory].
    #[arg(
        long,
        env = "TOKENVAULT_STORE",
        hide_env_values = true,
        value_name = "URL",
        global = true
    )]
    pub(super) store: Option<String>,
    /// CA certificate (PEM) that signed the vault's TLS certificate, if not a public one.
    #[arg(long, env = "TOKENVAULT_CA_FILE", value_name = "FILE", global = true)]
    pub(super) ca_file: Option<PathBuf>,
    /// Custodian share file(s): for `unseal`, or with --offline on a sealed keystore. Repeatable.
    #[arg(long = "share-file", value_name = "FILE", global = true)]
    pub(super) share_files: Vec<PathBuf>,
}

#[derive(Subcommand)]
pub(super) enum KeysCommand {
    /// Every KEK version: state, age against the cryptoperiod, records wrapped under it.
    Status,
    /// Create a new KEK version and make it active (older versions become decrypt-only).
    Rotate,
    /// Rewrap every DEK under the active KEK (online, throttled, resumable).
    Rewrap {
        /// Records per batch.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Maximum records per second (0 = unthrottled).
        #[arg(long, default_value_t = 0)]
        rate: u64,
    },
    /// Retire a version once no record is wrapped under it; it then decrypts nothing.
    Retire {
        /// The version, e.g. v1.
        version: String,
    },
    /// Crypto-shred a retired version. Dual control: takes effect when a second officer runs it too.
    Destroy {
        /// The version, e.g. v1.
        version: String,
    },
    /// PKCS#11: generate a new HSM root key and move every KEK under it.
    RotateRoot {
        /// Label for the new HSM key.
        #[arg(long)]
        key_label: String,
    },
    /// Key ceremony: create a keystore whose root key is split among custodians (or held in an HSM).
    Init(InitArgs),
}

#[derive(Args)]
pub(super) struct InitArgs {
    /// Number of custodian shares (sealed provider).
    #[arg(long, default_value_t = 5)]
    shares: u8,
    /// Shares needed to unseal.
    #[arg(long, default_value_t = 3)]
    threshold: u8,
    /// Keystore to create (default: from --config).
    #[arg(long, value_name = "PATH")]
    keystore: Option<PathBuf>,
    /// Write each share to DIR/share-<i>.txt (mode 0600) instead of printing them once.
    #[arg(long, value_name = "DIR")]
    share_dir: Option<PathBuf>,
    /// Root of trust: sealed (custodian shares) or pkcs11 (needs --config with [keystore.pkcs11]).
    #[arg(long, default_value = "sealed")]
    provider: String,
    /// HSM key label (pkcs11).
    #[arg(long, default_value = "tokenvault-root-1")]
    key_label: String,
    /// Name recorded as the officer running the ceremony.
    #[arg(long, env = "USER", default_value = "officer")]
    officer: String,
}

#[derive(Subcommand)]
pub(super) enum AuditCommand {
    /// Check the whole hash chain and every MAC; names the first broken link (exit 1).
    Verify {
        /// Verify an export (JSON lines) instead of the vault's own trail. MACs are
        /// checked when the keys are at hand (--offline --data-dir DIR), else only the chain.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Write the trail as JSON lines (for a SIEM).
    Export {
        /// Only records at or after this RFC 3339 time.
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Write to FILE instead of stdout.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

/// `tokenvault export`: a tenant's cards to a new PSP or vault, encrypted to its
/// OpenPGP key, under dual control (through the admin API).
#[derive(Subcommand)]
pub(super) enum ExportCommand {
    /// Officer 1: request the export of a tenant's cards to a recipient's public key.
    Request {
        #[arg(long)]
        tenant: String,
        /// The recipient's ASCII-armored OpenPGP public key.
        #[arg(long, value_name = "FILE")]
        recipient_key: PathBuf,
    },
    /// Officer 2 (not the requester): approve an export.
    Approve { id: String },
    /// The open export requests.
    List,
    /// Fetch an approved export's encrypted file, once (refuses to overwrite FILE).
    Fetch {
        id: String,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

/// Entry point for `tokenvault export`.
pub(super) fn run_export(conn: Conn, command: ExportCommand) -> ExitCode {
    finish(export(conn, command))
}

fn export(conn: Conn, command: ExportCommand) -> Result<u8, Failure> {
    if conn.offline {
        return Err(usage(
            "export works through the admin API of a running vault (two officers)",
        ));
    }
    let rt = runtime()?;
    rt.block_on(async move {
        let backend = Backend::open(&conn)?;
        let show = |v: &Value| -> Result<u8, Failure> {
            if conn.json {
                println!("{v}");
            } else {
                println!(
                    "export {}: tenant {}, recipient key {}, requested by {}{}; {}",
                    v["id"].as_str().unwrap_or(""),
                    v["tenant"].as_str().unwrap_or(""),
                    v["fingerprint"].as_str().unwrap_or(""),
                    v["requested_by"].as_str().unwrap_or(""),
                    v["approved_by"]
                        .as_str()
                        .map(|a| format!(", approved by {a}"))
                        .unwrap_or_default(),
                    v["status"].as_str().unwrap_or("")
                );
            }
            Ok(exit::OK)
        };
        match command {
            ExportCommand::Request { tenant, recipient_key } => {
                let key = std::fs::read_to_string(&recipient_key)
                    .map_err(|e| usage(format!("cannot read {}: {e}", recipient_key.display())))?;
                let (_, v) = backend
                    .call(
                        "POST",
                        "/v1/admin/exports",
                        Some(serde_json::json!({"tenant": tenant, "recipient_key": key})),
                    )
                    .await?;
                show(&v)
            }
            ExportCommand::Approve { id } => {
                let (_, v) = backend
                    .call("POST", &format!("/v1/admin/exports/{id}/approve"), None)
                    .await?;
                show(&v)
            }
            ExportCommand::List => {
                let (_, v) = backend.call("GET", "/v1/admin/exports", None).await?;
                if conn.json {
                    println!("{v}");
                    return Ok(exit::OK);
                }
                for item in v["items"].as_array().into_iter().flatten() {
                    show(item)?;
                }
                Ok(exit::OK)
            }
            ExportCommand::Fetch { id, out } => {
                let Backend::Online { client, url, token } = &backend else {
                    return Err(usage("online only"));
                };
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&out)
                    .map_err(|e| usage(format!("cannot create {}: {e}", out.display())))?;
                let res = client
                    .get(format!("{url}/v1/admin/exports/{id}/file"))
                    .bearer_auth(token.as_str())
                    .send()
                    .await
                    .map_err(|e| Failure(exit::REFUSED, format!("cannot reach the vault at {url}: {}", chain(&e))))?;
                if !res.status().is_success() {
                    let _ = std::fs::remove_file(&out);
                    let status = res.status().as_u16();
                    let v: Value = res.json().await.unwrap_or(Value::Null);
                    return Err(Failure(if status == 401 || status == 403 { exit::REFUSED } else { exit::FAILED }, problem_text(&v)));
                }
                let cards = res
                    .headers()
                    .get("x-export-cards")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?")
                    .to_owned();
                let bytes = res
                    .bytes()
                    .await
                    .map_err(|e| Failure(exit::REFUSED, format!("the download failed: {e}")))?;
                use std::io::Write;
                file.write_all(&bytes)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| Failure(exit::FAILED, format!("cannot write {}: {e}", out.display())))?;
                println!(
                    "{cards} cards written to {} (OpenPGP-encrypted to the recipient; the export cannot be fetched again)",
                    out.display()
                );
                Ok(exit::OK)
            }
        }
    })
}

/// Entry point for `tokenvault audit`.
pub(super) fn run_audit(conn: Conn, command: AuditCommand) -> ExitCode {
    finish(audit(conn, command))
}

fn audit(conn: Conn, command: AuditCommand) -> Result<u8, Failure> {
    let rt = runtime()?;
    rt.block_on(async move {
        match command {
            AuditCommand::Verify { file: Some(file) } => {
                let text = std::fs::read_to_string(&file).map_err(|e| usage(format!("{}: {e}", file.display())))?;
                let mut records = Vec::new();
                for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                    let rec: crate::audit::AuditRecord = serde_json::from_str(line)
                        .map_err(|_| Failure(exit::FAILED, format!("line {}: not an audit record", i + 1)))?;
                    records.push(rec);
                }
                let key = if conn.offline {
                    let Backend::Offline { vault } = Backend::open(&conn)? else {
                        return Err(usage("offline"));
                    };
                    vault.keys().ring().map(|r| r.audit_key())
                } else {
                    None
                };
                let macs = key.is_some();
                let report = crate::audit::verify(&records, key);
                print_verify(&conn, &serde_json::to_value(&report)?, macs)
            }
            AuditCommand::Verify { file: None } => {
                let backend = Backend::open(&conn)?;
                let report = match &backend {
                    Backend::Online { .. } => backend.call("GET", "/v1/admin/audit/verify", None).await?.1,
                    Backend::Offline { vault } => {
                        let (store, keys) = vault.parts();
                        let log = crate::audit::AuditLog::open(store, keys).map_err(Failure::from)?;
                        serde_json::to_value(log.verify_stored().map_err(Failure::from)?)?
                    }
                };
                print_verify(&conn, &report, true)
            }
            AuditCommand::Export { since, output } => {
                let backend = Backend::open(&conn)?;
                let body = match &backend {
                    Backend::Online { client, url, token } => {
                        let mut req = client
                            .get(format!("{url}/v1/admin/audit/export"))
                            .bearer_auth(token.as_str());
                        if let Some(s) = &since {
                            req = req.query(&[("since", s)]);
                        }
                        let res = req.send().await.map_err(|e| Failure(exit::REFUSED, e.to_string()))?;
                        if !res.status().is_success() {
                            let v: Value = res.json().await.unwrap_or(Value::Null);
                            return Err(Failure(exit::FAILED, problem_text(&v)));
                        }
                        res.text().await.map_err(Failure::from)?
                    }
                    Backend::Offline { vault } => {
                        let (store, keys) = vault.parts();
                        let log = crate::audit::AuditLog::open(store, keys).map_err(Failure::from)?;
                        let mut out = String::new();
                        for rec in log.scan(1, usize::MAX).map_err(Failure::from)? {
                            if since.as_ref().is_none_or(|s| rec.at.as_str() >= s.as_str()) {
                                out.push_str(&serde_json::to_string(&rec)?);
                                out.push('\n');
                            }
                        }
                        out
                    }
                };
                match output {
                    Some(f) => {
                        std::fs::write(&f, body).map_err(|e| Failure(exit::FAILED, format!("{}: {e}", f.display())))?
                    }
                    None => print!("{body}"),
                }
                Ok(exit::OK)
            }
        }
    })
}

fn print_verify(conn: &Conn, report: &Value, macs: bool) -> Result<u8, Failure> {
    let broken = report["first_broken"]
        .as_array()
        .map(|a| (a[0].as_u64().unwrap_or(0), a[1].as_str().unwrap_or("?").to_owned()));
    let human = match &broken {
        None => format!(
            "audit trail intact: {} records, {} MACs verified{}{}",
            report["records"],
            report["macs_checked"],
            if macs { "" } else { " (chain only: no keys for MACs)" },
            match report["unmaced_tail"].as_u64() {
                Some(n) if n > 0 => format!("; {n} newest records written while sealed await a MAC"),
                _ => String::new(),
            }
        ),
        Some((seq, why)) => format!("audit trail BROKEN at record {seq}: {why}"),
    };
    output(conn, report.clone(), &human);
    Ok(if broken.is_some() { exit::FAILED } else { exit::OK })
}

/// `tokenvault unseal`: shares come from --share-file, else a hidden prompt on a TTY, else stdin.
#[derive(Args)]
pub(super) struct UnsealArgs {
    #[command(flatten)]
    conn: Conn,
}

pub(super) struct Failure(pub(super) u8, pub(super) String);

impl<E: std::error::Error> From<E> for Failure {
    /// An error and its causes, on one line.
    fn from(e: E) -> Self {
        Failure(exit::FAILED, chain(&e))
    }
}

pub(super) fn usage(msg: impl Into<String>) -> Failure {
    Failure(exit::USAGE, msg.into())
}

/// Entry point for `tokenvault keys`.
pub(super) fn run_keys(conn: Conn, command: KeysCommand) -> ExitCode {
    finish(keys(conn, command))
}

/// Entry point for `tokenvault unseal`.
pub(super) fn run_unseal(args: UnsealArgs) -> ExitCode {
    finish(unseal(args))
}

pub(super) fn finish(result: Result<u8, Failure>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Failure(code, msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(code)
        }
    }
}

pub(super) fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure(exit::FAILED, e.to_string()))
}

/// The two ways to reach the keys: the admin API, or the data directory itself.
pub(super) enum Backend {
    Online {
        client: reqwest::Client,
        url: String,
        token: Zeroizing<String>,
    },
    Offline {
        vault: Vault,
    },
}

impl Backend {
    pub(super) fn open(conn: &Conn) -> Result<Backend, Failure> {
        if conn.offline {
            return open_offline(conn);
        }
        let token = read_jwt(
            conn.token_file.as_deref(),
            "an officer JWT is needed: --token-file FILE or TOKENVAULT_TOKEN_FILE (or use --offline)",
        )?;
        let client = http_client(conn.ca_file.as_deref())?;
        Ok(Backend::Online {
            client,
            url: conn.url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    /// Calls the admin API; returns the JSON body and the status.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value), Failure> {
        let Backend::Online { client, url, token } = self else {
            return Err(Failure(exit::FAILED, "not online".into()));
        };
        let mut req = match method {
            "GET" => client.get(format!("{url}{path}")),
            _ => client.post(format!("{url}{path}")),
        }
        .bearer_auth(token.as_str());
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req
            .send()
            .await
            .map_err(|e| Failure(exit::REFUSED, format!("cannot reach the vault at {url}: {}", chain(&e))))?;
        let status = res.status().as_u16();
        let value: Value = res.json().await.unwrap_or(Value::Null);
        match status {
            200..=299 => Ok((status, value)),
            401 | 403 => Err(Failure(exit::REFUSED, problem_text(&value))),
            503 if value["type"].as_str().is_some_and(|t| t.ends_with(":sealed")) => {
                Err(Failure(exit::SEALED, problem_text(&value)))
            }
            _ => Err(Failure(exit::FAILED, problem_text(&value))),
        }
    }
}

/// An error with its causes ("…: …: …"), for operators.
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        // A message that already quotes its cause (`"…: {0}"`) is not repeated.
        let text = c.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = c.source();
    }
    out
}

pub(super) fn problem_text(v: &Value) -> String {
    match (v["title"].as_str(), v["detail"].as_str()) {
        (Some(t), Some(d)) => format!("{t}: {d}"),
        (Some(t), None) => t.to_owned(),
        _ => "unexpected response from the vault".into(),
    }
}

fn service_failure(e: crate::service::VaultError) -> Failure {
    match e {
        crate::service::VaultError::Sealed => Failure(exit::SEALED, "the vault is sealed".into()),
        other => Failure(exit::FAILED, other.to_string()),
    }
}

fn open_offline(conn: &Conn) -> Result<Backend, Failure> {
    let data_dir = conn
        .data_dir
        .clone()
        .ok_or_else(|| usage("--offline needs --data-dir"))?;
    let (keystore_settings, mut store_settings) = if let Some(cfg) = &conn.config {
        let s = Settings::production(cfg).map_err(|e| usage(e.to_string()))?;
        (s.keystore, s.store)
    } else if crate::dev::is_dev_dir(&data_dir) {
        let (settings, _) = crate::dev::settings_for(&data_dir, "127.0.0.1:0".parse().map_err(Failure::from)?);
        (settings.keystore, settings.store)
    } else {
        return Err(usage(
            "not a dev data directory: pass --config FILE for a production keystore",
        ));
    };
    if let Some(url) = &conn.store {
        store_settings.url = Some(url.clone());
    }
    let location = store_settings.location(&data_dir).map_err(|e| usage(e.to_string()))?;
    let store = location.open().map_err(|e| {
        Failure(
            exit::FAILED,
            format!(
                "cannot open the store ({}: {e}); is the vault still running? stop it or drop --offline",
                location.describe()
            ),
        )
    })?;
    let keystore_at = crate::startup::keystore_at(&keystore_settings, &store);
    let keys = if keystore_settings.dev_root_key_file.is_none()
        && keystore_settings.provider == crate::config::ProviderKind::Sealed
    {
        let manager = KeyManager::sealed(keystore_at).map_err(Failure::from)?;
        for file in &conn.share_files {
            let text =
                Zeroizing::new(std::fs::read_to_string(file).map_err(|e| usage(format!("{}: {e}", file.display())))?);
            let progress = manager.submit_share(&text).map_err(Failure::from)?;
            if !progress.sealed {
                break;
            }
        }
        if manager.is_sealed() {
            return Err(Failure(
                exit::SEALED,
                "sealed keystore: pass enough --share-file FILE options to unseal it".into(),
            ));
        }
        manager
    } else {
        crate::startup::open_keys(&keystore_settings, keystore_at).map_err(Failure::from)?
    };
    keys.set_generation_guard(crate::startup::generation_guard(&keystore_settings, store.clone()))
        .map_err(Failure::from)?;
    if let Some(damage) = crate::store::Store::damage(&*store) {
        eprintln!("warning: the store is DAMAGED ({}): {damage}", damage.kind());
    }
    let options = crate::service::VaultOptions {
        cryptoperiod: keystore_settings.cryptoperiod,
        ..Default::default()
    };
    let keys = Arc::new(keys);
    let audit = crate::audit::AuditLog::open(store.clone(), keys.clone())
        .map_err(|e| Failure(exit::FAILED, format!("cannot open the audit trail: {e}")))?;
    let vault = Vault::new(store, keys, audit, options).map_err(Failure::from)?;
    Ok(Backend::Offline { vault })
}

fn officer_offline() -> String {
    format!("offline:{}", std::env::var("USER").unwrap_or_else(|_| "unknown".into()))
}

fn parse_version(s: &str) -> Result<u32, Failure> {
    crate::keys::parse_version(s).ok_or_else(|| usage("versions look like v3"))
}

fn keys(conn: Conn, command: KeysCommand) -> Result<u8, Failure> {
    if let KeysCommand::Init(args) = command {
        return init(&conn, args);
    }
    let rt = runtime()?;
    let backend = Backend::open(&conn)?;
    rt.block_on(async move {
        match command {
            KeysCommand::Status => {
                let status = match &backend {
                    Backend::Online { .. } => backend.call("GET", "/v1/admin/keys", None).await?.1,
                    Backend::Offline { vault } => serde_json::to_value(vault.key_status().await.map_err(service_failure)?)?,
                };
                if conn.json {
                    println!("{}", serde_json::to_string_pretty(&status)?);
                } else {
                    print_status(&status);
                }
                Ok(exit::OK)
            }
            KeysCommand::Rotate => {
                let active = match &backend {
                    Backend::Online { .. } => backend.call("POST", "/v1/admin/keys/rotate", None).await?.1["active"].as_u64().unwrap_or(0),
                    Backend::Offline { vault } => u64::from(vault.rotate_key(&officer_offline()).await.map_err(service_failure)?),
                };
                output(&conn, json!({"active": active}), &format!("rotated: v{active} is now active; older versions are decrypt-only (run `tokenvault keys rewrap`)"));
                Ok(exit::OK)
            }
            KeysCommand::Rewrap { batch, rate } => rewrap(&conn, &backend, batch, rate).await,
            KeysCommand::Retire { version } => {
                let v = parse_version(&version)?;
                match &backend {
                    Backend::Online { .. } => {
                        backend.call("POST", &format!("/v1/admin/keys/v{v}/retire"), None).await?;
                    }
                    Backend::Offline { vault } => vault.retire_key(v, &officer_offline()).await.map_err(service_failure)?,
                }
                output(&conn, json!({"version": v, "state": "retired"}), &format!("v{v} retired: it decrypts nothing from now on"));
                Ok(exit::OK)
            }
            KeysCommand::Destroy { version } => {
                let v = parse_version(&version)?;
                let Backend::Online { .. } = &backend else {
                    return Err(Failure(exit::FAILED, "destroy needs dual control: run it online, once by each of two officers".into()));
                };
                let (status, body) = backend.call("POST", &format!("/v1/admin/keys/v{v}/destroy"), None).await?;
                if status == 202 {
                    let who = body["requested_by"].as_str().unwrap_or("?");
                    output(&conn, body.clone(), &format!("destruction of v{v} requested by {who}; a second, different officer must run `tokenvault keys destroy v{v}` to approve"));
                    Ok(exit::PENDING)
                } else {
                    let (a, b) = (body["requested_by"].as_str().unwrap_or("?"), body["approved_by"].as_str().unwrap_or("?"));
                    output(&conn, body.clone(), &format!("v{v} destroyed (crypto-shredded): requested by {a}, approved by {b}"));
                    Ok(exit::OK)
                }
            }
            KeysCommand::RotateRoot { key_label } => {
                let Backend::Online { .. } = &backend else {
                    return Err(Failure(exit::FAILED, "rotate-root runs online against the vault".into()));
                };
                let (_, body) = backend.call("POST", "/v1/admin/keys/rotate-root", Some(json!({"key_label": key_label}))).await?;
                output(&conn, body.clone(), &format!("root rotated: every KEK is now wrapped by {}", body["root_id"].as_str().unwrap_or("?")));
                Ok(exit::OK)
            }
            KeysCommand::Init(_) => Ok(exit::USAGE),
        }
    })
}

fn output(conn: &Conn, value: Value, human: &str) {
    if conn.json {
        println!("{value}");
    } else {
        println!("{human}");
    }
}

async fn rewrap(conn: &Conn, backend: &Backend, batch: usize, rate: u64) -> Result<u8, Failure> {
    if batch == 0 || batch > 10_000 {
        return Err(usage("--batch must be between 1 and 10000"));
    }
    let start = Instant::now();
    let mut total: u64 = 0;
    let mut failed: u64 = 0;
    let bar = indicatif::ProgressBar::new(0);
    if conn.json || !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("rewrap {bar:40} {pos}/{len} records ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        let step = batch;
        let (rewrapped, remaining, step_failed) = match backend {
            Backend::Online { .. } => {
                let (_, v) = backend
                    .call("POST", "/v1/admin/keys/rewrap", Some(json!({"batch": step})))
                    .await?;
                (
                    v["rewrapped"].as_u64().unwrap_or(0),
                    v["remaining"].as_u64().unwrap_or(0),
                    v["failed"].as_u64().unwrap_or(0),
                )
            }
            Backend::Offline { vault } => {
                let p = vault.rewrap_batch(step).await.map_err(service_failure)?;
                (p.rewrapped, p.remaining, p.failed)
            }
        };
        total += rewrapped;
        failed = failed.max(step_failed);
        bar.set_length(total + remaining);
        bar.set_position(total);
        if remaining == 0 || rewrapped == 0 {
            break;
        }
        if rate > 0 {
            let due = Duration::from_secs_f64(total as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let per_sec = if secs > 0.0 { total as f64 / secs } else { 0.0 };
    output(
        conn,
        json!({"rewrapped": total, "failed": failed, "seconds": secs, "records_per_sec": per_sec}),
        &format!("rewrapped {total} records in {secs:.1} s ({per_sec:.0}/s); {failed} failed to open"),
    );
    Ok(if failed > 0 { 1 } else { 0 })
}

fn print_status(s: &Value) {
    let sealed = s["sealed"].as_bool().unwrap_or(false);
    println!(
        "root of trust: {} ({})",
        s["provider"].as_str().unwrap_or("?"),
        s["root_id"].as_str().unwrap_or("?")
    );
    if let Some(sh) = s["shamir"].as_object() {
        println!("custodian shares: {} of {}", sh["threshold"], sh["shares"]);
    }
    if sealed {
        println!(
            "vault: SEALED ({} of {} shares received) — custodians run `tokenvault unseal`",
            s["unseal"]["shares_received"], s["unseal"]["threshold"]
        );
        return;
    }
    println!("vault: unsealed; active KEK: v{}", s["active"]);
    let period = s["cryptoperiod_secs"].as_u64();
    match period {
        Some(p) => println!(
            "cryptoperiod: {} (automatic rotation)",
            humantime::format_duration(Duration::from_secs(p))
        ),
        None => println!("cryptoperiod: not configured"),
    }
    println!(
        "{:<8} {:<13} {:<21} {:>12} {:>10}",
        "VERSION", "STATE", "CREATED (UTC)", "AGE", "RECORDS"
    );
    for v in s["versions"].as_array().into_iter().flatten() {
        let age_secs = v["age_secs"].as_u64().unwrap_or(0);
        let age = if age_secs < 60 {
            format!("{age_secs}s")
        } else {
            humantime::format_duration(Duration::from_secs(age_secs / 60 * 60)).to_string()
        };
        let created: String = v["created_at"].as_str().unwrap_or("?").chars().take(19).collect();
        let overdue = if v["overdue"].as_bool().unwrap_or(false) {
            "  OVERDUE"
        } else {
            ""
        };
        println!(
            "{:<8} {:<13} {:<21} {:>12} {:>10}{overdue}",
            format!("v{}", v["version"].as_u64().unwrap_or(0)),
            v["state"].as_str().unwrap_or("?"),
            created.replace('T', " "),
            age,
            v["records"].as_u64().unwrap_or(0)
        );
    }
    for p in s["pending_destroy"].as_array().into_iter().flatten() {
        println!(
            "pending: destroy v{} requested by {} (awaiting a second officer)",
            p["version"],
            p["requested_by"].as_str().unwrap_or("?")
        );
    }
}

/// The key ceremony.
fn init(conn: &Conn, args: InitArgs) -> Result<u8, Failure> {
    let settings = conn
        .config
        .as_ref()
        .map(|c| Settings::production(c))
        .transpose()
        .map_err(|e| usage(e.to_string()))?;
    // A PostgreSQL store keeps the keystore (every replica shares it): the
    // ceremony writes it into the database; beside sled it is a file.
    let at = match (&args.keystore, &settings) {
        (Some(path), _) => KeystoreAt::File(path.clone()),
        (None, Some(s)) => {
            let mut store_settings = s.store.clone();
            if let Some(url) = &conn.store {
                store_settings.url = Some(url.clone());
            }
            let data_dir = conn.data_dir.clone().unwrap_or_else(|| s.data_dir.clone());
            let location = store_settings.location(&data_dir).map_err(|e| usage(e.to_string()))?;
            match location {
                crate::store::StoreLocation::Postgres(_) => {
                    let store = location.open().map_err(|e| {
                        Failure(
                            exit::FAILED,
                            format!("cannot open the store ({}): {e}", location.describe()),
                        )
                    })?;
                    crate::startup::keystore_at(&s.keystore, &store)
                }
                crate::store::StoreLocation::Sled(..) => KeystoreAt::File(s.keystore.path.clone()),
            }
        }
        (None, None) => return Err(usage("--keystore PATH or --config FILE is needed")),
    };
    if at.exists().map_err(Failure::from)? {
        return Err(usage(format!(
            "{at} already holds a keystore; a key ceremony never overwrites a keystore"
        )));
    }
    match args.provider.as_str() {
        "sealed" => {
            let root = Key256::random();
            let shares = shares::split(&root, args.threshold, args.shares).map_err(|e| usage(e.to_string()))?;
            let id = format!("shamir-{}", uuid::Uuid::new_v4());
            let provider: Arc<dyn KeyProvider> = Arc::new(SoftwareRoot::new(&root, id));
            drop(root);
            let shamir = Shamir {
                threshold: args.threshold,
                shares: args.shares,
            };
            Keystore::create(&at, provider, Some(shamir), &args.officer).map_err(Failure::from)?;
            match &args.share_dir {
                Some(dir) => {
                    for (i, share) in shares.iter().enumerate() {
                        let file = dir.join(format!("share-{}.txt", i + 1));
                        crate::keys::keystore::write_private(&file, format!("{}\n", &*share.encode()).as_bytes())
                            .map_err(Failure::from)?;
                        println!("custodian {}: {}", i + 1, file.display());
                    }
                    println!("hand each file to its custodian, then delete it from this machine");
                }
                None => {
                    eprintln!(
                        "Each share is shown ONCE. Give each to a different custodian; never store two together."
                    );
                    for (i, share) in shares.iter().enumerate() {
                        println!("custodian {}: {}", i + 1, &*share.encode());
                    }
                }
            }
            println!(
                "keystore created in {at}; {} of {} shares unseal it",
                args.threshold, args.shares
            );
            Ok(exit::OK)
        }
        "pkcs11" => {
            let hsm = settings
                .as_ref()
                .and_then(|s| s.keystore.pkcs11.clone())
                .ok_or_else(|| usage("pkcs11 init needs --config FILE with a [keystore.pkcs11] section"))?;
            let provider = crate::keys::open_pkcs11(&hsm, &args.key_label, true).map_err(Failure::from)?;
            Keystore::create(&at, provider, None, &args.officer).map_err(Failure::from)?;
            println!(
                "keystore created in {at}; root key {} is a non-extractable key in the HSM",
                args.key_label
            );
            Ok(exit::OK)
        }
        other => Err(usage(format!("unknown provider {other}: sealed or pkcs11"))),
    }
}

fn read_share(file: Option<&Path>) -> Result<Zeroizing<String>, Failure> {
    if let Some(f) = file {
        return Ok(Zeroizing::new(
            std::fs::read_to_string(f).map_err(|e| usage(format!("{}: {e}", f.display())))?,
        ));
    }
    if std::io::stdin().is_terminal() {
        return Ok(Zeroizing::new(
            rpassword::prompt_password("key share (input hidden): ").map_err(Failure::from)?,
        ));
    }
    let mut s = Zeroizing::new(String::new());
    std::io::stdin().read_to_string(&mut s).map_err(Failure::from)?;
    Ok(s)
}

fn unseal(args: UnsealArgs) -> Result<u8, Failure> {
    if args.conn.offline {
        return Err(usage(
            "unseal talks to a running vault; offline commands take --share-file instead",
        ));
    }
    let shares: Vec<Zeroizing<String>> = if args.conn.share_files.is_empty() {
        vec![read_share(None)?]
    } else {
        args.conn
            .share_files
            .iter()
            .map(|f| read_share(Some(f)))
            .collect::<Result<_, _>>()?
    };
    let rt = runtime()?;
    let backend = Backend::open(&args.conn)?;
    rt.block_on(async move {
        for share in &shares {
            let (_, body) = backend
                .call("POST", "/v1/admin/unseal", Some(json!({"share": share.trim()})))
                .await?;
            let sealed = body["sealed"].as_bool().unwrap_or(true);
            let human = if sealed {
                format!(
                    "share accepted: {} of {} received; still sealed",
                    body["shares_received"], body["threshold"]
                )
            } else {
                "unsealed: the vault is serving".to_owned()
            };
            output(&args.conn, body.clone(), &human);
        }
        Ok(exit::OK)
    })
}
