//! Leases: every dynamic credential the engine hands out has one (a TTL, a max TTL, the
//! token it was issued to), persisted like everything else, so expiry revokes it even
//! across restarts. Every unsealed replica runs the expiration loop; revocation is
//! idempotent in the backends, and the lease entry is removed with its version as
//! precondition, so two replicas never double-count one.
//!
//! A lease whose backend refuses revocation is never dropped (DESIGN decision 5): it is
//! retried with capped exponential backoff, shown as irrevocable (lookup, metric) after
//! `IRREVOCABLE_AFTER` attempts, and removed only once revoked or when an operator forces
//! it (`sys/leases/revoke-force`).

use crate::{
    secrets::database::Database,
    store::clock::now,
    store::logical::{Logical, LogicalError},
    store::storage::{Precondition, StorageError},
};
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use serde::{Deserialize, Serialize};
use std::time::Duration;

const ID_PREFIX: &str = "sys/expire/id/";
const TOKEN_PREFIX: &str = "sys/expire/token/";
/// Attempts after which a lease is reported irrevocable (it is still retried).
pub const IRREVOCABLE_AFTER: u32 = 6;

/// What revoking a lease needs, per engine.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "engine", rename_all = "snake_case")]
pub enum LeaseSecret {
    Database {
        mount: String,
        config: String,
        role: String,
        username: String,
    },
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct RevokeState {
    pub attempts: u32,
    /// Unix seconds of the next attempt.
    pub next_attempt: i64,
    /// The backend's last refusal (never a credential).
    pub last_error: String,
    pub irrevocable: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub id: String,
    pub issue_time: i64,
    pub last_renewal: Option<i64>,
    pub expire_time: i64,
    pub max_expire_time: i64,
    pub renewable: bool,
    /// The issuing token's hash: its revocation revokes this lease.
    pub token_hash: Option<String>,
    pub secret: LeaseSecret,
    /// Set once revocation has been asked for (by expiry, a caller or the token).
    pub revoke: Option<RevokeState>,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease not found or lease is not renewable")]
    NotFound,
    #[error("lease is not renewable")]
    NotRenewable,
    #[error("lease is past its max TTL and cannot be renewed")]
    PastMaxTtl,
    #[error("revocation failed and will be retried: {0}")]
    RevokeFailed(String),
    #[error("invalid lease id")]
    InvalidId,
    #[error(transparent)]
    Storage(#[from] LogicalError),
}

#[derive(Clone, Default)]
pub struct LeaseMetrics {
    pub revoked: Family<Vec<(String, String)>, Counter>,
    pub irrevocable: Gauge,
    pub active: Gauge,
}

impl LeaseMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "leases_revoked",
            "Leases revoked, by cause (expired, revoked, token, prefix, forced)",
            metrics.revoked.clone(),
        );
        registry.register(
            "leases_irrevocable",
            "Leases whose revocation failed at least 6 times and is still being retried",
            metrics.irrevocable.clone(),
        );
        registry.register("leases", "Leases the engine holds", metrics.active.clone());
        metrics
    }
}

#[derive(Clone)]
pub struct Leases {
    logical: Logical,
    database: Database,
    metrics: LeaseMetrics,
    /// The longest wait between two revocation attempts of one lease.
    backoff_max: Duration,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 512
        && id.split('/').all(|s| !s.is_empty() && s != "." && s != "..")
        && !id.chars().any(char::is_control)
}

fn id_path(id: &str) -> String {
    format!("{ID_PREFIX}{id}")
}

fn token_path(token_hash: &str, id: &str) -> String {
    // The lease id has slashes; its hash keeps the index one level deep.
    let digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, id.as_bytes()).as_ref());
    format!("{TOKEN_PREFIX}{token_hash}/{digest}")
}

#[derive(Serialize, Deserialize)]
struct TokenIndex {
    lease_id: String,
}

impl Leases {
    pub fn new(logical: Logical, database: Database, metrics: LeaseMetrics, backoff_max: Duration) -> Self {
        Self {
            logical,
            database,
            metrics,
            backoff_max,
        }
    }

    /// Records a new lease (after the backend made the credential).
    pub async fn create(&self, lease: &Lease) -> Result<(), LeaseError> {
        if let Some(token) = &lease.token_hash {
            self.logical
                .put(
                    &token_path(token, &lease.id),
                    &TokenIndex {
                        lease_id: lease.id.clone(),
                    },
                    Precondition::None,
                )
                .await?;
        }
        self.logical
            .put(&id_path(&lease.id), lease, Precondition::Absent)
            .await?;
        Ok(())
    }

    pub async fn lookup(&self, id: &str) -> Result<Lease, LeaseError> {
        if !valid_id(id) {
            return Err(LeaseError::InvalidId);
        }
        self.logical
            .get::<Lease>(&id_path(id))
            .await?
            .map(|v| v.value)
            .ok_or(LeaseError::NotFound)
    }

    /// Extends a lease by `increment` seconds (0: its original TTL), never past its max
    /// TTL; at the max it is refused (V14). Wall-clock time only moves expiry forward by
    /// what was asked; a clock jump cannot extend the max.
    pub async fn renew(&self, id: &str, increment: u64, default_ttl: u64) -> Result<Lease, LeaseError> {
        if !valid_id(id) {
            return Err(LeaseError::InvalidId);
        }
        let now = now();
        let renewed = self
            .logical
            .update::<Lease, LeaseError, _>(&id_path(id), |current| {
                let mut lease = current.ok_or(LeaseError::NotFound)?;
                if lease.revoke.is_some() || lease.expire_time <= now {
                    return Err(LeaseError::NotFound);
                }
                if !lease.renewable {
                    return Err(LeaseError::NotRenewable);
                }
                if lease.max_expire_time <= now || lease.expire_time >= lease.max_expire_time {
                    return Err(LeaseError::PastMaxTtl);
                }
                let increment = if increment == 0 {
                    default_ttl.max(1)
                } else {
                    increment
                };
                lease.expire_time = (now + increment as i64).min(lease.max_expire_time);
                lease.last_renewal = Some(now);
                Ok(Some(lease))
            })
            .await??
            .expect("renew writes the lease");
        // The backend's own expiry (e.g. PostgreSQL's VALID UNTIL) follows.
        let LeaseSecret::Database {
            mount: _,
            config,
            role,
            username,
        } = &renewed.secret;
        if let Err(error) = self
            .database
            .renew(config, role, username, renewed.expire_time)
            .await
        {
            tracing::warn!(lease = %renewed.id, %error, "The database did not take the renewed expiry");
        }
        Ok(renewed)
    }

    /// Revokes a lease now. A backend failure leaves it marked for retry (never dropped).
    pub async fn revoke(&self, id: &str, cause: &str) -> Result<(), LeaseError> {
        if !valid_id(id) {
            return Err(LeaseError::InvalidId);
        }
        let Some(stored) = self.logical.get_fresh::<Lease>(&id_path(id)).await? else {
            return Ok(());
        };
        self.attempt(stored.value, stored.version, cause).await
    }

    /// Revokes every lease whose id starts with `prefix`.
    pub async fn revoke_prefix(&self, prefix: &str, force: bool) -> Result<usize, LeaseError> {
        let prefix = prefix.trim_end_matches('/');
        if !valid_id(prefix) {
            return Err(LeaseError::InvalidId);
        }
        let mut count = 0;
        for path in self.logical.paths(&format!("{ID_PREFIX}{prefix}")).await? {
            let id = &path[ID_PREFIX.len()..];
            // `prefix` names a folder or a whole id, never half a segment.
            if id != prefix && !id.starts_with(&format!("{prefix}/")) {
                continue;
            }
            if force {
                self.forget(id, "forced").await?;
            } else {
                self.revoke(id, "prefix").await?;
            }
            count += 1;
        }
        Ok(count)
    }

    /// Drops the bookkeeping without revoking in the backend (an operator's decision).
    async fn forget(&self, id: &str, cause: &str) -> Result<(), LeaseError> {
        if let Some(lease) = self.logical.get_fresh::<Lease>(&id_path(id)).await? {
            self.finish(&lease.value, lease.version, cause).await?;
            tracing::warn!(lease = %id, "Lease forgotten without revocation (forced by an operator)");
        }
        Ok(())
    }

    async fn finish(&self, lease: &Lease, version: u64, cause: &str) -> Result<(), LeaseError> {
        match self
            .logical
            .delete(&id_path(&lease.id), Precondition::Version(version))
            .await
        {
            Ok(()) | Err(LogicalError::Storage(StorageError::Conflict(_))) => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(token) = &lease.token_hash {
            self.logical
                .delete(&token_path(token, &lease.id), Precondition::None)
                .await?;
        }
        self.metrics
            .revoked
            .get_or_create(&vec![("cause".to_owned(), cause.to_owned())])
            .inc();
        Ok(())
    }

    /// One revocation attempt; on failure the lease records it and waits its backoff.
    async fn attempt(&self, mut lease: Lease, version: u64, cause: &str) -> Result<(), LeaseError> {
        let LeaseSecret::Database {
            mount: _,
            config,
            role,
            username,
        } = &lease.secret;
        match self.database.revoke(config, role, username).await {
            Ok(()) => {
                self.finish(&lease, version, cause).await?;
                tracing::info!(lease = %lease.id, cause, "Lease revoked");
                Ok(())
            }
            Err(error) => {
                let mut state = lease.revoke.take().unwrap_or_default();
                state.attempts += 1;
                let backoff = Duration::from_secs(1 << state.attempts.min(16)).min(self.backoff_max);
                state.next_attempt = now() + backoff.as_secs().max(1) as i64;
                state.last_error = error.to_string();
                state.irrevocable = state.attempts >= IRREVOCABLE_AFTER;
                tracing::warn!(lease = %lease.id, attempts = state.attempts, irrevocable = state.irrevocable, error = %state.last_error, "Revoking a lease failed; retrying");
                lease.revoke = Some(state);
                match self
                    .logical
                    .put(&id_path(&lease.id), &lease, Precondition::Version(version))
                    .await
                {
                    Ok(_) | Err(LogicalError::Storage(StorageError::Conflict(_))) => {}
                    Err(e) => return Err(e.into()),
                }
                Err(LeaseError::RevokeFailed(error.to_string()))
            }
        }
    }

    /// Revokes every lease issued to a token (called when the token is revoked); returns
    /// how many it asked to revoke (one the backend refused is retried, never dropped).
    pub async fn revoke_for_token(&self, token_hash: &str) -> Result<usize, LeaseError> {
        let mut count = 0;
        for digest in self.logical.list(&format!("{TOKEN_PREFIX}{token_hash}/")).await? {
            let path = format!("{TOKEN_PREFIX}{token_hash}/{digest}");
            if let Some(index) = self.logical.get::<TokenIndex>(&path).await? {
                let _ = self.revoke(&index.value.lease_id, "token").await;
                count += 1;
            }
        }
        Ok(count)
    }

    /// One pass of the expiration loop: revokes what expired, retries what is due, and
    /// revokes leases whose token is gone.
    pub async fn tick(&self, tokens: &crate::auth::token::Tokens) -> Result<(), LeaseError> {
        let now = now();
        let (mut active, mut irrevocable) = (0, 0);
        for path in self.logical.paths(ID_PREFIX).await? {
            let Some(stored) = self.logical.get::<Lease>(&path).await? else {
                continue;
            };
            let lease = stored.value;
            active += 1;
            let cause = match &lease.revoke {
                Some(state) => {
                    irrevocable += i64::from(state.irrevocable);
                    if state.next_attempt > now {
                        continue;
                    }
                    "retry"
                }
                None if lease.expire_time <= now => "expired",
                None => match &lease.token_hash {
                    Some(token)
                        if !tokens.exists_hash(token).await.map_err(|e| match e {
                            crate::auth::token::TokenError::Storage(e) => LeaseError::Storage(e),
                            _ => LeaseError::NotFound,
                        })? =>
                    {
                        "token"
                    }
                    _ => continue,
                },
            };
            let _ = self.attempt(lease, stored.version, cause).await;
        }
        self.metrics.active.set(active);
        self.metrics.irrevocable.set(irrevocable);
        Ok(())
    }

    /// The expiration loop, every second while unsealed.
    pub async fn run(
        self,
        tokens: crate::auth::token::Tokens,
        seal: std::sync::Arc<crate::store::seal::Seal>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if seal.is_sealed() {
                continue;
            }
            if let Err(error) = self.tick(&tokens).await {
                tracing::warn!(%error, "Expiring leases");
            }
        }
    }
}

/// A lease id: `<mount>/creds/<role>/<random>`, as Vault's.
pub fn new_id(mount: &str, role: &str) -> String {
    let suffix: String = (0..24)
        .map(|_| {
            const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
            ALPHABET[rand::random_range(0..ALPHABET.len())] as char
        })
        .collect();
    format!("{mount}/creds/{role}/{suffix}")
}
