//! The intentions in force, learned by watching the API. A change is compiled and
//! published at once (the data path reads the newest policy for every new connection and
//! request). When the API server is unreachable the watcher retries with backoff and
//! the last compiled policy stays in force: the data path never falls back to "allow".

use super::metrics::Metrics;
use capstan_crds::ServiceIntentions;
use capstan_mesh::{Policy, understood};
use futures::StreamExt as _;
use kube::{
    Api, Client, ResourceExt as _,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use std::sync::Arc;
use tokio::sync::watch;

/// Runs until the process ends. `synced` turns true after the first complete list.
pub async fn watch(
    client: Client,
    default_allow: bool,
    control_namespace: String,
    policy: watch::Sender<Arc<Policy>>,
    synced: watch::Sender<bool>,
    metrics: Metrics,
) {
    // Raw objects: a field a newer Capstan added must make its rule deny, not vanish in
    // decoding (M14), so decoding happens here, through `understood`.
    let resource = ApiResource::erase::<ServiceIntentions>(&());
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let writer = reflector::store::Writer::new(resource.clone());
    let reader = writer.as_reader();
    let events = watcher(api, watcher::Config::default())
        .backoff(super::directory::WatchBackoff::default())
        .reflect(writer);
    futures::pin_mut!(events);
    while let Some(event) = events.next().await {
        match event {
            // Mid-relist events leave the store as it was; compile when it changes.
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
            Ok(watcher::Event::InitDone) => {
                synced.send_replace(true);
            }
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {}
            Err(error) => {
                tracing::warn!(%error, "Watching ServiceIntentions failed; keeping the last known intentions");
                continue;
            }
        }
        let objects: Vec<ServiceIntentions> = reader.state().iter().filter_map(|o| decode(o)).collect();
        let compiled = Policy::compile(&objects, default_allow, &control_namespace);
        metrics.intentions_updates.inc();
        tracing::debug!(objects = objects.len(), "Intentions recompiled");
        policy.send_replace(Arc::new(compiled));
    }
}

fn decode(object: &DynamicObject) -> Option<ServiceIntentions> {
    let key = format!("{}/{}", object.namespace().unwrap_or_default(), object.name_any());
    let raw = match serde_json::to_value(object) {
        Ok(raw) => raw,
        Err(error) => {
            tracing::warn!(intention = %key, %error, "Ignoring an unreadable ServiceIntentions");
            return None;
        }
    };
    match understood::decode(raw) {
        Ok((decoded, notes)) => {
            for note in &notes.0 {
                tracing::warn!(intention = %key, "{note} (written by a newer Capstan?)");
            }
            Some(decoded)
        }
        // Its destination cannot even be read: it names no one, so it allows no one.
        Err(error) => {
            tracing::warn!(intention = %key, %error, "Ignoring an unreadable ServiceIntentions");
            None
        }
    }
}
