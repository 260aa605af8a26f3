//! The secrets engine (capstan-engine's Vault-compatible API) against the real API
//! server: its storage is StorageEntry objects, its logins are checked with TokenReview,
//! and a real Vault client (hvac, from PyPI) drives it.

use anyhow::{Context as _, Result, ensure};
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use capstan_tests::{
    secrets::{fresh_storage, init_and_unseal, lookup_self, unseal},
    *,
};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::{
    Api, Client,
    api::{ListParams, ObjectMeta, PostParams},
};
use serde_json::{Value, json};
use std::{path::PathBuf, time::Duration};

const NS: &str = "secrets-e2e";
const AUDIENCE: &str = "capstan-engine";
/// What every G2 canary starts with.
const G2_MARKER: &str = "g2canary-";

async fn serviceaccounts(client: &Client, names: &[&str]) {
    let namespaces = Api::<Namespace>::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(NS.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let _ = namespaces.create(&PostParams::default(), &ns).await;
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), NS);
    for name in names {
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some((*name).into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let _ = sas.create(&PostParams::default(), &sa).await;
    }
}

fn python() -> PathBuf {
    repo_root().join(".cache/venv/bin/python")
}

async fn roots_file(client: &Client) -> Result<(String, tempfile_path::Path)> {
    let roots = eventually(Duration::from_secs(20), "the published mesh roots", || async {
        published_roots(client).await
    })
    .await?;
    let path = tempfile_path::Path::new("roots", ".pem");
    std::fs::write(&path.0, &roots)?;
    Ok((roots, path))
}

/// A temporary file removed on drop (no extra crate for one helper).
mod tempfile_path {
    pub struct Path(pub std::path::PathBuf);
    impl Path {
        pub fn new(stem: &str, suffix: &str) -> Self {
            Self(std::env::temp_dir().join(format!(
                "capstan-e2e-{stem}-{:08x}{suffix}",
                rand::random::<u32>()
            )))
        }
    }
    impl Drop for Path {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Every StorageEntry value, decoded: what etcd holds.
async fn raw_storage(client: &Client) -> Result<Vec<(String, Vec<u8>)>> {
    let entries = Api::<capstan_crds::StorageEntry>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .list(&ListParams::default())
        .await?;
    entries
        .items
        .into_iter()
        .map(|e| Ok((e.spec.path, B64.decode(e.spec.value)?)))
        .collect()
}

/// The storage paths of every token entry, accessor and parent index.
async fn token_paths(client: &Client) -> Result<std::collections::BTreeSet<String>> {
    Ok(raw_storage(client)
        .await?
        .into_iter()
        .map(|(path, _)| path)
        .filter(|path| path.contains("sys/token/"))
        .collect())
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn hvac_drives_init_unseal_kv_kubernetes_login_and_tokens() -> Result<()> {
    let client = client().await;
    fresh_storage();
    serviceaccounts(&client, &["app", "stranger"]).await;
    let audit = tempfile_path::Path::new("audit", ".log");
    let engine = EngineProcess::start(&client, "hvac", &["--audit", &audit.0.display().to_string()]).await?;
    let (_, roots) = roots_file(&client).await?;

    let sa_jwt = serviceaccount_token(&client, NS, "app", AUDIENCE).await?;
    let other_jwt = serviceaccount_token(&client, NS, "stranger", AUDIENCE).await?;
    let wrong_audience = serviceaccount_token(&client, NS, "app", MESH_TOKEN_AUDIENCE).await?;
    let out = tokio::process::Command::new(python())
        .arg(repo_root().join("tests/python/hvac_e2e.py"))
        .env("VAULT_ADDR", format!("https://127.0.0.1:{}", engine.https.port()))
        .env("VAULT_CACERT", &roots.0)
        .env("SA_NAMESPACE", NS)
        .env("SA_NAME", "app")
        .env("SA_JWT", &sa_jwt)
        .env("OTHER_JWT", &other_jwt)
        .env("WRONG_AUDIENCE_JWT", &wrong_audience)
        .output()
        .await
        .context("running hvac (hack/test.sh installs it into .cache/venv)")?;
    ensure!(
        out.status.success(),
        "hvac script failed:\n{}\n{}\nengine log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        engine.logs()
    );
    let result: Value = serde_json::from_slice(out.stdout.trim_ascii())?;

    // No secret value, token, share or service account token in the engine's log, its
    // metrics, the audit log, or (as plaintext) in storage.
    let mut secrets: Vec<String> = result["canaries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    secrets.push(result["root_token"].as_str().unwrap().to_owned());
    secrets.extend(
        result["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned()),
    );
    secrets.push(sa_jwt.clone());
    let log = engine.logs();
    let metrics = engine.metrics().await?;
    let audit_log = std::fs::read_to_string(&audit.0)?;
    let storage = raw_storage(&client).await?;
    for secret in &secrets {
        ensure!(
            !log.contains(secret.as_str()),
            "a secret value is in the engine's log"
        );
        ensure!(
            !metrics.contains(secret.as_str()),
            "a secret value is in the metrics"
        );
        ensure!(
            !audit_log.contains(secret.as_str()),
            "a secret value is in the audit log"
        );
        for (path, value) in &storage {
            ensure!(
                !contains(value, secret),
                "a secret value is stored in plaintext at {path}"
            );
        }
    }
    // The audit log has both records of every request, with values HMAC'd.
    let records: Vec<Value> = audit_log
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(records.len() > 40, "only {} audit records", records.len());
    let kv_write = records
        .iter()
        .find(|r| {
            r["type"] == "request"
                && r["request"]["path"] == "secret/data/app/db"
                && r["request"]["operation"] == "create"
        })
        .context("no audit record of the first KV write")?;
    ensure!(
        kv_write["request"]["data"]["data"]["password"]
            .as_str()
            .is_some_and(|h| h.starts_with("hmac-sha256:")),
        "the written value is not HMAC'd: {kv_write}"
    );
    ensure!(metric(&metrics, "capstan_engine_barrier_integrity_errors_total") == Some(0.0));
    Ok(())
}

#[tokio::test]
async fn replicas_lose_no_update_and_a_restart_loses_no_entry() -> Result<()> {
    let client = client().await;
    fresh_storage();
    let one = EngineProcess::start(&client, "replica-1", &[]).await?;
    let two = EngineProcess::start(&client, "replica-2", &[]).await?;
    let (roots, _roots_file) = roots_file(&client).await?;
    let (root, keys) = init_and_unseal(&one, &roots).await?;
    unseal(&two, &roots, &keys).await?;

    // 2 replicas x 15 writers each write the same key at once: 30 versions, none lost.
    let mut writers = Vec::new();
    for (i, addr) in [one.https, two.https].into_iter().cycle().take(30).enumerate() {
        let (roots, root) = (roots.clone(), root.clone());
        writers.push(tokio::spawn(async move {
            https_json(
                addr,
                &roots,
                "POST",
                "/v1/secret/data/shared",
                Some(&root),
                Some(&json!({ "data": { "writer": i } }).to_string()),
            )
            .await
        }));
    }
    let mut versions = Vec::new();
    for writer in writers {
        let (code, body) = writer.await??;
        ensure!(code == 200, "a concurrent write failed: {code} {body}");
        versions.push(body["data"]["version"].as_u64().context("no version")?);
    }
    versions.sort();
    ensure!(
        versions == (1..=30).collect::<Vec<_>>(),
        "versions handed out: {versions:?}"
    );
    let (_, meta) = https_json(
        two.https,
        &roots,
        "GET",
        "/v1/secret/metadata/shared",
        Some(&root),
        None,
    )
    .await?;
    ensure!(meta["data"]["current_version"] == 30, "{meta}");

    // A restart: sealed again, and after unsealing every entry is there.
    drop(one);
    let again = EngineProcess::start(&client, "replica-1-again", &[]).await?;
    let (code, _) = https_json(
        again.https,
        &roots,
        "GET",
        "/v1/secret/data/shared",
        Some(&root),
        None,
    )
    .await?;
    ensure!(code == 503, "a restarted engine must be sealed, got {code}");
    unseal(&again, &roots, &keys).await?;
    let (code, body) = https_json(
        again.https,
        &roots,
        "GET",
        "/v1/secret/data/shared",
        Some(&root),
        None,
    )
    .await?;
    ensure!(
        code == 200 && body["data"]["metadata"]["version"] == 30,
        "{code} {body}"
    );
    Ok(())
}

#[tokio::test]
async fn tampered_or_moved_ciphertext_is_refused() -> Result<()> {
    let client = client().await;
    fresh_storage();
    let engine = EngineProcess::start(&client, "tamper", &[]).await?;
    let (roots, _roots_file) = roots_file(&client).await?;
    let (root, _) = init_and_unseal(&engine, &roots).await?;
    for (key, value) in [("a", "alpha-canary"), ("b", "beta-canary")] {
        let (code, body) = https_json(
            engine.https,
            &roots,
            "POST",
            &format!("/v1/secret/data/{key}"),
            Some(&root),
            Some(&json!({ "data": { "v": value } }).to_string()),
        )
        .await?;
        ensure!(code == 200, "{code} {body}");
    }
    let entries = Api::<capstan_crds::StorageEntry>::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let all = entries.list(&ListParams::default()).await?.items;
    let find = |path: &str| {
        all.iter()
            .find(|e| e.spec.path == path)
            .cloned()
            .context(path.to_owned())
    };
    let a = find("logical/secret/a")?;
    let mut b = find("logical/secret/b")?;

    // V2: b's object now holds a's ciphertext (same key term, other path).
    b.spec.value = a.spec.value.clone();
    b.metadata.managed_fields = None;
    entries
        .replace(b.metadata.name.as_deref().unwrap(), &PostParams::default(), &b)
        .await?;
    // V1: one bit of a's ciphertext flipped.
    let mut a = a;
    let mut bytes = B64.decode(&a.spec.value)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    a.spec.value = B64.encode(bytes);
    a.metadata.managed_fields = None;
    entries
        .replace(a.metadata.name.as_deref().unwrap(), &PostParams::default(), &a)
        .await?;

    for key in ["a", "b"] {
        let (code, body) = eventually(
            Duration::from_secs(10),
            "the tampered entry to be refused",
            || async {
                let (code, body) = https_json(
                    engine.https,
                    &roots,
                    "GET",
                    &format!("/v1/secret/data/{key}"),
                    Some(&root),
                    None,
                )
                .await
                .ok()?;
                (code != 200).then_some((code, body))
            },
        )
        .await?;
        ensure!(code == 500, "{key}: {code} {body}");
        let text = body.to_string();
        ensure!(text.contains("integrity"), "{key}: {text}");
        ensure!(!text.contains("canary"), "no plaintext in the error");
    }
    let metrics = engine.metrics().await?;
    ensure!(
        metric(&metrics, "capstan_engine_barrier_integrity_errors_total").unwrap_or(0.0) >= 2.0,
        "{metrics}"
    );
    ensure!(engine.logs().contains("failed its integrity check"));
    Ok(())
}

#[tokio::test]
async fn a_request_no_audit_sink_records_fails() -> Result<()> {
    let client = client().await;
    fresh_storage();
    let good = tempfile_path::Path::new("audit-good", ".log");
    // V17: one sink fails (a full device), the other works: requests succeed.
    let engine = EngineProcess::start(
        &client,
        "audit-one-failing",
        &["--audit", "/dev/full", "--audit", &good.0.display().to_string()],
    )
    .await?;
    let (roots, _roots_file) = roots_file(&client).await?;
    let (root, keys) = init_and_unseal(&engine, &roots).await?;
    let write = |addr| {
        let (roots, root) = (roots.clone(), root.clone());
        async move {
            https_json(
                addr,
                &roots,
                "POST",
                "/v1/secret/data/audited",
                Some(&root),
                Some(r#"{"data":{"v":"audit-canary"}}"#),
            )
            .await
        }
    };
    let (code, body) = write(engine.https).await?;
    ensure!(code == 200, "{code} {body}");
    ensure!(std::fs::read_to_string(&good.0)?.contains("secret/data/audited"));
    drop(engine);

    // Both failing: the request fails and is not processed.
    let engine = EngineProcess::start(&client, "audit-all-failing", &["--audit", "/dev/full"]).await?;
    unseal(&engine, &roots, &keys).await?;
    let (code, body) = write(engine.https).await?;
    ensure!(
        code == 500 && body.to_string().contains("no audit sink succeeded"),
        "{code} {body}"
    );
    let metrics = engine.metrics().await?;
    ensure!(
        metrics.contains("capstan_engine_audit_failures_total"),
        "{metrics}"
    );
    drop(engine);
    let engine = EngineProcess::start(&client, "audit-check", &[]).await?;
    unseal(&engine, &roots, &keys).await?;
    let (_, meta) = https_json(
        engine.https,
        &roots,
        "GET",
        "/v1/secret/metadata/audited",
        Some(&root),
        None,
    )
    .await?;
    ensure!(
        meta["data"]["current_version"] == 1,
        "the unaudited write must not have happened: {meta}"
    );
    Ok(())
}

/// V16: the only audit sink hangs, a FIFO (first nobody reads it, later its reader stops
/// reading): a request that would return a secret blocks for at most the audit write
/// timeout (2 s, `audit::WRITE_TIMEOUT`; asserted under 6 s) and then fails with 500 "no
/// audit sink succeeded" without the secret; writes and token lookups are not served
/// either; the failures are counted (`capstan_engine_audit_failures_total{reason=
/// "timeout"}`, Vault's `audit.log_request_failure`) and logged; once the reader drains
/// the FIFO, requests are served (and audited) again.
#[tokio::test]
async fn a_hanging_audit_sink_fails_requests_and_the_engine_recovers() -> Result<()> {
    use capstan_tests::secrets::{call, roots};
    use std::{
        io::Read as _,
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        time::Instant,
    };
    const CANARY: &str = "v16-canary-7f3a9c";
    let client = client().await;
    fresh_storage();
    let fifo = std::env::temp_dir().join(format!("capstan-v16-{:08x}.fifo", rand::random::<u32>()));
    run("mkfifo", &["-m", "0600", &fifo.display().to_string()])?;
    let engine =
        EngineProcess::start(&client, "audit-hang", &["--audit", &fifo.display().to_string()]).await?;
    let roots = roots(&client).await?;
    let (root, _) = init_and_unseal(&engine, &roots).await?;

    // Fails the way a hanging sink must: after blocking, within the bound, 500, no secret.
    let refused = |method: &'static str, path: &'static str, body: Option<Value>| {
        let (engine, roots, root) = (&engine, roots.clone(), root.clone());
        async move {
            let started = Instant::now();
            let (code, reply) = call(engine, &roots, method, path, Some(&root), body).await?;
            let took = started.elapsed();
            ensure!(
                code == 500 && reply.to_string().contains("no audit sink succeeded"),
                "{method} {path} with a hanging sink: {code} {reply}"
            );
            ensure!(
                !reply.to_string().contains(CANARY),
                "{method} {path}: the secret came back: {reply}"
            );
            ensure!(
                took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
                "{method} {path}: failed after {took:?}, not after the 2 s audit timeout"
            );
            anyhow::Ok(())
        }
    };

    // 1. A FIFO nobody reads: the engine started and answers unaudited health checks,
    //    and audited requests fail.
    let (code, _) = call(&engine, &roots, "GET", "sys/health", None, None).await?;
    ensure!(code == 200, "sys/health: {code}");
    refused("GET", "auth/token/lookup-self", None).await?;

    // A reader arrives (and can be paused): requests are served and audited.
    let paused = Arc::new(AtomicBool::new(false));
    let log = Arc::new(parking_lot::Mutex::new(Vec::<u8>::new()));
    let reader = {
        let (fifo, paused, log) = (fifo.clone(), paused.clone(), log.clone());
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut file = std::fs::File::open(&fifo)?;
            let mut buf = [0u8; 4096];
            loop {
                if paused.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                match file.read(&mut buf)? {
                    0 => return Ok(()),
                    n => log.lock().extend_from_slice(&buf[..n]),
                }
            }
        })
    };
    let write = json!({"data": {"v": CANARY}});
    eventually(
        Duration::from_secs(10),
        "requests to be served once the FIFO has a reader",
        || {
            let (engine, roots, root, write) = (&engine, roots.clone(), root.clone(), write.clone());
            async move {
                let (code, _) = call(
                    engine,
                    &roots,
                    "POST",
                    "secret/data/v16",
                    Some(&root),
                    Some(write),
                )
                .await
                .ok()?;
                (code == 200).then_some(())
            }
        },
    )
    .await?;
    let (code, body) = call(&engine, &roots, "GET", "secret/data/v16", Some(&root), None).await?;
    ensure!(
        code == 200 && body["data"]["data"]["v"] == CANARY,
        "{code} {body}"
    );

    // 2. The reader stops reading: a record larger than the pipe's buffer (field names
    //    are kept in the log, values HMAC'd) fills it, and the sink hangs mid-write.
    paused.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let filler: serde_json::Map<String, Value> = (0..3000)
        .map(|i| (format!("filler-field-{i:05}-{}", "x".repeat(40)), json!("v")))
        .collect();
    let _ = call(
        &engine,
        &roots,
        "POST",
        "secret/data/filler",
        Some(&root),
        Some(json!({"data": filler})),
    )
    .await?;
    refused("GET", "secret/data/v16", None).await?;
    refused(
        "POST",
        "secret/data/v16",
        Some(json!({"data": {"v": "overwritten"}})),
    )
    .await?;
    refused("GET", "auth/token/lookup-self", None).await?;
    refused("GET", "sys/policies/acl", None).await?;
    let metrics = engine.metrics().await?;
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("capstan_engine_audit_failures_total") && l.contains("reason=\"timeout\"")),
        "no timeout counted: {metrics}"
    );
    ensure!(
        engine
            .logs()
            .contains("An audit sink did not accept a record in time"),
        "no log line for the hanging sink"
    );

    // 3. The reader drains the FIFO: served again, and nothing unaudited happened.
    paused.store(false, Ordering::Relaxed);
    let (body, took) = {
        let started = Instant::now();
        let body = eventually(Duration::from_secs(15), "the engine to recover", || {
            let (engine, roots, root) = (&engine, roots.clone(), root.clone());
            async move {
                let (code, body) = call(engine, &roots, "GET", "secret/data/v16", Some(&root), None)
                    .await
                    .ok()?;
                (code == 200).then_some(body)
            }
        })
        .await?;
        (body, started.elapsed())
    };
    ensure!(body["data"]["data"]["v"] == CANARY, "{body}");
    ensure!(
        body["data"]["metadata"]["version"] == 1,
        "the write refused while the sink hung must not have happened: {body}"
    );
    let log = String::from_utf8_lossy(&log.lock()).into_owned();
    ensure!(!log.contains(CANARY), "the secret in plaintext in the audit log");
    ensure!(log.contains("secret/data/v16"), "the audit log has the requests");
    println!("V16: refused within the 2 s bound while the FIFO hung; recovered {took:?} after it drained");
    drop(engine);
    let _ = reader.join();
    let _ = std::fs::remove_file(&fifo);
    Ok(())
}

#[tokio::test]
async fn pki_issues_p256_certificates_within_its_roles() -> Result<()> {
    use capstan_tests::secrets::{call, roots};
    let client = client().await;
    fresh_storage();
    let engine = EngineProcess::start(&client, "pki", &[]).await?;
    let roots = roots(&client).await?;
    let (root, _) = init_and_unseal(&engine, &roots).await?;
    let (code, body) = call(
        &engine,
        &roots,
        "POST",
        "pki/issue/web",
        Some(&root),
        Some(json!({"common_name": "a.example.com"})),
    )
    .await?;
    ensure!(code == 400, "no role yet: {code} {body}");
    let (code, ca) = call(
        &engine,
        &roots,
        "POST",
        "pki/root/generate/internal",
        Some(&root),
        Some(json!({"common_name": "Example Root", "ttl": "8760h"})),
    )
    .await?;
    ensure!(code == 200, "{code} {ca}");
    let ca_pem = ca["data"]["certificate"]
        .as_str()
        .context("no CA certificate")?
        .to_owned();
    let (code, _) = call(
        &engine,
        &roots,
        "POST",
        "pki/roles/web",
        Some(&root),
        Some(json!({"allowed_domains": ["example.com"], "allow_subdomains": true, "max_ttl": "1h"})),
    )
    .await?;
    ensure!(code == 204);
    let (code, issued) = call(
        &engine,
        &roots,
        "POST",
        "pki/issue/web",
        Some(&root),
        Some(json!({"common_name": "api.example.com", "alt_names": "www.example.com", "ttl": "24h"})),
    )
    .await?;
    ensure!(code == 200, "{code} {issued}");
    let data = &issued["data"];
    ensure!(data["private_key_type"] == "ec" && data["issuing_ca"] == ca_pem.as_str());
    let (_, pem) = x509_parser::pem::parse_x509_pem(data["certificate"].as_str().unwrap().as_bytes())?;
    let cert = pem.parse_x509()?;
    let (_, ca_der) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes())?;
    cert.verify_signature(Some(ca_der.parse_x509()?.public_key()))?;
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    ensure!(
        lifetime <= 3600 + 60,
        "TTL clamped to the role's max: {lifetime}s"
    );
    // Outside the role, and without a token: refused. The CA certificate is public.
    let (code, _) = call(
        &engine,
        &roots,
        "POST",
        "pki/issue/web",
        Some(&root),
        Some(json!({"common_name": "evil.org"})),
    )
    .await?;
    ensure!(code == 400);
    let (code, _) = call(
        &engine,
        &roots,
        "POST",
        "pki/issue/web",
        None,
        Some(json!({"common_name": "a.example.com"})),
    )
    .await?;
    ensure!(code == 403);
    let (code, public) = call(&engine, &roots, "GET", "pki/cert/ca", None, None).await?;
    ensure!(code == 200 && public["data"]["certificate"] == ca_pem.as_str());
    Ok(())
}

/// V24, V25 and pod-bound logins: a token of a deleted pod, a ServiceAccount deleted and
/// re-created under the same name, and a login whose pod goes away.
#[tokio::test]
async fn logins_are_bound_to_the_serviceaccount_uid_and_to_their_pod() -> Result<()> {
    use capstan_tests::secrets::{call, pod_bound_token, roots};
    use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
    use kube::api::DeleteParams;
    let client = client().await;
    fresh_storage();
    serviceaccounts(&client, &["bound"]).await;
    let engine = EngineProcess::start(&client, "bound", &[]).await?;
    let roots = roots(&client).await?;
    let (root, _) = init_and_unseal(&engine, &roots).await?;
    let call_root = |method: &'static str, path: &'static str, body: Value| {
        let (engine, roots, root) = (&engine, roots.clone(), root.clone());
        async move { call(engine, &roots, method, path, Some(&root), Some(body)).await }
    };
    call_root(
        "PUT",
        "sys/policies/acl/bound",
        json!({"policy": "path \"secret/data/bound\" { capabilities = [\"read\"] }"}),
    )
    .await?;
    call_root(
        "POST",
        "auth/kubernetes/role/bound",
        json!({"bound_service_account_names": "bound", "bound_service_account_namespaces": NS, "policies": "bound", "ttl": "1h"}),
    )
    .await?;
    call_root("POST", "secret/data/bound", json!({"data": {"v": "1"}})).await?;
    let login = |jwt: String| {
        let (engine, roots) = (&engine, roots.clone());
        async move {
            call(
                engine,
                &roots,
                "POST",
                "auth/kubernetes/login",
                None,
                Some(json!({"role": "bound", "jwt": jwt})),
            )
            .await
        }
    };

    // A login from a pod-bound token is revoked once the pod is deleted.
    let pods = Api::<Pod>::namespaced(client.clone(), NS);
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some("bound-app".into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some("bound".into()),
            containers: vec![Container {
                name: "app".into(),
                image: Some("app".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = pods.create(&PostParams::default(), &pod).await?;
    let bound = pod_bound_token(&client, NS, "bound", &pod, AUDIENCE).await?;
    let (code, auth) = login(bound.clone()).await?;
    ensure!(code == 200, "{code} {auth}");
    ensure!(auth["auth"]["metadata"]["pod_name"] == "bound-app", "{auth}");
    let token = auth["auth"]["client_token"].as_str().unwrap().to_owned();
    let (code, _) = call(&engine, &roots, "GET", "secret/data/bound", Some(&token), None).await?;
    ensure!(code == 200);
    pods.delete("bound-app", &DeleteParams::default().grace_period(0))
        .await?;
    eventually(
        Duration::from_secs(20),
        "the deleted pod's login to be revoked",
        || async { (lookup_self(&engine, &roots, &token).await.ok()? == 403).then_some(()) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", engine.logs()))?;
    ensure!(engine.logs().contains("Revoked the login of a pod that is gone"));
    // V24: the deleted pod's token no longer logs in.
    eventually(
        Duration::from_secs(20),
        "the deleted pod's token to be refused",
        || async {
            let (code, _) = login(bound.clone()).await.ok()?;
            (code == 403).then_some(())
        },
    )
    .await?;

    // V25: the ServiceAccount deleted and re-created under the same name.
    let old_jwt = serviceaccount_token(&client, NS, "bound", AUDIENCE).await?;
    let (code, old) = login(old_jwt.clone()).await?;
    ensure!(code == 200, "{old}");
    Api::<ServiceAccount>::namespaced(client.clone(), NS)
        .delete("bound", &DeleteParams::default())
        .await?;
    serviceaccounts(&client, &["bound"]).await;
    // The API server's TokenReview refuses it once its ServiceAccount cache has seen the
    // deletion (the token names the old UID).
    eventually(
        Duration::from_secs(20),
        "the deleted ServiceAccount's token to be refused",
        || async {
            let (code, _) = login(old_jwt.clone()).await.ok()?;
            (code == 403).then_some(())
        },
    )
    .await?;
    let (code, new) = login(serviceaccount_token(&client, NS, "bound", AUDIENCE).await?).await?;
    ensure!(code == 200, "{new}");
    ensure!(
        new["auth"]["metadata"]["service_account_uid"] != old["auth"]["metadata"]["service_account_uid"],
        "the new ServiceAccount is another identity"
    );
    Ok(())
}

/// Policies and roles as objects (GitOps): applied with kubectl, followed by the engine,
/// reported in their status, and not overwritable through the API.
#[tokio::test]
async fn secret_policies_and_auth_roles_are_declared_as_objects() -> Result<()> {
    use capstan_tests::secrets::{call, roots};
    let client = client().await;
    fresh_storage();
    serviceaccounts(&client, &["gitops"]).await;
    let engine = EngineProcess::start(&client, "declared", &[]).await?;
    let roots = roots(&client).await?;
    let (root, _) = init_and_unseal(&engine, &roots).await?;
    let manifest = format!(
        r#"{{"apiVersion":"v1","kind":"List","items":[
        {{"apiVersion":"secrets.capstan.dev/v1alpha1","kind":"SecretPolicy","metadata":{{"name":"gitops-read"}},
          "spec":{{"rules":[{{"path":"secret/data/gitops/*","capabilities":["read"]}}]}}}},
        {{"apiVersion":"secrets.capstan.dev/v1alpha1","kind":"SecretPolicy","metadata":{{"name":"gitops-broken"}},
          "spec":{{"rules":[{{"path":"secret/*/x*y","capabilities":["read"]}}]}}}},
        {{"apiVersion":"secrets.capstan.dev/v1alpha1","kind":"AuthRole","metadata":{{"name":"gitops"}},
          "spec":{{"serviceAccountNames":["gitops"],"serviceAccountNamespaces":["{NS}"],"policies":["gitops-read"],"tokenTTL":"10m"}}}}]}}"#
    );
    let file = std::env::temp_dir().join(format!("capstan-e2e-declared-{:08x}.json", rand::random::<u32>()));
    std::fs::write(&file, manifest)?;
    run("kubectl", &["apply", "-f", &file.display().to_string()])?;
    let _ = std::fs::remove_file(&file);
    let ready = |kind: &'static str, name: &'static str| async move {
        eventually(Duration::from_secs(15), "the engine's status on a declared object", || async move {
            let out = run(
                "kubectl",
                &["get", kind, name, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}/{.status.conditions[?(@.type==\"Ready\")].message}"],
            )
            .ok()?;
            (!out.trim().is_empty()).then(|| out.trim().to_owned())
        })
        .await
    };
    ensure!(
        ready("secretpolicy", "gitops-read")
            .await?
            .starts_with("True/1 rules")
    );
    ensure!(ready("authrole", "gitops").await?.starts_with("True"));
    let broken = ready("secretpolicy", "gitops-broken").await?;
    ensure!(broken.starts_with("False/"), "{broken}");

    call(
        &engine,
        &roots,
        "POST",
        "secret/data/gitops/app",
        Some(&root),
        Some(json!({"data": {"v": "declared"}})),
    )
    .await?;
    let jwt = serviceaccount_token(&client, NS, "gitops", AUDIENCE).await?;
    let (code, login) = call(
        &engine,
        &roots,
        "POST",
        "auth/kubernetes/login",
        None,
        Some(json!({"role": "gitops", "jwt": jwt})),
    )
    .await?;
    ensure!(code == 200, "{code} {login}");
    let token = login["auth"]["client_token"].as_str().unwrap().to_owned();
    let (code, body) = call(
        &engine,
        &roots,
        "GET",
        "secret/data/gitops/app",
        Some(&token),
        None,
    )
    .await?;
    ensure!(
        code == 200 && body["data"]["data"]["v"] == "declared",
        "{code} {body}"
    );
    let (code, _) = call(&engine, &roots, "GET", "secret/data/other", Some(&token), None).await?;
    ensure!(code == 403);
    // The API cannot overwrite what the objects declare.
    let (code, body) = call(
        &engine,
        &roots,
        "PUT",
        "sys/policies/acl/gitops-read",
        Some(&root),
        Some(json!({"policy": "path \"*\" { capabilities = [\"sudo\"] }"})),
    )
    .await?;
    ensure!(
        code == 400 && body.to_string().contains("SecretPolicy"),
        "{code} {body}"
    );
    // Deleting the object takes the grant away.
    run(
        "kubectl",
        &["delete", "secretpolicy", "gitops-read", "gitops-broken"],
    )?;
    eventually(
        Duration::from_secs(15),
        "the deleted policy to stop granting",
        || async {
            let (code, _) = call(
                &engine,
                &roots,
                "GET",
                "secret/data/gitops/app",
                Some(&token),
                None,
            )
            .await
            .ok()?;
            (code == 403).then_some(())
        },
    )
    .await?;
    run("kubectl", &["delete", "authrole", "gitops"])?;
    Ok(())
}

/// V4 (keyring rotation under writes, then a crash), V6 (seal with requests in flight)
/// and G2 (1,000 random canaries written through the API: none in storage, nor in etcd's
/// own database file when the test runs its own cluster).
#[tokio::test]
async fn rotation_under_writes_a_crash_and_a_seal_lose_nothing_and_leak_nothing() -> Result<()> {
    use capstan_tests::secrets::{call, roots};
    let client = client().await;
    fresh_storage();
    let mut engine = EngineProcess::start(&client, "rotate", &[]).await?;
    let roots = roots(&client).await?;
    let (root, keys) = init_and_unseal(&engine, &roots).await?;

    // 1,000 canaries from 16 writers while the keyring is rotated every 50 ms.
    let canaries: Vec<String> = (0..1000)
        .map(|_| {
            let hex: String = rand::random::<[u8; 32]>()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("{G2_MARKER}{hex}")
        })
        .collect();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rotator = {
        let (https, roots, root, done) = (engine.https, roots.clone(), root.clone(), done.clone());
        tokio::spawn(async move {
            let mut rotations = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((204, _)) =
                    https_json(https, &roots, "PUT", "/v1/sys/rotate", Some(&root), None).await
                {
                    rotations += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            rotations
        })
    };
    let mut writers = Vec::new();
    for w in 0..16 {
        let (https, roots, root) = (engine.https, roots.clone(), root.clone());
        let mine: Vec<(usize, String)> = canaries.iter().cloned().enumerate().skip(w).step_by(16).collect();
        writers.push(tokio::spawn(async move {
            for (i, canary) in mine {
                let body = json!({ "data": { "canary": canary } }).to_string();
                let (code, reply) = https_json(
                    https,
                    &roots,
                    "POST",
                    &format!("/v1/secret/data/canary/{i}"),
                    Some(&root),
                    Some(&body),
                )
                .await?;
                ensure!(code == 200, "write {i}: {code} {reply}");
            }
            anyhow::Ok(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let rotations = rotator.await?;
    ensure!(
        rotations >= 3,
        "only {rotations} rotations happened during the writes"
    );
    let (_, status) = call(&engine, &roots, "GET", "sys/key-status", Some(&root), None).await?;
    let term = status["data"]["term"].as_u64().context("term")?;
    // Term 1 is init's, term 2 the unseal's own (V5), then one per rotation.
    ensure!(
        term as usize == rotations + 2,
        "term {term} after {rotations} rotations"
    );

    // A crash (SIGKILL), a restart: every acknowledged write reads back, new writes use
    // the newest term.
    engine.kill();
    let engine = EngineProcess::start(&client, "rotate-2", &[]).await?;
    unseal(&engine, &roots, &keys).await?;
    for (i, canary) in canaries.iter().enumerate().step_by(37) {
        let (code, body) = call(
            &engine,
            &roots,
            "GET",
            &format!("secret/data/canary/{i}"),
            Some(&root),
            None,
        )
        .await?;
        ensure!(
            code == 200 && body["data"]["data"]["canary"] == canary.as_str(),
            "entry {i}: {code} {body}"
        );
    }
    let (_, status) = call(&engine, &roots, "GET", "sys/key-status", Some(&root), None).await?;
    // The restarted engine writes under a term of its own, newer than every term the
    // crashed one used (V5: a count kept in memory never restarts under an old term).
    ensure!(
        status["data"]["term"] == term + 1,
        "the restarted engine uses a new, newest term: {status}"
    );

    // G2: no canary in the StorageEntry objects, nor in etcd's database file. Every
    // canary starts with one marker, so one pass for the marker covers all 1,000.
    let storage = raw_storage(&client).await?;
    ensure!(storage.len() > 1000);
    for (path, value) in &storage {
        ensure!(!contains(value, G2_MARKER), "a canary in plaintext at {path}");
    }
    if let Ok(cluster) = std::env::var("CAPSTAN_CLUSTER_NAME") {
        let db = repo_root().join(format!(".cache/kwok/clusters/{cluster}/etcd/member/snap/db"));
        let bytes = std::fs::read(&db).with_context(|| format!("reading {}", db.display()))?;
        ensure!(!contains(&bytes, G2_MARKER), "a canary in etcd's database file");
        println!(
            "G2: {} canaries, 0 found in {} storage entries or etcd's {} MiB database",
            canaries.len(),
            storage.len(),
            bytes.len() >> 20
        );
    }

    // V6: seal while reads are in flight: each answers 200 or 503, never anything else,
    // and after the seal everything is 503.
    let mut readers = Vec::new();
    for r in 0..8 {
        let (https, roots, root) = (engine.https, roots.clone(), root.clone());
        readers.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            for i in 0..30 {
                let (code, _) = https_json(
                    https,
                    &roots,
                    "GET",
                    &format!("/v1/secret/data/canary/{}", r * 30 + i),
                    Some(&root),
                    None,
                )
                .await?;
                codes.push(code);
            }
            anyhow::Ok(codes)
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (code, _) = call(&engine, &roots, "PUT", "sys/seal", Some(&root), None).await?;
    ensure!(code == 204);
    for reader in readers {
        for code in reader.await?? {
            ensure!(
                code == 200 || code == 503,
                "a request during the seal answered {code}"
            );
        }
    }
    let (code, _) = call(&engine, &roots, "GET", "secret/data/canary/1", Some(&root), None).await?;
    ensure!(code == 503, "sealed: {code}");
    Ok(())
}

/// One route with a name in its path, as the V20 differential test drives it.
struct NamedRoute {
    /// Up to the name, e.g. `sys/policies/acl/`.
    prefix: &'static str,
    /// A body whose stored object carries `marker` somewhere visible on read.
    body: fn(&str) -> Value,
}

/// Every object a route holds, as root reads it: name to what a read returns.
async fn objects(
    engine: &EngineProcess,
    roots: &str,
    root: &str,
    route: &NamedRoute,
) -> Result<std::collections::BTreeMap<String, String>> {
    use capstan_tests::secrets::call;
    // The legacy policy route shares the store of sys/policies/acl; KV lists by metadata.
    let (list, read) = match route.prefix {
        "sys/policy/" => ("sys/policies/acl/", "sys/policies/acl/"),
        "secret/data/" => ("secret/metadata/", "secret/data/"),
        other => (other, other),
    };
    let mut folders = vec![String::new()];
    let mut names = Vec::new();
    while let Some(folder) = folders.pop() {
        let (code, listed) = call(
            engine,
            roots,
            "LIST",
            &format!("{list}{folder}"),
            Some(root),
            None,
        )
        .await?;
        ensure!(code == 200 || code == 404, "LIST {list}{folder}: {code} {listed}");
        for key in listed["data"]["keys"].as_array().into_iter().flatten() {
            let key = format!("{folder}{}", key.as_str().unwrap_or_default());
            if key.ends_with('/') {
                folders.push(key);
            } else {
                names.push(key);
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    for name in names {
        let (code, body) = call(engine, roots, "GET", &format!("{read}{name}"), Some(root), None).await?;
        out.insert(name, format!("{code} {}", body["data"]));
    }
    Ok(out)
}

/// V20 (RELIABILITY.md, policy matrix; issue 15 item 2): for every route that takes a
/// name (policies, the legacy sys/policy, Kubernetes auth roles, database and PKI roles,
/// KV), a narrowly scoped token sends path variants: extra segments, case, `//`,
/// `.`/`..`, percent-encoding (%2F, %2e), trailing slashes. Whatever the engine answers,
/// the object it touched must be exactly the one the ACL judged: a refused request
/// changes nothing, an accepted one changes only the object its path names, a read shows
/// no other object, and
/// `admin`, `root`, `default` and the explicitly denied `team-admin` are never touched.
/// Before the shared resolver (vault/route.rs), `PUT sys/policies/acl/team-x/admin`
/// passed the `team-*` ACL and overwrote `admin`, and `team-ADMIN` passed the ACL and
/// overwrote the denied `team-admin`.
#[tokio::test]
async fn every_named_route_touches_exactly_what_the_acl_judged() -> Result<()> {
    use capstan_tests::secrets::{call, roots, send, token_with};
    let client = client().await;
    fresh_storage();
    let engine = EngineProcess::start(&client, "v20-routes", &[]).await?;
    let roots = roots(&client).await?;
    let (root, _) = init_and_unseal(&engine, &roots).await?;

    let routes = [
        NamedRoute {
            prefix: "sys/policies/acl/",
            body: |m| json!({ "policy": format!("path \"{m}/*\" {{ capabilities = [\"read\"] }}") }),
        },
        NamedRoute {
            prefix: "sys/policy/",
            body: |m| json!({ "rules": format!("path \"{m}/*\" {{ capabilities = [\"read\"] }}") }),
        },
        NamedRoute {
            prefix: "auth/kubernetes/role/",
            body: |m| {
                json!({
                    "bound_service_account_names": ["app"],
                    "bound_service_account_namespaces": ["shop"],
                    "token_policies": [m],
                })
            },
        },
        NamedRoute {
            prefix: "database/roles/",
            body: |m| json!({ "db_name": m, "creation_statements": ["SELECT 1"] }),
        },
        NamedRoute {
            prefix: "pki/roles/",
            body: |m| json!({ "allowed_domains": [format!("{m}.example")] }),
        },
        NamedRoute {
            prefix: "secret/data/",
            body: |m| json!({ "data": { "marker": m } }),
        },
    ];
    let victims = ["admin", "team-admin"];
    let mut rules = String::new();
    for route in &routes {
        rules.push_str(&format!(
            "path \"{p}team-*\" {{ capabilities = [\"create\", \"read\", \"update\", \"delete\", \"list\"] }}\n\
             path \"{p}team-admin\" {{ capabilities = [\"deny\"] }}\n",
            p = route.prefix
        ));
        for victim in victims {
            let (code, body) = call(
                &engine,
                &roots,
                "PUT",
                &format!("{}{victim}", route.prefix),
                Some(&root),
                Some((route.body)(&format!("victim-{victim}"))),
            )
            .await?;
            ensure!(code < 300, "root writes {}{victim}: {code} {body}", route.prefix);
        }
    }
    let (code, body) = call(
        &engine,
        &roots,
        "PUT",
        "sys/policies/acl/team",
        Some(&root),
        Some(json!({ "policy": rules })),
    )
    .await?;
    ensure!(code == 204, "{code} {body}");
    let narrow = token_with(&engine, &roots, &root, &["team"], json!({})).await?;
    let bearer = format!("Bearer {narrow}");

    let tails = [
        "team-x",
        "team-x/admin",
        "team-x/root",
        "team-x/default",
        "team-x//admin",
        "team-x/./admin",
        "team-x/../admin",
        "team-x/../../sys/policies/acl/admin",
        "team-x%2Fadmin",
        "team-x%2fadmin",
        "team-x/%2e%2e/admin",
        "team-x/%2E%2E/admin",
        "team-%2e%2e/admin",
        "team-x%2F..%2Fadmin",
        "team-ADMIN",
        "team-Admin",
        "TEAM-admin",
        "team-admin/",
        "team-x/",
        "team-x/admin/",
        "team-x/.",
        "team-x/..",
        "team-",
    ];
    let mut marker = 0;
    let mut failures = Vec::new();
    for route in &routes {
        let initial = objects(&engine, &roots, &root, route).await?;
        for tail in tails {
            for method in ["GET", "PUT", "DELETE"] {
                marker += 1;
                let mark = format!("mark{marker}end");
                let before = objects(&engine, &roots, &root, route).await?;
                let target = format!("/v1/{}{tail}", route.prefix);
                let body = (method == "PUT").then(|| (route.body)(&mark));
                let (code, answer) = send(
                    &engine,
                    &roots,
                    method,
                    &target,
                    &[("Authorization", &bearer)],
                    body.as_ref(),
                )
                .await?;
                let after = objects(&engine, &roots, &root, route).await?;
                let touched: Vec<&String> = before
                    .keys()
                    .chain(after.keys())
                    .filter(|k| before.get(*k) != after.get(*k))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                // The one object the ACL judged is the one the path names, as written.
                let judged = tail.to_owned();
                let ok = match (method, code < 300) {
                    // A read changes nothing and shows no other object (every victim's
                    // content carries "victim-"; no variant names a victim as written).
                    ("GET", true) => touched.is_empty() && !answer.to_string().contains("victim-"),
                    (_, true) => {
                        touched.iter().all(|t| **t == judged) && (method == "DELETE" || touched.len() == 1)
                    }
                    (_, false) => touched.is_empty(),
                };
                if !ok || touched.iter().any(|t| victims.contains(&t.as_str())) {
                    failures.push(format!(
                        "{method} {target} -> {code} {answer}: touched {touched:?}"
                    ));
                }
                // Put back what a legitimate request changed, so every variant starts
                // from the same objects.
                if code < 300 && touched.iter().all(|t| !initial.contains_key(*t)) {
                    for t in &touched {
                        let path = match route.prefix {
                            "secret/data/" => format!("secret/metadata/{t}"),
                            p => format!("{p}{t}"),
                        };
                        call(&engine, &roots, "DELETE", &path, Some(&root), None).await?;
                    }
                }
            }
        }
        let last = objects(&engine, &roots, &root, route).await?;
        for victim in victims {
            if initial.get(victim) != last.get(victim) {
                failures.push(format!(
                    "{}{victim} changed: {:?}",
                    route.prefix,
                    last.get(victim)
                ));
            }
        }
    }
    // root stays what it is: no rules, not writable.
    let (code, body) = call(&engine, &roots, "GET", "sys/policies/acl/root", Some(&root), None).await?;
    ensure!(code == 200 && body["data"]["policy"] == "", "{code} {body}");
    ensure!(
        failures.is_empty(),
        "requests that touched another object than the one the ACL judged:\n{}",
        failures.join("\n")
    );
    Ok(())
}

/// Fail-open by omission (issue 15 item 11), through the HTTPS API: a client asking for
/// response wrapping (`X-Vault-Wrap-TTL`) is refused instead of handed the plaintext, and
/// a token's `num_uses` is enforced: each request spends one (denied ones too, as in
/// Vault), the last is served and revokes the token, parallel requests never spend the
/// same use, and a use-limited token cannot mint an unlimited one.
#[tokio::test]
async fn wrapping_is_refused_and_num_uses_is_enforced() -> Result<()> {
    use capstan_tests::secrets::{call, roots, send, token_with};
    let client = client().await;
    fresh_storage();
    let engine = EngineProcess::start(&client, "fail-closed", &[]).await?;
    let roots = roots(&client).await?;
    let (root, _) = init_and_unseal(&engine, &roots).await?;
    let canary = format!("wrapcanary-{:08x}", rand::random::<u32>());
    let (code, body) = call(
        &engine,
        &roots,
        "PUT",
        "secret/data/app",
        Some(&root),
        Some(json!({ "data": { "password": canary } })),
    )
    .await?;
    ensure!(code == 200, "{code} {body}\n{}", engine.logs());
    let auth = format!("Bearer {root}");
    for (method, target, body) in [
        ("GET", "/v1/secret/data/app", None),
        (
            "POST",
            "/v1/auth/token/create",
            Some(json!({ "policies": ["default"] })),
        ),
        ("GET", "/v1/sys/seal-status", None),
    ] {
        let (code, answer) = send(
            &engine,
            &roots,
            method,
            target,
            &[("Authorization", &auth), ("X-Vault-Wrap-TTL", "60s")],
            body.as_ref(),
        )
        .await?;
        ensure!(
            code == 400 && answer.to_string().contains("wrapping") && !answer.to_string().contains(&canary),
            "{method} {target} with X-Vault-Wrap-TTL: {code} {answer}"
        );
        ensure!(answer["auth"].is_null(), "no token handed out: {answer}");
    }

    let (code, body) = call(
        &engine,
        &roots,
        "PUT",
        "sys/policies/acl/app",
        Some(&root),
        Some(
            json!({ "policy": "path \"secret/data/app\" { capabilities = [\"read\"] }\n\
                                path \"auth/token/create\" { capabilities = [\"update\"] }" }),
        ),
    )
    .await?;
    ensure!(code == 204, "{code} {body}");
    let read = |token: String| {
        let (engine, roots) = (&engine, &roots);
        async move { call(engine, roots, "GET", "secret/data/app", Some(&token), None).await }
    };
    // Three uses: lookup-self shows two left, a denied request spends one, the third
    // use is served, the fourth refused.
    let three = token_with(&engine, &roots, &root, &["app"], json!({ "num_uses": 3 })).await?;
    let (code, me) = call(
        &engine,
        &roots,
        "GET",
        "auth/token/lookup-self",
        Some(&three),
        None,
    )
    .await?;
    ensure!(code == 200 && me["data"]["num_uses"] == 2, "{code} {me}");
    let (code, _) = call(&engine, &roots, "GET", "secret/data/other", Some(&three), None).await?;
    ensure!(code == 403, "denied: {code}");
    let (code, body) = read(three.clone()).await?;
    ensure!(
        code == 200 && body["data"]["data"]["password"] == canary.as_str(),
        "last use: {code} {body}"
    );
    let (code, _) = read(three.clone()).await?;
    ensure!(code == 403, "spent: {code}");
    // A use-limited token cannot create tokens (it would outlive its limit).
    let two = token_with(
        &engine,
        &roots,
        &root,
        &["app", "default"],
        json!({ "num_uses": "2" }),
    )
    .await?;
    let (code, body) = call(
        &engine,
        &roots,
        "POST",
        "auth/token/create",
        Some(&two),
        Some(json!({ "policies": ["app"] })),
    )
    .await?;
    ensure!(
        code == 400 && body["auth"].is_null(),
        "child of a limited token: {code} {body}"
    );
    // Nor on its last use, when it has no use left, which looks like no limit (0). The
    // token is revoked by that use, and no child is stored under it: before the fix the
    // child was created after its parent's revocation, so nothing revoked it with its
    // parent and it lived until the parent's original expiry.
    let one = token_with(&engine, &roots, &root, &["app"], json!({ "num_uses": 1 })).await?;
    let pair = token_with(&engine, &roots, &root, &["app"], json!({ "num_uses": 2 })).await?;
    let (code, body) = call(
        &engine,
        &roots,
        "GET",
        "auth/token/lookup-self",
        Some(&pair),
        None,
    )
    .await?;
    ensure!(
        code == 200 && body["data"]["num_uses"] == 1,
        "first of two uses: {code} {body}"
    );
    for (uses, limited) in [(1, &one), (2, &pair)] {
        let before = token_paths(&client).await?;
        let (code, body) = call(
            &engine,
            &roots,
            "POST",
            "auth/token/create",
            Some(limited),
            Some(json!({ "policies": ["app"] })),
        )
        .await?;
        let child = match body["auth"]["client_token"].as_str() {
            Some(child) => format!(
                "; the child answers lookup-self with {}",
                lookup_self(&engine, &roots, child).await?
            ),
            None => String::new(),
        };
        ensure!(
            code == 400 && body["auth"].is_null(),
            "last use of a token with num_uses {uses} creating a token: {code} {body}{child}"
        );
        let after = token_paths(&client).await?;
        let new: Vec<_> = after.difference(&before).collect();
        ensure!(
            new.is_empty(),
            "num_uses {uses}: token entries stored by the refused create: {new:?}"
        );
        ensure!(
            after.len() < before.len(),
            "num_uses {uses}: the spent token is revoked: {} entries before, {} after",
            before.len(),
            after.len()
        );
        ensure!(
            lookup_self(&engine, &roots, limited).await? == 403,
            "num_uses {uses}: spent"
        );
    }
    for bad in [json!(-1), json!("many"), json!(1.5)] {
        let (code, body) = call(
            &engine,
            &roots,
            "POST",
            "auth/token/create",
            Some(&root),
            Some(json!({ "policies": ["app"], "num_uses": bad })),
        )
        .await?;
        ensure!(code == 400, "num_uses {bad}: {code} {body}");
    }
    // Twenty requests at once with five uses: exactly five are served.
    let five = token_with(&engine, &roots, &root, &["app"], json!({ "num_uses": 5 })).await?;
    let answers = futures::future::join_all((0..20).map(|_| read(five.clone()))).await;
    let served = answers
        .iter()
        .filter(|a| a.as_ref().is_ok_and(|(code, _)| *code == 200))
        .count();
    ensure!(
        served == 5,
        "{served} of 20 parallel requests served with num_uses 5: {:?}",
        answers
            .iter()
            .map(|a| a.as_ref().map(|(c, _)| *c).ok())
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// Token guessing leaves a trail (issue 15 item 8): a request with an unknown, an expired
/// or no token is audited before it is refused, its token HMAC'd as every other token
/// is (the hash sys/audit-hash gives), and the raw token appears nowhere in the log.
#[tokio::test]
async fn requests_with_bad_tokens_are_audited_hashed() -> Result<()> {
    use capstan_tests::secrets::{call, roots, send, token_with};
    let client = client().await;
    fresh_storage();
    let audit = tempfile_path::Path::new("audit-bad-tokens", ".log");
    let engine = EngineProcess::start(
        &client,
        "audit-bad-tokens",
        &["--audit", &audit.0.display().to_string()],
    )
    .await?;
    let roots = roots(&client).await?;
    let (root, _) = init_and_unseal(&engine, &roots).await?;
    let guessed = format!("hvs.guessed{:016x}", rand::random::<u64>());
    let expired = token_with(&engine, &roots, &root, &["default"], json!({ "ttl": "1s" })).await?;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let mut hashes = Vec::new();
    for (token, path) in [
        (&guessed, "secret/data/guess-a"),
        (&expired, "secret/data/guess-b"),
    ] {
        let (code, body) = send(
            &engine,
            &roots,
            "GET",
            &format!("/v1/{path}"),
            &[("X-Vault-Token", token)],
            None,
        )
        .await?;
        ensure!(code == 403, "{code} {body}");
        let (code, hashed) = call(
            &engine,
            &roots,
            "POST",
            "sys/audit-hash/file",
            Some(&root),
            Some(json!({ "input": token })),
        )
        .await?;
        ensure!(code == 200, "{code} {hashed}");
        hashes.push((path, hashed["data"]["hash"].as_str().context("hash")?.to_owned()));
    }
    let (code, _) = send(&engine, &roots, "GET", "/v1/secret/data/guess-c", &[], None).await?;
    ensure!(code == 403);
    let log = std::fs::read_to_string(&audit.0)?;
    for raw in [&guessed, &expired] {
        ensure!(!log.contains(raw.as_str()), "a raw token in the audit log");
    }
    let records: Vec<Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let of = |path: &str, kind: &str| {
        records
            .iter()
            .filter(|r| r["type"] == kind && r["request"]["path"] == path)
            .cloned()
            .collect::<Vec<_>>()
    };
    for (path, hash) in &hashes {
        for kind in ["request", "response"] {
            let found = of(path, kind);
            ensure!(
                found.len() == 1 && found[0]["auth"]["client_token"] == hash.as_str(),
                "{kind} record of {path} with the token's HMAC {hash}: {found:?}"
            );
        }
        ensure!(of(path, "response")[0]["response"]["status"] == 403);
    }
    let tokenless = of("secret/data/guess-c", "request");
    ensure!(
        tokenless.len() == 1 && tokenless[0]["auth"]["client_token"].is_null(),
        "{tokenless:?}"
    );
    Ok(())
}

/// No probing for mounts (the promise of sys/internal/ui/mounts): a client without a
/// usable token (none, or a guessed one), or with a token that may not touch the path,
/// gets for a path that does not resolve under an existing mount (`database/roles/a/b`,
/// a trailing slash on a KV write) the same 403 and body as for a path under no mount,
/// and the request is audited like every refused one. Before, route resolution ran
/// before authentication and answered 400 for existing mounts only. A caller the ACL
/// allows still gets the 400 (V20: no handler runs on an unresolved name).
#[tokio::test]
async fn unauthenticated_clients_cannot_probe_for_mounts() -> Result<()> {
    use capstan_tests::secrets::{call, roots, send, token_with};
    let client = client().await;
    fresh_storage();
    let audit = tempfile_path::Path::new("audit-probe", ".log");
    let engine = EngineProcess::start(
        &client,
        "mount-probe",
        &["--audit", &audit.0.display().to_string()],
    )
    .await?;
    let roots = roots(&client).await?;
    let (root, _) = init_and_unseal(&engine, &roots).await?;
    let guessed = format!("hvs.guessed{:016x}", rand::random::<u64>());
    let stranger = token_with(&engine, &roots, &root, &["default"], json!({})).await?;
    let probes = [
        ("GET", "database/roles/a/b"),
        ("GET", "nosuchmount/roles/a/b"),
        ("GET", "pki/issue/a/b"),
        ("PUT", "secret/data/app/"),
        ("PUT", "nosuchmount/data/app/"),
        ("GET", "nosuchmount"),
    ];
    for (who, token) in [
        ("no token", None),
        ("a guessed token", Some(&guessed)),
        ("a token without access", Some(&stranger)),
    ] {
        let mut answers = Vec::new();
        for (method, path) in probes {
            let headers: Vec<(&str, &str)> =
                token.map(|t| ("X-Vault-Token", t.as_str())).into_iter().collect();
            let body = (method == "PUT").then(|| json!({ "data": { "a": "b" } }));
            let (code, answer) = send(
                &engine,
                &roots,
                method,
                &format!("/v1/{path}"),
                &headers,
                body.as_ref(),
            )
            .await?;
            answers.push(format!("{method} {path}: {code} {answer}"));
        }
        let shown: Vec<&str> = answers
            .iter()
            .map(|a| a.split_once(": ").map_or("", |(_, r)| r))
            .collect();
        ensure!(
            shown.iter().all(|r| *r == shown[0]) && shown[0].starts_with("403 "),
            "with {who}, a path under an existing mount is told from one under no mount:\n{}",
            answers.join("\n")
        );
    }
    // Those requests are in the audit log, refused.
    let log = std::fs::read_to_string(&audit.0)?;
    ensure!(!log.contains(&guessed), "a raw token in the audit log");
    let records: Vec<Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let refused = records
        .iter()
        .filter(|r| r["type"] == "response" && r["request"]["path"] == "database/roles/a/b")
        .map(|r| r["response"]["status"].clone())
        .collect::<Vec<_>>();
    ensure!(
        refused == vec![json!(403); 3],
        "audited refusals of database/roles/a/b: {refused:?}"
    );
    // Root (whom the ACL allows everything) learns why the path is refused, and nothing
    // under the name was touched.
    for (method, path) in [("GET", "database/roles/a/b"), ("PUT", "secret/data/app/")] {
        let body = (method == "PUT").then(|| json!({ "data": { "a": "b" } }));
        let (code, answer) = call(&engine, &roots, method, path, Some(&root), body).await?;
        ensure!(
            code == 400 && answer.to_string().contains("invalid request path"),
            "root: {method} {path}: {code} {answer}"
        );
    }
    let (code, answer) = call(&engine, &roots, "GET", "secret/data/app", Some(&root), None).await?;
    ensure!(code == 404, "nothing written at secret/data/app: {code} {answer}");
    Ok(())
}
