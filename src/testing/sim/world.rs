//! The simulated world: two nodes, the shared clock, net and shelf, the
//! writes in flight, and the loop that steps them.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use crossbeam_channel::Receiver;
use interconnect::ControlEvent;
use nvlog::Region;

use super::*;
use crate::clock::SharedClock;
use crate::config::{Config, Durability};
use crate::error::Error;
use crate::ha::{HaNode, HaOptions, ReplayDriver};
use crate::node::{Environment, Node, PendingWrite};
use crate::storage::volume::Volume;
use crate::testing::workload::BLOCK_BYTES;

/// One simulated node: its NVRAM survives its crashes.
pub(super) struct SimNode {
    pub(super) id: u32,
    pub(super) config: Config,
    pub(super) region: Arc<Region>,
    pub(super) ha: Option<Arc<HaNode>>,
    pub(super) events: Option<Receiver<ControlEvent>>,
    /// Crashed: restarts at this simulated time.
    pub(super) down_until_ms: Option<u64>,
    pub(super) down_since_ms: u64,
    /// Stalled (SIGSTOP): takes no step until this time.
    pub(super) stalled_until_ms: Option<u64>,
    pub(super) stalled_since_ms: u64,
    /// When it last sent interconnect heartbeats.
    pub(super) heartbeat_at_ms: u64,
    /// Counts restarts, so writes of an earlier life are not finished.
    pub(super) incarnation: u64,
    /// Power losses so far: the host's boot identity changes with each.
    pub(super) power_ups: u64,
    /// The step its resync under way began at (see `resync_step`).
    pub(super) resync_began_at_step: Option<u64>,
}

/// How a small file misbehaves (see `World::file_fault`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FileFaultKind {
    /// Replacing it fails: a directory holds its temporary name, so the
    /// write fails as it would with ENOSPC or EIO.
    WritesFail,
    /// Reading it fails: a directory stands in its place (the file is
    /// kept aside), so a read fails as with EIO, and so does a replace.
    ReadsFail,
    /// It reads as garbage until it is replaced or the fault ends.
    ReadsGarbage,
}

/// A small file's fault in force, and what undoes it.
#[derive(Debug)]
pub(super) struct FileFault {
    pub(super) path: std::path::PathBuf,
    pub(super) kind: FileFaultKind,
    pub(super) until_ms: u64,
    /// ReadsFail: where the file waits; ReadsGarbage: its bytes.
    pub(super) kept: Option<(std::path::PathBuf, Vec<u8>)>,
    pub(super) garbage: Vec<u8>,
}

/// A write in the log, not yet acknowledged.
pub(super) struct InFlight {
    pub(super) node: u32,
    pub(super) incarnation: u64,
    pub(super) volume: Arc<Volume>,
    pub(super) block: u64,
    pub(super) version: u64,
    pub(super) pending: Option<PendingWrite>,
}

pub(super) struct World {
    pub(super) options: SimOptions,
    pub(super) rng: SplitMix64,
    /// Chosen by the seed: whether writes wait for local persistence.
    pub(super) durability: Durability,
    pub(super) _dir: tempfile::TempDir,
    /// The directory's path and a slash, cut from what the trace says.
    pub(super) dir_prefix: String,
    pub(super) clock: Arc<SimClock>,
    pub(super) net: Arc<SimNet>,
    pub(super) shelf: Arc<Shelf>,
    pub(super) nodes: [SimNode; 2],
    pub(super) checker: Checker,
    pub(super) in_flight: Vec<InFlight>,
    /// Heartbeats sent before this time are lost.
    pub(super) heartbeats_lost_until_ms: u64,
    /// Mailbox, owner and index files misbehaving now.
    pub(super) file_faults: Vec<FileFault>,
    pub(super) report: SimReport,
    pub(super) trace: VecDeque<String>,
    pub(super) step: u64,
}

impl World {
    pub(super) fn new(options: &SimOptions) -> crate::testing::Result<World> {
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
        let geometry = Geometry::new(HALF_BYTES).map_err(Error::from)?;
        let mut rng = SplitMix64::new(options.seed);
        let durability = if rng.chance(50) {
            Durability::Persist
        } else {
            Durability::Mirror
        };
        let nodes = [1u32, 2].map(|id| {
            let config = sim_config(dir.path(), id, durability.as_str())
                .expect("the simulation's config is valid");
            SimNode {
                id,
                config,
                region: Arc::new(Region::in_memory(id, geometry)),
                ha: None,
                events: None,
                down_until_ms: None,
                down_since_ms: 0,
                stalled_until_ms: None,
                stalled_since_ms: 0,
                heartbeat_at_ms: 0,
                incarnation: 0,
                power_ups: 0,
                resync_began_at_step: None,
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
            file_faults: Vec::new(),
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
                .map_err(|violation| crate::testing::Error::Misbehaving { reason: violation })?;
        }
        Ok(world)
    }

    pub(super) fn report(&self) -> SimReport {
        let mut report = self.report.clone();
        report.steps = self.step;
        report.durability = self.durability.as_str();
        report.simulated_ms = self.now_ms();
        report.writes_acked = self.checker.acked_writes;
        report.reads_checked = self.checker.reads_checked;
        report
    }

    pub(super) fn now_ms(&self) -> u64 {
        self.clock.elapsed_ms()
    }

    pub(super) fn note(&mut self, what: impl fmt::Display) {
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

    pub(super) fn run(&mut self) -> Result<(), String> {
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
    pub(super) fn wake_nodes(&mut self) -> Result<(), String> {
        self.end_file_faults(false)?;
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
            let failed = self.live(index).and_then(|ha| ha.node.failure());
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
    pub(super) fn heartbeats(&mut self) {
        let now = self.now_ms();
        for index in 0..2 {
            let node = &self.nodes[index];
            if node.ha.is_none()
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
    pub(super) fn start_node(&mut self, index: usize) -> Result<(), String> {
        let node = &mut self.nodes[index];
        node.incarnation += 1;
        self.shelf.set_actor(node.id);
        let environment = Environment {
            clock: self.clock.clone(),
            disks: self.shelf.clone(),
            interconnect: self.net.clone(),
            // From the seed, and apart from the stream the steps draw from,
            // so that the boot identity does not change what a seed does.
            boot: SplitMix64::new(
                self.options.seed ^ (u64::from(node.id) << 32) ^ node.incarnation,
            )
            .next_u64()
            .max(1),
            host_boot: format!(
                "simulated host of node {}, power-up {}",
                node.id, node.power_ups
            ),
        };
        let options = HaOptions {
            replay: ReplayDriver::Caller,
            partner_service: None,
            verify_warm_index: true,
        };
        let assembled = Node::open(node.config.clone(), node.region.clone(), environment)
            .and_then(|(node, events)| Ok((HaNode::start(node, options)?, events)));
        let (ha, events) = match assembled {
            Ok(assembled) => assembled,
            // An injected disk or file error during recovery (a file that
            // cannot be read or reads as garbage): the node does not come
            // up, says why, and the operator tries again later.
            Err(error @ (Error::Io { .. } | Error::Corrupt { .. })) => {
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
        let role = ha.role().as_str();
        node.ha = Some(ha);
        node.events = Some(events);
        let id = node.id;
        self.note(format_args!("node {id} starts: {role}"));
        Ok(())
    }

    /// Node `index` if it is up and not stalled; its events delivered.
    pub(super) fn live(&self, index: usize) -> Option<Arc<HaNode>> {
        let node = &self.nodes[index];
        if node.stalled_until_ms.is_some() {
            return None;
        }
        let ha = node.ha.clone()?;
        self.shelf.set_actor(node.id);
        if let Some(events) = &node.events {
            while let Ok(event) = events.try_recv() {
                ha.node.on_interconnect_event(event);
            }
        }
        Some(ha)
    }

    pub(super) fn pick_node(&mut self) -> usize {
        self.rng.below(2) as usize
    }

    pub(super) fn one_step(&mut self) -> Result<(), String> {
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
            910..=949 => {
                let ms = 20 + self.rng.below(300);
                self.clock.advance_ms(ms);
                Ok(())
            }
            950..=959 => self.index_mirror(),
            960..=986 => self.replay(),
            987..=988 => self.crash_one(),
            989 => self.stall_one(),
            990 => self.partition(),
            991..=993 => self.heal(),
            994 => self.file_fault(),
            995 => self.disk_fault(),
            996 => self.tear(),
            997 => self.lose_heartbeats(),
            _ => self.forced_takeover(),
        }
    }

    pub(super) fn collect_violations(&mut self) -> Result<(), String> {
        match self.shelf.take_violations().first() {
            Some(violation) => Err(format!("a stale owner wrote: {violation}")),
            None => Ok(()),
        }
    }

    /// The end of a run: faults stop, every node comes back, the pair
    /// settles, and every block is read back.
    pub(super) fn settle_down(&mut self) -> Result<(), String> {
        self.net.heal();
        self.end_file_faults(true)?;
        for index in 0..2 {
            let node = &mut self.nodes[index];
            node.stalled_until_ms = None;
            self.net.set_deaf(node.config.interconnect.listen, false);
            if node.ha.is_none() {
                node.down_until_ms = None;
                self.start_node(index)?;
            }
        }
        for _ in 0..200 {
            self.clock.advance_ms(50);
            for index in 0..2 {
                let Some(ha) = self.live(index) else {
                    continue;
                };
                self.net.placing_during(|| {
                    ha.node.mirror.resync_step(&ha.node.log);
                    let _ = ha.replay_step(64 * BLOCK_BYTES as u64);
                    let _ = ha.monitor_tick();
                    ha.node.consistency_point_tick(true);
                });
            }
            self.finish_all();
            self.collect_violations()?;
        }
        self.full_check("at the end")
    }

    pub(super) fn finish_all(&mut self) {
        let mut at = 0;
        while at < self.in_flight.len() {
            // A finished entry's place is taken by the last one: look again.
            if !self.try_finish(at) {
                at += 1;
            }
        }
    }
}
