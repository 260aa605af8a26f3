//! Webhook benchmark (a plain binary: `cargo bench -p capstan-webhook`).
//!
//! 1. The mutation itself: capstan-mesh's `selection::wanted` + the webhook's
//!    `inject::mesh::inject` + encoding the patch, over 1,000 distinct pods. Target: p99
//!    under 100 µs.
//! 2. Admission latency as the API server sees it, when `CAPSTAN_BENCH_CLUSTER=1` and
//!    KUBECONFIG names a cluster (hack/cluster.sh up; `cargo build --workspace` first):
//!    1,000 pod creations with the webhook configuration removed, then 1,000 with the
//!    webhook (a `capstan-webhook` process, as the e2e tests run it) injecting, and 1,000
//!    in an unlabelled namespace (the webhook is called, decides not to mesh). Creations
//!    are server-side dry runs: the whole admission chain runs, webhooks included, and
//!    nothing is stored, so the difference isolates the webhook's cost. Target: the
//!    added p99 under 5 ms. The API server's own histograms of the calls are read around
//!    each round: the whole call, and its HTTP client's round trip to the webhook.

use capstan_mesh::selection;
use capstan_webhook::inject::{
    Config,
    mesh::{self as injection, Injection},
};
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

const PODS: usize = 1_000;

fn pod(i: usize) -> Pod {
    let mut annotations = serde_json::Map::new();
    if i.is_multiple_of(7) {
        annotations.insert("capstan.dev/upstreams".into(), json!("api:8080,db.data:5432"));
    }
    if i.is_multiple_of(5) {
        annotations.insert("capstan.dev/app-port".into(), json!("9090"));
    }
    let init = if i.is_multiple_of(3) {
        json!([{"name": "migrate", "image": "app:1"}])
    } else {
        json!(null)
    };
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("web-{i:04}"), "namespace": "shop",
            "labels": {"app": "web", "pod-template-hash": format!("{i:x}")},
            "annotations": annotations,
        },
        "spec": {
            "serviceAccountName": "web",
            "initContainers": init,
            "volumes": [{"name": "data", "emptyDir": {}}],
            "containers": [
                {
                    "name": "app", "image": "registry.example/web:1",
                    "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9090}],
                    "env": [{"name": "MODE", "value": "prod"}],
                    "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}},
                    "startupProbe": {"tcpSocket": {"port": 8080}},
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                },
                {"name": "logger", "image": "registry.example/logger:1"},
            ],
        },
    }))
    .expect("a valid pod")
}

struct Summary {
    p50: Duration,
    p99: Duration,
    max: Duration,
    mean: Duration,
}

fn summarize(mut samples: Vec<Duration>) -> Summary {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).saturating_sub(1)];
    Summary {
        p50: at(0.50),
        p99: at(0.99),
        max: *samples.last().unwrap(),
        mean: samples.iter().sum::<Duration>() / samples.len() as u32,
    }
}

fn print(label: &str, s: &Summary) {
    println!(
        "  {label:<44} p50 {:>9.1} µs   p99 {:>9.1} µs   max {:>9.1} µs   mean {:>9.1} µs",
        s.p50.as_secs_f64() * 1e6,
        s.p99.as_secs_f64() * 1e6,
        s.max.as_secs_f64() * 1e6,
        s.mean.as_secs_f64() * 1e6
    );
}

fn mutation() {
    let config = Config::default();
    let labels: BTreeMap<String, String> = [
        ("capstan.dev/mesh".to_owned(), "enabled".to_owned()),
        ("kubernetes.io/metadata.name".to_owned(), "shop".to_owned()),
    ]
    .into();
    let roots = "-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n".repeat(2);
    let pods: Vec<Pod> = (0..PODS).map(pod).collect();
    let once = |pod: &Pod| {
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        let wanted = selection::wanted("shop", &labels, &annotations, &config.selection);
        assert_eq!(wanted, selection::Wanted::ByNamespace);
        match injection::inject(pod, &config, &roots).expect("injectable") {
            // Encoded as the webhook encodes it.
            Injection::Patch(ops) => serde_json::to_vec(&ops).unwrap().len(),
            Injection::AlreadyInjected => unreachable!(),
        }
    };
    // Warm up allocator and caches.
    for pod in &pods {
        std::hint::black_box(once(pod));
    }
    let mut samples = Vec::with_capacity(PODS);
    let mut bytes = 0;
    for pod in &pods {
        let started = Instant::now();
        bytes += std::hint::black_box(once(pod));
        samples.push(started.elapsed());
    }
    let mut decide_only = Vec::with_capacity(PODS);
    for pod in &pods {
        let started = Instant::now();
        std::hint::black_box(injection::inject(pod, &config, &roots).is_ok());
        decide_only.push(started.elapsed());
    }
    let s = summarize(samples);
    println!(
        "mutation itself (decide + build patch + encode), {PODS} pods, mean patch {} bytes:",
        bytes / PODS
    );
    print("decide + build patch + encode", &s);
    print("of which inject() (ops as JSON values)", &summarize(decide_only));
    let target = Duration::from_micros(100);
    println!(
        "  target p99 < 100 µs: p99 is {:.1}% of the target ({})",
        100.0 * s.p99.as_secs_f64() / target.as_secs_f64(),
        if s.p99 < target { "met" } else { "NOT met" }
    );
}

async fn admission() -> anyhow::Result<()> {
    use capstan_tests::*;
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use kube::{Api, api::PostParams};

    let client = client().await;
    install_chart();
    let meshed = TestNamespace::new(&client, "bench-meshed").await;
    label_meshed(&client, &meshed.name).await?;
    let plain = TestNamespace::new(&client, "bench-plain").await;
    let template = app_pod("bench", json!({}));
    let round = |ns: String| {
        let client = client.clone();
        let template = template.clone();
        async move {
            let mut samples = Vec::with_capacity(PODS);
            for i in 0..PODS + 50 {
                let started = Instant::now();
                dry_run_pod(&client, &ns, &template).await?;
                // The first 50 warm connections and caches.
                if i >= 50 {
                    samples.push(started.elapsed());
                }
            }
            anyhow::Ok(samples)
        }
    };

    // Baseline: no webhook configuration at all.
    let configs = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let saved = configs.get(WEBHOOK_CONFIG).await?;
    configs.delete(WEBHOOK_CONFIG, &Default::default()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline = round(meshed.name.clone()).await;
    let mut restored = saved.clone();
    restored.metadata.resource_version = None;
    restored.metadata.uid = None;
    restored.metadata.creation_timestamp = None;
    restored.metadata.managed_fields = None;
    restored.metadata.generation = None;
    configs.create(&PostParams::default(), &restored).await?;
    let baseline = summarize(baseline?);

    let webhook = WebhookProcess::start(&client, &[]).await?;
    println!(
        "(webhook binary: {})",
        std::env::var("CAPSTAN_E2E_WEBHOOK_BIN").unwrap_or_default()
    );
    let webhook_host = webhook.addr.to_string();
    let before = ApiServerView::read(&client, "namespaces.inject.capstan.dev", &webhook_host).await?;
    let injected = round(meshed.name.clone()).await?;
    let after = ApiServerView::read(&client, "namespaces.inject.capstan.dev", &webhook_host).await?;
    ensure_injected(&client, &meshed.name).await?;
    let before_skipped = ApiServerView::read(&client, "pods.inject.capstan.dev", &webhook_host).await?;
    let skipped = round(plain.name.clone()).await?;
    let after_skipped = ApiServerView::read(&client, "pods.inject.capstan.dev", &webhook_host).await?;
    let metrics = webhook.metrics().await?;
    drop(webhook);

    let injected = summarize(injected);
    let skipped = summarize(skipped);
    println!(
        "admission as the API server sees it ({PODS} dry-run pod creations each, release build of the webhook):"
    );
    print("no webhook configuration (baseline)", &baseline);
    print("labelled namespace, injected", &injected);
    print("unlabelled namespace, webhook called, skipped", &skipped);
    let added = |s: &Summary| {
        (
            s.p50.saturating_sub(baseline.p50),
            s.p99.saturating_sub(baseline.p99),
        )
    };
    for (label, s) in [("injected", &injected), ("skipped", &skipped)] {
        let (p50, p99) = added(s);
        println!(
            "  added by the webhook ({label}): p50 {:.2} ms, p99 {:.2} ms; p99 ratio {:.2}x baseline; target added p99 < 5 ms: {}",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            s.p99.as_secs_f64() / baseline.p99.as_secs_f64(),
            if p99 < Duration::from_millis(5) {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    // The API server's own measurements, as deltas over each round. Its webhook histogram
    // times the whole call: encoding the AdmissionReview, the HTTP round trip, decoding
    // the answer and applying the patch. Its HTTP client's histogram (client-go's
    // rest_client metrics, by host) times only the round trip, so the difference of the
    // means is the API server's own work inside the call.
    println!("  the API server's own view of the webhook call (deltas over the round):");
    for (label, before, after) in [
        ("injected", &before, &after),
        ("skipped", &before_skipped, &after_skipped),
    ] {
        let call = after.call.minus(&before.call);
        let http = after.http.minus(&before.http);
        println!("    {label}: whole call   {}", call.describe());
        println!("    {label}: HTTP round trip {}", http.describe());
        if call.count > 0.0 && http.count > 0.0 {
            println!(
                "    {label}: API server's own work in the call (difference of the means) {:.0} µs",
                (call.mean() - http.mean()) * 1e6
            );
        }
    }
    for name in [
        "capstan_webhook_connections_total{protocol=\"h2\"}",
        "capstan_webhook_connections_total{protocol=\"http/1.1\"}",
    ] {
        if let Some(n) = metric(&metrics, name) {
            println!("  the webhook's {name}: {n}");
        }
    }
    let requests = Histogram::parse(&metrics, "capstan_webhook_mutate_request_duration_seconds", &[]);
    println!(
        "  the webhook's own /mutate-pods handler time (both rounds, parse to encoded answer): {}",
        requests.describe()
    );
    let count = metric(&metrics, "capstan_webhook_mutation_duration_seconds_count").unwrap_or(0.0);
    let sum = metric(&metrics, "capstan_webhook_mutation_duration_seconds_sum").unwrap_or(0.0);
    if count > 0.0 {
        println!(
            "  the webhook's own mutation histogram: {count} mutations, mean {:.1} µs",
            sum / count * 1e6
        );
    }
    Ok(())
}

/// One Prometheus histogram: cumulative buckets (le, count), sum and count.
#[derive(Clone, Default)]
struct Histogram {
    buckets: Vec<(String, f64)>,
    sum: f64,
    count: f64,
}

impl Histogram {
    /// The series of `name` whose labels contain every one of `labels`.
    fn parse(text: &str, name: &str, labels: &[&str]) -> Self {
        let mut h = Self::default();
        let matching = |l: &&str| labels.iter().all(|want| l.contains(want));
        for line in text.lines().filter(matching) {
            let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            // A series with labels, or (the webhook's own) without.
            let is = |suffix: &str| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(suffix))
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            };
            if is("_bucket") {
                if let Some(le) = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()) {
                    h.buckets.push((le.to_owned(), value));
                }
            } else if is("_sum") {
                h.sum += value;
            } else if is("_count") {
                h.count += value;
            }
        }
        h
    }

    fn minus(&self, earlier: &Self) -> Self {
        Self {
            buckets: self
                .buckets
                .iter()
                .map(|(le, n)| {
                    let was = earlier
                        .buckets
                        .iter()
                        .find(|(l, _)| l == le)
                        .map_or(0.0, |(_, n)| *n);
                    (le.clone(), n - was)
                })
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }

    fn mean(&self) -> f64 {
        self.sum / self.count
    }

    fn describe(&self) -> String {
        if self.count <= 0.0 {
            return "(no samples)".into();
        }
        let within: Vec<String> = self
            .buckets
            .iter()
            .filter(|(le, _)| le.parse::<f64>().is_ok_and(|le| le <= 0.1))
            .map(|(le, n)| format!("<= {le}s: {:.1}%", 100.0 * n / self.count))
            .collect();
        format!(
            "over {} calls: mean {:.0} µs; {}",
            self.count,
            self.mean() * 1e6,
            within.join(", ")
        )
    }
}

/// The API server's histograms of one webhook's calls and of its HTTP client's requests to
/// the webhook's address.
struct ApiServerView {
    call: Histogram,
    http: Histogram,
}

impl ApiServerView {
    async fn read(client: &kube::Client, webhook: &str, host: &str) -> anyhow::Result<Self> {
        let request = http::Request::get("/metrics").body(Vec::new())?;
        let text = client.request_text(request).await?;
        let name = format!("name=\"{webhook}\"");
        let host = format!("host=\"{host}\"");
        Ok(Self {
            call: Histogram::parse(
                &text,
                "apiserver_admission_webhook_admission_duration_seconds",
                &[&name, "type=\"admit\"", "rejected=\"false\""],
            ),
            http: Histogram::parse(
                &text,
                "rest_client_request_duration_seconds",
                &[&host, "verb=\"POST\""],
            ),
        })
    }
}

async fn ensure_injected(client: &kube::Client, ns: &str) -> anyhow::Result<()> {
    let pod = capstan_tests::dry_run_pod(client, ns, &capstan_tests::app_pod("check", json!({}))).await?;
    anyhow::ensure!(
        capstan_tests::is_injected(&pod),
        "the benchmark's pods were not injected"
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider().install_default().ok();
    // The admission part runs in a child process: the harness learns which webhook
    // binary to run (this bench's release build) from its environment, and a process
    // may not change its own environment safely once threads exist.
    if std::env::var_os("CAPSTAN_E2E_WEBHOOK_BIN").is_some() {
        return tokio::runtime::Runtime::new()?.block_on(admission());
    }
    mutation();
    if std::env::var("CAPSTAN_BENCH_CLUSTER").as_deref() == Ok("1") {
        let status = std::process::Command::new(std::env::current_exe()?)
            .env("CAPSTAN_E2E_WEBHOOK_BIN", env!("CARGO_BIN_EXE_capstan-webhook"))
            .status()?;
        anyhow::ensure!(status.success(), "the admission benchmark failed");
    } else {
        println!(
            "admission latency: set CAPSTAN_BENCH_CLUSTER=1 with KUBECONFIG naming a test cluster \
             (after `cargo build --workspace`) to measure it"
        );
    }
    Ok(())
}
