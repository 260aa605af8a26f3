//! The intentions reconciler: validates each ServiceIntentions, decides which object is
//! in force for its destination, and reports both in status and Events.
//!
//! It also reports, in status, what the validating webhook would have refused (objects
//! created while it was absent), and (`unmeshed`) finds running pods that should be
//! meshed but are not.

use crate::{
    context::Context,
    leader,
    status::{self, HasStatus, Outcome},
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
    Api, Resource, ResourceExt,
    api::ListParams,
    runtime::{
        Controller,
        controller::Action,
        events::{Event, EventType},
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use std::{future::Future, sync::Arc, time::Duration};

mod unmeshed;

pub use unmeshed::register_metrics;

const CONTROLLER: &str = "intentions";

/// Condition reasons this reconciler sets on Ready.
pub mod reasons {
    pub const ACCEPTED: &str = "Accepted";
    pub const CONFLICT: &str = "Conflict";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The object names a destination outside its own namespace: it governs nothing.
    pub const FOREIGN_DESTINATION: &str = "ForeignDestination";
}

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

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::List(_) => "list",
            Self::Service(_) => "service",
            Self::Status(status::Error::Leader(_)) | Self::Leader(_) => "not_leader",
            Self::Status(status::Error::Contended { .. }) => "status_contended",
            Self::Status(_) => "status",
        }
    }
}

impl HasStatus for ServiceIntentions {
    type Status = ServiceIntentionsStatus;

    fn status(&self) -> Option<&ServiceIntentionsStatus> {
        self.status.as_ref()
    }
}

/// Runs the reconciler until `shutdown` resolves (in-flight reconciles finish first).
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let shutdown = futures::FutureExt::shared(shutdown);
    let api = Api::<ServiceIntentions>::all(ctx.client.clone());
    let controller = Controller::new(api.clone(), watcher::Config::default().any_semantic());
    let store = controller.store();
    let rivals_store = store.clone();
    // Capstan's own namespace is never meshed (the chart sets this variable).
    let own_namespace =
        std::env::var("CAPSTAN_CONTROLLER_NAMESPACE").unwrap_or_else(|_| "capstan-system".to_owned());
    let unmeshed = tokio::spawn(unmeshed::run(
        ctx.clone(),
        store.clone(),
        own_namespace.clone(),
        shutdown.clone(),
    ));
    // Only objects in Capstan's own namespace may govern other namespaces (tenancy).
    let control_namespace: Arc<str> = own_namespace.into();
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
        .run(
            move |obj, ctx| reconcile(obj, ctx, store.clone(), control_namespace.clone()),
            error_policy,
            ctx,
        )
        .for_each(|_| futures::future::ready(()))
        .await;
}

#[tracing::instrument(skip(obj, ctx, store, control_namespace), fields(ns = obj.namespace().unwrap_or_default(), name = obj.name_any()))]
async fn reconcile(
    obj: Arc<ServiceIntentions>,
    ctx: Arc<Context>,
    store: Store<ServiceIntentions>,
    control_namespace: Arc<str>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.start(CONTROLLER);
    ctx.leadership.ensure()?;
    if obj.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let generation = obj.metadata.generation;

    let (destination_namespace, destination_name) = conflicts::destination(&obj);
    let mut problems = validate::validate(&obj.spec, &destination_namespace);
    // What the webhook refuses at the door, reported here for objects that got past it.
    if obj.spec.sources.iter().any(|s| s.permissions.is_some())
        && destination_name != "*"
        && destination_namespace != "*"
        // Not on behalf of an object that may not govern that namespace.
        && conflicts::out_of_bounds(&obj, &control_namespace).is_none()
    {
        let service = Api::<Service>::namespaced(ctx.client.clone(), &destination_namespace)
            .get_opt(&destination_name)
            .await
            .map_err(Error::Service)?;
        problems.extend(validate::l7_on_tcp(&obj.spec, service.as_ref()));
    }
    let mut verdict = conflicts::verdict(&obj, store.state().iter().map(|o| o.as_ref()), &control_namespace);
    if matches!(verdict, Verdict::Shadowed { .. }) {
        // The cache can still hold an object deleted while our watch was down (it is
        // only swapped at the end of a relist): confirm a conflict with a live read
        // before reporting it.
        let live = Api::<ServiceIntentions>::all(ctx.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(Error::List)?;
        verdict = conflicts::verdict(&obj, live.items.iter(), &control_namespace);
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
                conflicts::destination(&obj).0,
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

    let api = Api::<ServiceIntentions>::namespaced(ctx.client.clone(), &ns);
    let condition = conditions::new(READY, ready, reason, message.clone(), generation);
    let sources = i32::try_from(obj.spec.sources.len()).unwrap_or(i32::MAX);
    let outcome = status::update(&api, &name, &ctx.leadership, &ctx.metrics, CONTROLLER, |status| {
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
            publish(&ctx, &obj, ready, reason, message).await;
        }
    }
    Ok(Action::requeue(ctx.config.resync))
}

async fn publish(ctx: &Context, obj: &ServiceIntentions, ready: ConditionStatus, reason: &str, note: String) {
    let event = Event {
        type_: if ready == ConditionStatus::True {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if ctx.leadership.ensure().is_err() {
        return;
    }
    if let Err(error) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::warn!(%error, "Publishing an event");
    }
}

fn error_policy(_obj: Arc<ServiceIntentions>, error: &Error, ctx: Arc<Context>) -> Action {
    let label = error.metric_label();
    ctx.metrics.failed(CONTROLLER, label);
    if label == "not_leader" {
        // The term is ending; the controller is about to be dropped.
        return Action::await_change();
    }
    tracing::warn!(error = %error, source = ?std::error::Error::source(error), "Reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// Aborts a spawned task when dropped, so that it ends with the future that owns it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
