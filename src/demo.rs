//! `nvmirror demo`: a pair on this machine, a verifying workload through
//! NBD, a partner outage and a restart, and a report of what was written
//! and verified. Exits non-zero if any acknowledged write is missing.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::harness::{PairHarness, PairSpec};
use crate::workload::{self, Ledger, Verification};

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub dir: PathBuf,
    pub seconds: u64,
    pub writers: u64,
    pub seed: u64,
}

const VOLUME_BYTES: u64 = 64 << 20;
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Run the demo; returns the report, or an error if something failed to
/// run. A lost write is reported (and `Ok(false)` in the tuple).
pub fn run(options: &DemoOptions) -> Result<(bool, String)> {
    let mut report = String::new();
    let mut pair = PairHarness::configure(PairSpec {
        dir: options.dir.clone(),
        volumes: vec![("vol0".into(), VOLUME_BYTES), ("vol1".into(), VOLUME_BYTES)],
        half_bytes: 8 << 20,
        extra_config: "[checkpoint]\ninterval_ms = 1000\n".into(),
        // The demo shows a partner outage without a takeover; drills take over.
        ha_config: "auto_takeover = false\n".into(),
        binary: None,
    })?;
    let _ = writeln!(
        report,
        "nvmirror demo in {} (seed {})",
        options.dir.display(),
        options.seed
    );
    for node_id in [1, 2] {
        pair.node(node_id).start(START_TIMEOUT)?;
    }
    pair.wait_in_sync(1, START_TIMEOUT)?;
    pair.wait_in_sync(2, START_TIMEOUT)?;
    let (nbd1, nbd2) = (pair.node(1).nbd, pair.node(2).nbd);
    let _ = writeln!(
        report,
        "pair started: node 1 on {nbd1}, node 2 on {nbd2}; both mirrors in sync"
    );

    // Phase 1: the workload, mirrored synchronously.
    let nbd = pair.node(1).nbd;
    let mut ledgers = run_workload(nbd, options, Duration::from_secs(options.seconds), 0)?;
    summarize(
        &mut report,
        "mirrored workload",
        &mut ledgers,
        options.seconds,
    );
    let mirror_identical = wait_until(Duration::from_secs(10), || {
        pair.mirror_matches(1, 2).unwrap_or(false)
    });
    let _ = writeln!(
        report,
        "node 2's mirror of node 1's log: {}",
        if mirror_identical {
            "byte-identical"
        } else {
            "DIFFERENT"
        }
    );

    // Phase 2: the partner goes away; writes go on, acknowledged after local
    // persistence, and the mailbox says the mirror is out of sync.
    pair.node(2).kill9();
    let outage_seconds = (options.seconds / 3).max(1);
    let mut outage = run_workload(nbd, options, Duration::from_secs(outage_seconds), 1_000)?;
    let out_of_sync = pair.mailbox(1)?.is_some_and(|state| !state.mirror_in_sync);
    summarize(
        &mut report,
        "partner down (kill -9)",
        &mut outage,
        outage_seconds,
    );
    let _ = writeln!(
        report,
        "node 1's mailbox says mirror out of sync: {out_of_sync}"
    );
    pair.node(2).start(START_TIMEOUT)?;
    let resync_started = Instant::now();
    pair.wait_in_sync(1, START_TIMEOUT)?;
    let _ = writeln!(
        report,
        "partner back: in sync again after {} ms",
        resync_started.elapsed().as_millis()
    );

    // Phase 3: node 1 restarts (clean stop); everything reads back.
    let stopped = pair.node(1).stop(Duration::from_secs(30))?;
    pair.node(1).start(START_TIMEOUT)?;
    let _ = writeln!(report, "node 1 restarted (SIGTERM exit: {stopped})");
    ledgers.extend(outage);
    merge_ledgers(&mut ledgers);
    let mut all_ok = mirror_identical && out_of_sync;
    let mut total = Verification::default();
    for ledger in &ledgers {
        let mut client = workload::connect(nbd, &ledger.volume).map_err(client_error)?;
        let verification = workload::verify(&mut client, ledger).map_err(client_error)?;
        client.disconnect();
        total.blocks_checked += verification.blocks_checked;
        total.blocks_written += verification.blocks_written;
        total.in_flight_landed += verification.in_flight_landed;
        total.mismatches.extend(verification.mismatches);
    }
    let _ = writeln!(
        report,
        "verified {} blocks ({} written, every one with its last acknowledged pattern): {} mismatches",
        total.blocks_checked,
        total.blocks_written,
        total.mismatches.len()
    );
    for mismatch in total.mismatches.iter().take(10) {
        let _ = writeln!(report, "  {mismatch:?}");
    }
    all_ok &= total.mismatches.is_empty();
    for node_id in [1, 2] {
        let _ = pair.node(node_id).stop(Duration::from_secs(30));
    }
    let _ = writeln!(report, "result: {}", if all_ok { "PASS" } else { "FAIL" });
    Ok((all_ok, report))
}

fn client_error(error: crate::nbd::client::ClientError) -> Error {
    Error::Failed {
        reason: error.to_string(),
    }
}

fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `options.writers` writers, half on each volume, each on its own blocks.
fn run_workload(
    nbd: std::net::SocketAddr,
    options: &DemoOptions,
    duration: Duration,
    seed_offset: u64,
) -> Result<Vec<Ledger>> {
    let writers = options.writers.max(1);
    let blocks_per_volume = VOLUME_BYTES / workload::BLOCK_BYTES as u64;
    let writers_per_volume = writers.div_ceil(2);
    let until = Instant::now() + duration;
    let threads: Vec<_> = (0..writers)
        .map(|writer| {
            let (volume, volume_id) = if writer % 2 == 0 {
                ("vol0", 0)
            } else {
                ("vol1", 1)
            };
            let slot = writer / 2;
            let blocks = blocks_per_volume / writers_per_volume;
            let seed = options.seed ^ (writer + seed_offset).wrapping_mul(0x9E37_79B9);
            std::thread::spawn(move || -> Result<Ledger> {
                let mut client = workload::connect(nbd, volume).map_err(client_error)?;
                let mut ledger = Ledger {
                    volume: volume.into(),
                    volume_id,
                    first_block: slot * blocks,
                    blocks,
                    state: Default::default(),
                    writes_acked: 0,
                    bytes_acked: 0,
                    latencies_us: Vec::new(),
                    stopped_by: None,
                };
                workload::run_writer(
                    &mut client,
                    &mut ledger,
                    writer + 1 + seed_offset,
                    seed,
                    until,
                    u64::MAX,
                );
                client.disconnect();
                Ok(ledger)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|thread| thread.join().expect("writer thread"))
        .collect()
}

/// Fold ledgers of the same blocks (a later phase's writers) into one per
/// block range, the later acknowledgement winning.
fn merge_ledgers(ledgers: &mut Vec<Ledger>) {
    let mut merged: Vec<Ledger> = Vec::new();
    for ledger in ledgers.drain(..) {
        match merged
            .iter_mut()
            .find(|m| m.volume == ledger.volume && m.first_block == ledger.first_block)
        {
            Some(existing) => {
                for (block, state) in ledger.state {
                    let entry = existing.state.entry(block).or_default();
                    if state.acked != 0 {
                        entry.acked = state.acked;
                    }
                    if state.in_flight.is_some() {
                        entry.in_flight = state.in_flight;
                    }
                }
            }
            None => merged.push(ledger),
        }
    }
    *ledgers = merged;
}

fn summarize(report: &mut String, phase: &str, ledgers: &mut [Ledger], seconds: u64) {
    let writes: u64 = ledgers.iter().map(|l| l.writes_acked).sum();
    let bytes: u64 = ledgers.iter().map(|l| l.bytes_acked).sum();
    let mut latencies: Vec<u64> = ledgers
        .iter()
        .flat_map(|l| l.latencies_us.iter().copied())
        .collect();
    let p50 = workload::percentile(&mut latencies, 0.5);
    let p99 = workload::percentile(&mut latencies, 0.99);
    let _ = writeln!(
        report,
        "{phase}: {writes} writes acknowledged ({:.1} MiB) in {seconds} s by {} writers: {:.0} writes/s, {:.1} MiB/s, latency p50 {p50} us, p99 {p99} us",
        bytes as f64 / (1 << 20) as f64,
        ledgers.len(),
        writes as f64 / seconds as f64,
        bytes as f64 / (1 << 20) as f64 / seconds as f64,
    );
    for ledger in ledgers.iter().filter(|l| l.stopped_by.is_some()) {
        let _ = writeln!(
            report,
            "  a writer on {} stopped: {}",
            ledger.volume,
            ledger.stopped_by.as_deref().unwrap_or("")
        );
    }
}
