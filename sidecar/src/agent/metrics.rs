//! The agent's metrics (prefix `capstan_sidecar_agent_`). Labels are file names and
//! outcomes, never values, lease ids or tokens.

use capstan_telemetry::Registry;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `failed`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileLabels {
    pub file: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileResultLabels {
    pub file: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevocationLabels {
    /// `lease` or `token`.
    pub what: &'static str,
    pub result: &'static str,
}

#[derive(Clone)]
pub struct Metrics {
    pub logins: Family<ResultLabels, Counter>,
    pub token_renewals: Family<ResultLabels, Counter>,
    pub token_expiry: Gauge,
    pub renders: Family<FileResultLabels, Counter>,
    pub kv_polls: Family<ResultLabels, Counter>,
    pub credentials_issued: Family<FileResultLabels, Counter>,
    pub lease_renewals: Family<FileResultLabels, Counter>,
    pub lease_expiry: Family<FileLabels, Gauge>,
    pub revocations: Family<RevocationLabels, Counter>,
    pub ready: Gauge,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            logins: Family::default(),
            token_renewals: Family::default(),
            token_expiry: Gauge::default(),
            renders: Family::default(),
            kv_polls: Family::default(),
            credentials_issued: Family::default(),
            lease_renewals: Family::default(),
            lease_expiry: Family::default(),
            revocations: Family::default(),
            ready: Gauge::default(),
        };
        registry.register("logins", "Logins to the engine by result", m.logins.clone());
        registry.register(
            "token_renewals",
            "Renewals of the agent's engine token by result",
            m.token_renewals.clone(),
        );
        registry.register(
            "token_expiry_timestamp_seconds",
            "When the agent's engine token expires (Unix time)",
            m.token_expiry.clone(),
        );
        registry.register(
            "renders",
            "Files rendered (written) by file and result",
            m.renders.clone(),
        );
        registry.register(
            "kv_polls",
            "Reads of KV secrets to detect a new version, by result",
            m.kv_polls.clone(),
        );
        registry.register(
            "credentials_issued",
            "Dynamic credentials issued by file and result",
            m.credentials_issued.clone(),
        );
        registry.register(
            "lease_renewals",
            "Lease renewals by file and result",
            m.lease_renewals.clone(),
        );
        registry.register(
            "lease_expiry_timestamp_seconds",
            "When the current lease of a file's credential expires (Unix time)",
            m.lease_expiry.clone(),
        );
        registry.register(
            "revocations",
            "Revocations at shutdown, of leases and of the token, by result",
            m.revocations.clone(),
        );
        registry.register("ready", "1 once every file has been rendered", m.ready.clone());
        m
    }

    pub fn result(ok: bool) -> &'static str {
        if ok { "ok" } else { "failed" }
    }
}

pub fn now_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
