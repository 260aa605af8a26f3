//! The patches `/mutate-pods` answers, pinned byte for byte.
//!
//! Each case is a pod sent through the handler as the API server sends it; what it
//! answers (allowed or refused, the message, the warnings, and the JSON patch's exact
//! bytes) must equal `webhook/tests/patches/<case>.json`, which was written from the
//! injectors as they were before they moved into `inject/` (issue 16). A change to what
//! is injected is deliberate: re-record with `CAPSTAN_BLESS_PATCHES=1 cargo test -p
//! capstan-webhook golden` and review the diff of the files.

use super::AppState;
use capstan_contract::annotations;
use capstan_webhook::inject;
use serde_json::{Value, json};
use std::sync::Arc;

/// A webhook with `config`, a namespace `meshed` (labelled) and `plain` (not) in its
/// cache, the roots `PEM` read, and no API server behind its client.
fn state(config: inject::Config) -> Arc<AppState> {
    let meshed: &[(&str, &str)] = &[(annotations::mesh::LABEL, annotations::mesh::LABEL_ENABLED)];
    super::tests::offline_state(config, &[("meshed", meshed), ("plain", &[])])
}

/// Every field of the configuration set to something other than its default; the engine
/// at a literal address, so that a pod with both the proxy and the agent gets its /32.
fn custom_config() -> inject::Config {
    inject::Config {
        image: "registry.example/capstan:9.9.9".into(),
        image_pull_policy: Some("IfNotPresent".into()),
        sidecar_command: "/bin/capstan-sidecar".into(),
        version: "9.9.9".into(),
        ca_url: "https://10.96.0.10:8200".into(),
        trust_domain: "corp.example".into(),
        default_allow: true,
        control_namespace: "capstan".into(),
        proxy_cpu_request: "20m".into(),
        proxy_memory_request: "32Mi".into(),
        proxy_memory_limit: "128Mi".into(),
        exclude_outbound_cidrs: vec!["10.0.0.1/32".into(), "192.168.0.0/16".into()],
        ..Default::default()
    }
}

/// The app container most cases share: probes of every kind, named and numbered ports.
fn app() -> Value {
    json!({
        "name": "app", "image": "web:1",
        "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9090}],
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 7},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8081, "scheme": "HTTP",
            "httpHeaders": [{"name": "X-Probe", "value": "1"}]}},
        "startupProbe": {"tcpSocket": {"port": 8080}},
    })
}

fn api_token_mount() -> Value {
    json!({"name": "kube-api-access-x", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true})
}

fn agent_annotations(extra: Value) -> Value {
    let mut annotations = json!({
        "capstan.dev/agent-inject": "true",
        "capstan.dev/agent-role": "app",
        "capstan.dev/agent-inject-secret-db": "database/creds/app",
        "capstan.dev/agent-inject-secret-config.json": "secret/data/app/config",
        "capstan.dev/agent-inject-template-db": "postgresql://{{ username }}:{{ password }}@db/app",
    });
    annotations
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    annotations
}

struct Case {
    name: &'static str,
    namespace: &'static str,
    enforced: bool,
    config: inject::Config,
    pod: Value,
}

fn cases() -> Vec<Case> {
    let default = inject::Config::default;
    vec![
        Case {
            name: "mesh_by_namespace",
            namespace: "meshed",
            enforced: false,
            config: default(),
            pod: json!({
                "metadata": {"name": "web-1", "labels": {"app": "web"}},
                "spec": {
                    "serviceAccountName": "web",
                    "containers": [app(), {"name": "logger", "image": "logger:1",
                        "livenessProbe": {"httpGet": {"path": "/", "port": 80, "host": "10.0.0.9"}}}],
                },
            }),
        },
        Case {
            name: "mesh_every_option",
            namespace: "meshed",
            enforced: true,
            config: custom_config(),
            pod: json!({
                "metadata": {"name": "web-2", "annotations": {
                    "team": "a",
                    "capstan.dev/upstreams": " api:8080, db.data:5432 ",
                    "capstan.dev/app-port": "9090",
                    "capstan.dev/injected": "by-hand",
                }},
                "spec": {
                    "serviceAccountName": "web",
                    "initContainers": [{"name": "migrate", "image": "web:1"}],
                    "volumes": [{"name": "data", "emptyDir": {}}],
                    "containers": [
                        {"name": "app", "image": "web:1", "volumeMounts": [api_token_mount()],
                         "livenessProbe": {"exec": {"command": ["true"]}}},
                    ],
                },
            }),
        },
        Case {
            name: "mesh_by_annotation",
            namespace: "plain",
            enforced: false,
            config: default(),
            pod: json!({
                "metadata": {"generateName": "web-", "annotations": {"capstan.dev/inject": "True"}},
                "spec": {"containers": [{"name": "app", "image": "web:1"}], "initContainers": []},
            }),
        },
        Case {
            name: "agent_sidecar",
            namespace: "plain",
            enforced: false,
            config: default(),
            pod: json!({
                "metadata": {"name": "app-1", "annotations": agent_annotations(json!({}))},
                "spec": {
                    "serviceAccountName": "app",
                    "initContainers": [{"name": "migrate", "image": "app:1"}],
                    "containers": [
                        {"name": "app", "image": "app:1", "securityContext": {"runAsUser": 1000},
                         "volumeMounts": [api_token_mount()]},
                        {"name": "logs", "image": "logs:1"},
                    ],
                    "volumes": [{"name": "x", "emptyDir": {}}],
                },
            }),
        },
        Case {
            name: "agent_init_only",
            namespace: "plain",
            enforced: false,
            config: custom_config(),
            pod: json!({
                "metadata": {"name": "job-1", "annotations": agent_annotations(json!({
                    "capstan.dev/agent-init-only": "TRUE",
                    "capstan.dev/agent-run-as-user": "4242",
                }))},
                "spec": {
                    "securityContext": {"runAsUser": 1000},
                    "containers": [{"name": "job", "image": "job:1"}],
                },
            }),
        },
        Case {
            name: "mesh_and_agent",
            namespace: "meshed",
            enforced: true,
            config: custom_config(),
            pod: json!({
                "metadata": {"name": "app-2", "annotations": agent_annotations(json!({}))},
                "spec": {
                    "serviceAccountName": "app",
                    "initContainers": [{"name": "migrate", "image": "app:1"}],
                    "containers": [app()],
                },
            }),
        },
        Case {
            name: "agent_into_a_meshed_pod",
            namespace: "meshed",
            enforced: false,
            config: default(),
            pod: json!({
                "metadata": {"name": "app-3", "annotations": agent_annotations(json!({}))},
                "spec": {
                    "initContainers": [
                        {"name": "capstan-init", "image": "capstan:0.1.0",
                         "securityContext": {"runAsUser": 0, "capabilities": {"add": ["NET_ADMIN"]}}},
                        {"name": "capstan-proxy", "image": "capstan:0.1.0", "restartPolicy": "Always"},
                    ],
                    "containers": [{"name": "app", "image": "app:1"}],
                },
            }),
        },
        Case {
            name: "mesh_refused",
            namespace: "meshed",
            enforced: false,
            config: default(),
            pod: json!({
                "metadata": {"name": "bad-1", "annotations": {"capstan.dev/upstreams": "Bad_Name:80"}},
                "spec": {
                    "hostNetwork": true,
                    "securityContext": {"runAsGroup": 1338},
                    "containers": [{"name": "app", "image": "app:1",
                        "securityContext": {"runAsUser": 1337, "capabilities": {"add": ["net_raw"]}}}],
                },
            }),
        },
        Case {
            name: "agent_refused",
            namespace: "plain",
            enforced: false,
            config: default(),
            pod: json!({
                "metadata": {"name": "bad-2", "annotations": agent_annotations(json!({
                    "capstan.dev/agent-inject-secret-.env": "pki/issue/web",
                    "capstan.dev/agent-run-as-user": "0",
                    "capstan.dev/agent-typo": "x",
                }))},
                "spec": {"containers": [{"name": "app", "image": "app:1",
                    "volumeMounts": [{"name": "s", "mountPath": "/capstan/secrets/"}]}]},
            }),
        },
    ]
}

/// What the handler answered, as the golden file holds it.
async fn answer(case: &Case) -> (Value, Option<Vec<u8>>) {
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": case.name, "operation": "CREATE", "namespace": case.namespace,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "userInfo": {"username": "alice"},
            "object": case.pod,
        },
    });
    let state = state(case.config.clone());
    let body = serde_json::to_vec(&review).unwrap();
    let Ok(axum::Json(review)) = super::mutate(&state, &body, case.enforced).await else {
        panic!("{}: the handler failed", case.name);
    };
    let response = review.response.expect("a response");
    let patch = response
        .patch
        .as_deref()
        .map(|bytes| serde_json::from_slice::<Value>(bytes).expect("the patch is JSON"));
    let recorded = json!({
        "allowed": response.allowed,
        "message": response.result.message,
        "warnings": response.warnings,
        "patch": patch,
    });
    (recorded, response.patch)
}

#[tokio::test]
async fn golden_patches_are_unchanged_byte_for_byte() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/patches");
    let bless = std::env::var_os("CAPSTAN_BLESS_PATCHES").is_some();
    for case in cases() {
        let (recorded, bytes) = answer(&case).await;
        let file = dir.join(format!("{}.json", case.name));
        if bless {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&file, serde_json::to_string_pretty(&recorded).unwrap() + "\n").unwrap();
            continue;
        }
        let golden: Value = serde_json::from_str(
            &std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display())),
        )
        .unwrap();
        assert_eq!(recorded, golden, "{}", case.name);
        // The same value is not enough: the API server gets these bytes.
        let pinned = (!golden["patch"].is_null()).then(|| serde_json::to_vec(&golden["patch"]).unwrap());
        assert!(bytes == pinned, "{}: the patch's bytes changed", case.name);
    }
}
