//! The crate's one error type.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

/// Why a peer refused our handshake, as carried on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// The peer does not speak our wire version; it speaks `supported`.
    UnknownVersion {
        /// The version the refusing peer speaks.
        supported: u16,
    },
    /// Our proof of the pre-shared key did not verify: the keys differ.
    AuthFailed,
    /// The peer could not parse our handshake message.
    Malformed,
}

impl std::fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownVersion { supported } => {
                write!(
                    f,
                    "unknown wire version (the peer speaks version {supported})"
                )
            }
            Self::AuthFailed => {
                f.write_str("authentication failed: the pre-shared keys of the two nodes differ")
            }
            Self::Malformed => f.write_str("malformed handshake message"),
        }
    }
}

/// Everything that can go wrong in the interconnect.
///
/// Errors a user or a peer can cause are values of this type; a broken
/// invariant of this crate is a panic.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // --- configuration and API use ---
    /// The send queue refused or lost a write.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// A copy into or out of a memory region would leave it.
    #[error("the range of {len_bytes} bytes at offset {offset} lies outside the {region_len_bytes}-byte memory region")]
    OutOfBounds {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len_bytes: u64,
        /// Length of the region.
        region_len_bytes: u64,
    },
    /// The queue's connection has failed; reserve again after `SendQueue::reconnect`.
    #[error(
        "the interconnect connection (session {session:#x}) is down; reconnect before mirroring"
    )]
    Disconnected {
        /// The failed session.
        session: u64,
        /// Why it failed.
        #[source]
        cause: Arc<Error>,
    },
    /// A configuration value is unusable.
    #[error("invalid interconnect configuration: {reason}")]
    InvalidConfig {
        /// What is wrong, in the config's own terms.
        reason: String,
    },

    // --- authentication and handshake ---
    /// The pre-shared key is too short to be a key.
    #[error(
        "the interconnect pre-shared key is {len_bytes} bytes; at least {min_bytes} are required"
    )]
    KeyTooShort {
        /// Its length.
        len_bytes: usize,
        /// The minimum.
        min_bytes: usize,
    },
    /// The peer's proof of the pre-shared key did not verify.
    #[error("peer {peer} failed authentication: its proof does not match our pre-shared key")]
    AuthFailed {
        /// The peer.
        peer: SocketAddr,
    },
    /// The peer refused our handshake and said why.
    #[error("peer {peer} refused the handshake: {reason}")]
    HandshakeRefused {
        /// The peer.
        peer: SocketAddr,
        /// Its reason.
        reason: RefuseReason,
    },
    /// The peer speaks another wire version.
    #[error(
        "peer {peer} speaks interconnect wire version {remote}; this node speaks version {local}"
    )]
    VersionMismatch {
        /// The peer.
        peer: SocketAddr,
        /// Our version.
        local: u16,
        /// Theirs.
        remote: u16,
    },
    /// The peer's handshake message is not one.
    #[error("malformed handshake message from {peer}: {reason}")]
    BadHandshake {
        /// The peer.
        peer: SocketAddr,
        /// What is wrong with it.
        reason: &'static str,
    },

    // --- frames ---
    /// A frame does not start with the frame magic: garbage on the wire.
    #[error("bad frame magic {found:#010x} (garbage on the interconnect)")]
    BadMagic {
        /// The bytes found, little endian.
        found: u32,
    },
    /// A frame of another wire version.
    #[error("frame of wire version {found}; this node speaks {expected}")]
    FrameVersion {
        /// Version in the frame.
        found: u8,
        /// Ours.
        expected: u8,
    },
    /// A frame kind this version does not define.
    #[error("unknown frame kind {kind}")]
    UnknownFrameKind {
        /// The kind byte.
        kind: u8,
    },
    /// A frame longer than the agreed maximum.
    #[error("frame payload of {len_bytes} bytes exceeds the limit of {max_bytes}")]
    FrameTooLong {
        /// Its declared length.
        len_bytes: u32,
        /// The limit.
        max_bytes: u32,
    },
    /// The frame's CRC32C does not match its header and payload.
    #[error("frame checksum mismatch: the header says {expected:#010x}, the bytes give {computed:#010x}")]
    BadChecksum {
        /// CRC in the header.
        expected: u32,
        /// CRC computed.
        computed: u32,
    },
    /// A frame structurally wrong for its kind.
    #[error("malformed {kind} frame: {reason}")]
    MalformedFrame {
        /// The frame kind.
        kind: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// A frame of another session: never applied.
    #[error("frame of session {found:#x} on a connection of session {expected:#x}")]
    SessionMismatch {
        /// The connection's session.
        expected: u64,
        /// The frame's.
        found: u64,
    },
    /// A write frame whose range falls outside the mirror: never applied.
    #[error(
        "write frame of {len_bytes} bytes at offset {offset} falls outside the \
         {mirror_len_bytes}-byte partner mirror"
    )]
    FrameOutOfBounds {
        /// Destination offset.
        offset: u64,
        /// Payload length.
        len_bytes: u64,
        /// Mirror length.
        mirror_len_bytes: u64,
    },
    /// Write frames must carry increasing write ids.
    #[error("write frame id {id} does not follow the previous id {previous}")]
    FrameOutOfOrder {
        /// The frame's id.
        id: u64,
        /// The previous frame's id.
        previous: u64,
    },
    /// The peer acknowledged writes we never sent.
    #[error("peer acknowledged write {acked} but only writes up to {sent} were sent")]
    AckBeyondSent {
        /// The acknowledged id.
        acked: u64,
        /// Highest id sent.
        sent: u64,
    },
    /// A control message that does not decode.
    #[error("malformed control message: {reason}")]
    BadControl {
        /// What is wrong.
        reason: &'static str,
    },
    /// A control message tag this version does not define.
    #[error("unknown control message tag {tag}")]
    UnknownControlTag {
        /// The tag byte.
        tag: u8,
    },

    // --- connections ---
    /// Socket I/O failed.
    #[error("I/O error while {context} (peer {peer})")]
    Io {
        /// What we were doing.
        context: &'static str,
        /// The peer, or the local address for listening sockets.
        peer: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The peer closed the connection.
    #[error("connection closed by peer {peer}")]
    ConnectionClosed {
        /// The peer.
        peer: SocketAddr,
    },
    /// No frame from the partner for longer than the silence timeout.
    #[error("partner silent for {silent_ms} ms (limit {timeout_ms} ms)")]
    PartnerSilent {
        /// How long it has been silent.
        silent_ms: u64,
        /// The configured limit.
        timeout_ms: u64,
    },
    /// Too many control messages are waiting to be sent.
    #[error("{queued} control messages are already waiting to be sent; the connection is stalled")]
    ControlBacklog {
        /// Messages waiting.
        queued: usize,
    },
    /// No partner session is connected to send on.
    #[error("no partner session is connected")]
    NotConnected,
    /// The in-process link was cut (a test or simulation knob).
    #[error("the in-process link was cut")]
    Cut,
    /// The connection was closed on this side.
    #[error("the connection was closed locally")]
    Closed,
    /// The connection was replaced by a newer session.
    #[error("the connection was superseded by a newer session")]
    Superseded,

    // --- RDMA ---
    /// A verbs or rdma_cm step failed.
    #[error(transparent)]
    Rdma(#[from] RdmaError),
}

impl Error {
    pub(crate) fn io(context: &'static str, peer: SocketAddr, source: io::Error) -> Self {
        Self::Io {
            context,
            peer,
            source,
        }
    }
}

/// What the send queue refuses, or reports lost.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The send queue was asked for more slots than the transport can keep in flight.
    #[error(
        "a send queue of {requested} slots exceeds the transport's limit of {max} work requests \
         in flight (its send depth and completion queue); configure at most {max} slots"
    )]
    TooManySlots {
        /// Slots asked for.
        requested: usize,
        /// The transport's `max_in_flight`.
        max: usize,
    },
    /// A send queue needs at least one slot.
    #[error("a send queue needs at least one slot")]
    NoSlots,
    /// A replacement transport is smaller than the one the queue was built for.
    #[error(
        "the new transport's {what} is {new}, smaller than the send queue's {queue}; \
         it cannot replace the old connection"
    )]
    TransportTooSmall {
        /// Which limit is too small.
        what: &'static str,
        /// The queue's requirement.
        queue: u64,
        /// The new transport's value.
        new: u64,
    },
    /// A reservation larger than the whole queue can never be granted.
    #[error("a reservation of {requested} slots can never be granted: the queue has {capacity}")]
    ReservationTooLarge {
        /// Slots asked for.
        requested: usize,
        /// The queue's capacity.
        capacity: usize,
    },
    /// `try_reserve` found too few free slots.
    #[error("no free send-queue slots: {requested} requested, {free} free")]
    NoFreeSlots {
        /// Slots asked for.
        requested: usize,
        /// Slots free at the time.
        free: usize,
    },
    /// `reserve_timeout` gave up.
    #[error("timed out after {waited_ms} ms waiting for {requested} send-queue slots")]
    ReserveTimedOut {
        /// Slots asked for.
        requested: usize,
        /// How long it waited.
        waited_ms: u64,
    },
    /// `wait_placed_timeout` gave up.
    #[error(
        "timed out after {waited_ms} ms waiting for write {id} to be placed in the partner mirror"
    )]
    PlacedTimedOut {
        /// The write waited for.
        id: u64,
        /// How long it waited.
        waited_ms: u64,
    },
    /// The write was posted but its connection failed before it was placed.
    #[error(
        "write {id} was not placed in the partner mirror: its connection (session {session:#x}) \
         failed; the mirror is out of sync until resynchronised"
    )]
    WriteLost {
        /// The lost write.
        id: u64,
        /// The session it was posted on.
        session: u64,
        /// Why the connection failed.
        #[source]
        cause: Arc<Error>,
    },
    /// The write is older than the queue's bounded history of failures.
    #[error(
        "the outcome of write {id} is no longer known (older than the queue's history of failed \
         sessions); treat it as not mirrored"
    )]
    WriteOutcomeForgotten {
        /// The write asked about.
        id: u64,
    },
}

/// What the RDMA transport's verbs and connection manager report.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// A verbs or rdma_cm call failed.
    #[error("RDMA error while {context}")]
    Call {
        /// What we were doing.
        context: &'static str,
        /// The OS error the library reported.
        #[source]
        source: io::Error,
    },
    /// rdma_cm reported an event other than the one the step waits for.
    #[error("RDMA connection manager: {event} (status {status}) while waiting for {expected}")]
    CmEvent {
        /// The event the step waits for.
        expected: &'static str,
        /// The event that came, as librdmacm names it.
        event: String,
        /// The event's status (a negative errno or a reject reason).
        status: i32,
    },
    /// A step of connection set-up did not finish in time.
    #[error("timed out after {waited_ms} ms while {context}")]
    TimedOut {
        /// The step.
        context: &'static str,
        /// How long it waited.
        waited_ms: u64,
    },
    /// A work request completed in error: the queue pair is in the error
    /// state and every later request is flushed.
    #[error(
        "RDMA {kind} work request failed: {status} (status {code}, vendor error {vendor_err:#x})"
    )]
    WorkRequestFailed {
        /// Write, control send or receive.
        kind: &'static str,
        /// The status as libibverbs names it.
        status: String,
        /// `ibv_wc_status`.
        code: u32,
        /// The device's own error code.
        vendor_err: u32,
    },
    /// The partner closed the RDMA connection (or the QP exchange broke).
    #[error("RDMA connection closed ({event})")]
    Disconnected {
        /// The rdma_cm event that said so.
        event: String,
    },
    /// The RDMA device went away under the connection.
    #[error("the RDMA device {device} was removed")]
    DeviceRemoved {
        /// Its name.
        device: String,
    },
    /// rdma_cm resolved the address to another device than the configured one.
    #[error("{addr} resolves to RDMA device {found}, but the configuration asks for {wanted}")]
    WrongDevice {
        /// The address resolved.
        addr: SocketAddr,
        /// The configured device.
        wanted: String,
        /// The device rdma_cm chose.
        found: String,
    },
}
