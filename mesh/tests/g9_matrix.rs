//! Gate G9 (RELIABILITY.md): 0 unauthorized connections or requests across ≥100,000
//! attempts over an N×N service matrix with random intentions and default deny, including
//! a ≥500-entry path/host/header normalization corpus (M3-M6).
//!
//! A differential test: every attempt is decided by capstan-mesh's `Policy` and by the
//! `reference` module below, an independent model written from the documented semantics
//! (mesh/README.md "Decisions", the CRD field docs, RFC 3986 §5.2.4 and Consul's
//! precedence table). The reference never calls capstan-mesh. An attempt the policy allows
//! and the reference denies is unauthorized and fails the test; the converse (over-denial)
//! is counted and printed, so a drifting model or an over-strict policy shows up too.
//!
//! `G9_SEED=<u64> cargo test -p capstan-mesh --test g9_matrix -- --nocapture` replays
//! another seed; `G9_DUMP=1` prints each round's intentions; `G9_STRICT=1` also fails on
//! divergences explained by a known bug ([`KB1`]).

use capstan_crds::{
    HttpHeaderMatch, HttpMatch, HttpMethod, IntentionAction, IntentionDestination, IntentionPermission,
    IntentionSource, ServiceIntentions, ServiceIntentionsSpec,
};
use capstan_mesh::{ConnectionDecision, Identity, Policy, Request};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use std::collections::BTreeSet;

const SEED: u64 = 0x6739_2026;
/// Fresh random intentions per round; every round decides the whole matrix × corpus.
const ROUNDS: usize = 3;
const OBJECTS_PER_ROUND: usize = 14;

/// The service matrix: three namespaces, with names holding `.` and `*` beside names a
/// glob or regex reading would confuse them with (M6): `a.b`/`axb`, `svc*x`/`svcyx`, `.*`.
const SERVICES: [(&str, &str); 9] = [
    ("shop", "web"),
    ("shop", "api"),
    ("shop", "a.b"),
    ("shop", "axb"),
    ("ops", "web"),
    ("ops", "svc*x"),
    ("ops", "svcyx"),
    ("dev", "api"),
    ("dev", ".*"),
];
const NAMESPACES: [&str; 3] = ["shop", "ops", "dev"];
/// Capstan's own namespace: the only one whose objects may name other namespaces.
const CONTROL: &str = "capstan-system";
/// Names a rule may use: the services', a prefix of one, and the wildcard (twice as
/// likely).
const RULE_NAMES: [&str; 10] = ["web", "api", "a.b", "axb", "svc*x", "svcyx", ".*", "we", "*", "*"];

// ---------------------------------------------------------------------------------------
// The reference model.
// ---------------------------------------------------------------------------------------

mod reference {
    use capstan_crds::{
        HttpHeaderMatch, HttpMethod, IntentionAction, IntentionPermission, ServiceIntentions,
    };
    use regex::Regex;
    use std::collections::{BTreeMap, HashMap};

    pub struct Id<'a> {
        pub namespace: &'a str,
        pub name: &'a str,
    }

    /// What a source is granted by the (intention, source) pair that decides for it.
    pub enum Grant<'a> {
        /// No intention names this pair: the cluster default (deny, for G9).
        Default,
        L4 {
            allow: bool,
            by: String,
        },
        L7 {
            permissions: &'a [IntentionPermission],
            by: String,
        },
    }

    /// What a new connection to an HTTP destination gets.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Connection {
        Allow,
        Deny,
        /// Accepted; each request is decided on its own.
        PerRequest,
    }

    pub struct Model<'a> {
        in_force: Vec<&'a ServiceIntentions>,
        /// Compiled patterns, keyed by (pattern, case-insensitive).
        regexes: HashMap<(String, bool), Regex>,
        /// Reproduce known bug KB-1 (see [`crate::KB1`]) instead of the documented
        /// behaviour: only used to attribute a divergence to it, never as the reference.
        kb1: bool,
    }

    /// The destination an object protects: its `spec.destination`, the namespace defaulting
    /// to the object's own (CRD field doc).
    fn destination(obj: &ServiceIntentions) -> (&str, &str) {
        let namespace = obj
            .spec
            .destination
            .namespace
            .as_deref()
            .or(obj.metadata.namespace.as_deref())
            .unwrap_or_default();
        (namespace, &obj.spec.destination.name)
    }

    /// Of several objects naming one destination, the oldest is in force: by creation
    /// time, then namespace, then name (mesh/src/in_force.rs module doc). Objects being
    /// deleted no longer count.
    fn in_force(objects: &[ServiceIntentions]) -> Vec<&ServiceIntentions> {
        let age = |o: &ServiceIntentions| {
            (
                o.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()),
                o.metadata.namespace.clone().unwrap_or_default(),
                o.metadata.name.clone().unwrap_or_default(),
            )
        };
        // Tenancy (the CRD's destination.namespace doc): an object in a tenant namespace
        // that names another namespace governs nothing and competes with no one.
        let governs = |o: &&ServiceIntentions| {
            let own = o.metadata.namespace.as_deref().unwrap_or_default();
            own == crate::CONTROL || o.spec.destination.namespace.as_deref().is_none_or(|ns| ns == own)
        };
        let mut oldest: BTreeMap<(&str, &str), &ServiceIntentions> = BTreeMap::new();
        for obj in objects
            .iter()
            .filter(|o| o.metadata.deletion_timestamp.is_none())
            .filter(governs)
        {
            let current = oldest.entry(destination(obj)).or_insert(obj);
            if age(obj) < age(current) {
                *current = obj;
            }
        }
        oldest.into_values().collect()
    }

    /// How specifically a (namespace, name) pattern names `who`, higher first, after
    /// Consul's precedence table: exact namespace and name, then exact namespace and `*`
    /// name, then `*` namespace. Consul has no `*` namespace with an exact name; the
    /// README does not rank it either, so it is placed between the two (namespace first)
    /// and reported as undocumented. Names compare literally: only a whole `*` is a
    /// wildcard (M6).
    fn specificity(namespace: &str, name: &str, who: &Id<'_>) -> Option<u8> {
        #[derive(Clone, Copy)]
        enum Part {
            Exact,
            Any,
        }
        let part = |pattern: &str, actual: &str| {
            if pattern == actual {
                Some(Part::Exact)
            } else if pattern == "*" {
                Some(Part::Any)
            } else {
                None
            }
        };
        Some(match (part(namespace, who.namespace)?, part(name, who.name)?) {
            (Part::Exact, Part::Exact) => 3,
            (Part::Exact, Part::Any) => 2,
            (Part::Any, Part::Exact) => 1,
            (Part::Any, Part::Any) => 0,
        })
    }

    impl<'a> Model<'a> {
        pub fn new(objects: &'a [ServiceIntentions]) -> Self {
            Self::build(objects, false)
        }

        /// The model with known bug KB-1 reproduced.
        pub fn with_kb1(objects: &'a [ServiceIntentions]) -> Self {
            Self::build(objects, true)
        }

        fn build(objects: &'a [ServiceIntentions], kb1: bool) -> Self {
            let in_force = in_force(objects);
            let mut regexes = HashMap::new();
            for obj in &in_force {
                for permission in obj
                    .spec
                    .sources
                    .iter()
                    .flat_map(|s| s.permissions.iter().flatten())
                {
                    if let Some(pattern) = &permission.http.path_regex {
                        regexes.insert((pattern.clone(), false), whole_match(pattern, false));
                    }
                    for header in &permission.http.header {
                        if let Some(pattern) = &header.regex {
                            for fold in [false, is_host(header)] {
                                regexes.insert((pattern.clone(), fold), whole_match(pattern, fold));
                            }
                        }
                    }
                }
            }
            Self {
                in_force,
                regexes,
                kb1,
            }
        }

        pub fn in_force_count(&self) -> usize {
            self.in_force.len()
        }

        /// The most specific pair decides: the destination's specificity first, then the
        /// source's (Consul). A source's unset namespace is the destination's (CRD doc).
        pub fn grant(&self, source: &Id<'_>, dest: &Id<'_>) -> Grant<'a> {
            let mut best: Option<((u8, u8), Grant<'a>)> = None;
            for obj in &self.in_force {
                let (dest_namespace, dest_name) = destination(obj);
                let Some(dest_rank) = specificity(dest_namespace, dest_name, dest) else {
                    continue;
                };
                for (i, s) in obj.spec.sources.iter().enumerate() {
                    let namespace = s.namespace.as_deref().unwrap_or(dest_namespace);
                    let Some(source_rank) = specificity(namespace, &s.name, source) else {
                        continue;
                    };
                    let rank = (dest_rank, source_rank);
                    if let Some((best_rank, _)) = &best {
                        // One object in force per destination and one entry per source pair
                        // (the generator keeps to that): ties cannot happen.
                        assert_ne!(*best_rank, rank, "a tie: the generator broke its promise");
                        if *best_rank > rank {
                            continue;
                        }
                    }
                    let by = format!(
                        "{}/{} sources[{i}]",
                        obj.metadata.namespace.as_deref().unwrap_or_default(),
                        obj.metadata.name.as_deref().unwrap_or_default()
                    );
                    let grant = match (&s.action, &s.permissions) {
                        (Some(action), _) => Grant::L4 {
                            allow: *action == IntentionAction::Allow,
                            by,
                        },
                        (None, Some(permissions)) => Grant::L7 { permissions, by },
                        (None, None) => unreachable!("the generator sets one"),
                    };
                    best = Some((rank, grant));
                }
            }
            best.map_or(Grant::Default, |(_, grant)| grant)
        }

        /// A connection to an HTTP destination. "An object that lists only L7 permissions
        /// none of which allow anything denies at L4 too" (README).
        pub fn connection(&self, source: &Id<'_>, dest: &Id<'_>) -> Connection {
            match self.grant(source, dest) {
                Grant::Default => Connection::Deny,
                Grant::L4 { allow: true, .. } => Connection::Allow,
                Grant::L4 { allow: false, .. } => Connection::Deny,
                Grant::L7 { permissions, .. } if permissions.iter().any(is_allow) => Connection::PerRequest,
                Grant::L7 { .. } => Connection::Deny,
            }
        }

        /// A connection to a plain-TCP destination: L7 permissions cannot be evaluated
        /// there and deny (README).
        pub fn tcp_connection(&self, source: &Id<'_>, dest: &Id<'_>) -> bool {
            matches!(self.grant(source, dest), Grant::L4 { allow: true, .. })
        }

        /// A request, given its path already normalized by [`normalize`] (None: refused).
        /// Returns the verdict and what decided it.
        pub fn request(
            &self,
            source: &Id<'_>,
            dest: &Id<'_>,
            method: &str,
            path: Option<&str>,
            headers: &[(&str, &str)],
        ) -> (bool, String) {
            let Some(path) = path else {
                return (false, "refused path".into());
            };
            // The application routes the forwarded path, and the host, its own way:
            // allowed only if every way a server family routes them is allowed.
            let mut verdict = (true, String::new());
            for host_spelling in [HostSpelling::AsSent, HostSpelling::Routed] {
                let headers: Vec<(&str, String)> = headers
                    .iter()
                    .map(|(name, value)| {
                        let value = match host_spelling {
                            HostSpelling::Routed if name.eq_ignore_ascii_case("host") => routed_host(value),
                            _ => (*value).to_owned(),
                        };
                        (*name, value)
                    })
                    .collect();
                let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
                for routed in routed(path) {
                    let (allow, why) = self.decide_path(source, dest, method, &routed, &headers);
                    if !allow {
                        return (
                            false,
                            format!("{why} (as routed: {routed}, host {host_spelling:?})"),
                        );
                    }
                    verdict = (allow, why);
                }
            }
            verdict
        }

        fn decide_path(
            &self,
            source: &Id<'_>,
            dest: &Id<'_>,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
        ) -> (bool, String) {
            match self.grant(source, dest) {
                Grant::Default => (false, "default deny".into()),
                Grant::L4 { allow, by } => (allow, by),
                // In order, the first match decides; no match denies.
                Grant::L7 { permissions, by } => permissions
                    .iter()
                    .position(|p| self.permission_matches(p, method, path, headers))
                    .map_or((false, format!("{by} no permission matched")), |j| {
                        (is_allow(&permissions[j]), format!("{by}.permissions[{j}]"))
                    }),
            }
        }

        /// Path, method and every header condition must all hold.
        fn permission_matches(
            &self,
            p: &IntentionPermission,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
        ) -> bool {
            let http = &p.http;
            // Paths match case-sensitively (README); a prefix is a string prefix and a
            // regex matches the whole path (CRD doc), as in Consul/Envoy.
            let path_ok = if let Some(exact) = &http.path_exact {
                path == exact
            } else if let Some(prefix) = &http.path_prefix {
                path.starts_with(prefix.as_str())
            } else if let Some(pattern) = &http.path_regex {
                self.regexes[&(pattern.clone(), false)].is_match(path)
            } else {
                true
            };
            // Methods are case-sensitive tokens (RFC 9110 §9.1); none listed means any. Some
            // applications upper-case what they receive, so a deny rule holds for any case
            // of its method (decide.rs: case never widens access).
            let method_ok = http.methods.is_empty()
                || http.methods.iter().any(|m| {
                    if is_allow(p) {
                        method_name(*m) == method
                    } else {
                        method_name(*m).eq_ignore_ascii_case(method)
                    }
                });
            path_ok
                && method_ok
                && http
                    .header
                    .iter()
                    .all(|h| self.header_holds(h, is_allow(p), headers))
        }

        /// README "Headers": names match case-insensitively; a repeated header is judged on
        /// every value, pessimistically (an allow rule's condition must hold for every
        /// value, a deny rule's for any). An absent header matches nothing, so its
        /// inverted condition holds.
        fn header_holds(&self, h: &HttpHeaderMatch, allow_rule: bool, headers: &[(&str, &str)]) -> bool {
            let invert = h.invert.unwrap_or(false);
            let values: Vec<&str> = headers
                .iter()
                .filter(|(name, _)| name.eq_ignore_ascii_case(&h.name))
                .map(|(_, value)| *value)
                .collect();
            if values.is_empty() {
                return invert;
            }
            let holds = |value: &str| self.value_matches(h, value) != invert;
            if allow_rule {
                values.iter().all(|v| holds(v))
            } else {
                values.iter().any(|v| holds(v))
            }
        }

        /// One value against one condition; `host` values compare case-insensitively
        /// (README, M4), whatever the kind of comparison. Rule values are never folded
        /// otherwise: servers route on the request's host, not the rule's.
        fn value_matches(&self, h: &HttpHeaderMatch, value: &str) -> bool {
            let fold = is_host(h);
            let norm = |s: &str| {
                if fold {
                    s.trim().to_ascii_lowercase()
                } else {
                    s.to_owned()
                }
            };
            if let Some(exact) = &h.exact {
                norm(value) == norm(exact)
            } else if let Some(prefix) = &h.prefix {
                norm(value).starts_with(&norm(prefix))
            } else if let Some(suffix) = &h.suffix {
                norm(value).ends_with(&norm(suffix))
            } else if let Some(pattern) = &h.regex {
                if fold && self.kb1 {
                    self.regexes[&(pattern.clone(), false)].is_match(&norm(value))
                } else {
                    self.regexes[&(pattern.clone(), fold)].is_match(&norm(value))
                }
            } else {
                // `present`
                true
            }
        }
    }

    fn is_allow(p: &IntentionPermission) -> bool {
        p.action == IntentionAction::Allow
    }

    fn is_host(h: &HttpHeaderMatch) -> bool {
        h.name.eq_ignore_ascii_case("host")
    }

    /// A regex matching the whole value (CRD doc: "matched against the whole path"),
    /// case-insensitively for `host`.
    fn whole_match(pattern: &str, case_insensitive: bool) -> Regex {
        regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
            .case_insensitive(case_insensitive)
            .build()
            .expect("the generator writes valid patterns")
    }

    fn method_name(m: HttpMethod) -> &'static str {
        match m {
            HttpMethod::Get => "GET",
            HttpMethod::Head => "HEAD",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Connect => "CONNECT",
            HttpMethod::Options => "OPTIONS",
            HttpMethod::Trace => "TRACE",
            HttpMethod::Patch => "PATCH",
        }
    }

    /// The documented path normalization (README "Paths", mesh/src/path.rs module doc),
    /// None when the request must be refused:
    /// 1. the query (from the first `?`) is not part of the path;
    /// 2. refused: not starting with `/`, a fragment `#`, a raw `\`, a control character or
    ///    space, a malformed `%` escape, an encoded `/` or `\`, a `;` raw or encoded;
    /// 3. percent-encoded unreserved characters (ALPHA DIGIT `-._~`) are decoded, other
    ///    escapes kept with upper-case hex;
    /// 4. repeated slashes merged, then dot segments removed (RFC 3986 §5.2.4).
    ///
    /// The README lists "dot segments resolved, repeated slashes merged" without saying
    /// which comes first; they differ on e.g. `/a//../b` (`/b` merging first, `/a/b`
    /// resolving first). The sidecar forwards the normalized path, so either order is
    /// safe; merging first is the model's reading (see [`order_sensitive`]).
    pub fn normalize(target: &str) -> Option<String> {
        let path = target.split('?').next().unwrap_or_default();
        if !path.starts_with('/')
            || path.contains('#')
            || path.contains('\\')
            || path.chars().any(|c| c.is_ascii_control() || c == ' ')
            || path.contains(';')
            || path.to_ascii_lowercase().contains("%3b")
        {
            return None;
        }
        let decoded = percent_decode_unreserved(path)?;
        Some(remove_dot_segments(&merge_slashes(&decoded)))
    }

    /// Whether the two readings of step 4 differ for `target`.
    pub fn order_sensitive(target: &str) -> bool {
        let Some(merged_first) = normalize(target) else {
            return false;
        };
        let path = target.split('?').next().unwrap_or_default();
        let decoded = percent_decode_unreserved(path).expect("normalize accepted it");
        let resolved_first = merge_slashes(&remove_dot_segments(&decoded));
        merged_first != resolved_first
    }

    fn percent_decode_unreserved(path: &str) -> Option<String> {
        let mut out = Vec::with_capacity(path.len());
        let mut bytes = path.bytes();
        while let Some(b) = bytes.next() {
            if b != b'%' {
                out.push(b);
                continue;
            }
            let hi = bytes.next().filter(u8::is_ascii_hexdigit)?;
            let lo = bytes.next().filter(u8::is_ascii_hexdigit)?;
            let hex = [hi.to_ascii_uppercase(), lo.to_ascii_uppercase()];
            let value = u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?;
            match value {
                b'/' | b'\\' => return None,
                v if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') => out.push(v),
                _ => out.extend_from_slice(&[b'%', hex[0], hex[1]]),
            }
        }
        // Only ASCII escapes were rewritten into ASCII: still UTF-8.
        Some(String::from_utf8(out).expect("UTF-8 in, UTF-8 out"))
    }

    /// Which spelling of the Host a request is decided on.
    #[derive(Clone, Copy, Debug)]
    enum HostSpelling {
        AsSent,
        Routed,
    }

    /// Capstan's normalization without its refusal of `;` parameters: what the gate
    /// decides on, so that [`routed`] meets `;` and the gate would catch a normalizer
    /// that let one through even if the contract stopped refusing it.
    pub fn normalize_lenient(target: &str) -> Option<String> {
        let path = target.split('?').next().unwrap_or_default();
        let stand_in = path.replace(';', "").replace("%3b", "").replace("%3B", "");
        normalize(&target.replacen(path, &stand_in, 1))?;
        let decoded = percent_decode_unreserved(path)?;
        Some(remove_dot_segments(&merge_slashes(&decoded)))
    }

    /// The paths servers route a forwarded path to, written from how they are documented
    /// to behave rather than from Capstan's contract, so that a gap in the contract (a
    /// spelling it passes through that a server reads differently) shows up as an
    /// unauthorized request here:
    /// - RFC 3986 servers (Go, nginx): the path as forwarded;
    /// - servlet containers (Tomcat, Jetty, Spring): `;` parameters stripped from every
    ///   segment, every escape decoded, dot segments removed, in either order of the
    ///   first two (they differ between containers and versions).
    pub fn routed(path: &str) -> Vec<String> {
        let strip_params = |p: &str| {
            p.split('/')
                .map(|segment| segment.split(';').next().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("/")
        };
        let decode_all = |p: &str| {
            let bytes = p.as_bytes();
            let mut out = Vec::with_capacity(bytes.len());
            let mut i = 0;
            while i < bytes.len() {
                let escape = (bytes[i] == b'%')
                    .then(|| p.get(i + 1..i + 3))
                    .flatten()
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok());
                match escape {
                    Some(byte) => {
                        out.push(byte);
                        i += 3;
                    }
                    None => {
                        out.push(bytes[i]);
                        i += 1;
                    }
                }
            }
            String::from_utf8_lossy(&out).into_owned()
        };
        let servlet = |p: String| remove_dot_segments(&merge_slashes(&p));
        let mut routes = vec![
            path.to_owned(),
            servlet(decode_all(&strip_params(path))),
            servlet(strip_params(&decode_all(path))),
        ];
        routes.dedup();
        routes
    }

    /// The host a server routes on (M4): case-folded, without a port, without the
    /// trailing dot(s) of a fully qualified name; an IPv6 literal keeps its brackets.
    pub fn routed_host(value: &str) -> String {
        let value = value.trim().to_ascii_lowercase();
        if value.starts_with('[') {
            return value
                .find(']')
                .map_or(value.clone(), |end| value[..=end].to_owned());
        }
        let host = match value.rfind(':') {
            Some(colon) if value[colon + 1..].chars().all(|c| c.is_ascii_digit()) => &value[..colon],
            _ => &value[..],
        };
        host.trim_end_matches('.').to_owned()
    }

    fn merge_slashes(path: &str) -> String {
        let mut out = String::with_capacity(path.len());
        for c in path.chars() {
            if !(c == '/' && out.ends_with('/')) {
                out.push(c);
            }
        }
        out
    }

    /// RFC 3986 §5.2.4, written as the RFC's input/output buffer loop.
    fn remove_dot_segments(path: &str) -> String {
        let mut input = path.to_owned();
        let mut output = String::new();
        let pop = |output: &mut String| output.truncate(output.rfind('/').unwrap_or(0));
        while !input.is_empty() {
            if input.starts_with("../") {
                input.drain(..3);
            } else if input.starts_with("./") {
                input.drain(..2);
            } else if input.starts_with("/./") {
                input.replace_range(..3, "/");
            } else if input == "/." {
                input = "/".into();
            } else if input.starts_with("/../") {
                input.replace_range(..4, "/");
                pop(&mut output);
            } else if input == "/.." {
                input = "/".into();
                pop(&mut output);
            } else if input == "." || input == ".." {
                input.clear();
            } else {
                let start = usize::from(input.starts_with('/'));
                let end = input[start..].find('/').map_or(input.len(), |i| i + start);
                output.push_str(&input[..end]);
                input.drain(..end);
            }
        }
        if output.is_empty() { "/".into() } else { output }
    }
}

/// The reference normalizer against the documented examples (M3 and path.rs docs), so a
/// broken model cannot pass the gate by agreeing with a broken policy.
#[test]
fn reference_normalizer_follows_the_documented_examples() {
    use reference::normalize;
    for (spelling, want) in [
        ("/admin", "/admin"),
        ("//admin", "/admin"),
        ("/a/../admin", "/admin"),
        ("/./admin", "/admin"),
        ("/%61dmin", "/admin"),
        ("/%61%64%6D%69%6E", "/admin"),
        ("/x/y/../../admin", "/admin"),
        ("/admin?x=1", "/admin"),
        ("/%2e%2e/admin", "/admin"),
        ("/ADMIN", "/ADMIN"),
        ("/a/b/", "/a/b/"),
        ("/a/b/..", "/a/"),
        ("/..", "/"),
        ("/../../etc", "/etc"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/café", "/café"),
        ("/", "/"),
    ] {
        assert_eq!(normalize(spelling).as_deref(), Some(want), "{spelling}");
    }
    for refused in [
        "/%2Fadmin",
        "/%2fadmin",
        "\\admin",
        "/\\admin",
        "/%5Cadmin",
        "/%5cadmin",
        "/admin#x",
        "/adm%in",
        "/admin%",
        "/admin%+1",
        "/ad min",
        "/ad\tmin",
        "admin",
        "",
        "*",
        "http://shop.example/admin",
        "/admin;x",
        "/public/..;/admin",
        "/public/..%3b/admin",
    ] {
        assert_eq!(normalize(refused), None, "{refused:?}");
    }
    assert!(reference::order_sensitive("/a//../b"));
    assert!(!reference::order_sensitive("/a/../b"));
}

// ---------------------------------------------------------------------------------------
// Random intentions.
// ---------------------------------------------------------------------------------------

fn pick<'a, T: ?Sized>(rng: &mut StdRng, items: &[&'a T]) -> &'a T {
    items.choose(rng).expect("non-empty")
}

fn random_intentions(rng: &mut StdRng) -> Vec<ServiceIntentions> {
    let mut objects: Vec<ServiceIntentions> = Vec::new();
    for i in 0..OBJECTS_PER_ROUND {
        let own_namespace = if rng.random_bool(0.15) {
            CONTROL
        } else {
            *NAMESPACES.choose(rng).unwrap()
        };
        let destination = if !objects.is_empty() && rng.random_bool(0.25) {
            // A rival for an earlier object's destination: only the older one is in force.
            let earlier = &objects[rng.random_range(0..objects.len())];
            IntentionDestination {
                name: earlier.spec.destination.name.clone(),
                namespace: earlier.destination_namespace().map(str::to_owned),
            }
        } else {
            let name = if rng.random_bool(0.3) {
                "*".to_owned()
            } else {
                SERVICES.choose(rng).unwrap().1.to_owned()
            };
            let namespace = match rng.random_range(0..10) {
                0..5 => None,
                5..7 => Some(own_namespace.to_owned()),
                7..9 => Some(NAMESPACES.choose(rng).unwrap().to_string()),
                // `*` namespace: with an exact name, a shape Consul has no rank for.
                _ => Some("*".to_owned()),
            };
            IntentionDestination { name, namespace }
        };
        let dest_namespace = destination.namespace.clone().unwrap_or(own_namespace.to_owned());
        let mut seen = BTreeSet::new();
        let mut sources = Vec::new();
        for _ in 0..rng.random_range(1..=4) {
            let source = random_source(rng);
            // One entry per (namespace, name) pair, as the controller requires.
            let resolved = (
                source.namespace.clone().unwrap_or(dest_namespace.clone()),
                source.name.clone(),
            );
            if seen.insert(resolved) {
                sources.push(source);
            }
        }
        let mut obj = ServiceIntentions::new(
            &format!("si-{i}"),
            ServiceIntentionsSpec {
                destination,
                sources,
                jwt: None,
            },
        );
        obj.metadata.namespace = Some(own_namespace.to_owned());
        // Few distinct times, so age ties (broken by namespace/name) happen too.
        let created = *[1_000, 1_000, 2_000, 3_000].choose(rng).unwrap();
        obj.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        if rng.random_bool(0.05) {
            obj.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(4_000).unwrap()));
        }
        objects.push(obj);
    }
    objects
}

fn random_source(rng: &mut StdRng) -> IntentionSource {
    let namespace = match rng.random_range(0..10) {
        0..4 => None,
        4..8 => Some(NAMESPACES.choose(rng).unwrap().to_string()),
        _ => Some("*".to_owned()),
    };
    let mut name = RULE_NAMES.choose(rng).unwrap().to_string();
    // Mostly Consul's shapes: a `*` namespace goes with a `*` name.
    if namespace.as_deref() == Some("*") && rng.random_bool(0.7) {
        name = "*".into();
    }
    let mut source = IntentionSource {
        name,
        namespace,
        ..Default::default()
    };
    if rng.random_bool(0.35) {
        source.action = Some(random_action(rng, 0.6));
    } else {
        source.permissions = Some(
            (0..rng.random_range(1..=4))
                .map(|_| random_permission(rng))
                .collect(),
        );
    }
    source
}

fn random_action(rng: &mut StdRng, allow: f64) -> IntentionAction {
    if rng.random_bool(allow) {
        IntentionAction::Allow
    } else {
        IntentionAction::Deny
    }
}

fn random_permission(rng: &mut StdRng) -> IntentionPermission {
    let mut http = HttpMatch::default();
    let exact = [
        "/admin",
        "/orders",
        "/v1/items",
        "/",
        "/ADMIN",
        "/admin/",
        "/public/a",
        "/caf%C3%A9",
        "/x;y",
        "/admin;x",
    ];
    let prefix = ["/admin", "/public", "/", "/api/", "/v", "/adm", "/caf", "/orders"];
    let regex = [
        "/v[0-9]+/items",
        "/admin.*",
        "/(public|api)/.*",
        "/caf%C3%A9",
        "/[a-z]+",
        "/ADMIN|/admin",
        ".*admin.*",
        "/[^/]*/items(/.*)?",
    ];
    match rng.random_range(0..4) {
        0 => http.path_exact = Some(pick(rng, &exact).into()),
        1 => http.path_prefix = Some(pick(rng, &prefix).into()),
        2 => http.path_regex = Some(pick(rng, &regex).into()),
        _ => {}
    }
    if rng.random_bool(0.4) {
        let all = [
            HttpMethod::Get,
            HttpMethod::Post,
            HttpMethod::Delete,
            HttpMethod::Head,
            HttpMethod::Put,
            HttpMethod::Patch,
        ];
        let count = rng.random_range(1..=3);
        http.methods = all.choose_multiple(rng, count).copied().collect();
    }
    if rng.random_bool(0.45) {
        http.header = (0..rng.random_range(1..=2)).map(|_| random_header(rng)).collect();
    }
    IntentionPermission {
        action: random_action(rng, 0.6),
        http,
        jwt: None,
    }
}

fn random_header(rng: &mut StdRng) -> HttpHeaderMatch {
    let name = pick(rng, &["Host", "host", "HOST", "X-Role", "x-role", "X-Debug"]);
    let host = name.eq_ignore_ascii_case("host");
    let (values, regexes): (&[&str], &[&str]) = if host {
        (
            &[
                "shop.example",
                "Shop.Example",
                "SHOP.example",
                "evil.example",
                "shop.",
                "example",
                "EXAMPLE",
            ],
            &[
                "shop\\.example",
                "Shop\\.Example",
                "[a-z]+\\.example",
                "(shop|evil)\\.EXAMPLE",
                "[A-Z].*",
            ],
        )
    } else if name.eq_ignore_ascii_case("x-role") {
        (
            &["clerk", "CLERK", "cl", "erk", "guest", ""],
            &["clerk|admin", "[a-z]+", "c.*k"],
        )
    } else {
        (&["1", "0", ""], &["[01]", "1+"])
    };
    let mut h = HttpHeaderMatch {
        name: name.into(),
        ..Default::default()
    };
    match rng.random_range(0..20) {
        0..4 => h.present = Some(true),
        4..9 => h.exact = Some(pick(rng, values).into()),
        9..12 => h.prefix = Some(pick(rng, values).into()),
        12..15 => h.suffix = Some(pick(rng, values).into()),
        _ => h.regex = Some(pick(rng, regexes).into()),
    }
    if rng.random_bool(0.25) {
        h.invert = Some(true);
    }
    h
}

// ---------------------------------------------------------------------------------------
// The request corpus (M3 paths, M4 hosts, M5 headers, methods in several cases).
// ---------------------------------------------------------------------------------------

struct Entry {
    method: &'static str,
    target: String,
    headers: &'static [(&'static str, &'static str)],
}

const HEADER_SETS: &[&[(&str, &str)]] = &[
    &[],
    &[("Host", "shop.example")],
    &[("host", "SHOP.EXAMPLE")],
    &[("HOST", "Shop.Example")],
    &[("host", "evil.example")],
    &[("hOsT", "EVIL.example")],
    &[("Host", "shop.example"), ("host", "evil.example")],
    &[("host", "evil.example"), ("Host", "shop.example")],
    &[("host", "shop.example:8080")],
    &[("host", "evil.example.")],
    &[("Host", "EVIL.example:80")],
    &[("host", "evil.example.:8080")],
    &[("host", "shop.example.")],
    // A rule's own value is never folded: `shop.` must not become a prefix `shop`.
    &[("host", "shopx.evil")],
    &[("host", "shop.:8443")],
    &[("x-role", "clerk")],
    &[("X-ROLE", "CLERK")],
    &[("x-role", "clerk"), ("X-Role", "guest")],
    &[("x-role", "guest"), ("x-role", "clerk")],
    &[("x-role", "")],
    &[("x-role", "clerk,guest")],
    &[("x-role", "superclerk")],
    &[("x-role", "clerk-admin")],
    &[("x-debug", "1")],
    &[("X-Debug", "")],
    &[("x-debug", "0"), ("X-DEBUG", "1")],
    &[("host", "shop.example"), ("x-role", "clerk")],
    &[("host", "SHOP.example"), ("x-role", "clerk"), ("x-debug", "1")],
    &[("Host", "Shop.Example"), ("X-Role", "clerk"), ("x-role", "clerk")],
];

const METHODS: &[&str] = &[
    "GET", "GET", "GET", "POST", "DELETE", "HEAD", "PUT", "PATCH", "OPTIONS", "get", "Get", "post", "delete",
    "FOO", "",
];

/// Every way of spelling a base path the corpus tries: RELIABILITY M3's list applied to
/// each base, plus dot segments, encodings, case, refusals and suffixes.
fn path_variants(base: &str) -> Vec<String> {
    let rest = &base[1..]; // the base without its leading '/'
    let mut first_encoded = String::from("/");
    let mut all_encoded = String::from("/");
    for (i, c) in rest.chars().enumerate() {
        if c.is_ascii_alphanumeric() {
            if i == 0 {
                first_encoded.push_str(&format!("%{:02x}", c as u32));
            } else {
                first_encoded.push(c);
            }
            all_encoded.push_str(&format!("%{:02X}", c as u32));
        } else {
            first_encoded.push(c);
            all_encoded.push(c);
        }
    }
    vec![
        base.to_owned(),
        format!("/{base}"),
        format!("///{rest}"),
        format!("/%2F{rest}"),
        format!("/%2f{rest}"),
        format!("\\{rest}"),
        format!("/\\{rest}"),
        format!("/%5C{rest}"),
        format!("/%5c{rest}"),
        format!("/a/../{rest}"),
        format!("/./{rest}"),
        format!("/x/y/../../{rest}"),
        format!("/a//../{rest}"),
        format!("/%2e%2e/{rest}"),
        format!("/%2E/{rest}"),
        format!("/.%2e/{rest}"),
        format!("/public/../{rest}"),
        format!("{base}#x"),
        format!("{base};x"),
        format!("/public/..;/{rest}"),
        format!("/public/..%3b/{rest}"),
        format!("/public/..%3B/{rest}"),
        format!("/public;x/../{rest}"),
        format!("{base}%3bx"),
        format!("{base}?q=1"),
        format!("{base}?q=/../admin#y"),
        format!("{base}/"),
        format!("{base}/."),
        format!("{base}/.."),
        format!("{base}/../admin"),
        format!("{base}%00"),
        format!("{base}%20"),
        format!("{base}%"),
        format!("{base}%zz"),
        format!("{base}%+1"),
        format!("{base} x"),
        format!("{base}\tx"),
        base.to_ascii_uppercase(),
        first_encoded,
        all_encoded,
        base.replace('/', "//"),
        format!("http://shop.example{base}"),
    ]
}

fn corpus(rng: &mut StdRng) -> Vec<Entry> {
    let bases = [
        "/admin",
        "/admin/users",
        "/public/a",
        "/orders",
        "/v1/items",
        "/v2/items/x",
        "/api/x",
        "/",
        "/caf%C3%A9",
        "/x;y",
    ];
    let extras = [
        "admin",
        "",
        "*",
        "/ａdmin",
        "/café",
        "/caf%c3%a9",
        "/%7Eadmin",
        "/admin%2F",
        "/ad%6din",
        "/%41DMIN",
        "/admin/./",
        "/adm",
        "/administrator",
    ];
    let mut paths: Vec<String> = Vec::new();
    let mut seen = BTreeSet::new();
    for p in bases
        .iter()
        .flat_map(|b| path_variants(b))
        .chain(extras.iter().map(|s| s.to_string()))
    {
        if seen.insert(p.clone()) {
            paths.push(p);
        }
    }
    let mut entries = Vec::new();
    for target in &paths {
        // A plain GET and a random method, each with a random header set.
        for method in ["GET", pick(rng, METHODS)] {
            entries.push(Entry {
                method,
                target: target.clone(),
                headers: HEADER_SETS.choose(rng).unwrap(),
            });
        }
    }
    // M4/M5 systematically: every header set on the paths header rules tend to guard.
    for target in ["/orders", "/v1/items", "/admin", "/public/a"] {
        for headers in HEADER_SETS {
            entries.push(Entry {
                method: "GET",
                target: target.into(),
                headers,
            });
        }
    }
    entries
}

// ---------------------------------------------------------------------------------------
// The gate.
// ---------------------------------------------------------------------------------------

/// Known bug KB-1, in mesh/src/decide.rs: a `host` header regex is matched, case-sensitively,
/// against the lower-cased value, while the README says `host` values compare
/// case-insensitively. A deny rule whose host pattern holds an upper-case letter (e.g.
/// `Evil\.Example`) never matches, so it is bypassed, and an inverted one always holds.
/// Divergences this explains are counted apart (the rest of the gate still holds) until
/// decide.rs is fixed; `G9_STRICT=1` fails on them too, and
/// `kb1_host_regex_compares_case_insensitively` below reproduces it.
const KB1: &str = "KB-1 (decide.rs: host regex matched case-sensitively against the lower-cased value)";

/// A count with the first few examples.
#[derive(Default)]
struct Examples {
    count: usize,
    first: Vec<String>,
}

impl Examples {
    fn add(&mut self, example: impl FnOnce() -> String) {
        self.count += 1;
        if self.first.len() < 10 {
            self.first.push(example());
        }
    }

    fn print(&self, label: &str) {
        for example in &self.first {
            println!("{label} {example}");
        }
    }
}

#[derive(Default)]
struct Tally {
    connections: usize,
    requests: usize,
    /// Allowed by capstan-mesh, denied by the reference: the gate.
    unauthorized: Examples,
    /// Unauthorized, and explained by KB-1.
    known_bug: Examples,
    /// Denied by capstan-mesh, allowed by the reference.
    over_denied: Examples,
    /// Requests the reference allows, by kind of rule (coverage).
    allowed_l4: usize,
    allowed_l7: usize,
    /// A request with a method not in upper case allowed while the same request in upper
    /// case is denied. Methods are case-sensitive (RFC 9110), so this is not a divergence
    /// from the README, but an application that upper-cases methods would see a request
    /// the rules meant to deny.
    method_case_widening: Examples,
}

#[test]
fn g9_no_unauthorized_connection_or_request() {
    let seed = std::env::var("G9_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEED);
    println!("G9 seed {seed} (G9_SEED=<u64> replays another, G9_DUMP=1 prints the intentions)");
    let mut rng = StdRng::seed_from_u64(seed);
    let corpus = corpus(&mut rng);
    assert!(corpus.len() >= 500, "the corpus has {} entries", corpus.len());
    // Normalization depends on the request only: once per entry.
    let normalized: Vec<Option<String>> = corpus
        .iter()
        .map(|e| reference::normalize_lenient(&e.target))
        .collect();
    let order_sensitive: BTreeSet<&str> = corpus
        .iter()
        .filter(|e| reference::order_sensitive(&e.target))
        .map(|e| e.target.as_str())
        .collect();
    let identities: Vec<(Identity, reference::Id<'_>)> = SERVICES
        .iter()
        .map(|(namespace, name)| {
            (
                Identity::new(*namespace, *name),
                reference::Id { namespace, name },
            )
        })
        .collect();

    let mut tally = Tally::default();
    let (mut intentions, mut in_force) = (0, 0);
    for round in 0..ROUNDS {
        let objects = random_intentions(&mut rng);
        if std::env::var_os("G9_DUMP").is_some() {
            // The round's objects, to read an example's rules.
            for obj in &objects {
                println!("round {round}: {}", serde_json::to_string(obj).unwrap());
            }
        }
        let policy = Policy::compile(&objects, false, CONTROL);
        let model = reference::Model::new(&objects);
        let model_kb1 = reference::Model::with_kb1(&objects);
        intentions += objects.len();
        in_force += model.in_force_count();
        for (src, ref_src) in &identities {
            for (dst, ref_dst) in &identities {
                let pair = || format!("round {round} {src} -> {dst}");

                // A connection to an HTTP destination.
                tally.connections += 1;
                let want = model.connection(ref_src, ref_dst);
                let got = policy.connection(src, dst);
                let got_class = match &got {
                    ConnectionDecision::Decided(d) if d.allow => reference::Connection::Allow,
                    ConnectionDecision::Decided(_) => reference::Connection::Deny,
                    ConnectionDecision::PerRequest { .. } => reference::Connection::PerRequest,
                };
                if got_class != want {
                    let example = || format!("{}: HTTP connection: mesh {got:?}, reference {want:?}", pair());
                    // Accepting where the reference refuses, or deciding at L4 what must be
                    // decided per request, lets through what the rules deny.
                    if want == reference::Connection::Deny || got_class == reference::Connection::Allow {
                        tally.unauthorized.add(example);
                    } else {
                        tally.over_denied.add(example);
                    }
                }

                // A connection to a plain-TCP destination.
                tally.connections += 1;
                let want = model.tcp_connection(ref_src, ref_dst);
                let got = policy.tcp_connection(src, dst);
                if got.allow != want {
                    let example =
                        || format!("{}: TCP connection: mesh {got}, reference allow={want}", pair());
                    if got.allow {
                        tally.unauthorized.add(example);
                    } else {
                        tally.over_denied.add(example);
                    }
                }

                // Every corpus request.
                for (entry, path) in corpus.iter().zip(&normalized) {
                    tally.requests += 1;
                    let request = Request {
                        method: entry.method,
                        target: &entry.target,
                        headers: entry.headers,
                    };
                    let got = policy.request(src, dst, &request);
                    let decide = |model: &reference::Model<'_>| {
                        model.request(ref_src, ref_dst, entry.method, path.as_deref(), entry.headers)
                    };
                    let (want, why) = decide(&model);
                    if want {
                        if why.contains("permissions[") {
                            tally.allowed_l7 += 1;
                        } else {
                            tally.allowed_l4 += 1;
                        }
                    }
                    if got.allow != want {
                        let example = || {
                            format!(
                                "{}: {} {:?} headers {:?} (normalized {path:?}): mesh {got}, reference {} by {why}",
                                pair(),
                                entry.method,
                                entry.target,
                                entry.headers,
                                if want { "ALLOW" } else { "DENY" }
                            )
                        };
                        // Only a bypass can be KB-1's (an over-denial matching it is chance).
                        if got.allow && decide(&model_kb1).0 {
                            tally.known_bug.add(example);
                        } else if got.allow {
                            tally.unauthorized.add(example);
                        } else {
                            tally.over_denied.add(example);
                        }
                    }
                    let upper = entry.method.to_ascii_uppercase();
                    if got.allow && upper != entry.method {
                        let as_upper = policy.request(
                            src,
                            dst,
                            &Request {
                                method: &upper,
                                ..request
                            },
                        );
                        if !as_upper.allow {
                            tally.method_case_widening.add(|| {
                                format!(
                                    "{}: {} {:?} headers {:?}: {got}; as {upper}: {as_upper}",
                                    pair(),
                                    entry.method,
                                    entry.target,
                                    entry.headers
                                )
                            });
                        }
                    }
                }
            }
        }
    }

    let attempts = tally.connections + tally.requests;
    tally.unauthorized.print("UNAUTHORIZED");
    tally.over_denied.print("OVER-DENIED");
    tally.known_bug.print("KB-1");
    tally.method_case_widening.print("METHOD-CASE");
    println!(
        "corpus paths whose normalization depends on the order of merging slashes and resolving dot \
         segments (the README leaves it open; both orders are safe since the normalized path is \
         forwarded): {}, e.g. {:?}",
        order_sensitive.len(),
        order_sensitive.iter().take(3).collect::<Vec<_>>()
    );
    if tally.known_bug.count > 0 {
        println!("{} divergences explained by {KB1}", tally.known_bug.count);
    }
    println!(
        "G9: attempts={attempts} (connections={}, requests={}), services={}, rounds={ROUNDS}, \
         intentions={intentions} (in force {in_force}), corpus={}, reference allowed {} by L4 and {} by L7, \
         unauthorized={}, divergences={} (over-denied {}, KB-1 {}), method-case widenings={}",
        tally.connections,
        tally.requests,
        SERVICES.len(),
        corpus.len(),
        tally.allowed_l4,
        tally.allowed_l7,
        tally.unauthorized.count,
        tally.unauthorized.count + tally.over_denied.count + tally.known_bug.count,
        tally.over_denied.count,
        tally.known_bug.count,
        tally.method_case_widening.count,
    );
    assert!(attempts >= 100_000, "only {attempts} attempts");
    assert_eq!(
        tally.unauthorized.count, 0,
        "capstan-mesh allowed what the documented semantics deny (seed {seed}); examples above"
    );
    // KB-1 is fixed in decide.rs: host patterns now compare case-insensitively.
    assert_eq!(tally.known_bug.count, 0, "{KB1}; examples above");
}

/// KB-1 on its own: a deny rule on the Host `Evil\.Example` must stop `evil.example` in
/// any case (README: `host` values compare case-insensitively; M4). Ignored until
/// decide.rs compiles host patterns case-insensitively.
#[test]
fn kb1_host_regex_compares_case_insensitively() {
    let mut obj = ServiceIntentions::new(
        "api",
        ServiceIntentionsSpec {
            destination: IntentionDestination {
                name: "api".into(),
                namespace: None,
            },
            sources: vec![IntentionSource {
                name: "web".into(),
                permissions: Some(vec![
                    IntentionPermission {
                        action: IntentionAction::Deny,
                        http: HttpMatch {
                            header: vec![HttpHeaderMatch {
                                name: "Host".into(),
                                regex: Some("Evil\\.Example".into()),
                                ..Default::default()
                            }],
                            ..Default::default()
                        },
                        jwt: None,
                    },
                    IntentionPermission {
                        action: IntentionAction::Allow,
                        http: HttpMatch::default(),
                        jwt: None,
                    },
                ]),
                ..Default::default()
            }],
            jwt: None,
        },
    );
    obj.metadata.namespace = Some("shop".into());
    obj.metadata.creation_timestamp = Some(Time(Timestamp::from_second(1_000).unwrap()));
    let policy = Policy::compile(&[obj], false, CONTROL);
    for host in ["evil.example", "Evil.Example", "EVIL.EXAMPLE"] {
        let decision = policy.request(
            &Identity::new("shop", "web"),
            &Identity::new("shop", "api"),
            &Request {
                method: "GET",
                target: "/",
                headers: &[("host", host)],
            },
        );
        assert!(!decision.allow, "Host {host}: {decision}");
    }
}

/// The corpus through capstan-mesh's public normalizer and the model's: the same path, or
/// both refuse. A path the mesh accepts and the model refuses is how a refused spelling
/// (M3) would reach a rule; any other difference would make some rule decide differently.
#[test]
fn normalization_agrees_on_the_corpus() {
    let corpus = corpus(&mut StdRng::seed_from_u64(SEED));
    let mut refused = 0;
    let mut differences = Vec::new();
    for entry in &corpus {
        let mesh = capstan_mesh::path::normalize(&entry.target).ok();
        let model = reference::normalize(&entry.target);
        refused += usize::from(model.is_none());
        if mesh != model {
            differences.push(format!("{:?}: mesh {mesh:?}, model {model:?}", entry.target));
        }
    }
    println!(
        "normalization corpus: {} requests, {refused} refused, {} differences",
        corpus.len(),
        differences.len()
    );
    assert!(differences.is_empty(), "{differences:#?}");
}
