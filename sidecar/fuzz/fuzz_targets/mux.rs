//! The mux frame reader (sidecar/src/mux.rs) against arbitrary bytes from a peer, on
//! either side: never panics, and the connection always ends after the peer's end.
//! The checks live in sidecar/tests/common/fuzz_checks.rs, shared with the stable test
//! that replays the seed corpus.
#![no_main]

#[path = "../../tests/common/fuzz_checks.rs"]
mod fuzz_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks::check_mux(data));
