//! YAML that kubectl reads back as it was meant. serde_yaml_ng writes YAML 1.2, where
//! `yes`, `no`, `on`, `off`, `y` and `n` are strings and need no quotes; kubectl (through
//! sigs.k8s.io/yaml) reads YAML 1.1, where they are booleans, so redis's
//! `args: ["--appendonly", "yes"]` came back as `[--appendonly, true]` and the API server
//! refused the Job. This writer quotes every string that is not plainly a string in both
//! (a conservative set of characters, never a word either version reads otherwise), as a
//! JSON string, which is valid YAML in both; multi-line text is a literal block.

use serde_json::Value;
use std::fmt::Write as _;

/// `value` as a YAML document (block style, keys in the order the value holds them).
pub fn to_string(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) if !map.is_empty() => mapping(&mut out, map, 0),
        Value::Array(items) if !items.is_empty() => sequence(&mut out, items, 0),
        other => {
            out.push_str(&inline(other, 0));
            out.push('\n');
        }
    }
    out
}

fn mapping(out: &mut String, map: &serde_json::Map<String, Value>, indent: usize) {
    for (key, value) in map {
        let _ = write!(out, "{:indent$}{}:", "", scalar(key, indent));
        entry(out, value, indent);
    }
}

fn sequence(out: &mut String, items: &[Value], indent: usize) {
    for item in items {
        let _ = write!(out, "{:indent$}-", "");
        match item {
            // A mapping in a sequence starts on the dash's line, the rest aligned under it.
            Value::Object(map) if !map.is_empty() => {
                let mut nested = String::new();
                mapping(&mut nested, map, indent + 2);
                out.push(' ');
                out.push_str(&nested[indent + 2..]);
            }
            other => entry(out, other, indent),
        }
    }
}

/// What follows `key:` or `-`: a nested block on the next lines, or an inline value.
fn entry(out: &mut String, value: &Value, indent: usize) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            out.push('\n');
            mapping(out, map, indent + 2);
        }
        Value::Array(items) if !items.is_empty() => {
            out.push('\n');
            sequence(out, items, indent + 2);
        }
        other => {
            out.push(' ');
            out.push_str(&inline(other, indent));
            out.push('\n');
        }
    }
}

fn inline(value: &Value, indent: usize) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => scalar(s, indent),
        Value::Array(_) => "[]".to_owned(),
        Value::Object(_) => "{}".to_owned(),
    }
}

/// A string as a plain scalar when both YAML versions read it as that string, as a
/// literal block when it is printable multi-line text, and as a JSON string otherwise.
fn scalar(s: &str, indent: usize) -> String {
    if is_plain(s) {
        return s.to_owned();
    }
    if let Some(block) = literal_block(s, indent) {
        return block;
    }
    serde_json::to_string(s).expect("a string serializes")
}

fn is_plain(s: &str) -> bool {
    // Words YAML 1.1 reads as booleans or null (any case), and 1.2's null.
    const SPECIAL: &[&str] = &["y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"];
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    // A letter, `_` or `/` first: never a number, a sign, an indicator (`-`, `?`, `:`,
    // `&`, `*`, `!`, `|`, `>`, `%`, `@`, a quote) or `.inf`/`.nan`.
    (first.is_ascii_alphabetic() || first == '_' || first == '/')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-'))
        && !SPECIAL.contains(&s.to_ascii_lowercase().as_str())
}

/// `|`, `|-` or `|+` and the lines indented under the key, for text of printable lines
/// that a literal block keeps exactly (no leading space on the first line, which would
/// need an indentation indicator; no carriage returns or other control characters).
fn literal_block(s: &str, indent: usize) -> Option<String> {
    if !s.contains('\n')
        || s.starts_with(' ')
        || s.starts_with('\n')
        || s.chars().any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return None;
    }
    let body = s.trim_end_matches('\n');
    let chomp = match s.len() - body.len() {
        0 => "-",
        1 => "",
        _ => "+",
    };
    let mut out = format!("|{chomp}");
    for line in s.strip_suffix('\n').unwrap_or(s).split('\n') {
        out.push('\n');
        if !line.is_empty() {
            let _ = write!(out, "{:width$}{line}", "", width = indent + 2);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What kubectl's YAML 1.1 would misread is quoted; the text reads back equal.
    #[test]
    fn yaml_1_1_words_numbers_and_indicators_are_quoted_and_read_back_equal() {
        let value = json!({
            "spec": {
                "args": ["--appendonly", "yes", "no", "On", "off", "y", "N", "true", "null", "~",
                         "123", "1.5", "-x", ": x", "a b", "", "#c", "*ref", "ok"],
                "env": {"on": "1", "PLAIN_NAME": "value/with.dots-and_", "count": 3, "flag": true},
                "data": "line one\n  line two\n\nyes\n",
                "noTrailing": "a\nb",
                "manyTrailing": "a\n\n\n",
                "leadingSpace": " a\nb",
                "empty": {}, "none": [],
                "groups": [{"name": "web", "tasks": [{"name": "t", "ports": [{"name": "http", "port": 80}]}]}],
            }
        });
        let text = to_string(&value);
        for word in [
            "yes", "no", "On", "off", "y", "N", "true", "null", "~", "123", "1.5",
        ] {
            assert!(
                text.contains(&format!("- \"{word}\"")),
                "{word} unquoted:\n{text}"
            );
        }
        assert!(text.contains("\"on\": \"1\""), "{text}");
        assert!(text.contains("- ok\n"), "{text}");
        assert!(text.contains("PLAIN_NAME: value/with.dots-and_\n"), "{text}");
        assert!(
            text.contains("data: |\n    line one\n      line two\n\n    yes\n"),
            "{text}"
        );
        // Read back as YAML 1.2 (serde_yaml_ng), which sees what it was given; and every
        // string that 1.1 would read otherwise is quoted above.
        let back: Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(back, value, "{text}");
    }

    #[test]
    fn a_document_that_is_not_a_mapping_is_written_inline() {
        assert_eq!(to_string(&json!({})), "{}\n");
        assert_eq!(to_string(&json!("yes")), "\"yes\"\n");
        assert_eq!(
            to_string(&json!([1, [2, {"a": "b"}]])),
            "- 1\n-\n  - 2\n  - a: b\n"
        );
    }
}
