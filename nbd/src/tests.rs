//! Protocol tests: a raw TCP client written here, byte by byte from the
//! spec (it does not use the server's encoders), against an [`NbdServer`]
//! serving in-memory exports.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::proto::*;
use crate::testing::{ExportList, MemExport};
use crate::{Errno, Export, ExportError, NbdServer, ServerConfig};

/// No test waits longer than this for the server.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
const EXPORT_BYTES: usize = 1 << 20;

// ---------------------------------------------------------------------------
// A raw client
// ---------------------------------------------------------------------------

struct Client {
    stream: TcpStream,
}

struct Reply {
    error: u32,
    cookie: u64,
}

struct OptionReply {
    option: u32,
    reply_type: u32,
    data: Vec<u8>,
}

impl Client {
    /// Connects and reads the greeting; returns the handshake flags too.
    fn connect(addr: SocketAddr) -> (Client, u16) {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(CLIENT_TIMEOUT))
            .expect("timeout");
        let mut client = Client { stream };
        let greeting = client.read_n(18);
        assert_eq!(&greeting[0..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        (client, flags)
    }

    /// Connects, reads the greeting, sends the client flags.
    fn handshake(addr: SocketAddr, client_flags: u32) -> Client {
        let (mut client, _) = Client::connect(addr);
        client.write(&client_flags.to_be_bytes());
        client
    }

    /// A client in transmission on export `name` (by NBD_OPT_GO).
    fn open(addr: SocketAddr, name: &str) -> Client {
        let mut client = Client::handshake(addr, 3);
        client.send_option(NBD_OPT_GO, &info_data(name, &[]));
        let replies = client.read_option_replies();
        assert_eq!(replies.last().map(|r| r.reply_type), Some(NBD_REP_ACK));
        client
    }

    fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to server");
    }

    fn read_n(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.stream.read_exact(&mut buf).expect("read from server");
        buf
    }

    fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut bytes = b"IHAVEOPT".to_vec();
        bytes.extend_from_slice(&option.to_be_bytes());
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(data);
        self.write(&bytes);
    }

    fn read_option_reply(&mut self) -> OptionReply {
        let header = self.read_n(20);
        assert_eq!(
            &header[0..8],
            &[0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9],
            "option reply magic"
        );
        let option = u32::from_be_bytes(header[8..12].try_into().unwrap());
        let reply_type = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let length = u32::from_be_bytes(header[16..20].try_into().unwrap());
        let data = self.read_n(length as usize);
        OptionReply {
            option,
            reply_type,
            data,
        }
    }

    /// Replies up to and including the final one (ACK or an error).
    fn read_option_replies(&mut self) -> Vec<OptionReply> {
        let mut replies = Vec::new();
        loop {
            let reply = self.read_option_reply();
            let last = reply.reply_type == NBD_REP_ACK || reply.reply_type & (1 << 31) != 0;
            replies.push(reply);
            if last {
                return replies;
            }
        }
    }

    fn send_request(
        &mut self,
        flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut bytes = Vec::with_capacity(28 + payload.len());
        bytes.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        bytes.extend_from_slice(&flags.to_be_bytes());
        bytes.extend_from_slice(&command.to_be_bytes());
        bytes.extend_from_slice(&cookie.to_be_bytes());
        bytes.extend_from_slice(&offset.to_be_bytes());
        bytes.extend_from_slice(&length.to_be_bytes());
        bytes.extend_from_slice(payload);
        self.write(&bytes);
    }

    fn read_reply(&mut self) -> Reply {
        let header = self.read_n(16);
        assert_eq!(
            &header[0..4],
            &[0x67, 0x44, 0x66, 0x98],
            "simple reply magic"
        );
        Reply {
            error: u32::from_be_bytes(header[4..8].try_into().unwrap()),
            cookie: u64::from_be_bytes(header[8..16].try_into().unwrap()),
        }
    }

    fn write_at(&mut self, cookie: u64, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.send_request(
            flags,
            NBD_CMD_WRITE,
            cookie,
            offset,
            data.len() as u32,
            data,
        );
        let reply = self.read_reply();
        assert_eq!(reply.cookie, cookie);
        reply.error
    }

    fn read_at(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send_request(0, NBD_CMD_READ, cookie, offset, len, &[]);
        let reply = self.read_reply();
        assert_eq!(reply.cookie, cookie);
        if reply.error != 0 {
            return Err(reply.error);
        }
        Ok(self.read_n(len as usize))
    }

    /// A request without payload and without reply data; its error.
    fn command(&mut self, flags: u16, command: u16, cookie: u64, offset: u64, len: u32) -> u32 {
        self.send_request(flags, command, cookie, offset, len, &[]);
        let reply = self.read_reply();
        assert_eq!(reply.cookie, cookie);
        reply.error
    }

    /// The server closed the connection: end of file (or a reset) within the
    /// timeout, with nothing else before it.
    fn expect_closed(&mut self) {
        let mut byte = [0; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => {}
            Ok(_) => panic!("server sent data, expected the connection closed"),
            Err(err) => assert!(
                matches!(
                    err.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ),
                "expected the connection closed, got {err}"
            ),
        }
    }
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` data.
fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for info in infos {
        data.extend_from_slice(&info.to_be_bytes());
    }
    data
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

// ---------------------------------------------------------------------------
// Exports for the tests
// ---------------------------------------------------------------------------

/// Wraps a [`MemExport`]: reads at or past `gate_offset` wait until the test
/// opens the gate, and the number of operations running at once is kept.
#[derive(Debug)]
struct GatedExport {
    inner: MemExport,
    gate_offset: u64,
    open: Mutex<bool>,
    opened: Condvar,
    running: AtomicUsize,
    running_max: AtomicUsize,
}

impl GatedExport {
    fn new(size_bytes: usize, gate_offset: u64) -> GatedExport {
        GatedExport {
            inner: MemExport::new(size_bytes),
            gate_offset,
            open: Mutex::new(false),
            opened: Condvar::new(),
            running: AtomicUsize::new(0),
            running_max: AtomicUsize::new(0),
        }
    }

    fn open_gate(&self) {
        *self.open.lock() = true;
        self.opened.notify_all();
    }

    /// Waits (bounded) until `count` operations are running.
    fn wait_running(&self, count: usize) {
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        while self.running.load(Ordering::SeqCst) < count {
            assert!(Instant::now() < deadline, "{count} operations never ran");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Export for GatedExport {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        let running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.running_max.fetch_max(running, Ordering::SeqCst);
        if offset >= self.gate_offset {
            let mut open = self.open.lock();
            let deadline = Instant::now() + CLIENT_TIMEOUT;
            while !*open {
                if self.opened.wait_until(&mut open, deadline).timed_out() {
                    self.running.fetch_sub(1, Ordering::SeqCst);
                    return Err(ExportError::new(Errno::Io, "gate never opened"));
                }
            }
        }
        let result = self.inner.read(offset, buf);
        self.running.fetch_sub(1, Ordering::SeqCst);
        result
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        self.inner.write(offset, data, fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.inner.write_zeroes(offset, len, fua)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.inner.trim(offset, len, fua)
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.inner.flush()
    }
}

/// An export whose every operation fails with one errno.
#[derive(Debug)]
struct FailingExport(Errno);

impl FailingExport {
    fn fail(&self) -> Result<(), ExportError> {
        Err(ExportError::new(self.0, "injected failure"))
    }
}

impl Export for FailingExport {
    fn size_bytes(&self) -> u64 {
        EXPORT_BYTES as u64
    }
    fn read(&self, _: u64, _: &mut [u8]) -> Result<(), ExportError> {
        self.fail()
    }
    fn write(&self, _: u64, _: &[u8], _: bool) -> Result<(), ExportError> {
        self.fail()
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), ExportError> {
        self.fail()
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), ExportError> {
        self.fail()
    }
    fn flush(&self) -> Result<(), ExportError> {
        self.fail()
    }
}

fn serve(exports: ExportList, config: ServerConfig) -> NbdServer {
    let addr = "127.0.0.1:0".parse().expect("address");
    NbdServer::bind(addr, Arc::new(exports), config).expect("bind")
}

/// A server with "vol0" and "vol1" (MemExports of 1 MiB), default config.
fn serve_mem() -> (NbdServer, Arc<MemExport>) {
    let vol0 = Arc::new(MemExport::new(EXPORT_BYTES));
    let exports = ExportList::new()
        .with("vol0", vol0.clone())
        .with("vol1", Arc::new(MemExport::new(EXPORT_BYTES / 2)));
    (serve(exports, ServerConfig::default()), vol0)
}

/// Waits (bounded) until the server counts `count` connections.
fn wait_connections(server: &NbdServer, count: usize) {
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    while server.connections() != count {
        assert!(
            Instant::now() < deadline,
            "server has {} connections, expected {count}",
            server.connections()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

#[test]
fn greeting_offers_fixed_newstyle_and_no_zeroes() {
    let (server, _) = serve_mem();
    let (_client, flags) = Client::connect(server.local_addr());
    assert_eq!(flags, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let (server, _) = serve_mem();
    let mut client = Client::handshake(server.local_addr(), 1 | (1 << 5));
    client.expect_closed();
}

#[test]
fn list_names_every_export() {
    let (server, _) = serve_mem();
    let mut client = Client::handshake(server.local_addr(), 3);
    client.send_option(NBD_OPT_LIST, &[]);
    let replies = client.read_option_replies();
    let names: Vec<String> = replies
        .iter()
        .filter(|r| r.reply_type == NBD_REP_SERVER)
        .map(|r| {
            let len = u32::from_be_bytes(r.data[0..4].try_into().unwrap()) as usize;
            assert_eq!(len, r.data.len() - 4);
            String::from_utf8(r.data[4..].to_vec()).unwrap()
        })
        .collect();
    assert_eq!(names, ["vol0", "vol1"]);
    assert!(replies.iter().all(|r| r.option == NBD_OPT_LIST));
    assert_eq!(replies.last().unwrap().reply_type, NBD_REP_ACK);

    // LIST with data is invalid, and the handshake goes on.
    client.send_option(NBD_OPT_LIST, b"x");
    assert_eq!(client.read_option_reply().reply_type, NBD_REP_ERR_INVALID);
    client.send_option(NBD_OPT_LIST, &[]);
    assert_eq!(client.read_option_replies().len(), 3);
}

#[test]
fn info_describes_the_export_then_go_enters_transmission() {
    let (server, vol0) = serve_mem();
    vol0.write(0, b"hello", false).unwrap();
    let mut client = Client::handshake(server.local_addr(), 3);
    let infos = [NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME, 0x7777];
    for option in [NBD_OPT_INFO, NBD_OPT_GO] {
        client.send_option(option, &info_data("vol0", &infos));
        let replies = client.read_option_replies();
        assert!(replies.iter().all(|r| r.option == option));
        assert_eq!(replies.last().unwrap().reply_type, NBD_REP_ACK);
        let info = |kind: u16| {
            replies
                .iter()
                .find(|r| r.reply_type == NBD_REP_INFO && r.data[0..2] == kind.to_be_bytes())
                .map(|r| r.data[2..].to_vec())
        };
        let export = info(NBD_INFO_EXPORT).expect("NBD_INFO_EXPORT");
        assert_eq!(export.len(), 10);
        assert_eq!(
            u64::from_be_bytes(export[0..8].try_into().unwrap()),
            EXPORT_BYTES as u64
        );
        let flags = u16::from_be_bytes(export[8..10].try_into().unwrap());
        assert_eq!(
            flags,
            NBD_FLAG_HAS_FLAGS
                | NBD_FLAG_SEND_FLUSH
                | NBD_FLAG_SEND_FUA
                | NBD_FLAG_SEND_TRIM
                | NBD_FLAG_SEND_WRITE_ZEROES
                | NBD_FLAG_CAN_MULTI_CONN
        );
        let block_size = info(NBD_INFO_BLOCK_SIZE).expect("NBD_INFO_BLOCK_SIZE");
        let sizes: Vec<u32> = block_size
            .chunks(4)
            .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(sizes, [1, 4096, 32 << 20]);
        assert_eq!(info(NBD_INFO_NAME).expect("NBD_INFO_NAME"), b"vol0");
    }
    // In transmission now.
    assert_eq!(client.read_at(1, 0, 5).unwrap(), b"hello");
}

#[test]
fn go_without_block_size_request_sends_only_the_export_info() {
    let (server, _) = serve_mem();
    let mut client = Client::handshake(server.local_addr(), 3);
    client.send_option(NBD_OPT_GO, &info_data("vol1", &[]));
    let replies = client.read_option_replies();
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[0].reply_type, NBD_REP_INFO);
    assert_eq!(&replies[0].data[0..2], &NBD_INFO_EXPORT.to_be_bytes());
    assert_eq!(
        u64::from_be_bytes(replies[0].data[2..10].try_into().unwrap()),
        EXPORT_BYTES as u64 / 2
    );
    // No zero padding after the ACK: the next bytes are a reply.
    assert_eq!(client.command(0, NBD_CMD_FLUSH, 9, 0, 0), 0);
}

#[test]
fn unknown_export_and_bad_info_data_are_errors_not_disconnects() {
    let (server, _) = serve_mem();
    let mut client = Client::handshake(server.local_addr(), 3);
    for option in [NBD_OPT_INFO, NBD_OPT_GO] {
        client.send_option(option, &info_data("nope", &[]));
        let replies = client.read_option_replies();
        assert_eq!(replies.len(), 1, "no NBD_REP_INFO before the error");
        assert_eq!(replies[0].reply_type, NBD_REP_ERR_UNKNOWN);
        assert!(!replies[0].data.is_empty(), "error carries a message");
    }
    // No default export unless the Exports offers the empty name.
    client.send_option(NBD_OPT_GO, &info_data("", &[]));
    assert_eq!(client.read_option_reply().reply_type, NBD_REP_ERR_UNKNOWN);
    // Name length beyond the data; trailing bytes; duplicate request.
    client.send_option(NBD_OPT_GO, &[0, 0, 0, 9, b'v']);
    assert_eq!(client.read_option_reply().reply_type, NBD_REP_ERR_INVALID);
    let mut trailing = info_data("vol0", &[]);
    trailing.push(0);
    client.send_option(NBD_OPT_GO, &trailing);
    assert_eq!(client.read_option_reply().reply_type, NBD_REP_ERR_INVALID);
    client.send_option(
        NBD_OPT_GO,
        &info_data("vol0", &[NBD_INFO_NAME, NBD_INFO_NAME]),
    );
    assert_eq!(client.read_option_reply().reply_type, NBD_REP_ERR_INVALID);
    // Still negotiating.
    client.send_option(NBD_OPT_GO, &info_data("vol0", &[]));
    assert_eq!(
        client.read_option_replies().last().unwrap().reply_type,
        NBD_REP_ACK
    );
}

#[test]
fn the_default_export_is_the_one_named_empty() {
    let default = Arc::new(MemExport::new(4096));
    default.write(0, b"default", false).unwrap();
    let server = serve(
        ExportList::new()
            .with("", default)
            .with("vol0", Arc::new(MemExport::new(4096))),
        ServerConfig::default(),
    );
    let mut client = Client::open(server.local_addr(), "");
    assert_eq!(client.read_at(1, 0, 7).unwrap(), b"default");
}

#[test]
fn a_stalled_handshake_is_closed_at_the_deadline() {
    let exports = ExportList::new().with("vol0", Arc::new(MemExport::new(4096)));
    let server = NbdServer::bind_with_handshake_deadline(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(exports),
        ServerConfig::default(),
        Duration::from_millis(200),
    )
    .expect("bind");
    let started = Instant::now();
    let mut silent = Client::handshake(server.local_addr(), 3);
    silent.expect_closed();
    assert!(started.elapsed() >= Duration::from_millis(200));
    // Half an option is no better than none.
    let mut slow = Client::handshake(server.local_addr(), 3);
    slow.write(b"IHAVEOPT\0\0\0\x07\0\0\0\x10vol");
    slow.expect_closed();
    wait_connections(&server, 0);
    // A prompt client is unaffected, and the deadline ends with the
    // handshake: an idle client in transmission stays connected.
    let mut prompt = Client::open(server.local_addr(), "vol0");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(prompt.read_at(1, 0, 1).unwrap(), [0]);
}

#[test]
fn unsupported_options_get_err_unsup() {
    let (server, _) = serve_mem();
    let mut client = Client::handshake(server.local_addr(), 3);
    for option in [
        NBD_OPT_STARTTLS,
        NBD_OPT_STRUCTURED_REPLY,
        NBD_OPT_LIST_META_CONTEXT,
        NBD_OPT_SET_META_CONTEXT,
        NBD_OPT_EXTENDED_HEADERS,
        NBD_OPT_PEEK_EXPORT,
        0xdead,
    ] {
        client.send_option(option, &[1, 2, 3]);
        let reply = client.read_option_reply();
        assert_eq!(reply.option, option);
        assert_eq!(reply.reply_type, NBD_REP_ERR_UNSUP, "option {option}");
    }
    client.send_option(NBD_OPT_GO, &info_data("vol0", &[]));
    assert_eq!(
        client.read_option_replies().last().unwrap().reply_type,
        NBD_REP_ACK
    );
}

#[test]
fn oversized_option_is_skipped_with_too_big_and_a_huge_one_closes() {
    let (server, _) = serve_mem();
    let mut client = Client::handshake(server.local_addr(), 3);
    client.send_option(NBD_OPT_INFO, &vec![0; (64 << 10) + 1]);
    let reply = client.read_option_reply();
    assert_eq!(reply.reply_type, NBD_REP_ERR_TOO_BIG);
    client.send_option(NBD_OPT_LIST, &[]);
    assert_eq!(
        client.read_option_replies().last().unwrap().reply_type,
        NBD_REP_ACK
    );

    // A declared length beyond what the server will skip: closed at once,
    // without reading the data.
    let mut bytes = b"IHAVEOPT".to_vec();
    bytes.extend_from_slice(&NBD_OPT_INFO.to_be_bytes());
    bytes.extend_from_slice(&u32::MAX.to_be_bytes());
    client.write(&bytes);
    client.expect_closed();
}

#[test]
fn bad_option_magic_closes() {
    let (server, _) = serve_mem();
    let mut client = Client::handshake(server.local_addr(), 3);
    client.write(b"IHAVEOPX\0\0\0\x03\0\0\0\0");
    client.expect_closed();
}

#[test]
fn export_name_enters_transmission_with_or_without_zeroes() {
    let (server, vol0) = serve_mem();
    vol0.write(100, b"legacy", false).unwrap();
    for (client_flags, reply_bytes) in [(3u32, 10usize), (1, 134), (0, 134)] {
        let mut client = Client::handshake(server.local_addr(), client_flags);
        client.send_option(NBD_OPT_EXPORT_NAME, b"vol0");
        let reply = client.read_n(reply_bytes);
        assert_eq!(
            u64::from_be_bytes(reply[0..8].try_into().unwrap()),
            EXPORT_BYTES as u64
        );
        assert_eq!(
            u16::from_be_bytes([reply[8], reply[9]]) & NBD_FLAG_HAS_FLAGS,
            1
        );
        assert!(reply[10..].iter().all(|&b| b == 0));
        assert_eq!(client.read_at(1, 100, 6).unwrap(), b"legacy");
    }
}

#[test]
fn export_name_for_an_unknown_export_closes() {
    let (server, _) = serve_mem();
    let mut client = Client::handshake(server.local_addr(), 3);
    client.send_option(NBD_OPT_EXPORT_NAME, b"nope");
    client.expect_closed();
}

#[test]
fn abort_is_acknowledged_then_closed() {
    let (server, _) = serve_mem();
    let mut client = Client::handshake(server.local_addr(), 3);
    client.send_option(NBD_OPT_ABORT, &[]);
    let reply = client.read_option_reply();
    assert_eq!(
        (reply.option, reply.reply_type),
        (NBD_OPT_ABORT, NBD_REP_ACK)
    );
    client.expect_closed();
    wait_connections(&server, 0);
}

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

#[test]
fn every_command_does_what_it_says() {
    let (server, vol0) = serve_mem();
    let mut client = Client::open(server.local_addr(), "vol0");
    let data = pattern(64 << 10, 0x5a);

    assert_eq!(client.write_at(1, 4096, &data, 0), 0);
    assert_eq!(client.read_at(2, 4096, data.len() as u32).unwrap(), data);
    assert_eq!(&vol0.contents()[4096..4096 + data.len()], &data[..]);

    // FUA reaches the export.
    assert_eq!(client.write_at(3, 0, b"fua", NBD_CMD_FLAG_FUA), 0);
    assert_eq!(vol0.stats().fua_operations, 1);

    // Unaligned I/O is fine (minimum block size 1).
    assert_eq!(client.write_at(4, 7, b"odd", 0), 0);
    assert_eq!(client.read_at(5, 6, 5).unwrap(), b"\0odd\0");

    // WRITE_ZEROES (with NO_HOLE and FUA), TRIM, FLUSH.
    assert_eq!(
        client.command(
            NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA,
            NBD_CMD_WRITE_ZEROES,
            6,
            4096,
            8192
        ),
        0
    );
    assert_eq!(client.read_at(7, 4096, 8192).unwrap(), vec![0; 8192]);
    assert_eq!(
        client.read_at(8, 4096 + 8192, 16).unwrap(),
        data[8192..8192 + 16]
    );
    assert_eq!(client.command(0, NBD_CMD_TRIM, 9, 4096 + 8192, 4096), 0);
    assert_eq!(client.command(0, NBD_CMD_FLUSH, 10, 0, 0), 0);
    // FUA on a flush or a read is accepted (the spec: MUST accept).
    assert_eq!(client.command(NBD_CMD_FLAG_FUA, NBD_CMD_FLUSH, 11, 0, 0), 0);
    client.send_request(NBD_CMD_FLAG_FUA, NBD_CMD_READ, 12, 0, 3, &[]);
    assert_eq!(client.read_reply().error, 0);
    assert_eq!(client.read_n(3), b"fua");

    let stats = vol0.stats();
    assert_eq!((stats.write_zeroes, stats.trims, stats.flushes), (1, 1, 2));
    assert_eq!(stats.fua_operations, 2);

    // Length 0: success, no data, and the export is not called.
    let before = vol0.stats();
    assert_eq!(client.read_at(13, EXPORT_BYTES as u64, 0).unwrap(), b"");
    assert_eq!(client.write_at(14, 0, &[], 0), 0);
    assert_eq!(vol0.stats(), before);

    // The last byte of the export is in range.
    assert_eq!(client.write_at(15, EXPORT_BYTES as u64 - 1, b"z", 0), 0);
    assert_eq!(
        client.read_at(16, EXPORT_BYTES as u64 - 1, 1).unwrap(),
        b"z"
    );

    client.send_request(0, NBD_CMD_DISC, 17, 0, 0, &[]);
    client.expect_closed();
}

#[test]
fn out_of_range_requests_get_the_spec_errors() {
    let (server, vol0) = serve_mem();
    let mut client = Client::open(server.local_addr(), "vol0");
    let end = EXPORT_BYTES as u64;
    assert_eq!(client.read_at(1, end - 1, 2), Err(NBD_EINVAL));
    assert_eq!(client.read_at(2, u64::MAX, 1), Err(NBD_EINVAL));
    assert_eq!(client.command(0, NBD_CMD_TRIM, 3, end, 1), NBD_EINVAL);
    assert_eq!(
        client.command(0, NBD_CMD_WRITE_ZEROES, 4, end - 1, 2),
        NBD_ENOSPC
    );
    // The rejected write's payload is skipped: the stream stays in step.
    assert_eq!(client.write_at(5, end - 2, b"abc", 0), NBD_ENOSPC);
    assert_eq!(client.write_at(6, 0, b"ok", 0), 0);
    assert_eq!(client.read_at(7, 0, 2).unwrap(), b"ok");
    assert!(vol0.contents()[EXPORT_BYTES - 2..].iter().all(|&b| b == 0));
}

#[test]
fn unknown_commands_and_flags_get_einval() {
    let (server, _) = serve_mem();
    let mut client = Client::open(server.local_addr(), "vol0");
    assert_eq!(client.command(0, NBD_CMD_CACHE, 1, 0, 512), NBD_EINVAL);
    assert_eq!(
        client.command(0, NBD_CMD_BLOCK_STATUS, 2, 0, 512),
        NBD_EINVAL
    );
    assert_eq!(client.command(0, 0x4242, 3, 0, 0), NBD_EINVAL);
    assert_eq!(client.read_at(4, 0, 1).map(|_| ()), Ok(()));
    client.send_request(NBD_CMD_FLAG_DF, NBD_CMD_READ, 5, 0, 512, &[]);
    assert_eq!(
        client.read_reply().error,
        NBD_EINVAL,
        "no data follows an error"
    );
    assert_eq!(
        client.write_at(6, 0, b"x", NBD_CMD_FLAG_NO_HOLE),
        NBD_EINVAL
    );
    assert_eq!(
        client.command(NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_WRITE_ZEROES, 7, 0, 512),
        NBD_EINVAL
    );
    assert_eq!(client.command(1 << 9, NBD_CMD_FLUSH, 8, 0, 0), NBD_EINVAL);
    assert_eq!(client.read_at(9, 0, 1).map(|_| ()), Ok(()));
}

#[test]
fn oversized_reads_and_writes_get_einval_and_an_unskippable_write_closes() {
    let vol0 = Arc::new(MemExport::new(EXPORT_BYTES));
    let config = ServerConfig {
        max_request_bytes: 64 << 10,
        ..ServerConfig::default()
    };
    let server = serve(ExportList::new().with("vol0", vol0.clone()), config);
    let mut client = Client::open(server.local_addr(), "vol0");
    let max = 64u32 << 10;
    assert_eq!(client.read_at(1, 0, max + 1), Err(NBD_EINVAL));
    // The maximum does not bind requests without payload; the export sees
    // them in pieces no longer than the maximum.
    assert_eq!(client.command(0, NBD_CMD_WRITE_ZEROES, 2, 0, max * 4), 0);
    assert_eq!(client.command(0, NBD_CMD_TRIM, 3, 0, max * 3 + 1), 0);
    assert_eq!((vol0.stats().write_zeroes, vol0.stats().trims), (4, 4));
    // Too long but below 32 MiB: skipped, EINVAL, nothing written.
    assert_eq!(
        client.write_at(4, 0, &vec![0xee; max as usize + 1], 0),
        NBD_EINVAL
    );
    assert_eq!(vol0.stats().writes, 0);
    assert_eq!(client.read_at(5, 0, max).unwrap(), vec![0; max as usize]);

    // Beyond 32 MiB the payload is not worth reading: closed.
    client.send_request(0, NBD_CMD_WRITE, 6, 0, (32 << 20) + 1, &[0; 4096]);
    client.expect_closed();
    assert_eq!(vol0.stats().writes, 0);
}

#[test]
fn oversized_write_with_the_default_maximum_closes() {
    let (server, vol0) = serve_mem();
    let mut client = Client::open(server.local_addr(), "vol0");
    client.send_request(0, NBD_CMD_WRITE, 1, 0, (32 << 20) + 1, &[0xab; 1024]);
    client.expect_closed();
    assert_eq!(vol0.stats().writes, 0);
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let (server, _) = serve_mem();
    let mut good = Client::open(server.local_addr(), "vol0");
    let mut bad = Client::open(server.local_addr(), "vol0");
    assert_eq!(good.write_at(1, 0, b"still here", 0), 0);
    bad.write(&[0xde; 28]);
    bad.expect_closed();
    assert_eq!(good.read_at(2, 0, 10).unwrap(), b"still here");
    wait_connections(&server, 1);
}

#[test]
fn export_errors_reach_the_client_as_their_errno() {
    let server = serve(
        ExportList::new()
            .with("eio", Arc::new(FailingExport(Errno::Io)))
            .with("eperm", Arc::new(FailingExport(Errno::Perm))),
        ServerConfig::default(),
    );
    let mut client = Client::open(server.local_addr(), "eio");
    assert_eq!(client.read_at(1, 0, 512), Err(NBD_EIO));
    assert_eq!(client.write_at(2, 0, b"x", 0), NBD_EIO);
    assert_eq!(client.command(0, NBD_CMD_FLUSH, 3, 0, 0), NBD_EIO);
    let mut client = Client::open(server.local_addr(), "eperm");
    assert_eq!(client.command(0, NBD_CMD_TRIM, 4, 0, 512), NBD_EPERM);
    assert_eq!(
        client.command(0, NBD_CMD_WRITE_ZEROES, 5, 0, 512),
        NBD_EPERM
    );
}

#[test]
fn pipelined_requests_complete_out_of_order() {
    const SLOW_OFFSET: u64 = 512 << 10;
    let export = Arc::new(GatedExport::new(EXPORT_BYTES, SLOW_OFFSET));
    export.inner.write(SLOW_OFFSET, b"slow", false).unwrap();
    export.inner.write(0, b"fast", false).unwrap();
    let server = serve(
        ExportList::new().with("vol0", export.clone()),
        ServerConfig::default(),
    );
    let mut client = Client::open(server.local_addr(), "vol0");
    // Both requests in one write: pipelined.
    client.send_request(0, NBD_CMD_READ, 1, SLOW_OFFSET, 4, &[]);
    client.send_request(0, NBD_CMD_READ, 2, 0, 4, &[]);
    let first = client.read_reply();
    assert_eq!((first.cookie, first.error), (2, 0));
    assert_eq!(client.read_n(4), b"fast");
    export.open_gate();
    let second = client.read_reply();
    assert_eq!((second.cookie, second.error), (1, 0));
    assert_eq!(client.read_n(4), b"slow");
}

#[test]
fn many_pipelined_reads_get_whole_replies() {
    let (server, vol0) = serve_mem();
    let contents = pattern(EXPORT_BYTES, 0x17);
    vol0.write(0, &contents, false).unwrap();
    let mut client = Client::open(server.local_addr(), "vol0");
    let requests: Vec<(u64, u32)> = (0..300u64)
        .map(|i| {
            (
                (i * 7919) % (EXPORT_BYTES as u64 - 70_000),
                (i as u32 * 977) % 65_536,
            )
        })
        .collect();
    let mut sender = Client {
        stream: client.stream.try_clone().unwrap(),
    };
    let send = std::thread::spawn({
        let requests = requests.clone();
        move || {
            for (cookie, (offset, len)) in requests.iter().enumerate() {
                sender.send_request(0, NBD_CMD_READ, cookie as u64, *offset, *len, &[]);
            }
        }
    });
    let mut seen = vec![false; requests.len()];
    for _ in 0..requests.len() {
        let reply = client.read_reply();
        assert_eq!(reply.error, 0);
        let cookie = reply.cookie as usize;
        assert!(!seen[cookie], "cookie {cookie} answered twice");
        seen[cookie] = true;
        let (offset, len) = requests[cookie];
        let data = client.read_n(len as usize);
        assert!(data == contents[offset as usize..offset as usize + len as usize]);
    }
    send.join().unwrap();
}

#[test]
fn in_flight_requests_are_bounded_per_connection() {
    let export = Arc::new(GatedExport::new(EXPORT_BYTES, 0));
    let config = ServerConfig {
        workers_per_connection: 8,
        max_in_flight_per_connection: 3,
        ..ServerConfig::default()
    };
    let server = serve(ExportList::new().with("vol0", export.clone()), config);
    let mut client = Client::open(server.local_addr(), "vol0");
    for cookie in 0..10 {
        client.send_request(0, NBD_CMD_READ, cookie, cookie * 512, 512, &[]);
    }
    export.wait_running(3);
    // Give the server time to (wrongly) admit more.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(export.running.load(Ordering::SeqCst), 3);
    export.open_gate();
    let mut cookies: Vec<u64> = (0..10)
        .map(|_| {
            let reply = client.read_reply();
            assert_eq!(reply.error, 0);
            client.read_n(512);
            reply.cookie
        })
        .collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (0..10).collect::<Vec<_>>());
    assert_eq!(export.running_max.load(Ordering::SeqCst), 3);
}

#[test]
fn disc_answers_in_flight_requests_then_closes() {
    const SLOW_OFFSET: u64 = 4096;
    let export = Arc::new(GatedExport::new(EXPORT_BYTES, SLOW_OFFSET));
    let server = serve(
        ExportList::new().with("vol0", export.clone()),
        ServerConfig::default(),
    );
    let mut client = Client::open(server.local_addr(), "vol0");
    client.send_request(0, NBD_CMD_READ, 1, SLOW_OFFSET, 512, &[]);
    client.send_request(0, NBD_CMD_WRITE, 2, 0, 3, b"abc");
    client.send_request(0, NBD_CMD_DISC, 3, 0, 0, &[]);
    export.wait_running(1);
    // The write is answered while the read is still running.
    let reply = client.read_reply();
    assert_eq!((reply.cookie, reply.error), (2, 0));
    export.open_gate();
    let reply = client.read_reply();
    assert_eq!((reply.cookie, reply.error), (1, 0));
    assert_eq!(client.read_n(512), vec![0; 512]);
    client.expect_closed();
    assert_eq!(&export.inner.contents()[0..3], b"abc");
    wait_connections(&server, 0);
}

#[test]
fn a_client_vanishing_mid_write_executes_nothing_and_disturbs_no_one() {
    let (server, vol0) = serve_mem();
    let mut other = Client::open(server.local_addr(), "vol0");
    {
        let mut client = Client::open(server.local_addr(), "vol0");
        client.send_request(0, NBD_CMD_WRITE, 1, 0, 64 << 10, &[0xcc; 1000]);
        // Dropped: the connection closes halfway through the payload.
    }
    wait_connections(&server, 1);
    assert_eq!(vol0.stats().writes, 0);
    assert!(vol0.contents().iter().all(|&b| b == 0));
    assert_eq!(other.write_at(2, 0, b"fine", 0), 0);
    assert_eq!(other.read_at(3, 0, 4).unwrap(), b"fine");
}

#[test]
fn a_client_vanishing_with_replies_pending_disturbs_no_one() {
    let (server, vol0) = serve_mem();
    vol0.write(0, &pattern(EXPORT_BYTES, 1), false).unwrap();
    {
        let mut client = Client::open(server.local_addr(), "vol0");
        for cookie in 0..64 {
            client.send_request(0, NBD_CMD_READ, cookie, 0, 256 << 10, &[]);
        }
        // Dropped without reading a single reply.
    }
    let mut other = Client::open(server.local_addr(), "vol0");
    assert_eq!(other.read_at(1, 0, 4).unwrap(), pattern(4, 1));
    wait_connections(&server, 1);
}

#[test]
fn shutdown_closes_every_connection_and_is_idempotent() {
    let (server, _) = serve_mem();
    let mut in_transmission = Client::open(server.local_addr(), "vol0");
    let mut in_handshake = Client::handshake(server.local_addr(), 3);
    wait_connections(&server, 2);
    let started = Instant::now();
    server.shutdown();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(server.connections(), 0);
    in_transmission.expect_closed();
    in_handshake.expect_closed();
    server.shutdown();
    assert!(TcpStream::connect(server.local_addr()).is_err());
}

#[test]
fn shutdown_lets_in_flight_requests_finish() {
    let export = Arc::new(GatedExport::new(EXPORT_BYTES, 0));
    let server = serve(
        ExportList::new().with("vol0", export.clone()),
        ServerConfig::default(),
    );
    let mut client = Client::open(server.local_addr(), "vol0");
    client.send_request(0, NBD_CMD_READ, 1, 0, 512, &[]);
    export.wait_running(1);
    let opener = std::thread::spawn({
        let export = export.clone();
        move || {
            std::thread::sleep(Duration::from_millis(50));
            export.open_gate();
        }
    });
    // Returns once the read has finished (its reply is lost).
    server.shutdown();
    assert_eq!(export.running.load(Ordering::SeqCst), 0);
    assert_eq!(export.inner.stats().reads, 1);
    opener.join().unwrap();
    drop(client);
}

#[test]
fn an_invalid_config_is_refused() {
    // A config the server refuses to start with is an error, not a panic.
    let bad = ServerConfig {
        max_request_bytes: 512,
        ..ServerConfig::default()
    };
    let addr = "127.0.0.1:0".parse().unwrap();
    let err = NbdServer::bind(addr, Arc::new(ExportList::new()), bad).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
}
