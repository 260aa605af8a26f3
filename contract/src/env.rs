//! Environment variables the injector writes into pods and the sidecar's and agent's clap
//! arguments read (`#[arg(env = contract::env::proxy::CA_URL)]`).

/// The mesh sidecar (proxy) container.
pub mod proxy {
    pub const NAMESPACE: &str = "CAPSTAN_NAMESPACE";
    pub const SERVICE_ACCOUNT: &str = "CAPSTAN_SERVICE_ACCOUNT";
    pub const POD_NAME: &str = "CAPSTAN_POD_NAME";
    pub const TOKEN_FILE: &str = "CAPSTAN_TOKEN_FILE";
    pub const CA_URL: &str = "CAPSTAN_CA_URL";
    pub const CA_BUNDLE: &str = "CAPSTAN_CA_BUNDLE";
    pub const TRUST_DOMAIN: &str = "CAPSTAN_TRUST_DOMAIN";
    pub const DEFAULT_ACTION: &str = "CAPSTAN_DEFAULT_ACTION";
    pub const CONTROL_NAMESPACE: &str = "CAPSTAN_CONTROL_NAMESPACE";
    pub const INBOUND_PORT: &str = "CAPSTAN_INBOUND_PORT";
    pub const OUTBOUND_PORT: &str = "CAPSTAN_OUTBOUND_PORT";
    pub const ADMIN_ADDR: &str = "CAPSTAN_ADMIN_ADDR";
    pub const APP_PORT: &str = "CAPSTAN_APP_PORT";
    pub const APP_PROBES: &str = "CAPSTAN_APP_PROBES";
    pub const UPSTREAMS: &str = "CAPSTAN_UPSTREAMS";
}

/// The secrets agent (init and sidecar) container.
pub mod agent {
    pub const ENGINE_URL: &str = "CAPSTAN_AGENT_ENGINE_URL";
    pub const ROLE: &str = "CAPSTAN_AGENT_ROLE";
    pub const TOKEN_FILE: &str = "CAPSTAN_AGENT_TOKEN_FILE";
    pub const CA_BUNDLE: &str = "CAPSTAN_AGENT_CA_BUNDLE";
    pub const DIR: &str = "CAPSTAN_AGENT_DIR";
    pub const SECRETS: &str = "CAPSTAN_AGENT_SECRETS";
    pub const ADMIN_ADDR: &str = "CAPSTAN_AGENT_ADMIN_ADDR";
    pub const INIT_ONLY: &str = "CAPSTAN_AGENT_INIT_ONLY";
    // Read by the agent, not written by the injector: set by hand on a container (the
    // agent's own pod also gets `proxy::NAMESPACE` and `proxy::POD_NAME` for its logs).
    pub const AUTH_MOUNT: &str = "CAPSTAN_AGENT_AUTH_MOUNT";
    pub const CA_BUNDLE_FILE: &str = "CAPSTAN_AGENT_CA_BUNDLE_FILE";
    pub const POLL_INTERVAL: &str = "CAPSTAN_AGENT_POLL_INTERVAL";

    /// Not a variable: the directory the injector mounts the agent's files at in every
    /// container and the agent renders into by default (the jobs compiler gives it to
    /// tasks as Nomad's NOMAD_SECRETS_DIR).
    pub const SECRETS_DIR: &str = "/capstan/secrets";
}
