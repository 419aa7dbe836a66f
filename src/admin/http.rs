//! The admin endpoint: a small, strict HTTP/1.1 server on the node.
//!
//! ```text
//! nvmirror status ──request()──► AdminServer ──► AdminHandler (the node)
//!                                  accept thread ─► one short-lived thread per connection
//! ```
//!
//! Routes (every response closes the connection):
//!
//! | method | path                                      | answer                                    |
//! |--------|-------------------------------------------|-------------------------------------------|
//! | GET    | `/status`                                 | 200 `application/json`, the status document |
//! | GET    | `/metrics`                                | 200 OpenMetrics text (Prometheus)         |
//! | POST   | `/takeover`, `/takeover?force=true`       | 200 text, or the refusal's status and text |
//! | POST   | `/giveback`                               | idem                                      |
//! | POST   | `/fault?name=NAME&duration_ms=N`          | idem                                      |
//!
//! Anything else gets 404 (unknown path), 405 (wrong method on a known path,
//! with `Allow`) or 400 (malformed request), each with a one-line plain-text
//! body saying what was wrong.
//!
//! The HTTP subset is deliberately strict, since its only clients are our
//! CLI, curl and a Prometheus scraper:
//! - request line `METHOD SP origin-form SP HTTP/1.1` (or `HTTP/1.0`), at
//!   most [`REQUEST_LINE_BYTES_MAX`] bytes; header section at most
//!   [`HEADER_SECTION_BYTES_MAX`] bytes and [`HEADERS_MAX`](crate::admin::limits::HEADERS_MAX) fields; every
//!   line ends with CRLF; no obsolete line folding; `Host` required (once)
//!   in HTTP/1.1;
//! - no request bodies: `Content-Length` absent or `0`, no
//!   `Transfer-Encoding`;
//! - the query is `key=value` pairs separated by `&`, percent-decoded (`+`
//!   is a literal plus), each key known to the route and given once.
//!
//! Bounds: a connection must deliver its whole request head within the
//! connection timeout (5 s by default) or it is closed (with 408 if it sent
//! part of one); responses are written under the same timeout; at most
//! [`CONNECTIONS_MAX`] connections are served at once, more get 503. The
//! handler's own work (a takeover may take a while) is not bounded here.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info_span, warn};

pub use crate::admin::handler::{AdminHandler, AdminRefusal};
use crate::admin::limits::{
    BUSY_WRITE_TIMEOUT, CONNECTIONS_MAX, CONNECTION_TIMEOUT, HEADER_SECTION_BYTES_MAX,
    HEAD_BYTES_MAX, LINGER_BYTES_MAX, LINGER_DURATION, REQUEST_LINE_BYTES_MAX,
};
use crate::admin::request::parse_request;
use crate::admin::response::{header_section_too_long, request_line_too_long, Response};
use crate::admin::routes::{execute, resolve};
use nbd::service::{ConnectionLimit, ServiceState, TcpService};

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

/// The admin endpoint: listens on one address, serves on background threads
/// until [`AdminServer::shutdown`] or drop.
#[derive(Debug)]
pub struct AdminServer {
    service: TcpService,
}

/// What the accept thread and the connection threads share.
#[derive(Debug)]
struct Shared {
    handler: Arc<dyn AdminHandler>,
    /// [`CONNECTION_TIMEOUT`], shorter in tests.
    connection_timeout: Duration,
    /// The accept and connection threads' state: shutting down or not.
    service: Arc<ServiceState>,
}

impl AdminServer {
    /// Listen on `addr` (e.g. "127.0.0.1:0") and serve `handler` on
    /// background threads, with the default [`CONNECTION_TIMEOUT`].
    pub fn bind(addr: SocketAddr, handler: Arc<dyn AdminHandler>) -> io::Result<AdminServer> {
        AdminServer::bind_with_timeout(addr, handler, CONNECTION_TIMEOUT)
    }

    /// [`AdminServer::bind`] with another bound on receiving a request head
    /// and on writing a response (tests use a short one).
    pub fn bind_with_timeout(
        addr: SocketAddr,
        handler: Arc<dyn AdminHandler>,
        connection_timeout: Duration,
    ) -> io::Result<AdminServer> {
        if connection_timeout.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the admin connection timeout must not be zero",
            ));
        }
        let listener = TcpListener::bind(addr)?;
        let service = ServiceState::new("admin");
        let shared = Arc::new(Shared {
            handler,
            connection_timeout,
            service: Arc::clone(&service),
        });
        let limit = ConnectionLimit {
            max: CONNECTIONS_MAX,
            refuse: Box::new(|mut stream: TcpStream, _peer| {
                let response = Response::text(
                    503,
                    format!("too many admin connections (at most {CONNECTIONS_MAX}); retry"),
                );
                let _ = stream.set_write_timeout(Some(BUSY_WRITE_TIMEOUT));
                let _ = stream.write_all(&response.to_bytes());
                let _ = stream.shutdown(Shutdown::Both);
            }),
        };
        let service = TcpService::start(listener, service, Some(limit), move |stream, peer| {
            serve_connection(&shared, stream, peer)
        })?;
        Ok(AdminServer { service })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.service.local_addr()
    }

    /// Stop accepting, close every open connection (a handler call under
    /// way finishes; its response may be lost), join the threads.
    /// Idempotent; also on drop.
    pub fn shutdown(&self) {
        self.service.shutdown();
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve_connection(shared: &Shared, mut stream: TcpStream, peer: SocketAddr) {
    let span = info_span!("admin_connection", %peer);
    let _entered = span.enter();
    let timeout = shared.connection_timeout;
    let deadline = Instant::now() + timeout;
    let resolved = match read_head(&mut stream, deadline) {
        Ok(head) => parse_request(&head).and_then(|request| resolve(&request)),
        Err(HeadError::Closed) => {
            debug!("admin client closed the connection without a request");
            return;
        }
        Err(HeadError::Idle) => {
            debug!(?timeout, "admin client sent nothing in time; closing");
            return;
        }
        Err(HeadError::Io(err)) => {
            if !shared.service.is_shutting_down() {
                debug!(error = %err, "admin connection failed while reading the request");
            }
            return;
        }
        Err(HeadError::Bad(response)) => Err(response),
    };
    let response = match resolved {
        Ok(call) => execute(shared.handler.as_ref(), &call, peer),
        Err(response) => {
            warn!(
                %peer,
                status = response.status,
                reason = response.body.trim_end(),
                "bad admin request"
            );
            response
        }
    };
    let sent = stream
        .set_write_timeout(Some(timeout))
        .and_then(|()| stream.write_all(&response.to_bytes()))
        .and_then(|()| stream.flush());
    if let Err(err) = sent {
        debug!(error = %err, "cannot send the admin response");
        return;
    }
    linger(&mut stream);
}

/// Half-close, then read and discard what the client still sends (bounded),
/// so that the close does not reset the connection before the client has
/// read the response.
fn linger(stream: &mut TcpStream) {
    if stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER_DURATION;
    let mut discarded = 0;
    let mut buf = [0u8; 4096];
    while discarded < LINGER_BYTES_MAX {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() || stream.set_read_timeout(Some(remaining)).is_err() {
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => discarded += n,
        }
    }
}

enum HeadError {
    /// End of file before any byte.
    Closed,
    /// Nothing arrived before the deadline.
    Idle,
    Io(io::Error),
    /// Answer this, then close.
    Bad(Response),
}

/// Reads up to and including the empty line that ends the request head.
/// Returns the head (bytes after it, if any, are dropped: no request has a
/// body and the connection closes after one response).
fn read_head(stream: &mut TcpStream, deadline: Instant) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    // Where to resume the search for line ends, and where the line being
    // searched starts.
    let mut scanned = 0;
    let mut line_start = 0;
    let mut request_line_end = None;
    loop {
        // The head ends with an empty line. A bare LF ends a line here too:
        // the parser insists on CRLF, but a client using bare LF gets an
        // answer, not a timeout.
        while scanned < head.len() {
            if head[scanned] == b'\n' {
                let line = &head[line_start..scanned];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                match request_line_end {
                    None if line.is_empty() => {
                        return Err(HeadError::Bad(Response::bad_request(
                            "empty request line".to_owned(),
                        )));
                    }
                    None if line.len() > REQUEST_LINE_BYTES_MAX => {
                        return Err(HeadError::Bad(request_line_too_long()));
                    }
                    None => request_line_end = Some(scanned + 1),
                    Some(end) if line.is_empty() => {
                        if scanned + 1 - end > HEADER_SECTION_BYTES_MAX {
                            return Err(HeadError::Bad(header_section_too_long()));
                        }
                        head.truncate(scanned + 1);
                        return Ok(head);
                    }
                    Some(_) => {}
                }
                line_start = scanned + 1;
            }
            scanned += 1;
        }
        match request_line_end {
            // Even with a CR next, the line is too long.
            None if head.len() >= REQUEST_LINE_BYTES_MAX + 2 => {
                return Err(HeadError::Bad(request_line_too_long()));
            }
            Some(end) if head.len() - end > HEADER_SECTION_BYTES_MAX => {
                return Err(HeadError::Bad(header_section_too_long()));
            }
            _ => {}
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(timed_out(&head));
        }
        stream
            .set_read_timeout(Some(remaining))
            .map_err(HeadError::Io)?;
        // Never read past the longest possible head (plus one byte, to see
        // that it is too long).
        let room = (HEAD_BYTES_MAX + 1 - head.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]) {
            Ok(0) if head.is_empty() => return Err(HeadError::Closed),
            Ok(0) => {
                return Err(HeadError::Bad(Response::bad_request(
                    "the request ended before the end of its header section".to_owned(),
                )))
            }
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out(&head))
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(HeadError::Io(err)),
        }
    }
}

fn timed_out(head: &[u8]) -> HeadError {
    if head.is_empty() {
        HeadError::Idle
    } else {
        HeadError::Bad(Response::text(
            408,
            "the request head did not arrive in time".to_owned(),
        ))
    }
}
