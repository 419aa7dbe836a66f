//! `nvmirror nvlog dump` on real NVRAM files, through the real binary.

use std::process::Command;
use std::sync::Arc;

use nvlog::{Geometry, Log, RecordData, Region};

fn nvmirror(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nvmirror"))
        .args(args)
        .output()
        .expect("run nvmirror")
}

#[test]
fn dump_lists_header_records_and_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nvram");
    {
        let region = Arc::new(
            Region::open(&path, 7, Geometry::new(64 * 1024).expect("geometry")).expect("region"),
        );
        let (log, _) = Log::open(region).expect("log");
        for i in 0..3u64 {
            let reservation = log.try_reserve(100).expect("room");
            log.append(
                reservation,
                &RecordData::write(2, i * 4096, &[i as u8 + 1; 100]),
            )
            .expect("append");
        }
        log.persist(3).expect("persist");
    }
    let output = nvmirror(&["nvlog", "dump", path.to_str().expect("utf-8 path")]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listing = String::from_utf8(output.stdout).expect("utf-8");
    assert!(listing.contains("node 7"), "{listing}");
    assert!(
        listing.contains("half 0: filling generation 1 first_lsn 1"),
        "{listing}"
    );
    assert!(
        listing.contains("Write lsn=3 gen=1 vol=2 off=8192 len=100"),
        "{listing}"
    );
    assert!(listing.contains("3 live records"), "{listing}");
    assert!(
        listing.contains("expecting LSN 4: empty (never written)"),
        "{listing}"
    );

    let mirror = nvmirror(&[
        "nvlog",
        "dump",
        "--area",
        "mirror",
        path.to_str().expect("utf-8 path"),
    ]);
    let listing = String::from_utf8(mirror.stdout).expect("utf-8");
    assert!(listing.contains("header: blank"), "{listing}");
}

#[test]
fn dump_of_a_missing_or_foreign_file_fails_clearly() {
    let missing = nvmirror(&["nvlog", "dump", "/nonexistent/nvram"]);
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("cannot open the NVRAM file /nonexistent/nvram"),
        "{stderr}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("not-nvram");
    std::fs::write(&path, vec![0x42u8; 8192]).expect("write");
    let foreign = nvmirror(&["nvlog", "dump", path.to_str().expect("utf-8 path")]);
    assert!(!foreign.status.success());
    let stderr = String::from_utf8_lossy(&foreign.stderr);
    assert!(stderr.contains("not an nvmirror NVRAM region"), "{stderr}");
    assert_eq!(
        std::fs::read(&path).expect("read"),
        vec![0x42u8; 8192],
        "left untouched"
    );
}
