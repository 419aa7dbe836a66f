//! The takeover index: which ranges of the partner's volumes have newer
//! data in the partner's mirror than in their files, and where. Built by
//! scanning the mirror at takeover, persisted in the survivor's data
//! directory, and rewritten as the replay and consistency points shrink
//! it, so a survivor that crashes during replay resumes from it without
//! scanning the mirror again.
//!
//! Layout (little-endian):
//!
//! | offset | size | field                                   |
//! |-------:|-----:|-----------------------------------------|
//! |      0 |    8 | magic `NVMIDX01`                        |
//! |      8 |    4 | partner node id                         |
//! |     12 |    4 | reserved, zero                          |
//! |     16 |    8 | ownership epoch of the takeover         |
//! |     24 |    8 | entry count N                           |
//! |     32 | 40·N | entries                                 |
//! |   end  |    4 | CRC32C of everything before it          |
//!
//! Entry: volume id (4), source kind (1: 0 region, 1 zero, 2 hole),
//! reserved (3), start (8), length (8), partner LSN (8), region offset (8).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fsutil::{read_small, write_atomically};
use crate::storage::extents::Source;

const MAGIC: [u8; 8] = *b"NVMIDX01";
const HEADER_BYTES: usize = 32;
const ENTRY_BYTES: usize = 40;
/// An index never holds more entries than a log holds records; this bound
/// only stops a corrupt count from allocating the machine away.
const MAX_ENTRIES: u64 = 1 << 26;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub volume_id: u32,
    pub start: u64,
    pub len: u64,
    pub lsn: u64,
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakeoverIndex {
    pub partner: u32,
    pub epoch: u64,
    pub entries: Vec<IndexEntry>,
}

pub fn index_path(data_dir: &Path, partner: u32) -> PathBuf {
    data_dir.join(format!("takeover-node-{partner}.index"))
}

impl TakeoverIndex {
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_BYTES + self.entries.len() * ENTRY_BYTES + 4);
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&self.partner.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&self.epoch.to_le_bytes());
        bytes.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for entry in &self.entries {
            let (kind, offset) = match entry.source {
                Source::Region { offset } => (0u8, offset),
                Source::Zero => (1, 0),
                Source::Hole => (2, 0),
            };
            bytes.extend_from_slice(&entry.volume_id.to_le_bytes());
            bytes.extend_from_slice(&[kind, 0, 0, 0]);
            bytes.extend_from_slice(&entry.start.to_le_bytes());
            bytes.extend_from_slice(&entry.len.to_le_bytes());
            bytes.extend_from_slice(&entry.lsn.to_le_bytes());
            bytes.extend_from_slice(&offset.to_le_bytes());
        }
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// Decode and check an index; `Err` says what is wrong.
    pub fn decode(bytes: &[u8]) -> std::result::Result<TakeoverIndex, String> {
        if bytes.len() < HEADER_BYTES + 4 {
            return Err(format!("{} bytes is too short for an index", bytes.len()));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err("checksum mismatch".into());
        }
        if body[..8] != MAGIC {
            return Err("bad magic".into());
        }
        let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
        let count = u64_at(24);
        if count > MAX_ENTRIES
            || body.len() as u64 != HEADER_BYTES as u64 + count * ENTRY_BYTES as u64
        {
            return Err(format!(
                "entry count {count} does not match the {} bytes of the index",
                body.len()
            ));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for index in 0..count as usize {
            let at = HEADER_BYTES + index * ENTRY_BYTES;
            let source = match body[at + 4] {
                0 => Source::Region {
                    offset: u64_at(at + 32),
                },
                1 => Source::Zero,
                2 => Source::Hole,
                kind => return Err(format!("entry {index}: unknown source kind {kind}")),
            };
            let entry = IndexEntry {
                volume_id: u32_at(at),
                start: u64_at(at + 8),
                len: u64_at(at + 16),
                lsn: u64_at(at + 24),
                source,
            };
            if entry.len == 0 || entry.start.checked_add(entry.len).is_none() {
                return Err(format!("entry {index}: empty or overflowing range"));
            }
            entries.push(entry);
        }
        Ok(TakeoverIndex {
            partner: u32_at(8),
            epoch: u64_at(16),
            entries,
        })
    }

    /// Write the index durably (replacing the previous one).
    pub fn save(&self, data_dir: &Path) -> Result<()> {
        write_atomically(&index_path(data_dir, self.partner), &self.encode())
    }

    /// The persisted index of a takeover of `partner`, if there is one.
    pub fn load(data_dir: &Path, partner: u32) -> Result<Option<TakeoverIndex>> {
        let path = index_path(data_dir, partner);
        let Some(bytes) = read_small(
            &path,
            HEADER_BYTES as u64 + MAX_ENTRIES * ENTRY_BYTES as u64 + 4,
        )?
        else {
            return Ok(None);
        };
        TakeoverIndex::decode(&bytes)
            .map(Some)
            .map_err(|reason| Error::Corrupt { path, reason })
    }

    pub fn remove(data_dir: &Path, partner: u32) -> Result<()> {
        let path = index_path(data_dir, partner);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Io {
                what: "removing a takeover index",
                path,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fixtures::example_index;

    #[test]
    fn round_trip_and_every_flip_detected() {
        let index = example_index();
        let bytes = index.encode();
        assert_eq!(TakeoverIndex::decode(&bytes), Ok(index));
        for at in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x01;
            assert!(TakeoverIndex::decode(&flipped).is_err(), "flip at {at}");
        }
        for cut in 0..bytes.len() {
            assert!(
                TakeoverIndex::decode(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn save_load_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(TakeoverIndex::load(dir.path(), 2).expect("load"), None);
        example_index().save(dir.path()).expect("save");
        assert_eq!(
            TakeoverIndex::load(dir.path(), 2).expect("load"),
            Some(example_index())
        );
        TakeoverIndex::remove(dir.path(), 2).expect("remove");
        assert_eq!(TakeoverIndex::load(dir.path(), 2).expect("load"), None);
    }
}
