//! ServiceIntentions: which services may talk to one destination service, by identity.
//!
//! Modelled on Consul's `ServiceIntentions` config entry so that consul-k8s manifests
//! carry over by changing only `apiVersion`: one object per destination, a list of
//! sources, each with either an L4 `action` or ordered L7 `permissions`.

use crate::conditions::{self, Condition};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A DNS-1123 label (a Kubernetes service or namespace name) or `*` for any.
const NAME_OR_WILDCARD: &str = "self == '*' || self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')";
const NAME_OR_WILDCARD_MESSAGE: &str =
    "must be '*' or a lowercase RFC 1123 label (letters, digits and '-'; at most 63 characters)";

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mesh.capstan.dev",
    version = "v1alpha1",
    kind = "ServiceIntentions",
    plural = "serviceintentions",
    singular = "serviceintentions",
    shortname = "svcintentions",
    shortname = "sint",
    category = "capstan",
    namespaced,
    status = "ServiceIntentionsStatus",
    printcolumn(name = "Destination", type_ = "string", json_path = ".spec.destination.name"),
    printcolumn(name = "Sources", type_ = "integer", json_path = ".status.sources"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    doc = "Which services may connect to one destination service, decided by service identity"
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceIntentionsSpec {
    /// The service these intentions protect.
    pub destination: IntentionDestination,
    /// Who may (or may not) connect, most specific match first. With no matching source,
    /// the cluster default applies (deny unless the chart says otherwise).
    #[schemars(length(max = 64))]
    #[x_kube(validation = kube::core::Rule::new(
        "self.all(s, self.exists_one(t, t.name == s.name && (has(t.namespace) ? t.namespace : '') == (has(s.namespace) ? s.namespace : '')))"
    ).message("each name and namespace pair may appear only once").reason(kube::core::Reason::FieldValueDuplicate))]
    #[serde(default)]
    pub sources: Vec<IntentionSource>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct IntentionDestination {
    /// The destination service's name, or `*` for every service in the namespace.
    #[x_kube(validation = kube::core::Rule::new(NAME_OR_WILDCARD).message(NAME_OR_WILDCARD_MESSAGE))]
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The destination's namespace; the object's own namespace when unset.
    #[x_kube(validation = kube::core::Rule::new(NAME_OR_WILDCARD).message(NAME_OR_WILDCARD_MESSAGE))]
    #[schemars(length(min = 1, max = 63))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.action) != has(self.permissions)")
    .message("set exactly one of action (L4) or permissions (L7)"))]
pub struct IntentionSource {
    /// The source service's name, or `*` for any service.
    #[x_kube(validation = kube::core::Rule::new(NAME_OR_WILDCARD).message(NAME_OR_WILDCARD_MESSAGE))]
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The source's namespace (`*` for any); the destination's namespace when unset.
    #[x_kube(validation = kube::core::Rule::new(NAME_OR_WILDCARD).message(NAME_OR_WILDCARD_MESSAGE))]
    #[schemars(length(min = 1, max = 63))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Free text for people reading the intention.
    #[schemars(length(max = 512))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// L4: allow or deny every connection from this source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<IntentionAction>,
    /// L7: HTTP rules evaluated in order; the first match decides, no match denies.
    #[schemars(length(min = 1, max = 64))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Vec<IntentionPermission>>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IntentionAction {
    Allow,
    Deny,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IntentionPermission {
    pub action: IntentionAction,
    pub http: HttpMatch,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "[has(self.pathExact), has(self.pathPrefix), has(self.pathRegex)].filter(x, x).size() <= 1"
).message("set at most one of pathExact, pathPrefix and pathRegex"))]
pub struct HttpMatch {
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('/')").message("must start with '/'"))]
    #[schemars(length(max = 1024))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_exact: Option<String>,
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('/')").message("must start with '/'"))]
    #[schemars(length(max = 1024))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// An RE2-syntax regular expression matched against the whole path.
    #[schemars(length(min = 1, max = 1024))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    /// HTTP methods this rule matches; every method when empty.
    #[schemars(length(max = 9))]
    #[x_kube(validation = kube::core::Rule::new(
        "self.all(m, m in ['GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'CONNECT', 'OPTIONS', 'TRACE', 'PATCH'])"
    ).message("each method must be an upper-case HTTP method such as GET or POST"))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Header conditions; all of them must hold.
    #[schemars(length(max = 32))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub header: Vec<HttpHeaderMatch>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "[has(self.present), has(self.exact), has(self.prefix), has(self.suffix), has(self.regex)].filter(x, x).size() == 1"
).message("set exactly one of present, exact, prefix, suffix and regex"))]
pub struct HttpHeaderMatch {
    /// The header's name, matched case-insensitively.
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[A-Za-z0-9!#$%&\\'*+.^_`|~-]+$')")
        .message("must be an HTTP header name (RFC 9110 token)"))]
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
    #[schemars(length(max = 1024))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[schemars(length(max = 1024))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[schemars(length(max = 1024))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    #[schemars(length(min = 1, max = 1024))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// Inverts the match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invert: Option<bool>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServiceIntentionsStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// How many sources the object lists (a printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<i32>,
    /// Other ServiceIntentions naming the same destination, as namespace/name. The oldest
    /// object for a destination is the one in force; the others report Ready=False.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
    #[schemars(schema_with = "conditions::schema")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl ServiceIntentions {
    /// The destination's namespace: the spec's, or the object's own.
    pub fn destination_namespace(&self) -> Option<&str> {
        self.spec.destination.namespace.as_deref().or(self.metadata.namespace.as_deref())
    }
}
