//! The database mount's paths: `config/<name>`, `roles/<name>`, `creds/<role>`,
//! `rotate-root/<name>`.

use super::{ApiError, Engine, Operation, Reply, Request, route::Tail};
use crate::{
    secrets::database::{Connection, DatabaseError, Role},
    secrets::lease::{Lease, LeaseSecret, new_id},
    store::clock::now,
};
use axum::http::StatusCode;
use serde_json::{Value, json};

impl From<DatabaseError> for ApiError {
    fn from(error: DatabaseError) -> Self {
        match error {
            DatabaseError::Storage(e) => e.into(),
            DatabaseError::Backend(message) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, format!("database: {message}"))
            }
            other => Self::bad_request(other.to_string()),
        }
    }
}

/// The routes with a name after a prefix (`route::resolve`).
pub const ROUTES: &[(&str, Tail)] = &[
    ("config/", Tail::Name { lower: false }),
    ("roles/", Tail::Name { lower: false }),
    ("creds/", Tail::Name { lower: false }),
    ("rotate-root/", Tail::Name { lower: false }),
];

pub async fn route(engine: &Engine, request: &Request, rest: &str) -> Result<Reply, ApiError> {
    let db = &engine.database;
    let op = request.operation;
    let write = matches!(op, Operation::create | Operation::update);
    let section = rest.split_once('/').map_or(rest, |(section, _)| section);
    let name = request.name();
    // SQL statements: a list, or one string holding one statement (commas are SQL's).
    let statements = |key: &str| -> Result<Vec<String>, ApiError> {
        match request.body.get(key) {
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            _ => Ok(request.list(key)?.unwrap_or_default()),
        }
    };
    match (section, op) {
        ("config", Operation::list) => Ok(Reply::data(json!({ "keys": db.list_connections().await? }))),
        ("roles", Operation::list) => Ok(Reply::data(json!({ "keys": db.list_roles().await? }))),
        ("config", Operation::read) => {
            let (c, _) = db.connection(name).await?.ok_or_else(ApiError::not_found)?;
            Ok(Reply::data(json!({
                "plugin_name": c.plugin_name,
                "connection_details": { "connection_url": c.connection_url, "username": c.username },
                "allowed_roles": c.allowed_roles,
                "root_credentials_rotate_statements": c.root_rotation_statements,
            })))
        }
        ("config", _) if write => {
            let current = db.connection(name).await?.map(|(c, _)| c).unwrap_or_default();
            let text = |key: &str, old: String| request.str(key).map(str::to_owned).unwrap_or(old);
            let connection = Connection {
                plugin_name: text("plugin_name", current.plugin_name),
                connection_url: text("connection_url", current.connection_url),
                username: text("username", current.username),
                password: text("password", current.password),
                pending_password: None,
                allowed_roles: if request.body.contains_key("allowed_roles") {
                    request.list("allowed_roles")?.unwrap_or_default()
                } else {
                    current.allowed_roles
                },
                root_rotation_statements: if request.body.contains_key("root_rotation_statements") {
                    statements("root_rotation_statements")?
                } else {
                    current.root_rotation_statements
                },
            };
            let verify = request.flag("verify_connection", true)?;
            db.write_connection(name, connection, verify).await?;
            Ok(Reply::no_content())
        }
        ("config", Operation::delete) => {
            db.delete_connection(name).await?;
            Ok(Reply::no_content())
        }
        ("roles", Operation::read) => {
            let role = db.role(name).await?.ok_or_else(ApiError::not_found)?;
            Ok(Reply::data(serde_json::to_value(role).unwrap_or_default()))
        }
        ("roles", _) if write => {
            let role = Role {
                db_name: request.str("db_name").unwrap_or_default().to_owned(),
                creation_statements: statements("creation_statements")?,
                revocation_statements: statements("revocation_statements")?,
                renew_statements: statements("renew_statements")?,
                default_ttl: request.seconds(&["default_ttl"])?,
                max_ttl: request.seconds(&["max_ttl"])?,
            };
            db.write_role(name, role).await?;
            Ok(Reply::no_content())
        }
        ("roles", Operation::delete) => {
            db.delete_role(name).await?;
            Ok(Reply::no_content())
        }
        ("creds", Operation::read) => creds(engine, request, name).await,
        ("rotate-root", _) if write => {
            db.rotate_root(name).await?;
            Ok(Reply::no_content())
        }
        (_, op) => Err(ApiError::unsupported(&request.path, op)),
    }
}

async fn creds(engine: &Engine, request: &Request, role: &str) -> Result<Reply, ApiError> {
    let caller = request.caller()?;
    let issued = engine.database.issue(role).await?;
    let now = now();
    // A lease never outlives the token it was issued to.
    let token_end = caller.max_expire_time.unwrap_or(i64::MAX);
    let max_expire_time = (now + issued.max_ttl as i64).min(token_end);
    let lease = Lease {
        id: new_id(engine.database.mount(), role),
        issue_time: now,
        last_renewal: None,
        expire_time: (now + issued.ttl as i64).min(max_expire_time),
        max_expire_time,
        renewable: true,
        token_hash: Some(caller.id_hash.clone()),
        secret: LeaseSecret::Database {
            mount: engine.database.mount().to_owned(),
            config: issued.connection.clone(),
            role: role.to_owned(),
            username: issued.username.clone(),
        },
        revoke: None,
    };
    if let Err(error) = engine.leases.create(&lease).await {
        // Without its lease the credential would never be revoked: drop it now.
        let _ = engine
            .database
            .revoke(&issued.connection, role, &issued.username)
            .await;
        return Err(match error {
            crate::secrets::lease::LeaseError::Storage(e) => e.into(),
            other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        });
    }
    let mut reply = Reply::data(json!({ "username": issued.username, "password": issued.password }));
    if let Some(body) = reply.body.as_mut() {
        body["lease_id"] = json!(lease.id);
        body["lease_duration"] = json!(lease.expire_time - now);
        body["renewable"] = json!(true);
    }
    Ok(reply)
}
