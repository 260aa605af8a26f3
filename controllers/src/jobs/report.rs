//! The contract between the reconcile (`mod.rs`) and each job type's module: every
//! type has
//!
//! ```ignore
//! pub async fn apply(cx: &Context<State>, job: &Job, version: i64) -> Result<Report, Error>
//! ```
//!
//! which makes the native objects match version `version` of `job` (the newest; its
//! spec is `job.spec`) and returns what it found, as a [`Report`]; `status.rs` turns the
//! report into the Job's status, its Ready condition and Events. Writes go through
//! [`apply_owned`] (server-side apply under the reconciler's field manager), so every
//! type writes the same way.

use super::{Error, MANAGER};
use capstan_crds::{
    ConditionStatus,
    jobs::{ChildRun, DeploymentStatus, GroupSummary},
};
use k8s_openapi::NamespaceResourceScope;
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PropagationPolicy},
};
use serde::{Serialize, de::DeserializeOwned};
use std::{fmt::Debug, time::Duration};

/// What a job type made of the job, for its status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub phase: Phase,
    /// Allocations (pods) desired and running, over all groups (`status.desired`,
    /// `status.running`).
    pub desired: i32,
    pub running: i32,
    /// Per group and datacenter (`status::summarize` builds it from the pods).
    pub summary: Vec<GroupSummary>,
    /// Periodic launches and dispatched runs, newest first (status keeps 20).
    pub children: Vec<ChildRun>,
    /// Service jobs: the current (or last) deployment; None leaves status as it is.
    pub deployment: Option<DeploymentStatus>,
    /// The version whose allocations run; None means `version` (all but a reverted
    /// service job).
    pub running_version: Option<i64>,
    /// The newest version known good; None leaves status as it is.
    pub stable_version: Option<i64>,
    /// The Ready condition; None derives it from the phase (`status::ready`).
    pub ready: Option<Ready>,
    /// Events to publish on the Job (after its status is written).
    pub events: Vec<Note>,
    /// Look again after this long at the latest (a deadline, the end of a
    /// min_healthy_time), instead of the resync period.
    pub requeue: Option<Duration>,
}

/// `status.phase`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    /// Nothing runs yet.
    #[default]
    Pending,
    Running,
    /// A service job's deployment is in progress.
    Deploying,
    /// Every group ran to completion (batch, sysbatch, a dispatched run).
    Complete,
    Failed,
    /// Runs nothing, by design (a parameterized template, a periodic parent between
    /// launches is `running`).
    Dead,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Deploying => "deploying",
            Self::Complete => "complete",
            Self::Failed => "failed",
            Self::Dead => "dead",
        }
    }
}

/// The Ready condition's status, reason (one of `super::reasons`) and message.
#[derive(Clone, Debug, PartialEq)]
pub struct Ready {
    pub status: ConditionStatus,
    pub reason: &'static str,
    pub message: String,
}

/// An Event to publish on the Job.
#[derive(Clone, Debug, PartialEq)]
pub struct Note {
    pub warning: bool,
    /// One of `super::reasons`.
    pub reason: &'static str,
    pub message: String,
    /// The version it is about: the Event is then related to that version's
    /// ControllerRevision, which also keeps it apart from the same reason's Event about
    /// another version (the recorder folds Events of one reason, object and related
    /// object into one series).
    pub version: Option<i64>,
}

impl Note {
    pub fn normal(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            warning: false,
            reason,
            message: message.into(),
            version: None,
        }
    }

    pub fn warning(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            warning: true,
            reason,
            message: message.into(),
            version: None,
        }
    }

    pub fn of_version(self, version: i64) -> Self {
        Self {
            version: Some(version),
            ..self
        }
    }
}

/// Server-side applies `obj` (which carries its name, namespace, labels and owner
/// reference) under the reconciler's field manager, forced: the reconciler owns what it
/// writes, whoever wrote it before.
pub async fn apply_owned<K>(client: &kube::Client, obj: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug,
{
    let name = obj.name_any();
    let api = Api::<K>::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(obj))
        .await
        .map_err(|source| Error::Kube {
            action: "applying",
            kind: K::kind(&()).into_owned(),
            name,
            source,
        })
}

/// Deletes `name` in `namespace` with its dependents in the background; one already
/// gone is not an error.
pub async fn delete_owned<K>(client: &kube::Client, namespace: &str, name: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
{
    let api = Api::<K>::namespaced(client.clone(), namespace);
    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(source) => Err(Error::Kube {
            action: "deleting",
            kind: K::kind(&()).into_owned(),
            name: name.to_owned(),
            source,
        }),
    }
}
