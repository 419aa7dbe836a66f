//! A threaded TCP service: an accept thread, one thread per connection, a
//! registry of open connections, and a shutdown that closes them all and
//! joins every thread. The NBD front end and the admin endpoint are both
//! one; they differ only in what a connection does.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use parking_lot::Mutex;
use tracing::{debug, error, info, warn};

/// After a failed accept (e.g. out of file descriptors), wait before the
/// next, so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Bounds the connection the service makes to itself to wake its accept.
const WAKE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What the accept thread and the connection threads of a service share.
#[derive(Debug)]
pub struct ServiceState {
    /// For logs and thread names ("NBD", "admin").
    name: &'static str,
    shutting_down: AtomicBool,
    connections: Mutex<Connections>,
}

#[derive(Debug, Default)]
struct Connections {
    next_id: u64,
    /// A clone of each open connection's socket, to close it at shutdown.
    sockets: HashMap<u64, TcpStream>,
    /// Connection threads not yet joined.
    threads: Vec<JoinHandle<()>>,
}

impl ServiceState {
    pub fn new(name: &'static str) -> Arc<ServiceState> {
        Arc::new(ServiceState {
            name,
            shutting_down: AtomicBool::new(false),
            connections: Mutex::new(Connections::default()),
        })
    }

    /// Whether the service is shutting down: a connection that sees its
    /// socket closed under it knows why.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.connections.lock().sockets.len()
    }
}

type ServeFn = dyn Fn(TcpStream, SocketAddr) + Send + Sync;

/// At most `max` connections at once; one more is handed to `refuse`
/// (which can answer it) and closed.
pub struct ConnectionLimit {
    pub max: usize,
    pub refuse: Box<dyn Fn(TcpStream, SocketAddr) + Send + Sync>,
}

impl std::fmt::Debug for ConnectionLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionLimit")
            .field("max", &self.max)
            .finish()
    }
}

/// A running service; [`TcpService::shutdown`] (or drop) stops it.
#[derive(Debug)]
pub struct TcpService {
    local_addr: SocketAddr,
    state: Arc<ServiceState>,
    /// `None` once shut down.
    accept_thread: Mutex<Option<JoinHandle<()>>>,
}

impl TcpService {
    /// Serve `listener`: every connection runs `serve` on a thread of its
    /// own.
    pub fn start(
        listener: TcpListener,
        state: Arc<ServiceState>,
        limit: Option<ConnectionLimit>,
        serve: impl Fn(TcpStream, SocketAddr) + Send + Sync + 'static,
    ) -> io::Result<TcpService> {
        let local_addr = listener.local_addr()?;
        let serve: Arc<ServeFn> = Arc::new(serve);
        let accept_state = Arc::clone(&state);
        let accept_thread = thread::Builder::new()
            .name(format!("{}-accept", state.name.to_lowercase()))
            .spawn(move || accept_loop(listener, &accept_state, limit.as_ref(), &serve))?;
        info!(addr = %local_addr, service = state.name, "listening");
        Ok(TcpService {
            local_addr,
            state,
            accept_thread: Mutex::new(Some(accept_thread)),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn connections(&self) -> usize {
        self.state.connections()
    }

    /// Stop accepting, close every open connection (work under way on one
    /// finishes; its answer may be lost), join the threads. Idempotent.
    pub fn shutdown(&self) {
        let Some(accept_thread) = self.accept_thread.lock().take() else {
            return;
        };
        let name = self.state.name;
        self.state.shutting_down.store(true, Ordering::SeqCst);
        // The accept thread blocks in accept(2); a connection wakes it, and it
        // sees the flag before serving anything.
        let wake_addr = match self.local_addr {
            SocketAddr::V4(a) if a.ip().is_unspecified() => {
                SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, a.port()))
            }
            SocketAddr::V6(a) if a.ip().is_unspecified() => {
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
            }
            addr => addr,
        };
        match TcpStream::connect_timeout(&wake_addr, WAKE_CONNECT_TIMEOUT) {
            Ok(_) => {
                if accept_thread.join().is_err() {
                    error!(service = name, "accept thread panicked");
                }
            }
            // Joining would wait for the next client; leave the thread to
            // exit when one comes.
            Err(err) => {
                error!(service = name, addr = %wake_addr, error = %err, "cannot wake the accept thread")
            }
        }
        // No connection is registered after the accept thread has stopped.
        let threads = {
            let mut connections = self.state.connections.lock();
            for socket in connections.sockets.values() {
                // Reads see end of file, writes fail; the threads end.
                let _ = socket.shutdown(Shutdown::Both);
            }
            std::mem::take(&mut connections.threads)
        };
        for thread in threads {
            if thread.join().is_err() {
                error!(service = name, "connection thread panicked");
            }
        }
        info!(service = name, addr = %self.local_addr, "stopped");
    }
}

impl Drop for TcpService {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(
    listener: TcpListener,
    state: &Arc<ServiceState>,
    limit: Option<&ConnectionLimit>,
    serve: &Arc<ServeFn>,
) {
    for incoming in listener.incoming() {
        if state.is_shutting_down() {
            break;
        }
        match incoming {
            Ok(stream) => start_connection(state, limit, serve, stream),
            Err(err) => {
                warn!(service = state.name, error = %err, "accept failed");
                thread::sleep(ACCEPT_ERROR_BACKOFF);
            }
        }
    }
}

fn start_connection(
    state: &Arc<ServiceState>,
    limit: Option<&ConnectionLimit>,
    serve: &Arc<ServeFn>,
    stream: TcpStream,
) {
    let name = state.name;
    let peer = match stream.peer_addr() {
        Ok(peer) => peer,
        Err(err) => {
            debug!(service = name, error = %err, "client left before it was served");
            return;
        }
    };
    let registered = match stream.try_clone() {
        Ok(registered) => registered,
        Err(err) => {
            warn!(service = name, %peer, error = %err, "cannot set up a connection");
            return;
        }
    };
    let mut connections = state.connections.lock();
    reap_finished(name, &mut connections.threads);
    if let Some(limit) = limit {
        if connections.sockets.len() >= limit.max {
            drop(connections);
            warn!(service = name, %peer, max = limit.max, "too many connections: refused");
            (limit.refuse)(stream, peer);
            return;
        }
    }
    let id = connections.next_id;
    connections.next_id += 1;
    connections.sockets.insert(id, registered);
    let thread_state = Arc::clone(state);
    let serve = Arc::clone(serve);
    let spawned = thread::Builder::new()
        .name(format!("{}-conn-{id}", name.to_lowercase()))
        .spawn(move || {
            let _unregister = Unregister {
                state: &thread_state,
                id,
            };
            serve(stream, peer);
        });
    match spawned {
        Ok(thread) => connections.threads.push(thread),
        Err(err) => {
            connections.sockets.remove(&id);
            warn!(service = name, %peer, error = %err, "cannot start a connection thread");
        }
    }
}

/// Joins the connection threads that have ended, so the list stays as long
/// as the number of open connections.
fn reap_finished(name: &str, threads: &mut Vec<JoinHandle<()>>) {
    let mut index = 0;
    while index < threads.len() {
        if threads[index].is_finished() {
            if threads.swap_remove(index).join().is_err() {
                error!(service = name, "connection thread panicked");
            }
        } else {
            index += 1;
        }
    }
}

/// Removes a connection from the registry when its thread ends, even by a
/// panic.
struct Unregister<'a> {
    state: &'a ServiceState,
    id: u64,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        let socket = self.state.connections.lock().sockets.remove(&self.id);
        if let Some(socket) = socket {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}
