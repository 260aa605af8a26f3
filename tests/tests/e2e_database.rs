//! The database secrets engine against a real PostgreSQL server on loopback: credentials
//! that log in until their lease is revoked, expires, or its token goes; leases that
//! survive an engine restart; a database that is down when leases expire (V11); the
//! connection's root password rotated so only the engine knows it; the engine's wall clock
//! stepped an hour back and forward under libfaketime (V14); TLS to PostgreSQL checked
//! (the server takes TLS only: plain text and a server a foreign CA vouches for are refused).

use anyhow::{Context as _, Result, ensure};
use capstan_tests::{
    postgres::{ADMIN_USER, Postgres, foreign_ca_pem},
    secrets::{call, fresh_storage, init_and_unseal, lookup_self, roots, unseal},
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
    world_with_env(name, &[]).await
}

async fn world_with_env(name: &str, env: &[(&str, &str)]) -> Result<World> {
    let client = client().await;
    fresh_storage();
    let pg = Postgres::start().await?;
    let engine = EngineProcess::start_with_env(&client, name, &["--revoke-backoff-max", "1s"], env).await?;
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
    ensure!(
        renewed["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("capped")),
        "a capped renewal says so: {renewed}"
    );
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

/// libfaketime (Debian's `faketime`), preloaded into the engine: its wall clock follows an
/// offset in a file the test rewrites while it runs; the monotonic clock stays real.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// V14: the engine's wall clock steps an hour back (a lease and a token must still end on
/// time: nothing gets the hour) and then an hour forward (leases and tokens end early, which
/// fails closed; see engine/README.md).
#[tokio::test]
async fn wall_clock_jumps_never_extend_a_lease_or_a_token() -> Result<()> {
    ensure!(
        std::path::Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} is missing: hack/test.sh installs Debian's faketime"
    );
    let offset = std::env::temp_dir().join(format!("capstan-e2e-faketime-{:08x}.rc", rand::random::<u32>()));
    std::fs::write(&offset, "+0\n")?;
    let offset_file = offset.to_string_lossy().into_owned();
    let w = world_with_env(
        "clock",
        &[
            ("LD_PRELOAD", LIBFAKETIME),
            ("FAKETIME_TIMESTAMP_FILE", &offset_file),
            ("FAKETIME_NO_CACHE", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    )
    .await?;
    let token = |ttl: &'static str| {
        let w = &w;
        async move {
            let (code, reply) = w
                .call(
                    "POST",
                    "auth/token/create",
                    Some(json!({"policies": ["root"], "ttl": ttl})),
                )
                .await?;
            ensure!(code == 200, "{code} {reply}");
            Ok::<_, anyhow::Error>(
                reply["auth"]["client_token"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        }
    };
    let usable = |token: String| {
        let w = &w;
        async move { Some(lookup_self(&w.engine, &w.roots, &token).await.ok()? == 200) }
    };

    // A TTL above the maximum is capped, with a warning (V14).
    let (code, capped) = w
        .call(
            "POST",
            "auth/token/create",
            Some(json!({"policies": ["root"], "ttl": "100000h"})),
        )
        .await?;
    ensure!(
        code == 200
            && capped["auth"]["lease_duration"].as_i64() <= Some(768 * 3600)
            && capped["warnings"][0]
                .as_str()
                .is_some_and(|w| w.contains("capped")),
        "{code} {capped}"
    );

    // An hour back, just after a 3 s lease and an 8 s token were issued.
    let (_, user, password) = w.creds("short", None).await?;
    let short_token = token("8s").await?;
    let issued = Instant::now();
    std::fs::write(&offset, "-1h\n")?;
    ensure!(w.logs_in(&user, &password).await);
    ensure!(
        usable(short_token.clone()).await == Some(true),
        "the token works before it expires"
    );
    // The database's own VALID UNTIL runs on its clock, so the role's removal is the engine's.
    w.until_gone(
        &user,
        &password,
        Duration::from_secs(12),
        "the 3 s lease to be revoked after the step back",
    )
    .await?;
    eventually(
        Duration::from_secs(12),
        "the 8 s token to expire after the step back",
        || {
            let token = short_token.clone();
            async move { (usable(token).await == Some(false)).then_some(()) }
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", w.engine.logs()))?;
    let took = issued.elapsed();
    println!("after an hour's step back: the 3 s lease and the 8 s token ended within {took:?}");
    ensure!(took < Duration::from_secs(14), "{took:?}");

    // Leases and tokens issued while the clock is an hour behind also end on time.
    let (_, user, password) = w.creds("short", None).await?;
    w.until_gone(
        &user,
        &password,
        Duration::from_secs(12),
        "a lease issued after the step back to expire",
    )
    .await?;

    // An hour forward: an hour's lease and token end now (early, never late).
    let (_, user, password) = w.creds("app", None).await?;
    let hour_token = token("1h").await?;
    ensure!(w.logs_in(&user, &password).await);
    std::fs::write(&offset, "+1h\n")?;
    w.until_gone(
        &user,
        &password,
        Duration::from_secs(10),
        "the hour's lease to end after the step forward",
    )
    .await?;
    ensure!(
        usable(hour_token).await == Some(false),
        "a 1 h token outlived an hour's step forward"
    );
    let _ = std::fs::remove_file(&offset);
    Ok(())
}

/// The engine reaches PostgreSQL over TLS and checks who answers: every connection in
/// these tests is TLS (the server rejects plain text, so `sslmode=disable` fails), a CA
/// that did not issue the server's certificate is refused, and verify-ca with the right CA
/// works as verify-full does.
#[tokio::test]
async fn postgres_connections_are_tls_and_verified() -> Result<()> {
    let w = world("pgtls").await?;
    let config = |url: String| {
        json!({"plugin_name": "postgresql-database-plugin", "connection_url": url,
               "username": ADMIN_USER, "password": w.pg.admin_password, "allowed_roles": ["app"]})
    };
    let (code, body) = w
        .call(
            "POST",
            "database/config/plain",
            Some(config(w.pg.connection_url_with("sslmode=disable"))),
        )
        .await?;
    ensure!(
        code >= 400 && body.to_string().contains("no encryption"),
        "plain text reached the server: {code} {body}"
    );

    let foreign = std::env::temp_dir().join(format!(
        "capstan-e2e-foreign-ca-{:08x}.pem",
        rand::random::<u32>()
    ));
    std::fs::write(&foreign, foreign_ca_pem()?)?;
    for mode in ["verify-full", "verify-ca", "require"] {
        let url =
            w.pg.connection_url_with(&format!("sslmode={mode}&sslrootcert={}", foreign.display()));
        let (code, body) = w
            .call("POST", "database/config/foreign", Some(config(url)))
            .await?;
        ensure!(
            code >= 400 && body.to_string().contains("certificate"),
            "{mode} with a foreign CA: {code} {body}"
        );
    }
    let _ = std::fs::remove_file(&foreign);
    let (code, body) = w
        .call(
            "POST",
            "database/config/missing",
            Some(config(w.pg.connection_url_with(
                "sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem",
            ))),
        )
        .await?;
    ensure!(
        code == 400 && body.to_string().contains("sslrootcert"),
        "{code} {body}"
    );

    let url = w.pg.connection_url_with(&format!(
        "sslmode=verify-ca&sslrootcert={}",
        w.pg.ca_file().display()
    ));
    w.ok("POST", "database/config/pg", config(url)).await?;
    let (_, user, password) = w.creds("app", None).await?;
    ensure!(
        w.pg.login(&user, &password).await? == user,
        "a credential over verify-ca"
    );
    Ok(())
}

/// A server that asks the engine's user for a client certificate (pg_hba.conf's
/// `clientcert=verify-full`): without one, or with one from a CA the server does not
/// trust, the connection is refused with the reason; a missing key file is refused by
/// name; with `sslcert` and `sslkey` the engine connects and issues credentials.
#[tokio::test]
async fn a_client_certificate_is_presented_when_the_server_asks_for_one() -> Result<()> {
    let w = world("pgcert").await?;
    w.pg.require_client_certificate()?;
    let config = |query: String| {
        json!({"plugin_name": "postgresql-database-plugin",
               "connection_url": w.pg.connection_url_with(&query),
               "username": ADMIN_USER, "password": w.pg.admin_password, "allowed_roles": ["app"]})
    };
    let verified = format!("sslmode=verify-full&sslrootcert={}", w.pg.ca_file().display());
    let with_cert = |(cert, key): (std::path::PathBuf, std::path::PathBuf)| {
        format!("{verified}&sslcert={}&sslkey={}", cert.display(), key.display())
    };

    let (code, body) = w
        .call("POST", "database/config/nocert", Some(config(verified.clone())))
        .await?;
    ensure!(
        code >= 400 && body.to_string().contains("requires a valid client certificate"),
        "no client certificate: {code} {body}"
    );
    let (code, body) = w
        .call(
            "POST",
            "database/config/foreign",
            Some(config(with_cert(w.pg.client_certificate_files(true)))),
        )
        .await?;
    ensure!(
        code >= 400 && body.to_string().contains("UnknownCA"),
        "a client certificate from a foreign CA: {code} {body}"
    );
    let (cert, _) = w.pg.client_certificate_files(false);
    let (code, body) = w
        .call(
            "POST",
            "database/config/nokey",
            Some(config(with_cert((cert, "/nonexistent/client.key".into())))),
        )
        .await?;
    ensure!(
        code == 400 && body.to_string().contains("sslkey /nonexistent/client.key"),
        "a missing key file: {code} {body}"
    );

    w.ok(
        "POST",
        "database/config/pg",
        config(with_cert(w.pg.client_certificate_files(false))),
    )
    .await?;
    let (_, user, password) = w.creds("app", None).await?;
    ensure!(
        w.pg.login(&user, &password).await? == user,
        "a credential issued over a connection with a client certificate"
    );
    Ok(())
}
