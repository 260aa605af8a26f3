//! X509-SVID verification (RELIABILITY M7, M9, M13; gate G13): the one place that decides
//! whether a peer's certificate proves a workload identity, and the rustls verifiers and
//! TLS 1.3 configurations the sidecar builds its listeners and connectors from.
//!
//! A peer is accepted only when all of these hold, checked in this order:
//! 1. the chain it sent verifies with webpki against a root of the trust bundle, at the
//!    given time, for the TLS role it plays (its extended key usage, when present, must
//!    allow that role; SVIDs normally carry both serverAuth and clientAuth);
//! 2. the leaf is an X509-SVID leaf (X509-SVID §4 and §5.2): basicConstraints cA is false
//!    or absent, keyUsage is present with digitalSignature and without keyCertSign or
//!    cRLSign, and it carries exactly one URI SAN (other SAN types are allowed);
//! 3. that URI is a SPIFFE ID (SPIFFE-ID §2) of the bundle's trust domain with the path
//!    `/ns/<namespace>/sa/<serviceaccount>`, the only shape Capstan issues.
//!
//! Every refusal is an [`SvidError`] whose message says what was wrong, so the log line
//! of a refused handshake names the reason; [`svid_error_of`] recovers it from the
//! `rustls::Error` a handshake fails with.
//!
//! Session resumption is off in both configurations (M13): a resumed TLS 1.3 session
//! skips certificate verification, so a session from before a trust-bundle change would
//! outlive the bundle it was verified against. Every connection is a full handshake.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::TrustAnchor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::fmt;
use std::sync::Arc;
use webpki::{EndEntityCert, ExtendedKeyUsageValidator, KeyPurposeIdIter};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

/// SPIFFE-ID §2.3: an ID longer than this is refused outright.
const MAX_ID_LEN: usize = 2048;
/// SPIFFE-ID §2.1: the trust domain is at most 255 bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
const SCHEME: &str = "spiffe://";

/// Why a peer certificate, a SPIFFE ID, a trust bundle or a TLS configuration was refused.
/// Messages name what is wrong and never include key material.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("invalid SPIFFE ID {id:?}: {reason}")]
    InvalidId { id: String, reason: &'static str },
    #[error("SPIFFE ID {id} is not in trust domain {expected:?}")]
    ForeignTrustDomain { id: String, expected: String },
    #[error("the peer certificate has {0} URI SANs; an X509-SVID has exactly one")]
    UriSanCount(usize),
    #[error("the peer certificate is not a well-formed X.509 certificate: {0}")]
    Malformed(String),
    #[error("the peer's leaf certificate is a CA (basicConstraints cA=true)")]
    LeafIsCa,
    #[error("the peer's leaf certificate has keyCertSign or cRLSign in its key usage")]
    LeafCanSign,
    #[error("the peer's leaf certificate has no keyUsage extension with digitalSignature")]
    NoDigitalSignature,
    #[error("the peer certificate has expired")]
    Expired,
    #[error("the peer certificate is not valid yet")]
    NotYetValid,
    #[error("the peer certificate's extended key usage does not allow {0}")]
    WrongUsage(&'static str),
    #[error("the peer certificate does not chain to a root of trust domain {trust_domain:?}: {detail}")]
    Untrusted { trust_domain: String, detail: String },
    #[error("the peer presented {presented}, but {expected} was expected")]
    UnexpectedIdentity { expected: String, presented: String },
    #[error("invalid trust bundle for {trust_domain:?}: {reason}")]
    Bundle { trust_domain: String, reason: String },
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

impl SvidError {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::InvalidId { .. } => "invalid_id",
            Self::ForeignTrustDomain { .. } => "foreign_trust_domain",
            Self::UriSanCount(_) => "uri_san_count",
            Self::Malformed(_) => "malformed",
            Self::LeafIsCa => "leaf_is_ca",
            Self::LeafCanSign => "leaf_can_sign",
            Self::NoDigitalSignature => "no_digital_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongUsage(_) => "wrong_usage",
            Self::Untrusted { .. } => "untrusted",
            Self::UnexpectedIdentity { .. } => "unexpected_identity",
            Self::Bundle { .. } => "bundle",
            Self::Config(_) => "config",
        }
    }
}

// === impl SpiffeId ===

/// A workload's SPIFFE ID, `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// Parses a SPIFFE ID of the one shape Capstan issues. Strict, as SPIFFE-ID §2 asks of
    /// validators: lowercase `spiffe` scheme; a lowercase trust domain of `a-z 0-9 . - _`
    /// (so no port, no userinfo); path segments of `A-Z a-z 0-9 . - _`, none empty, `.`
    /// or `..` (so no trailing slash and no percent-encoding); no query or fragment.
    pub fn parse(uri: &str) -> Result<SpiffeId, SvidError> {
        let invalid = |reason: &'static str| SvidError::InvalidId {
            id: truncate_for_log(uri),
            reason,
        };
        if uri.len() > MAX_ID_LEN {
            return Err(invalid("longer than 2048 bytes"));
        }
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid("the scheme must be \"spiffe://\" in lowercase"))?;
        if rest.contains('?') {
            return Err(invalid("a SPIFFE ID has no query"));
        }
        if rest.contains('#') {
            return Err(invalid("a SPIFFE ID has no fragment"));
        }
        let (trust_domain, path) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => (rest, ""),
        };
        if trust_domain.is_empty() {
            return Err(invalid("the trust domain is empty"));
        }
        if trust_domain.contains('@') {
            return Err(invalid("a SPIFFE ID has no userinfo"));
        }
        if trust_domain.contains(':') {
            return Err(invalid("a SPIFFE ID has no port"));
        }
        validate_trust_domain(trust_domain).map_err(invalid)?;
        if path.is_empty() || path == "/" {
            return Err(invalid(
                "the path is empty: a trust domain's root ID names no workload",
            ));
        }
        if path.contains('%') {
            return Err(invalid("a SPIFFE ID has no percent-encoding"));
        }
        let segments: Vec<&str> = path[1..].split('/').collect();
        for segment in &segments {
            match *segment {
                "" => return Err(invalid("the path has an empty segment or a trailing slash")),
                "." | ".." => return Err(invalid("the path has a '.' or '..' segment")),
                s if !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) =>
                {
                    return Err(invalid(
                        "path segments hold only letters, digits, '.', '-' and '_'",
                    ));
                }
                _ => {}
            }
        }
        match segments.as_slice() {
            ["ns", namespace, "sa", service_account] => {
                Ok(SpiffeId::new(trust_domain, *namespace, *service_account))
            }
            _ => Err(invalid("the path must be /ns/<namespace>/sa/<serviceaccount>")),
        }
    }

    /// The mesh identity this ID names (the service name is the ServiceAccount's).
    pub fn identity(&self) -> crate::Identity {
        crate::Identity::new(&self.namespace, &self.service_account)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = SvidError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn validate_trust_domain(trust_domain: &str) -> Result<(), &'static str> {
    if trust_domain.is_empty() {
        return Err("the trust domain is empty");
    }
    if trust_domain.len() > MAX_TRUST_DOMAIN_LEN {
        return Err("the trust domain is longer than 255 bytes");
    }
    if trust_domain.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("the trust domain must be lowercase");
    }
    if !trust_domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
    {
        return Err("the trust domain holds only lowercase letters, digits, '.', '-' and '_'");
    }
    Ok(())
}

/// Hostile input can be long: log lines carry at most its first 256 characters.
fn truncate_for_log(s: &str) -> String {
    const LIMIT: usize = 256;
    match s.char_indices().nth(LIMIT) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_owned(),
    }
}

// === impl TrustBundle ===

/// The roots a trust domain's SVIDs must chain to (several during a CA rotation).
#[derive(Clone, Debug)]
pub struct TrustBundle {
    pub trust_domain: String,
    pub roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// Every `CERTIFICATE` block of `pem`; at least one, each usable as a trust anchor.
    pub fn from_pem(trust_domain: &str, pem: &str) -> Result<Self, SvidError> {
        let bundle_error = |reason: String| SvidError::Bundle {
            trust_domain: trust_domain.to_owned(),
            reason,
        };
        validate_trust_domain(trust_domain).map_err(|reason| bundle_error(reason.to_owned()))?;
        let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bundle_error(format!("the PEM does not parse: {e}")))?;
        if roots.is_empty() {
            return Err(bundle_error("no CERTIFICATE in the PEM".to_owned()));
        }
        let bundle = Self {
            trust_domain: trust_domain.to_owned(),
            roots,
        };
        bundle.anchors()?;
        Ok(bundle)
    }

    fn anchors(&self) -> Result<Anchors, SvidError> {
        let mut anchors = Anchors::default();
        for (i, root) in self.roots.iter().enumerate() {
            let unusable = |detail: String| SvidError::Bundle {
                trust_domain: self.trust_domain.clone(),
                reason: format!("root {i} is not a usable CA certificate: {detail}"),
            };
            let anchor = webpki::anchor_from_trusted_cert(root).map_err(|e| unusable(format!("{e:?}")))?;
            let (_, cert) = X509Certificate::from_der(root).map_err(|e| unusable(e.to_string()))?;
            let constraints = cert.basic_constraints().map_err(|e| unusable(e.to_string()))?;
            anchors
                .max_intermediates
                .push(constraints.and_then(|bc| bc.value.path_len_constraint));
            anchors.anchors.push(anchor.to_owned());
        }
        Ok(anchors)
    }
}

/// A bundle's roots as webpki trust anchors, with each root's pathLenConstraint: webpki
/// keeps no basicConstraints of a trust anchor, so it would let an intermediate sign
/// under a root that allows none (the engine's root has pathLen 0).
#[derive(Default)]
struct Anchors {
    anchors: Vec<TrustAnchor<'static>>,
    max_intermediates: Vec<Option<u32>>,
}

// === verification ===

/// The TLS role a peer's certificate must be good for (its extended key usage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerRole {
    /// A TLS client (id-kp-clientAuth, when the certificate lists extended key usages).
    Client,
    /// A TLS server (id-kp-serverAuth, when the certificate lists extended key usages).
    Server,
    /// Either role: the usages, when listed, must include clientAuth or serverAuth.
    Any,
}

// 1.3.6.1.5.5.7.3.1 and 1.3.6.1.5.5.7.3.2, DER-encoded without tag and length.
const EKU_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
const EKU_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];

impl PeerRole {
    fn usage_name(self) -> &'static str {
        match self {
            Self::Client => "TLS client authentication (clientAuth)",
            Self::Server => "TLS server authentication (serverAuth)",
            Self::Any => "TLS authentication (clientAuth or serverAuth)",
        }
    }
}

/// RFC 5280 §4.2.1.12: with no extendedKeyUsage extension any use is allowed; with one,
/// it must list the usage asked for.
impl ExtendedKeyUsageValidator for PeerRole {
    fn validate(&self, iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        match self {
            Self::Client => webpki::KeyUsage::client_auth().validate(iter),
            Self::Server => webpki::KeyUsage::server_auth().validate(iter),
            Self::Any => {
                let wanted = [
                    webpki::KeyPurposeId::new(EKU_CLIENT_AUTH),
                    webpki::KeyPurposeId::new(EKU_SERVER_AUTH),
                ];
                let mut present = Vec::new();
                for id in iter {
                    let id = id?;
                    if wanted.contains(&id) {
                        return Ok(());
                    }
                    present.push(id.to_decoded_oid());
                }
                if present.is_empty() {
                    return Ok(());
                }
                Err(webpki::Error::RequiredEkuNotFoundContext(
                    webpki::RequiredEkuNotFoundContext {
                        required: webpki::KeyUsage::client_auth(),
                        present,
                    },
                ))
            }
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Full X509-SVID validation of a peer: the chain to the bundle (webpki, with any
/// intermediates the peer sent), validity at `now`, then the SVID rules of the leaf.
/// Either TLS role is accepted; see [`verify_svid_as`] to require one.
pub fn verify_svid(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: UnixTime,
) -> Result<SpiffeId, SvidError> {
    verify_svid_as(end_entity, intermediates, bundle, now, PeerRole::Any)
}

/// [`verify_svid`] for a peer in a given TLS role.
pub fn verify_svid_as(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: UnixTime,
    role: PeerRole,
) -> Result<SpiffeId, SvidError> {
    let anchors = bundle.anchors()?;
    verify_with_anchors(
        end_entity,
        intermediates,
        &bundle.trust_domain,
        &anchors,
        now,
        role,
    )
}

fn verify_with_anchors(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    trust_domain: &str,
    anchors: &Anchors,
    now: UnixTime,
    role: PeerRole,
) -> Result<SpiffeId, SvidError> {
    let untrusted = |detail: &str| SvidError::Untrusted {
        trust_domain: trust_domain.to_owned(),
        detail: detail.to_owned(),
    };
    let leaf = EndEntityCert::try_from(end_entity).map_err(|e| SvidError::Malformed(format!("{e:?}")))?;
    // The chain first: nothing an untrusted certificate claims is worth looking at.
    let path = leaf
        .verify_for_usage(
            algorithms().all,
            &anchors.anchors,
            intermediates,
            now,
            role,
            None,
            None,
        )
        .map_err(|e| chain_error(e, trust_domain, role))?;
    let root = anchors
        .anchors
        .iter()
        .position(|a| std::ptr::eq(a, path.anchor()))
        .ok_or_else(|| untrusted("the verified path ends at no root of the bundle"))?;
    let depth = path.intermediate_certificates().count();
    if let Some(max) = anchors.max_intermediates[root]
        && depth > max as usize
    {
        return Err(untrusted(&format!(
            "{depth} intermediate(s) under a root whose pathLenConstraint allows {max}"
        )));
    }
    // webpki does not look at an issuer's keyUsage (RFC 5280 §4.2.1.3 asks for
    // keyCertSign): an intermediate that lists key usages without it signs nothing.
    for issuer in path.intermediate_certificates() {
        let der = issuer.der();
        let (_, cert) = X509Certificate::from_der(&der)
            .map_err(|e| SvidError::Malformed(format!("an intermediate: {e}")))?;
        if let Ok(Some(ku)) = cert.key_usage()
            && !ku.value.key_cert_sign()
        {
            return Err(untrusted(
                "an intermediate's key usage does not allow keyCertSign",
            ));
        }
    }
    let id = leaf_spiffe_id(end_entity)?;
    // Two DER parsers read this certificate: webpki for the chain, x509-parser for the
    // SVID rules. Should they ever read its URI SANs differently, trust neither.
    let webpki_uris: Vec<&str> = leaf.valid_uri_names().collect();
    if webpki_uris != [id.to_string().as_str()] {
        return Err(SvidError::Malformed(
            "the certificate's URI SANs parse differently in webpki and x509-parser".to_owned(),
        ));
    }
    if id.trust_domain != trust_domain {
        return Err(SvidError::ForeignTrustDomain {
            id: id.to_string(),
            expected: trust_domain.to_owned(),
        });
    }
    Ok(id)
}

fn chain_error(error: webpki::Error, trust_domain: &str, role: PeerRole) -> SvidError {
    use webpki::Error as E;
    match error {
        E::CertExpired { .. } => SvidError::Expired,
        E::CertNotValidYet { .. } => SvidError::NotYetValid,
        E::CaUsedAsEndEntity => SvidError::LeafIsCa,
        E::RequiredEkuNotFoundContext(_) => SvidError::WrongUsage(role.usage_name()),
        E::BadDer | E::BadDerTime | E::TrailingData(_) | E::InvalidCertValidity => {
            SvidError::Malformed(format!("{error:?}"))
        }
        other => SvidError::Untrusted {
            trust_domain: trust_domain.to_owned(),
            detail: format!("{other:?}"),
        },
    }
}

/// When the first certificate of a verified chain stops being valid (the earliest
/// notAfter of the certificates the peer sent, as seconds since the epoch): the moment a
/// connection the chain opened has outlived its trust. None when one does not parse.
pub fn chain_not_after(chain: &[CertificateDer<'_>]) -> Option<UnixTime> {
    chain
        .iter()
        .map(|der| {
            let (_, cert) = X509Certificate::from_der(der).ok()?;
            let seconds = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or_default();
            Some(UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                seconds,
            )))
        })
        .try_fold(None::<UnixTime>, |earliest, next| {
            let next = next?;
            Some(Some(earliest.map_or(next, |e| e.min(next))))
        })
        .flatten()
}

/// The SPIFFE ID of an already-verified peer certificate (for the sidecar, after the
/// handshake). Applies the SVID leaf rules again, but no chain or time check.
pub fn peer_spiffe_id(end_entity: &CertificateDer<'_>) -> Result<SpiffeId, SvidError> {
    leaf_spiffe_id(end_entity)
}

/// X509-SVID §4 and §5.2 on the leaf, then its one URI SAN parsed as a SPIFFE ID.
fn leaf_spiffe_id(der: &[u8]) -> Result<SpiffeId, SvidError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| SvidError::Malformed(format!("{e}")))?;
    if !rest.is_empty() {
        return Err(SvidError::Malformed(
            "trailing bytes after the certificate".to_owned(),
        ));
    }
    // An extension the parser could not read might be the one that matters: refuse.
    for extension in cert.extensions() {
        if let ParsedExtension::ParseError { error } = extension.parsed_extension() {
            return Err(SvidError::Malformed(format!(
                "extension {} does not parse: {error}",
                extension.oid
            )));
        }
    }
    let malformed = |e: x509_parser::error::X509Error| SvidError::Malformed(format!("{e}"));
    if let Some(bc) = cert.basic_constraints().map_err(malformed)?
        && bc.value.ca
    {
        return Err(SvidError::LeafIsCa);
    }
    match cert.key_usage().map_err(malformed)? {
        Some(ku) if ku.value.key_cert_sign() || ku.value.crl_sign() => {
            return Err(SvidError::LeafCanSign);
        }
        Some(ku) if ku.value.digital_signature() => {}
        _ => return Err(SvidError::NoDigitalSignature),
    }
    let uris: Vec<&str> = match cert.subject_alternative_name().map_err(malformed)? {
        Some(san) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect(),
        None => Vec::new(),
    };
    match uris.as_slice() {
        [uri] => SpiffeId::parse(uri),
        _ => Err(SvidError::UriSanCount(uris.len())),
    }
}

/// The reason a handshake failed, when one of these verifiers refused the peer: for
/// the log line of a refused connection (M7).
pub fn svid_error_of(error: &rustls::Error) -> Option<&SvidError> {
    match error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            other.0.downcast_ref::<SvidError>()
        }
        _ => None,
    }
}

/// The log line for a failed handshake: the SVID reason when one of these verifiers
/// refused the peer (rustls alone would print it in Debug form), else rustls's message.
pub fn describe_tls_error(error: &rustls::Error) -> String {
    match svid_error_of(error) {
        Some(reason) => format!("invalid peer certificate: {reason}"),
        None => error.to_string(),
    }
}

fn to_rustls(error: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(
        error,
    ))))
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is refused: the mesh speaks TLS 1.3 only".to_owned())
}

// === impl SvidClientVerifier ===

/// Used by a server: requires a client certificate and verifies it as an SVID of the
/// bundle's trust domain good for TLS client authentication. Which identities may
/// connect is the intentions' business, decided after the handshake.
pub struct SvidClientVerifier {
    trust_domain: String,
    anchors: Anchors,
    hints: Vec<DistinguishedName>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SvidClientVerifier {
    /// # Panics
    /// Never for a bundle from [`TrustBundle::from_pem`]; see [`Self::try_new`].
    pub fn new(bundle: TrustBundle) -> Arc<Self> {
        Self::try_new(bundle).expect("a TrustBundle built by from_pem has usable roots")
    }

    pub fn try_new(bundle: TrustBundle) -> Result<Arc<Self>, SvidError> {
        let anchors = bundle.anchors()?;
        let hints = anchors
            .anchors
            .iter()
            .map(|a| DistinguishedName::in_sequence(a.subject.as_ref()))
            .collect();
        Ok(Arc::new(Self {
            trust_domain: bundle.trust_domain,
            anchors,
            hints,
            algorithms: algorithms(),
        }))
    }
}

impl fmt::Debug for SvidClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidClientVerifier")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.anchors.anchors.len())
            .finish()
    }
}

impl ClientCertVerifier for SvidClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_with_anchors(
            end_entity,
            intermediates,
            &self.trust_domain,
            &self.anchors,
            now,
            PeerRole::Client,
        )
        .map(|_| ClientCertVerified::assertion())
        .map_err(to_rustls)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

// === impl SvidServerVerifier ===

/// Used by a client: verifies the server's SVID and that its SPIFFE ID is exactly the
/// destination's (M9: a valid SVID of another service is an impostor). The DNS server
/// name the client dialled is ignored; the SPIFFE ID is the name that counts.
pub struct SvidServerVerifier {
    trust_domain: String,
    anchors: Anchors,
    expected: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SvidServerVerifier {
    /// # Panics
    /// Never for a bundle from [`TrustBundle::from_pem`]; see [`Self::try_new`].
    pub fn new(bundle: TrustBundle, expected: SpiffeId) -> Arc<Self> {
        Self::try_new(bundle, expected).expect("a TrustBundle built by from_pem has usable roots")
    }

    pub fn try_new(bundle: TrustBundle, expected: SpiffeId) -> Result<Arc<Self>, SvidError> {
        Ok(Arc::new(Self {
            anchors: bundle.anchors()?,
            trust_domain: bundle.trust_domain,
            expected,
            algorithms: algorithms(),
        }))
    }

    pub fn expected(&self) -> &SpiffeId {
        &self.expected
    }
}

impl fmt::Debug for SvidServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidServerVerifier")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.anchors.anchors.len())
            .field("expected", &self.expected.to_string())
            .finish()
    }
}

impl ServerCertVerifier for SvidServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = verify_with_anchors(
            end_entity,
            intermediates,
            &self.trust_domain,
            &self.anchors,
            now,
            PeerRole::Server,
        )
        .map_err(to_rustls)?;
        if presented != self.expected {
            return Err(to_rustls(SvidError::UnexpectedIdentity {
                expected: self.expected.to_string(),
                presented: presented.to_string(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

// === TLS configurations ===

/// A TLS 1.3-only server configuration that requires every client to present an SVID of
/// `bundle`'s trust domain, serving `cert_chain` (leaf first). No session tickets and no
/// session cache (M13): every connection verifies the client's certificate anew.
pub fn server_config(
    bundle: TrustBundle,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<rustls::ServerConfig>, SvidError> {
    let verifier = SvidClientVerifier::try_new(bundle)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| SvidError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert_chain, key)
        .map_err(|e| SvidError::Config(format!("the certificate or key is unusable: {e}")))?;
    config.alpn_protocols = alpn;
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// A TLS 1.3-only client configuration that accepts only a server presenting the SVID
/// `expected`, and presents `cert_chain` (leaf first) as its own. Resumption is disabled
/// (M13). The server name passed to `ClientConnection::new` is sent as SNI but not
/// checked: the SPIFFE ID is.
pub fn client_config(
    bundle: TrustBundle,
    expected: SpiffeId,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<rustls::ClientConfig>, SvidError> {
    let verifier = SvidServerVerifier::try_new(bundle, expected)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| SvidError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert_chain, key)
        .map_err(|e| SvidError::Config(format!("the certificate or key is unusable: {e}")))?;
    config.alpn_protocols = alpn;
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_early_data = false;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_one_shape_capstan_issues() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        assert_eq!(id, SpiffeId::new("cluster.local", "shop", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(id.identity(), crate::Identity::new("shop", "web"));
        for ok in [
            "spiffe://td/ns/a/sa/b",
            "spiffe://my-td_1.example/ns/ns-1/sa/sa.with.dots",
            "spiffe://cluster.local/ns/Upper/sa/Case",
            "spiffe://cluster.local/ns/a/sa/...",
        ] {
            let id: SpiffeId = ok.parse().unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(id.to_string(), ok);
        }
    }

    #[test]
    fn refuses_every_other_spelling() {
        let cases = [
            ("", "scheme"),
            ("spiffe:/", "scheme"),
            ("SPIFFE://cluster.local/ns/a/sa/b", "scheme"),
            ("https://cluster.local/ns/a/sa/b", "scheme"),
            ("spiffe:cluster.local/ns/a/sa/b", "scheme"),
            (" spiffe://cluster.local/ns/a/sa/b", "scheme"),
            ("spiffe://", "trust domain is empty"),
            ("spiffe:///ns/a/sa/b", "trust domain is empty"),
            ("spiffe://Cluster.local/ns/a/sa/b", "lowercase"),
            ("spiffe://cluster.local:8443/ns/a/sa/b", "port"),
            ("spiffe://user@cluster.local/ns/a/sa/b", "userinfo"),
            ("spiffe://user:pw@cluster.local/ns/a/sa/b", "userinfo"),
            ("spiffe://clu%73ter.local/ns/a/sa/b", "trust domain holds only"),
            ("spiffe://cluster local/ns/a/sa/b", "trust domain holds only"),
            ("spiffe://cluster.local", "path is empty"),
            ("spiffe://cluster.local/", "path is empty"),
            ("spiffe://cluster.local/ns/a/sa/b/", "trailing slash"),
            ("spiffe://cluster.local//ns/a/sa/b", "empty segment"),
            ("spiffe://cluster.local/ns//a/sa/b", "empty segment"),
            ("spiffe://cluster.local/ns/a/sa/./b", "'.'"),
            ("spiffe://cluster.local/ns/a/sa/..", "'.'"),
            ("spiffe://cluster.local/ns/./sa/b", "'.'"),
            ("spiffe://cluster.local/ns/a%2Fb/sa/c", "percent"),
            ("spiffe://cluster.local/ns/%61/sa/b", "percent"),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", "query"),
            ("spiffe://cluster.local/ns/a/sa/b?", "query"),
            ("spiffe://cluster.local/ns/a/sa/b#frag", "fragment"),
            ("spiffe://cluster.local/ns/a/sa/b c", "only letters"),
            ("spiffe://cluster.local/ns/a/sa/b\u{e9}", "only letters"),
            ("spiffe://cluster.local/ns/a/sa/b\0", "only letters"),
            ("spiffe://cluster.local/ns/a/sa/b\\c", "only letters"),
            ("spiffe://cluster.local/ns/a", "/ns/<namespace>/sa/"),
            ("spiffe://cluster.local/ns/a/sa", "/ns/<namespace>/sa/"),
            ("spiffe://cluster.local/ns/a/sa/b/c", "/ns/<namespace>/sa/"),
            ("spiffe://cluster.local/sa/b/ns/a", "/ns/<namespace>/sa/"),
            ("spiffe://cluster.local/NS/a/SA/b", "/ns/<namespace>/sa/"),
            ("spiffe://cluster.local/workload", "/ns/<namespace>/sa/"),
        ];
        for (uri, reason) in cases {
            let error = SpiffeId::parse(uri).expect_err(uri).to_string();
            assert!(error.contains(reason), "{uri:?}: {error}");
        }
        let long = format!("spiffe://td/ns/a/sa/{}", "b".repeat(MAX_ID_LEN));
        assert!(SpiffeId::parse(&long).unwrap_err().to_string().contains("2048"));
        let long_td = format!("spiffe://{}/ns/a/sa/b", "t".repeat(256));
        assert!(SpiffeId::parse(&long_td).unwrap_err().to_string().contains("255"));
        // A hostile ID is truncated in the message.
        let error = SpiffeId::parse(&format!("x{}", "y".repeat(1000)))
            .unwrap_err()
            .to_string();
        assert!(error.len() < 400, "{error}");
    }

    #[test]
    fn a_bundle_needs_a_certificate_and_a_valid_trust_domain() {
        assert!(matches!(
            TrustBundle::from_pem("cluster.local", ""),
            Err(SvidError::Bundle { .. })
        ));
        assert!(matches!(
            TrustBundle::from_pem("Cluster.local", ""),
            Err(SvidError::Bundle { .. })
        ));
        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let error = TrustBundle::from_pem("cluster.local", garbage).unwrap_err();
        assert!(error.to_string().contains("root 0"), "{error}");
    }
}
