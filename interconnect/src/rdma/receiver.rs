//! The accepting side: listens with rdma_cm, authenticates the partner,
//! registers the mirror for remote write for that session only, and runs
//! the control channel (heartbeats, control messages).
//!
//! One session at a time may write the mirror. A newly authenticated
//! session supersedes the previous one, and its verdict (with the mirror's
//! key) is sent only after the old session's thread has disconnected and
//! deregistered its registration of the mirror: from then on the device
//! refuses the old key, so nothing of an old session lands after the new
//! one starts.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::verbs::{event, Access, CmId, ConnParams, EventChannel, MemoryRegion, ProtectionDomain};
use super::wire::{
    Challenge, Hello, MessageKind, Refusal, Verdict, ACCEPTOR_LABEL, DIALER_LABEL, HEADER_LEN,
    RDMA_WIRE_VERSION, REFUSAL_LEN,
};
use super::{
    Connection, Deadline, Polled, RdmaConfig, Waker, CONTROL_BACKLOG_MAX, RETRY_COUNT,
    RNR_RETRY_COUNT,
};
use crate::auth::{proof, random_bytes, session_id, verify_proof};
use crate::control::{decode_control, ControlEvent, ControlMessage, Direction, FailureDetector};
use crate::tcp::wire::{HandshakeStatus, MAC_LEN, NONCE_LEN};
use crate::{Error, RdmaError, SharedMemory};

/// Connections that may be in their handshake at once; more are rejected
/// at once, so a flood of strangers cannot pin threads and registrations.
const PENDING_HANDSHAKES_MAX: usize = 4;
const MIRROR_REGISTRATION: &str = "registering the mirror for remote write";
/// How long a superseding session waits for the old one to tear down.
const SUPERSEDE_WAIT: Duration = Duration::from_secs(5);

/// Counters of a receiver, for tests and the node's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RdmaReceiverStats {
    /// Sessions authenticated.
    pub sessions_accepted: u64,
    /// Connections refused (authentication, version, malformed, busy).
    pub handshakes_refused: u64,
}

/// The session allowed to write the mirror.
#[derive(Debug)]
struct Current {
    session: u64,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    control: Sender<ControlMessage>,
    /// Disconnects (never sends) when the session's thread has dropped its
    /// verbs objects, the mirror's registration among them.
    gone: Receiver<()>,
}

#[derive(Debug)]
struct ReceiverShared {
    local_addr: SocketAddr,
    config: RdmaConfig,
    mirror: SharedMemory,
    events: Option<Sender<ControlEvent>>,
    stop: AtomicBool,
    current: Mutex<Option<Current>>,
    sessions: Mutex<Vec<JoinHandle<()>>>,
    pending_handshakes: AtomicUsize,
    sessions_accepted: AtomicU64,
    handshakes_refused: AtomicU64,
}

impl ReceiverShared {
    fn current(&self) -> MutexGuard<'_, Option<Current>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&self, event: ControlEvent) {
        if let Some(events) = &self.events {
            let _ = events.send(event);
        }
    }

    fn refused(&self) {
        self.handshakes_refused.fetch_add(1, Ordering::AcqRel);
    }
}

/// Listens for the partner over rdma_cm and lets it write `mirror`.
#[derive(Debug)]
pub struct RdmaReceiver {
    shared: Arc<ReceiverShared>,
    listener: Option<JoinHandle<()>>,
}

impl RdmaReceiver {
    /// Listens on `addr`, which must belong to an RDMA device's network
    /// interface (port 0 picks one; see [`local_addr`](Self::local_addr)).
    pub fn bind(
        addr: SocketAddr,
        config: &RdmaConfig,
        mirror: SharedMemory,
        events: Option<Sender<ControlEvent>>,
    ) -> Result<Self, Error> {
        config.validate()?;
        if mirror.is_empty() {
            return Err(Error::InvalidConfig {
                reason: "the mirror is empty".into(),
            });
        }
        let channel = EventChannel::new()?;
        let listen_id = CmId::new(&channel)?;
        listen_id.bind(addr)?;
        if let (Some(wanted), Some(found)) = (&config.device, listen_id.device_name()) {
            if *wanted != found {
                return Err(Error::Rdma(RdmaError::WrongDevice {
                    addr,
                    wanted: wanted.clone(),
                    found,
                }));
            }
        }
        // Bound to a device's address: find out now, not at the partner's
        // first connection, whether the mirror can be registered for remote
        // write (some kernels refuse long-term pins of file-backed pages).
        let listen_id = Arc::new(listen_id);
        if listen_id.device_name().is_some() {
            let pd = ProtectionDomain::new(&listen_id)?;
            MemoryRegion::register(&pd, mirror.clone(), Access::RemoteWrite)
                .map_err(|error| super::in_context(error, MIRROR_REGISTRATION))
                .inspect_err(|error| {
                    tracing::error!(%error, mirror_len_bytes = mirror.len(),
                        "could not register the mirror for remote write (see interconnect::rdma, \
                         \"Registering the NVRAM file's mapping\")");
                })?;
        }
        listen_id.listen(PENDING_HANDSHAKES_MAX as i32 * 2)?;
        let local_addr = listen_id.local_addr().unwrap_or(addr);
        let shared = Arc::new(ReceiverShared {
            local_addr,
            config: config.clone(),
            mirror,
            events,
            stop: AtomicBool::new(false),
            current: Mutex::new(None),
            sessions: Mutex::new(Vec::new()),
            pending_handshakes: AtomicUsize::new(0),
            sessions_accepted: AtomicU64::new(0),
            handshakes_refused: AtomicU64::new(0),
        });
        let listener = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("ic-rdma-accept".into())
                .spawn(move || run_listener(&shared, &channel, listen_id))
                .map_err(|source| {
                    Error::io("starting the RDMA accept thread", local_addr, source)
                })?
        };
        tracing::info!(%local_addr, mirror_len_bytes = shared.mirror.len(), "RDMA interconnect receiver listening");
        Ok(Self {
            shared,
            listener: Some(listener),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// The session currently allowed to write the mirror.
    pub fn session(&self) -> Option<u64> {
        self.shared.current().as_ref().map(|c| c.session)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> RdmaReceiverStats {
        RdmaReceiverStats {
            sessions_accepted: self.shared.sessions_accepted.load(Ordering::Acquire),
            handshakes_refused: self.shared.handshakes_refused.load(Ordering::Acquire),
        }
    }

    /// Sends a control message to the partner on the current session.
    pub fn send_control(&self, message: &ControlMessage) -> Result<(), Error> {
        let current = self.shared.current();
        let current = current.as_ref().ok_or(Error::NotConnected)?;
        current
            .control
            .try_send(*message)
            .map_err(|_| Error::ControlBacklog {
                queued: CONTROL_BACKLOG_MAX,
            })?;
        current.waker.wake();
        Ok(())
    }

    /// Stops listening, disconnects the current session and waits for
    /// every session thread.
    pub fn shutdown(&mut self) {
        if self.shared.stop.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(current) = self.shared.current().as_ref() {
            current.stop.store(true, Ordering::Release);
            current.waker.wake();
        }
        if let Some(listener) = self.listener.take() {
            let _ = listener.join();
        }
        let sessions = std::mem::take(
            &mut *self
                .shared
                .sessions
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for session in sessions {
            let _ = session.join();
        }
    }
}

impl Drop for RdmaReceiver {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run_listener(shared: &Arc<ReceiverShared>, channel: &Arc<EventChannel>, listen_id: Arc<CmId>) {
    let tick = shared.config.timers.tick();
    while !shared.stop.load(Ordering::Acquire) {
        let event = match channel.next_event(tick) {
            Ok(Some(event)) => event,
            Ok(None) => continue,
            Err(error) => {
                tracing::warn!(%error, "reading rdma_cm events failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        match (event.kind, event.request) {
            (event::CONNECT_REQUEST, Some(id)) => {
                on_request(shared, id, &event.private_data);
            }
            (event::DEVICE_REMOVAL, _) => {
                tracing::error!("the RDMA device of the listening address was removed");
            }
            (kind, _) => {
                tracing::debug!(event = %super::verbs::event_name(kind), "listener event ignored");
            }
        }
    }
    drop(listen_id);
}

fn reject(shared: &ReceiverShared, id: &CmId, status: HandshakeStatus) {
    let refusal: [u8; REFUSAL_LEN] = Refusal {
        version: RDMA_WIRE_VERSION,
        status,
    }
    .encode();
    if let Err(error) = id.reject(&refusal) {
        tracing::debug!(%error, "rejecting a connection failed");
    }
    shared.refused();
}

/// A connect request: checks its hello, then gives it a thread of its own.
fn on_request(shared: &Arc<ReceiverShared>, mut id: CmId, private_data: &[u8]) {
    let peer = id
        .peer_addr()
        .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    let hello = match Hello::decode(private_data) {
        Ok(hello) => hello,
        Err(reason) => {
            tracing::warn!(%peer, reason, "refused an RDMA connection: not an interconnect handshake");
            return reject(shared, &id, HandshakeStatus::Malformed);
        }
    };
    if hello.version != RDMA_WIRE_VERSION {
        tracing::warn!(%peer, remote_version = hello.version, local_version = RDMA_WIRE_VERSION,
            "refused an RDMA connection: unknown wire version");
        return reject(shared, &id, HandshakeStatus::UnknownVersion);
    }
    if shared.pending_handshakes.fetch_add(1, Ordering::AcqRel) >= PENDING_HANDSHAKES_MAX {
        shared.pending_handshakes.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(%peer, "refused an RDMA connection: too many handshakes in progress");
        return reject(shared, &id, HandshakeStatus::Malformed);
    }
    let channel = match EventChannel::new().and_then(|channel| {
        id.migrate(&channel)?;
        Ok(channel)
    }) {
        Ok(channel) => channel,
        Err(error) => {
            shared.pending_handshakes.fetch_sub(1, Ordering::AcqRel);
            tracing::error!(%peer, %error, "could not set up an RDMA connection");
            return reject(shared, &id, HandshakeStatus::Malformed);
        }
    };
    let connection = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name("ic-rdma-receive".into())
        .spawn(move || serve(&connection, id, channel, hello, peer));
    match spawned {
        Ok(thread) => {
            let mut sessions = shared
                .sessions
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            sessions.retain(|thread| !thread.is_finished());
            sessions.push(thread);
        }
        Err(error) => {
            shared.pending_handshakes.fetch_sub(1, Ordering::AcqRel);
            tracing::error!(%peer, %error, "could not start an RDMA connection thread");
        }
    }
}

/// What a successful handshake leaves the session loop.
struct Accepted {
    conn: Connection,
    /// This session's registration of the mirror; dropping it revokes the key.
    mirror_mr: MemoryRegion,
    session: u64,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    control: Receiver<ControlMessage>,
}

/// One inbound connection, from handshake to close.
fn serve(
    shared: &ReceiverShared,
    id: CmId,
    channel: Arc<EventChannel>,
    hello: Hello,
    peer: SocketAddr,
) {
    // Declared first, dropped last: after every verbs object of the session.
    let (gone_tx, gone_rx) = crossbeam_channel::bounded::<()>(0);
    let _gone = gone_tx;
    let span = tracing::info_span!("rdma_accept", %peer);
    let _entered = span.enter();
    let registered = std::cell::Cell::new(None);
    let handshake = accept(shared, id, channel, hello, peer, gone_rx, &registered);
    shared.pending_handshakes.fetch_sub(1, Ordering::AcqRel);
    let (error, session) = match handshake {
        Ok(accepted) => {
            let session = accepted.session;
            (run_session(shared, accepted), session)
        }
        Err((error, conn)) => {
            if let Some(conn) = &conn {
                conn.disconnect();
            }
            match registered.get() {
                None => {
                    shared.refused();
                    tracing::warn!(%error, "RDMA interconnect handshake refused");
                    return;
                }
                // Authenticated, then the verdict could not be sent.
                Some(session) => (error, session),
            }
        }
    };
    let error = Arc::new(error);
    {
        let mut current = shared.current();
        if current.as_ref().is_some_and(|c| c.session == session) {
            current.take();
        }
    }
    tracing::warn!(session, %error, "RDMA interconnect session closed");
    shared.emit(ControlEvent::Disconnected {
        direction: Direction::Inbound,
        session,
        error,
    });
}

/// The error, and the connection to disconnect if it got that far.
type HandshakeError = (Error, Option<Box<Connection>>);

fn accept(
    shared: &ReceiverShared,
    id: CmId,
    channel: Arc<EventChannel>,
    hello: Hello,
    peer: SocketAddr,
    gone: Receiver<()>,
    registered: &std::cell::Cell<Option<u64>>,
) -> Result<Accepted, HandshakeError> {
    let config = &shared.config;
    let deadline = Deadline::after(config.timers.handshake_timeout());
    let id = Arc::new(id);
    let conn = Connection::new(Arc::clone(&id), Arc::clone(&channel), 0, peer);
    let mut conn = match conn {
        Ok(conn) => conn,
        Err(error) => {
            reject(shared, &id, HandshakeStatus::Malformed);
            // Counted as refused by `reject`; do not count it twice.
            shared.handshakes_refused.fetch_sub(1, Ordering::AcqRel);
            return Err((error, None));
        }
    };
    let mirror_mr = match conn.register(shared.mirror.clone(), Access::RemoteWrite) {
        Ok(mr) => mr,
        Err(error) => {
            let error = super::in_context(error, MIRROR_REGISTRATION);
            tracing::error!(%error, mirror_len_bytes = shared.mirror.len(),
                "could not register the mirror for remote write (see interconnect::rdma, \
                 \"Registering the NVRAM file's mapping\")");
            reject(shared, &id, HandshakeStatus::Malformed);
            shared.handshakes_refused.fetch_sub(1, Ordering::AcqRel);
            return Err((error, Some(Box::new(conn))));
        }
    };
    let nonce_a = random_bytes::<NONCE_LEN>();
    let challenge = Challenge {
        version: RDMA_WIRE_VERSION,
        nonce: nonce_a,
    };
    let step = |conn: &mut Connection| -> Result<(), Error> {
        id.accept(&ConnParams {
            private_data: &challenge.encode(),
            retry_count: RETRY_COUNT,
            rnr_retry_count: RNR_RETRY_COUNT,
        })?;
        super::expect_event(
            &channel,
            event::ESTABLISHED,
            deadline,
            "the partner's connection",
        )?;
        let (kind, bytes) = conn.next_message(deadline, "waiting for the partner's proof")?;
        if kind != MessageKind::Response {
            return Err(Error::BadHandshake {
                peer,
                reason: "expected a response",
            });
        }
        let version = RDMA_WIRE_VERSION.to_le_bytes();
        if !verify_proof(
            &config.key,
            &[DIALER_LABEL, &version, &hello.nonce, &nonce_a],
            &bytes[HEADER_LEN..],
        ) {
            let refusal = Verdict {
                status: HandshakeStatus::AuthFailed,
                max_write_len_bytes: 0,
                session: 0,
                mirror_addr: 0,
                mirror_len_bytes: 0,
                rkey: 0,
            };
            let mut body = Vec::new();
            refusal.encode_fields(&mut body);
            body.extend_from_slice(&[0; MAC_LEN]);
            if conn.can_send() && conn.send(MessageKind::Verdict, &body, 0).is_ok() {
                // Let it leave before the disconnect flushes it.
                let _ = conn.next_message(Deadline::after(Duration::from_millis(200)), "");
            }
            tracing::warn!("refused an RDMA connection: wrong or missing pre-shared key");
            return Err(Error::AuthFailed { peer });
        }
        registered.set(Some(session_id()));
        Ok(())
    };
    if let Err(error) = step(&mut conn) {
        return Err((error, Some(Box::new(conn))));
    }
    let session = registered.get().expect("set by a successful step");
    let stop = Arc::new(AtomicBool::new(false));
    let waker = match Waker::new() {
        Ok(waker) => Arc::new(waker),
        Err(error) => return Err((error, Some(Box::new(conn)))),
    };
    let (control_tx, control_rx) = crossbeam_channel::bounded(CONTROL_BACKLOG_MAX);
    if let Err(error) = make_current(
        shared,
        Current {
            session,
            stop: Arc::clone(&stop),
            waker: Arc::clone(&waker),
            control: control_tx,
            gone,
        },
        peer,
    ) {
        return Err((error, Some(Box::new(conn))));
    }
    let verdict = Verdict {
        status: HandshakeStatus::Ok,
        max_write_len_bytes: config.max_write_len_bytes,
        session,
        mirror_addr: mirror_mr.addr(),
        mirror_len_bytes: mirror_mr.len() as u64,
        rkey: mirror_mr.rkey(),
    };
    let mut body = Vec::new();
    verdict.encode_fields(&mut body);
    let version = RDMA_WIRE_VERSION.to_le_bytes();
    let mac_a = proof(
        &config.key,
        &[ACCEPTOR_LABEL, &version, &hello.nonce, &nonce_a, &body],
    );
    body.extend_from_slice(&mac_a);
    if let Err(error) = conn.send(MessageKind::Verdict, &body, 0) {
        return Err((error, Some(Box::new(conn))));
    }
    conn.log_gid();
    Ok(Accepted {
        conn,
        mirror_mr,
        session,
        stop,
        waker,
        control: control_rx,
    })
}

/// Makes an authenticated session the one allowed to write the mirror; a
/// previous one is stopped, and waited for until its registration of the
/// mirror is gone.
fn make_current(shared: &ReceiverShared, new: Current, peer: SocketAddr) -> Result<(), Error> {
    let session = new.session;
    let old = {
        let mut current = shared.current();
        if shared.stop.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        current.replace(new)
    };
    if let Some(old) = old {
        tracing::info!(
            old_session = old.session,
            session,
            "new session supersedes the old one"
        );
        old.stop.store(true, Ordering::Release);
        old.waker.wake();
        // Disconnected once the old thread dropped its verbs objects; until
        // then the old key may still work, so the new one must not start.
        match old.gone.recv_timeout(SUPERSEDE_WAIT) {
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {}
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                return Err(Error::Rdma(RdmaError::TimedOut {
                    context: "waiting for the superseded session to close",
                    waited_ms: SUPERSEDE_WAIT.as_millis() as u64,
                }))
            }
            Ok(()) => unreachable!("nobody sends on a session's gone channel"),
        }
    }
    shared.sessions_accepted.fetch_add(1, Ordering::AcqRel);
    tracing::info!(session, "RDMA interconnect session accepted");
    shared.emit(ControlEvent::Connected {
        direction: Direction::Inbound,
        session,
        peer: Some(peer),
    });
    Ok(())
}

/// Serves a current session until it fails or is stopped; returns why.
fn run_session(shared: &ReceiverShared, accepted: Accepted) -> Error {
    let Accepted {
        mut conn,
        mirror_mr,
        session,
        stop,
        waker,
        control,
    } = accepted;
    let error = session_loop(shared, &mut conn, session, &stop, &waker, &control)
        .expect_err("the loop only ends with an error");
    conn.disconnect();
    // The QP goes first, then the mirror's registration: the key is dead
    // before `serve` reports the session gone.
    drop(conn);
    drop(mirror_mr);
    error
}

fn session_loop(
    shared: &ReceiverShared,
    conn: &mut Connection,
    session: u64,
    stop: &AtomicBool,
    waker: &Waker,
    control: &Receiver<ControlMessage>,
) -> Result<(), Error> {
    let config = &shared.config;
    let mut detector = FailureDetector::new(config.timers.silence_timeout(), Instant::now());
    let mut last_sent = Instant::now();
    let mut heartbeat_seq = 0u64;
    let mut polled = Vec::new();
    let mut bytes = Vec::new();
    let mut woken = true;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        if stop.load(Ordering::Acquire) {
            return Err(Error::Superseded);
        }
        waker.clear(woken);
        // One clock read per iteration: it is a system call on some
        // (virtual) machines.
        let now = Instant::now();
        while conn.can_send() {
            let Ok(message) = control.try_recv() else {
                break;
            };
            bytes.clear();
            message.encode(&mut bytes);
            conn.send(MessageKind::Control, &bytes, 0)?;
            last_sent = now;
        }
        conn.poll(&mut polled)?;
        for item in polled.drain(..) {
            match item {
                Polled::SendDone { .. } => {}
                Polled::Message {
                    kind: MessageKind::Control,
                    bytes,
                } => {
                    detector.heard(now);
                    match decode_control(&bytes[HEADER_LEN..])? {
                        ControlMessage::Heartbeat { .. } => {}
                        message => shared.emit(ControlEvent::Message {
                            direction: Direction::Inbound,
                            session,
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
                Polled::Write { .. } => unreachable!("the receiving side posts no writes"),
            }
        }
        conn.check_cm()?;
        let idle = now.saturating_duration_since(last_sent) >= config.timers.heartbeat_interval();
        if (idle || conn.owes_credits()) && conn.can_send() {
            heartbeat_seq += 1;
            bytes.clear();
            ControlMessage::Heartbeat { seq: heartbeat_seq }.encode(&mut bytes);
            conn.send(MessageKind::Control, &bytes, 0)?;
            last_sent = now;
        }
        if let Some(silence) = detector.check(now) {
            let silent_ms = silence.as_millis() as u64;
            shared.emit(ControlEvent::PartnerSilent {
                direction: Direction::Inbound,
                session,
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
            .max(Duration::from_millis(1));
        woken = conn.wait(Some(waker.fd()), tick, Duration::ZERO)?;
    }
}
