//! Writes the seed corpora of the interconnect's fuzz targets (`frame`,
//! `control`, `handshake`): messages as the real encoders write them, so
//! the fuzzer starts from valid checksums and layouts.
//!
//! `cargo run -p interconnect --example fuzz_seeds -- interconnect/fuzz/corpus`

#[path = "../tests/fuzz_checks/mod.rs"]
mod fuzz_checks;

use interconnect::tcp::wire::{
    encode_frame, Challenge, FrameKind, HandshakeStatus, Hello, Response, Verdict, MAC_LEN,
    NONCE_LEN, WIRE_VERSION,
};
use interconnect::ControlMessage;

use fuzz_checks::frame_input_options;

/// Index into `fuzz_checks::FRAME_LIMITS` of a 64 KiB limit.
const LIMIT_64_KIB: usize = 5;
/// Index of a 64-byte limit.
const LIMIT_64_BYTES: usize = 3;
/// Index of a limit of zero (only acks and empty control frames fit).
const LIMIT_ZERO: usize = 0;

const SESSION: u64 = 0x5e55_1014_0000_0001;

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: fuzz_seeds <corpus dir>");
    let messages = every_control_message();

    let mut control = Vec::new();
    for (name, message) in &messages {
        control.push((name.to_string(), message.to_bytes()));
    }
    write_seeds(&dir, "control", &control);

    let frame = |kind, id, offset, payload: &[u8]| {
        let mut out = Vec::new();
        encode_frame(&mut out, kind, SESSION, id, offset, payload);
        out
    };
    let write = frame(FrameKind::Write, 1, 4096, &pattern(512));
    let ack = frame(FrameKind::Ack, 1, 0, &[]);
    let heartbeat = frame(
        FrameKind::Control,
        0,
        0,
        &ControlMessage::Heartbeat { seq: 3 }.to_bytes(),
    );
    let mut stream = Vec::new();
    for (id, (_, message)) in messages.iter().enumerate() {
        let id = id as u64 + 1;
        stream.extend(frame(FrameKind::Write, id, id * 8192, &pattern(40)));
        stream.extend(frame(FrameKind::Control, 0, 0, &message.to_bytes()));
        stream.extend(frame(FrameKind::Ack, id, 0, &[]));
    }
    let mut bad_crc = write.clone();
    *bad_crc.last_mut().expect("payload") ^= 0x40;
    let with_options = |limit: usize, fix_crc: bool, bytes: &[u8]| {
        let mut seed = vec![frame_input_options(limit, fix_crc)];
        seed.extend_from_slice(bytes);
        seed
    };
    let frames = [
        ("write", with_options(LIMIT_64_KIB, false, &write)),
        ("ack", with_options(LIMIT_ZERO, false, &ack)),
        ("heartbeat", with_options(LIMIT_64_BYTES, false, &heartbeat)),
        ("stream", with_options(LIMIT_64_KIB, false, &stream)),
        ("stream-fix-crc", with_options(LIMIT_64_KIB, true, &stream)),
        ("partial", with_options(LIMIT_64_KIB, false, &write[..300])),
        ("oversized", with_options(LIMIT_64_BYTES, false, &write)),
        ("bad-crc", with_options(LIMIT_64_KIB, false, &bad_crc)),
        ("bad-crc-fixed", with_options(LIMIT_64_KIB, true, &bad_crc)),
    ];
    let frames: Vec<_> = frames
        .into_iter()
        .map(|(name, seed)| (name.to_string(), seed))
        .collect();
    write_seeds(&dir, "frame", &frames);

    let hello = Hello {
        version: WIRE_VERSION,
        nonce: [0x11; NONCE_LEN],
    };
    let challenge = Challenge {
        version: WIRE_VERSION,
        status: HandshakeStatus::Ok,
        nonce: [0x22; NONCE_LEN],
    };
    let refusal = Challenge {
        version: WIRE_VERSION,
        status: HandshakeStatus::UnknownVersion,
        nonce: [0; NONCE_LEN],
    };
    let response = Response {
        version: WIRE_VERSION,
        mac: [0x33; MAC_LEN],
    };
    let verdict = Verdict {
        version: WIRE_VERSION,
        status: HandshakeStatus::Ok,
        session: SESSION,
        mirror_len_bytes: 64 << 20,
        max_frame_len_bytes: 1 << 20,
        mac: [0x44; MAC_LEN],
    };
    let selected = |which: u8, bytes: &[u8]| {
        let mut seed = vec![which];
        seed.extend_from_slice(bytes);
        seed
    };
    let handshake = [
        ("hello", selected(0, &hello.encode())),
        ("challenge", selected(1, &challenge.encode())),
        ("challenge-refusal", selected(1, &refusal.encode())),
        ("response", selected(2, &response.encode())),
        ("verdict", selected(3, &verdict.encode())),
    ];
    let handshake: Vec<_> = handshake
        .into_iter()
        .map(|(name, seed)| (name.to_string(), seed))
        .collect();
    write_seeds(&dir, "handshake", &handshake);
}

fn every_control_message() -> Vec<(&'static str, ControlMessage)> {
    vec![
        ("heartbeat", ControlMessage::Heartbeat { seq: 7 }),
        (
            "cp-done",
            ControlMessage::CpDone {
                cp_id: 12,
                half_freed: 1,
            },
        ),
        ("takeover", ControlMessage::Takeover { epoch: 2 }),
        ("giveback", ControlMessage::Giveback { epoch: 3 }),
        ("resync-start", ControlMessage::ResyncStart { resync_id: 4 }),
        (
            "resync-done",
            ControlMessage::ResyncDone {
                resync_id: 4,
                through_offset: 1 << 20,
            },
        ),
    ]
}

/// Recognizable bytes, not all alike.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 1) as u8).collect()
}

fn write_seeds(dir: &str, target: &str, seeds: &[(String, Vec<u8>)]) {
    let dir = format!("{dir}/{target}");
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    for (name, seed) in seeds {
        std::fs::write(format!("{dir}/{name}"), seed).expect("write seed");
    }
}
