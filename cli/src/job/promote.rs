//! `capstan job promote NAME`: sets `spec.promote` to the version whose canaries wait,
//! which the controller reads as Nomad's `nomad deployment promote`.

use super::{Cluster, FIELD_MANAGER, api_error};
use anyhow::{Context as _, bail};
use capstan_crds::jobs::{DeploymentStatus, Job};
use kube::{
    ResourceExt as _,
    api::{Patch, PatchParams},
};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct Promote {
    /// The Job's name.
    name: String,
    /// The deployment's version, to make sure the canaries promoted are the ones looked
    /// at (default: the deployment that waits).
    #[arg(long)]
    version: Option<i64>,
    /// Wait until the controller has promoted them.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, in seconds.
    #[arg(long, default_value_t = 300, requires = "wait")]
    timeout: u64,
}

impl Promote {
    pub async fn run(self, cluster: &Cluster) -> anyhow::Result<bool> {
        let job = cluster.job(&self.name).await?;
        let version = awaiting(&job, self.version)?;
        if job.spec.promote == Some(version) {
            println!(
                "Job {:?}: version {version} is already asked to be promoted",
                self.name
            );
        } else {
            // The resourceVersion makes the patch conditional: a spec changed since the
            // read (a new version, another promote) is refused instead of overwritten.
            let patch = serde_json::json!({
                "metadata": {"resourceVersion": job.metadata.resource_version},
                "spec": {"promote": version},
            });
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..PatchParams::default()
            };
            match cluster
                .api::<Job>()
                .patch(&self.name, &params, &Patch::Merge(&patch))
                .await
            {
                Err(kube::Error::Api(status)) if status.is_conflict() => {
                    bail!(
                        "Job {:?} changed while promoting it: look at its status and try again",
                        self.name
                    )
                }
                result => result
                    .map_err(api_error)
                    .with_context(|| format!("setting spec.promote of Job {:?}", self.name))?,
            };
            println!("Job {:?}: promoting the canaries of version {version}", self.name);
        }
        if self.wait {
            wait_promoted(cluster, &self.name, version, Duration::from_secs(self.timeout)).await?;
            println!("Job {:?}: version {version} promoted", self.name);
        }
        Ok(true)
    }
}

/// The version of the deployment that waits for promotion, checked against `asked`.
fn awaiting(job: &Job, asked: Option<i64>) -> anyhow::Result<i64> {
    let name = job.name_any();
    let deployment = job.status.as_ref().and_then(|s| s.deployment.as_ref());
    let Some(deployment) = deployment.filter(|d| waits(d)) else {
        let latest = deployment.map_or_else(
            || "it has none".to_owned(),
            |d| {
                format!(
                    "the latest, version {}, is {}{}",
                    d.version,
                    d.status,
                    if d.promoted { " and promoted" } else { "" }
                )
            },
        );
        bail!("Job {name:?} has no deployment awaiting promotion ({latest})");
    };
    match asked {
        Some(asked) if asked != deployment.version => bail!(
            "version {asked} of Job {name:?} awaits no promotion: the deployment that does is version {}",
            deployment.version
        ),
        _ => Ok(deployment.version),
    }
}

/// A deployment whose canaries are placed or being placed and not yet promoted.
fn waits(deployment: &DeploymentStatus) -> bool {
    !deployment.promoted
        && deployment.canaries_desired > 0
        && matches!(deployment.status.as_str(), "running" | "paused")
}

async fn wait_promoted(cluster: &Cluster, name: &str, version: i64, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let job = cluster.job(name).await?;
        if let Some(d) = job.status.as_ref().and_then(|s| s.deployment.as_ref())
            && d.version == version
        {
            if d.promoted {
                return Ok(());
            }
            if !matches!(d.status.as_str(), "running" | "paused") {
                bail!(
                    "the deployment of version {version} ended {} before it was promoted",
                    d.status
                );
            }
        }
        if Instant::now() > deadline {
            bail!("version {version} of Job {name:?} is still not promoted after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(deployment: serde_json::Value) -> Job {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "jobs.capstan.dev/v1alpha1",
            "kind": "Job",
            "metadata": {"name": "web"},
            "spec": {"groups": [{"name": "g", "tasks": [{"name": "t", "image": "i"}]}]},
            "status": {"deployment": deployment}
        }))
        .unwrap()
    }

    #[test]
    fn the_waiting_deployment_is_promoted() {
        let paused = job(serde_json::json!({"version": 3, "status": "paused", "canariesDesired": 1}));
        assert_eq!(awaiting(&paused, None).unwrap(), 3);
        assert_eq!(awaiting(&paused, Some(3)).unwrap(), 3);
        let error = awaiting(&paused, Some(2)).unwrap_err().to_string();
        assert!(error.contains("the deployment that does is version 3"), "{error}");
    }

    #[test]
    fn nothing_to_promote_is_refused() {
        for (deployment, says) in [
            (serde_json::json!(null), "it has none"),
            (
                serde_json::json!({"version": 3, "status": "successful", "canariesDesired": 1, "promoted": true}),
                "version 3, is successful and promoted",
            ),
            (
                serde_json::json!({"version": 4, "status": "running"}),
                "version 4, is running",
            ),
        ] {
            let error = awaiting(&job(deployment), None).unwrap_err().to_string();
            assert!(
                error.contains("no deployment awaiting promotion") && error.contains(says),
                "{error}"
            );
        }
    }
}
