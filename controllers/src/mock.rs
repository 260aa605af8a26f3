//! A mock API server for the reconcilers' tests (kube's tower-test pattern, as in
//! kube-rs's controller-rs): a `Client` over a `tower_test` service whose other end
//! the test holds, so each scenario answers, and asserts, every request a reconcile
//! makes, in order. The end-to-end tests cover the same reconcilers against a real
//! control plane; these pin down the requests themselves (finalizer patches, status
//! applies with their field manager, Events) in milliseconds.

use crate::{
    context::{Config, Context},
    leader::Leadership,
    metrics::Metrics,
};
use http::{Method, Request, Response, StatusCode};
use kube::{
    Client,
    client::Body,
    runtime::events::{Recorder, Reporter},
};
use serde_json::Value;
use std::{collections::HashMap, time::Duration};
use tower_test::mock::{self, Handle};

/// The test's end of the API server.
pub struct ApiServer(Handle<Request<Body>, Response<Body>>);

/// One request the reconcile made.
pub struct Received {
    pub method: Method,
    pub path: String,
    pub query: HashMap<String, String>,
    pub content_type: Option<String>,
    pub body: Value,
}

/// A context whose client talks to the returned mock, holding a leadership term.
pub fn context() -> (Context, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "capstan-controller".into(),
                instance: Some("test".into()),
            },
        ),
        client,
        metrics: Metrics::default(),
        leadership: Leadership::held_for(Duration::from_secs(300)),
        config: Config {
            resync: Duration::from_secs(300),
            namespace: "capstan-system".into(),
            engine_url: "https://127.0.0.1:1".into(),
            roots_configmap: capstan_contract::ROOTS_CONFIGMAP.into(),
        },
        state: (),
    };
    (ctx, ApiServer(handle))
}

impl ApiServer {
    /// The next request, which must be `method` on `path`, answered with `status` and
    /// `response`.
    pub async fn expect(&mut self, method: Method, path: &str, status: u16, response: Value) -> Received {
        let (request, send) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request came; expected {method} {path}"))
            .expect("the client is gone");
        let received = Received {
            method: request.method().clone(),
            path: request.uri().path().to_owned(),
            query: request
                .uri()
                .query()
                .unwrap_or_default()
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            content_type: request
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body: {
                let bytes = request.into_body().collect_bytes().await.expect("a request body");
                if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).expect("a JSON request body")
                }
            },
        };
        assert_eq!(
            (&received.method, received.path.as_str()),
            (&method, path),
            "unexpected request (body {})",
            received.body
        );
        send.send_response(
            Response::builder()
                .status(StatusCode::from_u16(status).expect("a status code"))
                .body(Body::from(serde_json::to_vec(&response).expect("JSON")))
                .expect("a response"),
        );
        received
    }

    /// The next request, which must be a 404 for `method` on `path`.
    pub async fn not_found(&mut self, method: Method, path: &str) -> Received {
        let status = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "NotFound", "code": 404, "message": "not found",
        });
        self.expect(method, path, 404, status).await
    }

    /// An Event being created in `namespace`: its body.
    pub async fn event(&mut self, namespace: &str) -> Value {
        let path = format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events");
        let (request, send) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .expect("no Event was published")
            .expect("the client is gone");
        assert_eq!(
            (request.method(), request.uri().path()),
            (&Method::POST, path.as_str())
        );
        let bytes = request.into_body().collect_bytes().await.expect("a request body");
        send.send_response(
            Response::builder()
                .status(StatusCode::CREATED)
                .body(Body::from(bytes.to_vec()))
                .expect("a response"),
        );
        serde_json::from_slice(&bytes).expect("a JSON Event")
    }

    /// Asserts that no further request comes.
    pub async fn done(mut self) {
        let next = tokio::time::timeout(Duration::from_millis(100), self.0.next_request()).await;
        if let Ok(Some((request, _))) = next {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }
}

/// Asserts that `received` is a server-side apply of status by `manager`, forced, and
/// returns the applied status.
pub fn applied_status<'a>(received: &'a Received, manager: &str) -> &'a Value {
    assert_eq!(received.method, Method::PATCH);
    assert!(received.path.ends_with("/status"), "{}", received.path);
    assert_eq!(
        received.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(
        received.query.get("fieldManager").map(String::as_str),
        Some(manager)
    );
    assert_eq!(received.query.get("force").map(String::as_str), Some("true"));
    &received.body["status"]
}
