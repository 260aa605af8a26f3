//! Checks the CRD schema cannot express (pure). The schema and CEL rules refuse most bad
//! input at the door; what remains (regular expressions that do not compile, a source
//! listed twice: a quadratic CEL rule would exceed the API server's cost budget) is
//! reported in status here, so a bad object is visible instead of silently ignored.

use capstan_crds::ServiceIntentionsSpec;
use std::collections::HashMap;

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
    if let Err(error) = capstan_mesh::compile_pattern(pattern) {
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
                }]),
                ..Default::default()
            }],
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
