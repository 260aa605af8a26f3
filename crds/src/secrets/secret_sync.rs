//! SecretSync: a Kubernetes Secret kept equal to what the secrets engine holds (a KV
//! entry, a database credential, a PKI certificate), read as the SecretSync's own
//! ServiceAccount, renewed before its lease ends and re-issued at its max TTL, with the
//! Deployments that use it rolled before the old credential is revoked.
//!
//! Modelled on the Vault Secrets Operator's VaultStaticSecret / VaultDynamicSecret /
//! VaultPKISecret, folded into one kind with a `source` of exactly one type. Nothing in
//! the spec names another namespace (S1): the ServiceAccount, the target Secret and the
//! Deployments are all in the SecretSync's own namespace, and there is no field to say
//! otherwise (an unknown `namespace` field is refused by strict field validation and
//! pruned otherwise, so it can never reach the controller).

use crate::conditions::{self, Condition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::{Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A DNS-1123 subdomain: a Secret, ServiceAccount or Deployment name.
const DNS_SUBDOMAIN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// An engine path of one or more segments; no segment is empty or starts with a dot, so
/// `.` and `..` cannot occur and the path cannot climb out of its mount.
const ENGINE_PATH: &str = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*$";
/// An engine name (a role): one segment of [`ENGINE_PATH`].
const ENGINE_NAME: &str = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$";
/// A Go duration as the engine and CEL's `duration()` read it (`90s`, `1h30m`, `500ms`).
const DURATION: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";
/// A duration, or a percentage of the lease (1-99%).
const DURATION_OR_PERCENT: &str = r"^(([0-9]+(\.[0-9]+)?(ms|s|m|h))+|[1-9][0-9]?%)$";

/// Secret types the controller writes. Not `kubernetes.io/service-account-token` (the
/// token controller fills those with a token of the ServiceAccount they name: S3), not
/// `bootstrap.kubernetes.io/token` (a node-join credential), and no free-form type.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TargetType {
    #[default]
    Opaque,
    #[serde(rename = "kubernetes.io/basic-auth")]
    BasicAuth,
    #[serde(rename = "kubernetes.io/tls")]
    Tls,
    #[serde(rename = "kubernetes.io/ssh-auth")]
    SshAuth,
    #[serde(rename = "kubernetes.io/dockerconfigjson")]
    DockerConfigJson,
}

impl TargetType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Opaque => "Opaque",
            Self::BasicAuth => "kubernetes.io/basic-auth",
            Self::Tls => "kubernetes.io/tls",
            Self::SshAuth => "kubernetes.io/ssh-auth",
            Self::DockerConfigJson => "kubernetes.io/dockerconfigjson",
        }
    }
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeletionPolicy {
    /// Deleting the SecretSync deletes the target Secret (after revoking its leases).
    #[default]
    Delete,
    /// Deleting the SecretSync leaves the target Secret (its leases are still revoked,
    /// so a retained dynamic credential stops working).
    Retain,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloutKind {
    Deployment,
}

#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "secrets.capstan.dev",
    version = "v1alpha1",
    kind = "SecretSync",
    plural = "secretsyncs",
    singular = "secretsync",
    shortname = "ssync",
    category = "capstan",
    namespaced,
    status = "SecretSyncStatus",
    // The controller keeps its lease records in `<name>-capstan-lease`: a Secret name.
    validation = kube::core::Rule::new("self.metadata.name.size() <= 239")
        .message("metadata.name: at most 239 characters (the lease record Secret appends -capstan-lease)"),
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.target.name"),
    printcolumn(name = "Version", type_ = "integer", json_path = ".status.sourceVersion"),
    printcolumn(name = "Lease-Expires", type_ = "date", json_path = ".status.leaseExpiresAt"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(name = "Last-Sync", type_ = "date", json_path = ".status.lastSyncTime"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    doc = "A Kubernetes Secret kept in sync with the Capstan secrets engine (KV, database or PKI), read as a ServiceAccount of this namespace"
)]
#[serde(rename_all = "camelCase")]
pub struct SecretSyncSpec {
    /// What to read from the engine: exactly one of kv, database and pki.
    pub source: SecretSyncSource,
    /// Who reads it: the engine's Kubernetes auth role, logged into with a token of a
    /// ServiceAccount of this namespace. The engine's policies for that role decide what
    /// this SecretSync may read.
    pub auth: SecretSyncAuth,
    /// The Secret written in this namespace.
    pub target: SecretSyncTarget,
    /// When to renew a lease: a duration before it ends (`10m`) or the share of the
    /// lease still left (`33%`). Default `33%`: renew at two thirds of the lease.
    #[schemars(length(max = 32), regex(pattern = DURATION_OR_PERCENT))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_before: Option<String>,
    /// How often a KV source is read again to pick up a change (default `60s`, at
    /// least `100ms`). The engine has no change feed: this poll is how a change arrives,
    /// so set it to about half the delay you accept (`500ms` for a change within 1 s).
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    #[x_kube(validation = kube::core::Rule::new("duration(self) >= duration('100ms')")
        .message("refreshInterval: at least 100ms"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_interval: Option<String>,
    /// Workloads of this namespace restarted (as `kubectl rollout restart`) when the
    /// Secret's value changes. An old credential is revoked only after they rolled out.
    #[schemars(length(max = 16))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollout_restart: Vec<RolloutTarget>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "[has(self.kv), has(self.database), has(self.pki)].filter(x, x).size() == 1"
).message("source: set exactly one of kv, database and pki"))]
pub struct SecretSyncSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv: Option<KvSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pki: Option<PkiSource>,
}

/// A KV version 2 entry; its fields become the Secret's keys.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KvSource {
    /// The KV v2 mount.
    #[schemars(length(min = 1, max = 128), regex(pattern = ENGINE_PATH))]
    #[serde(default = "default_kv_mount")]
    pub mount: String,
    /// The entry's path within the mount (read at `<mount>/data/<path>`).
    #[schemars(length(min = 1, max = 512), regex(pattern = ENGINE_PATH))]
    pub path: String,
    /// A fixed version; the latest version when unset (and changes are followed).
    #[schemars(range(min = 1))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
}

/// A dynamic database credential (`<mount>/creds/<role>`): `username` and `password`,
/// leased, renewed, and re-issued at the lease's max TTL.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSource {
    #[schemars(length(min = 1, max = 128), regex(pattern = ENGINE_PATH))]
    #[serde(default = "default_database_mount")]
    pub mount: String,
    #[schemars(length(min = 1, max = 128), regex(pattern = ENGINE_NAME))]
    pub role: String,
}

/// A certificate issued by a PKI role (`<mount>/issue/<role>`): `certificate`,
/// `private_key`, `issuing_ca`, `ca_chain`, `serial_number`; re-issued before it expires.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PkiSource {
    #[schemars(length(min = 1, max = 128), regex(pattern = ENGINE_PATH))]
    #[serde(default = "default_pki_mount")]
    pub mount: String,
    #[schemars(length(min = 1, max = 128), regex(pattern = ENGINE_NAME))]
    pub role: String,
    #[schemars(length(min = 1, max = 253))]
    pub common_name: String,
    /// Further DNS names (subject alternative names).
    #[schemars(length(max = 32), inner(length(min = 1, max = 253)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alt_names: Vec<String>,
    /// Requested lifetime (the role's default when unset).
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecretSyncAuth {
    /// The engine's Kubernetes auth role (`auth/kubernetes/role/<role>`).
    #[schemars(length(min = 1, max = 128), regex(pattern = ENGINE_NAME))]
    pub role: String,
    /// A ServiceAccount of this SecretSync's namespace. The controller logs in with a
    /// short-lived token of it (audience `capstan-engine`), so this SecretSync can never
    /// read more than that ServiceAccount could.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub service_account_name: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "self.type != 'kubernetes.io/tls' || !has(self.template) || ('tls.crt' in self.template && 'tls.key' in self.template)"
).message("target.template: a kubernetes.io/tls Secret needs the keys tls.crt and tls.key"))]
pub struct SecretSyncTarget {
    /// The Secret's name, in this namespace. An existing Secret that this SecretSync
    /// does not own is never overwritten.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub name: String,
    /// The Secret's type (Opaque by default). Service account token and bootstrap token
    /// types are refused.
    #[serde(default, rename = "type")]
    pub type_: TargetType,
    /// Secret key to a template over the source's fields: text in which a field's name
    /// in double curly braces (Mustache style, e.g. the field `username`) is replaced by
    /// its value. When unset, one key per field of the source. Keys are Secret keys:
    /// letters, digits, `-`, `_`, `.`, never `..` and never `/` (they become file names
    /// when the Secret is mounted: S4).
    #[schemars(schema_with = "template_schema")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutTarget {
    pub kind: RolloutKind,
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub name: String,
}

/// The most keys a template may have, and the longest template text.
pub const MAX_TEMPLATE_KEYS: usize = 64;
pub const MAX_TEMPLATE_LEN: usize = 8192;

fn template_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "maxProperties": MAX_TEMPLATE_KEYS,
        "additionalProperties": {"type": "string", "maxLength": MAX_TEMPLATE_LEN},
        "x-kubernetes-validations": [{
            "rule": "self.all(k, k.size() <= 253 && k.matches('^[-._a-zA-Z0-9]+$') && !k.contains('..') && k != '.')",
            "message": "target.template: keys must be Secret keys (letters, digits, '-', '_', '.'; no '..', no '/')",
        }],
    })
}

fn default_kv_mount() -> String {
    "secret".into()
}

fn default_database_mount() -> String {
    "database".into()
}

fn default_pki_mount() -> String {
    "pki".into()
}

/// What `kubectl get secretsync` and `-o yaml` show. Never a secret value, a lease id or
/// a token.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecretSyncStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the target Secret was last written from the source (created, changed,
    /// rotated or restored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    /// The KV version the Secret holds (KV sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_version: Option<i64>,
    /// When the credential in the Secret stops working unless renewed (dynamic sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_expires_at: Option<Time>,
    /// Whether that lease can be renewed further; false once it is at its max TTL, when a
    /// new credential is issued before it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_renewable: Option<bool>,
    /// HMAC-SHA256 (hex) of the target Secret's data, under a key only the controller
    /// holds: how a hand-edited Secret is recognised. Reveals nothing about the values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_hmac: Option<String>,
    #[schemars(schema_with = "conditions::schema")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Which engine a source reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Kv,
    Database,
    Pki,
}

impl SecretSyncSource {
    /// The one source set, or None for an object that got past the schema without one.
    pub fn kind(&self) -> Option<SourceKind> {
        match (&self.kv, &self.database, &self.pki) {
            (Some(_), None, None) => Some(SourceKind::Kv),
            (None, Some(_), None) => Some(SourceKind::Database),
            (None, None, Some(_)) => Some(SourceKind::Pki),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::crd::CustomResourceExt;

    fn schema() -> serde_json::Value {
        let crd = SecretSync::crd();
        serde_json::to_value(&crd.spec.versions[0].schema).unwrap()["openAPIV3Schema"].clone()
    }

    /// S1: no field anywhere in the spec can name a namespace.
    #[test]
    fn no_namespace_field_anywhere_in_the_spec() {
        fn walk(path: &str, schema: &serde_json::Value, found: &mut Vec<String>) {
            if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
                for (name, sub) in props {
                    if name.to_lowercase().contains("namespace") {
                        found.push(format!("{path}.{name}"));
                    }
                    walk(&format!("{path}.{name}"), sub, found);
                }
            }
            for key in ["items", "additionalProperties"] {
                if let Some(sub) = schema.get(key) {
                    walk(path, sub, found);
                }
            }
        }
        let mut found = vec![];
        walk("spec", &schema()["properties"]["spec"], &mut found);
        assert!(found.is_empty(), "namespace fields: {found:?}");
        assert_eq!(
            schema()["properties"]["spec"].get("x-kubernetes-preserve-unknown-fields"),
            None
        );
    }

    /// S3: the target type is an enum without the service account token type.
    #[test]
    fn target_types_exclude_service_account_tokens() {
        let types = &schema()["properties"]["spec"]["properties"]["target"]["properties"]["type"]["enum"];
        let types: Vec<&str> = types
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert!(types.contains(&"Opaque") && types.contains(&"kubernetes.io/tls"));
        assert!(
            !types
                .iter()
                .any(|t| t.contains("service-account-token") || t.contains("bootstrap"))
        );
        for t in [
            TargetType::Opaque,
            TargetType::BasicAuth,
            TargetType::Tls,
            TargetType::SshAuth,
            TargetType::DockerConfigJson,
        ] {
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
    }

    #[test]
    fn defaults_fill_mounts_and_policy() {
        let spec: SecretSyncSpec = serde_json::from_value(serde_json::json!({
            "source": {"kv": {"path": "app/db"}},
            "auth": {"role": "app", "serviceAccountName": "app"},
            "target": {"name": "db"},
        }))
        .unwrap();
        assert_eq!(spec.source.kind(), Some(SourceKind::Kv));
        assert_eq!(spec.source.kv.as_ref().unwrap().mount, "secret");
        assert_eq!(spec.target.type_, TargetType::Opaque);
        assert_eq!(spec.target.deletion_policy, DeletionPolicy::Delete);
        let two: SecretSyncSource = serde_json::from_value(serde_json::json!({
            "kv": {"path": "a"}, "database": {"role": "r"},
        }))
        .unwrap();
        assert_eq!(two.kind(), None);
    }

    /// S4: key names are checked by CEL at the door; the rule is in the schema.
    #[test]
    fn template_keys_are_checked_at_the_door() {
        let template = &schema()["properties"]["spec"]["properties"]["target"]["properties"]["template"];
        let rule = template["x-kubernetes-validations"][0]["rule"].as_str().unwrap();
        assert!(rule.contains("!k.contains('..')") && rule.contains("^[-._a-zA-Z0-9]+$"));
    }
}
