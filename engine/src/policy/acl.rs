//! Policies compiled for matching, following vault/acl.go: exact rules, prefix (glob)
//! rules and segment-wildcard rules, each keyed by pattern with the capabilities of
//! every policy naming that pattern merged.

use super::{Capability, Policy};
use std::{cmp::Ordering, collections::BTreeSet, collections::HashMap};

/// Capabilities as bits; `DENY` on a pattern replaces everything else on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Perms(u8);

impl Perms {
    fn merge(&mut self, other: Perms) {
        let deny = Capability::Deny.bit();
        if self.0 & deny != 0 || other.0 & deny != 0 {
            self.0 = deny;
        } else {
            self.0 |= other.0;
        }
    }

    fn has(self, cap: Capability) -> bool {
        self.0 & Capability::Deny.bit() == 0 && self.0 & cap.bit() != 0
    }

    fn set(self) -> BTreeSet<Capability> {
        Capability::ALL.into_iter().filter(|c| self.has(*c)).collect()
    }
}

/// A rule with `+` segments (and maybe a trailing `*`).
#[derive(Debug)]
struct Wildcard {
    /// The pattern without its trailing `*`.
    path: String,
    segments: Vec<String>,
    is_prefix: bool,
    /// Byte offset of the first `+` in the pattern.
    first_wildcard: usize,
    /// How many segments are exactly `+`.
    wildcards: usize,
    perms: Perms,
}

impl Wildcard {
    fn matches(&self, parts: &[&str]) -> bool {
        if parts.len() < self.segments.len() || (!self.is_prefix && parts.len() != self.segments.len()) {
            return false;
        }
        let last = self.segments.len() - 1;
        self.segments.iter().enumerate().all(|(i, seg)| {
            seg == "+"
                || seg == parts[i]
                || (self.is_prefix && i == last && parts[i].starts_with(seg.as_str()))
        })
    }
}

/// One candidate among the non-exact rules matching a path.
struct Candidate<'a> {
    first_wildcard: usize,
    is_prefix: bool,
    wildcards: usize,
    path: &'a str,
    perms: Perms,
}

/// Vault's priority order, lowest first: an earlier first `+`/`*` is less specific; a
/// prefix (`*`) is less specific than a non-prefix; more `+` segments are less
/// specific; a shorter pattern is less specific; and last, arbitrarily, the
/// lexicographically smaller pattern.
fn priority(a: &Candidate<'_>, b: &Candidate<'_>) -> Ordering {
    a.first_wildcard
        .cmp(&b.first_wildcard)
        .then_with(|| b.is_prefix.cmp(&a.is_prefix))
        .then_with(|| b.wildcards.cmp(&a.wildcards))
        .then_with(|| a.path.len().cmp(&b.path.len()))
        .then_with(|| a.path.cmp(b.path))
}

/// The capabilities a set of policies grants, by path.
#[derive(Debug, Default)]
pub struct Acl {
    root: bool,
    exact: HashMap<String, Perms>,
    /// Prefix rules (pattern without `*`), longest first.
    prefix: Vec<(String, Perms)>,
    wildcard: Vec<Wildcard>,
}

impl Acl {
    /// Compiles `policies` (order does not matter).
    pub fn new(policies: &[Policy]) -> Acl {
        let mut exact: HashMap<String, Perms> = HashMap::new();
        let mut prefix: HashMap<String, Perms> = HashMap::new();
        let mut wildcard: HashMap<String, Perms> = HashMap::new();
        for rule in policies.iter().flat_map(|p| &p.rules) {
            let perms = Perms(rule.capabilities.iter().fold(0, |bits, c| bits | c.bit()));
            let pattern = &rule.pattern;
            // Keyed as Vault keys them, so "a/*" and "a/" stay two rules.
            let (map, key) = if pattern.contains('+') {
                (&mut wildcard, pattern.as_str())
            } else if let Some(p) = pattern.strip_suffix('*') {
                (&mut prefix, p)
            } else {
                (&mut exact, pattern.as_str())
            };
            map.entry(key.to_string()).or_default().merge(perms);
        }
        let mut prefix: Vec<(String, Perms)> = prefix.into_iter().collect();
        prefix.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        let wildcard = wildcard
            .into_iter()
            .map(|(pattern, perms)| {
                let (path, is_prefix) = match pattern.strip_suffix('*') {
                    Some(p) => (p.to_string(), true),
                    None => (pattern.clone(), false),
                };
                let segments: Vec<String> = path.split('/').map(str::to_string).collect();
                Wildcard {
                    first_wildcard: pattern.find('+').unwrap_or(0),
                    wildcards: segments.iter().filter(|s| *s == "+").count(),
                    segments,
                    path,
                    is_prefix,
                    perms,
                }
            })
            .collect();
        Acl {
            root: false,
            exact,
            prefix,
            wildcard,
        }
    }

    /// The root token's ACL: every capability on every (normalized) path.
    pub fn root() -> Acl {
        Acl {
            root: true,
            ..Acl::default()
        }
    }

    pub fn is_root(&self) -> bool {
        self.root
    }

    /// What this ACL grants on `path` (a request path without `/v1/`): empty when no
    /// rule matches, when the deciding rule denies, or when the path is not normalized.
    /// Never contains `Deny`.
    pub fn capabilities(&self, path: &str) -> BTreeSet<Capability> {
        self.perms(path, false).set()
    }

    /// Whether `cap` is granted on `path`. For `List` on a path ending in `/`, rules for
    /// the path without it are tried first, as Vault does for LIST requests (so an exact
    /// `secret/metadata` rule answers a LIST of `secret/metadata/`). `Deny` is never
    /// "allowed".
    pub fn allows(&self, path: &str, cap: Capability) -> bool {
        cap != Capability::Deny && self.perms(path, cap == Capability::List).has(cap)
    }

    /// Whether any rule grants something at or under `mount` (`secret/`): Vault's
    /// hasMountAccess, which decides whether `sys/internal/ui/mounts/<path>` shows a
    /// mount. A rule that denies grants nothing.
    pub fn has_mount_access(&self, mount: &str) -> bool {
        if self.root || !self.capabilities(mount).is_empty() {
            return true;
        }
        let grants = |p: &Perms| p.0 != 0 && p.0 & Capability::Deny.bit() == 0;
        if self.exact.iter().any(|(k, p)| k.starts_with(mount) && grants(p))
            || self.prefix.iter().any(|(k, p)| k.starts_with(mount) && grants(p))
        {
            return true;
        }
        let parts: Vec<&str> = mount.trim_end_matches('/').split('/').collect();
        self.wildcard.iter().any(|w| {
            grants(&w.perms)
                && w.segments.len() >= parts.len()
                && parts.iter().zip(&w.segments).all(|(part, seg)| {
                    seg == "+" || seg == part || (w.is_prefix && part.starts_with(seg.as_str()))
                })
        })
    }

    fn perms(&self, path: &str, list: bool) -> Perms {
        if !is_normalized(path) {
            return Perms::default();
        }
        if self.root {
            return Perms(
                Capability::ALL
                    .into_iter()
                    .filter(|c| *c != Capability::Deny)
                    .fold(0, |b, c| b | c.bit()),
            );
        }
        if let Some(p) = self.exact.get(path) {
            return *p;
        }
        let trimmed = path.strip_suffix('/').filter(|_| list);
        if let Some(p) = trimmed.and_then(|t| self.exact.get(t)) {
            return *p;
        }
        if let Some(p) = trimmed.and_then(|t| self.non_exact(t)) {
            return p;
        }
        self.non_exact(path).unwrap_or_default()
    }

    /// The most specific glob or wildcard rule matching `path`, if any.
    fn non_exact(&self, path: &str) -> Option<Perms> {
        let longest_prefix = self
            .prefix
            .iter()
            .find(|(p, _)| path.starts_with(p.as_str()))
            .map(|(p, perms)| Candidate {
                first_wildcard: p.len(),
                is_prefix: true,
                wildcards: 0,
                path: p,
                perms: *perms,
            });
        if self.wildcard.is_empty() {
            return longest_prefix.map(|c| c.perms);
        }
        let parts: Vec<&str> = path.split('/').collect();
        longest_prefix
            .into_iter()
            .chain(
                self.wildcard
                    .iter()
                    .filter(|w| w.matches(&parts))
                    .map(|w| Candidate {
                        first_wildcard: w.first_wildcard,
                        is_prefix: w.is_prefix,
                        wildcards: w.wildcards,
                        path: &w.path,
                        perms: w.perms,
                    }),
            )
            .max_by(priority)
            .map(|c| c.perms)
    }
}

/// A request path as the HTTP layer hands it over: no leading `/`, no empty segment
/// inside (`//`), no `.` or `..` segment, no control character. Anything else matches
/// nothing, whatever the policies say.
pub(super) fn is_normalized(path: &str) -> bool {
    if path.starts_with('/') || path.contains("//") || path.chars().any(|c| c.is_control()) {
        return false;
    }
    !path.split('/').any(|s| s == "." || s == "..")
}
