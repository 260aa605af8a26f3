//! The HTTP side of the mesh CA: `POST /sign` and `GET /roots`, mounted under
//! `/v1/mesh` by `crate::api`.

use super::{MeshCaService, metrics::SignResult, signing::CaError};
use crate::auth::kubernetes::tokenreview::{AuthError, bearer};
use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// A CSR is well under 1 KiB; anything near this is not a CSR.
pub const MAX_BODY: usize = 64 * 1024;

pub fn routes(ca: MeshCaService) -> Router {
    Router::new()
        .route("/sign", post(sign))
        .route("/roots", get(roots))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(ca)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignRequest {
    csr: String,
}

#[derive(Serialize)]
struct SignResponse {
    certificate: String,
    chain: Vec<String>,
    roots: Vec<String>,
    spiffe_id: String,
    not_after: String,
    ttl_seconds: u64,
}

#[derive(Serialize)]
struct RootsResponse<'a> {
    trust_domain: &'a str,
    roots: &'a [String],
    active: &'a str,
}

/// An error answer: `{"errors": [..]}` with its status and how it is counted.
pub struct ApiError {
    status: StatusCode,
    message: String,
    result: SignResult,
}

impl ApiError {
    fn new(status: StatusCode, result: SignResult, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            result,
        }
    }

    fn not_ready() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            SignResult::error,
            "the mesh CA is not ready yet (its Secret has not been loaded)",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(serde_json::json!({"errors": [self.message]}))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                SignResult::error,
                "the token could not be checked now (TokenReview failed); retry",
            ),
            other => Self::new(StatusCode::UNAUTHORIZED, SignResult::denied, other.to_string()),
        }
    }
}

impl From<CaError> for ApiError {
    fn from(error: CaError) -> Self {
        match error {
            CaError::ForeignIdentity { .. } => {
                Self::new(StatusCode::FORBIDDEN, SignResult::denied, error.to_string())
            }
            CaError::Csr | CaError::ForeignName(..) | CaError::WantsCa | CaError::KeyAlgorithm => Self::new(
                StatusCode::BAD_REQUEST,
                SignResult::invalid,
                format!("csr: {error}"),
            ),
            // The token named a ServiceAccount we cannot put in a SPIFFE ID: refuse it.
            CaError::Identity(_) => Self::new(StatusCode::FORBIDDEN, SignResult::denied, error.to_string()),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                SignResult::error,
                "signing failed",
            ),
        }
    }
}

async fn sign(
    State(ca): State<MeshCaService>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let outcome = sign_request(&ca, &headers, body).await;
    let metrics = ca.metrics();
    metrics.sign_duration.observe(started.elapsed().as_secs_f64());
    match outcome {
        Ok(response) => {
            metrics.count(SignResult::issued);
            (StatusCode::OK, Json(response)).into_response()
        }
        Err(error) => {
            metrics.count(error.result);
            error.into_response()
        }
    }
}

async fn sign_request(
    ca: &MeshCaService,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<SignResponse, ApiError> {
    let current = ca.current().ok_or_else(ApiError::not_ready)?;
    let token = bearer(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()))?;
    let caller = match ca.reviewer().review(token).await {
        Ok(caller) => caller,
        Err(error) => {
            tracing::info!(error = %error, "Refused a signing request: token not accepted");
            return Err(error.into());
        }
    };
    let body = body.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            SignResult::invalid,
            format!("request body: {} (at most {MAX_BODY} bytes)", e.body_text()),
        )
    })?;
    let request: SignRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            SignResult::invalid,
            format!("request body: expected {{\"csr\": \"<PKCS#10 PEM>\"}}: {e}"),
        )
    })?;
    let config = ca.config();
    let leaf = match current
        .material
        .ca
        .sign(&request.csr, &caller.identity, config.leaf_ttl)
    {
        Ok(leaf) => leaf,
        Err(error) => {
            tracing::warn!(
                namespace = %caller.identity.namespace,
                service_account = %caller.identity.service_account,
                sa_uid = %caller.uid,
                pod = caller.pod.as_deref().unwrap_or(""),
                %error,
                "Refused a signing request"
            );
            return Err(error.into());
        }
    };
    let now = time::OffsetDateTime::now_utc();
    let remaining = (leaf.not_after - now).as_seconds_f64().round().max(0.0) as u64;
    let not_after = jiff::Timestamp::from_second(leaf.not_after.unix_timestamp())
        .map(|t| t.to_string())
        .unwrap_or_default();
    ca.metrics().last_leaf_expiry.set(leaf.not_after.unix_timestamp());
    tracing::info!(
        spiffe_id = %leaf.spiffe_id,
        sa_uid = %caller.uid,
        pod = caller.pod.as_deref().unwrap_or(""),
        %not_after,
        "Issued a mesh certificate"
    );
    Ok(SignResponse {
        certificate: leaf.certificate_pem,
        chain: current.material.chain.clone(),
        roots: current.material.roots.clone(),
        spiffe_id: leaf.spiffe_id,
        not_after,
        ttl_seconds: remaining.min(config.leaf_ttl.as_secs()),
    })
}

async fn roots(State(ca): State<MeshCaService>) -> Response {
    let Some(current) = ca.current() else {
        return ApiError::not_ready().into_response();
    };
    Json(RootsResponse {
        trust_domain: &ca.config().trust_domain,
        roots: &current.material.roots,
        active: &current.material.active_root,
    })
    .into_response()
}
