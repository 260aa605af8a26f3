//! capstan-sidecar: the binary injected beside applications, one role per subcommand:
//! `proxy` (mTLS, intentions), `init` (transparent-proxy redirect); `agent` (secrets
//! into files) arrives with the secrets engine.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod init;
mod proxy;

use capstan_telemetry::LoggingArgs;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "capstan-sidecar", version, about)]
struct Args {
    #[command(flatten)]
    logging: LoggingArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The mTLS proxy: inbound listener enforcing intentions, outbound upstreams.
    Proxy(Box<proxy::args::ProxyArgs>),
    /// Sets up the transparent redirect in the pod's network namespace, then exits.
    Init(init::InitArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.logging.init();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "Starting capstan-sidecar");
    match args.command {
        Command::Proxy(proxy) => proxy::run(*proxy).await,
        Command::Init(init) => init::run(&init),
    }
}
