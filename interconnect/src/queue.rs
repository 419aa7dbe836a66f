//! The send queue: a fixed number of slots, each one work request in flight,
//! handed out by reservation.
//!
//! A write goes through three phases (see DESIGN.md, "The write path"):
//!
//! 1. **Suspendable**: `reserve(n)` may wait for `n` free slots. The writer
//!    holds no lock that completions need, so waiting here cannot deadlock.
//! 2. **Modify**: under the node's log lock, `Reservation::post` assigns the
//!    `WriteId` and hands the work request to the transport. It never blocks
//!    and never fails: the slots are already the writer's.
//! 3. **Wait**: outside any lock, `wait_placed(id)` until the partner's
//!    mirror holds every write up to `id`. One condition variable wakes all
//!    waiters per completion batch: group completion.
//!
//! Slot accounting (`SlotPool`) is checked by assertions that stay on in
//! release builds: reserved + in flight never exceeds the capacity, a post
//! never exceeds its reservation, a slot is released exactly once.
//!
//! Failure: the transport calls `Completions::failed`; every slot in flight
//! is reclaimed, every write not yet placed is lost (its waiters get
//! `QueueError::WriteLost`), reserve waiters get `Error::Disconnected`. Posts made
//! with reservations taken earlier still succeed and are recorded as lost at
//! once. `SendQueue::reconnect` installs a new transport (a new session);
//! completions from the old one are ignored by generation.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::ControlMessage;
use crate::sync::{lock, wait, wait_timeout, Condvar, Mutex, MutexGuard};
use crate::transport::{
    CompletionSink, Completions, Transport, TransportLimits, WorkRequest, WriteId,
};
use crate::{Error, QueueError};

/// A write to mirror: `len_bytes` at `src_offset` of the local log memory
/// go to `dst_offset` of the partner's mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MirrorWrite {
    /// Offset of the bytes in the local log memory.
    pub src_offset: u64,
    /// Offset in the partner's mirror (for a log mirrored byte for byte,
    /// the same as `src_offset`).
    pub dst_offset: u64,
    /// Length; a post of more than the transport's largest work request is
    /// split and needs [`SendQueue::slots_for`] slots.
    pub len_bytes: u64,
}

/// How many failed sessions' lost ranges the queue remembers, to answer
/// `wait_placed` for writes posted long ago. Beyond that the answer is the
/// conservative `WriteOutcomeForgotten`.
const LOST_HISTORY_MAX: usize = 64;

/// The fixed pool of slots. Slot `id % capacity` belongs to work request
/// `id`: the ids in flight are consecutive and at most `capacity` many, so
/// they never share a slot.
#[derive(Debug)]
struct SlotPool {
    busy: Vec<bool>,
    /// Slots promised to live reservations, not yet posted.
    reserved: usize,
    /// Slots whose work request is posted and not completed.
    in_flight: usize,
}

impl SlotPool {
    fn new(capacity: usize) -> Self {
        assert!(capacity > 0);
        Self {
            busy: vec![false; capacity],
            reserved: 0,
            in_flight: 0,
        }
    }

    fn capacity(&self) -> usize {
        self.busy.len()
    }

    fn free(&self) -> usize {
        self.assert_within_capacity();
        self.capacity() - self.reserved - self.in_flight
    }

    fn assert_within_capacity(&self) {
        assert!(
            self.reserved + self.in_flight <= self.capacity(),
            "slot accounting broken: {} reserved + {} in flight > capacity {}",
            self.reserved,
            self.in_flight,
            self.capacity()
        );
    }

    fn try_reserve(&mut self, slots: usize) -> bool {
        if self.free() < slots {
            return false;
        }
        self.reserved += slots;
        self.assert_within_capacity();
        true
    }

    fn unreserve(&mut self, slots: usize) {
        assert!(
            slots <= self.reserved,
            "returning {slots} slots but only {} are reserved",
            self.reserved
        );
        self.reserved -= slots;
    }

    /// Moves one reserved slot in flight for work request `id`.
    fn occupy(&mut self, id: u64) -> usize {
        assert!(self.reserved > 0, "post without a reserved slot");
        let slot = self.slot_of(id);
        assert!(!self.busy[slot], "slot {slot} occupied twice (write {id})");
        self.busy[slot] = true;
        self.reserved -= 1;
        self.in_flight += 1;
        self.assert_within_capacity();
        slot
    }

    /// Frees the slot of completed work request `id`.
    fn release(&mut self, id: u64) -> usize {
        let slot = self.slot_of(id);
        assert!(self.busy[slot], "slot {slot} released twice (write {id})");
        assert!(self.in_flight > 0);
        self.busy[slot] = false;
        self.in_flight -= 1;
        slot
    }

    /// Frees every slot in flight (the connection failed); returns how many.
    fn reclaim_in_flight(&mut self) -> usize {
        let busy = self.busy.iter().filter(|busy| **busy).count();
        assert_eq!(
            busy, self.in_flight,
            "busy slots disagree with the in-flight count"
        );
        self.busy.iter_mut().for_each(|busy| *busy = false);
        self.in_flight = 0;
        busy
    }

    fn slot_of(&self, id: u64) -> usize {
        (id % self.capacity() as u64) as usize
    }
}

/// Writes a failed session never placed.
#[derive(Debug)]
struct LostRange {
    first: u64,
    last: u64,
    session: u64,
    cause: Arc<Error>,
}

#[derive(Debug)]
struct State {
    transport: Arc<dyn Transport>,
    session: u64,
    /// Bumped on every reconnect; completions of older generations are ignored.
    generation: u64,
    /// Set when the current session failed; cleared by a reconnect.
    failure: Option<Arc<Error>>,
    slots: SlotPool,
    /// The id the next work request gets.
    next_id: u64,
    /// Every id up to this one is placed or lost. The ids above it, up to
    /// `next_id - 1`, are exactly the work requests in flight.
    resolved_through: u64,
    lost: VecDeque<LostRange>,
    /// Lost ranges evicted from `lost` ended here.
    forgotten_through: u64,
}

impl State {
    fn assert_consistent(&self) {
        assert!(self.resolved_through < self.next_id);
        assert_eq!(
            (self.next_id - 1 - self.resolved_through) as usize,
            self.slots.in_flight,
            "the unresolved ids must be exactly the work requests in flight"
        );
    }

    fn record_lost(&mut self, first: u64, last: u64, cause: Arc<Error>) {
        assert!(first <= last);
        if let Some(previous) = self.lost.back_mut() {
            if previous.last + 1 == first && previous.session == self.session {
                previous.last = last;
                return;
            }
        }
        self.lost.push_back(LostRange {
            first,
            last,
            session: self.session,
            cause,
        });
        if self.lost.len() > LOST_HISTORY_MAX {
            let evicted = self.lost.pop_front().expect("history is not empty");
            self.forgotten_through = evicted.last;
        }
    }

    /// The fate of a resolved write.
    fn outcome(&self, id: u64) -> Result<(), Error> {
        assert!(id <= self.resolved_through);
        if let Some(range) = self.lost.iter().find(|r| r.first <= id && id <= r.last) {
            return Err(QueueError::WriteLost {
                id,
                session: range.session,
                cause: Arc::clone(&range.cause),
            }
            .into());
        }
        if id <= self.forgotten_through {
            return Err(QueueError::WriteOutcomeForgotten { id }.into());
        }
        Ok(())
    }

    /// Fails the current session: reclaims the slots in flight and marks
    /// every unplaced write lost. Returns false if it had already failed.
    fn fail(&mut self, cause: Arc<Error>) -> bool {
        if self.failure.is_some() {
            return false;
        }
        let reclaimed = self.slots.reclaim_in_flight();
        let first = self.resolved_through + 1;
        let last = self.next_id - 1;
        if first <= last {
            self.record_lost(first, last, Arc::clone(&cause));
        }
        self.resolved_through = last;
        tracing::warn!(
            session = self.session,
            reclaimed_slots = reclaimed,
            lost_writes = last + 1 - first,
            error = %cause,
            "interconnect session failed"
        );
        self.failure = Some(cause);
        self.assert_consistent();
        true
    }
}

#[derive(Debug)]
struct Shared {
    capacity: usize,
    /// Fixed for the queue's life so that `slots_for` answers stay true
    /// across reconnects.
    limits: TransportLimits,
    /// Held from id assignment to hand-off to the transport, so work
    /// requests reach the transport in id order.
    post_order: Mutex<()>,
    state: Mutex<State>,
    /// Signalled when slots are freed or the session fails.
    slot_freed: Condvar,
    /// Signalled when `resolved_through` advances.
    placed_advanced: Condvar,
}

impl Shared {
    fn notify_all(&self) {
        self.slot_freed.notify_all();
        self.placed_advanced.notify_all();
    }

    fn fail(&self, generation: u64, cause: Arc<Error>) {
        let mut state = lock(&self.state);
        if state.generation != generation {
            return;
        }
        if state.fail(cause) {
            drop(state);
            self.notify_all();
        }
    }

    fn slots_for(&self, len_bytes: u64) -> usize {
        let max = u64::from(self.limits.max_write_len_bytes);
        usize::try_from(len_bytes.div_ceil(max)).expect("slot count fits usize")
    }
}

/// The queue's side of one session's [`Completions`]: calls after that
/// session failed or was replaced are ignored.
struct SessionCompletions {
    shared: Arc<Shared>,
    generation: u64,
}

impl CompletionSink for SessionCompletions {
    fn placed_through(&self, id: WriteId) {
        let mut state = lock(&self.shared.state);
        if state.generation != self.generation || state.failure.is_some() {
            return;
        }
        let id = id.get();
        if id <= state.resolved_through {
            return;
        }
        assert!(
            id < state.next_id,
            "transport completed write {id} but only {} were posted",
            state.next_id - 1
        );
        for done in state.resolved_through + 1..=id {
            let slot = state.slots.release(done);
            tracing::trace!(write_id = done, slot, "write placed");
        }
        state.resolved_through = id;
        state.assert_consistent();
        drop(state);
        self.shared.notify_all();
    }

    fn failed(&self, error: Arc<Error>) {
        self.shared.fail(self.generation, error);
    }
}

fn session_completions(shared: &Arc<Shared>, generation: u64) -> Completions {
    Completions::new(
        Arc::new(SessionCompletions {
            shared: Arc::clone(shared),
            generation,
        }),
        generation,
    )
}

/// Slots promised to one writer; consumed by posts, the rest given back when
/// dropped.
#[must_use = "a reservation holds send-queue slots until it is posted or dropped"]
pub struct Reservation {
    shared: Arc<Shared>,
    remaining: usize,
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

impl Reservation {
    /// Slots not yet consumed by posts.
    pub fn remaining(&self) -> usize {
        self.remaining
    }

    /// Posts a mirror write. Never blocks and never fails: if the
    /// connection is down, the write is lost at once and `wait_placed`
    /// reports it.
    ///
    /// Posts are handed to the transport in `WriteId` order; the node posts
    /// under its log lock so that this is also log order and the partner's
    /// mirror is always a prefix of the log.
    ///
    /// # Panics
    ///
    /// If the write needs more slots than the reservation holds, is empty,
    /// or lies outside the local log or the partner's mirror.
    pub fn post(&mut self, write: MirrorWrite) -> WriteId {
        let shared = Arc::clone(&self.shared);
        let limits = shared.limits;
        assert!(write.len_bytes > 0, "empty mirror write");
        let needed = shared.slots_for(write.len_bytes);
        assert!(
            needed <= self.remaining,
            "a post of {} bytes needs {needed} slots but the reservation holds {}",
            write.len_bytes,
            self.remaining
        );
        let src_end = write.src_offset.checked_add(write.len_bytes);
        assert!(
            src_end.is_some_and(|end| end <= limits.local_len_bytes),
            "mirror write source {write:?} lies outside the {}-byte local log",
            limits.local_len_bytes
        );
        let dst_end = write.dst_offset.checked_add(write.len_bytes);
        assert!(
            dst_end.is_some_and(|end| end <= limits.remote_len_bytes),
            "mirror write destination {write:?} lies outside the {}-byte partner mirror",
            limits.remote_len_bytes
        );
        self.remaining -= needed;

        let _order = lock(&shared.post_order);
        let mut state = lock(&shared.state);
        let first = state.next_id;
        let last = first + needed as u64 - 1;
        state.next_id = last + 1;
        if let Some(cause) = state.failure.clone() {
            state.slots.unreserve(needed);
            assert_eq!(state.resolved_through, first - 1);
            state.record_lost(first, last, cause);
            state.resolved_through = last;
            state.assert_consistent();
            tracing::debug!(
                write_id = last,
                session = state.session,
                "write posted while disconnected: lost"
            );
            return WriteId::new(last);
        }
        for id in first..=last {
            let slot = state.slots.occupy(id);
            tracing::trace!(write_id = id, slot, session = state.session, "write posted");
        }
        state.assert_consistent();
        let transport = Arc::clone(&state.transport);
        drop(state);

        let max_len = u64::from(limits.max_write_len_bytes);
        let mut done = 0;
        for id in first..=last {
            let len = max_len.min(write.len_bytes - done);
            transport.post_write(WorkRequest {
                id: WriteId::new(id),
                src_offset: write.src_offset + done,
                dst_offset: write.dst_offset + done,
                len_bytes: u32::try_from(len).expect("bounded by max_write_len_bytes"),
            });
            done += len;
        }
        assert_eq!(done, write.len_bytes);
        WriteId::new(last)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.remaining == 0 {
            return;
        }
        let mut state = lock(&self.shared.state);
        state.slots.unreserve(self.remaining);
        self.remaining = 0;
        drop(state);
        self.shared.slot_freed.notify_all();
    }
}

/// The fixed-slot send queue in front of one transport at a time.
pub struct SendQueue {
    shared: Arc<Shared>,
}

impl fmt::Debug for SendQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock(&self.shared.state);
        f.debug_struct("SendQueue")
            .field("capacity", &self.shared.capacity)
            .field("session", &state.session)
            .field("reserved", &state.slots.reserved)
            .field("in_flight", &state.slots.in_flight)
            .field("posted", &(state.next_id - 1))
            .field("resolved_through", &state.resolved_through)
            .field("failed", &state.failure.is_some())
            .finish()
    }
}

fn check_limits(capacity: usize, limits: &TransportLimits) -> Result<(), Error> {
    if capacity == 0 {
        return Err(QueueError::NoSlots.into());
    }
    if capacity > limits.max_in_flight {
        return Err(QueueError::TooManySlots {
            requested: capacity,
            max: limits.max_in_flight,
        }
        .into());
    }
    if limits.max_write_len_bytes == 0 {
        return Err(Error::InvalidConfig {
            reason: "the transport's largest work request is 0 bytes".into(),
        });
    }
    Ok(())
}

impl SendQueue {
    /// A queue of `slots` slots in front of `transport`.
    ///
    /// Refuses more slots than the transport can keep in flight.
    pub fn new(transport: Arc<dyn Transport>, slots: usize) -> Result<Self, Error> {
        let limits = transport.limits();
        check_limits(slots, &limits)?;
        let session = transport.session();
        let shared = Arc::new(Shared {
            capacity: slots,
            limits,
            post_order: Mutex::new(()),
            state: Mutex::new(State {
                transport: Arc::clone(&transport),
                session,
                generation: 0,
                failure: None,
                slots: SlotPool::new(slots),
                next_id: 1,
                resolved_through: 0,
                lost: VecDeque::new(),
                forgotten_through: 0,
            }),
            slot_freed: Condvar::new(),
            placed_advanced: Condvar::new(),
        });
        transport.attach(session_completions(&shared, 0));
        tracing::info!(session, slots, "send queue ready");
        Ok(Self { shared })
    }

    /// Replaces the connection with a new one (a new session). The old one
    /// is failed if it was not already (its writes in flight are lost) and
    /// closed; its late completions are ignored. Reservations held across
    /// the reconnect stay valid.
    pub fn reconnect(&self, transport: Arc<dyn Transport>) -> Result<(), Error> {
        let limits = transport.limits();
        let queue = &self.shared.limits;
        check_limits(self.shared.capacity, &limits)?;
        for (what, needed, new) in [
            (
                "largest work request in bytes",
                u64::from(queue.max_write_len_bytes),
                u64::from(limits.max_write_len_bytes),
            ),
            (
                "local log length in bytes",
                queue.local_len_bytes,
                limits.local_len_bytes,
            ),
            (
                "partner mirror length in bytes",
                queue.remote_len_bytes,
                limits.remote_len_bytes,
            ),
        ] {
            if new < needed {
                return Err(QueueError::TransportTooSmall {
                    what,
                    queue: needed,
                    new,
                }
                .into());
            }
        }

        let _order = lock(&self.shared.post_order);
        let mut state = lock(&self.shared.state);
        let old_session = state.session;
        state.fail(Arc::new(Error::Superseded));
        assert_eq!(state.slots.in_flight, 0);
        state.generation += 1;
        state.failure = None;
        state.session = transport.session();
        let generation = state.generation;
        let old = std::mem::replace(&mut state.transport, Arc::clone(&transport));
        drop(state);
        self.shared.notify_all();
        old.close();
        transport.attach(session_completions(&self.shared, generation));
        tracing::info!(
            old_session,
            session = transport.session(),
            "send queue reconnected"
        );
        Ok(())
    }

    /// Ends the current session on purpose (an operator's or a drill's
    /// interconnect cut): it fails as a lost connection would (every waiter
    /// gets an error, slots in flight are reclaimed) and the transport is
    /// closed. [`reconnect`](Self::reconnect) starts a new session.
    pub fn disconnect(&self) {
        let _order = lock(&self.shared.post_order);
        let mut state = lock(&self.shared.state);
        if state.failure.is_none() {
            state.fail(Arc::new(Error::Closed));
        }
        let transport = Arc::clone(&state.transport);
        drop(state);
        self.shared.notify_all();
        transport.close();
        tracing::info!("send queue disconnected on request");
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Slots neither reserved nor in flight.
    pub fn free_slots(&self) -> usize {
        lock(&self.shared.state).slots.free()
    }

    /// Work requests posted and not yet completed.
    pub fn in_flight(&self) -> usize {
        lock(&self.shared.state).slots.in_flight
    }

    /// Slots held by live reservations.
    pub fn reserved(&self) -> usize {
        lock(&self.shared.state).slots.reserved
    }

    /// The current session.
    pub fn session(&self) -> u64 {
        lock(&self.shared.state).session
    }

    /// Why the current session failed, if it did.
    pub fn failure(&self) -> Option<Arc<Error>> {
        lock(&self.shared.state).failure.clone()
    }

    /// The last `WriteId` handed out.
    pub fn posted(&self) -> WriteId {
        WriteId::new(lock(&self.shared.state).next_id - 1)
    }

    /// Every write up to this id is resolved: placed, or reported lost by
    /// `wait_placed`. While the session is healthy and no write was ever
    /// lost, that is "placed".
    pub fn placed(&self) -> WriteId {
        WriteId::new(lock(&self.shared.state).resolved_through)
    }

    /// The limits the queue was built for.
    pub fn limits(&self) -> TransportLimits {
        self.shared.limits
    }

    /// Slots a post of `len_bytes` consumes (one per largest work request).
    pub fn slots_for(&self, len_bytes: u64) -> usize {
        self.shared.slots_for(len_bytes).max(1)
    }

    /// Waits until `slots` slots are free and reserves them. Fails at once,
    /// or as soon as it happens while waiting, if the connection is down.
    pub fn reserve(&self, slots: usize) -> Result<Reservation, Error> {
        self.reserve_until(slots, None)
    }

    /// Like [`reserve`](Self::reserve), giving up after `timeout`.
    pub fn reserve_timeout(&self, slots: usize, timeout: Duration) -> Result<Reservation, Error> {
        self.reserve_until(slots, Some((Instant::now(), timeout)))
    }

    /// Reserves `slots` slots if they are free now; never waits.
    pub fn try_reserve(&self, slots: usize) -> Result<Reservation, Error> {
        self.check_request(slots)?;
        let mut state = lock(&self.shared.state);
        if let Some(cause) = &state.failure {
            return Err(Error::Disconnected {
                session: state.session,
                cause: Arc::clone(cause),
            });
        }
        if !state.slots.try_reserve(slots) {
            return Err(QueueError::NoFreeSlots {
                requested: slots,
                free: state.slots.free(),
            }
            .into());
        }
        Ok(self.reservation(slots))
    }

    fn check_request(&self, slots: usize) -> Result<(), Error> {
        assert!(slots > 0, "a reservation of zero slots");
        if slots > self.shared.capacity {
            return Err(QueueError::ReservationTooLarge {
                requested: slots,
                capacity: self.shared.capacity,
            }
            .into());
        }
        Ok(())
    }

    fn reservation(&self, slots: usize) -> Reservation {
        Reservation {
            shared: Arc::clone(&self.shared),
            remaining: slots,
        }
    }

    fn reserve_until(
        &self,
        slots: usize,
        deadline: Option<(Instant, Duration)>,
    ) -> Result<Reservation, Error> {
        self.check_request(slots)?;
        let mut state = lock(&self.shared.state);
        loop {
            if let Some(cause) = &state.failure {
                return Err(Error::Disconnected {
                    session: state.session,
                    cause: Arc::clone(cause),
                });
            }
            if state.slots.try_reserve(slots) {
                return Ok(self.reservation(slots));
            }
            state = match deadline {
                None => wait(&self.shared.slot_freed, state),
                Some((started, timeout)) => {
                    let waited = started.elapsed();
                    if waited >= timeout {
                        return Err(QueueError::ReserveTimedOut {
                            requested: slots,
                            waited_ms: waited.as_millis() as u64,
                        }
                        .into());
                    }
                    wait_timeout(&self.shared.slot_freed, state, timeout - waited)
                }
            };
        }
    }

    /// Waits until write `id` (and so every write before it) is placed in
    /// the partner's mirror; `Err(WriteLost)` if its connection failed first.
    ///
    /// # Panics
    ///
    /// If `id` was never posted.
    pub fn wait_placed(&self, id: WriteId) -> Result<(), Error> {
        self.wait_placed_until(id, None)
    }

    /// Like [`wait_placed`](Self::wait_placed), giving up after `timeout`.
    pub fn wait_placed_timeout(&self, id: WriteId, timeout: Duration) -> Result<(), Error> {
        self.wait_placed_until(id, Some((Instant::now(), timeout)))
    }

    fn wait_placed_until(
        &self,
        id: WriteId,
        deadline: Option<(Instant, Duration)>,
    ) -> Result<(), Error> {
        let mut state: MutexGuard<'_, State> = lock(&self.shared.state);
        assert!(
            id.get() < state.next_id,
            "waiting for write {id}, which was never posted (last posted: {})",
            state.next_id - 1
        );
        loop {
            if id.get() <= state.resolved_through {
                return state.outcome(id.get());
            }
            state = match deadline {
                None => wait(&self.shared.placed_advanced, state),
                Some((started, timeout)) => {
                    let waited = started.elapsed();
                    if waited >= timeout {
                        return Err(QueueError::PlacedTimedOut {
                            id: id.get(),
                            waited_ms: waited.as_millis() as u64,
                        }
                        .into());
                    }
                    wait_timeout(&self.shared.placed_advanced, state, timeout - waited)
                }
            };
        }
    }

    /// Sends a control message on the current connection, in order after the
    /// writes posted before it.
    pub fn send_control(&self, message: &ControlMessage) -> Result<(), Error> {
        let state = lock(&self.shared.state);
        if let Some(cause) = &state.failure {
            return Err(Error::Disconnected {
                session: state.session,
                cause: Arc::clone(cause),
            });
        }
        let transport = Arc::clone(&state.transport);
        drop(state);
        transport.send_control(message)
    }
}

impl Drop for SendQueue {
    fn drop(&mut self) {
        let mut state = lock(&self.shared.state);
        state.fail(Arc::new(Error::Closed));
        let transport = Arc::clone(&state.transport);
        drop(state);
        self.shared.notify_all();
        // Breaks the cycle transport -> Completions -> queue -> transport.
        transport.close();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::inproc::{self, Delivery, InProcConfig};
    use crate::SharedMemory;
    use std::thread;

    const LONG: Duration = Duration::from_secs(10);

    fn manual_link(slots: usize) -> (SendQueue, inproc::InProcLink) {
        let local = SharedMemory::zeroed(1 << 16);
        let mirror = SharedMemory::zeroed(1 << 16);
        let config = InProcConfig {
            max_in_flight: slots,
            max_write_len_bytes: 4096,
            delivery: Delivery::Manual,
            ..InProcConfig::default()
        };
        let (transport, link) = inproc::link(local, mirror, config);
        (SendQueue::new(transport, slots).unwrap(), link)
    }

    fn write(offset: u64, len_bytes: u64) -> MirrorWrite {
        MirrorWrite {
            src_offset: offset,
            dst_offset: offset,
            len_bytes,
        }
    }

    #[test]
    fn refuses_more_slots_than_the_transport_holds() {
        let (transport, _link) = inproc::link(
            SharedMemory::zeroed(64),
            SharedMemory::zeroed(64),
            InProcConfig {
                max_in_flight: 4,
                ..InProcConfig::default()
            },
        );
        let err = SendQueue::new(transport.clone(), 5).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Queue(QueueError::TooManySlots {
                    requested: 5,
                    max: 4
                })
            ),
            "{err}"
        );
        assert!(matches!(
            SendQueue::new(transport, 0),
            Err(Error::Queue(QueueError::NoSlots))
        ));
    }

    #[test]
    fn reserve_try_and_timeout() {
        let (queue, _link) = manual_link(4);
        let a = queue.reserve(3).unwrap();
        assert_eq!(queue.free_slots(), 1);
        assert!(matches!(
            queue.try_reserve(2),
            Err(Error::Queue(QueueError::NoFreeSlots {
                requested: 2,
                free: 1
            }))
        ));
        let b = queue.try_reserve(1).unwrap();
        assert_eq!(queue.free_slots(), 0);
        let started = Instant::now();
        let err = queue
            .reserve_timeout(1, Duration::from_millis(30))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Queue(QueueError::ReserveTimedOut { requested: 1, .. })
            ),
            "{err}"
        );
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert!(matches!(
            queue.reserve(5),
            Err(Error::Queue(QueueError::ReservationTooLarge {
                requested: 5,
                capacity: 4
            }))
        ));
        drop((a, b));
        assert_eq!(queue.free_slots(), 4);
    }

    #[test]
    fn dropping_a_reservation_returns_only_unused_slots() {
        let (queue, link) = manual_link(4);
        let mut reservation = queue.reserve(3).unwrap();
        let id = reservation.post(write(0, 100));
        assert_eq!(reservation.remaining(), 2);
        drop(reservation);
        assert_eq!(queue.in_flight(), 1);
        assert_eq!(queue.reserved(), 0);
        assert_eq!(queue.free_slots(), 3);
        assert_eq!(link.deliver_all(), 1);
        queue.wait_placed_timeout(id, LONG).unwrap();
        assert_eq!(queue.free_slots(), 4);
    }

    #[test]
    #[should_panic(expected = "needs 2 slots but the reservation holds 1")]
    fn a_post_beyond_its_reservation_panics() {
        let (queue, _link) = manual_link(4);
        let mut reservation = queue.reserve(1).unwrap();
        // 4097 bytes is two work requests of at most 4096.
        let _ = reservation.post(write(0, 4097));
    }

    #[test]
    #[should_panic(expected = "the reservation holds 0")]
    fn a_spent_reservation_cannot_post_again() {
        let (queue, _link) = manual_link(4);
        let mut reservation = queue.reserve(1).unwrap();
        let _ = reservation.post(write(0, 8));
        let _ = reservation.post(write(8, 8));
    }

    #[test]
    #[should_panic(expected = "released twice")]
    fn a_slot_is_released_once() {
        let mut pool = SlotPool::new(2);
        assert!(pool.try_reserve(1));
        pool.occupy(7);
        pool.release(7);
        pool.release(7);
    }

    #[test]
    fn duplicate_completions_release_nothing_twice() {
        let (queue, link) = manual_link(2);
        let mut reservation = queue.reserve(2).unwrap();
        let first = reservation.post(write(0, 8));
        let second = reservation.post(write(8, 8));
        assert_eq!((first.get(), second.get()), (1, 2));
        assert!(link.deliver_next());
        queue.wait_placed_timeout(first, LONG).unwrap();
        assert_eq!(queue.in_flight(), 1);
        // A repeated cumulative acknowledgement is a no-op.
        link.completions().unwrap().placed_through(first);
        assert_eq!(queue.in_flight(), 1);
        assert!(link.deliver_next());
        queue.wait_placed_timeout(second, LONG).unwrap();
        link.completions().unwrap().placed_through(second);
        assert_eq!(queue.in_flight(), 0);
        assert_eq!(queue.free_slots(), 2);
    }

    #[test]
    fn a_large_post_is_split_into_work_requests() {
        let (queue, link) = manual_link(4);
        assert_eq!(queue.slots_for(4096), 1);
        assert_eq!(queue.slots_for(4097), 2);
        assert_eq!(queue.slots_for(3 * 4096), 3);
        let mut reservation = queue.reserve(3).unwrap();
        let id = reservation.post(write(100, 3 * 4096));
        assert_eq!(id.get(), 3);
        assert_eq!(queue.in_flight(), 3);
        assert_eq!(link.deliver_all(), 3);
        queue.wait_placed_timeout(id, LONG).unwrap();
    }

    #[test]
    fn completion_frees_slots_and_wakes_a_reserve_waiter() {
        let (queue, link) = manual_link(1);
        let mut reservation = queue.reserve(1).unwrap();
        let id = reservation.post(write(0, 8));
        assert_eq!(queue.free_slots(), 0);
        thread::scope(|scope| {
            let waiter = scope.spawn(|| queue.reserve_timeout(1, LONG).map(|r| r.remaining()));
            while queue.placed() < id {
                link.deliver_all();
                thread::yield_now();
            }
            assert_eq!(waiter.join().unwrap().unwrap(), 1);
        });
        queue.wait_placed_timeout(id, LONG).unwrap();
    }

    #[test]
    fn many_waiters_share_one_completion() {
        let (queue, link) = manual_link(8);
        let mut reservation = queue.reserve(8).unwrap();
        let ids: Vec<WriteId> = (0..8).map(|i| reservation.post(write(i * 8, 8))).collect();
        thread::scope(|scope| {
            let waiters: Vec<_> = ids
                .iter()
                .map(|id| {
                    let queue = &queue;
                    scope.spawn(move || queue.wait_placed_timeout(*id, LONG))
                })
                .collect();
            link.deliver_all();
            for waiter in waiters {
                waiter.join().unwrap().unwrap();
            }
        });
        assert_eq!(queue.placed(), ids[7]);
    }

    #[test]
    fn failure_errors_every_waiter_and_reclaims_slots() {
        let (queue, link) = manual_link(2);
        let mut reservation = queue.reserve(2).unwrap();
        let first = reservation.post(write(0, 8));
        let second = reservation.post(write(8, 8));
        assert!(link.deliver_next());
        // Fill the slot write 1 freed, so that a reserve must wait.
        let held = queue.reserve_timeout(1, LONG).unwrap();
        thread::scope(|scope| {
            let reserver = scope.spawn(|| queue.reserve_timeout(1, LONG));
            let placed_waiter = scope.spawn(|| queue.wait_placed_timeout(second, LONG));
            // Let both block before the cut (best effort; both orders are
            // covered by the assertions below).
            thread::sleep(Duration::from_millis(20));
            link.cut();
            let err = reserver.join().unwrap().unwrap_err();
            assert!(matches!(err, Error::Disconnected { .. }), "{err}");
            let err = placed_waiter.join().unwrap().unwrap_err();
            assert!(
                matches!(err, Error::Queue(QueueError::WriteLost { id: 2, .. })),
                "{err}"
            );
        });
        queue.wait_placed_timeout(first, LONG).unwrap();
        assert_eq!(queue.in_flight(), 0);
        assert_eq!(
            queue.free_slots(),
            1,
            "one slot is still held by a reservation"
        );
        assert!(queue.failure().is_some());
        // New reservations are refused while disconnected.
        assert!(matches!(
            queue.try_reserve(1),
            Err(Error::Disconnected { .. })
        ));
        assert!(matches!(queue.reserve(1), Err(Error::Disconnected { .. })));
        drop((reservation, held));
        assert_eq!(queue.free_slots(), 2);
    }

    #[test]
    fn a_reservation_from_before_a_failure_posts_a_lost_write() {
        let (queue, link) = manual_link(2);
        let mut reservation = queue.reserve(1).unwrap();
        link.cut();
        let id = reservation.post(write(0, 8));
        assert_eq!(queue.in_flight(), 0);
        let err = queue.wait_placed_timeout(id, LONG).unwrap_err();
        assert!(
            matches!(err, Error::Queue(QueueError::WriteLost { .. })),
            "{err}"
        );
        assert_eq!(link.delivered(), 0);
    }

    #[test]
    fn reconnect_starts_a_clean_session() {
        let (queue, old_link) = manual_link(2);
        let mut reservation = queue.reserve(2).unwrap();
        let lost = reservation.post(write(0, 8));
        old_link.cut();
        assert!(matches!(
            queue.try_reserve(1),
            Err(Error::Disconnected { .. })
        ));
        // The old session's handle, as a transport late to notice might
        // still hold it (the reconnect closes the old transport).
        let old_completions = old_link.completions_even_if_cut();

        let local = old_link.local_memory();
        let mirror = SharedMemory::zeroed(1 << 16);
        let (transport, new_link) = inproc::link(
            local,
            mirror,
            InProcConfig {
                max_in_flight: 2,
                max_write_len_bytes: 4096,
                delivery: Delivery::Manual,
                session: 2,
                ..InProcConfig::default()
            },
        );
        queue.reconnect(transport).unwrap();
        assert_eq!(queue.session(), 2);
        assert!(queue.failure().is_none());
        assert_eq!(queue.in_flight(), 0);
        // The reservation outlives the reconnect and posts on the new session.
        let id = reservation.post(write(8, 8));
        assert_eq!(id.get(), lost.get() + 1);
        // Late completions from the old session change nothing.
        old_completions.placed_through(id);
        assert_eq!(queue.in_flight(), 1);
        assert!(new_link.deliver_next());
        queue.wait_placed_timeout(id, LONG).unwrap();
        // The old write stays lost: the mirror has a hole until resync.
        assert!(matches!(
            queue.wait_placed_timeout(lost, LONG),
            Err(Error::Queue(QueueError::WriteLost { id: 1, .. }))
        ));
        assert_eq!(reservation.remaining(), 0);
        assert_eq!(queue.free_slots(), 2);
    }

    #[test]
    fn lost_history_is_bounded_and_conservative() {
        let (queue, link) = manual_link(1);
        let mut first = queue.reserve(1).unwrap();
        let first_id = first.post(write(0, 8));
        link.cut();
        let local = link.local_memory();
        for session in 0..(LOST_HISTORY_MAX as u64 + 2) {
            let (transport, link) = inproc::link(
                local.clone(),
                SharedMemory::zeroed(1 << 16),
                InProcConfig {
                    max_in_flight: 1,
                    max_write_len_bytes: 4096,
                    delivery: Delivery::Manual,
                    session: session + 10,
                    ..InProcConfig::default()
                },
            );
            queue.reconnect(transport).unwrap();
            let mut reservation = queue.reserve(1).unwrap();
            let _ = reservation.post(write(0, 8));
            link.cut();
        }
        let err = queue.wait_placed_timeout(first_id, LONG).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Queue(QueueError::WriteOutcomeForgotten { id: 1 })
            ),
            "{err}"
        );
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Model checks of the slot accounting. Run with:
    //!
    //! ```text
    //! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
    //!     cargo test -p interconnect --release --lib loom
    //! ```
    use super::*;
    use loom::sync::Mutex as LoomMutex;
    use loom::thread;

    /// A transport that only records posts; the model's "completion
    /// thread" completes them.
    #[derive(Debug)]
    struct Recording {
        posted: LoomMutex<Vec<WorkRequest>>,
        completions: LoomMutex<Option<Completions>>,
    }

    impl Recording {
        fn new() -> Self {
            Self {
                posted: LoomMutex::new(Vec::new()),
                completions: LoomMutex::new(None),
            }
        }
    }

    impl Transport for Recording {
        fn limits(&self) -> TransportLimits {
            TransportLimits {
                max_in_flight: 4,
                max_write_len_bytes: 64,
                local_len_bytes: 1024,
                remote_len_bytes: 1024,
            }
        }
        fn session(&self) -> u64 {
            1
        }
        fn attach(&self, completions: Completions) {
            *self.completions.lock().unwrap() = Some(completions);
        }
        fn post_write(&self, request: WorkRequest) {
            self.posted.lock().unwrap().push(request);
        }
        fn send_control(&self, _: &ControlMessage) -> Result<(), Error> {
            Ok(())
        }
        fn close(&self) {
            self.completions.lock().unwrap().take();
        }
    }

    impl Recording {
        fn completions(&self) -> Completions {
            self.completions.lock().unwrap().clone().expect("attached")
        }
        fn last_posted(&self) -> u64 {
            self.posted
                .lock()
                .unwrap()
                .last()
                .map_or(0, |wr| wr.id.get())
        }
    }

    /// Runs `f` under every interleaving loom finds with up to 3
    /// preemptions, and checks that it explored more than one.
    fn model(f: impl Fn() + Sync + Send + 'static) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&runs);
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(move || {
            counted.fetch_add(1, Ordering::Relaxed);
            f();
        });
        let runs = runs.load(Ordering::Relaxed);
        eprintln!("loom explored {runs} interleavings");
        assert!(runs > 1, "loom explored a single interleaving");
    }

    fn write(offset: u64) -> MirrorWrite {
        MirrorWrite {
            src_offset: offset,
            dst_offset: offset,
            len_bytes: 8,
        }
    }

    #[test]
    fn loom_in_flight_never_exceeds_capacity() {
        model(|| {
            let transport = Arc::new(Recording::new());
            let queue = Arc::new(SendQueue::new(transport.clone(), 1).unwrap());
            let writers: Vec<_> = (0..2u64)
                .map(|i| {
                    let queue = Arc::clone(&queue);
                    thread::spawn(move || {
                        let mut reservation = queue.reserve(1).unwrap();
                        assert!(queue.in_flight() + queue.reserved() <= 1);
                        reservation.post(write(i * 8))
                    })
                })
                .collect();
            let completions = transport.completions();
            let mut completed = 0;
            while completed < 2 {
                let posted = transport.last_posted();
                if posted > completed {
                    completions.placed_through(WriteId::new(posted));
                    completed = posted;
                } else {
                    thread::yield_now();
                }
                assert!(queue.in_flight() <= 1);
            }
            for writer in writers {
                let id = writer.join().unwrap();
                queue.wait_placed(id).unwrap();
            }
            assert_eq!(queue.free_slots(), 1);
            assert_eq!(queue.placed(), WriteId::new(2));
        });
    }

    #[test]
    fn loom_dropped_reservation_and_completion_release_once() {
        model(|| {
            let transport = Arc::new(Recording::new());
            let queue = Arc::new(SendQueue::new(transport.clone(), 2).unwrap());
            let mut reservation = queue.reserve(2).unwrap();
            let id = reservation.post(write(0));
            let dropper = thread::spawn(move || drop(reservation));
            let completions = transport.completions();
            let completer = thread::spawn(move || {
                completions.placed_through(id);
                // A duplicate cumulative completion must not free twice.
                completions.placed_through(id);
            });
            dropper.join().unwrap();
            completer.join().unwrap();
            assert_eq!(queue.free_slots(), 2);
            assert_eq!(queue.in_flight(), 0);
        });
    }

    #[test]
    fn loom_failure_wakes_reserve_and_reclaims_slots() {
        model(|| {
            let transport = Arc::new(Recording::new());
            let queue = Arc::new(SendQueue::new(transport.clone(), 1).unwrap());
            let mut reservation = queue.reserve(1).unwrap();
            let waiter = {
                let queue = Arc::clone(&queue);
                thread::spawn(move || queue.reserve(1).map(|r| r.remaining()))
            };
            // The post races the failure: either it is in flight and
            // reclaimed, or it is lost at once. Never both, never neither.
            let poster = thread::spawn(move || reservation.post(write(0)));
            let completions = transport.completions();
            completions.failed(Error::Cut);
            let id = poster.join().unwrap();
            assert!(matches!(
                waiter.join().unwrap(),
                Err(Error::Disconnected { .. })
            ));
            assert!(matches!(
                queue.wait_placed(id),
                Err(Error::Queue(QueueError::WriteLost { .. }))
            ));
            assert_eq!(queue.in_flight(), 0);
            assert_eq!(queue.free_slots(), 1);
        });
    }
}
