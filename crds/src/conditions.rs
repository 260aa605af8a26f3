//! `status.conditions` as every Capstan kind carries it: the upstream
//! `metav1.Condition`, as a list-map keyed by `type` (`x-kubernetes-list-type: map`,
//! `x-kubernetes-list-map-keys: [type]`), so server-side apply merges conditions owned
//! by different writers instead of replacing the list: each writer (field manager)
//! applies only the condition types it sets, and the others' survive. The controller
//! computes what it applies from the status it read, with `upsert`, so a condition's
//! `lastTransitionTime` moves only when its status does.

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

/// The `Ready` condition every Capstan kind reports.
pub const READY: &str = "Ready";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

/// Builds a condition observed at `generation`, stamped now.
pub fn new(
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: status.as_str().to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(Timestamp::now()),
    }
}

/// Puts `next` into `conditions`, replacing the one of the same type. The transition
/// time is kept when the status did not change, as the API conventions ask, so it
/// says when the condition last flipped rather than when it was last written.
/// Conditions of other types, whoever wrote them, are left as they are.
pub fn upsert(conditions: &mut Vec<Condition>, mut next: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == next.type_) {
        Some(current) => {
            if current.status == next.status {
                next.last_transition_time = current.last_transition_time.clone();
            }
            *current = next;
        }
        None => conditions.push(next),
    }
}

/// Finds a condition by type.
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// The schema for a `conditions` field: `metav1.Condition` items, list-map keyed by type.
pub fn schema(generator: &mut SchemaGenerator) -> Schema {
    let item = Condition::json_schema(generator);
    json_schema!({
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": item,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsert_keeps_transition_time_while_status_holds() {
        let mut list = vec![];
        upsert(
            &mut list,
            new(READY, ConditionStatus::False, "Pending", "", Some(1)),
        );
        let first = list[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        upsert(
            &mut list,
            new(READY, ConditionStatus::False, "StillPending", "", Some(2)),
        );
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].last_transition_time, first);
        assert_eq!(list[0].reason, "StillPending");
        std::thread::sleep(std::time::Duration::from_millis(5));
        upsert(
            &mut list,
            new(READY, ConditionStatus::True, "Accepted", "", Some(2)),
        );
        assert!(list[0].last_transition_time > first);
    }

    #[test]
    fn upsert_leaves_other_writers_conditions() {
        let mut list = vec![new("ExternalCheck", ConditionStatus::True, "Fine", "", None)];
        upsert(
            &mut list,
            new(READY, ConditionStatus::True, "Accepted", "", Some(1)),
        );
        assert_eq!(list.len(), 2);
        assert!(get(&list, "ExternalCheck").is_some());
    }
}
