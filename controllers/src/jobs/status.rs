//! The Job's status from a job type's [`Report`]: versions, phase, totals, the summary
//! per group and datacenter, the deployment, the children, and the Ready condition,
//! written by server-side apply under the reconciler's field manager; the report's
//! Events are published once the write changed something (a reconcile that finds
//! nothing new says nothing again).

use super::{
    CONTROLLER, Error, MANAGER, State, reasons,
    report::{Note, Phase, Ready, Report},
    revisions,
};
use crate::{
    context::Context,
    status::{Outcome, Writer},
};
use capstan_crds::{
    ConditionStatus,
    conditions::{self, READY},
    jobs::{DeploymentStatus, GroupSummary, Job},
};
use capstan_jobs::compile::labels;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use kube::{
    Resource, ResourceExt,
    runtime::{
        events::{Event, EventType},
        reflector::Store,
    },
};
use std::{collections::BTreeMap, sync::Arc};

/// Every status field and the Ready condition.
pub const STATUS: Writer = Writer {
    manager: MANAGER,
    controller: CONTROLLER,
    fields: &[
        "observedGeneration",
        "version",
        "stableVersion",
        "runningVersion",
        "phase",
        "running",
        "desired",
        "summary",
        "deployment",
        "children",
    ],
    conditions: &[READY],
};

/// The children status keeps.
pub const CHILDREN: usize = 20;

/// Writes `report` as the status of `job` at `version`, then publishes its Events.
pub async fn write(job: &Job, cx: &Context<State>, version: i64, report: &Report) -> Result<(), Error> {
    let generation = job.metadata.generation;
    let ready = report.ready.clone().unwrap_or_else(|| ready(report.phase));
    let condition = conditions::new(
        READY,
        ready.status,
        ready.reason,
        ready.message.clone(),
        generation,
    );
    let outcome = STATUS
        .update_of_unless_held(job, cx, |status| {
            status.observed_generation = generation;
            status.version = Some(version);
            if report.stable_version.is_some() {
                status.stable_version = report.stable_version;
            }
            status.running_version = Some(report.running_version.unwrap_or(version));
            status.phase = Some(report.phase.as_str().to_owned());
            status.running = report.running;
            status.desired = report.desired;
            status.summary = report.summary.clone();
            if report.deployment.is_some() {
                status.deployment = report.deployment.clone();
            }
            status.children = report.children.iter().take(CHILDREN).cloned().collect();
            conditions::upsert(&mut status.conditions, condition.clone());
        })
        .await?;
    if let Outcome::Written { .. } = outcome {
        publish(job, cx, &report.events).await;
    }
    Ok(())
}

/// Records `deployment` before the reconcile acts on it: a decision (promoted, failed,
/// reverted, succeeded) is in the API before the ReplicaSets move, so a controller
/// stopped in between resumes from it instead of deciding again from changed facts.
pub async fn record_deployment(
    job: &Job,
    cx: &Context<State>,
    deployment: &DeploymentStatus,
) -> Result<(), Error> {
    STATUS
        .update_of(job, cx, |status| status.deployment = Some(deployment.clone()))
        .await?;
    Ok(())
}

pub async fn publish(job: &Job, cx: &Context<State>, notes: &[Note]) {
    let reference = job.object_ref(&());
    for note in notes {
        // A deposed leader says nothing.
        if cx.leadership.ensure().is_err() {
            return;
        }
        let event = Event {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.to_owned(),
            note: Some(note.message.clone()),
            action: note.reason.to_owned(),
            secondary: note.version.map(|v| ObjectReference {
                api_version: Some("apps/v1".to_owned()),
                kind: Some("ControllerRevision".to_owned()),
                name: Some(revisions::name(&job.name_any(), v)),
                namespace: job.namespace(),
                ..ObjectReference::default()
            }),
        };
        if let Err(error) = cx.recorder.publish(&event, &reference).await {
            tracing::warn!(%error, "Publishing an event");
        }
    }
}

/// The Ready condition a phase means when the job type says nothing more.
pub fn ready(phase: Phase) -> Ready {
    let (status, reason, message) = match phase {
        Phase::Pending => (ConditionStatus::False, reasons::PENDING, "no allocation runs yet"),
        Phase::Running => (ConditionStatus::True, reasons::RUNNING, "every group runs"),
        Phase::Deploying => (
            ConditionStatus::False,
            reasons::DEPLOYING,
            "a deployment is in progress",
        ),
        Phase::Complete => (ConditionStatus::True, reasons::COMPLETE, "every group completed"),
        Phase::Failed => (ConditionStatus::False, reasons::FAILED, "the job failed"),
        Phase::Dead => (
            ConditionStatus::True,
            reasons::DEAD,
            "the job runs nothing by design",
        ),
    };
    Ready {
        status,
        reason,
        message: message.to_owned(),
    }
}

/// The report of a spec that cannot be compiled: nothing changes, Ready says why.
pub fn invalid(job: &Job, field: &str, message: &str) -> Report {
    let status = job.status.as_ref();
    let text = format!("{field}: {message}");
    Report {
        phase: status
            .and_then(|s| s.phase.as_deref())
            .map_or(Phase::Pending, parse_phase),
        desired: status.map_or(0, |s| s.desired),
        running: status.map_or(0, |s| s.running),
        summary: status.map(|s| s.summary.clone()).unwrap_or_default(),
        children: status.map(|s| s.children.clone()).unwrap_or_default(),
        running_version: status.and_then(|s| s.running_version),
        ready: Some(Ready {
            status: ConditionStatus::False,
            reason: reasons::INVALID_SPEC,
            message: text.clone(),
        }),
        events: vec![Note::warning(reasons::INVALID_SPEC, text)],
        ..Report::default()
    }
}

fn parse_phase(phase: &str) -> Phase {
    match phase {
        "running" => Phase::Running,
        "deploying" => Phase::Deploying,
        "complete" => Phase::Complete,
        "failed" => Phase::Failed,
        "dead" => Phase::Dead,
        _ => Phase::Pending,
    }
}

/// How status counts one pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    pub placed: bool,
    pub running: bool,
    pub healthy: bool,
    pub unhealthy: bool,
    pub failed: bool,
    pub complete: bool,
    pub lost: bool,
}

/// What a pod counts as: placed once on a node; running, failed, complete by phase;
/// healthy when `healthy` says so, unhealthy when running but not healthy; lost when
/// its node is gone or not Ready while the pod has not finished.
pub fn count(pod: &Pod, nodes: &Store<Node>, healthy: bool) -> Counted {
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending");
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    let finished = matches!(phase, "Succeeded" | "Failed");
    let lost = !finished
        && node.is_some_and(|name| {
            nodes
                .get(&kube::runtime::reflector::ObjectRef::new(name))
                .is_none_or(|n| !ready_node(&n))
        });
    let running = phase == "Running" && !lost;
    Counted {
        placed: node.is_some() && !finished,
        running,
        healthy: running && healthy,
        unhealthy: running && !healthy,
        failed: phase == "Failed",
        complete: phase == "Succeeded",
        lost,
    }
}

pub fn ready_node(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether the pod's Ready condition is True.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

impl super::State {
    /// [`summarize`] over this state's nodes and datacenter label, with the summary's
    /// desired and running totals (what every job type reports).
    pub fn summary(
        &self,
        desired: &[(String, i32)],
        pods: &[Arc<Pod>],
        healthy: impl Fn(&Pod) -> bool,
    ) -> (Vec<GroupSummary>, i32, i32) {
        let summary = summarize(
            desired,
            pods,
            &self.nodes,
            &self.settings.datacenter_label,
            healthy,
        );
        let (desired, running) = totals(&summary);
        (summary, desired, running)
    }
}

/// The summary per group and datacenter. `desired` is each group's desired count, in
/// the spec's order; a group's desired allocations are attributed to the datacenters
/// its unfinished pods are placed in, and what no placed pod accounts for to the row
/// with an empty datacenter (unplaced). `healthy` judges a pod (the job type's health
/// rule).
pub fn summarize(
    desired: &[(String, i32)],
    pods: &[Arc<Pod>],
    nodes: &Store<Node>,
    datacenter_label: &str,
    healthy: impl Fn(&Pod) -> bool,
) -> Vec<GroupSummary> {
    let mut rows: BTreeMap<(usize, String), GroupSummary> = BTreeMap::new();
    for pod in pods {
        let Some(group) = pod.labels().get(labels::GROUP) else {
            continue;
        };
        let Some(index) = desired.iter().position(|(g, _)| g == group) else {
            continue;
        };
        if pod.meta().deletion_timestamp.is_some() {
            continue;
        }
        let datacenter = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .and_then(|n| nodes.get(&kube::runtime::reflector::ObjectRef::new(n)))
            .and_then(|n| n.labels().get(datacenter_label).cloned())
            .unwrap_or_default();
        let c = count(pod, nodes, healthy(pod));
        let row = rows
            .entry((index, datacenter.clone()))
            .or_insert_with(|| GroupSummary {
                group: group.clone(),
                datacenter,
                ..GroupSummary::default()
            });
        row.placed += i32::from(c.placed);
        row.running += i32::from(c.running);
        row.healthy += i32::from(c.healthy);
        row.unhealthy += i32::from(c.unhealthy);
        row.failed += i32::from(c.failed);
        row.complete += i32::from(c.complete);
        row.lost += i32::from(c.lost);
    }
    for (index, (group, want)) in desired.iter().enumerate() {
        let mut left = *want;
        for ((_, datacenter), row) in rows.range_mut((index, String::new())..(index + 1, String::new())) {
            if datacenter.is_empty() {
                continue;
            }
            row.desired = row.placed.min(left);
            left -= row.desired;
        }
        if left > 0 || !rows.keys().any(|(i, _)| *i == index) {
            rows.entry((index, String::new()))
                .or_insert_with(|| GroupSummary {
                    group: group.clone(),
                    ..GroupSummary::default()
                })
                .desired = left;
        }
    }
    rows.into_values().collect()
}

/// `status.desired` and `status.running` from a summary.
pub fn totals(summary: &[GroupSummary]) -> (i32, i32) {
    summary
        .iter()
        .fold((0, 0), |(d, r), row| (d + row.desired, r + row.running))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus, PodSpec, PodStatus};
    use kube::runtime::{reflector, watcher};

    fn node(name: &str, datacenter: &str, ready: bool) -> Node {
        let mut node = Node::default();
        node.metadata.name = Some(name.into());
        node.metadata.labels = Some(BTreeMap::from([("dc".to_owned(), datacenter.to_owned())]));
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

    fn pod(name: &str, group: &str, node: Option<&str>, phase: &str) -> Arc<Pod> {
        let mut pod = Pod::default();
        pod.metadata.name = Some(name.into());
        pod.metadata.labels = Some(BTreeMap::from([(labels::GROUP.to_owned(), group.to_owned())]));
        pod.spec = Some(PodSpec {
            node_name: node.map(str::to_owned),
            ..PodSpec::default()
        });
        pod.status = Some(PodStatus {
            phase: Some(phase.into()),
            ..PodStatus::default()
        });
        Arc::new(pod)
    }

    #[test]
    fn the_summary_counts_each_group_per_datacenter_and_what_is_lost_or_unplaced() {
        let (nodes, mut writer) = reflector::store();
        for n in [
            node("a", "dc1", true),
            node("b", "dc2", true),
            node("c", "dc2", false),
        ] {
            writer.apply_watcher_event(&watcher::Event::Apply(n));
        }
        let pods = [
            pod("web-1", "web", Some("a"), "Running"),
            pod("web-2", "web", Some("b"), "Running"),
            pod("web-3", "web", Some("c"), "Running"),
            pod("web-4", "web", Some("gone"), "Running"),
            pod("web-5", "web", None, "Pending"),
            pod("db-1", "db", Some("a"), "Failed"),
        ];
        let desired = [("web".to_owned(), 5), ("db".to_owned(), 1)];
        let summary = summarize(&desired, &pods, &nodes, "dc", |p| p.name_any() != "web-2");
        let rows: Vec<_> = summary
            .iter()
            .map(|r| {
                (
                    r.group.as_str(),
                    r.datacenter.as_str(),
                    r.desired,
                    r.placed,
                    r.running,
                    r.healthy,
                    r.unhealthy,
                    r.failed,
                    r.lost,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                // No datacenter: the pod on a node that is gone (lost) and the desired
                // allocations no placed pod accounts for (it and the pending one).
                ("web", "", 2, 1, 0, 0, 0, 0, 1),
                ("web", "dc1", 1, 1, 1, 1, 0, 0, 0),
                // web-2 runs but is judged unhealthy; web-3's node is NotReady: lost.
                ("web", "dc2", 2, 2, 1, 0, 1, 0, 1),
                // A finished pod accounts for no desired allocation.
                ("db", "", 1, 0, 0, 0, 0, 0, 0),
                ("db", "dc1", 0, 0, 0, 0, 0, 1, 0),
            ]
        );
        assert_eq!(totals(&summary), (6, 2));
    }
}
