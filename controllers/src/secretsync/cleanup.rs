//! The finalizer's work, when a SecretSync is deleted (also while the controller was
//! down, K3): finish an interrupted issue, revoke every lease, then delete the target
//! (or, with deletionPolicy Retain, release it so garbage collection leaves it) and the
//! lease record.

use super::{
    Ctx, Error, LABEL,
    leased::{self, revoke, store},
    leases, reasons, target,
};
use capstan_crds::{DeletionPolicy, SecretSync};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, PostParams, Preconditions},
    runtime::events::EventType,
};

/// The finalizer's work: revoke every lease, then delete the target (or, with
/// deletionPolicy Retain, release it from the SecretSync so garbage collection leaves it).
pub async fn run(obj: &SecretSync, ctx: &Ctx) -> Result<(), Error> {
    let ns = obj.namespace().unwrap_or_default();
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &ns);
    let (mut record, mut stored) = store::read(&secrets, obj)
        .await
        .map_err(|f| Error::Cleanup(f.message))?;
    stored = leased::finish_orphan(&secrets, obj, ctx, &mut record, stored)
        .await
        .map_err(|f| Error::Cleanup(f.message))?;
    let ids = record.lease_ids();
    if !ids.is_empty() {
        match ctx.token(obj).await {
            Ok(_) => {
                let mut left = vec![];
                for id in &ids {
                    if !revoke::lease(obj, ctx, id).await {
                        left.push(id.clone());
                    }
                }
                if !left.is_empty() {
                    // Keep what is left on record and retry with backoff (decision 5:
                    // never drop a lease that could not be revoked).
                    record.current = record
                        .current
                        .filter(|c| c.id.as_ref().is_some_and(|id| left.contains(id)));
                    record.retiring.retain(|r| left.contains(&r.id));
                    // Best effort: if this fails, the record still lists every lease, and
                    // revoking one again is harmless (an unknown lease counts as gone).
                    let _ = store::save(&secrets, obj, &record, stored).await;
                    return Err(Error::Cleanup(format!(
                        "{} lease(s) could not be revoked yet",
                        left.len()
                    )));
                }
            }
            // The ServiceAccount is gone (its namespace is being deleted, say): nothing
            // can log in as it any more. The engine ends the leases at their TTL.
            Err(failure)
                if failure.reason == reasons::SERVICE_ACCOUNT_NOT_FOUND
                    || failure.reason == reasons::LOGIN_DENIED =>
            {
                ctx.revocation(
                    obj,
                    "abandoned",
                    reasons::LEASES_LEFT_TO_EXPIRE,
                    format!(
                        "{} lease(s) cannot be revoked ({}); the engine ends them at their TTL",
                        ids.len(),
                        failure.message
                    ),
                )
                .await;
            }
            Err(failure) => return Err(Error::Cleanup(failure.message)),
        }
    }
    let target_name = &obj.spec.target.name;
    let target = secrets
        .get_opt(target_name)
        .await
        .map_err(|e| Error::Cleanup(format!("reading Secret {target_name}: {e}")))?;
    if let Some(target) = target.filter(|t| target::owned_by(t, obj)) {
        match obj.spec.target.deletion_policy {
            DeletionPolicy::Delete => {
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: target.uid(),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                match secrets.delete(target_name, &params).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(Error::Cleanup(format!("deleting Secret {target_name}: {e}"))),
                }
                ctx.event(
                    obj,
                    EventType::Normal,
                    reasons::DELETED,
                    "Cleanup",
                    format!("Deleted Secret {target_name}"),
                )
                .await;
            }
            DeletionPolicy::Retain => {
                let mut released = target.clone();
                let uid = obj.uid();
                if let Some(refs) = released.metadata.owner_references.as_mut() {
                    refs.retain(|r| Some(&r.uid) != uid.as_ref());
                }
                if let Some(labels) = released.metadata.labels.as_mut() {
                    labels.remove(LABEL);
                }
                secrets
                    .replace(target_name, &PostParams::default(), &released)
                    .await
                    .map_err(|e| Error::Cleanup(format!("releasing Secret {target_name}: {e}")))?;
                ctx.event(
                    obj,
                    EventType::Normal,
                    reasons::RETAINED,
                    "Cleanup",
                    format!("Kept Secret {target_name} (deletionPolicy Retain)"),
                )
                .await;
            }
        }
    }
    let record_name = leases::secret_name(&obj.name_any());
    match secrets.delete(&record_name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(Error::Cleanup(format!("deleting Secret {record_name}: {e}"))),
    }
    Ok(())
}
