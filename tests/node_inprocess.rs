//! Two nodes in one process over real TCP on loopback, with real files:
//! the write path, mirroring, out-of-sync marking, resync, recovery.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use interconnect::{
    Completions, ControlEvent, ControlMessage, SharedMemory, Transport, TransportLimits,
    WorkRequest,
};
use nvlog::{Geometry, Region};
use nvmirror::clock::SystemClock;
use nvmirror::config::Config;
use nvmirror::daemon::RunningNode;
use nvmirror::ha::{HaNode, HaOptions, ReplayDriver};
use nvmirror::mirror::transport::{Interconnect, MirrorListener, NetworkInterconnect};
use nvmirror::mirror::Link;
use nvmirror::node::{random_boot_id, read_host_boot, Environment, Node};
use nvmirror::storage::disk::FileDisks;
use nvmirror::testing::harness::same_log;
use parking_lot::Mutex;

fn free_port() -> u16 {
    nvmirror::testing::harness::free_port().expect("a free port")
}

struct Ports {
    ic: [u16; 2],
    nbd: [u16; 2],
}

fn config(root: &Path, node_id: u32, ports: &Ports) -> Config {
    config_with(root, node_id, ports, "")
}

/// The test config with `extra` TOML appended (its own tables).
fn config_with(root: &Path, node_id: u32, ports: &Ports, extra: &str) -> Config {
    let me = (node_id - 1) as usize;
    let text = format!(
        r#"
node_id = {node_id}
data_dir = "{root}/node{node_id}"
aggregate_dir = "{root}/aggregate"
[nvram]
half_size = "256KiB"
[nbd]
listen = "127.0.0.1:{nbd}"
[[volume]]
name = "n{node_id}vol0"
size = "4MiB"
[[volume]]
name = "n{node_id}vol1"
size = "1MiB"
[interconnect]
listen = "127.0.0.1:{listen}"
partner = "127.0.0.1:{partner}"
key = "an inprocess test key of some length"
heartbeat_interval_ms = 50
heartbeat_timeout_ms = 1000
[consistency_point]
interval_ms = 200
{extra}
"#,
        root = root.display(),
        nbd = ports.nbd[me],
        listen = ports.ic[me],
        partner = ports.ic[1 - me],
    );
    Config::parse(&text).expect("valid config")
}

/// A node in this process with no thread of its own: the test steps it
/// (connector rounds, monitor ticks) and holds its interconnect events,
/// which nothing handles unless the test does.
fn node_by_hand(
    config: &Config,
    interconnect: Arc<dyn Interconnect>,
    host_boot: String,
) -> (
    Arc<Node>,
    Arc<HaNode>,
    crossbeam_channel::Receiver<ControlEvent>,
) {
    let environment = Environment {
        clock: Arc::new(SystemClock),
        disks: Arc::new(FileDisks),
        interconnect,
        boot: random_boot_id(),
        host_boot,
    };
    std::fs::create_dir_all(&config.data_dir).expect("data dir");
    let region = Arc::new(
        Region::open(
            &config.nvram_path(),
            config.node_id,
            Geometry::new(config.nvram.half_size.0).expect("geometry"),
        )
        .expect("nvram"),
    );
    let (node, events) = Node::open(config.clone(), region, environment).expect("node");
    let ha = HaNode::start(
        node.clone(),
        HaOptions {
            replay: ReplayDriver::Caller,
            partner_service: None,
            verify_warm_index: true,
        },
    )
    .expect("HA");
    (node, ha, events)
}

fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as usize * 31 + i * 7 % 253) as u8)
        .collect()
}

#[test]
fn pair_mirrors_marks_out_of_sync_and_resyncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = Ports {
        ic: [free_port(), free_port()],
        nbd: [free_port(), free_port()],
    };
    let a = RunningNode::start(config(dir.path(), 1, &ports)).expect("node 1");
    let b = RunningNode::start(config(dir.path(), 2, &ports)).expect("node 2");
    let a_inner = a.node().clone();
    wait_for("node 1 in sync", Duration::from_secs(10), || {
        a_inner.link() == Link::InSync
    });
    let aggregate = dir.path().join("aggregate");
    let mailbox = || {
        nvmirror::storage::mailbox::read(&aggregate, 1)
            .expect("mailbox")
            .expect("written")
    };
    assert!(mailbox().mirror_in_sync);
    let vols = a_inner.volumes();

    // Writes of many sizes, some unaligned, across both volumes.
    let mut expected = [vec![0u8; 4 << 20], vec![0u8; 1 << 20]];
    for i in 0..200u64 {
        let volume = (i % 2) as usize;
        let len = [512usize, 4096, 777, 65536, 100_000][i as usize % 5];
        let offset = (i * 7919 * 512) % (expected[volume].len() as u64 - len as u64);
        let data = pattern(i, len);
        a_inner
            .write(&vols[volume], offset, &data, i % 10 == 0)
            .expect("write");
        expected[volume][offset as usize..offset as usize + len].copy_from_slice(&data);
    }
    a_inner
        .write_zeroes(&vols[0], 4096, 8192, false, false)
        .expect("zeroes");
    expected[0][4096..4096 + 8192].fill(0);
    a_inner
        .write_zeroes(&vols[0], 65536, 4096, true, false)
        .expect("trim");
    expected[0][65536..65536 + 4096].fill(0);
    for (volume, bytes) in expected.iter().enumerate() {
        let mut read = vec![0u8; bytes.len()];
        a_inner.read(&vols[volume], 0, &mut read).expect("read");
        assert!(read == *bytes, "volume {volume} reads back differently");
    }
    assert!(
        a_inner
            .stats
            .acks_mirrored
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );

    // The partner's mirror holds the live log: its header and records (a
    // resync in between copies only the live ranges, so bytes past them
    // may differ).
    let local = a_inner.region.snapshot(a_inner.region.local_log());
    let b_inner = b.node().clone();
    wait_for("mirror to match", Duration::from_secs(5), || {
        a_inner.log.with_order_lock(|| {
            same_log(
                &a_inner.region.snapshot(a_inner.region.local_log()),
                &b_inner.region.snapshot(b_inner.region.mirror()),
            )
        })
    });
    assert_eq!(local.len() as u64, a_inner.region.local_log().len);

    // Partner down (a clean stop: after a crash it would hand its volumes
    // over to node 1 when it comes back, see `tests/ha_failover.rs`): writes
    // still succeed and the mailbox says out of sync.
    b.shutdown().expect("node 2 stops");
    drop(b);
    a_inner
        .write(&vols[0], 0, &pattern(9999, 4096), false)
        .expect("write with the partner down");
    expected[0][..4096].copy_from_slice(&pattern(9999, 4096));
    let state = mailbox();
    assert!(
        !state.mirror_in_sync,
        "out of sync after an unmirrored write"
    );
    assert!(state.out_of_sync_reason.is_some());

    // Partner back: in sync again, and its mirror matches.
    let b = RunningNode::start(config(dir.path(), 2, &ports)).expect("node 2 again");
    wait_for("node 1 in sync again", Duration::from_secs(10), || {
        a_inner.link() == Link::InSync
    });
    assert!(mailbox().mirror_in_sync);
    let b_inner = b.node().clone();
    a_inner
        .write(&vols[1], 512, &pattern(7, 3000), false)
        .expect("write");
    expected[1][512..3512].copy_from_slice(&pattern(7, 3000));
    // The restarted partner's mirror still holds bytes from before past the
    // live ranges the resync copied; compare header and records.
    wait_for(
        "mirror to match after resync",
        Duration::from_secs(5),
        || {
            a_inner.log.with_order_lock(|| {
                same_log(
                    &a_inner.region.snapshot(a_inner.region.local_log()),
                    &b_inner.region.snapshot(b_inner.region.mirror()),
                )
            })
        },
    );
    a.shutdown().expect("clean shutdown");
    drop(a);

    // Restart node 1: everything reads back from the volume files.
    let a = RunningNode::start(config(dir.path(), 1, &ports)).expect("node 1 again");
    for (volume, bytes) in expected.iter().enumerate() {
        let mut read = vec![0u8; bytes.len()];
        a.node()
            .read(&a.node().volumes()[volume], 0, &mut read)
            .expect("read");
        assert!(read == *bytes, "volume {volume} lost data across a restart");
    }
    b.shutdown().expect("shutdown");
    a.shutdown().expect("shutdown");
}

#[test]
fn out_of_range_and_bad_volume_sizes_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = Ports {
        ic: [free_port(), free_port()],
        nbd: [free_port(), free_port()],
    };
    let a = RunningNode::start(config(dir.path(), 1, &ports)).expect("node 1");
    let inner = a.node().clone();
    let vols = inner.volumes();
    assert!(inner
        .write(&vols[1], (1 << 20) - 100, &[1; 200], false)
        .is_err());
    let mut buf = [0u8; 10];
    assert!(inner.read(&vols[1], 1 << 20, &mut buf).is_err());
    assert!(inner
        .write_zeroes(&vols[0], u64::MAX - 5, 10, false, false)
        .is_err());
    a.shutdown().expect("shutdown");
    drop(a);
    // A volume file whose size disagrees with the config is refused.
    let mut bigger = config(dir.path(), 1, &ports);
    bigger.volumes[1].size = nvmirror::config::ByteSize(2 << 20);
    let error = RunningNode::start(bigger).expect_err("size mismatch");
    assert!(error.to_string().contains("configured with"), "{error}");
}

/// Dials through the network, after running a closure once (the test's
/// way into the window between reading the partner's mailbox and dialing).
struct DialAfter {
    network: NetworkInterconnect,
    before_dial: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl std::fmt::Debug for DialAfter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DialAfter").finish_non_exhaustive()
    }
}

impl Interconnect for DialAfter {
    fn connect(
        &self,
        partner: SocketAddr,
        local_log: SharedMemory,
        events: Sender<ControlEvent>,
    ) -> nvmirror::Result<Arc<dyn Transport>> {
        if let Some(before_dial) = self.before_dial.lock().take() {
            before_dial();
        }
        self.network.connect(partner, local_log, events)
    }

    fn listen(
        &self,
        addr: SocketAddr,
        mirror: SharedMemory,
        events: Sender<ControlEvent>,
    ) -> nvmirror::Result<Box<dyn MirrorListener>> {
        self.network.listen(addr, mirror, events)
    }
}

/// The mirror is declared in sync with the start of the partner that
/// accepted the session, even when the partner (re)starts while we dial:
/// a stale boot there makes every later takeover refuse the mirror.
#[test]
fn in_sync_names_the_boot_of_the_partner_that_accepted_the_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = Ports {
        ic: [free_port(), free_port()],
        nbd: [free_port(), free_port()],
    };
    let config1 = config(dir.path(), 1, &ports);
    let partner = Arc::new(Mutex::new(None::<RunningNode>));
    let before_dial: Box<dyn FnOnce() + Send> = {
        let partner = partner.clone();
        let config2 = config(dir.path(), 2, &ports);
        // The partner's first start: no mailbox when node 1 looked.
        Box::new(move || *partner.lock() = Some(RunningNode::start(config2).expect("node 2")))
    };
    let interconnect = Arc::new(DialAfter {
        network: NetworkInterconnect::from_config(&config1).expect("interconnect"),
        before_dial: Mutex::new(Some(before_dial)),
    });
    let (node, _ha, _events) = node_by_hand(&config1, interconnect, read_host_boot());
    assert_eq!(node.mirror.connect_once(&node.log), Some(true));
    let aggregate = &config1.aggregate_dir;
    let partner_boot = nvmirror::storage::mailbox::read(aggregate, 2)
        .expect("node 2's mailbox")
        .expect("written")
        .boot;
    let mine = node.mailbox.current();
    assert!(mine.mirror_in_sync);
    assert_eq!(mine.in_sync_with_boot, Some(partner_boot));
    node.stop();
    let partner = partner.lock().take().expect("node 2 started");
    partner.shutdown().expect("node 2 stops");
}

/// A node that has started before (its mailbox says so) and finds its
/// NVRAM file missing, blank or truncated refuses to start: formatting it
/// afresh would serve without the writes its log held (and a resync would
/// copy the empty log over the partner's mirror of it).
#[test]
fn a_node_that_lost_its_nvram_refuses_to_format_it_afresh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = Ports {
        ic: [free_port(), free_port()],
        nbd: [free_port(), free_port()],
    };
    let config = config(dir.path(), 1, &ports);
    let node = RunningNode::start(config.clone()).expect("first start");
    node.shutdown().expect("clean stop");
    drop(node);
    let nvram = config.nvram_path();
    let full_len = std::fs::metadata(&nvram).expect("nvram").len();
    let saved = std::fs::read(&nvram).expect("read nvram");
    for how in ["missing", "blank", "truncated"] {
        std::fs::write(&nvram, &saved).expect("restore");
        match how {
            "missing" => std::fs::remove_file(&nvram).expect("remove"),
            "blank" => std::fs::write(&nvram, vec![0u8; full_len as usize]).expect("blank"),
            _ => std::fs::OpenOptions::new()
                .write(true)
                .open(&nvram)
                .and_then(|file| file.set_len(full_len / 3))
                .expect("truncate"),
        }
        let error = RunningNode::start(config.clone())
            .expect_err(&format!("a {how} NVRAM file is not formatted afresh"));
        let message = error.to_string();
        assert!(
            message.contains("has started before") && message.contains("mailbox"),
            "{how}: {message}"
        );
    }
    // Put back, it starts again.
    std::fs::write(&nvram, &saved).expect("restore");
    let node = RunningNode::start(config.clone()).expect("start with its NVRAM back");
    node.shutdown().expect("clean stop");
    drop(node);
    // Once the partner holds its volumes, its log is discarded at the
    // giveback anyway: a blank one is formatted, and it waits.
    let aggregate = &config.aggregate_dir;
    let own = nvmirror::storage::ownership::read(aggregate, 1).expect("owner file");
    nvmirror::storage::ownership::change_hands(aggregate, &own, 2, false, false, "test")
        .expect("hand over");
    std::fs::remove_file(&nvram).expect("remove");
    let node =
        RunningNode::start(config).expect("a blank NVRAM while the partner holds the volumes");
    assert_eq!(node.ha().role(), nvmirror::ha::Role::WaitingForGiveback);
    drop(node);
}

/// A giveback hands back only volumes whose newest blocks have left the
/// survivor's log: the partner reads only the volume files, and discards
/// its own log. Reservations of writes to the survivor's own volumes (held
/// here by hand) can keep the filling half from closing; the giveback then
/// refuses, the volumes stay served here, and a later one succeeds.
#[test]
fn a_giveback_waits_until_the_partners_blocks_have_left_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = Ports {
        ic: [free_port(), free_port()],
        nbd: [free_port(), free_port()],
    };
    let manual = "[ha]\nauto_takeover = false\n";
    let a = RunningNode::start(config_with(dir.path(), 1, &ports, manual)).expect("node 1");
    let b = RunningNode::start(config(dir.path(), 2, &ports)).expect("node 2");
    wait_for("node 1 in sync", Duration::from_secs(10), || {
        a.node().link() == Link::InSync
    });
    b.shutdown().expect("node 2 stops");
    drop(b);
    a.ha()
        .takeover(false, "test: node 2 stopped")
        .expect("takeover");
    let theirs = a
        .node()
        .volumes()
        .into_iter()
        .find(|volume| volume.name == "n2vol0")
        .expect("node 2's vol0 served by node 1");
    let data = pattern(42, 4096);
    a.node()
        .write(&theirs, 8192, &data, false)
        .expect("write to node 2's volume");

    // More than a half's worth of log space held, as writers waiting to
    // append would hold it.
    let log = &a.node().log;
    let half_len = log.status().half_len;
    let mut held = Vec::new();
    let mut held_bytes = 0;
    while held_bytes <= half_len {
        let reservation = log.try_reserve(4096).expect("log space");
        held_bytes += reservation.len_bytes();
        held.push(reservation);
    }
    let refused = a
        .ha()
        .giveback()
        .expect_err("a giveback with node 2's block only in node 1's log");
    assert!(
        matches!(
            refused,
            nvmirror::error::Error::Refused(nvmirror::error::Refusal::LogNotFlushed {
                partner: 2,
                ..
            })
        ),
        "{refused}"
    );
    a.node()
        .write(&theirs, 0, &pattern(43, 512), false)
        .expect("still served, and written, after the refusal");

    drop(held);
    a.ha().giveback().expect("giveback");
    a.shutdown().expect("node 1 stops");
    drop(a);
    let b = RunningNode::start(config(dir.path(), 2, &ports)).expect("node 2 again");
    assert_eq!(b.ha().role(), nvmirror::ha::Role::Serving);
    let vol0 = b.node().volumes()[0].clone();
    let mut read = vec![0u8; 4096];
    b.node().read(&vol0, 8192, &mut read).expect("read");
    assert!(
        read == data,
        "node 2 lost the block written while node 1 held its volumes"
    );
    let mut read = vec![0u8; 512];
    b.node().read(&vol0, 0, &mut read).expect("read");
    assert!(
        read == pattern(43, 512),
        "node 2 lost the write made after the refusal"
    );
    b.shutdown().expect("node 2 stops");
}

/// A write waiting for log space when its volume is fenced (consistency
/// points stop once it is, so the space would not come) fails with the
/// fence's error instead of waiting on, and appends nothing. Else, given
/// the space when the giveback's return discards the log, it would append
/// a stale record to the fresh log.
#[test]
fn a_write_waiting_for_log_space_fails_when_its_volume_is_fenced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = Ports {
        ic: [free_port(), free_port()],
        nbd: [free_port(), free_port()],
    };
    let config = config(dir.path(), 1, &ports);
    // No consistency-point thread: nothing frees the log.
    let interconnect = Arc::new(NetworkInterconnect::from_config(&config).expect("interconnect"));
    let (node, _ha, _events) = node_by_hand(&config, interconnect, read_host_boot());
    let volume = node.volumes()[0].clone();
    let block = pattern(5, 4096);
    let mut offset = 0;
    while node.log.try_reserve(block.len()).is_ok() {
        node.write(&volume, offset, &block, false).expect("write");
        offset += block.len() as u64;
    }
    let last_lsn = node.log.last_lsn();

    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let writer = {
        let node = node.clone();
        let volume = volume.clone();
        std::thread::spawn(move || {
            let _ = done_tx.send(node.write(&volume, 0, &pattern(6, 4096), false));
        })
    };
    assert!(
        done_rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the write waits for log space"
    );
    volume.fence.trip();
    let result = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the waiting write gave up once its volume was fenced");
    assert!(
        matches!(result, Err(nvmirror::error::Error::Fenced { .. })),
        "{result:?}"
    );
    assert_eq!(node.log.last_lsn(), last_lsn, "nothing appended");
    assert_eq!(node.log.status().reserved_bytes, 0);
    writer.join().expect("writer");
    node.stop();
}

/// Each start has a boot identity no earlier start had, even when the
/// mailbox that recorded the earlier ones is lost: the partner's "in sync
/// with boot N" must never vouch for a later start, which may have lost
/// what was mirrored to it.
#[test]
fn every_start_has_a_boot_identity_of_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = Ports {
        ic: [free_port(), free_port()],
        nbd: [free_port(), free_port()],
    };
    let config = config(dir.path(), 1, &ports);
    let mailbox = nvmirror::storage::mailbox::mailbox_path(&config.aggregate_dir, 1);
    let mut seen = std::collections::HashSet::new();
    for start in 0..4 {
        let node = RunningNode::start(config.clone()).expect("start");
        let boot = node.node().mailbox.current().boot;
        assert!(seen.insert(boot), "start {start} reused boot {boot}");
        node.shutdown().expect("clean stop");
        drop(node);
        if start % 2 == 1 {
            std::fs::remove_file(&mailbox).expect("lose the mailbox");
        }
    }
}

/// When its volumes come back, a node discards its log; until a resync
/// copies the new one, the partner's mirror holds the old log, which the
/// partner replayed already. The mailbox must say "out of sync" by then, or
/// a takeover in that window would replay older blocks over newer ones.
#[test]
fn volumes_given_back_leave_the_mirror_out_of_sync_until_a_resync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = Ports {
        ic: [free_port(), free_port()],
        nbd: [free_port(), free_port()],
    };
    let manual = "[ha]\nauto_takeover = false\nmailbox_interval_ms = 50\n";
    let a = RunningNode::start(config_with(dir.path(), 1, &ports, manual)).expect("node 1");
    let b = RunningNode::start(config_with(dir.path(), 2, &ports, manual)).expect("node 2");
    wait_for("both in sync", Duration::from_secs(10), || {
        a.node().link() == Link::InSync && b.node().link() == Link::InSync
    });
    let vol0 = b.node().volumes()[0].clone();
    b.node()
        .write(&vol0, 0, &pattern(1, 4096), false)
        .expect("write");
    a.ha()
        .takeover(false, "test: planned takeover")
        .expect("takeover");
    wait_for("node 2 fenced", Duration::from_secs(10), || {
        b.ha().role() == nvmirror::ha::Role::Fenced
    });
    // No resync can follow the giveback for a while.
    b.ha().cut_interconnect(Duration::from_secs(60));
    a.ha().giveback().expect("giveback");
    wait_for("node 2 serving again", Duration::from_secs(10), || {
        b.ha().role() == nvmirror::ha::Role::Serving
    });
    let mailbox = b.node().mailbox.current();
    assert!(
        !mailbox.mirror_in_sync,
        "node 2 discarded its log, and its mailbox still vouches for the old mirror"
    );
    let reason = mailbox.out_of_sync_reason.unwrap_or_default();
    assert!(reason.contains("discarded its log"), "{reason}");
    a.shutdown().expect("node 1 stops");
    b.shutdown().expect("node 2 stops");
}

/// An interconnect whose sessions the test can fail by hand, the way a
/// transport fails one: through the queue's completion handle, with the
/// link event left for whoever handles events (here: nobody).
/// Its first write waits for the test (`first_post`: the test hears when
/// it is there, and says when it may go on).
#[derive(Debug)]
struct FailOnRequest {
    network: NetworkInterconnect,
    completions: Arc<Mutex<Option<Completions>>>,
    first_post: Arc<Mutex<Option<FirstPost>>>,
}

#[derive(Debug)]
struct FirstPost {
    arrived: Sender<()>,
    go_on: crossbeam_channel::Receiver<()>,
}

#[derive(Debug)]
struct KeepsCompletions {
    inner: Arc<dyn Transport>,
    completions: Arc<Mutex<Option<Completions>>>,
    first_post: Arc<Mutex<Option<FirstPost>>>,
}

impl Transport for KeepsCompletions {
    fn limits(&self) -> TransportLimits {
        self.inner.limits()
    }
    fn session(&self) -> u64 {
        self.inner.session()
    }
    fn attach(&self, completions: Completions) {
        *self.completions.lock() = Some(completions.clone());
        self.inner.attach(completions)
    }
    fn post_write(&self, request: WorkRequest) {
        if let Some(first) = self.first_post.lock().take() {
            let _ = first.arrived.send(());
            let _ = first.go_on.recv_timeout(Duration::from_secs(10));
        }
        self.inner.post_write(request)
    }
    fn send_control(&self, message: &ControlMessage) -> Result<(), interconnect::Error> {
        self.inner.send_control(message)
    }
    fn close(&self) {
        self.inner.close()
    }
}

impl Interconnect for FailOnRequest {
    fn connect(
        &self,
        partner: SocketAddr,
        local_log: SharedMemory,
        events: Sender<ControlEvent>,
    ) -> nvmirror::Result<Arc<dyn Transport>> {
        Ok(Arc::new(KeepsCompletions {
            inner: self.network.connect(partner, local_log, events)?,
            completions: self.completions.clone(),
            first_post: self.first_post.clone(),
        }))
    }

    fn listen(
        &self,
        addr: SocketAddr,
        mirror: SharedMemory,
        events: Sender<ControlEvent>,
    ) -> nvmirror::Result<Box<dyn MirrorListener>> {
        self.network.listen(addr, mirror, events)
    }
}

/// A resync declares the mirror in sync only on a session that still
/// stands. The link turns Down only when the failure's event is handled;
/// a session that fails after the copy was placed, before that, must not
/// be declared in sync: a write posted to it after the copy may have been
/// acknowledged on local persistence alone, with "out of sync" in the
/// mailbox, and the declaration would cover it up.
#[test]
fn a_resync_does_not_declare_a_failed_session_in_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = Ports {
        ic: [free_port(), free_port()],
        nbd: [free_port(), free_port()],
    };
    let partner = RunningNode::start(config(dir.path(), 2, &ports)).expect("node 2");
    let config1 = config(dir.path(), 1, &ports);
    let completions = Arc::new(Mutex::new(None));
    let (arrived_tx, arrived) = crossbeam_channel::bounded(1);
    let (go_on, go_on_rx) = crossbeam_channel::bounded(1);
    let interconnect = Arc::new(FailOnRequest {
        network: NetworkInterconnect::from_config(&config1).expect("interconnect"),
        completions: completions.clone(),
        first_post: Arc::new(Mutex::new(Some(FirstPost {
            arrived: arrived_tx,
            go_on: go_on_rx,
        }))),
    });
    // The interconnect's events are never handled: the link stays as the
    // resync set it.
    let (node, _ha, _events) = node_by_hand(&config1, interconnect, read_host_boot());
    let resync = {
        let node = node.clone();
        std::thread::spawn(move || node.mirror.connect_once(&node.log))
    };
    arrived
        .recv_timeout(Duration::from_secs(10))
        .expect("the resync's first write");
    assert_eq!(node.link(), Link::Resyncing);
    // Under the order lock, as a write appended after the copy would be:
    // the copy is placed, then the session fails.
    node.log.with_order_lock(|| {
        go_on.send(()).expect("the resync waits");
        wait_for("the copy to be placed", Duration::from_secs(10), || {
            node.mirror
                .resync_progress()
                .is_some_and(|p| p.total_bytes > 0 && p.placed_bytes == p.total_bytes)
        });
        completions
            .lock()
            .as_ref()
            .expect("attached")
            .failed(interconnect::Error::InvalidConfig {
                reason: "the test failed this session by hand".into(),
            });
    });
    let outcome = resync.join().expect("resync thread");
    let mailbox = node.mailbox.current();
    assert!(
        !mailbox.mirror_in_sync,
        "declared in sync on a failed session (connect_once: {outcome:?})"
    );
    assert_eq!(outcome, Some(false));
    node.stop();
    partner.shutdown().expect("node 2 stops");
}

/// After an unclean stop with its mirror in sync, a node whose machine has
/// restarted since (a power loss may have taken what was not persisted)
/// and whose partner cannot take over serves nothing and says why, until
/// the operator forces it to recover from its own log.
#[test]
fn a_node_handing_over_after_a_machine_restart_waits_until_forced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = Ports {
        ic: [free_port(), free_port()],
        nbd: [free_port(), free_port()],
    };
    let quick = "[ha]\nauto_takeover = false\nmailbox_interval_ms = 50\nmailbox_timeout_ms = 300\n";
    let config1 = config_with(dir.path(), 1, &ports, quick);
    let a = RunningNode::start(config1.clone()).expect("node 1");
    let b = RunningNode::start(config(dir.path(), 2, &ports)).expect("node 2");
    wait_for("node 1 in sync", Duration::from_secs(10), || {
        a.node().link() == Link::InSync
    });
    let vol0 = a.node().volumes()[0].clone();
    a.node()
        .write(&vol0, 0, &pattern(3, 4096), false)
        .expect("a mirrored write");
    // Both stop without the clean-stop record: node 2 first, so node 1's
    // mailbox still says its mirror was in sync.
    drop(b);
    drop(a);

    // Started twice in the later boot: the first start hands over and
    // crashes; the second must not take the unchanged machine boot for
    // proof that the log is whole (the first one never served from it).
    let start = |config: Config| {
        let interconnect =
            Arc::new(NetworkInterconnect::from_config(&config).expect("interconnect"));
        let (node, ha, _events) = node_by_hand(
            &config,
            interconnect,
            "a later boot of this machine".to_owned(),
        );
        assert_eq!(ha.role(), nvmirror::ha::Role::HandingOver);
        assert!(node.mailbox.current().asks_takeover);
        assert!(
            node.volumes().is_empty(),
            "a node handing over serves nothing"
        );
        // Past the failure detector's timeouts: node 2 is down.
        ha.monitor_tick().expect("monitor");
        std::thread::sleep(Duration::from_millis(1200));
        ha.monitor_tick().expect("monitor");
        assert_eq!(ha.role(), nvmirror::ha::Role::HandingOver);
        let why = ha.status().handing_over_because.expect("says why");
        assert!(why.contains("this machine restarted"), "{why}");
        (node, ha)
    };
    let (node, ha) = start(config1.clone());
    node.stop();
    drop(ha);
    drop(node);
    let (node, ha) = start(config1);

    let message = ha.recover_forced().expect("forced recovery");
    assert!(message.contains("lost"), "{message}");
    assert_eq!(ha.role(), nvmirror::ha::Role::Serving);
    assert!(!node.mailbox.current().asks_takeover);
    let vol0 = node.volumes()[0].clone();
    let mut read = vec![0u8; 4096];
    node.read(&vol0, 0, &mut read).expect("read");
    assert!(read == pattern(3, 4096), "its own log had the write");
    let refused = ha.recover_forced().expect_err("only while handing over");
    assert!(refused.to_string().contains("serving"), "{refused}");
    node.stop();
}

/// The survivor indexes its partner's mirror while the partner is healthy:
/// a takeover checks that index against the mirror, scans only what landed
/// since the last pass, and serves every acknowledged write. (The takeover
/// also compares the result with a full scan: `verify_warm_index`.)
#[test]
fn a_takeover_serves_from_the_warm_index_and_scans_only_the_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = Ports {
        ic: [free_port(), free_port()],
        nbd: [free_port(), free_port()],
    };
    let manual =
        "[ha]\nauto_takeover = false\nmailbox_interval_ms = 50\nwarm_index_interval_ms = 5\n";
    let a = RunningNode::start(config_with(dir.path(), 1, &ports, manual)).expect("node 1");
    let b = RunningNode::start(config_with(dir.path(), 2, &ports, manual)).expect("node 2");
    wait_for("both in sync", Duration::from_secs(10), || {
        a.node().link() == Link::InSync && b.node().link() == Link::InSync
    });
    let vol0 = b.node().volumes()[0].clone();
    let blocks = 40u64;
    for block in 0..blocks - 3 {
        b.node()
            .write(&vol0, block * 4096, &pattern(block, 4096), false)
            .expect("write");
    }
    // Caught up: a pass after the writes found nothing new. (Node 2's
    // consistency points may have retired some or all of them since.)
    let passes_before = a.ha().status().warm_index.passes;
    wait_for(
        "node 1's warm index to catch up",
        Duration::from_secs(10),
        || {
            let warm = a.ha().status().warm_index;
            warm.passes > passes_before + 1 && warm.lag_records == 0
        },
    );
    // The last few may or may not be indexed when the takeover begins.
    for block in blocks - 3..blocks {
        b.node()
            .write(&vol0, block * 4096, &pattern(block, 4096), false)
            .expect("write");
    }
    a.ha()
        .takeover(false, "test: planned takeover")
        .expect("takeover");
    let last = a.ha().status().last_takeover.expect("a takeover");
    assert!(!last.cold, "the warm index was usable: {last:?}");
    assert!(
        last.tail_records <= 3,
        "scanned more than the tail: {last:?}"
    );
    let taken = a
        .node()
        .volumes()
        .into_iter()
        .find(|volume| volume.name == "n2vol0")
        .expect("node 2's volume served by node 1");
    for block in 0..blocks {
        let mut read = vec![0u8; 4096];
        a.node()
            .read(&taken, block * 4096, &mut read)
            .expect("read");
        assert!(
            read == pattern(block, 4096),
            "block {block} after the takeover"
        );
    }
    a.shutdown().expect("node 1 stops");
    b.shutdown().expect("node 2 stops");
}
