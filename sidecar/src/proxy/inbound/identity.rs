//! The second stage: the peer's identity, as its certificate proves it, for as long as it
//! proves it (M12): the connection, with every stream and request on it, ends when the
//! earliest notAfter of the chain the peer sent passes, or when the trust bundle changes
//! so that the chain no longer verifies (checked at each bundle change, never per
//! request).

use super::{Peer, Serve, Shared, labels, tls::Handshaken};
use crate::proxy::credentials::Credentials;
use capstan_mesh::svid;
use hyper::header::HeaderValue;
use rustls::pki_types::{CertificateDer, UnixTime};
use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, SystemTime},
};
use tokio::{net::TcpStream, sync::watch};
use tokio_rustls::server::TlsStream;
use tower::{Service, ServiceExt as _};

/// A connection whose peer is known: what the L4 authorization stage is given.
pub struct Identified {
    pub tls: TlsStream<TcpStream>,
    /// Shared, as it is made, by the stages after: its streams' and requests' source.
    pub peer: Arc<Peer>,
}

/// The identity stage: `inner` serves the connection until the peer's chain stops
/// proving its identity.
#[derive(Clone)]
pub struct PeerIdentity<S> {
    pub(super) shared: Arc<Shared>,
    pub(super) inner: S,
}

impl<S> Serve<Handshaken> for PeerIdentity<S>
where
    S: Service<Identified, Response = (), Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    fn serve(&self, connection: Handshaken) -> impl Future<Output = ()> + Send + 'static {
        let (shared, inner) = (self.shared.clone(), self.inner.clone());
        async move {
            let Handshaken {
                tls,
                addr,
                credentials,
            } = connection;
            let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
            // The verifier accepted the chain and SVID rules; this reads the identity it
            // proved.
            let Some(id) = chain.first().and_then(|leaf| svid::peer_spiffe_id(leaf).ok()) else {
                tracing::warn!(peer = %addr, "Refusing a connection whose verified certificate names no workload");
                return;
            };
            let peer = Arc::new(Peer {
                source_header: HeaderValue::from_str(&id.to_string()).ok(),
                source: id.identity(),
            });
            let chain: Vec<CertificateDer<'static>> = chain.iter().map(|c| c.clone().into_owned()).collect();
            let distrusted = trust_lost(shared.credentials.clone(), credentials, chain);
            tokio::select! {
                _ = inner.oneshot(Identified { tls, peer: peer.clone() }) => {}
                reason = distrusted => {
                    let source = &peer.source;
                    shared
                        .metrics
                        .connections_closed_by_policy
                        .get_or_create(&labels(source, &shared.me, false, reason.clone()))
                        .inc();
                    tracing::info!(%source, destination = %shared.me, %reason, "Closing an established connection: its peer's certificate no longer proves its identity");
                }
            }
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
