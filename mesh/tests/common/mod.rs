//! Helpers shared by the integration tests of capstan-mesh.
#![allow(dead_code)]

pub mod pki;
