//! Two nodes in one process over real TCP on loopback, with real files:
//! the write path, mirroring, out-of-sync marking, resync, recovery.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use interconnect::{ControlEvent, SharedMemory, Transport};
use nvlog::{Geometry, Region};
use nvmirror::clock::SystemClock;
use nvmirror::config::Config;
use nvmirror::daemon::RunningNode;
use nvmirror::ha::{HaNode, HaOptions, ReplayDriver};
use nvmirror::mirror::transport::{Interconnect, MirrorListener, NetworkInterconnect};
use nvmirror::mirror::Link;
use nvmirror::node::{Environment, Node};
use nvmirror::storage::disk::FileDisks;
use nvmirror::testing::harness::same_log;
use parking_lot::Mutex;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

struct Ports {
    ic: [u16; 2],
    nbd: [u16; 2],
}

fn config(root: &Path, node_id: u32, ports: &Ports) -> Config {
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
name = "vol0"
size = "4MiB"
[[volume]]
name = "vol1"
size = "1MiB"
[interconnect]
listen = "127.0.0.1:{listen}"
partner = "127.0.0.1:{partner}"
key = "an inprocess test key of some length"
heartbeat_interval_ms = 50
heartbeat_timeout_ms = 1000
[consistency_point]
interval_ms = 200
"#,
        root = root.display(),
        nbd = ports.nbd[me],
        listen = ports.ic[me],
        partner = ports.ic[1 - me],
    );
    Config::parse(&text).expect("valid config")
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

    // Partner down: writes still succeed and the mailbox says out of sync.
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
    let environment = Environment {
        clock: Arc::new(SystemClock),
        disks: Arc::new(FileDisks),
        interconnect: Arc::new(DialAfter {
            network: NetworkInterconnect::from_config(&config1).expect("interconnect"),
            before_dial: Mutex::new(Some(before_dial)),
        }),
    };
    std::fs::create_dir_all(&config1.data_dir).expect("data dir");
    let region = Arc::new(
        Region::open(
            &config1.nvram_path(),
            1,
            Geometry::new(config1.nvram.half_size.0).expect("geometry"),
        )
        .expect("nvram"),
    );
    let (node, _events) = Node::open(config1.clone(), region, environment).expect("node 1");
    let _ha = HaNode::start(
        node.clone(),
        HaOptions {
            replay: ReplayDriver::Caller,
            partner_service: None,
        },
    )
    .expect("HA of node 1");
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
