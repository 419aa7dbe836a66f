//! The log header: where a log stands (which halves hold live records, in
//! which generation, from which LSN; the last LSN flushed to the volumes).
//!
//! The header block is the first 4 KiB of a log area and holds two slots,
//! at offsets 0 and 2048, written alternately with a rising sequence
//! number. A torn header write spoils only the slot being written; readers
//! take the valid slot with the highest sequence number. The block is
//! mirrored to the partner like records, so the partner's takeover reads the
//! same header from its mirror.
//!
//! Slot layout (little-endian):
//!
//! | offset | size | field                                                   |
//! |-------:|-----:|---------------------------------------------------------|
//! |      0 |    8 | magic `NVLOGHD1`                                        |
//! |      8 |    2 | format version (1)                                      |
//! |     10 |    2 | reserved, zero                                          |
//! |     12 |    4 | node id                                                 |
//! |     16 |    8 | half length in bytes                                    |
//! |     24 |    8 | sequence number of this header write                    |
//! |     32 |    8 | flushed LSN: every record up to it is on the volumes    |
//! |     40 |    8 | highest generation ever handed to a half                |
//! |     48 |   24 | half 0: state (1 byte, 7 reserved), generation, first LSN |
//! |     72 |   24 | half 1: same                                            |
//! |     96 |   28 | reserved, zero                                          |
//! |    124 |    4 | CRC32C of bytes 0..124                                  |

use std::fmt;

pub const LOG_HEADER_MAGIC: [u8; 8] = *b"NVLOGHD1";
pub const LOG_HEADER_VERSION: u16 = 1;
pub const HEADER_SLOT_BYTES: usize = 128;
/// Log-relative offsets of the two header slots.
pub const HEADER_SLOT_OFFSETS: [u64; 2] = [0, 2048];
const CRC_AT: usize = 124;

const _: () = assert!(CRC_AT + 4 == HEADER_SLOT_BYTES);
const _: () = assert!(HEADER_SLOT_OFFSETS[1] as usize >= HEADER_SLOT_BYTES);
const _: () = assert!(
    HEADER_SLOT_OFFSETS[1] as usize + HEADER_SLOT_BYTES <= crate::region::LOG_HEADER_BYTES as usize
);

/// The life of a half: Free → Filling → Closed → Flushing → Free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfState {
    /// Holds no live record; may be filled next.
    Free,
    /// Appends go here.
    Filling,
    /// Full (or switched away from); waits for a consistency point.
    Closed,
    /// A consistency point is writing its records to the volumes.
    Flushing,
}

impl HalfState {
    fn code(self) -> u8 {
        match self {
            HalfState::Free => 0,
            HalfState::Filling => 1,
            HalfState::Closed => 2,
            HalfState::Flushing => 3,
        }
    }

    fn from_code(code: u8) -> Option<HalfState> {
        Some(match code {
            0 => HalfState::Free,
            1 => HalfState::Filling,
            2 => HalfState::Closed,
            3 => HalfState::Flushing,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HalfState::Free => "free",
            HalfState::Filling => "filling",
            HalfState::Closed => "closed",
            HalfState::Flushing => "flushing",
        }
    }

    /// Whether the half may hold records not yet on the volumes.
    pub fn is_live(self) -> bool {
        self != HalfState::Free
    }
}

impl fmt::Display for HalfState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One half as the header records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HalfMeta {
    pub state: HalfState,
    /// The pass of this half: every record in it carries this generation.
    pub generation: u64,
    /// LSN of the first record in this pass of the half.
    pub first_lsn: u64,
}

impl HalfMeta {
    pub const FREE: HalfMeta = HalfMeta {
        state: HalfState::Free,
        generation: 0,
        first_lsn: 0,
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogHeader {
    pub node_id: u32,
    pub half_len: u64,
    pub seq: u64,
    pub flushed_lsn: u64,
    pub max_generation: u64,
    pub halves: [HalfMeta; 2],
}

impl LogHeader {
    /// The header of a freshly formatted log: half 0 filling from LSN 1.
    pub fn fresh(node_id: u32, half_len: u64) -> LogHeader {
        LogHeader {
            node_id,
            half_len,
            seq: 1,
            flushed_lsn: 0,
            max_generation: 1,
            halves: [
                HalfMeta {
                    state: HalfState::Filling,
                    generation: 1,
                    first_lsn: 1,
                },
                HalfMeta::FREE,
            ],
        }
    }

    /// The slot this header is written to: slots alternate with `seq`.
    pub fn slot(&self) -> usize {
        (self.seq % 2) as usize
    }

    /// Live halves, oldest generation first: the order to scan them in.
    pub fn live_halves(&self) -> Vec<usize> {
        let mut live: Vec<usize> = (0..2)
            .filter(|&half| self.halves[half].state.is_live())
            .collect();
        live.sort_by_key(|&half| self.halves[half].generation);
        live
    }

    pub fn encode(&self) -> [u8; HEADER_SLOT_BYTES] {
        let mut slot = [0u8; HEADER_SLOT_BYTES];
        slot[0..8].copy_from_slice(&LOG_HEADER_MAGIC);
        slot[8..10].copy_from_slice(&LOG_HEADER_VERSION.to_le_bytes());
        slot[12..16].copy_from_slice(&self.node_id.to_le_bytes());
        slot[16..24].copy_from_slice(&self.half_len.to_le_bytes());
        slot[24..32].copy_from_slice(&self.seq.to_le_bytes());
        slot[32..40].copy_from_slice(&self.flushed_lsn.to_le_bytes());
        slot[40..48].copy_from_slice(&self.max_generation.to_le_bytes());
        for (index, half) in self.halves.iter().enumerate() {
            let at = 48 + index * 24;
            slot[at] = half.state.code();
            slot[at + 8..at + 16].copy_from_slice(&half.generation.to_le_bytes());
            slot[at + 16..at + 24].copy_from_slice(&half.first_lsn.to_le_bytes());
        }
        let crc = crc32c::crc32c(&slot[..CRC_AT]);
        slot[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        slot
    }

    /// Decode one slot; `Err` says why it is not a valid header.
    pub fn decode(slot: &[u8; HEADER_SLOT_BYTES]) -> Result<LogHeader, &'static str> {
        if slot.iter().all(|&byte| byte == 0) {
            return Err("never written");
        }
        if slot[0..8] != LOG_HEADER_MAGIC {
            return Err("bad magic");
        }
        let stored_crc = u32::from_le_bytes(slot[CRC_AT..].try_into().expect("4 bytes"));
        if crc32c::crc32c(&slot[..CRC_AT]) != stored_crc {
            return Err("checksum mismatch");
        }
        if u16::from_le_bytes([slot[8], slot[9]]) != LOG_HEADER_VERSION {
            return Err("unknown format version");
        }
        let u64_at = |at: usize| u64::from_le_bytes(slot[at..at + 8].try_into().expect("8 bytes"));
        let mut halves = [HalfMeta::FREE; 2];
        for (index, half) in halves.iter_mut().enumerate() {
            let at = 48 + index * 24;
            *half = HalfMeta {
                state: HalfState::from_code(slot[at]).ok_or("unknown half state")?,
                generation: u64_at(at + 8),
                first_lsn: u64_at(at + 16),
            };
        }
        let header = LogHeader {
            node_id: u32::from_le_bytes(slot[12..16].try_into().expect("4 bytes")),
            half_len: u64_at(16),
            seq: u64_at(24),
            flushed_lsn: u64_at(32),
            max_generation: u64_at(40),
            halves,
        };
        // The same rule that built the region: a header that passed its CRC
        // can still describe halves no region could have (found by fuzzing:
        // a huge half length overflowed the scanner's size arithmetic).
        if crate::region::Geometry::new(header.half_len).is_err() {
            return Err("half length out of range");
        }
        let live = header.live_halves();
        if live.is_empty() {
            return Err("no live half");
        }
        if live
            .iter()
            .any(|&half| header.halves[half].generation > header.max_generation)
        {
            return Err("half generation above the maximum");
        }
        if live.len() == 2 && header.halves[0].generation == header.halves[1].generation {
            return Err("both halves in one generation");
        }
        Ok(header)
    }
}

/// What the header block of a log image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderRead {
    /// Both slots are all zeros: a log that was never written (a fresh
    /// region, or a mirror the partner never wrote to).
    Blank,
    /// The newest valid slot.
    Valid(LogHeader),
    /// Neither slot is valid, and the block is not blank: with the reasons.
    Corrupt {
        slot_a: &'static str,
        slot_b: &'static str,
    },
}

/// Read the newer valid header slot from a log image's header block.
pub fn read_header(image: &[u8]) -> HeaderRead {
    let decoded: Vec<Result<LogHeader, &'static str>> = HEADER_SLOT_OFFSETS
        .iter()
        .map(|&offset| {
            let start = offset as usize;
            match image.get(start..start + HEADER_SLOT_BYTES) {
                Some(bytes) => LogHeader::decode(bytes.try_into().expect("slot size")),
                None => Err("image too short"),
            }
        })
        .collect();
    let newest = decoded
        .iter()
        .filter_map(|slot| slot.as_ref().ok())
        .max_by_key(|header| header.seq);
    match (newest, &decoded[0], &decoded[1]) {
        (Some(header), _, _) => HeaderRead::Valid(*header),
        (None, Err("never written"), Err("never written")) => HeaderRead::Blank,
        (None, a, b) => HeaderRead::Corrupt {
            slot_a: a.err().unwrap_or("valid"),
            slot_b: b.err().unwrap_or("valid"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_detects_every_flip() {
        let mut header = LogHeader::fresh(3, 1 << 20);
        header.halves[1] = HalfMeta {
            state: HalfState::Closed,
            generation: 7,
            first_lsn: 1000,
        };
        header.max_generation = 8;
        header.halves[0].generation = 8;
        let slot = header.encode();
        assert_eq!(LogHeader::decode(&slot), Ok(header));
        for byte in 0..HEADER_SLOT_BYTES {
            let mut flipped = slot;
            flipped[byte] ^= 0x10;
            assert!(
                LogHeader::decode(&flipped).is_err(),
                "flip at byte {byte} went unnoticed"
            );
        }
    }

    #[test]
    fn a_checksummed_header_with_impossible_halves_is_refused() {
        // A CRC only proves the bytes are as written, not that they make
        // sense: half lengths no region could have are refused.
        for half_len in [0, 4096, (1 << 16) + 1, u64::MAX / 2 + 1, u64::MAX] {
            let slot = LogHeader::fresh(1, half_len).encode();
            assert_eq!(
                LogHeader::decode(&slot),
                Err("half length out of range"),
                "half_len {half_len}"
            );
        }
    }

    #[test]
    fn newest_valid_slot_wins_and_torn_slot_falls_back() {
        let mut image = vec![0u8; 4096];
        assert_eq!(read_header(&image), HeaderRead::Blank);
        let first = LogHeader::fresh(1, 1 << 16);
        let mut second = first;
        second.seq = 2;
        second.flushed_lsn = 10;
        for header in [first, second] {
            let at = HEADER_SLOT_OFFSETS[header.slot()] as usize;
            image[at..at + HEADER_SLOT_BYTES].copy_from_slice(&header.encode());
        }
        assert_eq!(read_header(&image), HeaderRead::Valid(second));
        // Tear the newer slot: the older one is used.
        let at = HEADER_SLOT_OFFSETS[second.slot()] as usize;
        image[at + 40] ^= 0xff;
        assert_eq!(read_header(&image), HeaderRead::Valid(first));
        // Tear both: corrupt, with reasons.
        let at = HEADER_SLOT_OFFSETS[first.slot()] as usize;
        image[at] ^= 0xff;
        assert!(matches!(read_header(&image), HeaderRead::Corrupt { .. }));
    }
}
