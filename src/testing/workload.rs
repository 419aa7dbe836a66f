//! A verifying workload: every write carries a pattern unique to it, and a
//! ledger remembers, per block, the last acknowledged write and any write
//! still in flight. Verification reads every block back and says, for each
//! mismatch, whether the data is an older write, a write in flight, or data
//! never written at all.

use std::collections::HashMap;
use std::time::Instant;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use nbd::client::{ClientError, NbdClient};

pub const BLOCK_BYTES: usize = 4096;
const WORDS_PER_BLOCK: usize = BLOCK_BYTES / 8;

/// A write's identity: (writer << 40) | sequence. Never 0 (0 = never written).
pub type Stamp = u64;

/// The bytes a block holds after the write `stamp`.
pub fn block_pattern(volume: u32, block: u64, stamp: Stamp) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(BLOCK_BYTES);
    bytes.extend_from_slice(&stamp.to_le_bytes());
    bytes.extend_from_slice(&block.to_le_bytes());
    let mut state = stamp ^ (block.wrapping_mul(0x9E37_79B9_7F4A_7C15)) ^ u64::from(volume) << 56;
    for _ in 2..WORDS_PER_BLOCK {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes
}

/// What the ledger knows of one block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockState {
    /// The last acknowledged write (0: never written).
    pub acked: Stamp,
    /// A write sent but not acknowledged when the writer stopped.
    pub in_flight: Option<Stamp>,
}

/// One writer's blocks on one volume.
#[derive(Debug, Clone)]
pub struct Ledger {
    pub volume: String,
    pub volume_id: u32,
    pub first_block: u64,
    pub blocks: u64,
    pub state: HashMap<u64, BlockState>,
    pub writes_acked: u64,
    pub bytes_acked: u64,
    pub latencies_us: Vec<u64>,
    /// Why the writer stopped early, if it did.
    pub stopped_by: Option<String>,
}

impl Ledger {
    /// Start write `stamp` of blocks `start..start + run`: its bytes. Until
    /// it is acknowledged each block may hold it or its last acknowledged
    /// write (the ledger keeps the latest one sent: a retry sends a newer).
    pub fn begin_write(&mut self, start: u64, run: u64, stamp: Stamp) -> Vec<u8> {
        let mut data = Vec::with_capacity(run as usize * BLOCK_BYTES);
        for block in start..start + run {
            data.extend_from_slice(&block_pattern(self.volume_id, block, stamp));
            self.state.entry(block).or_default().in_flight = Some(stamp);
        }
        data
    }

    /// Write `stamp` of blocks `start..start + run` was acknowledged.
    pub fn acknowledge(&mut self, start: u64, run: u64, stamp: Stamp) {
        for block in start..start + run {
            let state = self.state.entry(block).or_default();
            state.acked = stamp;
            state.in_flight = None;
        }
        self.writes_acked += 1;
        self.bytes_acked += run * BLOCK_BYTES as u64;
    }
}

/// Write random runs of blocks in `[first_block, first_block + blocks)` of
/// `volume` until `until`, recording every acknowledgement.
pub fn run_writer(
    client: &mut NbdClient,
    ledger: &mut Ledger,
    writer: u64,
    seed: u64,
    until: Instant,
    max_writes: u64,
) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut seq = 0u64;
    while Instant::now() < until && seq < max_writes {
        seq += 1;
        let stamp = (writer << 40) | seq;
        let run = rng.gen_range(1..=16u64).min(ledger.blocks);
        let start = ledger.first_block + rng.gen_range(0..=ledger.blocks - run);
        let fua = rng.gen_ratio(1, 16);
        let data = ledger.begin_write(start, run, stamp);
        let started = Instant::now();
        match client.write(start * BLOCK_BYTES as u64, &data, fua) {
            Ok(()) => {
                ledger
                    .latencies_us
                    .push(started.elapsed().as_micros() as u64);
                ledger.acknowledge(start, run, stamp);
            }
            Err(error) => {
                // The write may or may not have landed: it stays in flight.
                ledger.stopped_by = Some(error.to_string());
                return;
            }
        }
    }
}

/// The verdict on one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// An acknowledged write is gone: the block holds an older write.
    LostWrite {
        block: u64,
        expected: Stamp,
        found: Stamp,
    },
    /// The block holds bytes no write ever carried.
    NeverWritten { block: u64, expected: Stamp },
}

#[derive(Debug, Default, Clone)]
pub struct Verification {
    pub blocks_checked: u64,
    pub blocks_written: u64,
    /// Blocks that hold the write that was in flight (allowed).
    pub in_flight_landed: u64,
    pub mismatches: Vec<Mismatch>,
}

/// Read every block of `ledger` back through `client` and judge it.
pub fn verify(client: &mut NbdClient, ledger: &Ledger) -> Result<Verification, ClientError> {
    let mut result = Verification::default();
    let chunk_blocks = 16u64;
    let mut buf = vec![0u8; chunk_blocks as usize * BLOCK_BYTES];
    let mut block = ledger.first_block;
    let end = ledger.first_block + ledger.blocks;
    while block < end {
        let n = chunk_blocks.min(end - block);
        let bytes = &mut buf[..n as usize * BLOCK_BYTES];
        client.read(block * BLOCK_BYTES as u64, bytes)?;
        for i in 0..n {
            let b = block + i;
            let data = &bytes[i as usize * BLOCK_BYTES..(i as usize + 1) * BLOCK_BYTES];
            let state = ledger.state.get(&b).copied().unwrap_or_default();
            result.blocks_checked += 1;
            if state.acked != 0 {
                result.blocks_written += 1;
            }
            let matches = |stamp: Stamp| {
                if stamp == 0 {
                    data.iter().all(|&byte| byte == 0)
                } else {
                    data == block_pattern(ledger.volume_id, b, stamp).as_slice()
                }
            };
            if matches(state.acked) {
                continue;
            }
            if state.in_flight.is_some_and(matches) {
                result.in_flight_landed += 1;
                continue;
            }
            let found = Stamp::from_le_bytes(data[..8].try_into().expect("8 bytes"));
            let is_some_write = found != 0 && matches(found);
            result.mismatches.push(if is_some_write {
                Mismatch::LostWrite {
                    block: b,
                    expected: state.acked,
                    found,
                }
            } else {
                Mismatch::NeverWritten {
                    block: b,
                    expected: state.acked,
                }
            });
        }
        block += n;
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_unique_per_write_and_block() {
        let a = block_pattern(0, 5, 1);
        assert_eq!(a.len(), BLOCK_BYTES);
        assert_ne!(a, block_pattern(0, 5, 2));
        assert_ne!(a, block_pattern(0, 6, 1));
        assert_ne!(a, block_pattern(1, 5, 1));
        assert_eq!(a, block_pattern(0, 5, 1));
        assert_eq!(Stamp::from_le_bytes(a[..8].try_into().expect("8")), 1);
    }
}
