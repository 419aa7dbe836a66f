//! Byte layouts of the RDMA transport. All integers little endian.
//!
//! # Connection private data (rdma_cm)
//!
//! rdma_cm delivers private data zero-padded to the CM message size, so
//! every layout has a fixed length and trailing bytes are ignored.
//!
//! ```text
//! Hello     (CONNECT_REQUEST, dialer -> acceptor, 40 of at most 56 bytes)
//!   0  4 magic "NVRH"   4 2 version   6 2 reserved 0   8 32 nonce_d
//! Challenge (accept, acceptor -> dialer, 40 of at most 196 bytes)
//!   0  4 magic "NVRC"   4 2 version   6 2 status 0     8 32 nonce_a
//! Refusal   (reject, acceptor -> dialer, 8 of at most 148 bytes)
//!   0  4 magic "NVRJ"   4 2 version the acceptor speaks   6 2 status
//! ```
//!
//! # Messages (SEND/RECV, inline, at most `MESSAGE_MAX_LEN` bytes)
//!
//! ```text
//! header
//!   0 4 magic "NVRM"
//!   4 1 version
//!   5 1 kind       1 response, 2 verdict, 3 control
//!   6 2 credits    receive buffers the sender re-posted since its last
//!                  message (flow control, see `mod.rs`)
//! response (dialer -> acceptor), 40 bytes
//!   8 32 mac_d
//! verdict (acceptor -> dialer), 88 bytes
//!   8  2 status 0 ok, 3 auth failed
//!  10  2 reserved 0
//!  12  4 max_write_len_bytes   largest RDMA WRITE the acceptor takes
//!  16  8 session
//!  24  8 mirror_addr           the registered mirror's address
//!  32  8 mirror_len_bytes
//!  40  4 rkey                  the mirror's remote key, this session only
//!  44  4 reserved 0
//!  48  8 reserved 0
//!  56 32 mac_a
//! control, 8 + the control message (see `control.rs`)
//! ```
//!
//! ```text
//! mac_d = HMAC(key, "nvmirror rdma dialer"   | version | nonce_d | nonce_a)
//! mac_a = HMAC(key, "nvmirror rdma acceptor" | version | nonce_d | nonce_a
//!                   | bytes 8..56 of the verdict)
//! ```

use crate::control::CONTROL_MAX_LEN_BYTES;
use crate::tcp::wire::{HandshakeStatus, MAC_LEN, NONCE_LEN};

/// The RDMA wire version this build speaks.
pub const RDMA_WIRE_VERSION: u16 = 1;
const _: () = assert!(
    RDMA_WIRE_VERSION <= u8::MAX as u16,
    "messages carry one byte"
);

const HELLO_MAGIC: [u8; 4] = *b"NVRH";
const CHALLENGE_MAGIC: [u8; 4] = *b"NVRC";
const REFUSAL_MAGIC: [u8; 4] = *b"NVRJ";
const MESSAGE_MAGIC: [u8; 4] = *b"NVRM";

/// Private data of the connect request.
pub const HELLO_LEN: usize = 8 + NONCE_LEN;
/// Private data of the accept.
pub const CHALLENGE_LEN: usize = 8 + NONCE_LEN;
/// Private data of a reject.
pub const REFUSAL_LEN: usize = 8;
// rdma_cm's limits for RC: 56 bytes on connect, 196 on accept, 148 on reject.
const _: () = assert!(HELLO_LEN <= 56 && CHALLENGE_LEN <= 196 && REFUSAL_LEN <= 148);

/// Message header length.
pub const HEADER_LEN: usize = 8;
/// A response message.
pub const RESPONSE_LEN: usize = HEADER_LEN + MAC_LEN;
/// A verdict message.
pub const VERDICT_LEN: usize = HEADER_LEN + 48 + MAC_LEN;
/// The verdict bytes mac_a covers.
pub const VERDICT_SIGNED: std::ops::Range<usize> = HEADER_LEN..HEADER_LEN + 48;
/// Longest message: receive buffers and the inline size are this big.
pub const MESSAGE_MAX_LEN: usize = 128;
const _: () = assert!(VERDICT_LEN <= MESSAGE_MAX_LEN && RESPONSE_LEN <= MESSAGE_MAX_LEN);
const _: () = assert!(HEADER_LEN + CONTROL_MAX_LEN_BYTES <= MESSAGE_MAX_LEN);

/// Labels of the two proofs: one side's proof never serves as the other's.
pub const DIALER_LABEL: &[u8] = b"nvmirror rdma dialer";
/// See [`DIALER_LABEL`].
pub const ACCEPTOR_LABEL: &[u8] = b"nvmirror rdma acceptor";

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes[at..at + 2].try_into().expect("two bytes"))
}
fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
}
fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("eight bytes"))
}

/// The dialer's opening, in the connect request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The version it speaks.
    pub version: u16,
    /// Its fresh nonce.
    pub nonce: [u8; NONCE_LEN],
}

impl Hello {
    /// Encodes it.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[0..4].copy_from_slice(&HELLO_MAGIC);
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[8..].copy_from_slice(&self.nonce);
        out
    }

    /// Decodes it from (padded) private data. The version is not checked
    /// here: a peer of another version must get a clear refusal.
    pub fn decode(bytes: &[u8]) -> Result<Self, &'static str> {
        let bytes = bytes
            .get(..HELLO_LEN)
            .ok_or("connect private data too short")?;
        if bytes[0..4] != HELLO_MAGIC {
            return Err("not an nvmirror RDMA connect request");
        }
        if u16_at(bytes, 6) != 0 {
            return Err("reserved bytes are not zero");
        }
        Ok(Self {
            version: u16_at(bytes, 4),
            nonce: bytes[8..].try_into().expect("nonce length"),
        })
    }
}

/// The acceptor's answer, in the accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    /// The version it speaks.
    pub version: u16,
    /// Its fresh nonce.
    pub nonce: [u8; NONCE_LEN],
}

impl Challenge {
    /// Encodes it.
    pub fn encode(&self) -> [u8; CHALLENGE_LEN] {
        let mut out = [0u8; CHALLENGE_LEN];
        out[0..4].copy_from_slice(&CHALLENGE_MAGIC);
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[8..].copy_from_slice(&self.nonce);
        out
    }

    /// Decodes it from (padded) private data.
    pub fn decode(bytes: &[u8]) -> Result<Self, &'static str> {
        let bytes = bytes
            .get(..CHALLENGE_LEN)
            .ok_or("accept private data too short")?;
        if bytes[0..4] != CHALLENGE_MAGIC {
            return Err("not an nvmirror RDMA accept");
        }
        if u16_at(bytes, 6) != 0 {
            return Err("challenge status is not zero");
        }
        Ok(Self {
            version: u16_at(bytes, 4),
            nonce: bytes[8..].try_into().expect("nonce length"),
        })
    }
}

/// Why the acceptor rejected the connect request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The version the acceptor speaks.
    pub version: u16,
    /// Why.
    pub status: HandshakeStatus,
}

impl Refusal {
    /// Encodes it.
    pub fn encode(&self) -> [u8; REFUSAL_LEN] {
        let mut out = [0u8; REFUSAL_LEN];
        out[0..4].copy_from_slice(&REFUSAL_MAGIC);
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6..8].copy_from_slice(&(self.status as u16).to_le_bytes());
        out
    }

    /// Decodes the private data of a reject; `None` if it is not ours (the
    /// CM itself rejected: no listener, a timeout...).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes = bytes.get(..REFUSAL_LEN)?;
        if bytes[0..4] != REFUSAL_MAGIC {
            return None;
        }
        Some(Self {
            version: u16_at(bytes, 4),
            status: HandshakeStatus::from_u16(u16_at(bytes, 6)).ok()?,
        })
    }
}

/// What a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageKind {
    /// The dialer's proof.
    Response = 1,
    /// The acceptor's verdict, proof and mirror key.
    Verdict = 2,
    /// A control message.
    Control = 3,
}

/// A decoded message header and its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// What it carries.
    pub kind: MessageKind,
    /// Receive buffers the peer re-posted since its previous message.
    pub credits: u16,
    /// The whole message, header included (proofs cover header fields).
    pub bytes: &'a [u8],
}

/// Appends a message header to `out`.
pub fn encode_header(out: &mut Vec<u8>, kind: MessageKind, credits: u16) {
    out.extend_from_slice(&MESSAGE_MAGIC);
    out.push(RDMA_WIRE_VERSION as u8);
    out.push(kind as u8);
    out.extend_from_slice(&credits.to_le_bytes());
}

/// Decodes a received message. Never panics.
pub fn decode_message(bytes: &[u8]) -> Result<Message<'_>, &'static str> {
    if bytes.len() < HEADER_LEN {
        return Err("message shorter than its header");
    }
    if bytes.len() > MESSAGE_MAX_LEN {
        return Err("message longer than a receive buffer");
    }
    if bytes[0..4] != MESSAGE_MAGIC {
        return Err("bad message magic");
    }
    if u16::from(bytes[4]) != RDMA_WIRE_VERSION {
        return Err("message of another wire version");
    }
    let kind = match bytes[5] {
        1 => MessageKind::Response,
        2 => MessageKind::Verdict,
        3 => MessageKind::Control,
        _ => return Err("unknown message kind"),
    };
    let len_ok = match kind {
        MessageKind::Response => bytes.len() == RESPONSE_LEN,
        MessageKind::Verdict => bytes.len() == VERDICT_LEN,
        MessageKind::Control => bytes.len() > HEADER_LEN,
    };
    if !len_ok {
        return Err("message length does not match its kind");
    }
    Ok(Message {
        kind,
        credits: u16_at(bytes, 6),
        bytes,
    })
}

/// The acceptor's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Ok, or why the dialer was refused.
    pub status: HandshakeStatus,
    /// Largest RDMA WRITE the acceptor takes.
    pub max_write_len_bytes: u32,
    /// The session id.
    pub session: u64,
    /// The mirror's registered address.
    pub mirror_addr: u64,
    /// The mirror's length.
    pub mirror_len_bytes: u64,
    /// The mirror's rkey for this session.
    pub rkey: u32,
}

impl Verdict {
    /// Appends the signed fields (bytes 8..56).
    pub fn encode_fields(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.status as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.max_write_len_bytes.to_le_bytes());
        out.extend_from_slice(&self.session.to_le_bytes());
        out.extend_from_slice(&self.mirror_addr.to_le_bytes());
        out.extend_from_slice(&self.mirror_len_bytes.to_le_bytes());
        out.extend_from_slice(&self.rkey.to_le_bytes());
        out.extend_from_slice(&[0u8; 12]);
    }

    /// Decodes a verdict message (already checked by `decode_message`).
    pub fn decode(bytes: &[u8]) -> Result<(Self, [u8; MAC_LEN]), &'static str> {
        assert_eq!(bytes.len(), VERDICT_LEN);
        let status = HandshakeStatus::from_u16(u16_at(bytes, 8))?;
        if u16_at(bytes, 10) != 0 || bytes[44..56].iter().any(|b| *b != 0) {
            return Err("reserved verdict bytes are not zero");
        }
        Ok((
            Self {
                status,
                max_write_len_bytes: u32_at(bytes, 12),
                session: u64_at(bytes, 16),
                mirror_addr: u64_at(bytes, 24),
                mirror_len_bytes: u64_at(bytes, 32),
                rkey: u32_at(bytes, 40),
            },
            bytes[56..].try_into().expect("mac length"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_padding() {
        let hello = Hello {
            version: RDMA_WIRE_VERSION,
            nonce: [7; NONCE_LEN],
        };
        let mut padded = hello.encode().to_vec();
        padded.resize(56, 0);
        assert_eq!(Hello::decode(&padded).unwrap(), hello);
        assert!(Hello::decode(&padded[..HELLO_LEN - 1]).is_err());
        let challenge = Challenge {
            version: 9,
            nonce: [1; NONCE_LEN],
        };
        assert_eq!(Challenge::decode(&challenge.encode()).unwrap(), challenge);
        assert!(Challenge::decode(&hello.encode()).is_err());
        let refusal = Refusal {
            version: 1,
            status: HandshakeStatus::UnknownVersion,
        };
        assert_eq!(Refusal::decode(&refusal.encode()), Some(refusal));
        assert_eq!(Refusal::decode(&[0; 148]), None);

        let verdict = Verdict {
            status: HandshakeStatus::Ok,
            max_write_len_bytes: 1 << 20,
            session: 42,
            mirror_addr: 0xdead_beef,
            mirror_len_bytes: 1 << 30,
            rkey: 77,
        };
        let mut bytes = Vec::new();
        encode_header(&mut bytes, MessageKind::Verdict, 3);
        verdict.encode_fields(&mut bytes);
        bytes.extend_from_slice(&[5; MAC_LEN]);
        let message = decode_message(&bytes).unwrap();
        assert_eq!((message.kind, message.credits), (MessageKind::Verdict, 3));
        assert_eq!(
            Verdict::decode(message.bytes).unwrap(),
            (verdict, [5; MAC_LEN])
        );
    }

    #[test]
    fn garbage_messages_are_refused() {
        for len in 0..=MESSAGE_MAX_LEN + 1 {
            for fill in [0u8, 3, 0xff] {
                let bytes = vec![fill; len];
                assert!(decode_message(&bytes).is_err());
            }
        }
        let mut control = Vec::new();
        encode_header(&mut control, MessageKind::Control, 0);
        assert!(
            decode_message(&control).is_err(),
            "a control message needs a payload"
        );
        control.push(1);
        assert!(decode_message(&control).is_ok());
        control[4] = 2;
        assert!(decode_message(&control).is_err());
    }
}
