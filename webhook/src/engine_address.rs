//! The engine's addresses, for pods that are both meshed and given the secrets agent.
//!
//! The agent runs as a native sidecar beside the mesh's redirect: after the app starts,
//! its connections to the engine (a reconnect for a renewal) would be redirected to the
//! outbound proxy, which would dial the engine's Service over mTLS, which the engine does
//! not serve. So the redirect of such a pod leaves the engine's addresses alone (and
//! nothing else): the engine URL's host, resolved as the pod will resolve it (the webhook
//! runs in the cluster and uses its DNS), each address as a /32. Resolved in the
//! background every 30 s (`refresh_forever`), so an admission call reads the last answer
//! and never waits on DNS; only a call before the first answer resolves itself.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

const REFRESH_EVERY: Duration = Duration::from_secs(30);

type Resolved = Result<Vec<String>, String>;

pub struct EngineAddress {
    /// `host:port` of the engine URL.
    authority: Option<String>,
    /// The last answer (the CIDRs, or why there are none).
    last: parking_lot::Mutex<Option<Resolved>>,
}

impl EngineAddress {
    pub fn new(engine_url: &str) -> Arc<Self> {
        Arc::new(Self {
            authority: authority(engine_url),
            last: parking_lot::Mutex::default(),
        })
    }

    /// The CIDRs to exclude from the redirect, or why they could not be found.
    pub async fn cidrs(&self) -> Resolved {
        let last = self.last.lock().clone();
        match last {
            Some(resolved) => resolved,
            None => self.resolve().await,
        }
    }

    /// Resolves the engine's name again every REFRESH_EVERY, for the life of the process.
    pub async fn refresh_forever(self: Arc<Self>) {
        loop {
            if let Err(error) = self.resolve().await {
                tracing::debug!(%error, "The engine's address is unknown");
            }
            tokio::time::sleep(REFRESH_EVERY).await;
        }
    }

    async fn resolve(&self) -> Resolved {
        let Some(authority) = &self.authority else {
            return Err("the engine URL has no host".into());
        };
        let result =
            match tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(authority)).await {
                Ok(Ok(addresses)) => {
                    let cidrs = cidrs(addresses);
                    if cidrs.is_empty() {
                        Err(format!("{authority} has no IPv4 address"))
                    } else {
                        Ok(cidrs)
                    }
                }
                Ok(Err(error)) => Err(format!("resolving {authority}: {error}")),
                Err(_) => Err(format!("resolving {authority} timed out")),
            };
        *self.last.lock() = Some(result.clone());
        result
    }
}

/// `host:port` from `https://host[:port]/...` (443 when the URL names no port).
fn authority(url: &str) -> Option<String> {
    let uri: hyper::Uri = url.parse().ok()?;
    uri.scheme()?;
    Some(format!("{}:{}", uri.host()?, uri.port_u16().unwrap_or(443)))
}

/// Each IPv4 address as a /32, sorted and without repeats (the redirect is IPv4 only).
fn cidrs(addresses: impl Iterator<Item = SocketAddr>) -> Vec<String> {
    let mut out: Vec<String> = addresses
        .filter_map(|a| match a.ip() {
            IpAddr::V4(ip) => Some(format!("{ip}/32")),
            IpAddr::V6(_) => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_of_engine_urls() {
        assert_eq!(
            authority("https://capstan-engine.capstan-system.svc:8200").as_deref(),
            Some("capstan-engine.capstan-system.svc:8200")
        );
        assert_eq!(
            authority("https://engine.example/v1").as_deref(),
            Some("engine.example:443")
        );
        assert_eq!(
            authority("https://[fd00::1]:8200").as_deref(),
            Some("[fd00::1]:8200")
        );
        assert_eq!(authority("https://[fd00::1]").as_deref(), Some("[fd00::1]:443"));
        assert_eq!(authority("no-scheme"), None);
        assert_eq!(authority("https:///path"), None);
    }

    #[test]
    fn ipv4_addresses_become_host_cidrs_once() {
        let addresses = [
            "10.96.0.7:8200",
            "10.96.0.7:8200",
            "[fd00::7]:8200",
            "10.96.0.3:8200",
        ]
        .iter()
        .map(|a| a.parse().unwrap());
        assert_eq!(cidrs(addresses), vec!["10.96.0.3/32", "10.96.0.7/32"]);
    }

    #[tokio::test]
    async fn a_literal_address_resolves_to_itself_and_a_bad_name_says_why() {
        let engine = EngineAddress::new("https://127.0.0.1:8200");
        assert_eq!(engine.cidrs().await, Ok(vec!["127.0.0.1/32".to_owned()]));
        let engine = EngineAddress::new("https://engine.invalid:8200");
        let error = engine.cidrs().await.unwrap_err();
        assert!(error.contains("engine.invalid:8200"), "{error}");
    }
}
