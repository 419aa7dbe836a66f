//! The properties the interconnect's fuzz targets check, shared with the
//! test that replays the committed corpus and every crash the fuzzer ever
//! found (`interconnect/fuzz/regressions/<target>/`).
//!
//! - `frame`: [`check_frame`], the frame decoder over a byte stream.
//! - `control`: [`check_control`], the control-message decoder.
//! - `handshake`: [`check_handshake`], the four handshake messages.

// Each fuzz target includes this module and uses one of its checks.
#![allow(dead_code)]

use interconnect::control::CONTROL_MAX_LEN_BYTES;
use interconnect::tcp::wire::{
    encode_frame, Challenge, Frame, FrameKind, Hello, Response, Verdict, FRAME_HEADER_LEN,
    FRAME_MAX_PAYLOAD_LEN_BYTES,
};
use interconnect::{decode_control, decode_frame, ControlMessage, Error};

/// The payload limits a `frame` input can choose (its first byte, low
/// three bits): the edges (0, 1), small limits the fuzzer can reach, the
/// default-like ones, and limits above the decoder's own cap.
pub const FRAME_LIMITS: [u32; 8] = [
    0,
    1,
    16,
    64,
    4096,
    64 * 1024,
    FRAME_MAX_PAYLOAD_LEN_BYTES,
    u32::MAX,
];

/// Bit of a `frame` input's first byte: before each frame is decoded, put
/// the right CRC32C in its header (when its payload is all there), so the
/// fuzzer reaches the checks behind the checksum.
pub const FRAME_FIX_CRC: u8 = 0x08;

/// Byte offset of the CRC in a frame header, and of the length field (see
/// the layout in `interconnect/src/tcp/wire.rs`).
const FRAME_LEN_AT: usize = 32;
const FRAME_CRC_AT: usize = 36;

/// The first byte of a `frame` input: which limit, whether to fix CRCs.
pub fn frame_input_options(limit_index: usize, fix_crc: bool) -> u8 {
    assert!(limit_index < FRAME_LIMITS.len());
    limit_index as u8 | if fix_crc { FRAME_FIX_CRC } else { 0 }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
}

/// Input: an options byte ([`frame_input_options`]), then a byte stream as
/// a receiver reads it. Decodes frame after frame the way the receiver
/// does, and checks of each answer:
///
/// - `Ok(None)` only for a true prefix: the header is incomplete, or it is
///   valid and the payload incomplete;
/// - an accepted frame is exactly what the encoder writes for its fields
///   (so nothing in it went unchecked), obeys its kind's rules and the
///   limit, and every prefix of it asks for more;
/// - an error found in the header alone is found without the payload;
/// - a control frame's payload goes through [`check_control`].
pub fn check_frame(data: &[u8]) {
    let Some((&options, stream)) = data.split_first() else {
        return;
    };
    let max_payload_len_bytes = FRAME_LIMITS[usize::from(options) % FRAME_LIMITS.len()];
    let fix_crc = options & FRAME_FIX_CRC != 0;
    let limit = max_payload_len_bytes.min(FRAME_MAX_PAYLOAD_LEN_BYTES);
    let mut stream = stream.to_vec();
    let mut at = 0;
    loop {
        if fix_crc {
            fix_frame_crc(&mut stream[at..]);
        }
        let buf = &stream[at..];
        match decode_frame(buf, max_payload_len_bytes) {
            Ok(None) => {
                if buf.len() >= FRAME_HEADER_LEN {
                    let len_bytes = u32_at(buf, FRAME_LEN_AT);
                    assert!(len_bytes <= limit, "an oversized frame was awaited");
                    assert!(
                        buf.len() < FRAME_HEADER_LEN + len_bytes as usize,
                        "a complete frame was neither accepted nor rejected"
                    );
                }
                return;
            }
            Ok(Some((frame, used))) => {
                check_accepted_frame(buf, &frame, used, max_payload_len_bytes);
                at += used;
            }
            Err(error) => {
                check_frame_error(buf, &error, max_payload_len_bytes);
                return;
            }
        }
    }
}

/// Writes the CRC a frame header at the start of `buf` should carry, if
/// the header and payload are all there.
fn fix_frame_crc(buf: &mut [u8]) {
    if buf.len() < FRAME_HEADER_LEN {
        return;
    }
    let len_bytes = u32_at(buf, FRAME_LEN_AT) as usize;
    let Some(end) = FRAME_HEADER_LEN.checked_add(len_bytes) else {
        return;
    };
    if end > buf.len() {
        return;
    }
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&buf[..FRAME_CRC_AT]),
        &buf[FRAME_HEADER_LEN..end],
    );
    buf[FRAME_CRC_AT..FRAME_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
}

fn check_accepted_frame(buf: &[u8], frame: &Frame<'_>, used: usize, max_payload_len_bytes: u32) {
    let limit = max_payload_len_bytes.min(FRAME_MAX_PAYLOAD_LEN_BYTES);
    assert_eq!(used, FRAME_HEADER_LEN + frame.payload.len());
    assert!(used <= buf.len());
    assert!(frame.payload.len() as u64 <= u64::from(limit));
    assert_eq!(frame.payload, &buf[FRAME_HEADER_LEN..used]);
    match frame.kind {
        FrameKind::Write => assert!(!frame.payload.is_empty() && frame.id != 0),
        FrameKind::Ack => assert!(frame.payload.is_empty() && frame.offset == 0),
        FrameKind::Control => {
            assert!(frame.id == 0 && frame.offset == 0);
            check_control(frame.payload);
        }
    }
    let mut encoded = Vec::with_capacity(used);
    encode_frame(
        &mut encoded,
        frame.kind,
        frame.session,
        frame.id,
        frame.offset,
        frame.payload,
    );
    assert_eq!(
        encoded,
        &buf[..used],
        "an accepted frame is not what the encoder writes for it"
    );
    // Every prefix asks for more: the last byte missing, the header cut,
    // the header alone.
    for cut in [used - 1, FRAME_HEADER_LEN - 1, FRAME_HEADER_LEN] {
        if cut < used {
            assert!(
                matches!(decode_frame(&buf[..cut], max_payload_len_bytes), Ok(None)),
                "a {cut}-byte prefix of a valid {used}-byte frame did not ask for more"
            );
        }
    }
    // A higher limit accepts it too; a limit below its payload refuses it
    // from the header alone.
    assert_eq!(
        decode_frame(&buf[..used], u32::MAX).expect("a higher limit accepts"),
        Some((*frame, used))
    );
    if let Some(lower) = (frame.payload.len() as u32).checked_sub(1) {
        assert!(matches!(
            decode_frame(&buf[..FRAME_HEADER_LEN], lower),
            Err(Error::FrameTooLong { .. })
        ));
    }
}

fn check_frame_error(buf: &[u8], error: &Error, max_payload_len_bytes: u32) {
    assert!(
        matches!(
            error,
            Error::BadMagic { .. }
                | Error::FrameVersion { .. }
                | Error::UnknownFrameKind { .. }
                | Error::FrameTooLong { .. }
                | Error::BadChecksum { .. }
                | Error::MalformedFrame { .. }
        ),
        "decode_frame returned a non-frame error: {error:?}"
    );
    assert!(!error.to_string().is_empty());
    assert!(buf.len() >= FRAME_HEADER_LEN, "an error before the header");
    // Whatever the header alone says is wrong, the whole frame says too.
    if let Err(header_error) = decode_frame(&buf[..FRAME_HEADER_LEN], max_payload_len_bytes) {
        assert_eq!(header_error.to_string(), error.to_string());
    }
}

/// Input: one control message (a control frame's payload). An accepted
/// message is exactly the encoding of what it decoded to, and decodes again
/// to the same; a rejected one is rejected with a control error.
pub fn check_control(data: &[u8]) {
    match decode_control(data) {
        Ok(message) => {
            assert!(data.len() <= CONTROL_MAX_LEN_BYTES);
            let encoded = message.to_bytes();
            assert_eq!(encoded, data, "decode accepted a non-canonical encoding");
            assert_eq!(
                decode_control(&encoded).expect("an encoding decodes"),
                message
            );
            if let ControlMessage::CpDone { half_freed, .. } = message {
                assert!(half_freed <= 1);
            }
        }
        Err(error) => {
            assert!(
                matches!(
                    error,
                    Error::BadControl { .. } | Error::UnknownControlTag { .. }
                ),
                "decode_control returned a non-control error: {error:?}"
            );
            assert!(!error.to_string().is_empty());
        }
    }
}

/// Input: a selector byte (which of the four messages), then the message's
/// bytes (cut or zero-padded to its length). An accepted message is the
/// encoding of what it decoded to, up to its reserved bytes, which the
/// decoder ignores; it decodes again to the same.
pub fn check_handshake(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            let bytes = padded::<{ Hello::LEN }>(rest);
            if let Ok(message) = Hello::decode(&bytes) {
                let encoded = message.encode();
                assert_eq!(with_zeroed(bytes, 6..8), encoded);
                assert_eq!(Hello::decode(&encoded), Ok(message));
            }
        }
        1 => {
            let bytes = padded::<{ Challenge::LEN }>(rest);
            if let Ok(message) = Challenge::decode(&bytes) {
                let encoded = message.encode();
                assert_eq!(bytes, encoded);
                assert_eq!(Challenge::decode(&encoded), Ok(message));
            }
        }
        2 => {
            let bytes = padded::<{ Response::LEN }>(rest);
            if let Ok(message) = Response::decode(&bytes) {
                let encoded = message.encode();
                assert_eq!(with_zeroed(bytes, 6..8), encoded);
                assert_eq!(Response::decode(&encoded), Ok(message));
            }
        }
        _ => {
            let bytes = padded::<{ Verdict::LEN }>(rest);
            if let Ok(message) = Verdict::decode(&bytes) {
                let encoded = message.encode();
                assert_eq!(with_zeroed(bytes, 28..32), encoded);
                assert_eq!(Verdict::decode(&encoded), Ok(message));
            }
        }
    }
}

fn padded<const N: usize>(rest: &[u8]) -> [u8; N] {
    let mut bytes = [0; N];
    let len = rest.len().min(N);
    bytes[..len].copy_from_slice(&rest[..len]);
    bytes
}

fn with_zeroed<const N: usize>(mut bytes: [u8; N], reserved: std::ops::Range<usize>) -> [u8; N] {
    bytes[reserved].fill(0);
    bytes
}
