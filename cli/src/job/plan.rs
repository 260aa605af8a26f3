//! `capstan job plan FILE`: what applying a Job file would change, like `nomad job plan`.
//! The file goes to the API server as a dry run (a create, or an update of the stored
//! Job), so the schema, the CEL rules and the admission webhooks all judge it and the
//! spec compared is the one the server would store, defaults filled in.

use super::{Cluster, FIELD_MANAGER, api_error};
use anyhow::{Context as _, bail};
use capstan_crds::jobs::Job;
use capstan_jobs::plan::{self, Change, GroupPlan};
use kube::{
    Api, Resource as _,
    api::{ApiResource, DynamicObject, PostParams},
};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Plan {
    /// A Job's YAML (`-`: standard input).
    file: PathBuf,
}

impl Plan {
    /// True when applying the file would change nothing.
    pub async fn run(self, cluster: &Cluster) -> anyhow::Result<bool> {
        let text = super::read_input(&self.file)?;
        let mut object: DynamicObject = serde_yaml_ng::from_str(&text)
            .with_context(|| format!("{}: not a Kubernetes object in YAML", self.file.display()))?;
        let (api_version, kind) = object
            .types
            .as_ref()
            .map_or(("", ""), |t| (&t.api_version, &t.kind));
        if (api_version, kind) != (&*Job::api_version(&()), &*Job::kind(&())) {
            bail!(
                "{}: a {kind:?} of {api_version:?}, not a Job of {:?}",
                self.file.display(),
                Job::api_version(&())
            );
        }
        let name = object
            .metadata
            .name
            .clone()
            .with_context(|| format!("{}: metadata.name is missing", self.file.display()))?;
        let namespace = match &object.metadata.namespace {
            Some(ns) if cluster.namespace_given && *ns != cluster.namespace => bail!(
                "{}: the Job is in namespace {ns:?}, not in {:?} as --namespace says",
                self.file.display(),
                cluster.namespace
            ),
            Some(ns) => ns.clone(),
            None => cluster.namespace.clone(),
        };
        object.metadata.namespace = Some(namespace.clone());

        let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), &namespace);
        let current = jobs
            .get_opt(&name)
            .await
            .map_err(api_error)
            .with_context(|| format!("reading Job {name:?} in namespace {namespace:?}"))?;
        let dynamic: Api<DynamicObject> = Api::namespaced_with(
            cluster.client.clone(),
            &namespace,
            &ApiResource::erase::<Job>(&()),
        );
        let params = PostParams {
            dry_run: true,
            field_manager: Some(FIELD_MANAGER.to_owned()),
        };
        let submitted = object.data.get("spec").cloned().unwrap_or_default();
        let judged = match &current {
            Some(current) => {
                object.metadata.resource_version = current.metadata.resource_version.clone();
                dynamic.replace(&name, &params, &object).await
            }
            None => dynamic.create(&params, &object).await,
        }
        .map_err(api_error)
        .with_context(|| format!("the API server refuses Job {name:?}"))?;
        // The server drops fields its schema does not know (with a warning the client
        // library does not surface): a misspelled field would otherwise plan as nothing.
        let dropped: Vec<String> = plan::diff(&submitted, judged.data.get("spec").unwrap_or_default())
            .into_iter()
            .filter(|d| d.after.is_none())
            .map(|d| format!("spec.{}", d.field))
            .collect();
        if !dropped.is_empty() {
            bail!(
                "{}: unknown fields, which the API server drops: {}",
                self.file.display(),
                dropped.join(", ")
            );
        }
        let next: Job =
            serde_json::from_value(serde_json::to_value(&judged)?).context("reading the dry run's Job")?;
        let plan = plan::plan(current.as_ref().map(|c| &c.spec), &next.spec);
        println!("{}", render(&name, current.is_some(), &plan));
        println!("\nThe API server accepts the Job (a dry run: schema, CEL rules, admission webhooks).");
        if let Some(version) = current.and_then(|c| c.metadata.resource_version) {
            println!("Planned against resourceVersion {version}.");
        }
        Ok(plan.is_empty())
    }
}

fn render(name: &str, exists: bool, plan: &plan::Plan) -> String {
    let marker = match (exists, plan.is_empty()) {
        (false, _) => "+",
        (true, false) => "+/-",
        (true, true) => " ",
    };
    let mut lines = vec![format!("{marker} Job: {name:?}")];
    lines.extend(plan.job.iter().map(|d| format!("  {d}")));
    for group in &plan.groups {
        lines.push(format!(
            "{} Task Group: {:?} ({})",
            group.change.marker(),
            group.name,
            annotation(group)
        ));
        lines.extend(group.diff.iter().map(|d| format!("    {d}")));
    }
    lines.join("\n")
}

/// What happens to the group's allocations: `create, count 3`, `in-place update, count
/// 3 => 5`, `create/destroy update, 3 allocations, 1 canary`, `destroy, count 2`.
fn annotation(group: &GroupPlan) -> String {
    let count = |c: Option<i32>| c.unwrap_or(0);
    let (before, after) = (count(group.count.0), count(group.count.1));
    let text = match group.change {
        Change::Create => format!("create, count {after}"),
        Change::Remove => format!("destroy, count {before}"),
        Change::None => format!("no change, count {after}"),
        Change::InPlace if before != after => format!("in-place update, count {before} => {after}"),
        Change::InPlace => "in-place update".to_owned(),
        Change::Destructive => {
            let count = if before == after {
                after.to_string()
            } else {
                format!("{before} => {after}")
            };
            format!("create/destroy update, count {count}")
        }
    };
    match group.canaries {
        0 => text,
        1 => format!("{text}, 1 canary"),
        n => format!("{text}, {n} canaries"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_crds::jobs::JobSpec;

    fn spec(web_image: &str, web_count: i32, api: bool) -> JobSpec {
        let mut groups = vec![serde_json::json!(
            {"name": "web", "count": web_count, "tasks": [{"name": "server", "image": web_image}]}
        )];
        if api {
            groups.push(serde_json::json!({"name": "api", "count": 2, "tasks": [{"name": "server", "image": "api:1"}]}));
        }
        serde_json::from_value(serde_json::json!({"update": {"canary": 1}, "groups": groups})).unwrap()
    }

    #[test]
    fn a_new_job_is_created() {
        let out = render("web", false, &plan::plan(None, &spec("web:1", 3, true)));
        assert_eq!(
            out,
            "+ Job: \"web\"\n+ Task Group: \"web\" (create, count 3)\n+ Task Group: \"api\" (create, count 2)"
        );
    }

    #[test]
    fn in_place_destructive_and_removed_groups() {
        let out = render(
            "web",
            true,
            &plan::plan(Some(&spec("web:1", 3, true)), &spec("web:2", 3, false)),
        );
        assert_eq!(
            out,
            "+/- Job: \"web\"\n\
             +/- Task Group: \"web\" (create/destroy update, count 3, 1 canary)\n    \
             +/- tasks[server].image: \"web:1\" => \"web:2\"\n\
             - Task Group: \"api\" (destroy, count 2)"
        );
        let out = render(
            "web",
            true,
            &plan::plan(Some(&spec("web:1", 3, true)), &spec("web:1", 5, true)),
        );
        assert_eq!(
            out,
            "+/- Job: \"web\"\n\
             +/- Task Group: \"web\" (in-place update, count 3 => 5)\n    +/- count: 3 => 5\n  \
             Task Group: \"api\" (no change, count 2)"
        );
    }

    #[test]
    fn nothing_to_change() {
        let out = render(
            "web",
            true,
            &plan::plan(Some(&spec("web:1", 3, false)), &spec("web:1", 3, false)),
        );
        assert_eq!(out, "  Job: \"web\"\n  Task Group: \"web\" (no change, count 3)");
    }
}
