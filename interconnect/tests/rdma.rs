//! RDMA transport tests, on real (or Soft-RoCE) devices.
//!
//! They skip, saying so, where no RDMA device exists. On a host whose kernel
//! has no RDMA, run them in a guest:
//!
//! ```text
//! cargo test -p interconnect --features rdma --test rdma --no-run   # prints the binary
//! soft-roce/run-in-guest -- target/debug/deps/rdma-<hash> --test-threads=1
//! ```
//!
//! Addresses: the receiver listens on `NVMIRROR_RDMA_ADDR_B` (192.0.2.2,
//! rxe_b), the sender dials from `NVMIRROR_RDMA_ADDR_A` (192.0.2.1, rxe_a).
#![cfg(feature = "rdma")]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver};
use interconnect::rdma::verbs::{
    self, event, Access, CmId, CompletionQueue, ConnParams, EventChannel, MemoryRegion,
    ProtectionDomain, QpCaps, QueuePair, RemoteRegion, WriteRequest,
};
use interconnect::rdma::{RdmaConfig, RdmaReceiver, RdmaSender};
use interconnect::{
    ControlEvent, ControlMessage, Direction, Error, MirrorWrite, QueueError, RdmaError,
    RefuseReason, SendQueue, SessionTimers, SharedMemory, Transport, WriteId,
};

use common::{expect_event, key, other_key, pattern, read_all, LONG};

/// RDMA devices exist here, or the test should skip (and says so).
fn have_rdma(test: &str) -> bool {
    match verbs::device_names() {
        Ok(names) if !names.is_empty() => true,
        Ok(_) => {
            eprintln!(
                "SKIP {test}: no RDMA device (run soft-roce/rxe-setup, or soft-roce/run-in-guest)"
            );
            false
        }
        Err(error) => {
            let cause =
                std::error::Error::source(&error).map_or(String::new(), |s| format!(": {s}"));
            eprintln!("SKIP {test}: no RDMA here ({error}{cause}); run the tests with soft-roce/run-in-guest");
            false
        }
    }
}

fn env_ip(name: &str, default: &str) -> IpAddr {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .parse()
        .unwrap_or_else(|error| panic!("{name}: {error}"))
}

/// The sender's address (rxe_a).
fn addr_a() -> IpAddr {
    env_ip("NVMIRROR_RDMA_ADDR_A", "192.0.2.1")
}

/// The receiver's address (rxe_b).
fn addr_b() -> IpAddr {
    env_ip("NVMIRROR_RDMA_ADDR_B", "192.0.2.2")
}

/// A fresh port per test: rdma_cm ports linger in time-wait.
fn next_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 10_000) as u16;
    base + NEXT.fetch_add(1, Ordering::Relaxed)
}

fn wait_event(channel: &Arc<EventChannel>, expected: u32) -> verbs::CmEvent {
    let event = channel
        .next_event(LONG)
        .unwrap()
        .unwrap_or_else(|| panic!("no {} event in {LONG:?}", verbs::event_name(expected)));
    assert_eq!(
        event.kind,
        expected,
        "got {} (status {}) instead of {}",
        verbs::event_name(event.kind),
        event.status,
        verbs::event_name(expected)
    );
    event
}

const CAPS: QpCaps = QpCaps {
    max_send_wr: 16,
    max_recv_wr: 4,
    max_inline_data: 64,
};

/// Verbs smoke test: two QPs over rdma_cm, one RDMA WRITE, one SEND.
#[test]
fn verbs_loopback_write_and_send() {
    if !have_rdma("verbs_loopback_write_and_send") {
        return;
    }
    let _watchdog = common::watchdog("verbs_loopback_write_and_send", Duration::from_secs(60));
    let server_addr = SocketAddr::new(addr_b(), next_port());

    // Server: listen, accept with the mirror's address and key as private data.
    let listen_channel = EventChannel::new().unwrap();
    let listener = CmId::new(&listen_channel).unwrap();
    listener.bind(server_addr).unwrap();
    listener.listen(4).unwrap();
    let mirror = SharedMemory::zeroed(1 << 16);

    let server = std::thread::spawn({
        let mirror = mirror.clone();
        move || {
            let request = wait_event(&listen_channel, event::CONNECT_REQUEST);
            // Private data arrives zero-padded to the CM message size.
            assert_eq!(&request.private_data[..5], b"hello");
            let mut id = request.request.unwrap();
            let channel = EventChannel::new().unwrap();
            id.migrate(&channel).unwrap();
            let id = Arc::new(id);
            eprintln!("server: request on {:?}", id);
            let pd = ProtectionDomain::new(&id).unwrap();
            let cq = CompletionQueue::new(&id, 32).unwrap();
            let qp = QueuePair::create(&id, &pd, &cq, CAPS).unwrap();
            let mr = MemoryRegion::register(&pd, mirror.clone(), Access::RemoteWrite).unwrap();
            let recv =
                MemoryRegion::register(&pd, SharedMemory::zeroed(256), Access::LocalWrite).unwrap();
            qp.post_recvs(&recv, &[(7, 0, 64)]).unwrap();
            let mut private = Vec::new();
            private.extend_from_slice(&mr.addr().to_le_bytes());
            private.extend_from_slice(&mr.rkey().to_le_bytes());
            id.accept(&ConnParams {
                private_data: &private,
                retry_count: 6,
                rnr_retry_count: 6,
            })
            .unwrap();
            wait_event(&channel, event::ESTABLISHED);
            // Wait for the SEND that says the write is done.
            let mut completions = Vec::new();
            let deadline = std::time::Instant::now() + LONG;
            while completions.is_empty() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no receive completion"
                );
                cq.poll(&mut completions).unwrap();
                if completions.is_empty() {
                    cq.arm().unwrap();
                    cq.poll(&mut completions).unwrap();
                    if completions.is_empty() {
                        verbs::wait_readable(&[cq.fd()], Duration::from_millis(100)).unwrap();
                        cq.consume_events().unwrap();
                    }
                }
            }
            let wc = completions[0];
            assert!(wc.is_ok(), "receive failed: {}", wc.status_name());
            assert_eq!(wc.wr_id, 7);
            let mut got = vec![0u8; wc.byte_len as usize];
            recv.memory().read_at(0, &mut got).unwrap();
            assert_eq!(got, b"done");
            wait_event(&channel, event::DISCONNECTED);
            eprintln!("server: sgid index {}", qp.sgid_index().unwrap());
            drop((mr, recv, qp));
        }
    });

    // Client: resolve, connect, write, send.
    // The kernel's first resolution of a neighbour only completes when the
    // resolve timer fires: short attempts, retried on fresh ids.
    let channel = EventChannel::new().unwrap();
    let id = loop {
        let id = CmId::new(&channel).unwrap();
        id.resolve_addr(
            Some(SocketAddr::new(addr_a(), 0)),
            server_addr,
            Duration::from_millis(200),
        )
        .unwrap();
        let event = channel.next_event(LONG).unwrap().unwrap();
        if event.kind == event::ADDR_RESOLVED {
            break id;
        }
        eprintln!(
            "client: {} ({}), retrying",
            verbs::event_name(event.kind),
            event.status
        );
    };
    id.resolve_route(LONG).unwrap();
    wait_event(&channel, event::ROUTE_RESOLVED);
    let id = Arc::new(id);
    eprintln!("client: resolved {:?}", id);
    let pd = ProtectionDomain::new(&id).unwrap();
    let cq = CompletionQueue::new(&id, 32).unwrap();
    let qp = QueuePair::create(&id, &pd, &cq, CAPS).unwrap();
    let local = SharedMemory::zeroed(1 << 16);
    let data = pattern(1, 4000);
    local.write_at(100, &data).unwrap();
    let mr = MemoryRegion::register(&pd, local.clone(), Access::LocalRead).unwrap();
    id.connect(&ConnParams {
        private_data: b"hello",
        retry_count: 6,
        rnr_retry_count: 6,
    })
    .unwrap();
    let established = wait_event(&channel, event::ESTABLISHED);
    let remote = RemoteRegion {
        addr: u64::from_le_bytes(established.private_data[..8].try_into().unwrap()),
        rkey: u32::from_le_bytes(established.private_data[8..12].try_into().unwrap()),
        len_bytes: 1 << 16,
    };
    eprintln!(
        "client: sgid index {}, remote {remote:?}",
        qp.sgid_index().unwrap()
    );
    qp.post_writes(
        &mr,
        &remote,
        &[
            WriteRequest {
                wr_id: 1,
                local_offset: 100,
                remote_offset: 1000,
                len_bytes: 2000,
                signaled: false,
            },
            WriteRequest {
                wr_id: 2,
                local_offset: 2100,
                remote_offset: 3000,
                len_bytes: 2000,
                signaled: true,
            },
        ],
    )
    .unwrap();
    qp.post_send_inline(3, b"done").unwrap();
    let mut completions = Vec::new();
    let deadline = std::time::Instant::now() + LONG;
    while completions.len() < 2 {
        assert!(std::time::Instant::now() < deadline, "no send completions");
        cq.poll(&mut completions).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(completions.iter().all(|wc| wc.is_ok()), "{completions:?}");
    assert_eq!(
        completions.iter().map(|wc| wc.wr_id).collect::<Vec<_>>(),
        [2, 3]
    );
    id.disconnect().unwrap();
    server.join().unwrap();
    let bytes = read_all(&mirror);
    assert_eq!(&bytes[1000..3000], &data[..2000]);
    assert_eq!(&bytes[3000..5000], &data[2000..]);
    drop((mr, qp, cq, pd));
}

// --- the transport -------------------------------------------------------------

const MIRROR_LEN: usize = 1 << 20;

fn rdma_config() -> RdmaConfig {
    RdmaConfig {
        send_depth: 32,
        max_write_len_bytes: 16 * 1024,
        timers: SessionTimers {
            heartbeat_interval_ms: 50,
            // The guest is an emulated CPU: generous, but bounded.
            silence_timeout_ms: 5_000,
            handshake_timeout_ms: 10_000,
        },
        source_addr: Some(addr_a()),
        ..RdmaConfig::new(key())
    }
}

struct Pair {
    receiver: RdmaReceiver,
    sender: Arc<RdmaSender>,
    mirror: SharedMemory,
    local: SharedMemory,
    queue: SendQueue,
    receiver_events: Receiver<ControlEvent>,
    sender_events: Receiver<ControlEvent>,
}

fn pair_with(config: &RdmaConfig, local: SharedMemory, mirror: SharedMemory) -> Pair {
    let (receiver_tx, receiver_events) = unbounded();
    let receiver = RdmaReceiver::bind(
        SocketAddr::new(addr_b(), next_port()),
        config,
        mirror.clone(),
        Some(receiver_tx),
    )
    .unwrap();
    let (sender_tx, sender_events) = unbounded();
    let sender = RdmaSender::connect(
        receiver.local_addr(),
        config,
        local.clone(),
        Some(sender_tx),
    )
    .unwrap();
    let queue = SendQueue::new(sender.clone(), config.send_depth).unwrap();
    Pair {
        receiver,
        sender,
        mirror,
        local,
        queue,
        receiver_events,
        sender_events,
    }
}

fn pair() -> Pair {
    pair_with(
        &rdma_config(),
        SharedMemory::zeroed(MIRROR_LEN),
        SharedMemory::zeroed(MIRROR_LEN),
    )
}

/// Writes `data` at `offset` of the local log and mirrors it.
fn mirror_write(pair: &Pair, offset: u64, data: &[u8]) -> WriteId {
    pair.local.write_at(offset, data).unwrap();
    let slots = pair.queue.slots_for(data.len() as u64);
    let mut reservation = pair.queue.reserve_timeout(slots, LONG).unwrap();
    reservation.post(MirrorWrite {
        src_offset: offset,
        dst_offset: offset,
        len_bytes: data.len() as u64,
    })
}

#[test]
fn bytes_written_at_offsets_arrive_intact() {
    if !have_rdma("bytes_written_at_offsets_arrive_intact") {
        return;
    }
    let _watchdog = common::watchdog(
        "bytes_written_at_offsets_arrive_intact",
        Duration::from_secs(120),
    );
    let pair = pair();
    assert_eq!(pair.receiver.session(), Some(pair.sender.session()));
    let limits = pair.sender.limits();
    assert_eq!(limits.remote_len_bytes, MIRROR_LEN as u64);
    assert_eq!(limits.max_write_len_bytes, 16 * 1024);
    // Odd offsets and lengths, one byte, one larger than a work request
    // (split into three), and the very end of the mirror.
    let writes: Vec<(u64, usize)> = vec![
        (0, 1),
        (1, 7),
        (4093, 4099),
        (65_536, 40_000),
        (300_001, 512),
        (MIRROR_LEN as u64 - 100, 100),
    ];
    let mut last = WriteId::NONE;
    for (tag, &(offset, len)) in writes.iter().enumerate() {
        last = mirror_write(&pair, offset, &pattern(tag as u64 + 1, len));
    }
    pair.queue.wait_placed_timeout(last, LONG).unwrap();
    let mirror = read_all(&pair.mirror);
    for (tag, &(offset, len)) in writes.iter().enumerate() {
        let at = offset as usize;
        assert_eq!(
            &mirror[at..at + len],
            &pattern(tag as u64 + 1, len)[..],
            "write {tag} at {offset}"
        );
    }
    // Nothing outside the writes changed.
    assert_eq!(read_all(&pair.mirror), read_all(&pair.local));
    assert_eq!(pair.queue.in_flight(), 0);
    assert_eq!(pair.queue.free_slots(), 32);
}

#[test]
fn completions_are_in_order_and_imply_placement() {
    if !have_rdma("completions_are_in_order_and_imply_placement") {
        return;
    }
    let _watchdog = common::watchdog(
        "completions_are_in_order_and_imply_placement",
        Duration::from_secs(180),
    );
    let pair = pair();
    const WRITES: u64 = 600;
    const LEN: usize = 700;
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        // Whenever `placed` advances, every write up to it is in the mirror,
        // and `placed` never goes back.
        let checker = scope.spawn(|| {
            let mut seen = 0u64;
            let mut checks = 0;
            while !done.load(Ordering::Acquire) || seen < WRITES {
                let placed = pair.queue.placed().get();
                assert!(placed >= seen, "placed went back from {seen} to {placed}");
                if placed > seen {
                    let mirror = read_all(&pair.mirror);
                    for id in seen + 1..=placed {
                        let at = ((id - 1) as usize * LEN) % (MIRROR_LEN - LEN);
                        assert_eq!(
                            &mirror[at..at + LEN],
                            &pattern(id, LEN)[..],
                            "write {id} placed but not in the mirror"
                        );
                    }
                    seen = placed;
                    checks += 1;
                }
                std::thread::yield_now();
            }
            checks
        });
        // Offsets never overlap within the run (600 * 700 < 1 MiB).
        for id in 1..=WRITES {
            let at = ((id - 1) as usize * LEN) % (MIRROR_LEN - LEN);
            let posted = mirror_write(&pair, at as u64, &pattern(id, LEN));
            assert_eq!(posted.get(), id, "ids are dense and in post order");
        }
        pair.queue
            .wait_placed_timeout(WriteId::new(WRITES), LONG)
            .unwrap();
        done.store(true, Ordering::Release);
        let checks = checker.join().unwrap();
        eprintln!("placement checked {checks} times over {WRITES} writes");
    });
    for id in 1..=WRITES {
        pair.queue
            .wait_placed_timeout(WriteId::new(id), LONG)
            .unwrap();
    }
}

#[test]
fn slots_run_out_and_completions_release_them() {
    if !have_rdma("slots_run_out_and_completions_release_them") {
        return;
    }
    let _watchdog = common::watchdog(
        "slots_run_out_and_completions_release_them",
        Duration::from_secs(60),
    );
    let config = RdmaConfig {
        send_depth: 4,
        ..rdma_config()
    };
    let pair = pair_with(
        &config,
        SharedMemory::zeroed(MIRROR_LEN),
        SharedMemory::zeroed(MIRROR_LEN),
    );
    assert!(matches!(
        SendQueue::new(pair.sender.clone(), 5),
        Err(Error::Queue(QueueError::TooManySlots {
            requested: 5,
            max: 4
        }))
    ));
    let mut reservation = pair.queue.reserve(4).unwrap();
    assert!(matches!(
        pair.queue.try_reserve(1),
        Err(Error::Queue(QueueError::NoFreeSlots { .. }))
    ));
    let mut last = WriteId::NONE;
    for i in 0..4u64 {
        pair.local.write_at(i * 100, &pattern(i + 10, 100)).unwrap();
        last = reservation.post(MirrorWrite {
            src_offset: i * 100,
            dst_offset: i * 100,
            len_bytes: 100,
        });
    }
    assert_eq!(reservation.remaining(), 0);
    // A reserve waiting for a slot is woken by a completion.
    let more = pair.queue.reserve_timeout(4, LONG).unwrap();
    assert_eq!(more.remaining(), 4);
    pair.queue.wait_placed_timeout(last, LONG).unwrap();
    drop(more);
    assert_eq!(pair.queue.free_slots(), 4);
    assert_eq!(pair.queue.in_flight(), 0);
    assert_eq!(
        &read_all(&pair.mirror)[..400],
        &read_all(&pair.local)[..400]
    );
}

#[test]
fn control_messages_flow_both_ways() {
    if !have_rdma("control_messages_flow_both_ways") {
        return;
    }
    let _watchdog = common::watchdog("control_messages_flow_both_ways", Duration::from_secs(60));
    let pair = pair();
    let session = pair.sender.session();
    // More messages than there are receive buffers: flow control paces them.
    for cp_id in 0..40 {
        pair.queue
            .send_control(&ControlMessage::CpDone {
                cp_id,
                half_freed: (cp_id % 2) as u8,
            })
            .unwrap();
    }
    for cp_id in 0..40 {
        let got = expect_event(&pair.receiver_events, "CpDone", |event| match event {
            ControlEvent::Message {
                direction: Direction::Inbound,
                session: s,
                message: ControlMessage::CpDone { cp_id, .. },
            } if *s == session => Some(*cp_id),
            _ => None,
        });
        assert_eq!(got, cp_id, "control messages arrive in order");
    }
    pair.receiver
        .send_control(&ControlMessage::Takeover { epoch: 7 })
        .unwrap();
    let epoch = expect_event(&pair.sender_events, "Takeover", |event| match event {
        ControlEvent::Message {
            direction: Direction::Outbound,
            message: ControlMessage::Takeover { epoch },
            ..
        } => Some(*epoch),
        _ => None,
    });
    assert_eq!(epoch, 7);
    // Heartbeats keep an idle connection alive past the silence timeout.
    std::thread::sleep(Duration::from_millis(300));
    assert!(pair.sender.failure().is_none());
}

/// A token bucket on a network device for as long as it lives.
struct Throttle {
    netdev: String,
}

impl Throttle {
    fn on(netdev: &str, rate: &str) -> Throttle {
        let status = std::process::Command::new("tc")
            .args([
                "qdisc", "replace", "dev", netdev, "root", "tbf", "rate", rate,
            ])
            .args(["burst", "32kb", "limit", "4mb"])
            .status()
            .expect("cannot run tc (apt-get install iproute2)");
        assert!(status.success(), "tc could not throttle {netdev}");
        Throttle {
            netdev: netdev.to_owned(),
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tc")
            .args(["qdisc", "del", "dev", &self.netdev, "root"])
            .status();
    }
}

#[test]
fn a_control_message_arrives_after_the_writes_posted_before_it() {
    if !have_rdma("a_control_message_arrives_after_the_writes_posted_before_it") {
        return;
    }
    let _watchdog = common::watchdog(
        "a_control_message_arrives_after_the_writes_posted_before_it",
        Duration::from_secs(60),
    );
    // A slow link (8 Mbit/s on the sender's side of the veth pair), so
    // that the writes are still held back when the message is sent.
    // The sender's device first, as rdma-tier names them.
    let netdevs = std::env::var("NVMIRROR_RDMA_NETDEVS").unwrap_or_else(|_| "va vb".into());
    let netdev = netdevs.split_whitespace().next().unwrap_or("va");
    let _throttle = Throttle::on(netdev, "8mbit");
    let pair = pair();
    let session = pair.sender.session();
    // Far more than the send window admits before its first rate sample:
    // most of these wait in the session thread's backlog when the control
    // message is sent. It must not overtake them.
    let chunk = vec![0x5au8; 16 * 1024];
    let writes = rdma_config().send_depth;
    for index in 0..writes {
        mirror_write(&pair, (index * chunk.len()) as u64, &chunk);
    }
    pair.queue
        .send_control(&ControlMessage::CpDone {
            cp_id: 99,
            half_freed: 0,
        })
        .unwrap();
    expect_event(&pair.receiver_events, "CpDone", |event| match event {
        ControlEvent::Message {
            direction: Direction::Inbound,
            session: s,
            message: ControlMessage::CpDone { cp_id: 99, .. },
        } if *s == session => Some(()),
        _ => None,
    });
    let mut landed = vec![0u8; writes * chunk.len()];
    pair.mirror.read_at(0, &mut landed).unwrap();
    let missing = landed
        .chunks(chunk.len())
        .filter(|c| *c != &chunk[..])
        .count();
    assert_eq!(
        missing, 0,
        "{missing} of the {writes} writes posted before the control message had not landed when it arrived"
    );
}

#[test]
fn partner_dying_mid_stream_errors_every_waiter() {
    if !have_rdma("partner_dying_mid_stream_errors_every_waiter") {
        return;
    }
    let _watchdog = common::watchdog(
        "partner_dying_mid_stream_errors_every_waiter",
        Duration::from_secs(120),
    );
    let Pair {
        mut receiver,
        sender,
        queue,
        local,
        sender_events,
        ..
    } = pair();
    let queue = Arc::new(queue);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Writers stream until the partner is gone; each waits for its write.
    let writers: Vec<_> = (0..3u64)
        .map(|w| {
            let queue = Arc::clone(&queue);
            let local = local.clone();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut placed = 0u64;
                for i in 0.. {
                    let at = (w * 1000 + (i % 1000)) * 256;
                    local.write_at(at, &pattern(i, 256)).unwrap();
                    let mut reservation = match queue.reserve_timeout(1, LONG) {
                        Ok(reservation) => reservation,
                        Err(error) => return (placed, error),
                    };
                    let id = reservation.post(MirrorWrite {
                        src_offset: at,
                        dst_offset: at,
                        len_bytes: 256,
                    });
                    match queue.wait_placed_timeout(id, LONG) {
                        Ok(()) => placed += 1,
                        Err(error) => return (placed, error),
                    }
                    if stop.load(Ordering::Acquire) && i > 1_000_000 {
                        unreachable!();
                    }
                }
                unreachable!()
            })
        })
        .collect();
    // Let them get going, then kill the partner.
    let deadline = std::time::Instant::now() + LONG;
    while queue.placed().get() < 50 {
        assert!(
            std::time::Instant::now() < deadline,
            "writes are not flowing"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    receiver.shutdown();
    for writer in writers {
        let (placed, error) = writer.join().unwrap();
        eprintln!("writer placed {placed} writes, then: {error}");
        assert!(
            matches!(
                error,
                Error::Queue(QueueError::WriteLost { .. }) | Error::Disconnected { .. }
            ),
            "{error:?}"
        );
    }
    stop.store(true, Ordering::Release);
    let failure = sender.failure().expect("the sender saw the failure");
    eprintln!("sender failure: {failure}");
    expect_event(&sender_events, "Disconnected", |event| match event {
        ControlEvent::Disconnected {
            direction: Direction::Outbound,
            ..
        } => Some(()),
        _ => None,
    });
    assert!(matches!(queue.reserve(1), Err(Error::Disconnected { .. })));
    assert_eq!(queue.in_flight(), 0);
}

#[test]
fn a_bad_key_is_refused_and_a_good_one_accepted_after() {
    if !have_rdma("a_bad_key_is_refused_and_a_good_one_accepted_after") {
        return;
    }
    let _watchdog = common::watchdog(
        "a_bad_key_is_refused_and_a_good_one_accepted_after",
        Duration::from_secs(60),
    );
    let config = rdma_config();
    let (receiver_tx, receiver_events) = unbounded();
    let receiver = RdmaReceiver::bind(
        SocketAddr::new(addr_b(), next_port()),
        &config,
        SharedMemory::zeroed(MIRROR_LEN),
        Some(receiver_tx),
    )
    .unwrap();
    let stranger = RdmaConfig {
        key: other_key(),
        ..config.clone()
    };
    let error = RdmaSender::connect(
        receiver.local_addr(),
        &stranger,
        SharedMemory::zeroed(4096),
        None,
    )
    .unwrap_err();
    assert!(
        matches!(
            error,
            Error::HandshakeRefused {
                reason: RefuseReason::AuthFailed,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(receiver.session(), None);
    // The refusal is counted once the receiver's thread is done with it.
    let deadline = std::time::Instant::now() + LONG;
    while receiver.stats().handshakes_refused < 1 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(receiver.stats().sessions_accepted, 0);
    assert!(receiver_events
        .try_iter()
        .all(|e| !matches!(e, ControlEvent::Connected { .. })));

    let sender = RdmaSender::connect(
        receiver.local_addr(),
        &config,
        SharedMemory::zeroed(4096),
        None,
    )
    .unwrap();
    assert_eq!(receiver.session(), Some(sender.session()));
    assert_eq!(receiver.stats().sessions_accepted, 1);
}

#[test]
fn a_new_session_supersedes_the_old_one() {
    if !have_rdma("a_new_session_supersedes_the_old_one") {
        return;
    }
    let _watchdog = common::watchdog(
        "a_new_session_supersedes_the_old_one",
        Duration::from_secs(60),
    );
    let pair = pair();
    let old = pair.sender.session();
    let mut reservation = pair.queue.reserve(1).unwrap();
    let sender = RdmaSender::connect(
        pair.receiver.local_addr(),
        &rdma_config(),
        pair.local.clone(),
        None,
    )
    .unwrap();
    assert_ne!(sender.session(), old);
    assert_eq!(pair.receiver.session(), Some(sender.session()));
    // The old connection is gone: its queue fails, the new one works.
    let lost = reservation.post(MirrorWrite {
        src_offset: 0,
        dst_offset: 0,
        len_bytes: 8,
    });
    assert!(pair.queue.wait_placed_timeout(lost, LONG).is_err());
    pair.queue.reconnect(sender).unwrap();
    let id = mirror_write(&pair, 8, b"new session");
    pair.queue.wait_placed_timeout(id, LONG).unwrap();
    assert_eq!(&read_all(&pair.mirror)[8..19], b"new session");
}

// --- the NVRAM file's mapping ------------------------------------------------------

/// A file mapped `MAP_SHARED`, as the node maps its NVRAM; unmapped on drop.
struct FileMapping {
    ptr: *mut libc::c_void,
    len: usize,
    _file: std::fs::File,
}

// SAFETY: the mapping is plain memory owned by this value; it is only
// unmapped in `drop`, which runs once, on whichever thread drops it.
unsafe impl Send for FileMapping {}
// SAFETY: nothing is accessed through `&FileMapping`.
unsafe impl Sync for FileMapping {}

impl Drop for FileMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are the mapping made in `map_file`, unmapped
        // once; every SharedMemory over it holds this owner, so none is left.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

fn map_file(path: &std::path::Path, len: usize) -> SharedMemory {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    file.set_len(len as u64).unwrap();
    // SAFETY: a fresh shared mapping of `len` bytes of a file we own; the
    // kernel picks the address. Nothing else maps it.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED, "mmap {}", path.display());
    let owner = Arc::new(FileMapping {
        ptr,
        len,
        _file: file,
    });
    // SAFETY: the mapping is valid for reads and writes of `len` bytes until
    // `owner` unmaps it; it is only accessed through SharedMemory, the
    // device, and `std::fs::read` of the file (a syscall, not a reference).
    unsafe { SharedMemory::from_raw(ptr.cast(), len, owner) }
}

fn fs_type(dir: &str) -> String {
    let path = std::ffi::CString::new(dir).unwrap();
    // SAFETY: statfs is plain data; zeroes are valid and statfs fills it.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return "?".into();
    }
    match stat.f_type as u64 {
        0xEF53 => "ext4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x5846_5342 => "xfs".into(),
        0x794C_7630 => "overlay".into(),
        0x0102_1997 => "9p".into(),
        0x9123_683E => "btrfs".into(),
        other => format!("{other:#x}"),
    }
}

/// Registers MAP_SHARED file mappings, as the node's NVRAM is, in each
/// directory of `NVMIRROR_RDMA_FILE_DIRS` (colon-separated; default
/// `/dev/shm` and the temp dir): the mirror for remote write, the log for
/// local read; then mirrors a write through them and reads it back from
/// the file. tmpfs must work; elsewhere the outcome is printed, and a
/// refusal must be a clear registration error.
#[test]
fn file_mapping_registration() {
    if !have_rdma("file_mapping_registration") {
        return;
    }
    let _watchdog = common::watchdog("file_mapping_registration", Duration::from_secs(120));
    let dirs = std::env::var("NVMIRROR_RDMA_FILE_DIRS")
        .unwrap_or_else(|_| format!("/dev/shm:{}", std::env::temp_dir().display()));
    let mut worked = 0;
    for dir in dirs.split(':').filter(|dir| !dir.is_empty()) {
        if !std::path::Path::new(dir).is_dir() {
            eprintln!("{dir}: not a directory, skipped");
            continue;
        }
        let fs = fs_type(dir);
        let name = |what: &str| {
            std::path::Path::new(dir)
                .join(format!("nvmirror-rdma-{}-{what}.nvram", std::process::id()))
        };
        let (local_path, mirror_path) = (name("local"), name("mirror"));
        let local = map_file(&local_path, MIRROR_LEN);
        let mirror = map_file(&mirror_path, MIRROR_LEN);
        let config = rdma_config();
        let outcome = RdmaReceiver::bind(
            SocketAddr::new(addr_b(), next_port()),
            &config,
            mirror.clone(),
            None,
        )
        .and_then(|receiver| {
            let sender = RdmaSender::connect(receiver.local_addr(), &config, local.clone(), None)?;
            Ok((receiver, sender))
        });
        match outcome {
            Ok((receiver, sender)) => {
                let queue = SendQueue::new(sender, config.send_depth).unwrap();
                let data = pattern(99, 20_000);
                local.write_at(12_345, &data).unwrap();
                let mut reservation = queue.reserve(queue.slots_for(20_000)).unwrap();
                let id = reservation.post(MirrorWrite {
                    src_offset: 12_345,
                    dst_offset: 12_345,
                    len_bytes: 20_000,
                });
                queue.wait_placed_timeout(id, LONG).unwrap();
                let file = std::fs::read(&mirror_path).unwrap();
                assert_eq!(
                    &file[12_345..32_345],
                    &data[..],
                    "the write is in the mirror file"
                );
                eprintln!("{dir} ({fs}): MAP_SHARED file mappings register (mirror: remote write, log: local read); an RDMA WRITE landed in the mirror file");
                worked += 1;
                drop((queue, receiver));
            }
            Err(error) => {
                let source = std::error::Error::source(&error).map(|s| s.to_string());
                eprintln!("{dir} ({fs}): registration refused: {error}: {source:?}");
                assert!(
                    matches!(error, Error::Rdma(RdmaError::Call { context, .. }) if context.starts_with("registering")),
                    "a refusal must be a registration error: {error:?}"
                );
                assert_ne!(fs, "tmpfs", "tmpfs pages can always be pinned");
                // The log alone (registered for local read: no write pin)?
                let receiver = RdmaReceiver::bind(
                    SocketAddr::new(addr_b(), next_port()),
                    &config,
                    SharedMemory::zeroed(MIRROR_LEN),
                    None,
                )
                .unwrap();
                match RdmaSender::connect(receiver.local_addr(), &config, local.clone(), None) {
                    Ok(_) => eprintln!("{dir} ({fs}): the log's mapping registers for local read"),
                    Err(error) => {
                        eprintln!("{dir} ({fs}): the log's mapping is refused too: {error}")
                    }
                }
            }
        }
        drop((local, mirror));
        let _ = std::fs::remove_file(local_path);
        let _ = std::fs::remove_file(mirror_path);
    }
    eprintln!("file mappings registered in {worked} of the directories");
}

/// Removes the sender's RDMA device (`rdma link delete`) mid-stream: every
/// waiter gets an error and the session fails as for TCP. Destructive, so
/// it only runs where `NVMIRROR_RDMA_REMOVE_DEVICE` names the device to
/// remove (interconnect/scripts/rdma-tests-in-guest sets it to rxe_a), and
/// is named to run last.
#[test]
fn zz_device_removal_errors_every_waiter() {
    let Ok(device) = std::env::var("NVMIRROR_RDMA_REMOVE_DEVICE") else {
        eprintln!("SKIP zz_device_removal_errors_every_waiter: set NVMIRROR_RDMA_REMOVE_DEVICE to a device it may remove");
        return;
    };
    if !have_rdma("zz_device_removal_errors_every_waiter") {
        return;
    }
    let _watchdog = common::watchdog(
        "zz_device_removal_errors_every_waiter",
        Duration::from_secs(120),
    );
    let pair = pair();
    let queue = &pair.queue;
    let errors = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let local = pair.local.clone();
                scope.spawn(move || {
                    for i in 0u64.. {
                        let at = (w * 1000 + (i % 1000)) * 256;
                        local.write_at(at, &pattern(i, 256)).unwrap();
                        let mut reservation = match queue.reserve_timeout(1, LONG) {
                            Ok(reservation) => reservation,
                            Err(error) => return error,
                        };
                        let id = reservation.post(MirrorWrite {
                            src_offset: at,
                            dst_offset: at,
                            len_bytes: 256,
                        });
                        if let Err(error) = queue.wait_placed_timeout(id, LONG) {
                            return error;
                        }
                    }
                    unreachable!()
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + LONG;
        while queue.placed().get() < 20 {
            assert!(
                std::time::Instant::now() < deadline,
                "writes are not flowing"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Not waited for: unregistering completes only once every process
        // has closed the device, this one included.
        #[allow(clippy::zombie_processes)] // reaped when the guest's test process exits
        let removal = std::process::Command::new("rdma")
            .args(["link", "delete", &device])
            .spawn()
            .expect("running `rdma link delete`");
        eprintln!("removing {device} (pid {})", removal.id());
        writers
            .into_iter()
            .map(|w| w.join().unwrap())
            .collect::<Vec<_>>()
    });
    for error in &errors {
        eprintln!("writer: {error}");
        assert!(
            matches!(
                error,
                Error::Queue(QueueError::WriteLost { .. }) | Error::Disconnected { .. }
            ),
            "{error:?}"
        );
    }
    let failure = pair.sender.failure().expect("the sender saw the failure");
    eprintln!("sender failure: {failure}");
    assert!(
        matches!(
            &*failure,
            Error::Rdma(RdmaError::DeviceRemoved { .. })
                | Error::Rdma(RdmaError::Disconnected { .. })
                | Error::Rdma(RdmaError::WorkRequestFailed { .. })
        ),
        "{failure:?}"
    );
    expect_event(&pair.sender_events, "Disconnected", |event| match event {
        ControlEvent::Disconnected {
            direction: Direction::Outbound,
            ..
        } => Some(()),
        _ => None,
    });
}

/// A connect request of another wire version is rejected with the version
/// the receiver speaks; one that is not ours at all is rejected as
/// malformed. Neither gets near the mirror.
#[test]
fn other_versions_and_strangers_are_rejected() {
    use interconnect::rdma::wire::{Hello, Refusal, RDMA_WIRE_VERSION};
    use interconnect::tcp::wire::HandshakeStatus;
    if !have_rdma("other_versions_and_strangers_are_rejected") {
        return;
    }
    let _watchdog = common::watchdog(
        "other_versions_and_strangers_are_rejected",
        Duration::from_secs(60),
    );
    let receiver = RdmaReceiver::bind(
        SocketAddr::new(addr_b(), next_port()),
        &rdma_config(),
        SharedMemory::zeroed(MIRROR_LEN),
        None,
    )
    .unwrap();
    let attempt = |private_data: &[u8]| -> verbs::CmEvent {
        let channel = EventChannel::new().unwrap();
        let id = loop {
            let id = CmId::new(&channel).unwrap();
            id.resolve_addr(
                Some(SocketAddr::new(addr_a(), 0)),
                receiver.local_addr(),
                Duration::from_millis(200),
            )
            .unwrap();
            if channel.next_event(LONG).unwrap().unwrap().kind == event::ADDR_RESOLVED {
                break id;
            }
        };
        id.resolve_route(LONG).unwrap();
        wait_event(&channel, event::ROUTE_RESOLVED);
        let id = Arc::new(id);
        let pd = ProtectionDomain::new(&id).unwrap();
        let cq = CompletionQueue::new(&id, 32).unwrap();
        let _qp = QueuePair::create(&id, &pd, &cq, CAPS).unwrap();
        id.connect(&ConnParams {
            private_data,
            retry_count: 6,
            rnr_retry_count: 6,
        })
        .unwrap();
        wait_event(&channel, event::REJECTED)
    };
    let future = Hello {
        version: RDMA_WIRE_VERSION + 1,
        nonce: [3; 32],
    }
    .encode();
    let rejected = attempt(&future);
    assert_eq!(
        Refusal::decode(&rejected.private_data),
        Some(Refusal {
            version: RDMA_WIRE_VERSION,
            status: HandshakeStatus::UnknownVersion
        })
    );
    let rejected = attempt(b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(
        Refusal::decode(&rejected.private_data).map(|r| r.status),
        Some(HandshakeStatus::Malformed)
    );
    assert_eq!(receiver.stats().handshakes_refused, 2);
    assert_eq!(receiver.stats().sessions_accepted, 0);
    assert_eq!(receiver.session(), None);
}
