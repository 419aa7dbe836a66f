//! The crate's one error type.

use std::fmt;
use std::path::PathBuf;

/// Everything that can go wrong in the NVLog, with the context an operator
/// needs to act on it (which file, which offset, which LSN).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the NVRAM file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot size the NVRAM file {path} to {len_bytes} bytes (is the file system full?)")]
    Size {
        path: PathBuf,
        len_bytes: u64,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot map {len_bytes} bytes of the NVRAM file {path}")]
    Map {
        path: PathBuf,
        len_bytes: u64,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "the NVRAM device {path} holds {actual_bytes} bytes but the configured geometry needs \
         {needed_bytes}; configure a smaller log or use a larger device"
    )]
    DeviceTooSmall {
        path: PathBuf,
        actual_bytes: u64,
        needed_bytes: u64,
    },

    #[error("persisting bytes {offset}..{end} of the NVRAM region failed; the log cannot promise durability")]
    Persist {
        offset: u64,
        end: u64,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid log geometry: {reason}")]
    Geometry { reason: String },

    #[error(
        "the NVRAM region was formatted for {found}, not for {expected}; refusing to use it \
         (point data_dir at this node's own NVRAM file, or remove the file to reformat)"
    )]
    RegionMismatch { found: String, expected: String },

    #[error("the NVRAM region header is corrupt ({reason}); refusing to guess its geometry")]
    RegionHeaderCorrupt { reason: &'static str },

    #[error("neither copy of the log header is valid (slot A: {slot_a}; slot B: {slot_b}); the log cannot be recovered safely")]
    LogHeaderCorrupt {
        slot_a: &'static str,
        slot_b: &'static str,
    },

    #[error("record payload of {len_bytes} bytes exceeds the largest record this log accepts ({max_bytes} bytes)")]
    RecordTooLarge { len_bytes: usize, max_bytes: usize },

    #[error("record header at log offset {offset} is corrupt: {reason}")]
    CorruptRecord { offset: u64, reason: StopReason },

    #[error("no log space for {len_bytes} bytes: both halves are in use until a consistency point frees one")]
    WouldBlock { len_bytes: usize },

    #[error("timed out after {waited_ms} ms waiting for {len_bytes} bytes of log space (is the consistency point stuck?)")]
    ReserveTimeout { len_bytes: usize, waited_ms: u64 },

    #[error(
        "half {half} is {state}, not {expected}; consistency points must free halves in order"
    )]
    HalfState {
        half: usize,
        state: &'static str,
        expected: &'static str,
    },

    #[error(
        "writers still hold {reserved_bytes} bytes of log space: the log is not discarded under \
         them (fence them first, then try again)"
    )]
    ReservationsOutstanding { reserved_bytes: u64 },

    #[error("LSN {lsn} has not been appended yet (the last appended LSN is {last_lsn})")]
    LsnNotAppended { lsn: u64, last_lsn: u64 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why the scanner stopped where it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// All-zero bytes: never written.
    Empty,
    BadMagic,
    HeaderCrc,
    UnknownVersion {
        version: u16,
    },
    UnknownKind {
        code: u8,
    },
    /// The record's lengths contradict each other or run past its half.
    BadLength,
    PayloadCrc,
    /// A record from an earlier pass of the half.
    StaleGeneration {
        found: u64,
        expected: u64,
    },
    /// A generation the header never handed out.
    FutureGeneration {
        found: u64,
        expected: u64,
    },
    LsnGap {
        found: u64,
        expected: u64,
    },
    /// No room for another record header in the half.
    EndOfHalf,
    /// The record runs past the end of the window scanned
    /// ([`Scanner::resume`](crate::Scanner::resume)): not an end of the log.
    EndOfWindow,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::Empty => write!(f, "empty (never written)"),
            StopReason::BadMagic => write!(f, "bad magic"),
            StopReason::HeaderCrc => write!(f, "header CRC mismatch"),
            StopReason::UnknownVersion { version } => {
                write!(f, "unknown record format version {version}")
            }
            StopReason::UnknownKind { code } => write!(f, "unknown record kind {code}"),
            StopReason::BadLength => write!(f, "inconsistent record length"),
            StopReason::PayloadCrc => write!(f, "payload CRC mismatch"),
            StopReason::StaleGeneration { found, expected } => {
                write!(
                    f,
                    "stale generation {found} (half is in generation {expected})"
                )
            }
            StopReason::FutureGeneration { found, expected } => {
                write!(
                    f,
                    "generation {found} from the future (half is in generation {expected})"
                )
            }
            StopReason::LsnGap { found, expected } => {
                write!(f, "LSN gap: found {found}, expected {expected}")
            }
            StopReason::EndOfHalf => write!(f, "end of half"),
            StopReason::EndOfWindow => write!(f, "end of the bytes scanned so far"),
        }
    }
}
