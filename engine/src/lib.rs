//! The Capstan secrets engine, grouped by what each part is:
//!
//! - `store`: where everything is kept: physical storage in StorageEntry objects
//!   (`storage`), the barrier that encrypts every value (`barrier`), the seal that holds
//!   the barrier's keys (`seal`, split into shares by `shamir`), the barrier-backed view
//!   the rest of the engine reads and writes (`logical`), and the clock.
//! - `auth`: who is asking: tokens (`token`) and the Kubernetes auth method
//!   (`kubernetes`, which checks ServiceAccount tokens with TokenReview).
//! - `policy`: what a token may do: the ACL policy language and its store.
//! - `secrets`: the secrets engines (KV v2, PKI, database) and the leases of what they
//!   hand out.
//! - `mesh_ca`: the mesh CA (its signing core, its endpoint under `/v1/mesh`, its key in
//!   a Secret, rotation).
//! - `api`: the HTTPS API: one router for the mesh CA's endpoint and the Vault-compatible
//!   API (`vault`), its request pipeline, and the audit log.
//! - `declared`: policies and auth roles declared as Kubernetes objects.
//!
//! The `capstan-engine` binary (main.rs) wires them together.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod api;
pub mod auth;
pub mod declared;
pub mod mesh_ca;
pub mod policy;
pub mod secrets;
pub mod store;
