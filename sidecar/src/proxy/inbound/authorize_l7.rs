//! The fifth stage, per request of an HTTP connection: the request decision by the
//! intentions for this workload and the connection's source (M3: on the normalized
//! path; M4: on the host in either spelling). A denied request is answered here, 403
//! naming the deciding rule, or 400 for a path refused before any rule; an allowed one
//! goes on with the normalized path it was decided on. Every request is counted by
//! decision, and timed to its response headers.

use super::{Body, DECIDED_BY_HEADER, NewService, Peer, Shared, full, labels, status};
use crate::proxy::metrics::DirectionLabels;
use capstan_mesh::{DecidedBy, Decision, Request as PolicyRequest};
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    header,
    http::{request::Parts, uri::PathAndQuery},
};
use prometheus_client::metrics::{counter::Counter, histogram::Histogram};
use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Instant,
};
use tower::Service;

/// An allowed request: what the forward stage is given.
pub struct Allowed {
    pub parts: Parts,
    pub body: Incoming,
    /// The normalized path the decision was made on, with the request's query.
    pub path_and_query: PathAndQuery,
}

/// Makes the L7 authorization stage for each HTTP connection (its source, its metric
/// handles), over what `inner` makes for it.
#[derive(Clone)]
pub struct NewAuthorizeL7<N> {
    pub(super) shared: Arc<Shared>,
    pub(super) inner: N,
}

impl<N: NewService<Arc<Peer>>> NewService<Arc<Peer>> for NewAuthorizeL7<N> {
    type Service = AuthorizeL7<N::Service>;

    fn new_service(&self, peer: Arc<Peer>) -> Self::Service {
        AuthorizeL7 {
            connection: Arc::new(Connection {
                shared: self.shared.clone(),
                peer: peer.clone(),
                requests: parking_lot::Mutex::new(Vec::new()),
                request_duration: OnceLock::new(),
            }),
            inner: self.inner.new_service(peer),
        }
    }
}

/// What the requests of one inbound connection share: the source (fixed for the
/// connection) and the metric handles for it, looked up once rather than per request
/// (building the label set and hashing it was a visible share of a request's cost).
struct Connection {
    shared: Arc<Shared>,
    peer: Arc<Peer>,
    /// `requests_total` of this source, by decision (a handful at most).
    requests: parking_lot::Mutex<Vec<(Decision, Counter)>>,
    request_duration: OnceLock<Histogram>,
}

/// More distinct decisions than this on one connection are counted without caching.
const CACHED_DECISIONS: usize = 16;

impl Connection {
    fn count(&self, decision: &Decision) {
        let mut cached = self.requests.lock();
        if let Some((_, counter)) = cached.iter().find(|(d, _)| d == decision) {
            counter.inc();
            return;
        }
        let counter = self
            .shared
            .metrics
            .requests
            .get_or_create(&labels(
                &self.peer.source,
                &self.shared.me,
                decision.allow,
                decision.by.to_string(),
            ))
            .clone();
        counter.inc();
        if cached.len() < CACHED_DECISIONS {
            cached.push((decision.clone(), counter));
        }
    }

    fn request_duration(&self) -> &Histogram {
        self.request_duration.get_or_init(|| {
            self.shared
                .metrics
                .request_duration
                .get_or_create(&DirectionLabels { direction: "inbound" })
                .clone()
        })
    }
}

/// The L7 authorization stage of one connection: `inner` is given each allowed request.
#[derive(Clone)]
pub struct AuthorizeL7<S> {
    connection: Arc<Connection>,
    inner: S,
}

impl<S> Service<Request<Incoming>> for AuthorizeL7<S>
where
    S: Service<Allowed, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let started = Instant::now();
        let connection = &*self.connection;
        let (source, me) = (&connection.peer.source, &connection.shared.me);
        let (parts, body) = request.into_parts();
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let (decision, normalized) = {
            // Borrowed, not copied: only when a header is not valid UTF-8 are they converted.
            let lossy: Vec<(&str, std::borrow::Cow<'_, str>)>;
            let mut headers: Vec<(&str, &str)> = Vec::with_capacity(parts.headers.len() + 1);
            for (name, value) in &parts.headers {
                match std::str::from_utf8(value.as_bytes()) {
                    Ok(value) => headers.push((name.as_str(), value)),
                    Err(_) => break,
                }
            }
            if headers.len() < parts.headers.len() {
                lossy = parts
                    .headers
                    .iter()
                    .map(|(name, value)| (name.as_str(), String::from_utf8_lossy(value.as_bytes())))
                    .collect();
                headers = lossy.iter().map(|(n, v)| (*n, v.as_ref())).collect();
            }
            // HTTP/2 carries the host in :authority, which rules on "host" must see too (M4).
            if !parts.headers.contains_key(header::HOST)
                && let Some(authority) = parts.uri.authority()
            {
                headers.push(("host", authority.as_str()));
            }
            connection.shared.policy.borrow().authorize(
                source,
                me,
                &PolicyRequest {
                    method: parts.method.as_str(),
                    target,
                    headers: &headers,
                },
            )
        };
        connection.count(&decision);
        let state = match normalized.filter(|_| decision.allow) {
            Some(path) => match upstream_target(&parts.uri, &path, target) {
                Some(path_and_query) => State::Forwarding {
                    future: self.inner.call(Allowed {
                        parts,
                        body,
                        path_and_query,
                    }),
                },
                None => State::Answered {
                    response: Some(status(StatusCode::BAD_REQUEST)),
                },
            },
            None => {
                tracing::info!(
                    %source, destination = %me, method = %parts.method, path = %target,
                    decided_by = %decision.by, "Request denied"
                );
                let by = decision.by.to_string();
                let body = format!("capstan: {} {} denied by {by}\n", parts.method, path_only(target));
                let mut response = Response::new(full(body));
                // A path refused before any rule (M3) is the request's fault, not a policy's.
                *response.status_mut() = match decision.by {
                    DecidedBy::InvalidPath(_) => StatusCode::BAD_REQUEST,
                    _ => StatusCode::FORBIDDEN,
                };
                if let Ok(value) = header::HeaderValue::from_str(&by) {
                    response.headers_mut().insert(DECIDED_BY_HEADER, value);
                }
                State::Answered {
                    response: Some(response),
                }
            }
        };
        ResponseFuture {
            state,
            started,
            duration: connection.request_duration().clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's response: answered here, or by the next stage; timed either way.
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
        started: Instant,
        duration: Histogram,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProjection]
    enum State<F> {
        Answered { response: Option<Response<Body>> },
        Forwarding { #[pin] future: F },
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match this.state.project() {
            StateProjection::Answered { response } => response
                .take()
                .expect("a response future polled after it completed"),
            StateProjection::Forwarding { future } => match std::task::ready!(future.poll(cx)) {
                Ok(response) => response,
            },
        };
        this.duration.observe(this.started.elapsed().as_secs_f64());
        Poll::Ready(Ok(response))
    }
}

/// The path and query the application is sent: the normalized path the decision was
/// made on, with the request's query. The request's own when they are the same (the
/// common case: nothing to format or parse again).
fn upstream_target(uri: &hyper::Uri, normalized: &str, target: &str) -> Option<PathAndQuery> {
    if let Some(pq) = uri.path_and_query()
        && pq.path() == normalized
    {
        return Some(pq.clone());
    }
    let rebuilt = match target.split_once('?') {
        Some((_, query)) => format!("{normalized}?{query}"),
        None => normalized.to_owned(),
    };
    PathAndQuery::try_from(rebuilt).ok()
}

fn path_only(target: &str) -> &str {
    target.split_once('?').map_or(target, |(p, _)| p)
}
