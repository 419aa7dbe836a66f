//! The NBD server: a listener thread, and per connection a thread that runs
//! the handshake and then reads requests, with a pool of workers that
//! execute them and write the replies.
//!
//! ```text
//! accept thread ──► connection thread: handshake ─► reader ──(bounded queue)──► workers × N
//!                                                     │ waits for an in-flight slot │
//!                                                     └── error replies ──► writer lock ◄── replies
//! ```
//!
//! - The reader parses requests and reads a WRITE's payload fully before it
//!   dispatches it, so nothing half-received is ever executed.
//! - A request holds an in-flight slot from admission until its reply is on
//!   the socket; the reader waits while the connection has
//!   `max_in_flight_per_connection` requests or [`IN_FLIGHT_PAYLOAD_BYTES_MAX`]
//!   bytes of payload in flight. That bounds a connection's memory.
//! - A reply is one buffer (header and READ data) written whole under the
//!   writer lock, so replies never interleave; they go out in completion
//!   order, which need not be request order.
//! - Workers are scoped threads of the connection thread: when the reader
//!   stops (DISC, client gone, protocol violation, server shutdown), the
//!   queue closes, the workers finish what was dispatched, and the
//!   connection thread joins them before closing the socket.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, info_span, warn};

use crate::connection::{is_disconnect, ConnectionError, ServerConfig, Shared, HANDSHAKE_DEADLINE};
use crate::handshake::{handshake, HandshakeEnd};
use crate::service::{ServiceState, TcpService};
use crate::transmission::transmission;
use crate::Exports;

/// An NBD server on one TCP address, serving on background threads until
/// [`NbdServer::shutdown`] or drop.
#[derive(Debug)]
pub struct NbdServer {
    pub(crate) service: TcpService,
}

impl NbdServer {
    /// Bind `addr` (e.g. "127.0.0.1:0") and serve `exports` on background
    /// threads.
    pub fn bind(
        addr: SocketAddr,
        exports: Arc<dyn Exports>,
        config: ServerConfig,
    ) -> io::Result<NbdServer> {
        NbdServer::bind_with_handshake_deadline(addr, exports, config, HANDSHAKE_DEADLINE)
    }

    pub(super) fn bind_with_handshake_deadline(
        addr: SocketAddr,
        exports: Arc<dyn Exports>,
        config: ServerConfig,
        handshake_deadline: Duration,
    ) -> io::Result<NbdServer> {
        config.validate()?;
        let listener = TcpListener::bind(addr)?;
        let service = ServiceState::new("NBD");
        let shared = Arc::new(Shared {
            exports,
            config,
            handshake_deadline,
            service: Arc::clone(&service),
        });
        let service = TcpService::start(listener, service, None, move |stream, peer| {
            serve_connection(&shared, stream, peer)
        })?;
        Ok(NbdServer { service })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.service.local_addr()
    }

    /// Stop accepting, close every connection (in-flight requests finish,
    /// their replies may be lost), join the threads. Idempotent; also on
    /// drop.
    pub fn shutdown(&self) {
        self.service.shutdown();
    }

    /// Number of open client connections (for status and metrics).
    pub fn connections(&self) -> usize {
        self.service.connections()
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub(crate) fn serve_connection(shared: &Shared, stream: TcpStream, peer: SocketAddr) {
    let span = info_span!("nbd_connection", %peer, export = tracing::field::Empty);
    let _entered = span.enter();
    info!("NBD client connected");
    let result = match handshake(shared, &stream) {
        Ok(HandshakeEnd::Transmission(negotiated)) => {
            span.record("export", negotiated.name.as_str());
            info!(
                size_bytes = negotiated.size_bytes,
                "NBD handshake done, serving export"
            );
            transmission(shared, &stream, &negotiated, &span)
        }
        Ok(HandshakeEnd::Closed) => Ok(()),
        Err(err) => Err(err),
    };
    match result {
        // The server closed the socket; the reader saw it as end of file.
        _ if shared.service.is_shutting_down() => {
            info!("NBD connection closed: server shutting down")
        }
        Ok(()) => info!("NBD client disconnected"),
        Err(ConnectionError::Io { during, source }) if is_disconnect(&source) => {
            info!(during, error = %source, "NBD client went away")
        }
        Err(err) => warn!(
            error = &err as &(dyn std::error::Error + 'static),
            "NBD connection closed by the server"
        ),
    }
    let _ = stream.shutdown(Shutdown::Both);
}
