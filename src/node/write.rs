//! The write path, in its three phases:
//!
//! 1. `Node::suspendable_phase`: reserve log space, then send-queue
//!    slots. Holds no lock; may wait for a consistency point or for
//!    completions (or, for [`WhenFull::Refuse`], fail at once).
//! 2. `Node::modify_phase`, under the log's order lock (never blocks):
//!    LSN and position, record into the local log, the volume's dirty map,
//!    the mirror post. Doing all of it under one lock keeps the partner's
//!    mirror a prefix of the log and the dirty map in LSN order. A write
//!    whose volume was fenced while it waited is turned away here.
//! 3. `Node::wait_phase`: placed in the partner's mirror while the link
//!    is in sync (group completion), else "out of sync" in the mailbox and
//!    local persistence (group commit). `durability = "persist"`, FUA and
//!    FLUSH also wait for local persistence. Last, the volume's fence: a
//!    node that lost its volumes to a takeover acknowledges nothing more.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use interconnect::Reservation as SlotReservation;
use nvlog::{RecordData, Reservation as LogReservation};

use crate::config::Durability;
use crate::error::{Error, Result};
use crate::node::recovery::source_of;
use crate::node::{Node, PendingWrite};
use crate::storage::volume::Volume;

/// How often a writer waiting for log space looks at its volume's fence.
const FENCE_RECHECK_WHILE_WAITING: Duration = Duration::from_millis(50);

/// What the suspendable phase does when the log or the send queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Wait for a consistency point or for completions.
    Wait,
    /// Fail at once (`nvlog::Error::WouldBlock`,
    /// `interconnect::QueueError::NoFreeSlots`): the caller tries again later.
    Refuse,
}

/// What the suspendable phase reserved for one record.
struct Reserved<'log> {
    log: LogReservation<'log>,
    slots: Option<SlotReservation>,
}

impl Node {
    /// Write `data` at `offset` of `volume`; returns once acknowledged.
    pub fn write(&self, volume: &Arc<Volume>, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let started = Instant::now();
        let result = self
            .start_write(volume, offset, data, WhenFull::Wait)
            .and_then(|pending| self.finish_write(volume, pending, fua));
        match &result {
            Ok(()) => {
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .write_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                self.write_latency_us
                    .observe(started.elapsed().as_micros() as u64);
            }
            Err(_) => {
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// The suspendable and modify phases of a write: it is in the log and
    /// posted to the mirror, not yet acknowledged. `None` for an empty one.
    pub fn start_write(
        &self,
        volume: &Arc<Volume>,
        offset: u64,
        data: &[u8],
        when_full: WhenFull,
    ) -> Result<Option<PendingWrite>> {
        self.check_range(volume, offset, data.len() as u64)?;
        let max = self.log.max_payload_len().max(1);
        let mut last = None;
        for (chunk_index, chunk) in data.chunks(max).enumerate() {
            let chunk_offset = offset + (chunk_index * max) as u64;
            let record = RecordData::write(volume.id, chunk_offset, chunk);
            last = Some(self.log_one(volume, record, when_full)?);
        }
        Ok(last)
    }

    /// The wait phase of a write started with [`Node::start_write`].
    pub fn finish_write(
        &self,
        volume: &Volume,
        pending: Option<PendingWrite>,
        fua: bool,
    ) -> Result<()> {
        match pending {
            Some(pending) => self.wait_phase(volume, pending, fua),
            None => Ok(()),
        }
    }

    /// Zero `len` bytes at `offset`; `trim` also lets the space go.
    pub fn write_zeroes(
        &self,
        volume: &Arc<Volume>,
        offset: u64,
        len: u64,
        trim: bool,
        fua: bool,
    ) -> Result<()> {
        self.check_range(volume, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let data = if trim {
            RecordData::trim(volume.id, offset, len)
        } else {
            RecordData::write_zeroes(volume.id, offset, len)
        };
        let pending = self.log_one(volume, data, WhenFull::Wait)?;
        self.wait_phase(volume, pending, fua)
    }

    /// The suspendable and modify phases of one record.
    fn log_one(
        &self,
        volume: &Volume,
        data: RecordData<'_>,
        when_full: WhenFull,
    ) -> Result<PendingWrite> {
        self.check_not_failed()?;
        volume.fence.check()?;
        // Held from here to the append: a giveback closes the gate only
        // when no write to the volume is between its check and its append.
        let gate = volume.write_gate.read();
        if !*gate {
            return Err(Error::NoSuchVolume {
                name: volume.name.clone(),
            });
        }
        let reserved = self.suspendable_phase(volume, data.payload.len(), when_full)?;
        let (pending, closed_half) = self.modify_phase(volume, &data, reserved)?;
        drop(gate);
        if closed_half || self.over_threshold() {
            self.kick_consistency_point();
        }
        Ok(pending)
    }

    /// Phase 1: log space, then send-queue slots. The only phase that may
    /// wait, and it holds no lock while it does. A writer waiting for log
    /// space (consistency points stop once the volume is fenced) looks at
    /// the fence again every [`FENCE_RECHECK_WHILE_WAITING`], and once more
    /// when it gets the space: the volume may have changed hands meanwhile.
    fn suspendable_phase(
        &self,
        volume: &Volume,
        payload_len: usize,
        when_full: WhenFull,
    ) -> Result<Reserved<'_>> {
        let log = match when_full {
            WhenFull::Wait => {
                let mut waited = false;
                let reservation = loop {
                    match self
                        .log
                        .reserve_timeout(payload_len, FENCE_RECHECK_WHILE_WAITING)
                    {
                        Ok(reservation) => break reservation,
                        Err(nvlog::Error::ReserveTimeout { .. }) => {
                            waited = true;
                            self.check_not_failed()?;
                            volume.fence.check()?;
                        }
                        Err(error) => return Err(error.into()),
                    }
                };
                if waited {
                    volume.fence.check()?;
                }
                reservation
            }
            WhenFull::Refuse => self.log.try_reserve(payload_len)?,
        };
        let slots = self
            .mirror
            .reserve(log.len_bytes(), when_full == WhenFull::Wait)?;
        Ok(Reserved { log, slots })
    }

    /// Phase 2, under the log's order lock: the record, the dirty map and
    /// the mirror post, consuming what phase 1 reserved. Returns the
    /// pending write and whether the append closed a half.
    fn modify_phase(
        &self,
        volume: &Volume,
        data: &RecordData<'_>,
        reserved: Reserved<'_>,
    ) -> Result<(PendingWrite, bool)> {
        let Reserved {
            log: log_reservation,
            slots: mut slot_reservation,
        } = reserved;
        let local_log = self.region.local_log().offset;
        // A fence tripped by a giveback's return or a takeover synchronizes
        // with appends through the order lock: a writer that waited across
        // it is turned away here, never appended to a discarded log.
        let admit = || !volume.fence.is_tripped();
        let appended = self
            .log
            .append_admitted(log_reservation, data, admit, |appended| {
                let payload_at =
                    local_log + appended.range.start + nvlog::record::RECORD_HEADER_BYTES as u64;
                volume.extents.lock().insert(
                    data.offset,
                    data.extent_len,
                    appended.lsn,
                    source_of(data.kind, payload_at),
                );
                let posted = self.mirror.post(
                    slot_reservation.as_mut(),
                    appended.header_range.clone(),
                    appended.range.clone(),
                );
                let pending = PendingWrite {
                    lsn: appended.lsn,
                    posted,
                    resyncs_at_append: self.mirror.resyncs_started(),
                };
                (pending, appended.closed_half.is_some())
            })?;
        match appended {
            Some((pending, closed)) => Ok((pending, closed)),
            None => Err(volume
                .fence
                .check()
                .expect_err("turned away by a tripped fence")),
        }
    }

    /// Phase 3: acknowledge only once the record is safe in two failure
    /// domains, and only while this node still owns the volume.
    fn wait_phase(&self, volume: &Volume, pending: PendingWrite, fua: bool) -> Result<()> {
        let PendingWrite {
            lsn,
            posted,
            resyncs_at_append,
        } = pending;
        let placed = self.mirror.placed(posted);
        if (placed && self.mirror.in_sync()) || self.mirror.covers(resyncs_at_append) {
            if fua || self.config.durability == Durability::Persist {
                self.log.persist(lsn)?;
            }
            volume.fence.check()?;
            self.stats.acks_mirrored.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        // Persisted before the mark: once the mailbox says "out of sync",
        // every write acknowledged before is persisted here (a start after
        // an unclean stop trusts its own log then, see `ha::boot`).
        self.log
            .persist(lsn)
            .inspect_err(|error| self.fail(error.to_string()))?;
        self.mirror.mark_out_of_sync(
            &format!(
                "partner {} unreachable or resyncing; writes are acknowledged after local persistence",
                self.config.interconnect.partner
            ),
            placed,
            resyncs_at_append,
        )?;
        volume.fence.check()?;
        self.stats.acks_persisted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Every write acknowledged before this call is durable on return.
    pub fn flush(&self) -> Result<()> {
        self.check_not_failed()?;
        let last = self.log.last_lsn();
        if last > 0 {
            self.log
                .persist(last)
                .inspect_err(|error| self.fail(error.to_string()))?;
        }
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
