//! `mesh.capstan.dev`: service segmentation (Consul Connect's intentions).

mod service_intentions;

pub use service_intentions::*;

pub const GROUP: &str = "mesh.capstan.dev";
