//! The NVLog: two-phase append, group-commit persist, halves and
//! consistency points, and recovery.
//!
//! # Appending
//!
//! [`Log::reserve`] is the suspendable phase: it waits (or, in its try and
//! timeout variants, gives up) until the log can guarantee room for the
//! record, and holds no lock while it waits. [`Log::append`] is the modify
//! phase: under one short lock it assigns the LSN and the position (so LSN
//! order is byte order, whatever the number of writers), copies the record
//! in, and never waits or fails for lack of space.
//!
//! ## Why a reservation always fits
//!
//! Let `S` be the bytes of all outstanding reservations, `rem` the free
//! bytes of the filling half, `H` the half length and `M` the largest
//! record. The log keeps the invariant
//!
//! > `S ≤ rem`, or the other half is free and `S + M ≤ rem + H`.
//!
//! A record that fits in `rem` keeps it. A record that does not fit (size
//! `r > rem`, so the second clause held) moves to the other half and wastes
//! the `rem < r ≤ M` bytes left behind; afterwards the remaining
//! reservations `S - r ≤ H - r` fit in the new half. Freeing a half only
//! weakens the condition, and a forced switch is allowed only when `S ≤ H`.
//!
//! # Header updates and mirroring
//!
//! Every state change of the halves rewrites the log header (see
//! [`crate::header`]). A switch to a new half is written to the header by
//! the first append into that half, before the record, and reported in
//! [`Appended::header_range`]: a caller that mirrors the header range before
//! the record range keeps the partner's mirror a valid log at every instant.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::header::{
    read_header, HalfMeta, HalfState, HeaderRead, LogHeader, HEADER_SLOT_BYTES, HEADER_SLOT_OFFSETS,
};
use crate::record::{self, encode_header, RecordData, RECORD_HEADER_BYTES};
use crate::region::{Geometry, Region, LOG_HEADER_BYTES};
use crate::scan::{ScanStop, Scanner};

/// The in-memory truth about one half; the header is its persisted echo.
#[derive(Debug, Clone, Copy)]
struct Half {
    state: HalfState,
    generation: u64,
    first_lsn: u64,
    /// LSN of the last record appended in this pass (0: none).
    last_lsn: u64,
    /// Bytes used from the half's start.
    used: u64,
    /// Bytes from the half's start known to be on stable media.
    persisted: u64,
}

impl Half {
    const FREE: Half = Half {
        state: HalfState::Free,
        generation: 0,
        first_lsn: 0,
        last_lsn: 0,
        used: 0,
        persisted: 0,
    };

    fn meta(&self) -> HalfMeta {
        if self.state == HalfState::Free {
            return HalfMeta::FREE;
        }
        HalfMeta {
            state: self.state,
            generation: self.generation,
            first_lsn: self.first_lsn,
        }
    }
}

#[derive(Debug)]
struct State {
    halves: [Half; 2],
    filling: usize,
    next_lsn: u64,
    flushed_lsn: u64,
    max_generation: u64,
    header_seq: u64,
    /// Bytes promised to outstanding reservations.
    reserved_bytes: u64,
    /// The filling half changed and the header does not say so yet; the
    /// next append writes it.
    switch_pending_header: bool,
    /// A header slot was written since the last persist.
    header_unpersisted: bool,
}

#[derive(Debug)]
struct PersistState {
    persisted_lsn: u64,
    flush_in_progress: bool,
    /// A persist failed: durability can no longer be promised, and the
    /// failure is never retried silently (a failed msync may have dropped
    /// the dirty pages).
    failed: Option<(std::io::ErrorKind, String)>,
}

/// A record that was appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub lsn: u64,
    /// Log-relative byte range of the record: mirror it to the same range of
    /// the partner's mirror area.
    pub range: Range<u64>,
    /// A header slot written by this append (a switch to a new half), to be
    /// mirrored before `range`.
    pub header_range: Option<Range<u64>>,
    /// The half this append closed (it was full): it needs a consistency point.
    pub closed_half: Option<usize>,
}

/// Log space promised to one record. Consumed by [`Log::append`]; dropping
/// it unused gives the space back.
#[derive(Debug)]
pub struct Reservation<'log> {
    log: &'log Log,
    len_bytes: u64,
    consumed: bool,
}

impl Reservation<'_> {
    /// Bytes reserved: the encoded length of the record.
    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.consumed {
            let mut state = self.log.state.lock();
            assert!(
                state.reserved_bytes >= self.len_bytes,
                "reservation returned twice"
            );
            state.reserved_bytes -= self.len_bytes;
            drop(state);
            self.log.space_freed.notify_all();
        }
    }
}

/// A header slot that was rewritten: mirror this range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderUpdate {
    pub range: Range<u64>,
}

/// One half as callers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HalfStatus {
    pub state: HalfState,
    pub generation: u64,
    pub first_lsn: u64,
    /// 0 when the half holds no record of this pass.
    pub last_lsn: u64,
    pub used_bytes: u64,
}

/// A snapshot of the log for status and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogStatus {
    pub halves: [HalfStatus; 2],
    pub filling: usize,
    pub next_lsn: u64,
    pub flushed_lsn: u64,
    pub persisted_lsn: u64,
    pub reserved_bytes: u64,
    pub half_len: u64,
}

/// What recovery found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The log was blank and has been formatted.
    pub formatted: bool,
    /// Records after the flushed LSN, to be replayed onto the volumes.
    pub records: u64,
    pub first_lsn: Option<u64>,
    pub last_lsn: Option<u64>,
    /// Where and why the scan stopped.
    pub stop: Option<ScanStop>,
    /// Bytes of torn tail zeroed so that no stale record can pass for a new one.
    pub zeroed_bytes: u64,
}

/// The persistent log of one node, in its region's local-log area.
#[derive(Debug)]
pub struct Log {
    region: Arc<Region>,
    geometry: Geometry,
    /// Region offset of the local log.
    base: u64,
    max_payload: usize,
    /// Bytes of the largest record: the waste bound at a half's end.
    max_record_bytes: u64,
    state: Mutex<State>,
    space_freed: Condvar,
    persist: Mutex<PersistState>,
    persist_done: Condvar,
}

impl Log {
    /// Open the log in `region`: format it if blank, else recover it (scan,
    /// zero the torn tail, rewrite and persist the header). Appends continue
    /// after the last valid record. The caller replays the records that
    /// [`Log::live_image`] yields onto its volumes.
    pub fn open(region: Arc<Region>) -> Result<(Log, Recovery)> {
        let geometry = region.geometry();
        let base = geometry.local_log_offset();
        let max_payload = geometry.max_payload_len();
        let image = region.snapshot(region.local_log());
        let span = tracing::info_span!("nvlog_recovery", node_id = region.node_id());
        let _entered = span.enter();

        let (state, recovery) = match read_header(&image) {
            HeaderRead::Blank => {
                let header = LogHeader::fresh(region.node_id(), geometry.half_len());
                let state =
                    State::from_header(&header, [0, 0], [0, 0], header.halves[0].first_lsn, 0);
                let recovery = Recovery {
                    formatted: true,
                    records: 0,
                    first_lsn: None,
                    last_lsn: None,
                    stop: None,
                    zeroed_bytes: 0,
                };
                (state, recovery)
            }
            HeaderRead::Corrupt { slot_a, slot_b } => {
                return Err(Error::LogHeaderCorrupt { slot_a, slot_b })
            }
            HeaderRead::Valid(header) => {
                if header.node_id != region.node_id() || header.half_len != geometry.half_len() {
                    return Err(Error::RegionMismatch {
                        found: format!(
                            "a log of node {} with {}-byte halves",
                            header.node_id, header.half_len
                        ),
                        expected: format!(
                            "node {} with {}-byte halves",
                            region.node_id(),
                            geometry.half_len()
                        ),
                    });
                }
                recover_state(&header, &image, geometry)?
            }
        };

        let log = Log {
            region,
            geometry,
            base,
            max_payload,
            max_record_bytes: record::encoded_len(max_payload) as u64,
            state: Mutex::new(state),
            space_freed: Condvar::new(),
            persist: Mutex::new(PersistState {
                persisted_lsn: 0,
                flush_in_progress: false,
                failed: None,
            }),
            persist_done: Condvar::new(),
        };
        log.finish_recovery(&recovery)?;
        tracing::info!(
            formatted = recovery.formatted,
            records = recovery.records,
            first_lsn = recovery.first_lsn,
            last_lsn = recovery.last_lsn,
            stop = recovery.stop.map(|s| s.reason.to_string()),
            zeroed_bytes = recovery.zeroed_bytes,
            "log recovered"
        );
        Ok((log, recovery))
    }

    /// Zero the torn tail, write the recovered header and make everything
    /// live durable, so that a crash during or after recovery recovers to
    /// the same log.
    fn finish_recovery(&self, recovery: &Recovery) -> Result<()> {
        let mut state = self.state.lock();
        let filling = state.filling;
        let tail_start = self.geometry.half_offset(filling) + state.halves[filling].used;
        let tail_len = self.geometry.half_len() - state.halves[filling].used;
        assert_eq!(
            recovery.zeroed_bytes,
            if recovery.formatted { 0 } else { tail_len },
            "recovery zeroes exactly the tail of the filling half"
        );
        if !recovery.formatted {
            self.region.fill(self.base + tail_start, tail_len, 0);
        }
        state.switch_pending_header = false;
        for half in 0..2 {
            let live = state.halves[half];
            if live.state.is_live() {
                self.region.persist(
                    self.base + self.geometry.half_offset(half),
                    self.geometry.half_len(),
                )?;
                state.halves[half].persisted = live.used;
            }
        }
        self.write_header_persisted(&mut state)?;
        let last_lsn = state.next_lsn - 1;
        drop(state);
        self.persist.lock().persisted_lsn = last_lsn;
        Ok(())
    }

    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The largest payload one record can carry.
    pub fn max_payload_len(&self) -> usize {
        self.max_payload
    }

    /// Suspendable phase: wait until the log can hold a record with
    /// `payload_len` bytes of payload. Holds no lock while waiting.
    pub fn reserve(&self, payload_len: usize) -> Result<Reservation<'_>> {
        self.reserve_until(payload_len, None, true)
    }

    /// Like [`Log::reserve`], but never waits: [`Error::WouldBlock`] when
    /// both halves are in use.
    pub fn try_reserve(&self, payload_len: usize) -> Result<Reservation<'_>> {
        self.reserve_until(payload_len, None, false)
    }

    /// Like [`Log::reserve`], giving up after `timeout`.
    pub fn reserve_timeout(
        &self,
        payload_len: usize,
        timeout: Duration,
    ) -> Result<Reservation<'_>> {
        self.reserve_until(payload_len, Some(Instant::now() + timeout), true)
    }

    fn reserve_until(
        &self,
        payload_len: usize,
        deadline: Option<Instant>,
        wait: bool,
    ) -> Result<Reservation<'_>> {
        if payload_len > self.max_payload {
            return Err(Error::RecordTooLarge {
                len_bytes: payload_len,
                max_bytes: self.max_payload,
            });
        }
        let len_bytes = record::encoded_len(payload_len) as u64;
        let started = Instant::now();
        let mut state = self.state.lock();
        loop {
            if self.would_fit(&state, state.reserved_bytes + len_bytes) {
                state.reserved_bytes += len_bytes;
                return Ok(Reservation {
                    log: self,
                    len_bytes,
                    consumed: false,
                });
            }
            if !wait {
                return Err(Error::WouldBlock {
                    len_bytes: len_bytes as usize,
                });
            }
            match deadline {
                None => self.space_freed.wait(&mut state),
                Some(deadline) => {
                    if self
                        .space_freed
                        .wait_until(&mut state, deadline)
                        .timed_out()
                    {
                        return Err(Error::ReserveTimeout {
                            len_bytes: len_bytes as usize,
                            waited_ms: started.elapsed().as_millis() as u64,
                        });
                    }
                }
            }
        }
    }

    /// The space invariant (module docs) with `reserved` outstanding bytes.
    fn would_fit(&self, state: &State, reserved: u64) -> bool {
        let half_len = self.geometry.half_len();
        let remaining = half_len - state.halves[state.filling].used;
        let other_free = state.halves[1 - state.filling].state == HalfState::Free;
        reserved <= remaining
            || (other_free && reserved + self.max_record_bytes <= remaining + half_len)
    }

    /// Modify phase: append `data` into the space `reservation` promised.
    /// Never waits, never fails for lack of space.
    pub fn append(&self, reservation: Reservation<'_>, data: &RecordData<'_>) -> Result<Appended> {
        self.append_then(reservation, data, |appended| appended.clone())
    }

    /// Append, then run `then` while the log's order lock is still held, so
    /// that whatever `then` does (posting the mirror write) happens in LSN
    /// order. `then` must not block.
    pub fn append_then<R>(
        &self,
        reservation: Reservation<'_>,
        data: &RecordData<'_>,
        then: impl FnOnce(&Appended) -> R,
    ) -> Result<R> {
        let appended = self.append_admitted(reservation, data, || true, then)?;
        Ok(appended.expect("admitted"))
    }

    /// Like [`Log::append_then`], but `admit` decides first, under the
    /// order lock, whether the record may still go in (its writer may have
    /// lost the right to write while it waited for space, and whatever
    /// revokes that right synchronizes with appends through this lock).
    /// `Ok(None)`, with the reservation returned, when it may not. `admit`
    /// must be short and must not call back into the log.
    pub fn append_admitted<R>(
        &self,
        mut reservation: Reservation<'_>,
        data: &RecordData<'_>,
        admit: impl FnOnce() -> bool,
        then: impl FnOnce(&Appended) -> R,
    ) -> Result<Option<R>> {
        assert!(
            std::ptr::eq(reservation.log, self),
            "reservation from another log"
        );
        record::validate(data, self.max_payload)?;
        let len_bytes = data.encoded_len() as u64;
        assert_eq!(
            len_bytes, reservation.len_bytes,
            "a reservation is for exactly one record of the reserved size"
        );
        let mut state = self.state.lock();
        assert!(
            state.reserved_bytes >= len_bytes,
            "reservation accounting broken"
        );
        state.reserved_bytes -= len_bytes;
        reservation.consumed = true;
        drop(reservation);
        if !admit() {
            drop(state);
            self.space_freed.notify_all();
            return Ok(None);
        }

        let half_len = self.geometry.half_len();
        let mut closed_half = None;
        if state.halves[state.filling].used + len_bytes > half_len {
            let closing = state.filling;
            let other = 1 - closing;
            assert_eq!(
                state.halves[other].state,
                HalfState::Free,
                "a reservation that does not fit the filling half needs the other half free"
            );
            self.open_next_half(&mut state);
            closed_half = Some(closing);
        }
        let header_range = if state.switch_pending_header {
            let range = self.write_header(&mut state)?;
            state.switch_pending_header = false;
            Some(range)
        } else {
            None
        };

        let filling = state.filling;
        let lsn = state.next_lsn;
        let half = &mut state.halves[filling];
        let start = self.geometry.half_offset(filling) + half.used;
        assert!(
            half.used + len_bytes <= half_len,
            "a reservation always fits (invariant)"
        );
        let header = encode_header(data, half.generation, lsn);
        let at = self.base + start;
        self.region.write(at, &header);
        self.region
            .write(at + RECORD_HEADER_BYTES as u64, data.payload);
        let padding = len_bytes - (RECORD_HEADER_BYTES + data.payload.len()) as u64;
        self.region.fill(
            at + (RECORD_HEADER_BYTES + data.payload.len()) as u64,
            padding,
            0,
        );
        half.used += len_bytes;
        half.last_lsn = lsn;
        state.next_lsn += 1;
        debug_assert!(self.would_fit(&state, state.reserved_bytes));

        let appended = Appended {
            lsn,
            range: start..start + len_bytes,
            header_range,
            closed_half,
        };
        Ok(Some(then(&appended)))
    }

    /// Run `f` while holding the log's order lock: no record is appended
    /// meanwhile. For callers whose own state must change atomically with
    /// respect to appends (a mirror resync switching sessions). `f` must be
    /// short and must not call back into the log.
    pub fn with_order_lock<R>(&self, f: impl FnOnce() -> R) -> R {
        let _state = self.state.lock();
        f()
    }

    /// Close the filling half and continue in the other one (for a timed
    /// consistency point). Returns the closed half, or `None` when there is
    /// nothing to close (the half is empty) or no room to switch (the other
    /// half is still in use, or outstanding reservations would not fit).
    pub fn switch_half(&self) -> Option<usize> {
        let mut state = self.state.lock();
        let closing = state.filling;
        if state.halves[closing].used == 0
            || state.halves[1 - closing].state != HalfState::Free
            || state.reserved_bytes > self.geometry.half_len()
        {
            return None;
        }
        self.open_next_half(&mut state);
        Some(closing)
    }

    /// Close the filling half, open the other one in a new generation. The
    /// header is written by the next append (before its record).
    fn open_next_half(&self, state: &mut State) {
        let closing = state.filling;
        let opening = 1 - closing;
        assert_eq!(state.halves[opening].state, HalfState::Free);
        state.halves[closing].state = HalfState::Closed;
        state.max_generation += 1;
        state.halves[opening] = Half {
            state: HalfState::Filling,
            generation: state.max_generation,
            first_lsn: state.next_lsn,
            last_lsn: 0,
            used: 0,
            persisted: 0,
        };
        state.filling = opening;
        state.switch_pending_header = true;
        tracing::debug!(
            closed_half = closing,
            opened_half = opening,
            generation = state.max_generation,
            first_lsn = state.next_lsn,
            "switched log half"
        );
    }

    /// A consistency point starts on `half`: mark it flushing.
    pub fn begin_flush(&self, half: usize) -> Result<HeaderUpdate> {
        let mut state = self.state.lock();
        expect_state(&state, half, HalfState::Closed)?;
        state.halves[half].state = HalfState::Flushing;
        let range = self.write_header_persisted(&mut state)?;
        Ok(HeaderUpdate { range })
    }

    /// The consistency point of `half` is done: its records are safe on the
    /// volumes. Free the half, advance the flushed LSN, persist the header.
    pub fn free_half(&self, half: usize) -> Result<HeaderUpdate> {
        let mut state = self.state.lock();
        expect_state(&state, half, HalfState::Flushing)?;
        let other = state.halves[1 - half];
        assert!(
            !(other.state == HalfState::Closed || other.state == HalfState::Flushing)
                || other.generation > state.halves[half].generation,
            "halves are freed oldest first"
        );
        if state.halves[half].last_lsn != 0 {
            state.flushed_lsn = state.halves[half].last_lsn;
        }
        state.halves[half] = Half::FREE;
        let range = self.write_header_persisted(&mut state)?;
        let flushed_lsn = state.flushed_lsn;
        drop(state);
        self.space_freed.notify_all();
        tracing::debug!(half, flushed_lsn, "log half freed");
        Ok(HeaderUpdate { range })
    }

    /// Forget every record: the volumes received them another way (the
    /// partner replayed this node's mirror at a takeover, and now hands the
    /// volumes back). Frees every live half, marks everything flushed, opens
    /// a fresh half in a new generation, and persists the header.
    /// [`Error::ReservationsOutstanding`] while a writer holds space: the
    /// caller fences the writers (so that [`Log::append_admitted`] turns
    /// them away) and tries again.
    pub fn discard_all(&self) -> Result<HeaderUpdate> {
        let mut state = self.state.lock();
        if state.reserved_bytes > 0 {
            return Err(Error::ReservationsOutstanding {
                reserved_bytes: state.reserved_bytes,
            });
        }
        state.flushed_lsn = state.next_lsn - 1;
        state.halves = [Half::FREE; 2];
        state.max_generation += 1;
        let filling = state.filling;
        state.halves[filling] = Half {
            state: HalfState::Filling,
            generation: state.max_generation,
            first_lsn: state.next_lsn,
            last_lsn: 0,
            used: 0,
            persisted: 0,
        };
        state.switch_pending_header = false;
        let range = self.write_header_persisted(&mut state)?;
        drop(state);
        self.space_freed.notify_all();
        tracing::info!("log discarded: its records reached the volumes through the partner");
        Ok(HeaderUpdate { range })
    }

    /// Write the next header slot from the in-memory state; returns its
    /// log-relative range.
    ///
    /// The slot written last must be durable before the other one is
    /// overwritten: a crash may tear any unpersisted bytes, and two torn
    /// slots would leave no valid header at all.
    fn write_header(&self, state: &mut State) -> Result<Range<u64>> {
        if state.header_unpersisted {
            let previous = HEADER_SLOT_OFFSETS[(state.header_seq % 2) as usize];
            self.region
                .persist(self.base + previous, HEADER_SLOT_BYTES as u64)?;
            state.header_unpersisted = false;
        }
        state.header_seq += 1;
        let header = LogHeader {
            node_id: self.region.node_id(),
            half_len: self.geometry.half_len(),
            seq: state.header_seq,
            flushed_lsn: state.flushed_lsn,
            max_generation: state.max_generation,
            halves: [state.halves[0].meta(), state.halves[1].meta()],
        };
        let offset = HEADER_SLOT_OFFSETS[header.slot()];
        self.region.write(self.base + offset, &header.encode());
        state.header_unpersisted = true;
        Ok(offset..offset + HEADER_SLOT_BYTES as u64)
    }

    /// Write the next header slot and make it durable at once.
    fn write_header_persisted(&self, state: &mut State) -> Result<Range<u64>> {
        let range = self.write_header(state)?;
        self.region
            .persist(self.base + range.start, range.end - range.start)?;
        state.header_unpersisted = false;
        Ok(range)
    }

    /// Return when every record up to `lsn` is on stable media. Concurrent
    /// callers share one flush: whoever finds no flush running flushes
    /// everything appended so far for all of them.
    pub fn persist(&self, lsn: u64) -> Result<()> {
        let mut persist = self.persist.lock();
        loop {
            if let Some((kind, message)) = &persist.failed {
                return Err(Error::Persist {
                    offset: 0,
                    end: 0,
                    source: std::io::Error::new(*kind, message.clone()),
                });
            }
            if persist.persisted_lsn >= lsn {
                return Ok(());
            }
            if persist.flush_in_progress {
                self.persist_done.wait(&mut persist);
                continue;
            }
            persist.flush_in_progress = true;
            drop(persist);
            let flushed = self.flush_appended(lsn);
            persist = self.persist.lock();
            persist.flush_in_progress = false;
            match flushed {
                Ok(target_lsn) => persist.persisted_lsn = persist.persisted_lsn.max(target_lsn),
                Err(Error::Persist {
                    offset,
                    end,
                    source,
                }) => {
                    tracing::error!(offset, end, error = %source, "persist failed; the log no longer promises durability");
                    persist.failed = Some((source.kind(), source.to_string()));
                    self.persist_done.notify_all();
                    return Err(Error::Persist {
                        offset,
                        end,
                        source,
                    });
                }
                Err(other) => {
                    self.persist_done.notify_all();
                    return Err(other);
                }
            }
            self.persist_done.notify_all();
        }
    }

    /// Flush everything appended so far; returns the LSN it covers.
    fn flush_appended(&self, lsn: u64) -> Result<u64> {
        let (target_lsn, ranges, header_seq_unpersisted) = {
            let state = self.state.lock();
            if lsn >= state.next_lsn {
                return Err(Error::LsnNotAppended {
                    lsn,
                    last_lsn: state.next_lsn - 1,
                });
            }
            let ranges: Vec<(usize, u64, u64, u64)> = (0..2)
                .filter(|&half| state.halves[half].state.is_live())
                .filter(|&half| state.halves[half].used > state.halves[half].persisted)
                .map(|half| {
                    let h = state.halves[half];
                    (half, h.generation, h.persisted, h.used)
                })
                .collect();
            // The flag is cleared only once the slot is durable, and only if
            // no newer header was written meanwhile.
            let header_seq_unpersisted = state.header_unpersisted.then_some(state.header_seq);
            (state.next_lsn - 1, ranges, header_seq_unpersisted)
        };
        let result = (|| {
            if header_seq_unpersisted.is_some() {
                self.region.persist(self.base, LOG_HEADER_BYTES)?;
            }
            for &(half, _, from, to) in &ranges {
                let start = self.base + self.geometry.half_offset(half) + from;
                self.region.persist(start, to - from)?;
            }
            Ok(())
        })();
        let mut state = self.state.lock();
        match result {
            Ok(()) => {
                if header_seq_unpersisted == Some(state.header_seq) {
                    state.header_unpersisted = false;
                }
                for (half, generation, _, to) in ranges {
                    let h = &mut state.halves[half];
                    if h.state.is_live() && h.generation == generation {
                        h.persisted = h.persisted.max(to);
                    }
                }
                Ok(target_lsn)
            }
            Err(error) => Err(error),
        }
    }

    /// The LSN every record up to which is known durable.
    pub fn persisted_lsn(&self) -> u64 {
        self.persist.lock().persisted_lsn
    }

    /// The LSN of the last appended record (0 if none ever).
    pub fn last_lsn(&self) -> u64 {
        self.state.lock().next_lsn - 1
    }

    pub fn status(&self) -> LogStatus {
        let state = self.state.lock();
        let halves = state.halves.map(|h| HalfStatus {
            state: h.state,
            generation: h.generation,
            first_lsn: h.first_lsn,
            last_lsn: h.last_lsn,
            used_bytes: h.used,
        });
        let status = LogStatus {
            halves,
            filling: state.filling,
            next_lsn: state.next_lsn,
            flushed_lsn: state.flushed_lsn,
            persisted_lsn: 0,
            reserved_bytes: state.reserved_bytes,
            half_len: self.geometry.half_len(),
        };
        drop(state);
        LogStatus {
            persisted_lsn: self.persisted_lsn(),
            ..status
        }
    }

    /// A copy of the whole local-log area, for [`Scanner`] (replay after
    /// recovery) or for re-mirroring the log to the partner.
    pub fn live_image(&self) -> Vec<u8> {
        self.region.snapshot(self.region.local_log())
    }

    /// Log-relative ranges that hold the log's state right now: the header
    /// block, and the used part of every live half with one record
    /// header's worth after it. Mirroring them brings a partner's mirror in
    /// sync (resync) without copying the rest of the halves.
    ///
    /// Why the bytes after the tail: the mirror may hold a longer history
    /// of the same half (records this log lost in a crash, at offsets it
    /// reuses, in the same generation), and a record there could pass for
    /// the next one. With the header-sized bytes after the tail copied too,
    /// the mirror's scan finds at the tail what the local scan finds (zero
    /// or a stale generation: the end; or a record being appended, whose
    /// own mirror write follows), and the scan never looks further.
    pub fn live_ranges(&self) -> Vec<Range<u64>> {
        self.live_ranges_locked(&self.state.lock())
    }

    /// [`Log::live_ranges`] together with `f`, both under the log's order
    /// lock: every record appended before `f` ran lies inside the ranges,
    /// every later one is appended after `f` (a resync switches sessions
    /// in `f`). `f` must be short and must not call back into the log.
    ///
    /// With `whole_filling_half`, the filling half goes to its end. The
    /// first resync after a recovery needs that: the partner's mirror may
    /// hold, past the recovered tail, records that were placed there before
    /// a crash and lost here. New records reuse their offsets and their
    /// LSNs, in the same generation; once the log grows past the guard, the
    /// mirror's scan would go on into them. Recovery zeroed that tail here,
    /// and the copy zeroes it there.
    pub fn live_ranges_with<R>(
        &self,
        whole_filling_half: bool,
        f: impl FnOnce() -> R,
    ) -> (Vec<Range<u64>>, R) {
        let state = self.state.lock();
        let mut ranges = self.live_ranges_locked(&state);
        if whole_filling_half {
            let start = self.geometry.half_offset(state.filling);
            let end = start + self.geometry.half_len();
            for range in &mut ranges {
                if range.start == start {
                    range.end = end;
                }
            }
        }
        (ranges, f())
    }

    fn live_ranges_locked(&self, state: &State) -> Vec<Range<u64>> {
        let header_block = std::iter::once(0..LOG_HEADER_BYTES);
        let halves = (0..2)
            .filter(|&half| state.halves[half].state.is_live())
            .map(|half| {
                let start = self.geometry.half_offset(half);
                let end = start + self.geometry.half_len();
                let guard = crate::record::RECORD_HEADER_BYTES as u64;
                start..(start + state.halves[half].used + guard).min(end)
            });
        header_block.chain(halves).collect()
    }
}

fn expect_state(state: &State, half: usize, expected: HalfState) -> Result<()> {
    assert!(half < 2, "a log has two halves, not {half}");
    let actual = state.halves[half].state;
    if actual != expected {
        return Err(Error::HalfState {
            half,
            state: actual.as_str(),
            expected: expected.as_str(),
        });
    }
    Ok(())
}

impl State {
    fn from_header(
        header: &LogHeader,
        used: [u64; 2],
        last_lsn: [u64; 2],
        next_lsn: u64,
        filling: usize,
    ) -> State {
        let halves = [0, 1].map(|half| {
            let meta = header.halves[half];
            if meta.state == HalfState::Free {
                Half::FREE
            } else {
                Half {
                    state: meta.state,
                    generation: meta.generation,
                    first_lsn: meta.first_lsn,
                    last_lsn: last_lsn[half],
                    used: used[half],
                    persisted: 0,
                }
            }
        });
        State {
            halves,
            filling,
            next_lsn,
            flushed_lsn: header.flushed_lsn,
            max_generation: header.max_generation,
            header_seq: header.seq,
            reserved_bytes: 0,
            switch_pending_header: false,
            header_unpersisted: false,
        }
    }
}

/// Rebuild the in-memory state from a scan of the log image.
fn recover_state(
    header: &LogHeader,
    image: &[u8],
    geometry: Geometry,
) -> Result<(State, Recovery)> {
    let mut scanner = Scanner::new(image)?;
    let mut used = [0u64; 2];
    let mut last_lsn = [0u64; 2];
    let mut records = 0;
    let mut first_lsn = None;
    for record in scanner.by_ref() {
        records += 1;
        first_lsn.get_or_insert(record.header.lsn);
        let half = ((record.log_offset - LOG_HEADER_BYTES) / geometry.half_len()) as usize;
        used[half] =
            record.log_offset + record.header.encoded_len() as u64 - geometry.half_offset(half);
        last_lsn[half] = record.header.lsn;
    }
    let stop = *scanner.stop().expect("the scanner ran to its end");
    // Records at or below the flushed LSN were skipped by the scanner but
    // still occupy their half: account for them via the stop position.
    let end_half = stop.half;
    used[end_half] = stop.offset - geometry.half_offset(end_half);
    let next_lsn = stop.expected_lsn;

    let mut recovered = *header;
    // A half switch raises max_generation in memory only: the header that
    // records it is written before the new half's first record, and
    // persisted with it or later. A crash (the page cache writing back
    // pages in any order) can keep records of the new generation while the
    // header that names it is lost; reused, that generation would let those
    // stale records pass for new ones with the same LSNs. Any two switches
    // are separated by a persisted header (freeing a half, discarding the
    // log, this recovery), so at most one generation past the header's was
    // handed out: skip it.
    recovered.max_generation = header.max_generation + 1;
    let live = header.live_halves();
    for &half in &live {
        if half == end_half {
            recovered.halves[half].state = HalfState::Filling;
        } else if live.first() == Some(&half) {
            // The scan went through this older half into the newer one: it
            // is complete and waits for a consistency point. A consistency
            // point that had not finished is simply done again (replaying
            // onto the volumes is idempotent).
            recovered.halves[half].state = HalfState::Closed;
        } else {
            // A newer half beyond the end of the log holds only a torn
            // tail; its generation is never reused (max_generation keeps
            // rising), so its bytes can never pass for records.
            recovered.halves[half] = HalfMeta::FREE;
            used[half] = 0;
        }
    }
    let zeroed_bytes = geometry.half_len() - used[end_half];
    let state = State::from_header(&recovered, used, last_lsn, next_lsn, end_half);
    let recovery = Recovery {
        formatted: false,
        records,
        first_lsn,
        last_lsn: scanner.last_lsn().filter(|&lsn| lsn > header.flushed_lsn),
        stop: Some(stop),
        zeroed_bytes,
    };
    Ok((state, recovery))
}
