//! The native objects a Job runs as, built from its pod sets: ReplicaSets (service),
//! batch/v1 Jobs (batch, sysbatch, dispatched children), CronJobs (periodic), DaemonSets
//! (system), Services, PriorityClasses and a dispatched child's payload Secret.

use super::{
    CompileError, Nodes, PodSet, Settings, group_at, labels, names, placement, pod, pod_sets, update,
};
use capstan_crds::jobs::{Job, JobType};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, ReplicaSet, ReplicaSetSpec, RollingUpdateDaemonSet,
};
use k8s_openapi::api::batch::v1::{
    CronJob, CronJobSpec, Job as BatchJob, JobSpec as BatchJobSpec, JobTemplateSpec,
};
use k8s_openapi::api::core::v1::{PodTemplateSpec, Secret, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use std::collections::BTreeMap;

/// The ownerReference every namespaced object a Job owns carries (controller: true), so
/// deleting the Job deletes them and the controller is woken by their changes.
pub fn owner_reference(job: &Job) -> OwnerReference {
    OwnerReference {
        api_version: Job::api_version(&()).into_owned(),
        kind: Job::kind(&()).into_owned(),
        name: job.metadata.name.clone().unwrap_or_default(),
        uid: job.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The metadata of an object the Job owns.
fn owned(job: &Job, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: job.metadata.namespace.clone(),
        labels: Some(labels),
        owner_references: Some(vec![owner_reference(job)]),
        ..Default::default()
    }
}

fn job_name(job: &Job) -> &str {
    job.metadata.name.as_deref().unwrap_or_default()
}

fn template_labels(template: &PodTemplateSpec) -> BTreeMap<String, String> {
    template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

/// A service group's pod set as a ReplicaSet of `replicas` pods, named and selected by
/// the set's hash. The reconciler scales it itself (no Deployment: Nomad's update block
/// decides how old and new sets move).
pub fn replica_set(job: &Job, group_index: usize, set: &PodSet, replicas: i32) -> ReplicaSet {
    let name = job_name(job);
    let group = job
        .spec
        .groups
        .get(group_index)
        .map(|g| g.name.as_str())
        .unwrap_or_default();
    let mut template = set.template.clone();
    let metadata = template.metadata.get_or_insert_with(Default::default);
    let pod_labels = metadata.labels.get_or_insert_with(Default::default);
    pod_labels.insert(labels::TEMPLATE_HASH.to_owned(), set.hash.clone());
    let object_labels = pod_labels.clone();
    let mut selector = labels::selector(name, group);
    selector.insert(labels::TEMPLATE_HASH.to_owned(), set.hash.clone());
    ReplicaSet {
        metadata: owned(job, names::replica_set(name, group, &set.hash), object_labels),
        spec: Some(ReplicaSetSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            },
            template: Some(template),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A Service per group service, `<job>-<service>`, over every pod of its group (canaries
/// included, as Nomad registers them), its port by name; the tags as an annotation.
pub fn services(job: &Job) -> Result<Vec<Service>, CompileError> {
    let name = job_name(job);
    let mut out = Vec::new();
    for (g, group) in job.spec.groups.iter().enumerate() {
        for (s, service) in group.services.iter().enumerate() {
            let object = names::service(name, &service.name);
            if !dns_1035(&object) {
                return Err(CompileError::new(
                    "metadata.name",
                    format!(
                        "the Service {object:?} for spec.groups[{g}].services[{s}] must begin with a letter and \
                         hold only lowercase letters, digits and '-'"
                    ),
                ));
            }
            let port = group
                .tasks
                .iter()
                .flat_map(|t| &t.ports)
                .find(|p| p.name == service.port);
            let (port_name, number, target, protocol) = match (port, service.port.parse::<i32>()) {
                (Some(p), _) => (
                    Some(p.name.clone()),
                    p.port,
                    IntOrString::String(p.name.clone()),
                    p.protocol,
                ),
                (None, Ok(n)) if (1..=65535).contains(&n) => {
                    let protocol = group
                        .tasks
                        .iter()
                        .flat_map(|t| &t.ports)
                        .find(|p| p.port == n)
                        .map(|p| p.protocol)
                        .unwrap_or_default();
                    (None, n, IntOrString::Int(n), protocol)
                }
                _ => {
                    return Err(CompileError::new(
                        format!("spec.groups[{g}].services[{s}].port"),
                        format!(
                            "{:?} is neither a port name nor a port number of the group's tasks",
                            service.port
                        ),
                    ));
                }
            };
            let mut metadata = owned(job, object, {
                let mut l = labels::job(name);
                l.insert(labels::GROUP.to_owned(), group.name.clone());
                l
            });
            if !service.tags.is_empty() {
                metadata.annotations = Some(BTreeMap::from([(
                    labels::SERVICE_TAGS.to_owned(),
                    service.tags.join(","),
                )]));
            }
            out.push(Service {
                metadata,
                spec: Some(ServiceSpec {
                    selector: Some(labels::selector(name, &group.name)),
                    ports: Some(vec![ServicePort {
                        name: port_name,
                        port: number,
                        target_port: Some(target),
                        protocol: Some(
                            match protocol {
                                capstan_crds::jobs::PortProtocol::TCP => "TCP",
                                capstan_crds::jobs::PortProtocol::UDP => "UDP",
                            }
                            .to_owned(),
                        ),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    Ok(out)
}

/// A DNS-1035 label: what a Service's name must be.
fn dns_1035(name: &str) -> bool {
    name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The PriorityClass of a Job priority: value = the priority, preempting lower ones.
/// Cluster-scoped and shared by every Job of that priority, so it has no owner.
pub fn priority_class(priority: i32) -> PriorityClass {
    PriorityClass {
        metadata: ObjectMeta {
            name: Some(names::priority_class(priority)),
            labels: Some(BTreeMap::from([(
                labels::MANAGED_BY.to_owned(),
                labels::MANAGED_BY_VALUE.to_owned(),
            )])),
            ..Default::default()
        },
        value: priority,
        global_default: Some(false),
        preemption_policy: Some("PreemptLowerPriority".to_owned()),
        description: Some(format!(
            "Capstan Job priority {priority}: its pods preempt those of lower-priority Jobs when the cluster is full"
        )),
    }
}

/// The one pod set of a group that cannot be split (batch, system, sysbatch).
fn single_set(
    job: &Job,
    group_index: usize,
    version: i64,
    nodes: &Nodes,
    settings: &Settings,
) -> Result<PodSet, CompileError> {
    let mut sets = pod_sets(job, group_index, version, nodes, settings)?;
    match sets.len() {
        1 => Ok(sets.remove(0)),
        _ => Err(CompileError::new(
            format!("spec.groups[{group_index}].spreads"),
            "spread targets split only service groups",
        )),
    }
}

/// A batch run's spec: every allocation at once (Nomad runs the count in parallel), each
/// pod numbered (`NOMAD_ALLOC_INDEX`), failures retried as [`pod::restart`] says.
fn batch_spec(
    job: &Job,
    group_index: usize,
    template: PodTemplateSpec,
    count: i32,
) -> Result<BatchJobSpec, CompileError> {
    let group = group_at(job, group_index)?;
    Ok(BatchJobSpec {
        completions: Some(count),
        parallelism: Some(count),
        completion_mode: Some("Indexed".to_owned()),
        backoff_limit: Some(pod::restart(group).backoff_limit),
        template,
        ..Default::default()
    })
}

/// A batch group's run of `version`: a batch/v1 Job `<job>-<group>-v<N>` of `count` pods.
pub fn batch_job(
    job: &Job,
    group_index: usize,
    version: i64,
    nodes: &Nodes,
    settings: &Settings,
) -> Result<BatchJob, CompileError> {
    let group = group_at(job, group_index)?;
    let set = single_set(job, group_index, version, nodes, settings)?;
    let labels = template_labels(&set.template);
    Ok(BatchJob {
        metadata: owned(job, names::batch_job(job_name(job), &group.name, version), labels),
        spec: Some(batch_spec(job, group_index, set.template, group.count)?),
        ..Default::default()
    })
}

/// A periodic batch group's CronJobs, one per cron: `<job>-<group>-cron<i>`, in the
/// job's time zone (UTC by default, as Nomad), Forbid when prohibit_overlap, suspended
/// when not enabled. Each launch's pods get `NOMAD_JOB_PARENT_ID` = the Job.
pub fn cron_jobs(
    job: &Job,
    group_index: usize,
    version: i64,
    nodes: &Nodes,
    settings: &Settings,
) -> Result<Vec<CronJob>, CompileError> {
    let group = group_at(job, group_index)?;
    let Some(periodic) = &job.spec.periodic else {
        return Err(CompileError::new("spec.periodic", "the job is not periodic"));
    };
    if job.spec.type_ != JobType::Batch {
        return Err(CompileError::new(
            "spec.periodic",
            "a periodic sysbatch job (one launch per node per tick) has no Kubernetes form: \
             periodic runs only batch jobs",
        ));
    }
    let placement = placement::Placement::of(job, group_index, nodes, settings)?;
    let mut template = pod::template(job, group_index, version, pod::Parent::Periodic)?;
    placement.apply(&mut template, None, None);
    let labels = template_labels(&template);
    let spec = batch_spec(job, group_index, template, group.count)?;
    Ok(periodic
        .crons
        .iter()
        .enumerate()
        .map(|(i, cron)| CronJob {
            metadata: owned(
                job,
                names::cron_job(job_name(job), &group.name, i),
                labels.clone(),
            ),
            spec: Some(CronJobSpec {
                schedule: cron.clone(),
                time_zone: Some(periodic.time_zone.clone().unwrap_or_else(|| "UTC".to_owned())),
                concurrency_policy: Some(
                    if periodic.prohibit_overlap {
                        "Forbid"
                    } else {
                        "Allow"
                    }
                    .to_owned(),
                ),
                suspend: Some(!periodic.enabled),
                job_template: JobTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels.clone()),
                        ..Default::default()
                    }),
                    spec: Some(spec.clone()),
                },
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect())
}

/// A system group as a DaemonSet `<job>-<group>` over the eligible nodes (the placement's
/// required node affinity), rolled by Kubernetes with maxUnavailable = max_parallel
/// (OnDelete when 0) and minReadySeconds = min_healthy_time. Canaries and automatic
/// promotion or revert have no DaemonSet form and are refused.
pub fn daemon_set(
    job: &Job,
    group_index: usize,
    version: i64,
    nodes: &Nodes,
    settings: &Settings,
) -> Result<DaemonSet, CompileError> {
    let group = group_at(job, group_index)?;
    let update = update(job, group_index)?;
    let update_field = |name: &str| {
        if group.update.is_some() {
            format!("spec.groups[{group_index}].update.{name}")
        } else {
            format!("spec.update.{name}")
        }
    };
    if update.canary > 0 {
        return Err(CompileError::new(
            update_field("canary"),
            "a system job has no canaries (as in Nomad): it runs one allocation per node",
        ));
    }
    if update.auto_promote || update.auto_revert {
        let which = if update.auto_promote {
            "autoPromote"
        } else {
            "autoRevert"
        };
        return Err(CompileError::new(
            update_field(which),
            "a DaemonSet rolls forward only: a system job can neither promote nor revert on its own",
        ));
    }
    let set = single_set(job, group_index, version, nodes, settings)?;
    let name = job_name(job);
    let labels = template_labels(&set.template);
    let update_strategy = if update.max_parallel == 0 {
        DaemonSetUpdateStrategy {
            type_: Some("OnDelete".to_owned()),
            rolling_update: None,
        }
    } else {
        DaemonSetUpdateStrategy {
            type_: Some("RollingUpdate".to_owned()),
            rolling_update: Some(RollingUpdateDaemonSet {
                max_unavailable: Some(IntOrString::Int(update.max_parallel)),
                ..Default::default()
            }),
        }
    };
    let min_ready = super::duration::ceil_seconds(update.min_healthy_time);
    Ok(DaemonSet {
        metadata: owned(job, names::daemon_set(name, &group.name), labels),
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(labels::selector(name, &group.name)),
                ..Default::default()
            },
            template: set.template,
            update_strategy: Some(update_strategy),
            min_ready_seconds: Some(i32::try_from(min_ready).unwrap_or(i32::MAX)),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// A sysbatch group's run of `version` on `node`: a batch/v1 Job of one pod, bound to
/// the node (node affinity on its name, as the DaemonSet controller binds), named
/// `<job>-<group>-v<N>-<hash of node>` and annotated with the node's name.
pub fn sysbatch_job(
    job: &Job,
    group_index: usize,
    version: i64,
    node: &str,
    nodes: &Nodes,
    settings: &Settings,
) -> Result<BatchJob, CompileError> {
    let group = group_at(job, group_index)?;
    let placement = placement::Placement::of(job, group_index, nodes, settings)?;
    let mut template = pod::template(job, group_index, version, pod::Parent::OfJob)?;
    placement.apply(&mut template, None, Some(node));
    let mut metadata = owned(
        job,
        names::sysbatch_job(job_name(job), &group.name, version, node),
        template_labels(&template),
    );
    metadata.annotations = Some(BTreeMap::from([(labels::NODE.to_owned(), node.to_owned())]));
    Ok(BatchJob {
        metadata,
        spec: Some(batch_spec(job, group_index, template, 1)?),
        ..Default::default()
    })
}

/// The nodes group `group_index` may run on now (system and sysbatch): schedulable, in
/// the job's datacenters, meeting every constraint.
pub fn eligible_nodes(
    job: &Job,
    group_index: usize,
    nodes: &Nodes,
    settings: &Settings,
) -> Result<Vec<String>, CompileError> {
    placement::eligible(job, group_index, nodes, settings)
}

/// A dispatched child's payload as the Secret `<child>-payload` its tasks mount (key
/// `payload`), owned by the child; None without a payload.
pub fn payload_secret(child: &Job) -> Result<Option<Secret>, CompileError> {
    let Some(payload) = child.spec.dispatch.as_ref().and_then(|d| d.payload.as_ref()) else {
        return Ok(None);
    };
    // ByteString reads base64, as the Secret's data field does on the wire.
    let bytes: ByteString = serde_json::from_value(serde_json::Value::String(payload.clone()))
        .map_err(|_| CompileError::new("spec.dispatch.payload", "not base64"))?;
    let name = job_name(child);
    Ok(Some(Secret {
        metadata: owned(child, names::payload_secret(name), labels::job(name)),
        data: Some(BTreeMap::from([(pod::PAYLOAD_KEY.to_owned(), bytes)])),
        type_: Some("Opaque".to_owned()),
        ..Default::default()
    }))
}
