//! A mesh for one test or benchmark: a namespace, a bridge of network-namespace pods,
//! the real mesh CA (capstan-engine), and helpers to start workloads (the application
//! and the real sidecar) and to publish their Services and intentions.

use crate::{netns::*, *};
use anyhow::Result;
use k8s_openapi::api::{
    core::v1::{Service, ServiceAccount},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

pub const APP_PORT: u16 = 8080;
pub const INBOUND_PORT: u16 = 20000;
pub const ADMIN_PORT: u16 = 15020;
pub const PROXY_UID: u32 = 1337;
/// The proxy's dedicated group, which the redirect exempts (the injector's PROXY_GID).
pub const PROXY_GID: u32 = 1338;

/// One test's mesh: a namespace, a bridge, the mesh CA, and the pods started on it.
pub struct Mesh {
    pub client: Client,
    pub ns: TestNamespace,
    pub network: Network,
    pub api: Forwarder,
    pub engine: EngineProcess,
    pub roots: String,
    files: Vec<PathBuf>,
}

/// Which traffic `capstan-sidecar init` redirects in a test pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Redirect {
    /// Inbound and outbound (`init`, a pod without explicit upstreams).
    Both,
    /// Inbound only (`init --inbound-only`, a pod with explicit upstreams).
    InboundOnly,
    /// No redirect step.
    None,
}

pub enum App {
    Http,
    /// The HTTP application listening on every address without a redirect: only the
    /// benchmark's direct baseline uses it.
    HttpOpen,
    TcpEcho,
    None,
}

impl Mesh {
    pub async fn start(leaf_ttl: &str, engine_args: &[&str]) -> Result<Self> {
        install_chart();
        let client = client().await;
        let ns = TestNamespace::new(&client, "mesh").await;
        let network = Network::create()?;
        let api = Forwarder::start(
            SocketAddr::new(network.gateway().into(), 0),
            apiserver_addr()?,
            false,
        )
        .await?;
        let ca_addr = SocketAddr::new(network.gateway().into(), free_port().port());
        let gateway = network.gateway().to_string();
        let mut flags = vec![
            "--serving-san",
            &gateway,
            "--serving-san",
            "127.0.0.1",
            "--leaf-ttl",
            leaf_ttl,
        ];
        flags.extend_from_slice(engine_args);
        let engine = EngineProcess::start_at(&client, &ns.name, ca_addr, &flags).await?;
        let roots = eventually(
            Duration::from_secs(30),
            "the engine to publish the mesh roots",
            || published_roots(&client),
        )
        .await?;
        let mesh = Self {
            client,
            ns,
            network,
            api,
            engine,
            roots,
            files: Vec::new(),
        };
        Ok(mesh)
    }

    pub fn namespace(&self) -> &str {
        &self.ns.name
    }

    /// A mesh CA token for `sa` from the real TokenRequest API, in a file the proxy's
    /// UID can read.
    pub async fn ca_token_file(&mut self, sa: &str) -> Result<PathBuf> {
        let token = serviceaccount_token(&self.client, &self.ns.name, sa, MESH_TOKEN_AUDIENCE).await?;
        let path = std::env::temp_dir().join(format!("capstan-e2e-{}-{sa}.token", self.ns.name));
        write_readable(&path, token.as_bytes())?;
        self.files.push(path.clone());
        Ok(path)
    }

    /// A kubeconfig for `sa` that reaches the API server through the bridge forwarder.
    pub async fn pod_kubeconfig(&mut self, sa: &str) -> Result<PathBuf> {
        let path = serviceaccount_kubeconfig(&self.client, &self.ns.name, sa).await?;
        self.files.push(path.clone());
        let mut config: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        let cluster = &mut config["clusters"][0]["cluster"];
        cluster["server"] = json!(format!("https://{}", self.api.listen));
        // The API server's certificate names "kubernetes", not the bridge address.
        cluster["tls-server-name"] = json!("kubernetes");
        write_readable(&path, &serde_json::to_vec(&config)?)?;
        Ok(path)
    }

    pub async fn service_account(&self, sa: &str) -> Result<()> {
        let api = Api::<ServiceAccount>::namespaced(self.client.clone(), self.namespace());
        let object = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(sa.to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The Service `name` (appProtocol http or tcp on APP_PORT) and an EndpointSlice
    /// listing `addresses`, as the endpoints controller would for running pods.
    pub async fn publish_service(&self, name: &str, http: bool, addresses: &[IpAddr]) -> Result<()> {
        let services = Api::<Service>::namespaced(self.client.clone(), self.namespace());
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"ports": [{"name": "app", "port": APP_PORT, "targetPort": APP_PORT,
                                 "appProtocol": if http { "http" } else { "tcp" }}]},
        }))?;
        services
            .patch(
                name,
                &PatchParams::apply("capstan-e2e").force(),
                &Patch::Apply(&service),
            )
            .await?;
        // One slice per address family, as the endpoints controller makes them.
        let slices = Api::<EndpointSlice>::namespaced(self.client.clone(), self.namespace());
        let v6: Vec<&IpAddr> = addresses.iter().filter(|a| a.is_ipv6()).collect();
        let v4: Vec<&IpAddr> = addresses.iter().filter(|a| a.is_ipv4()).collect();
        let mut families = vec![(name.to_owned(), "IPv4", v4)];
        if !v6.is_empty() {
            families.push((format!("{name}-ipv6"), "IPv6", v6));
        }
        for (slice_name, family, addresses) in families {
            let slice: EndpointSlice = serde_json::from_value(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": slice_name, "labels": {"kubernetes.io/service-name": name}},
                "addressType": family,
                "ports": [{"name": "app", "port": APP_PORT, "protocol": "TCP"}],
                "endpoints": addresses.iter().map(|a| json!({"addresses": [a.to_string()], "conditions": {"ready": true}})).collect::<Vec<_>>(),
            }))?;
            slices
                .patch(
                    &slice_name,
                    &PatchParams::apply("capstan-e2e").force(),
                    &Patch::Apply(&slice),
                )
                .await?;
        }
        Ok(())
    }

    /// A pod running as ServiceAccount `sa`: the application, then the sidecar (as the
    /// proxy UID, as injected), waited on until its /ready answers.
    pub async fn workload(&mut self, sa: &str, app: App, upstreams: &str) -> Result<Pod> {
        self.workload_with(sa, app, upstreams, false).await
    }

    /// `transparent`: the pod gets the injected init step's redirect (iptables), the
    /// application listens on every address, and outbound traffic needs no declaration.
    pub async fn workload_with(
        &mut self,
        sa: &str,
        app: App,
        upstreams: &str,
        transparent: bool,
    ) -> Result<Pod> {
        let redirect = if transparent {
            Redirect::Both
        } else {
            Redirect::None
        };
        self.workload_redirected(sa, app, upstreams, redirect).await
    }

    /// A pod with the redirect the injector gives it: both ways, or inbound only (a
    /// pod with explicit upstreams), or none (the sidecar alone).
    pub async fn workload_redirected(
        &mut self,
        sa: &str,
        app: App,
        upstreams: &str,
        redirect: Redirect,
    ) -> Result<Pod> {
        self.service_account(sa).await?;
        let mut pod = self.network.pod(sa)?;
        let app_bin = bin("capstan-e2e-app");
        match redirect {
            Redirect::Both => {
                pod.exec(&bin("capstan-sidecar"), &["init"]).await?;
            }
            Redirect::InboundOnly => {
                pod.exec(&bin("capstan-sidecar"), &["init", "--inbound-only"])
                    .await?;
            }
            Redirect::None => {}
        }
        // With a redirect the application listens on every address, as a pod's would.
        let transparent = redirect != Redirect::None;
        let listen = if transparent && pod.address6.is_some() {
            // Every address of both families, as a dual-stack application would.
            format!("[::]:{APP_PORT}")
        } else if transparent {
            format!("0.0.0.0:{APP_PORT}")
        } else {
            format!("127.0.0.1:{APP_PORT}")
        };
        match app {
            App::Http => {
                pod.spawn("app", &app_bin, &["serve-http", &listen], &[], None)?;
            }
            App::HttpOpen => {
                pod.spawn(
                    "app",
                    &app_bin,
                    &["serve-http", &format!("0.0.0.0:{APP_PORT}")],
                    &[],
                    None,
                )?;
            }
            App::TcpEcho => {
                pod.spawn("app", &app_bin, &["serve-tcp-echo", &listen], &[], None)?;
            }
            App::None => {}
        }
        let token = self.ca_token_file(sa).await?;
        let kubeconfig = self.pod_kubeconfig(sa).await?;
        let mut env = vec![
            ("KUBECONFIG", kubeconfig.to_string_lossy().into_owned()),
            ("CAPSTAN_NAMESPACE", self.namespace().to_owned()),
            ("CAPSTAN_SERVICE_ACCOUNT", sa.to_owned()),
            ("CAPSTAN_POD_NAME", format!("{sa}-0")),
            ("CAPSTAN_TOKEN_FILE", token.to_string_lossy().into_owned()),
            ("CAPSTAN_CA_URL", format!("https://{}", self.engine.https)),
            ("CAPSTAN_CA_BUNDLE", self.roots.clone()),
            ("CAPSTAN_UPSTREAMS", upstreams.to_owned()),
            ("CAPSTAN_ROOTS_REFRESH", "1s".to_owned()),
            ("CAPSTAN_LOG", "info,capstan_sidecar=debug".to_owned()),
            ("CAPSTAN_LOG_FORMAT", "text".to_owned()),
        ];
        if !matches!(app, App::None) {
            env.push(("CAPSTAN_APP_PORT", APP_PORT.to_string()));
        }
        if redirect == Redirect::Both {
            env.push(("CAPSTAN_OUTBOUND_PORT", "15001".to_owned()));
        }
        // CAPSTAN_SIDECAR_BIN: a sidecar built another way (another profile, say), for
        // comparing builds in the benchmark without rebuilding the rest.
        let sidecar = std::env::var_os("CAPSTAN_SIDECAR_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| bin("capstan-sidecar"));
        pod.spawn_as("proxy", &sidecar, &["proxy"], &env, Some((PROXY_UID, PROXY_GID)))?;
        let admin = SocketAddr::new(pod.address.into(), ADMIN_PORT);
        eventually(
            Duration::from_secs(30),
            &format!("{sa}'s sidecar to be ready"),
            || async move { matches!(http_get(admin, "/ready").await, Ok((200, _))).then_some(()) },
        )
        .await?;
        Ok(pod)
    }

    /// A mesh certificate for `sa`, issued by the CA for a TokenRequest token, for a
    /// test client that speaks to sidecars directly: (certificate chain, key).
    pub async fn issue_identity(
        &mut self,
        sa: &str,
    ) -> Result<(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )> {
        use rustls::pki_types::{CertificateDer, pem::PemObject as _};
        self.service_account(sa).await?;
        let token = std::fs::read_to_string(self.ca_token_file(sa).await?)?;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        let id = format!("spiffe://cluster.local/ns/{}/sa/{sa}", self.namespace());
        params.subject_alt_names = vec![rcgen::SanType::URI(id.as_str().try_into()?)];
        let csr = params.serialize_request(&key)?.pem()?;
        let addr = self.engine.https;
        let body = json!({ "csr": csr }).to_string();
        let (code, response) = https_json(
            addr,
            &self.roots,
            "POST",
            "/v1/mesh/sign",
            Some(&token),
            Some(&body),
        )
        .await?;
        anyhow::ensure!(code == 200, "the CA answered {code}: {response}");
        let cert =
            CertificateDer::from_pem_slice(response["certificate"].as_str().unwrap_or_default().as_bytes())?;
        Ok((
            vec![cert],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        ))
    }

    /// An HTTP workload `sa` and its Service (appProtocol http) listing its pod.
    pub async fn http_service(&mut self, sa: &str) -> Result<Pod> {
        let pod = self.workload(sa, App::Http, "").await?;
        self.publish_service(sa, true, &[pod.address.into()]).await?;
        Ok(pod)
    }

    pub async fn apply_intention(&self, name: &str, spec: Value) -> Result<()> {
        let api = Api::<capstan_crds::ServiceIntentions>::namespaced(self.client.clone(), self.namespace());
        let object: capstan_crds::ServiceIntentions = serde_json::from_value(json!({
            "apiVersion": "mesh.capstan.dev/v1alpha1", "kind": "ServiceIntentions",
            "metadata": {"name": name}, "spec": spec,
        }))?;
        api.patch(
            name,
            &PatchParams::apply("capstan-e2e").force(),
            &Patch::Apply(&object),
        )
        .await?;
        Ok(())
    }

    pub async fn delete_intention(&self, name: &str) -> Result<()> {
        Api::<capstan_crds::ServiceIntentions>::namespaced(self.client.clone(), self.namespace())
            .delete(name, &DeleteParams::default())
            .await?;
        Ok(())
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for file in &self.files {
            if file.extension().is_none_or(|e| e != "log") {
                let _ = std::fs::remove_file(file);
            }
        }
    }
}

pub fn write_readable(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, bytes)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    Ok(())
}

pub fn apiserver_addr() -> Result<SocketAddr> {
    let server = run(
        "kubectl",
        &[
            "config",
            "view",
            "--minify",
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ],
    )?;
    let hostport = server.trim().trim_start_matches("https://");
    hostport.parse().with_context(|| {
        format!("the API server address {server:?} (a loopback cluster is needed to forward to)")
    })
}
