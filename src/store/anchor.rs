//! The store's durable high-water mark, kept outside sled's own files.
//!
//! sled checksums its log, and its crash recovery stops at the first message whose
//! checksum fails: a byte flipped in the middle of `db` silently drops every later
//! write, acknowledged or not. The anchor is what lets the vault notice. After every
//! group commit the committer records the audit trail's head — sequence number and
//! SHA-256 of the stored record — in `anchor` (a small file beside sled's, fsynced).
//! Every acknowledged write is followed by its audit record, so a store that lost
//! any acknowledged write also lost the audit record at or before the anchored head.
//! At open the head must still be there, byte for byte; otherwise the store is
//! damaged (records lost, or history rewritten), and the vault says so loudly.
//!
//! The anchor is written only after sled's flush returns, so it never runs ahead
//! of durable data: a crash can leave it behind the store (harmless) but never in
//! front. While the store is damaged the anchor is frozen, so the alarm survives
//! restarts until an operator restores a backup or accepts the loss
//! (`tokenvault store reanchor`).
//!
//! The anchor is also MACed where it matters: with each MACed audit record the
//! audit layer hands the store a MAC (under the audit key) over that record's
//! sequence and digest, and the anchor keeps the latest such *keyed mark*. While
//! the vault is sealed no MAC can be made, so the keyed mark stays at the last
//! MACed record. At open (or unseal) the audit layer checks the keyed mark's MAC,
//! that the record it names is still there byte for byte, and that everything after
//! it chains and is MACed or inside a recorded sealed period: an edited trail with
//! recomputed hashes and dropped MACs cannot also forge the keyed mark.
//!
//! Format (v2): two 168-byte slots written alternately (a torn write spoils at
//! most one): magic, generation, sequence, digest, "moved back from" sequence,
//! keyed sequence, keyed digest, keyed MAC, and a SHA-256 over those. The valid
//! slot with the higher generation wins. v1 anchors (96-byte slots, no keyed
//! mark) are still read; the next write converts the file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

const MAGIC_V1: &[u8; 8] = b"TVANCHR1";
const SLOT_V1: usize = 96;
const MAGIC: &[u8; 8] = b"TVANCHR2";
const SLOT: usize = 168;
const DATA: usize = SLOT - 32;

/// The last MACed audit record, as anchored: its sequence, digest, and a MAC
/// under the audit key over both (made by the audit layer, never by the store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyedMark {
    pub seq: u64,
    pub digest: [u8; 32],
    pub mac: [u8; 32],
}

/// The anchored audit head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mark {
    /// Audit sequence number of the head record (0: no record yet).
    pub seq: u64,
    /// SHA-256 of the head record as stored.
    pub digest: [u8; 32],
    /// Set by `reanchor`: the sequence number the anchor was moved back from
    /// (reported once by the next start, then cleared).
    pub moved_back_from: u64,
    /// The last MACed audit record (none before the first one, or in a v1 anchor).
    pub keyed: Option<KeyedMark>,
}

impl Mark {
    pub(crate) const EMPTY: Mark = Mark {
        seq: 0,
        digest: [0; 32],
        moved_back_from: 0,
        keyed: None,
    };

    /// The mark for an audit record stored at `seq`.
    pub(crate) fn of(seq: u64, stored: &[u8]) -> Mark {
        Mark {
            seq,
            digest: Sha256::digest(stored).into(),
            moved_back_from: 0,
            keyed: None,
        }
    }
}

/// Whether the anchor file in `dir` is in the v1 layout (before keyed marks).
pub(super) fn is_legacy(dir: &Path) -> bool {
    std::fs::read(AnchorFile::path_in(dir)).is_ok_and(|b| b.get(..8) == Some(MAGIC_V1.as_slice()))
}

/// What reading the anchor found.
#[derive(Debug)]
pub(super) enum Found {
    Missing,
    /// The file exists but neither slot is intact.
    Unreadable,
    Mark(Mark),
}

/// The anchor file, open for writing.
pub(super) struct AnchorFile {
    path: PathBuf,
    file: File,
    generation: u64,
}

impl AnchorFile {
    /// Where the anchor of the sled store in `dir` lives.
    pub(super) fn path_in(dir: &Path) -> PathBuf {
        dir.join("anchor")
    }

    /// Reads the anchor (if any) without changing it.
    pub(super) fn read(dir: &Path) -> std::io::Result<Found> {
        let path = Self::path_in(dir);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Missing),
            Err(e) => return Err(e),
        }
        Ok(best_slot(&bytes).map_or(Found::Unreadable, |(_, m)| Found::Mark(m)))
    }

    /// Opens (creating if needed) the anchor for writing.
    pub(super) fn open(dir: &Path) -> std::io::Result<AnchorFile> {
        let path = Self::path_in(dir);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let best = best_slot(&bytes);
        let generation = best.map_or(0, |(g, _)| g);
        let mut anchor = AnchorFile { path, file, generation };
        // A v1 anchor: rewrite both slots in the v2 layout, so the two formats never mix.
        if (bytes.len() == 2 * SLOT_V1 || (!bytes.is_empty() && bytes.len() < SLOT))
            && let Some((_, mark)) = best
        {
            anchor.file.set_len(0)?;
            anchor.write(&mark)?;
            anchor.write(&mark)?;
        }
        Ok(anchor)
    }

    /// Writes `mark` durably into the older slot.
    pub(super) fn write(&mut self, mark: &Mark) -> std::io::Result<()> {
        let generation = self.generation + 1;
        let slot = encode(generation, mark);
        let offset = (generation % 2) * SLOT as u64;
        self.file.seek(SeekFrom::Start(offset))?;
        self.file.write_all(&slot)?;
        self.file.sync_data()?;
        self.generation = generation;
        Ok(())
    }

    /// Makes the anchor's directory entry durable (after creating the file).
    pub(super) fn sync_dir(&self) -> std::io::Result<()> {
        match self.path.parent() {
            Some(dir) => File::open(dir)?.sync_all(),
            None => Ok(()),
        }
    }
}

fn encode(generation: u64, mark: &Mark) -> [u8; SLOT] {
    let mut out = [0u8; SLOT];
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&generation.to_be_bytes());
    out[16..24].copy_from_slice(&mark.seq.to_be_bytes());
    out[24..56].copy_from_slice(&mark.digest);
    out[56..64].copy_from_slice(&mark.moved_back_from.to_be_bytes());
    if let Some(k) = &mark.keyed {
        out[64..72].copy_from_slice(&k.seq.to_be_bytes());
        out[72..104].copy_from_slice(&k.digest);
        out[104..136].copy_from_slice(&k.mac);
    }
    let check: [u8; 32] = Sha256::digest(&out[..DATA]).into();
    out[DATA..].copy_from_slice(&check);
    out
}

fn decode(slot: &[u8]) -> Option<(u64, Mark)> {
    let (magic, data) = match slot.len() {
        SLOT => (MAGIC, DATA),
        SLOT_V1 => (MAGIC_V1, 64),
        _ => return None,
    };
    if &slot[..8] != magic {
        return None;
    }
    let check: [u8; 32] = Sha256::digest(&slot[..data]).into();
    if check[..] != slot[data..] {
        return None;
    }
    let u64_at = |at: usize| slot[at..at + 8].try_into().ok().map(u64::from_be_bytes);
    let generation = u64_at(8)?;
    let keyed = match data {
        DATA if u64_at(64)? != 0 => Some(KeyedMark {
            seq: u64_at(64)?,
            digest: slot[72..104].try_into().ok()?,
            mac: slot[104..136].try_into().ok()?,
        }),
        _ => None,
    };
    let mark = Mark {
        seq: u64_at(16)?,
        digest: slot[24..56].try_into().ok()?,
        moved_back_from: u64_at(56)?,
        keyed,
    };
    Some((generation, mark))
}

fn best_slot(bytes: &[u8]) -> Option<(u64, Mark)> {
    let size = if bytes.len() == 2 * SLOT_V1 || bytes.get(..8) == Some(MAGIC_V1.as_slice()) {
        SLOT_V1
    } else {
        SLOT
    };
    bytes
        .chunks(size)
        .take(2)
        .filter_map(decode)
        .max_by_key(|(generation, _)| *generation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn alternating_slots_survive_a_torn_write() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(AnchorFile::read(dir.path()).unwrap(), Found::Missing));
        let mut a = AnchorFile::open(dir.path()).unwrap();
        let first = Mark::of(7, b"seven");
        let second = Mark::of(8, b"eight");
        a.write(&first).unwrap();
        a.write(&second).unwrap();
        assert!(matches!(AnchorFile::read(dir.path()).unwrap(), Found::Mark(m) if m == second));
        // Tear the newer slot: the older one is still there.
        let path = AnchorFile::path_in(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[30] ^= 1; // generation 2 lives in slot 0
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(AnchorFile::read(dir.path()).unwrap(), Found::Mark(m) if m == first));
        // A reopened writer continues after the best generation.
        let mut a = AnchorFile::open(dir.path()).unwrap();
        a.write(&Mark::of(9, b"nine")).unwrap();
        assert!(matches!(AnchorFile::read(dir.path()).unwrap(), Found::Mark(m) if m.seq == 9));
        // Both slots spoiled: unreadable, never a guess.
        std::fs::write(&path, vec![0u8; 2 * SLOT]).unwrap();
        assert!(matches!(AnchorFile::read(dir.path()).unwrap(), Found::Unreadable));
    }

    #[test]
    fn a_v1_anchor_is_read_and_converted_with_its_mark() {
        let dir = tempfile::tempdir().unwrap();
        let path = AnchorFile::path_in(dir.path());
        // A v1 file as earlier versions wrote it: two 96-byte slots.
        let v1 = |generation: u64, seq: u64| {
            let mut out = [0u8; SLOT_V1];
            out[..8].copy_from_slice(MAGIC_V1);
            out[8..16].copy_from_slice(&generation.to_be_bytes());
            out[16..24].copy_from_slice(&seq.to_be_bytes());
            out[24..56].copy_from_slice(&[9; 32]);
            let check: [u8; 32] = Sha256::digest(&out[..64]).into();
            out[64..].copy_from_slice(&check);
            out
        };
        let mut bytes = v1(4, 40).to_vec();
        bytes.extend_from_slice(&v1(5, 41));
        std::fs::write(&path, &bytes).unwrap();
        let want = Mark {
            seq: 41,
            digest: [9; 32],
            moved_back_from: 0,
            keyed: None,
        };
        assert!(matches!(AnchorFile::read(dir.path()).unwrap(), Found::Mark(m) if m == want));
        let mut a = AnchorFile::open(dir.path()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len(), 2 * SLOT, "converted to v2");
        assert!(matches!(AnchorFile::read(dir.path()).unwrap(), Found::Mark(m) if m == want));
        let keyed = Mark {
            keyed: Some(KeyedMark {
                seq: 41,
                digest: [9; 32],
                mac: [1; 32],
            }),
            ..want
        };
        a.write(&keyed).unwrap();
        assert!(matches!(AnchorFile::read(dir.path()).unwrap(), Found::Mark(m) if m == keyed));
    }

    proptest! {
        #[test]
        fn any_single_flipped_bit_is_caught(
            seq in any::<u64>(),
            back in any::<u64>(),
            keyed in 1u64..,
            bit in 0usize..SLOT * 8,
        ) {
            let mark = Mark {
                seq,
                digest: Sha256::digest(seq.to_be_bytes()).into(),
                moved_back_from: back,
                keyed: Some(KeyedMark { seq: keyed, digest: [3; 32], mac: [4; 32] }),
            };
            let mut slot = encode(3, &mark);
            prop_assert_eq!(decode(&slot), Some((3, mark)));
            slot[bit / 8] ^= 1 << (bit % 8);
            prop_assert_eq!(decode(&slot), None);
        }
    }
}
