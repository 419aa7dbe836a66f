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
mod net;
mod rng;

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use crossbeam_channel::Receiver;
use interconnect::ControlEvent;
use nvlog::{Geometry, Region};

pub use checker::Checker;
pub use disk::{Shelf, SimDisk};
pub use net::SimNet;
pub use rng::SplitMix64;

use crate::clock::SharedClock;
use crate::config::{Config, Durability};
use crate::error::Error;
use crate::ha::{HaNode, HaOptions, ReplayDriver};
use crate::node::{Environment, Node, PendingWrite, WhenFull};
use crate::storage::volume::{volume_id, Volume};
use crate::testing::workload::BLOCK_BYTES;
pub use clock::SimClock;

/// Blocks per simulated volume (4 KiB each).
const VOLUME_BLOCKS: u64 = 24;
/// Volumes per node.
const VOLUMES_PER_NODE: usize = 2;
/// Log halves of the minimum size: about 15 block writes fill one, so the
/// log is often full and consistency points run all the time.
const HALF_BYTES: u64 = 64 * 1024;
const HEARTBEAT_INTERVAL_MS: u64 = 100;
const HEARTBEAT_TIMEOUT_MS: u64 = 1000;
const MAILBOX_TIMEOUT_MS: u64 = 1000;
/// Steps of the trace kept for a failure report.
const TRACE_STEPS: usize = 80;
/// How long the simulated operator waits for an automatic takeover before
/// forcing one.
const OPERATOR_PATIENCE_MS: u64 = 3000;

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
    pub takeovers: u64,
    pub forced_takeovers: u64,
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
             {} heartbeats lost and {} late ({} sessions cut as silent), {} disk errors; \
             {} takeovers ({} forced), {} givebacks",
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
            self.takeovers,
            self.forced_takeovers,
            self.givebacks
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
    let result = world.run();
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

/// One simulated node: its NVRAM survives its crashes.
struct SimNode {
    id: u32,
    config: Config,
    region: Arc<Region>,
    inner: Option<Arc<HaNode>>,
    events: Option<Receiver<ControlEvent>>,
    /// Crashed: restarts at this simulated time.
    down_until_ms: Option<u64>,
    down_since_ms: u64,
    /// Stalled (SIGSTOP): takes no step until this time.
    stalled_until_ms: Option<u64>,
    stalled_since_ms: u64,
    /// When it last sent interconnect heartbeats.
    heartbeat_at_ms: u64,
    /// Counts restarts, so writes of an earlier life are not finished.
    incarnation: u64,
}

/// A write in the log, not yet acknowledged.
struct InFlight {
    node: u32,
    incarnation: u64,
    volume: Arc<Volume>,
    block: u64,
    version: u64,
    pending: Option<PendingWrite>,
}

struct World {
    options: SimOptions,
    rng: SplitMix64,
    /// Chosen by the seed: whether writes wait for local persistence.
    durability: Durability,
    _dir: tempfile::TempDir,
    /// The directory's path and a slash, cut from what the trace says.
    dir_prefix: String,
    clock: Arc<SimClock>,
    net: Arc<SimNet>,
    shelf: Arc<Shelf>,
    nodes: [SimNode; 2],
    checker: Checker,
    in_flight: Vec<InFlight>,
    /// Heartbeats sent before this time are lost.
    heartbeats_lost_until_ms: u64,
    report: SimReport,
    trace: VecDeque<String>,
    step: u64,
}

impl World {
    fn new(options: &SimOptions) -> crate::Result<World> {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            std::path::PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("nvmirror-sim-")
            .tempdir_in(base)
            .map_err(|source| Error::Io {
                what: "creating the simulation's directory",
                path: std::env::temp_dir(),
                source,
            })?;
        let clock = SimClock::new();
        let net = SimNet::new(
            clock.clone() as SharedClock,
            std::time::Duration::from_millis(HEARTBEAT_TIMEOUT_MS),
        );
        let shelf = Shelf::new(&dir.path().join("aggregate"));
        let geometry = Geometry::new(HALF_BYTES)?;
        let mut rng = SplitMix64::new(options.seed);
        let durability = if rng.chance(50) {
            Durability::Persist
        } else {
            Durability::Mirror
        };
        let durability_name = match durability {
            Durability::Persist => "persist",
            Durability::Mirror => "mirror",
        };
        let nodes = [1u32, 2].map(|id| {
            let config = sim_config(dir.path(), id, durability_name)
                .expect("the simulation's config is valid");
            SimNode {
                id,
                config,
                region: Arc::new(Region::in_memory(id, geometry)),
                inner: None,
                events: None,
                down_until_ms: None,
                down_since_ms: 0,
                stalled_until_ms: None,
                stalled_since_ms: 0,
                heartbeat_at_ms: 0,
                incarnation: 0,
            }
        });
        let mut world = World {
            options: options.clone(),
            rng,
            durability,
            dir_prefix: format!("{}/", dir.path().display()),
            _dir: dir,
            clock,
            net,
            shelf,
            nodes,
            checker: Checker::default(),
            in_flight: Vec::new(),
            heartbeats_lost_until_ms: 0,
            report: SimReport {
                seed: options.seed,
                trace_digest: 0xcbf2_9ce4_8422_2325,
                ..SimReport::default()
            },
            trace: VecDeque::new(),
            step: 0,
        };
        for index in 0..2 {
            world
                .start_node(index)
                .map_err(|violation| Error::Harness { reason: violation })?;
        }
        Ok(world)
    }

    fn report(&self) -> SimReport {
        let mut report = self.report.clone();
        report.steps = self.step;
        report.durability = match self.durability {
            Durability::Persist => "persist",
            Durability::Mirror => "mirror",
        };
        report.simulated_ms = self.now_ms();
        report.writes_acked = self.checker.acked_writes;
        report.reads_checked = self.checker.reads_checked;
        report
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed_ms()
    }

    fn note(&mut self, what: impl fmt::Display) {
        if self.trace.len() == TRACE_STEPS {
            self.trace.pop_front();
        }
        // Without the throw-away directory's name, a replay prints the same.
        let what = what.to_string().replace(&self.dir_prefix, "");
        let line = format!("step {} t={}ms {what}", self.step, self.now_ms());
        // FNV-1a over every line, for comparing whole runs.
        for byte in line.bytes().chain([b'\n']) {
            self.report.trace_digest =
                (self.report.trace_digest ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.trace.push_back(line);
    }

    fn run(&mut self) -> Result<(), String> {
        for step in 0..self.options.steps {
            self.step = step;
            self.clock.advance_ms(1);
            self.wake_nodes()?;
            self.one_step()?;
            self.collect_violations()?;
        }
        self.step = self.options.steps;
        self.settle_down()
    }

    /// Restart crashed nodes and wake stalled ones whose time has come;
    /// heartbeats and the failure detectors' verdicts.
    fn wake_nodes(&mut self) -> Result<(), String> {
        let now = self.now_ms();
        for index in 0..2 {
            if self.nodes[index]
                .down_until_ms
                .is_some_and(|until| now >= until)
            {
                self.nodes[index].down_until_ms = None;
                self.start_node(index)?;
                self.full_check("after a restart")?;
            }
            if self.nodes[index]
                .stalled_until_ms
                .is_some_and(|until| now >= until)
            {
                self.nodes[index].stalled_until_ms = None;
                let addr = self.nodes[index].config.interconnect.listen;
                self.net.set_deaf(addr, false);
                self.note(format_args!("node {} wakes up", index + 1));
            }
        }
        self.heartbeats();
        // An operator restarts a node that stopped accepting writes.
        for index in 0..2 {
            let failed = self.live(index).and_then(|inner| inner.node.failure());
            if let Some(reason) = failed {
                if self.rng.chance(20) {
                    self.note(format_args!(
                        "node {} failed ({reason}): restarted",
                        index + 1
                    ));
                    self.crash(index);
                }
            }
        }
        Ok(())
    }

    /// Live nodes send interconnect heartbeats every interval: most arrive
    /// within milliseconds, some late, a few never. Sessions whose partner
    /// is silent past the timeout (a stalled or crashed node, or enough
    /// lost heartbeats) are cut by the failure detectors.
    fn heartbeats(&mut self) {
        let now = self.now_ms();
        for index in 0..2 {
            let node = &self.nodes[index];
            if node.inner.is_none()
                || node.stalled_until_ms.is_some()
                || now - node.heartbeat_at_ms < HEARTBEAT_INTERVAL_MS
            {
                continue;
            }
            let (own, partner) = (
                node.config.interconnect.listen,
                node.config.interconnect.partner,
            );
            self.nodes[index].heartbeat_at_ms = now;
            let rng = &mut self.rng;
            let report = &mut self.report;
            let lossy = now < self.heartbeats_lost_until_ms;
            self.net
                .send_heartbeats(own, partner, now, || match rng.below(100) {
                    roll if lossy || roll < 3 => {
                        report.heartbeats_lost += 1;
                        None
                    }
                    3..=9 => {
                        report.heartbeats_delayed += 1;
                        Some(HEARTBEAT_INTERVAL_MS + rng.below(HEARTBEAT_TIMEOUT_MS))
                    }
                    _ => Some(rng.below(5)),
                });
        }
        for cut in self.net.check_silence(now) {
            self.report.silence_cuts += 1;
            self.note(cut);
        }
    }

    /// Boot node `index` on its NVRAM (a crash image after a crash).
    fn start_node(&mut self, index: usize) -> Result<(), String> {
        let node = &mut self.nodes[index];
        node.incarnation += 1;
        self.shelf.set_actor(node.id);
        let environment = Environment {
            clock: self.clock.clone(),
            disks: self.shelf.clone(),
            interconnect: self.net.clone(),
        };
        let options = HaOptions {
            replay: ReplayDriver::Caller,
            partner_service: None,
        };
        let assembled = Node::open(node.config.clone(), node.region.clone(), environment)
            .and_then(|(node, events)| Ok((HaNode::start(node, options)?, events)));
        let (inner, events) = match assembled {
            Ok(assembled) => assembled,
            // An injected disk error during recovery: the node does not come
            // up, and the operator tries again later.
            Err(error @ Error::Io { .. }) => {
                let id = node.id;
                // The process exits: its mapping keeps what it wrote.
                node.region = after_crash(&node.region, None);
                self.net.unlisten(node.config.interconnect.listen);
                node.down_until_ms = Some(self.clock.elapsed_ms() + 500);
                self.note(format_args!(
                    "node {id} fails to start ({error}); retried later"
                ));
                return Ok(());
            }
            Err(error) => return Err(format!("node {} cannot start: {error}", node.id)),
        };
        let role = inner.role().as_str();
        node.inner = Some(inner);
        node.events = Some(events);
        let id = node.id;
        self.note(format_args!("node {id} starts: {role}"));
        Ok(())
    }

    /// Node `index` if it is up and not stalled; its events delivered.
    fn live(&self, index: usize) -> Option<Arc<HaNode>> {
        let node = &self.nodes[index];
        if node.stalled_until_ms.is_some() {
            return None;
        }
        let inner = node.inner.clone()?;
        self.shelf.set_actor(node.id);
        if let Some(events) = &node.events {
            while let Ok(event) = events.try_recv() {
                inner.node.on_interconnect_event(event);
            }
        }
        Some(inner)
    }

    fn pick_node(&mut self) -> usize {
        self.rng.below(2) as usize
    }

    fn one_step(&mut self) -> Result<(), String> {
        // Per mille. Faults are rare enough that the pair spends most of
        // its time in sync, so that most takeovers are automatic ones.
        match self.rng.below(1000) {
            0..=299 => self.write(),
            300..=499 => self.finish(),
            500..=669 => self.deliver(),
            670..=739 => self.read(),
            740..=789 => self.consistency_point(),
            790..=849 => self.connect(),
            850..=909 => self.monitor(),
            910..=959 => {
                let ms = 20 + self.rng.below(300);
                self.clock.advance_ms(ms);
                Ok(())
            }
            960..=986 => self.replay(),
            987..=988 => self.crash_one(),
            989 => self.stall_one(),
            990 => self.partition(),
            991..=994 => self.heal(),
            995 => self.disk_fault(),
            996 => self.tear(),
            997 => self.lose_heartbeats(),
            _ => self.forced_takeover(),
        }
    }

    /// A live node, one of the volumes it serves, and a block of it.
    fn pick_block(&mut self) -> Option<(usize, Arc<HaNode>, Arc<Volume>, u64)> {
        let index = self.pick_node();
        let inner = self.live(index)?;
        let volumes = inner.node.volumes();
        if volumes.is_empty() {
            return None;
        }
        let volume = volumes[self.rng.below(volumes.len() as u64) as usize].clone();
        let block = self.rng.below(VOLUME_BLOCKS);
        Some((index, inner, volume, block))
    }

    fn write(&mut self) -> Result<(), String> {
        let Some((index, inner, volume, block)) = self.pick_block() else {
            return Ok(());
        };
        let (version, data) = self.checker.next_write(volume.id, block);
        let offset = block * BLOCK_BYTES as u64;
        if self.options.bug == Some(InjectedBug::SkipEpochCheck) && volume.fence.check().is_err() {
            // The broken node does not see that it lost the volume: the
            // write reaches the file, as its consistency point would put it.
            let disk = self
                .shelf
                .open(volume.path(), volume.set, volume.size_bytes)
                .map_err(|error| format!("the shelf lost a volume's disk: {error}"))?;
            let _ = disk.write(offset, &data);
            self.note(format_args!(
                "node {} (ignoring its fence) writes {} block {block}",
                index + 1,
                volume.name
            ));
            return Ok(());
        }
        match inner
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
            | Err(Error::Interconnect(interconnect::Error::NoFreeSlots { .. })) => {
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
    fn finish(&mut self) -> Result<(), String> {
        if !self.in_flight.is_empty() {
            let at = self.rng.below(self.in_flight.len() as u64) as usize;
            self.try_finish(at);
        }
        Ok(())
    }

    /// The wait phase of in-flight write `at`, if it would not wait: its
    /// node is live and its mirror post settled. Returns whether the entry
    /// left the list (acknowledged, failed, or of an earlier life).
    fn try_finish(&mut self, at: usize) -> bool {
        let index = (self.in_flight[at].node - 1) as usize;
        let Some(inner) = self.live(index) else {
            return false;
        };
        let entry = &self.in_flight[at];
        let same_life = self.nodes[index].incarnation == entry.incarnation;
        if same_life
            && !inner
                .node
                .mirror
                .settled(entry.pending.and_then(|p| p.posted))
        {
            return false;
        }
        let entry = self.in_flight.swap_remove(at);
        if !same_life {
            return true;
        }
        match inner.node.finish_write(&entry.volume, entry.pending, false) {
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

    fn deliver(&mut self) -> Result<(), String> {
        let index = self.pick_node();
        let addr = self.nodes[index].config.interconnect.listen;
        // One-sided writes land even while the receiving node is stalled.
        self.net.deliver_next(addr);
        Ok(())
    }

    /// Every heartbeat is lost for a while, though both nodes and their
    /// sessions are fine: the failure detectors may cut live sessions.
    fn lose_heartbeats(&mut self) -> Result<(), String> {
        let ms = 300 + self.rng.below(2000);
        self.heartbeats_lost_until_ms = self.now_ms() + ms;
        self.note(format_args!("heartbeats are lost for {ms} ms"));
        Ok(())
    }

    fn tear(&mut self) -> Result<(), String> {
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

    fn read(&mut self) -> Result<(), String> {
        match self.pick_block() {
            Some((_, inner, volume, block)) => self.check_block(&inner.node, &volume, block),
            None => Ok(()),
        }
    }

    fn check_block(&mut self, node: &Node, volume: &Volume, block: u64) -> Result<(), String> {
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
    fn full_check(&mut self, why: &str) -> Result<(), String> {
        self.report.full_checks += 1;
        self.note(format_args!("full read-back {why}"));
        for set in [1u32, 2] {
            for index in 0..VOLUMES_PER_NODE {
                let id = volume_id(set, index);
                let server = (0..2).find_map(|node| {
                    let inner = self.live(node)?;
                    let volume = inner.node.volume_by_id(id)?;
                    (!volume.fence.is_tripped()).then_some((inner, volume))
                });
                let Some((inner, volume)) = server else {
                    continue;
                };
                for block in self.checker.written_blocks(id) {
                    self.check_block(&inner.node, &volume, block)?;
                }
            }
        }
        Ok(())
    }

    fn consistency_point(&mut self) -> Result<(), String> {
        let index = self.pick_node();
        let Some(inner) = self.live(index) else {
            return Ok(());
        };
        // A consistency point waits for its mirror posts and those before.
        let timer_due = self.rng.chance(50);
        let healthy = self
            .net
            .placing_during(|| inner.node.consistency_point_tick(timer_due));
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

    fn connect(&mut self) -> Result<(), String> {
        let index = self.pick_node();
        let Some(inner) = self.live(index) else {
            return Ok(());
        };
        if let Some(in_sync) = self
            .net
            .placing_during(|| inner.node.mirror.connect_once(&inner.node.log))
        {
            self.note(format_args!(
                "node {} connects to its partner: {}",
                index + 1,
                if in_sync { "mirror in sync" } else { "failed" }
            ));
        }
        Ok(())
    }

    fn monitor(&mut self) -> Result<(), String> {
        let index = self.pick_node();
        let Some(inner) = self.live(index) else {
            return Ok(());
        };
        let holding_before = inner.holding_partner();
        let role_before = inner.role();
        // A giveback (or a return of our volumes) waits for mirror posts.
        let ticked = if holding_before || role_before != crate::ha::Role::Serving {
            self.net.placing_during(|| inner.monitor_tick())
        } else {
            inner.monitor_tick()
        };
        if let Err(error) = ticked {
            self.note(format_args!("node {} monitor: {error}", index + 1));
        }
        let holding_after = inner.holding_partner();
        let role_after = inner.role();
        if holding_after && !holding_before {
            self.report.takeovers += 1;
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

    fn replay(&mut self) -> Result<(), String> {
        let index = self.pick_node();
        let Some(inner) = self.live(index) else {
            return Ok(());
        };
        match inner.replay_step(2 * BLOCK_BYTES as u64) {
            Ok(true) => {}
            Ok(false) => {}
            Err(error) => self.note(format_args!("node {} replay: {error}", index + 1)),
        }
        Ok(())
    }

    fn crash_one(&mut self) -> Result<(), String> {
        let index = self.pick_node();
        if self.nodes[index].inner.is_none() {
            return Ok(());
        }
        self.crash(index);
        Ok(())
    }

    /// Kill node `index`: its NVRAM keeps what was persisted (the rest torn
    /// at random), its unsynced volume writes survive in part, its sessions
    /// die.
    fn crash(&mut self, index: usize) {
        let now = self.now_ms();
        let node = &mut self.nodes[index];
        let Some(inner) = node.inner.take() else {
            return;
        };
        node.events = None;
        // A process crash (kill -9, a panic) keeps everything written to the
        // NVRAM mapping and the page cache. A power loss keeps only what was
        // persisted, the rest torn at any byte, and part of the volume
        // writes not yet synced. With durability = "mirror" a write is
        // acknowledged before it is persisted locally; after a power loss
        // of the node only the partner's mirror has it, so a restart before
        // the partner takes over would serve a log that lacks it (a known
        // limitation, see the README): power loss is simulated with
        // durability = "persist" only.
        let power_loss = self.durability == Durability::Persist && self.rng.chance(50);
        let tear_seed = power_loss.then(|| self.rng.next_u64());
        inner.node.mirror.stop();
        drop(inner);
        node.region = after_crash(&node.region, tear_seed);
        let (own, partner) = (
            node.config.interconnect.listen,
            node.config.interconnect.partner,
        );
        self.net.unlisten(own);
        self.net.cut_into(partner);
        self.net.set_deaf(own, false);
        node.stalled_until_ms = None;
        let down_ms = 500 + self.rng.below(4500);
        node.down_until_ms = Some(now + down_ms);
        node.down_since_ms = now;
        let id = node.id;
        if power_loss {
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

    fn stall_one(&mut self) -> Result<(), String> {
        let index = self.pick_node();
        let now = self.now_ms();
        let node = &mut self.nodes[index];
        if node.inner.is_none() || node.stalled_until_ms.is_some() {
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

    fn partition(&mut self) -> Result<(), String> {
        if !self.net.is_partitioned() {
            self.net.partition();
            self.report.partitions += 1;
            self.note("interconnect partitioned");
        }
        Ok(())
    }

    fn heal(&mut self) -> Result<(), String> {
        if self.net.is_partitioned() {
            self.net.heal();
            self.note("partition heals");
        }
        Ok(())
    }

    fn disk_fault(&mut self) -> Result<(), String> {
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
    fn forced_takeover(&mut self) -> Result<(), String> {
        let index = self.pick_node();
        let partner = 1 - index;
        // The operator waits for the automatic takeover first.
        let now = self.now_ms();
        let down_since = if self.nodes[partner].inner.is_none() {
            self.nodes[partner].down_since_ms
        } else if self.nodes[partner].stalled_until_ms.is_some() {
            self.nodes[partner].stalled_since_ms
        } else {
            now
        };
        let partner_down = now - down_since >= OPERATOR_PATIENCE_MS;
        let Some(inner) = self.live(index) else {
            return Ok(());
        };
        if !partner_down || inner.holding_partner() {
            return Ok(());
        }
        let partner_id = self.nodes[partner].id;
        // What the takeover trusts without force (see ha::takeover).
        let my_boot = inner.node.mailbox.current().boot;
        let in_sync = crate::storage::mailbox::read(&inner.node.config.aggregate_dir, partner_id)
            .ok()
            .flatten()
            .is_some_and(|m| m.mirror_in_sync && m.in_sync_with_boot == Some(my_boot));
        match inner.takeover(true, "operator: forced takeover in the simulation") {
            Ok(_) => {
                if !in_sync {
                    let lost: Vec<u32> = (0..VOLUMES_PER_NODE)
                        .map(|i| volume_id(partner_id, i))
                        .collect();
                    self.checker.forced_takeover(&lost);
                }
                self.report.takeovers += 1;
                self.report.forced_takeovers += 1;
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

    fn collect_violations(&mut self) -> Result<(), String> {
        match self.shelf.take_violations().first() {
            Some(violation) => Err(format!("a stale owner wrote: {violation}")),
            None => Ok(()),
        }
    }

    /// The end of a run: faults stop, every node comes back, the pair
    /// settles, and every block is read back.
    fn settle_down(&mut self) -> Result<(), String> {
        self.net.heal();
        for index in 0..2 {
            let node = &mut self.nodes[index];
            node.stalled_until_ms = None;
            self.net.set_deaf(node.config.interconnect.listen, false);
            if node.inner.is_none() {
                node.down_until_ms = None;
                self.start_node(index)?;
            }
        }
        for _ in 0..200 {
            self.clock.advance_ms(50);
            for index in 0..2 {
                let Some(inner) = self.live(index) else {
                    continue;
                };
                self.net.placing_during(|| {
                    inner.node.mirror.connect_once(&inner.node.log);
                    let _ = inner.replay_step(64 * BLOCK_BYTES as u64);
                    let _ = inner.monitor_tick();
                    inner.node.consistency_point_tick(true);
                });
            }
            self.finish_all();
            self.collect_violations()?;
        }
        self.full_check("at the end")
    }

    fn finish_all(&mut self) {
        let mut at = 0;
        while at < self.in_flight.len() {
            // A finished entry's place is taken by the last one: look again.
            if !self.try_finish(at) {
                at += 1;
            }
        }
    }
}

/// The NVRAM a node finds when it starts again: after a power loss (with
/// the seed that tears it) what was persisted, the rest torn; after a
/// process crash everything written to the mapping.
fn after_crash(region: &Region, power_loss: Option<u64>) -> Arc<Region> {
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
fn sim_config(root: &std::path::Path, id: u32, durability: &str) -> crate::Result<Config> {
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
