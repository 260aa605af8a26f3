//! capstan-sidecar: the binary injected beside applications, one role per subcommand:
//! `proxy` (mTLS, intentions), `init` (transparent-proxy redirect), `agent` (secrets
//! into files).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod agent;
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
    /// Renders secrets from the engine into files, renews and revokes their leases.
    Agent(Box<agent::args::AgentArgs>),
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.logging.init();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "Starting capstan-sidecar");
    match args.command {
        Command::Proxy(proxy) => {
            // A sidecar shares its pod's CPU with the application: by default one thread
            // (less CPU per request and less memory than a work-stealing pool; Envoy's
            // sidecars are run with a small fixed concurrency for the same reason).
            let runtime = match usize::from(proxy.workers) {
                1 => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?,
                n => tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(n)
                    .enable_all()
                    .build()?,
            };
            runtime.block_on(proxy::run(*proxy))
        }
        Command::Init(init) => init::run(&init),
        // Two threads: the polls and renewals are small, and the app shares the CPU.
        Command::Agent(agent) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(agent::run(*agent)),
    }
}
