//! The `jobs.capstan.dev` group: Nomad's job model.

mod job;

pub use job::*;
