//! The secrets engine's Vault-compatible HTTPS API, as the SecretSync reconciler uses
//! it: Kubernetes login, KV v2 read, database credentials, PKI issue, lease renew and
//! revoke. TLS 1.3 only (rustls, ring), trusting only the mesh roots the engine
//! publishes to ConfigMap `capstan-mesh-roots` in the controller's namespace, followed
//! by watch so a root rotation is picked up without a restart.
//!
//! Nothing here logs or returns a value it read: errors carry the path, the status and
//! the engine's error messages (which name paths and roles, never secrets), with any
//! lease id or token that an error message might echo redacted.

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Uri, header};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    runtime::{WatchStreamExt as _, watcher},
};
use parking_lot::RwLock;
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::{sync::Arc, time::Duration};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_RESPONSE: usize = 1024 * 1024;
pub const ROOTS_KEY: &str = "roots.pem";
const REVOKE_SELF: &str = "auth/token/revoke-self";

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("the engine's trust roots are not published yet (ConfigMap {0}, key roots.pem)")]
    NoRoots(String),
    #[error("the engine at {url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the engine is sealed (503 on {path})")]
    Sealed { path: String },
    #[error("the engine denied {path}: {message}")]
    Denied { path: String, message: String },
    #[error("{path} does not exist in the engine")]
    NotFound { path: String },
    #[error("the engine refused {path} ({status}): {message}")]
    Refused {
        path: String,
        status: u16,
        message: String,
    },
    #[error("the engine's answer to {path} is not what its API documents: {reason}")]
    Protocol { path: String, reason: String },
}

impl Error {
    /// The condition reason this error sets on Ready.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoRoots(_) | Self::Unreachable { .. } | Self::Protocol { .. } => "EngineUnavailable",
            Self::Sealed { .. } => "EngineSealed",
            Self::Denied { .. } => "PermissionDenied",
            Self::NotFound { .. } => "SourceNotFound",
            Self::Refused { .. } => "EngineRefused",
        }
    }

    /// Whether retrying soon may help (the engine was down), as opposed to an answer
    /// that only a change of spec or engine configuration alters.
    pub fn transient(&self) -> bool {
        matches!(
            self,
            Self::NoRoots(_) | Self::Unreachable { .. } | Self::Sealed { .. } | Self::Protocol { .. }
        ) || matches!(self, Self::Refused { status, .. } if *status >= 500)
    }
}

/// The engine's client. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    url: String,
    host: String,
    port: u16,
    roots_configmap: String,
    tls: Arc<RwLock<Option<Arc<ClientConfig>>>>,
}

/// A login's token (never logged: no Debug).
pub struct Login {
    pub token: String,
    pub ttl: Duration,
    pub renewable: bool,
}

/// A credential the engine issued, with its lease.
pub struct Issued {
    pub lease_id: Option<String>,
    pub ttl: Duration,
    pub renewable: bool,
    pub fields: super::template::Fields,
}

pub struct KvEntry {
    pub fields: super::template::Fields,
    pub version: i64,
    /// When this version was written (the engine's clock), for the propagation metric.
    pub created: Option<k8s_openapi::jiff::Timestamp>,
}

pub struct Renewed {
    pub ttl: Duration,
    pub renewable: bool,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<String>,
}

impl Engine {
    pub fn new(url: &str, roots_configmap: &str) -> anyhow::Result<Self> {
        let uri: Uri = url
            .parse()
            .map_err(|e| anyhow::anyhow!("engine URL {url:?}: {e}"))?;
        anyhow::ensure!(
            uri.scheme_str() == Some("https"),
            "engine URL {url:?}: the engine is only reached over https"
        );
        let host = uri
            .host()
            .ok_or_else(|| anyhow::anyhow!("engine URL {url:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            port: uri.port_u16().unwrap_or(443),
            host,
            roots_configmap: roots_configmap.to_owned(),
            tls: Arc::default(),
        })
    }

    /// Follows the roots ConfigMap until the returned future is dropped.
    pub async fn follow_roots(self, api: Api<ConfigMap>) {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.roots_configmap));
        let mut events = std::pin::pin!(watcher::watcher(api, config).default_backoff());
        while let Some(event) = events.next().await {
            let configmap = match event {
                Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => cm,
                Ok(watcher::Event::Delete(_)) => {
                    // Keep the last roots: the engine's certificate still chains to them.
                    tracing::warn!(configmap = %self.roots_configmap, "The engine's roots ConfigMap was deleted; keeping the last roots");
                    continue;
                }
                Ok(_) => continue,
                Err(error) => {
                    tracing::warn!(%error, "Watching the engine's roots ConfigMap");
                    continue;
                }
            };
            let Some(pem) = configmap.data.as_ref().and_then(|d| d.get(ROOTS_KEY)) else {
                continue;
            };
            match tls_config(pem) {
                Ok(config) => {
                    *self.tls.write() = Some(config);
                    tracing::info!("Loaded the engine's trust roots");
                }
                Err(error) => tracing::warn!(%error, "The engine's roots ConfigMap holds no usable root"),
            }
        }
    }

    pub async fn login(&self, role: &str, jwt: &str) -> Result<Login, Error> {
        let path = "auth/kubernetes/login";
        let body = self
            .call(
                Method::POST,
                path,
                None,
                Some(json!({"role": role, "jwt": jwt})),
                &[jwt],
            )
            .await?;
        let auth = &body["auth"];
        let token = auth["client_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| protocol(path, "no auth.client_token"))?;
        Ok(Login {
            token: token.to_owned(),
            ttl: Duration::from_secs(auth["lease_duration"].as_u64().unwrap_or(0)),
            renewable: auth["renewable"].as_bool().unwrap_or(false),
        })
    }

    /// Extends the token itself (`auth/token/renew-self`): the leases it issued end with it.
    pub async fn renew_self(&self, token: &str, increment: Duration) -> Result<Renewed, Error> {
        let path = "auth/token/renew-self";
        let body = self
            .call(
                Method::POST,
                path,
                Some(token),
                Some(json!({"increment": increment.as_secs()})),
                &[token],
            )
            .await?;
        Ok(Renewed {
            ttl: Duration::from_secs(
                body["auth"]["lease_duration"]
                    .as_u64()
                    .ok_or_else(|| protocol(path, "no auth.lease_duration"))?,
            ),
            renewable: body["auth"]["renewable"].as_bool().unwrap_or(false),
        })
    }

    /// Revokes the token itself (`auth/token/revoke-self`, in every token's default
    /// policy), and with it every lease it issued. The engine refuses (`Denied`) a token
    /// it no longer knows (revoked or expired already: its leases ended with it) and a
    /// token whose policy lacks revoke-self with the same answer, as Vault does; only
    /// `can_revoke_self`, asked while the token was known to be valid, tells them apart.
    pub async fn revoke_self(&self, token: &str) -> Result<(), Error> {
        self.call(Method::POST, REVOKE_SELF, Some(token), None, &[token])
            .await
            .map(drop)
    }

    /// Whether the token's policy grants `update` on `auth/token/revoke-self`, as
    /// `sys/capabilities-self` (also in the default policy) says. A refusal is an
    /// answer (no); only an engine that could not answer is an error.
    pub async fn can_revoke_self(&self, token: &str) -> Result<bool, Error> {
        match self
            .call(
                Method::POST,
                "sys/capabilities-self",
                Some(token),
                Some(json!({ "paths": [REVOKE_SELF] })),
                &[token],
            )
            .await
        {
            Ok(body) => Ok(grants_update(&body, REVOKE_SELF)),
            Err(error) if error.transient() => Err(error),
            Err(_) => Ok(false),
        }
    }

    pub async fn kv_read(
        &self,
        token: &str,
        mount: &str,
        key: &str,
        version: Option<i64>,
    ) -> Result<KvEntry, Error> {
        let path = format!("{mount}/data/{key}");
        let query = version.map(|v| format!("?version={v}")).unwrap_or_default();
        let body = self
            .call(
                Method::GET,
                &format!("{path}{query}"),
                Some(token),
                None,
                &[token],
            )
            .await?;
        let data = body["data"]["data"]
            .as_object()
            .ok_or_else(|| Error::NotFound { path: path.clone() })?;
        let metadata = &body["data"]["metadata"];
        let version = metadata["version"]
            .as_i64()
            .ok_or_else(|| protocol(&path, "no data.metadata.version"))?;
        let created = metadata["created_time"].as_str().and_then(|t| t.parse().ok());
        Ok(KvEntry {
            fields: super::template::kv_fields(data),
            version,
            created,
        })
    }

    pub async fn database_creds(&self, token: &str, mount: &str, role: &str) -> Result<Issued, Error> {
        let path = format!("{mount}/creds/{role}");
        let body = self.call(Method::GET, &path, Some(token), None, &[token]).await?;
        issued(&path, &body)
    }

    pub async fn pki_issue(&self, token: &str, source: &capstan_crds::PkiSource) -> Result<Issued, Error> {
        let path = format!("{}/issue/{}", source.mount, source.role);
        let mut request = json!({"common_name": source.common_name});
        if !source.alt_names.is_empty() {
            request["alt_names"] = json!(source.alt_names.join(","));
        }
        if let Some(ttl) = &source.ttl {
            request["ttl"] = json!(ttl);
        }
        let body = self
            .call(Method::POST, &path, Some(token), Some(request), &[token])
            .await?;
        let mut issued = issued(&path, &body)?;
        // Vault issues certificates without a lease unless the role asks for one; the
        // certificate's expiry is then the "lease".
        if issued.lease_id.is_none() || issued.ttl.is_zero() {
            if let Some(expiration) = body["data"]["expiration"].as_i64() {
                let now = k8s_openapi::jiff::Timestamp::now().as_second();
                issued.ttl = Duration::from_secs(expiration.saturating_sub(now).max(0) as u64);
            }
            issued.renewable = false;
        }
        Ok(issued)
    }

    pub async fn renew(&self, token: &str, lease_id: &str, increment: Duration) -> Result<Renewed, Error> {
        let path = "sys/leases/renew";
        let body = self
            .call(
                Method::PUT,
                path,
                Some(token),
                Some(json!({"lease_id": lease_id, "increment": increment.as_secs()})),
                &[token, lease_id],
            )
            .await?;
        Ok(Renewed {
            ttl: Duration::from_secs(
                body["lease_duration"]
                    .as_u64()
                    .ok_or_else(|| protocol(path, "no lease_duration"))?,
            ),
            renewable: body["renewable"].as_bool().unwrap_or(false),
        })
    }

    pub async fn revoke(&self, token: &str, lease_id: &str) -> Result<(), Error> {
        self.call(
            Method::PUT,
            "sys/leases/revoke",
            Some(token),
            Some(json!({"lease_id": lease_id})),
            &[token, lease_id],
        )
        .await
        .map(drop)
    }

    /// One request; `sensitive` are strings (tokens, lease ids) to redact from any error.
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        sensitive: &[&str],
    ) -> Result<Value, Error> {
        let bare = path.split('?').next().unwrap_or(path).to_owned();
        let tls = self
            .tls
            .read()
            .clone()
            .ok_or_else(|| Error::NoRoots(self.roots_configmap.clone()))?;
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let unreachable = |reason: String| Error::Unreachable {
            url: self.url.clone(),
            reason: redact(&reason, sensitive),
        };
        let (status, bytes) = tokio::time::timeout(TIMEOUT, self.exchange(tls, method, path, token, body))
            .await
            .map_err(|_| unreachable(format!("no answer within {TIMEOUT:?}")))?
            .map_err(|e| unreachable(format!("{e:#}")))?;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes).map_err(|_| protocol(&bare, "the body is not JSON"));
        }
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| b.errors.join("; "))
            .unwrap_or_default();
        let message = redact(&message.chars().take(400).collect::<String>(), sensitive);
        Err(match status.as_u16() {
            503 => Error::Sealed { path: bare },
            403 => Error::Denied { path: bare, message },
            404 => Error::NotFound { path: bare },
            code => Error::Refused {
                path: bare,
                status: code,
                message,
            },
        })
    }

    async fn exchange(
        &self,
        tls: Arc<ClientConfig>,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> anyhow::Result<(hyper::StatusCode, Bytes)> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(self.host.clone())?;
        let stream = TlsConnector::from(tls).connect(name, tcp).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let driver = tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(format!("/v1/{path}"))
            .header(header::HOST, self.host.as_str())
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = token {
            request = request.header("X-Vault-Token", token);
        }
        let response = sender
            .send_request(request.body(Full::new(Bytes::from(body)))?)
            .await?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the response: {e}"))?
            .to_bytes();
        driver.abort();
        Ok((status, bytes))
    }
}

fn protocol(path: &str, reason: &str) -> Error {
    Error::Protocol {
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

fn redact(text: &str, sensitive: &[&str]) -> String {
    let mut out = text.to_owned();
    for s in sensitive.iter().filter(|s| s.len() >= 4) {
        out = out.replace(s, "<redacted>");
    }
    out
}

/// Whether a `sys/capabilities-self` answer grants `update` (or `root`) on `path`
/// (Vault puts the list under `data.<path>` and at the top level too).
fn grants_update(body: &Value, path: &str) -> bool {
    [&body["data"][path], &body[path]]
        .into_iter()
        .filter_map(Value::as_array)
        .flatten()
        .any(|c| matches!(c.as_str(), Some("update" | "root")))
}

/// A leased response (`lease_id`, `lease_duration`, `renewable`, `data`) as fields.
fn issued(path: &str, body: &Value) -> Result<Issued, Error> {
    let data = body["data"]
        .as_object()
        .ok_or_else(|| protocol(path, "no data"))?;
    Ok(Issued {
        lease_id: body["lease_id"]
            .as_str()
            .filter(|id| !id.is_empty())
            .map(str::to_owned),
        ttl: Duration::from_secs(body["lease_duration"].as_u64().unwrap_or(0)),
        renewable: body["renewable"].as_bool().unwrap_or(false),
        fields: issued_fields(data),
    })
}

/// A credential's fields: strings as they are, lists (a PKI `ca_chain`) joined by
/// newlines, other values as JSON.
fn issued_fields(data: &Map<String, Value>) -> super::template::Fields {
    data.iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Array(items) => items
                    .iter()
                    .map(|i| i.as_str().map(str::to_owned).unwrap_or_else(|| i.to_string()))
                    .collect::<Vec<_>>()
                    .join("\n"),
                other => other.to_string(),
            };
            (k.clone(), text)
        })
        .collect()
}

fn tls_config(roots_pem: &str) -> anyhow::Result<Arc<ClientConfig>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    anyhow::ensure!(!roots.is_empty(), "the trust bundle holds no certificate");
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leased_responses_become_fields() {
        let body = json!({
            "lease_id": "database/creds/app/abcd", "lease_duration": 300, "renewable": true,
            "data": {"username": "v-app", "password": "pw", "ca_chain": ["A", "B"], "expiration": 17},
        });
        let creds = issued("database/creds/app", &body).unwrap();
        assert_eq!(creds.lease_id.as_deref(), Some("database/creds/app/abcd"));
        assert_eq!(creds.ttl, Duration::from_secs(300));
        assert!(creds.renewable);
        assert_eq!(creds.fields["ca_chain"], "A\nB");
        assert_eq!(creds.fields["expiration"], "17");
        let no_lease = issued("pki/issue/r", &json!({"lease_id": "", "data": {}})).unwrap();
        assert_eq!(no_lease.lease_id, None);
    }

    #[test]
    fn capabilities_self_answers_are_read_as_the_engine_writes_them() {
        let answer = |caps: Value| json!({"data": {REVOKE_SELF: caps.clone(), "capabilities": caps}});
        assert!(grants_update(&answer(json!(["read", "update"])), REVOKE_SELF));
        assert!(grants_update(&answer(json!(["root"])), REVOKE_SELF));
        assert!(grants_update(&json!({REVOKE_SELF: ["update"]}), REVOKE_SELF));
        assert!(!grants_update(&answer(json!(["deny"])), REVOKE_SELF));
        assert!(!grants_update(&answer(json!(["read"])), REVOKE_SELF));
        assert!(!grants_update(
            &json!({"data": {"other/path": ["update"]}}),
            REVOKE_SELF
        ));
        assert!(!grants_update(&Value::Null, REVOKE_SELF));
    }

    #[test]
    fn errors_redact_tokens_and_lease_ids() {
        assert_eq!(
            redact(
                "lease database/creds/app/abcd not found for hvs.TOKEN",
                &["database/creds/app/abcd", "hvs.TOKEN"]
            ),
            "lease <redacted> not found for <redacted>"
        );
    }

    #[test]
    fn only_https_urls() {
        assert!(Engine::new("http://capstan-engine:8200", "x").is_err());
        let e = Engine::new("https://capstan-engine.capstan-system.svc:8200", "x").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port),
            ("capstan-engine.capstan-system.svc", 8200)
        );
    }
}
