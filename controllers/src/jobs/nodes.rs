//! Which node changes matter to the jobs, and to which Jobs.
//!
//! Kubelets (and kwok) rewrite node status every few seconds; placement reads only a
//! node's labels, schedulability, taints and readiness, so [`changes`] passes a node on
//! only when those change, when it joins, and when it leaves (a deletion, or a node
//! missing from a relist after the watch reconnected). [`affected`] then names the Jobs
//! that depend on it:
//!
//! - system and sysbatch jobs, whose allocations follow the eligible nodes;
//! - jobs whose placement is evaluated against node labels (datacenter globs, and
//!   constraints whose operator Kubernetes lacks: the compiler lists the matching
//!   values, which a node can change; see `capstan_jobs::compile`);
//! - jobs with pods on that node, whose `lost` count it can change.

use super::status;
use capstan_crds::jobs::{Job, JobType, Operator};
use capstan_jobs::{attributes, compile::labels};
use futures::{Stream, TryStreamExt, stream};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    ResourceExt,
    runtime::{
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    hash::{Hash, Hasher},
};

/// The nodes of a watch whose placement-relevant state changed, that joined, or that
/// left (a node that left may carry only its name).
pub fn changes<S>(events: S) -> impl Stream<Item = Result<Node, watcher::Error>> + Send
where
    S: Stream<Item = Result<watcher::Event<Node>, watcher::Error>> + Send,
{
    let mut seen = Seen::default();
    events
        .map_ok(move |event| stream::iter(seen.changed(event).into_iter().map(Ok)))
        .try_flatten()
}

/// The fingerprint of each node last passed on, to drop events that change nothing
/// placement reads.
#[derive(Default)]
struct Seen {
    nodes: HashMap<String, u64>,
    /// The names a relist has returned so far; None outside a relist.
    relisted: Option<HashSet<String>>,
}

impl Seen {
    fn changed(&mut self, event: watcher::Event<Node>) -> Vec<Node> {
        match event {
            watcher::Event::Apply(node) => self.applied(node).into_iter().collect(),
            watcher::Event::Delete(node) => {
                self.nodes.remove(&node.name_any());
                vec![node]
            }
            watcher::Event::Init => {
                self.relisted = Some(HashSet::new());
                Vec::new()
            }
            watcher::Event::InitApply(node) => {
                if let Some(relisted) = self.relisted.as_mut() {
                    relisted.insert(node.name_any());
                }
                self.applied(node).into_iter().collect()
            }
            watcher::Event::InitDone => {
                // A node deleted while the watch was down is only missing from the relist.
                let relisted = self.relisted.take().unwrap_or_default();
                let gone: Vec<String> = self
                    .nodes
                    .keys()
                    .filter(|n| !relisted.contains(*n))
                    .cloned()
                    .collect();
                gone.into_iter()
                    .map(|name| {
                        self.nodes.remove(&name);
                        let mut node = Node::default();
                        node.metadata.name = Some(name);
                        node
                    })
                    .collect()
            }
        }
    }

    fn applied(&mut self, node: Node) -> Option<Node> {
        let print = fingerprint(&node);
        let before = self.nodes.insert(node.name_any(), print);
        (before != Some(print)).then_some(node)
    }
}

/// What of a node placement reads: labels, schedulability, taints and readiness.
fn fingerprint(node: &Node) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    node.labels().hash(&mut hasher);
    let spec = node.spec.as_ref();
    spec.and_then(|s| s.unschedulable).hash(&mut hasher);
    for t in spec.and_then(|s| s.taints.as_deref()).unwrap_or_default() {
        (&t.key, &t.value, &t.effect).hash(&mut hasher);
    }
    status::ready_node(node).hash(&mut hasher);
    hasher.finish()
}

/// The Jobs a change of `node` may concern (see the module's notes).
pub fn affected(jobs: &Store<Job>, pods: &Store<Pod>, node: &Node) -> Vec<ObjectRef<Job>> {
    let name = node.name_any();
    let on_node: BTreeSet<(String, String)> = pods
        .state()
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str()))
        .filter_map(|p| Some((p.namespace()?, p.labels().get(labels::JOB)?.clone())))
        .collect();
    jobs.state()
        .iter()
        .filter(|job| {
            follows_nodes(job)
                || job
                    .namespace()
                    .is_some_and(|ns| on_node.contains(&(ns, job.name_any())))
        })
        .map(|job| ObjectRef::from(job.as_ref()))
        .collect()
}

/// Whether what `job` runs, or where, depends on the set of nodes and their labels.
pub fn follows_nodes(job: &Job) -> bool {
    let spec = &job.spec;
    matches!(spec.type_, JobType::System | JobType::Sysbatch)
        || spec
            .datacenters
            .iter()
            .any(|d| d != "*" && attributes::is_glob(d))
        || spec
            .constraints
            .iter()
            .chain(spec.groups.iter().flat_map(|g| &g.constraints))
            .any(|c| expanded(c.operator))
        || spec
            .affinities
            .iter()
            .chain(spec.groups.iter().flat_map(|g| &g.affinities))
            .any(|a| expanded(a.operator))
}

/// Operators Kubernetes' node selectors lack: compiled into `In` over the label values
/// of the nodes that match, so a node's labels change what the pods may select.
fn expanded(operator: Operator) -> bool {
    matches!(
        operator,
        Operator::Regexp
            | Operator::Version
            | Operator::Semver
            | Operator::SetContains
            | Operator::SetContainsAny
            | Operator::Less
            | Operator::LessEqual
            | Operator::Greater
            | Operator::GreaterEqual
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_crds::jobs::Constraint;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeSpec, NodeStatus, PodSpec};
    use kube::runtime::{reflector, watcher::Event};
    use std::collections::BTreeMap;

    fn node(name: &str, zone: &str, ready: bool) -> Node {
        let mut node = Node::default();
        node.metadata.name = Some(name.to_owned());
        node.metadata.labels = Some(BTreeMap::from([("zone".to_owned(), zone.to_owned())]));
        node.spec = Some(NodeSpec::default());
        node.status = Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..NodeCondition::default()
            }]),
            ..NodeStatus::default()
        });
        node
    }

    fn names(nodes: Vec<Node>) -> Vec<String> {
        nodes.iter().map(|n| n.name_any()).collect()
    }

    #[test]
    fn only_what_placement_reads_passes() {
        let mut seen = Seen::default();
        assert_eq!(
            names(seen.changed(Event::Apply(node("a", "x", true)))),
            ["a"],
            "a node joins"
        );
        let mut heartbeat = node("a", "x", true);
        heartbeat.metadata.resource_version = Some("9".into());
        assert!(
            seen.changed(Event::Apply(heartbeat)).is_empty(),
            "a heartbeat changes nothing"
        );
        assert_eq!(
            names(seen.changed(Event::Apply(node("a", "y", true)))),
            ["a"],
            "labels"
        );
        assert_eq!(
            names(seen.changed(Event::Apply(node("a", "y", false)))),
            ["a"],
            "readiness"
        );
        let mut cordoned = node("a", "y", false);
        cordoned.spec.as_mut().unwrap().unschedulable = Some(true);
        assert_eq!(names(seen.changed(Event::Apply(cordoned))), ["a"], "cordon");
        assert_eq!(
            names(seen.changed(Event::Delete(node("a", "y", false)))),
            ["a"],
            "it leaves"
        );
        assert_eq!(
            names(seen.changed(Event::Apply(node("a", "y", false)))),
            ["a"],
            "and rejoins"
        );
    }

    #[test]
    fn a_node_missing_from_a_relist_has_left() {
        let mut seen = Seen::default();
        seen.changed(Event::Apply(node("a", "x", true)));
        seen.changed(Event::Apply(node("b", "x", true)));
        assert!(seen.changed(Event::Init).is_empty());
        assert!(
            seen.changed(Event::InitApply(node("a", "x", true))).is_empty(),
            "unchanged"
        );
        assert_eq!(names(seen.changed(Event::InitDone)), ["b"]);
        assert_eq!(
            names(seen.changed(Event::Apply(node("b", "x", true)))),
            ["b"],
            "b is new again"
        );
    }

    fn job(name: &str, type_: JobType) -> Job {
        let spec = serde_json::json!({
            "type": type_.as_str(),
            "datacenters": ["*"],
            "groups": [{"name": "g", "count": 1, "tasks": [{"name": "t", "image": "busybox"}]}],
        });
        let mut job = Job::new(name, serde_json::from_value(spec).expect("a valid spec"));
        job.metadata.namespace = Some("ns".into());
        job
    }

    #[test]
    fn which_jobs_follow_the_nodes() {
        assert!(follows_nodes(&job("s", JobType::System)));
        assert!(follows_nodes(&job("s", JobType::Sysbatch)));
        let mut plain = job("p", JobType::Service);
        assert!(
            !follows_nodes(&plain),
            "`*` and no constraints: placement ignores the nodes"
        );
        plain.spec.datacenters = vec!["eu-west".into()];
        assert!(!follows_nodes(&plain), "an exact datacenter is a plain In");
        plain.spec.datacenters = vec!["eu-*".into()];
        assert!(
            follows_nodes(&plain),
            "a glob is matched against the nodes' datacenters"
        );
        let mut constrained = job("c", JobType::Batch);
        constrained.spec.groups[0].constraints = vec![Constraint {
            attribute: Some("${meta.rack}".into()),
            operator: Operator::Equal,
            value: Some("r1".into()),
        }];
        assert!(!follows_nodes(&constrained), "= is a plain In");
        constrained.spec.groups[0].constraints[0].operator = Operator::Regexp;
        assert!(
            follows_nodes(&constrained),
            "a regexp is evaluated against the nodes"
        );
    }

    #[test]
    fn a_node_wakes_its_dependents_and_the_jobs_with_pods_on_it() {
        let (jobs, mut jobs_writer) = reflector::store::<Job>();
        for j in [
            job("web", JobType::Service),
            job("other", JobType::Service),
            job("agent", JobType::System),
        ] {
            jobs_writer.apply_watcher_event(&Event::Apply(j));
        }
        let (pods, mut pods_writer) = reflector::store::<Pod>();
        let mut pod = Pod::default();
        pod.metadata.name = Some("web-1".into());
        pod.metadata.namespace = Some("ns".into());
        pod.metadata.labels = Some(BTreeMap::from([(labels::JOB.to_owned(), "web".to_owned())]));
        pod.spec = Some(PodSpec {
            node_name: Some("a".into()),
            ..PodSpec::default()
        });
        pods_writer.apply_watcher_event(&Event::Apply(pod));
        let mut woken: Vec<String> = affected(&jobs, &pods, &node("a", "x", true))
            .into_iter()
            .map(|r| r.name)
            .collect();
        woken.sort();
        assert_eq!(woken, ["agent", "web"]);
        let woken: Vec<String> = affected(&jobs, &pods, &node("b", "x", true))
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(woken, ["agent"]);
    }
}
