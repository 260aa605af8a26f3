//! Pods that should be meshed but are not.
//!
//! The injector can be bypassed: a pod created before the webhook was installed, while
//! its configuration was missing, or (for annotation opt-ins, whose webhook is Ignore)
//! while it was down, runs without the proxy, so intentions do not protect it and its
//! clients cannot reach it. This watch finds such pods and reports each where a user
//! looks: a Warning Event on the pod, the gauge `capstan_controller_mesh_unmeshed_pods
//! {namespace}`, and a `Meshed=False` condition (reason UnmeshedPods, listing them) on
//! the ServiceIntentions whose destination is the pod's service (its ServiceAccount).
//! The condition flips back to True once none is left.

use super::State;
use crate::{context::Context, metrics::NamespaceLabels, status::Writer};
use capstan_crds::conditions::{self, ConditionStatus};
use capstan_mesh::{
    in_force as conflicts,
    selection::{self, Wanted},
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Resource, ResourceExt,
    core::PartialObjectMeta,
    runtime::{
        WatchStreamExt,
        events::EventType,
        reflector::{self, ObjectRef},
        watcher,
    },
};
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    future::Future,
    sync::Arc,
    time::Duration,
};

pub const MESHED: &str = "Meshed";

/// The Meshed condition's reasons, and the pod Event's.
pub mod reasons {
    pub const UNMESHED_PODS: &str = "UnmeshedPods";
    pub const ALL_PODS_MESHED: &str = "AllPodsMeshed";
    pub const UNMESHED_POD: &str = "UnmeshedPod";
}

/// The Meshed condition, under a field manager of its own: the intentions reconciler
/// applies Ready and its fields without it, and neither removes the other's.
const STATUS: Writer = Writer {
    manager: "capstan-controller-unmeshed",
    controller: super::CONTROLLER,
    fields: &[],
    conditions: &[MESHED],
};

/// A pod that should be meshed and is not.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Unmeshed {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Its service: the ServiceAccount name.
    pub service: String,
    pub by_namespace: bool,
}

/// The unmeshed pods among `pods` (pure). `labels_of` gives a namespace's labels, or
/// None when they are not known yet (such pods are judged on a later pass).
pub fn find<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    labels_of: impl Fn(&str) -> Option<BTreeMap<String, String>>,
    config: &selection::Config,
) -> Vec<Unmeshed> {
    let mut found = Vec::new();
    for pod in pods {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if pod.metadata.deletion_timestamp.is_some() || matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let namespace = pod.namespace().unwrap_or_default();
        let Some(labels) = labels_of(&namespace) else {
            continue;
        };
        let wanted = selection::wanted(&namespace, &labels, pod.annotations(), config);
        if matches!(wanted, Wanted::No(_)) || selection::is_injected(pod) {
            continue;
        }
        found.push(Unmeshed {
            namespace,
            name: pod.name_any(),
            uid: pod.uid().unwrap_or_default(),
            service: pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            by_namespace: wanted == Wanted::ByNamespace,
        });
    }
    found.sort();
    found
}

/// The pods of `found` a ServiceIntentions for `destination` (namespace, name) is about.
pub fn for_destination<'a>(found: &'a [Unmeshed], destination: &(String, String)) -> Vec<&'a Unmeshed> {
    found
        .iter()
        .filter(|p| p.namespace == destination.0 && (destination.1 == "*" || p.service == destination.1))
        .collect()
}

/// Watches pods and namespaces until `shutdown`, reporting unmeshed pods after each
/// burst of changes (and every `resync` regardless).
pub async fn run(ctx: Arc<Context<State>>, shutdown: impl Future<Output = ()> + Send + 'static) {
    // Capstan's own namespace is never meshed.
    let own_namespace = ctx.config.namespace.clone();
    let (pods, pod_writer) = reflector::store::<Pod>();
    let (namespaces, ns_writer) = reflector::store::<PartialObjectMeta<Namespace>>();
    // Only what the judgement needs is kept: a cluster's pods are many.
    let pod_events = reflector::reflector(
        pod_writer,
        watcher(
            Api::<Pod>::all(ctx.client.clone()),
            watcher::Config::default().any_semantic(),
        )
        .modify(|pod| {
            pod.managed_fields_mut().clear();
            if let Some(spec) = pod.spec.as_mut() {
                for c in spec
                    .containers
                    .iter_mut()
                    .chain(spec.init_containers.iter_mut().flatten())
                {
                    c.env = None;
                    c.args = None;
                    c.command = None;
                }
                spec.volumes = None;
            }
            if let Some(status) = pod.status.as_mut() {
                *status = k8s_openapi::api::core::v1::PodStatus {
                    phase: status.phase.take(),
                    ..Default::default()
                };
            }
        }),
    )
    .default_backoff()
    .map(|_| ());
    let ns_events = reflector::reflector(
        ns_writer,
        watcher(
            Api::<PartialObjectMeta<Namespace>>::all(ctx.client.clone()),
            watcher::Config::default().any_semantic(),
        ),
    )
    .default_backoff()
    .map(|_| ());
    let mut changes = futures::stream::select(pod_events.boxed(), ns_events.boxed());

    let config = selection::Config {
        excluded_namespaces: vec!["kube-system".into(), own_namespace],
    };
    let mut reporter = Reporter::default();
    let shutdown = futures::FutureExt::fuse(shutdown);
    tokio::pin!(shutdown);
    let mut ready = false;
    let mut resync = tokio::time::interval(ctx.config.resync.min(Duration::from_secs(60)));
    loop {
        // Debounce: a rollout changes many pods within a moment. Draining the streams is
        // also what drives the reflectors.
        tokio::time::sleep(Duration::from_millis(500)).await;
        while futures::FutureExt::now_or_never(changes.next())
            .flatten()
            .is_some()
        {}
        ready = ready
            || (futures::FutureExt::now_or_never(pods.wait_until_ready()).is_some()
                && futures::FutureExt::now_or_never(namespaces.wait_until_ready()).is_some());
        // Judged only on complete lists: a half-synced cache would miss pods.
        if ready {
            let found = find(
                pods.state().iter().map(|p| p.as_ref()),
                |ns| {
                    namespaces
                        .get(&ObjectRef::new(ns))
                        .map(|n| n.metadata.labels.clone().unwrap_or_default())
                },
                &config,
            );
            reporter.report(&ctx, &found).await;
        }
        // Wait for the next change (or the periodic pass).
        tokio::select! {
            change = changes.next() => if change.is_none() { return },
            _ = resync.tick() => {}
            () = &mut shutdown => return,
        }
    }
}

#[derive(Default)]
struct Reporter {
    /// Pods already given an Event this term (by uid).
    announced: HashSet<String>,
    /// Namespaces the gauge counts in.
    counted: BTreeSet<String>,
}

impl Reporter {
    async fn report(&mut self, ctx: &Context<State>, found: &[Unmeshed]) {
        if ctx.leadership.ensure().is_err() {
            return;
        }
        let mut per_namespace: BTreeMap<String, i64> = BTreeMap::new();
        for pod in found {
            *per_namespace.entry(pod.namespace.clone()).or_default() += 1;
        }
        for ns in self.counted.iter().filter(|ns| !per_namespace.contains_key(*ns)) {
            ctx.metrics
                .unmeshed_pods
                .get_or_create(&NamespaceLabels {
                    namespace: ns.clone(),
                })
                .set(0);
        }
        for (ns, count) in &per_namespace {
            ctx.metrics
                .unmeshed_pods
                .get_or_create(&NamespaceLabels {
                    namespace: ns.clone(),
                })
                .set(*count);
        }
        self.counted.extend(per_namespace.keys().cloned());

        let live: HashSet<&str> = found.iter().map(|p| p.uid.as_str()).collect();
        self.announced.retain(|uid| live.contains(uid.as_str()));
        let new: Vec<&Unmeshed> = found
            .iter()
            .filter(|p| !self.announced.contains(&p.uid))
            .collect();
        for pod in new {
            let why = if pod.by_namespace {
                format!("namespace {} is labelled capstan.dev/mesh=enabled", pod.namespace)
            } else {
                "it is annotated capstan.dev/inject: \"true\"".to_owned()
            };
            tracing::warn!(namespace = %pod.namespace, pod = %pod.name, "Found a pod that should be meshed but is not");
            let note = format!(
                "Pod should be meshed ({why}) but runs without the capstan-proxy sidecar: it was created \
                 while the injector was absent or bypassed. Delete it to have it recreated meshed."
            );
            let reference = k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                namespace: Some(pod.namespace.clone()),
                name: Some(pod.name.clone()),
                uid: Some(pod.uid.clone()),
                ..Default::default()
            };
            if ctx
                .publish(
                    &reference,
                    EventType::Warning,
                    reasons::UNMESHED_POD,
                    "Detect",
                    note,
                )
                .await
            {
                self.announced.insert(pod.uid.clone());
            }
        }

        for obj in ctx.state.store.state() {
            // An object naming another namespace governs nothing there, and its status
            // must not list that namespace's pods to its author.
            if obj.meta().deletion_timestamp.is_some()
                || conflicts::out_of_bounds(&obj, &ctx.state.control_namespace).is_some()
            {
                continue;
            }
            let destination = conflicts::destination(&obj);
            let pods = for_destination(found, &destination);
            let current = obj
                .status
                .as_ref()
                .and_then(|s| conditions::get(&s.conditions, MESHED).cloned());
            let (status, reason, message) = if pods.is_empty() {
                // Say it is fine again only where it was said not to be.
                if current.is_none() {
                    continue;
                }
                (
                    ConditionStatus::True,
                    reasons::ALL_PODS_MESHED,
                    format!(
                        "every running pod of {}/{} carries the mesh proxy",
                        destination.0, destination.1
                    ),
                )
            } else {
                let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
                (
                    ConditionStatus::False,
                    reasons::UNMESHED_PODS,
                    format!(
                        "{} pod(s) of {}/{} should be meshed but run without the capstan-proxy sidecar \
                         (created while the injector was absent): {}; delete them to have them recreated meshed",
                        names.len(),
                        destination.0,
                        destination.1,
                        names.join(", ")
                    ),
                )
            };
            if current
                .as_ref()
                .is_some_and(|c| c.status == status.as_str() && c.reason == reason && c.message == message)
            {
                continue;
            }
            let condition = conditions::new(MESHED, status, reason, message, obj.metadata.generation);
            let write = STATUS.update_of(obj.as_ref(), ctx, |s| {
                conditions::upsert(&mut s.conditions, condition.clone())
            });
            if let Err(error) = write.await {
                tracing::warn!(error = %error, name = %obj.name_any(), "Writing the Meshed condition");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(
        ns: &str,
        name: &str,
        sa: &str,
        annotations: serde_json::Value,
        injected: bool,
        phase: &str,
    ) -> Pod {
        let init = if injected {
            json!([{"name": selection::PROXY_CONTAINER, "restartPolicy": "Always"}])
        } else {
            json!([])
        };
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{name}"), "annotations": annotations},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "app"}], "initContainers": init},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    #[test]
    fn finds_pods_that_should_carry_the_proxy_and_do_not() {
        let pods = [
            pod("shop", "api-1", "api", json!({}), false, "Running"),
            pod("shop", "api-2", "api", json!({}), true, "Running"),
            pod(
                "shop",
                "web-1",
                "web",
                json!({"capstan.dev/inject": "false"}),
                false,
                "Running",
            ),
            pod("shop", "job-1", "api", json!({}), false, "Succeeded"),
            pod(
                "plain",
                "x-1",
                "x",
                json!({"capstan.dev/inject": "true"}),
                false,
                "Pending",
            ),
            pod("plain", "y-1", "y", json!({}), false, "Running"),
            pod(
                "kube-system",
                "dns",
                "coredns",
                json!({"capstan.dev/inject": "true"}),
                false,
                "Running",
            ),
            pod(
                "unknown",
                "z-1",
                "z",
                json!({"capstan.dev/inject": "true"}),
                false,
                "Running",
            ),
        ];
        let labels = |ns: &str| match ns {
            "shop" => Some([("capstan.dev/mesh".to_owned(), "enabled".to_owned())].into()),
            "plain" | "kube-system" => Some(BTreeMap::new()),
            _ => None,
        };
        let found = find(pods.iter(), labels, &selection::Config::default());
        let names: Vec<_> = found.iter().map(|p| (p.name.as_str(), p.by_namespace)).collect();
        assert_eq!(names, [("x-1", false), ("api-1", true)]);
        assert_eq!(
            for_destination(&found, &("shop".into(), "api".into()))
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            ["api-1"]
        );
        assert_eq!(for_destination(&found, &("shop".into(), "web".into())).len(), 0);
        assert_eq!(for_destination(&found, &("plain".into(), "*".into())).len(), 1);
    }
}
