//! Peer authentication: a mutual HMAC-SHA256 challenge-response over a
//! pre-shared key, and the wire-version check.
//!
//! ```text
//! dialer                                       acceptor
//!   Hello(version, nonce_d)            ->
//!                                      <-      Challenge(version, status, nonce_a)
//!   Response(mac_d)                    ->      verify mac_d, else Verdict(AuthFailed)
//!                                      <-      Verdict(Ok, session, mirror_len, max_frame, mac_a)
//!   verify mac_a, else refuse
//!
//! mac_d = HMAC(key, "nvmirror dialer"   | version | nonce_d | nonce_a)
//! mac_a = HMAC(key, "nvmirror acceptor" | version | nonce_d | nonce_a
//!                   | session | mirror_len | max_frame)
//! ```
//!
//! Both nonces are fresh per connection, so no proof can be replayed on
//! another connection; the role labels keep one side's proof from serving
//! as the other's. The dialer proves first, so a stranger learns nothing
//! about the key. Tags are compared in constant time (`Mac::verify_slice`).
//! The acceptor picks the session id; a reconnect is a new session.

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::tcp::wire::{
    Challenge, HandshakeStatus, Hello, Response, Verdict, MAC_LEN, NONCE_LEN, WIRE_VERSION,
};
use crate::{Error, RefuseReason};

type HmacSha256 = Hmac<Sha256>;

/// The key both nodes of a pair share, from their configuration.
#[derive(Clone)]
pub struct PresharedKey(Vec<u8>);

impl PresharedKey {
    /// Shortest key accepted.
    pub const MIN_LEN_BYTES: usize = 16;

    /// A key from its bytes; refuses keys shorter than
    /// [`MIN_LEN_BYTES`](Self::MIN_LEN_BYTES).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, Error> {
        let bytes = bytes.into();
        if bytes.len() < Self::MIN_LEN_BYTES {
            return Err(Error::KeyTooShort {
                len_bytes: bytes.len(),
                min_bytes: Self::MIN_LEN_BYTES,
            });
        }
        Ok(Self(bytes))
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PresharedKey(<{} bytes, redacted>)", self.0.len())
    }
}

/// What a successful handshake agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionParams {
    /// The session id, chosen by the acceptor.
    pub session: u64,
    /// Length of the acceptor's mirror.
    pub mirror_len_bytes: u64,
    /// Largest frame payload the acceptor takes.
    pub max_frame_len_bytes: u32,
}

const DIALER_LABEL: &[u8] = b"nvmirror dialer";
const ACCEPTOR_LABEL: &[u8] = b"nvmirror acceptor";

fn dialer_mac(key: &PresharedKey, nonce_d: &[u8], nonce_a: &[u8]) -> HmacSha256 {
    let mut mac = key.mac();
    mac.update(DIALER_LABEL);
    mac.update(&WIRE_VERSION.to_le_bytes());
    mac.update(nonce_d);
    mac.update(nonce_a);
    mac
}

fn acceptor_mac(
    key: &PresharedKey,
    nonce_d: &[u8],
    nonce_a: &[u8],
    params: &SessionParams,
) -> HmacSha256 {
    let mut mac = key.mac();
    mac.update(ACCEPTOR_LABEL);
    mac.update(&WIRE_VERSION.to_le_bytes());
    mac.update(nonce_d);
    mac.update(nonce_a);
    mac.update(&params.session.to_le_bytes());
    mac.update(&params.mirror_len_bytes.to_le_bytes());
    mac.update(&params.max_frame_len_bytes.to_le_bytes());
    mac
}

fn tag(mac: HmacSha256) -> [u8; MAC_LEN] {
    mac.finalize().into_bytes().into()
}

/// HMAC-SHA256 of `parts`, in order, under the pre-shared key: the proofs
/// of the RDMA handshake, which carries its own labels and fields.
#[cfg(feature = "rdma")]
pub(crate) fn proof(key: &PresharedKey, parts: &[&[u8]]) -> [u8; MAC_LEN] {
    let mut mac = key.mac();
    parts.iter().for_each(|part| mac.update(part));
    tag(mac)
}

/// Checks a proof made by [`proof`], in constant time.
#[cfg(feature = "rdma")]
pub(crate) fn verify_proof(key: &PresharedKey, parts: &[&[u8]], proof: &[u8]) -> bool {
    let mut mac = key.mac();
    parts.iter().for_each(|part| mac.update(part));
    mac.verify_slice(proof).is_ok()
}

/// A random, non-zero session id.
#[cfg(feature = "rdma")]
pub(crate) fn session_id() -> u64 {
    new_session_id()
}

/// Fresh random bytes from the OS.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::getrandom(&mut bytes).expect("the OS random number generator failed");
    bytes
}

fn send(stream: &mut TcpStream, peer: SocketAddr, bytes: &[u8]) -> Result<(), Error> {
    stream
        .write_all(bytes)
        .map_err(|source| Error::io("sending a handshake message", peer, source))
}

fn receive<const N: usize>(stream: &mut TcpStream, peer: SocketAddr) -> Result<[u8; N], Error> {
    let mut bytes = [0u8; N];
    stream.read_exact(&mut bytes).map_err(|source| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::ConnectionClosed { peer }
        } else {
            Error::io("receiving a handshake message", peer, source)
        }
    })?;
    Ok(bytes)
}

/// The dialer's side. The caller has set read/write timeouts on `stream`.
pub fn dial_handshake(
    stream: &mut TcpStream,
    peer: SocketAddr,
    key: &PresharedKey,
) -> Result<SessionParams, Error> {
    let nonce_d = random_bytes::<NONCE_LEN>();
    send(
        stream,
        peer,
        &Hello {
            version: WIRE_VERSION,
            nonce: nonce_d,
        }
        .encode(),
    )?;

    let challenge = Challenge::decode(&receive(stream, peer)?)
        .map_err(|reason| Error::BadHandshake { peer, reason })?;
    match challenge.status {
        HandshakeStatus::Ok => {}
        HandshakeStatus::UnknownVersion => {
            return Err(Error::HandshakeRefused {
                peer,
                reason: RefuseReason::UnknownVersion {
                    supported: challenge.version,
                },
            })
        }
        HandshakeStatus::Malformed | HandshakeStatus::AuthFailed => {
            return Err(Error::HandshakeRefused {
                peer,
                reason: RefuseReason::Malformed,
            })
        }
    }
    if challenge.version != WIRE_VERSION {
        return Err(Error::VersionMismatch {
            peer,
            local: WIRE_VERSION,
            remote: challenge.version,
        });
    }

    let mac = tag(dialer_mac(key, &nonce_d, &challenge.nonce));
    send(
        stream,
        peer,
        &Response {
            version: WIRE_VERSION,
            mac,
        }
        .encode(),
    )?;

    let verdict = Verdict::decode(&receive(stream, peer)?)
        .map_err(|reason| Error::BadHandshake { peer, reason })?;
    match verdict.status {
        HandshakeStatus::Ok => {}
        HandshakeStatus::AuthFailed => {
            return Err(Error::HandshakeRefused {
                peer,
                reason: RefuseReason::AuthFailed,
            })
        }
        HandshakeStatus::UnknownVersion | HandshakeStatus::Malformed => {
            return Err(Error::HandshakeRefused {
                peer,
                reason: RefuseReason::Malformed,
            })
        }
    }
    let params = SessionParams {
        session: verdict.session,
        mirror_len_bytes: verdict.mirror_len_bytes,
        max_frame_len_bytes: verdict.max_frame_len_bytes,
    };
    if acceptor_mac(key, &nonce_d, &challenge.nonce, &params)
        .verify_slice(&verdict.mac)
        .is_err()
    {
        tracing::warn!(%peer, "acceptor failed authentication: wrong pre-shared key");
        return Err(Error::AuthFailed { peer });
    }
    if params.session == 0 {
        return Err(Error::BadHandshake {
            peer,
            reason: "session id 0",
        });
    }
    Ok(params)
}

/// The acceptor's side. Refusals are answered on the wire (so the dialer
/// gets a clear error), logged with the peer's address, and returned.
///
/// `on_authenticated` runs once the dialer has proved the key and before
/// the verdict tells it its session, so that whatever it registers (the
/// receiver makes the session current) happens in the order dialers learn
/// their sessions: a later reconnect always supersedes an earlier one.
pub fn accept_handshake(
    stream: &mut TcpStream,
    peer: SocketAddr,
    key: &PresharedKey,
    mirror_len_bytes: u64,
    max_frame_len_bytes: u32,
    on_authenticated: impl FnOnce(u64) -> Result<(), Error>,
) -> Result<SessionParams, Error> {
    let nonce_a = random_bytes::<NONCE_LEN>();
    let refuse_hello = |stream: &mut TcpStream, status| {
        let challenge = Challenge {
            version: WIRE_VERSION,
            status,
            nonce: [0; NONCE_LEN],
        };
        // Best effort: the peer may already be gone.
        let _ = stream.write_all(&challenge.encode());
    };

    let hello = match Hello::decode(&receive(stream, peer)?) {
        Ok(hello) => hello,
        Err(reason) => {
            refuse_hello(stream, HandshakeStatus::Malformed);
            tracing::warn!(%peer, reason, "refused a connection: not an interconnect handshake");
            return Err(Error::BadHandshake { peer, reason });
        }
    };
    if hello.version != WIRE_VERSION {
        refuse_hello(stream, HandshakeStatus::UnknownVersion);
        tracing::warn!(
            %peer,
            remote_version = hello.version,
            local_version = WIRE_VERSION,
            "refused a connection: unknown wire version"
        );
        return Err(Error::VersionMismatch {
            peer,
            local: WIRE_VERSION,
            remote: hello.version,
        });
    }
    let challenge = Challenge {
        version: WIRE_VERSION,
        status: HandshakeStatus::Ok,
        nonce: nonce_a,
    };
    send(stream, peer, &challenge.encode())?;

    let refuse_response = |stream: &mut TcpStream, status| {
        let verdict = Verdict {
            version: WIRE_VERSION,
            status,
            session: 0,
            mirror_len_bytes: 0,
            max_frame_len_bytes: 0,
            mac: [0; MAC_LEN],
        };
        let _ = stream.write_all(&verdict.encode());
    };
    let response = match Response::decode(&receive(stream, peer)?) {
        Ok(response) => response,
        Err(reason) => {
            refuse_response(stream, HandshakeStatus::Malformed);
            tracing::warn!(%peer, reason, "refused a connection: malformed handshake response");
            return Err(Error::BadHandshake { peer, reason });
        }
    };
    if dialer_mac(key, &hello.nonce, &nonce_a)
        .verify_slice(&response.mac)
        .is_err()
    {
        refuse_response(stream, HandshakeStatus::AuthFailed);
        tracing::warn!(%peer, "refused a connection: wrong or missing pre-shared key");
        return Err(Error::AuthFailed { peer });
    }

    let params = SessionParams {
        session: new_session_id(),
        mirror_len_bytes,
        max_frame_len_bytes,
    };
    on_authenticated(params.session)?;
    let verdict = Verdict {
        version: WIRE_VERSION,
        status: HandshakeStatus::Ok,
        session: params.session,
        mirror_len_bytes,
        max_frame_len_bytes,
        mac: tag(acceptor_mac(key, &hello.nonce, &nonce_a, &params)),
    };
    send(stream, peer, &verdict.encode())?;
    Ok(params)
}

/// A random, non-zero session id.
fn new_session_id() -> u64 {
    loop {
        let session = u64::from_le_bytes(random_bytes());
        if session != 0 {
            return session;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keys_are_refused_and_keys_never_print() {
        assert!(matches!(
            PresharedKey::new(b"short".to_vec()),
            Err(Error::KeyTooShort {
                len_bytes: 5,
                min_bytes: 16
            })
        ));
        let key = PresharedKey::new(b"0123456789abcdef-secret".to_vec()).unwrap();
        assert!(!format!("{key:?}").contains("secret"));
    }

    #[test]
    fn proofs_depend_on_key_role_and_nonces() {
        let key = PresharedKey::new([1u8; 32].to_vec()).unwrap();
        let other = PresharedKey::new([2u8; 32].to_vec()).unwrap();
        let (a, b) = ([3u8; NONCE_LEN], [4u8; NONCE_LEN]);
        let proof = tag(dialer_mac(&key, &a, &b));
        assert!(dialer_mac(&key, &a, &b).verify_slice(&proof).is_ok());
        assert!(dialer_mac(&other, &a, &b).verify_slice(&proof).is_err());
        assert!(dialer_mac(&key, &b, &a).verify_slice(&proof).is_err());
        let params = SessionParams {
            session: 1,
            mirror_len_bytes: 2,
            max_frame_len_bytes: 3,
        };
        assert!(acceptor_mac(&key, &a, &b, &params)
            .verify_slice(&proof)
            .is_err());
    }
}
