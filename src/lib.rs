//! nvmirror: a synchronous storage-mirroring node for an HA pair.
//! (The module map is rewritten with the layout; see README.md.)

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
