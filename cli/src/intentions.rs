//! `capstan intentions`: the mesh's intentions as the sidecar reads them.

use anyhow::{Context as _, bail};
use capstan_crds::ServiceIntentions;
use capstan_mesh::{ConnectionDecision, Decision, Identity, Policy, Request};
use clap::Subcommand;
use kube::{Api, Client, api::ListParams};

#[derive(Subcommand, Debug)]
pub enum IntentionsCommand {
    /// Decide, as the sidecar would, whether SOURCE may reach DESTINATION.
    Check(Check),
}

#[derive(clap::Args, Debug)]
pub struct Check {
    /// The calling service: NAME (in --namespace) or NAMESPACE/NAME.
    source: String,
    /// The called service: NAME (in --namespace) or NAMESPACE/NAME.
    destination: String,
    /// Namespace for names given without one (default: the kubeconfig context's).
    #[arg(short, long)]
    namespace: Option<String>,
    /// Decide one HTTP request to this path (and query), not just the connection.
    #[arg(long)]
    path: Option<String>,
    /// The request's method (with --path).
    #[arg(long, default_value = "GET")]
    method: String,
    /// A request header, NAME=VALUE; repeat for more (with --path).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    headers: Vec<String>,
    /// What applies when no intention matches: the cluster's default.
    #[arg(long, value_parser = ["deny", "allow"], default_value = "deny")]
    default_action: String,
    /// Capstan's own namespace, the only one whose intentions may govern other
    /// namespaces (the chart's release namespace). The variable is the proxy's: the
    /// command judges a request as a proxy would.
    #[arg(long, env = capstan_contract::env::proxy::CONTROL_NAMESPACE, default_value = "capstan-system")]
    control_namespace: String,
}

impl Check {
    /// Prints the decision; true when allowed.
    pub async fn run(self) -> anyhow::Result<bool> {
        let client = Client::try_default()
            .await
            .context("connecting to the cluster in KUBECONFIG")?;
        let namespace = self
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let source = identity(&self.source, &namespace)?;
        let destination = identity(&self.destination, &namespace)?;
        let objects = Api::<ServiceIntentions>::all(client)
            .list(&ListParams::default())
            .await
            .context("listing ServiceIntentions")?
            .items;
        let policy = Policy::compile(&objects, self.default_action == "allow", &self.control_namespace);
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|h| h.split_once('=').context("a --header is NAME=VALUE"))
            .collect::<anyhow::Result<_>>()?;

        let connection = policy.connection(&source, &destination);
        let decision = match (&self.path, connection) {
            // A connection refused at L4 refuses every request on it.
            (_, ConnectionDecision::Decided(decision)) if !decision.allow => decision,
            (Some(path), _) => policy.request(
                &source,
                &destination,
                &Request {
                    method: &self.method.to_ascii_uppercase(),
                    target: path,
                    headers: &headers,
                },
            ),
            (None, ConnectionDecision::Decided(decision)) => decision,
            (
                None,
                ConnectionDecision::PerRequest {
                    intention,
                    source: index,
                },
            ) => {
                println!(
                    "{source} -> {destination}: L7: the connection is accepted and each request is decided by \
                     {intention} sources[{index}].permissions (give --path and --method to check one)"
                );
                return Ok(true);
            }
        };
        print(&source, &destination, &self, &decision);
        Ok(decision.allow)
    }
}

fn print(source: &Identity, destination: &Identity, check: &Check, decision: &Decision) {
    let what = match &check.path {
        Some(path) => format!(" {} {path}", check.method.to_ascii_uppercase()),
        None => String::new(),
    };
    println!("{source} -> {destination}{what}: {decision}");
}

fn identity(given: &str, namespace: &str) -> anyhow::Result<Identity> {
    let (ns, name) = given.split_once('/').unwrap_or((namespace, given));
    if ns.is_empty() || name.is_empty() || name.contains('/') {
        bail!("{given:?}: expected NAME or NAMESPACE/NAME");
    }
    Ok(Identity::new(ns, name))
}
