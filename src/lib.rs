//! nvmirror: a synchronous storage-mirroring node for an HA pair.
//!
//! - [`config`]: the node's TOML configuration.
//! - [`node`]: NVRAM, log, volumes; the write path (suspendable phase,
//!   modify phase, wait), reads, consistency points, local recovery.
//! - [`mirror`]: the link to the partner's mirror, resync, in/out of sync.
//! - [`mailbox`]: the node's state on shared storage, for the partner.
//! - [`extents`]: the dirty map of a volume.
//! - [`volume`]: a volume's backing file.
//! - [`nbd`]: the NBD front end.
//! - [`inspect`]: `nvmirror nvlog dump`.

pub mod config;
pub mod error;
pub mod extents;
pub mod inspect;
pub mod mailbox;
pub mod mirror;
pub mod node;
mod sys;
pub mod volume;

pub use error::{Error, Result};
