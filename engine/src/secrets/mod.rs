//! The secrets engines, each served as a mount of the Vault-compatible API: KV version 2
//! (`kv`), PKI (`pki`) and PostgreSQL credentials (`database`), and the leases
//! (`lease`) of the credentials they hand out, revoked when they expire.

pub mod database;
pub mod kv;
pub mod lease;
pub mod named;
pub mod pki;
