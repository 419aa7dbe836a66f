//! The NBD server: a listener thread, and per connection a thread that runs
//! the handshake and then reads requests, with a pool of workers that
//! execute them and write the replies.
//!
//! ```text
//! accept thread ──► connection thread: handshake ─► reader ──(bounded queue)──► workers × N
//!                                                     │ waits for an in-flight slot │
//!                                                     └── error replies ──► writer lock ◄── replies
//! ```
//!
//! - The reader parses requests and reads a WRITE's payload fully before it
//!   dispatches it, so nothing half-received is ever executed.
//! - A request holds an in-flight slot from admission until its reply is on
//!   the socket; the reader waits while the connection has
//!   `max_in_flight_per_connection` requests or [`IN_FLIGHT_PAYLOAD_BYTES_MAX`]
//!   bytes of payload in flight. That bounds a connection's memory.
//! - A reply is one buffer (header and READ data) written whole under the
//!   writer lock, so replies never interleave; they go out in completion
//!   order, which need not be request order.
//! - Workers are scoped threads of the connection thread: when the reader
//!   stops (DISC, client gone, protocol violation, server shutdown), the
//!   queue closes, the workers finish what was dispatched, and the
//!   connection thread joins them before closing the socket.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tracing::{debug, info, info_span, trace, warn, Span};

use super::proto::{self, BadMagic, InfoRequest, OptionDataError, OptionHeader, RequestHeader};
use super::{Errno, Export, ExportError, Exports};
use crate::tcp_service::{ServiceState, TcpService};

/// The whole handshake must end within this time: a client that connects
/// and stalls does not hold a thread for ever.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(60);

/// An option longer than `max_option_bytes` but at most this long is read
/// and discarded, then refused with `NBD_REP_ERR_TOO_BIG`; a longer one is
/// treated as abuse and the connection is closed.
const OPTION_DISCARD_BYTES_MAX: u64 = 16 << 20;

/// A WRITE longer than `max_request_bytes` but at most this long has its
/// payload discarded and gets `NBD_EINVAL`; a longer one closes the
/// connection (its payload is not worth reading to keep the stream in
/// step). The spec: lengths below 2^25 SHOULD NOT be deemed a denial of
/// service, whatever the advertised maximum.
const WRITE_DISCARD_BYTES_MAX: u32 = 1 << 25;

/// Payload bytes (WRITE data received, READ data to send) one connection
/// may hold in flight, unless `max_request_bytes` is larger (one request is
/// always admitted).
const IN_FLIGHT_PAYLOAD_BYTES_MAX: u64 = 256 << 20;

/// Buffer of the reader: many pipelined request headers per system call.
const READ_BUFFER_BYTES: usize = 64 << 10;

/// Command flags valid on each command. FUA is valid on every command once
/// `NBD_FLAG_SEND_FUA` is advertised (the spec: the server MUST accept it,
/// even by ignoring it); NO_HOLE comes with `NBD_FLAG_SEND_WRITE_ZEROES`.
const FLAGS_VALID: u16 = proto::NBD_CMD_FLAG_FUA;
const FLAGS_VALID_WRITE_ZEROES: u16 = proto::NBD_CMD_FLAG_FUA | proto::NBD_CMD_FLAG_NO_HOLE;
// DF needs structured replies, REQ_ONE block status, FAST_ZERO its flag.
const _: () = assert!(
    FLAGS_VALID_WRITE_ZEROES
        & (proto::NBD_CMD_FLAG_DF | proto::NBD_CMD_FLAG_REQ_ONE | proto::NBD_CMD_FLAG_FAST_ZERO)
        == 0
);
const _: () = assert!(proto::TRANSMISSION_FLAGS & proto::NBD_FLAG_SEND_FUA != 0);
const _: () = assert!(proto::TRANSMISSION_FLAGS & proto::NBD_FLAG_SEND_WRITE_ZEROES != 0);

/// Limits of an [`NbdServer`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Longest READ or WRITE (advertised as the maximum block size). At
    /// least 4096 (the preferred block size).
    pub max_request_bytes: u32,
    /// Threads executing one connection's requests.
    pub workers_per_connection: usize,
    /// Requests one connection may have admitted and not yet answered.
    pub max_in_flight_per_connection: usize,
    /// Longest option data accepted in the handshake.
    pub max_option_bytes: u32,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            max_request_bytes: 32 << 20,
            workers_per_connection: 8,
            max_in_flight_per_connection: 64,
            max_option_bytes: 64 << 10,
        }
    }
}

impl ServerConfig {
    fn validate(&self) -> io::Result<()> {
        let invalid = |message: String| Err(io::Error::new(io::ErrorKind::InvalidInput, message));
        if self.max_request_bytes < proto::BLOCK_SIZE_PREFERRED_BYTES {
            return invalid(format!(
                "max_request_bytes {} is below the preferred block size {}",
                self.max_request_bytes,
                proto::BLOCK_SIZE_PREFERRED_BYTES
            ));
        }
        if self.workers_per_connection == 0 || self.max_in_flight_per_connection == 0 {
            return invalid(
                "workers_per_connection and max_in_flight_per_connection must be at least 1"
                    .to_owned(),
            );
        }
        // NBD_OPT_GO with the longest export name the spec allows must fit.
        let go_bytes_max = proto::NBD_STRING_BYTES_MAX + proto::INFO_REQUEST_FIXED_BYTES;
        if (self.max_option_bytes as usize) < go_bytes_max
            || u64::from(self.max_option_bytes) > OPTION_DISCARD_BYTES_MAX
        {
            return invalid(format!(
                "max_option_bytes {} is outside {go_bytes_max}..={OPTION_DISCARD_BYTES_MAX}",
                self.max_option_bytes
            ));
        }
        Ok(())
    }

    fn in_flight_payload_bytes_max(&self) -> u64 {
        IN_FLIGHT_PAYLOAD_BYTES_MAX.max(u64::from(self.max_request_bytes))
    }
}

/// An NBD server on one TCP address, serving on background threads until
/// [`NbdServer::shutdown`] or drop.
#[derive(Debug)]
pub struct NbdServer {
    service: TcpService,
}

/// What the accept thread and the connection threads share.
#[derive(Debug)]
struct Shared {
    exports: Arc<dyn Exports>,
    config: ServerConfig,
    /// [`HANDSHAKE_DEADLINE`], shorter in tests.
    handshake_deadline: Duration,
    /// The accept and connection threads' state: shutting down or not.
    service: Arc<ServiceState>,
}

impl NbdServer {
    /// Bind `addr` (e.g. "127.0.0.1:0") and serve `exports` on background
    /// threads.
    pub fn bind(
        addr: SocketAddr,
        exports: Arc<dyn Exports>,
        config: ServerConfig,
    ) -> io::Result<NbdServer> {
        NbdServer::bind_with_handshake_deadline(addr, exports, config, HANDSHAKE_DEADLINE)
    }

    pub(super) fn bind_with_handshake_deadline(
        addr: SocketAddr,
        exports: Arc<dyn Exports>,
        config: ServerConfig,
        handshake_deadline: Duration,
    ) -> io::Result<NbdServer> {
        config.validate()?;
        let listener = TcpListener::bind(addr)?;
        let service = ServiceState::new("NBD");
        let shared = Arc::new(Shared {
            exports,
            config,
            handshake_deadline,
            service: Arc::clone(&service),
        });
        let service = TcpService::start(listener, service, None, move |stream, peer| {
            serve_connection(&shared, stream, peer)
        })?;
        Ok(NbdServer { service })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.service.local_addr()
    }

    /// Stop accepting, close every connection (in-flight requests finish,
    /// their replies may be lost), join the threads. Idempotent; also on
    /// drop.
    pub fn shutdown(&self) {
        self.service.shutdown();
    }

    /// Number of open client connections (for status and metrics).
    pub fn connections(&self) -> usize {
        self.service.connections()
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Why a connection was closed by the server.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("socket error while {during}")]
    Io {
        during: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the client did not finish the handshake in time")]
    HandshakeTimeout,
    #[error("client flags {flags:#x} include flags the server did not offer")]
    UnknownClientFlags { flags: u32 },
    #[error("bad option header")]
    BadOptionMagic(#[source] BadMagic),
    #[error("{option} carries {length_bytes} bytes of data, more than the server will skip")]
    OptionTooLarge {
        option: &'static str,
        length_bytes: u32,
    },
    #[error("NBD_OPT_EXPORT_NAME with an invalid name")]
    InvalidExportName(#[source] OptionDataError),
    #[error("NBD_OPT_EXPORT_NAME for unknown export {name:?}")]
    UnknownExport { name: String },
    #[error("bad request header")]
    BadRequestMagic(#[source] BadMagic),
    #[error(
        "NBD_CMD_WRITE (cookie {cookie:#x}) of {length_bytes} bytes exceeds the maximum \
         request of {max_bytes} bytes; its payload is too large to skip"
    )]
    WriteTooLarge {
        cookie: u64,
        length_bytes: u32,
        max_bytes: u32,
    },
    #[error("no worker thread could be started")]
    NoWorkers(#[source] io::Error),
}

fn io_error(during: &'static str) -> impl FnOnce(io::Error) -> ConnectionError {
    move |source| ConnectionError::Io { during, source }
}

/// The client closed (or reset) the connection: not the server's business
/// to complain about.
fn is_disconnect(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

fn serve_connection(shared: &Shared, stream: TcpStream, peer: SocketAddr) {
    let span = info_span!("nbd_connection", %peer, export = tracing::field::Empty);
    let _entered = span.enter();
    info!("NBD client connected");
    let result = match handshake(shared, &stream) {
        Ok(HandshakeEnd::Transmission(negotiated)) => {
            span.record("export", negotiated.name.as_str());
            info!(
                size_bytes = negotiated.size_bytes,
                "NBD handshake done, serving export"
            );
            transmission(shared, &stream, &negotiated, &span)
        }
        Ok(HandshakeEnd::Closed) => Ok(()),
        Err(err) => Err(err),
    };
    match result {
        // The server closed the socket; the reader saw it as end of file.
        _ if shared.service.is_shutting_down() => {
            info!("NBD connection closed: server shutting down")
        }
        Ok(()) => info!("NBD client disconnected"),
        Err(ConnectionError::Io { during, source }) if is_disconnect(&source) => {
            info!(during, error = %source, "NBD client went away")
        }
        Err(err) => warn!(
            error = &err as &(dyn std::error::Error + 'static),
            "NBD connection closed by the server"
        ),
    }
    let _ = stream.shutdown(Shutdown::Both);
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

enum HandshakeEnd {
    Transmission(Negotiated),
    /// NBD_OPT_ABORT, or the client left.
    Closed,
}

/// The export a client chose.
struct Negotiated {
    name: String,
    export: Arc<dyn Export>,
    /// As sent to the client: requests are checked against this size.
    size_bytes: u64,
}

/// Makes reads on `stream` fail once `deadline` has passed.
fn read_until(
    stream: &TcpStream,
    deadline: Instant,
    during: &'static str,
) -> Result<(), ConnectionError> {
    let remaining = deadline
        .checked_duration_since(Instant::now())
        .filter(|remaining| !remaining.is_zero())
        .ok_or(ConnectionError::HandshakeTimeout)?;
    stream
        .set_read_timeout(Some(remaining))
        .map_err(io_error(during))
}

/// A read error during the handshake; a timeout is the deadline passing.
fn handshake_read_error(during: &'static str) -> impl FnOnce(io::Error) -> ConnectionError {
    move |source| match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ConnectionError::HandshakeTimeout,
        _ => ConnectionError::Io { during, source },
    }
}

/// Reads exactly `buf.len()` bytes before the handshake deadline.
fn read_before(
    mut stream: &TcpStream,
    deadline: Instant,
    buf: &mut [u8],
    during: &'static str,
) -> Result<(), ConnectionError> {
    read_until(stream, deadline, during)?;
    stream.read_exact(buf).map_err(handshake_read_error(during))
}

fn handshake(shared: &Shared, stream: &TcpStream) -> Result<HandshakeEnd, ConnectionError> {
    let deadline = Instant::now() + shared.handshake_deadline;
    let mut writer = stream;
    writer
        .write_all(&proto::greeting())
        .map_err(io_error("sending the greeting"))?;
    let mut flags = [0; 4];
    read_before(stream, deadline, &mut flags, "reading client flags")?;
    let flags = u32::from_be_bytes(flags);
    if flags & !proto::CLIENT_FLAGS_KNOWN != 0 {
        return Err(ConnectionError::UnknownClientFlags { flags });
    }
    let no_zeroes = flags & proto::NBD_FLAG_C_NO_ZEROES != 0;

    loop {
        let mut header = [0; proto::OPTION_HEADER_BYTES];
        match read_before(stream, deadline, &mut header, "reading an option") {
            Ok(()) => {}
            // Between options, end of file is the client leaving (e.g. after
            // NBD_OPT_ABORT without waiting for our reply).
            Err(ConnectionError::Io { source, .. }) if is_disconnect(&source) => {
                return Ok(HandshakeEnd::Closed)
            }
            Err(err) => return Err(err),
        }
        let OptionHeader {
            option,
            length_bytes,
        } = OptionHeader::decode(&header).map_err(ConnectionError::BadOptionMagic)?;
        let option_name = proto::option_name(option);
        debug!(option = option_name, length_bytes, "NBD option");

        if length_bytes > shared.config.max_option_bytes {
            // NBD_OPT_EXPORT_NAME cannot be answered with an error.
            if u64::from(length_bytes) > OPTION_DISCARD_BYTES_MAX
                || option == proto::NBD_OPT_EXPORT_NAME
            {
                return Err(ConnectionError::OptionTooLarge {
                    option: option_name,
                    length_bytes,
                });
            }
            read_until(stream, deadline, "discarding an option")?;
            let discarded = io::copy(&mut stream.take(u64::from(length_bytes)), &mut io::sink())
                .map_err(handshake_read_error("discarding an option"))?;
            if discarded < u64::from(length_bytes) {
                return Ok(HandshakeEnd::Closed);
            }
            let message = format!(
                "option data of {length_bytes} bytes exceeds the server's limit of {}",
                shared.config.max_option_bytes
            );
            send_option_reply(
                stream,
                option,
                proto::NBD_REP_ERR_TOO_BIG,
                message.as_bytes(),
            )?;
            continue;
        }

        // Bounded by max_option_bytes.
        let mut data = vec![0; length_bytes as usize];
        read_before(stream, deadline, &mut data, "reading option data")?;

        if shared.service.is_shutting_down() {
            match option {
                proto::NBD_OPT_ABORT => {}
                // Cannot be answered with an error: hard disconnect.
                proto::NBD_OPT_EXPORT_NAME => return Ok(HandshakeEnd::Closed),
                _ => {
                    send_option_reply(
                        stream,
                        option,
                        proto::NBD_REP_ERR_SHUTDOWN,
                        b"server is shutting down",
                    )?;
                    continue;
                }
            }
        }

        match option {
            proto::NBD_OPT_EXPORT_NAME => {
                let name = proto::decode_name(&data).map_err(ConnectionError::InvalidExportName)?;
                let export =
                    shared
                        .exports
                        .lookup(name)
                        .ok_or_else(|| ConnectionError::UnknownExport {
                            name: name.to_owned(),
                        })?;
                let size_bytes = export.size_bytes();
                let reply =
                    proto::export_name_reply(size_bytes, proto::TRANSMISSION_FLAGS, no_zeroes);
                writer
                    .write_all(&reply)
                    .map_err(io_error("answering NBD_OPT_EXPORT_NAME"))?;
                return Ok(HandshakeEnd::Transmission(Negotiated {
                    name: name.to_owned(),
                    export,
                    size_bytes,
                }));
            }
            proto::NBD_OPT_ABORT => {
                // The client may close without reading the ACK; that is fine.
                let _ = send_option_reply(stream, option, proto::NBD_REP_ACK, &[]);
                return Ok(HandshakeEnd::Closed);
            }
            proto::NBD_OPT_LIST => {
                if !data.is_empty() {
                    send_option_reply(
                        stream,
                        option,
                        proto::NBD_REP_ERR_INVALID,
                        b"NBD_OPT_LIST carries no data",
                    )?;
                    continue;
                }
                let mut reply = Vec::new();
                for name in shared.exports.names() {
                    reply.extend(proto::option_reply(
                        option,
                        proto::NBD_REP_SERVER,
                        &proto::rep_server_data(&name),
                    ));
                }
                reply.extend(proto::option_reply(option, proto::NBD_REP_ACK, &[]));
                writer
                    .write_all(&reply)
                    .map_err(io_error("answering NBD_OPT_LIST"))?;
            }
            proto::NBD_OPT_INFO | proto::NBD_OPT_GO => {
                if let Some(negotiated) = answer_info(shared, stream, option, &data)? {
                    if option == proto::NBD_OPT_GO {
                        return Ok(HandshakeEnd::Transmission(negotiated));
                    }
                }
            }
            // STARTTLS (NOTLS mode answers UNSUP or POLICY), STRUCTURED_REPLY,
            // meta contexts, extended headers, and options we do not know.
            _ => {
                let message = format!("{option_name} ({option}) is not supported");
                send_option_reply(stream, option, proto::NBD_REP_ERR_UNSUP, message.as_bytes())?;
            }
        }
    }
}

fn send_option_reply(
    mut stream: &TcpStream,
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> Result<(), ConnectionError> {
    stream
        .write_all(&proto::option_reply(option, reply_type, data))
        .map_err(io_error("sending an option reply"))
}

/// Answers `NBD_OPT_INFO` or `NBD_OPT_GO`; the chosen export if the answer
/// was a success.
fn answer_info(
    shared: &Shared,
    stream: &TcpStream,
    option: u32,
    data: &[u8],
) -> Result<Option<Negotiated>, ConnectionError> {
    let request = match InfoRequest::decode(data) {
        Ok(request) => request,
        Err(err) => {
            debug!(error = %err, "invalid NBD_OPT_INFO/GO data");
            send_option_reply(
                stream,
                option,
                proto::NBD_REP_ERR_INVALID,
                err.to_string().as_bytes(),
            )?;
            return Ok(None);
        }
    };
    let Some(export) = shared.exports.lookup(&request.name) else {
        debug!(
            name = request.name,
            "NBD client asked for an unknown export"
        );
        let message = format!("no export named {:?}", request.name);
        send_option_reply(
            stream,
            option,
            proto::NBD_REP_ERR_UNKNOWN,
            message.as_bytes(),
        )?;
        return Ok(None);
    };
    let size_bytes = export.size_bytes();
    let mut reply = proto::option_reply(
        option,
        proto::NBD_REP_INFO,
        &proto::info_export_data(size_bytes, proto::TRANSMISSION_FLAGS),
    );
    // The name the client used is the canonical one, except for the default
    // export, whose canonical name the Exports trait does not tell.
    if request.wants(proto::NBD_INFO_NAME) && !request.name.is_empty() {
        reply.extend(proto::option_reply(
            option,
            proto::NBD_REP_INFO,
            &proto::info_name_data(&request.name),
        ));
    }
    if request.wants(proto::NBD_INFO_BLOCK_SIZE) {
        reply.extend(proto::option_reply(
            option,
            proto::NBD_REP_INFO,
            &proto::info_block_size_data(
                proto::BLOCK_SIZE_MIN_BYTES,
                proto::BLOCK_SIZE_PREFERRED_BYTES,
                shared.config.max_request_bytes,
            ),
        ));
    }
    reply.extend(proto::option_reply(option, proto::NBD_REP_ACK, &[]));
    let mut writer = stream;
    writer
        .write_all(&reply)
        .map_err(io_error("answering NBD_OPT_INFO/GO"))?;
    Ok(Some(Negotiated {
        name: request.name,
        export,
        size_bytes,
    }))
}

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

/// A request that passed every check, ready for a worker.
#[derive(Debug)]
enum Op {
    Read {
        offset: u64,
        length_bytes: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length_bytes: u32,
        fua: bool,
    },
    Trim {
        offset: u64,
        length_bytes: u32,
        fua: bool,
    },
    Flush,
}

/// What the reader does with a request header.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Dispatch to a worker.
    Execute,
    /// Answer at once with success: a zero-length READ, WRITE, TRIM or
    /// WRITE_ZEROES has nothing to do.
    Nothing,
    /// Answer at once with this error (after skipping a WRITE's payload).
    Reject { errno: Errno, reason: &'static str },
    /// NBD_CMD_DISC: stop reading, finish, close.
    Disconnect,
    /// A WRITE whose payload is too large to skip: close.
    Close,
}

/// Checks a request against the spec and the export, in the spec's order of
/// errors: unknown command, bad flags, too long, out of range.
fn judge(header: &RequestHeader, size_bytes: u64, max_request_bytes: u32) -> Verdict {
    let reject = |errno, reason| Verdict::Reject { errno, reason };
    let flags_valid = match header.command {
        proto::NBD_CMD_READ
        | proto::NBD_CMD_WRITE
        | proto::NBD_CMD_FLUSH
        | proto::NBD_CMD_TRIM
        | proto::NBD_CMD_DISC => FLAGS_VALID,
        proto::NBD_CMD_WRITE_ZEROES => FLAGS_VALID_WRITE_ZEROES,
        // CACHE and BLOCK_STATUS were not negotiated; the rest are unknown.
        _ => return reject(Errno::Inval, "unknown or unnegotiated command"),
    };
    let length_bytes = header.length_bytes;
    // Before anything that would skip a WRITE's payload.
    if header.command == proto::NBD_CMD_WRITE
        && length_bytes > max_request_bytes.max(WRITE_DISCARD_BYTES_MAX)
    {
        return Verdict::Close;
    }
    if header.command == proto::NBD_CMD_DISC {
        // Flags, offset and length of DISC do not matter: there is no reply.
        return Verdict::Disconnect;
    }
    if header.flags & !flags_valid != 0 {
        return reject(Errno::Inval, "command flags not valid for this command");
    }
    if header.command == proto::NBD_CMD_FLUSH {
        // Offset and length are reserved; nothing to check.
        return Verdict::Execute;
    }
    // The maximum binds the requests that carry a payload. The spec also
    // binds WRITE_ZEROES, but nbdcopy (libnbd 1.14) zeroes whole holes in one
    // request regardless; TRIM the spec leaves unbound. Both are passed to
    // the export in pieces no longer than the maximum.
    let carries_payload = matches!(header.command, proto::NBD_CMD_READ | proto::NBD_CMD_WRITE);
    if carries_payload && length_bytes > max_request_bytes {
        return reject(Errno::Inval, "request longer than the maximum block size");
    }
    let in_range = header
        .offset
        .checked_add(u64::from(length_bytes))
        .is_some_and(|end| end <= size_bytes);
    if !in_range {
        // The spec: ENOSPC for a write beyond the end, EINVAL for a read or
        // trim.
        return match header.command {
            proto::NBD_CMD_WRITE | proto::NBD_CMD_WRITE_ZEROES => {
                reject(Errno::NoSpc, "write beyond the end of the export")
            }
            _ => reject(Errno::Inval, "request beyond the end of the export"),
        };
    }
    if length_bytes == 0 {
        return Verdict::Nothing;
    }
    Verdict::Execute
}

/// Admission control for one connection: at most `requests_max` requests
/// and `payload_bytes_max` payload bytes between admission and reply.
#[derive(Debug)]
struct InFlight {
    requests_max: usize,
    payload_bytes_max: u64,
    state: Mutex<InFlightState>,
    released: Condvar,
}

#[derive(Debug, Default)]
struct InFlightState {
    requests: usize,
    payload_bytes: u64,
}

/// One admitted request; gives its share back when dropped (after its reply
/// is written or lost).
#[derive(Debug)]
struct Slot<'a> {
    in_flight: &'a InFlight,
    payload_bytes: u64,
}

impl InFlight {
    fn new(requests_max: usize, payload_bytes_max: u64) -> InFlight {
        assert!(requests_max > 0 && payload_bytes_max > 0);
        InFlight {
            requests_max,
            payload_bytes_max,
            state: Mutex::new(InFlightState::default()),
            released: Condvar::new(),
        }
    }

    /// Waits until the request fits. Never waits for ever: a request no
    /// larger than the budget fits once nothing else is in flight, and
    /// everything in flight is finishing.
    fn acquire(&self, payload_bytes: u64) -> Slot<'_> {
        assert!(payload_bytes <= self.payload_bytes_max);
        let mut state = self.state.lock();
        while state.requests >= self.requests_max
            || state.payload_bytes + payload_bytes > self.payload_bytes_max
        {
            self.released.wait(&mut state);
        }
        state.requests += 1;
        state.payload_bytes += payload_bytes;
        assert!(state.requests <= self.requests_max);
        assert!(state.payload_bytes <= self.payload_bytes_max);
        Slot {
            in_flight: self,
            payload_bytes,
        }
    }

    #[cfg(test)]
    fn requests(&self) -> usize {
        self.state.lock().requests
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut state = self.in_flight.state.lock();
        assert!(state.requests > 0, "in-flight slot released twice");
        assert!(state.payload_bytes >= self.payload_bytes);
        state.requests -= 1;
        state.payload_bytes -= self.payload_bytes;
        drop(state);
        // Only the reader waits.
        self.in_flight.released.notify_one();
    }
}

/// A request handed to a worker, with its slot.
#[derive(Debug)]
struct Job<'a> {
    cookie: u64,
    command: u16,
    op: Op,
    _slot: Slot<'a>,
}

/// What the reader and the workers of one connection share.
struct Transmission<'a> {
    export: &'a dyn Export,
    /// WRITE_ZEROES and TRIM reach the export in pieces of at most this.
    piece_bytes_max: u64,
    /// Replies are written whole under this lock.
    writer: Mutex<&'a TcpStream>,
    socket: &'a TcpStream,
    /// A reply could not be written: the client is gone.
    broken: AtomicBool,
}

impl Transmission<'_> {
    /// Writes one whole reply; after the first failure, none.
    fn send(&self, reply: &[u8], cookie: u64) {
        if self.broken.load(Ordering::SeqCst) {
            return;
        }
        let result = self.writer.lock().write_all(reply);
        if let Err(err) = result {
            if !self.broken.swap(true, Ordering::SeqCst) {
                info!(cookie, error = %err, "cannot send NBD reply; closing the connection");
                // Stops the reader: nothing more will reach the client.
                let _ = self.socket.shutdown(Shutdown::Both);
            }
        }
    }

    /// Runs `operation` over `offset..offset + length_bytes` in pieces of at
    /// most `piece_bytes_max`, stopping at the first error (the request then
    /// fails: nothing partial is acknowledged).
    fn in_pieces(
        &self,
        offset: u64,
        length_bytes: u32,
        mut operation: impl FnMut(u64, u64) -> Result<(), ExportError>,
    ) -> Result<(), ExportError> {
        let end = offset + u64::from(length_bytes);
        let mut piece_offset = offset;
        while piece_offset < end {
            let piece_bytes = (end - piece_offset).min(self.piece_bytes_max);
            operation(piece_offset, piece_bytes)?;
            piece_offset += piece_bytes;
        }
        Ok(())
    }

    /// Executes a job and builds its reply: header, plus data for a READ
    /// that succeeded.
    fn execute(&self, job: &Job<'_>) -> Vec<u8> {
        // A READ's data goes in the same buffer as its header: one write.
        let data_bytes = match job.op {
            Op::Read { length_bytes, .. } => length_bytes as usize,
            _ => 0,
        };
        let mut reply = vec![0; proto::SIMPLE_REPLY_BYTES + data_bytes];
        let result = match &job.op {
            Op::Read { offset, .. } => {
                let result = self
                    .export
                    .read(*offset, &mut reply[proto::SIMPLE_REPLY_BYTES..]);
                if result.is_err() {
                    // The spec: an error reply carries no data.
                    reply.truncate(proto::SIMPLE_REPLY_BYTES);
                }
                result
            }
            Op::Write { offset, data, fua } => self.export.write(*offset, data, *fua),
            Op::WriteZeroes {
                offset,
                length_bytes,
                fua,
            } => self.in_pieces(*offset, *length_bytes, |offset, len| {
                self.export.write_zeroes(offset, len, *fua)
            }),
            Op::Trim {
                offset,
                length_bytes,
                fua,
            } => self.in_pieces(*offset, *length_bytes, |offset, len| {
                self.export.trim(offset, len, *fua)
            }),
            Op::Flush => self.export.flush(),
        };
        let error = match result {
            Ok(()) => 0,
            Err(err) => {
                warn!(
                    cookie = job.cookie,
                    command = proto::command_name(job.command),
                    errno = %err.errno,
                    error = %err.message,
                    "NBD request failed"
                );
                err.errno.code()
            }
        };
        let header: &mut [u8; proto::SIMPLE_REPLY_BYTES] = (&mut reply
            [..proto::SIMPLE_REPLY_BYTES])
            .try_into()
            .expect("reply starts with a header");
        proto::encode_simple_reply(header, error, job.cookie);
        reply
    }
}

/// Closes the socket if a worker panics (a broken invariant in an export),
/// so the reader stops and the connection ends instead of hanging.
struct CloseOnPanic<'a>(&'a TcpStream);

impl Drop for CloseOnPanic<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            let _ = self.0.shutdown(Shutdown::Both);
        }
    }
}

/// How the reader stopped without an error.
#[derive(Debug)]
enum ReaderEnd {
    Disconnect,
    ClientGone,
}

fn transmission(
    shared: &Shared,
    stream: &TcpStream,
    negotiated: &Negotiated,
    span: &Span,
) -> Result<(), ConnectionError> {
    stream
        .set_read_timeout(None)
        .map_err(io_error("entering transmission"))?;
    let config = &shared.config;
    let in_flight = InFlight::new(
        config.max_in_flight_per_connection,
        config.in_flight_payload_bytes_max(),
    );
    let state = Transmission {
        export: negotiated.export.as_ref(),
        piece_bytes_max: u64::from(config.max_request_bytes),
        writer: Mutex::new(stream),
        socket: stream,
        broken: AtomicBool::new(false),
    };
    // Never full: the in-flight slots bound what is queued.
    let (jobs, queue) = crossbeam_channel::bounded::<Job<'_>>(config.max_in_flight_per_connection);

    let result = thread::scope(|scope| {
        let mut spawn_error = None;
        let mut workers = 0;
        for index in 0..config.workers_per_connection {
            let queue = queue.clone();
            let state = &state;
            let span = span.clone();
            let spawned = thread::Builder::new()
                .name(format!("nbd-worker-{index}"))
                .spawn_scoped(scope, move || {
                    let _entered = span.enter();
                    let _close_on_panic = CloseOnPanic(state.socket);
                    for job in queue.iter() {
                        let reply = state.execute(&job);
                        state.send(&reply, job.cookie);
                        // The slot is released here, after the reply.
                    }
                });
            match spawned {
                Ok(_) => workers += 1,
                Err(err) => spawn_error = Some(err),
            }
        }
        drop(queue);
        if workers == 0 {
            let err = spawn_error.unwrap_or_else(|| io::Error::other("no workers configured"));
            return Err(ConnectionError::NoWorkers(err));
        }
        if let Some(err) = spawn_error {
            warn!(workers, error = %err, "NBD connection runs with fewer workers");
        }
        let result = read_requests(stream, negotiated, config, &in_flight, &state, &jobs);
        // Closing the queue ends the workers once they have answered every
        // dispatched request.
        drop(jobs);
        result
    });
    assert_eq!(
        in_flight.state.lock().requests,
        0,
        "every admitted request was answered"
    );
    match result? {
        ReaderEnd::Disconnect => debug!("NBD_CMD_DISC: in-flight requests answered"),
        ReaderEnd::ClientGone => debug!("NBD client closed the connection"),
    }
    Ok(())
}

fn read_requests<'a>(
    stream: &TcpStream,
    negotiated: &Negotiated,
    config: &ServerConfig,
    in_flight: &'a InFlight,
    state: &Transmission<'_>,
    jobs: &crossbeam_channel::Sender<Job<'a>>,
) -> Result<ReaderEnd, ConnectionError> {
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
    loop {
        let mut bytes = [0; proto::REQUEST_HEADER_BYTES];
        match reader.read_exact(&mut bytes) {
            Ok(()) => {}
            Err(err) if is_disconnect(&err) => return Ok(ReaderEnd::ClientGone),
            Err(source) => {
                return Err(ConnectionError::Io {
                    during: "reading a request",
                    source,
                })
            }
        }
        let header = RequestHeader::decode(&bytes).map_err(ConnectionError::BadRequestMagic)?;
        let command = proto::command_name(header.command);
        trace!(
            cookie = header.cookie,
            command,
            flags = header.flags,
            offset = header.offset,
            length_bytes = header.length_bytes,
            "NBD request"
        );
        let verdict = judge(&header, negotiated.size_bytes, config.max_request_bytes);
        let payload_bytes = if header.command == proto::NBD_CMD_WRITE {
            u64::from(header.length_bytes)
        } else {
            0
        };
        match verdict {
            Verdict::Disconnect => return Ok(ReaderEnd::Disconnect),
            Verdict::Close => {
                return Err(ConnectionError::WriteTooLarge {
                    cookie: header.cookie,
                    length_bytes: header.length_bytes,
                    max_bytes: config.max_request_bytes,
                })
            }
            Verdict::Reject { errno, reason } => {
                debug!(
                    cookie = header.cookie,
                    command,
                    offset = header.offset,
                    length_bytes = header.length_bytes,
                    flags = header.flags,
                    %errno,
                    reason,
                    "NBD request rejected"
                );
                let skipped = io::copy(&mut (&mut reader).take(payload_bytes), &mut io::sink())
                    .map_err(io_error("skipping a rejected write's payload"))?;
                if skipped < payload_bytes {
                    return Ok(ReaderEnd::ClientGone);
                }
                state.send(
                    &proto::simple_reply(errno.code(), header.cookie),
                    header.cookie,
                );
            }
            Verdict::Nothing => {
                state.send(&proto::simple_reply(0, header.cookie), header.cookie);
            }
            Verdict::Execute => {
                let fua = header.flags & proto::NBD_CMD_FLAG_FUA != 0;
                let offset = header.offset;
                let length_bytes = header.length_bytes;
                let reply_payload_bytes = if header.command == proto::NBD_CMD_READ {
                    u64::from(length_bytes)
                } else {
                    0
                };
                let slot = in_flight.acquire(payload_bytes + reply_payload_bytes);
                let op = match header.command {
                    proto::NBD_CMD_READ => Op::Read {
                        offset,
                        length_bytes,
                    },
                    proto::NBD_CMD_WRITE => {
                        // Bounded by max_request_bytes (judge).
                        let mut data = vec![0; length_bytes as usize];
                        match reader.read_exact(&mut data) {
                            Ok(()) => {}
                            // A write cut short is never executed.
                            Err(err) if is_disconnect(&err) => return Ok(ReaderEnd::ClientGone),
                            Err(source) => {
                                return Err(ConnectionError::Io {
                                    during: "reading a write's payload",
                                    source,
                                })
                            }
                        }
                        Op::Write { offset, data, fua }
                    }
                    proto::NBD_CMD_WRITE_ZEROES => Op::WriteZeroes {
                        offset,
                        length_bytes,
                        fua,
                    },
                    proto::NBD_CMD_TRIM => Op::Trim {
                        offset,
                        length_bytes,
                        fua,
                    },
                    proto::NBD_CMD_FLUSH => Op::Flush,
                    other => unreachable!("judge executes only known commands, not {other}"),
                };
                let job = Job {
                    cookie: header.cookie,
                    command: header.command,
                    op,
                    _slot: slot,
                };
                // Workers outlive the sender unless they panicked; then the
                // socket is already closed.
                if jobs.send(job).is_err() {
                    return Ok(ReaderEnd::ClientGone);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(command: u16, flags: u16, offset: u64, length_bytes: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 1,
            offset,
            length_bytes,
        }
    }

    const SIZE: u64 = 1 << 20;
    const MAX: u32 = 64 << 10;

    fn rejected(verdict: Verdict) -> Option<Errno> {
        match verdict {
            Verdict::Reject { errno, .. } => Some(errno),
            _ => None,
        }
    }

    #[test]
    fn judge_follows_the_spec_errors() {
        use proto::*;
        assert_eq!(
            judge(&header(NBD_CMD_READ, 0, 0, 4096), SIZE, MAX),
            Verdict::Execute
        );
        assert_eq!(
            judge(&header(NBD_CMD_READ, NBD_CMD_FLAG_FUA, 0, 4096), SIZE, MAX),
            Verdict::Execute
        );
        assert_eq!(
            judge(&header(NBD_CMD_READ, 0, SIZE, 0), SIZE, MAX),
            Verdict::Nothing
        );
        assert_eq!(
            judge(&header(NBD_CMD_WRITE, 0, 0, 0), SIZE, MAX),
            Verdict::Nothing
        );
        // Out of range: ENOSPC for writes, EINVAL for reads and trims.
        let past_end = SIZE - 512;
        assert_eq!(
            rejected(judge(&header(NBD_CMD_WRITE, 0, past_end, 1024), SIZE, MAX)),
            Some(Errno::NoSpc)
        );
        assert_eq!(
            rejected(judge(
                &header(NBD_CMD_WRITE_ZEROES, 0, past_end, 1024),
                SIZE,
                MAX
            )),
            Some(Errno::NoSpc)
        );
        assert_eq!(
            rejected(judge(&header(NBD_CMD_READ, 0, past_end, 1024), SIZE, MAX)),
            Some(Errno::Inval)
        );
        assert_eq!(
            rejected(judge(&header(NBD_CMD_TRIM, 0, past_end, 1024), SIZE, MAX)),
            Some(Errno::Inval)
        );
        // Offset + length overflowing u64 is out of range, not a wrap.
        assert_eq!(
            rejected(judge(&header(NBD_CMD_READ, 0, u64::MAX, 1), SIZE, MAX)),
            Some(Errno::Inval)
        );
        // Too long: EINVAL for READ and WRITE; TRIM and WRITE_ZEROES carry
        // no payload and are not bound.
        assert_eq!(
            rejected(judge(&header(NBD_CMD_READ, 0, 0, MAX + 1), SIZE, MAX)),
            Some(Errno::Inval)
        );
        assert_eq!(
            judge(&header(NBD_CMD_WRITE_ZEROES, 0, 0, MAX + 1), SIZE, MAX),
            Verdict::Execute
        );
        assert_eq!(
            rejected(judge(&header(NBD_CMD_WRITE, 0, 0, MAX + 1), SIZE, MAX)),
            Some(Errno::Inval)
        );
        assert_eq!(
            judge(&header(NBD_CMD_TRIM, 0, 0, MAX + 1), SIZE, MAX),
            Verdict::Execute
        );
        assert_eq!(
            judge(
                &header(NBD_CMD_WRITE, 0, 0, WRITE_DISCARD_BYTES_MAX + 1),
                SIZE,
                MAX
            ),
            Verdict::Close
        );
        // Flags.
        assert_eq!(
            judge(
                &header(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 0, 512),
                SIZE,
                MAX
            ),
            Verdict::Execute
        );
        assert_eq!(
            rejected(judge(
                &header(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 512),
                SIZE,
                MAX
            )),
            Some(Errno::Inval)
        );
        assert_eq!(
            rejected(judge(
                &header(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512),
                SIZE,
                MAX
            )),
            Some(Errno::Inval)
        );
        assert_eq!(
            rejected(judge(
                &header(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 512),
                SIZE,
                MAX
            )),
            Some(Errno::Inval)
        );
        assert_eq!(
            rejected(judge(&header(NBD_CMD_FLUSH, 1 << 15, 0, 0), SIZE, MAX)),
            Some(Errno::Inval)
        );
        // Commands.
        for command in [NBD_CMD_CACHE, NBD_CMD_BLOCK_STATUS, 99] {
            assert_eq!(
                rejected(judge(&header(command, 0, 0, 512), SIZE, MAX)),
                Some(Errno::Inval)
            );
        }
        assert_eq!(
            judge(&header(NBD_CMD_DISC, 0, 0, 0), SIZE, MAX),
            Verdict::Disconnect
        );
        assert_eq!(
            judge(&header(NBD_CMD_FLUSH, 0, 0, 0), SIZE, MAX),
            Verdict::Execute
        );
    }

    #[test]
    fn in_flight_never_exceeds_its_limits() {
        let in_flight = InFlight::new(4, 1000);
        let admitted_max = std::sync::atomic::AtomicUsize::new(0);
        thread::scope(|scope| {
            for thread_index in 0..8u64 {
                let in_flight = &in_flight;
                let admitted_max = &admitted_max;
                scope.spawn(move || {
                    for round in 0..200u64 {
                        let slot = in_flight.acquire((thread_index * 37 + round) % 500);
                        let requests = in_flight.requests();
                        assert!(requests <= 4);
                        assert!(in_flight.state.lock().payload_bytes <= 1000);
                        admitted_max.fetch_max(requests, Ordering::SeqCst);
                        drop(slot);
                    }
                });
            }
        });
        assert_eq!(in_flight.requests(), 0);
        assert_eq!(in_flight.state.lock().payload_bytes, 0);
        assert!(admitted_max.load(Ordering::SeqCst) >= 1);
    }
}
