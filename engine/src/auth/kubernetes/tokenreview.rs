//! Who is asking: the caller's projected ServiceAccount token, checked by the API server
//! (TokenReview) for our audience. The token itself is never logged nor echoed. Both
//! Kubernetes logins (`auth/kubernetes/login`) and the mesh CA's `sign` trust a caller
//! only through this check.

use crate::mesh_ca::signing::WorkloadIdentity;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{Api, Client, api::PostParams};

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub identity: WorkloadIdentity,
    /// The ServiceAccount's UID (DESIGN decision 6: identities are bound to it; a
    /// ServiceAccount deleted and re-created under the same name gets another UID).
    pub uid: String,
    /// The pod the token is bound to, when it is a bound token.
    pub pod: Option<String>,
    /// That pod's UID (a pod re-created under the same name is another pod).
    pub pod_uid: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no bearer token: send the projected ServiceAccount token as `Authorization: Bearer <token>`")]
    Missing,
    #[error("the token was not accepted (invalid, expired, or not issued for audience {0})")]
    Rejected(String),
    #[error("the token is valid but not for audience {0}")]
    Audience(String),
    #[error("the token belongs to {0:?}, which is not a ServiceAccount")]
    NotServiceAccount(String),
    #[error("the token could not be checked now: {0}")]
    Unavailable(String),
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(header: Option<&str>) -> Result<&str, AuthError> {
    let value = header.ok_or(AuthError::Missing)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Missing)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(token)
}

/// The caller a TokenReview status proves, for `audience`.
pub fn caller_from_status(status: &TokenReviewStatus, audience: &str) -> Result<Caller, AuthError> {
    if status.authenticated != Some(true) {
        return Err(AuthError::Rejected(audience.to_owned()));
    }
    // The API server returns the audiences the token is valid for among those we asked;
    // an authenticator that ignores audiences returns none, which we do not accept.
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == audience))
    {
        return Err(AuthError::Audience(audience.to_owned()));
    }
    let user = status
        .user
        .as_ref()
        .ok_or_else(|| AuthError::Rejected(audience.to_owned()))?;
    let username = user.username.clone().unwrap_or_default();
    let identity = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
        .map(|(ns, sa)| WorkloadIdentity {
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
        })
        .ok_or_else(|| AuthError::NotServiceAccount(username.clone()))?;
    let uid = user
        .uid
        .clone()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| AuthError::NotServiceAccount(username.clone()))?;
    let pod = user
        .extra
        .as_ref()
        .and_then(|extra| extra.get("authentication.kubernetes.io/pod-name"))
        .and_then(|names| names.first().cloned());
    let pod_uid = user
        .extra
        .as_ref()
        .and_then(|extra| extra.get("authentication.kubernetes.io/pod-uid"))
        .and_then(|uids| uids.first().cloned());
    Ok(Caller {
        identity,
        uid,
        pod,
        pod_uid,
    })
}

/// Checks tokens with the TokenReview API.
#[derive(Clone)]
pub struct TokenReviewer {
    api: Api<TokenReview>,
    audience: String,
}

impl TokenReviewer {
    pub fn new(client: Client, audience: String) -> Self {
        Self {
            api: Api::all(client),
            audience,
        }
    }

    pub fn audience(&self) -> &str {
        &self.audience
    }

    pub async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        self.review_for(token, &self.audience).await
    }

    /// Checks `token` for `audience` (the secrets engine's auth roles each name theirs).
    pub async fn review_for(&self, token: &str, audience: &str) -> Result<Caller, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![audience.to_owned()]),
            },
            ..Default::default()
        };
        let reviewed = self
            .api
            .create(&PostParams::default(), &review)
            .await
            // kube's error text is the API server's status message: never the token.
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let status = reviewed.status.unwrap_or_default();
        if let Some(error) = status.error.as_deref().filter(|e| !e.is_empty()) {
            tracing::debug!(%error, "TokenReview refused a token");
        }
        caller_from_status(&status, audience)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn status(authenticated: bool, audiences: &[&str], username: &str) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(username.into()),
                uid: Some("0b7d-uid".into()),
                extra: Some(
                    [(
                        "authentication.kubernetes.io/pod-name".to_owned(),
                        vec!["web-1".to_owned()],
                    )]
                    .into(),
                ),
                ..Default::default()
            }),
            error: None,
        }
    }

    const AUD: &str = "capstan-mesh-ca";

    #[test]
    fn a_serviceaccount_token_for_our_audience_is_its_identity() {
        let caller =
            caller_from_status(&status(true, &[AUD], "system:serviceaccount:shop:web"), AUD).unwrap();
        assert_eq!(
            caller,
            Caller {
                identity: WorkloadIdentity {
                    namespace: "shop".into(),
                    service_account: "web".into()
                },
                uid: "0b7d-uid".into(),
                pod: Some("web-1".into()),
                pod_uid: None,
            }
        );
    }

    #[test]
    fn everything_else_is_refused() {
        assert_eq!(
            caller_from_status(&status(false, &[AUD], "system:serviceaccount:shop:web"), AUD),
            Err(AuthError::Rejected(AUD.into()))
        );
        assert_eq!(
            caller_from_status(&status(true, &["other"], "system:serviceaccount:shop:web"), AUD),
            Err(AuthError::Audience(AUD.into()))
        );
        assert_eq!(
            caller_from_status(&status(true, &[], "system:serviceaccount:shop:web"), AUD),
            Err(AuthError::Audience(AUD.into()))
        );
        for user in [
            "alice",
            "system:serviceaccount:shop",
            "system:serviceaccount::web",
            "system:serviceaccount:shop:web:x",
            "system:node:n1",
        ] {
            assert!(
                matches!(
                    caller_from_status(&status(true, &[AUD], user), AUD),
                    Err(AuthError::NotServiceAccount(_))
                ),
                "{user}"
            );
        }
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Ok("abc"));
        assert_eq!(bearer(None), Err(AuthError::Missing));
        assert_eq!(bearer(Some("Basic abc")), Err(AuthError::Missing));
        assert_eq!(bearer(Some("Bearer ")), Err(AuthError::Missing));
    }
}
