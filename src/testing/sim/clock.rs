//! The simulation's clock: a fixed origin plus the simulated milliseconds
//! since it, so durations between two readings depend only on the run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::Clock;

#[derive(Debug)]
pub struct SimClock {
    origin: Instant,
    elapsed_ms: AtomicU64,
}

impl SimClock {
    pub fn new() -> Arc<SimClock> {
        Arc::new(SimClock {
            origin: Instant::now(),
            elapsed_ms: AtomicU64::new(0),
        })
    }

    pub fn elapsed_ms(&self) -> u64 {
        self.elapsed_ms.load(Ordering::Acquire)
    }

    pub fn advance_ms(&self, ms: u64) {
        self.elapsed_ms.fetch_add(ms, Ordering::AcqRel);
    }
}

impl Clock for SimClock {
    fn now(&self) -> Instant {
        self.origin + Duration::from_millis(self.elapsed_ms())
    }
}
