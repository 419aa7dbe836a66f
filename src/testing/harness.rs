//! A pair of `nvmirror node` processes on this machine, for `nvmirror drill`
//! and the process tests: configs in a fresh directory, ports on loopback, start,
//! stop, kill -9, and what their mailboxes and NVRAM files say.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Error, Result};
use crate::admin::render::parse_status;
use crate::error::Error as NodeError;
use crate::ha::status::Status;
use crate::storage::mailbox::{self, MailboxState};

/// What the pair looks like.
#[derive(Debug, Clone)]
pub struct PairSpec {
    pub dir: PathBuf,
    pub volumes: Vec<(String, u64)>,
    pub half_bytes: u64,
    /// Appended before the `[ha]` section (whole sections).
    pub extra_config: String,
    /// Appended inside the `[ha]` section.
    pub ha_config: String,
    /// The `nvmirror` binary to run (default: the running one).
    pub binary: Option<PathBuf>,
    /// The interconnect: "tcp" on loopback, or "rdma" between the two
    /// Soft-RoCE devices soft-roce/ sets up (NVMIRROR_RDMA_ADDR_A/_B,
    /// 192.0.2.1 and 192.0.2.2 by default).
    pub transport: String,
}

/// The interconnect addresses of node 1 and node 2 for `transport`.
fn interconnect_ips(transport: &str) -> [String; 2] {
    if transport == "rdma" {
        [
            std::env::var("NVMIRROR_RDMA_ADDR_A").unwrap_or_else(|_| "192.0.2.1".into()),
            std::env::var("NVMIRROR_RDMA_ADDR_B").unwrap_or_else(|_| "192.0.2.2".into()),
        ]
    } else {
        ["127.0.0.1".into(), "127.0.0.1".into()]
    }
}

#[derive(Debug)]
pub struct NodeProcess {
    binary: Option<PathBuf>,
    pub node_id: u32,
    pub config_path: PathBuf,
    pub nbd: SocketAddr,
    pub admin: SocketAddr,
    pub log_path: PathBuf,
    child: Option<Child>,
}

#[derive(Debug)]
pub struct PairHarness {
    pub spec: PairSpec,
    pub nodes: [NodeProcess; 2],
}

/// A port free now, below Linux's ephemeral range (32768 and up): a port
/// the kernel picked for us could be handed out again, before a node
/// listens on it, as the local port of any outgoing connection (the nodes
/// of every test make many), and the node would then fail to start.
///
/// The port stays reserved for this process until it exits, by an
/// exclusive lock on a file named after it: a pair's port is free while
/// its node is killed or restarting, and another test (in this process or
/// another, such as `nvmirror drill`) must not take it then (CI saw the
/// drill's client reach another test's NBD server on its victim's port).
pub fn free_port() -> Result<u16> {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    let mut last_error = None;
    for _ in 0..200 {
        let port = rng.gen_range(20_000..32_000);
        if !reserve_port(port) {
            continue;
        }
        match std::net::TcpListener::bind(("127.0.0.1", port)) {
            Ok(_) => return Ok(port),
            Err(error) => last_error = Some(error),
        }
    }
    Err(NodeError::Listen {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        source: last_error
            .unwrap_or_else(|| std::io::Error::other("every port tried is reserved by a test")),
    }
    .into())
}

/// Lock the reservation file of `port` for the rest of this process;
/// false if another reservation holds it.
fn reserve_port(port: u16) -> bool {
    static HELD: std::sync::Mutex<Vec<nix::fcntl::Flock<std::fs::File>>> =
        std::sync::Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("nvmirror-test-ports");
    if std::fs::create_dir_all(&dir).is_err() {
        return true; // No reservations possible: the bind check alone.
    }
    let Ok(file) = std::fs::File::create(dir.join(port.to_string())) else {
        return true;
    };
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            HELD.lock().unwrap_or_else(|e| e.into_inner()).push(lock);
            true
        }
        Err(_) => false,
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| NodeError::Io { what, path, source }.into()
}

impl PairHarness {
    /// Write both configs into `spec.dir`; nothing starts yet.
    pub fn configure(spec: PairSpec) -> Result<PairHarness> {
        std::fs::create_dir_all(&spec.dir).map_err(io("creating the pair directory", &spec.dir))?;
        let ic = [free_port()?, free_port()?];
        let ic_ips = interconnect_ips(&spec.transport);
        let nbd = [free_port()?, free_port()?];
        let admin = [free_port()?, free_port()?];
        let volumes: String = spec
            .volumes
            .iter()
            .map(|(name, size)| format!("[[volume]]\nname = \"{name}\"\nsize = {size}\n"))
            .collect();
        let mut nodes = Vec::new();
        for node_id in [1u32, 2] {
            let me = (node_id - 1) as usize;
            let config_path = spec.dir.join(format!("node{node_id}.toml"));
            let text = format!(
                "node_id = {node_id}\n\
                 data_dir = \"{root}/node{node_id}\"\n\
                 aggregate_dir = \"{root}/aggregate\"\n\
                 [nvram]\nhalf_size = {half}\n\
                 [nbd]\nlisten = \"127.0.0.1:{nbd_port}\"\n\
                 {volumes}\
                 [interconnect]\ntransport = \"{transport}\"\nlisten = \"{listen_ip}:{listen}\"\npartner = \"{partner_ip}:{partner}\"\n\
                 key = \"drill pair key: generate your own for a real pair\"\n\
                 heartbeat_interval_ms = 50\nheartbeat_timeout_ms = 1000\n\
                 {extra}\n\
                 [ha]\nadmin_listen = \"127.0.0.1:{admin_port}\"\nmailbox_interval_ms = 100\nmailbox_timeout_ms = 1000\n{ha_extra}\n",
                root = spec.dir.display(),
                half = spec.half_bytes,
                nbd_port = nbd[me],
                listen = ic[me],
                partner = ic[1 - me],
                transport = spec.transport,
                listen_ip = ic_ips[me],
                partner_ip = ic_ips[1 - me],
                extra = spec.extra_config,
                admin_port = admin[me],
                ha_extra = spec.ha_config,
            );
            std::fs::write(&config_path, text)
                .map_err(io("writing a node config", &config_path))?;
            nodes.push(NodeProcess {
                binary: spec.binary.clone(),
                node_id,
                config_path,
                nbd: SocketAddr::from(([127, 0, 0, 1], nbd[me])),
                admin: SocketAddr::from(([127, 0, 0, 1], admin[me])),
                log_path: spec.dir.join(format!("node{node_id}.log")),
                child: None,
            });
        }
        let nodes: [NodeProcess; 2] = nodes.try_into().expect("two nodes");
        Ok(PairHarness { spec, nodes })
    }

    pub fn node(&mut self, node_id: u32) -> &mut NodeProcess {
        &mut self.nodes[(node_id - 1) as usize]
    }

    pub fn nvram(&self, node_id: u32) -> PathBuf {
        self.spec.dir.join(format!("node{node_id}/nvram"))
    }

    pub fn aggregate(&self) -> PathBuf {
        self.spec.dir.join("aggregate")
    }

    /// What node `node_id`'s mailbox says, if it wrote one.
    pub fn mailbox(&self, node_id: u32) -> Result<Option<MailboxState>> {
        Ok(mailbox::read(&self.aggregate(), node_id)?)
    }

    pub fn in_sync(&self, node_id: u32) -> bool {
        matches!(self.mailbox(node_id), Ok(Some(state)) if state.mirror_in_sync)
    }

    /// Wait until `node_id` mirrors in sync, up to `timeout`.
    /// Waits until node `node_id` mirrors in sync. Gives up only when no
    /// resync gets further than any before it for `timeout` (a slow machine
    /// or link takes as long as the copy takes; a resync that starts over
    /// and over makes no progress); prints the progress every few seconds.
    pub fn wait_in_sync(&self, node_id: u32, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        let mut progress_at = started;
        let mut furthest_bytes = 0;
        let mut last_report = started;
        while !self.in_sync(node_id) {
            let now = Instant::now();
            let resync = self.nodes[(node_id - 1) as usize]
                .status()
                .ok()
                .and_then(|status| status.mirror.resync);
            let placed = resync.as_ref().map_or(0, |resync| resync.placed_bytes);
            if placed > furthest_bytes {
                furthest_bytes = placed;
                progress_at = now;
            }
            let describe = || {
                resync.as_ref().map_or_else(
                    || "not started".to_owned(),
                    |r| serde_json::to_string(r).unwrap_or_default(),
                )
            };
            if now.duration_since(progress_at) > timeout {
                return Err(Error::Misbehaving {
                    reason: format!(
                        "node {node_id} did not mirror in sync: no resync got further for {timeout:?} \
                         (waited {:?}; resync: {})",
                        now.duration_since(started),
                        describe()
                    ),
                });
            }
            if now.duration_since(last_report) >= Duration::from_secs(5) {
                last_report = now;
                eprintln!(
                    "waiting {:.0} s for node {node_id} to mirror in sync; resync: {}",
                    now.duration_since(started).as_secs_f64(),
                    describe()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Ok(())
    }

    /// Node `mirror`'s partner-mirror area reads exactly like node
    /// `writer`'s live log: the same log header block, and a scan yields
    /// the same records (a resync copies the live ranges, not the bytes
    /// past them). Read through the NVRAM files (mapped shared by the
    /// nodes, so the files show the current bytes).
    pub fn mirror_matches(&self, writer: u32, mirror: u32) -> Result<bool> {
        use std::os::unix::fs::FileExt;
        let log_len = nvlog::region::LOG_HEADER_BYTES + 2 * self.spec.half_bytes;
        let read = |path: PathBuf, offset: u64| -> Result<Vec<u8>> {
            let file = std::fs::File::open(&path).map_err(io("opening an NVRAM file", &path))?;
            let mut bytes = vec![0u8; log_len as usize];
            file.read_exact_at(&mut bytes, offset)
                .map_err(io("reading an NVRAM file", &path))?;
            Ok(bytes)
        };
        let header = nvlog::region::REGION_HEADER_BYTES;
        let log = read(self.nvram(writer), header)?;
        let copy = read(self.nvram(mirror), header + log_len)?;
        Ok(same_log(&log, &copy))
    }
}

/// Whether `copy` (a partner's mirror) holds the log `log`: the same header
/// block and the same records. Bytes past the live ranges may differ: a
/// resync copies only the live ranges.
pub fn same_log(log: &[u8], copy: &[u8]) -> bool {
    let header_block = nvlog::region::LOG_HEADER_BYTES as usize;
    if log.len() < header_block || copy.len() < header_block {
        return false;
    }
    if log[..header_block] != copy[..header_block] {
        return false;
    }
    /// A scanned record: LSN, volume, offset, payload.
    type Record = (u64, u32, u64, Vec<u8>);
    let records = |image: &[u8]| -> Option<Vec<Record>> {
        let scanner = nvlog::Scanner::new(image).ok()?;
        Some(
            scanner
                .map(|r| {
                    (
                        r.header.lsn,
                        r.header.volume,
                        r.header.offset,
                        r.payload.to_vec(),
                    )
                })
                .collect(),
        )
    };
    let log_records = records(log);
    log_records.is_some() && log_records == records(copy)
}

impl NodeProcess {
    /// The NBD URI of `volume` on this node's address.
    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.nbd)
    }

    /// What the node logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// GET /status from the node's admin endpoint.
    pub fn status(&self) -> Result<Status> {
        let (code, body) =
            crate::admin::request(self.admin, "GET", "/status", Duration::from_secs(10)).map_err(
                |error| Error::Misbehaving {
                    reason: error.to_string(),
                },
            )?;
        if code != 200 {
            return Err(Error::Misbehaving {
                reason: format!("node {} status: HTTP {code}: {body}", self.node_id),
            });
        }
        parse_status(&body).map_err(|reason| Error::Misbehaving { reason })
    }

    /// POST an admin action; returns (HTTP status, body).
    pub fn admin_post(&self, path: &str) -> Result<(u16, String)> {
        crate::admin::request(self.admin, "POST", path, Duration::from_secs(120)).map_err(|error| {
            Error::Misbehaving {
                reason: error.to_string(),
            }
        })
    }

    /// Send a signal (SIGSTOP, SIGCONT) to the running node.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        let pid = self.pid().ok_or_else(|| Error::Misbehaving {
            reason: format!("node {} is not running", self.node_id),
        })?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).map_err(|errno| {
            Error::Misbehaving {
                reason: format!("signalling node {}: {errno}", self.node_id),
            }
        })
    }

    /// Start `nvmirror node` (this very binary) and wait until it answers on
    /// its admin endpoint.
    pub fn start(&mut self, timeout: Duration) -> Result<()> {
        assert!(
            self.child.is_none(),
            "node {} is already running",
            self.node_id
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(io("opening a node log", &self.log_path))?;
        let log_err = log
            .try_clone()
            .map_err(io("opening a node log", &self.log_path))?;
        let exe = match &self.binary {
            Some(binary) => binary.clone(),
            None => std::env::current_exe().map_err(io(
                "finding the nvmirror binary",
                Path::new("/proc/self/exe"),
            ))?,
        };
        let child = Command::new(exe)
            .arg("node")
            .arg("--config")
            .arg(&self.config_path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io("starting a node", &self.config_path))?;
        self.child = Some(child);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                return Err(Error::Misbehaving {
                    reason: format!(
                        "node {} exited with {status}; the end of {}:\n{}",
                        self.node_id,
                        self.log_path.display(),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    ),
                });
            }
            // The admin endpoint is the node's own (its NBD address may be
            // served by the partner while it waits for a giveback).
            if TcpStream::connect_timeout(&self.admin, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Misbehaving {
                    reason: format!(
                        "node {} did not open its admin endpoint within {timeout:?}",
                        self.node_id
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|child| child.id())
    }

    /// Wait up to `timeout` for the node to exit by itself (or be killed
    /// from outside); its exit status, or None if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9: the node gets no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and wait for the clean shutdown.
    pub fn stop(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return Err(Error::Misbehaving {
                reason: format!("node {} is not running", self.node_id),
            });
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Misbehaving {
                    reason: format!(
                        "node {} did not stop within {timeout:?} of SIGTERM",
                        self.node_id
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
