//! Gate G13 (RELIABILITY M7): the SVID validator rejects every certificate of a corpus of
//! malformed X509-SVIDs (X509-SVID §4–5, SPIFFE-ID §2), for the reason the case is about,
//! through `verify_svid` and through both rustls verifiers, while well-formed SVIDs pass.
//! Prints the count by category: that table is the G13 figure.

mod common;

use capstan_mesh::svid::{
    PeerRole, SpiffeId, SvidClientVerifier, SvidError, SvidServerVerifier, TrustBundle, svid_error_of,
    verify_svid_as,
};
use common::pki::{self, Ca, TD, WEB};
use rcgen::{BasicConstraints, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use std::collections::BTreeMap;
use std::time::Duration;
use time::OffsetDateTime;

struct Case {
    category: &'static str,
    name: String,
    leaf: CertificateDer<'static>,
    intermediates: Vec<CertificateDer<'static>>,
    /// The roles the certificate must be refused in.
    roles: &'static [PeerRole],
    /// The metric labels of the errors that name this case's defect.
    expected: &'static [&'static str],
}

const ALL_ROLES: &[PeerRole] = &[PeerRole::Any, PeerRole::Client, PeerRole::Server];

struct Pki {
    root: Ca,
    /// A second root of the bundle, as during a rotation; it allows no intermediates.
    rotated_root: Ca,
    intermediate: Ca,
    foreign_root: Ca,
    key: KeyPair,
}

impl Pki {
    fn new() -> Self {
        let root = Ca::root(
            "Capstan mesh root for cluster.local",
            BasicConstraints::Unconstrained,
        );
        let rotated_root = Ca::root(
            "Capstan mesh root for cluster.local (next)",
            BasicConstraints::Constrained(0),
        );
        let intermediate = root.intermediate(Ca::intermediate_params("Capstan mesh intermediate"));
        let foreign_root = Ca::root("Another mesh's root", BasicConstraints::Unconstrained);
        Self {
            root,
            rotated_root,
            intermediate,
            foreign_root,
            key: KeyPair::generate().unwrap(),
        }
    }

    fn bundle(&self) -> TrustBundle {
        TrustBundle::from_pem(TD, &format!("{}{}", self.root.pem(), self.rotated_root.pem())).unwrap()
    }

    fn direct(
        &self,
        params: &rcgen::CertificateParams,
    ) -> (CertificateDer<'static>, Vec<CertificateDer<'static>>) {
        (self.root.sign(params, &self.key), Vec::new())
    }

    fn via_intermediate(
        &self,
        params: &rcgen::CertificateParams,
    ) -> (CertificateDer<'static>, Vec<CertificateDer<'static>>) {
        (
            self.intermediate.sign(params, &self.key),
            vec![self.intermediate.cert.clone()],
        )
    }
}

type Shape = fn(&Pki, &rcgen::CertificateParams) -> (CertificateDer<'static>, Vec<CertificateDer<'static>>);

/// Each leaf defect is tried on a leaf signed by the root and on one signed through an
/// intermediate: the chain shape must not change the verdict.
const SHAPES: &[(&str, Shape)] = &[
    ("direct", Pki::direct),
    ("via intermediate", Pki::via_intermediate),
];

/// URI SANs that are not SPIFFE IDs of the bundle's trust domain with the path
/// /ns/<ns>/sa/<sa>, and the error each must produce.
fn bad_ids() -> Vec<(String, &'static str)> {
    let invalid = "invalid_id";
    let foreign = "foreign_trust_domain";
    let mut ids: Vec<(String, &'static str)> = [
        // scheme
        ("https://cluster.local/ns/shop/sa/web", invalid),
        ("http://cluster.local/ns/shop/sa/web", invalid),
        ("SPIFFE://cluster.local/ns/shop/sa/web", invalid),
        ("Spiffe://cluster.local/ns/shop/sa/web", invalid),
        ("spiffe:/cluster.local/ns/shop/sa/web", invalid),
        ("spiffe:cluster.local/ns/shop/sa/web", invalid),
        ("spiff://cluster.local/ns/shop/sa/web", invalid),
        ("urn:spiffe:cluster.local:ns:shop:sa:web", invalid),
        ("//cluster.local/ns/shop/sa/web", invalid),
        (" spiffe://cluster.local/ns/shop/sa/web", invalid),
        ("spiffe//cluster.local/ns/shop/sa/web", invalid),
        // trust domain: foreign, look-alike, uppercase, empty, port, userinfo, encoded
        ("spiffe://example.org/ns/shop/sa/web", foreign),
        ("spiffe://cluster.local.evil/ns/shop/sa/web", foreign),
        ("spiffe://evil.cluster.local/ns/shop/sa/web", foreign),
        ("spiffe://cluster.loca/ns/shop/sa/web", foreign),
        ("spiffe://cluster-local/ns/shop/sa/web", foreign),
        ("spiffe://cluster.local./ns/shop/sa/web", foreign),
        ("spiffe://127.0.0.1/ns/shop/sa/web", foreign),
        ("spiffe://xn--clster-3ya.local/ns/shop/sa/web", foreign),
        ("spiffe://CLUSTER.LOCAL/ns/shop/sa/web", invalid),
        ("spiffe://Cluster.local/ns/shop/sa/web", invalid),
        ("spiffe:///ns/shop/sa/web", invalid),
        ("spiffe://", invalid),
        ("spiffe://cluster.local:443/ns/shop/sa/web", invalid),
        ("spiffe://cluster.local:/ns/shop/sa/web", invalid),
        ("spiffe://user@cluster.local/ns/shop/sa/web", invalid),
        ("spiffe://user:secret@cluster.local/ns/shop/sa/web", invalid),
        ("spiffe://cluster.local@evil/ns/shop/sa/web", invalid),
        ("spiffe://cluster%2Elocal/ns/shop/sa/web", invalid),
        ("spiffe://clu ster.local/ns/shop/sa/web", invalid),
        ("spiffe://[::1]/ns/shop/sa/web", invalid),
        ("spiffe://cluster.local\\ns/shop/sa/web", invalid),
        // root and odd paths
        ("spiffe://cluster.local", invalid),
        ("spiffe://cluster.local/", invalid),
        ("spiffe://cluster.local/ns/shop/sa/web/", invalid),
        ("spiffe://cluster.local//ns/shop/sa/web", invalid),
        ("spiffe://cluster.local/ns//shop/sa/web", invalid),
        ("spiffe://cluster.local/ns/shop/sa/web//", invalid),
        ("spiffe://cluster.local/ns/shop/sa", invalid),
        ("spiffe://cluster.local/ns/shop/sa/", invalid),
        ("spiffe://cluster.local/ns/shop", invalid),
        ("spiffe://cluster.local/ns", invalid),
        ("spiffe://cluster.local/ns/shop/sa/web/extra", invalid),
        ("spiffe://cluster.local/sa/web/ns/shop", invalid),
        ("spiffe://cluster.local/NS/shop/SA/web", invalid),
        ("spiffe://cluster.local/ns/shop/serviceaccount/web", invalid),
        ("spiffe://cluster.local/workload", invalid),
        ("spiffe://cluster.local/ns/shop/sa/./web", invalid),
        ("spiffe://cluster.local/ns/./sa/web", invalid),
        ("spiffe://cluster.local/ns/../sa/web", invalid),
        ("spiffe://cluster.local/ns/shop/sa/..", invalid),
        ("spiffe://cluster.local/ns/shop/sa/web/.", invalid),
        ("spiffe://cluster.local/ns/shop/sa/web/..", invalid),
        ("spiffe://cluster.local/ns/other/../shop/sa/web", invalid),
        ("spiffe://cluster.local/ns/shop/sa/web;x", invalid),
        ("spiffe://cluster.local/ns/shop/sa/we b", invalid),
        ("spiffe://cluster.local/ns/shop/sa/web\\x", invalid),
        ("spiffe://cluster.local/ns/shop/sa/web:8080", invalid),
        ("spiffe://cluster.local/ns/shop/sa/*", invalid),
        ("spiffe://cluster.local/ns/*/sa/web", invalid),
        ("spiffe://cluster.local/ns/shop/sa/web+x", invalid),
        // percent-encoding, query, fragment
        ("spiffe://cluster.local/ns/shop/sa/w%65b", invalid),
        ("spiffe://cluster.local/ns/%73hop/sa/web", invalid),
        ("spiffe://cluster.local/ns/shop%2Fsa/sa/web", invalid),
        ("spiffe://cluster.local/ns/shop/sa/web%2F", invalid),
        ("spiffe://cluster.local/ns/shop/sa/web%00", invalid),
        ("spiffe://cluster.local/ns/shop/sa/web%", invalid),
        ("spiffe://cluster.local/ns/shop/sa/web?x=1", invalid),
        ("spiffe://cluster.local/ns/shop/sa/web?", invalid),
        ("spiffe://cluster.local?/ns/shop/sa/web", invalid),
        ("spiffe://cluster.local/ns/shop/sa/web#frag", invalid),
        ("spiffe://cluster.local/ns/shop/sa/web#", invalid),
        ("spiffe://cluster.local/ns/shop/sa/web?a#b", invalid),
        ("", invalid),
    ]
    .into_iter()
    .map(|(id, label)| (id.to_owned(), label))
    .collect();
    ids.push((
        format!("spiffe://cluster.local/ns/shop/sa/{}", "a".repeat(2100)),
        invalid,
    ));
    ids.push((format!("spiffe://{}/ns/shop/sa/web", "t".repeat(256)), invalid));
    ids
}

fn corpus(pki: &Pki) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut push = |category: &'static str,
                    name: String,
                    (leaf, intermediates): (CertificateDer<'static>, Vec<CertificateDer<'static>>),
                    roles: &'static [PeerRole],
                    expected: &'static [&'static str]| {
        cases.push(Case {
            category,
            name,
            leaf,
            intermediates,
            roles,
            expected,
        })
    };

    // The SPIFFE ID in the URI SAN (SPIFFE-ID §2), alone or beside a DNS SAN (allowed by
    // X509-SVID, so it must not change the verdict).
    for (id, label) in bad_ids() {
        let expected: &'static [&'static str] = if label == "invalid_id" {
            &["invalid_id"]
        } else {
            &["foreign_trust_domain"]
        };
        for (shape, build) in SHAPES {
            let mut params = pki::leaf_params(WEB);
            params.subject_alt_names = vec![pki::uri_san(&id)];
            push(
                "spiffe-id",
                format!("{id:?} ({shape})"),
                build(pki, &params),
                ALL_ROLES,
                expected,
            );
        }
        let mut params = pki::leaf_params(WEB);
        params.subject_alt_names = vec![
            SanType::DnsName("web.shop.svc".try_into().unwrap()),
            pki::uri_san(&id),
        ];
        push(
            "spiffe-id",
            format!("{id:?} (with a DNS SAN)"),
            pki.direct(&params),
            ALL_ROLES,
            expected,
        );
    }
    // Bytes rcgen's IA5String cannot carry, written raw.
    for raw in [
        &b"spiffe://cluster.local/ns/shop/sa/w\xc3\xa9b"[..],
        b"spiffe://cluster.local/ns/shop/sa/web\0.evil",
        b"spiffe://cluster.local/ns/shop/sa/web\n",
        b"spiffe://cluster.local/ns/shop/sa/web\x7f",
        b"spiffe://cluster.local/ns/shop/sa/\xff",
    ] {
        for (shape, build) in SHAPES {
            let mut params = pki::leaf_params(WEB);
            params.subject_alt_names = Vec::new();
            params.custom_extensions = vec![pki::raw_uri_san_extension(&[raw])];
            push(
                "spiffe-id",
                format!("raw {:?} ({shape})", String::from_utf8_lossy(raw)),
                build(pki, &params),
                ALL_ROLES,
                // x509-parser drops a URI SAN that is not IA5 text: none is left.
                &["invalid_id", "malformed", "uri_san_count"],
            );
        }
    }

    // Exactly one URI SAN (X509-SVID §2).
    let dns = || SanType::DnsName("web.shop.svc".try_into().unwrap());
    let san_sets: Vec<(&str, Vec<SanType>)> = vec![
        ("no SAN extension", vec![]),
        ("a DNS SAN only", vec![dns()]),
        (
            "an IP SAN only",
            vec![SanType::IpAddress("10.0.0.7".parse().unwrap())],
        ),
        (
            "an e-mail SAN only",
            vec![SanType::Rfc822Name("web@shop.example".try_into().unwrap())],
        ),
        ("the same URI twice", vec![pki::uri_san(WEB), pki::uri_san(WEB)]),
        ("two identities", vec![pki::uri_san(WEB), pki::uri_san(pki::API)]),
        (
            "own and foreign",
            vec![
                pki::uri_san(WEB),
                pki::uri_san("spiffe://example.org/ns/shop/sa/web"),
            ],
        ),
        (
            "foreign then own",
            vec![
                pki::uri_san("spiffe://example.org/ns/shop/sa/web"),
                pki::uri_san(WEB),
            ],
        ),
        (
            "valid and invalid",
            vec![
                pki::uri_san(WEB),
                pki::uri_san("https://cluster.local/ns/shop/sa/web"),
            ],
        ),
        (
            "valid and a root ID",
            vec![pki::uri_san("spiffe://cluster.local"), pki::uri_san(WEB)],
        ),
        (
            "three URIs",
            vec![pki::uri_san(WEB), pki::uri_san(pki::API), pki::uri_san(WEB)],
        ),
        (
            "two URIs and a DNS name",
            vec![dns(), pki::uri_san(WEB), pki::uri_san(pki::API)],
        ),
    ];
    for (name, sans) in san_sets {
        for (shape, build) in SHAPES {
            let mut params = pki::leaf_params(WEB);
            params.subject_alt_names = sans.clone();
            push(
                "uri-san-count",
                format!("{name} ({shape})"),
                build(pki, &params),
                ALL_ROLES,
                &["uri_san_count"],
            );
        }
    }
    // Two subjectAltName extensions, each with one URI: a parser that reads only the
    // first would see one identity.
    for (shape, build) in SHAPES {
        let mut params = pki::leaf_params(WEB);
        params.custom_extensions = vec![pki::raw_uri_san_extension(&[pki::API.as_bytes()])];
        push(
            "uri-san-count",
            format!("two SAN extensions ({shape})"),
            build(pki, &params),
            ALL_ROLES,
            &["malformed", "untrusted"],
        );
    }
    let mut params = pki::leaf_params(WEB);
    params.subject_alt_names = Vec::new();
    params.custom_extensions = vec![pki::raw_uri_san_extension(&[])];
    push(
        "uri-san-count",
        "an empty SAN extension".into(),
        pki.direct(&params),
        ALL_ROLES,
        &["uri_san_count", "malformed", "untrusted"],
    );

    // A leaf that is a CA (X509-SVID §4.1, §5.2).
    for (name, constraint) in [
        ("cA=true", BasicConstraints::Unconstrained),
        ("cA=true, pathLen 0", BasicConstraints::Constrained(0)),
        ("cA=true, pathLen 5", BasicConstraints::Constrained(5)),
    ] {
        for key_usages in [
            vec![KeyUsagePurpose::DigitalSignature],
            vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign],
        ] {
            for (shape, build) in SHAPES {
                let mut params = pki::leaf_params(WEB);
                params.is_ca = IsCa::Ca(constraint);
                params.key_usages = key_usages.clone();
                push(
                    "leaf-is-ca",
                    format!("{name}, {key_usages:?} ({shape})"),
                    build(pki, &params),
                    ALL_ROLES,
                    &["leaf_is_ca"],
                );
            }
        }
    }

    // Key usage (X509-SVID §4.3, §5.2).
    use KeyUsagePurpose::*;
    let key_usage_sets: Vec<(&str, Vec<KeyUsagePurpose>, &'static [&'static str])> = vec![
        (
            "keyCertSign",
            vec![DigitalSignature, KeyCertSign],
            &["leaf_can_sign"],
        ),
        ("cRLSign", vec![DigitalSignature, CrlSign], &["leaf_can_sign"]),
        (
            "keyCertSign and cRLSign",
            vec![DigitalSignature, KeyCertSign, CrlSign],
            &["leaf_can_sign"],
        ),
        ("keyCertSign only", vec![KeyCertSign], &["leaf_can_sign"]),
        ("cRLSign only", vec![CrlSign], &["leaf_can_sign"]),
        (
            "keyCertSign with keyAgreement",
            vec![DigitalSignature, KeyAgreement, KeyCertSign],
            &["leaf_can_sign"],
        ),
        ("no keyUsage extension", vec![], &["no_digital_signature"]),
        (
            "keyEncipherment only",
            vec![KeyEncipherment],
            &["no_digital_signature"],
        ),
        ("keyAgreement only", vec![KeyAgreement], &["no_digital_signature"]),
        (
            "contentCommitment only",
            vec![ContentCommitment],
            &["no_digital_signature"],
        ),
        (
            "dataEncipherment only",
            vec![DataEncipherment],
            &["no_digital_signature"],
        ),
        (
            "keyAgreement and encipherOnly",
            vec![KeyAgreement, EncipherOnly],
            &["no_digital_signature"],
        ),
    ];
    for (name, key_usages, expected) in key_usage_sets {
        for (shape, build) in SHAPES {
            let mut params = pki::leaf_params(WEB);
            params.key_usages = key_usages.clone();
            push(
                "key-usage",
                format!("{name} ({shape})"),
                build(pki, &params),
                ALL_ROLES,
                expected,
            );
        }
    }

    // Validity.
    let now = OffsetDateTime::now_utc();
    let hour = Duration::from_secs(3600);
    let windows: Vec<(&str, OffsetDateTime, OffsetDateTime, &'static [&'static str])> = vec![
        (
            "expired a second ago",
            now - hour,
            now - Duration::from_secs(1),
            &["expired"],
        ),
        ("expired an hour ago", now - 2 * hour, now - hour, &["expired"]),
        (
            "expired in 1999",
            rcgen::date_time_ymd(1998, 1, 1),
            rcgen::date_time_ymd(1999, 1, 1),
            &["expired"],
        ),
        (
            "not yet valid for a minute",
            now + Duration::from_secs(60),
            now + hour,
            &["not_yet_valid"],
        ),
        (
            "not yet valid for a day",
            now + 24 * hour,
            now + 48 * hour,
            &["not_yet_valid"],
        ),
        (
            "not yet valid until 2090",
            rcgen::date_time_ymd(2090, 1, 1),
            rcgen::date_time_ymd(2091, 1, 1),
            &["not_yet_valid"],
        ),
        (
            "notAfter before notBefore",
            now + hour,
            now - hour,
            &["expired", "not_yet_valid", "malformed"],
        ),
    ];
    for (name, not_before, not_after, expected) in windows {
        for (shape, build) in SHAPES {
            let mut params = pki::leaf_params(WEB);
            params.not_before = not_before;
            params.not_after = not_after;
            push(
                "validity",
                format!("{name} ({shape})"),
                build(pki, &params),
                ALL_ROLES,
                expected,
            );
        }
    }
    for (name, not_before, not_after, expected) in [
        (
            "an expired intermediate",
            now - 2 * hour,
            now - hour,
            &["expired"][..],
        ),
        (
            "a not-yet-valid intermediate",
            now + hour,
            now + 2 * hour,
            &["not_yet_valid"][..],
        ),
    ] {
        let mut params = Ca::intermediate_params("Capstan mesh intermediate");
        params.not_before = not_before;
        params.not_after = not_after;
        let intermediate = pki.root.intermediate(params);
        let leaf = intermediate.sign(&pki::leaf_params(WEB), &pki.key);
        push(
            "validity",
            name.into(),
            (leaf, vec![intermediate.cert.clone()]),
            ALL_ROLES,
            expected,
        );
    }

    // The chain: it must end at a root of the bundle, through real CAs.
    let untrusted: &'static [&'static str] = &["untrusted"];
    let leaf = pki::leaf_params(WEB);
    push(
        "chain",
        "signed by a foreign CA".into(),
        (pki.foreign_root.sign(&leaf, &pki.key), vec![]),
        ALL_ROLES,
        untrusted,
    );
    push(
        "chain",
        "signed by a foreign CA, which is sent along".into(),
        (
            pki.foreign_root.sign(&leaf, &pki.key),
            vec![pki.foreign_root.cert.clone()],
        ),
        ALL_ROLES,
        untrusted,
    );
    let impostor = Ca::root(
        "Capstan mesh root for cluster.local",
        BasicConstraints::Unconstrained,
    );
    push(
        "chain",
        "signed by an impostor root with our root's name".into(),
        (impostor.sign(&leaf, &pki.key), vec![impostor.cert.clone()]),
        ALL_ROLES,
        untrusted,
    );
    push(
        "chain",
        "self-signed leaf".into(),
        (leaf.self_signed(&pki.key).unwrap().der().clone(), vec![]),
        ALL_ROLES,
        untrusted,
    );
    let mut named = leaf.clone();
    named.distinguished_name = pki::dn("Capstan mesh root for cluster.local");
    push(
        "chain",
        "self-signed leaf named like our root".into(),
        (named.self_signed(&pki.key).unwrap().der().clone(), vec![]),
        ALL_ROLES,
        untrusted,
    );
    let unknown = pki
        .foreign_root
        .intermediate(Ca::intermediate_params("Capstan mesh intermediate"));
    push(
        "chain",
        "through an unknown intermediate".into(),
        (unknown.sign(&leaf, &pki.key), vec![unknown.cert.clone()]),
        ALL_ROLES,
        untrusted,
    );
    push(
        "chain",
        "through an unknown intermediate, with its foreign root".into(),
        (
            unknown.sign(&leaf, &pki.key),
            vec![unknown.cert.clone(), pki.foreign_root.cert.clone()],
        ),
        ALL_ROLES,
        untrusted,
    );
    push(
        "chain",
        "intermediate not sent".into(),
        (pki.intermediate.sign(&leaf, &pki.key), vec![]),
        ALL_ROLES,
        untrusted,
    );
    for (name, is_ca) in [
        ("intermediate without basicConstraints", IsCa::NoCa),
        ("intermediate with cA=false", IsCa::ExplicitNoCa),
    ] {
        let mut params = Ca::intermediate_params("Capstan mesh intermediate");
        params.is_ca = is_ca;
        let not_a_ca = pki.root.intermediate(params);
        push(
            "chain",
            name.into(),
            (not_a_ca.sign(&leaf, &pki.key), vec![not_a_ca.cert.clone()]),
            ALL_ROLES,
            untrusted,
        );
    }
    let mut params = Ca::intermediate_params("Capstan mesh intermediate");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cannot_sign = pki.root.intermediate(params);
    push(
        "chain",
        "intermediate whose key usage lacks keyCertSign".into(),
        (cannot_sign.sign(&leaf, &pki.key), vec![cannot_sign.cert.clone()]),
        ALL_ROLES,
        untrusted,
    );
    let under_pathlen_0 = pki
        .rotated_root
        .intermediate(Ca::intermediate_params("Capstan mesh intermediate (next)"));
    push(
        "chain",
        "intermediate under a root with pathLen 0".into(),
        (
            under_pathlen_0.sign(&leaf, &pki.key),
            vec![under_pathlen_0.cert.clone()],
        ),
        ALL_ROLES,
        untrusted,
    );
    // Two intermediates under an intermediate limited to pathLen 0.
    let second = pki
        .intermediate
        .intermediate(Ca::intermediate_params("Capstan mesh sub-intermediate"));
    push(
        "chain",
        "two intermediates under pathLen 0".into(),
        (
            second.sign(&leaf, &pki.key),
            vec![second.cert.clone(), pki.intermediate.cert.clone()],
        ),
        ALL_ROLES,
        untrusted,
    );
    // A workload's own valid leaf used as a CA for another leaf.
    let (valid_leaf, _) = pki.direct(&leaf);
    let leaf_as_issuer = Ca {
        cert: valid_leaf.clone(),
        issuer: rcgen::Issuer::new(
            pki::leaf_params(WEB),
            KeyPair::from_pem(&pki.key.serialize_pem()).unwrap(),
        ),
    };
    let api_key = KeyPair::generate().unwrap();
    push(
        "chain",
        "signed by a workload's leaf".into(),
        (
            leaf_as_issuer.sign(&pki::leaf_params(pki::API), &api_key),
            vec![valid_leaf.clone()],
        ),
        ALL_ROLES,
        untrusted,
    );
    // A good leaf with its signature altered.
    let mut tampered = valid_leaf.to_vec();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    push(
        "chain",
        "a tampered signature".into(),
        (CertificateDer::from(tampered), vec![]),
        ALL_ROLES,
        untrusted,
    );
    // A good leaf whose to-be-signed bytes were altered (one bit of the URI).
    let mut altered = valid_leaf.to_vec();
    let at = altered
        .windows(WEB.len())
        .position(|w| w == WEB.as_bytes())
        .unwrap();
    altered[at + WEB.len() - 1] ^= 0x01; // web -> wec
    push(
        "chain",
        "a tampered SPIFFE ID".into(),
        (CertificateDer::from(altered), vec![]),
        ALL_ROLES,
        untrusted,
    );
    // The leaf of one bundle root presented with a chain to another.
    push(
        "chain",
        "a root's certificate presented as the leaf".into(),
        (pki.root.cert.clone(), vec![]),
        ALL_ROLES,
        &["leaf_is_ca", "untrusted"],
    );

    // Extended key usage: it must allow the role, when present (RFC 5280 §4.2.1.12).
    use ExtendedKeyUsagePurpose as Eku;
    let eku_sets: Vec<(&str, Vec<Eku>, &'static [PeerRole])> = vec![
        (
            "serverAuth only, as a client",
            vec![Eku::ServerAuth],
            &[PeerRole::Client],
        ),
        (
            "clientAuth only, as a server",
            vec![Eku::ClientAuth],
            &[PeerRole::Server],
        ),
        ("codeSigning only", vec![Eku::CodeSigning], ALL_ROLES),
        ("emailProtection only", vec![Eku::EmailProtection], ALL_ROLES),
        ("timeStamping only", vec![Eku::TimeStamping], ALL_ROLES),
        ("OCSPSigning only", vec![Eku::OcspSigning], ALL_ROLES),
        ("anyExtendedKeyUsage only", vec![Eku::Any], ALL_ROLES),
        (
            "codeSigning and serverAuth, as a client",
            vec![Eku::CodeSigning, Eku::ServerAuth],
            &[PeerRole::Client],
        ),
    ];
    for (name, ekus, roles) in eku_sets {
        for (shape, build) in SHAPES {
            let mut params = pki::leaf_params(WEB);
            params.extended_key_usages = ekus.clone();
            push(
                "extended-key-usage",
                format!("{name} ({shape})"),
                build(pki, &params),
                roles,
                &["wrong_usage"],
            );
        }
    }

    // Not a certificate at all.
    for (name, bytes) in [
        ("empty", Vec::new()),
        ("one byte", vec![0x30]),
        ("truncated", valid_leaf[..valid_leaf.len() / 2].to_vec()),
        ("trailing bytes", [valid_leaf.as_ref(), &[0u8]].concat()),
        ("a PEM text", pki::der_to_pem(&valid_leaf).into_bytes()),
    ] {
        push(
            "not-a-certificate",
            name.into(),
            (CertificateDer::from(bytes), vec![]),
            ALL_ROLES,
            &["malformed", "untrusted"],
        );
    }
    cases
}

/// Every path a peer certificate can take through the validator, in `role`.
fn verdicts(
    pki: &Pki,
    bundle: &TrustBundle,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    role: PeerRole,
) -> Vec<(String, Result<(), SvidError>)> {
    let now = UnixTime::now();
    let mut out = vec![(
        format!("verify_svid_as({role:?})"),
        verify_svid_as(leaf, intermediates, bundle, now, role).map(|_| ()),
    )];
    let from_rustls = |r: Result<(), rustls::Error>| {
        r.map_err(|e| {
            svid_error_of(&e)
                .cloned()
                .unwrap_or_else(|| panic!("not an SvidError: {e}"))
        })
    };
    if matches!(role, PeerRole::Client | PeerRole::Any) {
        let verifier = SvidClientVerifier::new(bundle.clone());
        out.push((
            "SvidClientVerifier".into(),
            from_rustls(verifier.verify_client_cert(leaf, intermediates, now).map(|_| ())),
        ));
    }
    if matches!(role, PeerRole::Server | PeerRole::Any) {
        let verifier = SvidServerVerifier::new(bundle.clone(), SpiffeId::parse(WEB).unwrap());
        let name = ServerName::try_from("web.shop.svc").unwrap();
        out.push((
            "SvidServerVerifier".into(),
            from_rustls(
                verifier
                    .verify_server_cert(leaf, intermediates, &name, &[], now)
                    .map(|_| ()),
            ),
        ));
    }
    let _ = pki;
    out
}

#[test]
fn g13_every_malformed_svid_is_rejected_and_valid_ones_pass() {
    let pki = Pki::new();
    let bundle = pki.bundle();

    // Controls: SVIDs as the engine issues them, and the variations the spec allows.
    let mut controls: Vec<(&str, (CertificateDer<'static>, Vec<CertificateDer<'static>>))> = Vec::new();
    let base = pki::leaf_params(WEB);
    controls.push(("as the engine issues it", pki.direct(&base)));
    controls.push(("through an intermediate", pki.via_intermediate(&base)));
    controls.push((
        "from the rotated root",
        (pki.rotated_root.sign(&base, &pki.key), vec![]),
    ));
    let mut p = base.clone();
    p.subject_alt_names
        .push(SanType::DnsName("web.shop.svc".try_into().unwrap()));
    controls.push(("with a DNS SAN too", pki.direct(&p)));
    let mut p = base.clone();
    p.extended_key_usages = Vec::new();
    controls.push(("without extendedKeyUsage", pki.direct(&p)));
    let mut p = base.clone();
    p.is_ca = IsCa::NoCa;
    controls.push(("without basicConstraints", pki.direct(&p)));
    let mut p = base.clone();
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyAgreement,
        KeyUsagePurpose::KeyEncipherment,
    ];
    controls.push(("with keyAgreement and keyEncipherment", pki.direct(&p)));
    let mut p = base.clone();
    p.distinguished_name = pki::dn("web");
    controls.push(("with a subject", pki.direct(&p)));
    for (name, (leaf, intermediates)) in &controls {
        for (path, verdict) in verdicts(&pki, &bundle, leaf, intermediates, PeerRole::Any) {
            assert_eq!(verdict, Ok(()), "control {name:?} refused by {path}");
        }
        assert_eq!(
            capstan_mesh::svid::verify_svid(leaf, intermediates, &bundle, UnixTime::now()).unwrap(),
            SpiffeId::new(TD, "shop", "web")
        );
        assert_eq!(capstan_mesh::svid::peer_spiffe_id(leaf).unwrap().to_string(), WEB);
    }

    let cases = corpus(&pki);
    let mut by_category: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut failures = Vec::new();
    for case in &cases {
        let mut all_rejected = true;
        for role in case.roles {
            for (path, verdict) in verdicts(&pki, &bundle, &case.leaf, &case.intermediates, *role) {
                match verdict {
                    Ok(()) => {
                        all_rejected = false;
                        failures.push(format!("[{}] {}: ACCEPTED by {path}", case.category, case.name));
                    }
                    Err(error) if !case.expected.contains(&error.metric_label()) => {
                        failures.push(format!(
                            "[{}] {}: rejected by {path} for another reason: {error}",
                            case.category, case.name
                        ));
                    }
                    Err(_) => {}
                }
            }
        }
        let entry = by_category.entry(case.category).or_default();
        entry.0 += 1;
        entry.1 += usize::from(all_rejected);
    }

    println!("G13: X509-SVID malformed-certificate corpus");
    println!("{:<22} {:>8} {:>9}", "category", "variants", "rejected");
    for (category, (total, rejected)) in &by_category {
        println!("{category:<22} {total:>8} {rejected:>9}");
    }
    let total = cases.len();
    let rejected: usize = by_category.values().map(|(_, r)| r).sum();
    println!(
        "{:<22} {total:>8} {rejected:>9}  ({} valid controls accepted)",
        "total",
        controls.len()
    );
    assert!(
        failures.is_empty(),
        "{} problems:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        total >= 200,
        "G13 asks for at least 200 variants, the corpus has {total}"
    );
    assert_eq!(rejected, total);
}

/// The messages say what is wrong (M7: "reason logged").
#[test]
fn rejections_say_why() {
    let pki = Pki::new();
    let bundle = pki.bundle();
    let now = UnixTime::now();
    let mut p = pki::leaf_params(WEB);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let (leaf, _) = pki.direct(&p);
    let error = verify_svid_as(&leaf, &[], &bundle, now, PeerRole::Any).unwrap_err();
    assert_eq!(
        error.to_string(),
        "the peer's leaf certificate is a CA (basicConstraints cA=true)"
    );
    let verifier = SvidClientVerifier::new(bundle.clone());
    let rustls_error = verifier.verify_client_cert(&leaf, &[], now).unwrap_err();
    assert_eq!(svid_error_of(&rustls_error), Some(&error));

    let mut p = pki::leaf_params("spiffe://example.org/ns/shop/sa/web");
    p.not_after = OffsetDateTime::now_utc() + Duration::from_secs(60);
    let (leaf, _) = pki.direct(&p);
    assert_eq!(
        verify_svid_as(&leaf, &[], &bundle, now, PeerRole::Any)
            .unwrap_err()
            .to_string(),
        "SPIFFE ID spiffe://example.org/ns/shop/sa/web is not in trust domain \"cluster.local\""
    );
    let error = verify_svid_as(
        &pki.foreign_root.sign(&pki::leaf_params(WEB), &pki.key),
        &[],
        &bundle,
        now,
        PeerRole::Any,
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.starts_with("the peer certificate does not chain to a root of trust domain \"cluster.local\""),
        "{error}"
    );

    let (leaf, _) = pki.direct(&pki::leaf_params(WEB));
    let later = UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs() + 7200));
    assert_eq!(
        verify_svid_as(&leaf, &[], &bundle, later, PeerRole::Any),
        Err(SvidError::Expired)
    );
}

/// The engine's leaves (engine/src/mesh_ca/signing.rs) carry both EKUs, so one certificate serves a
/// sidecar as client and as server.
#[test]
fn an_engine_shaped_leaf_serves_both_roles() {
    let pki = Pki::new();
    let bundle = pki.bundle();
    let (leaf, _) = pki.direct(&pki::leaf_params(WEB));
    for role in [PeerRole::Client, PeerRole::Server, PeerRole::Any] {
        assert!(
            verify_svid_as(&leaf, &[], &bundle, UnixTime::now(), role).is_ok(),
            "{role:?}"
        );
    }
    // A certificate of the bundle's trust domain under a different bundle is foreign.
    let other = TrustBundle::from_pem("example.org", &pki.root.pem()).unwrap();
    assert!(matches!(
        verify_svid_as(&leaf, &[], &other, UnixTime::now(), PeerRole::Any),
        Err(SvidError::ForeignTrustDomain { .. })
    ));
}
