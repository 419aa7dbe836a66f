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
//!   [`HEADER_SECTION_BYTES_MAX`] bytes and [`HEADERS_MAX`] fields; every
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

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, info_span, warn};

use crate::ha::status::Status;
use crate::tcp_service::{ConnectionLimit, ServiceState, TcpService};

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------

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

/// Largest response [`request`] accepts (metrics of many volumes fit).
pub const RESPONSE_BYTES_MAX: usize = 16 << 20;

/// The head can be no longer than this: the request line, its CRLF, the
/// header section.
const HEAD_BYTES_MAX: usize = REQUEST_LINE_BYTES_MAX + 2 + HEADER_SECTION_BYTES_MAX;

/// After an error response, the server reads (and discards) what the client
/// still sends, for at most this long and this many bytes, before it
/// closes: closing a socket with unread input resets the connection, and
/// the client could lose the response.
const LINGER_DURATION: Duration = Duration::from_secs(1);
const LINGER_BYTES_MAX: usize = 256 << 10;

/// Bounds writing the 503 to a connection over [`CONNECTIONS_MAX`], which
/// the accept thread does itself.
const BUSY_WRITE_TIMEOUT: Duration = Duration::from_millis(200);

/// Longest piece of client input quoted in an error message or a log line.
const QUOTE_CHARS_MAX: usize = 64;

const _: () = assert!(HEAD_BYTES_MAX < RESPONSE_BYTES_MAX);
const _: () = assert!(CONNECTIONS_MAX >= 2);

// ---------------------------------------------------------------------------
// The handler: what the node implements
// ---------------------------------------------------------------------------

/// What the node answers through the admin endpoint.
pub trait AdminHandler: Send + Sync + std::fmt::Debug {
    /// The status document.
    fn status(&self) -> Status;
    /// Metrics in the OpenMetrics text format
    /// ([`crate::admin::metrics::node_metrics`] builds the node's).
    fn metrics(&self) -> String;
    /// Take over the partner's volumes now (`force`: even from an
    /// out-of-sync mirror, or a partner that looks alive).
    fn takeover(&self, force: bool) -> Result<String, AdminRefusal>;
    /// Hand the partner's volumes back.
    fn giveback(&self) -> Result<String, AdminRefusal>;
    /// Fault injection for drills: e.g. name "cut-interconnect", for
    /// `duration_ms`.
    fn fault(&self, name: &str, duration_ms: u64) -> Result<String, AdminRefusal>;
}

/// A handler's "no": the HTTP status (409 when the state forbids it, 500
/// when it failed; anything outside 400..=599 is sent as 500) and a message
/// for the operator.
#[derive(Debug, Clone)]
pub struct AdminRefusal {
    pub status: u16,
    pub message: String,
}

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

fn request_line_too_long() -> Response {
    Response::bad_request(format!(
        "request line longer than {REQUEST_LINE_BYTES_MAX} bytes"
    ))
}

fn header_section_too_long() -> Response {
    Response::bad_request(format!(
        "header section longer than {HEADER_SECTION_BYTES_MAX} bytes"
    ))
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

// ---------------------------------------------------------------------------
// Request parsing
// ---------------------------------------------------------------------------

/// A parsed request head.
#[derive(Debug)]
struct Request {
    method: String,
    path: String,
    /// Percent-decoded `(key, value)` pairs in order.
    query: Vec<(String, String)>,
}

/// Parses a request head (as returned by [`read_head`]) into a request, or
/// the 400 (or 505) to answer.
fn parse_request(head: &[u8]) -> Result<Request, Response> {
    let bad = |message: String| Err(Response::bad_request(message));
    let crlf = || Response::bad_request("lines must end with CRLF".to_owned());
    // Every line ends with CRLF, the last one is the empty line.
    let Some(lines) = head.strip_suffix(b"\r\n") else {
        return Err(crlf());
    };
    let mut lines = lines.split_inclusive(|&b| b == b'\n').map(|line| {
        line.strip_suffix(b"\r\n")
            .filter(|line| !line.contains(&b'\r'))
            .ok_or_else(crlf)
    });
    let request_line = match lines.next() {
        Some(line) => line?,
        None => return bad("empty request line".to_owned()),
    };
    if request_line.len() > REQUEST_LINE_BYTES_MAX {
        return Err(request_line_too_long());
    }
    let (method, target, version) = parse_request_line(request_line)?;
    let http11 = version == "HTTP/1.1";

    let mut headers = 0;
    let mut host = false;
    let mut content_length = false;
    for line in lines {
        let line = line?;
        headers += 1;
        if headers > HEADERS_MAX {
            return bad(format!("more than {HEADERS_MAX} header fields"));
        }
        if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
            return bad("obsolete line folding in the header section".to_owned());
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return bad(format!("header line without a colon: {}", quote(line)));
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return bad(format!("invalid header name {}", quote(name)));
        }
        let value = trim_ows(value);
        if !value
            .iter()
            .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
        {
            return bad(format!(
                "invalid character in header {}",
                String::from_utf8_lossy(name)
            ));
        }
        if name.eq_ignore_ascii_case(b"host") {
            if host {
                return bad("more than one Host header".to_owned());
            }
            host = true;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            if content_length {
                return bad("more than one Content-Length header".to_owned());
            }
            content_length = true;
            if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return bad(format!("invalid Content-Length {}", quote(value)));
            }
            if value.iter().any(|&b| b != b'0') {
                return bad(format!(
                    "this request takes no body (Content-Length: {})",
                    quote_raw(value)
                ));
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return bad(
                "this request takes no body (Transfer-Encoding is not accepted)".to_owned(),
            );
        }
    }
    if http11 && !host {
        return bad("HTTP/1.1 request without a Host header".to_owned());
    }

    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let query = match query {
        Some(query) => parse_query(query).map_err(Response::bad_request)?,
        None => Vec::new(),
    };
    Ok(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        query,
    })
}

fn parse_request_line(line: &[u8]) -> Result<(&str, &str, &str), Response> {
    let bad = |message: String| Err(Response::bad_request(message));
    // Visible ASCII and single spaces only: no tabs, no control characters.
    if !line.iter().all(|&b| (b' '..=b'~').contains(&b)) {
        return bad(format!(
            "invalid character in the request line {}",
            quote(line)
        ));
    }
    // Checked above: ASCII.
    let line = std::str::from_utf8(line).expect("request line is ASCII");
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return bad(format!(
            "malformed request line {} (expected METHOD TARGET HTTP/1.1)",
            quote(line.as_bytes())
        ));
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return bad(format!("invalid method {}", quote(method.as_bytes())));
    }
    if !target.starts_with('/') {
        return bad(format!(
            "request target {} is not an absolute path",
            quote(target.as_bytes())
        ));
    }
    if target.contains('#') {
        return bad("request target contains a fragment".to_owned());
    }
    match version {
        "HTTP/1.1" | "HTTP/1.0" => Ok((method, target, version)),
        _ if version.len() == 8
            && version.starts_with("HTTP/")
            && version.as_bytes()[5].is_ascii_digit()
            && version.as_bytes()[6] == b'.'
            && version.as_bytes()[7].is_ascii_digit() =>
        {
            Err(Response::text(
                505,
                format!("{version} is not supported; use HTTP/1.1"),
            ))
        }
        _ => bad(format!(
            "invalid HTTP version {}",
            quote(version.as_bytes())
        )),
    }
}

/// `key=value&key=value`, percent-decoded. An empty query (`/path?`) has no
/// pairs.
fn parse_query(query: &str) -> Result<Vec<(String, String)>, String> {
    if query.is_empty() {
        return Ok(Vec::new());
    }
    let mut pairs = Vec::new();
    for pair in query.split('&') {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!(
                "query parameter {} has no value (expected key=value)",
                quote(pair.as_bytes())
            ));
        };
        let key = percent_decode(key)?;
        if key.is_empty() {
            return Err("query parameter with an empty name".to_owned());
        }
        let value = percent_decode(value)?;
        pairs.push((key, value));
    }
    Ok(pairs)
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = bytes.get(index + 1..index + 3).and_then(|h| {
                let h = std::str::from_utf8(h).ok()?;
                u8::from_str_radix(h, 16)
                    .ok()
                    .filter(|_| h.bytes().all(|b| b.is_ascii_hexdigit()))
            });
            let Some(byte) = hex else {
                return Err(format!("bad percent-escape in the query {}", quote(bytes)));
            };
            out.push(byte);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "query is not UTF-8 once percent-decoded".to_owned())
}

/// RFC 9110 token characters.
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

pub(crate) fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// Client input for a message: quoted, escaped, at most [`QUOTE_CHARS_MAX`]
/// characters, always one line.
pub(crate) fn quote(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::from("\"");
    for (count, c) in text.chars().enumerate() {
        if count == QUOTE_CHARS_MAX {
            out.push_str("...");
            break;
        }
        out.extend(c.escape_debug());
    }
    out.push('"');
    out
}

/// Like [`quote`] without the quotes.
fn quote_raw(bytes: &[u8]) -> String {
    let quoted = quote(bytes);
    quoted[1..quoted.len() - 1].to_owned()
}

// ---------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------

/// The routes: path, the one method it takes, the query keys it knows.
const ROUTES: &[(&str, &str, &[&str])] = &[
    ("/status", "GET", &[]),
    ("/metrics", "GET", &[]),
    ("/takeover", "POST", &["force"]),
    ("/giveback", "POST", &[]),
    ("/fault", "POST", &["name", "duration_ms"]),
];

/// What a well-formed request asks of the handler.
#[derive(Debug, PartialEq, Eq)]
enum Call {
    Status,
    Metrics,
    Takeover { force: bool },
    Giveback,
    Fault { name: String, duration_ms: u64 },
}

/// The call a request makes, or the 404, 405 or 400 to answer.
fn resolve(request: &Request) -> Result<Call, Response> {
    let bad = |message: String| Err(Response::bad_request(message));
    let Some(&(path, method, keys)) = ROUTES.iter().find(|(path, ..)| *path == request.path) else {
        return Err(Response::text(
            404,
            format!("no such path {}", quote(request.path.as_bytes())),
        ));
    };
    if request.method != method {
        let mut response = Response::text(
            405,
            format!(
                "{path} takes {method}, not {}",
                quote_raw(request.method.as_bytes())
            ),
        );
        response.allow = Some(method);
        return Err(response);
    }
    let mut seen = HashSet::new();
    for (key, _) in &request.query {
        if !keys.contains(&key.as_str()) {
            return bad(format!(
                "unknown query parameter {} for {path}",
                quote(key.as_bytes())
            ));
        }
        if !seen.insert(key.as_str()) {
            return bad(format!(
                "query parameter {} given more than once",
                quote(key.as_bytes())
            ));
        }
    }
    let param = |key: &str| {
        request
            .query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    match path {
        "/status" => Ok(Call::Status),
        "/metrics" => Ok(Call::Metrics),
        "/takeover" => match param("force") {
            None | Some("false") => Ok(Call::Takeover { force: false }),
            Some("true") => Ok(Call::Takeover { force: true }),
            Some(other) => bad(format!(
                "force must be true or false, not {}",
                quote(other.as_bytes())
            )),
        },
        "/giveback" => Ok(Call::Giveback),
        "/fault" => {
            let Some(name) = param("name") else {
                return bad("missing query parameter name".to_owned());
            };
            if name.is_empty()
                || name.len() > FAULT_NAME_BYTES_MAX
                || !name.bytes().all(|b| b.is_ascii_graphic())
            {
                return bad(format!(
                    "invalid fault name {} (1 to {FAULT_NAME_BYTES_MAX} visible ASCII characters)",
                    quote(name.as_bytes())
                ));
            }
            let Some(duration) = param("duration_ms") else {
                return bad("missing query parameter duration_ms".to_owned());
            };
            match parse_decimal(duration) {
                Some(duration_ms) if duration_ms <= FAULT_DURATION_MS_MAX => Ok(Call::Fault {
                    name: name.to_owned(),
                    duration_ms,
                }),
                Some(_) => bad(format!(
                    "duration_ms {} is over the limit of {FAULT_DURATION_MS_MAX}",
                    quote(duration.as_bytes())
                )),
                None => bad(format!(
                    "duration_ms must be a number of milliseconds, not {}",
                    quote(duration.as_bytes())
                )),
            }
        }
        _ => unreachable!("route {path} has no arm"),
    }
}

/// Asks the handler; its answer (or refusal) becomes the response.
fn execute(handler: &dyn AdminHandler, call: &Call, peer: SocketAddr) -> Response {
    match call {
        Call::Status => {
            debug!("admin: status");
            match call_handler(|| handler.status()) {
                Ok(status) => match serde_json::to_string_pretty(&status) {
                    Ok(mut body) => {
                        body.push('\n');
                        Response {
                            status: 200,
                            content_type: "application/json",
                            body,
                            allow: None,
                        }
                    }
                    Err(err) => {
                        error!(error = %err, "cannot serialize the status document");
                        Response::text(500, "cannot serialize the status document".to_owned())
                    }
                },
                Err(response) => response,
            }
        }
        Call::Metrics => {
            debug!("admin: metrics");
            match call_handler(|| handler.metrics()) {
                Ok(body) => Response {
                    status: 200,
                    content_type: METRICS_CONTENT_TYPE,
                    body,
                    allow: None,
                },
                Err(response) => response,
            }
        }
        &Call::Takeover { force } => {
            info!(%peer, force, "admin: takeover requested");
            action("takeover", call_handler(|| handler.takeover(force)))
        }
        Call::Giveback => {
            info!(%peer, "admin: giveback requested");
            action("giveback", call_handler(|| handler.giveback()))
        }
        Call::Fault { name, duration_ms } => {
            info!(%peer, name, duration_ms, "admin: fault injection requested");
            action("fault", call_handler(|| handler.fault(name, *duration_ms)))
        }
    }
}

/// Unsigned decimal digits only (no sign, no spaces), within u64.
pub(crate) fn parse_decimal(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Runs a handler call; a panic in it is the node's bug, answered 500
/// rather than a dropped connection.
fn call_handler<T>(call: impl FnOnce() -> T) -> Result<T, Response> {
    panic::catch_unwind(AssertUnwindSafe(call)).map_err(|_| {
        error!("admin handler panicked");
        Response::text(
            500,
            "internal error: the node's handler panicked".to_owned(),
        )
    })
}

fn action(what: &str, result: Result<Result<String, AdminRefusal>, Response>) -> Response {
    match result {
        Ok(Ok(message)) => {
            info!(message = message.trim_end(), "admin: {what} done");
            Response::text(200, message)
        }
        Ok(Err(refusal)) => {
            let status = if (400..=599).contains(&refusal.status) {
                refusal.status
            } else {
                error!(
                    status = refusal.status,
                    "admin handler refused with a status outside 400..=599; sending 500"
                );
                500
            };
            info!(
                status,
                message = refusal.message.trim_end(),
                "admin: {what} refused"
            );
            Response::text(status, refusal.message)
        }
        Err(response) => response,
    }
}

// ---------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------

pub use crate::admin::metrics::METRICS_CONTENT_TYPE;

const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

#[derive(Debug)]
struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    /// The `Allow` header of a 405.
    allow: Option<&'static str>,
}

impl Response {
    /// A plain-text response; the body ends with exactly one newline.
    fn text(status: u16, message: String) -> Response {
        let mut body = message;
        let trimmed = body.trim_end_matches(['\r', '\n']).len();
        body.truncate(trimmed);
        body.push('\n');
        Response {
            status,
            content_type: TEXT_CONTENT_TYPE,
            body,
            allow: None,
        }
    }

    fn bad_request(message: String) -> Response {
        Response::text(400, message)
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            reason_phrase(self.status),
            self.content_type,
            self.body.len()
        );
        if let Some(allow) = self.allow {
            let _ = write!(head, "Allow: {allow}\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

pub(crate) fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        423 => "Locked",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        // The reason phrase may be empty (RFC 9112, 4).
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::client::parse_response;

    // -- Request parsing (the TCP side is in tests/admin_http.rs) ----------

    fn parse(head: &str) -> Result<Request, Response> {
        parse_request(head.as_bytes())
    }

    fn rejection(head: &str) -> (u16, String) {
        let response = parse(head).expect_err("the head should be refused");
        (response.status, response.body)
    }

    #[test]
    fn parses_a_plain_request() {
        let request = parse("GET /status HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n").unwrap();
        assert_eq!(request.method, "GET");
        assert_eq!(request.path, "/status");
        assert!(request.query.is_empty());
        let request = parse("POST /fault?name=a%2Db&duration_ms=5 HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(
            request.query,
            vec![
                ("name".to_owned(), "a-b".to_owned()),
                ("duration_ms".to_owned(), "5".to_owned())
            ]
        );
        let request = parse("POST /giveback? HTTP/1.1\r\nhost: x\r\ncontent-length:  0 \r\n\r\n");
        assert!(request.unwrap().query.is_empty());
    }

    #[test]
    fn refuses_malformed_heads() {
        let cases: &[(&str, u16, &str)] = &[
            ("GET /status HTTP/1.1\nHost: x\n\n", 400, "CRLF"),
            ("GET /status HTTP/1.1\r\nHost: x\n\r\n", 400, "CRLF"),
            ("GET /status HTTP/1.1\r\nHo\rst: x\r\n\r\n", 400, "CRLF"),
            ("GET  /status HTTP/1.1\r\nHost: x\r\n\r\n", 400, "malformed request line"),
            ("GET /status\r\nHost: x\r\n\r\n", 400, "malformed request line"),
            ("GET\t/status HTTP/1.1\r\nHost: x\r\n\r\n", 400, "invalid character"),
            ("G(T /status HTTP/1.1\r\nHost: x\r\n\r\n", 400, "invalid method"),
            ("GET status HTTP/1.1\r\nHost: x\r\n\r\n", 400, "not an absolute path"),
            ("GET http://x/status HTTP/1.1\r\nHost: x\r\n\r\n", 400, "not an absolute path"),
            ("GET /status#x HTTP/1.1\r\nHost: x\r\n\r\n", 400, "fragment"),
            ("GET /status HTTP/1.x\r\nHost: x\r\n\r\n", 400, "invalid HTTP version"),
            ("GET /status HTTP/2.0\r\nHost: x\r\n\r\n", 505, "not supported"),
            ("GET /status HTTP/1.1\r\n\r\n", 400, "without a Host"),
            ("GET /status HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400, "more than one Host"),
            ("GET /status HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400, "folding"),
            ("GET /status HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", 400, "without a colon"),
            ("GET /status HTTP/1.1\r\nHost : x\r\n\r\n", 400, "invalid header name"),
            ("GET /status HTTP/1.1\r\nHost: x\x01\r\n\r\n", 400, "invalid character in header"),
            ("POST /giveback HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n", 400, "takes no body"),
            ("POST /giveback HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, "invalid Content-Length"),
            (
                "POST /giveback HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
                400,
                "more than one Content-Length",
            ),
            (
                "POST /giveback HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
                "Transfer-Encoding",
            ),
            ("POST /takeover?force HTTP/1.1\r\nHost: x\r\n\r\n", 400, "has no value"),
            ("POST /takeover?=1 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "empty name"),
            ("POST /takeover?a=1&&b=2 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "has no value"),
            ("POST /fault?name=%zz HTTP/1.1\r\nHost: x\r\n\r\n", 400, "percent-escape"),
            ("POST /fault?name=%2 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "percent-escape"),
            ("POST /fault?name=%+1 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "percent-escape"),
            ("POST /fault?name=%ff HTTP/1.1\r\nHost: x\r\n\r\n", 400, "not UTF-8"),
        ];
        for (head, status, needle) in cases {
            let (got_status, body) = rejection(head);
            assert_eq!(got_status, *status, "{head:?}: {body}");
            assert!(body.contains(needle), "{head:?}: {body:?} lacks {needle:?}");
            assert!(
                body.ends_with('\n') && body.matches('\n').count() == 1,
                "{body:?}"
            );
        }
        let many = format!(
            "GET / HTTP/1.1\r\nHost: x\r\n{}\r\n",
            "A: b\r\n".repeat(HEADERS_MAX)
        );
        assert!(rejection(&many).1.contains("header fields"));
    }

    #[test]
    fn messages_quote_client_input_on_one_bounded_line() {
        let target = format!("/{}\n\"x", "a".repeat(500));
        let message = quote(target.as_bytes());
        assert!(!message.contains('\n'));
        assert!(message.chars().count() < QUOTE_CHARS_MAX + 10, "{message}");
        assert!(message.ends_with("...\""));
    }

    #[test]
    fn response_bytes_are_well_formed() {
        let mut response = Response::text(405, "no\n\n".to_owned());
        response.allow = Some("GET");
        let bytes = String::from_utf8(response.to_bytes()).unwrap();
        assert!(
            bytes.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{bytes}"
        );
        assert!(bytes.contains("\r\nAllow: GET\r\n"));
        assert!(bytes.contains("\r\nConnection: close\r\n"));
        assert!(bytes.ends_with("\r\nContent-Length: 3\r\nCache-Control: no-store\r\nConnection: close\r\nAllow: GET\r\n\r\nno\n"));
        assert_eq!(
            parse_response(bytes.as_bytes()).unwrap(),
            (405, "no\n".to_owned())
        );
        // An unknown status has an empty reason phrase, which the client takes.
        let bytes = Response::text(422, "x".to_owned()).to_bytes();
        assert!(bytes.starts_with(b"HTTP/1.1 422 \r\n"));
        assert_eq!(parse_response(&bytes).unwrap().0, 422);
    }
}
