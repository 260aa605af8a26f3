//! capstan-webhook: Capstan's admission webhooks.
//!
//! - `/mutate-pods` injects the mesh sidecar into the pods capstan-mesh's `selection` picks
//!   (labelled namespaces, annotated pods) and the secrets agent into pods that ask for it
//!   (`inject`, pure functions of the library), and refuses pods that would defeat the
//!   mesh (M16);
//! - `/validate-serviceintentions` refuses the ServiceIntentions the CRD schema cannot
//!   (capstan-mesh's `validate`, shared with the reconciler);
//! - `/validate-ephemeralcontainers` refuses ephemeral containers (`kubectl debug`) that
//!   could undo a meshed pod's redirect (M16);
//! - `/validate-jobs` refuses the Jobs the CRD schema cannot (capstan-jobs' `validate`,
//!   shared with the controller) and dispatched children their parent does not allow.
//!
//! It serves HTTPS with a certificate it mints and rotates itself (see `certs`), kept in a
//! Secret its replicas share, and keeps the `caBundle` of its webhook configurations
//! current. Out of the cluster (tests, hack/run.sh), `--external-url` makes it point the
//! configurations at itself by URL instead of by Service.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod admission;
mod certs;
mod engine_address;
mod metrics;
mod rotation;

use anyhow::Context as _;
use capstan_mesh::selection;
use capstan_telemetry::{Health, LoggingArgs, Stop, spawn_admin};
use capstan_webhook::inject;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, reflector, watcher},
};
use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(name = "capstan-webhook", version, about)]
struct Args {
    #[command(flatten)]
    logging: LoggingArgs,
    /// Where /healthz and /metrics are served.
    #[arg(long, env = "CAPSTAN_WEBHOOK_ADMIN_ADDR", default_value = "127.0.0.1:8081")]
    admin_addr: SocketAddr,
    /// Where admission (HTTPS) is served.
    #[arg(long, env = "CAPSTAN_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Capstan's namespace: the Secret, the mesh roots ConfigMap, never meshed itself.
    #[arg(long, env = "CAPSTAN_WEBHOOK_NAMESPACE", default_value = "capstan-system")]
    namespace: String,
    /// The Service the API server reaches the webhook through (its DNS names go into the
    /// serving certificate).
    #[arg(long, env = "CAPSTAN_WEBHOOK_SERVICE", default_value = "capstan-webhook")]
    service: String,
    /// The Secret holding the webhook's CA and serving certificate.
    #[arg(
        long,
        env = "CAPSTAN_WEBHOOK_TLS_SECRET",
        default_value = "capstan-webhook-tls"
    )]
    tls_secret: String,
    /// The MutatingWebhookConfiguration whose caBundle this process keeps current.
    #[arg(
        long,
        env = "CAPSTAN_WEBHOOK_MUTATING_CONFIG",
        default_value = "capstan-webhook"
    )]
    mutating_config: String,
    /// The ValidatingWebhookConfiguration whose caBundle this process keeps current.
    #[arg(
        long,
        env = "CAPSTAN_WEBHOOK_VALIDATING_CONFIG",
        default_value = "capstan-webhook"
    )]
    validating_config: String,
    /// Out of the cluster: the base URL (https://127.0.0.1:PORT) the API server calls
    /// instead of the Service; written into the configurations' clientConfig.
    #[arg(long, env = "CAPSTAN_WEBHOOK_EXTERNAL_URL")]
    external_url: Option<String>,
    /// Lifetime of the webhook's CA.
    #[arg(long, env = "CAPSTAN_WEBHOOK_CA_VALIDITY_SECONDS", default_value_t = 365 * 86400)]
    ca_validity_seconds: u64,
    /// Lifetime of the serving certificate (renewed with a third of it left).
    #[arg(long, env = "CAPSTAN_WEBHOOK_CERT_VALIDITY_SECONDS", default_value_t = 30 * 86400)]
    cert_validity_seconds: u64,
    /// How long a new CA is trusted in the caBundle before it signs the served leaf.
    #[arg(long, env = "CAPSTAN_WEBHOOK_CA_PROMOTE_AFTER_SECONDS", default_value_t = 300)]
    ca_promote_after_seconds: u64,
    /// How often the certificate and the configurations are checked.
    #[arg(long, env = "CAPSTAN_WEBHOOK_ROTATION_CHECK_SECONDS", default_value_t = 60)]
    rotation_check_seconds: u64,
    /// The image injected pods run the proxy from.
    #[arg(long, env = "CAPSTAN_WEBHOOK_PROXY_IMAGE", default_value = "capstan:0.1.0")]
    proxy_image: String,
    #[arg(long, env = "CAPSTAN_WEBHOOK_PROXY_IMAGE_PULL_POLICY")]
    proxy_image_pull_policy: Option<String>,
    /// The capstan-sidecar executable inside that image.
    #[arg(
        long,
        env = "CAPSTAN_WEBHOOK_SIDECAR_COMMAND",
        default_value = "/usr/local/bin/capstan-sidecar"
    )]
    sidecar_command: String,
    /// The mesh CA endpoint proxies get certificates from (default: the engine Service).
    #[arg(long, env = "CAPSTAN_WEBHOOK_CA_URL")]
    ca_url: Option<String>,
    /// The SPIFFE trust domain proxies take their identities in.
    #[arg(long, env = "CAPSTAN_WEBHOOK_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// What proxies apply when no intention matches: deny, or allow (for migrations only).
    #[arg(long, env = "CAPSTAN_WEBHOOK_DEFAULT_ACTION", value_parser = ["deny", "allow"], default_value = "deny")]
    default_action: String,
    /// The ConfigMap (in --namespace) the engine publishes the mesh roots in.
    #[arg(
        long,
        env = "CAPSTAN_WEBHOOK_ROOTS_CONFIGMAP",
        default_value = capstan_contract::ROOTS_CONFIGMAP
    )]
    roots_configmap: String,
    /// Namespaces never meshed, besides kube-system and --namespace (always excluded).
    #[arg(
        long = "exclude-namespace",
        env = "CAPSTAN_WEBHOOK_EXCLUDE_NAMESPACES",
        value_delimiter = ','
    )]
    exclude_namespaces: Vec<String>,
    /// Outbound CIDRs the redirect leaves alone (comma list).
    #[arg(long, env = "CAPSTAN_WEBHOOK_EXCLUDE_OUTBOUND_CIDRS", value_delimiter = ',')]
    exclude_outbound_cidrs: Vec<String>,
    #[arg(long, env = "CAPSTAN_WEBHOOK_PROXY_CPU_REQUEST", default_value = "10m")]
    proxy_cpu_request: String,
    #[arg(long, env = "CAPSTAN_WEBHOOK_PROXY_MEMORY_REQUEST", default_value = "16Mi")]
    proxy_memory_request: String,
    #[arg(long, env = "CAPSTAN_WEBHOOK_PROXY_MEMORY_LIMIT", default_value = "64Mi")]
    proxy_memory_limit: String,
}

impl Args {
    /// The names the serving certificate is valid for.
    fn sans(&self) -> Vec<String> {
        let (svc, ns) = (&self.service, &self.namespace);
        let mut sans = vec![
            svc.clone(),
            format!("{svc}.{ns}"),
            format!("{svc}.{ns}.svc"),
            format!("{svc}.{ns}.svc.cluster.local"),
        ];
        if let Some(host) = self.external_url.as_deref().and_then(url_host) {
            sans.push(host);
        }
        sans
    }

    fn injection(&self) -> inject::Config {
        let mut excluded = vec!["kube-system".to_owned(), self.namespace.clone()];
        excluded.extend(self.exclude_namespaces.iter().filter(|n| !n.is_empty()).cloned());
        inject::Config {
            image: self.proxy_image.clone(),
            image_pull_policy: self.proxy_image_pull_policy.clone(),
            sidecar_command: self.sidecar_command.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            ca_url: self
                .ca_url
                .clone()
                .unwrap_or_else(|| format!("https://capstan-engine.{}.svc:8200", self.namespace)),
            trust_domain: self.trust_domain.clone(),
            default_allow: self.default_action == "allow",
            control_namespace: self.namespace.clone(),
            selection: selection::Config {
                excluded_namespaces: excluded,
            },
            proxy_cpu_request: self.proxy_cpu_request.clone(),
            proxy_memory_request: self.proxy_memory_request.clone(),
            proxy_memory_limit: self.proxy_memory_limit.clone(),
            exclude_outbound_cidrs: self
                .exclude_outbound_cidrs
                .iter()
                .filter(|c| !c.is_empty())
                .cloned()
                .collect(),
        }
    }
}

/// The host of an https URL, without brackets or port.
fn url_host(url: &str) -> Option<String> {
    let uri: hyper::Uri = url.parse().ok()?;
    uri.scheme()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.logging.init();
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "Starting capstan-webhook");

    let mut registry = capstan_telemetry::registry("capstan_webhook");
    let metrics = metrics::Metrics::register(&mut registry);
    let health = Health::default();
    let stop = Stop::on_signal();
    let admin = spawn_admin(args.admin_addr, registry, health.clone(), &stop).await?;

    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster)")?;

    let resolver = Arc::new(certs::Resolver::default());
    let rotator = rotation::Rotator {
        client: client.clone(),
        namespace: args.namespace.clone(),
        secret: args.tls_secret.clone(),
        sans: args.sans(),
        lifetimes: certs::Lifetimes {
            ca: Duration::from_secs(args.ca_validity_seconds),
            leaf: Duration::from_secs(args.cert_validity_seconds),
            promote_after: Duration::from_secs(args.ca_promote_after_seconds),
        },
        resolver: resolver.clone(),
        metrics: metrics.clone(),
        mutating: Some(args.mutating_config.clone()).filter(|n| !n.is_empty()),
        validating: Some(args.validating_config.clone()).filter(|n| !n.is_empty()),
        external_url: args.external_url.clone(),
    };
    // No admission is served before a certificate is: the first pass must succeed.
    loop {
        match rotator.run_once().await {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(error = %error, source = ?std::error::Error::source(&error), "Preparing the serving certificate; retrying");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            () = stop.stopped() => return Ok(admin.finish().await?),
        }
    }
    let rotation = tokio::spawn(rotator.run(Duration::from_secs(args.rotation_check_seconds)));

    // Namespace labels decide injection; a metadata-only watch keeps them at hand.
    let (namespaces, writer) = reflector::store();
    let namespace_watch = tokio::spawn(
        reflector(
            writer,
            watcher(
                Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .for_each(|_| futures::future::ready(())),
    );

    let config = args.injection();
    let engine = engine_address::EngineAddress::new(&config.ca_url);
    let engine_refresh = tokio::spawn(engine.clone().refresh_forever());
    let state = Arc::new(admission::AppState {
        client: client.clone(),
        config,
        namespaces,
        roots_namespace: args.namespace.clone(),
        roots_configmap: args.roots_configmap.clone(),
        roots: Default::default(),
        refreshing_roots: Default::default(),
        metrics: metrics.clone(),
        engine,
    });
    let tls = server_tls(resolver);
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(addr = %args.listen, "Serving admission");
    serve(
        listener,
        Arc::new(tls),
        admission::router(state),
        metrics,
        stop.clone(),
    )
    .await;

    rotation.abort();
    namespace_watch.abort();
    engine_refresh.abort();
    health.set(false);
    Ok(admin.finish().await?)
}

/// TLS 1.3 with the rotating certificate, offering h2 before HTTP/1.1.
fn server_tls(resolver: Arc<dyn rustls::server::ResolvesServerCert>) -> rustls::ServerConfig {
    let mut tls = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    // The API server's webhook client (Go's net/http) offers h2 for a webhook configured
    // by URL (--external-url) and multiplexes every concurrent call on one connection;
    // with HTTP/1.1 it opens a connection, and so a TLS handshake, per call in flight. For
    // a webhook configured by Service it offers only HTTP/1.1 (so that calls spread over
    // the replicas, kubernetes#75791): there, keep-alive (hyper's default, with no idle
    // timeout of ours) is what spares the handshakes.
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tls
}

/// Accepts TLS connections until shutdown, then lets in-flight requests finish.
async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: axum::Router,
    metrics: metrics::Metrics,
    stop: Stop,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "Accepting a connection");
                    continue;
                }
            },
            () = stop.stopped() => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let stop = stop.clone();
        let metrics = metrics.clone();
        connections.spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            // The protocol was settled by ALPN: no sniffing of the connection preface.
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let protocol = if h2 { "h2" } else { "http/1.1" };
            tracing::debug!(%peer, protocol, "Accepted a connection");
            metrics.connection(protocol);
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder = if h2 {
                builder.http2_only()
            } else {
                builder.http1_only()
            };
            let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop.stopped() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
    if tokio::time::timeout(Duration::from_secs(10), async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!("Connections still open after 10s; closing them");
    }
}

#[cfg(test)]
mod tests {
    use super::{metrics::Metrics, serve, server_tls, url_host};
    use capstan_telemetry::Stop;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use std::sync::Arc;

    /// Serves a trivial router the way main serves admission, on a self-signed
    /// certificate; returns the address, the certificate and the metrics text source.
    async fn server() -> (
        std::net::SocketAddr,
        rustls::pki_types::CertificateDer<'static>,
        prometheus_client::registry::Registry,
        Stop,
    ) {
        rustls::crypto::ring::default_provider().install_default().ok();
        let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let signing = rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
            key.signing_key.serialize_der().into(),
        ))
        .unwrap();
        let resolver = Arc::new(rustls::sign::SingleCertAndKey::from(
            rustls::sign::CertifiedKey::new(vec![key.cert.der().clone()], signing),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::register(&mut registry);
        let stop = Stop::new();
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(serve(
            listener,
            Arc::new(server_tls(resolver)),
            router,
            metrics,
            stop.clone(),
        ));
        (addr, key.cert.der().clone(), registry, stop)
    }

    /// A TLS connection offering `alpn`, as a client trusting `cert`.
    async fn connect(
        addr: std::net::SocketAddr,
        cert: rustls::pki_types::CertificateDer<'static>,
        alpn: &[&[u8]],
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap()
    }

    fn get() -> http::Request<axum::body::Body> {
        http::Request::get("https://localhost/")
            .body(axum::body::Body::empty())
            .unwrap()
    }

    fn connections(registry: &prometheus_client::registry::Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        // Sorted: a label family's series come in no set order.
        let mut lines: Vec<_> = text
            .lines()
            .filter(|l| l.starts_with("connections_total{"))
            .collect();
        lines.sort_unstable();
        lines.join("\n")
    }

    /// What Go's net/http (the API server's webhook client) offers, h2 first, gets h2, and
    /// concurrent calls share the one connection; an HTTP/1.1-only client is still served.
    #[tokio::test]
    async fn h2_is_negotiated_and_concurrent_calls_share_one_connection() {
        let (addr, cert, registry, stop) = server().await;

        let tls = connect(addr, cert.clone(), &[b"h2", b"http/1.1"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(connection);
        let calls = (0..4).map(|_| {
            let mut sender = sender.clone();
            async move { sender.send_request(get()).await }
        });
        for response in futures::future::join_all(calls).await {
            assert_eq!(response.unwrap().status(), 200);
        }

        let tls = connect(addr, cert, &[b"http/1.1"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(connection);
        assert_eq!(sender.send_request(get()).await.unwrap().status(), 200);

        assert_eq!(
            connections(&registry),
            "connections_total{protocol=\"h2\"} 1\nconnections_total{protocol=\"http/1.1\"} 1"
        );
        stop.stop();
    }

    #[test]
    fn the_external_urls_host_goes_into_the_certificate() {
        assert_eq!(url_host("https://127.0.0.1:9443").as_deref(), Some("127.0.0.1"));
        assert_eq!(url_host("https://[::1]:9443/x").as_deref(), Some("::1"));
        assert_eq!(
            url_host("https://webhook.example").as_deref(),
            Some("webhook.example")
        );
    }
}
