//! The jobspec converter (RELIABILITY N1) against arbitrary bytes, read as HCL, as JSON or
//! as whichever the text looks like: never panics, and what it returns holds together
//! (a Job that serializes and reads back the same, a DNS-label name; an error's line
//! inside the input). The checks live in jobspec/tests/common/fuzz_checks.rs, shared with
//! the stable test that replays the seed corpus.
#![no_main]

#[path = "../../tests/common/fuzz_checks.rs"]
mod fuzz_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks::check_convert(data));
