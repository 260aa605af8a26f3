//! `auth/token/*` and `auth/kubernetes/*`.

use super::{ApiError, Engine, Operation, Reply, Request, route::Tail};
use crate::{
    auth::kubernetes::{LoginError, RoleRequest},
    auth::token::{NewToken, TokenEntry},
    policy::store::canonical,
    store::clock::now,
};
use axum::http::StatusCode;
use serde_json::{Value, json};
use std::collections::BTreeMap;

impl From<LoginError> for ApiError {
    fn from(error: LoginError) -> Self {
        match error {
            LoginError::Invalid(message) => Self::bad_request(message),
            LoginError::Denied => Self::denied(),
            LoginError::Unavailable => Self::new(StatusCode::SERVICE_UNAVAILABLE, error.to_string()),
            LoginError::Storage(e) => e.into(),
            LoginError::Token(e) => e.into(),
            LoginError::Lease(e) => e.into(),
        }
    }
}

/// The `auth` block of a response that hands out `token`.
fn auth_block(token: &str, entry: &TokenEntry) -> Value {
    json!({
        "client_token": token,
        "accessor": entry.accessor,
        "policies": entry.policies,
        "token_policies": entry.policies,
        "metadata": entry.meta,
        "lease_duration": entry.ttl_left(now()),
        "renewable": entry.renewable,
        "entity_id": "",
        "token_type": "service",
        "orphan": entry.parent.is_none(),
        "num_uses": entry.num_uses,
    })
}

/// What `lookup` shows of a token (never its id, unless it is the caller's own).
fn lookup_data(entry: &TokenEntry, own: Option<&str>) -> Value {
    let time = |t: Option<i64>| {
        t.and_then(|s| jiff::Timestamp::from_second(s).ok())
            .map(|t| t.to_string())
    };
    json!({
        "id": own,
        "accessor": entry.accessor,
        "policies": entry.policies,
        "path": entry.path,
        "display_name": entry.display_name,
        "meta": if entry.meta.is_empty() { Value::Null } else { json!(entry.meta) },
        "creation_time": entry.creation_time,
        "creation_ttl": entry.ttl,
        "ttl": entry.ttl_left(now()),
        "expire_time": time(entry.expire_time),
        "explicit_max_ttl": 0,
        "renewable": entry.renewable,
        "orphan": entry.parent.is_none(),
        "num_uses": entry.num_uses,
        "type": "service",
        "entity_id": "",
    })
}

/// The token mount's routes take no name after a prefix (`route::resolve`).
pub const TOKEN_ROUTES: &[(&str, Tail)] = &[];
/// The Kubernetes auth mount's named routes (`route::resolve`).
pub const KUBERNETES_ROUTES: &[(&str, Tail)] = &[("role/", Tail::Name { lower: false })];

/// Logging in needs no token (it is how a workload gets one).
pub const KUBERNETES_UNAUTHENTICATED: &[&str] = &["login"];

pub async fn token(engine: &Engine, request: &Request, rest: &str) -> Result<Reply, ApiError> {
    let caller = request.caller()?;
    let own = request.token.as_deref().unwrap_or_default();
    let write = matches!(request.operation, Operation::update | Operation::create);
    match (rest, request.operation) {
        ("create" | "create-orphan", _) if write => {
            create(engine, request, caller, rest == "create-orphan").await
        }
        ("lookup-self", _) => Ok(Reply::data(lookup_data(caller, Some(own)))),
        ("lookup", _) if write => {
            let token = request.required("token")?;
            let entry = engine
                .tokens
                .lookup(token)
                .await
                .map_err(|_| ApiError::bad_request("bad token"))?;
            Ok(Reply::data(lookup_data(&entry, Some(token))))
        }
        ("lookup-accessor", _) if write => {
            let accessor = request.required("accessor")?;
            let entry = engine
                .tokens
                .lookup_accessor(accessor)
                .await
                .map_err(|_| ApiError::bad_request("invalid accessor"))?;
            Ok(Reply::data(lookup_data(&entry, None)))
        }
        ("renew-self", _) if write => {
            let entry = engine.tokens.renew(own, request.seconds(&["increment"])?).await?;
            Ok(Reply::auth(auth_block(own, &entry)))
        }
        ("renew", _) if write => {
            let token = request.required("token")?;
            let entry = engine
                .tokens
                .renew(token, request.seconds(&["increment"])?)
                .await?;
            Ok(Reply::auth(auth_block(token, &entry)))
        }
        ("revoke-self", _) if write => {
            revoke(engine, own).await?;
            Ok(Reply::no_content())
        }
        ("revoke", _) if write => {
            revoke(engine, request.required("token")?).await?;
            Ok(Reply::no_content())
        }
        ("revoke-accessor", _) if write => {
            engine
                .tokens
                .revoke_accessor(request.required("accessor")?)
                .await
                .or_else(|e| match e {
                    crate::auth::token::TokenError::Invalid => Ok(()),
                    other => Err(other),
                })?;
            Ok(Reply::no_content())
        }
        (_, op) => Err(ApiError::unsupported(&request.path, op)),
    }
}

/// Revokes a token (and its descendants) and the leases issued to it; leases of the
/// descendants follow within a second (the expiration loop sees their tokens gone).
async fn revoke(engine: &Engine, token: &str) -> Result<(), ApiError> {
    engine.tokens.revoke(token).await?;
    engine
        .leases
        .revoke_for_token(&crate::auth::token::hash(token))
        .await?;
    Ok(())
}

async fn create(
    engine: &Engine,
    request: &Request,
    parent: &TokenEntry,
    orphan: bool,
) -> Result<Reply, ApiError> {
    let root = parent.is_root();
    // A use-limited token cannot mint an unlimited one (Vault refuses it too); on its
    // last use it shows 0 uses left, as an unlimited one does, so the request says.
    if request.use_limited || parent.num_uses > 0 {
        return Err(ApiError::bad_request(
            "a token with a use limit (num_uses) cannot create tokens",
        ));
    }
    let num_uses = match request.body.get("num_uses") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| ApiError::bad_request("num_uses must be 0 or more"))?,
        Some(Value::String(s)) => s
            .trim()
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request("num_uses must be 0 or more"))?,
        Some(_) => return Err(ApiError::bad_request("num_uses must be 0 or more")),
    };
    let policies: Vec<String> = request
        .list("policies")?
        .unwrap_or_else(|| parent.policies.clone())
        .iter()
        .map(|p| canonical(p))
        .collect();
    // V22: root only from root (and `sys/init`), whatever the spelling (names are
    // canonical here). A token never grants more than its creator holds either.
    if !root && policies.iter().any(|p| p == "root") {
        return Err(ApiError::bad_request(
            "only a root token can create a token with the root policy",
        ));
    }
    if !root {
        if let Some(extra) = policies
            .iter()
            .find(|p| *p != "default" && !parent.policies.contains(p))
        {
            return Err(ApiError::bad_request(format!(
                "child policies must be subset of parent: {extra} is not held by the caller"
            )));
        }
        if orphan {
            return Err(ApiError::denied());
        }
    }
    let no_default = request.flag("no_default_policy", false)?;
    let mut policies = policies;
    if !no_default && !policies.iter().any(|p| p == "default" || p == "root") {
        policies.push("default".into());
    }
    let meta: BTreeMap<String, String> = match request.body.get("meta") {
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
            .collect(),
        _ => BTreeMap::new(),
    };
    let no_parent = orphan || request.flag("no_parent", false)?;
    if no_parent && !root {
        return Err(ApiError::denied());
    }
    let wants_root = policies.iter().any(|p| p == "root");
    let requested_ttl = request.seconds(&["ttl", "period"])?;
    let (token, entry) = engine
        .tokens
        .create(
            NewToken {
                policies,
                parent: (!no_parent).then(|| parent.id_hash.clone()),
                path: request.path.clone(),
                display_name: request
                    .str("display_name")
                    .map_or_else(|| "token".to_owned(), |d| format!("token-{d}")),
                meta,
                ttl: requested_ttl,
                max_ttl: request.seconds(&["explicit_max_ttl"])?,
                renewable: request.flag("renewable", true)?,
                no_expiry: wants_root && root && request.seconds(&["ttl"])? == 0,
                num_uses,
                // A child of a pod's login is revoked with it, through the parent index.
                pod_uid: None,
            },
            (!no_parent).then_some(parent),
        )
        .await?;
    Ok(Reply::auth(auth_block(&token, &entry)).warn_if_capped(requested_ttl, entry.ttl as i64))
}

pub async fn kubernetes(engine: &Engine, request: &Request, rest: &str) -> Result<Reply, ApiError> {
    let op = request.operation;
    match (rest, op) {
        ("login", Operation::update | Operation::create) => {
            let role = request.required("role")?;
            let jwt = request.required("jwt")?;
            let (token, entry, _) = engine.kubernetes.login(&engine.tokens, role, jwt).await?;
            Ok(Reply::auth(auth_block(&token, &entry)))
        }
        // The controller calls this for each stopped pod that ran the agent (RELIABILITY
        // N2); the ACL grants it like any path (its chart policy grants only this one).
        ("revoke-pod", Operation::update | Operation::create) => {
            let pod_uid = request.required("pod_uid")?;
            if !crate::auth::token::valid_pod_uid(pod_uid) {
                return Err(ApiError::bad_request("pod_uid is not a pod UID"));
            }
            let done = crate::auth::kubernetes::revoke_pod(&engine.tokens, &engine.leases, pod_uid).await?;
            Ok(Reply::data(json!({
                "pod_uid": pod_uid,
                "revoked_tokens": done.tokens,
                "revoked_leases": done.leases,
            })))
        }
        ("role" | "role/", Operation::list) => {
            let keys = engine.kubernetes.list_roles().await?;
            if keys.is_empty() {
                return Err(ApiError::not_found());
            }
            Ok(Reply::data(json!({ "keys": keys })))
        }
        (rest, _) if rest.starts_with("role/") => {
            let name = request.name();
            match op {
                Operation::read => {
                    let role = engine
                        .kubernetes
                        .read_role(name)
                        .await?
                        .ok_or_else(ApiError::not_found)?;
                    Ok(Reply::data(serde_json::to_value(role).unwrap_or_default()))
                }
                Operation::create | Operation::update => {
                    let body: RoleRequest = serde_json::from_value(Value::Object(request.body.clone()))
                        .map_err(|e| ApiError::bad_request(e.to_string()))?;
                    engine.kubernetes.write_role(name, body).await?;
                    Ok(Reply::no_content())
                }
                Operation::delete => {
                    engine.kubernetes.delete_role(name).await?;
                    Ok(Reply::no_content())
                }
                op => Err(ApiError::unsupported(&request.path, op)),
            }
        }
        (_, op) => Err(ApiError::unsupported(&request.path, op)),
    }
}
