//! The metrics every reconciler reports, registered under `capstan_controller_`.

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

#[derive(Clone)]
pub struct Metrics {
    pub runs: Family<ControllerLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub duration: Family<ControllerLabels, Histogram>,
    pub status_conflicts: Family<ControllerLabels, Counter>,
    pub leader: Gauge,
    pub leader_terms: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            runs: Family::default(),
            failures: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
            }),
            status_conflicts: Family::default(),
            leader: Gauge::default(),
            leader_terms: Counter::default(),
        };
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
