//! The RDMA transport (cargo feature `rdma`): the same one-sided semantics
//! as TCP, done by the NIC.
//!
//! - [`RdmaSender`] resolves the partner with rdma_cm, connects one RC queue
//!   pair and implements [`Transport`]: every work request is an RDMA WRITE
//!   from the local log's registered bytes to the same (or given) offset of
//!   the partner's registered mirror. Completions are in order (RC), so a
//!   signaled completion for write N says "every write up to N is placed":
//!   only the last write of each posted batch (and every
//!   `send_depth / 4`-th in a long one) is signaled.
//! - [`RdmaReceiver`] listens with rdma_cm, authenticates the dialer,
//!   registers the mirror for remote write for that session only, and
//!   exchanges heartbeats and control messages. Its CPU never sees the
//!   writes.
//!
//! # Resources, per connection
//!
//! One rdma_cm id with its own event channel; a protection domain (so the
//! mirror's key works only on this connection's QP: a stranger's QP, in
//! another PD, cannot use it even before it is refused); one completion
//! queue for sends and receives, sized to hold every completion that can be
//! outstanding: `send_depth` writes + `RECV_DEPTH` control sends +
//! `RECV_DEPTH` receives; one RC QP with `send_depth + RECV_DEPTH` send
//! entries. The send queue's slots (the [`SendQueue`](crate::SendQueue)
//! capacity) may not exceed `send_depth`, so a post never finds the QP full.
//! All of it is owned by safe types in [`verbs`], the one module with
//! `unsafe`, which also fixes the drop order.
//!
//! # Handshake (versioning and authentication, as for TCP)
//!
//! ```text
//! dialer                                              acceptor
//!   CONNECT_REQUEST  private data Hello(version, nonce_d)   ->
//!                                   version differs: reject(Refusal(UnknownVersion))
//!   <- ESTABLISHED   private data Challenge(version, nonce_a)
//!   SEND Response(mac_d)                                    ->
//!                                   wrong key: SEND Verdict(AuthFailed), disconnect
//!   <- SEND Verdict(Ok, session, mirror addr/len/rkey, max write, mac_a)
//!   verify mac_a, else disconnect (AuthFailed)
//! ```
//!
//! Layouts and the proofs are in [`wire`]. The mirror's rkey is only sent
//! after the dialer proved the key, inside the acceptor's proof.
//!
//! # Control messages and flow control
//!
//! SEND/RECV, sent inline (at most [`wire::MESSAGE_MAX_LEN`] bytes). Each
//! side posts `RECV_DEPTH` receive buffers before connecting, and so starts
//! with that many credits for the peer. A message costs one credit; every
//! message carries the number of buffers its sender re-posted since its
//! previous message, which the receiver adds back. The last credit is kept
//! for a message that returns credits, and a side owing half its buffers
//! sends a heartbeat at once, so neither side ever sends into a receive
//! queue without a posted buffer (RNR is a bug, and retried only
//! `RNR_RETRY_COUNT` times, never forever). Control messages wait (in order
//! with the writes after them) while there is no credit.
//!
//! The dialer sends a heartbeat every interval even while writing: RDMA
//! writes are invisible to the receiver's CPU. Since a SEND executes after
//! every write posted before it, the dialer keeps the bytes in flight to
//! what the link carries in a fraction of the interval
//! ([`crate::pacing::SendWindow`]); writes beyond that wait in the session
//! thread, so liveness never waits behind a backlog of data.
//!
//! # What "placed" means
//!
//! A write's completion on an RC QP means the partner's NIC acknowledged it:
//! the bytes are in the partner's memory domain, and its CPU or a crash of
//! its kernel cannot lose them (a power loss can: that is what NVRAM
//! flushing, RDMA FLUSH, is for; rxe on kernel 6.1 lacks it). That is the
//! same promise as a TCP acknowledgement (the receiver copied the bytes
//! into the mirror mapping).
//!
//! # Registering the NVRAM file's mapping
//!
//! The local log is registered for local read only (`Access::LocalRead`:
//! its pages are pinned without FOLL_WRITE); the mirror for remote write
//! (a long-term *writable* pin). Measured with the `file_mapping_registration`
//! test on rxe (MAP_SHARED mappings of files, as the node maps its NVRAM):
//!
//! | kernel | tmpfs (/dev/shm) | ext4: mirror (remote write) | ext4: log (local read) |
//! |--------|------------------|-----------------------------|------------------------|
//! | 6.1    | works            | works                       | works                  |
//! | 6.12   | works            | refused: EFAULT             | works                  |
//!
//! Since 6.5 the kernel refuses long-term writable pins of file-backed
//! pages that need dirty tracking (ext4, xfs, any fsdax file); shmem
//! (tmpfs) and hugetlbfs pages, and device-DAX, can always be pinned.
//! The layout that works everywhere, without weakening what an
//! acknowledgement means: the NVRAM file on tmpfs or hugetlbfs (emulated
//! NVRAM), or a device-DAX node (`/dev/daxX.Y`, real NVRAM) instead of a
//! file on an fsdax file system. An acknowledged write is then in the
//! partner's mirror memory, which survives the partner's process crash
//! exactly as a plain file's page cache does (and neither survives a power
//! loss without real NVRAM). A log on ext4 can still be a source (local
//! read), so only the mirror half must move. A mirror that cannot be
//! registered is refused when the receiver binds (`Error::Rdma(RdmaError::Call)` with
//! context "registering the mirror for remote write" and the errno), not
//! at the partner's first write.
//!
//! # Failures
//!
//! | what happens                          | how it shows                     | reaction                            |
//! |---------------------------------------|----------------------------------|-------------------------------------|
//! | a work request fails (QP in error)    | error completion                 | session fails: `Completions::failed`|
//! | partner disconnects / process exits   | DISCONNECTED, flushed requests   | same                                |
//! | device removed                        | DEVICE_REMOVAL                   | same (`Error::Rdma(RdmaError::DeviceRemoved)`)       |
//! | partner silent (hung, cable)          | no message for silence timeout   | same (`Error::PartnerSilent`)       |
//! | partner never re-posts receives       | RNR retries exhausted            | same (error completion)             |
//!
//! A failed session reclaims its slots and errors every waiter (the queue
//! does that); the node marks the mirror out of sync and reconnects with a
//! new [`RdmaSender`], as with TCP.
//!
//! [`Transport`]: crate::Transport

mod receiver;
mod sender;
#[allow(unsafe_code)] // the verbs and rdma_cm calls
pub mod verbs;
pub mod wire;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use receiver::{RdmaReceiver, RdmaReceiverStats};
pub use sender::RdmaSender;

use crate::auth::PresharedKey;
use crate::session::SessionTimers;
use crate::{Error, RdmaError, SharedMemory};
use verbs::{
    event, Access, CmEvent, CmId, CompletionQueue, EventChannel, MemoryRegion, ProtectionDomain,
    QpCaps, QueuePair, WorkCompletion,
};
use wire::{decode_message, encode_header, MessageKind, MESSAGE_MAX_LEN};

/// Configuration of both RDMA sides.
#[derive(Debug, Clone)]
pub struct RdmaConfig {
    /// The pair's pre-shared key.
    pub key: PresharedKey,
    /// RDMA writes the sender keeps in flight: the send queue's slots may
    /// not exceed it. The QP's send queue and the CQ are sized from it.
    pub send_depth: usize,
    /// Largest single RDMA WRITE; a sender uses the smaller of its own and
    /// the receiver's.
    pub max_write_len_bytes: u32,
    /// Heartbeats, silence, and the bound on address resolution,
    /// connection and the whole handshake.
    pub timers: SessionTimers,
    /// The RDMA device the connection must use (rdma_cm picks it from the
    /// addresses; this only checks the pick). `None`: whichever it picks.
    pub device: Option<String>,
    /// Sender: the local address to connect from (picks the local device
    /// and port). `None`: as routing decides.
    pub source_addr: Option<IpAddr>,
    /// Sender: while writes are in flight, poll the completion queue for up
    /// to this long before sleeping on its completion channel. Lowers write
    /// latency at the cost of a CPU; 0 (the default) never spins.
    pub busy_poll_us: u64,
}

/// Receive buffers each side posts, and so the credits each starts with.
pub(crate) const RECV_DEPTH: u32 = 16;
/// Transport retries (ACK timeouts) before a work request fails.
const RETRY_COUNT: u8 = 6;
/// Receiver-not-ready retries before a work request fails; 7 would be
/// "forever", which would hang a writer on a partner that stopped posting.
const RNR_RETRY_COUNT: u8 = 6;
/// Largest send depth accepted.
const SEND_DEPTH_MAX: usize = 16 * 1024;
/// Control messages that may wait to be sent before `send_control` refuses.
const CONTROL_BACKLOG_MAX: usize = 64;

impl RdmaConfig {
    /// Defaults for everything but the key.
    pub fn new(key: PresharedKey) -> Self {
        Self {
            key,
            send_depth: 128,
            max_write_len_bytes: 1 << 20,
            timers: SessionTimers::default(),
            device: None,
            source_addr: None,
            busy_poll_us: 0,
        }
    }

    /// Checks that the values make sense together.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |reason: String| Err(Error::InvalidConfig { reason });
        if self.send_depth == 0 || self.send_depth > SEND_DEPTH_MAX {
            return invalid(format!(
                "send_depth {} must be between 1 and {SEND_DEPTH_MAX}",
                self.send_depth
            ));
        }
        if self.max_write_len_bytes < 4096 || self.max_write_len_bytes > 1 << 30 {
            return invalid(format!(
                "max_write_len_bytes {} must be between 4096 and {}",
                self.max_write_len_bytes,
                1u32 << 30
            ));
        }
        self.timers.validate()?;
        if self.busy_poll_us > 1_000_000 {
            return invalid(format!(
                "busy_poll_us {} is more than a second",
                self.busy_poll_us
            ));
        }
        if self.device.as_deref() == Some("") {
            return invalid("device must be a device name (see `rdma link`) or unset".into());
        }
        Ok(())
    }
}

// --- work request ids ---------------------------------------------------------
//
// The top two bits say what a completion is for: error completions carry no
// valid opcode, so the id must.

const WR_KIND_SHIFT: u32 = 62;
const WR_VALUE_MASK: u64 = (1 << WR_KIND_SHIFT) - 1;
/// An RDMA WRITE; the value is its `WriteId`.
const WR_WRITE: u64 = 0;
/// A control SEND; the value is the highest write posted before it, which
/// its completion also covers (RC completes in order).
const WR_SEND: u64 = 1;
/// A receive; the value is the buffer's index.
const WR_RECV: u64 = 2;

fn wr_id(kind: u64, value: u64) -> u64 {
    assert!(
        value <= WR_VALUE_MASK,
        "work request value {value} overflows its id"
    );
    kind << WR_KIND_SHIFT | value
}

fn wr_kind_name(kind: u64) -> &'static str {
    match kind {
        WR_WRITE => "write",
        WR_SEND => "control send",
        WR_RECV => "receive",
        _ => "unknown",
    }
}

/// What a poll of the connection's CQ found.
#[derive(Debug)]
enum Polled {
    /// Every write up to `id` completed.
    Write { id: u64 },
    /// A control send completed, and every write up to `covers_write`.
    SendDone { covers_write: u64 },
    /// A message arrived (its buffer is already re-posted).
    Message { kind: MessageKind, bytes: Vec<u8> },
}

/// Wakes a session loop sleeping in `poll(2)`: one byte down a socket pair,
/// written only when the loop has not been woken since it last looked.
#[derive(Debug)]
struct Waker {
    tx: UnixStream,
    rx: UnixStream,
    pending: AtomicBool,
}

impl Waker {
    fn new() -> Result<Self, Error> {
        let io_error = |source| {
            Error::Rdma(RdmaError::Call {
                context: "creating a wake-up socket pair",
                source,
            })
        };
        let (tx, rx) = UnixStream::pair().map_err(io_error)?;
        tx.set_nonblocking(true).map_err(io_error)?;
        rx.set_nonblocking(true).map_err(io_error)?;
        Ok(Self {
            tx,
            rx,
            pending: AtomicBool::new(false),
        })
    }

    fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            // A full socket buffer already means "wake up".
            let _ = (&self.tx).write(&[1]);
        }
    }

    /// Called by the loop before it looks at its queues; `readable`: the
    /// socket has bytes to drain (a left-over byte only costs a spurious
    /// wake-up, so it is not read otherwise: that would be a system call).
    fn clear(&self, readable: bool) {
        self.pending.store(false, Ordering::Release);
        if readable {
            let mut sink = [0u8; 64];
            while matches!((&self.rx).read(&mut sink), Ok(n) if n == sink.len()) {}
        }
    }

    fn fd(&self) -> RawFd {
        self.rx.as_raw_fd()
    }
}

/// One connection's verbs resources and its control channel with credits.
/// Fields drop top to bottom: the QP before the buffers, CQ, PD and id (the
/// `Arc`s in `verbs` enforce that order anyway).
#[derive(Debug)]
struct Connection {
    /// Shared with the sender's writers, who post writes on it directly.
    qp: Arc<QueuePair>,
    recv_mr: MemoryRegion,
    cq: Arc<CompletionQueue>,
    pd: Arc<ProtectionDomain>,
    id: Arc<CmId>,
    channel: Arc<EventChannel>,
    peer: SocketAddr,
    device: String,
    /// Messages we may still send: buffers the peer has posted for us.
    peer_credits: u32,
    /// Buffers we re-posted and have not told the peer about yet.
    credits_to_return: u32,
    /// Completions taken while arming the CQ, handled by the next poll.
    pending: Vec<WorkCompletion>,
    /// The CQ will raise an event on its next completion (arming is a
    /// system call on some providers: only re-arm after an event).
    armed: bool,
    /// The rdma_cm channel may hold an event (the last wait saw it
    /// readable): reading it costs a system call, so only then.
    cm_ready: bool,
    scratch: Vec<u8>,
}

impl Connection {
    /// PD, CQ, QP and the posted receive buffers on `id`, whose device is
    /// known (address resolved, or a connect request). `send_depth`: RDMA
    /// writes this side keeps in flight (0 on the receiving side).
    fn new(
        id: Arc<CmId>,
        channel: Arc<EventChannel>,
        send_depth: usize,
        peer: SocketAddr,
    ) -> Result<Self, Error> {
        let device = id.device_name().unwrap_or_else(|| "?".into());
        let pd = ProtectionDomain::new(&id)?;
        let max_send_wr = u32::try_from(send_depth).expect("send depth validated") + RECV_DEPTH;
        let cq = CompletionQueue::new(&id, (max_send_wr + RECV_DEPTH) as usize)?;
        let qp = Arc::new(QueuePair::create(
            &id,
            &pd,
            &cq,
            QpCaps {
                max_send_wr,
                max_recv_wr: RECV_DEPTH,
                max_inline_data: MESSAGE_MAX_LEN as u32,
            },
        )?);
        let recv_mr = MemoryRegion::register(
            &pd,
            SharedMemory::zeroed(RECV_DEPTH as usize * MESSAGE_MAX_LEN),
            Access::LocalWrite,
        )?;
        let recvs: Vec<(u64, u64, u32)> = (0..u64::from(RECV_DEPTH))
            .map(|index| {
                (
                    wr_id(WR_RECV, index),
                    index * MESSAGE_MAX_LEN as u64,
                    MESSAGE_MAX_LEN as u32,
                )
            })
            .collect();
        qp.post_recvs(&recv_mr, &recvs)?;
        Ok(Self {
            qp,
            recv_mr,
            cq,
            pd,
            id,
            channel,
            peer,
            device,
            peer_credits: RECV_DEPTH,
            credits_to_return: 0,
            pending: Vec::new(),
            armed: false,
            cm_ready: true,
            scratch: Vec::with_capacity(MESSAGE_MAX_LEN),
        })
    }

    fn register(&self, memory: SharedMemory, access: Access) -> Result<MemoryRegion, Error> {
        MemoryRegion::register(&self.pd, memory, access)
    }

    /// Whether a message may go now. One that returns no credits must leave
    /// the last credit for one that does, or both sides could end up
    /// owing each other credits with none to send them.
    fn can_send(&self) -> bool {
        self.peer_credits >= 2 || (self.peer_credits == 1 && self.credits_to_return > 0)
    }

    /// Whether we owe the peer enough credits to send a message for them.
    fn owes_credits(&self) -> bool {
        self.credits_to_return >= RECV_DEPTH / 2
    }

    /// Sends one message; the caller checked `can_send`. `covers_write`: the
    /// highest write posted before it.
    fn send(&mut self, kind: MessageKind, body: &[u8], covers_write: u64) -> Result<(), Error> {
        assert!(self.can_send(), "sending without a credit");
        let credits = self.credits_to_return.min(u32::from(u16::MAX));
        self.scratch.clear();
        encode_header(&mut self.scratch, kind, credits as u16);
        self.scratch.extend_from_slice(body);
        assert!(self.scratch.len() <= MESSAGE_MAX_LEN);
        self.qp
            .post_send_inline(wr_id(WR_SEND, covers_write), &self.scratch)?;
        self.peer_credits -= 1;
        self.credits_to_return -= credits;
        Ok(())
    }

    /// Takes every completion, re-posts receive buffers, and reports what
    /// happened in `out`. A failed work request is an error: the QP is in
    /// the error state.
    fn poll(&mut self, out: &mut Vec<Polled>) -> Result<(), Error> {
        let mut completions = std::mem::take(&mut self.pending);
        while self.cq.poll(&mut completions)? > 0 {}
        for wc in completions.drain(..) {
            let kind = wc.wr_id >> WR_KIND_SHIFT;
            let value = wc.wr_id & WR_VALUE_MASK;
            if !wc.is_ok() {
                return Err(Error::Rdma(RdmaError::WorkRequestFailed {
                    kind: wr_kind_name(kind),
                    status: wc.status_name(),
                    code: wc.status,
                    vendor_err: wc.vendor_err,
                }));
            }
            match kind {
                WR_WRITE => out.push(Polled::Write { id: value }),
                WR_SEND => out.push(Polled::SendDone {
                    covers_write: value,
                }),
                WR_RECV => {
                    let at = value * MESSAGE_MAX_LEN as u64;
                    let len = (wc.byte_len as usize).min(MESSAGE_MAX_LEN);
                    let mut bytes = vec![0u8; len];
                    self.recv_mr.memory().read_at(at, &mut bytes)?;
                    self.qp
                        .post_recvs(&self.recv_mr, &[(wc.wr_id, at, MESSAGE_MAX_LEN as u32)])?;
                    self.credits_to_return += 1;
                    let message =
                        decode_message(&bytes).map_err(|reason| Error::MalformedFrame {
                            kind: "rdma message",
                            reason,
                        })?;
                    self.peer_credits += u32::from(message.credits);
                    if self.peer_credits > RECV_DEPTH {
                        return Err(Error::MalformedFrame {
                            kind: "rdma message",
                            reason: "the peer returned more credits than it was given",
                        });
                    }
                    let kind = message.kind;
                    out.push(Polled::Message { kind, bytes });
                }
                _ => unreachable!("work request id of unknown kind {:#x}", wc.wr_id),
            }
        }
        self.pending = completions;
        Ok(())
    }

    /// Sleeps until a completion, an rdma_cm event or `extra` wakes it, at
    /// most `timeout`; first busy-polls the CQ for up to `spin`. Returns
    /// whether `extra` is readable.
    fn wait(
        &mut self,
        extra: Option<RawFd>,
        timeout: Duration,
        spin: Duration,
    ) -> Result<bool, Error> {
        if !spin.is_zero() {
            let start = Instant::now();
            while start.elapsed() < spin {
                if self.cq.poll(&mut self.pending)? > 0 {
                    return Ok(false);
                }
                std::hint::spin_loop();
            }
        }
        if !self.armed {
            self.cq.arm()?;
            self.armed = true;
            // A completion that arrived after the last poll but before
            // arming raised no event: look once more before sleeping.
            self.cq.poll(&mut self.pending)?;
            if !self.pending.is_empty() {
                return Ok(false);
            }
        }
        let mut fds = vec![self.cq.fd(), self.channel.fd()];
        fds.extend(extra);
        let ready = verbs::wait_readable(&fds, timeout)?;
        // Each arming raises at most one event, so one read takes it.
        if ready[0] && self.cq.consume_event()? {
            self.armed = false;
        }
        self.cm_ready |= ready[1];
        Ok(ready.get(2).copied().unwrap_or(false))
    }

    /// Fails on any rdma_cm event that ends the connection.
    fn check_cm(&mut self) -> Result<(), Error> {
        if !std::mem::take(&mut self.cm_ready) {
            return Ok(());
        }
        while let Some(event) = self.channel.try_event()? {
            if let Some(error) = self.ending(event.kind) {
                return Err(error);
            }
        }
        Ok(())
    }

    /// Why an rdma_cm event of `kind` ends the connection, if it does.
    fn ending(&self, kind: u32) -> Option<Error> {
        match kind {
            event::ESTABLISHED | event::TIMEWAIT_EXIT => None,
            event::DEVICE_REMOVAL => Some(Error::Rdma(RdmaError::DeviceRemoved {
                device: self.device.clone(),
            })),
            kind => Some(Error::Rdma(RdmaError::Disconnected {
                event: verbs::event_name(kind),
            })),
        }
    }

    /// A work request failed (`error`): if the partner is closing the
    /// session, the connection manager says so within `linger` (its
    /// disconnect request travels beside the writes, and writes that reach
    /// a closed session's mirror fail with a remote access error or are
    /// flushed). Then the session ended because the partner closed it, and
    /// the writes in flight are lost with it, as on any closed session;
    /// otherwise the work request's own failure stands.
    fn explain_failure(&mut self, error: Error, linger: Duration) -> Error {
        let Error::Rdma(RdmaError::WorkRequestFailed { kind, .. }) = &error else {
            return error;
        };
        let deadline = Instant::now() + linger;
        loop {
            let event = match self
                .channel
                .next_event(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(Some(event)) => event,
                Ok(None) | Err(_) => return error,
            };
            if let Some(ending) = self.ending(event.kind) {
                tracing::debug!(peer = %self.peer, kind, %error, %ending,
                    "work requests in flight lost with the session");
                return ending;
            }
        }
    }

    /// Waits for the next message (handshake steps), failing at `deadline`.
    fn next_message(
        &mut self,
        deadline: Deadline,
        context: &'static str,
    ) -> Result<(MessageKind, Vec<u8>), Error> {
        let mut polled = Vec::new();
        loop {
            self.poll(&mut polled)?;
            for item in polled.drain(..) {
                match item {
                    Polled::Message { kind, bytes } => return Ok((kind, bytes)),
                    Polled::SendDone { .. } => {}
                    Polled::Write { .. } => unreachable!("no writes during the handshake"),
                }
            }
            self.check_cm()?;
            let left = deadline.left();
            if left.is_zero() {
                return Err(deadline.expired(context));
            }
            self.wait(None, left.min(Duration::from_millis(50)), Duration::ZERO)?;
        }
    }

    /// Logs the source GID rdma_cm chose (found at run time, never
    /// configured) and warns if a RoCE device does not use RoCE v2.
    fn log_gid(&self) {
        let index = match self.qp.sgid_index() {
            Ok(index) => index,
            Err(error) => {
                tracing::warn!(%error, "could not query the connection's GID index");
                return;
            }
        };
        let port = self.id.port_num();
        let path = format!(
            "/sys/class/infiniband/{}/ports/{port}/gid_attrs/types/{index}",
            self.device
        );
        let gid_type = std::fs::read_to_string(&path)
            .map(|t| t.trim().to_string())
            .unwrap_or_default();
        if gid_type.starts_with("RoCE") && gid_type != "RoCE v2" {
            tracing::warn!(device = %self.device, port, gid_index = index, gid_type,
                "the connection uses RoCE v1; configure rdma_cm's default_roce_mode to RoCE v2");
        } else {
            tracing::info!(peer = %self.peer, device = %self.device, port, gid_index = index, gid_type,
                qp = self.qp.qp_num(), "RDMA connection up");
        }
    }

    fn disconnect(&self) {
        // Best effort: it may be disconnected already.
        let _ = self.id.disconnect();
    }
}

/// Names the step of a failed verbs call more precisely.
fn in_context(error: Error, context: &'static str) -> Error {
    match error {
        Error::Rdma(RdmaError::Call { source, .. }) => {
            Error::Rdma(RdmaError::Call { context, source })
        }
        other => other,
    }
}

/// When a set-up step must have finished.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    total: Duration,
}

impl Deadline {
    fn after(total: Duration) -> Self {
        Self {
            at: Instant::now() + total,
            total,
        }
    }

    fn left(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    fn expired(&self, context: &'static str) -> Error {
        Error::Rdma(RdmaError::TimedOut {
            context,
            waited_ms: self.total.as_millis() as u64,
        })
    }
}

/// Waits for the event `expected` on `channel`; any other is an error.
fn expect_event(
    channel: &Arc<EventChannel>,
    expected: u32,
    deadline: Deadline,
    context: &'static str,
) -> Result<CmEvent, Error> {
    let left = deadline.left();
    let event = channel
        .next_event(left)?
        .ok_or_else(|| deadline.expired(context))?;
    if event.kind != expected {
        return Err(Error::Rdma(RdmaError::CmEvent {
            expected: context,
            event: verbs::event_name(event.kind),
            status: event.status,
        }));
    }
    Ok(event)
}

/// Resolves `dst` on a fresh id per attempt. The kernel answers a
/// resolution that had to wait for ARP only when its timer fires, so
/// attempts are short and retried until `deadline`.
fn resolve(
    channel: &Arc<EventChannel>,
    src: Option<SocketAddr>,
    dst: SocketAddr,
    deadline: Deadline,
) -> Result<CmId, Error> {
    let mut attempt = Duration::from_millis(100);
    loop {
        let left = deadline.left();
        if left.is_zero() {
            return Err(deadline.expired("resolving the partner's RDMA address"));
        }
        let id = CmId::new(channel)?;
        id.resolve_addr(src, dst, attempt.min(left))?;
        // The kernel reports within the attempt's timeout; allow slack.
        let event = channel
            .next_event(attempt.min(left) + Duration::from_millis(500))?
            .ok_or_else(|| deadline.expired("resolving the partner's RDMA address"))?;
        match event.kind {
            event::ADDR_RESOLVED => return Ok(id),
            event::ADDR_ERROR => {
                tracing::debug!(%dst, status = event.status, "address resolution attempt failed; retrying");
                attempt = (attempt * 2).min(Duration::from_secs(1));
            }
            kind => {
                return Err(Error::Rdma(RdmaError::CmEvent {
                    expected: "address resolution",
                    event: verbs::event_name(kind),
                    status: event.status,
                }))
            }
        }
    }
}
