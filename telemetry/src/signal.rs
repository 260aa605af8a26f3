use tokio::signal::unix::{SignalKind, signal};

/// Resolves when the process is asked to stop: SIGTERM (the kubelet, `kill`) or SIGINT
/// (Ctrl-C). Every binary races its work against this and then shuts down in order.
pub async fn shutdown_signal() {
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "Shutdown requested");
}
