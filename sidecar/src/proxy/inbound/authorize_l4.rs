//! The third stage: the connection decision. A plain-TCP destination is decided here
//! once; an HTTP one here only when the source's rule is L4 (else each request is, in
//! `authorize_l7`). An allowed connection stays open while the intentions, as they
//! change, still allow it, and until the drain after shutdown; a mux connection's streams
//! are each served by the next stage as a connection of their own would be.

use super::{Mode, Peer, Serve, Shared, identity::Identified, labels};
use crate::proxy::{credentials, mux};
use capstan_mesh::{ConnectionDecision, Decision, Identity, Policy};
use std::{convert::Infallible, sync::Arc};
use tokio::{net::TcpStream, sync::watch};
use tokio_rustls::server::TlsStream;
use tower::{Service, ServiceExt as _};

/// An allowed connection, or one stream of it: what the HTTP stage is given.
pub struct Authorized<Io> {
    pub io: Io,
    pub peer: Arc<Peer>,
    pub mode: Mode,
}

/// The L4 authorization stage: `inner` serves each allowed connection, or each stream of
/// an allowed mux connection, while the intentions allow it.
#[derive(Clone)]
pub struct AuthorizeL4<S> {
    pub(super) shared: Arc<Shared>,
    pub(super) app_port: u16,
    pub(super) inner: S,
}

impl<S> Serve<Identified> for AuthorizeL4<S>
where
    S: Service<Authorized<TlsStream<TcpStream>>, Response = (), Error = Infallible>
        + Service<Authorized<mux::Stream>, Response = (), Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    <S as Service<Authorized<TlsStream<TcpStream>>>>::Future: Send,
    <S as Service<Authorized<mux::Stream>>>::Future: Send + 'static,
{
    fn serve(&self, Identified { tls, peer }: Identified) -> impl Future<Output = ()> + Send + 'static {
        let (shared, inner) = (self.shared.clone(), self.inner.clone());
        // Read at each new connection, so a Service's appProtocol change applies without
        // a restart.
        let mode = shared.mode(self.app_port);
        async move {
            let (source, me) = (&peer.source, &shared.me);
            let decision = connection_decision(&shared.policy.borrow(), source, me, mode);
            let by = decision
                .as_ref()
                .map_or("per request".to_owned(), |d| d.by.to_string());
            let allowed = decision.as_ref().is_none_or(|d| d.allow);
            shared
                .metrics
                .inbound_connections
                .get_or_create(&labels(source, me, allowed, by.clone()))
                .inc();
            if !allowed {
                tracing::info!(%source, destination = %me, decided_by = %by, "Connection denied");
                return;
            }
            tracing::debug!(%source, destination = %me, decided_by = %by, "Connection allowed");

            let _mesh_connection = shared.metrics.mesh_connection("inbound");
            let _guard = shared.track();
            let mut policy_rx = shared.policy.subscribe();
            let revoked = revoked(&mut policy_rx, source, me, mode);
            let mut shutdown = shared.shutdown.subscribe();
            let drained = async {
                let _ = shutdown.wait_for(|stop| *stop).await;
                tokio::time::sleep(shared.drain).await;
            };
            let served = {
                let peer = peer.clone();
                async move {
                    if credentials::speaks_mux(tls.get_ref().1) {
                        mux::serve(tls, move |io| {
                            let stream = inner.clone().oneshot(Authorized {
                                io,
                                peer: peer.clone(),
                                mode,
                            });
                            async move {
                                let Ok(()) = stream.await;
                            }
                        })
                        .await;
                    } else {
                        let Ok(()) = inner.oneshot(Authorized { io: tls, peer, mode }).await;
                    }
                }
            };
            tokio::select! {
                () = served => {}
                decision = revoked => {
                    shared
                        .metrics
                        .connections_closed_by_policy
                        .get_or_create(&labels(source, me, false, decision.by.to_string()))
                        .inc();
                    tracing::info!(%source, destination = %me, decided_by = %decision.by, "Closing an established connection: an intention no longer allows it");
                }
                () = drained => {}
            }
        }
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
