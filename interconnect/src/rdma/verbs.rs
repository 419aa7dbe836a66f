//! Safe owned types over libibverbs and librdmacm (`rdma-sys`). All of the
//! RDMA transport's `unsafe` lives in this module; every block says which
//! invariant makes it sound.
//!
//! # Ownership and drop order
//!
//! Each arrow means "holds an `Arc` of, so is destroyed before":
//!
//! ```text
//! QueuePair ──> CompletionQueue ──> CmId ──> EventChannel
//!     │  └────> ProtectionDomain ──> CmId
//!     └───────> CmId
//! MemoryRegion ──> ProtectionDomain, and the SharedMemory it covers
//! ```
//!
//! So, whatever order the owners drop them in: the QP is destroyed before
//! its CQ and PD; every MR is deregistered before its PD is deallocated and
//! before its memory can be unmapped; the PD and CQ are released before the
//! `rdma_cm_id` whose device context they were created on (librdmacm may
//! close that context when its last id goes); every id is destroyed before
//! its event channel.
//!
//! # Why the post functions can be safe
//!
//! A work request only names registered memory, by key: the device touches
//! nothing outside a live registration. Local ranges are bounds-checked
//! against the `MemoryRegion` here; a `MemoryRegion` keeps the memory it
//! covers alive, and once `ibv_dereg_mr` returns the device no longer
//! accesses it (a request still in flight then fails with a protection
//! error, it does not write freed memory). Registered memory is a
//! [`SharedMemory`], whose contract already allows a device to write it
//! concurrently with the atomic copies of the rest of the crate. Control
//! messages are sent inline: the provider copies the bytes during
//! `ibv_post_send`. Remote ranges are the partner's business: its
//! registration bounds what we may write.
//!
//! Every call that can fail returns [`Error::Rdma(RdmaError::Call)`] with the errno.

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::os::raw::{c_int, c_void};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdma_sys as ffi;

use crate::{Error, RdmaError, SharedMemory};

fn rdma_error(context: &'static str, source: io::Error) -> Error {
    Error::Rdma(RdmaError::Call { context, source })
}

fn last_error(context: &'static str) -> Error {
    rdma_error(context, io::Error::last_os_error())
}

/// librdmacm convention: 0, or -1 with errno set.
fn check_cm(ret: c_int, context: &'static str) -> Result<(), Error> {
    if ret == 0 {
        Ok(())
    } else {
        Err(last_error(context))
    }
}

/// libibverbs convention for most calls: 0, or an errno value.
fn check_verbs(ret: c_int, context: &'static str) -> Result<(), Error> {
    match ret {
        0 => Ok(()),
        // Some providers return -1 and set errno.
        ret if ret < 0 => Err(last_error(context)),
        errno => Err(rdma_error(context, io::Error::from_raw_os_error(errno))),
    }
}

/// The names of the RDMA devices this process can open. An error (on a
/// kernel without RDMA: "Function not implemented") means there are none.
pub fn device_names() -> Result<Vec<String>, Error> {
    let mut count: c_int = 0;
    // SAFETY: `count` is a valid out-pointer; the call allocates the list.
    let list = unsafe { ffi::ibv_get_device_list(&mut count) };
    let Some(list) = NonNull::new(list) else {
        return Err(last_error("listing RDMA devices"));
    };
    let count = usize::try_from(count).unwrap_or(0);
    let mut names = Vec::with_capacity(count);
    for i in 0..count {
        // SAFETY: the list holds `count` device pointers and stays valid
        // until `ibv_free_device_list` below.
        let device = unsafe { *list.as_ptr().add(i) };
        // SAFETY: `device` is a live device of the list; its name is a
        // NUL-terminated string it owns, copied out before the list is freed.
        let name = unsafe { CStr::from_ptr(ffi::ibv_get_device_name(device)) };
        names.push(name.to_string_lossy().into_owned());
    }
    // SAFETY: the list came from `ibv_get_device_list` and is not used again.
    unsafe { ffi::ibv_free_device_list(list.as_ptr()) };
    Ok(names)
}

fn set_nonblocking(fd: RawFd, context: &'static str) -> Result<(), Error> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own touch no memory; a bad
    // descriptor is reported as EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(last_error(context));
    }
    // SAFETY: as above.
    let ret = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if ret < 0 {
        return Err(last_error(context));
    }
    Ok(())
}

/// Waits until one of `fds` is readable or `timeout` passes; returns which
/// are readable (hang-ups and errors count as readable: the next read says
/// what happened).
pub fn wait_readable(fds: &[RawFd], timeout: Duration) -> Result<Vec<bool>, Error> {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let timeout_ms = c_int::try_from(timeout.as_millis()).unwrap_or(c_int::MAX);
    loop {
        // SAFETY: `polls` is a valid array of `polls.len()` pollfd structs
        // that poll(2) may write `revents` into; it outlives the call.
        let ret =
            unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, timeout_ms) };
        if ret >= 0 {
            break;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(rdma_error("waiting for RDMA events", error));
        }
    }
    Ok(polls.iter().map(|p| p.revents != 0).collect())
}

fn sockaddr_from(addr: SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid
    // (unspecified-family) value that is then filled in.
    let mut storage: libc::sockaddr_storage = unsafe { MaybeUninit::zeroed().assume_init() };
    match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for every
            // sockaddr type, sockaddr_in included.
            unsafe { ptr::write(ptr::addr_of_mut!(storage).cast(), sin) };
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo().to_be(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { ptr::write(ptr::addr_of_mut!(storage).cast(), sin6) };
        }
    }
    storage
}

/// # Safety
///
/// `sa` must point at a socket address valid for reads of its family's size.
unsafe fn socket_addr_at(sa: *const libc::sockaddr) -> Option<SocketAddr> {
    // SAFETY: the caller guarantees `sa` is readable; every family starts
    // with `sa_family`.
    let family = c_int::from(unsafe { (*sa).sa_family });
    match family {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in; read unaligned in
            // case the embedding struct packs it.
            let sin = unsafe { ptr::read_unaligned(sa.cast::<libc::sockaddr_in>()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6.
            let sin6 = unsafe { ptr::read_unaligned(sa.cast::<libc::sockaddr_in6>()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                u32::from_be(sin6.sin6_flowinfo),
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

// --- rdma_cm -----------------------------------------------------------------

/// An rdma_cm event channel (a file descriptor), non-blocking.
pub struct EventChannel {
    raw: NonNull<ffi::rdma_event_channel>,
}

// SAFETY: the channel is a descriptor wrapper; librdmacm's calls on it
// (rdma_get_cm_event, rdma_migrate_id, destroy) may be made from any thread,
// and concurrent readers would only race for which of them gets an event.
unsafe impl Send for EventChannel {}
// SAFETY: as for `Send`; `&EventChannel` only reads events.
unsafe impl Sync for EventChannel {}

impl fmt::Debug for EventChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventChannel")
            .field("fd", &self.fd())
            .finish()
    }
}

/// What rdma_cm said, copied out of the event before it is acknowledged.
#[derive(Debug)]
pub struct CmEvent {
    /// `rdma_cm_event_type`.
    pub kind: u32,
    /// 0, a negative errno, or (REJECTED) the reject reason.
    pub status: i32,
    /// The peer's private data, if the event carries any.
    pub private_data: Vec<u8>,
    /// CONNECT_REQUEST: the new connection's id, now owned by the caller.
    pub request: Option<CmId>,
}

/// rdma_cm event kinds the transport tells apart.
pub mod event {
    use rdma_sys::rdma_cm_event_type as t;
    /// The destination address resolved.
    pub const ADDR_RESOLVED: u32 = t::RDMA_CM_EVENT_ADDR_RESOLVED;
    /// The destination address did not resolve (yet).
    pub const ADDR_ERROR: u32 = t::RDMA_CM_EVENT_ADDR_ERROR;
    /// The route resolved.
    pub const ROUTE_RESOLVED: u32 = t::RDMA_CM_EVENT_ROUTE_RESOLVED;
    /// A peer asks to connect.
    pub const CONNECT_REQUEST: u32 = t::RDMA_CM_EVENT_CONNECT_REQUEST;
    /// The connection is up.
    pub const ESTABLISHED: u32 = t::RDMA_CM_EVENT_ESTABLISHED;
    /// The peer refused.
    pub const REJECTED: u32 = t::RDMA_CM_EVENT_REJECTED;
    /// The connection went down.
    pub const DISCONNECTED: u32 = t::RDMA_CM_EVENT_DISCONNECTED;
    /// The device went away.
    pub const DEVICE_REMOVAL: u32 = t::RDMA_CM_EVENT_DEVICE_REMOVAL;
    /// The QP left its time-wait state.
    pub const TIMEWAIT_EXIT: u32 = t::RDMA_CM_EVENT_TIMEWAIT_EXIT;
    /// The address changed under the connection.
    pub const ADDR_CHANGE: u32 = t::RDMA_CM_EVENT_ADDR_CHANGE;
}

/// librdmacm's name for an event kind.
pub fn event_name(kind: u32) -> String {
    // SAFETY: rdma_event_str returns a pointer to a static NUL-terminated
    // string for every value (an "UNKNOWN" one for values it does not know).
    unsafe { CStr::from_ptr(ffi::rdma_event_str(kind)) }
        .to_string_lossy()
        .into_owned()
}

impl EventChannel {
    /// A new channel, non-blocking.
    pub fn new() -> Result<Arc<Self>, Error> {
        // SAFETY: no arguments; returns a new channel or NULL with errno.
        let raw = unsafe { ffi::rdma_create_event_channel() };
        let raw =
            NonNull::new(raw).ok_or_else(|| last_error("creating an rdma_cm event channel"))?;
        let channel = Arc::new(Self { raw });
        set_nonblocking(
            channel.fd(),
            "making the rdma_cm event channel non-blocking",
        )?;
        Ok(channel)
    }

    /// The descriptor to wait on.
    pub fn fd(&self) -> RawFd {
        // SAFETY: `raw` is a live channel until drop; `fd` is a plain field.
        unsafe { self.raw.as_ref().fd }
    }

    /// The next event, if one is ready; never blocks.
    pub fn try_event(self: &Arc<Self>) -> Result<Option<CmEvent>, Error> {
        let mut raw_event: *mut ffi::rdma_cm_event = ptr::null_mut();
        // SAFETY: the channel is live; `raw_event` is a valid out-pointer.
        let ret = unsafe { ffi::rdma_get_cm_event(self.raw.as_ptr(), &mut raw_event) };
        if ret != 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(rdma_error("reading an rdma_cm event", error));
        }
        // SAFETY: on success `raw_event` points at an event we own until
        // `rdma_ack_cm_event`; everything needed is copied out before that.
        let event = unsafe { &*raw_event };
        let kind = event.event;
        // SAFETY: for the connection events of an RC id, `param` holds the
        // `conn` member; its private data pointer is NULL or points at
        // `private_data_len` bytes that live until the event is acked.
        let private_data = unsafe {
            let conn = &event.param.conn;
            if conn.private_data.is_null() || conn.private_data_len == 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts(
                    conn.private_data.cast::<u8>(),
                    usize::from(conn.private_data_len),
                )
                .to_vec()
            }
        };
        let request = if kind == event::CONNECT_REQUEST {
            NonNull::new(event.id).map(|raw| CmId {
                raw,
                channel: Arc::clone(self),
                has_qp: AtomicBool::new(false),
            })
        } else {
            None
        };
        let status = event.status;
        // SAFETY: the event came from rdma_get_cm_event and is acked once;
        // nothing borrowed from it is used afterwards.
        unsafe { ffi::rdma_ack_cm_event(raw_event) };
        Ok(Some(CmEvent {
            kind,
            status,
            private_data,
            request,
        }))
    }

    /// Waits up to `timeout` for the next event.
    pub fn next_event(self: &Arc<Self>, timeout: Duration) -> Result<Option<CmEvent>, Error> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(event) = self.try_event()? {
                return Ok(Some(event));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            wait_readable(&[self.fd()], left)?;
        }
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: every id on this channel holds an `Arc` of it, so all are
        // destroyed by now (as rdma_destroy_event_channel requires); the
        // channel is not used again.
        unsafe { ffi::rdma_destroy_event_channel(self.raw.as_ptr()) };
    }
}

/// An `rdma_cm_id` of the TCP port space (reliable connected).
pub struct CmId {
    raw: NonNull<ffi::rdma_cm_id>,
    channel: Arc<EventChannel>,
    has_qp: AtomicBool,
}

// SAFETY: librdmacm ids may be used from any thread; the transport calls
// the connection-changing functions (connect, accept, disconnect) from one
// thread at a time, and librdmacm serializes the commands per id in the
// kernel (ucma) anyway. Destroying it from another thread is allowed.
unsafe impl Send for CmId {}
// SAFETY: as for `Send`.
unsafe impl Sync for CmId {}

impl fmt::Debug for CmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CmId")
            .field("local", &self.local_addr())
            .field("peer", &self.peer_addr())
            .field("device", &self.device_name())
            .finish()
    }
}

/// Connection parameters both sides pass to rdma_cm.
#[derive(Debug, Clone, Copy)]
pub struct ConnParams<'a> {
    /// At most 56 bytes on connect, 196 on accept.
    pub private_data: &'a [u8],
    /// Transport retries before a work request fails (0..=7).
    pub retry_count: u8,
    /// Receiver-not-ready retries; 7 would mean "forever", so at most 6.
    pub rnr_retry_count: u8,
}

impl CmId {
    /// A new id on `channel`.
    pub fn new(channel: &Arc<EventChannel>) -> Result<Self, Error> {
        let mut raw: *mut ffi::rdma_cm_id = ptr::null_mut();
        // SAFETY: the channel is live (we keep an `Arc`); `raw` is a valid
        // out-pointer; no context pointer is attached.
        let ret = unsafe {
            ffi::rdma_create_id(
                channel.raw.as_ptr(),
                &mut raw,
                ptr::null_mut(),
                ffi::rdma_port_space::RDMA_PS_TCP,
            )
        };
        check_cm(ret, "creating an rdma_cm id")?;
        let raw = NonNull::new(raw).ok_or_else(|| last_error("creating an rdma_cm id"))?;
        Ok(Self {
            raw,
            channel: Arc::clone(channel),
            has_qp: AtomicBool::new(false),
        })
    }

    /// The channel this id's events arrive on.
    pub fn channel(&self) -> &Arc<EventChannel> {
        &self.channel
    }

    /// Binds to a local address (port 0: any).
    pub fn bind(&self, addr: SocketAddr) -> Result<(), Error> {
        let mut storage = sockaddr_from(addr);
        // SAFETY: the id is live; `storage` holds a valid sockaddr that
        // rdma_bind_addr only reads (it copies it).
        let ret =
            unsafe { ffi::rdma_bind_addr(self.raw.as_ptr(), ptr::addr_of_mut!(storage).cast()) };
        check_cm(ret, "binding the rdma_cm id")
    }

    /// Listens for connection requests; they arrive on this id's channel.
    pub fn listen(&self, backlog: i32) -> Result<(), Error> {
        // SAFETY: the id is live and bound.
        let ret = unsafe { ffi::rdma_listen(self.raw.as_ptr(), backlog) };
        check_cm(ret, "listening on the rdma_cm id")
    }

    /// Starts resolving `dst` (an ADDR_RESOLVED or ADDR_ERROR event follows).
    pub fn resolve_addr(
        &self,
        src: Option<SocketAddr>,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<(), Error> {
        let mut src = src.map(sockaddr_from);
        let mut dst = sockaddr_from(dst);
        let src_ptr = src
            .as_mut()
            .map_or(ptr::null_mut(), |s| ptr::addr_of_mut!(*s).cast());
        let timeout_ms = c_int::try_from(timeout.as_millis()).unwrap_or(c_int::MAX);
        // SAFETY: the id is live; both addresses are valid sockaddrs (or
        // NULL for the source) that librdmacm copies during the call.
        let ret = unsafe {
            ffi::rdma_resolve_addr(
                self.raw.as_ptr(),
                src_ptr,
                ptr::addr_of_mut!(dst).cast(),
                timeout_ms,
            )
        };
        check_cm(ret, "resolving the partner's RDMA address")
    }

    /// Starts resolving the route (ROUTE_RESOLVED or ROUTE_ERROR follows).
    pub fn resolve_route(&self, timeout: Duration) -> Result<(), Error> {
        let timeout_ms = c_int::try_from(timeout.as_millis()).unwrap_or(c_int::MAX);
        // SAFETY: the id is live and its address resolved.
        let ret = unsafe { ffi::rdma_resolve_route(self.raw.as_ptr(), timeout_ms) };
        check_cm(ret, "resolving the route to the partner")
    }

    fn conn_param(params: &ConnParams<'_>) -> Result<ffi::rdma_conn_param, Error> {
        let private_data_len = u8::try_from(params.private_data.len()).map_err(|_| {
            rdma_error(
                "building connection parameters",
                io::Error::new(io::ErrorKind::InvalidInput, "private data too long"),
            )
        })?;
        assert!(params.rnr_retry_count < 7, "7 RNR retries means forever");
        assert!(params.retry_count <= 7);
        Ok(ffi::rdma_conn_param {
            private_data: params.private_data.as_ptr().cast::<c_void>(),
            private_data_len,
            // One outstanding RDMA READ each way: enough for a read-after-write
            // probe, and no more resources than that.
            responder_resources: 1,
            initiator_depth: 1,
            flow_control: 0,
            retry_count: params.retry_count,
            rnr_retry_count: params.rnr_retry_count,
            srq: 0,
            qp_num: 0,
        })
    }

    /// Connects (the id has a QP); CONNECT response events follow.
    pub fn connect(&self, params: &ConnParams<'_>) -> Result<(), Error> {
        let mut param = Self::conn_param(params)?;
        // SAFETY: the id is live with its route resolved; `param` and the
        // private data it points at outlive the call, which copies them.
        let ret = unsafe { ffi::rdma_connect(self.raw.as_ptr(), &mut param) };
        check_cm(ret, "connecting to the partner")
    }

    /// Accepts a connection request (the id has a QP).
    pub fn accept(&self, params: &ConnParams<'_>) -> Result<(), Error> {
        let mut param = Self::conn_param(params)?;
        // SAFETY: the id is a live connection request; `param` and its
        // private data outlive the call, which copies them.
        let ret = unsafe { ffi::rdma_accept(self.raw.as_ptr(), &mut param) };
        check_cm(ret, "accepting the partner's connection")
    }

    /// Refuses a connection request, telling the peer why in `private_data`.
    pub fn reject(&self, private_data: &[u8]) -> Result<(), Error> {
        let len = u8::try_from(private_data.len()).expect("reject private data fits a u8 length");
        // SAFETY: the id is a live connection request; the private data is
        // valid for `len` bytes during the call, which copies it.
        let ret = unsafe { ffi::rdma_reject(self.raw.as_ptr(), private_data.as_ptr().cast(), len) };
        check_cm(ret, "refusing a connection")
    }

    /// Disconnects; moves the QP to the error state (its requests flush).
    pub fn disconnect(&self) -> Result<(), Error> {
        // SAFETY: the id is live; disconnecting an unconnected id fails
        // with an errno, nothing worse.
        let ret = unsafe { ffi::rdma_disconnect(self.raw.as_ptr()) };
        check_cm(ret, "disconnecting")
    }

    /// Moves the id's events to `channel` (no events of it may be unacked;
    /// `EventChannel` acks every event as it reads it).
    pub fn migrate(&mut self, channel: &Arc<EventChannel>) -> Result<(), Error> {
        // SAFETY: both the id and the channel are live; we hold no
        // unacknowledged event of this id.
        let ret = unsafe { ffi::rdma_migrate_id(self.raw.as_ptr(), channel.raw.as_ptr()) };
        check_cm(ret, "moving a connection to its own event channel")?;
        self.channel = Arc::clone(channel);
        Ok(())
    }

    fn route_addr(&self) -> &ffi::rdma_addr {
        // SAFETY: the id is live; `route.addr` is plain data librdmacm
        // updates only during calls on this id (resolve, accept), which the
        // transport does not make concurrently with reading it.
        unsafe { &self.raw.as_ref().route.addr }
    }

    /// The local address, once bound or resolved.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        let addr = self.route_addr();
        // SAFETY: the union's storage member covers every family; reading
        // it through the generic sockaddr is how librdmacm itself reads it.
        unsafe { socket_addr_at(ptr::addr_of!(addr.src_addr_union.src_storage).cast()) }
    }

    /// The peer's address, once resolved or connected.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        let addr = self.route_addr();
        // SAFETY: as in `local_addr`.
        unsafe { socket_addr_at(ptr::addr_of!(addr.dst_addr_union.dst_storage).cast()) }
    }

    fn context(&self) -> Option<NonNull<ffi::ibv_context>> {
        // SAFETY: the id is live; `verbs` is NULL until the address is
        // resolved (or the request arrived), then the device's context,
        // which librdmacm keeps open while this id exists.
        NonNull::new(unsafe { self.raw.as_ref().verbs })
    }

    fn require_context(&self, context: &'static str) -> Result<NonNull<ffi::ibv_context>, Error> {
        self.context().ok_or_else(|| {
            rdma_error(
                context,
                io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the rdma_cm id has no device yet",
                ),
            )
        })
    }

    /// The RDMA device rdma_cm picked for this id, once resolved.
    pub fn device_name(&self) -> Option<String> {
        let context = self.context()?;
        // SAFETY: a live context's `device` points at its device, whose name
        // is a NUL-terminated string it owns; copied out at once.
        let name = unsafe { CStr::from_ptr(ffi::ibv_get_device_name(context.as_ref().device)) };
        Some(name.to_string_lossy().into_owned())
    }

    /// The device port the id is bound to.
    pub fn port_num(&self) -> u8 {
        // SAFETY: the id is live; `port_num` is a plain field.
        unsafe { self.raw.as_ref().port_num }
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        // SAFETY: every object created on this id (QP, PD, CQ) holds an
        // `Arc` of it and is gone; all its events were acked as they were
        // read; the id is not used again.
        let ret = unsafe { ffi::rdma_destroy_id(self.raw.as_ptr()) };
        if ret != 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "rdma_destroy_id failed");
        }
    }
}

// --- verbs ---------------------------------------------------------------------

/// A protection domain on an id's device.
pub struct ProtectionDomain {
    raw: NonNull<ffi::ibv_pd>,
    id: Arc<CmId>,
}

// SAFETY: a PD is only passed to verbs calls, which are thread-safe; it is
// deallocated once, by its last owner, from whatever thread that is.
unsafe impl Send for ProtectionDomain {}
// SAFETY: as for `Send`; `&ProtectionDomain` only hands the pointer to verbs.
unsafe impl Sync for ProtectionDomain {}

impl fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProtectionDomain").finish_non_exhaustive()
    }
}

impl ProtectionDomain {
    /// A PD on the device the id resolved to.
    pub fn new(id: &Arc<CmId>) -> Result<Arc<Self>, Error> {
        let context = id.require_context("allocating a protection domain")?;
        // SAFETY: `context` is the id's live device context.
        let raw = unsafe { ffi::ibv_alloc_pd(context.as_ptr()) };
        let raw = NonNull::new(raw).ok_or_else(|| last_error("allocating a protection domain"))?;
        Ok(Arc::new(Self {
            raw,
            id: Arc::clone(id),
        }))
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: every MR and QP of this PD holds an `Arc` of it and is
        // gone; the PD is not used again.
        let ret = unsafe { ffi::ibv_dealloc_pd(self.raw.as_ptr()) };
        if ret != 0 {
            tracing::warn!(error = %io::Error::from_raw_os_error(ret), "ibv_dealloc_pd failed");
        }
    }
}

/// What the device may do with a memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Source of sends and writes only (no write pin of the pages).
    LocalRead,
    /// The device writes into it locally (receive buffers).
    LocalWrite,
    /// The partner writes into it with RDMA WRITE (the mirror).
    RemoteWrite,
}

impl Access {
    fn flags(self) -> c_int {
        use ffi::ibv_access_flags as a;
        let flags = match self {
            Self::LocalRead => a(0),
            Self::LocalWrite => a::IBV_ACCESS_LOCAL_WRITE,
            Self::RemoteWrite => a::IBV_ACCESS_LOCAL_WRITE | a::IBV_ACCESS_REMOTE_WRITE,
        };
        flags.0 as c_int
    }
}

/// A registered `SharedMemory`: kept alive (and pinned) until dropped.
pub struct MemoryRegion {
    raw: NonNull<ffi::ibv_mr>,
    memory: SharedMemory,
    access: Access,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: an MR is only read (keys, address) and deregistered once by its
// last owner; verbs calls on it are thread-safe.
unsafe impl Send for MemoryRegion {}
// SAFETY: as for `Send`.
unsafe impl Sync for MemoryRegion {}

impl fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("addr", &self.memory.as_ptr())
            .field("len_bytes", &self.memory.len())
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

impl MemoryRegion {
    /// Registers all of `memory` with `pd`.
    pub fn register(
        pd: &Arc<ProtectionDomain>,
        memory: SharedMemory,
        access: Access,
    ) -> Result<Self, Error> {
        if memory.is_empty() {
            return Err(rdma_error(
                "registering memory",
                io::Error::new(io::ErrorKind::InvalidInput, "empty memory region"),
            ));
        }
        // SAFETY: the PD is live; `memory` is valid for reads and writes of
        // `len()` bytes while any clone of it lives, and this MR keeps one
        // until after `ibv_dereg_mr`. Its contract allows a device to read
        // and write the bytes concurrently with the crate's atomic copies.
        let raw = unsafe {
            ffi::ibv_reg_mr(
                pd.raw.as_ptr(),
                memory.as_ptr().cast::<c_void>(),
                memory.len(),
                access.flags(),
            )
        };
        let raw = NonNull::new(raw).ok_or_else(|| last_error("registering memory"))?;
        Ok(Self {
            raw,
            memory,
            access,
            _pd: Arc::clone(pd),
        })
    }

    fn mr(&self) -> &ffi::ibv_mr {
        // SAFETY: the MR is live until drop; its fields are not changed
        // after registration.
        unsafe { self.raw.as_ref() }
    }

    /// The key for local work requests.
    pub fn lkey(&self) -> u32 {
        self.mr().lkey
    }

    /// The key the partner uses for RDMA on this region.
    pub fn rkey(&self) -> u32 {
        self.mr().rkey
    }

    /// The address the region is registered at (what the partner targets).
    pub fn addr(&self) -> u64 {
        self.memory.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.memory.len()
    }

    /// Always false: empty registrations are refused.
    pub fn is_empty(&self) -> bool {
        self.memory.is_empty()
    }

    /// The registered memory.
    pub fn memory(&self) -> &SharedMemory {
        &self.memory
    }

    fn check(&self, offset: u64, len_bytes: u32) -> Result<u64, Error> {
        let start = self.memory.check_range(offset, len_bytes as usize)?;
        Ok(self.addr() + start as u64)
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: the MR came from ibv_reg_mr and is deregistered once; once
        // this returns the device no longer accesses the memory, which
        // `self.memory` keeps alive until after this call.
        let ret = unsafe { ffi::ibv_dereg_mr(self.raw.as_ptr()) };
        if ret != 0 {
            tracing::warn!(error = %io::Error::from_raw_os_error(ret), "ibv_dereg_mr failed");
        }
    }
}

/// One work completion, copied out of the CQ.
#[derive(Debug, Clone, Copy)]
pub struct WorkCompletion {
    /// The work request's id.
    pub wr_id: u64,
    /// `ibv_wc_status`; 0 is success.
    pub status: u32,
    /// `ibv_wc_opcode` (valid only on success).
    pub opcode: u32,
    /// Bytes received (receives only).
    pub byte_len: u32,
    /// The device's own error code.
    pub vendor_err: u32,
}

impl WorkCompletion {
    /// Whether the request succeeded.
    pub fn is_ok(&self) -> bool {
        self.status == ffi::ibv_wc_status::IBV_WC_SUCCESS
    }

    /// Whether the request was flushed because the QP was already in error.
    pub fn is_flush(&self) -> bool {
        self.status == ffi::ibv_wc_status::IBV_WC_WR_FLUSH_ERR
    }

    /// libibverbs' name of the status.
    pub fn status_name(&self) -> String {
        // SAFETY: ibv_wc_status_str returns a static NUL-terminated string
        // for every value.
        unsafe { CStr::from_ptr(ffi::ibv_wc_status_str(self.status)) }
            .to_string_lossy()
            .into_owned()
    }
}

/// A completion queue with its own completion channel, so that every event
/// on the channel is this CQ's and is acknowledged as it is read.
pub struct CompletionQueue {
    cq: NonNull<ffi::ibv_cq>,
    channel: NonNull<ffi::ibv_comp_channel>,
    capacity: usize,
    _id: Arc<CmId>,
}

// SAFETY: polling, arming and reading events are thread-safe verbs calls
// (providers lock the CQ); the transport polls one CQ from one thread.
unsafe impl Send for CompletionQueue {}
// SAFETY: as for `Send`.
unsafe impl Sync for CompletionQueue {}

impl fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionQueue")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// Completions taken from the CQ per `ibv_poll_cq` call.
const POLL_BATCH: usize = 32;

impl CompletionQueue {
    /// A CQ of at least `capacity` entries on the id's device, armed.
    pub fn new(id: &Arc<CmId>, capacity: usize) -> Result<Arc<Self>, Error> {
        let context = id.require_context("creating a completion queue")?;
        // SAFETY: `context` is the id's live device context.
        let channel = unsafe { ffi::ibv_create_comp_channel(context.as_ptr()) };
        let channel =
            NonNull::new(channel).ok_or_else(|| last_error("creating a completion channel"))?;
        let cqe = c_int::try_from(capacity).expect("CQ capacity fits a c_int");
        // SAFETY: the context and channel are live; no CQ context pointer.
        let cq = unsafe {
            ffi::ibv_create_cq(context.as_ptr(), cqe, ptr::null_mut(), channel.as_ptr(), 0)
        };
        let Some(cq) = NonNull::new(cq) else {
            let error = last_error("creating a completion queue");
            // SAFETY: the channel has no CQ yet and is not used again.
            unsafe { ffi::ibv_destroy_comp_channel(channel.as_ptr()) };
            return Err(error);
        };
        let queue = Arc::new(Self {
            cq,
            channel,
            capacity,
            _id: Arc::clone(id),
        });
        set_nonblocking(queue.fd(), "making the completion channel non-blocking")?;
        queue.arm()?;
        Ok(queue)
    }

    /// Entries the CQ holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The completion channel's descriptor, readable after `arm` when a
    /// completion arrives.
    pub fn fd(&self) -> RawFd {
        // SAFETY: the channel is live until drop; `fd` is a plain field.
        unsafe { self.channel.as_ref().fd }
    }

    /// Asks for one event on the next completion.
    pub fn arm(&self) -> Result<(), Error> {
        // SAFETY: the CQ is live.
        let ret = unsafe { ffi::ibv_req_notify_cq(self.cq.as_ptr(), 0) };
        check_verbs(ret, "arming the completion queue")
    }

    /// Reads and acknowledges the events waiting on the channel; never
    /// blocks. Returns how many there were.
    pub fn consume_events(&self) -> Result<usize, Error> {
        let mut consumed = 0;
        while self.consume_event()? {
            consumed += 1;
        }
        Ok(consumed)
    }

    /// Reads and acknowledges one event, if one is waiting; never blocks.
    pub fn consume_event(&self) -> Result<bool, Error> {
        let mut cq: *mut ffi::ibv_cq = ptr::null_mut();
        let mut context: *mut c_void = ptr::null_mut();
        // SAFETY: the channel is live and non-blocking; the out-pointers
        // are valid.
        let ret = unsafe { ffi::ibv_get_cq_event(self.channel.as_ptr(), &mut cq, &mut context) };
        if ret != 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::WouldBlock {
                return Ok(false);
            }
            return Err(rdma_error("reading a completion event", error));
        }
        assert_eq!(
            cq,
            self.cq.as_ptr(),
            "an event for a CQ not on this channel"
        );
        // SAFETY: the event is for this live CQ and is acked once, so
        // ibv_destroy_cq will not wait for it.
        unsafe { ffi::ibv_ack_cq_events(self.cq.as_ptr(), 1) };
        Ok(true)
    }

    /// Moves up to `POLL_BATCH` completions into `out`; returns how many.
    pub fn poll(&self, out: &mut Vec<WorkCompletion>) -> Result<usize, Error> {
        let mut wcs = [const { MaybeUninit::<ffi::ibv_wc>::uninit() }; POLL_BATCH];
        // SAFETY: the CQ is live; `wcs` has room for POLL_BATCH entries,
        // and ibv_poll_cq initializes the first `n` it returns.
        let n = unsafe {
            ffi::ibv_poll_cq(
                self.cq.as_ptr(),
                POLL_BATCH as c_int,
                wcs.as_mut_ptr().cast::<ffi::ibv_wc>(),
            )
        };
        if n < 0 {
            return Err(rdma_error(
                "polling the completion queue",
                io::Error::from_raw_os_error(-n),
            ));
        }
        let n = n as usize;
        for wc in &wcs[..n] {
            // SAFETY: the first `n` entries were written by ibv_poll_cq.
            let wc = unsafe { wc.assume_init_ref() };
            out.push(WorkCompletion {
                wr_id: wc.wr_id,
                status: wc.status,
                opcode: wc.opcode,
                byte_len: wc.byte_len,
                vendor_err: wc.vendor_err,
            });
        }
        Ok(n)
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: the QP using this CQ holds an `Arc` of it and is gone;
        // every event was acked as it was read; neither is used again. The
        // CQ goes before its channel, as libibverbs requires.
        unsafe {
            let ret = ffi::ibv_destroy_cq(self.cq.as_ptr());
            if ret != 0 {
                tracing::warn!(error = %io::Error::from_raw_os_error(ret), "ibv_destroy_cq failed");
            }
            let ret = ffi::ibv_destroy_comp_channel(self.channel.as_ptr());
            if ret != 0 {
                tracing::warn!(error = %io::Error::from_raw_os_error(ret), "ibv_destroy_comp_channel failed");
            }
        }
    }
}

/// The partner's registered region, as it told us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRegion {
    /// Its registered address.
    pub addr: u64,
    /// Its rkey.
    pub rkey: u32,
    /// Its length.
    pub len_bytes: u64,
}

/// Sizes asked of a queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCaps {
    /// Send queue entries.
    pub max_send_wr: u32,
    /// Receive queue entries.
    pub max_recv_wr: u32,
    /// Bytes a send may carry inline.
    pub max_inline_data: u32,
}

/// One RDMA WRITE: `len_bytes` at `local_offset` of the local region to
/// `remote_offset` of the remote one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteRequest {
    /// Returned in its completion.
    pub wr_id: u64,
    /// Offset in the local MR.
    pub local_offset: u64,
    /// Offset in the remote region.
    pub remote_offset: u64,
    /// Bytes.
    pub len_bytes: u32,
    /// Whether it generates a completion (an unsignaled one is covered by
    /// the next signaled completion: RC completes in order).
    pub signaled: bool,
}

/// A reliable-connected queue pair created through rdma_cm on its id.
pub struct QueuePair {
    qp: NonNull<ffi::ibv_qp>,
    caps: QpCaps,
    id: Arc<CmId>,
    _cq: Arc<CompletionQueue>,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: posting to a QP is thread-safe in libibverbs (providers lock the
// queues); the QP is destroyed once, by its owner, from any thread.
unsafe impl Send for QueuePair {}
// SAFETY: as for `Send`.
unsafe impl Sync for QueuePair {}

impl fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueuePair")
            .field("qp_num", &self.qp_num())
            .field("caps", &self.caps)
            .finish_non_exhaustive()
    }
}

impl QueuePair {
    /// Creates the id's RC QP, with `cq` for both send and receive
    /// completions. All three objects must belong to `id`.
    pub fn create(
        id: &Arc<CmId>,
        pd: &Arc<ProtectionDomain>,
        cq: &Arc<CompletionQueue>,
        caps: QpCaps,
    ) -> Result<Self, Error> {
        assert!(
            Arc::ptr_eq(&pd.id, id),
            "the PD belongs to another rdma_cm id"
        );
        assert!(
            Arc::ptr_eq(&cq._id, id),
            "the CQ belongs to another rdma_cm id"
        );
        assert!(
            (caps.max_send_wr + caps.max_recv_wr) as usize <= cq.capacity(),
            "the CQ must hold a completion for every send and receive in flight"
        );
        if id.has_qp.swap(true, Ordering::AcqRel) {
            panic!("an rdma_cm id has at most one QP");
        }
        // SAFETY: ibv_qp_init_attr is plain data (pointers, integers); all
        // zeroes is valid and every field that matters is set below.
        let mut attr: ffi::ibv_qp_init_attr = unsafe { MaybeUninit::zeroed().assume_init() };
        attr.send_cq = cq.cq.as_ptr();
        attr.recv_cq = cq.cq.as_ptr();
        attr.qp_type = ffi::ibv_qp_type::IBV_QPT_RC;
        attr.sq_sig_all = 0;
        attr.cap = ffi::ibv_qp_cap {
            max_send_wr: caps.max_send_wr,
            max_recv_wr: caps.max_recv_wr,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: caps.max_inline_data,
        };
        // SAFETY: the id has a device context (the PD was made on it), the
        // PD and CQ are live and on that context, `attr` is valid; on
        // success the QP is stored in the id and destroyed in our drop.
        let ret = unsafe { ffi::rdma_create_qp(id.raw.as_ptr(), pd.raw.as_ptr(), &mut attr) };
        if ret != 0 {
            id.has_qp.store(false, Ordering::Release);
            return Err(last_error("creating the queue pair"));
        }
        // SAFETY: rdma_create_qp succeeded, so `id.qp` is the new QP.
        let qp = NonNull::new(unsafe { id.raw.as_ref().qp })
            .expect("rdma_create_qp succeeded but left no QP");
        let actual = QpCaps {
            max_send_wr: attr.cap.max_send_wr,
            max_recv_wr: attr.cap.max_recv_wr,
            max_inline_data: attr.cap.max_inline_data,
        };
        let qp = Self {
            qp,
            caps: actual,
            id: Arc::clone(id),
            _cq: Arc::clone(cq),
            _pd: Arc::clone(pd),
        };
        if actual.max_send_wr < caps.max_send_wr
            || actual.max_recv_wr < caps.max_recv_wr
            || actual.max_inline_data < caps.max_inline_data
        {
            return Err(rdma_error(
                "creating the queue pair",
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the device granted {actual:?}, less than {caps:?}"),
                ),
            ));
        }
        Ok(qp)
    }

    /// The sizes the device granted.
    pub fn caps(&self) -> QpCaps {
        self.caps
    }

    /// The QP number.
    pub fn qp_num(&self) -> u32 {
        // SAFETY: the QP is live; `qp_num` is fixed at creation.
        unsafe { self.qp.as_ref().qp_num }
    }

    /// The rdma_cm id the QP belongs to.
    pub fn id(&self) -> &Arc<CmId> {
        &self.id
    }

    /// Posts `writes` as one chain (one doorbell). An error means the QP
    /// is unusable: some of the chain may have been posted.
    pub fn post_writes(
        &self,
        local: &MemoryRegion,
        remote: &RemoteRegion,
        writes: &[WriteRequest],
    ) -> Result<(), Error> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut sges = Vec::with_capacity(writes.len());
        for write in writes {
            let addr = local.check(write.local_offset, write.len_bytes)?;
            let remote_end = write.remote_offset.checked_add(u64::from(write.len_bytes));
            if !remote_end.is_some_and(|end| end <= remote.len_bytes) {
                return Err(Error::OutOfBounds {
                    offset: write.remote_offset,
                    len_bytes: u64::from(write.len_bytes),
                    region_len_bytes: remote.len_bytes,
                });
            }
            sges.push(ffi::ibv_sge {
                addr,
                length: write.len_bytes,
                lkey: local.lkey(),
            });
        }
        let mut wrs: Vec<ffi::ibv_send_wr> = writes
            .iter()
            .zip(sges.iter_mut())
            .map(|(write, sge)| {
                let flags = if write.signaled {
                    ffi::ibv_send_flags::IBV_SEND_SIGNALED.0
                } else {
                    0
                };
                send_wr(
                    write.wr_id,
                    ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
                    if write.len_bytes == 0 {
                        ptr::null_mut()
                    } else {
                        sge
                    },
                    flags,
                    ffi::rdma_t {
                        remote_addr: remote.addr + write.remote_offset,
                        rkey: remote.rkey,
                    },
                )
            })
            .collect();
        link_chain(&mut wrs);
        self.post_send_chain(&mut wrs, "posting RDMA writes")
    }

    /// Sends `data` as one signaled SEND, inline: the bytes are copied
    /// during the call.
    pub fn post_send_inline(&self, wr_id: u64, data: &[u8]) -> Result<(), Error> {
        let len_bytes = u32::try_from(data.len()).unwrap_or(u32::MAX);
        assert!(
            len_bytes <= self.caps.max_inline_data,
            "a {len_bytes}-byte inline send exceeds the QP's {} bytes",
            self.caps.max_inline_data
        );
        let mut sge = ffi::ibv_sge {
            addr: data.as_ptr() as u64,
            length: len_bytes,
            // Inline data needs no key: the CPU copies it.
            lkey: 0,
        };
        let mut wrs = [send_wr(
            wr_id,
            ffi::ibv_wr_opcode::IBV_WR_SEND,
            &mut sge,
            (ffi::ibv_send_flags::IBV_SEND_SIGNALED | ffi::ibv_send_flags::IBV_SEND_INLINE).0,
            ffi::rdma_t {
                remote_addr: 0,
                rkey: 0,
            },
        )];
        self.post_send_chain(&mut wrs, "posting a control send")
    }

    fn post_send_chain(
        &self,
        wrs: &mut [ffi::ibv_send_wr],
        context: &'static str,
    ) -> Result<(), Error> {
        let mut bad: *mut ffi::ibv_send_wr = ptr::null_mut();
        // SAFETY: the QP is live; `wrs` is a NULL-terminated chain whose
        // scatter entries name registered local memory checked against its
        // MR (or inline bytes read during the call); the chain and its SGEs
        // outlive the call, which copies them into the send queue.
        let ret = unsafe { ffi::ibv_post_send(self.qp.as_ptr(), wrs.as_mut_ptr(), &mut bad) };
        check_verbs(ret, context)
    }

    /// Posts receive buffers: each `(wr_id, offset, len)` of `mr`.
    pub fn post_recvs(&self, mr: &MemoryRegion, recvs: &[(u64, u64, u32)]) -> Result<(), Error> {
        if recvs.is_empty() {
            return Ok(());
        }
        assert_eq!(
            mr.access,
            Access::LocalWrite,
            "receive buffers must be locally writable"
        );
        let mut sges = Vec::with_capacity(recvs.len());
        for &(_, offset, len) in recvs {
            sges.push(ffi::ibv_sge {
                addr: mr.check(offset, len)?,
                length: len,
                lkey: mr.lkey(),
            });
        }
        let mut wrs: Vec<ffi::ibv_recv_wr> = recvs
            .iter()
            .zip(sges.iter_mut())
            .map(|(&(wr_id, _, _), sge)| ffi::ibv_recv_wr {
                wr_id,
                next: ptr::null_mut(),
                sg_list: sge,
                num_sge: 1,
            })
            .collect();
        for i in 1..wrs.len() {
            let next: *mut ffi::ibv_recv_wr = &mut wrs[i];
            wrs[i - 1].next = next;
        }
        let mut bad: *mut ffi::ibv_recv_wr = ptr::null_mut();
        // SAFETY: the QP is live; the chain is NULL-terminated and each SGE
        // names a bounds-checked range of a live, locally writable MR (the
        // device writes only there, and the MR keeps the memory alive);
        // the chain outlives the call, which copies it.
        let ret = unsafe { ffi::ibv_post_recv(self.qp.as_ptr(), wrs.as_mut_ptr(), &mut bad) };
        check_verbs(ret, "posting receive buffers")
    }

    /// The source GID index rdma_cm chose for the connection.
    pub fn sgid_index(&self) -> Result<u8, Error> {
        // SAFETY: both are plain data; all zeroes is valid, and
        // ibv_query_qp fills them.
        let (mut attr, mut init): (ffi::ibv_qp_attr, ffi::ibv_qp_init_attr) = unsafe {
            (
                MaybeUninit::zeroed().assume_init(),
                MaybeUninit::zeroed().assume_init(),
            )
        };
        // SAFETY: the QP is live; both out-structs are valid for writes.
        let ret = unsafe {
            ffi::ibv_query_qp(
                self.qp.as_ptr(),
                &mut attr,
                ffi::ibv_qp_attr_mask::IBV_QP_AV.0 as c_int,
                &mut init,
            )
        };
        check_verbs(ret, "querying the queue pair")?;
        Ok(attr.ah_attr.grh.sgid_index)
    }
}

fn send_wr(
    wr_id: u64,
    opcode: u32,
    sge: *mut ffi::ibv_sge,
    send_flags: u32,
    rdma: ffi::rdma_t,
) -> ffi::ibv_send_wr {
    ffi::ibv_send_wr {
        wr_id,
        next: ptr::null_mut(),
        sg_list: sge,
        num_sge: c_int::from(!sge.is_null()),
        opcode,
        send_flags,
        imm_data_invalidated_rkey_union: ffi::imm_data_invalidated_rkey_union_t { imm_data: 0 },
        wr: ffi::wr_t { rdma },
        qp_type: ffi::qp_type_t {
            xrc: ffi::xrc_t { remote_srqn: 0 },
        },
        bind_mw_tso_union: ffi::bind_mw_tso_union_t {
            tso: ffi::tso_t {
                hdr: ptr::null_mut(),
                hdr_sz: 0,
                mss: 0,
            },
        },
    }
}

fn link_chain(wrs: &mut [ffi::ibv_send_wr]) {
    for i in 1..wrs.len() {
        let next: *mut ffi::ibv_send_wr = &mut wrs[i];
        wrs[i - 1].next = next;
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: the QP was created on this id by rdma_create_qp and is
        // destroyed once; its CQ and PD are still alive (we hold them).
        unsafe { ffi::rdma_destroy_qp(self.id.raw.as_ptr()) };
        self.id.has_qp.store(false, Ordering::Release);
    }
}
