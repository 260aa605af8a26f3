//! The target Secret: what this SecretSync wants it to hold (pure), whether an existing
//! Secret is its own, and the write (create, replace, or delete and create to change
//! its type).

use super::{LABEL, outcome::Failure, reasons, template::Data};
use capstan_crds::SecretSync;
use k8s_openapi::{ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::OwnerReference};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ObjectMeta, PostParams, Preconditions},
};
use std::collections::BTreeMap;

const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "capstan-controller");

/// The target Secret as this SecretSync wants it (pure).
pub fn desired_target(obj: &SecretSync, data: &Data) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(obj.spec.target.name.clone()),
            namespace: obj.namespace(),
            labels: Some(owned_labels(obj)),
            owner_references: Some(vec![owner_ref(obj)]),
            ..Default::default()
        },
        type_: Some(obj.spec.target.type_.as_str().to_owned()),
        data: Some(
            data.iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone())))
                .collect(),
        ),
        ..Default::default()
    }
}

pub fn owned_labels(obj: &SecretSync) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL.to_owned(), obj.uid().unwrap_or_default()),
        (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
    ])
}

pub fn owner_ref(obj: &SecretSync) -> OwnerReference {
    obj.controller_owner_ref(&())
        .expect("a stored SecretSync has a name and UID")
}

/// Whether `secret` is this SecretSync's (its controller owner reference is).
pub fn owned_by(secret: &Secret, obj: &SecretSync) -> bool {
    let uid = obj.uid();
    secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|r| r.controller == Some(true) && Some(&r.uid) == uid.as_ref())
}

/// Makes the target hold `data`.
pub async fn write(
    secrets: &Api<Secret>,
    obj: &SecretSync,
    existing: Option<&Secret>,
    data: &Data,
) -> Result<(), Failure> {
    let desired = desired_target(obj, data);
    let name = obj.spec.target.name.as_str();
    let failed = |what: &str, e: kube::Error| {
        Failure::transient(reasons::TARGET_WRITE_FAILED, format!("{what} Secret {name}: {e}"))
    };
    let existing = match existing {
        // The type of a Secret cannot change: replace the Secret.
        Some(e) if e.type_ != desired.type_ => {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: e.uid(),
                    resource_version: e.resource_version(),
                }),
                ..Default::default()
            };
            secrets
                .delete(name, &params)
                .await
                .map_err(|e| failed("deleting (to change its type)", e))?;
            None
        }
        other => other,
    };
    match existing {
        None => secrets
            .create(&PostParams::default(), &desired)
            .await
            .map(drop)
            .map_err(|e| failed("creating", e)),
        Some(existing) => {
            // A full replace, conditional on the version read: the data becomes exactly
            // what the source says (keys added by hand are removed too); labels and
            // annotations others set are kept.
            let mut next = existing.clone();
            next.data = desired.data;
            next.string_data = None;
            next.metadata
                .labels
                .get_or_insert_with(Default::default)
                .extend(owned_labels(obj));
            secrets
                .replace(name, &PostParams::default(), &next)
                .await
                .map(drop)
                .map_err(|e| failed("updating", e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secretsync::tests::database_sync as obj;

    #[test]
    fn the_target_is_owned_labelled_and_typed() {
        let obj = obj();
        let data = Data::from([("username".to_owned(), b"u".to_vec())]);
        let secret = desired_target(&obj, &data);
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/basic-auth"));
        assert_eq!(secret.metadata.namespace.as_deref(), Some("team"));
        assert_eq!(secret.metadata.labels.as_ref().unwrap()[LABEL], "uid-1");
        assert!(owned_by(&secret, &obj));
        let mut stranger = secret.clone();
        stranger.metadata.owner_references = None;
        assert!(!owned_by(&stranger, &obj));
    }
}
