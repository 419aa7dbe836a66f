//! The `Transport` trait: one-sided writes into the partner's mirror, in
//! order, with cumulative completions; plus a small control channel.
//!
//! The shape follows RDMA verbs so that an RDMA transport implements it
//! unchanged: a `WorkRequest` is one RDMA WRITE (local memory region +
//! offset, remote address + offset, length), `max_in_flight` is the QP's
//! send depth bounded by its CQ, and completions arrive in order on the
//! transport's own thread (a CQ poller), which calls into the queue's
//! `Completions`.

use std::fmt;
use std::sync::Arc;

use crate::control::ControlMessage;
use crate::Error;

/// Names one work request, dense and in post order (the first is 1). The
/// `WriteId` returned by a post names the last work request of that post.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct WriteId(u64);

impl WriteId {
    /// "No write": every queue has placed it.
    pub const NONE: WriteId = WriteId(0);

    /// Wraps a raw id (for transports decoding acknowledgements).
    pub const fn new(id: u64) -> Self {
        Self(id)
    }

    /// The raw id.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for WriteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The queue's completion handle, given to the transport by
/// [`Transport::attach`]. The transport's own thread (a CQ poller, a socket
/// reader) calls it. It is bound to one session: calls after that session
/// failed or was replaced are ignored.
#[derive(Clone)]
pub struct Completions {
    sink: Arc<dyn CompletionSink>,
    session: u64,
}

/// What the send queue does with a session's completions; implemented by
/// the queue, so that this module does not depend on it.
pub(crate) trait CompletionSink: Send + Sync {
    fn placed_through(&self, id: WriteId);
    fn failed(&self, error: Arc<Error>);
}

impl fmt::Debug for Completions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completions")
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl Completions {
    pub(crate) fn new(sink: Arc<dyn CompletionSink>, session: u64) -> Self {
        Self { sink, session }
    }

    /// Every work request up to and including `id` is placed in the
    /// partner's mirror. Cumulative: an `id` at or below an earlier one is a
    /// no-op.
    ///
    /// # Panics
    ///
    /// If `id` was never posted on this session: a transport must validate
    /// what its peer acknowledges before calling this.
    pub fn placed_through(&self, id: WriteId) {
        self.sink.placed_through(id);
    }

    /// The connection failed: reclaim the slots in flight, error every
    /// waiter. Only the first failure of a session counts.
    pub fn failed(&self, error: impl Into<Arc<Error>>) {
        self.sink.failed(error.into());
    }
}

/// One write in flight: copy `len_bytes` at `src_offset` of the local log
/// to `dst_offset` of the partner's mirror. Occupies one send-queue slot
/// from post to completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkRequest {
    /// Dense, in post order; completions name it.
    pub id: WriteId,
    /// Offset of the source bytes in the local log memory.
    pub src_offset: u64,
    /// Offset of the destination in the partner's mirror.
    pub dst_offset: u64,
    /// Bytes to copy; at most the transport's `max_write_len_bytes`.
    pub len_bytes: u32,
}

/// What a transport can carry, reported to the send queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportLimits {
    /// Work requests that may be in flight at once: the send depth, never
    /// more than the completion queue holds.
    pub max_in_flight: usize,
    /// Largest single work request; larger posts are split.
    pub max_write_len_bytes: u32,
    /// Length of the local log memory the source offsets refer to.
    pub local_len_bytes: u64,
    /// Length of the partner's mirror the destination offsets refer to.
    pub remote_len_bytes: u64,
}

/// A connection to the partner that places bytes in its mirror.
///
/// Contract, relied on by [`SendQueue`](crate::SendQueue):
/// - `post_write` never blocks and never fails: if the connection is down
///   the request is dropped, and the failure is (or was) reported through
///   `Completions::failed`.
/// - Writes are placed in post order; the transport reports, in order and
///   cumulatively, "every write up to id N is placed" through
///   `Completions::placed_through`, never naming an id it was not given.
/// - On failure it calls `Completions::failed` once; the queue then
///   reclaims every slot in flight and errors every waiter.
/// - A transport is one session: a reconnect is a new transport value.
pub trait Transport: Send + Sync + fmt::Debug {
    /// The limits the send queue must respect.
    fn limits(&self) -> TransportLimits;

    /// The session this connection belongs to.
    fn session(&self) -> u64;

    /// Gives the transport the queue's completion handle; called once,
    /// before the first post. A transport that already failed reports it at
    /// once.
    fn attach(&self, completions: Completions);

    /// Starts one write. Never blocks.
    fn post_write(&self, request: WorkRequest);

    /// Sends a control message to the partner, in order with the writes
    /// posted before it.
    fn send_control(&self, message: &ControlMessage) -> Result<(), Error>;

    /// Closes the connection and drops the completion handle. Idempotent.
    fn close(&self);
}

/// A sending transport's bond with its send queue: where completions go
/// and whether (and why) the session failed. Shared by the TCP and RDMA
/// senders, so both keep the [`Transport`] contract the same way: a
/// failure is reported once, a queue attached after it learns at once,
/// and nothing is completed after a failure or a close.
#[derive(Debug, Default)]
pub(crate) struct SessionLink {
    state: std::sync::Mutex<LinkState>,
}

#[derive(Debug, Default)]
struct LinkState {
    completions: Option<Completions>,
    failure: Option<std::sync::Arc<Error>>,
}

impl SessionLink {
    fn state(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// [`Transport::attach`]: a session that already failed reports it to
    /// the queue at once.
    pub(crate) fn attach(&self, completions: Completions) {
        let mut state = self.state();
        if let Some(failure) = &state.failure {
            let failure = std::sync::Arc::clone(failure);
            drop(state);
            completions.failed(failure);
            return;
        }
        state.completions = Some(completions);
    }

    /// Every write up to `id` is placed.
    pub(crate) fn placed_through(&self, id: WriteId) {
        let completions = self.state().completions.clone();
        if let Some(completions) = completions {
            completions.placed_through(id);
        }
    }

    /// Record the session's failure, once: tells the queue (which errors
    /// every waiter and reclaims the slots) and returns the shared error,
    /// or `None` if the session had already failed.
    pub(crate) fn fail(&self, error: Error) -> Option<std::sync::Arc<Error>> {
        let error = std::sync::Arc::new(error);
        let completions = {
            let mut state = self.state();
            if state.failure.is_some() {
                return None;
            }
            state.failure = Some(std::sync::Arc::clone(&error));
            state.completions.take()
        };
        if let Some(completions) = completions {
            completions.failed(std::sync::Arc::clone(&error));
        }
        Some(error)
    }

    /// [`Transport::close`]: drop the completion handle; a session closed
    /// before it failed counts as closed.
    pub(crate) fn close(&self) {
        let mut state = self.state();
        state.completions = None;
        if state.failure.is_none() {
            state.failure = Some(std::sync::Arc::new(Error::Closed));
        }
    }

    /// Why the session failed, if it did.
    pub(crate) fn failure(&self) -> Option<std::sync::Arc<Error>> {
        self.state().failure.clone()
    }
}
