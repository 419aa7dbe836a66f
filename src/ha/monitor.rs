//! The HA monitor: the mailbox heartbeat, failure detection (the table in
//! the [`crate::ha`] module docs), automatic takeover and giveback, and
//! noticing that this node was fenced or got its volumes back.

use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::ha::{HaNode, Role};
use crate::mirror::Link;
use crate::storage::mailbox::{self, MailboxState};
use crate::storage::ownership;

impl HaNode {
    /// Cut the interconnect for `duration` (drills): close both sessions and
    /// keep them closed.
    pub fn cut_interconnect(&self, duration: Duration) {
        tracing::warn!(
            duration_ms = duration.as_millis() as u64,
            "interconnect cut on request"
        );
        self.state.lock().cut_until = Some(self.node.environment.clock.now() + duration);
        self.node.mirror.cut(duration);
        self.node.shutdown_receiver();
    }

    /// The HA monitor: heartbeat, failure detection, automatic takeover and
    /// giveback, noticing fencing and the return of our volumes.
    pub fn run_monitor(self: &Arc<Self>) {
        let interval = Duration::from_millis(self.node.config.ha.mailbox_interval_ms);
        while !self.node.is_stopping() {
            if let Err(error) = self.monitor_tick() {
                tracing::warn!(%error, "HA monitor");
            }
            let (flag, condvar) = &self.wake;
            let mut woken = flag.lock();
            if !*woken {
                condvar.wait_for(&mut woken, interval);
            }
            *woken = false;
        }
    }

    /// One round of the HA monitor.
    pub fn monitor_tick(self: &Arc<Self>) -> Result<()> {
        let (me, partner) = self.me_and_partner();
        let aggregate = &self.node.config.aggregate_dir;
        if let Some(reason) = self.node.failure() {
            self.withdraw(&reason);
            return Ok(());
        }
        let role = self.role();
        self.heartbeat_in_the_mailbox(role)?;
        // Our own volumes: fenced, or given back?
        match role {
            Role::Serving => {
                let fence = self.state.lock().own_fence.clone();
                if let Some(fence) = fence {
                    if fence.check().is_err() {
                        self.on_fenced();
                    }
                }
            }
            Role::WaitingForGiveback | Role::Fenced => {
                let own = ownership::read(aggregate, me)?;
                let old_epoch = self.state.lock().own_fence.as_ref().map(|f| f.epoch());
                if own.owner == me && old_epoch.map_or(true, |epoch| own.epoch > epoch) {
                    let _transition = self.transition.lock();
                    let span = tracing::info_span!("giveback_return", epoch = own.epoch);
                    let _entered = span.enter();
                    tracing::warn!(
                        epoch = own.epoch,
                        log_replayed = own.log_replayed,
                        "volumes given back"
                    );
                    self.serve_own_volumes(&own, own.log_replayed)?;
                }
            }
            Role::HandingOver => {
                let own = ownership::read(aggregate, me)?;
                if own.owner != me {
                    tracing::warn!(
                        owner = own.owner,
                        epoch = own.epoch,
                        "the partner took over as asked: waiting for the giveback"
                    );
                    self.state.lock().role = Role::WaitingForGiveback;
                    self.set_mailbox_state(Role::WaitingForGiveback);
                }
            }
            Role::Starting => {}
        }
        // The partner: its mailbox heartbeat and the interconnect.
        let now = self.node.environment.clock.now();
        let partner_mailbox = mailbox::read(aggregate, partner).ok().flatten();
        let interconnect_up = self.node.link() != Link::Down || self.node.receiver_connected();
        let (interconnect_silent, mailbox_stale, cut_active) = {
            let mut state = self.state.lock();
            if let Some(mailbox) = &partner_mailbox {
                if state.partner_seq != Some(mailbox.heartbeat_seq) {
                    state.partner_seq = Some(mailbox.heartbeat_seq);
                    state.partner_seen_at = now;
                }
            }
            state.partner_mailbox = partner_mailbox.clone();
            if interconnect_up {
                state.interconnect_alive_at = now;
            }
            let cut_active = state.cut_until.is_some_and(|until| now < until);
            if state.cut_until.is_some() && !cut_active {
                state.cut_until = None;
                if state.holding.is_none() {
                    drop(state);
                    self.node.bind_receiver()?;
                    state = self.state.lock();
                }
            }
            (
                now.duration_since(state.interconnect_alive_at),
                now.duration_since(state.partner_seen_at),
                cut_active,
            )
        };
        let partner_down = interconnect_silent
            > Duration::from_millis(self.node.config.interconnect.heartbeat_timeout_ms)
            && mailbox_stale > Duration::from_millis(self.node.config.ha.mailbox_timeout_ms);
        // The partner restarted after an unclean stop and asks for its
        // volumes to be taken over from our mirror (see `ha::boot`): it
        // serves nothing meanwhile, so this is no failover decision, and
        // `auto_takeover` does not govern it.
        let asks_takeover = partner_mailbox
            .as_ref()
            .is_some_and(|m| m.asks_takeover && m.state == Role::HandingOver.as_str());
        if asks_takeover && !self.holding_partner() && self.role() == Role::Serving {
            self.monitor_takeover(
                "asked by the partner after an unclean stop",
                "takeover asked by the partner",
            );
        }
        if self.role() == Role::HandingOver {
            self.recover_if_the_partner_cannot_answer(partner_down, partner_mailbox.as_ref())?;
        }
        let holding = self.holding_partner();
        if partner_down
            && !holding
            && !cut_active
            && self.node.config.ha.auto_takeover
            && self.role() == Role::Serving
        {
            let theirs = ownership::read(aggregate, partner)?;
            if theirs.owner == partner && partner_mailbox.is_some() {
                self.monitor_takeover(
                    "partner down: interconnect silent and mailbox stale",
                    "automatic takeover",
                );
            }
        } else if !partner_down {
            self.state.lock().refusal = None;
        }
        // Automatic giveback, when configured: of volumes served here, or
        // fenced by a takeover that stopped before serving them.
        // A partner that asked for the takeover gets its volumes back as
        // soon as the replay is done, whatever `auto_giveback_delay_ms` says.
        let aborted = self.state.lock().aborted_takeover.is_some();
        let asked_back = partner_mailbox.as_ref().is_some_and(|m| m.asks_takeover);
        let delay_ms = if asked_back {
            Some(0)
        } else {
            self.node.config.ha.auto_giveback_delay_ms
        };
        if let (true, Some(delay_ms)) = (holding || aborted, delay_ms) {
            let waiting = partner_mailbox.as_ref().is_some_and(|m| {
                m.state == Role::WaitingForGiveback.as_str() || m.state == Role::Fenced.as_str()
            }) && mailbox_stale
                < Duration::from_millis(self.node.config.ha.mailbox_timeout_ms);
            let since = {
                let mut state = self.state.lock();
                if waiting {
                    *state.partner_waiting_since.get_or_insert(now)
                } else {
                    state.partner_waiting_since = None;
                    now
                }
            };
            if waiting
                && now.duration_since(since) >= Duration::from_millis(delay_ms)
                && !self.replay_pending()
            {
                match self.giveback() {
                    Ok(message) => tracing::warn!(%message, "automatic giveback"),
                    Err(error) => tracing::error!(%error, "automatic giveback failed"),
                }
                self.state.lock().partner_waiting_since = None;
            }
        }
        Ok(())
    }

    /// A node handing over whose partner cannot take over (it is down, or
    /// it restarted since the mirror was in sync, so it would not trust
    /// that mirror) recovers from its own log if the machine has not
    /// restarted since the previous start: the process crashed, and the
    /// NVRAM mapping kept every byte written to it. After a machine restart
    /// (a power loss) it keeps waiting, and says so; the operator may force
    /// it (`nvmirror recover --force`).
    fn recover_if_the_partner_cannot_answer(
        self: &Arc<Self>,
        partner_down: bool,
        partner_mailbox: Option<&MailboxState>,
    ) -> Result<()> {
        let (me, partner) = self.me_and_partner();
        let previous = self
            .node
            .previous_start
            .clone()
            .expect("a handover follows an earlier start");
        let mirror_start = previous.in_sync_with_boot;
        let partner_restarted = partner_mailbox.map_or(true, |m| Some(m.boot) != mirror_start);
        if !partner_down && !partner_restarted && !self.holding_partner() {
            return Ok(());
        }
        let _transition = self.transition.lock();
        if self.role() != Role::HandingOver {
            return Ok(());
        }
        if !self.machine_did_not_restart() {
            let why = format!(
                "{}; node {partner} cannot take over ({}), and this machine restarted since (a \
                 power loss may have taken what was not persisted): waiting for node {partner}",
                self.log_may_lack_acknowledged_writes().unwrap_or_default(),
                if partner_down {
                    "it is down"
                } else {
                    "it restarted since its mirror was in sync"
                }
            );
            self.state.lock().handing_over_because = Some(why);
            return Ok(());
        }
        let own = ownership::read(&self.node.config.aggregate_dir, me)?;
        if own.owner != me {
            return Ok(());
        }
        let span = tracing::info_span!("recovery_without_partner", epoch = own.epoch);
        let _entered = span.enter();
        tracing::warn!(
            partner_down,
            partner_restarted,
            "the partner cannot take over, and this machine has not restarted since the previous \
             start: the NVRAM kept every write; recovering from it"
        );
        self.serve_own_volumes(&own, own.log_replayed)
    }

    /// A takeover the monitor decided on (`what`, for the log): a refusal
    /// is kept for the status and logged once, not at every round.
    fn monitor_takeover(self: &Arc<Self>, reason: &str, what: &str) {
        match self.takeover(false, reason) {
            Ok(message) => tracing::warn!(%message, "{what}"),
            Err(error) => {
                let refusal = error.to_string();
                let mut state = self.state.lock();
                if state.refusal.as_deref() != Some(refusal.as_str()) {
                    tracing::error!(reason = %refusal, "{what} refused");
                }
                state.refusal = Some(refusal);
            }
        }
    }

    /// Raise the mailbox heartbeat. A node that cannot write its mailbox
    /// (it lost the shared storage) for longer than the partner's failure
    /// detector waits fails: it withdraws from the pair at the next round,
    /// so that the partner, which still reaches the storage, takes over.
    fn heartbeat_in_the_mailbox(&self, role: Role) -> Result<()> {
        let written = self.node.mailbox.update(|state| {
            state.heartbeat_seq += 1;
            state.state = role.as_str().to_owned();
        });
        let now = self.node.environment.clock.now();
        let mut state = self.state.lock();
        let Err(error) = written else {
            state.mailbox_failing_since = None;
            return Ok(());
        };
        let since = *state.mailbox_failing_since.get_or_insert(now);
        drop(state);
        let failing = now.duration_since(since);
        if failing > Duration::from_millis(self.node.config.ha.mailbox_timeout_ms) {
            self.node.fail(format!(
                "its mailbox {} could not be written for {} ms (is the shared storage gone?): {error}",
                self.node.mailbox.path().display(),
                failing.as_millis()
            ));
        }
        Err(error)
    }

    /// A failed node leaves the pair: it stops serving (every volume's fence
    /// trips: no read may be served from files the partner is about to
    /// write), closes both interconnect sessions and raises its mailbox
    /// heartbeat no more, so that its partner sees it down and takes over
    /// (from its mirror, when that is in sync) instead of waiting on a node
    /// that acknowledges nothing. A restart brings it back.
    fn withdraw(&self, reason: &str) {
        let mut state = self.state.lock();
        if state.withdrawn {
            return;
        }
        state.withdrawn = true;
        drop(state);
        tracing::error!(
            %reason,
            "this node failed: it leaves the pair (interconnect closed, mailbox heartbeat stopped) \
             so that the partner takes over; restart it to bring it back"
        );
        for volume in self.node.volumes() {
            volume.fence.trip();
        }
        self.node.mirror.set_enabled(false);
        self.node.shutdown_receiver();
    }
}
