//! The admin endpoint's responses: status, one content type, a body, and
//! `Allow` on a 405; every response closes the connection.

use std::fmt::Write as _;

use crate::admin::limits::{HEADER_SECTION_BYTES_MAX, REQUEST_LINE_BYTES_MAX};

pub(crate) const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) content_type: &'static str,
    pub(crate) body: String,
    /// The `Allow` header of a 405.
    pub(crate) allow: Option<&'static str>,
}

impl Response {
    /// A plain-text response; the body ends with exactly one newline.
    pub(crate) fn text(status: u16, message: String) -> Response {
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

    pub(crate) fn bad_request(message: String) -> Response {
        Response::text(400, message)
    }

    pub(crate) fn to_bytes(&self) -> Vec<u8> {
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

pub(crate) fn request_line_too_long() -> Response {
    Response::bad_request(format!(
        "request line longer than {REQUEST_LINE_BYTES_MAX} bytes"
    ))
}

pub(crate) fn header_section_too_long() -> Response {
    Response::bad_request(format!(
        "header section longer than {HEADER_SECTION_BYTES_MAX} bytes"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::client::parse_response;

    #[test]
    pub(crate) fn response_bytes_are_well_formed() {
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
