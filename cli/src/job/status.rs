//! `capstan job status NAME`: what `nomad job status` shows, from the Job's status (the
//! controller's summary, deployment and children), its versions (ControllerRevisions)
//! and its pods (labelled `jobs.capstan.dev/job`).

use super::{Cluster, Version, age, api_error, fields, optional, table, timestamp};
use anyhow::Context as _;
use capstan_crds::jobs::Job;
use capstan_jobs::{attributes::DEFAULT_DATACENTER_LABEL, compile::labels};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{Api, ResourceExt, api::ListParams};
use std::collections::BTreeMap;

#[derive(clap::Args, Debug)]
pub struct Status {
    /// The Job's name.
    name: String,
    /// The node label that holds a node's datacenter (the chart's `jobs.datacenterLabel`).
    #[arg(long, default_value = DEFAULT_DATACENTER_LABEL)]
    datacenter_label: String,
}

impl Status {
    pub async fn run(self, cluster: &Cluster) -> anyhow::Result<bool> {
        let job = cluster.job(&self.name).await?;
        let versions = cluster.versions(&job).await?;
        let selector = format!("{}={}", labels::JOB, self.name);
        let mut pods = cluster
            .api::<Pod>()
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(api_error)
            .with_context(|| format!("listing the pods of Job {:?} ({selector})", self.name))?
            .items;
        pods.sort_by_key(|p| (label(p, labels::GROUP), p.name_any()));
        // Nodes are cluster-wide: a user who may not list them still gets the rest.
        let datacenters: BTreeMap<String, String> = match Api::<Node>::all(cluster.client.clone())
            .list(&ListParams::default())
            .await
        {
            Ok(nodes) => nodes
                .items
                .iter()
                .filter_map(|n| Some((n.name_any(), n.labels().get(&self.datacenter_label)?.clone())))
                .collect(),
            Err(_) => BTreeMap::new(),
        };
        println!("{}", render(&job, &versions, &pods, &datacenters));
        Ok(true)
    }
}

fn render(job: &Job, versions: &[Version], pods: &[Pod], datacenters: &BTreeMap<String, String>) -> String {
    let spec = &job.spec;
    let status = job.status.clone().unwrap_or_default();
    let mut header = vec![
        ("ID", job.name_any()),
        ("Namespace", job.namespace().unwrap_or_default()),
        ("Type", spec.type_.as_str().to_owned()),
        ("Priority", spec.priority.to_string()),
        ("Datacenters", spec.datacenters.join(",")),
        (
            "Status",
            status.phase.clone().unwrap_or_else(|| "pending".to_owned()),
        ),
        (
            "Periodic",
            spec.periodic
                .as_ref()
                .map_or("false".to_owned(), |p| p.crons.join(", ")),
        ),
        ("Parameterized", spec.parameterized.is_some().to_string()),
        ("Version", optional(status.version)),
        ("Stable Version", optional(status.stable_version)),
        // Differs from Version while a new version deploys, and after an auto-revert.
        ("Running Version", optional(status.running_version)),
    ];
    if let Some(ready) = status.conditions.iter().find(|c| c.type_ == "Ready") {
        header.push((
            "Ready",
            format!("{} ({}: {})", ready.status, ready.reason, ready.message),
        ));
    }
    if let Some(parent) = &spec.dispatch {
        header.push(("Parent", parent.parent.clone()));
    }
    let mut out = fields(&header);

    out.push_str("\n\nSummary\n");
    if status.summary.is_empty() {
        out.push_str("No allocations summarized yet");
    } else {
        let rows: Vec<Vec<String>> = status
            .summary
            .iter()
            .map(|s| {
                let dc = if s.datacenter.is_empty() {
                    "-".to_owned()
                } else {
                    s.datacenter.clone()
                };
                let counts = [
                    s.desired,
                    s.placed,
                    s.running,
                    s.healthy,
                    s.unhealthy,
                    s.failed,
                    s.complete,
                    s.lost,
                ];
                [s.group.clone(), dc]
                    .into_iter()
                    .chain(counts.iter().map(i32::to_string))
                    .collect()
            })
            .collect();
        out.push_str(&table(
            &[
                "Task Group",
                "Datacenter",
                "Desired",
                "Placed",
                "Running",
                "Healthy",
                "Unhealthy",
                "Failed",
                "Complete",
                "Lost",
            ],
            &rows,
        ));
    }

    if let Some(d) = &status.deployment {
        out.push_str("\n\nLatest Deployment\n");
        let mut rows = vec![
            ("Version", d.version.to_string()),
            ("Status", d.status.clone()),
            (
                "Description",
                d.description.clone().unwrap_or_else(|| "-".to_owned()),
            ),
            (
                "Canaries",
                format!(
                    "{} placed, {} healthy, {} desired",
                    d.canaries_placed, d.canaries_healthy, d.canaries_desired
                ),
            ),
            ("Promoted", d.promoted.to_string()),
            ("Started", timestamp(d.started_at.as_ref())),
            ("Deadline", timestamp(d.deadline.as_ref())),
        ];
        if let Some(to) = d.reverted_to {
            rows.push(("Reverted To", to.to_string()));
        }
        out.push_str(&fields(&rows));
    }

    out.push_str("\n\nVersions\n");
    if versions.is_empty() {
        out.push_str("No versions recorded yet");
    } else {
        let rows: Vec<Vec<String>> = versions
            .iter()
            .map(|v| {
                let running = status.running_version == Some(v.number);
                vec![
                    v.number.to_string(),
                    v.stable.to_string(),
                    running.to_string(),
                    timestamp(v.created.as_ref()),
                ]
            })
            .collect();
        out.push_str(&table(&["Version", "Stable", "Running", "Submitted"], &rows));
    }

    if spec.periodic.is_some() || spec.parameterized.is_some() {
        out.push_str("\n\nChildren\n");
        if status.children.is_empty() {
            out.push_str("No child runs");
        } else {
            let rows: Vec<Vec<String>> = status
                .children
                .iter()
                .map(|c| {
                    vec![
                        c.name.clone(),
                        c.kind.clone(),
                        c.status.clone(),
                        age(c.created.as_ref()),
                    ]
                })
                .collect();
            out.push_str(&table(&["Name", "Kind", "Status", "Created"], &rows));
        }
    }

    out.push_str("\n\nAllocations\n");
    if pods.is_empty() {
        out.push_str("No allocations placed");
    } else {
        let rows: Vec<Vec<String>> = pods
            .iter()
            .map(|pod| {
                let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
                let dc = node.as_ref().and_then(|n| datacenters.get(n)).cloned();
                vec![
                    pod.name_any(),
                    label(pod, labels::GROUP),
                    label(pod, labels::VERSION),
                    node.unwrap_or_else(|| "-".to_owned()),
                    dc.unwrap_or_else(|| "-".to_owned()),
                    allocation_status(pod).to_owned(),
                    age(pod.metadata.creation_timestamp.as_ref()),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "Name",
                "Task Group",
                "Version",
                "Node",
                "Datacenter",
                "Status",
                "Age",
            ],
            &rows,
        ));
    }
    out
}

fn label(pod: &Pod, key: &str) -> String {
    pod.labels().get(key).cloned().unwrap_or_else(|| "-".to_owned())
}

/// Nomad's allocation statuses from the pod's phase.
fn allocation_status(pod: &Pod) -> &'static str {
    if pod.metadata.deletion_timestamp.is_some() {
        return "stopping";
    }
    match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Running") => "running",
        Some("Succeeded") => "complete",
        Some("Failed") => "failed",
        Some("Unknown") => "lost",
        _ => "pending",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "jobs.capstan.dev/v1alpha1",
            "kind": "Job",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"datacenters": ["dc1", "dc2"], "groups": [{"name": "frontend", "count": 2, "tasks": [{"name": "server", "image": "web:2"}]}]},
            "status": {
                "version": 2, "stableVersion": 1, "runningVersion": 2, "phase": "deploying",
                "summary": [{"group": "frontend", "datacenter": "dc1", "desired": 2, "placed": 2, "running": 2, "healthy": 1, "unhealthy": 1}],
                "deployment": {"version": 2, "status": "paused", "description": "Deployment is waiting for promotion",
                               "canariesDesired": 1, "canariesPlaced": 1, "canariesHealthy": 1},
                "conditions": [{"type": "Ready", "status": "False", "reason": "DeploymentPaused", "message": "waiting for promotion",
                                "lastTransitionTime": "2026-01-01T00:00:00Z"}]
            }
        }))
        .unwrap()
    }

    fn pod(name: &str, node: &str, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {labels::GROUP: "frontend", labels::VERSION: "2"}},
            "spec": {"nodeName": node, "containers": []},
            "status": {"phase": phase}
        }))
        .unwrap()
    }

    #[test]
    fn every_section_is_printed() {
        let versions = [
            Version {
                number: 2,
                stable: false,
                created: None,
                spec: None,
            },
            Version {
                number: 1,
                stable: true,
                created: None,
                spec: None,
            },
        ];
        let pods = [
            pod("web-frontend-a", "node-1", "Running"),
            pod("web-frontend-b", "node-9", "Pending"),
        ];
        let dcs = BTreeMap::from([("node-1".to_owned(), "dc1".to_owned())]);
        let out = render(&job(), &versions, &pods, &dcs);
        for expected in [
            "ID              = web",
            "Datacenters     = dc1,dc2",
            "Status          = deploying",
            "Stable Version  = 1",
            "Ready           = False (DeploymentPaused: waiting for promotion)",
            "Task Group  Datacenter  Desired  Placed  Running  Healthy  Unhealthy  Failed  Complete  Lost",
            "frontend    dc1         2        2       2        1        1          0       0         0",
            "Canaries    = 1 placed, 1 healthy, 1 desired",
            "Promoted    = false",
            "Version  Stable  Running  Submitted",
            "2        false   true     -",
            "1        true    false    -",
            "web-frontend-a  frontend    2        node-1  dc1         running  -",
            "web-frontend-b  frontend    2        node-9  -           pending  -",
        ] {
            assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
        }
        assert!(!out.contains("Children"), "a service job has no children:\n{out}");
    }

    #[test]
    fn a_job_the_controller_has_not_seen() {
        let mut job = job();
        job.status = None;
        let out = render(&job, &[], &[], &BTreeMap::new());
        for expected in [
            "Status          = pending",
            "No allocations summarized yet",
            "No versions recorded yet",
            "No allocations placed",
        ] {
            assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
        }
        assert!(!out.contains("Latest Deployment"));
    }
}
