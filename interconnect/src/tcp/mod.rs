//! The TCP transport: the same one-sided semantics over a socket.
//!
//! - [`TcpSender`] dials the partner and implements [`Transport`]: a writer
//!   thread batches queued work requests into frames (contiguous ones
//!   coalesced into one frame) and writes them with one syscall per batch;
//!   a reader thread takes cumulative acks and control messages.
//! - [`MirrorReceiver`] listens for the partner's connection, authenticates
//!   it, applies write frames into the mirror memory in order, and acks
//!   cumulatively once per batch of frames read.
//!
//! Both sides send heartbeats when idle and fail the connection when the
//! partner is silent longer than the configured timeout. Any malformed
//! frame closes the connection with a concrete error before a byte of it is
//! written to the mirror.
//!
//! [`Transport`]: crate::Transport

mod conn;
mod receiver;
mod sender;
pub mod wire;

pub use receiver::{MirrorReceiver, ReceiverStats};
pub use sender::TcpSender;

use crate::auth::PresharedKey;
use crate::session::SessionTimers;
use crate::Error;

/// Configuration of both TCP sides.
#[derive(Debug, Clone)]
pub struct TcpConfig {
    /// The pair's pre-shared key.
    pub key: PresharedKey,
    /// Work requests the sender keeps in flight: the send queue's slots may
    /// not exceed it.
    pub send_depth: usize,
    /// Largest frame payload this side sends or accepts. A sender uses the
    /// smaller of its own and the receiver's.
    pub max_frame_len_bytes: u32,
    /// Heartbeats, silence, handshake.
    pub timers: SessionTimers,
}

impl TcpConfig {
    /// Defaults for everything but the key.
    pub fn new(key: PresharedKey) -> Self {
        Self {
            key,
            send_depth: 256,
            max_frame_len_bytes: 1 << 20,
            timers: SessionTimers::default(),
        }
    }

    /// Checks that the values make sense together.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |reason: String| Err(Error::InvalidConfig { reason });
        if self.send_depth == 0 {
            return invalid("send_depth must be at least 1".into());
        }
        if self.max_frame_len_bytes < 4096
            || self.max_frame_len_bytes > wire::FRAME_MAX_PAYLOAD_LEN_BYTES
        {
            return invalid(format!(
                "max_frame_len_bytes {} must be between 4096 and {}",
                self.max_frame_len_bytes,
                wire::FRAME_MAX_PAYLOAD_LEN_BYTES
            ));
        }
        self.timers.validate()
    }
}
