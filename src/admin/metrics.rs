//! The node's metrics for `GET /metrics`, in the OpenMetrics text format
//! (which Prometheus scrapes): the node's counters as they stand, gauges
//! read at the scrape, the write-latency histogram.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::ha::HaNode;
use crate::metrics::SharedHistogram;

/// The content type of the exposition.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The node's metrics, encoded.
pub fn node_metrics(ha: &HaNode) -> String {
    let node = &ha.node;
    let stats = &node.stats;
    let counter = |value: &AtomicU64| ConstCounter::new(value.load(Ordering::Relaxed));
    let gauge = |value: u64| ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
    let mut registry = Registry::with_prefix("nvmirror");
    // Help texts get their final period from the encoder.
    // Counters get their `_total` suffix from the encoder.
    registry.register("writes", "Writes acknowledged", counter(&stats.writes));
    registry.register(
        "write_bytes",
        "Bytes of writes acknowledged",
        counter(&stats.write_bytes),
    );
    registry.register(
        "write_errors",
        "Writes that failed",
        counter(&stats.write_errors),
    );
    let acks = Family::<
        [(&'static str, &'static str); 1],
        prometheus_client::metrics::counter::Counter,
    >::default();
    acks.get_or_create(&[("by", "mirror")])
        .inc_by(stats.acks_mirrored.load(Ordering::Relaxed));
    acks.get_or_create(&[("by", "local_persist")])
        .inc_by(stats.acks_persisted.load(Ordering::Relaxed));
    registry.register("acks", "Acknowledgements by what made the write safe", acks);
    registry.register("reads", "Reads served", counter(&stats.reads));
    registry.register("read_bytes", "Bytes read", counter(&stats.read_bytes));
    registry.register("flushes", "Flushes served", counter(&stats.flushes));
    registry.register(
        "write_latency_us",
        "Write latency, request to acknowledgement, in microseconds",
        SharedHistogram(node.write_latency_us.clone()),
    );
    registry.register(
        "consistency_points",
        "Consistency points done",
        counter(&stats.consistency_points),
    );
    registry.register(
        "consistency_point_us",
        "Time spent in consistency points, in microseconds",
        counter(&stats.consistency_point_us_total),
    );
    registry.register(
        "send_slots_in_use",
        "Send-queue slots in flight",
        gauge(node.mirror.slots_in_use() as u64),
    );
    // The rest from the status document, read once.
    let status = ha.status();
    registry.register(
        "mirror_in_sync",
        "1 when the partner's mirror holds every acknowledged write",
        gauge(u64::from(status.mirror.in_sync)),
    );
    let log = &status.log;
    registry.register(
        "log_used_bytes",
        "Bytes used in the filling half of the log",
        gauge(log.halves[log.filling].used_bytes),
    );
    registry.register(
        "log_half_bytes",
        "Bytes of one log half",
        gauge(log.half_bytes),
    );
    registry.register(
        "holding_partner_volumes",
        "1 while this node serves its partner's volumes after a takeover",
        gauge(u64::from(status.takeover.holding_partner_volumes)),
    );
    registry.register(
        "replay_total_bytes",
        "Bytes of the partner's mirror to replay after the last takeover",
        gauge(status.replay.total_bytes),
    );
    registry.register(
        "replay_done_bytes",
        "Bytes of the partner's mirror replayed so far",
        gauge(status.replay.done_bytes),
    );
    registry.register(
        "warm_index_records",
        "Records of the partner's live log in the warm takeover index",
        gauge(status.warm_index.records),
    );
    registry.register(
        "warm_index_lag_records",
        "Records the warm index's last pass found unindexed",
        gauge(status.warm_index.lag_records),
    );
    registry.register(
        "warm_index_lag_bytes",
        "Bytes the warm index's last pass found unindexed",
        gauge(status.warm_index.lag_bytes),
    );
    registry.register(
        "warm_index_cpu_seconds",
        "CPU time the warm index's passes took since the node started",
        ConstCounter::new(status.warm_index.cpu_ms as f64 / 1e3),
    );
    registry.register(
        "takeovers",
        "Takeovers done by this node since it started",
        ConstCounter::new(u64::from(status.last_takeover.is_some())),
    );
    let mut text = String::new();
    encode(&mut text, &registry).expect("encoding into a String cannot fail");
    text
}
