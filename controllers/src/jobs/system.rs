//! System jobs: each group runs on every eligible node as the DaemonSet `<job>-<group>`
//! (`compile::daemon_set`: the eligible nodes are its required node affinity). A new
//! version is applied over it, and the DaemonSet controller rolls it node by node, never
//! more than max_parallel unavailable (maxUnavailable), as Nomad's update block for
//! system jobs does; nodes joining and leaving are the DaemonSet controller's to follow.
//! DaemonSets of groups no longer in the spec are deleted.
//!
//! Desired is one allocation per eligible node (as the compiler judges eligibility, the
//! same rule the DaemonSet's affinity encodes); the summary counts the pods per
//! datacenter.

use super::{
    Error, Phase, Report, State, batch,
    report::{apply_owned, delete_owned},
    status,
};
use crate::context::Context;
use capstan_crds::jobs::Job;
use capstan_jobs::compile;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::ResourceExt;
use std::collections::BTreeSet;

/// Applies version `version` of the system job `job` as one DaemonSet per group.
pub async fn apply(cx: &Context<State>, job: &Job, version: i64) -> Result<Report, Error> {
    let nodes = cx.state.node_snapshot();
    let settings = &cx.state.settings;
    let mut desired = Vec::new();
    let mut rolled = Vec::new();
    for (g, group) in job.spec.groups.iter().enumerate() {
        let eligible = compile::eligible_nodes(job, g, &nodes, settings)?;
        let set = compile::daemon_set(job, g, version, &nodes, settings)?;
        cx.leadership.ensure()?;
        let applied = apply_owned(&cx.client, &set).await?;
        rolled.push(rolling(&applied));
        desired.push((
            group.name.clone(),
            i32::try_from(eligible.len()).unwrap_or(i32::MAX),
        ));
    }
    let wanted: BTreeSet<String> = (0..job.spec.groups.len())
        .map(|g| compile::names::daemon_set(&job.name_any(), &job.spec.groups[g].name))
        .collect();
    let namespace = job.namespace().unwrap_or_default();
    for set in batch::owned::<DaemonSet>(cx, job).await? {
        if !wanted.contains(&set.name_any()) {
            cx.leadership.ensure()?;
            delete_owned::<DaemonSet>(&cx.client, &namespace, &set.name_any()).await?;
        }
    }
    let pods = cx.state.pods_of(job);
    let (summary, desired, running) = cx.state.summary(&desired, &pods, status::pod_ready);
    Ok(Report {
        phase: phase(running, rolled.contains(&true)),
        desired,
        running,
        summary,
        ..Report::default()
    })
}

/// Whether the DaemonSet is rolling a new template over the pods of an older one: its
/// controller has not seen the newest generation, or not every scheduled pod is updated,
/// or (after its first template) not every one is available again. A first placement is
/// not a rollout: its pods run as soon as they start.
fn rolling(set: &DaemonSet) -> bool {
    let Some(status) = set.status.as_ref() else {
        return false;
    };
    let updated = set.metadata.generation.unwrap_or(1) > 1;
    status.observed_generation < set.metadata.generation
        || status.updated_number_scheduled.unwrap_or(0) < status.desired_number_scheduled
        || (updated && status.number_available.unwrap_or(0) < status.desired_number_scheduled)
}

/// Pending until an allocation runs; then deploying while a DaemonSet rolls a new
/// version, running otherwise (a node that just joined is the DaemonSet's to fill).
fn phase(running: i32, rolling: bool) -> Phase {
    match (running > 0, rolling) {
        (false, _) => Phase::Pending,
        (true, true) => Phase::Deploying,
        (true, false) => Phase::Running,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DaemonSetStatus;

    fn set(generation: i64, observed: i64, desired: i32, updated: i32, available: i32) -> DaemonSet {
        let mut set = DaemonSet::default();
        set.metadata.generation = Some(generation);
        set.status = Some(DaemonSetStatus {
            observed_generation: Some(observed),
            desired_number_scheduled: desired,
            updated_number_scheduled: Some(updated),
            number_available: Some(available),
            ..DaemonSetStatus::default()
        });
        set
    }

    #[test]
    fn a_daemon_set_rolls_until_every_pod_is_updated_and_available() {
        assert!(!rolling(&DaemonSet::default()), "just created");
        assert!(
            !rolling(&set(1, 1, 3, 3, 0)),
            "a first placement, not available yet"
        );
        assert!(
            rolling(&set(2, 1, 3, 3, 3)),
            "its controller has not seen the new spec"
        );
        assert!(rolling(&set(2, 2, 3, 1, 3)), "two pods of the old version");
        assert!(rolling(&set(2, 2, 3, 3, 2)), "one new pod not available yet");
        assert!(!rolling(&set(2, 2, 3, 3, 3)));
    }

    #[test]
    fn the_phase_follows_the_allocations() {
        assert_eq!(phase(0, true), Phase::Pending);
        assert_eq!(phase(0, false), Phase::Pending, "no eligible node");
        assert_eq!(phase(2, true), Phase::Deploying);
        assert_eq!(phase(3, false), Phase::Running);
    }
}
