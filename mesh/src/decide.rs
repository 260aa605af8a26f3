//! How the intentions in force decide a connection or an HTTP request, and which rule
//! decided it (every denial must be explainable: the sidecar puts this in its log lines,
//! metric labels and 403 responses).

use crate::{in_force, path};
use capstan_crds::{HttpHeaderMatch, HttpMatch, IntentionAction, ServiceIntentions};
use kube::ResourceExt;
use std::fmt;

/// A workload's service identity: its namespace and ServiceAccount name (the SPIFFE ID
/// `spiffe://<trust-domain>/ns/<namespace>/sa/<name>`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub namespace: String,
    pub name: String,
}

impl Identity {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What an HTTP request shows the authorization layer.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The request target as received (path and query).
    pub target: &'a str,
    /// Every header line, in order; names in any case, repeated names repeated.
    pub headers: &'a [(&'a str, &'a str)],
}

/// The rule that decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecidedBy {
    /// No intention matched: the cluster default applied.
    Default,
    /// A source's L4 action, as `namespace/name sources[i]`.
    Source { intention: String, source: usize },
    /// An L7 permission, as `namespace/name sources[i].permissions[j]`.
    Permission {
        intention: String,
        source: usize,
        permission: usize,
    },
    /// The source has L7 permissions and none matched the request.
    NoPermissionMatched { intention: String, source: usize },
    /// The request path was refused before any rule was consulted.
    InvalidPath(path::PathError),
    /// The source has L7 permissions but the destination speaks plain TCP, where no
    /// request can be seen: refused rather than guessed (fail closed).
    L7OnTcpDestination { intention: String, source: usize },
}

impl fmt::Display for DecidedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => write!(f, "cluster default"),
            Self::Source { intention, source } => write!(f, "{intention} sources[{source}]"),
            Self::Permission {
                intention,
                source,
                permission,
            } => write!(f, "{intention} sources[{source}].permissions[{permission}]"),
            Self::NoPermissionMatched { intention, source } => {
                write!(f, "{intention} sources[{source}] (no permission matched)")
            }
            Self::InvalidPath(error) => write!(f, "invalid request path: {error}"),
            Self::L7OnTcpDestination { intention, source } => {
                write!(
                    f,
                    "{intention} sources[{source}] (L7 permissions on a plain TCP destination)"
                )
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    pub by: DecidedBy,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allow { "ALLOW" } else { "DENY" };
        write!(f, "{verdict} by {}", self.by)
    }
}

/// What a new connection from a source gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionDecision {
    /// Decided at L4, once for the connection.
    Decided(Decision),
    /// Accepted; each request is decided by [`Policy::request`].
    PerRequest { intention: String, source: usize },
}

/// The intentions in force, compiled for evaluation.
#[derive(Debug, Default)]
pub struct Policy {
    default_allow: bool,
    intentions: Vec<Compiled>,
}

#[derive(Debug)]
struct Compiled {
    key: String,
    namespace: String,
    name: String,
    sources: Vec<Source>,
}

#[derive(Debug)]
struct Source {
    namespace: String,
    name: String,
    rule: Rule,
}

#[derive(Debug)]
enum Rule {
    L4(bool),
    L7(Vec<Permission>),
}

#[derive(Debug)]
struct Permission {
    allow: bool,
    path: PathMatch,
    methods: Vec<String>,
    headers: Vec<HeaderMatch>,
}

#[derive(Debug)]
enum PathMatch {
    Any,
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
    /// A pattern that does not compile: never matches an allow rule, always matches a
    /// deny rule, so a bad rule can only ever deny more.
    Broken,
}

#[derive(Debug)]
struct HeaderMatch {
    name: String,
    value: ValueMatch,
    invert: bool,
}

#[derive(Debug)]
enum ValueMatch {
    Present,
    Exact(String),
    Prefix(String),
    Suffix(String),
    Regex(regex::Regex),
    Broken,
}

const WILDCARD: &str = "*";

/// Compiles a rule's regular expression the one way every part of Capstan does, so an
/// object the reconciler reports valid is one the sidecar can enforce. Anchored: a rule
/// matches the whole value, as Envoy's safe_regex does. The size limit keeps a hostile
/// pattern from costing the sidecar memory or time.
pub fn compile_pattern(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 20)
        .build()
}

fn regex(pattern: &str) -> Option<regex::Regex> {
    compile_pattern(pattern).ok()
}

impl Policy {
    /// Compiles every ServiceIntentions; of several naming one destination, only the one
    /// in force counts (the same choice the reconciler reports in status). An object
    /// naming a destination outside its own namespace counts only when it is in
    /// `control_namespace`, Capstan's own (tenancy: see [`in_force::out_of_bounds`]).
    pub fn compile(objects: &[ServiceIntentions], default_allow: bool, control_namespace: &str) -> Self {
        let intentions = objects
            .iter()
            .filter(|o| o.metadata.deletion_timestamp.is_none())
            .filter(|o| {
                matches!(
                    in_force::verdict(o, objects, control_namespace),
                    in_force::Verdict::InForce { .. }
                )
            })
            .map(|o| {
                let (namespace, name) = in_force::destination(o);
                // A JWT requirement Capstan cannot check (refused at the door): nothing
                // the object allows may pass without it.
                let jwt_required = o.spec.jwt.is_some();
                Compiled {
                    key: format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()),
                    sources: o
                        .spec
                        .sources
                        .iter()
                        .map(|s| Source {
                            // An unset source namespace means the destination's.
                            namespace: s.namespace.clone().unwrap_or_else(|| namespace.clone()),
                            name: s.name.clone(),
                            rule: match (&s.action, &s.permissions) {
                                // A peer's, partition's or sameness group's source is not
                                // the local service of that name: it denies.
                                _ if s.unsupported() || jwt_required => Rule::L4(false),
                                (Some(action), _) => Rule::L4(*action == IntentionAction::Allow),
                                (None, Some(permissions)) => Rule::L7(
                                    permissions
                                        .iter()
                                        .map(|p| {
                                            // JWT-gated: only the deny half can be enforced.
                                            let action = if p.jwt.is_some() {
                                                IntentionAction::Deny
                                            } else {
                                                p.action
                                            };
                                            compile_permission(action, &p.http)
                                        })
                                        .collect(),
                                ),
                                // Refused by the schema; denies if it ever gets here.
                                (None, None) => Rule::L4(false),
                            },
                        })
                        .collect(),
                    namespace,
                    name,
                }
            })
            .collect();
        Self {
            default_allow,
            intentions,
        }
    }

    /// The most specific (intention, source) pair for `source` → `destination`.
    fn lookup(&self, source: &Identity, destination: &Identity) -> Option<(&Compiled, usize, &Source)> {
        let mut best: Option<((u8, u8), &Compiled, usize, &Source)> = None;
        for intention in &self.intentions {
            let Some(dest_rank) = rank(&intention.namespace, &intention.name, destination) else {
                continue;
            };
            for (index, s) in intention.sources.iter().enumerate() {
                let Some(source_rank) = rank(&s.namespace, &s.name, source) else {
                    continue;
                };
                let key = (dest_rank, source_rank);
                if best.as_ref().is_none_or(|(k, ..)| key > *k) {
                    best = Some((key, intention, index, s));
                }
            }
        }
        best.map(|(_, intention, index, source)| (intention, index, source))
    }

    pub fn connection(&self, source: &Identity, destination: &Identity) -> ConnectionDecision {
        let Some((intention, index, s)) = self.lookup(source, destination) else {
            return ConnectionDecision::Decided(Decision {
                allow: self.default_allow,
                by: DecidedBy::Default,
            });
        };
        match &s.rule {
            Rule::L4(allow) => ConnectionDecision::Decided(Decision {
                allow: *allow,
                by: DecidedBy::Source {
                    intention: intention.key.clone(),
                    source: index,
                },
            }),
            // Nothing this source could ask would be allowed: refuse the connection itself.
            Rule::L7(permissions) if !permissions.iter().any(|p| p.allow) => {
                ConnectionDecision::Decided(Decision {
                    allow: false,
                    by: DecidedBy::NoPermissionMatched {
                        intention: intention.key.clone(),
                        source: index,
                    },
                })
            }
            Rule::L7(_) => ConnectionDecision::PerRequest {
                intention: intention.key.clone(),
                source: index,
            },
        }
    }

    /// The decision for a connection to a destination that speaks plain TCP: L7
    /// permissions cannot be evaluated there, so they deny.
    pub fn tcp_connection(&self, source: &Identity, destination: &Identity) -> Decision {
        match self.connection(source, destination) {
            ConnectionDecision::Decided(decision) => decision,
            ConnectionDecision::PerRequest { intention, source } => Decision {
                allow: false,
                by: DecidedBy::L7OnTcpDestination { intention, source },
            },
        }
    }

    pub fn request(&self, source: &Identity, destination: &Identity, request: &Request<'_>) -> Decision {
        self.authorize(source, destination, request).0
    }

    /// The decision and the normalized path it was made on (None when the path was
    /// refused): the path a proxy forwards, so the rule and the application never see two
    /// different paths (M3), normalized once.
    pub fn authorize(
        &self,
        source: &Identity,
        destination: &Identity,
        request: &Request<'_>,
    ) -> (Decision, Option<String>) {
        match path::normalize(request.target) {
            Ok(path) => (self.decide_path(source, destination, &path, request), Some(path)),
            Err(error) => (
                Decision {
                    allow: false,
                    by: DecidedBy::InvalidPath(error),
                },
                None,
            ),
        }
    }

    fn decide_path(
        &self,
        source: &Identity,
        destination: &Identity,
        path: &str,
        request: &Request<'_>,
    ) -> Decision {
        let Some((intention, index, s)) = self.lookup(source, destination) else {
            return Decision {
                allow: self.default_allow,
                by: DecidedBy::Default,
            };
        };
        match &s.rule {
            Rule::L4(allow) => Decision {
                allow: *allow,
                by: DecidedBy::Source {
                    intention: intention.key.clone(),
                    source: index,
                },
            },
            Rule::L7(permissions) => permissions
                .iter()
                .position(|p| p.matches(path, request))
                .map(|j| Decision {
                    allow: permissions[j].allow,
                    by: DecidedBy::Permission {
                        intention: intention.key.clone(),
                        source: index,
                        permission: j,
                    },
                })
                .unwrap_or(Decision {
                    allow: false,
                    by: DecidedBy::NoPermissionMatched {
                        intention: intention.key.clone(),
                        source: index,
                    },
                }),
        }
    }
}

/// How specifically (`namespace`, `name`) names `who`: higher is more specific, None
/// when it does not name it. Names compare literally: only a whole `*` is a wildcard.
fn rank(namespace: &str, name: &str, who: &Identity) -> Option<u8> {
    let ns_exact = namespace == who.namespace;
    let name_exact = name == who.name;
    if !(ns_exact || namespace == WILDCARD) || !(name_exact || name == WILDCARD) {
        return None;
    }
    Some(u8::from(ns_exact) * 2 + u8::from(name_exact))
}

fn compile_permission(action: IntentionAction, http: &HttpMatch) -> Permission {
    let path = match (&http.path_exact, &http.path_prefix, &http.path_regex) {
        (Some(exact), _, _) => PathMatch::Exact(exact.clone()),
        (_, Some(prefix), _) => PathMatch::Prefix(prefix.clone()),
        (_, _, Some(pattern)) => regex(pattern).map_or(PathMatch::Broken, PathMatch::Regex),
        _ => PathMatch::Any,
    };
    Permission {
        allow: action == IntentionAction::Allow,
        path,
        methods: http
            .methods
            .iter()
            .map(|m| {
                serde_json::to_value(m)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            })
            .collect(),
        headers: http.header.iter().map(compile_header).collect(),
    }
}

fn compile_header(h: &HttpHeaderMatch) -> HeaderMatch {
    let value = if let Some(exact) = &h.exact {
        ValueMatch::Exact(exact.clone())
    } else if let Some(prefix) = &h.prefix {
        ValueMatch::Prefix(prefix.clone())
    } else if let Some(suffix) = &h.suffix {
        ValueMatch::Suffix(suffix.clone())
    } else if let Some(pattern) = &h.regex {
        // Host names compare case-insensitively (M4), patterns included: the value is
        // lower-cased below, so an upper-case letter in a case-sensitive pattern would
        // never match and a deny rule on it would never hold.
        let host = h.name.eq_ignore_ascii_case("host") || h.name.eq_ignore_ascii_case(":authority");
        let pattern = if host {
            format!("(?i:{pattern})")
        } else {
            pattern.clone()
        };
        regex(&pattern).map_or(ValueMatch::Broken, ValueMatch::Regex)
    } else {
        ValueMatch::Present
    };
    HeaderMatch {
        name: h.name.to_ascii_lowercase(),
        value,
        invert: h.invert.unwrap_or(false),
    }
}

impl Permission {
    fn matches(&self, path: &str, request: &Request<'_>) -> bool {
        let path_matches = match &self.path {
            PathMatch::Any => true,
            PathMatch::Exact(exact) => path == exact,
            PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
            PathMatch::Regex(re) => re.is_match(path),
            PathMatch::Broken => !self.allow,
        };
        path_matches
            && (self.methods.is_empty()
                || self
                    .methods
                    .iter()
                    .any(|m| self.method_matches(m, request.method)))
            && self.headers.iter().all(|h| h.holds(request, self.allow))
    }
}

impl Permission {
    /// Methods are case-sensitive tokens (RFC 9110), but some applications upper-case
    /// what they receive; judged pessimistically, so case never widens access: an allow
    /// rule matches only the exact method, a deny rule any case of it.
    fn method_matches(&self, rule: &str, method: &str) -> bool {
        if self.allow {
            rule == method
        } else {
            rule.eq_ignore_ascii_case(method)
        }
    }
}

impl HeaderMatch {
    /// Whether the condition holds for the request, judged pessimistically over every
    /// value of a repeated header (RELIABILITY M5): for an allow rule it must hold for
    /// each value, for a deny rule one value suffices. A repeated header can therefore
    /// never widen access.
    fn holds(&self, request: &Request<'_>, allow_rule: bool) -> bool {
        let values: Vec<&str> = request
            .headers
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case(&self.name))
            .map(|(_, value)| *value)
            .collect();
        let host = self.name == "host" || self.name == ":authority";
        // Rule values compare as written (host names lower-cased, M4).
        let fold = |s: &str| {
            if host {
                s.to_ascii_lowercase()
            } else {
                s.to_owned()
            }
        };
        let matches_one = |value: &str| -> bool {
            match &self.value {
                ValueMatch::Present => true,
                ValueMatch::Exact(e) => value == fold(e),
                ValueMatch::Prefix(p) => value.starts_with(&fold(p)),
                ValueMatch::Suffix(s) => value.ends_with(&fold(s)),
                ValueMatch::Regex(re) => re.is_match(value),
                ValueMatch::Broken => !allow_rule,
            }
        };
        // A host is judged in the spelling it came in and in the one servers route on
        // (no port, no trailing dot), pessimistically as repeated headers are: where the
        // condition holding would widen access it must hold for both spellings, where it
        // would narrow access either suffices. So `admin.example.:80` cannot slip past a
        // deny on `admin.example`, and folding never widens an allow.
        let strict = allow_rule != self.invert;
        let matches = |value: &str| -> bool {
            if !host {
                return matches_one(value);
            }
            let spellings = [value.trim().to_ascii_lowercase(), canonical_host(value)];
            if strict {
                spellings.iter().all(|s| matches_one(s))
            } else {
                spellings.iter().any(|s| matches_one(s))
            }
        };
        match (allow_rule, self.invert) {
            (true, false) => !values.is_empty() && values.iter().all(|v| matches(v)),
            (true, true) => values.iter().all(|v| !matches(v)),
            (false, false) => values.iter().any(|v| matches(v)),
            (false, true) => values.is_empty() || values.iter().any(|v| !matches(v)),
        }
    }
}

/// A host as every server routes it (M4): lower-cased, without a port and without the
/// trailing dot of a fully qualified name, so `Admin.Example.:80` is `admin.example`
/// and cannot slip past a rule written for `admin.example` (see `HeaderMatch::holds` for
/// how both spellings are judged). An IPv6 literal keeps its brackets.
pub fn canonical_host(value: &str) -> String {
    let value = value.trim().to_ascii_lowercase();
    let host = match value.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((literal, _port)) => return format!("[{literal}]"),
            None => value.as_str(),
        },
        None => match value.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => value.as_str(),
        },
    };
    host.trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

    const CONTROL: &str = "capstan-system";

    fn intention(ns: &str, name: &str, spec: serde_json::Value) -> ServiceIntentions {
        let mut obj: ServiceIntentions = serde_json::from_value(serde_json::json!({
            "apiVersion": "mesh.capstan.dev/v1alpha1",
            "kind": "ServiceIntentions",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }))
        .expect("a valid ServiceIntentions");
        obj.metadata.creation_timestamp = Some(Time(Timestamp::from_second(1_000).unwrap()));
        obj
    }

    fn id(s: &str) -> Identity {
        let (ns, name) = s.split_once('/').unwrap();
        Identity::new(ns, name)
    }

    fn get<'a>(target: &'a str, headers: &'a [(&'a str, &'a str)]) -> Request<'a> {
        Request {
            method: "GET",
            target,
            headers,
        }
    }

    fn l4(policy: &Policy, from: &str, to: &str) -> Option<bool> {
        match policy.connection(&id(from), &id(to)) {
            ConnectionDecision::Decided(d) => Some(d.allow),
            ConnectionDecision::PerRequest { .. } => None,
        }
    }

    /// M1: with no intentions nothing passes, at L4 or L7.
    #[test]
    fn no_intentions_means_deny() {
        let policy = Policy::compile(&[], false, CONTROL);
        assert_eq!(
            policy.connection(&id("shop/web"), &id("shop/api")),
            ConnectionDecision::Decided(Decision {
                allow: false,
                by: DecidedBy::Default
            })
        );
        assert!(
            !policy
                .request(&id("shop/web"), &id("shop/api"), &get("/", &[]))
                .allow
        );
        let open = Policy::compile(&[], true, CONTROL);
        assert_eq!(
            l4(&open, "shop/web", "shop/api"),
            Some(true),
            "the migration default"
        );
    }

    /// Consul's precedence: the most specific destination, then the most specific source.
    #[test]
    fn the_most_specific_match_decides() {
        let objects = [
            intention(
                "shop",
                "api",
                serde_json::json!({"destination": {"name": "api"}, "sources": [
                    {"name": "*", "namespace": "*", "action": "deny"},
                    {"name": "*", "action": "allow"},
                    {"name": "web", "action": "deny"},
                    {"name": "web", "namespace": "ops", "action": "allow"},
                ]}),
            ),
            intention(
                "shop",
                "all",
                serde_json::json!({"destination": {"name": "*"}, "sources": [
                    {"name": "web", "action": "allow"},
                ]}),
            ),
        ];
        let policy = Policy::compile(&objects, false, CONTROL);
        assert_eq!(
            l4(&policy, "shop/web", "shop/api"),
            Some(false),
            "exact source beats * in namespace"
        );
        assert_eq!(
            l4(&policy, "shop/cart", "shop/api"),
            Some(true),
            "* in namespace beats * everywhere"
        );
        assert_eq!(l4(&policy, "other/x", "shop/api"), Some(false), "* everywhere");
        assert_eq!(
            l4(&policy, "ops/web", "shop/api"),
            Some(true),
            "another namespace, named exactly"
        );
        // An exact destination beats a wildcard one, even with a less specific source.
        assert_eq!(
            l4(&policy, "shop/web", "shop/db"),
            Some(true),
            "the * destination applies to db"
        );
        let decision = policy.connection(&id("shop/web"), &id("shop/api"));
        assert_eq!(
            decision,
            ConnectionDecision::Decided(Decision {
                allow: false,
                by: DecidedBy::Source {
                    intention: "shop/api".into(),
                    source: 2
                }
            })
        );
        assert_eq!(
            policy
                .request(&id("shop/web"), &id("shop/api"), &get("/", &[]))
                .to_string(),
            "DENY by shop/api sources[2]"
        );
    }

    /// M6: names are literal; `.` or regex metacharacters never widen a match.
    #[test]
    fn names_match_literally() {
        let objects = [intention(
            "shop",
            "api",
            serde_json::json!({"destination": {"name": "api"}, "sources": [
                {"name": "web", "action": "allow"},
            ]}),
        )];
        let policy = Policy::compile(&objects, false, CONTROL);
        for impostor in [
            "shop/web.*",
            "shop/webx",
            "shop/we",
            "shop/.*",
            "shop/*x",
            "shop/WEB",
        ] {
            assert_eq!(l4(&policy, impostor, "shop/api"), Some(false), "{impostor}");
        }
        assert_eq!(l4(&policy, "shop/web", "shop/api."), Some(false));
    }

    fn l7_policy() -> Policy {
        Policy::compile(
            &[intention(
                "shop",
                "api",
                serde_json::json!({"destination": {"name": "api"}, "sources": [
                    {"name": "web", "permissions": [
                        {"action": "deny", "http": {"pathPrefix": "/admin"}},
                        {"action": "allow", "http": {"pathPrefix": "/public", "methods": ["GET", "HEAD"]}},
                        {"action": "allow", "http": {"pathExact": "/orders", "header": [{"name": "X-Role", "exact": "clerk"}]}},
                        {"action": "deny", "http": {"pathPrefix": "/", "header": [{"name": "x-debug", "present": true}]}},
                        {"action": "allow", "http": {"pathRegex": "/v[0-9]+/items", "header": [{"name": "Host", "exact": "Shop.Example"}]}},
                    ]},
                    {"name": "batch", "permissions": [
                        {"action": "deny", "http": {"pathPrefix": "/"}},
                    ]},
                ]}),
            )],
            false,
            CONTROL,
        )
    }

    #[test]
    fn l7_rules_decide_in_order_and_no_match_denies() {
        let policy = l7_policy();
        let (web, api) = (id("shop/web"), id("shop/api"));
        assert_eq!(
            policy.connection(&web, &api),
            ConnectionDecision::PerRequest {
                intention: "shop/api".into(),
                source: 0
            }
        );
        let decide = |method: &str, target: &str, headers: &[(&str, &str)]| {
            policy
                .request(
                    &web,
                    &api,
                    &Request {
                        method,
                        target,
                        headers,
                    },
                )
                .to_string()
        };
        assert_eq!(
            decide("GET", "/public/a", &[]),
            "ALLOW by shop/api sources[0].permissions[1]"
        );
        assert_eq!(
            decide("POST", "/public/a", &[]),
            "DENY by shop/api sources[0] (no permission matched)"
        );
        assert_eq!(
            decide("GET", "/admin", &[]),
            "DENY by shop/api sources[0].permissions[0]"
        );
        assert_eq!(
            decide("GET", "/orders", &[("x-role", "clerk")]),
            "ALLOW by shop/api sources[0].permissions[2]"
        );
        assert_eq!(
            decide("GET", "/orders", &[]),
            "DENY by shop/api sources[0] (no permission matched)"
        );
        assert_eq!(
            decide("GET", "/v2/items", &[("host", "shop.example")]),
            "ALLOW by shop/api sources[0].permissions[4]"
        );
        assert_eq!(
            decide("GET", "/v2/items/x", &[("host", "shop.example")]),
            "DENY by shop/api sources[0] (no permission matched)",
            "regexes match the whole path"
        );
        assert_eq!(
            decide("GET", "/x/../v2/items?q=1", &[("host", "shop.example")]),
            "ALLOW by shop/api sources[0].permissions[4]"
        );
    }

    /// M2: an L7 rule that allows nothing refuses the connection itself.
    #[test]
    fn l7_without_any_allow_denies_at_l4() {
        let policy = l7_policy();
        assert_eq!(l4(&policy, "shop/batch", "shop/api"), Some(false));
    }

    /// M3: every spelling of /admin meets the deny rule, or is refused outright.
    #[test]
    fn path_spellings_cannot_dodge_a_deny_rule() {
        let policy = l7_policy();
        let (web, api) = (id("shop/web"), id("shop/api"));
        for spelling in [
            "/admin",
            "//admin",
            "/%2Fadmin",
            "/%2fadmin",
            "\\admin",
            "/%5Cadmin",
            "/a/../admin",
            "/admin#x",
            "/admin;x",
            "/%61dmin",
            "/./admin/",
            "/public/../admin",
        ] {
            let decision = policy.request(&web, &api, &get(spelling, &[]));
            assert!(!decision.allow, "{spelling}: {decision}");
        }
        // /ADMIN is another path (paths are case-sensitive): no rule allows it either.
        assert!(!policy.request(&web, &api, &get("/ADMIN", &[])).allow);
    }

    /// M4: Host matches case-insensitively.
    #[test]
    fn host_matches_in_any_case() {
        let policy = l7_policy();
        for host in ["shop.example", "SHOP.EXAMPLE", "Shop.Example"] {
            assert!(
                policy
                    .request(
                        &id("shop/web"),
                        &id("shop/api"),
                        &get("/v1/items", &[("HOST", host)])
                    )
                    .allow,
                "{host}"
            );
        }
    }

    /// M5: repeating or re-casing a header never widens access.
    #[test]
    fn repeated_headers_are_judged_on_every_value() {
        let policy = l7_policy();
        let (web, api) = (id("shop/web"), id("shop/api"));
        let decide = |headers: &[(&str, &str)]| policy.request(&web, &api, &get("/orders", headers)).allow;
        assert!(decide(&[("X-ROLE", "clerk")]));
        assert!(
            !decide(&[("x-role", "clerk"), ("x-role", "guest")]),
            "an allow needs every value to match"
        );
        assert!(!decide(&[("x-role", "guest"), ("X-Role", "clerk")]));
        let items = |headers: &[(&str, &str)]| policy.request(&web, &api, &get("/v1/items", headers)).allow;
        assert!(items(&[("host", "shop.example")]));
        assert!(
            !items(&[("host", "shop.example"), ("X-Debug", "1")]),
            "a deny needs only one"
        );
        assert!(!items(&[("host", "shop.example"), ("host", "evil.example")]));
    }

    /// A pattern that does not compile can only deny: it never matches in an allow rule
    /// and always matches in a deny rule.
    #[test]
    fn broken_patterns_fail_closed() {
        let objects = [intention(
            "shop",
            "api",
            serde_json::json!({"destination": {"name": "api"}, "sources": [
                {"name": "web", "permissions": [
                    {"action": "deny", "http": {"pathRegex": "(", "methods": ["DELETE"]}},
                    {"action": "allow", "http": {"pathRegex": "[z-a]"}},
                    {"action": "allow", "http": {"pathPrefix": "/"}},
                ]},
            ]}),
        )];
        let policy = Policy::compile(&objects, false, CONTROL);
        let (web, api) = (id("shop/web"), id("shop/api"));
        let delete = Request {
            method: "DELETE",
            target: "/x",
            headers: &[],
        };
        assert_eq!(
            policy.request(&web, &api, &delete).to_string(),
            "DENY by shop/api sources[0].permissions[0]"
        );
        assert_eq!(
            policy.request(&web, &api, &get("/x", &[])).to_string(),
            "ALLOW by shop/api sources[0].permissions[2]"
        );
    }

    /// Of two objects for one destination, only the older one counts, as status says.
    #[test]
    fn only_the_object_in_force_counts() {
        let older = intention(
            "shop",
            "a",
            serde_json::json!({"destination": {"name": "api"}, "sources": [{"name": "web", "action": "deny"}]}),
        );
        let mut newer = intention(
            "shop",
            "b",
            serde_json::json!({"destination": {"name": "api"}, "sources": [{"name": "web", "action": "allow"}]}),
        );
        newer.metadata.creation_timestamp = Some(Time(Timestamp::from_second(2_000).unwrap()));
        let policy = Policy::compile(&[newer, older], false, CONTROL);
        assert_eq!(l4(&policy, "shop/web", "shop/api"), Some(false));
    }

    /// Tenancy: a tenant's object naming every namespace (or another one) governs
    /// nothing, so it cannot grant itself access; Capstan's namespace may set defaults.
    #[test]
    fn a_tenant_cannot_govern_another_namespace() {
        let grab = intention(
            "evil",
            "grab",
            serde_json::json!({"destination": {"name": "*", "namespace": "*"}, "sources": [
                {"name": "*", "namespace": "evil", "action": "allow"},
            ]}),
        );
        let mut older = intention(
            "evil",
            "shadow",
            serde_json::json!({"destination": {"name": "db", "namespace": "shop"}, "sources": [
                {"name": "x", "namespace": "evil", "action": "allow"},
            ]}),
        );
        older.metadata.creation_timestamp = Some(Time(Timestamp::from_second(1).unwrap()));
        let owner = intention(
            "shop",
            "db",
            serde_json::json!({"destination": {"name": "db"}, "sources": [{"name": "web", "action": "allow"}]}),
        );
        let policy = Policy::compile(&[grab.clone(), older, owner], false, CONTROL);
        assert_eq!(
            policy.connection(&id("evil/x"), &id("shop/db")),
            ConnectionDecision::Decided(Decision {
                allow: false,
                by: DecidedBy::Default
            })
        );
        assert_eq!(l4(&policy, "evil/x", "evil/x"), Some(false));
        // The owner's own object is not shadowed by the older out-of-bounds one.
        assert_eq!(l4(&policy, "shop/web", "shop/db"), Some(true));

        let mut defaults = grab;
        defaults.metadata.namespace = Some(CONTROL.into());
        let policy = Policy::compile(&[defaults], false, CONTROL);
        assert_eq!(
            l4(&policy, "evil/x", "shop/db"),
            Some(true),
            "a cluster-wide rule"
        );
    }

    /// Fields Capstan does not implement (refused by the schema) only ever deny.
    #[test]
    fn unsupported_consul_fields_deny() {
        let objects = [intention(
            "shop",
            "api",
            serde_json::json!({"destination": {"name": "api"}, "sources": [
                {"name": "web", "peer": "dc2", "action": "allow"},
                {"name": "cart", "partition": "p1", "action": "allow"},
                {"name": "batch", "samenessGroup": "g", "action": "allow"},
                {"name": "ui", "permissions": [
                    {"action": "allow", "http": {"pathPrefix": "/"}, "jwt": {"providers": [{"name": "okta"}]}},
                ]},
            ]}),
        )];
        let policy = Policy::compile(&objects, false, CONTROL);
        for from in ["shop/web", "shop/cart", "shop/batch"] {
            assert_eq!(l4(&policy, from, "shop/api"), Some(false), "{from}");
        }
        assert!(
            !policy
                .request(&id("shop/ui"), &id("shop/api"), &get("/x", &[]))
                .allow
        );

        let mut gated = objects[0].clone();
        gated.spec.sources =
            vec![serde_json::from_value(serde_json::json!({"name": "web", "action": "allow"})).unwrap()];
        gated.spec.jwt = Some(serde_json::json!({"providers": [{"name": "okta"}]}));
        let policy = Policy::compile(&[gated], false, CONTROL);
        assert_eq!(l4(&policy, "shop/web", "shop/api"), Some(false));
    }

    /// M4: a port or the trailing dot of a fully qualified name does not escape an
    /// exact host rule, in any case.
    #[test]
    fn host_rules_see_through_ports_and_trailing_dots() {
        let policy = Policy::compile(
            &[intention(
                "shop",
                "api",
                serde_json::json!({"destination": {"name": "api"}, "sources": [
                    {"name": "web", "permissions": [
                        {"action": "deny", "http": {"header": [{"name": "Host", "exact": "admin.example"}]}},
                        {"action": "allow", "http": {"pathPrefix": "/"}},
                    ]},
                ]}),
            )],
            false,
            CONTROL,
        );
        for host in [
            "admin.example",
            "admin.example.",
            "admin.example:80",
            "Admin.Example.:8080",
            "admin.example..",
        ] {
            let decision = policy.request(&id("shop/web"), &id("shop/api"), &get("/", &[("Host", host)]));
            assert!(!decision.allow, "{host}: {decision}");
        }
        assert!(
            policy
                .request(
                    &id("shop/web"),
                    &id("shop/api"),
                    &get("/", &[("Host", "shop.example")])
                )
                .allow
        );

        // Folding never widens an allow, nor silences a deny that names a port.
        let rules = |rules: serde_json::Value| {
            Policy::compile(
                &[intention(
                    "shop",
                    "api",
                    serde_json::json!({"destination": {"name": "api"}, "sources": [{"name": "web", "permissions": rules}]}),
                )],
                false,
                CONTROL,
            )
        };
        let allowed = |policy: &Policy, host: &str| {
            policy
                .request(&id("shop/web"), &id("shop/api"), &get("/", &[("Host", host)]))
                .allow
        };
        let prefix = rules(serde_json::json!([
            {"action": "allow", "http": {"header": [{"name": "Host", "prefix": "admin."}]}},
        ]));
        assert!(!allowed(&prefix, "administrator.evil"));
        assert!(allowed(&prefix, "admin.example"));
        let suffix = rules(serde_json::json!([
            {"action": "allow", "http": {"header": [{"name": "Host", "suffix": ":8443"}]}},
        ]));
        assert!(!allowed(&suffix, "evil.example"));
        let with_port = rules(serde_json::json!([
            {"action": "deny", "http": {"header": [{"name": "Host", "regex": "admin\\.example:9000"}]}},
            {"action": "allow", "http": {}},
        ]));
        assert!(!allowed(&with_port, "admin.example:9000"));
        assert!(allowed(&with_port, "admin.example:9001"));
        assert_eq!(canonical_host("[::1]:8080"), "[::1]");
        assert_eq!(canonical_host("[::1]"), "[::1]");
        assert_eq!(canonical_host("a.b:x"), "a.b:x");
    }
}
