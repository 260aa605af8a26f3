//! Job priorities as PriorityClasses: a Job of priority n runs its pods in
//! `capstan-priority-<n>` (value n, PreemptLowerPriority), so the real scheduler
//! preempts lower-priority jobs' pods for it when the cluster is full.
//!
//! The classes are cluster-scoped and shared by every Job of that priority, so no Job
//! owns one (an owner reference cannot cross from a namespaced owner). [`ensure`] applies
//! the Job's class the first time a leadership term meets its priority, and again after
//! each resync period (which brings back a class someone deleted) — not on every
//! reconcile: the benchmark counted one apply per reconcile, thousands a minute; [`collect_unused`] deletes, once per resync
//! period, each class labelled as Capstan's whose priority no Job has, unless it is
//! younger than [`GRACE`] (a Job created meanwhile may not be in the store yet; its next
//! reconcile would recreate the class, but its pods could be refused in between).
//! Deleting a class does not touch pods already running with it.

use super::{Error, MANAGER, State};
use crate::context::Context;
use capstan_crds::jobs::Job;
use capstan_jobs::compile::{self, labels};
use k8s_openapi::{api::scheduling::v1::PriorityClass, jiff::Timestamp};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use std::{collections::BTreeSet, sync::Arc, time::Duration};

/// How old an unused class must be before it is deleted.
pub const GRACE: Duration = Duration::from_secs(600);

/// Applies the PriorityClass the pods of `job` name.
pub async fn ensure(cx: &Context<State>, job: &Job) -> Result<(), Error> {
    cx.leadership.ensure()?;
    if cx.state.priorities_applied.lock().contains(&job.spec.priority) {
        return Ok(());
    }
    let class = compile::priority_class(job.spec.priority);
    let name = class.name_any();
    Api::<PriorityClass>::all(cx.client.clone())
        .patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&class))
        .await
        .map_err(|source| Error::Kube {
            action: "applying",
            kind: "PriorityClass".into(),
            name,
            source,
        })?;
    cx.state.priorities_applied.lock().insert(job.spec.priority);
    Ok(())
}

/// Deletes the unused classes every resync period, for the leadership term.
pub async fn collect_unused(cx: Arc<Context<State>>) {
    // An empty store before the first list would make every class look unused.
    if cx.state.jobs.wait_until_ready().await.is_err() {
        return;
    }
    let mut every = tokio::time::interval(cx.config.resync);
    loop {
        every.tick().await;
        cx.state.priorities_applied.lock().clear();
        if let Err(error) = collect(&cx).await {
            tracing::warn!(error = %error, source = ?std::error::Error::source(&error), "Deleting unused PriorityClasses");
        }
    }
}

async fn collect(cx: &Context<State>) -> Result<(), Error> {
    let api = Api::<PriorityClass>::all(cx.client.clone());
    let selector = format!("{}={}", labels::MANAGED_BY, labels::MANAGED_BY_VALUE);
    let classes = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::Kube {
            action: "listing",
            kind: "PriorityClass".into(),
            name: selector,
            source,
        })?;
    let used: BTreeSet<i32> = cx.state.jobs.state().iter().map(|j| j.spec.priority).collect();
    for name in unused(&classes.items, &used, Timestamp::now()) {
        cx.leadership.ensure()?;
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(class = name, "Deleted a PriorityClass no Job uses"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => {
                return Err(Error::Kube {
                    action: "deleting",
                    kind: "PriorityClass".into(),
                    name,
                    source,
                });
            }
        }
    }
    Ok(())
}

/// The classes among `classes` that are Capstan's (named as `compile::names` does), older
/// than [`GRACE`] at `now`, and of a priority no Job in `used` has.
fn unused(classes: &[PriorityClass], used: &BTreeSet<i32>, now: Timestamp) -> Vec<String> {
    classes
        .iter()
        .filter(|c| c.name_any() == compile::names::priority_class(c.value) && !used.contains(&c.value))
        .filter(|c| {
            c.metadata
                .creation_timestamp
                .as_ref()
                .is_some_and(|t| now.duration_since(t.0).unsigned_abs() >= GRACE)
        })
        .map(|c| c.name_any())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn class(value: i32, created: Timestamp) -> PriorityClass {
        let mut class = compile::priority_class(value);
        class.metadata.creation_timestamp = Some(Time(created));
        class
    }

    #[test]
    fn only_old_classes_of_no_jobs_priority_go() {
        let now: Timestamp = "2026-01-01T12:00:00Z".parse().unwrap();
        let old: Timestamp = "2026-01-01T11:00:00Z".parse().unwrap();
        let recent: Timestamp = "2026-01-01T11:59:00Z".parse().unwrap();
        let mut foreign = class(30, old);
        foreign.metadata.name = Some("someone-elses".into());
        let classes = [class(50, old), class(80, old), class(90, recent), foreign];
        let used = BTreeSet::from([50]);
        assert_eq!(unused(&classes, &used, now), ["capstan-priority-80"]);
    }
}
