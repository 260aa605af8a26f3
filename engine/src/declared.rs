//! Policies and Kubernetes auth roles declared as objects (SecretPolicy, AuthRole;
//! cluster-scoped), followed by watch. A declared name wins over the same name written
//! through the API, which refuses to write or delete it; each object's status says
//! whether the engine took it, and why not. Held in memory: the objects themselves are
//! the source of truth, so nothing about them needs the barrier or an unsealed engine.

use crate::{
    auth::kubernetes::{Role, ttl_seconds},
    policy::Policy,
};
use capstan_crds::{
    AuthRole, EngineConfigStatus, SecretPolicy,
    conditions::{self, ConditionStatus},
};
use futures::StreamExt as _;
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt as _, watcher},
};
use parking_lot::RwLock;
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

/// Follows every object of a kind into `held` (by name): `take` decides on each object as
/// it is listed or changes; a deleted object, or one a relist no longer has, is dropped.
async fn follow<K, T, F, Fut>(api: &Api<K>, kind: &str, held: &RwLock<HashMap<String, T>>, take: F)
where
    F: Fn(K) -> Fut,
    Fut: std::future::Future<Output = ()>,
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let mut events = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut seen = HashSet::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => seen.clear(),
            Ok(watcher::Event::InitApply(object)) => {
                seen.insert(object.name_any());
                take(object).await;
            }
            Ok(watcher::Event::InitDone) => held.write().retain(|name, _| seen.contains(name)),
            Ok(watcher::Event::Apply(object)) => take(object).await,
            Ok(watcher::Event::Delete(object)) => {
                held.write().remove(&object.name_any());
            }
            Err(error) => tracing::warn!(%error, "Watching {kind}"),
        }
    }
}

#[derive(Default)]
pub struct Declared {
    policies: RwLock<HashMap<String, (Policy, String)>>,
    roles: RwLock<HashMap<String, Role>>,
}

impl Declared {
    /// The declared policy `name`: (parsed, its text as HCL).
    pub fn policy(&self, name: &str) -> Option<(Policy, String)> {
        self.policies.read().get(name).cloned()
    }

    pub fn policy_names(&self) -> Vec<String> {
        self.policies.read().keys().cloned().collect()
    }

    pub fn role(&self, name: &str) -> Option<Role> {
        self.roles.read().get(name).cloned()
    }

    pub fn role_names(&self) -> Vec<String> {
        self.roles.read().keys().cloned().collect()
    }

    /// Follows both kinds until the process ends.
    pub async fn follow(self: Arc<Self>, client: Client, default_audience: String) {
        let policies = tokio::spawn(self.clone().follow_policies(client.clone()));
        let roles = tokio::spawn(self.follow_roles(client, default_audience));
        let _ = tokio::join!(policies, roles);
    }

    async fn follow_policies(self: Arc<Self>, client: Client) {
        let api: Api<SecretPolicy> = Api::all(client);
        follow(&api, "SecretPolicies", &self.policies, |object| {
            self.take_policy(&api, object)
        })
        .await;
    }

    async fn take_policy(&self, api: &Api<SecretPolicy>, object: SecretPolicy) {
        let name = object.name_any();
        let text: String = object
            .spec
            .rules
            .iter()
            .map(|rule| {
                let caps: Vec<String> = rule
                    .capabilities
                    .iter()
                    .map(|c| serde_json::to_string(c).unwrap_or_default())
                    .collect();
                format!(
                    "path {} {{\n  capabilities = [{}]\n}}\n",
                    serde_json::to_string(&rule.path).unwrap_or_default(),
                    caps.join(", ")
                )
            })
            .collect();
        let result = if name == "root" || name == "default" {
            Err(format!("{name:?} is built in and cannot be declared"))
        } else {
            Policy::parse(&name, &text).map_err(|e| e.to_string())
        };
        let status = match result {
            Ok(policy) => {
                let rules = object.spec.rules.len() as i64;
                self.policies.write().insert(name.clone(), (policy, text));
                (
                    ConditionStatus::True,
                    "Accepted",
                    format!("{rules} rules in force"),
                    Some(rules),
                )
            }
            Err(message) => {
                // A broken declaration grants nothing, rather than keeping an old version.
                self.policies.write().remove(&name);
                (ConditionStatus::False, "Invalid", message, None)
            }
        };
        write_status(api, &object, status).await;
    }

    async fn follow_roles(self: Arc<Self>, client: Client, default_audience: String) {
        let api: Api<AuthRole> = Api::all(client);
        follow(&api, "AuthRoles", &self.roles, |object| {
            self.take_role(&api, object, &default_audience)
        })
        .await;
    }

    async fn take_role(&self, api: &Api<AuthRole>, object: AuthRole, default_audience: &str) {
        let name = object.name_any();
        let spec = &object.spec;
        let seconds = |d: &Option<String>| d.as_deref().map_or(Ok(0), ttl_seconds);
        let result = (|| {
            let policies: Vec<String> = spec
                .policies
                .iter()
                .map(|p| crate::policy::store::canonical(p))
                .collect();
            if policies.iter().any(|p| p == "root") {
                return Err("a role cannot grant the root policy".to_owned());
            }
            for policy in &policies {
                crate::policy::check_name(policy).map_err(|e| e.to_string())?;
            }
            let (ttl, max) = (seconds(&spec.token_ttl)?, seconds(&spec.token_max_ttl)?);
            if max > 0 && ttl > max {
                return Err("tokenTTL cannot be greater than tokenMaxTTL".to_owned());
            }
            Ok(Role {
                bound_service_account_names: spec.service_account_names.clone(),
                bound_service_account_namespaces: spec.service_account_namespaces.clone(),
                audience: spec
                    .audience
                    .clone()
                    .unwrap_or_else(|| default_audience.to_owned()),
                token_policies: policies,
                token_ttl: ttl,
                token_max_ttl: max,
            })
        })();
        let status = match result {
            Ok(role) => {
                self.roles.write().insert(name.clone(), role);
                (ConditionStatus::True, "Accepted", "in force".to_owned(), None)
            }
            Err(message) => {
                self.roles.write().remove(&name);
                (ConditionStatus::False, "Invalid", message, None)
            }
        };
        write_status(api, &object, status).await;
    }
}

/// Writes Ready (and the rule count) unless the status already says so for this
/// generation: every replica follows the same objects, and they agree.
async fn write_status<K>(
    api: &Api<K>,
    object: &K,
    (status, reason, message, rules): (ConditionStatus, &str, String, Option<i64>),
) where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + HasStatus,
{
    let generation = object.meta().generation;
    let current = object.status();
    let same = current.is_some_and(|s| {
        s.observed_generation == generation
            && conditions::get(&s.conditions, conditions::READY)
                .is_some_and(|c| c.status == status.as_str() && c.reason == reason && c.message == message)
    });
    if same {
        return;
    }
    let mut next = current.cloned().unwrap_or_default();
    next.observed_generation = generation;
    next.rules = rules;
    conditions::upsert(
        &mut next.conditions,
        conditions::new(conditions::READY, status, reason, message, generation),
    );
    let patch = serde_json::json!({ "status": next });
    if let Err(error) = api
        .patch_status(&object.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::warn!(%error, name = %object.name_any(), "Writing a declared policy's or role's status");
    }
}

/// Both kinds share their status type.
pub trait HasStatus {
    fn status(&self) -> Option<&EngineConfigStatus>;
}

impl HasStatus for SecretPolicy {
    fn status(&self) -> Option<&EngineConfigStatus> {
        self.status.as_ref()
    }
}

impl HasStatus for AuthRole {
    fn status(&self) -> Option<&EngineConfigStatus> {
        self.status.as_ref()
    }
}
