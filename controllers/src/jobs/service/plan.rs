//! A service job's rollout as a pure function of what is observed: the ReplicaSets of
//! each group with their pods' health, the spec's update blocks, the deployment status
//! recorded so far, and the time. It says how many pods each ReplicaSet should have,
//! what the deployment's status is now, which Events that is worth, and when to look
//! again. Nomad's `update` block, on ReplicaSets:
//!
//! - A new version starts a deployment. A group whose pod template did not change keeps
//!   its ReplicaSet and is scaled in place (a count-only change).
//! - A group whose template changed and that has pods of an older template gets
//!   `canary` canaries (a ReplicaSet of the new template beside the old ones, which keep
//!   their count) when `canary > 0`. The deployment is promoted once every canary is
//!   healthy and either every canary group has `auto_promote` or `spec.promote` names
//!   this version; until then it is `paused` (no deadline runs while it waits).
//! - Then (or at once without canaries) the group rolls: old pods are removed and new
//!   ones placed so that never more than `max_parallel` of the group's count are
//!   unavailable (healthy pods, old and new, never drop below `count - max_parallel`),
//!   and never more than `count` pods run besides the canaries (Nomad replaces, it does
//!   not surge). `max_parallel = 0` replaces everything at once.
//! - The deployment fails when no new pod turned healthy within `progress_deadline`
//!   (counted from its start, its promotion and each pod turning healthy), or, in a
//!   group whose `progress_deadline` is 0, as soon as a new pod is unhealthy. With
//!   `auto_revert` (in any group) and a stable version other than this one, it is
//!   `reverted`: the stable version's pods come back at once (a revert is a recovery, not
//!   a rollout) and this version's go; the spec stays as it is, and only a new spec
//!   starts a new deployment. Without it, it is `failed` and nothing moves until a new
//!   spec.
//! - It succeeds when every group has `count` healthy pods of its template and no other
//!   pods; that version becomes stable, and ReplicaSets left at zero are deleted.
//!
//! Everything the plan reads is in the API (ReplicaSets, pods, the Job's status and
//! spec), and ReplicaSet names are determined by the template, so a controller stopped
//! anywhere resumes where it was: the canaries it placed are found by name, never placed
//! twice.

use super::health::{Health, earliest};
use crate::jobs::{Note, reasons};
use capstan_crds::jobs::{DeploymentStatus, HealthCheck};
use capstan_jobs::compile::Update;
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use std::collections::BTreeMap;

/// `DeploymentStatus::status` values.
pub mod state {
    pub const RUNNING: &str = "running";
    pub const PAUSED: &str = "paused";
    pub const SUCCESSFUL: &str = "successful";
    pub const FAILED: &str = "failed";
    pub const REVERTED: &str = "reverted";
}

/// One group as observed.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub name: String,
    pub update: Update,
    /// The ReplicaSets the version to run wants (one per pod set), in order.
    pub sets: Vec<Set>,
    /// Every ReplicaSet of the group the job owns, wanted or not.
    pub observed: Vec<Observed>,
}

/// A ReplicaSet the version to run wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    /// Its share of the group's count.
    pub count: i32,
    /// Its share of the group's canaries.
    pub canaries: i32,
}

/// A ReplicaSet as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub name: String,
    /// The version that created it (older ones are scaled down first).
    pub version: i64,
    pub replicas: i32,
    pub health: Health,
}

pub struct Input<'a> {
    pub now: Timestamp,
    /// The newest version: the one a deployment deploys.
    pub version: i64,
    pub stable: Option<i64>,
    /// `spec.promote`.
    pub promote: Option<i64>,
    /// The deployment the status records.
    pub previous: Option<&'a DeploymentStatus>,
    /// The groups of the version to run (the stable one's after a revert).
    pub groups: &'a [Group],
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The replicas each ReplicaSet should have: every wanted one (created if missing
    /// and not zero) and every observed one.
    pub replicas: BTreeMap<String, i32>,
    /// ReplicaSets no longer wanted, at zero and without pods.
    pub delete: Vec<String>,
    pub deployment: DeploymentStatus,
    pub events: Vec<Note>,
    /// When something changes with time alone (a pod's min_healthy_time or
    /// healthy_deadline, the progress deadline).
    pub wake: Option<Timestamp>,
}

impl Plan {
    /// The stable version this plan reverts to, if it does.
    pub fn reverts_to(&self) -> Option<i64> {
        (self.deployment.status == state::REVERTED)
            .then_some(self.deployment.reverted_to)
            .flatten()
    }
}

/// The version a recorded revert sent the job back to, while that deployment's version
/// is still the newest.
pub fn reverted_to(previous: Option<&DeploymentStatus>, version: i64) -> Option<i64> {
    previous
        .filter(|d| d.version == version && d.status == state::REVERTED)
        .and_then(|d| d.reverted_to)
}

pub fn plan(input: &Input<'_>) -> Plan {
    let previous = input.previous.filter(|d| d.version == input.version);
    match previous.map(|d| d.status.as_str()) {
        Some(state::SUCCESSFUL) => settled(input, previous.cloned().unwrap_or_default(), false),
        Some(state::REVERTED) => settled(input, previous.cloned().unwrap_or_default(), true),
        Some(state::FAILED) => hold(input, previous.cloned().unwrap_or_default()),
        _ => deploy(input, previous),
    }
}

/// The deployment of `input.version` after a revert to the stable version, whose
/// groups `input` holds: the stable pods come back and the others go, at once.
pub fn restore(input: &Input<'_>, deployment: DeploymentStatus) -> Plan {
    settled(input, deployment, true)
}

/// No deployment in progress: every group at its count, old ReplicaSets removed
/// (within max_parallel, unless `at_once`), empty ones deleted.
fn settled(input: &Input<'_>, deployment: DeploymentStatus, at_once: bool) -> Plan {
    let mut replicas = BTreeMap::new();
    for group in input.groups {
        if at_once {
            replace(group, &mut replicas);
        } else {
            roll(group, &mut replicas);
        }
    }
    Plan {
        delete: deletable(input.groups),
        replicas,
        deployment,
        events: Vec::new(),
        wake: wake(input.groups, None),
    }
}

/// A failed deployment without revert: nothing moves until a new version.
fn hold(input: &Input<'_>, deployment: DeploymentStatus) -> Plan {
    let replicas = input
        .groups
        .iter()
        .flat_map(|g| g.observed.iter().map(|o| (o.name.clone(), o.replicas)))
        .collect();
    Plan {
        replicas,
        delete: Vec::new(),
        deployment,
        events: Vec::new(),
        wake: None,
    }
}

fn deploy(input: &Input<'_>, previous: Option<&DeploymentStatus>) -> Plan {
    let now = input.now;
    let version = input.version;
    let mut events = Vec::new();
    let started = previous.and_then(|d| d.started_at.as_ref()).map_or(now, |t| t.0);
    if previous.is_none() {
        events.push(
            Note::normal(
                reasons::DEPLOYMENT_STARTED,
                format!("Deployment of version {version} started"),
            )
            .of_version(version),
        );
    }
    let was_promoted = previous.is_some_and(|d| d.promoted);
    let canary_groups: Vec<&Group> = if was_promoted {
        Vec::new()
    } else {
        input.groups.iter().filter(|g| needs_canaries(g)).collect()
    };
    let canaries_desired: i32 = canary_groups.iter().map(|g| canaries_wanted(g)).sum();
    let canaries_placed: i32 = canary_groups.iter().map(|g| canaries_placed(g)).sum();
    let canaries_healthy: i32 = canary_groups.iter().map(|g| canaries_healthy(g)).sum();
    let all_healthy = canaries_healthy >= canaries_desired;
    let manual = input.promote == Some(version);
    let auto = canary_groups.iter().all(|g| g.update.auto_promote);
    let promote_now = !canary_groups.is_empty() && all_healthy && (auto || manual);
    let promoted = was_promoted || promote_now;
    let canary_phase = !canary_groups.is_empty() && !promote_now;
    let paused = canary_phase && all_healthy;

    let previously_placed = previous.map_or(0, |d| d.canaries_placed);
    if canaries_desired > 0 && canaries_placed >= canaries_desired && previously_placed < canaries_desired {
        events.push(
            Note::normal(
                reasons::CANARIES_PLACED,
                format!("{canaries_placed} canaries of version {version} placed"),
            )
            .of_version(version),
        );
    }
    if promote_now {
        let how = if manual {
            "by spec.promote"
        } else {
            "automatically"
        };
        events.push(
            Note::normal(
                reasons::DEPLOYMENT_PROMOTED,
                format!("Canaries of version {version} promoted {how}"),
            )
            .of_version(version),
        );
    }

    let mut replicas = BTreeMap::new();
    for group in input.groups {
        if canary_phase && needs_canaries(group) {
            place_canaries(group, &mut replicas);
        } else {
            roll(group, &mut replicas);
        }
    }
    let complete = !canary_phase && input.groups.iter().all(complete);

    // The progress deadline: from the start, moved on by each new pod turning healthy,
    // and restarted when a wait for promotion ends.
    let progress = input
        .groups
        .iter()
        .filter(|g| g.update.health_check != HealthCheck::Manual)
        .filter_map(|g| g.update.progress_deadline)
        .min();
    let deadline = progress.map(|pd| {
        let base = match previous {
            Some(d) if d.status == state::PAUSED => now + pd,
            Some(d) => d.deadline.as_ref().map_or(started + pd, |t| t.0),
            None => started + pd,
        };
        let last_healthy = input
            .groups
            .iter()
            .flat_map(|g| wanted(g).filter_map(|(_, o)| o?.health.last_healthy))
            .max();
        last_healthy.map_or(base, |at| base.max(at + pd))
    });
    let failure = if complete || paused {
        None
    } else if deadline.is_some_and(|d| now >= d) {
        Some("Failed due to progress deadline".to_owned())
    } else {
        input
            .groups
            .iter()
            .filter(|g| g.update.progress_deadline.is_none() && g.update.health_check != HealthCheck::Manual)
            .find(|g| wanted(g).any(|(_, o)| o.is_some_and(|o| o.health.unhealthy > 0)))
            .map(|g| format!("Failed due to unhealthy allocations in group {}", g.name))
    };

    let (status, description, reverted_to) = match failure {
        Some(why) => {
            events.push(
                Note::warning(reasons::DEPLOYMENT_FAILED, format!("Version {version}: {why}"))
                    .of_version(version),
            );
            let revert_to = input
                .stable
                .filter(|s| *s != version && input.groups.iter().any(|g| g.update.auto_revert));
            match revert_to {
                Some(stable) => {
                    events.push(
                        Note::warning(
                            reasons::DEPLOYMENT_REVERTED,
                            format!("Version {version} failed; reverted to stable version {stable}"),
                        )
                        .of_version(version),
                    );
                    (
                        state::REVERTED,
                        format!("{why} - rolling back to job version {stable}"),
                        Some(stable),
                    )
                }
                None => (state::FAILED, why, None),
            }
        }
        None if complete => {
            events.push(
                Note::normal(
                    reasons::DEPLOYMENT_SUCCEEDED,
                    format!("Deployment of version {version} completed successfully"),
                )
                .of_version(version),
            );
            (
                state::SUCCESSFUL,
                "Deployment completed successfully".to_owned(),
                None,
            )
        }
        None if paused => (
            state::PAUSED,
            "Deployment is running but requires manual promotion".to_owned(),
            None,
        ),
        None => (state::RUNNING, "Deployment is running".to_owned(), None),
    };
    let settled = matches!(status, state::SUCCESSFUL | state::FAILED | state::REVERTED);
    let deadline = deadline.filter(|_| !settled && !paused);
    let replicas = if matches!(status, state::FAILED | state::REVERTED) {
        hold(input, DeploymentStatus::default()).replicas
    } else {
        replicas
    };
    let (canaries_desired, canaries_placed, canaries_healthy) = match previous {
        Some(d) if was_promoted => (d.canaries_desired, d.canaries_placed, d.canaries_healthy),
        _ => (
            canaries_desired,
            canaries_placed.min(canaries_desired),
            canaries_healthy.min(canaries_desired),
        ),
    };
    Plan {
        replicas,
        delete: if status == state::SUCCESSFUL {
            deletable(input.groups)
        } else {
            Vec::new()
        },
        deployment: DeploymentStatus {
            version,
            status: status.to_owned(),
            description: Some(description),
            canaries_desired,
            canaries_placed,
            canaries_healthy,
            promoted,
            started_at: Some(Time(started)),
            deadline: deadline.map(Time),
            reverted_to,
        },
        events,
        wake: if settled {
            None
        } else {
            wake(input.groups, deadline)
        },
    }
}

fn observed<'a>(group: &'a Group, name: &str) -> Option<&'a Observed> {
    group.observed.iter().find(|o| o.name == name)
}

/// The wanted sets with their ReplicaSets, if they exist.
fn wanted(group: &Group) -> impl Iterator<Item = (&Set, Option<&Observed>)> {
    group.sets.iter().map(|s| (s, observed(group, &s.name)))
}

/// The ReplicaSets of other templates, oldest version first.
fn old(group: &Group) -> Vec<&Observed> {
    let mut old: Vec<&Observed> = group
        .observed
        .iter()
        .filter(|o| !group.sets.iter().any(|s| s.name == o.name))
        .collect();
    old.sort_by(|a, b| (a.version, &a.name).cmp(&(b.version, &b.name)));
    old
}

fn count(group: &Group) -> i32 {
    group.sets.iter().map(|s| s.count).sum()
}

/// A template change over running pods, with canaries asked for.
fn needs_canaries(group: &Group) -> bool {
    group.update.canary > 0 && group.update.max_parallel > 0 && old(group).iter().any(|o| o.replicas > 0)
}

fn canaries_wanted(group: &Group) -> i32 {
    group.sets.iter().map(|s| s.canaries).sum()
}

fn canaries_placed(group: &Group) -> i32 {
    wanted(group)
        .map(|(s, o)| o.map_or(0, |o| o.health.pods.min(s.canaries)))
        .sum()
}

fn canaries_healthy(group: &Group) -> i32 {
    wanted(group)
        .map(|(s, o)| o.map_or(0, |o| o.health.healthy.min(s.canaries)))
        .sum()
}

/// Canaries beside the old pods, which keep their count. A set that already has more
/// pods of this template (a version that changed only the count while the previous
/// deployment of the same template was rolling) keeps them: they are not taken down to
/// be placed again.
fn place_canaries(group: &Group, replicas: &mut BTreeMap<String, i32>) {
    for old in old(group) {
        replicas.insert(old.name.clone(), old.replicas);
    }
    for (set, observed) in wanted(group) {
        let running = observed.map_or(0, |o| o.replicas.min(set.count));
        replicas.insert(set.name.clone(), set.canaries.max(running));
    }
}

/// Everything at its count at once: the old ReplicaSets to zero.
fn replace(group: &Group, replicas: &mut BTreeMap<String, i32>) {
    for old in old(group) {
        replicas.insert(old.name.clone(), 0);
    }
    for set in &group.sets {
        replicas.insert(set.name.clone(), set.count);
    }
}

/// One step of the rolling update: remove old pods (those not healthy first, for free;
/// healthy ones while the group keeps `count - max_parallel` healthy pods), then place
/// new ones up to `count` pods in all.
fn roll(group: &Group, replicas: &mut BTreeMap<String, i32>) {
    let count = count(group);
    let max_parallel = group.update.max_parallel;
    if max_parallel <= 0 {
        replace(group, replicas);
        return;
    }
    let old = old(group);
    let available: i32 = group.observed.iter().map(|o| o.health.healthy).sum();
    let mut budget = (available - (count - max_parallel)).max(0);
    let mut old_left = 0;
    for o in old {
        let free = (o.replicas - o.health.healthy).max(0);
        let take = o.replicas.min(free.saturating_add(budget));
        budget -= (take - free).max(0);
        replicas.insert(o.name.clone(), o.replicas - take);
        old_left += o.replicas - take;
    }
    let current: Vec<i32> = wanted(group)
        .map(|(s, o)| o.map_or(0, |o| o.replicas.min(s.count)))
        .collect();
    let mut room = count - old_left - current.iter().sum::<i32>();
    for (set, now) in group.sets.iter().zip(current) {
        let add = room.clamp(0, set.count - now);
        room -= add;
        replicas.insert(set.name.clone(), now + add);
    }
}

/// Every wanted ReplicaSet has its count of healthy pods, and no other has pods.
fn complete(group: &Group) -> bool {
    old(group).iter().all(|o| o.replicas == 0 && o.health.pods == 0)
        && wanted(group).all(|(s, o)| match o {
            Some(o) => o.replicas == s.count && o.health.healthy >= s.count,
            None => s.count == 0,
        })
}

/// ReplicaSets of other templates that are at zero and have no pods left.
fn deletable(groups: &[Group]) -> Vec<String> {
    groups
        .iter()
        .flat_map(|g| {
            old(g)
                .into_iter()
                .filter(|o| o.replicas == 0 && o.health.pods == 0)
        })
        .map(|o| o.name.clone())
        .collect()
}

fn wake(groups: &[Group], deadline: Option<Timestamp>) -> Option<Timestamp> {
    groups
        .iter()
        .flat_map(|g| g.observed.iter().map(|o| o.health.next))
        .fold(deadline, earliest)
}

#[cfg(test)]
mod tests;
