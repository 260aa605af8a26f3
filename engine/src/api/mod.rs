//! The engine's HTTP API: the mesh CA's endpoints under `/v1/mesh`, and everything
//! else under `/v1/` is the Vault-compatible secrets API (`crate::vault`), which routes
//! its own mounts (sys/, auth/, the KV mount...).

use crate::{
    mesh_ca::{self, MeshCaService},
    vault,
};
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
