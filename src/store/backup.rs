//! Online backups of the sled store: `tokenvault backup`, `backup verify`, `restore`.
//!
//! A backup is one file:
//!
//! ```text
//! "TVBACKUP" ‖ format (u32 BE)
//! frames:   0x01 tree entry  (name: u16-prefixed, key: u32-prefixed, value: u32-prefixed)
//!           0x02 file        (name: u16-prefixed, bytes: u32-prefixed)  — the keystore
//!           0x03 summary     (JSON, u32-prefixed; always last)
//! SHA-256 of every byte before it
//! ```
//!
//! It holds every sled tree entry as stored (records stay sealed under their
//! KEKs, fingerprints stay keyed HMACs, the audit trail keeps its chain and
//! MACs), the keystore as stored (KEKs wrapped by the root, MACed), and the
//! audit head the restored anchor is set to. It holds **no root key material**:
//! a backup opens only with the vault's own HSM or custodian shares. The SHA-256
//! catches damage, not forgery; forgery is caught where it always is: records
//! are AEAD-bound to tenant, token and key version, the keystore is MACed, the
//! audit records carry the audit key's MACs.
//!
//! Consistency: the store takes its write gate while it copies every tree but the
//! audit trail (reads go on; writes wait for that copy, never for the client that
//! downloads it), so records and indexes are the store at one instant; the audit
//! trail is then copied up to the head taken at that instant (records below the
//! head never change, and pruning waits for the backup).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::anchor::{AnchorFile, KeyedMark, Mark};

pub const MAGIC: &[u8; 8] = b"TVBACKUP";
pub const FORMAT: u32 = 1;
/// The name of the keystore's file frame.
pub const KEYSTORE: &str = "keystore";
/// The tree holding the audit trail (values: the stored JSON records, keys: sequence numbers).
pub const AUDIT_TREE: &str = "audit";
/// The tree holding store metadata; it comes first in a backup.
pub const META_TREE: &str = "meta";
/// The meta entry holding the audit trail's retention checkpoint (if pruned).
pub(crate) use super::sled_store::CHECKPOINT_KEY as AUDIT_CHECKPOINT_KEY;

const TAG_ENTRY: u8 = 1;
const TAG_FILE: u8 = 2;
const TAG_SUMMARY: u8 = 3;

/// Bounds a damaged or hostile file cannot make the reader exceed.
const MAX_NAME: usize = 255;
const MAX_KEY: usize = 64 * 1024;
const MAX_VALUE: usize = 16 * 1024 * 1024;
const MAX_SUMMARY: usize = 1024 * 1024;

/// What a backup says about itself (its last frame).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    pub format: u32,
    /// Unix seconds when the copy was taken.
    pub taken_at: i64,
    /// The `tokenvault` version that wrote it.
    pub vault_version: String,
    /// Entries per sled tree.
    pub trees: BTreeMap<String, u64>,
    /// Card records (the `tokens` tree).
    pub records: u64,
    /// The audit head at the copy (what the restored anchor is set to).
    pub audit_head: Option<HeadMark>,
    /// SHA-256 of the keystore as copied (hex).
    pub keystore_sha256: String,
    /// The KEK versions the keystore holds, with their state. A backup taken before a
    /// version was destroyed still holds it: see SECURITY.md, "Backups".
    pub kek_versions: Vec<KekState>,
    /// How long writes waited for the copy (reads never wait).
    pub write_pause_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KekState {
    pub version: u32,
    pub state: String,
}

/// An audit head mark (hex digests), as the anchor keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadMark {
    pub seq: u64,
    pub digest: String,
    pub keyed: Option<KeyedHead>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyedHead {
    pub seq: u64,
    pub digest: String,
    pub mac: String,
}

impl HeadMark {
    pub(crate) fn of(mark: &Mark) -> HeadMark {
        HeadMark {
            seq: mark.seq,
            digest: hex::encode(mark.digest),
            keyed: mark.keyed.map(|k| KeyedHead {
                seq: k.seq,
                digest: hex::encode(k.digest),
                mac: hex::encode(k.mac),
            }),
        }
    }

    fn mark(&self) -> Result<Mark, BackupError> {
        let h32 = |s: &str| -> Result<[u8; 32], BackupError> {
            hex::decode(s)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| BackupError::Invalid("the audit head mark is malformed".into()))
        };
        Ok(Mark {
            seq: self.seq,
            digest: h32(&self.digest)?,
            moved_back_from: 0,
            keyed: match &self.keyed {
                None => None,
                Some(k) => Some(KeyedMark {
                    seq: k.seq,
                    digest: h32(&k.digest)?,
                    mac: h32(&k.mac)?,
                }),
            },
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The file is not a backup, or is damaged (the reason says where).
    #[error("not a valid backup: {0}")]
    Invalid(String),
    #[error("{0}")]
    Refused(String),
    #[error("store: {0}")]
    Store(#[source] sled::Error),
}

/// Writes a backup, hashing as it goes.
pub struct BackupWriter<W: Write> {
    out: W,
    hash: Sha256,
    trees: BTreeMap<String, u64>,
    bytes: u64,
}

impl<W: Write> BackupWriter<W> {
    pub fn new(out: W) -> std::io::Result<BackupWriter<W>> {
        let mut w = BackupWriter {
            out,
            hash: Sha256::new(),
            trees: BTreeMap::new(),
            bytes: 0,
        };
        w.put(MAGIC)?;
        w.put(&FORMAT.to_be_bytes())?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.hash.update(b);
        self.bytes += b.len() as u64;
        self.out.write_all(b)
    }

    fn put16(&mut self, b: &[u8]) -> std::io::Result<()> {
        let n = u16::try_from(b.len()).map_err(|_| std::io::Error::other("name too long"))?;
        self.put(&n.to_be_bytes())?;
        self.put(b)
    }

    fn put32(&mut self, b: &[u8]) -> std::io::Result<()> {
        let n = u32::try_from(b.len()).map_err(|_| std::io::Error::other("value too long"))?;
        self.put(&n.to_be_bytes())?;
        self.put(b)
    }

    /// One entry of sled tree `tree`.
    pub fn entry(&mut self, tree: &str, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        self.put(&[TAG_ENTRY])?;
        self.put16(tree.as_bytes())?;
        self.put32(key)?;
        self.put32(value)?;
        *self.trees.entry(tree.to_owned()).or_default() += 1;
        Ok(())
    }

    /// A whole file (the keystore).
    pub fn file(&mut self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        self.put(&[TAG_FILE])?;
        self.put16(name.as_bytes())?;
        self.put32(bytes)
    }

    /// Entries written so far, per tree.
    pub fn trees(&self) -> &BTreeMap<String, u64> {
        &self.trees
    }

    /// Writes the summary and the hash; returns the output and the file's size.
    pub fn finish(mut self, summary: &Summary) -> std::io::Result<(W, u64)> {
        let json = serde_json::to_vec(summary).map_err(std::io::Error::other)?;
        self.put(&[TAG_SUMMARY])?;
        self.put32(&json)?;
        let digest: [u8; 32] = self.hash.clone().finalize().into();
        self.out.write_all(&digest)?;
        self.out.flush()?;
        Ok((self.out, self.bytes + 32))
    }
}

/// One item of a backup, as it is read.
pub enum Item<'a> {
    Entry {
        tree: &'a str,
        key: &'a [u8],
        value: &'a [u8],
    },
    File {
        name: &'a str,
        bytes: &'a [u8],
    },
}

struct Reader<R: Read> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Reader<R> {
    fn exact(&mut self, n: usize, what: &str) -> Result<Vec<u8>, BackupError> {
        let mut buf = vec![0; n];
        self.inner.read_exact(&mut buf).map_err(|e| truncated(e, what))?;
        self.hash.update(&buf);
        Ok(buf)
    }

    fn len(&mut self, width: usize, max: usize, what: &str) -> Result<usize, BackupError> {
        let b = self.exact(width, what)?;
        let n = b.iter().fold(0usize, |n, &x| (n << 8) | usize::from(x));
        if n > max {
            return Err(BackupError::Invalid(format!(
                "{what} of {n} bytes is over the {max}-byte bound"
            )));
        }
        Ok(n)
    }
}

fn truncated(e: std::io::Error, what: &str) -> BackupError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        BackupError::Invalid(format!("the file ends inside {what} (truncated)"))
    } else {
        BackupError::Io(e)
    }
}

/// Reads a backup from start to end, handing each item to `on`, then checks the
/// hash and the summary's counts. Nothing read is trustworthy until this returns
/// `Ok`: a caller that stores items must undo them on error.
pub fn read(input: impl Read, mut on: impl FnMut(Item<'_>) -> Result<(), BackupError>) -> Result<Summary, BackupError> {
    let mut r = Reader {
        inner: std::io::BufReader::with_capacity(1 << 20, input),
        hash: Sha256::new(),
    };
    let magic = r.exact(8, "the header")?;
    if magic != MAGIC {
        return Err(BackupError::Invalid("not a tokenvault backup (wrong magic)".into()));
    }
    let format = r.exact(4, "the header")?;
    if format != FORMAT.to_be_bytes() {
        return Err(BackupError::Invalid(format!(
            "backup format {} is not the one this version reads ({FORMAT})",
            u32::from_be_bytes([format[0], format[1], format[2], format[3]])
        )));
    }
    let mut trees: BTreeMap<String, u64> = BTreeMap::new();
    let summary = loop {
        let tag = r.exact(1, "a frame")?[0];
        match tag {
            TAG_ENTRY => {
                let n = r.len(2, MAX_NAME, "a tree name")?;
                let name = String::from_utf8(r.exact(n, "a tree name")?)
                    .map_err(|_| BackupError::Invalid("a tree name is not UTF-8".into()))?;
                let n = r.len(4, MAX_KEY, "a key")?;
                let key = r.exact(n, "a key")?;
                let n = r.len(4, MAX_VALUE, "a value")?;
                let value = r.exact(n, "a value")?;
                on(Item::Entry {
                    tree: &name,
                    key: &key,
                    value: &value,
                })?;
                *trees.entry(name).or_default() += 1;
            }
            TAG_FILE => {
                let n = r.len(2, MAX_NAME, "a file name")?;
                let name = String::from_utf8(r.exact(n, "a file name")?)
                    .map_err(|_| BackupError::Invalid("a file name is not UTF-8".into()))?;
                let n = r.len(4, MAX_VALUE, "a file")?;
                let bytes = zeroize::Zeroizing::new(r.exact(n, "a file")?);
                on(Item::File {
                    name: &name,
                    bytes: &bytes,
                })?;
            }
            TAG_SUMMARY => {
                let n = r.len(4, MAX_SUMMARY, "the summary")?;
                let json = r.exact(n, "the summary")?;
                break serde_json::from_slice::<Summary>(&json)
                    .map_err(|e| BackupError::Invalid(format!("the summary does not parse: {e}")))?;
            }
            other => return Err(BackupError::Invalid(format!("unknown frame type {other}"))),
        }
    };
    let expected: [u8; 32] = r.hash.clone().finalize().into();
    let mut stored = [0u8; 32];
    r.inner
        .read_exact(&mut stored)
        .map_err(|e| truncated(e, "the closing hash"))?;
    if stored != expected {
        return Err(BackupError::Invalid(
            "the SHA-256 does not match: the file is damaged".into(),
        ));
    }
    let mut rest = [0u8; 1];
    if r.inner.read(&mut rest)? != 0 {
        return Err(BackupError::Invalid("bytes after the closing hash".into()));
    }
    if summary.format != FORMAT || summary.trees != trees {
        return Err(BackupError::Invalid("the summary does not match the entries".into()));
    }
    Ok(summary)
}

/// The KEK versions and states a keystore holds (read without any key: the
/// keystore lists them in the clear; their key material stays wrapped).
pub fn kek_states(keystore: &[u8]) -> Vec<KekState> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(keystore) else {
        return Vec::new();
    };
    v["body"]["keks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| {
            Some(KekState {
                version: u32::try_from(k["version"].as_u64()?).ok()?,
                state: k["state"].as_str().unwrap_or("unknown").to_owned(),
            })
        })
        .collect()
}

/// Where a restore puts things.
pub struct RestoreTarget {
    /// The sled directory (`<data-dir>/sled`).
    pub sled_dir: PathBuf,
    /// The keystore file (`<data-dir>/keys/keystore.json` unless configured elsewhere).
    pub keystore: PathBuf,
}

/// Restores a backup into a directory that does not exist yet or is empty. On
/// any error (a damaged file included) everything written is removed again.
pub fn restore(input: impl Read, to: &RestoreTarget) -> Result<Summary, BackupError> {
    for p in [&to.sled_dir, &to.keystore] {
        if p.exists() && !(p.is_dir() && std::fs::read_dir(p)?.next().is_none()) {
            return Err(BackupError::Refused(format!(
                "{} exists and is not empty: a backup restores only into an empty place",
                p.display()
            )));
        }
    }
    let result = restore_into(input, to);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&to.sled_dir);
        let _ = std::fs::remove_file(&to.keystore);
    }
    result
}

fn restore_into(input: impl Read, to: &RestoreTarget) -> Result<Summary, BackupError> {
    let store = BackupError::Store;
    let db = sled::Config::new().path(&to.sled_dir).open().map_err(store)?;
    let mut keystore: Option<zeroize::Zeroizing<Vec<u8>>> = None;
    let mut batch: Option<(String, sled::Batch, usize)> = None;
    let flush_batch = |db: &sled::Db, b: Option<(String, sled::Batch, usize)>| -> Result<(), BackupError> {
        if let Some((tree, batch, _)) = b {
            db.open_tree(tree.as_bytes())
                .and_then(|t| t.apply_batch(batch))
                .map_err(store)?;
        }
        Ok(())
    };
    let summary = read(input, |item| {
        match item {
            Item::Entry { tree, key, value } => {
                if batch.as_ref().is_some_and(|(t, _, n)| t != tree || *n >= 10_000) {
                    flush_batch(&db, batch.take())?;
                }
                let (_, b, n) = batch.get_or_insert_with(|| (tree.to_owned(), sled::Batch::default(), 0));
                b.insert(key, value);
                *n += 1;
            }
            Item::File { name, bytes } if name == KEYSTORE => {
                keystore = Some(zeroize::Zeroizing::new(bytes.to_vec()));
            }
            Item::File { name, .. } => {
                return Err(BackupError::Invalid(format!("unknown file {name:?} in the backup")));
            }
        }
        Ok(())
    })?;
    flush_batch(&db, batch.take())?;
    let keystore = keystore.ok_or_else(|| BackupError::Invalid("the backup holds no keystore".into()))?;
    if hex::encode(Sha256::digest(&keystore[..])) != summary.keystore_sha256 {
        return Err(BackupError::Invalid(
            "the keystore does not match its recorded SHA-256".into(),
        ));
    }
    db.flush().map_err(store)?;
    drop(db);
    // The anchor: the audit head the copy was taken at.
    let mut anchor = AnchorFile::open(&to.sled_dir)?;
    let mark = summary.audit_head.as_ref().map_or(Ok(Mark::EMPTY), HeadMark::mark)?;
    anchor.write(&mark)?;
    anchor.sync_dir()?;
    write_private(&to.keystore, &keystore)?;
    Ok(summary)
}

/// Creates `path` (never over an existing file) readable by its owner only, durably.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> (Vec<u8>, Summary) {
        let mut w = BackupWriter::new(Vec::new()).unwrap();
        w.entry("meta", b"schema", b"1").unwrap();
        w.entry("tokens", b"4111110000001111", &[7; 100]).unwrap();
        w.file(KEYSTORE, b"{}").unwrap();
        let summary = Summary {
            format: FORMAT,
            trees: w.trees().clone(),
            records: 1,
            keystore_sha256: hex::encode(Sha256::digest(b"{}")),
            ..Summary::default()
        };
        let (bytes, size) = w.finish(&summary).unwrap();
        assert_eq!(size, bytes.len() as u64);
        (bytes, summary)
    }

    #[test]
    fn a_backup_reads_back_item_for_item() {
        let (bytes, summary) = sample();
        let mut seen = Vec::new();
        let got = read(&bytes[..], |item| {
            seen.push(match item {
                Item::Entry { tree, key, value } => format!("{tree}:{}:{}", key.len(), value.len()),
                Item::File { name, bytes } => format!("file {name}:{}", bytes.len()),
            });
            Ok(())
        })
        .unwrap();
        assert_eq!(got, summary);
        assert_eq!(seen, ["meta:6:1", "tokens:16:100", "file keystore:2"]);
    }

    proptest! {
        /// Any flipped byte or any truncation is reported, never accepted or panicked on.
        #[test]
        fn damage_anywhere_is_caught(at in 0usize..4096, bit in 0u8..8, cut in 0usize..4096) {
            let (bytes, _) = sample();
            let mut flipped = bytes.clone();
            let i = at % flipped.len();
            flipped[i] ^= 1 << bit;
            prop_assert!(read(&flipped[..], |_| Ok(())).is_err());
            let short = &bytes[..cut % bytes.len()];
            prop_assert!(read(short, |_| Ok(())).is_err());
        }

        /// Arbitrary bytes are refused cleanly.
        #[test]
        fn junk_is_refused(junk in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&FORMAT.to_be_bytes());
            bytes.extend_from_slice(&junk);
            prop_assert!(read(&bytes[..], |_| Ok(())).is_err());
        }
    }

    #[test]
    fn restore_refuses_a_place_that_is_not_empty_and_cleans_up_after_damage() {
        let dir = tempfile::tempdir().unwrap();
        let to = RestoreTarget {
            sled_dir: dir.path().join("sled"),
            keystore: dir.path().join("keys/keystore.json"),
        };
        std::fs::create_dir_all(&to.sled_dir).unwrap();
        std::fs::write(to.sled_dir.join("x"), b"x").unwrap();
        let (bytes, _) = sample();
        assert!(matches!(restore(&bytes[..], &to), Err(BackupError::Refused(_))));
        std::fs::remove_dir_all(&to.sled_dir).unwrap();
        let mut damaged = bytes.clone();
        let n = damaged.len();
        damaged[n - 1] ^= 1;
        assert!(matches!(restore(&damaged[..], &to), Err(BackupError::Invalid(_))));
        assert!(!to.sled_dir.exists() && !to.keystore.exists(), "nothing left behind");
        let summary = restore(&bytes[..], &to).unwrap();
        assert_eq!(summary.records, 1);
        assert_eq!(std::fs::read(&to.keystore).unwrap(), b"{}");
        let db = sled::open(&to.sled_dir).unwrap();
        assert_eq!(db.open_tree("tokens").unwrap().len(), 1);
    }
}
