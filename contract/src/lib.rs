//! What Capstan's binaries agree on by name.
//!
//! The webhook writes environment variables that the sidecar's and agent's clap arguments
//! read; the engine publishes its roots in a ConfigMap that the webhook, the controller and
//! every sidecar read; tokens are requested for audiences the engine checks. Each of those
//! names is a constant here, used on both sides, so a rename is one edit that the compiler
//! carries to every reader. Durations in flags, CRDs and API bodies share one grammar
//! ([`duration`]).

pub mod annotations;
pub mod duration;
pub mod env;

/// The ConfigMap, in Capstan's namespace, in which the engine publishes the mesh CA's
/// trust bundle (current and next roots during a rotation).
pub const ROOTS_CONFIGMAP: &str = "capstan-mesh-roots";
/// The key of the PEM bundle in [`ROOTS_CONFIGMAP`] (and in copies of it).
pub const ROOTS_KEY: &str = "roots.pem";

/// The audience of the projected token a sidecar presents to the mesh CA.
pub const MESH_CA_AUDIENCE: &str = "capstan-mesh-ca";
/// The audience of the tokens presented to the secrets engine's Kubernetes auth method
/// (the agent's and SecretSync's).
pub const ENGINE_AUDIENCE: &str = "capstan-engine";
