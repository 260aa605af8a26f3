//! Status writes by server-side apply, one field manager per writer.
//!
//! Each writer (a reconciler, or a reporter beside it such as intentions' `unmeshed`)
//! applies only the status fields and the condition types it owns, under its own field
//! manager: the API server merges `conditions` as the list-map keyed by `type` the CRD
//! declares (`capstan_crds::conditions::schema`), so conditions other writers own
//! survive, and a field this writer no longer sets is removed with its ownership.
//!
//! The write is computed from a fresh read of the status, so a condition whose status
//! did not change keeps its `lastTransitionTime` (`conditions::upsert`) and callers can
//! tell what changed (to publish an Event only on a change). The apply carries that
//! read's resourceVersion as a precondition: a 409 (someone wrote in between) means read
//! again and recompute, so a write computed from stale state never lands (the metric
//! `status_conflicts` counts them). `force` takes over the fields from a previous owner
//! (objects written before, by merge patch, under another manager). Nothing is written
//! when the change is a no-op.

use crate::context::Context;
use k8s_openapi::NamespaceResourceScope;
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use std::{fmt::Debug, time::Duration};

const ATTEMPTS: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {name} for a status update")]
    Read {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing the status of {name}")]
    Write {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("status of {name} still conflicted after {ATTEMPTS} attempts")]
    Contended { name: String },
    #[error(transparent)]
    Leader(#[from] crate::leader::Error),
}

/// Whether the write changed anything.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome<S> {
    Unchanged,
    /// The status as it was before, and as written.
    Written {
        before: S,
        after: S,
    },
}

pub trait HasStatus {
    type Status: Clone + Default + PartialEq + Serialize + DeserializeOwned + Debug;
    fn status(&self) -> Option<&Self::Status>;
}

/// One writer of a kind's status: its field manager and what it owns.
#[derive(Debug)]
pub struct Writer {
    /// The server-side apply field manager.
    pub manager: &'static str,
    /// The reconciler it reports metrics as.
    pub controller: &'static str,
    /// The status fields (JSON names, `conditions` aside) it sets.
    pub fields: &'static [&'static str],
    /// The condition types it sets.
    pub conditions: &'static [&'static str],
}

impl Writer {
    /// The part of `status` this writer applies: its fields and its conditions only.
    pub fn owned(&self, status: &impl Serialize) -> Value {
        let Value::Object(all) = serde_json::to_value(status).expect("a status serializes") else {
            return Value::Object(Default::default());
        };
        let mut owned: serde_json::Map<String, Value> = all
            .iter()
            .filter(|(key, _)| self.fields.contains(&key.as_str()))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        if !self.conditions.is_empty() {
            let mine: Vec<Value> = all
                .get("conditions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|c| {
                    c.get("type")
                        .and_then(Value::as_str)
                        .is_some_and(|t| self.conditions.contains(&t))
                })
                .cloned()
                .collect();
            owned.insert("conditions".into(), Value::Array(mine));
        }
        Value::Object(owned)
    }

    /// The apply patch: this writer's part of `status`, conditional on `resource_version`.
    pub fn patch<K: Resource<DynamicType = ()>>(
        &self,
        name: &str,
        resource_version: Option<&str>,
        status: &impl Serialize,
    ) -> Value {
        serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "metadata": { "name": name, "resourceVersion": resource_version },
            "status": self.owned(status),
        })
    }

    /// `update` of `obj`'s status, in its namespace.
    pub async fn update_of<K, S>(
        &self,
        obj: &K,
        ctx: &Context<S>,
        change: impl Fn(&mut K::Status),
    ) -> Result<Outcome<K::Status>, Error>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + HasStatus
            + Clone
            + DeserializeOwned
            + Debug,
    {
        let api = Api::<K>::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
        self.update(&api, &obj.name_any(), ctx, change).await
    }

    /// `update_of`, except that a change that leaves the status `obj` was handed with
    /// as it is (a poll that changed nothing) writes nothing and does not even read the
    /// status again: the object the reconcile holds already says it all.
    pub async fn update_of_unless_held<K, S>(
        &self,
        obj: &K,
        ctx: &Context<S>,
        change: impl Fn(&mut K::Status),
    ) -> Result<Outcome<K::Status>, Error>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + HasStatus
            + Clone
            + DeserializeOwned
            + Debug,
    {
        let mut predicted = obj.status().cloned().unwrap_or_default();
        change(&mut predicted);
        if obj.status() == Some(&predicted) {
            return Ok(Outcome::Unchanged);
        }
        self.update_of(obj, ctx, change).await
    }

    /// Reads the status, applies `change` to it, and applies this writer's part of the
    /// result (see the module's comment).
    pub async fn update<K, S>(
        &self,
        api: &Api<K>,
        name: &str,
        ctx: &Context<S>,
        change: impl Fn(&mut K::Status),
    ) -> Result<Outcome<K::Status>, Error>
    where
        K: Resource<DynamicType = ()> + HasStatus + Clone + DeserializeOwned + Debug,
    {
        let leadership = &ctx.leadership;
        let params = PatchParams::apply(self.manager).force();
        for attempt in 0..ATTEMPTS {
            leadership.ensure()?;
            let fresh = api.get_status(name).await.map_err(|source| Error::Read {
                name: name.to_owned(),
                source,
            })?;
            let before = fresh.status().cloned().unwrap_or_default();
            let mut after = before.clone();
            change(&mut after);
            if after == before {
                return Ok(Outcome::Unchanged);
            }
            let patch = self.patch::<K>(name, fresh.meta().resource_version.as_deref(), &after);
            tracing::debug!(%name, manager = self.manager, %patch, "Applying status");
            // The lease could have been lost during the read: check once more right
            // before the write, the last moment this process can still hold back.
            leadership.ensure()?;
            match api.patch_status(name, &params, &Patch::Apply(&patch)).await {
                Ok(_) => return Ok(Outcome::Written { before, after }),
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    ctx.metrics.status_conflict(self.controller);
                    tracing::debug!(%name, attempt, "Status write conflicted; retrying on a fresh read");
                    tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt + 1))).await;
                }
                Err(source) => {
                    return Err(Error::Write {
                        name: name.to_owned(),
                        source,
                    });
                }
            }
        }
        Err(Error::Contended {
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Writer;
    use serde_json::json;

    #[test]
    fn a_writer_applies_only_its_fields_and_conditions() {
        let writer = Writer {
            manager: "test",
            controller: "test",
            fields: &["observedGeneration", "sources"],
            conditions: &["Ready"],
        };
        let status = json!({
            "observedGeneration": 2,
            "conflicts": ["a/b"],
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "Meshed", "status": "False"}],
        });
        assert_eq!(
            writer.owned(&status),
            json!({"observedGeneration": 2, "conditions": [{"type": "Ready", "status": "True"}]})
        );
    }
}
