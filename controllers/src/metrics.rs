//! The metrics every reconciler reports, registered under `capstan_controller_`.
//!
//! One value built by main and handed to every reconciler in its `Context`: the
//! reconcilers restart with each leadership term, the registry does not, so the metrics
//! live as long as the process rather than in a reconciler (and never in a static).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use std::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub controller: &'static str,
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabels {
    pub namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone)]
pub struct Metrics {
    pub runs: Family<ControllerLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub duration: Family<ControllerLabels, Histogram>,
    pub status_conflicts: Family<ControllerLabels, Counter>,
    pub leader: Gauge,
    pub leader_terms: Counter,
    /// Running pods that should be meshed and are not (intentions' `unmeshed`).
    pub unmeshed_pods: Family<NamespaceLabels, Gauge>,
    pub secretsync: SecretSyncMetrics,
    pub jobs: JobsMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// The jobs reconciler's own (its reconciles are `reconcile_runs{controller="jobs"}`).
#[derive(Clone, Default)]
pub struct JobsMetrics {
    /// Service deployments by outcome: started, promoted, successful, failed, reverted.
    pub deployments: Family<OutcomeLabels, Counter>,
    /// Versions recorded (a new spec, as a ControllerRevision).
    pub versions: Counter,
}

impl JobsMetrics {
    pub fn deployment(&self, outcome: &'static str) {
        self.deployments.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}

#[derive(Clone)]
pub struct SecretSyncMetrics {
    pub syncs: Family<ResultLabels, Counter>,
    pub renewals: Family<ResultLabels, Counter>,
    pub revocations: Family<ResultLabels, Counter>,
    pub propagation: Histogram,
}

impl SecretSyncMetrics {
    pub fn count(family: &Family<ResultLabels, Counter>, result: &'static str) {
        family.get_or_create(&ResultLabels { result }).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            runs: Family::default(),
            failures: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
            }),
            status_conflicts: Family::default(),
            leader: Gauge::default(),
            leader_terms: Counter::default(),
            unmeshed_pods: Family::default(),
            secretsync: SecretSyncMetrics {
                syncs: Family::default(),
                renewals: Family::default(),
                revocations: Family::default(),
                propagation: Histogram::new([
                    0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                ]),
            },
            jobs: JobsMetrics::default(),
        }
    }
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register("reconcile_runs", "Reconciliations started", metrics.runs.clone());
        registry.register(
            "reconcile_failures",
            "Reconciliations that failed, by error class",
            metrics.failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconciliation took",
            metrics.duration.clone(),
        );
        registry.register(
            "status_conflicts",
            "Status writes refused with 409 Conflict and retried on a fresh read",
            metrics.status_conflicts.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            metrics.leader.clone(),
        );
        registry.register(
            "leader_terms",
            "Times this replica became leader",
            metrics.leader_terms.clone(),
        );
        registry.register(
            "mesh_unmeshed_pods",
            "Running pods that should carry the mesh proxy but do not, by namespace",
            metrics.unmeshed_pods.clone(),
        );
        let s = &metrics.secretsync;
        registry.register(
            "secretsync_syncs",
            "SecretSync reconciles by result: created, changed, restored, rotated, unchanged, or the failure reason",
            s.syncs.clone(),
        );
        registry.register(
            "secretsync_lease_renewals",
            "Lease renewals by result (renewed, failed)",
            s.renewals.clone(),
        );
        registry.register(
            "secretsync_lease_revocations",
            "Lease revocations by result (revoked, failed, abandoned)",
            s.revocations.clone(),
        );
        registry.register(
            "secretsync_propagation_seconds",
            "Time from a source change (a KV version's creation, a credential's issue) to the target Secret holding it",
            s.propagation.clone(),
        );
        registry.register(
            "jobs_deployments",
            "Service job deployments by outcome: started, promoted, successful, failed, reverted",
            metrics.jobs.deployments.clone(),
        );
        registry.register(
            "jobs_versions",
            "Job versions recorded (each new spec, as a ControllerRevision)",
            metrics.jobs.versions.clone(),
        );
        metrics
    }

    /// Counts a run and times it until the returned guard drops.
    pub fn start(&self, controller: &'static str) -> RunTimer {
        self.runs.get_or_create(&ControllerLabels { controller }).inc();
        RunTimer {
            histogram: self
                .duration
                .get_or_create(&ControllerLabels { controller })
                .clone(),
            started: Instant::now(),
        }
    }

    pub fn failed(&self, controller: &'static str, error: &'static str) {
        self.failures
            .get_or_create(&FailureLabels { controller, error })
            .inc();
    }

    pub fn status_conflict(&self, controller: &'static str) {
        self.status_conflicts
            .get_or_create(&ControllerLabels { controller })
            .inc();
    }
}

pub struct RunTimer {
    histogram: Histogram,
    started: Instant,
}

impl Drop for RunTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}
