//! Where a group's pods may and should go: datacenters, constraints, affinities, spreads,
//! distinct_hosts and distinct_property, compiled to node affinity, pod anti-affinity and
//! topology spread constraints, and evaluated directly for system and sysbatch groups.

use super::{CompileError, Nodes, Settings, group_at, labels};
use crate::attributes::{self, Predicate, glob_match, is_glob, label_value};
use capstan_crds::jobs::{Constraint, Job, JobType, Operator, Spread, TaskGroup};
use k8s_openapi::api::core::v1::{
    Affinity, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PodAffinityTerm,
    PodAntiAffinity, PodTemplateSpec, PreferredSchedulingTerm, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use std::collections::{BTreeMap, BTreeSet};

/// A group's placement, compiled against a snapshot of the nodes.
pub(super) struct Placement {
    required: Vec<NodeSelectorRequirement>,
    preferred: Vec<PreferredSchedulingTerm>,
    apart: Vec<PodAffinityTerm>,
    spread: Vec<TopologySpreadConstraint>,
    targeted: Option<Targeted>,
}

/// A spread with targets: the count is split by percent, each share pinned to its value.
struct Targeted {
    label: String,
    targets: Vec<(String, u32)>,
}

/// One share of the group: a target, or what no target claims.
pub(super) struct Set {
    pub suffix: Option<String>,
    pub percent: u32,
    pub pin: Option<NodeSelectorRequirement>,
}

/// A constraint that tests one node's label.
struct Rule {
    label: String,
    operator: Operator,
    value: Option<String>,
    predicate: Predicate,
}

impl Placement {
    pub fn of(job: &Job, g: usize, nodes: &Nodes, settings: &Settings) -> Result<Self, CompileError> {
        let group = group_at(job, g)?;
        let mut required = datacenters(job, nodes, settings).into_iter().collect::<Vec<_>>();
        let mut apart = Vec::new();
        for (field, constraint) in constraints(job, g, group) {
            match constraint.operator {
                Operator::DistinctHosts => {
                    if distinct_value(constraint, &field)?.is_some_and(|limit| limit == 0) {
                        continue;
                    }
                    apart.push(apart_term(job, group, &field, attributes::HOSTNAME));
                }
                Operator::DistinctProperty => {
                    let label = attribute(constraint.attribute.as_deref(), &field, settings)?;
                    match distinct_value(constraint, &field)? {
                        None | Some(1) => apart.push(apart_term(job, group, &field, &label)),
                        Some(n) => {
                            return Err(CompileError::new(
                                format!("{field}.value"),
                                format!(
                                    "distinct_property allows {n} allocations per value; Kubernetes' pod \
                                     anti-affinity allows exactly one, so only 1 (or no value) compiles"
                                ),
                            ));
                        }
                    }
                }
                _ => required.push(rule(constraint, field, settings)?.requirement(nodes)),
            }
        }
        let affinities = job
            .spec
            .affinities
            .iter()
            .enumerate()
            .map(|(i, a)| (format!("spec.affinities[{i}]"), a))
            .chain(
                group
                    .affinities
                    .iter()
                    .enumerate()
                    .map(|(i, a)| (format!("spec.groups[{g}].affinities[{i}]"), a)),
            );
        let mut preferred = Vec::new();
        for (field, affinity) in affinities {
            let constraint = Constraint {
                attribute: Some(affinity.attribute.clone()),
                operator: affinity.operator,
                value: affinity.value.clone(),
            };
            let requirement = rule(&constraint, field.clone(), settings)?.requirement(nodes);
            if affinity.weight == 0 {
                return Err(CompileError::new(format!("{field}.weight"), "may not be 0"));
            }
            let requirement = if affinity.weight < 0 {
                negate(requirement)
            } else {
                requirement
            };
            preferred.push(PreferredSchedulingTerm {
                weight: affinity.weight.abs().min(100),
                preference: NodeSelectorTerm {
                    match_expressions: Some(vec![requirement]),
                    ..Default::default()
                },
            });
        }
        let (spread, targeted) = spreads(job, g, group, settings)?;
        Ok(Self {
            required,
            preferred,
            apart,
            spread,
            targeted,
        })
    }

    /// The shares of the group: one, or one per spread target and one for the rest.
    pub fn sets(&self) -> Vec<Set> {
        let Some(targeted) = &self.targeted else {
            return vec![Set {
                suffix: None,
                percent: 100,
                pin: None,
            }];
        };
        let mut sets: Vec<Set> = targeted
            .targets
            .iter()
            .filter(|(_, percent)| *percent > 0)
            .map(|(value, percent)| Set {
                suffix: Some(suffix(value)),
                percent: *percent,
                pin: Some(requirement(&targeted.label, "In", vec![value.clone()])),
            })
            .collect();
        let claimed: u32 = targeted.targets.iter().map(|(_, p)| p).sum();
        if claimed < 100 {
            let values = targeted.targets.iter().map(|(v, _)| v.clone()).collect();
            sets.push(Set {
                suffix: Some("other".to_owned()),
                percent: 100 - claimed,
                pin: Some(requirement(&targeted.label, "NotIn", values)),
            });
        }
        sets
    }

    /// Writes the placement into `template`'s pod spec, with a set's pin and, for a
    /// sysbatch run, the node it is bound to.
    pub fn apply(
        &self,
        template: &mut PodTemplateSpec,
        pin: Option<&NodeSelectorRequirement>,
        node: Option<&str>,
    ) {
        let spec = template.spec.get_or_insert_with(Default::default);
        let mut required = self.required.clone();
        required.extend(pin.cloned());
        let required = (!required.is_empty() || node.is_some()).then(|| NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: (!required.is_empty()).then_some(required),
                // The DaemonSet controller binds pods to nodes the same way.
                match_fields: node.map(|n| vec![requirement("metadata.name", "In", vec![n.to_owned()])]),
            }],
        });
        let node_affinity = (required.is_some() || !self.preferred.is_empty()).then(|| NodeAffinity {
            required_during_scheduling_ignored_during_execution: required,
            preferred_during_scheduling_ignored_during_execution: (!self.preferred.is_empty())
                .then(|| self.preferred.clone()),
        });
        let pod_anti_affinity = (!self.apart.is_empty()).then(|| PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: Some(self.apart.clone()),
            ..Default::default()
        });
        spec.affinity = (node_affinity.is_some() || pod_anti_affinity.is_some()).then(|| Affinity {
            node_affinity,
            pod_anti_affinity,
            ..Default::default()
        });
        spec.topology_spread_constraints = (!self.spread.is_empty()).then(|| self.spread.clone());
    }
}

/// The nodes where group `g` may run: schedulable, in one of the job's datacenters, and
/// satisfying every constraint (distinct_hosts and distinct_property place allocations
/// apart and do not exclude a node).
pub(super) fn eligible(
    job: &Job,
    g: usize,
    nodes: &Nodes,
    settings: &Settings,
) -> Result<Vec<String>, CompileError> {
    let group = group_at(job, g)?;
    let rules = constraints(job, g, group)
        .filter(|(_, c)| !matches!(c.operator, Operator::DistinctHosts | Operator::DistinctProperty))
        .map(|(field, c)| rule(c, field, settings))
        .collect::<Result<Vec<_>, _>>()?;
    let any_dc = job.spec.datacenters.iter().any(|d| d == "*");
    Ok(nodes
        .iter()
        .filter(|node| node.schedulable)
        .filter(|node| {
            any_dc
                || node
                    .labels
                    .get(&settings.datacenter_label)
                    .is_some_and(|dc| job.spec.datacenters.iter().any(|p| glob_match(p, dc)))
        })
        .filter(|node| {
            rules
                .iter()
                .all(|r| r.predicate.matches(node.labels.get(&r.label).map(String::as_str)))
        })
        .map(|node| node.name.clone())
        .collect())
}

/// The job's constraints, then the group's, each with its field path.
fn constraints<'a>(
    job: &'a Job,
    g: usize,
    group: &'a TaskGroup,
) -> impl Iterator<Item = (String, &'a Constraint)> {
    let job_level = job
        .spec
        .constraints
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("spec.constraints[{i}]"), c));
    let group_level = group
        .constraints
        .iter()
        .enumerate()
        .map(move |(i, c)| (format!("spec.groups[{g}].constraints[{i}]"), c));
    job_level.chain(group_level)
}

/// `datacenters` as a requirement on the datacenter label: none for `*`, `In` over the
/// names, with globs evaluated against the nodes' datacenters.
fn datacenters(job: &Job, nodes: &Nodes, settings: &Settings) -> Option<NodeSelectorRequirement> {
    let patterns = &job.spec.datacenters;
    if patterns.is_empty() || patterns.iter().any(|p| p == "*") {
        return None;
    }
    let label = &settings.datacenter_label;
    let mut values: BTreeSet<String> = patterns.iter().filter(|p| !is_glob(p)).cloned().collect();
    let globs: Vec<&String> = patterns.iter().filter(|p| is_glob(p)).collect();
    if !globs.is_empty() {
        values.extend(
            nodes
                .iter()
                .filter_map(|n| n.labels.get(label))
                .filter(|dc| globs.iter().any(|p| glob_match(p, dc)))
                .cloned(),
        );
    }
    Some(if values.is_empty() {
        no_node()
    } else {
        requirement(label, "In", values.into_iter().collect())
    })
}

fn attribute(attribute: Option<&str>, field: &str, settings: &Settings) -> Result<String, CompileError> {
    let attribute = attribute
        .ok_or_else(|| CompileError::new(format!("{field}.attribute"), "required by this operator"))?;
    attributes::node_label(attribute, &settings.datacenter_label)
        .map_err(|e| CompileError::new(format!("{field}.attribute"), e.0))
}

fn rule(constraint: &Constraint, field: String, settings: &Settings) -> Result<Rule, CompileError> {
    let label = attribute(constraint.attribute.as_deref(), &field, settings)?;
    let value = constraint.value.clone();
    if value.as_deref().is_some_and(|v| v.contains("${")) {
        return Err(CompileError::new(
            format!("{field}.value"),
            "a value is a literal: comparing two node attributes has no Kubernetes form",
        ));
    }
    if matches!(constraint.operator, Operator::Equal | Operator::NotEqual)
        && let Some(v) = &value
    {
        label_value(v).map_err(|e| CompileError::new(format!("{field}.value"), e.0))?;
    }
    let predicate = Predicate::new(constraint.operator, value.as_deref()).map_err(|e| {
        let at = if constraint.operator.as_str().starts_with("distinct") {
            "operator"
        } else {
            "value"
        };
        CompileError::new(format!("{field}.{at}"), e.0)
    })?;
    Ok(Rule {
        label,
        operator: constraint.operator,
        value,
        predicate,
    })
}

impl Rule {
    /// The rule as a node selector requirement: Kubernetes' own operator where one
    /// means the same, otherwise `In` over the label values of the nodes that match.
    fn requirement(&self, nodes: &Nodes) -> NodeSelectorRequirement {
        let value = || vec![self.value.clone().unwrap_or_default()];
        match self.operator {
            Operator::Equal => requirement(&self.label, "In", value()),
            Operator::NotEqual => requirement(&self.label, "NotIn", value()),
            Operator::IsSet => requirement(&self.label, "Exists", Vec::new()),
            Operator::IsNotSet => requirement(&self.label, "DoesNotExist", Vec::new()),
            _ => {
                let values: BTreeSet<&String> = nodes
                    .iter()
                    .filter_map(|n| n.labels.get(&self.label))
                    .filter(|v| self.predicate.matches(Some(v)))
                    .collect();
                if values.is_empty() {
                    no_node()
                } else {
                    requirement(&self.label, "In", values.into_iter().cloned().collect())
                }
            }
        }
    }
}

/// distinct_hosts' and distinct_property's value: None when unset, else the limit
/// (distinct_hosts reads `true`/`false` as 1/0).
fn distinct_value(constraint: &Constraint, field: &str) -> Result<Option<u32>, CompileError> {
    let Some(value) = constraint.value.as_deref().map(str::trim) else {
        return Ok(None);
    };
    let parsed = match (constraint.operator, value) {
        (Operator::DistinctHosts, "true") => Some(1),
        (Operator::DistinctHosts, "false") => Some(0),
        (Operator::DistinctProperty, n) => n.parse::<u32>().ok().filter(|n| *n > 0),
        _ => None,
    };
    parsed.map(Some).ok_or_else(|| {
        CompileError::new(
            format!("{field}.value"),
            match constraint.operator {
                Operator::DistinctHosts => format!("{value:?}: distinct_hosts takes true or false"),
                _ => format!("{value:?}: distinct_property takes a count of at least 1"),
            },
        )
    })
}

/// No two pods of the group (of the job, for a job-level constraint) on one value of
/// `label`.
fn apart_term(job: &Job, group: &TaskGroup, field: &str, label: &str) -> PodAffinityTerm {
    let name = job.metadata.name.as_deref().unwrap_or_default();
    let selector = if field.starts_with("spec.groups[") {
        labels::selector(name, &group.name)
    } else {
        BTreeMap::from([(labels::JOB.to_owned(), name.to_owned())])
    };
    PodAffinityTerm {
        label_selector: Some(LabelSelector {
            match_labels: Some(selector),
            ..Default::default()
        }),
        topology_key: label.to_owned(),
        ..Default::default()
    }
}

/// Spreads without targets as topology spread constraints; at most one spread with
/// targets, which splits the count.
fn spreads(
    job: &Job,
    g: usize,
    group: &TaskGroup,
    settings: &Settings,
) -> Result<(Vec<TopologySpreadConstraint>, Option<Targeted>), CompileError> {
    let all: Vec<(String, &Spread)> = job
        .spec
        .spreads
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("spec.spreads[{i}]"), s))
        .chain(
            group
                .spreads
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("spec.groups[{g}].spreads[{i}]"), s)),
        )
        .collect();
    if let Some((field, _)) = all.first()
        && matches!(job.spec.type_, JobType::System | JobType::Sysbatch)
    {
        return Err(CompileError::new(
            field.clone(),
            "a system or sysbatch job runs once on every eligible node: there is nothing to spread",
        ));
    }
    let name = job.metadata.name.as_deref().unwrap_or_default();
    let mut constraints = Vec::new();
    let mut targeted: Option<Targeted> = None;
    for (field, spread) in all {
        let label = attribute(Some(&spread.attribute), &field, settings)?;
        if spread.targets.is_empty() {
            constraints.push(TopologySpreadConstraint {
                max_skew: 1,
                topology_key: label,
                when_unsatisfiable: "ScheduleAnyway".to_owned(),
                label_selector: Some(LabelSelector {
                    match_labels: Some(labels::selector(name, &group.name)),
                    ..Default::default()
                }),
                ..Default::default()
            });
            continue;
        }
        if targeted.is_some() {
            return Err(CompileError::new(
                format!("{field}.targets"),
                "a group's count can be split by the targets of one spread only",
            ));
        }
        if matches!(job.spec.type_, JobType::Batch) {
            return Err(CompileError::new(
                format!("{field}.targets"),
                "spread targets split a service group into pinned shares; a batch group runs as one \
                 batch/v1 Job (use a spread without targets)",
            ));
        }
        let mut targets = Vec::new();
        let mut sum = 0;
        for (i, target) in spread.targets.iter().enumerate() {
            label_value(&target.value)
                .map_err(|e| CompileError::new(format!("{field}.targets[{i}].value"), e.0))?;
            let percent = u32::try_from(target.percent).unwrap_or(0);
            sum += percent;
            targets.push((target.value.clone(), percent));
        }
        if sum > 100 {
            return Err(CompileError::new(
                format!("{field}.targets"),
                "the percents add up to more than 100",
            ));
        }
        targeted = Some(Targeted { label, targets });
    }
    Ok((constraints, targeted))
}

fn requirement(key: &str, operator: &str, values: Vec<String>) -> NodeSelectorRequirement {
    NodeSelectorRequirement {
        key: key.to_owned(),
        operator: operator.to_owned(),
        values: (!values.is_empty()).then_some(values),
    }
}

/// A requirement no node meets: no node carries [`labels::NO_NODE`].
fn no_node() -> NodeSelectorRequirement {
    requirement(labels::NO_NODE, "Exists", Vec::new())
}

/// The requirement a node meets exactly when it does not meet `r` (for a negative
/// affinity's preference).
fn negate(mut r: NodeSelectorRequirement) -> NodeSelectorRequirement {
    r.operator = match r.operator.as_str() {
        "In" => "NotIn",
        "NotIn" => "In",
        "Exists" => "DoesNotExist",
        _ => "Exists",
    }
    .to_owned();
    r
}

/// A spread target's value as a name part: lowercase alphanumerics and `-`.
fn suffix(value: &str) -> String {
    let s: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s.trim_matches('-').chars().take(20).collect()
}
