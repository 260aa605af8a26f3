//! Replays the fuzz targets' seed corpora (mesh/fuzz/corpus/<target>/) through the same
//! checks the targets run, on stable Rust, as part of the normal test run. Any input a
//! fuzzing session found and saved there (crashes are added once fixed) stays a test.
//!
//! `cargo test -p capstan-mesh --test fuzz_seeds -- --ignored write_fuzz_seeds` rewrites
//! the generated seeds and the root they chain to.

mod common;
#[path = "common/fuzz_checks.rs"]
mod fuzz_checks;

use common::pki::{self, Ca, WEB};
use rcgen::{BasicConstraints, IsCa, KeyPair, KeyUsagePurpose};
use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = corpus_dir(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            panic!("{target} seed {} breaks a property", path.display());
        }
        count += 1;
    }
    assert!(count >= 3, "{target}: only {count} seeds");
    count
}

#[test]
fn path_seeds() {
    replay("path", fuzz_checks::check_path);
}

#[test]
fn policy_seeds() {
    replay("policy", fuzz_checks::check_policy);
}

#[test]
fn svid_seeds() {
    replay("svid", fuzz_checks::check_svid);
    // The valid seed really is valid, so the fuzzer starts from the accepting path.
    let leaf = std::fs::read(corpus_dir("svid").join("valid-leaf")).unwrap();
    let bundle = capstan_mesh::TrustBundle::from_pem("cluster.local", fuzz_checks::FUZZ_ROOT_PEM).unwrap();
    let now = rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        fuzz_checks::FUZZ_NOW_SECS,
    ));
    let id = capstan_mesh::svid::verify_svid(&leaf[1..].to_vec().into(), &[], &bundle, now).unwrap();
    assert_eq!(id.to_string(), WEB);
}

/// The M3 spellings of /admin and their relatives.
const PATH_SEEDS: &[&str] = &[
    "/admin",
    "//admin",
    "/%2Fadmin",
    "/%2fadmin",
    "\\admin",
    "/\\admin",
    "/%5Cadmin",
    "/a/../admin",
    "/./admin/",
    "/%61dmin",
    "/%61%64%6D%69%6E",
    "/admin;x",
    "/admin#x",
    "/public/../admin?x=1",
    "/x/y/../../admin",
    "/..",
    "/caf%c3%a9/%7e",
    "/ad%in",
    "/",
];

/// `<kind><pattern> \0 <method> \0 <target> \0 <header> \0 <value>` (see check_policy).
const POLICY_SEEDS: &[&str] = &[
    "p/admin\0GET\0//admin\0x-role\0clerk",
    "p/admin\0POST\0/public/../admin\0\0",
    "e/admin\0GET\0/%61dmin\0\0",
    "r/v[0-9]+/items\0GET\0/v2/./items?x=1\0host\0shop.example",
    "r(\0DELETE\0/x\0\0",
    "hclerk|admin\0GET\0/orders\0X-Role\0admin",
    "xclerk\0GET\0/orders\0x-role\0clerk",
    "p/\0GET\0/a/b/../c\0\0",
];

#[test]
#[ignore = "writes the seed corpora; run by hand when the checks change"]
fn write_fuzz_seeds() {
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    };
    for (i, seed) in PATH_SEEDS.iter().enumerate() {
        write("path", &format!("m3-{i:02}"), seed.as_bytes());
    }
    for (i, seed) in POLICY_SEEDS.iter().enumerate() {
        write("policy", &format!("seed-{i:02}"), seed.as_bytes());
    }

    // A root valid 2025-2099 and leaves inside it; check_svid verifies in 2030.
    let fixed = |mut params: rcgen::CertificateParams| {
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(2099, 1, 1);
        params
    };
    let root_key = KeyPair::generate().unwrap();
    let mut root_params = rcgen::CertificateParams::default();
    root_params.distinguished_name = pki::dn("Capstan fuzz root for cluster.local");
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root_params = fixed(root_params);
    let root_cert = root_params.self_signed(&root_key).unwrap().der().clone();
    let root = Ca {
        cert: root_cert,
        issuer: rcgen::Issuer::new(root_params, root_key),
    };
    std::fs::write(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/fixtures/fuzz-root.pem"),
        root.pem(),
    )
    .unwrap();
    let intermediate = root.intermediate(fixed(Ca::intermediate_params("Capstan fuzz intermediate")));
    let key = KeyPair::generate().unwrap();
    let leaf = |mutate: &dyn Fn(&mut rcgen::CertificateParams)| {
        let mut params = fixed(pki::leaf_params(WEB));
        mutate(&mut params);
        params
    };
    let single = |der: &[u8]| [&[0u8][..], der].concat();
    let chained = |leaf: &[u8], intermediate: &[u8]| {
        let len = u16::try_from(leaf.len()).unwrap().to_be_bytes();
        [&[1u8][..], &len, leaf, intermediate].concat()
    };
    let valid = root.sign(&leaf(&|_| {}), &key);
    write("svid", "valid-leaf", &single(&valid));
    let via = intermediate.sign(&leaf(&|_| {}), &key);
    write("svid", "via-intermediate", &chained(&via, &intermediate.cert));
    write(
        "svid",
        "ca-leaf",
        &single(&root.sign(
            &leaf(&|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)),
            &key,
        )),
    );
    write(
        "svid",
        "two-uris",
        &single(&root.sign(&leaf(&|p| p.subject_alt_names.push(pki::uri_san(pki::API))), &key)),
    );
    write(
        "svid",
        "key-cert-sign",
        &single(&root.sign(&leaf(&|p| p.key_usages.push(KeyUsagePurpose::KeyCertSign)), &key)),
    );
    write(
        "svid",
        "foreign-trust-domain",
        &single(&root.sign(
            &leaf(&|p| p.subject_alt_names = vec![pki::uri_san("spiffe://example.org/ns/shop/sa/web")]),
            &key,
        )),
    );
    write("svid", "root", &single(&root.cert));
    write("svid", "spiffe-id", format!("\0{WEB}").as_bytes());
    write(
        "svid",
        "spiffe-id-bad",
        b"\0spiffe://cluster.local/ns/shop/sa/web/",
    );
}
