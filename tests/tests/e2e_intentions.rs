//! ServiceIntentions through the real API server and a real capstan-controller.

use capstan_crds::{ServiceIntentions, conditions};
use capstan_tests::*;
use k8s_openapi::api::events::v1::Event;
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use std::time::Duration;

const READY_WITHIN: Duration = Duration::from_secs(30);

#[tokio::test]
async fn example_applied_with_kubectl_reaches_ready() -> anyhow::Result<()> {
    let client = client().await;
    let _controller = ControllerProcess::sole(&client, "intentions-example").await?;
    let example = repo_root().join("examples/intentions.yaml");
    run("kubectl", &["apply", "-f", example.to_str().unwrap()])?;

    let api = wait_accepted(&client, "shop", "api").await?;
    assert_eq!(api.status.as_ref().unwrap().sources, Some(3));
    wait_accepted(&client, "shop", "db").await?;

    // The printer columns say what a user needs at a glance.
    let table = run("kubectl", &["get", "serviceintentions", "-n", "shop"])?;
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "DESTINATION", "SOURCES", "READY", "REASON", "AGE"] {
        assert!(header.contains(column), "missing column {column}: {table}");
    }
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("api ") && l.contains("True") && l.contains("Accepted")),
        "{table}"
    );
    // ...and the category and short name reach it too.
    assert!(run("kubectl", &["get", "capstan", "-n", "shop"])?.contains("api"));
    assert!(run("kubectl", &["get", "sint", "-n", "shop"])?.contains("db"));

    // The controller said so in an Event.
    let events = Api::<Event>::namespaced(client.clone(), "shop");
    let found = eventually(Duration::from_secs(10), "an Accepted event for shop/api", || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items.into_iter().find(|e| {
                e.reason.as_deref() == Some("Accepted")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("api")
            })
        }
    })
    .await?;
    assert_eq!(found.reporting_controller.as_deref(), Some("capstan-controller"));

    run(
        "kubectl",
        &["delete", "-f", example.to_str().unwrap(), "--wait=false"],
    )?;
    Ok(())
}

/// Bad input is refused at the door, with a message that names the field.
#[tokio::test]
async fn invalid_objects_are_refused_naming_the_field() -> anyhow::Result<()> {
    let client = client().await;
    install_chart();
    let ns = TestNamespace::new(&client, "e2e-invalid").await;
    let cases: &[(&str, &str, &str)] = &[
        (
            "both action and permissions",
            "sources: [{name: web, action: allow, permissions: [{action: allow, http: {pathPrefix: /}}]}]",
            "spec.sources[0]: Invalid value: set exactly one of action (L4) or permissions (L7)",
        ),
        (
            "neither action nor permissions",
            "sources: [{name: web}]",
            "set exactly one of action (L4) or permissions (L7)",
        ),
        (
            "upper-case service name",
            "sources: [{name: Web, action: allow}]",
            "spec.sources[0].name: Invalid value: \"Web\"",
        ),
        (
            "regex metacharacters in a name",
            "sources: [{name: 'web.*', action: allow}]",
            "spec.sources[0].name: Invalid value: \"web.*\"",
        ),
        (
            "unknown action",
            "sources: [{name: web, action: maybe}]",
            "spec.sources[0].action: Unsupported value: \"maybe\"",
        ),
        (
            "relative path prefix",
            "sources: [{name: web, permissions: [{action: allow, http: {pathPrefix: admin}}]}]",
            "spec.sources[0].permissions[0].http.pathPrefix: Invalid value: \"admin\"",
        ),
        (
            "two path matchers",
            "sources: [{name: web, permissions: [{action: allow, http: {pathPrefix: /a, pathExact: /a}}]}]",
            "set at most one of pathExact, pathPrefix and pathRegex",
        ),
        (
            "lower-case method",
            "sources: [{name: web, permissions: [{action: allow, http: {methods: [get]}}]}]",
            "spec.sources[0].permissions[0].http.methods[0]: Unsupported value: \"get\"",
        ),
        (
            "header with two matchers",
            "sources: [{name: web, permissions: [{action: allow, http: {header: [{name: x-a, exact: b, prefix: c}]}}]}]",
            "spec.sources[0].permissions[0].http.header[0]",
        ),
        (
            "unknown field",
            "sources: []\n  bogus: 1",
            "unknown field \"spec.bogus\"",
        ),
    ];
    for (what, spec_tail, expected) in cases {
        let manifest = format!(
            "apiVersion: mesh.capstan.dev/v1alpha1\nkind: ServiceIntentions\nmetadata:\n  name: bad\n  namespace: {}\nspec:\n  destination: {{name: api}}\n  {spec_tail}\n",
            ns.name
        );
        let (ok, output) = kubectl_stdin(&["create", "-f", "-"], &manifest);
        assert!(!ok, "{what}: accepted, but must be refused:\n{manifest}");
        assert!(
            output.contains(expected),
            "{what}: the refusal must say {expected:?}, it said:\n{output}"
        );
    }
    let (ok, output) = kubectl_stdin(
        &["create", "-f", "-"],
        &format!(
            "apiVersion: mesh.capstan.dev/v1alpha1\nkind: ServiceIntentions\nmetadata: {{name: bad, namespace: {}}}\nspec: {{sources: []}}\n",
            ns.name
        ),
    );
    assert!(
        !ok && output.contains("spec.destination: Required value"),
        "{output}"
    );
    Ok(())
}

/// What the schema cannot check (a regular expression that does not compile, a source
/// listed twice) is reported in status by the controller, naming the field, instead
/// of being silently ignored; fixing the spec makes the object Ready.
#[tokio::test]
async fn spec_errors_the_schema_cannot_see_are_reported_in_status() -> anyhow::Result<()> {
    let client = client().await;
    let _controller = ControllerProcess::sole(&client, "intentions-invalid").await?;
    let ns = TestNamespace::new(&client, "e2e-spec").await;
    let cases = [
        (
            "regex",
            "[{name: web, permissions: [{action: allow, http: {pathRegex: '/v1/('}}]}]",
            "spec.sources[0].permissions[0].http.pathRegex: invalid regular expression",
        ),
        (
            "duplicate",
            "[{name: web, action: allow}, {name: web, namespace: NS, action: deny}]",
            "spec.sources[1]: duplicate of spec.sources[0] (name \"web\", namespace \"NS\")",
        ),
    ];
    for (name, sources, expected) in cases {
        let (sources, expected) = (sources.replace("NS", &ns.name), expected.replace("NS", &ns.name));
        let manifest = format!(
            "apiVersion: mesh.capstan.dev/v1alpha1\nkind: ServiceIntentions\nmetadata: {{name: {name}, namespace: {}}}\nspec:\n  destination: {{name: {name}}}\n  sources: {sources}\n",
            ns.name
        );
        let (ok, output) = kubectl_stdin(&["create", "-f", "-"], &manifest);
        assert!(ok, "{output}");
        let obj = wait_ready(&client, &ns.name, name, "False", "InvalidSpec", READY_WITHIN).await?;
        let ready = conditions::get(&obj.status.as_ref().unwrap().conditions, conditions::READY).unwrap();
        assert!(ready.message.starts_with(&expected), "{name}: {}", ready.message);
    }
    let api = Api::<ServiceIntentions>::namespaced(client.clone(), &ns.name);
    let fixed = serde_json::json!({"spec": {"sources": [{"name": "web", "action": "allow"}]}});
    api.patch("duplicate", &PatchParams::default(), &Patch::Merge(&fixed))
        .await?;
    wait_accepted(&client, &ns.name, "duplicate").await?;
    Ok(())
}

/// Two objects for one destination: the older is in force, the newer reports the
/// conflict, and deleting the older hands the destination to the newer.
#[tokio::test]
async fn conflicting_objects_are_reported_and_resolve_on_delete() -> anyhow::Result<()> {
    let client = client().await;
    let _controller = ControllerProcess::sole(&client, "intentions-conflict").await?;
    let ns = TestNamespace::new(&client, "e2e-conflict").await;
    let api = Api::<ServiceIntentions>::namespaced(client.clone(), &ns.name);
    create_conflicting_pair(&client, &ns.name).await?;
    let second = api.get("second").await?;
    assert_eq!(
        second.status.unwrap().conflicts,
        vec![format!("{}/first", ns.name)]
    );
    let first = eventually(READY_WITHIN, "first to list the shadowed object", || {
        let api = api.clone();
        async move {
            api.get("first")
                .await
                .ok()
                .filter(|o| o.status.as_ref().is_some_and(|s| !s.conflicts.is_empty()))
        }
    })
    .await?;
    assert_eq!(
        first.status.unwrap().conflicts,
        vec![format!("{}/second", ns.name)]
    );

    api.delete("first", &DeleteParams::default()).await?;
    let second = wait_accepted(&client, &ns.name, "second").await?;
    assert!(
        second.status.as_ref().unwrap().conflicts.is_empty(),
        "{:?}",
        second.status
    );
    Ok(())
}

/// K5: status writes race with another writer of the same status. The controller
/// retries on 409 with a fresh read, and neither writer's condition is lost.
#[tokio::test]
async fn status_survives_concurrent_writers() -> anyhow::Result<()> {
    let client = client().await;
    let controller = ControllerProcess::sole(&client, "intentions-k5").await?;
    let ns = TestNamespace::new(&client, "e2e-k5").await;
    let api = Api::<ServiceIntentions>::namespaced(client.clone(), &ns.name);
    api.create(&PostParams::default(), &intention("contended", "api"))
        .await?;
    wait_accepted(&client, &ns.name, "contended").await?;

    // A second, well-behaved writer (read, change its own condition, write with the
    // resourceVersion it read) hammers the status while the spec keeps changing.
    let writer_api = api.clone();
    let writer = tokio::spawn(async move {
        let mut written = 0u32;
        for i in 0..400u32 {
            let Ok(fresh) = writer_api.get_status("contended").await else {
                continue;
            };
            let mut status = fresh.status.clone().unwrap_or_default();
            conditions::upsert(
                &mut status.conditions,
                conditions::new(
                    "ExternalCheck",
                    conditions::ConditionStatus::True,
                    "Checked",
                    format!("write {i}"),
                    None,
                ),
            );
            let patch = serde_json::json!({"metadata": {"resourceVersion": fresh.metadata.resource_version}, "status": status});
            if writer_api
                .patch_status("contended", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .is_ok()
            {
                written = i;
            }
        }
        written
    });
    let mut generation = 1;
    for round in 0..20u32 {
        let patch = serde_json::json!({"spec": {"sources": [{"name": format!("client-{round}"), "action": "allow"}]}});
        generation = api
            .patch("contended", &PatchParams::default(), &Patch::Merge(&patch))
            .await?
            .metadata
            .generation
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last_external = writer.await?;

    let obj = wait_accepted(&client, &ns.name, "contended").await?;
    let status = obj.status.unwrap();
    assert_eq!(
        status.observed_generation,
        Some(generation),
        "the controller's status is for the last spec"
    );
    let external =
        conditions::get(&status.conditions, "ExternalCheck").expect("the other writer's condition survived");
    assert_eq!(
        external.message,
        format!("write {last_external}"),
        "the other writer's last update survived"
    );

    let metrics = controller.metrics().await?;
    let conflicts: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("capstan_controller_status_conflicts_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        conflicts > 0.0,
        "the race produced no 409 to retry; metrics:\n{metrics}"
    );
    Ok(())
}

/// `capstan intentions check` answers from the intentions in the cluster, as the sidecar
/// would decide, naming the deciding rule; its exit status says allowed (0) or denied (1).
#[tokio::test]
async fn intentions_check_decides_from_the_cluster() -> anyhow::Result<()> {
    let client = client().await;
    install_chart();
    let ns = TestNamespace::new(&client, "e2e-check").await;
    let manifest = std::fs::read_to_string(repo_root().join("examples/intentions.yaml"))?
        .replace("namespace: shop", &format!("namespace: {}", ns.name))
        .replace("name: shop\n", &format!("name: {}\n", ns.name));
    let (ok, out) = kubectl_stdin(&["apply", "-f", "-"], &manifest);
    assert!(ok, "{out}");
    let n = ns.name.as_str();
    let cases: &[(&[&str], i32, String)] = &[
        (
            &["web", "api"],
            0,
            format!("{n}/web -> {n}/api: ALLOW by {n}/api sources[0]"),
        ),
        (
            &["cart", "api"],
            1,
            format!("{n}/cart -> {n}/api: DENY by {n}/api sources[2]"),
        ),
        (
            &["other/cart", "api"],
            1,
            format!("other/cart -> {n}/api: DENY by {n}/api sources[2]"),
        ),
        (
            &["web", "db"],
            1,
            format!("{n}/web -> {n}/db: DENY by cluster default"),
        ),
        (
            &["api", "db"],
            0,
            format!("{n}/api -> {n}/db: ALLOW by {n}/db sources[0]"),
        ),
        (
            &["admin", "api"],
            0,
            format!(
                "{n}/admin -> {n}/api: L7: the connection is accepted and each request is decided by {n}/api sources[1].permissions"
            ),
        ),
        (
            &["admin", "api", "--path", "/admin/users"],
            0,
            format!("{n}/admin -> {n}/api GET /admin/users: ALLOW by {n}/api sources[1].permissions[0]"),
        ),
        (
            &["admin", "api", "--path", "/admin/users", "--method", "post"],
            1,
            format!("{n}/admin -> {n}/api POST /admin/users: DENY by {n}/api sources[1].permissions[1]"),
        ),
        (
            &["admin", "api", "--path", "/%2Fadmin"],
            1,
            format!("{n}/admin -> {n}/api GET /%2Fadmin: DENY by invalid request path"),
        ),
    ];
    for (args, code, expected) in cases {
        let mut all = vec!["-n", n];
        all.extend_from_slice(args);
        let (got, out) = check(&all)?;
        assert_eq!(got, Some(*code), "{args:?}: {out}");
        assert!(
            out.starts_with(expected.as_str()),
            "{args:?}: expected {expected:?}, got {out:?}"
        );
    }
    Ok(())
}

/// Runs `capstan intentions check ARGS`: (exit code, stdout).
fn check(args: &[&str]) -> anyhow::Result<(Option<i32>, String)> {
    let mut all = vec!["intentions", "check"];
    all.extend_from_slice(args);
    let out = std::process::Command::new(bin("capstan")).args(&all).output()?;
    Ok((
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// Issue 15.1, tenancy (RELIABILITY S1 for intentions): a ServiceIntentions in a tenant's
/// namespace that names every namespace, or another one, is refused at the door by the
/// API server itself (the chart's ValidatingAdmissionPolicy; no webhook runs here), and
/// one stored anyway (before the policy) governs nothing: the reconciler reports it, the
/// owner's own object is not shadowed by it, and the CLI decides as the sidecars do.
#[tokio::test]
async fn a_tenant_cannot_govern_another_namespace() -> anyhow::Result<()> {
    let client = client().await;
    let _controller = ControllerProcess::sole(&client, "intentions-tenancy").await?;
    let evil = TestNamespace::new(&client, "e2e-evil").await;
    let shop = TestNamespace::new(&client, "e2e-shop").await;
    let (e, s) = (evil.name.as_str(), shop.name.as_str());
    let grab = |name: &str, destination: &str| {
        format!(
            "apiVersion: mesh.capstan.dev/v1alpha1\nkind: ServiceIntentions\nmetadata: {{name: {name}, namespace: {e}}}\n\
             spec:\n  destination: {destination}\n  sources: [{{name: '*', namespace: {e}, action: allow}}]\n"
        )
    };
    let attacks = [
        ("grab", "{name: '*', namespace: '*'}".to_owned()),
        ("shadow", format!("{{name: db, namespace: {s}}}")),
    ];
    for (name, destination) in &attacks {
        let (ok, output) = kubectl_stdin(&["create", "-f", "-"], &grab(name, destination));
        assert!(
            !ok,
            "{name}: a tenant's object naming another namespace was accepted"
        );
        assert!(
            output.contains("spec.destination.namespace") && output.contains("its own namespace"),
            "{name}: the refusal must name the field: {output}"
        );
    }
    // Nor by an update: a valid object of the tenant's turned to another namespace.
    let (ok, output) = kubectl_stdin(&["create", "-f", "-"], &grab("turned", "{name: web}"));
    assert!(ok, "{output}");
    let (ok, output) = kubectl_stdin(
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        &grab("turned", &format!("{{name: db, namespace: {s}}}")),
    );
    assert!(
        !ok && output.contains("spec.destination.namespace"),
        "an update into another namespace: {output}"
    );
    // Objects in Capstan's own namespace may set cluster-wide rules.
    let (ok, output) = kubectl_stdin(
        &["create", "--dry-run=server", "-f", "-"],
        &grab("defaults", "{name: '*', namespace: '*'}")
            .replace(&format!("namespace: {e}}}"), "namespace: capstan-system}"),
    );
    assert!(ok, "Capstan's namespace may name every namespace: {output}");

    // Stored anyway, before the owner's object (were it counted, it would shadow it).
    let manifests: Vec<String> = attacks.iter().map(|(n, d)| grab(n, d)).collect();
    store_despite_tenancy_policy(&manifests).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, output) = kubectl_stdin(
        &["create", "-f", "-"],
        &format!(
            "apiVersion: mesh.capstan.dev/v1alpha1\nkind: ServiceIntentions\nmetadata: {{name: db, namespace: {s}}}\n\
             spec:\n  destination: {{name: db}}\n  sources: [{{name: web, action: allow}}]\n"
        ),
    );
    assert!(ok, "{output}");
    for (name, _) in &attacks {
        let obj = wait_ready(&client, e, name, "False", "ForeignDestination", READY_WITHIN).await?;
        let ready = conditions::get(&obj.status.as_ref().unwrap().conditions, conditions::READY).unwrap();
        assert!(
            ready.message.starts_with("spec.destination.namespace:"),
            "{}",
            ready.message
        );
    }
    wait_accepted(&client, s, "db").await?;

    let (code, out) = check(&[&format!("{e}/x"), &format!("{s}/db")])?;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("DENY by cluster default"), "{out}");
    let (code, out) = check(&[&format!("{e}/x"), &format!("{e}/anything")])?;
    assert_eq!(code, Some(1), "{out}");
    let (code, out) = check(&[&format!("{s}/web"), &format!("{s}/db")])?;
    assert_eq!(code, Some(0), "the owner's own object is in force: {out}");
    assert!(out.contains(&format!("ALLOW by {s}/db sources[0]")), "{out}");
    Ok(())
}

/// Issue 15.4: consul-k8s fields Capstan does not implement are refused, not pruned into
/// a wider allow, even from a client that does not ask for strict field validation
/// (kubectl --validate=false sends fieldValidation=Ignore).
#[tokio::test]
async fn unsupported_consul_fields_are_refused_not_pruned() -> anyhow::Result<()> {
    let client = client().await;
    install_chart();
    let ns = TestNamespace::new(&client, "e2e-consul-fields").await;
    let cases = [
        (
            "sources: [{name: web, peer: cluster-2, action: allow}]",
            "spec.sources[0].peer",
        ),
        (
            "sources: [{name: web, partition: p1, action: allow}]",
            "spec.sources[0].partition",
        ),
        (
            "sources: [{name: web, samenessGroup: g1, action: allow}]",
            "spec.sources[0].samenessGroup",
        ),
        (
            "jwt: {providers: [{name: okta}]}\n  sources: [{name: web, action: allow}]",
            "spec.jwt",
        ),
        (
            "sources: [{name: web, permissions: [{action: allow, http: {pathPrefix: /}, jwt: {providers: [{name: okta}]}}]}]",
            "spec.sources[0].permissions[0].jwt",
        ),
    ];
    for (spec_tail, field) in cases {
        let manifest = format!(
            "apiVersion: mesh.capstan.dev/v1alpha1\nkind: ServiceIntentions\nmetadata: {{name: consul, namespace: {}}}\n\
             spec:\n  destination: {{name: api}}\n  {spec_tail}\n",
            ns.name
        );
        let (ok, output) = kubectl_stdin(&["create", "--validate=false", "-f", "-"], &manifest);
        assert!(
            !ok,
            "{field}: accepted (pruned?) with field validation off:\n{manifest}"
        );
        assert!(
            output.contains(field) && output.contains("Capstan does not support"),
            "{field}: the refusal must name the field and say it is unsupported: {output}"
        );
    }
    Ok(())
}

/// Issue 15.3 through the CLI (RELIABILITY M3, M4): `;` path parameters that servlet
/// containers strip before routing are refused, and a port or trailing dot on the Host
/// does not escape an exact host deny.
#[tokio::test]
async fn path_parameters_and_host_spellings_do_not_bypass_rules() -> anyhow::Result<()> {
    let client = client().await;
    install_chart();
    let ns = TestNamespace::new(&client, "e2e-m3").await;
    let n = ns.name.as_str();
    let (ok, output) = kubectl_stdin(
        &["create", "-f", "-"],
        &format!(
            "apiVersion: mesh.capstan.dev/v1alpha1\nkind: ServiceIntentions\nmetadata: {{name: api, namespace: {n}}}\n\
             spec:\n  destination: {{name: api}}\n  sources:\n  - name: frontend\n    permissions:\n\
             \x20   - {{action: deny, http: {{header: [{{name: Host, exact: admin.example}}]}}}}\n\
             \x20   - {{action: allow, http: {{pathPrefix: /public}}}}\n"
        ),
    );
    assert!(ok, "{output}");
    let ns_arg = ["-n", n, "frontend", "api", "--path"];
    for path in ["/public/..;/admin", "/public/..%3b/admin", "/public;x/../admin"] {
        let mut args = ns_arg.to_vec();
        args.push(path);
        let (code, out) = check(&args)?;
        assert_eq!(code, Some(1), "{path}: {out}");
        assert!(out.contains("DENY by invalid request path"), "{path}: {out}");
    }
    let mut args = ns_arg.to_vec();
    args.push("/public/a");
    assert_eq!(check(&args)?.0, Some(0), "the allow still holds");
    for host in [
        "admin.example",
        "admin.example.",
        "admin.example:80",
        "ADMIN.example.:8443",
    ] {
        let header = format!("Host={host}");
        let mut args = ns_arg.to_vec();
        args.extend(["/public/a", "--header", &header]);
        let (code, out) = check(&args)?;
        assert_eq!(code, Some(1), "Host {host}: {out}");
        assert!(out.contains("permissions[0]"), "Host {host}: {out}");
    }
    Ok(())
}
