//! The mesh CA's HTTPS API as the proxy uses it: sign a CSR with the pod's token, and
//! read the trust bundle. The CA's serving certificate is issued by the mesh CA itself,
//! so the current roots are what we trust it with.

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Uri, header};
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use serde::Deserialize;
use std::{sync::Arc, time::Duration};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_RESPONSE: usize = 256 * 1024;

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

#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<String>,
}

#[derive(Clone)]
pub struct CaClient {
    uri: Uri,
    host: String,
    port: u16,
}

impl CaClient {
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("CA URL {url:?}"))?;
        if uri.scheme_str() != Some("https") {
            bail!("CA URL {url:?}: the mesh CA is only reached over https");
        }
        let host = uri
            .host()
            .ok_or_else(|| anyhow!("CA URL {url:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        Ok(Self { uri, host, port })
    }

    pub async fn sign(&self, roots_pem: &str, token: &str, csr_pem: &str) -> anyhow::Result<SignResponse> {
        let body = serde_json::to_vec(&serde_json::json!({ "csr": csr_pem }))?;
        let bytes = self
            .call(roots_pem, Method::POST, "/v1/mesh/sign", Some(token), body)
            .await?;
        serde_json::from_slice(&bytes).context("the CA's sign response")
    }

    pub async fn roots(&self, roots_pem: &str) -> anyhow::Result<RootsResponse> {
        let bytes = self
            .call(roots_pem, Method::GET, "/v1/mesh/roots", None, Vec::new())
            .await?;
        serde_json::from_slice(&bytes).context("the CA's roots response")
    }

    async fn call(
        &self,
        roots_pem: &str,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> anyhow::Result<Bytes> {
        tokio::time::timeout(TIMEOUT, self.call_inner(roots_pem, method, path, token, body))
            .await
            .map_err(|_| anyhow!("the mesh CA at {} did not answer within {TIMEOUT:?}", self.uri))?
    }

    async fn call_inner(
        &self,
        roots_pem: &str,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> anyhow::Result<Bytes> {
        let tls = TlsConnector::from(tls_config(roots_pem)?);
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("connecting to the mesh CA at {}", self.uri))?;
        let name = ServerName::try_from(self.host.clone()).context("the CA's host name")?;
        let stream = tls
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS with the mesh CA at {}", self.uri))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let driver = tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.host.as_str())
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {}", token.trim()));
        }
        let response = sender
            .send_request(request.body(Full::new(Bytes::from(body)))?)
            .await?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| anyhow!("reading the CA's response: {e}"))?
            .to_bytes();
        driver.abort();
        if !status.is_success() {
            // The CA's error messages name identities, never tokens: safe to log.
            let reason = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.errors.join("; "))
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(200).collect());
            bail!("the mesh CA refused {path}: {status}: {reason}");
        }
        Ok(bytes)
    }
}

fn tls_config(roots_pem: &str) -> anyhow::Result<Arc<ClientConfig>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots
            .add(cert.context("a PEM certificate in the trust bundle")?)
            .context("a root of the trust bundle")?;
    }
    if roots.is_empty() {
        bail!("the trust bundle holds no certificate");
    }
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
