//! DEVELOPMENT ONLY: auto-unseal from a Kubernetes Secret. The first replica initializes
//! the engine with one share and keeps it, with the root token, in the Secret; every
//! replica unseals from it at start. Whoever can read that Secret can decrypt everything
//! the engine stores: the engine says so in its log at every start.

use crate::{
    store::seal::{Seal, SealError},
    store::storage::Backend,
};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{Api, Client, api::PostParams};
use std::{collections::BTreeMap, sync::Arc, time::Duration};

const KEY: &str = "unseal-key";
const ROOT_TOKEN: &str = "root-token";

/// Unseals `seal` from the Secret `name` (initializing first if nobody has).
pub async fn auto_unseal(
    client: Client,
    namespace: &str,
    name: &str,
    seal: &Seal,
    backend: Arc<dyn Backend>,
) -> anyhow::Result<()> {
    tracing::warn!(
        secret = %name,
        "DEVELOPMENT AUTO-UNSEAL: the unseal key is kept in a Kubernetes Secret; anyone who can read it can decrypt all engine data. Never use this in production."
    );
    let api: Api<Secret> = Api::namespaced(client, namespace);
    loop {
        if let Some(secret) = api.get_opt(name).await? {
            let share = secret
                .data
                .as_ref()
                .and_then(|d| d.get(KEY))
                .map(|b| b.0.clone())
                .ok_or_else(|| anyhow::anyhow!("Secret {name} has no {KEY}"))?;
            return match seal.unseal(share).await {
                Ok(_) | Err(SealError::AlreadyUnsealed) => Ok(()),
                Err(e) => Err(e.into()),
            };
        }
        match seal.init(1, 1, true).await {
            Ok(initialized) => {
                let root = crate::api::vault::root_token(backend.clone(), initialized.keyring.clone())
                    .await
                    .map_err(|e| anyhow::anyhow!("writing the root token: {e:?}"))?;
                let secret = Secret {
                    metadata: kube::api::ObjectMeta {
                        name: Some(name.to_owned()),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([
                        (KEY.to_owned(), ByteString(initialized.shares[0].clone())),
                        (ROOT_TOKEN.to_owned(), ByteString(root.into_bytes())),
                    ])),
                    ..Default::default()
                };
                api.create(&PostParams::default(), &secret).await?;
                tracing::warn!(secret = %name, "Initialized for development: unseal key and root token stored in the Secret");
            }
            // Another replica initialized; its Secret appears shortly.
            Err(SealError::AlreadyInitialized) => tokio::time::sleep(Duration::from_millis(500)).await,
            Err(e) => return Err(e.into()),
        }
    }
}
