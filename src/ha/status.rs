//! The status document: what this node serves, how its partner looks,
//! the mirror, the log, the replay and the last takeover. One typed
//! document: HA produces it, `GET /status` sends it as JSON, and the CLI,
//! the metrics, the drill, the harness and the tests read its fields.

use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::ha::{HaNode, Role};
use crate::mirror::Link;
use crate::storage::ownership;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub node_id: u32,
    pub state: Role,
    /// Why the node stopped accepting writes, if it did.
    pub failure: Option<String>,
    /// In state "handing over": why this start does not trust its own log
    /// (it waits for the partner to take over and give back, or for
    /// `nvmirror recover --force`).
    #[serde(default)]
    pub handing_over_because: Option<String>,
    /// The durability level in force (`durability` in the config) and
    /// what an acknowledged write survives at it.
    #[serde(default)]
    pub durability: DurabilityView,
    pub partner: PartnerStatus,
    pub mirror: MirrorStatus,
    pub takeover: TakeoverStatus,
    pub volumes: Vec<VolumeStatus>,
    pub log: LogView,
    pub replay: ReplayStatus,
    /// The index of the partner's mirror kept while it is healthy.
    #[serde(default)]
    pub warm_index: WarmIndexStatus,
    pub last_takeover: Option<LastTakeover>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DurabilityView {
    pub level: String,
    pub survives: String,
}

/// The warm index of the partner's mirror: what a takeover would not have
/// to scan, and how far behind the mirror it was at its last pass.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WarmIndexStatus {
    /// Records (and their bytes) of the partner's live log indexed.
    pub records: u64,
    pub bytes: u64,
    pub passes: u64,
    /// What the last pass found unindexed: the lag behind the mirror.
    pub lag_records: u64,
    pub lag_bytes: u64,
    /// Passes that threw the index away (a resync rewrote the mirror).
    pub starts_over: u64,
    /// CPU time the indexer's passes took since the node started.
    pub cpu_ms: u64,
}

/// As its JSON, on one line (for logs and messages).
impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let json = serde_json::to_string(self).map_err(|_| std::fmt::Error)?;
        f.write_str(&json)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartnerStatus {
    pub node_id: u32,
    pub interconnect: InterconnectView,
    pub interconnect_silent_ms: u64,
    pub mailbox: MailboxView,
    pub mailbox_stale_ms: u64,
    /// The state the partner's mailbox gives, if there is one.
    pub state: Option<String>,
}

/// The interconnect as failure detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InterconnectView {
    Up,
    Silent,
}

/// The partner's mailbox as failure detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MailboxView {
    Alive,
    Stale,
    Missing,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MirrorStatus {
    pub link: Link,
    /// What this node's mailbox tells the partner.
    pub in_sync: bool,
    pub why_not: Option<String>,
    /// The last (or the running) resync.
    pub resync: Option<ResyncStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResyncStatus {
    pub total_bytes: u64,
    pub placed_bytes: u64,
    pub elapsed_ms: u64,
    pub remaining_ms: Option<u64>,
    pub finished: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TakeoverStatus {
    pub possible: bool,
    pub why_not: Option<String>,
    pub holding_partner_volumes: bool,
    pub forced: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    /// Whose volume it is.
    pub volumes_of: u32,
    /// The owner file's owner and epoch (`None`: unreadable).
    pub owner: Option<u32>,
    pub epoch: Option<u64>,
    pub served_here: bool,
    pub dirty_bytes: u64,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogView {
    pub half_bytes: u64,
    pub filling: usize,
    pub used_percent: f64,
    pub next_lsn: u64,
    pub flushed_lsn: u64,
    pub persisted_lsn: u64,
    pub halves: Vec<HalfView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HalfView {
    /// "free", "filling", "closed" or "flushing".
    pub state: String,
    pub used_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayStatus {
    pub active: bool,
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastTakeover {
    pub at_unix_ms: u64,
    /// From the takeover's start until the partner's volumes were served.
    pub resume_ms: u64,
    /// Until the first read of any volume after it.
    pub first_read_ms: Option<u64>,
    pub replay_ms: Option<u64>,
    pub forced: bool,
    /// Records and bytes the takeover scanned itself (the warm index's lag).
    #[serde(default)]
    pub tail_records: u64,
    #[serde(default)]
    pub tail_bytes: u64,
    /// The warm index could not be used: the whole mirror was scanned.
    #[serde(default)]
    pub cold: bool,
}

impl HaNode {
    /// The status document.
    pub fn status(&self) -> Status {
        let (me, partner) = self.me_and_partner();
        let now = Instant::now();
        // As of the last pass (the index itself is locked during a pass).
        let warm_index = {
            let progress = *self.warm_progress.lock();
            WarmIndexStatus {
                records: progress.records,
                bytes: progress.bytes,
                passes: progress.passes,
                lag_records: progress.last_pass.records,
                lag_bytes: progress.last_pass.bytes,
                starts_over: progress.starts_over,
                cpu_ms: progress.cpu.as_millis() as u64,
            }
        };
        let state = self.state.lock();
        let interconnect_silent_ms =
            now.duration_since(state.interconnect_alive_at).as_millis() as u64;
        let mailbox_stale_ms = now.duration_since(state.partner_seen_at).as_millis() as u64;
        let heartbeat_timeout_ms = self.node.config.interconnect.heartbeat_timeout_ms;
        let mailbox_timeout_ms = self.node.config.ha.mailbox_timeout_ms;
        let interconnect = if interconnect_silent_ms > heartbeat_timeout_ms {
            InterconnectView::Silent
        } else {
            InterconnectView::Up
        };
        let mailbox = match &state.partner_mailbox {
            None => MailboxView::Missing,
            Some(_) if mailbox_stale_ms > mailbox_timeout_ms => MailboxView::Stale,
            Some(_) => MailboxView::Alive,
        };
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
        } else if interconnect == InterconnectView::Up {
            Some("partner is alive (interconnect up)".to_owned())
        } else if mailbox == MailboxView::Alive {
            Some(
                "the interconnect failed but the partner's mailbox is alive: no takeover"
                    .to_owned(),
            )
        } else if mailbox == MailboxView::Missing {
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
            .is_some_and(|m| m.in_sync_with_boot != Some(mirror.boot))
        {
            Some("the partner's mirror was in sync with an earlier start of this node".to_owned())
        } else {
            None
        };
        let volumes = self
            .node
            .volumes()
            .iter()
            .map(|volume| {
                let owner = ownership::read(&self.node.config.aggregate_dir, volume.set).ok();
                VolumeStatus {
                    name: volume.name.clone(),
                    volumes_of: volume.set,
                    owner: owner.as_ref().map(|o| o.owner),
                    epoch: owner.as_ref().map(|o| o.epoch),
                    served_here: !volume.fence.is_tripped(),
                    dirty_bytes: volume.extents.lock().covered_bytes(),
                    size_bytes: volume.size_bytes,
                }
            })
            .collect();
        let log = self.node.log.status();
        let used_percent = log.halves[log.filling].used_bytes as f64 * 100.0 / log.half_len as f64;
        let total = self.replay_total_bytes.load(Ordering::Acquire);
        let done = self.replay_done_bytes.load(Ordering::Acquire);
        Status {
            node_id: me,
            state: state.role,
            failure: self.node.failure(),
            handing_over_because: state.handing_over_because.clone(),
            durability: DurabilityView {
                level: self.node.config.durability.as_str().to_owned(),
                survives: self.node.config.durability.survives().to_owned(),
            },
            partner: PartnerStatus {
                node_id: partner,
                interconnect,
                interconnect_silent_ms,
                mailbox,
                mailbox_stale_ms,
                state: state.partner_mailbox.as_ref().map(|m| m.state.clone()),
            },
            mirror: MirrorStatus {
                link: self.node.link(),
                in_sync: mirror.mirror_in_sync,
                why_not: mirror.out_of_sync_reason,
                resync: self
                    .node
                    .mirror
                    .resync_progress()
                    .map(|progress| ResyncStatus {
                        total_bytes: progress.total_bytes,
                        placed_bytes: progress.placed_bytes,
                        elapsed_ms: progress.elapsed.as_millis() as u64,
                        remaining_ms: progress.remaining.map(|left| left.as_millis() as u64),
                        finished: progress.finished,
                    }),
            },
            takeover: TakeoverStatus {
                possible: takeover_why_not.is_none(),
                why_not: takeover_why_not,
                holding_partner_volumes: state.holding.is_some(),
                forced: state.holding.as_ref().is_some_and(|h| h.ownership.forced),
            },
            volumes,
            log: LogView {
                half_bytes: log.half_len,
                filling: log.filling,
                used_percent,
                next_lsn: log.next_lsn,
                flushed_lsn: log.flushed_lsn,
                persisted_lsn: log.persisted_lsn,
                halves: log
                    .halves
                    .iter()
                    .map(|half| HalfView {
                        state: half.state.as_str().to_owned(),
                        used_bytes: half.used_bytes,
                    })
                    .collect(),
            },
            replay: ReplayStatus {
                active: self.replay_pending(),
                total_bytes: total,
                done_bytes: done,
                percent: if total == 0 {
                    100.0
                } else {
                    done as f64 * 100.0 / total as f64
                },
            },
            warm_index,
            last_takeover: state.last_takeover.map(|t| LastTakeover {
                at_unix_ms: t.at_unix_ms,
                resume_ms: t.resume_ms,
                first_read_ms: t.first_read_ms,
                replay_ms: t.replay_ms,
                forced: t.forced,
                tail_records: t.tail_records,
                tail_bytes: t.tail_bytes,
                cold: t.cold,
            }),
        }
    }
}
