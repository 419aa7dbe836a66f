//! The resync: after every (re)connect, copy the log's live ranges to the
//! partner over the fresh session and declare the mirror in sync once all
//! of it, and every write posted before, is placed (see the module docs of
//! [`crate::mirror`] for why the declaration is safe).
//!
//! Threads run it to the end in one call ([`Mirror::connect_once`], from
//! the connector). A stepped node (the simulation) advances it a step at a
//! time ([`Mirror::resync_step`]): it posts what the free slots take, and
//! declares at a later step once the partner has placed it all, so writes,
//! placements and session failures land in the middle of a resync.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use interconnect::{QueueError, SendQueue, WriteId};

use crate::error::Result;
use crate::mirror::{write_of, Link, Mirror};

/// The resync's writes are at most this long, whatever the transport
/// takes: a heartbeat waits behind at least one write in flight, and on a
/// slow link a transport-sized one (1 MiB: a second at 8 Mbit/s) holds it
/// past the partner's patience and near RDMA's retransmission timeout.
/// 128 KiB is still a large write on a fast link.
const RESYNC_WRITE_BYTES_MAX: u64 = 128 << 10;

/// A resync (or a wait for everything posted) that places nothing for this
/// long is abandoned and retried. Progress, not total time: a large log on
/// a slow link takes as long as it takes.
pub(super) const RESYNC_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// What a resync copies and how far it has got: the writes it posted, each
/// with the bytes copied through it.
#[derive(Debug, Clone)]
pub(super) struct ResyncCopy {
    started: std::time::Instant,
    total_bytes: u64,
    /// (write id, bytes posted through it), in post order.
    posted: Vec<(WriteId, u64)>,
    session: u64,
    finished: Option<std::time::Instant>,
}

/// How far the current (or last) resync has got.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResyncProgress {
    /// Bytes of the log's live ranges the resync copies.
    pub total_bytes: u64,
    /// Of which the partner has placed.
    pub placed_bytes: u64,
    /// Since the resync started.
    pub elapsed: Duration,
    /// The resync declared the mirror in sync (or was abandoned).
    pub finished: bool,
    /// At the rate so far; `None` before anything is placed.
    pub remaining: Option<Duration>,
}

/// A resync between its start and its declaration.
#[derive(Debug)]
pub(super) struct ResyncUnderWay {
    queue: Arc<SendQueue>,
    session: u64,
    /// What is still to be posted, in order.
    to_copy: VecDeque<Range<u64>>,
    chunk_bytes: u64,
    copied_bytes: u64,
    /// The start count this resync took (`resync_starts`).
    start: u64,
    partner_boot: Option<u64>,
    /// Once everything is posted: the last write the declaration waits for.
    last_post: Option<WriteId>,
}

impl Mirror {
    /// How far the current (or last) resync has got.
    pub fn resync_progress(&self) -> Option<ResyncProgress> {
        let copy = self.resync.lock().clone()?;
        // Writes lost with a failed session count as resolved, not placed.
        let placed_id = self
            .queue()
            .filter(|queue| queue.session() == copy.session && queue.failure().is_none())
            .map(|queue| queue.placed());
        let placed_bytes = match (copy.finished, placed_id) {
            (Some(_), _) if self.link() == Link::InSync => copy.total_bytes,
            (Some(_), _) => 0,
            (None, Some(placed)) => copy
                .posted
                .iter()
                .take_while(|(id, _)| *id <= placed)
                .last()
                .map_or(0, |&(_, bytes)| bytes),
            (None, None) => 0,
        };
        let now = self.clock.now();
        let elapsed = copy
            .finished
            .unwrap_or(now)
            .saturating_duration_since(copy.started);
        let remaining = (placed_bytes > 0).then(|| {
            let left = copy.total_bytes - placed_bytes;
            Duration::from_secs_f64(elapsed.as_secs_f64() * left as f64 / placed_bytes as f64)
        });
        Some(ResyncProgress {
            total_bytes: copy.total_bytes,
            placed_bytes,
            elapsed,
            finished: copy.finished.is_some(),
            remaining,
        })
    }

    /// The connector: while the node runs, keep a session to the partner
    /// and bring its mirror in sync after every (re)connect.
    pub fn run_connector(&self, log: &nvlog::Log, stopping: &AtomicBool) {
        let mut backoff = Duration::from_millis(100);
        while !stopping.load(Ordering::Acquire) {
            match self.connect_once(log) {
                Some(true) => backoff = Duration::from_millis(100),
                Some(false) => backoff = (backoff * 2).min(Duration::from_secs(1)),
                None => {}
            }
            let (flag, condvar) = &self.wake;
            let mut woken = flag.lock();
            if !*woken {
                let wait = if self.link() == Link::Down {
                    backoff
                } else {
                    Duration::from_millis(500)
                };
                condvar.wait_for(&mut woken, wait);
            }
            *woken = false;
        }
        // Close the session: the queue and its transport go.
        self.queue.lock().take();
    }

    /// One round of the connector: if the link is down and may come up,
    /// connect and resync to the end. `None` if it did not try, else whether
    /// the mirror is in sync now.
    pub fn connect_once(&self, log: &nvlog::Log) -> Option<bool> {
        if self.link() != Link::Down || !self.may_connect() {
            return None;
        }
        let span = tracing::info_span!("resync", partner = %self.partner.addr);
        let _entered = span.enter();
        let resynced = self.begin_resync(log).and_then(|mut resync| {
            self.copy_all(&mut resync)?;
            self.declare(log, &resync)
        });
        self.resync_ended(resynced)
    }

    /// One step of a stepped node's resync: start one if the link is down
    /// and may come up, post what the free slots take, declare once all is
    /// placed. `None` while it is under way (or nothing to do), else whether
    /// the mirror is in sync now.
    pub fn resync_step(&self, log: &nvlog::Log) -> Option<bool> {
        let span = tracing::info_span!("resync", partner = %self.partner.addr);
        let _entered = span.enter();
        let mut under_way = self.stepped_resync.lock();
        if under_way.is_none() {
            if self.link() != Link::Down || !self.may_connect() {
                return None;
            }
            match self.begin_resync(log) {
                Ok(resync) => *under_way = Some(resync),
                Err(error) => return self.resync_ended(Err(error)),
            }
        }
        let resync = under_way.as_mut().expect("a resync under way");
        let step = (|| -> Result<Option<bool>> {
            if self.link() != Link::Resyncing || !session_stands(resync) {
                return Err(crate::error::Error::ResyncInterrupted);
            }
            self.post_some(resync, |queue| queue.try_reserve(1))?;
            match resync.last_post {
                Some(last) if resync.queue.placed() >= last => Ok(Some(self.declare(log, resync)?)),
                _ => Ok(None),
            }
        })();
        match step {
            Ok(None) => None,
            Ok(Some(declared)) => {
                *under_way = None;
                self.resync_ended(Ok(declared))
            }
            Err(error) => {
                *under_way = None;
                self.resync_ended(Err(error))
            }
        }
    }

    /// Connect, and start a resync over the new session: the live ranges
    /// taken and the link switched to Resyncing in one step.
    fn begin_resync(&self, log: &nvlog::Log) -> Result<ResyncUnderWay> {
        let sender = self.dialer.connect(
            self.partner.addr,
            self.local_log.clone(),
            self.events.clone(),
        )?;
        // The partner writes its mailbox before it listens, so once the
        // session is up the mailbox names the start that accepted it (or a
        // later one, whose restart killed the session: nothing is declared
        // then). Read before the copy: a restart after it is a boot the
        // declaration does not name, and a takeover refuses that mirror.
        // (Read before dialing, a partner starting meanwhile was recorded
        // with its previous boot, or none.)
        let partner_boot = self.partner.boot();
        let queue = {
            let mut current = self.queue.lock();
            match current.as_ref() {
                Some(queue) => {
                    queue.reconnect(sender)?;
                    queue.clone()
                }
                None => {
                    let queue = Arc::new(SendQueue::new(sender, self.slots)?);
                    *current = Some(queue.clone());
                    queue
                }
            }
        };
        // The ranges and the switch to Resyncing in one step under the
        // order lock: what was appended before is inside the ranges, what
        // is appended after is posted to this session by its own write.
        let first_since_recovery = !self.resynced_since_recovery.load(Ordering::Acquire);
        let (ranges, start) = log.live_ranges_with(first_since_recovery, || {
            self.link.store(Link::Resyncing as u8, Ordering::Release);
            self.resync_starts.fetch_add(1, Ordering::AcqRel) + 1
        });
        let total_bytes: u64 = ranges.iter().map(|range| range.end - range.start).sum();
        assert!(
            ranges.iter().all(|range| range.end <= self.log_len_bytes),
            "live ranges lie inside the log"
        );
        tracing::info!(
            total_bytes,
            log_bytes = self.log_len_bytes,
            session = queue.session(),
            "resync: copying the log's live ranges"
        );
        *self.resync.lock() = Some(ResyncCopy {
            started: self.clock.now(),
            total_bytes,
            posted: Vec::new(),
            session: queue.session(),
            finished: None,
        });
        Ok(ResyncUnderWay {
            session: queue.session(),
            chunk_bytes: u64::from(queue.limits().max_write_len_bytes).min(RESYNC_WRITE_BYTES_MAX),
            queue,
            to_copy: ranges.into(),
            copied_bytes: 0,
            start,
            partner_boot,
            last_post: None,
        })
    }

    /// Post all of the copy (waiting for slots as the partner places
    /// earlier chunks), then wait until it and everything posted before it
    /// is placed.
    fn copy_all(&self, resync: &mut ResyncUnderWay) -> Result<()> {
        // A slot frees as soon as the partner places an earlier chunk:
        // waiting longer than the stall timeout means no progress at all.
        self.post_some(resync, |queue| {
            queue.reserve_timeout(1, RESYNC_STALL_TIMEOUT)
        })?;
        let last = resync.last_post.expect("everything posted");
        wait_placed_with_progress(&resync.queue, last)
    }

    /// Post chunks of the copy while `reserve` gives a slot; a stepped
    /// node's `try_reserve` running out of slots ends the round, to go on
    /// at a later step. Once everything is posted, notes the last post.
    fn post_some(
        &self,
        resync: &mut ResyncUnderWay,
        reserve: impl Fn(
            &SendQueue,
        ) -> std::result::Result<interconnect::Reservation, interconnect::Error>,
    ) -> Result<()> {
        while let Some(range) = resync.to_copy.front_mut() {
            let mut reservation = match reserve(&resync.queue) {
                Ok(reservation) => reservation,
                Err(interconnect::Error::Queue(QueueError::NoFreeSlots { .. })) => return Ok(()),
                Err(error) => return Err(error.into()),
            };
            let len = resync.chunk_bytes.min(range.end - range.start);
            let id = reservation.post(write_of(range.start..range.start + len));
            range.start += len;
            if range.start == range.end {
                resync.to_copy.pop_front();
            }
            resync.copied_bytes += len;
            if let Some(copy) = self.resync.lock().as_mut() {
                copy.posted.push((id, resync.copied_bytes));
            }
        }
        if resync.last_post.is_none() {
            // Everything posted before, writes included, is placed once this is.
            resync.last_post = Some(resync.queue.posted());
        }
        Ok(())
    }

    /// With the copy placed: declare the mirror in sync if the link is
    /// still Resyncing on this session. Whether it declared.
    fn declare(&self, log: &nvlog::Log, resync: &ResyncUnderWay) -> Result<bool> {
        log.with_order_lock(|| -> Result<bool> {
            // The link turns Down only when the failure's event is handled:
            // the queue itself says whether this session still stands. A
            // write posted to it after the wait above, whose post then failed,
            // may have marked the mirror out of sync and been acknowledged
            // after local persistence; declaring over its mark would lose it.
            if self.link() != Link::Resyncing || !session_stands(resync) {
                return Ok(false);
            }
            let _mark = self.mark_lock.lock();
            self.mailbox.update(|state| {
                state.mirror_in_sync = true;
                state.in_sync_with_boot = resync.partner_boot;
                state.out_of_sync_reason = None;
            })?;
            self.marked_out_of_sync.store(false, Ordering::Release);
            self.covered_below.store(resync.start, Ordering::Release);
            self.link.store(Link::InSync as u8, Ordering::Release);
            Ok(true)
        })
    }

    /// The end of a resync, declared, abandoned or failed: the status's
    /// copy is finished, and the link is down unless declared.
    fn resync_ended(&self, resynced: Result<bool>) -> Option<bool> {
        if let Some(copy) = self.resync.lock().as_mut() {
            copy.finished.get_or_insert(self.clock.now());
        }
        match resynced {
            Ok(true) => {
                self.resynced_since_recovery.store(true, Ordering::Release);
                let total_bytes = self
                    .resync
                    .lock()
                    .as_ref()
                    .map_or(0, |copy| copy.total_bytes);
                tracing::info!(
                    copied_bytes = total_bytes,
                    log_bytes = self.log_len_bytes,
                    "mirror in sync"
                );
                Some(true)
            }
            Ok(false) | Err(_) => {
                if let Err(error) = &resynced {
                    tracing::debug!(partner = %self.partner.addr, %error, "cannot mirror to the partner yet");
                }
                self.link_down("connect or resync failed");
                Some(false)
            }
        }
    }
}

/// Whether the resync's session is still the queue's, and healthy.
fn session_stands(resync: &ResyncUnderWay) -> bool {
    resync.queue.failure().is_none() && resync.queue.session() == resync.session
}

/// Waits until `id` is placed, as long as the partner keeps placing: fails
/// only when nothing is placed for [`RESYNC_STALL_TIMEOUT`] (or the
/// session fails).
pub(super) fn wait_placed_with_progress(queue: &SendQueue, id: WriteId) -> Result<()> {
    let mut placed = queue.placed();
    loop {
        match queue.wait_placed_timeout(id, RESYNC_STALL_TIMEOUT) {
            Ok(()) => return Ok(()),
            Err(error @ interconnect::Error::Queue(QueueError::PlacedTimedOut { .. })) => {
                let now_placed = queue.placed();
                if now_placed == placed {
                    return Err(error.into());
                }
                placed = now_placed;
            }
            Err(error) => return Err(error.into()),
        }
    }
}
