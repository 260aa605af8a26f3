//! ServiceIntentions: which services may talk to one destination service, by identity.
//!
//! Modelled on Consul's `ServiceIntentions` config entry so that consul-k8s manifests
//! carry over by changing only `apiVersion`: one object per destination, a list of
//! sources, each with either an L4 `action` or ordered L7 `permissions`.

use crate::conditions::{self, Condition};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

// Field formats are OpenAPI `pattern`s and enums rather than CEL: they cost nothing
// against the API server's CEL budget, which nested lists multiply. CEL is kept for
// rules across fields.

/// A DNS-1123 label (a Kubernetes service or namespace name) or `*` for any.
const NAME_OR_WILDCARD: &str = r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$";

// clippy reads the repeated `type_ = "string"` of several printcolumn(...) entries as a
// duplicated attribute; they are separate columns.
#[allow(clippy::duplicated_attributes)]
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
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    doc = "Which services may connect to one destination service, decided by service identity"
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!has(self.jwt)")
    .message(UNSUPPORTED_JWT).field_path(".jwt"))]
pub struct ServiceIntentionsSpec {
    /// The service these intentions protect.
    pub destination: IntentionDestination,
    /// Who may (or may not) connect; the most specific match decides. With no matching
    /// source, the cluster default applies (deny unless the chart says otherwise). A
    /// name and namespace pair may appear once (checked by the controller: a CEL rule
    /// for it would cost quadratically).
    #[schemars(length(max = 128))]
    #[serde(default)]
    pub sources: Vec<IntentionSource>,
    /// consul-k8s's JWT requirement for every request. Not supported yet: refused.
    #[schemars(schema_with = "any_object")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<serde_json::Value>,
}

// consul-k8s fields Capstan does not implement yet. They are declared, not left out: the
// API server prunes an undeclared field from a client that does not ask for strict field
// validation, and each of these pruned is a wider allow (a peer cluster's source becomes
// the local service of that name, a JWT-gated allow becomes unconditional). So the schema
// keeps them and a CEL rule refuses them, and the decision treats one stored anyway as
// deny-only.
const UNSUPPORTED_JWT: &str = "Capstan does not support jwt yet: the JWT requirement would not be \
    enforced, so the object is refused instead of applied without it";
const UNSUPPORTED_PEER: &str = "Capstan does not support sources[].peer (cluster peering) yet: \
    without it the source would name the local service of that name";
const UNSUPPORTED_PARTITION: &str = "Capstan does not support sources[].partition (admin \
    partitions) yet: without it the source would name the local service of that name";
const UNSUPPORTED_SAMENESS_GROUP: &str = "Capstan does not support sources[].samenessGroup yet: \
    without it the source would name the local service of that name";

/// Any JSON object, kept whole by the API server (so a CEL rule can see that it is set).
fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct IntentionDestination {
    /// The destination service's name, or `*` for every service in the namespace.
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_OR_WILDCARD))]
    pub name: String,
    /// The destination's namespace; the object's own namespace when unset.
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_OR_WILDCARD))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.action) != has(self.permissions)")
    .message("set exactly one of action (L4) or permissions (L7)"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.peer)")
    .message(UNSUPPORTED_PEER).field_path(".peer"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.partition)")
    .message(UNSUPPORTED_PARTITION).field_path(".partition"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.samenessGroup)")
    .message(UNSUPPORTED_SAMENESS_GROUP).field_path(".samenessGroup"))]
pub struct IntentionSource {
    /// The source service's name, or `*` for any service.
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_OR_WILDCARD))]
    pub name: String,
    /// The source's namespace (`*` for any); the destination's namespace when unset.
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_OR_WILDCARD))]
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
    #[schemars(length(min = 1, max = 32))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Vec<IntentionPermission>>,
    /// consul-k8s's cluster peer of the source. Not supported yet: refused.
    #[schemars(length(max = 253))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// consul-k8s's admin partition of the source. Not supported yet: refused.
    #[schemars(length(max = 253))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// consul-k8s's sameness group of the source. Not supported yet: refused.
    #[schemars(length(max = 253))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sameness_group: Option<String>,
}

impl IntentionSource {
    /// Whether the source uses a field Capstan does not implement (see above).
    pub fn unsupported(&self) -> bool {
        self.peer.is_some() || self.partition.is_some() || self.sameness_group.is_some()
    }
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IntentionAction {
    Allow,
    Deny,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!has(self.jwt)")
    .message(UNSUPPORTED_JWT).field_path(".jwt"))]
pub struct IntentionPermission {
    pub action: IntentionAction,
    pub http: HttpMatch,
    /// consul-k8s's JWT requirement for this permission. Not supported yet: refused.
    #[schemars(schema_with = "any_object")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<serde_json::Value>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "[has(self.pathExact), has(self.pathPrefix), has(self.pathRegex)].filter(x, x).size() <= 1"
).message("set at most one of pathExact, pathPrefix and pathRegex"))]
pub struct HttpMatch {
    #[schemars(length(min = 1, max = 1024), regex(pattern = "^/"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_exact: Option<String>,
    #[schemars(length(min = 1, max = 1024), regex(pattern = "^/"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// An RE2-syntax regular expression matched against the whole path.
    #[schemars(length(min = 1, max = 1024))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    /// HTTP methods this rule matches; every method when empty.
    #[schemars(length(max = 9))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<HttpMethod>,
    /// Header conditions; all of them must hold.
    #[schemars(length(max = 16))]
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
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))]
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

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
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
        self.spec
            .destination
            .namespace
            .as_deref()
            .or(self.metadata.namespace.as_deref())
    }
}
