//! Seal and unseal. The engine's data is encrypted under a keyring; the keyring under a
//! root key; the root key under an unseal key that exists only as Shamir shares held by
//! people (or, in the development auto-unseal mode, in a Kubernetes Secret). `init` makes
//! all three once and hands out the shares; a replica starts sealed and knows nothing
//! until a threshold of shares reconstructs the unseal key, which opens the root key,
//! which opens the keyring. Sealing drops the key material (zeroized on drop).
//!
//! `core/seal` holds the sealed root key and sealed keyring in one entry, created once
//! (two replicas racing to initialize: one wins, the other is told it is initialized) and
//! updated by read-modify-write on rotation, so no replica ever loses a term.

use crate::{
    barrier::{self, BarrierError, Keyring, RootKey},
    logical::Decoded,
    shamir::{self, ShamirError, UnsealProgress},
    storage::{Backend, Precondition, StorageError},
};
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The storage path of the seal configuration (not barrier-encrypted: it is read while
/// sealed, and what it holds is sealed key material).
pub const SEAL_PATH: &str = "core/seal";

/// What `core/seal` holds.
#[derive(Serialize, Deserialize, Clone)]
struct SealConfig {
    shares: u8,
    threshold: u8,
    /// Random per `init`: reported as the seal's nonce, and tells generations apart.
    generation: String,
    /// The root key sealed under the unseal key.
    sealed_root: String,
    /// The keyring sealed under the root key.
    sealed_keyring: String,
    /// The development mode: the unseal key is kept in a Kubernetes Secret.
    #[serde(default)]
    auto_unseal: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the engine is sealed")]
    Sealed,
    #[error("the engine is not initialized")]
    NotInitialized,
    #[error("the engine is already initialized")]
    AlreadyInitialized,
    #[error("the engine is already unsealed")]
    AlreadyUnsealed,
    #[error("{0}")]
    Share(#[from] ShamirError),
    #[error(
        "the unseal key the shares give does not open the root key: a wrong share, or one of another initialization; progress was reset"
    )]
    WrongKey,
    #[error("the stored seal configuration is damaged: {0}")]
    Damaged(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Barrier(#[from] BarrierError),
}

/// What `sys/seal-status` reports.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct SealStatus {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub initialized: bool,
    pub sealed: bool,
    pub t: u8,
    pub n: u8,
    pub progress: u8,
    pub nonce: String,
    pub version: &'static str,
    pub migration: bool,
    pub recovery_seal: bool,
    pub storage_type: &'static str,
}

/// What `init` hands out, once.
pub struct Initialized {
    pub shares: Vec<Vec<u8>>,
    /// The keyring, for the caller to write the root token with before dropping it; the
    /// engine itself stays sealed.
    pub keyring: Arc<Keyring>,
}

enum State {
    Sealed(Option<UnsealProgress>),
    /// `root` is None only in the short-lived seal `for_init` makes.
    Unsealed {
        root: Option<RootKey>,
        keyring: Arc<Keyring>,
        /// Values decoded from storage while unsealed (`Logical::get_shared`); they go
        /// with the keys when the engine seals.
        decoded: Arc<Decoded>,
    },
}

pub struct Seal {
    storage: Arc<dyn Backend>,
    state: RwLock<State>,
}

impl Seal {
    pub fn new(storage: Arc<dyn Backend>) -> Self {
        Self {
            storage,
            state: RwLock::new(State::Sealed(None)),
        }
    }

    /// An unsealed view of a keyring `init` just made, for writing the root token while
    /// the engine itself stays sealed. It cannot rotate.
    pub fn for_init(storage: Arc<dyn Backend>, keyring: Arc<Keyring>) -> Self {
        Self {
            storage,
            state: RwLock::new(State::Unsealed {
                root: None,
                keyring,
                decoded: Arc::default(),
            }),
        }
    }

    async fn config(&self, fresh: bool) -> Result<Option<(SealConfig, u64)>, SealError> {
        let stored = if fresh {
            self.storage.get_fresh(SEAL_PATH).await?
        } else {
            self.storage.get(SEAL_PATH).await?
        };
        stored
            .map(|s| {
                serde_json::from_slice(&s.value)
                    .map(|c| (c, s.version))
                    .map_err(|e| SealError::Damaged(e.to_string()))
            })
            .transpose()
    }

    pub fn is_sealed(&self) -> bool {
        matches!(*self.state.read(), State::Sealed(_))
    }

    /// The keyring in force, or `Sealed`.
    pub fn keyring(&self) -> Result<Arc<Keyring>, SealError> {
        match &*self.state.read() {
            State::Unsealed { keyring, .. } => Ok(keyring.clone()),
            State::Sealed(_) => Err(SealError::Sealed),
        }
    }

    /// The cache of decoded values of this unsealed period (Sealed when sealed).
    pub(crate) fn decoded(&self) -> Result<Arc<Decoded>, SealError> {
        match &*self.state.read() {
            State::Unsealed { decoded, .. } => Ok(decoded.clone()),
            State::Sealed(_) => Err(SealError::Sealed),
        }
    }

    pub async fn status(&self) -> Result<SealStatus, SealError> {
        let config = self.config(false).await?.map(|(c, _)| c);
        let (sealed, progress) = match &*self.state.read() {
            State::Sealed(progress) => (true, progress.as_ref().map_or(0, UnsealProgress::progress)),
            State::Unsealed { .. } => (false, 0),
        };
        Ok(SealStatus {
            kind: "shamir",
            initialized: config.is_some(),
            sealed,
            t: config.as_ref().map_or(0, |c| c.threshold),
            n: config.as_ref().map_or(0, |c| c.shares),
            progress,
            nonce: if progress > 0 {
                config.map(|c| c.generation).unwrap_or_default()
            } else {
                String::new()
            },
            version: env!("CARGO_PKG_VERSION"),
            migration: false,
            recovery_seal: false,
            storage_type: "kubernetes",
        })
    }

    pub async fn is_initialized(&self) -> Result<bool, SealError> {
        Ok(self.config(true).await?.is_some())
    }

    /// Makes the keys (once): `shares` Shamir shares of the unseal key, `threshold` of
    /// which unseal.
    pub async fn init(&self, shares: u8, threshold: u8, auto_unseal: bool) -> Result<Initialized, SealError> {
        let unseal = RootKey::try_generate()?;
        let split = shamir::split(unseal.as_bytes(), shares, threshold)?;
        let root = RootKey::try_generate()?;
        let keyring = Keyring::try_generate()?;
        let config = SealConfig {
            shares,
            threshold,
            generation: hex::encode(rand::random::<[u8; 16]>()),
            sealed_root: B64.encode(barrier::seal_root(&unseal, &root)?),
            sealed_keyring: B64.encode(keyring.seal_with(&root)?),
            auto_unseal,
        };
        let bytes = serde_json::to_vec(&config).map_err(|e| SealError::Damaged(e.to_string()))?;
        match self.storage.put(SEAL_PATH, bytes, Precondition::Absent).await {
            Ok(_) => {}
            Err(StorageError::Conflict(_)) => return Err(SealError::AlreadyInitialized),
            Err(e) => return Err(e.into()),
        }
        tracing::info!(
            shares,
            threshold,
            "Initialized: the unseal key is split; the engine stays sealed"
        );
        Ok(Initialized {
            shares: split,
            keyring: Arc::new(keyring),
        })
    }

    /// Adds one share. At the threshold the shares are combined and checked against the
    /// stored root key: a wrong result resets progress and leaves the engine sealed.
    pub async fn unseal(&self, share: Vec<u8>) -> Result<SealStatus, SealError> {
        let (config, _) = self.config(true).await?.ok_or(SealError::NotInitialized)?;
        let combined = {
            let mut state = self.state.write();
            let State::Sealed(progress) = &mut *state else {
                return Err(SealError::AlreadyUnsealed);
            };
            let progress =
                progress.get_or_insert_with(|| UnsealProgress::new(config.threshold, barrier::KEY_LEN));
            match progress.add(share)? {
                shamir::Progress::Pending { .. } => None,
                shamir::Progress::Complete(secret) => Some(secret),
            }
        };
        if let Some(secret) = combined {
            let opened = self.open(&config, &secret);
            let mut state = self.state.write();
            match opened {
                Ok((root, keyring)) => {
                    *state = State::Unsealed {
                        root: Some(root),
                        keyring: Arc::new(keyring),
                        decoded: Arc::default(),
                    };
                    tracing::info!("Unsealed");
                }
                Err(error) => {
                    *state = State::Sealed(None);
                    tracing::warn!(%error, "Unseal failed; progress reset");
                    return Err(SealError::WrongKey);
                }
            }
        }
        self.status().await
    }

    fn open(&self, config: &SealConfig, unseal: &[u8]) -> Result<(RootKey, Keyring), SealError> {
        let unseal = RootKey::from_bytes(unseal)?;
        let sealed_root = B64
            .decode(&config.sealed_root)
            .map_err(|e| SealError::Damaged(e.to_string()))?;
        let root = barrier::open_root(&unseal, &sealed_root)?;
        let keyring = self.open_keyring(config, &root)?;
        Ok((root, keyring))
    }

    fn open_keyring(&self, config: &SealConfig, root: &RootKey) -> Result<Keyring, SealError> {
        let sealed = B64
            .decode(&config.sealed_keyring)
            .map_err(|e| SealError::Damaged(e.to_string()))?;
        Ok(Keyring::open_with(root, &sealed)?)
    }

    /// Forgets the shares given so far.
    pub fn reset(&self) {
        let mut state = self.state.write();
        if let State::Sealed(progress) = &mut *state {
            *progress = None;
        }
    }

    /// Seals: the key material is dropped (and zeroized); requests already holding the
    /// keyring finish, every later one is refused.
    pub fn seal(&self) {
        *self.state.write() = State::Sealed(None);
        tracing::info!("Sealed");
    }

    /// Re-reads the keyring another replica may have rotated.
    pub async fn refresh(&self) -> Result<(), SealError> {
        let (config, _) = self.config(true).await?.ok_or(SealError::NotInitialized)?;
        let mut state = self.state.write();
        if let State::Unsealed {
            root: Some(root),
            keyring,
            ..
        } = &mut *state
        {
            let stored = self.open_keyring(&config, root)?;
            if stored.active_term() > keyring.active_term() {
                *keyring = Arc::new(stored);
            }
        }
        Ok(())
    }

    /// Adds a keyring term and makes it the one new writes use; old terms stay readable.
    /// Persisted before it is used (V4: a crash in between leaves a stored keyring that
    /// still opens everything written).
    pub async fn rotate(&self) -> Result<u32, SealError> {
        loop {
            let (mut config, version) = self.config(true).await?.ok_or(SealError::NotInitialized)?;
            let (next, sealed) = {
                let state = self.state.read();
                let State::Unsealed { root: Some(root), .. } = &*state else {
                    return Err(SealError::Sealed);
                };
                let mut next = self.open_keyring(&config, root)?;
                next.try_rotate()?;
                let sealed = next.seal_with(root)?;
                (next, sealed)
            };
            config.sealed_keyring = B64.encode(sealed);
            let bytes = serde_json::to_vec(&config).map_err(|e| SealError::Damaged(e.to_string()))?;
            match self
                .storage
                .put(SEAL_PATH, bytes, Precondition::Version(version))
                .await
            {
                Ok(_) => {
                    let term = next.active_term();
                    if let State::Unsealed { keyring, .. } = &mut *self.state.write() {
                        *keyring = Arc::new(next);
                    }
                    tracing::info!(term, "Keyring rotated");
                    return Ok(term);
                }
                Err(StorageError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{logical::Logical, storage::memory::Memory};

    fn fresh() -> (Arc<dyn Backend>, Seal) {
        let backend: Arc<dyn Backend> = Arc::new(Memory::default());
        (backend.clone(), Seal::new(backend))
    }

    #[tokio::test]
    async fn threshold_shares_unseal_and_bad_ones_never_do() {
        let (_, seal) = fresh();
        assert!(matches!(
            seal.unseal(vec![1; 33]).await,
            Err(SealError::NotInitialized)
        ));
        let shares = seal.init(5, 3, false).await.unwrap().shares;
        assert!(matches!(
            seal.init(1, 1, false).await,
            Err(SealError::AlreadyInitialized)
        ));
        assert!(seal.is_sealed());

        // V7: a duplicate share is refused and keeps progress; a short one is refused.
        assert_eq!(seal.unseal(shares[0].clone()).await.unwrap().progress, 1);
        assert!(matches!(
            seal.unseal(shares[0].clone()).await,
            Err(SealError::Share(_))
        ));
        assert!(matches!(
            seal.unseal(shares[1][..10].to_vec()).await,
            Err(SealError::Share(_))
        ));
        assert_eq!(seal.status().await.unwrap().progress, 1);
        // A wrong share: threshold reached, the key does not open the root, progress reset.
        let mut wrong = shares[2].clone();
        wrong[0] ^= 0xff;
        seal.unseal(shares[1].clone()).await.unwrap();
        assert!(matches!(seal.unseal(wrong).await, Err(SealError::WrongKey)));
        let status = seal.status().await.unwrap();
        assert!(status.sealed && status.progress == 0);
        assert!(matches!(seal.keyring(), Err(SealError::Sealed)));

        // Shares of another initialization (another generation) do not open this one.
        let (_, other) = fresh();
        let foreign = other.init(5, 3, false).await.unwrap().shares;
        seal.unseal(foreign[0].clone()).await.unwrap();
        seal.unseal(foreign[1].clone()).await.unwrap();
        assert!(matches!(
            seal.unseal(foreign[2].clone()).await,
            Err(SealError::WrongKey)
        ));
        assert!(seal.is_sealed());

        // Any three of the five.
        for i in [4, 2, 0] {
            seal.unseal(shares[i].clone()).await.unwrap();
        }
        assert!(!seal.is_sealed());
        assert!(matches!(
            seal.unseal(shares[1].clone()).await,
            Err(SealError::AlreadyUnsealed)
        ));
    }

    #[tokio::test]
    async fn rotation_keeps_old_entries_readable_across_an_unseal() {
        let (backend, seal) = fresh();
        let seal = Arc::new(seal);
        let shares = seal.init(1, 1, false).await.unwrap().shares;
        seal.unseal(shares[0].clone()).await.unwrap();
        let logical = Logical::new(backend.clone(), seal.clone(), Default::default());
        logical.put("t/old", &"before", Precondition::None).await.unwrap();
        assert_eq!(seal.rotate().await.unwrap(), 2);
        logical.put("t/new", &"after", Precondition::None).await.unwrap();
        let stored = backend.get("t/new").await.unwrap().unwrap();
        assert_eq!(
            &stored.value[1..5],
            &2u32.to_be_bytes(),
            "new writes use the new term"
        );

        // Sealed: nothing is readable; unsealed again (a restart): both are.
        seal.seal();
        assert!(matches!(
            logical.get::<String>("t/old").await,
            Err(crate::logical::LogicalError::Sealed)
        ));
        let restarted = Arc::new(Seal::new(backend.clone()));
        restarted.unseal(shares[0].clone()).await.unwrap();
        let logical = Logical::new(backend, restarted.clone(), Default::default());
        assert_eq!(
            logical.get::<String>("t/old").await.unwrap().unwrap().value,
            "before"
        );
        assert_eq!(
            logical.get::<String>("t/new").await.unwrap().unwrap().value,
            "after"
        );
        assert_eq!(restarted.keyring().unwrap().active_term(), 2);
    }

    #[tokio::test]
    async fn a_replica_that_missed_a_rotation_reads_the_new_term() {
        let (backend, seal) = fresh();
        let (one, two) = (Arc::new(seal), Arc::new(Seal::new(backend.clone())));
        let shares = one.init(1, 1, false).await.unwrap().shares;
        one.unseal(shares[0].clone()).await.unwrap();
        two.unseal(shares[0].clone()).await.unwrap();
        one.rotate().await.unwrap();
        let writer = Logical::new(backend.clone(), one, Default::default());
        writer.put("t/x", &1u32, Precondition::None).await.unwrap();
        let reader = Logical::new(backend, two.clone(), Default::default());
        assert_eq!(reader.get::<u32>("t/x").await.unwrap().unwrap().value, 1);
        assert_eq!(two.keyring().unwrap().active_term(), 2);
    }
}
