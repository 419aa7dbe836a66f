//! In-flight admission: a request holds a slot from admission until its
//! reply is on the socket, so a connection's requests and payload bytes in
//! flight stay bounded.

use parking_lot::{Condvar, Mutex};

/// Admission control for one connection: at most `requests_max` requests
/// and `payload_bytes_max` payload bytes between admission and reply.
#[derive(Debug)]
pub(crate) struct InFlight {
    pub(crate) requests_max: usize,
    pub(crate) payload_bytes_max: u64,
    pub(crate) state: Mutex<InFlightState>,
    pub(crate) released: Condvar,
}

#[derive(Debug, Default)]
pub(crate) struct InFlightState {
    pub(crate) requests: usize,
    pub(crate) payload_bytes: u64,
}

/// One admitted request; gives its share back when dropped (after its reply
/// is written or lost).
#[derive(Debug)]
pub(crate) struct Slot<'a> {
    pub(crate) in_flight: &'a InFlight,
    pub(crate) payload_bytes: u64,
}

impl InFlight {
    pub(crate) fn new(requests_max: usize, payload_bytes_max: u64) -> InFlight {
        assert!(requests_max > 0 && payload_bytes_max > 0);
        InFlight {
            requests_max,
            payload_bytes_max,
            state: Mutex::new(InFlightState::default()),
            released: Condvar::new(),
        }
    }

    /// Waits until the request fits. Never waits for ever: a request no
    /// larger than the budget fits once nothing else is in flight, and
    /// everything in flight is finishing.
    pub(crate) fn acquire(&self, payload_bytes: u64) -> Slot<'_> {
        assert!(payload_bytes <= self.payload_bytes_max);
        let mut state = self.state.lock();
        while state.requests >= self.requests_max
            || state.payload_bytes + payload_bytes > self.payload_bytes_max
        {
            self.released.wait(&mut state);
        }
        state.requests += 1;
        state.payload_bytes += payload_bytes;
        assert!(state.requests <= self.requests_max);
        assert!(state.payload_bytes <= self.payload_bytes_max);
        Slot {
            in_flight: self,
            payload_bytes,
        }
    }

    #[cfg(test)]
    pub(crate) fn requests(&self) -> usize {
        self.state.lock().requests
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut state = self.in_flight.state.lock();
        assert!(state.requests > 0, "in-flight slot released twice");
        assert!(state.payload_bytes >= self.payload_bytes);
        state.requests -= 1;
        state.payload_bytes -= self.payload_bytes;
        drop(state);
        // Only the reader waits.
        self.in_flight.released.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::thread;

    #[test]
    fn in_flight_never_exceeds_its_limits() {
        let in_flight = InFlight::new(4, 1000);
        let admitted_max = std::sync::atomic::AtomicUsize::new(0);
        thread::scope(|scope| {
            for thread_index in 0..8u64 {
                let in_flight = &in_flight;
                let admitted_max = &admitted_max;
                scope.spawn(move || {
                    for round in 0..200u64 {
                        let slot = in_flight.acquire((thread_index * 37 + round) % 500);
                        let requests = in_flight.requests();
                        assert!(requests <= 4);
                        assert!(in_flight.state.lock().payload_bytes <= 1000);
                        admitted_max.fetch_max(requests, Ordering::SeqCst);
                        drop(slot);
                    }
                });
            }
        });
        assert_eq!(in_flight.requests(), 0);
        assert_eq!(in_flight.state.lock().payload_bytes, 0);
        assert!(admitted_max.load(Ordering::SeqCst) >= 1);
    }
}
