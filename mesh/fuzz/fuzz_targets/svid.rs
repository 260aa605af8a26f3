//! The X509-SVID validator and SPIFFE ID parser on arbitrary bytes: never panic, and
//! the verifiers agree with one another.
//! The checks live in mesh/tests/common/fuzz_checks.rs, shared with the stable test that
//! replays the seed corpus.
#![no_main]

#[path = "../../tests/common/fuzz_checks.rs"]
mod fuzz_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks::check_svid(data));
