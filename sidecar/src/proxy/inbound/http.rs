//! The fourth stage, for each allowed connection or mux stream: HTTP served by hyper
//! (HTTP/1.1 or HTTP/2), each request through the request stages made for the
//! connection's peer; or, for a plain-TCP workload, a tunnel to the application.

use super::{Body, Mode, NewService, Peer, Serve, Shared, authorize_l4::Authorized};
use crate::proxy::{app_connections::AppConnections, tunnel};
use hyper::{Request, Response, body::Incoming};
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use std::{convert::Infallible, sync::Arc, time::Duration};
use tokio::sync::watch;
use tower::Service;

/// The HTTP stage: `requests` makes, for a connection's peer, the service its requests
/// go through.
#[derive(Clone)]
pub struct Http<N> {
    pub(super) shared: Arc<Shared>,
    pub(super) app: Arc<AppConnections>,
    pub(super) requests: N,
}

impl<N, Io, R> Serve<Authorized<Io>> for Http<N>
where
    Io: tunnel::Side + Send + 'static,
    N: NewService<Arc<Peer>, Service = R>,
    R: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    R::Future: Send + 'static,
{
    fn serve(
        &self,
        Authorized { io, peer, mode }: Authorized<Io>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let active = self.shared.metrics.application_connection("inbound");
        let app = self.app.clone();
        let requests = (mode == Mode::Http).then(|| self.requests.new_service(peer));
        async move {
            let _active = active;
            match requests {
                None => tunnel_to_app(io, &app).await,
                Some(requests) => serve_http(io, requests).await,
            }
        }
    }
}

async fn tunnel_to_app<S: tunnel::Side>(mut tls: S, app: &AppConnections) {
    match app.connect().await {
        Ok(mut tcp) => {
            let _ = tunnel::tunnel(&mut tls, &mut tcp).await;
        }
        Err(error) => tracing::warn!(%error, app_port = app.port(), "The application refused a connection"),
    }
}

async fn serve_http<S, R>(io: S, requests: R)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    R: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    R::Future: Send + 'static,
{
    // HTTP/2 serves each stream on a task of its own: they end with the connection.
    let (_connection_open, ended) = watch::channel(());
    let mut builder = hyper_util::server::conn::auto::Builder::new(StreamExecutor { ended });
    // Bounded resources against malformed or abusive clients (M20).
    builder
        .http1()
        .max_buf_size(64 * 1024)
        .header_read_timeout(Duration::from_secs(30))
        .timer(hyper_util::rt::TokioTimer::new());
    builder
        .http2()
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024)
        .max_pending_accept_reset_streams(32)
        .max_local_error_reset_streams(Some(256))
        .timer(hyper_util::rt::TokioTimer::new());
    let service = TowerToHyperService::new(requests);
    if let Err(error) = builder.serve_connection(TokioIo::new(io), service).await {
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
