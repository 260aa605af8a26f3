//! A group's pod template (without its placement, which [`super::placement`] adds):
//! tasks as containers, lifecycle hooks as init and sidecar containers, Nomad's runtime
//! environment, service checks as readiness (and startup) probes, connect and vault as
//! the webhook's annotations, Nomad's shared alloc directory, and a dispatched payload as
//! a mounted Secret.

use super::{CompileError, duration, group_at, group_field, labels, names};
// SECRETS_DIR: where the agent renders templates, Nomad's `secrets/`.
use capstan_contract::{
    annotations::{agent, mesh},
    env::agent::SECRETS_DIR,
};
use capstan_crds::jobs::{
    CheckType, Job, JobType, LifecycleHook, Port, RestartMode, Task, TaskGroup, Template,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, ExecAction, GRPCAction, HTTPGetAction, KeyToPath,
    ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe, ResourceFieldSelector, ResourceRequirements,
    SecretVolumeSource, TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use regex::Regex;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

/// The key of the payload in a dispatched child's payload Secret.
pub const PAYLOAD_KEY: &str = "payload";
/// The volume a task's `dispatchPayload` is mounted from.
const PAYLOAD_VOLUME: &str = "dispatch-payload";
/// Where Nomad writes a task's payload file (its task directory's `local/`).
const PAYLOAD_DIR: &str = "/local";
/// The variables the node attributes a pod can read interpolate to.
const NODE_NAME: &str = "CAPSTAN_NODE_NAME";
const NODE_IP: &str = "CAPSTAN_NODE_IP";
/// Nomad's allocation directory, shared by the group's tasks: an emptyDir in every
/// container (prestart tasks leave files there for the main ones).
const ALLOC_VOLUME: &str = "nomad-alloc";
const ALLOC_DIR: &str = "/alloc";
/// Nomad's healthy_deadline where no update block applies (batch and sysbatch groups).
const DEFAULT_HEALTHY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);
/// The annotation a batch/v1 Job in Indexed mode gives each pod: Nomad's alloc index.
const COMPLETION_INDEX: &str = "metadata.annotations['batch.kubernetes.io/job-completion-index']";

/// Whose child a run is, for `NOMAD_JOB_PARENT_ID`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Parent {
    /// The Job's own pods: a dispatched child's parent is its `dispatch.parent`.
    OfJob,
    /// A periodic launch: the periodic Job is the parent.
    Periodic,
}

/// The pod template of group `g` at `version`, placement left out.
pub(super) fn template(
    job: &Job,
    g: usize,
    version: i64,
    parent: Parent,
) -> Result<PodTemplateSpec, CompileError> {
    let group = group_at(job, g)?;
    let name = job.metadata.name.as_deref().unwrap_or_default();
    let parent = match parent {
        Parent::OfJob => job.spec.dispatch.as_ref().map(|d| d.parent.as_str()),
        Parent::Periodic => Some(name),
    };
    let batch = matches!(job.spec.type_, JobType::Batch | JobType::Sysbatch);
    let healthy_deadline = match job.spec.type_ {
        JobType::Service | JobType::System => super::update(job, g)?.healthy_deadline,
        JobType::Batch | JobType::Sysbatch => DEFAULT_HEALTHY_DEADLINE,
    };
    let probes = probes(group, g, healthy_deadline)?;
    let payload = job
        .spec
        .dispatch
        .as_ref()
        .and_then(|d| d.payload.as_ref())
        .is_some();

    let mut containers = Vec::new();
    let mut init_containers = Vec::new();
    let mut grace: Option<i64> = None;
    for (t, task) in group.tasks.iter().enumerate() {
        let field = group_field(g, &format!("tasks[{t}]"));
        let mut container = container(job, group, task, parent, batch, &field)?;
        if let Some(task_probes) = probes.get(&t).cloned() {
            container.readiness_probe = Some(task_probes.readiness);
            container.startup_probe = task_probes.startup;
        }
        let mounts = container.volume_mounts.get_or_insert_with(Vec::new);
        mounts.push(VolumeMount {
            name: ALLOC_VOLUME.to_owned(),
            mount_path: ALLOC_DIR.to_owned(),
            ..Default::default()
        });
        if let (true, Some(dp)) = (payload, &task.dispatch_payload) {
            mounts.push(VolumeMount {
                name: PAYLOAD_VOLUME.to_owned(),
                mount_path: format!("{PAYLOAD_DIR}/{}", dp.file),
                sub_path: Some(PAYLOAD_KEY.to_owned()),
                read_only: Some(true),
                ..Default::default()
            });
        }
        if let Some(timeout) = &task.kill_timeout {
            let d = duration::parse(timeout)
                .ok_or_else(|| CompileError::new(format!("{field}.killTimeout"), "not a duration"))?;
            grace = grace.max(Some(duration::ceil_seconds(d)));
        }
        match task.lifecycle.as_ref().map(|l| (l.hook, l.sidecar)) {
            None => containers.push(container),
            Some((LifecycleHook::Prestart, sidecar)) => {
                if sidecar {
                    // A native sidecar: started before the main tasks, kept running
                    // beside them, and not waited for when a batch pod completes.
                    container.restart_policy = Some("Always".to_owned());
                }
                if container.readiness_probe.is_some() && !sidecar {
                    return Err(CompileError::new(
                        format!("{field}.lifecycle"),
                        "a prestart task that is not a sidecar runs to completion before the others: \
                         it cannot carry a service check",
                    ));
                }
                init_containers.push(container);
            }
            Some((LifecycleHook::Poststart, true)) => containers.push(container),
            Some((LifecycleHook::Poststart, false)) if batch => containers.push(container),
            Some((LifecycleHook::Poststart, false)) => {
                return Err(CompileError::new(
                    format!("{field}.lifecycle.sidecar"),
                    "a poststart task that exits would be restarted for ever in a service or system \
                     pod (restartPolicy Always): make it a sidecar",
                ));
            }
            Some((LifecycleHook::Poststop, _)) => {
                return Err(CompileError::new(
                    format!("{field}.lifecycle.hook"),
                    "Kubernetes runs no container after a pod's main containers stop: poststop has no form",
                ));
            }
        }
    }
    if containers.is_empty() {
        return Err(CompileError::new(
            group_field(g, "tasks"),
            "a group needs at least one main task (one without a prestart lifecycle)",
        ));
    }

    let mut annotations = BTreeMap::new();
    connect_annotations(group, g, &mut annotations)?;
    vault_annotations(group, g, &mut annotations)?;
    let mut volumes = vec![Volume {
        name: ALLOC_VOLUME.to_owned(),
        empty_dir: Some(Default::default()),
        ..Default::default()
    }];
    volumes.extend(payload.then(|| Volume {
        name: PAYLOAD_VOLUME.to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(names::payload_secret(name)),
            items: Some(vec![KeyToPath {
                key: PAYLOAD_KEY.to_owned(),
                path: PAYLOAD_KEY.to_owned(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }));
    let restart_policy = if batch { restart(group).policy } else { "Always" };
    Ok(PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels::group(name, &group.name, version)),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            containers,
            init_containers: (!init_containers.is_empty()).then_some(init_containers),
            restart_policy: Some(restart_policy.to_owned()),
            termination_grace_period_seconds: grace,
            priority_class_name: Some(names::priority_class(job.spec.priority)),
            service_account_name: group.vault.as_ref().and_then(|v| v.service_account.clone()),
            volumes: Some(volumes),
            ..Default::default()
        }),
    })
}

/// A batch group's restart rule as a pod restart policy and a Job's backoff limit.
pub(super) struct Restart {
    pub policy: &'static str,
    pub backoff_limit: i32,
}

/// Nomad's batch defaults are 3 restarts in place (`restart.attempts`) and 1 reschedule
/// (`reschedule.attempts`). In place → `OnFailure`, where every container restart counts
/// against the Job's backoffLimit; no restarts → `Never`, each failure a new pod. So the
/// limit is restarts + reschedules; restart mode `delay` and `reschedule.unlimited`
/// retry for ever (the largest limit). The delays and intervals are the kubelet's and the
/// Job controller's own backoff.
pub(super) fn restart(group: &TaskGroup) -> Restart {
    let attempts = group.restart.as_ref().and_then(|r| r.attempts).unwrap_or(3);
    let delay_mode = group
        .restart
        .as_ref()
        .and_then(|r| r.mode)
        .is_some_and(|m| m == RestartMode::Delay);
    let reschedule = group.reschedule.as_ref();
    let unlimited = reschedule.and_then(|r| r.unlimited).unwrap_or(false);
    let reschedules = reschedule.and_then(|r| r.attempts).unwrap_or(1);
    let policy = if attempts == 0 { "Never" } else { "OnFailure" };
    let backoff_limit = if delay_mode || unlimited {
        i32::MAX
    } else if attempts == 0 {
        reschedules
    } else {
        attempts.saturating_add(reschedules)
    };
    Restart {
        policy,
        backoff_limit,
    }
}

fn container(
    job: &Job,
    group: &TaskGroup,
    task: &Task,
    parent: Option<&str>,
    batch: bool,
    field: &str,
) -> Result<Container, CompileError> {
    let mut env = runtime_env(job, group, task, parent, batch);
    env.retain(|e| !task.env.contains_key(&e.name));
    let known: BTreeSet<String> = env
        .iter()
        .map(|e| e.name.clone())
        .chain(task.env.keys().cloned())
        .collect();
    for (key, value) in &task.env {
        env.push(literal(
            key,
            interpolate(value, &known, &format!("{field}.env.{key}"))?,
        ));
    }
    let command = task
        .command
        .as_ref()
        .map(|c| interpolate(c, &known, &format!("{field}.command")).map(|c| vec![c]))
        .transpose()?;
    let args = task
        .args
        .iter()
        .enumerate()
        .map(|(i, a)| interpolate(a, &known, &format!("{field}.args[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let resources = task.resources.as_ref().map(|r| {
        let mut requests = BTreeMap::new();
        let mut limits = BTreeMap::new();
        if let Some(cpu) = &r.cpu {
            requests.insert("cpu".to_owned(), Quantity(cpu.clone()));
        }
        if let Some(memory) = &r.memory {
            requests.insert("memory".to_owned(), Quantity(memory.clone()));
        }
        // Nomad's memory is a hard limit unless memory_max raises it.
        if let Some(limit) = r.memory_max.as_ref().or(r.memory.as_ref()) {
            limits.insert("memory".to_owned(), Quantity(limit.clone()));
        }
        ResourceRequirements {
            requests: (!requests.is_empty()).then_some(requests),
            limits: (!limits.is_empty()).then_some(limits),
            ..Default::default()
        }
    });
    let ports = task
        .ports
        .iter()
        .map(|p| ContainerPort {
            name: Some(p.name.clone()),
            container_port: p.port,
            protocol: Some(protocol(p).to_owned()),
            ..Default::default()
        })
        .collect::<Vec<_>>();
    Ok(Container {
        name: task.name.clone(),
        image: Some(task.image.clone()),
        command,
        args: (!args.is_empty()).then_some(args),
        env: Some(env),
        resources,
        ports: (!ports.is_empty()).then_some(ports),
        ..Default::default()
    })
}

fn protocol(port: &Port) -> &'static str {
    match port.protocol {
        capstan_crds::jobs::PortProtocol::TCP => "TCP",
        capstan_crds::jobs::PortProtocol::UDP => "UDP",
    }
}

/// Nomad's runtime environment for `task`, before its own `env`.
fn runtime_env(job: &Job, group: &TaskGroup, task: &Task, parent: Option<&str>, batch: bool) -> Vec<EnvVar> {
    let name = job.metadata.name.as_deref().unwrap_or_default();
    let mut env = vec![
        literal("NOMAD_JOB_NAME", name.to_owned()),
        literal("NOMAD_JOB_ID", name.to_owned()),
    ];
    if let Some(parent) = parent {
        env.push(literal("NOMAD_JOB_PARENT_ID", parent.to_owned()));
    }
    env.extend([
        literal("NOMAD_GROUP_NAME", group.name.clone()),
        literal("NOMAD_TASK_NAME", task.name.clone()),
        from_field("NOMAD_NAMESPACE", "metadata.namespace"),
        from_field("NOMAD_ALLOC_ID", "metadata.uid"),
        from_field("NOMAD_ALLOC_NAME", "metadata.name"),
        literal("NOMAD_ALLOC_DIR", ALLOC_DIR.to_owned()),
        // Not Nomad's: what `${node.unique.name}` and `${attr.unique.network.ip-address}`
        // interpolate to, the two node attributes the downward API can give a pod.
        from_field(NODE_NAME, "spec.nodeName"),
        from_field(NODE_IP, "status.hostIP"),
    ]);
    if batch {
        env.push(from_field("NOMAD_ALLOC_INDEX", COMPLETION_INDEX));
    }
    if group.vault.is_some() {
        env.push(literal("NOMAD_SECRETS_DIR", SECRETS_DIR.to_owned()));
    }
    if task
        .resources
        .as_ref()
        .is_some_and(|r| r.memory.is_some() || r.memory_max.is_some())
    {
        // Nomad gives the limit in MiB.
        env.push(EnvVar {
            name: "NOMAD_MEMORY_LIMIT".to_owned(),
            value: None,
            value_from: Some(EnvVarSource {
                resource_field_ref: Some(ResourceFieldSelector {
                    container_name: Some(task.name.clone()),
                    resource: "limits.memory".to_owned(),
                    divisor: Some(Quantity("1Mi".to_owned())),
                }),
                ..Default::default()
            }),
        });
    }
    let mut meta: BTreeMap<&String, &String> = job.spec.meta.iter().collect();
    meta.extend(&group.meta);
    if let Some(dispatch) = &job.spec.dispatch {
        meta.extend(&dispatch.meta);
    }
    let mut seen = BTreeSet::new();
    for (key, value) in meta {
        // Nomad sets the key as written and upper-cased, both made environment-safe.
        for key in [env_name(key), env_name(key).to_ascii_uppercase()] {
            if seen.insert(key.clone()) {
                // Meta is data: escaped, so Kubernetes expands nothing in it.
                env.push(literal(&format!("NOMAD_META_{key}"), escape(value)));
            }
        }
    }
    for port in group.tasks.iter().flat_map(|t| &t.ports) {
        let label = env_name(&port.name);
        env.extend([
            from_field(&format!("NOMAD_IP_{label}"), "status.podIP"),
            literal(&format!("NOMAD_PORT_{label}"), port.port.to_string()),
            literal(
                &format!("NOMAD_ADDR_{label}"),
                format!("$(NOMAD_IP_{label}):{}", port.port),
            ),
        ]);
    }
    for upstream in group.connect.iter().flat_map(|c| &c.upstreams) {
        let dest = env_name(&upstream.destination_name);
        let port = upstream.local_bind_port;
        env.extend([
            literal(&format!("NOMAD_UPSTREAM_IP_{dest}"), "127.0.0.1".to_owned()),
            literal(&format!("NOMAD_UPSTREAM_PORT_{dest}"), port.to_string()),
            literal(
                &format!("NOMAD_UPSTREAM_ADDR_{dest}"),
                format!("127.0.0.1:{port}"),
            ),
        ]);
    }
    env
}

/// Nomad's `helper.CleanEnvVar`: every character outside `[A-Za-z0-9_]` becomes `_`.
fn env_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn literal(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value),
        value_from: None,
    }
}

fn from_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                api_version: None,
            }),
            ..Default::default()
        }),
    }
}

/// Nomad's runtime interpolation as Kubernetes' dependent variables: `${NOMAD_PORT_http}`
/// and `${env["X"]}` become `$(NOMAD_PORT_http)` and `$(X)` when the container defines
/// the variable; any other `${...}` is left as written (Nomad leaves what it cannot
/// resolve), except node attributes: the node's name and IP come from the downward API,
/// the others are refused since a pod cannot read its node's labels. Literal `$(` and `$$` are
/// escaped so Kubernetes does not expand them.
fn interpolate(text: &str, known: &BTreeSet<String>, field: &str) -> Result<String, CompileError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&escape(&rest[..start]));
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            break;
        };
        let inner = after[..end].trim();
        let variable = inner
            .strip_prefix("env[\"")
            .and_then(|v| v.strip_suffix("\"]"))
            .unwrap_or(inner);
        let variable = match variable {
            "node.unique.name" | "node.unique.id" | "attr.unique.hostname" => NODE_NAME,
            "attr.unique.network.ip-address" => NODE_IP,
            other => other,
        };
        if known.contains(variable) {
            out.push_str(&format!("$({variable})"));
        } else if ["node.", "attr.", "meta."].iter().any(|p| inner.starts_with(p)) {
            return Err(CompileError::new(
                field,
                format!(
                    "${{{inner}}} reads a node attribute when the task starts, which a pod cannot see \
                     (pass it through the job's meta, NOMAD_META_<key>, instead)"
                ),
            ));
        } else {
            out.push_str(&escape(&rest[start..start + 2 + end + 1]));
        }
        rest = &after[end + 1..];
    }
    out.push_str(&escape(rest));
    Ok(out)
}

/// Doubles each `$` that Kubernetes would read as the start of `$(` or `$$`.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '$' && matches!(chars.peek(), Some('$' | '(')) {
            out.push('$');
        }
    }
    out
}

/// Where a port is: the task declaring it (if one does) and its number. Nomad's ports
/// are the group's (one network per allocation, as a pod's), so any task may use them.
struct Target<'a> {
    task: Option<usize>,
    port: Option<&'a Port>,
    number: i32,
}

/// A port reference (a name or a number) among the group's tasks.
fn find_port<'a>(group: &'a TaskGroup, reference: &str) -> Option<Target<'a>> {
    let declared = |matches: &dyn Fn(&Port) -> bool| {
        group.tasks.iter().enumerate().find_map(|(t, task)| {
            task.ports.iter().find(|p| matches(p)).map(|port| Target {
                task: Some(t),
                port: Some(port),
                number: port.port,
            })
        })
    };
    if let Some(named) = declared(&|p: &Port| p.name == reference) {
        return Some(named);
    }
    let number = reference
        .parse::<i32>()
        .ok()
        .filter(|n| (1..=65535).contains(n))?;
    declared(&|p: &Port| p.port == number).or(Some(Target {
        task: None,
        port: None,
        number,
    }))
}

/// The task a service probes (its `task`, or the task declaring its port) and its port.
fn service_target<'a>(group: &'a TaskGroup, g: usize, s: usize) -> Result<(usize, Target<'a>), CompileError> {
    let service = &group.services[s];
    let field = group_field(g, &format!("services[{s}]"));
    let target = find_port(group, &service.port).ok_or_else(|| {
        CompileError::new(
            format!("{field}.port"),
            format!(
                "{:?} is neither a port name nor a port number of the group's tasks",
                service.port
            ),
        )
    })?;
    let task = match &service.task {
        Some(name) => group.tasks.iter().position(|t| &t.name == name).ok_or_else(|| {
            CompileError::new(format!("{field}.task"), format!("no task {name:?} in the group"))
        })?,
        None => target.task.ok_or_else(|| {
            CompileError::new(
                format!("{field}.task"),
                format!(
                    "no task declares port {}: name the task the service's checks probe",
                    service.port
                ),
            )
        })?,
    };
    Ok((task, target))
}

/// The readiness probe of each task a service check probes.
fn probes(
    group: &TaskGroup,
    g: usize,
    healthy_deadline: std::time::Duration,
) -> Result<BTreeMap<usize, Probes>, CompileError> {
    let mut probes: BTreeMap<usize, (String, Probes)> = BTreeMap::new();
    for (s, service) in group.services.iter().enumerate() {
        let (task, _) = service_target(group, g, s)?;
        for (c, check) in service.checks.iter().enumerate() {
            let field = group_field(g, &format!("services[{s}].checks[{c}]"));
            if let Some((first, Probes { startup: Some(_), .. })) = probes.get(&task) {
                return Err(CompileError::new(
                    field,
                    format!(
                        "task {:?} already has a readiness and a startup probe (up to {first}): a \
                         container has no third",
                        group.tasks[task].name
                    ),
                ));
            }
            let reference = check.port.as_deref().unwrap_or(&service.port);
            let port = find_port(group, reference).ok_or_else(|| {
                CompileError::new(
                    format!("{field}.port"),
                    format!("{reference:?} is neither a port name nor a port number of the group's tasks"),
                )
            })?;
            // A port name resolves only among the probed container's own ports (and
            // Kubernetes' gRPC probe takes a number only); the pod has one network, so
            // the number reaches any task's port.
            let port_ref = match port.port {
                Some(p) if reference == p.name && port.task == Some(task) => {
                    IntOrString::String(p.name.clone())
                }
                _ => IntOrString::Int(port.number),
            };
            let mut probe = Probe::default();
            match check.type_ {
                CheckType::Http => {
                    probe.http_get = Some(HTTPGetAction {
                        path: check.path.clone(),
                        port: port_ref,
                        ..Default::default()
                    });
                }
                CheckType::Tcp => {
                    probe.tcp_socket = Some(TCPSocketAction {
                        port: port_ref,
                        ..Default::default()
                    });
                }
                CheckType::Grpc => {
                    probe.grpc = Some(GRPCAction {
                        port: port.number,
                        service: None,
                    });
                }
                CheckType::Script => {
                    let command = check.command.clone().ok_or_else(|| {
                        CompileError::new(format!("{field}.command"), "a script check needs a command")
                    })?;
                    probe.exec = Some(ExecAction {
                        command: Some(
                            std::iter::once(command)
                                .chain(check.args.iter().cloned())
                                .collect(),
                        ),
                    });
                }
            }
            let seconds = |value: Option<&String>, default: i64, name: &str| {
                value
                    .map(|v| {
                        duration::parse(v)
                            .ok_or_else(|| CompileError::new(format!("{field}.{name}"), "not a duration"))
                    })
                    .transpose()
                    .map(|d| {
                        let s = d.map_or(default, duration::ceil_seconds).max(1);
                        i32::try_from(s).unwrap_or(i32::MAX)
                    })
            };
            probe.period_seconds = Some(seconds(check.interval.as_ref(), 10, "interval")?);
            probe.timeout_seconds = Some(seconds(check.timeout.as_ref(), 2, "timeout")?);
            match probes.get_mut(&task) {
                None => {
                    probes.insert(
                        task,
                        (
                            field,
                            Probes {
                                readiness: probe,
                                startup: None,
                            },
                        ),
                    );
                }
                Some((last, probes)) => {
                    // A second check must pass once before the first decides readiness;
                    // it gives up (the container restarts) when Nomad would call the
                    // allocation unhealthy, at the healthy deadline.
                    let period = i64::from(probe.period_seconds.unwrap_or(10));
                    let attempts = duration::ceil_seconds(healthy_deadline).div_euclid(period).max(1);
                    probe.failure_threshold = Some(i32::try_from(attempts).unwrap_or(i32::MAX));
                    probes.startup = Some(probe);
                    *last = field;
                }
            }
        }
    }
    Ok(probes.into_iter().map(|(t, (_, p))| (t, p)).collect())
}

/// A task's probes from its service checks: the first check decides readiness, a second
/// must pass once at start.
#[derive(Clone)]
struct Probes {
    readiness: Probe,
    startup: Option<Probe>,
}

/// `connect` as the mesh webhook's annotations.
fn connect_annotations(
    group: &TaskGroup,
    g: usize,
    annotations: &mut BTreeMap<String, String>,
) -> Result<(), CompileError> {
    let Some(connect) = &group.connect else {
        return Ok(());
    };
    annotations.insert(mesh::INJECT.to_owned(), "true".to_owned());
    if !connect.upstreams.is_empty() {
        let upstreams = connect
            .upstreams
            .iter()
            .map(|u| match &u.destination_namespace {
                Some(ns) => format!("{}.{ns}:{}", u.destination_name, u.local_bind_port),
                None => format!("{}:{}", u.destination_name, u.local_bind_port),
            })
            .collect::<Vec<_>>();
        annotations.insert(mesh::UPSTREAMS.to_owned(), upstreams.join(","));
    }
    // Nomad's sidecar service forwards to the group service's port.
    if !group.services.is_empty() {
        let (_, target) = service_target(group, g, 0)?;
        annotations.insert(mesh::APP_PORT.to_owned(), target.number.to_string());
    }
    Ok(())
}

/// `vault` and the tasks' templates as the secrets agent's annotations.
fn vault_annotations(
    group: &TaskGroup,
    g: usize,
    annotations: &mut BTreeMap<String, String>,
) -> Result<(), CompileError> {
    let templates = group.tasks.iter().enumerate().flat_map(|(t, task)| {
        task.templates
            .iter()
            .enumerate()
            .map(move |(i, tpl)| (group_field(g, &format!("tasks[{t}].templates[{i}]")), tpl))
    });
    let Some(vault) = &group.vault else {
        if let Some((field, _)) = templates.into_iter().next() {
            return Err(CompileError::new(
                field,
                "templates are rendered by the secrets agent: the group needs a vault block",
            ));
        }
        return Ok(());
    };
    annotations.insert(agent::INJECT.to_owned(), "true".to_owned());
    annotations.insert(agent::ROLE.to_owned(), vault.role.clone());
    let mut rendered: BTreeMap<&str, (String, String)> = BTreeMap::new();
    for (field, template) in templates {
        let (path, body) = agent_template(template, &field)?;
        if let Some(earlier) = rendered.get(template.destination.as_str())
            && *earlier != (path.clone(), body.clone())
        {
            return Err(CompileError::new(
                format!("{field}.destination"),
                "another task renders a different file to this destination (the agent's files are \
                 shared by the pod)",
            ));
        }
        rendered.insert(&template.destination, (path, body));
    }
    if rendered.is_empty() {
        return Err(CompileError::new(
            group_field(g, "vault"),
            "the secrets agent renders secrets into files and needs at least one task template \
             ({{ with secret \"<path>\" }}...{{ end }}); a Vault token in the environment has no \
             equivalent",
        ));
    }
    for (destination, (path, body)) in rendered {
        annotations.insert(format!("{}{destination}", agent::SECRET_PREFIX), path);
        annotations.insert(format!("{}{destination}", agent::TEMPLATE_PREFIX), body);
    }
    Ok(())
}

static WITH_SECRET: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"(?s)\{\{-?\s*with\s+secret\s+"([^"]+)"\s*-?\}\}(.*?)\{\{-?\s*end\s*-?\}\}"#)
        .expect("a valid regex")
});
static DATA_FIELD: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\{\{-?\s*\.Data(?:\.data)?\.([A-Za-z0-9_.-]+)\s*-?\}\}").expect("a valid regex")
});
static PLACEHOLDER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\{\{\s*[A-Za-z0-9_.-]+\s*\}\}").expect("a valid regex"));

/// A Nomad template as the agent's secret path and template: text around
/// `{{ with secret "<path>" }} ... {{ end }}` blocks, all of one secret, whose bodies read
/// `.Data.data.<field>` (KV v2) or `.Data.<field>`, which become the agent's
/// `{{ <field> }}`. Go's `{{-`/`-}}` whitespace trimming is not reproduced.
fn agent_template(template: &Template, field: &str) -> Result<(String, String), CompileError> {
    let data_field = || format!("{field}.data");
    let mut paths = BTreeSet::new();
    let body = WITH_SECRET.replace_all(&template.data, |captures: &regex::Captures<'_>| {
        paths.insert(captures[1].to_owned());
        DATA_FIELD.replace_all(&captures[2], "{{ $1 }}").into_owned()
    });
    let path = match paths.len() {
        1 => paths.into_iter().next().unwrap_or_default(),
        0 => {
            return Err(CompileError::new(
                data_field(),
                "the secrets agent renders a secret into the file: the template must read one with \
                 {{ with secret \"<path>\" }} ... {{ .Data.data.<field> }} ... {{ end }}",
            ));
        }
        _ => {
            return Err(CompileError::new(
                data_field(),
                "the secrets agent renders one secret per file: every `with secret` of a template \
                 must name the same path",
            ));
        }
    };
    // The agent's own rules, which the webhook applies to the pod: refused here, at apply.
    capstan_crds::secrets::check_file_name(&template.destination)
        .map_err(|e| CompileError::new(format!("{field}.destination"), e))?;
    capstan_crds::secrets::agent_path_kind(&path).map_err(|e| CompileError::new(data_field(), e))?;
    if PLACEHOLDER.replace_all(&body, "").contains("{{") {
        return Err(CompileError::new(
            data_field(),
            "inside the secret, the agent reads only {{ .Data.data.<field> }} (or {{ .Data.<field> }}); \
             other template actions have no form",
        ));
    }
    Ok((path, body.into_owned()))
}
