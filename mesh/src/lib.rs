//! The mesh's pure core: which pods are meshed, which ServiceIntentions is in force for a
//! destination, how request paths are normalized, and how intentions decide connections
//! and requests.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod decide;
pub mod in_force;
pub mod path;
pub mod selection;
pub mod svid;
pub mod understood;
pub mod validate;

pub use decide::{ConnectionDecision, DecidedBy, Decision, Identity, Policy, Request, compile_pattern};
pub use svid::{SpiffeId, SvidClientVerifier, SvidError, SvidServerVerifier, TrustBundle};
