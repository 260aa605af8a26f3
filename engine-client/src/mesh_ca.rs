//! The mesh CA's API (`/v1/mesh/...` on the engine): a proxy signs its CSR with its pod's
//! ServiceAccount token (audience `capstan_contract::MESH_CA_AUDIENCE`) and reads the
//! trust bundle.

use crate::{Auth, Client, Error};
use bytes::Bytes;
use http::Method;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct SignResponse {
    pub certificate: String,
    #[serde(default)]
    pub chain: Vec<String>,
    pub roots: Vec<String>,
    pub spiffe_id: String,
    pub not_after: String,
}

#[derive(Debug, Deserialize)]
pub struct RootsResponse {
    pub roots: Vec<String>,
}

impl Client {
    /// `POST /v1/mesh/sign`: a leaf certificate for `csr_pem`, for the identity `token`
    /// proves.
    pub async fn mesh_sign(&self, token: &str, csr_pem: &str) -> Result<SignResponse, Error> {
        let body = serde_json::json!({ "csr": csr_pem }).to_string();
        self.mesh_call(
            Method::POST,
            "mesh/sign",
            Auth::Bearer(token),
            Some(Bytes::from(body)),
            &[token],
        )
        .await
    }

    /// `GET /v1/mesh/roots`: the trust bundle (current and next roots in a rotation).
    pub async fn mesh_roots(&self) -> Result<RootsResponse, Error> {
        self.mesh_call(Method::GET, "mesh/roots", Auth::None, None, &[])
            .await
    }

    async fn mesh_call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        auth: Auth<'_>,
        body: Option<Bytes>,
        sensitive: &[&str],
    ) -> Result<T, Error> {
        let answer = self
            .send(method, &format!("/v1/{path}"), auth, body, sensitive)
            .await?;
        if !answer.status.is_success() {
            // The CA's error messages name identities, never tokens.
            return Err(crate::ApiError::parse(path, answer.status, &answer.body, sensitive).into());
        }
        // These answers hold certificates, which are public: serde may quote them.
        serde_json::from_slice(&answer.body).map_err(|e| Error::Protocol {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }
}
