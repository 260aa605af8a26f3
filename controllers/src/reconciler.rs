//! The one reconciler shape (kube-rs's controller-rs), which every Capstan kind's
//! reconciler implements and the coming ones copy:
//!
//! - the logic is `impl Reconcile for K { reconcile, cleanup }`, with everything it
//!   needs in its `Context<State>`;
//! - [`reconcile`] is what `Controller::run` calls: it times the run, checks the
//!   leadership fence, and, for a kind with a finalizer, lets `kube::runtime::finalizer`
//!   add it before the first `reconcile` and remove it after a successful `cleanup`;
//! - [`error_policy`] decides when to look again from the error's [`Class`];
//! - Event reasons are constants in each reconciler's `reasons` module;
//! - status is written by server-side apply under the reconciler's field manager
//!   (`status::Writer`).

use crate::context::Context;
use k8s_openapi::NamespaceResourceScope;
use kube::{
    Api, Resource, ResourceExt,
    runtime::{
        controller::Action,
        finalizer::{self, Event},
    },
};
use serde::{Serialize, de::DeserializeOwned};
use std::{fmt::Debug, future::Future, sync::Arc, time::Duration};

/// What kind of failure a reconcile ended in: `error_policy` decides from it when to
/// look again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// This replica's term is over; its reconcilers are being stopped.
    NotLeader,
    /// The API server or the engine could not answer now: retry soon.
    Transient,
    /// Only a change of the object (or of what it names) helps: retry slowly.
    Spec,
}

/// A reconciler's error: its metric label and class.
pub trait ReconcileError: std::error::Error + From<crate::leader::Error> + Send + 'static {
    fn metric_label(&self) -> &'static str;
    fn class(&self) -> Class;
    /// Adding or removing the finalizer, or the reconcile inside it, failed.
    fn finalizer(error: finalizer::Error<Self>) -> Self;
}

pub trait Reconcile:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Serialize
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
    type State: Send + Sync + 'static;
    type Error: ReconcileError;
    /// The metric label and log name.
    const CONTROLLER: &'static str;
    /// The finalizer that holds a deletion until `cleanup` succeeded; None for a kind
    /// whose reconciler writes nothing outside the object itself.
    const FINALIZER: Option<&'static str>;

    /// Makes the world match the object (idempotent).
    fn reconcile(
        &self,
        ctx: &Context<Self::State>,
    ) -> impl Future<Output = Result<Action, Self::Error>> + Send;

    /// Undoes what `reconcile` did outside the object, before the finalizer goes.
    fn cleanup(
        &self,
        _ctx: &Context<Self::State>,
    ) -> impl Future<Output = Result<Action, Self::Error>> + Send {
        async { Ok(Action::await_change()) }
    }

    /// An object whose deletion needs nothing more (already past its finalizer): what
    /// the reconciler keeps for it can go.
    fn forget(&self, _ctx: &Context<Self::State>) {}

    /// How long to wait after a failure of `class`.
    fn retry_after(&self, class: Class, ctx: &Context<Self::State>) -> Duration;
}

/// What `Controller::run` calls for every object.
#[tracing::instrument(skip(obj, ctx), fields(controller = K::CONTROLLER, ns = obj.namespace().unwrap_or_default(), name = obj.name_any()))]
pub async fn reconcile<K: Reconcile>(obj: Arc<K>, ctx: Arc<Context<K::State>>) -> Result<Action, K::Error> {
    let _timer = ctx.metrics.start(K::CONTROLLER);
    ctx.leadership.ensure()?;
    let deleting = obj.meta().deletion_timestamp.is_some();
    let Some(name) = K::FINALIZER else {
        if deleting {
            obj.forget(&ctx);
            return Ok(Action::await_change());
        }
        return obj.reconcile(&ctx).await;
    };
    if deleting && !obj.finalizers().iter().any(|f| f == name) {
        obj.forget(&ctx);
        return Ok(Action::await_change());
    }
    // Nothing is done before the finalizer is in place: nothing can outlive an object
    // deleted in between. Adding it is a conditional JSON patch (it tests the list it
    // read), as is removing it, so another writer's finalizers are never dropped.
    let api = Api::<K>::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    finalizer::finalizer(&api, name, obj, |event| async {
        match event {
            Event::Apply(obj) => obj.reconcile(&ctx).await,
            Event::Cleanup(obj) => {
                let action = obj.cleanup(&ctx).await?;
                obj.forget(&ctx);
                Ok(action)
            }
        }
    })
    .await
    .map_err(K::Error::finalizer)
}

/// What `Controller::run` calls when `reconcile` failed.
pub fn error_policy<K: Reconcile>(obj: Arc<K>, error: &K::Error, ctx: Arc<Context<K::State>>) -> Action {
    ctx.metrics.failed(K::CONTROLLER, error.metric_label());
    match error.class() {
        // The term is ending; the controller is about to be dropped.
        Class::NotLeader => Action::await_change(),
        class => {
            tracing::warn!(error = %error, source = ?std::error::Error::source(error), "Reconcile failed");
            Action::requeue(obj.retry_after(class, &ctx))
        }
    }
}

/// Aborts a spawned task when dropped, so that it ends with the future that owns it
/// (the end of a leadership term aborts the reconcilers' whole task).
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
