//! The Vault-compatible HTTP API (`/v1/...`): Vault's paths, methods and JSON, so
//! existing Vault clients work unchanged for what the engine has. Every request goes
//! through the same steps, in this order: path checks, the seal, authentication (a
//! token, except for the unauthenticated sys and login paths), the ACL of the token's
//! policies, the audit record of the request, the handler, the audit record of the
//! response. A request or response that cannot be audited fails (DESIGN decision 4).

mod auth;
mod database;
mod kv;
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
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde_json::{Map, Value, json};
use std::{collections::HashMap, sync::Arc};

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
    /// string (`"90"`, `"90s"`, `"1h"`); 0 when none is.
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
                    return crate::auth::kubernetes::parse_duration(s).map_err(ApiError::bad_request);
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
#[derive(Debug)]
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

/// Paths answered without a token, sealed or not.
fn is_unauthenticated_sys(path: &str) -> bool {
    matches!(
        path,
        "sys/init" | "sys/seal-status" | "sys/unseal" | "sys/health" | "sys/leader"
    )
}

/// Paths that need a token but also `sudo` on the path, as in Vault.
fn needs_sudo(path: &str) -> bool {
    matches!(path, "sys/seal" | "sys/rotate")
        || path.starts_with("sys/audit-hash/")
        || path.starts_with("sys/leases/revoke-prefix/")
        || path.starts_with("sys/leases/revoke-force/")
}

/// Refuses paths that could mean two things: `..` or `.` segments, empty segments,
/// backslashes, percent-encoding, control characters (the ACL and the handler must see
/// the same path; V20).
fn check_path(path: &str) -> Result<(), ApiError> {
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    let bad = trimmed.is_empty()
        || trimmed.split('/').any(|s| s.is_empty() || s == "." || s == "..")
        || path.contains(['\\', '%'])
        || path.chars().any(char::is_control);
    if bad {
        return Err(ApiError::bad_request(format!("invalid request path {path:?}")));
    }
    Ok(())
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

fn token_of(headers: &HeaderMap) -> Option<String> {
    if let Some(token) = headers.get("x-vault-token").and_then(|v| v.to_str().ok()) {
        return Some(token.trim().to_owned()).filter(|t| !t.is_empty());
    }
    crate::auth::kubernetes::tokenreview::bearer(
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()),
    )
    .ok()
    .map(str::to_owned)
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

pub fn routes(engine: Arc<Engine>) -> Router {
    Router::new()
        .fallback(handle)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(engine)
}

async fn handle(
    State(engine): State<Arc<Engine>>,
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
    let path = path.to_owned();
    let (status, body) = match serve(&engine, operation, &path, query, &headers, &body).await {
        Ok(reply) => (reply.status, reply.body),
        Err(error) => (error.status, Some(error.body())),
    };
    engine
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            mount: mount_of(&path),
            operation,
            code: status.as_u16(),
        })
        .inc();
    respond(status, body)
}

async fn serve(
    engine: &Engine,
    mut operation: Operation,
    path: &str,
    query: HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Reply, ApiError> {
    check_path(path)?;
    // Response wrapping does not exist yet: a client asking for it must not get the
    // plaintext it meant to keep out of its own hands (fail closed, not ignored).
    if headers
        .get("x-vault-wrap-ttl")
        .is_some_and(|v| !v.as_bytes().iter().all(u8::is_ascii_whitespace))
    {
        return Err(ApiError::bad_request(
            "response wrapping (X-Vault-Wrap-TTL) is not supported; the request was not served",
        ));
    }
    // Resolved here, refused only once the caller may learn why: a refusal describes a
    // mount's routes, and a client without a usable token (or without access to the
    // path) gets the 403 a path under no mount gets, so it cannot probe for mounts. The
    // handler runs only on a resolved name, the one resolved before the ACL (V20).
    let resolved = route::resolve(&route::Mounts::of(engine), path, operation)
        .map(|resolved| resolved.name.map(str::to_owned));
    let body: Map<String, Value> = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("failed to parse JSON input: {e}")))?
    };
    let mut request = Request {
        id: uuid(),
        operation,
        path: path.to_owned(),
        name: resolved.as_ref().ok().cloned().flatten(),
        query,
        body,
        token: None,
        entry: None,
        use_limited: false,
    };
    if is_unauthenticated_sys(path) {
        resolved?;
        return sys::unauthenticated(engine, &request).await;
    }
    if engine.seal.is_sealed() {
        return Err(ApiError::sealed());
    }
    // Logging in needs no token; nor does reading a PKI mount's CA certificate (public).
    let login = path == "auth/kubernetes/login"
        || path
            .strip_prefix(engine.pki.mount())
            .is_some_and(|rest| rest == "/cert/ca");
    if !login {
        // A request without a usable token (none, unknown, expired, revoked, its uses
        // spent) is audited before it is refused, its token HMAC'd like any other:
        // guessing tokens leaves a trail.
        request.token = token_of(headers);
        let looked_up = match &request.token {
            None => Err(TokenError::Invalid),
            Some(token) => match engine.tokens.lookup(token).await {
                // Every authenticated request spends a use of a limited-use token,
                // allowed or denied, as in Vault.
                Ok(entry) => engine.tokens.spend_use(token, entry).await,
                Err(e) => Err(e),
            },
        };
        let entry = match looked_up {
            Ok(spent) => {
                request.use_limited = spent.limited;
                spent.entry
            }
            Err(TokenError::Invalid) => {
                let auth = request.auth_info();
                audit_request(engine, &request, &auth).await?;
                let denied = ApiError::denied();
                audit_response(engine, &request, &auth, denied.status, Some(&denied.body())).await?;
                return Err(denied);
            }
            Err(other) => return Err(other.into()),
        };
        let token = request.token.clone().unwrap_or_default();
        // Create or update: Vault decides by whether the target exists.
        if operation == Operation::update && kv::exists(engine, path).await? == Some(false) {
            operation = Operation::create;
            request.operation = operation;
        }
        let acl = engine
            .policies
            .acl(&entry.policies)
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        // `sys/internal/ui/mounts/<path>` is Vault's unauthenticated-then-checked path:
        // it needs a valid token, and its handler checks the token's access to the mount.
        let ui_mount = operation == Operation::read && path.starts_with("sys/internal/ui/mounts/");
        let allowed = ui_mount
            || acl.allows(path, operation.capability())
                && (!needs_sudo(path) || acl.allows(path, Capability::Sudo));
        request.token = Some(token);
        request.entry = Some(entry);
        if !allowed {
            // Denials are audited too: who tried what matters most.
            let auth = request.auth_info();
            audit_request(engine, &request, &auth).await?;
            let denied = ApiError::denied();
            audit_response(engine, &request, &auth, denied.status, Some(&denied.body())).await?;
            return Err(denied);
        }
    }
    let auth = request.auth_info();
    audit_request(engine, &request, &auth).await?;
    // A path that does not resolve is answered (and audited) as its handler's refusal.
    let result = match resolved {
        Ok(_) => route(engine, &request).await,
        Err(refused) => Err(refused),
    };
    let error_body;
    let (status, body) = match &result {
        Ok(reply) => (reply.status, reply.body.as_ref()),
        Err(error) => {
            error_body = error.body();
            (error.status, Some(&error_body))
        }
    };
    audit_response(engine, &request, &auth, status, body).await?;
    result
}

async fn audit_request(engine: &Engine, request: &Request, auth: &AuthInfo<'_>) -> Result<(), ApiError> {
    let data = (!request.body.is_empty()).then_some(&request.body);
    engine
        .audit
        .request(
            &request.id,
            request.operation.as_str(),
            &request.path,
            auth,
            data,
            "",
        )
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn audit_response(
    engine: &Engine,
    request: &Request,
    auth: &AuthInfo<'_>,
    status: StatusCode,
    body: Option<&Value>,
) -> Result<(), ApiError> {
    engine
        .audit
        .response(
            &request.id,
            request.operation.as_str(),
            &request.path,
            auth,
            status.as_u16(),
            body,
            "",
        )
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn route(engine: &Engine, request: &Request) -> Result<Reply, ApiError> {
    let path = request.path.as_str();
    if let Some(rest) = path.strip_prefix("sys/") {
        return sys::route(engine, request, rest).await;
    }
    if let Some(rest) = path.strip_prefix("auth/token/") {
        return auth::token(engine, request, rest).await;
    }
    if let Some(rest) = path.strip_prefix("auth/kubernetes/") {
        return auth::kubernetes(engine, request, rest).await;
    }
    let below = |mount: &str| path.strip_prefix(mount).and_then(|rest| rest.strip_prefix('/'));
    if let Some(rest) = below(engine.database.mount()) {
        return database::route(engine, request, rest).await;
    }
    if let Some(rest) = below(engine.pki.mount()) {
        return pki::route(engine, request, rest).await;
    }
    if let Some(rest) = below(engine.kv.mount()) {
        return kv::route(engine, request, rest).await;
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no handler for route \"{path}\". route entry not found."),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ambiguous_paths_are_refused() {
        for bad in [
            "",
            "/",
            "secret//data",
            "secret/../sys/seal",
            "secret/./x",
            "secret/%2e%2e/x",
            "a\\b",
            "x/\u{1}",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        for good in ["secret/data/app", "secret/metadata/", "sys/policies/acl/app"] {
            check_path(good).unwrap();
        }
    }

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
