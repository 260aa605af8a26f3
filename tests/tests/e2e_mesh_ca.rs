//! The mesh CA endpoint (capstan-engine) against the real API server: tokens from the
//! TokenRequest API checked with TokenReview, the root kept in a Secret and shared by
//! replicas, two-phase rotation (M12), refusals of foreign identities (M8), HTTPS only.

use anyhow::{Context as _, Result, ensure};
use capstan_tests::*;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use serde_json::{Value, json};
use std::time::Duration;
use x509_parser::{extensions::GeneralName, pem::parse_x509_pem, prelude::X509Certificate};

/// Every test starts from no CA at all: no Secret, no published roots.
async fn fresh_ca(client: &Client) {
    install_chart();
    let secrets = Api::<Secret>::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let _ = secrets.delete(MESH_CA_SECRET, &DeleteParams::default()).await;
    let configmaps =
        Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let _ = configmaps
        .delete(MESH_ROOTS_CONFIGMAP, &DeleteParams::default())
        .await;
    eventually(Duration::from_secs(10), "the CA Secret to be gone", || {
        let secrets = secrets.clone();
        async move {
            secrets
                .get_opt(MESH_CA_SECRET)
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await
    .unwrap();
}

async fn serviceaccount(client: &Client, ns: &str, name: &str) {
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
        .expect("creating a ServiceAccount");
}

fn csr(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.to_owned().try_into().unwrap())
}

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

fn der_of(pem: &str) -> Vec<u8> {
    parse_x509_pem(pem.as_bytes()).expect("PEM").1.contents
}

/// Whether the certificate `child` (PEM) is signed by `parent` (PEM).
fn signed_by(child: &str, parent: &str) -> bool {
    let (child, parent) = (der_of(child), der_of(parent));
    let (_, child) = <X509Certificate<'_> as x509_parser::prelude::FromDer<'_, _>>::from_der(&child).unwrap();
    let (_, parent) =
        <X509Certificate<'_> as x509_parser::prelude::FromDer<'_, _>>::from_der(&parent).unwrap();
    child.verify_signature(Some(parent.public_key())).is_ok()
}

fn uri_sans(pem: &str) -> Vec<String> {
    let der = der_of(pem);
    let (_, cert) = <X509Certificate<'_> as x509_parser::prelude::FromDer<'_, _>>::from_der(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().expect("a SAN extension");
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => format!("URI:{u}"),
            other => format!("{other:?}"),
        })
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// `POST /v1/mesh/sign`, trusting `bundle`.
async fn sign(engine: &EngineProcess, bundle: &str, token: Option<&str>, csr: &str) -> Result<(u16, Value)> {
    let body = json!({ "csr": csr }).to_string();
    https_json(engine.https, bundle, "POST", "/v1/mesh/sign", token, Some(&body)).await
}

fn bundle_of(roots: &Value) -> String {
    strings(&roots["roots"]).concat()
}

/// M8 and the contract: a leaf for the token's identity, chained to the returned root,
/// and every refusal with its status.
#[tokio::test]
async fn signs_the_tokens_identity_and_refuses_everything_else() -> Result<()> {
    let client = client().await;
    fresh_ca(&client).await;
    let ns = TestNamespace::new(&client, "e2e-meshca").await;
    serviceaccount(&client, &ns.name, "web").await;
    serviceaccount(&client, &ns.name, "api").await;
    let engine = EngineProcess::start(&client, "sign", &["--leaf-ttl", "1h"]).await?;
    let roots = engine.roots(&client).await?;
    assert_eq!(roots["trust_domain"], "cluster.local");
    let bundle = bundle_of(&roots);
    assert_eq!(strings(&roots["roots"]).len(), 1);
    assert_eq!(published_roots(&client).await.as_deref(), Some(bundle.as_str()));

    let web = serviceaccount_token(&client, &ns.name, "web", MESH_TOKEN_AUDIENCE).await?;
    let web_id = spiffe(&ns.name, "web");
    for request in [csr(vec![uri(&web_id)]), csr(vec![])] {
        let (code, body) = sign(&engine, &bundle, Some(&web), &request).await?;
        assert_eq!(code, 200, "{body}\n{}", engine.logs());
        let leaf = body["certificate"].as_str().unwrap();
        assert_eq!(uri_sans(leaf), vec![format!("URI:{web_id}")]);
        assert_eq!(body["spiffe_id"], web_id.as_str());
        assert!(
            signed_by(leaf, roots["active"].as_str().unwrap()),
            "chains to the root"
        );
        assert_eq!(strings(&body["chain"]), Vec::<String>::new());
        assert_eq!(strings(&body["roots"]), strings(&roots["roots"]));
        assert_eq!(body["ttl_seconds"], 3600);
        body["not_after"]
            .as_str()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .context("not_after is RFC 3339")?;
    }

    // Another audience: TokenReview refuses it for ours.
    let kube_token = serviceaccount_token(&client, &ns.name, "web", "https://kubernetes.default.svc").await?;
    let (code, body) = sign(&engine, &bundle, Some(&kube_token), &csr(vec![])).await?;
    assert_eq!(code, 401, "{body}");
    assert!(
        body["errors"][0].as_str().unwrap().contains(MESH_TOKEN_AUDIENCE),
        "{body}"
    );
    // No token, and a token that is not one.
    for token in [None, Some("not-a-token")] {
        let (code, body) = sign(&engine, &bundle, token, &csr(vec![])).await?;
        assert_eq!(code, 401, "{token:?}: {body}");
    }

    // M8: the api ServiceAccount asks for web's identity: 403 naming both.
    let api = serviceaccount_token(&client, &ns.name, "api", MESH_TOKEN_AUDIENCE).await?;
    let (code, body) = sign(&engine, &bundle, Some(&api), &csr(vec![uri(&web_id)])).await?;
    assert_eq!(code, 403, "{body}");
    let message = body["errors"][0].as_str().unwrap();
    assert!(
        message.contains(&web_id) && message.contains(&spiffe(&ns.name, "api")),
        "{message}"
    );
    // Its own identity plus another URI, or plus a DNS name: refused, never trimmed.
    let (code, body) = sign(
        &engine,
        &bundle,
        Some(&web),
        &csr(vec![uri(&web_id), uri(&spiffe(&ns.name, "api"))]),
    )
    .await?;
    assert_eq!(code, 403, "{body}");
    let (code, body) = sign(
        &engine,
        &bundle,
        Some(&web),
        &csr(vec![
            uri(&web_id),
            SanType::DnsName("api.default.svc".try_into().unwrap()),
        ]),
    )
    .await?;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["errors"][0].as_str().unwrap().contains("api.default.svc"),
        "{body}"
    );
    // Not a CSR, not the body shape, too big.
    let (code, body) = sign(&engine, &bundle, Some(&web), "not a csr").await?;
    assert_eq!(code, 400, "{body}");
    let (code, body) = https_json(
        engine.https,
        &bundle,
        "POST",
        "/v1/mesh/sign",
        Some(&web),
        Some(r#"{"pem": "x"}"#),
    )
    .await?;
    assert_eq!(code, 400, "{body}");
    let huge = json!({ "csr": "x".repeat(100 * 1024) }).to_string();
    let (code, _) = https_json(
        engine.https,
        &bundle,
        "POST",
        "/v1/mesh/sign",
        Some(&web),
        Some(&huge),
    )
    .await?;
    assert_eq!(code, 400);

    let metrics = engine.metrics().await?;
    for (result, at_least) in [("issued", 2.0), ("denied", 5.0), ("invalid", 3.0)] {
        let name = format!("capstan_engine_mesh_ca_sign_total{{result=\"{result}\"}}");
        let value = metric(&metrics, &name).unwrap_or(0.0);
        assert!(value >= at_least, "{name} = {value}\n{metrics}");
    }
    assert!(metrics.contains("capstan_engine_mesh_ca_sign_duration_seconds_count"));
    assert!(metric(&metrics, "capstan_engine_mesh_ca_root_expiry_timestamp_seconds").unwrap() > 0.0);

    // The log names the ServiceAccount's UID, never a token.
    let logs = engine.logs();
    let uid = Api::<ServiceAccount>::namespaced(client.clone(), &ns.name)
        .get("web")
        .await?
        .metadata
        .uid
        .unwrap();
    assert!(logs.contains(&uid), "the issuance log names the SA UID:\n{logs}");
    for token in [&web, &api, &kube_token] {
        assert!(!logs.contains(token.as_str()), "a token was logged");
    }
    Ok(())
}

/// HTTPS only: the engine's certificate validates against the roots bundle, and a
/// plain-HTTP request to the same port gets no HTTP answer.
#[tokio::test]
async fn serves_https_with_a_mesh_certificate_and_nothing_in_plain_text() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let client = client().await;
    fresh_ca(&client).await;
    let engine = EngineProcess::start(&client, "https", &[]).await?;
    let roots = engine.roots(&client).await?;
    // engine.roots() trusted only the published bundle: the handshake validated.
    assert_eq!(strings(&roots["roots"]).len(), 1);

    // A client trusting another CA is refused at the handshake.
    let stranger = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let stranger = params.self_signed(&stranger)?.pem();
    assert!(
        https_json(engine.https, &stranger, "GET", "/v1/mesh/roots", None, None)
            .await
            .is_err()
    );

    let mut tcp = tokio::net::TcpStream::connect(engine.https).await?;
    tcp.write_all(b"GET /v1/mesh/roots HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await?;
    assert!(
        !String::from_utf8_lossy(&answer).contains("HTTP/1.1 200") && !answer.starts_with(b"HTTP/"),
        "a plain-text request got an HTTP answer: {:?}",
        String::from_utf8_lossy(&answer)
    );
    Ok(())
}

/// The root lives in the Secret: two engines started together agree on one root, a
/// restarted engine keeps it, and a deleted Secret comes back with the same root.
#[tokio::test]
async fn one_root_shared_by_replicas_and_kept_across_restarts() -> Result<()> {
    let client = client().await;
    fresh_ca(&client).await;
    let a = EngineProcess::spawn(&client, "twin-a", &[]).await?;
    let b = EngineProcess::spawn(&client, "twin-b", &[]).await?;
    a.wait_ready().await?;
    b.wait_ready().await?;
    let (ra, rb) = (a.roots(&client).await?, b.roots(&client).await?);
    assert_eq!(ra["roots"], rb["roots"], "two engines, one root");
    assert_eq!(strings(&ra["roots"]).len(), 1);
    let root = ra["active"].as_str().unwrap().to_owned();
    let logs = format!("{}{}", a.logs(), b.logs());
    assert_eq!(
        logs.matches("Generated a new mesh root and stored it").count(),
        1,
        "exactly one replica stored a root:\n{logs}"
    );
    drop(a);
    drop(b);

    let engine = EngineProcess::start(&client, "restarted", &[]).await?;
    assert_eq!(
        engine.roots(&client).await?["active"].as_str(),
        Some(root.as_str())
    );

    // Deleting the Secret by mistake does not mint a root nobody trusts.
    let secrets = Api::<Secret>::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let before = secrets.get(MESH_CA_SECRET).await?;
    secrets.delete(MESH_CA_SECRET, &DeleteParams::default()).await?;
    let restored = eventually(Duration::from_secs(15), "the CA Secret to be restored", || {
        let secrets = secrets.clone();
        let uid = before.metadata.uid.clone();
        async move {
            let s = secrets.get_opt(MESH_CA_SECRET).await.ok()??;
            (s.metadata.uid != uid).then_some(s)
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", engine.logs()))?;
    assert_eq!(
        restored.data.unwrap()["tls.crt"].0,
        before.data.unwrap()["tls.crt"].0
    );
    assert_eq!(
        engine.roots(&client).await?["active"].as_str(),
        Some(root.as_str())
    );
    Ok(())
}

/// M12 end to end: requested by annotation, a new root is trusted first, signs after the
/// propagation time, and the old root leaves only once its leaves have expired. Every
/// leaf issued meanwhile is trusted by the bundle a client fetched one round earlier.
#[tokio::test]
async fn rotation_trusts_first_then_signs_then_drops_the_old_root() -> Result<()> {
    let client = client().await;
    fresh_ca(&client).await;
    let ns = TestNamespace::new(&client, "e2e-meshca-rot").await;
    serviceaccount(&client, &ns.name, "web").await;
    let token = serviceaccount_token(&client, &ns.name, "web", MESH_TOKEN_AUDIENCE).await?;
    let flags = ["--leaf-ttl", "6s", "--rotation-propagation", "4s"];
    let a = EngineProcess::start(&client, "rot-a", &flags).await?;
    let b = EngineProcess::start(&client, "rot-b", &flags).await?;
    let initial = a.roots(&client).await?;
    let old_root = initial["active"].as_str().unwrap().to_owned();

    let secrets = Api::<Secret>::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let requested = jiff::Timestamp::now().to_string();
    secrets
        .patch(
            MESH_CA_SECRET,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"mesh.capstan.dev/rotate-requested-at": requested}}}),
            ),
        )
        .await?;

    // Poll both replicas through the rotation, like sidecars renewing.
    let mut previous_bundle = bundle_of(&initial);
    let mut saw = (false, false, false); // (2 roots, old signing) (2 roots, new signing) (new only)
    let mut new_root = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !saw.2 {
        ensure!(
            std::time::Instant::now() < deadline,
            "rotation did not finish: {saw:?}\n{}",
            a.logs()
        );
        for engine in [&a, &b] {
            let roots = engine.roots(&client).await?;
            let list = strings(&roots["roots"]);
            let active = roots["active"].as_str().unwrap().to_owned();
            let (code, body) = sign(engine, &bundle_of(&roots), Some(&token), &csr(vec![])).await?;
            ensure!(code == 200, "{body}");
            let leaf = body["certificate"].as_str().unwrap();
            // M12: the leaf is signed by a root the client already trusted a round ago.
            ensure!(
                strings(&body["roots"]).iter().any(|r| signed_by(leaf, r))
                    && split_bundle(&previous_bundle).iter().any(|r| signed_by(leaf, r)),
                "a leaf signed by a root not yet in the previous bundle"
            );
            match (list.len(), active == old_root) {
                (2, true) => {
                    saw.0 = true;
                    new_root = list.iter().find(|r| **r != old_root).unwrap().clone();
                    // The activation may fall between the roots read and the sign call:
                    // then the replica says so when asked again.
                    let active_now = engine.roots(&client).await?["active"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    ensure!(
                        signed_by(leaf, &old_root) || active_now != old_root,
                        "the new root signs before its time"
                    );
                }
                (2, false) => {
                    ensure!(saw.0, "the new root signed without being trusted first");
                    saw.1 = true;
                    ensure!(list.contains(&old_root), "old root dropped at activation");
                    ensure!(signed_by(leaf, &active));
                }
                (1, false) => {
                    ensure!(saw.1, "the old root was dropped before the new one signed");
                    ensure!(active == new_root);
                    saw.2 = true;
                }
                (1, true) => {}
                other => anyhow::bail!("unexpected bundle {other:?}"),
            }
            previous_bundle = bundle_of(&roots);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The published bundle follows, and both replicas wrote no step twice.
    eventually(
        Duration::from_secs(35),
        "the ConfigMap to hold only the new root",
        || async { (published_roots(&client).await? == new_root).then_some(()) },
    )
    .await?;
    let steps = |m: &str, phase: &str| {
        metric(
            m,
            &format!("capstan_engine_mesh_ca_rotation_steps_total{{phase=\"{phase}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let (ma, mb) = (a.metrics().await?, b.metrics().await?);
    for phase in ["started", "activated", "retired"] {
        assert_eq!(steps(&ma, phase) + steps(&mb, phase), 1.0, "{phase}\n{ma}\n{mb}");
    }
    // The engine's own serving certificate moved to the new root.
    let roots = eventually(
        Duration::from_secs(10),
        "the serving cert under the new root",
        || async {
            https_json(a.https, &new_root, "GET", "/v1/mesh/roots", None, None)
                .await
                .ok()
        },
    )
    .await?;
    assert_eq!(roots.0, 200);
    // A request older than the rotation does not start another one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(strings(&a.roots(&client).await?["roots"]), vec![new_root]);
    Ok(())
}

fn split_bundle(bundle: &str) -> Vec<String> {
    bundle
        .split_inclusive("-----END CERTIFICATE-----\n")
        .map(str::to_owned)
        .filter(|s| s.contains("BEGIN"))
        .collect()
}

/// A user-supplied intermediate: the engine signs with it, returns it in `chain`, puts
/// the user's root in `roots`, and serves its own certificate under the same chain.
#[tokio::test]
async fn a_user_supplied_intermediate_signs_under_the_users_root() -> Result<()> {
    use rcgen::{BasicConstraints, IsCa, Issuer, KeyUsagePurpose};
    let client = client().await;
    fresh_ca(&client).await;
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Example Corp root");
    let root = params.clone().self_signed(&root_key)?;
    let root_issuer = Issuer::new(params, &root_key);
    let int_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Example Corp mesh intermediate");
    params.use_authority_key_identifier_extension = true;
    let intermediate = params.signed_by(&int_key, &root_issuer)?;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": MESH_CA_SECRET},
        "type": "Opaque",
        "stringData": {
            "tls.crt": intermediate.pem(),
            "tls.key": int_key.serialize_pem(),
            "ca.crt": root.pem(),
        }
    }))?;
    Api::<Secret>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .create(&PostParams::default(), &secret)
        .await?;

    let ns = TestNamespace::new(&client, "e2e-meshca-int").await;
    serviceaccount(&client, &ns.name, "web").await;
    let engine = EngineProcess::start(&client, "intermediate", &[]).await?;
    // Trusting only the user's root reaches the engine (its chain includes the intermediate).
    let (code, roots) = https_json(engine.https, &root.pem(), "GET", "/v1/mesh/roots", None, None)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", engine.logs()))?;
    assert_eq!(code, 200);
    assert_eq!(strings(&roots["roots"]), vec![root.pem()]);
    assert_eq!(roots["active"].as_str(), Some(root.pem().as_str()));

    let token = serviceaccount_token(&client, &ns.name, "web", MESH_TOKEN_AUDIENCE).await?;
    let (code, body) = sign(&engine, &root.pem(), Some(&token), &csr(vec![])).await?;
    assert_eq!(code, 200, "{body}");
    let leaf = body["certificate"].as_str().unwrap();
    assert_eq!(strings(&body["chain"]), vec![intermediate.pem()]);
    assert_eq!(strings(&body["roots"]), vec![root.pem()]);
    assert!(signed_by(leaf, &intermediate.pem()) && signed_by(&intermediate.pem(), &root.pem()));
    assert_eq!(uri_sans(leaf), vec![format!("URI:{}", spiffe(&ns.name, "web"))]);
    Ok(())
}
