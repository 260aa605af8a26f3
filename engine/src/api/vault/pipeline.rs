//! Every request to the Vault-compatible API goes through the same steps, in this order,
//! each a tower layer: the path check (an unambiguous path, resolved once into the name
//! the handler will use), the seal (503 before anything else reads storage), the
//! caller's token, the ACL of the token's policies, the audit record of the request and
//! of its response, and the mount's handler. The mount declares how each of its paths is
//! let in (`mounts::Access`); a layer only asks it.
//!
//! A refusal by authentication or the ACL is not returned at once: it travels down to
//! the audit layer, which records it (who tried what matters most; a guessed token is
//! recorded HMAC'd like any other), and answers it without running the handler. A
//! request or response that cannot be audited fails (DESIGN decision 4).
//!
//! The layers are concrete types nested into one (`Pipeline`): static dispatch, one boxed
//! future per layer. None applies backpressure, so every layer is always ready, and
//! `call` works on a clone of the layer below. The engine travels with the request
//! rather than in every layer, so the layers hold nothing and cloning them per request
//! costs nothing (no reference count touched by every thread at each step).

use super::{
    ApiError, Engine, Operation, Reply, Request,
    mounts::{Access, Mount, Names},
    route,
};
use crate::{api::audit::AuthInfo, auth::token::TokenError, policy::Capability};
use axum::{
    body::Bytes,
    http::{HeaderMap, StatusCode, header},
};
use futures::future::BoxFuture;
use serde_json::{Map, Value};
use std::{
    collections::HashMap,
    sync::Arc,
    task::{Context, Poll},
};
use tower::{Service, ServiceBuilder};

/// What a layer answers.
pub type Answer = BoxFuture<'static, Result<Reply, ApiError>>;

/// A request as the HTTP handler received it.
pub struct Raw {
    pub engine: Arc<Engine>,
    pub operation: Operation,
    /// Without `/v1/`.
    pub path: String,
    pub query: HashMap<String, String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A request past the path check, on its way to the mount.
pub struct Call {
    engine: Arc<Engine>,
    pub request: Request,
    /// The mount the path is under and where the path below it starts.
    mount: Option<(Mount, usize)>,
    access: Access,
    /// The token the caller presented (moved into `request.token` by authentication;
    /// unauthenticated paths ignore it).
    presented: Option<String>,
    /// The path's resolution refused: answered (and audited) as the handler's refusal.
    resolved: Result<(), ApiError>,
    /// A refusal decided on the way (no usable token, the ACL): audited, then answered
    /// instead of running the handler.
    refused: Option<ApiError>,
}

impl Call {
    fn rest(&self) -> &str {
        let at = self.mount.map_or(0, |(_, at)| at);
        &self.request.path[at..]
    }
}

/// The whole pipeline, outermost layer first.
pub type Pipeline = CheckPath<Seal<Authenticate<Authorize<Audit<Router>>>>>;

pub fn pipeline() -> Pipeline {
    ServiceBuilder::new()
        .layer_fn(|inner| CheckPath { inner })
        .layer_fn(|inner| Seal { inner })
        .layer_fn(|inner| Authenticate { inner })
        .layer_fn(|inner| Authorize { inner })
        .layer_fn(|inner| Audit { inner })
        .service(Router)
}

/// One layer: a type holding the layer below, serving `$input` by calling the layer
/// below with `$output`, and the body of its `call` (`$call` and `$next` name the input
/// and the layer below).
macro_rules! layer {
    ($(#[$doc:meta])* $name:ident: $input:ty => $output:ty, |$call:ident, $next:ident| $body:block) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name<S> {
            inner: S,
        }

        impl<S> Service<$input> for $name<S>
        where
            S: Service<$output, Response = Reply, Error = ApiError, Future = Answer> + Clone + Send + 'static,
        {
            type Response = Reply;
            type Error = ApiError;
            type Future = Answer;

            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
                Poll::Ready(Ok(()))
            }

            fn call(&mut self, $call: $input) -> Answer {
                let mut $next = self.inner.clone();
                Box::pin(async move $body)
            }
        }
    };
}

layer! {
    /// Refuses paths that could mean two things, and requests it cannot honour; resolves
    /// the path once into the name the handler will use (V20), and parses the body.
    CheckPath: Raw => Call, |raw, next| {
        let call = check(raw)?;
        next.call(call).await
    }
}

layer! {
    /// A sealed engine answers 503 to everything but the paths served sealed.
    Seal: Call => Call, |call, next| {
        if call.access != Access::Open && call.engine.seal.is_sealed() {
            return Err(ApiError::sealed());
        }
        next.call(call).await
    }
}

layer! {
    /// The caller's token: looked up, and a use of a limited-use token spent.
    Authenticate: Call => Call, |call, next| {
        let call = authenticate(call).await?;
        next.call(call).await
    }
}

layer! {
    /// The ACL of the token's policies, for the operation the mount says it is (a write
    /// to nothing is a create).
    Authorize: Call => Call, |call, next| {
        let call = authorize(call).await?;
        next.call(call).await
    }
}

layer! {
    /// The audit records of the request and its response (or refusal).
    Audit: Call => Arc<Call>, |call, next| {
        let call = Arc::new(call);
        if call.access == Access::Open {
            return next.call(call).await;
        }
        let (engine, request) = (&call.engine, &call.request);
        let auth = request.auth_info();
        audit_request(engine, request, &auth).await?;
        let result = match &call.refused {
            Some(refused) => Err(refused.clone()),
            None => next.call(call.clone()).await,
        };
        let error_body;
        let (status, body) = match &result {
            Ok(reply) => (reply.status, reply.body.as_ref()),
            Err(error) => {
                error_body = error.body();
                (error.status, Some(&error_body))
            }
        };
        audit_response(engine, request, &auth, status, body).await?;
        result
    }
}

/// The mount's handler, on a request every layer let through.
#[derive(Clone)]
pub struct Router;

impl Service<Arc<Call>> for Router {
    type Response = Reply;
    type Error = ApiError;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Arc<Call>) -> Answer {
        Box::pin(async move {
            // A path that does not resolve is answered as its handler's refusal.
            call.resolved.clone()?;
            match call.mount {
                Some((mount, _)) => mount.serve(&call.engine, &call.request, call.rest()).await,
                None => Err(super::mounts::no_handler(&call.request.path)),
            }
        })
    }
}

/// Refuses paths that could mean two things: `..` or `.` segments, empty segments,
/// backslashes, percent-encoding, control characters (the ACL and the handler must see
/// the same path; V20).
pub(super) fn check_path(path: &str) -> Result<(), ApiError> {
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

fn check(raw: Raw) -> Result<Call, ApiError> {
    let Raw {
        engine,
        operation,
        path,
        query,
        headers,
        body,
    } = raw;
    check_path(&path)?;
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
    let names = Names::of(&engine);
    let found = Mount::find(&names, &path);
    // Resolved here, refused only once the caller may learn why: a refusal describes a
    // mount's routes, and a client without a usable token (or without access to the
    // path) gets the 403 a path under no mount gets, so it cannot probe for mounts. The
    // handler runs only on a resolved name, the one resolved before the ACL (V20).
    let resolved = route::resolve(found, &path, operation).map(|name| name.map(str::to_owned));
    let body: Map<String, Value> = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("failed to parse JSON input: {e}")))?
    };
    let mount = found.map(|(mount, rest)| (mount, path.len() - rest.len()));
    let access = found.map_or(Access::Acl { sudo: false }, |(mount, rest)| {
        mount.access(rest, operation)
    });
    let (name, resolved) = match resolved {
        Ok(name) => (name, Ok(())),
        Err(refused) => (None, Err(refused)),
    };
    Ok(Call {
        engine,
        request: Request {
            id: super::uuid(),
            operation,
            path,
            name,
            query,
            body,
            token: None,
            entry: None,
            use_limited: false,
        },
        mount,
        access,
        presented: token_of(&headers),
        resolved,
        refused: None,
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

async fn authenticate(mut call: Call) -> Result<Call, ApiError> {
    if matches!(call.access, Access::Open | Access::Unauthenticated) {
        return Ok(call);
    }
    // A request without a usable token (none, unknown, expired, revoked, its uses spent)
    // is audited before it is refused, its token HMAC'd like any other: guessing tokens
    // leaves a trail.
    let (engine, request) = (&call.engine, &mut call.request);
    request.token = call.presented.take();
    let looked_up = match &request.token {
        None => Err(TokenError::Invalid),
        // Every authenticated request spends a use of a limited-use token, allowed or
        // denied, as in Vault.
        Some(token) => engine.tokens.authenticate(token).await,
    };
    match looked_up {
        Ok(spent) => {
            request.use_limited = spent.limited;
            request.entry = Some(spent.entry);
        }
        Err(TokenError::Invalid) => call.refused = Some(ApiError::denied()),
        Err(other) => return Err(other.into()),
    }
    Ok(call)
}

async fn authorize(mut call: Call) -> Result<Call, ApiError> {
    if call.refused.is_some() || matches!(call.access, Access::Open | Access::Unauthenticated) {
        return Ok(call);
    }
    let Some(entry) = call.request.entry.clone() else {
        call.refused = Some(ApiError::denied());
        return Ok(call);
    };
    // Create or update: Vault decides by whether the target exists; the mount knows.
    if call.request.operation == Operation::update
        && let Some((mount, _)) = call.mount
        && mount.exists(&call.engine, call.rest()).await? == Some(false)
    {
        call.request.operation = Operation::create;
    }
    let acl = call
        .engine
        .policies
        .acl(&entry.policies)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let path = call.request.path.as_str();
    let allowed = match call.access {
        Access::Acl { sudo } => {
            acl.allows(path, call.request.operation.capability())
                && (!sudo || acl.allows(path, Capability::Sudo))
        }
        _ => true,
    };
    if !allowed {
        // Denials are audited too: who tried what matters most.
        call.refused = Some(ApiError::denied());
    }
    Ok(call)
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
}
