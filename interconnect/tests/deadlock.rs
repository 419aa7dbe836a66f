//! The deadlock the reservation split avoids.
//!
//! Completion handling needs the log lock (as the node's does: a
//! completion may update log state under it). All slots are in flight.
//!
//! - With the split, a writer waits for a slot in `reserve` holding nothing;
//!   the completion thread takes the lock, completes, a slot frees, the
//!   writer goes on. The system makes progress.
//! - Without it, a writer takes the log lock and then waits for a slot.
//!   The completion thread can never take the lock, so no slot ever frees:
//!   a hang. The test shows it in a bounded way: after a deadline nothing
//!   has moved, and it is released by cutting the transport.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use common::{watchdog, LONG};
use interconnect::inproc::{self, Delivery, InProcConfig, InProcLink};
use interconnect::{Error, MirrorWrite, SendQueue, SharedMemory};

const SLOTS: usize = 2;

fn setup() -> (SendQueue, InProcLink) {
    let (transport, link) = inproc::link(
        SharedMemory::zeroed(4096),
        SharedMemory::zeroed(4096),
        InProcConfig {
            max_in_flight: SLOTS,
            delivery: Delivery::Manual,
            ..InProcConfig::default()
        },
    );
    (SendQueue::new(transport, SLOTS).unwrap(), link)
}

fn write(i: u64) -> MirrorWrite {
    MirrorWrite {
        src_offset: i * 8,
        dst_offset: i * 8,
        len_bytes: 8,
    }
}

/// Fills every slot with a write in flight.
fn fill_slots(queue: &SendQueue) {
    let mut reservation = queue.reserve_timeout(SLOTS, LONG).unwrap();
    for i in 0..SLOTS as u64 {
        let _ = reservation.post(write(i));
    }
    assert_eq!(queue.free_slots(), 0);
}

/// Completion handling that needs the log lock; counts completion rounds
/// that placed something.
fn completion_thread<'a>(
    scope: &'a thread::Scope<'a, '_>,
    log_lock: &'a Mutex<u64>,
    link: &'a InProcLink,
    stop: &'a AtomicBool,
    progress: &'a AtomicU64,
) -> thread::ScopedJoinHandle<'a, ()> {
    scope.spawn(move || {
        while !stop.load(Ordering::Acquire) {
            {
                let _log = log_lock.lock().unwrap();
                if link.deliver_all() > 0 {
                    progress.fetch_add(1, Ordering::AcqRel);
                }
            }
            thread::sleep(Duration::from_millis(1));
        }
    })
}

#[test]
fn with_the_split_a_full_queue_keeps_making_progress() {
    let _watchdog = watchdog("deadlock_split", Duration::from_secs(30));
    let (queue, link) = setup();
    fill_slots(&queue);
    let log_lock = Mutex::new(SLOTS as u64);
    let (stop, progress) = (AtomicBool::new(false), AtomicU64::new(0));
    thread::scope(|scope| {
        let completions = completion_thread(scope, &log_lock, &link, &stop, &progress);
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let (queue, log_lock) = (&queue, &log_lock);
                scope.spawn(move || {
                    for _ in 0..25 {
                        // Suspendable phase: wait for a slot holding nothing.
                        let mut reservation = queue.reserve_timeout(1, LONG).unwrap();
                        // Modify phase: the log lock, a post that cannot block.
                        let id = {
                            let mut log = log_lock.lock().unwrap();
                            *log += 1;
                            reservation.post(write(*log % 500))
                        };
                        queue.wait_placed_timeout(id, LONG).unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        stop.store(true, Ordering::Release);
        completions.join().unwrap();
    });
    assert_eq!(queue.posted().get(), SLOTS as u64 + 100);
    assert_eq!(queue.placed(), queue.posted());
    assert!(progress.load(Ordering::Acquire) > 0);
}

#[test]
fn without_the_split_a_full_queue_hangs_until_the_link_is_cut() {
    let _watchdog = watchdog("deadlock_no_split", Duration::from_secs(30));
    let (queue, link) = setup();
    fill_slots(&queue);
    let log_lock = Mutex::new(0u64);
    let (stop, progress) = (AtomicBool::new(false), AtomicU64::new(0));
    let writer_has_lock = AtomicBool::new(false);
    thread::scope(|scope| {
        // The wrong order: take the log lock, then wait for a slot.
        let writer = scope.spawn(|| {
            let _log = log_lock.lock().unwrap();
            writer_has_lock.store(true, Ordering::Release);
            queue.reserve_timeout(1, LONG).map(|r| r.remaining())
        });
        let deadline = Instant::now() + LONG;
        while !writer_has_lock.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline);
            thread::yield_now();
        }
        let completions = completion_thread(scope, &log_lock, &link, &stop, &progress);

        // Nothing can move: completions need the lock the writer holds
        // while it waits for a slot only a completion can free.
        thread::sleep(Duration::from_millis(300));
        assert_eq!(progress.load(Ordering::Acquire), 0, "no completion ran");
        assert_eq!(queue.free_slots(), 0);
        assert_eq!(link.pending(), SLOTS);
        assert!(!writer.is_finished(), "the writer is stuck in reserve");

        // Cut the link: the reserve wait ends with an error, the lock is
        // released, the system moves again.
        link.cut();
        let result = writer.join().unwrap();
        assert!(
            matches!(result, Err(Error::Disconnected { .. })),
            "{result:?}"
        );
        stop.store(true, Ordering::Release);
        completions.join().unwrap();
    });
    assert_eq!(queue.in_flight(), 0, "the cut reclaimed the slots");
}
