//! Mirroring this node's log into the partner's NVRAM, and knowing when the
//! partner's mirror can be trusted.
//!
//! The link is Down, Resyncing or InSync. Only InSync lets a write be
//! acknowledged on "placed in the partner's mirror"; otherwise the write
//! waits for local persistence, and before the first such acknowledgement
//! the mailbox durably says "out of sync".
//!
//! A resync copies the log's live ranges (the header block and the used
//! part of each live half, `nvlog::Log::live_ranges`) to the partner over
//! a fresh session, while new appends are posted to that session as usual.
//! It never gives up on a slow link while the copy makes progress: it is
//! abandoned only when nothing is placed for `RESYNC_STALL_TIMEOUT` (the
//! transport itself fails a session whose partner falls silent), and its
//! progress (bytes placed, time so far, time left) is in the status.
//!
//! It declares InSync only when the copy and everything posted before it
//! are placed and the link is still Resyncing — checked, and the mailbox
//! updated, under the log's order lock, so no append can slip between the
//! check and the declaration. An append that finds the
//! link up but holds no reservation (it reserved while the link was down)
//! cannot be mirrored: it takes the link down at once, under the same lock,
//! so no later write is acknowledged on a mirror with a hole in it.

mod resync;
pub mod transport;

pub use resync::ResyncProgress;

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use interconnect::{
    ControlEvent, MirrorWrite, QueueError, Reservation, SendQueue, SharedMemory, WriteId,
};
use parking_lot::{Condvar, Mutex};

use crate::clock::SharedClock;
use crate::error::Result;
use crate::mirror::transport::Interconnect;
use crate::storage::mailbox::Mailbox;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum Link {
    #[serde(rename = "down")]
    Down = 0,
    #[serde(rename = "resyncing")]
    Resyncing = 1,
    #[serde(rename = "in sync")]
    InSync = 2,
}

impl Link {
    fn from_u8(value: u8) -> Link {
        match value {
            0 => Link::Down,
            1 => Link::Resyncing,
            _ => Link::InSync,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Link::Down => "down",
            Link::Resyncing => "resyncing",
            Link::InSync => "in sync",
        }
    }
}

/// Header posts from a consistency point wait at most this long for a slot.
const HEADER_POST_TIMEOUT: Duration = Duration::from_secs(5);

/// The partner: where to dial it, and where its mailbox is (its `boot` is
/// what the mirror's "in sync" is declared against).
#[derive(Debug, Clone)]
pub struct Partner {
    pub addr: SocketAddr,
    pub aggregate_dir: std::path::PathBuf,
    pub node_id: u32,
}

impl Partner {
    fn boot(&self) -> Option<u64> {
        crate::storage::mailbox::read(&self.aggregate_dir, self.node_id)
            .ok()
            .flatten()
            .map(|mailbox| mailbox.boot)
    }
}

#[derive(Debug)]
pub struct Mirror {
    partner: Partner,
    /// How to dial the partner (TCP or RDMA).
    dialer: Arc<dyn Interconnect>,
    slots: usize,
    local_log: SharedMemory,
    log_len_bytes: u64,
    events: Sender<ControlEvent>,
    queue: Mutex<Option<Arc<SendQueue>>>,
    /// A `Link`, changed to InSync or Resyncing only under the log's order lock.
    link: AtomicU8,
    /// Resyncs started: bumped when the link enters Resyncing, under the
    /// log's order lock. A write notes it at its append (`resyncs_at_append`).
    resync_starts: AtomicU64,
    /// The start count of the resync last declared in sync. A record whose
    /// `resyncs_at_append` is below it was in the log before that resync began, so
    /// the resync's copy (all placed before the declaration) carried it,
    /// even if its own post was lost with an earlier session. A record
    /// appended during the resync is in the mirror only if its own post is.
    covered_below: AtomicU64,
    mailbox: Arc<Mailbox>,
    /// The mailbox durably says "out of sync".
    marked_out_of_sync: AtomicBool,
    /// Whether a resync completed since the log was recovered: the first
    /// one copies the filling half to its end (`nvlog::Log::live_ranges_with`).
    resynced_since_recovery: AtomicBool,
    /// Serializes marking and clearing "out of sync".
    mark_lock: Mutex<()>,
    /// Wakes the connector when the link goes down or the node stops.
    wake: (Mutex<bool>, Condvar),
    /// Whether this node's log is live and should be mirrored (not while it
    /// waits for a giveback or is fenced).
    enabled: AtomicBool,
    /// An interconnect cut (operator or drill) keeps the connector idle
    /// until then.
    paused_until: Mutex<Option<std::time::Instant>>,
    /// The resync under way (or the last one), for the status.
    resync: Mutex<Option<resync::ResyncCopy>>,
    /// A stepped node's resync between its steps ([`Mirror::resync_step`]).
    stepped_resync: Mutex<Option<resync::ResyncUnderWay>>,
    clock: SharedClock,
}

impl Mirror {
    pub fn new(
        partner: Partner,
        dialer: Arc<dyn Interconnect>,
        slots: usize,
        local_log: SharedMemory,
        mailbox: Arc<Mailbox>,
        events: Sender<ControlEvent>,
        clock: SharedClock,
    ) -> Mirror {
        let log_len_bytes = local_log.len() as u64;
        Mirror {
            partner,
            dialer,
            slots,
            local_log,
            log_len_bytes,
            events,
            queue: Mutex::new(None),
            link: AtomicU8::new(Link::Down as u8),
            resync_starts: AtomicU64::new(0),
            covered_below: AtomicU64::new(0),
            mailbox,
            marked_out_of_sync: AtomicBool::new(false),
            resynced_since_recovery: AtomicBool::new(false),
            mark_lock: Mutex::new(()),
            wake: (Mutex::new(false), Condvar::new()),
            enabled: AtomicBool::new(false),
            paused_until: Mutex::new(None),
            resync: Mutex::new(None),
            stepped_resync: Mutex::new(None),
            clock,
        }
    }

    /// Mirror this node's log (or stop: the session is closed).
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Release);
        if !enabled {
            self.disconnect("mirroring disabled");
        }
        self.wake_connector();
    }

    /// Cut the interconnect for `duration`: the session is closed and no
    /// new one is made until then.
    pub fn cut(&self, duration: Duration) {
        *self.paused_until.lock() = Some(self.clock.now() + duration);
        self.disconnect("interconnect cut");
    }

    fn disconnect(&self, why: &str) {
        if let Some(queue) = self.queue() {
            queue.disconnect();
        }
        self.link_down(why);
    }

    fn may_connect(&self) -> bool {
        let paused = self
            .paused_until
            .lock()
            .is_some_and(|until| self.clock.now() < until);
        self.enabled.load(Ordering::Acquire) && !paused
    }

    fn wake_connector(&self) {
        let (flag, condvar) = &self.wake;
        *flag.lock() = true;
        condvar.notify_all();
    }

    pub fn link(&self) -> Link {
        Link::from_u8(self.link.load(Ordering::Acquire))
    }

    pub fn mailbox(&self) -> &Arc<Mailbox> {
        &self.mailbox
    }

    fn queue(&self) -> Option<Arc<SendQueue>> {
        self.queue.lock().clone()
    }

    /// Suspendable phase: slots for a record of `record_bytes` plus a header
    /// update. `None` when the link is down: the write will not be mirrored.
    /// Without `wait`, slots that are not free now are an error
    /// (`NoFreeSlots`: try again later), not a reason to go unmirrored.
    pub fn reserve(&self, record_bytes: u64, wait: bool) -> Result<Option<Reservation>> {
        if self.link() == Link::Down {
            return Ok(None);
        }
        let Some(queue) = self.queue() else {
            return Ok(None);
        };
        let slots = queue.slots_for(record_bytes) + 1;
        if wait {
            return Ok(queue.reserve(slots).ok());
        }
        match queue.try_reserve(slots) {
            Ok(reservation) => Ok(Some(reservation)),
            Err(error @ interconnect::Error::Queue(QueueError::NoFreeSlots { .. })) => {
                Err(error.into())
            }
            Err(_) => Ok(None),
        }
    }

    /// Modify phase, under the log's order lock: post `header` (if any) and
    /// `record` with the reservation. Never blocks.
    pub fn post(
        &self,
        reservation: Option<&mut Reservation>,
        header: Option<Range<u64>>,
        record: Range<u64>,
    ) -> Option<WriteId> {
        let Some(reservation) = reservation else {
            if self.link() != Link::Down {
                self.link_down(
                    "an append could not be mirrored (it reserved while the link was down)",
                );
            }
            return None;
        };
        if let Some(header) = header {
            reservation.post(write_of(header));
        }
        Some(reservation.post(write_of(record)))
    }

    /// Wait phase: whether the write posted as `id` is placed in the
    /// partner's mirror (or was lost with its session).
    pub fn placed(&self, id: Option<WriteId>) -> bool {
        let (Some(id), Some(queue)) = (id, self.queue()) else {
            return false;
        };
        queue.wait_placed(id).is_ok()
    }

    /// Whether [`Mirror::placed`] would return at once: the write is placed,
    /// or lost with its session.
    pub fn settled(&self, id: Option<WriteId>) -> bool {
        match (id, self.queue()) {
            (Some(id), Some(queue)) => queue.placed() >= id,
            _ => true,
        }
    }

    /// Resyncs started so far; read in the modify phase (under the log's
    /// order lock) and kept with the write as its `resyncs_at_append`.
    pub fn resyncs_started(&self) -> u64 {
        self.resync_starts.load(Ordering::Acquire)
    }

    /// Whether a record appended when `resyncs_at_append` resyncs had
    /// started is in the partner's mirror by way of a resync that began
    /// after it, declared in sync.
    pub fn covers(&self, resyncs_at_append: u64) -> bool {
        self.in_sync() && resyncs_at_append < self.covered_below.load(Ordering::Acquire)
    }

    /// Whether a placed write may be acknowledged on the strength of the
    /// mirror alone: the mirror is complete.
    pub fn in_sync(&self) -> bool {
        self.link() == Link::InSync
    }

    /// Before a write the mirror may lack is acknowledged: make sure the
    /// mailbox durably says "out of sync". `placed` and `resyncs_at_append` (the
    /// write's post was placed; the resyncs started at its append) say
    /// whether the write is in the mirror after all: if, under the lock that
    /// orders marking against the resync's declaration, it turns out to be,
    /// nothing is marked (else a write that raced a resync would leave the
    /// mailbox out of sync, and automatic takeover refused, for good).
    pub fn mark_out_of_sync(
        &self,
        reason: &str,
        placed: bool,
        resyncs_at_append: u64,
    ) -> Result<()> {
        if self.marked_out_of_sync.load(Ordering::Acquire) {
            return Ok(());
        }
        let _mark = self.mark_lock.lock();
        if self.marked_out_of_sync.load(Ordering::Acquire)
            || (placed && self.in_sync())
            || self.covers(resyncs_at_append)
        {
            return Ok(());
        }
        self.record_out_of_sync(reason)
    }

    /// The log is about to change without its mirror (it is discarded when
    /// the volumes come back from the partner): the mailbox durably says
    /// "out of sync" first, and only a resync of the new log clears it.
    /// Else a takeover would trust, and replay, records the volume files
    /// have since overtaken.
    pub fn declare_out_of_sync(&self, reason: &str) -> Result<()> {
        assert!(
            !self.enabled.load(Ordering::Acquire) && self.link() == Link::Down,
            "the log changes without its mirror only while mirroring is off"
        );
        let _mark = self.mark_lock.lock();
        self.record_out_of_sync(reason)
    }

    /// Under `mark_lock`: the mailbox durably says "out of sync".
    fn record_out_of_sync(&self, reason: &str) -> Result<()> {
        self.mailbox.update(|state| {
            state.mirror_in_sync = false;
            state.in_sync_with_boot = None;
            state.out_of_sync_reason = Some(reason.to_owned());
        })?;
        self.marked_out_of_sync.store(true, Ordering::Release);
        tracing::warn!(reason, mailbox = %self.mailbox.path().display(), "mirror marked out of sync");
        Ok(())
    }

    /// The log was recovered after a clean stop: it lost nothing the
    /// partner's mirror may hold, so the first resync copies only the live
    /// ranges.
    pub fn log_recovered_after_a_clean_stop(&self) {
        self.resynced_since_recovery.store(true, Ordering::Release);
    }

    /// Post a header update from a consistency point (ordering with records
    /// does not matter: header slots carry a sequence number).
    pub fn post_header(&self, range: Range<u64>) {
        if self.link() == Link::Down {
            return;
        }
        let Some(queue) = self.queue() else { return };
        if let Ok(mut reservation) = queue.reserve_timeout(
            queue.slots_for(range.end - range.start),
            HEADER_POST_TIMEOUT,
        ) {
            reservation.post(write_of(range));
        }
    }

    /// Wait until everything posted so far is placed (or the link failed,
    /// or stalled): after this, no transport still reads bytes posted
    /// before.
    pub fn wait_all_placed(&self) {
        if let Some(queue) = self.queue() {
            let _ = resync::wait_placed_with_progress(&queue, queue.posted());
        }
    }

    /// The link failed (an event, or an error seen by a writer).
    pub fn link_down(&self, why: &str) {
        let previous = Link::from_u8(self.link.swap(Link::Down as u8, Ordering::AcqRel));
        if previous != Link::Down {
            tracing::warn!(partner = %self.partner.addr, why, "mirror link down");
        }
        self.wake_connector();
    }

    /// Stop the connector and close the session.
    pub fn stop(&self) {
        self.enabled.store(false, Ordering::Release);
        self.link.store(Link::Down as u8, Ordering::Release);
        self.wake_connector();
    }

    /// Slots in use, for metrics.
    pub fn slots_in_use(&self) -> usize {
        self.queue().map(|queue| queue.in_flight()).unwrap_or(0)
    }
}

fn write_of(range: Range<u64>) -> MirrorWrite {
    MirrorWrite {
        src_offset: range.start,
        dst_offset: range.start,
        len_bytes: range.end - range.start,
    }
}
