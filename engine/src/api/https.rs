//! HTTPS only: the engine's listener serves TLS 1.3 with a certificate the mesh CA
//! issues to the engine itself, so a client that trusts the mesh roots can reach it.
//! The certificate is re-issued at half its life and whenever the signing CA changes
//! (a rotation); until the first one exists, handshakes fail closed.

use crate::mesh_ca::MeshCaService;
use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use parking_lot::RwLock;
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use std::{fmt, sync::Arc, time::Duration};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// How long a client has to finish the TLS handshake, and to send its request headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The serving certificate in force.
#[derive(Default)]
pub struct ServingCert {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert")
            .field("loaded", &self.current.read().is_some())
            .finish()
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().clone()
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 only, no client certificates (callers prove themselves with a token), and no
/// session resumption: a resumed session would skip validating the certificate against
/// a trust bundle that may have changed since (RELIABILITY M13).
pub fn server_config(resolver: Arc<ServingCert>) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Keeps `resolver` holding a current certificate for `names`, valid for `ttl`.
pub async fn keep_serving_cert(
    ca: MeshCaService,
    resolver: Arc<ServingCert>,
    names: Vec<String>,
    ttl: Duration,
) {
    let mut changes = ca.subscribe();
    loop {
        let current = changes.borrow_and_update().clone();
        let mut wait = Duration::from_secs(5);
        if let Some(current) = current {
            match issue(&current.material, &names, ttl) {
                Ok((key, lifetime)) => {
                    *resolver.current.write() = Some(Arc::new(key));
                    tracing::info!(names = ?names, valid_for = ?lifetime, "Serving certificate issued by the mesh CA");
                    wait = (lifetime / 2).max(Duration::from_secs(1));
                }
                Err(error) => tracing::error!(%error, "Issuing the serving certificate; retrying"),
            }
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(wait) => {}
        }
    }
}

fn issue(
    material: &crate::mesh_ca::secret::Material,
    names: &[String],
    ttl: Duration,
) -> anyhow::Result<(CertifiedKey, Duration)> {
    let (cert_pem, key_pem) = material.ca.issue_serving(names, ttl)?;
    let mut chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes())?];
    for intermediate in &material.chain {
        chain.push(CertificateDer::from_pem_slice(intermediate.as_bytes())?);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let certified = CertifiedKey::from_der(chain, key, &provider())?;
    let lifetime = (material.ca.not_after() - time::OffsetDateTime::now_utc())
        .try_into()
        .unwrap_or(Duration::ZERO)
        .min(ttl);
    Ok((certified, lifetime))
}

/// Serves `router` over TLS on `listener` until `shutdown` resolves; connections in
/// flight then get a few seconds to finish.
pub async fn serve(
    listener: TcpListener,
    config: ServerConfig,
    router: Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    tracing::info!(addr = ?listener.local_addr().ok(), "Serving the engine API over HTTPS");
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "Accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
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
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service);
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%peer, %error, "Connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("Connections still open after 5s; closing them");
    }
}
