//! `capstan job revert NAME VERSION`: the Job's spec becomes the spec stored as VERSION
//! (its ControllerRevision `<job>-v<N>`); the controller records it as a new version and
//! deploys it like any other change, as `nomad job revert` does.

use super::{Cluster, FIELD_MANAGER, api_error};
use anyhow::{Context as _, bail};
use capstan_crds::jobs::{Job, JobSpec};
use kube::api::PostParams;

#[derive(clap::Args, Debug)]
pub struct Revert {
    /// The Job's name.
    name: String,
    /// The version whose spec to run again (`capstan job history` lists them).
    version: i64,
}

impl Revert {
    pub async fn run(self, cluster: &Cluster) -> anyhow::Result<bool> {
        let mut job = cluster.job(&self.name).await?;
        let versions = cluster.versions(&job).await?;
        let Some(target) = versions.iter().find(|v| v.number == self.version) else {
            let known: Vec<String> = versions.iter().map(|v| v.number.to_string()).collect();
            bail!(
                "Job {:?} has no version {} (its versions: {})",
                self.name,
                self.version,
                if known.is_empty() {
                    "none recorded yet".to_owned()
                } else {
                    known.join(", ")
                }
            );
        };
        let spec = target.spec.clone().with_context(|| {
            format!(
                "the revision of version {} holds no Job spec this CLI reads",
                self.version
            )
        })?;
        job.spec = reverted(&job.spec, spec).with_context(|| format!("Job {:?}", self.name))?;
        // An update carrying the resourceVersion just read: a spec changed meanwhile is
        // refused with a conflict rather than replaced.
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PostParams::default()
        };
        match cluster.api::<Job>().replace(&self.name, &params, &job).await {
            Err(kube::Error::Api(status)) if status.is_conflict() => {
                bail!(
                    "Job {:?} changed while reverting it: look at `capstan job history` and try again",
                    self.name
                )
            }
            result => result
                .map_err(api_error)
                .with_context(|| format!("updating the spec of Job {:?}", self.name))?,
        };
        println!(
            "Job {:?}: reverted to the spec of version {} (the controller records it as a new version)",
            self.name, self.version
        );
        Ok(true)
    }
}

/// The spec to store: `target` without a pending promotion (a promotion names a version,
/// and the revert starts a new one). Refused when the job already has that spec.
fn reverted(current: &JobSpec, target: JobSpec) -> anyhow::Result<JobSpec> {
    let target = JobSpec {
        promote: None,
        ..target
    };
    if (JobSpec {
        promote: None,
        ..current.clone()
    }) == target
    {
        bail!("the spec is already that version's: nothing to revert");
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(image: &str) -> JobSpec {
        serde_json::from_value(serde_json::json!({
            "groups": [{"name": "g", "tasks": [{"name": "t", "image": image}]}]
        }))
        .unwrap()
    }

    #[test]
    fn an_earlier_spec_replaces_the_current_one() {
        let mut current = spec("web:2");
        current.promote = Some(2);
        let reverted = reverted(&current, spec("web:1")).unwrap();
        assert_eq!(reverted, spec("web:1"));
        assert_eq!(reverted.promote, None);
    }

    #[test]
    fn the_current_spec_is_refused() {
        let mut current = spec("web:1");
        current.promote = Some(1);
        assert!(
            reverted(&current, spec("web:1"))
                .unwrap_err()
                .to_string()
                .contains("nothing to revert")
        );
    }
}
