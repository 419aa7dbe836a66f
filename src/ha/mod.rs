//! High availability: who serves which volumes, failure detection,
//! takeover from the partner's mirror, the background replay, giveback.
//!
//! The files follow the life of a pair: [`boot`] (what a starting node
//! serves), [`monitor`] (heartbeats, failure detection, automatic takeover
//! and giveback), [`warm_index`] (the partner's mirror indexed while it is
//! healthy), [`takeover`] with its persisted [`index`], [`replay`],
//! [`giveback`], and the operator's view in [`status`].
//!
//! # Failure detection
//!
//! Two signals about the partner: the interconnect (our session into its
//! mirror, or its session into ours) and its mailbox heartbeat on shared
//! storage (a sequence number we watch change by our own clock).
//!
//! | interconnect | mailbox | meaning                    | action                                    |
//! |--------------|---------|----------------------------|-------------------------------------------|
//! | up           | any     | partner alive              | none                                      |
//! | silent       | alive   | the interconnect failed    | no takeover; mirror out of sync; status   |
//! | silent       | stale   | partner down               | takeover, unless its mirror is out of sync|
//!
//! # Takeover (survivor S takes partner P's volumes)
//!
//! 0. STONITH, when `ha.fence_command` is set ([`stonith`]): power P off,
//!    and go no further unless the command says it is off. Skipped when P
//!    asked for the takeover itself (it hands over after an unclean stop
//!    and serves nothing) and when the volumes are ours already.
//! 1. Fence: raise the epoch of P's volumes in the owner file. From then on
//!    P neither writes their files nor acknowledges a write to them (at its
//!    next check: a P stalled between its check and its write is what the
//!    STONITH step is for).
//! 2. Read P's mailbox *after* the fence: if it says "out of sync", P may
//!    have acknowledged writes our mirror lacks; refuse (unless forced).
//!    Because P marks "out of sync" before its fence check and its
//!    acknowledgement, reading after the fence closes the race.
//! 3. Stop the receiver (nothing more lands in the mirror), make the mirror
//!    durable.
//! 4. Build the metadata index (P's volume ranges → records in the mirror
//!    past P's flushed LSN): the warm index, checked against the mirror,
//!    plus a scan of the tail since its last pass (or of the whole mirror,
//!    if the check fails); persist it in S's data directory.
//! 5. Serve P's volumes at once: reads from the index, else from the files;
//!    writes through S's own log. Bind P's NBD address if possible, run the
//!    hook.
//! 6. Replay the index onto P's files in the background, never over data
//!    written since the takeover (consistency points and the replay write a
//!    volume's file one at a time, each from a fresh snapshot).
//!
//! # Giveback
//!
//! S finishes the replay, closes the write gate of P's volumes, flushes
//! everything, hands ownership back (epoch up, "log replayed"), stops
//! serving them. P, waiting, sees its ownership return, discards its own
//! log (its records reached the volumes through S's replay), and serves.

pub mod boot;
pub mod giveback;
mod hook;
pub mod index;
pub mod monitor;
pub mod replay;
pub mod status;
mod stonith;
pub mod takeover;
pub mod warm_index;

use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::node::{Node, NodeHooks};
use crate::storage::mailbox::MailboxState;
use crate::storage::ownership::{Fence, Ownership};
use crate::storage::volume::Volume;

/// What this node does with its own volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Role {
    #[serde(rename = "starting")]
    Starting,
    /// Serving its own volumes.
    #[serde(rename = "serving")]
    Serving,
    /// Its volumes were taken over; it waits for them to be given back.
    #[serde(rename = "waiting for giveback")]
    WaitingForGiveback,
    /// It was serving, and found that the partner took its volumes.
    #[serde(rename = "fenced")]
    Fenced,
    /// It restarted after an unclean stop with its mirror in sync: its log
    /// may lack writes it acknowledged, which the partner's mirror has. It
    /// serves nothing and asks the partner to take over and give back.
    #[serde(rename = "handing over")]
    HandingOver,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Starting => "starting",
            Role::Serving => "serving",
            Role::WaitingForGiveback => "waiting for giveback",
            Role::Fenced => "fenced",
            Role::HandingOver => "handing over",
        }
    }
}

/// How clients reach the partner's volumes after a takeover: the front end
/// serves them on the partner's own address too, when this host can have
/// it (same host, or a floating address the hook moved here).
pub trait PartnerService: Send + Sync + Debug {
    fn serve_partner(&self, node: &Arc<Node>, nbd_addr: SocketAddr);
    fn stop_serving_partner(&self);
}

/// How long discarding the log waits for writes between their reservation
/// and their append.
const WRITERS_WAIT: Duration = Duration::from_secs(5);

/// Who runs the background replay after a takeover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayDriver {
    /// A thread of its own, started by the takeover (or at boot, when the
    /// node resumes holding the partner's volumes).
    Thread,
    /// The caller, one batch at a time ([`HaNode::replay_step`]).
    Caller,
}

#[derive(Debug, Clone)]
pub struct HaOptions {
    pub replay: ReplayDriver,
    pub partner_service: Option<Arc<dyn PartnerService>>,
    /// At every takeover, also scan the whole mirror the way recovery does
    /// and assert that the warm index's maps are the same (a full scan's
    /// cost: for the simulation and tests).
    pub verify_warm_index: bool,
}

/// The partner's volumes, held after a takeover.
#[derive(Debug, Clone)]
struct Holding {
    ownership: Ownership,
    volumes: Vec<Arc<Volume>>,
}

/// Timings of the last takeover, for the report and the status.
#[derive(Debug, Clone, Copy)]
struct TakeoverTimes {
    at_unix_ms: u64,
    started: Instant,
    /// Until the partner's volumes were served.
    resume_ms: u64,
    /// Until the first read of any volume was served after it.
    first_read_ms: Option<u64>,
    replay_ms: Option<u64>,
    forced: bool,
    /// What the takeover scanned itself: the warm index's lag.
    tail_records: u64,
    tail_bytes: u64,
    /// The warm index could not be used: the whole mirror was scanned.
    cold: bool,
}

#[derive(Debug)]
struct HaState {
    role: Role,
    own_fence: Option<Arc<Fence>>,
    holding: Option<Holding>,
    /// A takeover that fenced the partner and then stopped (its mirror was
    /// out of sync, corrupt, or unreadable): the ownership is ours, the
    /// volumes are not served; a giveback returns them with their log.
    aborted_takeover: Option<Ownership>,
    partner_seq: Option<u64>,
    partner_seen_at: Instant,
    partner_mailbox: Option<MailboxState>,
    interconnect_alive_at: Instant,
    refusal: Option<String>,
    last_takeover: Option<TakeoverTimes>,
    cut_until: Option<Instant>,
    /// When the partner was first seen waiting for giveback (auto giveback).
    partner_waiting_since: Option<Instant>,
    /// With [`Role::HandingOver`]: why this start does not trust its log.
    handing_over_because: Option<String>,
    /// Since when the mailbox cannot be written.
    mailbox_failing_since: Option<Instant>,
    /// The node failed and left the pair (see `monitor`).
    withdrawn: bool,
    /// When `ha.fence_command` last failed, and how (see `stonith`).
    fence_command_failed: Option<(Instant, String)>,
}

/// A node of the pair: the storage node, and who serves which volumes.
#[derive(Debug)]
pub struct HaNode {
    pub node: Arc<Node>,
    options: HaOptions,
    state: Mutex<HaState>,
    wake: (Mutex<bool>, Condvar),
    replay_total_bytes: AtomicU64,
    replay_done_bytes: AtomicU64,
    replay_active: AtomicBool,
    replay_thread: Mutex<Option<JoinHandle<()>>>,
    /// Serializes takeover, giveback and returns.
    transition: Mutex<()>,
    /// The partner's mirror, indexed while the partner is healthy; taken by
    /// a takeover. Lock order: `transition`, then this, then `state`
    /// (never `state` while waiting for this).
    warm_index: Mutex<warm_index::WarmIndex>,
    warm_progress: Mutex<warm_index::WarmProgress>,
}

impl HaNode {
    /// Put HA over `node` and decide what it serves (see [`boot`]).
    pub fn start(node: Arc<Node>, options: HaOptions) -> Result<Arc<HaNode>> {
        let now = node.environment.clock.now();
        let ha = Arc::new(HaNode {
            node,
            options,
            state: Mutex::new(HaState {
                role: Role::Starting,
                own_fence: None,
                holding: None,
                aborted_takeover: None,
                partner_seq: None,
                partner_seen_at: now,
                partner_mailbox: None,
                interconnect_alive_at: now,
                refusal: None,
                fence_command_failed: None,
                last_takeover: None,
                cut_until: None,
                partner_waiting_since: None,
                handing_over_because: None,
                mailbox_failing_since: None,
                withdrawn: false,
            }),
            wake: (Mutex::new(false), Condvar::new()),
            replay_total_bytes: AtomicU64::new(0),
            replay_done_bytes: AtomicU64::new(0),
            replay_active: AtomicBool::new(false),
            replay_thread: Mutex::new(None),
            transition: Mutex::new(()),
            warm_index: Mutex::new(warm_index::WarmIndex::default()),
            warm_progress: Mutex::new(warm_index::WarmProgress::default()),
        });
        let hooks: Arc<dyn NodeHooks> = ha.clone();
        ha.node.set_hooks(Arc::downgrade(&hooks));
        ha.boot()?;
        if ha.options.replay == ReplayDriver::Thread && ha.replay_pending() {
            let thread = ha.spawn_replay();
            *ha.replay_thread.lock() = Some(thread);
        }
        Ok(ha)
    }

    pub fn role(&self) -> Role {
        self.state.lock().role
    }

    pub fn holding_partner(&self) -> bool {
        self.state.lock().holding.is_some()
    }

    pub fn replay_pending(&self) -> bool {
        self.replay_active.load(Ordering::Acquire)
    }

    /// Wake the monitor for a round now.
    pub fn wake(&self) {
        let (flag, condvar) = &self.wake;
        *flag.lock() = true;
        condvar.notify_all();
    }

    /// Before a clean stop: a final consistency point of whatever this
    /// node serves.
    pub fn final_consistency_point(&self) -> Result<()> {
        let span = tracing::info_span!("node_shutdown", node_id = self.node.config.node_id);
        let _entered = span.enter();
        if self.role() == Role::Serving || self.holding_partner() {
            self.node.consistency_point_all()
        } else {
            Ok(())
        }
    }

    /// After a clean stop (every thread joined): persist what is left in
    /// the log and say so in the mailbox, so that the next start recovers
    /// from its own log without asking the partner's mirror.
    pub fn record_clean_stop(&self) -> Result<()> {
        assert!(
            self.node.is_stopping(),
            "a clean stop is recorded after the stop"
        );
        let last = self.node.log.last_lsn();
        if last > 0 {
            self.node.log.persist(last)?;
        }
        self.node.mailbox.update(|state| state.clean_stop = true)
    }

    /// Tell the node's loops and the monitor to end (the caller joins
    /// them, then calls [`HaNode::release`]).
    pub fn signal_stop(&self) {
        self.node.stop();
        self.wake();
    }

    /// Once the monitor has ended (no takeover can start any more): let the
    /// partner's address go and join the replay.
    pub fn release(&self) {
        assert!(self.node.is_stopping(), "release before signal_stop");
        self.stop_serving_partner_address();
        if let Some(thread) = self.replay_thread.lock().take() {
            let _ = thread.join();
        }
    }

    fn me_and_partner(&self) -> (u32, u32) {
        (self.node.config.node_id, self.node.config.partner_id())
    }

    /// This node's fence on the volume set `ownership` gives it.
    fn fence_for(&self, ownership: &Ownership) -> Arc<Fence> {
        let config = &self.node.config;
        Arc::new(Fence::new(&config.aggregate_dir, config.node_id, ownership))
    }

    /// Open node `set`'s volumes (`(name, size)` in index order) behind
    /// `fence`.
    fn open_volume_set<'a>(
        &self,
        set: u32,
        volumes: impl Iterator<Item = (&'a str, u64)>,
        fence: &Arc<Fence>,
    ) -> Result<Vec<Arc<Volume>>> {
        let config = &self.node.config;
        volumes
            .enumerate()
            .map(|(index, (name, size_bytes))| {
                Volume::open(
                    self.node.environment.disks.as_ref(),
                    &config.aggregate_dir,
                    set,
                    index,
                    name,
                    size_bytes,
                    fence.clone(),
                )
                .map(Arc::new)
            })
            .collect()
    }

    /// Discard the log once no write holds log space it has not appended
    /// (bounded). The writers' volumes are fenced first, so that a writer
    /// that gets space after the discard is turned away at its append.
    fn discard_log_once_writers_are_gone(&self) -> Result<()> {
        let deadline = Instant::now() + WRITERS_WAIT;
        loop {
            match self.node.log.discard_all() {
                Ok(_) => return Ok(()),
                Err(nvlog::Error::ReservationsOutstanding { reserved_bytes }) => {
                    if Instant::now() >= deadline {
                        return Err(Error::WritersStuck {
                            reserved_bytes,
                            waited: WRITERS_WAIT,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Serve the partner's volumes on its own NBD address too, through the
    /// front end, if there is one.
    fn serve_partner_address(&self, partner_mailbox: &MailboxState) {
        let Some(service) = &self.options.partner_service else {
            return;
        };
        match partner_mailbox.nbd_listen.parse::<SocketAddr>() {
            Ok(addr) => service.serve_partner(&self.node, addr),
            Err(error) => tracing::warn!(
                nbd_listen = %partner_mailbox.nbd_listen,
                %error,
                "the partner's mailbox names no NBD address; its volumes are served on ours"
            ),
        }
    }

    fn stop_serving_partner_address(&self) {
        if let Some(service) = &self.options.partner_service {
            service.stop_serving_partner();
        }
    }

    fn set_mailbox_state(&self, role: Role) {
        if let Err(error) = self
            .node
            .mailbox
            .update(|state| state.state = role.as_str().to_owned())
        {
            tracing::error!(%error, "cannot update the mailbox");
        }
    }

    /// The fence tripped under us: stop serving our own volumes.
    fn on_fenced(&self) {
        let mut state = self.state.lock();
        if state.role != Role::Serving {
            return;
        }
        state.role = Role::Fenced;
        drop(state);
        tracing::error!("this node's volumes were taken over: it stops serving and writing them, and waits for giveback");
        self.node.mirror.set_enabled(false);
        self.set_mailbox_state(Role::Fenced);
    }

    /// Whether consistency points must leave the log alone (it belongs to
    /// volumes this node no longer owns).
    fn log_is_stale(&self) -> bool {
        let state = self.state.lock();
        // Handing over, the log holds this node's own records, which no
        // consistency point may write (the volumes wait for the partner's
        // mirror) nor free, even while it also holds the partner's volumes.
        state.role == Role::HandingOver
            || matches!(
                state.role,
                Role::WaitingForGiveback | Role::Fenced | Role::Starting
            ) && state.holding.is_none()
    }
}

impl NodeHooks for HaNode {
    fn log_is_stale(&self) -> bool {
        HaNode::log_is_stale(self)
    }

    fn before_half_freed(&self) -> Result<()> {
        self.save_index_if_holding()
    }

    fn fenced(&self) {
        self.on_fenced()
    }

    /// The first read after a takeover ends the outage.
    fn read_served(&self) {
        let mut state = self.state.lock();
        if let Some(times) = state.last_takeover.as_mut() {
            if times.first_read_ms.is_none() {
                times.first_read_ms = Some(times.started.elapsed().as_millis() as u64);
            }
        }
    }
}
