//! The secrets engine as the tests drive it: an engine process, its trust roots, and
//! calls to its Vault-compatible API.

use crate::{EngineProcess, SYSTEM_NAMESPACE, eventually, https_json, install_chart, published_roots, run};
use anyhow::{Context as _, Result, ensure};
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
    let init = crate::engine_client(engine.https, roots)?
        .init(3, 2)
        .await
        .context("init")?;
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
    let client = crate::engine_client(engine.https, roots)?;
    for key in &keys[..2] {
        client.unseal(key).await.context("unseal")?;
    }
    let status = client.seal_status().await?;
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

/// One request as a Vault client sends it, byte for byte: `target` is the request
/// target as written on the wire (not normalized: `//`, `%2F`, `..` reach the engine as
/// they are), `headers` any extra headers (`X-Vault-Token`, `X-Vault-Request`,
/// `X-Vault-Wrap-TTL`). Returns (status, body as JSON or Null).
pub async fn send(
    engine: &EngineProcess,
    roots_pem: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Result<(u16, Value)> {
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = capstan_engine_client::tls_config(roots_pem)?;
    let addr = engine.https;
    let tcp = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await??;
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await??;
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    tls.write_all(head.as_bytes()).await?;
    tls.write_all(body.as_bytes()).await?;
    let mut response = Vec::new();
    // rustls reports a peer that closes without close_notify as an error; the response
    // has arrived by then.
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut response)).await?;
    let response = String::from_utf8_lossy(&response);
    let code = response
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no status line"))?
        .parse()?;
    let json = response
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    Ok((code, json))
}

/// A token made by `root` holding `policies` (and `default`), with extra creation
/// parameters (`num_uses`, `ttl`).
pub async fn token_with(
    engine: &EngineProcess,
    roots: &str,
    root: &str,
    policies: &[&str],
    extra: Value,
) -> Result<String> {
    let mut body = json!({ "policies": policies });
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    let (code, created) = call(engine, roots, "POST", "auth/token/create", Some(root), Some(body)).await?;
    ensure!(code == 200, "token create: {code} {created}");
    created["auth"]["client_token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no client_token in {created}"))
}
