//! The control channel: typed messages between the partners, the events the
//! interconnect reports to the node, and the heartbeat failure detector.
//!
//! Encoding of a control message (the payload of a control frame), little
//! endian:
//!
//! ```text
//! tag u8 | fields (fixed per tag)
//! 1 Heartbeat    seq u64
//! 2 CpDone       cp_id u64, half_freed u8 (0 or 1)
//! 3 Takeover     epoch u64
//! 4 Giveback     epoch u64
//! 5 ResyncStart  resync_id u64
//! 6 ResyncDone   resync_id u64, through_offset u64
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Error;

/// A typed message between the partners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlMessage {
    /// Liveness; sent every heartbeat interval on each connection.
    Heartbeat {
        /// Increments per heartbeat on a connection.
        seq: u64,
    },
    /// A consistency point finished and freed a half of the sender's log.
    CpDone {
        /// The consistency point.
        cp_id: u64,
        /// The half it freed: 0 or 1.
        half_freed: u8,
    },
    /// The sender is taking over the receiver's volumes.
    Takeover {
        /// The mailbox epoch of the takeover.
        epoch: u64,
    },
    /// The sender hands the receiver's volumes back.
    Giveback {
        /// The mailbox epoch of the giveback.
        epoch: u64,
    },
    /// The sender starts re-mirroring its live log into the receiver's mirror.
    ResyncStart {
        /// Names this resync.
        resync_id: u64,
    },
    /// The sender's log is mirrored again, through `through_offset`.
    ResyncDone {
        /// The resync it ends.
        resync_id: u64,
        /// Log offset mirrored through.
        through_offset: u64,
    },
}

const TAG_HEARTBEAT: u8 = 1;
const TAG_CP_DONE: u8 = 2;
const TAG_TAKEOVER: u8 = 3;
const TAG_GIVEBACK: u8 = 4;
const TAG_RESYNC_START: u8 = 5;
const TAG_RESYNC_DONE: u8 = 6;

/// Longest encoded control message.
pub const CONTROL_MAX_LEN_BYTES: usize = 1 + 8 + 8;

impl ControlMessage {
    /// Appends the encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        match *self {
            Self::Heartbeat { seq } => {
                out.push(TAG_HEARTBEAT);
                out.extend_from_slice(&seq.to_le_bytes());
            }
            Self::CpDone { cp_id, half_freed } => {
                assert!(half_freed <= 1, "a log has two halves");
                out.push(TAG_CP_DONE);
                out.extend_from_slice(&cp_id.to_le_bytes());
                out.push(half_freed);
            }
            Self::Takeover { epoch } => {
                out.push(TAG_TAKEOVER);
                out.extend_from_slice(&epoch.to_le_bytes());
            }
            Self::Giveback { epoch } => {
                out.push(TAG_GIVEBACK);
                out.extend_from_slice(&epoch.to_le_bytes());
            }
            Self::ResyncStart { resync_id } => {
                out.push(TAG_RESYNC_START);
                out.extend_from_slice(&resync_id.to_le_bytes());
            }
            Self::ResyncDone {
                resync_id,
                through_offset,
            } => {
                out.push(TAG_RESYNC_DONE);
                out.extend_from_slice(&resync_id.to_le_bytes());
                out.extend_from_slice(&through_offset.to_le_bytes());
            }
        }
        assert!(out.len() - start <= CONTROL_MAX_LEN_BYTES);
    }

    /// The encoding as a new vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(CONTROL_MAX_LEN_BYTES);
        self.encode(&mut out);
        out
    }
}

/// Decodes one control message; rejects (never panics on) anything that is
/// not exactly one well-formed message. A fuzz target's entry point.
pub fn decode_control(bytes: &[u8]) -> Result<ControlMessage, Error> {
    let (&tag, fields) = bytes.split_first().ok_or(Error::BadControl {
        reason: "empty message",
    })?;
    let expected_len = match tag {
        TAG_HEARTBEAT | TAG_TAKEOVER | TAG_GIVEBACK | TAG_RESYNC_START => 8,
        TAG_CP_DONE => 9,
        TAG_RESYNC_DONE => 16,
        _ => return Err(Error::UnknownControlTag { tag }),
    };
    if fields.len() != expected_len {
        return Err(Error::BadControl {
            reason: "wrong length for its tag",
        });
    }
    let u64_at = |at: usize| {
        u64::from_le_bytes(fields[at..at + 8].try_into().expect("length checked above"))
    };
    Ok(match tag {
        TAG_HEARTBEAT => ControlMessage::Heartbeat { seq: u64_at(0) },
        TAG_CP_DONE => {
            let half_freed = fields[8];
            if half_freed > 1 {
                return Err(Error::BadControl {
                    reason: "half_freed must be 0 or 1",
                });
            }
            ControlMessage::CpDone {
                cp_id: u64_at(0),
                half_freed,
            }
        }
        TAG_TAKEOVER => ControlMessage::Takeover { epoch: u64_at(0) },
        TAG_GIVEBACK => ControlMessage::Giveback { epoch: u64_at(0) },
        TAG_RESYNC_START => ControlMessage::ResyncStart {
            resync_id: u64_at(0),
        },
        TAG_RESYNC_DONE => ControlMessage::ResyncDone {
            resync_id: u64_at(0),
            through_offset: u64_at(8),
        },
        _ => unreachable!("tag validated above"),
    })
}

/// Which connection an event is about: the one this node dialed to mirror
/// its log, or the one the partner dialed to mirror into us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Our sender connection (we post writes).
    Outbound,
    /// The partner's connection into our mirror (we apply writes).
    Inbound,
}

/// What the interconnect tells the node, on the channel it was given.
#[derive(Debug, Clone)]
pub enum ControlEvent {
    /// A connection was authenticated and started a session.
    Connected {
        /// The connection.
        direction: Direction,
        /// Its session.
        session: u64,
        /// The partner's address, if there is one.
        peer: Option<SocketAddr>,
    },
    /// The partner sent a control message (heartbeats are not reported).
    Message {
        /// The connection it came on.
        direction: Direction,
        /// Its session.
        session: u64,
        /// The message.
        message: ControlMessage,
    },
    /// Nothing arrived from the partner for longer than the silence
    /// timeout; the connection is being failed.
    PartnerSilent {
        /// The connection.
        direction: Direction,
        /// Its session.
        session: u64,
        /// How long the partner has been silent.
        silent_ms: u64,
    },
    /// A connection failed or was closed; reconnect to mirror again.
    Disconnected {
        /// The connection.
        direction: Direction,
        /// Its session.
        session: u64,
        /// Why.
        error: Arc<Error>,
    },
}

/// Heartbeat failure detector: "partner silent for X ms". Time is passed
/// in, so a simulation drives it with its own clock.
#[derive(Debug, Clone)]
pub struct FailureDetector {
    timeout: Duration,
    last_heard: Instant,
    reported: bool,
}

impl FailureDetector {
    /// A detector that reports silence longer than `timeout`, counting from `now`.
    pub fn new(timeout: Duration, now: Instant) -> Self {
        Self {
            timeout,
            last_heard: now,
            reported: false,
        }
    }

    /// Something arrived from the partner at `now`.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
        self.reported = false;
    }

    /// How long the partner has been silent at `now`.
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_heard)
    }

    /// `Some(silence)` the first time, since the partner was last heard,
    /// that the silence exceeds the timeout; `None` otherwise.
    pub fn check(&mut self, now: Instant) -> Option<Duration> {
        let silent = self.silent_for(now);
        if silent > self.timeout && !self.reported {
            self.reported = true;
            return Some(silent);
        }
        None
    }

    /// The configured timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_variant() -> Vec<ControlMessage> {
        vec![
            ControlMessage::Heartbeat { seq: 7 },
            ControlMessage::CpDone {
                cp_id: u64::MAX,
                half_freed: 1,
            },
            ControlMessage::CpDone {
                cp_id: 3,
                half_freed: 0,
            },
            ControlMessage::Takeover { epoch: 42 },
            ControlMessage::Giveback { epoch: 43 },
            ControlMessage::ResyncStart { resync_id: 9 },
            ControlMessage::ResyncDone {
                resync_id: 9,
                through_offset: 1 << 40,
            },
        ]
    }

    #[test]
    fn every_variant_round_trips() {
        for message in every_variant() {
            let bytes = message.to_bytes();
            assert!(bytes.len() <= CONTROL_MAX_LEN_BYTES);
            assert_eq!(decode_control(&bytes).unwrap(), message);
        }
    }

    #[test]
    fn truncated_extended_and_unknown_messages_are_rejected() {
        for message in every_variant() {
            let bytes = message.to_bytes();
            for len in 0..bytes.len() {
                assert!(
                    decode_control(&bytes[..len]).is_err(),
                    "{message:?} cut at {len}"
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(matches!(
                decode_control(&longer),
                Err(Error::BadControl { .. })
            ));
        }
        for tag in [0u8, 7, 0x80, 0xff] {
            assert!(matches!(
                decode_control(&[tag; 9]),
                Err(Error::UnknownControlTag { tag: t }) if t == tag
            ));
        }
        let mut bad_half = ControlMessage::CpDone {
            cp_id: 1,
            half_freed: 0,
        }
        .to_bytes();
        bad_half[9] = 2;
        assert!(matches!(
            decode_control(&bad_half),
            Err(Error::BadControl { .. })
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // xorshift: deterministic pseudo-random inputs of every short length.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut accepted = 0;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 20) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (x >> (i % 8 * 8)) as u8).collect();
            if let Ok(message) = decode_control(&bytes) {
                assert_eq!(
                    message.to_bytes(),
                    bytes,
                    "decode accepted a non-canonical encoding"
                );
                accepted += 1;
            }
        }
        assert!(accepted < 20_000);
    }

    #[test]
    fn failure_detector_reports_silence_once_per_episode() {
        let start = Instant::now();
        let mut detector = FailureDetector::new(Duration::from_millis(100), start);
        assert_eq!(detector.check(start + Duration::from_millis(50)), None);
        assert_eq!(
            detector.check(start + Duration::from_millis(150)),
            Some(Duration::from_millis(150))
        );
        assert_eq!(detector.check(start + Duration::from_millis(200)), None);
        assert_eq!(
            detector
                .silent_for(start + Duration::from_millis(200))
                .as_millis(),
            200
        );
        detector.heard(start + Duration::from_millis(210));
        assert_eq!(detector.check(start + Duration::from_millis(300)), None);
        assert!(detector.check(start + Duration::from_millis(311)).is_some());
    }
}
