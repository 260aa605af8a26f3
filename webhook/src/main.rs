//! capstan-webhook: Capstan's admission webhooks.
//!
//! Sidecar and agent injection (mutating) and the ServiceIntentions checks the CRD
//! schema cannot express (validating) arrive with the mesh issue, together with the
//! serving certificate Capstan mints and rotates itself. Until then the chart registers
//! no webhook configuration, and this binary serves its admin endpoints so that its
//! Deployment, Service and probes are exercised as they will be used.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use capstan_telemetry::{Health, LoggingArgs};
use clap::Parser;
use std::net::SocketAddr;

#[derive(Parser, Debug)]
#[command(name = "capstan-webhook", version, about)]
struct Args {
    #[command(flatten)]
    logging: LoggingArgs,
    /// Where /healthz and /metrics are served.
    #[arg(long, env = "CAPSTAN_WEBHOOK_ADMIN_ADDR", default_value = "127.0.0.1:8081")]
    admin_addr: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.logging.init();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "Starting capstan-webhook");
    let registry = capstan_telemetry::registry("capstan_webhook");
    capstan_telemetry::serve_until_shutdown(args.admin_addr, registry, Health::default()).await?;
    Ok(())
}
