use std::io::IsTerminal;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON in a cluster (KUBERNETES_SERVICE_HOST is set) or when stderr is not a terminal,
    /// human-readable text otherwise.
    Auto,
    Text,
    Json,
}

/// The logging flags every binary takes.
#[derive(Clone, Debug, clap::Args)]
pub struct LoggingArgs {
    /// Log line format.
    #[arg(
        long,
        global = true,
        env = "CAPSTAN_LOG_FORMAT",
        value_enum,
        default_value = "auto"
    )]
    pub log_format: LogFormat,
    /// Which events to log, in tracing's EnvFilter syntax (RUST_LOG is read too).
    #[arg(long, global = true, env = "CAPSTAN_LOG", default_value = "info")]
    pub log_level: String,
}

impl LoggingArgs {
    /// Installs the global subscriber. Call once, first thing in `main`.
    pub fn init(&self) {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&self.log_level));
        let json = match self.log_format {
            LogFormat::Json => true,
            LogFormat::Text => false,
            LogFormat::Auto => {
                std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() || !std::io::stderr().is_terminal()
            }
        };
        let registry = tracing_subscriber::registry().with(filter);
        if json {
            registry
                .with(
                    fmt::layer()
                        .json()
                        .with_current_span(false)
                        .with_writer(std::io::stderr),
                )
                .init();
        } else {
            registry.with(fmt::layer().with_writer(std::io::stderr)).init();
        }
    }
}
