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

pub struct CaClient {
    uri: Uri,
    host: String,
    port: u16,
    /// The connection of the last call, kept open for the next one, with the bundle its
    /// TLS config trusts: a trust-bundle refresh then costs a request, not a TCP and TLS
    /// handshake (the CA closes a connection idle longer than its header timeout; the
    /// next call dials again).
    kept: tokio::sync::Mutex<Option<Kept>>,
}

struct Kept {
    roots_pem: String,
    /// Built once per bundle rather than per connection (no PEM parsing per refresh).
    config: Arc<ClientConfig>,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
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
        Ok(Self {
            uri,
            host,
            port,
            kept: tokio::sync::Mutex::new(None),
        })
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
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.host.as_str())
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {}", token.trim()));
        }
        let request = request.body(Full::new(Bytes::from(body)))?;
        // One call at a time (there is one caller): the lock is held across it.
        let mut kept = self.kept.lock().await;
        if kept.as_ref().is_none_or(|k| k.roots_pem != roots_pem) {
            *kept = Some(Kept {
                roots_pem: roots_pem.to_owned(),
                config: tls_config(roots_pem)?,
                sender: None,
            });
        }
        let kept = kept.as_mut().expect("set above");
        let (sender, fresh) = match kept.sender.take().filter(|s| !s.is_closed()) {
            Some(sender) => (sender, false),
            None => (self.dial(&kept.config).await?, true),
        };
        let config = kept.config.clone();
        let (sender, response) =
            super::http1::send_retrying_once(sender, fresh, request, || self.dial(&config)).await?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| anyhow!("reading the CA's response: {e}"))?
            .to_bytes();
        kept.sender = Some(sender);
        if !status.is_success() {
            // The CA's error messages name identities, never tokens: safe to log.
            let reason = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.errors.join("; "))
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(200).collect());
            bail!("the mesh CA refused {path}: {status}: {reason}");
        }
        Ok(bytes)
    }

    /// A new HTTPS connection to the CA, its driver on a task of its own that ends when
    /// the connection closes (or its sender is dropped).
    async fn dial(
        &self,
        config: &Arc<ClientConfig>,
    ) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("connecting to the mesh CA at {}", self.uri))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.host.clone()).context("the CA's host name")?;
        let stream = TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS with the mesh CA at {}", self.uri))?;
        Ok(super::http1::handshake(stream, "the mesh CA").await?)
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
    let mut config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // As with the mesh's own connections (M13): every new connection verifies the CA's
    // certificate against the current bundle, none resumes a session verified earlier.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}
