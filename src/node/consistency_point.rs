//! Consistency points: the data of a closed log half goes to the volume
//! files, they are synced, and the half is freed here and in the partner's
//! mirror. One runs when a half closes, when the filling half crosses the
//! threshold, on the timer, and whenever recovery, a giveback or a
//! shutdown needs the log flushed.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nvlog::HalfState;

use crate::error::{Error, Result};
use crate::node::Node;

impl Node {
    pub(super) fn over_threshold(&self) -> bool {
        let status = self.log.status();
        let used = status.halves[status.filling].used_bytes;
        used * 100 >= status.half_len * u64::from(self.config.consistency_point.threshold_percent)
    }

    pub(super) fn kick_consistency_point(&self) {
        self.cp_signal.lock().kicked = true;
        self.cp_wake.notify_all();
    }

    /// The consistency-point thread: on a kick (a half closed, or the
    /// threshold was crossed) or on the timer.
    pub fn run_consistency_points(&self) {
        let interval = Duration::from_millis(self.config.consistency_point.interval_ms);
        let mut last_cp = Instant::now();
        loop {
            {
                let mut signal = self.cp_signal.lock();
                if !signal.kicked && !signal.stopping {
                    let deadline = last_cp + interval;
                    self.cp_wake.wait_until(&mut signal, deadline);
                }
                if signal.stopping {
                    return;
                }
                signal.kicked = false;
            }
            let timer_due = last_cp.elapsed() >= interval;
            if !self.consistency_point_tick(timer_due) {
                return;
            }
            if timer_due {
                last_cp = Instant::now();
            }
        }
    }

    /// One round of the consistency-point thread; false once the node has
    /// failed (a consistency point that failed is never retried: the
    /// kernel may have dropped what it could not write).
    pub fn consistency_point_tick(&self, timer_due: bool) -> bool {
        match self.consistency_point_step(timer_due) {
            Ok(()) => true,
            Err(Error::Fenced { volumes_of, .. }) => {
                // The records for the fenced volumes stay in the log; the
                // new owner has them from its mirror.
                tracing::warn!(volumes_of, "consistency point stopped: fenced");
                if let Some(hooks) = self.hooks() {
                    hooks.fenced();
                }
                true
            }
            Err(error) => {
                self.fail(format!("consistency point failed: {error}"));
                false
            }
        }
    }

    /// Flush closed halves; close the filling one when the timer or the
    /// threshold says so.
    fn consistency_point_step(&self, timer_due: bool) -> Result<()> {
        let _one_at_a_time = self.cp_lock.lock();
        if self.hooks().is_some_and(|hooks| hooks.log_is_stale()) {
            return Ok(());
        }
        self.flush_closed_halves()?;
        let status = self.log.status();
        let filling_used = status.halves[status.filling].used_bytes;
        if filling_used > 0 && (timer_due || self.over_threshold()) {
            if let Some(half) = self.log.switch_half() {
                self.consistency_point_half(half)?;
            }
        }
        Ok(())
    }

    fn flush_closed_halves(&self) -> Result<()> {
        loop {
            let status = self.log.status();
            let oldest_closed = (0..2)
                .filter(|&half| status.halves[half].state == HalfState::Closed)
                .min_by_key(|&half| status.halves[half].generation);
            match oldest_closed {
                Some(half) => self.consistency_point_half(half)?,
                None => return Ok(()),
            }
        }
    }

    /// Flush everything logged: both halves (shutdown, after recovery,
    /// before a giveback).
    pub fn consistency_point_all(&self) -> Result<()> {
        let _one_at_a_time = self.cp_lock.lock();
        self.flush_closed_halves()?;
        if let Some(half) = self.log.switch_half() {
            self.consistency_point_half(half)?;
        }
        Ok(())
    }

    /// One consistency point: write the half's extents to the volume files,
    /// fdatasync, then free the half here and in the partner's mirror.
    fn consistency_point_half(&self, half: usize) -> Result<()> {
        // Whoever asked (the consistency-point thread, recovery, a giveback,
        // a shutdown), a consistency point that failed for another reason
        // than a fence fails the node: its half stays half-written and is
        // never freed nor retried in this life (a failed fsync may have
        // dropped the data), and nothing may treat the log as flushed.
        self.write_half(half).inspect_err(|error| {
            if !matches!(error, Error::Fenced { .. }) {
                self.fail(format!("consistency point failed: {error}"));
            }
        })
    }

    fn write_half(&self, half: usize) -> Result<()> {
        let started = Instant::now();
        let status = self.log.status().halves[half];
        let span = tracing::info_span!(
            "consistency_point",
            half,
            first_lsn = status.first_lsn,
            last_lsn = status.last_lsn
        );
        let _entered = span.enter();
        let update = self.log.begin_flush(half)?;
        self.mirror.post_header(update.range);
        let mut bytes = 0u64;
        if status.last_lsn != 0 {
            let lsns = status.first_lsn..status.last_lsn + 1;
            let mut buffer = Vec::new();
            for volume in self.volumes() {
                let _file = volume.file_lock.lock();
                let pieces = volume.extents.lock().written_by(lsns.clone());
                if pieces.is_empty() {
                    continue;
                }
                bytes += volume.write_pieces(&pieces, &self.region, &mut buffer)?;
                volume.sync()?;
            }
        }
        // The transport may still be reading this half's bytes for posts in
        // flight; the half is reused only once they are placed.
        self.mirror.wait_all_placed();
        if status.last_lsn != 0 {
            for volume in self.volumes() {
                volume.extents.lock().remove_through(status.last_lsn);
            }
        }
        // The extents this consistency point skipped were replaced by newer
        // records, maybe in the next half and not yet persisted: persist
        // them before the half goes, or a crash would lose the newer record
        // and, with the half, the older one. See CHANGELOG.md.
        let newest = self.log.last_lsn();
        if newest > 0 {
            self.log.persist(newest)?;
        }
        // After a takeover, the index must forget mirror extents that writes
        // in this half replaced, before the half (and so those writes' only
        // record outside the files) is freed.
        if let Some(hooks) = self.hooks() {
            hooks.before_half_freed()?;
        }
        let update = self.log.free_half(half)?;
        self.mirror.post_header(update.range);
        let elapsed_us = started.elapsed().as_micros() as u64;
        self.stats
            .consistency_points
            .fetch_add(1, Ordering::Relaxed);
        self.stats
            .consistency_point_us_total
            .fetch_add(elapsed_us, Ordering::Relaxed);
        tracing::debug!(bytes, elapsed_us, "consistency point done");
        Ok(())
    }
}
