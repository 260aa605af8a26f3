//! When a service job's pod counts as healthy, Nomad's way (the `update` block's
//! `health_check`, `min_healthy_time` and `healthy_deadline`), read from the pod alone so
//! that a restarted controller judges it exactly as before:
//!
//! - `checks` (default): the pod's Ready condition (its readiness probes, which the
//!   group's service checks compile to) has been True for `min_healthy_time`;
//! - `task_states`: every container has been running for `min_healthy_time`;
//! - `manual`: the reconciler does not judge: a running pod counts as healthy at once and
//!   no deadline applies; promotion is the user's (`spec.promote`, `capstan job promote`).
//!
//! A pod is unhealthy once it failed (phase Failed, or a container restarted: a task
//! that crashed during its deployment) or when it was not healthy within
//! `healthy_deadline` of its creation. Unhealthy is final for that pod, as an
//! allocation's health is in Nomad; the deployment decides what it means.

use capstan_crds::jobs::HealthCheck;
use capstan_jobs::compile::Update;
use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};

/// One pod's health at an instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodHealth {
    /// Healthy since `since` (the end of its min_healthy_time).
    Healthy { since: Timestamp },
    /// Not yet: its health changes at `until` with nothing else happening (it turns
    /// healthy, or misses its deadline).
    Waiting { until: Option<Timestamp> },
    Unhealthy,
}

/// The health of the pods of one ReplicaSet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// Pods that are not being deleted.
    pub pods: i32,
    pub healthy: i32,
    pub unhealthy: i32,
    /// The latest instant one of them turned healthy.
    pub last_healthy: Option<Timestamp>,
    /// The next instant one of them changes health with time alone.
    pub next: Option<Timestamp>,
}

impl Health {
    pub fn add(&mut self, health: PodHealth) {
        self.pods += 1;
        match health {
            PodHealth::Healthy { since } => {
                self.healthy += 1;
                self.last_healthy = self.last_healthy.max(Some(since));
            }
            PodHealth::Waiting { until } => self.next = earliest(self.next, until),
            PodHealth::Unhealthy => self.unhealthy += 1,
        }
    }

    pub fn of<'a>(pods: impl IntoIterator<Item = &'a Pod>, update: &Update, now: Timestamp) -> Self {
        let mut health = Self::default();
        for pod in pods {
            if let Some(h) = judge(pod, update, now) {
                health.add(h);
            }
        }
        health
    }
}

pub fn earliest(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The pod's health at `now`; None for a pod being deleted (it counts for nothing).
pub fn judge(pod: &Pod, update: &Update, now: Timestamp) -> Option<PodHealth> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    if matches!(phase, "Failed" | "Succeeded") {
        return Some(PodHealth::Unhealthy);
    }
    let containers = status.and_then(|s| s.container_statuses.as_deref()).unwrap_or_default();
    let manual = update.health_check == HealthCheck::Manual;
    if !manual && containers.iter().any(|c| c.restart_count > 0) {
        return Some(PodHealth::Unhealthy);
    }
    let ready_since = match update.health_check {
        HealthCheck::Checks => status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready" && c.status == "True"))
            .map(|c| c.last_transition_time.as_ref().map_or(now, |t| t.0)),
        HealthCheck::TaskStates => (phase == "Running"
            && !containers.is_empty()
            && containers.iter().all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some())))
        .then(|| {
            containers
                .iter()
                .filter_map(|c| c.state.as_ref()?.running.as_ref()?.started_at.as_ref())
                .map(|t| t.0)
                .max()
                .unwrap_or(now)
        }),
        HealthCheck::Manual => (phase == "Running").then(|| status.and_then(|s| s.start_time.as_ref()).map_or(now, |t| t.0)),
    };
    if manual {
        return Some(match ready_since {
            Some(since) => PodHealth::Healthy { since },
            None => PodHealth::Waiting { until: None },
        });
    }
    let healthy_at = ready_since.map(|since| since + update.min_healthy_time);
    if let Some(at) = healthy_at
        && at <= now
    {
        return Some(PodHealth::Healthy { since: at });
    }
    let created = pod.metadata.creation_timestamp.as_ref().map_or(now, |t| t.0);
    let deadline = created + update.healthy_deadline;
    if deadline <= now {
        return Some(PodHealth::Unhealthy);
    }
    Some(PodHealth::Waiting {
        until: earliest(healthy_at, Some(deadline)),
    })
}
