//! The Helm chart against the real API server: lint, install (every object accepted),
//! uninstall (CRDs kept), and K7, a review of every ServiceAccount's permissions.

use capstan_tests::*;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use serde_json::Value;

fn chart() -> String {
    repo_root().join("charts/capstan").to_string_lossy().into_owned()
}

#[test]
fn chart_passes_helm_lint_strict() {
    let out = run("helm", &["lint", "--strict", &chart()]).expect("helm lint --strict");
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

/// Every object `helm install` sent exists in the cluster, as the API server stored it.
fn assert_release_objects_exist(release: &str, namespace: &str) -> usize {
    let manifest = run("helm", &["get", "manifest", release, "-n", namespace]).expect("helm get manifest");
    let documents = manifest.split("\n---").filter(|d| d.contains("kind:")).count();
    let (ok, out) = kubectl_stdin(&["get", "-f", "-", "-o", "name"], &manifest);
    assert!(
        ok,
        "objects of release {release} missing from the cluster:\n{out}"
    );
    assert_eq!(out.lines().count(), documents, "{out}");
    documents
}

#[tokio::test]
async fn helm_install_is_accepted_and_crds_are_established_and_kept() -> anyhow::Result<()> {
    let client = client().await;
    install_chart();
    assert!(assert_release_objects_exist(RELEASE, SYSTEM_NAMESPACE) >= 10);
    let crd = Api::<CustomResourceDefinition>::all(client.clone())
        .get("serviceintentions.mesh.capstan.dev")
        .await?;
    let established = crd.status.and_then(|s| s.conditions).unwrap_or_default();
    assert!(
        established
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True"),
        "{established:?}"
    );
    assert_eq!(
        crd.metadata
            .annotations
            .unwrap_or_default()
            .get("helm.sh/resource-policy")
            .map(String::as_str),
        Some("keep")
    );

    // A second release with the chart's defaults (two replicas of each Deployment) in a
    // namespace of its own; the CRDs stay with the first release. Its engine mounts a CA
    // for PostgreSQL from a Secret and writes a file audit sink to a volume of its own.
    let ns = TestNamespace::new(&client, "e2e-helm").await;
    run(
        "kubectl",
        &[
            "create",
            "secret",
            "generic",
            "postgres-ca",
            "-n",
            &ns.name,
            "--from-literal=ca.crt=not-a-real-ca",
        ],
    )?;
    run(
        "helm",
        &[
            "install",
            "second",
            &chart(),
            "-n",
            &ns.name,
            "--set",
            "crds.enabled=false",
            "--set-json",
            EXTRA_VOLUMES,
            "--set-json",
            EXTRA_VOLUME_MOUNTS,
            "--set-json",
            r#"engine.audit=["stdout","/var/log/capstan/audit.log"]"#,
            "--wait",
            "--timeout",
            "120s",
        ],
    )?;
    assert_release_objects_exist("second", &ns.name);
    let engine: Value = serde_json::from_str(&run(
        "kubectl",
        &[
            "get",
            "deployment",
            "second-capstan-engine",
            "-n",
            &ns.name,
            "-o",
            "json",
        ],
    )?)?;
    let spec = &engine["spec"]["template"]["spec"];
    assert_eq!(
        spec["volumes"][0]["secret"]["secretName"], "postgres-ca",
        "{spec}"
    );
    assert_eq!(spec["volumes"][1]["name"], "audit", "{spec}");
    let mounts = &spec["containers"][0]["volumeMounts"];
    assert_eq!(mounts[0]["mountPath"], "/etc/capstan/postgres-ca", "{mounts}");
    assert_eq!(mounts[0]["readOnly"], true, "{mounts}");
    assert_eq!(mounts[1]["mountPath"], "/var/log/capstan", "{mounts}");
    assert!(
        spec["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "CAPSTAN_ENGINE_AUDIT" && e["value"] == "stdout,/var/log/capstan/audit.log"),
        "{spec}"
    );
    let pods: Value = serde_json::from_str(&run(
        "kubectl",
        &[
            "get",
            "pods",
            "-n",
            &ns.name,
            "-l",
            "app.kubernetes.io/component=controller",
            "-o",
            "json",
        ],
    )?)?;
    let pods = pods["items"].as_array().unwrap();
    assert_eq!(pods.len(), 2, "the controller runs two replicas");
    for pod in pods {
        assert_eq!(pod["status"]["phase"], "Running", "{pod}");
        let sc = &pod["spec"]["containers"][0]["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
    }
    run("helm", &["uninstall", "second", "-n", &ns.name, "--wait"])?;
    let (gone, out) = kubectl_stdin(&["get", "clusterrole", "second-capstan-controller"], "");
    assert!(!gone && out.contains("NotFound"), "{out}");
    Ok(())
}

const EXTRA_VOLUMES: &str = r#"engine.extraVolumes=[{"name":"postgres-ca","secret":{"secretName":"postgres-ca"}},{"name":"audit","emptyDir":{}}]"#;
const EXTRA_VOLUME_MOUNTS: &str = r#"engine.extraVolumeMounts=[{"name":"postgres-ca","mountPath":"/etc/capstan/postgres-ca","readOnly":true},{"name":"audit","mountPath":"/var/log/capstan"}]"#;

/// The engine's root filesystem is read-only and it does not start with an audit file it
/// cannot open: the chart refuses such a sink by name instead of rendering a crash loop.
/// The mount that holds a path is the deepest one (a read-only mount inside a writable
/// one holds its files); Secret volumes are read-only even when the mount does not say so.
#[test]
fn an_audit_file_outside_a_writable_mount_is_refused_by_name() {
    const VOLUMES: &str = r#"engine.extraVolumes=[{"name":"logs","emptyDir":{}},{"name":"sealed","emptyDir":{}},{"name":"pg","secret":{"secretName":"pg"}},{"name":"one","emptyDir":{}}]"#;
    const MOUNTS: &str = r#"engine.extraVolumeMounts=[{"name":"logs","mountPath":"/var/log"},{"name":"sealed","mountPath":"/var/log/capstan","readOnly":true},{"name":"pg","mountPath":"/etc/pg"},{"name":"one","mountPath":"/data/audit.log","subPath":"audit.log"}]"#;
    let chart = chart();
    for (path, renders) in [
        ("/var/log/audit.log", true),
        // A read-only mount inside the writable one.
        ("/var/log/capstan/audit.log", false),
        // A Secret volume, mounted without readOnly.
        ("/etc/pg/audit.log", false),
        // A file mounted by itself (subPath), and its neighbour.
        ("/data/audit.log", true),
        ("/data/other.log", false),
        // A sibling folder whose name starts like a mount's, and a way out by "..".
        ("/var/logs/audit.log", false),
        ("/var/log/../etc/audit.log", false),
        // No mount at all, and a relative path.
        ("/srv/audit.log", false),
        ("audit.log", false),
    ] {
        let audit = format!(r#"engine.audit=["-","{path}"]"#);
        let rendered = run(
            "helm",
            &[
                "template",
                RELEASE,
                &chart,
                "--set-json",
                &audit,
                "--set-json",
                VOLUMES,
                "--set-json",
                MOUNTS,
            ],
        );
        match (renders, rendered) {
            (true, Ok(manifest)) => assert!(manifest.contains(&format!("-,{path}")), "{path}"),
            (false, Err(error)) => assert!(
                error
                    .to_string()
                    .contains(&format!("engine.audit: \"{path}\" is not under a writable mount")),
                "{path}: {error}"
            ),
            (true, Err(error)) => panic!("{path} should render: {error}"),
            (false, Ok(_)) => panic!("{path} should be refused"),
        }
    }
    // Without any mount, even the chart's own example path is refused.
    let error = run(
        "helm",
        &[
            "template",
            RELEASE,
            &chart,
            "--set-json",
            r#"engine.audit=["stdout","/var/log/capstan/audit.log"]"#,
        ],
    )
    .expect_err("no mount");
    assert!(
        error.to_string().contains("is not under a writable mount"),
        "{error}"
    );
}

/// K7: no rule with a wildcard, no Secret access beyond the named exceptions, nothing
/// that escalates; bindings only to the chart's own ServiceAccounts.
#[test]
fn rbac_rules_are_least_privilege() {
    let rendered = run("helm", &["template", RELEASE, &chart(), "-n", SYSTEM_NAMESPACE]).unwrap();
    let mut roles = 0;
    for document in serde_yaml_ng::Deserializer::from_str(&rendered) {
        let object: Value = serde::Deserialize::deserialize(document).unwrap();
        let kind = object["kind"].as_str().unwrap_or_default();
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        match kind {
            "ClusterRole" | "Role" => {
                roles += 1;
                for rule in object["rules"].as_array().expect("rules") {
                    for field in ["apiGroups", "resources", "verbs", "resourceNames"] {
                        for value in rule[field].as_array().into_iter().flatten() {
                            let value = value.as_str().unwrap();
                            assert!(!value.contains('*'), "{kind} {name}: wildcard in {field}: {rule}");
                            // The webhook's one exception: its own certificate Secret, by
                            // name, read and update only (the chart creates it empty).
                            let webhook_tls = name.ends_with("-webhook")
                                && kind == "Role"
                                && rule["resourceNames"] == serde_json::json!(["capstan-webhook-tls"])
                                && rule["verbs"] == serde_json::json!(["get", "update"]);
                            // The engine's: its CA Secret by name (get, list/watch by
                            // field selector, update), and `create`, which RBAC cannot
                            // limit by name, to store a root the first time.
                            let engine_ca = name.ends_with("-engine")
                                && kind == "Role"
                                && ((rule["resourceNames"] == serde_json::json!(["capstan-mesh-ca"])
                                    && rule["verbs"]
                                        == serde_json::json!(["get", "list", "watch", "update"]))
                                    || rule["verbs"] == serde_json::json!(["create"]));
                            // SecretSync's: the controller writes target Secrets in any
                            // namespace (argued in controller-rbac.yaml); exactly these
                            // verbs, never patch or deletecollection.
                            let secretsync = name.ends_with("-controller")
                                && kind == "ClusterRole"
                                && rule["resources"] == serde_json::json!(["secrets"])
                                && rule["verbs"]
                                    == serde_json::json!([
                                        "get", "list", "watch", "create", "update", "delete"
                                    ]);
                            // The jobs reconciler's: server-side apply of a dispatched
                            // Job's payload Secret, nothing else (controller-guard.yaml
                            // admits only Secrets a Job owned before the write).
                            let job_payload = name.ends_with("-controller")
                                && kind == "ClusterRole"
                                && rule["resources"] == serde_json::json!(["secrets"])
                                && rule["verbs"] == serde_json::json!(["patch"]);
                            if field == "resources"
                                && !webhook_tls
                                && !engine_ca
                                && !secretsync
                                && !job_payload
                            {
                                // Secrets and their subresources (not secretsyncs).
                                assert!(
                                    value != "secrets" && !value.starts_with("secrets/"),
                                    "{kind} {name} grants Secrets: {rule}"
                                );
                            }
                            if field == "verbs" && name.ends_with("-mesh-workloads") {
                                assert!(["get", "list", "watch"].contains(&value), "{kind} {name}: {rule}");
                            }
                            if field == "verbs" {
                                assert!(
                                    !["escalate", "bind", "impersonate"].contains(&value),
                                    "{kind} {name}: {rule}"
                                );
                            }
                        }
                    }
                    assert!(rule.get("nonResourceURLs").is_none(), "{kind} {name}: {rule}");
                }
            }
            // Sidecars run as their pods' own ServiceAccounts: the one binding to a group,
            // and only to a read-only role.
            "ClusterRoleBinding" if name.ends_with("-mesh-workloads") => {
                assert_eq!(object["roleRef"]["name"].as_str(), Some(name.as_str()));
                for subject in object["subjects"].as_array().unwrap() {
                    assert_eq!(subject["kind"], "Group", "{name}");
                }
            }
            "ClusterRoleBinding" | "RoleBinding" => {
                for subject in object["subjects"].as_array().unwrap() {
                    assert_eq!(subject["kind"], "ServiceAccount", "{name}");
                    assert_eq!(subject["namespace"], SYSTEM_NAMESPACE, "{name}");
                    assert!(
                        subject["name"].as_str().unwrap().starts_with("capstan-"),
                        "{name}"
                    );
                }
            }
            _ => {}
        }
    }
    assert!(roles >= 2, "no roles rendered:\n{rendered}");
}

/// K7 against the API server's own authorizer: what each ServiceAccount can and cannot do.
#[test]
fn serviceaccounts_can_do_only_their_job() {
    install_chart();
    let as_sa = |sa: &str| format!("--as=system:serviceaccount:{SYSTEM_NAMESPACE}:{sa}");
    let can = |sa: &str, args: &[&str]| -> bool {
        let mut all = vec!["auth", "can-i"];
        all.extend_from_slice(args);
        let who = as_sa(sa);
        all.push(&who);
        std::process::Command::new("kubectl")
            .args(&all)
            .output()
            .unwrap()
            .status
            .success()
    };
    let controller = CONTROLLER_SA;
    let allowed: &[&[&str]] = &[
        &["watch", "serviceintentions.mesh.capstan.dev", "-A"],
        &[
            "patch",
            "serviceintentions.mesh.capstan.dev",
            "--subresource=status",
            "-n",
            "default",
        ],
        &["create", "events.events.k8s.io", "-n", "default"],
        &[
            "update",
            "leases.coordination.k8s.io/capstan-controller",
            "-n",
            SYSTEM_NAMESPACE,
        ],
        // Finding pods that should be meshed but are not.
        &["watch", "pods", "-A"],
        &["watch", "namespaces"],
        &["get", "services", "-n", "default"],
        // SecretSync: its objects, status and finalizer; the target Secrets in any
        // namespace; tokens of the ServiceAccounts SecretSyncs name; rollout restarts;
        // the engine's roots by name.
        &["watch", "secretsyncs.secrets.capstan.dev", "-A"],
        &["patch", "secretsyncs.secrets.capstan.dev", "-n", "default"],
        &[
            "patch",
            "secretsyncs.secrets.capstan.dev",
            "--subresource=status",
            "-n",
            "default",
        ],
        &[
            "update",
            "secretsyncs.secrets.capstan.dev",
            "--subresource=finalizers",
            "-n",
            "default",
        ],
        &["create", "secrets", "-n", "default"],
        &["update", "secrets", "-n", "default"],
        &["delete", "secrets", "-n", "default"],
        &["watch", "secrets", "-A"],
        &[
            "create",
            "serviceaccounts",
            "--subresource=token",
            "-n",
            "default",
        ],
        &["patch", "deployments.apps", "-n", "default"],
        &["get", "deployments.apps", "-n", "default"],
        &["watch", "configmaps/capstan-mesh-roots", "-n", SYSTEM_NAMESPACE],
        // Credentials (N2): a stopped pod's finalizer, removed once the engine revoked
        // its logins; the controller's own token, for its own engine login.
        &["patch", "pods", "-n", "default"],
        &[
            "create",
            "serviceaccounts/capstan-controller",
            "--subresource=token",
            "-n",
            SYSTEM_NAMESPACE,
        ],
    ];
    for args in allowed {
        assert!(can(controller, args), "the controller needs: {args:?}");
    }
    // What only the controller may do (SecretSync's Secret access is cluster-wide, said
    // and argued in controller-rbac.yaml); every other ServiceAccount is denied it.
    let secret_access: &[&[&str]] = &[
        &["get", "secrets", "-A"],
        &["get", "secrets", "-n", SYSTEM_NAMESPACE],
    ];
    // SecretSync's rules stop at what it needs.
    let secretsync_denied: &[&[&str]] = &[
        &["create", "secretsyncs.secrets.capstan.dev", "-n", "default"],
        &["delete", "secretsyncs.secrets.capstan.dev", "-n", "default"],
        &[
            "get",
            "storageentries.secrets.capstan.dev",
            "-n",
            SYSTEM_NAMESPACE,
        ],
        &["create", "deployments.apps", "-n", "default"],
        &["delete", "deployments.apps", "-n", "default"],
        &["patch", "statefulsets.apps", "-n", "default"],
        &["create", "serviceaccounts", "-n", "default"],
        &["get", "configmaps", "-n", "default"],
        &["update", "configmaps/capstan-mesh-roots", "-n", SYSTEM_NAMESPACE],
        &["create", "tokenreviews.authentication.k8s.io"],
    ];
    let denied: &[&[&str]] = &[
        &["delete", "pods", "-n", "default"],
        &["patch", "serviceintentions.mesh.capstan.dev", "-n", "default"],
        &["delete", "serviceintentions.mesh.capstan.dev", "-n", "default"],
        &[
            "update",
            "leases.coordination.k8s.io/kube-controller-manager",
            "-n",
            "kube-system",
        ],
        &[
            "update",
            "leases.coordination.k8s.io/someone-else",
            "-n",
            SYSTEM_NAMESPACE,
        ],
        &["create", "leases.coordination.k8s.io", "-n", "default"],
        &[
            "patch",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io",
        ],
        &["create", "clusterrolebindings.rbac.authorization.k8s.io"],
        &["*", "*"],
    ];
    for args in denied.iter().chain(secretsync_denied) {
        assert!(
            !can(controller, args),
            "the controller must not be able to: {args:?}"
        );
    }
    // The webhook: its own certificate Secret and webhook configurations by name, the
    // mesh roots, namespace labels and Services; nothing of the controller's.
    let webhook = "capstan-webhook";
    let webhook_allowed: &[&[&str]] = &[
        &["get", "secrets/capstan-webhook-tls", "-n", SYSTEM_NAMESPACE],
        &["update", "secrets/capstan-webhook-tls", "-n", SYSTEM_NAMESPACE],
        &["get", "configmaps/capstan-mesh-roots", "-n", SYSTEM_NAMESPACE],
        &["watch", "namespaces"],
        &["get", "services", "-n", "default"],
        &[
            "patch",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io/capstan-webhook",
        ],
        &[
            "patch",
            "validatingwebhookconfigurations.admissionregistration.k8s.io/capstan-webhook",
        ],
    ];
    for args in webhook_allowed {
        assert!(can(webhook, args), "the webhook needs: {args:?}");
    }
    let webhook_denied: &[&[&str]] = &[
        &["create", "secrets", "-n", SYSTEM_NAMESPACE],
        &["get", "secrets/capstan-mesh-ca", "-n", SYSTEM_NAMESPACE],
        &["list", "secrets", "-n", SYSTEM_NAMESPACE],
        &["update", "configmaps/capstan-mesh-roots", "-n", SYSTEM_NAMESPACE],
        &[
            "patch",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io/someone-else",
        ],
        &[
            "delete",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io/capstan-webhook",
        ],
        &[
            "create",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io",
        ],
        &["create", "services", "-n", "default"],
        &["get", "pods", "-n", "default"],
        &["patch", "namespaces/default"],
    ];
    // Every ServiceAccount may read intentions, Services and EndpointSlices (the
    // mesh-workloads binding: sidecars run as their pods' ServiceAccounts), so the
    // controller's read of intentions is not in this list.
    for args in allowed
        .iter()
        .skip(1)
        .take(3)
        .chain(secret_access)
        .chain(denied)
        .chain(webhook_denied)
    {
        assert!(!can(webhook, args), "the webhook must not be able to: {args:?}");
    }
    // Any workload's ServiceAccount (its sidecar): read intentions and the service
    // directory, nothing else.
    let workload = |args: &[&str]| -> bool {
        let mut all = vec!["auth", "can-i"];
        all.extend_from_slice(args);
        all.push("--as=system:serviceaccount:default:default");
        all.push("--as-group=system:serviceaccounts");
        std::process::Command::new("kubectl")
            .args(&all)
            .output()
            .unwrap()
            .status
            .success()
    };
    for args in [
        &["watch", "serviceintentions.mesh.capstan.dev", "-A"][..],
        &["list", "endpointslices.discovery.k8s.io", "-A"],
        &["watch", "services", "-A"],
    ] {
        assert!(workload(args), "a sidecar needs: {args:?}");
    }
    for args in [
        &["create", "serviceintentions.mesh.capstan.dev", "-n", "default"][..],
        &["update", "endpointslices.discovery.k8s.io", "-n", "default"],
        &["get", "secrets", "-n", "default"],
        &["list", "pods", "-A"],
    ] {
        assert!(!workload(args), "a sidecar must not be able to: {args:?}");
    }
    // The engine (mesh CA): TokenReview, its CA Secret and roots ConfigMap by name.
    let engine = "capstan-engine";
    let engine_allowed: &[&[&str]] = &[
        &["create", "tokenreviews.authentication.k8s.io"],
        &["get", "secrets/capstan-mesh-ca", "-n", SYSTEM_NAMESPACE],
        &["watch", "secrets/capstan-mesh-ca", "-n", SYSTEM_NAMESPACE],
        &["update", "secrets/capstan-mesh-ca", "-n", SYSTEM_NAMESPACE],
        &["create", "secrets", "-n", SYSTEM_NAMESPACE],
        &["get", "configmaps/capstan-mesh-roots", "-n", SYSTEM_NAMESPACE],
        &["update", "configmaps/capstan-mesh-roots", "-n", SYSTEM_NAMESPACE],
        &["create", "configmaps", "-n", SYSTEM_NAMESPACE],
        // The secrets engine: its storage, and the pods its logins are bound to.
        &[
            "list",
            "storageentries.secrets.capstan.dev",
            "-n",
            SYSTEM_NAMESPACE,
        ],
        &[
            "update",
            "storageentries.secrets.capstan.dev",
            "-n",
            SYSTEM_NAMESPACE,
        ],
        &["get", "pods", "-n", "default"],
    ];
    for args in engine_allowed {
        assert!(can(engine, args), "the engine needs: {args:?}");
    }
    let engine_denied: &[&[&str]] = &[
        &["get", "secrets/capstan-webhook-tls", "-n", SYSTEM_NAMESPACE],
        &["list", "secrets", "-n", SYSTEM_NAMESPACE],
        &["delete", "secrets/capstan-mesh-ca", "-n", SYSTEM_NAMESPACE],
        &["patch", "secrets/capstan-mesh-ca", "-n", SYSTEM_NAMESPACE],
        &["create", "secrets", "-n", "default"],
        &["get", "secrets/capstan-mesh-ca", "-n", "default"],
        &["get", "configmaps/other", "-n", SYSTEM_NAMESPACE],
        &["create", "serviceaccounts/token", "-n", SYSTEM_NAMESPACE],
        &["create", "serviceaccounts/token", "-n", "default"],
        &["list", "pods", "-A"],
        &["create", "storageentries.secrets.capstan.dev", "-n", "default"],
    ];
    for args in secret_access.iter().chain(denied).chain(engine_denied) {
        assert!(!can(engine, args), "the engine must not be able to: {args:?}");
    }
}

/// K7 as an attacker holding capstan-controller's credentials: RBAC lets it create tokens,
/// patch Deployments and write Secrets cluster-wide, as SecretSync needs, and the chart's
/// ValidatingAdmissionPolicies narrow each to what SecretSync does. Every attack goes
/// through the real API server as the controller's ServiceAccount and must be refused;
/// the legitimate shape of each write must still pass.
#[tokio::test]
async fn the_controllers_credentials_do_not_reach_beyond_secretsync() -> anyhow::Result<()> {
    let client = client().await;
    install_chart();
    let ns = TestNamespace::new(&client, "e2e-k7").await;
    let n = ns.name.as_str();
    let as_controller = format!("--as=system:serviceaccount:{SYSTEM_NAMESPACE}:{CONTROLLER_SA}");
    let kubectl = |args: &[&str]| -> (bool, String) {
        let mut all = args.to_vec();
        all.push(&as_controller);
        kubectl_stdin(&all, "")
    };
    let refused = |what: &str, (ok, out): (bool, String), needle: &str| {
        assert!(!ok, "{what}: the controller's credentials did it:\n{out}");
        assert!(out.contains(needle), "{what}: refused for another reason:\n{out}");
    };

    // Tokens: a kube-system ServiceAccount's with the API server's audience, a long one,
    // and one for another audience; the engine's audience in a tenant namespace passes.
    run("kubectl", &["create", "serviceaccount", "app", "-n", n])?;
    let token = |namespace: &str, sa: &str, flags: &[&str]| {
        let mut args = vec!["create", "token", sa, "-n", namespace];
        args.extend_from_slice(flags);
        kubectl(&args)
    };
    let engine = ["--audience", "capstan-engine"];
    refused(
        "a kube-system token for the API",
        token(
            "kube-system",
            "default",
            &["--audience", "https://kubernetes.default.svc"],
        ),
        "only for the engine's audience",
    );
    refused(
        "a kube-system token for the engine",
        token("kube-system", "default", &engine),
        "may not request tokens for ServiceAccounts of kube-system",
    );
    refused(
        "a tenant token for the API",
        token(n, "app", &[]),
        "only for the engine's audience",
    );
    refused(
        "a day-long token",
        token(n, "app", &[&engine[..], &["--duration", "24h"]].concat()),
        "at most an hour",
    );
    let (ok, out) = token(n, "app", &[&engine[..], &["--duration", "10m"]].concat());
    assert!(ok, "SecretSync's own token request: {out}");
    // In Capstan's namespace, only its own, for its own engine login (N2).
    let (ok, out) = token(
        SYSTEM_NAMESPACE,
        CONTROLLER_SA,
        &[&engine[..], &["--duration", "10m"]].concat(),
    );
    assert!(ok, "the controller's own token request: {out}");
    refused(
        "the webhook's token for the engine",
        token(SYSTEM_NAMESPACE, WEBHOOK_SA, &engine),
        "may not request tokens for ServiceAccounts of",
    );

    // Pods (N2): a label, an annotation, a finalizer of its own are refused; removing
    // a finalizer (the credentials reconciler's only write) passes.
    let pod = format!(
        r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"held","namespace":"{n}",
            "finalizers":["secrets.capstan.dev/revoke-credentials"]}},
            "spec":{{"schedulerName":"e2e-no-scheduler","containers":[{{"name":"app","image":"app:1"}}]}}}}"#
    );
    let (ok, out) = kubectl_stdin(&["create", "-f", "-"], &pod);
    assert!(ok, "{out}");
    let pod_patch = |patch: &str| kubectl(&["patch", "pod", "held", "-n", n, "--type", "merge", "-p", patch]);
    for (what, patch) in [
        ("a pod label", r#"{"metadata":{"labels":{"example.com/x":"y"}}}"#),
        (
            "a pod annotation",
            r#"{"metadata":{"annotations":{"example.com/x":"y"}}}"#,
        ),
        (
            "a pod finalizer",
            r#"{"metadata":{"finalizers":["secrets.capstan.dev/revoke-credentials","example.com/hold"]}}"#,
        ),
    ] {
        refused(what, pod_patch(patch), "may only remove a pod's finalizers");
    }
    let (ok, out) = pod_patch(r#"{"metadata":{"finalizers":null}}"#);
    assert!(ok, "removing the credentials finalizer: {out}");

    // Deployments: an image change, a scale to zero, a new label; the restart passes.
    run(
        "kubectl",
        &[
            "create",
            "deployment",
            "web",
            "-n",
            n,
            "--image",
            "registry.example/web:1",
        ],
    )?;
    let merge = |patch: &str| kubectl(&["patch", "deployment", "web", "-n", n, "--type=merge", "-p", patch]);
    refused(
        "an image patch",
        kubectl(&[
            "patch",
            "deployment",
            "web",
            "-n",
            n,
            "--type=json",
            "-p",
            r#"[{"op":"replace","path":"/spec/template/spec/containers/0/image","value":"registry.example/evil:1"}]"#,
        ]),
        "only the pod template annotation capstan.dev/restartedAt",
    );
    refused(
        "a scale to zero",
        merge(r#"{"spec":{"replicas":0}}"#),
        "may not change a Deployment's replicas",
    );
    refused(
        "another template annotation",
        merge(
            r#"{"spec":{"template":{"metadata":{"annotations":{"capstan.dev/restartedAt":"x","sidecar.istio.io/inject":"false"}}}}}"#,
        ),
        "only the pod template annotation",
    );
    // The Deployment's own metadata: an owner reference to a missing owner (the garbage
    // collector would delete it), a finalizer, an annotation; a template finalizer.
    for (what, patch) in [
        (
            "an owner reference",
            r#"{"metadata":{"ownerReferences":[{"apiVersion":"v1","kind":"ConfigMap","name":"gone","uid":"00000000-0000-0000-0000-000000000000"}]}}"#,
        ),
        (
            "a finalizer",
            r#"{"metadata":{"finalizers":["example.com/hold"]}}"#,
        ),
        (
            "an annotation",
            r#"{"metadata":{"annotations":{"example.com/x":"y"}}}"#,
        ),
        (
            "a template finalizer",
            r#"{"spec":{"template":{"metadata":{"finalizers":["example.com/hold"]}}}}"#,
        ),
    ] {
        refused(what, merge(patch), "may not change a Deployment's own");
    }
    let (ok, out) = merge(
        r#"{"spec":{"template":{"metadata":{"annotations":{"capstan.dev/restartedAt":"2026-12-05T00:00:00Z"}}}}}"#,
    );
    assert!(ok, "SecretSync's rollout restart: {out}");

    // Secrets: one it does not own, replaced or deleted; a ServiceAccount token Secret;
    // a Secret a SecretSync owns passes.
    run(
        "kubectl",
        &[
            "create",
            "secret",
            "generic",
            "victim",
            "-n",
            n,
            "--from-literal=k=v",
        ],
    )?;
    let victim = run("kubectl", &["get", "secret", "victim", "-n", n, "-o", "json"])?;
    let mut replaced: Value = serde_json::from_str(&victim)?;
    replaced["data"]["k"] = Value::from("ZXZpbA==");
    let mut replace = vec!["replace", "-f", "-"];
    replace.push(&as_controller);
    refused(
        "replacing a Secret it does not own",
        kubectl_stdin(&replace, &replaced.to_string()),
        "may write only Secrets a SecretSync or a Job owns",
    );
    refused(
        "deleting a Secret it does not own",
        kubectl(&["delete", "secret", "victim", "-n", n]),
        "may write only Secrets a SecretSync or a Job owns",
    );
    // The jobs reconciler's payload rule (patch, for a dispatched Job's Secret) cannot
    // adopt a Secret: the guard judges the Secret as it was, so claiming a Job as its
    // owner in the same write is refused.
    refused(
        "adopting a Secret it does not own as a Job's payload",
        kubectl(&[
            "patch",
            "secret",
            "victim",
            "-n",
            n,
            "--type=merge",
            "-p",
            r#"{"metadata":{"ownerReferences":[{"apiVersion":"jobs.capstan.dev/v1alpha1","kind":"Job","name":"x","uid":"00000000-0000-0000-0000-000000000001"}]},"data":{"k":"ZXZpbA=="}}"#,
        ]),
        "may write only Secrets a SecretSync or a Job owns",
    );
    let mut create = vec!["create", "-f", "-"];
    create.push(&as_controller);
    let token_secret = format!(
        r#"{{"apiVersion":"v1","kind":"Secret","type":"kubernetes.io/service-account-token",
            "metadata":{{"name":"stolen","namespace":"{n}","labels":{{"capstan.dev/secretsync-uid":"x"}},
            "annotations":{{"kubernetes.io/service-account.name":"app"}}}}}}"#
    );
    refused(
        "a ServiceAccount token Secret",
        kubectl_stdin(&create, &token_secret),
        "only the Secret types a SecretSync writes",
    );
    // A create carries its own label, so where it is made and its type are what count.
    let labelled = |namespace: &str, type_: &str, name: &str| {
        format!(
            r#"{{"apiVersion":"v1","kind":"Secret","type":"{type_}","metadata":{{"name":"{name}",
                "namespace":"{namespace}","labels":{{"capstan.dev/secretsync-uid":"x"}}}},
                "data":{{"token-id":"YWJjZGVm","token-secret":"MDEyMzQ1Njc4OWFiY2RlZg=="}}}}"#
        )
    };
    refused(
        "a labelled Secret in kube-system",
        kubectl_stdin(&create, &labelled("kube-system", "Opaque", "planted")),
        "may not create Secrets in kube-system",
    );
    refused(
        "a labelled Secret in Capstan's namespace",
        kubectl_stdin(&create, &labelled(SYSTEM_NAMESPACE, "Opaque", "planted")),
        "may not create Secrets in capstan-system",
    );
    refused(
        "a bootstrap token",
        kubectl_stdin(
            &create,
            &labelled(n, "bootstrap.kubernetes.io/token", "bootstrap-token-abcdef"),
        ),
        "only the Secret types a SecretSync writes",
    );
    let owned = format!(
        r#"{{"apiVersion":"v1","kind":"Secret","metadata":{{"name":"synced","namespace":"{n}",
            "labels":{{"capstan.dev/secretsync-uid":"x"}}}},"data":{{"k":"dg=="}}}}"#
    );
    let (ok, out) = kubectl_stdin(&create, &owned);
    assert!(ok, "a SecretSync's target: {out}");
    let (ok, out) = kubectl(&["delete", "secret", "synced", "-n", n]);
    assert!(ok, "a SecretSync's target: {out}");
    Ok(())
}
