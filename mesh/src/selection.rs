//! Which pods the mesh selects (pure): the webhook injects exactly these, and the
//! intentions reconciler reports those of them that run without the proxy, so the two
//! cannot disagree on what "should be meshed" means. How a pod is meshed (the patch) is
//! the webhook's (`webhook/src/inject`).
//!
//! - A pod is meshed when its namespace is labelled `capstan.dev/mesh=enabled` or it is
//!   annotated `capstan.dev/inject: "true"`; an explicit `"false"` opts it out, also in a
//!   labelled namespace (as in Consul). The namespace label is therefore a default, not
//!   an enforcement boundary: what keeps an opted-out pod away from protected services is
//!   intentions' default deny (an unmeshed pod has no mesh certificate, so no server
//!   sidecar accepts it). kube-system and Capstan's own namespace are never meshed.
//! - The marker of a meshed pod is the proxy container, not the `capstan.dev/injected`
//!   annotation, which a tenant could set by hand to escape.

use capstan_contract::annotations::{NAMESPACE_NAME_LABEL, mesh};
use k8s_openapi::api::core::v1::Pod;
use std::collections::BTreeMap;

/// The proxy's container (a native sidecar, so among the init containers): the marker of
/// a meshed pod, and the name the chart's ephemeral-containers webhook matches on.
pub const PROXY_CONTAINER: &str = "capstan-proxy";

/// What selection depends on besides the pod and its namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Namespaces never meshed, nor given anything else injected (kube-system and
    /// Capstan's own).
    pub excluded_namespaces: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            excluded_namespaces: vec!["kube-system".into(), "capstan-system".into()],
        }
    }
}

/// Why a pod is, or is not, meshed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wanted {
    /// Its namespace is labelled: the namespace enforces the mesh.
    ByNamespace,
    /// Annotated `capstan.dev/inject: "true"` in a namespace that is not labelled.
    ByAnnotation,
    No(Skip),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// kube-system or Capstan's own namespace.
    ExcludedNamespace,
    /// Annotated `capstan.dev/inject: "false"`.
    OptedOut,
    /// Neither the namespace nor the pod asks for it.
    NotSelected,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ExcludedNamespace => "excluded_namespace",
            Self::OptedOut => "opted_out",
            Self::NotSelected => "not_selected",
        }
    }
}

/// Whether `namespace` (whose labels are `namespace_labels`) is one where nothing is
/// injected: the request's namespace and the unforgeable name label must both be clear.
pub fn excluded(namespace: &str, namespace_labels: &BTreeMap<String, String>, config: &Config) -> bool {
    let name_label = namespace_labels.get(NAMESPACE_NAME_LABEL).map(String::as_str);
    config
        .excluded_namespaces
        .iter()
        .any(|excluded| excluded == namespace || Some(excluded.as_str()) == name_label)
}

/// Whether a pod in `namespace` (whose labels are `namespace_labels`) should be meshed.
pub fn wanted(
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    config: &Config,
) -> Wanted {
    if excluded(namespace, namespace_labels, config) {
        return Wanted::No(Skip::ExcludedNamespace);
    }
    let inject = annotations.get(mesh::INJECT).map(|v| v.trim());
    if inject.is_some_and(|v| v.eq_ignore_ascii_case("false")) {
        return Wanted::No(Skip::OptedOut);
    }
    if namespace_labels.get(mesh::LABEL).map(String::as_str) == Some(mesh::LABEL_ENABLED) {
        return Wanted::ByNamespace;
    }
    if inject.is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        Wanted::ByAnnotation
    } else {
        Wanted::No(Skip::NotSelected)
    }
}

/// Whether the pod already carries Capstan's proxy (the idempotency marker).
pub fn is_injected(pod: &Pod) -> bool {
    pod.spec
        .iter()
        .flat_map(|spec| spec.init_containers.iter().flatten())
        .any(|c| c.name == PROXY_CONTAINER)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_namespace_label_or_the_annotation_selects_and_false_opts_out() {
        let config = Config::default();
        let enabled = labels(&[(mesh::LABEL, "enabled"), (NAMESPACE_NAME_LABEL, "shop")]);
        let plain = labels(&[(NAMESPACE_NAME_LABEL, "shop")]);
        let none = BTreeMap::new();
        let opt_in = labels(&[(mesh::INJECT, "true")]);
        let opt_out = labels(&[(mesh::INJECT, "false")]);
        assert_eq!(wanted("shop", &enabled, &none, &config), Wanted::ByNamespace);
        assert_eq!(wanted("shop", &enabled, &opt_in, &config), Wanted::ByNamespace);
        assert_eq!(
            wanted("shop", &enabled, &opt_out, &config),
            Wanted::No(Skip::OptedOut)
        );
        assert_eq!(wanted("shop", &plain, &opt_in, &config), Wanted::ByAnnotation);
        assert_eq!(
            wanted("shop", &plain, &none, &config),
            Wanted::No(Skip::NotSelected)
        );
        assert_eq!(
            wanted("shop", &plain, &opt_out, &config),
            Wanted::No(Skip::OptedOut)
        );
        // Another value than "enabled" does not select.
        let other = labels(&[(mesh::LABEL, "disabled")]);
        assert_eq!(
            wanted("shop", &other, &none, &config),
            Wanted::No(Skip::NotSelected)
        );
    }

    #[test]
    fn kube_system_and_capstans_namespace_are_never_meshed() {
        let config = Config::default();
        let opt_in = labels(&[(mesh::INJECT, "true")]);
        for ns in ["kube-system", "capstan-system"] {
            let ns_labels = labels(&[(mesh::LABEL, "enabled"), (NAMESPACE_NAME_LABEL, ns)]);
            assert_eq!(
                wanted(ns, &ns_labels, &opt_in, &config),
                Wanted::No(Skip::ExcludedNamespace)
            );
        }
    }
}
