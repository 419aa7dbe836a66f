//! HA with real node processes: takeover after kill -9 with reads served
//! during the replay, giveback, fencing of a stopped node (SIGSTOP), an
//! out-of-sync mirror refused and then forced, a survivor crash during the
//! replay, an interconnect cut without takeover, bad admin requests.

use std::path::Path;
use std::time::{Duration, Instant};

use nbd::client::NbdClient;
use nix::sys::signal::Signal;
use nvmirror::ha::status::{InterconnectView, MailboxView};
use nvmirror::ha::Role;
use nvmirror::testing::harness::{PairHarness, PairSpec};
use nvmirror::testing::workload::{self, Ledger};

const VOLUME_BYTES: u64 = 32 << 20;
const START: Duration = Duration::from_secs(30);

fn pair(dir: &Path, extra: &str, ha: &str) -> PairHarness {
    let mut pair = PairHarness::configure(PairSpec {
        dir: dir.to_owned(),
        volumes: vec![("vol0".into(), VOLUME_BYTES)],
        half_bytes: 8 << 20,
        extra_config: extra.to_owned(),
        ha_config: ha.to_owned(),
        binary: Some(env!("CARGO_BIN_EXE_nvmirror").into()),
        transport: "tcp".into(),
    })
    .expect("configure the pair");
    // Each node's volume names must be unique across the pair.
    let path = pair.node(2).config_path.clone();
    let text = std::fs::read_to_string(&path).expect("config");
    std::fs::write(&path, text.replace("name = \"vol0\"", "name = \"vol2\"")).expect("config");
    for node in [1, 2] {
        pair.node(node).start(START).expect("start node");
    }
    pair.wait_in_sync(1, START).expect("node 1 in sync");
    pair.wait_in_sync(2, START).expect("node 2 in sync");
    pair
}

fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn connect(addr: std::net::SocketAddr, volume: &str) -> NbdClient {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match NbdClient::connect(addr, volume, Duration::from_secs(10)) {
            Ok(client) => return client,
            Err(error) if Instant::now() < deadline => {
                let _ = error;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(error) => panic!("cannot reach {volume} at {addr}: {error}"),
        }
    }
}

fn ledger(volume: &str, first_block: u64, blocks: u64) -> Ledger {
    Ledger {
        volume: volume.into(),
        volume_id: if volume == "vol0" { 1 << 16 } else { 2 << 16 },
        first_block,
        blocks,
        state: Default::default(),
        writes_acked: 0,
        bytes_acked: 0,
        latencies_us: Vec::new(),
        stopped_by: None,
    }
}

/// Write `writes` random runs into `ledger`'s blocks through `addr`.
fn write_some(addr: std::net::SocketAddr, ledger: &mut Ledger, writer: u64, writes: u64) {
    let mut client = connect(addr, &ledger.volume.clone());
    let until = Instant::now() + Duration::from_secs(60);
    workload::run_writer(&mut client, ledger, writer, writer * 7919, until, writes);
    assert!(
        ledger.stopped_by.is_none(),
        "writer stopped: {:?}",
        ledger.stopped_by
    );
    client.disconnect();
}

fn verify(addr: std::net::SocketAddr, ledger: &Ledger) {
    let mut client = connect(addr, &ledger.volume.clone());
    let result = workload::verify(&mut client, ledger).expect("read back");
    assert!(
        result.mismatches.is_empty(),
        "{} blocks lost or wrong, e.g. {:?}",
        result.mismatches.len(),
        &result.mismatches[..result.mismatches.len().min(5)]
    );
    assert!(result.blocks_written > 0);
}

fn holding(pair: &mut PairHarness, node: u32) -> bool {
    pair.node(node)
        .status()
        .is_ok_and(|s| s.takeover.holding_partner_volumes)
}

/// Whether `node`'s status says a takeover is not possible, naming `why`.
fn takeover_refused_because(pair: &mut PairHarness, node: u32, why: &str) -> bool {
    pair.node(node)
        .status()
        .is_ok_and(|s| s.takeover.why_not.is_some_and(|text| text.contains(why)))
}

fn state(pair: &mut PairHarness, node: u32) -> Option<Role> {
    pair.node(node).status().ok().map(|s| s.state)
}

#[test]
fn kill9_takeover_serves_during_replay_then_giveback() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A slow replay, so reads are served while it runs.
    let mut pair = pair(
        dir.path(),
        "[consistency_point]\ninterval_ms = 60000\nthreshold_percent = 95\n",
        "replay_max_bytes_per_s = \"1MiB\"\n",
    );
    let nbd1 = pair.node(1).nbd;
    let mut before = ledger("vol0", 0, 2048);
    write_some(nbd1, &mut before, 1, 300);

    pair.node(1).kill9();
    let killed = Instant::now();
    wait_for("node 2 to take over", Duration::from_secs(15), || {
        holding(&mut pair, 2)
    });
    // Node 2 serves node 1's volume on node 1's address (same host).
    verify(nbd1, &before);
    let first_read_ms = killed.elapsed().as_millis();
    let status = pair.node(2).status().expect("status");
    assert!(
        status.replay.active,
        "reads are served before the replay ends: {status}"
    );
    assert!(first_read_ms < 15_000);

    // A stock client finds the volume again on the same address.
    let uri = format!("nbd://{nbd1}/vol0");
    let qemu = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x7e 30M 64k",
            "-c",
            "read -P 0x7e 30M 64k",
        ])
        .output()
        .expect("qemu-io (apt-get install qemu-utils)");
    let text = String::from_utf8_lossy(&qemu.stdout);
    assert!(
        qemu.status.success() && !text.contains("Pattern verification failed"),
        "{text}"
    );

    // Writes go on through node 2's own log.
    let mut after = ledger("vol0", 2048, 2048);
    write_some(nbd1, &mut after, 2, 200);

    // Node 1 comes back and waits; the giveback returns its volume.
    pair.node(1).start(START).expect("restart node 1");
    wait_for(
        "node 1 to wait for giveback",
        Duration::from_secs(10),
        || state(&mut pair, 1) == Some(Role::WaitingForGiveback),
    );
    let (code, body) = pair.node(2).admin_post("/giveback").expect("giveback");
    assert_eq!(code, 200, "{body}");
    wait_for("node 1 to serve again", Duration::from_secs(15), || {
        state(&mut pair, 1) == Some(Role::Serving)
    });
    verify(nbd1, &before);
    verify(nbd1, &after);
    let owner: serde_json::Value = serde_json::from_slice(
        &std::fs::read(pair.aggregate().join("node-1.owner")).expect("owner file"),
    )
    .expect("json");
    assert_eq!(owner["owner"], 1);
    assert_eq!(
        owner["epoch"], 2,
        "takeover and giveback each raised the epoch"
    );
    // Mirroring resumes in both directions.
    pair.wait_in_sync(1, START).expect("node 1 in sync again");
    pair.wait_in_sync(2, START).expect("node 2 in sync again");
}

#[test]
fn a_stopped_owner_is_fenced_and_neither_writes_nor_acknowledges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pair = pair(dir.path(), "[consistency_point]\ninterval_ms = 1500\n", "");
    let nbd1 = pair.node(1).nbd;
    // Pattern A on blocks 0..256, kept dirty in node 1's log.
    let mut old = ledger("vol0", 0, 256);
    write_some(nbd1, &mut old, 1, 100);
    let mut stale_client = connect(nbd1, "vol0");

    pair.node(1).signal(Signal::SIGSTOP).expect("SIGSTOP");
    wait_for("node 2 to take over", Duration::from_secs(15), || {
        holding(&mut pair, 2)
    });
    // Node 1 still holds its port (stopped, not dead): clients use node 2's.
    let nbd2 = pair.node(2).nbd;
    verify(nbd2, &old);
    // Pattern B over the same blocks, through the new owner.
    let mut new = old.clone();
    write_some(nbd2, &mut new, 2, 100);

    pair.node(1).signal(Signal::SIGCONT).expect("SIGCONT");
    // The old owner acknowledges nothing more.
    let refused = stale_client.write(0, &vec![0xee; 4096], false);
    assert!(refused.is_err(), "a fenced node acknowledged a write");
    wait_for(
        "node 1 to know it is fenced",
        Duration::from_secs(10),
        || state(&mut pair, 1) == Some(Role::Fenced),
    );
    // Give node 1's consistency point time to try its stale data.
    std::thread::sleep(Duration::from_secs(3));
    verify(nbd2, &new);
    let log = std::fs::read_to_string(&pair.node(1).log_path).expect("node 1 log");
    assert!(log.contains("fenced"), "node 1 says it was fenced:\n{log}");
}

#[test]
fn an_out_of_sync_mirror_is_refused_then_forced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pair = pair(dir.path(), "", "");
    let nbd1 = pair.node(1).nbd;
    let mut mirrored = ledger("vol0", 0, 512);
    write_some(nbd1, &mut mirrored, 1, 50);
    // Node 2 goes away (cleanly: after a crash it would not trust its own
    // log while its mirror was in sync, and wait for node 1, see
    // `an_owner_that_lost_power_before_a_takeover_gets_its_writes_back`);
    // node 1 acknowledges writes its mirror lacks.
    pair.node(2).stop(START).expect("node 2 stops");
    let mut unmirrored = ledger("vol0", 512, 512);
    write_some(nbd1, &mut unmirrored, 2, 20);
    assert!(!pair.in_sync(1));
    pair.node(1).kill9();

    pair.node(2).start(START).expect("restart node 2");
    wait_for(
        "node 2 to refuse the takeover",
        Duration::from_secs(15),
        || {
            pair.node(2).status().is_ok_and(|s| {
                s.takeover
                    .why_not
                    .is_some_and(|w| w.contains("out of sync"))
            })
        },
    );
    assert!(!holding(&mut pair, 2));
    let owner_path = pair.aggregate().join("node-1.owner");
    assert!(!owner_path.exists(), "a refused takeover does not fence");

    let (code, body) = pair
        .node(2)
        .admin_post("/takeover?force=true")
        .expect("forced takeover");
    assert_eq!(code, 200, "{body}");
    assert!(holding(&mut pair, 2));
    let owner: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&owner_path).expect("owner")).expect("json");
    assert_eq!(
        owner["forced"], true,
        "the ownership records the forced takeover"
    );
    // What the mirror had is there.
    verify(pair.node(2).nbd, &mirrored);
}

#[test]
fn a_survivor_crash_during_replay_resumes_from_the_persisted_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pair = pair(
        dir.path(),
        "[consistency_point]\ninterval_ms = 60000\nthreshold_percent = 95\n",
        "replay_max_bytes_per_s = \"512KiB\"\n",
    );
    let nbd1 = pair.node(1).nbd;
    let mut data = ledger("vol0", 0, 4096);
    write_some(nbd1, &mut data, 1, 400);
    pair.node(1).kill9();
    wait_for("node 2 to take over", Duration::from_secs(15), || {
        holding(&mut pair, 2)
    });
    std::thread::sleep(Duration::from_millis(500));
    let status = pair.node(2).status().expect("status");
    assert!(
        status.replay.active,
        "the replay is still running: {status}"
    );
    pair.node(2).kill9();

    pair.node(2).start(START).expect("restart node 2");
    let log = std::fs::read_to_string(&pair.node(2).log_path).expect("node 2 log");
    assert!(
        log.contains("resumed serving the partner's volumes from the persisted index"),
        "node 2 resumed without rescanning the mirror:\n{log}"
    );
    assert!(holding(&mut pair, 2));
    verify(pair.node(2).nbd, &data);
}

#[test]
fn an_interconnect_cut_is_not_a_takeover() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pair = pair(dir.path(), "", "");
    let (code, body) = pair
        .node(1)
        .admin_post("/fault?name=cut-interconnect&duration_ms=4000")
        .expect("cut");
    assert_eq!(code, 200, "{body}");
    let nbd1 = pair.node(1).nbd;
    let mut during = ledger("vol0", 0, 256);
    write_some(nbd1, &mut during, 1, 50);
    assert!(
        !pair.in_sync(1),
        "writes during the cut are not mirrored, and the mailbox says so"
    );
    std::thread::sleep(Duration::from_millis(2500));
    let status = pair.node(2).status().expect("status");
    assert_eq!(
        status.partner.interconnect,
        InterconnectView::Silent,
        "{status}"
    );
    assert_eq!(status.partner.mailbox, MailboxView::Alive, "{status}");
    assert!(!status.takeover.possible, "{status}");
    assert!(!holding(&mut pair, 2) && !holding(&mut pair, 1));
    assert!(
        !pair.aggregate().join("node-1.owner").exists()
            && !pair.aggregate().join("node-2.owner").exists()
    );
    // Healed: in sync again.
    pair.wait_in_sync(1, START)
        .expect("node 1 in sync after the cut");
    verify(nbd1, &during);
}

#[test]
fn bad_admin_requests_are_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pair = pair(dir.path(), "", "");
    let admin = pair.node(1).admin;
    let (code, body) =
        nvmirror::admin::request(admin, "GET", "/no-such-thing", Duration::from_secs(5))
            .expect("request");
    assert_eq!(code, 404, "{body}");
    let (code, body) = nvmirror::admin::request(admin, "GET", "/takeover", Duration::from_secs(5))
        .expect("request");
    assert_eq!(code, 405, "{body}");
    let (code, body) = pair.node(1).admin_post("/giveback").expect("giveback");
    assert_eq!(code, 409, "nothing to give back: {body}");
    let (code, body) = pair
        .node(1)
        .admin_post("/fault?name=meteor&duration_ms=1")
        .expect("fault");
    assert_eq!(code, 400, "{body}");
    let (code, metrics) =
        nvmirror::admin::request(admin, "GET", "/metrics", Duration::from_secs(5))
            .expect("metrics");
    assert_eq!(code, 200);
    for needle in [
        "# TYPE nvmirror_writes counter\nnvmirror_writes_total ",
        "nvmirror_acks_total{by=\"mirror\"} ",
        "nvmirror_write_latency_us_bucket{le=\"+Inf\"} ",
        "# TYPE nvmirror_mirror_in_sync gauge\n",
    ] {
        assert!(metrics.contains(needle), "{needle} in:\n{metrics}");
    }
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
    // The CLI renders the status for a person.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_nvmirror"))
        .args(["status", "--config"])
        .arg(&pair.node(1).config_path)
        .output()
        .expect("nvmirror status");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && text.contains("node 1: serving"),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn takeover_with_the_log_nearly_full() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No consistency point: the log keeps everything until the kill.
    let mut pair = pair(
        dir.path(),
        "[consistency_point]\ninterval_ms = 3600000\nthreshold_percent = 100\n",
        "",
    );
    let nbd1 = pair.node(1).nbd;
    // About 7.5 MiB of 8 MiB halves: the filling half nearly full.
    let mut data = ledger("vol0", 0, 8192);
    let mut client = connect(nbd1, "vol0");
    for i in 0..120u64 {
        let stamp = (1 << 40) | (i + 1);
        let start = i * 16;
        let mut bytes = Vec::new();
        for block in start..start + 16 {
            bytes.extend_from_slice(&workload::block_pattern(data.volume_id, block, stamp));
            data.state.entry(block).or_default().acked = stamp;
        }
        client.write(start * 4096, &bytes, false).expect("write");
    }
    client.disconnect();
    let status = pair.node(1).status().expect("status");
    assert!(status.log.used_percent > 85.0, "{status}");
    pair.node(1).kill9();
    wait_for("node 2 to take over", Duration::from_secs(15), || {
        holding(&mut pair, 2)
    });
    verify(nbd1, &data);
    let status = pair.node(2).status().expect("status");
    assert!(status.replay.total_bytes > 7 << 20, "{status}");
}

#[test]
fn a_short_drill_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_nvmirror"))
        .args([
            "drill",
            "--cycles",
            "3",
            "--writers",
            "2",
            "--seed",
            "1",
            "--dir",
        ])
        .arg(dir.path())
        .output()
        .expect("nvmirror drill");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && report.contains("result: PASS"),
        "{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for fault in ["kill -9", "SIGSTOP", "interconnect cut"] {
        assert!(report.contains(fault), "the drill ran {fault}:\n{report}");
    }
    assert!(report.contains("0 lost or wrong"), "{report}");
}

#[test]
fn automatic_giveback_after_the_configured_delay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pair = pair(dir.path(), "", "auto_giveback_delay_ms = 500\n");
    let nbd1 = pair.node(1).nbd;
    let mut data = ledger("vol0", 0, 512);
    write_some(nbd1, &mut data, 1, 50);
    pair.node(1).kill9();
    wait_for("node 2 to take over", Duration::from_secs(15), || {
        holding(&mut pair, 2)
    });
    pair.node(1).start(START).expect("restart node 1");
    wait_for("the automatic giveback", Duration::from_secs(20), || {
        state(&mut pair, 1) == Some(Role::Serving)
    });
    assert!(!holding(&mut pair, 2));
    verify(nbd1, &data);
}

/// The power loss before any takeover: node 1 acknowledges writes
/// with `durability = "mirror"` (in its memory and placed in node 2's
/// mirror, not persisted), loses power (its NVRAM file goes back to what it
/// held before the writes, as when no page was written back) and restarts
/// before node 2 takes over (automatic takeover is off). Its own log lacks
/// acknowledged writes, the partner's mirror has them: it must not serve
/// from its log, nor resync that log over the mirror. It gets them back
/// through the mirror (node 2 takes over at its request, replays, gives
/// back), then serves every acknowledged write.
#[test]
fn an_owner_that_lost_power_before_a_takeover_gets_its_writes_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pair = pair(
        dir.path(),
        "[consistency_point]\ninterval_ms = 600000\nthreshold_percent = 90\n",
        "auto_takeover = false\n",
    );
    let nbd1 = pair.node(1).nbd;
    let nvram = pair.nvram(1);
    let before_the_writes = std::fs::read(&nvram).expect("node 1's NVRAM");
    let mut acked = ledger("vol0", 0, 512);
    write_some(nbd1, &mut acked, 1, 150);

    pair.node(1).kill9();
    std::fs::write(&nvram, &before_the_writes).expect("the NVRAM as a power loss leaves it");
    pair.node(1).start(START).expect("node 1 restarts");
    wait_for(
        "node 1 to serve its volumes again",
        Duration::from_secs(60),
        || state(&mut pair, 1) == Some(Role::Serving) && !holding(&mut pair, 2),
    );
    verify(nbd1, &acked);
    let log = pair.node(1).log();
    assert!(
        log.contains("unclean"),
        "node 1 says why it did not recover from its own log:\n{log}"
    );
}

/// The same unclean restart while the partner is down too: nothing can take
/// over from its mirror. The machine did not restart (the process was
/// killed), so the NVRAM kept every write: once the failure detector says
/// the partner is down, the node recovers from its own log by itself.
/// (After a machine restart it would wait for the partner or the operator:
/// `node_inprocess` `a_node_handing_over_after_a_machine_restart_waits_until_forced`.)
#[test]
fn an_unclean_restart_with_the_partner_down_recovers_from_the_nvram_it_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pair = pair(dir.path(), "", "auto_takeover = false\n");
    let nbd1 = pair.node(1).nbd;
    let mut acked = ledger("vol0", 0, 256);
    write_some(nbd1, &mut acked, 1, 50);
    pair.node(2).kill9();
    pair.node(1).kill9();

    pair.node(1).start(START).expect("node 1 restarts");
    let (code, body) = pair.node(1).admin_post("/recover").expect("recover");
    assert_eq!(code, 400, "recover without force: {body}");
    wait_for("node 1 to serve again", Duration::from_secs(30), || {
        state(&mut pair, 1) == Some(Role::Serving)
    });
    verify(nbd1, &acked);
    let log = pair.node(1).log();
    assert!(
        log.contains("asking the partner to take over") && log.contains("NVRAM kept every write"),
        "node 1 says what it did:\n{log}"
    );
}

/// A node that loses the shared storage (here its path to the aggregate
/// goes away; the partner's stays) cannot write its mailbox. It must not
/// keep its volumes by heartbeating on the interconnect while it
/// acknowledges nothing: it fails, leaves the pair, and the partner takes
/// over from its mirror with every acknowledged write.
#[test]
fn a_node_that_loses_the_shared_storage_leaves_the_pair_and_is_taken_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pair = PairHarness::configure(PairSpec {
        dir: dir.path().to_owned(),
        volumes: vec![("vol0".into(), VOLUME_BYTES)],
        half_bytes: 8 << 20,
        extra_config: String::new(),
        ha_config: String::new(),
        binary: Some(env!("CARGO_BIN_EXE_nvmirror").into()),
        transport: "tcp".into(),
    })
    .expect("configure the pair");
    let aggregate = pair.aggregate();
    std::fs::create_dir_all(&aggregate).expect("aggregate");
    let node1_path = dir.path().join("node1-path-to-the-aggregate");
    std::os::unix::fs::symlink(&aggregate, &node1_path).expect("symlink");
    for (node, from, to) in [
        (
            1,
            format!("aggregate_dir = \"{}\"", aggregate.display()),
            format!("aggregate_dir = \"{}\"", node1_path.display()),
        ),
        (
            2,
            "name = \"vol0\"".to_owned(),
            "name = \"vol2\"".to_owned(),
        ),
    ] {
        let path = pair.node(node).config_path.clone();
        let text = std::fs::read_to_string(&path).expect("config");
        assert!(text.contains(&from), "{text}");
        std::fs::write(&path, text.replace(&from, &to)).expect("config");
    }
    for node in [1, 2] {
        pair.node(node).start(START).expect("start node");
    }
    pair.wait_in_sync(1, START).expect("node 1 in sync");
    let nbd1 = pair.node(1).nbd;
    let mut acked = ledger("vol0", 0, 256);
    write_some(nbd1, &mut acked, 1, 50);

    std::fs::remove_file(&node1_path).expect("node 1 loses the shared storage");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !holding(&mut pair, 2) {
        assert!(
            Instant::now() < deadline,
            "node 2 did not take over\nnode 1:\n{}\nnode 2:\n{}",
            pair.node(1).log(),
            pair.node(2).log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    verify(pair.node(2).nbd, &acked);
    let status = pair
        .node(1)
        .status()
        .expect("node 1 answers its admin endpoint");
    let failure = status.failure.expect("node 1 says it failed");
    assert!(failure.contains("mailbox"), "{failure}");
    let log = pair.node(1).log();
    assert!(log.contains("leaves the pair"), "{log}");
}

/// A node that asked its partner to take over and restarts before the
/// giveback still gets its volumes back as soon as the replay ends, though
/// `auto_giveback_delay_ms` is not set: the request carries over from one
/// start to the next.
#[test]
fn a_handover_survives_a_restart_of_the_node_that_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A slow replay, so node 1 restarts while it runs.
    let mut pair = pair(
        dir.path(),
        "[consistency_point]\ninterval_ms = 600000\nthreshold_percent = 95\n",
        "auto_takeover = false\nreplay_max_bytes_per_s = \"256KiB\"\n",
    );
    let nbd1 = pair.node(1).nbd;
    let mut acked = ledger("vol0", 0, 1024);
    write_some(nbd1, &mut acked, 1, 200);
    pair.node(1).kill9();
    pair.node(1).start(START).expect("node 1 restarts");
    wait_for(
        "node 2 to take over, asked",
        Duration::from_secs(15),
        || holding(&mut pair, 2),
    );
    assert!(
        pair.node(2).status().is_ok_and(|s| s.replay.active),
        "the replay still runs"
    );
    pair.node(1).kill9();
    pair.node(1).start(START).expect("node 1 restarts again");
    wait_for("node 1 to serve again", Duration::from_secs(60), || {
        state(&mut pair, 1) == Some(Role::Serving) && !holding(&mut pair, 2)
    });
    verify(nbd1, &acked);
}

/// `ha.fence_command` for both nodes: SIGKILL the partner, whose PID the
/// test writes to `node<N>.pid` (a power switch in a real pair).
fn kill_the_partner_command(dir: &Path) -> String {
    format!(
        "fence_command = \"kill -9 $(cat {}/node$NVMIRROR_PARTNER.pid)\"\n",
        dir.display()
    )
}

#[test]
fn a_stalled_owner_is_powered_off_before_its_volumes_are_taken_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pair = pair(dir.path(), "", &kill_the_partner_command(dir.path()));
    let pid = pair.node(1).pid().expect("node 1 runs");
    std::fs::write(dir.path().join("node1.pid"), pid.to_string()).expect("pid file");
    let nbd1 = pair.node(1).nbd;
    let mut written = ledger("vol0", 0, 256);
    write_some(nbd1, &mut written, 1, 100);

    // Stalled, as a node between its fence check and its write would be:
    // without the fence command it would wake up later and go on.
    pair.node(1).signal(Signal::SIGSTOP).expect("SIGSTOP");
    wait_for("node 2 to take over", Duration::from_secs(20), || {
        holding(&mut pair, 2)
    });
    let status = pair.node(1).wait_exit(Duration::from_secs(5));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.and_then(|status| status.signal()),
        Some(libc::SIGKILL),
        "node 1 was powered off (SIGKILL) by the fence command before the takeover"
    );
    let nbd2 = pair.node(2).nbd;
    verify(nbd2, &written);
    write_some(nbd2, &mut written, 2, 50);
    verify(nbd2, &written);
    let log = pair.node(2).log();
    assert!(
        log.contains("the fence command says the partner is off"),
        "node 2 logs the power fence:\n{log}"
    );
}

#[test]
fn a_failing_fence_command_refuses_the_takeover_until_an_operator_forces_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pair = pair(
        dir.path(),
        "",
        "fence_command = \"echo no power switch >&2; exit 3\"\n",
    );
    let nbd1 = pair.node(1).nbd;
    let mut written = ledger("vol0", 0, 256);
    write_some(nbd1, &mut written, 1, 100);

    pair.node(1).signal(Signal::SIGSTOP).expect("SIGSTOP");
    wait_for(
        "node 2 to refuse the takeover",
        Duration::from_secs(20),
        || takeover_refused_because(&mut pair, 2, "could not confirm node 1 is off"),
    );
    // Refused, so node 1 keeps its volumes: it resumes and serves on.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !holding(&mut pair, 2),
        "a takeover without a confirmed power-off"
    );
    pair.node(1).signal(Signal::SIGCONT).expect("SIGCONT");
    write_some(nbd1, &mut written, 2, 50);
    verify(nbd1, &written);

    // Stalled again; the operator vouches it is off and forces.
    pair.node(1).signal(Signal::SIGSTOP).expect("SIGSTOP");
    wait_for("node 2 to see node 1 down", Duration::from_secs(20), || {
        takeover_refused_because(&mut pair, 2, "could not confirm")
    });
    let (code, body) = pair
        .node(2)
        .admin_post("/takeover?force=true")
        .expect("admin");
    assert_eq!(code, 200, "{body}");
    let nbd2 = pair.node(2).nbd;
    verify(nbd2, &written);
    pair.node(1).kill9();
}
