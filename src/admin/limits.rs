//! The admin endpoint's bounds: on connections, request heads, responses
//! and what a fault request may ask.

use std::time::Duration;

/// Default bound on receiving a connection's request head, and on writing
/// each response.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest request line, without its CRLF.
pub const REQUEST_LINE_BYTES_MAX: usize = 8 << 10;

/// Longest header section: the header lines with their CRLFs and the final
/// empty line.
pub const HEADER_SECTION_BYTES_MAX: usize = 16 << 10;

/// Most header fields in one request.
pub const HEADERS_MAX: usize = 100;

/// Connections served at once; one more is answered 503 and closed. An
/// operator's CLI, a scraper and a monitoring probe fit with room to spare.
pub const CONNECTIONS_MAX: usize = 8;

/// Longest fault name accepted by `/fault`.
pub const FAULT_NAME_BYTES_MAX: usize = 64;

/// Longest fault a drill may inject through `/fault`: an hour.
pub const FAULT_DURATION_MS_MAX: u64 = 60 * 60 * 1000;

/// Largest response [`request`](crate::admin::client::request) accepts (metrics of many volumes fit).
pub const RESPONSE_BYTES_MAX: usize = 16 << 20;

/// The head can be no longer than this: the request line, its CRLF, the
/// header section.
pub(crate) const HEAD_BYTES_MAX: usize = REQUEST_LINE_BYTES_MAX + 2 + HEADER_SECTION_BYTES_MAX;

/// After an error response, the server reads (and discards) what the client
/// still sends, for at most this long and this many bytes, before it
/// closes: closing a socket with unread input resets the connection, and
/// the client could lose the response.
pub(crate) const LINGER_DURATION: Duration = Duration::from_secs(1);
pub(crate) const LINGER_BYTES_MAX: usize = 256 << 10;

/// Bounds writing the 503 to a connection over [`CONNECTIONS_MAX`], which
/// the accept thread does itself.
pub(crate) const BUSY_WRITE_TIMEOUT: Duration = Duration::from_millis(200);

/// Longest piece of client input quoted in an error message or a log line.
pub(crate) const QUOTE_CHARS_MAX: usize = 64;

const _: () = assert!(HEAD_BYTES_MAX < RESPONSE_BYTES_MAX);
const _: () = assert!(CONNECTIONS_MAX >= 2);
