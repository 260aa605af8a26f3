//! The jobs reconciler: runs each Job (jobs.capstan.dev) as the native objects
//! `capstan_jobs::compile` makes of it, and reports them in its status.
//!
//! Per reconcile: the spec's version (`revisions`: a new spec is a new
//! ControllerRevision), the PriorityClass its pods name (`priority`), then the job
//! type's `apply` (`service` rolls ReplicaSets itself; batch, periodic, dispatch, system
//! and sysbatch have their modules), whose [`report::Report`] `status` writes. Every
//! object a Job runs as is owned by it (the garbage collector removes them with it, so
//! there is no finalizer) and written by server-side apply under [`MANAGER`].
//!
//! Watches: Jobs; the ReplicaSets, batch Jobs, DaemonSets, CronJobs and
//! ControllerRevisions they own; their pods (label `jobs.capstan.dev/job`), mapped to
//! their Job; and Nodes, since placement, system and sysbatch jobs and the `lost` count
//! depend on them. Pods, ReplicaSets and Nodes are kept in reflector stores trimmed to
//! what the reconcile reads (the benchmark's 10,000 pods must fit in 200 MiB).

mod batch;
mod dispatch;
mod nodes;
mod periodic;
mod priority;
mod report;
mod revisions;
mod service;
mod status;
mod sysbatch;
mod system;
#[cfg(test)]
mod tests;

use crate::{
    context::Context,
    leader,
    reconciler::{self, AbortOnDrop, Class, Reconcile, ReconcileError},
    status::{self as status_writer, HasStatus},
};
use capstan_crds::jobs::{Job, JobStatus, JobType};
use capstan_jobs::compile::{self, labels};
use futures::{
    FutureExt, StreamExt, TryStreamExt,
    future::{BoxFuture, Shared},
};
use k8s_openapi::api::{
    apps::v1::{ControllerRevision, DaemonSet, ReplicaSet},
    batch::v1::{CronJob, Job as BatchJob},
    core::v1::{Node, Pod, PodSpec, PodStatus},
};
use kube::{
    Api, ResourceExt,
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        finalizer,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use parking_lot::RwLock;
use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    sync::Arc,
    time::Duration,
};

pub use report::{Note, Phase, Ready, Report};

const CONTROLLER: &str = "jobs";
/// The field manager of everything the reconciler writes.
pub const MANAGER: &str = compile::FIELD_MANAGER;

/// The reasons of the Ready condition and of the Events on a Job.
pub mod reasons {
    // Ready, from the phase.
    pub const PENDING: &str = "Pending";
    pub const RUNNING: &str = "Running";
    pub const DEPLOYING: &str = "Deploying";
    pub const COMPLETE: &str = "Complete";
    pub const FAILED: &str = "Failed";
    pub const DEAD: &str = "Dead";
    // Ready=False, and Events.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const DEPLOYMENT_FAILED: &str = "DeploymentFailed";
    pub const DEPLOYMENT_REVERTED: &str = "DeploymentReverted";
    // Events of a service job's deployment.
    pub const DEPLOYMENT_STARTED: &str = "DeploymentStarted";
    pub const CANARIES_PLACED: &str = "CanariesPlaced";
    pub const DEPLOYMENT_PROMOTED: &str = "DeploymentPromoted";
    pub const DEPLOYMENT_SUCCEEDED: &str = "DeploymentSucceeded";
    /// Ready=False while canaries wait for `capstan job promote`.
    pub const AWAITING_PROMOTION: &str = "AwaitingPromotion";
}

/// How long after a failed reconcile to look again (the API server could not answer).
const RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} {kind} {name}")]
    Kube {
        action: &'static str,
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    /// The spec has no Kubernetes form: reported as Ready=False InvalidSpec.
    #[error(transparent)]
    Compile(#[from] compile::CompileError),
    #[error("ControllerRevision {name} holds no Job spec")]
    Revision { name: String },
    /// The term is ending: the watches that fill the stores stopped before listing.
    #[error("the pod, ReplicaSet and node watches ended before their first list")]
    WatchesEnded,
    #[error(transparent)]
    Status(#[from] status_writer::Error),
    #[error(transparent)]
    Leader(#[from] leader::Error),
}

impl ReconcileError for Error {
    fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube { .. } => "kubernetes",
            Self::Compile(_) => "invalid_spec",
            Self::Revision { .. } => "revision",
            Self::WatchesEnded => "watches_ended",
            Self::Status(status_writer::Error::Leader(_)) | Self::Leader(_) => "not_leader",
            Self::Status(status_writer::Error::Contended { .. }) => "status_contended",
            Self::Status(_) => "status",
        }
    }

    fn class(&self) -> Class {
        match self {
            Self::Status(status_writer::Error::Leader(_)) | Self::Leader(_) => Class::NotLeader,
            Self::Compile(_) | Self::Revision { .. } => Class::Spec,
            _ => Class::Transient,
        }
    }

    fn finalizer(error: finalizer::Error<Self>) -> Self {
        // Jobs have no finalizer: only the reconcile's own error reaches here.
        match error {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
            other => unreachable!("Job has no finalizer: {other}"),
        }
    }
}

impl HasStatus for Job {
    type Status = JobStatus;

    fn status(&self) -> Option<&JobStatus> {
        self.status.as_ref()
    }
}

/// What the jobs reconciler keeps for a leadership term: the watched objects it reads
/// instead of asking the API server on every reconcile.
pub struct State {
    pub jobs: Store<Job>,
    /// Pods with the label `jobs.capstan.dev/job`, trimmed (`trim_pod`).
    pub pods: Store<Pod>,
    /// Which of those pods each Job has, so that a reconcile does not scan them all.
    pod_index: Arc<PodIndex>,
    /// ReplicaSets the reconciler made (service groups), without their pod templates.
    pub replica_sets: Store<ReplicaSet>,
    /// Every node, without its images.
    pub nodes: Store<Node>,
    pub settings: compile::Settings,
    /// Whether the pod, ReplicaSet and node stores have each been listed once, awaited by
    /// every reconcile: one future shared by all of them, because a store's own
    /// `wait_until_ready` keeps the waker of only the last reconcile that polled it (a
    /// oneshot receiver behind kube-runtime's DelayedInit), so of two reconciles waiting
    /// at a new leader's start one was never woken and its Job never reconciled again
    /// (e2e: a promote after a controller restart went unseen).
    listed: Shared<BoxFuture<'static, bool>>,
    /// The priorities whose PriorityClass this term has applied (`priority::ensure`),
    /// forgotten once per resync so that a class deleted by hand comes back.
    pub priorities_applied: parking_lot::Mutex<std::collections::BTreeSet<i32>>,
}

impl State {
    pub fn new(
        jobs: Store<Job>,
        pods: Store<Pod>,
        replica_sets: Store<ReplicaSet>,
        nodes: Store<Node>,
        settings: compile::Settings,
    ) -> Self {
        let listed = {
            let (pods, replica_sets, nodes) = (pods.clone(), replica_sets.clone(), nodes.clone());
            async move {
                let (pods, replica_sets, nodes) = tokio::join!(
                    pods.wait_until_ready(),
                    replica_sets.wait_until_ready(),
                    nodes.wait_until_ready(),
                );
                pods.and(replica_sets).and(nodes).is_ok()
            }
            .boxed()
            .shared()
        };
        Self {
            jobs,
            pods,
            pod_index: Arc::default(),
            replica_sets,
            nodes,
            settings,
            listed,
            priorities_applied: Default::default(),
        }
    }

    /// Waits until the pod, ReplicaSet and node stores have each been listed once: a
    /// reconcile before that (a new leader's first ones) would find no pods and no
    /// ReplicaSets, and place everything again beside what runs.
    async fn listed(&self) -> Result<(), Error> {
        if self.listed.clone().await {
            Ok(())
        } else {
            Err(Error::WatchesEnded)
        }
    }

    /// The pods of `job` (by its label, in its namespace).
    pub fn pods_of(&self, job: &Job) -> Vec<Arc<Pod>> {
        let (namespace, name) = (job.namespace().unwrap_or_default(), job.name_any());
        match self.pod_index.names(&namespace, &name) {
            Some(names) => names
                .iter()
                .filter_map(|pod| self.pods.get(&ObjectRef::new(pod).within(&namespace)))
                .collect(),
            // Not fed by a watch (a test's stores): look at every pod.
            None => self.pods.state_filter(|p| {
                p.metadata.namespace.as_deref() == Some(namespace.as_str())
                    && p.labels().get(labels::JOB) == Some(&name)
            }),
        }
    }

    /// The nodes as the compiler sees them.
    pub fn node_snapshot(&self) -> compile::Nodes {
        compile::Nodes::from_k8s(self.nodes.state().iter().map(|n| n.as_ref()))
    }
}

/// The names of each Job's pods by namespace and Job name, fed by the same watch as the
/// pod store (with the same relist semantics: a relist replaces it whole at its end).
#[derive(Default)]
struct PodIndex(RwLock<Index>);

#[derive(Default)]
struct Index {
    /// Whether a watch has listed the pods once (before, the index knows nothing).
    listed: bool,
    jobs: HashMap<(String, String), BTreeSet<String>>,
    /// A relist in progress.
    relist: Option<HashMap<(String, String), BTreeSet<String>>>,
}

impl PodIndex {
    fn names(&self, namespace: &str, job: &str) -> Option<Vec<String>> {
        let index = self.0.read();
        if !index.listed {
            return None;
        }
        let key = (namespace.to_owned(), job.to_owned());
        Some(
            index
                .jobs
                .get(&key)
                .map(|n| n.iter().cloned().collect())
                .unwrap_or_default(),
        )
    }

    fn apply(&self, event: &watcher::Event<Pod>) {
        let key = |pod: &Pod| Some((pod.namespace()?, pod.labels().get(labels::JOB)?.clone()));
        let mut index = self.0.write();
        match event {
            watcher::Event::Apply(pod) => {
                if let Some(k) = key(pod) {
                    index.jobs.entry(k).or_default().insert(pod.name_any());
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some(k) = key(pod)
                    && let Some(names) = index.jobs.get_mut(&k)
                {
                    names.remove(&pod.name_any());
                    if names.is_empty() {
                        index.jobs.remove(&k);
                    }
                }
            }
            watcher::Event::Init => index.relist = Some(HashMap::new()),
            watcher::Event::InitApply(pod) => {
                if let (Some(k), Some(relist)) = (key(pod), index.relist.as_mut()) {
                    relist.entry(k).or_default().insert(pod.name_any());
                }
            }
            watcher::Event::InitDone => {
                if let Some(relist) = index.relist.take() {
                    index.jobs = relist;
                    index.listed = true;
                }
            }
        }
    }
}

/// Runs the reconciler until `shutdown` resolves (in-flight reconciles finish first).
/// How long a Job's triggers are gathered into one reconcile.
const DEBOUNCE: Duration = Duration::from_millis(250);
/// Reconciles running at once (different Jobs; one Job is never reconciled twice at once).
const CONCURRENCY: u16 = 32;

pub async fn run(
    base: &Context,
    settings: compile::Settings,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = &base.client;
    let owned = || watcher::Config::default().labels(labels::JOB);

    let (pods, pod_writer) = reflector::store();
    let (replica_sets, rs_writer) = reflector::store();
    let rs_events = watcher(Api::<ReplicaSet>::all(client.clone()), owned())
        .default_backoff()
        .modify(trim_replica_set)
        .reflect(rs_writer)
        .touched_objects();
    let (nodes, node_writer) = reflector::store();
    // Kubelets (and kwok) rewrite node status all the time: only what placement and
    // the lost count read wakes the jobs (`nodes::changes`).
    let node_changes = nodes::changes(
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(trim_node)
            .reflect(node_writer),
    );

    let jobs_api = Api::<Job>::all(client.clone());
    // A Job's pods start, turn ready and stop in bursts, each event a trigger: a short
    // debounce folds a burst into one reconcile (the benchmark counted about 60 reconciles
    // for a 10-pod Job without it), and a bound on concurrent reconciles keeps a new
    // leader facing thousands of Jobs from holding them all in memory at once.
    let controller = Controller::new(jobs_api, watcher::Config::default().any_semantic()).with_config(
        kube::runtime::controller::Config::default()
            .debounce(DEBOUNCE)
            .concurrency(CONCURRENCY),
    );
    let jobs = controller.store();
    let (affected_jobs, affected_pods) = (jobs.clone(), pods.clone());
    let state = State::new(jobs, pods, replica_sets, nodes, settings);
    let pod_index = state.pod_index.clone();
    let pod_events = watcher(Api::<Pod>::all(client.clone()), owned())
        .default_backoff()
        .modify(trim_pod)
        .reflect(pod_writer)
        .inspect_ok(move |event| pod_index.apply(event))
        .touched_objects();
    let ctx = Arc::new(base.with(state));
    // Aborted with this future (the end of a leadership term aborts the whole task).
    let _collector = AbortOnDrop(tokio::spawn(priority::collect_unused(ctx.clone())));
    controller
        .owns_stream(rs_events)
        .owns(Api::<BatchJob>::all(client.clone()), owned())
        .owns(Api::<DaemonSet>::all(client.clone()), owned())
        .owns(Api::<CronJob>::all(client.clone()), owned())
        .owns(Api::<ControllerRevision>::all(client.clone()), owned())
        .watches_stream(pod_events, |pod: Pod| {
            let job = pod.labels().get(labels::JOB)?.clone();
            Some(ObjectRef::<Job>::new(&job).within(&pod.namespace()?))
        })
        // A dispatched child's change shows in its parent's list of children.
        .watches(
            Api::<Job>::all(client.clone()),
            watcher::Config::default().labels(labels::PARENT),
            |child: Job| dispatch::parent_of(&child),
        )
        .watches_stream(node_changes, move |node: Node| {
            nodes::affected(&affected_jobs, &affected_pods, &node)
        })
        .graceful_shutdown_on(shutdown)
        .run(reconciler::reconcile, reconciler::error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// Keeps of a pod what the reconciler reads: its metadata (no managed fields or
/// annotations), its node, and its phase, conditions and container states.
fn trim_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    pod.metadata.generate_name = None;
    let node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    pod.spec = Some(PodSpec {
        node_name,
        ..PodSpec::default()
    });
    if let Some(status) = pod.status.take() {
        pod.status = Some(PodStatus {
            phase: status.phase,
            // Ready is the only condition read (health, status); the others are the
            // kubelet's steps towards it.
            conditions: status
                .conditions
                .map(|cs| cs.into_iter().filter(|c| c.type_ == "Ready").collect()),
            container_statuses: status.container_statuses.map(|cs| {
                cs.into_iter()
                    .map(|mut c| {
                        c.image = String::new();
                        c.image_id = String::new();
                        c.container_id = None;
                        c.last_state = None;
                        c.resources = None;
                        c.volume_mounts = None;
                        c.allocated_resources = None;
                        c
                    })
                    .collect()
            }),
            start_time: status.start_time,
            ..PodStatus::default()
        });
    }
}

/// A ReplicaSet without its pod template and managed fields: the reconciler compiles
/// the template, and needs only the set's name, labels, annotations, owner and counts.
fn trim_replica_set(rs: &mut ReplicaSet) {
    rs.metadata.managed_fields = None;
    if let Some(spec) = rs.spec.as_mut() {
        spec.template = None;
    }
}

/// A node without its image list and managed fields.
fn trim_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    if let Some(status) = node.status.as_mut() {
        status.images = None;
    }
}

/// Runs version `version` of `job` as what its type and blocks make it.
async fn run_as_type(job: &Job, cx: &Context<State>, version: i64) -> Result<Report, Error> {
    if job.spec.dispatch.is_some() {
        return dispatch::child(cx, job, version).await;
    }
    if job.spec.periodic.is_some() {
        return periodic::apply(cx, job, version).await;
    }
    match job.spec.type_ {
        JobType::Service => service::apply(cx, job, version).await,
        JobType::Batch => batch::apply(cx, job, version).await,
        JobType::System => system::apply(cx, job, version).await,
        JobType::Sysbatch => sysbatch::apply(cx, job, version).await,
    }
}

/// Versions the spec, then runs it as its type and writes the status. No finalizer: the
/// garbage collector removes what a Job owns with it.
impl Reconcile for Job {
    type State = State;
    type Error = Error;
    const CONTROLLER: &'static str = CONTROLLER;
    const FINALIZER: Option<&'static str> = None;

    async fn reconcile(&self, cx: &Context<State>) -> Result<Action, Error> {
        cx.state.listed().await?;
        let version = revisions::ensure(cx, self).await?;
        let report = if self.spec.parameterized.is_some() {
            Ok(dispatch::parent(cx, self))
        } else {
            match priority::ensure(cx, self).await {
                Ok(()) => run_as_type(self, cx, version).await,
                Err(e) => Err(e),
            }
        };
        let report = match report {
            Ok(report) => report,
            Err(Error::Compile(e)) => status::invalid(self, &e.field, &e.message),
            Err(e) => return Err(e),
        };
        status::write(self, cx, version, &report).await?;
        let resync = cx.config.resync;
        Ok(Action::requeue(report.requeue.map_or(resync, |r| r.min(resync))))
    }

    fn retry_after(&self, class: Class, cx: &Context<State>) -> Duration {
        match class {
            // A spec that does not compile may compile once the nodes change (a
            // constraint evaluated against them); the node watch wakes it sooner.
            Class::Spec => cx.config.resync,
            _ => RETRY,
        }
    }
}
