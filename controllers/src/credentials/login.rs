//! The controller's own engine login, for `auth/kubernetes/revoke-pod` only.
//!
//! The controller logs in as its own ServiceAccount, which it learns from the API server
//! (SelfSubjectReview: the identity its credentials carry, in the cluster or out of it),
//! with a short-lived token of it for the engine's audience (TokenRequest), under the
//! Kubernetes auth role of the same name. The chart declares that role and its policy
//! (templates/credentials.yaml: an AuthRole and a SecretPolicy granting `update` on
//! that one path). The engine token is kept while two thirds of its TTL are left.

use super::Revoke;
use capstan_engine_client::{self as client, Client, Options, PodRevoked, Roots};
use futures::future::BoxFuture;
use k8s_openapi::api::{
    authentication::v1::{SelfSubjectReview, TokenRequest, TokenRequestSpec},
    core::v1::ServiceAccount,
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use std::time::Instant;
use tokio::sync::Mutex;

/// How long the ServiceAccount token the controller logs in with lasts.
const TOKEN_SECONDS: i64 = 600;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("asking the API server who the controller is: {0}")]
    WhoAmI(#[source] kube::Error),
    #[error("the controller runs as {0:?}, not as a ServiceAccount: it cannot log in to the engine")]
    NotServiceAccount(String),
    #[error("requesting a token of ServiceAccount {0} for the engine: {1}")]
    TokenRequest(String, #[source] kube::Error),
    #[error("the engine refused the controller's login as role {role}: {source}")]
    Login {
        role: String,
        #[source]
        source: client::Error,
    },
    #[error("the engine did not revoke the pod's credentials: {0}")]
    Revoke(#[source] client::Error),
}

impl Error {
    /// The `reconcile_failures` label.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::WhoAmI(_) | Self::TokenRequest(..) => "kubernetes",
            Self::NotServiceAccount(_) => "identity",
            Self::Login { .. } => "engine_login",
            Self::Revoke(_) => "engine_revoke",
        }
    }
}

/// A login token (never logged: no Debug).
struct Cached {
    token: String,
    refresh_after: Instant,
}

/// The engine, as the controller reaches it: the shared client (TLS 1.3 trusting only
/// the mesh roots, which `run` follows) and the controller's login.
pub struct Engine {
    client: Client,
    kube: kube::Client,
    token: Mutex<Option<Cached>>,
}

impl Engine {
    pub fn new(url: &str, kube: kube::Client) -> anyhow::Result<Self> {
        let client = Client::new(url, Roots::later(), Options::default())
            .map_err(|e| anyhow::anyhow!("engine URL {url:?}: {e}; the engine is only reached over https"))?;
        Ok(Self {
            client,
            kube,
            token: Mutex::new(None),
        })
    }

    pub fn roots(&self) -> &Roots {
        self.client.roots()
    }

    /// The cached engine token, or a new login (one at a time: the lock is held across
    /// it, so a burst of stopped pods logs in once).
    async fn token(&self) -> Result<String, Error> {
        let mut cached = self.token.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| Instant::now() < c.refresh_after) {
            return Ok(c.token.clone());
        }
        let (namespace, name) = self.whoami().await?;
        let jwt = self.serviceaccount_token(&namespace, &name).await?;
        let login = self
            .client
            .login("kubernetes", &name, &jwt)
            .await
            .map_err(|source| Error::Login {
                role: name.clone(),
                source,
            })?;
        let token = login.token.clone();
        *cached = Some(Cached {
            token: login.token,
            refresh_after: Instant::now() + login.ttl * 2 / 3,
        });
        Ok(token)
    }

    /// The controller's ServiceAccount, as the API server authenticates it.
    async fn whoami(&self) -> Result<(String, String), Error> {
        let review = Api::<SelfSubjectReview>::all(self.kube.clone())
            .create(&PostParams::default(), &SelfSubjectReview::default())
            .await
            .map_err(Error::WhoAmI)?;
        let username = review
            .status
            .and_then(|s| s.user_info)
            .and_then(|u| u.username)
            .unwrap_or_default();
        serviceaccount_of(&username).ok_or(Error::NotServiceAccount(username))
    }

    async fn serviceaccount_token(&self, namespace: &str, name: &str) -> Result<String, Error> {
        let request = TokenRequest {
            metadata: ObjectMeta::default(),
            spec: TokenRequestSpec {
                audiences: vec![capstan_contract::ENGINE_AUDIENCE.to_owned()],
                expiration_seconds: Some(TOKEN_SECONDS),
                bound_object_ref: None,
            },
            status: None,
        };
        let answer = Api::<ServiceAccount>::namespaced(self.kube.clone(), namespace)
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .map_err(|e| Error::TokenRequest(format!("{namespace}/{name}"), e))?;
        Ok(answer.status.map(|s| s.token).unwrap_or_default())
    }
}

impl Revoke for Engine {
    fn revoke_pod<'a>(&'a self, pod_uid: &'a str) -> BoxFuture<'a, Result<PodRevoked, Error>> {
        Box::pin(async move {
            let token = self.token().await?;
            match self.client.revoke_pod(&token, pod_uid).await {
                Ok(done) => Ok(done),
                Err(error) => {
                    // A token the engine no longer knows (its storage was reset, say)
                    // reads as a refusal: the next attempt logs in again.
                    if error.status() == Some(client::StatusCode::FORBIDDEN) {
                        *self.token.lock().await = None;
                    }
                    Err(Error::Revoke(error))
                }
            }
        })
    }
}

/// `(namespace, name)` of a ServiceAccount username (`system:serviceaccount:<ns>:<name>`).
fn serviceaccount_of(username: &str) -> Option<(String, String)> {
    let (namespace, name) = username.strip_prefix("system:serviceaccount:")?.split_once(':')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains(':'))
        .then(|| (namespace.to_owned(), name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_serviceaccount_can_log_in() {
        assert_eq!(
            serviceaccount_of("system:serviceaccount:capstan-system:capstan-controller"),
            Some(("capstan-system".into(), "capstan-controller".into()))
        );
        for other in [
            "kubernetes-admin",
            "system:serviceaccount:capstan-system",
            "system:serviceaccount::x",
            "system:serviceaccount:a:b:c",
        ] {
            assert_eq!(serviceaccount_of(other), None, "{other}");
        }
    }

    #[test]
    fn errors_name_their_metric() {
        assert_eq!(Error::NotServiceAccount("x".into()).metric_label(), "identity");
        assert_eq!(
            Error::Revoke(client::Error::NoRoots).metric_label(),
            "engine_revoke"
        );
    }
}
