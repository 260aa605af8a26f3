//! Rendering (pure) and writing (one atomic rename) of a secret's file.
//!
//! Without a template a file holds the secret's fields as one JSON object (then a
//! newline): unambiguous for any value, and read by every language's standard library.
//! A template is text with `{{ field }}` placeholders, each replaced by that field's
//! value (a string as it is, anything else as JSON); an unknown field is an error that
//! names the field. No logic, no includes, no escapes: a tiny grammar with nothing to
//! exploit, fully tested here.
//!
//! A file is written as a temporary file in the same folder (created exclusively, mode
//! 0400, never following a symlink), flushed to disk, then renamed over the old one:
//! a reader sees the old content or the new, never a part. Names are checked before
//! (S4, `args::check_file_name`), and checked again here.

use serde_json::{Map, Value};
use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

/// A parsed template: literal text and field names, alternating.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template(Vec<Piece>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Field(String),
}

impl Template {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let close = after.find("}}").ok_or_else(|| {
                format!(
                    "a '{{{{' at byte {} is never closed",
                    text.len() - rest.len() + open
                )
            })?;
            let name = after[..close].trim();
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
            {
                return Err(format!(
                    "{{{{ {name} }}}} is not a field name (letters, digits, '_', '-', '.')"
                ));
            }
            pieces.push(Piece::Field(name.to_owned()));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_owned()));
        }
        Ok(Self(pieces))
    }

    /// The text with every field replaced; an unknown field's name (never a value) as error.
    pub fn render(&self, fields: &Map<String, Value>) -> Result<String, String> {
        let mut out = String::new();
        for piece in &self.0 {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Field(name) => match fields.get(name) {
                    Some(Value::String(s)) => out.push_str(s),
                    Some(other) => out.push_str(&other.to_string()),
                    None => {
                        let mut known: Vec<&str> = fields.keys().map(String::as_str).collect();
                        known.sort_unstable();
                        return Err(format!(
                            "the template names field {name:?}, which the secret does not have (it has: {})",
                            known.join(", ")
                        ));
                    }
                },
            }
        }
        Ok(out)
    }
}

/// A file's content: the template's output, or the fields as a JSON object.
pub fn render(template: Option<&Template>, fields: &Map<String, Value>) -> Result<Vec<u8>, String> {
    match template {
        Some(template) => template.render(fields).map(String::into_bytes),
        None => {
            let mut bytes =
                serde_json::to_vec(fields).map_err(|_| "the fields do not encode as JSON".to_owned())?;
            bytes.push(b'\n');
            Ok(bytes)
        }
    }
}

/// Writes `content` to `dir/name` atomically with mode 0400.
pub fn write_atomic(dir: &Path, name: &str, content: &[u8]) -> std::io::Result<PathBuf> {
    if crate::agent::args::check_file_name(name).is_err() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "refusing a file name outside the secrets folder",
        ));
    }
    let target = dir.join(name);
    let temporary = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let result = (|| {
        // create_new is O_CREAT|O_EXCL: it fails on an existing name, a symlink included
        // (POSIX), so nothing is ever written through a link planted in the folder.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&temporary)?;
        file.write_all(content)?;
        file.sync_all()?;
        drop(file);
        // rename replaces a symlink at the target by the file itself; it never follows it.
        std::fs::rename(&temporary, &target)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result.map(|()| target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt as _;

    fn fields(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn templates_replace_fields_and_keep_text() {
        let t = Template::parse("postgres://{{username}}:{{ password }}@db:5432/app?n={{n}}\n").unwrap();
        let out = t
            .render(&fields(json!({"username": "u", "password": "p w", "n": 3})))
            .unwrap();
        assert_eq!(out, "postgres://u:p w@db:5432/app?n=3\n");
        assert_eq!(
            Template::parse("no fields").unwrap().render(&Map::new()).unwrap(),
            "no fields"
        );
        assert_eq!(
            Template::parse("{{a}}{{b}}")
                .unwrap()
                .render(&fields(json!({"a": "1", "b": {"c": true}})))
                .unwrap(),
            "1{\"c\":true}"
        );
    }

    #[test]
    fn bad_templates_and_unknown_fields_are_errors_without_values() {
        for bad in ["{{", "a {{ b", "{{}}", "{{ a b }}", "{{ a/b }}", "{{ {{a}} }}"] {
            assert!(Template::parse(bad).is_err(), "{bad:?}");
        }
        let error = Template::parse("{{ missing }}")
            .unwrap()
            .render(&fields(json!({"password": "hunter2"})))
            .unwrap_err();
        assert!(error.contains("missing") && error.contains("password"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn without_a_template_the_fields_are_one_json_object() {
        let out = render(None, &fields(json!({"a": "x\ny", "b": 2}))).unwrap();
        assert_eq!(out, b"{\"a\":\"x\\ny\",\"b\":2}\n");
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("capstan-agent-test-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn files_are_written_0400_atomically_and_replaced() {
        let dir = tempdir();
        let path = write_atomic(&dir, "db", b"one").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o400
        );
        write_atomic(&dir, "db", b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["db"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn s4_nothing_is_written_outside_the_folder() {
        let dir = tempdir();
        let outside = tempdir();
        for name in ["../x", "/tmp/x", "a/b", ".."] {
            assert!(write_atomic(&dir, name, b"v").is_err(), "{name}");
        }
        // A symlink planted under the file's name is replaced, not followed.
        let victim = outside.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("db")).unwrap();
        write_atomic(&dir, "db", b"secret").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(
            !std::fs::symlink_metadata(dir.join("db"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&outside).unwrap();
    }
}
