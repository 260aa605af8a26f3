//! A Job compiled to the native objects it runs as. Pure: the same Job, version, nodes
//! and settings always give the same objects, so the controller can apply them with
//! server-side apply on every reconcile, the webhook can refuse what would not compile,
//! and the CLI can show what a change would do.
//!
//! The API (docs/jobs.md has the mapping in full):
//!
//! - [`Settings`] (the datacenter label) and [`Nodes`] (a snapshot of the cluster's nodes:
//!   name, labels, schedulable), from Kubernetes Node objects with [`Nodes::from_k8s`].
//! - [`pod_sets`]`(job, group, version, nodes, settings)`: the group's pods as one or more
//!   [`PodSet`]s, each a pod template with the share (`percent`) of the group's count it
//!   runs. One set, unless a spread has targets: then one set per target (pinned to its
//!   value) and one for the rest. [`split`] divides a count by the percents.
//! - [`template_hash`]`(job, group)`: what makes a change destructive. It hashes the spec
//!   that shapes the group's pods (not its count, its `update` block, the version number
//!   or the nodes), so a count-only change keeps the ReplicaSet and a new node matching a
//!   regexp constraint rewrites its template without starting a deployment. Each
//!   [`PodSet::hash`] adds the set's target.
//! - Builders: [`replica_set`], [`services`], [`priority_class`], [`batch_job`],
//!   [`cron_jobs`], [`daemon_set`], [`sysbatch_job`], [`eligible_nodes`],
//!   [`payload_secret`], [`owner_reference`]; names in [`names`], labels in [`labels`].
//! - [`check`]`(job, settings)`: every error compiling would meet whatever the nodes (what
//!   the webhook refuses).
//! - [`update`]: a group's effective `update` block (the group's over the job's, Nomad's
//!   defaults filled in).
//! - Whatever has no Kubernetes form is a [`CompileError`] naming the field
//!   (`spec.groups[1].constraints[0].operator`), never a field dropped silently.
//!
//! How placement compiles: datacenters and constraints become one required node-affinity
//! term (`=` → In, `!=` → NotIn, is_set → Exists, is_not_set → DoesNotExist; regexp,
//! version, semver, set_contains*, Nomad's numeric-or-lexical ordering and datacenter
//! globs are evaluated against the nodes and become `In` over the values that match);
//! affinities become preferred terms (a negative weight prefers the negated term);
//! spreads without targets become topologySpreadConstraints, spreads with targets split
//! the count; distinct_hosts and distinct_property (limit 1) become pod anti-affinity.

pub mod duration;
pub mod labels;
pub mod names;
mod objects;
mod placement;
mod pod;
mod update;

pub use objects::{
    batch_job, cron_jobs, daemon_set, eligible_nodes, owner_reference, payload_secret, priority_class,
    replica_set, services, sysbatch_job,
};
pub use update::{Update, update};

use crate::attributes::DEFAULT_DATACENTER_LABEL;
use capstan_crds::jobs::{Job, JobType, TaskGroup};
use k8s_openapi::api::core::v1::{Node as K8sNode, PodTemplateSpec};
use std::collections::BTreeMap;
use thiserror::Error;

/// The field manager every object a Job owns is applied with.
pub const FIELD_MANAGER: &str = "capstan-controller-jobs";

/// What the compiler is configured with (the controller's flags, the webhook's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The node label a datacenter is (`${node.datacenter}`, `datacenters`).
    pub datacenter_label: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            datacenter_label: DEFAULT_DATACENTER_LABEL.to_owned(),
        }
    }
}

/// Something a Job asks for that has no Kubernetes form, or a value that cannot be used.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct CompileError {
    /// The field's path in the Job (`spec.groups[0].tasks[1].lifecycle.hook`).
    pub field: String,
    pub message: String,
}

impl CompileError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// One node as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Node {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Ready, not cordoned, and without a NoSchedule or NoExecute taint (the pods a Job
    /// runs tolerate none): where a system or sysbatch group runs.
    pub schedulable: bool,
}

impl Node {
    pub fn from_k8s(node: &K8sNode) -> Self {
        let spec = node.spec.as_ref();
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let cordoned = spec.and_then(|s| s.unschedulable).unwrap_or(false);
        let tainted = spec.and_then(|s| s.taints.as_ref()).is_some_and(|ts| {
            ts.iter()
                .any(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        });
        Self {
            name: node.metadata.name.clone().unwrap_or_default(),
            labels: node.metadata.labels.clone().unwrap_or_default(),
            schedulable: ready && !cordoned && !tainted,
        }
    }
}

/// A snapshot of the cluster's nodes, by name.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Nodes {
    nodes: BTreeMap<String, Node>,
}

impl Nodes {
    pub fn new(nodes: impl IntoIterator<Item = Node>) -> Self {
        Self {
            nodes: nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
        }
    }

    pub fn from_k8s<'a>(nodes: impl IntoIterator<Item = &'a K8sNode>) -> Self {
        Self::new(nodes.into_iter().map(Node::from_k8s))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn get(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The datacenter `node` is in (its datacenter label's value).
    pub fn datacenter<'a>(&'a self, node: &str, settings: &Settings) -> Option<&'a str> {
        self.get(node)?
            .labels
            .get(&settings.datacenter_label)
            .map(String::as_str)
    }
}

/// A share of a group's pods with one pod template.
#[derive(Clone, Debug, PartialEq)]
pub struct PodSet {
    /// The spread target the set is pinned to (a DNS-label form of its value), `other`
    /// for the share no target claims; None when the group has no spread targets.
    pub suffix: Option<String>,
    /// The share of the group's count, in percent (100 without spread targets).
    pub percent: u32,
    /// [`template_hash`] with the set's target: names the ReplicaSet and selects its pods.
    pub hash: String,
    pub template: PodTemplateSpec,
}

/// The pods of group `group_index` of `job` at `version`, as one set or one per spread
/// target.
pub fn pod_sets(
    job: &Job,
    group_index: usize,
    version: i64,
    nodes: &Nodes,
    settings: &Settings,
) -> Result<Vec<PodSet>, CompileError> {
    let placement = placement::Placement::of(job, group_index, nodes, settings)?;
    let base = pod::template(job, group_index, version, pod::Parent::OfJob)?;
    let hash = template_hash(job, group_index);
    Ok(placement
        .sets()
        .into_iter()
        .map(|set| {
            let mut template = base.clone();
            placement.apply(&mut template, set.pin.as_ref(), None);
            let hash = match &set.suffix {
                None => hash.clone(),
                Some(suffix) => names::hash(format!("{hash}/{suffix}").as_bytes()),
            };
            PodSet {
                suffix: set.suffix,
                percent: set.percent,
                hash,
                template,
            }
        })
        .collect())
}

/// Every error compiling `job` would meet, whatever the nodes: what the webhook refuses
/// (the builders its type uses, run against no nodes; placement's evaluated operators
/// then match nothing, which is not an error). One error per failing builder and group,
/// without repeats.
pub fn check(job: &Job, settings: &Settings) -> Vec<CompileError> {
    let nodes = Nodes::default();
    let mut errors: Vec<CompileError> = Vec::new();
    let mut note = |result: Result<(), CompileError>| {
        if let Err(e) = result
            && !errors.contains(&e)
        {
            errors.push(e);
        }
    };
    for g in 0..job.spec.groups.len() {
        note(pod_sets(job, g, 1, &nodes, settings).map(drop));
        note(update(job, g).map(drop));
        let periodic = job.spec.periodic.is_some();
        note(match job.spec.type_ {
            JobType::Service => Ok(()),
            JobType::Batch | JobType::Sysbatch if periodic => {
                cron_jobs(job, g, 1, &nodes, settings).map(drop)
            }
            JobType::Batch => batch_job(job, g, 1, &nodes, settings).map(drop),
            JobType::System => daemon_set(job, g, 1, &nodes, settings).map(drop),
            JobType::Sysbatch => sysbatch_job(job, g, 1, "node", &nodes, settings).map(drop),
        });
    }
    note(services(job).map(drop));
    note(payload_secret(job).map(drop));
    errors
}

/// The hash of what shapes group `group_index`'s pods: the group without its count and
/// `update` block, and the job-level fields that reach its pods (type, priority,
/// datacenters, constraints, affinities, spreads, meta, dispatch). Equal hashes: a change
/// is in place (a scale); different: destructive (a deployment).
pub fn template_hash(job: &Job, group_index: usize) -> String {
    let spec = &job.spec;
    let group = spec.groups.get(group_index).map(|g| TaskGroup {
        count: 0,
        update: None,
        ..g.clone()
    });
    names::template_hash(&(
        spec.type_,
        spec.priority,
        &spec.datacenters,
        &spec.constraints,
        &spec.affinities,
        &spec.spreads,
        &spec.meta,
        &spec.dispatch,
        group,
    ))
}

/// Divides `total` allocations over `sets` by their percents with the largest remainder
/// method: the shares add up to `total` (when the percents add up to 100), and ties go
/// to the earlier set, so the split is the same on every reconcile.
pub fn split(total: i32, sets: &[PodSet]) -> Vec<i32> {
    let total = i64::from(total.max(0));
    let exact: Vec<(i64, i64)> = sets
        .iter()
        .map(|s| {
            let scaled = total * i64::from(s.percent);
            (scaled / 100, scaled % 100)
        })
        .collect();
    let percent_sum: i64 = sets.iter().map(|s| i64::from(s.percent)).sum();
    let target = (total * percent_sum.min(100)) / 100;
    let mut shares: Vec<i64> = exact.iter().map(|(q, _)| *q).collect();
    let mut left = target - shares.iter().sum::<i64>();
    let mut order: Vec<usize> = (0..sets.len()).collect();
    order.sort_by(|&a, &b| exact[b].1.cmp(&exact[a].1).then(a.cmp(&b)));
    for i in order {
        if left <= 0 {
            break;
        }
        if exact[i].1 > 0 {
            shares[i] += 1;
            left -= 1;
        }
    }
    shares
        .into_iter()
        .map(|s| i32::try_from(s).unwrap_or(i32::MAX))
        .collect()
}

fn group_at(job: &Job, group_index: usize) -> Result<&TaskGroup, CompileError> {
    job.spec
        .groups
        .get(group_index)
        .ok_or_else(|| CompileError::new(format!("spec.groups[{group_index}]"), "no such group"))
}

/// The path of group `g`'s field (`spec.groups[0].tasks`).
fn group_field(g: usize, rest: &str) -> String {
    format!("spec.groups[{g}].{rest}")
}

#[cfg(test)]
mod tests;
