//! What the test cluster itself must provide for the rest of the suite: nodes in two
//! datacenters that run pods, and TokenRequest/TokenReview with audiences (the identity
//! the mesh and the secrets engine build on).

use capstan_tests::*;
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec},
    core::v1::{Node, ServiceAccount},
};
use kube::{
    Api,
    api::{ListParams, ObjectMeta, PostParams},
};
use std::{collections::BTreeSet, time::Duration};

const REGION: &str = "topology.kubernetes.io/region";

#[tokio::test]
async fn nodes_span_two_datacenters_and_run_a_deployment() -> anyhow::Result<()> {
    let client = client().await;
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let regions: BTreeSet<String> = nodes
        .items
        .iter()
        .filter_map(|n| n.metadata.labels.as_ref()?.get(REGION).cloned())
        .collect();
    assert!(
        regions.len() >= 2,
        "nodes must span two regions, found {regions:?}"
    );
    if std::env::var_os("CAPSTAN_CLUSTER_CONTROL").is_some() {
        assert_eq!(nodes.items.len(), 4, "hack/cluster.sh starts four nodes");
    }

    let ns = TestNamespace::new(&client, "e2e-cluster").await;
    let deployment = format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: spread, namespace: {ns}}}
spec:
  replicas: 6
  selector: {{matchLabels: {{app: spread}}}}
  template:
    metadata: {{labels: {{app: spread}}}}
    spec:
      topologySpreadConstraints:
        - {{maxSkew: 1, topologyKey: {REGION}, whenUnsatisfiable: DoNotSchedule, labelSelector: {{matchLabels: {{app: spread}}}}}}
      containers: [{{name: pause, image: registry.k8s.io/pause:3.10}}]
"#,
        ns = ns.name
    );
    let (ok, out) = kubectl_stdin(&["apply", "-f", "-"], &deployment);
    assert!(ok, "{out}");
    run(
        "kubectl",
        &[
            "rollout",
            "status",
            "deployment/spread",
            "-n",
            &ns.name,
            "--timeout=60s",
        ],
    )?;
    let pods: serde_json::Value = serde_json::from_str(&run(
        "kubectl",
        &["get", "pods", "-n", &ns.name, "-l", "app=spread", "-o", "json"],
    )?)?;
    let mut placed = BTreeSet::new();
    for pod in pods["items"].as_array().unwrap() {
        assert_eq!(pod["status"]["phase"], "Running", "{pod}");
        let node = pod["spec"]["nodeName"].as_str().unwrap();
        let region = nodes
            .items
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(node))
            .unwrap()
            .metadata
            .labels
            .as_ref()
            .unwrap()[REGION]
            .clone();
        placed.insert(region);
    }
    assert!(placed.len() >= 2, "pods all landed in {placed:?}");
    Ok(())
}

#[tokio::test]
async fn token_request_and_review_honour_audiences() -> anyhow::Result<()> {
    let client = client().await;
    let ns = TestNamespace::new(&client, "e2e-token").await;
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), &ns.name);
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("workload".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    accounts.create(&PostParams::default(), &sa).await?;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["capstan.dev/mesh".into()],
            expiration_seconds: Some(600),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    let token = eventually(
        Duration::from_secs(10),
        "a token for the new ServiceAccount",
        || {
            let (accounts, request) = (accounts.clone(), request.clone());
            async move {
                accounts
                    .create_token_request("workload", &PostParams::default(), &request)
                    .await
                    .ok()
            }
        },
    )
    .await?
    .status
    .unwrap()
    .token;

    let review = |audience: &str| TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.clone()),
            audiences: Some(vec![audience.to_owned()]),
        },
        ..Default::default()
    };
    let reviews = Api::<TokenReview>::all(client.clone());
    let good = reviews
        .create(&PostParams::default(), &review("capstan.dev/mesh"))
        .await?
        .status
        .unwrap();
    assert_eq!(good.authenticated, Some(true), "{good:?}");
    assert_eq!(
        good.user.unwrap().username.as_deref(),
        Some(format!("system:serviceaccount:{}:workload", ns.name).as_str())
    );
    let wrong = reviews
        .create(&PostParams::default(), &review("capstan.dev/other"))
        .await?
        .status
        .unwrap();
    assert_ne!(
        wrong.authenticated,
        Some(true),
        "a token for another audience must not authenticate"
    );
    Ok(())
}
