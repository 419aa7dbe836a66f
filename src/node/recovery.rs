//! Local recovery: after a restart, the records the log kept since its
//! last consistency point go back into the volumes' dirty maps and are
//! written to the files. The takeover indexes the partner's mirror with
//! the same [`index_records`].

use std::sync::Arc;

use nvlog::{RecordHeader, RecordKind, ScannedRecord, Scanner};

use crate::error::Result;
use crate::node::Node;
use crate::storage::extents::{ExtentMap, Origin, Source};
use crate::storage::volume::Volume;

/// Where the bytes of a record of `kind` whose payload starts at region
/// offset `payload_at` are.
pub fn source_of(kind: RecordKind, payload_at: u64) -> Source {
    match kind {
        RecordKind::Write => Source::Region { offset: payload_at },
        RecordKind::WriteZeroes => Source::Zero,
        RecordKind::Trim => Source::Hole,
    }
}

/// Whether the extent of the record `header` lies inside `volume`.
pub fn fits_in(header: &RecordHeader, volume: &Volume) -> bool {
    header
        .offset
        .checked_add(header.extent_len)
        .is_some_and(|end| end <= volume.size_bytes)
}

/// Put the extent of `record`, scanned from a log that lies at
/// `area_offset` of the region, into `map`, as record of `origin`'s log.
pub fn insert_record(
    map: &mut ExtentMap,
    origin: Origin,
    area_offset: u64,
    record: &ScannedRecord<'_>,
) {
    let header = record.header;
    let payload_at = area_offset + record.log_offset + nvlog::record::RECORD_HEADER_BYTES as u64;
    map.insert_from(
        origin,
        header.offset,
        header.extent_len,
        header.lsn,
        source_of(header.kind, payload_at),
    );
}

/// Put the records `scanner` yields into the dirty maps of `volumes`,
/// each record's extent in LSN order, newest winning; `area_offset` is where
/// the scanned log lies in the region, `origin` which log it is. A record
/// for a volume not in `volumes`, or beyond its end, is skipped with an
/// error event. Returns how many records went in.
pub fn index_records(
    scanner: Scanner<'_>,
    volumes: &[Arc<Volume>],
    area_offset: u64,
    origin: Origin,
) -> u64 {
    let mut records = 0u64;
    for record in scanner {
        let header = record.header;
        let Some(volume) = volumes.iter().find(|v| v.id == header.volume) else {
            tracing::error!(
                volume = header.volume,
                lsn = header.lsn,
                ?origin,
                "log record for a volume not served here; skipped"
            );
            continue;
        };
        if !fits_in(&header, volume) {
            tracing::error!(volume = %volume.name, lsn = header.lsn, ?origin, "log record beyond the end of its volume; skipped");
            continue;
        }
        insert_record(&mut volume.extents.lock(), origin, area_offset, &record);
        records += 1;
    }
    records
}

impl Node {
    /// Local recovery: the records the log kept since the last flushed LSN
    /// go into the dirty maps, then a consistency point writes them to the
    /// volumes. A crash during this is recovered the same way: the records
    /// stay in the log until their half is freed.
    pub fn recover_onto_volumes(&self) -> Result<()> {
        let span = tracing::info_span!("replay", node_id = self.config.node_id, log = "local");
        let _entered = span.enter();
        let image = self.log.live_image();
        let records = index_records(
            Scanner::new(&image)?,
            &self.volumes(),
            self.region.local_log().offset,
            Origin::Local,
        );
        self.consistency_point_all()?;
        tracing::info!(records, "log replayed onto the volumes");
        Ok(())
    }
}
