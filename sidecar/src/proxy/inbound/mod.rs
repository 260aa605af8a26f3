//! The inbound side: other sidecars connect here with mTLS. The peer's SVID names the
//! source service; the intentions for this workload decide. Plain TCP destinations are
//! decided once per connection; HTTP destinations per request (403 naming the rule; 400
//! for a path refused before any rule).
//! A connection whose source an intention change no longer allows is closed (DESIGN.md,
//! decision 2), within the time the change takes to arrive. A connection carrying
//! streams (`mux.rs`) is decided, and closed, as one: its streams share its source; each
//! stream is served as a connection of its own would be.

use super::{
    Mode, Shared,
    app_connections::AppConnections,
    credentials::Credentials,
    metrics::{DecisionLabels, DirectionLabels, HandshakeLabels},
};
use bytes::Bytes;
use capstan_mesh::{ConnectionDecision, DecidedBy, Decision, Identity, Policy, Request, svid};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{Response, StatusCode, body::Incoming, header, http::uri::PathAndQuery};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::{counter::Counter, histogram::Histogram};
use rustls::pki_types::{CertificateDer, UnixTime};
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::TlsAcceptor;

/// The response header that names the rule behind a denial.
pub const DECIDED_BY_HEADER: &str = "x-capstan-decided-by";
/// The header carrying the verified source identity to the application. Any copy a
/// client sent is removed first, so the application can trust it.
pub const SOURCE_HEADER: &str = "x-capstan-source";

type Body = BoxBody<Bytes, hyper::Error>;

pub async fn serve(shared: Arc<Shared>, listener: TcpListener, app_port: u16) {
    let app = AppConnections::new(app_port);
    let reaper = tokio::spawn(app.clone().reap_forever());
    super::accept_loop(shared, listener, "inbound", move |shared, tcp, peer| {
        handle(shared, tcp, peer, app.clone())
    })
    .await;
    reaper.abort();
}

async fn handle(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, app: Arc<AppConnections>) {
    let app_port = app.port();
    let Some(credentials) = shared.credentials.borrow().clone() else {
        tracing::debug!(%peer, "Refusing a connection: no certificate yet");
        return;
    };
    let started = Instant::now();
    let acceptor = TlsAcceptor::from(credentials.server_config.clone());
    let tls = match tokio::time::timeout(super::HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            let reason = super::handshake_reason(&error);
            tracing::info!(%peer, reason, error = super::handshake_error_text(&error), "Inbound TLS handshake refused");
            shared
                .metrics
                .handshake_failures
                .get_or_create(&HandshakeLabels {
                    direction: "inbound",
                    reason: reason.to_owned(),
                })
                .inc();
            return;
        }
        Err(_) => {
            shared
                .metrics
                .handshake_failures
                .get_or_create(&HandshakeLabels {
                    direction: "inbound",
                    reason: "timeout".to_owned(),
                })
                .inc();
            return;
        }
    };
    shared
        .metrics
        .handshake_duration
        .get_or_create(&DirectionLabels { direction: "inbound" })
        .observe(started.elapsed().as_secs_f64());
    // The verifier accepted the chain and SVID rules; this reads the identity it proved.
    let Some(source) = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|leaf| svid::peer_spiffe_id(leaf).ok())
    else {
        tracing::warn!(%peer, "Refusing a connection whose verified certificate names no workload");
        return;
    };
    // What the application is told about the source, in every request of the connection.
    let source_header = header::HeaderValue::from_str(&source.to_string()).ok();
    let source = source.identity();
    let me = shared.me.clone();
    let mode = shared.mode(app_port);
    let decision = connection_decision(&shared.policy.borrow(), &source, &me, mode);
    let by = decision
        .as_ref()
        .map_or("per request".to_owned(), |d| d.by.to_string());
    let allowed = decision.as_ref().is_none_or(|d| d.allow);
    shared
        .metrics
        .inbound_connections
        .get_or_create(&labels(&source, &me, allowed, by.clone()))
        .inc();
    if !allowed {
        tracing::info!(%source, destination = %me, decided_by = %by, "Connection denied");
        return;
    }
    tracing::debug!(%source, destination = %me, decided_by = %by, "Connection allowed");

    let _mesh_connection = shared.metrics.mesh_connection("inbound");
    let _guard = shared.track();
    let mut policy_rx = shared.policy.subscribe();
    let revoked = revoked(&mut policy_rx, &source, &me, mode);
    let mut shutdown = shared.shutdown.subscribe();
    let drained = async {
        let _ = shutdown.wait_for(|stop| *stop).await;
        tokio::time::sleep(shared.drain).await;
    };
    // M12: the connection lasts only as long as the peer's chain proves its identity.
    let peer_chain: Vec<CertificateDer<'static>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let distrusted = trust_lost(shared.credentials.clone(), credentials, peer_chain);
    let muxed = super::credentials::speaks_mux(tls.get_ref().1);
    let served = {
        let (shared, source) = (shared.clone(), source.clone());
        async move {
            if muxed {
                // Each stream is served as a connection of its own would be.
                super::mux::serve(tls, move |stream| {
                    serve_one(
                        shared.clone(),
                        stream,
                        source.clone(),
                        source_header.clone(),
                        app.clone(),
                        mode,
                    )
                })
                .await;
            } else {
                serve_one(shared, tls, source, source_header, app, mode).await;
            }
        }
    };
    tokio::select! {
        () = served => {}
        decision = revoked => {
            shared
                .metrics
                .connections_closed_by_policy
                .get_or_create(&labels(&source, &me, false, decision.by.to_string()))
                .inc();
            tracing::info!(%source, destination = %me, decided_by = %decision.by, "Closing an established connection: an intention no longer allows it");
        }
        () = drained => {}
        reason = distrusted => {
            shared
                .metrics
                .connections_closed_by_policy
                .get_or_create(&labels(&source, &me, false, reason.clone()))
                .inc();
            tracing::info!(%source, destination = %me, %reason, "Closing an established connection: its peer's certificate no longer proves its identity");
        }
    }
}

/// Resolves, with the reason, when the peer's certificate chain stops proving its
/// identity (M12): at the earliest notAfter of the certificates it sent, or at a trust
/// bundle change it no longer verifies against. `handshake` holds the credentials the
/// handshake verified the chain with. One timer and one watch receiver per connection:
/// nothing is added to a request's or a byte's path.
async fn trust_lost(
    mut credentials: watch::Receiver<Option<Arc<Credentials>>>,
    handshake: Arc<Credentials>,
    chain: Vec<CertificateDer<'static>>,
) -> String {
    // A chain that verified always parses; one that does not is trusted no further.
    let left = svid::chain_not_after(&chain).map_or(Duration::ZERO, |not_after| {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Duration::from_secs(not_after.as_secs()).saturating_sub(now)
    });
    let expiry = tokio::time::sleep(left);
    tokio::pin!(expiry);
    let mut verified_with = handshake;
    loop {
        tokio::select! {
            () = &mut expiry => return "peer certificate expired".to_owned(),
            changed = credentials.changed() => {
                if changed.is_err() {
                    // The credentials never change again: only the expiry is left.
                    expiry.as_mut().await;
                    return "peer certificate expired".to_owned();
                }
                let Some(current) = credentials.borrow_and_update().clone() else { continue };
                // A renewal of this workload's own certificate keeps the bundle.
                if current.roots_pem == verified_with.roots_pem {
                    continue;
                }
                let Some((leaf, intermediates)) = chain.split_first() else {
                    return "peer certificate missing".to_owned();
                };
                if let Err(error) = svid::verify_svid_as(
                    leaf,
                    intermediates,
                    &current.bundle,
                    UnixTime::now(),
                    svid::PeerRole::Client,
                ) {
                    return format!("trust bundle changed: {error}");
                }
                verified_with = current;
            }
        }
    }
}

/// Serves one connection's (or one stream's) bytes: a tunnel to the application for a
/// plain-TCP workload, HTTP for an HTTP one.
async fn serve_one<S>(
    shared: Arc<Shared>,
    io: S,
    source: Identity,
    source_header: Option<header::HeaderValue>,
    app: Arc<AppConnections>,
    mode: Mode,
) where
    S: super::tunnel::Side + Send + 'static,
{
    let _active = shared.metrics.application_connection("inbound");
    match mode {
        Mode::Tcp => tunnel_to_app(io, app.port()).await,
        Mode::Http => serve_http(shared, io, source, source_header, app).await,
    }
}

/// Resolves once the policy, as it changes, stops allowing this connection.
async fn revoked(
    rx: &mut watch::Receiver<Arc<Policy>>,
    source: &Identity,
    me: &Identity,
    mode: Mode,
) -> Decision {
    loop {
        if rx.changed().await.is_err() {
            // The policy never changes again: never revoked.
            return std::future::pending().await;
        }
        let decision = connection_decision(&rx.borrow_and_update(), source, me, mode);
        if let Some(decision) = decision.filter(|d| !d.allow) {
            return decision;
        }
    }
}

/// How a connection is decided: once for a plain-TCP destination; for an HTTP one, at
/// the connection only when the source's rule is L4 (None: each request is decided).
fn connection_decision(policy: &Policy, source: &Identity, me: &Identity, mode: Mode) -> Option<Decision> {
    match mode {
        Mode::Tcp => Some(policy.tcp_connection(source, me)),
        Mode::Http => match policy.connection(source, me) {
            ConnectionDecision::Decided(decision) => Some(decision),
            ConnectionDecision::PerRequest { .. } => None,
        },
    }
}

fn labels(source: &Identity, destination: &Identity, allowed: bool, decided_by: String) -> DecisionLabels {
    DecisionLabels {
        source: source.to_string(),
        destination: destination.to_string(),
        result: if allowed { "allowed" } else { "denied" },
        decided_by,
    }
}

async fn tunnel_to_app<S: super::tunnel::Side>(mut tls: S, app_port: u16) {
    match TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, app_port)).await {
        Ok(mut app) => {
            let _ = app.set_nodelay(true);
            let _ = super::tunnel(&mut tls, &mut app).await;
        }
        Err(error) => tracing::warn!(%error, app_port, "The application refused a connection"),
    }
}

/// What the requests of one inbound connection share: the source (fixed for the
/// connection) and the metric handles for it, looked up once rather than per request
/// (building the label set and hashing it was a visible share of a request's cost).
struct Connection {
    shared: Arc<Shared>,
    source: Identity,
    source_header: Option<header::HeaderValue>,
    /// The connections to the application, shared by all inbound connections.
    app: Arc<AppConnections>,
    /// `requests_total` of this source, by decision (a handful at most).
    requests: parking_lot::Mutex<Vec<(Decision, Counter)>>,
    request_duration: std::sync::OnceLock<Histogram>,
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
                &self.source,
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

async fn serve_http<S>(
    shared: Arc<Shared>,
    tls: S,
    source: Identity,
    source_header: Option<header::HeaderValue>,
    app: Arc<AppConnections>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let connection = Arc::new(Connection {
        shared,
        source,
        source_header,
        app,
        requests: parking_lot::Mutex::new(Vec::new()),
        request_duration: std::sync::OnceLock::new(),
    });
    let service = hyper::service::service_fn(move |request| {
        let connection = connection.clone();
        async move { Ok::<_, std::convert::Infallible>(handle_request(&connection, request).await) }
    });
    // HTTP/2 serves each stream on a task of its own: they end with the connection.
    let (_connection_open, ended) = watch::channel(());
    let mut builder = hyper_util::server::conn::auto::Builder::new(StreamExecutor { ended });
    // Bounded resources against malformed or abusive clients (M20).
    builder
        .http1()
        .max_buf_size(64 * 1024)
        .header_read_timeout(std::time::Duration::from_secs(30))
        .timer(hyper_util::rt::TokioTimer::new());
    builder
        .http2()
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024)
        .max_pending_accept_reset_streams(32)
        .max_local_error_reset_streams(Some(256))
        .timer(hyper_util::rt::TokioTimer::new());
    if let Err(error) = builder.serve_connection(TokioIo::new(tls), service).await {
        tracing::debug!(%error, "Inbound HTTP connection ended with an error");
    }
}

/// Spawns an HTTP/2 connection's stream tasks so that they end with the connection:
/// a request waiting on the application when its connection is closed (its peer no
/// longer trusted, say) is dropped too, not answered later. The cost is one receiver
/// per stream, taken when it starts.
#[derive(Clone)]
struct StreamExecutor {
    /// Closed (its sender dropped) when the connection's future ends or is dropped.
    ended: watch::Receiver<()>,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, stream: F) {
        let mut ended = self.ended.clone();
        tokio::spawn(async move {
            tokio::select! {
                biased;
                _ = stream => {}
                _ = ended.changed() => {}
            }
        });
    }
}

async fn handle_request(connection: &Connection, request: hyper::Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let shared = &*connection.shared;
    let (source, me) = (&connection.source, &shared.me);
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
        shared.policy.borrow().authorize(
            source,
            me,
            &Request {
                method: parts.method.as_str(),
                target,
                headers: &headers,
            },
        )
    };
    connection.count(&decision);
    let response = match normalized.filter(|_| decision.allow) {
        Some(path) => match upstream_target(&parts.uri, &path, target) {
            Some(path_and_query) => forward(connection, parts, body, path_and_query).await,
            None => status(StatusCode::BAD_REQUEST),
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
            response
        }
    };
    connection
        .request_duration()
        .observe(started.elapsed().as_secs_f64());
    response
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

/// Sends an allowed request to the application with the normalized path the decision
/// was made on (M3: the rule and the application never see two different paths). The
/// request is passed on as it came, less its hop-by-hop headers and any source header
/// the client sent, plus the verified source.
async fn forward(
    connection: &Connection,
    mut parts: hyper::http::request::Parts,
    body: Incoming,
    path_and_query: PathAndQuery,
) -> Response<Body> {
    if parts
        .headers
        .keys()
        .any(|name| is_hop_by_hop(name) || name == SOURCE_HEADER)
    {
        for name in HOP_BY_HOP.iter().chain([&SOURCE_HEADER]) {
            parts.headers.remove(*name);
        }
    }
    // HTTP/2 carries the host in :authority; the application gets it as Host.
    if !parts.headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
    {
        let Ok(host) = header::HeaderValue::from_str(authority.as_str()) else {
            return status(StatusCode::BAD_REQUEST);
        };
        parts.headers.insert(header::HOST, host);
    }
    if let Some(source) = &connection.source_header {
        parts.headers.insert(SOURCE_HEADER, source.clone());
    }
    let pooled = parts.method == hyper::Method::CONNECT;
    // The application is spoken to in HTTP/1.1, whatever the client spoke, and nothing
    // the server side attached to the request (upgrades, say) is passed on.
    parts.version = hyper::Version::HTTP_11;
    parts.extensions = hyper::http::Extensions::new();
    let sent = if pooled {
        // CONNECT goes through hyper-util's pool, which tunnels it.
        let mut uri = hyper::http::uri::Parts::default();
        uri.scheme = Some(hyper::http::uri::Scheme::HTTP);
        uri.authority = Some(connection.app.authority().clone());
        uri.path_and_query = Some(path_and_query);
        let Ok(uri) = hyper::Uri::from_parts(uri) else {
            return status(StatusCode::BAD_REQUEST);
        };
        parts.uri = uri;
        let request = hyper::Request::from_parts(parts, body.boxed());
        connection
            .shared
            .app_client
            .request(request)
            .await
            .map(|response| response.map(|b| b.boxed()))
            .map_err(anyhow::Error::from)
    } else {
        // As the pool sends it: origin-form, with the address as Host if none came.
        if !parts.headers.contains_key(header::HOST) {
            parts.headers.insert(header::HOST, connection.app.host().clone());
        }
        parts.uri = if path_and_query.as_str() == "/" {
            hyper::Uri::default()
        } else {
            hyper::Uri::from(path_and_query)
        };
        let request = hyper::Request::from_parts(parts, body.boxed());
        connection.app.send(request).await
    };
    match sent {
        Ok(response) => response,
        Err(error) => {
            tracing::warn!(
                error = format!("{error:#}"),
                "Forwarding to the application failed"
            );
            status(StatusCode::BAD_GATEWAY)
        }
    }
}

fn path_only(target: &str) -> &str {
    target.split_once('?').map_or(target, |(p, _)| p)
}

const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
];

fn is_hop_by_hop(name: &header::HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).map_err(|never| match never {}).boxed()
}

fn status(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(full(code.canonical_reason().unwrap_or_default().to_owned()));
    *response.status_mut() = code;
    response
}
