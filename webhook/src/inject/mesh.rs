//! The mesh sidecar's injection (pure): whether a pod that should be meshed can be, and
//! the JSON patch (RFC 6902) that meshes it. Which pods should be is capstan-mesh's
//! `selection`, shared with the intentions reconciler.
//!
//! Decisions (see the mesh README):
//! - Injection is idempotent: a pod that already carries the proxy is left alone
//!   (reinvocation, a re-submitted pod). The marker is the proxy container, not the
//!   `capstan.dev/injected` annotation, which a tenant could set by hand to escape.
//! - A pod that would defeat the redirect is refused rather than meshed (M16): an app
//!   container running as the proxy's UID or its dedicated GID (the redirect exempts
//!   the proxy by GID, so an image whose USER is the proxy's UID is still redirected), one with
//!   NET_ADMIN/NET_RAW or privileged (it could undo the iptables rules), and
//!   hostNetwork (the redirect would rewrite the node's own rules).

use super::{
    Config, Refusal, api_token_mount, append_volumes, env, field_env, prepend_init_containers,
    read_only_mount, ready_probe, resources, restricted_security_context, set_annotation, sidecar, tcp_port,
    to_value, token_file, token_volume,
};
use capstan_contract::{MESH_CA_AUDIENCE, annotations::mesh as annotations, env::proxy as vars};
use capstan_mesh::selection::{PROXY_CONTAINER, is_injected};
use k8s_openapi::{
    api::core::v1::{Capabilities, Container, HTTPGetAction, Pod, Probe, SecurityContext},
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde_json::{Value, json};

pub const INIT_CONTAINER: &str = "capstan-init";
pub const TOKEN_VOLUME: &str = "capstan-mesh-token";
pub const TOKEN_DIR: &str = "/var/run/secrets/capstan.dev/mesh";

pub const PROXY_UID: i64 = 1337;
/// The proxy's group, dedicated to it: the redirect exempts traffic by this GID (iptables
/// `--gid-owner`), not by the UID, so an application container whose image's USER is
/// the proxy's UID is still redirected. It differs from the UID so that an image built
/// to run as `1337:1337` (Istio's proxy user) is not exempted either; a container or pod
/// that asks for it (runAsGroup) is refused.
pub const PROXY_GID: i64 = 1338;
pub const INBOUND_PORT: i32 = 20000;
pub const OUTBOUND_PORT: i32 = 15001;
pub const ADMIN_PORT: i32 = 15020;

/// The outcome of `inject` for a pod that should be meshed.
#[derive(Clone, Debug, PartialEq)]
pub enum Injection {
    /// The pod already carries the proxy: nothing to add.
    AlreadyInjected,
    /// RFC 6902 operations that mesh the pod.
    Patch(Vec<Value>),
}

/// Every reason the pod cannot be meshed safely (M16), each naming its field. Empty when
/// it can be.
pub fn refusals(pod: &Pod, config: &Config) -> Vec<Refusal> {
    let mut refusals = Vec::new();
    let Some(spec) = &pod.spec else {
        return vec![Refusal::new("spec", "a pod without a spec cannot be meshed")];
    };
    if spec.host_network == Some(true) {
        refusals.push(Refusal::new(
            "spec.hostNetwork",
            "a meshed pod cannot use the node's network: the traffic redirect would rewrite the node's own rules",
        ));
    }
    let pod_uid = spec.security_context.as_ref().and_then(|sc| sc.run_as_user);
    let pod_gid = spec.security_context.as_ref().and_then(|sc| sc.run_as_group);
    let lists = [
        (
            "spec.initContainers",
            spec.init_containers.as_deref().unwrap_or_default(),
        ),
        ("spec.containers", spec.containers.as_slice()),
    ];
    for (list, containers) in lists {
        for (i, container) in containers.iter().enumerate() {
            let at = format!("{list}[{i}]");
            if list == "spec.initContainers" && container.name == PROXY_CONTAINER {
                if let Some(problem) = foreign_proxy(container, config) {
                    refusals.push(Refusal::new(at, problem));
                }
                continue;
            }
            if list == "spec.initContainers" && container.name == INIT_CONTAINER && is_injected(pod) {
                // Ours, from an earlier pass: it needs root and NET_ADMIN by design.
                continue;
            }
            container_refusals(
                &at,
                &container.name,
                container.security_context.as_ref(),
                (pod_uid, pod_gid),
                &mut refusals,
            );
        }
    }
    let asked = super::annotations(pod);
    if let Some(upstreams) = asked.get(annotations::UPSTREAMS)
        && let Err(message) = parse_upstreams(upstreams)
    {
        refusals.push(Refusal::annotation(annotations::UPSTREAMS, message));
    }
    if let Some(port) = asked.get(annotations::APP_PORT)
        && parse_port(port).is_none()
    {
        refusals.push(Refusal::annotation(
            annotations::APP_PORT,
            format!("{port:?} is not a port number (1-65535)"),
        ));
    }
    refusals
}

/// Every reason an ephemeral container (added by `kubectl debug` through the
/// pods/ephemeralcontainers subresource) would defeat the redirect of a meshed pod (M16):
/// the same per-container checks as [`refusals`], each naming its field under
/// `spec.ephemeralContainers[i]`. Empty when none would.
pub fn ephemeral_refusals(pod: &Pod) -> Vec<Refusal> {
    let mut refusals = Vec::new();
    let Some(spec) = &pod.spec else {
        return refusals;
    };
    let pod_ids = spec
        .security_context
        .as_ref()
        .map_or((None, None), |sc| (sc.run_as_user, sc.run_as_group));
    for (i, container) in spec.ephemeral_containers.iter().flatten().enumerate() {
        container_refusals(
            &format!("spec.ephemeralContainers[{i}]"),
            &container.name,
            container.security_context.as_ref(),
            pod_ids,
            &mut refusals,
        );
    }
    refusals
}

/// The checks of one container of a meshed pod (at `at`), with the pod's own runAsUser
/// and runAsGroup, which a container without its own inherits: the proxy's UID or GID,
/// privileged, or a capability that can rewrite the pod's netfilter rules.
fn container_refusals(
    at: &str,
    name: &str,
    sc: Option<&SecurityContext>,
    (pod_uid, pod_gid): (Option<i64>, Option<i64>),
    refusals: &mut Vec<Refusal>,
) {
    // The proxy's UID and GID, the container's own or inherited from the pod.
    let reserved = [
        (
            "runAsUser",
            "UID",
            PROXY_UID,
            sc.and_then(|sc| sc.run_as_user),
            pod_uid,
            "which is reserved for the mesh proxy",
        ),
        (
            "runAsGroup",
            "GID",
            PROXY_GID,
            sc.and_then(|sc| sc.run_as_group),
            pod_gid,
            "the mesh proxy's group, whose traffic is never redirected through the proxy",
        ),
    ];
    for (field, kind, id, own, inherited, why) in reserved {
        let (set_at, verb) = match (own, inherited) {
            (Some(own), _) if own == id => (format!("{at}.securityContext.{field}"), "runs as"),
            (None, Some(inherited)) if inherited == id => {
                (format!("spec.securityContext.{field}"), "inherits")
            }
            _ => continue,
        };
        refusals.push(Refusal::new(
            set_at,
            format!("container {name:?} {verb} {kind} {id}, {why}; use another {kind}"),
        ));
    }
    if sc.and_then(|sc| sc.privileged) == Some(true) {
        refusals.push(Refusal::new(
            format!("{at}.securityContext.privileged"),
            format!("container {name:?} is privileged and could undo the mesh's traffic redirect"),
        ));
    }
    let added = sc
        .and_then(|sc| sc.capabilities.as_ref())
        .and_then(|c| c.add.as_ref())
        .into_iter()
        .flatten();
    for capability in added {
        // Container runtimes upper-case what they are given (containerd: "CAP_" +
        // ToUpper), so `net_admin` grants NET_ADMIN: compare the way they do.
        let upper = capability.trim().to_ascii_uppercase();
        let bare = upper.trim_start_matches("CAP_");
        if ["NET_ADMIN", "NET_RAW", "ALL"].contains(&bare) {
            refusals.push(Refusal::new(
                format!("{at}.securityContext.capabilities.add"),
                format!(
                    "container {name:?} adds {capability}, with which it could undo the mesh's traffic redirect"
                ),
            ));
        }
    }
}

/// A `capstan-proxy` init container the injector did not make: a tenant's stand-in that
/// would make the pod look meshed while nothing enforces anything.
fn foreign_proxy(container: &Container, config: &Config) -> Option<String> {
    if container.restart_policy.as_deref() != Some("Always") {
        return Some(format!(
            "a container named {PROXY_CONTAINER} is reserved for the mesh proxy, and this one is not a native sidecar (restartPolicy Always)"
        ));
    }
    if container.image.as_deref() != Some(config.image.as_str()) {
        return Some(format!(
            "a container named {PROXY_CONTAINER} is reserved for the mesh proxy, and this one runs image {:?}, not {:?}",
            container.image.as_deref().unwrap_or_default(),
            config.image
        ));
    }
    None
}

/// Parses `capstan.dev/upstreams`: `service[.namespace]:local-port`, comma separated.
pub fn parse_upstreams(value: &str) -> Result<Vec<(String, Option<String>, u16)>, String> {
    let mut upstreams = Vec::new();
    for (i, entry) in value.split(',').map(str::trim).enumerate() {
        if entry.is_empty() {
            continue;
        }
        let (target, port) = entry
            .rsplit_once(':')
            .ok_or_else(|| format!("entry {i} ({entry:?}) is not service[.namespace]:local-port"))?;
        let port =
            parse_port(port).ok_or_else(|| format!("entry {i} ({entry:?}) has no valid local port"))?;
        let (service, namespace) = match target.split_once('.') {
            Some((s, n)) => (s, Some(n)),
            None => (target, None),
        };
        for name in std::iter::once(service).chain(namespace) {
            if !is_dns_label(name) {
                return Err(format!(
                    "entry {i} ({entry:?}): {name:?} is not a service or namespace name"
                ));
            }
        }
        upstreams.push((service.to_owned(), namespace.map(str::to_owned), port));
    }
    if upstreams.is_empty() {
        return Err(
            "no upstream listed; remove the annotation or list service[.namespace]:local-port".into(),
        );
    }
    Ok(upstreams)
}

fn parse_port(value: &str) -> Option<u16> {
    value.trim().parse::<u16>().ok().filter(|p| *p > 0)
}

fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The patch that meshes `pod`, or why it cannot be. `ca_bundle` is the PEM of the
/// current mesh roots. Call only for pods `wanted` says to mesh.
pub fn inject(pod: &Pod, config: &Config, ca_bundle: &str) -> Result<Injection, Vec<Refusal>> {
    let refused = refusals(pod, config);
    if !refused.is_empty() {
        return Err(refused);
    }
    if is_injected(pod) {
        return Ok(Injection::AlreadyInjected);
    }
    let spec = pod.spec.as_ref().expect("refusals() checked the spec");
    let asked = super::annotations(pod);
    let upstreams = asked.get(annotations::UPSTREAMS).map(String::as_str);
    // Explicit upstreams mean the app dials the proxy itself: no outbound redirect. The
    // inbound redirect is in every meshed pod, or its ports would answer plain text.
    let redirect_outbound = upstreams.is_none();

    let mut ops = Vec::new();
    let mut app_probes = serde_json::Map::new();
    // The inbound redirect is always on: a kubelet probe to an app port would land on
    // the mTLS listener; the proxy answers it on the app's behalf instead.
    for (i, container) in spec.containers.iter().enumerate() {
        for (field, kind, probe) in [
            ("livenessProbe", "livez", &container.liveness_probe),
            ("readinessProbe", "readyz", &container.readiness_probe),
            ("startupProbe", "startupz", &container.startup_probe),
        ] {
            let Some(probe) = probe else { continue };
            let Some((path, original, rewritten)) = rewrite_probe(container, kind, probe) else {
                continue;
            };
            app_probes.insert(path, original);
            ops.push(json!({
                "op": "replace",
                "path": format!("/spec/containers/{i}/{field}"),
                "value": rewritten,
            }));
        }
    }

    let app_port = asked
        .get(annotations::APP_PORT)
        .and_then(|p| parse_port(p))
        .map(i32::from)
        .or_else(|| {
            spec.containers
                .first()
                .and_then(|c| c.ports.as_ref())
                .and_then(|ports| ports.first())
                .map(|p| p.container_port)
        });
    let mut proxy = proxy_container(
        config,
        ca_bundle,
        app_port,
        upstreams,
        redirect_outbound,
        &app_probes,
    );
    let mut init = init_container(config, redirect_outbound);
    if let Some(api_token) = api_token_mount(spec) {
        for container in [&mut proxy, &mut init] {
            container
                .volume_mounts
                .get_or_insert_with(Vec::new)
                .push(api_token.clone());
        }
    }

    // Init containers run in order: the redirect first, then the proxy (a native sidecar
    // the kubelet waits for, through its startup probe, before anything else starts).
    prepend_init_containers(spec, vec![to_value(&init), to_value(&proxy)], &mut ops);
    append_volumes(
        spec,
        vec![to_value(&token_volume(TOKEN_VOLUME, MESH_CA_AUDIENCE))],
        &mut ops,
    );
    set_annotation(pod, annotations::INJECTED, &config.version, &mut ops);
    Ok(Injection::Patch(ops))
}

/// The httpGet probe rewritten to the proxy's admin port, as (proxy path, the original
/// target for CAPSTAN_APP_PROBES, the new probe). `None` leaves the probe as it is:
/// tcpSocket, exec and grpc probes, probes aimed at another host, and named ports the
/// container does not declare (the API server would refuse those anyway).
fn rewrite_probe(container: &Container, kind: &str, probe: &Probe) -> Option<(String, Value, Probe)> {
    let get = probe.http_get.as_ref()?;
    if get.host.as_deref().is_some_and(|h| !h.is_empty()) {
        return None;
    }
    let port = match &get.port {
        IntOrString::Int(port) => *port,
        IntOrString::String(name) => {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))?
                .container_port
        }
    };
    let path = format!("/app-health/{}/{kind}", container.name);
    let original = json!({
        "port": port,
        "path": get.path.clone().unwrap_or_else(|| "/".into()),
        "scheme": get.scheme.clone().unwrap_or_else(|| "HTTP".into()),
    });
    let mut rewritten = probe.clone();
    rewritten.http_get = Some(HTTPGetAction {
        path: Some(path.clone()),
        port: IntOrString::Int(ADMIN_PORT),
        scheme: Some("HTTP".into()),
        host: None,
        http_headers: get.http_headers.clone(),
    });
    Some((path, original, rewritten))
}

fn proxy_container(
    config: &Config,
    ca_bundle: &str,
    app_port: Option<i32>,
    upstreams: Option<&str>,
    redirect_outbound: bool,
    app_probes: &serde_json::Map<String, Value>,
) -> Container {
    let mut env = vec![
        field_env(vars::NAMESPACE, "metadata.namespace"),
        field_env(vars::SERVICE_ACCOUNT, "spec.serviceAccountName"),
        field_env(vars::POD_NAME, "metadata.name"),
        env(vars::TOKEN_FILE, token_file(TOKEN_DIR)),
        env(vars::CA_URL, config.ca_url.clone()),
        env(vars::TRUST_DOMAIN, config.trust_domain.clone()),
        env(
            vars::DEFAULT_ACTION,
            if config.default_allow { "allow" } else { "deny" },
        ),
        env(vars::CONTROL_NAMESPACE, config.control_namespace.clone()),
        env(vars::CA_BUNDLE, ca_bundle),
        env(vars::INBOUND_PORT, INBOUND_PORT.to_string()),
        env(vars::ADMIN_ADDR, format!("0.0.0.0:{ADMIN_PORT}")),
    ];
    if let Some(port) = app_port {
        env.push(self::env(vars::APP_PORT, port.to_string()));
    }
    if let Some(upstreams) = upstreams {
        env.push(self::env(vars::UPSTREAMS, upstreams.trim()));
    }
    if redirect_outbound {
        env.push(self::env(vars::OUTBOUND_PORT, OUTBOUND_PORT.to_string()));
    }
    if !app_probes.is_empty() {
        env.push(self::env(
            vars::APP_PROBES,
            Value::Object(app_probes.clone()).to_string(),
        ));
    }
    Container {
        // A native sidecar: started before the app, kept running beside it, stopped
        // after it, and not waited for by a Job's completion.
        restart_policy: Some("Always".into()),
        env: Some(env),
        ports: Some(vec![
            tcp_port("capstan-mtls", INBOUND_PORT),
            tcp_port("capstan-admin", ADMIN_PORT),
        ]),
        // The app starts only once the proxy holds a certificate and intentions.
        startup_probe: Some(ready_probe(ADMIN_PORT, 1, 120)),
        readiness_probe: Some(ready_probe(ADMIN_PORT, 5, 3)),
        resources: Some(resources(
            &config.proxy_cpu_request,
            &config.proxy_memory_request,
            &config.proxy_memory_limit,
        )),
        security_context: Some(SecurityContext {
            run_as_group: Some(PROXY_GID),
            ..restricted_security_context(PROXY_UID)
        }),
        volume_mounts: Some(vec![read_only_mount(TOKEN_VOLUME, TOKEN_DIR)]),
        ..sidecar(config, PROXY_CONTAINER, &["proxy"])
    }
}

/// The redirect step: inbound always; outbound unless the pod declares its upstreams.
fn init_container(config: &Config, redirect_outbound: bool) -> Container {
    let mut args = vec![
        "init".to_owned(),
        format!("--proxy-gid={PROXY_GID}"),
        format!("--inbound-port={INBOUND_PORT}"),
        format!("--outbound-port={OUTBOUND_PORT}"),
        format!("--exclude-inbound-ports={ADMIN_PORT}"),
    ];
    if !redirect_outbound {
        args.push("--inbound-only".to_owned());
    }
    if !config.exclude_outbound_cidrs.is_empty() {
        args.push(format!(
            "--exclude-outbound-cidrs={}",
            config.exclude_outbound_cidrs.join(",")
        ));
    }
    Container {
        args: Some(args),
        resources: Some(resources("10m", "16Mi", "32Mi")),
        // iptables in the pod's network namespace needs root with NET_ADMIN and NET_RAW,
        // and nothing else; it exits before any app container starts.
        security_context: Some(SecurityContext {
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..restricted_security_context(0)
        }),
        ..sidecar(config, INIT_CONTAINER, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::inject::{SERVICE_ACCOUNT_MOUNT, init_container_names};
    use k8s_openapi::api::core::v1::{Volume, VolumeMount};
    use std::collections::BTreeMap;

    /// A pod's annotations.
    fn asking(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    fn app_pod() -> Pod {
        pod(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {
                "serviceAccountName": "web",
                "containers": [{
                    "name": "app",
                    "image": "web:1",
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 7},
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8081, "scheme": "HTTP"}},
                    "startupProbe": {"tcpSocket": {"port": 8080}},
                }],
            },
        }))
    }

    /// Applies the add/replace operations `inject` emits (the webhook's tests check the
    /// same patches with the json-patch crate the API server's semantics follow).
    fn apply(pod: &Pod, ops: &[Value]) -> Value {
        let mut doc = serde_json::to_value(pod).unwrap();
        for op in ops {
            let path = op["path"].as_str().unwrap();
            let mut parts: Vec<String> = path
                .split('/')
                .skip(1)
                .map(|p| p.replace("~1", "/").replace("~0", "~"))
                .collect();
            let last = parts.pop().unwrap();
            let mut target = &mut doc;
            for part in &parts {
                target = match target {
                    Value::Array(a) => &mut a[part.parse::<usize>().unwrap()],
                    other => other.get_mut(part.as_str()).unwrap(),
                };
            }
            let value = op["value"].clone();
            match (op["op"].as_str().unwrap(), target) {
                ("add", Value::Array(a)) if last == "-" => a.push(value),
                ("add", Value::Array(a)) => a.insert(last.parse().unwrap(), value),
                ("replace", Value::Array(a)) => a[last.parse::<usize>().unwrap()] = value,
                ("add" | "replace", Value::Object(o)) => {
                    o.insert(last, value);
                }
                (op, _) => panic!("unexpected {op} at {path}"),
            }
        }
        doc
    }

    fn injected(pod: &Pod) -> Value {
        match inject(pod, &Config::default(), "ROOTS").unwrap() {
            Injection::Patch(ops) => apply(pod, &ops),
            Injection::AlreadyInjected => panic!("nothing injected"),
        }
    }

    fn env_of(container: &Value, name: &str) -> Option<String> {
        container["env"]
            .as_array()?
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str().map(str::to_owned))
    }

    #[test]
    fn the_proxy_gets_the_cluster_default_action_and_trust_domain() {
        let proxy = |config: &Config| {
            let pod = app_pod();
            let Injection::Patch(ops) = inject(&pod, config, "ROOTS").unwrap() else {
                panic!("nothing injected")
            };
            let out = apply(&pod, &ops);
            out["spec"]["initContainers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == PROXY_CONTAINER)
                .unwrap()
                .clone()
        };
        let default = proxy(&Config::default());
        assert_eq!(
            env_of(&default, "CAPSTAN_DEFAULT_ACTION").as_deref(),
            Some("deny")
        );
        assert_eq!(
            env_of(&default, "CAPSTAN_TRUST_DOMAIN").as_deref(),
            Some("cluster.local")
        );
        let migrating = proxy(&Config {
            default_allow: true,
            trust_domain: "corp.example".into(),
            ..Config::default()
        });
        assert_eq!(
            env_of(&migrating, "CAPSTAN_DEFAULT_ACTION").as_deref(),
            Some("allow")
        );
        assert_eq!(
            env_of(&migrating, "CAPSTAN_TRUST_DOMAIN").as_deref(),
            Some("corp.example")
        );
    }

    #[test]
    fn injection_adds_the_redirect_then_the_native_sidecar_token_and_annotation() {
        let pod = app_pod();
        let out = injected(&pod);
        let init = out["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(init.len(), 2);
        assert_eq!(init[0]["name"], INIT_CONTAINER);
        assert_eq!(
            init[0]["securityContext"]["capabilities"]["add"],
            json!(["NET_ADMIN", "NET_RAW"])
        );
        assert_eq!(init[0]["securityContext"]["runAsUser"], 0);
        let proxy = &init[1];
        assert_eq!(proxy["name"], PROXY_CONTAINER);
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(proxy["startupProbe"]["httpGet"]["port"], ADMIN_PORT);
        assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready");
        let sc = &proxy["securityContext"];
        assert_eq!(sc["runAsUser"], PROXY_UID);
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        assert!(sc["capabilities"].get("add").is_none());
        assert_eq!(proxy["resources"]["requests"]["cpu"], "10m");
        assert_eq!(proxy["resources"]["limits"]["memory"], "64Mi");
        assert_eq!(env_of(proxy, "CAPSTAN_CA_BUNDLE").as_deref(), Some("ROOTS"));
        assert_eq!(env_of(proxy, "CAPSTAN_APP_PORT").as_deref(), Some("8080"));
        assert_eq!(env_of(proxy, "CAPSTAN_OUTBOUND_PORT").as_deref(), Some("15001"));
        assert_eq!(env_of(proxy, "CAPSTAN_UPSTREAMS"), None);
        let sa = proxy["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "CAPSTAN_SERVICE_ACCOUNT")
            .unwrap();
        assert_eq!(
            sa["valueFrom"]["fieldRef"]["fieldPath"],
            "spec.serviceAccountName"
        );
        assert_eq!(proxy["volumeMounts"][0]["mountPath"], TOKEN_DIR);

        let volume = &out["spec"]["volumes"][0];
        assert_eq!(volume["name"], TOKEN_VOLUME);
        let token = &volume["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(token["audience"], MESH_CA_AUDIENCE);
        assert_eq!(token["expirationSeconds"], 3600);
        assert_eq!(out["metadata"]["annotations"][annotations::INJECTED], "0.1.0");
        // The app container itself is untouched but for its probes.
        assert_eq!(out["spec"]["containers"][0]["image"], "web:1");
    }

    #[test]
    fn http_probes_are_rewritten_to_the_proxy_and_others_kept() {
        let out = injected(&app_pod());
        let app = &out["spec"]["containers"][0];
        assert_eq!(
            app["livenessProbe"]["httpGet"],
            json!({"path": "/app-health/app/livez", "port": ADMIN_PORT, "scheme": "HTTP"})
        );
        assert_eq!(app["livenessProbe"]["periodSeconds"], 7);
        assert_eq!(app["readinessProbe"]["httpGet"]["path"], "/app-health/app/readyz");
        assert_eq!(app["startupProbe"], json!({"tcpSocket": {"port": 8080}}));
        let proxy = &out["spec"]["initContainers"][1];
        let probes: Value = serde_json::from_str(&env_of(proxy, "CAPSTAN_APP_PROBES").unwrap()).unwrap();
        assert_eq!(
            probes,
            json!({
                "/app-health/app/livez": {"port": 8080, "path": "/healthz", "scheme": "HTTP"},
                "/app-health/app/readyz": {"port": 8081, "path": "/ready", "scheme": "HTTP"},
            })
        );
    }

    /// Explicit upstreams (issue 15, item 11): the app dials the proxy itself, so its
    /// outbound traffic is not redirected, but its ports are: without the inbound
    /// redirect they would answer plain text from anyone.
    #[test]
    fn explicit_upstreams_skip_the_outbound_redirect_but_never_the_inbound() {
        let mut pod = app_pod();
        pod.metadata.annotations = asking(&[(annotations::UPSTREAMS, "api:8080, db.data:5432")]);
        let out = injected(&pod);
        let init = out["spec"]["initContainers"].as_array().unwrap();
        let names: Vec<_> = init.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, [INIT_CONTAINER, PROXY_CONTAINER]);
        let args: Vec<_> = init[0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(args[0], "init");
        assert!(args.contains(&"--inbound-only"), "{args:?}");
        assert!(args.contains(&"--inbound-port=20000"), "{args:?}");
        assert_eq!(
            init[0]["securityContext"]["capabilities"]["add"],
            json!(["NET_ADMIN", "NET_RAW"])
        );
        let proxy = &init[1];
        assert_eq!(
            env_of(proxy, "CAPSTAN_UPSTREAMS").as_deref(),
            Some("api:8080, db.data:5432")
        );
        assert_eq!(env_of(proxy, "CAPSTAN_OUTBOUND_PORT"), None);
        assert_eq!(env_of(proxy, "CAPSTAN_APP_PORT").as_deref(), Some("8080"));
        // Probes to app ports would meet the mTLS listener: the proxy answers them.
        assert_eq!(
            out["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"],
            ADMIN_PORT
        );
        // The existing annotations are kept, the marker added beside them.
        assert_eq!(
            out["metadata"]["annotations"][annotations::UPSTREAMS],
            "api:8080, db.data:5432"
        );
        assert_eq!(out["metadata"]["annotations"][annotations::INJECTED], "0.1.0");
    }

    #[test]
    fn existing_init_containers_and_volumes_run_after_ours() {
        let mut pod = app_pod();
        let spec = pod.spec.as_mut().unwrap();
        spec.init_containers = Some(vec![Container {
            name: "migrate".into(),
            ..Default::default()
        }]);
        spec.volumes = Some(vec![Volume {
            name: "data".into(),
            ..Default::default()
        }]);
        let out = injected(&pod);
        let names: Vec<_> = out["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]);
        assert_eq!(out["spec"]["volumes"][1]["name"], TOKEN_VOLUME);
    }

    #[test]
    fn the_api_token_mount_the_api_server_would_add_is_added_up_front() {
        let mut pod = app_pod();
        let mount = VolumeMount {
            name: "kube-api-access-x".into(),
            mount_path: SERVICE_ACCOUNT_MOUNT.into(),
            read_only: Some(true),
            ..Default::default()
        };
        pod.spec.as_mut().unwrap().containers[0].volume_mounts = Some(vec![mount]);
        let out = injected(&pod);
        for container in out["spec"]["initContainers"].as_array().unwrap() {
            assert!(
                container["volumeMounts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|m| m["name"] == "kube-api-access-x"),
                "{container}"
            );
        }
    }

    #[test]
    fn a_second_pass_adds_nothing() {
        let pod = app_pod();
        let once: Pod = serde_json::from_value(injected(&pod)).unwrap();
        assert_eq!(
            inject(&once, &Config::default(), "ROOTS").unwrap(),
            Injection::AlreadyInjected
        );
    }

    #[test]
    fn a_hand_set_injected_annotation_does_not_escape_injection() {
        let mut pod = app_pod();
        pod.metadata.annotations = asking(&[(annotations::INJECTED, "0.1.0")]);
        let out = injected(&pod);
        assert_eq!(out["spec"]["initContainers"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn a_fake_proxy_container_is_refused() {
        let mut pod = app_pod();
        pod.spec.as_mut().unwrap().init_containers = Some(vec![Container {
            name: PROXY_CONTAINER.into(),
            image: Some("busybox".into()),
            restart_policy: Some("Always".into()),
            ..Default::default()
        }]);
        let refused = inject(&pod, &Config::default(), "ROOTS").unwrap_err();
        assert_eq!(refused[0].field, "spec.initContainers[0]");
        assert!(refused[0].message.contains("busybox"), "{refused:?}");
    }

    #[test]
    fn m16_the_proxy_uid_net_admin_and_host_network_are_refused_naming_the_field() {
        let mut pod = app_pod();
        let spec = pod.spec.as_mut().unwrap();
        spec.host_network = Some(true);
        spec.containers[0].security_context = Some(SecurityContext {
            run_as_user: Some(PROXY_UID),
            capabilities: Some(Capabilities {
                // Any case: runtimes upper-case what they are given.
                add: Some(vec!["net_admin".into(), "Cap_Net_Raw".into(), "SYS_TIME".into()]),
                drop: None,
            }),
            ..Default::default()
        });
        spec.containers.push(Container {
            name: "helper".into(),
            security_context: Some(SecurityContext {
                privileged: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        });
        let fields: Vec<_> = inject(&pod, &Config::default(), "ROOTS")
            .unwrap_err()
            .into_iter()
            .map(|r| r.field)
            .collect();
        assert_eq!(
            fields,
            [
                "spec.hostNetwork",
                "spec.containers[0].securityContext.runAsUser",
                "spec.containers[0].securityContext.capabilities.add",
                "spec.containers[0].securityContext.capabilities.add",
                "spec.containers[1].securityContext.privileged",
            ]
        );
    }

    #[test]
    fn m16_an_inherited_proxy_uid_is_refused_unless_the_container_overrides_it() {
        let mut pod = app_pod();
        let spec = pod.spec.as_mut().unwrap();
        spec.security_context = Some(k8s_openapi::api::core::v1::PodSecurityContext {
            run_as_user: Some(PROXY_UID),
            ..Default::default()
        });
        let refused = inject(&pod, &Config::default(), "ROOTS").unwrap_err();
        assert_eq!(refused[0].field, "spec.securityContext.runAsUser");
        assert!(refused[0].message.contains("\"app\""));
        pod.spec.as_mut().unwrap().containers[0].security_context = Some(SecurityContext {
            run_as_user: Some(1000),
            ..Default::default()
        });
        assert!(inject(&pod, &Config::default(), "ROOTS").is_ok());
    }

    /// The redirect exempts the proxy by its dedicated GID (issue 15, item 8): the proxy
    /// runs with it, init matches it, and an app container asking for it, itself or
    /// through the pod, is refused.
    #[test]
    fn m16_the_proxy_is_exempted_by_its_dedicated_gid_which_apps_cannot_take() {
        let out = injected(&app_pod());
        let init = &out["spec"]["initContainers"][0];
        let args: Vec<_> = init["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(args.contains(&"--proxy-gid=1338"), "{args:?}");
        assert!(!args.iter().any(|a| a.starts_with("--proxy-uid")), "{args:?}");
        let proxy = &out["spec"]["initContainers"][1]["securityContext"];
        assert_eq!(
            (proxy["runAsUser"].as_i64(), proxy["runAsGroup"].as_i64()),
            (Some(PROXY_UID), Some(PROXY_GID))
        );
        assert_ne!(
            PROXY_GID, PROXY_UID,
            "an image running as 1337:1337 must not be exempted"
        );

        let mut pod = app_pod();
        pod.spec.as_mut().unwrap().containers[0].security_context = Some(SecurityContext {
            run_as_group: Some(PROXY_GID),
            ..Default::default()
        });
        let refused = inject(&pod, &Config::default(), "ROOTS").unwrap_err();
        assert_eq!(refused[0].field, "spec.containers[0].securityContext.runAsGroup");
        let mut pod = app_pod();
        pod.spec.as_mut().unwrap().security_context = Some(k8s_openapi::api::core::v1::PodSecurityContext {
            run_as_group: Some(PROXY_GID),
            ..Default::default()
        });
        let refused = inject(&pod, &Config::default(), "ROOTS").unwrap_err();
        assert_eq!(refused[0].field, "spec.securityContext.runAsGroup");
    }

    /// Issue 15 item 8: `kubectl debug` adds ephemeral containers to a running pod; one
    /// that could undo the redirect is refused by the same checks as the pod's own
    /// containers, naming its field, and a plain one passes.
    #[test]
    fn m16_ephemeral_containers_get_the_same_checks_naming_their_field() {
        let mut pod = app_pod();
        let spec = pod.spec.as_mut().unwrap();
        spec.ephemeral_containers = Some(vec![
            k8s_openapi::api::core::v1::EphemeralContainer {
                name: "debugger".into(),
                ..Default::default()
            },
            k8s_openapi::api::core::v1::EphemeralContainer {
                name: "netadmin".into(),
                security_context: Some(SecurityContext {
                    capabilities: Some(Capabilities {
                        add: Some(vec!["NET_ADMIN".into()]),
                        drop: None,
                    }),
                    run_as_group: Some(PROXY_GID),
                    ..Default::default()
                }),
                ..Default::default()
            },
            k8s_openapi::api::core::v1::EphemeralContainer {
                name: "root".into(),
                security_context: Some(SecurityContext {
                    privileged: Some(true),
                    run_as_user: Some(PROXY_UID),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ]);
        let fields: Vec<_> = ephemeral_refusals(&pod).into_iter().map(|r| r.field).collect();
        assert_eq!(
            fields,
            [
                "spec.ephemeralContainers[1].securityContext.runAsGroup",
                "spec.ephemeralContainers[1].securityContext.capabilities.add",
                "spec.ephemeralContainers[2].securityContext.runAsUser",
                "spec.ephemeralContainers[2].securityContext.privileged",
            ]
        );
        pod.spec
            .as_mut()
            .unwrap()
            .ephemeral_containers
            .as_mut()
            .unwrap()
            .truncate(1);
        assert_eq!(ephemeral_refusals(&pod), []);
        // The pod's own containers are not judged again (they were at creation).
        pod.spec.as_mut().unwrap().containers[0].security_context = Some(SecurityContext {
            privileged: Some(true),
            ..Default::default()
        });
        assert_eq!(ephemeral_refusals(&pod), []);
    }

    #[test]
    fn bad_annotations_are_refused_naming_them() {
        let mut pod = app_pod();
        pod.metadata.annotations = asking(&[
            (annotations::UPSTREAMS, "api:8080,Bad_Name:80"),
            (annotations::APP_PORT, "http"),
        ]);
        let refused = inject(&pod, &Config::default(), "ROOTS").unwrap_err();
        assert_eq!(refused[0].field, "metadata.annotations[capstan.dev/upstreams]");
        assert!(refused[0].message.contains("Bad_Name"), "{refused:?}");
        assert_eq!(refused[1].field, "metadata.annotations[capstan.dev/app-port]");
    }

    #[test]
    fn upstreams_parse() {
        assert_eq!(
            parse_upstreams("api:8080,db.data:5432").unwrap(),
            vec![
                ("api".into(), None, 8080),
                ("db".into(), Some("data".into()), 5432)
            ]
        );
        assert!(parse_upstreams("api").is_err());
        assert!(parse_upstreams("api:0").is_err());
        assert!(parse_upstreams("api:70000").is_err());
        assert!(parse_upstreams(" , ").is_err());
    }

    /// The operations the webhook sends are valid RFC 6902 for the API server: they parse
    /// as json_patch operations and apply to the pod as it arrives.
    #[test]
    fn the_patch_applies_to_the_pod_as_admission_sees_it() {
        let review: serde_json::Value = serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "annotations": {"team": "a"}},
            "spec": {
                "serviceAccountName": "web",
                "initContainers": [{"name": "migrate", "image": "app:1"}],
                "volumes": [{"name": "data", "emptyDir": {}}],
                "containers": [{
                    "name": "app", "image": "app:1",
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                }],
            },
        });
        let pod: Pod = serde_json::from_value(review.clone()).unwrap();
        let Ok(Injection::Patch(ops)) = inject(&pod, &Config::default(), "PEM") else {
            panic!("not injected");
        };
        let patch: json_patch::Patch = serde_json::from_slice(&serde_json::to_vec(&ops).unwrap()).unwrap();
        let mut doc = review;
        json_patch::patch(&mut doc, &patch).unwrap();
        let patched: Pod = serde_json::from_value(doc).unwrap();
        assert_eq!(
            init_container_names(&patched),
            ["capstan-init", "capstan-proxy", "migrate"]
        );
        assert_eq!(patched.metadata.annotations.as_ref().unwrap()["team"], "a");
        assert!(is_injected(&patched));
        // A second pass adds nothing.
        assert_eq!(
            inject(&patched, &Config::default(), "PEM").unwrap(),
            Injection::AlreadyInjected
        );
    }
}
