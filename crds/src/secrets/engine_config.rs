//! SecretPolicy and AuthRole: the secrets engine's ACL policies and Kubernetes auth roles
//! as objects, so its configuration is GitOps-managed (`kubectl apply`, reviewed in git)
//! rather than written by hand through the API. Cluster-scoped: a policy is engine-wide,
//! and only whoever may create cluster-scoped objects (RBAC) may grant engine access;
//! a tenant with rights in one namespace cannot write one.
//!
//! The engine follows them by watch. A name declared here wins over the same name
//! written through the API (which is then refused), and its status says whether the
//! engine accepted it.

use crate::conditions::{self, Condition};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "secrets.capstan.dev",
    version = "v1alpha1",
    kind = "SecretPolicy",
    plural = "secretpolicies",
    singular = "secretpolicy",
    shortname = "spol",
    category = "capstan",
    status = "EngineConfigStatus",
    printcolumn(name = "Rules", type_ = "integer", json_path = ".status.rules"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    doc = "An ACL policy of the Capstan secrets engine: which paths a token holding it may use, and how"
)]
#[serde(rename_all = "camelCase")]
pub struct SecretPolicySpec {
    /// Path rules, as Vault's `path "<pattern>" { capabilities = [...] }`: an exact path,
    /// a trailing `*` for a prefix, `+` for one segment; the most specific match wins and
    /// `deny` on a path beats everything. No rule matching means no access.
    #[schemars(length(min = 1, max = 256))]
    pub rules: Vec<PolicyRule>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    #[schemars(length(min = 1, max = 512))]
    pub path: String,
    #[schemars(length(min = 1, max = 8))]
    pub capabilities: Vec<Capability>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    Create,
    Read,
    Update,
    Patch,
    Delete,
    List,
    Sudo,
    Deny,
}

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "secrets.capstan.dev",
    version = "v1alpha1",
    kind = "AuthRole",
    plural = "authroles",
    singular = "authrole",
    shortname = "arole",
    category = "capstan",
    status = "EngineConfigStatus",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    doc = "A Kubernetes auth role of the Capstan secrets engine: which ServiceAccounts log in with it, and the policies and lifetime of their tokens"
)]
#[serde(rename_all = "camelCase")]
pub struct AuthRoleSpec {
    /// ServiceAccount names that may log in with this role (`*` for any).
    #[schemars(length(min = 1, max = 64))]
    pub service_account_names: Vec<String>,
    /// Their namespaces (`*` for any).
    #[schemars(length(min = 1, max = 64))]
    pub service_account_namespaces: Vec<String>,
    /// Policies the issued token holds (besides `default`); never `root` (the engine
    /// refuses the role, in its status).
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub policies: Vec<String>,
    /// Token TTL (`1h`, `30m`); the engine's default when unset.
    #[serde(rename = "tokenTTL", default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub token_ttl: Option<String>,
    /// Token max TTL.
    #[serde(rename = "tokenMaxTTL", default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub token_max_ttl: Option<String>,
    /// The audience the ServiceAccount token must carry; the engine's when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub audience: Option<String>,
}

/// What the engine made of the object.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EngineConfigStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Rules in force (SecretPolicy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<i64>,
    #[schemars(schema_with = "conditions::schema")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
