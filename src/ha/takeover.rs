//! Takeover: the survivor fences the partner's volumes, indexes the
//! partner's mirror, persists the index and serves the volumes at once
//! (the steps are in the [`crate::ha`] module docs). The index it persists
//! is kept current until the replay ends.

use std::sync::Arc;
use std::time::Instant;

use crate::error::Refusal;
use crate::error::Result;
use crate::ha::index::{IndexEntry, TakeoverIndex};
use crate::ha::warm_index::{self, Finished};
use crate::ha::{HaNode, Holding, ReplayDriver, Role, TakeoverTimes};
use crate::storage::extents::Origin;
use crate::storage::mailbox::{self, MailboxState};
use crate::storage::ownership;
use crate::storage::volume::Volume;

impl HaNode {
    /// Take over the partner's volumes now (see the module docs).
    pub fn takeover(self: &Arc<Self>, force: bool, reason: &str) -> Result<String> {
        let _transition = self.transition.lock();
        self.node.check_not_failed()?;
        let (me, partner) = self.me_and_partner();
        let span = tracing::info_span!("takeover", partner, force);
        let _entered = span.enter();
        let started = Instant::now();
        {
            let state = self.state.lock();
            if state.holding.is_some() {
                return Err(Refusal::AlreadyHolding.into());
            }
            if state.role != Role::Serving {
                return Err(Refusal::NotServing {
                    role: state.role.as_str(),
                }
                .into());
            }
        }
        // A node that was stopped while its partner took its volumes over must
        // not take the partner's in turn (each would then own the other's).
        let own_fence = self.state.lock().own_fence.clone();
        if let Some(fence) = own_fence {
            if fence.check().is_err() {
                self.on_fenced();
                return Err(Refusal::OwnVolumesTakenOver.into());
            }
        }
        let aggregate = &self.node.config.aggregate_dir;
        let theirs = ownership::read(aggregate, partner)?;
        let partner_mailbox =
            mailbox::read(aggregate, partner)?.ok_or(Refusal::PartnerUnknown { partner })?;
        if partner_mailbox.half_bytes != self.node.config.nvram.half_size.0 {
            return Err(Refusal::HalfSizeMismatch {
                partner,
                theirs: partner_mailbox.half_bytes,
                ours: self.node.config.nvram.half_size.0,
            }
            .into());
        }
        let my_boot = self.node.mailbox.current().boot;
        let out_of_sync = |mailbox: &MailboxState| {
            if !mailbox.mirror_in_sync {
                return Some(format!(
                    "node {partner}'s mirror is out of sync ({}): a takeover would lose writes it acknowledged; \
                     `nvmirror takeover --force` does it anyway",
                    mailbox.out_of_sync_reason.as_deref().unwrap_or("no reason given")
                ));
            }
            // In sync with an earlier start of this node: a power loss since
            // may have taken mirrored bytes that were not yet persisted here.
            (mailbox.in_sync_with_boot != Some(my_boot)).then(|| {
                format!(
                    "node {partner}'s mirror was last in sync with an earlier start of this node (boot {:?}, \
                     now {my_boot}): it may lack writes node {partner} acknowledged; \
                     `nvmirror takeover --force` does it anyway",
                    mailbox.in_sync_with_boot
                )
            })
        };
        if !force {
            if let Some(why) = out_of_sync(&partner_mailbox) {
                return Err(Refusal::MirrorNotTrusted { why }.into());
            }
        }
        // Set by the last giveback and cleared when the partner discards its
        // log: until then, its log (and our mirror of it) holds only records
        // the volume files have, and newer blocks over them. Replaying it
        // again would put older blocks over newer ones; it stays to discard.
        let log_replayed = theirs.log_replayed;
        // 0. STONITH, unless the partner asked for this takeover (it serves
        // nothing while it hands over) or the volumes are ours already.
        let partner_asked =
            partner_mailbox.asks_takeover && partner_mailbox.state == Role::HandingOver.as_str();
        if theirs.owner == partner && !partner_asked {
            self.power_fence_partner(force, reason)?;
        }
        // 1. Fence.
        let ours = if theirs.owner == me {
            theirs
        } else if theirs.owner == partner {
            ownership::change_hands(
                aggregate,
                &theirs,
                me,
                force && !partner_mailbox.mirror_in_sync,
                log_replayed,
                reason,
            )?
        } else {
            return Err(Refusal::OwnedByOther {
                partner,
                owner: theirs.owner,
            }
            .into());
        };
        // 2. The mirror state after the fence is what counts.
        let after = mailbox::read(aggregate, partner)?.unwrap_or(partner_mailbox);
        if let Some(why) = out_of_sync(&after) {
            if !force {
                self.state.lock().aborted_takeover = Some(ours);
                return Err(Refusal::StoppedAfterFence { why }.into());
            }
            tracing::warn!(%why, "forced takeover of an out-of-sync mirror: writes the mirror lacks are lost");
        }
        // 3 and 4. Any failure from here on leaves the volumes fenced but not
        // served: recorded as a stopped takeover (durably: no index was saved),
        // which a giveback hands back with the partner's log intact.
        let indexed = (|| -> Result<(Vec<Arc<Volume>>, MailboxState, Finished)> {
            // 3. Nothing more lands in the mirror; make it durable (the warm
            // index starts its writeback every `ha.warm_index_writeback_ms`: little is
            // left to write back).
            self.node.shutdown_receiver();
            self.node.region.persist(
                self.node.region.mirror().offset,
                self.node.region.mirror().len,
            )?;
            // 4. The index: the warm one, checked against the mirror, and
            // the tail since its last pass (or all of the mirror, if it
            // cannot be used).
            let (volumes, partner_mailbox) = self.open_partner_volumes(&ours)?;
            let warm = std::mem::take(&mut *self.warm_index.lock());
            {
                let mut progress = self.warm_progress.lock();
                (progress.records, progress.bytes) = (0, 0);
            }
            let mirror = self.mirror_view();
            let finished = if log_replayed {
                tracing::warn!(
                    "the mirror holds the log the last giveback replayed already: nothing to replay"
                );
                warm_index::check_mirror_header(&mirror, partner)?;
                Finished::nothing()
            } else {
                let finished = warm.finish(&mirror, partner, &volumes)?;
                if self.options.verify_warm_index {
                    warm_index::assert_same_as_a_full_scan(&mirror, &volumes);
                }
                finished
            };
            self.save_index(partner, ours.epoch, &volumes)?;
            Ok((volumes, partner_mailbox, finished))
        })();
        let (volumes, partner_mailbox, finished) = match indexed {
            Ok(indexed) => indexed,
            Err(error) => {
                tracing::error!(%error, "takeover stopped after fencing");
                self.state.lock().aborted_takeover = Some(ours);
                self.node.bind_receiver()?;
                return Err(Refusal::StoppedAfterFence {
                    why: error.to_string(),
                }
                .into());
            }
        };
        // 5. Serve.
        self.node.attach_volumes(volumes.clone());
        self.start_replay_accounting(&volumes);
        let resume_ms = started.elapsed().as_millis() as u64;
        let forced = ours.forced;
        {
            let mut state = self.state.lock();
            // Checked under the transition lock at the start; nothing else
            // sets it.
            assert!(state.holding.is_none(), "a second takeover of the partner");
            assert_eq!(ours.owner, me, "serving volumes fenced to another node");
            state.holding = Some(Holding {
                ownership: ours.clone(),
                volumes,
            });
            state.aborted_takeover = None;
            state.refusal = None;
            state.last_takeover = Some(TakeoverTimes {
                at_unix_ms: mailbox::now_unix_ms(),
                started,
                resume_ms,
                first_read_ms: None,
                replay_ms: None,
                forced,
                tail_records: finished.tail.records,
                tail_bytes: finished.tail.bytes,
                cold: finished.cold,
            });
        }
        self.serve_partner_address(&partner_mailbox);
        self.run_hook("takeover", &partner_mailbox.nbd_listen);
        // 6. Replay in the background (or when the caller steps it).
        if self.options.replay == ReplayDriver::Thread {
            let thread = self.spawn_replay();
            *self.replay_thread.lock() = Some(thread);
        }
        let records = finished.records;
        let message = format!(
            "took over node {partner}'s volumes at epoch {} ({records} mirrored records indexed, {} of them scanned at takeover{}; serving after {resume_ms} ms; replaying in the background)",
            ours.epoch,
            finished.tail.records,
            if finished.cold { ", the warm index could not be used" } else { "" },
        );
        tracing::warn!(
            records,
            tail_records = finished.tail.records,
            tail_bytes = finished.tail.bytes,
            cold = finished.cold,
            resume_ms,
            epoch = ours.epoch,
            "takeover done"
        );
        Ok(message)
    }

    /// Persist the index of the partner's volumes still to replay.
    pub(super) fn save_index(
        &self,
        partner: u32,
        epoch: u64,
        volumes: &[Arc<Volume>],
    ) -> Result<()> {
        // The index leaves out mirror extents that local writes replaced; those
        // writes must be durable first, or a crash would lose both.
        let newest = self.node.log.last_lsn();
        if newest > 0 {
            self.node.log.persist(newest)?;
        }
        let entries = volumes
            .iter()
            .flat_map(|volume| {
                volume
                    .extents
                    .lock()
                    .all_pieces()
                    .into_iter()
                    .filter(|piece| piece.origin == Origin::Mirror)
                    .map(|piece| IndexEntry {
                        volume_id: volume.id,
                        start: piece.start,
                        len: piece.len,
                        lsn: piece.lsn,
                        source: piece.source,
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        TakeoverIndex {
            partner,
            epoch,
            entries,
        }
        .save(&self.node.config.data_dir)
    }

    pub(super) fn save_holding_index(&self, holding: &Holding) -> Result<()> {
        self.save_index(
            holding.ownership.volumes_of,
            holding.ownership.epoch,
            &holding.volumes,
        )
    }

    /// Before a consistency point frees a half: if a replay is pending, the
    /// persisted index must not name mirror extents that writes in that half
    /// replaced.
    pub(super) fn save_index_if_holding(&self) -> Result<()> {
        if !self.replay_pending() {
            return Ok(());
        }
        let holding = self.state.lock().holding.clone();
        match holding {
            Some(holding) => self.save_holding_index(&holding),
            None => Ok(()),
        }
    }
}
