//! The mesh CA mount: `POST /v1/mesh/sign` and `GET /v1/mesh/roots` (see `server`), its
//! signing core (`signing`), the CA kept in a Secret (`store`, `secret`), followed by
//! every replica through a watch, and rotated in phases (`rotation`). Callers are
//! authenticated by the Kubernetes auth method's TokenReview
//! (`crate::auth::kubernetes::tokenreview`).

pub mod metrics;
pub mod rotation;
pub mod secret;
pub mod server;
pub mod signing;
pub mod store;

use crate::auth::kubernetes::tokenreview::TokenReviewer;
use crate::mesh_ca::signing::MeshCa;
use futures::StreamExt;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Client,
    runtime::{WatchStreamExt, watcher},
};
use metrics::Metrics;
use rotation::Timings;
use secret::Material;
use std::{sync::Arc, time::Duration};
use store::Store;
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct Config {
    pub namespace: String,
    pub secret_name: String,
    pub roots_configmap: String,
    pub trust_domain: String,
    pub token_audience: String,
    pub leaf_ttl: Duration,
    pub root_ttl: Duration,
    pub propagation: Duration,
}

/// One version of the CA Secret and what was parsed from it.
pub struct Current {
    pub secret: Secret,
    pub material: Material,
}

/// The mesh CA shared by the HTTP handlers and the background tasks.
#[derive(Clone)]
pub struct MeshCaService {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    current: watch::Sender<Option<Arc<Current>>>,
    reviewer: TokenReviewer,
    store: Store,
    metrics: Metrics,
}

impl MeshCaService {
    pub fn new(client: Client, config: Config, metrics: Metrics) -> Self {
        let store = Store::new(
            client.clone(),
            &config.namespace,
            &config.secret_name,
            &config.roots_configmap,
        );
        let reviewer = TokenReviewer::new(client, config.token_audience.clone());
        Self {
            inner: Arc::new(Inner {
                config,
                current: watch::Sender::new(None),
                reviewer,
                store,
                metrics,
            }),
        }
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn reviewer(&self) -> &TokenReviewer {
        &self.inner.reviewer
    }

    /// The CA in force, once loaded.
    pub fn current(&self) -> Option<Arc<Current>> {
        self.inner.current.borrow().clone()
    }

    /// Notified whenever the CA in force changes.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Current>>> {
        self.inner.current.subscribe()
    }

    fn timings(&self) -> Timings {
        let c = &self.inner.config;
        Timings {
            propagation: SignedDuration::try_from(c.propagation).unwrap_or(SignedDuration::MAX),
            leaf_ttl: SignedDuration::try_from(c.leaf_ttl).unwrap_or(SignedDuration::MAX),
        }
    }

    /// Loads (or creates) the CA, then follows its Secret and drives rotations until
    /// `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::select! {
            () = self.clone().run_forever() => {}
            () = shutdown => {}
        }
    }

    async fn run_forever(self) {
        let c = &self.inner.config;
        let mut delay = Duration::from_millis(500);
        let secret = loop {
            match self.inner.store.load_or_create(&c.trust_domain, c.root_ttl).await {
                Ok(secret) => break secret,
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "Loading the mesh CA; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        };
        self.adopt(secret).await;
        tokio::join!(self.clone().follow_secret(), self.clone().drive_rotation());
    }

    /// Makes a version of the Secret the CA in force, if it parses; a version that does
    /// not keeps the last good one in force.
    async fn adopt(&self, secret: Secret) {
        let metrics = &self.inner.metrics;
        let version = secret.metadata.resource_version.clone().unwrap_or_default();
        if let Some(current) = self.current()
            && current.secret.metadata.resource_version.as_deref() == Some(version.as_str())
        {
            return;
        }
        let material = match secret::parse(&secret, &self.inner.config.trust_domain) {
            Ok(material) => material,
            Err(error) => {
                metrics.secret_errors.inc();
                tracing::error!(
                    secret = %self.inner.config.secret_name,
                    resource_version = %version,
                    error = %error_chain(&error),
                    "The CA Secret cannot be used; the last good CA stays in force"
                );
                return;
            }
        };
        for warning in &material.warnings {
            tracing::warn!(secret = %self.inner.config.secret_name, %warning, "Ignoring an invalid rotation request");
        }
        let roots_pem: String = material.roots.concat();
        metrics
            .signing_ca_expiry
            .set(material.ca.not_after().unix_timestamp());
        if let Some(expiry) = material.earliest_root_expiry {
            metrics.earliest_root_expiry.set(expiry.as_second());
        }
        metrics.roots.set(material.roots.len() as i64);
        metrics
            .rotation_phase
            .set(rotation::phase_number(&material.rotation));
        metrics.ready.set(1);
        tracing::info!(
            resource_version = %version,
            roots = material.roots.len(),
            managed = material.managed,
            intermediate = !material.chain.is_empty(),
            signing_ca_not_after = %material.ca.not_after(),
            "Mesh CA in force"
        );
        self.inner
            .current
            .send_replace(Some(Arc::new(Current { secret, material })));
        if let Err(error) = self.inner.store.publish_roots(&roots_pem).await {
            tracing::warn!(error = %error_chain(&error), "Publishing the trust bundle; will retry");
        }
    }

    /// Follows the CA Secret: every replica signs with what the Secret says now.
    async fn follow_secret(self) {
        let name = self.inner.config.secret_name.clone();
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut events = watcher(self.inner.store.secrets.clone(), config)
            .default_backoff()
            .boxed();
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Apply(secret) | watcher::Event::InitApply(secret)) => {
                    self.adopt(secret).await
                }
                Ok(watcher::Event::Delete(_)) => {
                    if let Some(current) = self.current()
                        && let Err(error) = self.inner.store.recreate(&current.secret).await
                    {
                        tracing::error!(error = %error_chain(&error), "Restoring the deleted CA Secret");
                    }
                }
                Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                Err(error) => tracing::warn!(%error, secret = %name, "Watching the CA Secret"),
            }
        }
    }

    /// Once a second: writes the rotation step that is due, if any, and keeps the roots
    /// ConfigMap in step with the bundle (a failed publish is retried here).
    async fn drive_rotation(self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned_unmanaged: Option<Timestamp> = None;
        let mut ticks: u64 = 0;
        loop {
            tick.tick().await;
            ticks += 1;
            let Some(current) = self.current() else { continue };
            if ticks.is_multiple_of(30)
                && let Err(error) = self
                    .inner
                    .store
                    .publish_roots(&current.material.roots.concat())
                    .await
            {
                tracing::warn!(error = %error_chain(&error), "Publishing the trust bundle; will retry");
            }
            let material = &current.material;
            if !material.managed {
                if material.requested.is_some() && warned_unmanaged != material.requested {
                    warned_unmanaged = material.requested;
                    tracing::warn!(
                        secret = %self.inner.config.secret_name,
                        "Rotation requested on a user-supplied CA; the engine only rotates roots it generated: \
                         add the new root to ca.crt, wait, then replace tls.crt/tls.key"
                    );
                }
                continue;
            }
            let Some(step) = rotation::next_step(
                &material.rotation,
                material.requested,
                Timestamp::now(),
                self.timings(),
            ) else {
                continue;
            };
            self.write_step(&current, step).await;
        }
    }

    async fn write_step(&self, current: &Current, step: rotation::Step) {
        let c = &self.inner.config;
        let new_root = match &step {
            rotation::Step::Begin { .. } => match MeshCa::generate(&c.trust_domain, c.root_ttl) {
                Ok(root) => Some(root),
                Err(error) => {
                    tracing::error!(%error, "Generating the next root");
                    return;
                }
            },
            _ => None,
        };
        let updated = match secret::apply_step(&current.secret, &step, new_root.as_ref()) {
            Ok(updated) => updated,
            Err(error) => {
                tracing::error!(error = %error_chain(&error), "Computing the rotation step");
                return;
            }
        };
        match self.inner.store.replace(&updated).await {
            Ok(written) => {
                self.inner
                    .metrics
                    .rotations
                    .get_or_create(&metrics::PhaseLabels { phase: step.phase() })
                    .inc();
                match &step {
                    rotation::Step::Begin { activates_at, .. } => tracing::info!(
                        phase = step.phase(),
                        %activates_at,
                        "Rotation started: a new root is in the trust bundle and signs from activates_at"
                    ),
                    rotation::Step::Activate { drop_old_at } => tracing::info!(
                        phase = step.phase(),
                        %drop_old_at,
                        "Rotation activated: the new root signs; the old one stays trusted until drop_old_at"
                    ),
                    rotation::Step::Drop { sha256 } => tracing::info!(
                        phase = step.phase(),
                        roots = ?sha256,
                        "Rotation finished: retired roots left the trust bundle"
                    ),
                }
                self.adopt(written).await;
            }
            // Another replica wrote this step (or something else) first: the watch
            // brings its version, and the step is recomputed from it.
            Err(error) if store::is_conflict(&error) => {
                tracing::debug!(
                    phase = step.phase(),
                    "Another replica updated the CA Secret first"
                );
            }
            Err(error) => {
                tracing::warn!(%error, phase = step.phase(), "Writing the rotation step; will retry")
            }
        }
    }
}

/// An error with its sources, one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
