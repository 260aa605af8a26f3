//! Periodic batch jobs: one CronJob per group and cron, `<job>-<group>-cron<i>`
//! (`compile::cron_jobs`: concurrencyPolicy Forbid under prohibit_overlap, the time
//! zone kept, suspended while not enabled), applied on every reconcile so a new version
//! changes what the next launches run (launches already running finish as they are, as
//! in Nomad). CronJobs no longer wanted (a cron or group removed) are deleted.
//!
//! The launches are the CronJobs' batch/v1 Jobs: the Job's children in status (newest
//! first; status keeps 20), and what its summary counts. The parent is running while
//! enabled (between launches too, as Nomad says of a periodic job) and dead while not.

use super::{
    Error, Phase, Ready, Report, State,
    batch::{self, Run},
    reasons,
    report::{apply_owned, delete_owned},
    status,
};
use crate::context::Context;
use capstan_crds::{
    ConditionStatus,
    jobs::{ChildRun, Job},
};
use capstan_jobs::compile::{self, labels};
use k8s_openapi::api::batch::v1::{CronJob, Job as BatchJob};
use kube::ResourceExt;
use std::collections::BTreeSet;

/// `ChildRun.kind` of a launch.
pub const LAUNCH_KIND: &str = "batch/v1 Job";

/// Applies version `version` of the periodic job `job` as CronJobs and reports its
/// launches.
pub async fn apply(cx: &Context<State>, job: &Job, version: i64) -> Result<Report, Error> {
    let nodes = cx.state.node_snapshot();
    let mut wanted = Vec::new();
    for g in 0..job.spec.groups.len() {
        wanted.extend(compile::cron_jobs(job, g, version, &nodes, &cx.state.settings)?);
    }
    for cron in &wanted {
        cx.leadership.ensure()?;
        apply_owned(&cx.client, cron).await?;
    }
    let names: BTreeSet<String> = wanted.iter().map(ResourceExt::name_any).collect();
    let namespace = job.namespace().unwrap_or_default();
    let mut crons = names.clone();
    for cron in batch::owned::<CronJob>(cx, job).await? {
        let name = cron.name_any();
        if !names.contains(&name) {
            cx.leadership.ensure()?;
            delete_owned::<CronJob>(&cx.client, &namespace, &name).await?;
            // Its launches stay children until the garbage collector takes them.
            crons.insert(name);
        }
    }
    let launches = launches(batch::labelled::<BatchJob>(cx, job).await?, &crons);
    Ok(report(cx, job, &launches))
}

/// The launches among `runs`: those whose controller is one of the `crons`, newest first.
fn launches(runs: Vec<BatchJob>, crons: &BTreeSet<String>) -> Vec<BatchJob> {
    let mut launches: Vec<BatchJob> = runs
        .into_iter()
        .filter(|run| {
            run.owner_references()
                .iter()
                .any(|r| r.controller == Some(true) && r.kind == "CronJob" && crons.contains(&r.name))
        })
        .collect();
    launches.sort_by(|a, b| {
        let created = |j: &BatchJob| j.metadata.creation_timestamp.clone();
        created(b)
            .cmp(&created(a))
            .then_with(|| a.name_any().cmp(&b.name_any()))
    });
    launches
}

/// The children and the summary of the unfinished launches' pods.
fn report(cx: &Context<State>, job: &Job, launches: &[BatchJob]) -> Report {
    let children = children(launches);
    let active: Vec<&BatchJob> = launches.iter().filter(|l| !Run::of(l).finished()).collect();
    let desired: Vec<(String, i32)> = job
        .spec
        .groups
        .iter()
        .map(|g| {
            let running = active
                .iter()
                .filter(|l| l.labels().get(labels::GROUP) == Some(&g.name))
                .count();
            (
                g.name.clone(),
                g.count.saturating_mul(i32::try_from(running).unwrap_or(i32::MAX)),
            )
        })
        .collect();
    let active_names: BTreeSet<String> = active.iter().map(|l| l.name_any()).collect();
    // A launch's pods carry the batch/v1 Job's name (its controller's label).
    let pods: Vec<_> = cx
        .state
        .pods_of(job)
        .into_iter()
        .filter(|p| {
            p.labels()
                .get("batch.kubernetes.io/job-name")
                .is_some_and(|n| active_names.contains(n))
        })
        .collect();
    let (summary, desired, running) = cx.state.summary(&desired, &pods, status::pod_ready);
    let (phase, ready) = match &job.spec.periodic {
        Some(p) if p.enabled => (
            Phase::Running,
            Ready {
                status: ConditionStatus::True,
                reason: reasons::RUNNING,
                message: format!("launches on its schedule ({})", p.crons.join(", ")),
            },
        ),
        _ => (
            Phase::Dead,
            Ready {
                status: ConditionStatus::True,
                reason: reasons::DEAD,
                message: "its schedule is disabled: nothing launches".to_owned(),
            },
        ),
    };
    Report {
        phase,
        ready: Some(ready),
        desired,
        running,
        summary,
        children,
        ..Report::default()
    }
}

/// The launches as status children (status keeps the newest).
fn children(launches: &[BatchJob]) -> Vec<ChildRun> {
    launches
        .iter()
        .take(status::CHILDREN)
        .map(|l| ChildRun {
            name: l.name_any(),
            kind: LAUNCH_KIND.to_owned(),
            created: l.metadata.creation_timestamp.clone(),
            status: Run::of(l).as_str().to_owned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{
        api::batch::v1::JobStatus as BatchStatus,
        apimachinery::pkg::apis::meta::v1::{OwnerReference, Time},
    };

    fn launch(name: &str, owner: (&str, &str), minute: u32) -> BatchJob {
        let mut run = BatchJob::default();
        run.metadata.name = Some(name.to_owned());
        run.metadata.creation_timestamp =
            Some(Time(format!("2026-01-01T12:{minute:02}:00Z").parse().unwrap()));
        run.metadata.owner_references = Some(vec![OwnerReference {
            kind: owner.0.to_owned(),
            name: owner.1.to_owned(),
            controller: Some(true),
            ..OwnerReference::default()
        }]);
        run.status = Some(BatchStatus {
            active: Some(1),
            ..BatchStatus::default()
        });
        run
    }

    #[test]
    fn the_launches_are_the_cronjobs_runs_newest_first() {
        let crons = BTreeSet::from(["r-send-cron0".to_owned()]);
        let runs = vec![
            launch("r-send-cron0-1", ("CronJob", "r-send-cron0"), 1),
            launch("r-send-cron0-3", ("CronJob", "r-send-cron0"), 3),
            launch("r-send-v1", ("Job", "r"), 2),
            launch("other-cron0-2", ("CronJob", "other-cron0"), 2),
        ];
        let launches = launches(runs, &crons);
        let children = children(&launches);
        let names: Vec<&str> = children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["r-send-cron0-3", "r-send-cron0-1"]);
        assert!(
            children
                .iter()
                .all(|c| c.kind == LAUNCH_KIND && c.status == "running")
        );
    }
}
