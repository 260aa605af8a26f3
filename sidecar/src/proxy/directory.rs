//! Where mesh services live: Services (their cluster IPs, ports and protocols) and
//! EndpointSlices (the pods behind them), watched from the API. Lookups read the local
//! caches, so an API outage leaves the last known endpoints in use.

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use std::net::IpAddr;

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Clone)]
pub struct Directory {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
}

/// What an address the application dialled turns out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A port a mesh Service declares.
    Service { namespace: String, name: String },
    /// A mesh Service's address, but a port it does not declare (M18: refused).
    UndeclaredPort { namespace: String, name: String },
    /// Not in the mesh's directory: passed through as it is.
    Unknown,
}

impl Directory {
    /// Starts the watches; they run until the process ends.
    pub fn start(client: Client) -> Self {
        let (services, services_writer) = reflector::store();
        let (slices, slices_writer) = reflector::store();
        let svc_api: Api<Service> = Api::all(client.clone());
        let slice_api: Api<EndpointSlice> = Api::all(client);
        tokio::spawn(drive(
            "Services",
            watcher(svc_api, watcher::Config::default())
                .backoff(WatchBackoff::default())
                .reflect(services_writer),
        ));
        tokio::spawn(drive(
            "EndpointSlices",
            watcher(slice_api, watcher::Config::default())
                .backoff(WatchBackoff::default())
                .reflect(slices_writer),
        ));
        Self { services, slices }
    }

    pub fn is_ready(&self) -> bool {
        // A store that has never listed reports nothing; `state()` on it is empty, which
        // would look like "no endpoints". Readiness waits for both lists.
        futures::FutureExt::now_or_never(self.services.wait_until_ready()).is_some()
            && futures::FutureExt::now_or_never(self.slices.wait_until_ready()).is_some()
    }

    /// The ready pod addresses behind `namespace/name`.
    pub fn endpoints(&self, namespace: &str, name: &str) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for slice in self.slices.state() {
            if slice.namespace().as_deref() != Some(namespace)
                || slice.labels().get(SERVICE_NAME_LABEL).map(String::as_str) != Some(name)
            {
                continue;
            }
            for endpoint in &slice.endpoints {
                let ready = endpoint.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                if !ready {
                    continue;
                }
                out.extend(endpoint.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()));
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Whether the Service `namespace/name` declares `port` (its port or target port)
    /// as HTTP by appProtocol. None when the Service is unknown.
    pub fn speaks_http(&self, namespace: &str, name: &str, port: u16) -> Option<bool> {
        let service = self.services.get(&ObjectRef::new(name).within(namespace))?;
        let ports = service.spec.as_ref()?.ports.as_ref()?;
        let port = i32::from(port);
        Some(ports.iter().any(|p| {
            let matches = p.port == port
                || matches!(&p.target_port, Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(t)) if *t == port);
            matches && p.app_protocol.as_deref().is_some_and(is_http)
        }))
    }

    /// What `ip:port` is, as dialled by an application.
    pub fn lookup(&self, ip: IpAddr, port: u16) -> Lookup {
        let text = ip.to_string();
        let port = i32::from(port);
        for service in self.services.state() {
            let Some(spec) = &service.spec else { continue };
            let has_ip = spec.cluster_ip.as_deref() == Some(&text)
                || spec.cluster_ips.iter().flatten().any(|c| c == &text);
            if !has_ip {
                continue;
            }
            let namespace = service.namespace().unwrap_or_default();
            let name = service.name_any();
            return if spec.ports.iter().flatten().any(|p| p.port == port) {
                Lookup::Service { namespace, name }
            } else {
                Lookup::UndeclaredPort { namespace, name }
            };
        }
        for slice in self.slices.state() {
            if !slice
                .endpoints
                .iter()
                .any(|e| e.addresses.iter().any(|a| a == &text))
            {
                continue;
            }
            let Some(name) = slice.labels().get(SERVICE_NAME_LABEL).cloned() else {
                continue;
            };
            let namespace = slice.namespace().unwrap_or_default();
            return if slice.ports.iter().flatten().any(|p| p.port == Some(port)) {
                Lookup::Service { namespace, name }
            } else {
                Lookup::UndeclaredPort { namespace, name }
            };
        }
        Lookup::Unknown
    }
}

pub fn is_http(app_protocol: &str) -> bool {
    matches!(
        app_protocol.to_ascii_lowercase().as_str(),
        "http" | "http2" | "kubernetes.io/h2c"
    )
}

async fn drive<S, K>(what: &'static str, stream: S)
where
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        if let Err(error) = event {
            tracing::warn!(%error, "Watching {what} failed; keeping the last known state");
        }
    }
}

/// How the proxy's watches retry: quickly (250 ms doubling to 4 s, jittered), because a
/// sidecar that reconnects late enforces stale intentions for that long; jitter spreads
/// many sidecars' reconnections to a recovering API server. kube's default goes to 30 s.
pub struct WatchBackoff {
    next: std::time::Duration,
}

impl WatchBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(250);
    const MAX: std::time::Duration = std::time::Duration::from_secs(4);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<Self::Item> {
        let delay = self.next.mul_f64(rand::random_range(0.5..=1.0));
        self.next = (self.next * 2).min(Self::MAX);
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}
