//! The jobspec tree → the Job. Each function takes out of its block what it translates;
//! [`Mapper::rest`] reports whatever is left, with a reason for the blocks Nomad users
//! will look for.

use crate::duration;
use crate::hcl::Read;
use crate::tree::{Attr, Block, Place};
use crate::{Conversion, Error, Note, Options, Result, Untranslated};
use capstan_crds::jobs::{
    Affinity, Check, CheckType, Connect, Constraint, DispatchPayload, HealthCheck, Job, JobSpec, JobType,
    Lifecycle, LifecycleHook, Operator, Parameterized, PayloadRule, Periodic, Port, PortProtocol,
    ReschedulePolicy, Resources, RestartMode, RestartPolicy, Service, Spread, SpreadTarget, Task, TaskGroup,
    Template, UpdateStrategy, Upstream, Vault,
};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// Where Nomad's dynamic ports without a `to` are numbered from in the pod (the start of
/// Nomad's own dynamic range): the task reads its port from `NOMAD_PORT_<label>` either way.
const DYNAMIC_PORT_BASE: i32 = 20000;

pub fn job(read: Read, options: &Options) -> Result<Conversion> {
    let mut m = Mapper {
        untranslated: read.untranslated,
        notes: Vec::new(),
        cpu_noted: false,
        exec_image: options.exec_image.clone(),
    };
    let mut b = read.job;
    let raw_name = options
        .name
        .clone()
        .or_else(|| b.label.clone())
        .ok_or_else(|| Error::Invalid {
            block: b.path.clone(),
            line: b.line,
            message: "the job has no name (job \"NAME\" { ... }, or give one)".into(),
        })?;
    let name = m.label(&raw_name, 40, b.place(), "job name");
    let type_ = match m.string(&mut b, "type").as_deref() {
        None | Some("service") => JobType::Service,
        Some("batch") => JobType::Batch,
        Some("system") => JobType::System,
        Some("sysbatch") => JobType::Sysbatch,
        Some(other) => {
            return Err(Error::Invalid {
                block: b.at("type").path,
                line: b.line,
                message: format!("{other:?} is not a job type (service, batch, system or sysbatch)"),
            });
        }
    };
    let mut spec = JobSpec {
        type_,
        priority: 50,
        datacenters: vec!["*".into()],
        constraints: Vec::new(),
        affinities: Vec::new(),
        spreads: Vec::new(),
        update: None,
        periodic: None,
        parameterized: None,
        dispatch: None,
        promote: None,
        meta: BTreeMap::new(),
        groups: Vec::new(),
    };
    if let Some(attr) = b.take("priority") {
        match int(&attr.value) {
            Some(p) if (1..=100).contains(&p) => spec.priority = p as i32,
            Some(p) => {
                spec.priority = p.clamp(1, 100) as i32;
                m.note(
                    attr.place(),
                    format!("priority {p} is outside 1-100: {} instead", spec.priority),
                );
            }
            None => m.skip(attr.place(), "not a whole number"),
        }
    }
    if let Some(datacenters) = m.list(&mut b, "datacenters") {
        spec.datacenters = datacenters;
    }
    let mut namespace = options.namespace.clone();
    if let Some(attr) = b.take("namespace") {
        match (&namespace, string(&attr.value)) {
            (Some(given), Some(ns)) if *given != ns => {
                m.note(
                    attr.place(),
                    format!("namespace {ns:?}: the Job goes to {given:?} as asked"),
                );
            }
            (None, Some(ns)) => {
                let ns = m.label(&ns, 63, attr.place(), "namespace");
                m.note(
                    attr.place(),
                    format!("namespace: the Job's own Kubernetes namespace, {ns:?}"),
                );
                namespace = Some(ns);
            }
            _ => {}
        }
    }
    if let Some(attr) = b.take("region") {
        // "global" is Nomad's default region: what a Kubernetes cluster is anyway.
        if string(&attr.value).as_deref() != Some("global") {
            m.skip(attr.place(), reason("region"));
        }
    }
    spec.meta = m.meta(&mut b);
    spec.constraints = m.constraints(&mut b);
    spec.affinities = m.affinities(&mut b);
    spec.spreads = m.spreads(&mut b);
    let system = matches!(type_, JobType::System | JobType::Sysbatch);
    if let Some(update) = b.take_block("update") {
        if matches!(type_, JobType::Service | JobType::System) {
            spec.update = Some(m.update(update, system));
        } else {
            m.skip(
                update.place(),
                "only service and system jobs have an update strategy",
            );
        }
    }
    if let Some(periodic) = b.take_block("periodic") {
        if matches!(type_, JobType::Batch | JobType::Sysbatch) {
            spec.periodic = Some(m.periodic(periodic)?);
        } else {
            m.skip(periodic.place(), "only batch and sysbatch jobs can be periodic");
        }
    }
    if let Some(parameterized) = b.take_block("parameterized") {
        if matches!(type_, JobType::Batch | JobType::Sysbatch) {
            spec.parameterized = Some(m.parameterized(parameterized));
        } else {
            m.skip(
                parameterized.place(),
                "only batch and sysbatch jobs can be parameterized",
            );
        }
    }
    let defaults = GroupDefaults {
        job: name.clone(),
        system,
        reschedule: b.take_block("reschedule").map(|r| m.reschedule(r)),
        vault: b.take_block("vault"),
    };
    let mut services = BTreeSet::new();
    for group in b.take_blocks("group") {
        if let Some(group) = m.group(group, &defaults, &mut services) {
            spec.groups.push(group);
        }
    }
    if spec.groups.is_empty() {
        let why = m
            .untranslated
            .iter()
            .find(|u| u.block.contains("task") || u.block.contains("Tasks"))
            .map(|u| format!(": {} ({})", u.reason, u.block))
            .unwrap_or_default();
        return Err(Error::Invalid {
            block: b.path.clone(),
            line: b.line,
            message: format!("no group has a task Capstan can run{why}"),
        });
    }
    m.rest(b);
    let mut job = Job::new(&name, spec);
    job.metadata.namespace = namespace;
    Ok(Conversion {
        job,
        untranslated: m.untranslated,
        notes: m.notes,
    })
}

/// What every group takes from the job.
struct GroupDefaults {
    job: String,
    /// A system or sysbatch job: one allocation per node, no canaries.
    system: bool,
    reschedule: Option<ReschedulePolicy>,
    vault: Option<Block>,
}

/// A task as the group takes it.
struct MappedTask {
    task: Task,
    /// The port labels its driver config names (`config.ports`).
    used: Vec<String>,
    /// Its templates: the group keeps them only with a vault block.
    templates: Vec<(Template, Place)>,
}

struct Mapper {
    untranslated: Vec<Untranslated>,
    notes: Vec<Note>,
    /// The MHz → millicores note is given once.
    cpu_noted: bool,
    /// The image exec tasks' commands run in, when asked ([`Options::exec_image`]).
    exec_image: Option<String>,
}

/// Why a block or attribute Nomad users rely on is not translated.
fn reason(name: &str) -> &'static str {
    match name {
        "artifact" => {
            "Capstan fetches no artifacts: build the files into the image, or fetch them in a prestart task"
        }
        "logs" => "container logs are the kubelet's (its rotation settings apply)",
        "ephemeral_disk" => {
            "Kubernetes gives each container its own writable layer; use an emptyDir for shared scratch space"
        }
        "volume" | "volume_mount" | "csi_plugin" => {
            "volumes are not part of Capstan's Job: mount them through a PersistentVolumeClaim on the compiled pods"
        }
        "region" => "a Kubernetes cluster is one region: apply the Job to each cluster",
        "node_pool" => {
            "Capstan places by datacenters, constraints and affinities: write the pool as a constraint on a node label"
        }
        "multiregion" => "a Kubernetes cluster is one region",
        "migrate" => "node drains are Kubernetes' (PodDisruptionBudgets)",
        "scaling" => "autoscaling is Kubernetes' own (a HorizontalPodAutoscaler)",
        "user" => "the user a container runs as is the image's (or the pod's securityContext)",
        "kill_signal" => "Kubernetes stops containers with SIGTERM (the image's STOPSIGNAL)",
        "shutdown_delay" => "no delay between deregistration and the stop signal: use a preStop hook",
        "leader" => "Kubernetes has no leader task: every container of a pod stops together",
        "identity" => "workload identity is the pod's ServiceAccount token",
        "consul" => "Capstan's mesh and Services replace Consul",
        "sidecar_task" => "Capstan's mesh injects its own sidecar",
        "gateway" => "Consul gateways have no Capstan equivalent",
        "native" => "Consul Connect native integration has no Capstan equivalent",
        "disk" | "iops" => "Kubernetes does not reserve disk (ephemeral-storage is not set)",
        "network" => "task-level networks are deprecated in Nomad: declare ports in the group's network",
        "device" => "device requests (GPUs) have no field in Capstan's Job",
        "mbits" => "Kubernetes does not reserve bandwidth",
        "dns" | "hostname" => "a pod's DNS is the cluster's",
        "all_at_once" => "Kubernetes places pods one by one",
        "ui" => "Nomad's web UI presentation: kubectl get cjob and capstan job status show the Job",
        "max_run_duration" => {
            "no run deadline on a Job's tasks (a batch/v1 Job's activeDeadlineSeconds is not set)"
        }
        "dynamic" => "dynamic blocks are not expanded: write the blocks out",
        "meta" => "task meta has no place in the Job (group meta is given to every task)",
        _ => "no Capstan equivalent",
    }
}

/// A scalar as a string.
fn string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn boolean(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A list of scalars (a single scalar is a list of one, as HCL's `datacenters = "dc1"`).
fn strings(value: &Value) -> Option<Vec<String>> {
    match value {
        Value::Array(items) => items.iter().map(string).collect(),
        other => string(other).map(|s| vec![s]),
    }
}

/// A name as a DNS label: lowercase, `_` and other characters → `-`, at most `max`.
fn dns_label(raw: &str, max: usize) -> String {
    let mut label: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    label.truncate(max);
    let label = label.trim_matches('-').to_owned();
    if label.is_empty() { "x".into() } else { label }
}

/// A whole number in `range`, as i32.
fn bounded(value: &Value, range: std::ops::RangeInclusive<i64>) -> Result<i32, String> {
    match int(value) {
        Some(n) if range.contains(&n) => Ok(n as i32),
        Some(n) => Err(format!("{n} is outside {}-{}", range.start(), range.end())),
        None => Err(format!("{value} is not a whole number")),
    }
}

impl Mapper {
    fn skip(&mut self, place: Place, reason: impl Into<String>) {
        self.untranslated.push(Untranslated {
            block: place.path,
            line: place.line,
            reason: reason.into(),
        });
    }

    fn note(&mut self, place: Place, message: impl Into<String>) {
        self.notes.push(Note {
            block: place.path,
            line: place.line,
            message: message.into(),
        });
    }

    /// Reports everything left in `block`.
    fn rest(&mut self, block: Block) {
        for (name, place) in block.leftovers() {
            self.skip(place, reason(&name));
        }
    }

    /// `raw` as a DNS label of at most `max` characters, noting a change.
    fn label(&mut self, raw: &str, max: usize, place: Place, what: &str) -> String {
        let label = dns_label(raw, max);
        if label != raw {
            self.note(
                place,
                format!("{what} {raw:?} is {label:?} (a DNS label of at most {max} characters)"),
            );
        }
        label
    }

    /// Takes an attribute and reads it, reporting it when it does not read.
    fn read<T>(
        &mut self,
        b: &mut Block,
        name: &str,
        read: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<T> {
        let attr = b.take(name)?;
        match read(&attr.value) {
            Ok(v) => Some(v),
            Err(why) => {
                self.skip(attr.place(), why);
                None
            }
        }
    }

    fn string(&mut self, b: &mut Block, name: &str) -> Option<String> {
        self.read(b, name, |v| {
            string(v).ok_or_else(|| format!("{v} is not a string"))
        })
    }

    fn boolean(&mut self, b: &mut Block, name: &str) -> Option<bool> {
        self.read(b, name, |v| {
            boolean(v).ok_or_else(|| format!("{v} is not a bool"))
        })
    }

    fn list(&mut self, b: &mut Block, name: &str) -> Option<Vec<String>> {
        self.read(b, name, |v| {
            strings(v).ok_or_else(|| format!("{v} is not a list of strings"))
        })
    }

    fn bounded(&mut self, b: &mut Block, name: &str, range: std::ops::RangeInclusive<i64>) -> Option<i32> {
        self.read(b, name, |v| bounded(v, range))
    }

    fn duration(&mut self, b: &mut Block, name: &str) -> Option<String> {
        self.read(b, name, duration::read)
    }

    /// A map of strings, given as an attribute (`meta = {...}`, JSON) or as blocks of
    /// attributes (`meta { ... }`).
    fn map(&mut self, b: &mut Block, name: &str) -> Vec<(String, String, Place)> {
        let mut out = Vec::new();
        let mut attrs: Vec<Attr> = Vec::new();
        if let Some(attr) = b.take(name) {
            match attr.value {
                Value::Object(map) => attrs.extend(map.into_iter().map(|(k, value)| Attr {
                    path: format!("{}.{k}", attr.path),
                    name: k,
                    value,
                    line: attr.line,
                })),
                _ => self.skip(attr.place(), "expected a map"),
            }
        }
        for mut block in b.take_blocks(name) {
            attrs.append(&mut block.attrs);
            self.rest(block);
        }
        for attr in attrs {
            match string(&attr.value) {
                Some(value) => out.push((attr.name.clone(), value, attr.place())),
                None if attr.value.is_null() => {}
                None => self.skip(attr.place(), "expected a string"),
            }
        }
        out
    }

    /// `meta`, each key usable as `NOMAD_META_<key>`.
    fn meta(&mut self, b: &mut Block) -> BTreeMap<String, String> {
        let mut meta = BTreeMap::new();
        for (key, value, place) in self.map(b, "meta") {
            let mut chars = key.chars();
            let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if valid {
                meta.insert(key, value);
            } else {
                self.skip(place, "a meta key is a letter or '_', then letters, digits, '_', '.' or '-' (it becomes NOMAD_META_<key>)");
            }
        }
        meta
    }

    fn operator(&mut self, b: &mut Block) -> Option<Operator> {
        let attr = b.take("operator")?;
        let parsed =
            string(&attr.value).and_then(|op| serde_json::from_value::<Operator>(Value::String(op)).ok());
        if parsed.is_none() {
            self.skip(
                attr.place(),
                format!("{} is not one of Nomad's operators", attr.value),
            );
        }
        parsed
    }

    fn constraints(&mut self, b: &mut Block) -> Vec<Constraint> {
        let mut out = Vec::new();
        for mut c in b.take_blocks("constraint") {
            let mut constraint = Constraint {
                attribute: self.string(&mut c, "attribute"),
                operator: Operator::Equal,
                value: self.string(&mut c, "value"),
            };
            if c.attrs.iter().any(|a| a.name == "operator") {
                match self.operator(&mut c) {
                    Some(op) => constraint.operator = op,
                    None => continue,
                }
            }
            // The shorthands: `distinct_hosts = true`, `distinct_property = "${meta.rack}"`,
            // `regexp = "..."` and the other operators as attributes.
            if let Some(on) = self.boolean(&mut c, "distinct_hosts") {
                if !on {
                    self.rest(c);
                    continue;
                }
                constraint.operator = Operator::DistinctHosts;
            }
            if let Some(property) = self.string(&mut c, "distinct_property") {
                constraint.operator = Operator::DistinctProperty;
                constraint.attribute = Some(property);
            }
            for (name, op) in [
                ("regexp", Operator::Regexp),
                ("version", Operator::Version),
                ("semver", Operator::Semver),
                ("set_contains", Operator::SetContains),
                ("set_contains_all", Operator::SetContains),
                ("set_contains_any", Operator::SetContainsAny),
            ] {
                if let Some(value) = self.string(&mut c, name) {
                    constraint.operator = op;
                    constraint.value = Some(value);
                }
            }
            if constraint.operator == Operator::DistinctHosts {
                // Nomad writes `value = "true"` for it; the Job's distinct_hosts has none.
                constraint.value = None;
                constraint.attribute = None;
            }
            self.rest(c);
            out.push(constraint);
        }
        out
    }

    fn affinities(&mut self, b: &mut Block) -> Vec<Affinity> {
        let mut out = Vec::new();
        for mut a in b.take_blocks("affinity") {
            let place = a.place();
            let Some(attribute) = self.string(&mut a, "attribute") else {
                self.skip(place, "an affinity needs an attribute");
                self.rest(a);
                continue;
            };
            let mut affinity = Affinity {
                attribute,
                operator: Operator::Equal,
                value: self.string(&mut a, "value"),
                weight: 50,
            };
            if a.attrs.iter().any(|x| x.name == "operator") {
                match self.operator(&mut a) {
                    Some(op) => affinity.operator = op,
                    None => {
                        self.rest(a);
                        continue;
                    }
                }
            }
            if let Some(weight) = self.read(&mut a, "weight", |v| {
                bounded(v, -100..=100).and_then(|w| {
                    if w == 0 {
                        Err("a weight of 0 means nothing".into())
                    } else {
                        Ok(w)
                    }
                })
            }) {
                affinity.weight = weight;
            }
            self.rest(a);
            out.push(affinity);
        }
        out
    }

    fn spreads(&mut self, b: &mut Block) -> Vec<Spread> {
        let mut out = Vec::new();
        for mut s in b.take_blocks("spread") {
            let place = s.place();
            let Some(attribute) = self.string(&mut s, "attribute") else {
                self.skip(place, "a spread needs an attribute");
                self.rest(s);
                continue;
            };
            let weight = self.bounded(&mut s, "weight", 1..=100).unwrap_or(50);
            let mut targets = Vec::new();
            for mut t in s.take_blocks("target") {
                let value = self.string(&mut t, "value").or_else(|| t.label.clone());
                let percent = self.bounded(&mut t, "percent", 0..=100);
                match (value, percent) {
                    (Some(value), Some(percent)) => targets.push(SpreadTarget { value, percent }),
                    _ => self.skip(t.place(), "a spread target needs a value and a percent"),
                }
                self.rest(t);
            }
            self.rest(s);
            out.push(Spread {
                attribute,
                weight,
                targets,
            });
        }
        out
    }

    /// An update block; a system job's has no canaries (Nomad's are a percentage of the
    /// nodes there, which a DaemonSet cannot hold back).
    fn update(&mut self, mut u: Block, system: bool) -> UpdateStrategy {
        if system
            && let Some(attr) = u.take("canary")
            && int(&attr.value) != Some(0)
        {
            self.skip(attr.place(), "a system job's canaries (a percentage of its nodes) have no Capstan equivalent: it updates node by node");
        }
        let update = UpdateStrategy {
            max_parallel: self.bounded(&mut u, "max_parallel", 0..=1000),
            health_check: self.read(&mut u, "health_check", |v| match string(v).as_deref() {
                Some("checks") => Ok(HealthCheck::Checks),
                Some("task_states") => Ok(HealthCheck::TaskStates),
                Some("manual") => Ok(HealthCheck::Manual),
                _ => Err(format!("{v} is not checks, task_states or manual")),
            }),
            min_healthy_time: self.duration(&mut u, "min_healthy_time"),
            healthy_deadline: self.duration(&mut u, "healthy_deadline"),
            progress_deadline: self.duration(&mut u, "progress_deadline"),
            canary: self.bounded(&mut u, "canary", 0..=1000),
            auto_promote: self.boolean(&mut u, "auto_promote"),
            auto_revert: self.boolean(&mut u, "auto_revert"),
            stagger: self.duration(&mut u, "stagger"),
        };
        self.rest(u);
        update
    }

    fn periodic(&mut self, mut p: Block) -> Result<Periodic> {
        let place = p.place();
        let mut given = Vec::new();
        for name in ["cron", "crons"] {
            if let Some(attr) = p.take(name) {
                match strings(&attr.value) {
                    Some(list) => given.extend(list.into_iter().map(|c| (c, attr.place()))),
                    None => self.skip(attr.place(), "expected cron expressions"),
                }
            }
        }
        if let Some(attr) = p.take("spec_type")
            && string(&attr.value).as_deref() != Some("cron")
        {
            self.skip(attr.place(), "only cron schedules");
        }
        let mut crons = Vec::new();
        for (cron, at) in given {
            match five_fields(&cron) {
                Ok(five) => {
                    if five != cron {
                        self.note(
                            at,
                            format!(
                                "cron {cron:?} is {five:?}: a CronJob's schedule has no seconds or years"
                            ),
                        );
                    }
                    crons.push(five);
                }
                Err(why) => self.skip(at, why),
            }
        }
        if crons.is_empty() {
            return Err(Error::Invalid {
                block: place.path,
                line: place.line,
                message: "a periodic job needs a cron expression Capstan can run (and would otherwise run once, now)".into(),
            });
        }
        let periodic = Periodic {
            crons,
            time_zone: self.string(&mut p, "time_zone"),
            prohibit_overlap: self.boolean(&mut p, "prohibit_overlap").unwrap_or(false),
            enabled: self.boolean(&mut p, "enabled").unwrap_or(true),
        };
        self.rest(p);
        Ok(periodic)
    }

    fn parameterized(&mut self, mut p: Block) -> Parameterized {
        let parameterized = Parameterized {
            payload: self
                .read(&mut p, "payload", |v| match string(v).as_deref() {
                    Some("optional") => Ok(PayloadRule::Optional),
                    Some("required") => Ok(PayloadRule::Required),
                    Some("forbidden") => Ok(PayloadRule::Forbidden),
                    _ => Err(format!("{v} is not optional, required or forbidden")),
                })
                .unwrap_or_default(),
            meta_required: self.list(&mut p, "meta_required").unwrap_or_default(),
            meta_optional: self.list(&mut p, "meta_optional").unwrap_or_default(),
        };
        self.rest(p);
        parameterized
    }

    fn restart(&mut self, mut r: Block) -> RestartPolicy {
        let restart = RestartPolicy {
            attempts: self.bounded(&mut r, "attempts", 0..=1000),
            interval: self.duration(&mut r, "interval"),
            delay: self.duration(&mut r, "delay"),
            mode: self.read(&mut r, "mode", |v| match string(v).as_deref() {
                Some("fail") => Ok(RestartMode::Fail),
                Some("delay") => Ok(RestartMode::Delay),
                _ => Err(format!("{v} is not fail or delay")),
            }),
        };
        self.rest(r);
        restart
    }

    fn reschedule(&mut self, mut r: Block) -> ReschedulePolicy {
        let reschedule = ReschedulePolicy {
            attempts: self.bounded(&mut r, "attempts", 0..=1000),
            interval: self.duration(&mut r, "interval"),
            delay: self.duration(&mut r, "delay"),
            delay_function: self.read(&mut r, "delay_function", |v| match string(v) {
                Some(f) if matches!(f.as_str(), "constant" | "exponential" | "fibonacci") => Ok(f),
                _ => Err(format!("{v} is not constant, exponential or fibonacci")),
            }),
            max_delay: self.duration(&mut r, "max_delay"),
            unlimited: self.boolean(&mut r, "unlimited"),
        };
        self.rest(r);
        reschedule
    }

    fn vault(&mut self, mut v: Block, job: &str) -> Vault {
        let place = v.place();
        let policies = self.list(&mut v, "policies").unwrap_or_default();
        let role = match self.string(&mut v, "role") {
            Some(role) => role,
            None => {
                let role: String = job
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                self.note(
                    place,
                    format!(
                        "vault: no role, so the engine's Kubernetes auth role {role:?}: create it with the policies [{}]",
                        policies.join(", ")
                    ),
                );
                role
            }
        };
        self.rest(v);
        Vault {
            role,
            service_account: None,
            policies,
        }
    }

    fn group(
        &mut self,
        mut g: Block,
        defaults: &GroupDefaults,
        services_seen: &mut BTreeSet<String>,
    ) -> Option<TaskGroup> {
        let raw = g.label.clone().unwrap_or_else(|| defaults.job.clone());
        let name = self.label(&raw, 20, g.place(), "group name");
        let count = self.bounded(&mut g, "count", 0..=10000).unwrap_or(1);
        let mut group = TaskGroup {
            name: name.clone(),
            count,
            constraints: self.constraints(&mut g),
            affinities: self.affinities(&mut g),
            spreads: self.spreads(&mut g),
            tasks: Vec::new(),
            restart: g.take_block("restart").map(|r| self.restart(r)),
            reschedule: g
                .take_block("reschedule")
                .map(|r| self.reschedule(r))
                .or_else(|| defaults.reschedule.clone()),
            update: g.take_block("update").map(|u| self.update(u, defaults.system)),
            services: Vec::new(),
            connect: None,
            vault: None,
            meta: self.meta(&mut g),
        };
        let mut vault = g.take_block("vault").or_else(|| defaults.vault.clone());

        // Ports: the group's network, numbered in the pod; attached to tasks below.
        let mut ports: Vec<(String, Port, Place)> = Vec::new();
        let mut renamed: BTreeMap<String, String> = BTreeMap::new();
        for mut network in g.take_blocks("network") {
            if let Some(attr) = network.take("mode")
                && !matches!(string(&attr.value).as_deref(), Some("bridge" | "host"))
            {
                self.skip(
                    attr.place(),
                    "every pod has its own network namespace: only bridge and host modes read as it",
                );
            }
            for mut p in network.take_blocks("port") {
                let Some(raw) = p.label.clone() else {
                    self.skip(p.place(), "a port needs a label");
                    continue;
                };
                let port_name = self.label(&raw, 15, p.place(), "port");
                let to = self.bounded(&mut p, "to", -1..=65535).filter(|&n| n > 0);
                let fixed = self.bounded(&mut p, "static", 0..=65535).filter(|&n| n > 0);
                if let Some(attr) = p.take("host_network")
                    && string(&attr.value).as_deref() != Some("default")
                {
                    self.skip(
                        attr.place(),
                        "pods are reached on the cluster network: there are no host networks to choose",
                    );
                }
                let number = match (to, fixed) {
                    (Some(to), Some(fixed)) => {
                        self.note(
                            p.place(),
                            format!(
                                "static port {fixed}: pods are reached through their Service, not a host port"
                            ),
                        );
                        to
                    }
                    (Some(n), None) | (None, Some(n)) => n,
                    (None, None) => {
                        let n = DYNAMIC_PORT_BASE + i32::try_from(ports.len()).unwrap_or(0);
                        self.note(
                            p.place(),
                            format!("dynamic port {raw:?} listens on {n} in the pod (NOMAD_PORT_{raw})"),
                        );
                        n
                    }
                };
                renamed.insert(raw.clone(), port_name.clone());
                let place = p.place();
                self.rest(p);
                ports.push((
                    raw,
                    Port {
                        name: port_name,
                        port: number,
                        protocol: PortProtocol::TCP,
                    },
                    place,
                ));
            }
            self.rest(network);
        }

        // Tasks, with what they hoist to the group.
        let mut uses: Vec<Vec<String>> = Vec::new();
        let mut service_blocks: Vec<(Block, Option<String>)> =
            g.take_blocks("service").into_iter().map(|s| (s, None)).collect();
        let mut templates: Vec<(usize, Template, Place)> = Vec::new();
        for mut t in g.take_blocks("task") {
            let raw = t.label.clone().unwrap_or_default();
            let task_name = self.label(&raw, 63, t.place(), "task name");
            for c in self.constraints(&mut t) {
                group.constraints.push(c);
            }
            for a in self.affinities(&mut t) {
                group.affinities.push(a);
            }
            if let Some(r) = t.take_block("restart") {
                let restart = self.restart(r);
                group.restart.get_or_insert(restart);
            }
            if let Some(v) = t.take_block("vault") {
                vault.get_or_insert(v);
            }
            let task_services = t.take_blocks("service");
            let Some(MappedTask {
                task,
                used,
                templates: task_templates,
            }) = self.task(t, &task_name)
            else {
                continue;
            };
            service_blocks.extend(task_services.into_iter().map(|s| (s, Some(task_name.clone()))));
            let index = group.tasks.len();
            templates.extend(task_templates.into_iter().map(|(tpl, place)| (index, tpl, place)));
            group.tasks.push(task);
            uses.push(used);
        }
        if group.tasks.is_empty() {
            self.skip(
                g.place(),
                "no task in this group can run in Capstan (see its tasks)",
            );
            self.rest(g);
            return None;
        }

        let vault_place = vault.as_ref().map(Block::place);
        if let Some(v) = vault {
            group.vault = Some(self.vault(v, &defaults.job));
        }
        let mut destinations = BTreeSet::new();
        for (index, mut template, place) in templates {
            if group.vault.is_none() {
                self.skip(place, "templates are rendered by Capstan's secrets agent, which a vault block brings: this group has none");
                continue;
            }
            if !destinations.insert(template.destination.clone()) {
                template.destination = format!("{}-{}", group.tasks[index].name, template.destination);
                destinations.insert(template.destination.clone());
            }
            group.tasks[index].templates.push(template);
        }
        // The agent logs in to render templates; Nomad's other use of vault, a token in
        // the task's environment, has no equivalent.
        if group.vault.is_some() && group.tasks.iter().all(|t| t.templates.is_empty()) {
            group.vault = None;
            if let Some(place) = vault_place {
                self.skip(place, "the secrets agent renders templates, and this group keeps none: a Vault token in the environment has no equivalent");
            }
        }

        // Services, then the ports: a port goes to the task whose config names it, else
        // the task a service names, else the first main task.
        let mut service_tasks: BTreeMap<String, String> = BTreeMap::new();
        for (s, task) in service_blocks {
            if let Some(service) = self.service(
                s,
                task,
                &defaults.job,
                &name,
                &renamed,
                &mut group.connect,
                services_seen,
            ) {
                if let Some(task) = &service.task {
                    service_tasks
                        .entry(service.port.clone())
                        .or_insert_with(|| task.clone());
                }
                group.services.push(service);
            }
        }
        let main = group
            .tasks
            .iter()
            .position(|t| t.lifecycle.is_none())
            .unwrap_or(0);
        // A service on a port number no task declares (Connect's `port = "9001"`) is
        // probed in the main task.
        for service in &mut group.services {
            let declared = |p: &Port| p.name == service.port || p.port.to_string() == service.port;
            if service.task.is_none() && !ports.iter().any(|(_, p, _)| declared(p)) {
                service.task = Some(group.tasks[main].name.clone());
            }
        }
        for (raw, port, _) in ports {
            let owner = uses
                .iter()
                .position(|u| u.contains(&raw))
                .or_else(|| {
                    service_tasks
                        .get(&port.name)
                        .and_then(|t| group.tasks.iter().position(|x| &x.name == t))
                })
                .unwrap_or(main);
            group.tasks[owner].ports.push(port);
        }
        self.rest(g);
        Some(group)
    }

    /// A task, or None when its driver runs no container.
    fn task(&mut self, mut t: Block, name: &str) -> Option<MappedTask> {
        let driver = self.string(&mut t, "driver").unwrap_or_default();
        let exec = matches!(driver.as_str(), "exec" | "raw_exec" | "exec2");
        let exec_image = self.exec_image.clone().filter(|_| exec);
        if !matches!(
            driver.as_str(),
            "docker" | "podman" | "containerd-driver" | "containerd" | "nerdctl"
        ) && exec_image.is_none()
        {
            let why = if exec {
                format!(
                    "the {driver:?} driver runs a command on the node itself, and Capstan runs containers: give the task a docker config with an image (or convert with an image to run exec commands in)"
                )
            } else {
                format!(
                    "the {driver:?} driver has no Capstan equivalent: Capstan runs containers (docker, podman, containerd)"
                )
            };
            self.skip(t.place(), why);
            return None;
        }
        let mut config = self.config(&mut t);
        let config_place = t.at("config");
        let image = match (exec_image, config.remove("image").and_then(|a| string(&a.value))) {
            (Some(image), _) => {
                self.note(
                    t.place(),
                    format!("the {driver} task runs its command in {image}"),
                );
                image
            }
            (None, Some(image)) => image.strip_prefix("docker://").unwrap_or(&image).to_owned(),
            (None, None) => {
                self.skip(config_place, "the task's config has no image");
                return None;
            }
        };
        // Docker's auth_soft_fail only changes how a pull with an `auth` block fails:
        // without one it says nothing.
        if !config.contains_key("auth") {
            config.remove("auth_soft_fail");
        }
        let mut task = Task {
            name: name.to_owned(),
            image,
            ..Task::default()
        };
        // Docker's entrypoint replaces the image's; its command and args follow it.
        let entrypoint = config
            .remove("entrypoint")
            .and_then(|a| strings(&a.value))
            .unwrap_or_default();
        let command = config.remove("command").and_then(|a| string(&a.value));
        let args = config
            .remove("args")
            .and_then(|a| strings(&a.value))
            .unwrap_or_default();
        match entrypoint.split_first() {
            Some((first, rest)) => {
                task.command = Some(first.clone());
                task.args = rest.iter().cloned().chain(command).chain(args).collect();
            }
            None => {
                task.command = command;
                task.args = args;
            }
        }
        let used = config
            .remove("ports")
            .and_then(|a| strings(&a.value))
            .unwrap_or_default();
        for (key, attr) in config {
            if key == "port_map" {
                self.skip(
                    attr.place(),
                    "port_map is Nomad 0.x's: declare the ports in the group's network with `to`",
                );
            } else {
                self.skip(
                    attr.place(),
                    format!("the {driver} driver's {key:?} has no Capstan equivalent"),
                );
            }
        }
        task.env = self
            .map(&mut t, "env")
            .into_iter()
            .map(|(k, v, _)| (k, v))
            .collect();
        if let Some(r) = t.take_block("resources") {
            task.resources = Some(self.resources(r));
        }
        let mut templates = Vec::new();
        for tpl in t.take_blocks("template") {
            if let Some(template) = self.template(tpl) {
                templates.push(template);
            }
        }
        if let Some(mut d) = t.take_block("dispatch_payload") {
            if let Some(file) = self.string(&mut d, "file") {
                let base = file.rsplit('/').next().unwrap_or(&file).to_owned();
                if base != file {
                    self.note(
                        d.place(),
                        format!("dispatch payload {file:?} is written to /local/{base}"),
                    );
                }
                task.dispatch_payload = Some(DispatchPayload { file: base });
            }
            self.rest(d);
        }
        task.kill_timeout = self.duration(&mut t, "kill_timeout");
        if let Some(mut l) = t.take_block("lifecycle") {
            let hook = self.read(&mut l, "hook", |v| match string(v).as_deref() {
                Some("prestart") => Ok(LifecycleHook::Prestart),
                Some("poststart") => Ok(LifecycleHook::Poststart),
                Some("poststop") => Ok(LifecycleHook::Poststop),
                _ => Err(format!("{v} is not prestart, poststart or poststop")),
            });
            let sidecar = self.boolean(&mut l, "sidecar").unwrap_or(false);
            if let Some(hook) = hook {
                task.lifecycle = Some(Lifecycle { hook, sidecar });
            }
            self.rest(l);
        }
        self.rest(t);
        Some(MappedTask {
            task,
            used,
            templates,
        })
    }

    /// The driver's config, as an attribute (JSON) or a block, by key.
    fn config(&mut self, t: &mut Block) -> BTreeMap<String, Attr> {
        let mut out = BTreeMap::new();
        if let Some(attr) = t.take("config") {
            match attr.value {
                Value::Object(map) => {
                    for (key, value) in map {
                        let path = format!("{}.{key}", attr.path);
                        out.insert(
                            key.clone(),
                            Attr {
                                name: key,
                                value,
                                path,
                                line: attr.line,
                            },
                        );
                    }
                }
                _ => self.skip(attr.place(), "expected a map"),
            }
        }
        for mut block in t.take_blocks("config") {
            for attr in std::mem::take(&mut block.attrs) {
                out.insert(attr.name.clone(), attr);
            }
            for inner in block.blocks {
                self.skip(
                    inner.place(),
                    format!("the driver's {:?} has no Capstan equivalent", inner.kind),
                );
            }
        }
        out
    }

    fn resources(&mut self, mut r: Block) -> Resources {
        let mut resources = Resources::default();
        let cores = self.bounded(&mut r, "cores", 1..=1024);
        let cpu = self.bounded(&mut r, "cpu", 1..=10_000_000);
        if let Some(cores) = cores {
            resources.cpu = Some(cores.to_string());
        } else if let Some(mhz) = cpu {
            resources.cpu = Some(format!("{mhz}m"));
            if !self.cpu_noted {
                self.cpu_noted = true;
                self.note(
                    r.at("cpu"),
                    "cpu: Nomad's MHz are read as millicores, 1000 MHz to a core",
                );
            }
        }
        resources.memory = self
            .bounded(&mut r, "memory", 1..=100_000_000)
            .map(|mb| format!("{mb}Mi"));
        resources.memory_max = self
            .bounded(&mut r, "memory_max", 1..=100_000_000)
            .map(|mb| format!("{mb}Mi"));
        self.rest(r);
        resources
    }

    fn template(&mut self, mut t: Block) -> Option<(Template, Place)> {
        let place = t.place();
        if let Some(attr) = t.take("env")
            && boolean(&attr.value) == Some(true)
        {
            self.skip(
                place,
                "an env template sets environment variables; Capstan's agent renders files",
            );
            return None;
        }
        let Some(data) = self.string(&mut t, "data").filter(|d| !d.is_empty()) else {
            let why = if t.attrs.iter().any(|a| a.name == "source") {
                "source files are read on the node: inline the file as data"
            } else {
                "a template needs data"
            };
            self.skip(place, why);
            return None;
        };
        let Some(destination) = self.string(&mut t, "destination") else {
            self.skip(place, "a template needs a destination");
            return None;
        };
        let file: String = destination
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let file = file.trim_start_matches(['.', '-']).to_owned();
        let file = if file.is_empty() {
            "template".to_owned()
        } else {
            file
        };
        if file != destination {
            self.note(
                t.at("destination"),
                format!("{destination:?} is rendered as {file:?} in the agent's secrets directory"),
            );
        }
        let change_mode = self.read(&mut t, "change_mode", |v| match string(v) {
            Some(mode) if matches!(mode.as_str(), "restart" | "noop" | "signal") => Ok(mode),
            _ => Err(format!("change_mode {v} is not restart, noop or signal")),
        });
        // Nomad's defaults, which the JSON API writes out: nothing to translate.
        for (name, default) in [
            ("splay", "5s"),
            ("perms", "0644"),
            ("left_delimiter", "{{"),
            ("right_delimiter", "}}"),
        ] {
            if let Some(attr) = t.take(name) {
                let same = string(&attr.value).as_deref() == Some(default)
                    || (name == "splay" && duration::read(&attr.value).as_deref() == Ok(default));
                if !same {
                    self.skip(attr.place(), reason(name));
                }
            }
        }
        self.rest(t);
        Some((
            Template {
                destination: file,
                data,
                change_mode,
            },
            place,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn service(
        &mut self,
        mut s: Block,
        task: Option<String>,
        job: &str,
        group: &str,
        ports: &BTreeMap<String, String>,
        connect: &mut Option<Connect>,
        seen: &mut BTreeSet<String>,
    ) -> Option<Service> {
        let place = s.place();
        if let Some(c) = s.take_block("connect") {
            self.connect(c, connect);
        }
        if let Some(attr) = s.take("provider")
            && !matches!(string(&attr.value).as_deref(), Some("consul" | "nomad"))
        {
            self.skip(attr.place(), "a Kubernetes Service is the only provider");
        }
        let task = self.string(&mut s, "task").map(|t| dns_label(&t, 63)).or(task);
        let default = task.clone().unwrap_or_else(|| group.to_owned());
        let raw = self.string(&mut s, "name").unwrap_or_else(|| default.clone());
        let expanded = raw
            .replace("${NOMAD_JOB_NAME}", job)
            .replace("${JOB}", job)
            .replace("${NOMAD_GROUP_NAME}", group)
            .replace("${TASKGROUP}", group)
            .replace("${NOMAD_TASK_NAME}", task.as_deref().unwrap_or(group))
            .replace("${TASK}", task.as_deref().unwrap_or(group));
        // The Service is `<job>-<name>`: a name that repeats the job's would say it twice.
        let trimmed = expanded
            .strip_prefix(&format!("{job}-"))
            .filter(|r| !r.is_empty())
            .unwrap_or(&expanded);
        let mut name = dns_label(trimmed, 22);
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            name = dns_label(&format!("s-{name}"), 22);
        }
        let mut n = 2;
        while !seen.insert(name.clone()) {
            let stem: String = trimmed.chars().take(19).collect();
            name = dns_label(&format!("{stem}-{n}"), 22);
            n += 1;
        }
        if name != raw {
            self.note(
                place.clone(),
                format!("service {raw:?} is {name:?} (the Service {job}-{name})"),
            );
        }
        let port = match self.string(&mut s, "port") {
            Some(port) => ports.get(&port).cloned().unwrap_or(port),
            None => {
                seen.remove(&name);
                self.skip(
                    place,
                    "a Kubernetes Service needs a port, and this service has none",
                );
                self.rest(s);
                return None;
            }
        };
        let tags: Vec<String> = self
            .list(&mut s, "tags")
            .unwrap_or_default()
            .into_iter()
            .filter(|t| t.len() <= 63)
            .collect();
        let mut checks = Vec::new();
        for c in s.take_blocks("check") {
            if let Some(check) = self.check(c, ports) {
                checks.push(check);
            }
        }
        checks.truncate(8);
        self.rest(s);
        Some(Service {
            name,
            port,
            tags,
            task,
            checks,
        })
    }

    fn check(&mut self, mut c: Block, ports: &BTreeMap<String, String>) -> Option<Check> {
        let place = c.place();
        let type_ = match self.string(&mut c, "type").as_deref() {
            Some("http") => CheckType::Http,
            Some("tcp") => CheckType::Tcp,
            Some("grpc") => CheckType::Grpc,
            Some("script") => CheckType::Script,
            other => {
                self.skip(
                    place,
                    format!("check type {other:?}: Capstan's probes are http, tcp, grpc and script"),
                );
                return None;
            }
        };
        let mut path = self.string(&mut c, "path");
        if type_ == CheckType::Http && path.is_none() {
            self.note(place.clone(), "an http check without a path probes /");
            path = Some("/".into());
        }
        let command = self.string(&mut c, "command");
        if type_ == CheckType::Script && command.is_none() {
            self.skip(place, "a script check needs a command");
            return None;
        }
        let check = Check {
            name: self.string(&mut c, "name").map(|n| n.chars().take(63).collect()),
            type_,
            path,
            port: self
                .string(&mut c, "port")
                .map(|p| ports.get(&p).cloned().unwrap_or(p)),
            command,
            args: self.list(&mut c, "args").unwrap_or_default(),
            interval: self.duration(&mut c, "interval"),
            timeout: self.duration(&mut c, "timeout"),
        };
        // A script check's task is the service's: the probe runs in that container.
        c.take("task");
        self.rest(c);
        Some(check)
    }

    fn connect(&mut self, mut c: Block, connect: &mut Option<Connect>) {
        if let Some(mut sidecar) = c.take_block("sidecar_service") {
            let upstreams = &mut connect.get_or_insert_with(Connect::default).upstreams;
            if let Some(mut proxy) = sidecar.take_block("proxy") {
                for mut u in proxy.take_blocks("upstreams") {
                    let place = u.place();
                    let destination = self.string(&mut u, "destination_name");
                    let port = self.bounded(&mut u, "local_bind_port", 1..=65535);
                    let namespace = self.string(&mut u, "destination_namespace");
                    match (destination, port) {
                        (Some(destination), Some(local_bind_port)) => {
                            if upstreams.iter().any(|x| x.local_bind_port == local_bind_port) {
                                self.skip(
                                    place,
                                    format!("local_bind_port {local_bind_port} is taken by another upstream"),
                                );
                            } else {
                                upstreams.push(Upstream {
                                    destination_name: self.label(&destination, 63, place.clone(), "upstream"),
                                    destination_namespace: namespace.map(|n| dns_label(&n, 63)),
                                    local_bind_port,
                                });
                            }
                        }
                        _ => self.skip(place, "an upstream needs destination_name and local_bind_port"),
                    }
                    self.rest(u);
                }
                self.rest(proxy);
            }
            // The sidecar's own port and tags are Consul's: Capstan's sidecar takes its
            // port from the mesh.
            sidecar.take("port");
            sidecar.take("tags");
            self.rest(sidecar);
        }
        self.rest(c);
    }
}

/// A cron expression as a CronJob takes it: five fields. Nomad's six-field form starts
/// with seconds and its seven-field form ends with years; both read when those are
/// `0`/`*` (every minute at second 0 is what a CronJob does).
fn five_fields(cron: &str) -> Result<String, String> {
    let fields: Vec<&str> = cron.split_whitespace().collect();
    match fields.as_slice() {
        [one] if one.starts_with('@') => Ok((*one).to_owned()),
        [_, _, _, _, _] => Ok(fields.join(" ")),
        ["0", rest @ ..] if rest.len() == 5 => Ok(rest.join(" ")),
        ["0", rest @ .., "*"] if rest.len() == 5 => Ok(rest.join(" ")),
        _ => Err(format!(
            "cron {cron:?}: a CronJob's schedule is five fields (minute to weekday), without seconds or years"
        )),
    }
}
