//! `tokenvault backup`, `tokenvault backup verify`, `tokenvault restore`.
//!
//! Exit codes as everywhere in the CLI: 0 done, 1 failed (or the backup is not
//! valid), 2 usage, 3 not allowed or unreachable.

use super::exit;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::keys::{Backend, Conn, Failure, Remote, chain, finish, problem_text, runtime, usage};
use crate::store::backup::{self, BackupError, Item, Summary};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
/// Taking a backup needs a JWT with `vault:backup` (e.g. `tokenvault dev token --role operator`).
pub(super) struct BackupArgs {
    #[command(flatten)]
    remote: Remote,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// Where to write the backup (never over an existing file).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<BackupCommand>,
}

#[derive(clap::Subcommand)]
enum BackupCommand {
    /// Check a backup without any key: its SHA-256, every frame, the audit chain from its
    /// start (or retention checkpoint) to the recorded head, and the keystore's digest.
    Verify {
        file: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
pub(super) struct RestoreArgs {
    /// The backup file.
    file: PathBuf,
    /// The data directory to restore into (its `sled` directory must not exist or be empty).
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Where the keystore goes [default: <data-dir>/keys/keystore.json, as in dev mode].
    #[arg(long, value_name = "FILE")]
    keystore: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// Entry point for `tokenvault backup`.
pub(super) fn run_backup(args: BackupArgs) -> ExitCode {
    finish(match args.command {
        Some(BackupCommand::Verify { file, json }) => verify_command(&file, json),
        None => match &args.out {
            Some(out) => take(
                &Conn {
                    url: args.remote.url.clone(),
                    token_file: args.remote.token_file.clone(),
                    json: args.json,
                    offline: false,
                    data_dir: None,
                    config: None,
                    store: None,
                    ca_file: args.remote.ca_file.clone(),
                    share_files: Vec::new(),
                },
                out,
            ),
            None => Err(usage("give --out FILE (take a backup) or `verify FILE`")),
        },
    })
}

/// Entry point for `tokenvault restore`.
pub(super) fn run_restore(args: RestoreArgs) -> ExitCode {
    finish(restore(&args))
}

fn take(conn: &Conn, out: &Path) -> Result<u8, Failure> {
    let rt = runtime()?;
    rt.block_on(async {
        let Backend::Online { client, url, token } = Backend::open(conn)? else {
            return Err(usage("online only"));
        };
        let mut file = create_private(out)?;
        let result: Result<(), Failure> = async {
            let mut res = client
                .post(format!("{url}/v1/admin/backup"))
                .bearer_auth(token.as_str())
                .timeout(std::time::Duration::from_secs(24 * 3600))
                .send()
                .await
                .map_err(|e| Failure(exit::REFUSED, format!("cannot reach the vault at {url}: {}", chain(&e))))?;
            if !res.status().is_success() {
                let status = res.status().as_u16();
                let v: Value = res.json().await.unwrap_or(Value::Null);
                return Err(Failure(
                    if status == 401 || status == 403 { 3 } else { 1 },
                    problem_text(&v),
                ));
            }
            while let Some(chunk) = res
                .chunk()
                .await
                .map_err(|e| Failure(exit::REFUSED, format!("the download failed: {}", chain(&e))))?
            {
                file.write_all(&chunk)
                    .map_err(|e| Failure(exit::FAILED, format!("cannot write {}: {e}", out.display())))?;
            }
            file.sync_all()
                .map_err(|e| Failure(exit::FAILED, format!("cannot write {}: {e}", out.display())))
        }
        .await;
        if let Err(e) = result {
            drop(file);
            let _ = std::fs::remove_file(out);
            return Err(e);
        }
        let report = verify(out).map_err(|e| {
            Failure(
                exit::FAILED,
                format!(
                    "the downloaded backup does not verify ({e}); {} is kept for inspection",
                    out.display()
                ),
            )
        })?;
        show(conn.json, &report, &format!("backup written to {}", out.display()));
        Ok(exit::OK)
    })
}

fn create_private(path: &Path) -> Result<std::fs::File, Failure> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
        .map_err(|e| usage(format!("cannot create {}: {e}", path.display())))
}

/// What a verification found (a valid backup; anything else is an error).
struct Report {
    summary: Summary,
    bytes: u64,
    audit_records: u64,
}

fn verify(path: &Path) -> Result<Report, BackupError> {
    let file = std::fs::File::open(path)?;
    let bytes = file.metadata()?.len();
    let mut checkpoint: Option<Vec<u8>> = None;
    let mut verifier: Option<crate::audit::Verifier> = None;
    let mut last: Option<(u64, [u8; 32])> = None;
    let mut keystore_sha = None;
    let summary = backup::read(file, |item| {
        match item {
            Item::Entry { tree, key, value } if tree == backup::META_TREE && key == backup::AUDIT_CHECKPOINT_KEY => {
                if verifier.is_some() {
                    return Err(BackupError::Invalid(
                        "the audit checkpoint comes after the trail".into(),
                    ));
                }
                checkpoint = Some(value.to_vec());
            }
            Item::Entry { tree, key, value } if tree == backup::AUDIT_TREE => {
                let v = match &mut verifier {
                    Some(v) => v,
                    None => verifier.insert(
                        crate::audit::Verifier::after_checkpoint(checkpoint.as_deref())
                            .ok_or_else(|| BackupError::Invalid("the audit checkpoint does not parse".into()))?,
                    ),
                };
                let seq = <[u8; 8]>::try_from(key)
                    .map(u64::from_be_bytes)
                    .map_err(|_| BackupError::Invalid("an audit key is not a sequence number".into()))?;
                let record = crate::audit::decode_stored(value)
                    .map_err(|_| BackupError::Invalid(format!("audit record {seq} does not parse")))?;
                if record.seq != seq {
                    return Err(BackupError::Invalid(format!(
                        "audit record {seq} is stored under another number"
                    )));
                }
                v.push(&record);
                last = Some((seq, Sha256::digest(value).into()));
            }
            Item::Entry { .. } => {}
            Item::File { name, bytes } if name == backup::KEYSTORE => {
                keystore_sha = Some(hex::encode(Sha256::digest(bytes)));
            }
            Item::File { name, .. } => return Err(BackupError::Invalid(format!("unknown file {name:?}"))),
        }
        Ok(())
    })?;
    if keystore_sha.as_deref() != Some(summary.keystore_sha256.as_str()) {
        return Err(BackupError::Invalid(
            "the keystore is missing or does not match its SHA-256".into(),
        ));
    }
    let audit_records = match verifier {
        Some(v) => {
            let report = v.finish();
            if let Some((seq, why)) = report.first_broken {
                return Err(BackupError::Invalid(format!(
                    "the audit trail breaks at record {seq}: {why}"
                )));
            }
            report.records
        }
        None => 0,
    };
    match (&summary.audit_head, last) {
        (None, None) => {}
        (Some(head), Some((seq, digest))) if head.seq == seq && head.digest == hex::encode(digest) => {}
        _ => {
            return Err(BackupError::Invalid(
                "the audit trail does not end at the recorded head".into(),
            ));
        }
    }
    Ok(Report {
        summary,
        bytes,
        audit_records,
    })
}

fn report_json(r: &Report) -> Value {
    json!({
        "valid": true,
        "bytes": r.bytes,
        "taken_at": time::OffsetDateTime::from_unix_timestamp(r.summary.taken_at)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()),
        "vault_version": r.summary.vault_version,
        "records": r.summary.records,
        "trees": r.summary.trees,
        "audit_records_verified": r.audit_records,
        "audit_head": r.summary.audit_head.as_ref().map(|h| h.seq),
        "kek_versions": r.summary.kek_versions,
        "write_pause_ms": r.summary.write_pause_ms,
    })
}

fn show(as_json: bool, r: &Report, headline: &str) {
    if as_json {
        println!("{}", report_json(r));
        return;
    }
    let v = report_json(r);
    println!("{headline}");
    println!("  taken at        {}", v["taken_at"].as_str().unwrap_or("?"));
    println!("  card records    {}", r.summary.records);
    println!(
        "  audit trail     {} records, chain intact to head {}",
        r.audit_records,
        r.summary.audit_head.as_ref().map_or(0, |h| h.seq)
    );
    let keks: Vec<String> = r
        .summary
        .kek_versions
        .iter()
        .map(|k| format!("v{} {}", k.version, k.state))
        .collect();
    println!("  KEK versions    {}", keks.join(", "));
    println!("  size            {} bytes (SHA-256 checked)", r.bytes);
    println!("  writes paused   {} ms while it was copied", r.summary.write_pause_ms);
}

fn verify_command(file: &Path, as_json: bool) -> Result<u8, Failure> {
    match verify(file) {
        Ok(report) => {
            show(as_json, &report, &format!("{}: a valid backup", file.display()));
            Ok(exit::OK)
        }
        Err(e) if as_json => {
            println!("{}", json!({"valid": false, "error": e.to_string()}));
            Ok(exit::FAILED)
        }
        Err(e) => Err(Failure(exit::FAILED, format!("{}: {e}", file.display()))),
    }
}

fn restore(args: &RestoreArgs) -> Result<u8, Failure> {
    let target = backup::RestoreTarget {
        sled_dir: args.data_dir.join("sled"),
        keystore: args
            .keystore
            .clone()
            .unwrap_or_else(|| args.data_dir.join("keys/keystore.json")),
    };
    // Verified first (chain included): a damaged backup never reaches the target.
    let report = verify(&args.file).map_err(|e| Failure(exit::FAILED, format!("{}: {e}", args.file.display())))?;
    let file = std::fs::File::open(&args.file).map_err(|e| usage(format!("{}: {e}", args.file.display())))?;
    backup::restore(file, &target).map_err(|e| match e {
        BackupError::Refused(why) => usage(why),
        other => Failure(exit::FAILED, other.to_string()),
    })?;
    show(
        args.json,
        &report,
        &format!("restored into {}", args.data_dir.display()),
    );
    if !args.json {
        println!(
            "The backup holds no root key material. Start the vault on {} with the same key provider: \
             the same HSM (PKCS#11) or the custodians' shares; a dev vault needs its keys/dev-root.key and \
             dev/ directory copied from the original data directory.",
            args.data_dir.display()
        );
    }
    Ok(exit::OK)
}
