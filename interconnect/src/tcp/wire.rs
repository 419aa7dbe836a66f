//! Byte layouts of the TCP transport: the handshake messages and the
//! frames. All integers are little endian.
//!
//! # Frame
//!
//! ```text
//! offset size field
//!      0    4 magic       "NVMF"
//!      4    1 version     WIRE_VERSION
//!      5    1 kind        1 write, 2 ack, 3 control
//!      6    2 reserved    zero
//!      8    8 session     the connection's session, chosen at handshake
//!     16    8 id          write: the WriteId of the last work request the
//!                         frame carries; ack: every write up to this id is
//!                         placed; control: zero
//!     24    8 offset      write: destination offset in the mirror; else zero
//!     32    4 len_bytes   payload length, at most the agreed maximum
//!     36    4 crc32c      over bytes 0..36, then the payload
//!     40      payload     write: the bytes; control: a control message
//! ```
//!
//! # Handshake (see `auth.rs` for the protocol)
//!
//! ```text
//! Hello     (dialer -> acceptor, 40 bytes): "NVMH" version u16, reserved u16, nonce [32]
//! Challenge (acceptor -> dialer, 40 bytes): "NVMC" version u16, status u16, nonce [32]
//! Response  (dialer -> acceptor, 40 bytes): "NVMR" version u16, reserved u16, mac [32]
//! Verdict   (acceptor -> dialer, 64 bytes): "NVMV" version u16, status u16, session u64,
//!                                          mirror_len_bytes u64, max_frame_len_bytes u32,
//!                                          reserved u32, mac [32]
//! ```

use crate::Error;

/// The interconnect wire version this build speaks.
pub const WIRE_VERSION: u16 = 1;
const _: () = assert!(
    WIRE_VERSION <= u8::MAX as u16,
    "frames carry the version in one byte"
);

/// First bytes of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"NVMF";

const MAGIC_AT: usize = 0;
const VERSION_AT: usize = 4;
const KIND_AT: usize = 5;
const RESERVED_AT: usize = 6;
const SESSION_AT: usize = 8;
const ID_AT: usize = 16;
const OFFSET_AT: usize = 24;
const LEN_AT: usize = 32;
const CRC_AT: usize = 36;

/// Length of a frame header.
pub const FRAME_HEADER_LEN: usize = 40;
const _: () = assert!(VERSION_AT == MAGIC_AT + FRAME_MAGIC.len());
const _: () = assert!(KIND_AT == VERSION_AT + 1 && RESERVED_AT == KIND_AT + 1);
const _: () = assert!(SESSION_AT == RESERVED_AT + 2 && ID_AT == SESSION_AT + 8);
const _: () = assert!(OFFSET_AT == ID_AT + 8 && LEN_AT == OFFSET_AT + 8);
const _: () = assert!(CRC_AT == LEN_AT + 4 && FRAME_HEADER_LEN == CRC_AT + 4);

/// No configuration may allow frames longer than this (16 MiB).
pub const FRAME_MAX_PAYLOAD_LEN_BYTES: u32 = 16 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Bytes to place in the mirror.
    Write = 1,
    /// Cumulative acknowledgement of placed writes.
    Ack = 2,
    /// A control message.
    Control = 3,
}

impl FrameKind {
    fn from_byte(kind: u8) -> Result<Self, Error> {
        match kind {
            1 => Ok(Self::Write),
            2 => Ok(Self::Ack),
            3 => Ok(Self::Control),
            _ => Err(Error::UnknownFrameKind { kind }),
        }
    }

    /// The kind's name, for errors.
    pub fn name(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Ack => "ack",
            Self::Control => "control",
        }
    }
}

/// A decoded, checksum-verified frame borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// What it carries.
    pub kind: FrameKind,
    /// The session it belongs to (checked by the connection, not here).
    pub session: u64,
    /// See the layout.
    pub id: u64,
    /// See the layout.
    pub offset: u64,
    /// The payload.
    pub payload: &'a [u8],
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes[at..at + 2].try_into().expect("two bytes"))
}
fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
}
fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("eight bytes"))
}

/// Decodes the frame at the start of `buf`.
///
/// `Ok(None)`: `buf` holds a valid prefix of a frame; read more. The header
/// is validated (magic, version, kind, reserved bytes, length against
/// `max_payload_len_bytes`) as soon as it is complete, so an oversized or
/// garbage frame is rejected before its payload is awaited. The checksum is
/// verified once the payload is there. Returns the frame and the bytes it
/// used. Never panics, whatever `buf` holds: a fuzz target's entry point.
pub fn decode_frame(
    buf: &[u8],
    max_payload_len_bytes: u32,
) -> Result<Option<(Frame<'_>, usize)>, Error> {
    let Some(header) = buf.get(..FRAME_HEADER_LEN) else {
        return Ok(None);
    };
    if header[MAGIC_AT..VERSION_AT] != FRAME_MAGIC {
        return Err(Error::BadMagic {
            found: u32_at(header, MAGIC_AT),
        });
    }
    if u16::from(header[VERSION_AT]) != WIRE_VERSION {
        return Err(Error::FrameVersion {
            found: header[VERSION_AT],
            expected: WIRE_VERSION as u8,
        });
    }
    let kind = FrameKind::from_byte(header[KIND_AT])?;
    if u16_at(header, RESERVED_AT) != 0 {
        return Err(Error::MalformedFrame {
            kind: kind.name(),
            reason: "reserved bytes are not zero",
        });
    }
    let len_bytes = u32_at(header, LEN_AT);
    let max_bytes = max_payload_len_bytes.min(FRAME_MAX_PAYLOAD_LEN_BYTES);
    if len_bytes > max_bytes {
        return Err(Error::FrameTooLong {
            len_bytes,
            max_bytes,
        });
    }
    let frame_len = FRAME_HEADER_LEN + len_bytes as usize;
    let Some(payload) = buf.get(FRAME_HEADER_LEN..frame_len) else {
        return Ok(None);
    };
    let expected = u32_at(header, CRC_AT);
    let computed = crc32c::crc32c_append(crc32c::crc32c(&header[..CRC_AT]), payload);
    if expected != computed {
        return Err(Error::BadChecksum { expected, computed });
    }
    let frame = Frame {
        kind,
        session: u64_at(header, SESSION_AT),
        id: u64_at(header, ID_AT),
        offset: u64_at(header, OFFSET_AT),
        payload,
    };
    let malformed = |reason| Error::MalformedFrame {
        kind: kind.name(),
        reason,
    };
    match kind {
        FrameKind::Write if payload.is_empty() => return Err(malformed("empty write")),
        FrameKind::Write if frame.id == 0 => return Err(malformed("write id 0")),
        FrameKind::Ack if !payload.is_empty() || frame.offset != 0 => {
            return Err(malformed("an ack carries only an id"))
        }
        FrameKind::Control if frame.id != 0 || frame.offset != 0 => {
            return Err(malformed("a control frame carries no id or offset"))
        }
        _ => {}
    }
    Ok(Some((frame, frame_len)))
}

/// Starts a frame at the end of `out`: reserves its header. Append the
/// payload, then call [`finish_frame`].
pub fn begin_frame(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.resize(start + FRAME_HEADER_LEN, 0);
    start
}

/// Fills in the header of the frame begun at `start`, whose payload is
/// everything after the header.
pub fn finish_frame(
    out: &mut [u8],
    start: usize,
    kind: FrameKind,
    session: u64,
    id: u64,
    offset: u64,
) {
    let frame = &mut out[start..];
    let len_bytes = u32::try_from(frame.len() - FRAME_HEADER_LEN).expect("frame payload fits u32");
    assert!(len_bytes <= FRAME_MAX_PAYLOAD_LEN_BYTES);
    frame[MAGIC_AT..VERSION_AT].copy_from_slice(&FRAME_MAGIC);
    frame[VERSION_AT] = WIRE_VERSION as u8;
    frame[KIND_AT] = kind as u8;
    frame[RESERVED_AT..SESSION_AT].fill(0);
    frame[SESSION_AT..ID_AT].copy_from_slice(&session.to_le_bytes());
    frame[ID_AT..OFFSET_AT].copy_from_slice(&id.to_le_bytes());
    frame[OFFSET_AT..LEN_AT].copy_from_slice(&offset.to_le_bytes());
    frame[LEN_AT..CRC_AT].copy_from_slice(&len_bytes.to_le_bytes());
    let (header, payload) = frame.split_at_mut(FRAME_HEADER_LEN);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header[..CRC_AT]), payload);
    header[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
}

/// Appends a whole frame to `out`.
pub fn encode_frame(
    out: &mut Vec<u8>,
    kind: FrameKind,
    session: u64,
    id: u64,
    offset: u64,
    payload: &[u8],
) {
    let start = begin_frame(out);
    out.extend_from_slice(payload);
    finish_frame(out, start, kind, session, id, offset);
}

/// Length of nonces and MACs in the handshake.
pub const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;

/// The acceptor's answer in a `Challenge` or `Verdict`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum HandshakeStatus {
    /// Go on.
    Ok = 0,
    /// The dialer's version is unknown; the message carries the acceptor's.
    UnknownVersion = 1,
    /// The dialer's message did not parse.
    Malformed = 2,
    /// The dialer's MAC did not verify.
    AuthFailed = 3,
}

impl HandshakeStatus {
    pub(crate) fn from_u16(status: u16) -> Result<Self, &'static str> {
        match status {
            0 => Ok(Self::Ok),
            1 => Ok(Self::UnknownVersion),
            2 => Ok(Self::Malformed),
            3 => Ok(Self::AuthFailed),
            _ => Err("unknown handshake status"),
        }
    }
}

fn check_magic(bytes: &[u8], magic: &[u8; 4]) -> Result<(), &'static str> {
    if bytes[..4] == *magic {
        Ok(())
    } else {
        Err("bad handshake magic")
    }
}

/// Dialer's first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The dialer's wire version.
    pub version: u16,
    /// The dialer's nonce.
    pub nonce: [u8; NONCE_LEN],
}

impl Hello {
    /// Encoded length.
    pub const LEN: usize = 4 + 2 + 2 + NONCE_LEN;
    const MAGIC: [u8; 4] = *b"NVMH";

    /// Encodes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..4].copy_from_slice(&Self::MAGIC);
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[8..].copy_from_slice(&self.nonce);
        out
    }

    /// Decodes; the reason on failure.
    pub fn decode(bytes: &[u8; Self::LEN]) -> Result<Self, &'static str> {
        check_magic(bytes, &Self::MAGIC)?;
        Ok(Self {
            version: u16_at(bytes, 4),
            nonce: bytes[8..].try_into().expect("length fixed"),
        })
    }
}

/// Acceptor's answer to `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    /// The acceptor's wire version.
    pub version: u16,
    /// Whether to go on.
    pub status: HandshakeStatus,
    /// The acceptor's nonce.
    pub nonce: [u8; NONCE_LEN],
}

impl Challenge {
    /// Encoded length.
    pub const LEN: usize = 4 + 2 + 2 + NONCE_LEN;
    const MAGIC: [u8; 4] = *b"NVMC";

    /// Encodes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..4].copy_from_slice(&Self::MAGIC);
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6..8].copy_from_slice(&(self.status as u16).to_le_bytes());
        out[8..].copy_from_slice(&self.nonce);
        out
    }

    /// Decodes; the reason on failure.
    pub fn decode(bytes: &[u8; Self::LEN]) -> Result<Self, &'static str> {
        check_magic(bytes, &Self::MAGIC)?;
        Ok(Self {
            version: u16_at(bytes, 4),
            status: HandshakeStatus::from_u16(u16_at(bytes, 6))?,
            nonce: bytes[8..].try_into().expect("length fixed"),
        })
    }
}

/// Dialer's proof of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// The dialer's wire version.
    pub version: u16,
    /// HMAC over both nonces (see `auth.rs`).
    pub mac: [u8; MAC_LEN],
}

impl Response {
    /// Encoded length.
    pub const LEN: usize = 4 + 2 + 2 + MAC_LEN;
    const MAGIC: [u8; 4] = *b"NVMR";

    /// Encodes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..4].copy_from_slice(&Self::MAGIC);
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[8..].copy_from_slice(&self.mac);
        out
    }

    /// Decodes; the reason on failure.
    pub fn decode(bytes: &[u8; Self::LEN]) -> Result<Self, &'static str> {
        check_magic(bytes, &Self::MAGIC)?;
        Ok(Self {
            version: u16_at(bytes, 4),
            mac: bytes[8..].try_into().expect("length fixed"),
        })
    }
}

/// Acceptor's verdict, its proof of the key, and the session's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The acceptor's wire version.
    pub version: u16,
    /// Accepted (`Ok`) or why not.
    pub status: HandshakeStatus,
    /// The new session.
    pub session: u64,
    /// Length of the acceptor's mirror.
    pub mirror_len_bytes: u64,
    /// Largest frame payload the acceptor takes.
    pub max_frame_len_bytes: u32,
    /// HMAC over both nonces and the fields above (see `auth.rs`).
    pub mac: [u8; MAC_LEN],
}

impl Verdict {
    /// Encoded length.
    pub const LEN: usize = 4 + 2 + 2 + 8 + 8 + 4 + 4 + MAC_LEN;
    const MAGIC: [u8; 4] = *b"NVMV";

    /// Encodes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..4].copy_from_slice(&Self::MAGIC);
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6..8].copy_from_slice(&(self.status as u16).to_le_bytes());
        out[8..16].copy_from_slice(&self.session.to_le_bytes());
        out[16..24].copy_from_slice(&self.mirror_len_bytes.to_le_bytes());
        out[24..28].copy_from_slice(&self.max_frame_len_bytes.to_le_bytes());
        out[32..].copy_from_slice(&self.mac);
        out
    }

    /// Decodes; the reason on failure.
    pub fn decode(bytes: &[u8; Self::LEN]) -> Result<Self, &'static str> {
        check_magic(bytes, &Self::MAGIC)?;
        Ok(Self {
            version: u16_at(bytes, 4),
            status: HandshakeStatus::from_u16(u16_at(bytes, 6))?,
            session: u64_at(bytes, 8),
            mirror_len_bytes: u64_at(bytes, 16),
            max_frame_len_bytes: u32_at(bytes, 24),
            mac: bytes[32..].try_into().expect("length fixed"),
        })
    }
}

const _: () = assert!(Hello::LEN == 40 && Challenge::LEN == 40 && Response::LEN == 40);
const _: () = assert!(Verdict::LEN == 64);

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(&mut out, FrameKind::Write, 0xfeed, 9, 4096, b"hello mirror");
        out
    }

    #[test]
    fn a_frame_round_trips_and_reports_its_length() {
        let bytes = sample();
        let (frame, used) = decode_frame(&bytes, 1024).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(frame.kind, FrameKind::Write);
        assert_eq!((frame.session, frame.id, frame.offset), (0xfeed, 9, 4096));
        assert_eq!(frame.payload, b"hello mirror");
    }

    #[test]
    fn every_prefix_asks_for_more_and_every_flipped_byte_is_rejected() {
        let bytes = sample();
        for len in 0..bytes.len() {
            assert!(
                matches!(decode_frame(&bytes[..len], 1024), Ok(None)),
                "prefix {len}"
            );
        }
        for at in 0..bytes.len() {
            for bit in 0..8 {
                let mut corrupt = bytes.clone();
                corrupt[at] ^= 1 << bit;
                match decode_frame(&corrupt, 1024) {
                    Err(_) | Ok(None) => {}
                    Ok(Some(_)) => panic!("flipping bit {bit} of byte {at} went unnoticed"),
                }
            }
        }
    }

    #[test]
    fn oversized_lengths_are_rejected_from_the_header_alone() {
        let bytes = sample();
        let header = &bytes[..FRAME_HEADER_LEN];
        assert!(matches!(
            decode_frame(header, 4),
            Err(Error::FrameTooLong {
                len_bytes: 12,
                max_bytes: 4
            })
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for round in 0..5_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut bytes = if round % 2 == 0 {
                sample()
            } else {
                vec![0; 64]
            };
            for i in 0..(x % 6) {
                let at = ((x >> (8 * i)) as usize) % bytes.len();
                bytes[at] = (x >> (3 * i)) as u8;
            }
            let _ = decode_frame(&bytes, (x % 100) as u32);
        }
    }

    #[test]
    fn handshake_messages_round_trip() {
        let hello = Hello {
            version: 7,
            nonce: [3; NONCE_LEN],
        };
        assert_eq!(Hello::decode(&hello.encode()).unwrap(), hello);
        let challenge = Challenge {
            version: 1,
            status: HandshakeStatus::UnknownVersion,
            nonce: [4; NONCE_LEN],
        };
        assert_eq!(Challenge::decode(&challenge.encode()).unwrap(), challenge);
        let response = Response {
            version: 1,
            mac: [5; MAC_LEN],
        };
        assert_eq!(Response::decode(&response.encode()).unwrap(), response);
        let verdict = Verdict {
            version: 1,
            status: HandshakeStatus::Ok,
            session: 99,
            mirror_len_bytes: 1 << 30,
            max_frame_len_bytes: 1 << 20,
            mac: [6; MAC_LEN],
        };
        assert_eq!(Verdict::decode(&verdict.encode()).unwrap(), verdict);
        assert!(Hello::decode(&[0; Hello::LEN]).is_err());
        let mut bad_status = challenge.encode();
        bad_status[6] = 9;
        assert!(Challenge::decode(&bad_status).is_err());
    }
}
