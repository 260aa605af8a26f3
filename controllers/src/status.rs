//! Status writes that never lose another writer's update.
//!
//! Each attempt reads the object fresh, applies the caller's change to the status it
//! finds, and writes it back with that read's resourceVersion as a precondition. A 409
//! (someone wrote in between: another controller, a user, an old leader) means read
//! again and reapply, so conditions other writers own survive, and a write computed
//! from stale state never lands. Nothing is written when the change is a no-op.

use crate::{leader::Leadership, metrics::Metrics};
use kube::{
    Api, Resource,
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

pub async fn update<K>(
    api: &Api<K>,
    name: &str,
    leadership: &Leadership,
    metrics: &Metrics,
    controller: &'static str,
    change: impl Fn(&mut K::Status),
) -> Result<Outcome<K::Status>, Error>
where
    K: Resource + HasStatus + Clone + DeserializeOwned + Debug,
{
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
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": fresh.meta().resource_version },
            "status": merge_patch(&to_json(&before), &to_json(&after)),
        });
        tracing::debug!(%name, %patch, "Writing status");
        // The lease could have been lost during the read: check once more right before
        // the write, the last moment this process can still hold back.
        leadership.ensure()?;
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(Outcome::Written { before, after }),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                metrics
                    .status_conflicts
                    .get_or_create(&crate::metrics::ControllerLabels { controller })
                    .inc();
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

fn to_json(status: &impl Serialize) -> Value {
    serde_json::to_value(status).expect("a status serializes")
}

/// The JSON merge patch (RFC 7386) that turns `before` into `after`. Fields that
/// `after` leaves out (empty lists and unset options are not serialized) become
/// explicit nulls: a plain merge patch of `after` would leave their old values in place.
fn merge_patch(before: &Value, after: &Value) -> Value {
    match (before, after) {
        (Value::Object(before), Value::Object(after)) => {
            let mut patch = serde_json::Map::new();
            for (key, new) in after {
                match before.get(key) {
                    Some(old) if old == new => {}
                    Some(old) => {
                        patch.insert(key.clone(), merge_patch(old, new));
                    }
                    None => {
                        patch.insert(key.clone(), new.clone());
                    }
                }
            }
            for key in before.keys().filter(|k| !after.contains_key(*k)) {
                patch.insert(key.clone(), Value::Null);
            }
            Value::Object(patch)
        }
        _ => after.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::merge_patch;
    use serde_json::json;

    #[test]
    fn removed_fields_become_nulls_and_unchanged_ones_are_left_out() {
        let before = json!({"conflicts": ["a/b"], "sources": 2, "nested": {"keep": 1, "drop": 2}});
        let after = json!({"sources": 3, "nested": {"keep": 1}, "conditions": []});
        assert_eq!(
            merge_patch(&before, &after),
            json!({"conflicts": null, "sources": 3, "nested": {"drop": null}, "conditions": []})
        );
    }
}
