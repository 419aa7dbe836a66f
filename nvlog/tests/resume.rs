//! A scan resumed over windows of the log (what the partner's warm index
//! does while the mirror fills) yields exactly what one scan of the whole
//! image yields, and stops where it stops, whatever the window size.

mod common;

use common::{append_write, memory_log, payload, scan_all, Found};
use nvlog::record::RECORD_HEADER_BYTES;
use nvlog::region::LOG_HEADER_BYTES;
use nvlog::{LogHeader, ScanPosition, ScanStop, Scanner, StopReason};

const HALF: u64 = 64 * 1024;

/// Scan `image` from its first live half in windows of `window` bytes,
/// each copied out of the image as the warm index copies from the mirror.
fn scan_in_windows(image: &[u8], window: usize) -> (Vec<Found>, ScanStop) {
    let header = *Scanner::new(image).expect("header").header().expect("live");
    let first = header.live_halves()[0];
    let mut at = ScanPosition {
        half: first,
        offset_in_half: 0,
        expected_lsn: header.halves[first].first_lsn,
    };
    let mut found = Vec::new();
    let mut window = window;
    loop {
        let start = LOG_HEADER_BYTES + at.half as u64 * HALF + at.offset_in_half;
        let end = (start + window as u64).min(LOG_HEADER_BYTES + (at.half as u64 + 1) * HALF);
        let bytes = image[start as usize..end as usize].to_vec();
        let mut scanner = Scanner::resume(header, at, &bytes, start).expect("live half");
        let before = found.len();
        found.extend(scanner.by_ref().map(|r| {
            (
                r.header.lsn,
                r.header.volume,
                r.header.offset,
                r.payload.to_vec(),
            )
        }));
        let stop = *scanner.stop().expect("stopped");
        let next = scanner.position().expect("a position");
        if stop.reason != StopReason::EndOfWindow {
            return (found, stop);
        }
        if found.len() == before && next == at {
            // One record larger than the window: read more at once.
            window *= 2;
        }
        at = next;
    }
}

fn assert_same_as_whole(image: &[u8]) {
    let (whole, whole_stop) = scan_all(image);
    let whole_stop = whole_stop.expect("stopped");
    for window in [64, 100, 4096, 5000, 65536, 200_000] {
        let (windowed, stop) = scan_in_windows(image, window);
        assert_eq!(windowed, whole, "records, window {window}");
        assert_eq!(stop, whole_stop, "stop, window {window}");
    }
}

#[test]
fn windows_of_any_size_agree_with_one_scan_across_halves() {
    let (region, log) = memory_log(HALF);
    for i in 0..40 {
        append_write(
            &log,
            1,
            i * 4096,
            &payload(i, 1000 + (i as usize * 97) % 3000),
        );
    }
    assert_same_as_whole(&log.live_image());
    // After a consistency point freed the older half, and the log wrapped.
    log.begin_flush(0).expect("CP");
    log.free_half(0).expect("CP");
    for i in 40..60 {
        append_write(&log, 2, i * 4096, &payload(i, 2500));
    }
    assert_same_as_whole(&log.live_image());
    drop(region);
}

#[test]
fn a_torn_tail_ends_a_windowed_scan_where_it_ends_a_whole_one() {
    let (_region, log) = memory_log(HALF);
    let mut last = None;
    for i in 0..12 {
        last = Some(append_write(&log, 1, i * 4096, &payload(i, 1500)));
    }
    let mut image = log.live_image();
    let last = last.expect("appended");
    // Tear the payload of the last record: one byte flipped.
    let at = last.range.start as usize + RECORD_HEADER_BYTES + 10;
    image[at] ^= 0xff;
    assert_same_as_whole(&image);
    let (records, stop) = scan_in_windows(&image, 4096);
    assert_eq!(records.len(), 11);
    assert_eq!(stop.reason, StopReason::PayloadCrc);
}

#[test]
fn a_position_outside_the_live_halves_or_a_window_outside_the_log_is_refused() {
    let header = LogHeader::fresh(1, HALF);
    let at = ScanPosition {
        half: 1,
        offset_in_half: 0,
        expected_lsn: 1,
    };
    assert!(
        Scanner::resume(header, at, &[], LOG_HEADER_BYTES + HALF).is_none(),
        "half 1 is free"
    );
    let at = ScanPosition { half: 0, ..at };
    assert!(Scanner::resume(header, at, &[0; 64], LOG_HEADER_BYTES + 2 * HALF).is_none());
    assert!(Scanner::resume(header, at, &[0; 64], LOG_HEADER_BYTES).is_some());
}
