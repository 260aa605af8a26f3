//! `secrets.capstan.dev`: the secrets engine (Vault on Kubernetes).

mod storage_entry;

pub use storage_entry::*;

pub const GROUP: &str = "secrets.capstan.dev";
