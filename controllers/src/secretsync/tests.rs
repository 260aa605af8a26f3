//! The SecretSync reconciler against a mock API server (`crate::mock`): the finalizer
//! added before anything else, a failure reported by server-side apply and requeued by
//! its class, and the finalizer's cleanup. The engine is never reached in these
//! scenarios (end-to-end tests cover it).

use super::{Error, FINALIZER, STATUS, State, engine::Engine, hmac};
use crate::{
    mock,
    reconciler::{self, Class, ReconcileError},
};
use capstan_crds::SecretSync;
use http::Method;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use std::{sync::Arc, time::Duration};

const PATH: &str = "/apis/secrets.capstan.dev/v1alpha1/namespaces/team/secretsyncs/db";

fn object(finalizers: &[&str], spec_source: Value, status: Value) -> Value {
    json!({
        "apiVersion": "secrets.capstan.dev/v1alpha1",
        "kind": "SecretSync",
        "metadata": {
            "name": "db", "namespace": "team", "uid": "uid-db",
            "resourceVersion": "11", "generation": 3, "finalizers": finalizers,
        },
        "spec": {
            "source": spec_source,
            "auth": {"role": "app", "serviceAccountName": "app"},
            "target": {"name": "db-creds"},
        },
        "status": status,
    })
}

fn kv() -> Value {
    json!({"kv": {"mount": "secret", "path": "app"}})
}

fn context() -> (Arc<crate::context::Context<State>>, mock::ApiServer) {
    let (base, server) = mock::context();
    let ctx = base.with(State::new(
        Engine::new(&base.config.engine_url, &base.config.roots_configmap).unwrap(),
        hmac::Key::new(&[7; 32]),
    ));
    (Arc::new(ctx), server)
}

/// A SecretSync of a database role into a basic-auth Secret, for the pure modules'
/// tests.
pub fn database_sync() -> SecretSync {
    let mut obj = SecretSync::new(
        "db",
        serde_json::from_value(json!({
            "source": {"database": {"role": "app"}},
            "auth": {"role": "app", "serviceAccountName": "app"},
            "target": {"name": "db-creds", "type": "kubernetes.io/basic-auth"},
        }))
        .unwrap(),
    );
    obj.metadata.namespace = Some("team".into());
    obj.metadata.uid = Some("uid-1".into());
    obj
}

fn sync(value: Value) -> Arc<SecretSync> {
    Arc::new(serde_json::from_value(value).unwrap())
}

#[tokio::test]
async fn the_finalizer_is_added_before_anything_else() {
    let (ctx, mut server) = context();
    let reconcile = tokio::spawn(reconciler::reconcile(sync(object(&[], kv(), json!({}))), ctx));
    let patch = server
        .expect(Method::PATCH, PATH, 200, object(&[FINALIZER], kv(), json!({})))
        .await;
    assert_eq!(patch.content_type.as_deref(), Some("application/json-patch+json"));
    let ops = patch.body.as_array().unwrap();
    assert!(
        ops.iter()
            .any(|op| op["op"] == "add" && op["value"] == json!([FINALIZER])),
        "{ops:?}"
    );
    assert_eq!(reconcile.await.unwrap().unwrap(), Action::await_change());
    server.done().await;
}

/// An invalid spec: Ready=False by server-side apply under the reconciler's field
/// manager, keeping the transition time while Ready stays False, one Warning, and a
/// slow requeue (a spec error).
#[tokio::test]
async fn a_spec_error_is_applied_to_status_once_and_requeued_slowly() {
    let (ctx, mut server) = context();
    // Two sources: what the schema cannot refuse, validation does.
    let both = json!({"kv": {"mount": "secret", "path": "app"}, "database": {"role": "app"}});
    let before = json!({
        "secretHmac": "abc",
        "conditions": [{"type": "Ready", "status": "False", "reason": "LoginDenied",
                        "message": "no", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    });
    let obj = sync(object(&[FINALIZER], both.clone(), before.clone()));
    let reconcile = tokio::spawn(reconciler::reconcile(obj.clone(), ctx.clone()));

    let current = object(&[FINALIZER], both.clone(), before);
    server
        .expect(Method::GET, &format!("{PATH}/status"), 200, current.clone())
        .await;
    let apply = server
        .expect(Method::PATCH, &format!("{PATH}/status"), 200, current)
        .await;
    let status = mock::applied_status(&apply, STATUS.manager);
    assert_eq!(status["observedGeneration"], 3);
    assert_eq!(
        status["secretHmac"], "abc",
        "what it owns and did not change is applied as it was"
    );
    let ready = &status["conditions"][0];
    assert_eq!(
        (&ready["status"], &ready["reason"]),
        (&json!("False"), &json!("InvalidSpec"))
    );
    assert_eq!(ready["lastTransitionTime"], "2026-01-01T00:00:00Z");
    let event = server.event("team").await;
    assert_eq!(
        (&event["type"], &event["reason"]),
        (&json!("Warning"), &json!("InvalidSpec"))
    );

    let error = reconcile.await.unwrap().unwrap_err();
    assert!(matches!(error, Error::Sync(_)), "{error}");
    assert_eq!(error.class(), Class::Spec);
    let action = reconciler::error_policy(obj, &error, ctx);
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    server.done().await;
}

/// Deletion: the finalizer's cleanup (no leases, no target left) deletes the lease
/// record, then the finalizer goes by a conditional JSON patch.
#[tokio::test]
async fn cleanup_runs_then_the_finalizer_is_removed() {
    let (ctx, mut server) = context();
    let mut deleting = object(&[FINALIZER], kv(), json!({}));
    deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    let reconcile = tokio::spawn(reconciler::reconcile(sync(deleting.clone()), ctx));

    server
        .not_found(Method::GET, "/api/v1/namespaces/team/secrets/db-capstan-lease")
        .await;
    server
        .not_found(Method::GET, "/api/v1/namespaces/team/secrets/db-creds")
        .await;
    server
        .not_found(Method::DELETE, "/api/v1/namespaces/team/secrets/db-capstan-lease")
        .await;
    let mut gone = deleting;
    gone["metadata"]["finalizers"] = json!([]);
    let patch = server.expect(Method::PATCH, PATH, 200, gone).await;
    assert_eq!(patch.content_type.as_deref(), Some("application/json-patch+json"));
    let ops = patch.body.as_array().unwrap();
    assert!(
        ops.iter()
            .any(|op| op["op"] == "test" && op["value"] == FINALIZER),
        "only our finalizer, where we read it: {ops:?}"
    );
    assert!(ops.iter().any(|op| op["op"] == "remove"), "{ops:?}");
    assert_eq!(reconcile.await.unwrap().unwrap(), Action::await_change());
    server.done().await;
}
