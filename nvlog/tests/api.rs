//! The log's API on memory and file regions: append, persist, halves,
//! consistency points, recovery.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use nvlog::{Error, Geometry, HalfState, Log, PersistMode, RecordData, Region, StopReason};

const HALF: u64 = 64 * 1024;

#[test]
fn appends_get_dense_lsns_and_contiguous_ranges() {
    let (region, log) = memory_log(HALF);
    let mut previous_end = None;
    for i in 0..10u64 {
        let data = payload(i, 100 + i as usize * 10);
        let appended = append_write(&log, 3, i * 512, &data);
        assert_eq!(appended.lsn, i + 1);
        assert_eq!(appended.range.start % 64, 0, "records are 64-byte aligned");
        if let Some(end) = previous_end {
            assert_eq!(appended.range.start, end, "records are contiguous");
        }
        previous_end = Some(appended.range.end);
    }
    let (records, stop) = scan_all(&log.live_image());
    assert_eq!(records.len(), 10);
    for (i, (lsn, volume, offset, bytes)) in records.iter().enumerate() {
        assert_eq!(*lsn, i as u64 + 1);
        assert_eq!(*volume, 3);
        assert_eq!(*offset, i as u64 * 512);
        assert_eq!(*bytes, payload(i as u64, 100 + i * 10));
    }
    assert_eq!(stop.expect("stopped").reason, StopReason::Empty);
    assert_eq!(region.mode(), PersistMode::Memory);
}

#[test]
fn appended_range_holds_exactly_the_record_bytes() {
    let (region, log) = memory_log(HALF);
    let data = payload(9, 1000);
    let appended = append_write(&log, 1, 0, &data);
    let mut bytes = vec![0; (appended.range.end - appended.range.start) as usize];
    region.read(region.local_log().offset + appended.range.start, &mut bytes);
    let expected = nvlog::record::encode_record(&RecordData::write(1, 0, &data), 1, 1);
    assert_eq!(bytes, expected);
}

#[test]
fn write_zeroes_and_trim_records_scan_back() {
    let (_region, log) = memory_log(HALF);
    for data in [
        RecordData::write_zeroes(2, 4096, 1 << 20),
        RecordData::trim(2, 0, 8192),
    ] {
        let reservation = log.try_reserve(0).expect("room");
        log.append(reservation, &data).expect("append");
    }
    let image = log.live_image();
    let mut scanner = nvlog::Scanner::new(&image).expect("scan");
    let first = scanner.next().expect("write-zeroes record").header;
    assert_eq!(
        (first.kind, first.offset, first.extent_len),
        (nvlog::RecordKind::WriteZeroes, 4096, 1 << 20)
    );
    let second = scanner.next().expect("trim record").header;
    assert_eq!(
        (second.kind, second.offset, second.extent_len),
        (nvlog::RecordKind::Trim, 0, 8192)
    );
}

#[test]
fn oversized_record_is_refused_with_the_limit() {
    let (_region, log) = memory_log(HALF);
    let max = log.max_payload_len();
    assert!(log.try_reserve(max).is_ok());
    let refused = log.try_reserve(max + 1).map(|r| r.len_bytes());
    match refused {
        Err(Error::RecordTooLarge {
            len_bytes,
            max_bytes,
        }) => assert_eq!((len_bytes, max_bytes), (max + 1, max)),
        other => panic!("expected RecordTooLarge, got {other:?}"),
    }
}

/// Fill both halves; the next reservation must wait until a consistency
/// point frees one, and then succeed.
#[test]
fn reserve_waits_for_a_free_half_and_timeout_and_try_give_up() {
    let (_region, log) = memory_log(HALF);
    let log = Arc::new(log);
    let record_payload = 4000;
    let mut closed = Vec::new();
    loop {
        match log.try_reserve(record_payload) {
            Ok(reservation) => {
                let appended = log
                    .append(
                        reservation,
                        &RecordData::write(1, 0, &payload(1, record_payload)),
                    )
                    .expect("append");
                closed.extend(appended.closed_half);
            }
            Err(Error::WouldBlock { .. }) => break,
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!(closed, vec![0], "half 0 closed when it filled");
    assert!(matches!(
        log.reserve_timeout(record_payload, Duration::from_millis(50)),
        Err(Error::ReserveTimeout { .. })
    ));
    // A writer waits in reserve; a consistency point frees half 0.
    let waiter = {
        let log = log.clone();
        std::thread::spawn(move || {
            let reservation = log.reserve(record_payload).expect("space after the CP");
            log.append(
                reservation,
                &RecordData::write(1, 0, &payload(2, record_payload)),
            )
            .expect("append")
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !waiter.is_finished(),
        "the writer must wait while both halves are in use"
    );
    log.begin_flush(0).expect("begin CP");
    log.free_half(0).expect("end CP");
    let appended = waiter.join().expect("writer thread");
    assert_eq!(appended.closed_half, Some(1));
    assert!(
        appended.header_range.is_some(),
        "the switch writes the header before the record"
    );
    let status = log.status();
    assert_eq!(status.halves[0].state, HalfState::Filling);
    assert_eq!(status.halves[1].state, HalfState::Closed);
}

#[test]
fn dropped_reservation_returns_its_space() {
    let (_region, log) = memory_log(HALF);
    let before = log.status().reserved_bytes;
    let reservation = log.try_reserve(1000).expect("room");
    assert_eq!(
        log.status().reserved_bytes,
        before + reservation.len_bytes()
    );
    drop(reservation);
    assert_eq!(log.status().reserved_bytes, before);
}

#[test]
fn halves_must_be_flushed_in_order_and_states_are_checked() {
    let (_region, log) = memory_log(HALF);
    append_write(&log, 1, 0, b"a");
    assert!(matches!(
        log.free_half(0),
        Err(Error::HalfState { half: 0, .. })
    ));
    assert!(
        matches!(log.begin_flush(0), Err(Error::HalfState { half: 0, .. })),
        "filling, not closed"
    );
    assert_eq!(log.switch_half(), Some(0));
    assert_eq!(log.switch_half(), None, "the other half is still in use");
    log.begin_flush(0).expect("CP starts");
    log.free_half(0).expect("CP ends");
    assert_eq!(log.status().flushed_lsn, 1);
    // The next append writes the header for the new half first.
    let appended = append_write(&log, 1, 0, b"b");
    assert!(appended.header_range.is_some());
    assert_eq!(appended.lsn, 2);
}

#[test]
fn persist_reports_unappended_lsn_and_advances() {
    let (_region, log) = memory_log(HALF);
    append_write(&log, 1, 0, b"x");
    assert!(matches!(
        log.persist(5),
        Err(Error::LsnNotAppended {
            lsn: 5,
            last_lsn: 1
        })
    ));
    log.persist(1).expect("persist");
    assert_eq!(log.persisted_lsn(), 1);
}

#[test]
fn recovery_continues_after_the_last_record_and_skips_flushed_halves() {
    let (region, log) = memory_log(HALF);
    for i in 0..30 {
        append_write(&log, 1, i * 4096, &payload(i, 3000));
    }
    let status = log.status();
    assert_eq!(
        status.halves[0].state,
        HalfState::Closed,
        "30 records of 3 KiB fill a 64 KiB half"
    );
    let first_in_half_1 = status.halves[1].first_lsn;
    log.begin_flush(0).expect("CP");
    log.free_half(0).expect("CP");
    log.persist(log.last_lsn()).expect("persist");
    let image = region.crash_image(7);
    drop(log);

    let region =
        Arc::new(Region::from_image(NODE, region.geometry(), &image).expect("region from image"));
    let (log, recovery) = Log::open(region).expect("recover");
    assert_eq!(recovery.first_lsn, Some(first_in_half_1));
    assert_eq!(recovery.last_lsn, Some(30));
    let (records, _) = scan_all(&log.live_image());
    assert_eq!(
        records.first().map(|r| r.0),
        Some(first_in_half_1),
        "flushed records are not replayed"
    );
    assert_eq!(records.last().map(|r| r.0), Some(30));
    let appended = append_write(&log, 1, 0, b"after recovery");
    assert_eq!(appended.lsn, 31);
}

#[test]
fn recovery_is_idempotent() {
    let (region, log) = memory_log(HALF);
    for i in 0..5 {
        append_write(&log, 1, i, &payload(i, 500));
    }
    log.persist(3).expect("persist");
    let image = region.crash_image(99);
    let geometry = region.geometry();
    let once = Arc::new(Region::from_image(NODE, geometry, &image).expect("image"));
    let (log_once, first) = Log::open(once.clone()).expect("first recovery");
    let after_first = log_once.live_image();
    // Crash again right after recovery (everything recovery wrote is persisted).
    let twice = Arc::new(Region::from_image(NODE, geometry, &once.crash_image(5)).expect("image"));
    let (log_twice, second) = Log::open(twice).expect("second recovery");
    assert_eq!(first.last_lsn, second.last_lsn);
    assert_eq!(
        scan_all(&after_first).0,
        scan_all(&log_twice.live_image()).0
    );
}

#[test]
fn file_region_persists_across_reopen_and_rejects_other_geometry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nvram");
    let geometry = Geometry::new(HALF).expect("geometry");
    {
        let region = Arc::new(Region::open(&path, NODE, geometry).expect("open file region"));
        assert_eq!(
            region.mode(),
            PersistMode::Msync,
            "a plain file system is not DAX"
        );
        let (log, recovery) = Log::open(region).expect("open log");
        assert!(recovery.formatted);
        append_write(&log, 4, 8192, b"durable bytes");
        log.persist(1).expect("persist");
    }
    {
        let region = Arc::new(Region::open(&path, NODE, geometry).expect("reopen"));
        let (log, recovery) = Log::open(region).expect("recover");
        assert_eq!(recovery.last_lsn, Some(1));
        let (records, _) = scan_all(&log.live_image());
        assert_eq!(records, vec![(1, 4, 8192, b"durable bytes".to_vec())]);
    }
    let other = Geometry::new(2 * HALF).expect("geometry");
    assert!(matches!(
        Region::open(&path, NODE, other),
        Err(Error::RegionMismatch { .. })
    ));
    assert!(matches!(
        Region::open(&path, NODE + 1, geometry),
        Err(Error::RegionMismatch { .. })
    ));
}

#[test]
fn unusable_region_paths_give_clear_errors() {
    let geometry = Geometry::new(HALF).expect("geometry");
    let missing_dir = std::path::Path::new("/nonexistent-nvmirror-dir/nvram");
    let error = Region::open(missing_dir, NODE, geometry).expect_err("missing directory");
    assert!(matches!(error, Error::Open { .. }));
    assert!(
        error
            .to_string()
            .contains("/nonexistent-nvmirror-dir/nvram"),
        "{error}"
    );
    assert!(matches!(Geometry::new(1000), Err(Error::Geometry { .. })));
    assert!(matches!(
        Geometry::new(HALF + 1),
        Err(Error::Geometry { .. })
    ));
}

#[test]
fn foreign_file_is_not_mistaken_for_a_region() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nvram");
    std::fs::write(&path, b"this is not an NVRAM region, it is a text file").expect("write");
    let error = Region::open(&path, NODE, Geometry::new(HALF).expect("geometry"))
        .expect_err("foreign file");
    assert!(
        matches!(error, Error::RegionHeaderCorrupt { .. }),
        "{error}"
    );
}

#[test]
fn geometry_offsets_agree_between_nodes() {
    let a = Region::in_memory(1, Geometry::new(HALF).expect("geometry"));
    let b = Region::in_memory(2, Geometry::new(HALF).expect("geometry"));
    assert_eq!(a.local_log(), b.local_log());
    assert_eq!(a.mirror(), b.mirror());
    assert_eq!(a.local_log().len, a.mirror().len);
    assert_eq!(a.mirror().offset, a.local_log().offset + a.local_log().len);
    assert_eq!(a.len(), a.mirror().offset + a.mirror().len);
}

/// A partner mirror is a byte copy of the log: copying the live ranges to
/// another region's mirror area makes it scan exactly like the log.
#[test]
fn mirror_copy_of_live_ranges_scans_like_the_log() {
    let (region, log) = memory_log(HALF);
    let partner = Region::in_memory(2, region.geometry());
    for i in 0..25 {
        append_write(&log, 1, i * 512, &payload(i, 2500));
    }
    let mut buf = Vec::new();
    for range in log.live_ranges() {
        buf.resize((range.end - range.start) as usize, 0);
        region.read(region.local_log().offset + range.start, &mut buf);
        partner.write(partner.mirror().offset + range.start, &buf);
    }
    assert_eq!(
        scan_all(&partner.snapshot(partner.mirror())).0,
        scan_all(&log.live_image()).0
    );
}

#[test]
fn discard_all_forgets_every_record_across_a_restart() {
    let (region, log) = memory_log(HALF);
    for i in 0..25 {
        append_write(&log, 1, i * 4096, &payload(i, 3000));
    }
    log.discard_all().expect("discard");
    assert_eq!(scan_all(&log.live_image()).0.len(), 0);
    let appended = append_write(&log, 1, 0, b"after the discard");
    assert_eq!(appended.lsn, 26, "LSNs go on");
    log.persist(appended.lsn).expect("persist");
    let region = Arc::new(
        Region::from_image(NODE, region.geometry(), &region.crash_image(3)).expect("image"),
    );
    let (log, recovery) = Log::open(region).expect("recover");
    assert_eq!(recovery.first_lsn, Some(26));
    assert_eq!(scan_all(&log.live_image()).0.len(), 1);
}

/// A writer that lost the right to write while it waited for space is
/// turned away under the order lock: nothing is appended, the space goes
/// back, and the log's accounting stays whole.
#[test]
fn an_append_not_admitted_appends_nothing_and_returns_its_space() {
    let (_region, log) = memory_log(HALF);
    append_write(&log, 1, 0, b"before");
    let data = RecordData::write(1, 512, b"from a writer fenced while it waited");
    let reservation = log.reserve(data.payload.len()).expect("space");
    assert!(log.status().reserved_bytes > 0);
    let appended = log
        .append_admitted(reservation, &data, || false, |appended| appended.lsn)
        .expect("no error");
    assert_eq!(appended, None);
    assert_eq!(log.status().reserved_bytes, 0);
    assert_eq!(log.last_lsn(), 1);
    assert_eq!(scan_all(&log.live_image()).0.len(), 1);
    assert_eq!(
        append_write(&log, 1, 0, b"after").lsn,
        2,
        "LSNs have no gap"
    );
}

/// Discarding the log under a writer that holds space would let its record
/// land in the fresh log: refused with an error the caller retries on.
#[test]
fn discard_all_refuses_while_a_writer_holds_space() {
    let (_region, log) = memory_log(HALF);
    append_write(&log, 1, 0, b"replayed by the partner");
    let reservation = log.reserve(100).expect("space");
    match log.discard_all() {
        Err(Error::ReservationsOutstanding { reserved_bytes }) => assert!(reserved_bytes > 0),
        other => panic!("discard_all under a reservation: {other:?}"),
    }
    assert_eq!(scan_all(&log.live_image()).0.len(), 1, "nothing discarded");
    drop(reservation);
    log.discard_all().expect("discard once the writer is gone");
    assert_eq!(scan_all(&log.live_image()).0.len(), 0);
}

/// After a crash that lost records the partner's mirror holds, the log
/// reuses their offsets and LSNs. A resync that copies the live ranges and
/// a guard is right at first, but once the log grows past the guard the
/// mirror's scan goes on into the lost records (found by the simulation:
/// a takeover replayed an unacknowledged write over an acknowledged one).
/// The first resync after a recovery copies the filling half to its end.
#[test]
fn the_first_resync_after_a_recovery_clears_lost_records_from_the_mirror() {
    let (region, log) = memory_log(HALF);
    let record = |i: u64| payload(i, 1000);
    for i in 0..10 {
        append_write(&log, 1, i * 4096, &record(i));
    }
    log.persist(log.last_lsn()).expect("persist");
    let before = region.crash_image(1);
    for i in 10..25 {
        append_write(&log, 1, i * 4096, &record(i));
    }
    let copy_into = |partner: &Region, region: &Region, ranges: Vec<std::ops::Range<u64>>| {
        let mut buf = Vec::new();
        for range in ranges {
            buf.resize((range.end - range.start) as usize, 0);
            region.read(region.local_log().offset + range.start, &mut buf);
            partner.write(partner.mirror().offset + range.start, &buf);
        }
    };
    let lsns = |image: &[u8]| scan_all(image).0.iter().map(|r| r.0).collect::<Vec<_>>();
    for whole_filling_half in [false, true] {
        // The partner's mirror held all 25 (placed, never persisted here).
        let partner = Region::in_memory(2, region.geometry());
        partner.write(partner.mirror().offset, &log.live_image());
        let recovered =
            Arc::new(Region::from_image(NODE, region.geometry(), &before).expect("image"));
        let (after, _) = Log::open(Arc::clone(&recovered)).expect("recover");
        let (ranges, ()) = after.live_ranges_with(whole_filling_half, || ());
        copy_into(&partner, &recovered, ranges);
        // Three more records of the same size, each mirrored as it is
        // appended: the log now ends where the lost 14th sits in the mirror.
        for i in 0..3 {
            let appended = append_write(&after, 1, i * 4096, &payload(90 + i, 1000));
            copy_into(&partner, &recovered, vec![appended.range.clone()]);
        }
        let local = lsns(&after.live_image());
        assert_eq!(local, (1..=13).collect::<Vec<u64>>());
        let mirrored = lsns(&partner.snapshot(partner.mirror()));
        if whole_filling_half {
            assert_eq!(mirrored, local, "the mirror scans like the log");
        } else {
            assert!(
                mirrored.len() > local.len(),
                "with the guard alone the mirror goes on into lost records: {mirrored:?}"
            );
        }
    }
}

/// A resync copies only the live ranges, over a partner mirror that may
/// hold a longer history of the same half: records the local log lost in
/// a crash, at the offsets the log reuses. What lies beyond the tail in the
/// mirror must not read as a continuation of the log.
#[test]
fn live_ranges_copied_over_a_longer_mirror_scan_like_the_log() {
    let (region, log) = memory_log(HALF);
    let record = |i: u64| payload(i, 1000);
    for i in 0..10 {
        append_write(&log, 1, i * 4096, &record(i));
    }
    log.persist(log.last_lsn()).expect("persist");
    // What a crash after the tenth record leaves: its durable image.
    let before = region.crash_image(1);
    for i in 10..25 {
        append_write(&log, 1, i * 4096, &record(i));
    }
    // The partner's mirror held all 25 (placed, never persisted here).
    let partner = Region::in_memory(2, region.geometry());
    partner.write(partner.mirror().offset, &log.live_image());

    let region = Arc::new(Region::from_image(NODE, region.geometry(), &before).expect("image"));
    let (log, _) = Log::open(Arc::clone(&region)).expect("recover");
    assert_eq!(log.last_lsn(), 10);
    // The same length as the lost eleventh record: the next offset is
    // where the lost twelfth record still sits in the mirror, with the
    // LSN that would come next.
    append_write(&log, 1, 0, &payload(99, 1000));
    let mut buf = Vec::new();
    for range in log.live_ranges() {
        buf.resize((range.end - range.start) as usize, 0);
        region.read(region.local_log().offset + range.start, &mut buf);
        partner.write(partner.mirror().offset + range.start, &buf);
    }
    let lsns = |image: &[u8]| scan_all(image).0.iter().map(|r| r.0).collect::<Vec<_>>();
    let local = lsns(&log.live_image());
    assert_eq!(local, (1..=11).collect::<Vec<u64>>());
    assert_eq!(lsns(&partner.snapshot(partner.mirror())), local);
    assert_eq!(
        scan_all(&partner.snapshot(partner.mirror())).0,
        scan_all(&log.live_image()).0
    );
}

#[test]
fn started_writeback_cleans_the_pages_without_a_persist() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nvram");
    let region = Region::open(&path, NODE, Geometry::new(HALF).expect("geometry")).expect("open");
    let mirror = region.mirror();
    let page = 4096u64;
    let at = mirror.offset.next_multiple_of(page);
    region.write(at, &[0xa5; 4096]);
    let address = region.as_ptr() as u64 + at;
    let on_tmpfs = nix::sys::statfs::statfs(dir.path())
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
    if on_tmpfs {
        eprintln!("skipped: the temporary directory is on tmpfs, which has no writeback");
        return;
    }
    let Some(dirty) = page_is_dirty(address) else {
        eprintln!("skipped: /proc/self/pagemap shows no page frames (needs root)");
        return;
    };
    assert!(dirty, "a page just written through the mapping is dirty");
    region
        .start_writeback(mirror.offset, mirror.len)
        .expect("start writeback");
    // The kernel would leave the page dirty for 30 s (dirty_expire) unless
    // something starts its writeback; it completes in the background.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while page_is_dirty(address).expect("page frames readable") {
        assert!(
            std::time::Instant::now() < deadline,
            "the started writeback never cleaned the page"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut back = [0u8; 4096];
    region.read(at, &mut back);
    assert_eq!(back, [0xa5; 4096]);
}

/// Whether the page cache page mapped at `address` is dirty (or under
/// writeback), from /proc/self/pagemap and /proc/kpageflags; None when the
/// page frame is hidden (not root).
fn page_is_dirty(address: u64) -> Option<bool> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const PFN_MASK: u64 = (1 << 55) - 1;
    const KPF_DIRTY: u64 = 1 << 4;
    const KPF_WRITEBACK: u64 = 1 << 8;
    let read_u64 = |path: &str, index: u64| -> Option<u64> {
        let file = std::fs::File::open(path).ok()?;
        let mut bytes = [0u8; 8];
        file.read_exact_at(&mut bytes, index * 8).ok()?;
        Some(u64::from_le_bytes(bytes))
    };
    let entry = read_u64("/proc/self/pagemap", address / 4096)?;
    let frame = entry & PFN_MASK;
    if entry & PRESENT == 0 || frame == 0 {
        return None;
    }
    let flags = read_u64("/proc/kpageflags", frame)?;
    Some(flags & (KPF_DIRTY | KPF_WRITEBACK) != 0)
}

#[test]
fn started_writeback_promises_nothing_in_memory() {
    let region = Region::in_memory(NODE, Geometry::new(HALF).expect("geometry"));
    let mirror = region.mirror();
    let before = region.crash_image(7);
    region.write(mirror.offset + 4096, &[0xa5; 64]);
    region
        .start_writeback(mirror.offset, mirror.len)
        .expect("start writeback");
    // Of unpersisted bytes a crash keeps a seeded subset: some seed keeps
    // none of them, so nothing was made durable.
    let durable_unchanged = (0..64).any(|seed| region.crash_image(seed) == before);
    assert!(
        durable_unchanged,
        "start_writeback made memory bytes durable"
    );
}

/// A half switch's generation lives in memory until its header is
/// persisted. A crash that keeps the new half's records (the page cache
/// writes pages back in any order) but loses that header must not let a
/// later pass of the half reuse the generation: the stale records would
/// continue the log with the same LSNs. (Found by the crash property test,
/// seed 6858979975270916198.)
#[test]
fn a_generation_lost_with_its_header_in_a_crash_is_not_reused() {
    let (region, log) = memory_log(HALF);
    let whole = nvlog::Area {
        offset: 0,
        len: region.len(),
    };
    let data = |tag: u64| payload(tag, 1000);
    for lsn in 1..=3 {
        append_write(&log, 1, lsn * 4096, &data(lsn));
    }
    log.persist(3).expect("persist");
    let header_before_switch = region.snapshot(region.local_log());
    log.switch_half().expect("switch");
    for lsn in 4..=5 {
        append_write(&log, 1, lsn * 4096, &data(lsn));
    }
    // The crash keeps the new half's records, not the header naming it.
    let mut image = region.snapshot(whole);
    let local = region.local_log();
    let header_block = nvlog::region::LOG_HEADER_BYTES as usize;
    image[local.offset as usize..local.offset as usize + header_block]
        .copy_from_slice(&header_before_switch[..header_block]);
    drop(log);
    let region = Arc::new(Region::from_image(NODE, region.geometry(), &image).expect("image"));
    let (log, recovery) = Log::open(region.clone()).expect("recover");
    assert_eq!(recovery.last_lsn, Some(3));
    // The same switch again, and a record 4 of the same length as the lost
    // one: record 5 of the lost pass sits right behind it.
    log.switch_half().expect("switch again");
    append_write(&log, 1, 4 * 4096, &payload(40, 1000));
    log.persist(4).expect("persist");
    drop(log);
    let image = region.snapshot(whole);
    let region = Arc::new(Region::from_image(NODE, region.geometry(), &image).expect("image"));
    let (log, recovery) = Log::open(region).expect("recover");
    assert_eq!(
        recovery.last_lsn,
        Some(4),
        "record 5 of a pass lost in the crash came back as part of the log"
    );
    let (records, _) = scan_all(&log.live_image());
    assert_eq!(records.last().map(|r| r.3.clone()), Some(payload(40, 1000)));
}
