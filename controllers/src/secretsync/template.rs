//! The target Secret's keys: templates over the source's fields (pure).
//!
//! A template is text with `{{ field }}` placeholders; nothing else is interpreted (no
//! functions, no conditionals), so a template can neither run code nor read anything
//! but the fields of its own source. Errors name keys and fields, never values.

use std::collections::BTreeMap;

/// The source's fields, by name: what a template may refer to.
pub type Fields = BTreeMap<String, String>;

/// The Secret's data as the controller writes it.
pub type Data = BTreeMap<String, Vec<u8>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("target.template[{key}]: a '{{{{' at byte {at} is not closed")]
    Unclosed { key: String, at: usize },
    #[error("target.template[{key}]: {placeholder:?} is not a field name (letters, digits, '_', '-', '.')")]
    BadPlaceholder { key: String, placeholder: String },
    #[error("target.template[{key}]: the source has no field {field:?} (it has: {available})")]
    UnknownField {
        key: String,
        field: String,
        available: String,
    },
    #[error("{key:?} is not a valid Secret key (letters, digits, '-', '_', '.'; no '..', no '/')")]
    BadKey { key: String },
    #[error("the source has no fields")]
    Empty,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Text(String),
    Field(String),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Segment>);

/// Whether `key` may name a Secret key (and so, mounted, a file): the API server's rule
/// for ConfigMap and Secret keys, and no `..` anywhere (S4).
pub fn is_valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key != "."
        && !key.contains("..")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn is_field_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

pub fn parse(key: &str, text: &str) -> Result<Template, Error> {
    let mut segments = Vec::new();
    let mut rest = text;
    let mut offset = 0;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            segments.push(Segment::Text(rest[..start].to_owned()));
        }
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or(Error::Unclosed {
            key: key.to_owned(),
            at: offset + start,
        })?;
        let name = after[..end].trim();
        if !is_field_name(name) {
            return Err(Error::BadPlaceholder {
                key: key.to_owned(),
                placeholder: after[..end].chars().take(64).collect(),
            });
        }
        segments.push(Segment::Field(name.to_owned()));
        let consumed = start + 2 + end + 2;
        offset += consumed;
        rest = &rest[consumed..];
    }
    if !rest.is_empty() {
        segments.push(Segment::Text(rest.to_owned()));
    }
    Ok(Template(segments))
}

/// Parses every template of a spec, checking its keys.
pub fn parse_all(templates: &BTreeMap<String, String>) -> Result<BTreeMap<String, Template>, Error> {
    templates
        .iter()
        .map(|(key, text)| {
            if !is_valid_key(key) {
                return Err(Error::BadKey { key: key.clone() });
            }
            Ok((key.clone(), parse(key, text)?))
        })
        .collect()
}

/// The Secret's data: every template rendered over `fields`, or with no templates, one
/// key per field (each field name must then be a valid key).
pub fn render(templates: Option<&BTreeMap<String, Template>>, fields: &Fields) -> Result<Data, Error> {
    let Some(templates) = templates else {
        if fields.is_empty() {
            return Err(Error::Empty);
        }
        return fields
            .iter()
            .map(|(name, value)| {
                if !is_valid_key(name) {
                    return Err(Error::BadKey { key: name.clone() });
                }
                Ok((name.clone(), value.as_bytes().to_vec()))
            })
            .collect();
    };
    let mut data = Data::new();
    for (key, Template(segments)) in templates {
        let mut out = String::new();
        for segment in segments {
            match segment {
                Segment::Text(text) => out.push_str(text),
                Segment::Field(name) => match fields.get(name) {
                    Some(value) => out.push_str(value),
                    None => {
                        return Err(Error::UnknownField {
                            key: key.clone(),
                            field: name.clone(),
                            available: fields.keys().cloned().collect::<Vec<_>>().join(", "),
                        });
                    }
                },
            }
        }
        data.insert(key.clone(), out.into_bytes());
    }
    Ok(data)
}

/// A KV entry's fields: strings as they are, anything else as its JSON text.
pub fn kv_fields(data: &serde_json::Map<String, serde_json::Value>) -> Fields {
    data.iter()
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), text)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> Fields {
        [("username", "v-app-1"), ("password", "s3cr3t")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    fn templates(pairs: &[(&str, &str)]) -> Result<BTreeMap<String, Template>, Error> {
        parse_all(
            &pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn renders_placeholders_and_text() {
        let t = templates(&[
            ("url", "postgres://{{ username }}:{{password}}@db:5432/app"),
            ("user", "{{ username }}"),
            ("static", "no placeholders { here }"),
        ])
        .unwrap();
        let data = render(Some(&t), &fields()).unwrap();
        assert_eq!(data["url"], b"postgres://v-app-1:s3cr3t@db:5432/app");
        assert_eq!(data["user"], b"v-app-1");
        assert_eq!(data["static"], b"no placeholders { here }");
    }

    #[test]
    fn default_is_one_key_per_field() {
        let data = render(None, &fields()).unwrap();
        assert_eq!(data.len(), 2);
        assert_eq!(data["password"], b"s3cr3t");
        assert_eq!(render(None, &Fields::new()), Err(Error::Empty));
    }

    #[test]
    fn errors_name_keys_and_fields_never_values() {
        let t = templates(&[("x", "{{ nope }}")]).unwrap();
        let error = render(Some(&t), &fields()).unwrap_err().to_string();
        assert!(error.contains("nope") && error.contains("username"));
        assert!(!error.contains("s3cr3t") && !error.contains("v-app-1"));
        assert!(matches!(
            templates(&[("x", "{{ username ")]),
            Err(Error::Unclosed { at: 0, .. })
        ));
        assert!(matches!(
            templates(&[("x", "{{ a b }}")]),
            Err(Error::BadPlaceholder { .. })
        ));
        assert!(matches!(
            templates(&[("x", "{{ .. | exec }}")]),
            Err(Error::BadPlaceholder { .. })
        ));
    }

    /// S4: a key that would climb out of a mounted volume, or name a subdirectory, is
    /// refused, whether from a template or from a KV field name.
    #[test]
    fn keys_cannot_traverse() {
        for bad in ["..", ".", "../etc", "a/b", "/abs", "a..b", "", "a b", "ä"] {
            assert!(!is_valid_key(bad), "{bad:?}");
            assert!(
                matches!(templates(&[(bad, "x")]), Err(Error::BadKey { .. })),
                "{bad:?}"
            );
        }
        for good in ["tls.crt", "username", "a-b_c.d", ".dockerconfigjson", "X1"] {
            assert!(is_valid_key(good), "{good:?}");
        }
        let mut hostile = fields();
        hostile.insert("../../etc/passwd".into(), "x".into());
        assert!(matches!(render(None, &hostile), Err(Error::BadKey { .. })));
    }

    #[test]
    fn kv_values_that_are_not_strings_are_json() {
        let map = serde_json::json!({"s": "text", "n": 5, "o": {"a": true}});
        let f = kv_fields(map.as_object().unwrap());
        assert_eq!(f["s"], "text");
        assert_eq!(f["n"], "5");
        assert_eq!(f["o"], r#"{"a":true}"#);
    }
}
