//! The TCP transport end to end on loopback: data, bad input, peer
//! authentication, connection loss, reconnect, heartbeats, control messages.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{config, expect_event, key, loopback, other_key, pattern, read_all, watchdog, LONG};
use crossbeam_channel::{unbounded, Receiver};
use interconnect::auth::{accept_handshake, dial_handshake};
use interconnect::tcp::wire::{
    encode_frame, Challenge, FrameKind, HandshakeStatus, Hello, Response, Verdict, MAC_LEN,
    NONCE_LEN, WIRE_VERSION,
};
use interconnect::{
    ControlEvent, ControlMessage, Direction, Error, MirrorReceiver, MirrorWrite, QueueError,
    RefuseReason, SendQueue, SharedMemory, TcpConfig, TcpSender,
};

const MIRROR_LEN: usize = 1 << 20;

struct Pair {
    receiver: MirrorReceiver,
    mirror: SharedMemory,
    local: SharedMemory,
    queue: SendQueue,
    receiver_events: Receiver<ControlEvent>,
    sender_events: Receiver<ControlEvent>,
}

fn pair_with(config: &TcpConfig) -> Pair {
    let mirror = SharedMemory::zeroed(MIRROR_LEN);
    let local = SharedMemory::zeroed(MIRROR_LEN);
    let (receiver_tx, receiver_events) = unbounded();
    let receiver =
        MirrorReceiver::bind(loopback(), config, mirror.clone(), Some(receiver_tx)).unwrap();
    let (sender_tx, sender_events) = unbounded();
    let sender = TcpSender::connect(
        receiver.local_addr(),
        config,
        local.clone(),
        Some(sender_tx),
    )
    .unwrap();
    let queue = SendQueue::new(sender, config.send_depth).unwrap();
    Pair {
        receiver,
        mirror,
        local,
        queue,
        receiver_events,
        sender_events,
    }
}

fn pair() -> Pair {
    pair_with(&config())
}

/// Copies `data` into the local log at `offset` and mirrors it there.
fn mirror_write(pair: &Pair, offset: u64, data: &[u8]) -> interconnect::WriteId {
    pair.local.write_at(offset, data).unwrap();
    let len_bytes = data.len() as u64;
    let mut reservation = pair
        .queue
        .reserve_timeout(pair.queue.slots_for(len_bytes), LONG)
        .unwrap();
    reservation.post(MirrorWrite {
        src_offset: offset,
        dst_offset: offset,
        len_bytes,
    })
}

#[test]
fn bytes_at_offsets_arrive_intact() {
    let _watchdog = watchdog("bytes_at_offsets_arrive_intact", Duration::from_secs(30));
    let pair = pair();
    // Small, odd-sized, contiguous (coalesced) and larger-than-a-frame writes.
    let mut offset = 3u64;
    let mut last = None;
    for (i, len) in [1usize, 7, 64, 4096, 100, 64 * 1024 + 5, 200_000, 13]
        .into_iter()
        .enumerate()
    {
        last = Some(mirror_write(&pair, offset, &pattern(i as u64, len)));
        offset += len as u64;
    }
    let far = (MIRROR_LEN - 64) as u64;
    let far_id = mirror_write(&pair, far, &pattern(99, 64));
    pair.queue.wait_placed_timeout(last.unwrap(), LONG).unwrap();
    pair.queue.wait_placed_timeout(far_id, LONG).unwrap();
    assert_eq!(read_all(&pair.mirror), read_all(&pair.local));
    assert_eq!(pair.queue.in_flight(), 0);
    let stats = pair.receiver.stats();
    assert_eq!(stats.applied_through, far_id.get());
    assert_eq!(
        stats.bytes_applied,
        offset - 3 + 64,
        "every byte applied exactly once"
    );
}

#[test]
fn control_messages_flow_both_ways() {
    let _watchdog = watchdog("control_messages_flow_both_ways", Duration::from_secs(30));
    let pair = pair();
    let id = mirror_write(&pair, 0, b"record before the CP notification");
    let cp = ControlMessage::CpDone {
        cp_id: 7,
        half_freed: 1,
    };
    pair.queue.send_control(&cp).unwrap();
    let got = expect_event(
        &pair.receiver_events,
        "control message",
        |event| match event {
            ControlEvent::Message {
                direction: Direction::Inbound,
                message,
                ..
            } => Some(*message),
            _ => None,
        },
    );
    assert_eq!(got, cp);
    // Sent after the write, so the write was applied first.
    assert!(pair.receiver.stats().applied_through >= id.get());

    let takeover = ControlMessage::Takeover { epoch: 3 };
    pair.receiver.send_control(&takeover).unwrap();
    let got = expect_event(
        &pair.sender_events,
        "control message",
        |event| match event {
            ControlEvent::Message {
                direction: Direction::Outbound,
                message,
                ..
            } => Some(*message),
            _ => None,
        },
    );
    assert_eq!(got, takeover);
}

/// Connects with a plain socket and a real handshake, to send raw frames.
fn raw_session(receiver: &MirrorReceiver) -> (TcpStream, u64) {
    let addr = receiver.local_addr();
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(LONG)).unwrap();
    let params = dial_handshake(&mut stream, addr, &key()).unwrap();
    (stream, params.session)
}

fn inbound_error(events: &Receiver<ControlEvent>) -> Arc<Error> {
    expect_event(events, "inbound disconnect", |event| match event {
        ControlEvent::Disconnected {
            direction: Direction::Inbound,
            error,
            ..
        } => Some(Arc::clone(error)),
        _ => None,
    })
}

/// Asserts the receiver closed the socket.
fn assert_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            // Heartbeats sent before the close.
            Ok(_) => continue,
        }
    }
}

struct Receiving {
    receiver: MirrorReceiver,
    mirror: SharedMemory,
    events: Receiver<ControlEvent>,
}

fn receiving() -> Receiving {
    let mirror = SharedMemory::zeroed(4096);
    let (tx, events) = unbounded();
    let receiver = MirrorReceiver::bind(loopback(), &config(), mirror.clone(), Some(tx)).unwrap();
    Receiving {
        receiver,
        mirror,
        events,
    }
}

#[test]
fn a_frame_outside_the_mirror_closes_the_connection_and_writes_nothing() {
    let _watchdog = watchdog("out_of_bounds", Duration::from_secs(30));
    let r = receiving();
    let (mut stream, session) = raw_session(&r.receiver);
    let mut frames = Vec::new();
    encode_frame(&mut frames, FrameKind::Write, session, 1, 0, b"in bounds");
    // Ends 4 bytes past the end of the 4096-byte mirror.
    encode_frame(&mut frames, FrameKind::Write, session, 2, 4092, &[0xee; 8]);
    stream.write_all(&frames).unwrap();
    let error = inbound_error(&r.events);
    assert!(
        matches!(
            *error,
            Error::FrameOutOfBounds {
                offset: 4092,
                len_bytes: 8,
                mirror_len_bytes: 4096
            }
        ),
        "{error}"
    );
    assert_closed(&mut stream);
    let mirror = read_all(&r.mirror);
    assert_eq!(&mirror[..9], b"in bounds");
    assert!(
        mirror[9..].iter().all(|b| *b == 0),
        "nothing else was written"
    );
    assert_eq!(r.receiver.stats().frames_applied, 1);

    // An offset whose end overflows u64 is out of bounds too.
    let (mut stream, session) = raw_session(&r.receiver);
    let mut frame = Vec::new();
    encode_frame(
        &mut frame,
        FrameKind::Write,
        session,
        1,
        u64::MAX - 2,
        &[1; 8],
    );
    stream.write_all(&frame).unwrap();
    let error = inbound_error(&r.events);
    assert!(matches!(*error, Error::FrameOutOfBounds { .. }), "{error}");
    assert_eq!(r.receiver.stats().frames_applied, 1);
}

#[test]
fn a_bad_checksum_closes_the_connection_and_writes_nothing() {
    let _watchdog = watchdog("bad_checksum", Duration::from_secs(30));
    let r = receiving();
    let (mut stream, session) = raw_session(&r.receiver);
    let mut frame = Vec::new();
    encode_frame(&mut frame, FrameKind::Write, session, 1, 100, &[0x42; 32]);
    let last = frame.len() - 1;
    frame[last] ^= 0x01;
    stream.write_all(&frame).unwrap();
    let error = inbound_error(&r.events);
    assert!(matches!(*error, Error::BadChecksum { .. }), "{error}");
    assert_closed(&mut stream);
    assert!(read_all(&r.mirror).iter().all(|b| *b == 0));
    assert_eq!(r.receiver.stats().frames_applied, 0);
}

#[test]
fn an_oversized_length_closes_the_connection_before_its_payload() {
    let _watchdog = watchdog("oversized", Duration::from_secs(30));
    let r = receiving();
    let (mut stream, session) = raw_session(&r.receiver);
    let mut frame = Vec::new();
    encode_frame(&mut frame, FrameKind::Write, session, 1, 0, &[7; 16]);
    // Claim 1 GiB of payload; only the header is sent.
    frame[32..36].copy_from_slice(&(1u32 << 30).to_le_bytes());
    stream.write_all(&frame[..40]).unwrap();
    let error = inbound_error(&r.events);
    assert!(
        matches!(*error, Error::FrameTooLong { len_bytes, max_bytes: 65536 } if len_bytes == 1 << 30),
        "{error}"
    );
    assert_closed(&mut stream);
    assert!(read_all(&r.mirror).iter().all(|b| *b == 0));
}

#[test]
fn garbage_closes_the_connection_and_writes_nothing() {
    let _watchdog = watchdog("garbage", Duration::from_secs(30));
    let r = receiving();
    let (mut stream, _session) = raw_session(&r.receiver);
    stream.write_all(&common::pattern(5, 100)).unwrap();
    let error = inbound_error(&r.events);
    assert!(matches!(*error, Error::BadMagic { .. }), "{error}");
    assert_closed(&mut stream);
    assert!(read_all(&r.mirror).iter().all(|b| *b == 0));

    // A well-formed frame of an unknown kind is refused as well.
    let (mut stream, session) = raw_session(&r.receiver);
    let mut frame = Vec::new();
    encode_frame(
        &mut frame,
        FrameKind::Control,
        session,
        0,
        0,
        &[1, 0, 0, 0, 0, 0, 0, 0, 0],
    );
    frame[5] = 9;
    stream.write_all(&frame).unwrap();
    let error = inbound_error(&r.events);
    assert!(
        matches!(*error, Error::UnknownFrameKind { kind: 9 }),
        "{error}"
    );

    // And a control frame whose message does not decode.
    let (mut stream, session) = raw_session(&r.receiver);
    let mut frame = Vec::new();
    encode_frame(&mut frame, FrameKind::Control, session, 0, 0, &[0xff, 1, 2]);
    stream.write_all(&frame).unwrap();
    let error = inbound_error(&r.events);
    assert!(
        matches!(*error, Error::UnknownControlTag { tag: 0xff }),
        "{error}"
    );
    assert_eq!(r.receiver.stats().frames_applied, 0);
}

#[test]
fn frames_of_another_session_are_never_applied() {
    let _watchdog = watchdog("old_session_frames", Duration::from_secs(30));
    let r = receiving();
    let (mut old, old_session) = raw_session(&r.receiver);
    let (mut new, new_session) = raw_session(&r.receiver);
    assert_ne!(old_session, new_session, "a reconnect is a new session");
    // The acceptor made the session current before telling the dialer.
    assert_eq!(r.receiver.session(), Some(new_session));

    // The old connection was superseded: its frames are not applied.
    let mut frame = Vec::new();
    encode_frame(&mut frame, FrameKind::Write, old_session, 1, 0, b"stale");
    let _ = old.write_all(&frame);
    assert_closed(&mut old);

    // An old session's frame replayed on the new connection is refused.
    let mut frame = Vec::new();
    encode_frame(&mut frame, FrameKind::Write, new_session, 1, 0, b"fresh");
    encode_frame(&mut frame, FrameKind::Write, old_session, 2, 8, b"stale");
    new.write_all(&frame).unwrap();
    let error = expect_event(&r.events, "new session's disconnect", |event| match event {
        ControlEvent::Disconnected { session, error, .. } if *session == new_session => {
            Some(Arc::clone(error))
        }
        _ => None,
    });
    assert!(
        matches!(*error, Error::SessionMismatch { expected, found } if expected == new_session && found == old_session),
        "{error}"
    );
    let mirror = read_all(&r.mirror);
    assert_eq!(&mirror[..5], b"fresh");
    assert!(
        mirror[5..].iter().all(|b| *b == 0),
        "nothing stale was applied"
    );
    assert_eq!(r.receiver.stats().frames_applied, 1);
}

#[test]
fn a_peer_with_the_wrong_key_is_refused() {
    let _watchdog = watchdog("wrong_key", Duration::from_secs(30));
    let r = receiving();
    let wrong = TcpConfig {
        key: other_key(),
        ..config()
    };
    let error = TcpSender::connect(
        r.receiver.local_addr(),
        &wrong,
        SharedMemory::zeroed(64),
        None,
    )
    .unwrap_err();
    assert!(
        matches!(
            error,
            Error::HandshakeRefused {
                reason: RefuseReason::AuthFailed,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("pre-shared keys"), "{error}");
    wait_for_refusals(&r.receiver, 1);
    assert_eq!(r.receiver.stats().sessions_accepted, 0);
}

fn wait_for_refusals(receiver: &MirrorReceiver, count: u64) {
    let deadline = std::time::Instant::now() + LONG;
    while receiver.stats().handshakes_refused < count {
        assert!(std::time::Instant::now() < deadline, "refusal not counted");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_peer_without_the_key_is_refused() {
    let _watchdog = watchdog("no_key", Duration::from_secs(30));
    let r = receiving();
    let mut stream = TcpStream::connect(r.receiver.local_addr()).unwrap();
    stream.set_read_timeout(Some(LONG)).unwrap();
    stream
        .write_all(
            &Hello {
                version: WIRE_VERSION,
                nonce: [0; NONCE_LEN],
            }
            .encode(),
        )
        .unwrap();
    let mut challenge = [0u8; Challenge::LEN];
    stream.read_exact(&mut challenge).unwrap();
    assert_eq!(
        Challenge::decode(&challenge).unwrap().status,
        HandshakeStatus::Ok
    );
    // No key: nothing to prove it with.
    stream
        .write_all(
            &Response {
                version: WIRE_VERSION,
                mac: [0; MAC_LEN],
            }
            .encode(),
        )
        .unwrap();
    let mut verdict = [0u8; Verdict::LEN];
    stream.read_exact(&mut verdict).unwrap();
    let verdict = Verdict::decode(&verdict).unwrap();
    assert_eq!(verdict.status, HandshakeStatus::AuthFailed);
    assert_eq!(verdict.session, 0);
    assert_closed(&mut stream);

    // A stranger that does not even say hello.
    let mut stream = TcpStream::connect(r.receiver.local_addr()).unwrap();
    stream.set_read_timeout(Some(LONG)).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: nvmirror.example\r\nAccept: */*\r\n\r\n")
        .unwrap();
    let mut challenge = [0u8; Challenge::LEN];
    stream.read_exact(&mut challenge).unwrap();
    assert_eq!(
        Challenge::decode(&challenge).unwrap().status,
        HandshakeStatus::Malformed
    );
    wait_for_refusals(&r.receiver, 2);
    assert_eq!(r.receiver.stats().sessions_accepted, 0);
}

#[test]
fn an_unknown_version_is_refused_with_a_clear_error() {
    let _watchdog = watchdog("unknown_version", Duration::from_secs(30));
    // A dialer from the future, against our acceptor.
    let r = receiving();
    let mut stream = TcpStream::connect(r.receiver.local_addr()).unwrap();
    stream.set_read_timeout(Some(LONG)).unwrap();
    stream
        .write_all(
            &Hello {
                version: 99,
                nonce: [1; NONCE_LEN],
            }
            .encode(),
        )
        .unwrap();
    let mut challenge = [0u8; Challenge::LEN];
    stream.read_exact(&mut challenge).unwrap();
    let challenge = Challenge::decode(&challenge).unwrap();
    assert_eq!(challenge.status, HandshakeStatus::UnknownVersion);
    assert_eq!(challenge.version, WIRE_VERSION);
    assert_closed(&mut stream);
    wait_for_refusals(&r.receiver, 1);

    // Our dialer, against an acceptor that refuses our version.
    let (addr, acceptor) = fake_acceptor(|stream| {
        let mut hello = [0u8; Hello::LEN];
        stream.read_exact(&mut hello).unwrap();
        let refusal = Challenge {
            version: 7,
            status: HandshakeStatus::UnknownVersion,
            nonce: [0; NONCE_LEN],
        };
        stream.write_all(&refusal.encode()).unwrap();
    });
    let error = TcpSender::connect(addr, &config(), SharedMemory::zeroed(64), None).unwrap_err();
    assert!(
        matches!(
            error,
            Error::HandshakeRefused {
                reason: RefuseReason::UnknownVersion { supported: 7 },
                ..
            }
        ),
        "{error}"
    );
    acceptor.join().unwrap();

    // Our dialer, against an acceptor that answers in another version.
    let (addr, acceptor) = fake_acceptor(|stream| {
        let mut hello = [0u8; Hello::LEN];
        stream.read_exact(&mut hello).unwrap();
        let challenge = Challenge {
            version: 2,
            status: HandshakeStatus::Ok,
            nonce: [0; NONCE_LEN],
        };
        stream.write_all(&challenge.encode()).unwrap();
    });
    let error = TcpSender::connect(addr, &config(), SharedMemory::zeroed(64), None).unwrap_err();
    assert!(
        matches!(
            error,
            Error::VersionMismatch {
                local: 1,
                remote: 2,
                ..
            }
        ),
        "{error}"
    );
    acceptor.join().unwrap();
}

/// A one-connection acceptor on loopback that runs `script`.
fn fake_acceptor(
    script: impl FnOnce(&mut TcpStream) + Send + 'static,
) -> (SocketAddr, thread::JoinHandle<()>) {
    let listener = TcpListener::bind(loopback()).unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(LONG)).unwrap();
        script(&mut stream);
    });
    (addr, handle)
}

/// An acceptor that authenticates properly, then reads and never acks,
/// until the test says to hang up.
fn black_hole(
    config: &TcpConfig,
) -> (
    SocketAddr,
    crossbeam_channel::Sender<()>,
    thread::JoinHandle<()>,
) {
    let (hang_up, hang_up_rx) = crossbeam_channel::bounded::<()>(1);
    let key = config.key.clone();
    let listener = TcpListener::bind(loopback()).unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = thread::spawn(move || {
        let (mut stream, peer) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        accept_handshake(
            &mut stream,
            peer,
            &key,
            MIRROR_LEN as u64,
            64 * 1024,
            |_| Ok(()),
        )
        .unwrap();
        let mut sink = vec![0u8; 64 * 1024];
        while hang_up_rx.recv_timeout(Duration::from_millis(1)).is_err() {
            let _ = stream.read(&mut sink);
        }
    });
    (addr, hang_up, handle)
}

#[test]
fn connection_loss_errors_every_waiter_reclaims_slots_and_allows_reconnect() {
    let _watchdog = watchdog("connection_loss", Duration::from_secs(30));
    let config = TcpConfig {
        send_depth: 4,
        ..config()
    };
    let (addr, hang_up, acceptor) = black_hole(&config);
    let local = SharedMemory::zeroed(MIRROR_LEN);
    let (events_tx, events) = unbounded();
    let sender = TcpSender::connect(addr, &config, local.clone(), Some(events_tx)).unwrap();
    assert!(sender.failure().is_none());
    let queue = SendQueue::new(sender, 4).unwrap();
    let first_session = queue.session();

    let mut reservation = queue.reserve_timeout(4, LONG).unwrap();
    let ids: Vec<_> = (0..4u64)
        .map(|i| {
            reservation.post(MirrorWrite {
                src_offset: i * 64,
                dst_offset: i * 64,
                len_bytes: 64,
            })
        })
        .collect();
    assert_eq!(queue.in_flight(), 4);
    thread::scope(|scope| {
        let placed_waiters: Vec<_> = ids
            .iter()
            .map(|id| {
                let queue = &queue;
                scope.spawn(move || queue.wait_placed_timeout(*id, LONG))
            })
            .collect();
        let reserve_waiter = scope.spawn(|| queue.reserve_timeout(1, LONG).map(|r| r.remaining()));
        thread::sleep(Duration::from_millis(50));
        hang_up.send(()).unwrap();
        for waiter in placed_waiters {
            let error = waiter.join().unwrap().unwrap_err();
            assert!(
                matches!(error, Error::Queue(QueueError::WriteLost { .. })),
                "{error}"
            );
        }
        let error = reserve_waiter.join().unwrap().unwrap_err();
        assert!(matches!(error, Error::Disconnected { .. }), "{error}");
    });
    acceptor.join().unwrap();
    assert_eq!(queue.in_flight(), 0, "in-flight slots reclaimed");
    assert_eq!(queue.free_slots(), 4);
    expect_event(&events, "outbound disconnect", |event| match event {
        ControlEvent::Disconnected {
            direction: Direction::Outbound,
            ..
        } => Some(()),
        _ => None,
    });

    // Reconnect to a real receiver: a new session, and mirroring works.
    let mirror = SharedMemory::zeroed(MIRROR_LEN);
    let receiver = MirrorReceiver::bind(loopback(), &config, mirror.clone(), None).unwrap();
    let sender = TcpSender::connect(receiver.local_addr(), &config, local.clone(), None).unwrap();
    queue.reconnect(sender).unwrap();
    assert_ne!(queue.session(), first_session);
    local.write_at(0, b"after the reconnect").unwrap();
    let mut reservation = queue.reserve_timeout(1, LONG).unwrap();
    let id = reservation.post(MirrorWrite {
        src_offset: 0,
        dst_offset: 0,
        len_bytes: 19,
    });
    queue.wait_placed_timeout(id, LONG).unwrap();
    let mut got = [0u8; 19];
    mirror.read_at(0, &mut got).unwrap();
    assert_eq!(&got, b"after the reconnect");
    // The writes of the dead session stay lost: the node must resync.
    assert!(matches!(
        queue.wait_placed_timeout(ids[0], LONG),
        Err(Error::Queue(QueueError::WriteLost { .. }))
    ));
}

#[test]
fn a_reconnect_supersedes_the_old_session_at_the_receiver() {
    let _watchdog = watchdog("reconnect_supersedes", Duration::from_secs(30));
    let pair = pair();
    let first = pair.queue.session();
    let id = mirror_write(&pair, 0, b"first session");
    pair.queue.wait_placed_timeout(id, LONG).unwrap();

    let sender = TcpSender::connect(
        pair.receiver.local_addr(),
        &config(),
        pair.local.clone(),
        None,
    )
    .unwrap();
    pair.queue.reconnect(sender).unwrap();
    let second = pair.queue.session();
    assert_ne!(first, second);
    let id = mirror_write(&pair, 100, b"second session");
    pair.queue.wait_placed_timeout(id, LONG).unwrap();
    assert_eq!(pair.receiver.session(), Some(second));
    assert_eq!(read_all(&pair.mirror), read_all(&pair.local));
    let stats = pair.receiver.stats();
    assert_eq!(stats.sessions_accepted, 2);
    assert_eq!(stats.bytes_applied, 13 + 14, "nothing applied twice");
}

#[test]
fn a_silent_partner_is_reported_and_fails_the_session() {
    let _watchdog = watchdog("silent_partner", Duration::from_secs(30));
    let mut config = config();
    config.timers.heartbeat_interval_ms = 20;
    config.timers.silence_timeout_ms = 200;
    // The black hole reads but never sends a heartbeat.
    let (addr, hang_up, acceptor) = black_hole(&config);
    let (events_tx, events) = unbounded();
    let sender = TcpSender::connect(
        addr,
        &config,
        SharedMemory::zeroed(MIRROR_LEN),
        Some(events_tx),
    )
    .unwrap();
    let queue = SendQueue::new(sender, 4).unwrap();
    let silent_ms = expect_event(&events, "partner silent", |event| match event {
        ControlEvent::PartnerSilent {
            direction: Direction::Outbound,
            silent_ms,
            ..
        } => Some(*silent_ms),
        _ => None,
    });
    assert!(
        silent_ms >= 200,
        "reported after the timeout, not before: {silent_ms} ms"
    );
    let error = expect_event(&events, "disconnect", |event| match event {
        ControlEvent::Disconnected { error, .. } => Some(Arc::clone(error)),
        _ => None,
    });
    assert!(
        matches!(
            *error,
            Error::PartnerSilent {
                timeout_ms: 200,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("partner silent for"), "{error}");
    assert!(matches!(
        queue.try_reserve(1),
        Err(Error::Disconnected { .. })
    ));
    hang_up.send(()).unwrap();
    acceptor.join().unwrap();

    // The receiving side detects a silent dialer the same way.
    let mirror = SharedMemory::zeroed(4096);
    let (tx, events) = unbounded();
    let receiver = MirrorReceiver::bind(loopback(), &config, mirror, Some(tx)).unwrap();
    let (_stream, session) = raw_session(&receiver);
    let (reported_session, silent_ms) =
        expect_event(&events, "partner silent", |event| match event {
            ControlEvent::PartnerSilent {
                direction: Direction::Inbound,
                session,
                silent_ms,
            } => Some((*session, *silent_ms)),
            _ => None,
        });
    assert_eq!(reported_session, session);
    assert!(silent_ms >= 200);
}

#[test]
fn heartbeats_keep_an_idle_pair_alive() {
    let _watchdog = watchdog("heartbeats", Duration::from_secs(30));
    let mut config = config();
    config.timers.heartbeat_interval_ms = 20;
    config.timers.silence_timeout_ms = 150;
    let pair = pair_with(&config);
    thread::sleep(Duration::from_millis(600));
    assert!(pair.queue.failure().is_none(), "{:?}", pair.queue.failure());
    assert!(pair.receiver.session().is_some());
    let id = mirror_write(&pair, 0, b"still alive");
    pair.queue.wait_placed_timeout(id, LONG).unwrap();
    assert!(pair
        .sender_events
        .try_iter()
        .all(|event| !matches!(event, ControlEvent::PartnerSilent { .. })));
}

#[test]
fn the_queue_refuses_more_slots_than_the_send_depth() {
    let _watchdog = watchdog("send_depth", Duration::from_secs(30));
    let r = receiving();
    let config = TcpConfig {
        send_depth: 8,
        ..config()
    };
    let sender = TcpSender::connect(
        r.receiver.local_addr(),
        &config,
        SharedMemory::zeroed(64),
        None,
    )
    .unwrap();
    let error = SendQueue::new(sender, 9).unwrap_err();
    assert!(
        matches!(
            error,
            Error::Queue(QueueError::TooManySlots {
                requested: 9,
                max: 8
            })
        ),
        "{error}"
    );
}
