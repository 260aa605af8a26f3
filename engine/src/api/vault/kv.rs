//! The KV v2 mount's paths: `data/`, `metadata/`, `delete/`, `undelete/`, `destroy/`,
//! `config`.

use super::{ApiError, Engine, Operation, Reply, Request, route::Tail};
use crate::secrets::kv::{KvError, MountConfig, Read, WriteOptions};
use axum::http::StatusCode;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

impl From<KvError> for ApiError {
    fn from(error: KvError) -> Self {
        match error {
            KvError::Storage(e) => e.into(),
            other => Self::bad_request(other.to_string()),
        }
    }
}

/// The routes with a key after a prefix (`route::resolve`).
pub const ROUTES: &[(&str, Tail)] = &[
    ("data/", Tail::Path),
    ("metadata/", Tail::Path),
    ("delete/", Tail::Path),
    ("undelete/", Tail::Path),
    ("destroy/", Tail::Path),
];

/// Whether a create-or-update on `rest` (below the mount) targets something that exists
/// (None: not a data path, so a write is an update, as in Vault). Vault's ACL tells
/// `create` from `update` by this.
pub async fn exists(engine: &Engine, rest: &str) -> Result<Option<bool>, ApiError> {
    let Some(key) = rest.strip_prefix("data/") else {
        return Ok(None);
    };
    Ok(Some(engine.kv.exists(key).await.unwrap_or(false)))
}

fn versions(request: &Request) -> Result<Vec<u64>, ApiError> {
    match request.body.get("versions") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                    .ok_or_else(|| ApiError::bad_request("versions must be numbers"))
            })
            .collect(),
        Some(Value::String(s)) => s
            .split(',')
            .map(|p| {
                p.trim()
                    .parse()
                    .map_err(|_| ApiError::bad_request("versions must be numbers"))
            })
            .collect(),
        _ => Err(ApiError::bad_request("no version number provided")),
    }
}

fn metadata_reply(metadata: &crate::secrets::kv::VersionMetadata) -> Value {
    serde_json::to_value(metadata).unwrap_or_default()
}

pub async fn route(engine: &Engine, request: &Request, rest: &str) -> Result<Reply, ApiError> {
    let kv = &engine.kv;
    let op = request.operation;
    let write = matches!(op, Operation::create | Operation::update);
    if rest == "config" {
        return match op {
            Operation::read => Ok(Reply::data(
                serde_json::to_value(kv.config().await?).unwrap_or_default(),
            )),
            _ if write => {
                let mut config = kv.config().await?;
                if let Some(m) = request.body.get("max_versions").and_then(Value::as_u64) {
                    config.max_versions = m;
                }
                if request.body.contains_key("cas_required") {
                    config.cas_required = request.flag("cas_required", config.cas_required)?;
                }
                if let Some(d) = request.str("delete_version_after") {
                    config.delete_version_after = d.to_owned();
                }
                kv.set_config(MountConfig { ..config }).await?;
                Ok(Reply::no_content())
            }
            op => Err(ApiError::unsupported(&request.path, op)),
        };
    }
    let section = rest.split_once('/').map_or(rest, |(section, _)| section);
    let key = request.name();
    match (section, op) {
        ("data", Operation::read) => {
            let version = request
                .query
                .get("version")
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| ApiError::bad_request("invalid version"))
                })
                .transpose()?;
            match kv.read(key, version).await? {
                Read::Missing => Err(ApiError::not_found()),
                Read::Found {
                    data: Some(data),
                    metadata,
                } => Ok(Reply::data(json!({
                    "data": data,
                    "metadata": metadata_reply(&metadata),
                }))),
                // Vault answers a deleted or destroyed version with 404 and its metadata.
                Read::Found { data: None, metadata } => Err(ApiError {
                    status: StatusCode::NOT_FOUND,
                    message: String::new(),
                    body: Some(json!({ "data": { "data": null, "metadata": metadata_reply(&metadata) } })),
                }),
            }
        }
        ("data", _) if write => {
            let data: Map<String, Value> = match request.body.get("data") {
                Some(Value::Object(map)) => map.clone(),
                _ => return Err(ApiError::bad_request("no data provided")),
            };
            let options: WriteOptions = match request.body.get("options") {
                Some(options @ Value::Object(_)) => serde_json::from_value(options.clone())
                    .map_err(|e| ApiError::bad_request(format!("invalid options: {e}")))?,
                _ => WriteOptions::default(),
            };
            let metadata = kv.write(key, data, options).await?;
            Ok(Reply::data(metadata_reply(&metadata)))
        }
        ("data", Operation::delete) => {
            kv.delete_latest(key).await?;
            Ok(Reply::no_content())
        }
        ("delete", _) if write => {
            kv.delete_versions(key, &versions(request)?).await?;
            Ok(Reply::no_content())
        }
        ("undelete", _) if write => {
            kv.undelete_versions(key, &versions(request)?).await?;
            Ok(Reply::no_content())
        }
        ("destroy", _) if write => {
            kv.destroy_versions(key, &versions(request)?).await?;
            Ok(Reply::no_content())
        }
        ("metadata", Operation::list) => {
            let keys = kv.list(key).await?;
            if keys.is_empty() {
                return Err(ApiError::not_found());
            }
            Ok(Reply::data(json!({ "keys": keys })))
        }
        ("metadata", Operation::read) => {
            let entry = kv.metadata(key).await?.ok_or_else(ApiError::not_found)?;
            Ok(Reply::data(entry.to_json()))
        }
        ("metadata", _) if write => {
            let custom: Option<BTreeMap<String, String>> = match request.body.get("custom_metadata") {
                Some(Value::Object(map)) => Some(
                    map.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
                        .collect(),
                ),
                _ => None,
            };
            kv.write_metadata(
                key,
                request.body.get("max_versions").and_then(Value::as_u64),
                request
                    .body
                    .contains_key("cas_required")
                    .then(|| request.flag("cas_required", false))
                    .transpose()?,
                request.str("delete_version_after").map(str::to_owned),
                custom,
            )
            .await?;
            Ok(Reply::no_content())
        }
        ("metadata", Operation::delete) => {
            kv.delete_metadata(key).await?;
            Ok(Reply::no_content())
        }
        (_, op) => Err(ApiError::unsupported(&request.path, op)),
    }
}
