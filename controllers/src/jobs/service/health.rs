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

const SECOND: std::time::Duration = std::time::Duration::from_secs(1);

/// One pod's health at an instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodHealth {
    /// Healthy since `since` (the end of its min_healthy_time).
    Healthy {
        since: Timestamp,
    },
    /// Not yet: its health changes at `until` with nothing else happening (it turns
    /// healthy, or misses its deadline).
    Waiting {
        until: Option<Timestamp>,
    },
    Unhealthy,
    /// Failed or completed: unhealthy, and no longer one of its ReplicaSet's pods (the
    /// ReplicaSet replaces it).
    Finished,
}

/// The health of the pods of one ReplicaSet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// Pods that are neither being deleted nor finished.
    pub pods: i32,
    pub healthy: i32,
    /// Unhealthy pods, finished ones included.
    pub unhealthy: i32,
    /// The latest instant one of them turned healthy.
    pub last_healthy: Option<Timestamp>,
    /// The next instant one of them changes health with time alone.
    pub next: Option<Timestamp>,
}

impl Health {
    pub fn add(&mut self, health: PodHealth) {
        self.pods += i32::from(health != PodHealth::Finished);
        match health {
            PodHealth::Healthy { since } => {
                self.healthy += 1;
                self.last_healthy = self.last_healthy.max(Some(since));
            }
            PodHealth::Waiting { until } => self.next = earliest(self.next, until),
            PodHealth::Unhealthy | PodHealth::Finished => self.unhealthy += 1,
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
        return Some(PodHealth::Finished);
    }
    let containers = status
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default();
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
            && containers
                .iter()
                .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some())))
        .then(|| {
            containers
                .iter()
                .filter_map(|c| c.state.as_ref()?.running.as_ref()?.started_at.as_ref())
                .map(|t| t.0)
                .max()
                .unwrap_or(now)
        }),
        HealthCheck::Manual => {
            (phase == "Running").then(|| status.and_then(|s| s.start_time.as_ref()).map_or(now, |t| t.0))
        }
    };
    if manual {
        return Some(match ready_since {
            Some(since) => PodHealth::Healthy { since },
            None => PodHealth::Waiting { until: None },
        });
    }
    // The API keeps these times to the second, cut down: the pod turned ready (or was
    // created) up to a second after the time it shows, so a wait counted from it
    // starts a second later, never ending early.
    let healthy_at = ready_since.map(|since| since + SECOND + update.min_healthy_time);
    if let Some(at) = healthy_at
        && at <= now
    {
        return Some(PodHealth::Healthy { since: at });
    }
    let created = pod.metadata.creation_timestamp.as_ref().map_or(now, |t| t.0);
    let deadline = created + SECOND + update.healthy_deadline;
    if deadline <= now {
        return Some(PodHealth::Unhealthy);
    }
    Some(PodHealth::Waiting {
        until: earliest(healthy_at, Some(deadline)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{
        api::core::v1::{ContainerState, ContainerStateRunning, ContainerStatus, PodCondition, PodStatus},
        apimachinery::pkg::apis::meta::v1::Time,
    };
    use std::time::Duration;

    const T0: i64 = 1_800_000_000;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(T0 + seconds).unwrap()
    }

    fn update(health_check: HealthCheck) -> Update {
        Update {
            max_parallel: 1,
            health_check,
            min_healthy_time: Duration::from_secs(10),
            healthy_deadline: Duration::from_secs(60),
            progress_deadline: None,
            canary: 0,
            auto_promote: false,
            auto_revert: false,
            stagger: Duration::ZERO,
        }
    }

    /// A pod created at 0, Running, Ready since `ready` (if any), its container
    /// running since 2 and restarted `restarts` times.
    fn pod(ready: Option<i64>, restarts: i32) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.creation_timestamp = Some(Time(at(0)));
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            start_time: Some(Time(at(1))),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready.is_some() { "True" } else { "False" }.into(),
                last_transition_time: Some(Time(at(ready.unwrap_or(1)))),
                ..PodCondition::default()
            }]),
            container_statuses: Some(vec![ContainerStatus {
                name: "t".into(),
                restart_count: restarts,
                state: Some(ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: Some(Time(at(2))),
                    }),
                    ..ContainerState::default()
                }),
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        });
        pod
    }

    #[test]
    fn checks_count_a_pod_healthy_after_min_healthy_time_of_readiness() {
        let checks = update(HealthCheck::Checks);
        // Ready at 5, which the API keeps to the second (before 6): healthy at 16.
        assert_eq!(
            judge(&pod(Some(5), 0), &checks, at(15)),
            Some(PodHealth::Waiting { until: Some(at(16)) })
        );
        assert_eq!(
            judge(&pod(Some(5), 0), &checks, at(16)),
            Some(PodHealth::Healthy { since: at(16) })
        );
        assert_eq!(
            judge(&pod(None, 0), &checks, at(30)),
            Some(PodHealth::Waiting { until: Some(at(61)) })
        );
        assert_eq!(
            judge(&pod(None, 0), &checks, at(61)),
            Some(PodHealth::Unhealthy),
            "missed healthy_deadline"
        );
        assert_eq!(
            judge(&pod(Some(5), 1), &checks, at(30)),
            Some(PodHealth::Unhealthy),
            "a task restarted"
        );
    }

    #[test]
    fn task_states_count_running_containers_and_manual_judges_nothing() {
        let tasks = update(HealthCheck::TaskStates);
        assert_eq!(
            judge(&pod(None, 0), &tasks, at(13)),
            Some(PodHealth::Healthy { since: at(13) })
        );
        let manual = update(HealthCheck::Manual);
        assert_eq!(
            judge(&pod(None, 3), &manual, at(1000)),
            Some(PodHealth::Healthy { since: at(1) })
        );
    }

    #[test]
    fn failed_pods_are_unhealthy_and_deleted_ones_count_for_nothing() {
        let checks = update(HealthCheck::Checks);
        let mut failed = pod(Some(5), 0);
        failed.status.as_mut().unwrap().phase = Some("Failed".into());
        assert_eq!(judge(&failed, &checks, at(30)), Some(PodHealth::Finished));
        let mut deleted = pod(Some(5), 0);
        deleted.metadata.deletion_timestamp = Some(Time(at(20)));
        assert_eq!(judge(&deleted, &checks, at(30)), None);
        let health = Health::of(
            [&pod(Some(5), 0), &pod(None, 0), &failed, &deleted],
            &checks,
            at(30),
        );
        assert_eq!(
            health,
            Health {
                pods: 2,
                healthy: 1,
                unhealthy: 1,
                last_healthy: Some(at(16)),
                next: Some(at(61)),
            }
        );
    }
}
