//! `nvmirror nvlog dump`: what a node's NVRAM holds, for operators and tests.

use std::fmt::Write as _;
use std::path::Path;

use nvlog::{Region, Scanner};

/// Which log area of a region to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogArea {
    /// This node's own log.
    Local,
    /// The image of the partner's log.
    Mirror,
}

/// A human-readable listing of the log area: its header, up to `limit`
/// records, and where and why the scan stopped.
pub fn dump(path: &Path, area: LogArea, limit: usize) -> Result<String, nvlog::Error> {
    let region = Region::open_existing(path)?;
    let geometry = region.geometry();
    let range = match area {
        LogArea::Local => region.local_log(),
        LogArea::Mirror => region.mirror(),
    };
    let image = region.snapshot(range);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "region {}: node {}, {} bytes, halves of {} bytes, persist mode {}",
        path.display(),
        region.node_id(),
        region.len(),
        geometry.half_len(),
        region.mode().as_str()
    );
    let _ = writeln!(
        out,
        "{area:?} log at region offset {}, {} bytes",
        range.offset, range.len
    );
    let mut scanner = Scanner::new(&image)?;
    match scanner.header() {
        None => {
            let _ = writeln!(out, "header: blank (never written)");
        }
        Some(header) => {
            let _ = writeln!(
                out,
                "header: node {} seq {} flushed_lsn {} max_generation {}",
                header.node_id, header.seq, header.flushed_lsn, header.max_generation
            );
            for (index, half) in header.halves.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "  half {index}: {} generation {} first_lsn {}",
                    half.state, half.generation, half.first_lsn
                );
            }
        }
    }
    let mut count = 0usize;
    for record in scanner.by_ref() {
        if count < limit {
            let _ = writeln!(out, "  @{:<10} {:?}", record.log_offset, record.header);
        }
        count += 1;
    }
    if count > limit {
        let _ = writeln!(out, "  … {} more", count - limit);
    }
    let stop = scanner.stop().expect("scan finished");
    let _ = writeln!(
        out,
        "{count} live records; scan stopped in half {} at offset {} expecting LSN {}: {}",
        stop.half, stop.offset, stop.expected_lsn, stop.reason
    );
    Ok(out)
}
