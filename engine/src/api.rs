//! The engine's HTTP API: one router, one mount per engine. The mesh CA is the first
//! mount; the secrets engine's mounts (sys/, auth/, kv/, pki/...) are added here as
//! they arrive, each a `Router` of its own nested under its path.

use crate::mesh_ca::{self, MeshCaService};
use axum::{Json, Router, http::StatusCode, response::IntoResponse};

/// Every mount the engine serves.
pub struct Mounts {
    pub mesh_ca: MeshCaService,
}

pub fn router(mounts: Mounts) -> Router {
    Router::new()
        .nest("/v1/mesh", mesh_ca::server::routes(mounts.mesh_ca))
        .fallback(not_found)
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({"errors": ["no such path"]})),
    )
}
