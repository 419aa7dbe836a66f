//! Scanning a log image: the local log at recovery, or a partner mirror at
//! takeover (the same bytes, so the same code).
//!
//! The header names the live halves and the generation and first LSN of
//! each. The scanner walks the live halves oldest first and yields every
//! valid record after the flushed LSN, in LSN order, until the first
//! position that does not hold the next record. It never skips over an
//! invalid record: everything after it is the torn tail.
//!
//! # Recovery decisions
//!
//! | found where the next record should be          | what it means                                     | decision                                   |
//! |------------------------------------------------|---------------------------------------------------|--------------------------------------------|
//! | all-zero header                                | never written since the half was zeroed           | end of log ([`StopReason::Empty`])         |
//! | bad magic                                      | never written, or torn before the magic landed    | end of log (torn tail)                     |
//! | header CRC mismatch                            | header torn by a crash or a cut transfer          | end of log (torn tail)                     |
//! | unknown version or kind, inconsistent lengths  | a format this build does not know                 | end of log; never interpreted              |
//! | record runs past the end of its half           | corrupt length                                    | end of log                                 |
//! | payload CRC mismatch                           | payload torn (header landed, data did not)        | end of log (torn tail)                     |
//! | generation below the half's                    | stale record from an earlier pass of the half     | end of log: the normal end in a reused half|
//! | generation above the half's                    | cannot be written by a correct log                | end of log; reported                       |
//! | LSN not the next one                           | a gap: the record before it never landed          | end of log                                 |
//! | no room left in the half for a header          | the half is full                                  | end of this half                           |
//! | any stop in the older live half, when the      | the writer moved to the next half (the record did | continue in the newer half                 |
//! | newer half's first LSN is the next LSN         | not fit)                                          |                                            |
//! | any stop in the older half, first LSN of the   | the older half lost records at its end            | end of log; the newer half's records are   |
//! | newer half beyond the next LSN                 |                                                   | beyond the tail and are never replayed     |
//! | valid record with LSN ≤ flushed LSN            | already on the volumes                            | skipped, not yielded                       |
//! | valid records after the stopping point         | written but never persisted (a crash keeps an     | discarded: only persisted records are      |
//! |                                                | arbitrary subset), or media corruption            | promised; recovery zeroes the tail         |
//! | neither header slot valid, block not blank     | header destroyed                                  | error: refuse to recover                   |
//! | header block blank                             | log never written                                 | empty log                                  |
//!
//! Only a torn tail is tolerated: the promise the log makes is that every
//! record up to a persisted (or mirror-placed) LSN is intact, and such
//! records always form a prefix of what the scanner reads.

use crate::error::{Error, Result};
use crate::header::{read_header, HeaderRead, LogHeader};
use crate::record::{body_matches, decode_header, RecordHeader, RECORD_HEADER_BYTES};
use crate::region::LOG_HEADER_BYTES;

pub use crate::error::StopReason;

/// Where and why the scan ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanStop {
    /// The half the scan ended in.
    pub half: usize,
    /// Log-relative offset of the first position that holds no valid record.
    pub offset: u64,
    /// The LSN that was expected there.
    pub expected_lsn: u64,
    pub reason: StopReason,
}

/// Where a scan stands: the next record is expected at `offset_in_half` of
/// `half`, with LSN `expected_lsn`. A scan can resume there later, over a
/// window of the log instead of a whole image ([`Scanner::resume`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanPosition {
    pub half: usize,
    pub offset_in_half: u64,
    pub expected_lsn: u64,
}

/// A valid record found by the scanner, borrowing its payload from the image.
#[derive(Debug, Clone, Copy)]
pub struct ScannedRecord<'a> {
    pub header: RecordHeader,
    /// Log-relative offset of the record's first byte.
    pub log_offset: u64,
    pub payload: &'a [u8],
}

/// An iterator over the valid records of a log image. See the module docs
/// for what it accepts.
#[derive(Debug)]
pub struct Scanner<'a> {
    /// The bytes scanned: a whole log image, or a window of one.
    image: &'a [u8],
    /// Log-relative offset of `image[0]` (0 for a whole image).
    window_start: u64,
    header: Option<LogHeader>,
    /// Live halves still to scan, oldest first.
    plan: Vec<usize>,
    plan_index: usize,
    offset_in_half: u64,
    expected_lsn: u64,
    last_lsn: Option<u64>,
    stop: Option<ScanStop>,
}

impl<'a> Scanner<'a> {
    /// A scanner over `image`, the bytes of one log area (header block and
    /// both halves). A blank image is an empty log; a destroyed header is an
    /// error.
    pub fn new(image: &'a [u8]) -> Result<Scanner<'a>> {
        let header = match read_header(image) {
            HeaderRead::Blank => None,
            HeaderRead::Valid(header) => {
                let expected_len = LOG_HEADER_BYTES + 2 * header.half_len;
                if image.len() as u64 != expected_len {
                    return Err(Error::Geometry {
                        reason: format!(
                            "log image of {} bytes, but its header describes {}-byte halves ({expected_len} bytes)",
                            image.len(),
                            header.half_len
                        ),
                    });
                }
                Some(header)
            }
            HeaderRead::Corrupt { slot_a, slot_b } => {
                return Err(Error::LogHeaderCorrupt { slot_a, slot_b })
            }
        };
        let plan = header.map(|h| h.live_halves()).unwrap_or_default();
        let expected_lsn = match (&header, plan.first()) {
            (Some(h), Some(&first)) => h.halves[first].first_lsn,
            _ => 1,
        };
        Ok(Scanner {
            image,
            window_start: 0,
            header,
            plan,
            plan_index: 0,
            offset_in_half: 0,
            expected_lsn,
            last_lsn: None,
            stop: None,
        })
    }

    /// Resume a scan at `at`, following `header`, over `window`: the bytes
    /// of the log from log-relative offset `window_start` on. The scan
    /// stops with [`StopReason::EndOfWindow`] where a record runs past the
    /// window (the caller reads further and resumes at
    /// [`position`](Self::position)); otherwise it decides exactly as a scan
    /// of the whole image would from that position. `None` if `at.half` is
    /// not a live half of `header` or the window lies outside the log.
    pub fn resume(
        header: LogHeader,
        at: ScanPosition,
        window: &'a [u8],
        window_start: u64,
    ) -> Option<Scanner<'a>> {
        let log_len = LOG_HEADER_BYTES + 2 * header.half_len;
        let window_end = window_start.checked_add(window.len() as u64)?;
        if window_end > log_len || at.offset_in_half > header.half_len {
            return None;
        }
        let plan = header.live_halves();
        let plan_index = plan.iter().position(|&half| half == at.half)?;
        Some(Scanner {
            image: window,
            window_start,
            header: Some(header),
            plan,
            plan_index,
            offset_in_half: at.offset_in_half,
            expected_lsn: at.expected_lsn,
            last_lsn: None,
            stop: None,
        })
    }

    /// Where the next record is expected: after the scan stopped, where a
    /// later scan of more bytes resumes. `None` for a blank image.
    pub fn position(&self) -> Option<ScanPosition> {
        let &half = self.plan.get(self.plan_index)?;
        Some(ScanPosition {
            half,
            offset_in_half: self.offset_in_half,
            expected_lsn: self.expected_lsn,
        })
    }

    /// The header the scan follows (`None` for a blank image).
    pub fn header(&self) -> Option<&LogHeader> {
        self.header.as_ref()
    }

    /// Where the scan ended; `None` until the iterator returned `None`.
    pub fn stop(&self) -> Option<&ScanStop> {
        self.stop.as_ref()
    }

    /// The LSN of the last record read (skipped flushed ones included).
    pub fn last_lsn(&self) -> Option<u64> {
        self.last_lsn
    }

    /// The LSN after the last valid record: where appends would continue.
    pub fn next_lsn(&self) -> u64 {
        self.expected_lsn
    }

    /// Read the record at the current position of the current half.
    fn read_next(
        &self,
        half: usize,
        generation: u64,
    ) -> std::result::Result<(RecordHeader, u64), StopReason> {
        let header = self.header.as_ref().expect("a plan implies a header");
        let half_start = LOG_HEADER_BYTES + half as u64 * header.half_len;
        let remaining = header.half_len - self.offset_in_half;
        if remaining < RECORD_HEADER_BYTES as u64 {
            return Err(StopReason::EndOfHalf);
        }
        let at = half_start + self.offset_in_half;
        // Index into the window of the record's first byte.
        let in_window = at
            .checked_sub(self.window_start)
            .map(|offset| offset as usize)
            .filter(|&offset| offset + RECORD_HEADER_BYTES <= self.image.len())
            .ok_or(StopReason::EndOfWindow)?;
        let bytes: &[u8; RECORD_HEADER_BYTES] = self.image
            [in_window..in_window + RECORD_HEADER_BYTES]
            .try_into()
            .expect("header size");
        let record = decode_header(bytes)?;
        if record.generation < generation {
            return Err(StopReason::StaleGeneration {
                found: record.generation,
                expected: generation,
            });
        }
        if record.generation > generation {
            return Err(StopReason::FutureGeneration {
                found: record.generation,
                expected: generation,
            });
        }
        if record.lsn != self.expected_lsn {
            return Err(StopReason::LsnGap {
                found: record.lsn,
                expected: self.expected_lsn,
            });
        }
        if record.encoded_len() as u64 > remaining {
            return Err(StopReason::BadLength);
        }
        if in_window + record.encoded_len() > self.image.len() {
            return Err(StopReason::EndOfWindow);
        }
        let body = in_window + RECORD_HEADER_BYTES..in_window + record.encoded_len();
        if !body_matches(&record, &self.image[body]) {
            return Err(StopReason::PayloadCrc);
        }
        Ok((record, at))
    }
}

impl<'a> Iterator for Scanner<'a> {
    type Item = ScannedRecord<'a>;

    fn next(&mut self) -> Option<ScannedRecord<'a>> {
        loop {
            if self.stop.is_some() {
                return None;
            }
            let Some(&half) = self.plan.get(self.plan_index) else {
                // Blank image: nothing at all.
                self.stop = Some(ScanStop {
                    half: 0,
                    offset: LOG_HEADER_BYTES,
                    expected_lsn: self.expected_lsn,
                    reason: StopReason::Empty,
                });
                return None;
            };
            let header = *self.header.as_ref().expect("a plan implies a header");
            let meta = header.halves[half];
            match self.read_next(half, meta.generation) {
                Ok((record, log_offset)) => {
                    self.offset_in_half += record.encoded_len() as u64;
                    self.expected_lsn += 1;
                    self.last_lsn = Some(record.lsn);
                    if record.lsn <= header.flushed_lsn {
                        continue;
                    }
                    let payload_at =
                        (log_offset - self.window_start) as usize + RECORD_HEADER_BYTES;
                    return Some(ScannedRecord {
                        header: record,
                        log_offset,
                        payload: &self.image[payload_at..payload_at + record.payload_len as usize],
                    });
                }
                Err(reason) => {
                    // Does the log go on in the next live half? (Past the
                    // end of a window, more bytes would decide: a later scan
                    // resumes here.)
                    let next = self.plan.get(self.plan_index + 1).copied();
                    let goes_on = reason != StopReason::EndOfWindow
                        && next.is_some_and(|next_half| {
                            header.halves[next_half].first_lsn == self.expected_lsn
                        });
                    if goes_on {
                        self.plan_index += 1;
                        self.offset_in_half = 0;
                    } else {
                        self.stop = Some(ScanStop {
                            half,
                            offset: LOG_HEADER_BYTES
                                + half as u64 * header.half_len
                                + self.offset_in_half,
                            expected_lsn: self.expected_lsn,
                            reason,
                        });
                        return None;
                    }
                }
            }
        }
    }
}
