//! `capstan-sidecar agent`: secrets from the engine into files.
//!
//! It logs in with the pod's projected ServiceAccount token (`auth/kubernetes/login`),
//! renders each requested secret into a file of the shared memory-backed folder (mode
//! 0400, atomically), keeps its token and leases alive (`auth/token/renew-self`,
//! `sys/leases/renew`), re-issues a dynamic credential before its lease's max TTL,
//! re-renders a KV secret when its version changes (one data read per secret every
//! `--poll-interval`, 250 ms by default: the read returns the version and the data in one
//! request on a kept-alive connection, so a change costs nothing extra to fetch), and on
//! SIGTERM revokes its leases and its token before exiting 0. `--init-only` renders once
//! and exits 0.
//!
//! Parts: `args` (flags, secret specs, S4 name checks), `render` (templates, atomic 0400
//! writes), `metrics`. The engine's API is `capstan-engine-client`'s, with its defaults:
//! one kept-alive connection, 10 s per request, 1 MiB answers, no retry but the
//! pool's (a request never written on a kept connection the engine had closed goes once
//! on a new one); the agent's own backoff repeats what failed.

pub mod args;
mod metrics;
pub mod render;

use anyhow::Context as _;
use args::{AgentArgs, SecretSpec, Source};
use axum::{Router, extract::State, http::StatusCode, routing::get};
use capstan_engine_client::{Client as EngineClient, Method, Options, Roots};
use capstan_telemetry::{AdminServer, Health, Stop};
use metrics::{FileLabels, FileResultLabels, Metrics, ResultLabels, now_seconds};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::watch;

/// The agent's engine token and how many logins produced it (a new login means the
/// leases of the old token end with it: dynamic credentials are issued again).
struct Session {
    token: String,
    generation: u64,
}

/// A lease as the engine answered it (no Debug: its id is not for logs).
#[derive(Clone)]
struct Lease {
    id: String,
    duration: Duration,
    renewable: bool,
}

/// What one read of a secret gave.
struct Fetched {
    fields: Map<String, Value>,
    version: Option<u64>,
    lease: Option<Lease>,
}

struct Agent {
    args: AgentArgs,
    client: EngineClient,
    metrics: Metrics,
    session: watch::Sender<Arc<Session>>,
    /// Tokens replaced by a new login: revoked at shutdown with the current one.
    retired_tokens: Mutex<Vec<String>>,
    /// Every lease this agent holds, by file, with when it ends: revoked at shutdown.
    leases: Mutex<BTreeMap<String, Vec<(String, Instant)>>>,
    rendered: Mutex<BTreeSet<String>>,
    files: Vec<String>,
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let specs = args.specs()?;
    let dir =
        std::fs::metadata(&args.dir).with_context(|| format!("the secrets folder {}", args.dir.display()))?;
    anyhow::ensure!(dir.is_dir(), "{} is not a folder", args.dir.display());
    let roots = match (&args.ca_bundle, &args.ca_bundle_file) {
        (Some(pem), _) => Roots::pem(pem)?,
        // Re-read at every new connection: the kubelet updates the mounted bundle.
        (None, Some(path)) => Roots::file(path)?,
        (None, None) => anyhow::bail!(
            "the mesh trust bundle is required ({} or {})",
            capstan_contract::env::agent::CA_BUNDLE,
            capstan_contract::env::agent::CA_BUNDLE_FILE
        ),
    };
    let client = EngineClient::new(&args.engine_url, roots, Options::default())?;
    let mut registry = capstan_telemetry::registry("capstan_sidecar_agent");
    let metrics = Metrics::register(&mut registry);
    let stop = Stop::on_signal();
    let (session, _) = watch::channel(Arc::new(Session {
        token: String::new(),
        generation: 0,
    }));
    let agent = Arc::new(Agent {
        files: specs.iter().map(|s| s.file.clone()).collect(),
        args,
        client,
        metrics,
        session,
        retired_tokens: Mutex::new(Vec::new()),
        leases: Mutex::new(BTreeMap::new()),
        rendered: Mutex::new(BTreeSet::new()),
    });
    tracing::info!(
        namespace = %agent.args.namespace,
        pod = %agent.args.pod_name,
        role = %agent.args.role,
        files = %agent.files.join(","),
        init_only = agent.args.init_only,
        "Starting the secrets agent"
    );

    let admin = if agent.args.init_only {
        None
    } else {
        let server = AdminServer::bind(agent.args.admin_addr, registry, Health::default())
            .await?
            .with_routes(Router::new().route("/ready", get(ready).with_state(agent.clone())));
        Some(tokio::spawn(server.serve(stop.stopped())))
    };

    // Log in and render every file once, retrying until it works or we are stopped.
    let started = Instant::now();
    let mut delay = Duration::from_millis(200);
    let (token_ttl, renewable, states) = loop {
        let attempt = tokio::select! {
            attempt = agent.start(&specs) => attempt,
            () = stop.stopped() => {
                agent.shutdown().await;
                return finish(admin).await;
            }
        };
        match attempt {
            Ok(started) => break started,
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), retry_in = ?delay, "Could not render the secrets yet");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.stopped() => {
                        agent.shutdown().await;
                        return finish(admin).await;
                    }
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    };
    agent.metrics.ready.set(1);
    tracing::info!(files = agent.files.len(), took = ?started.elapsed(), "Rendered every secret");
    if agent.args.init_only {
        // The app uses these credentials after we exit: nothing is revoked here. They end
        // with their token's TTL, their own, or the pod (the engine revokes a deleted
        // pod's logins and leases).
        tracing::info!("Init-only: exiting");
        return Ok(());
    }

    let mut tasks = vec![tokio::spawn(agent.clone().keep_token(token_ttl, renewable))];
    for (spec, state) in specs.into_iter().zip(states) {
        let task = match spec.source {
            Source::Kv { .. } => tokio::spawn(agent.clone().follow_kv(spec, state.version)),
            Source::Database { .. } => {
                let lease = state.lease.expect("a database read has a lease");
                tokio::spawn(agent.clone().keep_lease(spec, lease))
            }
        };
        tasks.push(task);
    }
    stop.stopped().await;
    for task in &tasks {
        task.abort();
    }
    for task in tasks {
        let _ = task.await;
    }
    agent.shutdown().await;
    finish(admin).await
}

async fn finish(
    admin: Option<tokio::task::JoinHandle<Result<(), capstan_telemetry::Error>>>,
) -> anyhow::Result<()> {
    if let Some(admin) = admin {
        admin.await??;
    }
    tracing::info!("Stopped");
    Ok(())
}

/// The startup probe: 200 once every file has been rendered.
async fn ready(State(agent): State<Arc<Agent>>) -> (StatusCode, String) {
    let rendered = agent.rendered.lock();
    let missing: Vec<&str> = agent
        .files
        .iter()
        .filter(|f| !rendered.contains(*f))
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("waiting for: {}\n", missing.join(", ")),
        )
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500 * 2u64.pow(attempt.min(6))).min(Duration::from_secs(30))
}

impl Agent {
    fn token(&self) -> Arc<Session> {
        self.session.borrow().clone()
    }

    /// Logs in, then reads and renders every secret. The token's TTL and renewability, and
    /// what each read gave (in `specs`' order).
    async fn start(&self, specs: &[SecretSpec]) -> anyhow::Result<(Duration, bool, Vec<Fetched>)> {
        let (ttl, renewable) = self.login().await?;
        let mut states = Vec::new();
        for spec in specs {
            let fetched = self.fetch(spec).await?;
            self.render(spec, &fetched.fields)?;
            states.push(fetched);
        }
        Ok((ttl, renewable, states))
    }

    /// `auth/<mount>/login` with the projected token, read afresh (the kubelet rotates it).
    async fn login(&self) -> anyhow::Result<(Duration, bool)> {
        let jwt = std::fs::read_to_string(&self.args.token_file).with_context(|| {
            format!(
                "reading the ServiceAccount token {}",
                self.args.token_file.display()
            )
        })?;
        let reply = self
            .client
            .login(&self.args.auth_mount, &self.args.role, jwt.trim())
            .await;
        self.metrics
            .logins
            .get_or_create(&ResultLabels {
                result: Metrics::result(reply.is_ok()),
            })
            .inc();
        let capstan_engine_client::Login {
            token,
            ttl,
            renewable,
        } = reply?;
        self.metrics
            .token_expiry
            .set(now_seconds() + ttl.as_secs() as i64);
        // Only the start and the token task log in, one after the other: no race here.
        let previous = self.token();
        self.session.send_replace(Arc::new(Session {
            token,
            generation: previous.generation + 1,
        }));
        if !previous.token.is_empty() {
            self.retired_tokens.lock().push(previous.token.clone());
        }
        tracing::info!(role = %self.args.role, ttl = ?ttl, renewable, "Logged in to the engine");
        Ok((ttl, renewable))
    }

    async fn fetch(&self, spec: &SecretSpec) -> anyhow::Result<Fetched> {
        let session = self.token();
        let reply = self
            .client
            .call(Method::GET, spec.source.path(), Some(&session.token), None)
            .await
            .with_context(|| format!("reading the secret of file {:?}", spec.file))?;
        match &spec.source {
            Source::Kv { path } => {
                let fields = reply["data"]["data"]
                    .as_object()
                    .with_context(|| format!("{path}: the answer holds no data (is it a KV v2 secret?)"))?
                    .clone();
                Ok(Fetched {
                    fields,
                    version: reply["data"]["metadata"]["version"].as_u64(),
                    lease: None,
                })
            }
            Source::Database { path } => {
                let fields = reply["data"]
                    .as_object()
                    .with_context(|| format!("{path}: the answer holds no credential"))?
                    .clone();
                let lease = Lease {
                    id: reply["lease_id"]
                        .as_str()
                        .filter(|id| !id.is_empty())
                        .with_context(|| format!("{path}: the credential comes without a lease"))?
                        .to_owned(),
                    duration: Duration::from_secs(reply["lease_duration"].as_u64().unwrap_or(0)),
                    renewable: reply["renewable"].as_bool().unwrap_or(false),
                };
                self.metrics
                    .credentials_issued
                    .get_or_create(&FileResultLabels {
                        file: spec.file.clone(),
                        result: "ok",
                    })
                    .inc();
                self.track_lease(&spec.file, &lease);
                Ok(Fetched {
                    fields,
                    version: None,
                    lease: Some(lease),
                })
            }
        }
    }

    fn track_lease(&self, file: &str, lease: &Lease) {
        let ends = Instant::now() + lease.duration;
        let mut leases = self.leases.lock();
        let held = leases.entry(file.to_owned()).or_default();
        held.retain(|(_, end)| *end > Instant::now());
        match held.iter_mut().find(|(id, _)| *id == lease.id) {
            Some(entry) => entry.1 = ends,
            None => held.push((lease.id.clone(), ends)),
        }
        self.metrics
            .lease_expiry
            .get_or_create(&FileLabels {
                file: file.to_owned(),
            })
            .set(now_seconds() + lease.duration.as_secs() as i64);
    }

    fn render(&self, spec: &SecretSpec, fields: &Map<String, Value>) -> anyhow::Result<()> {
        let result = render::render(spec.template.as_ref(), fields)
            .map_err(|e| anyhow::anyhow!("rendering file {:?}: {e}", spec.file))
            .and_then(|content| {
                render::write_atomic(&self.args.dir, &spec.file, &content)
                    .with_context(|| format!("writing file {:?} into {}", spec.file, self.args.dir.display()))
            });
        self.metrics
            .renders
            .get_or_create(&FileResultLabels {
                file: spec.file.clone(),
                result: Metrics::result(result.is_ok()),
            })
            .inc();
        result?;
        self.rendered.lock().insert(spec.file.clone());
        tracing::info!(file = %spec.file, path = %spec.source.path(), "Rendered secret");
        Ok(())
    }

    /// Renews the token at two thirds of its TTL; logs in again when it is not renewable,
    /// its renewal fails, or it has reached its max TTL.
    async fn keep_token(self: Arc<Self>, mut ttl: Duration, renewable: bool) {
        let increment = ttl;
        let mut login_next = !renewable;
        let mut failures = 0;
        loop {
            if ttl.is_zero() && !login_next && failures == 0 {
                // A token without expiry: nothing to renew.
                return std::future::pending().await;
            }
            let wait = if failures > 0 {
                backoff(failures)
            } else {
                (ttl * 2 / 3).max(Duration::from_secs(1))
            };
            tokio::time::sleep(wait).await;
            if !login_next {
                let session = self.token();
                let renewed = self.client.renew_self(&session.token, increment).await;
                self.metrics
                    .token_renewals
                    .get_or_create(&ResultLabels {
                        result: Metrics::result(renewed.is_ok()),
                    })
                    .inc();
                match renewed {
                    Ok(renewed) => {
                        ttl = renewed.ttl;
                        self.metrics
                            .token_expiry
                            .set(now_seconds() + ttl.as_secs() as i64);
                        // Clamped at its max TTL: the next step is a new login.
                        login_next = ttl + Duration::from_secs(1) < increment;
                        failures = 0;
                        tracing::debug!(?ttl, "Renewed the engine token");
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "Renewing the engine token failed; logging in again");
                    }
                }
            }
            match self.login().await {
                Ok((new_ttl, renewable)) => {
                    ttl = new_ttl;
                    login_next = !renewable;
                    failures = 0;
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(error = %format!("{error:#}"), "Logging in again failed");
                }
            }
        }
    }

    /// Re-renders a KV secret when its version changes.
    async fn follow_kv(self: Arc<Self>, spec: SecretSpec, mut version: Option<u64>) {
        let mut failing = false;
        loop {
            tokio::time::sleep(self.args.poll_interval).await;
            let outcome = match self.fetch(&spec).await {
                Ok(fetched) if fetched.version == version => Ok(false),
                Ok(fetched) => self.render(&spec, &fetched.fields).map(|()| {
                    tracing::info!(file = %spec.file, from = ?version, to = ?fetched.version, "The secret changed");
                    version = fetched.version;
                    true
                }),
                Err(error) => Err(error),
            };
            let result = match &outcome {
                Ok(true) => "changed",
                Ok(false) => "unchanged",
                Err(_) => "failed",
            };
            self.metrics
                .kv_polls
                .get_or_create(&ResultLabels { result })
                .inc();
            match outcome {
                Err(error) if !failing => {
                    // Once per failing spell, not at every poll; the file keeps its last content.
                    tracing::warn!(file = %spec.file, error = %format!("{error:#}"), "Reading a KV secret failed; keeping the file as it is");
                    failing = true;
                }
                Ok(_) if failing => {
                    tracing::info!(file = %spec.file, "Reading the KV secret works again");
                    failing = false;
                }
                _ => {}
            }
        }
    }

    /// Renews a dynamic credential's lease at two thirds of its duration, and issues a new
    /// credential when the lease nears its max TTL, cannot be renewed, or a new login
    /// replaced the token it belongs to.
    async fn keep_lease(self: Arc<Self>, spec: SecretSpec, mut lease: Lease) {
        let mut session = self.session.subscribe();
        let mut generation = session.borrow().generation;
        let increment = lease.duration;
        let mut reissue = !lease.renewable;
        let mut failures = 0;
        loop {
            let wait = if failures > 0 {
                backoff(failures)
            } else if lease.duration.is_zero() && !reissue {
                // A lease without expiry: only a new login makes a new one necessary.
                Duration::MAX / 4
            } else {
                (lease.duration * 2 / 3).max(Duration::from_secs(1))
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                Ok(()) = session.changed() => {
                    if session.borrow().generation == generation {
                        continue;
                    }
                    // The old token's leases end with it.
                    reissue = true;
                }
            }
            generation = session.borrow().generation;
            if !reissue {
                let token = self.token();
                let renewed = self.client.renew_lease(&token.token, &lease.id, increment).await;
                self.metrics
                    .lease_renewals
                    .get_or_create(&FileResultLabels {
                        file: spec.file.clone(),
                        result: Metrics::result(renewed.is_ok()),
                    })
                    .inc();
                match renewed {
                    Ok(renewed) => {
                        lease.duration = renewed.ttl;
                        self.track_lease(&spec.file, &lease);
                        // Clamped at the max TTL: issue a new credential at the next step,
                        // while this one still has a third of its time left.
                        reissue = lease.duration + Duration::from_secs(1) < increment;
                        failures = 0;
                        tracing::debug!(file = %spec.file, duration = ?lease.duration, "Renewed a lease");
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(file = %spec.file, %error, "Renewing a lease failed; issuing a new credential");
                    }
                }
            }
            match self.fetch(&spec).await {
                Ok(fetched) => match self.render(&spec, &fetched.fields) {
                    Ok(()) => {
                        lease = fetched.lease.expect("a database read has a lease");
                        reissue = !lease.renewable;
                        failures = 0;
                        tracing::info!(file = %spec.file, "Issued a new credential");
                    }
                    Err(error) => {
                        failures += 1;
                        tracing::warn!(file = %spec.file, error = %format!("{error:#}"), "Rendering a new credential failed");
                    }
                },
                Err(error) => {
                    failures += 1;
                    self.metrics
                        .credentials_issued
                        .get_or_create(&FileResultLabels {
                            file: spec.file.clone(),
                            result: "failed",
                        })
                        .inc();
                    tracing::warn!(file = %spec.file, error = %format!("{error:#}"), "Issuing a new credential failed");
                }
            }
        }
    }

    /// Revokes every lease this agent holds, then its tokens (which would take their
    /// leases with them anyway, should the policy not grant `sys/leases/revoke`).
    async fn shutdown(&self) {
        let session = self.token();
        if session.token.is_empty() {
            tracing::info!("Stopping before any login: nothing to revoke");
            return;
        }
        let leases: Vec<(String, String)> = self
            .leases
            .lock()
            .iter()
            .flat_map(|(file, held)| held.iter().map(|(id, _)| (file.clone(), id.clone())))
            .collect();
        for (file, id) in &leases {
            let revoked = self.client.revoke_lease(&session.token, id).await;
            self.count_revocation("lease", revoked.is_ok());
            match revoked {
                Ok(_) => tracing::info!(%file, "Revoked a lease"),
                Err(error) if error.status() == Some(StatusCode::FORBIDDEN) => {
                    tracing::info!(%file, "The policy does not allow sys/leases/revoke; revoking the token revokes the lease")
                }
                Err(error) => {
                    tracing::warn!(%file, %error, "Revoking a lease failed; revoking the token revokes it")
                }
            }
        }
        let retired = std::mem::take(&mut *self.retired_tokens.lock());
        for token in retired.iter().chain(std::iter::once(&session.token)) {
            let revoked = self.client.revoke_self(token).await;
            self.count_revocation("token", revoked.is_ok());
            match revoked {
                Ok(_) => tracing::info!("Revoked the engine token and its leases"),
                // A retired token may have expired already, and its leases with it.
                Err(error) if error.status() == Some(StatusCode::FORBIDDEN) => {
                    tracing::info!("A token was already gone")
                }
                Err(error) => tracing::warn!(%error, "Revoking the engine token failed"),
            }
        }
    }

    fn count_revocation(&self, what: &'static str, ok: bool) {
        self.metrics
            .revocations
            .get_or_create(&metrics::RevocationLabels {
                what,
                result: Metrics::result(ok),
            })
            .inc();
    }
}
