//! The jobs reconciler against a mock API server (`crate::mock`): the requests one
//! reconcile of a service job makes, in order.

use super::{MANAGER, State};
use crate::{mock, reconciler};
use capstan_crds::jobs::Job;
use capstan_jobs::compile;
use http::Method;
use k8s_openapi::api::apps::v1::ReplicaSet;
use kube::runtime::{reflector, watcher};
use serde_json::{Value, json};
use std::sync::Arc;

const JOB_STATUS: &str = "/apis/jobs.capstan.dev/v1alpha1/namespaces/shop/jobs/web/status";
const REVISIONS: &str = "/apis/apps/v1/namespaces/shop/controllerrevisions";
const PRIORITY: &str = "/apis/scheduling.k8s.io/v1/priorityclasses/capstan-priority-50";
const SERVICES: &str = "/api/v1/namespaces/shop/services";

fn spec(image: &str) -> Value {
    json!({
        "type": "service",
        "update": {"canary": 1, "maxParallel": 1},
        "groups": [{"name": "api", "count": 2, "tasks": [{"name": "server", "image": image}]}],
    })
}

fn job(generation: i64, image: &str, status: Value) -> Value {
    json!({
        "apiVersion": "jobs.capstan.dev/v1alpha1",
        "kind": "Job",
        "metadata": {
            "name": "web", "namespace": "shop", "uid": "uid-web",
            "resourceVersion": "7", "generation": generation,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": spec(image),
        "status": status,
    })
}

fn revision(version: i64, image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "ControllerRevision",
        "metadata": {
            "name": format!("web-v{version}"), "namespace": "shop",
            "labels": {"jobs.capstan.dev/job": "web"},
            "ownerReferences": [{"apiVersion": "jobs.capstan.dev/v1alpha1", "kind": "Job",
                                 "name": "web", "uid": "uid-web", "controller": true}],
        },
        "revision": version,
        "data": spec(image),
    })
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": format!("{kind}List"), "metadata": {}, "items": items})
}

fn context(replica_sets: Vec<ReplicaSet>) -> (Arc<crate::context::Context<State>>, mock::ApiServer) {
    let (base, server) = mock::context();
    let (jobs, _) = reflector::store();
    // Listed (empty), as the watches make them before any reconcile.
    let (pods, mut pod_writer) = reflector::store::<k8s_openapi::api::core::v1::Pod>();
    let (nodes, mut node_writer) = reflector::store::<k8s_openapi::api::core::v1::Node>();
    pod_writer.apply_watcher_event(&watcher::Event::InitDone);
    node_writer.apply_watcher_event(&watcher::Event::InitDone);
    let (rs_store, mut rs_writer) = reflector::store();
    rs_writer.apply_watcher_event(&watcher::Event::Init);
    for rs in replica_sets {
        rs_writer.apply_watcher_event(&watcher::Event::InitApply(rs));
    }
    rs_writer.apply_watcher_event(&watcher::Event::InitDone);
    let ctx = base.with(State::new(jobs, pods, rs_store, nodes, Default::default()));
    (Arc::new(ctx), server)
}

/// Where the ReplicaSet of `job`'s only group is applied.
fn replica_set_path(job: &Job) -> String {
    let hash = compile::template_hash(job, 0);
    format!(
        "/apis/apps/v1/namespaces/shop/replicasets/{}",
        compile::names::replica_set("web", "api", &hash)
    )
}

fn conflict() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "reason": "Conflict", "code": 409, "message": "modified"})
}

/// The first reconcile of a service job: version 1 recorded as a ControllerRevision,
/// its PriorityClass applied, the deployment recorded (a 409 on the way read again),
/// its ReplicaSet applied with every pod (no older pods: no canary), the status
/// written, with the DeploymentStarted Event.
#[tokio::test]
async fn a_first_reconcile_records_version_1_places_the_replica_set_and_writes_status() {
    let (ctx, mut server) = context(vec![]);
    let obj: Job = serde_json::from_value(job(1, "api:1", json!({}))).unwrap();
    let obj_v1 = obj.clone();
    let reconcile = tokio::spawn(reconciler::reconcile(Arc::new(obj), ctx));

    let listed = server
        .expect(Method::GET, REVISIONS, 200, list("ControllerRevision", vec![]))
        .await;
    assert_eq!(
        listed.query.get("labelSelector").map(String::as_str),
        Some("jobs.capstan.dev%2Fjob%3Dweb")
    );
    let created = server
        .expect(Method::POST, REVISIONS, 201, revision(1, "api:1"))
        .await;
    assert_eq!(created.body["metadata"]["name"], "web-v1");
    assert_eq!(created.body["revision"], 1);
    assert_eq!(created.body["data"]["groups"][0]["tasks"][0]["image"], "api:1");
    assert_eq!(created.body["metadata"]["ownerReferences"][0]["uid"], "uid-web");

    let priority = server.expect(Method::PATCH, PRIORITY, 200, json!({})).await;
    assert_eq!(
        priority.query.get("fieldManager").map(String::as_str),
        Some(MANAGER)
    );

    // The deployment's decision, before anything moves; the first try conflicts.
    server
        .expect(Method::GET, JOB_STATUS, 200, job(1, "api:1", json!({})))
        .await;
    server.expect(Method::PATCH, JOB_STATUS, 409, conflict()).await;
    let mut fresh = job(1, "api:1", json!({}));
    fresh["metadata"]["resourceVersion"] = json!("8");
    server.expect(Method::GET, JOB_STATUS, 200, fresh.clone()).await;
    let recorded = server.expect(Method::PATCH, JOB_STATUS, 200, fresh.clone()).await;
    assert_eq!(
        recorded.body["metadata"]["resourceVersion"], "8",
        "conditional on the fresh read"
    );
    let deployment = &mock::applied_status(&recorded, MANAGER)["deployment"];
    assert_eq!(
        (&deployment["version"], &deployment["status"]),
        (&json!(1), &json!("running"))
    );
    let event = server.event("shop").await;
    assert_eq!(event["reason"], "DeploymentStarted");
    assert_eq!(event["related"]["name"], "web-v1");

    let applied = {
        let received = server
            .expect(Method::PATCH, &replica_set_path(&obj_v1), 200, json!({}))
            .await;
        assert_eq!(
            received.query.get("fieldManager").map(String::as_str),
            Some(MANAGER)
        );
        assert_eq!(received.query.get("force").map(String::as_str), Some("true"));
        received.body
    };
    assert_eq!(applied["spec"]["replicas"], 2, "no older pods: every pod at once");
    assert_eq!(applied["metadata"]["labels"]["jobs.capstan.dev/version"], "1");
    assert!(applied["metadata"]["annotations"]["jobs.capstan.dev/applied-hash"].is_string());

    server
        .expect(Method::GET, SERVICES, 200, list("Service", vec![]))
        .await;

    let mut recorded = fresh.clone();
    recorded["status"] = json!({"deployment": deployment.clone()});
    server
        .expect(Method::GET, JOB_STATUS, 200, recorded.clone())
        .await;
    let written = server.expect(Method::PATCH, JOB_STATUS, 200, recorded).await;
    let status = mock::applied_status(&written, MANAGER);
    assert_eq!(status["version"], 1);
    assert_eq!(status["runningVersion"], 1);
    assert_eq!(status["phase"], "deploying");
    assert_eq!(status["desired"], 2);
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["conditions"][0]["reason"], "Deploying");

    reconcile.await.unwrap().unwrap();
    server.done().await;
}

/// A spec change is a new version: the newest revision's spec differs, so version 2 is
/// recorded; with version 1's pods running it starts with a canary beside them.
#[tokio::test]
async fn a_changed_spec_is_version_2_and_starts_with_a_canary() {
    let old_rs: ReplicaSet = serde_json::from_value(json!({
        "metadata": {
            "name": "web-api-0000000000", "namespace": "shop",
            "labels": {"jobs.capstan.dev/job": "web", "jobs.capstan.dev/group": "api",
                       "jobs.capstan.dev/version": "1"},
            "ownerReferences": [{"apiVersion": "jobs.capstan.dev/v1alpha1", "kind": "Job",
                                 "name": "web", "uid": "uid-web", "controller": true}],
        },
        "spec": {"replicas": 2, "selector": {}},
    }))
    .unwrap();
    let (ctx, mut server) = context(vec![old_rs]);
    let v1_done = json!({
        "version": 1, "stableVersion": 1, "runningVersion": 1, "observedGeneration": 1,
        "deployment": {"version": 1, "status": "successful"},
    });
    let obj: Job = serde_json::from_value(job(2, "api:2", v1_done.clone())).unwrap();
    let path = replica_set_path(&obj);
    let reconcile = tokio::spawn(reconciler::reconcile(Arc::new(obj), ctx));

    server
        .expect(
            Method::GET,
            REVISIONS,
            200,
            list("ControllerRevision", vec![revision(1, "api:1")]),
        )
        .await;
    let created = server
        .expect(Method::POST, REVISIONS, 201, revision(2, "api:2"))
        .await;
    assert_eq!(created.body["metadata"]["name"], "web-v2");
    assert_eq!(created.body["revision"], 2);
    server.expect(Method::PATCH, PRIORITY, 200, json!({})).await;

    server
        .expect(Method::GET, JOB_STATUS, 200, job(2, "api:2", v1_done.clone()))
        .await;
    let recorded = server
        .expect(Method::PATCH, JOB_STATUS, 200, job(2, "api:2", v1_done.clone()))
        .await;
    let deployment = mock::applied_status(&recorded, MANAGER)["deployment"].clone();
    assert_eq!(
        (&deployment["version"], &deployment["canariesDesired"]),
        (&json!(2), &json!(1))
    );
    assert_eq!(server.event("shop").await["reason"], "DeploymentStarted");

    let canary = server.expect(Method::PATCH, &path, 200, json!({})).await;
    assert_eq!(
        canary.body["spec"]["replicas"], 1,
        "one canary; version 1 keeps its 2 pods"
    );
    assert_eq!(canary.body["metadata"]["labels"]["jobs.capstan.dev/version"], "2");

    server
        .expect(Method::GET, SERVICES, 200, list("Service", vec![]))
        .await;
    let mut recorded = job(2, "api:2", v1_done);
    recorded["status"]["deployment"] = deployment;
    server
        .expect(Method::GET, JOB_STATUS, 200, recorded.clone())
        .await;
    let written = server.expect(Method::PATCH, JOB_STATUS, 200, recorded).await;
    let status = mock::applied_status(&written, MANAGER);
    assert_eq!(
        (&status["version"], &status["stableVersion"]),
        (&json!(2), &json!(1))
    );
    assert_eq!(status["phase"], "deploying");

    reconcile.await.unwrap().unwrap();
    server.done().await;
}

/// A reconcile of a generation the status was written for reads no revision: the
/// status's version says it.
#[tokio::test]
async fn an_unchanged_generation_reads_no_revision() {
    let (ctx, mut server) = context(vec![]);
    let settled = json!({
        "version": 3, "stableVersion": 3, "runningVersion": 3, "observedGeneration": 4, "phase": "pending",
        "deployment": {"version": 3, "status": "successful"},
    });
    let obj: Job = serde_json::from_value(job(4, "api:3", settled)).unwrap();
    let path = replica_set_path(&obj);
    let reconcile = tokio::spawn(reconciler::reconcile(Arc::new(obj), ctx));
    server.expect(Method::PATCH, PRIORITY, 200, json!({})).await;
    let applied = server.expect(Method::PATCH, &path, 200, json!({})).await;
    assert_eq!(
        applied.body["metadata"]["labels"]["jobs.capstan.dev/version"],
        "3"
    );
    // The status changes (summary, Ready), so it is read and written; no revision read.
    server
        .expect(Method::GET, JOB_STATUS, 200, job(4, "api:3", json!({})))
        .await;
    server
        .expect(Method::PATCH, JOB_STATUS, 200, job(4, "api:3", json!({})))
        .await;
    reconcile.await.unwrap().unwrap();
    server.done().await;
}

/// A controller started while a canary waits for promotion (its predecessor was
/// killed): the deployment in status and the canary's ReplicaSet, found by its
/// template's name, are where it resumes. It records nothing new, publishes nothing,
/// and places no second canary set: its only ReplicaSet write is the same canary, at 1.
#[tokio::test]
async fn a_restarted_controller_resumes_a_waiting_canary_without_a_second_set() {
    let waiting = json!({
        "version": 2, "stableVersion": 1, "runningVersion": 2, "observedGeneration": 2,
        "phase": "deploying",
        "deployment": {"version": 2, "status": "running", "canariesDesired": 1, "canariesPlaced": 1,
                       "promoted": false, "startedAt": "2026-01-01T00:00:00Z",
                       "deadline": "2100-01-01T00:00:00Z"},
    });
    let obj: Job = serde_json::from_value(job(2, "api:2", waiting.clone())).unwrap();
    let path = replica_set_path(&obj);
    let canary_name = path.rsplit('/').next().unwrap().to_owned();
    let rs = |name: &str, version: i64, replicas: i32| -> ReplicaSet {
        serde_json::from_value(json!({
            "metadata": {
                "name": name, "namespace": "shop",
                "labels": {"jobs.capstan.dev/job": "web", "jobs.capstan.dev/group": "api",
                           "jobs.capstan.dev/version": version.to_string()},
                "ownerReferences": [{"apiVersion": "jobs.capstan.dev/v1alpha1", "kind": "Job",
                                     "name": "web", "uid": "uid-web", "controller": true}],
            },
            "spec": {"replicas": replicas, "selector": {}},
        }))
        .unwrap()
    };
    let (ctx, mut server) = context(vec![rs("web-api-0000000000", 1, 2), rs(&canary_name, 2, 1)]);
    let reconcile = tokio::spawn(reconciler::reconcile(Arc::new(obj), ctx));

    server.expect(Method::PATCH, PRIORITY, 200, json!({})).await;
    let canary = server.expect(Method::PATCH, &path, 200, json!({})).await;
    assert_eq!(canary.body["spec"]["replicas"], 1);
    server
        .expect(Method::GET, JOB_STATUS, 200, job(2, "api:2", waiting.clone()))
        .await;
    let written = server
        .expect(Method::PATCH, JOB_STATUS, 200, job(2, "api:2", waiting))
        .await;
    let deployment = &mock::applied_status(&written, MANAGER)["deployment"];
    assert_eq!(
        deployment["startedAt"], "2026-01-01T00:00:00Z",
        "the same deployment"
    );
    assert_eq!(deployment["canariesDesired"], 1);

    reconcile.await.unwrap().unwrap();
    server.done().await;
}

/// A spec the compiler refuses (it got past the webhook) changes nothing it runs: Ready
/// is False with reason InvalidSpec and a message naming the field, and one Warning
/// Event says so.
#[tokio::test]
async fn a_spec_that_does_not_compile_is_reported_with_the_field_named() {
    let (ctx, mut server) = context(vec![]);
    let mut manifest = job(1, "api:1", json!({"version": 1, "observedGeneration": 1}));
    manifest["spec"]["groups"][0]["constraints"] =
        json!([{"operator": "distinct_property", "attribute": "${meta.rack}", "value": "2"}]);
    let obj: Job = serde_json::from_value(manifest.clone()).unwrap();
    let reconcile = tokio::spawn(reconciler::reconcile(Arc::new(obj), ctx));

    server.expect(Method::PATCH, PRIORITY, 200, json!({})).await;
    server
        .expect(Method::GET, JOB_STATUS, 200, manifest.clone())
        .await;
    let written = server.expect(Method::PATCH, JOB_STATUS, 200, manifest).await;
    let ready = &mock::applied_status(&written, MANAGER)["conditions"][0];
    assert_eq!(
        (&ready["status"], &ready["reason"]),
        (&json!("False"), &json!("InvalidSpec"))
    );
    let message = ready["message"].as_str().unwrap();
    assert!(
        message.starts_with("spec.groups[0].constraints[0].value: "),
        "{message}"
    );
    let event = server.event("shop").await;
    assert_eq!(
        (&event["type"], &event["reason"]),
        (&json!("Warning"), &json!("InvalidSpec"))
    );

    reconcile.await.unwrap().unwrap();
    server.done().await;
}

/// Every reconcile waiting for the stores at a new leader's start is woken once they are
/// listed, not only the last one to wait (a store's own wait keeps one waker).
#[tokio::test]
async fn every_reconcile_waiting_for_the_first_lists_is_woken() {
    let (jobs, _jobs_writer) = reflector::store::<Job>();
    let (pods, mut pods_writer) = reflector::store();
    let (replica_sets, mut rs_writer) = reflector::store::<ReplicaSet>();
    let (nodes, mut nodes_writer) = reflector::store();
    let state = Arc::new(State::new(
        jobs,
        pods,
        replica_sets,
        nodes,
        compile::Settings::default(),
    ));
    // Two tasks, as the controller runs two reconciles: each has its own waker.
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let state = state.clone();
            tokio::spawn(async move { state.listed().await.is_ok() })
        })
        .collect();
    // Both wait (each polled once) before the lists arrive.
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    assert!(waiting.iter().all(|task| !task.is_finished()));
    pods_writer.apply_watcher_event(&watcher::Event::InitDone);
    rs_writer.apply_watcher_event(&watcher::Event::InitDone);
    nodes_writer.apply_watcher_event(&watcher::Event::InitDone);
    for task in waiting {
        let listed = tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("every waiting reconcile is woken")
            .unwrap();
        assert!(listed);
    }
}
