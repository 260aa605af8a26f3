//! The one shape every reconciler has (kube-rs's controller-rs): a `Context` handed to
//! `reconcile` and `error_policy`, holding the Kubernetes client, the Event recorder,
//! the process's metrics, the leadership fence every write checks, the configuration,
//! and the reconciler's own `state`, all passed explicitly (no statics).
//!
//! main builds one `Context<()>` per process; each reconciler, when a leadership term
//! starts it, derives its `Context<State>` with [`Context::with`] (SecretSync's state,
//! for instance, is its engine client and token cache, which die with the term).

use crate::{leader::Leadership, metrics::Metrics};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder},
};
use std::time::Duration;

pub struct Context<S = ()> {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub leadership: Leadership,
    pub config: Config,
    /// What this reconciler keeps between reconciles (caches, stores, its engine client).
    pub state: S,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// How often an object is reconciled again with nothing changed: the backstop that
    /// makes state converge even if a watch event was lost.
    pub resync: Duration,
    /// The namespace Capstan runs in: the leader Lease, the engine's roots ConfigMap,
    /// the SecretSync HMAC key, and the only namespace whose ServiceIntentions may
    /// govern other namespaces.
    pub namespace: String,
    /// The secrets engine's HTTPS API (Vault-compatible).
    pub engine_url: String,
    /// The ConfigMap (in `namespace`) whose `roots.pem` the engine's certificate chains
    /// to (`capstan_contract::ROOTS_CONFIGMAP` unless overridden).
    pub roots_configmap: String,
}

impl<S> Context<S> {
    /// The same client, recorder, metrics, fence and configuration, with `state`.
    pub fn with<T>(&self, state: T) -> Context<T> {
        Context {
            client: self.client.clone(),
            recorder: self.recorder.clone(),
            metrics: self.metrics.clone(),
            leadership: self.leadership.clone(),
            config: self.config.clone(),
            state,
        }
    }

    /// Publishes an Event on `reference`, unless this replica's term is over (a deposed
    /// leader says nothing). Whether it was published; a failure is logged, never fatal.
    pub async fn publish(
        &self,
        reference: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) -> bool {
        if self.leadership.ensure().is_err() {
            return false;
        }
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        match self.recorder.publish(&event, reference).await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, "Publishing an event");
                false
            }
        }
    }
}
