//! Bytes in flight, bounded so that liveness never waits behind data.
//!
//! On one RC queue pair (and on one TCP stream) a heartbeat goes out behind
//! every write posted before it. A resync that posts the whole log at once
//! on a link slower than `log size / silence timeout` would hold the
//! heartbeats back past the partner's silence timeout, the partner would
//! close the session, and the resync would start over: a livelock. So the
//! sender keeps no more bytes in flight than the link carries in a
//! *liveness budget* (a fraction of the heartbeat interval): a heartbeat
//! posted at any moment is on the wire within about that budget, whatever
//! the link's speed and however much data waits.
//!
//! The link's rate is measured, not configured: the bytes the partner
//! acknowledged over the time the sender was busy (something in flight or
//! waiting), smoothed. While the QP is busy the window's bytes occupy it,
//! so the measured rate is the link's, and `rate × budget` is far above the
//! bandwidth-delay product of any link whose round trip is well below the
//! heartbeat interval: pacing costs no throughput.
//!
//! [`SendWindow`] is pure bookkeeping with the clock passed in, so its
//! behaviour is unit-tested here; the RDMA sender drives it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Window before the first rate measurement: small enough to drain in a
/// quarter second on a 1 MB/s link (a full megabyte there sat in the queue
/// for a second, as long as RoCE's retransmission timeout, and heartbeats
/// waited behind it: seen in the Soft-RoCE guest at 8 and 16 Mbit/s),
/// large enough to fill a fast link for the few milliseconds until the
/// first sample raises it.
pub const INITIAL_WINDOW_BYTES: u64 = 256 << 10;
/// The window never shrinks below this (one more write is always allowed
/// when nothing is in flight, whatever its size).
pub const MIN_WINDOW_BYTES: u64 = 64 << 10;
/// A rate sample spans at least this long, so that completion batching and
/// timer granularity do not make it noisy.
const SAMPLE_MIN: Duration = Duration::from_millis(5);
/// Weight of a new sample in the smoothed rate, in 1/8ths.
const SAMPLE_WEIGHT_EIGHTHS: u64 = 4;
/// The window at most doubles per sample, so that one sample inflated by
/// completions that arrived bunched up (a descheduled poller, a burst of
/// acknowledgements) cannot fill the link's queue for seconds.
const GROWTH_PER_SAMPLE: u64 = 2;

/// The sender's bound on bytes in flight, and the rate it is sized from.
#[derive(Debug, Clone)]
pub struct SendWindow {
    budget: Duration,
    /// Posted, not yet acknowledged: (write id, bytes), in id order.
    in_flight: VecDeque<(u64, u64)>,
    in_flight_bytes: u64,
    /// Smoothed link rate; `None` until the first sample.
    rate_bytes_per_s: Option<u64>,
    /// The current sample: since when the sender has been busy, and the
    /// bytes acknowledged since then. `None` while idle.
    sample: Option<(Instant, u64)>,
}

impl SendWindow {
    /// A window sized so that what is in flight drains within `budget`.
    pub fn new(budget: Duration) -> Self {
        assert!(!budget.is_zero(), "a liveness budget of zero sends nothing");
        Self {
            budget,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            rate_bytes_per_s: None,
            sample: None,
        }
    }

    /// Bytes the sender may keep in flight now.
    pub fn window_bytes(&self) -> u64 {
        match self.rate_bytes_per_s {
            None => INITIAL_WINDOW_BYTES,
            Some(rate) => {
                let bytes = u128::from(rate) * self.budget.as_nanos() / 1_000_000_000;
                u64::try_from(bytes)
                    .unwrap_or(u64::MAX)
                    .max(MIN_WINDOW_BYTES)
            }
        }
    }

    /// Whether a write of `len_bytes` may join the chain being built, which
    /// already holds `chained_bytes` not yet posted. A write is always
    /// allowed on an idle link (nothing in flight, nothing chained), so a
    /// write larger than the window still goes (alone).
    pub fn admits(&self, chained_bytes: u64, len_bytes: u64) -> bool {
        (self.in_flight.is_empty() && chained_bytes == 0)
            || self.in_flight_bytes + chained_bytes + len_bytes <= self.window_bytes()
    }

    /// Bytes posted and not yet acknowledged.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes
    }

    /// The smoothed link rate, once measured.
    pub fn rate_bytes_per_s(&self) -> Option<u64> {
        self.rate_bytes_per_s
    }

    /// Write `id` of `len_bytes` was posted (ids rise).
    pub fn posted(&mut self, id: u64, len_bytes: u64) {
        if let Some(&(last, _)) = self.in_flight.back() {
            assert!(
                id > last,
                "writes are posted in id order ({id} after {last})"
            );
        }
        self.in_flight.push_back((id, len_bytes));
        self.in_flight_bytes += len_bytes;
    }

    /// Every write up to `id` is acknowledged at `now`; `waiting`: writes
    /// are queued behind the window (the sender stays busy even if nothing
    /// is in flight for a moment).
    pub fn placed_through(&mut self, id: u64, now: Instant, waiting: bool) {
        let mut acknowledged = 0;
        while let Some(&(front, len)) = self.in_flight.front() {
            if front > id {
                break;
            }
            self.in_flight.pop_front();
            acknowledged += len;
        }
        assert!(
            acknowledged <= self.in_flight_bytes,
            "more bytes acknowledged than in flight"
        );
        self.in_flight_bytes -= acknowledged;
        match self.sample {
            // The first acknowledgement after idling: when these bytes
            // started is unknown, so the sample starts here.
            None => self.sample = Some((now, 0)),
            Some((since, bytes)) => {
                let bytes = bytes + acknowledged;
                let elapsed = now.saturating_duration_since(since);
                if elapsed >= SAMPLE_MIN {
                    self.add_sample(bytes, elapsed);
                    self.sample = Some((now, 0));
                } else {
                    self.sample = Some((since, bytes));
                }
            }
        }
        if self.in_flight.is_empty() && !waiting {
            // Idle: time without data says nothing about the link's rate.
            self.sample = None;
        }
    }

    /// The session ended: nothing is in flight any more.
    pub fn reset(&mut self) {
        self.in_flight.clear();
        self.in_flight_bytes = 0;
        self.sample = None;
    }

    fn add_sample(&mut self, bytes: u64, elapsed: Duration) {
        let rate = u128::from(bytes) * 1_000_000_000 / elapsed.as_nanos().max(1);
        let rate = u64::try_from(rate).unwrap_or(u64::MAX);
        let mixed = match self.rate_bytes_per_s {
            None => rate,
            Some(old) => {
                let mixed = u128::from(old) * u128::from(8 - SAMPLE_WEIGHT_EIGHTHS)
                    + u128::from(rate) * u128::from(SAMPLE_WEIGHT_EIGHTHS);
                u64::try_from(mixed / 8).unwrap_or(u64::MAX)
            }
        };
        // The rate at which the window would be GROWTH_PER_SAMPLE times
        // today's.
        let most = u128::from(self.window_bytes()) * u128::from(GROWTH_PER_SAMPLE) * 1_000_000_000
            / self.budget.as_nanos().max(1);
        let most = u64::try_from(most).unwrap_or(u64::MAX);
        self.rate_bytes_per_s = Some(mixed.min(most));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A link of `rate` bytes/s carrying a backlog of `writes` writes of
    /// `len` bytes, driven by the window: returns the window and the most
    /// bytes ever in flight. Time is simulated: a write is acknowledged
    /// when the link has carried it.
    fn drive(rate: u64, len: u64, writes: u64, budget: Duration) -> (SendWindow, u64) {
        let mut window = SendWindow::new(budget);
        let start = Instant::now();
        let mut link_free_at = Duration::ZERO;
        let mut done_at: VecDeque<(u64, Duration)> = VecDeque::new();
        let mut next = 1;
        let mut now = Duration::ZERO;
        let mut most = 0;
        while next <= writes || !done_at.is_empty() {
            while next <= writes && window.admits(0, len) {
                window.posted(next, len);
                let starts = link_free_at.max(now);
                link_free_at = starts + Duration::from_nanos(len * 1_000_000_000 / rate);
                done_at.push_back((next, link_free_at));
                next += 1;
            }
            most = most.max(window.in_flight_bytes());
            let (id, at) = done_at.pop_front().expect("something in flight");
            now = at;
            window.placed_through(id, start + now, next <= writes);
        }
        (window, most)
    }

    #[test]
    fn a_slow_link_holds_about_one_budget_of_bytes() {
        // 2 MB/s, 64 KiB writes, a 50 ms budget: ~100 KB in flight, so a
        // heartbeat waits ~50 ms, not the 16 MiB backlog's 8 s.
        let rate = 2_000_000;
        let (window, most) = drive(rate, 64 << 10, 256, Duration::from_millis(50));
        let measured = window.rate_bytes_per_s().expect("measured");
        assert!(
            measured.abs_diff(rate) < rate / 10,
            "measured {measured} B/s on a {rate} B/s link"
        );
        let window_bytes = window.window_bytes();
        assert!(
            (80_000..=140_000).contains(&window_bytes),
            "window {window_bytes} B for 50 ms at 2 MB/s"
        );
        // At most the initial window before the first measurement.
        assert!(most <= INITIAL_WINDOW_BYTES);
    }

    #[test]
    fn a_fast_link_is_not_throttled() {
        // 10 GB/s, 1 MiB writes, 50 ms budget: the window grows far beyond
        // anything a send queue holds.
        let (window, _) = drive(10_000_000_000, MIB, 2048, Duration::from_millis(50));
        assert!(
            window.window_bytes() > 256 * MIB,
            "{}",
            window.window_bytes()
        );
    }

    #[test]
    fn a_write_larger_than_the_window_goes_alone() {
        let mut window = SendWindow::new(Duration::from_millis(1));
        assert!(window.admits(0, 16 * MIB), "an idle link admits any write");
        assert!(
            !window.admits(16 * MIB, 1),
            "nothing joins a chain beyond the window"
        );
        window.posted(1, 16 * MIB);
        assert!(!window.admits(0, 1), "nothing joins it beyond the window");
        window.placed_through(1, Instant::now(), false);
        assert_eq!(window.in_flight_bytes(), 0);
        assert!(window.admits(0, 16 * MIB));
    }

    #[test]
    fn cumulative_acknowledgements_retire_every_earlier_write() {
        let mut window = SendWindow::new(Duration::from_millis(10));
        for id in 1..=5 {
            window.posted(id, 1000);
        }
        window.placed_through(3, Instant::now(), false);
        assert_eq!(window.in_flight_bytes(), 2000);
        window.placed_through(5, Instant::now(), false);
        assert_eq!(window.in_flight_bytes(), 0);
        window.reset();
        assert_eq!(window.in_flight_bytes(), 0);
    }

    #[test]
    fn idle_time_is_not_counted_as_a_slow_link() {
        let budget = Duration::from_millis(20);
        let mut window = SendWindow::new(budget);
        let t0 = Instant::now();
        // Busy for 10 ms at 100 MB/s.
        window.posted(1, 500_000);
        window.posted(2, 500_000);
        window.placed_through(1, t0, true);
        window.placed_through(2, t0 + Duration::from_millis(5), false);
        let rate = window.rate_bytes_per_s().expect("one sample");
        // 100 MB/s measured; the window may only double at first.
        assert_eq!(window.window_bytes(), 2 * INITIAL_WINDOW_BYTES);
        // A second of nothing, then one small write: no sample spans the idle time.
        window.posted(3, 1000);
        window.placed_through(3, t0 + Duration::from_secs(1), false);
        assert_eq!(window.rate_bytes_per_s(), Some(rate));
    }

    #[test]
    fn one_inflated_sample_at_most_doubles_the_window() {
        // A 1 MB/s link whose completions arrive bunched: 256 KiB
        // acknowledged within 5 ms reads as 52 MB/s.
        let budget = Duration::from_millis(100);
        let mut window = SendWindow::new(budget);
        let t0 = Instant::now();
        window.posted(1, 1000);
        window.posted(2, 256 << 10);
        window.placed_through(1, t0, true);
        window.placed_through(2, t0 + Duration::from_millis(5), true);
        assert_eq!(window.window_bytes(), 2 * INITIAL_WINDOW_BYTES);
        // Steady samples at the link's real rate bring it back down.
        let mut now = t0 + Duration::from_millis(5);
        for id in 3..40 {
            window.posted(id, 100_000);
            now += Duration::from_millis(100);
            window.placed_through(id, now, true);
        }
        let bytes = window.window_bytes();
        assert!(
            (90_000..=120_000).contains(&bytes),
            "window {bytes} B for 100 ms at 1 MB/s"
        );
    }

    #[test]
    #[should_panic(expected = "id order")]
    fn writes_out_of_order_are_a_bug() {
        let mut window = SendWindow::new(Duration::from_millis(10));
        window.posted(2, 1);
        window.posted(1, 1);
    }
}
