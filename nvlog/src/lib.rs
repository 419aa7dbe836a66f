//! `nvlog`: the persistent NVLog of an nvmirror node.
//!
//! A node's NVRAM is one [`Region`]: a header, the node's own log (split in
//! two halves that alternate between filling and being flushed by a
//! consistency point), and an area its partner mirrors its log into. The
//! [`Log`] appends self-validating records in two phases (a suspendable
//! [`Log::reserve`], a never-blocking [`Log::append`]), persists them with
//! group commit, and recovers after a crash by [`Scanner`]-ing its image and
//! keeping everything up to the first torn record. A partner mirror is a
//! byte image of a log, so takeover scans it with the same [`Scanner`].
//!
//! This crate knows nothing of volumes or of the interconnect.

#![deny(unsafe_code)]

pub mod error;
pub mod header;
pub mod log;
pub mod record;
pub mod region;
pub mod scan;
#[allow(unsafe_code)] // the crate's one unsafe module
mod sys;

pub use error::{Error, Result};
pub use header::{HalfState, LogHeader};
pub use log::{Appended, HalfStatus, HeaderUpdate, Log, LogStatus, Recovery, Reservation};
pub use record::{RecordData, RecordHeader, RecordKind};
pub use region::{Area, Geometry, PersistMode, Region};
pub use scan::{ScanPosition, ScanStop, ScannedRecord, Scanner, StopReason};
