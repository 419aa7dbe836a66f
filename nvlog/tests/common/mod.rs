//! Helpers shared by the nvlog integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use nvlog::{Geometry, Log, RecordData, Region};

pub const NODE: u32 = 1;

pub fn memory_log(half_len: u64) -> (Arc<Region>, Log) {
    let region = Arc::new(Region::in_memory(
        NODE,
        Geometry::new(half_len).expect("valid geometry"),
    ));
    let (log, recovery) = Log::open(region.clone()).expect("open a fresh log");
    assert!(recovery.formatted);
    (region, log)
}

/// A payload unique to `lsn_hint` with no zero byte, so that a record cut
/// short can never look whole.
pub fn payload(tag: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((tag as usize * 131 + i * 7) % 251 + 1) as u8)
        .collect()
}

pub fn append_write(log: &Log, volume: u32, offset: u64, data: &[u8]) -> nvlog::Appended {
    let reservation = log.try_reserve(data.len()).expect("room in the log");
    log.append(reservation, &RecordData::write(volume, offset, data))
        .expect("append")
}

/// (lsn, volume, offset, payload) of a scanned record.
pub type Found = (u64, u32, u64, Vec<u8>);

/// Every record a scan of `image` yields, and where it stopped.
pub fn scan_all(image: &[u8]) -> (Vec<Found>, Option<nvlog::ScanStop>) {
    let mut scanner = nvlog::Scanner::new(image).expect("scannable image");
    let records = scanner
        .by_ref()
        .map(|r| {
            (
                r.header.lsn,
                r.header.volume,
                r.header.offset,
                r.payload.to_vec(),
            )
        })
        .collect();
    (records, scanner.stop().copied())
}
