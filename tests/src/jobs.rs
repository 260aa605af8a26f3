//! The jobs harness (issue 17): kwok nodes a test adds and removes, pod health and
//! completion set by hand, the pods of a Job and waits on its status.
//!
//! kwok (hack/cluster.sh) keeps every node Ready and takes each bound pod to Running and
//! Ready at once; a pod owned by a batch/v1 Job it then marks Succeeded. Its stages match
//! only Pending pods (to make them ready) and Running pods of batch Jobs (to complete
//! them), so what a test writes into a Running service pod's status through the status
//! subresource stays: that is how a test makes an allocation unhealthy or failed.

use crate::{eventually, kubectl_stdin};
use anyhow::{Context as _, Result, bail};
use capstan_crds::jobs::{Job, JobStatus};
use futures::StreamExt as _;
use k8s_openapi::{
    api::{
        core::v1::{Node, Pod},
        events::v1::Event,
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::watcher,
};
use serde_json::json;
use std::{collections::BTreeMap, process::Command, sync::Arc, time::Duration};

/// The labels every object a Job owns, and its pods, carry (docs/jobs.md).
pub const JOB_LABEL: &str = "jobs.capstan.dev/job";
pub const GROUP_LABEL: &str = "jobs.capstan.dev/group";
pub const VERSION_LABEL: &str = "jobs.capstan.dev/version";
/// On a dispatched child: the parameterized Job it came from.
pub const PARENT_LABEL: &str = "jobs.capstan.dev/parent";
/// On the ControllerRevision of the stable version.
pub const STABLE_LABEL: &str = "jobs.capstan.dev/stable";
/// Nomad's `${node.pool}` as a node label. A test's own nodes carry its namespace's name
/// here, so that its jobs can be confined to them (`${node.pool} = <namespace>`) and never
/// see the shared nodes or another test's.
pub const POOL_LABEL: &str = "node.capstan.dev/pool";
/// `${node.datacenter}` and `datacenters` read this label (the chart's default).
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
/// How long the reconciler gets for a step a test waits on: it acts on watch events,
/// so a healthy run takes a second or two; the slack is for a loaded CI machine.
pub const STEP: Duration = Duration::from_secs(30);

// === Nodes ===

/// A simulated node to add: its labels, taints and allocatable resources.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    labels: BTreeMap<String, String>,
    taints: Vec<serde_json::Value>,
    cpu: String,
    memory: String,
    pods: String,
}

impl NodeSpec {
    /// A node in `pool` (the test's namespace) and datacenter `region`, as large as the
    /// shared ones (32 CPUs, 128 GiB, 110 pods).
    pub fn in_pool(pool: &str, region: &str) -> Self {
        let labels = [
            (POOL_LABEL, pool),
            (REGION_LABEL, region),
            ("kubernetes.io/os", "linux"),
            ("kubernetes.io/arch", "amd64"),
            ("type", "kwok"),
        ];
        Self {
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            taints: Vec::new(),
            cpu: "32".into(),
            memory: "128Gi".into(),
            pods: "110".into(),
        }
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// A taint such as (`dedicated`, `gpu`, `NoSchedule`).
    pub fn taint(mut self, key: &str, value: &str, effect: &str) -> Self {
        self.taints
            .push(json!({"key": key, "value": value, "effect": effect}));
        self
    }

    /// Allocatable CPU (a quantity: `1`, `500m`): small nodes make a full cluster.
    pub fn cpu(mut self, cpu: &str) -> Self {
        self.cpu = cpu.to_owned();
        self
    }

    pub fn memory(mut self, memory: &str) -> Self {
        self.memory = memory.to_owned();
        self
    }

    pub fn pods(mut self, pods: &str) -> Self {
        self.pods = pods.to_owned();
        self
    }
}

/// The nodes one test added, deleted when it drops them (whatever the test's outcome),
/// so the shared cluster keeps its four nodes.
pub struct TestNodes {
    client: Client,
    prefix: String,
    added: usize,
    names: Vec<String>,
}

impl TestNodes {
    /// Nodes named `<prefix>-<n>`; give the test's namespace name, unique per run.
    pub fn new(client: &Client, prefix: &str) -> Self {
        Self {
            client: client.clone(),
            prefix: prefix.to_owned(),
            added: 0,
            names: Vec::new(),
        }
    }

    /// The nodes added and not removed, in the order they were added.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Adds a node and waits until kwok reports it Ready; returns its name (also its
    /// `kubernetes.io/hostname`).
    pub async fn add(&mut self, spec: NodeSpec) -> Result<String> {
        self.added += 1;
        let name = format!("{}-{}", self.prefix, self.added);
        let node = node_object(&name, spec)?;
        let nodes = Api::<Node>::all(self.client.clone());
        nodes
            .create(&PostParams::default(), &node)
            .await
            .with_context(|| format!("creating node {name}"))?;
        self.names.push(name.clone());
        eventually(STEP, &format!("node {name} Ready"), || {
            let nodes = nodes.clone();
            let name = name.clone();
            async move { is_node_ready(&nodes.get(&name).await.ok()?).then_some(()) }
        })
        .await?;
        Ok(name)
    }

    /// Adds `count` nodes like `spec` at once (the benchmark's hundreds) and waits until
    /// all are Ready; returns their names.
    pub async fn add_many(&mut self, spec: &NodeSpec, count: usize) -> Result<Vec<String>> {
        let nodes = Api::<Node>::all(self.client.clone());
        let mut names = Vec::with_capacity(count);
        let mut creates = Vec::with_capacity(count);
        for _ in 0..count {
            self.added += 1;
            let name = format!("{}-{}", self.prefix, self.added);
            creates.push(node_object(&name, spec.clone()));
            names.push(name);
        }
        // Recorded first: a node created before a later create failed is still removed.
        self.names.extend(names.iter().cloned());
        futures::stream::iter(creates)
            .map(|node| {
                let nodes = nodes.clone();
                async move {
                    let node = node?;
                    nodes.create(&PostParams::default(), &node).await?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<()>>>()?;
        eventually(Duration::from_secs(120), &format!("{count} nodes Ready"), || {
            let nodes = nodes.clone();
            let names = &names;
            async move {
                let list = nodes.list(&ListParams::default()).await.ok()?;
                let ready: std::collections::BTreeSet<String> = list
                    .items
                    .iter()
                    .filter(|n| is_node_ready(n))
                    .map(|n| n.name_any())
                    .collect();
                names.iter().all(|n| ready.contains(n)).then_some(())
            }
        })
        .await?;
        Ok(names)
    }

    /// Sets a node's allocatable (and capacity) pod count, as a kubelet reporting new
    /// limits would: a node of 0 pods is eligible for a job and fits none of its pods.
    pub async fn set_pods(&self, name: &str, pods: &str) -> Result<()> {
        let patch = json!({"status": {"allocatable": {"pods": pods}, "capacity": {"pods": pods}}});
        Api::<Node>::all(self.client.clone())
            .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .with_context(|| format!("setting node {name}'s pods to {pods}"))?;
        Ok(())
    }

    /// Deletes a node this test added, and waits until it is gone.
    pub async fn remove(&mut self, name: &str) -> Result<()> {
        let nodes = Api::<Node>::all(self.client.clone());
        nodes.delete(name, &Default::default()).await?;
        self.names.retain(|n| n != name);
        eventually(STEP, &format!("node {name} deleted"), || {
            let nodes = nodes.clone();
            async move { nodes.get_opt(name).await.ok()?.is_none().then_some(()) }
        })
        .await
    }
}

impl Drop for TestNodes {
    fn drop(&mut self) {
        if self.names.is_empty() {
            return;
        }
        let mut args = vec!["delete", "node", "--wait=false", "--ignore-not-found"];
        args.extend(self.names.iter().map(String::as_str));
        let _ = Command::new("kubectl").args(args).output();
    }
}

/// A kwok node named `name` (also its hostname label) as `spec` describes it.
fn node_object(name: &str, spec: NodeSpec) -> Result<Node> {
    let mut labels = spec.labels;
    labels.insert(HOSTNAME_LABEL.to_owned(), name.to_owned());
    let resources = json!({"cpu": spec.cpu, "memory": spec.memory, "pods": spec.pods});
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            // As hack/cluster.sh's nodes: kwok's marker (it manages every node anyway).
            "annotations": {"kwok.x-k8s.io/node": "fake"},
        },
        "spec": {"taints": spec.taints},
        // kwok's node stage keeps the allocatable and capacity a node was created with.
        "status": {
            "allocatable": resources,
            "capacity": resources,
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux",
                         "kubeletVersion": "fake", "kubeProxyVersion": "fake"},
        },
    }))?)
}

pub fn is_node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Every node's value of `label` (nodes without it are left out).
pub async fn node_labels(client: &Client, label: &str) -> Result<BTreeMap<String, String>> {
    Ok(Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|n| {
            let value = n.labels().get(label)?.clone();
            Some((n.name_any(), value))
        })
        .collect())
}

// === Pods ===

/// The pods of Job `job` (label `jobs.capstan.dev/job`), terminating ones included.
pub async fn job_pods(client: &Client, ns: &str, job: &str) -> Result<Vec<Pod>> {
    Ok(Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("{JOB_LABEL}={job}")))
        .await?
        .items)
}

/// The pods of `job` that still count: neither terminating nor finished.
pub async fn live_pods(client: &Client, ns: &str, job: &str) -> Result<Vec<Pod>> {
    Ok(job_pods(client, ns, job)
        .await?
        .into_iter()
        .filter(is_live)
        .collect())
}

pub fn is_live(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none() && !matches!(phase(pod), Some("Succeeded" | "Failed"))
}

pub fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The Job version that created the pod (label `jobs.capstan.dev/version`).
pub fn version_of(pod: &Pod) -> Option<i64> {
    pod.labels().get(VERSION_LABEL)?.parse().ok()
}

pub fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

/// Sets a pod's Ready (and ContainersReady) condition, as a kubelet whose readiness
/// probe started failing or passing again would. The transition time is now: health
/// that must last `minHealthyTime` is measured from it.
pub async fn set_pod_ready(client: &Client, ns: &str, pod: &str, ready: bool) -> Result<()> {
    let status = if ready { "True" } else { "False" };
    let now = Time(jiff::Timestamp::now());
    let condition =
        |type_: &str| json!({"type": type_, "status": status, "reason": "E2E", "lastTransitionTime": now});
    let patch = json!({"status": {"conditions": [condition("Ready"), condition("ContainersReady")]}});
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(pod, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .with_context(|| format!("setting {ns}/{pod} Ready={status}"))?;
    Ok(())
}

/// Ends a running pod as `Succeeded` or `Failed` (exit code 0 or 1), as a kubelet would
/// when its containers exit.
pub async fn set_pod_finished(client: &Client, ns: &str, pod: &str, succeeded: bool) -> Result<()> {
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    let current = api.get(pod).await?;
    let now = Time(jiff::Timestamp::now());
    let (phase, code, reason) = if succeeded {
        ("Succeeded", 0, "Completed")
    } else {
        ("Failed", 1, "Error")
    };
    let containers: Vec<_> = current
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| {
            json!({"name": c.name, "image": c.image, "ready": false, "restartCount": 0,
                   "state": {"terminated": {"exitCode": code, "reason": reason,
                                            "startedAt": now, "finishedAt": now}}})
        })
        .collect();
    let unready =
        |type_: &str| json!({"type": type_, "status": "False", "reason": reason, "lastTransitionTime": now});
    let patch = json!({"status": {
        "phase": phase,
        "conditions": [unready("Ready"), unready("ContainersReady")],
        "containerStatuses": containers,
    }});
    api.patch_status(pod, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .with_context(|| format!("ending {ns}/{pod} as {phase}"))?;
    Ok(())
}

/// Deletes namespace `ns` and drops the finalizers of its pods when dropped: a pod the
/// webhook gave the secrets agent carries the credentials reconciler's finalizer, which
/// is removed only once the engine revoked the pod's tokens, and a test that runs no
/// engine would leave its namespace terminating for ever.
pub struct ReleasePods(pub String);

impl Drop for ReleasePods {
    fn drop(&mut self) {
        let ns = &self.0;
        let _ = Command::new("kubectl")
            .args(["delete", "namespace", ns, "--wait=false"])
            .output();
        let _ = Command::new("sh")
            .args([
                "-c",
                "kubectl get pods -n \"$0\" -o name | xargs -r -n1 kubectl patch -n \"$0\" --type=merge -p '{\"metadata\":{\"finalizers\":null}}'",
                ns,
            ])
            .output();
    }
}

/// One moment of a watched set of pods: what changed and every pod as it then was.
#[derive(Clone, Debug)]
pub struct PodSnapshot {
    /// When the watch delivered the change (the wall clock, to compare with Events' times).
    pub at: jiff::Timestamp,
    pub pods: Vec<PodState>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodState {
    pub name: String,
    pub version: Option<i64>,
    pub ready: bool,
    /// Deleted (terminating) or finished: no longer an allocation that serves.
    pub gone: bool,
}

impl PodSnapshot {
    /// Pods that serve: ready and neither terminating nor finished.
    pub fn available(&self) -> usize {
        self.pods.iter().filter(|p| p.ready && !p.gone).count()
    }

    pub fn live_of_version(&self, version: i64) -> usize {
        self.pods
            .iter()
            .filter(|p| !p.gone && p.version == Some(version))
            .count()
    }

    pub fn available_of_version(&self, version: i64) -> usize {
        self.pods
            .iter()
            .filter(|p| p.ready && !p.gone && p.version == Some(version))
            .count()
    }
}

/// Every state a Job's pods pass through, from a watch: a test checks an invariant at
/// each step of a rollout, not only where it happened to poll.
pub struct PodWatch {
    history: Arc<parking_lot::Mutex<Vec<PodSnapshot>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PodWatch {
    /// Starts watching the pods of `job`; returns once the initial list is in.
    pub async fn start(client: &Client, ns: &str, job: &str) -> Result<Self> {
        let api = Api::<Pod>::namespaced(client.clone(), ns);
        let config = watcher::Config::default().labels(&format!("{JOB_LABEL}={job}"));
        let history = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (listed, mut listed_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn({
            let history = history.clone();
            async move {
                let mut pods: BTreeMap<String, PodState> = BTreeMap::new();
                let mut init: BTreeMap<String, PodState> = BTreeMap::new();
                let mut events = std::pin::pin!(watcher::watcher(api, config));
                while let Some(event) = events.next().await {
                    let changed = match event {
                        Ok(watcher::Event::Apply(pod)) => {
                            pods.insert(pod.name_any(), state(&pod));
                            true
                        }
                        Ok(watcher::Event::Delete(pod)) => {
                            pods.remove(&pod.name_any());
                            true
                        }
                        Ok(watcher::Event::Init) => {
                            init.clear();
                            false
                        }
                        Ok(watcher::Event::InitApply(pod)) => {
                            init.insert(pod.name_any(), state(&pod));
                            false
                        }
                        Ok(watcher::Event::InitDone) => {
                            pods = std::mem::take(&mut init);
                            let _ = listed.send(true);
                            true
                        }
                        Err(_) => false,
                    };
                    if changed {
                        history.lock().push(PodSnapshot {
                            at: jiff::Timestamp::now(),
                            pods: pods.values().cloned().collect(),
                        });
                    }
                }
            }
        });
        tokio::time::timeout(STEP, listed_rx.wait_for(|l| *l))
            .await
            .context("the pod watch's initial list")??;
        Ok(Self { history, task })
    }

    /// Every state seen so far, oldest first.
    pub fn history(&self) -> Vec<PodSnapshot> {
        self.history.lock().clone()
    }
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn state(pod: &Pod) -> PodState {
    PodState {
        name: pod.name_any(),
        version: version_of(pod),
        ready: is_ready(pod),
        gone: !is_live(pod),
    }
}

// === Jobs ===

pub fn jobs_api(client: &Client, ns: &str) -> Api<Job> {
    Api::namespaced(client.clone(), ns)
}

/// A Job manifest: `spec` as JSON, in the test's namespace once applied.
pub fn job_manifest(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "jobs.capstan.dev/v1alpha1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// Applies a Job manifest with `kubectl apply`, as a user would.
pub fn apply_job(ns: &str, manifest: &serde_json::Value) -> Result<()> {
    let (ok, out) = kubectl_stdin(&["apply", "-n", ns, "-f", "-"], &manifest.to_string());
    if !ok {
        bail!("kubectl apply refused the Job: {out}");
    }
    Ok(())
}

/// `kubectl apply` of a Job that must be refused: the refusal's text.
pub fn apply_refused(ns: &str, manifest: &serde_json::Value) -> Result<String> {
    let (ok, out) = kubectl_stdin(&["apply", "-n", ns, "-f", "-"], &manifest.to_string());
    if ok {
        bail!("kubectl apply accepted a Job it should refuse: {out}");
    }
    Ok(out)
}

/// Sets `spec.promote` (what `capstan job promote` writes): promote version `version`'s
/// canaries.
pub async fn promote(client: &Client, ns: &str, job: &str, version: i64) -> Result<()> {
    jobs_api(client, ns)
        .patch(
            job,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"promote": version}})),
        )
        .await?;
    Ok(())
}

pub fn status_of(job: &Job) -> JobStatus {
    job.status.clone().unwrap_or_default()
}

/// The Ready condition's (status, reason).
pub fn job_ready(job: &Job) -> Option<(String, String)> {
    let status = job.status.as_ref()?;
    let ready = capstan_crds::conditions::get(&status.conditions, capstan_crds::conditions::READY)?;
    Some((ready.status.clone(), ready.reason.clone()))
}

/// Waits until `check` holds for Job `ns/name`'s current generation (the status was
/// written after the last spec change); on timeout the error shows the last status.
pub async fn wait_job(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&Job) -> bool,
) -> Result<Job> {
    let api = jobs_api(client, ns);
    let last = parking_lot::Mutex::new(None::<Job>);
    let found = eventually(timeout, &format!("{ns}/{name}: {what}"), || async {
        let job = api.get(name).await.ok()?;
        let current = job.status.as_ref().and_then(|s| s.observed_generation) == job.metadata.generation;
        let done = current && check(&job);
        *last.lock() = Some(job.clone());
        done.then_some(job)
    })
    .await;
    found.map_err(|e| {
        let status = last
            .lock()
            .as_ref()
            .and_then(|j| serde_yaml_ng::to_string(&j.status).ok())
            .unwrap_or_else(|| "(none)".into());
        anyhow::anyhow!("{e}; its last status:\n{status}")
    })
}

/// When an Event happened (events.k8s.io's eventTime, or the core fields it falls back on).
pub fn event_time(event: &Event) -> Option<jiff::Timestamp> {
    event
        .event_time
        .as_ref()
        .map(|t| t.0)
        .or_else(|| event.deprecated_first_timestamp.as_ref().map(|t| t.0))
}

/// Waits for an Event of `reason` about Job `ns/name`.
pub async fn wait_event(client: &Client, ns: &str, name: &str, reason: &str) -> Result<Event> {
    let events = Api::<Event>::namespaced(client.clone(), ns);
    eventually(STEP, &format!("a {reason} event for {ns}/{name}"), || {
        let events = events.clone();
        async move {
            events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.regarding.as_ref().is_some_and(|r| {
                            r.name.as_deref() == Some(name)
                                && r.api_version.as_deref() == Some("jobs.capstan.dev/v1alpha1")
                        })
                })
        }
    })
    .await
}

/// The last `lines` lines of a log, for a failure message.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
