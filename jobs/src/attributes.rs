//! Nomad's node attributes as Kubernetes node labels, and Nomad's constraint operators
//! evaluated against a label's value.
//!
//! A Nomad client fingerprints its node (`${attr.cpu.arch}`, `${node.class}`) and carries
//! operator-set `${meta.*}`; a Kubernetes node carries labels, some well known
//! (`kubernetes.io/arch`), the rest set by whoever runs the cluster. [`node_label`] maps
//! one to the other (the table is in docs/jobs.md); whatever has no label is refused, so
//! a constraint is never dropped because nothing could evaluate it.
//!
//! [`Predicate`] is an operator with its value, parsed once (a regexp compiled, a version
//! constraint read) and then matched against label values. The compiler uses it for the
//! operators Kubernetes' node selectors lack (regexp, version, semver, set_contains*,
//! Nomad's ordering, which is numeric or lexical): it evaluates them against the current
//! nodes and selects the matching values with `In`.

use capstan_crds::jobs::Operator;
use regex::Regex;
use std::cmp::Ordering;
use thiserror::Error;

/// Where `${node.datacenter}` and a job's `datacenters` are read unless configured
/// otherwise (controller flag `--jobs-datacenter-label`, chart value `jobs.datacenterLabel`).
pub const DEFAULT_DATACENTER_LABEL: &str = "topology.kubernetes.io/region";
/// The node's name as a label: `${node.unique.name}`, `${node.unique.id}`,
/// `${attr.unique.hostname}`, and distinct_hosts' topology.
pub const HOSTNAME: &str = "kubernetes.io/hostname";
pub const OS: &str = "kubernetes.io/os";
pub const ARCH: &str = "kubernetes.io/arch";
pub const ZONE: &str = "topology.kubernetes.io/zone";
pub const INSTANCE_TYPE: &str = "node.kubernetes.io/instance-type";
/// Nomad's node pool: Kubernetes has no standard label, so Capstan names one.
pub const NODE_POOL: &str = "node.capstan.dev/pool";

/// An attribute, value or constraint the compiler cannot use; the caller names the field.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{0}")]
pub struct Invalid(pub String);

/// The node label a Nomad attribute reads. `${meta.KEY}` is the label `KEY` itself
/// (Nomad's node meta is what Kubernetes calls labels; `${meta.rack}` reads `rack`,
/// `${meta.example.com/rack}` reads `example.com/rack`). A bare name without `${}` is a
/// label name, taken as it is.
pub fn node_label(attribute: &str, datacenter_label: &str) -> Result<String, Invalid> {
    let attribute = attribute.trim();
    let Some(inner) = attribute.strip_prefix("${").and_then(|a| a.strip_suffix('}')) else {
        if attribute.contains("${") {
            return Err(Invalid(format!(
                "{attribute:?}: an attribute is one interpolation (`${{meta.rack}}`) or a node label name"
            )));
        }
        return label_key(attribute).map(|()| attribute.to_owned());
    };
    let label = match inner {
        "node.datacenter" => datacenter_label,
        "node.unique.name" | "node.unique.id" | "attr.unique.hostname" => HOSTNAME,
        "node.class" | "attr.platform.aws.instance-type" | "attr.platform.gce.machine-type" => INSTANCE_TYPE,
        "node.pool" => NODE_POOL,
        "attr.kernel.name" => OS,
        "attr.cpu.arch" => ARCH,
        "attr.platform.aws.placement.availability-zone" | "attr.platform.gce.zone" => ZONE,
        _ => {
            if let Some(key) = inner.strip_prefix("meta.") {
                label_key(key)?;
                return Ok(key.to_owned());
            }
            return Err(Invalid(format!(
                "{attribute:?} has no Kubernetes node label: use ${{node.datacenter}}, \
                 ${{node.unique.name}}, ${{node.class}}, ${{node.pool}}, ${{meta.<label>}}, \
                 ${{attr.kernel.name}}, ${{attr.cpu.arch}}, a zone attribute, or a node label's name \
                 (docs/jobs.md lists the mapping)"
            )));
        }
    };
    Ok(label.to_owned())
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters (alphanumerics, `-`, `_`, `.`, alphanumeric at both ends).
pub fn label_key(key: &str) -> Result<(), Invalid> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            })
    });
    if prefix_ok && !name.is_empty() && label_value(name).is_ok() {
        Ok(())
    } else {
        Err(Invalid(format!("{key:?} is not a node label name")))
    }
}

/// A label value: at most 63 characters, alphanumerics, `-`, `_` and `.`, alphanumeric
/// at both ends (or empty).
pub fn label_value(value: &str) -> Result<(), Invalid> {
    let bytes = value.as_bytes();
    let ok = value.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes.first().is_none_or(u8::is_ascii_alphanumeric)
        && bytes.last().is_none_or(u8::is_ascii_alphanumeric);
    if ok {
        Ok(())
    } else {
        Err(Invalid(format!(
            "{value:?} cannot be a node label value (at most 63 letters, digits, '-', '_' or '.', \
             beginning and ending with a letter or digit)"
        )))
    }
}

/// Nomad's glob for datacenters: `*` is any run of characters, `?` one character.
pub fn glob_match(pattern: &str, value: &str) -> bool {
    let (p, v): (Vec<char>, Vec<char>) = (pattern.chars().collect(), value.chars().collect());
    // Classic backtracking over the last `*`: linear in practice for short names.
    let (mut pi, mut vi, mut star, mut mark) = (0, 0, None, 0);
    while vi < v.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == v[vi]) {
            pi += 1;
            vi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = vi;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            vi = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Whether a datacenter name is a glob (needs evaluating against the nodes) rather than
/// a name.
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

/// An operator and its value, parsed: what a node's label value is matched against.
#[derive(Clone, Debug)]
pub struct Predicate {
    kind: Kind,
}

#[derive(Clone, Debug)]
enum Kind {
    Equal(String),
    NotEqual(String),
    Order(Ordering, bool, String),
    Regexp(Regex),
    SetContains(Vec<String>),
    SetContainsAny(Vec<String>),
    Version(Vec<Clause>),
    IsSet,
    IsNotSet,
}

/// The size limit of a constraint's compiled regexp: values come from tenants.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl Predicate {
    /// Parses `value` for `operator`. distinct_hosts and distinct_property are not
    /// predicates on one node (they place allocations apart) and are refused here.
    pub fn new(operator: Operator, value: Option<&str>) -> Result<Self, Invalid> {
        let value = || {
            value
                .map(str::to_owned)
                .ok_or_else(|| Invalid(format!("operator {} needs a value", operator.as_str())))
        };
        let kind = match operator {
            Operator::Equal => Kind::Equal(value()?),
            Operator::NotEqual => Kind::NotEqual(value()?),
            Operator::Greater => Kind::Order(Ordering::Greater, false, value()?),
            Operator::GreaterEqual => Kind::Order(Ordering::Greater, true, value()?),
            Operator::Less => Kind::Order(Ordering::Less, false, value()?),
            Operator::LessEqual => Kind::Order(Ordering::Less, true, value()?),
            Operator::Regexp => {
                let pattern = value()?;
                let regex = regex::RegexBuilder::new(&pattern)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| Invalid(format!("{pattern:?} is not a regular expression: {e}")))?;
                Kind::Regexp(regex)
            }
            Operator::SetContains => Kind::SetContains(set(&value()?)),
            Operator::SetContainsAny => Kind::SetContainsAny(set(&value()?)),
            Operator::Version => Kind::Version(constraints(&value()?, Flavor::Version)?),
            Operator::Semver => Kind::Version(constraints(&value()?, Flavor::Semver)?),
            Operator::IsSet => Kind::IsSet,
            Operator::IsNotSet => Kind::IsNotSet,
            Operator::DistinctHosts | Operator::DistinctProperty => {
                return Err(Invalid(format!(
                    "{} places allocations apart; it is not a test of one node",
                    operator.as_str()
                )));
            }
        };
        Ok(Self { kind })
    }

    /// Whether a node whose label has `label` (None: the node lacks it) matches, with
    /// Nomad's semantics: only `!=` and is_not_set match a missing label.
    pub fn matches(&self, label: Option<&str>) -> bool {
        let Some(label) = label else {
            return matches!(self.kind, Kind::NotEqual(_) | Kind::IsNotSet);
        };
        match &self.kind {
            Kind::Equal(v) => label == v,
            Kind::NotEqual(v) => label != v,
            Kind::Order(direction, or_equal, v) => {
                let ordering = order(label, v);
                ordering == *direction || (*or_equal && ordering == Ordering::Equal)
            }
            Kind::Regexp(regex) => regex.is_match(label),
            Kind::SetContains(wanted) => {
                let have = set(label);
                wanted.iter().all(|w| have.contains(w))
            }
            Kind::SetContainsAny(wanted) => {
                let have = set(label);
                wanted.iter().any(|w| have.contains(w))
            }
            Kind::Version(clauses) => {
                parse_version(label).is_ok_and(|version| clauses.iter().all(|c| c.matches(&version)))
            }
            Kind::IsSet => true,
            Kind::IsNotSet => false,
        }
    }
}

/// Nomad's ordering: numeric when both sides read as numbers, lexical otherwise.
fn order(label: &str, value: &str) -> Ordering {
    match (label.trim().parse::<f64>(), value.trim().parse::<f64>()) {
        (Ok(l), Ok(r)) => l.partial_cmp(&r).unwrap_or(Ordering::Equal),
        _ => label.cmp(value),
    }
}

/// Nomad's comma-separated set, each element trimmed.
fn set(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `version` follows hashicorp/go-version (a pre-release matches only a constraint with
/// a pre-release of the same version; `~>` is pessimistic); `semver` follows Semantic
/// Versioning 2.0 ordering with no such rule and no `~>`, as Nomad's semver operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavor {
    Version,
    Semver,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Equal,
    NotEqual,
    Greater,
    GreaterEqual,
    Less,
    LessEqual,
    Pessimistic,
}

#[derive(Clone, Debug)]
struct Clause {
    op: Op,
    version: Version,
    flavor: Flavor,
}

/// A version read leniently (`v1.2`, `1.2.3-beta.1+build`), and how many of its numeric
/// segments were written (the pessimistic operator needs it).
#[derive(Clone, Debug)]
struct Version {
    semver: semver::Version,
    segments: usize,
}

fn constraints(value: &str, flavor: Flavor) -> Result<Vec<Clause>, Invalid> {
    let clauses = value
        .split(',')
        .map(|clause| {
            let clause = clause.trim();
            let (op, rest) = [
                (">=", Op::GreaterEqual),
                ("<=", Op::LessEqual),
                ("!=", Op::NotEqual),
                ("~>", Op::Pessimistic),
                ("=", Op::Equal),
                (">", Op::Greater),
                ("<", Op::Less),
            ]
            .iter()
            .find_map(|(prefix, op)| clause.strip_prefix(prefix).map(|rest| (*op, rest)))
            .unwrap_or((Op::Equal, clause));
            if flavor == Flavor::Semver && op == Op::Pessimistic {
                return Err(Invalid(format!(
                    "{clause:?}: the semver operator has no ~> (use version for go-version constraints)"
                )));
            }
            let version = parse_version(rest.trim())
                .map_err(|e| Invalid(format!("{clause:?} is not a version constraint: {}", e.0)))?;
            Ok(Clause { op, version, flavor })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if clauses.is_empty() {
        return Err(Invalid(format!("{value:?} has no version constraint")));
    }
    Ok(clauses)
}

fn parse_version(text: &str) -> Result<Version, Invalid> {
    let invalid = || Invalid(format!("{text:?} is not a version"));
    let text = text.trim();
    let text = text.strip_prefix('v').unwrap_or(text);
    let (text, build) = match text.split_once('+') {
        Some((t, b)) => (t, Some(b)),
        None => (text, None),
    };
    let numeric_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (numbers, pre) = text.split_at(numeric_end);
    let pre = pre.strip_prefix('-').unwrap_or(pre);
    let numbers = numbers
        .strip_suffix('.')
        .filter(|_| !pre.is_empty())
        .unwrap_or(numbers);
    let segments = numbers
        .split('.')
        .map(|s| s.parse::<u64>().map_err(|_| invalid()))
        .collect::<Result<Vec<_>, _>>()?;
    if segments.is_empty() || segments.len() > 3 {
        return Err(invalid());
    }
    let mut semver = semver::Version::new(
        segments[0],
        segments.get(1).copied().unwrap_or(0),
        segments.get(2).copied().unwrap_or(0),
    );
    if !pre.is_empty() {
        semver.pre = semver::Prerelease::new(pre).map_err(|_| invalid())?;
    }
    if let Some(build) = build {
        semver.build = semver::BuildMetadata::new(build).map_err(|_| invalid())?;
    }
    Ok(Version {
        semver,
        segments: segments.len(),
    })
}

impl Clause {
    fn matches(&self, v: &Version) -> bool {
        let (have, want) = (&v.semver, &self.version.semver);
        if self.flavor == Flavor::Version && !self.prerelease_allows(have) {
            return false;
        }
        // Build metadata never orders versions (Semantic Versioning 2.0, go-version).
        let ordering = have.cmp_precedence(want);
        match self.op {
            Op::Equal => ordering == Ordering::Equal,
            Op::NotEqual => ordering != Ordering::Equal,
            Op::Greater => ordering == Ordering::Greater,
            Op::GreaterEqual => ordering != Ordering::Less,
            Op::Less => ordering == Ordering::Less,
            Op::LessEqual => ordering != Ordering::Greater,
            Op::Pessimistic => {
                if have.pre.is_empty() != want.pre.is_empty() || ordering == Ordering::Less {
                    return false;
                }
                let (h, w) = (
                    [have.major, have.minor, have.patch],
                    [want.major, want.minor, want.patch],
                );
                let n = self.version.segments;
                h[..n - 1] == w[..n - 1] && h[n - 1] >= w[n - 1]
            }
        }
    }

    /// go-version: a constraint with a pre-release matches only pre-releases of the same
    /// version; one without matches no pre-release.
    fn prerelease_allows(&self, have: &semver::Version) -> bool {
        let want = &self.version.semver;
        match (want.pre.is_empty(), have.pre.is_empty()) {
            (false, false) => (have.major, have.minor, have.patch) == (want.major, want.minor, want.patch),
            (true, false) => false,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(op: Operator, value: &str, label: Option<&str>) -> bool {
        Predicate::new(op, Some(value)).unwrap().matches(label)
    }

    #[test]
    fn attributes_map_to_labels() {
        let dc = DEFAULT_DATACENTER_LABEL;
        assert_eq!(node_label("${node.datacenter}", dc).unwrap(), dc);
        assert_eq!(
            node_label("${node.datacenter}", "example.com/dc").unwrap(),
            "example.com/dc"
        );
        assert_eq!(node_label("${node.unique.name}", dc).unwrap(), HOSTNAME);
        assert_eq!(node_label("${node.unique.id}", dc).unwrap(), HOSTNAME);
        assert_eq!(node_label("${attr.unique.hostname}", dc).unwrap(), HOSTNAME);
        assert_eq!(node_label("${node.class}", dc).unwrap(), INSTANCE_TYPE);
        assert_eq!(node_label("${node.pool}", dc).unwrap(), NODE_POOL);
        assert_eq!(node_label("${attr.kernel.name}", dc).unwrap(), OS);
        assert_eq!(node_label("${attr.cpu.arch}", dc).unwrap(), ARCH);
        assert_eq!(
            node_label("${attr.platform.aws.placement.availability-zone}", dc).unwrap(),
            ZONE
        );
        assert_eq!(node_label("${attr.platform.gce.zone}", dc).unwrap(), ZONE);
        assert_eq!(node_label("${meta.rack}", dc).unwrap(), "rack");
        assert_eq!(
            node_label("${meta.example.com/rack}", dc).unwrap(),
            "example.com/rack"
        );
        assert_eq!(node_label("disktype", dc).unwrap(), "disktype");
        assert_eq!(node_label(" example.com/gpu ", dc).unwrap(), "example.com/gpu");
    }

    #[test]
    fn unknown_attributes_are_refused() {
        let dc = DEFAULT_DATACENTER_LABEL;
        for bad in [
            "${attr.os.name}",
            "${node.region}",
            "${meta.}",
            "${meta.bad key}",
            "prefix-${meta.rack}",
            "Bad_Prefix/x",
            "-rack",
            "",
        ] {
            assert!(node_label(bad, dc).is_err(), "{bad:?} should be refused");
        }
        assert!(
            node_label("${attr.os.name}", dc)
                .unwrap_err()
                .0
                .contains("docs/jobs.md")
        );
    }

    #[test]
    fn label_values() {
        assert!(label_value("dc1").is_ok());
        assert!(label_value("").is_ok());
        assert!(label_value("a.b_c-d").is_ok());
        assert!(label_value("-a").is_err());
        assert!(label_value("a b").is_err());
        assert!(label_value(&"a".repeat(64)).is_err());
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", "dc1"));
        assert!(glob_match("*", ""));
        assert!(glob_match("dc*", "dc1"));
        assert!(glob_match("dc?", "dc1"));
        assert!(!glob_match("dc?", "dc10"));
        assert!(glob_match("*-east-*", "us-east-1"));
        assert!(!glob_match("*-east-*", "us-west-1"));
        assert!(glob_match("dc1", "dc1"));
        assert!(!glob_match("dc1", "dc2"));
        assert!(is_glob("dc*") && is_glob("d?") && !is_glob("dc1"));
    }

    #[test]
    fn equality() {
        assert!(matches(Operator::Equal, "linux", Some("linux")));
        assert!(!matches(Operator::Equal, "linux", Some("windows")));
        assert!(!matches(Operator::Equal, "linux", None));
        assert!(matches(Operator::NotEqual, "linux", Some("windows")));
        assert!(!matches(Operator::NotEqual, "linux", Some("linux")));
        // Nomad: a missing attribute is "not equal".
        assert!(matches(Operator::NotEqual, "linux", None));
    }

    #[test]
    fn ordering_is_numeric_when_both_are_numbers() {
        assert!(matches(Operator::Greater, "9", Some("10")));
        assert!(!matches(Operator::Greater, "10", Some("9")));
        assert!(matches(Operator::GreaterEqual, "10", Some("10")));
        assert!(matches(Operator::Less, "2.5", Some("2")));
        assert!(matches(Operator::LessEqual, "2", Some("2.0")));
        assert!(!matches(Operator::Less, "2", None));
    }

    #[test]
    fn ordering_is_lexical_otherwise() {
        // Lexically "10" < "9", and "b" > "a".
        assert!(matches(Operator::Greater, "a", Some("b")));
        assert!(matches(Operator::Less, "b", Some("a")));
        assert!(matches(Operator::Less, "9x", Some("10")));
        assert!(matches(Operator::GreaterEqual, "abc", Some("abc")));
        assert!(!matches(Operator::LessEqual, "abc", Some("abd")));
    }

    #[test]
    fn regexp() {
        assert!(matches(Operator::Regexp, "^dc[0-9]+$", Some("dc12")));
        assert!(!matches(Operator::Regexp, "^dc[0-9]+$", Some("edge")));
        // Unanchored, as Go's MatchString.
        assert!(matches(Operator::Regexp, "east", Some("us-east-1")));
        assert!(!matches(Operator::Regexp, ".*", None));
        assert!(Predicate::new(Operator::Regexp, Some("(")).is_err());
    }

    #[test]
    fn sets() {
        assert!(matches(Operator::SetContains, "a,b", Some("a, b ,c")));
        assert!(!matches(Operator::SetContains, "a,d", Some("a,b,c")));
        assert!(matches(Operator::SetContainsAny, "x,c", Some("a,b,c")));
        assert!(!matches(Operator::SetContainsAny, "x,y", Some("a,b,c")));
        assert!(matches(Operator::SetContains, "ssd", Some("ssd")));
        assert!(!matches(Operator::SetContainsAny, "ssd", None));
    }

    #[test]
    fn versions_follow_go_version() {
        assert!(matches(Operator::Version, ">= 1.2, < 2", Some("1.10.0")));
        assert!(!matches(Operator::Version, ">= 1.2, < 2", Some("2.0")));
        assert!(matches(Operator::Version, ">= 1.2", Some("v1.2")));
        assert!(matches(Operator::Version, "1.2.3", Some("1.2.3")));
        assert!(matches(Operator::Version, "!= 1.2.3", Some("1.2.4")));
        assert!(matches(Operator::Version, "> 1.2.3", Some("1.2.4+build.5")));
        // A pre-release matches only a pre-release constraint on the same version.
        assert!(!matches(Operator::Version, ">= 1.0", Some("1.5.0-beta")));
        assert!(matches(Operator::Version, ">= 1.5.0-alpha", Some("1.5.0-beta")));
        assert!(!matches(Operator::Version, ">= 1.4.0-alpha", Some("1.5.0-beta")));
        // Pessimistic: ~> 1.2 is >= 1.2, < 2; ~> 1.2.3 is >= 1.2.3, < 1.3.
        assert!(matches(Operator::Version, "~> 1.2", Some("1.9")));
        assert!(!matches(Operator::Version, "~> 1.2", Some("2.0")));
        assert!(!matches(Operator::Version, "~> 1.2", Some("1.1")));
        assert!(matches(Operator::Version, "~> 1.2.3", Some("1.2.9")));
        assert!(!matches(Operator::Version, "~> 1.2.3", Some("1.3.0")));
        assert!(!matches(Operator::Version, ">= 1", Some("not-a-version")));
        assert!(!matches(Operator::Version, ">= 1", None));
        for bad in ["", ">= ", "1.2.3.4.5", "> x", ">= 1,"] {
            assert!(Predicate::new(Operator::Version, Some(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn semver_orders_prereleases_without_go_versions_rule() {
        assert!(matches(Operator::Semver, ">= 1.0.0", Some("1.5.0-beta")));
        assert!(matches(Operator::Semver, "< 1.5.0", Some("1.5.0-beta")));
        assert!(matches(Operator::Semver, ">= 1.2.0, < 1.3.0", Some("1.2.7")));
        assert!(!matches(Operator::Semver, "> 1.2.0", Some("1.2.0")));
        assert!(Predicate::new(Operator::Semver, Some("~> 1.2")).is_err());
    }

    #[test]
    fn presence() {
        let set = Predicate::new(Operator::IsSet, None).unwrap();
        let unset = Predicate::new(Operator::IsNotSet, None).unwrap();
        assert!(set.matches(Some("")) && !set.matches(None));
        assert!(unset.matches(None) && !unset.matches(Some("x")));
    }

    #[test]
    fn placement_operators_are_not_predicates() {
        assert!(Predicate::new(Operator::DistinctHosts, None).is_err());
        assert!(Predicate::new(Operator::DistinctProperty, Some("1")).is_err());
        assert!(Predicate::new(Operator::Equal, None).is_err());
    }
}
