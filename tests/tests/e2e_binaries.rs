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
