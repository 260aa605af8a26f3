//! The workload certificate: a key made here (it never leaves the process), a CSR sent to
//! the mesh CA with the pod's ServiceAccount token, and renewal at half the certificate's
//! life, retried with backoff while the old certificate is still valid, so no request
//! ever meets an expired certificate. The trust bundle is refreshed on its own cadence,
//! because a CA rotation adds a root before it signs with it.

use super::{ca_client::CaClient, metrics::Metrics};
use anyhow::{Context as _, bail};
use capstan_mesh::svid::{self, SpiffeId, TrustBundle};
use parking_lot::Mutex;
use rustls::{
    ClientConfig, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _},
};
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};
use tokio::sync::watch;

/// What a connection needs to speak mTLS as this workload.
pub struct Credentials {
    pub identity: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    pub roots_pem: String,
    /// `roots_pem`, parsed: what inbound connections' peers are verified against again
    /// when the bundle changes (M12).
    pub bundle: TrustBundle,
    pub issued: SystemTime,
    pub not_after: SystemTime,
    pub server_config: Arc<ServerConfig>,
    /// Client configs by expected peer, built on first use.
    client_configs: Mutex<HashMap<String, Arc<ClientConfig>>>,
}

impl Credentials {
    fn new(
        identity: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots_pem: String,
        issued: SystemTime,
        not_after: SystemTime,
    ) -> anyhow::Result<Self> {
        let bundle = TrustBundle::from_pem(&identity.trust_domain, &roots_pem)?;
        let server_config = svid::server_config(bundle.clone(), chain.clone(), key.clone_key(), alpn())?;
        Ok(Self {
            identity,
            chain,
            key,
            roots_pem,
            bundle,
            issued,
            not_after,
            server_config,
            client_configs: Mutex::new(HashMap::new()),
        })
    }

    /// The same certificate trusting another bundle.
    fn with_roots(&self, roots_pem: String) -> anyhow::Result<Self> {
        Self::new(
            self.identity.clone(),
            self.chain.clone(),
            self.key.clone_key(),
            roots_pem,
            self.issued,
            self.not_after,
        )
    }

    /// A client config that accepts only `expected` as the server (M9).
    pub fn client_config(&self, expected: &SpiffeId) -> anyhow::Result<Arc<ClientConfig>> {
        let key = expected.to_string();
        if let Some(config) = self.client_configs.lock().get(&key) {
            return Ok(config.clone());
        }
        let bundle = TrustBundle::from_pem(&self.identity.trust_domain, &self.roots_pem)?;
        let config = svid::client_config(
            bundle,
            expected.clone(),
            self.chain.clone(),
            self.key.clone_key(),
            alpn(),
        )?;
        self.client_configs.lock().insert(key, config.clone());
        Ok(config)
    }

    /// When to ask for the next certificate: half-way through this one's life.
    fn renew_at(&self) -> SystemTime {
        let life = self.not_after.duration_since(self.issued).unwrap_or_default();
        self.issued + life / 2
    }
}

/// What sidecars speak to each other inside mTLS, most preferred first: many
/// application connections as streams of one connection (`mux.rs`), or one
/// application connection's bytes (the tunnel, for a peer that knows no better).
fn alpn() -> Vec<Vec<u8>> {
    vec![MUX.to_vec(), b"capstan-mesh/1".to_vec()]
}

const MUX: &[u8] = b"capstan-mux/1";

/// Whether the connection's handshake settled on the mux (else: the tunnel).
pub fn speaks_mux(tls: &rustls::CommonState) -> bool {
    tls.alpn_protocol() == Some(MUX)
}

pub struct Issuer {
    pub ca: CaClient,
    pub identity: SpiffeId,
    pub token_file: PathBuf,
    pub roots_refresh: Duration,
    pub metrics: Metrics,
}

impl Issuer {
    async fn issue(&self, roots_pem: &str) -> anyhow::Result<Credentials> {
        let token = std::fs::read_to_string(&self.token_file)
            .with_context(|| format!("reading the ServiceAccount token {}", self.token_file.display()))?;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(self.identity.to_string().try_into()?)];
        let csr = params.serialize_request(&key)?.pem()?;
        let issued = SystemTime::now();
        let response = self.ca.sign(roots_pem, &token, &csr).await?;
        if response.spiffe_id != self.identity.to_string() {
            bail!(
                "the CA issued a certificate for {} but this workload is {}",
                response.spiffe_id,
                self.identity
            );
        }
        let mut chain = vec![pem_cert(&response.certificate)?];
        for intermediate in &response.chain {
            chain.push(pem_cert(intermediate)?);
        }
        let not_after: jiff::Timestamp = response.not_after.parse().context("the CA's not_after")?;
        let not_after = SystemTime::from(not_after);
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Credentials::new(
            self.identity.clone(),
            chain,
            key,
            response.roots.join("\n"),
            issued,
            not_after,
        )
    }

    /// Keeps `tx` holding valid credentials until the process ends: the first issue,
    /// renewals, and trust-bundle refreshes. `initial_roots` is the bundle to trust the
    /// CA with before the CA has told us its own.
    pub async fn run(self, initial_roots: String, tx: watch::Sender<Option<Arc<Credentials>>>) {
        let mut backoff = Duration::from_millis(200);
        let mut next_roots_check = tokio::time::Instant::now() + self.roots_refresh;
        loop {
            let current = tx.borrow().clone();
            let renew_in = current
                .as_ref()
                .map(|c| c.renew_at().duration_since(SystemTime::now()).unwrap_or_default())
                .unwrap_or_default();
            if renew_in.is_zero() {
                let roots = current
                    .as_ref()
                    .map_or(initial_roots.as_str(), |c| c.roots_pem.as_str());
                match self.issue(roots).await {
                    Ok(credentials) => {
                        tracing::info!(
                            identity = %credentials.identity,
                            not_after = %jiff::Timestamp::try_from(credentials.not_after).map(|t| t.to_string()).unwrap_or_default(),
                            "Certificate issued"
                        );
                        self.metrics
                            .certificate_renewals
                            .get_or_create(&super::metrics::RenewalLabels { result: "ok" })
                            .inc();
                        self.metrics.certificate_expiry.set(unix(credentials.not_after));
                        tx.send_replace(Some(Arc::new(credentials)));
                        backoff = Duration::from_millis(200);
                    }
                    Err(error) => {
                        self.metrics
                            .certificate_renewals
                            .get_or_create(&super::metrics::RenewalLabels { result: "failed" })
                            .inc();
                        let left = current
                            .as_ref()
                            .and_then(|c| c.not_after.duration_since(SystemTime::now()).ok());
                        tracing::warn!(error = format!("{error:#}"), remaining = ?left, "Certificate request failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(15));
                    }
                }
                continue;
            }
            let now = tokio::time::Instant::now();
            if now >= next_roots_check {
                next_roots_check = now + self.roots_refresh;
                if let Some(current) = current {
                    self.refresh_roots(&current, &tx).await;
                }
                continue;
            }
            tokio::time::sleep(renew_in.min(next_roots_check - now)).await;
        }
    }

    async fn refresh_roots(&self, current: &Credentials, tx: &watch::Sender<Option<Arc<Credentials>>>) {
        match self.ca.roots(&current.roots_pem).await {
            Ok(response) => {
                let roots = response.roots.join("\n");
                if normalize_pem(&roots) == normalize_pem(&current.roots_pem) {
                    return;
                }
                match current.with_roots(roots) {
                    Ok(updated) => {
                        tracing::info!(roots = response.roots.len(), "Trust bundle changed");
                        tx.send_replace(Some(Arc::new(updated)));
                    }
                    Err(error) => {
                        tracing::warn!(error = format!("{error:#}"), "Ignoring an unusable trust bundle")
                    }
                }
            }
            Err(error) => tracing::warn!(error = format!("{error:#}"), "Refreshing the trust bundle failed"),
        }
    }
}

fn pem_cert(pem: &str) -> anyhow::Result<CertificateDer<'static>> {
    CertificateDer::from_pem_slice(pem.as_bytes()).context("a PEM certificate from the CA")
}

fn normalize_pem(pem: &str) -> String {
    pem.split_whitespace().collect()
}

fn unix(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}
