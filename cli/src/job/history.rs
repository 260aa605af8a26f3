//! `capstan job history NAME`: the versions the controller recorded, newest first, each
//! with what it changed against the one before, like `nomad job history -p`.

use super::{Cluster, Version, fields, timestamp};
use capstan_crds::jobs::Job;
use capstan_jobs::plan;

#[derive(clap::Args, Debug)]
pub struct History {
    /// The Job's name.
    name: String,
}

impl History {
    pub async fn run(self, cluster: &Cluster) -> anyhow::Result<bool> {
        let job = cluster.job(&self.name).await?;
        let versions = cluster.versions(&job).await?;
        println!("{}", render(&job, &versions));
        Ok(true)
    }
}

/// `versions` newest first; the oldest kept one has nothing to compare with.
fn render(job: &Job, versions: &[Version]) -> String {
    if versions.is_empty() {
        return format!(
            "Job {:?} has no versions recorded yet",
            job.metadata.name.as_deref().unwrap_or_default()
        );
    }
    let running = job.status.as_ref().and_then(|s| s.running_version);
    let blocks: Vec<String> = versions
        .iter()
        .enumerate()
        .map(|(i, version)| {
            let mut rows = vec![
                ("Version", version.number.to_string()),
                ("Stable", version.stable.to_string()),
                ("Running", (running == Some(version.number)).to_string()),
                ("Submit Date", timestamp(version.created.as_ref())),
            ];
            let previous = versions.get(i + 1);
            if let (Some(before), Some(after)) =
                (previous.and_then(|p| p.spec.as_ref()), version.spec.as_ref())
            {
                let json = |spec| serde_json::to_value(spec).expect("a JobSpec serializes");
                let diff = plan::diff(&json(before), &json(after));
                let shown: Vec<String> = diff.iter().map(|d| format!("  {d}")).collect();
                let against = previous.map_or(0, |p| p.number);
                let text = if shown.is_empty() {
                    format!("none against version {against}")
                } else {
                    format!("against version {against}\n{}", shown.join("\n"))
                };
                rows.push(("Diff", text));
            }
            fields(&rows)
        })
        .collect();
    blocks.join("\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(number: i64, image: &str, stable: bool) -> Version {
        Version {
            number,
            stable,
            created: None,
            spec: serde_json::from_value(serde_json::json!({
                "groups": [{"name": "web", "tasks": [{"name": "server", "image": image}]}]
            }))
            .ok(),
        }
    }

    #[test]
    fn each_version_shows_what_it_changed() {
        let job: Job = serde_json::from_value(serde_json::json!({
            "apiVersion": "jobs.capstan.dev/v1alpha1", "kind": "Job", "metadata": {"name": "web"},
            "spec": {"groups": [{"name": "web", "tasks": [{"name": "server", "image": "web:2"}]}]},
            "status": {"runningVersion": 1}
        }))
        .unwrap();
        let out = render(&job, &[version(2, "web:2", false), version(1, "web:1", true)]);
        assert_eq!(
            out,
            "Version     = 2\nStable      = false\nRunning     = false\nSubmit Date = -\n\
             Diff        = against version 1\n  +/- groups[web].tasks[server].image: \"web:1\" => \"web:2\"\n\n\
             Version     = 1\nStable      = true\nRunning     = true\nSubmit Date = -"
        );
    }
}
