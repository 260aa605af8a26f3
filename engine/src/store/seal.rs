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
//!
//! V5 across restarts and replicas: every unseal rotates the keyring, so each process
//! writes only under a term it added itself, and its in-memory count of encryptions is
//! the whole count of that term. A restarted process starts from zero under a new term,
//! never under one an earlier run (or another replica) already used; a replica that
//! meets another's newer term adds it for reading and keeps writing under its own
//! (`refresh`). Terms are numbered by a conditional write of `core/seal`, so two
//! processes never get the same one. We chose this over persisting the count per term
//! (reserving blocks of encryptions with conditional writes) because it needs no write
//! on the encryption path, no recovery rule for a crash inside a block, and no shared
//! counter for replicas; its cost is one term (44 bytes of keyring) per unseal, and a
//! write of `core/seal` to unseal: an unseal that cannot write it stays sealed rather
//! than write under a term it does not own.

use crate::{
    store::barrier::{self, BarrierError, Keyring, RootKey},
    store::logical::Decoded,
    store::shamir::{self, ShamirError, UnsealProgress},
    store::storage::{Backend, Precondition, StorageError},
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
    /// The bound of encryptions under one term, for every keyring this seal opens (V5).
    max_operations: u64,
    /// Test hook (V4): a rotation persists its keyring and then returns as if the
    /// process had died before swapping it in.
    #[cfg(test)]
    crash_after_persist: std::sync::atomic::AtomicBool,
}

impl Seal {
    pub fn new(storage: Arc<dyn Backend>) -> Self {
        Self {
            storage,
            state: RwLock::new(State::Sealed(None)),
            max_operations: barrier::DEFAULT_MAX_OPERATIONS,
            #[cfg(test)]
            crash_after_persist: Default::default(),
        }
    }

    /// Sets the bound of encryptions under one term (tests use small ones).
    pub fn with_max_operations(mut self, max: u64) -> Self {
        self.max_operations = max.max(1);
        self
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
            max_operations: barrier::DEFAULT_MAX_OPERATIONS,
            #[cfg(test)]
            crash_after_persist: Default::default(),
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
            let root = match self.open(&config, &secret) {
                Ok((root, _)) => root,
                Err(error) => {
                    *self.state.write() = State::Sealed(None);
                    tracing::warn!(%error, "Unseal failed; progress reset");
                    return Err(SealError::WrongKey);
                }
            };
            // V5: a term of this process's own before anything is written (see the
            // module's comment). Failing that, stay sealed.
            let keyring = match self.persist_rotation(&root).await {
                Ok(keyring) => keyring,
                Err(error) => {
                    *self.state.write() = State::Sealed(None);
                    tracing::warn!(%error, "Unseal could not add a key term of its own; progress reset");
                    return Err(error);
                }
            };
            let term = keyring.active_term();
            *self.state.write() = State::Unsealed {
                root: Some(root),
                keyring: Arc::new(keyring),
                decoded: Arc::default(),
            };
            tracing::info!(term, "Unsealed; writing under a key term of its own");
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
        Ok(Keyring::open_with(root, &sealed)?.with_max_operations(self.max_operations))
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

    /// Re-reads the keyring another replica may have rotated, for the terms it added:
    /// they become readable here, and this process goes on writing under its own term
    /// (V5: no term is written by two processes).
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
            if stored.terms().iter().any(|t| !keyring.terms().contains(t)) {
                *keyring = Arc::new(keyring.with_terms_of(stored)?);
            }
        }
        Ok(())
    }

    /// Adds a keyring term and makes it the one new writes use; old terms stay readable.
    /// Persisted before it is used (V4: a crash in between leaves a stored keyring that
    /// still opens everything written).
    pub async fn rotate(&self) -> Result<u32, SealError> {
        let root = {
            let state = self.state.read();
            let State::Unsealed { root: Some(root), .. } = &*state else {
                return Err(SealError::Sealed);
            };
            RootKey::from_bytes(root.as_bytes())?
        };
        let next = self.persist_rotation(&root).await?;
        let term = next.active_term();
        #[cfg(test)]
        if self
            .crash_after_persist
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(term);
        }
        if let State::Unsealed { keyring, .. } = &mut *self.state.write() {
            *keyring = Arc::new(next);
        }
        tracing::info!(term, "Keyring rotated");
        Ok(term)
    }

    /// Adds term n+1 (n the highest stored term) to the stored keyring under a
    /// conditional write, and returns the keyring with it active. Two processes racing
    /// get two different terms: the loser re-reads and takes the next.
    async fn persist_rotation(&self, root: &RootKey) -> Result<Keyring, SealError> {
        loop {
            let (mut config, version) = self.config(true).await?.ok_or(SealError::NotInitialized)?;
            let mut next = self.open_keyring(&config, root)?;
            next.try_rotate()?;
            config.sealed_keyring = B64.encode(next.seal_with(root)?);
            let bytes = serde_json::to_vec(&config).map_err(|e| SealError::Damaged(e.to_string()))?;
            match self
                .storage
                .put(SEAL_PATH, bytes, Precondition::Version(version))
                .await
            {
                Ok(_) => return Ok(next),
                Err(StorageError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{store::logical::Logical, store::storage::memory::Memory};

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
        // The unseal added term 2 (V5: a term of its own); `init` wrote under term 1.
        assert_eq!(seal.keyring().unwrap().active_term(), 2);
        let logical = Logical::new(backend.clone(), seal.clone(), Default::default());
        logical.put("t/old", &"before", Precondition::None).await.unwrap();
        assert_eq!(seal.rotate().await.unwrap(), 3);
        logical.put("t/new", &"after", Precondition::None).await.unwrap();
        let stored = backend.get("t/new").await.unwrap().unwrap();
        assert_eq!(
            &stored.value[1..5],
            &3u32.to_be_bytes(),
            "new writes use the new term"
        );

        // Sealed: nothing is readable; unsealed again (a restart): both are.
        seal.seal();
        assert!(matches!(
            logical.get::<String>("t/old").await,
            Err(crate::store::logical::LogicalError::Sealed)
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
        assert_eq!(restarted.keyring().unwrap().active_term(), 4);
    }

    #[tokio::test]
    async fn a_replica_that_missed_a_rotation_reads_the_new_term_and_keeps_its_own() {
        let (backend, seal) = fresh();
        let (one, two) = (Arc::new(seal), Arc::new(Seal::new(backend.clone())));
        let shares = one.init(1, 1, false).await.unwrap().shares;
        one.unseal(shares[0].clone()).await.unwrap();
        two.unseal(shares[0].clone()).await.unwrap();
        let (t1, t2) = (
            one.keyring().unwrap().active_term(),
            two.keyring().unwrap().active_term(),
        );
        assert_ne!(t1, t2, "each replica writes under a term of its own");
        let rotated = one.rotate().await.unwrap();
        let writer = Logical::new(backend.clone(), one, Default::default());
        writer.put("t/x", &1u32, Precondition::None).await.unwrap();
        let reader = Logical::new(backend.clone(), two.clone(), Default::default());
        assert_eq!(reader.get::<u32>("t/x").await.unwrap().unwrap().value, 1);
        assert!(two.keyring().unwrap().terms().contains(&rotated));
        assert_eq!(
            two.keyring().unwrap().active_term(),
            t2,
            "V5: never adopts another's term"
        );
        reader.put("t/y", &2u32, Precondition::None).await.unwrap();
        let stored = backend.get("t/y").await.unwrap().unwrap();
        assert_eq!(&stored.value[1..5], &t2.to_be_bytes());
    }

    /// Counts the barrier envelopes written to storage, by key term: every one is an
    /// encryption under that term.
    #[derive(Default)]
    struct CountingBackend {
        inner: Memory,
        by_term: parking_lot::Mutex<std::collections::BTreeMap<u32, u64>>,
    }

    impl Backend for CountingBackend {
        fn get<'a>(
            &'a self,
            path: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<Option<crate::store::storage::Stored>, StorageError>>
        {
            self.inner.get(path)
        }
        fn get_fresh<'a>(
            &'a self,
            path: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<Option<crate::store::storage::Stored>, StorageError>>
        {
            self.inner.get_fresh(path)
        }
        fn put<'a>(
            &'a self,
            path: &'a str,
            value: Vec<u8>,
            precondition: Precondition,
        ) -> futures::future::BoxFuture<'a, Result<u64, StorageError>> {
            if path != SEAL_PATH {
                let term = barrier::parse_header(&value).unwrap().term;
                *self.by_term.lock().entry(term).or_default() += 1;
            }
            self.inner.put(path, value, precondition)
        }
        fn delete<'a>(
            &'a self,
            path: &'a str,
            precondition: Precondition,
        ) -> futures::future::BoxFuture<'a, Result<(), StorageError>> {
            self.inner.delete(path, precondition)
        }
        fn paths<'a>(
            &'a self,
            prefix: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<Vec<String>, StorageError>> {
            self.inner.paths(prefix)
        }
    }

    /// V5 across restarts and replicas: the count of encryptions is per process, so a
    /// term must never be written by two processes (two runs of one engine, or two
    /// replicas). Six restarts, two replicas side by side, and one long-running writer,
    /// all with a bound of 8: no term ever has more than 8 envelopes.
    #[tokio::test]
    async fn v5_no_term_exceeds_its_bound_across_restarts_and_replicas() {
        const MAX: u64 = 8;
        let counting = Arc::new(CountingBackend::default());
        let backend: Arc<dyn Backend> = counting.clone();
        let start = || Arc::new(Seal::new(backend.clone()).with_max_operations(MAX));
        let initialized = start().init(1, 1, false).await.unwrap();
        let share = initialized.shares[0].clone();
        let init = Arc::new(Seal::for_init(backend.clone(), initialized.keyring));
        Logical::new(backend.clone(), init, Default::default())
            .put("t/init", &0u32, Precondition::None)
            .await
            .unwrap();
        let mut written = vec!["t/init".to_owned()];

        // Restarts: each run writes 6 (below the rotation threshold of 7).
        for run in 0..6 {
            let seal = start();
            seal.unseal(share.clone()).await.unwrap();
            let logical = Logical::new(backend.clone(), seal, Default::default());
            for i in 0..6 {
                let path = format!("t/run-{run}/{i}");
                logical.put(&path, &i, Precondition::None).await.unwrap();
                written.push(path);
            }
        }

        // Two replicas: one rotates, the other reads the new term and writes on.
        let (a, b) = (start(), start());
        a.unseal(share.clone()).await.unwrap();
        b.unseal(share.clone()).await.unwrap();
        let (la, lb) = (
            Logical::new(backend.clone(), a.clone(), Default::default()),
            Logical::new(backend.clone(), b.clone(), Default::default()),
        );
        for i in 0..3 {
            for (name, l) in [("a", &la), ("b", &lb)] {
                let path = format!("t/{name}/{i}");
                l.put(&path, &i, Precondition::None).await.unwrap();
                written.push(path);
            }
        }
        a.rotate().await.unwrap();
        la.put("t/a/rotated", &0u32, Precondition::None).await.unwrap();
        assert_eq!(lb.get::<u32>("t/a/rotated").await.unwrap().unwrap().value, 0);
        written.push("t/a/rotated".to_owned());
        for i in 3..6 {
            let path = format!("t/b/{i}");
            lb.put(&path, &i, Precondition::None).await.unwrap();
            written.push(path);
        }

        // One process writing far past the bound: it rotates by itself on the way.
        let long = start();
        long.unseal(share.clone()).await.unwrap();
        let logical = Logical::new(backend.clone(), long, Default::default());
        for i in 0..40 {
            let path = format!("t/long/{i}");
            logical.put(&path, &i, Precondition::None).await.unwrap();
            written.push(path);
            tokio::task::yield_now().await; // lets the spawned rotation run
        }

        let by_term = counting.by_term.lock().clone();
        for (term, count) in &by_term {
            assert!(
                *count <= MAX,
                "term {term}: {count} encryptions > {MAX}: {by_term:?}"
            );
        }
        // And nothing was lost: a last restart reads every entry.
        let last = start();
        last.unseal(share).await.unwrap();
        let logical = Logical::new(backend.clone(), last, Default::default());
        for path in &written {
            assert!(logical.get::<u32>(path).await.unwrap().is_some(), "{path}");
        }
    }

    /// V4: a crash between persisting the rotated keyring and swapping it in. The
    /// process goes on writing under its old term until it dies; after a restart every
    /// entry written before and after reads back, new writes use the newest term, and
    /// no stored entry names a term the keyring lacks. Three crashes in a row.
    #[tokio::test]
    async fn v4_a_crash_between_keyring_persist_and_swap_loses_nothing() {
        let (backend, seal) = fresh();
        let shares = seal.init(1, 1, false).await.unwrap().shares;
        let mut written = Vec::new();
        let mut persisted_terms = Vec::new();
        for crash in 0..3 {
            let seal = Arc::new(Seal::new(backend.clone()));
            seal.unseal(shares[0].clone()).await.unwrap();
            let logical = Logical::new(backend.clone(), seal.clone(), Default::default());
            for i in 0..20 {
                let path = format!("t/{crash}/before/{i}");
                logical.put(&path, &i, Precondition::None).await.unwrap();
                written.push(path);
            }
            seal.crash_after_persist
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let old = seal.keyring().unwrap().active_term();
            let persisted = seal.rotate().await.unwrap();
            assert!(persisted > old);
            assert_eq!(seal.keyring().unwrap().active_term(), old, "not swapped in");
            persisted_terms.push(persisted);
            // Writes between the persist and the crash, under the old term.
            for i in 0..20 {
                let path = format!("t/{crash}/after/{i}");
                logical.put(&path, &i, Precondition::None).await.unwrap();
                written.push(path);
            }
            drop(logical);
            drop(seal); // the crash: the swap never happens
        }

        let restarted = Arc::new(Seal::new(backend.clone()));
        restarted.unseal(shares[0].clone()).await.unwrap();
        let keyring = restarted.keyring().unwrap();
        let terms = keyring.terms();
        for t in &persisted_terms {
            assert!(terms.contains(t), "persisted term {t} kept: {terms:?}");
        }
        assert_eq!(keyring.active_term(), *terms.last().unwrap(), "the newest term");
        let logical = Logical::new(backend.clone(), restarted.clone(), Default::default());
        for (i, path) in written.iter().enumerate() {
            let got = logical.get::<usize>(path).await.unwrap().unwrap().value;
            assert_eq!(got, i % 20, "{path}");
        }
        logical.put("t/new", &1u32, Precondition::None).await.unwrap();
        let stored = backend.get("t/new").await.unwrap().unwrap();
        assert_eq!(
            barrier::parse_header(&stored.value).unwrap().term,
            keyring.active_term()
        );
        for path in backend.paths("t/").await.unwrap() {
            let stored = backend.get(&path).await.unwrap().unwrap();
            let term = barrier::parse_header(&stored.value).unwrap().term;
            assert!(terms.contains(&term), "{path} names unknown term {term}");
        }
    }
}
