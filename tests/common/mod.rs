//! A pair of real `nvmirror node` processes on loopback, and real NBD
//! clients (qemu-io, qemu-img from qemu-utils; nbdsh, nbdinfo, nbdcopy from
//! libnbd-bin) run with a deadline. Used by the process-level tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nvmirror::storage::mailbox::MailboxState;
use nvmirror::testing::harness::{NodeProcess, PairHarness, PairSpec};

pub const VOLUME_BYTES: u64 = 16 << 20;
pub const HALF_BYTES: u64 = 1 << 20;

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

pub const START: Duration = Duration::from_secs(30);

/// Two node processes sharing an aggregate directory (the library's pair
/// harness, run from a temporary directory, with automatic takeover off:
/// these tests are about one node's behaviour).
#[derive(Debug)]
pub struct Pair {
    pub dir: tempfile::TempDir,
    harness: PairHarness,
}

impl Pair {
    /// Configure and start both nodes; wait until both mirror in sync.
    pub fn start() -> Pair {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut harness = PairHarness::configure(PairSpec {
            dir: dir.path().to_owned(),
            volumes: vec![("vol0".into(), VOLUME_BYTES), ("vol1".into(), VOLUME_BYTES)],
            half_bytes: HALF_BYTES,
            extra_config: "[consistency_point]\ninterval_ms = 1000\n".into(),
            ha_config: "auto_takeover = false\n".into(),
            binary: Some(nvmirror_bin().into()),
            transport: "tcp".into(),
        })
        .expect("configure the pair");
        // Volume names are unique across the pair.
        let path = harness.node(2).config_path.clone();
        let text = std::fs::read_to_string(&path).expect("config");
        std::fs::write(
            &path,
            text.replace("\"vol0\"", "\"vol2-0\"")
                .replace("\"vol1\"", "\"vol2-1\""),
        )
        .expect("config");
        for node in [1, 2] {
            harness.node(node).start(START).expect("start node");
        }
        let pair = Pair { dir, harness };
        pair.wait_in_sync(1);
        pair.wait_in_sync(2);
        pair
    }

    pub fn node(&mut self, node_id: u32) -> &mut NodeProcess {
        self.harness.node(node_id)
    }

    pub fn nvram(&self, node_id: u32) -> PathBuf {
        self.harness.nvram(node_id)
    }

    /// What node `node_id`'s mailbox says.
    pub fn mailbox(&self, node_id: u32) -> MailboxState {
        self.harness
            .mailbox(node_id)
            .expect("mailbox")
            .expect("mailbox written")
    }

    pub fn in_sync(&self, node_id: u32) -> bool {
        self.harness.in_sync(node_id)
    }

    pub fn wait_in_sync(&self, node_id: u32) {
        self.harness.wait_in_sync(node_id, START).expect("in sync");
    }

    /// Node `writer`'s live log and node `mirror`'s partner-mirror area hold
    /// the same bytes.
    pub fn mirror_matches(&self, writer: u32, mirror: u32) -> bool {
        self.harness.mirror_matches(writer, mirror).unwrap_or(false)
    }
}
