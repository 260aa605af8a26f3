//! The parts of capstan-sidecar that other crates reach: the framing between two
//! sidecars, which its fuzz target (sidecar/fuzz) drives with untrusted bytes.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod mux;
