//! The one place a request path is resolved into the object it names (V20). The ACL
//! judges the request's path and the handler acts on the name resolved here (each mount
//! declares its named routes: `Mount::routes`), so the two
//! can only disagree if this function does: a path is either canonical (one name segment
//! where a route expects a name, a name spelled exactly as it is stored) or refused with
//! 400 before any ACL check. Nothing is normalized into something else: `team-x/admin`
//! under `sys/policies/acl/` is not the policy `admin`, and `Team-X` is not `team-x`.
//!
//! `check_path` (in `pipeline.rs`) has already refused `.`, `..`, empty segments,
//! percent-encoding, backslashes and control characters everywhere.

use super::{ApiError, Operation, mounts::Mount};

/// What follows a route's prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tail {
    /// Exactly one name segment, as `storage::valid_name` allows (policies: as
    /// `policy::check_name` allows). `lower`: the store keeps names lowercased, so a name
    /// with an uppercase letter would reach another object than the one the ACL judged;
    /// it is refused.
    Name { lower: bool },
    /// One or more segments the handler uses whole (KV keys, lease ids and prefixes).
    Path,
    /// A path a read-only route looks up (`sys/internal/ui/mounts/secret/app/`), where a
    /// trailing slash means nothing.
    Lookup,
}

/// Resolves `path` for `operation`, or refuses it (400) when it is not canonical: the
/// name or key it names, if its route takes one (`sys/policies/acl/app` names `app`; a
/// LIST keeps its trailing slash). `found` is the mount `path` is under and the part of
/// `path` below it (`Mount::find`, which the caller has already asked).
pub fn resolve<'a>(
    found: Option<(Mount, &'a str)>,
    path: &str,
    operation: Operation,
) -> Result<Option<&'a str>, ApiError> {
    let Some((mount, rest)) = found else {
        return Ok(None);
    };
    let refuse = |why: &str| {
        Err(ApiError::bad_request(format!(
            "invalid request path {path:?}: {why}"
        )))
    };
    let list = operation == Operation::list;
    for (prefix, tail) in mount.routes() {
        let Some(after) = rest.strip_prefix(prefix) else {
            continue;
        };
        // Only a LIST names a folder (a trailing slash); nothing else ends in one.
        let bare = match after.strip_suffix('/') {
            Some(bare) if list || *tail == Tail::Lookup => bare,
            Some(_) => return refuse("a trailing slash names a folder, which only LIST takes"),
            None => after,
        };
        if bare.is_empty() {
            // The collection itself (`LIST sys/policies/acl/`).
            if list {
                return Ok(None);
            }
            return refuse("the name is missing");
        }
        match tail {
            Tail::Name { lower } => {
                if bare.contains('/') {
                    return refuse("this route takes exactly one name segment");
                }
                let valid = if *lower {
                    crate::policy::check_name(bare).is_ok_and(|canonical| canonical == bare)
                } else {
                    crate::store::storage::valid_name(bare)
                };
                if !valid {
                    return refuse(if *lower {
                        "names are lowercase ASCII letters, digits, '-', '_', '.' and '@'"
                    } else {
                        "names are ASCII letters, digits, '-', '_' and '.'"
                    });
                }
            }
            // check_path has refused empty, `.` and `..` segments.
            Tail::Path | Tail::Lookup => {}
        }
        return Ok(Some(after));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::vault::mounts::Names;

    const MOUNTS: Names<'static> = Names {
        database: "database",
        pki: "pki",
        kv: "secret",
    };

    fn name(path: &str, op: Operation) -> Result<Option<&str>, u16> {
        resolve(Mount::find(&MOUNTS, path), path, op).map_err(|e| e.status.as_u16())
    }

    #[test]
    fn one_name_segment_where_a_route_takes_a_name() {
        use Operation::*;
        for (path, op) in [
            ("sys/policies/acl/team-x/admin", update),
            ("sys/policies/acl/team-x/", update),
            ("sys/policies/acl/", update),
            ("sys/policies/acl/Admin", update),
            ("sys/policies/acl/ADMIN", read),
            ("sys/policy/team-x/admin", delete),
            ("sys/policy/Admin", update),
            ("auth/kubernetes/role/a/b", update),
            ("auth/kubernetes/role/a/", read),
            ("database/roles/team-x/admin", update),
            ("database/creds/a/b", read),
            ("database/config/a b", update),
            ("pki/roles/team-x/admin", update),
            ("pki/issue/a/b", update),
            ("secret/data/app/", update),
            ("secret/data/", read),
            ("sys/audit-hash/file/x", update),
        ] {
            assert_eq!(name(path, op), Err(400), "{path} {op:?}");
        }
    }

    #[test]
    fn canonical_paths_resolve_to_their_last_segment_or_key() {
        use Operation::*;
        assert_eq!(name("sys/policies/acl/team-x", update), Ok(Some("team-x")));
        assert_eq!(name("sys/policy/ops@corp", read), Ok(Some("ops@corp")));
        assert_eq!(name("sys/policies/acl/", list), Ok(None));
        assert_eq!(name("sys/policies/acl", list), Ok(None));
        assert_eq!(name("auth/kubernetes/role/App", read), Ok(Some("App")));
        assert_eq!(name("database/roles/ro", update), Ok(Some("ro")));
        assert_eq!(name("pki/issue/web", update), Ok(Some("web")));
        assert_eq!(name("secret/data/team/app", update), Ok(Some("team/app")));
        assert_eq!(name("secret/metadata/team/", list), Ok(Some("team/")));
        assert_eq!(
            name("sys/leases/revoke/database/creds/ro/abc", update),
            Ok(Some("revoke/database/creds/ro/abc"))
        );
        assert_eq!(name("sys/internal/ui/mounts/secret/", read), Ok(Some("secret/")));
        assert_eq!(name("sys/seal", update), Ok(None));
        assert_eq!(name("elsewhere/x/y", update), Ok(None));
    }
}
