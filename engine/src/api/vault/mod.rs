//! The Vault-compatible HTTP API (`/v1/...`): Vault's paths, methods and JSON, so
//! existing Vault clients work unchanged for what the engine has. Every request goes
//! through the same layers (`pipeline`): path check, seal, authentication, ACL, audit,
//! and the mount's handler; each mount (`mounts`) declares its own unauthenticated paths,
//! named routes and existence check. This module holds what the handlers share: the
//! request, the reply and the error in Vault's shapes.

mod auth;
mod database;
mod kv;
mod mounts;
mod pipeline;
mod pki;
mod route;
mod sys;

pub use sys::{after_unseal, root_token};

use crate::{
    api::audit::{Audit, AuthInfo},
    auth::kubernetes::KubernetesAuth,
    auth::token::{TokenEntry, TokenError, Tokens},
    policy::Capability,
    policy::store::Policies,
    secrets::database::Database,
    secrets::kv::Kv,
    secrets::lease::Leases,
    secrets::pki::Pki,
    store::logical::{Logical, LogicalError},
    store::seal::Seal,
};
use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use pipeline::{Pipeline, Raw};
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde_json::{Map, Value, json};
use std::{collections::HashMap, sync::Arc};
use tower::Service as _;

/// The largest request body (Vault's default max_request_size is 32 MiB; our storage
/// entries are far smaller).
pub const MAX_BODY: usize = 1024 * 1024;

/// Everything the API serves.
pub struct Engine {
    pub seal: Arc<Seal>,
    pub logical: Logical,
    pub tokens: Tokens,
    pub policies: Policies,
    pub kv: Kv,
    pub database: Database,
    pub leases: Leases,
    pub pki: Pki,
    pub kubernetes: KubernetesAuth,
    pub audit: Audit,
    pub metrics: Metrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub mount: String,
    pub operation: Operation,
    pub code: u16,
}

#[derive(Clone, Default)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub integrity_errors: Counter,
    pub audit_failures: Family<Vec<(String, String)>, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "secrets_requests",
            "Requests to the secrets API, by mount, operation and status code",
            metrics.requests.clone(),
        );
        registry.register(
            "barrier_integrity_errors",
            "Stored entries that failed the barrier's integrity check (tampering, truncation, moved ciphertext)",
            metrics.integrity_errors.clone(),
        );
        registry.register(
            "audit_failures",
            "Audit records a sink did not accept, by sink and reason",
            metrics.audit_failures.clone(),
        );
        metrics
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Operation {
    read,
    list,
    create,
    update,
    delete,
    patch,
}

impl Operation {
    fn capability(self) -> Capability {
        match self {
            Self::read => Capability::Read,
            Self::list => Capability::List,
            Self::create => Capability::Create,
            Self::update => Capability::Update,
            Self::delete => Capability::Delete,
            Self::patch => Capability::Patch,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::read => "read",
            Self::list => "list",
            Self::create => "create",
            Self::update => "update",
            Self::delete => "delete",
            Self::patch => "patch",
        }
    }
}

/// One API request, as the handlers see it.
pub struct Request {
    pub id: String,
    pub operation: Operation,
    /// Without `/v1/`; a LIST keeps its trailing slash.
    pub path: String,
    /// The name (or KV key, or lease id) `path` names, resolved once by `route::resolve`
    /// before the ACL judges `path`; handlers act on this and never re-parse the path.
    pub name: Option<String>,
    pub query: HashMap<String, String>,
    pub body: Map<String, Value>,
    /// The caller's token (absent on unauthenticated paths).
    pub token: Option<String>,
    pub entry: Option<Arc<TokenEntry>>,
    /// The caller's token has a use limit (`num_uses`). Not `entry.num_uses > 0`: the
    /// request spending the last use sees 0 uses left, which also means unlimited.
    pub use_limited: bool,
}

impl Request {
    /// The resolved name ("" when the route takes none).
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.body.get(key).and_then(Value::as_str)
    }

    /// A parameter that must be a non-empty string.
    fn required(&self, key: &str) -> Result<&str, ApiError> {
        self.str(key)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ApiError::bad_request(format!("missing required parameter: {key}")))
    }

    /// A list of strings, as Vault takes them: a JSON array or a comma-separated string
    /// (None when absent).
    fn list(&self, key: &str) -> Result<Option<Vec<String>>, ApiError> {
        match self.body.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(
                s.split(',')
                    .map(|p| p.trim().to_owned())
                    .filter(|p| !p.is_empty())
                    .collect(),
            )),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| ApiError::bad_request(format!("invalid {key}")))
                })
                .collect::<Result<_, _>>()
                .map(Some),
            Some(_) => Err(ApiError::bad_request(format!("invalid {key}"))),
        }
    }

    /// A duration in seconds from the first of `keys` present: a number of seconds or a
    /// string in Vault's grammar (`"90"`, `"90s"`, `"1.5h"`, `"7d"`; `""` is 0); 0 when none is.
    fn seconds(&self, keys: &[&str]) -> Result<u64, ApiError> {
        for key in keys {
            match self.body.get(*key) {
                None | Some(Value::Null) => continue,
                Some(Value::Number(n)) => {
                    return n
                        .as_u64()
                        .ok_or_else(|| ApiError::bad_request(format!("invalid {key}")));
                }
                Some(Value::String(s)) => {
                    return crate::auth::kubernetes::ttl_seconds(s).map_err(ApiError::bad_request);
                }
                Some(_) => return Err(ApiError::bad_request(format!("invalid {key}"))),
            }
        }
        Ok(0)
    }

    /// A boolean as Vault's framework takes one: JSON `true`/`false`, a number (0 is
    /// false), or a string as Go's `strconv.ParseBool` reads it (`vault write` sends every
    /// `key=value` as a string: `allow_subdomains=true` is `"true"`). Anything else is
    /// refused rather than read as the default.
    fn flag(&self, key: &str, default: bool) -> Result<bool, ApiError> {
        let invalid = || ApiError::bad_request(format!("invalid {key}: expected a boolean"));
        match self.body.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::Number(n)) => n.as_f64().map(|n| n != 0.0).ok_or_else(invalid),
            Some(Value::String(s)) => match s.as_str() {
                "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
                "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
                _ => Err(invalid()),
            },
            Some(_) => Err(invalid()),
        }
    }

    /// Who is asking, as the audit records show it.
    fn auth_info(&self) -> AuthInfo<'_> {
        AuthInfo {
            token: self.token.as_deref(),
            entry: self.entry.as_deref(),
        }
    }

    /// The caller's token entry; handlers behind authentication always have one.
    fn caller(&self) -> Result<&TokenEntry, ApiError> {
        self.entry.as_deref().ok_or_else(ApiError::denied)
    }
}

/// A successful answer.
pub struct Reply {
    status: StatusCode,
    body: Option<Value>,
}

impl Reply {
    fn envelope(data: Value, auth: Value) -> Value {
        json!({
            "request_id": uuid(),
            "lease_id": "",
            "renewable": false,
            "lease_duration": 0,
            "data": data,
            "wrap_info": null,
            "warnings": null,
            "auth": auth,
        })
    }

    /// 200 with `data` in Vault's response envelope.
    pub fn data(data: Value) -> Self {
        Self {
            status: StatusCode::OK,
            body: Some(Self::envelope(data, Value::Null)),
        }
    }

    /// 200 with an `auth` block (a token handed out).
    pub fn auth(auth: Value) -> Self {
        Self {
            status: StatusCode::OK,
            body: Some(Self::envelope(Value::Null, auth)),
        }
    }

    /// A body that is not the envelope (sys/init, sys/seal-status, sys/health).
    pub fn raw(status: StatusCode, body: Value) -> Self {
        Self {
            status,
            body: Some(body),
        }
    }

    /// Adds a warning to the envelope (Vault's `warnings`), e.g. a TTL that was capped.
    pub fn warn(mut self, warning: String) -> Self {
        if let Some(body) = self.body.as_mut() {
            match body["warnings"].as_array_mut() {
                Some(warnings) => warnings.push(json!(warning)),
                None => body["warnings"] = json!([warning]),
            }
        }
        self
    }

    /// The warning when a requested TTL was more than could be granted (V14).
    pub fn warn_if_capped(self, requested: u64, granted: i64) -> Self {
        // A second of slack: the grant is read back a moment after it was made.
        if requested > 0 && granted + 1 < requested as i64 {
            self.warn(format!(
                "TTL of \"{requested}s\" exceeded the effective max_ttl of \"{}s\"; TTL value is capped accordingly",
                granted.max(0)
            ))
        } else {
            self
        }
    }

    pub fn no_content() -> Self {
        Self {
            status: StatusCode::NO_CONTENT,
            body: None,
        }
    }
}

/// An error answer: `{"errors": [...]}`; messages never carry secret values.
#[derive(Clone, Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// A body other than `errors` (a KV read of a deleted version returns its metadata).
    body: Option<Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            body: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn denied() -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission denied")
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "")
    }

    pub fn sealed() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "Vault is sealed")
    }

    pub fn unsupported(path: &str, operation: Operation) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("unsupported operation {} on {path}", operation.as_str()),
        )
    }

    fn body(&self) -> Value {
        self.body.clone().unwrap_or_else(|| {
            if self.message.is_empty() {
                json!({ "errors": [] })
            } else {
                json!({ "errors": [self.message] })
            }
        })
    }
}

impl From<LogicalError> for ApiError {
    fn from(error: LogicalError) -> Self {
        match error {
            LogicalError::Sealed => Self::sealed(),
            LogicalError::Storage(crate::store::storage::StorageError::TooLarge { .. }) => {
                Self::bad_request(error.to_string())
            }
            LogicalError::Storage(crate::store::storage::StorageError::Conflict(_)) => Self::new(
                StatusCode::CONFLICT,
                "storage kept changing under this request; retry",
            ),
            LogicalError::Integrity { .. } => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "a stored entry failed its integrity check",
            ),
            other => {
                tracing::error!(error = %other, "Storage");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error (storage)")
            }
        }
    }
}

impl From<TokenError> for ApiError {
    fn from(error: TokenError) -> Self {
        match error {
            TokenError::Invalid => Self::denied(),
            TokenError::Request(message) => Self::bad_request(message),
            TokenError::Storage(e) => e.into(),
        }
    }
}

fn uuid() -> String {
    let bytes: [u8; 16] = rand::random();
    let mut hex = [0u8; 32];
    // Cannot fail: the buffer is exactly twice the input.
    let _ = hex::encode_to_slice(bytes, &mut hex);
    let mut out = String::with_capacity(36);
    for (i, range) in [0..8, 8..12, 12..16, 16..20, 20..32].into_iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        out.push_str(std::str::from_utf8(&hex[range]).unwrap_or_default());
    }
    out
}

fn respond(status: StatusCode, body: Option<Value>) -> Response {
    match body {
        Some(body) => (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_vec(&body).unwrap_or_default(),
        )
            .into_response(),
        None => status.into_response(),
    }
}

fn operation(method: &Method, query: &HashMap<String, String>) -> Option<Operation> {
    Some(match method.as_str() {
        "GET" if query.get("list").is_some_and(|v| v == "true") => Operation::list,
        "GET" => Operation::read,
        "LIST" => Operation::list,
        "POST" | "PUT" => Operation::update,
        "DELETE" => Operation::delete,
        "PATCH" => Operation::patch,
        _ => return None,
    })
}

fn parse_query(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (p.to_owned(), String::new()),
        })
        .collect()
}

fn mount_of(path: &str) -> String {
    let mut parts = path.split('/');
    match (parts.next(), parts.next()) {
        (Some(first @ ("sys" | "auth")), Some(second)) => format!("{first}/{second}"),
        (Some(first), _) => first.to_owned(),
        _ => String::new(),
    }
}

/// What the HTTP handler holds: the engine (for its metrics) and the request pipeline.
#[derive(Clone)]
struct Api {
    engine: Arc<Engine>,
    pipeline: Pipeline,
}

pub fn routes(engine: Arc<Engine>) -> Router {
    let pipeline = pipeline::pipeline();
    Router::new()
        .fallback(handle)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(Api { engine, pipeline })
}

async fn handle(
    State(Api { engine, mut pipeline }): State<Api>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(path) = uri.path().strip_prefix("/v1/") else {
        return respond(StatusCode::NOT_FOUND, Some(json!({"errors": ["no such path"]})));
    };
    let query = parse_query(&uri);
    let Some(operation) = operation(&method, &query) else {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            Some(json!({"errors": ["unsupported method"]})),
        );
    };
    let mount = mount_of(path);
    let raw = Raw {
        engine: engine.clone(),
        operation,
        path: path.to_owned(),
        query,
        headers,
        body,
    };
    let (status, body) = match pipeline.call(raw).await {
        Ok(reply) => (reply.status, reply.body),
        Err(error) => (error.status, Some(error.body())),
    };
    engine
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            mount,
            operation,
            code: status.as_u16(),
        })
        .inc();
    respond(status, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_map_to_operations() {
        let list = HashMap::from([("list".to_owned(), "true".to_owned())]);
        let none = HashMap::new();
        assert_eq!(operation(&Method::GET, &list), Some(Operation::list));
        assert_eq!(operation(&Method::GET, &none), Some(Operation::read));
        assert_eq!(
            operation(&Method::from_bytes(b"LIST").unwrap(), &none),
            Some(Operation::list)
        );
        assert_eq!(operation(&Method::PUT, &none), Some(Operation::update));
        assert_eq!(operation(&Method::OPTIONS, &none), None);
    }

    #[test]
    fn uuids_look_like_uuids() {
        let id = uuid();
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
        assert!(id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()), "{id}");
        assert_ne!(uuid(), id);
    }

    #[test]
    fn mounts_for_metrics() {
        assert_eq!(mount_of("secret/data/x"), "secret");
        assert_eq!(mount_of("sys/policies/acl/x"), "sys/policies");
        assert_eq!(mount_of("auth/token/create"), "auth/token");
    }
}
