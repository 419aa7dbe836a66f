//! nvmirror: a synchronous storage-mirroring node for an HA pair.
//!
//! - [`config`]: the node's TOML configuration.
//! - [`node`]: NVRAM, log, volumes; the write path (suspendable phase,
//!   modify phase, wait), reads, consistency points, local recovery.
//! - [`mirror`]: the link to the partner's mirror, resync, in/out of sync.
//! - [`ha`]: ownership and fencing, failure detection, takeover, replay,
//!   giveback; [`admin`]: the operator's endpoint (status, metrics).
//! - [`mailbox`]: the node's state on shared storage, for the partner.
//! - [`extents`]: the dirty map of a volume.
//! - [`volume`]: a volume's backing file.
//! - [`nbd`]: the NBD front end; [`serve`] runs a node behind it.
//! - [`inspect`]: `nvmirror nvlog dump`.
//! - [`drill`], [`harness`], [`workload`]: failover drills, a pair on this
//!   machine under a verifying workload.
//! - [`sim`]: the pair in a deterministic simulation with fault injection;
//!   [`clock`]: the time the node's decisions read (real or simulated).

pub mod admin;
pub mod clock;
pub mod config;
pub mod drill;
pub mod error;
pub mod extents;
pub mod fsutil;
pub mod ha;
pub mod harness;
pub mod inspect;
pub mod mailbox;
pub mod mirror;
pub mod nbd;
pub mod node;
pub mod serve;
pub mod sim;
mod sys;
pub mod tcp_service;
pub mod transport;
pub mod volume;
pub mod workload;

pub use error::{Error, Result};
