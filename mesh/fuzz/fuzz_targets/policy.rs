//! The intention matcher: never panics, and every spelling of a request path that
//! normalizes alike is decided alike (so no spelling dodges a deny rule).
//! The checks live in mesh/tests/common/fuzz_checks.rs, shared with the stable test that
//! replays the seed corpus.
#![no_main]

#[path = "../../tests/common/fuzz_checks.rs"]
mod fuzz_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks::check_policy(data));
