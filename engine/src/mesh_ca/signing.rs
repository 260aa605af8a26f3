//! The mesh CA: a root that signs short-lived leaf certificates carrying a workload's
//! SPIFFE ID (`spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`).
//!
//! This module is the signing core. The caller has already proven who is asking (the
//! ServiceAccount token, checked with TokenReview) and passes that identity in; the CSR
//! only contributes its public key, after proving possession of the private key (its
//! signature is verified). Nothing else a CSR asks for is copied: a CSR that asks for
//! any name other than the caller's own SPIFFE ID, or to be a CA, is refused outright
//! (RELIABILITY M8) rather than quietly trimmed, so a confused or hostile client learns
//! it was refused.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
    SerialNumber,
};
use std::time::Duration;
use time::OffsetDateTime;

/// How far back a leaf's validity starts, so a verifier whose clock is a little behind
/// ours does not see a not-yet-valid certificate.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CaError {
    #[error("invalid trust domain {0:?}: lowercase letters, digits, '.', '-' and '_' only")]
    TrustDomain(String),
    #[error("invalid identity {0:?}: namespace and ServiceAccount must be DNS-1123 names")]
    Identity(String),
    #[error("the CSR could not be parsed, or its signature does not verify")]
    Csr,
    /// The CSR names another workload: the caller asked for an identity it does not hold.
    #[error("the CSR asks for the identity {requested}, but the token proves {expected}")]
    ForeignIdentity { requested: String, expected: String },
    /// The CSR names something that is not a SPIFFE ID at all (DNS name, IP, e-mail...).
    #[error("the CSR asks for {0}; a mesh certificate carries only the caller's identity {1}")]
    ForeignName(String, String),
    #[error("the CSR asks to be a certificate authority")]
    WantsCa,
    #[error("the CSR's key must be ECDSA P-256")]
    KeyAlgorithm,
    #[error("the CA certificate or key could not be loaded")]
    Load,
    #[error("the CA's private key does not belong to its certificate")]
    KeyMismatch,
    #[error("invalid serving name {0:?}: a DNS name or an IP address")]
    ServingName(String),
    #[error("signing failed")]
    Sign,
}

/// A workload identity, already authenticated by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadIdentity {
    pub namespace: String,
    pub service_account: String,
}

impl WorkloadIdentity {
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }

    fn validate(&self) -> Result<(), CaError> {
        let dns1123 = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                && !s.starts_with(['-', '.'])
                && !s.ends_with(['-', '.'])
        };
        if dns1123(&self.namespace) && dns1123(&self.service_account) {
            Ok(())
        } else {
            Err(CaError::Identity(format!(
                "{}/{}",
                self.namespace, self.service_account
            )))
        }
    }
}

/// A signed leaf, PEM-encoded, with the chain a peer needs.
#[derive(Debug)]
pub struct Leaf {
    pub certificate_pem: String,
    pub spiffe_id: String,
    pub not_after: OffsetDateTime,
}

pub struct MeshCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    certificate_pem: String,
    not_after: OffsetDateTime,
}

impl MeshCa {
    /// A new self-signed root for `trust_domain`, valid for `validity`.
    pub fn generate(trust_domain: &str, validity: Duration) -> Result<Self, CaError> {
        validate_trust_domain(trust_domain)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|_| CaError::Sign)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "Capstan");
        name.push(
            DnType::CommonName,
            format!("Capstan mesh root for {trust_domain}"),
        );
        params.distinguished_name = name;
        // The SPIFFE trust bundle convention: the root names its trust domain.
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}")
                .try_into()
                .map_err(|_| CaError::TrustDomain(trust_domain.into()))?,
        )];
        // Signs leaves only: no intermediate below it.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + validity;
        params.serial_number = Some(random_serial());
        let certificate = params.self_signed(&key).map_err(|_| CaError::Sign)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            certificate_pem: certificate.pem(),
            not_after: params.not_after,
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA stored earlier (its certificate and key in PEM): a root, or an intermediate
    /// under a user's root. Only the first certificate of `certificate_pem` is the CA;
    /// any that follow are its chain, which the caller keeps. The key must be the
    /// certificate's: a mismatched pair would sign leaves nobody can verify.
    pub fn from_pem(trust_domain: &str, certificate_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        validate_trust_domain(trust_domain)?;
        let key = KeyPair::from_pem(key_pem).map_err(|_| CaError::Load)?;
        let (_, first) =
            x509_parser::pem::parse_x509_pem(certificate_pem.as_bytes()).map_err(|_| CaError::Load)?;
        let certificate_pem = pem_of(&first.contents);
        {
            let certificate = first.parse_x509().map_err(|_| CaError::Load)?;
            if !certificate.is_ca() {
                return Err(CaError::Load);
            }
            if certificate.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                return Err(CaError::KeyMismatch);
            }
        }
        let issuer = Issuer::from_ca_cert_pem(&certificate_pem, key).map_err(|_| CaError::Load)?;
        let not_after = not_after_of(&certificate_pem).ok_or(CaError::Load)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            issuer,
            certificate_pem,
            not_after,
        })
    }

    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// The private key in PEM, for storing in a Kubernetes Secret. Never log it.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// When the CA certificate itself expires (leaves never outlive it).
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// A TLS server certificate for the engine's own endpoint, with a fresh P-256 key:
    /// `names` are DNS names or IP addresses. Returns (certificate PEM, key PEM).
    pub fn issue_serving(&self, names: &[String], ttl: Duration) -> Result<(String, String), CaError> {
        let mut sans = Vec::with_capacity(names.len());
        for name in names {
            sans.push(match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) if !is_dns_name(name) => return Err(CaError::ServingName(name.clone())),
                Err(_) => SanType::DnsName(
                    name.clone()
                        .try_into()
                        .map_err(|_| CaError::ServingName(name.clone()))?,
                ),
            });
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|_| CaError::Sign)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "capstan-engine");
        params.distinguished_name = name;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = (now + ttl).min(self.not_after);
        params.serial_number = Some(random_serial());
        let certificate = params.signed_by(&key, &self.issuer).map_err(|_| CaError::Sign)?;
        Ok((certificate.pem(), key.serialize_pem()))
    }

    /// Signs a leaf for `identity` with the public key of `csr_pem`, valid for `ttl` but
    /// never beyond the root's own expiry.
    pub fn sign(&self, csr_pem: &str, identity: &WorkloadIdentity, ttl: Duration) -> Result<Leaf, CaError> {
        identity.validate()?;
        let spiffe_id = identity.spiffe_id(&self.trust_domain);
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|_| CaError::Csr)?;
        if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::KeyAlgorithm);
        }
        for san in &csr.params.subject_alt_names {
            let asked = match san {
                SanType::URI(uri) if uri.as_str() == spiffe_id => continue,
                SanType::URI(uri) => {
                    return Err(CaError::ForeignIdentity {
                        requested: uri.as_str().to_owned(),
                        expected: spiffe_id,
                    });
                }
                SanType::DnsName(name) => format!("DNS name {}", name.as_str()),
                SanType::IpAddress(ip) => format!("IP address {ip}"),
                SanType::Rfc822Name(mail) => format!("e-mail {}", mail.as_str()),
                _ => "another kind of name".to_owned(),
            };
            return Err(CaError::ForeignName(asked, spiffe_id));
        }
        if !matches!(csr.params.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa) {
            return Err(CaError::WantsCa);
        }

        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        // X509-SVID: the identity is the one URI SAN; the subject carries nothing.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            spiffe_id.clone().try_into().map_err(|_| CaError::Sign)?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = (now + ttl).min(self.not_after);
        params.serial_number = Some(random_serial());
        let leaf = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let certificate = leaf.signed_by(&self.issuer).map_err(|_| CaError::Sign)?;
        Ok(Leaf {
            certificate_pem: certificate.pem(),
            spiffe_id,
            not_after: leaf.params.not_after,
        })
    }
}

/// Checks names for `issue_serving` up front (a bad `--serving-san` fails at start).
pub fn validate_serving_names(names: &[String]) -> Result<(), CaError> {
    match names
        .iter()
        .find(|n| n.parse::<std::net::IpAddr>().is_err() && !is_dns_name(n))
    {
        Some(bad) => Err(CaError::ServingName(bad.clone())),
        None => Ok(()),
    }
}

/// A DNS name as a certificate may carry it: labels of letters, digits and '-'.
pub(crate) fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn validate_trust_domain(td: &str) -> Result<(), CaError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(CaError::TrustDomain(td.to_owned()))
    }
}

/// 16 random bytes from the system RNG, top bit clear (serials are positive INTEGERs).
pub(crate) fn random_serial() -> SerialNumber {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system RNG works");
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

/// One DER certificate as PEM.
pub fn pem_of(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

fn not_after_of(pem: &str) -> Option<OffsetDateTime> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let certificate = pem.parse_x509().ok()?;
    Some(certificate.validity().not_after.to_datetime())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PKCS_ECDSA_P384_SHA384;
    use x509_parser::{extensions::GeneralName, pem::parse_x509_pem};

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn web() -> WorkloadIdentity {
        WorkloadIdentity {
            namespace: "shop".into(),
            service_account: "web".into(),
        }
    }

    fn csr(sans: Vec<SanType>, alg: &'static rcgen::SignatureAlgorithm) -> String {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.to_owned().try_into().unwrap())
    }

    #[test]
    fn signs_a_leaf_for_the_callers_identity_only() {
        let ca = MeshCa::generate("cluster.local", 3650 * DAY).unwrap();
        for request in [
            csr(vec![], &PKCS_ECDSA_P256_SHA256),
            csr(
                vec![uri("spiffe://cluster.local/ns/shop/sa/web")],
                &PKCS_ECDSA_P256_SHA256,
            ),
        ] {
            let leaf = ca.sign(&request, &web(), DAY).unwrap();
            assert_eq!(leaf.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");

            let (_, pem) = parse_x509_pem(leaf.certificate_pem.as_bytes()).unwrap();
            let cert = pem.parse_x509().unwrap();
            let (_, root_pem) = parse_x509_pem(ca.certificate_pem().as_bytes()).unwrap();
            let root = root_pem.parse_x509().unwrap();
            cert.verify_signature(Some(root.public_key()))
                .expect("chains to the root");
            let sans = &cert
                .subject_alternative_name()
                .unwrap()
                .unwrap()
                .value
                .general_names;
            assert_eq!(
                sans,
                &vec![GeneralName::URI("spiffe://cluster.local/ns/shop/sa/web")],
                "exactly one URI SAN"
            );
            assert!(!cert.is_ca());
            let eku = cert.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.server_auth && eku.client_auth);
            let usage = cert.key_usage().unwrap().unwrap().value;
            assert!(usage.digital_signature() && !usage.key_cert_sign());
            assert_eq!(cert.subject().iter().count(), 0, "the subject carries nothing");
            let lifetime = cert.validity().not_after.timestamp() - OffsetDateTime::now_utc().unix_timestamp();
            assert!(
                (DAY.as_secs() as i64 - 5..=DAY.as_secs() as i64).contains(&lifetime),
                "{lifetime}"
            );
        }
    }

    /// RELIABILITY M8: a CSR naming anything but the caller is refused, not trimmed.
    #[test]
    fn refuses_csrs_for_other_names() {
        let ca = MeshCa::generate("cluster.local", 3650 * DAY).unwrap();
        let p256 = &PKCS_ECDSA_P256_SHA256;
        let own = uri("spiffe://cluster.local/ns/shop/sa/web");
        let cases = [
            vec![uri("spiffe://cluster.local/ns/shop/sa/api")],
            vec![own.clone(), uri("spiffe://cluster.local/ns/shop/sa/api")],
            vec![own.clone(), SanType::DnsName("api.shop.svc".try_into().unwrap())],
            vec![uri("spiffe://other.domain/ns/shop/sa/web")],
            vec![uri("spiffe://cluster.local/ns/shop/sa/web/x")],
            vec![own.clone(), SanType::IpAddress("10.0.0.1".parse().unwrap())],
        ];
        for sans in cases {
            let error = ca.sign(&csr(sans.clone(), p256), &web(), DAY).unwrap_err();
            assert!(
                matches!(error, CaError::ForeignName(..) | CaError::ForeignIdentity { .. }),
                "{sans:?}: {error}"
            );
        }
        let key = KeyPair::generate_for(p256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_csr = params.serialize_request(&key).unwrap().pem().unwrap();
        assert_eq!(ca.sign(&ca_csr, &web(), DAY).unwrap_err(), CaError::WantsCa);
        assert_eq!(
            ca.sign(&csr(vec![], &PKCS_ECDSA_P384_SHA384), &web(), DAY)
                .unwrap_err(),
            CaError::KeyAlgorithm
        );
        assert_eq!(ca.sign("not a csr", &web(), DAY).unwrap_err(), CaError::Csr);
        let bad = WorkloadIdentity {
            namespace: "shop".into(),
            service_account: "web/../api".into(),
        };
        assert!(matches!(
            ca.sign(&csr(vec![], p256), &bad, DAY),
            Err(CaError::Identity(_))
        ));
    }

    /// A CSR whose signature does not verify proves no possession of its key.
    #[test]
    fn refuses_a_csr_with_a_broken_signature() {
        let ca = MeshCa::generate("cluster.local", 3650 * DAY).unwrap();
        let good = csr(vec![], &PKCS_ECDSA_P256_SHA256);
        let (_, mut pem) = parse_x509_pem(good.as_bytes()).unwrap();
        let last = pem.contents.len() - 2;
        pem.contents[last] ^= 0x01;
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", pem.contents));
        assert_eq!(ca.sign(&tampered, &web(), DAY).unwrap_err(), CaError::Csr);
    }

    #[test]
    fn a_leaf_never_outlives_its_root_and_a_stored_root_reloads() {
        let ca = MeshCa::generate("cluster.local", DAY).unwrap();
        let leaf = ca
            .sign(&csr(vec![], &PKCS_ECDSA_P256_SHA256), &web(), 30 * DAY)
            .unwrap();
        assert!(leaf.not_after <= ca.not_after);
        let reloaded = MeshCa::from_pem("cluster.local", ca.certificate_pem(), &ca.key_pem()).unwrap();
        let leaf = reloaded
            .sign(&csr(vec![], &PKCS_ECDSA_P256_SHA256), &web(), DAY)
            .unwrap();
        let (_, pem) = parse_x509_pem(leaf.certificate_pem.as_bytes()).unwrap();
        let (_, root) = parse_x509_pem(ca.certificate_pem().as_bytes()).unwrap();
        pem.parse_x509()
            .unwrap()
            .verify_signature(Some(root.parse_x509().unwrap().public_key()))
            .unwrap();
        assert!(matches!(
            MeshCa::generate("Bad_Domain!", DAY),
            Err(CaError::TrustDomain(_))
        ));
    }

    #[test]
    fn another_workloads_id_is_a_foreign_identity_naming_both() {
        let ca = MeshCa::generate("cluster.local", DAY).unwrap();
        let request = csr(
            vec![uri("spiffe://cluster.local/ns/shop/sa/api")],
            &PKCS_ECDSA_P256_SHA256,
        );
        let error = ca.sign(&request, &web(), DAY).unwrap_err();
        assert_eq!(
            error,
            CaError::ForeignIdentity {
                requested: "spiffe://cluster.local/ns/shop/sa/api".into(),
                expected: "spiffe://cluster.local/ns/shop/sa/web".into(),
            }
        );
        let text = error.to_string();
        assert!(text.contains("sa/api") && text.contains("sa/web"), "{text}");
    }

    #[test]
    fn a_ca_loads_only_with_its_own_key() {
        let ca = MeshCa::generate("cluster.local", DAY).unwrap();
        let other = MeshCa::generate("cluster.local", DAY).unwrap();
        assert_eq!(
            MeshCa::from_pem("cluster.local", ca.certificate_pem(), &other.key_pem())
                .err()
                .unwrap(),
            CaError::KeyMismatch
        );
        // A leaf is not a CA, even with its key.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = CertificateParams::default().self_signed(&key).unwrap();
        assert_eq!(
            MeshCa::from_pem("cluster.local", &leaf.pem(), &key.serialize_pem())
                .err()
                .unwrap(),
            CaError::Load
        );
    }

    #[test]
    fn the_serving_certificate_names_dns_and_ips_and_chains_to_the_root() {
        let ca = MeshCa::generate("cluster.local", DAY).unwrap();
        let names = vec![
            "capstan-engine.capstan-system.svc".to_owned(),
            "127.0.0.1".to_owned(),
        ];
        let (cert_pem, key_pem) = ca.issue_serving(&names, DAY).unwrap();
        assert!(KeyPair::from_pem(&key_pem).is_ok());
        let (_, pem) = parse_x509_pem(cert_pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let (_, root) = parse_x509_pem(ca.certificate_pem().as_bytes()).unwrap();
        cert.verify_signature(Some(root.parse_x509().unwrap().public_key()))
            .unwrap();
        let sans = &cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert_eq!(
            sans,
            &vec![
                GeneralName::DNSName("capstan-engine.capstan-system.svc"),
                GeneralName::IPAddress(&[127, 0, 0, 1]),
            ]
        );
        assert!(cert.extended_key_usage().unwrap().unwrap().value.server_auth);
        assert!(matches!(
            ca.issue_serving(&["bad name!".to_owned()], DAY),
            Err(CaError::ServingName(_))
        ));
    }
}
