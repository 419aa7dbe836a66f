//! Corruption: every damaged record is detected, and the scan stops there.

mod common;

use common::*;
use nvlog::record::{encode_record, RECORD_HEADER_BYTES};
use nvlog::{HalfState, RecordData, StopReason};

const HALF: u64 = 64 * 1024;
/// 960 bytes of payload + 64 of header = 1024: no padding, so cutting the
/// record short anywhere changes its bytes.
const PAYLOAD: usize = 960;

/// A log image with three records; returns the image and the byte range of
/// the middle one.
fn three_records() -> (Vec<u8>, std::ops::Range<usize>) {
    let (_region, log) = memory_log(HALF);
    append_write(&log, 1, 0, &payload(1, PAYLOAD));
    let middle = append_write(&log, 1, 4096, &payload(2, PAYLOAD));
    append_write(&log, 1, 8192, &payload(3, PAYLOAD));
    let range = middle.range.start as usize..middle.range.end as usize;
    (log.live_image(), range)
}

#[test]
fn every_byte_flip_of_a_record_is_detected() {
    let (image, middle) = three_records();
    assert_eq!(scan_all(&image).0.len(), 3);
    for at in middle.clone() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut damaged = image.clone();
            damaged[at] ^= mask;
            let (records, stop) = scan_all(&damaged);
            let stop = stop.expect("scan ended");
            assert_eq!(
                records.iter().map(|r| r.0).collect::<Vec<_>>(),
                vec![1],
                "flip {mask:#x} at record byte {} was not detected (stop: {stop:?})",
                at - middle.start
            );
            assert_eq!(stop.offset, middle.start as u64);
            assert_eq!(stop.expected_lsn, 2);
            if at - middle.start >= RECORD_HEADER_BYTES {
                assert_eq!(stop.reason, StopReason::PayloadCrc);
            }
        }
    }
}

#[test]
fn a_record_cut_short_at_every_offset_is_detected() {
    let (image, middle) = three_records();
    // A cut at offset k: the record's bytes from k on never landed. The last
    // record is the one cut (a torn tail), so nothing follows it.
    let (_region, log) = memory_log(HALF);
    append_write(&log, 1, 0, &payload(1, PAYLOAD));
    let last = append_write(&log, 1, 4096, &payload(2, PAYLOAD));
    let whole = log.live_image();
    assert_eq!(
        &whole[..middle.end],
        &image[..middle.end],
        "same two first records"
    );
    for cut in 0..(last.range.end - last.range.start) as usize {
        let mut torn = whole.clone();
        torn[last.range.start as usize + cut..last.range.end as usize].fill(0);
        let (records, stop) = scan_all(&torn);
        assert_eq!(
            records.len(),
            1,
            "record cut at byte {cut} was taken as whole"
        );
        let stop = stop.expect("scan ended");
        assert_eq!(stop.expected_lsn, 2);
        let expected = match cut {
            0 => StopReason::Empty,
            1..=3 => StopReason::BadMagic,
            c if c < RECORD_HEADER_BYTES => StopReason::HeaderCrc,
            _ => StopReason::PayloadCrc,
        };
        assert_eq!(stop.reason, expected, "cut at byte {cut}");
    }
}

#[test]
fn stale_record_from_an_earlier_pass_is_rejected_by_generation() {
    let (_region, log) = memory_log(HALF);
    // Pass 1 fills half 0 with small records; pass 2 fills half 1.
    let mut i = 0;
    while log.status().halves[1].state == HalfState::Free {
        append_write(&log, 1, i, &payload(i, 200));
        i += 1;
    }
    log.begin_flush(0).expect("CP");
    log.free_half(0).expect("CP");
    while log.status().halves[0].state == HalfState::Free {
        append_write(&log, 1, i, &payload(i, 200));
        i += 1;
    }
    // Half 0 is in its second pass (generation 3) with one record; the rest
    // of the half still holds generation-1 records.
    let status = log.status();
    assert_eq!(status.halves[0].generation, 3);
    assert_eq!(status.halves[0].state, HalfState::Filling);
    let (records, stop) = scan_all(&log.live_image());
    assert_eq!(records.last().map(|r| r.0), Some(i));
    let stop = stop.expect("scan ended");
    assert_eq!(stop.half, 0);
    assert_eq!(
        stop.reason,
        StopReason::StaleGeneration {
            found: 1,
            expected: 3
        }
    );
}

#[test]
fn a_gap_in_lsns_stops_the_scan() {
    let (region, log) = memory_log(HALF);
    let data = payload(1, 500);
    let records: Vec<_> = (0..4)
        .map(|i| append_write(&log, 1, i * 512, &data))
        .collect();
    // Put a valid record with LSN 7 where LSN 3 should be.
    let generation = log.status().halves[0].generation;
    let impostor = encode_record(&RecordData::write(1, 1024, &data), generation, 7);
    region.write(
        region.local_log().offset + records[2].range.start,
        &impostor,
    );
    let (found, stop) = scan_all(&log.live_image());
    assert_eq!(found.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(
        stop.expect("stop").reason,
        StopReason::LsnGap {
            found: 7,
            expected: 3
        }
    );
}

#[test]
fn a_destroyed_header_refuses_recovery() {
    let (region, log) = memory_log(HALF);
    append_write(&log, 1, 0, b"x");
    region.fill(region.local_log().offset, 4096, 0xee);
    let error = nvlog::Scanner::new(&log.live_image()).expect_err("no valid header");
    assert!(
        matches!(error, nvlog::Error::LogHeaderCorrupt { .. }),
        "{error}"
    );
    let image = region.crash_image(1);
    let restarted = std::sync::Arc::new(
        nvlog::Region::from_image(NODE, region.geometry(), &image).expect("image"),
    );
    assert!(matches!(
        nvlog::Log::open(restarted),
        Err(nvlog::Error::LogHeaderCorrupt { .. })
    ));
}

#[test]
fn a_blank_mirror_scans_as_an_empty_log() {
    let region = nvlog::Region::in_memory(2, nvlog::Geometry::new(HALF).expect("geometry"));
    let (records, stop) = scan_all(&region.snapshot(region.mirror()));
    assert!(records.is_empty());
    assert_eq!(stop.expect("stop").reason, StopReason::Empty);
}
