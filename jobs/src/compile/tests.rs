//! The compiled objects for each job type and each placement rule, asserted field by
//! field: a mapping that breaks fails here.

use super::*;
use k8s_openapi::api::core::v1::{Container, NodeSelectorRequirement, PodSpec};
use serde_json::{Value, json};

/// A Job from its spec (JSON), named `web` in namespace `apps`.
fn job(spec: Value) -> Job {
    serde_json::from_value(json!({
        "apiVersion": "jobs.capstan.dev/v1alpha1",
        "kind": "Job",
        "metadata": {"name": "web", "namespace": "apps", "uid": "uid-1"},
        "spec": spec,
    }))
    .expect("a valid Job")
}

fn simple() -> Value {
    json!({
        "groups": [{
            "name": "api",
            "count": 3,
            "tasks": [{
                "name": "server",
                "image": "nginx:1.27",
                "ports": [{"name": "http", "port": 8080}],
                "resources": {"cpu": "250m", "memory": "128Mi"},
            }],
        }],
    })
}

fn node(name: &str, labels: &[(&str, &str)]) -> Node {
    Node {
        name: name.to_owned(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        schedulable: true,
    }
}

fn nodes() -> Nodes {
    Nodes::new([
        node(
            "n1",
            &[
                ("topology.kubernetes.io/region", "dc1"),
                ("rack", "r1"),
                ("kernel", "6.1.0"),
            ],
        ),
        node(
            "n2",
            &[
                ("topology.kubernetes.io/region", "dc1"),
                ("rack", "r2"),
                ("kernel", "5.15.0"),
            ],
        ),
        node("n3", &[("topology.kubernetes.io/region", "dc2"), ("rack", "r10")]),
        node("e1", &[("topology.kubernetes.io/region", "edge-1")]),
    ])
}

fn one_set(job: &Job) -> PodSet {
    let mut sets = pod_sets(job, 0, 1, &nodes(), &Settings::default()).expect("compiles");
    assert_eq!(sets.len(), 1);
    sets.remove(0)
}

fn spec(set: &PodSet) -> &PodSpec {
    set.template.spec.as_ref().unwrap()
}

fn main_container(set: &PodSet) -> &Container {
    &spec(set).containers[0]
}

fn required(set: &PodSet) -> Vec<NodeSelectorRequirement> {
    spec(set)
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| n.required_during_scheduling_ignored_during_execution.as_ref())
        .map(|r| {
            r.node_selector_terms[0]
                .match_expressions
                .clone()
                .unwrap_or_default()
        })
        .unwrap_or_default()
}

fn req(key: &str, op: &str, values: &[&str]) -> NodeSelectorRequirement {
    NodeSelectorRequirement {
        key: key.to_owned(),
        operator: op.to_owned(),
        values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
    }
}

fn env<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env.as_ref()?.iter().find(|e| e.name == name)?.value.as_deref()
}

fn error(spec: Value) -> CompileError {
    pod_sets(&job(spec), 0, 1, &nodes(), &Settings::default()).expect_err("refused")
}

#[test]
fn a_simple_group_is_one_set_with_its_container() {
    let set = one_set(&job(simple()));
    assert_eq!(set.suffix, None);
    assert_eq!(set.percent, 100);
    let labels = set.template.metadata.as_ref().unwrap().labels.clone().unwrap();
    assert_eq!(labels[labels::JOB], "web");
    assert_eq!(labels[labels::GROUP], "api");
    assert_eq!(labels[labels::VERSION], "1");
    assert_eq!(labels[labels::MANAGED_BY], "capstan");
    let pod = spec(&set);
    assert_eq!(pod.restart_policy.as_deref(), Some("Always"));
    assert_eq!(pod.priority_class_name.as_deref(), Some("capstan-priority-50"));
    assert_eq!(pod.affinity, None, "datacenters * and no constraints: anywhere");
    let c = main_container(&set);
    assert_eq!(c.name, "server");
    assert_eq!(c.image.as_deref(), Some("nginx:1.27"));
    let ports = c.ports.as_ref().unwrap();
    assert_eq!(
        (ports[0].name.as_deref(), ports[0].container_port),
        (Some("http"), 8080)
    );
    let resources = c.resources.as_ref().unwrap();
    assert_eq!(resources.requests.as_ref().unwrap()["cpu"].0, "250m");
    assert_eq!(resources.requests.as_ref().unwrap()["memory"].0, "128Mi");
    assert_eq!(resources.limits.as_ref().unwrap()["memory"].0, "128Mi");
    assert_eq!(env(c, "NOMAD_JOB_NAME"), Some("web"));
    assert_eq!(env(c, "NOMAD_GROUP_NAME"), Some("api"));
    assert_eq!(env(c, "NOMAD_TASK_NAME"), Some("server"));
    assert_eq!(env(c, "NOMAD_PORT_http"), Some("8080"));
    assert_eq!(env(c, "NOMAD_ADDR_http"), Some("$(NOMAD_IP_http):8080"));
}

#[test]
fn replica_set_is_named_and_selected_by_hash() {
    let j = job(simple());
    let set = one_set(&j);
    let rs = replica_set(&j, 0, &set, 3);
    assert_eq!(
        rs.metadata.name.as_deref(),
        Some(format!("web-api-{}", set.hash).as_str())
    );
    assert_eq!(rs.metadata.namespace.as_deref(), Some("apps"));
    let owner = &rs.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
        ("Job", "web", "uid-1")
    );
    assert_eq!(owner.controller, Some(true));
    let spec = rs.spec.unwrap();
    assert_eq!(spec.replicas, Some(3));
    let selector = spec.selector.match_labels.unwrap();
    assert_eq!(selector[labels::TEMPLATE_HASH], set.hash);
    assert_eq!(selector[labels::JOB], "web");
    let pod_labels = spec.template.unwrap().metadata.unwrap().labels.unwrap();
    assert!(
        selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
        "the selector selects its pods"
    );
}

#[test]
fn count_and_update_changes_keep_the_hash_other_changes_do_not() {
    let base = job(simple());
    let mut scaled = simple();
    scaled["groups"][0]["count"] = json!(7);
    scaled["groups"][0]["update"] = json!({"maxParallel": 2});
    assert_eq!(template_hash(&base, 0), template_hash(&job(scaled), 0));
    let mut changed = simple();
    changed["groups"][0]["tasks"][0]["image"] = json!("nginx:1.28");
    assert_ne!(template_hash(&base, 0), template_hash(&job(changed), 0));
    let mut placed = simple();
    placed["datacenters"] = json!(["dc2"]);
    assert_ne!(template_hash(&base, 0), template_hash(&job(placed), 0));
}

#[test]
fn datacenters_names_and_globs() {
    let mut s = simple();
    s["datacenters"] = json!(["dc2", "dc9"]);
    assert_eq!(
        required(&one_set(&job(s))),
        [req("topology.kubernetes.io/region", "In", &["dc2", "dc9"])],
        "names are taken as they are, whether a node has them yet or not"
    );
    let mut s = simple();
    s["datacenters"] = json!(["dc*"]);
    assert_eq!(
        required(&one_set(&job(s))),
        [req("topology.kubernetes.io/region", "In", &["dc1", "dc2"])],
        "globs are evaluated against the nodes"
    );
    let mut s = simple();
    s["datacenters"] = json!(["mars-*"]);
    assert_eq!(required(&one_set(&job(s))), [req(labels::NO_NODE, "Exists", &[])]);
    // The datacenter label is configurable.
    let mut s = simple();
    s["datacenters"] = json!(["dc1"]);
    let settings = Settings {
        datacenter_label: "example.com/dc".to_owned(),
    };
    let set = pod_sets(&job(s), 0, 1, &nodes(), &settings).unwrap().remove(0);
    assert_eq!(required(&set), [req("example.com/dc", "In", &["dc1"])]);
}

#[test]
fn an_unknown_attribute_is_refused_naming_the_field() {
    let mut s = simple();
    s["groups"][0]["constraints"] = json!([
        {"attribute": "${attr.kernel.name}", "value": "linux"},
        {"attribute": "${attr.os.name}", "value": "ubuntu"},
    ]);
    let e = error(s);
    assert_eq!(e.field, "spec.groups[0].constraints[1].attribute");
    assert!(e.message.contains("attr.os.name"), "{e}");
}
