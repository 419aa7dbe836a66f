//! The node's metrics, in the Prometheus text format.

use std::sync::atomic::Ordering;

use crate::ha::HaNode;
use crate::metrics::MetricsText;

/// The node's metrics in the Prometheus text format.
pub fn node_metrics(ha: &HaNode) -> String {
    let node = &ha.node;
    let mut text = MetricsText::new();
    let stats = &node.stats;
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    text.counter(
        "nvmirror_writes_total",
        "Writes acknowledged.",
        &[],
        load(&stats.writes),
    );
    text.counter(
        "nvmirror_write_bytes_total",
        "Bytes of writes acknowledged.",
        &[],
        load(&stats.write_bytes),
    );
    text.counter(
        "nvmirror_write_errors_total",
        "Writes that failed.",
        &[],
        load(&stats.write_errors),
    );
    text.counter(
        "nvmirror_acks_total",
        "Acknowledgements by what made the write safe.",
        &[("by", "mirror")],
        load(&stats.acks_mirrored),
    );
    text.counter(
        "nvmirror_acks_total",
        "Acknowledgements by what made the write safe.",
        &[("by", "local_persist")],
        load(&stats.acks_persisted),
    );
    text.counter(
        "nvmirror_reads_total",
        "Reads served.",
        &[],
        load(&stats.reads),
    );
    text.counter(
        "nvmirror_read_bytes_total",
        "Bytes read.",
        &[],
        load(&stats.read_bytes),
    );
    text.counter(
        "nvmirror_flushes_total",
        "Flushes served.",
        &[],
        load(&stats.flushes),
    );
    text.histogram(
        "nvmirror_write_latency_us",
        "Write latency, request to acknowledgement, in microseconds.",
        &[],
        &node.write_latency_us,
    );
    text.counter(
        "nvmirror_checkpoints_total",
        "Consistency points done.",
        &[],
        load(&stats.checkpoints),
    );
    text.counter(
        "nvmirror_checkpoint_us_total",
        "Time spent in consistency points, in microseconds.",
        &[],
        load(&stats.checkpoint_us_total),
    );
    text.gauge(
        "nvmirror_send_slots_in_use",
        "Send-queue slots in flight.",
        &[],
        node.mirror.slots_in_use() as u64,
    );
    text.gauge(
        "nvmirror_mirror_in_sync",
        "1 when the partner's mirror holds every acknowledged write.",
        &[],
        node.mailbox.current().mirror_in_sync,
    );
    let log = node.log.status();
    text.gauge(
        "nvmirror_log_used_bytes",
        "Bytes used in the filling half of the log.",
        &[],
        log.halves[log.filling].used_bytes,
    );
    text.gauge(
        "nvmirror_log_half_bytes",
        "Bytes of one log half.",
        &[],
        log.half_len,
    );
    let status = ha.status();
    text.gauge(
        "nvmirror_holding_partner_volumes",
        "1 while this node serves its partner's volumes after a takeover.",
        &[],
        status["takeover"]["holding_partner_volumes"]
            .as_bool()
            .unwrap_or(false),
    );
    text.gauge(
        "nvmirror_replay_total_bytes",
        "Bytes of the partner's mirror to replay after the last takeover.",
        &[],
        status["replay"]["total_bytes"].as_u64().unwrap_or(0),
    );
    text.gauge(
        "nvmirror_replay_done_bytes",
        "Bytes of the partner's mirror replayed so far.",
        &[],
        status["replay"]["done_bytes"].as_u64().unwrap_or(0),
    );
    text.counter(
        "nvmirror_takeovers_total",
        "Takeovers done by this node since it started.",
        &[],
        u64::from(status["last_takeover"].is_object()),
    );
    text.finish()
}
