//! The intentions reconciler against a mock API server (`crate::mock`): the requests
//! one reconcile makes, in order.

use super::{STATUS, State};
use crate::{mock, reconciler};
use capstan_crds::ServiceIntentions;
use http::Method;
use kube::runtime::{controller::Action, reflector};
use serde_json::{Value, json};
use std::sync::Arc;

const STATUS_PATH: &str = "/apis/mesh.capstan.dev/v1alpha1/namespaces/shop/serviceintentions/api/status";

fn object(status: Value) -> Value {
    json!({
        "apiVersion": "mesh.capstan.dev/v1alpha1",
        "kind": "ServiceIntentions",
        "metadata": {
            "name": "api", "namespace": "shop", "uid": "uid-api",
            "resourceVersion": "7", "generation": 2,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {
            "destination": {"name": "api"},
            "sources": [{"name": "web", "action": "allow"}],
        },
        "status": status,
    })
}

fn context() -> (Arc<crate::context::Context<State>>, mock::ApiServer) {
    let (base, server) = mock::context();
    let (store, _writer) = reflector::store::<ServiceIntentions>();
    let ctx = base.with(State::new(store, &base.config));
    (Arc::new(ctx), server)
}

#[tokio::test]
async fn an_accepted_object_gets_ready_by_server_side_apply_and_one_event() {
    let (ctx, mut server) = context();
    let obj: ServiceIntentions = serde_json::from_value(object(json!({}))).unwrap();
    let reconcile = tokio::spawn(reconciler::reconcile(Arc::new(obj), ctx));

    server
        .expect(Method::GET, STATUS_PATH, 200, object(json!({})))
        .await;
    let apply = server
        .expect(Method::PATCH, STATUS_PATH, 200, object(json!({})))
        .await;
    let status = mock::applied_status(&apply, STATUS.manager);
    assert_eq!(
        apply.body["metadata"]["resourceVersion"], "7",
        "conditional on the read"
    );
    assert_eq!(status["observedGeneration"], 2);
    assert_eq!(status["sources"], 1);
    let conditions = status["conditions"].as_array().unwrap();
    assert_eq!(conditions.len(), 1);
    assert_eq!(
        (
            &conditions[0]["type"],
            &conditions[0]["status"],
            &conditions[0]["reason"]
        ),
        (&json!("Ready"), &json!("True"), &json!("Accepted"))
    );
    let event = server.event("shop").await;
    assert_eq!(
        (&event["type"], &event["reason"]),
        (&json!("Normal"), &json!("Accepted"))
    );

    let action = reconcile.await.unwrap().unwrap();
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(300)));
    server.done().await;
}

/// Another writer's condition is neither applied (it stays theirs) nor dropped, and a
/// Ready whose status holds keeps its transition time; no Event repeats it.
#[tokio::test]
async fn only_its_own_condition_is_applied_and_its_transition_time_holds() {
    let (ctx, mut server) = context();
    let before = json!({
        "observedGeneration": 1,
        "sources": 1,
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "Accepted", "message": "old",
             "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1},
            {"type": "ExternalCheck", "status": "True", "reason": "Fine", "message": "",
             "lastTransitionTime": "2026-01-02T00:00:00Z"},
        ],
    });
    let obj: ServiceIntentions = serde_json::from_value(object(before.clone())).unwrap();
    let reconcile = tokio::spawn(reconciler::reconcile(Arc::new(obj), ctx));

    server
        .expect(Method::GET, STATUS_PATH, 200, object(before.clone()))
        .await;
    let apply = server
        .expect(Method::PATCH, STATUS_PATH, 200, object(before))
        .await;
    let status = mock::applied_status(&apply, STATUS.manager);
    let conditions = status["conditions"].as_array().unwrap();
    assert_eq!(conditions.len(), 1, "only Ready: {conditions:?}");
    assert_eq!(conditions[0]["lastTransitionTime"], "2026-01-01T00:00:00Z");
    assert_eq!(conditions[0]["observedGeneration"], 2);

    reconcile.await.unwrap().unwrap();
    server.done().await;
}

/// A 409 (another writer in between) is read again and applied again.
#[tokio::test]
async fn a_conflicted_apply_is_recomputed_on_a_fresh_read() {
    let (ctx, mut server) = context();
    let obj: ServiceIntentions = serde_json::from_value(object(json!({}))).unwrap();
    let metrics = ctx.metrics.clone();
    let reconcile = tokio::spawn(reconciler::reconcile(Arc::new(obj), ctx));

    server
        .expect(Method::GET, STATUS_PATH, 200, object(json!({})))
        .await;
    let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "reason": "Conflict", "code": 409, "message": "modified"});
    server.expect(Method::PATCH, STATUS_PATH, 409, conflict).await;
    let mut fresh = object(json!({}));
    fresh["metadata"]["resourceVersion"] = json!("8");
    server.expect(Method::GET, STATUS_PATH, 200, fresh.clone()).await;
    let apply = server.expect(Method::PATCH, STATUS_PATH, 200, fresh).await;
    assert_eq!(apply.body["metadata"]["resourceVersion"], "8");
    server.event("shop").await;

    reconcile.await.unwrap().unwrap();
    let conflicts = metrics
        .status_conflicts
        .get_or_create(&crate::metrics::ControllerLabels {
            controller: "intentions",
        })
        .get();
    assert_eq!(conflicts, 1);
    server.done().await;
}
