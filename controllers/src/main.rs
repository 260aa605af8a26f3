//! capstan-controller: every Capstan reconciler, run by whichever replica holds the
//! leader Lease.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod context;
mod credentials;
mod intentions;
mod jobs;
mod leader;
mod metrics;
#[cfg(test)]
mod mock;
mod reconciler;
mod secretsync;
mod status;

use anyhow::Context as _;
use capstan_crds::ServiceIntentions;
use capstan_telemetry::{Health, LoggingArgs, Stop, spawn_admin};
use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, Client,
    api::ListParams,
    runtime::events::{Recorder, Reporter},
};
use std::{net::SocketAddr, sync::Arc, time::Duration};

#[derive(Parser, Debug)]
#[command(name = "capstan-controller", version, about)]
struct Args {
    #[command(flatten)]
    logging: LoggingArgs,
    /// Where /healthz and /metrics are served.
    #[arg(long, env = "CAPSTAN_CONTROLLER_ADMIN_ADDR", default_value = "127.0.0.1:8080")]
    admin_addr: SocketAddr,
    /// Namespace of the leader Lease (the namespace Capstan runs in).
    #[arg(long, env = "CAPSTAN_CONTROLLER_NAMESPACE", default_value = "capstan-system")]
    namespace: String,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "CAPSTAN_CONTROLLER_LEASE_NAME",
        default_value = "capstan-controller"
    )]
    lease_name: String,
    /// This replica's identity in the Lease and in Events (the pod name in a cluster).
    #[arg(long, env = "CAPSTAN_CONTROLLER_IDENTITY")]
    identity: Option<String>,
    /// How long a leader's Lease lasts without renewal before a standby takes over.
    #[arg(long, env = "CAPSTAN_CONTROLLER_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// How long a leader keeps trying to renew before it stops acting as leader.
    #[arg(long, env = "CAPSTAN_CONTROLLER_RENEW_DEADLINE_SECONDS", default_value_t = 10)]
    renew_deadline_seconds: u64,
    /// How often the leader renews and standbys retry.
    #[arg(long, env = "CAPSTAN_CONTROLLER_RETRY_PERIOD_SECONDS", default_value_t = 2)]
    retry_period_seconds: u64,
    /// How often every object is reconciled again with nothing changed.
    #[arg(long, env = "CAPSTAN_CONTROLLER_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
    /// The secrets engine's HTTPS API, for SecretSync
    /// (default https://capstan-engine.<namespace>.svc:8200).
    #[arg(long, env = "CAPSTAN_CONTROLLER_ENGINE_URL")]
    engine_url: Option<String>,
    /// The ConfigMap (in --namespace) with the roots the engine's certificate chains to.
    #[arg(
        long,
        env = "CAPSTAN_CONTROLLER_ROOTS_CONFIGMAP",
        default_value = capstan_contract::ROOTS_CONFIGMAP
    )]
    roots_configmap: String,
    /// The node label whose value is a node's datacenter, for Jobs' `datacenters` and
    /// `${node.datacenter}`.
    #[arg(
        long,
        env = "CAPSTAN_CONTROLLER_JOBS_DATACENTER_LABEL",
        default_value = capstan_jobs::attributes::DEFAULT_DATACENTER_LABEL
    )]
    jobs_datacenter_label: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.logging.init();
    anyhow::ensure!(
        args.renew_deadline_seconds < args.lease_duration_seconds
            && args.retry_period_seconds < args.renew_deadline_seconds,
        "need retry period < renew deadline < lease duration"
    );
    let identity = args.identity.clone().unwrap_or_else(default_identity);

    let mut registry = capstan_telemetry::registry("capstan_controller");
    let metrics = metrics::Metrics::register(&mut registry);
    // A test-only fault point set in a production controller is announced at once.
    secretsync::warn_if_test_fault_set();
    let health = Health::default();
    let stop = Stop::on_signal();
    let admin = spawn_admin(args.admin_addr, registry, health.clone(), &stop).await?;

    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster)")?;
    tracing::info!(%identity, namespace = %args.namespace, "Starting capstan-controller");

    let mut elector = leader::Elector::new(
        Api::<Lease>::namespaced(client.clone(), &args.namespace),
        leader::Config {
            lease_name: args.lease_name.clone(),
            identity: identity.clone(),
            lease_duration: Duration::from_secs(args.lease_duration_seconds),
            renew_deadline: Duration::from_secs(args.renew_deadline_seconds),
            retry_period: Duration::from_secs(args.retry_period_seconds),
        },
    );
    let ctx = Arc::new(context::Context {
        state: (),
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "capstan-controller".into(),
                instance: Some(identity.clone()),
            },
        ),
        metrics: metrics.clone(),
        leadership: elector.leadership(),
        config: context::Config {
            resync: Duration::from_secs(args.resync_seconds),
            engine_url: args
                .engine_url
                .clone()
                .unwrap_or_else(|| format!("https://capstan-engine.{}.svc:8200", args.namespace)),
            namespace: args.namespace.clone(),
            roots_configmap: args.roots_configmap.clone(),
        },
    });

    let jobs_settings = capstan_jobs::compile::Settings {
        datacenter_label: args.jobs_datacenter_label.clone(),
    };

    tokio::select! {
        () = wait_for_crds(&client) => {}
        () = stop.stopped() => return Ok(admin.finish().await?),
    }

    loop {
        tokio::select! {
            () = elector.acquire() => {}
            () = stop.stopped() => break,
        }
        metrics.leader.set(1);
        metrics.leader_terms.inc();
        // Reconcilers stop on either a shutdown or the end of this term.
        let term = Stop::new();
        let (shutdown, end_of_term) = (stop.stopped(), term.stopped());
        let controllers = tokio::spawn(run_controllers(ctx.clone(), jobs_settings.clone(), async move {
            tokio::select! { () = shutdown => {}, () = end_of_term => {} }
        }));
        tokio::select! {
            _ = elector.hold() => {
                // The term is over: stop at once, without waiting for in-flight work,
                // which could no longer write anyway (every write checks the term).
                controllers.abort();
                metrics.leader.set(0);
                term.stop();
                continue;
            }
            () = stop.stopped() => {
                // In-flight reconciles finish, then the Lease is released so a standby
                // takes over now rather than after the lease duration.
                if tokio::time::timeout(Duration::from_secs(20), controllers).await.is_err() {
                    tracing::warn!("Reconcilers did not stop within 20s");
                }
                metrics.leader.set(0);
                elector.release().await;
                break;
            }
        }
    }
    health.set(false);
    Ok(admin.finish().await?)
}

/// Every reconciler, concurrently, until `shutdown` resolves.
async fn run_controllers(
    ctx: Arc<context::Context>,
    jobs_settings: capstan_jobs::compile::Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = futures::FutureExt::shared(shutdown);
    tokio::join!(
        intentions::run(&ctx, shutdown.clone()),
        credentials::run(&ctx, shutdown.clone()),
        secretsync::run(&ctx, shutdown.clone()),
        jobs::run(&ctx, jobs_settings, shutdown),
    );
}

/// Waits until the API serves our kinds, so a controller started before its CRDs
/// (a fresh install) waits for them instead of crashing into a restart loop.
async fn wait_for_crds(client: &Client) {
    let api = Api::<ServiceIntentions>::all(client.clone());
    let mut warned = false;
    loop {
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => return,
            Err(error) if !warned => {
                tracing::warn!(%error, "Waiting for the Capstan CRDs to be served");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "capstan".into());
    format!("{host}-{}-{:04x}", std::process::id(), rand::random::<u16>())
}
