//! Interconnect benchmark over loopback, against raw-TCP baselines measured
//! in the same run:
//!
//! (a) latency: a 64-byte ping-pong on a raw TCP socket vs a 64-byte
//!     mirrored write round trip (reserve, post, wait until placed) through
//!     the send queue and the TCP transport;
//! (b) throughput: a stream of 4 KiB and 64 KiB writes through the queue,
//!     with 1 and 8 writers, vs the same bytes over one raw TCP socket
//!     (the receiver copies them into memory in both cases).
//!
//! `cargo bench -p interconnect`; `NVMIRROR_BENCH_QUICK=1` for a run of a
//! few seconds (CI).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use interconnect::{
    MirrorReceiver, MirrorWrite, PresharedKey, SendQueue, SharedMemory, TcpConfig, TcpSender,
    WriteId,
};

const LOG_LEN: usize = 64 << 20;
const SLOTS: usize = 256;
const MANY_WRITERS: usize = 8;
const WAIT: Duration = Duration::from_secs(30);

struct Scale {
    round_trips: usize,
    stream_bytes: u64,
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn config() -> TcpConfig {
    TcpConfig {
        send_depth: SLOTS,
        max_frame_len_bytes: 1 << 20,
        ..TcpConfig::new(PresharedKey::new(b"benchmark key, 32 bytes long....".to_vec()).unwrap())
    }
}

/// A mirrored pair on loopback: the receiver applies into its own mirror.
struct Pair {
    _receiver: MirrorReceiver,
    local: SharedMemory,
    queue: SendQueue,
}

fn pair() -> Pair {
    let config = config();
    let receiver =
        MirrorReceiver::bind(loopback(), &config, SharedMemory::zeroed(LOG_LEN), None).unwrap();
    let local = SharedMemory::zeroed(LOG_LEN);
    let bytes: Vec<u8> = (0..LOG_LEN).map(|i| (i * 31 % 251) as u8).collect();
    local.write_at(0, &bytes).unwrap();
    let sender = TcpSender::connect(receiver.local_addr(), &config, local.clone(), None).unwrap();
    let queue = SendQueue::new(sender, SLOTS).unwrap();
    Pair {
        _receiver: receiver,
        local,
        queue,
    }
}

struct Latency {
    mean_us: f64,
    p99_us: f64,
}

fn summarize(mut samples: Vec<Duration>) -> Latency {
    samples.sort();
    let total: Duration = samples.iter().sum();
    Latency {
        mean_us: total.as_secs_f64() * 1e6 / samples.len() as f64,
        p99_us: samples[samples.len() * 99 / 100].as_secs_f64() * 1e6,
    }
}

fn raw_ping_pong(round_trips: usize) -> Latency {
    let listener = TcpListener::bind(loopback()).unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_nodelay(true).unwrap();
        let mut message = [0u8; 64];
        while stream.read_exact(&mut message).is_ok() {
            stream.write_all(&message).unwrap();
        }
    });
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut message = [7u8; 64];
    let mut samples = Vec::with_capacity(round_trips);
    for i in 0..round_trips + round_trips / 10 {
        let started = Instant::now();
        stream.write_all(&message).unwrap();
        stream.read_exact(&mut message).unwrap();
        if i >= round_trips / 10 {
            samples.push(started.elapsed());
        }
    }
    drop(stream);
    echo.join().unwrap();
    summarize(samples)
}

fn mirrored_round_trip(round_trips: usize) -> Latency {
    let pair = pair();
    let mut samples = Vec::with_capacity(round_trips);
    let record = [0x5au8; 64];
    for i in 0..round_trips + round_trips / 10 {
        let offset = (i as u64 * 64) % LOG_LEN as u64;
        let started = Instant::now();
        pair.local.write_at(offset, &record).unwrap();
        let mut reservation = pair.queue.reserve_timeout(1, WAIT).unwrap();
        let id = reservation.post(MirrorWrite {
            src_offset: offset,
            dst_offset: offset,
            len_bytes: 64,
        });
        pair.queue.wait_placed_timeout(id, WAIT).unwrap();
        if i >= round_trips / 10 {
            samples.push(started.elapsed());
        }
    }
    summarize(samples)
}

/// MiB/s of `total_bytes` in `write_len`-byte writes over one raw socket,
/// the receiver copying into memory, timed until it acknowledges the end.
fn raw_stream(write_len: usize, total_bytes: u64) -> f64 {
    let listener = TcpListener::bind(loopback()).unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mirror = SharedMemory::zeroed(LOG_LEN);
        let mut buf = vec![0u8; 1 << 20];
        let mut received = 0u64;
        while received < total_bytes {
            let read = stream.read(&mut buf).unwrap();
            assert!(read > 0, "raw sender hung up early");
            let offset = received % LOG_LEN as u64;
            let len = read.min(LOG_LEN - offset as usize);
            mirror.write_at(offset, &buf[..len]).unwrap();
            received += read as u64;
        }
        stream.write_all(&[1]).unwrap();
    });
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let data = vec![0x33u8; write_len];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < total_bytes {
        stream.write_all(&data).unwrap();
        sent += write_len as u64;
    }
    let mut ack = [0u8; 1];
    stream.read_exact(&mut ack).unwrap();
    let elapsed = started.elapsed();
    receiver.join().unwrap();
    mib_per_s(total_bytes, elapsed)
}

/// MiB/s of `total_bytes` in `write_len`-byte writes through the queue, from
/// `writers` threads appending to one log under a lock; timed until the
/// last write is placed.
fn queue_stream(write_len: usize, total_bytes: u64, writers: usize) -> f64 {
    let pair = pair();
    let writes = total_bytes / write_len as u64;
    let log = Mutex::new((0u64, 0u64)); // (writes posted, next offset)
    let slots = pair.queue.slots_for(write_len as u64);
    let started = Instant::now();
    thread::scope(|scope| {
        for _ in 0..writers {
            scope.spawn(|| {
                let mut last = WriteId::NONE;
                loop {
                    let mut reservation = pair.queue.reserve_timeout(slots, WAIT).unwrap();
                    let mut log = log.lock().unwrap();
                    if log.0 == writes {
                        break;
                    }
                    let mut offset = log.1;
                    if offset + write_len as u64 > LOG_LEN as u64 {
                        offset = 0;
                    }
                    last = reservation.post(MirrorWrite {
                        src_offset: offset,
                        dst_offset: offset,
                        len_bytes: write_len as u64,
                    });
                    *log = (log.0 + 1, offset + write_len as u64);
                }
                if last != WriteId::NONE {
                    pair.queue.wait_placed_timeout(last, WAIT).unwrap();
                }
            });
        }
    });
    let elapsed = started.elapsed();
    assert_eq!(pair.queue.placed(), pair.queue.posted());
    mib_per_s(writes * write_len as u64, elapsed)
}

fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let quick = std::env::var("NVMIRROR_BENCH_QUICK").is_ok_and(|v| v == "1");
    let scale = if quick {
        Scale {
            round_trips: 2_000,
            stream_bytes: 64 << 20,
        }
    } else {
        Scale {
            round_trips: 20_000,
            stream_bytes: 1 << 30,
        }
    };
    let started = Instant::now();
    println!(
        "interconnect benchmark ({} mode, loopback, {} slots, {} round trips, {} MiB per stream)",
        if quick { "quick" } else { "full" },
        SLOTS,
        scale.round_trips,
        scale.stream_bytes >> 20
    );
    let raw = raw_ping_pong(scale.round_trips);
    let mirrored = mirrored_round_trip(scale.round_trips);

    println!();
    println!("| benchmark | raw TCP | send queue + TCP transport | ratio |");
    println!("|---|---:|---:|---:|");
    println!(
        "| 64 B round trip, mean | {:.1} µs | {:.1} µs | {:.2}x latency |",
        raw.mean_us,
        mirrored.mean_us,
        mirrored.mean_us / raw.mean_us
    );
    println!(
        "| 64 B round trip, p99 | {:.1} µs | {:.1} µs | {:.2}x latency |",
        raw.p99_us,
        mirrored.p99_us,
        mirrored.p99_us / raw.p99_us
    );
    for write_len in [4 << 10, 64 << 10] {
        let raw = raw_stream(write_len, scale.stream_bytes);
        for writers in [1, MANY_WRITERS] {
            let queued = queue_stream(write_len, scale.stream_bytes, writers);
            println!(
                "| {} KiB writes, {} writer{} | {:.0} MiB/s | {:.0} MiB/s | {:.2}x throughput |",
                write_len >> 10,
                writers,
                if writers == 1 { "" } else { "s" },
                raw,
                queued,
                queued / raw
            );
        }
    }
    println!();
    println!("finished in {:.1} s", started.elapsed().as_secs_f64());
}
