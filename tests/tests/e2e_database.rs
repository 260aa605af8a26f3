//! The database secrets engine against a real PostgreSQL server on loopback: credentials
//! that log in until their lease is revoked, expires, or its token goes; leases that
//! survive an engine restart; a database that is down when leases expire (V11); the
//! connection's root password rotated so only the engine knows it.

use anyhow::{Context as _, Result, ensure};
use capstan_tests::{
    postgres::{ADMIN_USER, Postgres},
    secrets::{call, fresh_storage, init_and_unseal, roots, unseal},
    *,
};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

struct World {
    engine: EngineProcess,
    roots: String,
    root: String,
    keys: Vec<String>,
    pg: Postgres,
}

const CREATE: &str =
    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';";

async fn world(name: &str) -> Result<World> {
    let client = client().await;
    fresh_storage();
    let pg = Postgres::start().await?;
    let engine = EngineProcess::start(&client, name, &["--revoke-backoff-max", "1s"]).await?;
    let roots = roots(&client).await?;
    let (root, keys) = init_and_unseal(&engine, &roots).await?;
    let world = World {
        engine,
        roots,
        root,
        keys,
        pg,
    };
    world
        .ok(
            "POST",
            "database/config/pg",
            json!({
                "plugin_name": "postgresql-database-plugin",
                "connection_url": world.pg.connection_url(),
                "username": ADMIN_USER,
                "password": world.pg.admin_password,
                "allowed_roles": ["app", "short"],
            }),
        )
        .await?;
    world
        .ok(
            "POST",
            "database/roles/app",
            json!({"db_name": "pg", "creation_statements": [CREATE], "default_ttl": "1h", "max_ttl": "2h"}),
        )
        .await?;
    world
        .ok(
            "POST",
            "database/roles/short",
            json!({"db_name": "pg", "creation_statements": CREATE, "default_ttl": 3, "max_ttl": 5}),
        )
        .await?;
    Ok(world)
}

impl World {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
        call(&self.engine, &self.roots, method, path, Some(&self.root), body).await
    }

    async fn ok(&self, method: &str, path: &str, body: Value) -> Result<Value> {
        let (code, reply) = self.call(method, path, Some(body)).await?;
        ensure!(
            code == 200 || code == 204,
            "{method} {path}: {code} {reply}\n{}",
            self.engine.logs()
        );
        Ok(reply)
    }

    /// (lease id, username, password)
    async fn creds(&self, role: &str, token: Option<&str>) -> Result<(String, String, String)> {
        let (code, reply) = call(
            &self.engine,
            &self.roots,
            "GET",
            &format!("database/creds/{role}"),
            Some(token.unwrap_or(&self.root)),
            None,
        )
        .await?;
        ensure!(code == 200, "creds: {code} {reply}\n{}", self.engine.logs());
        let s = |v: &Value| v.as_str().map(str::to_owned).context("missing field");
        Ok((
            s(&reply["lease_id"])?,
            s(&reply["data"]["username"])?,
            s(&reply["data"]["password"])?,
        ))
    }

    async fn logs_in(&self, user: &str, password: &str) -> bool {
        self.pg.login(user, password).await.is_ok()
    }

    /// Waits until `user` can no longer log in and no longer exists.
    async fn until_gone(&self, user: &str, password: &str, within: Duration, what: &str) -> Result<Duration> {
        let started = Instant::now();
        eventually(within, what, || async {
            (!self.logs_in(user, password).await && !self.pg.role_exists(user).await.ok()?).then_some(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.engine.logs()))?;
        Ok(started.elapsed())
    }
}

#[tokio::test]
async fn credentials_log_in_until_revoked_expired_or_their_token_goes() -> Result<()> {
    let w = world("db").await?;

    // A credential logs in as itself; revoking its lease drops the role at once.
    let (lease, user, password) = w.creds("app", None).await?;
    ensure!(lease.starts_with("database/creds/app/"), "{lease}");
    ensure!(w.pg.login(&user, &password).await? == user);
    w.ok("PUT", "sys/leases/revoke", json!({"lease_id": lease}))
        .await?;
    ensure!(
        !w.logs_in(&user, &password).await,
        "a revoked credential still logs in"
    );
    ensure!(
        !w.pg.role_exists(&user).await?,
        "a revoked credential's role still exists"
    );

    // hvac, a real Vault client, reads a database credential.
    let roots_file =
        std::env::temp_dir().join(format!("capstan-e2e-db-roots-{:08x}.pem", rand::random::<u32>()));
    std::fs::write(&roots_file, &w.roots)?;
    let out = tokio::process::Command::new(repo_root().join(".cache/venv/bin/python"))
        .args([
            "-c",
            "import hvac, json, os; c = hvac.Client(url=os.environ['VAULT_ADDR'], verify=os.environ['VAULT_CACERT'], token=os.environ['VAULT_TOKEN']); \
             r = c.secrets.database.generate_credentials(name='app'); \
             print(json.dumps({'lease_id': r['lease_id'], 'lease_duration': r['lease_duration'], 'username': r['data']['username'], 'password': r['data']['password']}))",
        ])
        .env("VAULT_ADDR", format!("https://127.0.0.1:{}", w.engine.https.port()))
        .env("VAULT_CACERT", &roots_file)
        .env("VAULT_TOKEN", &w.root)
        .output()
        .await?;
    let _ = std::fs::remove_file(&roots_file);
    ensure!(
        out.status.success(),
        "hvac: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: Value = serde_json::from_slice(out.stdout.trim_ascii())?;
    let (user, password) = (
        read["username"].as_str().unwrap(),
        read["password"].as_str().unwrap(),
    );
    ensure!(read["lease_duration"].as_i64() > Some(3000), "{read}");
    ensure!(
        w.pg.login(user, password).await? == user,
        "hvac's credential logs in"
    );

    // Expiry: a 3 s lease is revoked by the engine within seconds of expiring.
    let (_, user, password) = w.creds("short", None).await?;
    ensure!(w.logs_in(&user, &password).await);
    let took = w
        .until_gone(
            &user,
            &password,
            Duration::from_secs(15),
            "the expired credential to be revoked",
        )
        .await?;
    println!("expired 3 s lease revoked {took:?} after issue");

    // Renewal is clamped at the max TTL and refused there (V14).
    let (lease, _, _) = w.creds("short", None).await?;
    let renewed = w
        .ok(
            "PUT",
            "sys/leases/renew",
            json!({"lease_id": lease, "increment": 3600}),
        )
        .await?;
    let duration = renewed["lease_duration"].as_i64().unwrap_or(-1);
    ensure!((0..=5).contains(&duration), "renewal past max TTL: {renewed}");
    let (code, body) = w
        .call(
            "PUT",
            "sys/leases/renew",
            Some(json!({"lease_id": lease, "increment": 60})),
        )
        .await?;
    ensure!(
        code == 400 && body.to_string().contains("max TTL"),
        "{code} {body}"
    );

    // A token's leases go with the token.
    let (code, child) = w
        .call(
            "POST",
            "auth/token/create",
            Some(json!({"policies": ["root"], "ttl": "1h"})),
        )
        .await?;
    ensure!(code == 200, "{child}");
    let child = child["auth"]["client_token"].as_str().unwrap().to_owned();
    let (_, user, password) = w.creds("app", Some(&child)).await?;
    ensure!(w.logs_in(&user, &password).await);
    let (code, _) = call(
        &w.engine,
        &w.roots,
        "POST",
        "auth/token/revoke-self",
        Some(&child),
        None,
    )
    .await?;
    ensure!(code == 204);
    w.until_gone(
        &user,
        &password,
        Duration::from_secs(10),
        "the revoked token's credential to go",
    )
    .await?;

    // revoke-prefix takes every lease under it.
    let a = w.creds("app", None).await?;
    let b = w.creds("app", None).await?;
    w.ok("PUT", "sys/leases/revoke-prefix/database/creds/app", json!({}))
        .await?;
    for (_, user, password) in [a, b] {
        ensure!(!w.logs_in(&user, &password).await, "revoke-prefix left {user}");
    }
    Ok(())
}

#[tokio::test]
async fn leases_survive_a_restart_and_a_database_outage_at_expiry() -> Result<()> {
    let client = client().await;
    let mut w = world("db-restart").await?;

    // An engine restart: a lease issued before it is still revoked at its expiry.
    let (_, user, password) = w.creds("short", None).await?;
    w.engine.kill();
    let engine = EngineProcess::start(&client, "db-restart-2", &["--revoke-backoff-max", "1s"]).await?;
    w.engine = engine;
    unseal(&w.engine, &w.roots, &w.keys).await?;
    w.until_gone(
        &user,
        &password,
        Duration::from_secs(20),
        "the lease from before the restart to be revoked",
    )
    .await?;

    // V11: the database is down when a lease expires: the lease is kept, retried, shown
    // irrevocable, and revoked once the database is back.
    let (lease, user, password) = w.creds("short", None).await?;
    w.pg.stop()?;
    let state = eventually(
        Duration::from_secs(40),
        "the lease to be reported irrevocable",
        || async {
            let (code, body) = w
                .call("PUT", "sys/leases/lookup", Some(json!({"lease_id": lease})))
                .await
                .ok()?;
            (code == 200 && body["data"]["irrevocable"] == true).then_some(body)
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", w.engine.logs()))?;
    ensure!(
        state["data"]["revocation_attempts"].as_u64() >= Some(6),
        "{state}"
    );
    // The gauge is refreshed by the expiration loop, every second.
    eventually(Duration::from_secs(5), "the irrevocable-leases gauge", || async {
        let metrics = w.engine.metrics().await.ok()?;
        (metric(&metrics, "capstan_engine_leases_irrevocable") >= Some(1.0)).then_some(())
    })
    .await?;
    w.pg.restart()?;
    w.until_gone(
        &user,
        &password,
        Duration::from_secs(20),
        "the irrevocable lease to be revoked once the database is back",
    )
    .await?;
    let (code, _) = w
        .call("PUT", "sys/leases/lookup", Some(json!({"lease_id": lease})))
        .await?;
    ensure!(code == 400, "the revoked lease is gone from the books");
    Ok(())
}

#[tokio::test]
async fn the_root_password_is_rotated_so_only_the_engine_knows_it() -> Result<()> {
    let w = world("db-rotate").await?;
    ensure!(w.logs_in(ADMIN_USER, &w.pg.admin_password).await);
    w.ok("POST", "database/rotate-root/pg", json!({})).await?;
    ensure!(
        !w.logs_in(ADMIN_USER, &w.pg.admin_password).await,
        "the old root password still works"
    );
    let (code, config) = w.call("GET", "database/config/pg", None).await?;
    ensure!(
        code == 200 && !config.to_string().contains("password\":\""),
        "{config}"
    );
    // The engine still works with the password only it knows.
    let (_, user, password) = w.creds("app", None).await?;
    ensure!(w.logs_in(&user, &password).await);
    ensure!(
        !w.engine.logs().contains(&password),
        "a credential in the engine's log"
    );
    Ok(())
}
