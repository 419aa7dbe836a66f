//! Writes the seed corpus of the `scan` fuzz target: real log images (their
//! header block and first records), so the fuzzer starts from valid CRCs.
//!
//! `cargo run -p nvlog --example fuzz_seeds -- nvlog/fuzz/corpus/scan`

use std::sync::Arc;

use nvlog::{Geometry, Log, RecordData, Region};

/// A named way to fill a log.
type Seed<'a> = (&'a str, &'a dyn Fn(&Log));

/// Seeds cover the header block and the start of half 0.
const SEED_BYTES: usize = 16 * 1024;

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: fuzz_seeds <corpus dir>");
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    let geometry = Geometry::new(64 * 1024).expect("geometry");
    let seeds: [Seed; 4] = [
        ("fresh", &|_log: &Log| {}),
        ("writes", &|log: &Log| {
            for i in 0..6u8 {
                let payload = vec![i + 1; 100 * (i as usize + 1)];
                append(log, RecordData::write(1, i as u64 * 4096, &payload));
            }
        }),
        ("zeroes-and-trims", &|log: &Log| {
            append(log, RecordData::write_zeroes(2, 0, 1 << 20));
            append(log, RecordData::trim(2, 4096, 8192));
            append(log, RecordData::write(2, 512, b"after the trim"));
        }),
        ("after-checkpoint", &|log: &Log| {
            append(log, RecordData::write(3, 0, &[7; 3000]));
            log.switch_half().expect("switch");
            log.begin_flush(0).expect("begin CP");
            log.free_half(0).expect("free");
            append(log, RecordData::write(3, 0, &[8; 200]));
        }),
    ];
    for (name, fill) in seeds {
        let region = Arc::new(Region::in_memory(1, geometry));
        let (log, _) = Log::open(region).expect("log");
        fill(&log);
        let image = log.live_image();
        std::fs::write(format!("{dir}/{name}"), &image[..SEED_BYTES]).expect("write seed");
    }
}

fn append(log: &Log, data: RecordData<'_>) {
    let reservation = log.try_reserve(data.payload.len()).expect("room");
    log.append(reservation, &data).expect("append");
}
