//! The admin endpoint's request heads: parsed strictly, each refusal one
//! line that says what was wrong.

use crate::admin::limits::{HEADERS_MAX, QUOTE_CHARS_MAX, REQUEST_LINE_BYTES_MAX};
use crate::admin::response::{request_line_too_long, Response};

// ---------------------------------------------------------------------------
// Request parsing
// ---------------------------------------------------------------------------

/// A parsed request head.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) path: String,
    /// Percent-decoded `(key, value)` pairs in order.
    pub(crate) query: Vec<(String, String)>,
}

/// Parses a request head (as the server reads it) into a request, or
/// the 400 (or 505) to answer. httparse tokenizes; what it lets through
/// that this endpoint refuses (bare LF, other HTTP versions, bodies,
/// absolute-form targets, a missing or repeated Host) is checked here.
pub(crate) fn parse_request(head: &[u8]) -> Result<Request, Response> {
    let bad = |message: String| Err(Response::bad_request(message));
    // Every line ends with CRLF (httparse takes a bare LF too), and the
    // last one is the empty line.
    let crlf_only = head.iter().enumerate().all(|(at, &b)| match b {
        b'\n' => at > 0 && head[at - 1] == b'\r',
        b'\r' => head.get(at + 1) == Some(&b'\n'),
        _ => true,
    });
    if !crlf_only || !head.ends_with(b"\r\n\r\n") {
        return bad("lines must end with CRLF".to_owned());
    }
    let line_end = head
        .windows(2)
        .position(|pair| pair == b"\r\n")
        .expect("the head ends with CRLF");
    let request_line = &head[..line_end];
    if request_line.len() > REQUEST_LINE_BYTES_MAX {
        return Err(request_line_too_long());
    }
    // Visible ASCII and single spaces only: no tabs, no control characters.
    if !request_line.iter().all(|&b| (b' '..=b'~').contains(&b)) {
        return bad(format!(
            "invalid character in the request line {}",
            quote(request_line)
        ));
    }
    if let Some(version) = unsupported_version(request_line) {
        return Err(Response::text(
            505,
            format!("{version} is not supported; use HTTP/1.1"),
        ));
    }
    let mut fields = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut parsed = httparse::Request::new(&mut fields);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return bad("incomplete request head".to_owned()),
        Err(error) => return bad(describe_parse_error(error, request_line)),
    }
    let (Some(method), Some(target), Some(minor)) = (parsed.method, parsed.path, parsed.version)
    else {
        return bad(format!("malformed request line {}", quote(request_line)));
    };
    if !target.starts_with('/') {
        return bad(format!(
            "request target {} is not an absolute path",
            quote(target.as_bytes())
        ));
    }
    if target.contains('#') {
        return bad("request target contains a fragment".to_owned());
    }

    let mut host = false;
    let mut content_length = false;
    for field in parsed.headers.iter() {
        let value = trim_ows(field.value);
        if !value
            .iter()
            .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
        {
            return bad(format!(
                "invalid character in a header value ({})",
                field.name
            ));
        }
        if field.name.eq_ignore_ascii_case("host") {
            if host {
                return bad("more than one Host header".to_owned());
            }
            host = true;
        } else if field.name.eq_ignore_ascii_case("content-length") {
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
        } else if field.name.eq_ignore_ascii_case("transfer-encoding") {
            return bad(
                "this request takes no body (Transfer-Encoding is not accepted)".to_owned(),
            );
        }
    }
    if minor == 1 && !host {
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

/// A well-formed `HTTP/x.y` other than 1.0 and 1.1 ends the request line:
/// answered 505 rather than 400.
pub(crate) fn unsupported_version(request_line: &[u8]) -> Option<&str> {
    let version = request_line.rsplit(|&b| b == b' ').next()?;
    let well_formed = version.len() == 8
        && version.starts_with(b"HTTP/")
        && version[5].is_ascii_digit()
        && version[6] == b'.'
        && version[7].is_ascii_digit();
    let supported = version == b"HTTP/1.1" || version == b"HTTP/1.0";
    (well_formed && !supported).then(|| std::str::from_utf8(version).expect("ASCII"))
}

/// What was wrong, for the 400's one line.
pub(crate) fn describe_parse_error(error: httparse::Error, request_line: &[u8]) -> String {
    match error {
        // The line endings were checked before: a newline missing is
        // something after the version.
        httparse::Error::Token | httparse::Error::NewLine | httparse::Error::Status => format!(
            "malformed request line {} (expected METHOD /path HTTP/1.1)",
            quote(request_line)
        ),
        httparse::Error::Version => format!("invalid HTTP version in {}", quote(request_line)),
        httparse::Error::HeaderName => {
            "invalid header field (a name of token characters, then a colon; no line folding)"
                .to_owned()
        }
        httparse::Error::HeaderValue => "invalid character in a header value".to_owned(),
        httparse::Error::TooManyHeaders => format!("more than {HEADERS_MAX} header fields"),
    }
}

/// `key=value&key=value`, percent-decoded. An empty query (`/path?`) has no
/// pairs.
pub(crate) fn parse_query(query: &str) -> Result<Vec<(String, String)>, String> {
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

pub(crate) fn percent_decode(text: &str) -> Result<String, String> {
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
pub(crate) fn quote_raw(bytes: &[u8]) -> String {
    let quoted = quote(bytes);
    quoted[1..quoted.len() - 1].to_owned()
}

/// Unsigned decimal digits only (no sign, no spaces), within u64.
pub(crate) fn parse_decimal(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

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
            ("G(T /status HTTP/1.1\r\nHost: x\r\n\r\n", 400, "malformed request line"),
            ("GET status HTTP/1.1\r\nHost: x\r\n\r\n", 400, "not an absolute path"),
            ("GET http://x/status HTTP/1.1\r\nHost: x\r\n\r\n", 400, "not an absolute path"),
            ("GET /status#x HTTP/1.1\r\nHost: x\r\n\r\n", 400, "fragment"),
            ("GET /status HTTP/1.x\r\nHost: x\r\n\r\n", 400, "invalid HTTP version"),
            ("GET /status HTTP/2.0\r\nHost: x\r\n\r\n", 505, "not supported"),
            ("GET /status HTTP/1.1\r\n\r\n", 400, "without a Host"),
            ("GET /status HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400, "more than one Host"),
            ("GET /status HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400, "folding"),
            ("GET /status HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", 400, "a colon"),
            ("GET /status HTTP/1.1\r\nHost : x\r\n\r\n", 400, "invalid header field"),
            ("GET /status HTTP/1.1\r\nHost: x\x01\r\n\r\n", 400, "invalid character in a header"),
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
}
