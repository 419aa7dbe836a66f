//! A pair of real `nvmirror node` processes on loopback, and real NBD
//! clients (qemu-io, qemu-img from qemu-utils; nbdsh, nbdinfo, nbdcopy from
//! libnbd-bin) run with a deadline. Used by the process-level tests.
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const VOLUME_BYTES: u64 = 16 << 20;
pub const HALF_BYTES: u64 = 1 << 20;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Fail (never skip) when a client is missing: the README's test command
/// installs it, and a skipped test would hide a regression.
pub fn require_tool(tool: &str) {
    let package = match tool {
        "qemu-io" | "qemu-img" => "qemu-utils",
        "nbdsh" => "python3-nbd and libnbd-bin",
        _ => "libnbd-bin",
    };
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not installed: apt-get install {package} (or run `make test`, which does)"
    );
}

/// Run a command with a deadline; kill it if it overruns.
pub fn run_with_deadline(command: &mut Command, deadline: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    let started = Instant::now();
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("output");
            panic!(
                "{command:?} ran longer than {deadline:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn tool(tool_name: &str, args: &[&str]) -> Output {
    require_tool(tool_name);
    run_with_deadline(Command::new(tool_name).args(args), Duration::from_secs(60))
}

/// Run a tool and insist that it succeeded; returns its stdout.
pub fn tool_ok(tool_name: &str, args: &[&str]) -> String {
    let output = tool(tool_name, args);
    assert!(
        output.status.success(),
        "{tool_name} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// An nbdsh command line for `uri` (bound to `h` in the script). nbdsh
/// runs `python3 -m nbd`, and the nbd module is Debian's: put Debian's
/// python3 first on PATH (a pyenv python3 lacks the module).
pub fn nbdsh_command(uri: &str, script: &str) -> Command {
    require_tool("nbdsh");
    let path = std::env::var("PATH").unwrap_or_default();
    let mut command = Command::new("nbdsh");
    command
        .env("PATH", format!("/usr/bin:/bin:{path}"))
        .args(["-u", uri, "-c", script]);
    command
}

/// Run an nbdsh script against `uri` with a deadline.
pub fn nbdsh(uri: &str, script: &str) -> Output {
    run_with_deadline(&mut nbdsh_command(uri, script), Duration::from_secs(120))
}

pub fn nvmirror_bin() -> &'static str {
    env!("CARGO_BIN_EXE_nvmirror")
}

pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// One node process of a pair.
#[derive(Debug)]
pub struct NodeProcess {
    pub node_id: u32,
    pub config_path: PathBuf,
    pub nbd_port: u16,
    pub child: Option<Child>,
    pub log_path: PathBuf,
}

impl NodeProcess {
    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://127.0.0.1:{}/{volume}", self.nbd_port)
    }

    pub fn start(&mut self) {
        assert!(
            self.child.is_none(),
            "node {} already running",
            self.node_id
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("node log file");
        let child = Command::new(nvmirror_bin())
            .args(["node", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn nvmirror node");
        self.child = Some(child);
        let port = self.nbd_port;
        wait_for(
            &format!("node {} to serve NBD", self.node_id),
            Duration::from_secs(30),
            || {
                self.assert_running();
                TcpStream::connect(("127.0.0.1", port)).is_ok()
            },
        );
    }

    fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!(
                    "node {} exited early with {status}:\n{}",
                    self.node_id,
                    self.log()
                );
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// kill -9: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for the clean shutdown; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("node {} did not stop within 30 s of SIGTERM", self.node_id);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log_path) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Two node processes sharing an aggregate directory.
#[derive(Debug)]
pub struct Pair {
    pub dir: tempfile::TempDir,
    pub nodes: [NodeProcess; 2],
}

impl Pair {
    /// Write the configs and start both nodes; wait until node 1 mirrors in sync.
    pub fn start() -> Pair {
        let pair = Pair::configure("");
        pair.started()
    }

    /// Write configs with `extra` appended to both; nothing started.
    pub fn configure(extra: &str) -> Pair {
        let dir = tempfile::tempdir().expect("tempdir");
        let ic = [free_port(), free_port()];
        let nbd = [free_port(), free_port()];
        let nodes = [1u32, 2].map(|node_id| {
            let me = (node_id - 1) as usize;
            let config_path = dir.path().join(format!("node{node_id}.toml"));
            let text = format!(
                r#"node_id = {node_id}
data_dir = "{root}/node{node_id}"
aggregate_dir = "{root}/aggregate"
[nvram]
half_size = {HALF_BYTES}
[nbd]
listen = "127.0.0.1:{nbd_port}"
[[volume]]
name = "vol0"
size = {VOLUME_BYTES}
[[volume]]
name = "vol1"
size = {VOLUME_BYTES}
[interconnect]
listen = "127.0.0.1:{listen}"
partner = "127.0.0.1:{partner}"
key = "a pre-shared key for the test pair"
heartbeat_interval_ms = 50
heartbeat_timeout_ms = 1000
[checkpoint]
interval_ms = 1000
{extra}
{ha}
"#,
                root = dir.path().display(),
                nbd_port = nbd[me],
                listen = ic[me],
                partner = ic[1 - me],
                // These tests are about one node's behaviour: no takeover
                // unless a test asks for HA.
                ha = if extra.contains("[ha]") {
                    ""
                } else {
                    "[ha]\nauto_takeover = false"
                },
            );
            std::fs::write(&config_path, text).expect("write config");
            NodeProcess {
                node_id,
                config_path,
                nbd_port: nbd[me],
                child: None,
                log_path: dir.path().join(format!("node{node_id}.log")),
            }
        });
        Pair { dir, nodes }
    }

    pub fn started(mut self) -> Pair {
        for node in &mut self.nodes {
            node.start();
        }
        self.wait_in_sync(1);
        self.wait_in_sync(2);
        self
    }

    pub fn node(&mut self, node_id: u32) -> &mut NodeProcess {
        &mut self.nodes[(node_id - 1) as usize]
    }

    pub fn aggregate(&self) -> PathBuf {
        self.dir.path().join("aggregate")
    }

    pub fn nvram(&self, node_id: u32) -> PathBuf {
        self.dir.path().join(format!("node{node_id}/nvram"))
    }

    /// The mailbox JSON of `node_id`.
    pub fn mailbox(&self, node_id: u32) -> serde_json::Value {
        let path = self.aggregate().join(format!("node-{node_id}.mailbox"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).expect("mailbox JSON")
    }

    pub fn in_sync(&self, node_id: u32) -> bool {
        let path = self.aggregate().join(format!("node-{node_id}.mailbox"));
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .is_some_and(|mailbox| mailbox["mirror_in_sync"] == true)
    }

    pub fn wait_in_sync(&self, node_id: u32) {
        wait_for(
            &format!("node {node_id} to mirror in sync"),
            Duration::from_secs(30),
            || self.in_sync(node_id),
        );
    }

    /// Node `writer`'s live log and node `mirror`'s partner-mirror area hold
    /// the same bytes (read through the NVRAM files: the nodes map them
    /// shared, so the files show the current bytes).
    pub fn mirror_matches(&self, writer: u32, mirror: u32) -> bool {
        let log_len = 4096 + 2 * HALF_BYTES;
        let local = read_range(&self.nvram(writer), 4096, log_len);
        let image = read_range(&self.nvram(mirror), 4096 + log_len, log_len);
        local == image
    }
}

pub fn read_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, offset).expect("read NVRAM");
    bytes
}
