//! The secrets engine as the tests drive it: an engine process, its trust roots, and
//! calls to its Vault-compatible API.

use crate::{EngineProcess, SYSTEM_NAMESPACE, eventually, https_json, install_chart, published_roots, run};
use anyhow::{Result, ensure};
use kube::Client;
use serde_json::{Value, json};
use std::time::Duration;

/// Deletes every storage entry: the next engine finds an uninitialized store. One
/// deletecollection call (kubectl's `delete --all` deletes one object per request, which
/// takes minutes after a test that wrote a thousand entries).
pub fn fresh_storage() {
    install_chart();
    run(
        "kubectl",
        &[
            "delete",
            "--raw",
            &format!("/apis/secrets.capstan.dev/v1alpha1/namespaces/{SYSTEM_NAMESPACE}/storageentries"),
        ],
    )
    .expect("deleting the engine's storage");
    for _ in 0..100 {
        let left = run(
            "kubectl",
            &[
                "-n",
                SYSTEM_NAMESPACE,
                "get",
                "storageentries.secrets.capstan.dev",
                "-o",
                "name",
            ],
        )
        .expect("listing the engine's storage");
        if left.trim().is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("storage entries still present after deleting them");
}

/// The mesh roots the engine's serving certificate chains to.
pub async fn roots(client: &Client) -> Result<String> {
    eventually(Duration::from_secs(20), "the published mesh roots", || async {
        published_roots(client).await
    })
    .await
}

/// One API call; returns (status, body).
pub async fn call(
    engine: &EngineProcess,
    roots: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let body = body.map(|b| b.to_string());
    https_json(
        engine.https,
        roots,
        method,
        &format!("/v1/{path}"),
        token,
        body.as_deref(),
    )
    .await
}

/// The engine's answer to `auth/token/lookup-self` for `token`: 200 while the token is
/// usable, 403 once it is not.
pub async fn lookup_self(engine: &EngineProcess, roots: &str, token: &str) -> Result<u16> {
    Ok(
        call(engine, roots, "GET", "auth/token/lookup-self", Some(token), None)
            .await?
            .0,
    )
}

/// Initializes (3 shares, threshold 2) and unseals; returns (root token, shares).
pub async fn init_and_unseal(engine: &EngineProcess, roots: &str) -> Result<(String, Vec<String>)> {
    let (code, init) = call(
        engine,
        roots,
        "PUT",
        "sys/init",
        None,
        Some(json!({"secret_shares": 3, "secret_threshold": 2})),
    )
    .await?;
    ensure!(code == 200, "init: {code} {init}");
    let keys: Vec<String> = init["keys"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .filter_map(|k| k.as_str().map(str::to_owned))
        .collect();
    unseal(engine, roots, &keys).await?;
    Ok((init["root_token"].as_str().unwrap_or_default().to_owned(), keys))
}

pub async fn unseal(engine: &EngineProcess, roots: &str, keys: &[String]) -> Result<()> {
    for key in &keys[..2] {
        let (code, status) = call(
            engine,
            roots,
            "PUT",
            "sys/unseal",
            None,
            Some(json!({ "key": key })),
        )
        .await?;
        ensure!(code == 200, "unseal: {code} {status}");
    }
    let (_, status) = call(engine, roots, "GET", "sys/seal-status", None, None).await?;
    ensure!(status["sealed"] == false, "still sealed: {status}");
    Ok(())
}

/// A Pod object `name` of ServiceAccount `serviceaccount` (no kubelet runs it: it is
/// what tokens are bound to, and its deletion is what the engine reacts to).
pub async fn create_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    serviceaccount: &str,
) -> Result<k8s_openapi::api::core::v1::Pod> {
    let pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"serviceAccountName": serviceaccount, "containers": [{"name": "app", "image": "app:1"}]},
    }))?;
    Ok(kube::Api::namespaced(client.clone(), namespace)
        .create(&kube::api::PostParams::default(), &pod)
        .await?)
}

/// A token of `namespace/serviceaccount` for `audience`, bound to pod `pod` (the API
/// server stops accepting it once that pod is gone; TokenReview names the pod).
pub async fn pod_bound_token(
    client: &Client,
    namespace: &str,
    serviceaccount: &str,
    pod: &k8s_openapi::api::core::v1::Pod,
    audience: &str,
) -> Result<String> {
    use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
    let request = TokenRequest {
        metadata: Default::default(),
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        status: None,
    };
    let api = kube::Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), namespace);
    Ok(api
        .create_token_request(serviceaccount, &kube::api::PostParams::default(), &request)
        .await?
        .status
        .ok_or_else(|| anyhow::anyhow!("TokenRequest returned no status"))?
        .token)
}
