//! The interconnect: the layer between an nvmirror storage node and the
//! transport that mirrors its NVLog records into the partner's NVRAM.
//!
//! It knows nothing of volumes or of the log format: it moves byte ranges
//! of the local log to the same (or given) offsets of the partner's mirror,
//! in order, and says when they are placed.
//!
//! - [`SendQueue`] / [`Reservation`] (`queue.rs`): fixed slots, reserved in
//!   a write's suspendable phase, consumed by never-blocking posts in its
//!   modify phase, freed by completions; group completion via
//!   [`SendQueue::wait_placed`].
//! - [`Transport`] (`transport.rs`): one-sided writes with in-order,
//!   cumulative completions, plus control messages; shaped after RDMA
//!   verbs. It also holds [`WriteId`] and the [`Completions`] handle the
//!   queue gives each transport, so that imports point one way:
//!   queue -> transport.
//! - [`tcp`]: the TCP transport ([`tcp::TcpSender`] dials,
//!   [`tcp::MirrorReceiver`] accepts and applies), framed, checksummed,
//!   authenticated ([`auth`]).
//! - `rdma` (cargo feature `rdma`): the RDMA transport (`rdma::RdmaSender`,
//!   `rdma::RdmaReceiver`) over rdma_cm and an RC queue pair; its `unsafe`
//!   lives in `rdma::verbs`.
//! - [`pacing`]: the bound on bytes in flight that keeps heartbeats from
//!   waiting behind a backlog of writes on a slow link.
//! - [`inproc`]: an in-process transport with delay/drop/cut knobs.
//! - [`control`]: typed control messages, events, the failure detector.
//! - [`SharedMemory`] (`memory.rs`): the local log and mirror memory, owned
//!   by the node; all of the crate's `unsafe` outside `rdma::verbs` is there.
//!
//! The loom model of the slot accounting runs with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p interconnect --release --lib loom`.

#![deny(unsafe_code)]

pub mod auth;
pub mod control;
mod error;
pub mod inproc;
#[allow(unsafe_code)] // shared memory the transports read and write
mod memory;
pub mod pacing;
pub mod queue;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod session;
mod sync;
pub mod tcp;
pub mod transport;

pub use auth::PresharedKey;
pub use control::{decode_control, ControlEvent, ControlMessage, Direction, FailureDetector};
pub use error::{Error, QueueError, RdmaError, RefuseReason};
pub use memory::SharedMemory;
pub use queue::{MirrorWrite, Reservation, SendQueue};
#[cfg(feature = "rdma")]
pub use rdma::{RdmaConfig, RdmaReceiver, RdmaSender};
pub use session::SessionTimers;
pub use tcp::wire::decode_frame;
pub use tcp::{MirrorReceiver, ReceiverStats, TcpConfig, TcpSender};
pub use transport::{Completions, Transport, TransportLimits, WorkRequest, WriteId};
