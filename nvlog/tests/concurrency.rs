//! Many threads appending and persisting: LSN order is byte order, nothing
//! is lost or duplicated, and writers blocked in reserve make progress when
//! consistency points free halves.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nvlog::{HalfState, RecordData};

const THREADS: u64 = 8;

#[test]
fn concurrent_appends_are_dense_ordered_and_complete() {
    // Big enough that nothing needs freeing: the final image holds all.
    let (_region, log) = memory_log(4 << 20);
    let log = Arc::new(log);
    let per_thread = 400u64;
    let writers: Vec<_> = (0..THREADS)
        .map(|thread| {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut appended = Vec::new();
                for seq in 0..per_thread {
                    let data = payload(thread * 10_000 + seq, 64 + (seq as usize * 37) % 1500);
                    let reservation = log.reserve(data.len()).expect("reserve");
                    let record = log
                        .append(reservation, &RecordData::write(thread as u32, seq, &data))
                        .expect("append");
                    if seq % 7 == 0 {
                        log.persist(record.lsn).expect("persist");
                        assert!(log.persisted_lsn() >= record.lsn);
                    }
                    appended.push(record);
                }
                appended
            })
        })
        .collect();
    let mut all: Vec<nvlog::Appended> = writers
        .into_iter()
        .flat_map(|w| w.join().expect("writer"))
        .collect();
    all.sort_by_key(|a| a.lsn);
    let total = THREADS * per_thread;
    assert_eq!(all.len() as u64, total);
    for (index, appended) in all.iter().enumerate() {
        assert_eq!(appended.lsn, index as u64 + 1, "LSNs are dense and unique");
    }
    // Byte order within a half follows LSN order; the switch goes from the
    // half being filled to the other one exactly once.
    for pair in all.windows(2) {
        let same_half =
            (pair[0].range.start < 4096 + (4 << 20)) == (pair[1].range.start < 4096 + (4 << 20));
        if same_half {
            assert_eq!(
                pair[0].range.end, pair[1].range.start,
                "LSN {} and {} not adjacent",
                pair[0].lsn, pair[1].lsn
            );
        } else {
            assert!(
                pair[1].header_range.is_some(),
                "a half switch writes the header"
            );
        }
    }
    // The scan returns every record once, with its bytes.
    let (records, _) = scan_all(&log.live_image());
    assert_eq!(records.len() as u64, total);
    let mut seen = HashSet::new();
    for (lsn, volume, seq, bytes) in records {
        assert!(
            seen.insert((volume, seq)),
            "record ({volume}, {seq}) duplicated"
        );
        assert_eq!(
            bytes,
            payload(
                volume as u64 * 10_000 + seq,
                64 + (seq as usize * 37) % 1500
            ),
            "lsn {lsn}"
        );
    }
}

#[test]
fn writers_blocked_in_reserve_progress_through_consistency_points() {
    let (_region, log) = memory_log(64 * 1024);
    let log = Arc::new(log);
    let stop = Arc::new(AtomicBool::new(false));
    let checkpoints = {
        let log = log.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut freed = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let status = log.status();
                match (0..2).find(|&h| status.halves[h].state == HalfState::Closed) {
                    Some(half) => {
                        log.begin_flush(half).expect("begin CP");
                        log.free_half(half).expect("free");
                        freed += 1;
                    }
                    None => std::thread::sleep(Duration::from_micros(100)),
                }
            }
            freed
        })
    };
    let per_thread = 300u64;
    let writers: Vec<_> = (0..THREADS)
        .map(|thread| {
            let log = log.clone();
            std::thread::spawn(move || {
                (0..per_thread)
                    .map(|seq| {
                        let data = payload(thread + seq, 1000);
                        let reservation = log
                            .reserve_timeout(data.len(), Duration::from_secs(20))
                            .expect("reserve");
                        let lsn = log
                            .append(reservation, &RecordData::write(1, 0, &data))
                            .expect("append")
                            .lsn;
                        log.persist(lsn).expect("persist");
                        lsn
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut lsns: Vec<u64> = writers
        .into_iter()
        .flat_map(|w| w.join().expect("writer"))
        .collect();
    stop.store(true, Ordering::Relaxed);
    let freed = checkpoints.join().expect("cp thread");
    lsns.sort_unstable();
    assert_eq!(lsns, (1..=THREADS * per_thread).collect::<Vec<_>>());
    // 2.4 MB through 64 KiB halves: the writers waited for many CPs.
    assert!(freed > 20, "only {freed} consistency points");
}
