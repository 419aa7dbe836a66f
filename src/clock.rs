//! Where the node's decisions read the time: the machine's clock, or the
//! simulation's, which moves only when the simulation advances it.
//!
//! The HA monitor's failure detection and interconnect cuts read it; the
//! simulation steps consistency points itself (the thread's timer uses
//! `Instant`), and latencies for metrics and status use `Instant` too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Default)]
pub enum Clock {
    #[default]
    Real,
    /// A fixed origin plus the simulated milliseconds since it: durations
    /// between two readings depend only on the simulation.
    Simulated {
        origin: Instant,
        elapsed_ms: Arc<AtomicU64>,
    },
}

impl Clock {
    /// A simulated clock at its origin, and the handle that advances it.
    pub fn simulated() -> (Clock, Arc<AtomicU64>) {
        let elapsed_ms = Arc::new(AtomicU64::new(0));
        (
            Clock::Simulated {
                origin: Instant::now(),
                elapsed_ms: elapsed_ms.clone(),
            },
            elapsed_ms,
        )
    }

    pub fn now(&self) -> Instant {
        match self {
            Clock::Real => Instant::now(),
            Clock::Simulated { origin, elapsed_ms } => {
                *origin + Duration::from_millis(elapsed_ms.load(Ordering::Acquire))
            }
        }
    }
}
