//! `capstan-sidecar proxy`: the mTLS sidecar. Its parts, each in its own module:
//! credentials (certificate from the mesh CA, renewal), intentions (watched, compiled),
//! directory (Services and EndpointSlices), inbound (the mTLS listener's pipeline, as
//! tower layers: TLS, identity, L4 authorization, HTTP, L7 authorization, forward),
//! outbound (upstream and transparent listeners), admin (/ready, app probes). The mux
//! (application connections as streams of one connection between two sidecars) is in
//! the crate's library (`src/mux.rs`), where its fuzz target reaches it.

mod admin;
mod app_connections;
pub mod args;
mod ca_client;
mod credentials;
mod directory;
mod http1;
mod inbound;
mod intentions;
mod metrics;
mod outbound;
mod tunnel;

use capstan_sidecar::mux;

use tunnel::tunnel;

use anyhow::Context as _;
use args::{DefaultAction, ProtocolArg, ProxyArgs};
use bytes::Bytes;
use capstan_mesh::{Identity, Policy, svid::SpiffeId};
use capstan_telemetry::{AdminServer, Health};
use http_body_util::{BodyExt as _, Empty, combinators::BoxBody};
use hyper_util::{
    client::legacy::Client as HttpClient, client::legacy::connect::HttpConnector, rt::TokioExecutor,
};
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
use tokio::{net::TcpListener, sync::watch};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type AppClient = HttpClient<HttpConnector, BoxBody<Bytes, hyper::Error>>;

fn empty_body() -> BoxBody<Bytes, hyper::Error> {
    Empty::<Bytes>::new().map_err(|never| match never {}).boxed()
}

/// How inbound traffic is understood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Tcp,
    Http,
}

type Muxes =
    std::collections::HashMap<(String, std::net::IpAddr), (Arc<mux::Client>, Arc<credentials::Credentials>)>;

/// What every connection task reads.
struct Shared {
    me: Identity,
    trust_domain: String,
    protocol: ProtocolArg,
    peer_inbound_port: u16,
    credentials: watch::Receiver<Option<Arc<credentials::Credentials>>>,
    policy: watch::Sender<Arc<Policy>>,
    intentions_synced: watch::Receiver<bool>,
    directory: directory::Directory,
    /// The outbound side's shared connections to other sidecars, by destination and
    /// endpoint, with the credentials each was made with.
    muxes: parking_lot::Mutex<Muxes>,
    metrics: metrics::Metrics,
    app_client: AppClient,
    shutdown: watch::Sender<bool>,
    drain: Duration,
    open: Arc<AtomicUsize>,
}

impl Shared {
    /// This workload's protocol, read at each new connection so a Service's
    /// appProtocol change applies without a restart.
    fn mode(&self, app_port: u16) -> Mode {
        let http = match self.protocol {
            ProtocolArg::Http => true,
            ProtocolArg::Tcp => false,
            ProtocolArg::Auto => self
                .directory
                .speaks_http(&self.me.namespace, &self.me.name, app_port)
                .unwrap_or(false),
        };
        if http { Mode::Http } else { Mode::Tcp }
    }

    /// Counts an open connection until the guard drops (shutdown waits for them).
    fn track(&self) -> OpenGuard {
        self.open.fetch_add(1, Ordering::SeqCst);
        OpenGuard(self.open.clone())
    }
}

struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Accepts connections until shutdown, each handled on its own task.
async fn accept_loop<F, Fut>(shared: Arc<Shared>, listener: TcpListener, what: &'static str, handle: F)
where
    F: Fn(Arc<Shared>, tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(handle(shared.clone(), tcp, peer));
            }
            Err(error) => {
                // Out of file descriptors, say: back off instead of spinning.
                tracing::warn!(%error, "Accepting an {what} connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What a failed handshake's error says, for the log line: the SVID rule a certificate
/// broke when that was the reason (M7: "reason logged").
fn handshake_error_text(error: &std::io::Error) -> String {
    error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .map_or_else(|| error.to_string(), capstan_mesh::svid::describe_tls_error)
}

/// A short, stable reason for a failed handshake: a metric label and a log field.
fn handshake_reason(error: &std::io::Error) -> &'static str {
    use rustls::{AlertDescription, CertificateError, Error};
    let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return "io";
    };
    match tls {
        Error::NoCertificatesPresented => "no_client_certificate",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_issuer",
        Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            "expired"
        }
        Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "not_yet_valid",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::InvalidMessage(_) => "not_tls",
        Error::AlertReceived(AlertDescription::BadCertificate | AlertDescription::UnknownCA) => {
            "peer_refused_certificate"
        }
        Error::AlertReceived(AlertDescription::CertificateRequired) => "peer_requires_certificate",
        Error::AlertReceived(_) => "peer_alert",
        Error::PeerIncompatible(_) | Error::NoApplicationProtocol => "incompatible",
        _ => "other",
    }
}

/// A listener on an IPv6 address only (beside the IPv4 one on the same port), or None
/// when the pod has no IPv6: then nothing can arrive over it, and `init` has dropped
/// IPv6 TCP or found IPv6 off.
fn bind_ipv6(addr: SocketAddr) -> Option<TcpListener> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
        socket.set_only_v6(true)?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    };
    match bind() {
        Ok(listener) => {
            tracing::info!(%addr, "IPv6 listener");
            Some(listener)
        }
        Err(error) => {
            tracing::info!(%addr, %error, "No IPv6 listener: the pod has no IPv6");
            None
        }
    }
}

pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    let identity = SpiffeId::new(&args.trust_domain, &args.namespace, &args.service_account);
    let initial_roots = match (&args.ca_bundle, &args.ca_bundle_file) {
        (Some(pem), _) => pem.clone(),
        (None, Some(path)) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        (None, None) => {
            anyhow::bail!(
                "the mesh trust bundle is required ({} or CAPSTAN_CA_BUNDLE_FILE)",
                capstan_contract::env::proxy::CA_BUNDLE
            )
        }
    };
    let ca = ca_client::CaClient::new(&args.ca_url)?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
    let mut registry = capstan_telemetry::registry("capstan_sidecar");
    let metrics = metrics::Metrics::register(&mut registry);

    let (credentials_tx, credentials_rx) = watch::channel(None);
    let (policy_tx, _) = watch::channel(Arc::new(Policy::compile(
        &[],
        args.default_action == DefaultAction::Allow,
        &args.control_namespace,
    )));
    let (synced_tx, synced_rx) = watch::channel(false);
    let directory = directory::Directory::start(client.clone());
    let (shutdown_tx, _) = watch::channel(false);
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let shared = Arc::new(Shared {
        me: Identity::new(&args.namespace, &args.service_account),
        trust_domain: args.trust_domain.clone(),
        protocol: args.protocol,
        peer_inbound_port: args.peer_inbound_port,
        credentials: credentials_rx.clone(),
        policy: policy_tx.clone(),
        intentions_synced: synced_rx,
        directory: directory.clone(),
        muxes: parking_lot::Mutex::new(std::collections::HashMap::new()),
        metrics: metrics.clone(),
        app_client: HttpClient::builder(TokioExecutor::new()).build(http),
        shutdown: shutdown_tx.clone(),
        drain: args.drain,
        open: Arc::new(AtomicUsize::new(0)),
    });
    tracing::info!(identity = %identity, pod = %args.pod_name, "Starting the mesh proxy");

    tokio::spawn(
        credentials::Issuer {
            ca,
            identity: identity.clone(),
            token_file: args.token_file.clone(),
            roots_refresh: args.roots_refresh,
            metrics: metrics.clone(),
        }
        .run(initial_roots, credentials_tx),
    );
    tokio::spawn(intentions::watch(
        client.clone(),
        args.default_action == DefaultAction::Allow,
        args.control_namespace.clone(),
        policy_tx,
        synced_tx,
        metrics.clone(),
    ));

    let admin = AdminServer::bind(args.admin_addr, registry, Health::default())
        .await?
        .with_routes(admin::routes(shared.clone(), &args.app_probes.0));
    let admin_shutdown = {
        let mut rx = shutdown_tx.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let admin_task = tokio::spawn(admin.serve(admin_shutdown));

    let mut tasks = Vec::new();
    if let Some(app_port) = args.app_port {
        let addr = SocketAddr::new(args.inbound_ip, args.inbound_port);
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the inbound listener {addr}"))?;
        tracing::info!(%addr, app_port, "Inbound mTLS listener");
        tasks.push(tokio::spawn(inbound::serve(shared.clone(), listener, app_port)));
        // A dual-stack pod: IPv6 peers, and IPv6 redirected by `init`, arrive here too.
        if args.inbound_ip == std::net::IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED)
            && let Some(listener) = bind_ipv6(SocketAddr::from((
                std::net::Ipv6Addr::UNSPECIFIED,
                args.inbound_port,
            )))
        {
            tasks.push(tokio::spawn(inbound::serve(shared.clone(), listener, app_port)));
        }
    }
    for upstream in &args.upstreams.0 {
        let addr = SocketAddr::from(([127, 0, 0, 1], upstream.local_port));
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the upstream listener {addr}"))?;
        let namespace = upstream
            .namespace
            .clone()
            .unwrap_or_else(|| args.namespace.clone());
        tracing::info!(%addr, destination = %format!("{namespace}/{}", upstream.service), "Upstream listener");
        let route = outbound::Route::Upstream {
            namespace,
            service: upstream.service.clone(),
        };
        tasks.push(tokio::spawn(outbound::serve(shared.clone(), listener, route)));
    }
    if let Some(port) = args.outbound_port {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the transparent listener {addr}"))?;
        tracing::info!(%addr, "Transparent outbound listener");
        tasks.push(tokio::spawn(outbound::serve(
            shared.clone(),
            listener,
            outbound::Route::Transparent,
        )));
        // IPv6 the application sends is redirected to [::1].
        if let Some(listener) = bind_ipv6(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))) {
            tasks.push(tokio::spawn(outbound::serve(
                shared.clone(),
                listener,
                outbound::Route::Transparent,
            )));
        }
    }

    capstan_telemetry::shutdown_signal().await;
    tracing::info!(
        open = shared.open.load(Ordering::SeqCst),
        "Stopping: no new connections, draining open ones"
    );
    shutdown_tx.send_replace(true);
    let deadline = tokio::time::Instant::now() + args.drain;
    while shared.open.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for task in tasks {
        task.abort();
    }
    let _ = admin_task.await;
    tracing::info!("Stopped");
    Ok(())
}
