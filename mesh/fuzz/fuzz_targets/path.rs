//! The HTTP path normalizer (RELIABILITY M3): never panics, idempotent, and never yields
//! "//", "/./", "/../", a backslash or an encoded separator.
//! The checks live in mesh/tests/common/fuzz_checks.rs, shared with the stable test that
//! replays the seed corpus.
#![no_main]

#[path = "../../tests/common/fuzz_checks.rs"]
mod fuzz_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks::check_path(data));
