//! capstan-webhook's pure part, a library so that its benchmark can call it: the
//! injectors (`inject`). The admission server around them is the binary (`main.rs`).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod inject;
