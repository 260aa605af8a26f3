//! A group's effective `update` block: the group's fields over the job's, Nomad's
//! defaults for the rest, durations parsed.

use super::{CompileError, duration, group_at};
use capstan_crds::jobs::{HealthCheck, Job, UpdateStrategy};
use std::time::Duration;

/// Nomad's update block with its defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    /// Allocations replaced at once (default 1); 0: no rolling update (a new version's
    /// allocations replace the old ones only when those stop on their own).
    pub max_parallel: i32,
    pub health_check: HealthCheck,
    /// Healthy for this long before an allocation counts as healthy (default 10s).
    pub min_healthy_time: Duration,
    /// An allocation not healthy within this is unhealthy (default 5m).
    pub healthy_deadline: Duration,
    /// The deployment fails when no allocation turns healthy for this long (default
    /// 10m); None when `0` turns it off.
    pub progress_deadline: Option<Duration>,
    pub canary: i32,
    pub auto_promote: bool,
    pub auto_revert: bool,
    /// Nomad's stagger between batches (default 30s).
    pub stagger: Duration,
}

/// Group `group_index`'s update block: its own fields, then the job's, then Nomad's defaults.
pub fn update(job: &Job, group_index: usize) -> Result<Update, CompileError> {
    let group = group_at(job, group_index)?;
    let empty = UpdateStrategy::default();
    let mine = group.update.as_ref().unwrap_or(&empty);
    let job_level = job.spec.update.as_ref().unwrap_or(&empty);
    let field_of = |name: &str| {
        if mine.min_healthy_time.is_some() && name == "minHealthyTime"
            || mine.healthy_deadline.is_some() && name == "healthyDeadline"
            || mine.progress_deadline.is_some() && name == "progressDeadline"
            || mine.stagger.is_some() && name == "stagger"
        {
            format!("spec.groups[{group_index}].update.{name}")
        } else {
            format!("spec.update.{name}")
        }
    };
    let time = |pick: fn(&UpdateStrategy) -> &Option<String>, name: &str, default: Duration| match pick(mine)
        .as_ref()
        .or(pick(job_level).as_ref())
    {
        None => Ok(default),
        Some(text) => {
            duration::parse(text).ok_or_else(|| CompileError::new(field_of(name), "not a duration"))
        }
    };
    let progress_deadline = time(
        |u| &u.progress_deadline,
        "progressDeadline",
        Duration::from_secs(600),
    )?;
    Ok(Update {
        max_parallel: mine.max_parallel.or(job_level.max_parallel).unwrap_or(1),
        health_check: mine.health_check.or(job_level.health_check).unwrap_or_default(),
        min_healthy_time: time(|u| &u.min_healthy_time, "minHealthyTime", Duration::from_secs(10))?,
        healthy_deadline: time(
            |u| &u.healthy_deadline,
            "healthyDeadline",
            Duration::from_secs(300),
        )?,
        progress_deadline: (!progress_deadline.is_zero()).then_some(progress_deadline),
        canary: mine.canary.or(job_level.canary).unwrap_or(0),
        auto_promote: mine.auto_promote.or(job_level.auto_promote).unwrap_or(false),
        auto_revert: mine.auto_revert.or(job_level.auto_revert).unwrap_or(false),
        stagger: time(|u| &u.stagger, "stagger", Duration::from_secs(30))?,
    })
}
