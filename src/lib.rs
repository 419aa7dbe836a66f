//! nvmirror: a synchronous storage-mirroring node for an HA pair.
//!
//! This package ties the [`nvlog`] and [`interconnect`] crates together into
//! a storage node. What exists so far: inspection of a node's NVRAM.

pub mod inspect;
