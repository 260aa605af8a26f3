//! The credentials reconciler (RELIABILITY N2): a pod's engine logins and leases are
//! revoked when the pod stops, even when nothing in the pod got to revoke them.
//!
//! The secrets agent revokes its own token (and with it its leases) when its pod ends
//! gracefully. A pod evicted, OOM-killed, force-deleted or whose node is lost never runs
//! that. So the webhook gives every pod it injects the agent into the finalizer
//! [`REVOKE_FINALIZER`] and the label [`AGENT_LABEL`]; this reconciler watches only
//! pods with that label and, once a pod has stopped (phase Succeeded or Failed, Evicted
//! included, or its deletion is due: a force deletion, or the end of its grace period),
//! asks the engine to revoke every token issued to the pod's UID, with their children
//! and leases (`auth/kubernetes/revoke-pod`, as the controller's own login). Only once
//! the engine answered success does the finalizer go, by a patch that tests the list it
//! read. Until then the pod stays (Terminating, if deleted) and the reconciler retries
//! with backoff, a Warning Event on the pod and `reconcile_failures{controller=
//! "credentials"}` each time: a pod waits for its credentials to be revoked. An operator
//! who accepts the risk removes the finalizer by hand (docs/scenarios.md, N2).

mod login;

use crate::{
    context::Context,
    reconciler::{AbortOnDrop, Class},
};
use capstan_contract::annotations::agent::{AGENT_LABEL, AGENT_LABEL_VALUE, REVOKE_FINALIZER};
use capstan_engine_client::PodRevoked;
use futures::{StreamExt as _, future::BoxFuture};
use k8s_openapi::{
    api::core::v1::{ConfigMap, Pod},
    jiff::Timestamp,
};
use kube::{
    Api, Resource as _, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::{Controller, controller::Action, events::EventType, watcher},
};
use parking_lot::Mutex;
use serde_json::json;
use std::{collections::HashMap, future::Future, sync::Arc, time::Duration};

const CONTROLLER: &str = "credentials";

/// Event reasons.
pub mod reasons {
    pub const REVOKED: &str = "CredentialsRevoked";
    pub const REVOKE_FAILED: &str = "CredentialsRevocationFailed";
}

/// The longest wait between two attempts for one pod.
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Revokes a pod's credentials in the engine (the engine itself, or a test's fake).
pub trait Revoke: Send + Sync {
    fn revoke_pod<'a>(&'a self, pod_uid: &'a str) -> BoxFuture<'a, Result<PodRevoked, login::Error>>;
}

pub struct State {
    engine: Arc<dyn Revoke>,
    /// Failed attempts by pod UID, for the backoff (forgotten on success).
    attempts: Mutex<HashMap<String, u32>>,
}

impl State {
    fn new(engine: Arc<dyn Revoke>) -> Self {
        Self {
            engine,
            attempts: Mutex::default(),
        }
    }
}

type Ctx = Context<State>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    NotLeader(#[from] crate::leader::Error),
    #[error(transparent)]
    Engine(#[from] login::Error),
    #[error("removing the finalizer: {0}")]
    Finalizer(#[source] kube::Error),
}

impl Error {
    fn metric_label(&self) -> &'static str {
        match self {
            Self::NotLeader(_) => "not_leader",
            Self::Engine(error) => error.metric_label(),
            Self::Finalizer(_) => "kubernetes",
        }
    }

    fn class(&self) -> Class {
        match self {
            Self::NotLeader(_) => Class::NotLeader,
            Self::Engine(_) | Self::Finalizer(_) => Class::Transient,
        }
    }
}

pub async fn run(base: &Context, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let engine = match login::Engine::new(&base.config.engine_url, base.client.clone()) {
        Ok(engine) => Arc::new(engine),
        Err(error) => {
            tracing::error!(%error, "Credentials reconciler not started");
            return;
        }
    };
    let roots = {
        let engine = engine.clone();
        let api = Api::<ConfigMap>::namespaced(base.client.clone(), &base.config.namespace);
        let configmap = base.config.roots_configmap.clone();
        tokio::spawn(async move {
            crate::secretsync::engine::follow_roots(engine.roots(), &configmap, api).await;
        })
    };
    let _roots = AbortOnDrop(roots);
    let ctx = Arc::new(base.with(State::new(engine)));
    // Only the pods the webhook gave the agent (and so the finalizer) are watched.
    let pods = Api::<Pod>::all(base.client.clone());
    let selector = format!("{AGENT_LABEL}={AGENT_LABEL_VALUE}");
    Controller::new(pods, watcher::Config::default().labels(&selector))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// Whether the pod has stopped, as of `now`: a terminal phase (a kubelet eviction leaves
/// the pod Failed, reason Evicted), or a deletion that is due. A deletion's timestamp is
/// when the grace period ends: until then the agent, a native sidecar that stops last,
/// is revoking on its own and the app may still use its credentials. A force deletion
/// (and the pod garbage collector's, for a lost node) is due at once. Otherwise, when to
/// look again (None: a watch event will tell).
fn stopped(pod: &Pod, now: Timestamp) -> Result<(), Option<Duration>> {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return Ok(());
    }
    match pod.metadata.deletion_timestamp.as_ref() {
        Some(due) if due.0 <= now => Ok(()),
        Some(due) => Err(Some(
            Duration::try_from(due.0.duration_since(now)).unwrap_or_default() + Duration::from_secs(1),
        )),
        None => Err(None),
    }
}

/// The conditional patch that removes the finalizer from the list as read: if anyone
/// changed the list since, the test fails and the next attempt reads it again, so
/// another writer's finalizer is never dropped.
fn without_finalizer(finalizers: &[String]) -> serde_json::Value {
    let rest: Vec<&String> = finalizers.iter().filter(|f| *f != REVOKE_FINALIZER).collect();
    json!([
        {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
        {"op": "replace", "path": "/metadata/finalizers", "value": rest},
    ])
}

#[tracing::instrument(skip(pod, ctx), fields(controller = CONTROLLER, ns = pod.namespace().unwrap_or_default(), name = pod.name_any()))]
async fn reconcile(pod: Arc<Pod>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let _timer = ctx.metrics.start(CONTROLLER);
    ctx.leadership.ensure()?;
    let uid = pod.uid().unwrap_or_default();
    if !pod.finalizers().iter().any(|f| f == REVOKE_FINALIZER) {
        ctx.state.attempts.lock().remove(&uid);
        return Ok(Action::await_change());
    }
    match stopped(&pod, Timestamp::now()) {
        Ok(()) => {}
        Err(Some(due)) => return Ok(Action::requeue(due)),
        Err(None) => return Ok(Action::await_change()),
    }
    let reference = pod.object_ref(&());
    let revoked = match ctx.state.engine.revoke_pod(&uid).await {
        Ok(revoked) => revoked,
        Err(error) => {
            let attempts = {
                let mut attempts = ctx.state.attempts.lock();
                let n = attempts.entry(uid.clone()).or_default();
                *n += 1;
                *n
            };
            ctx.publish(
                &reference,
                EventType::Warning,
                reasons::REVOKE_FAILED,
                "RevokeCredentials",
                format!(
                    "{error} (attempt {attempts}); the pod keeps finalizer {REVOKE_FINALIZER} until the engine has revoked its logins and leases"
                ),
            )
            .await;
            return Err(error.into());
        }
    };
    // The fence again: a deposed leader must not let a pod go on a revocation another
    // term may be retrying differently (harmless, but the rule is one writer).
    ctx.leadership.ensure()?;
    let api = Api::<Pod>::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    api.patch(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::<Pod>::Json(
            serde_json::from_value(without_finalizer(pod.finalizers())).expect("a JSON patch"),
        ),
    )
    .await
    .map_err(Error::Finalizer)?;
    ctx.state.attempts.lock().remove(&uid);
    tracing::info!(
        tokens = revoked.tokens,
        leases = revoked.leases,
        "Revoked a stopped pod's credentials"
    );
    ctx.publish(
        &reference,
        EventType::Normal,
        reasons::REVOKED,
        "RevokeCredentials",
        format!(
            "The engine revoked {} token(s) and {} lease(s) issued to this pod",
            revoked.tokens, revoked.leases
        ),
    )
    .await;
    Ok(Action::await_change())
}

fn error_policy(pod: Arc<Pod>, error: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.failed(CONTROLLER, error.metric_label());
    match error.class() {
        Class::NotLeader => Action::await_change(),
        _ => {
            tracing::warn!(error = %error, source = ?std::error::Error::source(error), pod = %pod.name_any(), "Revoking a stopped pod's credentials failed; retrying");
            let attempts = ctx
                .state
                .attempts
                .lock()
                .get(&pod.uid().unwrap_or_default())
                .copied()
                .unwrap_or(1);
            Action::requeue(backoff(attempts))
        }
    }
}

/// 1 s, 2 s, 4 s, ... up to [`BACKOFF_MAX`].
fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.saturating_sub(1).min(16)).min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests;
