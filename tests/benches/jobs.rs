//! Jobs at scale (issue 17, point 6), against the same pods as plain Deployments in the
//! same run, on a real control plane with hundreds of kwok nodes and a release build of
//! capstan-controller:
//!
//! - for each size N (CAPSTAN_BENCH_JOBS, default `100,1000`): N Jobs of 10 groups of
//!   count 1, and 10·N one-replica Deployments, each timed from the first create to every
//!   pod Running (the native path is the baseline: goal ≤ 1.1×); the controller's
//!   reconciles per second, CPU and peak RSS over the Jobs' run, and its RSS once it
//!   watches all 10·N pods (goal ≤ 200 MiB at 10,000); how each grows with N (goal: linear);
//! - a canary promote across CAPSTAN_BENCH_CANARY_JOBS (default 100) service Jobs: the time
//!   from setting `spec.promote` on all to all stable.
//!
//! Run by `hack/bench-jobs.sh`; never part of the test suite. Figures go to stdout and
//! target/bench-jobs.json.

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
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::watcher,
};
use serde_json::{Value, json};
use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

const GROUPS: usize = 10;
/// Creates in flight at once, for both paths (a client applying manifests in parallel).
const CONCURRENCY: usize = 16;
const POOL: &str = "bench";

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect()
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

async fn reconciles(controller: &ControllerProcess) -> Result<f64> {
    let text = controller.metrics().await?;
    labelled_metric(
        &text,
        "capstan_controller_reconcile_runs_total{controller=\"jobs\"}",
    )
    .context("the jobs reconciler's run counter")
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

/// Starts counting Running pods in `ns`; the returned future ends when `expected` are.
async fn running_pods(
    client: &Client,
    ns: &str,
    expected: usize,
) -> Result<impl Future<Output = Result<()>>> {
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    let mut events = Box::pin(watcher::watcher(api, watcher::Config::default()));
    // The initial (empty) list is in before anything is created.
    loop {
        if let Some(watcher::Event::InitDone) = events.try_next().await? {
            break;
        }
    }
    Ok(async move {
        let mut running = BTreeSet::new();
        while running.len() < expected {
            match events.try_next().await? {
                Some(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                    if phase(&pod) == Some("Running") {
                        running.insert(pod.name_any());
                    } else {
                        running.remove(&pod.name_any());
                    }
                }
                Some(watcher::Event::Delete(pod)) => {
                    running.remove(&pod.name_any());
                }
                Some(_) => {}
                None => anyhow::bail!("the pod watch ended"),
            }
        }
        Ok(())
    })
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
    cleanup_seconds: f64,
}

async fn round(client: &Client, controller: &ControllerProcess, size: usize) -> Result<Round> {
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
    all_running.await?;
    let deployments_time = started.elapsed();
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
    let (before, reconciles_before) = (usage(&controller.pid())?, reconciles(controller).await?);
    let peak = PeakRss::start(controller.pid());
    let started = Instant::now();
    create_all(Api::<Job>::namespaced(client.clone(), &ns), jobs).await?;
    all_running.await?;
    let jobs_time = started.elapsed();
    let (after, reconciles_after) = (usage(&controller.pid())?, reconciles(controller).await?);
    let peak_mib = peak.mib();
    drop(peak);
    println!(
        "   Jobs:        {pods} pods Running in {:.1} s",
        jobs_time.as_secs_f64()
    );
    // Settled: the controller holds every pod, node and Job in its caches.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let watching = usage(&controller.pid())?.rss_kib as f64 / 1024.0;
    cleanup += drop_namespace(client, &ns).await?;

    let reconciled = reconciles_after - reconciles_before;
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

/// `count` service Jobs with one canary each: deployed, updated, then all promoted at
/// once; the time from the promotes to every Job stable at the new version.
async fn canary_promote(client: &Client, count: usize) -> Result<f64> {
    println!("-- a canary promote across {count} Jobs");
    let ns = "bench-canary";
    namespace(client, ns).await?;
    let api = Api::<Job>::namespaced(client.clone(), ns);
    let service = |name: String, image: &str| -> Result<Job> {
        Ok(serde_json::from_value(job_manifest(
            &name,
            json!({
                "constraints": [{"attribute": "${node.pool}", "operator": "=", "value": POOL}],
                "update": {"canary": 1, "maxParallel": 2, "minHealthyTime": "1s",
                           "healthyDeadline": "5m", "progressDeadline": "10m"},
                "groups": [{"name": "web", "count": 2, "tasks": [
                    {"name": "app", "image": image, "resources": {"cpu": "10m", "memory": "16Mi"}},
                ]}],
            }),
        ))?)
    };
    let names: Vec<String> = (0..count).map(|i| format!("c{i}")).collect();
    create_all(
        api.clone(),
        names
            .iter()
            .map(|n| service(n.clone(), "app:1"))
            .collect::<Result<_>>()?,
    )
    .await?;
    let all = |check: fn(&Job) -> bool, what: &'static str| {
        let api = api.clone();
        async move {
            eventually(Duration::from_secs(900), what, || async {
                let list = api.list(&ListParams::default()).await.ok()?;
                (list.items.len() == count && list.items.iter().all(check)).then_some(())
            })
            .await
        }
    };
    all(
        |j| status_of(j).stable_version == Some(1),
        "every Job stable at version 1",
    )
    .await?;
    futures::stream::iter(names.clone())
        .map(|n| {
            let api = api.clone();
            async move {
                let patch = json!({"spec": {"groups": [{"name": "web", "count": 2, "tasks": [
                    {"name": "app", "image": "app:2", "resources": {"cpu": "10m", "memory": "16Mi"}},
                ]}]}});
                api.patch(&n, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    all(
        |j| {
            status_of(j)
                .deployment
                .is_some_and(|d| d.version == 2 && d.canaries_healthy == 1)
        },
        "every canary healthy",
    )
    .await?;
    let started = Instant::now();
    futures::stream::iter(names)
        .map(|n| {
            let api = api.clone();
            async move {
                api.patch(
                    &n,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"promote": 2}})),
                )
                .await
                .map(|_| ())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    all(
        |j| status_of(j).stable_version == Some(2),
        "every Job stable at version 2",
    )
    .await?;
    let promoted = started.elapsed().as_secs_f64();
    println!("   all {count} promoted and rolled in {promoted:.1} s");
    drop_namespace(client, ns).await?;
    Ok(promoted)
}

#[tokio::main]
async fn main() -> Result<()> {
    let client = client().await;
    let sizes = env_list("CAPSTAN_BENCH_JOBS", "100,1000");
    let node_count = env_usize("CAPSTAN_BENCH_NODES", 300);
    let canary_jobs = env_usize("CAPSTAN_BENCH_CANARY_JOBS", 100);
    ensure!(!sizes.is_empty(), "CAPSTAN_BENCH_JOBS names no size");

    let mut nodes = TestNodes::new(&client, "bench-node");
    let started = Instant::now();
    let spec = NodeSpec::in_pool(POOL, "dc1")
        .cpu("64")
        .memory("256Gi")
        .pods("250");
    nodes.add_many(&spec, node_count / 2).await?;
    nodes
        .add_many(
            &NodeSpec::in_pool(POOL, "dc2")
                .cpu("64")
                .memory("256Gi")
                .pods("250"),
            node_count - node_count / 2,
        )
        .await?;
    println!(
        "{node_count} kwok nodes Ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let controller = ControllerProcess::sole(&client, "bench-jobs").await?;

    let mut rounds = Vec::new();
    for size in sizes {
        rounds.push(round(&client, &controller, size).await?);
    }
    let promote = if canary_jobs > 0 {
        Some(canary_promote(&client, canary_jobs).await?)
    } else {
        None
    };

    println!("\n== Jobs against Deployments, and growth with the number of Jobs");
    println!(
        "{:>6} {:>7} {:>9} {:>9} {:>6} {:>11} {:>10} {:>9} {:>10}",
        "jobs", "pods", "deploy s", "jobs s", "ratio", "reconcile/s", "ctrl CPU s", "peak MiB", "watch MiB"
    );
    for r in &rounds {
        println!(
            "{:>6} {:>7} {:>9.1} {:>9.1} {:>5.2}x {:>11.1} {:>10.1} {:>9.1} {:>10.1}",
            r.jobs,
            r.pods,
            r.deployments_seconds,
            r.jobs_seconds,
            r.ratio,
            r.reconciles_per_second,
            r.controller_cpu_seconds,
            r.controller_peak_rss_mib,
            r.controller_rss_watching_mib
        );
    }
    if let [first, .., last] = rounds.as_slice() {
        let k = last.jobs as f64 / first.jobs as f64;
        println!(
            "growth {}→{} Jobs ({k:.0}x): time {:.1}x, controller CPU {:.1}x, reconciles {:.1}x, RSS watching {:.2}x (linear: {k:.0}x)",
            first.jobs,
            last.jobs,
            last.jobs_seconds / first.jobs_seconds,
            last.controller_cpu_seconds / first.controller_cpu_seconds.max(0.01),
            last.reconciles / first.reconciles.max(1.0),
            last.controller_rss_watching_mib / first.controller_rss_watching_mib,
        );
    }
    if let Some(seconds) = promote {
        println!("canary promote across {canary_jobs} Jobs: {seconds:.1} s to all stable");
    }
    let report = json!({
        "nodes": node_count,
        "rounds": rounds,
        "canary_promote": {"jobs": canary_jobs, "seconds": promote},
        "controller_log": controller.log,
    });
    let out = repo_root().join("target/bench-jobs.json");
    std::fs::write(&out, serde_json::to_vec_pretty(&report)?)?;
    println!("raw figures: {}", out.display());
    drop(nodes);
    Ok(())
}
