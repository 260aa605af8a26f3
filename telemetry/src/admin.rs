use crate::Error;
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::registry::Registry;
use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};
use tokio::net::TcpListener;

/// Whether the process is healthy; `/healthz` answers 200 while it is, 503 after it is not.
/// A binary marks itself unhealthy when a part it cannot do without has stopped.
#[derive(Clone, Debug)]
pub struct Health(Arc<AtomicBool>);

impl Default for Health {
    fn default() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }
}

impl Health {
    pub fn set(&self, healthy: bool) {
        self.0.store(healthy, Ordering::Relaxed);
    }

    pub fn is_healthy(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The admin listener: `/healthz` and `/metrics` (Prometheus/OpenMetrics text).
pub struct AdminServer {
    listener: TcpListener,
    state: Arc<AdminState>,
    extra: Router,
}

struct AdminState {
    registry: Registry,
    health: Health,
}

impl AdminServer {
    pub async fn bind(addr: SocketAddr, registry: Registry, health: Health) -> Result<Self, Error> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        Ok(Self {
            listener,
            state: Arc::new(AdminState { registry, health }),
            extra: Router::new(),
        })
    }

    /// Adds a binary's own admin routes (the sidecar's `/ready`, say) beside
    /// `/healthz` and `/metrics`.
    pub fn with_routes(mut self, routes: Router) -> Self {
        self.extra = self.extra.merge(routes);
        self
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
        tracing::info!(addr = %self.local_addr(), "Serving the admin endpoints");
        let app = Router::new()
            .route("/healthz", get(healthz))
            .route("/metrics", get(metrics))
            .with_state(self.state)
            .merge(self.extra);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(Error::Serve)
    }
}

async fn healthz(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    if state.health.is_healthy() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n")
    }
}

async fn metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(error) => {
            tracing::error!(%error, "Encoding metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// The admin server serving on its own task until `stop`; [`AdminTask::finish`] waits
/// for it at the end of `main`.
pub async fn spawn_admin(
    addr: SocketAddr,
    registry: Registry,
    health: Health,
    stop: &crate::Stop,
) -> Result<AdminTask, Error> {
    let server = AdminServer::bind(addr, registry, health).await?;
    Ok(AdminTask(tokio::spawn(server.serve(stop.stopped()))))
}

pub struct AdminTask(tokio::task::JoinHandle<Result<(), Error>>);

impl AdminTask {
    pub async fn finish(self) -> Result<(), Error> {
        self.0.await.map_err(Error::Task)??;
        tracing::info!("Stopped");
        Ok(())
    }
}

/// The whole life of a binary whose only long-running part so far is its admin server:
/// serve `/healthz` and `/metrics` until SIGTERM or SIGINT, then return.
pub async fn serve_until_shutdown(addr: SocketAddr, registry: Registry, health: Health) -> Result<(), Error> {
    let server = AdminServer::bind(addr, registry, health).await?;
    server.serve(crate::shutdown_signal()).await?;
    tracing::info!("Stopped");
    Ok(())
}
