//! Reading a ServiceIntentions that a newer Capstan may have written (RELIABILITY M14).
//! Serde ignores fields it does not know, and a condition an old sidecar silently drops
//! turns an allow rule into a wider one ("always match"). So the raw object is read here
//! first: a permission with a field or a value this version does not understand becomes
//! one that can only deny (it never matches as an allow, always as a deny), and a source
//! whose own fields are not understood is denied outright. Everything understood decodes
//! as usual.

use capstan_crds::ServiceIntentions;
use serde_json::Value;

// Consul fields Capstan declares but does not implement (`jwt`, a source's `peer`,
// `partition` and `samenessGroup`) are left out of these lists on purpose: the schema
// refuses them, and one stored anyway is read as not understood, so it denies.
const SPEC_FIELDS: &[&str] = &["destination", "sources"];
const SOURCE_FIELDS: &[&str] = &["name", "namespace", "description", "action", "permissions"];
const PERMISSION_FIELDS: &[&str] = &["action", "http"];
const HTTP_FIELDS: &[&str] = &["pathExact", "pathPrefix", "pathRegex", "methods", "header"];
const HEADER_FIELDS: &[&str] = &["name", "present", "exact", "prefix", "suffix", "regex", "invert"];
const ACTIONS: &[&str] = &["allow", "deny"];
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];
/// A pattern that never compiles: the engine's "broken rule" (deny-only) semantics.
const NEVER: &str = "(";

/// What was not understood, for the log line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NotUnderstood(pub Vec<String>);

/// Decodes `raw` so that nothing this version cannot read can allow. Fails only when the
/// object's metadata or destination cannot be read at all.
pub fn decode(mut raw: Value) -> Result<(ServiceIntentions, NotUnderstood), serde_json::Error> {
    let mut notes = Vec::new();
    let unknown = raw
        .get("spec")
        .map(|spec| unknown_keys(spec, SPEC_FIELDS))
        .unwrap_or_default();
    if !unknown.is_empty() {
        // A condition on the whole object (a JWT requirement, say): nothing it allows
        // may pass without it.
        notes.push(format!(
            "spec: not understood ({}), every source denied",
            describe(&unknown, false)
        ));
        if let Some(spec) = raw.get_mut("spec").and_then(Value::as_object_mut) {
            spec.retain(|k, _| SPEC_FIELDS.contains(&k.as_str()));
        }
        for source in raw
            .pointer_mut("/spec/sources")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            deny_source(source);
        }
    }
    if let Some(sources) = raw.pointer_mut("/spec/sources").and_then(Value::as_array_mut) {
        for (i, source) in sources.iter_mut().enumerate() {
            sanitize_source(source, i, &mut notes);
        }
    }
    let object = serde_json::from_value(raw)?;
    Ok((object, NotUnderstood(notes)))
}

fn unknown_keys(object: &Value, known: &[&str]) -> Vec<String> {
    object
        .as_object()
        .map(|o| {
            o.keys()
                .filter(|k| !known.contains(&k.as_str()))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

fn sanitize_source(source: &mut Value, i: usize, notes: &mut Vec<String>) {
    let unknown = unknown_keys(source, SOURCE_FIELDS);
    let bad_action = source
        .get("action")
        .is_some_and(|a| !a.as_str().is_some_and(|a| ACTIONS.contains(&a)));
    let bad_permissions = source
        .get("permissions")
        .is_some_and(|p| !p.is_array() && !p.is_null());
    if !unknown.is_empty() || bad_action || bad_permissions {
        notes.push(format!(
            "sources[{i}]: not understood ({}), denied",
            describe(&unknown, bad_action)
        ));
        deny_source(source);
        return;
    }
    let Some(permissions) = source.get_mut("permissions").and_then(Value::as_array_mut) else {
        return;
    };
    for (j, permission) in permissions.iter_mut().enumerate() {
        if let Some(reason) = permission_problem(permission) {
            notes.push(format!(
                "sources[{i}].permissions[{j}]: {reason}; it can only deny"
            ));
            make_deny_only(permission);
        }
    }
}

fn describe(unknown: &[String], bad_action: bool) -> String {
    let mut parts: Vec<String> = unknown.iter().map(|k| format!("field {k:?}")).collect();
    if bad_action {
        parts.push("an unknown action".to_owned());
    }
    parts.join(", ")
}

/// Why a permission cannot be fully read, if it cannot.
fn permission_problem(permission: &Value) -> Option<String> {
    let unknown = unknown_keys(permission, PERMISSION_FIELDS);
    if !unknown.is_empty() {
        return Some(format!("unknown fields {unknown:?}"));
    }
    let action = permission.get("action").and_then(Value::as_str);
    if !action.is_some_and(|a| ACTIONS.contains(&a)) {
        return Some("an unknown action".to_owned());
    }
    let http = permission.get("http")?;
    let unknown = unknown_keys(http, HTTP_FIELDS);
    if !unknown.is_empty() {
        return Some(format!("unknown http fields {unknown:?}"));
    }
    if let Some(methods) = http.get("methods") {
        let all_known = methods
            .as_array()
            .is_some_and(|m| m.iter().all(|m| m.as_str().is_some_and(|m| METHODS.contains(&m))));
        if !all_known {
            return Some("an unknown method".to_owned());
        }
    }
    for header in http.get("header").and_then(Value::as_array).into_iter().flatten() {
        let unknown = unknown_keys(header, HEADER_FIELDS);
        if !unknown.is_empty() {
            return Some(format!("unknown header match fields {unknown:?}"));
        }
    }
    None
}

fn deny_source(source: &mut Value) {
    if let Some(object) = source.as_object_mut() {
        object.retain(|k, _| k == "name" || k == "namespace" || k == "description");
        object.insert("action".to_owned(), Value::from("deny"));
    }
}

/// Keeps the permission's action and position (first match wins) but gives it a match
/// that cannot be evaluated: such a rule never matches as an allow and always as a deny.
fn make_deny_only(permission: &mut Value) {
    let action = permission
        .get("action")
        .and_then(Value::as_str)
        .filter(|a| ACTIONS.contains(a))
        .unwrap_or("deny")
        .to_owned();
    *permission = serde_json::json!({ "action": action, "http": { "pathRegex": NEVER } });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Identity, Policy, Request};
    use serde_json::json;

    fn object(sources: Value) -> Value {
        json!({
            "apiVersion": "mesh.capstan.dev/v1alpha1", "kind": "ServiceIntentions",
            "metadata": {"name": "api", "namespace": "shop", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"destination": {"name": "api"}, "sources": sources},
        })
    }

    fn decide(raw: Value, method: &str, path: &str) -> bool {
        let (obj, _) = decode(raw).unwrap();
        let policy = Policy::compile(&[obj], false, "capstan-system");
        let request = Request {
            method,
            target: path,
            headers: &[("x-tenant", "a")],
        };
        policy
            .request(
                &Identity::new("shop", "web"),
                &Identity::new("shop", "api"),
                &request,
            )
            .allow
    }

    #[test]
    fn understood_objects_decode_unchanged() {
        let raw = object(json!([{"name": "web", "permissions": [
            {"action": "allow", "http": {"pathPrefix": "/public", "methods": ["GET"], "header": [{"name": "x-tenant", "exact": "a"}]}}
        ]}]));
        let (obj, notes) = decode(raw.clone()).unwrap();
        assert!(notes.0.is_empty());
        let plain: ServiceIntentions = serde_json::from_value(raw).unwrap();
        assert_eq!(obj.spec, plain.spec);
        assert!(decide(
            object(json!([{"name": "web", "permissions": [
            {"action": "allow", "http": {"pathPrefix": "/public"}}]}])),
            "GET",
            "/public/x"
        ));
    }

    #[test]
    fn an_allow_with_an_unknown_condition_never_allows() {
        // A newer version's `queryParam` condition: ignoring it would allow every query.
        let raw = object(json!([{"name": "web", "permissions": [
            {"action": "allow", "http": {"pathPrefix": "/public", "queryParam": [{"name": "debug", "exact": "0"}]}}
        ]}]));
        let (_, notes) = decode(raw.clone()).unwrap();
        assert_eq!(notes.0.len(), 1, "{notes:?}");
        assert!(!decide(raw, "GET", "/public/x"));
    }

    #[test]
    fn a_deny_with_an_unknown_condition_always_denies() {
        let raw = object(json!([{"name": "web", "permissions": [
            {"action": "deny", "http": {"pathPrefix": "/admin", "sourceIp": "10.0.0.0/8"}},
            {"action": "allow", "http": {"pathPrefix": "/"}},
        ]}]));
        assert!(
            !decide(raw.clone(), "GET", "/public"),
            "the unreadable deny comes first and matches"
        );
        let raw = object(json!([{"name": "web", "permissions": [
            {"action": "allow", "http": {"pathPrefix": "/"}},
            {"action": "deny", "http": {"pathPrefix": "/admin", "sourceIp": "10.0.0.0/8"}},
        ]}]));
        assert!(
            decide(raw, "GET", "/public"),
            "an earlier understood allow still decides first"
        );
    }

    #[test]
    fn unknown_values_and_source_fields_deny() {
        for sources in [
            json!([{"name": "web", "action": "audit"}]),
            json!([{"name": "web", "action": "allow", "peer": "cluster-2"}]),
            json!([{"name": "web", "permissions": [{"action": "allow", "http": {"methods": ["QUERY"]}}]}]),
            json!([{"name": "web", "permissions": [{"action": "allow", "http": {"header": [{"name": "x", "contains": "y"}]}}]}]),
            json!([{"name": "web", "permissions": [{"action": "log", "http": {"pathPrefix": "/"}}]}]),
        ] {
            assert!(!decide(object(sources.clone()), "GET", "/"), "{sources}");
        }
    }

    #[test]
    fn an_unknown_condition_on_the_whole_object_denies_every_source() {
        let mut raw = object(json!([{"name": "web", "action": "allow"}]));
        raw["spec"]["jwt"] = json!({"providers": [{"name": "okta"}]});
        let (_, notes) = decode(raw.clone()).unwrap();
        assert_eq!(notes.0.len(), 1, "{notes:?}");
        assert!(!decide(raw, "GET", "/"));
    }
}
