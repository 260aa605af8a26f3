//! The SVID verifiers in real TLS 1.3 handshakes (rustls client and server connections
//! pumping bytes in memory): M7 (refused peers, reason logged), M9 (an impostor with a
//! valid SVID of another service) and M13 (no session resumption across a trust-bundle
//! change).

mod common;

use capstan_mesh::svid::{
    SpiffeId, SvidError, SvidServerVerifier, TrustBundle, client_config, describe_tls_error, peer_spiffe_id,
    server_config, svid_error_of,
};
use common::pki::{self, API, Ca, TD, WEB};
use rcgen::{BasicConstraints, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, ServerConfig, ServerConnection};
use std::io::{Read, Write};
use std::sync::Arc;

const ALPN: &[u8] = b"capstan/1";

struct Workload {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn workload(ca: &Ca, uri: &str) -> Workload {
    let key = KeyPair::generate().unwrap();
    Workload {
        chain: vec![ca.sign(&pki::leaf_params(uri), &key)],
        key: pki::key_der(&key),
    }
}

fn bundle(ca: &Ca) -> TrustBundle {
    TrustBundle::from_pem(TD, &ca.pem()).unwrap()
}

fn server(bundle: TrustBundle, w: &Workload) -> Arc<ServerConfig> {
    server_config(bundle, w.chain.clone(), w.key.clone_key(), vec![ALPN.to_vec()]).unwrap()
}

fn client(bundle: TrustBundle, expected: &str, w: &Workload) -> Arc<ClientConfig> {
    client_config(
        bundle,
        SpiffeId::parse(expected).unwrap(),
        w.chain.clone(),
        w.key.clone_key(),
        vec![ALPN.to_vec()],
    )
    .unwrap()
}

#[derive(Debug)]
enum Failed {
    Client(rustls::Error),
    Server(rustls::Error),
}

impl Failed {
    fn svid_error(&self) -> Option<&SvidError> {
        match self {
            Failed::Client(e) | Failed::Server(e) => svid_error_of(e),
        }
    }
}

struct Connected {
    client: ClientConnection,
    server: ServerConnection,
}

/// Runs a handshake to completion (or to the first error) and exchanges one message
/// each way, as the sidecars would over a socket.
fn connect(client_config: Arc<ClientConfig>, server_config: Arc<ServerConfig>) -> Result<Connected, Failed> {
    let name = ServerName::try_from("api.shop.svc").unwrap();
    let mut client = ClientConnection::new(client_config, name).unwrap();
    let mut server = ServerConnection::new(server_config).unwrap();
    client.writer().write_all(b"ping").unwrap();
    for _ in 0..16 {
        pump(&mut client, &mut server).map_err(Failed::Server)?;
        pump(&mut server, &mut client).map_err(Failed::Client)?;
    }
    assert!(!client.is_handshaking() && !server.is_handshaking());
    let mut got = [0u8; 4];
    server.reader().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    server.writer().write_all(b"pong").unwrap();
    pump(&mut server, &mut client).map_err(Failed::Client)?;
    client.reader().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong");
    Ok(Connected { client, server })
}

/// Moves every pending TLS byte from `from` to `to` and lets `to` process them.
fn pump<A, B, DA, DB>(from: &mut A, to: &mut B) -> Result<(), rustls::Error>
where
    A: std::ops::DerefMut<Target = rustls::ConnectionCommon<DA>>,
    B: std::ops::DerefMut<Target = rustls::ConnectionCommon<DB>>,
{
    let mut bytes = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut bytes).unwrap();
    }
    let mut input = &bytes[..];
    while !input.is_empty() {
        to.read_tls(&mut input).unwrap();
        to.process_new_packets()?;
    }
    Ok(())
}

struct Mesh {
    ca: Ca,
    web: Workload,
    api: Workload,
}

fn mesh() -> Mesh {
    let ca = Ca::root(
        "Capstan mesh root for cluster.local",
        BasicConstraints::Constrained(0),
    );
    Mesh {
        web: workload(&ca, WEB),
        api: workload(&ca, API),
        ca,
    }
}

#[test]
fn a_valid_pair_connects_and_each_side_learns_the_other() {
    let m = mesh();
    let c = connect(client(bundle(&m.ca), API, &m.web), server(bundle(&m.ca), &m.api)).unwrap();
    assert_eq!(
        c.client.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(c.client.alpn_protocol(), Some(ALPN));
    let client_cert = &c.server.peer_certificates().unwrap()[0];
    assert_eq!(peer_spiffe_id(client_cert).unwrap().to_string(), WEB);
    let server_cert = &c.client.peer_certificates().unwrap()[0];
    assert_eq!(peer_spiffe_id(server_cert).unwrap().to_string(), API);
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let m = mesh();
    let verifier = SvidServerVerifier::new(bundle(&m.ca), SpiffeId::parse(API).unwrap());
    let anonymous = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    match connect(Arc::new(anonymous), server(bundle(&m.ca), &m.api)) {
        Err(Failed::Server(rustls::Error::NoCertificatesPresented)) => {}
        other => panic!(
            "expected the server to refuse a client without a certificate: {:?}",
            other.err()
        ),
    }
}

#[test]
fn a_client_from_another_ca_is_refused_with_the_reason() {
    let m = mesh();
    let foreign = Ca::root(
        "Capstan mesh root for cluster.local",
        BasicConstraints::Constrained(0),
    );
    let intruder = workload(&foreign, WEB);
    // The intruder trusts our root too, so that it is the server that judges it.
    let both = TrustBundle::from_pem(TD, &format!("{}{}", foreign.pem(), m.ca.pem())).unwrap();
    let failed = connect(client(both, API, &intruder), server(bundle(&m.ca), &m.api))
        .err()
        .expect("refused");
    assert!(matches!(failed, Failed::Server(_)), "{failed:?}");
    assert!(
        matches!(failed.svid_error(), Some(SvidError::Untrusted { .. })),
        "{failed:?}"
    );
    // What the sidecar's log line shows.
    let Failed::Server(error) = failed else {
        unreachable!()
    };
    assert_eq!(
        describe_tls_error(&error),
        "invalid peer certificate: the peer certificate does not chain to a root of trust domain \"cluster.local\": InvalidSignatureForPublicKey"
    );
}

#[test]
fn a_server_from_another_ca_is_refused() {
    let m = mesh();
    let foreign = Ca::root("Another root", BasicConstraints::Constrained(0));
    let failed = connect(
        client(bundle(&m.ca), API, &m.web),
        server(bundle(&m.ca), &workload(&foreign, API)),
    )
    .err()
    .expect("refused");
    assert!(matches!(failed, Failed::Client(_)), "{failed:?}");
    assert!(
        matches!(failed.svid_error(), Some(SvidError::Untrusted { .. })),
        "{failed:?}"
    );
}

/// M9: a server holding a perfectly valid SVID, but for another service, is an impostor.
#[test]
fn m9_a_server_with_the_svid_of_another_service_is_refused() {
    let m = mesh();
    let db = "spiffe://cluster.local/ns/shop/sa/db";
    let failed = connect(client(bundle(&m.ca), db, &m.web), server(bundle(&m.ca), &m.api))
        .err()
        .expect("refused");
    assert!(matches!(failed, Failed::Client(_)), "{failed:?}");
    assert_eq!(
        failed.svid_error(),
        Some(&SvidError::UnexpectedIdentity {
            expected: db.into(),
            presented: API.into()
        })
    );
    // The same service name in another namespace is another identity too.
    let other_ns = "spiffe://cluster.local/ns/other/sa/api";
    assert!(
        connect(
            client(bundle(&m.ca), other_ns, &m.web),
            server(bundle(&m.ca), &m.api)
        )
        .is_err()
    );
}

/// M7 through a handshake: a client whose certificate is a CA is refused and the reason
/// reaches the server's error.
#[test]
fn m7_a_ca_certificate_as_client_leaf_is_refused() {
    let m = mesh();
    let key = KeyPair::generate().unwrap();
    let mut params = pki::leaf_params(WEB);
    params.is_ca = rcgen::IsCa::Ca(BasicConstraints::Unconstrained);
    let rogue = Workload {
        chain: vec![m.ca.sign(&params, &key)],
        key: pki::key_der(&key),
    };
    let failed = connect(client(bundle(&m.ca), API, &rogue), server(bundle(&m.ca), &m.api))
        .err()
        .expect("refused");
    assert_eq!(failed.svid_error(), Some(&SvidError::LeafIsCa), "{failed:?}");
}

fn resumable_server(bundle: TrustBundle, w: &Workload) -> Arc<ServerConfig> {
    // rustls's defaults: stateful session cache and TLS 1.3 tickets.
    let verifier = capstan_mesh::svid::SvidClientVerifier::new(bundle);
    let config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(w.chain.clone(), w.key.clone_key())
        .unwrap();
    Arc::new(config)
}

fn resumable_client(bundle: TrustBundle, expected: &str, w: &Workload) -> Arc<ClientConfig> {
    let verifier = SvidServerVerifier::new(bundle, SpiffeId::parse(expected).unwrap());
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(w.chain.clone(), w.key.clone_key())
        .unwrap();
    Arc::new(config)
}

/// M13: a resumed TLS 1.3 session skips certificate verification, so after a trust
/// bundle changes it could admit a peer the new bundle refuses. Capstan's configurations
/// never resume: each side alone is enough to force a full handshake.
#[test]
fn m13_every_connection_is_a_full_handshake() {
    let m = mesh();
    // The control: with rustls's defaults the second connection resumes, so this test
    // can see resumption when it happens.
    let (c, s) = (
        resumable_client(bundle(&m.ca), API, &m.web),
        resumable_server(bundle(&m.ca), &m.api),
    );
    let first = connect(c.clone(), s.clone()).unwrap();
    assert_eq!(first.client.handshake_kind(), Some(HandshakeKind::Full));
    let second = connect(c, s).unwrap();
    assert_eq!(second.client.handshake_kind(), Some(HandshakeKind::Resumed));

    // Capstan's server, even facing a client that would resume, issues no ticket.
    let (c, s) = (
        resumable_client(bundle(&m.ca), API, &m.web),
        server(bundle(&m.ca), &m.api),
    );
    for _ in 0..3 {
        let conn = connect(c.clone(), s.clone()).unwrap();
        assert_eq!(conn.client.handshake_kind(), Some(HandshakeKind::Full));
        assert_eq!(conn.server.handshake_kind(), Some(HandshakeKind::Full));
    }
    // Capstan's client, facing a server that issues tickets, never offers one.
    let (c, s) = (
        client(bundle(&m.ca), API, &m.web),
        resumable_server(bundle(&m.ca), &m.api),
    );
    for _ in 0..3 {
        let conn = connect(c.clone(), s.clone()).unwrap();
        assert_eq!(conn.client.handshake_kind(), Some(HandshakeKind::Full));
        assert_eq!(conn.server.handshake_kind(), Some(HandshakeKind::Full));
    }
}

/// M13, the bundle change itself: the old root is dropped (say, compromised); a client
/// that connected under the old bundle, and would resume if it could, is refused by the
/// server's new configuration because its certificate is verified again.
#[test]
fn m13_a_peer_of_a_dropped_root_is_refused_after_the_bundle_changes() {
    let m = mesh();
    let new_ca = Ca::root(
        "Capstan mesh root for cluster.local (new)",
        BasicConstraints::Constrained(0),
    );
    let new_api = workload(&new_ca, API);
    // A client still holding a leaf of the old root, and resumption state.
    let old_client = resumable_client(
        TrustBundle::from_pem(TD, &format!("{}{}", m.ca.pem(), new_ca.pem())).unwrap(),
        API,
        &m.web,
    );
    let before = server(bundle(&m.ca), &m.api);
    connect(old_client.clone(), before).unwrap();
    let after = server(bundle(&new_ca), &new_api);
    let failed = connect(old_client, after)
        .err()
        .expect("refused after the bundle change");
    assert!(
        matches!(failed.svid_error(), Some(SvidError::Untrusted { .. })),
        "{failed:?}"
    );
    // And a client built from the new bundle refuses a server still on the old root.
    let new_web = workload(&new_ca, WEB);
    let failed = connect(
        client(bundle(&new_ca), API, &new_web),
        server(bundle(&m.ca), &m.api),
    )
    .err()
    .expect("refused");
    assert!(matches!(failed, Failed::Client(_)), "{failed:?}");
}

/// The server asks for client certificates naming the bundle's roots.
#[test]
fn the_server_hints_its_roots() {
    use rustls::server::danger::ClientCertVerifier;
    let m = mesh();
    let verifier = capstan_mesh::svid::SvidClientVerifier::new(bundle(&m.ca));
    assert_eq!(verifier.root_hint_subjects().len(), 1);
    assert!(verifier.offer_client_auth() && verifier.client_auth_mandatory());
    assert!(server_config(bundle(&m.ca), vec![], m.api.key.clone_key(), vec![]).is_err());
}
