//! The operator interface: a small HTTP/1.1 endpoint on the node, the client
//! the CLI uses to talk to it, the renderings the CLI prints, and the
//! building blocks of the node's Prometheus metrics.
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
//! | GET    | `/metrics`                                | 200 `text/plain; version=0.0.4`           |
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

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tracing::{debug, error, info, info_span, warn};

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
    /// The status document (schema: see [`render_status`]).
    fn status(&self) -> Value;
    /// Metrics in the Prometheus text exposition format (version 0.0.4);
    /// [`MetricsText`] builds it.
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
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn trim_ows(mut value: &[u8]) -> &[u8] {
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
fn quote(bytes: &[u8]) -> String {
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
fn parse_decimal(text: &str) -> Option<u64> {
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

/// Content type of `/metrics`: the Prometheus text format 0.0.4.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

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

fn reason_phrase(status: u16) -> &'static str {
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

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

/// Why [`request`] got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error("invalid admin request: {reason}")]
    InvalidRequest { reason: String },
    #[error("cannot connect to the admin endpoint at {addr} (is the node running?)")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("no complete answer from the admin endpoint at {addr} within {timeout:?}")]
    TimedOut { addr: SocketAddr, timeout: Duration },
    #[error("admin endpoint at {addr}: connection failed while {during}")]
    Io {
        addr: SocketAddr,
        during: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("malformed response from the admin endpoint at {addr}: {reason}")]
    Malformed { addr: SocketAddr, reason: String },
}

/// One request to the admin endpoint at `addr` (e.g. `("GET", "/status")`,
/// `("POST", "/takeover?force=true")`): the status code and the body. The
/// whole exchange, connect included, is bounded by `timeout`. A refusal
/// (409, 500 …) is an answer, not an error.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path_and_query: &str,
    timeout: Duration,
) -> Result<(u16, String), AdminClientError> {
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(AdminClientError::InvalidRequest {
            reason: format!("invalid method {}", quote(method.as_bytes())),
        });
    }
    if !path_and_query.starts_with('/')
        || path_and_query.len() > REQUEST_LINE_BYTES_MAX / 2
        || !path_and_query.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(AdminClientError::InvalidRequest {
            reason: format!("invalid path {}", quote(path_and_query.as_bytes())),
        });
    }
    let deadline = Instant::now() + timeout;
    let timed_out = || AdminClientError::TimedOut { addr, timeout };
    let io_error = |during: &'static str| {
        move |source: io::Error| {
            if matches!(
                source.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                AdminClientError::TimedOut { addr, timeout }
            } else {
                AdminClientError::Io {
                    addr,
                    during,
                    source,
                }
            }
        }
    };
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|source| AdminClientError::Connect { addr, source })?;
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(timed_out());
    }
    stream
        .set_write_timeout(Some(remaining))
        .map_err(io_error("setting up the connection"))?;
    let mut head = format!("{method} {path_and_query} HTTP/1.1\r\nHost: {addr}\r\n");
    if method != "GET" && method != "HEAD" {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("Connection: close\r\nUser-Agent: nvmirror\r\n\r\n");
    stream
        .write_all(head.as_bytes())
        .map_err(io_error("sending the request"))?;

    let mut response = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(timed_out());
        }
        stream
            .set_read_timeout(Some(remaining))
            .map_err(io_error("reading the response"))?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                if response.len() + n > RESPONSE_BYTES_MAX {
                    return Err(AdminClientError::Malformed {
                        addr,
                        reason: format!("response longer than {RESPONSE_BYTES_MAX} bytes"),
                    });
                }
                response.extend_from_slice(&chunk[..n]);
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            // A server that closes without reading all we sent (a 503 when
            // busy) may reset the connection after its response: a
            // complete response is still the answer.
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                ) && parse_response(&response).is_ok() =>
            {
                break
            }
            Err(err) => return Err(io_error("reading the response")(err)),
        }
    }
    parse_response(&response).map_err(|reason| AdminClientError::Malformed { addr, reason })
}

/// Parses a whole response (the server closes after it): status line,
/// headers, a body of exactly `Content-Length` bytes if given.
fn parse_response(response: &[u8]) -> Result<(u16, String), String> {
    if response.is_empty() {
        return Err("the connection closed without a response".to_owned());
    }
    let Some(head_end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err("the response ended inside its header section".to_owned());
    };
    let head = std::str::from_utf8(&response[..head_end])
        .map_err(|_| "the response header section is not UTF-8".to_owned())?;
    let body = &response[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .filter(|rest| rest.len() >= 5 && rest.as_bytes()[1] == b' ')
        .map(|rest| &rest[2..5])
        .filter(|code| code.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|code| code.parse::<u16>().ok())
        .filter(|code| (100..=599).contains(code))
        .filter(|_| status_line.len() == 12 || status_line.as_bytes()[12] == b' ');
    let Some(status) = status else {
        return Err(format!("bad status line {}", quote(status_line.as_bytes())));
    };
    let mut content_length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("bad header line {}", quote(line.as_bytes())));
        };
        if name.eq_ignore_ascii_case("content-length") {
            let value = value.trim();
            let length = parse_decimal(value)
                .ok_or_else(|| format!("bad Content-Length {}", quote(value.as_bytes())))?;
            if content_length.replace(length).is_some() {
                return Err("more than one Content-Length".to_owned());
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("unexpected Transfer-Encoding".to_owned());
        }
    }
    if let Some(length) = content_length {
        if body.len() as u64 != length {
            return Err(format!(
                "the body holds {} bytes, Content-Length says {length}",
                body.len()
            ));
        }
    }
    let body = String::from_utf8(body.to_vec()).map_err(|_| "the body is not UTF-8".to_owned())?;
    Ok((status, body))
}

// ---------------------------------------------------------------------------
// Renderings for the CLI
// ---------------------------------------------------------------------------

/// The status document as a compact block a person reads at a glance, for
/// `nvmirror status`. Missing sections are left out; missing fields show as
/// `?`. The document the node produces:
///
/// ```json
/// {
///   "node_id": 1,
///   "state": "serving" | "waiting for giveback" | "fenced" | "starting",
///   "partner": {"node_id": 2, "interconnect": "up" | "silent", "interconnect_silent_ms": 0,
///               "mailbox": "alive" | "stale" | "missing", "mailbox_stale_ms": 0, "state": "serving"},
///   "mirror": {"link": "in sync" | "resyncing" | "down", "in_sync": true, "why_not": null,
///              "resync": {"total_bytes": 4096, "placed_bytes": 4096, "elapsed_ms": 3,
///                         "remaining_ms": 0, "finished": true} | null},
///   "takeover": {"possible": false, "why_not": "partner is alive",
///                "holding_partner_volumes": false, "forced": false},
///   "volumes": [{"name": "vol0", "volumes_of": 1, "owner": 1, "epoch": 0, "served_here": true,
///                "dirty_bytes": 0, "size_bytes": 1048576}],
///   "log": {"half_bytes": 1048576, "filling": 0, "used_percent": 3.2, "next_lsn": 10,
///           "flushed_lsn": 4, "persisted_lsn": 9,
///           "halves": [{"state": "filling", "used_bytes": 1000}, {"state": "free", "used_bytes": 0}]},
///   "replay": {"active": false, "total_bytes": 0, "done_bytes": 0, "percent": 100.0},
///   "last_takeover": {"at_unix_ms": 0, "resume_ms": 0, "replay_ms": 0, "forced": false} | null
/// }
/// ```
///
/// rendered as
///
/// ```text
/// node 1: serving            partner 2: serving (interconnect up, mailbox alive)
/// mirror: in sync
/// takeover: not possible (partner is alive)
///
/// (while a resync runs: `mirror: resyncing, 3.0 MiB of 16.0 MiB placed in
/// 1.5 s, about 6.5 s left`)
/// volumes:
///   vol0  node 1's  owner 1  epoch 0  served here  dirty 0 B  1.0 MiB
/// log: 3.2% of half 0 used; next LSN 10, flushed 4, persisted 9
/// replay: idle
/// ```
pub fn render_status(status: &Value) -> String {
    let mut out = String::new();
    let node_id = field(status, "node_id");
    let left = format!("node {node_id}: {}", field(status, "state"));
    match status.get("partner").filter(|p| !p.is_null()) {
        Some(partner) => {
            let interconnect = with_duration(
                field(partner, "interconnect"),
                partner,
                "interconnect_silent_ms",
            );
            let mailbox = with_duration(field(partner, "mailbox"), partner, "mailbox_stale_ms");
            let _ = writeln!(
                out,
                "{left:<26} partner {}: {} (interconnect {interconnect}, mailbox {mailbox})",
                field(partner, "node_id"),
                field(partner, "state"),
            );
        }
        None => {
            let _ = writeln!(out, "{left}");
        }
    }

    if let Some(mirror) = section(status, "mirror") {
        let _ = write!(out, "mirror: {}", field(mirror, "link"));
        if let Some(resync) = section(mirror, "resync")
            .filter(|resync| resync.get("finished") != Some(&Value::Bool(true)))
        {
            let _ = write!(
                out,
                ", {} of {} placed in {}",
                bytes_field(resync, "placed_bytes"),
                bytes_field(resync, "total_bytes"),
                duration_field(resync, "elapsed_ms"),
            );
            if let Some(left) = resync.get("remaining_ms").and_then(Value::as_u64) {
                let _ = write!(out, ", about {} left", human_duration_ms(left));
            }
        }
        if let Some(why) = text_of(mirror.get("why_not")) {
            let _ = write!(out, " ({why})");
        }
        out.push('\n');
    }

    if let Some(takeover) = section(status, "takeover") {
        out.push_str("takeover: ");
        if takeover.get("holding_partner_volumes") == Some(&Value::Bool(true)) {
            match status.get("partner").and_then(|p| p.get("node_id")) {
                Some(id) => {
                    let _ = write!(out, "holding node {}'s volumes", scalar(id));
                }
                None => out.push_str("holding the partner's volumes"),
            }
            if takeover.get("forced") == Some(&Value::Bool(true)) {
                out.push_str(" (forced)");
            }
        } else {
            match takeover.get("possible") {
                Some(Value::Bool(true)) => out.push_str("possible"),
                Some(Value::Bool(false)) => {
                    out.push_str("not possible");
                    if let Some(why) = text_of(takeover.get("why_not")) {
                        let _ = write!(out, " ({why})");
                    }
                }
                _ => out.push('?'),
            }
        }
        out.push('\n');
    }

    match status.get("volumes") {
        None | Some(Value::Null) => {}
        Some(Value::Array(volumes)) if volumes.is_empty() => out.push_str("volumes: none\n"),
        Some(Value::Array(volumes)) => {
            out.push_str("volumes:\n");
            let rows: Vec<Vec<String>> = volumes
                .iter()
                .map(|volume| {
                    vec![
                        field(volume, "name"),
                        format!("node {}'s", field(volume, "volumes_of")),
                        format!("owner {}", field(volume, "owner")),
                        format!("epoch {}", field(volume, "epoch")),
                        match volume.get("served_here") {
                            Some(Value::Bool(true)) => "served here".to_owned(),
                            Some(Value::Bool(false)) => "not served".to_owned(),
                            _ => "served ?".to_owned(),
                        },
                        format!("dirty {}", bytes_field(volume, "dirty_bytes")),
                        bytes_field(volume, "size_bytes"),
                    ]
                })
                .collect();
            write_table(&mut out, &rows, "  ");
        }
        Some(_) => out.push_str("volumes: ?\n"),
    }

    if let Some(log) = section(status, "log") {
        let used = match log.get("used_percent").and_then(Value::as_f64) {
            Some(percent) => format!("{percent:.1}%"),
            None => "?%".to_owned(),
        };
        let filling = log.get("filling").and_then(Value::as_u64);
        let _ = write!(
            out,
            "log: {used} of half {} used; next LSN {}, flushed {}, persisted {}",
            filling.map_or_else(|| "?".to_owned(), |f| f.to_string()),
            field(log, "next_lsn"),
            field(log, "flushed_lsn"),
            field(log, "persisted_lsn"),
        );
        // The other halves only when they matter: one being flushed holds
        // back writes once the filling one is full.
        if let Some(Value::Array(halves)) = log.get("halves") {
            for (index, half) in halves.iter().enumerate() {
                let state = text_of(half.get("state"));
                if Some(index as u64) == filling || state.as_deref() == Some("free") {
                    continue;
                }
                let _ = write!(
                    out,
                    "; half {index} {} {}",
                    state.unwrap_or_else(|| "?".to_owned()),
                    bytes_field(half, "used_bytes")
                );
            }
        }
        out.push('\n');
    }

    if let Some(replay) = section(status, "replay") {
        match replay.get("active") {
            Some(Value::Bool(false)) => out.push_str("replay: idle\n"),
            Some(Value::Bool(true)) => {
                let percent = match replay.get("percent").and_then(Value::as_f64) {
                    Some(percent) => format!("{percent:.1}%"),
                    None => "?%".to_owned(),
                };
                let _ = writeln!(
                    out,
                    "replay: {percent} ({} of {})",
                    bytes_field(replay, "done_bytes"),
                    bytes_field(replay, "total_bytes")
                );
            }
            _ => out.push_str("replay: ?\n"),
        }
    }

    match status.get("last_takeover") {
        None => {}
        Some(Value::Null) => out.push_str("last takeover: none\n"),
        Some(last) => {
            let at = match last.get("at_unix_ms").and_then(Value::as_u64) {
                Some(ms) => utc_from_unix_ms(ms),
                None => "?".to_owned(),
            };
            let _ = write!(
                out,
                "last takeover: {at}, resumed in {}, replay {}",
                duration_field(last, "resume_ms"),
                duration_field(last, "replay_ms")
            );
            if last.get("forced") == Some(&Value::Bool(true)) {
                out.push_str(" (forced)");
            }
            out.push('\n');
        }
    }
    out
}

/// What the CLI prints for `nvmirror takeover`, `giveback` or `fault`, given
/// [`request`]'s answer: `"takeover: <message>"` on 200, `"takeover refused
/// (409 Conflict): <message>"` otherwise.
pub fn render_action(action: &str, status: u16, body: &str) -> String {
    let message = sanitize(body.trim_end());
    if status == 200 {
        format!("{action}: {message}\n")
    } else {
        let phrase = reason_phrase(status);
        let code = if phrase.is_empty() {
            status.to_string()
        } else {
            format!("{status} {phrase}")
        };
        format!("{action} refused ({code}): {message}\n")
    }
}

fn section<'a>(status: &'a Value, key: &str) -> Option<&'a Value> {
    status.get(key).filter(|v| !v.is_null())
}

/// A field as text: strings as they are (control characters replaced), other
/// values in their JSON form, `?` when missing.
fn field(object: &Value, key: &str) -> String {
    object.get(key).map_or_else(|| "?".to_owned(), scalar)
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(text) => sanitize(text),
        Value::Null => "-".to_owned(),
        other => sanitize(&other.to_string()),
    }
}

/// A present, non-null value as text.
fn text_of(value: Option<&Value>) -> Option<String> {
    value.filter(|v| !v.is_null()).map(scalar)
}

/// Keeps a node-supplied string from moving the operator's cursor.
fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// `"silent"` becomes `"silent 1.2 s"` when the duration is known and not 0.
fn with_duration(state: String, object: &Value, key: &str) -> String {
    match object.get(key).and_then(Value::as_u64) {
        Some(ms) if ms > 0 => format!("{state} {}", human_duration_ms(ms)),
        _ => state,
    }
}

fn bytes_field(object: &Value, key: &str) -> String {
    match object.get(key).and_then(Value::as_u64) {
        Some(bytes) => human_bytes(bytes),
        None => "? B".to_owned(),
    }
}

fn duration_field(object: &Value, key: &str) -> String {
    match object.get(key).and_then(Value::as_u64) {
        Some(ms) => human_duration_ms(ms),
        None => "?".to_owned(),
    }
}

/// Rows of cells, each column padded to its widest cell, joined by `gap`,
/// indented by two spaces.
fn write_table(out: &mut String, rows: &[Vec<String>], gap: &str) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|row| row.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::from("  ");
        for (c, cell) in row.iter().enumerate() {
            if c > 0 {
                line.push_str(gap);
            }
            // The last column (sizes) right-aligned, the others left.
            if c + 1 == columns {
                let _ = write!(line, "{cell:>width$}", width = widths[c]);
            } else {
                let _ = write!(line, "{cell:<width$}", width = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// Bytes in binary units: "0 B", "512 B", "1.0 KiB", "1.5 MiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Milliseconds for a person: "120 ms", "3.4 s", "2 min 5 s", "1 h 3 min".
pub fn human_duration_ms(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1_000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

/// "2024-05-01 12:00:00 UTC" from milliseconds since the Unix epoch.
fn utc_from_unix_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March first
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/// Bucket bounds for latencies in microseconds: 50 µs to 1 s.
pub const LATENCY_BUCKETS_US: [u64; 13] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// A histogram with fixed bucket bounds, updated with relaxed atomics (no
/// lock on the write path). A bucket counts the observations `<=` its bound
/// and above the previous one; one more bucket holds those above the last
/// bound (`+Inf`).
///
/// The count is not kept apart: it is the sum of the buckets read in the
/// same snapshot, so the `+Inf` bucket always equals `_count` even while
/// writers are observing. `_sum` is read separately and may be a few
/// observations ahead or behind.
#[derive(Debug)]
pub struct Histogram {
    bounds: Box<[u64]>,
    /// `bounds.len() + 1` non-cumulative counts.
    buckets: Box<[AtomicU64]>,
    /// Wraps on overflow (2^64 µs is half a million years).
    sum: AtomicU64,
}

/// A histogram's values at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// The bucket bounds, without `+Inf`.
    pub bounds: Vec<u64>,
    /// Cumulative counts: `cumulative[i]` observations `<= bounds[i]`; the
    /// last one (`+Inf`) is the count.
    pub cumulative: Vec<u64>,
    pub sum: u64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        *self
            .cumulative
            .last()
            .expect("a histogram has a +Inf bucket")
    }
}

impl Histogram {
    /// A histogram with these bucket bounds (strictly increasing, at least
    /// one).
    pub fn new(bounds: &[u64]) -> Histogram {
        assert!(
            !bounds.is_empty(),
            "a histogram needs at least one bucket bound"
        );
        assert!(
            bounds.windows(2).all(|w| w[0] < w[1]),
            "histogram bucket bounds must increase strictly: {bounds:?}"
        );
        Histogram {
            bounds: bounds.into(),
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// A histogram of latencies in microseconds, [`LATENCY_BUCKETS_US`].
    pub fn latency_us() -> Histogram {
        Histogram::new(&LATENCY_BUCKETS_US)
    }

    pub fn observe(&self, value: u64) {
        let bucket = self.bounds.partition_point(|&bound| bound < value);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// [`Histogram::observe`] of a duration in microseconds (saturating).
    pub fn observe_duration_us(&self, duration: Duration) {
        self.observe(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0u64;
        let cumulative = self
            .buckets
            .iter()
            .map(|bucket| {
                total = total.wrapping_add(bucket.load(Ordering::Relaxed));
                total
            })
            .collect();
        HistogramSnapshot {
            bounds: self.bounds.to_vec(),
            cumulative,
            sum: self.sum.load(Ordering::Relaxed),
        }
    }

    /// Appends this histogram to `text` as the family `name` (see
    /// [`MetricsText::histogram`]).
    pub fn write(&self, text: &mut MetricsText, name: &str, help: &str, labels: &[(&str, &str)]) {
        text.histogram(name, help, labels, self);
    }
}

/// A sample value in the exposition format: integers exactly, floats with
/// `NaN`, `+Inf`, `-Inf`.
pub trait MetricValue {
    fn write_value(&self, out: &mut String);
}

macro_rules! integer_metric_value {
    ($($t:ty),*) => {$(
        impl MetricValue for $t {
            fn write_value(&self, out: &mut String) {
                let _ = write!(out, "{self}");
            }
        }
    )*};
}
integer_metric_value!(u8, u16, u32, u64, usize, i8, i16, i32, i64, isize);

impl MetricValue for f64 {
    fn write_value(&self, out: &mut String) {
        if self.is_nan() {
            out.push_str("NaN");
        } else if self.is_infinite() {
            out.push_str(if *self > 0.0 { "+Inf" } else { "-Inf" });
        } else {
            // Rust prints the shortest form that reads back the same, never
            // with an exponent: valid for Prometheus.
            let _ = write!(out, "{self}");
        }
    }
}

impl MetricValue for f32 {
    fn write_value(&self, out: &mut String) {
        f64::from(*self).write_value(out);
    }
}

impl MetricValue for bool {
    fn write_value(&self, out: &mut String) {
        out.push(if *self { '1' } else { '0' });
    }
}

/// The type of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// Builds a Prometheus text exposition (format 0.0.4). Samples of one family
/// may be added at different times (e.g. one per volume); each family is
/// written as one group, `# HELP` and `# TYPE` first, in the order families
/// were first added. Label values and help texts are escaped.
///
/// Metric and label names are the program's own, so an invalid one, a
/// family re-declared with another type or help, or a series added twice
/// are bugs: they panic.
///
/// ```
/// # use nvmirror::admin::{Histogram, MetricsText};
/// let latency = Histogram::latency_us();
/// latency.observe(180);
/// let mut text = MetricsText::new();
/// text.counter("nvmirror_writes_total", "Writes acknowledged.", &[("volume", "vol0")], 7u64);
/// text.histogram("nvmirror_write_latency_us", "Write latency in microseconds.", &[], &latency);
/// let body = text.finish();
/// assert!(body.contains("nvmirror_writes_total{volume=\"vol0\"} 7\n"));
/// ```
#[derive(Debug, Default)]
pub struct MetricsText {
    families: Vec<Family>,
    /// Family name to its index in `families`.
    index: HashMap<String, usize>,
    /// Names the families' samples use.
    sample_names: HashSet<String>,
}

#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    kind: MetricKind,
    /// Rendered label sets already present, to refuse duplicate series.
    series: HashSet<String>,
    samples: String,
}

impl MetricsText {
    pub fn new() -> MetricsText {
        MetricsText::default()
    }

    pub fn counter(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        value: impl MetricValue,
    ) {
        self.sample(MetricKind::Counter, name, help, labels, &value);
    }

    pub fn gauge(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        value: impl MetricValue,
    ) {
        self.sample(MetricKind::Gauge, name, help, labels, &value);
    }

    /// `name_bucket{…,le="…"}` for each bound and `+Inf` (cumulative),
    /// `name_sum`, `name_count`.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        histogram: &Histogram,
    ) {
        assert!(
            labels.iter().all(|(label, _)| *label != "le"),
            "`le` is reserved in histogram {name}"
        );
        let snapshot = histogram.snapshot();
        let rendered = render_labels(labels, None);
        let family = self.family(MetricKind::Histogram, name, help);
        assert!(
            family.series.insert(rendered.clone()),
            "series {name}{rendered} added twice"
        );
        let samples = &mut family.samples;
        let les = snapshot
            .bounds
            .iter()
            .map(|bound| bound.to_string())
            .chain(std::iter::once("+Inf".to_owned()));
        for (le, count) in les.zip(&snapshot.cumulative) {
            let _ = writeln!(
                samples,
                "{name}_bucket{} {count}",
                render_labels(labels, Some(&le))
            );
        }
        let _ = writeln!(samples, "{name}_sum{rendered} {}", snapshot.sum);
        let _ = writeln!(samples, "{name}_count{rendered} {}", snapshot.count());
    }

    /// The exposition text.
    pub fn finish(self) -> String {
        let mut out = String::new();
        for family in &self.families {
            let _ = writeln!(out, "# HELP {} {}", family.name, escape_help(&family.help));
            let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind.as_str());
            out.push_str(&family.samples);
        }
        out
    }

    fn sample(
        &mut self,
        kind: MetricKind,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        value: &dyn MetricValue,
    ) {
        let rendered = render_labels(labels, None);
        let family = self.family(kind, name, help);
        assert!(
            family.series.insert(rendered.clone()),
            "series {name}{rendered} added twice"
        );
        let _ = write!(family.samples, "{name}{rendered} ");
        value.write_value(&mut family.samples);
        family.samples.push('\n');
    }

    fn family(&mut self, kind: MetricKind, name: &str, help: &str) -> &mut Family {
        assert!(is_metric_name(name), "invalid metric name {name:?}");
        let index = match self.index.get(name) {
            Some(&index) => {
                let family = &self.families[index];
                assert!(
                    family.kind == kind && family.help == help,
                    "metric {name} declared twice with different type or help"
                );
                index
            }
            None => {
                // Sample names are unique across families (a histogram's
                // take its name with suffixes).
                for sample_name in sample_names(kind, name) {
                    assert!(
                        self.sample_names.insert(sample_name.clone()),
                        "metric {name}: sample name {sample_name} is taken by another family"
                    );
                }
                self.families.push(Family {
                    name: name.to_owned(),
                    help: help.to_owned(),
                    kind,
                    series: HashSet::new(),
                    samples: String::new(),
                });
                self.index.insert(name.to_owned(), self.families.len() - 1);
                self.families.len() - 1
            }
        };
        &mut self.families[index]
    }
}

fn sample_names(kind: MetricKind, name: &str) -> Vec<String> {
    match kind {
        MetricKind::Histogram => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|suffix| format!("{name}{suffix}"))
            .collect(),
        MetricKind::Counter | MetricKind::Gauge => vec![name.to_owned()],
    }
}

/// `{a="x",b="y"}` (with `le` last, if given), or nothing without labels.
fn render_labels(labels: &[(&str, &str)], le: Option<&str>) -> String {
    if labels.is_empty() && le.is_none() {
        return String::new();
    }
    let mut out = String::from("{");
    let mut seen = HashSet::new();
    for (index, (label, value)) in labels.iter().enumerate() {
        assert!(is_label_name(label), "invalid label name {label:?}");
        assert!(seen.insert(*label), "label {label} given twice");
        if index > 0 {
            out.push(',');
        }
        let _ = write!(out, "{label}=\"{}\"", escape_label_value(value));
    }
    if let Some(le) = le {
        if !labels.is_empty() {
            out.push(',');
        }
        let _ = write!(out, "le=\"{le}\"");
    }
    out.push('}');
    out
}

/// Label values: `\` → `\\`, `"` → `\"`, newline → `\n`.
fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Help text: `\` → `\\`, newline → `\n`.
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
fn is_metric_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__` (reserved).
fn is_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    !name.starts_with("__")
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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

    #[test]
    fn client_refuses_malformed_responses() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "without a response"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",
                "inside its header",
            ),
            (b"HTTP/1.1 2000 OK\r\n\r\n", "bad status line"),
            (b"HTTP/2 200 OK\r\n\r\n", "bad status line"),
            (b"SMTP 220 hi\r\n\r\n", "bad status line"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc",
                "Content-Length says 5",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                "bad Content-Length",
            ),
            (b"HTTP/1.1 200 OK\r\nbad\r\n\r\n", "bad header line"),
            (b"HTTP/1.1 200 OK\r\n\r\n\xff", "not UTF-8"),
        ];
        for (bytes, needle) in cases {
            let err = parse_response(bytes).expect_err("should be refused");
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
        // Without Content-Length the body runs to the end.
        assert_eq!(
            parse_response(b"HTTP/1.0 200 OK\r\n\r\nall").unwrap(),
            (200, "all".to_owned())
        );
    }

    // -- Rendering ---------------------------------------------------------

    fn full_status() -> Value {
        json!({
            "node_id": 1,
            "state": "serving",
            "partner": {"node_id": 2, "interconnect": "up", "interconnect_silent_ms": 0,
                        "mailbox": "alive", "mailbox_stale_ms": 0, "state": "serving"},
            "mirror": {"link": "in sync", "in_sync": true, "why_not": null},
            "takeover": {"possible": false, "why_not": "partner is alive",
                         "holding_partner_volumes": false, "forced": false},
            "volumes": [
                {"name": "vol0", "volumes_of": 1, "owner": 1, "epoch": 0, "served_here": true,
                 "dirty_bytes": 0, "size_bytes": 1_048_576},
                {"name": "database", "volumes_of": 2, "owner": 2, "epoch": 12, "served_here": false,
                 "dirty_bytes": 1536, "size_bytes": 10_737_418_240_u64}
            ],
            "log": {"half_bytes": 1_048_576, "filling": 0, "used_percent": 3.2, "next_lsn": 10,
                    "flushed_lsn": 4, "persisted_lsn": 9,
                    "halves": [{"state": "filling", "used_bytes": 1000},
                               {"state": "free", "used_bytes": 0}]},
            "replay": {"active": false, "total_bytes": 0, "done_bytes": 0, "percent": 100.0},
            "last_takeover": null
        })
    }

    #[test]
    fn renders_a_full_status() {
        let text = render_status(&full_status());
        let expected = "\
node 1: serving            partner 2: serving (interconnect up, mailbox alive)
mirror: in sync
takeover: not possible (partner is alive)
volumes:
  vol0      node 1's  owner 1  epoch 0   served here  dirty 0 B       1.0 MiB
  database  node 2's  owner 2  epoch 12  not served   dirty 1.5 KiB  10.0 GiB
log: 3.2% of half 0 used; next LSN 10, flushed 4, persisted 9
replay: idle
last takeover: none
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn renders_a_resync_in_progress() {
        let mut status = full_status();
        status["mirror"] = json!({"link": "resyncing", "in_sync": false, "why_not": "partner restarted",
            "resync": {"total_bytes": 16_777_216_u64, "placed_bytes": 3_145_728, "elapsed_ms": 1500,
                       "remaining_ms": 6500, "finished": false}});
        let text = render_status(&status);
        assert!(
            text.contains("mirror: resyncing, 3.0 MiB of 16.0 MiB placed in 1.5 s, about 6.5 s left (partner restarted)\n"),
            "\n{text}"
        );
        // A finished resync is not news.
        status["mirror"]["resync"]["finished"] = json!(true);
        status["mirror"]["link"] = json!("in sync");
        status["mirror"]["why_not"] = json!(null);
        assert!(render_status(&status).contains("mirror: in sync\n"));
    }

    #[test]
    fn renders_a_status_after_a_forced_takeover() {
        let mut status = full_status();
        status["state"] = json!("serving");
        status["partner"]["interconnect"] = json!("silent");
        status["partner"]["interconnect_silent_ms"] = json!(4200);
        status["partner"]["mailbox"] = json!("stale");
        status["partner"]["mailbox_stale_ms"] = json!(125_000);
        status["partner"]["state"] = json!("fenced");
        status["mirror"] = json!({"link": "down", "in_sync": false, "why_not": "partner gone"});
        status["takeover"]["holding_partner_volumes"] = json!(true);
        status["takeover"]["forced"] = json!(true);
        status["log"]["filling"] = json!(1);
        status["log"]["halves"] = json!([{"state": "flushing", "used_bytes": 1_048_000},
                                         {"state": "filling", "used_bytes": 10}]);
        status["replay"] =
            json!({"active": true, "total_bytes": 4096, "done_bytes": 1024, "percent": 25.0});
        status["last_takeover"] = json!({"at_unix_ms": 1_714_564_800_123_u64, "resume_ms": 120,
                                         "replay_ms": 3400, "forced": true});
        let text = render_status(&status);
        assert!(
            text.contains("partner 2: fenced (interconnect silent 4.2 s, mailbox stale 2 min 5 s)"),
            "{text}"
        );
        assert!(text.contains("\nmirror: down (partner gone)\n"), "{text}");
        assert!(
            text.contains("\ntakeover: holding node 2's volumes (forced)\n"),
            "{text}"
        );
        assert!(text.contains("log: 3.2% of half 1 used; next LSN 10, flushed 4, persisted 9; half 0 flushing 1023.4 KiB\n"), "{text}");
        assert!(
            text.contains("\nreplay: 25.0% (1.0 KiB of 4.0 KiB)\n"),
            "{text}"
        );
        assert!(text.contains("\nlast takeover: 2024-05-01 12:00:00 UTC, resumed in 120 ms, replay 3.4 s (forced)\n"), "{text}");
    }

    #[test]
    fn renders_a_status_with_fields_missing() {
        assert_eq!(render_status(&json!({})), "node ?: ?\n");
        assert_eq!(render_status(&json!(null)), "node ?: ?\n");
        assert_eq!(render_status(&json!([1, 2])), "node ?: ?\n");
        let status = json!({
            "node_id": 1,
            "state": "starting\u{1b}[2J",
            "partner": {},
            "mirror": {},
            "takeover": {"possible": "maybe"},
            "volumes": [{"name": "vol0"}, 7],
            "log": {"halves": [{}]},
            "replay": {},
            "last_takeover": {}
        });
        let text = render_status(&status);
        let expected = "\
node 1: starting?[2J       partner ?: ? (interconnect ?, mailbox ?)
mirror: ?
takeover: ?
volumes:
  vol0  node ?'s  owner ?  epoch ?  served ?  dirty ? B  ? B
  ?     node ?'s  owner ?  epoch ?  served ?  dirty ? B  ? B
log: ?% of half ? used; next LSN ?, flushed ?, persisted ?; half 0 ? ? B
replay: ?
last takeover: ?, resumed in ?, replay ?
";
        assert_eq!(text, expected, "\n{text}");
        let text =
            render_status(&json!({"node_id": 3, "volumes": [], "takeover": {"possible": true}}));
        assert_eq!(text, "node 3: ?\ntakeover: possible\nvolumes: none\n");
    }

    #[test]
    fn renders_actions() {
        assert_eq!(
            render_action("takeover", 200, "took over node 2's volumes\n"),
            "takeover: took over node 2's volumes\n"
        );
        assert_eq!(
            render_action("takeover", 409, "partner is alive\n"),
            "takeover refused (409 Conflict): partner is alive\n"
        );
        assert_eq!(render_action("fault", 422, "x"), "fault refused (422): x\n");
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1_048_576), "1.0 MiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(human_duration_ms(999), "999 ms");
        assert_eq!(human_duration_ms(1000), "1.0 s");
        assert_eq!(human_duration_ms(3_600_000), "1 h 0 min");
        assert_eq!(utc_from_unix_ms(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_from_unix_ms(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(
            utc_from_unix_ms(1_709_251_199_000),
            "2024-02-29 23:59:59 UTC"
        );
        assert_eq!(
            utc_from_unix_ms(4_102_444_800_000),
            "2100-01-01 00:00:00 UTC"
        );
        // Does not panic at the extreme.
        let _ = utc_from_unix_ms(u64::MAX);
    }

    // -- Metrics -----------------------------------------------------------

    #[test]
    fn histogram_counts_into_buckets() {
        let histogram = Histogram::new(&[10, 20, 30]);
        for value in [0, 10, 11, 20, 25, 30, 31, 1000] {
            histogram.observe(value);
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.bounds, vec![10, 20, 30]);
        // <=10: 0, 10; <=20: +11, 20; <=30: +25, 30; +Inf: +31, 1000.
        assert_eq!(snapshot.cumulative, vec![2, 4, 6, 8]);
        assert_eq!(snapshot.count(), 8);
        assert_eq!(snapshot.sum, 10 + 11 + 20 + 25 + 30 + 31 + 1000);

        let latency = Histogram::latency_us();
        latency.observe_duration_us(Duration::from_micros(75));
        latency.observe_duration_us(Duration::from_secs(5));
        let snapshot = latency.snapshot();
        assert_eq!(snapshot.cumulative[0], 0);
        assert_eq!(snapshot.cumulative[1], 1);
        assert_eq!(snapshot.cumulative[LATENCY_BUCKETS_US.len() - 1], 1);
        assert_eq!(snapshot.count(), 2);
        assert_eq!(snapshot.sum, 5_000_075);
    }

    #[test]
    fn histogram_writes_cumulative_buckets() {
        let histogram = Histogram::new(&[10, 20]);
        for value in [5, 15, 15, 100] {
            histogram.observe(value);
        }
        let mut text = MetricsText::new();
        histogram.write(&mut text, "op_latency_us", "Latency.", &[("op", "write")]);
        assert_eq!(
            text.finish(),
            "# HELP op_latency_us Latency.\n\
             # TYPE op_latency_us histogram\n\
             op_latency_us_bucket{op=\"write\",le=\"10\"} 1\n\
             op_latency_us_bucket{op=\"write\",le=\"20\"} 3\n\
             op_latency_us_bucket{op=\"write\",le=\"+Inf\"} 4\n\
             op_latency_us_sum{op=\"write\"} 135\n\
             op_latency_us_count{op=\"write\"} 4\n"
        );
    }

    #[test]
    fn histogram_is_consistent_under_concurrent_observers() {
        let histogram = Arc::new(Histogram::latency_us());
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let histogram = Arc::clone(&histogram);
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        histogram.observe((i * 7919 + t) % 2_000_000);
                    }
                })
            })
            .collect();
        for _ in 0..50 {
            let snapshot = histogram.snapshot();
            assert!(snapshot.cumulative.windows(2).all(|w| w[0] <= w[1]));
        }
        for writer in writers {
            writer.join().unwrap();
        }
        assert_eq!(histogram.snapshot().count(), 80_000);
    }

    #[test]
    fn escapes_label_values_and_help() {
        let mut text = MetricsText::new();
        text.gauge(
            "volume_dirty_bytes",
            "Dirty bytes.\nNot yet flushed by a CP (C:\\).",
            &[("volume", "a\\b\"c\nd"), ("node", "1")],
            1.5,
        );
        assert_eq!(
            text.finish(),
            "# HELP volume_dirty_bytes Dirty bytes.\\nNot yet flushed by a CP (C:\\\\).\n\
             # TYPE volume_dirty_bytes gauge\n\
             volume_dirty_bytes{volume=\"a\\\\b\\\"c\\nd\",node=\"1\"} 1.5\n"
        );
        let mut out = String::new();
        for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.1, 1e21, -2.0] {
            value.write_value(&mut out);
            out.push(' ');
        }
        assert_eq!(out, "NaN +Inf -Inf 0.1 1000000000000000000000 -2 ");
    }

    #[test]
    #[should_panic(expected = "declared twice")]
    fn refuses_a_family_with_two_types() {
        let mut text = MetricsText::new();
        text.counter("x_total", "X.", &[], 1u64);
        text.gauge("x_total", "X.", &[("a", "b")], 1u64);
    }

    #[test]
    #[should_panic(expected = "added twice")]
    fn refuses_a_series_twice() {
        let mut text = MetricsText::new();
        text.counter("x_total", "X.", &[("a", "b")], 1u64);
        text.counter("x_total", "X.", &[("a", "b")], 2u64);
    }

    #[test]
    #[should_panic(expected = "taken by another family")]
    fn refuses_a_name_clashing_with_a_histogram() {
        let mut text = MetricsText::new();
        text.histogram("lat", "L.", &[], &Histogram::new(&[1]));
        text.counter("lat_count", "C.", &[], 1u64);
    }

    #[test]
    #[should_panic(expected = "invalid label name")]
    fn refuses_a_bad_label_name() {
        MetricsText::new().gauge("g", "G.", &[("no-dash", "x")], 1u64);
    }

    #[test]
    fn names() {
        assert!(is_metric_name("nvmirror:log_bytes_total") && is_metric_name("_x1"));
        assert!(!is_metric_name("") && !is_metric_name("1x") && !is_metric_name("a-b"));
        assert!(is_label_name("volume") && is_label_name("_v"));
        assert!(!is_label_name("__name__") && !is_label_name("a:b") && !is_label_name("9"));
    }

    /// A realistic exposition, the way the node builds one: families
    /// interleaved as code adds them, a histogram per volume, odd label
    /// values.
    fn sample_exposition() -> String {
        let writes = Histogram::latency_us();
        let reads = Histogram::latency_us();
        for i in 0..1000u64 {
            writes.observe(i * i);
            reads.observe(i * 37);
        }
        let mut text = MetricsText::new();
        for (volume, histogram) in [("vol0", &writes), ("we\"ird\\vol\nx", &reads)] {
            text.counter(
                "nvmirror_writes_total",
                "Writes acknowledged.",
                &[("volume", volume)],
                histogram.snapshot().count(),
            );
            text.histogram(
                "nvmirror_write_latency_us",
                "Write latency in microseconds, acknowledged to the client.",
                &[("volume", volume)],
                histogram,
            );
            text.gauge(
                "nvmirror_dirty_bytes",
                "Bytes not yet flushed.",
                &[("volume", volume)],
                4096u64,
            );
        }
        text.gauge(
            "nvmirror_mirror_in_sync",
            "1 when the mirror is in sync.",
            &[],
            true,
        );
        text.gauge(
            "nvmirror_log_used_ratio",
            "Used part of the filling half.",
            &[],
            0.032,
        );
        text.finish()
    }

    #[test]
    fn exposition_is_valid() {
        let text = sample_exposition();
        let families = validate_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(
            families,
            vec![
                "nvmirror_writes_total",
                "nvmirror_write_latency_us",
                "nvmirror_dirty_bytes",
                "nvmirror_mirror_in_sync",
                "nvmirror_log_used_ratio"
            ]
        );
        // The validator does catch errors.
        let broken = [
            "x 1\n",                                              // no TYPE
            "# TYPE x gauge\nx{a=\"b} 1\n",                       // unterminated
            "# TYPE x gauge\nx{a=\"\\t\"} 1\n",                   // bad escape
            "# TYPE x gauge\nx one\n",                            // bad value
            "# TYPE x gauge\n# TYPE y gauge\ny 1\nx 1\n",         // x not grouped
            "# TYPE x gauge\nx 1\n# HELP x late\n",               // HELP after samples
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_count 1\nh_sum 0\n", // no +Inf
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 1\nh_sum 0\n",
        ];
        for text in broken {
            assert!(validate_exposition(text).is_err(), "accepted:\n{text}");
        }
    }

    /// Checks the text exposition format 0.0.4 line by line; returns the
    /// families in order.
    fn validate_exposition(text: &str) -> Result<Vec<String>, String> {
        #[derive(Default)]
        struct Histo {
            /// (le, cumulative count) in order.
            buckets: Vec<(f64, f64)>,
            count: Option<f64>,
            sum: bool,
        }
        if !text.ends_with('\n') {
            return Err("no final newline".into());
        }
        let mut families: Vec<String> = Vec::new();
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helped: HashSet<String> = HashSet::new();
        let mut with_samples: HashSet<String> = HashSet::new();
        let mut current: Option<String> = None;
        // Per histogram family and label set (without le).
        let mut histograms: HashMap<(String, String), Histo> = HashMap::new();
        let switch_to = |family: &str, current: &mut Option<String>, families: &mut Vec<String>| {
            if current.as_deref() != Some(family) {
                if families.iter().any(|f| f == family) {
                    return Err(format!("family {family} is not one group"));
                }
                families.push(family.to_owned());
                *current = Some(family.to_owned());
            }
            Ok(())
        };
        for (number, line) in text.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}: {line:?}", number + 1);
            if let Some(rest) = line.strip_prefix("# ") {
                let mut words = rest.splitn(3, ' ');
                let (keyword, name) = (words.next().unwrap(), words.next().unwrap_or(""));
                match keyword {
                    "HELP" | "TYPE" => {
                        if !is_metric_name(name) {
                            return Err(at("bad name".into()));
                        }
                        switch_to(name, &mut current, &mut families).map_err(at)?;
                        if with_samples.contains(name) {
                            return Err(at(format!("{keyword} after samples")));
                        }
                    }
                    _ => continue,
                }
                if keyword == "TYPE" {
                    let kind = words.next().unwrap_or("");
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(at("bad type".into()));
                    }
                    if types.insert(name.to_owned(), kind.to_owned()).is_some() {
                        return Err(at("TYPE twice".into()));
                    }
                } else if !helped.insert(name.to_owned()) {
                    return Err(at("HELP twice".into()));
                }
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                return Err(at("unexpected line".into()));
            }
            // name{labels} value
            let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
            let name = &line[..name_end];
            if !is_metric_name(name) {
                return Err(at("bad metric name".into()));
            }
            let mut rest = &line[name_end..];
            let mut labels: Vec<(String, String)> = Vec::new();
            if let Some(after) = rest.strip_prefix('{') {
                rest = after;
                loop {
                    if let Some(after) = rest.strip_prefix('}') {
                        rest = after;
                        break;
                    }
                    let eq = rest.find("=\"").ok_or_else(|| at("bad label".into()))?;
                    let label = &rest[..eq];
                    if !is_label_name(label) && label != "le" {
                        return Err(at("bad label name".into()));
                    }
                    let mut value = String::new();
                    let mut chars = rest[eq + 2..].char_indices();
                    let end = loop {
                        match chars.next() {
                            None => return Err(at("unterminated label value".into())),
                            Some((i, '"')) => break eq + 2 + i + 1,
                            Some((_, '\\')) => match chars.next() {
                                Some((_, '\\')) => value.push('\\'),
                                Some((_, '"')) => value.push('"'),
                                Some((_, 'n')) => value.push('\n'),
                                _ => return Err(at("bad escape".into())),
                            },
                            Some((_, c)) => value.push(c),
                        }
                    };
                    labels.push((label.to_owned(), value));
                    rest = &rest[end..];
                    rest = rest.strip_prefix(',').unwrap_or(rest);
                }
            }
            let value = rest
                .strip_prefix(' ')
                .ok_or_else(|| at("no space before value".into()))?;
            let value: f64 = match value {
                "NaN" => f64::NAN,
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().map_err(|_| at("bad value".into()))?,
            };
            // Which family: a histogram's suffixed samples belong to it.
            let (family, suffix) = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    let base = name.strip_suffix(s)?;
                    (types.get(base).map(String::as_str) == Some("histogram")).then_some((base, *s))
                })
                .unwrap_or((name, ""));
            let kind = types
                .get(family)
                .ok_or_else(|| at("sample before its TYPE".into()))?;
            if kind == "histogram" && suffix.is_empty() {
                return Err(at("histogram sample without a suffix".into()));
            }
            switch_to(family, &mut current, &mut families).map_err(at)?;
            with_samples.insert(family.to_owned());
            if kind == "histogram" {
                let le = labels.iter().position(|(l, _)| l == "le");
                let le = le.map(|i| labels.remove(i).1);
                let key = (family.to_owned(), format!("{labels:?}"));
                let histo = histograms.entry(key).or_default();
                match (suffix, le) {
                    ("_bucket", Some(le)) => {
                        let le: f64 = if le == "+Inf" {
                            f64::INFINITY
                        } else {
                            le.parse().map_err(|_| at("bad le".into()))?
                        };
                        if let Some(&(last_le, last_count)) = histo.buckets.last() {
                            if le <= last_le || value < last_count {
                                return Err(at("buckets not monotonic".into()));
                            }
                        }
                        histo.buckets.push((le, value));
                    }
                    ("_sum", None) => histo.sum = true,
                    ("_count", None) => histo.count = Some(value),
                    _ => return Err(at("bad histogram sample".into())),
                }
            } else if labels.iter().any(|(l, _)| l == "le") {
                return Err(at("le outside a histogram".into()));
            }
        }
        for ((family, labels), histo) in &histograms {
            let what = format!("histogram {family}{labels}");
            let Some(&(last_le, last_count)) = histo.buckets.last() else {
                return Err(format!("{what} has no buckets"));
            };
            if last_le != f64::INFINITY {
                return Err(format!("{what} does not end with le=\"+Inf\""));
            }
            if histo.count != Some(last_count) || !histo.sum {
                return Err(format!(
                    "{what}: _count and _sum must follow, +Inf == _count"
                ));
            }
        }
        for family in &families {
            if !types.contains_key(family) || !helped.contains(family) {
                return Err(format!("{family} lacks HELP or TYPE"));
            }
        }
        Ok(families)
    }
}
