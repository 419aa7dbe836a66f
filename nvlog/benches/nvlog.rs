//! NVLog throughput: append, and append + persist, against a plain memcpy
//! into the same mapping measured in the same run.
//!
//! `cargo bench -p nvlog` (set `NVMIRROR_BENCH_QUICK=1` for a few-second
//! smoke run, `NVMIRROR_BENCH_DIR` to place the NVRAM file elsewhere than
//! `target/`). The file sits on whatever file system holds that directory:
//! persist is msync there (or cache-line flushes on DAX).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvlog::{Geometry, HalfState, Log, RecordData, Region};

struct Case {
    record_bytes: usize,
    threads: usize,
}

#[derive(Clone, Copy)]
enum Mode {
    Memcpy,
    Append,
    AppendPersist,
}

fn main() {
    let quick = std::env::var_os("NVMIRROR_BENCH_QUICK").is_some();
    let run_for = if quick {
        Duration::from_millis(150)
    } else {
        Duration::from_secs(1)
    };
    let half_len: u64 = if quick { 8 << 20 } else { 64 << 20 };
    let dir = std::env::var_os("NVMIRROR_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-nvlog")
        });
    std::fs::create_dir_all(&dir).expect("create the bench directory");
    let path = dir.join("nvram");
    let _ = std::fs::remove_file(&path);
    let region = Arc::new(
        Region::open(&path, 1, Geometry::new(half_len).expect("geometry")).expect("NVRAM file"),
    );
    let (log, _) = Log::open(region.clone()).expect("log");
    let log = Arc::new(log);

    println!(
        "nvlog benchmark: {} mode, {} MiB halves, {:?} per case{}",
        region.mode().as_str(),
        half_len >> 20,
        run_for,
        if quick { " (quick)" } else { "" }
    );
    println!(
        "{:>8} {:>7} | {:>12} {:>8} | {:>12} {:>8} {:>6} | {:>12} {:>8} {:>6}",
        "record",
        "threads",
        "memcpy rec/s",
        "GB/s",
        "append rec/s",
        "GB/s",
        "ratio",
        "+persist r/s",
        "GB/s",
        "ratio"
    );
    for case in [512usize, 4096, 65536]
        .into_iter()
        .flat_map(|record_bytes| {
            [1usize, 2].map(|threads| Case {
                record_bytes,
                threads,
            })
        })
    {
        let memcpy = run(&region, &log, &case, Mode::Memcpy, run_for);
        let append = run(&region, &log, &case, Mode::Append, run_for);
        let persist = run(&region, &log, &case, Mode::AppendPersist, run_for);
        let gbps = |records_per_s: f64| records_per_s * case.record_bytes as f64 / 1e9;
        println!(
            "{:>8} {:>7} | {:>12.0} {:>8.2} | {:>12.0} {:>8.2} {:>6.2} | {:>12.0} {:>8.3} {:>6.3}",
            case.record_bytes,
            case.threads,
            memcpy,
            gbps(memcpy),
            append,
            gbps(append),
            append / memcpy,
            persist,
            gbps(persist),
            persist / memcpy
        );
    }
    println!("ratio = records/s of the mode / records/s of memcpy into the same mapping, same record size and threads");
    let _ = std::fs::remove_file(&path);
    scan_throughput(half_len, run_for);
}

/// The scan a takeover (or recovery) runs over a full log image: every
/// record's header and payload checked, against a memcpy of the same bytes.
fn scan_throughput(half_len: u64, run_for: Duration) {
    println!();
    println!(
        "scan of a full log image ({} MiB halves), one thread:",
        half_len >> 20
    );
    println!(
        "{:>8} | {:>11} | {:>10} {:>10} {:>6}",
        "record", "memcpy GB/s", "scan GB/s", "rec/s", "ratio"
    );
    for record_bytes in [512usize, 4096, 65536] {
        let region = Arc::new(Region::in_memory(
            1,
            Geometry::new(half_len).expect("geometry"),
        ));
        let (log, _) = Log::open(region).expect("log");
        let payload = vec![0xa5u8; record_bytes];
        let mut records = 0u64;
        while let Ok(reservation) = log.try_reserve(record_bytes) {
            log.append(reservation, &RecordData::write(1, records * 4096, &payload))
                .expect("append");
            records += 1;
        }
        let image = log.live_image();
        let mut copy = vec![0u8; image.len()];
        let repeat = |work: &mut dyn FnMut()| {
            let started = Instant::now();
            let mut rounds = 0u32;
            while rounds == 0 || started.elapsed() < run_for {
                work();
                rounds += 1;
            }
            started.elapsed().as_secs_f64() / f64::from(rounds)
        };
        let memcpy_s = repeat(&mut || {
            copy.copy_from_slice(&image);
            std::hint::black_box(&copy);
        });
        let mut scanned = 0u64;
        let scan_s = repeat(&mut || {
            let scanner = nvlog::Scanner::new(&image).expect("scannable");
            scanned = scanner.map(|r| r.payload.len() as u64).sum::<u64>();
            std::hint::black_box(scanned);
        });
        assert_eq!(
            scanned,
            records * record_bytes as u64,
            "every record scanned"
        );
        let gbps = |seconds: f64| image.len() as f64 / seconds / 1e9;
        println!(
            "{:>8} | {:>11.2} | {:>10.2} {:>10.0} {:>6.2}",
            record_bytes,
            gbps(memcpy_s),
            gbps(scan_s),
            records as f64 / scan_s,
            memcpy_s / scan_s
        );
    }
    println!("ratio = scan throughput / memcpy throughput of the same image (1.00: the scan runs at memory bandwidth)");
}

/// Records per second over `run_for`, summed over the case's threads.
fn run(region: &Arc<Region>, log: &Arc<Log>, case: &Case, mode: Mode, run_for: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    // A consistency point that frees closed halves at once, as if the
    // volumes absorbed them instantly: the benchmark measures the log alone.
    let cp = {
        let log = log.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let status = log.status();
                let closed = (0..2).find(|&half| status.halves[half].state == HalfState::Closed);
                match closed {
                    Some(half) => {
                        log.begin_flush(half).expect("begin CP");
                        log.free_half(half).expect("free half");
                    }
                    None => std::thread::sleep(Duration::from_micros(50)),
                }
            }
        })
    };
    let started = Instant::now();
    let workers: Vec<_> = (0..case.threads)
        .map(|thread| {
            let region = region.clone();
            let log = log.clone();
            let record_bytes = case.record_bytes;
            let threads = case.threads;
            std::thread::spawn(move || {
                let payload = vec![0x5au8 ^ thread as u8; record_bytes];
                let mirror = region.mirror();
                // The memcpy baseline writes into the mirror area, each
                // thread in its own slice, wrapping around.
                let slice_len =
                    mirror.len / threads as u64 / record_bytes as u64 * record_bytes as u64;
                let slice_start = mirror.offset + thread as u64 * slice_len;
                let mut records = 0u64;
                while started.elapsed() < run_for {
                    for _ in 0..16 {
                        match mode {
                            Mode::Memcpy => {
                                let at = (records * record_bytes as u64) % slice_len;
                                region.write(slice_start + at, &payload);
                            }
                            Mode::Append | Mode::AppendPersist => {
                                let reservation = log.reserve(record_bytes).expect("reserve");
                                let appended = log
                                    .append(
                                        reservation,
                                        &RecordData::write(1, records * 4096, &payload),
                                    )
                                    .expect("append");
                                if matches!(mode, Mode::AppendPersist) {
                                    log.persist(appended.lsn).expect("persist");
                                }
                            }
                        }
                        records += 1;
                    }
                }
                records
            })
        })
        .collect();
    let records: u64 = workers.into_iter().map(|w| w.join().expect("worker")).sum();
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    cp.join().expect("cp thread");
    records as f64 / elapsed
}
