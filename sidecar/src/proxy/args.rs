//! The proxy's configuration: flags, each with the environment variable the webhook sets.

use anyhow::{Context as _, bail};
use capstan_contract::env::proxy as env;
use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

#[derive(clap::Args, Debug, Clone)]
pub struct ProxyArgs {
    /// The pod's namespace (downward API).
    #[arg(long, env = env::NAMESPACE)]
    pub namespace: String,
    /// The pod's ServiceAccount: its identity and its mesh service name.
    #[arg(long, env = env::SERVICE_ACCOUNT)]
    pub service_account: String,
    /// The pod's name, for log lines.
    #[arg(long, env = env::POD_NAME, default_value = "")]
    pub pod_name: String,
    #[arg(long, env = env::TRUST_DOMAIN, default_value = "cluster.local")]
    pub trust_domain: String,
    /// The projected ServiceAccount token (audience capstan-mesh-ca,
    /// `capstan_contract::MESH_CA_AUDIENCE`) presented to the CA; re-read at every
    /// renewal, since the kubelet rotates it.
    #[arg(
        long,
        env = env::TOKEN_FILE,
        default_value = "/var/run/secrets/capstan.dev/mesh/token"
    )]
    pub token_file: PathBuf,
    /// The mesh CA endpoint (capstan-engine), HTTPS.
    #[arg(long, env = env::CA_URL)]
    pub ca_url: String,
    /// The mesh's trust bundle (PEM) to trust the CA endpoint with at start; later bundles
    /// come from the CA itself.
    #[arg(long, env = env::CA_BUNDLE, hide_env_values = true)]
    pub ca_bundle: Option<String>,
    /// The same, from a file.
    #[arg(long, env = "CAPSTAN_CA_BUNDLE_FILE", conflicts_with = "ca_bundle")]
    pub ca_bundle_file: Option<PathBuf>,
    /// The address the mTLS listener binds (other sidecars connect here).
    #[arg(long, env = "CAPSTAN_INBOUND_IP", default_value = "0.0.0.0")]
    pub inbound_ip: std::net::IpAddr,
    #[arg(long, env = env::INBOUND_PORT, default_value_t = 20000)]
    pub inbound_port: u16,
    /// The port peers' sidecars listen on (the mesh uses one port everywhere).
    #[arg(long, env = "CAPSTAN_PEER_INBOUND_PORT", default_value_t = 20000)]
    pub peer_inbound_port: u16,
    /// The application's port on localhost; without it the proxy accepts no inbound traffic.
    #[arg(long, env = env::APP_PORT)]
    pub app_port: Option<u16>,
    /// `auto` reads the appProtocol of the pod's Service (named like its ServiceAccount).
    #[arg(long, env = "CAPSTAN_PROTOCOL", value_enum, default_value = "auto")]
    pub protocol: ProtocolArg,
    /// Explicit upstreams: `service[.namespace]:local-port,...`, served on loopback.
    #[arg(long, env = env::UPSTREAMS, default_value = "")]
    pub upstreams: Upstreams,
    /// The transparent outbound listener (traffic redirected by `capstan-sidecar init`).
    #[arg(long, env = env::OUTBOUND_PORT)]
    pub outbound_port: Option<u16>,
    /// /healthz, /ready, /metrics and the rewritten application probes.
    #[arg(long, env = env::ADMIN_ADDR, default_value = "0.0.0.0:15020")]
    pub admin_addr: SocketAddr,
    /// The webhook's rewritten probes: JSON `{"/app-health/<c>/<kind>": {"port": N, "path": "/..."}}`.
    #[arg(long, env = env::APP_PROBES, default_value = "{}")]
    pub app_probes: AppProbes,
    /// The cluster default when no intention matches (deny unless the chart says allow).
    #[arg(long, env = env::DEFAULT_ACTION, value_enum, default_value = "deny")]
    pub default_action: DefaultAction,
    /// Capstan's own namespace: the only one whose intentions may govern other
    /// namespaces (set by the injector; tenants' objects govern their own namespace).
    #[arg(long, env = env::CONTROL_NAMESPACE, default_value = "capstan-system")]
    pub control_namespace: String,
    /// How often to ask the CA for its trust bundle (a rotation adds a root before
    /// signing with it; this must be well under the CA's propagation delay).
    #[arg(long, env = "CAPSTAN_ROOTS_REFRESH", value_parser = capstan_contract::duration::parse, default_value = "30s")]
    pub roots_refresh: Duration,
    /// Threads serving traffic (1: a single-threaded runtime).
    #[arg(long, env = "CAPSTAN_PROXY_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,
    /// How long SIGTERM waits for open connections before closing them.
    #[arg(long, env = "CAPSTAN_DRAIN", value_parser = capstan_contract::duration::parse, default_value = "5s")]
    pub drain: Duration,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolArg {
    Auto,
    Http,
    Tcp,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultAction {
    Allow,
    Deny,
}

/// One declared upstream: `local_port` on loopback leads to `service` in `namespace`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub service: String,
    /// None: the pod's own namespace.
    pub namespace: Option<String>,
    pub local_port: u16,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upstreams(pub Vec<Upstream>);

impl FromStr for Upstreams {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Self> {
        let mut out = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (target, port) = item
                .rsplit_once(':')
                .with_context(|| format!("upstream {item:?}: expected service[.namespace]:port"))?;
            let local_port: u16 = port
                .parse()
                .with_context(|| format!("upstream {item:?}: {port:?} is not a port"))?;
            if local_port == 0 {
                bail!("upstream {item:?}: port 0 is not a port");
            }
            let (service, namespace) = match target.split_once('.') {
                Some((s, n)) => (s, Some(n.to_owned())),
                None => (target, None),
            };
            if service.is_empty() || namespace.as_deref() == Some("") {
                bail!("upstream {item:?}: empty service or namespace");
            }
            if out.iter().any(|u: &Upstream| u.local_port == local_port) {
                bail!("upstream {item:?}: local port {local_port} is declared twice");
            }
            out.push(Upstream {
                service: service.to_owned(),
                namespace,
                local_port,
            });
        }
        Ok(Self(out))
    }
}

/// An application probe the webhook moved to the proxy's admin port.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct AppProbe {
    pub port: u16,
    pub path: String,
    #[serde(default)]
    pub scheme: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppProbes(pub BTreeMap<String, AppProbe>);

impl FromStr for AppProbes {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Self> {
        let probes: BTreeMap<String, AppProbe> =
            serde_json::from_str(text).context("CAPSTAN_APP_PROBES is not a JSON object of probes")?;
        for (path, probe) in &probes {
            if !path.starts_with("/app-health/") {
                bail!("probe path {path:?} must start with /app-health/");
            }
            if !probe.path.starts_with('/') {
                bail!(
                    "probe {path:?}: the app path {:?} must start with '/'",
                    probe.path
                );
            }
            if probe
                .scheme
                .as_deref()
                .is_some_and(|s| !s.eq_ignore_ascii_case("http"))
            {
                bail!("probe {path:?}: only HTTP probes can be forwarded");
            }
        }
        Ok(Self(probes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_parse_with_and_without_namespace() {
        let u: Upstreams = "api:8080, db.data:5432".parse().unwrap();
        assert_eq!(
            u.0,
            vec![
                Upstream {
                    service: "api".into(),
                    namespace: None,
                    local_port: 8080
                },
                Upstream {
                    service: "db".into(),
                    namespace: Some("data".into()),
                    local_port: 5432
                },
            ]
        );
        assert!("".parse::<Upstreams>().unwrap().0.is_empty());
    }

    #[test]
    fn bad_upstreams_are_refused_with_the_item() {
        for bad in ["api", "api:x", "api:0", ":80", "api.:80", "a:80,b:80"] {
            let error = bad.parse::<Upstreams>().unwrap_err().to_string();
            assert!(error.contains("upstream"), "{bad}: {error}");
        }
    }

    #[test]
    fn probes_parse_and_refuse_https() {
        let p: AppProbes = r#"{"/app-health/app/livez": {"port": 8080, "path": "/healthz"}}"#
            .parse()
            .unwrap();
        assert_eq!(p.0["/app-health/app/livez"].port, 8080);
        assert!(r#"{"/x": {"port": 1, "path": "/"}}"#.parse::<AppProbes>().is_err());
        assert!(
            r#"{"/app-health/a/b": {"port": 1, "path": "/", "scheme": "HTTPS"}}"#
                .parse::<AppProbes>()
                .is_err()
        );
    }

    #[test]
    fn durations() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            proxy: ProxyArgs,
        }
        let parse = |drain: &str| {
            Cli::try_parse_from([
                "proxy",
                "--namespace=n",
                "--service-account=s",
                "--ca-url=u",
                "--drain",
                drain,
            ])
            .map(|cli| cli.proxy.drain)
        };
        assert_eq!(parse("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse("soon").is_err());
    }
}
