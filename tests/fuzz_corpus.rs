//! Replays the seed corpora of nvmirror's fuzz targets (`fuzz/`) and every
//! input that ever crashed them, as an ordinary test.

mod fuzz_checks;

use std::path::Path;

/// A fuzz target's name, its check, and the fewest seeds its corpus holds.
type Target = (&'static str, fn(&[u8]), usize);

const TARGETS: [Target; 6] = [
    ("nbd_request", fuzz_checks::check_nbd_request, 5),
    ("nbd_handshake", fuzz_checks::check_nbd_handshake, 8),
    ("mailbox", fuzz_checks::check_mailbox, 2),
    ("owner", fuzz_checks::check_owner, 2),
    ("takeover_index", fuzz_checks::check_takeover_index, 4),
    ("config", fuzz_checks::check_config, 11),
];

/// Replays `corpus/<target>` and `regressions/<target>`; returns how many
/// seeds the corpus held.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut seeds = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("corpus entry").path();
            if path.file_name().is_some_and(|name| name == ".keep") {
                continue;
            }
            let data = std::fs::read(&path).expect("read corpus file");
            println!("replaying {}", path.display());
            check(&data);
            if dir == "corpus" {
                seeds += 1;
            }
        }
    }
    seeds
}

#[test]
fn every_corpus_and_regression_passes() {
    for (target, check, seeds_min) in TARGETS {
        let seeds = replay(target, check);
        assert!(
            seeds >= seeds_min,
            "the committed seed corpus of {target} is missing ({seeds} inputs)"
        );
    }
}

#[test]
fn every_fuzz_target_is_replayed() {
    let targets = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    for entry in std::fs::read_dir(targets).expect("fuzz targets") {
        let path = entry.expect("fuzz target").path();
        let name = path.file_stem().expect("file name").to_string_lossy();
        assert!(
            TARGETS.iter().any(|(target, _, _)| *target == name),
            "fuzz target {name} has no replay here"
        );
    }
}
