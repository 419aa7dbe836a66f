//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use interconnect::{ControlEvent, PresharedKey, SessionTimers, SharedMemory, TcpConfig};

/// Generous bound for anything that should happen "soon".
pub const LONG: Duration = Duration::from_secs(10);

pub fn key() -> PresharedKey {
    PresharedKey::new(b"nvmirror test key, 32 bytes long".to_vec()).unwrap()
}

pub fn other_key() -> PresharedKey {
    PresharedKey::new(b"a different key of the same size".to_vec()).unwrap()
}

pub fn config() -> TcpConfig {
    TcpConfig {
        send_depth: 64,
        max_frame_len_bytes: 64 * 1024,
        timers: SessionTimers {
            heartbeat_interval_ms: 20,
            silence_timeout_ms: 3_000,
            handshake_timeout_ms: 2_000,
        },
        ..TcpConfig::new(key())
    }
}

pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Deterministic bytes for position `at` of a write tagged `tag`.
pub fn pattern(tag: u64, len: usize) -> Vec<u8> {
    let mut x = tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn read_all(memory: &SharedMemory) -> Vec<u8> {
    let mut bytes = vec![0u8; memory.len()];
    memory.read_at(0, &mut bytes).unwrap();
    bytes
}

/// Waits for the first event `pick` accepts, skipping the others.
pub fn expect_event<T>(
    events: &Receiver<ControlEvent>,
    what: &str,
    mut pick: impl FnMut(&ControlEvent) -> Option<T>,
) -> T {
    let deadline = Instant::now() + LONG;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(event) => {
                if let Some(found) = pick(&event) {
                    return found;
                }
            }
            Err(_) => panic!("no {what} event within {LONG:?}"),
        }
    }
}

/// Aborts the test process if it is still running after `limit`: a hang
/// must fail CI, not stall it.
pub struct Watchdog {
    done: Arc<AtomicBool>,
}

pub fn watchdog(name: &'static str, limit: Duration) -> Watchdog {
    let done = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&done);
    std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if seen.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("watchdog: test {name} still running after {limit:?}; aborting");
        std::process::abort();
    });
    Watchdog { done }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
    }
}
