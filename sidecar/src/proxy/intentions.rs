//! The intentions in force, learned by watching the API. A change is compiled and
//! published at once (the data path reads the newest policy for every new connection and
//! request). When the API server is unreachable the watcher retries with backoff and
//! the last compiled policy stays in force: the data path never falls back to "allow".

use super::metrics::Metrics;
use capstan_crds::ServiceIntentions;
use capstan_mesh::Policy;
use futures::StreamExt as _;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use std::sync::Arc;
use tokio::sync::watch;

/// Runs until the process ends. `synced` turns true after the first complete list.
pub async fn watch(
    client: Client,
    default_allow: bool,
    policy: watch::Sender<Arc<Policy>>,
    synced: watch::Sender<bool>,
    metrics: Metrics,
) {
    let api: Api<ServiceIntentions> = Api::all(client);
    let (reader, writer) = reflector::store();
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
        let objects: Vec<ServiceIntentions> = reader.state().iter().map(|o| (**o).clone()).collect();
        let compiled = Policy::compile(&objects, default_allow);
        metrics.intentions_updates.inc();
        tracing::debug!(objects = objects.len(), "Intentions recompiled");
        policy.send_replace(Arc::new(compiled));
    }
}
