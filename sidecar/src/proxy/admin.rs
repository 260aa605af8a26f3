//! The proxy's own admin routes beside /healthz and /metrics: `/ready` (the native
//! sidecar's startup probe: the application starts only once the proxy holds a
//! certificate and knows the intentions) and the application probes the webhook moved
//! here, because the redirect would otherwise send the kubelet's plain-text probes into
//! the mTLS listener. Nothing else: no config, key or certificate dumps (M19).

use super::{Shared, args::AppProbe};
use axum::{Router, extract::State, http::StatusCode, routing::get};
use std::{sync::Arc, time::Duration};

pub fn routes(shared: Arc<Shared>, probes: &std::collections::BTreeMap<String, AppProbe>) -> Router {
    let mut router = Router::new().route("/ready", get(ready).with_state(shared.clone()));
    for (path, probe) in probes {
        let probe = probe.clone();
        let client = shared.app_client.clone();
        router = router.route(path, get(move || async move { app_probe(client, probe).await }));
    }
    router
}

async fn ready(State(shared): State<Arc<Shared>>) -> (StatusCode, String) {
    let mut missing = Vec::new();
    if shared.credentials.borrow().is_none() {
        missing.push("certificate");
    }
    if !*shared.intentions_synced.borrow() {
        missing.push("intentions");
    }
    if !shared.directory.is_ready() {
        missing.push("endpoints");
    }
    if missing.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("waiting for: {}\n", missing.join(", ")),
        )
    }
}

async fn app_probe(client: super::AppClient, probe: AppProbe) -> (StatusCode, String) {
    let uri = format!("http://127.0.0.1:{}{}", probe.port, probe.path);
    let Ok(request) = hyper::Request::get(uri).body(super::empty_body()) else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "bad probe\n".to_owned());
    };
    match tokio::time::timeout(Duration::from_secs(5), client.request(request)).await {
        Ok(Ok(response)) => {
            // The kubelet treats 200-399 as success; pass the app's verdict through.
            let status = response.status();
            (status, format!("app answered {status}\n"))
        }
        Ok(Err(error)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("app unreachable: {error}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "app probe timed out\n".to_owned(),
        ),
    }
}
