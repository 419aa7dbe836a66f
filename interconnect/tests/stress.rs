//! Many writers against one send queue, over the in-process transport (with
//! a completion thread, like an RDMA CQ poller) and over TCP: capacity is
//! never exceeded, every write is placed exactly once, and the mirror ends
//! up equal to the log.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use common::{config, loopback, pattern, read_all, watchdog, LONG};
use interconnect::inproc::{self, Delivery, InProcConfig};
use interconnect::{
    MirrorReceiver, MirrorWrite, SendQueue, SharedMemory, TcpConfig, TcpSender, WriteId,
};

const WRITERS: u64 = 8;
const WRITES_PER_WRITER: u64 = 400;
const LOG_LEN: usize = 8 << 20;

/// The node's write path in miniature: reserve (may wait, holds nothing),
/// then under the log lock append to the local log and post, then wait.
/// Returns the bytes written in total.
fn run_writers(queue: &SendQueue, local: &SharedMemory) -> u64 {
    let log_end = Mutex::new(0u64);
    let max_seen = AtomicUsize::new(0);
    let stop_monitor = AtomicBool::new(false);
    thread::scope(|scope| {
        let monitor = scope.spawn(|| {
            while !stop_monitor.load(Ordering::Acquire) {
                let used = queue.capacity() - queue.free_slots();
                assert!(used <= queue.capacity());
                max_seen.fetch_max(queue.in_flight(), Ordering::AcqRel);
                thread::yield_now();
            }
        });
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let log_end = &log_end;
                scope.spawn(move || {
                    let mut last = WriteId::NONE;
                    for i in 0..WRITES_PER_WRITER {
                        let tag = writer * WRITES_PER_WRITER + i;
                        // 1..=3000 bytes: some need two work requests.
                        let len = 1 + (tag * 7919 % 3000) as usize;
                        let data = pattern(tag, len);
                        let mut reservation = queue
                            .reserve_timeout(queue.slots_for(len as u64), LONG)
                            .expect("slots within the timeout");
                        let id = {
                            let mut end = log_end.lock().unwrap();
                            let offset = *end;
                            local.write_at(offset, &data).unwrap();
                            *end += len as u64;
                            reservation.post(MirrorWrite {
                                src_offset: offset,
                                dst_offset: offset,
                                len_bytes: len as u64,
                            })
                        };
                        assert!(id > last, "ids grow in post order");
                        last = id;
                        if i % 4 == 0 {
                            queue.wait_placed_timeout(id, LONG).expect("placed");
                        }
                    }
                    queue.wait_placed_timeout(last, LONG).expect("placed");
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        stop_monitor.store(true, Ordering::Release);
        monitor.join().unwrap();
    });
    assert!(max_seen.load(Ordering::Acquire) <= queue.capacity());
    assert_eq!(queue.in_flight(), 0);
    assert_eq!(queue.free_slots(), queue.capacity());
    assert_eq!(queue.placed(), queue.posted());
    let total = *log_end.lock().unwrap();
    total
}

#[test]
fn many_writers_over_the_in_process_transport() {
    let _watchdog = watchdog("stress_inproc", Duration::from_secs(60));
    let local = SharedMemory::zeroed(LOG_LEN);
    let mirror = SharedMemory::zeroed(LOG_LEN);
    let (transport, link) = inproc::link(
        local.clone(),
        mirror.clone(),
        InProcConfig {
            max_in_flight: 16,
            max_write_len_bytes: 2048,
            delivery: Delivery::Manual,
            ..InProcConfig::default()
        },
    );
    let queue = SendQueue::new(transport, 16).unwrap();
    let done = AtomicBool::new(false);
    let total = thread::scope(|scope| {
        // The completion thread: places and completes whatever is posted.
        scope.spawn(|| {
            while !done.load(Ordering::Acquire) {
                if link.deliver_all() == 0 {
                    thread::yield_now();
                }
            }
        });
        let total = run_writers(&queue, &local);
        done.store(true, Ordering::Release);
        total
    });
    assert_eq!(
        link.delivered(),
        queue.posted().get(),
        "every work request placed exactly once"
    );
    assert_eq!(link.delivered_through(), queue.posted());
    let (mirror, local) = (read_all(&mirror), read_all(&local));
    assert_eq!(&mirror[..total as usize], &local[..total as usize]);
    assert!(mirror[total as usize..].iter().all(|b| *b == 0));
}

#[test]
fn many_writers_over_tcp() {
    let _watchdog = watchdog("stress_tcp", Duration::from_secs(60));
    let config = TcpConfig {
        send_depth: 32,
        max_frame_len_bytes: 4096,
        ..config()
    };
    let local = SharedMemory::zeroed(LOG_LEN);
    let mirror = SharedMemory::zeroed(LOG_LEN);
    let receiver = MirrorReceiver::bind(loopback(), &config, mirror.clone(), None).unwrap();
    let sender = TcpSender::connect(receiver.local_addr(), &config, local.clone(), None).unwrap();
    let queue = SendQueue::new(sender, 32).unwrap();
    let total = run_writers(&queue, &local);
    let stats = receiver.stats();
    assert_eq!(
        stats.bytes_applied, total,
        "every byte applied exactly once"
    );
    assert_eq!(stats.applied_through, queue.posted().get());
    let (mirror, local) = (read_all(&mirror), read_all(&local));
    assert_eq!(&mirror[..total as usize], &local[..total as usize]);
    assert!(mirror[total as usize..].iter().all(|b| *b == 0));
}
