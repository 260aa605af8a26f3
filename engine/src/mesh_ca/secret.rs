//! The CA Secret's layout, and how it becomes signing material (pure: no API calls).
//!
//! Keys of the Secret (`--ca-secret`, default `capstan-mesh-ca`):
//!
//! | key | what |
//! | --- | --- |
//! | `tls.crt` | the signing CA certificate (PEM); for an intermediate, followed by any further intermediates up to (not including) the root |
//! | `tls.key` | its private key (PEM, ECDSA P-256) |
//! | `ca.crt` | the trust bundle: every root a peer must trust (PEM, one or more) |
//! | `next.crt`, `next.key` | during a rotation only: the new root, already in `ca.crt`, not signing yet |
//!
//! Annotations (state, no secrets, visible with `kubectl describe`):
//! `mesh.capstan.dev/managed-by: capstan-engine` marks a root the engine generated and
//! may rotate; `mesh.capstan.dev/rotate-requested-at` (set by a user) asks for a
//! rotation; `.../rotation-handled-request`, `.../next-activates-at` and
//! `.../retiring-roots` record where a rotation stands.
//!
//! A Secret without the `managed-by` annotation was supplied by the user (for example an
//! intermediate under the organisation's root): the engine signs with it and never
//! rotates it.

use super::rotation::{Retiring, RotationState, Step};
use crate::mesh_ca::signing::{CaError, MeshCa, pem_of};
use jiff::Timestamp;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use std::collections::BTreeMap;

pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";
pub const NEXT_CRT: &str = "next.crt";
pub const NEXT_KEY: &str = "next.key";

pub const MANAGED_BY: &str = "mesh.capstan.dev/managed-by";
pub const MANAGED_BY_VALUE: &str = "capstan-engine";
pub const ROTATE_REQUESTED_AT: &str = "mesh.capstan.dev/rotate-requested-at";
pub const HANDLED_REQUEST: &str = "mesh.capstan.dev/rotation-handled-request";
pub const NEXT_ACTIVATES_AT: &str = "mesh.capstan.dev/next-activates-at";
pub const RETIRING_ROOTS: &str = "mesh.capstan.dev/retiring-roots";

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("Secret key {0:?} is missing or empty")]
    Missing(&'static str),
    #[error("Secret key {0:?} is not valid PEM certificates")]
    Pem(&'static str),
    #[error("Secret keys tls.crt/tls.key: {0}")]
    Ca(#[source] CaError),
    #[error("annotation {0}: {1}")]
    Annotation(&'static str, String),
    #[error("tls.crt is an intermediate, but it does not chain to any root in ca.crt")]
    Unanchored,
}

/// What the engine signs with and hands out, parsed from one version of the Secret.
pub struct Material {
    pub ca: MeshCa,
    /// Intermediates a peer needs between a leaf and the roots (empty for a root CA).
    pub chain: Vec<String>,
    /// The whole trust bundle.
    pub roots: Vec<String>,
    /// The root the signing CA chains to.
    pub active_root: String,
    /// Whether the engine generated this root and may rotate it.
    pub managed: bool,
    pub rotation: RotationState,
    /// `rotate-requested-at`, when a user set it.
    pub requested: Option<Timestamp>,
    /// What is wrong with what a user wrote, without stopping the CA (a mistyped
    /// rotation request must not take signing down).
    pub warnings: Vec<String>,
    /// The soonest expiry among the trusted roots (the alarm metric).
    pub earliest_root_expiry: Option<Timestamp>,
}

fn data<'a>(secret: &'a Secret, key: &'static str) -> Option<&'a str> {
    secret
        .data
        .as_ref()?
        .get(key)
        .and_then(|b| std::str::from_utf8(&b.0).ok())
        .filter(|s| !s.trim().is_empty())
}

fn annotation<'a>(secret: &'a Secret, key: &str) -> Option<&'a str> {
    secret.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

fn timestamp(secret: &Secret, key: &'static str) -> Result<Option<Timestamp>, LayoutError> {
    annotation(secret, key)
        .map(|v| {
            v.trim()
                .parse::<Timestamp>()
                .map_err(|e| LayoutError::Annotation(key, format!("not an RFC 3339 time: {e}")))
        })
        .transpose()
}

/// Every certificate in a PEM bundle, as (PEM, DER).
pub fn split_pem(text: &str, key: &'static str) -> Result<Vec<(String, Vec<u8>)>, LayoutError> {
    let blocks = pem::parse_many(text).map_err(|_| LayoutError::Pem(key))?;
    let certs: Vec<_> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| (pem_of(b.contents()), b.into_contents()))
        .collect();
    if certs.is_empty() {
        return Err(LayoutError::Pem(key));
    }
    Ok(certs)
}

pub fn sha256_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `child` (DER) is signed by `parent` (DER).
fn signed_by(child: &[u8], parent: &[u8]) -> bool {
    use x509_parser::prelude::*;
    let (Ok((_, child)), Ok((_, parent))) = (
        X509Certificate::from_der(child),
        X509Certificate::from_der(parent),
    ) else {
        return false;
    };
    child.issuer() == parent.subject() && child.verify_signature(Some(parent.public_key())).is_ok()
}

fn not_after(der: &[u8]) -> Option<Timestamp> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Timestamp::from_second(cert.validity().not_after.timestamp()).ok()
}

/// Parses a version of the CA Secret.
pub fn parse(secret: &Secret, trust_domain: &str) -> Result<Material, LayoutError> {
    let crt = data(secret, TLS_CRT).ok_or(LayoutError::Missing(TLS_CRT))?;
    let key = data(secret, TLS_KEY).ok_or(LayoutError::Missing(TLS_KEY))?;
    let ca = MeshCa::from_pem(trust_domain, crt, key).map_err(LayoutError::Ca)?;
    let signing = split_pem(crt, TLS_CRT)?;
    let mut roots = match data(secret, CA_CRT) {
        Some(bundle) => split_pem(bundle, CA_CRT)?,
        None => vec![],
    };
    let self_signed = signed_by(&signing[0].1, &signing[0].1);
    let (chain, active_root) = if self_signed {
        // A root signs: it must be in the bundle even if ca.crt forgot it.
        if !roots.iter().any(|(_, der)| der == &signing[0].1) {
            roots.insert(0, signing[0].clone());
        }
        (vec![], signing[0].0.clone())
    } else {
        // An intermediate: its chain (tls.crt) must end at one of the bundle's roots.
        let last = &signing.last().expect("split_pem returns at least one").1;
        let linked = signing.windows(2).all(|w| signed_by(&w[0].1, &w[1].1));
        let anchor = roots.iter().find(|(_, root)| signed_by(last, root));
        match anchor {
            Some((pem, _)) if linked => (signing.iter().map(|(p, _)| p.clone()).collect(), pem.clone()),
            _ => return Err(LayoutError::Unanchored),
        }
    };
    let managed = annotation(secret, MANAGED_BY) == Some(MANAGED_BY_VALUE);
    let retiring = match annotation(secret, RETIRING_ROOTS) {
        Some(json) => serde_json::from_str::<Vec<Retiring>>(json)
            .map_err(|e| LayoutError::Annotation(RETIRING_ROOTS, e.to_string()))?,
        None => vec![],
    };
    let next_activates_at = if data(secret, NEXT_CRT).is_some() && data(secret, NEXT_KEY).is_some() {
        Some(
            timestamp(secret, NEXT_ACTIVATES_AT)?
                .ok_or(LayoutError::Missing("next-activates-at annotation"))?,
        )
    } else {
        None
    };
    let earliest_root_expiry = roots.iter().filter_map(|(_, der)| not_after(der)).min();
    let mut warnings = vec![];
    let requested = timestamp(secret, ROTATE_REQUESTED_AT).unwrap_or_else(|e| {
        warnings.push(e.to_string());
        None
    });
    Ok(Material {
        chain,
        roots: roots.into_iter().map(|(pem, _)| pem).collect(),
        active_root,
        managed,
        rotation: RotationState {
            handled_request: timestamp(secret, HANDLED_REQUEST)?,
            next_activates_at,
            retiring,
        },
        requested,
        warnings,
        earliest_root_expiry,
        ca,
    })
}

/// A new Secret for a freshly generated root.
pub fn for_new_root(name: &str, ca: &MeshCa) -> Secret {
    let mut secret = Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.to_owned()),
            annotations: Some([(MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned())].into()),
            labels: Some([("app.kubernetes.io/component".to_owned(), "engine".to_owned())].into()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    let data = secret.data.get_or_insert_with(BTreeMap::new);
    data.insert(
        TLS_CRT.into(),
        ByteString(ca.certificate_pem().as_bytes().to_vec()),
    );
    data.insert(TLS_KEY.into(), ByteString(ca.key_pem().into_bytes()));
    data.insert(
        CA_CRT.into(),
        ByteString(ca.certificate_pem().as_bytes().to_vec()),
    );
    secret
}

/// Writes a rotation step into a copy of the Secret (its resourceVersion kept, so the
/// update only lands on the version the step was computed from). `new_root` is the root
/// generated for a `Begin`.
pub fn apply_step(secret: &Secret, step: &Step, new_root: Option<&MeshCa>) -> Result<Secret, LayoutError> {
    let mut out = secret.clone();
    let data = out.data.get_or_insert_with(BTreeMap::new);
    let annotations = out.metadata.annotations.get_or_insert_with(BTreeMap::new);
    let text = |data: &BTreeMap<String, ByteString>, key: &'static str| {
        data.get(key)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .ok_or(LayoutError::Missing(key))
    };
    let mut bundle = match data.get(CA_CRT) {
        Some(b) => split_pem(&String::from_utf8_lossy(&b.0), CA_CRT)?,
        None => split_pem(&text(data, TLS_CRT)?, TLS_CRT)?,
    };
    let mut retiring: Vec<Retiring> = match annotations.get(RETIRING_ROOTS) {
        Some(json) => {
            serde_json::from_str(json).map_err(|e| LayoutError::Annotation(RETIRING_ROOTS, e.to_string()))?
        }
        None => vec![],
    };
    match step {
        Step::Begin {
            request,
            activates_at,
        } => {
            let root = new_root.ok_or(LayoutError::Missing(NEXT_CRT))?;
            data.insert(
                NEXT_CRT.into(),
                ByteString(root.certificate_pem().as_bytes().to_vec()),
            );
            data.insert(NEXT_KEY.into(), ByteString(root.key_pem().into_bytes()));
            bundle.extend(split_pem(root.certificate_pem(), NEXT_CRT)?);
            annotations.insert(HANDLED_REQUEST.into(), request.to_string());
            annotations.insert(NEXT_ACTIVATES_AT.into(), activates_at.to_string());
        }
        Step::Activate { drop_old_at } => {
            let old = split_pem(&text(data, TLS_CRT)?, TLS_CRT)?;
            let next_crt = data.remove(NEXT_CRT).ok_or(LayoutError::Missing(NEXT_CRT))?;
            let next_key = data.remove(NEXT_KEY).ok_or(LayoutError::Missing(NEXT_KEY))?;
            data.insert(TLS_CRT.into(), next_crt);
            data.insert(TLS_KEY.into(), next_key);
            annotations.remove(NEXT_ACTIVATES_AT);
            retiring.push(Retiring {
                sha256: sha256_hex(&old[0].1),
                drop_at: *drop_old_at,
            });
        }
        Step::Drop { sha256 } => {
            bundle.retain(|(_, der)| !sha256.contains(&sha256_hex(der)));
            retiring.retain(|r| !sha256.contains(&r.sha256));
        }
    }
    let joined: String = bundle.iter().map(|(pem, _)| pem.as_str()).collect();
    data.insert(CA_CRT.into(), ByteString(joined.into_bytes()));
    if retiring.is_empty() {
        annotations.remove(RETIRING_ROOTS);
    } else {
        annotations.insert(
            RETIRING_ROOTS.into(),
            serde_json::to_string(&retiring).expect("plain data serializes"),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;
    use rcgen::{
        BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    };
    use std::time::Duration;

    const TD: &str = "cluster.local";
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

    #[test]
    fn a_new_root_round_trips_through_its_secret() {
        let ca = MeshCa::generate(TD, YEAR).unwrap();
        let secret = for_new_root("capstan-mesh-ca", &ca);
        let material = parse(&secret, TD).unwrap();
        assert!(material.managed);
        assert!(material.chain.is_empty());
        assert_eq!(material.roots, vec![ca.certificate_pem().to_owned()]);
        assert_eq!(material.active_root, ca.certificate_pem());
        assert_eq!(material.rotation, RotationState::default());
        assert!(material.earliest_root_expiry.is_some());
    }

    #[test]
    fn rotation_steps_rewrite_the_secret() {
        let old = MeshCa::generate(TD, YEAR).unwrap();
        let new = MeshCa::generate(TD, YEAR).unwrap();
        let secret = for_new_root("ca", &old);
        let request: Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        let activates_at = request + SignedDuration::from_mins(5);

        let begun = apply_step(
            &secret,
            &Step::Begin {
                request,
                activates_at,
            },
            Some(&new),
        )
        .unwrap();
        let m = parse(&begun, TD).unwrap();
        assert_eq!(
            m.roots,
            vec![old.certificate_pem().to_owned(), new.certificate_pem().to_owned()]
        );
        assert_eq!(
            m.active_root,
            old.certificate_pem(),
            "the new root does not sign yet"
        );
        assert_eq!(m.ca.certificate_pem(), old.certificate_pem());
        assert_eq!(m.rotation.next_activates_at, Some(activates_at));
        assert_eq!(m.rotation.handled_request, Some(request));

        let drop_at = activates_at + SignedDuration::from_hours(24);
        let activated = apply_step(&begun, &Step::Activate { drop_old_at: drop_at }, None).unwrap();
        let m = parse(&activated, TD).unwrap();
        assert_eq!(m.ca.certificate_pem(), new.certificate_pem());
        assert_eq!(m.active_root, new.certificate_pem());
        assert_eq!(m.roots.len(), 2, "the old root is still trusted");
        assert_eq!(m.rotation.next_activates_at, None);
        let old_sha = sha256_hex(&split_pem(old.certificate_pem(), TLS_CRT).unwrap()[0].1);
        assert_eq!(
            m.rotation.retiring,
            vec![Retiring {
                sha256: old_sha.clone(),
                drop_at
            }]
        );
        assert!(activated.data.as_ref().unwrap().get(NEXT_KEY).is_none());

        let dropped = apply_step(
            &activated,
            &Step::Drop {
                sha256: vec![old_sha],
            },
            None,
        )
        .unwrap();
        let m = parse(&dropped, TD).unwrap();
        assert_eq!(m.roots, vec![new.certificate_pem().to_owned()]);
        assert!(m.rotation.retiring.is_empty());
    }

    fn intermediate_under(root_key: &KeyPair, root: &rcgen::Certificate) -> (String, KeyPair) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec![]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let issuer = rcgen::Issuer::from_ca_cert_der(root.der(), root_key).unwrap();
        (params.signed_by(&key, &issuer).unwrap().pem(), key)
    }

    fn user_root() -> (KeyPair, rcgen::Certificate) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec![]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&key).unwrap();
        (key, cert)
    }

    fn user_secret(crt: &str, key: &str, ca: &str) -> Secret {
        Secret {
            data: Some(
                [
                    (TLS_CRT.to_owned(), ByteString(crt.into())),
                    (TLS_KEY.to_owned(), ByteString(key.into())),
                    (CA_CRT.to_owned(), ByteString(ca.into())),
                ]
                .into(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn a_user_intermediate_signs_and_its_root_is_the_bundle() {
        let (root_key, root) = user_root();
        let (crt, key) = intermediate_under(&root_key, &root);
        let m = parse(&user_secret(&crt, &key.serialize_pem(), &root.pem()), TD).unwrap();
        assert!(!m.managed, "a user's CA is never rotated by the engine");
        assert_eq!(m.chain, vec![crt.clone()]);
        assert_eq!(m.roots, vec![root.pem()]);
        assert_eq!(m.active_root, root.pem());

        // An intermediate whose root is not in ca.crt is refused, not served.
        let (_, other_root) = user_root();
        assert!(matches!(
            parse(&user_secret(&crt, &key.serialize_pem(), &other_root.pem()), TD),
            Err(LayoutError::Unanchored)
        ));
        // A key that is not the certificate's is refused.
        let stranger = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        assert!(matches!(
            parse(&user_secret(&crt, &stranger.serialize_pem(), &root.pem()), TD),
            Err(LayoutError::Ca(CaError::KeyMismatch))
        ));
        assert!(matches!(
            parse(&Secret::default(), TD),
            Err(LayoutError::Missing(TLS_CRT))
        ));
    }

    #[test]
    fn a_mistyped_rotation_request_is_a_warning_not_an_outage() {
        let ca = MeshCa::generate(TD, YEAR).unwrap();
        let mut secret = for_new_root("ca", &ca);
        secret
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(ROTATE_REQUESTED_AT.into(), "yesterday".into());
        let material = parse(&secret, TD).unwrap();
        assert_eq!(material.requested, None);
        assert!(
            material.warnings[0].contains(ROTATE_REQUESTED_AT),
            "{:?}",
            material.warnings
        );
    }
}
