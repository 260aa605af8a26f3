//! `/validate-jobs`: what the Job schema cannot check (capstan-jobs' `validate`, the same
//! rules the controller reports as InvalidSpec), and a dispatched child against its
//! parent: the parent exists in the child's namespace and is parameterized, every meta
//! key it requires is given and no other, the payload is as it says.
//!
//! Each refusal names its field (`spec.groups[0].constraints[1].value: ...`). Reading the
//! parent fails with an HTTP 500, so that the API server applies the failurePolicy: Fail
//! for dispatched children (the chart's comment says why).

use super::{AppState, deny, parse};
use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use capstan_crds::jobs::Job;
use capstan_jobs::validate::{self, FieldError};
use kube::{
    Api, ResourceExt,
    core::admission::{AdmissionResponse, Operation},
};
use std::sync::Arc;

pub const VALIDATE_JOBS: &str = "validate-jobs";

pub(super) async fn validate_jobs(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let request = match parse::<Job>(&body) {
        Ok(request) => request,
        Err(invalid) => {
            state.metrics.request(VALIDATE_JOBS, "invalid");
            return Json(invalid.into_review()).into_response();
        }
    };
    let response = AdmissionResponse::from(&request);
    let Some(job) = &request.object else {
        state.metrics.request(VALIDATE_JOBS, "allowed");
        return Json(response.into_review()).into_response();
    };
    // An update that leaves the spec alone (labels, finalizers, the garbage collector
    // removing an owner) is not judged again: rules added since the spec was accepted
    // must not block its metadata.
    let old = request.old_object.as_ref();
    if request.operation == Operation::Update && old.is_some_and(|old| old.spec == job.spec) {
        state.metrics.request(VALIDATE_JOBS, "allowed");
        return Json(response.into_review()).into_response();
    }
    let namespace = request.namespace.clone().unwrap_or_default();
    let mut problems = validate::validate(job);
    // A child is judged against its parent when it is dispatched (the schema keeps
    // spec.dispatch from changing after).
    if let Some(dispatch) = &job.spec.dispatch
        && old.is_none_or(|old| old.spec.dispatch.as_ref() != Some(dispatch))
    {
        let parents = Api::<Job>::namespaced(state.client.clone(), &namespace);
        match parents.get_opt(&dispatch.parent).await {
            Ok(Some(parent)) => problems.extend(validate::validate_dispatch(&parent.spec, dispatch)),
            Ok(None) => problems.push(FieldError::new(
                "spec.dispatch.parent",
                format!("no Job {:?} in namespace {namespace}", dispatch.parent),
            )),
            Err(error) => {
                state.metrics.request(VALIDATE_JOBS, "error");
                tracing::warn!(%namespace, parent = %dispatch.parent, %error, "Could not read a dispatched Job's parent");
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("reading Job {namespace}/{}: {error}", dispatch.parent),
                )
                    .into_response();
            }
        }
    }
    if problems.is_empty() {
        state.metrics.request(VALIDATE_JOBS, "allowed");
        return Json(response.into_review()).into_response();
    }
    state.metrics.request(VALIDATE_JOBS, "denied");
    let name = job.name_any();
    let problems = problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    tracing::info!(%namespace, %name, %problems, "Refused a Job");
    let mut denied = deny(response, format!("Job {namespace}/{name} is invalid: {problems}"));
    denied.result.reason = "Invalid".into();
    denied.result.code = 422;
    Json(denied.into_review()).into_response()
}

#[cfg(test)]
mod tests {
    use super::VALIDATE_JOBS;
    use serde_json::{Value, json};
    use std::sync::Arc;
    use tower::ServiceExt as _;

    /// The webhook with an API server that holds `jobs` (Jobs of namespace shop, by name)
    /// and answers 404 for any other read.
    fn state_with(jobs: Vec<Value>) -> Arc<super::AppState> {
        let offline = super::super::tests::offline_state(Default::default(), &[("shop", &[])]);
        let mut state = Arc::into_inner(offline).expect("the only reference");
        let jobs = Arc::new(jobs);
        let api = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let jobs = jobs.clone();
            async move {
                let path = request.uri().path().to_owned();
                let found = jobs.iter().find(|job| {
                    path == format!(
                        "/apis/jobs.capstan.dev/v1alpha1/namespaces/shop/jobs/{}",
                        job["metadata"]["name"].as_str().unwrap()
                    )
                });
                let (status, body) = match found {
                    Some(job) => (200, job.clone()),
                    None => (
                        404,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                    ),
                };
                Ok::<_, std::convert::Infallible>(
                    http::Response::builder()
                        .status(status)
                        .body(kube::client::Body::from(body.to_string().into_bytes()))
                        .unwrap(),
                )
            }
        });
        state.client = kube::Client::new(api, "default");
        Arc::new(state)
    }

    fn job(name: &str, spec: Value) -> Value {
        json!({
            "apiVersion": "jobs.capstan.dev/v1alpha1", "kind": "Job",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": spec,
        })
    }

    fn batch(extra: Value) -> Value {
        let mut spec = json!({
            "type": "batch",
            "groups": [{"name": "render", "tasks": [{"name": "render", "image": "report:1"}]}],
        });
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        spec
    }

    /// The answer to an AdmissionReview of `object` (and `old` for an UPDATE): the HTTP
    /// status and the review's response.
    async fn admit(state: Arc<super::AppState>, object: Value, old: Option<Value>) -> (u16, Value) {
        let review = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u3", "operation": if old.is_some() { "UPDATE" } else { "CREATE" }, "namespace": "shop",
                "kind": {"group": "jobs.capstan.dev", "version": "v1alpha1", "kind": "Job"},
                "resource": {"group": "jobs.capstan.dev", "version": "v1alpha1", "resource": "jobs"},
                "userInfo": {"username": "alice"},
                "object": object, "oldObject": old,
            },
        });
        let request = http::Request::post(format!("/{VALIDATE_JOBS}"))
            .header("content-type", "application/json")
            .body(axum::body::Body::from(review.to_string()))
            .unwrap();
        let response = super::super::router(state).oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (
            status,
            serde_json::from_slice(&body).unwrap_or(Value::Null)["response"].clone(),
        )
    }

    #[tokio::test]
    async fn a_job_the_schema_cannot_judge_is_refused_naming_the_field() {
        let bad = job(
            "report",
            batch(
                json!({"constraints": [{"attribute": "${meta.rack}", "operator": "regexp", "value": "r(1"}]}),
            ),
        );
        let (status, response) = admit(state_with(vec![]), bad, None).await;
        assert_eq!(status, 200);
        assert_eq!(response["allowed"], false, "{response}");
        assert_eq!(response["status"]["code"], 422);
        let message = response["status"]["message"].as_str().unwrap();
        assert!(message.contains("spec.constraints[0].value: "), "{message}");
        let (_, response) = admit(state_with(vec![]), job("report", batch(json!({}))), None).await;
        assert_eq!(response["allowed"], true, "{response}");
    }

    #[tokio::test]
    async fn an_update_that_leaves_the_spec_alone_is_not_judged_again() {
        let stored = job(
            "report",
            batch(
                json!({"constraints": [{"attribute": "${meta.rack}", "operator": "regexp", "value": "r(1"}]}),
            ),
        );
        let mut labelled = stored.clone();
        labelled["metadata"]["labels"] = json!({"team": "shop"});
        let (_, response) = admit(state_with(vec![]), labelled, Some(stored)).await;
        assert_eq!(response["allowed"], true, "{response}");
    }

    #[tokio::test]
    async fn a_dispatched_child_is_judged_against_its_parent() {
        let parent = job(
            "report",
            batch(json!({"parameterized": {"metaRequired": ["customer"], "metaOptional": ["format"]}})),
        );
        let child = |meta: Value| {
            job(
                "report-abcdefghij",
                batch(json!({"dispatch": {"parent": "report", "meta": meta}})),
            )
        };
        let state = state_with(vec![parent]);
        let (_, response) = admit(state.clone(), child(json!({"format": "pdf"})), None).await;
        assert_eq!(response["allowed"], false, "{response}");
        let message = response["status"]["message"].as_str().unwrap();
        assert!(
            message.contains("spec.dispatch.meta: \"customer\" is required"),
            "{message}"
        );
        let (_, response) = admit(state.clone(), child(json!({"customer": "acme"})), None).await;
        assert_eq!(response["allowed"], true, "{response}");

        let orphan = job(
            "gone-abcdefghij",
            batch(json!({"dispatch": {"parent": "gone", "meta": {}}})),
        );
        let (_, response) = admit(state, orphan, None).await;
        let message = response["status"]["message"].as_str().unwrap();
        assert!(
            message.contains("spec.dispatch.parent: no Job \"gone\""),
            "{message}"
        );
    }

    /// The API server unreachable: an HTTP 500, so the failurePolicy (Fail) decides,
    /// never an unchecked child allowed.
    #[tokio::test]
    async fn a_parent_that_cannot_be_read_is_a_failure_to_decide() {
        let offline = super::super::tests::offline_state(Default::default(), &[("shop", &[])]);
        let child = job(
            "report-abcdefghij",
            batch(json!({"dispatch": {"parent": "report", "meta": {}}})),
        );
        let (status, _) = admit(offline, child, None).await;
        assert_eq!(status, 500);
    }
}
