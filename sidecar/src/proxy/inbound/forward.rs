//! The last stage: an allowed request to the application, with the normalized path the
//! decision was made on (M3: the rule and the application never see two different
//! paths). The request is passed on as it came, less its hop-by-hop headers and any
//! source header the client sent, plus the verified source.

use super::{Body, NewService, Peer, SOURCE_HEADER, Shared, authorize_l7::Allowed, status};
use crate::proxy::app_connections::AppConnections;
use http_body_util::BodyExt as _;
use hyper::{Response, StatusCode, header};
use std::{convert::Infallible, future::Future, sync::Arc};
use tower::Service;

/// Makes, for each HTTP connection, the service that forwards its allowed requests. A
/// `service_fn`: its future is the `forward` below, held by the request's, not boxed.
pub fn new(
    shared: Arc<Shared>,
    app: Arc<AppConnections>,
) -> impl NewService<
    Arc<Peer>,
    Service = impl Service<
        Allowed,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
    > + Clone
              + Send
              + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    move |peer: Arc<Peer>| {
        let target = Arc::new(Target {
            shared: shared.clone(),
            app: app.clone(),
            peer,
        });
        tower::service_fn(move |allowed: Allowed| {
            let target = target.clone();
            async move { Ok(forward(&target, allowed).await) }
        })
    }
}

/// Where a connection's allowed requests go, and the source they carry.
struct Target {
    shared: Arc<Shared>,
    /// The connections to the application, shared by all inbound connections.
    app: Arc<AppConnections>,
    peer: Arc<Peer>,
}

async fn forward(target: &Target, allowed: Allowed) -> Response<Body> {
    let Allowed {
        mut parts,
        body,
        path_and_query,
    } = allowed;
    if parts
        .headers
        .keys()
        .any(|name| is_hop_by_hop(name) || name == SOURCE_HEADER)
    {
        for name in HOP_BY_HOP.iter().chain([&SOURCE_HEADER]) {
            parts.headers.remove(*name);
        }
    }
    // HTTP/2 carries the host in :authority; the application gets it as Host.
    if !parts.headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
    {
        let Ok(host) = header::HeaderValue::from_str(authority.as_str()) else {
            return status(StatusCode::BAD_REQUEST);
        };
        parts.headers.insert(header::HOST, host);
    }
    if let Some(source) = &target.peer.source_header {
        parts.headers.insert(SOURCE_HEADER, source.clone());
    }
    let pooled = parts.method == hyper::Method::CONNECT;
    // The application is spoken to in HTTP/1.1, whatever the client spoke, and nothing
    // the server side attached to the request (upgrades, say) is passed on.
    parts.version = hyper::Version::HTTP_11;
    parts.extensions = hyper::http::Extensions::new();
    let sent = if pooled {
        // CONNECT goes through hyper-util's pool, which tunnels it.
        let mut uri = hyper::http::uri::Parts::default();
        uri.scheme = Some(hyper::http::uri::Scheme::HTTP);
        uri.authority = Some(target.app.authority().clone());
        uri.path_and_query = Some(path_and_query);
        let Ok(uri) = hyper::Uri::from_parts(uri) else {
            return status(StatusCode::BAD_REQUEST);
        };
        parts.uri = uri;
        let request = hyper::Request::from_parts(parts, body.boxed());
        target
            .shared
            .app_client
            .request(request)
            .await
            .map(|response| response.map(|b| b.boxed()))
            .map_err(anyhow::Error::from)
    } else {
        // As the pool sends it: origin-form, with the address as Host if none came.
        if !parts.headers.contains_key(header::HOST) {
            parts.headers.insert(header::HOST, target.app.host().clone());
        }
        parts.uri = if path_and_query.as_str() == "/" {
            hyper::Uri::default()
        } else {
            hyper::Uri::from(path_and_query)
        };
        let request = hyper::Request::from_parts(parts, body.boxed());
        target.app.send(request).await
    };
    match sent {
        Ok(response) => response,
        Err(error) => {
            tracing::warn!(
                error = format!("{error:#}"),
                "Forwarding to the application failed"
            );
            status(StatusCode::BAD_GATEWAY)
        }
    }
}

const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
];

fn is_hop_by_hop(name: &header::HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}
