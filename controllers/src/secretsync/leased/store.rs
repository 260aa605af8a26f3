//! The lease record: a Secret beside the target (`leases::secret_name`) holding the
//! current lease, the ones retiring and an issue's intent, written conditionally on the
//! version read, so two writers never both land.

use super::super::{
    leases::{self, Record},
    outcome::Failure,
    reasons, target,
};
use capstan_crds::SecretSync;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, ResourceExt,
    api::{ObjectMeta, PostParams},
};

/// The record, and its Secret as read (for the next conditional write).
pub async fn read(secrets: &Api<Secret>, obj: &SecretSync) -> Result<(Record, Option<Secret>), Failure> {
    let name = leases::secret_name(&obj.name_any());
    match secrets.get_opt(&name).await {
        Ok(Some(secret)) => {
            let record = Record::from_secret(&secret).map_err(|e| {
                Failure::permanent(
                    reasons::KUBERNETES_ERROR,
                    format!("lease record Secret {name} is unreadable: {e}"),
                )
            })?;
            Ok((record, Some(secret)))
        }
        Ok(None) => Ok((Record::default(), None)),
        Err(e) => Err(Failure::kube("reading the lease record", e)),
    }
}

/// Writes the record; returns the Secret as stored (for the next conditional write).
pub async fn save(
    secrets: &Api<Secret>,
    obj: &SecretSync,
    record: &Record,
    stored: Option<Secret>,
) -> Result<Secret, Failure> {
    let name = leases::secret_name(&obj.name_any());
    let result = match stored {
        Some(mut secret) => {
            secret.data = Some(record.data());
            secrets.replace(&name, &PostParams::default(), &secret).await
        }
        None => {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some(target::owned_labels(obj)),
                    owner_references: Some(vec![target::owner_ref(obj)]),
                    ..Default::default()
                },
                type_: Some(leases::SECRET_TYPE.to_owned()),
                data: Some(record.data()),
                ..Default::default()
            };
            secrets.create(&PostParams::default(), &secret).await
        }
    };
    result.map_err(|e| Failure::kube("writing the lease record", e))
}
