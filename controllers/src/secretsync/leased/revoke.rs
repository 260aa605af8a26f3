//! Revoking leases: a replaced one once the workloads rolled onto its successor (S6),
//! or at once when it was never delivered.

use super::{
    super::{Ctx, engine, leases::Record, outcome::Failure, reasons, rollout},
    store,
};
use crate::metrics::SecretSyncMetrics;
use capstan_crds::SecretSync;
use k8s_openapi::{
    api::{apps::v1::Deployment, core::v1::Secret},
    jiff::Timestamp,
};
use kube::{Api, ResourceExt};

/// Revokes one lease; whether it is gone (revoked now, or unknown to the engine).
pub async fn lease(obj: &SecretSync, ctx: &Ctx, lease_id: &str) -> bool {
    let token = match ctx.token(obj).await {
        Ok(token) => token,
        Err(failure) => {
            SecretSyncMetrics::count(&ctx.metrics().revocations, "failed");
            tracing::warn!(reason = failure.reason, message = %failure.message, "Cannot log in to revoke a lease");
            return false;
        }
    };
    match ctx.state.engine.revoke(&token, lease_id).await {
        Ok(()) | Err(engine::Error::NotFound { .. }) => {
            ctx.revocation(
                obj,
                "revoked",
                reasons::LEASE_REVOKED,
                "Revoked a replaced lease".to_owned(),
            )
            .await;
            true
        }
        Err(error) => {
            ctx.revocation(
                obj,
                "failed",
                reasons::REVOKE_FAILED,
                format!("Revoking a lease failed; retrying: {error}"),
            )
            .await;
            false
        }
    }
}

/// Retires the replaced leases: restarts the workloads once, revokes each lease when
/// they rolled out (or it has ended anyway). Returns how many still wait. The last
/// step of a sync: the record's Secret, once saved, is not needed again.
pub async fn retire(
    obj: &SecretSync,
    ctx: &Ctx,
    secrets: &Api<Secret>,
    record: &mut Record,
    stored: Option<Secret>,
) -> Result<usize, Failure> {
    let mut pending = 0;
    if !record.retiring.is_empty() {
        let deployments =
            Api::<Deployment>::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
        let mut changed = false;
        let mut keep = vec![];
        for mut retiring in std::mem::take(&mut record.retiring) {
            if !retiring.restarted {
                retiring.rollouts = ctx.restart_all(obj).await;
                retiring.restarted = true;
                changed = true;
            }
            let mut done = Timestamp::now() >= retiring.expires_at;
            if !done {
                done = true;
                for mark in &retiring.rollouts {
                    match deployments.get_opt(&mark.name).await {
                        Ok(Some(d)) if !rollout::rolled_out(&d, mark.generation) => done = false,
                        Ok(_) => {}
                        Err(_) => done = false,
                    }
                }
            }
            if done && lease(obj, ctx, &retiring.id).await {
                changed = true;
                continue;
            }
            pending += 1;
            keep.push(retiring);
        }
        record.retiring = keep;
        if changed {
            store::save(secrets, obj, record, stored).await?;
        }
    }
    Ok(pending)
}
