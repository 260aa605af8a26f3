//! Nomad jobspec → Capstan Job (being written).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
