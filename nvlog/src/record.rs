//! The record format: how one logged operation is laid out in the log.
//!
//! A record is a 64-byte header followed by its payload, padded with zeros
//! to a multiple of 64 bytes so that the next record starts on a cache line
//! (one flush unit) and records stay contiguous: the bytes of any run of
//! records are one range of the log, mirrored with one RDMA write.
//!
//! Header layout (little-endian):
//!
//! | offset | size | field                                                  |
//! |-------:|-----:|--------------------------------------------------------|
//! |      0 |    4 | magic `NVRC`                                           |
//! |      4 |    2 | format version (1)                                     |
//! |      6 |    1 | kind: 1 write, 2 write-zeroes, 3 trim                  |
//! |      7 |    1 | reserved, zero                                         |
//! |      8 |    8 | generation of the half pass the record was written in  |
//! |     16 |    8 | LSN                                                    |
//! |     24 |    4 | volume id                                              |
//! |     28 |    4 | payload length in bytes                                |
//! |     32 |    8 | byte offset in the volume                              |
//! |     40 |    8 | extent length in bytes (= payload length for writes)   |
//! |     48 |    4 | CRC32C of the body: payload and its zero padding       |
//! |     52 |    8 | reserved, zero                                         |
//! |     60 |    4 | CRC32C of header bytes 0..60                           |

use std::fmt;

use crate::error::StopReason;
use crate::error::{Error, Result};

pub const RECORD_MAGIC: [u8; 4] = *b"NVRC";
pub const RECORD_FORMAT_VERSION: u16 = 1;
pub const RECORD_HEADER_BYTES: usize = 64;
/// Records start on, and are padded to, this boundary.
pub const RECORD_ALIGN_BYTES: usize = 64;
const HEADER_CRC_AT: usize = 60;

const _: () = assert!(HEADER_CRC_AT + 4 == RECORD_HEADER_BYTES);
const _: () = assert!(RECORD_HEADER_BYTES % RECORD_ALIGN_BYTES == 0);
const _: () = assert!(RECORD_ALIGN_BYTES.is_power_of_two());

/// What a record does to its volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// Write the payload at `offset`.
    Write,
    /// Write `extent_len` zero bytes at `offset`; no payload.
    WriteZeroes,
    /// Discard `extent_len` bytes at `offset` (they read back as zeros); no payload.
    Trim,
}

impl RecordKind {
    fn code(self) -> u8 {
        match self {
            RecordKind::Write => 1,
            RecordKind::WriteZeroes => 2,
            RecordKind::Trim => 3,
        }
    }

    fn from_code(code: u8) -> Option<RecordKind> {
        match code {
            1 => Some(RecordKind::Write),
            2 => Some(RecordKind::WriteZeroes),
            3 => Some(RecordKind::Trim),
            _ => None,
        }
    }
}

/// The operation a caller asks the log to record.
#[derive(Debug, Clone, Copy)]
pub struct RecordData<'a> {
    pub kind: RecordKind,
    pub volume: u32,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Bytes of the volume affected. For writes, `payload.len()`.
    pub extent_len: u64,
    /// Data for writes; empty for write-zeroes and trim.
    pub payload: &'a [u8],
}

impl<'a> RecordData<'a> {
    pub fn write(volume: u32, offset: u64, payload: &'a [u8]) -> RecordData<'a> {
        RecordData {
            kind: RecordKind::Write,
            volume,
            offset,
            extent_len: payload.len() as u64,
            payload,
        }
    }

    pub fn write_zeroes(volume: u32, offset: u64, extent_len: u64) -> RecordData<'static> {
        RecordData {
            kind: RecordKind::WriteZeroes,
            volume,
            offset,
            extent_len,
            payload: &[],
        }
    }

    pub fn trim(volume: u32, offset: u64, extent_len: u64) -> RecordData<'static> {
        RecordData {
            kind: RecordKind::Trim,
            volume,
            offset,
            extent_len,
            payload: &[],
        }
    }

    /// Bytes this record occupies in the log, header and padding included.
    pub fn encoded_len(&self) -> usize {
        encoded_len(self.payload.len())
    }
}

/// Bytes a record with `payload_len` bytes of payload occupies in the log.
pub fn encoded_len(payload_len: usize) -> usize {
    (RECORD_HEADER_BYTES + payload_len).next_multiple_of(RECORD_ALIGN_BYTES)
}

/// A decoded, validated record header.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub generation: u64,
    pub lsn: u64,
    pub volume: u32,
    pub payload_len: u32,
    pub offset: u64,
    pub extent_len: u64,
    pub payload_crc: u32,
}

impl fmt::Debug for RecordHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} lsn={} gen={} vol={} off={} len={} payload={}B",
            self.kind,
            self.lsn,
            self.generation,
            self.volume,
            self.offset,
            self.extent_len,
            self.payload_len
        )
    }
}

impl RecordHeader {
    /// Bytes the record occupies in the log.
    pub fn encoded_len(&self) -> usize {
        encoded_len(self.payload_len as usize)
    }
}

/// Check that `data` is a record the log can hold.
pub(crate) fn validate(data: &RecordData<'_>, max_payload: usize) -> Result<()> {
    if data.payload.len() > max_payload {
        return Err(Error::RecordTooLarge {
            len_bytes: data.payload.len(),
            max_bytes: max_payload,
        });
    }
    match data.kind {
        RecordKind::Write => assert_eq!(
            data.extent_len,
            data.payload.len() as u64,
            "a write's extent is its payload"
        ),
        RecordKind::WriteZeroes | RecordKind::Trim => {
            assert!(
                data.payload.is_empty(),
                "{:?} records carry no payload",
                data.kind
            )
        }
    }
    Ok(())
}

/// CRC32C of a record body: the payload followed by the zero padding that
/// aligns the record, so that every byte of a record is covered by a CRC.
pub fn body_crc(payload: &[u8]) -> u32 {
    const ZEROS: [u8; RECORD_ALIGN_BYTES] = [0; RECORD_ALIGN_BYTES];
    let padding = encoded_len(payload.len()) - RECORD_HEADER_BYTES - payload.len();
    crc32c::crc32c_append(crc32c::crc32c(payload), &ZEROS[..padding])
}

/// Encode the header of `data` as record `lsn` of pass `generation`. The
/// record's bytes are this header, the payload, and zeros up to
/// [`encoded_len`].
pub fn encode_header(
    data: &RecordData<'_>,
    generation: u64,
    lsn: u64,
) -> [u8; RECORD_HEADER_BYTES] {
    let mut header = [0u8; RECORD_HEADER_BYTES];
    header[0..4].copy_from_slice(&RECORD_MAGIC);
    header[4..6].copy_from_slice(&RECORD_FORMAT_VERSION.to_le_bytes());
    header[6] = data.kind.code();
    header[8..16].copy_from_slice(&generation.to_le_bytes());
    header[16..24].copy_from_slice(&lsn.to_le_bytes());
    header[24..28].copy_from_slice(&data.volume.to_le_bytes());
    header[28..32].copy_from_slice(&(data.payload.len() as u32).to_le_bytes());
    header[32..40].copy_from_slice(&data.offset.to_le_bytes());
    header[40..48].copy_from_slice(&data.extent_len.to_le_bytes());
    header[48..52].copy_from_slice(&body_crc(data.payload).to_le_bytes());
    let crc = crc32c::crc32c(&header[..HEADER_CRC_AT]);
    header[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Decode and check a record header: magic, version, header CRC, kind.
/// Says why it is not a record if it is not one.
pub fn decode_header(
    bytes: &[u8; RECORD_HEADER_BYTES],
) -> std::result::Result<RecordHeader, StopReason> {
    if bytes.iter().all(|&byte| byte == 0) {
        return Err(StopReason::Empty);
    }
    if bytes[0..4] != RECORD_MAGIC {
        return Err(StopReason::BadMagic);
    }
    let stored_crc = u32::from_le_bytes(bytes[HEADER_CRC_AT..].try_into().expect("4 bytes"));
    if crc32c::crc32c(&bytes[..HEADER_CRC_AT]) != stored_crc {
        return Err(StopReason::HeaderCrc);
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != RECORD_FORMAT_VERSION {
        return Err(StopReason::UnknownVersion { version });
    }
    let kind = RecordKind::from_code(bytes[6]).ok_or(StopReason::UnknownKind { code: bytes[6] })?;
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let header = RecordHeader {
        kind,
        generation: u64_at(8),
        lsn: u64_at(16),
        volume: u32_at(24),
        payload_len: u32_at(28),
        offset: u64_at(32),
        extent_len: u64_at(40),
        payload_crc: u32_at(48),
    };
    let consistent = match kind {
        RecordKind::Write => header.extent_len == header.payload_len as u64,
        RecordKind::WriteZeroes | RecordKind::Trim => header.payload_len == 0,
    };
    if !consistent {
        return Err(StopReason::BadLength);
    }
    Ok(header)
}

/// Whether `body` (the record's bytes after its header, padding included)
/// is the one `header` describes.
pub fn body_matches(header: &RecordHeader, body: &[u8]) -> bool {
    body.len() == header.encoded_len() - RECORD_HEADER_BYTES
        && crc32c::crc32c(body) == header.payload_crc
}

/// Encode a whole record (header, payload, padding).
pub fn encode_record(data: &RecordData<'_>, generation: u64, lsn: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(data.encoded_len());
    bytes.extend_from_slice(&encode_header(data, generation, lsn));
    bytes.extend_from_slice(data.payload);
    bytes.resize(data.encoded_len(), 0);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let payload = b"hello, mirror";
        let data = RecordData::write(7, 4096, payload);
        let bytes = encode_header(&data, 3, 42);
        let header = decode_header(&bytes).expect("valid header");
        assert_eq!(header.kind, RecordKind::Write);
        assert_eq!(header.generation, 3);
        assert_eq!(header.lsn, 42);
        assert_eq!(header.volume, 7);
        assert_eq!(header.offset, 4096);
        assert_eq!(header.extent_len, payload.len() as u64);
        let record = encode_record(&data, 3, 42);
        assert!(body_matches(&header, &record[RECORD_HEADER_BYTES..]));
        let mut torn = record.clone();
        torn[RECORD_HEADER_BYTES + 3] ^= 1;
        assert!(!body_matches(&header, &torn[RECORD_HEADER_BYTES..]));
        // The padding is covered too.
        let mut torn = record;
        *torn.last_mut().expect("non-empty") = 1;
        assert!(!body_matches(&header, &torn[RECORD_HEADER_BYTES..]));
    }

    #[test]
    fn payloadless_kinds_round_trip() {
        for data in [
            RecordData::write_zeroes(1, 0, 1 << 20),
            RecordData::trim(2, 512, 4096),
        ] {
            let header = decode_header(&encode_header(&data, 1, 1)).expect("valid header");
            assert_eq!(header.kind, data.kind);
            assert_eq!(header.extent_len, data.extent_len);
            assert_eq!(header.payload_len, 0);
            assert_eq!(header.encoded_len(), RECORD_HEADER_BYTES);
        }
    }

    #[test]
    fn encoded_len_is_aligned() {
        assert_eq!(encoded_len(0), 64);
        assert_eq!(encoded_len(1), 128);
        assert_eq!(encoded_len(64), 128);
        assert_eq!(encoded_len(4096), 4160);
        for len in 0..1000 {
            assert_eq!(encoded_len(len) % RECORD_ALIGN_BYTES, 0);
            assert!(encoded_len(len) >= len + RECORD_HEADER_BYTES);
        }
    }

    #[test]
    fn zero_header_is_empty_not_corrupt() {
        assert_eq!(
            decode_header(&[0; RECORD_HEADER_BYTES]),
            Err(StopReason::Empty)
        );
    }

    #[test]
    fn every_header_bit_flip_is_detected() {
        let bytes = encode_header(&RecordData::write(1, 0, b"x"), 1, 1);
        for byte in 0..RECORD_HEADER_BYTES {
            for bit in 0..8 {
                let mut flipped = bytes;
                flipped[byte] ^= 1 << bit;
                assert!(
                    decode_header(&flipped).is_err(),
                    "flip of bit {bit} of byte {byte} went unnoticed"
                );
            }
        }
    }
}
