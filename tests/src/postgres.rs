//! A real PostgreSQL server for the secrets engine's database tests: Debian's
//! postgresql package (hack/test.sh installs it), a fresh cluster in a temporary folder,
//! listening on a loopback port with password authentication over TLS only (a server
//! certificate from a CA made here; plain-text connections are rejected by pg_hba.conf, so
//! every login that works went over TLS), run as the `postgres` user (PostgreSQL refuses
//! to run as root). Dropping it stops the server and removes the data.

use anyhow::{Context as _, Result, bail};
use rustls::pki_types::pem::PemObject as _;
use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

/// The superuser the tests give the engine (it becomes the engine's connection user).
pub const ADMIN_USER: &str = "capstan_admin";

pub struct Postgres {
    pub port: u16,
    pub admin_password: String,
    dir: PathBuf,
    bin: PathBuf,
    /// TLS for the test's own logins, trusting this server's CA (made once).
    tls: tokio_postgres_rustls::MakeRustlsConnect,
}

/// A CA and a server certificate for 127.0.0.1 and localhost, PEM (cert, key, CA).
fn server_certificate() -> Result<(String, String, String)> {
    let (ca_pem, issuer) = new_ca("capstan e2e PostgreSQL CA")?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let server = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    let cert = server.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem(), ca_pem))
}

fn new_ca(name: &str) -> Result<(String, rcgen::Issuer<'static, rcgen::KeyPair>)> {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, name);
    let ca_cert = ca.self_signed(&ca_key)?;
    Ok((ca_cert.pem(), rcgen::Issuer::new(ca, ca_key)))
}

/// A client certificate for `user` (PostgreSQL compares its common name with the user
/// name) issued by `issuer`, PEM (cert, key).
fn client_certificate(issuer: &rcgen::Issuer<'_, rcgen::KeyPair>, user: &str) -> Result<(String, String)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(rcgen::DnType::CommonName, user);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    Ok((params.signed_by(&key, issuer)?.pem(), key.serialize_pem()))
}

/// Puts `rule` first in the cluster's pg_hba.conf (the first matching line decides).
fn prepend_hba_rule(data: &std::path::Path, rule: &str) -> Result<()> {
    let hba = data.join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba)?;
    std::fs::write(&hba, format!("{rule}\n{rules}"))?;
    Ok(())
}

/// A TLS connector for tokio-postgres that trusts the CA `ca_pem`.
fn client_tls(ca_pem: &str) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// A CA no server here uses (for the refusal tests).
pub fn foreign_ca_pem() -> Result<String> {
    Ok(new_ca("a foreign PostgreSQL CA")?.0)
}

fn bin_dir() -> Result<PathBuf> {
    let root = PathBuf::from("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(&root)
        .context("PostgreSQL is not installed (hack/test.sh installs Debian's postgresql)")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .context("no PostgreSQL server binaries under /usr/lib/postgresql")
}

/// Runs a PostgreSQL program as the postgres user when we are root.
fn as_postgres(program: &std::path::Path) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

impl Postgres {
    pub async fn start() -> Result<Self> {
        let bin = bin_dir()?;
        let dir = std::env::temp_dir().join(format!("capstan-e2e-pg-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir)?;
        let _ = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status();
        let port = crate::free_port().port();
        let admin_password = format!("pw{:016x}", rand::random::<u64>());
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, format!("{admin_password}\n"))?;
        let _ = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&pwfile)
            .status();
        let data = dir.join("data");
        let (cert, key, ca) = server_certificate()?;
        // The CA the server trusts for client certificates (only asked of ADMIN_USER, and
        // only after `require_client_certificate`), a certificate from it for ADMIN_USER,
        // and one for ADMIN_USER from a CA the server does not trust.
        let (client_ca, client_issuer) = new_ca("capstan e2e PostgreSQL client CA")?;
        let (client_cert, client_key) = client_certificate(&client_issuer, ADMIN_USER)?;
        let (foreign_cert, foreign_key) = client_certificate(&new_ca("a foreign client CA")?.1, ADMIN_USER)?;
        for (name, pem, mode) in [
            ("server.crt", &cert, 0o644),
            ("server.key", &key, 0o600),
            ("ca.pem", &ca, 0o644),
            ("client-ca.pem", &client_ca, 0o644),
            ("client.crt", &client_cert, 0o644),
            ("client.key", &client_key, 0o600),
            ("foreign-client.crt", &foreign_cert, 0o644),
            ("foreign-client.key", &foreign_key, 0o600),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, pem)?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
            let _ = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&path)
                .status();
        }
        let out = as_postgres(&bin.join("initdb"))
            .args(["-D"])
            .arg(&data)
            .args(["-U", ADMIN_USER, "--auth=scram-sha-256", "--pwfile"])
            .arg(&pwfile)
            .output()?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        // TLS only: a plain-text connection is rejected before authentication.
        prepend_hba_rule(&data, "hostnossl all all all reject")?;
        let tls = client_tls(&ca)?;
        let server = Self {
            port,
            admin_password,
            dir,
            bin,
            tls,
        };
        server.run_server()?;
        Ok(server)
    }

    fn run_server(&self) -> Result<()> {
        let data = self.dir.join("data");
        let out = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "30", "-o"])
            .arg(format!(
                "-p {} -h 127.0.0.1 -k {dir} -c ssl=on -c ssl_cert_file={dir}/server.crt -c ssl_key_file={dir}/server.key -c ssl_ca_file={dir}/client-ca.pem",
                self.port,
                dir = self.dir.display()
            ))
            .arg("start")
            .stdout(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "pg_ctl start failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        Ok(())
    }

    /// From now on ADMIN_USER must also present a client certificate from the server's
    /// client CA whose common name is its name (pg_hba.conf's `clientcert=verify-full`).
    pub fn require_client_certificate(&self) -> Result<()> {
        prepend_hba_rule(
            &self.dir.join("data"),
            &format!("hostssl all {ADMIN_USER} all scram-sha-256 clientcert=verify-full"),
        )?;
        self.pg_ctl(&["reload"])
    }

    /// ADMIN_USER's client certificate and key files: from the CA the server trusts, or
    /// (`foreign`) from another one.
    pub fn client_certificate_files(&self, foreign: bool) -> (PathBuf, PathBuf) {
        let prefix = if foreign { "foreign-client" } else { "client" };
        (
            self.dir.join(format!("{prefix}.crt")),
            self.dir.join(format!("{prefix}.key")),
        )
    }

    /// Stops the server (fast: sessions are ended), keeping its data.
    pub fn stop(&self) -> Result<()> {
        self.pg_ctl(&["-w", "-m", "fast", "stop"])
    }

    /// Runs `pg_ctl -D <data> ARGS` as the postgres user.
    fn pg_ctl(&self, args: &[&str]) -> Result<()> {
        let out = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(args)
            .stdout(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "pg_ctl {} failed: {}",
                args.last().unwrap_or(&""),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts it again after `stop`.
    pub fn restart(&self) -> Result<()> {
        self.run_server()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// The URL the engine's connection config takes (Vault's template form): TLS with
    /// the server's certificate checked against this server's CA, host name included.
    pub fn connection_url(&self) -> String {
        self.connection_url_with(&format!(
            "sslmode=verify-full&sslrootcert={}",
            self.ca_file().display()
        ))
    }

    /// The URL with other query parameters (e.g. `sslmode=disable`, another CA).
    pub fn connection_url_with(&self, query: &str) -> String {
        format!(
            "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/postgres?{query}",
            self.port
        )
    }

    /// The CA that issued the server's certificate (PEM file).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Logs in as `user` and runs `SELECT current_user`: Ok only if the database let
    /// that user in.
    pub async fn login(&self, user: &str, password: &str) -> Result<String> {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(user)
            .password(password)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5))
            .ssl_mode(tokio_postgres::config::SslMode::Require);
        let (client, connection) = config.connect(self.tls.clone()).await?;
        tokio::spawn(connection);
        let row = client.query_one("SELECT current_user::text", &[]).await?;
        Ok(row.get(0))
    }

    /// Whether a role exists (as the admin sees it).
    pub async fn role_exists(&self, role: &str) -> Result<bool> {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(ADMIN_USER)
            .password(&self.admin_password)
            .dbname("postgres")
            .ssl_mode(tokio_postgres::config::SslMode::Require);
        let (client, connection) = config.connect(self.tls.clone()).await?;
        tokio::spawn(connection);
        let row = client
            .query_one("SELECT count(*) FROM pg_roles WHERE rolname = $1", &[&role])
            .await?;
        Ok(row.get::<_, i64>(0) == 1)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
