//! Parameterized jobs and their dispatches.
//!
//! A parameterized Job is a template: it runs nothing. `capstan job dispatch` creates a
//! child Job (a cjob named `<parent>-<random>`, labelled `jobs.capstan.dev/parent`, its
//! spec the parent's without `parameterized`, plus `dispatch {parent, meta, payload}`),
//! and the parent's status lists its children, newest first.
//!
//! A child runs as its type does (batch or sysbatch), after its payload: the Secret
//! `<child>-payload` (`compile::payload_secret`, owned by the child) that its tasks mount,
//! applied first so the pods find it. The compiler turns the meta into `NOMAD_META_*`
//! env and the payload into the file each task's `dispatchPayload` names.

use super::{Error, Phase, Report, State, batch, report::apply_owned, sysbatch};
use crate::context::Context;
use capstan_crds::jobs::{ChildRun, Job, JobType};
use capstan_jobs::compile::{self, labels};
use kube::{ResourceExt, runtime::reflector::ObjectRef};

/// `ChildRun.kind` of a dispatched child.
pub const CHILD_KIND: &str = "Job";

/// The parameterized `parent`: nothing to run; its children from the Job store.
pub fn parent(cx: &Context<State>, parent: &Job) -> Report {
    let namespace = parent.namespace();
    let name = parent.name_any();
    let mut children: Vec<_> = cx.state.jobs.state_filter(|j| {
        j.namespace() == namespace
            && j.labels().get(labels::PARENT) == Some(&name)
            && j.spec.dispatch.is_some()
    });
    children.sort_by(|a, b| {
        let created = |j: &Job| j.metadata.creation_timestamp.clone();
        created(b)
            .cmp(&created(a))
            .then_with(|| a.name_any().cmp(&b.name_any()))
    });
    Report {
        phase: Phase::Dead,
        children: children.iter().map(|c| child_run(c)).collect(),
        ..Report::default()
    }
}

/// A child as its parent lists it: its phase as its own status says (pending until the
/// reconciler has seen it).
fn child_run(child: &Job) -> ChildRun {
    let phase = child
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("pending");
    ChildRun {
        name: child.name_any(),
        kind: CHILD_KIND.to_owned(),
        created: child.metadata.creation_timestamp.clone(),
        status: match phase {
            "complete" | "failed" | "running" => phase,
            _ => "pending",
        }
        .to_owned(),
    }
}

/// Runs the dispatched `child` at `version`: its payload Secret, then its runs.
pub async fn child(cx: &Context<State>, child: &Job, version: i64) -> Result<Report, Error> {
    if let Some(secret) = compile::payload_secret(child)? {
        cx.leadership.ensure()?;
        apply_owned(&cx.client, &secret).await?;
    }
    match child.spec.type_ {
        JobType::Sysbatch => sysbatch::apply(cx, child, version).await,
        _ => batch::apply(cx, child, version).await,
    }
}

/// The parent a dispatched child's change concerns (its status lists the child).
pub fn parent_of(child: &Job) -> Option<ObjectRef<Job>> {
    let parent = child.labels().get(labels::PARENT)?;
    Some(ObjectRef::new(parent).within(&child.namespace()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_crds::jobs::JobStatus;

    #[test]
    fn a_child_wakes_its_parent_and_reports_its_phase() {
        let spec = serde_json::json!({"type": "batch", "groups": [{"name": "g", "tasks": [{"name": "t", "image": "i"}]}]});
        let mut child = Job::new("task-abc", serde_json::from_value(spec).expect("a valid spec"));
        child.metadata.namespace = Some("ns".into());
        assert_eq!(parent_of(&child), None);
        child.metadata.labels = Some([(labels::PARENT.to_owned(), "task".to_owned())].into());
        assert_eq!(parent_of(&child), Some(ObjectRef::new("task").within("ns")));
        assert_eq!(child_run(&child).status, "pending", "not reconciled yet");
        child.status = Some(JobStatus {
            phase: Some("complete".into()),
            ..JobStatus::default()
        });
        let run = child_run(&child);
        assert_eq!(
            (run.name.as_str(), run.kind.as_str(), run.status.as_str()),
            ("task-abc", "Job", "complete")
        );
    }
}
