//! The Capstan secrets engine. Its barrier, storage, auth methods, policies, leases and
//! secrets engines (KV v2, PKI with the mesh CA as one mount, database) arrive with the
//! mesh and secrets issues; the crate exists now so the workspace has the layout that
//! DESIGN.md fixes and the others can depend on it without moving code later.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
