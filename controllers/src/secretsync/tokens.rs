//! The token cache: one engine login per SecretSync, made with a short-lived token of
//! its ServiceAccount (TokenRequest, audience `capstan_contract::ENGINE_AUDIENCE`),
//! reused while two thirds of its TTL are left, then renewed (it may have issued a lease
//! in use) or replaced by a new login.

use super::{Ctx, outcome::Failure, reasons, schedule};
use capstan_crds::SecretSync;
use k8s_openapi::{
    api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::ServiceAccount,
    },
    jiff::Timestamp,
};
use kube::{
    Api, ResourceExt,
    api::{ObjectMeta, PostParams},
};
use parking_lot::Mutex;
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// How long the ServiceAccount tokens the controller logs in with last.
const TOKEN_SECONDS: i64 = 600;

/// Login tokens by SecretSync UID.
#[derive(Default)]
pub struct Cache(Mutex<HashMap<String, Cached>>);

/// A login token (never logged: no Debug).
struct Cached {
    token: String,
    /// Which ServiceAccount and role it is for: a spec change logs in again.
    identity: (String, String),
    /// Renew it (or log in again) after this.
    refresh_after: Instant,
    /// When the engine ends it (and every lease it issued: Vault's rule).
    expires_at: Timestamp,
    ttl: Duration,
    renewable: bool,
    /// Tells tokens apart: which one issued the current lease.
    generation: u64,
}

/// The token a call used, and what is known of its life.
pub struct TokenInfo {
    pub token: String,
    pub expires_at: Timestamp,
    pub generation: u64,
}

impl Cache {
    pub fn forget(&self, uid: &str) {
        self.0.lock().remove(uid);
    }

    /// Whether `token` is the one cached for `uid`.
    pub fn holds(&self, uid: &str, token: &str) -> bool {
        self.0.lock().get(uid).is_some_and(|c| c.token == token)
    }
}

impl Ctx {
    /// A login token for the SecretSync's ServiceAccount and role.
    pub(super) async fn token(&self, obj: &SecretSync) -> Result<String, Failure> {
        self.token_info(obj).await.map(|t| t.token)
    }

    /// Forgets a token the engine no longer accepts (so the next attempt logs in again).
    pub(super) fn drop_token(&self, obj: &SecretSync) {
        self.state.tokens.forget(&obj.uid().unwrap_or_default());
    }

    /// The cached token while two thirds of its TTL are left; then the same token
    /// renewed (it may have issued a lease in use), or a new login if it cannot be.
    pub(super) async fn token_info(&self, obj: &SecretSync) -> Result<TokenInfo, Failure> {
        let uid = obj.uid().unwrap_or_default();
        let identity = (
            obj.spec.auth.service_account_name.clone(),
            obj.spec.auth.role.clone(),
        );
        if let Some(info) = self.cached(&uid, &identity).await {
            return Ok(info);
        }
        let jwt = self.service_account_token(obj, &identity.0).await?;
        let ns = obj.namespace().unwrap_or_default();
        let login = self.state.engine.login(&identity.1, &jwt).await.map_err(|e| {
            if e.transient() {
                Failure::engine(e)
            } else {
                Failure::permanent(
                    reasons::LOGIN_DENIED,
                    format!(
                        "the engine refused the login of ServiceAccount {ns}/{} with role {:?}: {e}",
                        identity.0, identity.1
                    ),
                )
            }
        })?;
        let usable = login.ttl.mul_f64(2.0 / 3.0).max(Duration::from_secs(1));
        let expires_at = schedule::add(Timestamp::now(), login.ttl);
        let generation = rand::random::<u64>();
        self.state.tokens.0.lock().insert(
            uid,
            Cached {
                token: login.token.clone(),
                identity,
                refresh_after: Instant::now() + usable,
                expires_at,
                ttl: login.ttl,
                renewable: login.renewable,
                generation,
            },
        );
        Ok(TokenInfo {
            token: login.token,
            expires_at,
            generation,
        })
    }

    /// The cached token for `identity` if it is still good to use, renewed if due.
    async fn cached(&self, uid: &str, identity: &(String, String)) -> Option<TokenInfo> {
        let (token, refresh_after, expires_at, ttl, renewable, generation) =
            self.state.tokens.0.lock().get(uid).and_then(|c| {
                (c.identity == *identity).then(|| {
                    (
                        c.token.clone(),
                        c.refresh_after,
                        c.expires_at,
                        c.ttl,
                        c.renewable,
                        c.generation,
                    )
                })
            })?;
        let info = |expires_at| TokenInfo {
            token: token.clone(),
            expires_at,
            generation,
        };
        if Instant::now() < refresh_after {
            return Some(info(expires_at));
        }
        if renewable && Timestamp::now() < expires_at {
            let renewed = self.state.engine.renew_self(&token, ttl).await.ok()?;
            let expires_at = schedule::add(Timestamp::now(), renewed.ttl);
            // Renewed in full: use it for two thirds of the grant. Granted less (its max
            // TTL): use it for what is left, then log in again.
            let usable = if renewed.ttl + Duration::from_secs(1) >= ttl {
                renewed.ttl.mul_f64(2.0 / 3.0)
            } else {
                renewed.ttl
            };
            if let Some(c) = self.state.tokens.0.lock().get_mut(uid) {
                c.refresh_after = Instant::now() + usable.max(Duration::from_secs(1));
                c.expires_at = expires_at;
                c.renewable = renewed.renewable && renewed.ttl + Duration::from_secs(1) >= ttl;
            }
            return (Timestamp::now() < schedule::sub(expires_at, Duration::from_secs(1)))
                .then(|| info(expires_at));
        }
        // Not renewable: used until shortly before it ends.
        (Timestamp::now() < schedule::sub(expires_at, Duration::from_secs(5))).then(|| info(expires_at))
    }

    /// A TokenRequest for the SecretSync's ServiceAccount, for the engine's audience.
    async fn service_account_token(
        &self,
        obj: &SecretSync,
        service_account: &str,
    ) -> Result<String, Failure> {
        let ns = obj.namespace().unwrap_or_default();
        let request = TokenRequest {
            metadata: ObjectMeta::default(),
            spec: TokenRequestSpec {
                audiences: vec![capstan_contract::ENGINE_AUDIENCE.to_owned()],
                expiration_seconds: Some(TOKEN_SECONDS),
                bound_object_ref: None,
            },
            status: None,
        };
        match Api::<ServiceAccount>::namespaced(self.client.clone(), &ns)
            .create_token_request(service_account, &PostParams::default(), &request)
            .await
        {
            Ok(response) => Ok(response.status.map(|s| s.token).unwrap_or_default()),
            Err(kube::Error::Api(e)) if e.code == 404 => Err(Failure::permanent(
                reasons::SERVICE_ACCOUNT_NOT_FOUND,
                format!("ServiceAccount {ns}/{service_account} does not exist"),
            )),
            Err(error) => Err(Failure::transient(
                reasons::KUBERNETES_ERROR,
                format!("requesting a token for ServiceAccount {ns}/{service_account}: {error}"),
            )),
        }
    }
}
