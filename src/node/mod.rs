//! The storage node's data path: its NVRAM, log, volumes and mirror.
//!
//! - [`write`](mod@write): the write path, in its three phases (suspendable, modify,
//!   wait);
//! - [`read`]: the read path;
//! - [`consistency_point`]: consistency points, which move a log half's data to
//!   the volume files and free the half;
//! - [`recovery`]: putting the log's records back after a restart.
//!
//! Who serves which volumes (takeover, replay, giveback) is decided above,
//! in [`crate::ha`]; the node tells it what it needs through [`NodeHooks`]
//! and never calls into it.

pub mod consistency_point;
pub mod read;
pub mod recovery;
pub mod write;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver as EventReceiver, Sender};
use interconnect::ControlEvent;
use nvlog::{Log, Region};
use parking_lot::{Condvar, Mutex, RwLock};

use crate::clock::SharedClock;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::Histogram;
use crate::mirror::transport::{Interconnect, MirrorListener};
use crate::mirror::{Link, Mirror, Partner};
use crate::storage::disk::Disks;
use crate::storage::mailbox::{Mailbox, MailboxState, VolumeInfo, MAILBOX_FORMAT_VERSION};
use crate::storage::volume::Volume;
use crate::sys::area_memory;

pub use write::WhenFull;

/// What a node runs on: where time comes from, where volume data lives,
/// how the partner is reached, and which start this is.
#[derive(Debug, Clone)]
pub struct Environment {
    pub clock: SharedClock,
    pub disks: Arc<dyn Disks>,
    pub interconnect: Arc<dyn Interconnect>,
    /// This start's identity, published in the mailbox: the partner names
    /// it when it declares its mirror in sync, and a takeover trusts only a
    /// mirror in sync with the survivor's current start. It must never
    /// repeat an earlier start's, even when the mailbox that recorded that
    /// one is lost: [`random_boot_id`], not a counter.
    pub boot: u64,
    /// The identity of the machine's current boot (Linux's
    /// `/proc/sys/kernel/random/boot_id`; empty when unknown). The same as
    /// when this node last served from its log (the mailbox's
    /// `log_host_boot`): the machine did not restart since, so a crash of
    /// the process lost nothing written to the NVRAM mapping (the page
    /// cache, or the CPU caches of a DAX device, kept it).
    pub host_boot: String,
}

/// The machine's boot identity (empty, which never matches, if Linux does
/// not say).
pub fn read_host_boot() -> String {
    match std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        Ok(text) => text.trim().to_owned(),
        Err(error) => {
            tracing::warn!(%error, "cannot read the machine's boot id: every unclean stop counts as a power loss");
            String::new()
        }
    }
}

/// A boot identity no earlier start has had (64 random bits).
pub fn random_boot_id() -> u64 {
    rand::random::<u64>().max(1)
}

/// What the node asks of the layer that decides who serves what (HA), at
/// the points of the data path where that matters. Every method has the
/// answer of a node that serves only its own volumes.
pub trait NodeHooks: Send + Sync {
    /// Whether consistency points must leave the log alone: it belongs to
    /// volumes this node no longer owns.
    fn log_is_stale(&self) -> bool {
        false
    }
    /// Before a consistency point frees a log half (and with it the only
    /// record outside the files of the writes in it).
    fn before_half_freed(&self) -> Result<()> {
        Ok(())
    }
    /// A consistency point found this node fenced off its volumes.
    fn fenced(&self) {}
    /// A read was served.
    fn read_served(&self) {}
}

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub consistency_points: AtomicU64,
    pub consistency_point_us_total: AtomicU64,
    pub acks_mirrored: AtomicU64,
    pub acks_persisted: AtomicU64,
    pub write_errors: AtomicU64,
}

/// What wakes the consistency-point thread.
#[derive(Debug, Default)]
struct CpSignal {
    kicked: bool,
    stopping: bool,
}

/// A storage node: NVRAM, log, the volumes it serves, its mirror.
pub struct Node {
    pub config: Config,
    pub region: Arc<Region>,
    pub log: Log,
    /// The volumes this node serves: its own, and its partner's after a
    /// takeover.
    volumes: RwLock<Vec<Arc<Volume>>>,
    pub mirror: Mirror,
    pub mailbox: Arc<Mailbox>,
    /// The mailbox as the previous start left it (`None` for a first
    /// start): how that start stopped, and what it said of its mirror.
    pub previous_start: Option<MailboxState>,
    pub stats: Stats,
    /// Write latency in microseconds, for metrics.
    pub write_latency_us: Arc<Histogram>,
    pub environment: Environment,
    hooks: OnceLock<Weak<dyn NodeHooks>>,
    cp_signal: Mutex<CpSignal>,
    /// One consistency point at a time: the thread's, or one a giveback, a
    /// recovery or a shutdown asks for (racing for the same half would
    /// fail, and a failed consistency point fails the node).
    cp_lock: Mutex<()>,
    cp_wake: Condvar,
    /// Set when durability can no longer be promised (a failed fsync or
    /// msync); every later write fails.
    failed: Mutex<Option<String>>,
    stopping: AtomicBool,
    /// Where the partner mirrors its log into ours; down while this node
    /// replays that mirror after a takeover.
    receiver: Mutex<Option<Box<dyn MirrorListener>>>,
    events: Sender<ControlEvent>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.config.node_id)
            .field("volumes", &self.volumes.read().len())
            .field("link", &self.mirror.link())
            .field("failed", &*self.failed.lock())
            .finish_non_exhaustive()
    }
}

/// A write between its modify phase and its acknowledgement.
#[derive(Debug, Clone, Copy)]
pub struct PendingWrite {
    pub lsn: u64,
    /// The mirror post of its last record, if it was mirrored.
    pub posted: Option<interconnect::WriteId>,
    /// The mirror's resyncs started when it was appended (see
    /// `Mirror::covers`).
    pub resyncs_at_append: u64,
}

/// Start a named thread of the node.
pub fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(body)
        .expect("spawning a node thread")
}

impl Node {
    /// Open the log in `region`, build the node and publish its mailbox
    /// ("starting", out of sync). It serves nothing yet: HA decides what
    /// (see `ha::HaNode::boot`). Starts no thread. Returns the channel of
    /// interconnect events for the caller to feed to
    /// [`Node::on_interconnect_event`].
    pub fn open(
        config: Config,
        region: Arc<Region>,
        environment: Environment,
    ) -> Result<(Arc<Node>, EventReceiver<ControlEvent>)> {
        let (log, _recovery) = Log::open(region.clone())?;
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        // The directories are made at start, and never again: a shared
        // file system that goes away must make writes there fail.
        for (what, dir) in [
            ("creating the data directory", &config.data_dir),
            ("creating the aggregate directory", &config.aggregate_dir),
        ] {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                what,
                path: dir.clone(),
                source,
            })?;
        }
        crate::storage::shared_fs::check(&config.aggregate_dir)?;
        let boot = environment.boot;
        // What the previous start left in the mailbox, before this start
        // replaces it: HA reads how it stopped.
        let previous_start = crate::storage::mailbox::read(&config.aggregate_dir, config.node_id)
            .ok()
            .flatten();
        if let Some(previous) = &previous_start {
            assert_ne!(previous.boot, boot, "a boot identity is never reused");
        }
        // What the mailbox says of the partner's mirror carries over from
        // the previous start: this start has appended nothing yet, so it is
        // still true (and a start that dies before it decides anything must
        // not erase it: the next one reads it to know whether its own log
        // may lack acknowledged writes). The first write the mirror lacks
        // marks it out of sync, as always.
        let (mirror_in_sync, in_sync_with_boot, out_of_sync_reason) = match &previous_start {
            Some(previous) => (
                previous.mirror_in_sync,
                previous.in_sync_with_boot,
                previous.out_of_sync_reason.clone(),
            ),
            None => (
                false,
                None,
                Some("node starting: the mirror is resynced after connecting".into()),
            ),
        };
        let mailbox = Arc::new(Mailbox::new(
            &config.aggregate_dir,
            MailboxState {
                format_version: MAILBOX_FORMAT_VERSION,
                node_id: config.node_id,
                heartbeat_seq: 0,
                state: "starting".into(),
                mirror_in_sync,
                out_of_sync_reason,
                nbd_listen: config.nbd.listen.to_string(),
                volumes: config
                    .volumes
                    .iter()
                    .map(|v| VolumeInfo {
                        name: v.name.clone(),
                        size_bytes: v.size.0,
                    })
                    .collect(),
                half_bytes: config.nvram.half_size.0,
                updated_unix_ms: 0,
                boot,
                in_sync_with_boot,
                clean_stop: false,
                // A node that asked its partner to take over and restarted
                // before the giveback still asks for it (HA clears it once
                // the volumes are served here again).
                asks_takeover: previous_start.as_ref().is_some_and(|p| p.asks_takeover),
                log_host_boot: previous_start.as_ref().map_or_else(
                    || environment.host_boot.clone(),
                    |p| p.log_host_boot.clone(),
                ),
            },
        ));
        let mirror = Mirror::new(
            Partner {
                addr: config.interconnect.partner,
                aggregate_dir: config.aggregate_dir.clone(),
                node_id: config.partner_id(),
            },
            environment.interconnect.clone(),
            config.interconnect.slots,
            area_memory(&region, region.local_log()),
            mailbox.clone(),
            events_tx.clone(),
            environment.clock.clone(),
        );
        let node = Arc::new(Node {
            config,
            region,
            log,
            volumes: RwLock::new(Vec::new()),
            mirror,
            mailbox,
            previous_start,
            stats: Stats::default(),
            write_latency_us: Arc::new(Histogram::latency_us()),
            environment,
            hooks: OnceLock::new(),
            cp_signal: Mutex::new(CpSignal::default()),
            cp_lock: Mutex::new(()),
            cp_wake: Condvar::new(),
            failed: Mutex::new(None),
            stopping: AtomicBool::new(false),
            receiver: Mutex::new(None),
            events: events_tx,
        });
        if node.previous_start.as_ref().is_some_and(|p| p.clean_stop) {
            node.mirror.log_recovered_after_a_clean_stop();
        }
        node.mailbox.update(|_| {})?;
        Ok((node, events_rx))
    }

    /// Install the hooks of the layer above (once; it holds the node, so
    /// the node holds it weakly).
    pub fn set_hooks(&self, hooks: Weak<dyn NodeHooks>) {
        assert!(self.hooks.set(hooks).is_ok(), "node hooks installed twice");
    }

    fn hooks(&self) -> Option<Arc<dyn NodeHooks>> {
        self.hooks.get().and_then(Weak::upgrade)
    }

    /// Stop: the connector and every loop that checks [`Node::is_stopping`]
    /// end, the consistency-point thread returns.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.mirror.stop();
        self.cp_signal.lock().stopping = true;
        self.cp_wake.notify_all();
    }

    /// The loop of the mirror's connector thread, until the node stops.
    pub fn run_connector(&self) {
        self.mirror.run_connector(&self.log, &self.stopping)
    }

    /// The loop of the interconnect-event thread, until the node stops.
    pub fn run_interconnect_events(&self, events: EventReceiver<ControlEvent>) {
        while !self.is_stopping() {
            match events.recv_timeout(std::time::Duration::from_millis(200)) {
                Ok(event) => self.on_interconnect_event(event),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
        }
    }

    /// Every volume served here.
    pub fn volumes(&self) -> Vec<Arc<Volume>> {
        self.volumes.read().clone()
    }

    pub fn volume_by_name(&self, name: &str) -> Option<Arc<Volume>> {
        self.volumes.read().iter().find(|v| v.name == name).cloned()
    }

    pub fn volume_by_id(&self, id: u32) -> Option<Arc<Volume>> {
        self.volumes.read().iter().find(|v| v.id == id).cloned()
    }

    /// Serve these volumes from now on.
    pub fn attach_volumes(&self, volumes: Vec<Arc<Volume>>) {
        let mut served = self.volumes.write();
        for volume in volumes {
            assert!(
                served
                    .iter()
                    .all(|v| v.id != volume.id && v.name != volume.name),
                "volume {} attached twice (volume names must be unique across the pair)",
                volume.name
            );
            served.push(volume);
        }
    }

    /// Stop serving node `set`'s volumes; returns them.
    pub fn detach_set(&self, set: u32) -> Vec<Arc<Volume>> {
        let mut served = self.volumes.write();
        let (gone, kept): (Vec<_>, Vec<_>) = served.drain(..).partition(|v| v.set == set);
        *served = kept;
        gone
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn check_range(&self, volume: &Volume, offset: u64, len: u64) -> Result<()> {
        if offset
            .checked_add(len)
            .map_or(true, |end| end > volume.size_bytes)
        {
            return Err(Error::OutOfRange {
                volume: volume.name.clone(),
                offset,
                len,
                size_bytes: volume.size_bytes,
            });
        }
        Ok(())
    }

    pub fn check_not_failed(&self) -> Result<()> {
        match &*self.failed.lock() {
            Some(reason) => Err(Error::NodeFailed {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    pub fn failure(&self) -> Option<String> {
        self.failed.lock().clone()
    }

    pub fn fail(&self, reason: String) {
        tracing::error!(%reason, "node failed: no further writes are accepted");
        self.failed.lock().get_or_insert(reason);
    }

    pub fn on_interconnect_event(&self, event: ControlEvent) {
        use interconnect::Direction;
        match event {
            ControlEvent::Disconnected {
                direction: Direction::Outbound,
                session,
                error,
            } => {
                tracing::warn!(session, %error, "mirror connection lost");
                self.mirror.link_down("connection lost");
            }
            ControlEvent::PartnerSilent {
                direction,
                session,
                silent_ms,
            } => {
                tracing::warn!(?direction, session, silent_ms, "partner silent");
                if direction == Direction::Outbound {
                    self.mirror.link_down("partner silent");
                }
            }
            other => tracing::debug!(?other, "interconnect event"),
        }
    }

    pub fn link(&self) -> Link {
        self.mirror.link()
    }

    /// Start accepting the partner's mirror writes (idempotent).
    pub fn bind_receiver(&self) -> Result<()> {
        let mut receiver = self.receiver.lock();
        if receiver.is_none() {
            *receiver = Some(self.environment.interconnect.listen(
                self.config.interconnect.listen,
                area_memory(&self.region, self.region.mirror()),
                self.events.clone(),
            )?);
        }
        Ok(())
    }

    /// Stop accepting the partner's mirror writes and close its session.
    pub fn shutdown_receiver(&self) {
        if let Some(mut receiver) = self.receiver.lock().take() {
            receiver.shutdown();
        }
    }

    /// Whether the partner has a live session into our mirror.
    pub fn receiver_connected(&self) -> bool {
        self.receiver
            .lock()
            .as_ref()
            .is_some_and(|r| r.session().is_some())
    }
}
