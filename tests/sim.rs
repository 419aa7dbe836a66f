//! The deterministic simulation of the pair (`nvmirror::testing::sim`) as a test:
//! a fixed budget of seeds must pass, each seed must replay exactly, and
//! deliberately broken nodes must be caught within the same budget.
//!
//! `NVMIRROR_SIM_SEEDS` (default 150) and `NVMIRROR_SIM_FIRST_SEED`
//! (default 1) change the budget; `nvmirror sim --soak` runs seeds until
//! stopped.

use nvmirror::testing::sim::InjectedBug;
use nvmirror::testing::sim::{self, SimOptions};

const STEPS: u64 = 3000;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text} is not a number")),
        Err(_) => default,
    }
}

fn seeds() -> std::ops::Range<u64> {
    let first = env_u64("NVMIRROR_SIM_FIRST_SEED", 1);
    first..first + env_u64("NVMIRROR_SIM_SEEDS", 150)
}

#[test]
fn the_ci_seeds_find_no_violation() {
    let mut totals = sim::SimReport::default();
    for seed in seeds() {
        let options = SimOptions {
            seed,
            steps: STEPS,
            bug: None,
        };
        match sim::run(&options) {
            Ok(report) => {
                totals.writes_acked += report.writes_acked;
                totals.reads_checked += report.reads_checked;
                totals.crashes += report.crashes;
                totals.power_losses += report.power_losses;
                totals.takeovers += report.takeovers;
                totals.forced_takeovers += report.forced_takeovers;
                totals.givebacks += report.givebacks;
                totals.partitions += report.partitions;
                totals.stalls += report.stalls;
                totals.torn_mirror_writes += report.torn_mirror_writes;
                totals.disk_faults += report.disk_faults;
            }
            Err(failure) => panic!("{failure}"),
        }
    }
    println!(
        "{} seeds: {} writes acknowledged, {} reads checked; {} crashes ({} power losses), {} stalls, \
         {} partitions, {} torn mirror writes, {} disk errors; {} takeovers ({} forced), {} givebacks",
        seeds().count(),
        totals.writes_acked,
        totals.reads_checked,
        totals.crashes,
        totals.power_losses,
        totals.stalls,
        totals.partitions,
        totals.torn_mirror_writes,
        totals.disk_faults,
        totals.takeovers,
        totals.forced_takeovers,
        totals.givebacks
    );
    // The budget exercises what it claims to.
    assert!(
        totals.takeovers > totals.forced_takeovers,
        "automatic takeovers happen"
    );
    assert!(totals.givebacks > 0 && totals.power_losses > 0 && totals.torn_mirror_writes > 0);
    assert!(totals.stalls > 0 && totals.partitions > 0 && totals.disk_faults > 0);
}

/// Seeds that once lost an acknowledged write, with the steps they took.
const REGRESSIONS: &[(u64, u64, &str)] = &[
    (
        6344674118206575853,
        6000,
        "a giveback to a node that had crashed, then a second takeover before it \
     came back, replayed the mirror of its log that the first takeover had \
     replayed already: an older block over a newer one",
    ),
    (
        10561609915591390393,
        6000,
        "after a power loss the log reused the offsets and LSNs of records it \
     had lost but the partner's mirror held; once it grew past the resync's \
     guard, a takeover replayed a lost, unacknowledged write over an \
     acknowledged one",
    ),
];

#[test]
fn seeds_that_once_failed_pass() {
    for &(seed, steps, what) in REGRESSIONS {
        let options = SimOptions {
            seed,
            steps,
            bug: None,
        };
        if let Err(failure) = sim::run(&options) {
            panic!("regression seed {seed} ({what}) fails again:\n{failure}");
        }
    }
}

#[test]
fn a_seed_replays_exactly() {
    for (seed, bug) in [
        (7, None),
        (7, Some(InjectedBug::AckBeforePlaced)),
        (150, Some(InjectedBug::AckBeforePlaced)),
    ] {
        let options = SimOptions {
            seed,
            steps: STEPS,
            bug,
        };
        let first = sim::run(&options);
        let second = sim::run(&options);
        match (first, second) {
            (Ok(a), Ok(b)) => {
                assert_eq!(format!("{a}"), format!("{b}"));
                assert_eq!(
                    a.trace_digest, b.trace_digest,
                    "seed {seed}: the steps differ"
                );
            }
            (Err(a), Err(b)) => {
                assert_eq!(a.report.trace_digest, b.report.trace_digest);
                assert_eq!(a.step, b.step);
                assert_eq!(a.violation, b.violation);
                assert_eq!(a.trace, b.trace);
            }
            (a, b) => panic!("seed {seed} ran two ways: {a:?} / {b:?}"),
        }
    }
}

/// The first seed of the budget that catches `bug`.
fn caught(bug: InjectedBug) -> Option<(u64, String)> {
    seeds().find_map(|seed| {
        let options = SimOptions {
            seed,
            steps: STEPS,
            bug: Some(bug),
        };
        sim::run(&options)
            .err()
            .map(|failure| (seed, failure.violation))
    })
}

#[test]
fn acknowledging_before_the_mirror_has_a_write_is_caught() {
    let (seed, violation) = caught(InjectedBug::AckBeforePlaced)
        .expect("the seed budget must catch a node that acknowledges before mirroring");
    println!("caught at seed {seed}: {violation}");
    assert!(
        violation.contains("an acknowledged write was lost"),
        "{violation}"
    );
}

#[test]
fn a_stale_owner_that_skips_the_epoch_check_is_caught() {
    let (seed, violation) = caught(InjectedBug::SkipEpochCheck)
        .expect("the seed budget must catch a node that ignores fencing");
    println!("caught at seed {seed}: {violation}");
    assert!(violation.contains("a stale owner wrote"), "{violation}");
}
