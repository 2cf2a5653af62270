//! `tokenvault import`: a legacy card file (CSV `id,pan,exp_month,exp_year,name`
//! or JSON lines with the same keys) into a running vault through
//! `POST /v1/tokens/batch`, writing the CRM's map (`id,token,…` metadata, never a
//! PAN) and a reject report (line number, id, reason, never a PAN).
//!
//! Resumable: after every batch the map and the reject report are flushed to
//! disk, then a checkpoint beside the map records how many input records are
//! done and how long both files were. A rerun after a kill or a network error
//! truncates both files to the checkpoint and goes on from the next record; the
//! batch that was in flight is sent again, and a client granted `tokens:dedupe`
//! (an importer) gets the tokens it already made: no card is stored twice.
//! `--dry-run` validates locally and reports the rejects without sending anything.

use super::exit;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::keys::{Failure, usage};
use crate::domain::card::{Expiry, Pan};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum Format {
    Csv,
    Jsonl,
}

#[derive(Args)]
pub(super) struct ImportArgs {
    /// The legacy card file.
    file: PathBuf,
    /// csv (header id,pan,exp_month,exp_year[,name]) or jsonl (objects with those keys).
    #[arg(long, value_enum)]
    format: Format,
    /// Where the id → token map goes (CSV, no card data); the checkpoint sits beside it.
    #[arg(long, value_name = "FILE", required_unless_present = "dry_run")]
    map_out: Option<PathBuf>,
    /// The reject report (CSV line,id,reason) [default: <map>.rejects.csv; with --dry-run: stdout].
    #[arg(long, value_name = "FILE")]
    rejects: Option<PathBuf>,
    /// Validate locally and report the rejects; send nothing.
    #[arg(long)]
    dry_run: bool,
    /// The importer's JWT must be granted tokens:create and tokens:dedupe.
    #[command(flatten)]
    remote: super::keys::Remote,
    /// Cards per request (1–1000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=1000))]
    batch: u16,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=8))]
    parallel: u8,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// One input record, card fields in zeroizing memory.
struct Row {
    line: u64,
    id: String,
    pan: Zeroizing<String>,
    exp_month: i64,
    exp_year: i64,
    name: Option<Zeroizing<String>>,
}

#[derive(Deserialize)]
struct JsonRow {
    id: Value,
    pan: Zeroizing<String>,
    exp_month: Value,
    exp_year: Value,
    #[serde(default)]
    name: Option<Zeroizing<String>>,
}

/// A record refused before it was sent: line, id, reason.
type LocalReject = (u64, String, &'static str);
/// Cards to send, the records refused locally, and how many input records it covers.
type Batch = (Vec<Row>, Vec<LocalReject>, u64);

/// Where a rerun continues.
#[derive(Serialize, Deserialize, Default, Clone)]
struct Checkpoint {
    /// Input records consumed (imported or rejected).
    records: u64,
    map_bytes: u64,
    rejects_bytes: u64,
    /// The input's length and the SHA-256 of its first 64 KiB: a rerun on another file is refused.
    input_len: u64,
    input_head: String,
    imported: u64,
    rejected: u64,
}

pub(super) fn run(args: ImportArgs) -> ExitCode {
    super::keys::finish(import(&args).map(|()| 0))
}

/// Reads records one at a time (CSV or JSON lines).
enum Reader {
    Csv(csv::Reader<File>, csv::StringRecord, [usize; 4], Option<usize>),
    Jsonl(BufReader<File>, u64),
}

impl Reader {
    fn open(path: &Path, format: Format) -> Result<Reader, Failure> {
        let file = File::open(path).map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?;
        match format {
            Format::Jsonl => Ok(Reader::Jsonl(BufReader::new(file), 0)),
            Format::Csv => {
                let mut r = csv::ReaderBuilder::new().flexible(true).from_reader(file);
                let header = r
                    .headers()
                    .map_err(|_| usage("the CSV has no header line (id,pan,exp_month,exp_year[,name])"))?
                    .clone();
                let col = |name: &str| header.iter().position(|h| h.trim().eq_ignore_ascii_case(name));
                let need = ["id", "pan", "exp_month", "exp_year"];
                let mut cols = [0; 4];
                for (i, n) in need.iter().enumerate() {
                    cols[i] = col(n).ok_or_else(|| usage(format!("the CSV header lacks the column {n}")))?;
                }
                Ok(Reader::Csv(r, csv::StringRecord::new(), cols, col("name")))
            }
        }
    }

    /// The next record, or a reject (line, id, reason) for one that cannot be read.
    fn next(&mut self) -> Option<Result<Row, (u64, String, &'static str)>> {
        match self {
            Reader::Csv(r, record, cols, name) => {
                match r.read_record(record) {
                    Ok(false) => None,
                    Err(e) => {
                        let line = e.position().map_or(0, |p| p.line());
                        Some(Err((line, String::new(), "the line is not valid CSV")))
                    }
                    Ok(true) => {
                        let line = record.position().map_or(0, |p| p.line());
                        let field = |i: usize| record.get(i).unwrap_or("").trim();
                        let row = Row {
                            line,
                            id: field(cols[0]).to_owned(),
                            pan: Zeroizing::new(field(cols[1]).to_owned()),
                            exp_month: field(cols[2]).parse().unwrap_or(0),
                            exp_year: field(cols[3]).parse().unwrap_or(0),
                            name: name
                                .map(|n| Zeroizing::new(field(n).to_owned()))
                                .filter(|n| !n.is_empty()),
                        };
                        // The record's buffer is overwritten by the next one; clear it now.
                        record.clear();
                        Some(Ok(row))
                    }
                }
            }
            Reader::Jsonl(r, line) => loop {
                let mut text = Zeroizing::new(String::new());
                *line += 1;
                match r.read_line(&mut text) {
                    Ok(0) => return None,
                    Err(_) => return Some(Err((*line, String::new(), "the line is not UTF-8 text"))),
                    Ok(_) if text.trim().is_empty() => continue,
                    Ok(_) => {}
                }
                let Ok(row) = serde_json::from_str::<JsonRow>(&text) else {
                    return Some(Err((
                        *line,
                        String::new(),
                        "the line is not a JSON object with the keys",
                    )));
                };
                let id = match &row.id {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => String::new(),
                };
                let int = |v: &Value| match v {
                    Value::Number(n) => n.as_i64().unwrap_or(0),
                    Value::String(s) => s.trim().parse().unwrap_or(0),
                    _ => 0,
                };
                return Some(Ok(Row {
                    line: *line,
                    id,
                    exp_month: int(&row.exp_month),
                    exp_year: int(&row.exp_year),
                    pan: row.pan,
                    name: row.name,
                }));
            },
        }
    }
}

/// Checks a record as the vault would (so a dry run reports what an import
/// would refuse): the reason, never the value.
fn check(row: &Row) -> Result<(), &'static str> {
    if row.id.is_empty() || row.id.chars().count() > 128 || row.id.chars().any(char::is_control) {
        return Err("id must be 1 to 128 characters without control characters");
    }
    if crate::domain::card::contains_pan(&row.id) {
        return Err("id must not contain a card number");
    }
    // The vault refuses JSON escapes in card bodies: nothing that needs one.
    if row.id.contains(['\\', '"']) || row.name.as_ref().is_some_and(|n| n.contains(['\\', '"'])) {
        return Err("id and name must not contain a backslash or a double quote");
    }
    Pan::parse(&row.pan).map_err(|_| "not a valid card number")?;
    let now = time::OffsetDateTime::now_utc();
    Expiry::parse(row.exp_month, row.exp_year, (now.year(), u8::from(now.month()))).map_err(|e| match e {
        crate::domain::card::ExpiryError::Expired => "the card has expired",
        _ => "not a valid expiry (exp_month 1-12, four-digit exp_year)",
    })?;
    if let Some(n) = &row.name {
        crate::domain::card::CardholderName::parse(n).map_err(|_| "not a valid cardholder name")?;
    }
    Ok(())
}

/// The id as it may appear in a report: refused ids holding a card number are not written.
fn shown_id(id: &str) -> &str {
    if crate::domain::card::contains_pan(id) { "" } else { id }
}

fn csv_line(fields: &[&str]) -> String {
    let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new());
    let _ = w.write_record(fields);
    String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
}

/// Length and the SHA-256 of the first 64 KiB of the input.
fn fingerprint(path: &Path) -> Result<(u64, String), Failure> {
    let mut f = File::open(path).map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut head = Zeroizing::new(vec![0u8; 65_536]);
    let mut n = 0;
    while n < head.len() {
        match std::io::Read::read(&mut f, &mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(usage(format!("cannot read {}: {e}", path.display()))),
        }
    }
    Ok((len, hex::encode(Sha256::digest(&head[..n]))))
}

/// Records in the input (for the progress bar): data lines.
fn count(path: &Path, format: Format) -> u64 {
    let Ok(f) = File::open(path) else { return 0 };
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut n = 0u64;
    let mut buf = Zeroizing::new(Vec::with_capacity(4096));
    while r.read_until(b'\n', &mut buf).is_ok_and(|k| k > 0) {
        if buf.iter().any(|b| !b.is_ascii_whitespace()) {
            n += 1;
        }
        buf.clear();
    }
    if format == Format::Csv { n.saturating_sub(1) } else { n }
}

fn import(args: &ImportArgs) -> Result<(), Failure> {
    let total = count(&args.file, args.format);
    let mut reader = Reader::open(&args.file, args.format)?;
    if args.dry_run {
        return dry_run(args, &mut reader);
    }
    let map_path = args.map_out.clone().ok_or_else(|| usage("--map-out is required"))?;
    let rejects_path = args
        .rejects
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.rejects.csv", map_path.display())));
    let checkpoint_path = PathBuf::from(format!("{}.checkpoint", map_path.display()));
    let (input_len, input_head) = fingerprint(&args.file)?;
    let mut cp = match std::fs::read(&checkpoint_path) {
        Ok(bytes) => {
            let cp: Checkpoint = serde_json::from_slice(&bytes).map_err(|_| {
                usage(format!(
                    "{} is not a checkpoint of this tool",
                    checkpoint_path.display()
                ))
            })?;
            if cp.input_len != input_len || cp.input_head != input_head {
                return Err(usage(format!(
                    "{} belongs to another input file: remove it (and the map) to start over",
                    checkpoint_path.display()
                )));
            }
            cp
        }
        Err(_) => Checkpoint {
            input_len,
            input_head,
            ..Checkpoint::default()
        },
    };
    let open = |p: &Path, at: u64, header: &str| -> Result<File, Failure> {
        let mut f = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(p)
            .map_err(|e| usage(format!("cannot write {}: {e}", p.display())))?;
        // Whatever was written after the checkpoint goes: its batch is sent again.
        f.set_len(at)
            .map_err(|e| usage(format!("cannot write {}: {e}", p.display())))?;
        f.seek(std::io::SeekFrom::End(0))
            .map_err(|e| usage(format!("cannot write {}: {e}", p.display())))?;
        if at == 0 {
            f.write_all(header.as_bytes())
                .map_err(|e| usage(format!("cannot write {}: {e}", p.display())))?;
        }
        Ok(f)
    };
    let mut map = open(&map_path, cp.map_bytes, "id,token,brand,bin,last4,exp_month,exp_year\n")?;
    let mut rejects = open(&rejects_path, cp.rejects_bytes, "line,id,reason\n")?;
    if cp.records > 0 {
        eprintln!(
            "resuming after {} records (checkpoint {})",
            cp.records,
            checkpoint_path.display()
        );
    }
    for _ in 0..cp.records {
        if reader.next().is_none() {
            break;
        }
    }
    let client = super::keys::http_client(args.remote.ca_file.as_deref())?;
    let token = super::keys::read_jwt(
        args.remote.token_file.as_deref(),
        "an importer JWT is needed: --token-file FILE or TOKENVAULT_TOKEN_FILE",
    )?;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} cards  {per_sec}  ETA {eta}  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(cp.records);
    let started = Instant::now();
    let start_records = cp.records;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure(exit::FAILED, e.to_string()))?;
    let mut checked_dedupe = false;
    loop {
        // Read up to `parallel` batches, each up to `batch` records.
        let mut batches: Vec<Batch> = Vec::new();
        for _ in 0..args.parallel {
            let (mut rows, mut local, mut consumed) = (Vec::new(), Vec::new(), 0u64);
            while rows.len() < usize::from(args.batch) {
                match reader.next() {
                    None => break,
                    Some(Err(reject)) => {
                        consumed += 1;
                        local.push(reject);
                    }
                    Some(Ok(row)) => {
                        consumed += 1;
                        match check(&row) {
                            Ok(()) => rows.push(row),
                            Err(reason) => local.push((row.line, row.id.clone(), reason)),
                        }
                    }
                }
            }
            if consumed == 0 {
                break;
            }
            batches.push((rows, local, consumed));
        }
        if batches.is_empty() {
            break;
        }
        let answers = runtime.block_on(futures_util::future::join_all(
            batches
                .iter()
                .map(|(rows, _, _)| send(&client, &args.remote.url, &token, rows)),
        ));
        // Written in input order: a batch's lines, then the checkpoint.
        for ((rows, local, consumed), answer) in batches.iter().zip(answers) {
            let answer = answer?;
            let mut map_text = String::new();
            let mut reject_text = String::new();
            for (line, id, reason) in local {
                reject_text.push_str(&csv_line(&[&line.to_string(), shown_id(id), reason]));
                cp.rejected += 1;
            }
            let items = answer["items"].as_array().cloned().unwrap_or_default();
            if items.len() != rows.len() {
                return Err(Failure(
                    exit::FAILED,
                    "the vault answered a different number of items".into(),
                ));
            }
            for (row, item) in rows.iter().zip(&items) {
                let t = &item["token"];
                if t.is_object() {
                    if !checked_dedupe && t.get("fingerprint").is_none() {
                        return Err(usage(
                            "this client is not granted tokens:dedupe: an interrupted import could store a card \
                             twice. Use an importer client (dev: tokenvault dev token --role importer)",
                        ));
                    }
                    checked_dedupe = true;
                    let s = |k: &str| t[k].as_str().unwrap_or("").to_owned();
                    let n = |k: &str| t[k].as_u64().map(|v| v.to_string()).unwrap_or_default();
                    map_text.push_str(&csv_line(&[
                        &row.id,
                        &s("token"),
                        &s("brand"),
                        &s("bin"),
                        &s("last4"),
                        &n("exp_month"),
                        &n("exp_year"),
                    ]));
                    cp.imported += 1;
                } else {
                    let reason = item["problem"]["detail"]
                        .as_str()
                        .or(item["problem"]["title"].as_str())
                        .unwrap_or("refused by the vault");
                    reject_text.push_str(&csv_line(&[&row.line.to_string(), shown_id(&row.id), reason]));
                    cp.rejected += 1;
                }
            }
            append(&mut map, &map_path, &map_text)?;
            append(&mut rejects, &rejects_path, &reject_text)?;
            cp.records += consumed;
            cp.map_bytes = file_len(&map, &map_path)?;
            cp.rejects_bytes = file_len(&rejects, &rejects_path)?;
            save(&checkpoint_path, &cp)?;
            bar.set_position(cp.records);
        }
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let rate = (cp.records - start_records) as f64 / secs.max(1e-9);
    if args.json {
        println!(
            "{}",
            serde_json::json!({"records": cp.records, "imported": cp.imported, "rejected": cp.rejected,
                "seconds": secs, "records_per_second": rate, "map": map_path, "rejects": rejects_path})
        );
    } else {
        println!(
            "{} records: {} imported, {} rejected ({}); {:.0} records/s this run; map: {}",
            cp.records,
            cp.imported,
            cp.rejected,
            rejects_path.display(),
            rate,
            map_path.display()
        );
    }
    eprintln!(
        "The map and the reject report hold no card data. {} still holds card numbers: shred it now \
         (e.g. shred -u {}; on SSDs and copy-on-write file systems delete it and rely on disk encryption), \
         with any copies.",
        args.file.display(),
        args.file.display()
    );
    Ok(())
}

fn dry_run(args: &ImportArgs, reader: &mut Reader) -> Result<(), Failure> {
    let mut out: Box<dyn Write> = match &args.rejects {
        Some(p) => Box::new(File::create(p).map_err(|e| usage(format!("cannot write {}: {e}", p.display())))?),
        None => Box::new(std::io::stdout()),
    };
    let _ = out.write_all(b"line,id,reason\n");
    let (mut records, mut rejected) = (0u64, 0u64);
    while let Some(next) = reader.next() {
        records += 1;
        let reject = match next {
            Err(r) => Some(r),
            Ok(row) => check(&row).err().map(|reason| (row.line, row.id.clone(), reason)),
        };
        if let Some((line, id, reason)) = reject {
            rejected += 1;
            let _ = out.write_all(csv_line(&[&line.to_string(), shown_id(&id), reason]).as_bytes());
        }
    }
    let _ = out.flush();
    if args.json {
        eprintln!(
            "{}",
            serde_json::json!({"records": records, "valid": records - rejected, "rejected": rejected})
        );
    } else {
        eprintln!(
            "dry run: {records} records, {} valid, {rejected} rejected; nothing was sent",
            records - rejected
        );
    }
    Ok(())
}

fn append(f: &mut File, path: &Path, text: &str) -> Result<(), Failure> {
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_data())
        .map_err(|e| Failure(exit::FAILED, format!("cannot write {}: {e}", path.display())))
}

fn file_len(f: &File, path: &Path) -> Result<u64, Failure> {
    f.metadata()
        .map(|m| m.len())
        .map_err(|e| Failure(exit::FAILED, format!("cannot read {}: {e}", path.display())))
}

/// Writes the checkpoint atomically (temporary file, fsync, rename).
fn save(path: &Path, cp: &Checkpoint) -> Result<(), Failure> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let io = |e: std::io::Error| Failure(exit::FAILED, format!("cannot write {}: {e}", path.display()));
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(&serde_json::to_vec(cp).unwrap_or_default()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Sends one batch, retrying a network error, a 429 or a 5xx (backing off);
/// after that the import stops and a rerun resumes it.
async fn send(client: &reqwest::Client, url: &str, token: &str, rows: &[Row]) -> Result<Value, Failure> {
    if rows.is_empty() {
        return Ok(serde_json::json!({"items": []}));
    }
    // The body holds the cards: built once, in zeroizing memory sized up front.
    let mut body = Zeroizing::new(Vec::with_capacity(rows.len() * 320 + 16));
    body.extend_from_slice(b"{\"items\":[");
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        let item = serde_json::json!({"id": r.id, "exp_month": r.exp_month, "exp_year": r.exp_year});
        let text = item.to_string();
        body.extend_from_slice(&text.as_bytes()[..text.len() - 1]);
        // Card digits and the name (checked: no backslash, no quote in a PAN).
        body.extend_from_slice(b",\"pan\":\"");
        body.extend_from_slice(r.pan.as_bytes());
        body.push(b'"');
        if let Some(n) = &r.name {
            let quoted = Zeroizing::new(serde_json::to_string(n.as_str()).unwrap_or_default());
            body.extend_from_slice(b",\"cardholder_name\":");
            body.extend_from_slice(quoted.as_bytes());
        }
        body.push(b'}');
    }
    body.extend_from_slice(b"]}");
    let endpoint = format!("{}/v1/tokens/batch", url.trim_end_matches('/'));
    let mut wait = Duration::from_millis(500);
    for attempt in 0..6 {
        let sent = client
            .post(&endpoint)
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await;
        match sent {
            Ok(res) if res.status().is_success() => {
                return res
                    .json()
                    .await
                    .map_err(|_| Failure(exit::FAILED, "the vault's answer is not JSON".into()));
            }
            Ok(res) if res.status() == 401 || res.status() == 403 => {
                return Err(Failure(
                    exit::REFUSED,
                    format!("the vault refused the credential ({})", res.status()),
                ));
            }
            Ok(res) if res.status().is_client_error() && res.status() != 429 => {
                let v: Value = res.json().await.unwrap_or(Value::Null);
                return Err(Failure(
                    exit::FAILED,
                    format!("the vault refused a batch: {}", v["detail"].as_str().unwrap_or("")),
                ));
            }
            _ if attempt < 5 => {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Ok(res) => {
                return Err(Failure(
                    exit::REFUSED,
                    format!("the vault answered {}; rerun the same command to resume", res.status()),
                ));
            }
            Err(e) => {
                return Err(Failure(
                    exit::REFUSED,
                    format!("cannot reach the vault ({e}); rerun the same command to resume"),
                ));
            }
        }
    }
    Err(Failure(
        exit::REFUSED,
        "the vault is unavailable; rerun the same command to resume".into(),
    ))
}
