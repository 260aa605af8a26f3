//! Jobs at scale (issue 17, point 6), against the same pods as plain Deployments in the
//! same run, on a real control plane with hundreds of kwok nodes and a release build of
//! capstan-controller:
//!
//! - for each size N (CAPSTAN_BENCH_JOBS, default `100,1000,5000`): N Jobs of 10 groups of
//!   count 1, and 10·N one-replica Deployments, each timed by a pod watch from the first
//!   create to every pod Running (the native path is the baseline: goal ≤ 1.1×); the
//!   controller's reconciles per second, CPU and peak RSS over the Jobs' run, and its RSS
//!   once it watches all 10·N pods (goal ≤ 200 MiB at 10,000); how each grows with N
//!   (goal: linear);
//! - a canary promote across CAPSTAN_BENCH_CANARY_JOBS (default 100) service Jobs (one
//!   canary each, autoPromote false, minHealthyTime 1s): every Job updated, the time to
//!   every canary healthy; then `spec.promote` set on all (what `capstan job promote`
//!   writes), the time to every deployment promoted and to every Job stable at the new
//!   version, each seen by a watch.
//!
//! The controller runs as a process with the chart's ServiceAccount, as the e2e tests run
//! it, but at the log level it ships with (info): debug logs of tens of thousands of pods
//! would be a cost of the benchmark, not of the controller.
//!
//! Run by `hack/bench-jobs.sh`; never part of the test suite. Figures go to stdout and
//! target/$CAPSTAN_BENCH_OUT.json (default `bench-jobs`), the controller's log to
//! target/$CAPSTAN_BENCH_OUT-controller.log.

use anyhow::{Context as _, Result, ensure};
use capstan_crds::jobs::Job;
use capstan_tests::{jobs::*, *};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Namespace, Pod},
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{Patch, PatchParams, PostParams},
    runtime::watcher,
};
use serde_json::{Value, json};
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const GROUPS: usize = 10;
/// Creates in flight at once, for both paths (a client applying manifests in parallel).
const CONCURRENCY: usize = 16;
const POOL: &str = "bench";
/// The longest any one wait may take.
const PATIENCE: Duration = Duration::from_secs(3600);

async fn within<T>(wait: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(PATIENCE, wait)
        .await
        .context("gave up after an hour")?
}

/// A list of sizes; set and empty runs none (the canary promote alone).
fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

/// What the run's files in target/ are named after (two runs at once keep theirs apart).
fn out_name() -> String {
    std::env::var("CAPSTAN_BENCH_OUT").unwrap_or_else(|_| "bench-jobs".to_owned())
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The controller's CPU time (user + system) and resident memory, from /proc.
struct Usage {
    cpu: Duration,
    rss_kib: u64,
}

fn usage(pid: &str) -> Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start at state, field 3.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let hz: u64 = run("getconf", &["CLK_TCK"])?.trim().parse()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS")?
        .parse()?;
    Ok(Usage {
        cpu: Duration::from_millis(ticks * 1000 / hz),
        rss_kib,
    })
}

/// Samples the controller's RSS every 250 ms until dropped; the peak.
struct PeakRss {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl PeakRss {
    fn start(pid: String) -> Self {
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task = tokio::spawn({
            let peak = peak.clone();
            async move {
                loop {
                    if let Ok(u) = usage(&pid) {
                        peak.fetch_max(u.rss_kib, std::sync::atomic::Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        });
        Self { peak, task }
    }

    fn mib(&self) -> f64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// capstan-controller as a process with the chart's ServiceAccount (as
/// [`ControllerProcess`] starts it), logging at info; killed on drop.
struct Controller {
    admin: SocketAddr,
    log: std::path::PathBuf,
    child: Child,
}

impl Controller {
    async fn start(client: &Client) -> Result<Self> {
        install_chart();
        clear_lease(client).await;
        let kubeconfig = serviceaccount_kubeconfig(client, SYSTEM_NAMESPACE, CONTROLLER_SA).await?;
        let admin = free_port();
        let log = repo_root().join(format!("target/{}-controller.log", out_name()));
        let child = Command::new(bin("capstan-controller"))
            .env("KUBECONFIG", &kubeconfig)
            .env("CAPSTAN_LOG", "info")
            .args(["--log-format", "json", "--identity", "bench-jobs"])
            .args(["--namespace", SYSTEM_NAMESPACE, "--lease-name", LEASE_NAME])
            .args(["--admin-addr", &admin.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting capstan-controller")?;
        let controller = Self { admin, log, child };
        eventually(Duration::from_secs(30), "the controller's /healthz", || async {
            (http_get(admin, "/healthz").await.ok()?.0 == 200).then_some(())
        })
        .await?;
        Ok(controller)
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// The jobs reconciler's runs so far (the series appears at its first run).
    async fn reconciles(&self) -> Result<f64> {
        let (code, text) = http_get(self.admin, "/metrics").await?;
        ensure!(code == 200, "/metrics answered {code}");
        Ok(labelled_metric(
            &text,
            "capstan_controller_reconcile_runs_total{controller=\"jobs\"}",
        )
        .unwrap_or(0.0))
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A namespace of the benchmark's own, deleted (and waited for) by [`drop_namespace`].
async fn namespace(client: &Client, name: &str) -> Result<()> {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    // The ServiceAccount admission plugin refuses pods until the default account exists.
    let accounts = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), name);
    eventually(Duration::from_secs(30), "the default ServiceAccount", || async {
        accounts.get_opt("default").await.ok()?.map(|_| ())
    })
    .await
}

async fn drop_namespace(client: &Client, name: &str) -> Result<Duration> {
    let started = Instant::now();
    let namespaces = Api::<Namespace>::all(client.clone());
    namespaces.delete(name, &Default::default()).await?;
    eventually(
        Duration::from_secs(1800),
        &format!("namespace {name} gone"),
        || async { namespaces.get_opt(name).await.ok()?.is_none().then_some(()) },
    )
    .await?;
    Ok(started.elapsed())
}

/// Starts watching `api` (its initial list is in when this returns); the returned future
/// ends, with the moment the watch saw it, once `expected` objects satisfy `check` at
/// the same time.
async fn all_hold<K>(
    api: Api<K>,
    expected: usize,
    check: impl Fn(&K) -> bool + Send + 'static,
) -> Result<impl Future<Output = Result<Instant>>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut events = Box::pin(watcher::watcher(api, watcher::Config::default()));
    let mut holding = BTreeSet::new();
    loop {
        match events.try_next().await? {
            Some(watcher::Event::InitApply(o)) if check(&o) => {
                holding.insert(o.name_any());
            }
            Some(watcher::Event::InitDone) => break,
            Some(_) => {}
            None => anyhow::bail!("the watch ended"),
        }
    }
    Ok(async move {
        while holding.len() < expected {
            match events.try_next().await? {
                Some(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    if check(&o) {
                        holding.insert(o.name_any());
                    } else {
                        holding.remove(&o.name_any());
                    }
                }
                Some(watcher::Event::Delete(o)) => {
                    holding.remove(&o.name_any());
                }
                Some(_) => {}
                None => anyhow::bail!("the watch ended"),
            }
        }
        Ok(Instant::now())
    })
}

/// Every pod of `ns` Running (see [`all_hold`]).
async fn running_pods(
    client: &Client,
    ns: &str,
    expected: usize,
) -> Result<impl Future<Output = Result<Instant>>> {
    all_hold(Api::<Pod>::namespaced(client.clone(), ns), expected, |pod| {
        phase(pod) == Some("Running")
    })
    .await
}

async fn create_all<K>(api: Api<K>, objects: Vec<K>) -> Result<()>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    futures::stream::iter(objects)
        .map(|o| {
            let api = api.clone();
            async move { api.create(&PostParams::default(), &o).await.map(|_| ()) }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

fn container(image: &str) -> Value {
    json!({"name": "app", "image": image, "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}})
}

fn deployment(name: &str) -> Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"nodeSelector": {POOL_LABEL: POOL}, "containers": [container("app:1")]},
            },
        },
    }))?)
}

fn job(name: &str) -> Result<Job> {
    let groups: Vec<Value> = (0..GROUPS)
        .map(|g| {
            json!({"name": format!("g{g}"), "count": 1, "tasks": [
                {"name": "app", "image": "app:1", "resources": {"cpu": "10m", "memory": "16Mi"}},
            ]})
        })
        .collect();
    Ok(serde_json::from_value(job_manifest(
        name,
        json!({
            "constraints": [{"attribute": "${node.pool}", "operator": "=", "value": POOL}],
            "groups": groups,
        }),
    ))?)
}

#[derive(serde::Serialize)]
struct Round {
    jobs: usize,
    pods: usize,
    deployments_seconds: f64,
    jobs_seconds: f64,
    ratio: f64,
    reconciles: f64,
    reconciles_per_second: f64,
    controller_cpu_seconds: f64,
    controller_peak_rss_mib: f64,
    controller_rss_watching_mib: f64,
    /// Through 10 s after the last pod Running (status writes that follow it).
    reconciles_settled: f64,
    controller_cpu_settled_seconds: f64,
    cleanup_seconds: f64,
}

async fn round(client: &Client, controller: &Controller, size: usize) -> Result<Round> {
    let pods = size * GROUPS;
    println!("-- {size} Jobs of {GROUPS} groups against {pods} one-replica Deployments");

    let native = format!("bench-native-{size}");
    namespace(client, &native).await?;
    let deployments = (0..size)
        .flat_map(|j| (0..GROUPS).map(move |g| format!("d{j}-g{g}")))
        .map(|n| deployment(&n))
        .collect::<Result<Vec<_>>>()?;
    let all_running = running_pods(client, &native, pods).await?;
    let started = Instant::now();
    create_all(
        Api::<Deployment>::namespaced(client.clone(), &native),
        deployments,
    )
    .await?;
    let deployments_time = within(all_running).await? - started;
    println!(
        "   Deployments: {pods} pods Running in {:.1} s",
        deployments_time.as_secs_f64()
    );
    let mut cleanup = drop_namespace(client, &native).await?;

    let ns = format!("bench-jobs-{size}");
    namespace(client, &ns).await?;
    let jobs = (0..size)
        .map(|j| job(&format!("j{j}")))
        .collect::<Result<Vec<_>>>()?;
    let all_running = running_pods(client, &ns, pods).await?;
    let (before, reconciles_before) = (usage(&controller.pid())?, controller.reconciles().await?);
    let peak = PeakRss::start(controller.pid());
    let started = Instant::now();
    create_all(Api::<Job>::namespaced(client.clone(), &ns), jobs).await?;
    let jobs_time = within(all_running).await? - started;
    let (after, reconciles_after) = (usage(&controller.pid())?, controller.reconciles().await?);
    let peak_mib = peak.mib();
    drop(peak);
    println!(
        "   Jobs:        {pods} pods Running in {:.1} s",
        jobs_time.as_secs_f64()
    );
    // Settled: the controller holds every pod, node and Job in its caches, and has
    // written the status the last pods' events asked for.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let settled = usage(&controller.pid())?;
    let reconciles_settled = controller.reconciles().await?;
    let watching = settled.rss_kib as f64 / 1024.0;
    cleanup += drop_namespace(client, &ns).await?;

    let reconciled = reconciles_after - reconciles_before;
    ensure!(
        reconciled > 0.0,
        "no jobs reconcile counted in the controller's /metrics"
    );
    let cpu = after.cpu.saturating_sub(before.cpu).as_secs_f64();
    let round = Round {
        jobs: size,
        pods,
        deployments_seconds: deployments_time.as_secs_f64(),
        jobs_seconds: jobs_time.as_secs_f64(),
        ratio: jobs_time.as_secs_f64() / deployments_time.as_secs_f64(),
        reconciles: reconciled,
        reconciles_per_second: reconciled / jobs_time.as_secs_f64(),
        controller_cpu_seconds: cpu,
        controller_peak_rss_mib: peak_mib,
        controller_rss_watching_mib: watching,
        reconciles_settled: reconciles_settled - reconciles_before,
        controller_cpu_settled_seconds: settled.cpu.saturating_sub(before.cpu).as_secs_f64(),
        cleanup_seconds: cleanup.as_secs_f64(),
    };
    println!(
        "   ratio {:.2}x (goal ≤ 1.1x); {reconciled:.0} reconciles ({:.1}/s, {:.1} per Job); controller CPU {cpu:.1} s \
         ({:.0}% of one core); RSS peak {peak_mib:.1} MiB, {watching:.1} MiB watching {pods} pods",
        round.ratio,
        round.reconciles_per_second,
        reconciled / size as f64,
        100.0 * cpu / jobs_time.as_secs_f64(),
    );
    Ok(round)
}

#[derive(serde::Serialize)]
struct Promote {
    jobs: usize,
    /// From the first update to every canary healthy.
    canaries_healthy_seconds: f64,
    /// From the first `spec.promote` to every deployment promoted.
    promoted_seconds: f64,
    /// From the first `spec.promote` to every Job stable at version 2 (rolled).
    stable_seconds: f64,
}

/// Sets `patch` on every Job in `names`, CONCURRENCY at once.
async fn patch_all(api: &Api<Job>, names: &[String], patch: Value) -> Result<()> {
    futures::stream::iter(names)
        .map(|n| {
            let (api, patch) = (api.clone(), patch.clone());
            async move {
                api.patch(n, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// `count` service Jobs with one canary each (autoPromote false): deployed, updated, then
/// all promoted at once.
async fn canary_promote(client: &Client, count: usize) -> Result<Promote> {
    println!("-- a canary promote across {count} Jobs");
    let ns = "bench-canary";
    namespace(client, ns).await?;
    let api = Api::<Job>::namespaced(client.clone(), ns);
    let group = |image: &str| {
        json!([{"name": "web", "count": 2, "tasks": [
            {"name": "app", "image": image, "resources": {"cpu": "10m", "memory": "16Mi"}},
        ]}])
    };
    let names: Vec<String> = (0..count).map(|i| format!("c{i}")).collect();
    let jobs = names
        .iter()
        .map(|name| {
            Ok(serde_json::from_value(job_manifest(
                name,
                json!({
                    "constraints": [{"attribute": "${node.pool}", "operator": "=", "value": POOL}],
                    "update": {"canary": 1, "autoPromote": false, "maxParallel": 2,
                               "minHealthyTime": "1s", "healthyDeadline": "5m",
                               "progressDeadline": "10m"},
                    "groups": group("app:1"),
                }),
            ))?)
        })
        .collect::<Result<Vec<Job>>>()?;
    let stable = |version: i64| move |j: &Job| status_of(j).stable_version == Some(version);
    let v1 = all_hold(api.clone(), count, stable(1)).await?;
    create_all(api.clone(), jobs).await?;
    within(v1).await?;

    let canaries = all_hold(api.clone(), count, |j: &Job| {
        status_of(j)
            .deployment
            .is_some_and(|d| d.version == 2 && d.canaries_healthy >= 1)
    })
    .await?;
    let started = Instant::now();
    patch_all(&api, &names, json!({"spec": {"groups": group("app:2")}})).await?;
    let canaries_healthy = within(canaries).await? - started;
    println!(
        "   {count} Jobs updated: every canary healthy in {:.1} s",
        canaries_healthy.as_secs_f64()
    );

    let promoted = all_hold(api.clone(), count, |j: &Job| {
        status_of(j)
            .deployment
            .is_some_and(|d| d.version == 2 && d.promoted)
    })
    .await?;
    let v2 = all_hold(api.clone(), count, stable(2)).await?;
    let started = Instant::now();
    patch_all(&api, &names, json!({"spec": {"promote": 2}})).await?;
    let promoted = within(promoted).await? - started;
    let rolled = within(v2).await? - started;
    println!(
        "   promote set on all {count}: every deployment promoted in {:.1} s, every Job stable at version 2 in {:.1} s",
        promoted.as_secs_f64(),
        rolled.as_secs_f64()
    );
    drop_namespace(client, ns).await?;
    Ok(Promote {
        jobs: count,
        canaries_healthy_seconds: canaries_healthy.as_secs_f64(),
        promoted_seconds: promoted.as_secs_f64(),
        stable_seconds: rolled.as_secs_f64(),
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let client = client().await;
    let sizes = env_list("CAPSTAN_BENCH_JOBS", "100,1000,5000");
    let node_count = env_usize("CAPSTAN_BENCH_NODES", 300);
    let canary_jobs = env_usize("CAPSTAN_BENCH_CANARY_JOBS", 100);
    ensure!(
        !sizes.is_empty() || canary_jobs > 0,
        "CAPSTAN_BENCH_JOBS names no size and CAPSTAN_BENCH_CANARY_JOBS is 0: nothing to run"
    );

    let mut nodes = TestNodes::new(&client, "bench-node");
    let started = Instant::now();
    for (dc, count) in [("dc1", node_count / 2), ("dc2", node_count - node_count / 2)] {
        let spec = NodeSpec::in_pool(POOL, dc).cpu("64").memory("256Gi").pods("250");
        nodes.add_many(&spec, count).await?;
    }
    println!(
        "{node_count} kwok nodes in 2 datacenters Ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let controller = Controller::start(&client).await?;
    // Its caches filled (nodes, the chart's objects): what every figure below adds to.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_mib = usage(&controller.pid())?.rss_kib as f64 / 1024.0;
    println!("controller RSS idle (caches of {node_count} nodes): {idle_mib:.1} MiB");

    let out = repo_root().join(format!("target/{}.json", out_name()));
    let save = |rounds: &[Round], promote: Option<&Promote>| -> Result<()> {
        let report = json!({
            "nodes": node_count,
            "controller_rss_idle_mib": idle_mib,
            "rounds": rounds,
            "canary_promote": promote,
            "controller_log": controller.log,
        });
        std::fs::write(&out, serde_json::to_vec_pretty(&report)?)?;
        Ok(())
    };
    let mut rounds = Vec::new();
    for size in sizes {
        rounds.push(round(&client, &controller, size).await?);
        save(&rounds, None)?;
    }
    let promote = if canary_jobs > 0 {
        Some(canary_promote(&client, canary_jobs).await?)
    } else {
        None
    };
    save(&rounds, promote.as_ref())?;

    println!("\n== Jobs against Deployments, and growth with the number of Jobs");
    println!(
        "{:>6} {:>7} {:>9} {:>9} {:>6} {:>11} {:>10} {:>10} {:>11} {:>9} {:>10}",
        "jobs",
        "pods",
        "deploy s",
        "jobs s",
        "ratio",
        "reconcile/s",
        "rec/Job",
        "ctrl CPU s",
        "CPU ms/Job",
        "peak MiB",
        "watch MiB"
    );
    for r in &rounds {
        println!(
            "{:>6} {:>7} {:>9.1} {:>9.1} {:>5.2}x {:>11.1} {:>10.1} {:>10.1} {:>11.1} {:>9.1} {:>10.1}",
            r.jobs,
            r.pods,
            r.deployments_seconds,
            r.jobs_seconds,
            r.ratio,
            r.reconciles_per_second,
            r.reconciles_settled / r.jobs as f64,
            r.controller_cpu_settled_seconds,
            1000.0 * r.controller_cpu_settled_seconds / r.jobs as f64,
            r.controller_peak_rss_mib,
            r.controller_rss_watching_mib
        );
    }
    for pair in rounds.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let k = b.jobs as f64 / a.jobs as f64;
        println!(
            "growth {}→{} Jobs ({k:.0}x, linear = {k:.0}x): Jobs' time {:.1}x (Deployments' {:.1}x), \
             reconciles {:.1}x, controller CPU {:.1}x, RSS above idle {:.1}x",
            a.jobs,
            b.jobs,
            b.jobs_seconds / a.jobs_seconds,
            b.deployments_seconds / a.deployments_seconds,
            b.reconciles_settled / a.reconciles_settled.max(1.0),
            b.controller_cpu_settled_seconds / a.controller_cpu_settled_seconds.max(0.01),
            (b.controller_rss_watching_mib - idle_mib) / (a.controller_rss_watching_mib - idle_mib).max(0.1),
        );
    }
    if let Some(p) = &promote {
        println!(
            "canary promote across {} Jobs: canaries healthy {:.1} s after the updates; \
             all promoted {:.1} s and all stable {:.1} s after the promotes",
            p.jobs, p.canaries_healthy_seconds, p.promoted_seconds, p.stable_seconds
        );
    }
    println!("raw figures: {}", out.display());
    drop(nodes);
    Ok(())
}
