//! The vault CLI's first five minutes (issue 15 item 10), replayed: each request the
//! CLI (`vault` or OpenBao's `bao` v2.6.2) sends for `operator init`, `operator unseal`,
//! `status`, `kv put/get/list` and `write pki/...`, with its method, path, JSON body and
//! headers (`X-Vault-Request: true`, `X-Vault-Token`), against the real engine over
//! HTTPS, asserting Vault's answer. The binaries cannot be fetched here; the request
//! shapes are those of Vault's Go API client (api/sys_init.go, api/sys_seal.go,
//! api/sys_leader.go, command/kv_helpers.go kvPreflightVersionRequest, and the CLI's
//! `key=value` arguments, which it sends as JSON strings).

use anyhow::{Context as _, Result, ensure};
use capstan_tests::{
    secrets::{fresh_storage, roots, send, token_with},
    *,
};
use serde_json::{Value, json};

const CLI: (&str, &str) = ("X-Vault-Request", "true");

/// A request as the CLI sends it: `X-Vault-Request` always, `X-Vault-Token` when set.
async fn cli(
    engine: &EngineProcess,
    roots: &str,
    method: &str,
    target: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let mut headers = vec![CLI];
    if let Some(token) = token {
        headers.push(("X-Vault-Token", token));
    }
    send(engine, roots, method, target, &headers, body.as_ref()).await
}

fn is_leader_answer(body: &Value) -> bool {
    body["ha_enabled"] == false
        && body["is_self"].is_boolean()
        && body["leader_address"].is_string()
        && body["leader_cluster_address"].is_string()
        && body["performance_standby"] == false
        && body["performance_standby_last_remote_wal"].is_u64()
}

#[tokio::test]
async fn the_vault_cli_first_five_minutes() -> Result<()> {
    let client = client().await;
    fresh_storage();
    let engine = EngineProcess::start(&client, "vault-cli", &[]).await?;
    let roots = roots(&client).await?;

    // `status` before anything: seal status, then sys/leader (no token yet).
    let (code, status) = cli(&engine, &roots, "GET", "/v1/sys/seal-status", None, None).await?;
    ensure!(code == 200 && status["initialized"] == false, "{code} {status}");
    let (code, leader) = cli(&engine, &roots, "GET", "/v1/sys/leader", None, None).await?;
    ensure!(
        code == 200 && is_leader_answer(&leader),
        "sys/leader while sealed: {code} {leader}"
    );

    // `operator init`: the Go client sends every InitRequest field, empty ones included.
    // A PGP key that asks for encryption is still refused (not supported).
    let init_request = |root_token_pgp_key: &str| {
        json!({
            "secret_shares": 3,
            "secret_threshold": 2,
            "stored_shares": 0,
            "pgp_keys": null,
            "recovery_shares": 0,
            "recovery_threshold": 0,
            "recovery_pgp_keys": null,
            "root_token_pgp_key": root_token_pgp_key,
        })
    };
    let (code, refused) = cli(
        &engine,
        &roots,
        "PUT",
        "/v1/sys/init",
        None,
        Some(init_request("mQENBFakeKey")),
    )
    .await?;
    ensure!(
        code == 400 && refused.to_string().contains("root_token_pgp_key"),
        "{code} {refused}"
    );
    let (code, init) = cli(
        &engine,
        &roots,
        "PUT",
        "/v1/sys/init",
        None,
        Some(init_request("")),
    )
    .await?;
    ensure!(code == 200, "operator init: {code} {init}");
    let keys: Vec<String> = init["keys"]
        .as_array()
        .context("keys")?
        .iter()
        .map(|k| k.as_str().unwrap_or_default().to_owned())
        .collect();
    ensure!(keys.len() == 3 && init["keys_base64"].as_array().map(Vec::len) == Some(3));
    let root = init["root_token"].as_str().context("root_token")?.to_owned();

    // `operator unseal` twice (UnsealOpts: key, reset, migrate); after the last one the
    // CLI reads sys/leader.
    for (i, key) in keys[..2].iter().enumerate() {
        let (code, status) = cli(
            &engine,
            &roots,
            "PUT",
            "/v1/sys/unseal",
            None,
            Some(json!({ "key": key, "reset": false, "migrate": false })),
        )
        .await?;
        ensure!(
            code == 200 && status["sealed"] == (i == 0),
            "unseal {i}: {code} {status}"
        );
    }
    for token in [None, Some(root.as_str())] {
        let (code, leader) = cli(&engine, &roots, "GET", "/v1/sys/leader", token, None).await?;
        ensure!(
            code == 200 && is_leader_answer(&leader),
            "sys/leader: {code} {leader}"
        );
    }

    // `kv put secret/app a=b`, `kv get secret/app`, `kv list secret/`: each first reads
    // sys/internal/ui/mounts/<path> to learn the mount and its KV version.
    for target in [
        "/v1/sys/internal/ui/mounts/secret/app",
        "/v1/sys/internal/ui/mounts/secret/",
        "/v1/sys/internal/ui/mounts/secret",
    ] {
        let (code, mount) = cli(&engine, &roots, "GET", target, Some(&root), None).await?;
        let data = &mount["data"];
        ensure!(
            code == 200
                && data["path"] == "secret/"
                && data["type"] == "kv"
                && data["options"]["version"] == "2",
            "{target}: {code} {mount}"
        );
        ensure!(
            data["accessor"].as_str().is_some_and(|a| a.starts_with("kv_"))
                && data["uuid"].is_string()
                && data["local"] == false
                && data["seal_wrap"] == false
                && data["config"]["default_lease_ttl"].is_u64(),
            "Vault's mountInfo shape: {mount}"
        );
    }
    let (code, written) = cli(
        &engine,
        &roots,
        "PUT",
        "/v1/secret/data/app",
        Some(&root),
        Some(json!({ "data": { "a": "b" }, "options": {} })),
    )
    .await?;
    ensure!(
        code == 200 && written["data"]["version"] == 1,
        "kv put: {code} {written}"
    );
    let (code, read) = cli(&engine, &roots, "GET", "/v1/secret/data/app", Some(&root), None).await?;
    ensure!(
        code == 200 && read["data"]["data"]["a"] == "b",
        "kv get: {code} {read}"
    );
    let (code, listed) = cli(
        &engine,
        &roots,
        "GET",
        "/v1/secret/metadata/?list=true",
        Some(&root),
        None,
    )
    .await?;
    ensure!(
        code == 200 && listed["data"]["keys"] == json!(["app"]),
        "kv list: {code} {listed}"
    );

    // Who may see a mount: any capability under it (Vault's hasMountAccess). A token
    // without one, no token, and a path under no mount all get the same 403 (no probing).
    let (code, body) = cli(
        &engine,
        &roots,
        "PUT",
        "/v1/sys/policies/acl/app-reader",
        Some(&root),
        Some(json!({ "policy": "path \"secret/data/app/*\" { capabilities = [\"read\"] }" })),
    )
    .await?;
    ensure!(code == 204, "{code} {body}");
    let reader = token_with(&engine, &roots, &root, &["app-reader"], json!({})).await?;
    let outsider = token_with(&engine, &roots, &root, &["default"], json!({})).await?;
    let (code, mount) = cli(
        &engine,
        &roots,
        "GET",
        "/v1/sys/internal/ui/mounts/secret/app/x",
        Some(&reader),
        None,
    )
    .await?;
    ensure!(
        code == 200 && mount["data"]["options"]["version"] == "2",
        "{code} {mount}"
    );
    for (token, target) in [
        (Some(outsider.as_str()), "/v1/sys/internal/ui/mounts/secret/app"),
        (
            Some(reader.as_str()),
            "/v1/sys/internal/ui/mounts/database/creds/x",
        ),
        (Some(root.as_str()), "/v1/sys/internal/ui/mounts/nosuchmount/x"),
        (None, "/v1/sys/internal/ui/mounts/secret/app"),
        (Some("s.not-a-token"), "/v1/sys/internal/ui/mounts/secret/app"),
    ] {
        let (code, body) = cli(&engine, &roots, "GET", target, token, None).await?;
        ensure!(code == 403, "{target} with {token:?}: {code} {body}");
    }

    // `vault write pki/...`: every key=value arrives as a string, booleans included.
    let (code, body) = cli(
        &engine,
        &roots,
        "PUT",
        "/v1/pki/root/generate/internal",
        Some(&root),
        Some(json!({ "common_name": "example.internal", "ttl": "8760h" })),
    )
    .await?;
    ensure!(code == 200, "{code} {body}");
    let (code, body) = cli(
        &engine,
        &roots,
        "PUT",
        "/v1/pki/roles/internal",
        Some(&root),
        Some(json!({ "allowed_domains": "example.internal", "allow_subdomains": "true", "max_ttl": "72h" })),
    )
    .await?;
    ensure!(code == 204, "{code} {body}");
    let (code, role) = cli(
        &engine,
        &roots,
        "GET",
        "/v1/pki/roles/internal",
        Some(&root),
        None,
    )
    .await?;
    ensure!(
        code == 200
            && role["data"]["allow_subdomains"] == true
            && role["data"]["allow_bare_domains"] == false,
        "{code} {role}"
    );
    for (common_name, allowed) in [
        ("a.example.internal", true),
        ("a.b.example.internal", true),
        ("example.internal", false),
        ("aexample.internal", false),
        ("a.example.internal.evil.org", false),
    ] {
        let (code, issued) = cli(
            &engine,
            &roots,
            "PUT",
            "/v1/pki/issue/internal",
            Some(&root),
            Some(json!({ "common_name": common_name })),
        )
        .await?;
        let certificate = issued["data"]["certificate"].as_str().unwrap_or_default();
        ensure!(
            (code == 200 && certificate.starts_with("-----BEGIN CERTIFICATE")) == allowed
                && (allowed || code == 400),
            "{common_name}: {code} {issued}"
        );
    }
    let (code, body) = cli(
        &engine,
        &roots,
        "PUT",
        "/v1/pki/roles/sloppy",
        Some(&root),
        Some(json!({ "allowed_domains": "example.internal", "allow_subdomains": "maybe" })),
    )
    .await?;
    ensure!(code == 400, "a boolean that is not one is refused: {code} {body}");
    Ok(())
}
