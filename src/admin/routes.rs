//! The admin endpoint's routes, what each calls on the handler, and the
//! responses it writes.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::panic::{self, AssertUnwindSafe};

use tracing::{debug, error, info};

use crate::admin::handler::{AdminHandler, AdminRefusal};
use crate::admin::limits::{FAULT_DURATION_MS_MAX, FAULT_NAME_BYTES_MAX};
use crate::admin::metrics::METRICS_CONTENT_TYPE;
use crate::admin::request::{parse_decimal, quote, quote_raw, Request};
use crate::admin::response::Response;

// ---------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------

/// The routes: path, the one method it takes, the query keys it knows.
pub(crate) const ROUTES: &[(&str, &str, &[&str])] = &[
    ("/status", "GET", &[]),
    ("/metrics", "GET", &[]),
    ("/takeover", "POST", &["force"]),
    ("/giveback", "POST", &[]),
    ("/recover", "POST", &["force"]),
    ("/fault", "POST", &["name", "duration_ms"]),
];

/// What a well-formed request asks of the handler.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Call {
    Status,
    Metrics,
    Takeover {
        force: bool,
    },
    Giveback,
    /// Recover from this node's own log although it may lack writes it
    /// acknowledged (only with `force=true`).
    RecoverForced,
    Fault {
        name: String,
        duration_ms: u64,
    },
}

/// The call a request makes, or the 404, 405 or 400 to answer.
pub(crate) fn resolve(request: &Request) -> Result<Call, Response> {
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
        "/recover" => match param("force") {
            Some("true") => Ok(Call::RecoverForced),
            _ => bad(
                "recover needs force=true: the node's own log may lack writes it acknowledged, \
                 and those are lost"
                    .to_owned(),
            ),
        },
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
pub(crate) fn execute(handler: &dyn AdminHandler, call: &Call, peer: SocketAddr) -> Response {
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
        Call::RecoverForced => {
            info!(%peer, "admin: forced recovery from the node's own log requested");
            action("recover", call_handler(|| handler.recover_forced()))
        }
        Call::Fault { name, duration_ms } => {
            info!(%peer, name, duration_ms, "admin: fault injection requested");
            action("fault", call_handler(|| handler.fault(name, *duration_ms)))
        }
    }
}

/// Runs a handler call; a panic in it is the node's bug, answered 500
/// rather than a dropped connection.
pub(crate) fn call_handler<T>(call: impl FnOnce() -> T) -> Result<T, Response> {
    panic::catch_unwind(AssertUnwindSafe(call)).map_err(|_| {
        error!("admin handler panicked");
        Response::text(
            500,
            "internal error: the node's handler panicked".to_owned(),
        )
    })
}

pub(crate) fn action(
    what: &str,
    result: Result<Result<String, AdminRefusal>, Response>,
) -> Response {
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
