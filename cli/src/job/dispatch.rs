//! `capstan job dispatch NAME`: one run of a parameterized job, as `nomad job dispatch`.
//! The run is a child Job: the parent's spec without `parameterized`, with `dispatch`
//! (parent, meta, payload), labelled with its parent and owned by it, so deleting the
//! parent deletes its runs. The webhook judges the meta and payload against the parent
//! again when the child is created; the check here only makes the message come first.

use super::{Cluster, FIELD_MANAGER, api_error, key_value};
use anyhow::{Context as _, bail};
use base64::Engine as _;
use capstan_crds::jobs::{Dispatch as DispatchSpec, Job, JobSpec};
use capstan_jobs::{compile::labels, validate};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{
    Resource, ResourceExt,
    api::{ObjectMeta, PostParams},
};
use rand::Rng as _;
use std::{collections::BTreeMap, io::Read as _, path::PathBuf};

/// The parent's name is cut to this many characters in a child's name.
const PARENT_PREFIX: usize = 29;
const SUFFIX_LEN: usize = 10;

#[derive(clap::Args, Debug)]
pub struct Dispatch {
    /// The parameterized Job's name.
    name: String,
    /// Meta for this run, KEY=VALUE (the tasks get NOMAD_META_<KEY>); repeat for more.
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    meta: Vec<String>,
    /// A file (`-`: standard input) the tasks get as their dispatchPayload file, at most 16 KiB.
    #[arg(long, value_name = "FILE")]
    payload: Option<PathBuf>,
}

impl Dispatch {
    pub async fn run(self, cluster: &Cluster) -> anyhow::Result<bool> {
        let mut meta = BTreeMap::new();
        for given in &self.meta {
            let (key, value) = key_value(given).context("--meta")?;
            if meta.insert(key.clone(), value).is_some() {
                bail!("--meta {key:?} is given twice");
            }
        }
        let payload = self.payload.as_ref().map(read_payload).transpose()?;
        let parent = cluster.job(&self.name).await?;
        if parent.spec.parameterized.is_none() {
            bail!(
                "Job {:?} is not parameterized: only a parameterized job can be dispatched",
                self.name
            );
        }
        let dispatch = DispatchSpec {
            parent: self.name.clone(),
            meta,
            payload: payload.map(|bytes| base64::engine::general_purpose::STANDARD.encode(bytes)),
        };
        let problems = validate::validate_dispatch(&parent.spec, &dispatch);
        if !problems.is_empty() {
            let lines: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
            bail!("cannot dispatch Job {:?}:\n{}", self.name, lines.join("\n"));
        }
        let child = child(&parent, dispatch, &suffix()).context("building the child Job")?;
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PostParams::default()
        };
        let created = cluster
            .api::<Job>()
            .create(&params, &child)
            .await
            .map_err(api_error)
            .with_context(|| format!("creating the dispatched run of Job {:?}", self.name))?;
        println!("{}", created.name_any());
        Ok(true)
    }
}

fn read_payload(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("reading the payload from standard input")?;
    } else {
        bytes = std::fs::read(path).with_context(|| format!("reading the payload {}", path.display()))?;
    }
    Ok(bytes)
}

/// Ten random lowercase letters and digits: a child's name is its parent's and these.
fn suffix() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..SUFFIX_LEN)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// The child Job of one dispatch of `parent`.
fn child(parent: &Job, dispatch: DispatchSpec, suffix: &str) -> anyhow::Result<Job> {
    let parent_name = parent.name_any();
    let prefix = &parent_name[..parent_name.len().min(PARENT_PREFIX)];
    // The parent owns its runs (deleting it deletes them) but does not control them:
    // each run's own objects are controlled by the run.
    let owner = OwnerReference {
        api_version: Job::api_version(&()).into_owned(),
        kind: Job::kind(&()).into_owned(),
        name: parent_name.clone(),
        uid: parent.uid().context("the parent Job has no uid")?,
        ..OwnerReference::default()
    };
    let mut child = Job::new(
        &format!("{prefix}-{suffix}"),
        JobSpec {
            parameterized: None,
            promote: None,
            dispatch: Some(dispatch),
            ..parent.spec.clone()
        },
    );
    child.metadata = ObjectMeta {
        name: child.metadata.name.take(),
        namespace: parent.namespace(),
        labels: Some(BTreeMap::from([(labels::PARENT.to_owned(), parent_name)])),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    };
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parent(name: &str) -> Job {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "jobs.capstan.dev/v1alpha1",
            "kind": "Job",
            "metadata": {"name": name, "namespace": "shop", "uid": "u-1", "labels": {"team": "a"}},
            "spec": {
                "type": "batch",
                "parameterized": {"metaRequired": ["customer"]},
                "groups": [{"name": "render", "tasks": [{"name": "render", "image": "report:2"}]}]
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_child_is_the_parents_spec_with_its_dispatch() {
        let dispatch = DispatchSpec {
            parent: "report".into(),
            meta: BTreeMap::from([("customer".into(), "acme".into())]),
            payload: Some("aGk=".into()),
        };
        let child = child(&parent("report"), dispatch.clone(), "abcde12345").unwrap();
        assert_eq!(child.name_any(), "report-abcde12345");
        assert_eq!(child.namespace().as_deref(), Some("shop"));
        assert_eq!(
            child.labels().get(labels::PARENT).map(String::as_str),
            Some("report")
        );
        let owner = &child.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("Job", "report", "u-1")
        );
        assert_eq!(owner.controller, None);
        assert_eq!(child.spec.parameterized, None);
        assert_eq!(child.spec.dispatch, Some(dispatch));
        assert_eq!(child.spec.groups, parent("report").spec.groups);
    }

    #[test]
    fn a_long_parent_name_is_cut() {
        let name = "a-parameterized-job-with-a-long-name";
        let child = child(&parent(name), DispatchSpec::default(), "abcde12345").unwrap();
        assert_eq!(child.name_any(), format!("{}-abcde12345", &name[..29]));
        assert!(child.name_any().len() <= 40);
    }

    #[test]
    fn suffixes_are_lowercase_alphanumeric() {
        let s = suffix();
        assert_eq!(s.len(), SUFFIX_LEN);
        assert!(
            s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
            "{s}"
        );
        assert_ne!(s, suffix());
    }
}
