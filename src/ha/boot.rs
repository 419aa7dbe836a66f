//! What a starting node serves: its own volumes (recovering its log onto
//! them, or discarding it when a giveback replayed it already), the
//! partner's when it held them before a restart (from the persisted index,
//! without scanning the mirror again), or nothing while it waits for a
//! giveback.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::config::Durability;
use crate::error::{Error, Refusal, Result};
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
        let recovering_own_log = own.owner == me && !own.log_replayed;
        let log_may_lack_writes = self
            .log_may_lack_acknowledged_writes()
            .filter(|_| recovering_own_log);
        if let Some(why) = log_may_lack_writes {
            if self.holding_partner() && self.machine_did_not_restart() {
                // The partner waits for its own volumes and cannot take ours.
                tracing::warn!(
                    %why,
                    "this node holds the partner's volumes, so the partner cannot take over its \
                     own; this machine has not restarted since the previous start: the NVRAM kept \
                     every write; recovering from it"
                );
                self.serve_own_volumes(&own, false)?;
            } else {
                self.hand_over(&why)?;
            }
        } else if own.owner == me {
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

    /// Why this start must not recover from its own log, if it must not:
    /// the previous start stopped uncleanly while its mirror was in sync,
    /// with `durability = "mirror"`. It acknowledged writes once they were
    /// in its memory and in the partner's; a power loss took what was not
    /// persisted here, and the partner's mirror is the one complete copy.
    /// (Out of sync, every acknowledged write was persisted here first;
    /// with `persist`, always; after a clean stop, too.)
    pub(super) fn log_may_lack_acknowledged_writes(&self) -> Option<String> {
        let (_, partner) = self.me_and_partner();
        let previous = self.node.previous_start.as_ref()?;
        if previous.clean_stop
            || !previous.mirror_in_sync
            || self.node.config.durability == Durability::Persist
        {
            return None;
        }
        Some(format!(
            "the previous start (boot {:#x}) stopped uncleanly with its mirror in sync and \
             durability \"mirror\": its log may lack writes it acknowledged, which node \
             {partner}'s mirror holds",
            previous.boot
        ))
    }

    /// Whether the machine is in the same boot as when this node last
    /// served from its log (starts that handed over since do not count: they
    /// wrote nothing): a crash of the process then lost nothing written to
    /// the NVRAM mapping.
    pub(super) fn machine_did_not_restart(&self) -> bool {
        let host_boot = &self.node.environment.host_boot;
        self.node
            .previous_start
            .as_ref()
            .is_some_and(|previous| !host_boot.is_empty() && previous.log_host_boot == *host_boot)
    }

    /// Serve nothing, and ask the partner (in the mailbox) to take this
    /// node's volumes over from its mirror and give them back at once; the
    /// giveback then discards this node's log. The mailbox still vouches
    /// for the partner's mirror as the previous start left it (see
    /// `Node::open`): this start appends nothing and never resyncs its log
    /// over the mirror (mirroring stays off until the volumes come back).
    fn hand_over(&self, why: &str) -> Result<()> {
        assert!(
            self.node.mailbox.current().mirror_in_sync,
            "a handover relies on the partner's mirror being in sync"
        );
        tracing::error!(
            %why,
            "unclean stop: not recovering from this node's own log; asking the partner to take \
             over from its mirror and give back"
        );
        {
            let mut state = self.state.lock();
            state.role = Role::HandingOver;
            state.handing_over_because = Some(why.to_owned());
        }
        self.node.mailbox.update(|state| {
            state.state = Role::HandingOver.as_str().to_owned();
            state.asks_takeover = true;
        })
    }

    /// The operator's way out of a handover the partner cannot answer (it
    /// is down, or restarted too, so its mirror is not trusted): recover
    /// from this node's own log, losing the acknowledged writes only the
    /// partner's mirror had. Logged, and said in the reply.
    pub fn recover_forced(self: &Arc<Self>) -> Result<String> {
        let _transition = self.transition.lock();
        let (me, _) = self.me_and_partner();
        let (role, why) = {
            let state = self.state.lock();
            (state.role, state.handing_over_because.clone())
        };
        if role != Role::HandingOver {
            return Err(Refusal::NotHandingOver {
                role: role.as_str(),
            }
            .into());
        }
        let own = ownership::read(&self.node.config.aggregate_dir, me)?;
        let span = tracing::info_span!("forced_recovery", epoch = own.epoch);
        let _entered = span.enter();
        tracing::error!(
            why = why.as_deref().unwrap_or(""),
            "operator forced recovery from this node's own log: writes it acknowledged that only \
             the partner's mirror held are lost"
        );
        self.serve_own_volumes(&own, own.log_replayed)?;
        Ok(format!(
            "recovered node {me}'s volumes from its own log, as forced; writes the previous start \
             acknowledged that the log lacked are lost"
        ))
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
            state.handing_over_because = None;
        }
        self.node.mirror.set_enabled(true);
        let host_boot = self.node.environment.host_boot.clone();
        self.node.mailbox.update(|state| {
            state.state = Role::Serving.as_str().to_owned();
            state.asks_takeover = false;
            state.log_host_boot = host_boot;
        })?;
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
