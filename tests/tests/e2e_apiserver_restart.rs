//! K2: the API server restarts while etcd's history is compacted, so the controller's
//! watch resumes from a resourceVersion that no longer exists (410 Gone). The controller
//! must relist and converge, without missing the delete that happened while it was
//! away, and without waiting for its periodic resync (5 minutes here).

use capstan_crds::ServiceIntentions;
use capstan_tests::*;
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use std::time::Duration;

#[tokio::test]
async fn controller_relists_after_api_server_restart_and_sees_missed_deletes() -> anyhow::Result<()> {
    let Some(cluster) = std::env::var_os("CAPSTAN_CLUSTER_CONTROL") else {
        eprintln!(
            "SKIPPED: needs a cluster whose API server the suite may restart (hack/test.sh sets CAPSTAN_CLUSTER_CONTROL)"
        );
        return Ok(());
    };
    let client = client().await;
    clear_lease(&client).await;
    // A Lease long enough to outlast the outage: this test is about the watch, not failover.
    let timings = LeaseTimings {
        duration: 60,
        renew_deadline: 40,
        retry_period: 2,
    };
    let controller = ControllerProcess::start(&client, "k2-relist", timings).await?;
    let ns = TestNamespace::new(&client, "e2e-k2").await;
    create_conflicting_pair(&client, &ns.name).await?;

    // The controller misses the delete: it is frozen while its API server goes away and
    // comes back (so its watch connection is dead), the delete happens, and the history
    // it was watching from is compacted away before it wakes.
    let cluster = cluster.to_str().unwrap();
    controller.signal("STOP");
    run(cluster, &["restart-apiserver"])?;
    let client = capstan_tests::client().await;
    let api = Api::<ServiceIntentions>::namespaced(client.clone(), &ns.name);
    api.delete("first", &DeleteParams::default()).await?;
    run(cluster, &["compact-etcd"])?;
    controller.signal("CONT");

    wait_ready(
        &client,
        &ns.name,
        "second",
        "True",
        "Accepted",
        Duration::from_secs(45),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\ncontroller log:\n{}", controller.logs()))?;
    // The scenario happened as intended: the resumed watch was refused with 410 Gone...
    assert!(
        controller.logs().contains("too old resource version"),
        "no 410 Gone was seen:\n{}",
        controller.logs()
    );
    // ...and it was the same term throughout: convergence came from the relist, not a restart.
    let metrics = controller.metrics().await?;
    assert_eq!(metric(&metrics, "capstan_controller_leader"), Some(1.0));
    assert_eq!(
        metric(&metrics, "capstan_controller_leader_terms_total"),
        Some(1.0),
        "{metrics}"
    );

    // And the watch is live again: new work is picked up.
    api.create(&PostParams::default(), &intention("third", "other"))
        .await?;
    wait_accepted(&client, &ns.name, "third").await?;
    Ok(())
}
