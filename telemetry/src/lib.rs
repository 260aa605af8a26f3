//! The operational edge every Capstan binary shares: logging, the admin server
//! (`/healthz`, `/metrics`) and the shutdown signal.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod admin;
mod logging;
mod signal;

pub use admin::{AdminServer, AdminTask, Health, serve_until_shutdown, spawn_admin};
pub use logging::{LogFormat, LoggingArgs};
pub use prometheus_client::registry::Registry;
pub use signal::{Stop, shutdown_signal};

/// Errors at the edge of a process: the admin listener could not bind or serve.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding the admin server to {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving the admin endpoints")]
    Serve(#[source] std::io::Error),
    #[error("the admin server's task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// A registry with the process's `build_info` already in it, so every binary's
/// `/metrics` says which version is running.
pub fn registry(prefix: &str) -> Registry {
    use prometheus_client::metrics::{family::Family, gauge::Gauge};
    let mut registry = Registry::with_prefix(prefix);
    let info = Family::<Vec<(String, String)>, Gauge>::default();
    info.get_or_create(&vec![(
        "version".to_owned(),
        env!("CARGO_PKG_VERSION").to_owned(),
    )])
    .set(1);
    registry.register("build_info", "The running Capstan version", info);
    registry
}
