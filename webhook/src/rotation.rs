//! Keeps the serving certificate current: reads the shared Secret, writes what `plan`
//! says (resourceVersion-guarded, so concurrent replicas never clobber each other: the
//! loser of a race re-reads and adopts the winner's certificates), loads the leaf into
//! the TLS resolver, and writes the bundle into the webhook configurations.

use crate::{
    certs::{self, Lifetimes, Resolver, Stored},
    metrics::Metrics,
};
use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::{
            MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
        },
        core::v1::Secret,
    },
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use std::{sync::Arc, time::Duration};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading Secret {0}")]
    Read(String, #[source] kube::Error),
    #[error("writing Secret {0}")]
    Write(String, #[source] kube::Error),
    #[error("the Secret {0} kept changing under us")]
    Contended(String),
    #[error(transparent)]
    Certs(#[from] certs::Error),
    #[error("reading webhook configuration {0}")]
    ReadConfig(String, #[source] kube::Error),
    #[error("patching webhook configuration {0}")]
    PatchConfig(String, #[source] kube::Error),
}

pub struct Rotator {
    pub client: Client,
    pub namespace: String,
    pub secret: String,
    pub sans: Vec<String>,
    pub lifetimes: Lifetimes,
    pub resolver: Arc<Resolver>,
    pub metrics: Metrics,
    pub mutating: Option<String>,
    pub validating: Option<String>,
    /// Out of the cluster: the base URL the API server reaches this process at.
    pub external_url: Option<String>,
}

impl Rotator {
    /// One pass: the Secret converged, the leaf loaded, the configurations current.
    pub async fn run_once(&self) -> Result<(), Error> {
        let stored = self.converge_secret().await?;
        self.resolver.load(&stored)?;
        if let Some(expiry) = certs::leaf_not_after(&stored) {
            self.metrics.serving_cert_expiry.set(expiry);
        }
        if let Some(name) = &self.mutating {
            self.sync_config::<MutatingWebhookConfiguration>(name, &stored.bundle, |c| {
                c.webhooks
                    .iter()
                    .flatten()
                    .map(|w| (w.name.clone(), w.client_config.clone()))
                    .collect()
            })
            .await?;
        }
        if let Some(name) = &self.validating {
            self.sync_config::<ValidatingWebhookConfiguration>(name, &stored.bundle, |c| {
                c.webhooks
                    .iter()
                    .flatten()
                    .map(|w| (w.name.clone(), w.client_config.clone()))
                    .collect()
            })
            .await?;
        }
        Ok(())
    }

    /// Runs `run_once` every `interval` until the task is dropped, logging failures
    /// (the current certificate keeps being served meanwhile).
    pub async fn run(self, interval: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            if let Err(error) = self.run_once().await {
                tracing::warn!(error = %error, source = ?std::error::Error::source(&error), "Serving certificate upkeep failed");
            }
        }
    }

    async fn converge_secret(&self) -> Result<Stored, Error> {
        let api = Api::<Secret>::namespaced(self.client.clone(), &self.namespace);
        let name = &self.secret;
        for _ in 0..5 {
            let live = api
                .get_opt(name)
                .await
                .map_err(|e| Error::Read(name.clone(), e))?;
            let stored = live
                .as_ref()
                .and_then(|s| s.data.as_ref())
                .map(|data| Stored::from_data(&data.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect()))
                .unwrap_or_default();
            let now = time::OffsetDateTime::now_utc();
            let Some(planned) = certs::plan(&stored, &self.sans, now, &self.lifetimes)? else {
                return Ok(stored);
            };
            if planned.ca_cert != stored.ca_cert && !stored.ca_cert.is_empty() {
                self.metrics.ca_rotations.inc();
                tracing::info!(secret = %name, "Promoted the next webhook CA");
            } else if planned.next.is_some() && stored.next.is_none() && !stored.ca_cert.is_empty() {
                tracing::info!(secret = %name, "Started a webhook CA rotation: the next CA is trusted first");
            }
            let data = planned
                .to_data()
                .into_iter()
                .map(|(k, v)| (k, ByteString(v)))
                .collect();
            let result = match live {
                Some(mut secret) => {
                    // Replace, with the read's resourceVersion as a precondition.
                    secret.data = Some(data);
                    secret.string_data = None;
                    api.replace(name, &PostParams::default(), &secret).await
                }
                None => {
                    // The chart creates the Secret (so the webhook needs no create
                    // permission); without the chart (hack/run.sh) create it here.
                    let secret = Secret {
                        metadata: ObjectMeta {
                            name: Some(name.clone()),
                            labels: Some(
                                [("app.kubernetes.io/component".to_owned(), "webhook".to_owned())].into(),
                            ),
                            ..Default::default()
                        },
                        data: Some(data),
                        type_: Some("Opaque".into()),
                        ..Default::default()
                    };
                    api.create(&PostParams::default(), &secret).await
                }
            };
            match result {
                Ok(_) => {
                    tracing::info!(secret = %name, "Wrote the webhook serving certificate");
                    return Ok(planned);
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    tracing::debug!(secret = %name, "Another replica wrote the Secret first; re-reading");
                }
                Err(e) => return Err(Error::Write(name.clone(), e)),
            }
        }
        Err(Error::Contended(self.secret.clone()))
    }

    /// Writes the bundle (and, out of the cluster, the URL) into every webhook of one
    /// configuration, by a strategic merge patch keyed by webhook name: nothing else in
    /// the object (owned by Helm) is touched.
    async fn sync_config<K>(
        &self,
        name: &str,
        bundle: &str,
        webhooks: impl Fn(&K) -> Vec<(String, WebhookClientConfig)>,
    ) -> Result<(), Error>
    where
        K: kube::Resource<Scope = kube::core::ClusterResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let api = Api::<K>::all(self.client.clone());
        let Some(config) = api
            .get_opt(name)
            .await
            .map_err(|e| Error::ReadConfig(name.to_owned(), e))?
        else {
            tracing::warn!(
                configuration = name,
                "Webhook configuration not found; will retry"
            );
            return Ok(());
        };
        let mut changes = Vec::new();
        for (webhook, client_config) in webhooks(&config) {
            if let Some(change) = desired(&client_config, bundle, self.external_url.as_deref()) {
                changes.push(json!({"name": webhook, "clientConfig": change}));
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Strategic(json!({"webhooks": changes})),
        )
        .await
        .map_err(|e| Error::PatchConfig(name.to_owned(), e))?;
        self.metrics.bundle_updates.inc();
        tracing::info!(
            configuration = name,
            "Updated the webhook configuration's caBundle"
        );
        Ok(())
    }
}

/// The clientConfig change one webhook needs, if any.
fn desired(current: &WebhookClientConfig, bundle: &str, external_url: Option<&str>) -> Option<Value> {
    let mut change = serde_json::Map::new();
    if current.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(bundle.as_bytes()) {
        change.insert(
            "caBundle".into(),
            serde_json::to_value(ByteString(bundle.as_bytes().to_vec())).expect("bytes serialize"),
        );
    }
    if let Some(base) = external_url {
        let path = current
            .service
            .as_ref()
            .and_then(|s| s.path.clone())
            .or_else(|| current.url.as_deref().and_then(url_path))
            .unwrap_or_default();
        let url = format!("{}{path}", base.trim_end_matches('/'));
        if current.url.as_deref() != Some(url.as_str()) || current.service.is_some() {
            change.insert("url".into(), Value::String(url));
            // A strategic merge patch null removes the field: url and service exclude each other.
            change.insert("service".into(), Value::Null);
        }
    }
    (!change.is_empty()).then_some(Value::Object(change))
}

/// The path of an https URL (`https://host:port/path` → `/path`).
fn url_path(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    rest.find('/').map(|i| rest[i..].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::admissionregistration::v1::ServiceReference;

    fn service_config(bundle: Option<&str>) -> WebhookClientConfig {
        WebhookClientConfig {
            ca_bundle: bundle.map(|b| ByteString(b.as_bytes().to_vec())),
            service: Some(ServiceReference {
                name: "capstan-webhook".into(),
                namespace: "capstan-system".into(),
                path: Some("/mutate-pods".into()),
                port: Some(443),
            }),
            url: None,
        }
    }

    #[test]
    fn an_up_to_date_service_reference_needs_nothing() {
        assert_eq!(desired(&service_config(Some("PEM")), "PEM", None), None);
    }

    #[test]
    fn a_stale_bundle_is_replaced() {
        let change = desired(&service_config(Some("OLD")), "PEM", None).unwrap();
        assert_eq!(change, json!({"caBundle": "UEVN"}));
    }

    #[test]
    fn out_of_cluster_the_url_replaces_the_service_keeping_the_path() {
        let change = desired(
            &service_config(Some("PEM")),
            "PEM",
            Some("https://127.0.0.1:9443"),
        )
        .unwrap();
        assert_eq!(
            change,
            json!({"url": "https://127.0.0.1:9443/mutate-pods", "service": null})
        );
        let converted = WebhookClientConfig {
            url: Some("https://127.0.0.1:9443/mutate-pods".into()),
            service: None,
            ca_bundle: Some(ByteString(b"PEM".to_vec())),
        };
        assert_eq!(desired(&converted, "PEM", Some("https://127.0.0.1:9443")), None);
        // A new port keeps the path taken from the old URL.
        assert_eq!(
            desired(&converted, "PEM", Some("https://127.0.0.1:9555")).unwrap()["url"],
            "https://127.0.0.1:9555/mutate-pods"
        );
    }
}
