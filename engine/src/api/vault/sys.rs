//! `sys/`: init, seal and unseal (answered sealed or not), health, keyring rotation,
//! ACL policies, capabilities and the audit hash.

use super::{ApiError, Engine, Operation, Reply, Request, mounts::Access, route::Tail};
use crate::{
    auth::token::{NewToken, Tokens},
    policy::store::PolicyStoreError,
    secrets::lease::LeaseError,
    store::logical::Logical,
    store::seal::{Seal, SealError},
};
use axum::http::StatusCode;
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use serde_json::{Value, json};
use std::sync::Arc;

impl From<SealError> for ApiError {
    fn from(error: SealError) -> Self {
        match error {
            SealError::Sealed => Self::sealed(),
            SealError::NotInitialized => Self::bad_request("Vault is not initialized"),
            SealError::AlreadyInitialized => Self::bad_request("Vault is already initialized"),
            SealError::AlreadyUnsealed => Self::bad_request("Vault is already unsealed"),
            SealError::Share(e) => Self::bad_request(e.to_string()),
            SealError::WrongKey => Self::bad_request(error.to_string()),
            SealError::Storage(e) => crate::store::logical::LogicalError::Storage(e).into(),
            other => {
                tracing::error!(error = %other, "Seal");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error (seal)")
            }
        }
    }
}

impl From<PolicyStoreError> for ApiError {
    fn from(error: PolicyStoreError) -> Self {
        match error {
            PolicyStoreError::Storage(e) => e.into(),
            other => Self::bad_request(other.to_string()),
        }
    }
}

fn status_json(status: &crate::store::seal::SealStatus) -> Value {
    serde_json::to_value(status).unwrap_or_default()
}

/// A share as users hold it: hex (as `keys`) or base64 (as `keys_base64`).
fn decode_share(key: &str) -> Result<Vec<u8>, ApiError> {
    let key = key.trim();
    if !key.is_empty() && key.len().is_multiple_of(2) && key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return hex::decode(key).map_err(|_| ApiError::bad_request("invalid key"));
    }
    B64.decode(key)
        .map_err(|_| ApiError::bad_request("invalid key: neither hex nor base64"))
}

fn small(request: &Request, key: &str) -> Result<Option<u8>, ApiError> {
    match request.body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u8::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("{key} must be a number from 1 to 255"))),
    }
}

/// The routes with a name or a path after a fixed prefix (`route::resolve`).
pub const ROUTES: &[(&str, Tail)] = &[
    ("policies/acl/", Tail::Name { lower: true }),
    ("policy/", Tail::Name { lower: true }),
    ("audit-hash/", Tail::Name { lower: false }),
    ("leases/", Tail::Path),
    ("internal/ui/mounts/", Tail::Lookup),
];

/// Vault's unauthenticated sys paths, answered sealed or not (and not audited); the
/// paths that need `sudo` besides the operation's capability; and
/// `sys/internal/ui/mounts/<path>`, Vault's unauthenticated-then-checked path: it needs a
/// valid token, and its handler checks the token's access to the mount (`ui_mount`).
pub fn access(rest: &str, operation: Operation) -> Access {
    if is_open(rest) {
        return Access::Open;
    }
    if operation == Operation::read && rest.starts_with("internal/ui/mounts/") {
        return Access::Token;
    }
    let sudo = matches!(rest, "seal" | "rotate")
        || rest.starts_with("audit-hash/")
        || rest.starts_with("leases/revoke-prefix/")
        || rest.starts_with("leases/revoke-force/");
    Access::Acl { sudo }
}

fn is_open(rest: &str) -> bool {
    matches!(rest, "init" | "seal-status" | "unseal" | "health" | "leader")
}

async fn unauthenticated(engine: &Engine, request: &Request) -> Result<Reply, ApiError> {
    match (request.path.as_str(), request.operation) {
        ("sys/seal-status", Operation::read) => Ok(Reply::raw(
            StatusCode::OK,
            status_json(&engine.seal.status().await?),
        )),
        ("sys/init", Operation::read) => Ok(Reply::raw(
            StatusCode::OK,
            json!({ "initialized": engine.seal.is_initialized().await? }),
        )),
        ("sys/init", Operation::update) => init(engine, request).await,
        ("sys/unseal", Operation::update) => unseal(engine, request).await,
        ("sys/health", Operation::read) => {
            let status = engine.seal.status().await?;
            let code = if !status.initialized {
                StatusCode::NOT_IMPLEMENTED
            } else if status.sealed {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            Ok(Reply::raw(
                code,
                json!({
                    "initialized": status.initialized,
                    "sealed": status.sealed,
                    "standby": false,
                    "performance_standby": false,
                    "version": status.version,
                    "server_time_utc": jiff::Timestamp::now().as_second(),
                }),
            ))
        }
        // Vault's answer without HA (sys/leader checks HA before the seal): every
        // replica serves reads and writes over the shared storage, none leads.
        ("sys/leader", Operation::read) => Ok(Reply::raw(
            StatusCode::OK,
            json!({
                "ha_enabled": false,
                "is_self": false,
                "active_time": "0001-01-01T00:00:00Z",
                "leader_address": "",
                "leader_cluster_address": "",
                "performance_standby": false,
                "performance_standby_last_remote_wal": 0,
            }),
        )),
        (path, operation) => Err(ApiError::unsupported(path, operation)),
    }
}

/// Whether a JSON value says "none": what Vault's Go client sends for every field of
/// `InitRequest` the user did not set (`"root_token_pgp_key": ""`, `"pgp_keys": null`,
/// `"stored_shares": 0`).
fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(items) => items.iter().all(is_empty),
        Value::Object(map) => map.is_empty(),
    }
}

async fn init(engine: &Engine, request: &Request) -> Result<Reply, ApiError> {
    // Empty means none; only a value that asks for the feature is refused.
    for unsupported in [
        "pgp_keys",
        "root_token_pgp_key",
        "recovery_shares",
        "recovery_threshold",
        "recovery_pgp_keys",
        "stored_shares",
    ] {
        if request.body.get(unsupported).is_some_and(|v| !is_empty(v)) {
            return Err(ApiError::bad_request(format!("{unsupported} is not supported")));
        }
    }
    let shares = small(request, "secret_shares")?.unwrap_or(5);
    let threshold = small(request, "secret_threshold")?.unwrap_or(3);
    let initialized = engine.seal.init(shares, threshold, false).await?;
    let root_token = root_token(engine.logical.backend().clone(), initialized.keyring.clone()).await?;
    Ok(Reply::raw(
        StatusCode::OK,
        json!({
            "keys": initialized.shares.iter().map(hex::encode).collect::<Vec<_>>(),
            "keys_base64": initialized.shares.iter().map(|s| B64.encode(s)).collect::<Vec<_>>(),
            "root_token": root_token,
        }),
    ))
}

/// Writes the initial root token with the keyring `init` just made.
pub async fn root_token(
    backend: Arc<dyn crate::store::storage::Backend>,
    keyring: Arc<crate::store::barrier::Keyring>,
) -> Result<String, ApiError> {
    let seal = Arc::new(Seal::for_init(backend.clone(), keyring));
    let tokens = Tokens::new(Logical::new(backend, seal, Default::default()));
    let (token, _) = tokens
        .create(
            NewToken {
                policies: vec!["root".into()],
                path: "auth/token/root".into(),
                display_name: "root".into(),
                no_expiry: true,
                ..Default::default()
            },
            None,
        )
        .await?;
    Ok(token)
}

async fn unseal(engine: &Engine, request: &Request) -> Result<Reply, ApiError> {
    if request.body.get("reset").and_then(Value::as_bool) == Some(true) {
        engine.seal.reset();
        return Ok(Reply::raw(
            StatusCode::OK,
            status_json(&engine.seal.status().await?),
        ));
    }
    let key = request
        .str("key")
        .ok_or_else(|| ApiError::bad_request("missing required parameter: key"))?;
    let share = decode_share(key)?;
    let status = engine.seal.unseal(share).await?;
    if !status.sealed {
        after_unseal(engine).await;
    }
    Ok(Reply::raw(StatusCode::OK, status_json(&status)))
}

/// What needs the keyring once it is there: the audit HMAC key.
pub async fn after_unseal(engine: &Engine) {
    if let Err(error) = engine.audit.load_key(&engine.logical).await {
        tracing::error!(%error, "Loading the audit HMAC key");
    }
}

pub async fn route(engine: &Engine, request: &Request, rest: &str) -> Result<Reply, ApiError> {
    if is_open(rest) {
        return unauthenticated(engine, request).await;
    }
    let op = request.operation;
    match (rest, op) {
        ("seal", Operation::update | Operation::create) => {
            engine.seal.seal();
            engine.audit.forget_key();
            Ok(Reply::no_content())
        }
        ("rotate", Operation::update | Operation::create) => {
            engine.seal.rotate().await?;
            Ok(Reply::no_content())
        }
        ("key-status", Operation::read) => {
            let keyring = engine.seal.keyring()?;
            let term = keyring.active_term();
            let installed = keyring
                .term_created(term)
                .and_then(|s| jiff::Timestamp::from_second(s as i64).ok())
                .map(|t| t.to_string())
                .unwrap_or_default();
            Ok(Reply::data(
                json!({ "term": term, "install_time": installed, "encryptions": keyring.encryptions() }),
            ))
        }
        ("policies/acl" | "policies/acl/", Operation::list) | ("policy", Operation::read) => {
            let names = engine.policies.list().await?;
            if rest == "policy" {
                return Ok(Reply::raw(
                    StatusCode::OK,
                    json!({ "policies": names, "keys": names, "data": { "policies": names, "keys": names } }),
                ));
            }
            Ok(Reply::data(json!({ "keys": names })))
        }
        (rest, _) if rest.starts_with("policies/acl/") || rest.starts_with("policy/") => {
            policy(engine, request, request.name(), rest.starts_with("policy/")).await
        }
        ("capabilities-self", Operation::update | Operation::create) => {
            let entry = request.caller()?;
            let acl = engine.policies.acl(&entry.policies).await?;
            let paths: Vec<String> = match request.body.get("paths").or_else(|| request.body.get("path")) {
                Some(Value::Array(items)) => items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
                Some(Value::String(s)) => vec![s.clone()],
                _ => return Err(ApiError::bad_request("missing required parameter: paths")),
            };
            let mut data = serde_json::Map::new();
            for path in &paths {
                let caps = acl.capabilities(path);
                let names: Vec<Value> = if caps.is_empty() {
                    vec![json!("deny")]
                } else {
                    caps.iter()
                        .map(|c| serde_json::to_value(c).unwrap_or_default())
                        .collect()
                };
                data.insert(path.clone(), Value::Array(names.clone()));
                if paths.len() == 1 {
                    data.insert("capabilities".into(), Value::Array(names));
                }
            }
            Ok(Reply::data(Value::Object(data)))
        }
        (rest, Operation::update | Operation::create) if rest.starts_with("audit-hash/") => {
            let input = request
                .str("input")
                .ok_or_else(|| ApiError::bad_request("missing required parameter: input"))?;
            let hash = engine
                .audit
                .hash(input)
                .ok_or_else(|| ApiError::bad_request("no audit device is enabled"))?;
            Ok(Reply::data(json!({ "hash": hash })))
        }
        (rest, Operation::read) if rest.starts_with("internal/ui/mounts/") => ui_mount(engine, request).await,
        (rest, _) if rest.starts_with("leases/") => leases(engine, request, request.name()).await,
        (path, op) => Err(ApiError::unsupported(&format!("sys/{path}"), op)),
    }
}

impl From<LeaseError> for ApiError {
    fn from(error: LeaseError) -> Self {
        match error {
            LeaseError::Storage(e) => e.into(),
            LeaseError::RevokeFailed(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
            other => Self::bad_request(other.to_string()),
        }
    }
}

/// `sys/leases/{lookup,renew,revoke,revoke-prefix/<p>,revoke-force/<p>}`; the lease id
/// comes in the body or, for renew and revoke, after the path.
async fn leases(engine: &Engine, request: &Request, rest: &str) -> Result<Reply, ApiError> {
    let write = matches!(request.operation, Operation::update | Operation::create);
    if !write {
        return Err(ApiError::unsupported(&request.path, request.operation));
    }
    let (action, suffix) = rest.split_once('/').unwrap_or((rest, ""));
    let id = || -> Result<String, ApiError> {
        request
            .str("lease_id")
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .or_else(|| (!suffix.is_empty()).then(|| suffix.to_owned()))
            .ok_or_else(|| ApiError::bad_request("missing required parameter: lease_id"))
    };
    match action {
        "lookup" => {
            let lease = engine.leases.lookup(&id()?).await?;
            let time = |t: i64| {
                jiff::Timestamp::from_second(t)
                    .map(|t| t.to_string())
                    .unwrap_or_default()
            };
            Ok(Reply::data(json!({
                "id": lease.id,
                "issue_time": time(lease.issue_time),
                "expire_time": time(lease.expire_time),
                "last_renewal": lease.last_renewal.map(time),
                "renewable": lease.renewable,
                "ttl": (lease.expire_time - crate::store::clock::now()).max(0),
                "irrevocable": lease.revoke.as_ref().is_some_and(|r| r.irrevocable),
                "revocation_attempts": lease.revoke.as_ref().map_or(0, |r| r.attempts),
            })))
        }
        "renew" => {
            let id = id()?;
            let increment = match request.body.get("increment") {
                None | Some(Value::Null) => 0,
                Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
                Some(Value::String(s)) => {
                    crate::auth::kubernetes::ttl_seconds(s).map_err(ApiError::bad_request)?
                }
                Some(_) => return Err(ApiError::bad_request("invalid increment")),
            };
            let lease = engine.leases.lookup(&id).await?;
            let crate::secrets::lease::LeaseSecret::Database { role, .. } = &lease.secret;
            let default_ttl = engine.database.role(role).await?.map_or(3600, |r| r.ttl());
            let renewed = engine.leases.renew(&id, increment, default_ttl).await?;
            let left = renewed.expire_time - crate::store::clock::now();
            let mut reply = Reply::data(Value::Null);
            if let Some(body) = reply.body.as_mut() {
                body["lease_id"] = json!(renewed.id);
                body["lease_duration"] = json!(left.max(0));
                body["renewable"] = json!(renewed.renewable);
            }
            Ok(reply.warn_if_capped(increment, left))
        }
        "revoke" => {
            engine.leases.revoke(&id()?, "revoked").await?;
            Ok(Reply::no_content())
        }
        "revoke-prefix" | "revoke-force" if !suffix.is_empty() => {
            engine
                .leases
                .revoke_prefix(suffix, action == "revoke-force")
                .await?;
            Ok(Reply::no_content())
        }
        _ => Err(ApiError::unsupported(&request.path, request.operation)),
    }
}

async fn policy(engine: &Engine, request: &Request, name: &str, legacy: bool) -> Result<Reply, ApiError> {
    match request.operation {
        Operation::read => {
            let text = engine
                .policies
                .read(name)
                .await?
                .ok_or_else(ApiError::not_found)?;
            let name = crate::policy::store::canonical(name);
            if legacy {
                return Ok(Reply::raw(
                    StatusCode::OK,
                    json!({ "name": name, "rules": text, "data": { "name": name, "rules": text } }),
                ));
            }
            Ok(Reply::data(json!({ "name": name, "policy": text })))
        }
        Operation::create | Operation::update => {
            // hvac sends a dict policy as a JSON string already; a JSON object is
            // accepted too (HCL is a superset of JSON).
            let text = match request.body.get("policy").or_else(|| request.body.get("rules")) {
                Some(Value::String(s)) => s.clone(),
                Some(other @ Value::Object(_)) => other.to_string(),
                _ => return Err(ApiError::bad_request("missing required parameter: policy")),
            };
            engine.policies.write(name, &text).await?;
            Ok(Reply::no_content())
        }
        Operation::delete => {
            engine.policies.delete(name).await?;
            Ok(Reply::no_content())
        }
        op => Err(ApiError::unsupported(&request.path, op)),
    }
}

/// `GET sys/internal/ui/mounts/<path>`: the mount `path` is under, as Vault's
/// pathInternalUIMountRead answers it (the vault CLI's `kv` commands ask it first, to
/// learn the mount and its KV version). Like Vault, a mount the token has no capability
/// anywhere under, and a path under no mount, get the same 403 (no probing for mounts).
/// The path's own ACL is not checked (Vault serves it unauthenticated, then checks the
/// token's access to the mount).
async fn ui_mount(engine: &Engine, request: &Request) -> Result<Reply, ApiError> {
    let path = request.name();
    let asked = if path.ends_with('/') {
        path.to_owned()
    } else {
        format!("{path}/")
    };
    let denied = || {
        ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "preflight capability check returned 403, please ensure client's policies grant access to path {asked:?}"
            ),
        )
    };
    let mut segments = asked.split('/');
    let first = segments.next().unwrap_or_default();
    let second = segments.next().unwrap_or_default();
    // The router's mount, the path as Vault shows it (auth mounts without `auth/`), the
    // type, the description and the options.
    let (mount, shown, kind, description, options) = match (first, second) {
        ("sys", _) => (
            "sys/".to_owned(),
            "sys/".to_owned(),
            "system",
            "system endpoints used for control, policy and debugging",
            Value::Null,
        ),
        ("auth", "token") => (
            "auth/token/".to_owned(),
            "token/".to_owned(),
            "token",
            "token based credentials",
            Value::Null,
        ),
        ("auth", "kubernetes") => (
            "auth/kubernetes/".to_owned(),
            "kubernetes/".to_owned(),
            "kubernetes",
            "",
            Value::Null,
        ),
        (m, _) if m == engine.kv.mount() => (
            format!("{m}/"),
            format!("{m}/"),
            "kv",
            "key/value secret storage",
            json!({ "version": "2" }),
        ),
        (m, _) if m == engine.database.mount() => {
            (format!("{m}/"), format!("{m}/"), "database", "", Value::Null)
        }
        (m, _) if m == engine.pki.mount() => (format!("{m}/"), format!("{m}/"), "pki", "", Value::Null),
        _ => return Err(denied()),
    };
    let entry = request.caller()?;
    let acl = engine.policies.acl(&entry.policies).await?;
    if !acl.has_mount_access(&mount) {
        return Err(denied());
    }
    // Vault makes these when mounting; here mounts are fixed, so they are derived from
    // the mount's path (the same on every replica and across restarts).
    let id = crate::auth::token::hash(&format!("mount:{mount}"));
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &id[0..8],
        &id[8..12],
        &id[12..16],
        &id[16..20],
        &id[20..32]
    );
    Ok(Reply::data(json!({
        "type": kind,
        "description": description,
        "accessor": format!("{kind}_{}", &id[32..40]),
        "local": false,
        "seal_wrap": false,
        "external_entropy_access": false,
        "options": options,
        "uuid": uuid,
        "plugin_version": "",
        "running_plugin_version": "",
        "running_sha256": "",
        "config": { "default_lease_ttl": 0, "max_lease_ttl": 0, "force_no_cache": false },
        "path": shown,
    })))
}
