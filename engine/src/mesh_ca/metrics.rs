//! The mesh CA's metrics, under `capstan_engine_mesh_ca_`.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SignResult {
    issued,
    denied,
    invalid,
    error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: SignResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

#[derive(Clone)]
pub struct Metrics {
    pub sign: Family<ResultLabels, Counter>,
    pub sign_duration: Histogram,
    pub last_leaf_expiry: Gauge,
    pub signing_ca_expiry: Gauge,
    pub earliest_root_expiry: Gauge,
    pub roots: Gauge,
    pub rotation_phase: Gauge,
    pub rotations: Family<PhaseLabels, Counter>,
    pub ready: Gauge,
    pub secret_errors: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            sign: Family::default(),
            sign_duration: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            last_leaf_expiry: Gauge::default(),
            signing_ca_expiry: Gauge::default(),
            earliest_root_expiry: Gauge::default(),
            roots: Gauge::default(),
            rotation_phase: Gauge::default(),
            rotations: Family::default(),
            ready: Gauge::default(),
            secret_errors: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("mesh_ca");
        r.register(
            "sign",
            "Leaf signing requests by result: issued, denied (401/403), invalid (400), error (5xx)",
            m.sign.clone(),
        );
        r.register(
            "sign_duration_seconds",
            "Time to answer a signing request, TokenReview included",
            m.sign_duration.clone(),
        );
        r.register(
            "last_leaf_expiry_timestamp_seconds",
            "Not-after of the last leaf this replica issued (Unix time)",
            m.last_leaf_expiry.clone(),
        );
        r.register(
            "signing_ca_expiry_timestamp_seconds",
            "Not-after of the CA certificate that signs leaves (Unix time); alert well before it",
            m.signing_ca_expiry.clone(),
        );
        r.register(
            "root_expiry_timestamp_seconds",
            "Soonest not-after among the trusted roots (Unix time); alert well before it",
            m.earliest_root_expiry.clone(),
        );
        r.register(
            "roots",
            "Roots in the trust bundle (2 or more during a rotation)",
            m.roots.clone(),
        );
        r.register(
            "rotation_phase",
            "0 stable, 1 a new root propagates (trusted, not signing), 2 an old root is retiring",
            m.rotation_phase.clone(),
        );
        r.register(
            "rotation_steps",
            "Rotation phases this replica wrote: started, activated, retired",
            m.rotations.clone(),
        );
        r.register(
            "ready",
            "1 once a CA is loaded and leaves can be signed",
            m.ready.clone(),
        );
        r.register(
            "secret_errors",
            "Versions of the CA Secret that could not be used (the last good one stays in force)",
            m.secret_errors.clone(),
        );
        m
    }

    pub fn count(&self, result: SignResult) {
        self.sign.get_or_create(&ResultLabels { result }).inc();
    }
}
