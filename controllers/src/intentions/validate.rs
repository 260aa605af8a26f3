//! Checks the CRD schema cannot express (pure). The schema and CEL rules refuse most bad
//! input at the door; what remains (regular expressions that do not compile) is reported
//! in status here, so a bad object is visible instead of silently ignored.

use capstan_crds::ServiceIntentionsSpec;

/// Every problem found, each naming its field path as the API server would.
pub fn validate(spec: &ServiceIntentionsSpec) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, source) in spec.sources.iter().enumerate() {
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
    // The size limit keeps a hostile pattern from costing the sidecar memory or time.
    if let Err(error) = regex::RegexBuilder::new(pattern).size_limit(1 << 20).build() {
        let first_line = error.to_string().lines().last().unwrap_or_default().trim().to_owned();
        problems.push(format!("{field}: invalid regular expression: {first_line}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_crds::{
        HttpHeaderMatch, HttpMatch, IntentionAction, IntentionDestination, IntentionPermission, IntentionSource,
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
    fn valid_regexes_pass() {
        let spec = spec_with(HttpMatch {
            path_regex: Some("^/v[0-9]+/items$".into()),
            ..Default::default()
        });
        assert!(validate(&spec).is_empty());
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
        let problems = validate(&spec);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("spec.sources[0].permissions[0].http.pathRegex: invalid regular expression"));
        assert!(problems[1].starts_with("spec.sources[0].permissions[0].http.header[0].regex:"));
    }
}
