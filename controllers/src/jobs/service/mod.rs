//! Service jobs: each group's pod sets run as ReplicaSets the reconciler scales itself
//! (`plan`: Nomad's update block, pure), with the pods' health judged by `health`.
//!
//! A reconcile observes (the job's ReplicaSets and pods from the reflector stores),
//! plans, records a deployment decision in status before acting on it (promoted,
//! failed, reverted, succeeded: a controller stopped in between resumes from the
//! decision rather than deciding again), then writes: ReplicaSets of the version to run
//! by server-side apply (skipped when the one in the cluster already has the same
//! content, recorded in an annotation), other ReplicaSets scaled by a patch of their
//! replicas, empty ones deleted, and the groups' Services.

mod health;
mod plan;

use super::{Error, Phase, Ready, Report, State, reasons, report, revisions, status};
use crate::context::Context;
use capstan_crds::{
    ConditionStatus,
    jobs::{DeploymentStatus, GroupSummary, Job, JobSpec},
};
use capstan_jobs::compile::{self, PodSet, labels, names};
use health::{Health, PodHealth};
use k8s_openapi::{
    api::{
        apps::v1::ReplicaSet,
        core::v1::{Pod, Service},
    },
    jiff::Timestamp,
};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
};
use plan::{Input, state};
use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

/// On each ReplicaSet the reconciler applied: the hash of what it applied, so an
/// unchanged one is not written again on every reconcile.
const APPLIED: &str = "jobs.capstan.dev/applied-hash";

/// What a service job's version compiles to, with what is observed of it.
struct Compiled {
    groups: Vec<plan::Group>,
    /// Each group's pod sets, in the order of `groups`.
    sets: Vec<Vec<PodSet>>,
}

pub async fn apply(cx: &Context<State>, job: &Job, version: i64) -> Result<Report, Error> {
    let now = Timestamp::now();
    let state = &cx.state;
    let status = job.status.as_ref();
    let previous = status.and_then(|s| s.deployment.as_ref());
    let stable = status.and_then(|s| s.stable_version);
    let pods = state.pods_of(job);
    let owned = owned_replica_sets(state, job);
    let nodes = state.node_snapshot();

    // What runs: the newest version, or the stable one a failed deployment went back to.
    let mut running = plan::reverted_to(previous, version).unwrap_or(version);
    let mut run_job = spec_of(cx, job, version, running).await?;
    let mut compiled = compile(&run_job, running, &nodes, &state.settings, &owned, &pods, now)?;
    let input = Input {
        now,
        version,
        stable,
        promote: job.spec.promote,
        previous,
        groups: &compiled.groups,
    };
    let mut plan = plan::plan(&input);
    let decided = previous != Some(&plan.deployment)
        && previous.is_none_or(|p| {
            p.version != plan.deployment.version
                || p.status != plan.deployment.status
                || p.promoted != plan.deployment.promoted
        });
    // The Events of a decision go out with its record: the status written at the end
    // may then change nothing more.
    let mut events = Vec::new();
    if decided {
        status::record_deployment(job, cx, &plan.deployment).await?;
        status::publish(job, cx, &plan.events).await;
        count(cx, previous, &plan.deployment);
    } else {
        events = std::mem::take(&mut plan.events);
    }
    if let Some(revert_to) = plan.reverts_to() {
        running = revert_to;
        run_job = spec_of(cx, job, version, running).await?;
        compiled = compile(&run_job, running, &nodes, &state.settings, &owned, &pods, now)?;
        let restored = plan::restore(
            &Input {
                now,
                version,
                stable,
                promote: job.spec.promote,
                previous,
                groups: &compiled.groups,
            },
            plan.deployment.clone(),
        );
        plan = restored;
    }
    // Marked until the status says it (a mark that failed is made again).
    let mut stable_version = None;
    if plan.deployment.status == state::SUCCESSFUL
        && plan.deployment.version == version
        && stable != Some(version)
    {
        revisions::mark_stable(&cx.client, job, version, stable).await?;
        stable_version = Some(version);
    }

    write_replica_sets(cx, &run_job, running, &compiled, &owned, &plan).await?;
    write_services(cx, job, &run_job).await?;

    let desired: Vec<(String, i32)> = run_job
        .spec
        .groups
        .iter()
        .map(|g| (g.name.clone(), g.count))
        .collect();
    let updates: HashMap<&str, &compile::Update> = compiled
        .groups
        .iter()
        .map(|g| (g.name.as_str(), &g.update))
        .collect();
    let (summary, desired, running_pods) = state.summary(&desired, &pods, |pod| {
        pod.labels()
            .get(labels::GROUP)
            .and_then(|g| updates.get(g.as_str()))
            .and_then(|u| health::judge(pod, u, now))
            .is_some_and(|h| matches!(h, PodHealth::Healthy { .. }))
    });
    let (phase, ready) = verdict(&plan.deployment, desired, &summary);
    Ok(Report {
        phase,
        desired,
        running: running_pods,
        summary,
        children: Vec::new(),
        deployment: Some(plan.deployment),
        running_version: Some(running),
        stable_version,
        ready: Some(ready),
        events,
        requeue: plan.wake.map(|at| until(now, at)),
    })
}

/// Counts the deployment's decisions in `jobs_deployments`.
fn count(cx: &Context<State>, previous: Option<&DeploymentStatus>, next: &DeploymentStatus) {
    let metrics = &cx.metrics.jobs;
    let same = previous.filter(|p| p.version == next.version);
    if same.is_none() {
        metrics.deployment("started");
    }
    if next.promoted && !same.is_some_and(|p| p.promoted) {
        metrics.deployment("promoted");
    }
    if same.is_none_or(|p| p.status != next.status)
        && matches!(
            next.status.as_str(),
            state::SUCCESSFUL | state::FAILED | state::REVERTED
        )
    {
        metrics.deployment(match next.status.as_str() {
            state::SUCCESSFUL => "successful",
            state::FAILED => "failed",
            _ => "reverted",
        });
    }
}

/// The phase and Ready condition from the deployment and the summary.
fn verdict(deployment: &DeploymentStatus, desired: i32, summary: &[GroupSummary]) -> (Phase, Ready) {
    let healthy: i32 = summary.iter().map(|r| r.healthy).sum();
    let running: i32 = summary.iter().map(|r| r.running).sum();
    let description = deployment.description.clone().unwrap_or_default();
    let version = deployment.version;
    let (phase, status, reason, message) = match deployment.status.as_str() {
        state::FAILED => (
            Phase::Failed,
            ConditionStatus::False,
            reasons::DEPLOYMENT_FAILED,
            format!("deployment of version {version} failed: {description}"),
        ),
        state::REVERTED => (
            if running > 0 {
                Phase::Running
            } else {
                Phase::Pending
            },
            ConditionStatus::False,
            reasons::DEPLOYMENT_REVERTED,
            format!("deployment of version {version} failed; {description}"),
        ),
        state::PAUSED => (
            Phase::Deploying,
            ConditionStatus::False,
            reasons::AWAITING_PROMOTION,
            format!(
                "version {version}: {} of {} canaries healthy; promote with `capstan job promote` (spec.promote: {version})",
                deployment.canaries_healthy, deployment.canaries_desired
            ),
        ),
        state::RUNNING => (
            Phase::Deploying,
            ConditionStatus::False,
            reasons::DEPLOYING,
            format!("deploying version {version}: {healthy} of {desired} allocations healthy"),
        ),
        _ if running == 0 && desired > 0 => (
            Phase::Pending,
            ConditionStatus::False,
            reasons::PENDING,
            format!("0 of {desired} allocations running"),
        ),
        _ => (
            Phase::Running,
            ConditionStatus::True,
            reasons::RUNNING,
            format!("version {version}: {healthy} of {desired} allocations healthy"),
        ),
    };
    (
        phase,
        Ready {
            status,
            reason,
            message,
        },
    )
}

/// How long until `at` (a little after, so that the instant has passed).
fn until(now: Timestamp, at: Timestamp) -> Duration {
    let wait = Duration::try_from(at.duration_since(now)).unwrap_or_default();
    wait + Duration::from_millis(100)
}

/// The spec of `running`: the Job's own when it is the newest version, the stored one
/// otherwise.
async fn spec_of<'a>(
    cx: &Context<State>,
    job: &'a Job,
    version: i64,
    running: i64,
) -> Result<Cow<'a, Job>, Error> {
    if running == version {
        return Ok(Cow::Borrowed(job));
    }
    let spec: JobSpec = revisions::spec(&cx.client, job, running).await?;
    let mut stable = job.clone();
    stable.spec = spec;
    Ok(Cow::Owned(stable))
}

/// The ReplicaSets the job owns (by owner uid: a namesake's, not yet collected, are
/// not its).
fn owned_replica_sets(state: &State, job: &Job) -> Vec<Arc<ReplicaSet>> {
    let (namespace, uid) = (job.namespace(), job.uid());
    state.replica_sets.state_filter(|rs| {
        rs.metadata.namespace == namespace
            && rs
                .owner_references()
                .iter()
                .any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref())
    })
}

/// Compiles `job` at `version` into the plan's groups, with what is observed of each.
fn compile(
    job: &Job,
    version: i64,
    nodes: &compile::Nodes,
    settings: &compile::Settings,
    owned: &[Arc<ReplicaSet>],
    pods: &[Arc<Pod>],
    now: Timestamp,
) -> Result<Compiled, compile::CompileError> {
    let job_name = job.name_any();
    let mut by_owner: HashMap<&str, Vec<&Pod>> = HashMap::new();
    for pod in pods {
        if let Some(owner) = pod
            .owner_references()
            .iter()
            .find(|o| o.kind == "ReplicaSet" && o.controller == Some(true))
        {
            by_owner.entry(owner.name.as_str()).or_default().push(pod);
        }
    }
    let mut compiled = Compiled {
        groups: Vec::new(),
        sets: Vec::new(),
    };
    for (index, group) in job.spec.groups.iter().enumerate() {
        let update = compile::update(job, index)?;
        let sets = compile::pod_sets(job, index, version, nodes, settings)?;
        let counts = compile::split(group.count, &sets);
        let canaries = compile::split(update.canary.min(group.count), &sets);
        let observed = owned
            .iter()
            .filter(|rs| rs.labels().get(labels::GROUP) == Some(&group.name))
            .map(|rs| {
                let name = rs.name_any();
                let health = Health::of(
                    by_owner.get(name.as_str()).into_iter().flatten().copied(),
                    &update,
                    now,
                );
                plan::Observed {
                    version: version_of(rs),
                    replicas: rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
                    name,
                    health,
                }
            })
            .collect();
        compiled.groups.push(plan::Group {
            name: group.name.clone(),
            sets: sets
                .iter()
                .zip(counts)
                .zip(canaries)
                .map(|((set, count), canaries)| plan::Set {
                    name: names::replica_set(&job_name, &group.name, &set.hash),
                    count,
                    canaries,
                })
                .collect(),
            update,
            observed,
        });
        compiled.sets.push(sets);
    }
    Ok(compiled)
}

fn version_of(rs: &ReplicaSet) -> i64 {
    rs.labels()
        .get(labels::VERSION)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Applies the plan's replicas: the wanted ReplicaSets by server-side apply (unless
/// unchanged), the others by a patch of their replicas; deletes the empty ones no
/// longer wanted and those of groups the spec no longer has.
async fn write_replica_sets(
    cx: &Context<State>,
    job: &Job,
    version: i64,
    compiled: &Compiled,
    owned: &[Arc<ReplicaSet>],
    plan: &plan::Plan,
) -> Result<(), Error> {
    let client = &cx.client;
    let namespace = job.namespace().unwrap_or_default();
    let existing: HashMap<String, &ReplicaSet> =
        owned.iter().map(|rs| (rs.name_any(), rs.as_ref())).collect();
    let mut wanted = Vec::new();
    for (index, (group, sets)) in compiled.groups.iter().zip(&compiled.sets).enumerate() {
        for (set, pod_set) in group.sets.iter().zip(sets) {
            wanted.push(set.name.clone());
            let replicas = plan.replicas.get(&set.name).copied().unwrap_or(0);
            let current = existing.get(&set.name);
            if current.is_none() && replicas == 0 {
                continue;
            }
            let mut rs = compile::replica_set(job, index, pod_set, replicas);
            // The version that created a ReplicaSet stays on it and its pods: a
            // count-only change scales it without relabelling.
            let created_by = current.map_or(version, |c| version_of(c));
            relabel(&mut rs, created_by);
            let hash = names::template_hash(&rs);
            if current.is_some_and(|c| {
                c.annotations().get(APPLIED) == Some(&hash)
                    && c.spec.as_ref().and_then(|s| s.replicas) == Some(replicas)
            }) {
                continue;
            }
            rs.metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(APPLIED.to_owned(), hash);
            report::apply_owned(client, &rs).await?;
        }
    }
    let api = Api::<ReplicaSet>::namespaced(client.clone(), &namespace);
    for (name, rs) in &existing {
        if wanted.contains(name) {
            continue;
        }
        let in_spec = rs
            .labels()
            .get(labels::GROUP)
            .is_some_and(|g| compiled.groups.iter().any(|c| &c.name == g));
        if !in_spec || plan.delete.contains(name) {
            report::delete_owned::<ReplicaSet>(client, &namespace, name).await?;
            continue;
        }
        let replicas = plan.replicas.get(name).copied().unwrap_or(0);
        if rs.spec.as_ref().and_then(|s| s.replicas) == Some(replicas) {
            continue;
        }
        let patch = serde_json::json!({"spec": {"replicas": replicas}});
        let params = PatchParams {
            field_manager: Some(super::MANAGER.to_owned()),
            ..PatchParams::default()
        };
        api.patch(name, &params, &Patch::Merge(&patch))
            .await
            .map_err(|source| Error::Kube {
                action: "scaling",
                kind: "ReplicaSet".into(),
                name: name.clone(),
                source,
            })?;
    }
    Ok(())
}

/// Sets the version label of a ReplicaSet and of its pod template.
fn relabel(rs: &mut ReplicaSet, version: i64) {
    let value = version.to_string();
    if let Some(l) = rs.metadata.labels.as_mut() {
        l.insert(labels::VERSION.to_owned(), value.clone());
    }
    if let Some(l) = rs
        .spec
        .as_mut()
        .and_then(|s| s.template.as_mut())
        .and_then(|t| t.metadata.as_mut())
        .and_then(|m| m.labels.as_mut())
    {
        l.insert(labels::VERSION.to_owned(), value);
    }
}

/// The groups' Services, applied; those of services the spec no longer names deleted
/// (looked for only when the spec changed).
async fn write_services(cx: &Context<State>, job: &Job, running: &Job) -> Result<(), Error> {
    let services = compile::services(running)?;
    for service in &services {
        report::apply_owned(&cx.client, service).await?;
    }
    let changed = job.status.as_ref().and_then(|s| s.observed_generation) != job.metadata.generation;
    if !changed {
        return Ok(());
    }
    let namespace = job.namespace().unwrap_or_default();
    for old in super::batch::owned::<Service>(cx, job).await? {
        let name = old.name_any();
        if !services
            .iter()
            .any(|s| s.metadata.name.as_deref() == Some(name.as_str()))
        {
            report::delete_owned::<Service>(&cx.client, &namespace, &name).await?;
        }
    }
    Ok(())
}
