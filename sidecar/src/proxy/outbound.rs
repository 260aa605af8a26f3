//! The outbound side: the application talks plain TCP to a loopback listener (declared
//! upstreams) or is redirected to the transparent listener; the proxy dials the
//! destination's sidecar with mTLS and accepts it only if its SVID is the destination's
//! identity (M9). Application connections to the same endpoint share one such connection
//! as streams (`mux.rs`) when the peer speaks it, and get a tunnel of their own when not.
//! Ports a Service does not declare are refused (M18); addresses outside the mesh's
//! directory pass through unchanged.

use super::{
    Shared,
    directory::Lookup,
    metrics::{DirectionLabels, HandshakeLabels, OutboundLabels},
};
use capstan_mesh::svid::SpiffeId;
use rand::seq::SliceRandom as _;
use rustls::pki_types::ServerName;
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Where an accepted connection goes.
#[derive(Clone, Debug)]
pub enum Route {
    /// A declared upstream: always this service.
    Upstream { namespace: String, service: String },
    /// The transparent listener: wherever the application dialled.
    Transparent,
}

pub async fn serve(shared: Arc<Shared>, listener: TcpListener, route: Route) {
    super::accept_loop(shared, listener, "outbound", move |shared, tcp, _| {
        handle(shared, tcp, route.clone())
    })
    .await;
}

async fn handle(shared: Arc<Shared>, mut app: TcpStream, route: Route) {
    let (namespace, service) = match route {
        Route::Upstream { namespace, service } => (namespace, service),
        Route::Transparent => {
            let Some(original) = original_destination(&app) else {
                tracing::warn!("A redirected connection has no original destination; closing it");
                return;
            };
            match shared.directory.lookup(original.ip(), original.port()) {
                Lookup::Service { namespace, name } => (namespace, name),
                Lookup::UndeclaredPort { namespace, name } => {
                    tracing::info!(destination = %format!("{namespace}/{name}"), port = original.port(), "Refusing a port the destination Service does not declare");
                    count(&shared, format!("{namespace}/{name}"), "refused_port");
                    return;
                }
                Lookup::Unknown => {
                    passthrough(&shared, app, original).await;
                    return;
                }
            }
        }
    };
    let destination = format!("{namespace}/{service}");
    let Some(credentials) = shared.credentials.borrow().clone() else {
        tracing::warn!(%destination, "No certificate yet; closing an outbound connection");
        return;
    };
    let expected = SpiffeId::new(&shared.trust_domain, &namespace, &service);
    let config = match credentials.client_config(&expected) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(
                error = format!("{error:#}"),
                "Building a client TLS config failed"
            );
            return;
        }
    };
    let mut endpoints = shared.directory.endpoints(&namespace, &service);
    if endpoints.is_empty() {
        tracing::info!(%destination, "No ready endpoints");
        count(&shared, destination, "no_endpoints");
        return;
    }
    endpoints.shuffle(&mut rand::rng());
    let connector = TlsConnector::from(config);
    for ip in endpoints {
        // A stream of the connection already open to this endpoint, if there is one
        // (made with the current certificate).
        let pooled = {
            let muxes = shared.muxes.lock();
            muxes
                .get(&(destination.clone(), ip))
                .filter(|(client, made_with)| !client.is_closed() && Arc::ptr_eq(made_with, &credentials))
                .map(|(client, _)| client.clone())
        };
        // (None when it is full: a new connection below takes its place in the pool,
        // and it closes once its streams have ended.)
        if let Some(mut stream) = pooled.and_then(|client| client.open()) {
            carry(&shared, destination, &mut app, &mut stream).await;
            return;
        }
        let address = SocketAddr::new(ip, shared.peer_inbound_port);
        let started = Instant::now();
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(error)) => {
                tracing::debug!(%destination, %address, %error, "Endpoint unreachable; trying the next");
                continue;
            }
            Err(_) => continue,
        };
        let _ = tcp.set_nodelay(true);
        // The name is not checked (the verifier checks the SPIFFE ID); rustls needs one.
        let name = ServerName::try_from("capstan.mesh").expect("a valid DNS name");
        match tokio::time::timeout(
            super::HANDSHAKE_TIMEOUT,
            connector.connect(name, super::tunnel::ReadAhead::new(tcp)),
        )
        .await
        {
            Ok(Ok(mut tls)) => {
                shared
                    .metrics
                    .handshake_duration
                    .get_or_create(&DirectionLabels {
                        direction: "outbound",
                    })
                    .observe(started.elapsed().as_secs_f64());
                let mesh_connection = shared.metrics.mesh_connection("outbound");
                if !super::credentials::speaks_mux(tls.get_ref().1) {
                    carry(&shared, destination, &mut app, &mut tls).await;
                    return;
                }
                let client = super::mux::Client::start(tls, mesh_connection);
                let Some(mut stream) = client.open() else { continue };
                {
                    let mut muxes = shared.muxes.lock();
                    // Connections that ended leave the pool here.
                    muxes.retain(|_, (client, _)| !client.is_closed());
                    muxes.insert((destination.clone(), ip), (client, credentials.clone()));
                }
                carry(&shared, destination, &mut app, &mut stream).await;
                return;
            }
            Ok(Err(error)) => {
                let reason = super::handshake_reason(&error);
                tracing::warn!(%destination, %address, reason, error = super::handshake_error_text(&error), "Outbound TLS handshake failed");
                shared
                    .metrics
                    .handshake_failures
                    .get_or_create(&HandshakeLabels {
                        direction: "outbound",
                        reason: reason.to_owned(),
                    })
                    .inc();
            }
            Err(_) => {
                shared
                    .metrics
                    .handshake_failures
                    .get_or_create(&HandshakeLabels {
                        direction: "outbound",
                        reason: "timeout".to_owned(),
                    })
                    .inc();
            }
        }
    }
    count(&shared, destination, "unreachable");
}

/// Carries the application's connection to the destination's sidecar, on its own
/// mesh connection or a stream of a shared one, until both sides have closed.
async fn carry<S: super::tunnel::Side>(
    shared: &Shared,
    destination: String,
    app: &mut TcpStream,
    mesh: &mut S,
) {
    count(shared, destination, "connected");
    let _active = shared.metrics.application_connection("outbound");
    let _guard = shared.track();
    let _ = super::tunnel(app, mesh).await;
}

fn count(shared: &Shared, destination: String, result: &'static str) {
    shared
        .metrics
        .outbound_connections
        .get_or_create(&OutboundLabels { destination, result })
        .inc();
}

/// Traffic to an address outside the mesh goes where the application sent it.
async fn passthrough(shared: &Shared, mut app: TcpStream, original: SocketAddr) {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(original)).await {
        Ok(Ok(mut upstream)) => {
            let _guard = shared.track();
            let _ = super::tunnel(&mut app, &mut upstream).await;
        }
        _ => tracing::debug!(%original, "Passthrough destination unreachable"),
    }
}

/// Where the application meant to connect before the redirect (SO_ORIGINAL_DST).
fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let socket = socket2::SockRef::from(stream);
    let local = stream.local_addr().ok()?;
    let original = match local.ip() {
        IpAddr::V4(_) => socket.original_dst_v4(),
        IpAddr::V6(_) => socket.original_dst_v6(),
    };
    original.ok()?.as_socket()
}
