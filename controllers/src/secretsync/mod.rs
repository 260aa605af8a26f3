//! The SecretSync reconciler: keeps a Secret equal to what the secrets engine holds for
//! a KV entry, a database role or a PKI role, read as the SecretSync's own
//! ServiceAccount, through the engine's Vault-compatible HTTPS API only.
//!
//! Per reconcile: validate (`validate`, pure), log in as the ServiceAccount (`tokens`: a
//! 10-minute token from the TokenRequest API, audience `capstan_contract::ENGINE_AUDIENCE`),
//! then either `kv` (read, render, write the target if its HMAC differs) or `leased`
//! (a pure plan of issue, renew, rotate or revoke from the observed state, then its
//! I/O), roll Deployments (`rollout`), and revoke a replaced lease only after they rolled
//! out (S6). The finalizer (`cleanup`) revokes the leases and deletes (or releases) the
//! target when the SecretSync is deleted, also when that happened while the controller
//! was down (K3).
//!
//! Issuing is write-ahead (K1, K4, `leased::intent`): the intent, with the sealed token
//! of a login made for this one issue, is recorded before the engine is asked, and
//! replaced by the lease id in one conditional write. A controller that stops in between
//! leaves the intent; the next reconcile (this replica's or its successor's) claims it (a
//! conditional write, so the stopped issuer can no longer record what it obtained),
//! revokes that token, and with it the credential nobody recorded, and clears it, before
//! it issues anything.
//!
//! Secret values live in memory only as long as a reconcile needs them, plus (dynamic
//! sources) the last rendered data per SecretSync, so a hand-edited target can be
//! restored without issuing a new credential. They never reach logs, Events, status,
//! metrics or error messages.

mod cleanup;
pub(crate) mod engine;
mod fault;
mod hmac;
mod kv;
mod leased;
mod leases;
mod outcome;
mod rollout;
mod schedule;
mod target;
mod template;
mod tokens;
mod validate;

use crate::{
    context::Context,
    leader,
    metrics::SecretSyncMetrics,
    reconciler::{self, AbortOnDrop, Class, Reconcile, ReconcileError},
    status::{self, HasStatus, Outcome, Writer},
};
use capstan_crds::{
    SecretSync, SecretSyncStatus, SourceKind,
    conditions::{self, ConditionStatus, READY},
};
use engine::Engine;
use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{ConfigMap, Secret},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, Resource, ResourceExt,
    runtime::{Controller, controller::Action, events::EventType, finalizer, watcher},
};
use outcome::{Failure, Synced, Write};
use parking_lot::Mutex;
use std::{collections::HashMap, future::Future, sync::Arc, time::Duration};
use template::Data;

pub use fault::warn_if_set as warn_if_test_fault_set;

const CONTROLLER: &str = "secretsync";
pub const FINALIZER: &str = "secrets.capstan.dev/revoke";
/// On every Secret the controller writes: which SecretSync it belongs to.
pub const LABEL: &str = "capstan.dev/secretsync-uid";

/// Every status field and the Ready condition, under the reconciler's field manager.
const STATUS: Writer = Writer {
    manager: "capstan-controller-secretsync",
    controller: CONTROLLER,
    fields: &[
        "observedGeneration",
        "lastSyncTime",
        "sourceVersion",
        "leaseExpiresAt",
        "leaseRenewable",
        "secretHmac",
    ],
    conditions: &[READY],
};

/// The reasons of the Ready condition and of the Events this reconciler publishes.
pub mod reasons {
    // Ready=False.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const TARGET_NOT_OWNED: &str = "TargetNotOwned";
    pub const SERVICE_ACCOUNT_NOT_FOUND: &str = "ServiceAccountNotFound";
    pub const LOGIN_DENIED: &str = "LoginDenied";
    pub const TARGET_WRITE_FAILED: &str = "TargetWriteFailed";
    pub const KUBERNETES_ERROR: &str = "KubernetesError";
    // Ready=True, and the Event of a first write or a change.
    pub const SYNCED: &str = "Synced";
    // Events.
    pub const RESTORED: &str = "Restored";
    pub const ROTATED: &str = "Rotated";
    pub const ROLLOUT_RESTARTED: &str = "RolloutRestarted";
    pub const ROLLOUT_TARGET_MISSING: &str = "RolloutTargetMissing";
    pub const ROLLOUT_RESTART_FAILED: &str = "RolloutRestartFailed";
    pub const LEASE_RENEWED: &str = "LeaseRenewed";
    pub const LEASE_REVOKED: &str = "LeaseRevoked";
    pub const REVOKE_FAILED: &str = "RevokeFailed";
    pub const ORPHAN_NOT_REVOKED: &str = "OrphanNotRevoked";
    pub const LEASES_LEFT_TO_EXPIRE: &str = "LeasesLeftToExpire";
    pub const DELETED: &str = "Deleted";
    pub const RETAINED: &str = "Retained";
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The sync failed; Ready=False says why (reported before this is returned).
    #[error("not in sync ({}): {}", .0.reason, .0.message)]
    Sync(Failure),
    #[error("writing the finalizer")]
    Finalizer(#[source] kube::Error),
    #[error("cleaning up: {0}")]
    Cleanup(String),
    #[error(transparent)]
    Status(#[from] status::Error),
    #[error(transparent)]
    Leader(#[from] leader::Error),
}

impl ReconcileError for Error {
    fn metric_label(&self) -> &'static str {
        match self {
            Self::Sync(_) => "sync",
            Self::Finalizer(..) => "finalizer",
            Self::Cleanup(_) => "cleanup",
            Self::Status(status::Error::Leader(_)) | Self::Leader(_) => "not_leader",
            Self::Status(_) => "status",
        }
    }

    fn class(&self) -> Class {
        match self {
            Self::Status(status::Error::Leader(_)) | Self::Leader(_) => Class::NotLeader,
            // Only a change of the spec, the ServiceAccount or the engine's
            // configuration helps.
            Self::Sync(failure) if !failure.transient => Class::Spec,
            _ => Class::Transient,
        }
    }

    fn finalizer(error: finalizer::Error<Self>) -> Self {
        match error {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
            finalizer::Error::AddFinalizer(e) | finalizer::Error::RemoveFinalizer(e) => Self::Finalizer(e),
            other => Self::Cleanup(other.to_string()),
        }
    }
}

impl HasStatus for SecretSync {
    type Status = SecretSyncStatus;

    fn status(&self) -> Option<&SecretSyncStatus> {
        self.status.as_ref()
    }
}

/// What the SecretSync reconciler keeps between reconciles, for one leadership term.
pub struct State {
    engine: Engine,
    hmac: hmac::Key,
    tokens: tokens::Cache,
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

impl State {
    /// A term's state: nothing cached yet.
    fn new(engine: Engine, hmac: hmac::Key) -> Self {
        Self {
            engine,
            hmac,
            tokens: tokens::Cache::default(),
            delivered: Mutex::default(),
            failures: Mutex::default(),
            issuers: Mutex::default(),
        }
    }
}

type Ctx = Context<State>;

/// Runs the reconciler until `shutdown` resolves.
pub async fn run(base: &Context, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let shutdown = futures::FutureExt::shared(shutdown);
    let engine = match Engine::new(&base.config.engine_url, &base.config.roots_configmap) {
        Ok(engine) => engine,
        Err(error) => {
            tracing::error!(%error, "SecretSync reconciler not started");
            return;
        }
    };
    let own = Api::<Secret>::namespaced(base.client.clone(), &base.config.namespace);
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
        base.client.clone(),
        &base.config.namespace,
    )));
    let _roots = AbortOnDrop(roots);
    let ctx = Arc::new(base.with(State::new(engine, key)));
    let api = Api::<SecretSync>::all(base.client.clone());
    // Only the Secrets this controller wrote are watched (and cached): a hand edit of a
    // target, or its deletion, reconciles its SecretSync at once.
    let owned = Api::<Secret>::all(base.client.clone());
    Controller::new(api, watcher::Config::default().any_semantic())
        .owns(owned, watcher::Config::default().labels(LABEL))
        .graceful_shutdown_on(shutdown)
        .run(reconciler::reconcile, reconciler::error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

impl Reconcile for SecretSync {
    type State = State;
    type Error = Error;
    const CONTROLLER: &'static str = CONTROLLER;
    const FINALIZER: Option<&'static str> = Some(FINALIZER);

    /// Syncs the target, then reports the outcome in status (and a failure in an Event).
    async fn reconcile(&self, ctx: &Ctx) -> Result<Action, Error> {
        let result = match validate::validate(&self.spec) {
            Ok(validated) => sync(self, ctx, &validated).await,
            Err(message) => Err(Failure::permanent(reasons::INVALID_SPEC, message)),
        };
        match result {
            Ok(synced) => {
                ctx.state.failures.lock().remove(&self.uid().unwrap_or_default());
                report_synced(self, ctx, &synced).await?;
                Ok(Action::requeue(synced.next.min(ctx.config.resync)))
            }
            Err(failure) => {
                report_failure(self, ctx, &failure).await?;
                Err(Error::Sync(failure))
            }
        }
    }

    async fn cleanup(&self, ctx: &Ctx) -> Result<Action, Error> {
        cleanup::run(self, ctx).await?;
        Ok(Action::await_change())
    }

    fn forget(&self, ctx: &Ctx) {
        let uid = self.uid().unwrap_or_default();
        ctx.state.failures.lock().remove(&uid);
        ctx.state.tokens.forget(&uid);
        ctx.state.delivered.lock().remove(&uid);
        ctx.state.issuers.lock().remove(&uid);
    }

    /// Doubling from a second up to five minutes per consecutive failure; a spec error
    /// waits at least 30 s.
    fn retry_after(&self, class: Class, ctx: &Ctx) -> Duration {
        let backoff = {
            let mut failures = ctx.state.failures.lock();
            let n = failures.entry(self.uid().unwrap_or_default()).or_insert(0);
            *n = n.saturating_add(1);
            Duration::from_secs(1u64 << (*n - 1).min(8)).min(Duration::from_secs(300))
        };
        match class {
            Class::Spec => backoff.max(Duration::from_secs(30)),
            _ => backoff,
        }
    }
}

impl Ctx {
    fn metrics(&self) -> &SecretSyncMetrics {
        &self.metrics.secretsync
    }

    /// Counts a revocation's `result` (`lease_revocations_total`) and tells it in an
    /// Event: Normal when revoked, a Warning otherwise.
    async fn revocation(&self, obj: &SecretSync, result: &'static str, reason: &str, note: String) {
        SecretSyncMetrics::count(&self.metrics().revocations, result);
        let type_ = if result == "revoked" {
            EventType::Normal
        } else {
            EventType::Warning
        };
        self.event(obj, type_, reason, "Revoke", note).await;
    }

    /// Publishes an Event on `obj`.
    async fn event(&self, obj: &SecretSync, type_: EventType, reason: &str, action: &str, note: String) {
        self.publish(&obj.object_ref(&()), type_, reason, action, note)
            .await;
    }
}

async fn sync(obj: &SecretSync, ctx: &Ctx, v: &validate::Validated) -> Result<Synced, Failure> {
    let ns = obj.namespace().unwrap_or_default();
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &ns);
    let target_name = &obj.spec.target.name;
    let target = secrets
        .get_opt(target_name)
        .await
        .map_err(|e| Failure::kube("reading the target Secret", e))?;
    if let Some(existing) = &target
        && !target::owned_by(existing, obj)
    {
        return Err(Failure::permanent(
            reasons::TARGET_NOT_OWNED,
            format!(
                "Secret {ns}/{target_name} exists and is not owned by this SecretSync: it is never \
                     overwritten; delete it or choose another target.name"
            ),
        ));
    }
    let job = Job {
        obj,
        ctx,
        v,
        secrets: &secrets,
        target,
    };
    match v.kind {
        SourceKind::Kv => kv::sync(job).await,
        SourceKind::Database | SourceKind::Pki => leased::sync(job).await,
    }
}

/// One sync's inputs: the object, its validated spec, and its namespace's Secrets with
/// the target as found (None: it does not exist).
struct Job<'a> {
    obj: &'a SecretSync,
    ctx: &'a Ctx,
    v: &'a validate::Validated,
    secrets: &'a Api<Secret>,
    target: Option<Secret>,
}

impl Job<'_> {
    /// The HMAC of the target's data (None: no target), and whether its type is the
    /// one the spec asks for.
    fn in_place(&self) -> (Option<String>, bool) {
        let in_place = self.target.as_ref().map(|t| self.ctx.state.hmac.digest_secret(t));
        let type_ok = self
            .target
            .as_ref()
            .is_none_or(|t| t.type_.as_deref().unwrap_or("Opaque") == self.obj.spec.target.type_.as_str());
        (in_place, type_ok)
    }
}

/// Ready=True with what the target holds.
async fn report_synced(obj: &SecretSync, ctx: &Ctx, synced: &Synced) -> Result<(), Error> {
    SecretSyncMetrics::count(
        &ctx.metrics().syncs,
        synced.wrote.map_or("unchanged", Write::as_str),
    );
    let target = &obj.spec.target.name;
    let message = match (synced.version, &synced.lease) {
        (Some(v), _) => format!("Secret {target} holds version {v}"),
        (None, Some(lease)) => format!(
            "Secret {target} holds a credential valid until {}{}",
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
        (None, None) => format!("Secret {target} is in sync"),
    };
    let generation = obj.metadata.generation;
    let condition = conditions::new(READY, ConditionStatus::True, reasons::SYNCED, message, generation);
    let now = Time(Timestamp::now());
    let change = |status: &mut SecretSyncStatus| {
        status.observed_generation = generation;
        status.secret_hmac = Some(synced.hmac.clone());
        status.source_version = synced.version;
        status.lease_expires_at = synced.lease.as_ref().map(|l| Time(l.expires_at()));
        status.lease_renewable = synced.lease.as_ref().map(schedule::Lease::extendable);
        if synced.wrote.is_some() || status.last_sync_time.is_none() {
            status.last_sync_time = Some(now.clone());
        }
        conditions::upsert(&mut status.conditions, condition.clone());
    };
    // A poll that changed nothing writes nothing, and does not even read the status.
    STATUS.update_of_unless_held(obj, ctx, change).await?;
    Ok(())
}

/// Ready=False with the failure, and one Warning per distinct failure: a failure that
/// persists is not repeated on every retry (the condition holds it).
async fn report_failure(obj: &SecretSync, ctx: &Ctx, failure: &Failure) -> Result<(), Error> {
    SecretSyncMetrics::count(&ctx.metrics().syncs, failure.reason);
    let generation = obj.metadata.generation;
    let condition = conditions::new(
        READY,
        ConditionStatus::False,
        failure.reason,
        failure.message.clone(),
        generation,
    );
    let outcome = STATUS
        .update_of(obj, ctx, |status| {
            status.observed_generation = generation;
            conditions::upsert(&mut status.conditions, condition.clone());
        })
        .await?;
    let repeated = match &outcome {
        Outcome::Unchanged => true,
        Outcome::Written { before, .. } => conditions::get(&before.conditions, READY)
            .is_some_and(|c| c.reason == failure.reason && c.message == failure.message),
    };
    if !repeated {
        ctx.event(
            obj,
            EventType::Warning,
            failure.reason,
            "Sync",
            failure.message.clone(),
        )
        .await;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
