//! The Capstan secrets engine. Today: the mesh CA (`ca`, the signing core; `mesh_ca`, its
//! endpoint, storage in a Secret and rotation), served over HTTPS (`https`) by the
//! `capstan-engine` binary through one router of mounts (`api`). The barrier, auth
//! methods, policies, leases and secrets engines (KV v2, PKI with the mesh CA as one
//! mount, database) come with the secrets issue, as further mounts.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod api;
pub mod audit;
pub mod auth_kubernetes;
pub mod barrier;
pub mod ca;
pub mod clock;
pub mod database;
pub mod declared;
pub mod dev_unseal;
pub mod https;
pub mod kv;
pub mod lease;
pub mod logical;
pub mod mesh_ca;
pub mod pki;
pub mod policies;
pub mod policy;
pub mod seal;
pub mod shamir;
pub mod storage;
pub mod token;
pub mod vault;
