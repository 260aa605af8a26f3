//! The properties the fuzz targets (mesh/fuzz) check, shared with the stable test that
//! replays their seed corpora (mesh/tests/fuzz_seeds.rs). Each function takes the raw
//! fuzz input, must never panic on its own, and panics when a property breaks.
#![allow(dead_code)]

use capstan_mesh::path::normalize;
use capstan_mesh::svid::{
    PeerRole, SpiffeId, SvidClientVerifier, TrustBundle, peer_spiffe_id, verify_svid, verify_svid_as,
};
use capstan_mesh::{ConnectionDecision, Identity, Policy, Request};
use rustls::pki_types::{CertificateDer, UnixTime};
use std::sync::OnceLock;
use std::time::Duration;

/// The root the SVID seeds chain to (written with them by `write_fuzz_seeds`).
pub const FUZZ_ROOT_PEM: &str = include_str!("fixtures/fuzz-root.pem");
/// The time the SVID checks verify at: inside the seeds' validity (2025 to 2099).
pub const FUZZ_NOW_SECS: u64 = 1_900_000_000; // 2030-03-17

/// The HTTP path normalizer: never panics; what it returns is absolute, normalizes to
/// itself, and holds no "//", "/./", "/../", backslash or encoded separator.
pub fn check_path(data: &[u8]) {
    let input = String::from_utf8_lossy(data);
    let Ok(normal) = normalize(&input) else {
        return;
    };
    assert!(normal.starts_with('/'), "{input:?} -> {normal:?}");
    for bad in ["//", "/./", "/../", "\\", "?", "#"] {
        assert!(!normal.contains(bad), "{input:?} -> {normal:?} holds {bad:?}");
    }
    assert!(
        !normal.ends_with("/.") && !normal.ends_with("/.."),
        "{input:?} -> {normal:?}"
    );
    let upper = normal.to_ascii_uppercase();
    assert!(
        !upper.contains("%2F") && !upper.contains("%5C"),
        "{input:?} -> {normal:?} holds an encoded separator"
    );
    // No control character of any kind (C1 controls, U+0080-U+009F, were passed
    // through until fuzzing found it).
    assert!(
        !normal.chars().any(|c| c.is_control() || c == ' '),
        "{input:?} -> {normal:?}"
    );
    assert_eq!(
        normalize(&normal).as_deref(),
        Ok(normal.as_str()),
        "normalizing {input:?} twice changed it"
    );
}

/// The intention matcher. The input is NUL-separated fields:
/// `<kind byte><pattern> \0 <method> \0 <target> \0 <header name> \0 <header value>`,
/// the kind byte choosing how the pattern is used (`e` pathExact, `p` pathPrefix,
/// `r` pathRegex, `h` a header regex, anything else a header exact match).
///
/// The policy denies requests matching the pattern and allows everything else under `/`.
/// Never panics, and a decision depends on the normalized path only: every spelling of
/// the target that normalizes to the same path gets the same decision, and one that
/// does not normalize is denied. So no spelling slips past the deny rule.
pub fn check_policy(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut fields = text.split('\0');
    let mut next = || fields.next().unwrap_or("").to_owned();
    let (rule, method, target, header_name, header_value) = (next(), next(), next(), next(), next());
    let mut chars = rule.chars();
    let kind = chars.next().unwrap_or('p');
    let pattern: String = chars.collect();
    let http = match kind {
        'e' => serde_json::json!({"pathExact": pattern}),
        'p' => serde_json::json!({"pathPrefix": pattern}),
        'r' => serde_json::json!({"pathRegex": pattern}),
        'h' => serde_json::json!({"header": [{"name": header_name, "regex": pattern}]}),
        _ => serde_json::json!({"header": [{"name": header_name, "exact": pattern}], "methods": ["GET"]}),
    };
    let spec = serde_json::json!({
        "apiVersion": "mesh.capstan.dev/v1alpha1",
        "kind": "ServiceIntentions",
        "metadata": {"name": "api", "namespace": "shop", "creationTimestamp": "2025-01-01T00:00:00Z"},
        "spec": {"destination": {"name": "api"}, "sources": [
            {"name": "web", "permissions": [
                {"action": "deny", "http": http},
                {"action": "allow", "http": {"pathPrefix": "/"}},
            ]},
            {"name": "*", "action": "deny"},
        ]},
    });
    let Ok(object) = serde_json::from_value::<capstan_crds::ServiceIntentions>(spec) else {
        return;
    };
    let policy = Policy::compile(&[object], false, "capstan-system");
    let (web, api) = (Identity::new("shop", "web"), Identity::new("shop", "api"));
    assert!(matches!(
        policy.connection(&web, &api),
        ConnectionDecision::PerRequest { .. }
    ));
    let headers = [(header_name.as_str(), header_value.as_str())];
    let decide = |target: &str| {
        policy
            .request(
                &web,
                &api,
                &Request {
                    method: &method,
                    target,
                    headers: &headers,
                },
            )
            .allow
    };
    let original = decide(&target);
    let normal = normalize(&target);
    if normal.is_err() {
        assert!(!original, "{target:?} does not normalize but was allowed");
    }
    for variant in spellings(&target) {
        let allowed = decide(&variant);
        match normalize(&variant) {
            Err(_) => assert!(!allowed, "{variant:?} does not normalize but was allowed"),
            Ok(n) if Ok(&n) == normal.as_ref() => assert_eq!(
                allowed, original,
                "{target:?} and {variant:?} both normalize to {n:?} but are decided differently"
            ),
            Ok(_) => {}
        }
    }
    // A source no rule names is denied whatever it asks.
    let stranger = Identity::new("other", "web");
    assert!(
        !policy
            .request(
                &stranger,
                &api,
                &Request {
                    method: &method,
                    target: &target,
                    headers: &headers
                }
            )
            .allow
    );
}

/// Other spellings of `target`'s path, most of which normalize to the same path.
fn spellings(target: &str) -> Vec<String> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let with_query = |p: String| match query {
        Some(q) => format!("{p}?{q}"),
        None => p,
    };
    let mut out = Vec::new();
    if path.starts_with('/') {
        out.push(with_query(format!("/{path}")));
        out.push(with_query(format!("/.{path}")));
        out.push(with_query(format!("/zz/..{path}")));
        out.push(with_query(path.replace('/', "//")));
        out.push(with_query(path.replacen('/', "/./", 1)));
    }
    if let Some((at, c)) = path.char_indices().find(|(_, c)| c.is_ascii_alphanumeric()) {
        let b = c as u8;
        out.push(with_query(format!("{}%{b:02X}{}", &path[..at], &path[at + 1..])));
        out.push(with_query(format!("{}%{b:02x}{}", &path[..at], &path[at + 1..])));
    }
    if query.is_none() {
        out.push(format!("{path}?fuzz=1"));
    }
    out
}

fn fuzz_bundle() -> &'static TrustBundle {
    static BUNDLE: OnceLock<TrustBundle> = OnceLock::new();
    BUNDLE.get_or_init(|| TrustBundle::from_pem("cluster.local", FUZZ_ROOT_PEM).expect("the fuzz root"))
}

/// The SVID validator on arbitrary DER: never panics, and agrees with itself. The first
/// byte chooses the shape: odd means the rest is a big-endian u16 length `n`, then a
/// leaf of `n` bytes, then one intermediate; even means the rest is one leaf. The rest is
/// also parsed as a SPIFFE ID, which must print back to itself.
pub fn check_svid(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (leaf, intermediates): (&[u8], Vec<CertificateDer<'_>>) = match rest {
        [hi, lo, body @ ..] if mode & 1 == 1 => {
            let at = usize::from(u16::from_be_bytes([*hi, *lo])).min(body.len());
            let (leaf, intermediate) = body.split_at(at);
            (leaf, vec![CertificateDer::from(intermediate)])
        }
        _ => (rest, Vec::new()),
    };
    let leaf = CertificateDer::from(leaf);
    let now = UnixTime::since_unix_epoch(Duration::from_secs(FUZZ_NOW_SECS));
    let bundle = fuzz_bundle();
    let verified = verify_svid(&leaf, &intermediates, bundle, now);
    let parsed = peer_spiffe_id(&leaf);
    if let Ok(id) = &verified {
        assert_eq!(
            parsed.as_ref(),
            Ok(id),
            "verified, yet the leaf's SPIFFE ID does not parse alike"
        );
        assert_eq!(id.trust_domain, bundle.trust_domain);
    }
    let as_client = verify_svid_as(&leaf, &intermediates, bundle, now, PeerRole::Client);
    if as_client.is_ok() {
        assert!(verified.is_ok(), "good for a client but not for any role");
    }
    {
        use rustls::server::danger::ClientCertVerifier;
        let verifier = SvidClientVerifier::new(bundle.clone());
        assert_eq!(
            verifier.verify_client_cert(&leaf, &intermediates, now).is_ok(),
            as_client.is_ok(),
            "the rustls verifier and verify_svid_as disagree"
        );
    }
    check_spiffe_id(rest);
}

/// SPIFFE ID parsing: never panics; an ID that parses prints back to its input.
pub fn check_spiffe_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(text) {
        assert_eq!(id.to_string(), text);
        assert_eq!(SpiffeId::parse(&id.to_string()).as_ref(), Ok(&id));
    }
}
