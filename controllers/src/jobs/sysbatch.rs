//! Sysbatch jobs: each group runs once on every eligible node, as one batch/v1 Job per
//! (group, node) of the version (`compile::sysbatch_job`, pinned to the node by name and
//! annotated with it). Kubernetes has no such kind; the runs' own status says how far
//! the job is.
//!
//! Nodes joining and leaving, as in Nomad (which places a sysbatch job on new eligible
//! nodes while it runs, and not once it is dead):
//!
//! - While the version is not complete (it has no run yet, or one of its runs has not
//!   finished), a node that becomes eligible gets its run on the next reconcile (the
//!   node watch wakes sysbatch jobs). Once every run has finished (or is lost), the
//!   version is complete and a node that joins later runs nothing until a new version.
//! - A run whose node left (gone, or not Ready) before the run finished is reported
//!   `lost` and counts as done; its batch/v1 Job is kept, so a node that comes back
//!   finishes it. A run on a node that is still there but no longer eligible (relabelled,
//!   cordoned) is left to finish, as a DaemonSet leaves a pod whose node changed.
//! - A new version runs anew on every eligible node; the older versions' runs are pruned
//!   as batch runs are (`batch::prune`).

use super::{
    Error, Phase, Report, State,
    batch::{self, Run},
};
use crate::context::Context;
use capstan_crds::jobs::{GroupSummary, Job};
use capstan_jobs::compile::{self, labels};
use k8s_openapi::api::batch::v1::Job as BatchJob;
use kube::{ResourceExt, runtime::reflector::ObjectRef};
use std::collections::{BTreeMap, BTreeSet};

/// Runs version `version` of the sysbatch job `job` on its eligible nodes and reports
/// each run.
pub async fn apply(cx: &Context<State>, job: &Job, version: i64) -> Result<Report, Error> {
    let nodes = cx.state.node_snapshot();
    let settings = &cx.state.settings;
    let groups = job
        .spec
        .groups
        .iter()
        .enumerate()
        .map(|(g, group)| {
            Ok((
                group.name.clone(),
                compile::eligible_nodes(job, g, &nodes, settings)?,
            ))
        })
        .collect::<Result<Vec<_>, compile::CompileError>>()?;
    let existing = batch::owned::<BatchJob>(cx, job).await?;
    let up = |node: &str| {
        cx.state
            .nodes
            .get(&ObjectRef::new(node))
            .is_some_and(|n| super::status::ready_node(&n))
    };
    let plan = plan(&groups, &existing, version, up);
    let create = plan
        .create
        .iter()
        .map(|(g, node)| compile::sysbatch_job(job, *g, version, node, &nodes, settings))
        .collect::<Result<Vec<_>, _>>()?;
    batch::write(
        cx,
        job,
        &batch::Plan {
            create,
            delete: plan.delete.clone(),
        },
    )
    .await?;
    let datacenter = |node: &str| nodes.datacenter(node, settings).unwrap_or_default().to_owned();
    Ok(report(&groups, &plan, datacenter))
}

/// One run of the version, as found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub group: String,
    pub node: String,
    pub run: Run,
    /// Unfinished while its node is gone or not Ready.
    pub lost: bool,
    /// Its pod is Ready.
    pub ready: bool,
}

impl Found {
    fn done(&self) -> bool {
        self.lost || self.run.finished()
    }
}

/// What to do, and what there is.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// (group index, node) to create a run for.
    pub create: Vec<(usize, String)>,
    pub delete: Vec<String>,
    /// The version's runs that exist.
    pub found: Vec<Found>,
}

/// For `groups` (name, eligible nodes), the version's runs among `existing` and the runs
/// to create (while the version is not complete) and delete (other versions', as
/// `batch::prune` says). `up` says whether a node is there and Ready.
pub fn plan(
    groups: &[(String, Vec<String>)],
    existing: &[BatchJob],
    version: i64,
    up: impl Fn(&str) -> bool,
) -> Plan {
    let found: Vec<Found> = existing
        .iter()
        .filter(|run| batch::version_of(*run) == Some(version))
        .filter_map(|run| {
            let group = run.labels().get(labels::GROUP)?.clone();
            let node = run.annotations().get(labels::NODE)?.clone();
            let state = Run::of(run);
            Some(Found {
                lost: !state.finished() && !up(&node),
                ready: run.status.as_ref().and_then(|s| s.ready).unwrap_or(0) > 0,
                group,
                node,
                run: state,
            })
        })
        .collect();
    let complete = !found.is_empty() && found.iter().all(Found::done);
    let placed: BTreeSet<(&str, &str)> = found
        .iter()
        .map(|f| (f.group.as_str(), f.node.as_str()))
        .collect();
    let create = if complete {
        Vec::new()
    } else {
        groups
            .iter()
            .enumerate()
            .flat_map(|(g, (group, eligible))| {
                eligible
                    .iter()
                    .filter(|node| !placed.contains(&(group.as_str(), node.as_str())))
                    .map(move |node| (g, node.clone()))
            })
            .collect()
    };
    Plan {
        create,
        delete: batch::prune(existing, version),
        found,
    }
}

/// The status: one allocation desired per run (found or created now), per group and the
/// datacenter of its node.
pub fn report(groups: &[(String, Vec<String>)], plan: &Plan, datacenter: impl Fn(&str) -> String) -> Report {
    let mut rows: BTreeMap<(usize, String), GroupSummary> = BTreeMap::new();
    let index = |group: &str| {
        groups
            .iter()
            .position(|(g, _)| g == group)
            .unwrap_or(groups.len())
    };
    let mut add = |group: &str, node: &str, f: &dyn Fn(&mut GroupSummary)| {
        let dc = datacenter(node);
        let entry = rows
            .entry((index(group), dc.clone()))
            .or_insert_with(|| GroupSummary {
                group: group.to_owned(),
                datacenter: dc,
                ..GroupSummary::default()
            });
        f(entry);
    };
    for found in &plan.found {
        add(&found.group, &found.node, &|r: &mut GroupSummary| {
            r.desired += 1;
            match (found.lost, found.run) {
                (true, _) => r.lost += 1,
                (false, Run::Running) => {
                    r.placed += 1;
                    r.running += 1;
                    if found.ready {
                        r.healthy += 1;
                    } else {
                        r.unhealthy += 1;
                    }
                }
                (false, Run::Complete) => r.complete += 1,
                (false, Run::Failed) => r.failed += 1,
                (false, Run::Pending) => {}
            }
        });
    }
    for (g, node) in &plan.create {
        add(&groups[*g].0, node, &|r: &mut GroupSummary| r.desired += 1);
    }
    let summary: Vec<GroupSummary> = rows.into_values().collect();
    let (desired, running) = super::status::totals(&summary);
    Report {
        phase: phase(plan),
        desired,
        running,
        summary,
        ..Report::default()
    }
}

/// Pending until a run exists; running while one has not finished; then complete, or
/// failed if a run failed (lost runs fail nothing: their node went away).
pub fn phase(plan: &Plan) -> Phase {
    if plan.found.is_empty() {
        Phase::Pending
    } else if plan.found.iter().all(Found::done) && plan.create.is_empty() {
        if plan.found.iter().any(|f| !f.lost && f.run == Run::Failed) {
            Phase::Failed
        } else {
            Phase::Complete
        }
    } else if plan.found.iter().any(|f| !f.lost && f.run != Run::Pending) {
        Phase::Running
    } else {
        Phase::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus as BatchStatus};

    fn run(group: &str, node: &str, version: i64, state: Run) -> BatchJob {
        let mut run = BatchJob::default();
        run.metadata.name = Some(compile::names::sysbatch_job("gc", group, version, node));
        run.metadata.labels = Some(BTreeMap::from([
            (labels::GROUP.to_owned(), group.to_owned()),
            (labels::VERSION.to_owned(), version.to_string()),
        ]));
        run.metadata.annotations = Some(BTreeMap::from([(labels::NODE.to_owned(), node.to_owned())]));
        let finished = |type_: &str| BatchStatus {
            conditions: Some(vec![JobCondition {
                type_: type_.to_owned(),
                status: "True".to_owned(),
                ..JobCondition::default()
            }]),
            ..BatchStatus::default()
        };
        run.status = Some(match state {
            Run::Pending => BatchStatus::default(),
            Run::Running => BatchStatus {
                active: Some(1),
                ready: Some(1),
                ..BatchStatus::default()
            },
            Run::Complete => finished("Complete"),
            Run::Failed => finished("Failed"),
        });
        run
    }

    fn groups(nodes: &[&str]) -> Vec<(String, Vec<String>)> {
        vec![(
            "sweep".to_owned(),
            nodes.iter().map(|n| (*n).to_owned()).collect(),
        )]
    }

    fn created(plan: &Plan) -> Vec<&str> {
        plan.create.iter().map(|(_, n)| n.as_str()).collect()
    }

    #[test]
    fn every_eligible_node_gets_one_run() {
        let plan = plan(&groups(&["a", "b"]), &[], 1, |_| true);
        assert_eq!(created(&plan), ["a", "b"]);
        assert_eq!(phase(&plan), Phase::Pending);
        let existing = [
            run("sweep", "a", 1, Run::Running),
            run("sweep", "b", 1, Run::Pending),
        ];
        let plan = super::plan(&groups(&["a", "b"]), &existing, 1, |_| true);
        assert!(plan.create.is_empty(), "one run per node, never a second");
        assert_eq!(phase(&plan), Phase::Running);
    }

    #[test]
    fn a_node_joining_a_running_version_gets_its_run_but_not_once_it_completed() {
        let running = [
            run("sweep", "a", 1, Run::Complete),
            run("sweep", "b", 1, Run::Running),
        ];
        let plan = plan(&groups(&["a", "b", "c"]), &running, 1, |_| true);
        assert_eq!(created(&plan), ["c"]);
        let done = [
            run("sweep", "a", 1, Run::Complete),
            run("sweep", "b", 1, Run::Complete),
        ];
        let plan = super::plan(&groups(&["a", "b", "c"]), &done, 1, |_| true);
        assert!(
            plan.create.is_empty(),
            "the version is complete: c waits for a new version"
        );
        assert_eq!(phase(&plan), Phase::Complete);
    }

    #[test]
    fn a_run_whose_node_left_is_lost_and_done() {
        let existing = [
            run("sweep", "a", 1, Run::Complete),
            run("sweep", "b", 1, Run::Running),
        ];
        let plan = plan(&groups(&["a"]), &existing, 1, |n| n != "b");
        assert!(plan.found.iter().any(|f| f.node == "b" && f.lost));
        assert_eq!(phase(&plan), Phase::Complete, "lost runs fail nothing");
        let report = report(&groups(&["a"]), &plan, |n| {
            if n == "a" { "eu" } else { "us" }.to_owned()
        });
        let rows: Vec<_> = report
            .summary
            .iter()
            .map(|r| (r.datacenter.as_str(), r.desired, r.running, r.complete, r.lost))
            .collect();
        assert_eq!(rows, [("eu", 1, 0, 1, 0), ("us", 1, 0, 0, 1)]);
        assert_eq!((report.desired, report.running), (2, 0));
    }

    #[test]
    fn a_failed_run_fails_the_job_once_all_are_done() {
        let existing = [
            run("sweep", "a", 1, Run::Failed),
            run("sweep", "b", 1, Run::Running),
        ];
        let plan = plan(&groups(&["a", "b"]), &existing, 1, |_| true);
        assert_eq!(phase(&plan), Phase::Running);
        let existing = [
            run("sweep", "a", 1, Run::Failed),
            run("sweep", "b", 1, Run::Complete),
        ];
        let plan = super::plan(&groups(&["a", "b"]), &existing, 1, |_| true);
        assert_eq!(phase(&plan), Phase::Failed);
    }

    #[test]
    fn a_new_version_runs_anew_and_prunes_the_old_unfinished_runs() {
        let existing = [
            run("sweep", "a", 1, Run::Complete),
            run("sweep", "b", 1, Run::Running),
        ];
        let plan = plan(&groups(&["a", "b"]), &existing, 2, |_| true);
        assert_eq!(created(&plan), ["a", "b"]);
        assert_eq!(plan.delete, [compile::names::sysbatch_job("gc", "sweep", 1, "b")]);
        let report = report(&groups(&["a", "b"]), &plan, |_| "eu".to_owned());
        assert_eq!(
            (report.desired, report.running, report.phase),
            (2, 0, Phase::Pending)
        );
    }

    /// Against a mock API server: one run is applied per eligible node (Ready, in the
    /// job's datacenter), pinned to it and annotated with its name.
    #[tokio::test]
    async fn each_eligible_node_gets_its_run_applied() {
        use crate::mock;
        use http::Method;
        use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeStatus};
        use kube::runtime::{reflector, watcher::Event};
        use serde_json::json;

        let (base, mut server) = mock::context();
        let (nodes, mut writer) = reflector::store();
        for (name, region, ready) in [("n1", "dc1", true), ("n2", "dc1", false), ("n3", "dc2", true)] {
            let mut node = Node::default();
            node.metadata.name = Some(name.into());
            node.metadata.labels = Some(BTreeMap::from([(
                "topology.kubernetes.io/region".to_owned(),
                region.to_owned(),
            )]));
            node.status = Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            });
            writer.apply_watcher_event(&Event::Apply(node));
        }
        let (jobs, _) = reflector::store();
        let (pods, _) = reflector::store();
        let (replica_sets, _) = reflector::store();
        let cx = base.with(State::new(
            jobs,
            pods,
            replica_sets,
            nodes,
            compile::Settings::default(),
        ));
        let spec = json!({"type": "sysbatch", "datacenters": ["dc1"],
            "groups": [{"name": "sweep", "tasks": [{"name": "t", "image": "i"}]}]});
        let mut job = Job::new("gc", serde_json::from_value(spec).unwrap());
        job.metadata.namespace = Some("demo".into());
        job.metadata.uid = Some("uid-1".into());

        let reconcile = async { apply(&cx, &job, 1).await.unwrap() };
        let server_side = async {
            let empty = json!({"apiVersion": "batch/v1", "kind": "JobList", "metadata": {}, "items": []});
            server
                .expect(Method::GET, "/apis/batch/v1/namespaces/demo/jobs", 200, empty)
                .await;
            let name = compile::names::sysbatch_job("gc", "sweep", 1, "n1");
            let path = format!("/apis/batch/v1/namespaces/demo/jobs/{name}");
            let applied = server.expect(Method::PATCH, &path, 200, json!({})).await;
            assert_eq!(applied.body["metadata"]["annotations"][labels::NODE], "n1");
            assert_eq!(applied.body["spec"]["completions"], 1);
            server
        };
        let (report, server) = tokio::join!(reconcile, server_side);
        assert_eq!(
            (report.phase, report.desired),
            (Phase::Pending, 1),
            "n2 is not Ready, n3 not in dc1"
        );
        assert_eq!(report.summary[0].datacenter, "dc1");
        server.done().await;
    }
}
