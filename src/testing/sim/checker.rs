//! The checker: each volume as an array of blocks, and for each block what
//! a read may return.
//!
//! - A read returns the latest acknowledged write of the block, or a write
//!   issued after it that has not been acknowledged (in flight, failed, or
//!   cut short by a crash: its fate is unknown).
//! - So after any failover, every acknowledged write is readable unless a
//!   later one replaced it: the simulation reads every block after each
//!   takeover, restart and giveback.
//! - A forced takeover of an out-of-sync mirror is the one way acknowledged
//!   writes may go missing: the checker then accepts any write ever issued
//!   to the partner's blocks (or zeros) until each block is written again.
//! - Stale owners are caught by the simulated disks (see `disk`).

use std::collections::{BTreeMap, BTreeSet};

use crate::testing::workload::{block_pattern, BLOCK_BYTES};

#[derive(Debug, Default, Clone)]
struct Block {
    /// The latest acknowledged version (0: zeros, never written).
    acked: u64,
    /// Versions issued after `acked` whose fate is unknown.
    uncertain: BTreeSet<u64>,
    /// Every version ever issued (for reads after a forced takeover).
    issued: BTreeSet<u64>,
    /// A forced takeover may have lost writes to this block.
    forced: bool,
}

#[derive(Debug, Default)]
pub struct Checker {
    /// (volume id, block) → what it may hold.
    blocks: BTreeMap<(u32, u64), Block>,
    next_version: u64,
    pub acked_writes: u64,
    pub reads_checked: u64,
}

impl Checker {
    /// The version and the bytes of a new write to `block` of `volume`.
    pub fn next_write(&mut self, volume: u32, block: u64) -> (u64, Vec<u8>) {
        let version = self.next_version + 1;
        (version, block_pattern(volume, block, version))
    }

    /// The write went into a log: from now on it may be read.
    pub fn issued(&mut self, volume: u32, block: u64, version: u64) {
        assert!(version > self.next_version, "versions are issued in order");
        self.next_version = version;
        let entry = self.blocks.entry((volume, block)).or_default();
        entry.uncertain.insert(version);
        entry.issued.insert(version);
    }

    /// The write was acknowledged to the client.
    pub fn acked(&mut self, volume: u32, block: u64, version: u64) {
        let entry = self.blocks.entry((volume, block)).or_default();
        if version > entry.acked {
            entry.acked = version;
            entry.forced = false;
        }
        let acked = entry.acked;
        entry.uncertain.retain(|&v| v > acked);
        self.acked_writes += 1;
    }

    /// A forced takeover of `volumes`: what their mirror lacked is gone.
    pub fn forced_takeover(&mut self, volumes: &[u32]) {
        for ((volume, _), block) in self.blocks.iter_mut() {
            if volumes.contains(volume) {
                block.forced = true;
            }
        }
    }

    /// Check a read of `block` of `volume`; `Err` says what is wrong.
    pub fn check_read(&mut self, volume: u32, block: u64, data: &[u8]) -> Result<(), String> {
        assert_eq!(data.len(), BLOCK_BYTES);
        self.reads_checked += 1;
        let model = self
            .blocks
            .get(&(volume, block))
            .cloned()
            .unwrap_or_default();
        let found = identify(volume, block, data);
        let Some(version) = found else {
            return Err(format!(
                "volume {volume:#x} block {block}: bytes of no write ever issued to it \
                 (latest acked: version {}, uncertain: {:?})",
                model.acked, model.uncertain
            ));
        };
        let allowed = version == model.acked
            || (version > model.acked && model.uncertain.contains(&version))
            || (model.forced && (version == 0 || model.issued.contains(&version)));
        if allowed {
            return Ok(());
        }
        Err(format!(
            "volume {volume:#x} block {block}: read version {version}, but the latest acknowledged \
             write is version {} (unknown fate: {:?}){}",
            model.acked,
            model.uncertain,
            if version < model.acked {
                ": an acknowledged write was lost"
            } else {
                ""
            }
        ))
    }

    /// The versions issued to blocks of `volume`, for a full read-back.
    pub fn written_blocks(&self, volume: u32) -> Vec<u64> {
        self.blocks
            .range((volume, 0)..=(volume, u64::MAX))
            .map(|(&(_, block), _)| block)
            .collect()
    }
}

/// Which version `data` is, if it is one: 0 for zeros.
fn identify(volume: u32, block: u64, data: &[u8]) -> Option<u64> {
    if data.iter().all(|&byte| byte == 0) {
        return Some(0);
    }
    let stamp = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    (block_pattern(volume, block, stamp) == data).then_some(stamp)
}
