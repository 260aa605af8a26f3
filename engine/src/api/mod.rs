//! The engine's HTTP API: the mesh CA's endpoints under `/v1/mesh`, and everything
//! else under `/v1/` is the Vault-compatible secrets API (`vault`), which routes its own mounts
//! (sys/, auth/, the KV mount...). Served over HTTPS by `https`; every request to the
//! Vault API is recorded in the `audit` log.

pub mod audit;
pub mod https;
pub mod vault;

use crate::mesh_ca::{self, MeshCaService};
use axum::Router;
use std::sync::Arc;

/// Every mount the engine serves.
pub struct Mounts {
    pub mesh_ca: MeshCaService,
    pub secrets: Arc<vault::Engine>,
}

pub fn router(mounts: Mounts) -> Router {
    Router::new()
        .nest("/v1/mesh", mesh_ca::server::routes(mounts.mesh_ca))
        .fallback_service(vault::routes(mounts.secrets))
}
