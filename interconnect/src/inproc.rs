//! In-process transport: a pair of in-memory endpoints for unit tests and
//! the deterministic simulation.
//!
//! [`link`] returns the sender's end (an [`InProcTransport`] for the send
//! queue) and an [`InProcLink`]: the partner's end and the knobs. No thread
//! is started: in `Immediate` mode a post is placed and completed inside
//! `post_write`; in `Manual` mode nothing moves until the test or simulation
//! calls `deliver_next`/`deliver_all`; in `Delayed` mode `deliver_due(now)`
//! places what has waited long enough. Knobs: hold/release (delay), lose
//! writes or control messages (drop), cut (fail the connection).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::control::{ControlEvent, ControlMessage, Direction};
use crate::transport::{Completions, WriteId};
use crate::transport::{Transport, TransportLimits, WorkRequest};
use crate::{Error, SharedMemory};

/// When posted writes are placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Placed and completed inside `post_write`.
    Immediate,
    /// Held until `deliver_next`/`deliver_all`.
    Manual,
    /// Held until `deliver_due` is called at least this long after the post.
    Delayed(Duration),
}

/// Configuration of an in-process link.
#[derive(Debug, Clone)]
pub struct InProcConfig {
    /// Reported as the transport's send depth.
    pub max_in_flight: usize,
    /// Reported as the largest work request.
    pub max_write_len_bytes: u32,
    /// When writes are placed.
    pub delivery: Delivery,
    /// The session id this link reports.
    pub session: u64,
    /// Where messages from the partner end are delivered.
    pub events: Option<Sender<ControlEvent>>,
}

impl Default for InProcConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            max_write_len_bytes: 64 * 1024,
            delivery: Delivery::Immediate,
            session: 1,
            events: None,
        }
    }
}

#[derive(Debug)]
struct LinkState {
    delivery: Delivery,
    /// Posted, not yet placed, with the time of the post.
    pending: VecDeque<(WorkRequest, Instant)>,
    lose_writes: bool,
    lose_control: bool,
    /// Cut or closed: nothing moves any more.
    down: bool,
    completions: Option<Completions>,
    /// Kept after a cut (not after a close) so tests can show late
    /// completions are ignored.
    last_completions: Option<Completions>,
    delivered_writes: u64,
    delivered_through: WriteId,
    to_partner: VecDeque<ControlMessage>,
}

#[derive(Debug)]
struct LinkShared {
    local_log: SharedMemory,
    mirror: SharedMemory,
    max_in_flight: usize,
    max_write_len_bytes: u32,
    session: u64,
    events: Option<Sender<ControlEvent>>,
    state: Mutex<LinkState>,
}

impl LinkShared {
    fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Places one write in the mirror; called in order, under the link lock.
    fn place(&self, state: &mut LinkState, request: &WorkRequest) -> Option<Completions> {
        assert!(
            request.id > state.delivered_through,
            "in-process link placed write {} after {}",
            request.id,
            state.delivered_through
        );
        let mut bytes = vec![0u8; request.len_bytes as usize];
        self.local_log
            .read_at(request.src_offset, &mut bytes)
            .expect("the send queue checked the source range");
        self.mirror
            .write_at(request.dst_offset, &bytes)
            .expect("the send queue checked the destination range");
        state.delivered_writes += 1;
        state.delivered_through = request.id;
        state.completions.clone()
    }

    /// Places up to `max` pending writes for which `due` holds, then
    /// completes them (outside the lock: completions take the queue's lock).
    fn deliver(&self, max: usize, due: impl Fn(Instant) -> bool) -> usize {
        let mut state = self.lock();
        let mut placed = 0;
        let mut completion = None;
        while placed < max {
            match state.pending.front() {
                Some((_, posted_at)) if due(*posted_at) => {}
                _ => break,
            }
            let (request, _) = state.pending.pop_front().expect("front exists");
            if let Some(completions) = self.place(&mut state, &request) {
                completion = Some((completions, request.id));
            }
            placed += 1;
        }
        drop(state);
        if let Some((completions, id)) = completion {
            completions.placed_through(id);
        }
        placed
    }
}

/// The sender's end of an in-process link.
#[derive(Debug)]
pub struct InProcTransport {
    shared: Arc<LinkShared>,
}

/// The partner's end of an in-process link, and its knobs. Clones are
/// handles on the same link.
#[derive(Debug, Clone)]
pub struct InProcLink {
    shared: Arc<LinkShared>,
}

/// A link that copies from `local_log` into `mirror`.
pub fn link(
    local_log: SharedMemory,
    mirror: SharedMemory,
    config: InProcConfig,
) -> (Arc<InProcTransport>, InProcLink) {
    let shared = Arc::new(LinkShared {
        local_log,
        mirror,
        max_in_flight: config.max_in_flight,
        max_write_len_bytes: config.max_write_len_bytes,
        session: config.session,
        events: config.events,
        state: Mutex::new(LinkState {
            delivery: config.delivery,
            pending: VecDeque::new(),
            lose_writes: false,
            lose_control: false,
            down: false,
            completions: None,
            last_completions: None,
            delivered_writes: 0,
            delivered_through: WriteId::NONE,
            to_partner: VecDeque::new(),
        }),
    });
    (
        Arc::new(InProcTransport {
            shared: Arc::clone(&shared),
        }),
        InProcLink { shared },
    )
}

impl Transport for InProcTransport {
    fn limits(&self) -> TransportLimits {
        TransportLimits {
            max_in_flight: self.shared.max_in_flight,
            max_write_len_bytes: self.shared.max_write_len_bytes,
            local_len_bytes: self.shared.local_log.len() as u64,
            remote_len_bytes: self.shared.mirror.len() as u64,
        }
    }

    fn session(&self) -> u64 {
        self.shared.session
    }

    fn attach(&self, completions: Completions) {
        let mut state = self.shared.lock();
        state.last_completions = Some(completions.clone());
        if state.down {
            drop(state);
            completions.failed(Error::Cut);
            return;
        }
        state.completions = Some(completions);
    }

    fn post_write(&self, request: WorkRequest) {
        let mut state = self.shared.lock();
        if state.down || state.lose_writes {
            return;
        }
        match state.delivery {
            Delivery::Immediate if state.pending.is_empty() => {
                let completions = self.shared.place(&mut state, &request);
                drop(state);
                if let Some(completions) = completions {
                    completions.placed_through(request.id);
                }
            }
            _ => state.pending.push_back((request, Instant::now())),
        }
    }

    fn send_control(&self, message: &ControlMessage) -> Result<(), Error> {
        let mut state = self.shared.lock();
        if state.down {
            return Err(Error::Cut);
        }
        if !state.lose_control {
            state.to_partner.push_back(*message);
        }
        Ok(())
    }

    fn close(&self) {
        let mut state = self.shared.lock();
        state.down = true;
        state.pending.clear();
        // Both handles: each holds the queue, which holds this transport.
        state.completions = None;
        state.last_completions = None;
    }
}

impl InProcLink {
    /// Holds every later write until released or delivered by hand.
    pub fn hold(&self) {
        self.shared.lock().delivery = Delivery::Manual;
    }

    /// Places everything held and returns to immediate delivery.
    pub fn release(&self) -> usize {
        self.shared.lock().delivery = Delivery::Immediate;
        self.deliver_all()
    }

    /// Sets the delivery mode.
    pub fn set_delivery(&self, delivery: Delivery) {
        self.shared.lock().delivery = delivery;
    }

    /// Loses every write from now on: a black hole. Completions are
    /// cumulative and in order, so after one lost write no later write can
    /// be reported placed; only a cut (or the failure detector) ends it.
    pub fn lose_writes(&self) {
        self.shared.lock().lose_writes = true;
    }

    /// Loses control messages sent by the transport from now on.
    pub fn set_lose_control(&self, lose: bool) {
        self.shared.lock().lose_control = lose;
    }

    /// Fails the connection: held writes are discarded and the send queue
    /// is told (`Error::Cut`).
    pub fn cut(&self) {
        let mut state = self.shared.lock();
        if state.down {
            return;
        }
        state.down = true;
        state.pending.clear();
        let completions = state.completions.take();
        drop(state);
        tracing::info!(session = self.shared.session, "in-process link cut");
        if let Some(completions) = completions {
            completions.failed(Error::Cut);
        }
        if let Some(events) = &self.shared.events {
            let _ = events.send(ControlEvent::Disconnected {
                direction: Direction::Outbound,
                session: self.shared.session,
                error: Arc::new(Error::Cut),
            });
        }
    }

    /// Places the oldest held write; false if none is held.
    pub fn deliver_next(&self) -> bool {
        self.shared.deliver(1, |_| true) == 1
    }

    /// A torn write: the first `keep_bytes` of the oldest held write land
    /// in the mirror, and the connection fails before the rest does (as a
    /// link dying mid-transfer would leave it). False if nothing is held.
    pub fn tear_next(&self, keep_bytes: u64) -> bool {
        let mut state = self.shared.lock();
        let Some((request, _)) = state.pending.pop_front() else {
            return false;
        };
        let keep = keep_bytes.min(u64::from(request.len_bytes)) as usize;
        let mut bytes = vec![0u8; keep];
        self.shared
            .local_log
            .read_at(request.src_offset, &mut bytes)
            .expect("the send queue checked the source range");
        self.shared
            .mirror
            .write_at(request.dst_offset, &bytes)
            .expect("the send queue checked the destination range");
        drop(state);
        self.cut();
        true
    }

    /// Places every held write; returns how many.
    pub fn deliver_all(&self) -> usize {
        self.shared.deliver(usize::MAX, |_| true)
    }

    /// In `Delayed` mode, places the held writes whose delay has passed at
    /// `now`; returns how many.
    pub fn deliver_due(&self, now: Instant) -> usize {
        let delay = match self.shared.lock().delivery {
            Delivery::Delayed(delay) => delay,
            Delivery::Immediate => Duration::ZERO,
            Delivery::Manual => return 0,
        };
        self.shared
            .deliver(usize::MAX, |posted_at| posted_at + delay <= now)
    }

    /// Whether the link was cut or closed.
    pub fn is_cut(&self) -> bool {
        self.shared.lock().down
    }

    /// The session id the link reports.
    pub fn session(&self) -> u64 {
        self.shared.session
    }

    /// Writes held, not yet placed.
    pub fn pending(&self) -> usize {
        self.shared.lock().pending.len()
    }

    /// Work requests placed so far.
    pub fn delivered(&self) -> u64 {
        self.shared.lock().delivered_writes
    }

    /// The last work request placed.
    pub fn delivered_through(&self) -> WriteId {
        self.shared.lock().delivered_through
    }

    /// The next control message the transport sent, if any.
    pub fn recv_control(&self) -> Option<ControlMessage> {
        self.shared.lock().to_partner.pop_front()
    }

    /// Sends a control message from the partner to the transport's side
    /// (delivered as a `ControlEvent` if the config has an event channel).
    pub fn send_control(&self, message: ControlMessage) -> Result<(), Error> {
        if self.shared.lock().down {
            return Err(Error::Cut);
        }
        if let Some(events) = &self.shared.events {
            let _ = events.send(ControlEvent::Message {
                direction: Direction::Outbound,
                session: self.shared.session,
                message,
            });
        }
        Ok(())
    }

    /// The queue's completion handle while the link is up.
    pub fn completions(&self) -> Option<Completions> {
        self.shared.lock().completions.clone()
    }

    /// The completion handle the link was given, even after a cut (to show
    /// that late completions of a dead session are ignored).
    pub fn completions_even_if_cut(&self) -> Completions {
        self.shared
            .lock()
            .last_completions
            .clone()
            .expect("the link was attached to a send queue")
    }

    /// The sender's local log memory.
    pub fn local_memory(&self) -> SharedMemory {
        self.shared.local_log.clone()
    }

    /// The partner's mirror memory.
    pub fn mirror(&self) -> SharedMemory {
        self.shared.mirror.clone()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::{MirrorWrite, SendQueue};

    const LONG: Duration = Duration::from_secs(10);

    fn setup(
        delivery: Delivery,
    ) -> (
        SendQueue,
        InProcLink,
        crossbeam_channel::Receiver<ControlEvent>,
    ) {
        let (events_tx, events) = crossbeam_channel::unbounded();
        let (transport, link) = link(
            SharedMemory::zeroed(1024),
            SharedMemory::zeroed(1024),
            InProcConfig {
                max_in_flight: 8,
                delivery,
                events: Some(events_tx),
                ..InProcConfig::default()
            },
        );
        (SendQueue::new(transport, 8).unwrap(), link, events)
    }

    fn post(queue: &SendQueue, link: &InProcLink, offset: u64, data: &[u8]) -> WriteId {
        link.local_memory().write_at(offset, data).unwrap();
        let mut reservation = queue.reserve_timeout(1, LONG).unwrap();
        reservation.post(MirrorWrite {
            src_offset: offset,
            dst_offset: offset,
            len_bytes: data.len() as u64,
        })
    }

    fn mirror_bytes(link: &InProcLink, offset: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        link.mirror().read_at(offset, &mut bytes).unwrap();
        bytes
    }

    /// The completion handle holds the queue, which holds this transport:
    /// closed (the queue dropped), the link keeps neither handle, or every
    /// queue and everything its transport holds would leak (the simulation's
    /// soak grew by megabytes a seed until the kernel killed it).
    #[test]
    fn a_closed_link_keeps_no_completion_handle() {
        let (queue, link, _events) = setup(Delivery::Immediate);
        post(&queue, &link, 0, b"x");
        drop(queue);
        let state = link.shared.lock();
        assert!(state.completions.is_none());
        assert!(state.last_completions.is_none(), "the queue leaks");
    }

    #[test]
    fn immediate_delivery_places_and_completes_inside_the_post() {
        let (queue, link, _events) = setup(Delivery::Immediate);
        let id = post(&queue, &link, 10, b"now");
        assert_eq!(queue.placed(), id);
        assert_eq!(mirror_bytes(&link, 10, 3), b"now");
    }

    #[test]
    fn hold_delays_until_release_in_order() {
        let (queue, link, _events) = setup(Delivery::Immediate);
        link.hold();
        let first = post(&queue, &link, 0, b"one");
        let second = post(&queue, &link, 3, b"two");
        assert_eq!((link.pending(), queue.placed()), (2, WriteId::NONE));
        assert_eq!(mirror_bytes(&link, 0, 6), [0; 6]);
        assert!(link.deliver_next());
        assert_eq!(queue.placed(), first);
        assert_eq!(link.release(), 1);
        assert_eq!(queue.placed(), second);
        assert_eq!(mirror_bytes(&link, 0, 6), b"onetwo");
    }

    #[test]
    fn delayed_delivery_places_only_what_is_due() {
        let (queue, link, _events) = setup(Delivery::Delayed(Duration::from_secs(60)));
        let id = post(&queue, &link, 0, b"later");
        assert_eq!(link.deliver_due(Instant::now()), 0);
        assert_eq!(
            link.deliver_due(Instant::now() + Duration::from_secs(61)),
            1
        );
        queue.wait_placed_timeout(id, LONG).unwrap();
    }

    #[test]
    fn lost_writes_are_never_completed_nor_is_anything_after_them() {
        let (queue, link, _events) = setup(Delivery::Immediate);
        let placed = post(&queue, &link, 0, b"placed");
        link.lose_writes();
        let lost = post(&queue, &link, 8, b"lost");
        let after = post(&queue, &link, 12, b"after");
        assert_eq!(queue.placed(), placed);
        assert!(matches!(
            queue.wait_placed_timeout(lost, Duration::from_millis(20)),
            Err(Error::Queue(crate::QueueError::PlacedTimedOut { .. }))
        ));
        assert_eq!(mirror_bytes(&link, 8, 9), [0; 9]);
        link.cut();
        assert!(matches!(
            queue.wait_placed_timeout(lost, LONG),
            Err(Error::Queue(crate::QueueError::WriteLost { .. }))
        ));
        assert!(matches!(
            queue.wait_placed_timeout(after, LONG),
            Err(Error::Queue(crate::QueueError::WriteLost { .. }))
        ));
        queue.wait_placed_timeout(placed, LONG).unwrap();
    }

    #[test]
    fn a_torn_write_places_a_prefix_and_fails_the_connection() {
        let (queue, link, _events) = setup(Delivery::Manual);
        let first = post(&queue, &link, 0, &[7; 64]);
        let second = post(&queue, &link, 64, &[8; 64]);
        assert!(link.tear_next(10));
        assert_eq!(
            mirror_bytes(&link, 0, 12),
            [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 0, 0]
        );
        assert!(queue.wait_placed(first).is_err());
        assert!(queue.wait_placed(second).is_err());
        assert_eq!(mirror_bytes(&link, 64, 4), [0; 4]);
    }

    #[test]
    fn control_messages_can_be_lost_and_flow_both_ways() {
        let (queue, link, events) = setup(Delivery::Immediate);
        let cp = ControlMessage::CpDone {
            cp_id: 1,
            half_freed: 0,
        };
        queue.send_control(&cp).unwrap();
        assert_eq!(link.recv_control(), Some(cp));
        link.set_lose_control(true);
        queue
            .send_control(&ControlMessage::Giveback { epoch: 2 })
            .unwrap();
        assert_eq!(link.recv_control(), None);
        link.send_control(ControlMessage::Takeover { epoch: 5 })
            .unwrap();
        assert!(matches!(
            events.try_recv(),
            Ok(ControlEvent::Message {
                message: ControlMessage::Takeover { epoch: 5 },
                ..
            })
        ));
        link.cut();
        assert!(matches!(
            queue.send_control(&cp),
            Err(Error::Disconnected { .. })
        ));
        assert!(matches!(
            events.try_recv(),
            Ok(ControlEvent::Disconnected { .. })
        ));
    }
}
