//! The trust roots a client verifies the engine's serving certificate with: the mesh CA's
//! roots, which the engine publishes (its serving certificate is issued by the mesh CA).
//!
//! Each caller gets them its own way and keeps its own refresh: the agent from bytes or a
//! file re-read at every new connection (the kubelet updates a mounted ConfigMap in
//! place), SecretSync from a watch of the roots ConfigMap, the proxy from the bundle its
//! last certificate came with. [`Roots::set_pem`] swaps them at runtime; a swap retires
//! the client's kept connections, so the next request verifies against the new bundle.

use crate::Error;
use parking_lot::RwLock;
use rustls::{ClientConfig, RootCertStore};
use std::{path::PathBuf, sync::Arc};

/// Where the roots come from. Cheap to clone: clones share one bundle, so a caller can
/// keep a handle and swap the roots of a client built with it.
#[derive(Clone)]
pub struct Roots(Arc<Inner>);

enum Inner {
    /// Set by the caller, and swapped by it ([`Roots::set_pem`]); none until the first set.
    Shared(RwLock<Option<Loaded>>),
    /// Read from this file at every new connection.
    File(PathBuf),
}

struct Loaded {
    pem: String,
    config: Arc<ClientConfig>,
    generation: u64,
}

impl Roots {
    /// A PEM bundle given as bytes; refused now if it holds no usable certificate.
    pub fn pem(pem: &str) -> Result<Self, Error> {
        let roots = Self::later();
        roots.set_pem(pem)?;
        Ok(roots)
    }

    /// A PEM bundle in `path`, re-read at every new connection; refused now if it cannot
    /// be used (a client that could never connect fails at start, not at its first call).
    pub fn file(path: impl Into<PathBuf>) -> Result<Self, Error> {
        let roots = Self(Arc::new(Inner::File(path.into())));
        roots.config()?;
        Ok(roots)
    }

    /// No roots yet: calls fail with [`Error::NoRoots`] until [`Roots::set_pem`].
    pub fn later() -> Self {
        Self(Arc::new(Inner::Shared(RwLock::new(None))))
    }

    /// Trusts `pem` from now on. Returns whether the bundle changed (an identical one is
    /// not parsed again). A bundle that holds no usable certificate is refused and the
    /// previous one kept. Roots read from a file follow the file instead: refused.
    pub fn set_pem(&self, pem: &str) -> Result<bool, Error> {
        let Inner::Shared(loaded) = &*self.0 else {
            return Err(Error::Roots("these roots follow a file; they are not set".into()));
        };
        if loaded.read().as_ref().is_some_and(|l| l.pem == pem) {
            return Ok(false);
        }
        let config = tls_config(pem)?;
        let mut loaded = loaded.write();
        let generation = loaded.as_ref().map_or(1, |l| l.generation + 1);
        *loaded = Some(Loaded {
            pem: pem.to_owned(),
            config,
            generation,
        });
        Ok(true)
    }

    /// Which bundle is current: changes with every swap; `None` before the first set
    /// (no roots yet), and always 0 for a file, whose connections are each verified
    /// against the file as it is.
    pub(crate) fn generation(&self) -> Option<u64> {
        match &*self.0 {
            Inner::Shared(loaded) => loaded.read().as_ref().map(|l| l.generation),
            Inner::File(_) => Some(0),
        }
    }

    /// The TLS configuration for a new connection.
    pub(crate) fn config(&self) -> Result<Arc<ClientConfig>, Error> {
        match &*self.0 {
            Inner::Shared(loaded) => loaded
                .read()
                .as_ref()
                .map(|l| l.config.clone())
                .ok_or(Error::NoRoots),
            Inner::File(path) => {
                let pem = std::fs::read_to_string(path)
                    .map_err(|e| Error::Roots(format!("reading {}: {e}", path.display())))?;
                tls_config(&pem)
            }
        }
    }
}

/// TLS 1.3 only, ring, trusting exactly the certificates of `pem`.
pub fn tls_config(pem: &str) -> Result<Arc<ClientConfig>, Error> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| Error::Roots(format!("a PEM certificate: {e}")))?;
        store
            .add(cert)
            .map_err(|e| Error::Roots(format!("a root certificate: {e}")))?;
    }
    if store.is_empty() {
        return Err(Error::Roots("it holds no certificate".into()));
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Roots(e.to_string()))?
        .with_root_certificates(store)
        .with_no_client_auth();
    // As with the mesh's own connections (M13): every new connection verifies the
    // engine's certificate against the current bundle; none resumes a session that was
    // verified against an earlier one.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}
