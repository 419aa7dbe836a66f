//! Fuzz the NBD option decoders over a client's handshake bytes (see
//! `check_nbd_handshake`).
#![no_main]

#[path = "../../tests/fuzz_checks/mod.rs"]
mod fuzz_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks::check_nbd_handshake(data));
