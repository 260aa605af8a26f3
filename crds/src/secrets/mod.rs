//! `secrets.capstan.dev`: the secrets engine (Vault on Kubernetes) and SecretSync.

mod secret_sync;
mod storage_entry;

pub use secret_sync::*;
pub use storage_entry::*;

pub const GROUP: &str = "secrets.capstan.dev";
