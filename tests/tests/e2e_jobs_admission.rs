//! Jobs refused at the door on the real API server, each naming its field: by the CRD
//! schema (an unknown operator, a job's canary above a group's count, templates without
//! vault, a payload file on a job nothing dispatches) and by capstan-webhook's
//! `/validate-jobs` (a regexp that does not compile, a dispatched child missing the meta
//! its parent requires, or its parent), whatever the client asks for (kubectl with
//! --validate=false, a plain POST).
//!
//! The webhook runs as a process with its chart ServiceAccount's token (so with the
//! chart's RBAC: it reads the parent by name), reached at https://127.0.0.1:PORT.

use anyhow::Result;
use capstan_tests::*;
use kube::{
    Api,
    api::{ApiResource, DynamicObject, PostParams},
    core::GroupVersionKind,
};
use serde_json::{Value, json};
use std::time::Duration;

fn jobs(client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("jobs.capstan.dev", "v1alpha1", "Job");
    Api::namespaced_with(client.clone(), namespace, &ApiResource::from_gvk(&gvk))
}

/// A batch Job named `name` with `spec` merged over a one-task group.
fn job(name: &str, spec: Value) -> DynamicObject {
    let mut base = json!({
        "type": "batch",
        "groups": [{"name": "work", "count": 2, "tasks": [{"name": "main", "image": "busybox:1"}]}],
    });
    base.as_object_mut()
        .unwrap()
        .extend(spec.as_object().unwrap().clone());
    serde_json::from_value(json!({
        "apiVersion": "jobs.capstan.dev/v1alpha1", "kind": "Job",
        "metadata": {"name": name},
        "spec": base,
    }))
    .unwrap()
}

/// The API server's message refusing the create of `obj` (which must be refused).
async fn refusal(api: &Api<DynamicObject>, obj: &DynamicObject) -> String {
    match api.create(&PostParams::default(), obj).await {
        Err(kube::Error::Api(status)) => status.message,
        Err(other) => panic!("the create failed otherwise: {other}"),
        Ok(created) => panic!("accepted: {:?}", created.data["spec"]),
    }
}

#[tokio::test]
async fn invalid_jobs_are_refused_naming_the_field_by_schema_and_webhook() -> Result<()> {
    let client = client().await;
    let _webhook = WebhookProcess::start(&client, &[]).await?;
    let ns = TestNamespace::new(&client, "e2e-jobs-admit").await;
    let api = jobs(&client, &ns.name);

    // The schema: an operator Nomad does not have.
    let unknown = job(
        "unknown-op",
        json!({"constraints": [{"attribute": "${meta.rack}", "operator": "~=", "value": "r1"}]}),
    );
    let text = refusal(&api, &unknown).await;
    assert!(text.contains("spec.constraints[0].operator"), "{text}");

    // The webhook: a regexp that does not compile. The API server follows the validating
    // configuration's new URL a moment after the webhook wrote it.
    let bad_regexp = job(
        "bad-regexp",
        json!({"groups": [{"name": "work", "tasks": [{"name": "main", "image": "busybox:1"}],
            "constraints": [{"attribute": "${meta.rack}", "operator": "regexp", "value": "r(1"}]}]}),
    );
    let text = eventually(Duration::from_secs(20), "the jobs webhook to refuse", || async {
        match api.create(&PostParams::default(), &bad_regexp).await {
            Err(kube::Error::Api(status)) => Some(status.message),
            _ => {
                let _ = api.delete("bad-regexp", &Default::default()).await;
                None
            }
        }
    })
    .await?;
    assert!(
        text.contains("jobs.validate.capstan.dev") && text.contains("spec.groups[0].constraints[0].value: "),
        "{text}"
    );

    // The same through kubectl without client-side validation: the server still refuses.
    let manifest = serde_json::to_string(&bad_regexp)?;
    let (ok, text) = kubectl_stdin(
        &["apply", "--validate=false", "-n", &ns.name, "-f", "-"],
        &manifest,
    );
    assert!(
        !ok && text.contains("spec.groups[0].constraints[0].value"),
        "{text}"
    );

    // The schema's rules across fields: the job's canary against a group's count, a
    // template without vault, a payload file on a job nothing dispatches.
    let canaries = job(
        "too-many-canaries",
        json!({"type": "service", "update": {"canary": 3}}),
    );
    let text = refusal(&api, &canaries).await;
    assert!(
        text.contains("spec.update.canary") && text.contains("more canaries than a group's count"),
        "{text}"
    );
    let template = job(
        "no-vault",
        json!({"groups": [{"name": "work", "tasks": [{"name": "main", "image": "busybox:1",
            "templates": [{"destination": "db.env", "data": "x"}]}]}]}),
    );
    let text = refusal(&api, &template).await;
    assert!(text.contains("spec.groups[0].vault"), "{text}");
    let payload = job(
        "no-dispatch",
        json!({"groups": [{"name": "work", "tasks": [{"name": "main", "image": "busybox:1",
            "dispatchPayload": {"file": "in.json"}}]}]}),
    );
    let text = refusal(&api, &payload).await;
    assert!(
        text.contains("spec.groups") && text.contains("dispatchPayload"),
        "{text}"
    );

    // A job's type never changes: the old type's objects would keep running beside the
    // new type's. The schema's transition rule refuses it on update.
    let created = api
        .create(&PostParams::default(), &job("typed", json!({})))
        .await?;
    let mut retyped = created.clone();
    retyped.data["spec"]["type"] = json!("sysbatch");
    match api.replace("typed", &PostParams::default(), &retyped).await {
        Err(kube::Error::Api(status)) => assert!(
            status.message.contains("spec.type") && status.message.contains("cannot change"),
            "{}",
            status.message
        ),
        other => panic!("a type change was not refused: {other:?}"),
    }

    // A dispatched child is judged against its parent (read by the webhook, as its
    // ServiceAccount may: get, nothing more).
    api.create(
        &PostParams::default(),
        &job(
            "report",
            json!({"parameterized": {"metaRequired": ["customer"], "metaOptional": ["format"]}}),
        ),
    )
    .await?;
    let child = |name: &str, meta: Value| {
        job(
            name,
            json!({"dispatch": {"parent": "report", "meta": meta, "payload": "aGk="}}),
        )
    };
    let text = refusal(&api, &child("report-missing000", json!({"format": "pdf"}))).await;
    assert!(
        text.contains("dispatch.jobs.validate.capstan.dev")
            && text.contains("spec.dispatch.meta: \"customer\" is required"),
        "{text}"
    );
    api.create(
        &PostParams::default(),
        &child("report-given00000", json!({"customer": "acme"})),
    )
    .await?;
    let orphan = job("orphan-0000000000", json!({"dispatch": {"parent": "nobody"}}));
    let text = refusal(&api, &orphan).await;
    assert!(text.contains("spec.dispatch.parent: no Job \"nobody\""), "{text}");

    let can = |verb: &str| {
        std::process::Command::new("kubectl")
            .args([
                "auth",
                "can-i",
                verb,
                "jobs.jobs.capstan.dev",
                "-n",
                &ns.name,
                &format!("--as=system:serviceaccount:{SYSTEM_NAMESPACE}:{WEBHOOK_SA}"),
            ])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(can("get") && !can("list") && !can("update"));
    Ok(())
}
