//! Batch jobs: each group of a version runs once, as the batch/v1 Job
//! `<job>-<group>-v<N>` (`compile::batch_job`: the count's pods in parallel, failures
//! retried up to the restart policy's backoff limit).
//!
//! A new version runs anew, as Nomad re-runs a changed batch job: its runs are created
//! beside the old version's, whose unfinished runs are deleted (their pods with them).
//! Finished runs of older versions stay as history, for the newest [`HISTORY`] older
//! versions. A run is never rewritten once created: a batch/v1 Job's pod template is
//! immutable, and a version's spec does not change. A run deleted while its version is
//! the newest is created again (and runs again).
//!
//! The job is complete when every group's run completed, failed when a run exhausted its
//! backoff limit (the run's Failed condition).

use super::{
    Error, Phase, Report, State,
    report::{apply_owned, delete_owned},
    status,
};
use crate::context::Context;
use capstan_crds::jobs::Job;
use capstan_jobs::compile::{self, labels};
use k8s_openapi::{NamespaceResourceScope, api::batch::v1::Job as BatchJob};
use kube::{Api, Resource, ResourceExt, api::ListParams};
use serde::de::DeserializeOwned;
use std::{collections::BTreeSet, fmt::Debug};

/// How many older versions' finished runs are kept.
pub const HISTORY: usize = 3;

/// Runs version `version` of the batch job `job` and reports its runs.
pub async fn apply(cx: &Context<State>, job: &Job, version: i64) -> Result<Report, Error> {
    let nodes = cx.state.node_snapshot();
    let wanted = (0..job.spec.groups.len())
        .map(|g| compile::batch_job(job, g, version, &nodes, &cx.state.settings))
        .collect::<Result<Vec<_>, _>>()?;
    let existing = owned::<BatchJob>(cx, job).await?;
    let plan = plan(&wanted, &existing, version);
    write(cx, job, &plan).await?;
    let runs: Vec<Option<Run>> = wanted
        .iter()
        .map(|w| {
            existing
                .iter()
                .find(|e| e.name_any() == w.name_any())
                .map(Run::of)
        })
        .collect();
    Ok(report(cx, job, version, &runs))
}

/// The status of a batch job whose version's runs are `runs` (one per group, in order;
/// None for a run not created yet), from the runs and the version's pods.
pub fn report(cx: &Context<State>, job: &Job, version: i64, runs: &[Option<Run>]) -> Report {
    let desired: Vec<(String, i32)> = job
        .spec
        .groups
        .iter()
        .map(|g| (g.name.clone(), g.count))
        .collect();
    let version = version.to_string();
    let pods: Vec<_> = cx
        .state
        .pods_of(job)
        .into_iter()
        .filter(|p| p.labels().get(labels::VERSION) == Some(&version))
        .collect();
    let (summary, desired, running) = cx.state.summary(&desired, &pods, status::pod_ready);
    Report {
        phase: phase(runs),
        desired,
        running,
        summary,
        ..Report::default()
    }
}

/// What to create and delete.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub create: Vec<BatchJob>,
    pub delete: Vec<String>,
}

/// Creates the runs of `wanted` that do not exist yet; deletes the other versions' runs
/// that are unfinished, and the finished ones beyond [`HISTORY`] older versions.
pub fn plan(wanted: &[BatchJob], existing: &[BatchJob], version: i64) -> Plan {
    let names: BTreeSet<String> = existing.iter().map(ResourceExt::name_any).collect();
    Plan {
        create: wanted
            .iter()
            .filter(|w| !names.contains(&w.name_any()))
            .cloned()
            .collect(),
        delete: prune(existing, version),
    }
}

/// The runs of versions other than `version` to delete: unfinished ones (a new version
/// replaces them), and finished ones of versions older than the newest [`HISTORY`] that
/// have finished runs.
pub fn prune(existing: &[BatchJob], version: i64) -> Vec<String> {
    let older: BTreeSet<i64> = existing
        .iter()
        .filter(|run| Run::of(run).finished())
        .filter_map(version_of)
        .filter(|v| *v < version)
        .collect();
    let kept: BTreeSet<i64> = older.iter().rev().take(HISTORY).copied().collect();
    existing
        .iter()
        .filter(|run| {
            version_of(*run).is_some_and(|v| v != version && (!Run::of(run).finished() || !kept.contains(&v)))
        })
        .map(ResourceExt::name_any)
        .collect()
}

/// The version label of an object a Job owns.
pub fn version_of<K: Resource>(object: &K) -> Option<i64> {
    object.meta().labels.as_ref()?.get(labels::VERSION)?.parse().ok()
}

/// Applies `plan`'s new runs and deletes its old ones.
pub async fn write(cx: &Context<State>, job: &Job, plan: &Plan) -> Result<(), Error> {
    let namespace = job.namespace().unwrap_or_default();
    for run in &plan.create {
        cx.leadership.ensure()?;
        apply_owned(&cx.client, run).await?;
    }
    for name in &plan.delete {
        cx.leadership.ensure()?;
        delete_owned::<BatchJob>(&cx.client, &namespace, name).await?;
    }
    Ok(())
}

/// Where a run (a batch/v1 Job) is, from its status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Run {
    /// No pod runs yet.
    Pending,
    Running,
    /// Its Complete condition.
    Complete,
    /// Its Failed condition: the backoff limit (or a deadline) ran out.
    Failed,
}

impl Run {
    pub fn of(run: &BatchJob) -> Self {
        let status = run.status.as_ref();
        let condition = |type_: &str| {
            status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
        };
        if condition("Complete") {
            Self::Complete
        } else if condition("Failed") {
            Self::Failed
        } else if status.and_then(|s| s.active).unwrap_or(0) > 0 {
            Self::Running
        } else {
            Self::Pending
        }
    }

    pub fn finished(self) -> bool {
        matches!(self, Self::Complete | Self::Failed)
    }

    /// As `ChildRun.status` says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Complete => "complete",
            Self::Failed => "failed",
        }
    }
}

/// The job's phase from its groups' runs: failed as soon as one failed, complete when
/// all completed, running while one runs.
pub fn phase(runs: &[Option<Run>]) -> Phase {
    if runs.contains(&Some(Run::Failed)) {
        Phase::Failed
    } else if !runs.is_empty() && runs.iter().all(|r| *r == Some(Run::Complete)) {
        Phase::Complete
    } else if runs
        .iter()
        .any(|r| matches!(r, Some(Run::Running | Run::Complete)))
    {
        Phase::Running
    } else {
        Phase::Pending
    }
}

/// The objects of kind `K` in the Job's namespace with its label whose controller is the
/// Job itself (a periodic launch carries the label but is its CronJob's).
pub async fn owned<K>(cx: &Context<State>, job: &Job) -> Result<Vec<K>, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
{
    let uid = job.uid();
    Ok(labelled::<K>(cx, job)
        .await?
        .into_iter()
        .filter(|o| {
            o.owner_references()
                .iter()
                .any(|r| r.controller == Some(true) && Some(&r.uid) == uid.as_ref())
        })
        .collect())
}

/// The objects of kind `K` in the Job's namespace with its label.
pub async fn labelled<K>(cx: &Context<State>, job: &Job) -> Result<Vec<K>, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
{
    let namespace = job.namespace().unwrap_or_default();
    let selector = format!("{}={}", labels::JOB, job.name_any());
    Api::<K>::namespaced(cx.client.clone(), &namespace)
        .list(&ListParams::default().labels(&selector))
        .await
        .map(|list| list.items)
        .map_err(|source| Error::Kube {
            action: "listing",
            kind: K::kind(&()).into_owned(),
            name: selector,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus as BatchStatus};
    use std::collections::BTreeMap;

    fn run(name: &str, version: i64, state: Run) -> BatchJob {
        let mut run = BatchJob::default();
        run.metadata.name = Some(name.to_owned());
        run.metadata.labels = Some(BTreeMap::from([(
            labels::VERSION.to_owned(),
            version.to_string(),
        )]));
        let condition = |type_: &str| {
            Some(vec![JobCondition {
                type_: type_.to_owned(),
                status: "True".to_owned(),
                ..JobCondition::default()
            }])
        };
        run.status = Some(match state {
            Run::Pending => BatchStatus::default(),
            Run::Running => BatchStatus {
                active: Some(1),
                ..BatchStatus::default()
            },
            Run::Complete => BatchStatus {
                conditions: condition("Complete"),
                ..BatchStatus::default()
            },
            Run::Failed => BatchStatus {
                conditions: condition("Failed"),
                ..BatchStatus::default()
            },
        });
        run
    }

    #[test]
    fn a_run_is_read_from_its_status() {
        for state in [Run::Pending, Run::Running, Run::Complete, Run::Failed] {
            assert_eq!(Run::of(&run("r", 1, state)), state);
        }
    }

    #[test]
    fn missing_runs_are_created_once() {
        let wanted = [run("etl-a-v2", 2, Run::Pending), run("etl-b-v2", 2, Run::Pending)];
        let existing = [run("etl-a-v2", 2, Run::Running)];
        let plan = plan(&wanted, &existing, 2);
        assert_eq!(
            plan.create.iter().map(|r| r.name_any()).collect::<Vec<_>>(),
            ["etl-b-v2"]
        );
        assert!(plan.delete.is_empty());
        assert_eq!(
            super::plan(&wanted, &[wanted[0].clone(), wanted[1].clone()], 2),
            Plan::default()
        );
    }

    #[test]
    fn a_new_version_replaces_unfinished_runs_and_keeps_finished_ones_as_history() {
        let existing = [
            run("etl-a-v1", 1, Run::Complete),
            run("etl-a-v2", 2, Run::Failed),
            run("etl-a-v3", 3, Run::Complete),
            run("etl-a-v4", 4, Run::Complete),
            run("etl-a-v5", 5, Run::Running),
            run("etl-a-v6", 6, Run::Running),
        ];
        let mut deleted = prune(&existing, 6);
        deleted.sort();
        // v5 is unfinished; of the finished, v2-v4 are the newest three older versions.
        assert_eq!(deleted, ["etl-a-v1", "etl-a-v5"]);
    }

    #[test]
    fn the_phase_follows_the_runs() {
        use Run::*;
        assert_eq!(phase(&[None, None]), Phase::Pending);
        assert_eq!(phase(&[Some(Pending), None]), Phase::Pending);
        assert_eq!(phase(&[Some(Running), None]), Phase::Running);
        assert_eq!(phase(&[Some(Complete), Some(Running)]), Phase::Running);
        assert_eq!(phase(&[Some(Complete), Some(Complete)]), Phase::Complete);
        assert_eq!(phase(&[Some(Complete), Some(Failed)]), Phase::Failed);
        assert_eq!(phase(&[Some(Running), Some(Failed)]), Phase::Failed);
    }

    /// Against a mock API server: version 2 lists the job's runs, applies its missing run
    /// under the reconciler's field manager and deletes version 1's unfinished one.
    #[tokio::test]
    async fn a_new_version_applies_its_run_and_deletes_the_old_unfinished_one() {
        use crate::mock;
        use http::Method;
        use kube::runtime::reflector;
        use serde_json::json;

        let (base, mut server) = mock::context();
        let (jobs, _) = reflector::store();
        let (pods, _) = reflector::store();
        let (replica_sets, _) = reflector::store();
        let (nodes, _) = reflector::store();
        let cx = base.with(State::new(
            jobs,
            pods,
            replica_sets,
            nodes,
            compile::Settings::default(),
        ));
        let spec = json!({"type": "batch", "groups": [{"name": "load", "count": 2, "tasks": [{"name": "t", "image": "i"}]}]});
        let mut job = Job::new("etl", serde_json::from_value(spec).unwrap());
        job.metadata.namespace = Some("demo".into());
        job.metadata.uid = Some("uid-1".into());
        let mut old = run("etl-load-v1", 1, Run::Running);
        old.metadata.owner_references = Some(vec![compile::owner_reference(&job)]);

        let reconcile = async { apply(&cx, &job, 2).await.unwrap() };
        let server_side = async {
            let list = server
                .expect(
                    Method::GET,
                    "/apis/batch/v1/namespaces/demo/jobs",
                    200,
                    json!({"apiVersion": "batch/v1", "kind": "JobList", "metadata": {}, "items": [old]}),
                )
                .await;
            assert_eq!(list.query["labelSelector"], "jobs.capstan.dev%2Fjob%3Detl");
            let applied = server
                .expect(
                    Method::PATCH,
                    "/apis/batch/v1/namespaces/demo/jobs/etl-load-v2",
                    200,
                    json!({}),
                )
                .await;
            assert_eq!(applied.query["fieldManager"], "capstan-controller-jobs");
            assert_eq!(applied.body["spec"]["completions"], 2);
            assert_eq!(
                applied.body["metadata"]["labels"]["jobs.capstan.dev/version"],
                "2"
            );
            assert_eq!(applied.body["metadata"]["ownerReferences"][0]["uid"], "uid-1");
            server
                .expect(
                    Method::DELETE,
                    "/apis/batch/v1/namespaces/demo/jobs/etl-load-v1",
                    200,
                    json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}),
                )
                .await;
            server
        };
        let (report, server) = tokio::join!(reconcile, server_side);
        assert_eq!(report.phase, Phase::Pending, "the new run has not started");
        assert_eq!(report.desired, 2);
        server.done().await;
    }
}
