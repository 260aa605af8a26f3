//! capstan-engine: the engine's HTTPS API: the mesh CA and the Vault-compatible secrets API.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use anyhow::Context as _;
use capstan_contract::duration;
use capstan_engine::{
    api,
    api::audit,
    api::https,
    api::vault,
    auth::kubernetes::{KubernetesAuth, PodReaper},
    auth::token::Tokens,
    declared::Declared,
    mesh_ca,
    policy::store::Policies,
    secrets::database::Database,
    secrets::kv::Kv,
    secrets::lease::{LeaseMetrics, Leases},
    secrets::pki::Pki,
    store::dev_unseal,
    store::logical::Logical,
    store::seal::Seal,
    store::storage::kube::KubeStorage,
};
use capstan_telemetry::{Health, LoggingArgs, Stop, spawn_admin};
use clap::Parser;
use std::{net::SocketAddr, sync::Arc, time::Duration};

/// mimalloc instead of glibc's malloc: the request path allocates from two or more
/// threads at once, and glibc's arenas cost a read about a tenth of its CPU (profiled
/// with `hack/bench-secrets.sh`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug, Clone)]
#[command(name = "capstan-engine", version, about)]
struct Args {
    #[command(flatten)]
    logging: LoggingArgs,
    /// Where the HTTPS API (the mesh CA) is served.
    #[arg(long, env = "CAPSTAN_ENGINE_LISTEN", default_value = "0.0.0.0:8200")]
    listen: SocketAddr,
    /// Where /healthz and /metrics are served (plain HTTP).
    #[arg(long, env = "CAPSTAN_ENGINE_ADMIN_ADDR", default_value = "127.0.0.1:8080")]
    admin_addr: SocketAddr,
    /// Namespace of the CA Secret and the roots ConfigMap (the engine's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "capstan-system")]
    namespace: String,
    /// The Secret holding the CA (tls.crt, tls.key, ca.crt; see the README).
    #[arg(long, env = "CAPSTAN_ENGINE_CA_SECRET", default_value = "capstan-mesh-ca")]
    ca_secret: String,
    /// The ConfigMap the public trust bundle is published to (key `capstan_contract::ROOTS_KEY`).
    #[arg(
        long,
        env = "CAPSTAN_ENGINE_ROOTS_CONFIGMAP",
        default_value = capstan_contract::ROOTS_CONFIGMAP
    )]
    roots_configmap: String,
    /// The SPIFFE trust domain of the mesh.
    #[arg(long, env = "CAPSTAN_ENGINE_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The audience a sidecar's token must carry.
    #[arg(
        long,
        env = "CAPSTAN_ENGINE_TOKEN_AUDIENCE",
        default_value = capstan_contract::MESH_CA_AUDIENCE
    )]
    token_audience: String,
    /// Lifetime of a leaf certificate (e.g. `30s`, `24h`, `1.5h`; Vault's duration grammar).
    #[arg(long, env = "CAPSTAN_ENGINE_LEAF_TTL", default_value = "24h", value_parser = duration::parse)]
    leaf_ttl: Duration,
    /// Lifetime of a root the engine generates.
    #[arg(long, env = "CAPSTAN_ENGINE_ROOT_TTL", default_value = "3650d", value_parser = duration::parse)]
    root_ttl: Duration,
    /// How long a new root is trusted before it signs (sidecars must refresh their
    /// roots from GET /v1/mesh/roots more often than this).
    #[arg(long, env = "CAPSTAN_ENGINE_ROTATION_PROPAGATION", default_value = "5m", value_parser = duration::parse)]
    rotation_propagation: Duration,
    /// DNS names and IPs of the engine's serving certificate (repeatable, or
    /// comma-separated in the env var). Default: the Service's DNS names and 127.0.0.1.
    #[arg(
        long = "serving-san",
        env = "CAPSTAN_ENGINE_SERVING_SANS",
        value_delimiter = ','
    )]
    serving_sans: Vec<String>,
    /// The audience a ServiceAccount token must carry to log in (auth/kubernetes/login)
    /// when its role names none.
    #[arg(
        long,
        env = "CAPSTAN_ENGINE_AUTH_AUDIENCE",
        default_value = capstan_contract::ENGINE_AUDIENCE
    )]
    auth_audience: String,
    /// Audit sinks: `stdout` or file paths (repeatable, or comma-separated in the env var).
    /// With any sink, a request no sink can record fails.
    #[arg(long = "audit", env = "CAPSTAN_ENGINE_AUDIT", value_delimiter = ',')]
    audit: Vec<String>,
    /// The database secrets engine's mount path.
    #[arg(long, env = "CAPSTAN_ENGINE_DATABASE_MOUNT", default_value = "database")]
    database_mount: String,
    /// The PKI secrets engine's mount path.
    #[arg(long, env = "CAPSTAN_ENGINE_PKI_MOUNT", default_value = "pki")]
    pki_mount: String,
    /// The longest wait between two attempts to revoke a lease whose backend refuses.
    #[arg(long, env = "CAPSTAN_ENGINE_REVOKE_BACKOFF_MAX", default_value = "60s", value_parser = duration::parse)]
    revoke_backoff_max: Duration,
    /// The KV version 2 mount's path.
    #[arg(long, env = "CAPSTAN_ENGINE_KV_MOUNT", default_value = "secret")]
    kv_mount: String,
    /// DEVELOPMENT ONLY: the Secret (in --namespace) that keeps the unseal key; the engine
    /// initializes itself on first start and unseals from it.
    #[arg(long, env = "CAPSTAN_ENGINE_DEV_AUTO_UNSEAL")]
    dev_auto_unseal: Option<String>,
    /// Threads serving requests (default: one per CPU). Audit sinks have a thread each
    /// besides these.
    #[arg(long, env = "CAPSTAN_ENGINE_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// The engine's Service name, for the default serving names.
    #[arg(long, env = "CAPSTAN_ENGINE_SERVICE_NAME", default_value = "capstan-engine")]
    service_name: String,
}

impl Args {
    fn serving_names(&self) -> Vec<String> {
        if !self.serving_sans.is_empty() {
            return self.serving_sans.clone();
        }
        let (svc, ns) = (&self.service_name, &self.namespace);
        vec![
            svc.clone(),
            format!("{svc}.{ns}"),
            format!("{svc}.{ns}.svc"),
            format!("{svc}.{ns}.svc.cluster.local"),
            "localhost".into(),
            "127.0.0.1".into(),
        ]
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.worker_threads {
        anyhow::ensure!(threads > 0, "--worker-threads must be at least 1");
        runtime.worker_threads(threads);
    }
    runtime.enable_all().build()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    args.logging.init();
    anyhow::ensure!(!args.leaf_ttl.is_zero(), "--leaf-ttl must be more than 0");
    anyhow::ensure!(
        args.root_ttl > args.leaf_ttl,
        "--root-ttl must be longer than --leaf-ttl"
    );
    capstan_engine::mesh_ca::signing::validate_serving_names(&args.serving_names())
        .context("--serving-san")?;
    let mounts = [&args.kv_mount, &args.database_mount, &args.pki_mount];
    for (i, mount) in mounts.iter().enumerate() {
        anyhow::ensure!(
            !mount.is_empty() && !mount.contains('/') && !["sys", "auth", "mesh"].contains(&mount.as_str()),
            "mount {mount:?}: one path segment, not sys, auth or mesh"
        );
        anyhow::ensure!(!mounts[..i].contains(mount), "mount {mount:?} is given twice");
    }
    // One crypto provider for the whole process (kube's client included).
    let _ = rustls::crypto::ring::default_provider().install_default();

    let mut registry = capstan_telemetry::registry("capstan_engine");
    let metrics = mesh_ca::metrics::Metrics::register(&mut registry);
    let secrets_metrics = vault::Metrics::register(&mut registry);
    let lease_metrics = LeaseMetrics::register(&mut registry);
    let health = Health::default();
    let stop = Stop::on_signal();
    let admin = spawn_admin(args.admin_addr, registry, health.clone(), &stop).await?;

    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster)")?;
    let config = mesh_ca::Config {
        namespace: args.namespace.clone(),
        secret_name: args.ca_secret.clone(),
        roots_configmap: args.roots_configmap.clone(),
        trust_domain: args.trust_domain.clone(),
        token_audience: args.token_audience.clone(),
        leaf_ttl: args.leaf_ttl,
        root_ttl: args.root_ttl,
        propagation: args.rotation_propagation,
    };
    tracing::info!(
        namespace = %config.namespace,
        secret = %config.secret_name,
        trust_domain = %config.trust_domain,
        audience = %config.token_audience,
        leaf_ttl = ?config.leaf_ttl,
        propagation = ?config.propagation,
        "Starting capstan-engine"
    );
    let ca = mesh_ca::MeshCaService::new(client.clone(), config, metrics);

    let sinks = args
        .audit
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| match s.as_str() {
            "stdout" | "-" => Ok(audit::Sink::Stdout),
            path => audit::Sink::file(std::path::Path::new(path)),
        })
        .collect::<Result<Vec<_>, _>>()
        .context("--audit")?;
    if sinks.is_empty() {
        tracing::warn!("No audit sink: requests to the secrets API are not audited (--audit)");
    }
    let storage = KubeStorage::start(client.clone(), &args.namespace);
    let backend: Arc<dyn capstan_engine::store::storage::Backend> = storage.clone();
    let seal = Arc::new(Seal::new(backend.clone()));
    let logical = Logical::new(
        backend.clone(),
        seal.clone(),
        secrets_metrics.integrity_errors.clone(),
    );
    let database = Database::new(logical.clone(), &args.database_mount);
    let declared = Arc::new(Declared::default());
    tokio::spawn(
        declared
            .clone()
            .follow(client.clone(), args.auth_audience.clone()),
    );
    let engine = Arc::new(vault::Engine {
        seal: seal.clone(),
        tokens: Tokens::new(logical.clone()),
        policies: Policies::new(logical.clone(), declared.clone()),
        kv: Kv::new(logical.clone(), &args.kv_mount),
        database: database.clone(),
        pki: Pki::new(logical.clone(), &args.pki_mount),
        leases: Leases::new(logical.clone(), database, lease_metrics, args.revoke_backoff_max),
        kubernetes: KubernetesAuth::new(
            logical.clone(),
            declared.clone(),
            capstan_engine::auth::kubernetes::tokenreview::TokenReviewer::new(
                client.clone(),
                args.auth_audience.clone(),
            ),
            args.auth_audience.clone(),
        ),
        audit: audit::Audit::new(sinks, secrets_metrics.audit_failures.clone()),
        logical,
        metrics: secrets_metrics,
    });

    let resolver = Arc::new(https::ServingCert::default());
    let tls = https::server_config(resolver.clone())?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let router = api::router(api::Mounts {
        mesh_ca: ca.clone(),
        secrets: engine.clone(),
    });
    let secrets_task = tokio::spawn(run_secrets(engine.clone(), storage, client.clone(), args.clone()));

    let ca_task = tokio::spawn(ca.clone().run(stop.stopped()));
    let cert_task = tokio::spawn(https::keep_serving_cert(
        ca.clone(),
        resolver,
        args.serving_names(),
        args.leaf_ttl,
    ));
    https::serve(listener, tls, router, stop.stopped()).await;

    health.set(false);
    cert_task.abort();
    secrets_task.abort();
    let _ = ca_task.await;
    Ok(admin.finish().await?)
}

/// The secrets engine's background work: wait for storage, unseal in development mode,
/// and revoke expired tokens.
async fn run_secrets(
    engine: Arc<vault::Engine>,
    storage: Arc<KubeStorage>,
    client: kube::Client,
    args: Args,
) {
    storage.wait_synced().await;
    tracing::info!("Secrets storage synced");
    tokio::spawn(
        engine
            .leases
            .clone()
            .run(engine.tokens.clone(), engine.seal.clone()),
    );
    if let Some(secret) = &args.dev_auto_unseal {
        let backend: Arc<dyn capstan_engine::store::storage::Backend> = storage.clone();
        match dev_unseal::auto_unseal(client.clone(), &args.namespace, secret, &engine.seal, backend).await {
            Ok(()) => vault::after_unseal(&engine).await,
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "Development auto-unseal failed; the engine stays sealed")
            }
        }
    }
    let reaper = PodReaper::new(client);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        if engine.seal.is_sealed() {
            continue;
        }
        match engine.tokens.sweep().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(revoked = n, "Revoked expired tokens"),
            Err(error) => tracing::warn!(%error, "Sweeping expired tokens"),
        }
        if let Err(error) = reaper.sweep(&engine.tokens, &engine.leases).await {
            tracing::warn!(%error, "Revoking the logins of deleted pods");
        }
    }
}
