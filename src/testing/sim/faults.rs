//! The faults the scheduler injects: crashes and power losses, stalls,
//! partitions, torn mirror writes, lost heartbeats, disk errors, small files
//! that cannot be written or read or read as garbage, and an operator
//! forcing a takeover.

use super::world::{FileFault, FileFaultKind, World};
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
        node.resync_began_at_step = None;
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

impl World {
    /// One of the small files the pair keeps misbehaves for a while: a
    /// node's mailbox or owner file (on the shared storage), or a node's
    /// persisted takeover index (in its data directory).
    pub(super) fn file_fault(&mut self) -> Result<(), String> {
        let node = &self.nodes[self.pick_node()];
        let aggregate = node.config.aggregate_dir.clone();
        let partner = node.config.partner_id();
        let path = match self.rng.below(3) {
            0 => crate::storage::mailbox::mailbox_path(&aggregate, node.id),
            1 => crate::storage::ownership::owner_path(&aggregate, node.id),
            _ => crate::ha::index::index_path(&node.config.data_dir, partner),
        };
        if self.file_faults.iter().any(|fault| fault.path == path) {
            return Ok(());
        }
        let kind = match self.rng.below(3) {
            0 => FileFaultKind::WritesFail,
            1 => FileFaultKind::ReadsFail,
            _ => FileFaultKind::ReadsGarbage,
        };
        let until_ms = self.now_ms() + 200 + self.rng.below(3000);
        let mut fault = FileFault {
            path: path.clone(),
            kind,
            until_ms,
            kept: None,
            garbage: Vec::new(),
        };
        let existing = std::fs::read(&path).ok();
        match kind {
            FileFaultKind::WritesFail => {
                let mut temporary = path.clone().into_os_string();
                temporary.push(".tmp");
                // A failed replace may have left its temporary file.
                let _ = std::fs::remove_file(&temporary);
                std::fs::create_dir(&temporary).map_err(|e| format!("sim: {e}"))?;
            }
            FileFaultKind::ReadsFail => {
                let Some(bytes) = existing else {
                    return Ok(()); // Nothing to hide.
                };
                let mut aside = path.clone().into_os_string();
                aside.push(".sim-aside");
                let aside = std::path::PathBuf::from(aside);
                std::fs::rename(&path, &aside).map_err(|e| format!("sim: {e}"))?;
                std::fs::create_dir(&path).map_err(|e| format!("sim: {e}"))?;
                fault.kept = Some((aside, bytes));
            }
            FileFaultKind::ReadsGarbage => {
                let Some(bytes) = existing else {
                    return Ok(());
                };
                let len = 1 + self.rng.below(bytes.len() as u64 + 64) as usize;
                fault.garbage = (0..len).map(|_| self.rng.next_u64() as u8).collect();
                std::fs::write(&path, &fault.garbage).map_err(|e| format!("sim: {e}"))?;
                fault.kept = Some((path.clone(), bytes));
            }
        }
        self.report.file_faults += 1;
        self.note(format_args!(
            "{} {} for {} ms",
            path.display(),
            match kind {
                FileFaultKind::WritesFail => "cannot be written",
                FileFaultKind::ReadsFail => "cannot be read",
                FileFaultKind::ReadsGarbage => "reads as garbage",
            },
            until_ms - self.now_ms()
        ));
        self.file_faults.push(fault);
        Ok(())
    }

    /// Undo the file faults whose time is up (all of them with `all`).
    pub(super) fn end_file_faults(&mut self, all: bool) -> Result<(), String> {
        let now = self.now_ms();
        let (ended, kept): (Vec<FileFault>, Vec<FileFault>) = std::mem::take(&mut self.file_faults)
            .into_iter()
            .partition(|fault| all || now >= fault.until_ms);
        self.file_faults = kept;
        for fault in ended {
            let sim = |e: std::io::Error| format!("sim: ending a file fault: {e}");
            match fault.kind {
                FileFaultKind::WritesFail => {
                    let mut temporary = fault.path.clone().into_os_string();
                    temporary.push(".tmp");
                    std::fs::remove_dir(&temporary).map_err(sim)?;
                }
                FileFaultKind::ReadsFail => {
                    let (aside, _) = fault.kept.expect("a hidden file was kept");
                    std::fs::remove_dir(&fault.path).map_err(sim)?;
                    std::fs::rename(&aside, &fault.path).map_err(sim)?;
                }
                FileFaultKind::ReadsGarbage => {
                    // Unless a node has replaced it since.
                    let (_, bytes) = fault.kept.expect("a garbled file was kept");
                    if std::fs::read(&fault.path).ok().as_deref() == Some(&fault.garbage[..]) {
                        std::fs::write(&fault.path, &bytes).map_err(sim)?;
                    }
                }
            }
            self.note(format_args!("{} works again", fault.path.display()));
        }
        Ok(())
    }
}
