//! Vault ACL policies: the parser (HCL or JSON, `parse`), the matcher (`Acl`), and the
//! store of named policies the API writes (`store`).
//!
//! A policy is a list of `path "<pattern>" { capabilities = [...] }` rules. Patterns are
//! exact, end in `*` (prefix glob), and/or have `+` segments (one path segment each),
//! as in Vault. Matching follows Vault's ACL (vault/acl.go, "Priority matching" in the
//! policies concept): an exact rule wins outright; otherwise the most specific matching
//! glob or wildcard rule decides. The same pattern in several policies unions its
//! capabilities, and `deny` on that pattern wins over all of them. No matching rule
//! means no capability (default deny, DESIGN decision 1).
//!
//! Stricter than Vault, on purpose (V20; bad input is refused at the door, naming it):
//! unknown capabilities, keys and blocks are errors (Vault's parameter constraints,
//! wrapping TTLs, MFA and control groups are not supported, so a policy that relies on
//! them is refused instead of silently granting more); a pattern with `*` anywhere but
//! at the end, `+*`, a leading `/`, `//`, `.`/`..` segments or control characters is
//! refused; and a request path that is not normalized (`..`, `.`, `//`, a leading `/`,
//! control characters) matches nothing, even for the root token.

mod acl;
mod parse;
pub mod store;

pub use acl::Acl;

use serde::{Deserialize, Serialize};
use std::{collections::BTreeSet, fmt, str::FromStr};

/// What a policy may grant on a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    Create,
    Read,
    Update,
    Patch,
    Delete,
    List,
    Sudo,
    Deny,
}

impl Capability {
    pub const ALL: [Capability; 8] = [
        Capability::Create,
        Capability::Read,
        Capability::Update,
        Capability::Patch,
        Capability::Delete,
        Capability::List,
        Capability::Sudo,
        Capability::Deny,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Read => "read",
            Self::Update => "update",
            Self::Patch => "patch",
            Self::Delete => "delete",
            Self::List => "list",
            Self::Sudo => "sudo",
            Self::Deny => "deny",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Capability {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        Capability::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| PolicyError::UnknownCapability(s.to_string()))
    }
}

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum PolicyError {
    #[error("invalid policy name {0:?}: {1}")]
    Name(String, &'static str),
    #[error("policy is not valid HCL: {0}")]
    Hcl(String),
    #[error("policy is not valid JSON: {0}")]
    Json(String),
    #[error(
        "unknown capability {0:?} (expected one of create, read, update, patch, delete, list, sudo, deny)"
    )]
    UnknownCapability(String),
    #[error(
        "unknown key {key:?} in {place} (only `path \"<pattern>\" {{ capabilities = [...] }}` is supported)"
    )]
    UnknownKey { key: String, place: String },
    #[error("path {path:?}: {reason}")]
    Path { path: String, reason: &'static str },
    #[error("{0}")]
    Syntax(String),
}

/// One `path` block: a pattern and the capabilities it grants (or `deny`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathRule {
    pub pattern: String,
    pub capabilities: BTreeSet<Capability>,
}

/// A parsed, validated policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Lowercased, as Vault does.
    pub name: String,
    pub rules: Vec<PathRule>,
}

/// The longest policy name accepted.
pub const MAX_NAME_LEN: usize = 128;

impl Policy {
    /// Parses policy `text` (HCL, or JSON when it starts with `{`) under `name`. An
    /// empty text is a policy with no rules (it grants nothing).
    pub fn parse(name: &str, text: &str) -> Result<Policy, PolicyError> {
        let name = check_name(name)?;
        let rules = parse::parse(text)?;
        Ok(Policy { name, rules })
    }
}

/// Lowercases a policy name and checks it: 1 to 128 ASCII letters, digits, `-`, `_`,
/// `.` or `@`, not `.` or `..`. Names become storage keys, so nothing that could
/// traverse (`/`, `..`) or hide (control or non-ASCII characters) gets in (V20).
pub fn check_name(name: &str) -> Result<String, PolicyError> {
    let refuse = |why| Err(PolicyError::Name(name.chars().take(MAX_NAME_LEN).collect(), why));
    if name.is_empty() {
        return refuse("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return refuse("longer than 128 characters");
    }
    if name.contains('/') {
        return refuse("contains '/'");
    }
    if name.chars().any(|c| c.is_control()) {
        return refuse("contains a control character");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
    {
        return refuse("only ASCII letters, digits, '-', '_', '.' and '@' are allowed");
    }
    if name == "." || name == ".." {
        return refuse("'.' and '..' are not names");
    }
    Ok(name.to_ascii_lowercase())
}

/// The built-in `default` policy, attached to every token unless asked otherwise: a
/// token may look itself up, renew and revoke itself, and ask what it may do.
pub const DEFAULT_POLICY: &str = r#"# Capstan's built-in default policy (Vault's, cut to what the engine serves).
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

path "auth/token/revoke-self" {
  capabilities = ["update"]
}

path "sys/capabilities-self" {
  capabilities = ["update"]
}

# A token may renew and look up the leases it knows the ids of (as Vault's default).
path "sys/leases/renew" {
  capabilities = ["update"]
}

path "sys/leases/lookup" {
  capabilities = ["update"]
}
"#;

#[cfg(test)]
mod tests;
