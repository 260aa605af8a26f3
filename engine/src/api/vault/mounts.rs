//! The mounts of the Vault-compatible API and what each declares about its own paths:
//! its named routes (resolved once, before the ACL, by `route::resolve`), how a path is
//! let in (`Access`: the paths it serves without a token, the paths that need `sudo`),
//! whether a write creates or updates (its existence check), and its handler. The
//! pipeline (`pipeline`) asks the mount and holds no mount's special cases itself.
//!
//! The set of mounts is fixed, so a mount is an enum and every question is a `match`:
//! static dispatch, no boxed trait objects on the request path.

use super::{ApiError, Engine, Operation, Reply, Request, auth, database, kv, pki, route::Tail, sys};
use axum::http::StatusCode;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mount {
    Sys,
    Token,
    Kubernetes,
    Database,
    Pki,
    Kv,
}

/// How a request on a path is let in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Served sealed or not, without a token, and not audited (Vault's unauthenticated
    /// sys paths: init, unseal, seal status, health, leader).
    Open,
    /// Served without a token once unsealed, and audited (logging in; a PKI mount's
    /// public CA certificate).
    Unauthenticated,
    /// A usable token, whatever its policies say of the path: the handler itself checks
    /// what the token may see (Vault's `sys/internal/ui/mounts/<path>`).
    Token,
    /// A usable token whose policies allow the operation on the path, and `sudo` on it
    /// when `sudo`.
    Acl { sudo: bool },
}

impl Access {
    /// A mount's paths are unauthenticated where it lists them (whatever the operation),
    /// and need a token and the ACL elsewhere.
    fn unauthenticated_in(paths: &[&str], rest: &str) -> Self {
        if paths.contains(&rest) {
            Self::Unauthenticated
        } else {
            Self::Acl { sudo: false }
        }
    }
}

/// The paths of the secrets mounts, which the operator chooses.
#[derive(Clone, Copy, Debug)]
pub struct Names<'a> {
    pub database: &'a str,
    pub pki: &'a str,
    pub kv: &'a str,
}

impl<'a> Names<'a> {
    pub fn of(engine: &'a Engine) -> Self {
        Self {
            database: engine.database.mount(),
            pki: engine.pki.mount(),
            kv: engine.kv.mount(),
        }
    }
}

impl Mount {
    /// The mount `path` is under, and the part of `path` below it.
    pub fn find<'a>(names: &Names<'_>, path: &'a str) -> Option<(Self, &'a str)> {
        if let Some(rest) = path.strip_prefix("sys/") {
            return Some((Self::Sys, rest));
        }
        if let Some(rest) = path.strip_prefix("auth/token/") {
            return Some((Self::Token, rest));
        }
        if let Some(rest) = path.strip_prefix("auth/kubernetes/") {
            return Some((Self::Kubernetes, rest));
        }
        let below = |mount: &str| path.strip_prefix(mount).and_then(|rest| rest.strip_prefix('/'));
        [
            (Self::Database, names.database),
            (Self::Pki, names.pki),
            (Self::Kv, names.kv),
        ]
        .into_iter()
        .find_map(|(mount, name)| below(name).map(|rest| (mount, rest)))
    }

    /// The routes that take a name or a path after a fixed prefix (relative to the mount).
    pub fn routes(self) -> &'static [(&'static str, Tail)] {
        match self {
            Self::Sys => sys::ROUTES,
            Self::Token => auth::TOKEN_ROUTES,
            Self::Kubernetes => auth::KUBERNETES_ROUTES,
            Self::Database => database::ROUTES,
            Self::Pki => pki::ROUTES,
            Self::Kv => kv::ROUTES,
        }
    }

    /// How `operation` on `rest` (below the mount) is let in.
    pub fn access(self, rest: &str, operation: Operation) -> Access {
        match self {
            Self::Sys => sys::access(rest, operation),
            Self::Kubernetes => Access::unauthenticated_in(auth::KUBERNETES_UNAUTHENTICATED, rest),
            Self::Pki => Access::unauthenticated_in(pki::UNAUTHENTICATED, rest),
            Self::Token | Self::Database | Self::Kv => Access::Acl { sudo: false },
        }
    }

    /// Whether a create-or-update on `rest` targets something that exists (None: the
    /// mount does not tell the two apart, so a write is an update, as in Vault).
    pub async fn exists(self, engine: &Engine, rest: &str) -> Result<Option<bool>, ApiError> {
        match self {
            Self::Kv => kv::exists(engine, rest).await,
            _ => Ok(None),
        }
    }

    /// Serves a request the pipeline let in.
    pub async fn serve(self, engine: &Engine, request: &Request, rest: &str) -> Result<Reply, ApiError> {
        match self {
            Self::Sys => sys::route(engine, request, rest).await,
            Self::Token => auth::token(engine, request, rest).await,
            Self::Kubernetes => auth::kubernetes(engine, request, rest).await,
            Self::Database => database::route(engine, request, rest).await,
            Self::Pki => pki::route(engine, request, rest).await,
            Self::Kv => kv::route(engine, request, rest).await,
        }
    }
}

/// The answer to a path under no mount.
pub fn no_handler(path: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no handler for route \"{path}\". route entry not found."),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: Names<'static> = Names {
        database: "database",
        pki: "pki",
        kv: "secret",
    };

    fn access(path: &str, operation: Operation) -> Option<(Mount, Access)> {
        Mount::find(&NAMES, path).map(|(mount, rest)| (mount, mount.access(rest, operation)))
    }

    #[test]
    fn each_mount_declares_how_its_paths_are_let_in() {
        use Access::*;
        use Operation::*;
        let acl = Acl { sudo: false };
        let sudo = Acl { sudo: true };
        for path in [
            "sys/init",
            "sys/seal-status",
            "sys/unseal",
            "sys/health",
            "sys/leader",
        ] {
            assert_eq!(access(path, update), Some((Mount::Sys, Open)), "{path}");
        }
        assert_eq!(
            access("auth/kubernetes/login", update),
            Some((Mount::Kubernetes, Unauthenticated))
        );
        assert_eq!(
            access("auth/kubernetes/role/x", update),
            Some((Mount::Kubernetes, acl))
        );
        assert_eq!(
            access("auth/kubernetes/revoke-pod", update),
            Some((Mount::Kubernetes, acl))
        );
        assert_eq!(access("pki/cert/ca", read), Some((Mount::Pki, Unauthenticated)));
        assert_eq!(access("pki/issue/web", update), Some((Mount::Pki, acl)));
        assert_eq!(
            access("sys/internal/ui/mounts/secret", read),
            Some((Mount::Sys, Token))
        );
        assert_eq!(
            access("sys/internal/ui/mounts/secret", update),
            Some((Mount::Sys, acl))
        );
        for path in [
            "sys/seal",
            "sys/rotate",
            "sys/audit-hash/file",
            "sys/leases/revoke-prefix/database/creds/ro",
            "sys/leases/revoke-force/database/creds/ro",
        ] {
            assert_eq!(access(path, update), Some((Mount::Sys, sudo)), "{path}");
        }
        assert_eq!(access("sys/leases/revoke", update), Some((Mount::Sys, acl)));
        assert_eq!(access("auth/token/create", update), Some((Mount::Token, acl)));
        assert_eq!(access("secret/data/app", update), Some((Mount::Kv, acl)));
        assert_eq!(access("database/creds/ro", read), Some((Mount::Database, acl)));
        // Under no mount: a token and the ACL, then the 404 of no handler.
        assert_eq!(access("secret-pki/x", read), None);
        assert_eq!(access("sys", read), None);
    }
}
