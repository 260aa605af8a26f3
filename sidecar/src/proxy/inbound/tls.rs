//! The first stage: the mTLS handshake, with the credentials in force when the connection
//! arrived. Refused before any byte is read while this workload has no certificate yet.
//! Handshake failures are counted by reason and logged with the SVID rule a certificate
//! broke (M7); the handshake is bounded by HANDSHAKE_TIMEOUT.

use super::{super::credentials::Credentials, Accepted, Serve, Shared};
use crate::proxy::metrics::{DirectionLabels, HandshakeLabels};
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Instant};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tower::{Service, ServiceExt as _};

/// A connection whose handshake succeeded: what the identity stage is given.
pub struct Handshaken {
    pub tls: TlsStream<TcpStream>,
    pub addr: SocketAddr,
    /// The credentials the handshake verified the peer's chain with.
    pub credentials: Arc<Credentials>,
}

/// The TLS stage: `inner` is given each connection whose handshake succeeded.
#[derive(Clone)]
pub struct Tls<S> {
    pub(super) shared: Arc<Shared>,
    pub(super) inner: S,
}

impl<S> Serve<Accepted> for Tls<S>
where
    S: Service<Handshaken, Response = (), Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    fn serve(&self, Accepted { tcp, addr }: Accepted) -> impl Future<Output = ()> + Send + 'static {
        let (shared, inner) = (self.shared.clone(), self.inner.clone());
        async move {
            let Some(credentials) = shared.credentials.borrow().clone() else {
                tracing::debug!(peer = %addr, "Refusing a connection: no certificate yet");
                return;
            };
            let Some(tls) = handshake(&shared, &credentials, tcp, addr).await else {
                return;
            };
            let Ok(()) = inner
                .oneshot(Handshaken {
                    tls,
                    addr,
                    credentials,
                })
                .await;
        }
    }
}

async fn handshake(
    shared: &Shared,
    credentials: &Credentials,
    tcp: TcpStream,
    addr: SocketAddr,
) -> Option<TlsStream<TcpStream>> {
    let started = Instant::now();
    let acceptor = TlsAcceptor::from(credentials.server_config.clone());
    let failed = |reason: &str| {
        shared
            .metrics
            .handshake_failures
            .get_or_create(&HandshakeLabels {
                direction: "inbound",
                reason: reason.to_owned(),
            })
            .inc();
    };
    match tokio::time::timeout(crate::proxy::HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => {
            shared
                .metrics
                .handshake_duration
                .get_or_create(&DirectionLabels { direction: "inbound" })
                .observe(started.elapsed().as_secs_f64());
            Some(tls)
        }
        Ok(Err(error)) => {
            let reason = crate::proxy::handshake_reason(&error);
            tracing::info!(peer = %addr, reason, error = crate::proxy::handshake_error_text(&error), "Inbound TLS handshake refused");
            failed(reason);
            None
        }
        Err(_) => {
            failed("timeout");
            None
        }
    }
}
