//! KV sources: read the entry (a pinned version, or the latest every refresh interval),
//! render the target's data, and write it when its HMAC differs from the target's,
//! rolling the Deployments on a new version.

use super::{
    Ctx, Job, engine,
    outcome::{Failure, Synced, Write},
    reasons, target, template,
};
use capstan_crds::SecretSync;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;

pub async fn sync(job: Job<'_>) -> Result<Synced, Failure> {
    let kv = job.obj.spec.source.kv.as_ref().expect("validated: a kv source");
    let entry = match read_kv(job.obj, job.ctx, kv).await {
        Ok(entry) => entry,
        Err(failure) => return Err(failure),
    };
    let data = template::render(job.v.templates.as_ref(), &entry.fields)
        .map_err(|e| Failure::permanent(reasons::INVALID_SPEC, e.to_string()))?;
    let hmac = job.ctx.state.hmac.digest(&data);
    let mut synced = Synced {
        hmac: hmac.clone(),
        version: Some(entry.version),
        // A pinned version never changes: no need to poll it.
        next: if kv.version.is_some() {
            job.ctx.config.resync
        } else {
            job.v.refresh
        },
        ..Default::default()
    };
    let (in_place, type_ok) = job.in_place();
    if in_place.as_deref() == Some(hmac.as_str()) && type_ok {
        return Ok(synced);
    }
    let previous_version = job.obj.status.as_ref().and_then(|s| s.source_version);
    let write = match &job.target {
        None => Write::Created,
        Some(_) if previous_version != Some(entry.version) => Write::Changed,
        Some(_) => Write::Restored,
    };
    target::write(job.secrets, job.obj, job.target.as_ref(), &data).await?;
    synced.wrote = Some(write);
    if write == Write::Changed
        && let Some(created) = entry.created
    {
        let seconds = Timestamp::now().duration_since(created).as_secs_f64();
        job.ctx.metrics().propagation.observe(seconds.max(0.0));
    }
    let note = match write {
        Write::Created => format!(
            "Created Secret {} from version {}",
            job.obj.spec.target.name, entry.version
        ),
        Write::Changed => format!(
            "Updated Secret {} to version {} (was {})",
            job.obj.spec.target.name,
            entry.version,
            previous_version.map_or("none".to_owned(), |v| v.to_string())
        ),
        _ => format!(
            "Restored Secret {}: its data had been changed by hand (HMAC mismatch)",
            job.obj.spec.target.name
        ),
    };
    let reason = if write == Write::Restored {
        reasons::RESTORED
    } else {
        reasons::SYNCED
    };
    job.ctx
        .event(job.obj, EventType::Normal, reason, "Sync", note)
        .await;
    if write == Write::Changed {
        job.ctx.restart_all(job.obj).await;
    }
    Ok(synced)
}

/// Reads the KV entry, logging in again once if the cached token was refused.
async fn read_kv(
    obj: &SecretSync,
    ctx: &Ctx,
    kv: &capstan_crds::KvSource,
) -> Result<engine::KvEntry, Failure> {
    for attempt in 0..2 {
        let token = ctx.token(obj).await?;
        match ctx
            .state
            .engine
            .kv_read(&token, &kv.mount, &kv.path, kv.version)
            .await
        {
            Ok(entry) => return Ok(entry),
            Err(engine::Error::Denied { .. }) if attempt == 0 => ctx.drop_token(obj),
            Err(error) => return Err(Failure::engine(error)),
        }
    }
    unreachable!("the second attempt returns")
}
