//! nvmirror: a synchronous storage-mirroring node for an HA pair.
//!
//! From the top down (imports point one way):
//! - [`daemon`]: one node as a process, its threads and front ends;
//! - [`admin`]: the operator's endpoint, its client and the CLI's output;
//! - [`ha`]: boot, failure detection, takeover, replay, giveback, status;
//! - [`node`]: the data path (write phases, reads, consistency points,
//!   recovery), which asks HA only through [`node::NodeHooks`];
//! - [`mirror`]: the link to the partner's mirror and the resync, over an
//!   [`mirror::transport::Interconnect`];
//! - [`storage`]: volumes on their [`storage::disk::Disk`], dirty maps,
//!   owner files and the fence, mailboxes;
//! - [`config`], [`error`], [`clock`], [`metrics`], [`inspect`];
//! - [`testing`]: the simulation, the pair harness, the workload and the
//!   drills, which nothing above imports.

#![deny(unsafe_code)]

pub mod admin;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod error;
pub mod fsutil;
pub mod ha;
pub mod inspect;
pub mod metrics;
pub mod mirror;
pub mod node;
pub mod storage;
#[allow(unsafe_code)] // the package's one unsafe module
mod sys;
pub mod testing;

pub use error::{Error, Result};
/// The NBD front end, a crate of its own (it knows nothing of mirroring).
pub use nbd;
