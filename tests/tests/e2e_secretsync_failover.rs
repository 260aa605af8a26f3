//! K1 for SecretSync: two capstan-controllers (leader and standby, short Lease timings)
//! against a real engine and a real PostgreSQL, with a leased database credential and a
//! KV entry synced. The leader is stopped in the one window where a credential exists
//! that no record names, between the engine's answer to `database/creds/<role>` and the
//! write of its lease id (held there by the controller's test-only fault point,
//! `CAPSTAN_CONTROLLER_TEST_PAUSE_AT=issued`): once killed (SIGKILL), once frozen past
//! its Lease (SIGSTOP) and thawed (SIGCONT). After the standby takes over:
//!
//! - no duplicate lease: the database holds exactly one role of the engine's for that
//!   role, the one the target Secret and the lease record name; the engine holds exactly
//!   one lease; the thawed leader issues nothing;
//! - no lost update: a KV change written while the leader is dead or frozen reaches its
//!   target Secret through the new leader.
//!
//! And the race between the two (K4): the frozen leader thaws, credential in hand, while
//! its successor has revoked that credential's token and not yet cleared the intent
//! (the successor held at `revoked`). The successor claimed the intent (a conditional
//! write) before revoking, so the thawed leader's conditional write of its lease id
//! fails: no record ever names the revoked lease and no target ever holds its
//! credential (both watched throughout).

use anyhow::{Context as _, Result, ensure};
use capstan_tests::{
    postgres::{ADMIN_USER, Postgres},
    *,
};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const TIMINGS: LeaseTimings = LeaseTimings {
    duration: 6,
    renew_deadline: 4,
    retry_period: 1,
};
const PAUSE_AT_ENV: &str = "CAPSTAN_CONTROLLER_TEST_PAUSE_AT";
/// The prefix of the PostgreSQL roles the engine creates for database role `app`.
const ROLE_PREFIX: &str = "v-app-";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stop {
    Kill,
    Pause,
}

#[tokio::test]
async fn secretsync_leader_killed_between_issue_and_record_leaves_one_lease_no_lost_update() -> Result<()> {
    failover(Stop::Kill, "issued", None).await
}

#[tokio::test]
async fn secretsync_leader_paused_between_issue_and_record_issues_nothing_when_it_thaws() -> Result<()> {
    failover(Stop::Pause, "issued", None).await
}

/// Frozen with a credential in hand; it thaws after its successor revoked that
/// credential's token and before the successor wrote the record again.
#[tokio::test]
async fn secretsync_leader_thawing_while_its_successor_revokes_records_and_delivers_nothing() -> Result<()> {
    failover(Stop::Pause, "issued", Some("revoked")).await
}

/// Frozen after recording its intent and before asking the engine: when it thaws, it
/// would issue next; it must not.
#[tokio::test]
async fn secretsync_leader_paused_before_issuing_issues_nothing_when_it_thaws() -> Result<()> {
    failover(Stop::Pause, "intent", None).await
}

/// The successor stops too, after claiming the orphan's intent and before revoking its
/// token: a third controller finds the intent claimed and revokes the token itself.
#[tokio::test]
async fn secretsync_successor_killed_after_claiming_the_intent_the_next_one_revokes() -> Result<()> {
    successor_killed("claimed").await
}

/// The successor stops after revoking the orphan's token and before clearing the
/// intent: a third controller revokes again (the token is gone: nothing changes).
#[tokio::test]
async fn secretsync_successor_killed_after_revoking_the_next_one_finishes() -> Result<()> {
    successor_killed("revoked").await
}

/// The leader killed at `issued`, its successor killed at `at` while it finishes the
/// orphan; a third controller must finish it and deliver exactly one live credential.
async fn successor_killed(at: &'static str) -> Result<()> {
    let name = format!("k4ss-{at}");
    let world = World::new(&name).await?;
    let pg = Postgres::start().await?;
    world.configure_database(&pg).await?;
    let history = History::follow(&world);
    clear_lease(&world.client).await;
    let start = |id: &str, pause: Option<&'static str>| {
        let (client, url, id) = (&world.client, world.engine_url(), format!("{name}-{id}"));
        async move { controller(client, &id, &url, pause).await }
    };
    let paused = |controller: &ControllerProcess, point: &str| {
        let (log, wanted) = (controller.log.clone(), format!("Test fault: pausing at {point}"));
        async move {
            eventually(Duration::from_secs(30), &wanted, || {
                let logs = std::fs::read_to_string(&log).unwrap_or_default();
                let wanted = &wanted;
                async move { logs.contains(wanted.as_str()).then_some(()) }
            })
            .await
        }
    };
    let first = start("a", Some("issued")).await?;
    wait_for_holder(&world.client, &format!("{name}-a")).await?;
    let second = start("b", Some(at)).await?;
    world.apply(
        "apiVersion: secrets.capstan.dev/v1alpha1\nkind: SecretSync\nmetadata: {name: db}\nspec:\n  \
         source: {database: {role: app}}\n  auth: {role: app, serviceAccountName: app}\n  \
         target: {name: db-creds, type: kubernetes.io/basic-auth}\n",
    )?;
    paused(&first, "issued")
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", first.logs()))?;
    first.signal("KILL");
    let orphans = world.live_roles(&pg).await?;
    ensure!(orphans.len() == 1, "one unrecorded credential: {orphans:?}");
    wait_for_holder(&world.client, &format!("{name}-b")).await?;
    paused(&second, at)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", second.logs()))?;
    second.signal("KILL");
    let record = world.record_text().await?;
    ensure!(
        record.contains("\"revoking\":true"),
        "the intent is claimed: {record}"
    );
    let revoked_before = world.live_roles(&pg).await?.is_empty();
    ensure!(
        revoked_before == (at == "revoked"),
        "the orphan is revoked by the successor exactly when it got that far"
    );

    let third = start("c", None).await?;
    wait_for_holder(&world.client, &format!("{name}-c")).await?;
    let last = parking_lot::Mutex::new(String::new());
    let (user, password) = eventually(
        Duration::from_secs(40),
        "exactly one live credential, in the target and on record",
        || {
            let (world, pg, last) = (&world, &pg, &last);
            async move {
                let data = world.secrets().get_opt("db-creds").await.ok()??.data?;
                let s = |k: &str| String::from_utf8(data.get(k)?.0.clone()).ok();
                let (user, password) = (s("username")?, s("password")?);
                let roles = world.live_roles(pg).await.ok()?;
                let record = world.record_text().await.ok()?;
                let leases = metric(&world.engine.metrics().await.ok()?, "capstan_engine_leases")?;
                *last.lock() =
                    format!("target {user}, live roles {roles:?}, engine leases {leases}, record {record}");
                (roles == [user.clone()] && leases == 1.0 && !record.contains("issuing"))
                    .then_some((user, password))
            }
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}: {}\nthird:\n{}", last.lock(), third.logs()))?;
    ensure!(pg.login(&user, &password).await? == user);
    ensure!(!orphans.contains(&user), "a new credential");
    let expected = if at == "revoked" {
        "is already gone (revoked or expired): nothing to revoke"
    } else {
        "Revoked the token of an issue that was never recorded"
    };
    ensure!(third.logs().contains(expected), "{}", third.logs());
    ensure!(
        !third.logs().contains("OrphanNotRevoked") && !third.logs().contains("refused to revoke"),
        "{}",
        third.logs()
    );
    let (ids, users) = history.seen();
    ensure!(ids.len() == 1 && users == [user.clone()], "{ids:?} {users:?}");
    eprintln!("K4 SecretSync (successor killed at {at}): finished by the third controller");
    Ok(())
}

/// `point`: where the leader is held (the controller's test-only fault point);
/// `successor_at`: where the successor is held while the frozen leader thaws.
async fn failover(stop: Stop, point: &str, successor_at: Option<&str>) -> Result<()> {
    let name = match (stop, point, successor_at) {
        (_, _, Some(_)) => "k1ss-race",
        (Stop::Kill, _, _) => "k1ss-kill",
        (Stop::Pause, "issued", _) => "k1ss-pause",
        (Stop::Pause, _, _) => "k1ss-pause-intent",
    };
    let issued_before_stop = usize::from(point == "issued");
    let world = World::new(name).await?;
    let pg = Postgres::start().await?;
    world.configure_database(&pg).await?;
    world.kv_put("app/config", json!({"color": "blue"})).await?;
    // Every version of the lease record and of the target, from the start.
    let history = History::follow(&world);

    clear_lease(&world.client).await;
    let mut leader = controller(
        &world.client,
        &format!("{name}-a"),
        &world.engine_url(),
        Some(point),
    )
    .await?;
    wait_for_holder(&world.client, &format!("{name}-a")).await?;
    let standby = controller(
        &world.client,
        &format!("{name}-b"),
        &world.engine_url(),
        successor_at,
    )
    .await?;

    // The leader syncs the KV entry...
    world.apply(
        "apiVersion: secrets.capstan.dev/v1alpha1\nkind: SecretSync\nmetadata: {name: kv}\nspec:\n  \
         source: {kv: {path: app/config}}\n  auth: {role: app, serviceAccountName: app}\n  \
         refreshInterval: 500ms\n  target: {name: kv-creds}\n",
    )?;
    world
        .wait_value("kv-creds", "color", "blue", Duration::from_secs(30))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", leader.logs()))?;
    // ...and is held between the issue of the database credential and its record.
    world.apply(
        "apiVersion: secrets.capstan.dev/v1alpha1\nkind: SecretSync\nmetadata: {name: db}\nspec:\n  \
         source: {database: {role: app}}\n  auth: {role: app, serviceAccountName: app}\n  \
         target: {name: db-creds, type: kubernetes.io/basic-auth}\n",
    )?;
    let paused = format!("Test fault: pausing at {point}");
    eventually(Duration::from_secs(30), &paused, || {
        let (logs, paused) = (leader.logs(), &paused);
        async move { logs.contains(paused.as_str()).then_some(()) }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", leader.logs()))?;
    let stopped_at = Instant::now();
    leader.signal(match stop {
        Stop::Kill => "KILL",
        Stop::Pause => "STOP",
    });
    // The credential the leader was handed exists, and nothing records it.
    let orphans = world.live_roles(&pg).await?;
    ensure!(
        orphans.len() == issued_before_stop,
        "the leader issued {issued_before_stop} credential(s) before the stop: {orphans:?}"
    );
    ensure!(
        world.secrets().get_opt("db-creds").await?.is_none(),
        "nothing was delivered before the stop"
    );

    // A KV change written while the leader is dead or frozen.
    world.kv_put("app/config", json!({"color": "green"})).await?;
    let changed_at = Instant::now();

    wait_for_holder(&world.client, &format!("{name}-b")).await?;
    let takeover = stopped_at.elapsed();
    ensure!(
        takeover <= Duration::from_secs(TIMINGS.duration + 4),
        "takeover took {takeover:?}"
    );
    world
        .wait_value("kv-creds", "color", "green", Duration::from_secs(30))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", standby.logs()))?;
    let kv_converged = changed_at.elapsed();

    if let Some(at) = successor_at {
        // The successor has revoked the orphan's token and holds there; the old leader
        // thaws now, with the credential of that token in hand.
        let paused = format!("Test fault: pausing at {at}");
        eventually(Duration::from_secs(30), &paused, || {
            let (logs, paused) = (standby.logs(), &paused);
            async move { logs.contains(paused.as_str()).then_some(()) }
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", standby.logs()))?;
        leader.signal("CONT");
    }

    // The new leader delivers a credential of its own, having revoked the orphan.
    let secrets = world.secrets();
    let (user, password) = eventually(
        Duration::from_secs(30),
        "a credential from the new leader",
        || {
            let secrets = secrets.clone();
            async move {
                let data = secrets.get_opt("db-creds").await.ok()??.data?;
                let s = |k: &str| String::from_utf8(data.get(k)?.0.clone()).ok();
                Some((s("username")?, s("password")?))
            }
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", standby.logs()))?;
    let db_converged = stopped_at.elapsed();
    // The first credential the target holds logs in: not one revoked before delivery
    // (the thawed leader's, had its write of the lease id succeeded).
    let login = pg.login(&user, &password).await.with_context(|| {
        format!(
            "the first credential delivered ({user}) does not log in\nold leader:\n{}",
            leader.logs()
        )
    })?;
    ensure!(login == user, "the delivered credential logs in");
    ensure!(
        !orphans.contains(&user),
        "the new leader delivered a credential of its own"
    );

    if stop == Stop::Pause {
        // The old leader thaws in the middle of its reconcile, with a credential in hand
        // whose token its successor revoked: it must neither record it nor issue again.
        leader.signal("CONT");
        eventually(Duration::from_secs(15), "the thawed leader to step down", || {
            let logs = leader.logs();
            async move { logs.contains("Lost leadership").then_some(()) }
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", leader.logs()))?;
        // Time for anything it might still do.
        tokio::time::sleep(Duration::from_secs(3)).await;
        ensure!(leader.is_running(), "the thawed leader stands by");
        let issued = leader.logs().matches("Issued a credential").count();
        ensure!(
            issued == issued_before_stop,
            "the thawed leader issued again ({issued} issues in all):\n{}",
            leader.logs()
        );
        ensure!(
            lease_holder(&world.client).await.as_deref() == Some(&format!("{name}-b")[..]),
            "the new leader keeps the Lease"
        );
    }

    // After convergence: exactly the recorded lease is live, in the database and in the
    // engine, and the record holds no unfinished intent.
    let last = parking_lot::Mutex::new(String::new());
    let record_text = eventually(
        Duration::from_secs(15),
        "exactly the recorded lease to be live",
        || {
            let (world, pg, user, last) = (&world, &pg, user.clone(), &last);
            async move {
                let roles = world.live_roles(pg).await.ok()?;
                let record = world.record_text().await.ok()?;
                let leases = metric(&world.engine.metrics().await.ok()?, "capstan_engine_leases")?;
                *last.lock() = format!("live roles {roles:?}, engine leases {leases}, record {record}");
                (roles == vec![user] && leases == 1.0 && !record.contains("issuing")).then_some(record)
            }
        },
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}: {}\nstandby:\n{}\nold leader:\n{}",
            last.lock(),
            standby.logs(),
            leader.logs()
        )
    })?;
    let record: Value = serde_json::from_str(&record_text)?;
    let id = record["current"]["id"]
        .as_str()
        .context("a current lease id on record")?;
    ensure!(id.starts_with("database/creds/app/"), "{record_text}");
    ensure!(
        record["retiring"].as_array().is_none_or(Vec::is_empty),
        "{record_text}"
    );
    let (code, lease) = world
        .call(
            "PUT",
            "sys/leases/lookup",
            Some(&world.root),
            Some(json!({ "lease_id": id })),
        )
        .await?;
    ensure!(code == 200, "the recorded lease is the engine's: {code} {lease}");
    ensure!(pg.login(&user, &password).await? == user);
    ensure!(
        standby
            .logs()
            .contains("Revoked the token of an issue that was never recorded"),
        "{}",
        standby.logs()
    );
    // Throughout: no record named another lease as current, no target held another
    // credential (a revoked one delivered by the thawed leader, say).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ids, users) = history.seen();
    ensure!(
        ids == [id.to_owned()],
        "the record named other leases as current: {ids:?} (kept {id})\nold leader:\n{}",
        leader.logs()
    );
    ensure!(
        users == [user.clone()],
        "the target held other credentials: {users:?} (kept {user})\nold leader:\n{}",
        leader.logs()
    );
    eprintln!(
        "K1 SecretSync ({stop:?} at {point}): takeover {takeover:?}, KV change delivered {kv_converged:?} after \
         its write, database credential delivered {db_converged:?} after the stop"
    );
    Ok(())
}

/// Every lease id the record of SecretSync `db` named as current, and every username its
/// target held, in order, without repeats: followed by watches from the start.
struct History {
    seen: std::sync::Arc<parking_lot::Mutex<(Vec<String>, Vec<String>)>>,
    _tasks: Vec<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl History {
    fn follow(world: &World) -> Self {
        use futures::StreamExt as _;
        use kube::runtime::watcher;
        let seen = std::sync::Arc::<parking_lot::Mutex<(Vec<String>, Vec<String>)>>::default();
        let follow = |name: &'static str, pick: fn(&Secret) -> Option<String>, ids: bool| {
            let (api, seen) = (world.secrets(), seen.clone());
            AbortOnDrop(tokio::spawn(async move {
                let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
                let mut events = std::pin::pin!(watcher::watcher(api, config));
                while let Some(event) = events.next().await {
                    let Ok(watcher::Event::Apply(secret) | watcher::Event::InitApply(secret)) = event else {
                        continue;
                    };
                    if let Some(value) = pick(&secret) {
                        let mut seen = seen.lock();
                        let list = if ids { &mut seen.0 } else { &mut seen.1 };
                        if !list.contains(&value) {
                            list.push(value);
                        }
                    }
                }
            }))
        };
        fn current_id(secret: &Secret) -> Option<String> {
            let text = secret.data.as_ref()?.get("leases.json")?.0.clone();
            let record: Value = serde_json::from_slice(&text).ok()?;
            record["current"]["id"].as_str().map(str::to_owned)
        }
        fn username(secret: &Secret) -> Option<String> {
            String::from_utf8(secret.data.as_ref()?.get("username")?.0.clone()).ok()
        }
        Self {
            _tasks: vec![
                follow("db-capstan-lease", current_id, true),
                follow("db-creds", username, false),
            ],
            seen,
        }
    }

    fn seen(&self) -> (Vec<String>, Vec<String>) {
        self.seen.lock().clone()
    }
}

/// One engine (fresh storage, initialized, unsealed) and a namespace with ServiceAccount
/// `app`, allowed by the engine to read `secret/data/app/*` and `database/creds/app`.
struct World {
    client: Client,
    engine: EngineProcess,
    roots: String,
    root: String,
    ns: TestNamespace,
}

impl World {
    async fn new(name: &str) -> Result<Self> {
        let client = client().await;
        install_chart();
        run(
            "kubectl",
            &[
                "-n",
                SYSTEM_NAMESPACE,
                "delete",
                "storageentries.secrets.capstan.dev",
                "--all",
                "--wait=true",
            ],
        )?;
        let engine = EngineProcess::start(&client, name, &[]).await?;
        let roots = eventually(Duration::from_secs(20), "the published mesh roots", || async {
            published_roots(&client).await
        })
        .await?;
        let ns = TestNamespace::new(&client, name).await;
        let mut world = Self {
            client,
            engine,
            roots,
            root: String::new(),
            ns,
        };
        world.root = capstan_tests::secrets::init_and_unseal(&world.engine, &world.roots)
            .await?
            .0;
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some("app".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<ServiceAccount>::namespaced(world.client.clone(), &world.ns.name)
            .create(&PostParams::default(), &sa)
            .await?;
        world
            .root_call(
                "PUT",
                "sys/policies/acl/app-read",
                json!({"policy": "path \"secret/data/app/*\" { capabilities = [\"read\"] }\n\
                                  path \"database/creds/app\" { capabilities = [\"read\"] }\n\
                                  path \"sys/leases/renew\" { capabilities = [\"update\"] }\n\
                                  path \"sys/leases/revoke\" { capabilities = [\"update\"] }"}),
            )
            .await?;
        let ns = world.ns.name.clone();
        world
            .root_call(
                "POST",
                "auth/kubernetes/role/app",
                json!({"bound_service_account_names": ["app"], "bound_service_account_namespaces": [ns],
                       "policies": ["app-read"], "ttl": "1h"}),
            )
            .await?;
        Ok(world)
    }

    /// Database role `app` on `pg`: a 5-minute lease, so nothing renews or rotates
    /// during the test and every live role is accounted for by the current lease alone.
    async fn configure_database(&self, pg: &Postgres) -> Result<()> {
        const CREATE: &str =
            "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';";
        self.root_call(
            "POST",
            "database/config/pg",
            json!({
                "plugin_name": "postgresql-database-plugin",
                "connection_url": pg.connection_url(),
                "username": ADMIN_USER,
                "password": pg.admin_password,
                "allowed_roles": ["app"],
            }),
        )
        .await?;
        self.root_call(
            "POST",
            "database/roles/app",
            json!({"db_name": "pg", "creation_statements": [CREATE], "default_ttl": 300, "max_ttl": 600}),
        )
        .await?;
        Ok(())
    }

    fn engine_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.engine.https.port())
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let body = body.map(|b| b.to_string());
        https_json(
            self.engine.https,
            &self.roots,
            method,
            &format!("/v1/{path}"),
            token,
            body.as_deref(),
        )
        .await
    }

    async fn root_call(&self, method: &str, path: &str, body: Value) -> Result<Value> {
        let (code, reply) = self.call(method, path, Some(&self.root), Some(body)).await?;
        ensure!((200..300).contains(&code), "{method} {path}: {code} {reply}");
        Ok(reply)
    }

    async fn kv_put(&self, path: &str, data: Value) -> Result<()> {
        self.root_call("POST", &format!("secret/data/{path}"), json!({ "data": data }))
            .await
            .map(drop)
    }

    fn apply(&self, yaml: &str) -> Result<()> {
        let (ok, out) = kubectl_stdin(&["apply", "-n", &self.ns.name, "-f", "-"], yaml);
        ensure!(ok, "{out}");
        Ok(())
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    async fn wait_value(&self, name: &str, key: &str, value: &str, within: Duration) -> Result<()> {
        let secrets = self.secrets();
        eventually(within, &format!("Secret {name} to hold {key}={value}"), || {
            let secrets = secrets.clone();
            async move {
                let secret = secrets.get_opt(name).await.ok()??;
                (secret.data.as_ref()?.get(key)?.0 == value.as_bytes()).then_some(())
            }
        })
        .await
    }

    /// The lease record of SecretSync `db` (JSON).
    async fn record_text(&self) -> Result<String> {
        let record = self.secrets().get("db-capstan-lease").await?;
        let data = record.data.context("the record has data")?;
        Ok(String::from_utf8(
            data.get("leases.json").context("leases.json")?.0.clone(),
        )?)
    }

    /// The PostgreSQL roles the engine created for database role `app` and that still
    /// exist, sorted.
    async fn live_roles(&self, pg: &Postgres) -> Result<Vec<String>> {
        let ca = std::fs::read(pg.ca_file())?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
            roots.add(cert?)?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(pg.port)
            .user(ADMIN_USER)
            .password(&pg.admin_password)
            .dbname("postgres")
            .ssl_mode(tokio_postgres::config::SslMode::Require);
        let (client, connection) = config
            .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
            .await?;
        tokio::spawn(connection);
        let rows = client
            .query(
                "SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, $1) ORDER BY 1",
                &[&ROLE_PREFIX],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

use rustls::pki_types::pem::PemObject as _;

/// A capstan-controller process as the chart's ServiceAccount, with the short Lease of
/// these tests, the test's engine, and the test-only fault point when asked.
async fn controller(
    client: &Client,
    identity: &str,
    engine_url: &str,
    pause_at: Option<&str>,
) -> Result<ControllerProcess> {
    let env: Vec<(&str, &str)> = pause_at.map(|point| (PAUSE_AT_ENV, point)).into_iter().collect();
    ControllerProcess::start_with_env(client, identity, TIMINGS, &["--engine-url", engine_url], &env).await
}

async fn wait_for_holder(client: &Client, identity: &str) -> Result<()> {
    eventually(
        Duration::from_secs(20),
        &format!("{identity} to hold the lease"),
        || async { (lease_holder(client).await.as_deref() == Some(identity)).then_some(()) },
    )
    .await
}
