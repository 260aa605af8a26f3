//! Logical storage: JSON values at paths, sealed by the barrier before they reach the
//! physical backend and opened (integrity-checked, bound to their path) when read back.
//! Every engine (KV, tokens, policies, leases) stores through this.

use crate::{
    store::barrier::BarrierError,
    store::seal::{Seal, SealError},
    store::storage::{Backend, Precondition, StorageError, children},
};
use parking_lot::RwLock;
use prometheus_client::metrics::counter::Counter;
use serde::{Serialize, de::DeserializeOwned};
use std::{any::Any, collections::HashMap, sync::Arc};

#[derive(Debug, thiserror::Error)]
pub enum LogicalError {
    #[error("the engine is sealed")]
    Sealed,
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A stored value failed its integrity check (tampered, truncated, moved from
    /// another path, or written under a key this engine does not have).
    #[error("the entry at {path} failed its integrity check")]
    Integrity { path: String },
    #[error("the entry at {path} could not be decoded: {reason}")]
    Decode { path: String, reason: String },
    #[error("the entry at {path} could not be sealed: {reason}")]
    Encrypt { path: String, reason: String },
}

impl From<SealError> for LogicalError {
    fn from(error: SealError) -> Self {
        match error {
            SealError::Storage(e) => Self::Storage(e),
            _ => Self::Sealed,
        }
    }
}

/// A value and the storage version it was read at (for read-modify-write).
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub value: T,
    pub version: u64,
}

/// Values already opened and decoded, by path, each with the stored ciphertext it came
/// from. A hit needs the very ciphertext storage holds now (the same allocation: a
/// write, a watch event or a delete replaces or drops it), so a value changed or deleted
/// by this replica or, through the watch, by another is never served from here: the
/// cache saves the decryption and the JSON decoding of unchanged entries, nothing else.
/// It belongs to one unsealed period (see `Seal`) and is dropped with the keys.
#[derive(Default)]
pub struct Decoded {
    entries: RwLock<Entries>,
}

#[derive(Default)]
struct Entries {
    by_path: HashMap<String, DecodedEntry>,
    /// Ciphertext bytes of the entries held (the bound below).
    bytes: usize,
}

struct DecodedEntry {
    ciphertext: Arc<[u8]>,
    value: Arc<dyn Any + Send + Sync>,
}

/// At most this much ciphertext's worth of decoded values is kept; past it, arbitrary
/// entries make room (the hot ones come back at their next read).
const DECODED_MAX_BYTES: usize = 32 << 20;

impl Decoded {
    fn get<T: Send + Sync + 'static>(&self, path: &str, ciphertext: &Arc<[u8]>) -> Option<Arc<T>> {
        let entries = self.entries.read();
        let entry = entries.by_path.get(path)?;
        if !Arc::ptr_eq(&entry.ciphertext, ciphertext) {
            return None;
        }
        entry.value.clone().downcast::<T>().ok()
    }

    fn insert(&self, path: &str, ciphertext: Arc<[u8]>, value: Arc<dyn Any + Send + Sync>) {
        let size = ciphertext.len();
        if size > DECODED_MAX_BYTES / 8 {
            return;
        }
        let mut entries = self.entries.write();
        let Entries { by_path, bytes } = &mut *entries;
        if let Some(old) = by_path.remove(path) {
            *bytes -= old.ciphertext.len();
        }
        while *bytes + size > DECODED_MAX_BYTES {
            let Some(victim) = by_path.keys().next().cloned() else {
                break;
            };
            if let Some(old) = by_path.remove(&victim) {
                *bytes -= old.ciphertext.len();
            }
        }
        by_path.insert(path.to_owned(), DecodedEntry { ciphertext, value });
        *bytes += size;
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.read().by_path.len()
    }
}

#[derive(Clone)]
pub struct Logical {
    backend: Arc<dyn Backend>,
    seal: Arc<Seal>,
    integrity_errors: Counter,
}

/// How many times `update` retries after losing a race before giving up.
const MAX_ATTEMPTS: usize = 32;

impl Logical {
    pub fn new(backend: Arc<dyn Backend>, seal: Arc<Seal>, integrity_errors: Counter) -> Self {
        Self {
            backend,
            seal,
            integrity_errors,
        }
    }

    pub fn seal(&self) -> &Arc<Seal> {
        &self.seal
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    async fn open<T: DeserializeOwned>(&self, path: &str, envelope: &[u8]) -> Result<T, LogicalError> {
        let plaintext = self.decrypt(path, envelope).await?;
        serde_json::from_slice(&plaintext).map_err(|e| LogicalError::Decode {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    async fn decrypt(&self, path: &str, envelope: &[u8]) -> Result<Vec<u8>, LogicalError> {
        let mut keyring = self.seal.keyring()?;
        let plaintext = match keyring.open(path, envelope) {
            Err(BarrierError::UnknownTerm(_)) => {
                // Another replica rotated the keyring: read it again, once.
                self.seal.refresh().await?;
                keyring = self.seal.keyring()?;
                keyring.open(path, envelope)
            }
            other => other,
        };
        plaintext.map_err(|error| {
            self.integrity_errors.inc();
            tracing::error!(%path, %error, "A storage entry failed its integrity check");
            LogicalError::Integrity {
                path: path.to_owned(),
            }
        })
    }

    async fn read<T: DeserializeOwned>(
        &self,
        path: &str,
        fresh: bool,
    ) -> Result<Option<Versioned<T>>, LogicalError> {
        // Sealed is checked first: a sealed engine answers nothing, not even "absent".
        self.seal.keyring()?;
        let stored = if fresh {
            self.backend.get_fresh(path).await?
        } else {
            self.backend.get(path).await?
        };
        match stored {
            None => Ok(None),
            Some(stored) => Ok(Some(Versioned {
                value: self.open(path, &stored.value).await?,
                version: stored.version,
            })),
        }
    }

    /// The value at `path` as this replica knows it.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<Option<Versioned<T>>, LogicalError> {
        self.read(path, false).await
    }

    /// The value at `path` as this replica knows it, shared: decoded once per stored
    /// version and handed out again while storage still holds that version (for entries
    /// read on every request: tokens, policies, KV keys). Same answers as `get`.
    pub async fn get_shared<T: DeserializeOwned + Send + Sync + 'static>(
        &self,
        path: &str,
    ) -> Result<Option<Versioned<Arc<T>>>, LogicalError> {
        // Sealed is checked first, as in `read`.
        let decoded = self.seal.decoded()?;
        let Some(stored) = self.backend.get(path).await? else {
            return Ok(None);
        };
        if let Some(value) = decoded.get::<T>(path, &stored.value) {
            return Ok(Some(Versioned {
                value,
                version: stored.version,
            }));
        }
        let value: Arc<T> = Arc::new(self.open(path, &stored.value).await?);
        decoded.insert(path, stored.value, value.clone());
        Ok(Some(Versioned {
            value,
            version: stored.version,
        }))
    }

    /// The value at `path` as storage has it now.
    pub async fn get_fresh<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<Option<Versioned<T>>, LogicalError> {
        self.read(path, true).await
    }

    pub async fn put<T: Serialize>(
        &self,
        path: &str,
        value: &T,
        precondition: Precondition,
    ) -> Result<u64, LogicalError> {
        let keyring = self.seal.keyring()?;
        let plaintext = serde_json::to_vec(value).map_err(|e| LogicalError::Encrypt {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let envelope = keyring
            .seal(path, &plaintext)
            .map_err(|e| LogicalError::Encrypt {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        if keyring.claim_rotation() {
            // V5: rotate before the active key reaches its bound; one writer starts it.
            let seal = self.seal.clone();
            tokio::spawn(async move {
                if let Err(error) = seal.rotate().await {
                    keyring.release_rotation();
                    tracing::error!(%error, "Rotating the keyring at its operation bound");
                }
            });
        }
        Ok(self.backend.put(path, envelope, precondition).await?)
    }

    pub async fn delete(&self, path: &str, precondition: Precondition) -> Result<(), LogicalError> {
        self.seal.keyring()?;
        Ok(self.backend.delete(path, precondition).await?)
    }

    /// Vault's LIST below `prefix` (ending in `/`).
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, LogicalError> {
        self.seal.keyring()?;
        Ok(children(prefix, &self.backend.paths(prefix).await?))
    }

    /// Every stored path below `prefix` (at any depth).
    pub async fn paths(&self, prefix: &str) -> Result<Vec<String>, LogicalError> {
        self.seal.keyring()?;
        Ok(self.backend.paths(prefix).await?)
    }

    /// Read-modify-write without lost updates: `change` sees the current value (fresh
    /// after a conflict) and returns the new one (None deletes) or an error to stop.
    /// Returns what was written.
    pub async fn update<T, E, F>(
        &self,
        path: &str,
        mut change: F,
    ) -> Result<Result<Option<T>, E>, LogicalError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(Option<T>) -> Result<Option<T>, E>,
    {
        let mut current = self.get::<T>(path).await?;
        for _ in 0..MAX_ATTEMPTS {
            let precondition = current
                .as_ref()
                .map_or(Precondition::Absent, |c| Precondition::Version(c.version));
            let existed = current.is_some();
            let next = match change(current.map(|c| c.value)) {
                Ok(next) => next,
                Err(e) => return Ok(Err(e)),
            };
            let result = match &next {
                Some(value) => self.put(path, value, precondition).await.map(|_| ()),
                None if existed => self.delete(path, precondition).await,
                None => Ok(()),
            };
            match result {
                Ok(()) => return Ok(Ok(next)),
                Err(LogicalError::Storage(StorageError::Conflict(_))) => {
                    current = self.get_fresh::<T>(path).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(LogicalError::Storage(StorageError::Conflict(path.to_owned())))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{
        auth::token::{NewToken, TokenError, Tokens},
        policy::store::Policies,
        store::storage::memory::Memory,
    };
    use serde::Deserialize;

    /// Two replicas over one storage (as two engines over one namespace), each unsealed
    /// on its own, each with its own cache of decoded values.
    pub(crate) async fn two_replicas() -> (Logical, Logical) {
        let backend: Arc<dyn Backend> = Arc::new(Memory::default());
        let first = Arc::new(Seal::new(backend.clone()));
        let share = first.init(1, 1, false).await.unwrap().shares.remove(0);
        first.unseal(share.clone()).await.unwrap();
        let second = Arc::new(Seal::new(backend.clone()));
        second.unseal(share).await.unwrap();
        (
            Logical::new(backend.clone(), first, Counter::default()),
            Logical::new(backend, second, Counter::default()),
        )
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Item {
        n: u32,
    }

    #[tokio::test]
    async fn shared_values_follow_every_change_of_storage() {
        let (a, b) = two_replicas().await;
        a.put("x/item", &Item { n: 1 }, Precondition::None).await.unwrap();
        let first = b.get_shared::<Item>("x/item").await.unwrap().unwrap();
        assert_eq!(*first.value, Item { n: 1 });
        let again = b.get_shared::<Item>("x/item").await.unwrap().unwrap();
        assert!(Arc::ptr_eq(&first.value, &again.value), "decoded once");
        // Written by the other replica: the next read has it.
        a.put("x/item", &Item { n: 2 }, Precondition::None).await.unwrap();
        assert_eq!(
            *b.get_shared::<Item>("x/item").await.unwrap().unwrap().value,
            Item { n: 2 }
        );
        // A tampered ciphertext is refused, not answered from the cache.
        let stored = b.backend().get("x/item").await.unwrap().unwrap();
        let mut tampered = stored.value.to_vec();
        *tampered.last_mut().unwrap() ^= 1;
        b.backend()
            .put("x/item", tampered, Precondition::None)
            .await
            .unwrap();
        assert!(matches!(
            b.get_shared::<Item>("x/item").await,
            Err(LogicalError::Integrity { .. })
        ));
        // Deleted by the other replica: gone here too.
        a.delete("x/item", Precondition::None).await.unwrap();
        assert!(b.get_shared::<Item>("x/item").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn sealing_drops_the_decoded_values() {
        let (a, _) = two_replicas().await;
        a.put("x/item", &Item { n: 1 }, Precondition::None).await.unwrap();
        a.get_shared::<Item>("x/item").await.unwrap().unwrap();
        let decoded = a.seal().decoded().unwrap();
        assert_eq!(decoded.len(), 1);
        a.seal().seal();
        assert!(matches!(
            a.get_shared::<Item>("x/item").await,
            Err(LogicalError::Sealed)
        ));
        assert!(a.seal().decoded().is_err());
        drop(decoded);
    }

    #[tokio::test]
    async fn a_revoked_token_is_refused_at_once_on_every_replica() {
        let (a, b) = two_replicas().await;
        let (on_a, on_b) = (Tokens::new(a), Tokens::new(b));
        let (token, _) = on_a
            .create(
                NewToken {
                    policies: vec!["app".into()],
                    ttl: 600,
                    ..Default::default()
                },
                None,
            )
            .await
            .unwrap();
        // Both replicas have looked it up (and keep its decoded entry).
        on_a.lookup(&token).await.unwrap();
        on_b.lookup(&token).await.unwrap();
        on_a.revoke(&token).await.unwrap();
        assert!(matches!(on_a.lookup(&token).await, Err(TokenError::Invalid)));
        assert!(matches!(on_b.lookup(&token).await, Err(TokenError::Invalid)));
    }

    #[tokio::test]
    async fn a_changed_policy_takes_effect_on_every_replica() {
        let (a, b) = two_replicas().await;
        let declared = Arc::new(crate::declared::Declared::default());
        let (on_a, on_b) = (Policies::new(a, declared.clone()), Policies::new(b, declared));
        let names = vec!["app".to_owned()];
        on_a.write("app", r#"path "secret/data/app" { capabilities = ["read"] }"#)
            .await
            .unwrap();
        for policies in [&on_a, &on_b] {
            let acl = policies.acl(&names).await.unwrap();
            assert!(acl.allows("secret/data/app", crate::policy::Capability::Read));
        }
        on_a.write("app", r#"path "secret/data/other" { capabilities = ["read"] }"#)
            .await
            .unwrap();
        for policies in [&on_a, &on_b] {
            let acl = policies.acl(&names).await.unwrap();
            assert!(!acl.allows("secret/data/app", crate::policy::Capability::Read));
            assert!(acl.allows("secret/data/other", crate::policy::Capability::Read));
        }
        on_a.delete("app").await.unwrap();
        let acl = on_b.acl(&names).await.unwrap();
        assert!(!acl.allows("secret/data/other", crate::policy::Capability::Read));
    }
}
