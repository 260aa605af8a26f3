//! The Capstan secrets engine. Today: the mesh CA's signing core (`ca`). Its endpoint,
//! storage in a Secret and rotation come with the rest of the mesh issue; the barrier,
//! auth methods, policies, leases and secrets engines (KV v2, PKI with the mesh CA as one
//! mount, database) with the secrets issue.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod ca;
