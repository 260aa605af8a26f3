//! The inbound side: other sidecars connect here with mTLS. The peer's SVID names the
//! source service; the intentions for this workload decide. Plain TCP destinations are
//! decided once per connection; HTTP destinations per request (403 naming the rule).
//! A connection whose source an intention change no longer allows is closed (DESIGN.md,
//! decision 2), within the time the change takes to arrive.

use super::{
    Mode, Shared,
    metrics::{DecisionLabels, DirectionLabels, HandshakeLabels},
};
use bytes::Bytes;
use capstan_mesh::{ConnectionDecision, Decision, Identity, Policy, Request, svid};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{Response, StatusCode, body::Incoming, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::{net::SocketAddr, sync::Arc, time::Instant};
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
    super::accept_loop(shared, listener, "inbound", move |shared, tcp, peer| {
        handle(shared, tcp, peer, app_port)
    })
    .await;
}

async fn handle(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, app_port: u16) {
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

    let active = shared
        .metrics
        .active_connections
        .get_or_create(&DirectionLabels { direction: "inbound" })
        .clone();
    active.inc();
    let _guard = shared.track();
    let mut policy_rx = shared.policy.subscribe();
    let revoked = revoked(&mut policy_rx, &source, &me, mode);
    let mut shutdown = shared.shutdown.subscribe();
    let drained = async {
        let _ = shutdown.wait_for(|stop| *stop).await;
        tokio::time::sleep(shared.drain).await;
    };
    let served = async {
        match mode {
            Mode::Tcp => tunnel_to_app(tls, app_port).await,
            Mode::Http => serve_http(shared.clone(), tls, source.clone(), source_header, app_port).await,
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
    }
    active.dec();
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

async fn tunnel_to_app<S>(mut tls: S, app_port: u16)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, app_port)).await {
        Ok(mut app) => {
            let _ = app.set_nodelay(true);
            let _ = super::tunnel(&mut tls, &mut app).await;
        }
        Err(error) => tracing::warn!(%error, app_port, "The application refused a connection"),
    }
}

async fn serve_http<S>(
    shared: Arc<Shared>,
    tls: S,
    source: Identity,
    source_header: Option<header::HeaderValue>,
    app_port: u16,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let shared = shared.clone();
        let source = source.clone();
        let source_header = source_header.clone();
        async move {
            Ok::<_, std::convert::Infallible>(
                handle_request(&shared, &source, source_header, app_port, request).await,
            )
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
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

async fn handle_request(
    shared: &Shared,
    source: &Identity,
    source_header: Option<header::HeaderValue>,
    app_port: u16,
    request: hyper::Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let me = &shared.me;
    let policy = shared.policy.borrow().clone();
    let target = request
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    // Borrowed, not copied: only a header that is not valid UTF-8 is converted.
    let mut values: Vec<(&str, std::borrow::Cow<'_, str>)> = request
        .headers()
        .iter()
        .map(|(name, value)| (name.as_str(), String::from_utf8_lossy(value.as_bytes())))
        .collect();
    // HTTP/2 carries the host in :authority, which rules on "host" must see too (M4).
    if !request.headers().contains_key(header::HOST)
        && let Some(authority) = request.uri().authority()
    {
        values.push(("host", authority.as_str().into()));
    }
    let headers: Vec<(&str, &str)> = values.iter().map(|(n, v)| (*n, v.as_ref())).collect();
    let (decision, normalized) = policy.authorize(
        source,
        me,
        &Request {
            method: request.method().as_str(),
            target: &target,
            headers: &headers,
        },
    );
    let by = decision.by.to_string();
    shared
        .metrics
        .requests
        .get_or_create(&labels(source, me, decision.allow, by.clone()))
        .inc();
    let response = match normalized.filter(|_| decision.allow) {
        Some(path) => forward(shared, source_header, app_port, &path, &target, request).await,
        None => {
            tracing::info!(
                %source, destination = %me, method = %request.method(), path = %target,
                decided_by = %decision.by, "Request denied"
            );
            let body = format!(
                "capstan: {} {} denied by {by}\n",
                request.method(),
                path_only(&target),
            );
            let mut response = Response::new(full(body));
            *response.status_mut() = StatusCode::FORBIDDEN;
            if let Ok(value) = header::HeaderValue::from_str(&by) {
                response.headers_mut().insert(DECIDED_BY_HEADER, value);
            }
            response
        }
    };
    shared
        .metrics
        .request_duration
        .get_or_create(&DirectionLabels { direction: "inbound" })
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Sends an allowed request to the application with the normalized path the decision
/// was made on (M3: the rule and the application never see two different paths).
async fn forward(
    shared: &Shared,
    source_header: Option<header::HeaderValue>,
    app_port: u16,
    normalized: &str,
    target: &str,
    request: hyper::Request<Incoming>,
) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let query = target.split_once('?').map(|(_, q)| q);
    let uri = match query {
        Some(q) => format!("http://127.0.0.1:{app_port}{normalized}?{q}"),
        None => format!("http://127.0.0.1:{app_port}{normalized}"),
    };
    let mut upstream = hyper::Request::builder().method(parts.method.clone()).uri(uri);
    for (name, value) in &parts.headers {
        if is_hop_by_hop(name) || name == SOURCE_HEADER {
            continue;
        }
        upstream = upstream.header(name, value);
    }
    if let Some(authority) = parts.uri.authority()
        && !parts.headers.contains_key(header::HOST)
    {
        upstream = upstream.header(header::HOST, authority.as_str());
    }
    if let Some(source) = source_header {
        upstream = upstream.header(SOURCE_HEADER, source);
    }
    let Ok(upstream) = upstream.body(body.boxed()) else {
        return status(StatusCode::BAD_REQUEST);
    };
    match shared.app_client.request(upstream).await {
        Ok(response) => response.map(|b| b.boxed()),
        Err(error) => {
            tracing::warn!(error = %error, "Forwarding to the application failed");
            status(StatusCode::BAD_GATEWAY)
        }
    }
}

fn path_only(target: &str) -> &str {
    target.split_once('?').map_or(target, |(p, _)| p)
}

fn is_hop_by_hop(name: &header::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade" | "te" | "trailer"
    )
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).map_err(|never| match never {}).boxed()
}

fn status(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(full(code.canonical_reason().unwrap_or_default().to_owned()));
    *response.status_mut() = code;
    response
}
