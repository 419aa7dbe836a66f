//! Replays the scan fuzz target's seed corpus and every input that ever
//! crashed it, as an ordinary test.

mod scan_check;

#[test]
fn scan_corpus_and_regressions_pass() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for dir in ["corpus/scan", "regressions/scan"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("corpus entry").path();
            let data = std::fs::read(&path).expect("read corpus file");
            println!("replaying {}", path.display());
            scan_check::check_scan(&data);
            replayed += 1;
        }
    }
    assert!(
        replayed >= 4,
        "the committed seed corpus is missing ({replayed} inputs)"
    );
}
