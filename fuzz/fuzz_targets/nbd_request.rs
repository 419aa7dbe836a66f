//! Fuzz the NBD request header decoder over a client's byte stream (see
//! `check_nbd_request`).
#![no_main]

#[path = "../../tests/fuzz_checks/mod.rs"]
mod fuzz_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks::check_nbd_request(data));
