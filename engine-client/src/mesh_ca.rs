//! The mesh CA's API (`/v1/mesh/...` on the engine): a proxy signs its CSR with its pod's
//! ServiceAccount token (audience `capstan_contract::MESH_CA_AUDIENCE`) and reads the
//! trust bundle.

use crate::{Auth, Client, Error};
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
        let body = serde_json::json!({ "csr": csr_pem });
        let answer = self
            .call_redacting(
                Method::POST,
                "mesh/sign",
                Auth::Bearer(token),
                Some(&body),
                &[token],
            )
            .await?;
        decode("mesh/sign", answer)
    }

    /// `GET /v1/mesh/roots`: the trust bundle (current and next roots in a rotation).
    pub async fn mesh_roots(&self) -> Result<RootsResponse, Error> {
        let answer = self
            .call_redacting(Method::GET, "mesh/roots", Auth::None, None, &[])
            .await?;
        decode("mesh/roots", answer)
    }
}

/// The CA's answers hold certificates, which are public: serde's messages may quote them.
/// (The CA's error messages name identities, never tokens.)
fn decode<T: serde::de::DeserializeOwned>(path: &str, answer: serde_json::Value) -> Result<T, Error> {
    serde_json::from_value(answer).map_err(|e| Error::Protocol {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}
