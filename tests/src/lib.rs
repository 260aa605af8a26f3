//! The end-to-end harness. Every helper talks to the real cluster KUBECONFIG names and
//! runs Capstan's real binaries as processes.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    coordination::v1::Lease,
    core::v1::{Namespace, ServiceAccount},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, PostParams},
};
use std::{
    future::Future,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

/// Where the shared release of the chart lives, as a user would install it.
pub const SYSTEM_NAMESPACE: &str = "capstan-system";
pub const RELEASE: &str = "capstan";
/// The chart's controller ServiceAccount and leader Lease for release `capstan`.
pub const CONTROLLER_SA: &str = "capstan-controller";
pub const LEASE_NAME: &str = "capstan-controller";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A workspace binary, built by `cargo build --workspace` before the tests run.
pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    // The benchmarks run release builds (CAPSTAN_BIN_PROFILE=release).
    let profile = std::env::var("CAPSTAN_BIN_PROFILE").unwrap_or_else(|_| "debug".to_owned());
    let path = target.join(profile).join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first",
        path.display()
    );
    path
}

pub async fn client() -> Client {
    Client::try_default()
        .await
        .expect("a cluster in KUBECONFIG (run through hack/test.sh)")
}

/// Runs a command to completion; fails with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}):\n{stdout}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// `kubectl` with stdin, returning (success, stdout + stderr): for tests that expect refusals.
pub fn kubectl_stdin(args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl on PATH");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The nearest-rank percentile `p` (0..=1) of sorted latencies.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Sorts `latencies` (at least one) and returns their p50, p99 and maximum.
pub fn p50_p99_max(latencies: &mut [Duration]) -> (Duration, Duration, Duration) {
    latencies.sort_unstable();
    (
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        latencies[latencies.len() - 1],
    )
}

/// Polls `check` until it returns Some, or fails after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A namespace of its own for one test, labelled for bulk clean-up, deleted on drop.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub async fn new(client: &Client, prefix: &str) -> Self {
        let name = format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([("capstan.dev/e2e".to_owned(), "true".to_owned())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("creating a test namespace");
        Self { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = Command::new("kubectl")
            .args(["delete", "namespace", &self.name, "--wait=false"])
            .output();
    }
}

/// Installs (or upgrades) the chart once per test process, as release `capstan` in
/// `capstan-system`. Its controller, webhook and engine Deployments are scaled to zero: the
/// tests run those binaries themselves, out of the cluster, so that they can kill,
/// pause and restart them; on a cluster with real nodes (kind) in-cluster replicas
/// would otherwise compete for the Lease.
pub fn install_chart() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let chart = repo_root().join("charts/capstan");
        run(
            "helm",
            &[
                "upgrade",
                "--install",
                RELEASE,
                chart.to_str().unwrap(),
                "--namespace",
                SYSTEM_NAMESPACE,
                "--create-namespace",
                "--set",
                "controller.replicas=0",
                "--set",
                "webhook.replicas=0",
                "--set",
                "engine.replicas=0",
                "--wait",
                "--timeout",
                "120s",
            ],
        )
        .expect("helm install of the chart");
        run(
            "kubectl",
            &[
                "wait",
                "--for=condition=Established",
                "crd",
                "--all",
                "--timeout=60s",
            ],
        )
        .expect("the CRDs become established");
    });
}

/// A kubeconfig that authenticates as `namespace/serviceaccount` with a token from the
/// TokenRequest API: the same identity, and so the same RBAC, the pod would have.
pub async fn serviceaccount_kubeconfig(
    client: &Client,
    namespace: &str,
    serviceaccount: &str,
) -> Result<PathBuf> {
    let request = TokenRequest {
        metadata: ObjectMeta::default(),
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            bound_object_ref: None,
        },
        status: None,
    };
    let token = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(serviceaccount, &PostParams::default(), &request)
        .await
        .context("TokenRequest for the chart's ServiceAccount")?
        .status
        .context("TokenRequest returned no status")?
        .token;
    // Flattened: the certificate authority inline, for processes that cannot read the
    // admin's files (the mesh tests' pods run as the proxy's UID).
    let admin = run(
        "kubectl",
        &["config", "view", "--minify", "--raw", "--flatten", "-o", "json"],
    )?;
    let admin: serde_json::Value = serde_json::from_str(&admin)?;
    let cluster = admin["clusters"][0]["cluster"].clone();
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": cluster}],
        "users": [{"name": serviceaccount, "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": serviceaccount}}],
        "current-context": "test",
    });
    let path = std::env::temp_dir().join(format!(
        "capstan-e2e-{serviceaccount}-{:08x}.kubeconfig",
        rand::random::<u32>()
    ));
    std::fs::write(&path, serde_json::to_vec(&config)?)?;
    Ok(path)
}

/// Deletes the controller's Lease, so a test starts with no leader from an earlier test.
pub async fn clear_lease(client: &Client) {
    let _ = Api::<Lease>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .delete(LEASE_NAME, &DeleteParams::default())
        .await;
}

pub async fn lease_holder(client: &Client) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .get_opt(LEASE_NAME)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}

/// A loopback port nothing listens on, never one this process handed out before: the
/// kernel may give a port it just released to the next `bind(0)`, and two listeners of
/// one child (an engine's API and admin) were once handed the same port that way.
pub fn free_port() -> SocketAddr {
    static GIVEN: parking_lot::Mutex<std::collections::BTreeSet<u16>> =
        parking_lot::const_mutex(std::collections::BTreeSet::new());
    loop {
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        if GIVEN.lock().insert(addr.port()) {
            return addr;
        }
    }
}

/// Timings a test gives the controller's leader election.
#[derive(Clone, Copy, Debug)]
pub struct LeaseTimings {
    pub duration: u64,
    pub renew_deadline: u64,
    pub retry_period: u64,
}

impl Default for LeaseTimings {
    fn default() -> Self {
        Self {
            duration: 6,
            renew_deadline: 4,
            retry_period: 1,
        }
    }
}

/// A capstan-controller process, out of the cluster, as the chart's ServiceAccount.
/// One of Capstan's binaries running as a process of the test: its admin address, its
/// log file and the child, killed on drop. The per-binary handles below deref to it.
pub struct Process {
    pub admin: SocketAddr,
    pub log: PathBuf,
    child: Child,
}

impl Process {
    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    pub fn signal(&self, signal: &str) {
        run("kill", &[&format!("-{signal}"), &self.pid()]).expect("signalling a process");
    }

    /// Waits for the process to exit, up to `timeout`; its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let child = &mut self.child;
        eventually(timeout, "the process to exit", || {
            let status = child.try_wait().ok().flatten();
            async move { status }
        })
        .await
        .map(|s| s.code())
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn metrics(&self) -> Result<String> {
        let (code, body) = http_get(self.admin, "/metrics").await?;
        ensure!(code == 200, "/metrics answered {code}");
        Ok(body)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Lets a per-binary handle be used as its [`Process`].
macro_rules! deref_to_process {
    ($handle:ty) => {
        impl std::ops::Deref for $handle {
            type Target = Process;
            fn deref(&self) -> &Process {
                &self.process
            }
        }
        impl std::ops::DerefMut for $handle {
            fn deref_mut(&mut self) -> &mut Process {
                &mut self.process
            }
        }
    };
}

pub struct ControllerProcess {
    pub identity: String,
    process: Process,
}
deref_to_process!(ControllerProcess);

impl ControllerProcess {
    /// The only controller: no Lease left from an earlier test, so it leads at once.
    pub async fn sole(client: &Client, identity: &str) -> Result<Self> {
        clear_lease(client).await;
        Self::start(client, identity, LeaseTimings::default()).await
    }

    pub async fn start(client: &Client, identity: &str, timings: LeaseTimings) -> Result<Self> {
        Self::start_with(client, identity, timings, &[]).await
    }

    /// The only controller, with `extra` flags (e.g. `--engine-url` for SecretSync).
    pub async fn sole_with(client: &Client, identity: &str, extra: &[&str]) -> Result<Self> {
        clear_lease(client).await;
        Self::start_with(client, identity, LeaseTimings::default(), extra).await
    }

    pub async fn start_with(
        client: &Client,
        identity: &str,
        timings: LeaseTimings,
        extra: &[&str],
    ) -> Result<Self> {
        Self::start_with_env(client, identity, timings, extra, &[]).await
    }

    /// As [`Self::start_with`], with `env` set in the process's environment (the
    /// controller's test-only fault point, say, which is never inherited otherwise).
    pub async fn start_with_env(
        client: &Client,
        identity: &str,
        timings: LeaseTimings,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        install_chart();
        let kubeconfig = serviceaccount_kubeconfig(client, SYSTEM_NAMESPACE, CONTROLLER_SA).await?;
        let admin = free_port();
        // Unique per test process: two suites (two clones) may run at once.
        let log = std::env::temp_dir().join(format!("capstan-e2e-{identity}-{}.log", std::process::id()));
        let child = Command::new(bin("capstan-controller"))
            .env_remove("CAPSTAN_CONTROLLER_TEST_PAUSE_AT")
            .envs(env.iter().copied())
            .env("KUBECONFIG", &kubeconfig)
            .env(
                "CAPSTAN_LOG",
                "info,capstan_controller=debug,kube_runtime::watcher=debug",
            )
            .args([
                "--log-format",
                "json",
                "--identity",
                identity,
                "--namespace",
                SYSTEM_NAMESPACE,
                "--lease-name",
                LEASE_NAME,
                "--admin-addr",
                &admin.to_string(),
                "--lease-duration-seconds",
                &timings.duration.to_string(),
                "--renew-deadline-seconds",
                &timings.renew_deadline.to_string(),
                "--retry-period-seconds",
                &timings.retry_period.to_string(),
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting capstan-controller")?;
        let process = Self {
            identity: identity.to_owned(),
            process: Process { admin, log, child },
        };
        eventually(Duration::from_secs(20), "the controller's /healthz", || async {
            (http_get(admin, "/healthz").await.ok()?.0 == 200).then_some(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", process.logs()))?;
        Ok(process)
    }
}

/// The value of an un-labelled metric line such as `capstan_controller_leader 1`.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// A tiny HTTP/1.1 GET over loopback (the admin endpoints), returning (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await??;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await??;
    let code = response
        .split_whitespace()
        .nth(1)
        .context("no status line")?
        .parse()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// The Ready condition's (status, reason) of a ServiceIntentions, if it has one.
pub fn ready_of(obj: &capstan_crds::ServiceIntentions) -> Option<(String, String)> {
    let status = obj.status.as_ref()?;
    let ready = capstan_crds::conditions::get(&status.conditions, capstan_crds::conditions::READY)?;
    Some((ready.status.clone(), ready.reason.clone()))
}

/// A ServiceIntentions allowing `web` to reach `destination`.
pub fn intention(name: &str, destination: &str) -> capstan_crds::ServiceIntentions {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "mesh.capstan.dev/v1alpha1",
        "kind": "ServiceIntentions",
        "metadata": {"name": name},
        "spec": {"destination": {"name": destination}, "sources": [{"name": "web", "action": "allow"}]},
    }))
    .expect("a valid ServiceIntentions")
}

/// Creates `first` then `second`, both for destination `api`, and waits until `first`
/// is Accepted and `second` reports the Conflict: the older object is in force.
pub async fn create_conflicting_pair(client: &Client, ns: &str) -> Result<()> {
    let api = Api::<capstan_crds::ServiceIntentions>::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), &intention("first", "api"))
        .await?;
    wait_accepted(client, ns, "first").await?;
    // Creation timestamps have one-second resolution: make the order unambiguous.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    api.create(&PostParams::default(), &intention("second", "api"))
        .await?;
    wait_ready(client, ns, "second", "False", "Conflict", Duration::from_secs(30)).await?;
    Ok(())
}

/// Waits until `name` in `ns` is Ready=True (Accepted) for its current generation.
pub async fn wait_accepted(client: &Client, ns: &str, name: &str) -> Result<capstan_crds::ServiceIntentions> {
    wait_ready(client, ns, name, "True", "Accepted", Duration::from_secs(30)).await
}

/// Waits until `name` in `ns` reports Ready with `status`/`reason` for its current generation.
pub async fn wait_ready(
    client: &Client,
    ns: &str,
    name: &str,
    status: &str,
    reason: &str,
    timeout: Duration,
) -> Result<capstan_crds::ServiceIntentions> {
    let api = Api::<capstan_crds::ServiceIntentions>::namespaced(client.clone(), ns);
    eventually(timeout, &format!("{ns}/{name} Ready={status} ({reason})"), || {
        let api = api.clone();
        async move {
            let obj = api.get(name).await.ok()?;
            let observed = obj.status.as_ref()?.observed_generation;
            (ready_of(&obj)? == (status.to_owned(), reason.to_owned()) && observed == obj.metadata.generation)
                .then_some(obj)
        }
    })
    .await
}
pub mod jobs;
pub mod netns;
pub mod postgres;
pub mod secrets;

// === The mesh CA (capstan-engine) ===

/// The chart's engine ServiceAccount, its CA Secret and roots ConfigMap (release `capstan`).
pub const ENGINE_SA: &str = "capstan-engine";
pub const MESH_CA_SECRET: &str = "capstan-mesh-ca";
pub const MESH_ROOTS_CONFIGMAP: &str = capstan_contract::ROOTS_CONFIGMAP;
pub const MESH_TOKEN_AUDIENCE: &str = capstan_contract::MESH_CA_AUDIENCE;

/// A capstan-engine process, out of the cluster, as the chart's engine ServiceAccount
/// (so it has exactly the chart's RBAC), serving HTTPS on a loopback port.
pub struct EngineProcess {
    pub https: SocketAddr,
    process: Process,
}
deref_to_process!(EngineProcess);

impl EngineProcess {
    /// Starts the engine with `extra` flags (e.g. `--leaf-ttl 10s`) and waits until its
    /// CA is loaded (the `ready` metric).
    pub async fn start(client: &Client, name: &str, extra: &[&str]) -> Result<Self> {
        let process = Self::spawn(client, name, extra).await?;
        process.wait_ready().await?;
        Ok(process)
    }

    /// Starts the engine without waiting for it (to start several at once).
    pub async fn spawn(client: &Client, name: &str, extra: &[&str]) -> Result<Self> {
        Self::spawn_at(client, name, free_port(), extra, &[]).await
    }

    /// Starts the engine with extra environment (e.g. libfaketime's, to step its wall
    /// clock) and waits until its CA is loaded.
    pub async fn start_with_env(
        client: &Client,
        name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let process = Self::spawn_at(client, name, free_port(), extra, env).await?;
        process.wait_ready().await?;
        Ok(process)
    }

    /// Starts the engine serving its API on `https` (the mesh tests' bridge address) and
    /// waits until its CA is loaded.
    pub async fn start_at(client: &Client, name: &str, https: SocketAddr, extra: &[&str]) -> Result<Self> {
        let process = Self::spawn_at(client, name, https, extra, &[]).await?;
        process.wait_ready().await?;
        Ok(process)
    }

    async fn spawn_at(
        client: &Client,
        name: &str,
        https: SocketAddr,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        install_chart();
        let kubeconfig = serviceaccount_kubeconfig(client, SYSTEM_NAMESPACE, ENGINE_SA).await?;
        let admin = free_port();
        let log = std::env::temp_dir().join(format!(
            "capstan-e2e-engine-{name}-{:06x}.log",
            rand::random::<u32>() & 0xff_ffff
        ));
        let child = Command::new(bin("capstan-engine"))
            .env("KUBECONFIG", &kubeconfig)
            .env("CAPSTAN_LOG", "info,capstan_engine=debug")
            .envs(env.iter().copied())
            .args([
                "--log-format",
                "json",
                "--namespace",
                SYSTEM_NAMESPACE,
                "--listen",
                &https.to_string(),
                "--admin-addr",
                &admin.to_string(),
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting capstan-engine")?;
        Ok(Self {
            https,
            process: Process { admin, log, child },
        })
    }

    pub async fn wait_ready(&self) -> Result<()> {
        eventually(Duration::from_secs(30), "the engine's CA to load", || async {
            let (code, body) = http_get(self.admin, "/metrics").await.ok()?;
            (code == 200 && metric(&body, "capstan_engine_mesh_ca_ready") == Some(1.0)).then_some(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.logs()))
    }

    /// The current trust bundle, as `GET /v1/mesh/roots` over HTTPS answers it, trusting
    /// the bundle the engine published to its ConfigMap.
    pub async fn roots(&self, client: &Client) -> Result<serde_json::Value> {
        eventually(Duration::from_secs(20), "GET /v1/mesh/roots", || async {
            let bundle = published_roots(client).await?;
            let (code, body) = https_json(self.https, &bundle, "GET", "/v1/mesh/roots", None, None)
                .await
                .ok()?;
            (code == 200).then_some(body)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.logs()))
    }
}

/// The trust bundle the engine published (ConfigMap `capstan-mesh-roots`, key `roots.pem`).
pub async fn published_roots(client: &Client) -> Option<String> {
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .get_opt(MESH_ROOTS_CONFIGMAP)
        .await
        .ok()??
        .data?
        .remove(capstan_contract::ROOTS_KEY)
}

/// A token for `namespace/serviceaccount` from the real TokenRequest API, for `audience`.
pub async fn serviceaccount_token(
    client: &Client,
    namespace: &str,
    serviceaccount: &str,
    audience: &str,
) -> Result<String> {
    let request = TokenRequest {
        metadata: ObjectMeta::default(),
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(3600),
            bound_object_ref: None,
        },
        status: None,
    };
    Ok(Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(serviceaccount, &PostParams::default(), &request)
        .await
        .with_context(|| format!("TokenRequest for {namespace}/{serviceaccount}"))?
        .status
        .context("TokenRequest returned no status")?
        .token)
}

/// One HTTP/1.1 request over TLS 1.3 to `addr`, trusting only the PEM roots in
/// `roots_pem` (server name 127.0.0.1), on a connection of its own (verified against
/// `roots_pem`, whatever an earlier call trusted); returns (status, JSON body, or Null).
/// A server whose certificate does not chain to those roots fails the handshake.
pub async fn https_json(
    addr: SocketAddr,
    roots_pem: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> Result<(u16, serde_json::Value)> {
    use capstan_engine_client::Auth;
    let answer = engine_client(addr, roots_pem)?
        .send(
            method.parse()?,
            path,
            bearer.map_or(Auth::None, Auth::Bearer),
            body.map(|b| bytes::Bytes::from(b.to_owned())),
            &[],
        )
        .await?;
    Ok((answer.status.as_u16(), answer.json()))
}

/// The engine client as the tests use it: trusting exactly `roots_pem`, no retry, no
/// body limit to speak of, and the harness's old timeouts (2 s to connect plus 5 s for
/// TLS, 10 s for the answer).
pub fn engine_client(addr: SocketAddr, roots_pem: &str) -> Result<capstan_engine_client::Client> {
    use capstan_engine_client::{Client, Options, Roots};
    let options = Options {
        connect_timeout: Duration::from_secs(7),
        timeout: Duration::from_secs(17),
        body_limit: 256 * 1024 * 1024,
        ..Options::default()
    };
    Ok(Client::new(
        &format!("https://{addr}"),
        Roots::pem(roots_pem)?,
        options,
    )?)
}

// === The admission webhook (capstan-webhook) ===

/// The chart's webhook ServiceAccount, webhook configurations and certificate Secret.
pub const WEBHOOK_SA: &str = "capstan-webhook";
pub const WEBHOOK_CONFIG: &str = "capstan-webhook";
pub const WEBHOOK_TLS_SECRET: &str = "capstan-webhook-tls";
/// The ConfigMap the engine publishes the mesh roots in (the webhook copies them).
pub const WEBHOOK_ROOTS_CONFIGMAP: &str = capstan_contract::ROOTS_CONFIGMAP;

/// A capstan-webhook process out of the cluster, as the chart's ServiceAccount, serving
/// on 127.0.0.1 and pointing the chart's webhook configurations at itself by URL.
/// Dropping it stops the process and points the configurations back at the Service
/// (as the chart has them), so a later `helm upgrade` finds the chart's own objects.
pub struct WebhookProcess {
    pub addr: SocketAddr,
    process: Process,
}
deref_to_process!(WebhookProcess);

impl WebhookProcess {
    pub async fn start(client: &Client, extra: &[&str]) -> Result<Self> {
        install_chart();
        ensure_mesh_roots(client).await?;
        let kubeconfig = serviceaccount_kubeconfig(client, SYSTEM_NAMESPACE, WEBHOOK_SA).await?;
        let addr = free_port();
        let admin = free_port();
        let url = format!("https://{addr}");
        let log = std::env::temp_dir().join(format!("capstan-e2e-webhook-{}.log", addr.port()));
        // The benchmark runs the release build it was compiled with.
        let program = std::env::var_os("CAPSTAN_E2E_WEBHOOK_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| bin("capstan-webhook"));
        let child = Command::new(program)
            .env("KUBECONFIG", &kubeconfig)
            .env("CAPSTAN_LOG", "info,capstan_webhook=debug")
            .args([
                "--log-format",
                "json",
                "--listen",
                &addr.to_string(),
                "--admin-addr",
                &admin.to_string(),
                "--external-url",
                &url,
                "--namespace",
                SYSTEM_NAMESPACE,
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting capstan-webhook")?;
        let process = Self {
            addr,
            process: Process { admin, log, child },
        };
        let configs = Api::<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>::all(
            client.clone(),
        );
        // Every pod webhook: /mutate-pods, and /mutate-pods/enforced for labelled namespaces.
        let expected = format!("{url}/mutate-pods");
        eventually(
            Duration::from_secs(30),
            "the webhook to point its configuration at itself",
            || {
                let configs = configs.clone();
                let expected = expected.clone();
                async move {
                    let config = configs.get(WEBHOOK_CONFIG).await.ok()?;
                    config
                        .webhooks?
                        .iter()
                        .all(|w| {
                            w.client_config
                                .url
                                .as_deref()
                                .is_some_and(|u| u.starts_with(expected.as_str()))
                                && w.client_config.ca_bundle.is_some()
                        })
                        .then_some(())
                }
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", process.logs()))?;
        // The API server follows configuration changes through a watch: wait until it
        // calls this process before handing it to the test.
        let probe = TestNamespace::new(client, "e2e-whready").await;
        label_meshed(client, &probe.name).await?;
        // What the last dry run came back with, for the failure message.
        let last = parking_lot::Mutex::new(String::new());
        eventually(
            Duration::from_secs(30),
            "the API server to call the webhook",
            || async {
                match dry_run_pod(client, &probe.name, &app_pod("ready", serde_json::json!({}))).await {
                    Ok(pod) if is_injected(&pod) => Some(()),
                    Ok(_) => {
                        *last.lock() = "the pod was admitted without the proxy".into();
                        None
                    }
                    Err(error) => {
                        *last.lock() = format!("the create failed: {error}");
                        None
                    }
                }
            },
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{e}; last dry run: {}\nthe webhook's log:\n{}\nthe API server's log on webhooks:\n{}",
                last.lock(),
                process.logs(),
                apiserver_log_lines("webhook", 20)
            )
        })?;
        Ok(process)
    }
}

impl Drop for WebhookProcess {
    fn drop(&mut self) {
        // A paused webhook is resumed first, so the kill is not left pending.
        let _ = Command::new("kill").args(["-CONT", &self.pid()]).output();
        self.process.kill();
        restore_webhook_service_refs();
    }
}

/// The last `count` lines of the local cluster's API server log that contain `needle`,
/// for a failure message (empty when the cluster is not one hack/cluster.sh started).
pub fn apiserver_log_lines(needle: &str, count: usize) -> String {
    let Ok(name) = std::env::var("CAPSTAN_CLUSTER_NAME") else {
        return String::new();
    };
    let log = repo_root().join(format!(".cache/kwok/clusters/{name}/logs/kube-apiserver.log"));
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(needle)).collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

/// Points the chart's webhook configurations back at the webhook Service, as the chart
/// renders them (an out-of-cluster webhook replaced that with its URL).
pub fn restore_webhook_service_refs() {
    let service = |path: &str| {
        serde_json::json!({"url": null, "service": {
            "name": WEBHOOK_CONFIG, "namespace": SYSTEM_NAMESPACE, "path": path, "port": 443,
        }})
    };
    let mutating = serde_json::json!({"webhooks": [
        {"name": "namespaces.inject.capstan.dev", "clientConfig": service("/mutate-pods/enforced")},
        {"name": "pods.inject.capstan.dev", "clientConfig": service("/mutate-pods")},
        {"name": "agents.inject.capstan.dev", "clientConfig": service("/mutate-pods")},
    ]});
    let validating = serde_json::json!({"webhooks": [
        {"name": "serviceintentions.validate.capstan.dev", "clientConfig": service("/validate-serviceintentions")},
        {"name": "ephemeralcontainers.validate.capstan.dev", "clientConfig": service("/validate-ephemeralcontainers")},
        {"name": "dispatch.jobs.validate.capstan.dev", "clientConfig": service("/validate-jobs")},
        {"name": "jobs.validate.capstan.dev", "clientConfig": service("/validate-jobs")},
    ]});
    for (kind, patch) in [
        ("mutatingwebhookconfiguration", mutating),
        ("validatingwebhookconfiguration", validating),
    ] {
        let _ = Command::new("kubectl")
            .args([
                "patch",
                kind,
                WEBHOOK_CONFIG,
                "--type=strategic",
                "-p",
                &patch.to_string(),
            ])
            .output();
    }
}

/// The mesh roots the webhook copies into proxies. capstan-engine publishes them; where
/// it has not (this suite runs the webhook alone), a CA certificate stands in, created
/// only if the ConfigMap is absent so real roots are never overwritten.
pub async fn ensure_mesh_roots(client: &Client) -> Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let api = Api::<ConfigMap>::namespaced(client.clone(), SYSTEM_NAMESPACE);
    if api.get_opt(WEBHOOK_ROOTS_CONFIGMAP).await?.is_some() {
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("capstan-e2e-roots-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    let (key, cert) = (dir.join("key.pem"), dir.join("roots.pem"));
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=capstan-e2e-mesh-root",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ],
    )?;
    let configmap = ConfigMap {
        metadata: ObjectMeta {
            name: Some(WEBHOOK_ROOTS_CONFIGMAP.into()),
            ..Default::default()
        },
        data: Some(
            [(
                capstan_contract::ROOTS_KEY.to_owned(),
                std::fs::read_to_string(&cert)?,
            )]
            .into(),
        ),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &configmap).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Labels a namespace `capstan.dev/mesh=enabled`.
pub async fn label_meshed(client: &Client, namespace: &str) -> Result<()> {
    Api::<Namespace>::all(client.clone())
        .patch(
            namespace,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                serde_json::json!({"metadata": {"labels": {"capstan.dev/mesh": "enabled"}}}),
            ),
        )
        .await?;
    Ok(())
}

/// A pod with one app container serving HTTP on a named port, with an HTTP liveness
/// probe on it and a TCP readiness probe.
pub fn app_pod(name: &str, annotations: serde_json::Value) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"containers": [{
            "name": "app",
            "image": "registry.example/app:1",
            "ports": [{"name": "http", "containerPort": 8080}],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
            "readinessProbe": {"tcpSocket": {"port": 8080}},
        }]},
    }))
    .expect("a valid pod")
}

/// Creates a pod with server-side dry run: admission runs (webhooks included), nothing
/// is stored; returns the pod as admission left it.
pub async fn dry_run_pod(
    client: &Client,
    namespace: &str,
    pod: &k8s_openapi::api::core::v1::Pod,
) -> Result<k8s_openapi::api::core::v1::Pod, kube::Error> {
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    Api::namespaced(client.clone(), namespace)
        .create(&params, pod)
        .await
}

/// Whether a pod carries the mesh proxy as a native sidecar.
pub fn is_injected(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.name == "capstan-proxy" && c.restart_policy.as_deref() == Some("Always"))
        })
}

/// The value of one labelled metric line, e.g. `name{namespace="x"}`.
pub fn labelled_metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}
pub mod mesh;

/// Creates ServiceIntentions (YAML manifests) that the chart's tenancy policy refuses, as
/// on a cluster where they were stored before the policy existed: its binding is switched
/// to audit-only for the writes and back to Deny after, whatever happens.
pub async fn store_despite_tenancy_policy(manifests: &[String]) -> Result<()> {
    const BINDING: &str = "capstan-intentions-tenancy";
    let actions = |action: &str| {
        run(
            "kubectl",
            &[
                "patch",
                "validatingadmissionpolicybinding",
                BINDING,
                "--type=merge",
                "-p",
                &format!(r#"{{"spec":{{"validationActions":["{action}"]}}}}"#),
            ],
        )
    };
    struct Restore<F: Fn(&str) -> Result<String>>(F);
    impl<F: Fn(&str) -> Result<String>> Drop for Restore<F> {
        fn drop(&mut self) {
            (self.0)("Deny").expect("restoring the tenancy policy");
        }
    }
    actions("Audit")?;
    let _restore = Restore(actions);
    for manifest in manifests {
        // The API server picks the binding's change up from its informer.
        eventually(
            Duration::from_secs(20),
            "the tenancy policy in audit mode",
            || async { kubectl_stdin(&["create", "-f", "-"], manifest).0.then_some(()) },
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod free_port_tests {
    /// Without the record of handed-out ports, 500 calls on Linux repeat a port almost
    /// surely (the kernel picks from about 14,000, and reuses ones just released).
    #[test]
    fn free_port_never_repeats_within_a_process() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..500 {
            assert!(seen.insert(super::free_port().port()));
        }
    }
}
