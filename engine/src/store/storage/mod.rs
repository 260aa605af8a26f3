//! The engine's physical storage: opaque byte values at slash-separated paths, with
//! optimistic concurrency. Above it the barrier (`super::barrier`) encrypts every value;
//! this layer never sees plaintext. Two backends: `kube` (StorageEntry objects through
//! the API server: what the engine runs on) and `memory` (unit tests).

pub mod kube;
pub mod memory;

use futures::future::BoxFuture;
use std::sync::Arc;

/// The largest value stored in one entry. An object in etcd is limited to about 1.5 MiB
/// and the value travels base64-encoded; this leaves room for both.
pub const MAX_VALUE: usize = 768 * 1024;

/// A stored value and the version it was read at (the object's resourceVersion).
#[derive(Clone, PartialEq, Eq)]
pub struct Stored {
    pub value: Arc<[u8]>,
    pub version: u64,
}

impl std::fmt::Debug for Stored {
    // Ciphertext or not, values stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored")
            .field("len", &self.value.len())
            .field("version", &self.version)
            .finish()
    }
}

/// What must hold for a write to happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precondition {
    /// Write whatever is there (last writer wins; used only for entries one writer owns).
    None,
    /// Only if nothing is stored at the path (create).
    Absent,
    /// Only if the stored version is still this one (read-modify-write).
    Version(u64),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StorageError {
    /// The precondition failed: someone else wrote first. Read again and retry.
    #[error("storage conflict at {0}: it changed since it was read")]
    Conflict(String),
    #[error("storage value at {path} is {size} bytes; at most {max} fit in one entry", max = MAX_VALUE)]
    TooLarge { path: String, size: usize },
    #[error("storage path {0:?} is not valid")]
    InvalidPath(String),
    #[error("storage is unavailable: {0}")]
    Unavailable(String),
}

/// The operations every backend offers.
pub trait Backend: Send + Sync + 'static {
    /// The value at `path` as this replica knows it (the kube backend answers from a
    /// cache the API server's watch keeps current).
    fn get<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Option<Stored>, StorageError>>;
    /// The value at `path` as the API server has it now (after a conflict).
    fn get_fresh<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Option<Stored>, StorageError>>;
    /// Writes `value` at `path` if `precondition` holds; returns the new version.
    fn put<'a>(
        &'a self,
        path: &'a str,
        value: Vec<u8>,
        precondition: Precondition,
    ) -> BoxFuture<'a, Result<u64, StorageError>>;
    /// Deletes `path` if `precondition` holds (deleting nothing is not an error).
    fn delete<'a>(
        &'a self,
        path: &'a str,
        precondition: Precondition,
    ) -> BoxFuture<'a, Result<(), StorageError>>;
    /// Every stored path that starts with `prefix`, sorted.
    fn paths<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StorageError>>;
}

/// Vault's LIST: the immediate children of `prefix` (which ends in `/` or is empty),
/// folders with a trailing `/`, each once, sorted.
pub fn children(prefix: &str, paths: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for path in paths {
        let Some(rest) = path.strip_prefix(prefix) else {
            continue;
        };
        if rest.is_empty() {
            continue;
        }
        let child = match rest.find('/') {
            Some(i) => &rest[..=i],
            None => rest,
        };
        if out.last().map(String::as_str) != Some(child) {
            out.push(child.to_owned());
        }
    }
    out.sort();
    out.dedup();
    out
}

/// A name that becomes one path segment (a role, a connection, a mount's object): 1 to
/// 128 ASCII letters, digits, `-`, `_` or `.`, never `.` or `..`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name != "."
        && name != ".."
}

/// Refuses paths storage must never be asked for: empty, absolute, with empty,
/// `.` or `..` segments, or control characters.
pub fn check_path(path: &str) -> Result<(), StorageError> {
    let bad = path.is_empty()
        || path.len() > 2048
        || path.starts_with('/')
        || path.ends_with('/')
        || path.split('/').any(|s| s.is_empty() || s == "." || s == "..")
        || path.chars().any(char::is_control);
    if bad {
        return Err(StorageError::InvalidPath(path.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_are_one_level_with_folders_once() {
        let paths: Vec<String> = ["kv/a", "kv/b/c", "kv/b/d", "kv/e/f/g", "other/x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(children("kv/", &paths), ["a", "b/", "e/"]);
        assert_eq!(children("kv/b/", &paths), ["c", "d"]);
        assert_eq!(children("", &paths), ["kv/", "other/"]);
        assert!(children("none/", &paths).is_empty());
    }

    #[test]
    fn bad_paths_are_refused() {
        for bad in ["", "/a", "a/", "a//b", "a/../b", "./a", "a/\u{7}"] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        check_path("logical/secret/app/db").unwrap();
    }
}
