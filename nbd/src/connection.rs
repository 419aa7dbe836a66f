//! What a connection's phases share: the server's limits, the state its
//! threads share, and why a connection ends.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::proto::{self, BadMagic, OptionDataError};
use crate::service::ServiceState;
use crate::Exports;

/// The whole handshake must end within this time: a client that connects
/// and stalls does not hold a thread for ever.
pub(crate) const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(60);

/// An option longer than `max_option_bytes` but at most this long is read
/// and discarded, then refused with `NBD_REP_ERR_TOO_BIG`; a longer one is
/// treated as abuse and the connection is closed.
pub(crate) const OPTION_DISCARD_BYTES_MAX: u64 = 16 << 20;

/// A WRITE longer than `max_request_bytes` but at most this long has its
/// payload discarded and gets `NBD_EINVAL`; a longer one closes the
/// connection (its payload is not worth reading to keep the stream in
/// step). The spec: lengths below 2^25 SHOULD NOT be deemed a denial of
/// service, whatever the advertised maximum.
pub(crate) const WRITE_DISCARD_BYTES_MAX: u32 = 1 << 25;

/// Payload bytes (WRITE data received, READ data to send) one connection
/// may hold in flight, unless `max_request_bytes` is larger (one request is
/// always admitted).
pub(crate) const IN_FLIGHT_PAYLOAD_BYTES_MAX: u64 = 256 << 20;

/// Buffer of the reader: many pipelined request headers per system call.
pub(crate) const READ_BUFFER_BYTES: usize = 64 << 10;

/// Command flags valid on each command. FUA is valid on every command once
/// `NBD_FLAG_SEND_FUA` is advertised (the spec: the server MUST accept it,
/// even by ignoring it); NO_HOLE comes with `NBD_FLAG_SEND_WRITE_ZEROES`.
pub(crate) const FLAGS_VALID: u16 = proto::NBD_CMD_FLAG_FUA;
pub(crate) const FLAGS_VALID_WRITE_ZEROES: u16 =
    proto::NBD_CMD_FLAG_FUA | proto::NBD_CMD_FLAG_NO_HOLE;
// DF needs structured replies, REQ_ONE block status, FAST_ZERO its flag.
const _: () = assert!(
    FLAGS_VALID_WRITE_ZEROES
        & (proto::NBD_CMD_FLAG_DF | proto::NBD_CMD_FLAG_REQ_ONE | proto::NBD_CMD_FLAG_FAST_ZERO)
        == 0
);
const _: () = assert!(proto::TRANSMISSION_FLAGS & proto::NBD_FLAG_SEND_FUA != 0);
const _: () = assert!(proto::TRANSMISSION_FLAGS & proto::NBD_FLAG_SEND_WRITE_ZEROES != 0);

/// Limits of an [`NbdServer`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Longest READ or WRITE (advertised as the maximum block size). At
    /// least 4096 (the preferred block size).
    pub max_request_bytes: u32,
    /// Threads executing one connection's requests.
    pub workers_per_connection: usize,
    /// Requests one connection may have admitted and not yet answered.
    pub max_in_flight_per_connection: usize,
    /// Longest option data accepted in the handshake.
    pub max_option_bytes: u32,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            max_request_bytes: 32 << 20,
            workers_per_connection: 8,
            max_in_flight_per_connection: 64,
            max_option_bytes: 64 << 10,
        }
    }
}

impl ServerConfig {
    pub(crate) fn validate(&self) -> io::Result<()> {
        let invalid = |message: String| Err(io::Error::new(io::ErrorKind::InvalidInput, message));
        if self.max_request_bytes < proto::BLOCK_SIZE_PREFERRED_BYTES {
            return invalid(format!(
                "max_request_bytes {} is below the preferred block size {}",
                self.max_request_bytes,
                proto::BLOCK_SIZE_PREFERRED_BYTES
            ));
        }
        if self.workers_per_connection == 0 || self.max_in_flight_per_connection == 0 {
            return invalid(
                "workers_per_connection and max_in_flight_per_connection must be at least 1"
                    .to_owned(),
            );
        }
        // NBD_OPT_GO with the longest export name the spec allows must fit.
        let go_bytes_max = proto::NBD_STRING_BYTES_MAX + proto::INFO_REQUEST_FIXED_BYTES;
        if (self.max_option_bytes as usize) < go_bytes_max
            || u64::from(self.max_option_bytes) > OPTION_DISCARD_BYTES_MAX
        {
            return invalid(format!(
                "max_option_bytes {} is outside {go_bytes_max}..={OPTION_DISCARD_BYTES_MAX}",
                self.max_option_bytes
            ));
        }
        Ok(())
    }

    pub(crate) fn in_flight_payload_bytes_max(&self) -> u64 {
        IN_FLIGHT_PAYLOAD_BYTES_MAX.max(u64::from(self.max_request_bytes))
    }
}

/// What the accept thread and the connection threads share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) exports: Arc<dyn Exports>,
    pub(crate) config: ServerConfig,
    /// [`HANDSHAKE_DEADLINE`], shorter in tests.
    pub(crate) handshake_deadline: Duration,
    /// The accept and connection threads' state: shutting down or not.
    pub(crate) service: Arc<ServiceState>,
}

/// Why a connection was closed by the server.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectionError {
    #[error("socket error while {during}")]
    Io {
        during: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the client did not finish the handshake in time")]
    HandshakeTimeout,
    #[error("client flags {flags:#x} include flags the server did not offer")]
    UnknownClientFlags { flags: u32 },
    #[error("bad option header")]
    BadOptionMagic(#[source] BadMagic),
    #[error("{option} carries {length_bytes} bytes of data, more than the server will skip")]
    OptionTooLarge {
        option: &'static str,
        length_bytes: u32,
    },
    #[error("NBD_OPT_EXPORT_NAME with an invalid name")]
    InvalidExportName(#[source] OptionDataError),
    #[error("NBD_OPT_EXPORT_NAME for unknown export {name:?}")]
    UnknownExport { name: String },
    #[error("bad request header")]
    BadRequestMagic(#[source] BadMagic),
    #[error(
        "NBD_CMD_WRITE (cookie {cookie:#x}) of {length_bytes} bytes exceeds the maximum \
         request of {max_bytes} bytes; its payload is too large to skip"
    )]
    WriteTooLarge {
        cookie: u64,
        length_bytes: u32,
        max_bytes: u32,
    },
    #[error("no worker thread could be started")]
    NoWorkers(#[source] io::Error),
}

pub(crate) fn io_error(during: &'static str) -> impl FnOnce(io::Error) -> ConnectionError {
    move |source| ConnectionError::Io { during, source }
}

/// The client closed (or reset) the connection: not the server's business
/// to complain about.
pub(crate) fn is_disconnect(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}
