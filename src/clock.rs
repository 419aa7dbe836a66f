//! Where the node's decisions read the time.
//!
//! The HA monitor's failure detection, interconnect cuts and the resync's
//! progress read a [`Clock`]; a running node reads the machine's
//! ([`SystemClock`]), and anything that steps a node by hand may pass a
//! clock it moves itself. Latencies for metrics and status use `Instant`.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Instant;

pub trait Clock: Send + Sync + Debug {
    fn now(&self) -> Instant;
}

/// The clock a node's decisions read, shared by its parts.
pub type SharedClock = Arc<dyn Clock>;

/// The machine's monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}
