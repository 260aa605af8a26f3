//! RELIABILITY N2 on the real control plane: a pod's engine token and leases are revoked
//! when the pod is stopped without its agent's own cleanup, and the pod's bookkeeping
//! (the finalizer the webhook gave it) goes only once the engine has revoked them.
//!
//! The real webhook injects the agent into a pod (and with it the finalizer and label);
//! the real agent runs as a process of the test with a token bound to that pod, as the
//! kubelet would run it, and takes a PostgreSQL credential; the test logs in as the pod
//! too and takes one of its own. The agent is SIGKILLed (no revoke-self), then the pod
//! is evicted (the eviction API) or force-deleted: the controller's credentials
//! reconciler asks the engine (as its own login, through the chart's AuthRole and
//! SecretPolicy) to revoke everything issued to the pod. With the engine stopped the pod
//! stays, Terminating, with its finalizer and a Warning Event, until the engine is back.
//!
//! The pods are never scheduled (schedulerName names no scheduler): nothing but the
//! reconciler removes their finalizer, as on a node that is gone.

use anyhow::{Context as _, Result, ensure};
use capstan_contract::annotations::agent::{AGENT_LABEL, REVOKE_FINALIZER};
use capstan_tests::{
    postgres::{ADMIN_USER, Postgres},
    secrets::{call, fresh_storage, init_and_unseal, pod_bound_token, roots, unseal},
    *,
};
use k8s_openapi::api::core::v1::{Event, Pod, ServiceAccount};
use kube::{
    Api, ResourceExt as _,
    api::{DeleteParams, EvictParams, ListParams, ObjectMeta, PostParams},
};
use serde_json::{Value, json};
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

const AUDIENCE: &str = "capstan-engine";
const CREATE: &str =
    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';";

struct World {
    client: kube::Client,
    engine: EngineProcess,
    roots: String,
    root: String,
    keys: Vec<String>,
    pg: Postgres,
    ns: TestNamespace,
    _webhook: WebhookProcess,
    controller: ControllerProcess,
    dir: PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An engine with a PostgreSQL role `app` (leases of 10 min: only a revocation ends them
/// within the test), a Kubernetes auth role for ServiceAccount `app` of a fresh
/// namespace, the webhook, and the controller pointed at the engine.
async fn world(name: &str) -> Result<World> {
    let client = client().await;
    fresh_storage();
    let pg = Postgres::start().await?;
    let engine = EngineProcess::start(&client, name, &[]).await?;
    let roots = roots(&client).await?;
    let (root, keys) = init_and_unseal(&engine, &roots).await?;
    let ns = TestNamespace::new(&client, "e2e-creds").await;
    Api::<ServiceAccount>::namespaced(client.clone(), &ns.name)
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: ObjectMeta {
                    name: Some("app".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
    let webhook = WebhookProcess::start(&client, &[]).await?;
    let url = format!("https://127.0.0.1:{}", engine.https.port());
    let controller =
        ControllerProcess::sole_with(&client, &format!("credentials-{name}"), &["--engine-url", &url])
            .await?;
    let dir = std::env::temp_dir().join(format!("capstan-e2e-creds-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    let world = World {
        client,
        engine,
        roots,
        root,
        keys,
        pg,
        ns,
        _webhook: webhook,
        controller,
        dir,
    };
    world
        .ok(
            "PUT",
            "sys/policies/acl/app",
            json!({"policy": "path \"database/creds/app\" { capabilities = [\"read\"] }"}),
        )
        .await?;
    world
        .ok(
            "POST",
            "auth/kubernetes/role/app",
            json!({"bound_service_account_names": "app", "bound_service_account_namespaces": world.ns.name,
                   "policies": "app", "ttl": "1h"}),
        )
        .await?;
    world
        .ok(
            "POST",
            "database/config/pg",
            json!({
                "plugin_name": "postgresql-database-plugin",
                "connection_url": world.pg.connection_url(),
                "username": ADMIN_USER,
                "password": world.pg.admin_password,
                "allowed_roles": ["app"],
            }),
        )
        .await?;
    world
        .ok(
            "POST",
            "database/roles/app",
            json!({"db_name": "pg", "creation_statements": [CREATE], "default_ttl": 600, "max_ttl": 600}),
        )
        .await?;
    Ok(world)
}

/// What one pod holds: its object, the test's own login as it, and that login's lease.
struct Holder {
    pod: Pod,
    token: String,
    lease_id: String,
    username: String,
    agent: Child,
}

impl Holder {
    /// SIGKILL: the agent's own revocation (revoke-self on SIGTERM) never runs.
    fn kill_agent(&mut self) -> Result<()> {
        self.agent.kill()?;
        self.agent.wait()?;
        Ok(())
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.kill_agent();
    }
}

impl World {
    async fn ok(&self, method: &str, path: &str, body: Value) -> Result<Value> {
        let (code, reply) = call(
            &self.engine,
            &self.roots,
            method,
            path,
            Some(&self.root),
            Some(body),
        )
        .await?;
        ensure!(
            code == 200 || code == 204,
            "{method} {path}: {code} {reply}\n{}",
            self.engine.logs()
        );
        Ok(reply)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    /// A pod asking for the agent, created through the webhook; the agent running for
    /// it (as a process, with a token bound to the pod) until its credential is
    /// rendered; and the test's own login as the pod, with a database lease.
    async fn holder(&self, name: &str) -> Result<Holder> {
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "annotations": {
                "capstan.dev/agent-inject": "true",
                "capstan.dev/agent-role": "app",
                "capstan.dev/agent-inject-secret-db": "database/creds/app",
            }},
            "spec": {
                "serviceAccountName": "app",
                "schedulerName": "e2e-no-scheduler",
                "containers": [{"name": "app", "image": "app:1"}],
            },
        }))?;
        let pod = self.pods().create(&PostParams::default(), &pod).await?;
        ensure!(
            pod.finalizers().iter().any(|f| f == REVOKE_FINALIZER) && pod.labels().contains_key(AGENT_LABEL),
            "the webhook gave the pod the finalizer and label: {:?} {:?}",
            pod.finalizers(),
            pod.labels()
        );
        let jwt = pod_bound_token(&self.client, &self.ns.name, "app", &pod, AUDIENCE).await?;
        let token_file = self.dir.join(format!("{name}.token"));
        std::fs::write(&token_file, &jwt)?;
        let roots_file = self.dir.join("roots.pem");
        std::fs::write(&roots_file, &self.roots)?;
        let secrets = self.dir.join(format!("{name}-secrets"));
        std::fs::create_dir_all(&secrets)?;
        let admin = free_port();
        let agent_log = self.dir.join(format!("{name}-agent.log"));
        let agent = Command::new(bin("capstan-sidecar"))
            .env("CAPSTAN_LOG", "debug,hyper=info,rustls=info,h2=info")
            .args(["--log-format", "json", "agent"])
            .args([
                "--engine-url",
                &format!("https://127.0.0.1:{}", self.engine.https.port()),
            ])
            .args(["--role", "app", "--secret", "db=database/creds/app"])
            .arg("--token-file")
            .arg(&token_file)
            .arg("--ca-bundle-file")
            .arg(&roots_file)
            .arg("--dir")
            .arg(&secrets)
            .args(["--admin-addr", &admin.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&agent_log)?)
            .spawn()
            .context("starting capstan-sidecar agent")?;
        eventually(Duration::from_secs(30), "the agent's /ready", || async {
            (http_get(admin, "/ready").await.ok()?.0 == 200).then_some(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", std::fs::read_to_string(&agent_log).unwrap_or_default()))?;

        // The test logs in as the pod too, and takes a credential of its own.
        let (code, login) = call(
            &self.engine,
            &self.roots,
            "POST",
            "auth/kubernetes/login",
            None,
            Some(json!({"role": "app", "jwt": jwt})),
        )
        .await?;
        ensure!(code == 200, "login as the pod: {code} {login}");
        ensure!(
            login["auth"]["metadata"]["pod_uid"] == pod.uid().unwrap().as_str(),
            "the token remembers its pod: {login}"
        );
        let token = login["auth"]["client_token"]
            .as_str()
            .context("a token")?
            .to_owned();
        let (code, creds) = call(
            &self.engine,
            &self.roots,
            "GET",
            "database/creds/app",
            Some(&token),
            None,
        )
        .await?;
        ensure!(code == 200, "database creds: {code} {creds}");
        let username = creds["data"]["username"]
            .as_str()
            .context("a username")?
            .to_owned();
        let password = creds["data"]["password"].as_str().context("a password")?;
        ensure!(self.pg.login(&username, password).await? == username);
        Ok(Holder {
            pod,
            token,
            lease_id: creds["lease_id"].as_str().context("a lease")?.to_owned(),
            username,
            agent,
        })
    }

    /// Whether `token` still works (lookup-self).
    async fn token_works(&self, token: &str) -> Result<bool> {
        let (code, _) = call(
            &self.engine,
            &self.roots,
            "GET",
            "auth/token/lookup-self",
            Some(token),
            None,
        )
        .await?;
        Ok(code == 200)
    }

    async fn lease_exists(&self, lease_id: &str) -> Result<bool> {
        let (code, _) = call(
            &self.engine,
            &self.roots,
            "PUT",
            "sys/leases/lookup",
            Some(&self.root),
            Some(json!({"lease_id": lease_id})),
        )
        .await?;
        Ok(code == 200)
    }

    async fn gone(&self, name: &str, within: Duration) -> Result<()> {
        eventually(within, &format!("pod {name} to be gone"), || async {
            self.pods().get_opt(name).await.ok()?.is_none().then_some(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\ncontroller:\n{}", self.controller.logs()))
    }

    async fn events(&self, pod: &str, reason: &str) -> Result<Vec<Event>> {
        Ok(Api::<Event>::namespaced(self.client.clone(), &self.ns.name)
            .list(&ListParams::default().fields(&format!("involvedObject.name={pod},reason={reason}")))
            .await?
            .items)
    }
}

/// The agent dies without its cleanup (SIGKILL: no revoke-self), and the pod is
/// evicted through the eviction API: its logins (the agent's and the test's) and both
/// leases are revoked (the PostgreSQL roles dropped), then the pod goes.
#[tokio::test]
async fn an_evicted_pods_token_and_leases_are_revoked_before_it_goes() -> Result<()> {
    let w = world("creds-evict").await?;
    let mut holder = w.holder("evicted").await?;
    holder.kill_agent()?;
    ensure!(
        w.token_works(&holder.token).await?,
        "killing the agent revoked nothing"
    );
    // revoke-pod is the controller's (its chart policy): the pod's own token, whose
    // policy does not grant it, is refused like any path it does not hold.
    let (code, body) = call(
        &w.engine,
        &w.roots,
        "POST",
        "auth/kubernetes/revoke-pod",
        Some(&holder.token),
        Some(json!({"pod_uid": holder.pod.uid().unwrap()})),
    )
    .await?;
    ensure!(code == 403, "revoke-pod without the policy: {code} {body}");

    w.pods()
        .evict(&holder.pod.name_any(), &EvictParams::default())
        .await
        .context("evicting the pod")?;
    w.gone("evicted", Duration::from_secs(30)).await?;
    ensure!(!w.token_works(&holder.token).await?, "the pod's token is revoked");
    ensure!(!w.lease_exists(&holder.lease_id).await?, "its lease is revoked");
    ensure!(
        !w.pg.role_exists(&holder.username).await?,
        "and the credential is dropped in PostgreSQL"
    );
    let revoked = w.events("evicted", "CredentialsRevoked").await?;
    let note = revoked
        .first()
        .and_then(|e| e.message.clone())
        .unwrap_or_default();
    ensure!(
        note.contains("2 token(s) and 2 lease(s)"),
        "the agent's login and lease went too: {note:?}\n{}",
        w.controller.logs()
    );
    Ok(())
}

/// Force-deleted while the engine is down: the pod stays, Terminating, with its
/// finalizer and a Warning Event, as long as the engine cannot revoke; once the engine
/// is back (and unsealed) the token and lease are revoked and the pod goes.
#[tokio::test]
async fn a_pod_waits_for_its_credentials_to_be_revoked_while_the_engine_is_down() -> Result<()> {
    let mut w = world("creds-down").await?;
    let mut holder = w.holder("stranded").await?;
    holder.kill_agent()?;
    let https = w.engine.https;
    w.engine.kill();
    w.pods()
        .delete("stranded", &DeleteParams::default().grace_period(0))
        .await
        .context("force-deleting the pod")?;
    // Held: deleting, finalizer in place, and the reconciler saying why.
    let warned = eventually(
        Duration::from_secs(30),
        "a CredentialsRevocationFailed Event",
        || async {
            let events = w.events("stranded", "CredentialsRevocationFailed").await.ok()?;
            events.into_iter().next()
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", w.controller.logs()))?;
    ensure!(warned.type_.as_deref() == Some("Warning"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let held = w.pods().get("stranded").await.context("the pod is still there")?;
    ensure!(held.metadata.deletion_timestamp.is_some(), "Terminating");
    ensure!(held.finalizers().iter().any(|f| f == REVOKE_FINALIZER));
    let failures = w.controller.metrics().await?;
    ensure!(
        failures
            .lines()
            .any(|l| l.starts_with("capstan_controller_reconcile_failures_total")
                && l.contains("controller=\"credentials\"")),
        "the failures are counted:\n{failures}"
    );

    // The engine back (same storage, same address), unsealed: the backoff (at most a
    // minute) brings the next attempt.
    w.engine = EngineProcess::start_at(&w.client, "creds-down-again", https, &[]).await?;
    unseal(&w.engine, &w.roots, &w.keys).await?;
    w.gone("stranded", Duration::from_secs(75)).await?;
    ensure!(!w.token_works(&holder.token).await?, "the pod's token is revoked");
    ensure!(!w.lease_exists(&holder.lease_id).await?, "its lease is revoked");
    ensure!(!w.pg.role_exists(&holder.username).await?);
    Ok(())
}
