//! nvmirror: a synchronous storage-mirroring node for an HA pair.
//! (The module map is rewritten with the layout; see README.md.)

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
pub mod nbd;
pub mod node;
pub mod storage;
mod sys;
pub mod tcp_service;
pub mod testing;

pub use error::{Error, Result};
