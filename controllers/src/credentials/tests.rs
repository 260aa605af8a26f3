//! The credentials reconciler against a mock API server (`crate::mock`) and a fake
//! engine: the requests one reconcile makes, in order.

use super::{Error, Revoke, State, login, reconcile, stopped, without_finalizer};
use crate::mock;
use capstan_contract::annotations::agent::REVOKE_FINALIZER;
use capstan_engine_client::PodRevoked;
use futures::future::BoxFuture;
use http::Method;
use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::runtime::controller::Action;
use parking_lot::Mutex;
use serde_json::json;
use std::{sync::Arc, time::Duration};

const PATH: &str = "/api/v1/namespaces/shop/pods/web-1";
const UID: &str = "5c0bde3e-2b4f-4d8e-9a51-0c1e8f7e6a21";

/// Answers each revocation with the next of `answers`, recording the UIDs asked.
struct FakeEngine {
    answers: Mutex<Vec<Result<PodRevoked, login::Error>>>,
    asked: Mutex<Vec<String>>,
}

impl Revoke for FakeEngine {
    fn revoke_pod<'a>(&'a self, pod_uid: &'a str) -> BoxFuture<'a, Result<PodRevoked, login::Error>> {
        self.asked.lock().push(pod_uid.to_owned());
        let answer = self.answers.lock().remove(0);
        Box::pin(async move { answer })
    }
}

fn pod(phase: &str, deletion: Option<&str>, finalizers: &[&str]) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web-1", "namespace": "shop", "uid": UID, "resourceVersion": "7",
            "finalizers": finalizers, "deletionTimestamp": deletion,
        },
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": phase},
    }))
    .unwrap()
}

fn context(
    answers: Vec<Result<PodRevoked, login::Error>>,
) -> (
    Arc<crate::context::Context<State>>,
    Arc<FakeEngine>,
    mock::ApiServer,
) {
    let (base, server) = mock::context();
    let engine = Arc::new(FakeEngine {
        answers: Mutex::new(answers),
        asked: Mutex::default(),
    });
    (Arc::new(base.with(State::new(engine.clone()))), engine, server)
}

fn refused() -> login::Error {
    login::Error::Revoke(capstan_engine_client::Error::Connect {
        url: "https://capstan-engine:8200".into(),
        reason: "connection refused".into(),
    })
}

#[test]
fn a_pod_has_stopped_when_terminal_or_its_deletion_is_due() {
    let now: Timestamp = "2026-12-06T02:00:00Z".parse().unwrap();
    assert_eq!(stopped(&pod("Running", None, &[]), now), Err(None));
    assert_eq!(
        stopped(&pod("Failed", None, &[]), now),
        Ok(()),
        "evicted by the kubelet"
    );
    assert_eq!(stopped(&pod("Succeeded", None, &[]), now), Ok(()));
    // Force-deleted (or by the pod GC for a lost node): due at once.
    assert_eq!(
        stopped(&pod("Running", Some("2026-12-06T02:00:00Z"), &[]), now),
        Ok(())
    );
    // In its grace period: the agent is still revoking on its own; look again after it.
    assert_eq!(
        stopped(&pod("Running", Some("2026-12-06T02:00:30Z"), &[]), now),
        Err(Some(Duration::from_secs(31)))
    );
}

#[test]
fn only_our_finalizer_goes_and_only_from_the_list_read() {
    let patch = without_finalizer(&["example.com/keep".into(), REVOKE_FINALIZER.into()]);
    assert_eq!(
        patch,
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": ["example.com/keep", REVOKE_FINALIZER]},
            {"op": "replace", "path": "/metadata/finalizers", "value": ["example.com/keep"]},
        ])
    );
}

/// A deleted pod: revoked in the engine, then the finalizer removed (conditional JSON
/// patch), then a Normal Event with the counts.
#[tokio::test]
async fn a_stopped_pod_is_revoked_then_let_go() {
    let (ctx, engine, mut server) = context(vec![Ok(PodRevoked { tokens: 2, leases: 1 })]);
    let obj = pod("Running", Some("2026-01-01T00:00:00Z"), &[REVOKE_FINALIZER]);
    let run = tokio::spawn(reconcile(Arc::new(obj.clone()), ctx));
    let patch = server
        .expect(Method::PATCH, PATH, 200, serde_json::to_value(&obj).unwrap())
        .await;
    assert_eq!(patch.content_type.as_deref(), Some("application/json-patch+json"));
    assert_eq!(
        patch.body[1],
        json!({"op": "replace", "path": "/metadata/finalizers", "value": []})
    );
    let event = server.event("shop").await;
    assert_eq!(
        (&event["type"], &event["reason"]),
        (&json!("Normal"), &json!("CredentialsRevoked"))
    );
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains("2 token(s) and 1 lease(s)")
    );
    assert_eq!(run.await.unwrap().unwrap(), Action::await_change());
    assert_eq!(*engine.asked.lock(), [UID]);
    server.done().await;
}

/// The engine down: the finalizer stays (no patch), a Warning Event says why, and the
/// error is retried with a backoff that grows with the attempts, up to a minute.
#[tokio::test]
async fn while_the_engine_cannot_revoke_the_pod_keeps_its_finalizer() {
    let (ctx, _, mut server) = context(vec![Err(refused())]);
    let obj = Arc::new(pod("Failed", None, &[REVOKE_FINALIZER]));
    let run = tokio::spawn(reconcile(obj.clone(), ctx.clone()));
    let event = server.event("shop").await;
    assert_eq!(
        (&event["type"], &event["reason"]),
        (&json!("Warning"), &json!("CredentialsRevocationFailed"))
    );
    let note = event["note"].as_str().unwrap();
    assert!(
        note.contains("connection refused") && note.contains("attempt 1"),
        "{note}"
    );
    let error = run.await.unwrap().unwrap_err();
    assert!(matches!(error, Error::Engine(_)), "{error}");
    assert_eq!(
        super::error_policy(obj, &error, ctx.clone()),
        Action::requeue(Duration::from_secs(1))
    );
    assert_eq!(
        ctx.metrics
            .failures
            .get_or_create(&crate::metrics::FailureLabels {
                controller: "credentials",
                error: "engine_revoke",
            })
            .get(),
        1
    );
    let waits: Vec<u64> = (1..=8).map(|n| super::backoff(n).as_secs()).collect();
    assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
    server.done().await;
}

/// A running pod, and a pod whose finalizer is gone, are left alone.
#[tokio::test]
async fn running_pods_and_released_pods_need_nothing() {
    let (ctx, engine, server) = context(vec![]);
    for obj in [
        pod("Running", None, &[REVOKE_FINALIZER]),
        pod("Failed", None, &[]),
    ] {
        let action = reconcile(Arc::new(obj), ctx.clone()).await.unwrap();
        assert_eq!(action, Action::await_change());
    }
    assert!(engine.asked.lock().is_empty());
    server.done().await;
}
