//! Jobs (issue 17) end to end: the real API server, scheduler and controller-manager, a
//! real capstan-controller, kwok nodes in two datacenters and nodes each test adds.
//!
//! Durations in the specs are short (minHealthyTime 1s, deadlines of a few seconds) so
//! that each test takes seconds; the periodic one waits for one real minute boundary.

use anyhow::{Context as _, Result, ensure};
use capstan_crds::jobs::Job;
use capstan_tests::{jobs::*, *};
use k8s_openapi::api::{
    apps::v1::{DaemonSet, ReplicaSet},
    batch::v1::{CronJob, Job as BatchJob},
    core::v1::{Event as CoreEvent, Pod, Secret},
    scheduling::v1::PriorityClass,
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

/// One test's world: a client, its namespace and a capstan-controller of its own.
struct Setup {
    client: Client,
    ns: TestNamespace,
    controller: ControllerProcess,
}

impl Setup {
    async fn new(prefix: &str) -> Result<Self> {
        let client = client().await;
        let controller = ControllerProcess::sole(&client, prefix).await?;
        let ns = TestNamespace::new(&client, prefix).await;
        Ok(Self {
            client,
            ns,
            controller,
        })
    }

    fn ns(&self) -> &str {
        &self.ns.name
    }

    fn apply(&self, manifest: &Value) -> Result<()> {
        apply_job(self.ns(), manifest)
    }

    /// [`wait_job`], with the controller's last log lines on failure.
    async fn wait(&self, name: &str, what: &str, check: impl Fn(&Job) -> bool) -> Result<Job> {
        wait_job(&self.client, self.ns(), name, what, STEP, check)
            .await
            .map_err(|e| self.failed(e))
    }

    fn failed(&self, error: anyhow::Error) -> anyhow::Error {
        anyhow::anyhow!(
            "{error}\nthe controller's log:\n{}",
            tail(&self.controller.logs(), 40)
        )
    }

    async fn pods(&self, job: &str) -> Result<Vec<Pod>> {
        live_pods(&self.client, self.ns(), job).await
    }

    /// Waits until `job` has exactly `count` live pods, all ready and of `version`.
    async fn settled(&self, job: &str, version: i64, count: usize) -> Result<Vec<Pod>> {
        eventually(
            STEP,
            &format!("{count} ready pods of {job} v{version} and no others"),
            || async {
                let pods = self.pods(job).await.ok()?;
                (pods.len() == count && pods.iter().all(|p| is_ready(p) && version_of(p) == Some(version)))
                    .then_some(pods)
            },
        )
        .await
        .map_err(|e| self.failed(e))
    }

    /// Applies a service job and waits until `version` is its stable, running version
    /// with `count` ready pods.
    async fn deployed(&self, manifest: &Value, version: i64, count: usize) -> Result<Job> {
        self.apply(manifest)?;
        let name = manifest["metadata"]["name"].as_str().context("a name")?;
        let job = self
            .wait(name, &format!("version {version} stable and running"), |j| {
                let s = status_of(j);
                s.version == Some(version)
                    && s.stable_version == Some(version)
                    && s.running_version == Some(version)
                    && s.running == count as i32
            })
            .await?;
        self.settled(name, version, count).await?;
        Ok(job)
    }

    /// The first live pod of `job` at `version`, once there is one.
    async fn pod_of_version(&self, job: &str, version: i64) -> Result<Pod> {
        eventually(STEP, &format!("a pod of {job} v{version}"), || async {
            self.pods(job)
                .await
                .ok()?
                .into_iter()
                .find(|p| version_of(p) == Some(version))
        })
        .await
        .map_err(|e| self.failed(e))
    }
}

fn task(image: &str) -> Value {
    json!({"name": "app", "image": image, "resources": {"cpu": "100m", "memory": "64Mi"}})
}

/// A service job of one group `web` running `image`, with `update` as its strategy.
fn service(name: &str, count: i32, image: &str, update: Value) -> Value {
    job_manifest(
        name,
        json!({
            "type": "service",
            "update": update,
            "groups": [{"name": "web", "count": count, "tasks": [task(image)]}],
        }),
    )
}

/// A constraint confining a group to the nodes of `pool` (a test's own nodes).
fn in_pool(pool: &str) -> Value {
    json!({"attribute": "${node.pool}", "operator": "=", "value": pool})
}

/// Live pods of `job` per value of node label `label` (looked up in `nodes`).
fn count_by(pods: &[Pod], nodes: &BTreeMap<String, String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for pod in pods {
        let value = node_of(pod)
            .and_then(|n| nodes.get(n))
            .cloned()
            .unwrap_or_else(|| "(unscheduled)".into());
        *counts.entry(value).or_default() += 1;
    }
    counts
}

fn of_group(pods: &[Pod], group: &str) -> Vec<Pod> {
    pods.iter()
        .filter(|p| p.labels().get(GROUP_LABEL).map(String::as_str) == Some(group))
        .cloned()
        .collect()
}

/// Datacenters, constraints, affinities and spreads reach the real scheduler as node
/// affinity, preferences and topology rules: every pod lands where the jobspec says.
#[tokio::test]
async fn placement_honours_datacenters_constraints_affinities_and_spreads() -> Result<()> {
    let s = Setup::new("e2e-jobs-place").await?;
    // The shared nodes (hack/cluster.sh): two per datacenter.
    let regions: BTreeMap<String, String> = node_labels(&s.client, REGION_LABEL)
        .await?
        .into_iter()
        .filter(|(n, _)| !n.starts_with("e2e-"))
        .collect();
    let in_region = |dc: &str| -> Vec<String> {
        regions
            .iter()
            .filter(|(_, r)| *r == dc)
            .map(|(n, _)| n.clone())
            .collect()
    };
    let (dc1, dc2) = (in_region("dc1"), in_region("dc2"));
    ensure!(
        dc1.len() >= 2 && dc2.len() >= 2,
        "two nodes per datacenter: {regions:?}"
    );
    let group = |name: &str, count: i32, extra: Value| -> Value {
        let mut g = json!({"name": name, "count": count, "tasks": [task("app:1")]});
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            g[k] = v;
        }
        g
    };
    s.apply(&job_manifest(
        "dc2-only",
        json!({
            "datacenters": ["dc2"],
            "groups": [
                group("any", 3, json!({})),
                group("constrained", 2, json!({"constraints": [
                    {"attribute": "${node.unique.name}", "operator": "!=", "value": dc2[0]},
                ]})),
            ],
        }),
    ))?;
    s.apply(&job_manifest(
        "spread",
        json!({
            // A glob, evaluated against the nodes' datacenters.
            "datacenters": ["dc*"],
            "groups": [
                group("prefer", 1, json!({"affinities": [
                    {"attribute": "${node.unique.name}", "operator": "=", "value": dc1[1], "weight": 100},
                ]})),
                group("avoid", 2, json!({"affinities": [
                    {"attribute": "${node.datacenter}", "operator": "=", "value": "dc1", "weight": -100},
                ]})),
                // An operator Kubernetes lacks, evaluated against the nodes' names.
                group("matched", 2, json!({"constraints": [
                    {"attribute": "${node.unique.name}", "operator": "regexp", "value": format!("^{}$", dc1[0])},
                ]})),
                group("even", 4, json!({"spreads": [{"attribute": "${node.datacenter}"}]})),
                group("targets", 10, json!({"spreads": [{"attribute": "${node.datacenter}", "targets": [
                    {"value": "dc1", "percent": 70}, {"value": "dc2", "percent": 30},
                ]}]})),
            ],
        }),
    ))?;
    s.wait("dc2-only", "5 running", |j| status_of(j).running == 5)
        .await?;
    let spread = s
        .wait("spread", "19 running", |j| status_of(j).running == 19)
        .await?;

    let pods = s.pods("dc2-only").await?;
    let any = count_by(&of_group(&pods, "any"), &regions);
    ensure!(
        any == BTreeMap::from([("dc2".into(), 3)]),
        "datacenters [dc2]: {any:?}"
    );
    let hosts = node_labels(&s.client, HOSTNAME_LABEL).await?;
    let constrained = count_by(&of_group(&pods, "constrained"), &hosts);
    ensure!(
        constrained == BTreeMap::from([(dc2[1].clone(), 2)]),
        "dc2 without {}: {constrained:?}",
        dc2[0]
    );

    let pods = s.pods("spread").await?;
    let prefer = count_by(&of_group(&pods, "prefer"), &hosts);
    ensure!(
        prefer == BTreeMap::from([(dc1[1].clone(), 1)]),
        "weight 100 for {}: {prefer:?}",
        dc1[1]
    );
    let matched = count_by(&of_group(&pods, "matched"), &hosts);
    ensure!(
        matched == BTreeMap::from([(dc1[0].clone(), 2)]),
        "regexp ^{}$: {matched:?}",
        dc1[0]
    );
    let avoid = count_by(&of_group(&pods, "avoid"), &regions);
    ensure!(
        avoid == BTreeMap::from([("dc2".into(), 2)]),
        "weight -100 for dc1: {avoid:?}"
    );
    let even = count_by(&of_group(&pods, "even"), &regions);
    ensure!(
        even == BTreeMap::from([("dc1".into(), 2), ("dc2".into(), 2)]),
        "an even spread: {even:?}"
    );
    let targets = count_by(&of_group(&pods, "targets"), &regions);
    ensure!(
        targets == BTreeMap::from([("dc1".into(), 7), ("dc2".into(), 3)]),
        "70% / 30% of 10: {targets:?}"
    );

    // The status says the same, per group and datacenter.
    let summary = status_of(&spread).summary;
    let placed = |group: &str, dc: &str| {
        summary
            .iter()
            .find(|g| g.group == group && g.datacenter == dc)
            .map(|g| (g.desired, g.placed, g.running))
    };
    ensure!(
        placed("targets", "dc1") == Some((7, 7, 7)) && placed("targets", "dc2") == Some((3, 3, 3)),
        "the summary per datacenter: {summary:?}"
    );
    Ok(())
}

/// On a full cluster (one node of one CPU), a priority-80 job's pod takes the place of a
/// priority-20 job's: Capstan's PriorityClasses, the real scheduler's preemption.
#[tokio::test]
async fn a_higher_priority_job_preempts_a_lower_one_on_a_full_cluster() -> Result<()> {
    let s = Setup::new("e2e-jobs-preempt").await?;
    let mut nodes = TestNodes::new(&s.client, s.ns());
    let node = nodes.add(NodeSpec::in_pool(s.ns(), "dc1").cpu("1")).await?;
    let job = |name: &str, priority: i32, count: i32| {
        job_manifest(
            name,
            json!({
                "priority": priority,
                "constraints": [in_pool(s.ns())],
                "groups": [{"name": "work", "count": count, "tasks": [
                    {"name": "app", "image": "app:1", "resources": {"cpu": "500m", "memory": "64Mi"}},
                ]}],
            }),
        )
    };
    s.apply(&job("low", 20, 2))?;
    s.wait("low", "both allocations running", |j| status_of(j).running == 2)
        .await?;

    s.apply(&job("high", 80, 1))?;
    s.wait("high", "its allocation running", |j| status_of(j).running == 1)
        .await?;
    let low = s
        .wait("low", "one allocation left running", |j| {
            let st = status_of(j);
            st.running == 1 && st.desired == 2
        })
        .await?;
    let high = s.pods("high").await?;
    ensure!(
        high.len() == 1 && node_of(&high[0]) == Some(node.as_str()),
        "{high:?}"
    );
    ensure!(
        high[0]
            .spec
            .as_ref()
            .and_then(|p| p.priority_class_name.as_deref())
            == Some("capstan-priority-80"),
        "the pod runs at its job's priority"
    );
    // The low job's replacement waits for room: it is not placed over the higher one.
    let waiting: Vec<_> = s
        .pods("low")
        .await?
        .into_iter()
        .filter(|p| node_of(p).is_none())
        .collect();
    ensure!(
        waiting.len() == 1,
        "one low pod pending: {:?}",
        status_of(&low).summary
    );

    // The scheduler preempted a low pod for it.
    let events = Api::<CoreEvent>::namespaced(s.client.clone(), s.ns());
    eventually(STEP, "a Preempted event", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("Preempted"))
            .then_some(())
    })
    .await?;
    let classes = Api::<PriorityClass>::all(s.client.clone());
    for priority in [20, 80] {
        let class = classes.get(&format!("capstan-priority-{priority}")).await?;
        ensure!(class.value == priority, "{class:?}");
        ensure!(
            class.preemption_policy.as_deref() == Some("PreemptLowerPriority"),
            "{class:?}"
        );
    }
    Ok(())
}

/// A new version places its canary beside the stable allocations, promotes it once it
/// has been healthy for minHealthyTime, then rolls the rest.
#[tokio::test]
async fn a_canary_update_auto_promotes_after_min_healthy_time() -> Result<()> {
    let s = Setup::new("e2e-jobs-canary").await?;
    let update = json!({"canary": 1, "maxParallel": 1, "minHealthyTime": "1s",
                        "healthyDeadline": "10s", "progressDeadline": "20s", "autoPromote": true});
    s.deployed(&service("web", 3, "app:1", update.clone()), 1, 3)
        .await?;
    let watch = PodWatch::start(&s.client, s.ns(), "web").await?;

    s.apply(&service("web", 3, "app:2", update))?;
    let done = s
        .wait("web", "version 2 promoted and stable", |j| {
            let st = status_of(j);
            st.stable_version == Some(2)
                && st.running_version == Some(2)
                && st.deployment.as_ref().is_some_and(|d| {
                    d.version == 2 && d.promoted && d.status == "successful" && d.canaries_desired == 1
                })
        })
        .await?;
    s.settled("web", 2, 3).await?;

    let promoted = wait_event(&s.client, s.ns(), "web", "DeploymentPromoted").await?;
    let promoted_at = event_time(&promoted).context("the promotion's time")?;
    let history = watch.history();
    // The canary ran beside all three stable allocations, alone, until the promotion...
    let canary_ready = history
        .iter()
        .find(|h| h.available_of_version(2) == 1)
        .context("the canary never became ready")?;
    ensure!(
        canary_ready.live_of_version(1) == 3,
        "the canary ran beside the stable version: {canary_ready:?}"
    );
    ensure!(
        history
            .iter()
            .take_while(|h| h.at < promoted_at)
            .all(|h| h.live_of_version(2) <= 1 && h.live_of_version(1) == 3),
        "a second canary, or a stable allocation stopped, before the promotion: {history:?}"
    );
    // ...which came once it had been healthy for minHealthyTime (1s; Event times are
    // kept to the microsecond, the watch adds its latency to the canary's side).
    let waited = promoted_at.duration_since(canary_ready.at);
    ensure!(
        waited >= jiff::SignedDuration::from_millis(900),
        "promoted {waited:?} after the canary turned healthy, before minHealthyTime (1s)"
    );
    for reason in [
        "DeploymentStarted",
        "CanariesPlaced",
        "DeploymentPromoted",
        "DeploymentSucceeded",
    ] {
        wait_event(&s.client, s.ns(), "web", reason).await?;
    }
    ensure!(
        job_ready(&done).is_some_and(|(status, _)| status == "True"),
        "{:?}",
        job_ready(&done)
    );
    Ok(())
}

/// A canary that turns unhealthy fails the deployment; with autoRevert the job runs its
/// stable version again, and says so, while its spec is left as the user wrote it.
#[tokio::test]
async fn an_unhealthy_canary_fails_the_deployment_and_auto_reverts() -> Result<()> {
    let s = Setup::new("e2e-jobs-unhealthy").await?;
    let update = json!({"canary": 1, "minHealthyTime": "3s", "healthyDeadline": "5s",
                        "progressDeadline": "10s", "autoPromote": true, "autoRevert": true});
    s.deployed(&service("web", 2, "app:1", update.clone()), 1, 2)
        .await?;

    let updated = service("web", 2, "app:2", update);
    s.apply(&updated)?;
    // Its readiness fails well within minHealthyTime: once kwok has started it (a pod
    // still Pending would be made Ready again by kwok's stage).
    let canary = eventually(STEP, "the canary running", || async {
        s.pods("web")
            .await
            .ok()?
            .into_iter()
            .find(|p| version_of(p) == Some(2) && phase(p) == Some("Running") && is_ready(p))
    })
    .await
    .map_err(|e| s.failed(e))?;
    set_pod_ready(&s.client, s.ns(), &canary.name_any(), false).await?;

    expect_reverted(&s, &updated, 2, 1).await?;
    wait_event(&s.client, s.ns(), "web", "DeploymentFailed").await?;
    wait_event(&s.client, s.ns(), "web", "DeploymentReverted").await?;
    Ok(())
}

/// A canary that cannot become healthy before its deadline (no node fits it) fails the
/// deployment, and autoRevert returns the job to its stable version.
#[tokio::test]
async fn canaries_that_miss_their_deadline_fail_and_auto_revert() -> Result<()> {
    let s = Setup::new("e2e-jobs-deadline").await?;
    let update = json!({"canary": 1, "minHealthyTime": "1s", "healthyDeadline": "3s",
                        "progressDeadline": "4s", "autoPromote": true, "autoRevert": true});
    let manifest = service("web", 2, "app:1", update);
    s.deployed(&manifest, 1, 2).await?;

    let mut unplaceable = manifest.clone();
    unplaceable["spec"]["groups"][0]["constraints"] =
        json!([{"attribute": "${node.unique.name}", "operator": "=", "value": "no-such-node"}]);
    s.apply(&unplaceable)?;
    let canary = s.pod_of_version("web", 2).await?;
    ensure!(node_of(&canary).is_none(), "the canary cannot be placed");

    expect_reverted(&s, &unplaceable, 2, 1).await?;
    Ok(())
}

/// After a failed deployment of version `failed` (`applied`) with autoRevert: the job
/// runs `stable` again (its pods, status and Ready condition say so), and its spec is
/// still what was applied.
async fn expect_reverted(s: &Setup, applied: &Value, failed: i64, stable: i64) -> Result<()> {
    let name = applied["metadata"]["name"].as_str().context("a name")?;
    let job = s
        .wait(name, &format!("version {failed} reverted to {stable}"), |j| {
            let st = status_of(j);
            st.version == Some(failed)
                && st.stable_version == Some(stable)
                && st.running_version == Some(stable)
                && st.deployment.as_ref().is_some_and(|d| {
                    d.version == failed && d.status == "reverted" && d.reverted_to == Some(stable)
                })
        })
        .await?;
    ensure!(
        job_ready(&job) == Some(("False".into(), "DeploymentReverted".into())),
        "{:?}",
        job_ready(&job)
    );
    s.settled(name, stable, 2).await?;
    // The spec is the user's: a revert changes what runs, not what was asked for.
    let stored = serde_json::to_value(jobs_api(&s.client, s.ns()).get(name).await?.spec)?;
    let (stored, applied) = (&stored["groups"][0], &applied["spec"]["groups"][0]);
    ensure!(
        stored["tasks"][0]["image"] == applied["tasks"][0]["image"]
            && stored.get("constraints") == applied.get("constraints"),
        "the spec changed: {stored}"
    );
    Ok(())
}

/// Canaries wait for a manual promote (`capstan job promote`); `capstan job revert`
/// then runs an earlier version's spec again as a new version.
#[tokio::test]
async fn manual_promote_and_revert_to_an_earlier_version() -> Result<()> {
    let s = Setup::new("e2e-jobs-promote").await?;
    let update = json!({"canary": 1, "maxParallel": 2, "minHealthyTime": "1s",
                        "healthyDeadline": "10s", "progressDeadline": "20s"});
    s.deployed(&service("web", 2, "app:1", update.clone()), 1, 2)
        .await?;
    s.apply(&service("web", 2, "app:2", update))?;
    s.wait("web", "the canary of version 2 healthy", |j| {
        status_of(j)
            .deployment
            .is_some_and(|d| d.version == 2 && d.canaries_healthy == 1 && !d.promoted)
    })
    .await?;
    // Healthy for longer than minHealthyTime, and still waiting: no auto_promote.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let job = jobs_api(&s.client, s.ns()).get("web").await?;
    let deployment = status_of(&job).deployment.context("a deployment")?;
    ensure!(
        !deployment.promoted && deployment.status == "paused",
        "{deployment:?}"
    );
    ensure!(status_of(&job).stable_version == Some(1));

    let capstan = bin("capstan");
    let capstan = capstan.to_str().unwrap();
    run(capstan, &["job", "promote", "web", "-n", s.ns()])?;
    s.wait("web", "version 2 promoted and stable", |j| {
        status_of(j).stable_version == Some(2) && status_of(j).running_version == Some(2)
    })
    .await?;
    s.settled("web", 2, 2).await?;

    // Back to version 1's spec, as version 3; its canary is promoted by hand too.
    run(capstan, &["job", "revert", "web", "1", "-n", s.ns()])?;
    s.wait("web", "version 3 deploying", |j| {
        status_of(j)
            .deployment
            .is_some_and(|d| d.version == 3 && d.canaries_healthy == 1)
    })
    .await?;
    run(capstan, &["job", "promote", "web", "-n", s.ns()])?;
    s.wait("web", "version 3 stable", |j| {
        status_of(j).stable_version == Some(3)
    })
    .await?;
    let pods = s.settled("web", 3, 2).await?;
    ensure!(
        pods.iter().all(|p| p
            .spec
            .as_ref()
            .is_some_and(|s| s.containers[0].image.as_deref() == Some("app:1"))),
        "version 3 runs version 1's image"
    );
    let job = jobs_api(&s.client, s.ns()).get("web").await?;
    ensure!(
        job.spec.groups[0].tasks[0].image == "app:1",
        "the spec is version 1's again"
    );
    Ok(())
}

/// A rolling update never has more than maxParallel allocations unavailable: checked at
/// every state the pods pass through, from a watch.
#[tokio::test]
async fn max_parallel_bounds_unavailable_allocations_at_every_step() -> Result<()> {
    let s = Setup::new("e2e-jobs-parallel").await?;
    let update = json!({"maxParallel": 2, "minHealthyTime": "1s", "healthyDeadline": "10s",
                        "progressDeadline": "20s"});
    s.deployed(&service("web", 4, "app:1", update.clone()), 1, 4)
        .await?;
    let watch = PodWatch::start(&s.client, s.ns(), "web").await?;
    let started = Instant::now();

    s.apply(&service("web", 4, "app:2", update))?;
    s.wait("web", "version 2 stable", |j| {
        status_of(j).stable_version == Some(2)
    })
    .await?;
    s.settled("web", 2, 4).await?;
    let elapsed = started.elapsed();

    let history = watch.history();
    for (step, snapshot) in history.iter().enumerate() {
        ensure!(
            snapshot.available() >= 2,
            "step {step}: only {} of 4 available with maxParallel 2: {snapshot:?}",
            snapshot.available()
        );
    }
    // It rolled: a moment with both versions serving...
    ensure!(
        history
            .iter()
            .any(|h| h.available_of_version(1) >= 1 && h.available_of_version(2) >= 1),
        "never both versions at once: {history:?}"
    );
    // ...and in batches: no more than 2 new allocations until the first ones had been
    // healthy for minHealthyTime (a rollout that surged all 4 at once would keep every
    // old one available, and still not respect maxParallel).
    let first = history
        .iter()
        .find(|h| h.live_of_version(2) >= 1)
        .context("no allocation of version 2")?;
    let beyond = history
        .iter()
        .find(|h| h.live_of_version(2) > 2)
        .context("version 2 never grew past the first batch")?;
    let between = beyond.at.duration_since(first.at);
    ensure!(
        between >= jiff::SignedDuration::from_millis(900),
        "a second batch {between:?} after the first, before it was healthy for minHealthyTime"
    );
    ensure!(
        elapsed >= Duration::from_secs(1),
        "too fast for two healthy batches: {elapsed:?}"
    );
    Ok(())
}

/// A batch job runs as a batch/v1 Job per group, and its status reports completion.
#[tokio::test]
async fn a_batch_job_runs_to_completion_and_reports_it() -> Result<()> {
    let s = Setup::new("e2e-jobs-batch").await?;
    s.apply(&job_manifest(
        "report",
        json!({"type": "batch", "groups": [{"name": "render", "count": 2, "tasks": [task("report:1")]}]}),
    ))?;
    let job = s
        .wait("report", "complete", |j| {
            status_of(j).phase.as_deref() == Some("complete")
        })
        .await?;
    let summary = status_of(&job).summary;
    let complete: i32 = summary
        .iter()
        .filter(|g| g.group == "render")
        .map(|g| g.complete)
        .sum();
    ensure!(complete == 2, "two allocations complete: {summary:?}");
    let batch = Api::<BatchJob>::namespaced(s.client.clone(), s.ns())
        .get("report-render-v1")
        .await?;
    ensure!(
        batch.status.as_ref().and_then(|st| st.succeeded) == Some(2),
        "{:?}",
        batch.status
    );
    ensure!(
        batch
            .owner_references()
            .iter()
            .any(|o| o.kind == "Job" && o.name == "report" && o.controller == Some(true)),
        "owned by the cjob"
    );
    Ok(())
}

/// A periodic job is a CronJob the real CronJob controller launches. The test does not
/// wait for a minute to pass first: it moves the CronJob's lastScheduleTime back, as if
/// the controller had been down over a scheduled time, which the CronJob controller
/// makes up for at once. While that run is still running (its pod has no node to go to
/// yet), the next minute's launch is refused (prohibit_overlap: concurrencyPolicy
/// Forbid); once it finished, the next launch goes ahead.
#[tokio::test]
async fn a_periodic_job_launches_and_prohibits_overlap() -> Result<()> {
    let s = Setup::new("e2e-jobs-periodic").await?;
    let mut nodes = TestNodes::new(&s.client, s.ns());
    s.apply(&job_manifest(
        "nightly",
        json!({
            "type": "batch",
            "periodic": {"crons": ["* * * * *"], "timeZone": "Europe/Paris", "prohibitOverlap": true},
            "groups": [{"name": "run", "constraints": [in_pool(s.ns())], "tasks": [task("nightly:1")]}],
        }),
    ))?;
    let cronjobs = Api::<CronJob>::namespaced(s.client.clone(), s.ns());
    let cronjob = eventually(STEP, "the CronJob", || async {
        cronjobs.get("nightly-run-cron0").await.ok()
    })
    .await
    .map_err(|e| s.failed(e))?;
    let spec = cronjob.spec.as_ref().context("spec")?;
    ensure!(spec.schedule == "* * * * *", "{spec:?}");
    ensure!(
        spec.time_zone.as_deref() == Some("Europe/Paris"),
        "the time zone kept: {spec:?}"
    );
    ensure!(spec.concurrency_policy.as_deref() == Some("Forbid"), "{spec:?}");
    ensure!(spec.suspend != Some(true), "{spec:?}");

    let make_up_a_missed_run = || async {
        let two_minutes_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(120);
        cronjobs
            .patch_status(
                "nightly-run-cron0",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"lastScheduleTime": two_minutes_ago.to_string()}})),
            )
            .await
    };
    make_up_a_missed_run().await?;
    let batch_jobs = Api::<BatchJob>::namespaced(s.client.clone(), s.ns());
    let launched = |count: usize| {
        let batch_jobs = batch_jobs.clone();
        async move {
            let list = batch_jobs.list(&ListParams::default()).await.ok()?;
            (list.items.len() == count).then_some(list.items)
        }
    };
    let first = eventually(STEP, "the first launch", || launched(1)).await?;
    let first = first[0].name_any();
    s.wait("nightly", "the launch among its children", |j| {
        status_of(j).children.iter().any(|c| c.name == first)
    })
    .await?;

    // The next minute's launch: refused while the first runs.
    let events = Api::<CoreEvent>::namespaced(s.client.clone(), s.ns());
    eventually(
        Duration::from_secs(75),
        "the CronJob controller refusing an overlapping launch",
        || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| e.reason.as_deref() == Some("JobAlreadyActive"))
                .then_some(())
        },
    )
    .await?;
    ensure!(
        batch_jobs.list(&ListParams::default()).await?.items.len() == 1,
        "a second launch overlapped"
    );

    // A node for the run: it runs and completes, and the next launch goes ahead.
    nodes.add(NodeSpec::in_pool(s.ns(), "dc1")).await?;
    s.wait("nightly", "the first launch complete", |j| {
        status_of(j)
            .children
            .iter()
            .any(|c| c.name == first && c.status == "complete")
    })
    .await?;
    make_up_a_missed_run().await?;
    eventually(STEP, "a second launch", || launched(2)).await?;
    Ok(())
}

/// A parameterized job runs nothing itself; `capstan job dispatch` starts a child with
/// the meta as NOMAD_META_* and the payload as a file; a child that lacks required meta
/// is refused at admission, naming the field.
#[tokio::test]
async fn a_dispatch_runs_with_its_meta_and_payload_and_missing_meta_is_refused() -> Result<()> {
    let s = Setup::new("e2e-jobs-dispatch").await?;
    let _webhook = WebhookProcess::start(&s.client, &["--ca-url", "https://127.0.0.1:8200"]).await?;
    s.apply(&job_manifest(
        "report",
        json!({
            "type": "batch",
            "parameterized": {"payload": "optional", "metaRequired": ["customer"]},
            "groups": [{"name": "render", "tasks": [{
                "name": "render", "image": "report:1", "dispatchPayload": {"file": "input.json"},
                "args": ["--customer", "${NOMAD_META_customer}"],
            }]}],
        }),
    ))?;
    let payload = std::env::temp_dir().join(format!("{}-input.json", s.ns()));
    std::fs::write(&payload, r#"{"rows": 3}"#)?;
    let capstan = bin("capstan");
    run(
        capstan.to_str().unwrap(),
        &[
            "job",
            "dispatch",
            "report",
            "-n",
            s.ns(),
            "--meta",
            "customer=acme",
            "--payload",
            payload.to_str().unwrap(),
        ],
    )?;
    let _ = std::fs::remove_file(&payload);

    let jobs = jobs_api(&s.client, s.ns());
    let child = eventually(STEP, "the dispatched child", || async {
        let list = jobs
            .list(&ListParams::default().labels(&format!("{PARENT_LABEL}=report")))
            .await
            .ok()?;
        list.items.into_iter().next()
    })
    .await?;
    let child_name = child.name_any();
    ensure!(child.spec.parameterized.is_none(), "a child is not parameterized");
    ensure!(
        child
            .owner_references()
            .iter()
            .any(|o| o.name == "report" && o.controller != Some(true)),
        "owned by its parent, not controlled: {:?}",
        child.owner_references()
    );
    s.wait(&child_name, "complete", |j| {
        status_of(j).phase.as_deref() == Some("complete")
    })
    .await?;
    s.wait("report", "the child among its children", |j| {
        status_of(j).children.iter().any(|c| c.name == child_name)
    })
    .await?;
    ensure!(
        job_pods(&s.client, s.ns(), "report").await?.is_empty(),
        "the parent itself runs nothing"
    );

    let pods = job_pods(&s.client, s.ns(), &child_name).await?;
    let pod = pods.first().context("the child's pod")?;
    let spec = pod.spec.as_ref().context("spec")?;
    let container = &spec.containers[0];
    let env: BTreeMap<_, _> = container
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e.value.as_deref().unwrap_or_default()))
        .collect();
    ensure!(env.get("NOMAD_META_customer") == Some(&"acme"), "{env:?}");
    ensure!(env.get("NOMAD_JOB_PARENT_ID") == Some(&"report"), "{env:?}");
    ensure!(
        container.args.as_deref()
            == Some(&["--customer".to_owned(), "$(NOMAD_META_customer)".to_owned()][..]),
        "the interpolation is Kubernetes' own: {:?}",
        container.args
    );
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| {
            v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(&format!("{child_name}-payload"))
        })
        .context("the payload volume")?;
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume.name)
        .context("the payload mount")?;
    ensure!(
        mount.mount_path == "/local/input.json" && mount.read_only == Some(true),
        "the payload at /local/input.json, read-only: {mount:?}"
    );
    let secret = Api::<Secret>::namespaced(s.client.clone(), s.ns())
        .get(&format!("{child_name}-payload"))
        .await?;
    let data = secret.data.unwrap_or_default();
    ensure!(
        data.values().any(|v| v.0 == br#"{"rows": 3}"#),
        "the payload in its Secret: {:?}",
        data.keys()
    );

    // A child without the required meta, written directly: refused at the door.
    let mut bare = child.clone();
    bare.metadata = kube::api::ObjectMeta {
        name: Some("report-nometa".into()),
        ..Default::default()
    };
    bare.status = None;
    if let Some(dispatch) = bare.spec.dispatch.as_mut() {
        dispatch.meta.clear();
    }
    let refused = apply_refused(s.ns(), &serde_json::to_value(&bare)?)?;
    ensure!(
        refused.contains("spec.dispatch.meta") && refused.contains("customer"),
        "the refusal names the field and the key: {refused}"
    );
    Ok(())
}

/// A system job runs one allocation on every eligible node (a tainted node is not), and
/// follows nodes as they join and leave.
#[tokio::test]
async fn a_system_job_covers_every_eligible_node_as_nodes_join_and_leave() -> Result<()> {
    let s = Setup::new("e2e-jobs-system").await?;
    let mut nodes = TestNodes::new(&s.client, s.ns());
    let a = nodes.add(NodeSpec::in_pool(s.ns(), "dc1")).await?;
    let b = nodes.add(NodeSpec::in_pool(s.ns(), "dc2")).await?;
    nodes
        .add(NodeSpec::in_pool(s.ns(), "dc1").taint("dedicated", "gpu", "NoSchedule"))
        .await?;
    s.apply(&job_manifest(
        "agent",
        json!({"type": "system", "constraints": [in_pool(s.ns())],
               "groups": [{"name": "agent", "tasks": [task("agent:1")]}]}),
    ))?;
    let on_nodes = |expected: Vec<String>| {
        let s = &s;
        async move {
            eventually(
                STEP,
                &format!("one allocation on each of {expected:?}"),
                || async {
                    let mut placed: Vec<String> = s
                        .pods("agent")
                        .await
                        .ok()?
                        .iter()
                        .filter(|p| is_ready(p))
                        .filter_map(|p| node_of(p).map(str::to_owned))
                        .filter(|n| nodes_alive(n))
                        .collect();
                    placed.sort();
                    (placed == expected).then_some(())
                },
            )
            .await
            .map_err(|e| s.failed(e))
        }
    };
    on_nodes(vec![a.clone(), b.clone()]).await?;
    s.wait("agent", "2 desired, 2 running", |j| {
        status_of(j).desired == 2 && status_of(j).running == 2
    })
    .await?;

    let c = nodes.add(NodeSpec::in_pool(s.ns(), "dc2")).await?;
    on_nodes(vec![a.clone(), b.clone(), c.clone()]).await?;
    s.wait("agent", "3 desired", |j| status_of(j).desired == 3)
        .await?;

    // The DaemonSet controller recounts only once the pod garbage collector removed the
    // orphaned pod (a quarantine of about a minute); the job's status counts nodes.
    nodes.remove(&b).await?;
    s.wait("agent", "2 desired", |j| status_of(j).desired == 2)
        .await?;
    let daemonsets = Api::<DaemonSet>::namespaced(s.client.clone(), s.ns())
        .list(&ListParams::default().labels(&format!("{JOB_LABEL}=agent")))
        .await?;
    ensure!(daemonsets.items.len() == 1, "one DaemonSet for the group");
    Ok(())
}

/// Pods on a deleted node linger until the pod garbage collector's quarantine ends;
/// placement checks look only at nodes that exist.
fn nodes_alive(node: &str) -> bool {
    std::process::Command::new("kubectl")
        .args(["get", "node", node, "-o", "name"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A sysbatch job runs to completion once on every eligible node. A node that joins
/// while the job still runs gets its run; once every run has finished the job is
/// complete, and a node that joins later runs nothing (Nomad's sysbatch: a dead job is
/// not placed again until a new version).
#[tokio::test]
async fn a_sysbatch_job_runs_once_per_eligible_node() -> Result<()> {
    let s = Setup::new("e2e-jobs-sysbatch").await?;
    let mut nodes = TestNodes::new(&s.client, s.ns());
    // Eligible, but full: its run waits, so the job still runs when the next node joins.
    let full = nodes.add(NodeSpec::in_pool(s.ns(), "dc1").pods("0")).await?;
    let b = nodes.add(NodeSpec::in_pool(s.ns(), "dc2")).await?;
    s.apply(&job_manifest(
        "sweep",
        json!({"type": "sysbatch", "constraints": [in_pool(s.ns())],
               "groups": [{"name": "sweep", "tasks": [task("sweep:1")]}]}),
    ))?;
    // The runs as (nodes with one completed run each, runs waiting for a node).
    let runs = |completed: Vec<&String>, waiting: usize| {
        let s = &s;
        let mut completed: Vec<String> = completed.into_iter().cloned().collect();
        completed.sort();
        async move {
            eventually(
                STEP,
                &format!("one completed run on each of {completed:?} and {waiting} waiting"),
                || async {
                    let pods = job_pods(&s.client, s.ns(), "sweep").await.ok()?;
                    let mut done: Vec<String> = pods
                        .iter()
                        .filter(|p| phase(p) == Some("Succeeded"))
                        .filter_map(|p| node_of(p).map(str::to_owned))
                        .collect();
                    done.sort();
                    let pending = pods.iter().filter(|p| node_of(p).is_none()).count();
                    (done == completed && pending == waiting && pods.len() == done.len() + waiting)
                        .then_some(())
                },
            )
            .await
            .map_err(|e| s.failed(e))
        }
    };
    runs(vec![&b], 1).await?;
    let job = jobs_api(&s.client, s.ns()).get("sweep").await?;
    ensure!(
        status_of(&job).phase.as_deref() != Some("complete"),
        "a run still waits"
    );

    let c = nodes.add(NodeSpec::in_pool(s.ns(), "dc2")).await?;
    runs(vec![&b, &c], 1).await?;
    nodes.set_pods(&full, "110").await?;
    runs(vec![&full, &b, &c], 0).await?;
    s.wait("sweep", "complete", |j| {
        status_of(j).phase.as_deref() == Some("complete")
    })
    .await?;

    // Complete: a node that joins now runs nothing.
    let late = nodes.add(NodeSpec::in_pool(s.ns(), "dc1")).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pods = job_pods(&s.client, s.ns(), "sweep").await?;
    ensure!(
        pods.len() == 3 && pods.iter().all(|p| node_of(p) != Some(late.as_str())),
        "a run after the job completed: {:?}",
        pods.iter()
            .map(|p| (p.name_any(), node_of(p).map(str::to_owned)))
            .collect::<Vec<_>>()
    );
    let batch = Api::<BatchJob>::namespaced(s.client.clone(), s.ns())
        .list(&ListParams::default().labels(&format!("{JOB_LABEL}=sweep")))
        .await?;
    ensure!(
        batch.items.len() == 3,
        "one batch Job per node that was eligible while it ran"
    );
    Ok(())
}

/// `connect` and `vault` make the pod ask for the mesh proxy and the secrets agent; the
/// webhook from the chart injects both, and the upstream is given to the task.
#[tokio::test]
async fn connect_and_vault_blocks_produce_an_injected_pod() -> Result<()> {
    let s = Setup::new("e2e-jobs-inject").await?;
    let _release = ReleasePods(s.ns().to_owned());
    let webhook = WebhookProcess::start(&s.client, &["--ca-url", "https://127.0.0.1:8200"]).await?;
    s.apply(&job_manifest(
        "api",
        json!({"groups": [{
            "name": "api",
            "connect": {"upstreams": [{"destinationName": "db", "localBindPort": 9001}]},
            "vault": {"role": "api"},
            "tasks": [{
                "name": "api", "image": "api:1", "ports": [{"name": "http", "port": 8080}],
                "templates": [{
                    "destination": "db.env",
                    "data": "{{ with secret \"database/creds/api\" }}DB_PASSWORD={{ .Data.password }}{{ end }}",
                }],
            }],
        }]}),
    ))?;
    let pod = eventually(STEP, "the job's pod", || async {
        s.pods("api").await.ok()?.into_iter().next()
    })
    .await
    .map_err(|e| s.failed(e))?;
    let spec = pod.spec.as_ref().context("spec")?;
    let inits: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    ensure!(
        is_injected(&pod),
        "the mesh proxy: {inits:?}\nthe webhook's log:\n{}",
        tail(&webhook.logs(), 30)
    );
    ensure!(inits.contains(&"capstan-agent"), "the secrets agent: {inits:?}");
    let app = spec
        .containers
        .iter()
        .find(|c| c.name == "api")
        .context("the task")?;
    let env: BTreeMap<_, _> = app
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e.value.as_deref().unwrap_or_default()))
        .collect();
    ensure!(
        env.get("NOMAD_UPSTREAM_ADDR_db") == Some(&"127.0.0.1:9001"),
        "{env:?}"
    );
    Ok(())
}

/// A jobspec that cannot compile (an attribute with no node label) is refused at apply,
/// naming the field: one case here; e2e_jobs_admission.rs has the rest.
#[tokio::test]
async fn an_invalid_jobspec_is_refused_naming_the_field() -> Result<()> {
    let client = client().await;
    let _webhook = WebhookProcess::start(&client, &["--ca-url", "https://127.0.0.1:8200"]).await?;
    let ns = TestNamespace::new(&client, "e2e-jobs-invalid").await;
    let refused = apply_refused(
        &ns.name,
        &job_manifest(
            "bad",
            json!({"groups": [{"name": "web", "tasks": [task("app:1")], "constraints": [
                {"attribute": "${node.unique.name}", "operator": "regexp", "value": "(unclosed"},
            ]}]}),
        ),
    )?;
    ensure!(
        refused.contains("spec.groups[0].constraints[0].value"),
        "the refusal names the field: {refused}"
    );
    Ok(())
}

/// The controller is killed (SIGKILL) while a canary waits for promotion. Its successor
/// finds the deployment in the API (ReplicaSets, revisions, status) and carries on: no
/// second canary set, and a promote still completes the deployment.
#[tokio::test]
async fn a_controller_killed_mid_deployment_resumes_without_a_second_canary_set() -> Result<()> {
    let mut s = Setup::new("e2e-jobs-killed").await?;
    let update = json!({"canary": 1, "minHealthyTime": "1s", "healthyDeadline": "10s",
                        "progressDeadline": "30s"});
    s.deployed(&service("web", 2, "app:1", update.clone()), 1, 2)
        .await?;
    let watch = PodWatch::start(&s.client, s.ns(), "web").await?;
    s.apply(&service("web", 2, "app:2", update))?;
    s.wait("web", "the canary healthy and waiting", |j| {
        status_of(j)
            .deployment
            .is_some_and(|d| d.version == 2 && d.canaries_healthy == 1 && !d.promoted)
    })
    .await?;

    s.controller.signal("KILL");
    s.controller.wait_exit(Duration::from_secs(10)).await?;
    s.controller = ControllerProcess::sole(&s.client, "e2e-jobs-killed-2").await?;
    // The successor leads and has had time to reconcile what it found.
    eventually(STEP, "the successor leading", || async {
        (metric(&s.controller.metrics().await.ok()?, "capstan_controller_leader")? == 1.0).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let replicasets = Api::<ReplicaSet>::namespaced(s.client.clone(), s.ns())
        .list(&ListParams::default().labels(&format!("{JOB_LABEL}=web,{VERSION_LABEL}=2")))
        .await?;
    ensure!(
        replicasets.items.len() == 1,
        "one canary ReplicaSet: {:?}",
        replicasets.items.iter().map(|r| r.name_any()).collect::<Vec<_>>()
    );
    let pods = s.pods("web").await?;
    let of = |v: i64| pods.iter().filter(|p| version_of(p) == Some(v)).count();
    ensure!(
        of(2) == 1 && of(1) == 2,
        "still one canary beside two stable: v1 {}, v2 {}\nthe pods seen: {:?}\nthe successor's log:\n{}",
        of(1),
        of(2),
        watch.history().last(),
        tail(&s.controller.logs(), 30)
    );

    let promoted_at = jiff::Timestamp::now();
    promote(&s.client, s.ns(), "web", 2).await?;
    s.wait("web", "version 2 stable", |j| {
        status_of(j).stable_version == Some(2)
    })
    .await?;
    s.settled("web", 2, 2).await?;
    ensure!(
        watch
            .history()
            .iter()
            .take_while(|h| h.at < promoted_at)
            .all(|h| h.live_of_version(2) <= 1),
        "a second canary was placed before the promote"
    );
    Ok(())
}
