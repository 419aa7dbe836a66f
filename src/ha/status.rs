//! The status document: what this node serves, how its partner looks,
//! the mirror, the log, the replay and the last takeover.

use std::sync::atomic::Ordering;
use std::time::Instant;

use serde_json::json;

use crate::ha::{HaNode, Role};
use crate::storage::ownership;

impl HaNode {
    /// The status document (see `admin::render_status`).
    pub fn status(&self) -> serde_json::Value {
        let (me, partner) = self.me_and_partner();
        let now = Instant::now();
        let state = self.state.lock();
        let interconnect_silent_ms =
            now.duration_since(state.interconnect_alive_at).as_millis() as u64;
        let mailbox_stale_ms = now.duration_since(state.partner_seen_at).as_millis() as u64;
        let heartbeat_timeout_ms = self.node.config.interconnect.heartbeat_timeout_ms;
        let mailbox_timeout_ms = self.node.config.ha.mailbox_timeout_ms;
        let interconnect = if interconnect_silent_ms > heartbeat_timeout_ms {
            "silent"
        } else {
            "up"
        };
        let mailbox = match &state.partner_mailbox {
            None => "missing",
            Some(_) if mailbox_stale_ms > mailbox_timeout_ms => "stale",
            Some(_) => "alive",
        };
        let partner_state = state.partner_mailbox.as_ref().map(|m| m.state.clone());
        let mirror = self.node.mailbox.current();
        let takeover_why_not = if state.holding.is_some() {
            Some("this node already serves the partner's volumes".to_owned())
        } else if let Some(refusal) = &state.refusal {
            Some(refusal.clone())
        } else if state.aborted_takeover.is_some() {
            Some(
                "a takeover stopped after fencing (see the log for why): `nvmirror giveback` hands the volumes back"
                    .to_owned(),
            )
        } else if state.role != Role::Serving {
            Some(format!("this node is {}", state.role.as_str()))
        } else if interconnect == "up" {
            Some("partner is alive (interconnect up)".to_owned())
        } else if mailbox == "alive" {
            Some(
                "the interconnect failed but the partner's mailbox is alive: no takeover"
                    .to_owned(),
            )
        } else if mailbox == "missing" {
            Some("the partner never wrote its mailbox".to_owned())
        } else if state
            .partner_mailbox
            .as_ref()
            .is_some_and(|m| !m.mirror_in_sync)
        {
            Some("the partner's mirror is out of sync".to_owned())
        } else if state
            .partner_mailbox
            .as_ref()
            .is_some_and(|m| m.in_sync_with_boot != Some(self.node.mailbox.current().boot))
        {
            Some("the partner's mirror was in sync with an earlier start of this node".to_owned())
        } else {
            None
        };
        let volumes: Vec<serde_json::Value> = self
            .node
            .volumes()
            .iter()
            .map(|volume| {
                let owner = ownership::read(&self.node.config.aggregate_dir, volume.set).ok();
                json!({
                    "name": volume.name,
                    "volumes_of": volume.set,
                    "owner": owner.as_ref().map(|o| o.owner),
                    "epoch": owner.as_ref().map(|o| o.epoch),
                    "served_here": !volume.fence.is_tripped(),
                    "dirty_bytes": volume.extents.lock().covered_bytes(),
                    "size_bytes": volume.size_bytes,
                })
            })
            .collect();
        let log = self.node.log.status();
        let used_percent = log.halves[log.filling].used_bytes as f64 * 100.0 / log.half_len as f64;
        let total = self.replay_total_bytes.load(Ordering::Acquire);
        let done = self.replay_done_bytes.load(Ordering::Acquire);
        json!({
            "node_id": me,
            "state": state.role.as_str(),
            "failure": self.node.failure(),
            "partner": {
                "node_id": partner,
                "interconnect": interconnect,
                "interconnect_silent_ms": interconnect_silent_ms,
                "mailbox": mailbox,
                "mailbox_stale_ms": mailbox_stale_ms,
                "state": partner_state,
            },
            "mirror": {
                "link": self.node.link().as_str(),
                "in_sync": mirror.mirror_in_sync,
                "why_not": mirror.out_of_sync_reason,
                "resync": self.node.mirror.resync_progress().map(|progress| json!({
                    "total_bytes": progress.total_bytes,
                    "placed_bytes": progress.placed_bytes,
                    "elapsed_ms": progress.elapsed.as_millis() as u64,
                    "remaining_ms": progress.remaining.map(|left| left.as_millis() as u64),
                    "finished": progress.finished,
                })),
            },
            "takeover": {
                "possible": takeover_why_not.is_none(),
                "why_not": takeover_why_not,
                "holding_partner_volumes": state.holding.is_some(),
                "forced": state.holding.as_ref().is_some_and(|h| h.ownership.forced),
            },
            "volumes": volumes,
            "log": {
                "half_bytes": log.half_len,
                "filling": log.filling,
                "used_percent": used_percent,
                "next_lsn": log.next_lsn,
                "flushed_lsn": log.flushed_lsn,
                "persisted_lsn": log.persisted_lsn,
                "halves": log.halves.iter().map(|h| json!({"state": h.state.as_str(), "used_bytes": h.used_bytes})).collect::<Vec<_>>(),
            },
            "replay": {
                "active": self.replay_pending(),
                "total_bytes": total,
                "done_bytes": done,
                "percent": if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 },
            },
            "last_takeover": state.last_takeover.map(|t| json!({
                "at_unix_ms": t.at_unix_ms,
                "resume_ms": t.resume_ms,
                "first_read_ms": t.first_read_ms,
                "replay_ms": t.replay_ms,
                "forced": t.forced,
            })),
        })
    }
}
