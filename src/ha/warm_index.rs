//! The warm index: the partner's mirror indexed while the partner is
//! healthy, so that a takeover scans only the tail that arrived since the
//! last pass.
//!
//! A pass copies what landed in the mirror since the previous pass, a
//! window at a time, and puts each record's extent into a dirty map per
//! partner volume, exactly as the takeover's scan would ([`Scanner::resume`]
//! decides as one scan of the whole mirror does). Records may land, and be
//! torn, while a pass copies them: a pass ends at the first record that is
//! not whole yet, and the next pass resumes there.
//!
//! The mirror changes under the index in these ways, each handled:
//! - the partner's consistency point frees a half (its flushed LSN moves
//!   past every record in it): the entries of those records are retired,
//!   and the records are forgotten;
//! - the partner opens its next half: the scan goes on in it;
//! - anything else the header shows (the partner's log formatted afresh,
//!   an unreadable header, halves that do not fit, a flushed LSN going
//!   back): the index starts over;
//! - a resync that rewrote records under an unchanged header: the
//!   takeover's check below finds it.
//!
//! A takeover trusts nothing it did not check: it compares the header of
//! every record the index holds with the mirror's bytes (64 bytes a record,
//! each naming its payload's CRC), scans the tail, and starts over with a
//! scan of the whole mirror if anything differs.

use std::collections::HashMap;
use std::sync::Arc;

use interconnect::SharedMemory;
use nvlog::header::{read_header, HeaderRead};
use nvlog::record::RECORD_HEADER_BYTES;
use nvlog::region::LOG_HEADER_BYTES;
use nvlog::{LogHeader, ScanPosition, Scanner, StopReason};

use crate::error::{Error, Result};
use crate::node::recovery::{fits_in, insert_record};
use crate::storage::extents::{ExtentMap, Origin};
use crate::storage::volume::Volume;

/// Bytes copied out of the mirror at once: a pass starts small (an idle
/// mirror costs a header and this much), and doubles while records fill
/// the windows, up to the largest; a record larger than that makes the
/// window grow to hold it.
const FIRST_WINDOW_BYTES: usize = 64 << 10;
const WINDOW_BYTES: usize = 4 << 20;

/// The partner's mirror as the index reads it: through atomic copies,
/// since the transport writes it concurrently (torn bytes are caught by
/// the records' checksums).
#[derive(Debug, Clone)]
pub struct Mirror {
    pub memory: SharedMemory,
    /// Where the mirror lies in the NVRAM region: extents name region
    /// offsets.
    pub region_offset: u64,
}

impl Mirror {
    fn read(&self, log_offset: u64, buf: &mut [u8]) {
        self.memory
            .read_at(log_offset, buf)
            .expect("reads stay inside the mirror (its header describes it)");
    }
}

/// One record the index walked: where it is and its header as it was.
#[derive(Debug, Clone, Copy)]
struct WalkedRecord {
    log_offset: u64,
    half: usize,
    header: [u8; RECORD_HEADER_BYTES],
}

/// What one pass did, for the status and the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Records and bytes the pass found unindexed: how far the index lagged.
    pub records: u64,
    pub bytes: u64,
    /// The pass threw the index away and began again.
    pub started_over: bool,
}

/// The index of the partner's mirror (see the module docs).
#[derive(Debug, Default)]
pub struct WarmIndex {
    /// The mirror header the walked records were read under.
    header: Option<LogHeader>,
    /// Where the next pass resumes; `None` before the first pass.
    position: Option<ScanPosition>,
    /// Every record walked since the start of the oldest live half, in LSN
    /// order (flushed ones too: a takeover checks the whole chain).
    walked: Vec<WalkedRecord>,
    /// Mirror extents of records past the flushed LSN, by volume id.
    extents: HashMap<u32, ExtentMap>,
    /// Bytes of the walked records.
    walked_bytes: u64,
    /// The copy of the mirror a pass scans, kept between passes: a fresh
    /// buffer of megabytes each pass costs the kernel a map, zeroed pages
    /// and an unmap (with its TLB shootdown on every core) 50 times a second.
    window: Vec<u8>,
}

/// The index a takeover serves from.
#[derive(Debug)]
pub struct Finished {
    /// Records past the partner's flushed LSN, now in the volumes' maps.
    pub records: u64,
    /// Records and bytes scanned at takeover: the index's lag.
    pub tail: PassReport,
    /// The index could not be used and the whole mirror was scanned.
    pub cold: bool,
}

impl Finished {
    /// Nothing indexed (the mirror's log was replayed already).
    pub fn nothing() -> Finished {
        Finished {
            records: 0,
            tail: PassReport::default(),
            cold: false,
        }
    }
}

/// The mirror's header, if it is not blank; an error if it is destroyed,
/// does not fit the mirror, or names another node than `partner`.
pub fn check_mirror_header(mirror: &Mirror, partner: u32) -> Result<Option<LogHeader>> {
    match fitting_header(mirror)? {
        Some(header) if header.node_id != partner => Err(Error::WrongMirror {
            found: header.node_id,
            expected: partner,
        }),
        header => Ok(header),
    }
}

/// The mirror's header, if it is not blank; an error if it is destroyed or
/// describes halves that do not fit the mirror (it is the partner's bytes:
/// nothing it says is trusted).
fn fitting_header(mirror: &Mirror) -> Result<Option<LogHeader>> {
    match read_mirror_header(mirror) {
        HeaderRead::Valid(header)
            if LOG_HEADER_BYTES.checked_add(header.half_len.saturating_mul(2))
                != Some(mirror.memory.len() as u64) =>
        {
            Err(nvlog::Error::Geometry {
                reason: format!(
                    "the mirror holds {} bytes, but its header describes {}-byte halves",
                    mirror.memory.len(),
                    header.half_len
                ),
            }
            .into())
        }
        HeaderRead::Valid(header) => Ok(Some(header)),
        HeaderRead::Blank => Ok(None),
        HeaderRead::Corrupt { slot_a, slot_b } => {
            Err(nvlog::Error::LogHeaderCorrupt { slot_a, slot_b }.into())
        }
    }
}

impl WarmIndex {
    /// Records walked, and their bytes.
    pub fn size(&self) -> (u64, u64) {
        (self.walked.len() as u64, self.walked_bytes)
    }

    fn start_over(&mut self) {
        let window = std::mem::take(&mut self.window);
        *self = WarmIndex {
            window,
            ..WarmIndex::default()
        };
    }

    /// Index what landed in `mirror` since the last pass, up to about
    /// `budget_bytes` of records (the rest waits for the next pass).
    pub fn pass(&mut self, mirror: &Mirror, budget_bytes: u64) -> PassReport {
        let mut report = PassReport::default();
        // Which node's log it is, the takeover checks; a header that does
        // not fit the mirror (or none) leaves nothing to index.
        let Ok(Some(header)) = fitting_header(mirror) else {
            report.started_over = self.header.is_some();
            self.start_over();
            return report;
        };
        if !self.reconcile(&header) {
            report.started_over = true;
            self.start_over();
            let _ = self.reconcile(&header);
        }
        self.scan(mirror, Some(budget_bytes), &mut report);
        report
    }

    /// Follow the mirror's current `header`: retire what the partner
    /// flushed, and say whether the walked records still form the chain a
    /// scan of the whole mirror would walk (if not, start over).
    fn reconcile(&mut self, header: &LogHeader) -> bool {
        let Some(before) = self.header else {
            let plan = header.live_halves();
            self.header = Some(*header);
            self.position = plan.first().map(|&half| ScanPosition {
                half,
                offset_in_half: 0,
                expected_lsn: header.halves[half].first_lsn,
            });
            return true;
        };
        if before.half_len != header.half_len || before.node_id != header.node_id {
            return false;
        }
        // A half still holds what was walked in it if it is live in the
        // same pass (generation) from the same first LSN.
        let unchanged = |half: usize| {
            let (was, is) = (before.halves[half], header.halves[half]);
            was.state.is_live()
                && is.state.is_live()
                && was.generation == is.generation
                && was.first_lsn == is.first_lsn
        };
        let Some(position) = self.position else {
            // The mirror was blank before: begin at its first live half.
            self.header = None;
            return self.reconcile(header);
        };
        if !unchanged(position.half) {
            return false;
        }
        if header.flushed_lsn < before.flushed_lsn {
            return false;
        }
        // Halves that changed must have been freed: everything walked in
        // them flushed. Then they are no longer part of the chain.
        let flushed = header.flushed_lsn;
        let mut gone_half = [false; 2];
        for (half, gone) in gone_half.iter_mut().enumerate() {
            *gone = before.halves[half].state.is_live() && !unchanged(half);
        }
        let mut all_flushed = true;
        let mut dropped_bytes = 0;
        self.walked.retain(|record| {
            if !gone_half[record.half] {
                return true;
            }
            all_flushed &= lsn_of(&record.header) <= flushed;
            dropped_bytes += record_len(&record.header);
            false
        });
        if !all_flushed {
            return false;
        }
        self.walked_bytes -= dropped_bytes;
        if flushed > before.flushed_lsn {
            for map in self.extents.values_mut() {
                map.remove_mirror_through(flushed);
            }
            self.extents.retain(|_, map| !map.is_empty());
        }
        self.header = Some(*header);
        true
    }

    /// Scan from the position to the end of what landed (or the budget).
    fn scan(&mut self, mirror: &Mirror, budget_bytes: Option<u64>, report: &mut PassReport) {
        let (Some(header), Some(mut at)) = (self.header, self.position) else {
            return;
        };
        // Walk flushed records too (the chain is checked from its start);
        // only those past the flushed LSN get extents.
        let mut follow = header;
        follow.flushed_lsn = 0;
        let mut window_len = FIRST_WINDOW_BYTES;
        let mut window = std::mem::take(&mut self.window);
        loop {
            if budget_bytes.is_some_and(|budget| report.bytes >= budget) {
                break;
            }
            let half_start = LOG_HEADER_BYTES + at.half as u64 * header.half_len;
            let start = half_start + at.offset_in_half;
            let end = (start + window_len as u64).min(half_start + header.half_len);
            window.resize((end - start) as usize, 0);
            mirror.read(start, &mut window);
            let Some(mut scanner) = Scanner::resume(follow, at, &window, start) else {
                break;
            };
            let before = report.records;
            for record in scanner.by_ref() {
                let mut bytes = [0u8; RECORD_HEADER_BYTES];
                let in_window = (record.log_offset - start) as usize;
                bytes.copy_from_slice(&window[in_window..in_window + RECORD_HEADER_BYTES]);
                self.walked.push(WalkedRecord {
                    log_offset: record.log_offset,
                    half: at.half,
                    header: bytes,
                });
                let len = record.header.encoded_len() as u64;
                self.walked_bytes += len;
                report.records += 1;
                report.bytes += len;
                if record.header.lsn > header.flushed_lsn {
                    insert_record(
                        self.extents.entry(record.header.volume).or_default(),
                        Origin::Mirror,
                        mirror.region_offset,
                        &record,
                    );
                }
            }
            let stop = scanner.stop().copied();
            let next = scanner.position().expect("a resumed scan has a position");
            drop(scanner);
            let moved = next != at;
            at = next;
            match stop {
                Some(stop) if stop.reason == StopReason::EndOfWindow => {
                    if moved || report.records > before {
                        // Records fill the windows: more are likely.
                        window_len = (window_len * 2).min(WINDOW_BYTES).max(window_len);
                    } else if window_len as u64 >= header.half_len {
                        break;
                    } else {
                        // One record larger than the window.
                        window_len *= 2;
                    }
                }
                _ => break,
            }
        }
        self.position = Some(at);
        self.window = window;
    }

    /// At takeover, with nothing landing in the mirror any more: check the
    /// index against the mirror, scan the tail, and move the extents into
    /// `volumes` (freshly opened, their maps empty).
    pub fn finish(
        mut self,
        mirror: &Mirror,
        partner: u32,
        volumes: &[Arc<Volume>],
    ) -> Result<Finished> {
        let Some(header) = check_mirror_header(mirror, partner)? else {
            return Ok(Finished {
                records: 0,
                tail: PassReport::default(),
                cold: self.header.is_none(),
            });
        };
        let mut cold = self.header.is_none();
        if !self.reconcile(&header) || !self.still_in(mirror) {
            tracing::warn!(
                walked = self.walked.len(),
                "the warm index no longer matches the mirror: scanning all of it"
            );
            self.start_over();
            let _ = self.reconcile(&header);
            cold = true;
        }
        let mut tail = PassReport::default();
        self.scan(mirror, None, &mut tail);
        let mut records = 0;
        let mut skips_a_record = false;
        for record in &self.walked {
            let lsn = lsn_of(&record.header);
            if lsn <= header.flushed_lsn {
                continue;
            }
            let decoded = nvlog::record::decode_header(&record.header).expect("walked record");
            let fits = volumes
                .iter()
                .any(|v| v.id == decoded.volume && fits_in(&decoded, v));
            if !fits {
                tracing::error!(
                    volume = decoded.volume,
                    lsn,
                    "mirror record for a volume not served here, or beyond its end; skipped"
                );
                skips_a_record = true;
                break;
            }
            records += 1;
        }
        if skips_a_record {
            // Its extent may have trimmed others in the map: build the maps
            // again through the scan recovery uses, which skips it.
            return Ok(rebuild_skipping_unknown(self, mirror, volumes, tail));
        }
        let mut extents = std::mem::take(&mut self.extents);
        for volume in volumes {
            if let Some(map) = extents.remove(&volume.id) {
                let mut target = volume.extents.lock();
                assert!(target.is_empty(), "a takeover's volume already had extents");
                *target = map;
            }
        }
        assert!(extents.is_empty(), "every record's volume was checked");
        Ok(Finished {
            records,
            tail,
            cold,
        })
    }

    /// Whether every walked record's header is still in the mirror.
    fn still_in(&self, mirror: &Mirror) -> bool {
        let mut bytes = [0u8; RECORD_HEADER_BYTES];
        self.walked.iter().all(|record| {
            mirror.read(record.log_offset, &mut bytes);
            bytes == record.header
        })
    }
}

/// The rare case of a record the takeover must skip: index the mirror
/// afresh through the scan recovery uses, which skips it.
fn rebuild_skipping_unknown(
    index: WarmIndex,
    mirror: &Mirror,
    volumes: &[Arc<Volume>],
    tail: PassReport,
) -> Finished {
    drop(index);
    let mut image = vec![0u8; mirror.memory.len()];
    mirror.read(0, &mut image);
    let records = match Scanner::new(&image) {
        Ok(scanner) => crate::node::recovery::index_records(
            scanner,
            volumes,
            mirror.region_offset,
            Origin::Mirror,
        ),
        Err(_) => 0,
    };
    Finished {
        records,
        tail,
        cold: true,
    }
}

/// Scan the whole mirror as recovery does, into fresh maps, and assert
/// that `volumes` (just filled by [`WarmIndex::finish`]) hold the same
/// extents: an oracle independent of the warm index's bookkeeping.
pub fn assert_same_as_a_full_scan(mirror: &Mirror, volumes: &[Arc<Volume>]) {
    let mut image = vec![0u8; mirror.memory.len()];
    mirror.read(0, &mut image);
    let mut expected: HashMap<u32, ExtentMap> = HashMap::new();
    if let Ok(scanner) = Scanner::new(&image) {
        for record in scanner {
            let volume = record.header.volume;
            if volumes
                .iter()
                .any(|v| v.id == volume && fits_in(&record.header, v))
            {
                insert_record(
                    expected.entry(volume).or_default(),
                    Origin::Mirror,
                    mirror.region_offset,
                    &record,
                );
            }
        }
    }
    for volume in volumes {
        let warm = volume.extents.lock().all_pieces();
        let full = expected
            .get(&volume.id)
            .map(ExtentMap::all_pieces)
            .unwrap_or_default();
        assert_eq!(
            warm, full,
            "the warm index of volume {} differs from a full scan of the mirror",
            volume.name
        );
    }
}

fn read_mirror_header(mirror: &Mirror) -> HeaderRead {
    let mut block = vec![0u8; LOG_HEADER_BYTES as usize];
    mirror.read(0, &mut block);
    read_header(&block)
}

fn lsn_of(header: &[u8; RECORD_HEADER_BYTES]) -> u64 {
    u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"))
}

/// The record's length in the log: header, payload and padding.
fn record_len(header: &[u8; RECORD_HEADER_BYTES]) -> u64 {
    let decoded = nvlog::record::decode_header(header).expect("a walked record's header");
    decoded.encoded_len() as u64
}

/// The warm index as the status shows it.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct WarmProgress {
    pub passes: u64,
    pub last_pass: PassReport,
    pub starts_over: u64,
    /// Records walked (and their bytes) after the last pass.
    pub records: u64,
    pub bytes: u64,
    /// When the indexer last started the mirror's writeback.
    pub writeback_at: Option<std::time::Instant>,
    /// CPU time the indexer thread's passes took (not counted for passes
    /// driven from outside it, as the simulation's).
    pub cpu: std::time::Duration,
}

impl crate::ha::HaNode {
    /// The partner's mirror, as the warm index reads it.
    pub(super) fn mirror_view(&self) -> Mirror {
        let area = self.node.region.mirror();
        Mirror {
            memory: crate::sys::area_memory(&self.node.region, area),
            region_offset: area.offset,
        }
    }

    /// One pass of the warm index, while this node mirrors its partner
    /// (serving its own volumes only). Every `ha.warm_index_writeback_ms` it
    /// also starts the mirror's writeback (records and whatever a resync
    /// copied), so that a takeover's persist has about that much left to
    /// wait for. Starting it does not wait: a pass never waits on the disk.
    pub fn index_mirror(&self, budget_bytes: u64) -> crate::error::Result<PassReport> {
        {
            let state = self.state.lock();
            if state.role != crate::ha::Role::Serving || state.holding.is_some() {
                return Ok(PassReport::default());
            }
        }
        // A takeover may start now and take the index before this pass
        // locks it; the pass then fills a fresh index that nothing trusts
        // unchecked (a later takeover compares it with the mirror).
        let mirror = self.mirror_view();
        let mut index = self.warm_index.lock();
        let report = index.pass(&mirror, budget_bytes);
        let (walked, walked_bytes) = index.size();
        drop(index);
        let writeback_every = self.node.config.ha.warm_index_writeback_ms;
        let now = self.node.environment.clock.now();
        let writeback_due = writeback_every > 0 && {
            let mut progress = self.warm_progress.lock();
            let due = progress.writeback_at.map_or(true, |at| {
                now.duration_since(at).as_millis() >= u128::from(writeback_every)
            });
            if due {
                progress.writeback_at = Some(now);
            }
            due
        };
        if writeback_due {
            let area = self.node.region.mirror();
            self.node.region.start_writeback(area.offset, area.len)?;
        }
        let mut progress = self.warm_progress.lock();
        (progress.records, progress.bytes) = (walked, walked_bytes);
        progress.passes += 1;
        progress.last_pass = report;
        progress.starts_over += u64::from(report.started_over);
        drop(progress);
        if report.started_over {
            tracing::debug!(walked, walked_bytes, "warm index started over");
        }
        Ok(report)
    }

    /// The indexer's loop: a pass every `interval` until the node stops.
    /// The thread's CPU time is counted, for the status: it is the
    /// indexer's whole cost to the write path (a pass takes no lock a
    /// write takes).
    pub fn run_warm_index(&self, interval: std::time::Duration) {
        let thread_cpu = || {
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
                .map(std::time::Duration::from)
                .unwrap_or_default()
        };
        while !self.node.is_stopping() {
            let started = thread_cpu();
            if let Err(error) = self.index_mirror(u64::MAX) {
                tracing::warn!(%error, "warm index pass");
            }
            let spent = thread_cpu().saturating_sub(started);
            self.warm_progress.lock().cpu += spent;
            std::thread::sleep(interval);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::volume::volume_id;
    use crate::testing::fixtures::taken_over_volume;
    use nvlog::{Geometry, Log, RecordData, Region};

    const HALF: u64 = 64 * 1024;
    const PARTNER: u32 = 2;

    /// The partner's log, the mirror its transport fills, and the
    /// partner's volume as a takeover opens it.
    struct Setup {
        _dir: tempfile::TempDir,
        aggregate: std::path::PathBuf,
        log: Log,
        mirror: Mirror,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let aggregate = dir.path().join("aggregate");
        std::fs::create_dir_all(&aggregate).expect("aggregate");
        let region = Arc::new(Region::in_memory(
            PARTNER,
            Geometry::new(HALF).expect("geometry"),
        ));
        let (log, _) = Log::open(region).expect("log");
        let len = log.live_image().len();
        let mirror = Mirror {
            memory: SharedMemory::zeroed(len),
            region_offset: 1 << 30,
        };
        Setup {
            _dir: dir,
            aggregate,
            log,
            mirror,
        }
    }

    /// A 3000-byte write of `tag` bytes to block `block` of the partner's
    /// volume 0.
    fn write_3000_bytes(log: &Log, block: u64, tag: u8) {
        let data = vec![tag; 3000];
        let reservation = log.try_reserve(data.len()).expect("room");
        log.append(
            reservation,
            &RecordData::write(volume_id(PARTNER, 0), block * 4096, &data),
        )
        .expect("append");
    }

    impl Setup {
        fn write(&self, block: u64, tag: u8) {
            write_3000_bytes(&self.log, block, tag);
        }

        /// Everything the partner logged has landed in the mirror.
        fn place_all(&self) {
            self.mirror
                .memory
                .write_at(0, &self.log.live_image())
                .expect("mirror write");
        }

        fn volumes(&self) -> Vec<Arc<Volume>> {
            vec![taken_over_volume(&self.aggregate, PARTNER, 1 << 20)]
        }

        fn finish(&self, index: WarmIndex) -> (Finished, Vec<Arc<Volume>>) {
            let volumes = self.volumes();
            let finished = index
                .finish(&self.mirror, PARTNER, &volumes)
                .expect("finish");
            assert_same_as_a_full_scan(&self.mirror, &volumes);
            (finished, volumes)
        }
    }

    #[test]
    fn a_takeover_scans_only_what_landed_after_the_last_pass() {
        let setup = setup();
        for block in 0..10 {
            setup.write(block, 1);
        }
        setup.place_all();
        let mut index = WarmIndex::default();
        let report = index.pass(&setup.mirror, u64::MAX);
        assert_eq!(report.records, 10);
        assert_eq!(index.size().0, 10);
        for block in 5..8 {
            setup.write(block, 2);
        }
        setup.place_all();
        let (finished, _) = setup.finish(index);
        assert!(!finished.cold);
        assert_eq!(finished.tail.records, 3);
        assert_eq!(finished.records, 13);
    }

    #[test]
    fn a_record_still_landing_is_indexed_by_a_later_pass() {
        let setup = setup();
        for block in 0..4 {
            setup.write(block, 1);
        }
        let image = setup.log.live_image();
        // The last record's payload has not landed yet (zeros).
        let landed = image.len() - HALF as usize * 2 + 3 * 3072 + 2000;
        setup
            .mirror
            .memory
            .write_at(0, &image[..landed])
            .expect("write");
        let mut index = WarmIndex::default();
        assert_eq!(index.pass(&setup.mirror, u64::MAX).records, 3);
        setup.place_all();
        assert_eq!(index.pass(&setup.mirror, u64::MAX).records, 1);
        let (finished, _) = setup.finish(index);
        assert_eq!((finished.cold, finished.tail.records), (false, 0));
    }

    #[test]
    fn a_freed_half_is_retired_and_the_scan_follows_into_the_next() {
        let setup = setup();
        let mut index = WarmIndex::default();
        // Fill half 0 and go on in half 1, indexing along the way.
        for block in 0..30 {
            setup.write(block % 12, block as u8);
            setup.place_all();
            if block % 7 == 0 {
                index.pass(&setup.mirror, 8192);
            }
        }
        index.pass(&setup.mirror, u64::MAX);
        // The partner's consistency point frees half 0; half 0 is reused.
        setup.log.begin_flush(0).expect("CP");
        setup.log.free_half(0).expect("CP");
        setup.place_all();
        index.pass(&setup.mirror, u64::MAX);
        for block in 0..25 {
            setup.write(block % 5, 100 + block as u8);
        }
        setup.place_all();
        let (finished, _) = setup.finish(index);
        assert!(!finished.cold, "{finished:?}");
    }

    #[test]
    fn a_mirror_rewritten_under_the_index_is_scanned_whole() {
        let setup = setup();
        for block in 0..6 {
            setup.write(block, 1);
        }
        setup.place_all();
        let mut index = WarmIndex::default();
        index.pass(&setup.mirror, u64::MAX);
        // A resync after the partner lost its tail: the same offsets and
        // LSNs, other data.
        let other = self::setup();
        for block in 0..6 {
            other.write(block, if block < 4 { 1 } else { 9 });
        }
        setup
            .mirror
            .memory
            .write_at(0, &other.log.live_image())
            .expect("rewrite");
        let (finished, volumes) = setup.finish(index);
        assert!(finished.cold, "the index no longer matched the mirror");
        let pieces = volumes[0].extents.lock().all_pieces();
        assert_eq!(pieces.len(), 6);
    }

    #[test]
    fn a_header_that_does_not_fit_the_mirror_is_refused_not_followed() {
        let setup = setup();
        let region = Arc::new(Region::in_memory(
            PARTNER,
            Geometry::new(HALF * 2).expect("geometry"),
        ));
        let (larger, _) = Log::open(region).expect("log");
        for block in 0..5 {
            write_3000_bytes(&larger, block, 7);
        }
        // As much of a log with larger halves as the mirror holds.
        let image = larger.live_image();
        setup
            .mirror
            .memory
            .write_at(0, &image[..setup.mirror.memory.len()])
            .expect("write");
        let mut index = WarmIndex::default();
        assert_eq!(index.pass(&setup.mirror, u64::MAX).records, 0);
        let volumes = setup.volumes();
        let error = index
            .finish(&setup.mirror, PARTNER, &volumes)
            .expect_err("halves of another size");
        assert!(
            matches!(error, Error::Log(nvlog::Error::Geometry { .. })),
            "{error}"
        );
    }

    #[test]
    fn a_blank_or_foreign_mirror() {
        let setup = setup();
        let mut index = WarmIndex::default();
        assert_eq!(index.pass(&setup.mirror, u64::MAX), PassReport::default());
        let (finished, _) = setup.finish(WarmIndex::default());
        assert_eq!(finished.records, 0);
        setup.write(0, 1);
        setup.place_all();
        let volumes = setup.volumes();
        let error = WarmIndex::default()
            .finish(&setup.mirror, 3, &volumes)
            .expect_err("node 2's log is not node 3's");
        assert!(
            matches!(
                error,
                Error::WrongMirror {
                    found: 2,
                    expected: 3
                }
            ),
            "{error}"
        );
    }
}
