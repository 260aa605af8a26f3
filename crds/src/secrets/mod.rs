//! `secrets.capstan.dev`: the secrets engine (Vault on Kubernetes) and SecretSync.

mod agent_files;
mod engine_config;
mod secret_sync;
mod storage_entry;

pub use agent_files::*;
pub use engine_config::*;
pub use secret_sync::*;
pub use storage_entry::*;

pub const GROUP: &str = "secrets.capstan.dev";
