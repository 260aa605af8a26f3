//! What applying a new spec over the stored one changes, as `nomad job plan` tells it:
//! per group, whether it is created, left alone, updated in place (only its count
//! changes, so the running allocations stay), updated destructively (its pods change, so
//! they are replaced, behind canaries when the update block asks for some) or removed;
//! and the fields that differ. `capstan job plan` prints it after a server-side dry run,
//! and `capstan job history` uses the field diff between two versions.

use crate::compile;
use capstan_crds::jobs::{Job, JobSpec, JobType};
use serde_json::Value;
use std::fmt;

/// The whole change, job fields first, then each group (in `next`'s order, removed
/// groups last).
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Fields outside the groups that differ (`priority`, `update.canary`).
    pub job: Vec<FieldDiff>,
    pub groups: Vec<GroupPlan>,
}

impl Plan {
    /// True when applying would change nothing.
    pub fn is_empty(&self) -> bool {
        self.job.is_empty() && self.groups.iter().all(|g| g.change == Change::None)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct GroupPlan {
    pub name: String,
    pub change: Change,
    /// The group's count before (None when created) and after (None when removed).
    pub count: (Option<i32>, Option<i32>),
    /// Canaries a destructive update of a service group places first.
    pub canaries: i32,
    /// The group's own fields that differ (paths relative to the group).
    pub diff: Vec<FieldDiff>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Create,
    /// Nothing that reaches this group changes.
    None,
    /// The running allocations stay: only the count or the update strategy changes.
    InPlace,
    /// The group's pods change: each allocation is replaced.
    Destructive,
    Remove,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::None => "no change",
            Self::InPlace => "in-place update",
            Self::Destructive => "create/destroy update",
            Self::Remove => "destroy",
        }
    }

    /// Nomad's marker: `+` created, `-` removed, `+/-` changed, blank unchanged.
    pub fn marker(self) -> &'static str {
        match self {
            Self::Create => "+",
            Self::Remove => "-",
            Self::InPlace | Self::Destructive => "+/-",
            Self::None => " ",
        }
    }
}

/// One field that differs, at a path like `tasks[server].image` (list entries with a
/// `name` are keyed by it, others by index; a list of plain values is one field).
#[derive(Clone, Debug, PartialEq)]
pub struct FieldDiff {
    pub field: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

impl fmt::Display for FieldDiff {
    /// `+ field: value`, `- field: value` or `+/- field: before => after`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.before, &self.after) {
            (None, Some(after)) => write!(f, "+ {}: {after}", self.field),
            (Some(before), None) => write!(f, "- {}: {before}", self.field),
            (Some(before), Some(after)) => write!(f, "+/- {}: {before} => {after}", self.field),
            (None, None) => write!(f, "  {}", self.field),
        }
    }
}

/// The change from `current` (None: the job does not exist yet) to `next`.
pub fn plan(current: Option<&JobSpec>, next: &JobSpec) -> Plan {
    let job_diff = current
        .map(|current| diff(&job_fields(current), &job_fields(next)))
        .unwrap_or_default();
    // compile::template_hash reads a Job; the name is no part of the hash.
    let current = current.map(|spec| Job::new("", spec.clone()));
    let next = Job::new("", next.clone());
    let mut groups: Vec<GroupPlan> = next
        .spec
        .groups
        .iter()
        .enumerate()
        .map(|(i, group)| {
            let before = current
                .as_ref()
                .and_then(|c| Some((c, c.spec.groups.iter().position(|g| g.name == group.name)?)));
            match before {
                None => GroupPlan {
                    name: group.name.clone(),
                    change: Change::Create,
                    count: (None, Some(group.count)),
                    canaries: 0,
                    diff: Vec::new(),
                },
                Some((current, before)) => group_plan((current, before), (&next, i)),
            }
        })
        .collect();
    if let Some(current) = &current {
        groups.extend(
            current
                .spec
                .groups
                .iter()
                .filter(|g| !next.spec.groups.iter().any(|n| n.name == g.name))
                .map(|g| GroupPlan {
                    name: g.name.clone(),
                    change: Change::Remove,
                    count: (Some(g.count), None),
                    canaries: 0,
                    diff: Vec::new(),
                }),
        );
    }
    Plan {
        job: job_diff,
        groups,
    }
}

/// A group in both versions: destructive when the hash of what shapes its pods differs
/// (the controller starts a deployment exactly then), in place when only its count or
/// update block does.
fn group_plan((current, i): (&Job, usize), (next, j): (&Job, usize)) -> GroupPlan {
    let (before, after) = (&current.spec.groups[i], &next.spec.groups[j]);
    let diff = diff(&to_value(before), &to_value(after));
    let change = if compile::template_hash(current, i) != compile::template_hash(next, j) {
        Change::Destructive
    } else if diff.is_empty() {
        Change::None
    } else {
        Change::InPlace
    };
    let canaries = match change {
        Change::Destructive if next.spec.type_ == JobType::Service => compile::update(next, j)
            .map_or(0, |update| update.canary)
            .min(after.count),
        _ => 0,
    };
    GroupPlan {
        name: after.name.clone(),
        change,
        count: (Some(before.count), Some(after.count)),
        canaries,
        diff,
    }
}

fn to_value(value: &impl serde::Serialize) -> Value {
    serde_json::to_value(value).expect("the Job types serialize to JSON")
}

/// The job's fields without its groups, which [`plan`] compares one by one.
fn job_fields(spec: &JobSpec) -> Value {
    let mut value = to_value(spec);
    if let Value::Object(map) = &mut value {
        map.remove("groups");
    }
    value
}

/// Every field that differs between two JSON values, by path.
pub fn diff(before: &Value, after: &Value) -> Vec<FieldDiff> {
    let mut out = Vec::new();
    diff_into("", before, after, &mut out);
    out
}

fn diff_into(path: &str, before: &Value, after: &Value, out: &mut Vec<FieldDiff>) {
    if before == after {
        return;
    }
    match (before, after) {
        (Value::Object(before), Value::Object(after)) => {
            let keys = before
                .keys()
                .chain(after.keys().filter(|k| !before.contains_key(*k)));
            for key in keys {
                let field = join(path, key);
                match (before.get(key), after.get(key)) {
                    (Some(b), Some(a)) => diff_into(&field, b, a, out),
                    (b, a) => out.push(FieldDiff {
                        field,
                        before: b.cloned(),
                        after: a.cloned(),
                    }),
                }
            }
        }
        (Value::Array(b), Value::Array(a)) if named(b) && named(a) => {
            let name = |v: &Value| v["name"].as_str().unwrap_or_default().to_owned();
            let find = |list: &[Value], n: &str| list.iter().find(|v| name(v) == n).cloned();
            let names = b
                .iter()
                .map(name)
                .chain(a.iter().map(name).filter(|n| find(b, n).is_none()));
            for n in names {
                let field = format!("{path}[{n}]");
                match (find(b, &n), find(a, &n)) {
                    (Some(b), Some(a)) => diff_into(&field, &b, &a, out),
                    (b, a) => out.push(FieldDiff {
                        field,
                        before: b,
                        after: a,
                    }),
                }
            }
        }
        (Value::Array(b), Value::Array(a)) if b.iter().chain(a).any(Value::is_object) => {
            for i in 0..b.len().max(a.len()) {
                let field = format!("{path}[{i}]");
                match (b.get(i), a.get(i)) {
                    (Some(b), Some(a)) => diff_into(&field, b, a, out),
                    (b, a) => out.push(FieldDiff {
                        field,
                        before: b.cloned(),
                        after: a.cloned(),
                    }),
                }
            }
        }
        _ => out.push(FieldDiff {
            field: path.to_owned(),
            before: Some(before.clone()),
            after: Some(after.clone()),
        }),
    }
}

/// A list whose entries all have a `name` (groups, tasks, ports, services).
fn named(list: &[Value]) -> bool {
    !list.is_empty() && list.iter().all(|v| v.get("name").is_some_and(Value::is_string))
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: serde_json::Value) -> JobSpec {
        serde_json::from_value(yaml).unwrap()
    }

    fn service() -> JobSpec {
        spec(serde_json::json!({
            "type": "service",
            "update": {"canary": 1},
            "groups": [
                {"name": "web", "count": 3, "tasks": [{"name": "server", "image": "web:1"}]},
                {"name": "api", "count": 2, "tasks": [{"name": "server", "image": "api:1"}]},
            ]
        }))
    }

    fn group<'a>(plan: &'a Plan, name: &str) -> &'a GroupPlan {
        plan.groups.iter().find(|g| g.name == name).unwrap()
    }

    #[test]
    fn a_new_job_creates_every_group() {
        let plan = plan(None, &service());
        assert!(plan.job.is_empty());
        assert_eq!(plan.groups.len(), 2);
        assert!(
            plan.groups
                .iter()
                .all(|g| g.change == Change::Create && g.canaries == 0)
        );
        assert_eq!(group(&plan, "web").count, (None, Some(3)));
    }

    #[test]
    fn the_same_spec_changes_nothing() {
        let plan = plan(Some(&service()), &service());
        assert!(plan.is_empty());
        assert!(plan.groups.iter().all(|g| g.change == Change::None));
    }

    #[test]
    fn a_count_change_is_in_place() {
        let mut next = service();
        next.groups[0].count = 5;
        let plan = plan(Some(&service()), &next);
        let web = group(&plan, "web");
        assert_eq!(web.change, Change::InPlace);
        assert_eq!(web.count, (Some(3), Some(5)));
        assert_eq!(web.canaries, 0);
        assert_eq!(web.diff[0].to_string(), "+/- count: 3 => 5");
        assert_eq!(group(&plan, "api").change, Change::None);
    }

    #[test]
    fn a_task_change_is_destructive_with_canaries() {
        let mut next = service();
        next.groups[1].tasks[0].image = "api:2".into();
        let plan = plan(Some(&service()), &next);
        let api = group(&plan, "api");
        assert_eq!(api.change, Change::Destructive);
        assert_eq!(api.canaries, 1);
        assert_eq!(
            api.diff[0].to_string(),
            r#"+/- tasks[server].image: "api:1" => "api:2""#
        );
        assert_eq!(group(&plan, "web").change, Change::None);
    }

    #[test]
    fn a_job_field_reaches_every_group() {
        let mut next = service();
        next.priority = 70;
        let plan = plan(Some(&service()), &next);
        assert_eq!(plan.job[0].to_string(), "+/- priority: 50 => 70");
        assert!(plan.groups.iter().all(|g| g.change == Change::Destructive));
    }

    #[test]
    fn update_and_promote_reach_no_pods() {
        let mut next = service();
        next.update.as_mut().unwrap().canary = Some(2);
        next.promote = Some(3);
        let plan = plan(Some(&service()), &next);
        assert_eq!(plan.job.len(), 2);
        assert!(plan.groups.iter().all(|g| g.change == Change::None));
    }

    #[test]
    fn groups_added_and_removed() {
        let mut next = service();
        let mut worker = next.groups.remove(1);
        worker.name = "worker".into();
        next.groups.push(worker);
        let plan = plan(Some(&service()), &next);
        assert_eq!(group(&plan, "worker").change, Change::Create);
        let api = group(&plan, "api");
        assert_eq!((api.change, api.count), (Change::Remove, (Some(2), None)));
        assert_eq!(plan.groups.last().unwrap().name, "api");
    }

    #[test]
    fn batch_groups_place_no_canaries() {
        let mut current = service();
        current.type_ = JobType::Batch;
        current.update = None;
        let mut next = current.clone();
        next.groups[0].tasks[0].args = vec!["--fast".into()];
        let plan = plan(Some(&current), &next);
        let web = group(&plan, "web");
        assert_eq!((web.change, web.canaries), (Change::Destructive, 0));
        assert_eq!(web.diff[0].to_string(), r#"+ tasks[server].args: ["--fast"]"#);
    }

    #[test]
    fn canaries_never_exceed_the_count() {
        let mut current = service();
        current.update.as_mut().unwrap().canary = Some(5);
        let mut next = current.clone();
        next.groups[1].tasks[0].image = "api:2".into();
        assert_eq!(group(&plan(Some(&current), &next), "api").canaries, 2);
    }

    #[test]
    fn lists_without_names_diff_by_index() {
        let before = serde_json::json!({"constraints": [{"attribute": "a", "value": "1"}]});
        let after =
            serde_json::json!({"constraints": [{"attribute": "a", "value": "2"}, {"attribute": "b"}]});
        let shown: Vec<String> = diff(&before, &after).iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                r#"+/- constraints[0].value: "1" => "2""#,
                r#"+ constraints[1]: {"attribute":"b"}"#
            ]
        );
    }
}
