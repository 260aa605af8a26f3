//! The injectors (pure): whether a pod gets the mesh sidecar ([`mesh`]) or the secrets
//! agent ([`agent`]), and the JSON patch (RFC 6902) that gives it to them. The admission
//! handler is the only caller; keeping them free of IO lets them be tested against
//! fixtures (`webhook/tests/patches` pins the bytes) and benchmarked alone.
//!
//! What both inject is built here, once: the environment, the restricted security
//! context, the resources, the startup probe on `/ready`, the projected token volume, the
//! API token mount, and the operations that put containers, volumes and the version
//! annotation into a pod.

pub mod agent;
pub mod mesh;

use capstan_mesh::selection;
use k8s_openapi::{
    api::core::v1::{
        Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector,
        Pod, PodSpec, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext,
        ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// What the injectors put into pods; fixed for the life of the webhook process.
#[derive(Clone, Debug)]
pub struct Config {
    /// The image holding `capstan-sidecar` (the proxy, the redirect and the agent).
    pub image: String,
    pub image_pull_policy: Option<String>,
    /// The `capstan-sidecar` executable inside the image.
    pub sidecar_command: String,
    /// Written into `capstan.dev/injected` and `capstan.dev/agent-injected`.
    pub version: String,
    /// The engine's URL: the mesh CA the proxy gets its certificates from, and where the
    /// agent logs in.
    pub ca_url: String,
    /// The SPIFFE trust domain of workload identities.
    pub trust_domain: String,
    /// What the proxy applies when no intention matches (deny unless the chart says
    /// otherwise, for migrations only).
    pub default_allow: bool,
    /// Capstan's own namespace, the only one whose intentions may govern other
    /// namespaces.
    pub control_namespace: String,
    /// Which pods are meshed; its excluded namespaces never get the agent either.
    pub selection: selection::Config,
    pub proxy_cpu_request: String,
    pub proxy_memory_request: String,
    pub proxy_memory_limit: String,
    /// CIDRs whose outbound traffic the redirect leaves alone (e.g. the API server's).
    pub exclude_outbound_cidrs: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            image: "capstan:0.1.0".into(),
            image_pull_policy: None,
            sidecar_command: "/usr/local/bin/capstan-sidecar".into(),
            version: "0.1.0".into(),
            ca_url: "https://capstan-engine.capstan-system.svc:8200".into(),
            trust_domain: "cluster.local".into(),
            default_allow: false,
            control_namespace: "capstan-system".into(),
            selection: selection::Config::default(),
            proxy_cpu_request: "10m".into(),
            proxy_memory_request: "16Mi".into(),
            proxy_memory_limit: "64Mi".into(),
            exclude_outbound_cidrs: Vec::new(),
        }
    }
}

/// Why a pod that asks for an injection is refused; each names the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Refusal {
    pub field: String,
    pub message: String,
}

impl Refusal {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A refusal naming the annotation `key`.
    pub fn annotation(key: &str, message: impl Into<String>) -> Self {
        Self::new(format!("metadata.annotations[{key}]"), message)
    }
}

/// A pod's annotations, borrowed (none: empty). The admission handler and both injectors
/// read them; nothing needs its own copy.
pub fn annotations(pod: &Pod) -> &BTreeMap<String, String> {
    static NONE: BTreeMap<String, String> = BTreeMap::new();
    pod.metadata.annotations.as_ref().unwrap_or(&NONE)
}

/// Where the ServiceAccount admission plugin mounts the pod's API token.
const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Where each injected container's projected token is mounted (the file is `token`).
fn token_file(dir: &str) -> String {
    format!("{dir}/token")
}

fn to_value<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("k8s-openapi types serialize")
}

/// A container of `name` that runs `capstan-sidecar` with `subcommand` from the
/// configured image.
fn sidecar(config: &Config, name: &str, subcommand: &[&str]) -> Container {
    let mut command = vec![config.sidecar_command.clone()];
    command.extend(subcommand.iter().map(|s| (*s).to_owned()));
    Container {
        name: name.into(),
        image: Some(config.image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        command: Some(command),
        ..Default::default()
    }
}

/// An environment variable with a fixed value.
fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

/// An environment variable from a field of the pod (downward API).
fn field_env(name: &str, field: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field.into(),
                api_version: None,
            }),
            ..Default::default()
        }),
        value: None,
    }
}

/// What an injected container that needs no privilege runs with (the proxy, the secrets
/// agent): a fixed non-root UID, read-only root, no capabilities, RuntimeDefault seccomp.
fn restricted_security_context(uid: i64) -> SecurityContext {
    SecurityContext {
        run_as_user: Some(uid),
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..Default::default()
    }
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        localhost_profile: None,
    }
}

/// CPU and memory requests and a memory limit (no CPU limit: throttling the proxy or the
/// agent would stall the app's traffic or its secrets).
fn resources(cpu_request: &str, memory_request: &str, memory_limit: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(
            [
                ("cpu".to_owned(), Quantity(cpu_request.into())),
                ("memory".to_owned(), Quantity(memory_request.into())),
            ]
            .into(),
        ),
        limits: Some([("memory".to_owned(), Quantity(memory_limit.into()))].into()),
        ..Default::default()
    }
}

/// A named TCP port of an injected container.
fn tcp_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// A probe of an injected container's `/ready` on its admin port.
fn ready_probe(port: i32, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/ready".into()),
            port: IntOrString::Int(port),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Default::default()
    }
}

/// A projected ServiceAccount token for `audience`, one hour (rotated by the kubelet),
/// bound to the pod, readable by the container's group.
fn token_volume(name: &str, audience: &str) -> Volume {
    Volume {
        name: name.into(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o440),
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(audience.into()),
                    expiration_seconds: Some(3600),
                    path: "token".into(),
                }),
                ..Default::default()
            }]),
        }),
        ..Default::default()
    }
}

fn read_only_mount(volume: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    }
}

/// The mount of the pod's API token that the ServiceAccount plugin gave its containers.
///
/// The plugin, which ran before webhooks, runs again after a webhook changes the pod: it
/// would add this mount to the injected containers, and that change would make the API
/// server call the webhooks a second time (reinvocationPolicy IfNeeded). Giving them the
/// mount it would add anyway spares that round trip.
fn api_token_mount(spec: &PodSpec) -> Option<&VolumeMount> {
    spec.containers
        .iter()
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .find(|m| m.mount_path == SERVICE_ACCOUNT_MOUNT)
}

/// The operations that put `ours` (in order) before the pod's init containers.
fn prepend_init_containers(spec: &PodSpec, ours: Vec<Value>, ops: &mut Vec<Value>) {
    if spec.init_containers.as_ref().is_none_or(Vec::is_empty) {
        ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": ours}));
    } else {
        for container in ours.into_iter().rev() {
            ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": container}));
        }
    }
}

/// The operations that add `volumes` after the pod's own.
fn append_volumes(spec: &PodSpec, volumes: Vec<Value>, ops: &mut Vec<Value>) {
    if spec.volumes.is_none() {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": volumes}));
    } else {
        for volume in volumes {
            ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume}));
        }
    }
}

/// The operation that sets the annotation `key` to the injecting version (`add` replaces
/// an existing member: a hand-set value is overwritten).
fn set_annotation(pod: &Pod, key: &str, value: &str, ops: &mut Vec<Value>) {
    if pod.metadata.annotations.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {key: value}}));
    } else {
        // RFC 6901: `~` and `/` in a member name are escaped.
        let member = key.replace('~', "~0").replace('/', "~1");
        ops.push(json!({"op": "add", "path": format!("/metadata/annotations/{member}"), "value": value}));
    }
}

/// The names of a pod's init containers, in order.
#[cfg(test)]
fn init_container_names(pod: &Pod) -> Vec<&str> {
    let spec = pod.spec.as_ref().expect("a pod with a spec");
    spec.init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect()
}
