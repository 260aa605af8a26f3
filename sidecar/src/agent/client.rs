//! The secrets engine's Vault-compatible HTTPS API as the agent uses it: one kept-alive
//! HTTP/1.1 connection over TLS 1.3 (rustls, ring), trusting only the mesh roots. A poll
//! every 250 ms then costs one request, not a handshake.
//!
//! Nothing here logs or returns a secret: responses are parsed into `serde_json::Value`
//! (serde's messages about typed fields can quote the input) and errors carry the path,
//! the status and the engine's own error messages, which name paths and reasons only.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, StatusCode, Uri, client::conn::http1::SendRequest, header};
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use serde_json::Value;
use std::{path::PathBuf, sync::Arc, time::Duration};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_RESPONSE: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the engine URL {0:?} is not https://host[:port]")]
    Url(String),
    #[error("the mesh trust bundle: {0}")]
    Roots(String),
    #[error("connecting to the engine at {uri}")]
    Connect {
        uri: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP with the engine")]
    Http(#[source] hyper::Error),
    #[error("the engine did not answer within {TIMEOUT:?}")]
    Timeout,
    #[error("the engine's answer to {path} is not JSON")]
    NotJson { path: String },
    #[error("the engine refused {path}: {status}: {reason}")]
    Refused {
        path: String,
        status: StatusCode,
        reason: String,
    },
}

impl ClientError {
    /// The status the engine answered with, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Where the trust bundle comes from.
#[derive(Clone)]
pub enum Roots {
    Pem(String),
    File(PathBuf),
}

pub struct EngineClient {
    uri: String,
    host: String,
    port: u16,
    roots: Roots,
    connection: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl EngineClient {
    pub fn new(url: &str, roots: Roots) -> Result<Self, ClientError> {
        let uri: Uri = url.parse().map_err(|_| ClientError::Url(url.to_owned()))?;
        if uri.scheme_str() != Some("https") {
            return Err(ClientError::Url(url.to_owned()));
        }
        let host = uri
            .host()
            .ok_or_else(|| ClientError::Url(url.to_owned()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        // Fail at start on a bundle that cannot be used.
        tls_config(&roots)?;
        Ok(Self {
            uri: url.trim_end_matches('/').to_owned(),
            host,
            port,
            roots,
            connection: tokio::sync::Mutex::new(None),
        })
    }

    /// One API call under `/v1/`; the JSON body of a 2xx answer (Null for 204).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        match tokio::time::timeout(TIMEOUT, self.call_inner(method, path, token, body)).await {
            Ok(result) => result,
            Err(_) => {
                // The request was abandoned midway: its connection is not reused.
                *self.connection.lock().await = None;
                Err(ClientError::Timeout)
            }
        }
    }

    async fn call_inner(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let mut connection = self.connection.lock().await;
        // A kept connection the engine closed meanwhile is replaced once; a request that
        // failed after it was sent is not repeated (it may have been done).
        let mut fresh = false;
        let response = loop {
            let sender = match connection.as_mut() {
                Some(sender) if !sender.is_closed() => sender,
                _ => {
                    *connection = Some(self.connect().await?);
                    fresh = true;
                    connection.as_mut().expect("just connected")
                }
            };
            if sender.ready().await.is_err() {
                *connection = None;
                if fresh {
                    return Err(ClientError::Connect {
                        uri: self.uri.clone(),
                        source: std::io::Error::other("the connection closed at once"),
                    });
                }
                continue;
            }
            let mut request = Request::builder()
                .method(method.clone())
                .uri(format!("/v1/{path}"))
                .header(header::HOST, self.host.as_str())
                .header(header::CONTENT_TYPE, "application/json");
            if let Some(token) = token {
                request = request.header("X-Vault-Token", token);
            }
            let request = request
                .body(Full::new(body.clone()))
                .expect("a request of valid parts");
            match sender.send_request(request).await {
                Ok(response) => break response,
                Err(error) if error.is_canceled() && !fresh => {
                    // Never sent: the connection had gone. Try once on a new one.
                    *connection = None;
                }
                Err(error) => {
                    *connection = None;
                    return Err(ClientError::Http(error));
                }
            }
        };
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|_| ClientError::Connect {
                uri: self.uri.clone(),
                source: std::io::Error::other("reading the response failed or it was too large"),
            })?
            .to_bytes();
        drop(connection);
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice::<Value>(&bytes).map_err(|_| ClientError::NotJson {
                path: path.to_owned(),
            })?
        };
        if !status.is_success() {
            let reason = json["errors"]
                .as_array()
                .map(|errors| {
                    errors
                        .iter()
                        .filter_map(Value::as_str)
                        .map(|s| s.chars().take(200).collect::<String>())
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_default();
            return Err(ClientError::Refused {
                path: path.to_owned(),
                status,
                reason,
            });
        }
        Ok(json)
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let tls = TlsConnector::from(tls_config(&self.roots)?);
        let connect_error = |source| ClientError::Connect {
            uri: self.uri.clone(),
            source,
        };
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(connect_error)?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.host.clone()).map_err(|_| ClientError::Url(self.uri.clone()))?;
        let stream = tls.connect(name, tcp).await.map_err(connect_error)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(ClientError::Http)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "The connection to the engine ended");
            }
        });
        Ok(sender)
    }
}

fn tls_config(roots: &Roots) -> Result<Arc<ClientConfig>, ClientError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let pem = match roots {
        Roots::Pem(pem) => pem.clone(),
        Roots::File(path) => std::fs::read_to_string(path)
            .map_err(|e| ClientError::Roots(format!("reading {}: {e}", path.display())))?,
    };
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| ClientError::Roots(format!("a PEM certificate: {e}")))?;
        store
            .add(cert)
            .map_err(|e| ClientError::Roots(format!("a root certificate: {e}")))?;
    }
    if store.is_empty() {
        return Err(ClientError::Roots("it holds no certificate".into()));
    }
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Roots(e.to_string()))?
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
