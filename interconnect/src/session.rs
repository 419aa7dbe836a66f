//! The timers every session keeps, whatever its transport: heartbeats,
//! the silence that fails a session, the bound on its handshake.

use std::time::Duration;

use crate::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTimers {
    /// Each side sends a heartbeat this often.
    pub heartbeat_interval_ms: u64,
    /// Silence from the partner longer than this fails the session.
    pub silence_timeout_ms: u64,
    /// Bound on connecting and on the whole handshake.
    pub handshake_timeout_ms: u64,
}

impl Default for SessionTimers {
    fn default() -> Self {
        SessionTimers {
            heartbeat_interval_ms: 100,
            silence_timeout_ms: 2_000,
            handshake_timeout_ms: 2_000,
        }
    }
}

impl SessionTimers {
    /// Checks that the values make sense together.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |reason: String| Err(Error::InvalidConfig { reason });
        if self.heartbeat_interval_ms == 0 || self.silence_timeout_ms <= self.heartbeat_interval_ms
        {
            return invalid(format!(
                "heartbeat_interval_ms ({}) must be non-zero and below silence_timeout_ms ({})",
                self.heartbeat_interval_ms, self.silence_timeout_ms
            ));
        }
        if self.handshake_timeout_ms == 0 {
            return invalid("handshake_timeout_ms must be non-zero".into());
        }
        Ok(())
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    pub fn silence_timeout(&self) -> Duration {
        Duration::from_millis(self.silence_timeout_ms)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// How long a session's loop may go without checking heartbeats and
    /// silence; also the longest a heartbeat should wait behind writes
    /// (the RDMA sender keeps no more bytes in flight than the link carries
    /// in it, [`crate::pacing`]), so that it arrives well inside the
    /// silence timeout.
    pub fn tick(&self) -> Duration {
        self.heartbeat_interval()
            .min(self.silence_timeout() / 4)
            .max(Duration::from_millis(1))
    }
}
