//! The webhook's own serving certificate: a small CA and a leaf it signs, minted and
//! rotated by the webhook itself, shared by every replica through one Secret.
//!
//! What is stored (Secret data keys):
//! - `ca.crt`/`ca.key`: the CA that signs the leaf being served;
//! - `tls.crt`/`tls.key`: the serving leaf;
//! - `bundle.crt`: every CA the API server must trust (the `caBundle`);
//! - `next-ca.crt`/`next-ca.key`/`next-since`: during a CA rotation, the CA that will
//!   sign the next leaf, already trusted, not yet used.
//!
//! A CA rotation has two steps so that no request ever meets a leaf the API server does
//! not trust yet: the new CA first joins the bundle (and the webhook configurations),
//! and only after `promote_after` does it sign the leaf. The old CA stays in the bundle
//! until it expires, for replicas still serving the old leaf. `plan` is pure; the
//! replicas race to write through resourceVersion preconditions, and a loser re-reads.

use parking_lot::RwLock;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use std::{collections::BTreeMap, sync::Arc, time::Duration};
use time::OffsetDateTime;

const CA_CRT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const TLS_CRT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const BUNDLE: &str = "bundle.crt";
const NEXT_CRT: &str = "next-ca.crt";
const NEXT_KEY: &str = "next-ca.key";
const NEXT_SINCE: &str = "next-since";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("generating a certificate")]
    Generate(#[from] rcgen::Error),
    #[error("loading the serving certificate into TLS")]
    Tls(#[from] rustls::Error),
    #[error("the stored serving certificate or key is unreadable")]
    Unreadable,
}

/// How long certificates live and when they are replaced.
#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    pub ca: Duration,
    pub leaf: Duration,
    /// How long a new CA is trusted before it signs the leaf.
    pub promote_after: Duration,
}

impl Lifetimes {
    fn renew_ca_before(&self) -> Duration {
        self.ca / 3
    }

    fn renew_leaf_before(&self) -> Duration {
        self.leaf / 3
    }
}

/// The Secret's data, as PEM text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stored {
    pub ca_cert: String,
    pub ca_key: String,
    pub tls_cert: String,
    pub tls_key: String,
    pub bundle: String,
    pub next: Option<(String, String, i64)>,
}

impl Stored {
    pub fn from_data(data: &BTreeMap<String, Vec<u8>>) -> Self {
        let text = |key: &str| {
            data.get(key)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let next = match (data.get(NEXT_CRT), data.get(NEXT_KEY)) {
            (Some(_), Some(_)) => Some((
                text(NEXT_CRT),
                text(NEXT_KEY),
                text(NEXT_SINCE).trim().parse().unwrap_or(0),
            )),
            _ => None,
        };
        Self {
            ca_cert: text(CA_CRT),
            ca_key: text(CA_KEY),
            tls_cert: text(TLS_CRT),
            tls_key: text(TLS_KEY),
            bundle: text(BUNDLE),
            next,
        }
    }

    pub fn to_data(&self) -> BTreeMap<String, Vec<u8>> {
        let mut data: BTreeMap<String, Vec<u8>> = [
            (CA_CRT, &self.ca_cert),
            (CA_KEY, &self.ca_key),
            (TLS_CRT, &self.tls_cert),
            (TLS_KEY, &self.tls_key),
            (BUNDLE, &self.bundle),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.clone().into_bytes()))
        .collect();
        if let Some((cert, key, since)) = &self.next {
            data.insert(NEXT_CRT.into(), cert.clone().into_bytes());
            data.insert(NEXT_KEY.into(), key.clone().into_bytes());
            data.insert(NEXT_SINCE.into(), since.to_string().into_bytes());
        }
        data
    }
}

/// The parts of a certificate the plan looks at.
struct Info {
    subject: String,
    issuer: String,
    not_after: OffsetDateTime,
    sans: Vec<String>,
}

fn info(pem: &str) -> Option<Info> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let sans = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                    x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                        4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(*ip).ok()?).to_string()),
                        16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(*ip).ok()?).to_string()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(Info {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        not_after: cert.validity().not_after.to_datetime(),
        sans,
    })
}

/// Every certificate in a PEM bundle, each as its own PEM block.
fn split_bundle(bundle: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in bundle.lines() {
        current.push_str(line);
        current.push('\n');
        if line.starts_with("-----END CERTIFICATE-----") {
            out.push(std::mem::take(&mut current));
        }
    }
    out
}

fn remaining(not_after: OffsetDateTime, now: OffsetDateTime) -> Duration {
    let left = not_after - now;
    if left.is_negative() {
        Duration::ZERO
    } else {
        left.unsigned_abs()
    }
}

fn new_ca(now: OffsetDateTime, life: &Lifetimes) -> Result<(String, String), Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    // A distinct name per CA, so a leaf's issuer says which CA signed it.
    dn.push(
        DnType::CommonName,
        format!("capstan-webhook-ca-{}", now.unix_timestamp_nanos()),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + life.ca;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn new_leaf(
    ca_cert: &str,
    ca_key: &str,
    sans: &[String],
    now: OffsetDateTime,
    life: &Lifetimes,
) -> Result<(String, String), Error> {
    let ca_key = KeyPair::from_pem(ca_key)?;
    let ca_not_after = info(ca_cert).ok_or(Error::Unreadable)?.not_after;
    let issuer = Issuer::from_ca_cert_pem(ca_cert, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = sans
        .iter()
        .map(|san| match san.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(san.clone().try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, sans.first().cloned().unwrap_or_default());
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now - time::Duration::minutes(5);
    // Never outlive the CA: a leaf past its issuer's expiry would fail verification.
    params.not_after = (now + life.leaf).min(ca_not_after);
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// What the Secret should hold now, given what it holds: `None` when it is fine as it is.
pub fn plan(
    stored: &Stored,
    sans: &[String],
    now: OffsetDateTime,
    life: &Lifetimes,
) -> Result<Option<Stored>, Error> {
    let mut next = stored.clone();
    let ca = info(&stored.ca_cert).filter(|ca| {
        KeyPair::from_pem(&stored.ca_key).is_ok() && remaining(ca.not_after, now) > Duration::ZERO
    });
    let Some(ca) = ca else {
        // Nothing usable (first start, or the Secret was emptied): start over.
        let (ca_cert, ca_key) = new_ca(now, life)?;
        let (tls_cert, tls_key) = new_leaf(&ca_cert, &ca_key, sans, now, life)?;
        return Ok(Some(Stored {
            bundle: ca_cert.clone(),
            ca_cert,
            ca_key,
            tls_cert,
            tls_key,
            next: None,
        }));
    };
    let mut reissue = false;
    match &stored.next {
        // Step 1 of a rotation: trust the next CA, keep signing with the current one.
        None if remaining(ca.not_after, now) < life.renew_ca_before() => {
            let (cert, key) = new_ca(now, life)?;
            next.next = Some((cert, key, now.unix_timestamp()));
        }
        // Step 2: it has been trusted long enough; it signs from now on.
        Some((cert, key, since))
            if now.unix_timestamp() - since >= life.promote_after.as_secs() as i64
                && info(cert).is_some() =>
        {
            next.ca_cert = cert.clone();
            next.ca_key = key.clone();
            next.next = None;
            reissue = true;
        }
        _ => {}
    }
    let current_subject = info(&next.ca_cert).map(|c| c.subject).unwrap_or_default();
    let leaf_ok = info(&stored.tls_cert).is_some_and(|leaf| {
        remaining(leaf.not_after, now) >= life.renew_leaf_before() && leaf.issuer == current_subject && {
            let mut have = leaf.sans.clone();
            let mut want = sans.to_vec();
            have.sort();
            want.sort();
            have == want
        }
    }) && PrivateKeyDer::from_pem_slice(stored.tls_key.as_bytes()).is_ok();
    if reissue || !leaf_ok {
        let (cert, key) = new_leaf(&next.ca_cert, &next.ca_key, sans, now, life)?;
        next.tls_cert = cert;
        next.tls_key = key;
    }
    // The bundle: the signing CA, the next one, and older ones until they expire.
    let mut bundle = vec![next.ca_cert.clone()];
    if let Some((cert, _, _)) = &next.next {
        bundle.push(cert.clone());
    }
    for old in split_bundle(&stored.bundle) {
        let alive = info(&old).is_some_and(|c| remaining(c.not_after, now) > Duration::ZERO);
        if alive && !bundle.iter().any(|b| b.trim() == old.trim()) {
            bundle.push(old);
        }
    }
    next.bundle = bundle.concat();
    Ok((next != *stored).then_some(next))
}

/// When the stored leaf expires (for the metric), if readable.
pub fn leaf_not_after(stored: &Stored) -> Option<i64> {
    info(&stored.tls_cert).map(|i| i.not_after.unix_timestamp())
}

/// Serves whichever leaf was loaded last: rotation swaps it under live connections.
#[derive(Debug, Default)]
pub struct Resolver {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl Resolver {
    pub fn load(&self, stored: &Stored) -> Result<(), Error> {
        let certs = CertificateDer::pem_slice_iter(stored.tls_cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Error::Unreadable)?;
        let key = PrivateKeyDer::from_pem_slice(stored.tls_key.as_bytes()).map_err(|_| Error::Unreadable)?;
        let key = rustls::crypto::ring::sign::any_supported_type(&key)?;
        *self.current.write() = Some(Arc::new(CertifiedKey::new(certs, key)));
        Ok(())
    }

    #[cfg(test)]
    pub fn is_loaded(&self) -> bool {
        self.current.read().is_some()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn life() -> Lifetimes {
        Lifetimes {
            ca: Duration::from_secs(3000),
            leaf: Duration::from_secs(300),
            promote_after: Duration::from_secs(60),
        }
    }

    fn sans() -> Vec<String> {
        vec!["capstan-webhook.capstan-system.svc".into(), "127.0.0.1".into()]
    }

    fn t0() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    fn at(seconds: i64) -> OffsetDateTime {
        t0() + time::Duration::seconds(seconds)
    }

    #[test]
    fn an_empty_secret_gets_a_ca_and_a_leaf_for_the_names_and_then_stays() {
        let first = plan(&Stored::default(), &sans(), t0(), &life()).unwrap().unwrap();
        let leaf = info(&first.tls_cert).unwrap();
        assert_eq!(leaf.issuer, info(&first.ca_cert).unwrap().subject);
        let mut got = leaf.sans.clone();
        got.sort();
        assert_eq!(got, ["127.0.0.1", "capstan-webhook.capstan-system.svc"]);
        assert_eq!(first.bundle, first.ca_cert);
        assert_eq!(plan(&first, &sans(), at(10), &life()).unwrap(), None);
        // Round trip through the Secret's data.
        assert_eq!(Stored::from_data(&first.to_data()), first);
    }

    #[test]
    fn the_leaf_is_renewed_before_expiry_and_when_the_names_change() {
        let first = plan(&Stored::default(), &sans(), t0(), &life()).unwrap().unwrap();
        let renewed = plan(&first, &sans(), at(201), &life()).unwrap().unwrap();
        assert_ne!(renewed.tls_cert, first.tls_cert);
        assert_eq!(renewed.ca_cert, first.ca_cert);
        let other = plan(&first, &["elsewhere.svc".into()], at(1), &life())
            .unwrap()
            .unwrap();
        assert_eq!(info(&other.tls_cert).unwrap().sans, ["elsewhere.svc"]);
    }

    #[test]
    fn a_ca_rotation_trusts_the_new_ca_before_it_signs_and_keeps_the_old_one() {
        let first = plan(&Stored::default(), &sans(), t0(), &life()).unwrap().unwrap();
        // Past two thirds of the CA's life: step 1, the next CA joins the bundle only.
        let step1 = plan(&first, &sans(), at(2100), &life()).unwrap().unwrap();
        let (next_ca, _, _) = step1.next.clone().unwrap();
        assert_eq!(step1.ca_cert, first.ca_cert);
        assert_eq!(
            split_bundle(&step1.bundle),
            [first.ca_cert.clone(), next_ca.clone()]
        );
        assert_eq!(
            info(&step1.tls_cert).unwrap().issuer,
            info(&first.ca_cert).unwrap().subject
        );
        // Not yet promoted a moment later (the leaf may be renewed meanwhile).
        let early = plan(&step1, &sans(), at(2110), &life()).unwrap();
        assert!(early.is_none_or(|s| s.ca_cert == first.ca_cert));
        // Step 2: promoted; the leaf is signed by the new CA; both stay trusted.
        let step2 = plan(&step1, &sans(), at(2170), &life()).unwrap().unwrap();
        assert_eq!(step2.ca_cert, next_ca);
        assert!(step2.next.is_none());
        assert_eq!(
            info(&step2.tls_cert).unwrap().issuer,
            info(&next_ca).unwrap().subject
        );
        assert_eq!(
            split_bundle(&step2.bundle),
            [next_ca.clone(), first.ca_cert.clone()]
        );
        // Once the old CA has expired it leaves the bundle.
        let later = plan(&step2, &sans(), at(3400), &life()).unwrap().unwrap();
        assert_eq!(split_bundle(&later.bundle), [next_ca]);
    }

    #[test]
    fn the_resolver_serves_the_loaded_leaf() {
        rustls::crypto::ring::default_provider().install_default().ok();
        let stored = plan(&Stored::default(), &sans(), OffsetDateTime::now_utc(), &life())
            .unwrap()
            .unwrap();
        let resolver = Resolver::default();
        assert!(!resolver.is_loaded());
        resolver.load(&stored).unwrap();
        assert!(resolver.is_loaded());
    }
}
