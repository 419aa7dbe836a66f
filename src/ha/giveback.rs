//! Giveback: the survivor finishes the replay, closes the write gate of
//! the partner's volumes, flushes everything, hands ownership back ("log
//! replayed") and stops serving them. The partner, waiting, sees its
//! ownership return (in its [`crate::ha::monitor`]), discards its own log
//! and serves.

use std::sync::Arc;

use crate::error::Refusal;
use crate::error::Result;
use crate::ha::index::TakeoverIndex;
use crate::ha::HaNode;
use crate::storage::mailbox;
use crate::storage::ownership;
use crate::storage::volume::Volume;

impl HaNode {
    /// Hand the partner's volumes back (see the module docs).
    pub fn giveback(self: &Arc<Self>) -> Result<String> {
        let _transition = self.transition.lock();
        // A failed node's log may hold records a failed consistency point never
        // wrote: restart it (recovery writes them), then give back.
        self.node.check_not_failed()?;
        let (me, partner) = self.me_and_partner();
        let span = tracing::info_span!("giveback", partner);
        let _entered = span.enter();
        let aggregate = &self.node.config.aggregate_dir;
        let theirs = ownership::read(aggregate, partner)?;
        if theirs.owner != me {
            return Err(Refusal::NotHeld {
                partner,
                owner: theirs.owner,
            }
            .into());
        }
        let holding = self.state.lock().holding.clone();
        let Some(holding) = holding else {
            // A takeover that stopped after fencing: the partner's log is its
            // own (or still one an earlier giveback had replayed: it stays
            // to discard).
            let back = ownership::change_hands(
                aggregate,
                &theirs,
                partner,
                false,
                theirs.log_replayed,
                "giveback of a stopped takeover",
            )?;
            self.state.lock().aborted_takeover = None;
            self.node.bind_receiver()?;
            return Ok(format!(
                "node {partner}'s volumes handed back at epoch {} (they were never served here)",
                back.epoch
            ));
        };
        // The replay must end first: the partner will discard its log.
        let replay_thread = self.replay_thread.lock().take();
        if let Some(thread) = replay_thread {
            let _ = thread.join();
        }
        if self.replay_pending() {
            self.replay()?;
        }
        for volume in &holding.volumes {
            *volume.write_gate.write() = false;
        }
        // The partner reads only the volume files: nothing of its volumes
        // may stay in this node's log. With the gates closed no record for
        // them is added; two rounds flush the closed half, then the filling
        // one, unless other writes' reservations keep it from closing.
        for _ in 0..2 {
            self.node.consistency_point_all()?;
            if unflushed_bytes(&holding.volumes) == 0 {
                break;
            }
        }
        let bytes = unflushed_bytes(&holding.volumes);
        if bytes > 0 {
            for volume in &holding.volumes {
                *volume.write_gate.write() = true;
            }
            return Err(Refusal::LogNotFlushed { partner, bytes }.into());
        }
        for volume in &holding.volumes {
            volume.sync()?;
        }
        let back = ownership::change_hands(
            aggregate,
            &holding.ownership,
            partner,
            false,
            true,
            "giveback",
        )?;
        for volume in self.node.detach_set(partner) {
            volume.fence.trip();
        }
        assert!(
            self.node
                .volumes()
                .iter()
                .all(|volume| volume.set != partner),
            "the partner's volumes are still served after the giveback"
        );
        self.stop_serving_partner_address();
        let partner_nbd = mailbox::read(aggregate, partner)?
            .map(|m| m.nbd_listen)
            .unwrap_or_default();
        self.run_hook("giveback", &partner_nbd);
        TakeoverIndex::remove(&self.node.config.data_dir, partner)?;
        self.state.lock().holding = None;
        self.node.bind_receiver()?;
        tracing::warn!(epoch = back.epoch, "giveback done");
        Ok(format!(
            "node {partner}'s volumes handed back at epoch {}",
            back.epoch
        ))
    }
}

/// Bytes of `volumes` whose newest data is still only in a log.
fn unflushed_bytes(volumes: &[Arc<Volume>]) -> u64 {
    volumes
        .iter()
        .map(|volume| volume.extents.lock().covered_bytes())
        .sum()
}
