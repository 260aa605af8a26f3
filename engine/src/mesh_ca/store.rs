//! Where the CA lives: its Secret (the key) and the public roots ConfigMap, both in the
//! engine's namespace. Every write is either a create (409 when another replica was
//! first) or an update preconditioned on the resourceVersion it was computed from, so
//! two replicas never both win.

use super::secret;
use crate::mesh_ca::signing::MeshCa;
use capstan_contract::ROOTS_KEY;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{verb} {kind} {namespace}/{name}")]
    Api {
        verb: &'static str,
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("generating a new root")]
    Generate(#[source] crate::mesh_ca::signing::CaError),
}

pub fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

#[derive(Clone)]
pub struct Store {
    pub secrets: Api<Secret>,
    configmaps: Api<ConfigMap>,
    namespace: String,
    pub secret_name: String,
    configmap_name: String,
}

impl Store {
    pub fn new(client: Client, namespace: &str, secret_name: &str, configmap_name: &str) -> Self {
        Self {
            secrets: Api::namespaced(client.clone(), namespace),
            configmaps: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            secret_name: secret_name.to_owned(),
            configmap_name: configmap_name.to_owned(),
        }
    }

    fn error(
        &self,
        verb: &'static str,
        kind: &'static str,
        name: &str,
    ) -> impl FnOnce(kube::Error) -> StoreError {
        let (namespace, name) = (self.namespace.clone(), name.to_owned());
        move |source| StoreError::Api {
            verb,
            kind,
            namespace,
            name,
            source,
        }
    }

    /// The CA Secret; when there is none, a new root is generated and stored. Two
    /// replicas starting together both try to create: one wins, the other reads the
    /// winner's, so there is one root.
    pub async fn load_or_create(&self, trust_domain: &str, root_ttl: Duration) -> Result<Secret, StoreError> {
        let name = &self.secret_name;
        if let Some(existing) = self
            .secrets
            .get_opt(name)
            .await
            .map_err(self.error("reading", "Secret", name))?
        {
            return Ok(existing);
        }
        let root = MeshCa::generate(trust_domain, root_ttl).map_err(StoreError::Generate)?;
        match self
            .secrets
            .create(&PostParams::default(), &secret::for_new_root(name, &root))
            .await
        {
            Ok(created) => {
                tracing::info!(secret = %name, namespace = %self.namespace, "Generated a new mesh root and stored it");
                Ok(created)
            }
            Err(error) if is_conflict(&error) => {
                tracing::info!(secret = %name, "Another replica stored the root first; using theirs");
                self.secrets
                    .get(name)
                    .await
                    .map_err(self.error("reading", "Secret", name))
            }
            Err(error) => Err(self.error("creating", "Secret", name)(error)),
        }
    }

    /// Writes `secret` only if it is still at the resourceVersion it carries.
    pub async fn replace(&self, secret: &Secret) -> Result<Secret, kube::Error> {
        self.secrets
            .replace(&self.secret_name, &PostParams::default(), secret)
            .await
    }

    /// Re-creates a deleted CA Secret from the last version this replica held: deleting
    /// it by mistake must not mint a new root that no sidecar trusts.
    pub async fn recreate(&self, last: &Secret) -> Result<(), StoreError> {
        let mut secret = last.clone();
        secret.metadata = ObjectMeta {
            name: last.metadata.name.clone(),
            labels: last.metadata.labels.clone(),
            annotations: last.metadata.annotations.clone(),
            ..Default::default()
        };
        match self.secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::warn!(secret = %self.secret_name, "The CA Secret was deleted; restored it from memory");
                Ok(())
            }
            Err(error) if is_conflict(&error) => Ok(()),
            Err(error) => Err(self.error("re-creating", "Secret", &self.secret_name)(error)),
        }
    }

    /// Publishes the trust bundle to the roots ConfigMap, writing only when it changed.
    pub async fn publish_roots(&self, roots_pem: &str) -> Result<(), StoreError> {
        let name = &self.configmap_name;
        let existing =
            self.configmaps
                .get_opt(name)
                .await
                .map_err(self.error("reading", "ConfigMap", name))?;
        let data = [(ROOTS_KEY.to_owned(), roots_pem.to_owned())].into();
        match existing {
            Some(cm)
                if cm
                    .data
                    .as_ref()
                    .and_then(|d| d.get(ROOTS_KEY))
                    .map(String::as_str)
                    == Some(roots_pem) =>
            {
                Ok(())
            }
            Some(mut cm) => {
                cm.data = Some(data);
                match self.configmaps.replace(name, &PostParams::default(), &cm).await {
                    // Another replica wrote at the same time; the next sync converges.
                    Err(error) if is_conflict(&error) => Ok(()),
                    Err(error) => Err(self.error("updating", "ConfigMap", name)(error)),
                    Ok(_) => {
                        tracing::info!(configmap = %name, "Published the mesh trust bundle");
                        Ok(())
                    }
                }
            }
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        labels: Some(
                            [("app.kubernetes.io/component".to_owned(), "engine".to_owned())].into(),
                        ),
                        ..Default::default()
                    },
                    data: Some(data),
                    ..Default::default()
                };
                match self.configmaps.create(&PostParams::default(), &cm).await {
                    Err(error) if is_conflict(&error) => Ok(()),
                    Err(error) => Err(self.error("creating", "ConfigMap", name)(error)),
                    Ok(_) => {
                        tracing::info!(configmap = %name, "Published the mesh trust bundle");
                        Ok(())
                    }
                }
            }
        }
    }
}
