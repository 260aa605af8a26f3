//! ServiceIntentions checks the CRD schema cannot express (pure), shared by the
//! validating webhook (which refuses bad objects at the door) and the intentions
//! reconciler (which reports the same problems in status for objects that got past it:
//! created while the webhook was absent, or before a Service changed protocol).
//!
//! What remains after the schema and CEL rules: regular expressions that do not compile,
//! a source listed twice (a quadratic CEL rule would exceed the API server's cost
//! budget), and L7 permissions for a destination whose Service speaks plain TCP (the
//! schema cannot see other objects).

use capstan_crds::ServiceIntentionsSpec;
use k8s_openapi::api::core::v1::Service;
use std::collections::HashMap;

/// Service port `appProtocol`s that make a destination speak HTTP (the mesh contract);
/// any other value, or none, means plain TCP.
pub const HTTP_APP_PROTOCOLS: &[&str] = &["http", "http2", "kubernetes.io/h2c"];

/// Whether a destination Service speaks HTTP: one of its ports declares an HTTP
/// `appProtocol`.
pub fn speaks_http(service: &Service) -> bool {
    service
        .spec
        .iter()
        .flat_map(|spec| spec.ports.iter().flatten())
        .filter_map(|port| port.app_protocol.as_deref())
        .any(|protocol| {
            HTTP_APP_PROTOCOLS
                .iter()
                .any(|p| protocol.eq_ignore_ascii_case(p))
        })
}

/// L7 permissions aimed at a destination that speaks plain TCP: the sidecar could never
/// apply them (it sees bytes, not requests), so they would silently deny everything.
/// `service` is the Service named like the destination; `None` (no such Service yet, or
/// a `*` destination) has nothing to check against.
pub fn l7_on_tcp(spec: &ServiceIntentionsSpec, service: Option<&Service>) -> Vec<String> {
    let Some(service) = service else {
        return Vec::new();
    };
    if spec.destination.name == "*" || speaks_http(service) {
        return Vec::new();
    }
    let service_name = format!(
        "{}/{}",
        service.metadata.namespace.as_deref().unwrap_or_default(),
        service.metadata.name.as_deref().unwrap_or_default()
    );
    spec.sources
        .iter()
        .enumerate()
        .filter(|(_, source)| source.permissions.is_some())
        .map(|(i, _)| {
            format!(
                "spec.sources[{i}].permissions: L7 permissions need a destination that speaks HTTP, \
                 but Service {service_name} has no port with appProtocol {} (it is plain TCP); \
                 set appProtocol on the Service's port or use action instead",
                HTTP_APP_PROTOCOLS.join(", ")
            )
        })
        .collect()
}

/// Every problem found, each naming its field path as the API server would.
/// `destination_namespace` is what an unset source namespace means.
pub fn validate(spec: &ServiceIntentionsSpec, destination_namespace: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, source) in spec.sources.iter().enumerate() {
        let namespace = source.namespace.as_deref().unwrap_or(destination_namespace);
        if let Some(first) = seen.insert((&source.name, namespace), i) {
            problems.push(format!(
                "spec.sources[{i}]: duplicate of spec.sources[{first}] (name {:?}, namespace {namespace:?})",
                source.name
            ));
        }
        for (j, permission) in source.permissions.iter().flatten().enumerate() {
            let at = format!("spec.sources[{i}].permissions[{j}].http");
            if let Some(re) = &permission.http.path_regex {
                check_regex(&mut problems, &format!("{at}.pathRegex"), re);
            }
            for (k, header) in permission.http.header.iter().enumerate() {
                if let Some(re) = &header.regex {
                    check_regex(&mut problems, &format!("{at}.header[{k}].regex"), re);
                }
            }
        }
    }
    problems
}

fn check_regex(problems: &mut Vec<String>, field: &str, pattern: &str) {
    if let Err(error) = crate::compile_pattern(pattern) {
        let first_line = error
            .to_string()
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_owned();
        problems.push(format!("{field}: invalid regular expression: {first_line}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_crds::{
        HttpHeaderMatch, HttpMatch, IntentionAction, IntentionDestination, IntentionPermission,
        IntentionSource,
    };

    fn service(app_protocol: Option<&str>) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "api", "namespace": "shop"},
            "spec": {"ports": [
                {"name": "metrics", "port": 9090},
                {"name": "main", "port": 80, "appProtocol": app_protocol},
            ]},
        }))
        .unwrap()
    }

    #[test]
    fn l7_permissions_for_a_plain_tcp_service_are_reported() {
        let spec = spec_with(HttpMatch::default());
        let problems = l7_on_tcp(&spec, Some(&service(None)));
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with(
                "spec.sources[0].permissions: L7 permissions need a destination that speaks HTTP"
            ) && problems[0].contains("Service shop/api"),
            "{problems:?}"
        );
        assert_eq!(l7_on_tcp(&spec, Some(&service(Some("tcp")))).len(), 1);
    }

    #[test]
    fn l7_permissions_for_an_http_service_or_an_unknown_one_pass() {
        let spec = spec_with(HttpMatch::default());
        for protocol in ["http", "HTTP2", "kubernetes.io/h2c"] {
            assert!(
                l7_on_tcp(&spec, Some(&service(Some(protocol)))).is_empty(),
                "{protocol}"
            );
        }
        // No Service yet: nothing to compare against (the reconciler checks again later).
        assert!(l7_on_tcp(&spec, None).is_empty());
        // L4 sources never need HTTP.
        let mut l4 = spec.clone();
        l4.sources[0].permissions = None;
        l4.sources[0].action = Some(IntentionAction::Allow);
        assert!(l7_on_tcp(&l4, Some(&service(None))).is_empty());
    }

    fn spec_with(http: HttpMatch) -> ServiceIntentionsSpec {
        ServiceIntentionsSpec {
            destination: IntentionDestination {
                name: "api".into(),
                namespace: None,
            },
            sources: vec![IntentionSource {
                name: "web".into(),
                permissions: Some(vec![IntentionPermission {
                    action: IntentionAction::Allow,
                    http,
                    jwt: None,
                }]),
                ..Default::default()
            }],
            jwt: None,
        }
    }

    #[test]
    fn a_source_listed_twice_is_reported() {
        let mut spec = spec_with(HttpMatch::default());
        let web = |namespace: Option<&str>| IntentionSource {
            name: "web".into(),
            namespace: namespace.map(Into::into),
            action: Some(IntentionAction::Deny),
            ..Default::default()
        };
        // Unset means the destination's namespace: these two name the same source.
        spec.sources.push(web(Some("shop")));
        spec.sources.push(web(Some("other")));
        assert_eq!(
            validate(&spec, "shop"),
            vec![r#"spec.sources[1]: duplicate of spec.sources[0] (name "web", namespace "shop")"#]
        );
    }

    #[test]
    fn valid_regexes_pass() {
        let spec = spec_with(HttpMatch {
            path_regex: Some("^/v[0-9]+/items$".into()),
            ..Default::default()
        });
        assert!(validate(&spec, "shop").is_empty());
    }

    #[test]
    fn invalid_regexes_name_their_field() {
        let spec = spec_with(HttpMatch {
            path_regex: Some("/api/(".into()),
            header: vec![HttpHeaderMatch {
                name: "x-role".into(),
                regex: Some("[z-a]".into()),
                ..Default::default()
            }],
            ..Default::default()
        });
        let problems = validate(&spec, "shop");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0]
                .starts_with("spec.sources[0].permissions[0].http.pathRegex: invalid regular expression")
        );
        assert!(problems[1].starts_with("spec.sources[0].permissions[0].http.header[0].regex:"));
    }
}
