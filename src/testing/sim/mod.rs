//! Deterministic simulation of the pair.
//!
//! Two real nodes ([`HaNode`] over [`Node`], with their real log, mirror, consistency
//! points, HA monitor, takeover, persisted index, replay and giveback) run
//! in one thread, stepped by a scheduler that a single seed drives. What
//! they run on is simulated:
//!
//! - time: a clock ([`SimClock`]) that moves only when the scheduler advances it;
//! - NVRAM: in-memory regions; a crash keeps what was persisted and tears
//!   the rest at any byte (`nvlog::Region::crash_image`);
//! - volume files: a shelf of simulated disks ([`Shelf`]) with a write
//!   cache a crash loses, sector-torn writes, and injected write and fsync
//!   errors;
//! - the interconnect: in-process links ([`SimNet`]) whose writes are held
//!   until the scheduler places them, in order, or tears one.
//!
//! Owner files, mailboxes and the takeover index are real files in a
//! throw-away directory (written atomically, so a crash between steps
//! leaves the old or the new one).
//!
//! The faults: process crashes and power losses, torn mirror writes,
//! partitions that heal, heartbeats lost or late (the sessions' failure
//! detectors are the interconnect's own), a node stalled past the failure
//! detector (it wakes up fenced), failing volume writes and fsyncs, a full
//! log (small halves), and now and then an operator forcing a takeover.
//! The [`Checker`] says what every read may return; the shelf catches a
//! stale owner writing. A violation stops the run with the trace of its
//! last steps and the command that replays it.
//!
//! Each step is atomic: two writers never race inside the write path here,
//! and a crash falls between two steps, never inside one (between a fence
//! and the index it leads to, say). The multi-threaded tests of the log,
//! the send queue's stress test and loom model, and the process-level
//! drills cover what happens inside.

mod checker;
mod clock;
mod disk;
mod faults;
mod net;
mod rng;
mod steps;
mod world;
use world::World;

use std::fmt;
use std::sync::Arc;

use nvlog::{Geometry, Region};

pub use checker::Checker;
pub use disk::{Shelf, SimDisk};
pub use net::SimNet;
pub use rng::SplitMix64;

use crate::config::Config;
use crate::testing::workload::BLOCK_BYTES;
pub use clock::SimClock;

/// Blocks per simulated volume (4 KiB each).
pub(super) const VOLUME_BLOCKS: u64 = 24;
/// Volumes per node.
pub(super) const VOLUMES_PER_NODE: usize = 2;
/// Log halves of the minimum size: about 15 block writes fill one, so the
/// log is often full and consistency points run all the time.
pub(super) const HALF_BYTES: u64 = 64 * 1024;
pub(super) const HEARTBEAT_INTERVAL_MS: u64 = 100;
pub(super) const HEARTBEAT_TIMEOUT_MS: u64 = 1000;
pub(super) const MAILBOX_TIMEOUT_MS: u64 = 1000;
/// Steps of the trace kept for a failure report.
pub(super) const TRACE_STEPS: usize = 80;
/// How long the simulated operator waits for an automatic takeover before
/// forcing one.
pub(super) const OPERATOR_PATIENCE_MS: u64 = 3000;

/// A deliberately broken node, for the simulation to prove it finds bugs
/// (`nvmirror sim --inject-bug`). The simulation plays the broken node's
/// part itself; the node's code has no broken variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedBug {
    /// Acknowledge a write as soon as it is in the local log, without
    /// waiting for the mirror or for local persistence.
    AckBeforePlaced,
    /// Skip the fence: a stale owner keeps writing its volume files.
    SkipEpochCheck,
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimOptions {
    pub seed: u64,
    pub steps: u64,
    /// A deliberately broken node, to show that the checker catches it.
    pub bug: Option<InjectedBug>,
}

impl SimOptions {
    /// The command that replays this run.
    pub fn replay_command(&self) -> String {
        let bug = match self.bug {
            Some(InjectedBug::AckBeforePlaced) => " --inject-bug ack-before-placed",
            Some(InjectedBug::SkipEpochCheck) => " --inject-bug skip-epoch-check",
            None => "",
        };
        format!(
            "nvmirror sim --seed {} --steps {}{bug}",
            self.seed, self.steps
        )
    }
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct SimReport {
    pub seed: u64,
    /// A digest of every step's trace line: equal digests, equal runs.
    pub trace_digest: u64,
    pub durability: &'static str,
    pub steps: u64,
    pub simulated_ms: u64,
    pub writes_issued: u64,
    pub writes_acked: u64,
    pub writes_busy: u64,
    pub reads_checked: u64,
    pub consistency_points: u64,
    pub crashes: u64,
    pub power_losses: u64,
    pub stalls: u64,
    pub partitions: u64,
    pub torn_mirror_writes: u64,
    pub heartbeats_lost: u64,
    pub heartbeats_delayed: u64,
    /// Sessions cut by a failure detector.
    pub silence_cuts: u64,
    pub disk_faults: u64,
    /// Mailbox, owner and index files made to fail for a while.
    pub file_faults: u64,
    /// Resyncs that took more than one step (writes, placements and
    /// faults in between).
    pub multi_step_resyncs: u64,
    pub takeovers: u64,
    pub forced_takeovers: u64,
    /// Takeovers that served from the warm index (not a whole-mirror scan).
    pub warm_takeovers: u64,
    pub givebacks: u64,
    pub full_checks: u64,
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} (durability {}): {} steps, {} ms simulated; writes {} issued, {} acknowledged, {} retried \
             (log or slots full); {} reads checked, {} full read-backs; {} consistency points; \
             faults: {} crashes ({} power losses), {} stalls, {} partitions, {} torn mirror writes, \
             {} heartbeats lost and {} late ({} sessions cut as silent), {} disk errors, {} file faults; \
             {} takeovers ({} forced, {} from a warm index), {} givebacks; {} resyncs over several steps",
            self.seed,
            self.durability,
            self.steps,
            self.simulated_ms,
            self.writes_issued,
            self.writes_acked,
            self.writes_busy,
            self.reads_checked,
            self.full_checks,
            self.consistency_points,
            self.crashes,
            self.power_losses,
            self.stalls,
            self.partitions,
            self.torn_mirror_writes,
            self.heartbeats_lost,
            self.heartbeats_delayed,
            self.silence_cuts,
            self.disk_faults,
            self.file_faults,
            self.takeovers,
            self.forced_takeovers,
            self.warm_takeovers,
            self.givebacks,
            self.multi_step_resyncs
        )
    }
}

/// A violation of the pair's promises, with how to see it again.
#[derive(Debug, Clone)]
pub struct SimFailure {
    pub options: SimOptions,
    pub step: u64,
    pub violation: String,
    /// The last steps before the violation.
    pub trace: Vec<String>,
    pub report: SimReport,
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "simulation seed {} failed at step {}: {}",
            self.options.seed, self.step, self.violation
        )?;
        writeln!(f, "last steps:")?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        write!(f, "replay: {}", self.options.replay_command())
    }
}

/// Run one seed.
pub fn run(options: &SimOptions) -> Result<SimReport, Box<SimFailure>> {
    let mut world = World::new(options).map_err(|error| {
        Box::new(SimFailure {
            options: options.clone(),
            step: 0,
            violation: format!("the simulated pair could not start: {error}"),
            trace: Vec::new(),
            report: SimReport::default(),
        })
    })?;
    // An assertion of the node (an invariant) failing is a failure of the
    // seed like any other: reported with the seed, the trace and the
    // command that replays it.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| world.run()))
        .unwrap_or_else(|payload| {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            Err(format!("a node panicked: {message}"))
        });
    let report = world.report();
    result.map(|()| report.clone()).map_err(|violation| {
        Box::new(SimFailure {
            options: options.clone(),
            step: world.step,
            violation: violation.replace(&world.dir_prefix, ""),
            trace: world.trace.iter().cloned().collect(),
            report,
        })
    })
}

/// The NVRAM a node finds when it starts again: after a power loss (with
/// the seed that tears it) what was persisted, the rest torn; after a
/// process crash everything written to the mapping.
pub(super) fn after_crash(region: &Region, power_loss: Option<u64>) -> Arc<Region> {
    let image = match power_loss {
        Some(seed) => region.crash_image(seed),
        None => region.snapshot(nvlog::Area {
            offset: 0,
            len: region.len(),
        }),
    };
    Arc::new(
        Region::from_image(region.node_id(), region.geometry(), &image)
            .expect("a crash image has the region's geometry"),
    )
}

/// The configuration of simulated node `id` under `root`.
pub(super) fn sim_config(
    root: &std::path::Path,
    id: u32,
    durability: &str,
) -> crate::Result<Config> {
    let volumes: String = (0..VOLUMES_PER_NODE)
        .map(|index| {
            format!(
                "[[volume]]\nname = \"n{id}v{index}\"\nsize = {}\n",
                VOLUME_BLOCKS * BLOCK_BYTES as u64
            )
        })
        .collect();
    let text = format!(
        "node_id = {id}\n\
         durability = \"{durability}\"\n\
         data_dir = \"{root}/node{id}\"\n\
         aggregate_dir = \"{root}/aggregate\"\n\
         [nvram]\nhalf_size = {HALF_BYTES}\n\
         [nbd]\nlisten = \"127.0.0.1:{nbd}\"\n\
         {volumes}\
         [interconnect]\ntransport = \"tcp\"\nlisten = \"10.99.0.{id}:7000\"\npartner = \"10.99.0.{partner}:7000\"\n\
         key = \"simulated pair key, never used on a network\"\n\
         slots = 8\nheartbeat_interval_ms = {HEARTBEAT_INTERVAL_MS}\nheartbeat_timeout_ms = {HEARTBEAT_TIMEOUT_MS}\n\
         [consistency_point]\ninterval_ms = 1000\nthreshold_percent = 50\n\
         [ha]\nmailbox_interval_ms = 200\nmailbox_timeout_ms = {MAILBOX_TIMEOUT_MS}\nauto_takeover = true\nauto_giveback_delay_ms = 500\n",
        root = root.display(),
        nbd = 10808 + id,
        partner = 3 - id,
    );
    Ok(Config::parse(&text)?)
}
