//! The database secrets engine, PostgreSQL: a connection (its root credentials kept in
//! the barrier, rotatable so only the engine knows them), roles with creation,
//! renewal and revocation SQL, and credentials made on demand, each under a lease
//! (`crate::secrets::lease`): its own PostgreSQL role, valid until the lease's expiry, dropped at
//! revocation.

use crate::{
    secrets::named::Named,
    store::logical::{Logical, LogicalError},
    store::storage::Precondition,
};
mod tls;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::{collections::HashMap, str::FromStr as _, sync::Arc, time::Duration};

/// The only plugin there is.
pub const POSTGRES_PLUGIN: &str = "postgresql-database-plugin";

/// Revocation when a role gives none: end the role's sessions, then drop it, so a
/// revoked credential neither logs in nor keeps a session it already had.
pub const DEFAULT_REVOCATION: &str = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}'; DROP ROLE IF EXISTS \"{{name}}\";";
pub const DEFAULT_RENEW: &str = "ALTER ROLE \"{{name}}\" VALID UNTIL '{{expiration}}';";
pub const DEFAULT_ROTATION: &str = "ALTER ROLE \"{{username}}\" WITH PASSWORD '{{password}}';";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection, as stored (the password never leaves the barrier; reads omit it).
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Default)]
pub struct Connection {
    pub plugin_name: String,
    /// `postgresql://{{username}}:{{password}}@host:port/db?...`
    pub connection_url: String,
    pub username: String,
    pub password: String,
    /// A password being rotated in: written before the database changes, so a crash in
    /// between loses nothing (whichever of the two the database has, we know it).
    #[serde(default)]
    pub pending_password: Option<String>,
    pub allowed_roles: Vec<String>,
    #[serde(default)]
    pub root_rotation_statements: Vec<String>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("connection_url", &self.connection_url)
            .field("username", &self.username)
            .field("password", &"[redacted]")
            .finish()
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Role {
    pub db_name: String,
    pub creation_statements: Vec<String>,
    #[serde(default)]
    pub revocation_statements: Vec<String>,
    #[serde(default)]
    pub renew_statements: Vec<String>,
    /// Seconds (0: one hour).
    pub default_ttl: u64,
    /// Seconds (0: the system maximum, 32 days).
    pub max_ttl: u64,
}

impl Role {
    pub fn ttl(&self) -> u64 {
        if self.default_ttl == 0 {
            3600
        } else {
            self.default_ttl
        }
        .min(self.max())
    }

    pub fn max(&self) -> u64 {
        if self.max_ttl == 0 {
            crate::auth::token::MAX_TTL
        } else {
            self.max_ttl.min(crate::auth::token::MAX_TTL)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error("{0}")]
    Invalid(String),
    #[error("unknown role {0:?}")]
    UnknownRole(String),
    #[error("unknown database connection {0:?}")]
    UnknownConnection(String),
    #[error("role {role:?} is not allowed by connection {connection:?}")]
    NotAllowed { role: String, connection: String },
    /// The database refused or could not be reached. The text is PostgreSQL's error,
    /// which never contains the password we sent.
    #[error("database: {0}")]
    Backend(String),
    #[error(transparent)]
    Storage(#[from] LogicalError),
}

/// A credential just made.
pub struct Issued {
    pub connection: String,
    pub username: String,
    pub password: String,
    pub ttl: u64,
    pub max_ttl: u64,
}

/// Open clients by connection name, with the stored version they were opened for.
type Clients = Arc<Mutex<HashMap<String, (u64, Arc<tokio_postgres::Client>)>>>;

#[derive(Clone)]
pub struct Database {
    logical: Logical,
    mount: String,
    connections: Named,
    roles: Named,
    clients: Clients,
}

fn alnum(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..len)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// PostgreSQL's timestamp for VALID UNTIL.
pub fn expiration(unix: i64) -> String {
    jiff::Timestamp::from_second(unix)
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S+00").to_string())
        .unwrap_or_else(|_| "infinity".into())
}

fn render(statement: &str, name: &str, password: &str, expiration: &str) -> String {
    statement
        .replace("{{name}}", name)
        .replace("{{username}}", name)
        .replace("{{password}}", password)
        .replace("{{expiration}}", expiration)
}

impl Database {
    pub fn new(logical: Logical, mount: &str) -> Self {
        let mount = mount.trim_end_matches('/').to_owned();
        Self {
            connections: Named::new(logical.clone(), &mount, "config"),
            roles: Named::new(logical.clone(), &mount, "role"),
            logical,
            mount,
            clients: Arc::default(),
        }
    }

    pub fn mount(&self) -> &str {
        &self.mount
    }

    pub async fn connection(&self, name: &str) -> Result<Option<(Connection, u64)>, DatabaseError> {
        Ok(self
            .connections
            .get::<Connection>(name)
            .await?
            .map(|v| (v.value, v.version)))
    }

    /// Stores a connection, after checking it connects (unless `verify` is false).
    pub async fn write_connection(
        &self,
        name: &str,
        connection: Connection,
        verify: bool,
    ) -> Result<(), DatabaseError> {
        if !crate::store::storage::valid_name(name) {
            return Err(DatabaseError::Invalid(format!(
                "invalid connection name {name:?}"
            )));
        }
        if connection.plugin_name != POSTGRES_PLUGIN {
            return Err(DatabaseError::Invalid(format!(
                "plugin_name must be {POSTGRES_PLUGIN} (the only database plugin)"
            )));
        }
        if !connection.connection_url.starts_with("postgres://")
            && !connection.connection_url.starts_with("postgresql://")
        {
            return Err(DatabaseError::Invalid(
                "connection_url must be a postgresql:// URL".into(),
            ));
        }
        // A bad URL or an unreadable sslrootcert is refused now, verified or not
        // (connect refuses them too, before it dials).
        if verify {
            let client = connect(&connection, &connection.password).await?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| DatabaseError::Backend(e.to_string()))?;
        } else {
            config_for(&connection, &connection.password)?.1.connector()?;
        }
        self.connections.put(name, &connection).await?;
        self.clients.lock().remove(name);
        Ok(())
    }

    pub async fn delete_connection(&self, name: &str) -> Result<(), DatabaseError> {
        self.connections.delete(name).await?;
        self.clients.lock().remove(name);
        Ok(())
    }

    pub async fn list_connections(&self) -> Result<Vec<String>, DatabaseError> {
        Ok(self.connections.list().await?)
    }

    pub async fn role(&self, name: &str) -> Result<Option<Role>, DatabaseError> {
        Ok(self.roles.get::<Role>(name).await?.map(|v| v.value))
    }

    pub async fn write_role(&self, name: &str, role: Role) -> Result<(), DatabaseError> {
        if !crate::store::storage::valid_name(name) {
            return Err(DatabaseError::Invalid(format!("invalid role name {name:?}")));
        }
        if role.db_name.is_empty() {
            return Err(DatabaseError::Invalid("db_name is required".into()));
        }
        if role.creation_statements.iter().all(|s| s.trim().is_empty()) {
            return Err(DatabaseError::Invalid("creation_statements are required".into()));
        }
        if role.max_ttl > 0 && role.default_ttl > role.max_ttl {
            return Err(DatabaseError::Invalid(
                "default_ttl cannot be greater than max_ttl".into(),
            ));
        }
        self.roles.put(name, &role).await?;
        Ok(())
    }

    pub async fn delete_role(&self, name: &str) -> Result<(), DatabaseError> {
        Ok(self.roles.delete(name).await?)
    }

    pub async fn list_roles(&self) -> Result<Vec<String>, DatabaseError> {
        Ok(self.roles.list().await?)
    }

    /// A client for connection `name` (cached per stored version of the connection).
    async fn client(&self, name: &str) -> Result<Arc<tokio_postgres::Client>, DatabaseError> {
        let (connection, version) = self
            .connection(name)
            .await?
            .ok_or_else(|| DatabaseError::UnknownConnection(name.to_owned()))?;
        if let Some((v, client)) = self.clients.lock().get(name)
            && *v == version
            && !client.is_closed()
        {
            return Ok(client.clone());
        }
        let client = match connect(&connection, &connection.password).await {
            Ok(client) => client,
            // A rotation that stopped between the database and our bookkeeping.
            Err(error) => match &connection.pending_password {
                Some(pending) => connect(&connection, pending).await.map_err(|_| error)?,
                None => return Err(error),
            },
        };
        let client = Arc::new(client);
        self.clients
            .lock()
            .insert(name.to_owned(), (version, client.clone()));
        Ok(client)
    }

    async fn execute(&self, connection: &str, statements: &[String]) -> Result<(), DatabaseError> {
        let client = self.client(connection).await?;
        let sql = statements.join("\n");
        let result = tokio::time::timeout(CONNECT_TIMEOUT * 2, client.batch_execute(&sql)).await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => {
                if client.is_closed() {
                    self.clients.lock().remove(connection);
                }
                Err(DatabaseError::Backend(error.to_string()))
            }
            Err(_) => {
                self.clients.lock().remove(connection);
                Err(DatabaseError::Backend("timed out".into()))
            }
        }
    }

    /// Makes a credential for `role_name`, valid until now + the role's TTL.
    pub async fn issue(&self, role_name: &str) -> Result<Issued, DatabaseError> {
        let role = self
            .role(role_name)
            .await?
            .ok_or_else(|| DatabaseError::UnknownRole(role_name.to_owned()))?;
        let (connection, _) = self
            .connection(&role.db_name)
            .await?
            .ok_or_else(|| DatabaseError::UnknownConnection(role.db_name.clone()))?;
        let allowed = connection
            .allowed_roles
            .iter()
            .any(|r| r == "*" || r == role_name);
        if !allowed {
            return Err(DatabaseError::NotAllowed {
                role: role_name.to_owned(),
                connection: role.db_name.clone(),
            });
        }
        let short: String = role_name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(16)
            .collect::<String>()
            .to_lowercase();
        let username = format!("v-{short}-{}", alnum(20).to_lowercase());
        let password = alnum(32);
        let ttl = role.ttl();
        let expires = expiration(crate::store::clock::now() + ttl as i64);
        let statements: Vec<String> = role
            .creation_statements
            .iter()
            .map(|s| render(s, &username, &password, &expires))
            .collect();
        self.execute(&role.db_name, &statements).await?;
        let max_ttl = role.max();
        Ok(Issued {
            connection: role.db_name,
            username,
            password,
            ttl,
            max_ttl,
        })
    }

    pub async fn renew(
        &self,
        connection: &str,
        role_name: &str,
        username: &str,
        expire_time: i64,
    ) -> Result<(), DatabaseError> {
        let role = self.role(role_name).await?;
        let statements = role
            .map(|r| r.renew_statements)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| vec![DEFAULT_RENEW.to_owned()]);
        let expires = expiration(expire_time);
        let statements: Vec<String> = statements
            .iter()
            .map(|s| render(s, username, "", &expires))
            .collect();
        self.execute(connection, &statements).await
    }

    /// Drops the credential (idempotent: revoking twice is not an error).
    pub async fn revoke(
        &self,
        connection: &str,
        role_name: &str,
        username: &str,
    ) -> Result<(), DatabaseError> {
        let role = self.role(role_name).await?;
        let statements = role
            .map(|r| r.revocation_statements)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| vec![DEFAULT_REVOCATION.to_owned()]);
        let statements: Vec<String> = statements.iter().map(|s| render(s, username, "", "")).collect();
        self.execute(connection, &statements).await
    }

    /// Gives the connection's user a new password only the engine knows.
    pub async fn rotate_root(&self, name: &str) -> Result<(), DatabaseError> {
        let (mut connection, version) = self
            .connection(name)
            .await?
            .ok_or_else(|| DatabaseError::UnknownConnection(name.to_owned()))?;
        let password = alnum(32);
        connection.pending_password = Some(password.clone());
        let version = self
            .logical
            .put(
                &self.connections.path(name),
                &connection,
                Precondition::Version(version),
            )
            .await?;
        let statements: Vec<String> = if connection.root_rotation_statements.is_empty() {
            vec![DEFAULT_ROTATION.to_owned()]
        } else {
            connection.root_rotation_statements.clone()
        };
        let statements: Vec<String> = statements
            .iter()
            .map(|s| render(s, &connection.username, &password, ""))
            .collect();
        let client = connect(&connection, &connection.password).await?;
        client
            .batch_execute(&statements.join("\n"))
            .await
            .map_err(|e| DatabaseError::Backend(e.to_string()))?;
        connection.password = password;
        connection.pending_password = None;
        self.logical
            .put(
                &self.connections.path(name),
                &connection,
                Precondition::Version(version),
            )
            .await?;
        self.clients.lock().remove(name);
        tracing::info!(connection = %name, "Root credentials rotated");
        Ok(())
    }
}

fn config_for(
    connection: &Connection,
    password: &str,
) -> Result<(tokio_postgres::Config, tls::Settings), DatabaseError> {
    // The URL's placeholders are filled through the config, not the text, so a password
    // with URL syntax in it cannot change the URL's meaning.
    let url = connection
        .connection_url
        .replace("{{username}}", "placeholder")
        .replace("{{password}}", "placeholder");
    let (url, tls) = tls::split_url(&url)?;
    let mut config = tokio_postgres::Config::from_str(&url)
        .map_err(|e| DatabaseError::Invalid(format!("connection_url: {e}")))?;
    config.user(&connection.username);
    config.password(password);
    config.connect_timeout(CONNECT_TIMEOUT);
    config.ssl_mode(tls.ssl_mode());
    Ok((config, tls))
}

async fn connect(connection: &Connection, password: &str) -> Result<tokio_postgres::Client, DatabaseError> {
    let (config, tls) = config_for(connection, password)?;
    let (client, conn) = tokio::time::timeout(CONNECT_TIMEOUT, config.connect(tls.connector()?))
        .await
        .map_err(|_| DatabaseError::Backend("connecting timed out".into()))?
        .map_err(|e| DatabaseError::Backend(connect_error(&e)))?;
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            tracing::debug!(%error, "A database connection ended");
        }
    });
    Ok(client)
}

/// Why a connection failed, with its causes (a refused TLS certificate, pg_hba.conf's
/// verdict, a wrong password): tokio-postgres' own text is only "db error". Statements'
/// errors are not spelled out like this, since they could quote what was rendered in them.
fn connect_error(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    crate::mesh_ca::error_chain(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_rendered_with_generated_names_only() {
        let sql = render(
            "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
            "v-app-abc",
            "pw",
            &expiration(0),
        );
        assert_eq!(
            sql,
            "CREATE ROLE \"v-app-abc\" WITH LOGIN PASSWORD 'pw' VALID UNTIL '1970-01-01 00:00:00+00';"
        );
    }

    #[test]
    fn ttls_default_and_clamp() {
        let role = Role {
            default_ttl: 0,
            max_ttl: 600,
            ..Default::default()
        };
        assert_eq!((role.ttl(), role.max()), (600, 600));
        let role = Role::default();
        assert_eq!((role.ttl(), role.max()), (3600, crate::auth::token::MAX_TTL));
    }

    #[test]
    fn urls_with_placeholders_parse_and_passwords_stay_out_of_debug() {
        let connection = Connection {
            plugin_name: POSTGRES_PLUGIN.into(),
            connection_url: "postgresql://{{username}}:{{password}}@127.0.0.1:5432/postgres?sslmode=disable"
                .into(),
            username: "admin".into(),
            password: "p@ss:/word".into(),
            ..Default::default()
        };
        let (config, _) = config_for(&connection, &connection.password).unwrap();
        assert_eq!(config.get_user(), Some("admin"));
        assert!(!format!("{connection:?}").contains("p@ss"));
    }
}
