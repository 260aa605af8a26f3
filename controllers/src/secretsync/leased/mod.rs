//! Dynamic sources (database credentials, PKI certificates): a lease per credential,
//! kept on record beside the target (`store`), renewed or replaced as `plan` decides
//! (pure), replaced by the write-ahead issue (`intent`), and the replaced ones revoked
//! after the rollout (`revoke`). `sync` is the apply step: the I/O the plan asks for.

mod intent;
mod plan;
pub mod revoke;
pub mod store;

pub use intent::finish_orphan;

use super::{
    Ctx, Job,
    outcome::{Failure, Synced, Write},
    reasons, schedule, target, validate,
};
use crate::metrics::SecretSyncMetrics;
use capstan_crds::SecretSync;
use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kube::{Api, ResourceExt, runtime::events::EventType};
use plan::{Observed, Then};
use std::time::Duration;

/// How soon to look again while a replaced lease waits for its rollout.
const ROLLOUT_POLL: Duration = Duration::from_secs(2);

pub async fn sync(job: Job<'_>) -> Result<Synced, Failure> {
    let (in_place, type_ok) = job.in_place();
    let Job {
        obj,
        ctx,
        v,
        secrets,
        target,
    } = &job;
    let uid = obj.uid().unwrap_or_default();
    let (mut record, mut stored) = store::read(secrets, obj).await?;
    // An issue that stopped before its lease was recorded (the controller was killed,
    // or paused past its leader Lease, in between): its credential is revoked before
    // anything else, so it never lives on beside the one issued next (K1).
    stored = finish_orphan(secrets, obj, ctx, &mut record, stored).await?;
    let fingerprint = validate::fingerprint(&obj.spec);

    // The token that issued the current lease, if this process still holds it: renew it
    // as it comes due, and record how long it (and so the lease) can last.
    let mut token_wake = None;
    let issuer = ctx.state.issuers.lock().get(&uid).copied();
    if let (Some(generation), Some(current)) = (issuer, record.current.as_mut()) {
        if let Ok(info) = ctx.token_info(obj).await
            && info.generation == generation
        {
            token_wake = Some(schedule::until(Timestamp::now(), info.expires_at) / 3);
            if current.token_expires_at != Some(info.expires_at) {
                current.token_expires_at = Some(info.expires_at);
                stored = Some(store::save(secrets, obj, &record, stored).await?);
            }
        } else {
            // A new login: the issuing token is no longer renewed.
            ctx.state.issuers.lock().remove(&uid);
        }
    }

    // The credential's data, if this process delivered it and still holds it.
    let held = record.current.as_ref().and_then(|current| {
        ctx.state
            .delivered
            .lock()
            .get(&uid)
            .filter(|(id, _)| *id == current.id.clone().unwrap_or_default())
            .map(|(_, data)| data.clone())
            .filter(|data| ctx.state.hmac.digest(data) == current.hmac)
    });
    let plan = plan::plan(&Observed {
        record: &record,
        fingerprint: &fingerprint,
        in_place: in_place.as_deref(),
        type_ok,
        restorable: held.is_some(),
        renew_before: v.renew_before,
        now: Timestamp::now(),
    });

    let mut wrote = None;
    if plan.restore
        && let Some(data) = &held
    {
        target::write(secrets, obj, target.as_ref(), data).await?;
        wrote = Some(Write::Restored);
        ctx.event(
            obj,
            EventType::Normal,
            reasons::RESTORED,
            "Sync",
            format!(
                "Restored Secret {}: its data had been changed by hand (HMAC mismatch)",
                obj.spec.target.name
            ),
        )
        .await;
    }
    let replace = match plan.lease {
        Then::Keep => None,
        Then::Replace(why) => Some(why),
        Then::Renew => {
            let (s, refused) = renew(obj, ctx, secrets, &mut record, stored).await?;
            stored = s;
            refused.then_some("the engine refused to renew the lease")
        }
    };
    if let Some(why) = replace {
        let (s, write) = intent::replace(&job, &mut record, stored, &fingerprint, why).await?;
        stored = s;
        wrote = Some(write);
    }

    // Retiring leases: restart the workloads once, revoke when they rolled out (or the
    // lease has ended anyway).
    let pending = revoke::retire(obj, ctx, secrets, &mut record, stored).await?;

    let current = record.current.as_ref().expect("a current lease after issuing");
    let lease = plan::effective(&record).expect("a current lease after issuing");
    let poll = if pending > 0 {
        ctx.config.resync.min(ROLLOUT_POLL)
    } else {
        ctx.config.resync
    };
    Ok(Synced {
        wrote,
        hmac: current.hmac.clone(),
        version: None,
        next: plan::next_wake(&lease, v.renew_before, Timestamp::now(), token_wake, poll),
        lease: Some(lease),
        pending_rollouts: pending,
    })
}

/// Renews the current lease. Returns the record's Secret as stored, and whether the
/// engine refused (then a new credential is issued); a transient failure keeps the
/// Secret as it is until the lease ends (S5).
async fn renew(
    obj: &SecretSync,
    ctx: &Ctx,
    secrets: &Api<Secret>,
    record: &mut super::leases::Record,
    stored: Option<Secret>,
) -> Result<(Option<Secret>, bool), Failure> {
    let current = record.current.clone().expect("renewing a current lease");
    let id = current.id.clone().expect("an extendable lease has an id");
    let token = ctx.token(obj).await?;
    let requested = current.lease().original_ttl;
    match ctx.state.engine.renew(&token, &id, requested).await {
        Ok(renewed) => {
            SecretSyncMetrics::count(&ctx.metrics().renewals, "renewed");
            let lease = current
                .lease()
                .renewed(Timestamp::now(), requested, renewed.ttl, renewed.renewable);
            let mut next = current.clone();
            next.set_lease(&lease);
            record.current = Some(next);
            let stored = Some(store::save(secrets, obj, record, stored).await?);
            ctx.event(
                obj,
                EventType::Normal,
                reasons::LEASE_RENEWED,
                "Renew",
                format!("Renewed the lease until {}", lease.expires_at()),
            )
            .await;
            Ok((stored, false))
        }
        Err(error) if error.transient() => {
            SecretSyncMetrics::count(&ctx.metrics().renewals, "failed");
            Err(Failure::engine(error))
        }
        Err(error) => {
            SecretSyncMetrics::count(&ctx.metrics().renewals, "failed");
            tracing::info!(%error, "Lease renewal refused; issuing a new credential");
            Ok((stored, true))
        }
    }
}
