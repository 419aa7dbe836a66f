//! The dialing side: implements `Transport` over one authenticated RC
//! connection (one session).
//!
//! Writes are posted in the writer's modify phase when the QP is idle (no
//! write in flight or queued): at once, signaled, from the writer's thread,
//! which saves a thread hand-off on the latency path. Otherwise they are
//! handed to the session's thread, which posts what has gathered as one
//! chain (one doorbell) signaled once per batch. One mutex (`PostState`)
//! orders the two ways, so writes reach the send queue in id order. The
//! session thread also takes every completion, exchanges control messages
//! and heartbeats, and watches rdma_cm events and silence.
//!
//! The session thread keeps the bytes in flight within a [`SendWindow`]:
//! what the link carries in a fraction of the heartbeat interval, measured
//! as it goes. Writes beyond it wait in the thread's backlog, so a
//! heartbeat (a SEND, which the QP executes after every write posted
//! before it) never waits behind more than that, and a resync of any size
//! cannot starve the partner's failure detector on a slow link.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::verbs::{
    event, Access, ConnParams, EventChannel, MemoryRegion, QueuePair, RemoteRegion, WriteRequest,
};
use super::wire::{
    Challenge, Hello, MessageKind, Refusal, Verdict, ACCEPTOR_LABEL, DIALER_LABEL, HEADER_LEN,
    RDMA_WIRE_VERSION, VERDICT_SIGNED,
};
use super::{
    resolve, Connection, Deadline, Polled, RdmaConfig, Waker, CONTROL_BACKLOG_MAX, RETRY_COUNT,
    RNR_RETRY_COUNT,
};
use crate::auth::{proof, random_bytes, verify_proof};
use crate::control::{decode_control, ControlEvent, ControlMessage, Direction, FailureDetector};
use crate::pacing::SendWindow;
use crate::tcp::wire::{HandshakeStatus, NONCE_LEN};
use crate::transport::{Completions, WriteId};
use crate::transport::{SessionLink, Transport, TransportLimits, WorkRequest};
use crate::{Error, RdmaError, RefuseReason, SharedMemory};

/// Where writes go: the QP, the local log's registration, the partner's
/// mirror. Taken away (under the lock) when the session ends, so no post
/// races the teardown.
#[derive(Debug)]
struct PostTarget {
    qp: Arc<QueuePair>,
    local_mr: Arc<MemoryRegion>,
    remote: RemoteRegion,
}

/// Orders the writers' direct posts and the session thread's batches.
#[derive(Debug)]
struct PostState {
    target: Option<PostTarget>,
    /// The highest write id on the QP's send queue.
    highest_posted: u64,
    /// The highest write id a writer handed over (posted, or queued for
    /// the session thread): a control message sent now goes after it.
    highest_handed_over: u64,
    /// Writes handed to the session thread and not yet posted: while there
    /// are any, writers must hand theirs over too (id order).
    queued_writes: usize,
    /// The highest write id known placed (the session thread updates it).
    placed: u64,
    /// Bytes in flight on the QP, and how many may be.
    window: SendWindow,
}

impl PostState {
    /// Posts `writes` (in id order, after every write posted so far).
    fn post(&mut self, writes: &[WriteRequest]) -> Result<(), Error> {
        let Some(target) = &self.target else {
            return Err(Error::Closed);
        };
        let Some(last) = writes.last() else {
            return Ok(());
        };
        let last_id = last.wr_id & super::WR_VALUE_MASK;
        assert!(
            (writes[0].wr_id & super::WR_VALUE_MASK) > self.highest_posted,
            "writes reach the send queue in id order"
        );
        target
            .qp
            .post_writes(&target.local_mr, &target.remote, writes)?;
        self.highest_posted = last_id;
        for write in writes {
            self.window.posted(
                write.wr_id & super::WR_VALUE_MASK,
                u64::from(write.len_bytes),
            );
        }
        Ok(())
    }
}

/// The completion handle and the failure, changed together under one lock
/// so a failure is reported exactly once whether it comes before or after
/// `attach`.
#[derive(Debug)]
struct SenderShared {
    peer: SocketAddr,
    session: u64,
    config: RdmaConfig,
    limits: TransportLimits,
    post: Mutex<PostState>,
    /// Writes for the session thread to post.
    writes: Sender<WorkRequest>,
    /// Control messages, each with the last write it must follow.
    controls: Sender<(ControlMessage, u64)>,
    controls_queued: AtomicUsize,
    down: AtomicBool,
    link: SessionLink,
    waker: Waker,
    events: Option<Sender<ControlEvent>>,
}

impl SenderShared {
    fn post(&self) -> MutexGuard<'_, PostState> {
        self.post.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&self, event: ControlEvent) {
        if let Some(events) = &self.events {
            // The node may have stopped listening; events are advisory.
            let _ = events.send(event);
        }
    }

    /// Fails the session once: tells the queue (which errors every waiter
    /// and reclaims the slots), reports, stops the thread.
    fn fail(&self, error: Error) {
        let Some(error) = self.link.fail(error) else {
            return;
        };
        self.down.store(true, Ordering::Release);
        self.waker.wake();
        tracing::warn!(peer = %self.peer, session = self.session, %error, "RDMA interconnect connection failed");
        self.emit(ControlEvent::Disconnected {
            direction: Direction::Outbound,
            session: self.session,
            error,
        });
    }
}

/// The sending side of the RDMA transport: one authenticated session.
#[derive(Debug)]
pub struct RdmaSender {
    shared: Arc<SenderShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Everything the session thread owns (the QP and the local log's
/// registration are shared with the writers through `PostState` until the
/// session ends).
struct SessionLoop {
    conn: Connection,
    writes: Receiver<WorkRequest>,
    controls: Receiver<(ControlMessage, u64)>,
}

impl RdmaSender {
    /// Resolves and connects to the receiver at `addr`, authenticates both
    /// ways, registers `local_log` as the source of the writes and starts
    /// the session's thread. Control messages from the partner and
    /// connection events go to `events`.
    pub fn connect(
        addr: SocketAddr,
        config: &RdmaConfig,
        local_log: SharedMemory,
        events: Option<Sender<ControlEvent>>,
    ) -> Result<Arc<Self>, Error> {
        config.validate()?;
        let span = tracing::info_span!("rdma_connect", peer = %addr);
        let _entered = span.enter();
        let deadline = Deadline::after(config.timers.handshake_timeout());
        let channel = EventChannel::new()?;
        let src = config.source_addr.map(|ip| SocketAddr::new(ip, 0));
        let id = resolve(&channel, src, addr, deadline)?;
        let device = id.device_name().unwrap_or_default();
        if let Some(wanted) = &config.device {
            if *wanted != device {
                return Err(Error::Rdma(RdmaError::WrongDevice {
                    addr,
                    wanted: wanted.clone(),
                    found: device,
                }));
            }
        }
        id.resolve_route(deadline.left())?;
        super::expect_event(
            &channel,
            event::ROUTE_RESOLVED,
            deadline,
            "route resolution",
        )?;
        let id = Arc::new(id);
        let mut conn = Connection::new(
            Arc::clone(&id),
            Arc::clone(&channel),
            config.send_depth,
            addr,
        )?;
        let local_mr = conn
            .register(local_log.clone(), Access::LocalRead)
            .map_err(|error| super::in_context(error, "registering the local log for RDMA reads"))
            .inspect_err(|error| {
                tracing::error!(%error, len_bytes = local_log.len(),
                "could not register the local log with the RDMA device");
            })?;

        let nonce_d = random_bytes::<NONCE_LEN>();
        let hello = Hello {
            version: RDMA_WIRE_VERSION,
            nonce: nonce_d,
        };
        id.connect(&ConnParams {
            private_data: &hello.encode(),
            retry_count: RETRY_COUNT,
            rnr_retry_count: RNR_RETRY_COUNT,
        })?;
        let challenge = wait_established(&channel, addr, deadline)?;
        if challenge.version != RDMA_WIRE_VERSION {
            return Err(Error::VersionMismatch {
                peer: addr,
                local: RDMA_WIRE_VERSION,
                remote: challenge.version,
            });
        }
        let version = RDMA_WIRE_VERSION.to_le_bytes();
        let mac_d = proof(
            &config.key,
            &[DIALER_LABEL, &version, &nonce_d, &challenge.nonce],
        );
        conn.send(MessageKind::Response, &mac_d, 0)?;
        let (kind, bytes) = conn.next_message(deadline, "waiting for the partner's verdict")?;
        if kind != MessageKind::Verdict {
            return Err(Error::BadHandshake {
                peer: addr,
                reason: "expected a verdict",
            });
        }
        let (verdict, mac_a) =
            Verdict::decode(&bytes).map_err(|reason| Error::BadHandshake { peer: addr, reason })?;
        let refused = |reason| Error::HandshakeRefused { peer: addr, reason };
        match verdict.status {
            HandshakeStatus::Ok => {}
            HandshakeStatus::AuthFailed => return Err(refused(RefuseReason::AuthFailed)),
            HandshakeStatus::UnknownVersion | HandshakeStatus::Malformed => {
                return Err(refused(RefuseReason::Malformed))
            }
        }
        if !verify_proof(
            &config.key,
            &[
                ACCEPTOR_LABEL,
                &version,
                &nonce_d,
                &challenge.nonce,
                &bytes[VERDICT_SIGNED],
            ],
            &mac_a,
        ) {
            tracing::warn!("acceptor failed authentication: wrong pre-shared key");
            return Err(Error::AuthFailed { peer: addr });
        }
        if verdict.session == 0 || verdict.mirror_len_bytes == 0 || verdict.max_write_len_bytes == 0
        {
            return Err(Error::BadHandshake {
                peer: addr,
                reason: "verdict with session 0, an empty mirror or no write size",
            });
        }
        conn.log_gid();

        let limits = TransportLimits {
            max_in_flight: config.send_depth,
            max_write_len_bytes: config.max_write_len_bytes.min(verdict.max_write_len_bytes),
            local_len_bytes: local_log.len() as u64,
            remote_len_bytes: verdict.mirror_len_bytes,
        };
        let remote = RemoteRegion {
            addr: verdict.mirror_addr,
            rkey: verdict.rkey,
            len_bytes: verdict.mirror_len_bytes,
        };
        let (writes, writes_rx) = crossbeam_channel::bounded(config.send_depth);
        let (controls, controls_rx) = crossbeam_channel::bounded(CONTROL_BACKLOG_MAX);
        let target = PostTarget {
            qp: Arc::clone(&conn.qp),
            local_mr: Arc::new(local_mr),
            remote,
        };
        let shared = Arc::new(SenderShared {
            peer: addr,
            session: verdict.session,
            config: config.clone(),
            limits,
            post: Mutex::new(PostState {
                target: Some(target),
                highest_posted: 0,
                highest_handed_over: 0,
                queued_writes: 0,
                placed: 0,
                window: SendWindow::new(config.timers.tick()),
            }),
            writes,
            controls,
            controls_queued: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            link: SessionLink::default(),
            waker: Waker::new()?,
            events,
        });
        let session_loop = SessionLoop {
            conn,
            writes: writes_rx,
            controls: controls_rx,
        };
        let thread = {
            let shared = Arc::clone(&shared);
            let span = span.clone();
            std::thread::Builder::new()
                .name("ic-rdma-send".into())
                .spawn(move || span.in_scope(|| session_loop.run(&shared)))
                .map_err(|source| Error::io("starting the RDMA session thread", addr, source))?
        };
        tracing::info!(
            session = verdict.session,
            mirror_len_bytes = verdict.mirror_len_bytes,
            %device,
            "RDMA interconnect connected"
        );
        shared.emit(ControlEvent::Connected {
            direction: Direction::Outbound,
            session: verdict.session,
            peer: Some(addr),
        });
        Ok(Arc::new(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// The partner's address.
    pub fn peer(&self) -> SocketAddr {
        self.shared.peer
    }

    /// Why the session failed, if it did.
    pub fn failure(&self) -> Option<Arc<Error>> {
        self.shared.link.failure()
    }
}

/// Waits for ESTABLISHED and decodes the acceptor's challenge; a reject
/// with our refusal says why.
fn wait_established(
    channel: &Arc<EventChannel>,
    peer: SocketAddr,
    deadline: Deadline,
) -> Result<Challenge, Error> {
    let event = channel
        .next_event(deadline.left())?
        .ok_or_else(|| deadline.expired("connecting to the partner"))?;
    match event.kind {
        event::ESTABLISHED => Challenge::decode(&event.private_data)
            .map_err(|reason| Error::BadHandshake { peer, reason }),
        event::REJECTED => {
            let refused = |reason| Error::HandshakeRefused { peer, reason };
            match Refusal::decode(&event.private_data) {
                Some(Refusal {
                    status: HandshakeStatus::UnknownVersion,
                    version,
                }) => Err(refused(RefuseReason::UnknownVersion { supported: version })),
                Some(Refusal {
                    status: HandshakeStatus::AuthFailed,
                    ..
                }) => Err(refused(RefuseReason::AuthFailed)),
                Some(_) => Err(refused(RefuseReason::Malformed)),
                // Not ours: nobody listens there, or the CM gave up.
                None => Err(Error::Rdma(RdmaError::CmEvent {
                    expected: "the partner's accept",
                    event: super::verbs::event_name(event.kind),
                    status: event.status,
                })),
            }
        }
        kind => Err(Error::Rdma(RdmaError::CmEvent {
            expected: "the partner's accept",
            event: super::verbs::event_name(kind),
            status: event.status,
        })),
    }
}

impl Transport for RdmaSender {
    fn limits(&self) -> TransportLimits {
        self.shared.limits
    }

    fn session(&self) -> u64 {
        self.shared.session
    }

    fn attach(&self, completions: Completions) {
        self.shared.link.attach(completions);
    }

    fn post_write(&self, request: WorkRequest) {
        if self.shared.down.load(Ordering::Acquire) {
            return;
        }
        let write = WriteRequest {
            wr_id: super::wr_id(super::WR_WRITE, request.id.get()),
            local_offset: request.src_offset,
            remote_offset: request.dst_offset,
            len_bytes: request.len_bytes,
            // Alone on an idle QP: nothing after it would cover it.
            signaled: true,
        };
        let mut post = self.shared.post();
        if post.target.is_none() {
            // The session ended; its failure is being reported.
            return;
        }
        post.highest_handed_over = request.id.get();
        // An idle QP: nothing in flight, nothing waiting in the backlog.
        if post.queued_writes == 0 && post.placed == post.highest_posted {
            if let Err(error) = post.post(&[write]) {
                drop(post);
                // Not under the post lock: failing takes the queue's lock.
                self.shared.fail(error);
            }
            return;
        }
        match self.shared.writes.try_send(request) {
            Ok(()) => post.queued_writes += 1,
            // The session thread is gone; the failure is being reported.
            Err(TrySendError::Disconnected(_)) => return,
            Err(TrySendError::Full(_)) => panic!(
                "more writes in flight than the send depth {}: the send queue's slots must bound them",
                self.shared.config.send_depth
            ),
        }
        drop(post);
        self.shared.waker.wake();
    }

    fn send_control(&self, message: &ControlMessage) -> Result<(), Error> {
        if let Some(failure) = self.failure() {
            return Err(Error::Disconnected {
                session: self.shared.session,
                cause: failure,
            });
        }
        let queued = self.shared.controls_queued.fetch_add(1, Ordering::AcqRel);
        if queued >= CONTROL_BACKLOG_MAX {
            self.shared.controls_queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::ControlBacklog { queued });
        }
        // Under the post lock, so that no write handed over before this
        // message is missing from `after`: the session thread holds the
        // message back until that write is on the QP (a write the window
        // holds back would otherwise be overtaken).
        let post = self.shared.post();
        let after = post.highest_handed_over;
        let sent = self.shared.controls.try_send((*message, after));
        drop(post);
        sent.map_err(|_| Error::Closed)?;
        self.shared.waker.wake();
        Ok(())
    }

    fn close(&self) {
        self.shared.link.close();
        self.shared.down.store(true, Ordering::Release);
        self.shared.waker.wake();
    }
}

impl Drop for RdmaSender {
    fn drop(&mut self) {
        self.close();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            // The last reference may be dropped by the session thread
            // itself; it cannot join itself and is on its way out.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

impl SessionLoop {
    fn run(mut self, shared: &SenderShared) {
        if let Err(error) = self.serve(shared) {
            if !shared.down.load(Ordering::Acquire) {
                shared.fail(error);
            }
        }
        // No writer posts from now on; tell the partner at once; then the
        // verbs objects go, in order.
        let target = shared.post().target.take();
        drop(target);
        self.conn.disconnect();
        tracing::debug!(session = shared.session, "RDMA session thread done");
    }

    /// Runs until the session fails or is closed; returns why it failed.
    fn serve(&mut self, shared: &SenderShared) -> Result<(), Error> {
        let config = &shared.config;
        let signal_every = (config.send_depth / 4).max(1);
        let mut writes: Vec<WriteRequest> = Vec::new();
        // Handed over by writers, held back by the window; in id order.
        let mut backlog: VecDeque<WorkRequest> = VecDeque::with_capacity(config.send_depth);
        // Sent by the node, each held until the writes before it are posted.
        let mut held_controls: VecDeque<(ControlMessage, u64)> = VecDeque::new();
        let mut polled = Vec::new();
        let mut placed = 0u64;
        let mut detector = FailureDetector::new(config.timers.silence_timeout(), Instant::now());
        let mut last_sent = Instant::now();
        let mut heartbeat_seq = 0u64;
        let mut control_bytes = Vec::new();
        let mut woken = true;
        while !shared.down.load(Ordering::Acquire) {
            shared.waker.clear(woken);
            // One clock read per iteration: it is a system call on some
            // (virtual) machines.
            let now = Instant::now();

            // The writes handed over, as far as the window admits them:
            // one chain, signaled every `signal_every` writes and every
            // quarter window (so completions keep refilling the window)
            // and at its end, so no write waits for a later one to be
            // covered (RC completes in order).
            let highest_posted = {
                let mut post = shared.post();
                backlog.extend(self.writes.try_iter());
                writes.clear();
                let signal_bytes = (post.window.window_bytes() / 4).max(1);
                let mut chain_bytes = 0u64;
                let mut unsignaled_bytes = 0u64;
                while let Some(request) = backlog.front() {
                    let len = u64::from(request.len_bytes);
                    if !post.window.admits(chain_bytes, len) {
                        break;
                    }
                    let request = backlog.pop_front().expect("looked at above");
                    chain_bytes += len;
                    unsignaled_bytes += len;
                    let signaled = writes.len() % signal_every == signal_every - 1
                        || unsignaled_bytes >= signal_bytes;
                    if signaled {
                        unsignaled_bytes = 0;
                    }
                    writes.push(WriteRequest {
                        wr_id: super::wr_id(super::WR_WRITE, request.id.get()),
                        local_offset: request.src_offset,
                        remote_offset: request.dst_offset,
                        len_bytes: request.len_bytes,
                        signaled,
                    });
                }
                if let Some(last) = writes.last_mut() {
                    last.signaled = true;
                    post.queued_writes -= writes.len();
                    post.post(&writes)?;
                    tracing::trace!(
                        writes = writes.len(),
                        through = post.highest_posted,
                        "posted RDMA writes"
                    );
                }
                post.highest_posted
            };

            // Control messages, as credits allow, each once the writes
            // handed over before it are posted (so it arrives after them).
            // Each one's completion also covers the writes posted before it.
            held_controls.extend(self.controls.try_iter());
            while self.conn.can_send() {
                let Some(&(message, after)) = held_controls.front() else {
                    break;
                };
                if after > highest_posted {
                    break;
                }
                held_controls.pop_front();
                control_bytes.clear();
                message.encode(&mut control_bytes);
                self.conn
                    .send(MessageKind::Control, &control_bytes, highest_posted)?;
                shared.controls_queued.fetch_sub(1, Ordering::AcqRel);
                last_sent = now;
            }

            // Completions.
            if let Err(error) = self.conn.poll(&mut polled) {
                return Err(self
                    .conn
                    .explain_failure(error, config.timers.silence_timeout() / 4));
            }
            let mut newest = placed;
            for item in polled.drain(..) {
                match item {
                    Polled::Write { id } => {
                        newest = newest.max(id);
                        detector.heard(now);
                    }
                    Polled::SendDone { covers_write } => newest = newest.max(covers_write),
                    Polled::Message {
                        kind: MessageKind::Control,
                        bytes,
                    } => {
                        detector.heard(now);
                        match decode_control(&bytes[HEADER_LEN..])? {
                            ControlMessage::Heartbeat { .. } => {}
                            message => shared.emit(ControlEvent::Message {
                                direction: Direction::Outbound,
                                session: shared.session,
                                message,
                            }),
                        }
                    }
                    Polled::Message { .. } => {
                        return Err(Error::MalformedFrame {
                            kind: "rdma message",
                            reason: "a handshake message after the handshake",
                        })
                    }
                }
            }
            if newest > placed {
                {
                    let mut post = shared.post();
                    assert!(
                        newest <= post.highest_posted,
                        "completion for a write never posted"
                    );
                    post.placed = newest;
                    post.window.placed_through(newest, now, !backlog.is_empty());
                }
                placed = newest;
                shared.link.placed_through(WriteId::new(placed));
            }
            self.conn.check_cm()?;

            // Heartbeats: every interval even while writing (the receiver's
            // CPU does not see writes), and at once when owing credits.
            let idle =
                now.saturating_duration_since(last_sent) >= config.timers.heartbeat_interval();
            // (A control held back behind the window does not hold the
            // heartbeats back: they carry no order.)
            if (idle || self.conn.owes_credits()) && self.conn.can_send() {
                heartbeat_seq += 1;
                control_bytes.clear();
                ControlMessage::Heartbeat { seq: heartbeat_seq }.encode(&mut control_bytes);
                self.conn
                    .send(MessageKind::Control, &control_bytes, highest_posted)?;
                last_sent = now;
            }
            if let Some(silence) = detector.check(now) {
                let silent_ms = silence.as_millis() as u64;
                shared.emit(ControlEvent::PartnerSilent {
                    direction: Direction::Outbound,
                    session: shared.session,
                    silent_ms,
                });
                return Err(Error::PartnerSilent {
                    silent_ms,
                    timeout_ms: config.timers.silence_timeout_ms,
                });
            }
            let tick = config
                .timers
                .tick()
                .min(
                    config
                        .timers
                        .heartbeat_interval()
                        .saturating_sub(now.saturating_duration_since(last_sent)),
                )
                .max(std::time::Duration::from_millis(1));
            let spin = if placed < shared.post().highest_posted {
                std::time::Duration::from_micros(config.busy_poll_us)
            } else {
                std::time::Duration::ZERO
            };
            woken = self.conn.wait(Some(shared.waker.fd()), tick, spin)?;
        }
        Ok(())
    }
}
