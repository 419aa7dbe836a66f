//! What a starting node serves: its own volumes (recovering its log onto
//! them, or discarding it when a giveback replayed it already), the
//! partner's when it held them before a restart (from the persisted index,
//! without scanning the mirror again), or nothing while it waits for a
//! giveback.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::ha::index::TakeoverIndex;
use crate::ha::{HaNode, Holding, Role};
use crate::storage::extents::Origin;
use crate::storage::mailbox::{self, MailboxState};
use crate::storage::ownership::{self, Ownership};
use crate::storage::volume::Volume;

impl HaNode {
    /// Decide at start-up what this node serves.
    pub(super) fn boot(self: &Arc<Self>) -> Result<()> {
        let (me, partner) = self.me_and_partner();
        let aggregate = &self.node.config.aggregate_dir;
        let own = ownership::read(aggregate, me)?;
        let theirs = ownership::read(aggregate, partner)?;
        if own.owner != me && theirs.owner == me {
            return Err(Error::OwnershipConflict {
                partner,
                own_file: ownership::owner_path(aggregate, me),
                their_file: ownership::owner_path(aggregate, partner),
            });
        }
        if theirs.owner == me {
            self.resume_holding(theirs)?;
        }
        if own.owner == me {
            // A giveback said our log is in the volumes already, and we crashed
            // before discarding it: discard it now (replaying it would write
            // old data over what the partner wrote while it held them).
            self.serve_own_volumes(&own, own.log_replayed)?;
        } else {
            tracing::warn!(
                owner = own.owner,
                epoch = own.epoch,
                "this node's volumes were taken over: waiting for giveback"
            );
            self.state.lock().role = Role::WaitingForGiveback;
            self.set_mailbox_state(Role::WaitingForGiveback);
        }
        if !self.holding_partner() {
            self.node.bind_receiver()?;
        }
        Ok(())
    }

    /// Open and serve this node's own volumes under `own`; with `discard_log`,
    /// first forget the local log (the partner replayed it).
    pub(super) fn serve_own_volumes(
        self: &Arc<Self>,
        own: &Ownership,
        discard_log: bool,
    ) -> Result<()> {
        let (me, _) = self.me_and_partner();
        let specs = self
            .node
            .config
            .volumes
            .iter()
            .map(|v| (v.name.as_str(), v.size.0));
        // The fence first: a node that lost the race touches no file.
        let fence = self.fence_for(own);
        fence.check()?;
        let volumes = self.open_volume_set(me, specs, &fence)?;
        if discard_log {
            // Writes to the volumes as they were before the takeover may
            // still wait for log space: none may append to the fresh log.
            for old in self.node.volumes().iter().filter(|volume| volume.set == me) {
                old.fence.trip();
            }
            self.node.mirror.declare_out_of_sync(
                "this node discarded its log when its volumes came back; the partner's mirror \
                 holds the old one, already replayed, until a resync copies the new one",
            )?;
            self.discard_log_once_writers_are_gone()?;
            ownership::log_discarded(&self.node.config.aggregate_dir, own)?;
        }
        self.node.detach_set(me);
        self.node.attach_volumes(volumes);
        if !discard_log {
            self.node.recover_onto_volumes()?;
        }
        {
            let mut state = self.state.lock();
            state.role = Role::Serving;
            state.own_fence = Some(fence);
        }
        self.node.mirror.set_enabled(true);
        self.set_mailbox_state(Role::Serving);
        Ok(())
    }

    /// The partner's volumes, opened under `ownership` (ours), from its mailbox.
    pub(super) fn open_partner_volumes(
        &self,
        ownership: &Ownership,
    ) -> Result<(Vec<Arc<Volume>>, MailboxState)> {
        let (_, partner) = self.me_and_partner();
        let mailbox = mailbox::read(&self.node.config.aggregate_dir, partner)?
            .ok_or(Error::PartnerUnknown { partner })?;
        let specs = mailbox
            .volumes
            .iter()
            .map(|v| (v.name.as_str(), v.size_bytes));
        let volumes = self.open_volume_set(partner, specs, &self.fence_for(ownership))?;
        Ok((volumes, mailbox))
    }

    /// After a restart: we hold the partner's volumes. Load the persisted index
    /// instead of scanning the mirror again, and resume the replay.
    pub(super) fn resume_holding(self: &Arc<Self>, theirs: Ownership) -> Result<()> {
        let (_, partner) = self.me_and_partner();
        let span = tracing::info_span!("takeover_resume", partner, epoch = theirs.epoch);
        let _entered = span.enter();
        // The index is saved before the takeover serves anything, and kept
        // (empty) once the replay is done: without one for this epoch, the
        // takeover stopped before serving, and the partner's log is its own.
        let index = TakeoverIndex::load(&self.node.config.data_dir, partner)?
            .filter(|index| index.epoch == theirs.epoch);
        let Some(index) = index else {
            tracing::warn!(
                epoch = theirs.epoch,
                "the partner's volumes are fenced to this node, but its takeover stopped before \
                 serving them: they wait for a giveback"
            );
            self.state.lock().aborted_takeover = Some(theirs);
            return Ok(());
        };
        let (volumes, mailbox) = self.open_partner_volumes(&theirs)?;
        let mut entries = 0;
        {
            for entry in &index.entries {
                if let Some(volume) = volumes.iter().find(|v| v.id == entry.volume_id) {
                    volume.extents.lock().insert_from(
                        Origin::Mirror,
                        entry.start,
                        entry.len,
                        entry.lsn,
                        entry.source,
                    );
                    entries += 1;
                }
            }
        }
        self.node.attach_volumes(volumes.clone());
        self.start_replay_accounting(&volumes);
        self.state.lock().holding = Some(Holding {
            ownership: theirs,
            volumes,
        });
        self.serve_partner_address(&mailbox);
        tracing::info!(
            entries,
            "resumed serving the partner's volumes from the persisted index"
        );
        Ok(())
    }

    pub(super) fn start_replay_accounting(&self, volumes: &[Arc<Volume>]) {
        let total: u64 = volumes
            .iter()
            .map(|v| v.extents.lock().mirror_bytes())
            .sum();
        self.replay_total_bytes.store(total, Ordering::Release);
        self.replay_done_bytes.store(0, Ordering::Release);
        self.replay_active.store(total > 0, Ordering::Release);
    }
}
