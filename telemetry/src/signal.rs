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

/// A binary's stop signal, shared by all its parts: it turns on at SIGTERM or SIGINT
/// (or [`Stop::stop`]), and every loop races its work against [`Stop::stopped`].
#[derive(Clone, Debug)]
pub struct Stop {
    tx: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    rx: tokio::sync::watch::Receiver<bool>,
}

impl Stop {
    /// A stop signal only [`Stop::stop`] turns on (the end of a leader's term, say).
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        let (tx, rx) = tokio::sync::watch::channel(false);
        Self {
            tx: std::sync::Arc::new(tx),
            rx,
        }
    }

    /// A stop signal that turns on when the process is asked to stop.
    pub fn on_signal() -> Self {
        let stop = Self::new();
        let signalled = stop.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            signalled.stop();
        });
        stop
    }

    pub fn stop(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_stopped(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once the stop is on; owns what it needs, so it can be handed to a task.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }
}
