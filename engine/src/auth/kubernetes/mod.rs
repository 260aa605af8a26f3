//! The Kubernetes auth method: a workload logs in with its projected ServiceAccount
//! token; the API server checks it (TokenReview, for the role's audience), and a role
//! binds ServiceAccount names and namespaces to policies and token lifetimes. The token
//! the engine issues records the ServiceAccount's UID (DESIGN decision 6): a
//! ServiceAccount deleted and re-created under the same name is another identity, and
//! tokens of the deleted one are refused by the API server.

use crate::{
    auth::token::{NewToken, TokenEntry, TokenError, Tokens},
    secrets::named::Named,
    store::logical::{Logical, LogicalError},
};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

pub mod tokenreview;

use tokenreview::{AuthError, Caller, TokenReviewer};

const PREFIX: &str = "auth/kubernetes/role/";
/// Token metadata naming the pod a login came from.
pub const POD_NAME: &str = "pod_name";
pub const POD_UID: &str = "pod_uid";

/// A role as stored and as `auth/kubernetes/role/<name>` reads it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Role {
    pub bound_service_account_names: Vec<String>,
    pub bound_service_account_namespaces: Vec<String>,
    /// The audience the ServiceAccount token must carry.
    pub audience: String,
    pub token_policies: Vec<String>,
    /// Seconds (0: the system default).
    pub token_ttl: u64,
    pub token_max_ttl: u64,
}

/// What a role write accepts: Vault's field names, its older aliases, lists as JSON
/// arrays or comma-separated strings, durations as seconds or "1h".
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RoleRequest {
    #[serde(default, deserialize_with = "list")]
    bound_service_account_names: Option<Vec<String>>,
    #[serde(default, deserialize_with = "list")]
    bound_service_account_namespaces: Option<Vec<String>>,
    #[serde(default)]
    audience: Option<String>,
    #[serde(default, deserialize_with = "list")]
    token_policies: Option<Vec<String>>,
    #[serde(default, deserialize_with = "list")]
    policies: Option<Vec<String>>,
    #[serde(default, deserialize_with = "duration")]
    token_ttl: Option<u64>,
    #[serde(default, deserialize_with = "duration")]
    ttl: Option<u64>,
    #[serde(default, deserialize_with = "duration")]
    token_max_ttl: Option<u64>,
    #[serde(default, deserialize_with = "duration")]
    max_ttl: Option<u64>,
    /// Only `serviceaccount_uid` (DESIGN decision 6); accepted for Vault clients that send it.
    #[serde(default)]
    alias_name_source: Option<String>,
    /// Only service tokens exist here (`service` or `default`).
    #[serde(default)]
    token_type: Option<String>,
    /// Periodic tokens are not supported; refused rather than ignored.
    #[serde(default, deserialize_with = "duration")]
    period: Option<u64>,
}

fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Null => None,
        Value::String(s) => Some(
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        ),
        Value::Array(items) => Some(
            items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    other => Err(serde::de::Error::custom(format!(
                        "expected a string, got {other}"
                    ))),
                })
                .collect::<Result<_, _>>()?,
        ),
        other => return Err(serde::de::Error::custom(format!("expected a list, got {other}"))),
    })
}

/// Seconds, or a duration string (`90`, `"90"`, `"90s"`, `"1.5h"`, `"7d"`).
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Null => None,
        Value::Number(n) => Some(
            n.as_u64()
                .ok_or_else(|| serde::de::Error::custom("a duration must be whole seconds"))?,
        ),
        Value::String(s) => Some(ttl_seconds(&s).map_err(serde::de::Error::custom)?),
        other => {
            return Err(serde::de::Error::custom(format!(
                "expected a duration, got {other}"
            )));
        }
    })
}

/// A TTL as the API takes it, in whole seconds: Vault's duration grammar
/// (`capstan_contract::duration`), where an empty string means 0 (unset), as in Vault.
pub fn ttl_seconds(s: &str) -> Result<u64, String> {
    if s.trim().is_empty() {
        return Ok(0);
    }
    capstan_contract::duration::parse_seconds(s).map_err(|e| e.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("{0}")]
    Invalid(String),
    #[error("permission denied")]
    Denied,
    #[error("the token could not be checked now")]
    Unavailable,
    #[error(transparent)]
    Storage(#[from] LogicalError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Lease(#[from] crate::secrets::lease::LeaseError),
}

fn bound(list: &[String], value: &str) -> bool {
    list.iter().any(|b| b == "*" || b == value)
}

#[derive(Clone)]
pub struct KubernetesAuth {
    /// The roles written through the API (declared ones are in `declared`).
    roles: Named,
    declared: std::sync::Arc<crate::declared::Declared>,
    reviewer: TokenReviewer,
    default_audience: String,
}

impl KubernetesAuth {
    pub fn new(
        logical: Logical,
        declared: std::sync::Arc<crate::declared::Declared>,
        reviewer: TokenReviewer,
        default_audience: String,
    ) -> Self {
        Self {
            roles: Named::at(logical, PREFIX.to_owned()),
            declared,
            reviewer,
            default_audience,
        }
    }

    pub async fn write_role(&self, name: &str, request: RoleRequest) -> Result<(), LoginError> {
        if !crate::store::storage::valid_name(name) {
            return Err(LoginError::Invalid(format!("invalid role name {name:?}")));
        }
        if self.declared.role(name).is_some() {
            return Err(LoginError::Invalid(format!(
                "role {name:?} is declared by an AuthRole object; change it there"
            )));
        }
        if request
            .alias_name_source
            .as_deref()
            .is_some_and(|s| s != "serviceaccount_uid")
        {
            return Err(LoginError::Invalid(
                "alias_name_source must be serviceaccount_uid: identities are bound to the ServiceAccount's UID".into(),
            ));
        }
        if request
            .token_type
            .as_deref()
            .is_some_and(|t| !matches!(t, "" | "service" | "default"))
        {
            return Err(LoginError::Invalid(
                "token_type: only service tokens are supported".into(),
            ));
        }
        if request.period.is_some_and(|p| p > 0) {
            return Err(LoginError::Invalid(
                "period: periodic tokens are not supported".into(),
            ));
        }
        let current = self.read_role(name).await?.unwrap_or_default();
        let role = Role {
            bound_service_account_names: request
                .bound_service_account_names
                .unwrap_or(current.bound_service_account_names),
            bound_service_account_namespaces: request
                .bound_service_account_namespaces
                .unwrap_or(current.bound_service_account_namespaces),
            audience: request.audience.filter(|a| !a.is_empty()).unwrap_or_else(|| {
                if current.audience.is_empty() {
                    self.default_audience.clone()
                } else {
                    current.audience
                }
            }),
            token_policies: request
                .token_policies
                .or(request.policies)
                .unwrap_or(current.token_policies)
                .iter()
                .map(|p| crate::policy::store::canonical(p))
                .collect(),
            token_ttl: request.token_ttl.or(request.ttl).unwrap_or(current.token_ttl),
            token_max_ttl: request
                .token_max_ttl
                .or(request.max_ttl)
                .unwrap_or(current.token_max_ttl),
        };
        if role.bound_service_account_names.is_empty() || role.bound_service_account_namespaces.is_empty() {
            return Err(LoginError::Invalid(
                "bound_service_account_names and bound_service_account_namespaces are required".into(),
            ));
        }
        if role.token_policies.iter().any(|p| p == "root") {
            return Err(LoginError::Invalid("a role cannot grant the root policy".into()));
        }
        if role.token_max_ttl > 0 && role.token_ttl > role.token_max_ttl {
            return Err(LoginError::Invalid(
                "token_ttl cannot be greater than token_max_ttl".into(),
            ));
        }
        self.roles.put(name, &role).await?;
        Ok(())
    }

    pub async fn read_role(&self, name: &str) -> Result<Option<Role>, LoginError> {
        if !crate::store::storage::valid_name(name) {
            return Ok(None);
        }
        if let Some(role) = self.declared.role(name) {
            return Ok(Some(role));
        }
        Ok(self.roles.get::<Role>(name).await?.map(|v| v.value))
    }

    pub async fn delete_role(&self, name: &str) -> Result<(), LoginError> {
        if self.declared.role(name).is_some() {
            return Err(LoginError::Invalid(format!(
                "role {name:?} is declared by an AuthRole object; delete it there"
            )));
        }
        Ok(self.roles.delete(name).await?)
    }

    pub async fn list_roles(&self) -> Result<Vec<String>, LoginError> {
        let mut names = self.roles.list().await?;
        names.extend(self.declared.role_names());
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Checks `jwt` for `role` and issues a token.
    pub async fn login(
        &self,
        tokens: &Tokens,
        role_name: &str,
        jwt: &str,
    ) -> Result<(String, TokenEntry, Caller), LoginError> {
        if role_name.is_empty() || jwt.is_empty() {
            return Err(LoginError::Invalid("missing role or jwt".into()));
        }
        // An unknown role and a refused token answer alike: a caller cannot probe roles.
        let role = self.read_role(role_name).await?.ok_or(LoginError::Denied)?;
        let caller = match self.reviewer.review_for(jwt, &role.audience).await {
            Ok(caller) => caller,
            Err(AuthError::Unavailable(error)) => {
                tracing::warn!(%error, "TokenReview unavailable for a login");
                return Err(LoginError::Unavailable);
            }
            Err(error) => {
                tracing::info!(role = %role_name, reason = %error, "Login refused");
                return Err(LoginError::Denied);
            }
        };
        let (ns, sa) = (&caller.identity.namespace, &caller.identity.service_account);
        if !bound(&role.bound_service_account_namespaces, ns) || !bound(&role.bound_service_account_names, sa)
        {
            tracing::info!(role = %role_name, namespace = %ns, service_account = %sa, "Login refused: the role does not bind this ServiceAccount");
            return Err(LoginError::Denied);
        }
        // V22: roles are refused with root when written or declared; a role stored by an
        // older version (or edited in storage) must not mint root either.
        if role
            .token_policies
            .iter()
            .any(|p| crate::policy::store::canonical(p) == "root")
        {
            tracing::warn!(role = %role_name, "Login refused: the role grants the root policy");
            return Err(LoginError::Denied);
        }
        let mut policies = role.token_policies.clone();
        if !policies.iter().any(|p| p == "default") {
            policies.push("default".into());
        }
        let mut meta = BTreeMap::from([
            ("role".to_owned(), role_name.to_owned()),
            ("service_account_name".to_owned(), sa.clone()),
            ("service_account_namespace".to_owned(), ns.clone()),
            ("service_account_uid".to_owned(), caller.uid.clone()),
        ]);
        // A token bound to a pod: this login (and its leases) is revoked when that pod
        // stops (`revoke_pod`, which the controller calls for pods that ran the agent)
        // or is gone (`PodReaper`), whether or not anything in it got to revoke them.
        let pod_uid = match (&caller.pod, &caller.pod_uid) {
            (Some(pod), Some(pod_uid)) => {
                meta.insert(POD_NAME.into(), pod.clone());
                meta.insert(POD_UID.into(), pod_uid.clone());
                Some(pod_uid.clone())
            }
            _ => None,
        };
        let (token, entry) = tokens
            .create(
                NewToken {
                    policies,
                    parent: None,
                    path: "auth/kubernetes/login".into(),
                    display_name: format!("kubernetes-{ns}-{sa}"),
                    meta,
                    ttl: role.token_ttl,
                    max_ttl: role.token_max_ttl,
                    renewable: true,
                    no_expiry: false,
                    num_uses: 0,
                    pod_uid,
                },
                None,
            )
            .await?;
        tracing::info!(role = %role_name, namespace = %ns, service_account = %sa, uid = %caller.uid, "Login");
        Ok((token, entry, caller))
    }
}

/// What `revoke_pod` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PodRevoked {
    /// Tokens revoked: the pod's logins and the tokens created under them.
    pub tokens: usize,
    /// Leases of those tokens whose revocation was asked (one the backend refused stays
    /// recorded and is retried by the expiration loop, DESIGN decision 5).
    pub leases: usize,
}

/// Revokes every token issued to pod `pod_uid` (by a login with its bound ServiceAccount
/// token), their descendants, and the leases of all of them. Idempotent: a pod with
/// nothing left answers zero. Tokens go first, so none can take a new lease after its
/// leases were revoked; a call that stops before the leases leaves them to the
/// expiration loop, which revokes the leases of tokens that are gone.
pub async fn revoke_pod(
    tokens: &Tokens,
    leases: &crate::secrets::lease::Leases,
    pod_uid: &str,
) -> Result<PodRevoked, LoginError> {
    let revoked = tokens.revoke_pod(pod_uid).await?;
    let mut done = PodRevoked {
        tokens: revoked.len(),
        leases: 0,
    };
    for id_hash in &revoked {
        done.leases += leases.revoke_for_token(id_hash).await?;
    }
    if done.tokens > 0 {
        tracing::info!(
            pod_uid,
            tokens = done.tokens,
            leases = done.leases,
            "Revoked the credentials of a stopped pod"
        );
    }
    Ok(done)
}

/// Revokes logins whose pod is gone (deleted, or replaced by another pod of the same
/// name), with the leases they hold: a pod's credentials do not outlive it even when its
/// agent never ran its shutdown.
#[derive(Clone)]
pub struct PodReaper {
    pods: kube::Client,
}

impl PodReaper {
    pub fn new(client: kube::Client) -> Self {
        Self { pods: client }
    }

    /// Whether pod `namespace/name` still exists with `uid`; errors other than "not
    /// found" count as alive (an unreachable API server must not revoke anything).
    async fn alive(&self, namespace: &str, name: &str, uid: &str) -> bool {
        let api: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(self.pods.clone(), namespace);
        match api.get_opt(name).await {
            Ok(Some(pod)) => pod.metadata.uid.as_deref() == Some(uid),
            Ok(None) => false,
            Err(error) => {
                tracing::debug!(%error, "Checking a login's pod; keeping it");
                true
            }
        }
    }

    /// One pass over the stored tokens.
    pub async fn sweep(
        &self,
        tokens: &Tokens,
        leases: &crate::secrets::lease::Leases,
    ) -> Result<usize, TokenError> {
        let mut revoked = 0;
        for entry in tokens.entries().await? {
            let (Some(ns), Some(pod), Some(uid)) = (
                entry.meta.get("service_account_namespace"),
                entry.meta.get(POD_NAME),
                entry.meta.get(POD_UID),
            ) else {
                continue;
            };
            if !self.alive(ns, pod, uid).await {
                tokens.revoke_hash(&entry.id_hash).await?;
                let _ = leases.revoke_for_token(&entry.id_hash).await;
                tracing::info!(namespace = %ns, pod = %pod, "Revoked the login of a pod that is gone, with its leases");
                revoked += 1;
            }
        }
        Ok(revoked)
    }
}

#[cfg(test)]
mod tests {
    use super::{PodRevoked, revoke_pod, ttl_seconds};
    use crate::{
        auth::token::{NewToken, Tokens},
        secrets::{
            database::Database,
            lease::{Lease, LeaseSecret, Leases},
        },
        store::clock::now,
    };

    /// RELIABILITY N2: stopping a pod revokes its login, the token under it, and the
    /// leases of both; the answer counts them, and a second call counts nothing.
    #[tokio::test]
    async fn revoking_a_pod_revokes_its_tokens_and_their_leases() {
        let logical = crate::auth::token::tests::unsealed().await;
        let tokens = Tokens::new(logical.clone());
        let leases = Leases::new(
            logical.clone(),
            Database::new(logical.clone(), "database"),
            Default::default(),
            std::time::Duration::from_secs(60),
        );
        let pod = "5c0bde3e-2b4f-4d8e-9a51-0c1e8f7e6a21";
        let (_, login) = tokens
            .create(
                NewToken {
                    policies: vec!["app".into()],
                    path: "auth/kubernetes/login".into(),
                    ttl: 600,
                    pod_uid: Some(pod.into()),
                    ..Default::default()
                },
                None,
            )
            .await
            .unwrap();
        let (_, child) = tokens
            .create(
                NewToken {
                    policies: vec!["app".into()],
                    parent: Some(login.id_hash.clone()),
                    ttl: 600,
                    ..Default::default()
                },
                Some(&login),
            )
            .await
            .unwrap();
        let lease = |id: &str, token: &str| Lease {
            id: id.into(),
            issue_time: now(),
            last_renewal: None,
            expire_time: now() + 600,
            max_expire_time: now() + 600,
            renewable: true,
            token_hash: Some(token.into()),
            secret: LeaseSecret::Database {
                mount: "database".into(),
                config: "pg".into(),
                role: "ro".into(),
                username: format!("v-{id}"),
            },
            revoke: None,
        };
        leases
            .create(&lease("database/creds/ro/a", &login.id_hash))
            .await
            .unwrap();
        leases
            .create(&lease("database/creds/ro/b", &child.id_hash))
            .await
            .unwrap();
        let done = revoke_pod(&tokens, &leases, pod).await.unwrap();
        assert_eq!(done, PodRevoked { tokens: 2, leases: 2 });
        // No database is configured here, so both revocations are refused: the leases
        // stay recorded, marked for retry by the expiration loop, never dropped.
        for id in ["database/creds/ro/a", "database/creds/ro/b"] {
            assert!(leases.lookup(id).await.unwrap().revoke.is_some(), "{id}");
        }
        assert!(!tokens.exists_hash(&login.id_hash).await.unwrap());
        assert!(!tokens.exists_hash(&child.id_hash).await.unwrap());
        assert_eq!(
            revoke_pod(&tokens, &leases, pod).await.unwrap(),
            PodRevoked::default()
        );
    }

    #[test]
    fn ttls_read_vaults_grammar_and_empty_is_unset() {
        assert_eq!(ttl_seconds(""), Ok(0));
        assert_eq!(ttl_seconds(" "), Ok(0));
        assert_eq!(ttl_seconds("90"), Ok(90));
        assert_eq!(ttl_seconds("1.5h"), Ok(5400));
        assert_eq!(ttl_seconds("7d"), Ok(7 * 86_400));
        assert!(ttl_seconds("1 day").is_err());
        assert!(ttl_seconds("-5s").is_err());
    }
}
