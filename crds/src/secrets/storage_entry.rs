//! StorageEntry: one entry of the secrets engine's storage. The engine keeps everything it
//! stores (KV data, tokens, leases, its sealed keyring) in these objects, so etcd
//! replicates it and any replica can serve it. Values are barrier envelopes
//! (AES-256-GCM under the keyring, the path as associated data): what the API server and
//! etcd hold is ciphertext. A kind of its own, not Secrets, so the engine's RBAC names
//! exactly what it may read, and nobody's Secret-reading rights extend to it by accident.
//!
//! Not for users: written only by capstan-engine, not in the `capstan` category.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "secrets.capstan.dev",
    version = "v1alpha1",
    kind = "StorageEntry",
    plural = "storageentries",
    singular = "storageentry",
    namespaced,
    printcolumn(name = "Path", type_ = "string", json_path = ".spec.path"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    doc = "One entry of the Capstan secrets engine's encrypted storage (written by the engine only)"
)]
#[serde(rename_all = "camelCase")]
pub struct StorageEntrySpec {
    /// The engine's storage path (the object's name is derived from it).
    #[schemars(length(min = 1, max = 2048))]
    pub path: String,
    /// The stored value, base64: a barrier envelope, or for the few entries read before
    /// unseal (the seal configuration), the sealed key material itself.
    #[schemars(length(max = 1_048_576))]
    pub value: String,
}
