//! The NBD front end: clients (qemu, libnbd tools, the kernel's nbd client)
//! reach the node's volumes over the Network Block Device protocol.
//!
//! What is spoken: the fixed-newstyle handshake with `NBD_OPT_GO`,
//! `NBD_OPT_INFO`, `NBD_OPT_LIST`, `NBD_OPT_ABORT` and the legacy
//! `NBD_OPT_EXPORT_NAME`; simple replies; `READ`, `WRITE` (with FUA),
//! `FLUSH`, `TRIM`, `WRITE_ZEROES` and `DISC`. Requests are pipelined and
//! answered out of order. Not spoken: TLS, structured replies, metadata
//! contexts (block status), extended headers, oldstyle negotiation.
//!
//! The node plugs in through two traits: [`Exports`] (which volumes are
//! served, looked up at connect time) and [`Export`] (one volume's I/O).
//!
//! Layout: [`proto`] holds the wire format; `server` the listener and a
//! connection's life, `handshake` its option haggling, `transmission` its
//! requests and replies, `admission` the bound on what it has in flight;
//! [`client`] a small client; [`service`] the threaded TCP service the
//! server runs on (the node's admin endpoint runs on it too); [`testing`]
//! an in-memory export for tests.

#![deny(unsafe_code)]

use std::fmt;
use std::sync::Arc;

mod admission;
pub mod client;
mod connection;
mod handshake;
pub mod proto;
mod server;
pub mod service;
pub mod testing;
#[cfg(test)]
mod tests;
mod transmission;

pub use connection::ServerConfig;
pub use server::NbdServer;

/// An NBD error value the server puts in a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Errno {
    /// `NBD_EPERM` (1): e.g. a write to a volume this node no longer owns.
    Perm,
    /// `NBD_EIO` (5).
    Io,
    /// `NBD_ENOMEM` (12); the spec asks servers to avoid it.
    NoMem,
    /// `NBD_EINVAL` (22).
    Inval,
    /// `NBD_ENOSPC` (28).
    NoSpc,
    /// `NBD_EOVERFLOW` (75).
    Overflow,
    /// `NBD_ENOTSUP` (95).
    NotSup,
    /// `NBD_ESHUTDOWN` (108): the client must disconnect.
    Shutdown,
}

impl Errno {
    /// The value on the wire.
    pub fn code(self) -> u32 {
        match self {
            Errno::Perm => proto::NBD_EPERM,
            Errno::Io => proto::NBD_EIO,
            Errno::NoMem => proto::NBD_ENOMEM,
            Errno::Inval => proto::NBD_EINVAL,
            Errno::NoSpc => proto::NBD_ENOSPC,
            Errno::Overflow => proto::NBD_EOVERFLOW,
            Errno::NotSup => proto::NBD_ENOTSUP,
            Errno::Shutdown => proto::NBD_ESHUTDOWN,
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
        };
        f.write_str(name)
    }
}

/// Why an export operation failed: the errno for the client, the message
/// for the log.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ExportError {
    pub errno: Errno,
    pub message: String,
}

impl ExportError {
    pub fn new(errno: Errno, message: impl Into<String>) -> ExportError {
        ExportError {
            errno,
            message: message.into(),
        }
    }
}

/// One volume as the NBD server sees it. Called from many threads at once
/// (every connection has several workers, and a volume may have several
/// connections: the server advertises `NBD_FLAG_CAN_MULTI_CONN`).
///
/// The server checks every request against [`Export::size_bytes`] (as read
/// when the client connected) before calling the export, never calls it
/// with a length of zero, and never with a length above
/// [`ServerConfig::max_request_bytes`] (a longer WRITE_ZEROES or TRIM is
/// passed on in pieces).
pub trait Export: Send + Sync + fmt::Debug {
    fn size_bytes(&self) -> u64;
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError>;
    /// `fua`: durable before return.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError>;
    /// The range must read back as zeroes. Clients may ask that no hole be
    /// punched (`NBD_CMD_FLAG_NO_HOLE`), which this interface cannot pass
    /// on: the export must leave the range allocated.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError>;
    /// A hint: the range's contents are no longer needed.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError>;
    /// Every write completed before this call is durable on return, whatever
    /// connection it came from.
    fn flush(&self) -> Result<(), ExportError>;
}

/// The exports a server offers, looked up at connect time (the set changes
/// at takeover and giveback).
///
/// The empty name is the spec's "default export": the server looks it up
/// like any other name, so an implementation offers a default export only
/// by answering `lookup("")`.
pub trait Exports: Send + Sync + fmt::Debug {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>>;
    fn names(&self) -> Vec<String>;
}
