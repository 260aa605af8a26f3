//! The rollout plan, step by step: each test builds what a reconcile would observe and
//! checks what the plan does with it; `simulate` runs whole rollouts, with pods turning
//! healthy a step after they are placed, and checks the invariants at every step.

use super::*;
use crate::jobs::service::health::Health;
use std::time::Duration;

const T0: i64 = 1_800_000_000;

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_second(T0 + seconds).unwrap()
}

fn update(canary: i32, max_parallel: i32) -> Update {
    Update {
        max_parallel,
        health_check: HealthCheck::Checks,
        min_healthy_time: Duration::from_secs(10),
        healthy_deadline: Duration::from_secs(60),
        progress_deadline: Some(Duration::from_secs(120)),
        canary,
        auto_promote: false,
        auto_revert: false,
        stagger: Duration::from_secs(30),
    }
}

fn healthy(n: i32) -> Health {
    Health {
        pods: n,
        healthy: n,
        last_healthy: (n > 0).then(|| at(0)),
        ..Health::default()
    }
}

fn waiting(n: i32, until: i64) -> Health {
    Health {
        pods: n,
        next: (n > 0).then(|| at(until)),
        ..Health::default()
    }
}

fn rs(name: &str, version: i64, replicas: i32, health: Health) -> Observed {
    Observed {
        name: name.to_owned(),
        version,
        replicas,
        health,
    }
}

fn group(update: Update, count: i32, observed: Vec<Observed>) -> Group {
    Group {
        name: "web".to_owned(),
        sets: vec![Set {
            name: "new".to_owned(),
            count,
            canaries: update.canary.min(count),
        }],
        update,
        observed,
    }
}

fn input<'a>(now: i64, groups: &'a [Group], previous: Option<&'a DeploymentStatus>) -> Input<'a> {
    Input {
        now: at(now),
        version: 2,
        stable: Some(1),
        promote: None,
        previous,
        groups,
    }
}

fn reasons_of(plan: &Plan) -> Vec<&'static str> {
    plan.events.iter().map(|e| e.reason).collect()
}

#[test]
fn a_first_version_places_every_pod_and_succeeds_once_they_are_healthy() {
    let groups = [group(update(1, 1), 3, vec![])];
    let first = plan(&Input {
        version: 1,
        stable: None,
        ..input(0, &groups, None)
    });
    assert_eq!(first.replicas["new"], 3, "no canaries without older pods");
    assert_eq!(first.deployment.status, state::RUNNING);
    assert_eq!(reasons_of(&first), [reasons::DEPLOYMENT_STARTED]);

    let groups = [group(update(1, 1), 3, vec![rs("new", 1, 3, healthy(3))])];
    let done = plan(&Input {
        version: 1,
        stable: None,
        ..input(20, &groups, Some(&first.deployment))
    });
    assert_eq!(done.deployment.status, state::SUCCESSFUL);
    assert_eq!(reasons_of(&done), [reasons::DEPLOYMENT_SUCCEEDED]);
    assert_eq!(done.wake, None);
}

#[test]
fn a_count_only_change_scales_the_same_replica_set_in_place() {
    // The template hash did not change: the wanted set is the one running.
    let groups = [group(update(1, 1), 5, vec![rs("new", 1, 3, healthy(3))])];
    let plan = plan(&input(0, &groups, None));
    assert_eq!(plan.replicas, BTreeMap::from([("new".to_owned(), 5)]));
    assert_eq!(plan.deployment.canaries_desired, 0, "no canaries for a scale");
}

#[test]
fn canaries_are_placed_beside_the_old_pods_which_keep_their_count() {
    let groups = [group(update(2, 1), 3, vec![rs("old", 1, 3, healthy(3))])];
    let plan = plan(&input(0, &groups, None));
    assert_eq!(plan.replicas["new"], 2);
    assert_eq!(plan.replicas["old"], 3);
    assert_eq!(plan.deployment.canaries_desired, 2);
    assert!(!plan.deployment.promoted);
    assert_eq!(plan.deployment.deadline, Some(Time(at(120))));
}

#[test]
fn canaries_auto_promote_once_healthy_and_the_roll_starts_at_once() {
    let mut u = update(1, 1);
    u.auto_promote = true;
    let groups = [group(
        u.clone(),
        3,
        vec![rs("old", 1, 3, healthy(3)), rs("new", 2, 1, waiting(1, 10))],
    )];
    let placed = plan(&input(5, &groups, None));
    assert_eq!(
        reasons_of(&placed),
        [reasons::DEPLOYMENT_STARTED, reasons::CANARIES_PLACED]
    );
    assert!(!placed.deployment.promoted, "the canary is not healthy yet");
    assert_eq!(placed.wake, Some(at(10)), "woken when its min_healthy_time ends");

    let groups = [group(
        u,
        3,
        vec![rs("old", 1, 3, healthy(3)), rs("new", 2, 1, healthy(1))],
    )];
    let promoted = plan(&input(11, &groups, Some(&placed.deployment)));
    assert!(promoted.deployment.promoted);
    assert_eq!(reasons_of(&promoted), [reasons::DEPLOYMENT_PROMOTED]);
    // 4 healthy pods, count 3, max_parallel 1: two old ones go, one new comes.
    assert_eq!(promoted.replicas["old"], 1);
    assert_eq!(promoted.replicas["new"], 2);
}

#[test]
fn without_auto_promote_healthy_canaries_wait_for_spec_promote_with_no_deadline() {
    let groups = [group(
        update(1, 1),
        3,
        vec![rs("old", 1, 3, healthy(3)), rs("new", 2, 1, healthy(1))],
    )];
    let waiting = plan(&input(11, &groups, None));
    assert_eq!(waiting.deployment.status, state::PAUSED);
    assert_eq!(waiting.deployment.deadline, None);
    assert_eq!(waiting.replicas["old"], 3);

    // Long past the progress deadline: a paused deployment does not fail.
    let still = plan(&input(10_000, &groups, Some(&waiting.deployment)));
    assert_eq!(still.deployment.status, state::PAUSED);

    // A promote of another version does nothing; of this one, promotes.
    let other = plan(&Input {
        promote: Some(1),
        ..input(10_001, &groups, Some(&still.deployment))
    });
    assert_eq!(other.deployment.status, state::PAUSED);
    let promoted = plan(&Input {
        promote: Some(2),
        ..input(10_002, &groups, Some(&still.deployment))
    });
    assert!(promoted.deployment.promoted);
    assert_eq!(promoted.deployment.status, state::RUNNING);
    assert_eq!(
        promoted.deployment.deadline,
        Some(Time(at(10_002 + 120))),
        "the progress deadline restarts at the promotion"
    );
    assert_eq!(reasons_of(&promoted), [reasons::DEPLOYMENT_PROMOTED]);
}

#[test]
fn a_promote_set_before_the_canaries_are_healthy_waits_for_them() {
    let groups = [group(
        update(1, 1),
        3,
        vec![rs("old", 1, 3, healthy(3)), rs("new", 2, 1, waiting(1, 10))],
    )];
    let plan = plan(&Input {
        promote: Some(2),
        ..input(5, &groups, None)
    });
    assert!(!plan.deployment.promoted);
    assert_eq!(plan.replicas["new"], 1);
}

#[test]
fn a_missed_progress_deadline_reverts_to_the_stable_version_with_auto_revert() {
    let mut u = update(1, 1);
    u.auto_revert = true;
    let groups = [group(
        u,
        3,
        vec![rs("old", 1, 3, healthy(3)), rs("new", 2, 1, waiting(1, 200))],
    )];
    let started = plan(&input(0, &groups, None));
    let reverted = plan(&input(121, &groups, Some(&started.deployment)));
    assert_eq!(reverted.deployment.status, state::REVERTED);
    assert_eq!(reverted.reverts_to(), Some(1));
    assert_eq!(
        reasons_of(&reverted),
        [reasons::DEPLOYMENT_FAILED, reasons::DEPLOYMENT_REVERTED]
    );
    assert_eq!(reverted.wake, None);

    // The stable version's groups then come back at once, the failed version's go.
    let stable = [Group {
        sets: vec![Set {
            name: "old".to_owned(),
            count: 3,
            canaries: 1,
        }],
        ..groups[0].clone()
    }];
    let restored = restore(
        &input(122, &stable, Some(&reverted.deployment)),
        reverted.deployment.clone(),
    );
    assert_eq!(restored.replicas["old"], 3);
    assert_eq!(restored.replicas["new"], 0);
    assert_eq!(restored.deployment.status, state::REVERTED);
    // And later reconciles keep it so, until a new version.
    assert_eq!(reverted_to(Some(&restored.deployment), 2), Some(1));
    assert_eq!(reverted_to(Some(&restored.deployment), 3), None);
}

#[test]
fn a_failure_without_auto_revert_stops_every_move_until_a_new_version() {
    let groups = [group(
        update(0, 1),
        3,
        vec![rs("old", 1, 2, healthy(2)), rs("new", 2, 1, waiting(1, 200))],
    )];
    let started = plan(&input(0, &groups, None));
    let failed = plan(&input(121, &groups, Some(&started.deployment)));
    assert_eq!(failed.deployment.status, state::FAILED);
    assert_eq!(failed.reverts_to(), None);
    assert_eq!(reasons_of(&failed), [reasons::DEPLOYMENT_FAILED]);
    let held = plan(&input(500, &groups, Some(&failed.deployment)));
    assert_eq!(held.replicas["old"], 2);
    assert_eq!(held.replicas["new"], 1);
    assert!(held.events.is_empty());
    // A new version deploys again from there.
    let next = plan(&Input {
        version: 3,
        ..input(501, &groups, Some(&failed.deployment))
    });
    assert_eq!(next.deployment.version, 3);
    assert_eq!(next.deployment.status, state::RUNNING);
}

#[test]
fn with_progress_deadline_zero_an_unhealthy_canary_fails_the_deployment_at_once() {
    let mut u = update(1, 1);
    u.progress_deadline = None;
    u.auto_revert = true;
    let unhealthy = Health {
        pods: 1,
        unhealthy: 1,
        ..Health::default()
    };
    let groups = [group(
        u,
        3,
        vec![rs("old", 1, 3, healthy(3)), rs("new", 2, 1, unhealthy)],
    )];
    let plan = plan(&input(1, &groups, None));
    assert_eq!(plan.deployment.status, state::REVERTED);
    assert!(
        plan.deployment
            .description
            .unwrap()
            .contains("unhealthy allocations")
    );
}

#[test]
fn a_restarted_controller_finds_its_canaries_and_places_no_second_set() {
    let groups = [group(
        update(1, 1),
        3,
        vec![rs("old", 1, 3, healthy(3)), rs("new", 2, 1, waiting(1, 10))],
    )];
    let first = plan(&input(0, &groups, None));
    // The same observation, as a new process sees it: the status and the named set.
    let again = plan(&input(1, &groups, Some(&first.deployment)));
    assert_eq!(again.replicas, first.replicas);
    assert_eq!(again.replicas.len(), 2, "only the old and the one canary set");
    assert!(again.events.is_empty(), "nothing new to say");
    assert_eq!(again.deployment.started_at, first.deployment.started_at);
}

#[test]
fn a_settled_version_keeps_counts_and_deletes_empty_old_sets() {
    let groups = [group(
        update(1, 1),
        3,
        vec![rs("gone", 1, 0, Health::default()), rs("new", 2, 3, healthy(3))],
    )];
    let successful = DeploymentStatus {
        version: 2,
        status: state::SUCCESSFUL.to_owned(),
        ..DeploymentStatus::default()
    };
    let plan = plan(&input(0, &groups, Some(&successful)));
    assert_eq!(plan.delete, ["gone"]);
    assert_eq!(plan.replicas["new"], 3);
    assert!(plan.events.is_empty());
}

#[test]
fn max_parallel_zero_replaces_everything_at_once() {
    let groups = [group(update(0, 0), 4, vec![rs("old", 1, 4, healthy(4))])];
    let plan = plan(&input(0, &groups, None));
    assert_eq!(plan.replicas["old"], 0);
    assert_eq!(plan.replicas["new"], 4);
}

#[test]
fn spread_sets_share_the_canaries_and_the_count() {
    let mut g = group(update(2, 1), 4, vec![rs("old", 1, 4, healthy(4))]);
    g.sets = vec![
        Set {
            name: "dc1".to_owned(),
            count: 3,
            canaries: 1,
        },
        Set {
            name: "dc2".to_owned(),
            count: 1,
            canaries: 1,
        },
    ];
    let plan = plan(&input(0, &[g], None));
    assert_eq!(plan.replicas["dc1"], 1);
    assert_eq!(plan.replicas["dc2"], 1);
    assert_eq!(plan.deployment.canaries_desired, 2);
}

/// A whole rollout: pods turn healthy one step after they are placed; `unhealthy` old
/// pods never count. Checks at every step that the group keeps `count - max_parallel`
/// healthy pods and never runs more than `count` besides the canaries; returns the
/// steps it took and the final plan.
fn simulate(u: Update, count: i32, old: i32, old_healthy: i32, promote_at: Option<usize>) -> (usize, Plan) {
    let canary = if old > 0 { u.canary.min(count) } else { 0 };
    // name → (replicas, healthy pods, pods placed last step)
    let mut sets: BTreeMap<&str, (i32, i32, i32)> =
        BTreeMap::from([("old", (old, old_healthy, 0)), ("new", (0, 0, 0))]);
    let mut previous: Option<DeploymentStatus> = None;
    for step in 0..100 {
        let observed = sets
            .iter()
            .filter(|(_, (r, ..))| *r > 0 || step == 0)
            .map(|(name, (replicas, healthy, young))| {
                let health = Health {
                    pods: healthy + young,
                    healthy: *healthy,
                    last_healthy: (*healthy > 0).then(|| at(step as i64)),
                    next: (*young > 0).then(|| at(step as i64 + 1)),
                    ..Health::default()
                };
                rs(name, if *name == "old" { 1 } else { 2 }, *replicas, health)
            })
            .collect();
        let groups = [group(u.clone(), count, observed)];
        let promote = promote_at.filter(|p| step >= *p).map(|_| 2);
        let plan = plan(&Input {
            promote,
            ..input(step as i64, &groups, previous.as_ref())
        });
        if plan.deployment.status == state::SUCCESSFUL {
            return (step, plan);
        }
        assert_ne!(plan.deployment.status, state::FAILED, "step {step}");
        // Apply: removed pods go at once (those not healthy first), placed ones are young.
        let mut healthy_total = 0;
        let mut pods_total = 0;
        for (name, (replicas, healthy, young)) in sets.iter_mut() {
            let target = plan.replicas.get(*name).copied().unwrap_or(*replicas);
            *healthy += *young;
            *young = 0;
            if target < *replicas {
                let removed = *replicas - target;
                let not_healthy = *replicas - *healthy;
                *healthy -= (removed - not_healthy).max(0);
            } else {
                *young = target - *replicas;
            }
            *replicas = target;
            healthy_total += *healthy;
            pods_total += *replicas;
        }
        assert!(pods_total <= count + canary, "step {step}: {pods_total} pods");
        if old_healthy == old {
            assert!(
                healthy_total >= count - u.max_parallel,
                "step {step}: {healthy_total} healthy of {count} (max_parallel {})",
                u.max_parallel
            );
        }
        previous = Some(plan.deployment);
    }
    panic!("the rollout did not finish");
}

#[test]
fn a_rolling_update_never_has_more_than_max_parallel_unavailable() {
    for (count, max_parallel) in [(5, 1), (5, 2), (6, 3), (3, 5), (10, 4)] {
        let (steps, plan) = simulate(update(0, max_parallel), count, count, count, None);
        assert_eq!(plan.replicas["new"], count);
        assert!(
            steps >= (count / max_parallel.min(count)) as usize,
            "{count}/{max_parallel}"
        );
    }
}

#[test]
fn a_canary_rollout_promoted_by_hand_then_rolls_within_max_parallel() {
    let (steps, plan) = simulate(update(2, 2), 6, 6, 6, Some(5));
    assert!(steps > 5, "nothing rolls before the promotion");
    assert!(plan.deployment.promoted);
    assert_eq!(plan.deployment.canaries_desired, 2);
}

#[test]
fn unhealthy_old_pods_are_replaced_first_at_no_cost() {
    let u = update(0, 1);
    let groups = [group(
        u,
        4,
        vec![rs(
            "old",
            1,
            4,
            Health {
                pods: 4,
                healthy: 2,
                ..Health::default()
            },
        )],
    )];
    let plan = plan(&input(0, &groups, None));
    // 2 healthy, count 4, max_parallel 1: the two unhealthy go; no healthy one may.
    assert_eq!(plan.replicas["old"], 2);
    assert_eq!(plan.replicas["new"], 2);
}

#[test]
fn a_new_version_of_the_same_template_mid_rollout_keeps_the_pods_already_rolled() {
    // Version 2 had rolled two of four pods when version 3 changed only the count.
    let mut u = update(1, 1);
    u.auto_promote = true;
    let groups = [group(
        u,
        5,
        vec![rs("old", 1, 2, healthy(2)), rs("new", 2, 2, healthy(2))],
    )];
    let previous = DeploymentStatus {
        version: 2,
        status: state::RUNNING.to_owned(),
        promoted: true,
        ..DeploymentStatus::default()
    };
    let plan = plan(&Input {
        version: 3,
        ..input(0, &groups, Some(&previous))
    });
    assert!(plan.replicas["new"] >= 2, "{:?}", plan.replicas);
}
