//! The node's metrics: a latency histogram that writers update without a
//! lock, and its Prometheus (OpenMetrics) encoding through
//! `prometheus-client`, which does the exposition.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// Bucket bounds for latencies in microseconds: 50 µs to 1 s.
pub const LATENCY_BUCKETS_US: [u64; 13] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// A histogram with fixed bucket bounds, updated with relaxed atomics (no
/// lock on the write path). A bucket counts the observations `<=` its bound
/// and above the previous one; one more bucket holds those above the last
/// bound (`+Inf`).
///
/// The count is not kept apart: it is the sum of the buckets read in the
/// same snapshot, so the `+Inf` bucket always equals `_count` even while
/// writers are observing. `_sum` is read separately and may be a few
/// observations ahead or behind.
#[derive(Debug)]
pub struct Histogram {
    bounds: Box<[u64]>,
    /// `bounds.len() + 1` non-cumulative counts.
    buckets: Box<[AtomicU64]>,
    /// Wraps on overflow (2^64 µs is half a million years).
    sum: AtomicU64,
}

/// A histogram's values at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// The bucket bounds, without `+Inf`.
    pub bounds: Vec<u64>,
    /// Cumulative counts: `cumulative[i]` observations `<= bounds[i]`; the
    /// last one (`+Inf`) is the count.
    pub cumulative: Vec<u64>,
    pub sum: u64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        *self
            .cumulative
            .last()
            .expect("a histogram has a +Inf bucket")
    }
}

impl Histogram {
    /// A histogram with these bucket bounds (strictly increasing, at least
    /// one).
    pub fn new(bounds: &[u64]) -> Histogram {
        assert!(
            !bounds.is_empty(),
            "a histogram needs at least one bucket bound"
        );
        assert!(
            bounds.windows(2).all(|w| w[0] < w[1]),
            "histogram bucket bounds must increase strictly: {bounds:?}"
        );
        Histogram {
            bounds: bounds.into(),
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// A histogram of latencies in microseconds, [`LATENCY_BUCKETS_US`].
    pub fn latency_us() -> Histogram {
        Histogram::new(&LATENCY_BUCKETS_US)
    }

    pub fn observe(&self, value: u64) {
        let bucket = self.bounds.partition_point(|&bound| bound < value);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// [`Histogram::observe`] of a duration in microseconds (saturating).
    pub fn observe_duration_us(&self, duration: Duration) {
        self.observe(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0u64;
        let cumulative = self
            .buckets
            .iter()
            .map(|bucket| {
                total = total.wrapping_add(bucket.load(Ordering::Relaxed));
                total
            })
            .collect();
        HistogramSnapshot {
            bounds: self.bounds.to_vec(),
            cumulative,
            sum: self.sum.load(Ordering::Relaxed),
        }
    }
}

/// A histogram the node keeps updating, registered for one exposition.
#[derive(Debug, Clone)]
pub struct SharedHistogram(pub std::sync::Arc<Histogram>);

impl EncodeMetric for SharedHistogram {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.snapshot();
        // prometheus-client takes each bucket's own count and `f64::MAX`
        // for the `+Inf` bound.
        let mut previous = 0;
        let buckets: Vec<(f64, u64)> = snapshot
            .bounds
            .iter()
            .map(|&bound| bound as f64)
            .chain(std::iter::once(f64::MAX))
            .zip(&snapshot.cumulative)
            .map(|(bound, &cumulative)| {
                let own = cumulative - previous;
                previous = cumulative;
                (bound, own)
            })
            .collect();
        encoder.encode_histogram::<NoLabelSet>(
            snapshot.sum as f64,
            snapshot.count(),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;

    #[test]
    fn histogram_counts_into_buckets() {
        let histogram = Histogram::new(&[10, 20, 30]);
        for value in [0, 10, 11, 20, 25, 30, 31, 1000] {
            histogram.observe(value);
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.bounds, vec![10, 20, 30]);
        // <=10: 0, 10; <=20: +11, 20; <=30: +25, 30; +Inf: +31, 1000.
        assert_eq!(snapshot.cumulative, vec![2, 4, 6, 8]);
        assert_eq!(snapshot.count(), 8);
        assert_eq!(snapshot.sum, 10 + 11 + 20 + 25 + 30 + 31 + 1000);

        let latency = Histogram::latency_us();
        latency.observe_duration_us(Duration::from_micros(75));
        latency.observe_duration_us(Duration::from_secs(5));
        let snapshot = latency.snapshot();
        assert_eq!(snapshot.cumulative[0], 0);
        assert_eq!(snapshot.cumulative[1], 1);
        assert_eq!(snapshot.cumulative[LATENCY_BUCKETS_US.len() - 1], 1);
        assert_eq!(snapshot.count(), 2);
        assert_eq!(snapshot.sum, 5_000_075);
    }

    #[test]
    fn histogram_is_consistent_under_concurrent_observers() {
        let histogram = Arc::new(Histogram::latency_us());
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let histogram = Arc::clone(&histogram);
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        histogram.observe((i * 7919 + t) % 2_000_000);
                    }
                })
            })
            .collect();
        for _ in 0..50 {
            let snapshot = histogram.snapshot();
            assert!(snapshot.cumulative.windows(2).all(|w| w[0] <= w[1]));
        }
        for writer in writers {
            writer.join().unwrap();
        }
        assert_eq!(histogram.snapshot().count(), 80_000);
    }

    #[test]
    fn histogram_encodes_cumulative_buckets() {
        let histogram = Arc::new(Histogram::new(&[10, 20]));
        for value in [5, 15, 15, 100] {
            histogram.observe(value);
        }
        let mut registry = Registry::default();
        registry.register("op_latency_us", "Latency", SharedHistogram(histogram));
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert_eq!(
            text,
            "# HELP op_latency_us Latency.\n\
             # TYPE op_latency_us histogram\n\
             op_latency_us_sum 135.0\n\
             op_latency_us_count 4\n\
             op_latency_us_bucket{le=\"10.0\"} 1\n\
             op_latency_us_bucket{le=\"20.0\"} 3\n\
             op_latency_us_bucket{le=\"+Inf\"} 4\n\
             # EOF\n"
        );
    }
}
