//! The secrets engine's Vault-compatible HTTPS API, as the SecretSync reconciler uses
//! it: Kubernetes login, KV v2 read, database credentials, PKI issue, lease renew and
//! revoke, on the shared engine client (`capstan-engine-client`: TLS 1.3 trusting only
//! the mesh roots, kept-alive connections, 10 s per request, 1 MiB answers, no retry: a
//! failed call requeues the object). The roots come from the ConfigMap the engine
//! publishes (`capstan_contract::ROOTS_CONFIGMAP`) in the controller's namespace,
//! followed by watch so a root rotation is picked up without a restart.
//!
//! This module maps the client's errors to the Ready reasons and requeue classes
//! SecretSync reports, and answers to the reconciler's types. Nothing here logs or
//! returns a value it read: errors carry the path, the status and the engine's error
//! messages (which name paths and roles, never secrets), with any lease id or token that
//! an error message might echo redacted (the client redacts what each call sends).

use capstan_engine_client::{self as client, Client, Options, PkiIssue, REVOKE_SELF, Roots, StatusCode};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::{Map, Value};
use std::time::Duration;

pub use capstan_contract::ROOTS_KEY;
/// The client's own answers, as the reconciler reads them (a login's token, a renewal's
/// new TTL): nothing to convert.
pub use capstan_engine_client::{Login, Renewed};

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

    /// The client's error as SecretSync classifies it.
    fn from_client(error: client::Error, roots_configmap: &str, url: &str) -> Self {
        use client::Error as E;
        match error {
            E::NoRoots => Self::NoRoots(roots_configmap.to_owned()),
            E::Api(api) => {
                // The client cut each message at 200 characters; SecretSync's messages
                // are at most 400 in all, as before.
                let message = api.message().chars().take(400).collect();
                match api.status {
                    StatusCode::SERVICE_UNAVAILABLE => Self::Sealed { path: api.path },
                    StatusCode::FORBIDDEN => Self::Denied {
                        path: api.path,
                        message,
                    },
                    StatusCode::NOT_FOUND => Self::NotFound { path: api.path },
                    status => Self::Refused {
                        path: api.path,
                        status: status.as_u16(),
                        message,
                    },
                }
            }
            E::NotJson { path } => Self::Protocol {
                path,
                reason: "the body is not JSON".into(),
            },
            E::Protocol { path, reason } => Self::Protocol { path, reason },
            other => Self::Unreachable {
                url: url.to_owned(),
                reason: other.to_string(),
            },
        }
    }
}

/// The engine's client. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    client: Client,
    roots_configmap: String,
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

impl Engine {
    pub fn new(url: &str, roots_configmap: &str) -> anyhow::Result<Self> {
        let client = Client::new(url, Roots::later(), Options::default())
            .map_err(|e| anyhow::anyhow!("engine URL {url:?}: {e}; the engine is only reached over https"))?;
        Ok(Self {
            client,
            roots_configmap: roots_configmap.to_owned(),
        })
    }

    /// Follows the roots ConfigMap until the returned future is dropped.
    pub async fn follow_roots(self, api: Api<ConfigMap>) {
        follow_roots(self.client.roots(), &self.roots_configmap, api).await
    }

    fn error(&self, error: client::Error) -> Error {
        Error::from_client(error, &self.roots_configmap, self.client.url())
    }

    pub async fn login(&self, role: &str, jwt: &str) -> Result<Login, Error> {
        self.client
            .login("kubernetes", role, jwt)
            .await
            .map_err(|e| self.error(e))
    }

    /// Extends the token itself (`auth/token/renew-self`): the leases it issued end with it.
    pub async fn renew_self(&self, token: &str, increment: Duration) -> Result<Renewed, Error> {
        self.client
            .renew_self(token, increment)
            .await
            .map_err(|e| self.error(e))
    }

    /// Revokes the token itself (`auth/token/revoke-self`, in every token's default
    /// policy), and with it every lease it issued. The engine refuses (`Denied`) a token
    /// it no longer knows (revoked or expired already: its leases ended with it) and a
    /// token whose policy lacks revoke-self with the same answer, as Vault does; only
    /// `can_revoke_self`, asked while the token was known to be valid, tells them apart.
    pub async fn revoke_self(&self, token: &str) -> Result<(), Error> {
        self.client.revoke_self(token).await.map_err(|e| self.error(e))
    }

    /// Whether the token's policy grants `update` on `auth/token/revoke-self`, as
    /// `sys/capabilities-self` (also in the default policy) says. A refusal is an
    /// answer (no); only an engine that could not answer is an error.
    pub async fn can_revoke_self(&self, token: &str) -> Result<bool, Error> {
        match self.client.capabilities_self(token, REVOKE_SELF).await {
            Ok(capabilities) => Ok(capabilities
                .iter()
                .any(|c| matches!(c.as_str(), "update" | "root"))),
            Err(error) => {
                let error = self.error(error);
                if error.transient() { Err(error) } else { Ok(false) }
            }
        }
    }

    pub async fn kv_read(
        &self,
        token: &str,
        mount: &str,
        key: &str,
        version: Option<i64>,
    ) -> Result<KvEntry, Error> {
        let entry = self
            .client
            .kv_read(token, mount, key, version)
            .await
            .map_err(|e| self.error(e))?;
        Ok(KvEntry {
            fields: super::template::kv_fields(&entry.data),
            version: entry.version,
            created: entry.created_time.and_then(|t| t.parse().ok()),
        })
    }

    pub async fn database_creds(&self, token: &str, mount: &str, role: &str) -> Result<Issued, Error> {
        self.client
            .database_creds(token, mount, role)
            .await
            .map(issued)
            .map_err(|e| self.error(e))
    }

    pub async fn pki_issue(&self, token: &str, source: &capstan_crds::PkiSource) -> Result<Issued, Error> {
        let request = PkiIssue {
            common_name: &source.common_name,
            alt_names: &source.alt_names,
            ttl: source.ttl.as_deref(),
        };
        self.client
            .pki_issue(token, &source.mount, &source.role, &request)
            .await
            .map(issued)
            .map_err(|e| self.error(e))
    }

    pub async fn renew(&self, token: &str, lease_id: &str, increment: Duration) -> Result<Renewed, Error> {
        self.client
            .renew_lease(token, lease_id, increment)
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn revoke(&self, token: &str, lease_id: &str) -> Result<(), Error> {
        self.client
            .revoke_lease(token, lease_id)
            .await
            .map_err(|e| self.error(e))
    }
}

/// Loads the engine's trust roots into `roots` from ConfigMap `configmap` and follows it
/// until the returned future is dropped (SecretSync's client and the credentials
/// reconciler's each follow it).
pub async fn follow_roots(roots: &Roots, configmap: &str, api: Api<ConfigMap>) {
    let config = watcher::Config::default().fields(&format!("metadata.name={configmap}"));
    let mut events = std::pin::pin!(watcher::watcher(api, config).default_backoff());
    while let Some(event) = events.next().await {
        let object = match event {
            Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => cm,
            Ok(watcher::Event::Delete(_)) => {
                // Keep the last roots: the engine's certificate still chains to them.
                tracing::warn!(%configmap, "The engine's roots ConfigMap was deleted; keeping the last roots");
                continue;
            }
            Ok(_) => continue,
            Err(error) => {
                tracing::warn!(%error, "Watching the engine's roots ConfigMap");
                continue;
            }
        };
        let Some(pem) = object.data.as_ref().and_then(|d| d.get(ROOTS_KEY)) else {
            continue;
        };
        match roots.set_pem(pem) {
            Ok(true) => tracing::info!("Loaded the engine's trust roots"),
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "The engine's roots ConfigMap holds no usable root"),
        }
    }
}

/// A leased answer as the reconciler's fields.
fn issued(leased: client::Leased) -> Issued {
    Issued {
        lease_id: leased.lease_id,
        ttl: leased.ttl,
        renewable: leased.renewable,
        fields: issued_fields(&leased.data),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn credential_fields_are_text() {
        let data = json!({"username": "v-app", "password": "pw", "ca_chain": ["A", "B"], "expiration": 17});
        let fields = issued_fields(data.as_object().unwrap());
        assert_eq!(fields["username"], "v-app");
        assert_eq!(fields["ca_chain"], "A\nB");
        assert_eq!(fields["expiration"], "17");
    }

    #[test]
    fn client_errors_map_to_ready_reasons() {
        let api = |status: u16, errors: &[&str]| {
            client::Error::Api(client::ApiError {
                path: "secret/data/app".into(),
                status: StatusCode::from_u16(status).unwrap(),
                errors: errors.iter().map(|e| e.to_string()).collect(),
            })
        };
        let map = |e| Error::from_client(e, "capstan-mesh-roots", "https://engine:8200");
        let sealed = map(api(503, &["Vault is sealed"]));
        assert_eq!((sealed.reason(), sealed.transient()), ("EngineSealed", true));
        let denied = map(api(403, &["permission denied"]));
        assert_eq!((denied.reason(), denied.transient()), ("PermissionDenied", false));
        assert_eq!(
            denied.to_string(),
            "the engine denied secret/data/app: permission denied"
        );
        assert_eq!(map(api(404, &[])).reason(), "SourceNotFound");
        let refused = map(api(400, &["bad"]));
        assert_eq!((refused.reason(), refused.transient()), ("EngineRefused", false));
        assert!(map(api(500, &["boom"])).transient());
        let no_roots = map(client::Error::NoRoots);
        assert_eq!(no_roots.reason(), "EngineUnavailable");
        assert!(no_roots.to_string().contains("capstan-mesh-roots"));
        let down = map(client::Error::Connect {
            url: "https://engine:8200".into(),
            reason: "refused".into(),
        });
        assert_eq!((down.reason(), down.transient()), ("EngineUnavailable", true));
    }

    #[test]
    fn only_https_urls() {
        assert!(Engine::new("http://capstan-engine:8200", "x").is_err());
        let e = Engine::new("https://capstan-engine.capstan-system.svc:8200", "x").unwrap();
        assert_eq!(e.client.url(), "https://capstan-engine.capstan-system.svc:8200");
    }
}
