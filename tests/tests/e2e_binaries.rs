//! Every binary's operational contract: it starts, logs (JSON when asked), serves
//! /healthz and /metrics in the Prometheus text format, and exits 0 on SIGTERM.

use capstan_tests::*;
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

async fn check_binary(
    name: &str,
    subcommand: &[&str],
    prefix: &str,
    extra_env: &[(&str, String)],
    extra_args: &[&str],
) -> anyhow::Result<()> {
    for format in ["json", "text"] {
        let admin = free_port();
        let log = std::env::temp_dir().join(format!("capstan-e2e-bin-{name}-{format}.log"));
        let mut command = Command::new(bin(name));
        command
            .args(subcommand)
            .args(["--log-format", format, "--admin-addr", &admin.to_string()])
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        for (key, value) in extra_env {
            command.env(key, value);
        }
        let mut child = command.spawn()?;
        let health = eventually(Duration::from_secs(20), &format!("{name} /healthz"), || async {
            http_get(admin, "/healthz").await.ok()
        })
        .await?;
        assert_eq!(health, (200, "ok\n".to_owned()));
        let (code, metrics) = http_get(admin, "/metrics").await?;
        assert_eq!(code, 200);
        let build_info = format!(
            "{prefix}_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(
            metrics.contains(&build_info),
            "{name}: no {build_info} in\n{metrics}"
        );
        assert!(
            metrics.trim_end().ends_with("# EOF"),
            "{name}: not OpenMetrics text:\n{metrics}"
        );

        let stopped = Instant::now();
        run("kill", &["-TERM", &child.id().to_string()])?;
        let status = eventually(Duration::from_secs(10), &format!("{name} to exit"), || {
            let status = child.try_wait().ok().flatten();
            async move { status }
        })
        .await?;
        assert_eq!(status.code(), Some(0), "{name} on SIGTERM: {status}");
        assert!(stopped.elapsed() < Duration::from_secs(10));

        let text = std::fs::read_to_string(&log)?;
        let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
        assert!(lines.len() >= 2, "{name} logged nothing:\n{text}");
        for line in &lines {
            let parsed = serde_json::from_str::<serde_json::Value>(line);
            match format {
                "json" => assert!(
                    parsed.is_ok_and(|v| v["level"].is_string()),
                    "{name}: not a JSON log line: {line}"
                ),
                _ => assert!(parsed.is_err(), "{name}: JSON where text was asked for: {line}"),
            }
        }
        assert!(text.contains("Shutdown requested"), "{name}:\n{text}");
    }
    Ok(())
}

#[tokio::test]
async fn webhook_serves_admin_endpoints_and_stops_on_sigterm() -> anyhow::Result<()> {
    check_binary("capstan-webhook", &[], "capstan_webhook", &[], &[]).await
}

#[tokio::test]
async fn sidecar_serves_admin_endpoints_and_stops_on_sigterm() -> anyhow::Result<()> {
    // The proxy serves its admin endpoints while it is still asking the CA for a
    // certificate (here a CA that does not answer), and stops cleanly all the same.
    check_binary(
        "capstan-sidecar",
        &["proxy"],
        "capstan_sidecar",
        &[],
        &[
            "--namespace",
            "default",
            "--service-account",
            "default",
            "--ca-url",
            "https://127.0.0.1:9",
            "--ca-bundle",
            "not yet",
        ],
    )
    .await
}

#[tokio::test]
async fn controller_serves_admin_endpoints_and_stops_on_sigterm() -> anyhow::Result<()> {
    let client = client().await;
    install_chart();
    clear_lease(&client).await;
    let kubeconfig = serviceaccount_kubeconfig(&client, SYSTEM_NAMESPACE, CONTROLLER_SA).await?;
    let env = [("KUBECONFIG", kubeconfig.to_string_lossy().into_owned())];
    check_binary(
        "capstan-controller",
        &[],
        "capstan_controller",
        &env,
        &["--identity", "binaries"],
    )
    .await
}

/// Issue 15, item 11: the image must hold every program Capstan's binaries start, or an
/// injected pod fails on a real cluster (capstan-init ran iptables in an image without
/// it). Every `Command::new` outside tests, benches and fuzz targets names its program
/// as a string literal, or, when the program is a setting, lists its defaults in an
/// `// image-programs: a b` comment just above; each must be installed by the final
/// stage of the Dockerfile (a file it copies, or a Debian package it installs).
#[test]
fn the_image_has_every_program_the_code_runs() {
    let root = repo_root();
    let mut required: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut unnamed = Vec::new();
    for file in shipped_sources(&root) {
        let text = std::fs::read_to_string(&file).unwrap();
        // Unit tests (a trailing `mod tests`) run in CI, not in the image.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let lines: Vec<&str> = code.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some(at) = line.find("Command::new(") else {
                continue;
            };
            let argument = line[at + "Command::new(".len()..].trim_start();
            let site = format!("{}:{}", file.strip_prefix(&root).unwrap().display(), i + 1);
            let programs: Vec<String> = if let Some(literal) = argument.strip_prefix('"') {
                vec![literal.split('"').next().unwrap_or_default().to_owned()]
            } else {
                lines[i.saturating_sub(3)..i]
                    .iter()
                    .find_map(|l| l.split_once("// image-programs:"))
                    .map(|(_, list)| {
                        list.split('(')
                            .next()
                            .unwrap_or_default()
                            .split_whitespace()
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default()
            };
            if programs.is_empty() {
                unnamed.push(site.clone());
            }
            for program in programs {
                required.entry(program).or_default().push(site.clone());
            }
        }
    }
    assert!(
        unnamed.is_empty(),
        "these start a program the image must hold, but name none: add an \
         `// image-programs: ...` comment above each: {unnamed:?}"
    );
    assert!(
        required.contains_key("iptables") && required.contains_key("ip6tables"),
        "the scan missed capstan-init's iptables and ip6tables: {required:?}"
    );

    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let provided = image_programs(&dockerfile);
    let missing: Vec<String> = required
        .iter()
        .filter(|(program, _)| !provided.contains(program.as_str()))
        .map(|(program, sites)| format!("{program} (run at {})", sites.join(", ")))
        .collect();
    assert!(
        missing.is_empty(),
        "the image lacks programs the code runs: {missing:?}; the final stage provides {provided:?}"
    );
}

/// The Rust sources of the crates whose binaries the image holds (everything but the
/// test crate), without tests, benches, examples and fuzz targets.
fn shipped_sources(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut dirs: Vec<std::path::PathBuf> = [
        "controllers",
        "webhook",
        "engine",
        "sidecar",
        "mesh",
        "crds",
        "telemetry",
        "cli",
    ]
    .iter()
    .map(|d| root.join(d).join("src"))
    .collect();
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    assert!(
        out.len() > 20,
        "found only {} sources under {}",
        out.len(),
        root.display()
    );
    out
}

/// What the Dockerfile's final stage puts in the image: the files it copies, and the
/// programs of the Debian packages it installs.
fn image_programs(dockerfile: &str) -> std::collections::BTreeSet<String> {
    // What Debian 12's packages install as commands (iptables: the alternatives its
    // postinst registers, both backends).
    const PACKAGES: &[(&str, &[&str])] = &[(
        "iptables",
        &[
            "iptables",
            "ip6tables",
            "iptables-save",
            "iptables-restore",
            "ip6tables-save",
            "ip6tables-restore",
            "iptables-nft",
            "ip6tables-nft",
            "iptables-legacy",
            "ip6tables-legacy",
        ],
    )];
    let final_stage = dockerfile
        .rsplit_once("\nFROM ")
        .map_or(dockerfile, |(_, last)| last);
    // Continuation lines joined: one instruction per line.
    let joined = final_stage.replace("\\\n", " ");
    let mut out = std::collections::BTreeSet::new();
    for line in joined.lines().map(str::trim) {
        if let Some(copy) = line.strip_prefix("COPY ") {
            let words: Vec<&str> = copy.split_whitespace().filter(|w| !w.starts_with("--")).collect();
            for source in &words[..words.len().saturating_sub(1)] {
                if source.trim_end_matches('/') == "/out" {
                    // The build stage's /out: the binaries it builds.
                    out.extend(
                        [
                            "capstan-controller",
                            "capstan-webhook",
                            "capstan-engine",
                            "capstan-sidecar",
                        ]
                        .map(str::to_owned),
                    );
                } else if let Some(name) = source.rsplit('/').next() {
                    out.insert(name.to_owned());
                }
            }
        }
        if line.starts_with("RUN ") {
            for command in line.split("&&") {
                let Some((_, packages)) = command.split_once("apt-get install") else {
                    continue;
                };
                for package in packages.split_whitespace().filter(|w| !w.starts_with('-')) {
                    let (_, programs) = PACKAGES
                        .iter()
                        .find(|(name, _)| *name == package)
                        .unwrap_or_else(|| panic!("the Dockerfile installs {package}: say what it provides"));
                    out.extend(programs.iter().map(|p| (*p).to_owned()));
                }
            }
        }
    }
    out
}
