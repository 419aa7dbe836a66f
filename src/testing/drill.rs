//! `nvmirror drill`: failover drills on one machine.
//!
//! A pair of node processes in a fresh directory; writers that stamp every
//! write with a pattern unique to it and keep a ledger of what was
//! acknowledged; and, cycle after cycle, a fault on the node that owns the
//! volume under load: `kill -9`, `SIGSTOP` (the node wakes up after it was
//! fenced), or a cut of the interconnect (no takeover must follow). After
//! each takeover every acknowledged write is read back through the
//! survivor; then the volume is given back and read back again through its
//! owner. The report has, per cycle, the fault, how long the writers saw no
//! service, the takeover's timings and what was verified. Any acknowledged
//! write missing, or any block holding data no write carried, fails the
//! drill.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{Error, Result};
use crate::error::Error as NodeError;
use crate::ha::Role;
use crate::testing::harness::{PairHarness, PairSpec};
use crate::testing::workload::{self, block_pattern, Ledger, BLOCK_BYTES};
use nbd::client::NbdClient;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Kill9,
    Sigstop,
    CutInterconnect,
}

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill9 => "kill -9",
            Fault::Sigstop => "SIGSTOP",
            Fault::CutInterconnect => "interconnect cut",
        }
    }

    pub fn parse(text: &str) -> Option<Fault> {
        match text {
            "kill9" | "kill" => Some(Fault::Kill9),
            "sigstop" | "stop" => Some(Fault::Sigstop),
            "cut" | "cut-interconnect" => Some(Fault::CutInterconnect),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DrillOptions {
    pub dir: PathBuf,
    pub cycles: u32,
    /// Start no new cycle after this long (the last one finishes).
    pub duration: Option<Duration>,
    pub seed: u64,
    pub faults: Vec<Fault>,
    /// Writers per cycle (NBD connections).
    pub writers: u64,
    pub transport: String,
    /// Also measure takeover timings with the log 1 %, 50 % and 100 % full.
    pub profile_takeover: bool,
    /// The log half sizes the profile runs with (bytes).
    pub profile_halves: Vec<u64>,
}

const VOLUME_BYTES: u64 = 64 << 20;
const HALF_BYTES: u64 = 8 << 20;
const START: Duration = Duration::from_secs(30);
/// A takeover must be done by then (failure detection is ~1 s here).
const TAKEOVER_DEADLINE: Duration = Duration::from_secs(30);

/// One cycle's line in the report.
#[derive(Debug, Clone)]
struct CycleReport {
    fault: Fault,
    victim: u32,
    writes_acked: u64,
    outage_ms: u64,
    /// From the fault to the survivor holding the volume.
    detect_ms: Option<u64>,
    /// The takeover itself: fence, scan, index, serve.
    resume_ms: Option<u64>,
    replay_ms: Option<u64>,
    blocks_verified: u64,
    mismatches: usize,
    took_over: bool,
}

fn volume_of(node: u32) -> &'static str {
    if node == 1 {
        "vol1"
    } else {
        "vol2"
    }
}

fn failed(reason: impl Into<String>) -> Error {
    Error::Misbehaving {
        reason: reason.into(),
    }
}

/// Run the drill; returns whether it passed, and the report.
pub fn run(options: &DrillOptions) -> Result<(bool, String)> {
    if options.transport != "tcp" && !(options.transport == "rdma" && cfg!(feature = "rdma")) {
        return Err(failed(format!(
            "transport `{}` is not available in this build (tcp{})",
            options.transport,
            if cfg!(feature = "rdma") {
                ", rdma"
            } else {
                "; rdma needs --features rdma"
            }
        )));
    }
    let mut report = String::new();
    let _ = writeln!(
        report,
        "nvmirror drill: {} cycles, faults {:?}, seed {}, transport {}, in {}",
        options.cycles,
        options.faults.iter().map(|f| f.name()).collect::<Vec<_>>(),
        options.seed,
        options.transport,
        options.dir.display()
    );
    let mut pair = start_pair(
        options,
        &options.dir.join("pair"),
        "[consistency_point]\ninterval_ms = 1000\n",
        "",
    )?;
    let mut rng = SmallRng::seed_from_u64(options.seed);
    // The ledgers of every volume, across cycles.
    let mut ledgers: Vec<Ledger> = Vec::new();
    let mut cycles = Vec::new();
    let _ = writeln!(
        report,
        "{:>5} {:>16} {:>6} {:>8} {:>10} {:>11} {:>12} {:>10} {:>9} {:>10}",
        "cycle",
        "fault",
        "victim",
        "writes",
        "outage ms",
        "detect ms",
        "takeover ms",
        "replay ms",
        "verified",
        "mismatches"
    );
    let started = Instant::now();
    for cycle in 0..options.cycles {
        if options
            .duration
            .is_some_and(|limit| started.elapsed() >= limit)
        {
            let _ = writeln!(report, "duration reached after {cycle} cycles");
            break;
        }
        // Every fault in turn; the seed decides the moments.
        let fault = options.faults[cycle as usize % options.faults.len()];
        let victim = 1 + (cycle % 2);
        let result = run_cycle(
            &mut pair,
            &mut rng,
            &mut ledgers,
            options,
            cycle,
            fault,
            victim,
        )?;
        let _ = writeln!(
            report,
            "{:>5} {:>16} {:>6} {:>8} {:>10} {:>11} {:>12} {:>10} {:>9} {:>10}",
            cycle + 1,
            result.fault.name(),
            result.victim,
            result.writes_acked,
            result.outage_ms,
            opt(result.detect_ms),
            opt(result.resume_ms),
            opt(result.replay_ms),
            result.blocks_verified,
            result.mismatches
        );
        cycles.push(result);
    }
    for node in [1, 2] {
        let _ = pair.node(node).stop(Duration::from_secs(30));
    }
    let writes: u64 = cycles.iter().map(|c| c.writes_acked).sum();
    let verified: u64 = cycles.iter().map(|c| c.blocks_verified).sum();
    let mismatches: usize = cycles.iter().map(|c| c.mismatches).sum();
    let takeovers = cycles.iter().filter(|c| c.took_over).count();
    let worst_outage = cycles.iter().map(|c| c.outage_ms).max().unwrap_or(0);
    let _ = writeln!(
        report,
        "outage: longest time without an acknowledgement; detect: fault to takeover done; takeover: fence, scan, index, serve"
    );
    let _ = writeln!(
        report,
        "total: {writes} writes acknowledged, {takeovers} takeovers and givebacks, worst outage {worst_outage} ms, \
         {verified} block reads verified, {mismatches} lost or wrong"
    );
    let mut passed = mismatches == 0;
    if options.profile_takeover {
        let (ok, profile) = profile_takeover(options)?;
        report.push_str(&profile);
        passed &= ok;
    }
    let _ = writeln!(report, "result: {}", if passed { "PASS" } else { "FAIL" });
    Ok((passed, report))
}

fn opt(value: Option<u64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn start_pair(
    options: &DrillOptions,
    dir: &std::path::Path,
    extra: &str,
    ha: &str,
) -> Result<PairHarness> {
    start_pair_sized(options, dir, extra, ha, HALF_BYTES, VOLUME_BYTES)
}

fn start_pair_sized(
    options: &DrillOptions,
    dir: &std::path::Path,
    extra: &str,
    ha: &str,
    half_bytes: u64,
    volume_bytes: u64,
) -> Result<PairHarness> {
    let mut pair = PairHarness::configure(PairSpec {
        dir: dir.to_owned(),
        volumes: vec![("vol1".into(), volume_bytes)],
        half_bytes,
        extra_config: extra.to_owned(),
        ha_config: ha.to_owned(),
        binary: None,
        transport: options.transport.clone(),
    })?;
    // Volume names are unique across the pair.
    let path = pair.node(2).config_path.clone();
    let text = std::fs::read_to_string(&path).map_err(|source| NodeError::Io {
        what: "reading a node config",
        path: path.clone(),
        source,
    })?;
    crate::fsutil::write_atomically(
        &path,
        text.replace("name = \"vol1\"", "name = \"vol2\"")
            .as_bytes(),
    )?;
    for node in [1, 2] {
        pair.node(node).start(START)?;
    }
    pair.wait_in_sync(1, START)?;
    pair.wait_in_sync(2, START)?;
    Ok(pair)
}

/// Writers that survive faults: on an error they reconnect to whichever
/// address answers and go on, and measure how long they had no service.
struct Writers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(Ledger, u64)>>,
}

fn start_writers(addresses: Vec<SocketAddr>, ledgers: Vec<Ledger>, seed: u64) -> Writers {
    let stop = Arc::new(AtomicBool::new(false));
    let threads = ledgers
        .into_iter()
        .enumerate()
        .map(|(index, ledger)| {
            let stop = stop.clone();
            let addresses = addresses.clone();
            std::thread::spawn(move || {
                write_until_stopped(&addresses, ledger, seed + index as u64, &stop)
            })
        })
        .collect();
    Writers { stop, threads }
}

impl Writers {
    fn finish(self) -> Result<Vec<(Ledger, u64)>> {
        self.stop.store(true, Ordering::Release);
        self.threads
            .into_iter()
            .map(|thread| thread.join().map_err(|_| failed("a drill writer panicked")))
            .collect()
    }
}

/// Returns the ledger and the longest time without an acknowledgement, in ms.
fn write_until_stopped(
    addresses: &[SocketAddr],
    mut ledger: Ledger,
    seed: u64,
    stop: &AtomicBool,
) -> (Ledger, u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut client: Option<NbdClient> = None;
    // The outage is the longest time between two acknowledgements: it
    // covers a write blocked on a stopped node as well as reconnecting.
    let mut last_ack = Instant::now();
    let mut worst_outage_ms = 0u64;
    let mut attempt = 0usize;
    let writer = seed & 0xffff;
    let mut seq = (ledger.writes_acked + 1) << 20;
    while !stop.load(Ordering::Acquire) {
        let Some(connection) = client.as_mut() else {
            let addr = addresses[attempt % addresses.len()];
            attempt += 1;
            match NbdClient::connect(addr, &ledger.volume, Duration::from_secs(5)) {
                Ok(connected) => client = Some(connected),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
            continue;
        };
        seq += 1;
        let stamp = ((writer + 1) << 40) | seq;
        let run = rng.gen_range(1..=8u64).min(ledger.blocks);
        let start = ledger.first_block + rng.gen_range(0..=ledger.blocks - run);
        let data = ledger.begin_write(start, run, stamp);
        match connection.write(start * BLOCK_BYTES as u64, &data, rng.gen_ratio(1, 16)) {
            Ok(()) => {
                ledger.acknowledge(start, run, stamp);
                worst_outage_ms = worst_outage_ms.max(last_ack.elapsed().as_millis() as u64);
                last_ack = Instant::now();
            }
            Err(_) => {
                // Unacknowledged: it may or may not have landed. The
                // ledger keeps it in flight until a later write to the
                // block is acknowledged.
                client = None;
            }
        }
    }
    (ledger, worst_outage_ms)
}

fn holding(pair: &mut PairHarness, node: u32) -> bool {
    pair.node(node)
        .status()
        .is_ok_and(|s| s.takeover.holding_partner_volumes)
}

fn state_of(pair: &mut PairHarness, node: u32) -> Option<Role> {
    pair.node(node).status().ok().map(|s| s.state)
}

fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() > deadline {
            return Err(failed(format!(
                "timed out after {timeout:?} waiting for {what}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Verify every ledger of `volume` through `addr`.
fn verify_all(addr: SocketAddr, ledgers: &[Ledger]) -> Result<(u64, usize)> {
    let mut blocks = 0;
    let mut mismatches = 0;
    for ledger in ledgers {
        let mut client = NbdClient::connect(addr, &ledger.volume, Duration::from_secs(10))
            .map_err(|error| failed(format!("verifying {}: {error}", ledger.volume)))?;
        let result =
            workload::verify(&mut client, ledger).map_err(|error| failed(error.to_string()))?;
        for mismatch in result.mismatches.iter().take(5) {
            tracing::error!(?mismatch, volume = %ledger.volume, "acknowledged write lost or wrong data");
        }
        blocks += result.blocks_checked;
        mismatches += result.mismatches.len();
        client.disconnect();
    }
    Ok((blocks, mismatches))
}

#[allow(clippy::too_many_arguments)]
fn run_cycle(
    pair: &mut PairHarness,
    rng: &mut SmallRng,
    all_ledgers: &mut Vec<Ledger>,
    options: &DrillOptions,
    cycle: u32,
    fault: Fault,
    victim: u32,
) -> Result<CycleReport> {
    let survivor = 3 - victim;
    let span = tracing::info_span!("drill_cycle", cycle, fault = fault.name(), victim);
    let _entered = span.enter();
    let volume = volume_of(victim);
    let volume_id = crate::storage::volume::volume_id(victim, 0);
    let blocks = VOLUME_BYTES / BLOCK_BYTES as u64;
    let per_writer = blocks / options.writers.max(1);
    // Writers continue the ledgers of earlier cycles on this volume.
    let mut mine: Vec<Ledger> = Vec::new();
    for writer in 0..options.writers.max(1) {
        let first_block = writer * per_writer;
        let position = all_ledgers
            .iter()
            .position(|l| l.volume == volume && l.first_block == first_block);
        mine.push(match position {
            Some(index) => all_ledgers.remove(index),
            None => Ledger {
                volume: volume.into(),
                volume_id,
                first_block,
                blocks: per_writer,
                state: Default::default(),
                writes_acked: 0,
                bytes_acked: 0,
                latencies_us: Vec::new(),
                stopped_by: None,
            },
        });
    }
    let acked_before: u64 = mine.iter().map(|l| l.writes_acked).sum();
    let addresses = vec![pair.node(victim).nbd, pair.node(survivor).nbd];
    let writers = start_writers(addresses, mine, options.seed ^ (u64::from(cycle) << 16));
    std::thread::sleep(Duration::from_millis(rng.gen_range(500..2000)));

    let mut report = CycleReport {
        fault,
        victim,
        writes_acked: 0,
        outage_ms: 0,
        detect_ms: None,
        resume_ms: None,
        replay_ms: None,
        blocks_verified: 0,
        mismatches: 0,
        took_over: false,
    };
    let injected = Instant::now();
    match fault {
        Fault::Kill9 => pair.node(victim).kill9(),
        Fault::Sigstop => pair.node(victim).signal(Signal::SIGSTOP)?,
        Fault::CutInterconnect => {
            let (code, body) = pair
                .node(victim)
                .admin_post("/fault?name=cut-interconnect&duration_ms=3000")?;
            if code != 200 {
                return Err(failed(format!(
                    "cutting the interconnect: HTTP {code}: {body}"
                )));
            }
        }
    }
    if fault == Fault::CutInterconnect {
        // Writes go on, unmirrored; the partner's mailbox is alive, so no
        // takeover may follow.
        std::thread::sleep(Duration::from_secs(4));
        if holding(pair, survivor) || holding(pair, victim) {
            return Err(failed("an interconnect cut led to a takeover"));
        }
        pair.wait_in_sync(victim, START)?;
        pair.wait_in_sync(survivor, START)?;
    } else {
        wait_until("the survivor to take over", TAKEOVER_DEADLINE, || {
            holding(pair, survivor)
        })?;
        report.detect_ms = Some(injected.elapsed().as_millis() as u64);
        report.took_over = true;
        if fault == Fault::Sigstop {
            pair.node(victim).signal(Signal::SIGCONT)?;
        }
        // Service through the survivor for a moment.
        std::thread::sleep(Duration::from_millis(1000));
    }
    let results = writers.finish()?;
    let mut mine = Vec::new();
    for (ledger, outage_ms) in results {
        report.outage_ms = report.outage_ms.max(outage_ms);
        mine.push(ledger);
    }
    report.writes_acked = mine.iter().map(|l| l.writes_acked).sum::<u64>() - acked_before;

    if report.took_over {
        // Every acknowledged write, through the survivor.
        let (blocks, mismatches) = verify_all(pair.node(survivor).nbd, &mine)?;
        report.blocks_verified += blocks;
        report.mismatches += mismatches;
        // Giveback: the victim comes back (or wakes up fenced) and waits.
        if fault == Fault::Kill9 {
            pair.node(victim).start(START)?;
        }
        wait_until("the victim to wait for giveback", START, || {
            matches!(
                state_of(pair, victim),
                Some(Role::WaitingForGiveback | Role::Fenced)
            )
        })?;
        let status = pair.node(survivor).status()?;
        report.resume_ms = status.last_takeover.map(|t| t.resume_ms);
        let (code, body) = pair.node(survivor).admin_post("/giveback")?;
        if code != 200 {
            return Err(failed(format!("giveback: HTTP {code}: {body}")));
        }
        wait_until("the victim to serve again", START, || {
            state_of(pair, victim) == Some(Role::Serving)
        })?;
        let status = pair.node(survivor).status()?;
        report.replay_ms = status.last_takeover.and_then(|t| t.replay_ms);
        pair.wait_in_sync(victim, START)?;
        pair.wait_in_sync(survivor, START)?;
    }
    // Every acknowledged write, through the owner.
    let (blocks, mismatches) = verify_all(pair.node(victim).nbd, &mine)?;
    report.blocks_verified += blocks;
    report.mismatches += mismatches;
    // What is verified is now the truth: nothing is in flight any more.
    for ledger in &mut mine {
        settle_in_flight(pair.node(victim).nbd, ledger)?;
    }
    all_ledgers.extend(mine);
    Ok(report)
}

/// After verification a block's in-flight write either landed or not; read
/// which, so later cycles judge against what is really there.
fn settle_in_flight(addr: SocketAddr, ledger: &mut Ledger) -> Result<()> {
    let pending: Vec<u64> = ledger
        .state
        .iter()
        .filter(|(_, state)| state.in_flight.is_some())
        .map(|(block, _)| *block)
        .collect();
    if pending.is_empty() {
        return Ok(());
    }
    let mut client = NbdClient::connect(addr, &ledger.volume, Duration::from_secs(10))
        .map_err(|error| failed(error.to_string()))?;
    let mut buf = vec![0u8; BLOCK_BYTES];
    for block in pending {
        client
            .read(block * BLOCK_BYTES as u64, &mut buf)
            .map_err(|error| failed(error.to_string()))?;
        let state = ledger.state.get_mut(&block).expect("pending block");
        if let Some(stamp) = state.in_flight.take() {
            if buf == block_pattern(ledger.volume_id, block, stamp) {
                state.acked = stamp;
            }
        }
    }
    client.disconnect();
    Ok(())
}

/// The profile throttles the replay (as an operator protecting foreground
/// I/O would) so that "serving" and "replayed" are visibly apart: to this,
/// or a half every two seconds for larger logs.
const PROFILE_REPLAY_BYTES_PER_S: u64 = 4 << 20;

fn profile_replay_rate(half_bytes: u64) -> u64 {
    PROFILE_REPLAY_BYTES_PER_S.max(half_bytes / 2)
}

/// Takeover timings with the victim's log 1 %, 50 % and 100 % of a half
/// full: from kill -9 to the first read served, to the index being built
/// and served, and to the end of the replay.
fn profile_takeover(options: &DrillOptions) -> Result<(bool, String)> {
    let mut report = String::new();
    let _ = writeln!(
        report,
        "takeover profile (log of node 1; consistency points held off; replay throttled to {} MiB/s, or half a log half a second):",
        PROFILE_REPLAY_BYTES_PER_S >> 20
    );
    let _ = writeln!(
        report,
        "{:>6} {:>9} {:>12} {:>16} {:>12} {:>14} {:>14} {:>10}",
        "half",
        "log full",
        "replay MiB",
        "kill->1st read",
        "index+serve",
        "tail scanned",
        "kill->replayed",
        "verified"
    );
    let mut passed = true;
    for &half_bytes in &options.profile_halves {
        for percent in [1u64, 50, 100] {
            passed &= profile_one(options, &mut report, half_bytes, percent)?;
        }
    }
    let _ = writeln!(
        report,
        "kill->1st read is failure detection (interconnect and mailbox timeouts, 1 s each here) plus fence, index and serve: it does not wait for the replay."
    );
    Ok((passed, report))
}

/// One row of the profile: node 1's log `percent` full of a half of
/// `half_bytes`, kill -9, and node 2's takeover timed.
fn profile_one(
    options: &DrillOptions,
    report: &mut String,
    half_bytes: u64,
    percent: u64,
) -> Result<bool> {
    let volume_bytes = VOLUME_BYTES.max(half_bytes);
    let dir = options
        .dir
        .join(format!("profile-{}-{percent}", half_bytes >> 20));
    let mut pair = start_pair_sized(
        options,
        &dir,
        "[consistency_point]\ninterval_ms = 3600000\nthreshold_percent = 100\n",
        &format!(
            "replay_max_bytes_per_s = {}\n",
            profile_replay_rate(half_bytes)
        ),
        half_bytes,
        volume_bytes,
    )?;
    // Fill the log: distinct blocks, so every byte is replayed. Stay a
    // few records short of closing the half (which would start a CP).
    let target_bytes = (half_bytes * percent / 100)
        .saturating_sub(64 << 10)
        .max(BLOCK_BYTES as u64);
    let record_bytes = (BLOCK_BYTES as u64 + 64) * 16;
    let writes = (target_bytes / record_bytes).max(1);
    let mut ledger = Ledger {
        volume: "vol1".into(),
        volume_id: crate::storage::volume::volume_id(1, 0),
        first_block: 0,
        blocks: volume_bytes / BLOCK_BYTES as u64,
        state: Default::default(),
        writes_acked: 0,
        bytes_acked: 0,
        latencies_us: Vec::new(),
        stopped_by: None,
    };
    let mut client = NbdClient::connect(pair.node(1).nbd, "vol1", Duration::from_secs(10))
        .map_err(|error| failed(error.to_string()))?;
    for i in 0..writes {
        let stamp = (1 << 40) | (i + 1);
        let start = i * 16;
        let mut data = Vec::with_capacity(16 * BLOCK_BYTES);
        for block in start..start + 16 {
            data.extend_from_slice(&block_pattern(ledger.volume_id, block, stamp));
        }
        client
            .write(start * BLOCK_BYTES as u64, &data, false)
            .map_err(|error| failed(error.to_string()))?;
        for block in start..start + 16 {
            ledger.state.entry(block).or_default().acked = stamp;
        }
        ledger.bytes_acked += data.len() as u64;
    }
    client.disconnect();
    let nbd1 = pair.node(1).nbd;
    pair.node(1).kill9();
    let killed = Instant::now();
    // The first read served, on the dead node's address.
    let mut first_read_ms = None;
    let mut buf = vec![0u8; BLOCK_BYTES];
    while killed.elapsed() < TAKEOVER_DEADLINE {
        if let Ok(mut client) = NbdClient::connect(nbd1, "vol1", Duration::from_secs(2)) {
            if client.read(0, &mut buf).is_ok() {
                first_read_ms = Some(killed.elapsed().as_millis() as u64);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // The throttled replay of a full half takes about 2 s (8 MiB: 2 s).
    wait_until("the replay to end", Duration::from_secs(120), || {
        pair.node(2)
            .status()
            .is_ok_and(|s| s.takeover.holding_partner_volumes && !s.replay.active)
    })?;
    let replayed_ms = killed.elapsed().as_millis() as u64;
    let status = pair.node(2).status()?;
    let (blocks, mismatches) = verify_all(pair.node(2).nbd, std::slice::from_ref(&ledger))?;
    let _ = writeln!(
        report,
        "{:>4}Mi {:>8}% {:>12.1} {:>13} ms {:>9} ms {:>14} {:>11} ms {:>10}",
        half_bytes >> 20,
        percent,
        status.replay.total_bytes as f64 / (1 << 20) as f64,
        opt(first_read_ms),
        opt(status.last_takeover.as_ref().map(|t| t.resume_ms)),
        match &status.last_takeover {
            Some(t) if t.cold => "all (cold)".to_owned(),
            Some(t) => format!("{} rec", t.tail_records),
            None => "-".to_owned(),
        },
        replayed_ms,
        if mismatches == 0 {
            format!("{blocks} ok")
        } else {
            format!("{mismatches} BAD")
        }
    );
    for node in [1, 2] {
        let _ = pair.node(node).stop(Duration::from_secs(30));
    }
    Ok(mismatches == 0 && first_read_ms.is_some())
}
