//! The webhook's metrics, registered under `capstan_webhook_`.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub webhook: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub protocol: &'static str,
}

#[derive(Clone)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    /// Connections accepted (TLS handshakes completed), by the protocol ALPN chose: with
    /// h2 the API server keeps one, with HTTP/1.1 one per call in flight.
    connections: Family<ConnectionLabels, Counter>,
    /// The mutation itself (deciding and building the patch), not the HTTP round trip:
    /// the part that is Capstan's to keep fast.
    pub mutation: Histogram,
    /// A /mutate-pods request from its body to its encoded answer (parsing the review,
    /// deciding, encoding): the webhook's share of the API server's HTTP round trip.
    pub mutate_request: Histogram,
    /// When the certificate being served expires (seconds since the epoch).
    pub serving_cert_expiry: Gauge,
    pub ca_rotations: Counter,
    pub bundle_updates: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            connections: Family::default(),
            // 5 µs .. ~5 ms: the pure function is expected in the low microseconds.
            mutation: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                5e-6, 2.0, 11,
            )),
            // 10 µs .. ~20 ms.
            mutate_request: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                1e-5, 2.0, 12,
            )),
            serving_cert_expiry: Gauge::default(),
            ca_rotations: Counter::default(),
            bundle_updates: Counter::default(),
        };
        registry.register(
            "admission_requests",
            "Admission requests answered, by webhook and result",
            metrics.requests.clone(),
        );
        registry.register(
            "connections",
            "TLS connections accepted, by the protocol negotiated with ALPN",
            metrics.connections.clone(),
        );
        registry.register(
            "mutation_duration_seconds",
            "Time the injection decision and patch took, excluding IO",
            metrics.mutation.clone(),
        );
        registry.register(
            "mutate_request_duration_seconds",
            "Time a /mutate-pods request took in the handler, from its body to its encoded answer",
            metrics.mutate_request.clone(),
        );
        registry.register(
            "serving_certificate_expiry_timestamp_seconds",
            "When the serving certificate in use expires",
            metrics.serving_cert_expiry.clone(),
        );
        registry.register(
            "ca_rotations",
            "Webhook CA rotations this replica started",
            metrics.ca_rotations.clone(),
        );
        registry.register(
            "ca_bundle_updates",
            "Writes of caBundle/clientConfig into the webhook configurations",
            metrics.bundle_updates.clone(),
        );
        metrics
    }

    pub fn request(&self, webhook: &'static str, result: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { webhook, result })
            .inc();
    }

    pub fn connection(&self, protocol: &'static str) {
        self.connections
            .get_or_create(&ConnectionLabels { protocol })
            .inc();
    }
}
