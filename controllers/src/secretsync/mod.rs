//! The SecretSync reconciler: keeps a Secret equal to what the secrets engine holds for
//! a KV entry, a database role or a PKI role, read as the SecretSync's own
//! ServiceAccount, through the engine's Vault-compatible HTTPS API only.
//!
//! Per reconcile: validate (pure), log in as the ServiceAccount (a 10-minute token from
//! the TokenRequest API, audience `capstan-engine`), read or issue, render the target's
//! data (pure), write it if its HMAC differs, renew or replace leases (`schedule.rs`,
//! pure), roll Deployments, and revoke a replaced lease only after they rolled out (S6).
//! A finalizer revokes the leases and deletes (or releases) the target when the
//! SecretSync is deleted, also when that happened while the controller was down (K3).
//!
//! Issuing is write-ahead (K1, K4): the intent, with the sealed token of a login made for
//! this one issue, is recorded before the engine is asked, and replaced by the lease id
//! in one conditional write. A controller that stops in between leaves the intent; the
//! next reconcile (this replica's or its successor's) claims it (a conditional write, so
//! the stopped issuer can no longer record what it obtained), revokes that token, and
//! with it the credential nobody recorded, and clears it, before it issues anything
//! (`finish_orphan`, `leases::Issuing`).
//!
//! Secret values live in memory only as long as a reconcile needs them, plus (dynamic
//! sources) the last rendered data per SecretSync, so a hand-edited target can be
//! restored without issuing a new credential. They never reach logs, Events, status,
//! metrics or error messages.

mod engine;
mod hmac;
mod leases;
mod rollout;
mod schedule;
mod template;

use crate::{
    context::Context,
    leader,
    status::{self, HasStatus, Outcome},
};
use capstan_crds::{
    DeletionPolicy, SecretSync, SecretSyncSpec, SecretSyncStatus, SourceKind,
    conditions::{self, ConditionStatus, READY},
};
use engine::Engine;
use futures::StreamExt;
use k8s_openapi::{
    ByteString,
    api::{
        apps::v1::Deployment,
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::{ConfigMap, Secret, ServiceAccount},
    },
    apimachinery::pkg::apis::meta::v1::{OwnerReference, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions},
    runtime::{
        Controller,
        controller::Action,
        events::{Event, EventType},
        watcher,
    },
};
use leases::{Current, Issuing, Record, RolloutMark};
use parking_lot::Mutex;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use schedule::{Lease, RenewBefore, Step};
use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};
use template::Data;

const CONTROLLER: &str = "secretsync";
pub const FINALIZER: &str = "secrets.capstan.dev/revoke";
/// On every Secret the controller writes: which SecretSync it belongs to.
pub const LABEL: &str = "capstan.dev/secretsync-uid";
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "capstan-controller");
/// The audience of the ServiceAccount tokens the controller logs in with.
pub const AUDIENCE: &str = "capstan-engine";
const TOKEN_SECONDS: i64 = 600;
const DEFAULT_REFRESH: Duration = Duration::from_secs(60);
/// Test-only fault injection, for the end-to-end tests of RELIABILITY K1 and K4 (never
/// set by the chart): with `CAPSTAN_CONTROLLER_TEST_PAUSE_AT=<point>` in its environment
/// the controller, the first time a reconcile reaches `<point>`, logs
/// `Test fault: pausing at <point>` and sleeps `TEST_PAUSE`, so that a test can SIGKILL
/// or SIGSTOP it at exactly that point. Points: `intent` (the intent to issue is saved,
/// nothing is issued yet), `issued` (the engine issued a credential whose lease id is
/// not recorded yet), `claimed` (a reconcile claimed the intent a stopped issue left,
/// and has not revoked its token yet) and `revoked` (it revoked that token, and has not
/// cleared the intent yet). It ships in every binary, so a set variable is announced with a Warning in the log
/// at startup (`register_metrics`, the module's first call). Unset, it costs one lookup
/// of a cached value.
pub const TEST_PAUSE_AT_ENV: &str = "CAPSTAN_CONTROLLER_TEST_PAUSE_AT";
const TEST_PAUSE: Duration = Duration::from_secs(5);

/// The fault point `TEST_PAUSE_AT_ENV` names, read once; the first read warns that it
/// is set (a production controller must never run with it).
fn test_pause_at() -> Option<&'static str> {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    AT.get_or_init(|| {
        let at = std::env::var(TEST_PAUSE_AT_ENV).ok();
        if let Some(point) = &at {
            tracing::warn!(
                point = %point,
                "{TEST_PAUSE_AT_ENV} is set: this controller runs with a TEST-ONLY fault point and pauses \
                 {TEST_PAUSE:?} the first time it reaches {point:?}. Never set it outside Capstan's tests."
            );
        }
        at
    })
    .as_deref()
}

/// See `TEST_PAUSE_AT_ENV`.
async fn test_fault(point: &str) {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if test_pause_at() == Some(point) && !TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        tracing::warn!(point, "Test fault: pausing at {point}");
        tokio::time::sleep(TEST_PAUSE).await;
    }
}

/// Condition reasons this reconciler sets on Ready.
pub mod reasons {
    pub const SYNCED: &str = "Synced";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const TARGET_NOT_OWNED: &str = "TargetNotOwned";
    pub const SERVICE_ACCOUNT_NOT_FOUND: &str = "ServiceAccountNotFound";
    pub const LOGIN_DENIED: &str = "LoginDenied";
    pub const TARGET_WRITE_FAILED: &str = "TargetWriteFailed";
    pub const KUBERNETES_ERROR: &str = "KubernetesError";
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing the finalizer of {0}")]
    Finalizer(String, #[source] kube::Error),
    #[error("cleaning up: {0}")]
    Cleanup(String),
    #[error(transparent)]
    Status(#[from] status::Error),
    #[error(transparent)]
    Leader(#[from] leader::Error),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Finalizer(..) => "finalizer",
            Self::Cleanup(_) => "cleanup",
            Self::Status(status::Error::Leader(_)) | Self::Leader(_) => "not_leader",
            Self::Status(_) => "status",
        }
    }
}

impl HasStatus for SecretSync {
    type Status = SecretSyncStatus;

    fn status(&self) -> Option<&SecretSyncStatus> {
        self.status.as_ref()
    }
}

// === metrics ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

struct SyncMetrics {
    syncs: Family<ResultLabels, Counter>,
    renewals: Family<ResultLabels, Counter>,
    revocations: Family<ResultLabels, Counter>,
    propagation: Histogram,
}

fn sync_metrics() -> &'static SyncMetrics {
    static METRICS: OnceLock<SyncMetrics> = OnceLock::new();
    METRICS.get_or_init(|| SyncMetrics {
        syncs: Family::default(),
        renewals: Family::default(),
        revocations: Family::default(),
        propagation: Histogram::new([0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]),
    })
}

pub fn register_metrics(registry: &mut Registry) {
    // Called once at startup: the place to warn of a test-only fault point.
    test_pause_at();
    let m = sync_metrics();
    registry.register(
        "secretsync_syncs",
        "SecretSync reconciles by result: created, changed, restored, rotated, unchanged, or the failure reason",
        m.syncs.clone(),
    );
    registry.register(
        "secretsync_lease_renewals",
        "Lease renewals by result (renewed, failed)",
        m.renewals.clone(),
    );
    registry.register(
        "secretsync_lease_revocations",
        "Lease revocations by result (revoked, failed, abandoned)",
        m.revocations.clone(),
    );
    registry.register(
        "secretsync_propagation_seconds",
        "Time from a source change (a KV version's creation, a credential's issue) to the target Secret holding it",
        m.propagation.clone(),
    );
}

fn count(family: &Family<ResultLabels, Counter>, result: &'static str) {
    family.get_or_create(&ResultLabels { result }).inc();
}

// === context ===

/// A login token (never logged: no Debug).
struct CachedToken {
    token: String,
    /// Which ServiceAccount and role it is for: a spec change logs in again.
    identity: (String, String),
    /// Renew it (or log in again) after this.
    refresh_after: Instant,
    /// When the engine ends it (and every lease it issued: Vault's rule).
    expires_at: Timestamp,
    ttl: Duration,
    renewable: bool,
    /// Tells tokens apart: which one issued the current lease.
    generation: u64,
}

/// The token a call used, and what is known of its life.
struct TokenInfo {
    token: String,
    expires_at: Timestamp,
    generation: u64,
}

pub struct SyncContext {
    base: Arc<Context>,
    engine: Engine,
    hmac: hmac::Key,
    tokens: Mutex<HashMap<String, CachedToken>>,
    /// Dynamic sources: the data last written, by SecretSync UID, with the lease it
    /// came from, so a hand-edited target is restored without a new credential.
    delivered: Mutex<HashMap<String, (String, Data)>>,
    /// Consecutive failures by SecretSync UID, for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Dynamic sources: the generation of the token that issued the current lease. The
    /// engine revokes a token's leases when the token ends, so that token is renewed
    /// while its lease is in use; after a restart it is unknown, and the credential is
    /// replaced before the token's recorded expiry.
    issuers: Mutex<HashMap<String, u64>>,
}

/// Runs the reconciler until `shutdown` resolves.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let shutdown = futures::FutureExt::shared(shutdown);
    let engine = match Engine::new(&ctx.config.engine_url, &ctx.config.roots_configmap) {
        Ok(engine) => engine,
        Err(error) => {
            tracing::error!(%error, "SecretSync reconciler not started");
            return;
        }
    };
    let own = Api::<Secret>::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let key = loop {
        match hmac::load_or_create(&own).await {
            Ok(key) => break key,
            Err(error) => {
                tracing::warn!(%error, source = ?std::error::Error::source(&error), "Loading the SecretSync HMAC key; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    () = shutdown.clone() => return,
                }
            }
        }
    };
    let roots = tokio::spawn(engine.clone().follow_roots(Api::<ConfigMap>::namespaced(
        ctx.client.clone(),
        &ctx.config.namespace,
    )));
    let _roots = AbortOnDrop(roots);
    let sync = Arc::new(SyncContext {
        base: ctx.clone(),
        engine,
        hmac: key,
        tokens: Mutex::default(),
        delivered: Mutex::default(),
        failures: Mutex::default(),
        issuers: Mutex::default(),
    });
    let api = Api::<SecretSync>::all(ctx.client.clone());
    // Only the Secrets this controller wrote are watched (and cached): a hand edit of a
    // target, or its deletion, reconciles its SecretSync at once.
    let owned = Api::<Secret>::all(ctx.client.clone());
    Controller::new(api, watcher::Config::default().any_semantic())
        .owns(owned, watcher::Config::default().labels(LABEL))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, sync)
        .for_each(|_| futures::future::ready(()))
        .await;
}

fn error_policy(obj: Arc<SecretSync>, error: &Error, ctx: Arc<SyncContext>) -> Action {
    let label = error.metric_label();
    ctx.base.metrics.failed(CONTROLLER, label);
    if label == "not_leader" {
        return Action::await_change();
    }
    tracing::warn!(error = %error, source = ?std::error::Error::source(error), "Reconcile failed");
    Action::requeue(ctx.backoff(&obj.uid().unwrap_or_default()))
}

impl SyncContext {
    fn backoff(&self, uid: &str) -> Duration {
        let mut failures = self.failures.lock();
        let n = failures.entry(uid.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        Duration::from_secs(1u64 << (*n - 1).min(8)).min(Duration::from_secs(300))
    }

    fn succeeded(&self, uid: &str) {
        self.failures.lock().remove(uid);
    }

    fn forget(&self, uid: &str) {
        self.failures.lock().remove(uid);
        self.tokens.lock().remove(uid);
        self.delivered.lock().remove(uid);
        self.issuers.lock().remove(uid);
    }

    async fn publish(&self, obj: &SecretSync, type_: EventType, reason: &str, action: &str, note: String) {
        if self.base.leadership.ensure().is_err() {
            return;
        }
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(error) = self.base.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(%error, "Publishing an event");
        }
    }

    /// A login token for the SecretSync's ServiceAccount and role.
    async fn token(&self, obj: &SecretSync) -> Result<String, Failure> {
        self.token_info(obj).await.map(|t| t.token)
    }

    /// The cached token while two thirds of its TTL are left; then the same token
    /// renewed (it may have issued a lease in use), or a new login if it cannot be.
    async fn token_info(&self, obj: &SecretSync) -> Result<TokenInfo, Failure> {
        let uid = obj.uid().unwrap_or_default();
        let identity = (
            obj.spec.auth.service_account_name.clone(),
            obj.spec.auth.role.clone(),
        );
        let cached = self.tokens.lock().get(&uid).and_then(|c| {
            (c.identity == identity).then(|| {
                (
                    c.token.clone(),
                    c.refresh_after,
                    c.expires_at,
                    c.ttl,
                    c.renewable,
                    c.generation,
                )
            })
        });
        if let Some((token, refresh_after, expires_at, ttl, renewable, generation)) = cached {
            if Instant::now() < refresh_after {
                return Ok(TokenInfo {
                    token,
                    expires_at,
                    generation,
                });
            }
            if renewable && Timestamp::now() < expires_at {
                if let Ok(renewed) = self.engine.renew_self(&token, ttl).await {
                    let expires_at = schedule::add(Timestamp::now(), renewed.ttl);
                    // Renewed in full: use it for two thirds of the grant. Granted less
                    // (its max TTL): use it for what is left, then log in again.
                    let usable = if renewed.ttl + Duration::from_secs(1) >= ttl {
                        renewed.ttl.mul_f64(2.0 / 3.0)
                    } else {
                        renewed.ttl
                    };
                    if let Some(c) = self.tokens.lock().get_mut(&uid) {
                        c.refresh_after = Instant::now() + usable.max(Duration::from_secs(1));
                        c.expires_at = expires_at;
                        c.renewable = renewed.renewable && renewed.ttl + Duration::from_secs(1) >= ttl;
                    }
                    if Timestamp::now() < schedule::sub(expires_at, Duration::from_secs(1)) {
                        return Ok(TokenInfo {
                            token,
                            expires_at,
                            generation,
                        });
                    }
                }
            } else if Timestamp::now() < schedule::sub(expires_at, Duration::from_secs(5)) {
                // Not renewable: used until shortly before it ends.
                return Ok(TokenInfo {
                    token,
                    expires_at,
                    generation,
                });
            }
        }
        let ns = obj.namespace().unwrap_or_default();
        let request = TokenRequest {
            metadata: ObjectMeta::default(),
            spec: TokenRequestSpec {
                audiences: vec![AUDIENCE.to_owned()],
                expiration_seconds: Some(TOKEN_SECONDS),
                bound_object_ref: None,
            },
            status: None,
        };
        let jwt = match Api::<ServiceAccount>::namespaced(self.base.client.clone(), &ns)
            .create_token_request(&identity.0, &PostParams::default(), &request)
            .await
        {
            Ok(response) => response.status.map(|s| s.token).unwrap_or_default(),
            Err(kube::Error::Api(e)) if e.code == 404 => {
                return Err(Failure::permanent(
                    reasons::SERVICE_ACCOUNT_NOT_FOUND,
                    format!("ServiceAccount {ns}/{} does not exist", identity.0),
                ));
            }
            Err(error) => {
                return Err(Failure::transient(
                    reasons::KUBERNETES_ERROR,
                    format!(
                        "requesting a token for ServiceAccount {ns}/{}: {error}",
                        identity.0
                    ),
                ));
            }
        };
        let login = self.engine.login(&identity.1, &jwt).await.map_err(|e| {
            if e.transient() {
                Failure::engine(e)
            } else {
                Failure::permanent(
                    reasons::LOGIN_DENIED,
                    format!(
                        "the engine refused the login of ServiceAccount {ns}/{} with role {:?}: {e}",
                        identity.0, identity.1
                    ),
                )
            }
        })?;
        let usable = login.ttl.mul_f64(2.0 / 3.0).max(Duration::from_secs(1));
        let expires_at = schedule::add(Timestamp::now(), login.ttl);
        let generation = rand::random::<u64>();
        self.tokens.lock().insert(
            uid,
            CachedToken {
                token: login.token.clone(),
                identity,
                refresh_after: Instant::now() + usable,
                expires_at,
                ttl: login.ttl,
                renewable: login.renewable,
                generation,
            },
        );
        Ok(TokenInfo {
            token: login.token,
            expires_at,
            generation,
        })
    }

    /// Forgets a token the engine no longer accepts (so the next attempt logs in again).
    fn drop_token(&self, obj: &SecretSync) {
        self.tokens.lock().remove(&obj.uid().unwrap_or_default());
    }
}

// === outcomes ===

/// Why a sync did not complete: the Ready=False reason, a message (no values), and
/// whether retrying soon may help.
#[derive(Debug)]
struct Failure {
    reason: &'static str,
    message: String,
    transient: bool,
}

impl Failure {
    fn permanent(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            transient: false,
        }
    }

    fn transient(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            transient: true,
        }
    }

    fn engine(error: engine::Error) -> Self {
        Self {
            reason: error.reason(),
            transient: error.transient(),
            message: error.to_string(),
        }
    }

    fn kube(what: &str, error: kube::Error) -> Self {
        Self::transient(reasons::KUBERNETES_ERROR, format!("{what}: {error}"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Write {
    Created,
    Changed,
    Restored,
    Rotated,
}

impl Write {
    fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Changed => "changed",
            Self::Restored => "restored",
            Self::Rotated => "rotated",
        }
    }
}

/// What a successful sync leaves in status, and when to look again.
#[derive(Debug, Default)]
struct Synced {
    wrote: Option<Write>,
    hmac: String,
    version: Option<i64>,
    lease: Option<Lease>,
    next: Duration,
    /// A replaced lease still waits for its rollout (reported in the message).
    pending_rollouts: usize,
}

// === validation (pure) ===

#[derive(Debug)]
struct Validated {
    kind: SourceKind,
    templates: Option<BTreeMap<String, template::Template>>,
    renew_before: RenewBefore,
    refresh: Duration,
}

fn validate(spec: &SecretSyncSpec) -> Result<Validated, String> {
    let kind = spec
        .source
        .kind()
        .ok_or("source: set exactly one of kv, database and pki")?;
    let templates = spec
        .target
        .template
        .as_ref()
        .map(template::parse_all)
        .transpose()
        .map_err(|e| e.to_string())?;
    let templates = match (templates, kind, spec.target.type_) {
        (None, SourceKind::Pki, capstan_crds::TargetType::Tls) => Some(default_tls_template()),
        (t, _, _) => t,
    };
    let renew_before = RenewBefore::parse(spec.renew_before.as_deref())?;
    let refresh = match &spec.refresh_interval {
        Some(text) => schedule::parse_duration(text).map_err(|e| format!("refreshInterval: {e}"))?,
        None => DEFAULT_REFRESH,
    }
    .max(Duration::from_millis(100));
    if let Some(pki) = &spec.source.pki
        && let Some(ttl) = &pki.ttl
    {
        schedule::parse_duration(ttl).map_err(|e| format!("source.pki.ttl: {e}"))?;
    }
    Ok(Validated {
        kind,
        templates,
        renew_before,
        refresh,
    })
}

/// A PKI source written to a `kubernetes.io/tls` Secret with no template: the layout
/// cert-manager and ingress controllers read.
fn default_tls_template() -> BTreeMap<String, template::Template> {
    [
        ("tls.crt", "{{ certificate }}"),
        ("tls.key", "{{ private_key }}"),
        ("ca.crt", "{{ issuing_ca }}"),
    ]
    .into_iter()
    .map(|(k, v)| {
        (
            k.to_owned(),
            template::parse(k, v).expect("a valid built-in template"),
        )
    })
    .collect()
}

/// The target Secret as this SecretSync wants it (pure).
fn desired_target(obj: &SecretSync, data: &Data) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(obj.spec.target.name.clone()),
            namespace: obj.namespace(),
            labels: Some(owned_labels(obj)),
            owner_references: Some(vec![owner_ref(obj)]),
            ..Default::default()
        },
        type_: Some(obj.spec.target.type_.as_str().to_owned()),
        data: Some(
            data.iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone())))
                .collect(),
        ),
        ..Default::default()
    }
}

fn owned_labels(obj: &SecretSync) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL.to_owned(), obj.uid().unwrap_or_default()),
        (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
    ])
}

fn owner_ref(obj: &SecretSync) -> OwnerReference {
    obj.controller_owner_ref(&())
        .expect("a stored SecretSync has a name and UID")
}

/// Whether `secret` is this SecretSync's (its controller owner reference is).
fn owned_by(secret: &Secret, obj: &SecretSync) -> bool {
    let uid = obj.uid();
    secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|r| r.controller == Some(true) && Some(&r.uid) == uid.as_ref())
}

/// SHA-256 (hex) of what a leased credential was issued for.
fn fingerprint(spec: &SecretSyncSpec) -> String {
    let text = serde_json::to_vec(&(&spec.source, &spec.auth)).expect("a spec serializes");
    ring::digest::digest(&ring::digest::SHA256, &text)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// === reconcile ===

#[tracing::instrument(skip(obj, ctx), fields(ns = obj.namespace().unwrap_or_default(), name = obj.name_any()))]
async fn reconcile(obj: Arc<SecretSync>, ctx: Arc<SyncContext>) -> Result<Action, Error> {
    let _timer = ctx.base.metrics.start(CONTROLLER);
    ctx.base.leadership.ensure()?;
    let ns = obj.namespace().unwrap_or_default();
    let api = Api::<SecretSync>::namespaced(ctx.base.client.clone(), &ns);
    if obj.metadata.deletion_timestamp.is_some() {
        if obj.finalizers().iter().any(|f| f == FINALIZER) {
            cleanup(&obj, &ctx).await?;
            set_finalizer(&api, &obj, false).await?;
        }
        ctx.forget(&obj.uid().unwrap_or_default());
        return Ok(Action::await_change());
    }
    if !obj.finalizers().iter().any(|f| f == FINALIZER) {
        // Nothing is issued before the finalizer is in place: no lease can outlive an
        // object deleted in between.
        set_finalizer(&api, &obj, true).await?;
        return Ok(Action::requeue(Duration::ZERO));
    }

    let uid = obj.uid().unwrap_or_default();
    let generation = obj.metadata.generation;
    let result = match validate(&obj.spec) {
        Ok(validated) => sync(&obj, &ctx, &validated).await,
        Err(message) => Err(Failure::permanent(reasons::INVALID_SPEC, message)),
    };
    let name = obj.name_any();
    match result {
        Ok(synced) => {
            ctx.succeeded(&uid);
            let result = synced.wrote.map_or("unchanged", Write::as_str);
            count(&sync_metrics().syncs, result);
            let message = match (synced.version, &synced.lease) {
                (Some(v), _) => format!("Secret {} holds version {v}", obj.spec.target.name),
                (None, Some(lease)) => format!(
                    "Secret {} holds a credential valid until {}{}",
                    obj.spec.target.name,
                    lease.expires_at(),
                    if synced.pending_rollouts > 0 {
                        format!(
                            "; {} replaced lease(s) wait for the rollout",
                            synced.pending_rollouts
                        )
                    } else {
                        String::new()
                    }
                ),
                (None, None) => format!("Secret {} is in sync", obj.spec.target.name),
            };
            let condition =
                conditions::new(READY, ConditionStatus::True, reasons::SYNCED, message, generation);
            let now = Time(Timestamp::now());
            let change = |status: &mut SecretSyncStatus| {
                status.observed_generation = generation;
                status.secret_hmac = Some(synced.hmac.clone());
                status.source_version = synced.version;
                status.lease_expires_at = synced.lease.as_ref().map(|l| Time(l.expires_at()));
                status.lease_renewable = synced.lease.as_ref().map(Lease::extendable);
                if synced.wrote.is_some() || status.last_sync_time.is_none() {
                    status.last_sync_time = Some(now.clone());
                }
                conditions::upsert(&mut status.conditions, condition.clone());
            };
            // A poll that changed nothing writes nothing, and does not even read the
            // status again: the object this reconcile was handed already says it all.
            let mut predicted = obj.status.clone().unwrap_or_default();
            change(&mut predicted);
            if obj.status.as_ref() != Some(&predicted) {
                status::update(
                    &api,
                    &name,
                    &ctx.base.leadership,
                    &ctx.base.metrics,
                    CONTROLLER,
                    change,
                )
                .await?;
            }
            Ok(Action::requeue(synced.next.min(ctx.base.config.resync)))
        }
        Err(failure) => {
            count(&sync_metrics().syncs, failure.reason);
            tracing::warn!(reason = failure.reason, message = %failure.message, "SecretSync not in sync");
            let condition = conditions::new(
                READY,
                ConditionStatus::False,
                failure.reason,
                failure.message.clone(),
                generation,
            );
            let outcome = status::update(
                &api,
                &name,
                &ctx.base.leadership,
                &ctx.base.metrics,
                CONTROLLER,
                |status| {
                    status.observed_generation = generation;
                    conditions::upsert(&mut status.conditions, condition.clone());
                },
            )
            .await?;
            // One Warning per distinct failure; a failure that persists is not repeated
            // on every retry (the condition holds it).
            let repeated = match &outcome {
                Outcome::Unchanged => true,
                Outcome::Written { before, .. } => conditions::get(&before.conditions, READY)
                    .is_some_and(|c| c.reason == failure.reason && c.message == failure.message),
            };
            if !repeated {
                ctx.publish(&obj, EventType::Warning, failure.reason, "Sync", failure.message)
                    .await;
            }
            Ok(Action::requeue(if failure.transient {
                ctx.backoff(&uid)
            } else {
                // Only a change of the spec, the ServiceAccount or the engine's
                // configuration helps: look again at a slow pace.
                ctx.backoff(&uid).max(Duration::from_secs(30))
            }))
        }
    }
}

async fn set_finalizer(api: &Api<SecretSync>, obj: &SecretSync, present: bool) -> Result<(), Error> {
    let mut finalizers: Vec<String> = obj
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if present {
        finalizers.push(FINALIZER.to_owned());
    }
    // Conditional on the version read: never drops a finalizer someone else added since.
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": obj.resource_version()}
    });
    api.patch(&obj.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
        .map_err(|e| Error::Finalizer(obj.name_any(), e))
}

async fn sync(obj: &SecretSync, ctx: &SyncContext, v: &Validated) -> Result<Synced, Failure> {
    let ns = obj.namespace().unwrap_or_default();
    let secrets = Api::<Secret>::namespaced(ctx.base.client.clone(), &ns);
    let target_name = &obj.spec.target.name;
    let target = secrets
        .get_opt(target_name)
        .await
        .map_err(|e| Failure::kube("reading the target Secret", e))?;
    if let Some(existing) = &target
        && !owned_by(existing, obj)
    {
        return Err(Failure::permanent(
            reasons::TARGET_NOT_OWNED,
            format!(
                "Secret {ns}/{target_name} exists and is not owned by this SecretSync: it is never \
                     overwritten; delete it or choose another target.name"
            ),
        ));
    }
    match v.kind {
        SourceKind::Kv => sync_kv(obj, ctx, v, &secrets, target).await,
        SourceKind::Database | SourceKind::Pki => sync_leased(obj, ctx, v, &secrets, target).await,
    }
}

async fn sync_kv(
    obj: &SecretSync,
    ctx: &SyncContext,
    v: &Validated,
    secrets: &Api<Secret>,
    target: Option<Secret>,
) -> Result<Synced, Failure> {
    let kv = obj.spec.source.kv.as_ref().expect("validated: a kv source");
    let entry = match read_kv(obj, ctx, kv).await {
        Ok(entry) => entry,
        Err(failure) => return Err(failure),
    };
    let data = template::render(v.templates.as_ref(), &entry.fields)
        .map_err(|e| Failure::permanent(reasons::INVALID_SPEC, e.to_string()))?;
    let hmac = ctx.hmac.digest(&data);
    let mut synced = Synced {
        hmac: hmac.clone(),
        version: Some(entry.version),
        // A pinned version never changes: no need to poll it.
        next: if kv.version.is_some() {
            ctx.base.config.resync
        } else {
            v.refresh
        },
        ..Default::default()
    };
    let in_place = target.as_ref().map(|t| ctx.hmac.digest_secret(t));
    let type_ok = target
        .as_ref()
        .is_none_or(|t| t.type_.as_deref().unwrap_or("Opaque") == obj.spec.target.type_.as_str());
    if in_place.as_deref() == Some(hmac.as_str()) && type_ok {
        return Ok(synced);
    }
    let previous_version = obj.status.as_ref().and_then(|s| s.source_version);
    let write = match &target {
        None => Write::Created,
        Some(_) if previous_version != Some(entry.version) => Write::Changed,
        Some(_) => Write::Restored,
    };
    write_target(secrets, obj, target.as_ref(), &data).await?;
    synced.wrote = Some(write);
    if write == Write::Changed
        && let Some(created) = entry.created
    {
        let seconds = Timestamp::now().duration_since(created).as_secs_f64();
        sync_metrics().propagation.observe(seconds.max(0.0));
    }
    let note = match write {
        Write::Created => format!(
            "Created Secret {} from version {}",
            obj.spec.target.name, entry.version
        ),
        Write::Changed => format!(
            "Updated Secret {} to version {} (was {})",
            obj.spec.target.name,
            entry.version,
            previous_version.map_or("none".to_owned(), |v| v.to_string())
        ),
        _ => format!(
            "Restored Secret {}: its data had been changed by hand (HMAC mismatch)",
            obj.spec.target.name
        ),
    };
    let reason = if write == Write::Restored {
        "Restored"
    } else {
        "Synced"
    };
    ctx.publish(obj, EventType::Normal, reason, "Sync", note).await;
    if write == Write::Changed {
        restart_all(obj, ctx).await;
    }
    Ok(synced)
}

/// Reads the KV entry, logging in again once if the cached token was refused.
async fn read_kv(
    obj: &SecretSync,
    ctx: &SyncContext,
    kv: &capstan_crds::KvSource,
) -> Result<engine::KvEntry, Failure> {
    for attempt in 0..2 {
        let token = ctx.token(obj).await?;
        match ctx.engine.kv_read(&token, &kv.mount, &kv.path, kv.version).await {
            Ok(entry) => return Ok(entry),
            Err(engine::Error::Denied { .. }) if attempt == 0 => ctx.drop_token(obj),
            Err(error) => return Err(Failure::engine(error)),
        }
    }
    unreachable!("the second attempt returns")
}

async fn write_target(
    secrets: &Api<Secret>,
    obj: &SecretSync,
    existing: Option<&Secret>,
    data: &Data,
) -> Result<(), Failure> {
    let desired = desired_target(obj, data);
    let name = obj.spec.target.name.as_str();
    let failed = |what: &str, e: kube::Error| {
        Failure::transient(reasons::TARGET_WRITE_FAILED, format!("{what} Secret {name}: {e}"))
    };
    let existing = match existing {
        // The type of a Secret cannot change: replace the Secret.
        Some(e) if e.type_ != desired.type_ => {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: e.uid(),
                    resource_version: e.resource_version(),
                }),
                ..Default::default()
            };
            secrets
                .delete(name, &params)
                .await
                .map_err(|e| failed("deleting (to change its type)", e))?;
            None
        }
        other => other,
    };
    match existing {
        None => secrets
            .create(&PostParams::default(), &desired)
            .await
            .map(drop)
            .map_err(|e| failed("creating", e)),
        Some(existing) => {
            // A full replace, conditional on the version read: the data becomes exactly
            // what the source says (keys added by hand are removed too); labels and
            // annotations others set are kept.
            let mut next = existing.clone();
            next.data = desired.data;
            next.string_data = None;
            next.metadata
                .labels
                .get_or_insert_with(Default::default)
                .extend(owned_labels(obj));
            secrets
                .replace(name, &PostParams::default(), &next)
                .await
                .map(drop)
                .map_err(|e| failed("updating", e))
        }
    }
}

/// Restarts every Deployment of `rolloutRestart`; the marks of those that exist.
async fn restart_all(obj: &SecretSync, ctx: &SyncContext) -> Vec<RolloutMark> {
    let ns = obj.namespace().unwrap_or_default();
    let api = Api::<Deployment>::namespaced(ctx.base.client.clone(), &ns);
    let at = Timestamp::now().to_string();
    let mut marks = vec![];
    for target in &obj.spec.rollout_restart {
        match rollout::restart(&api, &target.name, &at).await {
            Ok(Some(generation)) => {
                ctx.publish(
                    obj,
                    EventType::Normal,
                    "RolloutRestarted",
                    "Restart",
                    format!("Restarted Deployment {} for the new Secret value", target.name),
                )
                .await;
                marks.push(RolloutMark {
                    name: target.name.clone(),
                    generation,
                });
            }
            Ok(None) => {
                ctx.publish(
                    obj,
                    EventType::Warning,
                    "RolloutTargetMissing",
                    "Restart",
                    format!("Deployment {} of rolloutRestart does not exist", target.name),
                )
                .await
            }
            Err(error) => {
                tracing::warn!(%error, deployment = %target.name, "Restarting a Deployment");
                ctx.publish(
                    obj,
                    EventType::Warning,
                    "RolloutRestartFailed",
                    "Restart",
                    format!("Restarting Deployment {}: {error}", target.name),
                )
                .await;
            }
        }
    }
    marks
}

async fn read_record(secrets: &Api<Secret>, obj: &SecretSync) -> Result<(Record, Option<Secret>), Failure> {
    let name = leases::secret_name(&obj.name_any());
    match secrets.get_opt(&name).await {
        Ok(Some(secret)) => {
            let record = Record::from_secret(&secret).map_err(|e| {
                Failure::permanent(
                    reasons::KUBERNETES_ERROR,
                    format!("lease record Secret {name} is unreadable: {e}"),
                )
            })?;
            Ok((record, Some(secret)))
        }
        Ok(None) => Ok((Record::default(), None)),
        Err(e) => Err(Failure::kube("reading the lease record", e)),
    }
}

/// Writes the record; returns the Secret as stored (for the next conditional write).
async fn save_record(
    secrets: &Api<Secret>,
    obj: &SecretSync,
    record: &Record,
    stored: Option<Secret>,
) -> Result<Secret, Failure> {
    let name = leases::secret_name(&obj.name_any());
    let result = match stored {
        Some(mut secret) => {
            secret.data = Some(record.data());
            secrets.replace(&name, &PostParams::default(), &secret).await
        }
        None => {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some(owned_labels(obj)),
                    owner_references: Some(vec![owner_ref(obj)]),
                    ..Default::default()
                },
                type_: Some(leases::SECRET_TYPE.to_owned()),
                data: Some(record.data()),
                ..Default::default()
            };
            secrets.create(&PostParams::default(), &secret).await
        }
    };
    result.map_err(|e| Failure::kube("writing the lease record", e))
}

/// A new credential, issued with `token` (a login of its own, see `leases::Issuing`).
/// No second attempt with another token: a refusal means the policy refuses, or that a
/// successor revoked this token (it found the intent), and then nothing may be issued.
async fn issue(
    obj: &SecretSync,
    ctx: &SyncContext,
    kind: SourceKind,
    token: &str,
) -> Result<engine::Issued, Failure> {
    let result = match kind {
        SourceKind::Database => {
            let db = obj
                .spec
                .source
                .database
                .as_ref()
                .expect("validated: a database source");
            ctx.engine.database_creds(token, &db.mount, &db.role).await
        }
        _ => {
            let pki = obj.spec.source.pki.as_ref().expect("validated: a pki source");
            ctx.engine.pki_issue(token, pki).await
        }
    };
    result.map_err(Failure::engine)
}

/// Finishes what a stopped issue left (an intent without a recorded lease), in three
/// steps, each safe to repeat (K1, K4): claim the intent (a conditional write marking it
/// `revoking`: from then on the issuer's own conditional write of its lease id fails,
/// so a thawed issuer cannot record or deliver the credential about to be revoked),
/// revoke its token (and with it the lease it may have obtained), clear the intent. A
/// reconcile that finds the intent claimed (its claimant stopped) revokes again, which
/// changes nothing if it was done. Returns the record's Secret as stored.
async fn finish_orphan(
    secrets: &Api<Secret>,
    obj: &SecretSync,
    ctx: &SyncContext,
    record: &mut Record,
    mut stored: Option<Secret>,
) -> Result<Option<Secret>, Failure> {
    let Some(mut issuing) = record.issuing.clone() else {
        return Ok(stored);
    };
    if !issuing.revoking {
        issuing.revoking = true;
        record.issuing = Some(issuing.clone());
        stored = Some(save_record(secrets, obj, record, stored).await?);
        test_fault("claimed").await;
    }
    revoke_orphan(obj, ctx, &issuing).await.map_err(Failure::engine)?;
    test_fault("revoked").await;
    record.issuing = None;
    Ok(Some(save_record(secrets, obj, record, stored).await?))
}

/// What revoking an orphan's token achieved.
#[derive(Debug, PartialEq, Eq)]
enum Orphan {
    /// Revoked now, with whatever it obtained.
    Revoked,
    /// The engine no longer knows it (revoked or expired already): nothing is left.
    Gone,
    /// Refused, and nothing shows that the token is gone: whatever it obtained may stay
    /// valid until the token ends.
    NotRevoked,
}

/// Reads the engine's answer to revoke-self (pure). The engine refuses an unknown token
/// and a token without the grant alike; a token that had the grant when it was made
/// (`revocable`) is refused only because it is gone.
fn orphan_outcome(revoked: Result<(), engine::Error>, revocable: bool) -> Result<Orphan, engine::Error> {
    match revoked {
        Ok(()) => Ok(Orphan::Revoked),
        Err(engine::Error::Denied { .. }) if revocable => Ok(Orphan::Gone),
        Err(engine::Error::Denied { .. }) => Ok(Orphan::NotRevoked),
        Err(error) => Err(error),
    }
}

/// Revokes the token of an intent, and so the lease it may have issued; Ok once nothing
/// more can be done (revoked, gone, or refused: reported, never claimed as revoked).
async fn revoke_orphan(obj: &SecretSync, ctx: &SyncContext, issuing: &Issuing) -> Result<(), engine::Error> {
    let uid = obj.uid().unwrap_or_default();
    let Some(token) = ctx
        .hmac
        .open(&uid, &issuing.sealed_token)
        .and_then(|t| String::from_utf8(t).ok())
    else {
        // Not sealed under this key (the key Secret was replaced): nothing can be done
        // but let the engine end the lease with its token.
        abandon_orphan(
            obj,
            ctx,
            issuing,
            "The intent of an unrecorded issue cannot be opened; its lease ends with its token",
            "An interrupted issue left a token that cannot be opened (the controller's key changed)",
        )
        .await;
        return Ok(());
    };
    let outcome = orphan_outcome(ctx.engine.revoke_self(&token).await, issuing.revocable)?;
    let cached = ctx.tokens.lock().get(&uid).map(|c| c.token == token);
    if cached == Some(true) {
        ctx.drop_token(obj);
    }
    match outcome {
        Orphan::Revoked => {
            count(&sync_metrics().revocations, "revoked");
            tracing::info!(since = %issuing.since, "Revoked the token of an issue that was never recorded");
            ctx.publish(
                obj,
                EventType::Normal,
                "LeaseRevoked",
                "Revoke",
                "Revoked whatever an interrupted issue obtained (its lease was never recorded)".to_owned(),
            )
            .await;
        }
        Orphan::Gone => {
            tracing::info!(
                since = %issuing.since,
                "The token of an issue that was never recorded is already gone (revoked or expired): nothing to revoke"
            );
        }
        Orphan::NotRevoked => {
            abandon_orphan(
                obj,
                ctx,
                issuing,
                "The engine refused to revoke the token of an issue that was never recorded; what it obtained ends with it",
                "An interrupted issue's token could not be revoked (the engine refused auth/token/revoke-self, \
                 which the role's policy did not grant)",
            )
            .await;
        }
    }
    Ok(())
}

/// An orphan that cannot be revoked: counted, logged and told in an Event, never claimed
/// as revoked; what it obtained stays valid until its token ends.
async fn abandon_orphan(obj: &SecretSync, ctx: &SyncContext, issuing: &Issuing, log: &str, why: &str) {
    count(&sync_metrics().revocations, "abandoned");
    tracing::warn!(since = %issuing.since, "{log}");
    ctx.publish(
        obj,
        EventType::Warning,
        "OrphanNotRevoked",
        "Revoke",
        format!(
            "{why}: a credential it may have obtained stays valid until that token ends{}",
            until(issuing)
        ),
    )
    .await;
}

/// " at <time>" when an intent's token expiry is known.
fn until(issuing: &Issuing) -> String {
    issuing
        .token_expires_at
        .map(|t| format!(" at {t}"))
        .unwrap_or_default()
}

/// Ends a credential this reconcile obtained but could not record (its record changed
/// since the intent: a successor claimed it, or the write failed): revoking the issue's
/// own token ends exactly that credential, also when the successor got there first (the
/// token is then gone). Without the grant, the lease id is revoked instead.
async fn abandon_issue(
    obj: &SecretSync,
    ctx: &SyncContext,
    token: &str,
    revocable: bool,
    lease_id: Option<&str>,
) {
    match orphan_outcome(ctx.engine.revoke_self(token).await, revocable) {
        Ok(outcome @ (Orphan::Revoked | Orphan::Gone)) => {
            ctx.drop_token(obj);
            tracing::info!(
                already = outcome == Orphan::Gone,
                "Revoked the token (and credential) of an issue whose lease id could not be recorded"
            );
        }
        Ok(Orphan::NotRevoked) | Err(_) => {
            if let Some(id) = lease_id {
                revoke(obj, ctx, id).await;
            }
        }
    }
}

async fn sync_leased(
    obj: &SecretSync,
    ctx: &SyncContext,
    v: &Validated,
    secrets: &Api<Secret>,
    target: Option<Secret>,
) -> Result<Synced, Failure> {
    let uid = obj.uid().unwrap_or_default();
    let (mut record, mut stored) = read_record(secrets, obj).await?;
    // An issue that stopped before its lease was recorded (the controller was killed,
    // or paused past its leader Lease, in between): its credential is revoked before
    // anything else, so it never lives on beside the one issued next (K1).
    stored = finish_orphan(secrets, obj, ctx, &mut record, stored).await?;
    let fingerprint = fingerprint(&obj.spec);
    let now = Timestamp::now();
    let in_place = target.as_ref().map(|t| ctx.hmac.digest_secret(t));
    let type_ok = target
        .as_ref()
        .is_none_or(|t| t.type_.as_deref().unwrap_or("Opaque") == obj.spec.target.type_.as_str());
    let mut wrote = None;
    let mut replace_reason = None;

    // The token that issued the current lease, if this process still holds it: renew it
    // as it comes due, and record how long it (and so the lease) can last.
    let mut token_wake = None;
    let issuer = ctx.issuers.lock().get(&uid).copied();
    if let (Some(generation), Some(current)) = (issuer, record.current.as_mut()) {
        if let Ok(info) = ctx.token_info(obj).await
            && info.generation == generation
        {
            token_wake = Some(schedule::until(now, info.expires_at) / 3);
            if current.token_expires_at != Some(info.expires_at) {
                current.token_expires_at = Some(info.expires_at);
                stored = Some(save_record(secrets, obj, &record, stored).await?);
            }
        } else {
            // A new login: the issuing token is no longer renewed.
            ctx.issuers.lock().remove(&uid);
        }
    }

    match record.current.clone() {
        None => replace_reason = Some("first credential"),
        Some(_) if record.fingerprint != fingerprint => replace_reason = Some("the source or auth changed"),
        Some(current) => {
            if in_place.as_deref() != Some(current.hmac.as_str()) || !type_ok {
                // The target lost the credential (edited or deleted by hand): write it
                // back if this process still has it, else issue a new one.
                let cached = ctx
                    .delivered
                    .lock()
                    .get(&uid)
                    .filter(|(id, _)| *id == current.id.clone().unwrap_or_default())
                    .map(|(_, data)| data.clone());
                match cached {
                    Some(data) if ctx.hmac.digest(&data) == current.hmac => {
                        write_target(secrets, obj, target.as_ref(), &data).await?;
                        wrote = Some(Write::Restored);
                        ctx.publish(
                            obj,
                            EventType::Normal,
                            "Restored",
                            "Sync",
                            format!(
                                "Restored Secret {}: its data had been changed by hand (HMAC mismatch)",
                                obj.spec.target.name
                            ),
                        )
                        .await;
                    }
                    _ => {
                        replace_reason =
                            Some("the target no longer holds the credential and it cannot be read again")
                    }
                }
            }
            if replace_reason.is_none() {
                let effective = schedule::capped(current.lease(), current.token_expires_at);
                match schedule::plan(&effective, v.renew_before, now) {
                    Step::Wait { .. } => {}
                    Step::Replace => replace_reason = Some("the lease is at its max TTL"),
                    Step::Renew => {
                        let id = current.id.clone().expect("an extendable lease has an id");
                        let token = ctx.token(obj).await?;
                        let requested = current.lease().original_ttl;
                        match ctx.engine.renew(&token, &id, requested).await {
                            Ok(renewed) => {
                                count(&sync_metrics().renewals, "renewed");
                                let lease = current.lease().renewed(
                                    Timestamp::now(),
                                    requested,
                                    renewed.ttl,
                                    renewed.renewable,
                                );
                                let mut next = current.clone();
                                next.set_lease(&lease);
                                record.current = Some(next);
                                stored = Some(save_record(secrets, obj, &record, stored).await?);
                                ctx.publish(
                                    obj,
                                    EventType::Normal,
                                    "LeaseRenewed",
                                    "Renew",
                                    format!("Renewed the lease until {}", lease.expires_at()),
                                )
                                .await;
                            }
                            Err(error) if error.transient() => {
                                count(&sync_metrics().renewals, "failed");
                                // S5: the Secret stays as it is until the lease ends.
                                return Err(Failure::engine(error));
                            }
                            Err(error) => {
                                count(&sync_metrics().renewals, "failed");
                                tracing::info!(%error, "Lease renewal refused; issuing a new credential");
                                replace_reason = Some("the engine refused to renew the lease");
                            }
                        }
                    }
                }
            }
        }
    }

    if let Some(why) = replace_reason {
        // A login of its own for this issue, put on record (sealed) before the engine is
        // asked: if this process stops before the lease id is recorded, whoever comes
        // next revokes that token and with it the lease (leases::Issuing).
        ctx.drop_token(obj);
        let token = ctx.token_info(obj).await?;
        // Whether that token may revoke itself: only then does a later refusal of
        // revoke-self mean that it is gone (leases::Issuing::revocable).
        let revocable = ctx
            .engine
            .can_revoke_self(&token.token)
            .await
            .map_err(Failure::engine)?;
        if !revocable {
            tracing::warn!(
                "The role's tokens cannot revoke themselves (auth/token/revoke-self, which the engine's \
                 default policy grants): should this issue be interrupted, its credential lives until \
                 its token ends"
            );
        }
        record.issuing = Some(Issuing {
            sealed_token: ctx.hmac.seal(&uid, token.token.as_bytes()),
            since: Timestamp::now(),
            revocable,
            token_expires_at: Some(token.expires_at),
            revoking: false,
        });
        stored = Some(save_record(secrets, obj, &record, stored).await?);
        test_fault("intent").await;
        // A leader paused past its term must not issue when it thaws; the successor has
        // the intent (and revokes the token) if this check passes just too early.
        if ctx.base.leadership.ensure().is_err() {
            return Err(Failure::transient(
                reasons::KUBERNETES_ERROR,
                "no longer the leader: not issuing",
            ));
        }
        let issued = issue(obj, ctx, v.kind, &token.token).await?;
        tracing::info!(kind = ?v.kind, leased = issued.lease_id.is_some(), "Issued a credential");
        test_fault("issued").await;
        let issued_at = Timestamp::now();
        let data = match template::render(v.templates.as_ref(), &issued.fields) {
            Ok(data) => data,
            Err(error) => {
                // Never delivered: revoke it at once.
                if let Some(id) = &issued.lease_id {
                    revoke(obj, ctx, id).await;
                }
                return Err(Failure::permanent(reasons::INVALID_SPEC, error.to_string()));
            }
        };
        let hmac = ctx.hmac.digest(&data);
        let lease = Lease::issued(issued_at, issued.ttl, issued.renewable);
        let first = record.current.is_none();
        record.fingerprint = fingerprint.clone();
        let mut next = Current::new(issued.lease_id.clone(), &lease, hmac.clone());
        // Only a lease ends with its token; a certificate without one just expires.
        next.token_expires_at = issued.lease_id.as_ref().map(|_| token.expires_at);
        // A replaced credential without a lease (a certificate) retires nothing, but the
        // workloads still roll onto the new one.
        let restart_now = record.current.as_ref().is_some_and(|c| c.id.is_none());
        record.replace(next);
        // The lease id replaces the intent in one conditional write: a successor that
        // claimed the intent meanwhile (before it revokes this token) makes it fail.
        record.issuing = None;
        // The lease id is on record before the credential is used anywhere.
        match save_record(secrets, obj, &record, stored).await {
            Ok(s) => stored = Some(s),
            Err(failure) => {
                abandon_issue(obj, ctx, &token.token, revocable, issued.lease_id.as_deref()).await;
                return Err(failure);
            }
        }
        if issued.lease_id.is_some() {
            ctx.issuers.lock().insert(uid.clone(), token.generation);
        } else {
            ctx.issuers.lock().remove(&uid);
        }
        ctx.delivered.lock().insert(
            uid.clone(),
            (issued.lease_id.clone().unwrap_or_default(), data.clone()),
        );
        write_target(secrets, obj, target.as_ref(), &data).await?;
        sync_metrics()
            .propagation
            .observe(Timestamp::now().duration_since(issued_at).as_secs_f64().max(0.0));
        if restart_now {
            restart_all(obj, ctx).await;
        }
        let write = if first { Write::Created } else { Write::Rotated };
        wrote = Some(write);
        ctx.publish(
            obj,
            EventType::Normal,
            if first { "Synced" } else { "Rotated" },
            "Issue",
            format!(
                "Wrote a new credential to Secret {} ({why}); valid until {}",
                obj.spec.target.name,
                lease.expires_at()
            ),
        )
        .await;
    }

    // Retiring leases: restart the workloads once, revoke when they rolled out (or the
    // lease has ended anyway).
    let mut next = ctx.base.config.resync;
    let mut pending = 0;
    if !record.retiring.is_empty() {
        let deployments =
            Api::<Deployment>::namespaced(ctx.base.client.clone(), &obj.namespace().unwrap_or_default());
        let mut changed = false;
        let mut keep = vec![];
        for mut retiring in std::mem::take(&mut record.retiring) {
            if !retiring.restarted {
                retiring.rollouts = restart_all(obj, ctx).await;
                retiring.restarted = true;
                changed = true;
            }
            let mut done = Timestamp::now() >= retiring.expires_at;
            if !done {
                done = true;
                for mark in &retiring.rollouts {
                    match deployments.get_opt(&mark.name).await {
                        Ok(Some(d)) if !rollout::rolled_out(&d, mark.generation) => done = false,
                        Ok(_) => {}
                        Err(_) => done = false,
                    }
                }
            }
            if done && revoke(obj, ctx, &retiring.id).await {
                changed = true;
                continue;
            }
            pending += 1;
            next = next.min(Duration::from_secs(2));
            keep.push(retiring);
        }
        record.retiring = keep;
        if changed {
            stored = Some(save_record(secrets, obj, &record, stored).await?);
        }
    }
    let _ = stored;

    let current = record.current.as_ref().expect("a current lease after issuing");
    let lease = schedule::capped(current.lease(), current.token_expires_at);
    if let Some(wake) = token_wake {
        next = next.min(wake.max(Duration::from_secs(1)));
    }
    let wait = match schedule::plan(&lease, v.renew_before, Timestamp::now()) {
        Step::Wait { at } => schedule::until(Timestamp::now(), at),
        _ => Duration::from_secs(1),
    };
    Ok(Synced {
        wrote,
        hmac: current.hmac.clone(),
        version: None,
        lease: Some(lease),
        next: next.min(wait.max(Duration::from_secs(1))),
        pending_rollouts: pending,
    })
}

/// Revokes one lease; whether it is gone (revoked now, or unknown to the engine).
async fn revoke(obj: &SecretSync, ctx: &SyncContext, lease_id: &str) -> bool {
    let token = match ctx.token(obj).await {
        Ok(token) => token,
        Err(failure) => {
            count(&sync_metrics().revocations, "failed");
            tracing::warn!(reason = failure.reason, message = %failure.message, "Cannot log in to revoke a lease");
            return false;
        }
    };
    match ctx.engine.revoke(&token, lease_id).await {
        Ok(()) | Err(engine::Error::NotFound { .. }) => {
            count(&sync_metrics().revocations, "revoked");
            ctx.publish(
                obj,
                EventType::Normal,
                "LeaseRevoked",
                "Revoke",
                "Revoked a replaced lease".to_owned(),
            )
            .await;
            true
        }
        Err(error) => {
            count(&sync_metrics().revocations, "failed");
            ctx.publish(
                obj,
                EventType::Warning,
                "RevokeFailed",
                "Revoke",
                format!("Revoking a lease failed; retrying: {error}"),
            )
            .await;
            false
        }
    }
}

/// The finalizer's work: revoke every lease, then delete the target (or, with
/// deletionPolicy Retain, release it from the SecretSync so garbage collection leaves it).
async fn cleanup(obj: &SecretSync, ctx: &SyncContext) -> Result<(), Error> {
    let ns = obj.namespace().unwrap_or_default();
    let secrets = Api::<Secret>::namespaced(ctx.base.client.clone(), &ns);
    let (mut record, mut stored) = read_record(&secrets, obj)
        .await
        .map_err(|f| Error::Cleanup(f.message))?;
    stored = finish_orphan(&secrets, obj, ctx, &mut record, stored)
        .await
        .map_err(|f| Error::Cleanup(f.message))?;
    let ids = record.lease_ids();
    if !ids.is_empty() {
        match ctx.token(obj).await {
            Ok(_) => {
                let mut left = vec![];
                for id in &ids {
                    if !revoke(obj, ctx, id).await {
                        left.push(id.clone());
                    }
                }
                if !left.is_empty() {
                    // Keep what is left on record and retry with backoff (decision 5:
                    // never drop a lease that could not be revoked).
                    record.current = record
                        .current
                        .filter(|c| c.id.as_ref().is_some_and(|id| left.contains(id)));
                    record.retiring.retain(|r| left.contains(&r.id));
                    if let Ok(s) = save_record(&secrets, obj, &record, stored.take()).await {
                        stored = Some(s);
                    }
                    let _ = stored;
                    return Err(Error::Cleanup(format!(
                        "{} lease(s) could not be revoked yet",
                        left.len()
                    )));
                }
            }
            // The ServiceAccount is gone (its namespace is being deleted, say): nothing
            // can log in as it any more. The engine ends the leases at their TTL.
            Err(failure)
                if failure.reason == reasons::SERVICE_ACCOUNT_NOT_FOUND
                    || failure.reason == reasons::LOGIN_DENIED =>
            {
                count(&sync_metrics().revocations, "abandoned");
                ctx.publish(
                    obj,
                    EventType::Warning,
                    "LeasesLeftToExpire",
                    "Revoke",
                    format!(
                        "{} lease(s) cannot be revoked ({}); the engine ends them at their TTL",
                        ids.len(),
                        failure.message
                    ),
                )
                .await;
            }
            Err(failure) => return Err(Error::Cleanup(failure.message)),
        }
    }
    let target_name = &obj.spec.target.name;
    let target = secrets
        .get_opt(target_name)
        .await
        .map_err(|e| Error::Cleanup(format!("reading Secret {target_name}: {e}")))?;
    if let Some(target) = target.filter(|t| owned_by(t, obj)) {
        match obj.spec.target.deletion_policy {
            DeletionPolicy::Delete => {
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: target.uid(),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                match secrets.delete(target_name, &params).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(Error::Cleanup(format!("deleting Secret {target_name}: {e}"))),
                }
                ctx.publish(
                    obj,
                    EventType::Normal,
                    "Deleted",
                    "Cleanup",
                    format!("Deleted Secret {target_name}"),
                )
                .await;
            }
            DeletionPolicy::Retain => {
                let mut released = target.clone();
                let uid = obj.uid();
                if let Some(refs) = released.metadata.owner_references.as_mut() {
                    refs.retain(|r| Some(&r.uid) != uid.as_ref());
                }
                if let Some(labels) = released.metadata.labels.as_mut() {
                    labels.remove(LABEL);
                }
                secrets
                    .replace(target_name, &PostParams::default(), &released)
                    .await
                    .map_err(|e| Error::Cleanup(format!("releasing Secret {target_name}: {e}")))?;
                ctx.publish(
                    obj,
                    EventType::Normal,
                    "Retained",
                    "Cleanup",
                    format!("Kept Secret {target_name} (deletionPolicy Retain)"),
                )
                .await;
            }
        }
    }
    let record_name = leases::secret_name(&obj.name_any());
    match secrets.delete(&record_name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(Error::Cleanup(format!("deleting Secret {record_name}: {e}"))),
    }
    Ok(())
}

/// Aborts a spawned task when dropped, so that it ends with the future that owns it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(value: serde_json::Value) -> SecretSyncSpec {
        serde_json::from_value(value).unwrap()
    }

    fn obj() -> SecretSync {
        let mut obj = SecretSync::new(
            "db",
            spec(serde_json::json!({
                "source": {"database": {"role": "app"}},
                "auth": {"role": "app", "serviceAccountName": "app"},
                "target": {"name": "db-creds", "type": "kubernetes.io/basic-auth"},
            })),
        );
        obj.metadata.namespace = Some("team".into());
        obj.metadata.uid = Some("uid-1".into());
        obj
    }

    #[test]
    fn validation_reports_what_the_schema_cannot() {
        let ok = validate(&obj().spec).unwrap();
        assert_eq!(ok.kind, SourceKind::Database);
        assert_eq!(ok.refresh, DEFAULT_REFRESH);
        let mut bad = obj().spec;
        bad.target.template = Some(BTreeMap::from([("url".into(), "{{ user".into())]));
        assert!(validate(&bad).unwrap_err().contains("not closed"));
        let mut bad = obj().spec;
        bad.source.kv = Some(capstan_crds::KvSource {
            mount: "secret".into(),
            path: "x".into(),
            version: None,
        });
        assert!(validate(&bad).unwrap_err().contains("exactly one"));
        let mut bad = obj().spec;
        bad.renew_before = Some("150%".into());
        assert!(validate(&bad).is_err());
        let mut bad = obj().spec;
        bad.target.template = Some(BTreeMap::from([("../x".into(), "{{ username }}".into())]));
        assert!(validate(&bad).unwrap_err().contains("not a valid Secret key"));
    }

    #[test]
    fn a_pki_source_into_a_tls_secret_gets_the_tls_layout() {
        let spec = spec(serde_json::json!({
            "source": {"pki": {"role": "web", "commonName": "web.team.svc"}},
            "auth": {"role": "web", "serviceAccountName": "web"},
            "target": {"name": "web-tls", "type": "kubernetes.io/tls"},
        }));
        let v = validate(&spec).unwrap();
        let fields: template::Fields = [("certificate", "C"), ("private_key", "K"), ("issuing_ca", "I")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let data = template::render(v.templates.as_ref(), &fields).unwrap();
        assert_eq!(data.keys().collect::<Vec<_>>(), ["ca.crt", "tls.crt", "tls.key"]);
    }

    #[test]
    fn the_target_is_owned_labelled_and_typed() {
        let obj = obj();
        let data = Data::from([("username".to_owned(), b"u".to_vec())]);
        let secret = desired_target(&obj, &data);
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/basic-auth"));
        assert_eq!(secret.metadata.namespace.as_deref(), Some("team"));
        assert_eq!(secret.metadata.labels.as_ref().unwrap()[LABEL], "uid-1");
        assert!(owned_by(&secret, &obj));
        let mut stranger = secret.clone();
        stranger.metadata.owner_references = None;
        assert!(!owned_by(&stranger, &obj));
    }

    #[test]
    fn a_refused_revoke_self_counts_as_gone_only_for_a_token_that_had_the_grant() {
        let denied = || {
            Err(engine::Error::Denied {
                path: "auth/token/revoke-self".into(),
                message: "permission denied".into(),
            })
        };
        assert_eq!(orphan_outcome(Ok(()), true).unwrap(), Orphan::Revoked);
        assert_eq!(orphan_outcome(Ok(()), false).unwrap(), Orphan::Revoked);
        // Had the grant: refused because the engine no longer knows it.
        assert_eq!(orphan_outcome(denied(), true).unwrap(), Orphan::Gone);
        // Never had it (or not known, an older record): possibly live, reported as such.
        assert_eq!(orphan_outcome(denied(), false).unwrap(), Orphan::NotRevoked);
        // An engine that could not answer: retried, the intent kept.
        let down = orphan_outcome(
            Err(engine::Error::Sealed {
                path: "auth/token/revoke-self".into(),
            }),
            true,
        );
        assert!(matches!(down, Err(engine::Error::Sealed { .. })));
        let issuing = Issuing {
            sealed_token: String::new(),
            since: Timestamp::from_second(1_800_000_000).unwrap(),
            revocable: false,
            token_expires_at: Some(Timestamp::from_second(1_800_003_600).unwrap()),
            revoking: true,
        };
        assert_eq!(until(&issuing), " at 2027-01-15T09:00:00Z");
    }

    #[test]
    fn the_fingerprint_follows_source_and_auth_only() {
        let a = obj();
        let mut b = obj();
        b.spec.rollout_restart.push(capstan_crds::RolloutTarget {
            kind: capstan_crds::RolloutKind::Deployment,
            name: "web".into(),
        });
        assert_eq!(fingerprint(&a.spec), fingerprint(&b.spec));
        b.spec.auth.role = "other".into();
        assert_ne!(fingerprint(&a.spec), fingerprint(&b.spec));
    }
}
