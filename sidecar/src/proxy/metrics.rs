//! The proxy's metrics. Every allow/deny counter carries the rule that decided, so a
//! dashboard answers "why was this refused" without reading logs.

use capstan_telemetry::Registry;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub source: String,
    pub destination: String,
    /// `allowed` or `denied`.
    pub result: &'static str,
    /// The intention and rule that decided (`cluster default` when none matched).
    pub decided_by: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `inbound` (a client met our listener) or `outbound` (we dialled a peer).
    pub direction: &'static str,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutboundLabels {
    pub destination: String,
    /// `connected`, `no_endpoints`, `unreachable` (no endpoint connected and completed a
    /// handshake), `refused_port`.
    pub result: &'static str,
}

/// One unit of a gauge, held while this lives: the count stays right when the task
/// holding it is aborted (a mux stream's, when its connection ends).
pub struct Held(Gauge);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn hold(family: &Family<DirectionLabels, Gauge>, direction: &'static str) -> Held {
    let gauge = family.get_or_create(&DirectionLabels { direction }).clone();
    gauge.inc();
    Held(gauge)
}

#[derive(Clone)]
pub struct Metrics {
    pub inbound_connections: Family<DecisionLabels, Counter>,
    pub requests: Family<DecisionLabels, Counter>,
    pub connections_closed_by_policy: Family<DecisionLabels, Counter>,
    pub outbound_connections: Family<OutboundLabels, Counter>,
    pub handshake_failures: Family<HandshakeLabels, Counter>,
    pub request_duration: Family<DirectionLabels, Histogram>,
    pub handshake_duration: Family<DirectionLabels, Histogram>,
    pub active_connections: Family<DirectionLabels, Gauge>,
    pub mesh_connections: Family<DirectionLabels, Gauge>,
    pub certificate_expiry: Gauge,
    pub certificate_renewals: Family<RenewalLabels, Counter>,
    pub intentions_updates: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RenewalLabels {
    /// `ok` or `failed`.
    pub result: &'static str,
}

fn latency_buckets() -> Histogram {
    // 50 µs .. ~3 s: the proxy's own overhead lives in the first buckets.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.00005, 2.0, 16,
    ))
}

impl Metrics {
    /// An application connection carried in `direction`, while the result lives.
    pub fn application_connection(&self, direction: &'static str) -> Held {
        hold(&self.active_connections, direction)
    }

    /// A mesh connection open in `direction`, while the result lives.
    pub fn mesh_connection(&self, direction: &'static str) -> Held {
        hold(&self.mesh_connections, direction)
    }

    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            inbound_connections: Family::default(),
            requests: Family::default(),
            connections_closed_by_policy: Family::default(),
            outbound_connections: Family::default(),
            handshake_failures: Family::default(),
            request_duration: Family::new_with_constructor(latency_buckets),
            handshake_duration: Family::new_with_constructor(latency_buckets),
            active_connections: Family::default(),
            mesh_connections: Family::default(),
            certificate_expiry: Gauge::default(),
            certificate_renewals: Family::default(),
            intentions_updates: Counter::default(),
        };
        registry.register(
            "inbound_connections",
            "Inbound mTLS connections by source, destination, result and deciding rule",
            m.inbound_connections.clone(),
        );
        registry.register(
            "requests",
            "Inbound HTTP requests by source, destination, result and deciding rule",
            m.requests.clone(),
        );
        registry.register(
            "connections_closed_by_policy",
            "Established connections closed because an intention no longer allows them",
            m.connections_closed_by_policy.clone(),
        );
        registry.register(
            "outbound_connections",
            "Outbound connections to mesh destinations by result",
            m.outbound_connections.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by direction and reason",
            m.handshake_failures.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to its response headers, through the proxy",
            m.request_duration.clone(),
        );
        registry.register(
            "tls_handshake_duration_seconds",
            "TLS handshake time",
            m.handshake_duration.clone(),
        );
        registry.register(
            "active_connections",
            "Open application connections carried, by direction (each stream of a mesh connection counts)",
            m.active_connections.clone(),
        );
        registry.register(
            "mesh_connections",
            "Open mTLS connections between sidecars, by direction (one carries many application connections)",
            m.mesh_connections.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When the current workload certificate expires (Unix time)",
            m.certificate_expiry.clone(),
        );
        registry.register(
            "certificate_renewals",
            "Workload certificate requests to the mesh CA by result",
            m.certificate_renewals.clone(),
        );
        registry.register(
            "intentions_updates",
            "Times the intentions in force were recompiled",
            m.intentions_updates.clone(),
        );
        m
    }
}
