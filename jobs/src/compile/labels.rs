//! The labels and annotations on every object a Job owns and on its pods: the reconciler
//! finds its objects by them (never by remembering names), the status reads pods by them,
//! and Services and anti-affinity select by them.

use std::collections::BTreeMap;

/// The Job's name, on everything it owns.
pub const JOB: &str = "jobs.capstan.dev/job";
/// The task group.
pub const GROUP: &str = "jobs.capstan.dev/group";
/// The version (ControllerRevision number) that created the object.
pub const VERSION: &str = "jobs.capstan.dev/version";
/// A ReplicaSet's pod-template hash ([`super::template_hash`] and its pod set): part of
/// its selector, so ReplicaSets of one group never adopt each other's pods.
pub const TEMPLATE_HASH: &str = "jobs.capstan.dev/template-hash";
/// On a dispatched child Job: its parameterized parent.
pub const PARENT: &str = "jobs.capstan.dev/parent";
/// On the ControllerRevision of the stable version, with the value `true`.
pub const STABLE: &str = "jobs.capstan.dev/stable";
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "capstan";

/// Annotation on a sysbatch run (a batch/v1 Job): the node it is pinned to (a node name
/// can be longer than a label value).
pub const NODE: &str = "jobs.capstan.dev/node";
/// Annotation on a Service: the Nomad service's tags, comma separated.
pub const SERVICE_TAGS: &str = "jobs.capstan.dev/tags";
/// A label no node carries: a required node affinity on it (`Exists`) matches no node,
/// which is how a constraint that no current node satisfies is compiled (the pods stay
/// Pending until a node matches and the controller compiles again).
pub const NO_NODE: &str = "jobs.capstan.dev/no-matching-node";

/// The labels on an object owned by the Job as a whole (its Services, a payload Secret).
pub fn job(job: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (JOB.to_owned(), job.to_owned()),
        (MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned()),
    ])
}

/// The labels on an object a group's version runs as, and on its pods.
pub fn group(job: &str, group: &str, version: i64) -> BTreeMap<String, String> {
    let mut labels = self::job(job);
    labels.insert(GROUP.to_owned(), group.to_owned());
    labels.insert(VERSION.to_owned(), version.to_string());
    labels
}

/// What selects every pod of a group, whatever its version (Services, spread, distinct_hosts).
pub fn selector(job: &str, group: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (JOB.to_owned(), job.to_owned()),
        (GROUP.to_owned(), group.to_owned()),
    ])
}
