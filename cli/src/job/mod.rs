//! `capstan job`: Nomad's job commands over the Job kind (jobs.capstan.dev, cjob).
//! Each reads and writes the API the way the controller and the webhook expect: the
//! versions are the ControllerRevisions `<job>-v<N>` the controller records, promotion
//! and reverts are spec changes (never status writes), and each carries the
//! resourceVersion it was computed from, so a concurrent change is refused, not lost.

mod convert;
mod dispatch;
mod history;
mod plan;
mod promote;
mod revert;
mod status;
mod yaml;

use anyhow::{Context as _, bail};
use capstan_crds::jobs::{Job, JobSpec};
use capstan_jobs::compile::{labels, names};
use clap::Subcommand;
use k8s_openapi::{
    NamespaceResourceScope, api::apps::v1::ControllerRevision, apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{Api, Client, Resource, ResourceExt, api::ListParams};

/// The field manager of the CLI's writes (promote, revert, dispatch).
const FIELD_MANAGER: &str = "capstan-cli";

#[derive(clap::Args, Debug)]
pub struct JobArgs {
    /// The namespace of the Job (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: JobCommand,
}

#[derive(Subcommand, Debug)]
enum JobCommand {
    /// The job's groups, deployment, versions, children and allocations, like `nomad job status`.
    Status(status::Status),
    /// Promote the canaries of the deployment that waits for it.
    Promote(promote::Promote),
    /// Run an earlier version's spec again (as a new version).
    Revert(revert::Revert),
    /// The job's versions, newest first, with what each changed.
    History(history::History),
    /// Run a parameterized job once, with meta and a payload; prints the child Job's name.
    Dispatch(dispatch::Dispatch),
    /// A Nomad jobspec (HCL or JSON) as a Job's YAML; exits 1 when some blocks could
    /// not be translated (they are listed with their lines).
    Convert(convert::Convert),
    /// What applying a Job file would change (a server-side dry run); exits 1 when it
    /// would change something, 0 when not.
    Plan(plan::Plan),
}

impl JobArgs {
    /// True when the command's answer is yes (see `main` for the exit codes).
    pub async fn run(self) -> anyhow::Result<bool> {
        let namespace = self.namespace;
        // Every command but convert works in a cluster.
        let cluster = || Cluster::connect(namespace.clone());
        match self.command {
            JobCommand::Convert(command) => command.run(namespace.clone()),
            JobCommand::Status(command) => command.run(&cluster().await?).await,
            JobCommand::Promote(command) => command.run(&cluster().await?).await,
            JobCommand::Revert(command) => command.run(&cluster().await?).await,
            JobCommand::History(command) => command.run(&cluster().await?).await,
            JobCommand::Dispatch(command) => command.run(&cluster().await?).await,
            JobCommand::Plan(command) => command.run(&cluster().await?).await,
        }
    }
}

/// The cluster in KUBECONFIG and the namespace a command works in.
pub struct Cluster {
    client: Client,
    namespace: String,
    /// Whether `--namespace` named it (a file's own namespace may not contradict it).
    namespace_given: bool,
}

impl Cluster {
    async fn connect(namespace: Option<String>) -> anyhow::Result<Self> {
        let client = Client::try_default()
            .await
            .context("connecting to the cluster in KUBECONFIG")?;
        let namespace_given = namespace.is_some();
        let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_owned());
        Ok(Self {
            client,
            namespace,
            namespace_given,
        })
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The Job, or an error that says which one is missing where.
    async fn job(&self, name: &str) -> anyhow::Result<Job> {
        self.api::<Job>()
            .get_opt(name)
            .await
            .map_err(api_error)
            .with_context(|| format!("reading Job {name:?} in namespace {:?}", self.namespace))?
            .with_context(|| format!("no Job {name:?} in namespace {:?}", self.namespace))
    }

    /// The job's versions, newest first: its ControllerRevisions `<job>-v<N>` (a
    /// namesake's left from a deleted Job of the same name is not its).
    async fn versions(&self, job: &Job) -> anyhow::Result<Vec<Version>> {
        let name = job.name_any();
        let selector = format!("{}={name}", labels::JOB);
        let mut versions: Vec<Version> = self
            .api::<ControllerRevision>()
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(api_error)
            .with_context(|| {
                format!("listing the versions of Job {name:?} (ControllerRevisions {selector})")
            })?
            .items
            .into_iter()
            .filter(|r| r.name_any() == names::revision(&name, r.revision))
            .filter(|r| {
                r.owner_references()
                    .iter()
                    .any(|o| Some(&o.uid) == job.metadata.uid.as_ref())
            })
            .map(Version::from)
            .collect();
        versions.sort_by_key(|v| std::cmp::Reverse(v.number));
        Ok(versions)
    }
}

/// One recorded version of a job's spec.
pub struct Version {
    number: i64,
    stable: bool,
    created: Option<Time>,
    /// None when the revision's data is not a spec this CLI reads.
    spec: Option<JobSpec>,
}

impl From<ControllerRevision> for Version {
    fn from(revision: ControllerRevision) -> Self {
        Self {
            number: revision.revision,
            stable: revision.labels().get(labels::STABLE).is_some_and(|v| v == "true"),
            created: revision.metadata.creation_timestamp.clone(),
            spec: revision.data.and_then(|data| serde_json::from_value(data.0).ok()),
        }
    }
}

/// An error from the API server as its message and reason: kube's own text repeats
/// the whole Status after them.
fn api_error(error: kube::Error) -> anyhow::Error {
    match error {
        kube::Error::Api(status) => anyhow::anyhow!("{} ({})", status.message, status.reason),
        other => other.into(),
    }
}

/// Columns left-aligned and two spaces apart, as `nomad` prints its tables.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `Key = value` lines with the `=` aligned, as `nomad` prints an object's fields.
fn fields(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(key, value)| format!("{key:<width$} = {value}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How long ago, kubectl's way: `45s`, `12m`, `3h`, `5d`.
fn age(time: Option<&Time>) -> String {
    let Some(time) = time else { return "-".to_owned() };
    let seconds = Timestamp::now()
        .as_second()
        .saturating_sub(time.0.as_second())
        .max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// A point in time as RFC 3339 in UTC.
fn timestamp(time: Option<&Time>) -> String {
    time.map_or_else(
        || "-".to_owned(),
        |t| t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}

fn optional<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// `KEY=VALUE`, as `--meta` takes it.
fn key_value(given: &str) -> anyhow::Result<(String, String)> {
    match given.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => bail!("{given:?}: expected KEY=VALUE"),
    }
}

/// A file's text, or standard input's for `-` (plan and convert take either).
fn read_input(file: &std::path::Path) -> anyhow::Result<String> {
    if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("reading standard input")?;
        Ok(text)
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns() {
        let rows = vec![
            vec!["frontend".to_owned(), "3".to_owned(), "".to_owned()],
            vec!["db".to_owned(), "10".to_owned(), "x".to_owned()],
        ];
        assert_eq!(
            table(&["Task Group", "Desired", "Note"], &rows),
            "Task Group  Desired  Note\nfrontend    3\ndb          10       x"
        );
    }

    #[test]
    fn fields_align_their_equals_signs() {
        assert_eq!(
            fields(&[("ID", "web".into()), ("Priority", "50".into())]),
            "ID       = web\nPriority = 50"
        );
    }

    #[test]
    fn ages_read_like_kubectl() {
        let ago = |s: i64| Time(Timestamp::from_second(Timestamp::now().as_second() - s).unwrap());
        assert_eq!(age(Some(&ago(5))), "5s");
        assert_eq!(age(Some(&ago(600))), "10m");
        assert_eq!(age(Some(&ago(3 * 3600))), "3h");
        assert_eq!(age(Some(&ago(3 * 86400))), "3d");
        assert_eq!(age(None), "-");
    }

    #[test]
    fn meta_is_key_equals_value() {
        assert_eq!(key_value("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert_eq!(key_value("a=").unwrap(), ("a".into(), "".into()));
        assert!(key_value("=b").is_err());
        assert!(key_value("ab").is_err());
    }
}
