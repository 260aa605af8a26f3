//! V22: the `root` policy is obtainable only through `sys/init` (and a root token's own
//! children): never through a Kubernetes auth role written over the API, an AuthRole
//! object applied with kubectl, or `auth/token/create` by a token that is not root, in
//! any spelling (`root`, `default`+`root`, `Root`, ` root`, `ROOT`, a comma list).
//! Each attempt goes through the real interface and asserts both the refusal and that
//! no token holding `root` came out of it.

use anyhow::{Result, ensure};
use capstan_tests::{
    secrets::{call, fresh_storage, init_and_unseal, roots},
    *,
};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use serde_json::{Value, json};
use std::time::Duration;

const NS: &str = "root-refused-e2e";
const SA: &str = "v22";
const AUDIENCE: &str = "capstan-engine";

/// Every spelling of a policy list that would carry `root`.
fn root_variants() -> Vec<Value> {
    vec![
        json!(["root"]),
        json!(["default", "root"]),
        json!(["Root"]),
        json!([" root"]),
        json!(["ROOT "]),
        json!("default,root"),
        json!("default, Root"),
    ]
}

/// Fails if `reply` carries a token, or if that token (whatever the status) holds root.
async fn no_root_token(engine: &EngineProcess, roots: &str, what: &str, reply: &Value) -> Result<()> {
    if let Some(token) = reply["auth"]["client_token"].as_str() {
        let (_, me) = call(engine, roots, "GET", "auth/token/lookup-self", Some(token), None).await?;
        let policies = me["data"]["policies"].to_string().to_lowercase();
        ensure!(!policies.contains("root"), "{what}: a root token came out: {me}");
        anyhow::bail!("{what}: a token came out of a refused request: {reply}");
    }
    ensure!(
        !reply["auth"]["policies"]
            .to_string()
            .to_lowercase()
            .contains("root"),
        "{what}: {reply}"
    );
    Ok(())
}

async fn login(engine: &EngineProcess, roots: &str, role: &str, jwt: &str) -> Result<(u16, Value)> {
    call(
        engine,
        roots,
        "POST",
        "auth/kubernetes/login",
        None,
        Some(json!({"role": role, "jwt": jwt})),
    )
    .await
}

#[tokio::test]
async fn v22_root_is_refused_in_roles_auth_roles_and_token_creation() -> Result<()> {
    let client = client().await;
    fresh_storage();
    let _ = Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(NS.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await;
    let _ = Api::<ServiceAccount>::namespaced(client.clone(), NS)
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: ObjectMeta {
                    name: Some(SA.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await;
    let engine = EngineProcess::start(&client, "root-refused", &[]).await?;
    let roots = roots(&client).await?;
    let (root, _) = init_and_unseal(&engine, &roots).await?;
    let jwt = serviceaccount_token(&client, NS, SA, AUDIENCE).await?;

    // 1. Kubernetes auth roles over the HTTPS API, through `policies` and
    //    `token_policies`, new and as an update of a role that was fine.
    let (code, body) = call(
        &engine,
        &roots,
        "POST",
        "auth/kubernetes/role/fine",
        Some(&root),
        Some(json!({"bound_service_account_names": [SA], "bound_service_account_namespaces": [NS], "policies": ["default"]})),
    )
    .await?;
    ensure!(code == 204 || code == 200, "a role without root: {code} {body}");
    let mut refused = 0;
    for (i, policies) in root_variants().into_iter().enumerate() {
        for field in ["policies", "token_policies"] {
            for role in [format!("bad-{i}-{}", field.len()), "fine".to_owned()] {
                let what = format!("role {role} {field}={policies}");
                let (code, body) = call(
                    &engine,
                    &roots,
                    "POST",
                    &format!("auth/kubernetes/role/{role}"),
                    Some(&root),
                    Some(json!({
                        "bound_service_account_names": [SA],
                        "bound_service_account_namespaces": [NS],
                        field: policies,
                    })),
                )
                .await?;
                ensure!(
                    code == 400 && body.to_string().contains("root"),
                    "{what}: {code} {body}"
                );
                let (code, stored) = call(
                    &engine,
                    &roots,
                    "GET",
                    &format!("auth/kubernetes/role/{role}"),
                    Some(&root),
                    None,
                )
                .await?;
                ensure!(
                    !stored["data"]["token_policies"]
                        .to_string()
                        .to_lowercase()
                        .contains("root"),
                    "{what}: stored anyway: {code} {stored}"
                );
                let (code, reply) = login(&engine, &roots, &role, &jwt).await?;
                no_root_token(&engine, &roots, &what, &reply).await.or_else(|e| {
                    // The untouched role `fine` still logs in, with default only.
                    if role == "fine" && code == 200 {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })?;
                if role == "fine" {
                    ensure!(code == 200, "{what}: the role that was fine: {code} {reply}");
                    ensure!(reply["auth"]["policies"] == json!(["default"]), "{what}: {reply}");
                } else {
                    ensure!(code != 200, "{what}: login {code} {reply}");
                }
                refused += 1;
            }
        }
    }

    // 2. auth/token/create (and create-orphan) by a token that is not root but may
    //    create tokens.
    let (code, body) = call(
        &engine,
        &roots,
        "PUT",
        "sys/policies/acl/tokens",
        Some(&root),
        Some(
            json!({"policy": "path \"auth/token/*\" { capabilities = [\"create\", \"update\", \"sudo\"] }"}),
        ),
    )
    .await?;
    ensure!(code == 204, "{code} {body}");
    let maker = capstan_tests::secrets::token_with(&engine, &roots, &root, &["tokens"], json!({})).await?;
    for policies in root_variants() {
        for (path, extra) in [
            ("auth/token/create", json!({})),
            ("auth/token/create", json!({"no_parent": true})),
            ("auth/token/create-orphan", json!({})),
        ] {
            let mut request = json!({ "policies": policies });
            request
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let what = format!("{path} {request}");
            let (code, reply) = call(&engine, &roots, "POST", path, Some(&maker), Some(request)).await?;
            ensure!(code == 400 || code == 403, "{what}: {code} {reply}");
            no_root_token(&engine, &roots, &what, &reply).await?;
            refused += 1;
        }
    }
    // The same token may still create what it holds: the refusals are about root.
    let (code, reply) = call(
        &engine,
        &roots,
        "POST",
        "auth/token/create",
        Some(&maker),
        Some(json!({"policies": ["tokens"]})),
    )
    .await?;
    ensure!(code == 200, "{code} {reply}");
    // Nor can `root` be written as a policy of one's own under any spelling.
    for name in ["root", "ROOT", "Root"] {
        let (code, reply) = call(
            &engine,
            &roots,
            "PUT",
            &format!("sys/policies/acl/{name}"),
            Some(&root),
            Some(json!({"policy": "path \"*\" { capabilities = [\"read\"] }"})),
        )
        .await?;
        ensure!(code == 400, "PUT sys/policies/acl/{name}: {code} {reply}");
    }

    // 3. AuthRole objects applied with kubectl against the real API server: refused at
    //    the door (schema) or by the engine (Ready=False); a login through them never
    //    yields root.
    for (i, policies) in root_variants().into_iter().enumerate() {
        let Value::Array(_) = policies else {
            continue; // the CRD's field is a list
        };
        let name = format!("v22-{i}");
        let manifest = json!({
            "apiVersion": "secrets.capstan.dev/v1alpha1",
            "kind": "AuthRole",
            "metadata": {"name": name},
            "spec": {"serviceAccountNames": [SA], "serviceAccountNamespaces": [NS], "policies": policies},
        });
        let file = std::env::temp_dir().join(format!("capstan-e2e-v22-{:08x}.json", rand::random::<u32>()));
        std::fs::write(&file, manifest.to_string())?;
        let applied = run("kubectl", &["apply", "-f", &file.display().to_string()]);
        let _ = std::fs::remove_file(&file);
        let what = format!("AuthRole {name} policies={policies}");
        if let Err(error) = applied {
            ensure!(
                error.to_string().contains("root"),
                "{what}: refused, but not for root: {error:#}"
            );
        } else {
            let status = eventually(Duration::from_secs(15), "the engine's status on the AuthRole", || {
                let name = name.clone();
                async move {
                    let out = run(
                        "kubectl",
                        &["get", "authrole", &name, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}/{.status.conditions[?(@.type==\"Ready\")].message}"],
                    )
                    .ok()?;
                    (!out.trim().is_empty()).then(|| out.trim().to_owned())
                }
            })
            .await?;
            ensure!(
                status.starts_with("False/") && status.contains("root"),
                "{what}: {status}"
            );
        }
        let (code, reply) = login(&engine, &roots, &name, &jwt).await?;
        ensure!(code != 200, "{what}: login {code} {reply}");
        no_root_token(&engine, &roots, &what, &reply).await?;
        let _ = run("kubectl", &["delete", "authrole", &name, "--ignore-not-found"]);
        refused += 1;
    }
    println!("V22: {refused} attempts to obtain root refused");
    Ok(())
}
