//! The client: hyper-util's pooled HTTP/1.1 client over the TLS connector, one request
//! path with the timeouts, the retry policy, the body limit and the error mapping every
//! typed call shares.

use crate::{ApiError, Error, Roots, connect::Connector, error::redact};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper_util::{client::legacy, rt::TokioExecutor};
use parking_lot::Mutex;
use serde_json::Value;
use std::{sync::Arc, time::Duration};

/// How a client behaves; each caller keeps what it had before this crate.
#[derive(Clone, Debug)]
pub struct Options {
    /// TCP and TLS handshake.
    pub connect_timeout: Duration,
    /// One attempt, from sending to the last byte of the answer (connecting included).
    pub timeout: Duration,
    /// The largest answer read; a larger one is [`Error::TooLarge`].
    pub body_limit: usize,
    pub retry: Retry,
}

impl Options {
    /// The controller's and the agent's settings: 10 s, 1 MiB, no retry but the pool's
    /// own (a request never written on a kept connection found closed). A const, so a
    /// caller's own settings can be `Options { body_limit, ..Options::DEFAULT }` in a
    /// const too.
    pub const DEFAULT: Self = Self {
        connect_timeout: Duration::from_secs(10),
        timeout: Duration::from_secs(10),
        body_limit: 1024 * 1024,
        retry: Retry::NEVER,
    };
}

impl Default for Options {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Which failures a call is repeated after, and how long it waits between attempts
/// (`backoff`, doubled after every attempt). Only what cannot have been done is retried:
/// a connection that could not be made (nothing was sent), and, if `unavailable`, a 503
/// (the engine sealed or on standby, which refuses before doing anything). A request
/// that failed after it was written is never repeated: it may have been done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Attempts in all (1: no retry).
    pub attempts: u32,
    pub backoff: Duration,
    pub unavailable: bool,
}

impl Retry {
    /// One attempt. Callers that retry do it on their own schedule (a reconciler's
    /// requeue, the agent's backoff), as they did before this client.
    pub const NEVER: Self = Self {
        attempts: 1,
        backoff: Duration::from_millis(100),
        unavailable: false,
    };
}

/// How a request proves who sends it.
#[derive(Clone, Copy)]
pub enum Auth<'a> {
    None,
    /// An engine token, as `X-Vault-Token`.
    Token(&'a str),
    /// `Authorization: Bearer` (the mesh CA's ServiceAccount token; the engine also
    /// reads an engine token from it).
    Bearer(&'a str),
}

/// An answer of any status, its body read (within the limit).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON; Null when it is empty or not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// The engine's client. Cheap to clone; clones share the connection pool.
#[derive(Clone)]
pub struct Client(Arc<Inner>);

struct Inner {
    /// `https://host:port`, no trailing slash.
    base: String,
    roots: Roots,
    options: Options,
    /// The pool, with the roots generation its connections were verified with: a swap of
    /// the roots starts a new pool, so no request goes on a connection the old bundle let
    /// through.
    pool: Mutex<(u64, Pool)>,
}

type Pool = legacy::Client<Connector, Full<Bytes>>;

impl Client {
    /// A client of the engine at `url` (`https://host[:port]`), trusting `roots`.
    pub fn new(url: &str, roots: Roots, options: Options) -> Result<Self, Error> {
        let uri: Uri = url.parse().map_err(|_| Error::Url(url.to_owned()))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err(Error::Url(url.to_owned()));
        }
        let base = format!(
            "https://{}",
            uri.authority().map(|a| a.as_str()).unwrap_or_default()
        );
        let pool = pool(&roots, &options);
        Ok(Self(Arc::new(Inner {
            base,
            // Roots set later are generation 1 on: the first call starts a pool for them.
            pool: Mutex::new((roots.generation().unwrap_or(0), pool)),
            roots,
            options,
        })))
    }

    /// The roots this client trusts (a handle: [`Roots::set_pem`] swaps them).
    pub fn roots(&self) -> &Roots {
        &self.0.roots
    }

    /// `https://host:port`.
    pub fn url(&self) -> &str {
        &self.0.base
    }

    /// One call of the engine's Vault API under `/v1/`, with an engine token: the JSON
    /// body of a 2xx answer (Null when empty), or [`Error::Api`] with the engine's
    /// messages.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Value, Error> {
        let sensitive: Vec<&str> = token.into_iter().collect();
        self.call_redacting(
            method,
            path,
            token.map_or(Auth::None, Auth::Token),
            body,
            &sensitive,
        )
        .await
    }

    /// [`Client::call`], with the strings `sensitive` (tokens, lease ids the request
    /// carries) redacted from any error, and the request's auth as given.
    pub async fn call_redacting(
        &self,
        method: Method,
        path: &str,
        auth: Auth<'_>,
        body: Option<&Value>,
        sensitive: &[&str],
    ) -> Result<Value, Error> {
        let body = body.map(|b| Bytes::from(b.to_string()));
        let answer = self
            .send(method, &format!("/v1/{path}"), auth, body, sensitive)
            .await?;
        let bare = bare(path);
        if !answer.status.is_success() {
            return Err(ApiError::parse(bare, answer.status, &answer.body, sensitive).into());
        }
        if answer.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&answer.body).map_err(|_| Error::NotJson {
            path: bare.to_owned(),
        })
    }

    /// One request to `target` (a path and query, as sent), whatever status it is
    /// answered with: for the tests that probe arbitrary routes, and for the typed calls.
    pub async fn send(
        &self,
        method: Method,
        target: &str,
        auth: Auth<'_>,
        body: Option<Bytes>,
        sensitive: &[&str],
    ) -> Result<Answer, Error> {
        let base = &self.0.base;
        let path = bare(target).trim_start_matches("/v1/");
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{base}{target}"))
            .header(header::CONTENT_TYPE, "application/json");
        match auth {
            Auth::None => {}
            Auth::Token(token) => {
                request = request.header("X-Vault-Token", header_value(token)?);
            }
            Auth::Bearer(token) => {
                request = request.header(
                    header::AUTHORIZATION,
                    header_value(&format!("Bearer {}", token.trim()))?,
                );
            }
        }
        // Built once, sent as copies: a request is not Clone, its parts are.
        let (head, ()) = request
            .body(())
            .map_err(|_| Error::Url(format!("{base}{}", bare(target))))?
            .into_parts();
        let body = Full::new(body.unwrap_or_default());
        let retry = self.0.options.retry;
        let mut backoff = retry.backoff;
        let mut attempt = 1;
        loop {
            let request = Request::from_parts(head.clone(), body.clone());
            let result = self.attempt(request, path, sensitive).await;
            let again = attempt < retry.attempts
                && match &result {
                    Err(Error::Connect { .. }) => true,
                    Ok(answer) => retry.unavailable && answer.status == StatusCode::SERVICE_UNAVAILABLE,
                    Err(_) => false,
                };
            if !again {
                return result;
            }
            tracing::debug!(path, attempt, ?backoff, "Retrying a request to the engine");
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2);
            attempt += 1;
        }
    }

    /// One attempt at `request`, within the request timeout; `path` names it in errors.
    async fn attempt(
        &self,
        request: Request<Full<Bytes>>,
        path: &str,
        sensitive: &[&str],
    ) -> Result<Answer, Error> {
        let Inner { base, options, .. } = &*self.0;
        let http = |reason: String| Error::Http {
            url: base.clone(),
            path: path.to_owned(),
            reason: redact(&reason, sensitive),
        };
        let pool = self.pool()?;
        let exchange = async {
            let response = pool.request(request).await.map_err(|e| {
                let reason = redact(&chain(&e), sensitive);
                if e.is_connect() {
                    Error::Connect {
                        url: base.clone(),
                        reason,
                    }
                } else {
                    http(reason)
                }
            })?;
            let status = response.status();
            let body = Limited::new(response.into_body(), options.body_limit)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<LengthLimitError>() {
                        Error::TooLarge {
                            path: path.to_owned(),
                            limit: options.body_limit,
                        }
                    } else {
                        http(format!("reading the answer: {e}"))
                    }
                })?
                .to_bytes();
            Ok(Answer { status, body })
        };
        tokio::time::timeout(options.timeout, exchange)
            .await
            .map_err(|_| Error::Timeout {
                url: base.clone(),
                path: path.to_owned(),
                after: options.timeout,
            })?
    }

    /// The pool for the current roots (a new one after a swap).
    fn pool(&self) -> Result<Pool, Error> {
        let Inner { roots, options, .. } = &*self.0;
        let generation = roots.generation().ok_or(Error::NoRoots)?;
        let mut pool = self.0.pool.lock();
        if pool.0 != generation {
            *pool = (generation, self::pool(roots, options));
        }
        Ok(pool.1.clone())
    }
}

fn pool(roots: &Roots, options: &Options) -> Pool {
    legacy::Client::builder(TokioExecutor::new())
        .retry_canceled_requests(true)
        .build(Connector {
            roots: roots.clone(),
            timeout: options.connect_timeout,
        })
}

fn header_value(token: &str) -> Result<HeaderValue, Error> {
    // The message never quotes the token.
    let mut value = HeaderValue::from_str(token).map_err(|_| Error::BadToken)?;
    value.set_sensitive(true);
    Ok(value)
}

/// The path without its query (a KV version), as errors name it.
fn bare(target: &str) -> &str {
    target.split('?').next().unwrap_or(target)
}

/// An error and its sources, as one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
