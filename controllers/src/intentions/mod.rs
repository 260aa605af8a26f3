//! The intentions reconciler: validates each ServiceIntentions, decides which object is
//! in force for its destination, and reports both in status and Events.
//!
//! It also reports, in status, what the validating webhook would have refused (objects
//! created while it was absent), and (`unmeshed`) finds running pods that should be
//! meshed but are not.

use crate::{
    context::Context,
    leader,
    reconciler::{self, AbortOnDrop, Class, Reconcile, ReconcileError},
    status::{self, HasStatus, Outcome, Writer},
};
use capstan_crds::{
    ServiceIntentions, ServiceIntentionsStatus,
    conditions::{self, ConditionStatus, READY},
};
use capstan_mesh::{
    in_force::{self as conflicts, Verdict},
    validate,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::{
    Api, Resource,
    api::ListParams,
    runtime::{
        Controller,
        controller::Action,
        events::EventType,
        finalizer,
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use std::{future::Future, sync::Arc, time::Duration};

mod unmeshed;

const CONTROLLER: &str = "intentions";

/// Its status fields and the Ready condition, under its own field manager (`unmeshed`
/// owns the Meshed condition under another).
const STATUS: Writer = Writer {
    manager: "capstan-controller-intentions",
    controller: CONTROLLER,
    fields: &["observedGeneration", "sources", "conflicts"],
    conditions: &[READY],
};

/// Condition reasons this reconciler sets on Ready, which are also its Events' reasons.
pub mod reasons {
    pub const ACCEPTED: &str = "Accepted";
    pub const CONFLICT: &str = "Conflict";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The object names a destination outside its own namespace: it governs nothing.
    pub const FOREIGN_DESTINATION: &str = "ForeignDestination";
}

/// How long after a failed reconcile to look again (the API server could not answer).
const RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listing ServiceIntentions")]
    List(#[source] kube::Error),
    #[error("reading the destination Service")]
    Service(#[source] kube::Error),
    #[error(transparent)]
    Status(#[from] status::Error),
    #[error(transparent)]
    Leader(#[from] leader::Error),
}

impl ReconcileError for Error {
    fn metric_label(&self) -> &'static str {
        match self {
            Self::List(_) => "list",
            Self::Service(_) => "service",
            Self::Status(status::Error::Leader(_)) | Self::Leader(_) => "not_leader",
            Self::Status(status::Error::Contended { .. }) => "status_contended",
            Self::Status(_) => "status",
        }
    }

    fn class(&self) -> Class {
        match self.metric_label() {
            "not_leader" => Class::NotLeader,
            _ => Class::Transient,
        }
    }

    fn finalizer(error: finalizer::Error<Self>) -> Self {
        // This kind has no finalizer: only the reconcile's own error reaches here.
        match error {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
            other => unreachable!("ServiceIntentions has no finalizer: {other}"),
        }
    }
}

impl HasStatus for ServiceIntentions {
    type Status = ServiceIntentionsStatus;

    fn status(&self) -> Option<&ServiceIntentionsStatus> {
        self.status.as_ref()
    }
}

/// What the intentions reconciler keeps between reconciles.
pub struct State {
    /// Every ServiceIntentions (the controller's cache): the rivals for a destination.
    store: Store<ServiceIntentions>,
    /// Capstan's namespace: only its objects may govern other namespaces (tenancy).
    control_namespace: Arc<str>,
}

impl State {
    fn new(store: Store<ServiceIntentions>, config: &crate::context::Config) -> Self {
        Self {
            store,
            control_namespace: config.namespace.as_str().into(),
        }
    }
}

/// Runs the reconciler until `shutdown` resolves (in-flight reconciles finish first).
pub async fn run(base: &Context, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let shutdown = futures::FutureExt::shared(shutdown);
    let api = Api::<ServiceIntentions>::all(base.client.clone());
    let controller = Controller::new(api.clone(), watcher::Config::default().any_semantic());
    let store = controller.store();
    let rivals_store = store.clone();
    // Capstan's own namespace is never meshed, and only its objects may govern other
    // namespaces (tenancy).
    let ctx = Arc::new(base.with(State::new(store, &base.config)));
    let unmeshed = tokio::spawn(unmeshed::run(ctx.clone(), shutdown.clone()));
    // Aborted with this future (the end of a leadership term aborts the whole task).
    let _unmeshed = AbortOnDrop(unmeshed);
    controller
        // Another object's change (above all its deletion) can change this one's verdict.
        .watches(
            api,
            watcher::Config::default(),
            move |changed: ServiceIntentions| {
                let dest = conflicts::destination(&changed);
                let changed_key = conflicts::key(&changed);
                rivals_store
                    .state()
                    .into_iter()
                    .filter(move |o| conflicts::destination(o) == dest && conflicts::key(o) != changed_key)
                    .map(|o| ObjectRef::from(o.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconciler::reconcile, reconciler::error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// Validates the object, decides whether it is in force for its destination, and
/// reports both in status (Ready) and, when Ready changes, in an Event. No finalizer: it
/// writes nothing outside the object's own status.
impl Reconcile for ServiceIntentions {
    type State = State;
    type Error = Error;
    const CONTROLLER: &'static str = CONTROLLER;
    const FINALIZER: Option<&'static str> = None;

    async fn reconcile(&self, ctx: &Context<State>) -> Result<Action, Error> {
        let (ready, reason, message, conflicts) = verdict(self, ctx).await?;
        let generation = self.metadata.generation;
        let condition = conditions::new(READY, ready, reason, message.clone(), generation);
        let sources = i32::try_from(self.spec.sources.len()).unwrap_or(i32::MAX);
        let outcome = STATUS
            .update_of(self, ctx, |status| {
                status.observed_generation = generation;
                status.sources = Some(sources);
                status.conflicts = conflicts.clone();
                conditions::upsert(&mut status.conditions, condition.clone());
            })
            .await?;

        if let Outcome::Written { before, .. } = outcome {
            let previous = conditions::get(&before.conditions, READY);
            let flipped = previous.is_none_or(|c| c.status != ready.as_str() || c.reason != reason);
            if flipped {
                let type_ = if ready == ConditionStatus::True {
                    EventType::Normal
                } else {
                    EventType::Warning
                };
                ctx.publish(&self.object_ref(&()), type_, reason, "Reconcile", message)
                    .await;
            }
        }
        Ok(Action::requeue(ctx.config.resync))
    }

    fn retry_after(&self, _class: Class, _ctx: &Context<State>) -> Duration {
        RETRY
    }
}

/// Ready's status, reason and message, and the rivals to list in status.
async fn verdict(
    obj: &ServiceIntentions,
    ctx: &Context<State>,
) -> Result<(ConditionStatus, &'static str, String, Vec<String>), Error> {
    let (destination_namespace, destination_name) = conflicts::destination(obj);
    let mut problems = validate::validate(&obj.spec, &destination_namespace);
    // What the webhook refuses at the door, reported here for objects that got past it.
    if obj.spec.sources.iter().any(|s| s.permissions.is_some())
        && destination_name != "*"
        && destination_namespace != "*"
        // Not on behalf of an object that may not govern that namespace.
        && conflicts::out_of_bounds(obj, &ctx.state.control_namespace).is_none()
    {
        let service = Api::<Service>::namespaced(ctx.client.clone(), &destination_namespace)
            .get_opt(&destination_name)
            .await
            .map_err(Error::Service)?;
        problems.extend(validate::l7_on_tcp(&obj.spec, service.as_ref()));
    }
    let mut verdict = conflicts::verdict(
        obj,
        ctx.state.store.state().iter().map(|o| o.as_ref()),
        &ctx.state.control_namespace,
    );
    if matches!(verdict, Verdict::Shadowed { .. }) {
        // The cache can still hold an object deleted while our watch was down (it is
        // only swapped at the end of a relist): confirm a conflict with a live read
        // before reporting it.
        let live = Api::<ServiceIntentions>::all(ctx.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(Error::List)?;
        verdict = conflicts::verdict(obj, live.items.iter(), &ctx.state.control_namespace);
    }

    let (ready, reason, message, conflicts) = match (&verdict, problems.is_empty()) {
        // First: it governs nothing, whatever else is wrong with it.
        (Verdict::OutOfBounds { reason }, _) => (
            ConditionStatus::False,
            reasons::FOREIGN_DESTINATION,
            format!("{reason}; this object is ignored"),
            vec![],
        ),
        (_, false) => (
            ConditionStatus::False,
            reasons::INVALID_SPEC,
            problems.join("; "),
            vec![],
        ),
        (Verdict::Shadowed { by }, true) => (
            ConditionStatus::False,
            reasons::CONFLICT,
            format!(
                "destination {}/{} is already governed by ServiceIntentions {by}, which is older; \
                 merge the sources into it or delete one of them",
                conflicts::destination(obj).0,
                obj.spec.destination.name
            ),
            vec![by.clone()],
        ),
        (Verdict::InForce { shadowed }, true) => {
            let mut message = format!("{} source(s) in force", obj.spec.sources.len());
            if !shadowed.is_empty() {
                message.push_str(&format!(
                    "; newer objects for the same destination are ignored: {}",
                    shadowed.join(", ")
                ));
            }
            (
                ConditionStatus::True,
                reasons::ACCEPTED,
                message,
                shadowed.clone(),
            )
        }
    };
    Ok((ready, reason, message, conflicts))
}

#[cfg(test)]
mod tests;
