//! Replays the seed corpora of the interconnect's fuzz targets and every
//! input that ever crashed them, as an ordinary test.

mod fuzz_checks;

use std::path::Path;

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

/// The fuzz targets (`interconnect/fuzz/fuzz_targets/<target>.rs`), each
/// replayed by a test below.
const TARGETS: [&str; 3] = ["frame", "control", "handshake"];

#[test]
fn every_fuzz_target_is_replayed() {
    let targets = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    for entry in std::fs::read_dir(targets).expect("fuzz targets") {
        let path = entry.expect("fuzz target").path();
        let name = path.file_stem().expect("file name").to_string_lossy();
        assert!(
            TARGETS.contains(&&*name),
            "fuzz target {name} has no replay here"
        );
    }
}

#[test]
fn frame_corpus_and_regressions_pass() {
    let seeds = replay("frame", fuzz_checks::check_frame);
    assert!(
        seeds >= 9,
        "the committed seed corpus is missing ({seeds} inputs)"
    );
}

#[test]
fn control_corpus_and_regressions_pass() {
    let seeds = replay("control", fuzz_checks::check_control);
    assert!(
        seeds >= 6,
        "the committed seed corpus is missing ({seeds} inputs)"
    );
}

#[test]
fn handshake_corpus_and_regressions_pass() {
    let seeds = replay("handshake", fuzz_checks::check_handshake);
    assert!(
        seeds >= 5,
        "the committed seed corpus is missing ({seeds} inputs)"
    );
}
