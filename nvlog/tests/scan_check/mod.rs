//! The property the scan fuzz target checks, shared with the test that
//! replays the committed corpus and every crash the fuzzer ever found
//! (`nvlog/fuzz/regressions/scan/`).

use nvlog::record::{body_matches, RECORD_HEADER_BYTES};
use nvlog::region::LOG_HEADER_BYTES;

/// The smallest geometry: 4 KiB header block + two 64 KiB halves.
const HALF: usize = 64 * 1024;
const IMAGE: usize = LOG_HEADER_BYTES as usize + 2 * HALF;

/// Any bytes, laid over a blank log image, must scan without panicking,
/// yield only records that validate, in dense LSN order, and stop with a
/// reason.
pub fn check_scan(data: &[u8]) {
    // A short input leaves the rest of the image zero, so inputs can target
    // the header block and the first records.
    let mut image = vec![0u8; IMAGE];
    let len = data.len().min(IMAGE);
    image[..len].copy_from_slice(&data[..len]);
    let Ok(mut scanner) = nvlog::Scanner::new(&image) else {
        return;
    };
    let mut previous: Option<u64> = None;
    for record in scanner.by_ref() {
        if let Some(previous) = previous {
            assert_eq!(record.header.lsn, previous + 1, "LSNs are dense");
        }
        previous = Some(record.header.lsn);
        let start = record.log_offset as usize;
        let body = &image[start + RECORD_HEADER_BYTES..start + record.header.encoded_len()];
        assert!(body_matches(&record.header, body));
        assert_eq!(record.payload.len(), record.header.payload_len as usize);
    }
    assert!(
        scanner.stop().is_some(),
        "a finished scan says where it stopped"
    );
}
