//! Who is asking: the engine's tokens (`token`, the `auth/token/` mount's store) and the
//! Kubernetes auth method (`kubernetes`), which trades a ServiceAccount token checked by
//! the API server's TokenReview for an engine token.

pub mod kubernetes;
pub mod token;
