//! One typed HTTPS client for capstan-engine's API: the Vault-compatible secrets API and
//! the mesh CA's. SecretSync (controllers), the secrets agent and the mesh proxy
//! (sidecar) and the end-to-end tests all speak to the engine through it.
//!
//! Why one crate: there were four hand-made clients, each with its own TLS setup, timeout,
//! body limit and error parsing, and the Job and InfraStack reconcilers would have added
//! two more. What they shared is here once:
//!
//! - hyper-util's pooled client, HTTP/1.1 kept alive, over TLS 1.3 (rustls, ring) that
//!   trusts only the mesh roots ([`Roots`]: bytes, a file re-read per connection, or a
//!   handle the caller swaps when the roots rotate);
//! - a connect timeout and a whole-request timeout, a body limit, and a [`Retry`] policy
//!   that repeats only what cannot have been done ([`Options`]; each caller keeps the
//!   settings it had);
//! - Vault's error bodies (`{"errors": [...]}`) as a typed [`ApiError`] with the status
//!   and messages; no error carries a token, a lease id or a secret value;
//! - typed calls (login, token renew/revoke, KV v2, database credentials, PKI, leases,
//!   sys init/unseal, the mesh CA's sign and roots) and a raw [`Client::call`] /
//!   [`Client::send`] for the rest.

mod client;
mod connect;
mod error;
mod mesh_ca;
mod roots;
mod vault;

pub use client::{Answer, Auth, Client, Options, Retry};
pub use error::{ApiError, Error, MESSAGE_CHARS, redact};
pub use http::{Method, StatusCode};
pub use mesh_ca::{RootsResponse, SignResponse};
pub use roots::{Roots, tls_config};
pub use vault::{KvEntry, Leased, Login, PkiIssue, PodRevoked, REVOKE_POD, REVOKE_SELF, Renewed};
