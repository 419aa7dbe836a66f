//! The steps a node takes when the scheduler picks it: writes and their
//! acknowledgements, reads checked against the checker, consistency
//! points, connecting, the HA monitor, the replay.

use std::sync::Arc;

use super::world::{InFlight, World};
use super::*;
use crate::error::Error;
use crate::ha::HaNode;
use crate::node::{Node, WhenFull};
use crate::storage::extents::Source;
use crate::storage::ownership;
use crate::storage::volume::{volume_id, Volume};
use crate::testing::workload::BLOCK_BYTES;
use interconnect::QueueError;

impl World {
    /// A live node, one of the volumes it serves, and a block of it.
    pub(super) fn pick_block(&mut self) -> Option<(usize, Arc<HaNode>, Arc<Volume>, u64)> {
        let index = self.pick_node();
        let ha = self.live(index)?;
        let volumes = ha.node.volumes();
        if volumes.is_empty() {
            return None;
        }
        let volume = volumes[self.rng.below(volumes.len() as u64) as usize].clone();
        let block = self.rng.below(VOLUME_BLOCKS);
        Some((index, ha, volume, block))
    }

    pub(super) fn write(&mut self) -> Result<(), String> {
        let Some((index, ha, volume, block)) = self.pick_block() else {
            return Ok(());
        };
        let (version, data) = self.checker.next_write(volume.id, block);
        let offset = block * BLOCK_BYTES as u64;
        if self.ignores_its_fence(&ha, &volume) {
            // The broken node does not see that it lost the volume: the
            // write reaches the file, as its consistency point would put it.
            self.write_past_the_fence(&volume, offset, &data)?;
            self.note(format_args!(
                "node {} (ignoring its fence) writes {} block {block}",
                index + 1,
                volume.name
            ));
            return Ok(());
        }
        match ha
            .node
            .start_write(&volume, offset, &data, WhenFull::Refuse)
        {
            Ok(pending) => {
                self.checker.issued(volume.id, block, version);
                self.report.writes_issued += 1;
                self.note(format_args!(
                    "node {} writes {} block {block} version {version} (lsn {:?})",
                    index + 1,
                    volume.name,
                    pending.map(|p| p.lsn)
                ));
                if self.options.bug == Some(InjectedBug::AckBeforePlaced) {
                    // The broken node acknowledges once the write is in its
                    // own log, without waiting for the mirror or the disk.
                    self.checker.acked(volume.id, block, version);
                    return Ok(());
                }
                self.in_flight.push(InFlight {
                    node: self.nodes[index].id,
                    incarnation: self.nodes[index].incarnation,
                    volume,
                    block,
                    version,
                    pending,
                });
            }
            Err(Error::Log(nvlog::Error::WouldBlock { .. }))
            | Err(Error::Interconnect(interconnect::Error::Queue(QueueError::NoFreeSlots {
                ..
            }))) => {
                self.report.writes_busy += 1;
            }
            Err(error) => self.note(format_args!(
                "node {} write to {} refused: {error}",
                index + 1,
                volume.name
            )),
        }
        Ok(())
    }

    /// Acknowledge (or fail) one write whose wait would end now.
    pub(super) fn finish(&mut self) -> Result<(), String> {
        if !self.in_flight.is_empty() {
            let at = self.rng.below(self.in_flight.len() as u64) as usize;
            self.try_finish(at);
        }
        Ok(())
    }

    /// The wait phase of in-flight write `at`, if it would not wait: its
    /// node is live and its mirror post settled. Returns whether the entry
    /// left the list (acknowledged, failed, or of an earlier life).
    pub(super) fn try_finish(&mut self, at: usize) -> bool {
        let index = (self.in_flight[at].node - 1) as usize;
        let Some(ha) = self.live(index) else {
            return false;
        };
        let entry = &self.in_flight[at];
        let same_life = self.nodes[index].incarnation == entry.incarnation;
        if same_life && !ha.node.mirror.settled(entry.pending.and_then(|p| p.posted)) {
            return false;
        }
        let entry = self.in_flight.swap_remove(at);
        if !same_life {
            return true;
        }
        match ha.node.finish_write(&entry.volume, entry.pending, false) {
            Ok(()) => {
                self.checker
                    .acked(entry.volume.id, entry.block, entry.version);
                self.note(format_args!(
                    "node {} acks {} block {} version {}",
                    entry.node, entry.volume.name, entry.block, entry.version
                ));
            }
            Err(error) => self.note(format_args!(
                "node {} fails {} block {} version {}: {error}",
                entry.node, entry.volume.name, entry.block, entry.version
            )),
        }
        true
    }

    pub(super) fn deliver(&mut self) -> Result<(), String> {
        let index = self.pick_node();
        let addr = self.nodes[index].config.interconnect.listen;
        // One-sided writes land even while the receiving node is stalled.
        self.net.deliver_next(addr);
        Ok(())
    }

    pub(super) fn read(&mut self) -> Result<(), String> {
        match self.pick_block() {
            Some((_, ha, volume, block)) => self.check_block(&ha.node, &volume, block),
            None => Ok(()),
        }
    }

    pub(super) fn check_block(
        &mut self,
        node: &Node,
        volume: &Volume,
        block: u64,
    ) -> Result<(), String> {
        let mut buf = vec![0u8; BLOCK_BYTES];
        match node.read(volume, block * BLOCK_BYTES as u64, &mut buf) {
            Ok(()) => self
                .checker
                .check_read(volume.id, block, &buf)
                .map_err(|why| format!("node {} served a bad read: {why}", node.config.node_id)),
            // A fenced or failing node refuses reads: nothing was served.
            Err(_) => Ok(()),
        }
    }

    /// Read every written block from whichever node serves it.
    pub(super) fn full_check(&mut self, why: &str) -> Result<(), String> {
        self.report.full_checks += 1;
        self.note(format_args!("full read-back {why}"));
        for set in [1u32, 2] {
            for index in 0..VOLUMES_PER_NODE {
                let id = volume_id(set, index);
                let server = (0..2).find_map(|node| {
                    let ha = self.live(node)?;
                    let volume = ha.node.volume_by_id(id)?;
                    (!volume.fence.is_tripped()).then_some((ha, volume))
                });
                let Some((ha, volume)) = server else {
                    continue;
                };
                for block in self.checker.written_blocks(id) {
                    self.check_block(&ha.node, &volume, block)?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn consistency_point(&mut self) -> Result<(), String> {
        let index = self.pick_node();
        let Some(ha) = self.live(index) else {
            return Ok(());
        };
        // The broken node's consistency point also writes what it logged for
        // volumes it lost, over the new owner's data.
        for volume in ha.node.volumes() {
            if self.ignores_its_fence(&ha, &volume) {
                let pieces = volume.extents.lock().all_pieces();
                let mut buffer = Vec::new();
                for piece in pieces {
                    let data = match piece.source {
                        Source::Region { offset } => {
                            buffer.resize(piece.len as usize, 0);
                            ha.node.region.read(offset, &mut buffer);
                            buffer.clone()
                        }
                        Source::Zero | Source::Hole => vec![0; piece.len as usize],
                    };
                    self.write_past_the_fence(&volume, piece.start, &data)?;
                }
            }
        }
        // A consistency point waits for its mirror posts and those before.
        let timer_due = self.rng.chance(50);
        let healthy = self
            .net
            .placing_during(|| ha.node.consistency_point_tick(timer_due));
        self.report.consistency_points += 1;
        self.note(format_args!(
            "node {} consistency point (timer {timer_due}){}",
            index + 1,
            if healthy {
                ""
            } else {
                ": failed, node stops accepting writes"
            }
        ));
        Ok(())
    }

    pub(super) fn connect(&mut self) -> Result<(), String> {
        let index = self.pick_node();
        let Some(ha) = self.live(index) else {
            return Ok(());
        };
        // The resync goes on over later steps: its copies are placed by
        // delivery steps, among writes, tears and partitions.
        let outcome = ha.node.mirror.resync_step(&ha.node.log);
        let began_at = &mut self.nodes[index].resync_began_at_step;
        match outcome {
            None if ha.node.mirror.link() == crate::mirror::Link::Resyncing
                && began_at.is_none() =>
            {
                *began_at = Some(self.step);
                self.note(format_args!(
                    "node {} resyncs its partner's mirror",
                    index + 1
                ));
            }
            None => {}
            Some(in_sync) => {
                if began_at.take().is_some_and(|step| step < self.step) {
                    self.report.multi_step_resyncs += 1;
                }
                self.note(format_args!(
                    "node {} connects to its partner: {}",
                    index + 1,
                    if in_sync { "mirror in sync" } else { "failed" }
                ));
            }
        }
        Ok(())
    }

    pub(super) fn monitor(&mut self) -> Result<(), String> {
        let index = self.pick_node();
        let Some(ha) = self.live(index) else {
            return Ok(());
        };
        let holding_before = ha.holding_partner();
        let role_before = ha.role();
        // A giveback (or a return of our volumes) waits for mirror posts.
        let ticked = if holding_before || role_before != crate::ha::Role::Serving {
            self.net.placing_during(|| ha.monitor_tick())
        } else {
            ha.monitor_tick()
        };
        if let Err(error) = ticked {
            self.note(format_args!("node {} monitor: {error}", index + 1));
        }
        let holding_after = ha.holding_partner();
        let role_after = ha.role();
        if holding_after && !holding_before {
            self.report.takeovers += 1;
            self.count_warm_takeover(&ha);
            self.note(format_args!(
                "node {} took over its partner's volumes",
                index + 1
            ));
            self.full_check("after a takeover")?;
        } else if holding_before && !holding_after {
            self.report.givebacks += 1;
            self.note(format_args!(
                "node {} gave its partner's volumes back",
                index + 1
            ));
        } else if role_before != role_after {
            self.note(format_args!(
                "node {} is now {}",
                index + 1,
                role_after.as_str()
            ));
            self.full_check("after a change of role")?;
        }
        Ok(())
    }

    pub(super) fn replay(&mut self) -> Result<(), String> {
        let index = self.pick_node();
        let Some(ha) = self.live(index) else {
            return Ok(());
        };
        match ha.replay_step(2 * BLOCK_BYTES as u64) {
            Ok(true) => {}
            Ok(false) => {}
            Err(error) => self.note(format_args!("node {} replay: {error}", index + 1)),
        }
        Ok(())
    }

    pub(super) fn count_warm_takeover(&mut self, ha: &HaNode) {
        if ha.status().last_takeover.is_some_and(|last| !last.cold) {
            self.report.warm_takeovers += 1;
        }
    }

    /// A pass of the warm index on one node, with a budget that leaves it
    /// behind now and then (so takeovers scan tails of every length).
    pub(super) fn index_mirror(&mut self) -> Result<(), String> {
        let index = self.pick_node();
        let Some(ha) = self.live(index) else {
            return Ok(());
        };
        let budget =
            [2, 8, u64::MAX][self.rng.below(3) as usize].saturating_mul(BLOCK_BYTES as u64);
        match ha.index_mirror(budget) {
            Ok(report) if report.records > 0 || report.started_over => self.note(format_args!(
                "node {} warm index: {} records, {} bytes{}",
                index + 1,
                report.records,
                report.bytes,
                if report.started_over {
                    ", started over"
                } else {
                    ""
                }
            )),
            Ok(_) => {}
            Err(error) => self.note(format_args!("node {} warm index: {error}", index + 1)),
        }
        Ok(())
    }

    /// With [`InjectedBug::SkipEpochCheck`]: whether node `ha` would write
    /// `volume` although the owner file names another node. The owner file
    /// is read directly: checking the fence would trip it, and the broken
    /// node never learns it was fenced.
    pub(super) fn ignores_its_fence(&self, ha: &HaNode, volume: &Volume) -> bool {
        self.options.bug == Some(InjectedBug::SkipEpochCheck)
            && ownership::read(&ha.node.config.aggregate_dir, volume.set)
                .is_ok_and(|owner| owner.owner != ha.node.config.node_id)
    }

    /// What the broken node writes without a fence check; the shelf records
    /// the stale owner's write.
    pub(super) fn write_past_the_fence(
        &mut self,
        volume: &Volume,
        offset: u64,
        data: &[u8],
    ) -> Result<(), String> {
        let disk = self
            .shelf
            .open(volume.path(), volume.set, volume.size_bytes)
            .map_err(|error| format!("the shelf lost a volume's disk: {error}"))?;
        // An injected disk error is the broken node's problem.
        let _ = disk.write(offset, data);
        Ok(())
    }
}
