//! capstan-sidecar: the binary injected beside applications. It will carry three roles
//! as subcommands: `proxy` (mTLS, intentions), `init` (transparent-proxy redirect) and
//! `agent` (secrets into files), arriving with the mesh and secrets issues. Today it
//! serves its admin endpoints and stops cleanly on SIGTERM, the contract every role
//! keeps.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use capstan_telemetry::{Health, LoggingArgs};
use clap::Parser;
use std::net::SocketAddr;

#[derive(Parser, Debug)]
#[command(name = "capstan-sidecar", version, about)]
struct Args {
    #[command(flatten)]
    logging: LoggingArgs,
    /// Where /healthz and /metrics are served (loopback: the pod's own network only).
    #[arg(long, env = "CAPSTAN_SIDECAR_ADMIN_ADDR", default_value = "127.0.0.1:15020")]
    admin_addr: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.logging.init();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "Starting capstan-sidecar");
    let registry = capstan_telemetry::registry("capstan_sidecar");
    capstan_telemetry::serve_until_shutdown(args.admin_addr, registry, Health::default()).await?;
    Ok(())
}
