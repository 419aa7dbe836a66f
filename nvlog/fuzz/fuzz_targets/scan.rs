//! Fuzz the log scanner (see `check_scan` for the property).
#![no_main]

#[path = "../../tests/scan_check/mod.rs"]
mod scan_check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| scan_check::check_scan(data));
