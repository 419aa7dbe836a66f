//! The accepting side: authenticates the partner's connection and applies
//! its write frames into the mirror memory, in order, acking cumulatively.
//!
//! One session at a time may write the mirror: a newly authenticated
//! connection supersedes the previous one, whose socket is shut down and
//! whose frames are refused from then on (the session check and the write
//! happen under one lock). So nothing of an old session is applied after
//! the new one starts.

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::Sender;

use super::conn::{configure_stream, FrameReader};
use super::wire::{encode_frame, Frame, FrameKind};
use super::TcpConfig;
use crate::auth::accept_handshake;
use crate::control::{decode_control, ControlEvent, ControlMessage, Direction, FailureDetector};
use crate::{Error, SharedMemory};

/// Connections that may be in their handshake at once; more are closed at
/// once, so a flood of strangers cannot pin threads.
const PENDING_HANDSHAKES_MAX: usize = 4;

/// Counters of a receiver, for tests and the node's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReceiverStats {
    /// Sessions authenticated.
    pub sessions_accepted: u64,
    /// Connections refused (authentication, version, malformed handshake).
    pub handshakes_refused: u64,
    /// Write frames applied to the mirror.
    pub frames_applied: u64,
    /// Payload bytes applied to the mirror.
    pub bytes_applied: u64,
    /// The id of the last write frame applied.
    pub applied_through: u64,
}

/// The session allowed to write the mirror, and its socket for sending.
#[derive(Debug)]
struct Current {
    session: u64,
    writer: Arc<Mutex<TcpStream>>,
}

#[derive(Debug)]
struct ReceiverShared {
    local_addr: SocketAddr,
    config: TcpConfig,
    mirror: SharedMemory,
    events: Option<Sender<ControlEvent>>,
    stop: AtomicBool,
    current: Mutex<Option<Current>>,
    pending_handshakes: AtomicUsize,
    sessions_accepted: AtomicU64,
    handshakes_refused: AtomicU64,
    frames_applied: AtomicU64,
    bytes_applied: AtomicU64,
    applied_through: AtomicU64,
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
}

/// Listens for the partner and applies its writes into `mirror`.
#[derive(Debug)]
pub struct MirrorReceiver {
    shared: Arc<ReceiverShared>,
    accept_thread: Option<JoinHandle<()>>,
}

impl MirrorReceiver {
    /// Listens on `addr` (port 0 picks one; see [`local_addr`](Self::local_addr)).
    pub fn bind(
        addr: SocketAddr,
        config: &TcpConfig,
        mirror: SharedMemory,
        events: Option<Sender<ControlEvent>>,
    ) -> Result<Self, Error> {
        config.validate()?;
        let listener =
            TcpListener::bind(addr).map_err(|source| Error::io("binding", addr, source))?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| Error::io("binding", addr, source))?;
        let shared = Arc::new(ReceiverShared {
            local_addr,
            config: config.clone(),
            mirror,
            events,
            stop: AtomicBool::new(false),
            current: Mutex::new(None),
            pending_handshakes: AtomicUsize::new(0),
            sessions_accepted: AtomicU64::new(0),
            handshakes_refused: AtomicU64::new(0),
            frames_applied: AtomicU64::new(0),
            bytes_applied: AtomicU64::new(0),
            applied_through: AtomicU64::new(0),
        });
        let accept_thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("ic-accept".into())
                .spawn(move || run_acceptor(&shared, &listener))
                .map_err(|source| Error::io("starting the accept thread", local_addr, source))?
        };
        tracing::info!(%local_addr, mirror_len_bytes = shared.mirror.len(), "interconnect receiver listening");
        Ok(Self {
            shared,
            accept_thread: Some(accept_thread),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// The session currently allowed to write the mirror.
    pub fn session(&self) -> Option<u64> {
        self.shared
            .current()
            .as_ref()
            .map(|current| current.session)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ReceiverStats {
        let shared = &self.shared;
        ReceiverStats {
            sessions_accepted: shared.sessions_accepted.load(Ordering::Acquire),
            handshakes_refused: shared.handshakes_refused.load(Ordering::Acquire),
            frames_applied: shared.frames_applied.load(Ordering::Acquire),
            bytes_applied: shared.bytes_applied.load(Ordering::Acquire),
            applied_through: shared.applied_through.load(Ordering::Acquire),
        }
    }

    /// Sends a control message to the partner on the current session.
    pub fn send_control(&self, message: &ControlMessage) -> Result<(), Error> {
        let (session, writer) = match self.shared.current().as_ref() {
            Some(current) => (current.session, Arc::clone(&current.writer)),
            None => return Err(Error::NotConnected),
        };
        send_control_frame(&writer, session, message)
    }

    /// Stops listening and closes the current session.
    pub fn shutdown(&mut self) {
        if self.shared.stop.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(current) = self.shared.current().take() {
            shutdown_writer(&current.writer);
        }
        // Wake the blocking accept.
        let _ = TcpStream::connect(self.shared.local_addr);
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for MirrorReceiver {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock_writer(writer: &Mutex<TcpStream>) -> MutexGuard<'_, TcpStream> {
    writer.lock().unwrap_or_else(PoisonError::into_inner)
}

fn shutdown_writer(writer: &Mutex<TcpStream>) {
    let _ = lock_writer(writer).shutdown(Shutdown::Both);
}

fn send_control_frame(
    writer: &Mutex<TcpStream>,
    session: u64,
    message: &ControlMessage,
) -> Result<(), Error> {
    let mut frame = Vec::new();
    encode_frame(
        &mut frame,
        FrameKind::Control,
        session,
        0,
        0,
        &message.to_bytes(),
    );
    send_frames(writer, &frame)
}

fn send_frames(writer: &Mutex<TcpStream>, bytes: &[u8]) -> Result<(), Error> {
    let mut stream = lock_writer(writer);
    let peer = stream
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    stream
        .write_all(bytes)
        .map_err(|source| Error::io("writing to the interconnect", peer, source))
}

fn run_acceptor(shared: &Arc<ReceiverShared>, listener: &TcpListener) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let stream = match stream {
            Ok(stream) => stream,
            Err(error) => {
                // Out of descriptors, say: do not spin on it.
                tracing::warn!(%error, "accept failed");
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        let peer = match stream.peer_addr() {
            Ok(peer) => peer,
            Err(_) => continue,
        };
        if shared.pending_handshakes.fetch_add(1, Ordering::AcqRel) >= PENDING_HANDSHAKES_MAX {
            shared.pending_handshakes.fetch_sub(1, Ordering::AcqRel);
            shared.handshakes_refused.fetch_add(1, Ordering::AcqRel);
            tracing::warn!(%peer, "refused a connection: too many handshakes in progress");
            continue;
        }
        let connection = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("ic-receive".into())
            .spawn(move || serve(&connection, stream, peer));
        if let Err(error) = spawned {
            shared.pending_handshakes.fetch_sub(1, Ordering::AcqRel);
            tracing::error!(%peer, %error, "could not start a connection thread");
        }
    }
}

/// One inbound connection, from handshake to close.
fn serve(shared: &ReceiverShared, mut stream: TcpStream, peer: SocketAddr) {
    let span = tracing::info_span!("accept", %peer);
    let _entered = span.enter();
    let config = &shared.config;
    let registered = std::cell::Cell::new(None);
    let handshake = configure_stream(
        &stream,
        peer,
        config.timers.handshake_timeout(),
        config.timers.handshake_timeout(),
    )
    .and_then(|()| {
        stream
            .try_clone()
            .map_err(|source| Error::io("cloning the socket", peer, source))
    })
    .and_then(|writer| {
        let writer = Arc::new(Mutex::new(writer));
        let params = accept_handshake(
            &mut stream,
            peer,
            &config.key,
            shared.mirror.len() as u64,
            config.max_frame_len_bytes,
            |session| {
                make_current(shared, session, peer, &writer)?;
                registered.set(Some(session));
                Ok(())
            },
        )?;
        Ok((params, writer))
    });
    shared.pending_handshakes.fetch_sub(1, Ordering::AcqRel);
    let error = match handshake {
        Ok((params, writer)) => match run_session(shared, stream, peer, params.session, writer) {
            Ok(never) => match never {},
            Err(error) => Arc::new(error),
        },
        Err(error) => {
            if registered.get().is_none() {
                shared.handshakes_refused.fetch_add(1, Ordering::AcqRel);
                tracing::warn!(%error, "interconnect handshake refused");
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
            // Authenticated, then the verdict could not be sent.
            Arc::new(error)
        }
    };
    let session = registered.get().expect("only registered sessions get here");
    {
        let mut current = shared.current();
        if current
            .as_ref()
            .is_some_and(|current| current.session == session)
        {
            let old = current.take().expect("checked above");
            shutdown_writer(&old.writer);
        }
    }
    tracing::warn!(session, %error, "interconnect session closed");
    shared.emit(ControlEvent::Disconnected {
        direction: Direction::Inbound,
        session,
        error,
    });
}

/// Makes an authenticated session the one allowed to write the mirror,
/// superseding (and disconnecting) the previous one.
fn make_current(
    shared: &ReceiverShared,
    session: u64,
    peer: SocketAddr,
    writer: &Arc<Mutex<TcpStream>>,
) -> Result<(), Error> {
    {
        let mut current = shared.current();
        if shared.stop.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let new = Current {
            session,
            writer: Arc::clone(writer),
        };
        if let Some(old) = current.replace(new) {
            tracing::info!(
                old_session = old.session,
                session,
                "new session supersedes the old one"
            );
            shutdown_writer(&old.writer);
        }
    }
    shared.sessions_accepted.fetch_add(1, Ordering::AcqRel);
    tracing::info!(session, "interconnect session accepted");
    shared.emit(ControlEvent::Connected {
        direction: Direction::Inbound,
        session,
        peer: Some(peer),
    });
    Ok(())
}

/// Serves a current session until it fails; only returns an error.
fn run_session(
    shared: &ReceiverShared,
    stream: TcpStream,
    peer: SocketAddr,
    session: u64,
    writer: Arc<Mutex<TcpStream>>,
) -> Result<Never, Error> {
    let config = &shared.config;
    configure_stream(
        &stream,
        peer,
        config.timers.tick(),
        config.timers.silence_timeout(),
    )?;
    Connection {
        shared,
        peer,
        session,
        writer,
        last_write_id: 0,
    }
    .run(stream)
}

struct Connection<'a> {
    shared: &'a ReceiverShared,
    peer: SocketAddr,
    session: u64,
    writer: Arc<Mutex<TcpStream>>,
    last_write_id: u64,
}

/// Never constructed: `run` only returns errors.
enum Never {}

impl Connection<'_> {
    fn run(mut self, mut stream: TcpStream) -> Result<Never, Error> {
        let config = &self.shared.config;
        let mut reader = FrameReader::new(config.max_frame_len_bytes);
        let mut detector = FailureDetector::new(config.timers.silence_timeout(), Instant::now());
        let mut last_sent = Instant::now();
        let mut acked = 0u64;
        let mut heartbeat_seq = 0u64;
        let mut out = Vec::new();
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
            if reader.fill(&mut stream, self.peer)? {
                detector.heard(Instant::now());
            }
            while let Some(frame) = reader.next_frame()? {
                self.handle(frame)?;
            }
            out.clear();
            if self.last_write_id > acked {
                acked = self.last_write_id;
                encode_frame(&mut out, FrameKind::Ack, self.session, acked, 0, &[]);
            }
            if out.is_empty() && last_sent.elapsed() >= config.timers.heartbeat_interval() {
                heartbeat_seq += 1;
                let heartbeat = ControlMessage::Heartbeat { seq: heartbeat_seq };
                encode_frame(
                    &mut out,
                    FrameKind::Control,
                    self.session,
                    0,
                    0,
                    &heartbeat.to_bytes(),
                );
            }
            if !out.is_empty() {
                send_frames(&self.writer, &out)?;
                last_sent = Instant::now();
            }
            if let Some(silence) = detector.check(Instant::now()) {
                let silent_ms = silence.as_millis() as u64;
                self.shared.emit(ControlEvent::PartnerSilent {
                    direction: Direction::Inbound,
                    session: self.session,
                    silent_ms,
                });
                return Err(Error::PartnerSilent {
                    silent_ms,
                    timeout_ms: config.timers.silence_timeout_ms,
                });
            }
        }
    }

    fn handle(&mut self, frame: Frame<'_>) -> Result<(), Error> {
        if frame.session != self.session {
            return Err(Error::SessionMismatch {
                expected: self.session,
                found: frame.session,
            });
        }
        match frame.kind {
            FrameKind::Write => self.apply(&frame),
            FrameKind::Control => {
                match decode_control(frame.payload)? {
                    ControlMessage::Heartbeat { .. } => {}
                    message => self.shared.emit(ControlEvent::Message {
                        direction: Direction::Inbound,
                        session: self.session,
                        message,
                    }),
                }
                Ok(())
            }
            FrameKind::Ack => Err(Error::MalformedFrame {
                kind: "ack",
                reason: "the sending side sent an ack to the receiver",
            }),
        }
    }

    /// Checks a write frame against the mirror and applies it, unless a
    /// newer session has taken over.
    fn apply(&mut self, frame: &Frame<'_>) -> Result<(), Error> {
        if self.last_write_id != 0 && frame.id <= self.last_write_id {
            return Err(Error::FrameOutOfOrder {
                id: frame.id,
                previous: self.last_write_id,
            });
        }
        let len_bytes = frame.payload.len() as u64;
        let mirror_len_bytes = self.shared.mirror.len() as u64;
        let in_bounds = frame
            .offset
            .checked_add(len_bytes)
            .is_some_and(|end| end <= mirror_len_bytes);
        if !in_bounds {
            return Err(Error::FrameOutOfBounds {
                offset: frame.offset,
                len_bytes,
                mirror_len_bytes,
            });
        }
        {
            let current = self.shared.current();
            if current.as_ref().map(|current| current.session) != Some(self.session) {
                return Err(Error::Superseded);
            }
            self.shared
                .mirror
                .write_at(frame.offset, frame.payload)
                .expect("the range was checked against the mirror");
        }
        self.last_write_id = frame.id;
        self.shared.frames_applied.fetch_add(1, Ordering::AcqRel);
        self.shared
            .bytes_applied
            .fetch_add(len_bytes, Ordering::AcqRel);
        self.shared
            .applied_through
            .store(frame.id, Ordering::Release);
        tracing::trace!(
            session = self.session,
            write_id = frame.id,
            offset = frame.offset,
            len_bytes,
            "write applied"
        );
        Ok(())
    }
}
