//! `capstan job convert` (issue 17, point 4) end to end: the real `capstan` binary
//! converts each committed jobspec fixture (jobspec/tests/fixtures: HCL2 with variables,
//! locals and functions, and the API JSON of `nomad job run -output`), and the YAML it
//! writes is applied with a server-side dry run on the real API server, through the
//! Job's schema and CEL rules and the validating webhook (run as a process, as in
//! e2e_jobs_admission.rs). A conversion that leaves a block out says so with its line
//! and, without `--allow-partial`, writes nothing and exits 1.

use anyhow::{Context as _, Result, ensure};
use capstan_tests::*;
use std::process::Command;

/// What `capstan ARGS` did: its exit code, standard output and standard error.
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

fn capstan(args: &[&str]) -> Result<Ran> {
    let out = Command::new(bin("capstan")).args(args).output()?;
    Ok(Ran {
        code: out.status.code().context("capstan was killed")?,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The fixtures and whether each converts with nothing left out.
const FIXTURES: &[(&str, bool)] = &[
    ("service.nomad.hcl", false),
    ("periodic.nomad.hcl", true),
    ("parameterized.nomad.hcl", true),
    ("system.nomad.hcl", false),
    ("sysbatch.nomad.hcl", true),
    ("api.json", false),
];

#[tokio::test]
async fn committed_jobspecs_convert_and_apply_with_a_server_side_dry_run() -> Result<()> {
    let client = client().await;
    let _webhook = WebhookProcess::start(&client, &[]).await?;
    let ns = TestNamespace::new(&client, "e2e-jobspec").await;
    let fixtures = repo_root().join("jobspec/tests/fixtures");
    for (name, complete) in FIXTURES {
        let file = fixtures.join(name);
        let file = file.to_str().context("a UTF-8 path")?;
        let ran = capstan(&["job", "convert", file, "--allow-partial", "-n", &ns.name])?;
        ensure!(
            ran.code == 0,
            "{name}: expected exit 0 (--allow-partial), got {}:\n{}",
            ran.code,
            ran.stderr
        );
        ensure!(
            ran.stderr.contains("untranslated:") != *complete,
            "{name}: expected {} untranslated blocks:\n{}",
            if *complete { "no" } else { "some" },
            ran.stderr
        );
        let (applied, out) = kubectl_stdin(
            &["apply", "--dry-run=server", "-n", &ns.name, "-f", "-"],
            &ran.stdout,
        );
        ensure!(
            applied && out.contains("(server dry run)"),
            "{name}: the converted Job does not apply:\n{out}\n--- the Job\n{}",
            ran.stdout
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_partial_conversion_names_each_block_with_its_line_and_writes_nothing() -> Result<()> {
    let file = repo_root().join("jobspec/tests/fixtures/service.nomad.hcl");
    let file = file.to_str().context("a UTF-8 path")?;
    let ran = capstan(&["job", "convert", file])?;
    ensure!(
        ran.code == 1 && ran.stdout.is_empty(),
        "expected exit 1 and no YAML:\n{}\n{}",
        ran.stdout,
        ran.stderr
    );
    for line in [
        "service.nomad.hcl:177: job.group[frontend].task[server].artifact",
        "service.nomad.hcl:181: job.group[frontend].task[server].logs",
        "service.nomad.hcl:140: job.group[frontend].ephemeral_disk",
    ] {
        ensure!(ran.stderr.contains(line), "{line:?} missing:\n{}", ran.stderr);
    }

    // Malformed input is refused with its line and column, exit 2.
    let dir = tempfile_dir()?;
    let bad = dir.join("bad.nomad.hcl");
    std::fs::write(&bad, "job \"a\" {\n  group \"g\" {\n    count = = 1\n  }\n}\n")?;
    let ran = capstan(&["job", "convert", bad.to_str().context("a UTF-8 path")?])?;
    ensure!(
        ran.code == 2 && ran.stderr.contains("line 3, column"),
        "expected a refusal naming line 3:\n{}",
        ran.stderr
    );
    Ok(())
}

/// A scratch directory of this test's own.
fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("capstan-e2e-jobspec-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
