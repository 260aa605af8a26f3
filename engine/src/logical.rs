//! Logical storage: JSON values at paths, sealed by the barrier before they reach the
//! physical backend and opened (integrity-checked, bound to their path) when read back.
//! Every engine (KV, tokens, policies, leases) stores through this.

use crate::{
    barrier::BarrierError,
    seal::{Seal, SealError},
    storage::{Backend, Precondition, StorageError, children},
};
use prometheus_client::metrics::counter::Counter;
use serde::{Serialize, de::DeserializeOwned};
use std::sync::Arc;

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
        let plaintext = plaintext.map_err(|error| {
            self.integrity_errors.inc();
            tracing::error!(%path, %error, "A storage entry failed its integrity check");
            LogicalError::Integrity {
                path: path.to_owned(),
            }
        })?;
        serde_json::from_slice(&plaintext).map_err(|e| LogicalError::Decode {
            path: path.to_owned(),
            reason: e.to_string(),
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
        if keyring.needs_rotation() {
            // V5: rotate before the active key reaches its bound; one writer wins.
            let seal = self.seal.clone();
            tokio::spawn(async move {
                if let Err(error) = seal.rotate().await {
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
