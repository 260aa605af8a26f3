//! The inbound side: other sidecars connect here with mTLS. The peer's SVID names the
//! source service; the intentions for this workload decide. Plain TCP destinations are
//! decided once per connection; HTTP destinations per request (403 naming the rule; 400
//! for a path refused before any rule).
//!
//! The path is a stack of tower layers, linkerd2-proxy's shape, composed once in
//! [`stack`], each stage in a module named for it:
//!
//! | stage          | per        | does                                                       |
//! |----------------|------------|------------------------------------------------------------|
//! | `tls`          | connection | the mTLS handshake, its metrics                            |
//! | `identity`     | connection | the peer's SPIFFE ID; the close when it stops proving it (M12) |
//! | `authorize_l4` | connection | the connection decision, revocation, drain, the mux split  |
//! | `http`         | stream     | HTTP serving (or the tunnel, for a plain-TCP workload)     |
//! | `authorize_l7` | request    | the request decision, 403/400, request metrics             |
//! | `forward`      | request    | the request to the application                             |
//!
//! A connection whose source an intention change no longer allows is closed (mesh/README.md,
//! Decisions), within the time the change takes to arrive. A connection carrying
//! streams (`mux.rs`) is decided, and closed, as one: its streams share its source; each
//! stream is served as a connection of its own would be.
//!
//! Cost: a connection stage runs once per mesh connection or stream, its future boxed
//! ([`Stage`]); the request stages are generic over each other, so a request goes
//! through them with static dispatch and no allocation of theirs.

mod authorize_l4;
mod authorize_l7;
mod forward;
mod http;
mod identity;
mod tls;

use super::{Mode, Shared, app_connections::AppConnections, metrics::DecisionLabels};
use bytes::Bytes;
use capstan_mesh::Identity;
use futures::future::BoxFuture;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{Response, StatusCode, header::HeaderValue};
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
};
use tokio::net::{TcpListener, TcpStream};
use tower::{Service, ServiceBuilder, ServiceExt as _};

/// The response header that names the rule behind a denial.
pub const DECIDED_BY_HEADER: &str = "x-capstan-decided-by";
/// The header carrying the verified source identity to the application. Any copy a
/// client sent is removed first, so the application can trust it.
pub const SOURCE_HEADER: &str = "x-capstan-source";

type Body = BoxBody<Bytes, hyper::Error>;

pub async fn serve(shared: Arc<Shared>, listener: TcpListener, app_port: u16) {
    let app = AppConnections::new(app_port);
    let reaper = tokio::spawn(app.clone().reap_forever());
    let stack = stack(&shared, &app);
    super::accept_loop(shared, listener, "inbound", move |_, tcp, addr| {
        let connection = stack.clone().oneshot(Accepted { tcp, addr });
        async move {
            let Ok(()) = connection.await;
        }
    })
    .await;
    reaper.abort();
}

/// The inbound pipeline, outermost stage first.
fn stack(
    shared: &Arc<Shared>,
    app: &Arc<AppConnections>,
) -> impl Service<Accepted, Response = (), Error = Infallible, Future: Send> + Clone + Send + 'static {
    ServiceBuilder::new()
        .layer_fn(|inner| {
            Stage(tls::Tls {
                shared: shared.clone(),
                inner,
            })
        })
        .layer_fn(|inner| {
            Stage(identity::PeerIdentity {
                shared: shared.clone(),
                inner,
            })
        })
        .layer_fn(|inner| {
            Stage(authorize_l4::AuthorizeL4 {
                shared: shared.clone(),
                app_port: app.port(),
                inner,
            })
        })
        .layer_fn(|requests| {
            Stage(http::Http {
                shared: shared.clone(),
                app: app.clone(),
                requests,
            })
        })
        .layer_fn(|inner| authorize_l7::NewAuthorizeL7 {
            shared: shared.clone(),
            inner,
        })
        .service(forward::new(shared.clone(), app.clone()))
}

/// A connection the listener accepted: what the first stage is given.
pub struct Accepted {
    tcp: TcpStream,
    addr: SocketAddr,
}

/// The verified peer of a connection, shared by its streams and requests.
pub struct Peer {
    /// The source the intentions decide on.
    source: Identity,
    /// What the application is told about the source, in every request of the connection
    /// (its SPIFFE ID; None if it is not a valid header value).
    source_header: Option<HeaderValue>,
}

/// Makes a service for each target (a connection's peer, say): the request stages are
/// made once per HTTP connection, as linkerd2-proxy's `NewService` makes its stacks.
pub trait NewService<T> {
    type Service;
    fn new_service(&self, target: T) -> Self::Service;
}

impl<F, T, S> NewService<T> for F
where
    F: Fn(T) -> S,
{
    type Service = S;
    fn new_service(&self, target: T) -> S {
        self(target)
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

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).map_err(|never| match never {}).boxed()
}

fn status(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(full(code.canonical_reason().unwrap_or_default().to_owned()));
    *response.status_mut() = code;
    response
}

/// What a connection stage does with one connection (or mux stream) `T`; [`Stage`] makes
/// it the stage's tower `Service`.
trait Serve<T> {
    fn serve(&self, target: T) -> impl Future<Output = ()> + Send + 'static;
}

/// A connection stage as a tower `Service`. Its future is boxed: once per connection or
/// stream, never per request.
#[derive(Clone)]
pub struct Stage<S>(S);

impl<S: Serve<T>, T> Service<T> for Stage<S> {
    type Response = ();
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<(), Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: T) -> Self::Future {
        let served = self.0.serve(target);
        Box::pin(async move {
            served.await;
            Ok(())
        })
    }
}
