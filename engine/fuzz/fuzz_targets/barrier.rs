//! See check_barrier in ../checks.rs (shared with engine/tests/fuzz_seeds.rs, which replays
//! the seed corpus on stable).
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_barrier(data));
