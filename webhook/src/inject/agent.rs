//! Secrets agent injection (pure): whether a pod asks for the agent, whether its
//! annotations are valid, and the JSON patch (RFC 6902) that gives it the agent.
//!
//! A pod asks with `capstan.dev/agent-inject: "true"`, `capstan.dev/agent-role: <role>`
//! and one `capstan.dev/agent-inject-secret-<file>: <path>` per file (a KV v2
//! `<mount>/data/<key>` or a database `<mount>/creds/<role>`), optionally
//! `capstan.dev/agent-inject-template-<file>: <text with {{ field }}>`,
//! `capstan.dev/agent-init-only: "true"` and `capstan.dev/agent-run-as-user: <uid>`.
//!
//! It gets: a memory-backed emptyDir (`capstan-secrets`, nothing reaches etcd or the
//! node's disk) mounted read-only at `/capstan/secrets` into every container of its own;
//! a projected ServiceAccount token with audience `capstan-engine`; and the agent, first
//! of the init containers, as a native sidecar (restartPolicy Always with a startup probe
//! on its `/ready`: the next containers start only once every file exists, and a Job
//! still completes) or, in init-only mode, as a plain init container that renders once.
//! The agent runs as the app's UID (the files are 0400), never as root, read-only root
//! filesystem, no capabilities, small requests.
//!
//! The agent checks the same names and paths again before it writes anything (S4): the
//! rules here and in `capstan-sidecar`'s `agent::args` are the same, each tested.

use super::{
    Config, Refusal, api_token_mount, append_volumes, env, field_env, prepend_init_containers,
    read_only_mount, ready_probe, resources, restricted_security_context, set_annotation, sidecar, tcp_port,
    to_value, token_file, token_volume,
};
use capstan_contract::{
    ENGINE_AUDIENCE,
    annotations::agent::{
        AGENT_LABEL, AGENT_LABEL_VALUE, FAMILY, INIT_ONLY, INJECT, INJECTED, REVOKE_FINALIZER, ROLE,
        RUN_AS_USER, SECRET_PREFIX, TEMPLATE_PREFIX,
    },
    env::{agent as vars, proxy},
};
use capstan_mesh::selection;
use k8s_openapi::{
    api::core::v1::{Container, EmptyDirVolumeSource, Pod, Volume, VolumeMount},
    apimachinery::pkg::api::resource::Quantity,
};
use serde_json::{Value, json};
use std::collections::BTreeMap;

pub const AGENT_CONTAINER: &str = "capstan-agent";
pub const SECRETS_VOLUME: &str = "capstan-secrets";
pub use capstan_contract::env::agent::SECRETS_DIR;
pub const TOKEN_VOLUME: &str = "capstan-engine-token";
pub const TOKEN_DIR: &str = "/var/run/secrets/capstan.dev/engine";
pub const ADMIN_PORT: i32 = 15021;
/// The agent's UID when neither the annotation nor the app names one.
pub const DEFAULT_UID: i64 = 65532;

/// Whether a pod in `namespace` asks for the agent (never in excluded namespaces).
pub fn wanted(
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    config: &Config,
) -> bool {
    !selection::excluded(namespace, namespace_labels, &config.selection)
        && annotations
            .get(INJECT)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// One file the agent renders.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SecretFile {
    pub file: String,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

/// What the annotations ask for, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub role: String,
    pub secrets: Vec<SecretFile>,
    pub init_only: bool,
    pub run_as_user: Option<i64>,
}

/// Reads and validates the agent annotations; every problem names its annotation.
pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Wanted, Vec<Refusal>> {
    let mut refusals = Vec::new();
    let role = annotations
        .get(ROLE)
        .map(|r| r.trim().to_owned())
        .unwrap_or_default();
    if role.is_empty() {
        refusals.push(Refusal::annotation(
            ROLE,
            "required: the engine's Kubernetes auth role the agent logs in with",
        ));
    } else if role.len() > 128
        || !role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
    {
        refusals.push(Refusal::annotation(
            ROLE,
            format!("{role:?} is not a role name (letters, digits, '-', '_', '.', '@')"),
        ));
    }
    let mut secrets: Vec<SecretFile> = Vec::new();
    let mut templates = BTreeMap::new();
    let mut init_only = false;
    let mut run_as_user = None;
    for (key, value) in annotations {
        if let Some(file) = key.strip_prefix(SECRET_PREFIX) {
            if let Err(message) = check_file_name(file) {
                refusals.push(Refusal::annotation(key, format!("file name {file:?}: {message}")));
            }
            if let Err(message) = check_path(value.trim()) {
                refusals.push(Refusal::annotation(key, message));
            }
            secrets.push(SecretFile {
                file: file.to_owned(),
                path: value.trim().to_owned(),
                template: None,
            });
        } else if let Some(file) = key.strip_prefix(TEMPLATE_PREFIX) {
            if let Err(message) = check_template(value) {
                refusals.push(Refusal::annotation(key, format!("template: {message}")));
            }
            templates.insert(file.to_owned(), (key.clone(), value.clone()));
        } else if key == INIT_ONLY {
            match value.trim().to_ascii_lowercase().as_str() {
                "true" => init_only = true,
                "false" => {}
                _ => refusals.push(Refusal::annotation(
                    key,
                    format!("{value:?} is neither \"true\" nor \"false\""),
                )),
            }
        } else if key == RUN_AS_USER {
            match value.trim().parse::<i64>() {
                Ok(uid) if uid > 0 => run_as_user = Some(uid),
                _ => refusals.push(Refusal::annotation(
                    key,
                    format!("{value:?} is not a UID above 0 (the agent never runs as root)"),
                )),
            }
        } else if key.starts_with(FAMILY) && ![INJECT, ROLE, INJECTED].contains(&key.as_str()) {
            refusals.push(Refusal::annotation(
                key,
                format!(
                    "unknown agent annotation; the agent reads {ROLE}, {SECRET_PREFIX}<file>, \
                     {TEMPLATE_PREFIX}<file>, {INIT_ONLY} and {RUN_AS_USER}"
                ),
            ));
        }
    }
    for (file, (key, template)) in templates {
        match secrets.iter_mut().find(|s| s.file == file) {
            Some(secret) => secret.template = Some(template),
            None => refusals.push(Refusal::annotation(
                &key,
                format!("no {SECRET_PREFIX}{file} annotation names the secret this template renders"),
            )),
        }
    }
    if secrets.is_empty() {
        refusals.push(Refusal::annotation(
            &format!("{SECRET_PREFIX}<file>"),
            "the pod asks for the agent but names no secret: add one annotation per file, \
             with a KV path (<mount>/data/<key>) or a database role (<mount>/creds/<role>)",
        ));
    }
    if refusals.is_empty() {
        Ok(Wanted {
            role,
            secrets,
            init_only,
            run_as_user,
        })
    } else {
        Err(refusals)
    }
}

/// The agent's rules for file names (S4) and engine paths, shared with the agent itself.
pub use capstan_crds::secrets::check_file_name;

/// The agent's rule for engine paths: `<mount>/data/<key>` or `<mount>/creds/<role>`.
pub fn check_path(path: &str) -> Result<(), String> {
    capstan_crds::secrets::agent_path_kind(path).map(|_| ())
}

/// The agent's template grammar: `{{ field }}` placeholders, nothing else.
pub fn check_template(text: &str) -> Result<(), String> {
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or("a '{{' is never closed")?;
        let name = after[..close].trim();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(format!("{{{{ {name} }}}} is not a field name"));
        }
        rest = &after[close + 2..];
    }
    Ok(())
}

/// Whether the pod already carries the agent (the idempotency marker).
pub fn is_injected(pod: &Pod) -> bool {
    pod.spec
        .iter()
        .flat_map(|spec| spec.init_containers.iter().flatten())
        .any(|c| c.name == AGENT_CONTAINER)
}

/// The operations that give `pod` the agent, `Ok(None)` when it has it already, or why
/// it cannot have it. `ca_bundle` is the PEM of the mesh roots the engine's certificate
/// chains to. Call only for pods `wanted` selects.
pub fn inject(pod: &Pod, config: &Config, ca_bundle: &str) -> Result<Option<Vec<Value>>, Vec<Refusal>> {
    let wanted = parse(super::annotations(pod))?;
    let Some(spec) = &pod.spec else {
        return Err(vec![Refusal {
            field: "spec".into(),
            message: "a pod without a spec cannot have the agent".into(),
        }]);
    };
    let init_containers = spec.init_containers.as_deref().unwrap_or_default();
    if let Some((i, existing)) = init_containers
        .iter()
        .enumerate()
        .find(|(_, c)| c.name == AGENT_CONTAINER)
    {
        if existing.image.as_deref() != Some(config.image.as_str()) {
            return Err(vec![Refusal {
                field: format!("spec.initContainers[{i}]"),
                message: format!(
                    "a container named {AGENT_CONTAINER} is reserved for the secrets agent, and this one runs image {:?}, not {:?}",
                    existing.image.as_deref().unwrap_or_default(),
                    config.image
                ),
            }]);
        }
        return Ok(None);
    }
    let mut refusals = Vec::new();
    for (list, containers) in [
        ("spec.initContainers", init_containers),
        ("spec.containers", spec.containers.as_slice()),
    ] {
        for (i, container) in containers.iter().enumerate() {
            if container
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.mount_path.trim_end_matches('/') == SECRETS_DIR)
            {
                refusals.push(Refusal {
                    field: format!("{list}[{i}].volumeMounts"),
                    message: format!(
                        "container {:?} already mounts something at {SECRETS_DIR}, where the agent's files go",
                        container.name
                    ),
                });
            }
        }
    }
    for volume in spec.volumes.iter().flatten() {
        if volume.name == SECRETS_VOLUME || volume.name == TOKEN_VOLUME {
            refusals.push(Refusal {
                field: "spec.volumes".into(),
                message: format!(
                    "the volume name {:?} is reserved for the secrets agent",
                    volume.name
                ),
            });
        }
    }
    if !refusals.is_empty() {
        return Err(refusals);
    }

    let mut ops = Vec::new();
    // The files, read-only, in every container of the pod's own (init containers too:
    // they start after the agent, so a migration can use the credential).
    let mount = to_value(&read_only_mount(SECRETS_VOLUME, SECRETS_DIR));
    for (list, containers) in [
        ("initContainers", init_containers),
        ("containers", spec.containers.as_slice()),
    ] {
        for (i, container) in containers.iter().enumerate() {
            if list == "initContainers" && container.name.starts_with("capstan-") {
                continue;
            }
            if container.volume_mounts.is_none() {
                ops.push(
                    json!({"op": "add", "path": format!("/spec/{list}/{i}/volumeMounts"), "value": [mount]}),
                );
            } else {
                ops.push(
                    json!({"op": "add", "path": format!("/spec/{list}/{i}/volumeMounts/-"), "value": mount}),
                );
            }
        }
    }

    let uid = wanted.run_as_user.or_else(|| app_uid(pod)).unwrap_or(DEFAULT_UID);
    let mut agent = agent_container(config, ca_bundle, &wanted, uid);
    if let Some(api_token) = api_token_mount(spec) {
        agent
            .volume_mounts
            .get_or_insert_with(Vec::new)
            .push(api_token.clone());
    }
    // First of the init containers: before the mesh's redirect and the pod's own.
    prepend_init_containers(spec, vec![to_value(&agent)], &mut ops);
    append_volumes(
        spec,
        vec![
            to_value(&secrets_volume()),
            to_value(&token_volume(TOKEN_VOLUME, ENGINE_AUDIENCE)),
        ],
        &mut ops,
    );
    set_annotation(pod, INJECTED, &config.version, &mut ops);
    revoke_on_stop(pod, &mut ops);
    Ok(Some(ops))
}

/// The operations that hand the pod's credentials to the credentials reconciler when it
/// stops (RELIABILITY N2): its label, which the reconciler watches by, and the finalizer
/// it removes once the engine has revoked what the agent logged in for.
fn revoke_on_stop(pod: &Pod, ops: &mut Vec<Value>) {
    // RFC 6901: `/` in a member name is `~1`.
    let label = AGENT_LABEL.replace('~', "~0").replace('/', "~1");
    if pod.metadata.labels.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/labels", "value": {AGENT_LABEL: AGENT_LABEL_VALUE}}));
    } else {
        ops.push(
            json!({"op": "add", "path": format!("/metadata/labels/{label}"), "value": AGENT_LABEL_VALUE}),
        );
    }
    match &pod.metadata.finalizers {
        None => ops.push(json!({"op": "add", "path": "/metadata/finalizers", "value": [REVOKE_FINALIZER]})),
        Some(finalizers) if !finalizers.iter().any(|f| f == REVOKE_FINALIZER) => {
            ops.push(json!({"op": "add", "path": "/metadata/finalizers/-", "value": REVOKE_FINALIZER}));
        }
        Some(_) => {}
    }
}

/// The UID the app runs as, when the pod says (the first app container's, else the
/// pod's), and it is not root.
fn app_uid(pod: &Pod) -> Option<i64> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .first()
        .and_then(|c| c.security_context.as_ref())
        .and_then(|sc| sc.run_as_user)
        .or_else(|| spec.security_context.as_ref().and_then(|sc| sc.run_as_user))
        .filter(|uid| *uid > 0)
}

fn agent_container(config: &Config, ca_bundle: &str, wanted: &Wanted, uid: i64) -> Container {
    let mut env = vec![
        // The agent reads the pod's namespace and name under the proxy's names.
        field_env(proxy::NAMESPACE, "metadata.namespace"),
        field_env(proxy::POD_NAME, "metadata.name"),
        self::env(vars::ENGINE_URL, config.ca_url.clone()),
        self::env(vars::ROLE, wanted.role.clone()),
        self::env(vars::TOKEN_FILE, token_file(TOKEN_DIR)),
        self::env(vars::CA_BUNDLE, ca_bundle),
        self::env(vars::DIR, SECRETS_DIR),
        self::env(
            vars::SECRETS,
            serde_json::to_string(&wanted.secrets).expect("secret specs serialize"),
        ),
        self::env(vars::ADMIN_ADDR, format!("0.0.0.0:{ADMIN_PORT}")),
    ];
    if wanted.init_only {
        env.push(self::env(vars::INIT_ONLY, "true"));
    }
    Container {
        env: Some(env),
        // A native sidecar: started first, kept beside the app, stopped after it (and so
        // revoking last), not waited for by a Job. Init-only: runs once, to completion.
        restart_policy: (!wanted.init_only).then(|| "Always".into()),
        startup_probe: (!wanted.init_only).then(|| ready_probe(ADMIN_PORT, 1, 300)),
        ports: (!wanted.init_only).then(|| vec![tcp_port("capstan-agent", ADMIN_PORT)]),
        resources: Some(resources("5m", "16Mi", "64Mi")),
        security_context: Some(restricted_security_context(uid)),
        volume_mounts: Some(vec![
            // The agent writes the files; the app's containers mount them read-only.
            VolumeMount {
                name: SECRETS_VOLUME.into(),
                mount_path: SECRETS_DIR.into(),
                ..Default::default()
            },
            read_only_mount(TOKEN_VOLUME, TOKEN_DIR),
        ]),
        ..sidecar(config, AGENT_CONTAINER, &["agent"])
    }
}

fn secrets_volume() -> Volume {
    Volume {
        name: SECRETS_VOLUME.into(),
        // tmpfs: the files never touch the node's disk, and nothing is stored in etcd.
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: Some(Quantity("4Mi".into())),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::init_container_names;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    fn pod(annotations: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "app-1", "namespace": "shop", "annotations": annotations},
            "spec": {
                "serviceAccountName": "app",
                "initContainers": [{"name": "migrate", "image": "app:1"}],
                "containers": [
                    {"name": "app", "image": "app:1", "securityContext": {"runAsUser": 1000}},
                    {"name": "logs", "image": "logs:1", "volumeMounts": [{"name": "x", "mountPath": "/x"}]},
                ],
                "volumes": [{"name": "x", "emptyDir": {}}],
            },
        }))
        .unwrap()
    }

    fn asking() -> Value {
        json!({
            "capstan.dev/agent-inject": "true",
            "capstan.dev/agent-role": "app",
            "capstan.dev/agent-inject-secret-db": "database/creds/app",
            "capstan.dev/agent-inject-secret-config.json": "secret/data/app/config",
            "capstan.dev/agent-inject-template-db": "postgresql://{{ username }}:{{ password }}@db/app",
        })
    }

    fn apply(pod: &Pod, ops: &[Value]) -> Pod {
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops.to_vec())).unwrap();
        let mut doc = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut doc, &patch).unwrap();
        serde_json::from_value(doc).unwrap()
    }

    fn injected(pod: &Pod) -> Pod {
        let ops = inject(pod, &Config::default(), "PEM").unwrap().expect("a patch");
        apply(pod, &ops)
    }

    fn env_of(container: &Container, name: &str) -> Option<String> {
        container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    }

    #[test]
    fn the_annotation_selects_and_excluded_namespaces_never_get_the_agent() {
        let config = Config::default();
        let none = BTreeMap::new();
        let yes: BTreeMap<String, String> = [(INJECT.to_owned(), "true".to_owned())].into();
        let no: BTreeMap<String, String> = [(INJECT.to_owned(), "false".to_owned())].into();
        assert!(wanted("shop", &none, &yes, &config));
        assert!(!wanted("shop", &none, &no, &config));
        assert!(!wanted("shop", &none, &none, &config));
        assert!(!wanted("kube-system", &none, &yes, &config));
        let disguised: BTreeMap<String, String> = [(
            capstan_contract::annotations::NAMESPACE_NAME_LABEL.to_owned(),
            "capstan-system".to_owned(),
        )]
        .into();
        assert!(!wanted("capstan-system", &disguised, &yes, &config));
    }

    #[test]
    fn the_agent_is_a_native_sidecar_first_with_the_volumes_and_read_only_mounts() {
        let pod = injected(&pod(asking()));
        let spec = pod.spec.as_ref().unwrap();
        let inits = spec.init_containers.as_ref().unwrap();
        let names: Vec<_> = inits.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["capstan-agent", "migrate"]);
        let agent = &inits[0];
        assert_eq!(agent.restart_policy.as_deref(), Some("Always"));
        let probe = agent.startup_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(probe.path.as_deref(), Some("/ready"));
        assert_eq!(probe.port, IntOrString::Int(ADMIN_PORT));
        assert_eq!(agent.command.as_ref().unwrap()[1], "agent");
        let sc = agent.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        // The app's UID, so the app can read its 0400 files.
        assert_eq!(sc.run_as_user, Some(1000));
        assert_eq!(
            agent.resources.as_ref().unwrap().requests.as_ref().unwrap()["memory"],
            Quantity("16Mi".into())
        );
        assert_eq!(env_of(agent, "CAPSTAN_AGENT_ROLE").as_deref(), Some("app"));
        assert_eq!(env_of(agent, "CAPSTAN_AGENT_CA_BUNDLE").as_deref(), Some("PEM"));
        let secrets: Value = serde_json::from_str(&env_of(agent, "CAPSTAN_AGENT_SECRETS").unwrap()).unwrap();
        assert_eq!(
            secrets,
            json!([
                {"file": "config.json", "path": "secret/data/app/config"},
                {"file": "db", "path": "database/creds/app", "template": "postgresql://{{ username }}:{{ password }}@db/app"},
            ])
        );
        assert_eq!(env_of(agent, "CAPSTAN_AGENT_INIT_ONLY"), None);

        let volumes = spec.volumes.as_ref().unwrap();
        let secrets_volume = volumes.iter().find(|v| v.name == SECRETS_VOLUME).unwrap();
        assert_eq!(
            secrets_volume.empty_dir.as_ref().unwrap().medium.as_deref(),
            Some("Memory")
        );
        let token = volumes.iter().find(|v| v.name == TOKEN_VOLUME).unwrap();
        let projection = token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
            .service_account_token
            .as_ref()
            .unwrap();
        assert_eq!(projection.audience.as_deref(), Some("capstan-engine"));
        // Read-only in every container of the pod's own, the init container included.
        for container in spec.containers.iter().chain(&inits[1..]) {
            let mount = container
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == SECRETS_VOLUME)
                .unwrap_or_else(|| panic!("{} has no mount", container.name));
            assert_eq!(mount.mount_path, SECRETS_DIR);
            assert_eq!(mount.read_only, Some(true));
        }
        assert_eq!(
            pod.metadata.annotations.as_ref().unwrap()[INJECTED],
            Config::default().version
        );
    }

    /// RELIABILITY N2: the pod carries the finalizer the credentials reconciler removes
    /// once the engine revoked its logins, and the label it watches by, next to the
    /// pod's own (with or without labels and finalizers of its own, never twice).
    #[test]
    fn the_pod_waits_for_its_credentials_to_be_revoked() {
        let pod = injected(&pod(asking()));
        assert_eq!(
            pod.metadata.finalizers.as_deref(),
            Some(&[REVOKE_FINALIZER.to_owned()][..])
        );
        assert_eq!(
            pod.metadata.labels.as_ref().unwrap()[AGENT_LABEL],
            AGENT_LABEL_VALUE
        );
        let mut own = self::pod(asking());
        own.metadata.labels = Some([("app".to_owned(), "shop".to_owned())].into());
        own.metadata.finalizers = Some(vec!["example.com/keep".into()]);
        let patched = injected(&own);
        assert_eq!(
            patched.metadata.finalizers.as_deref(),
            Some(&["example.com/keep".to_owned(), REVOKE_FINALIZER.to_owned()][..])
        );
        let labels = patched.metadata.labels.as_ref().unwrap();
        assert_eq!(
            (labels["app"].as_str(), labels[AGENT_LABEL].as_str()),
            ("shop", AGENT_LABEL_VALUE)
        );
        own.metadata.finalizers = Some(vec![REVOKE_FINALIZER.into()]);
        assert_eq!(injected(&own).metadata.finalizers.unwrap().len(), 1);
    }

    /// In a meshed pod the webhook applies the mesh's patch in memory and computes the
    /// agent's on the result: the two, in one response, apply in order to the pod as the
    /// API server sent it, and a second pass adds nothing.
    #[test]
    fn with_the_mesh_both_patches_apply_in_order_and_the_agent_comes_first() {
        use crate::inject::mesh::{self as injection, Injection};
        let original = pod(asking());
        let Ok(Injection::Patch(mut ops)) = injection::inject(&original, &Config::default(), "PEM") else {
            panic!("not meshed");
        };
        let meshed = apply(&original, &ops);
        ops.extend(inject(&meshed, &Config::default(), "PEM").unwrap().unwrap());
        let both = apply(&original, &ops);
        assert_eq!(
            init_container_names(&both),
            ["capstan-agent", "capstan-init", "capstan-proxy", "migrate"]
        );
        // Our own containers do not get the files; the pod's do.
        let inits = both.spec.as_ref().unwrap().init_containers.as_ref().unwrap();
        let mounts = |c: &Container| c.volume_mounts.iter().flatten().any(|m| m.name == SECRETS_VOLUME);
        assert!(!mounts(&inits[1]) && !mounts(&inits[2]) && mounts(&inits[3]));
        assert_eq!(
            injection::inject(&both, &Config::default(), "PEM").unwrap(),
            Injection::AlreadyInjected
        );
        assert_eq!(inject(&both, &Config::default(), "PEM").unwrap(), None);
    }

    #[test]
    fn init_only_is_a_plain_init_container_without_probe() {
        let mut annotations = asking();
        annotations[INIT_ONLY] = json!("true");
        let pod = injected(&pod(annotations));
        let agent = &pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
        assert_eq!(agent.name, AGENT_CONTAINER);
        assert_eq!(agent.restart_policy, None);
        assert!(agent.startup_probe.is_none());
        assert_eq!(env_of(agent, "CAPSTAN_AGENT_INIT_ONLY").as_deref(), Some("true"));
    }

    #[test]
    fn a_second_pass_adds_nothing_and_a_fake_agent_is_refused() {
        let once = injected(&pod(asking()));
        assert_eq!(inject(&once, &Config::default(), "PEM").unwrap(), None);
        let mut fake = pod(asking());
        fake.spec.as_mut().unwrap().init_containers.as_mut().unwrap()[0] = Container {
            name: AGENT_CONTAINER.into(),
            image: Some("evil:1".into()),
            ..Default::default()
        };
        let refusals = inject(&fake, &Config::default(), "PEM").unwrap_err();
        assert_eq!(refusals[0].field, "spec.initContainers[0]");
    }

    #[test]
    fn uid_from_the_annotation_then_the_app_never_root() {
        let mut annotations = asking();
        annotations[RUN_AS_USER] = json!("4242");
        let pod_ = injected(&pod(annotations));
        let uid = |p: &Pod| {
            p.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0]
                .security_context
                .as_ref()
                .unwrap()
                .run_as_user
        };
        assert_eq!(uid(&pod_), Some(4242));
        let mut root_app = pod(asking());
        root_app.spec.as_mut().unwrap().containers[0].security_context =
            Some(k8s_openapi::api::core::v1::SecurityContext {
                run_as_user: Some(0),
                ..Default::default()
            });
        assert_eq!(uid(&injected(&root_app)), Some(DEFAULT_UID));
    }

    #[test]
    fn bad_annotations_are_refused_naming_them() {
        let cases = [
            (
                "capstan.dev/agent-inject-secret-..",
                json!("secret/data/a"),
                "capstan.dev/agent-inject-secret-..",
            ),
            (
                "capstan.dev/agent-inject-secret-a..b",
                json!("secret/data/a"),
                "'..'",
            ),
            (
                "capstan.dev/agent-inject-secret-.env",
                json!("secret/data/a"),
                "start with '.'",
            ),
            (
                "capstan.dev/agent-inject-secret-x",
                json!("pki/issue/web"),
                "unknown kind",
            ),
            (
                "capstan.dev/agent-inject-secret-y",
                json!("secret/data/../sys"),
                "'..' segment",
            ),
            (
                "capstan.dev/agent-inject-template-nofile",
                json!("{{ a }}"),
                "names the secret",
            ),
            (
                "capstan.dev/agent-inject-template-db",
                json!("{{ a"),
                "never closed",
            ),
            (
                "capstan.dev/agent-init-only",
                json!("yes"),
                "capstan.dev/agent-init-only",
            ),
            ("capstan.dev/agent-run-as-user", json!("0"), "never runs as root"),
            (
                "capstan.dev/agent-inject-secrets-typo",
                json!("secret/data/a"),
                "unknown agent annotation",
            ),
        ];
        for (key, value, expected) in cases {
            let mut annotations = asking();
            annotations[key] = value;
            let refusals = inject(&pod(annotations), &Config::default(), "PEM").unwrap_err();
            let text = refusals
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            assert!(text.contains(key), "{key}: {text}");
            assert!(text.contains(expected), "{key}: {text}");
        }
        let mut no_role = asking();
        no_role.as_object_mut().unwrap().remove(ROLE);
        let text = inject(&pod(no_role), &Config::default(), "PEM").unwrap_err()[0].to_string();
        assert!(text.contains(ROLE), "{text}");
        let only_inject = json!({"capstan.dev/agent-inject": "true", "capstan.dev/agent-role": "r"});
        let text = inject(&pod(only_inject), &Config::default(), "PEM").unwrap_err()[0].to_string();
        assert!(text.contains("names no secret"), "{text}");
    }

    #[test]
    fn a_pod_that_already_uses_the_folder_or_the_volume_names_is_refused() {
        let mut p = pod(asking());
        p.spec.as_mut().unwrap().containers[1].volume_mounts = Some(vec![VolumeMount {
            name: "x".into(),
            mount_path: SECRETS_DIR.into(),
            ..Default::default()
        }]);
        let refusals = inject(&p, &Config::default(), "PEM").unwrap_err();
        assert_eq!(refusals[0].field, "spec.containers[1].volumeMounts");
    }
}
