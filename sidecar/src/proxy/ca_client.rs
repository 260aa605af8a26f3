//! The mesh CA's HTTPS API as the proxy uses it: sign a CSR with the pod's token, and
//! read the trust bundle, on the shared engine client (`capstan-engine-client`).
//!
//! The CA's serving certificate is issued by the mesh CA itself, so the current roots are
//! what we trust it with: every call names the bundle the proxy holds, and a new bundle
//! retires the kept connection, so the next one is verified against it (as the mesh's own
//! connections are, M13: no session resumption either). Otherwise the connection is kept
//! alive: a trust-bundle refresh costs a request, not a TCP and TLS handshake (the CA
//! closes a connection idle longer than its header timeout; a request that was never
//! written on it goes once more on a new one). 10 s per call, answers up to 256 KiB.

use anyhow::Context as _;
use capstan_engine_client::{Client, Options, Roots};

pub use capstan_engine_client::{RootsResponse, SignResponse};

/// The client's defaults (10 s to connect and per call, no retry), answers up to 256 KiB.
const OPTIONS: Options = Options {
    body_limit: 256 * 1024,
    ..Options::DEFAULT
};

pub struct CaClient {
    client: Client,
}

impl CaClient {
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let client = Client::new(url, Roots::later(), OPTIONS)
            .with_context(|| format!("CA URL {url:?}: the mesh CA is only reached over https"))?;
        Ok(Self { client })
    }

    pub async fn sign(&self, roots_pem: &str, token: &str, csr_pem: &str) -> anyhow::Result<SignResponse> {
        self.trust(roots_pem)?;
        Ok(self.client.mesh_sign(token, csr_pem).await?)
    }

    pub async fn roots(&self, roots_pem: &str) -> anyhow::Result<RootsResponse> {
        self.trust(roots_pem)?;
        Ok(self.client.mesh_roots().await?)
    }

    /// Trusts `roots_pem` from this call on (a no-op when it is the bundle already held).
    fn trust(&self, roots_pem: &str) -> anyhow::Result<()> {
        self.client
            .roots()
            .set_pem(roots_pem)
            .context("the trust bundle")?;
        Ok(())
    }
}
