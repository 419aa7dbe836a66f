//! The dirty map of a volume: which byte ranges have newer data in a log
//! than in the volume's backing file, and where that data is.
//!
//! An extent points at the payload of the record that last wrote its bytes
//! (a region offset, in the local log or, after a takeover, in the partner
//! mirror), or says the bytes are zero (write-zeroes and trim). Its origin
//! says which log: local extents leave with the consistency point of their
//! half (by LSN); mirror extents leave as the takeover replay writes them. Writes are
//! byte-granular, so there is no read-modify-write and no I/O in the write
//! path's modify phase: inserting an extent only splits its neighbours.

use std::collections::BTreeMap;
use std::ops::Range;

/// Where an extent's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// In the NVRAM region, from this region offset on.
    Region { offset: u64 },
    /// All zeros, space kept allocated (write-zeroes).
    Zero,
    /// All zeros, space may be released (trim).
    Hole,
}

impl Source {
    /// The source of the bytes `skip` bytes into this one.
    fn advanced(self, skip: u64) -> Source {
        match self {
            Source::Region { offset } => Source::Region {
                offset: offset + skip,
            },
            Source::Zero => Source::Zero,
            Source::Hole => Source::Hole,
        }
    }
}

/// Which log an extent's record is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This node's own log; `lsn` is one of its LSNs.
    Local,
    /// The partner's mirror, taken over; `lsn` is one of the partner's.
    Mirror,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// The record that wrote these bytes.
    pub lsn: u64,
    pub origin: Origin,
    pub source: Source,
}

/// A piece of a volume covered by an extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub start: u64,
    pub len: u64,
    pub lsn: u64,
    pub origin: Origin,
    pub source: Source,
}

#[derive(Debug, Default)]
pub struct ExtentMap {
    /// Non-overlapping extents by start offset.
    extents: BTreeMap<u64, Extent>,
    /// Bytes covered, for status and metrics.
    covered_bytes: u64,
}

impl ExtentMap {
    pub fn new() -> ExtentMap {
        ExtentMap::default()
    }

    pub fn len(&self) -> usize {
        self.extents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    pub fn covered_bytes(&self) -> u64 {
        self.covered_bytes
    }

    /// Record that `start..start + len` now holds the data of record `lsn`
    /// of this node's log.
    pub fn insert(&mut self, start: u64, len: u64, lsn: u64, source: Source) {
        self.insert_from(Origin::Local, start, len, lsn, source);
    }

    /// Record that `start..start + len` now holds the data of record `lsn`
    /// of the log `origin` names.
    pub fn insert_from(&mut self, origin: Origin, start: u64, len: u64, lsn: u64, source: Source) {
        if len == 0 {
            return;
        }
        self.cut(start..start + len);
        self.extents.insert(
            start,
            Extent {
                len,
                lsn,
                origin,
                source,
            },
        );
        self.covered_bytes += len;
        self.check_invariants_cheaply(start);
    }

    /// Remove coverage of `range`, trimming the extents that overlap it.
    fn cut(&mut self, range: Range<u64>) {
        let overlapping: Vec<(u64, Extent)> = self
            .pieces_raw(range.clone())
            .map(|(start, extent)| (start, *extent))
            .collect();
        for (start, extent) in overlapping {
            self.extents.remove(&start);
            self.covered_bytes -= extent.len;
            let end = start + extent.len;
            if start < range.start {
                let kept = range.start - start;
                self.extents.insert(
                    start,
                    Extent {
                        len: kept,
                        ..extent
                    },
                );
                self.covered_bytes += kept;
            }
            if end > range.end {
                let skip = range.end - start;
                let kept = end - range.end;
                self.extents.insert(
                    range.end,
                    Extent {
                        len: kept,
                        source: extent.source.advanced(skip),
                        ..extent
                    },
                );
                self.covered_bytes += kept;
            }
        }
    }

    /// Extents that overlap `range`, by start, untrimmed.
    fn pieces_raw(&self, range: Range<u64>) -> impl Iterator<Item = (u64, &Extent)> {
        // The extent that starts before the range may reach into it.
        let before = self
            .extents
            .range(..range.start)
            .next_back()
            .filter(|(start, extent)| *start + extent.len > range.start);
        let inside = self.extents.range(range.start..range.end);
        before
            .into_iter()
            .chain(inside)
            .map(|(start, extent)| (*start, extent))
    }

    /// The covered pieces of `range`, trimmed to it, in offset order.
    pub fn pieces(&self, range: Range<u64>) -> Vec<Piece> {
        self.pieces_raw(range.clone())
            .map(|(start, extent)| {
                let piece_start = start.max(range.start);
                let piece_end = (start + extent.len).min(range.end);
                Piece {
                    start: piece_start,
                    len: piece_end - piece_start,
                    lsn: extent.lsn,
                    origin: extent.origin,
                    source: extent.source.advanced(piece_start - start),
                }
            })
            .collect()
    }

    /// Every local extent written by a record with an LSN in `lsns`.
    pub fn written_by(&self, lsns: Range<u64>) -> Vec<Piece> {
        self.extents
            .iter()
            .filter(|(_, extent)| extent.origin == Origin::Local && lsns.contains(&extent.lsn))
            .map(|(start, extent)| piece_of(*start, extent))
            .collect()
    }

    /// Forget every local extent written by a record up to `lsn`: its bytes
    /// are in the backing file now.
    pub fn remove_through(&mut self, lsn: u64) -> u64 {
        self.remove_of_origin_through(Origin::Local, lsn)
    }

    /// Forget every mirror extent written by a partner record up to `lsn`:
    /// the partner's consistency point put its bytes in the file.
    pub fn remove_mirror_through(&mut self, lsn: u64) -> u64 {
        self.remove_of_origin_through(Origin::Mirror, lsn)
    }

    fn remove_of_origin_through(&mut self, origin: Origin, lsn: u64) -> u64 {
        let mut removed = 0;
        self.extents.retain(|_, extent| {
            let keep = extent.origin != origin || extent.lsn > lsn;
            if !keep {
                removed += extent.len;
            }
            keep
        });
        self.covered_bytes -= removed;
        removed
    }

    /// Mirror extents, in offset order, up to about `max_bytes` of them.
    pub fn mirror_pieces(&self, max_bytes: u64) -> Vec<Piece> {
        let mut total = 0;
        self.extents
            .iter()
            .filter(|(_, extent)| extent.origin == Origin::Mirror)
            .take_while(|(_, extent)| {
                let take = total < max_bytes;
                total += extent.len;
                take
            })
            .map(|(start, extent)| piece_of(*start, extent))
            .collect()
    }

    /// Bytes still covered by mirror extents.
    pub fn mirror_bytes(&self) -> u64 {
        self.extents
            .values()
            .filter(|extent| extent.origin == Origin::Mirror)
            .map(|extent| extent.len)
            .sum()
    }

    /// Forget what is left of the mirror extent `piece` (whatever a newer
    /// write did not replace since): its bytes are in the backing file now.
    pub fn remove_mirror_piece(&mut self, piece: &Piece) {
        assert_eq!(piece.origin, Origin::Mirror);
        let still_there: Vec<Piece> = self
            .pieces(piece.start..piece.start + piece.len)
            .into_iter()
            .filter(|p| p.origin == Origin::Mirror && p.lsn == piece.lsn)
            .collect();
        for p in still_there {
            self.cut(p.start..p.start + p.len);
        }
    }

    /// Every extent, in offset order (to persist a takeover index).
    pub fn all_pieces(&self) -> Vec<Piece> {
        self.extents
            .iter()
            .map(|(start, extent)| piece_of(*start, extent))
            .collect()
    }

    fn check_invariants_cheaply(&self, around: u64) {
        // Neighbours of the last insert do not overlap it.
        let mut window = self
            .extents
            .range(..around)
            .rev()
            .take(1)
            .chain(self.extents.range(around..).take(2));
        if let Some((mut previous_start, mut previous)) = window.next() {
            for (start, extent) in window {
                assert!(
                    previous_start + previous.len <= *start,
                    "extents overlap at {start}"
                );
                previous_start = start;
                previous = extent;
            }
        }
    }
}

fn piece_of(start: u64, extent: &Extent) -> Piece {
    Piece {
        start,
        len: extent.len,
        lsn: extent.lsn,
        origin: extent.origin,
        source: extent.source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(offset: u64) -> Source {
        Source::Region { offset }
    }

    /// A byte-per-byte model: which LSN wrote each byte.
    fn model_check(map: &ExtentMap, model: &[Option<(u64, Source)>]) {
        let pieces = map.pieces(0..model.len() as u64);
        let mut expected = vec![None; model.len()];
        for piece in pieces {
            for i in 0..piece.len {
                expected[(piece.start + i) as usize] = Some((piece.lsn, piece.source.advanced(i)));
            }
        }
        assert_eq!(expected, model);
        let covered = model.iter().filter(|b| b.is_some()).count() as u64;
        assert_eq!(map.covered_bytes(), covered);
    }

    #[test]
    fn overlapping_inserts_split_and_advance_sources() {
        let mut map = ExtentMap::new();
        map.insert(0, 100, 1, region(1000));
        map.insert(20, 10, 2, Source::Zero);
        map.insert(90, 20, 3, region(5000));
        let pieces = map.pieces(0..200);
        assert_eq!(
            pieces,
            vec![
                Piece {
                    start: 0,
                    len: 20,
                    lsn: 1,
                    origin: Origin::Local,
                    source: region(1000)
                },
                Piece {
                    start: 20,
                    len: 10,
                    lsn: 2,
                    origin: Origin::Local,
                    source: Source::Zero
                },
                Piece {
                    start: 30,
                    len: 60,
                    lsn: 1,
                    origin: Origin::Local,
                    source: region(1030)
                },
                Piece {
                    start: 90,
                    len: 20,
                    lsn: 3,
                    origin: Origin::Local,
                    source: region(5000)
                },
            ]
        );
        assert_eq!(
            map.pieces(25..35)[1],
            Piece {
                start: 30,
                len: 5,
                lsn: 1,
                origin: Origin::Local,
                source: region(1030)
            }
        );
        assert_eq!(map.written_by(1..2).len(), 2);
        assert_eq!(map.remove_through(2), 90);
        assert_eq!(
            map.pieces(0..200),
            vec![Piece {
                start: 90,
                len: 20,
                lsn: 3,
                origin: Origin::Local,
                source: region(5000)
            }]
        );
    }

    #[test]
    fn mirror_extents_leave_by_replay_and_local_ones_by_lsn() {
        let mut map = ExtentMap::new();
        map.insert_from(Origin::Mirror, 0, 100, 7, region(1000));
        map.insert_from(Origin::Mirror, 200, 50, 9, Source::Zero);
        // A write since the takeover replaces part of a mirror extent.
        map.insert(40, 20, 1, region(9000));
        assert_eq!(map.mirror_bytes(), 80 + 50);
        assert_eq!(
            map.written_by(0..10).len(),
            1,
            "only local extents are written by a consistency point"
        );
        let pieces = map.mirror_pieces(u64::MAX);
        assert_eq!(pieces.len(), 3);
        // The replay wrote the whole original extent; a newer write landed
        // in it meanwhile: only what is still the mirror's goes.
        let whole = Piece {
            start: 0,
            len: 100,
            lsn: 7,
            origin: Origin::Mirror,
            source: region(1000),
        };
        map.insert(0, 10, 2, region(9100));
        map.remove_mirror_piece(&whole);
        assert_eq!(map.mirror_bytes(), 50);
        assert_eq!(map.pieces(0..100).len(), 2, "the two local writes stay");
        assert_eq!(map.remove_through(5), 30);
        assert_eq!(
            map.mirror_pieces(1),
            vec![Piece {
                start: 200,
                len: 50,
                lsn: 9,
                origin: Origin::Mirror,
                source: Source::Zero
            }]
        );
    }

    #[test]
    fn random_inserts_match_a_byte_model() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _round in 0..50 {
            let mut map = ExtentMap::new();
            let mut model: Vec<Option<(u64, Source)>> = vec![None; 512];
            for lsn in 1..60 {
                let start = next() % 500;
                let len = 1 + next() % (512 - start);
                let source = if next() % 4 == 0 {
                    Source::Zero
                } else {
                    region(next() % 100_000)
                };
                map.insert(start, len, lsn, source);
                for i in 0..len {
                    model[(start + i) as usize] = Some((lsn, source.advanced(i)));
                }
                model_check(&map, &model);
            }
            let cut = next() % 60;
            map.remove_through(cut);
            for byte in model.iter_mut() {
                if byte.is_some_and(|(lsn, _)| lsn <= cut) {
                    *byte = None;
                }
            }
            model_check(&map, &model);
        }
    }
}
