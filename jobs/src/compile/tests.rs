//! The compiled objects for each job type and each placement rule, asserted field by
//! field: a mapping that breaks fails here.

use super::*;
use k8s_openapi::api::core::v1::{Container, NodeSelectorRequirement, PodSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

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

fn with_constraints(constraints: Value) -> Vec<NodeSelectorRequirement> {
    let mut s = simple();
    s["groups"][0]["constraints"] = constraints;
    required(&one_set(&job(s)))
}

#[test]
fn constraints_with_a_kubernetes_operator_use_it() {
    assert_eq!(
        with_constraints(json!([
            {"attribute": "${attr.kernel.name}", "operator": "=", "value": "linux"},
            {"attribute": "${meta.rack}", "operator": "!=", "value": "r1"},
            {"attribute": "${node.class}", "operator": "is_set"},
            {"attribute": "example.com/spot", "operator": "is_not_set"},
        ])),
        [
            req("kubernetes.io/os", "In", &["linux"]),
            req("rack", "NotIn", &["r1"]),
            req("node.kubernetes.io/instance-type", "Exists", &[]),
            req("example.com/spot", "DoesNotExist", &[]),
        ]
    );
}

#[test]
fn constraints_without_one_are_evaluated_against_the_nodes() {
    let cases = [
        (
            json!({"attribute": "${meta.rack}", "operator": "regexp", "value": "^r[0-9]$"}),
            vec!["r1", "r2"],
        ),
        // Numeric: 10 > 2, though "r10" is lexical: both sides must be numbers.
        (
            json!({"attribute": "${meta.rack}", "operator": ">", "value": "r1"}),
            vec!["r10", "r2"],
        ),
        (
            json!({"attribute": "${meta.kernel}", "operator": "version", "value": ">= 6.0"}),
            vec!["6.1.0"],
        ),
        (
            json!({"attribute": "${meta.kernel}", "operator": "semver", "value": "< 6.0.0"}),
            vec!["5.15.0"],
        ),
        (
            json!({"attribute": "${meta.rack}", "operator": "set_contains_any", "value": "r2,r3"}),
            vec!["r2"],
        ),
        (
            json!({"attribute": "${meta.rack}", "operator": "set_contains", "value": "r10"}),
            vec!["r10"],
        ),
        (
            json!({"attribute": "${node.datacenter}", "operator": "<=", "value": "dc1"}),
            vec!["dc1"],
        ),
    ];
    for (constraint, values) in cases {
        let label = if constraint["attribute"] == "${node.datacenter}" {
            "topology.kubernetes.io/region"
        } else {
            constraint["attribute"]
                .as_str()
                .unwrap()
                .trim_start_matches("${meta.")
                .trim_end_matches('}')
        };
        assert_eq!(
            with_constraints(json!([constraint])),
            [req(label, "In", &values)],
            "{constraint}"
        );
    }
    assert_eq!(
        with_constraints(json!([{"attribute": "${meta.rack}", "operator": "regexp", "value": "^x"}])),
        [req(labels::NO_NODE, "Exists", &[])],
        "no node matches: the pods wait for one"
    );
}

#[test]
fn constraint_values_that_cannot_compile_are_refused() {
    let refused = [
        (
            json!({"attribute": "${meta.rack}", "operator": "regexp", "value": "("}),
            "value",
        ),
        (
            json!({"attribute": "${meta.rack}", "operator": "version", "value": ">> 1"}),
            "value",
        ),
        (
            json!({"attribute": "${meta.rack}", "operator": "=", "value": "${meta.other}"}),
            "value",
        ),
        (
            json!({"attribute": "${meta.rack}", "operator": "=", "value": "not a label"}),
            "value",
        ),
        (json!({"operator": "distinct_property"}), "attribute"),
    ];
    for (constraint, at) in refused {
        let mut s = simple();
        s["groups"][0]["constraints"] = json!([constraint]);
        assert_eq!(
            error(s).field,
            format!("spec.groups[0].constraints[0].{at}"),
            "{constraint}"
        );
    }
    // Job-level constraints are named at the job.
    let mut s = simple();
    s["constraints"] = json!([{"attribute": "${attr.os.name}", "value": "x"}]);
    assert_eq!(error(s).field, "spec.constraints[0].attribute");
}

#[test]
fn job_and_group_constraints_and_datacenters_form_one_term() {
    let mut s = simple();
    s["datacenters"] = json!(["dc1"]);
    s["constraints"] = json!([{"attribute": "${attr.cpu.arch}", "value": "amd64"}]);
    s["groups"][0]["constraints"] = json!([{"attribute": "${node.pool}", "value": "gpu"}]);
    assert_eq!(
        required(&one_set(&job(s))),
        [
            req("topology.kubernetes.io/region", "In", &["dc1"]),
            req("kubernetes.io/arch", "In", &["amd64"]),
            req("node.capstan.dev/pool", "In", &["gpu"]),
        ]
    );
}

#[test]
fn affinities_are_preferences_and_negative_weights_prefer_the_negation() {
    let mut s = simple();
    s["affinities"] = json!([{"attribute": "${meta.rack}", "value": "r1", "weight": 30}]);
    s["groups"][0]["affinities"] = json!([
        {"attribute": "${node.datacenter}", "operator": "regexp", "value": "^dc", "weight": -80},
        {"attribute": "${meta.gpu}", "operator": "is_set", "weight": -10},
    ]);
    let set = one_set(&job(s));
    let preferred = spec(&set)
        .affinity
        .as_ref()
        .unwrap()
        .node_affinity
        .as_ref()
        .unwrap()
        .preferred_during_scheduling_ignored_during_execution
        .clone()
        .unwrap();
    let terms: Vec<(i32, NodeSelectorRequirement)> = preferred
        .into_iter()
        .map(|p| (p.weight, p.preference.match_expressions.unwrap().remove(0)))
        .collect();
    assert_eq!(
        terms,
        [
            (30, req("rack", "In", &["r1"])),
            (80, req("topology.kubernetes.io/region", "NotIn", &["dc1", "dc2"])),
            (10, req("gpu", "DoesNotExist", &[])),
        ]
    );
    assert!(required(&set).is_empty(), "affinities never require");
}

fn anti_affinity(set: &PodSet) -> Vec<(String, BTreeMap<String, String>)> {
    spec(set)
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|p| p.required_during_scheduling_ignored_during_execution.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|t| (t.topology_key, t.label_selector.unwrap().match_labels.unwrap()))
        .collect()
}

#[test]
fn distinct_hosts_and_distinct_property_keep_pods_apart() {
    let mut s = simple();
    s["constraints"] = json!([{"operator": "distinct_hosts"}]);
    s["groups"][0]["constraints"] = json!([
        {"operator": "distinct_property", "attribute": "${meta.rack}"},
        {"operator": "distinct_hosts", "value": "true"},
        {"operator": "distinct_property", "attribute": "${attr.platform.aws.placement.availability-zone}", "value": "1"},
    ]);
    let group = labels::selector("web", "api");
    let whole_job = BTreeMap::from([(labels::JOB.to_owned(), "web".to_owned())]);
    assert_eq!(
        anti_affinity(&one_set(&job(s))),
        [
            ("kubernetes.io/hostname".to_owned(), whole_job),
            ("rack".to_owned(), group.clone()),
            ("kubernetes.io/hostname".to_owned(), group.clone()),
            ("topology.kubernetes.io/zone".to_owned(), group),
        ]
    );
    let mut s = simple();
    s["groups"][0]["constraints"] = json!([{"operator": "distinct_hosts", "value": "false"}]);
    assert!(anti_affinity(&one_set(&job(s))).is_empty());
    let mut s = simple();
    s["groups"][0]["constraints"] =
        json!([{"operator": "distinct_property", "attribute": "${meta.rack}", "value": "2"}]);
    let e = error(s);
    assert_eq!(e.field, "spec.groups[0].constraints[0].value");
    assert!(e.message.contains("exactly one"), "{e}");
}

#[test]
fn spreads_without_targets_are_topology_spread_constraints() {
    let mut s = simple();
    s["spreads"] = json!([{"attribute": "${node.datacenter}"}]);
    s["groups"][0]["spreads"] = json!([{"attribute": "${meta.rack}", "weight": 20}]);
    let set = one_set(&job(s));
    let spread = spec(&set).topology_spread_constraints.clone().unwrap();
    assert_eq!(spread.len(), 2);
    assert_eq!(spread[0].topology_key, "topology.kubernetes.io/region");
    assert_eq!(spread[1].topology_key, "rack");
    for c in &spread {
        assert_eq!(c.max_skew, 1);
        assert_eq!(c.when_unsatisfiable, "ScheduleAnyway");
        assert_eq!(
            c.label_selector.as_ref().unwrap().match_labels,
            Some(labels::selector("web", "api"))
        );
    }
}

#[test]
fn spread_targets_split_the_group_into_pinned_sets() {
    let mut s = simple();
    s["groups"][0]["spreads"] = json!([{
        "attribute": "${node.datacenter}",
        "targets": [{"value": "dc1", "percent": 70}, {"value": "dc2", "percent": 20}, {"value": "edge-1", "percent": 0}],
    }]);
    let j = job(s);
    let sets = pod_sets(&j, 0, 1, &nodes(), &Settings::default()).unwrap();
    let summary: Vec<(Option<&str>, u32, Vec<NodeSelectorRequirement>)> = sets
        .iter()
        .map(|s| (s.suffix.as_deref(), s.percent, required(s)))
        .collect();
    let region = "topology.kubernetes.io/region";
    assert_eq!(
        summary,
        [
            (Some("dc1"), 70, vec![req(region, "In", &["dc1"])]),
            (Some("dc2"), 20, vec![req(region, "In", &["dc2"])]),
            (
                Some("other"),
                10,
                vec![req(region, "NotIn", &["dc1", "dc2", "edge-1"])]
            ),
        ]
    );
    let hashes: BTreeSet<&String> = sets.iter().map(|s| &s.hash).collect();
    assert_eq!(hashes.len(), 3, "each set is its own ReplicaSet");
    assert_eq!(split(10, &sets), [7, 2, 1]);
    assert_eq!(split(3, &sets), [2, 1, 0]);
    assert_eq!(split(0, &sets), [0, 0, 0]);
    // Stable across reconciles and nodes: the hash does not read the nodes.
    let again = pod_sets(&j, 0, 1, &Nodes::default(), &Settings::default()).unwrap();
    assert_eq!(
        sets.iter().map(|s| &s.hash).collect::<Vec<_>>(),
        again.iter().map(|s| &s.hash).collect::<Vec<_>>()
    );
}

fn percent_sets(percents: &[u32]) -> Vec<PodSet> {
    percents
        .iter()
        .map(|p| PodSet {
            suffix: None,
            percent: *p,
            hash: String::new(),
            template: Default::default(),
        })
        .collect()
}

#[test]
fn split_is_largest_remainder_and_deterministic() {
    assert_eq!(split(10, &percent_sets(&[100])), [10]);
    assert_eq!(split(3, &percent_sets(&[34, 33, 33])), [1, 1, 1]);
    assert_eq!(split(2, &percent_sets(&[34, 33, 33])), [1, 1, 0]);
    assert_eq!(
        split(1, &percent_sets(&[50, 50])),
        [1, 0],
        "a tie goes to the earlier set"
    );
    assert_eq!(split(7, &percent_sets(&[25, 25, 50])), [2, 2, 3]);
    for total in 0..50 {
        let shares = split(total, &percent_sets(&[13, 29, 58]));
        assert_eq!(shares.iter().sum::<i32>(), total);
    }
}

#[test]
fn spreads_that_cannot_compile_are_refused() {
    let targets = json!([{"value": "dc1", "percent": 50}]);
    let mut s = simple();
    s["spreads"] = json!([{"attribute": "${node.datacenter}", "targets": targets}]);
    s["groups"][0]["spreads"] =
        json!([{"attribute": "${meta.rack}", "targets": [{"value": "r1", "percent": 50}]}]);
    assert_eq!(error(s).field, "spec.groups[0].spreads[0].targets");
    let mut s = simple();
    s["type"] = json!("batch");
    s["spreads"] = json!([{"attribute": "${node.datacenter}", "targets": targets}]);
    assert_eq!(error(s).field, "spec.spreads[0].targets");
    let mut s = simple();
    s["type"] = json!("system");
    s["groups"][0]["spreads"] = json!([{"attribute": "${node.datacenter}"}]);
    assert_eq!(error(s).field, "spec.groups[0].spreads[0]");
}

fn with_group(patch: Value) -> Value {
    let mut s = simple();
    for (k, v) in patch.as_object().unwrap() {
        s["groups"][0][k] = v.clone();
    }
    s
}

#[test]
fn lifecycle_hooks_are_init_and_sidecar_containers() {
    let s = with_group(json!({"tasks": [
        {"name": "migrate", "image": "m", "lifecycle": {"hook": "prestart"}},
        {"name": "proxy", "image": "p", "lifecycle": {"hook": "prestart", "sidecar": true}},
        {"name": "server", "image": "s", "killTimeout": "20s"},
        {"name": "log", "image": "l", "lifecycle": {"hook": "poststart", "sidecar": true}, "killTimeout": "1.5s"},
    ]}));
    let set = one_set(&job(s));
    let pod = spec(&set);
    let init: Vec<(&str, Option<&str>)> = pod
        .init_containers
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| (c.name.as_str(), c.restart_policy.as_deref()))
        .collect();
    assert_eq!(init, [("migrate", None), ("proxy", Some("Always"))]);
    let main: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(main, ["server", "log"]);
    assert_eq!(
        pod.termination_grace_period_seconds,
        Some(20),
        "the longest kill_timeout"
    );
    // Nomad's alloc directory: shared by every task, init containers included.
    assert_eq!(
        pod.volumes.as_ref().unwrap()[0].empty_dir,
        Some(Default::default())
    );
    for c in pod.init_containers.iter().flatten().chain(&pod.containers) {
        let mount = &c.volume_mounts.as_ref().unwrap()[0];
        assert_eq!(
            (mount.name.as_str(), mount.mount_path.as_str()),
            ("nomad-alloc", "/alloc")
        );
        assert_eq!(env(c, "NOMAD_ALLOC_DIR"), Some("/alloc"));
    }
}

#[test]
fn lifecycle_hooks_without_a_kubernetes_form_are_refused() {
    let poststop = with_group(json!({"tasks": [
        {"name": "server", "image": "s"},
        {"name": "cleanup", "image": "c", "lifecycle": {"hook": "poststop"}},
    ]}));
    assert_eq!(error(poststop).field, "spec.groups[0].tasks[1].lifecycle.hook");
    let poststart = with_group(json!({"tasks": [
        {"name": "server", "image": "s"},
        {"name": "warm", "image": "w", "lifecycle": {"hook": "poststart"}},
    ]}));
    assert_eq!(
        error(poststart.clone()).field,
        "spec.groups[0].tasks[1].lifecycle.sidecar"
    );
    // A batch pod runs it to completion beside the main task.
    let mut batch = poststart;
    batch["type"] = json!("batch");
    assert_eq!(spec(&one_set(&job(batch))).containers.len(), 2);
    let only_prestart = with_group(json!({"tasks": [
        {"name": "init", "image": "i", "lifecycle": {"hook": "prestart"}},
    ]}));
    assert_eq!(error(only_prestart).field, "spec.groups[0].tasks");
}

#[test]
fn runtime_environment_and_interpolation() {
    let mut s = with_group(json!({
        "meta": {"tier": "gold", "my-key": "group"},
        "connect": {"upstreams": [
            {"destinationName": "db-main", "localBindPort": 5432},
            {"destinationName": "cache", "destinationNamespace": "shared", "localBindPort": 6379},
        ]},
        "tasks": [{
            "name": "server",
            "image": "s",
            "command": "/bin/server",
            "args": ["--listen=${NOMAD_ADDR_http}", "--db=${NOMAD_UPSTREAM_ADDR_db_main}", "${HOME}", "cost $(x) $$y", "${env[\"TOKEN\"]}"],
            "env": {"TOKEN": "t", "GREETING": "hi ${NOMAD_META_tier}"},
            "ports": [{"name": "http", "port": 8080}],
        }],
    }));
    s["meta"] = json!({"tier": "silver", "owner": "ops", "price": "$(5)"});
    let set = one_set(&job(s));
    let c = main_container(&set);
    assert_eq!(c.command.as_deref(), Some(&["/bin/server".to_owned()][..]));
    assert_eq!(
        c.args.clone().unwrap(),
        [
            "--listen=$(NOMAD_ADDR_http)",
            "--db=$(NOMAD_UPSTREAM_ADDR_db_main)",
            "${HOME}",
            "cost $$(x) $$$y",
            "$(TOKEN)",
        ]
    );
    assert_eq!(
        env(c, "NOMAD_META_tier"),
        Some("gold"),
        "the group's meta over the job's"
    );
    assert_eq!(env(c, "NOMAD_META_TIER"), Some("gold"));
    assert_eq!(env(c, "NOMAD_META_owner"), Some("ops"));
    assert_eq!(
        env(c, "NOMAD_META_price"),
        Some("$$(5)"),
        "meta is data, never expanded"
    );
    assert_eq!(
        env(c, "NOMAD_META_my_key"),
        Some("group"),
        "made environment-safe"
    );
    assert_eq!(env(c, "NOMAD_META_MY_KEY"), Some("group"));
    assert_eq!(env(c, "NOMAD_UPSTREAM_ADDR_db_main"), Some("127.0.0.1:5432"));
    assert_eq!(env(c, "NOMAD_UPSTREAM_IP_cache"), Some("127.0.0.1"));
    assert_eq!(env(c, "NOMAD_UPSTREAM_PORT_cache"), Some("6379"));
    assert_eq!(env(c, "GREETING"), Some("hi $(NOMAD_META_tier)"));
    assert_eq!(env(c, "NOMAD_JOB_PARENT_ID"), None);
    assert_eq!(env(c, "NOMAD_ALLOC_INDEX"), None, "service pods have no index");
    let fields: BTreeMap<&str, &str> = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e.name.as_str(),
                e.value_from.as_ref()?.field_ref.as_ref()?.field_path.as_str(),
            ))
        })
        .collect();
    assert_eq!(fields["NOMAD_ALLOC_ID"], "metadata.uid");
    assert_eq!(fields["NOMAD_ALLOC_NAME"], "metadata.name");
    assert_eq!(fields["NOMAD_NAMESPACE"], "metadata.namespace");
    assert_eq!(fields["NOMAD_IP_http"], "status.podIP");
    // Dependent variables resolve only against earlier ones: the runtime's come first.
    let names: Vec<&str> = c.env.as_ref().unwrap().iter().map(|e| e.name.as_str()).collect();
    let position = |n: &str| names.iter().position(|x| *x == n).unwrap();
    assert!(position("NOMAD_IP_http") < position("NOMAD_ADDR_http"));
    assert!(position("NOMAD_META_tier") < position("GREETING"));
    let annotations = set
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap();
    assert_eq!(annotations["capstan.dev/inject"], "true");
    assert_eq!(
        annotations["capstan.dev/upstreams"],
        "db-main:5432,cache.shared:6379"
    );
}

#[test]
fn node_attributes_read_at_run_time_are_refused() {
    let s = with_group(json!({"tasks": [{"name": "server", "image": "s", "args": ["--rack=${meta.rack}"]}]}));
    let e = error(s);
    assert_eq!(e.field, "spec.groups[0].tasks[0].args[0]");
    assert!(e.message.contains("NOMAD_META_"), "{e}");
}

#[test]
fn resources_take_memory_max_as_the_limit() {
    let s = with_group(json!({"tasks": [{"name": "server", "image": "s",
        "resources": {"cpu": "1", "memory": "256Mi", "memoryMax": "1Gi"}}]}));
    let set = one_set(&job(s));
    let r = main_container(&set).resources.clone().unwrap();
    assert_eq!(r.requests.unwrap()["memory"].0, "256Mi");
    let limit = main_container(&set)
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "NOMAD_MEMORY_LIMIT")
        .unwrap();
    let field = limit
        .value_from
        .as_ref()
        .unwrap()
        .resource_field_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        (
            field.resource.as_str(),
            field.divisor.as_ref().unwrap().0.as_str()
        ),
        ("limits.memory", "1Mi")
    );
    assert_eq!(r.limits.as_ref().unwrap()["memory"].0, "1Gi");
    assert!(
        !r.limits.unwrap().contains_key("cpu"),
        "Nomad's cpu is a share, never a limit"
    );
}

#[test]
fn service_checks_are_readiness_probes() {
    let s = with_group(json!({
        "tasks": [
            {"name": "web", "image": "w", "ports": [{"name": "http", "port": 8080}, {"name": "admin", "port": 9000}]},
            {"name": "rpc", "image": "r", "ports": [{"name": "grpc", "port": 9090}]},
            {"name": "worker", "image": "k", "ports": [{"name": "tcp", "port": 7000}]},
            {"name": "cron", "image": "c"},
        ],
        "services": [
            {"name": "web", "port": "http", "checks": [
                {"type": "http", "path": "/healthz", "port": "admin", "interval": "5s", "timeout": "1500ms"},
            ]},
            {"name": "rpc", "port": "grpc", "checks": [{"type": "grpc"}]},
            {"name": "worker", "port": "7000", "checks": [{"type": "tcp"}]},
            {"name": "cron", "port": "http", "task": "cron", "checks": [{"type": "script", "command": "/bin/check", "args": ["-q"]}]},
        ],
    }));
    let set = one_set(&job(s));
    let probes: Vec<_> = spec(&set)
        .containers
        .iter()
        .map(|c| c.readiness_probe.clone().unwrap())
        .collect();
    let http = probes[0].http_get.as_ref().unwrap();
    assert_eq!(http.path.as_deref(), Some("/healthz"));
    assert_eq!(http.port, IntOrString::String("admin".to_owned()));
    assert_eq!(
        (probes[0].period_seconds, probes[0].timeout_seconds),
        (Some(5), Some(2))
    );
    assert_eq!(
        probes[1].grpc.as_ref().unwrap().port,
        9090,
        "gRPC probes take a number"
    );
    assert_eq!(
        (probes[1].period_seconds, probes[1].timeout_seconds),
        (Some(10), Some(2))
    );
    assert_eq!(
        probes[2].tcp_socket.as_ref().unwrap().port,
        IntOrString::Int(7000)
    );
    assert_eq!(
        probes[3].exec.as_ref().unwrap().command.as_deref(),
        Some(&["/bin/check".to_owned(), "-q".to_owned()][..])
    );
}

#[test]
fn a_second_check_on_a_task_is_its_startup_probe() {
    let mut s = with_group(json!({
        "services": [{"name": "web", "port": "http", "checks": [
            {"type": "http", "path": "/healthz"},
            {"type": "tcp", "interval": "30s"},
        ]}],
    }));
    s["update"] = json!({"healthyDeadline": "3m"});
    let set = one_set(&job(s));
    let c = main_container(&set);
    assert!(
        c.readiness_probe.as_ref().unwrap().http_get.is_some(),
        "the first check decides readiness"
    );
    let startup = c.startup_probe.as_ref().unwrap();
    assert!(startup.tcp_socket.is_some());
    assert_eq!(startup.period_seconds, Some(30));
    assert_eq!(
        startup.failure_threshold,
        Some(6),
        "gives up at the healthy deadline: 3m / 30s"
    );
}

#[test]
fn checks_that_cannot_compile_are_refused() {
    let three = with_group(json!({
        "services": [{"name": "web", "port": "http", "checks": [{"type": "tcp"}, {"type": "http", "path": "/"}]},
                     {"name": "again", "port": "http", "checks": [{"type": "tcp"}]}],
    }));
    let e = error(three);
    assert_eq!(e.field, "spec.groups[0].services[1].checks[0]");
    let unknown = with_group(json!({"services": [{"name": "web", "port": "nope"}]}));
    assert_eq!(error(unknown).field, "spec.groups[0].services[0].port");
    let other_task = with_group(json!({
        "services": [{"name": "web", "port": "http", "task": "ghost"}],
    }));
    assert_eq!(error(other_task).field, "spec.groups[0].services[0].task");
}

#[test]
fn vault_and_templates_are_agent_annotations() {
    let s = with_group(json!({
        "vault": {"role": "web", "serviceAccount": "web-sa", "policies": ["read"]},
        "tasks": [{"name": "server", "image": "s", "templates": [{
            "destination": "db.env",
            "data": "{{ with secret \"kv/data/db\" }}USER={{ .Data.data.user }}\nPASS={{.Data.data.password}}{{ end }}",
        }]}],
    }));
    let set = one_set(&job(s));
    let annotations = set
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap();
    assert_eq!(annotations["capstan.dev/agent-inject"], "true");
    assert_eq!(annotations["capstan.dev/agent-role"], "web");
    assert_eq!(
        annotations["capstan.dev/agent-inject-secret-db.env"],
        "kv/data/db"
    );
    assert_eq!(
        annotations["capstan.dev/agent-inject-template-db.env"],
        "USER={{ user }}\nPASS={{ password }}"
    );
    assert_eq!(spec(&set).service_account_name.as_deref(), Some("web-sa"));
    assert_eq!(
        env(main_container(&set), "NOMAD_SECRETS_DIR"),
        Some("/capstan/secrets")
    );

    let kv1 = with_group(
        json!({"vault": {"role": "web"}, "tasks": [{"name": "server", "image": "s",
        "templates": [{"destination": "a", "data": "{{ with secret \"secret/app\" }}{{ .Data.x }}{{ end }}"}]}]}),
    );
    let e = error(kv1);
    assert_eq!(
        e.field, "spec.groups[0].tasks[0].templates[0].data",
        "the agent reads KV v2 and database paths"
    );
    let two_paths = with_group(
        json!({"vault": {"role": "web"}, "tasks": [{"name": "server", "image": "s",
        "templates": [{"destination": "a", "data": "{{ with secret \"kv/data/a\" }}{{ .Data.data.x }}{{ end }}{{ with secret \"kv/data/b\" }}{{ .Data.data.y }}{{ end }}"}]}]}),
    );
    assert_eq!(
        error(two_paths).field,
        "spec.groups[0].tasks[0].templates[0].data"
    );
    let no_template = with_group(json!({"vault": {"role": "web"}}));
    assert_eq!(error(no_template).field, "spec.groups[0].vault");
    let no_vault = with_group(json!({"tasks": [{"name": "server", "image": "s",
        "templates": [{"destination": "a", "data": "x"}]}]}));
    assert_eq!(error(no_vault).field, "spec.groups[0].tasks[0].templates[0]");
    let no_secret = with_group(
        json!({"vault": {"role": "web"}, "tasks": [{"name": "server", "image": "s",
        "templates": [{"destination": "a", "data": "{{ key \"consul/kv\" }}"}]}]}),
    );
    assert_eq!(
        error(no_secret).field,
        "spec.groups[0].tasks[0].templates[0].data"
    );
    let range = with_group(
        json!({"vault": {"role": "web"}, "tasks": [{"name": "server", "image": "s",
        "templates": [{"destination": "a", "data": "{{ with secret \"kv/data/x\" }}{{ range .Data.data }}x{{ end }}{{ end }}"}]}]}),
    );
    assert_eq!(error(range).field, "spec.groups[0].tasks[0].templates[0].data");
}

#[test]
fn connect_forwards_to_the_first_service_port() {
    let s = with_group(json!({"connect": {}, "services": [{"name": "web", "port": "http"}]}));
    let set = one_set(&job(s));
    let annotations = set
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap();
    assert_eq!(annotations["capstan.dev/app-port"], "8080");
    assert!(!annotations.contains_key("capstan.dev/upstreams"));
}

fn typed(kind: &str, extra: Value) -> Job {
    let mut s = simple();
    s["type"] = json!(kind);
    for (k, v) in extra.as_object().unwrap() {
        s[k] = v.clone();
    }
    job(s)
}

#[test]
fn batch_groups_are_indexed_batch_jobs() {
    let j = typed("batch", json!({"priority": 80}));
    let b = batch_job(&j, 0, 4, &nodes(), &Settings::default()).unwrap();
    assert_eq!(b.metadata.name.as_deref(), Some("web-api-v4"));
    assert_eq!(b.metadata.labels.as_ref().unwrap()[labels::VERSION], "4");
    assert_eq!(b.metadata.owner_references.as_ref().unwrap()[0].name, "web");
    let spec = b.spec.unwrap();
    assert_eq!((spec.completions, spec.parallelism), (Some(3), Some(3)));
    assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
    // Nomad's batch defaults: 3 restarts in place and 1 reschedule.
    assert_eq!(spec.backoff_limit, Some(4));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("OnFailure"));
    assert_eq!(pod.priority_class_name.as_deref(), Some("capstan-priority-80"));
    let c = &pod.containers[0];
    let index = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "NOMAD_ALLOC_INDEX")
        .unwrap();
    assert_eq!(
        index
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    );
}

#[test]
fn batch_restart_and_reschedule_become_the_restart_policy_and_backoff_limit() {
    let cases = [
        (
            json!({"restart": {"attempts": 0}, "reschedule": {"attempts": 2}}),
            "Never",
            2,
        ),
        (
            json!({"restart": {"attempts": 2}, "reschedule": {"attempts": 0}}),
            "OnFailure",
            2,
        ),
        (
            json!({"restart": {"attempts": 1, "mode": "delay"}}),
            "OnFailure",
            i32::MAX,
        ),
        (
            json!({"restart": {"attempts": 0}, "reschedule": {"unlimited": true}}),
            "Never",
            i32::MAX,
        ),
    ];
    for (group, policy, limit) in cases {
        let mut s = with_group(group.clone());
        s["type"] = json!("batch");
        let b = batch_job(&job(s), 0, 1, &nodes(), &Settings::default()).unwrap();
        let spec = b.spec.unwrap();
        assert_eq!(
            spec.template.spec.unwrap().restart_policy.as_deref(),
            Some(policy),
            "{group}"
        );
        assert_eq!(spec.backoff_limit, Some(limit), "{group}");
    }
}

#[test]
fn periodic_groups_are_cron_jobs() {
    let j = typed(
        "batch",
        json!({"periodic": {"crons": ["*/5 * * * *", "0 3 * * *"], "timeZone": "Europe/Paris", "prohibitOverlap": true}}),
    );
    let crons = cron_jobs(&j, 0, 2, &nodes(), &Settings::default()).unwrap();
    assert_eq!(crons.len(), 2);
    assert_eq!(crons[0].metadata.name.as_deref(), Some("web-api-cron0"));
    assert_eq!(crons[1].metadata.name.as_deref(), Some("web-api-cron1"));
    let spec = crons[1].spec.clone().unwrap();
    assert_eq!(spec.schedule, "0 3 * * *");
    assert_eq!(spec.time_zone.as_deref(), Some("Europe/Paris"));
    assert_eq!(spec.concurrency_policy.as_deref(), Some("Forbid"));
    assert_eq!(spec.suspend, Some(false));
    let job_spec = spec.job_template.spec.unwrap();
    assert_eq!(job_spec.completions, Some(3));
    let c = &job_spec.template.spec.unwrap().containers[0];
    assert_eq!(
        env(c, "NOMAD_JOB_PARENT_ID"),
        Some("web"),
        "each launch is the periodic job's child"
    );

    let disabled = typed(
        "batch",
        json!({"periodic": {"crons": ["@daily"], "enabled": false}}),
    );
    let spec = cron_jobs(&disabled, 0, 1, &nodes(), &Settings::default()).unwrap()[0]
        .spec
        .clone()
        .unwrap();
    assert_eq!(spec.time_zone.as_deref(), Some("UTC"), "Nomad's default");
    assert_eq!(spec.concurrency_policy.as_deref(), Some("Allow"));
    assert_eq!(spec.suspend, Some(true));

    let sysbatch = typed("sysbatch", json!({"periodic": {"crons": ["@daily"]}}));
    assert_eq!(
        cron_jobs(&sysbatch, 0, 1, &nodes(), &Settings::default())
            .unwrap_err()
            .field,
        "spec.periodic"
    );
}

#[test]
fn system_groups_are_daemon_sets() {
    let j = typed(
        "system",
        json!({"update": {"maxParallel": 2, "minHealthyTime": "3s"}, "datacenters": ["dc1"]}),
    );
    let ds = daemon_set(&j, 0, 5, &nodes(), &Settings::default()).unwrap();
    assert_eq!(ds.metadata.name.as_deref(), Some("web-api"));
    let spec = ds.spec.unwrap();
    let strategy = spec.update_strategy.unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy.rolling_update.unwrap().max_unavailable,
        Some(IntOrString::Int(2))
    );
    assert_eq!(spec.min_ready_seconds, Some(3));
    assert_eq!(spec.selector.match_labels, Some(labels::selector("web", "api")));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Always"));
    let term = &pod
        .affinity
        .unwrap()
        .node_affinity
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .unwrap()
        .node_selector_terms[0];
    assert_eq!(
        term.match_expressions.clone().unwrap(),
        [req("topology.kubernetes.io/region", "In", &["dc1"])]
    );

    let manual = typed("system", json!({"update": {"maxParallel": 0}}));
    let strategy = daemon_set(&manual, 0, 1, &nodes(), &Settings::default())
        .unwrap()
        .spec
        .unwrap()
        .update_strategy
        .unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("OnDelete"));
    let canary = typed("system", json!({"update": {"canary": 1}}));
    assert_eq!(
        daemon_set(&canary, 0, 1, &nodes(), &Settings::default())
            .unwrap_err()
            .field,
        "spec.update.canary"
    );
    let revert = with_group(json!({"update": {"autoRevert": true}}));
    let mut revert = revert;
    revert["type"] = json!("system");
    assert_eq!(
        daemon_set(&job(revert), 0, 1, &nodes(), &Settings::default())
            .unwrap_err()
            .field,
        "spec.groups[0].update.autoRevert"
    );
}

#[test]
fn sysbatch_runs_once_per_eligible_node() {
    let mut s = simple();
    s["type"] = json!("sysbatch");
    s["datacenters"] = json!(["dc*"]);
    s["groups"][0]["constraints"] =
        json!([{"attribute": "${meta.rack}", "operator": "regexp", "value": "^r[0-9]+$"}]);
    let j = job(s);
    let mut all = nodes();
    all = Nodes::new(all.iter().cloned().chain([
        Node {
            schedulable: false,
            ..node(
                "cordoned",
                &[("topology.kubernetes.io/region", "dc1"), ("rack", "r3")],
            )
        },
        node("norack", &[("topology.kubernetes.io/region", "dc1")]),
    ]));
    let eligible = eligible_nodes(&j, 0, &all, &Settings::default()).unwrap();
    assert_eq!(eligible, ["n1", "n2", "n3"]);
    let run = sysbatch_job(&j, 0, 3, "n2", &all, &Settings::default()).unwrap();
    let name = run.metadata.name.clone().unwrap();
    assert!(name.starts_with("web-api-v3-"), "{name}");
    assert_ne!(
        name,
        sysbatch_job(&j, 0, 3, "n1", &all, &Settings::default())
            .unwrap()
            .metadata
            .name
            .unwrap()
    );
    assert_eq!(run.metadata.annotations.as_ref().unwrap()[labels::NODE], "n2");
    let spec = run.spec.unwrap();
    assert_eq!((spec.completions, spec.parallelism), (Some(1), Some(1)));
    let term = &spec
        .template
        .spec
        .unwrap()
        .affinity
        .unwrap()
        .node_affinity
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .unwrap()
        .node_selector_terms[0];
    assert_eq!(
        term.match_fields.clone().unwrap(),
        [req("metadata.name", "In", &["n2"])]
    );
    assert_eq!(
        term.match_expressions.clone().unwrap()[0].key,
        "topology.kubernetes.io/region"
    );
}

#[test]
fn nodes_from_kubernetes() {
    let k8s: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
        "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/region": "dc1"}},
        "spec": {"taints": [{"key": "x", "effect": "PreferNoSchedule"}]},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }))
    .unwrap();
    let mut tainted = k8s.clone();
    tainted.spec.as_mut().unwrap().taints.as_mut().unwrap()[0].effect = "NoSchedule".to_owned();
    tainted.metadata.name = Some("n2".to_owned());
    let mut cordoned = k8s.clone();
    cordoned.spec.as_mut().unwrap().unschedulable = Some(true);
    cordoned.metadata.name = Some("n3".to_owned());
    let mut not_ready = k8s.clone();
    not_ready.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "Unknown".to_owned();
    not_ready.metadata.name = Some("n4".to_owned());
    let nodes = Nodes::from_k8s([&k8s, &tainted, &cordoned, &not_ready]);
    let schedulable: Vec<(&str, bool)> = nodes.iter().map(|n| (n.name.as_str(), n.schedulable)).collect();
    assert_eq!(
        schedulable,
        [("n1", true), ("n2", false), ("n3", false), ("n4", false)]
    );
    assert_eq!(nodes.datacenter("n1", &Settings::default()), Some("dc1"));
}

#[test]
fn services_select_the_group_by_port_name() {
    let s = with_group(json!({"services": [
        {"name": "http", "port": "http", "tags": ["web", "v2"]},
        {"name": "raw", "port": "9000"},
    ]}));
    let built = services(&job(s)).unwrap();
    assert_eq!(built.len(), 2);
    let http = &built[0];
    assert_eq!(http.metadata.name.as_deref(), Some("web-http"));
    assert_eq!(
        http.metadata.annotations.as_ref().unwrap()[labels::SERVICE_TAGS],
        "web,v2"
    );
    assert_eq!(http.metadata.owner_references.as_ref().unwrap()[0].uid, "uid-1");
    let spec = http.spec.as_ref().unwrap();
    assert_eq!(spec.selector, Some(labels::selector("web", "api")));
    let port = &spec.ports.as_ref().unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("http"), 8080));
    assert_eq!(port.target_port, Some(IntOrString::String("http".to_owned())));
    let raw = &built[1].spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!(
        (raw.port, raw.target_port.clone()),
        (9000, Some(IntOrString::Int(9000)))
    );

    let bad = with_group(json!({"services": [{"name": "x", "port": "nope"}]}));
    assert_eq!(
        services(&job(bad)).unwrap_err().field,
        "spec.groups[0].services[0].port"
    );
}

#[test]
fn priorities_are_shared_priority_classes() {
    let pc = priority_class(90);
    assert_eq!(pc.metadata.name.as_deref(), Some("capstan-priority-90"));
    assert_eq!(pc.value, 90);
    assert_eq!(pc.preemption_policy.as_deref(), Some("PreemptLowerPriority"));
    assert_eq!(pc.global_default, Some(false));
    assert_eq!(pc.metadata.owner_references, None);
}

#[test]
fn a_dispatched_child_gets_meta_parent_and_payload() {
    let mut s = with_group(json!({"tasks": [
        {"name": "work", "image": "w", "dispatchPayload": {"file": "input.json"}},
        {"name": "side", "image": "s"},
    ]}));
    s["type"] = json!("batch");
    s["dispatch"] = json!({"parent": "render", "meta": {"customer": "acme"}, "payload": "aGVsbG8="});
    let child = job(s);
    let b = batch_job(&child, 0, 1, &nodes(), &Settings::default()).unwrap();
    let pod = b.spec.unwrap().template.spec.unwrap();
    let work = &pod.containers[0];
    assert_eq!(env(work, "NOMAD_JOB_PARENT_ID"), Some("render"));
    assert_eq!(env(work, "NOMAD_META_customer"), Some("acme"));
    let mount = &work.volume_mounts.as_ref().unwrap()[1];
    assert_eq!(mount.mount_path, "/local/input.json");
    assert_eq!(mount.sub_path.as_deref(), Some("payload"));
    assert_eq!(mount.read_only, Some(true));
    let others = pod.containers[1].volume_mounts.as_ref().unwrap();
    assert_eq!(others.len(), 1, "only the task that declares it");
    let volume = &pod.volumes.as_ref().unwrap()[1];
    let secret_name = volume.secret.as_ref().unwrap().secret_name.as_deref();
    assert_eq!(secret_name, Some("web-payload"));

    let secret = payload_secret(&child).unwrap().unwrap();
    assert_eq!(secret.metadata.name.as_deref(), Some("web-payload"));
    assert_eq!(secret.data.unwrap()["payload"].0, b"hello");
    assert_eq!(secret.metadata.owner_references.unwrap()[0].name, "web");

    assert_eq!(payload_secret(&job(simple())).unwrap(), None);
    let mut bad = simple();
    bad["type"] = json!("batch");
    bad["dispatch"] = json!({"parent": "render", "payload": "***"});
    assert_eq!(
        payload_secret(&job(bad)).unwrap_err().field,
        "spec.dispatch.payload"
    );
}

#[test]
fn the_effective_update_block() {
    let mut s = with_group(json!({"update": {"canary": 1, "minHealthyTime": "1s"}}));
    s["update"] =
        json!({"maxParallel": 3, "minHealthyTime": "30s", "autoRevert": true, "progressDeadline": "0"});
    let u = update(&job(s), 0).unwrap();
    assert_eq!(u.max_parallel, 3);
    assert_eq!(u.canary, 1);
    assert_eq!(u.min_healthy_time, std::time::Duration::from_secs(1));
    assert_eq!(u.healthy_deadline, std::time::Duration::from_secs(300));
    assert_eq!(u.progress_deadline, None);
    assert!(u.auto_revert && !u.auto_promote);
    let defaults = update(&job(simple()), 0).unwrap();
    assert_eq!(defaults.max_parallel, 1);
    assert_eq!(defaults.min_healthy_time, std::time::Duration::from_secs(10));
    assert_eq!(
        defaults.progress_deadline,
        Some(std::time::Duration::from_secs(600))
    );
}

#[test]
fn check_reports_each_builders_errors_without_nodes() {
    assert_eq!(check(&job(simple()), &Settings::default()), []);
    // Evaluated operators match nothing without nodes: not an error.
    let mut fine = simple();
    fine["datacenters"] = json!(["dc*"]);
    fine["groups"][0]["constraints"] =
        json!([{"attribute": "${meta.rack}", "operator": "regexp", "value": "^r"}]);
    assert_eq!(check(&job(fine), &Settings::default()), []);

    let mut bad = with_group(json!({
        "update": {"canary": 1},
        "services": [{"name": "web", "port": "nope"}],
    }));
    bad["type"] = json!("system");
    let fields: Vec<String> = check(&job(bad), &Settings::default())
        .into_iter()
        .map(|e| e.field)
        .collect();
    assert_eq!(
        fields,
        ["spec.groups[0].services[0].port", "spec.groups[0].update.canary"]
    );

    let mut periodic = simple();
    periodic["type"] = json!("sysbatch");
    periodic["periodic"] = json!({"crons": ["@daily"]});
    let fields: Vec<String> = check(&job(periodic), &Settings::default())
        .into_iter()
        .map(|e| e.field)
        .collect();
    assert_eq!(fields, ["spec.periodic"]);
}

#[test]
fn templates_keep_the_text_around_their_secret() {
    let s = with_group(json!({
        "vault": {"role": "web"},
        "tasks": [{"name": "server", "image": "s", "templates": [{
            "destination": "web.env",
            "data": "password={{ with secret \"kv/data/web\" }}{{ .Data.data.password }}{{ end }}\nuser={{ with secret \"kv/data/web\" }}{{ .Data.data.user }}{{ end }}\n",
        }]}],
    }));
    let set = one_set(&job(s));
    let annotations = set
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap();
    assert_eq!(
        annotations["capstan.dev/agent-inject-secret-web.env"],
        "kv/data/web"
    );
    assert_eq!(
        annotations["capstan.dev/agent-inject-template-web.env"],
        "password={{ password }}\nuser={{ user }}\n"
    );
}

#[test]
fn the_node_name_and_ip_come_from_the_downward_api() {
    let s = with_group(json!({"tasks": [{"name": "server", "image": "s",
        "args": ["--node", "${node.unique.name}", "--ip=${attr.unique.network.ip-address}"]}]}));
    let set = one_set(&job(s));
    let c = main_container(&set);
    assert_eq!(
        c.args.clone().unwrap(),
        ["--node", "$(CAPSTAN_NODE_NAME)", "--ip=$(CAPSTAN_NODE_IP)"]
    );
    let paths: BTreeMap<&str, &str> = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e.name.as_str(),
                e.value_from.as_ref()?.field_ref.as_ref()?.field_path.as_str(),
            ))
        })
        .collect();
    assert_eq!(paths["CAPSTAN_NODE_NAME"], "spec.nodeName");
    assert_eq!(paths["CAPSTAN_NODE_IP"], "status.hostIP");
}
