//! What every reconciler is handed: built once per leadership term.

use crate::{leader::Leadership, metrics::Metrics};
use kube::{Client, runtime::events::Recorder};
use std::time::Duration;

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub leadership: Leadership,
    pub config: Config,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// How often an object is reconciled again with nothing changed: the backstop that
    /// makes state converge even if a watch event was lost.
    pub resync: Duration,
    /// The namespace Capstan runs in (the leader Lease, the engine's roots ConfigMap,
    /// the SecretSync HMAC key).
    pub namespace: String,
    /// The secrets engine's HTTPS API (Vault-compatible).
    pub engine_url: String,
    /// The ConfigMap (in `namespace`) whose `roots.pem` the engine's certificate chains to.
    pub roots_configmap: String,
}
