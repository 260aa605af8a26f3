//! Policy text to rules: HCL through hcl-rs, JSON through serde_json (Vault accepts
//! both). Every key is accounted for: anything unknown is an error naming it.

use super::{Capability, PathRule, PolicyError};
use hcl::{Body, Expression, Structure};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::{collections::BTreeSet, fmt};

/// Vault's path-block keys that Capstan does not implement: named in the error, so a
/// policy written for Vault says why it is refused.
const UNSUPPORTED: &[&str] = &[
    "policy",
    "allowed_parameters",
    "denied_parameters",
    "required_parameters",
    "min_wrapping_ttl",
    "max_wrapping_ttl",
    "mfa_methods",
    "control_group",
    "subscribe_event_types",
];

/// The largest policy text accepted (Vault sets no bound; 128 KiB is some 1,500 rules).
pub const MAX_POLICY_LEN: usize = 128 * 1024;

/// The deepest nesting of `{`, `[` and `(` the grammar needs: 2 in HCL
/// (`path "…" { capabilities = [ ] }`), 5 in JSON's list form
/// (`{"path": [{"…": {"capabilities": [ ]}}]}`). Fuzzing found hcl-rs taking over 10 s on 740 bytes of unclosed `{` blocks, so the text is
/// scanned for depth first, in linear time, and anything deeper is refused before parsing.
const MAX_DEPTH: usize = 5;

pub(super) fn parse(text: &str) -> Result<Vec<PathRule>, PolicyError> {
    if text.len() > MAX_POLICY_LEN {
        return Err(PolicyError::Syntax(format!(
            "policy is {} bytes, more than the {MAX_POLICY_LEN} allowed",
            text.len()
        )));
    }
    check_depth(text)?;
    let raw = if text.trim_start().starts_with('{') {
        parse_json(text)?
    } else {
        parse_hcl(text)?
    };
    raw.into_iter()
        .map(|(pattern, caps)| {
            check_pattern(&pattern)?;
            let capabilities = caps
                .iter()
                .map(|c| c.parse::<Capability>())
                .collect::<Result<BTreeSet<_>, _>>()?;
            Ok(PathRule {
                pattern,
                capabilities,
            })
        })
        .collect()
}

/// Refuses text nested deeper than [`MAX_DEPTH`], skipping strings and comments (HCL's
/// `#`, `//` and `/* */`; JSON has none, and its strings use the same quoting). Heredocs
/// are not part of the policy grammar and are refused, so their bodies need no skipping.
fn check_depth(text: &str) -> Result<(), PolicyError> {
    let b = text.as_bytes();
    let (mut i, mut depth) = (0, 0usize);
    while i < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b'<' if b.get(i + 1) == Some(&b'<') => {
                return Err(PolicyError::Syntax(
                    "heredocs are not part of the policy grammar".into(),
                ));
            }
            b'{' | b'[' | b'(' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(PolicyError::Syntax(format!(
                        "nested deeper than {MAX_DEPTH} levels of braces or brackets"
                    )));
                }
            }
            b'}' | b']' | b')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

fn unknown(key: &str, place: &str) -> PolicyError {
    let place = if UNSUPPORTED.contains(&key) {
        format!("{place} (Vault's `{key}` is not supported)")
    } else {
        place.to_string()
    };
    PolicyError::UnknownKey {
        key: key.to_string(),
        place,
    }
}

fn parse_hcl(text: &str) -> Result<Vec<(String, Vec<String>)>, PolicyError> {
    let body: Body = hcl::parse(text).map_err(|e| PolicyError::Hcl(e.to_string()))?;
    let mut rules = Vec::new();
    for structure in body.into_inner() {
        let block = match structure {
            Structure::Attribute(a) => return Err(unknown(a.key.as_str(), "the policy")),
            Structure::Block(b) => b,
        };
        if block.identifier() != "path" {
            return Err(unknown(block.identifier(), "the policy"));
        }
        let [label] = block.labels() else {
            return Err(PolicyError::Syntax(format!(
                "a path block takes exactly one pattern, got {}",
                block.labels().len()
            )));
        };
        let pattern = label.as_str().to_string();
        let mut caps = None;
        for item in block.body.into_inner() {
            match item {
                Structure::Attribute(a) if a.key.as_str() == "capabilities" => {
                    if caps.is_some() {
                        return Err(PolicyError::Path {
                            path: pattern,
                            reason: "capabilities given twice",
                        });
                    }
                    caps = Some(hcl_strings(&pattern, a.expr)?);
                }
                Structure::Attribute(a) => return Err(unknown(a.key.as_str(), &format!("path {pattern:?}"))),
                Structure::Block(b) => return Err(unknown(b.identifier(), &format!("path {pattern:?}"))),
            }
        }
        let caps = caps.ok_or(PolicyError::Path {
            path: pattern.clone(),
            reason: "no capabilities (write `capabilities = [\"deny\"]` to deny)",
        })?;
        rules.push((pattern, caps));
    }
    Ok(rules)
}

fn hcl_strings(pattern: &str, expr: Expression) -> Result<Vec<String>, PolicyError> {
    let not_list = || PolicyError::Path {
        path: pattern.to_string(),
        reason: "capabilities must be a list of strings",
    };
    let Expression::Array(items) = expr else {
        return Err(not_list());
    };
    items
        .into_iter()
        .map(|e| match e {
            Expression::String(s) => Ok(s),
            _ => Err(not_list()),
        })
        .collect()
}

/// JSON as written, duplicate keys kept (serde_json's `Value` would keep only the last
/// of two `"capabilities"`, silently).
enum Json {
    Other,
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("JSON")
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Json, E> {
                Ok(Json::Other)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Json, E> {
                Ok(Json::Other)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Json, E> {
                Ok(Json::Other)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Json, E> {
                Ok(Json::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Json, E> {
                Ok(Json::Other)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Json, E> {
                Ok(Json::String(s.to_string()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Json, E> {
                Ok(Json::String(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Json::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Json>()? {
                    entries.push(entry);
                }
                Ok(Json::Object(entries))
            }
        }
        d.deserialize_any(V)
    }
}

/// `{"path": {"<pattern>": {"capabilities": [...]}, ...}}`, or `"path"` as a list of
/// such objects (both forms Vault's HCL v1 reads).
fn parse_json(text: &str) -> Result<Vec<(String, Vec<String>)>, PolicyError> {
    let json: Json = serde_json::from_str(text).map_err(|e| PolicyError::Json(e.to_string()))?;
    let Json::Object(top) = json else {
        return Err(PolicyError::Syntax("a JSON policy is an object".into()));
    };
    let mut rules = Vec::new();
    for (key, value) in top {
        if key != "path" {
            return Err(unknown(&key, "the policy"));
        }
        let groups = match value {
            Json::Object(paths) => vec![paths],
            Json::Array(items) => items
                .into_iter()
                .map(|i| match i {
                    Json::Object(paths) => Ok(paths),
                    _ => Err(PolicyError::Syntax("\"path\" must hold objects".into())),
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(PolicyError::Syntax("\"path\" must be an object".into())),
        };
        for (pattern, body) in groups.into_iter().flatten() {
            let Json::Object(fields) = body else {
                return Err(PolicyError::Path {
                    path: pattern,
                    reason: "a path rule must be an object",
                });
            };
            let mut caps = None;
            for (field, value) in fields {
                if field != "capabilities" {
                    return Err(unknown(&field, &format!("path {pattern:?}")));
                }
                if caps.is_some() {
                    return Err(PolicyError::Path {
                        path: pattern,
                        reason: "capabilities given twice",
                    });
                }
                caps = Some(json_strings(&pattern, value)?);
            }
            let caps = caps.ok_or(PolicyError::Path {
                path: pattern.clone(),
                reason: "no capabilities (write `\"capabilities\": [\"deny\"]` to deny)",
            })?;
            rules.push((pattern, caps));
        }
    }
    Ok(rules)
}

fn json_strings(pattern: &str, value: Json) -> Result<Vec<String>, PolicyError> {
    let not_list = || PolicyError::Path {
        path: pattern.to_string(),
        reason: "capabilities must be a list of strings",
    };
    let Json::Array(items) = value else {
        return Err(not_list());
    };
    items
        .into_iter()
        .map(|i| match i {
            Json::String(s) => Ok(s),
            Json::Other | Json::Array(_) | Json::Object(_) => Err(not_list()),
        })
        .collect()
}

/// Refuses patterns that Vault would read in a surprising way or that could never
/// match a normalized request path.
pub(super) fn check_pattern(pattern: &str) -> Result<(), PolicyError> {
    let refuse = |reason| {
        Err(PolicyError::Path {
            path: pattern.to_string(),
            reason,
        })
    };
    if pattern.is_empty() {
        return refuse("empty pattern");
    }
    if pattern.chars().any(|c| c.is_control()) {
        return refuse("control character in pattern");
    }
    if pattern.starts_with('/') {
        return refuse("patterns have no leading '/' (they are request paths without /v1/)");
    }
    let body = pattern.strip_suffix('*').unwrap_or(pattern);
    if body.contains('*') {
        return refuse("'*' is only allowed at the end of a pattern");
    }
    if pattern.ends_with("+*") {
        return refuse("'+*' is not allowed (use '+' or '*')");
    }
    if body.contains("//") {
        return refuse("'//' never matches a request path");
    }
    // The last segment of a glob is a prefix ("a/.*" is fine); the others are whole.
    let whole = if pattern.ends_with('*') {
        body.rsplit_once('/').map_or("", |(head, _)| head)
    } else {
        body
    };
    if whole.split('/').any(|s| s == "." || s == "..") {
        return refuse("'.' and '..' segments never match a request path");
    }
    Ok(())
}
