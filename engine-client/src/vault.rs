//! Typed calls of the engine's Vault-compatible API, for what Capstan's callers use.
//!
//! Answers are read from `serde_json::Value` by hand rather than deserialized into typed
//! structs: serde's messages about a typed field can quote the input, and the input here
//! is tokens and secrets. Every call redacts the token and lease id it sends from its
//! errors.

use crate::{Auth, Client, Error};
use http::Method;
use serde_json::{Map, Value, json};
use std::time::Duration;

/// A login's or a renewal's token (never logged: no Debug).
pub struct Login {
    pub token: String,
    pub ttl: Duration,
    pub renewable: bool,
}

/// A token's new TTL after a renewal (of the token or of a lease).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewed {
    pub ttl: Duration,
    pub renewable: bool,
}

/// A KV v2 entry (no Debug: it holds secret values).
pub struct KvEntry {
    pub data: Map<String, Value>,
    pub version: i64,
    /// When this version was written (the engine's clock, RFC 3339).
    pub created_time: Option<String>,
}

/// A leased answer: database credentials, a PKI certificate (no Debug: secret values).
pub struct Leased {
    pub lease_id: Option<String>,
    pub ttl: Duration,
    pub renewable: bool,
    pub data: Map<String, Value>,
}

/// A PKI issue request.
pub struct PkiIssue<'a> {
    pub common_name: &'a str,
    pub alt_names: &'a [String],
    pub ttl: Option<&'a str>,
}

/// The path auth/token/revoke-self, for capability checks.
pub const REVOKE_SELF: &str = "auth/token/revoke-self";
/// The path that revokes a stopped pod's credentials (RELIABILITY N2).
pub const REVOKE_POD: &str = "auth/kubernetes/revoke-pod";

/// What `auth/kubernetes/revoke-pod` revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodRevoked {
    /// The pod's logins and the tokens created under them.
    pub tokens: u64,
    /// Their leases (one the backend refused is retried by the engine, never dropped).
    pub leases: u64,
}

impl Client {
    /// `auth/<mount>/login` with a ServiceAccount token for `role`.
    pub async fn login(&self, mount: &str, role: &str, jwt: &str) -> Result<Login, Error> {
        let path = format!("auth/{mount}/login");
        let body = self
            .call_redacting(
                Method::POST,
                &path,
                Auth::None,
                Some(&json!({"role": role, "jwt": jwt})),
                &[jwt],
            )
            .await?;
        let auth = &body["auth"];
        let token = auth["client_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| protocol(&path, "no auth.client_token"))?;
        Ok(Login {
            token: token.to_owned(),
            ttl: seconds(&auth["lease_duration"]),
            renewable: auth["renewable"].as_bool().unwrap_or(false),
        })
    }

    /// `auth/token/lookup-self`: the token's own description (`data`).
    pub async fn lookup_self(&self, token: &str) -> Result<Value, Error> {
        let body = self
            .call(Method::GET, "auth/token/lookup-self", Some(token), None)
            .await?;
        Ok(body["data"].clone())
    }

    /// Extends the token itself (`auth/token/renew-self`) by `increment`.
    pub async fn renew_self(&self, token: &str, increment: Duration) -> Result<Renewed, Error> {
        let path = "auth/token/renew-self";
        let body = self
            .call(
                Method::PUT,
                path,
                Some(token),
                Some(&json!({"increment": increment.as_secs()})),
            )
            .await?;
        Ok(Renewed {
            ttl: Duration::from_secs(
                body["auth"]["lease_duration"]
                    .as_u64()
                    .ok_or_else(|| protocol(path, "no auth.lease_duration"))?,
            ),
            renewable: body["auth"]["renewable"].as_bool().unwrap_or(false),
        })
    }

    /// Revokes the token itself (`auth/token/revoke-self`), and with it its leases.
    pub async fn revoke_self(&self, token: &str) -> Result<(), Error> {
        self.call(Method::PUT, REVOKE_SELF, Some(token), None)
            .await
            .map(drop)
    }

    /// Revokes every token issued to the pod with UID `pod_uid` (logins with its bound
    /// ServiceAccount token), their children and their leases. Idempotent: a pod with
    /// nothing left answers zeros.
    pub async fn revoke_pod(&self, token: &str, pod_uid: &str) -> Result<PodRevoked, Error> {
        let body = self
            .call(
                Method::POST,
                REVOKE_POD,
                Some(token),
                Some(&json!({ "pod_uid": pod_uid })),
            )
            .await?;
        let count = |field: &str| {
            body["data"][field]
                .as_u64()
                .ok_or_else(|| protocol(REVOKE_POD, &format!("no data.{field}")))
        };
        Ok(PodRevoked {
            tokens: count("revoked_tokens")?,
            leases: count("revoked_leases")?,
        })
    }

    /// `sys/capabilities-self`: the token's capabilities on `path`.
    pub async fn capabilities_self(&self, token: &str, path: &str) -> Result<Vec<String>, Error> {
        let body = self
            .call(
                Method::POST,
                "sys/capabilities-self",
                Some(token),
                Some(&json!({ "paths": [path] })),
            )
            .await?;
        // Vault puts the list under `data.<path>` and at the top level too.
        Ok([&body["data"][path], &body[path]]
            .into_iter()
            .find_map(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect())
    }

    /// A KV v2 entry: `<mount>/data/<key>`, its latest version or `version`.
    pub async fn kv_read(
        &self,
        token: &str,
        mount: &str,
        key: &str,
        version: Option<i64>,
    ) -> Result<KvEntry, Error> {
        let path = format!("{mount}/data/{key}");
        let query = version.map(|v| format!("?version={v}")).unwrap_or_default();
        let mut body = self
            .call(Method::GET, &format!("{path}{query}"), Some(token), None)
            .await?;
        let Value::Object(data) = body["data"]["data"].take() else {
            // No data: a deleted or destroyed version (metadata only), or no entry at all.
            return Err(crate::ApiError {
                path,
                status: http::StatusCode::NOT_FOUND,
                errors: Vec::new(),
            }
            .into());
        };
        let metadata = &body["data"]["metadata"];
        let version = metadata["version"]
            .as_i64()
            .ok_or_else(|| protocol(&path, "no data.metadata.version"))?;
        let created_time = metadata["created_time"].as_str().map(str::to_owned);
        Ok(KvEntry {
            data,
            version,
            created_time,
        })
    }

    /// Database credentials: `<mount>/creds/<role>`.
    pub async fn database_creds(&self, token: &str, mount: &str, role: &str) -> Result<Leased, Error> {
        let path = format!("{mount}/creds/{role}");
        let body = self.call(Method::GET, &path, Some(token), None).await?;
        leased(&path, body)
    }

    /// A certificate: `<mount>/issue/<role>`. The engine issues certificates without a
    /// lease unless the role asks for one; the certificate's expiry is then the TTL.
    pub async fn pki_issue(
        &self,
        token: &str,
        mount: &str,
        role: &str,
        request: &PkiIssue<'_>,
    ) -> Result<Leased, Error> {
        let path = format!("{mount}/issue/{role}");
        let mut body = json!({"common_name": request.common_name});
        if !request.alt_names.is_empty() {
            body["alt_names"] = json!(request.alt_names.join(","));
        }
        if let Some(ttl) = request.ttl {
            body["ttl"] = json!(ttl);
        }
        let body = self.call(Method::POST, &path, Some(token), Some(&body)).await?;
        let mut issued = leased(&path, body)?;
        if issued.lease_id.is_none() || issued.ttl.is_zero() {
            if let Some(expiration) = issued.data.get("expiration").and_then(Value::as_i64) {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                issued.ttl = Duration::from_secs(expiration.saturating_sub(now).max(0) as u64);
            }
            issued.renewable = false;
        }
        Ok(issued)
    }

    /// `sys/leases/renew`.
    pub async fn renew_lease(
        &self,
        token: &str,
        lease_id: &str,
        increment: Duration,
    ) -> Result<Renewed, Error> {
        let path = "sys/leases/renew";
        let body = self
            .call_redacting(
                Method::PUT,
                path,
                Auth::Token(token),
                Some(&json!({"lease_id": lease_id, "increment": increment.as_secs()})),
                &[token, lease_id],
            )
            .await?;
        Ok(Renewed {
            ttl: Duration::from_secs(
                body["lease_duration"]
                    .as_u64()
                    .ok_or_else(|| protocol(path, "no lease_duration"))?,
            ),
            renewable: body["renewable"].as_bool().unwrap_or(false),
        })
    }

    /// `sys/leases/revoke`.
    pub async fn revoke_lease(&self, token: &str, lease_id: &str) -> Result<(), Error> {
        self.call_redacting(
            Method::PUT,
            "sys/leases/revoke",
            Auth::Token(token),
            Some(&json!({"lease_id": lease_id})),
            &[token, lease_id],
        )
        .await
        .map(drop)
    }

    /// `sys/init` with `shares` key shares, `threshold` of them unsealing: the answer
    /// (`keys`, `root_token`).
    pub async fn init(&self, shares: u32, threshold: u32) -> Result<Value, Error> {
        self.call(
            Method::PUT,
            "sys/init",
            None,
            Some(&json!({"secret_shares": shares, "secret_threshold": threshold})),
        )
        .await
    }

    /// `sys/unseal` with one key share: the seal status after it.
    pub async fn unseal(&self, key: &str) -> Result<Value, Error> {
        self.call_redacting(
            Method::PUT,
            "sys/unseal",
            Auth::None,
            Some(&json!({ "key": key })),
            &[key],
        )
        .await
    }

    /// `sys/seal-status`.
    pub async fn seal_status(&self) -> Result<Value, Error> {
        self.call(Method::GET, "sys/seal-status", None, None).await
    }
}

fn protocol(path: &str, reason: &str) -> Error {
    Error::Protocol {
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

fn seconds(value: &Value) -> Duration {
    Duration::from_secs(value.as_u64().unwrap_or(0))
}

/// A leased answer (`lease_id`, `lease_duration`, `renewable`, `data`).
fn leased(path: &str, mut body: Value) -> Result<Leased, Error> {
    let Value::Object(data) = body["data"].take() else {
        return Err(protocol(path, "no data"));
    };
    Ok(Leased {
        lease_id: body["lease_id"]
            .as_str()
            .filter(|id| !id.is_empty())
            .map(str::to_owned),
        ttl: seconds(&body["lease_duration"]),
        renewable: body["renewable"].as_bool().unwrap_or(false),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leased_answers_are_read() {
        let body = json!({
            "lease_id": "database/creds/app/abcd", "lease_duration": 300, "renewable": true,
            "data": {"username": "v-app", "password": "pw"},
        });
        let creds = leased("database/creds/app", body).unwrap();
        assert_eq!(creds.lease_id.as_deref(), Some("database/creds/app/abcd"));
        assert_eq!(creds.ttl, Duration::from_secs(300));
        assert!(creds.renewable);
        assert_eq!(creds.data["username"], "v-app");
        let no_lease = leased("pki/issue/r", json!({"lease_id": "", "data": {}})).unwrap();
        assert_eq!(no_lease.lease_id, None);
        assert!(leased("p", json!({"lease_id": "x"})).is_err());
    }
}
