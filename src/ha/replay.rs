//! The background replay after a takeover: the partner's mirrored
//! extents go to its volume files, a batch at a time, each batch synced
//! and then dropped from the persisted index. It never writes over data
//! written since the takeover: consistency points and the replay write a
//! volume's file one at a time, each from a fresh snapshot of the extents.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::ha::{HaNode, Holding};
use crate::node::spawn;

/// Bytes the replay writes between index saves.
const REPLAY_BATCH_BYTES: u64 = 8 << 20;

impl HaNode {
    /// Start the background replay of the partner's mirror onto its files.
    pub fn spawn_replay(self: &Arc<Self>) -> JoinHandle<()> {
        let ha = self.clone();
        spawn("replay", move || {
            if let Err(error) = ha.replay() {
                tracing::error!(%error, "replay of the partner's mirror stopped");
            }
        })
    }

    pub(super) fn replay(&self) -> Result<()> {
        let Some(holding) = self.state.lock().holding.clone() else {
            return Ok(());
        };
        let span = tracing::info_span!(
            "replay",
            partner = holding.ownership.volumes_of,
            log = "mirror"
        );
        let _entered = span.enter();
        let mut buffer = Vec::new();
        let rate = self
            .node
            .config
            .ha
            .replay_max_bytes_per_s
            .map(|rate| rate.0);
        let batch_bytes = rate.map_or(REPLAY_BATCH_BYTES, |rate| {
            (rate / 8).clamp(4096, REPLAY_BATCH_BYTES)
        });
        let started = Instant::now();
        loop {
            if self.node.is_stopping() {
                return Ok(());
            }
            if let Some(rate) = rate {
                // Sleep until the bytes done so far fit the rate.
                let done = self.replay_done_bytes.load(Ordering::Acquire);
                let due = Duration::from_secs_f64(done as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait.min(Duration::from_millis(200)));
                    continue;
                }
            }
            if !self.replay_batch(&holding, &mut buffer, batch_bytes)? {
                break;
            }
        }
        self.finish_replay(&holding)
    }

    /// One step of the replay, for [`ReplayDriver::Caller`](crate::ha::ReplayDriver::Caller): a batch of at most
    /// `batch_bytes`, or the end of the replay. False once nothing is left.
    pub fn replay_step(&self, batch_bytes: u64) -> Result<bool> {
        if !self.replay_pending() {
            return Ok(false);
        }
        let Some(holding) = self.state.lock().holding.clone() else {
            return Ok(false);
        };
        if self.replay_batch(&holding, &mut Vec::new(), batch_bytes)? {
            return Ok(true);
        }
        self.finish_replay(&holding)?;
        Ok(false)
    }

    /// Write up to `batch_bytes` of mirrored extents of one volume to its file,
    /// sync it, forget those extents and save the index. False if none is left.
    pub(super) fn replay_batch(
        &self,
        holding: &Holding,
        buffer: &mut Vec<u8>,
        batch_bytes: u64,
    ) -> Result<bool> {
        for volume in &holding.volumes {
            let written = {
                let _file = volume.file_lock.lock();
                let pieces = volume.extents.lock().mirror_pieces(batch_bytes);
                if pieces.is_empty() {
                    continue;
                }
                let written = volume.write_pieces(&pieces, &self.node.region, buffer)?;
                volume.sync()?;
                let mut extents = volume.extents.lock();
                for piece in &pieces {
                    extents.remove_mirror_piece(piece);
                }
                written
            };
            self.replay_done_bytes.fetch_add(written, Ordering::AcqRel);
            self.save_holding_index(holding)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Everything mirrored is in the partner's files: the index goes empty
    /// (kept until the giveback: it says the takeover completed).
    pub(super) fn finish_replay(&self, holding: &Holding) -> Result<()> {
        self.save_holding_index(holding)?;
        self.replay_active.store(false, Ordering::Release);
        let mut state = self.state.lock();
        if let Some(times) = state.last_takeover.as_mut() {
            times.replay_ms = Some(times.started.elapsed().as_millis() as u64);
        }
        tracing::info!(
            bytes = self.replay_done_bytes.load(Ordering::Acquire),
            "replay of the partner's mirror done"
        );
        Ok(())
    }
}
