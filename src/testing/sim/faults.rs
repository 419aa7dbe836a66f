//! The faults the scheduler injects: crashes and power losses, stalls,
//! partitions, torn mirror writes, lost heartbeats, disk errors, and an
//! operator forcing a takeover.

use super::world::World;
use super::*;
use crate::config::Durability;
use crate::storage::volume::volume_id;

impl World {
    /// Every heartbeat is lost for a while, though both nodes and their
    /// sessions are fine: the failure detectors may cut live sessions.
    pub(super) fn lose_heartbeats(&mut self) -> Result<(), String> {
        let ms = 300 + self.rng.below(2000);
        self.heartbeats_lost_until_ms = self.now_ms() + ms;
        self.note(format_args!("heartbeats are lost for {ms} ms"));
        Ok(())
    }

    pub(super) fn tear(&mut self) -> Result<(), String> {
        let index = self.pick_node();
        let addr = self.nodes[index].config.interconnect.listen;
        let keep = self.rng.below(4096);
        if self.net.tear_next(addr, keep) {
            self.report.torn_mirror_writes += 1;
            self.note(format_args!(
                "mirror write into node {} torn after {keep} bytes; session lost",
                index + 1
            ));
        }
        Ok(())
    }

    pub(super) fn crash_one(&mut self) -> Result<(), String> {
        let index = self.pick_node();
        if self.nodes[index].ha.is_none() {
            return Ok(());
        }
        self.crash(index);
        Ok(())
    }

    /// Kill node `index`: its NVRAM keeps what was persisted (the rest torn
    /// at random), its unsynced volume writes survive in part, its sessions
    /// die.
    pub(super) fn crash(&mut self, index: usize) {
        let now = self.now_ms();
        let node = &mut self.nodes[index];
        let Some(ha) = node.ha.take() else {
            return;
        };
        node.events = None;
        // A process crash (kill -9, a panic) keeps everything written to the
        // NVRAM mapping and the page cache. A power loss keeps only what was
        // persisted, the rest torn at any byte, and part of the volume
        // writes not yet synced. With durability = "mirror" a write is
        // acknowledged before it is persisted locally; after a power loss
        // of the node only the partner's mirror has it. A node restarting
        // then hands its own volumes over, but one that held its partner's
        // serves them from its log (a known limitation, see the README):
        // power loss is simulated with durability = "persist" only.
        let power_loss = self.durability == Durability::Persist && self.rng.chance(50);
        let tear_seed = power_loss.then(|| self.rng.next_u64());
        ha.node.mirror.stop();
        drop(ha);
        node.region = after_crash(&node.region, tear_seed);
        let (own, partner) = (
            node.config.interconnect.listen,
            node.config.interconnect.partner,
        );
        self.net.unlisten(own);
        self.net.cut_into(partner);
        self.net.set_deaf(own, false);
        node.stalled_until_ms = None;
        let down_ms = 500 + self.rng.below(4500);
        node.down_until_ms = Some(now + down_ms);
        node.down_since_ms = now;
        let id = node.id;
        if power_loss {
            node.power_ups += 1;
            let mut disk_rng = self.rng.fork();
            self.shelf.crash(id, &mut disk_rng);
            self.report.power_losses += 1;
        }
        self.in_flight.retain(|entry| entry.node != id);
        self.report.crashes += 1;
        self.note(format_args!(
            "node {id} {}; down for {down_ms} ms",
            if power_loss { "loses power" } else { "crashes" }
        ));
    }

    pub(super) fn stall_one(&mut self) -> Result<(), String> {
        let index = self.pick_node();
        let now = self.now_ms();
        let node = &mut self.nodes[index];
        if node.ha.is_none() || node.stalled_until_ms.is_some() {
            return Ok(());
        }
        let stall_ms = 500 + self.rng.below(4000);
        node.stalled_until_ms = Some(now + stall_ms);
        node.stalled_since_ms = now;
        // A stopped process accepts no new session.
        self.net.set_deaf(node.config.interconnect.listen, true);
        self.report.stalls += 1;
        self.note(format_args!("node {} stalls for {stall_ms} ms", index + 1));
        Ok(())
    }

    pub(super) fn partition(&mut self) -> Result<(), String> {
        if !self.net.is_partitioned() {
            self.net.partition();
            self.report.partitions += 1;
            self.note("interconnect partitioned");
        }
        Ok(())
    }

    pub(super) fn heal(&mut self) -> Result<(), String> {
        if self.net.is_partitioned() {
            self.net.heal();
            self.note("partition heals");
        }
        Ok(())
    }

    pub(super) fn disk_fault(&mut self) -> Result<(), String> {
        let disks = self.shelf.disks();
        if disks.is_empty() {
            return Ok(());
        }
        let disk = &disks[self.rng.below(disks.len() as u64) as usize];
        let sync = self.rng.chance(50);
        if sync {
            disk.fail_next_sync();
        } else {
            disk.fail_next_write();
        }
        self.report.disk_faults += 1;
        self.note(format_args!(
            "the next {} of {} fails",
            if sync { "fsync" } else { "write" },
            disk.path().display()
        ));
        Ok(())
    }

    /// An operator forces a takeover while the partner is down.
    pub(super) fn forced_takeover(&mut self) -> Result<(), String> {
        let index = self.pick_node();
        let partner = 1 - index;
        // The operator waits for the automatic takeover first.
        let now = self.now_ms();
        let down_since = if self.nodes[partner].ha.is_none() {
            self.nodes[partner].down_since_ms
        } else if self.nodes[partner].stalled_until_ms.is_some() {
            self.nodes[partner].stalled_since_ms
        } else {
            now
        };
        let partner_down = now - down_since >= OPERATOR_PATIENCE_MS;
        let Some(ha) = self.live(index) else {
            return Ok(());
        };
        if !partner_down || ha.holding_partner() {
            return Ok(());
        }
        let partner_id = self.nodes[partner].id;
        // What the takeover trusts without force (see ha::takeover).
        let my_boot = ha.node.mailbox.current().boot;
        let in_sync = crate::storage::mailbox::read(&ha.node.config.aggregate_dir, partner_id)
            .ok()
            .flatten()
            .is_some_and(|m| m.mirror_in_sync && m.in_sync_with_boot == Some(my_boot));
        match ha.takeover(true, "operator: forced takeover in the simulation") {
            Ok(_) => {
                if !in_sync {
                    let lost: Vec<u32> = (0..VOLUMES_PER_NODE)
                        .map(|i| volume_id(partner_id, i))
                        .collect();
                    self.checker.forced_takeover(&lost);
                }
                self.report.takeovers += 1;
                self.report.forced_takeovers += 1;
                self.count_warm_takeover(&ha);
                // (Not the takeover's message: it has wall-clock timings.)
                self.note(format_args!(
                    "node {} forced a takeover of node {partner_id}'s volumes (mirror {})",
                    index + 1,
                    if in_sync {
                        "in sync"
                    } else {
                        "not in sync: writes may be lost"
                    }
                ));
                self.full_check("after a forced takeover")?;
            }
            Err(error) => self.note(format_args!(
                "node {} forced takeover refused: {error}",
                index + 1
            )),
        }
        Ok(())
    }
}
