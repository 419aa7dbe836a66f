//! The admin endpoint over real sockets: routes, refusals, malformed
//! requests, timeouts, the client.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nvmirror::admin::limits::{CONNECTIONS_MAX, HEADER_SECTION_BYTES_MAX, REQUEST_LINE_BYTES_MAX};
use nvmirror::admin::render::parse_status;
use nvmirror::admin::{request, AdminClientError, AdminHandler, AdminRefusal, AdminServer};
use nvmirror::ha::status::Status;
use nvmirror::testing::fixtures::example_status;
use parking_lot::Mutex;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Records every call; refuses an unforced takeover (409) and every
/// giveback (500); `fault` named "bad-status" refuses with an invalid
/// status, "panic" panics.
#[derive(Debug, Default)]
struct TestHandler {
    calls: Mutex<Vec<String>>,
}

impl TestHandler {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().clone()
    }
}

impl AdminHandler for TestHandler {
    fn status(&self) -> Status {
        self.calls.lock().push("status".to_owned());
        example_status()
    }

    fn metrics(&self) -> String {
        self.calls.lock().push("metrics".to_owned());
        "# HELP up Up.\n# TYPE up gauge\nup 1\n".to_owned()
    }

    fn takeover(&self, force: bool) -> Result<String, AdminRefusal> {
        self.calls.lock().push(format!("takeover force={force}"));
        if force {
            Ok("took over node 2's volumes".to_owned())
        } else {
            Err(AdminRefusal {
                status: 409,
                message: "partner is alive".to_owned(),
            })
        }
    }

    fn recover_forced(&self) -> Result<String, AdminRefusal> {
        self.calls.lock().push("recover --force".to_owned());
        Ok("recovered".to_owned())
    }

    fn giveback(&self) -> Result<String, AdminRefusal> {
        self.calls.lock().push("giveback".to_owned());
        Err(AdminRefusal {
            status: 500,
            message: "flush failed: disk full".to_owned(),
        })
    }

    fn fault(&self, name: &str, duration_ms: u64) -> Result<String, AdminRefusal> {
        self.calls
            .lock()
            .push(format!("fault {name} {duration_ms}"));
        match name {
            "bad-status" => Err(AdminRefusal {
                status: 200,
                message: "odd".to_owned(),
            }),
            "panic" => panic!("test handler panics on purpose"),
            _ => Ok(format!("{name} for {duration_ms} ms")),
        }
    }
}

fn server_with_timeout(timeout: Duration) -> (AdminServer, Arc<TestHandler>) {
    let handler = Arc::new(TestHandler::default());
    let server = AdminServer::bind_with_timeout(
        "127.0.0.1:0".parse().unwrap(),
        Arc::clone(&handler) as Arc<dyn AdminHandler>,
        timeout,
    )
    .expect("bind the admin endpoint");
    (server, handler)
}

fn server() -> (AdminServer, Arc<TestHandler>) {
    server_with_timeout(Duration::from_secs(5))
}

/// A raw exchange: the response's status, head and body.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.split("\r\n").skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }
}

fn raw(addr: SocketAddr, bytes: &[u8]) -> Raw {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    stream.write_all(bytes).unwrap();
    read_response(&mut stream)
}

fn read_response(stream: &mut TcpStream) -> Raw {
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("read until the server closes");
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    let status = head[9..12].parse().unwrap();
    let raw = Raw {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    };
    assert!(raw.head.starts_with("HTTP/1.1 "), "{raw:?}");
    assert_eq!(raw.header("connection"), Some("close"), "{raw:?}");
    assert_eq!(
        raw.header("content-length"),
        Some(raw.body.len().to_string().as_str()),
        "{raw:?}"
    );
    raw
}

fn get(addr: SocketAddr, target: &str) -> Raw {
    raw(
        addr,
        format!("GET {target} HTTP/1.1\r\nHost: admin\r\n\r\n").as_bytes(),
    )
}

fn post(addr: SocketAddr, target: &str) -> Raw {
    raw(
        addr,
        format!("POST {target} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\n\r\n").as_bytes(),
    )
}

/// A one-line plain-text error body that says `needle`.
fn assert_error(raw: &Raw, status: u16, needle: &str) {
    assert_eq!(raw.status, status, "{raw:?}");
    assert!(raw.body.contains(needle), "{:?} lacks {needle:?}", raw.body);
    assert!(
        raw.body.ends_with('\n') && raw.body.matches('\n').count() == 1,
        "{raw:?}"
    );
    assert_eq!(
        raw.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
}

#[test]
fn serves_each_route() {
    let (server, handler) = server();
    let addr = server.local_addr();

    let status = get(addr, "/status");
    assert_eq!(status.status, 200, "{status:?}");
    assert_eq!(status.header("content-type"), Some("application/json"));
    let document = parse_status(&status.body).unwrap();
    assert_eq!(document, example_status());
    assert!(
        status.body.contains("\n  \"node_id\": 1"),
        "pretty-printed: {}",
        status.body
    );

    let metrics = get(addr, "/metrics");
    assert_eq!(metrics.status, 200);
    assert!(metrics
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text; version=1.0.0"));
    assert_eq!(metrics.body, "# HELP up Up.\n# TYPE up gauge\nup 1\n");

    let takeover = post(addr, "/takeover?force=true");
    assert_eq!(takeover.status, 200);
    assert_eq!(takeover.body, "took over node 2's volumes\n");
    assert_eq!(post(addr, "/takeover?force=false").status, 409);

    let fault = post(addr, "/fault?name=cut-interconnect&duration_ms=3000");
    assert_eq!(fault.status, 200);
    assert_eq!(fault.body, "cut-interconnect for 3000 ms\n");
    // Order of parameters and percent-escapes do not matter.
    assert_eq!(
        post(addr, "/fault?duration_ms=0&name=cut%2Dinterconnect").status,
        200
    );

    assert_eq!(
        handler.calls(),
        vec![
            "status",
            "metrics",
            "takeover force=true",
            "takeover force=false",
            "fault cut-interconnect 3000",
            "fault cut-interconnect 0"
        ]
    );
}

#[test]
fn propagates_refusals() {
    let (server, handler) = server();
    let addr = server.local_addr();
    let takeover = post(addr, "/takeover");
    assert_error(&takeover, 409, "partner is alive");
    assert!(takeover.head.starts_with("HTTP/1.1 409 Conflict\r\n"));
    assert_error(&post(addr, "/giveback"), 500, "flush failed: disk full");
    // A refusal with a status that is not an error is sent as 500.
    assert_error(
        &post(addr, "/fault?name=bad-status&duration_ms=1"),
        500,
        "odd",
    );
    assert_eq!(
        handler.calls(),
        vec!["takeover force=false", "giveback", "fault bad-status 1"]
    );
}

#[test]
fn a_panicking_handler_gets_500_and_the_server_goes_on() {
    let (server, _handler) = server();
    let addr = server.local_addr();
    assert_error(
        &post(addr, "/fault?name=panic&duration_ms=1"),
        500,
        "panicked",
    );
    assert_eq!(get(addr, "/status").status, 200);
}

#[test]
fn unknown_paths_and_wrong_methods() {
    let (server, handler) = server();
    let addr = server.local_addr();
    assert_error(&get(addr, "/nope"), 404, "no such path \"/nope\"");
    assert_error(&get(addr, "/"), 404, "no such path");
    assert_error(&get(addr, "/status/"), 404, "no such path");
    assert_error(&post(addr, "/nope?x=1"), 404, "no such path");

    let wrong = post(addr, "/status");
    assert_error(&wrong, 405, "/status takes GET, not POST");
    assert_eq!(wrong.header("allow"), Some("GET"));
    let wrong = get(addr, "/takeover");
    assert_error(&wrong, 405, "/takeover takes POST");
    assert_eq!(wrong.header("allow"), Some("POST"));
    let head = raw(addr, b"HEAD /metrics HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(head.status, 405);
    let delete = raw(addr, b"DELETE /giveback HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_error(&delete, 405, "not DELETE");
    assert!(handler.calls().is_empty());
}

#[test]
fn malformed_requests_get_400_with_a_reason() {
    let (server, handler) = server();
    let addr = server.local_addr();
    let cases: &[(&str, &str)] = &[
        ("GET /status\r\nHost: a\r\n\r\n", "malformed request line"),
        (
            "GET /status HTTP/1.1 extra\r\nHost: a\r\n\r\n",
            "malformed request line",
        ),
        ("get /status HTTP/1.1\r\nHost: a\r\n\r\n", "405"), // methods are case-sensitive
        (
            "\r\nGET /status HTTP/1.1\r\nHost: a\r\n\r\n",
            "empty request line",
        ),
        ("GET /status HTTP/1.1\nHost: a\n\n", "CRLF"),
        ("GET /status HTTP/1.1\r\n\r\n", "without a Host header"),
        (
            "GET /status?verbose=1 HTTP/1.1\r\nHost: a\r\n\r\n",
            "unknown query parameter \"verbose\"",
        ),
        (
            "POST /takeover?force=yes HTTP/1.1\r\nHost: a\r\n\r\n",
            "force must be true or false",
        ),
        (
            "POST /takeover?force=true&force=true HTTP/1.1\r\nHost: a\r\n\r\n",
            "given more than once",
        ),
        (
            "POST /takeover?Force=true HTTP/1.1\r\nHost: a\r\n\r\n",
            "unknown query parameter",
        ),
        (
            "POST /takeover?force HTTP/1.1\r\nHost: a\r\n\r\n",
            "has no value",
        ),
        (
            "POST /giveback?now=1 HTTP/1.1\r\nHost: a\r\n\r\n",
            "unknown query parameter",
        ),
        (
            "POST /fault?name=x&duration_ms=3s HTTP/1.1\r\nHost: a\r\n\r\n",
            "duration_ms must be a number",
        ),
        (
            "POST /fault?name=x&duration_ms=-1 HTTP/1.1\r\nHost: a\r\n\r\n",
            "duration_ms must be a number",
        ),
        (
            "POST /fault?name=x&duration_ms= HTTP/1.1\r\nHost: a\r\n\r\n",
            "duration_ms must be a number",
        ),
        (
            "POST /fault?name=x&duration_ms=99999999999999999999999 HTTP/1.1\r\nHost: a\r\n\r\n",
            "duration_ms must be a number",
        ),
        (
            "POST /fault?name=x&duration_ms=3600001 HTTP/1.1\r\nHost: a\r\n\r\n",
            "over the limit",
        ),
        (
            "POST /fault?duration_ms=5 HTTP/1.1\r\nHost: a\r\n\r\n",
            "missing query parameter name",
        ),
        (
            "POST /fault?name=x HTTP/1.1\r\nHost: a\r\n\r\n",
            "missing query parameter duration_ms",
        ),
        (
            "POST /fault?name=&duration_ms=5 HTTP/1.1\r\nHost: a\r\n\r\n",
            "invalid fault name",
        ),
        (
            "POST /fault?name=a%20b&duration_ms=5 HTTP/1.1\r\nHost: a\r\n\r\n",
            "invalid fault name",
        ),
        (
            "POST /fault?name=%g1&duration_ms=5 HTTP/1.1\r\nHost: a\r\n\r\n",
            "bad percent-escape",
        ),
        (
            "POST /giveback HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody",
            "takes no body",
        ),
        (
            "POST /giveback HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "takes no body",
        ),
        (
            "POST /giveback HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n",
            "invalid Content-Length",
        ),
        ("GET /status HTTP/3.0\r\nHost: a\r\n\r\n", "not supported"),
        (
            "GET /status HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
            "invalid header field",
        ),
        (
            "\x16\x03\x01\x02\x00\x01\x00\x01\x7f\x03\x03\r\n\r\n",
            "invalid character",
        ), // TLS-like
    ];
    for (request, needle) in cases {
        let response = raw(addr, request.as_bytes());
        match *needle {
            "405" => assert_eq!(response.status, 405, "{request:?}"),
            "not supported" => assert_error(&response, 505, needle),
            _ => {
                assert_eq!(response.status, 400, "{request:?}: {response:?}");
                assert_error(&response, 400, needle);
            }
        }
    }
    assert!(handler.calls().is_empty(), "{:?}", handler.calls());
    // Content-Length: 0 is fine, and HTTP/1.0 needs no Host.
    assert_eq!(
        raw(
            addr,
            b"POST /takeover?force=true HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"
        )
        .status,
        200
    );
    assert_eq!(raw(addr, b"GET /status HTTP/1.0\r\n\r\n").status, 200);
}

#[test]
fn oversized_heads_get_400() {
    let (server, handler) = server();
    let addr = server.local_addr();

    // The longest request line passes the size check (and is then refused
    // for its unknown path); one byte more is refused for its size.
    let longest = format!(
        "/{}",
        "a".repeat(REQUEST_LINE_BYTES_MAX - "GET  HTTP/1.1".len() - 1)
    );
    let line = format!("GET {longest} HTTP/1.1");
    assert_eq!(line.len(), REQUEST_LINE_BYTES_MAX);
    assert_error(
        &raw(addr, format!("{line}\r\nHost: a\r\n\r\n").as_bytes()),
        404,
        "no such path",
    );
    let line = format!("GET {longest}a HTTP/1.1");
    let response = raw(addr, format!("{line}\r\nHost: a\r\n\r\n").as_bytes());
    assert_error(&response, 400, "request line longer than 8192 bytes");
    // Without any line end at all, and far longer: the server reads what
    // it must, answers, and discards the rest before closing.
    let response = raw(addr, &vec![b'A'; 200_000]);
    assert_error(&response, 400, "request line longer than 8192 bytes");

    // Header section: the request line, then 16 KiB of headers with the
    // final empty line is fine; one byte more is not.
    let head = |header_section_bytes: usize| {
        let fixed = "Host: a\r\nX-Pad: \r\n\r\n".len();
        let pad = "p".repeat(header_section_bytes - fixed);
        format!("GET /status HTTP/1.1\r\nHost: a\r\nX-Pad: {pad}\r\n\r\n")
    };
    assert_eq!(
        raw(addr, head(HEADER_SECTION_BYTES_MAX).as_bytes()).status,
        200
    );
    let response = raw(addr, head(HEADER_SECTION_BYTES_MAX + 1).as_bytes());
    assert_error(&response, 400, "header section longer than 16384 bytes");
    let mut endless = b"GET /status HTTP/1.1\r\n".to_vec();
    endless.extend(b"X-A: b\r\n".repeat(10_000));
    assert_error(&raw(addr, &endless), 400, "header section longer");

    assert_eq!(handler.calls(), vec!["status"]);
}

#[test]
fn a_silent_client_is_dropped_after_the_timeout_without_blocking_others() {
    let timeout = Duration::from_secs(1);
    let (server, _handler) = server_with_timeout(timeout);
    let addr = server.local_addr();

    let started = Instant::now();
    let mut silent = TcpStream::connect(addr).unwrap();
    silent.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    // Served at once while the silent client is connected.
    let (status, _) = request(addr, "GET", "/status", CLIENT_TIMEOUT).unwrap();
    assert_eq!(status, 200);
    assert!(started.elapsed() < timeout, "{:?}", started.elapsed());

    // The silent one is closed without a response once the timeout passes.
    let mut buf = [0u8; 64];
    let n = silent.read(&mut buf).expect("end of file, not an error");
    assert_eq!(n, 0, "no response to a client that asked nothing");
    let waited = started.elapsed();
    assert!(
        waited >= timeout - Duration::from_millis(50) && waited < timeout * 5,
        "{waited:?}"
    );

    // A client that sends part of a request in time, then stalls, gets 408.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    slow.write_all(b"GET /status HTTP/1.1\r\nHost:").unwrap();
    let response = read_response(&mut slow);
    assert_error(&response, 408, "did not arrive in time");

    // A slowloris trickling bytes is bounded by the whole-head deadline,
    // not by each read.
    let mut trickle = TcpStream::connect(addr).unwrap();
    trickle.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    let started = Instant::now();
    trickle.write_all(b"GET /status HTTP/1.1\r\n").unwrap();
    for _ in 0..20 {
        thread::sleep(Duration::from_millis(50));
        if trickle.write_all(b"X-A: b\r\n").is_err() {
            break;
        }
    }
    let mut response = Vec::new();
    let _ = trickle.read_to_end(&mut response);
    assert!(String::from_utf8_lossy(&response).starts_with("HTTP/1.1 408 "));
    assert!(started.elapsed() < timeout * 3, "{:?}", started.elapsed());
}

#[test]
fn a_client_closing_early_does_not_disturb_the_server() {
    let (server, _handler) = server();
    let addr = server.local_addr();
    drop(TcpStream::connect(addr).unwrap());
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(b"GET /status HTTP/1.1\r\n").unwrap();
    half.shutdown(Shutdown::Write).unwrap();
    let response = read_response(&mut half);
    assert_error(&response, 400, "ended before the end of its header section");
    assert_eq!(get(addr, "/status").status, 200);
}

#[test]
fn too_many_connections_get_503() {
    let (server, _handler) = server();
    let addr = server.local_addr();
    let silent: Vec<TcpStream> = (0..CONNECTIONS_MAX)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    let (status, body) = request(addr, "GET", "/status", CLIENT_TIMEOUT).unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too many admin connections"), "{body}");
    drop(silent);
    // The slots come back as the connections end.
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    loop {
        let (status, _) = request(addr, "GET", "/status", CLIENT_TIMEOUT).unwrap();
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "slots never freed");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn request_round_trip() {
    let (server, handler) = server();
    let addr = server.local_addr();
    let (status, body) = request(addr, "GET", "/status", CLIENT_TIMEOUT).unwrap();
    assert_eq!(status, 200);
    let document = parse_status(&body).unwrap();
    assert_eq!(
        nvmirror::admin::render_status(&document),
        nvmirror::admin::render_status(&example_status())
    );

    let (status, body) = request(addr, "POST", "/takeover", CLIENT_TIMEOUT).unwrap();
    assert_eq!((status, body.as_str()), (409, "partner is alive\n"));
    assert_eq!(
        nvmirror::admin::render_action("takeover", status, &body),
        "takeover refused (409 Conflict): partner is alive\n"
    );
    let (status, _) = request(addr, "POST", "/takeover?force=true", CLIENT_TIMEOUT).unwrap();
    assert_eq!(status, 200);
    let (status, _) = request(addr, "GET", "/giveback", CLIENT_TIMEOUT).unwrap();
    assert_eq!(status, 405);
    assert_eq!(
        handler.calls(),
        vec!["status", "takeover force=false", "takeover force=true"]
    );

    for (method, path) in [
        ("GET", "status"),
        ("GET", "/a b"),
        ("G T", "/status"),
        ("", "/"),
    ] {
        let err = request(addr, method, path, CLIENT_TIMEOUT).unwrap_err();
        assert!(
            matches!(err, AdminClientError::InvalidRequest { .. }),
            "{err:?}"
        );
    }
}

#[test]
fn request_to_a_closed_port_says_so() {
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let err = request(addr, "GET", "/status", CLIENT_TIMEOUT).unwrap_err();
    let AdminClientError::Connect {
        addr: err_addr,
        source,
    } = &err
    else {
        panic!("expected a connect error, got {err:?}");
    };
    assert_eq!(*err_addr, addr);
    assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused);
    let message = err.to_string();
    assert!(
        message.contains(&addr.to_string()) && message.contains("cannot connect"),
        "{message}"
    );
}

#[test]
fn request_times_out_against_a_mute_server() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let holder = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        thread::sleep(Duration::from_secs(2));
        drop(stream);
    });
    let started = Instant::now();
    let err = request(addr, "GET", "/status", Duration::from_millis(300)).unwrap_err();
    assert!(matches!(err, AdminClientError::TimedOut { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    holder.join().unwrap();
}

#[test]
fn request_refuses_a_garbage_response() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let responder = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf);
        stream.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").unwrap();
    });
    let err = request(addr, "GET", "/status", CLIENT_TIMEOUT).unwrap_err();
    assert!(matches!(err, AdminClientError::Malformed { .. }), "{err:?}");
    assert!(err.to_string().contains("malformed response"), "{err}");
    responder.join().unwrap();
}

#[test]
fn shutdown_is_prompt_idempotent_and_closes_the_port() {
    let (server, _handler) = server_with_timeout(Duration::from_secs(30));
    let addr = server.local_addr();
    // An idle connection does not hold shutdown up for the timeout.
    let mut idle = TcpStream::connect(addr).unwrap();
    idle.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    assert_eq!(get(addr, "/status").status, 200);
    let started = Instant::now();
    server.shutdown();
    server.shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let mut buf = [0u8; 16];
    assert!(matches!(idle.read(&mut buf), Ok(0) | Err(_)));
    let err = request(addr, "GET", "/status", CLIENT_TIMEOUT).unwrap_err();
    assert!(matches!(err, AdminClientError::Connect { .. }), "{err:?}");
    drop(server);
}

#[test]
fn bind_refuses_a_zero_timeout_and_a_busy_port() {
    let handler: Arc<dyn AdminHandler> = Arc::new(TestHandler::default());
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    assert!(AdminServer::bind_with_timeout(any, Arc::clone(&handler), Duration::ZERO).is_err());
    let server = AdminServer::bind(any, Arc::clone(&handler)).unwrap();
    let err = AdminServer::bind(server.local_addr(), handler).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
}
