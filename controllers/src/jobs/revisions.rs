//! Versions: every accepted spec (the spec without `promote`, which starts nothing) is
//! a numbered version, stored as a ControllerRevision `<job>-v<N>` (revision N, data =
//! that spec) owned by the Job, so `capstan job history` and `revert` read them and a
//! revert can run the stable version's spec while the Job's spec says another.
//!
//! The newest 10 are kept, and never the stable one (label `jobs.capstan.dev/stable`) nor
//! the one running. A spec is a new version when it differs from the newest revision's;
//! a reconcile whose Job's generation is the one its status was written for skips the
//! comparison (the status's `version` already says it).

use super::{Error, MANAGER, State};
use crate::context::Context;
use capstan_crds::jobs::{Job, JobSpec};
use capstan_jobs::compile::{labels, names};
use k8s_openapi::{api::apps::v1::ControllerRevision, apimachinery::pkg::runtime::RawExtension};
use kube::{
    Api, Resource, ResourceExt,
    api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use std::collections::BTreeMap;

/// Revisions kept besides the stable and the running one.
pub const KEEP: usize = 10;

pub fn name(job: &str, version: i64) -> String {
    names::revision(job, version)
}

/// The part of a spec that makes a version: all of it but `promote`.
pub fn versioned(spec: &JobSpec) -> JobSpec {
    JobSpec {
        promote: None,
        ..spec.clone()
    }
}

/// The version `job.spec` is, recording it as a new revision when it is new (counted
/// in `jobs_versions`).
pub async fn ensure(cx: &Context<State>, job: &Job) -> Result<i64, Error> {
    let client = &cx.client;
    let status = job.status.as_ref();
    if let Some(version) = status.and_then(|s| s.version)
        && status.and_then(|s| s.observed_generation) == job.metadata.generation
        && job.metadata.generation.is_some()
    {
        return Ok(version);
    }
    let api = api(client, job);
    let mut revisions = list(&api, job).await?;
    let spec = versioned(&job.spec);
    if let Some(newest) = revisions.last()
        && stored_spec(newest).is_some_and(|stored| versioned(&stored) == spec)
    {
        return Ok(newest.revision);
    }
    let version = revisions.last().map_or(1, |r| r.revision + 1);
    let revision = build(job, version, &spec);
    // A create, not an apply: a revision never changes once written. A conflict means
    // another reconcile got there first; the retry lists again.
    let created = api
        .create(&PostParams::default(), &revision)
        .await
        .map_err(|source| Error::Kube {
            action: "creating",
            kind: "ControllerRevision".into(),
            name: revision.name_any(),
            source,
        })?;
    cx.metrics.jobs.versions.inc();
    revisions.push(created);
    prune(&api, job, &revisions).await?;
    Ok(version)
}

/// The spec stored as `version`.
pub async fn spec(client: &kube::Client, job: &Job, version: i64) -> Result<JobSpec, Error> {
    let name = name(&job.name_any(), version);
    let revision = api(client, job).get(&name).await.map_err(|source| Error::Kube {
        action: "reading",
        kind: "ControllerRevision".into(),
        name: name.clone(),
        source,
    })?;
    stored_spec(&revision).ok_or_else(|| Error::Revision { name })
}

/// Marks `version` stable (label `jobs.capstan.dev/stable=true`) and unmarks `previous`.
pub async fn mark_stable(
    client: &kube::Client,
    job: &Job,
    version: i64,
    previous: Option<i64>,
) -> Result<(), Error> {
    let api = api(client, job);
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    };
    let job_name = job.name_any();
    let mut marks = vec![(version, Some("true"))];
    if let Some(previous) = previous.filter(|p| *p != version) {
        marks.push((previous, None));
    }
    for (v, value) in marks {
        let name = name(&job_name, v);
        let patch = serde_json::json!({"metadata": {"labels": {labels::STABLE: value}}});
        match api.patch(&name, &params, &Patch::Merge(&patch)).await {
            Ok(_) => {}
            // An unmarked revision already pruned, or a stable one deleted by hand:
            // nothing to mark.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => {
                return Err(Error::Kube {
                    action: "labelling",
                    kind: "ControllerRevision".into(),
                    name,
                    source,
                });
            }
        }
    }
    Ok(())
}

fn api(client: &kube::Client, job: &Job) -> Api<ControllerRevision> {
    Api::namespaced(client.clone(), &job.namespace().unwrap_or_default())
}

/// The job's revisions, oldest first (a revision of a deleted namesake, not yet
/// collected, is not its).
async fn list(api: &Api<ControllerRevision>, job: &Job) -> Result<Vec<ControllerRevision>, Error> {
    let selector = format!("{}={}", labels::JOB, job.name_any());
    let uid = job.uid();
    let mut revisions: Vec<_> = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::Kube {
            action: "listing",
            kind: "ControllerRevision".into(),
            name: selector,
            source,
        })?
        .items
        .into_iter()
        .filter(|r| r.owner_references().iter().any(|o| Some(&o.uid) == uid.as_ref()))
        .collect();
    revisions.sort_by_key(|r| r.revision);
    Ok(revisions)
}

fn stored_spec(revision: &ControllerRevision) -> Option<JobSpec> {
    let data = revision.data.as_ref()?;
    serde_json::from_value(data.0.clone()).ok()
}

fn build(job: &Job, version: i64, spec: &JobSpec) -> ControllerRevision {
    let job_name = job.name_any();
    ControllerRevision {
        metadata: ObjectMeta {
            name: Some(name(&job_name, version)),
            namespace: job.namespace(),
            labels: Some(BTreeMap::from([
                (labels::JOB.to_owned(), job_name),
                (labels::VERSION.to_owned(), version.to_string()),
                (labels::MANAGED_BY.to_owned(), labels::MANAGED_BY_VALUE.to_owned()),
            ])),
            owner_references: job.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        data: Some(RawExtension(
            serde_json::to_value(spec).expect("a JobSpec serializes"),
        )),
        revision: version,
    }
}

/// Deletes all but the newest `KEEP` revisions, never the stable or the running one.
async fn prune(
    api: &Api<ControllerRevision>,
    job: &Job,
    revisions: &[ControllerRevision],
) -> Result<(), Error> {
    let status = job.status.as_ref();
    let keep = [
        status.and_then(|s| s.running_version),
        status.and_then(|s| s.stable_version),
    ];
    for old in prunable(revisions, &keep) {
        match api.delete(&old, &Default::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => {
                return Err(Error::Kube {
                    action: "deleting",
                    kind: "ControllerRevision".into(),
                    name: old,
                    source,
                });
            }
        }
    }
    Ok(())
}

/// The revisions (oldest first) to delete: beyond the newest `KEEP`, neither stable
/// nor in `keep`.
fn prunable(revisions: &[ControllerRevision], keep: &[Option<i64>]) -> Vec<String> {
    let excess = revisions.len().saturating_sub(KEEP);
    revisions[..excess]
        .iter()
        .filter(|r| !keep.contains(&Some(r.revision)))
        .filter(|r| r.labels().get(labels::STABLE).map(String::as_str) != Some("true"))
        .map(ResourceExt::name_any)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revision(n: i64, stable: bool) -> ControllerRevision {
        let mut labels = BTreeMap::new();
        if stable {
            labels.insert(labels::STABLE.to_owned(), "true".to_owned());
        }
        ControllerRevision {
            metadata: ObjectMeta {
                name: Some(name("web", n)),
                labels: Some(labels),
                ..ObjectMeta::default()
            },
            data: None,
            revision: n,
        }
    }

    #[test]
    fn the_newest_ten_the_stable_and_the_running_version_are_kept() {
        let revisions: Vec<_> = (1..=14).map(|n| revision(n, n == 2)).collect();
        assert_eq!(prunable(&revisions, &[Some(3), None]), vec!["web-v1", "web-v4"]);
        assert!(prunable(&revisions[..10], &[None, None]).is_empty());
    }

    #[test]
    fn promote_is_not_part_of_a_version() {
        let spec: JobSpec = serde_json::from_value(serde_json::json!({
            "groups": [{"name": "g", "tasks": [{"name": "t", "image": "i"}]}],
            "promote": 3,
        }))
        .unwrap();
        assert_eq!(versioned(&spec).promote, None);
        assert_eq!(
            versioned(&spec),
            versioned(&JobSpec {
                promote: Some(4),
                ..spec
            })
        );
    }
}
