//! K1: leader election of capstan-controller on a real Lease: one leader at a time, a
//! standby takes over when the leader is killed, a paused leader stops acting the
//! moment it resumes, and a clean shutdown hands the Lease over at once.

use capstan_crds::ServiceIntentions;
use capstan_tests::*;
use k8s_openapi::api::events::v1::Event;
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use std::time::{Duration, Instant};

const TIMINGS: LeaseTimings = LeaseTimings {
    duration: 6,
    renew_deadline: 4,
    retry_period: 1,
};

#[tokio::test]
async fn standby_takes_over_within_the_lease_duration_when_the_leader_is_killed() -> anyhow::Result<()> {
    let client = client().await;
    clear_lease(&client).await;
    let ns = TestNamespace::new(&client, "e2e-k1-kill").await;
    let leader = ControllerProcess::start(&client, "k1-kill-a", TIMINGS).await?;
    wait_for_holder(&client, "k1-kill-a").await?;
    let standby = ControllerProcess::start(&client, "k1-kill-b", TIMINGS).await?;

    // Only the leader reconciles: the standby reports itself as not leading and writes nothing.
    create(&client, &ns.name, "before").await?;
    wait_accepted(&client, &ns.name, "before").await?;
    assert_eq!(
        metric(&leader.metrics().await?, "capstan_controller_leader"),
        Some(1.0)
    );
    assert_eq!(
        metric(&standby.metrics().await?, "capstan_controller_leader"),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &standby.metrics().await?,
            "capstan_controller_reconcile_runs_total"
        ),
        None
    );

    let mut leader = leader;
    let killed_at = Instant::now();
    leader.signal("KILL");
    wait_for_holder(&client, "k1-kill-b").await?;
    let took = killed_at.elapsed();
    // The Lease lasts 6 s after its last renewal; the standby retries every second.
    assert!(
        took <= Duration::from_secs(TIMINGS.duration + 3),
        "takeover took {took:?}"
    );
    leader.wait_exit(Duration::from_secs(5)).await?;

    create(&client, &ns.name, "after").await?;
    wait_accepted(&client, &ns.name, "after").await?;
    assert_eq!(
        reporters(&client, &ns.name, "after").await?,
        vec!["k1-kill-b".to_owned()]
    );
    Ok(())
}

/// A leader frozen past its Lease (SIGSTOP) must not write when it thaws: by then the
/// standby holds the Lease, and the old leader's term ended on its own clock.
#[tokio::test]
async fn a_paused_leader_does_not_act_when_it_resumes() -> anyhow::Result<()> {
    let client = client().await;
    clear_lease(&client).await;
    let ns = TestNamespace::new(&client, "e2e-k1-pause").await;
    let mut old = ControllerProcess::start(&client, "k1-pause-a", TIMINGS).await?;
    wait_for_holder(&client, "k1-pause-a").await?;
    let mut new = ControllerProcess::start(&client, "k1-pause-b", TIMINGS).await?;

    old.signal("STOP");
    wait_for_holder(&client, "k1-pause-b").await?;
    // Work arrives while the old leader is frozen: the new leader does it...
    create(&client, &ns.name, "during").await?;
    wait_accepted(&client, &ns.name, "during").await?;
    // ...and it keeps changing, so the old leader's watch has news to act on when it thaws.
    let api = Api::<ServiceIntentions>::namespaced(client.clone(), &ns.name);
    let patch = serde_json::json!({"spec": {"sources": [{"name": "web", "action": "deny"}]}});
    api.patch("during", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;

    old.signal("CONT");
    // The old leader notices its term is over, steps down and stands by.
    eventually(Duration::from_secs(10), "the resumed leader to step down", || {
        let logs = old.logs();
        async move { logs.contains("Lost leadership").then_some(()) }
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(old.is_running(), "the old leader stands by rather than exiting");
    assert_eq!(
        metric(&old.metrics().await?, "capstan_controller_leader"),
        Some(0.0)
    );
    assert_eq!(lease_holder(&client).await.as_deref(), Some("k1-pause-b"));
    wait_accepted(&client, &ns.name, "during").await?;
    // Every Event about the object came from the new leader: none from the thawed one.
    let reporters = reporters(&client, &ns.name, "during").await?;
    assert_eq!(reporters, vec!["k1-pause-b".to_owned()], "{}", old.logs());
    assert!(
        !old.logs().contains("Writing status"),
        "the thawed leader wrote a status:\n{}",
        old.logs()
    );

    // A clean shutdown releases the Lease: the standby takes over within a couple of
    // retry periods instead of waiting out the lease duration.
    let stopped_at = Instant::now();
    new.signal("TERM");
    assert_eq!(
        new.wait_exit(Duration::from_secs(10)).await?,
        Some(0),
        "{}",
        new.logs()
    );
    assert!(new.logs().contains("Released leadership"), "{}", new.logs());
    wait_for_holder(&client, "k1-pause-a").await?;
    let took = stopped_at.elapsed();
    assert!(
        took < Duration::from_secs(TIMINGS.duration),
        "handover after SIGTERM took {took:?}"
    );
    Ok(())
}

async fn wait_for_holder(client: &Client, identity: &str) -> anyhow::Result<()> {
    eventually(
        Duration::from_secs(20),
        &format!("{identity} to hold the lease"),
        || async { (lease_holder(client).await.as_deref() == Some(identity)).then_some(()) },
    )
    .await
}

async fn create(client: &Client, ns: &str, name: &str) -> anyhow::Result<()> {
    Api::<ServiceIntentions>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &intention(name, name))
        .await?;
    Ok(())
}

/// The distinct `reportingInstance`s of the Events about one object.
async fn reporters(client: &Client, ns: &str, name: &str) -> anyhow::Result<Vec<String>> {
    let events = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    let mut found: Vec<String> = events
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter_map(|e| e.reporting_instance)
        .collect();
    found.sort();
    found.dedup();
    Ok(found)
}
