//! `capstan job` (issue 17) end to end: the real `capstan` binary against the real API
//! server, the webhook and, for what reads the controller's work, a real
//! capstan-controller. e2e_jobs.rs checks what promote, revert and dispatch do to the
//! running job; this file checks what the commands print, refuse and write.

use anyhow::{Context as _, Result, ensure};
use base64::Engine as _;
use capstan_crds::jobs::Job;
use capstan_tests::{jobs::*, *};
use kube::{Api, ResourceExt as _};
use serde_json::{Value, json};
use std::{path::PathBuf, process::Command};

/// What `capstan ARGS` did: its exit code, standard output and standard error.
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn capstan(args: &[&str]) -> Result<Ran> {
    let out = Command::new(bin("capstan")).args(args).output()?;
    Ok(Ran {
        code: out.status.code().context("capstan was killed")?,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `ran` exited with `code` and its output has every one of `lines`.
fn expect(ran: &Ran, code: i32, lines: &[&str]) -> Result<()> {
    ensure!(ran.code == code, "expected exit {code}:\n{ran}");
    for line in lines {
        ensure!(
            ran.stdout.contains(line) || ran.stderr.contains(line),
            "{line:?} missing:\n{ran}"
        );
    }
    Ok(())
}

/// A line of `capstan job status`'s header: the keys are aligned to the longest,
/// "Running Version".
fn header(key: &str, value: &str) -> String {
    format!("{key:<15} = {value}")
}

/// A file of the test's that is removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(ns: &str, name: &str, text: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("{ns}-{name}"));
        std::fs::write(&path, text)?;
        Ok(Self(path))
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A service job of one group `web` whose single task runs `image`.
fn web(count: i32, image: &str, group: Value) -> Value {
    let mut group_spec = json!({"name": "web", "count": count, "tasks": [
        {"name": "app", "image": image, "resources": {"cpu": "100m", "memory": "64Mi"}}
    ]});
    if let (Value::Object(spec), Value::Object(extra)) = (&mut group_spec, group) {
        spec.extend(extra);
    }
    job_manifest(
        "web",
        json!({
            "type": "service",
            "update": {"canary": 1, "maxParallel": 2, "minHealthyTime": "1s",
                       "healthyDeadline": "10s", "progressDeadline": "20s"},
            "groups": [group_spec],
        }),
    )
}

/// `capstan job plan` of each change: created, in place, destructive with its canary, no
/// change; refusals by the schema's CEL and by the webhook come back from the dry run;
/// nothing is stored by a plan. `capstan job convert` output plans as a new Job.
#[tokio::test]
async fn plan_shows_each_change_from_a_server_side_dry_run() -> Result<()> {
    let client = client().await;
    let ns = TestNamespace::new(&client, "e2e-jobs-cli-plan").await;
    let _webhook = WebhookProcess::start(&client, &["--ca-url", "https://127.0.0.1:8200"]).await?;
    let plan = |manifest: &Value| -> Result<Ran> {
        let file = TempFile::new(&ns.name, "web.yaml", &serde_yaml_ng::to_string(manifest)?)?;
        capstan(&["job", "plan", file.path(), "-n", &ns.name])
    };

    let v1 = web(2, "app:1", json!({}));
    expect(
        &plan(&v1)?,
        1,
        &[
            "+ Job: \"web\"",
            "+ Task Group: \"web\" (create, count 2)",
            "The API server accepts the Job",
        ],
    )?;
    let jobs: Api<Job> = jobs_api(&client, &ns.name);
    ensure!(jobs.get_opt("web").await?.is_none(), "a plan stores nothing");

    apply_job(&ns.name, &v1)?;
    expect(
        &plan(&v1)?,
        0,
        &["  Job: \"web\"", "  Task Group: \"web\" (no change, count 2)"],
    )?;
    expect(
        &plan(&web(3, "app:1", json!({})))?,
        1,
        &[
            "+/- Task Group: \"web\" (in-place update, count 2 => 3)",
            "    +/- count: 2 => 3",
        ],
    )?;
    expect(
        &plan(&web(2, "app:2", json!({})))?,
        1,
        &[
            "+/- Task Group: \"web\" (create/destroy update, count 2, 1 canary)",
            "    +/- tasks[app].image: \"app:1\" => \"app:2\"",
        ],
    )?;

    // The schema's CEL rule, then the webhook (a regexp that does not compile).
    expect(
        &plan(&web(2, "app:1", json!({"update": {"canary": 3}})))?,
        2,
        &[
            "the API server refuses Job \"web\"",
            "more canaries than the group's count",
        ],
    )?;
    let bad_regexp =
        json!({"constraints": [{"attribute": "${meta.rack}", "operator": "regexp", "value": "(r1"}]});
    expect(
        &plan(&web(2, "app:1", bad_regexp))?,
        2,
        &[
            "the API server refuses Job \"web\"",
            "spec.groups[0].constraints[0].value",
        ],
    )?;
    // A misspelled field would be dropped by the server and plan as no change.
    expect(
        &plan(&web(2, "app:1", json!({"cuont": 3})))?,
        2,
        &["unknown fields", "spec.groups[web].cuont"],
    )?;
    ensure!(
        jobs.get("web").await?.spec.groups[0].count == 2,
        "no plan changed the stored Job"
    );

    // A jobspec converted (all but its artifact) plans as a new Job the server accepts.
    let jobspec = TempFile::new(&ns.name, "cache.nomad.hcl", CACHE_JOBSPEC)?;
    expect(
        &capstan(&["job", "convert", jobspec.path()])?,
        1,
        &[
            &format!("{}:12: job.group[redis].task[redis].artifact", jobspec.path()),
            "not written",
        ],
    )?;
    let converted = TempFile::new(&ns.name, "cache.yaml", "")?;
    let ran = capstan(&[
        "job",
        "convert",
        jobspec.path(),
        "--allow-partial",
        "--var",
        "image=redis:8",
        "-o",
        converted.path(),
    ])?;
    expect(&ran, 0, &["untranslated:"])?;
    expect(
        &capstan(&["job", "plan", converted.path(), "-n", &ns.name])?,
        1,
        &["+ Job: \"cache\"", "+ Task Group: \"redis\" (create, count 2)"],
    )?;
    Ok(())
}

/// A Nomad jobspec with a variable and a block Capstan does not translate (line 12).
const CACHE_JOBSPEC: &str = r#"variable "image" {
  default = "redis:7"
}
job "cache" {
  group "redis" {
    count = 2
    task "redis" {
      driver = "docker"
      config {
        image = var.image
      }
      artifact {
        source = "https://example.com/seed.tgz"
      }
    }
  }
}
"#;

/// `capstan job dispatch` creates the child with the meta and the payload, owned by and
/// labelled with its parent, and prints its name; it refuses a parent that is not
/// parameterized and missing meta before sending anything, and the webhook refuses a
/// child without its required meta however it is created.
#[tokio::test]
async fn dispatch_creates_a_child_with_meta_and_payload() -> Result<()> {
    let client = client().await;
    let ns = TestNamespace::new(&client, "e2e-jobs-cli-dispatch").await;
    let _webhook = WebhookProcess::start(&client, &["--ca-url", "https://127.0.0.1:8200"]).await?;
    let n = ns.name.as_str();
    apply_job(
        n,
        &job_manifest(
            "report",
            json!({
                "type": "batch",
                "parameterized": {"payload": "optional", "metaRequired": ["customer"], "metaOptional": ["format"]},
                "groups": [{"name": "render", "tasks": [
                    {"name": "render", "image": "report:1", "dispatchPayload": {"file": "input.json"}}
                ]}],
            }),
        ),
    )?;
    apply_job(n, &web(1, "app:1", json!({})))?;
    let payload = TempFile::new(n, "input.json", r#"{"rows": 3}"#)?;

    let ran = capstan(&[
        "job",
        "dispatch",
        "report",
        "-n",
        n,
        "--meta",
        "customer=acme",
        "--meta",
        "format=pdf",
        "--payload",
        payload.path(),
    ])?;
    expect(&ran, 0, &[])?;
    let name = ran.stdout.trim();
    let suffix = name.strip_prefix("report-").context(ran.to_string())?;
    ensure!(
        suffix.len() == 10
            && suffix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
        "{name}"
    );
    let jobs = jobs_api(&client, n);
    let child = jobs.get(name).await?;
    let dispatch = child.spec.dispatch.clone().context("spec.dispatch")?;
    ensure!(
        dispatch.parent == "report" && child.spec.parameterized.is_none(),
        "{dispatch:?}"
    );
    ensure!(
        dispatch.meta
            == [
                ("customer".into(), "acme".into()),
                ("format".into(), "pdf".into())
            ]
            .into(),
        "{dispatch:?}"
    );
    let sent = base64::engine::general_purpose::STANDARD.decode(dispatch.payload.context("a payload")?)?;
    ensure!(sent == br#"{"rows": 3}"#, "{sent:?}");
    ensure!(child.labels().get(PARENT_LABEL).map(String::as_str) == Some("report"));
    let parent_uid = jobs.get("report").await?.uid();
    ensure!(
        child
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == parent_uid.as_ref() && o.controller != Some(true)),
        "{:?}",
        child.owner_references()
    );

    let before = jobs.list(&Default::default()).await?.items.len();
    expect(
        &capstan(&["job", "dispatch", "report", "-n", n, "--meta", "format=pdf"])?,
        2,
        &["cannot dispatch Job \"report\"", "\"customer\" is required"],
    )?;
    expect(
        &capstan(&["job", "dispatch", "web", "-n", n])?,
        2,
        &["Job \"web\" is not parameterized"],
    )?;
    ensure!(
        jobs.list(&Default::default()).await?.items.len() == before,
        "a refused dispatch creates nothing"
    );
    // Past the CLI, the webhook holds the same rule.
    let mut sneaked = serde_json::to_value(&child)?;
    sneaked["metadata"] = json!({"name": "report-sneaked"});
    sneaked["spec"]["dispatch"]["meta"] = json!({"format": "pdf"});
    let refused = apply_refused(n, &sneaked)?;
    ensure!(refused.contains("customer"), "{refused}");
    Ok(())
}

/// With the controller: `status` prints the summary, the deployment waiting for its
/// canary, the versions and the allocations; `promote --wait` returns once promoted and
/// then finds nothing to promote; `history` shows what version 2 changed; `revert`
/// refuses an unknown version and the spec already stored, and stores version 1's.
#[tokio::test]
async fn status_promote_history_and_revert_read_the_controllers_work() -> Result<()> {
    let client = client().await;
    let controller = ControllerProcess::sole(&client, "e2e-jobs-cli").await?;
    let ns = TestNamespace::new(&client, "e2e-jobs-cli").await;
    let n = ns.name.as_str();
    let failed =
        |e: anyhow::Error| anyhow::anyhow!("{e}\nthe controller's log:\n{}", tail(&controller.logs(), 40));
    let wait = |what: &'static str, check: fn(&Job) -> bool| {
        let client = client.clone();
        async move { wait_job(&client, n, "web", what, STEP, check).await }
    };

    expect(
        &capstan(&["job", "status", "web", "-n", n])?,
        2,
        &[&format!("no Job \"web\" in namespace \"{n}\"")],
    )?;
    apply_job(n, &web(2, "app:1", json!({})))?;
    wait("version 1 stable with 2 running", |j| {
        let s = status_of(j);
        s.stable_version == Some(1) && s.running == 2
    })
    .await
    .map_err(failed)?;
    expect(
        &capstan(&["job", "promote", "web", "-n", n])?,
        2,
        &["Job \"web\" has no deployment awaiting promotion"],
    )?;
    apply_job(n, &web(2, "app:2", json!({})))?;
    wait("the canary of version 2 healthy", |j| {
        status_of(j)
            .deployment
            .is_some_and(|d| d.version == 2 && d.canaries_healthy == 1 && !d.promoted)
    })
    .await
    .map_err(failed)?;

    let status = capstan(&["job", "status", "web", "-n", n])?;
    expect(
        &status,
        0,
        &[
            &header("ID", "web"),
            &header("Type", "service"),
            &header("Version", "2"),
            &header("Stable Version", "1"),
            "Task Group  Datacenter  Desired  Placed  Running  Healthy  Unhealthy  Failed  Complete  Lost",
            "Latest Deployment",
            "Canaries    = 1 placed, 1 healthy, 1 desired",
            "Promoted    = false",
            "Version  Stable  Running  Submitted",
        ],
    )?;
    let section = |name: &str| {
        status
            .stdout
            .split(&format!("\n{name}\n"))
            .nth(1)
            .unwrap_or_default()
            .to_owned()
    };
    let versions: Vec<Vec<String>> = section("Versions")
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(|l| l.split_whitespace().take(2).map(str::to_owned).collect())
        .collect();
    ensure!(versions == [["2", "false"], ["1", "true"]], "{status}");
    let allocations: Vec<String> = section("Allocations")
        .lines()
        .skip(1)
        .map(str::to_owned)
        .collect();
    let live = live_pods(&client, n, "web").await?;
    ensure!(
        allocations.len() == live.len() && live.len() == 3,
        "2 of version 1 and the canary:\n{status}"
    );
    ensure!(
        allocations
            .iter()
            .all(|l| l.contains(" web ") && (l.contains(" dc1 ") || l.contains(" dc2 "))),
        "each allocation with its group and datacenter:\n{status}"
    );
    ensure!(
        allocations
            .iter()
            .filter(|l| l.split_whitespace().nth(2) == Some("2"))
            .count()
            == 1,
        "one allocation of version 2:\n{status}"
    );

    expect(
        &capstan(&["job", "promote", "web", "-n", n, "--version", "1"])?,
        2,
        &["the deployment that does is version 2"],
    )?;
    expect(
        &capstan(&["job", "promote", "web", "-n", n, "--wait", "--timeout", "30"])?,
        0,
        &["promoting the canaries of version 2", "version 2 promoted"],
    )?;
    ensure!(jobs_api(&client, n).get("web").await?.spec.promote == Some(2));
    wait("version 2 stable", |j| status_of(j).stable_version == Some(2))
        .await
        .map_err(failed)?;

    expect(
        &capstan(&["job", "history", "web", "-n", n])?,
        0,
        &[
            "Version     = 2\nStable      = true\nRunning     = true",
            "Diff        = against version 1\n  +/- groups[web].tasks[app].image: \"app:1\" => \"app:2\"",
            "Version     = 1\nStable      = false",
        ],
    )?;

    expect(
        &capstan(&["job", "revert", "web", "7", "-n", n])?,
        2,
        &["Job \"web\" has no version 7 (its versions: 2, 1)"],
    )?;
    expect(
        &capstan(&["job", "revert", "web", "2", "-n", n])?,
        2,
        &["nothing to revert"],
    )?;
    expect(
        &capstan(&["job", "revert", "web", "1", "-n", n])?,
        0,
        &["reverted to the spec of version 1"],
    )?;
    let job = jobs_api(&client, n).get("web").await?;
    ensure!(
        job.spec.groups[0].tasks[0].image == "app:1" && job.spec.promote.is_none(),
        "{:?}",
        job.spec
    );
    wait("version 3 recorded", |j| status_of(j).version == Some(3))
        .await
        .map_err(failed)?;
    Ok(())
}
