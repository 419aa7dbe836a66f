//! The client the CLI uses to talk to a node's admin endpoint.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::admin::limits::{REQUEST_LINE_BYTES_MAX, RESPONSE_BYTES_MAX};
use crate::admin::request::{is_tchar, parse_decimal, quote};

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
pub(crate) fn parse_response(response: &[u8]) -> Result<(u16, String), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
