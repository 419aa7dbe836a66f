//! The dialing side: implements `Transport` over one authenticated TCP
//! connection (one session).

use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use super::conn::{configure_stream, FrameReader};
use super::wire::{begin_frame, encode_frame, finish_frame, FrameKind};
use super::TcpConfig;
use crate::auth::dial_handshake;
use crate::control::{decode_control, ControlEvent, ControlMessage, Direction, FailureDetector};
use crate::transport::{Completions, WriteId};
use crate::transport::{SessionLink, Transport, TransportLimits, WorkRequest};
use crate::{Error, SharedMemory};

/// Control messages that may wait to be sent before `send_control` refuses.
const CONTROL_BACKLOG_MAX: usize = 64;
/// The writer thread stops adding frames to a batch past this size.
const BATCH_MAX_BYTES: usize = 256 * 1024;

#[derive(Debug)]
enum Outgoing {
    Write(WorkRequest),
    Control(ControlMessage),
}

/// The completion handle and the failure, changed together under one lock
/// so a failure is reported exactly once whether it comes before or after
/// `attach`.
#[derive(Debug)]
struct SenderShared {
    peer: SocketAddr,
    session: u64,
    config: TcpConfig,
    limits: TransportLimits,
    local_log: SharedMemory,
    outgoing: Sender<Outgoing>,
    controls_queued: AtomicUsize,
    /// Highest write id put on the wire: acks beyond it are a protocol error.
    highest_sent: AtomicU64,
    down: AtomicBool,
    link: SessionLink,
    /// For shutting the socket down from any thread.
    stream: TcpStream,
    events: Option<Sender<ControlEvent>>,
}

impl SenderShared {
    fn emit(&self, event: ControlEvent) {
        if let Some(events) = &self.events {
            // The node may have stopped listening; events are advisory.
            let _ = events.send(event);
        }
    }

    /// Fails the session once: shuts the socket, tells the queue, reports.
    fn fail(&self, error: Error) {
        let Some(error) = self.link.fail(error) else {
            return;
        };
        self.down.store(true, Ordering::Release);
        let _ = self.stream.shutdown(Shutdown::Both);
        tracing::warn!(peer = %self.peer, session = self.session, %error, "interconnect connection failed");
        self.emit(ControlEvent::Disconnected {
            direction: Direction::Outbound,
            session: self.session,
            error,
        });
    }
}

/// The sending side of the TCP transport: one authenticated session.
#[derive(Debug)]
pub struct TcpSender {
    shared: Arc<SenderShared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl TcpSender {
    /// Dials `addr`, authenticates both ways and starts the session's
    /// threads. Control messages from the partner and connection events go
    /// to `events`.
    pub fn connect(
        addr: SocketAddr,
        config: &TcpConfig,
        local_log: SharedMemory,
        events: Option<Sender<ControlEvent>>,
    ) -> Result<Arc<Self>, Error> {
        config.validate()?;
        let span = tracing::info_span!("connect", peer = %addr);
        let _entered = span.enter();
        let mut stream = TcpStream::connect_timeout(&addr, config.timers.handshake_timeout())
            .map_err(|source| Error::io("connecting", addr, source))?;
        configure_stream(
            &stream,
            addr,
            config.timers.handshake_timeout(),
            config.timers.handshake_timeout(),
        )?;
        let params = dial_handshake(&mut stream, addr, &config.key).inspect_err(|error| {
            tracing::warn!(%error, "interconnect handshake failed");
        })?;
        configure_stream(
            &stream,
            addr,
            config.timers.tick(),
            config.timers.silence_timeout(),
        )?;

        let max_write_len_bytes = config.max_frame_len_bytes.min(params.max_frame_len_bytes);
        if max_write_len_bytes == 0 {
            return Err(Error::BadHandshake {
                peer: addr,
                reason: "the partner takes no frame payload",
            });
        }
        let limits = TransportLimits {
            max_in_flight: config.send_depth,
            max_write_len_bytes,
            local_len_bytes: local_log.len() as u64,
            remote_len_bytes: params.mirror_len_bytes,
        };
        let (outgoing, outgoing_rx) =
            crossbeam_channel::bounded(config.send_depth + CONTROL_BACKLOG_MAX);
        let clone = |stream: &TcpStream| {
            stream
                .try_clone()
                .map_err(|source| Error::io("cloning the socket", addr, source))
        };
        let shared = Arc::new(SenderShared {
            peer: addr,
            session: params.session,
            config: config.clone(),
            limits,
            local_log,
            outgoing,
            controls_queued: AtomicUsize::new(0),
            highest_sent: AtomicU64::new(0),
            down: AtomicBool::new(false),
            link: SessionLink::default(),
            stream: clone(&stream)?,
            events,
        });
        let writer = {
            let shared = Arc::clone(&shared);
            let stream = clone(&stream)?;
            let span = span.clone();
            std::thread::Builder::new()
                .name("ic-send-writer".into())
                .spawn(move || span.in_scope(|| run_writer(&shared, stream, &outgoing_rx)))
                .map_err(|source| Error::io("starting the writer thread", addr, source))?
        };
        let reader = {
            let shared = Arc::clone(&shared);
            let span = span.clone();
            std::thread::Builder::new()
                .name("ic-send-reader".into())
                .spawn(move || span.in_scope(|| run_reader(&shared, stream)))
                .map_err(|source| Error::io("starting the reader thread", addr, source))?
        };
        tracing::info!(
            session = params.session,
            mirror_len_bytes = params.mirror_len_bytes,
            "interconnect connected"
        );
        shared.emit(ControlEvent::Connected {
            direction: Direction::Outbound,
            session: params.session,
            peer: Some(addr),
        });
        Ok(Arc::new(Self {
            shared,
            threads: Mutex::new(vec![writer, reader]),
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

impl Transport for TcpSender {
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
        match self.shared.outgoing.try_send(Outgoing::Write(request)) {
            Ok(()) => {}
            // The writer thread is gone; the failure is being reported.
            Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => panic!(
                "more writes in flight than the send depth {}: the send queue's slots must bound them",
                self.shared.config.send_depth
            ),
        }
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
        self.shared
            .outgoing
            .try_send(Outgoing::Control(*message))
            .map_err(|_| Error::Closed)
    }

    fn close(&self) {
        self.shared.link.close();
        self.shared.down.store(true, Ordering::Release);
        let _ = self.shared.stream.shutdown(Shutdown::Both);
    }
}

impl Drop for TcpSender {
    fn drop(&mut self) {
        self.close();
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        let this_thread = std::thread::current().id();
        for thread in threads {
            // The last reference may be dropped by one of the session's own
            // threads (through the queue's completion handle); it cannot
            // join itself, and it is already on its way out.
            if thread.thread().id() != this_thread {
                // The threads see `down` within one poll tick.
                let _ = thread.join();
            }
        }
    }
}

/// A write frame being assembled from contiguous work requests.
struct OpenWrite {
    start: usize,
    dst_offset: u64,
    src_end: u64,
    len_bytes: u64,
    last_id: WriteId,
}

/// Drains the outgoing queue into batches of frames, one `write_all` per
/// batch; sends a heartbeat when idle for an interval.
fn run_writer(shared: &SenderShared, mut stream: TcpStream, outgoing: &Receiver<Outgoing>) {
    use std::io::Write;
    let session = shared.session;
    let max_write_len = u64::from(shared.limits.max_write_len_bytes);
    let mut batch = Vec::with_capacity(BATCH_MAX_BYTES + max_write_len as usize);
    let mut heartbeat_seq = 0u64;
    let mut control_payload = Vec::new();

    let close_write = |batch: &mut Vec<u8>, open: &mut Option<OpenWrite>| {
        if let Some(write) = open.take() {
            finish_frame(
                batch,
                write.start,
                FrameKind::Write,
                session,
                write.last_id.get(),
                write.dst_offset,
            );
        }
    };

    while !shared.down.load(Ordering::Acquire) {
        let first = match outgoing.recv_timeout(shared.config.timers.heartbeat_interval()) {
            Ok(item) => Some(item),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        batch.clear();
        let mut open: Option<OpenWrite> = None;
        let mut highest = WriteId::NONE;
        let mut next = first;
        while let Some(item) = next {
            match item {
                Outgoing::Write(request) => {
                    let len = u64::from(request.len_bytes);
                    let extends = open.as_ref().is_some_and(|write| {
                        write.src_end == request.src_offset
                            && write.dst_offset + write.len_bytes == request.dst_offset
                            && write.len_bytes + len <= max_write_len
                    });
                    if !extends {
                        close_write(&mut batch, &mut open);
                        open = Some(OpenWrite {
                            start: begin_frame(&mut batch),
                            dst_offset: request.dst_offset,
                            src_end: request.src_offset,
                            len_bytes: 0,
                            last_id: request.id,
                        });
                    }
                    let write = open.as_mut().expect("a write frame is open");
                    let at = batch.len();
                    batch.resize(at + len as usize, 0);
                    shared
                        .local_log
                        .read_at(request.src_offset, &mut batch[at..])
                        .expect("the send queue checked the source range");
                    write.src_end += len;
                    write.len_bytes += len;
                    write.last_id = request.id;
                    highest = request.id;
                }
                Outgoing::Control(message) => {
                    close_write(&mut batch, &mut open);
                    shared.controls_queued.fetch_sub(1, Ordering::AcqRel);
                    control_payload.clear();
                    message.encode(&mut control_payload);
                    encode_frame(
                        &mut batch,
                        FrameKind::Control,
                        session,
                        0,
                        0,
                        &control_payload,
                    );
                }
            }
            next = if batch.len() < BATCH_MAX_BYTES {
                outgoing.try_recv().ok()
            } else {
                None
            };
        }
        close_write(&mut batch, &mut open);
        if batch.is_empty() {
            heartbeat_seq += 1;
            control_payload.clear();
            ControlMessage::Heartbeat { seq: heartbeat_seq }.encode(&mut control_payload);
            encode_frame(
                &mut batch,
                FrameKind::Control,
                session,
                0,
                0,
                &control_payload,
            );
        }
        if highest > WriteId::NONE {
            shared.highest_sent.store(highest.get(), Ordering::Release);
        }
        if let Err(source) = stream.write_all(&batch) {
            shared.fail(Error::io(
                "writing to the interconnect",
                shared.peer,
                source,
            ));
            return;
        }
    }
}

/// Takes acks and control messages; watches for silence.
fn run_reader(shared: &SenderShared, mut stream: TcpStream) {
    let mut reader = FrameReader::new(shared.config.max_frame_len_bytes);
    let mut detector = FailureDetector::new(shared.config.timers.silence_timeout(), Instant::now());
    let mut acked = 0u64;
    while !shared.down.load(Ordering::Acquire) {
        if let Err(error) = read_once(shared, &mut stream, &mut reader, &mut detector, &mut acked) {
            if !shared.down.load(Ordering::Acquire) {
                shared.fail(error);
            }
            return;
        }
    }
}

fn read_once(
    shared: &SenderShared,
    stream: &mut TcpStream,
    reader: &mut FrameReader,
    detector: &mut FailureDetector,
    acked: &mut u64,
) -> Result<(), Error> {
    if reader.fill(stream, shared.peer)? {
        detector.heard(Instant::now());
    }
    let mut newly_acked = None;
    while let Some(frame) = reader.next_frame()? {
        if frame.session != shared.session {
            return Err(Error::SessionMismatch {
                expected: shared.session,
                found: frame.session,
            });
        }
        match frame.kind {
            FrameKind::Ack => {
                let sent = shared.highest_sent.load(Ordering::Acquire);
                if frame.id > sent {
                    return Err(Error::AckBeyondSent {
                        acked: frame.id,
                        sent,
                    });
                }
                if frame.id > *acked {
                    *acked = frame.id;
                    newly_acked = Some(WriteId::new(frame.id));
                }
            }
            FrameKind::Control => match decode_control(frame.payload)? {
                ControlMessage::Heartbeat { .. } => {}
                message => shared.emit(ControlEvent::Message {
                    direction: Direction::Outbound,
                    session: shared.session,
                    message,
                }),
            },
            FrameKind::Write => {
                return Err(Error::MalformedFrame {
                    kind: "write",
                    reason: "the receiving side sent a write to the sender",
                })
            }
        }
    }
    if let Some(id) = newly_acked {
        shared.link.placed_through(id);
    }
    if let Some(silence) = detector.check(Instant::now()) {
        let silent_ms = silence.as_millis() as u64;
        shared.emit(ControlEvent::PartnerSilent {
            direction: Direction::Outbound,
            session: shared.session,
            silent_ms,
        });
        return Err(Error::PartnerSilent {
            silent_ms,
            timeout_ms: shared.config.timers.silence_timeout_ms,
        });
    }
    Ok(())
}
