//! RDMA transport benchmark, on real or Soft-RoCE devices:
//!
//! (a) latency: a small mirrored write round trip (reserve, post, wait until
//!     placed) through the send queue and the RDMA transport, one at a
//!     time, for 2 and 64 bytes;
//! (b) bandwidth: a stream of 64 KiB writes through the queue with every
//!     slot in use.
//!
//! Compare with perftest on the same devices in the same run:
//! `soft-roce/bench-in-guest` runs `ib_write_lat -s 2` and
//! `ib_write_bw -s 65536` between rxe_a and rxe_b, then this, and prints the
//! ratios. Note that `ib_write_lat` reports half a ping-pong (one way, CPU
//! busy-polling memory); a mirrored write waits for the NIC's
//! acknowledgement (a round trip) and sleeps on a completion channel.
//!
//! The receiver listens on `NVMIRROR_RDMA_ADDR_B` (192.0.2.2), the sender
//! dials from `NVMIRROR_RDMA_ADDR_A` (192.0.2.1).
//! `NVMIRROR_BENCH_QUICK=1`: a short run.
//!
//! Output lines `rdma_bench <name> <value> <unit>` are for scripts.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use std::sync::Arc;

use interconnect::rdma::verbs::{
    self, event, Access, CmId, CompletionQueue, ConnParams, EventChannel, MemoryRegion,
    ProtectionDomain, QpCaps, QueuePair, RemoteRegion, WriteRequest,
};
use interconnect::rdma::{RdmaConfig, RdmaReceiver, RdmaSender};
use interconnect::{MirrorWrite, PresharedKey, SendQueue, SharedMemory, WriteId};

const LOG_LEN: usize = 64 << 20;
const SLOTS: usize = 64;
/// The busy-polling variant's spin.
const BUSY_POLL_US: u64 = 200;
const WAIT: Duration = Duration::from_secs(60);

fn env_ip(name: &str, default: &str) -> IpAddr {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .parse()
        .unwrap_or_else(|error| panic!("{name}: {error}"))
}

struct Pair {
    _receiver: RdmaReceiver,
    queue: SendQueue,
}

fn pair(busy_poll_us: u64) -> Pair {
    let config = RdmaConfig {
        busy_poll_us,
        send_depth: SLOTS,
        max_write_len_bytes: 1 << 20,
        timers: interconnect::SessionTimers {
            heartbeat_interval_ms: 100,
            silence_timeout_ms: 10_000,
            handshake_timeout_ms: 10_000,
        },
        source_addr: Some(env_ip("NVMIRROR_RDMA_ADDR_A", "192.0.2.1")),
        ..RdmaConfig::new(PresharedKey::new(b"benchmark key, 32 bytes long....".to_vec()).unwrap())
    };
    let port = 30_000 + (std::process::id() % 10_000) as u16 + busy_poll_us.min(1000) as u16;
    let addr = SocketAddr::new(env_ip("NVMIRROR_RDMA_ADDR_B", "192.0.2.2"), port);
    let receiver = RdmaReceiver::bind(addr, &config, SharedMemory::zeroed(LOG_LEN), None).unwrap();
    let local = SharedMemory::zeroed(LOG_LEN);
    let bytes: Vec<u8> = (0..LOG_LEN).map(|i| (i * 31 % 251) as u8).collect();
    local.write_at(0, &bytes).unwrap();
    let sender = RdmaSender::connect(receiver.local_addr(), &config, local, None).unwrap();
    let queue = SendQueue::new(sender, SLOTS).unwrap();
    Pair {
        _receiver: receiver,
        queue,
    }
}

fn latency(queue: &SendQueue, len_bytes: u64, round_trips: usize, tag: &str) {
    let mut samples = Vec::with_capacity(round_trips);
    let warmup = round_trips / 10;
    for i in 0..round_trips + warmup {
        let offset = (i as u64 * 4096) % (LOG_LEN as u64 - 4096);
        let start = Instant::now();
        let mut reservation = queue.reserve_timeout(1, WAIT).unwrap();
        let id = reservation.post(MirrorWrite {
            src_offset: offset,
            dst_offset: offset,
            len_bytes,
        });
        queue.wait_placed_timeout(id, WAIT).unwrap();
        if i >= warmup {
            samples.push(start.elapsed());
        }
    }
    samples.sort();
    let total: Duration = samples.iter().sum();
    let mean_us = total.as_secs_f64() * 1e6 / samples.len() as f64;
    let p50_us = samples[samples.len() / 2].as_secs_f64() * 1e6;
    let p99_us = samples[samples.len() * 99 / 100].as_secs_f64() * 1e6;
    println!(
        "write round trip, {len_bytes:>3} B: mean {mean_us:8.1} us  p50 {p50_us:8.1} us  p99 {p99_us:8.1} us  ({round_trips} round trips)"
    );
    println!("rdma_bench lat_{len_bytes}B{tag}_p50 {p50_us:.1} us");
    println!("rdma_bench lat_{len_bytes}B{tag}_mean {mean_us:.1} us");
}

/// The verbs floor on the same devices: one signaled RDMA WRITE at a time,
/// its completion taken by busy-polling the CQ, then by sleeping on the
/// completion channel (what the transport does).
fn verbs_floor(len_bytes: u32, round_trips: usize) {
    let wait_event = |channel: &Arc<EventChannel>, expected: u32| {
        let event = channel.next_event(WAIT).unwrap().expect("an rdma_cm event");
        assert_eq!(event.kind, expected, "{}", verbs::event_name(event.kind));
        event
    };
    let caps = QpCaps {
        max_send_wr: 4,
        max_recv_wr: 1,
        max_inline_data: 0,
    };
    let port = 40_000 + (std::process::id() % 10_000) as u16;
    let server_addr = SocketAddr::new(env_ip("NVMIRROR_RDMA_ADDR_B", "192.0.2.2"), port);
    let listen_channel = EventChannel::new().unwrap();
    let listener = CmId::new(&listen_channel).unwrap();
    listener.bind(server_addr).unwrap();
    listener.listen(1).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let request = wait_event(&listen_channel, event::CONNECT_REQUEST);
        let mut id = request.request.unwrap();
        let channel = EventChannel::new().unwrap();
        id.migrate(&channel).unwrap();
        let id = Arc::new(id);
        let pd = ProtectionDomain::new(&id).unwrap();
        let cq = CompletionQueue::new(&id, 8).unwrap();
        let _qp = QueuePair::create(&id, &pd, &cq, caps).unwrap();
        let mr = MemoryRegion::register(&pd, SharedMemory::zeroed(1 << 20), Access::RemoteWrite)
            .unwrap();
        let mut private = mr.addr().to_le_bytes().to_vec();
        private.extend_from_slice(&mr.rkey().to_le_bytes());
        id.accept(&ConnParams {
            private_data: &private,
            retry_count: 6,
            rnr_retry_count: 6,
        })
        .unwrap();
        wait_event(&channel, event::ESTABLISHED);
        done_rx.recv().unwrap();
        drop(listener);
    });
    let channel = EventChannel::new().unwrap();
    let src = SocketAddr::new(env_ip("NVMIRROR_RDMA_ADDR_A", "192.0.2.1"), 0);
    let id = loop {
        let id = CmId::new(&channel).unwrap();
        id.resolve_addr(Some(src), server_addr, Duration::from_millis(200))
            .unwrap();
        if channel.next_event(WAIT).unwrap().unwrap().kind == event::ADDR_RESOLVED {
            break id;
        }
    };
    id.resolve_route(WAIT).unwrap();
    wait_event(&channel, event::ROUTE_RESOLVED);
    let id = Arc::new(id);
    let pd = ProtectionDomain::new(&id).unwrap();
    let cq = CompletionQueue::new(&id, 8).unwrap();
    let qp = QueuePair::create(&id, &pd, &cq, caps).unwrap();
    let mr = MemoryRegion::register(&pd, SharedMemory::zeroed(1 << 20), Access::LocalRead).unwrap();
    id.connect(&ConnParams {
        private_data: b"floor",
        retry_count: 6,
        rnr_retry_count: 6,
    })
    .unwrap();
    let established = wait_event(&channel, event::ESTABLISHED);
    let remote = RemoteRegion {
        addr: u64::from_le_bytes(established.private_data[..8].try_into().unwrap()),
        rkey: u32::from_le_bytes(established.private_data[8..12].try_into().unwrap()),
        len_bytes: 1 << 20,
    };
    let write = WriteRequest {
        wr_id: 1,
        local_offset: 0,
        remote_offset: 0,
        len_bytes,
        signaled: true,
    };
    let mut completions = Vec::new();
    for sleeping in [false, true] {
        let mut samples = Vec::with_capacity(round_trips);
        for _ in 0..round_trips {
            completions.clear();
            if sleeping {
                cq.arm().unwrap();
            }
            let start = Instant::now();
            qp.post_writes(&mr, &remote, &[write]).unwrap();
            while cq.poll(&mut completions).unwrap() == 0 {
                if sleeping {
                    verbs::wait_readable(&[cq.fd()], WAIT).unwrap();
                    cq.consume_events().unwrap();
                }
            }
            samples.push(start.elapsed());
            assert!(completions[0].is_ok(), "{}", completions[0].status_name());
        }
        samples.sort();
        let p50_us = samples[samples.len() / 2].as_secs_f64() * 1e6;
        let how = if sleeping {
            "completion channel"
        } else {
            "busy-polling the CQ"
        };
        println!("verbs floor, one signaled {len_bytes} B RDMA WRITE, {how}: p50 {p50_us:8.1} us");
        let tag = if sleeping { "sleep" } else { "poll" };
        println!("rdma_bench floor_{len_bytes}B_{tag}_p50 {p50_us:.1} us");
    }
    id.disconnect().unwrap();
    done_tx.send(()).unwrap();
    server.join().unwrap();
}

fn bandwidth(queue: &SendQueue, len_bytes: u64, total_bytes: u64) {
    let writes = total_bytes / len_bytes;
    let start = Instant::now();
    let mut last = WriteId::NONE;
    for i in 0..writes {
        let offset = (i * len_bytes) % (LOG_LEN as u64 - len_bytes);
        let mut reservation = queue.reserve_timeout(1, WAIT).unwrap();
        last = reservation.post(MirrorWrite {
            src_offset: offset,
            dst_offset: offset,
            len_bytes,
        });
    }
    queue.wait_placed_timeout(last, WAIT).unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    let mb_per_s = (writes * len_bytes) as f64 / elapsed / 1e6;
    println!(
        "write stream, {} KiB writes, {SLOTS} slots: {mb_per_s:8.1} MB/s ({writes} writes in {elapsed:.2} s)",
        len_bytes / 1024
    );
    println!("rdma_bench bw_{}KiB {mb_per_s:.1} MB/s", len_bytes / 1024);
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is understood.
    match verbs::device_names() {
        Ok(names) if !names.is_empty() => println!("RDMA devices: {}", names.join(", ")),
        Ok(_) | Err(_) => {
            println!("no RDMA device here: skipped (run soft-roce/bench-in-guest)");
            return;
        }
    }
    let quick = std::env::var_os("NVMIRROR_BENCH_QUICK").is_some();
    let (round_trips, stream_bytes) = if quick {
        (200, 8 << 20)
    } else {
        (2000, 64 << 20)
    };
    verbs_floor(2, round_trips);
    let sleeping = pair(0);
    println!("completion channel only (busy_poll_us = 0):");
    latency(&sleeping.queue, 2, round_trips, "");
    latency(&sleeping.queue, 64, round_trips, "");
    bandwidth(&sleeping.queue, 64 * 1024, stream_bytes);
    drop(sleeping);
    let spinning = pair(BUSY_POLL_US);
    println!("busy-polling up to {BUSY_POLL_US} us while writes are in flight:");
    latency(&spinning.queue, 2, round_trips, "_spin");
}
