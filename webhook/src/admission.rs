//! The admission handlers: `/mutate-pods` (mesh sidecar and secrets agent injection) and
//! `/validate-serviceintentions` (the checks the CRD schema cannot express),
//! `/validate-ephemeralcontainers` (`kubectl debug` in a meshed pod, M16) and
//! `/validate-jobs` (Jobs, and dispatched children against their parent: `jobs`).
//!
//! A decision (inject, skip, refuse) is an AdmissionResponse. A failure to decide (the
//! API unreachable while reading the namespace) is an HTTP 500, so that the API server
//! applies the webhook's failurePolicy: Fail for labelled namespaces (the pod waits),
//! Ignore elsewhere. Handlers never panic on input: a body that does not parse is
//! answered with an invalid response.

use crate::{engine_address::EngineAddress, metrics::Metrics};
use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use capstan_contract::{ROOTS_KEY, annotations};
use capstan_crds::ServiceIntentions;
use capstan_mesh::{
    in_force,
    selection::{self, Wanted},
    validate,
};
use capstan_webhook::inject::{
    self, Refusal, agent,
    mesh::{self, Injection},
};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use kube::{
    Api, Client, ResourceExt,
    core::{
        DynamicObject, PartialObjectMeta,
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    },
    runtime::reflector::{ObjectRef, Store},
};
use parking_lot::Mutex;
use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

mod jobs;

pub const MUTATE_PODS: &str = "mutate-pods";
pub const VALIDATE_INTENTIONS: &str = "validate-serviceintentions";
/// Updates of the pods/ephemeralcontainers subresource (`kubectl debug`) of meshed pods.
pub const VALIDATE_EPHEMERAL: &str = "validate-ephemeralcontainers";
/// The path of the webhook whose namespaceSelector matches labelled namespaces only: a
/// call on it means the API server found the namespace labelled at admission time.
pub const MUTATE_PODS_ENFORCED: &str = "mutate-pods/enforced";

/// How long the mesh roots read from the ConfigMap are reused: the bundle only seeds a
/// new proxy's trust, which then follows the CA's own answers.
const ROOTS_TTL: Duration = Duration::from_secs(10);

pub struct AppState {
    pub client: Client,
    pub config: inject::Config,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    /// Namespace and name of the ConfigMap the engine publishes the mesh roots in.
    pub roots_namespace: String,
    pub roots_configmap: String,
    /// The roots last read, and when (only found roots are kept).
    pub roots: Mutex<Option<(Instant, String)>>,
    /// Whether a background re-read of the roots is under way (at most one at a time).
    pub refreshing_roots: AtomicBool,
    pub metrics: Metrics,
    /// The engine's addresses, left out of the redirect of pods that also get the agent.
    pub engine: Arc<EngineAddress>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(&format!("/{MUTATE_PODS}"), post(mutate_pods))
        .route(&format!("/{MUTATE_PODS_ENFORCED}"), post(mutate_pods_enforced))
        .route(&format!("/{VALIDATE_INTENTIONS}"), post(validate_intentions))
        .route(&format!("/{VALIDATE_EPHEMERAL}"), post(validate_ephemeral))
        .route(&format!("/{}", jobs::VALIDATE_JOBS), post(jobs::validate_jobs))
        .with_state(state)
}

type Reply = Result<Json<AdmissionReview<DynamicObject>>, (StatusCode, String)>;

/// The request, or the response to send for a body that is not an AdmissionReview of `K`.
#[allow(clippy::result_large_err)]
fn parse<K>(body: &[u8]) -> Result<AdmissionRequest<K>, AdmissionResponse>
where
    K: kube::Resource + serde::de::DeserializeOwned,
{
    match serde_json::from_slice::<AdmissionReview<K>>(body) {
        Ok(review) => review
            .try_into()
            .map_err(|_| AdmissionResponse::invalid("an AdmissionReview without a request")),
        Err(error) => {
            // Keep the uid if the envelope parses, so the API server can match the answer.
            let mut response = AdmissionResponse::invalid(format!("the object does not parse: {error}"));
            if let Ok(review) = serde_json::from_slice::<AdmissionReview<DynamicObject>>(body)
                && let Some(request) = review.request
            {
                response.uid = request.uid;
            }
            Err(response)
        }
    }
}

fn reply(response: AdmissionResponse) -> Reply {
    Ok(Json(response.into_review()))
}

fn deny(request_response: AdmissionResponse, message: String) -> AdmissionResponse {
    let mut response = request_response.deny(message);
    response.result.code = 403;
    response.result.reason = "Forbidden".into();
    response
}

async fn mutate_pods(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    mutate_pods_as(&state, &body, false).await
}

async fn mutate_pods_enforced(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    mutate_pods_as(&state, &body, true).await
}

/// `enforced`: the API server's own namespaceSelector found the namespace labelled
/// capstan.dev/mesh=enabled for this very request. That is trusted over the webhook's
/// watch cache, which can lag behind a namespace labelled a moment ago, and a pod of an
/// enforced namespace must never start unmeshed because of it.
async fn mutate_pods_as(state: &Arc<AppState>, body: &[u8], enforced: bool) -> Response {
    let started = Instant::now();
    let response = match mutate(state, body, enforced).await {
        Ok(json) => json.into_response(),
        Err((code, message)) => {
            state.metrics.request(MUTATE_PODS, "error");
            tracing::warn!(%message, "Could not decide on a pod");
            (code, message).into_response()
        }
    };
    state
        .metrics
        .mutate_request
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn mutate(state: &Arc<AppState>, body: &[u8], enforced: bool) -> Reply {
    let request = match parse::<Pod>(body) {
        Ok(request) => request,
        Err(invalid) => {
            state.metrics.request(MUTATE_PODS, "invalid");
            return reply(invalid);
        }
    };
    let response = AdmissionResponse::from(&request);
    let (Operation::Create, Some(pod)) = (&request.operation, &request.object) else {
        state.metrics.request(MUTATE_PODS, "skipped");
        return reply(response);
    };
    let namespace = request.namespace.clone().unwrap_or_default();
    let pod_name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.clone())
        .unwrap_or_default();
    let mut namespace_labels = state.namespace_labels(&namespace).await?;
    if enforced {
        namespace_labels.insert(
            annotations::mesh::LABEL.to_owned(),
            annotations::mesh::LABEL_ENABLED.to_owned(),
        );
    }

    // The mutation's own time (decision + patch) is measured without the reads around it.
    let started = Instant::now();
    let asked = inject::annotations(pod);
    let wanted = selection::wanted(&namespace, &namespace_labels, asked, &state.config.selection);
    let agent_wanted = agent::wanted(&namespace, &namespace_labels, asked, &state.config);
    let deciding = started.elapsed();
    if let (Wanted::No(skip), false) = (wanted, agent_wanted) {
        state.metrics.request(MUTATE_PODS, "skipped");
        tracing::debug!(%namespace, pod = %pod_name, reason = skip.as_str(), "Not meshing pod");
        return reply(response);
    }
    let mesh_wanted = !matches!(wanted, Wanted::No(_));
    // The CA bundle is only needed (and only read) for a pod that does not have the
    // proxy or the agent yet.
    let needs_roots =
        (mesh_wanted && !selection::is_injected(pod)) || (agent_wanted && !agent::is_injected(pod));
    let roots = if needs_roots {
        match state.roots().await {
            Some(roots) => roots,
            None => {
                state.metrics.request(MUTATE_PODS, "denied");
                let what = if mesh_wanted {
                    "be meshed"
                } else {
                    "have the secrets agent"
                };
                return reply(deny(
                    response,
                    format!(
                        "capstan-webhook: pod {namespace}/{pod_name} must {what}, but the engine has not \
                         published the mesh roots yet (ConfigMap {}/{} key {ROOTS_KEY}): is capstan-engine running?",
                        state.roots_namespace, state.roots_configmap
                    ),
                ));
            }
        }
    } else {
        String::new()
    };
    // A pod that gets the agent too: its redirect leaves the engine alone, so the agent's
    // later connections (renewals) reach the engine directly (see engine_address.rs).
    let mut warnings = Vec::new();
    let with_engine_excluded = if mesh_wanted && agent_wanted && !selection::is_injected(pod) {
        match state.engine.cidrs().await {
            Ok(cidrs) => {
                let mut config = state.config.clone();
                config.exclude_outbound_cidrs.extend(cidrs);
                Some(config)
            }
            Err(error) => {
                tracing::warn!(%namespace, pod = %pod_name, %error, "The engine's address is unknown; the agent's renewals may be redirected");
                warnings.push(format!(
                    "capstan-webhook: the engine's address is unknown ({error}); the secrets agent's \
                     connections after the app starts go through the mesh redirect and may fail"
                ));
                None
            }
        }
    } else {
        None
    };
    let started = Instant::now();
    let mesh = if mesh_wanted {
        mesh::inject(
            pod,
            with_engine_excluded.as_ref().unwrap_or(&state.config),
            &roots,
        )
    } else {
        Ok(Injection::AlreadyInjected)
    };
    let mut ops = match mesh {
        Err(refusals) => {
            state.metrics.request(MUTATE_PODS, "denied");
            let reasons = join(&refusals);
            tracing::info!(%namespace, pod = %pod_name, %reasons, "Refused a pod that cannot be meshed safely");
            return reply(deny(
                response,
                format!("capstan-webhook: pod {namespace}/{pod_name} cannot be meshed: {reasons}"),
            ));
        }
        Ok(Injection::AlreadyInjected) => Vec::new(),
        Ok(Injection::Patch(ops)) => ops,
    };
    let mut injected = Vec::new();
    if !ops.is_empty() {
        injected.push("mesh sidecar");
    }
    if agent_wanted {
        // The agent's patch is computed on the pod as the mesh's patch leaves it, so the
        // two apply one after the other.
        let meshed;
        let target = if ops.is_empty() {
            pod
        } else {
            meshed = patched(pod, &ops)?;
            &meshed
        };
        match agent::inject(target, &state.config, &roots) {
            Err(refusals) => {
                state.metrics.request(MUTATE_PODS, "denied");
                let reasons = join(&refusals);
                tracing::info!(%namespace, pod = %pod_name, %reasons, "Refused a pod whose secrets annotations are invalid");
                return reply(deny(
                    response,
                    format!(
                        "capstan-webhook: pod {namespace}/{pod_name} asks for the secrets agent, but: {reasons}"
                    ),
                ));
            }
            Ok(None) => {}
            Ok(Some(agent_ops)) => {
                ops.extend(agent_ops);
                injected.push("secrets agent");
            }
        }
    }
    state
        .metrics
        .mutation
        .observe((deciding + started.elapsed()).as_secs_f64());
    let mut response = response;
    if !warnings.is_empty() {
        response.warnings = Some(warnings);
    }
    if ops.is_empty() {
        state.metrics.request(MUTATE_PODS, "already_injected");
        return reply(response);
    }
    // The operations are RFC 6902 already: encode them once, directly, rather than
    // through json_patch's types (with_patch marks the type as JSONPatch).
    let mut response = response.with_patch(json_patch::Patch(Vec::new())).map_err(|e| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the patch: {e}"),
        )
    })?;
    response.patch = Some(serde_json::to_vec(&ops).map_err(|e| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the patch: {e}"),
        )
    })?);
    state.metrics.request(MUTATE_PODS, "injected");
    tracing::info!(%namespace, pod = %pod_name, by = ?wanted, injected = %injected.join(", "), "Injected");
    reply(response)
}

fn join(refusals: &[Refusal]) -> String {
    refusals
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// `pod` with `ops` applied (the mesh's patch, before the agent's is computed on it).
fn patched(pod: &Pod, ops: &[serde_json::Value]) -> Result<Pod, (StatusCode, String)> {
    let failed = |e: String| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("applying the mesh patch: {e}"),
        )
    };
    let patch: json_patch::Patch =
        serde_json::from_value(serde_json::Value::Array(ops.to_vec())).map_err(|e| failed(e.to_string()))?;
    let mut doc = serde_json::to_value(pod).map_err(|e| failed(e.to_string()))?;
    json_patch::patch(&mut doc, &patch).map_err(|e| failed(e.to_string()))?;
    serde_json::from_value(doc).map_err(|e| failed(e.to_string()))
}

async fn validate_intentions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let request = match parse::<ServiceIntentions>(&body) {
        Ok(request) => request,
        Err(invalid) => {
            state.metrics.request(VALIDATE_INTENTIONS, "invalid");
            return Json(invalid.into_review()).into_response();
        }
    };
    let response = AdmissionResponse::from(&request);
    let Some(obj) = &request.object else {
        state.metrics.request(VALIDATE_INTENTIONS, "allowed");
        return Json(response.into_review()).into_response();
    };
    let own_namespace = request.namespace.clone().unwrap_or_default();
    let destination_namespace = obj
        .spec
        .destination
        .namespace
        .clone()
        .unwrap_or_else(|| own_namespace.clone());
    let mut problems = validate::validate(&obj.spec, &destination_namespace);
    // Tenancy: an object governs its own namespace only (Capstan's namespace excepted).
    // The chart's ValidatingAdmissionPolicy refuses the same without this webhook.
    let mut governed = obj.clone();
    governed
        .metadata
        .namespace
        .get_or_insert_with(|| own_namespace.clone());
    let foreign = in_force::out_of_bounds(&governed, &state.config.control_namespace);
    let mut warnings = Vec::new();
    if obj.spec.destination.name != "*" && destination_namespace != "*" && foreign.is_none() {
        let services = Api::<Service>::namespaced(state.client.clone(), &destination_namespace);
        match services.get_opt(&obj.spec.destination.name).await {
            Ok(service) => problems.extend(validate::l7_on_tcp(&obj.spec, service.as_ref())),
            // Not a reason to refuse: the reconciler checks again and reports in status.
            Err(error) => warnings.push(format!(
                "capstan-webhook could not read Service {destination_namespace}/{}: {error}; \
                 its protocol will be checked by the controller",
                obj.spec.destination.name
            )),
        }
    }
    problems.extend(foreign);
    let name = obj.name_any();
    let mut response = if problems.is_empty() {
        state.metrics.request(VALIDATE_INTENTIONS, "allowed");
        response
    } else {
        state.metrics.request(VALIDATE_INTENTIONS, "denied");
        tracing::info!(namespace = %own_namespace, %name, problems = %problems.join("; "), "Refused a ServiceIntentions");
        let mut denied = deny(
            response,
            format!(
                "ServiceIntentions {own_namespace}/{name} is invalid: {}",
                problems.join("; ")
            ),
        );
        denied.result.reason = "Invalid".into();
        denied.result.code = 422;
        denied
    };
    if !warnings.is_empty() {
        response.warnings = Some(warnings);
    }
    Json(response.into_review()).into_response()
}

/// An ephemeral container added to a meshed pod (`kubectl debug`, through the
/// pods/ephemeralcontainers subresource, which pod creation's injection never sees) is
/// refused when it could undo the pod's redirect: the same per-container checks as at
/// injection (M16), each naming its `spec.ephemeralContainers[i]` field. Ephemeral
/// containers can be neither changed nor removed, so the pod's whole list is judged.
/// A pod without the proxy has no redirect to defend and is allowed.
async fn validate_ephemeral(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let request = match parse::<Pod>(&body) {
        Ok(request) => request,
        Err(invalid) => {
            state.metrics.request(VALIDATE_EPHEMERAL, "invalid");
            return Json(invalid.into_review()).into_response();
        }
    };
    let response = AdmissionResponse::from(&request);
    let Some(pod) = request.object.as_ref().filter(|pod| selection::is_injected(pod)) else {
        state.metrics.request(VALIDATE_EPHEMERAL, "skipped");
        return Json(response.into_review()).into_response();
    };
    let refusals = mesh::ephemeral_refusals(pod);
    if refusals.is_empty() {
        state.metrics.request(VALIDATE_EPHEMERAL, "allowed");
        return Json(response.into_review()).into_response();
    }
    state.metrics.request(VALIDATE_EPHEMERAL, "denied");
    let namespace = request.namespace.clone().unwrap_or_default();
    let name = pod.name_any();
    let reasons = join(&refusals);
    tracing::info!(%namespace, pod = %name, user = %request.user_info.username.as_deref().unwrap_or_default(), %reasons, "Refused an ephemeral container in a meshed pod");
    Json(
        deny(
            response,
            format!("capstan-webhook: pod {namespace}/{name} is meshed, and its ephemeral containers cannot be added: {reasons}"),
        )
        .into_review(),
    )
    .into_response()
}

impl AppState {
    /// The namespace's labels: from the watch cache, or read when the cache does not
    /// have it yet (a namespace created a moment ago, or the cache still syncing).
    async fn namespace_labels(
        &self,
        namespace: &str,
    ) -> Result<BTreeMap<String, String>, (StatusCode, String)> {
        if let Some(cached) = self.namespaces.get(&ObjectRef::new(namespace)) {
            return Ok(cached.metadata.labels.clone().unwrap_or_default());
        }
        let live = Api::<Namespace>::all(self.client.clone())
            .get_metadata(namespace)
            .await
            .map_err(|e| {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("reading namespace {namespace}: {e}"),
                )
            })?;
        Ok(live.labels().clone())
    }

    /// The mesh roots PEM, or None when the engine has not published any.
    ///
    /// Roots older than ROOTS_TTL are still answered, and re-read in the background: a
    /// read of the ConfigMap inside an admission call is a round trip to the API server
    /// nested in one of its own calls (milliseconds on a busy node), which would fall on
    /// one call every ROOTS_TTL. Only the first read, or one after the roots were found
    /// gone, is made in the call.
    async fn roots(self: &Arc<Self>) -> Option<String> {
        let cached = self.roots.lock().clone();
        if let Some((read, roots)) = cached {
            if read.elapsed() >= ROOTS_TTL && !self.refreshing_roots.swap(true, Ordering::AcqRel) {
                let state = self.clone();
                tokio::spawn(async move {
                    state.read_roots().await;
                    state.refreshing_roots.store(false, Ordering::Release);
                });
            }
            return Some(roots);
        }
        self.read_roots().await
    }

    async fn read_roots(&self) -> Option<String> {
        let api = Api::<ConfigMap>::namespaced(self.client.clone(), &self.roots_namespace);
        let roots = match api.get_opt(&self.roots_configmap).await {
            Ok(configmap) => configmap
                .and_then(|c| c.data)
                .and_then(|mut d| d.remove(ROOTS_KEY))
                .filter(|pem| pem.contains("-----BEGIN CERTIFICATE-----")),
            Err(error) => {
                tracing::warn!(%error, "Reading the mesh roots");
                // Keep serving the last roots read rather than refusing pods.
                return self.roots.lock().as_ref().map(|(_, last)| last.clone());
            }
        };
        // Only roots are cached: a pod refused for want of roots is retried (by its
        // ReplicaSet) and must succeed as soon as the engine publishes them; roots found
        // gone are forgotten, so the next pod reads again.
        *self.roots.lock() = roots.clone().map(|roots| (Instant::now(), roots));
        roots
    }
}

#[cfg(test)]
mod golden;

#[cfg(test)]
mod tests {
    use capstan_contract::annotations::NAMESPACE_NAME_LABEL;
    use capstan_mesh::selection::PROXY_CONTAINER;
    use capstan_webhook::inject;

    /// The webhook as main builds it with `config`, a watch cache of namespaces holding
    /// `namespaces` (name, extra labels), the roots `PEM` already read, and no API server
    /// behind its client: nothing may be read live.
    pub(super) fn offline_state(
        config: inject::Config,
        namespaces: &[(&str, &[(&str, &str)])],
    ) -> std::sync::Arc<super::AppState> {
        use k8s_openapi::{api::core::v1::Namespace, apimachinery::pkg::apis::meta::v1::ObjectMeta};
        use kube::{core::PartialObjectMeta, runtime::watcher};
        let (store, mut writer) = kube::runtime::reflector::store::<PartialObjectMeta<Namespace>>();
        for (name, labels) in namespaces {
            let name_label = [(NAMESPACE_NAME_LABEL, *name)];
            let labels = name_label.iter().chain(labels.iter());
            writer.apply_watcher_event(&watcher::Event::Apply(PartialObjectMeta::<Namespace> {
                metadata: ObjectMeta {
                    name: Some((*name).into()),
                    labels: Some(labels.map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
                    ..Default::default()
                },
                ..Default::default()
            }));
        }
        let offline = tower::service_fn(|_: http::Request<kube::client::Body>| async {
            Err::<http::Response<kube::client::Body>, _>(std::io::Error::other("no API server in this test"))
        });
        let mut registry = prometheus_client::registry::Registry::default();
        std::sync::Arc::new(super::AppState {
            client: kube::Client::new(offline, "default"),
            engine: crate::engine_address::EngineAddress::new(&config.ca_url),
            config,
            namespaces: store,
            roots_namespace: "capstan-system".into(),
            roots_configmap: capstan_contract::ROOTS_CONFIGMAP.into(),
            roots: parking_lot::Mutex::new(Some((std::time::Instant::now(), "PEM".into()))),
            refreshing_roots: Default::default(),
            metrics: crate::metrics::Metrics::register(&mut registry),
        })
    }

    /// A webhook whose watch cache holds `shop` without its mesh label (a label added a
    /// moment ago, not seen yet).
    fn state_with_a_lagging_cache() -> std::sync::Arc<super::AppState> {
        offline_state(inject::Config::default(), &[("shop", &[])])
    }

    async fn admit(state: std::sync::Arc<super::AppState>, path: &str) -> serde_json::Value {
        use tower::ServiceExt as _;
        let review = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u1", "operation": "CREATE", "namespace": "shop",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "userInfo": {"username": "alice"},
                "object": {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "web-1", "namespace": "shop"},
                    "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "app:1"}]},
                },
            },
        });
        let request = http::Request::post(path)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(review.to_string()))
            .unwrap();
        let response = super::router(state).oneshot(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    /// Issue 15.8: a call through the webhook whose namespaceSelector matched (the API
    /// server saw the label) meshes the pod even though the webhook's own watch of
    /// namespaces has not seen the label yet; without that, the pod of an enforced
    /// namespace would start unmeshed. The opt-in webhook's path still reads the cache.
    #[tokio::test]
    async fn the_api_servers_namespace_selector_is_trusted_over_a_lagging_cache() {
        let enforced = admit(
            state_with_a_lagging_cache(),
            &format!("/{}", super::MUTATE_PODS_ENFORCED),
        )
        .await;
        assert_eq!(enforced["response"]["allowed"], true, "{enforced}");
        assert!(
            !enforced["response"]["patch"].is_null(),
            "not injected: {enforced}"
        );
        let opt_in = admit(state_with_a_lagging_cache(), &format!("/{}", super::MUTATE_PODS)).await;
        assert_eq!(opt_in["response"]["allowed"], true, "{opt_in}");
        assert!(opt_in["response"].get("patch").is_none(), "{opt_in}");
    }

    /// `kubectl debug` of a meshed pod: an ephemeral container with NET_ADMIN is refused
    /// naming its field; a plain one, or any in a pod without the proxy, is allowed.
    #[tokio::test]
    async fn ephemeral_containers_that_could_undo_the_redirect_are_refused_in_meshed_pods() {
        use tower::ServiceExt as _;
        let admit = |pod: serde_json::Value| async move {
            let review = serde_json::json!({
                "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "request": {
                    "uid": "u2", "operation": "UPDATE", "namespace": "shop",
                    "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"},
                    "subResource": "ephemeralcontainers",
                    "userInfo": {"username": "alice"},
                    "object": pod.clone(), "oldObject": pod,
                },
            });
            let request = http::Request::post(format!("/{}", super::VALIDATE_EPHEMERAL))
                .header("content-type", "application/json")
                .body(axum::body::Body::from(review.to_string()))
                .unwrap();
            let response = super::router(state_with_a_lagging_cache())
                .oneshot(request)
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()["response"].clone()
        };
        let pod = |init: serde_json::Value, ephemeral: serde_json::Value| {
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web-1", "namespace": "shop"},
                "spec": {
                    "initContainers": init,
                    "containers": [{"name": "app", "image": "app:1"}],
                    "ephemeralContainers": ephemeral,
                },
            })
        };
        let proxy =
            serde_json::json!([{"name": PROXY_CONTAINER, "image": "capstan:1", "restartPolicy": "Always"}]);
        let net_admin = serde_json::json!([
            {"name": "plain", "image": "busybox"},
            {"name": "sniff", "image": "busybox", "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}},
        ]);
        let refused = admit(pod(proxy.clone(), net_admin.clone())).await;
        assert_eq!(refused["allowed"], false, "{refused}");
        let message = refused["status"]["message"].as_str().unwrap();
        assert!(
            message.contains("spec.ephemeralContainers[1].securityContext.capabilities.add"),
            "{message}"
        );
        let plain = serde_json::json!([{"name": "plain", "image": "busybox"}]);
        assert_eq!(admit(pod(proxy, plain)).await["allowed"], true);
        assert_eq!(
            admit(pod(serde_json::json!([]), net_admin)).await["allowed"],
            true
        );
    }
}
