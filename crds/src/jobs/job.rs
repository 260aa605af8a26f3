//! Job: Nomad's jobspec in Kubernetes form. One object describes what to run (groups of
//! tasks), where (datacenters, constraints, affinities, spreads), how to update it (the
//! `update` block: canaries, max_parallel, deadlines, auto_promote, auto_revert) and when
//! (periodic, parameterized). The jobs reconciler compiles it into native objects:
//! ReplicaSets it rolls itself (service), batch/v1 Jobs (batch, sysbatch, dispatched
//! children), CronJobs (periodic), DaemonSets (system) and PriorityClasses (priority).
//!
//! Field names follow Nomad's jobspec in camelCase (`max_parallel` → `maxParallel`), so
//! `capstan job convert` maps a jobspec field by field; docs/jobs.md lists the mapping of
//! Nomad's node attributes to node labels. Rules that fit the schema are in it (patterns,
//! enums, bounds, CEL across fields); the rest (regexps that compile, version
//! constraints that parse, cron expressions, a dispatch's meta against its parent) is the
//! validating webhook's, in [`super::validate`].

use crate::conditions::{self, Condition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A DNS-1123 label: group, task, port and service names become parts of object names.
const DNS_LABEL: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A Go duration (`30s`, `1h30m`, `500ms`), as Nomad's jobspec and CEL's duration() read it.
const DURATION: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";
/// A meta key: it becomes the environment variable `NOMAD_META_<key>`.
const META_KEY: &str = r"^[A-Za-z_][A-Za-z0-9_.-]*$";

#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "jobs.capstan.dev",
    version = "v1alpha1",
    kind = "Job",
    plural = "jobs",
    singular = "job",
    shortname = "cjob",
    category = "capstan",
    namespaced,
    status = "JobStatus",
    // Object names are <job>-<group>-v<version>[-<suffix>]: keep room for them.
    validation = kube::core::Rule::new("self.metadata.name.size() <= 40")
        .message("metadata.name: at most 40 characters (the objects the job runs as append its group, version and a suffix)"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(name = "Version", type_ = "integer", json_path = ".status.version"),
    printcolumn(name = "Running", type_ = "integer", json_path = ".status.running"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".status.desired"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    doc = "A Nomad-style job: groups of tasks placed by datacenter, priority and constraints, updated with canaries, run as a service, a batch, on every node, on a schedule or on dispatch"
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!has(self.periodic) || self.type == 'batch' || self.type == 'sysbatch'")
    .message("periodic: only batch and sysbatch jobs can be periodic").field_path(".periodic"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.parameterized) || self.type == 'batch' || self.type == 'sysbatch'")
    .message("parameterized: only batch and sysbatch jobs can be parameterized").field_path(".parameterized"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.parameterized) || !has(self.dispatch)")
    .message("dispatch: a dispatched child is not itself parameterized").field_path(".dispatch"))]
// A child is judged against its parent when it is dispatched (by the webhook, which
// reads the parent): changing spec.dispatch afterwards would escape that check.
#[x_kube(validation = kube::core::Rule::new(
    "has(self.dispatch) == has(oldSelf.dispatch) && (!has(self.dispatch) || self.dispatch == oldSelf.dispatch)")
    .message("dispatch: set when a child is dispatched and never changed after").field_path(".dispatch"))]
// A job's objects are of its type's kinds (ReplicaSets, batch Jobs, DaemonSets, CronJobs):
// a changed type would leave the old type's objects running beside the new ones.
#[x_kube(validation = kube::core::Rule::new("self.type == oldSelf.type")
    .message("type: cannot change; delete the job and create it with the new type").field_path(".type"))]
// The job's canaries apply to every group without its own (a group's own is held to its
// count on TaskGroup).
#[x_kube(validation = kube::core::Rule::new(
    "self.type != 'service' || !has(self.update) || !has(self.update.canary) || \
     self.groups.all(g, (has(g.update) && has(g.update.canary)) || self.update.canary <= g.count)")
    .message("update.canary: more canaries than a group's count (give that group its own update.canary)")
    .field_path(".update.canary"))]
#[x_kube(validation = kube::core::Rule::new(
    "has(self.parameterized) || has(self.dispatch) || self.groups.all(g, g.tasks.all(t, !has(t.dispatchPayload)))")
    .message("groups: a task's dispatchPayload needs a parameterized job (only a dispatch carries a payload)")
    .field_path(".groups"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.update) || self.type == 'service' || self.type == 'system'")
    .message("update: only service and system jobs have an update strategy").field_path(".update"))]
pub struct JobSpec {
    /// service (long-running, rolled by `update`), batch (runs to completion), system
    /// (one per eligible node) or sysbatch (one run to completion per eligible node).
    #[serde(default, rename = "type")]
    pub type_: JobType,
    /// 1-100, default 50. Placed as a PriorityClass Capstan manages
    /// (`capstan-priority-<n>`): a higher-priority job's pods preempt lower ones' when the
    /// cluster is full.
    #[schemars(range(min = 1, max = 100))]
    #[serde(default = "default_priority")]
    pub priority: i32,
    /// Datacenters the job may run in, as globs (`dc*`); default `*`. Matched against the
    /// node label the chart names (topology.kubernetes.io/region by default).
    #[schemars(
        length(max = 32),
        inner(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z0-9*?._-]+$"))
    )]
    #[serde(default = "default_datacenters")]
    pub datacenters: Vec<String>,
    /// Placement rules every group must satisfy.
    #[schemars(length(max = 32))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<Constraint>,
    /// Placement preferences every group has.
    #[schemars(length(max = 32))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affinities: Vec<Affinity>,
    /// How every group's allocations are spread over an attribute's values.
    #[schemars(length(max = 8))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spreads: Vec<Spread>,
    /// The default update strategy of every group (a group's own `update` overrides it
    /// field by field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateStrategy>,
    /// Run on a schedule (batch and sysbatch): each launch is a child run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub periodic: Option<Periodic>,
    /// A template run only on dispatch (`capstan job dispatch`), with meta and a payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameterized: Option<Parameterized>,
    /// Set on a dispatched child by `capstan job dispatch`: its parent, meta and payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch: Option<Dispatch>,
    /// Promote the canaries of this version (what `capstan job promote` sets). Not part of
    /// a version: changing it starts no deployment.
    #[schemars(range(min = 1))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote: Option<i64>,
    /// Free-form metadata, given to every task as `NOMAD_META_<key>`.
    #[schemars(length(max = 64))]
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// The groups of tasks the job runs.
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = kube::core::Rule::new("self.all(g, self.exists_one(h, h.name == g.name))")
        .message("groups: each group name may appear once"))]
    pub groups: Vec<TaskGroup>,
}

fn default_priority() -> i32 {
    50
}

fn default_datacenters() -> Vec<String> {
    vec!["*".to_owned()]
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "lowercase")]
pub enum JobType {
    #[default]
    Service,
    Batch,
    System,
    Sysbatch,
}

impl JobType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "service",
            Self::Batch => "batch",
            Self::System => "system",
            Self::Sysbatch => "sysbatch",
        }
    }
}

/// Nomad's constraint operators. `=` also reads Nomad's `==` and `is`, `!=` its `not`.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub enum Operator {
    #[default]
    #[serde(rename = "=", alias = "==", alias = "is")]
    Equal,
    #[serde(rename = "!=", alias = "not")]
    NotEqual,
    #[serde(rename = ">")]
    Greater,
    #[serde(rename = ">=")]
    GreaterEqual,
    #[serde(rename = "<")]
    Less,
    #[serde(rename = "<=")]
    LessEqual,
    #[serde(rename = "regexp")]
    Regexp,
    #[serde(rename = "set_contains", alias = "set_contains_all")]
    SetContains,
    #[serde(rename = "set_contains_any")]
    SetContainsAny,
    #[serde(rename = "version")]
    Version,
    #[serde(rename = "semver")]
    Semver,
    #[serde(rename = "is_set")]
    IsSet,
    #[serde(rename = "is_not_set")]
    IsNotSet,
    #[serde(rename = "distinct_hosts")]
    DistinctHosts,
    #[serde(rename = "distinct_property")]
    DistinctProperty,
}

impl Operator {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Equal => "=",
            Self::NotEqual => "!=",
            Self::Greater => ">",
            Self::GreaterEqual => ">=",
            Self::Less => "<",
            Self::LessEqual => "<=",
            Self::Regexp => "regexp",
            Self::SetContains => "set_contains",
            Self::SetContainsAny => "set_contains_any",
            Self::Version => "version",
            Self::Semver => "semver",
            Self::IsSet => "is_set",
            Self::IsNotSet => "is_not_set",
            Self::DistinctHosts => "distinct_hosts",
            Self::DistinctProperty => "distinct_property",
        }
    }
}

/// A hard placement rule: `attribute operator value`. The attribute is Nomad's
/// interpolation (`${node.datacenter}`, `${meta.rack}`, `${attr.kernel.name}`) or a node
/// label by name; docs/jobs.md lists the mapping.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.operator == 'distinct_hosts' || has(self.attribute)")
    .message("attribute: required by every operator but distinct_hosts").field_path(".attribute"))]
#[x_kube(validation = kube::core::Rule::new(
    "self.operator in ['is_set', 'is_not_set', 'distinct_hosts', 'distinct_property'] || has(self.value)")
    .message("value: required by this operator").field_path(".value"))]
pub struct Constraint {
    #[schemars(length(min = 1, max = 253))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribute: Option<String>,
    #[serde(default)]
    pub operator: Operator,
    #[schemars(length(max = 1024))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// A soft placement preference: nodes matching `attribute operator value` are preferred
/// (positive weight) or avoided (negative weight).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!(self.operator in ['distinct_hosts', 'distinct_property'])")
    .message("operator: distinct_hosts and distinct_property are constraints, not affinities").field_path(".operator"))]
#[x_kube(validation = kube::core::Rule::new("self.operator in ['is_set', 'is_not_set'] || has(self.value)")
    .message("value: required by this operator").field_path(".value"))]
pub struct Affinity {
    #[schemars(length(min = 1, max = 253))]
    pub attribute: String,
    #[serde(default)]
    pub operator: Operator,
    #[schemars(length(max = 1024))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// -100..100, not 0 (default 50).
    #[schemars(range(min = -100, max = 100))]
    #[x_kube(validation = kube::core::Rule::new("self != 0").message("weight: may not be 0"))]
    #[serde(default = "default_weight")]
    pub weight: i32,
}

fn default_weight() -> i32 {
    50
}

/// Spread allocations over the values of an attribute: evenly, or by target percents.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!has(self.targets) || self.targets.map(t, t.percent).sum() <= 100")
    .message("targets: the percents add up to more than 100").field_path(".targets"))]
pub struct Spread {
    #[schemars(length(min = 1, max = 253))]
    pub attribute: String,
    /// 1-100 (default 50): how strongly the spread weighs against other preferences.
    #[schemars(range(min = 1, max = 100))]
    #[serde(default = "default_weight")]
    pub weight: i32,
    #[schemars(length(max = 16))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<SpreadTarget>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SpreadTarget {
    #[schemars(length(min = 1, max = 63))]
    pub value: String,
    #[schemars(range(min = 0, max = 100))]
    pub percent: i32,
}

/// Nomad's `update` block. Durations are Go durations.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct UpdateStrategy {
    /// Allocations updated at once (default 1); 0 turns rolling updates off.
    #[schemars(range(min = 0, max = 1000))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<i32>,
    /// checks (pod readiness, default), task_states (containers running) or manual.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// How long an allocation must be healthy before it counts (default 10s).
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_healthy_time: Option<String>,
    /// How long an allocation has to become healthy (default 5m).
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_deadline: Option<String>,
    /// How long the deployment may go without an allocation turning healthy before it
    /// fails (default 10m; 0 turns it off).
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_deadline: Option<String>,
    /// Canaries placed beside the stable version until promoted (default 0).
    #[schemars(range(min = 0, max = 1000))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<i32>,
    /// Promote the canaries once all are healthy (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_promote: Option<bool>,
    /// Return to the last stable version when the deployment fails (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_revert: Option<bool>,
    /// Nomad's stagger (delay between batches, default 30s).
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stagger: Option<String>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheck {
    #[default]
    Checks,
    TaskStates,
    Manual,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Periodic {
    /// Cron expressions (5 fields, or 6 with seconds refused: CronJobs have none); each
    /// is a schedule of its own.
    #[schemars(length(min = 1, max = 8), inner(length(min = 1, max = 128)))]
    pub crons: Vec<String>,
    /// An IANA time zone (default UTC).
    #[schemars(length(max = 64))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Never launch while a previous launch still runs.
    #[serde(default)]
    pub prohibit_overlap: bool,
    /// Default true; false suspends the schedule.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

fn default_true() -> bool {
    true
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Parameterized {
    /// Whether a dispatch carries a payload: optional (default), required or forbidden.
    #[serde(default)]
    pub payload: PayloadRule,
    #[schemars(length(max = 64), inner(regex(pattern = META_KEY)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub meta_required: Vec<String>,
    #[schemars(length(max = 64), inner(regex(pattern = META_KEY)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub meta_optional: Vec<String>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PayloadRule {
    #[default]
    Optional,
    Required,
    Forbidden,
}

/// What made a dispatched child: checked by the webhook against the parent's
/// `parameterized` block when the child is created.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Dispatch {
    /// The parameterized Job (same namespace) this run was dispatched from.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL))]
    pub parent: String,
    #[schemars(length(max = 64))]
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// The payload, base64, at most 16 KiB decoded (Nomad's limit). Written to each task's
    /// `dispatchPayload.file`.
    #[schemars(length(max = 21848))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.tasks.all(t, self.tasks.exists_one(u, u.name == t.name))")
    .message("tasks: each task name may appear once in a group").field_path(".tasks"))]
// The secrets agent renders templates, and only a group with vault gets it.
#[x_kube(validation = kube::core::Rule::new(
    "has(self.vault) || self.tasks.all(t, !has(t.templates) || size(t.templates) == 0)")
    .message("vault: the group's tasks have templates, which the secrets agent renders: it needs a vault block")
    .field_path(".vault"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.update) || !has(self.update.canary) || self.update.canary <= self.count")
    .message("update.canary: more canaries than the group's count").field_path(".update.canary"))]
pub struct TaskGroup {
    #[schemars(length(min = 1, max = 20), regex(pattern = DNS_LABEL))]
    pub name: String,
    /// Allocations of the group (default 1; ignored by system and sysbatch jobs).
    #[schemars(range(min = 0, max = 10000))]
    #[serde(default = "default_count")]
    pub count: i32,
    #[schemars(length(max = 32))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<Constraint>,
    #[schemars(length(max = 32))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affinities: Vec<Affinity>,
    #[schemars(length(max = 8))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spreads: Vec<Spread>,
    #[schemars(length(min = 1, max = 16))]
    pub tasks: Vec<Task>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reschedule: Option<ReschedulePolicy>,
    /// Overrides the job's `update` field by field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateStrategy>,
    /// A Kubernetes Service per entry, named `<job>-<service name>`.
    #[schemars(length(max = 16))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
    /// Join Capstan's mesh: the webhook injects the mTLS sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<Connect>,
    /// Give the tasks Capstan's secrets agent (injected by the webhook).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<Vault>,
    /// Given to the group's tasks as `NOMAD_META_<key>`, over the job's meta.
    #[schemars(length(max = 64))]
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
}

fn default_count() -> i32 {
    1
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL))]
    pub name: String,
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Replaces the image's entrypoint.
    #[schemars(length(max = 4096))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[schemars(length(max = 256))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Names are checked by the webhook (a CEL rule over map keys costs too much).
    #[schemars(length(max = 256))]
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    #[schemars(length(max = 32))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    /// Files rendered by the secrets agent (needs the group's `vault`).
    #[schemars(length(max = 32))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub templates: Vec<Template>,
    /// Where a dispatched payload is written (parameterized jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch_payload: Option<DispatchPayload>,
    /// Time between the stop signal and the kill (default 5s).
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_timeout: Option<String>,
    /// Nomad's lifecycle hooks: prestart tasks run as init containers (sidecar ones
    /// keep running beside the main tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
}

/// Kubernetes quantities: `cpu: 500m`, `memory: 256Mi`. Nomad's MHz have no Kubernetes
/// meaning; the converter maps them at 1000 MHz to a core and says so.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    #[schemars(length(max = 32), regex(pattern = r"^[0-9]+(\.[0-9]+)?m?$"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    #[schemars(
        length(max = 32),
        regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Nomad's memory_max: the limit above the reservation.
    #[schemars(
        length(max = 32),
        regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    /// The port's label (`http`): `NOMAD_PORT_<name>` and a service's `port` name it.
    #[schemars(length(min = 1, max = 15), regex(pattern = DNS_LABEL))]
    pub name: String,
    /// The port the task listens on (Nomad's `to`).
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    #[serde(default)]
    pub protocol: PortProtocol,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PortProtocol {
    #[default]
    TCP,
    UDP,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    pub hook: LifecycleHook,
    /// Keep running beside the main tasks (a sidecar) instead of completing first.
    #[serde(default)]
    pub sidecar: bool,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LifecycleHook {
    #[default]
    Prestart,
    Poststart,
    Poststop,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DispatchPayload {
    /// A file name (no `/`), written under the task's `/local` directory.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"))]
    pub file: String,
}

/// Nomad's `restart` block: how the group's tasks are restarted in place.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RestartPolicy {
    #[schemars(range(min = 0, max = 1000))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<RestartMode>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RestartMode {
    #[default]
    Fail,
    Delay,
}

/// Nomad's `reschedule` block: how a failed allocation is replaced on another node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReschedulePolicy {
    #[schemars(range(min = 0, max = 1000))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<String>,
    /// constant, exponential or fibonacci.
    #[schemars(length(max = 16), regex(pattern = r"^(constant|exponential|fibonacci)$"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_function: Option<String>,
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlimited: Option<bool>,
}

/// A Kubernetes Service over the group's allocations, named `<job>-<name>`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    #[schemars(length(min = 1, max = 22), regex(pattern = DNS_LABEL))]
    pub name: String,
    /// A task port's name (or its number).
    #[schemars(length(min = 1, max = 15))]
    pub port: String,
    #[schemars(length(max = 32), inner(length(max = 63)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The task the checks probe (default: the task that has the port).
    #[schemars(length(max = 63))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Health checks, mapped to the task's readiness probe (the first) and, with
    /// `onUpdate: require_healthy`, what a deployment waits on.
    #[schemars(length(max = 8))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<Check>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.type != 'http' || has(self.path)")
    .message("path: an http check needs a path").field_path(".path"))]
#[x_kube(validation = kube::core::Rule::new("self.type != 'script' || has(self.command)")
    .message("command: a script check needs a command").field_path(".command"))]
pub struct Check {
    #[schemars(length(max = 63))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(rename = "type")]
    pub type_: CheckType,
    #[schemars(length(max = 1024))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A port name or number; the service's port by default.
    #[schemars(length(max = 15))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    #[schemars(length(max = 1024))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[schemars(length(max = 64))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Default 10s.
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Default 2s.
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum CheckType {
    #[default]
    Http,
    Tcp,
    Grpc,
    Script,
}

/// Consul Connect's sidecar service, reduced to what Capstan's mesh needs: the pod is
/// meshed, and each upstream is reached at 127.0.0.1:<localBindPort>, given to the tasks
/// as `NOMAD_UPSTREAM_ADDR_<name>` (and `_IP_`, `_PORT_`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Connect {
    #[schemars(length(max = 32))]
    #[x_kube(validation = kube::core::Rule::new("self.all(u, self.exists_one(v, v.localBindPort == u.localBindPort))")
        .message("upstreams: each localBindPort may be used once"))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<Upstream>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Upstream {
    /// The destination service (a Kubernetes Service name).
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL))]
    pub destination_name: String,
    /// The destination's namespace (default: the job's).
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_namespace: Option<String>,
    #[schemars(range(min = 1, max = 65535))]
    pub local_bind_port: i32,
}

/// The secrets agent: it logs in with the pod's ServiceAccount under `role` (the engine's
/// Kubernetes auth role) and renders the tasks' templates.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Vault {
    /// The engine's Kubernetes auth role.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
    )]
    pub role: String,
    /// The ServiceAccount the group's pods run as (default: the namespace's `default`).
    #[schemars(length(min = 1, max = 253))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// Nomad's policies, kept for the record: the role's policies are what the engine
    /// grants.
    #[schemars(length(max = 32))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
}

/// A file the agent renders. `data` is the template (the agent's grammar), `destination`
/// a file name under the shared secrets directory.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"))]
    pub destination: String,
    #[schemars(length(min = 1, max = 65536))]
    pub data: String,
    /// Nomad's change_mode: restart (default), noop or signal.
    #[schemars(length(max = 16), regex(pattern = r"^(restart|noop|signal)$"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_mode: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The newest version (each accepted spec is one, kept as a ControllerRevision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// The newest version whose deployment succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_version: Option<i64>,
    /// The version whose allocations run now (the stable one after a revert).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_version: Option<i64>,
    /// pending, running, deploying, complete, failed or dead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Allocations running, over all groups.
    #[serde(default)]
    pub running: i32,
    /// Allocations desired, over all groups.
    #[serde(default)]
    pub desired: i32,
    /// Per group and datacenter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub summary: Vec<GroupSummary>,
    /// The current (or last) deployment of a service job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<DeploymentStatus>,
    /// The newest runs of a periodic or parameterized job (at most 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<ChildRun>,
    #[schemars(schema_with = "conditions::schema")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GroupSummary {
    pub group: String,
    /// The datacenter (node label value) these allocations are in; empty for unplaced.
    #[serde(default)]
    pub datacenter: String,
    #[serde(default)]
    pub desired: i32,
    #[serde(default)]
    pub placed: i32,
    #[serde(default)]
    pub running: i32,
    #[serde(default)]
    pub healthy: i32,
    #[serde(default)]
    pub unhealthy: i32,
    #[serde(default)]
    pub failed: i32,
    #[serde(default)]
    pub complete: i32,
    #[serde(default)]
    pub lost: i32,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentStatus {
    pub version: i64,
    /// running, paused (canaries wait for promotion), successful, failed or reverted.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub canaries_desired: i32,
    #[serde(default)]
    pub canaries_placed: i32,
    #[serde(default)]
    pub canaries_healthy: i32,
    #[serde(default)]
    pub promoted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the deployment fails unless an allocation turns healthy (progress deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Time>,
    /// Set when a failure sent the job back to this stable version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverted_to: Option<i64>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ChildRun {
    pub name: String,
    /// Job (a dispatched child, a cjob) or batch/v1 Job (a periodic launch).
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<Time>,
    /// pending, running, complete or failed.
    pub status: String,
}
