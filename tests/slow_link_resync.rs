//! A resync over a link so slow that copying the log takes several
//! heartbeat timeouts completes, at the first attempt, and the pair gets in
//! sync; the mirror then holds every acknowledged write (a takeover reads
//! them back).
//!
//! The link is throttled with a token bucket (tc tbf), so the resync's
//! length is set by the throttle, not by how fast this machine is:
//!
//! - TCP (the default): both nodes on the loopback device of a network
//!   namespace this test makes for itself, `lo` throttled. Needs root.
//! - RDMA (`NVMIRROR_SLOW_LINK_TRANSPORT=rdma`, run by `soft-roce/rdma-tier`
//!   in the Soft-RoCE guest): the nodes on the rxe devices over the veth
//!   pair (`NVMIRROR_SLOW_LINK_NETDEVS`, "va vb"), both veths throttled;
//!   `NVMIRROR_BIN` names an nvmirror built with `--features rdma`.
//!
//! Before the fix this livelocked over RDMA: the partner's failure detector
//! saw no heartbeat for longer than its timeout (they waited on the queue
//! pair behind the resync's writes), closed the session, and the resync
//! started over, forever.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use nvmirror::testing::harness::{PairHarness, PairSpec};

const HALF_BYTES: u64 = 16 << 20;
const WRITTEN_BYTES: u64 = 12 << 20;
/// The heartbeat timeout the harness configures.
const HARNESS_HEARTBEAT_TIMEOUT_MS: u64 = 1000;

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error} (apt-get install iproute2)"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Where the pair's interconnect runs, and how it is throttled.
struct Link {
    transport: &'static str,
    netdevs: Vec<String>,
    /// The throttle. The 12 MiB in the log take six heartbeat timeouts or
    /// more to copy.
    rate_bits_per_s: u64,
    heartbeat_timeout: Duration,
}

impl Link {
    fn from_env() -> Link {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test throttles a network device with tc and needs root \
             (a network namespace of its own for TCP); run it as root, as `make test` does"
        );
        match std::env::var("NVMIRROR_SLOW_LINK_TRANSPORT").as_deref() {
            Ok("rdma") => Link {
                transport: "rdma",
                netdevs: std::env::var("NVMIRROR_SLOW_LINK_NETDEVS")
                    .unwrap_or_else(|_| "va vb".into())
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect(),
                // Soft-RoCE runs in a guest whose CPU is emulated, where a
                // thread can go unscheduled for most of a second: a 1 s
                // silence timeout there measures the emulator, not the
                // pacing (it failed one run in a few). 3 s leaves room for
                // that; 8 Mbit/s keeps the copy at four such timeouts.
                rate_bits_per_s: 8_000_000,
                heartbeat_timeout: Duration::from_secs(3),
            },
            Ok("tcp") | Err(_) => {
                // A network namespace for this thread and the processes it
                // starts: throttling its `lo` touches nothing else.
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("unshare(CLONE_NEWNET)");
                // The MTU of an Ethernet link, not loopback's 64 KiB: a
                // token bucket passes no packet larger than its burst.
                run("ip", &["link", "set", "lo", "mtu", "1500", "up"]);
                Link {
                    transport: "tcp",
                    netdevs: vec!["lo".into()],
                    rate_bits_per_s: 16_000_000,
                    heartbeat_timeout: Duration::from_millis(HARNESS_HEARTBEAT_TIMEOUT_MS),
                }
            }
            Ok(other) => panic!("NVMIRROR_SLOW_LINK_TRANSPORT={other}: expected tcp or rdma"),
        }
    }

    /// A token bucket on every device. For RDMA the queue is long enough
    /// never to drop (rxe keeps at most 64 packets per queue pair in
    /// flight; a drop would cost a retransmission timeout); for TCP it is
    /// short (TCP recovers from drops, and a long queue only delays acks).
    fn throttle(&self) {
        let rate = format!("{}bit", self.rate_bits_per_s);
        for dev in &self.netdevs {
            let queue: &[&str] = if self.transport == "rdma" {
                &["limit", "4mb"]
            } else {
                &["latency", "50ms"]
            };
            let mut args = vec!["qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate];
            args.extend_from_slice(&["burst", "32kb"]);
            args.extend_from_slice(queue);
            run("tc", &args);
        }
    }

    fn unthrottle(&self) {
        for dev in &self.netdevs {
            let _ = Command::new("tc")
                .args(["qdisc", "del", "dev", dev, "root"])
                .output();
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.unthrottle();
    }
}

#[test]
fn a_resync_longer_than_the_heartbeat_timeout_completes() {
    let link = Link::from_env();
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = std::env::var_os("NVMIRROR_BIN").unwrap_or_else(|| nvmirror_bin().into());
    let mut pair = PairHarness::configure(PairSpec {
        dir: dir.path().to_owned(),
        volumes: vec![("vol".into(), 64 << 20)],
        half_bytes: HALF_BYTES,
        // No consistency point empties the log before the resync.
        extra_config: "[consistency_point]\ninterval_ms = 3600000\nthreshold_percent = 95\n".into(),
        ha_config: "auto_takeover = false\n".into(),
        binary: Some(binary.into()),
        transport: link.transport.into(),
    })
    .expect("configure the pair");
    for node in [1, 2] {
        let config = pair.node(node).config_path.clone();
        let mut text = std::fs::read_to_string(&config).expect("config");
        let harness_timeout = format!("heartbeat_timeout_ms = {HARNESS_HEARTBEAT_TIMEOUT_MS}\n");
        assert!(text.contains(&harness_timeout), "{text}");
        text = text.replace(
            &harness_timeout,
            &format!(
                "heartbeat_timeout_ms = {}\n",
                link.heartbeat_timeout.as_millis()
            ),
        );
        if node == 2 {
            text = text.replace("\"vol\"", "\"vol-2\"");
        }
        std::fs::write(&config, text).expect("config");
    }

    // Node 1 alone: its writes are acknowledged on local persistence and
    // stay in its log.
    pair.node(1).start(START).expect("start node 1");
    let uri = pair.node(1).uri("vol");
    let written = WRITTEN_BYTES.to_string();
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            &format!("write -P 0x3c 0 {written}"),
        ],
    );
    let status = pair.node(1).status().expect("status");
    let used: u64 = status.log.halves.iter().map(|half| half.used_bytes).sum();
    assert!(used >= WRITTEN_BYTES, "the log holds the writes: {status}");

    link.throttle();
    let expected = Duration::from_secs_f64(used as f64 * 8.0 / link.rate_bits_per_s as f64);
    assert!(
        expected >= link.heartbeat_timeout * 4,
        "the copy must outlast several heartbeat timeouts"
    );
    let started = Instant::now();
    pair.node(2).start(START).expect("start node 2");
    // Generous: progress is printed, and the bound only catches a livelock.
    let deadline = started + expected * 10 + Duration::from_secs(60);
    let mut last_report = Instant::now();
    while !pair.in_sync(1) {
        assert!(
            Instant::now() < deadline,
            "node 1 did not get in sync within {:?} over a link that copies its log in {expected:?}\n\
             node 1:\n{}\nnode 2:\n{}",
            deadline - started,
            tail(&pair.node(1).log()),
            tail(&pair.node(2).log()),
        );
        if last_report.elapsed() >= Duration::from_secs(2) {
            last_report = Instant::now();
            let resync = pair
                .node(1)
                .status()
                .map(|status| format!("{:?}", status.mirror.resync))
                .unwrap_or_else(|error| error.to_string());
            eprintln!("{:>6.1} s: {resync}", started.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = started.elapsed();
    eprintln!(
        "in sync after {took:?}: {used} bytes over a {} bit/s link ({expected:?} of copying)",
        link.rate_bits_per_s
    );
    // The throttle held: the copy really took several heartbeat timeouts.
    assert!(took >= expected.mul_f64(0.8), "{took:?} < {expected:?}");

    let log1 = pair.node(1).log();
    let log2 = pair.node(2).log();
    assert!(
        !log2.contains("partner silent") && !log1.contains("partner silent"),
        "no session was closed for silence:\nnode 1:\n{}\nnode 2:\n{}",
        tail(&log1),
        tail(&log2)
    );
    assert_eq!(
        log1.matches("resync: copying").count(),
        1,
        "the first resync completed:\n{}",
        tail(&log1)
    );
    let status = pair.node(1).status().expect("status");
    let resync = status.mirror.resync.as_ref().expect("a resync ran");
    assert!(resync.finished, "{status}");
    assert_eq!(resync.placed_bytes, resync.total_bytes, "{status}");
    assert!(
        resync.total_bytes < 2 * HALF_BYTES,
        "the resync copies the used part of the log, not all of it: {status}"
    );

    // What was copied is what was acknowledged: node 2 takes over from its
    // mirror and reads every byte back.
    link.unthrottle();
    pair.node(1).kill9();
    let takeover = Instant::now();
    loop {
        let (code, body) = pair.node(2).admin_post("/takeover").expect("takeover");
        if code == 200 {
            break;
        }
        assert!(
            takeover.elapsed() < Duration::from_secs(30),
            "node 2 refused the takeover: HTTP {code}: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let uri = pair.node(2).uri("vol");
    let verify = tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            &format!("read -P 0x3c 0 {written}"),
        ],
    );
    assert!(!verify.contains("Pattern verification failed"), "{verify}");
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
