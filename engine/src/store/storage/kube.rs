//! Storage in StorageEntry objects of the engine's namespace. One object per path, named
//! by the SHA-256 of the path (paths are longer and freer than object names). Reads come
//! from a cache the watch keeps current, so a read costs no API call; writes go to the
//! API server with the resourceVersion they were based on as a precondition (409 when
//! another writer came first: nobody's update is lost), and the cache takes the written
//! object at once, so a replica reads its own writes.

use super::{Backend, MAX_VALUE, Precondition, StorageError, Stored, check_path};
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use capstan_crds::{StorageEntry, StorageEntrySpec};
use futures::{
    StreamExt as _,
    future::{BoxFuture, FutureExt as _},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, PostParams, Preconditions},
    runtime::{WatchStreamExt as _, watcher},
};
use parking_lot::RwLock;
use std::{collections::BTreeMap, sync::Arc};
use tokio::sync::watch;

/// What the cache holds per path: the value, or a tombstone for a path this replica
/// deleted, so a watch event older than the delete cannot bring it back.
#[derive(Clone)]
struct Cached {
    version: u64,
    value: Option<Arc<[u8]>>,
}

pub struct KubeStorage {
    api: Api<StorageEntry>,
    cache: RwLock<BTreeMap<String, Cached>>,
    synced: watch::Sender<bool>,
}

/// The object name for a storage path.
pub fn object_name(path: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, path.as_bytes());
    format!("e-{}", hex::encode(digest.as_ref()))
}

fn version_of(entry: &StorageEntry) -> u64 {
    // resourceVersion is opaque by contract but etcd's revision in every API server we
    // run on; a value that does not parse sorts first, so the next event replaces it.
    entry
        .metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn decode(entry: &StorageEntry) -> Option<Arc<[u8]>> {
    match B64.decode(&entry.spec.value) {
        Ok(bytes) => Some(bytes.into()),
        Err(_) => {
            tracing::error!(path = %entry.spec.path, "A storage entry's value is not base64; ignoring it");
            None
        }
    }
}

fn unavailable(error: kube::Error) -> StorageError {
    StorageError::Unavailable(error.to_string())
}

fn is_code(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == code)
}

impl KubeStorage {
    /// Starts following the namespace's entries; `synced` turns true once the first list
    /// is in the cache (requests wait for it).
    pub fn start(client: Client, namespace: &str) -> Arc<Self> {
        let storage = Arc::new(Self {
            api: Api::namespaced(client, namespace),
            cache: RwLock::default(),
            synced: watch::Sender::new(false),
        });
        tokio::spawn(storage.clone().follow());
        storage
    }

    /// Resolves once the cache holds the first complete list.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|synced| *synced).await;
    }

    async fn follow(self: Arc<Self>) {
        let mut events = watcher(self.api.clone(), watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut relist: BTreeMap<String, Cached> = BTreeMap::new();
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Init) => relist.clear(),
                Ok(watcher::Event::InitApply(entry)) => {
                    if let Some(value) = decode(&entry) {
                        let version = version_of(&entry);
                        relist.insert(
                            entry.spec.path,
                            Cached {
                                version,
                                value: Some(value),
                            },
                        );
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    let mut cache = self.cache.write();
                    let listed = std::mem::take(&mut relist);
                    // Keep what this replica wrote after the list was taken: newer than
                    // anything listed (the list's own resourceVersion is not exposed; the
                    // newest listed object is a lower bound of it). An entry another
                    // replica deleted between that bound and the list may linger until
                    // its path is next written or listed.
                    let newest_listed = listed.values().map(|c| c.version).max().unwrap_or(0);
                    let mut next = listed;
                    for (path, cached) in cache.iter() {
                        if cached.value.is_some() && cached.version > newest_listed {
                            next.insert(path.clone(), cached.clone());
                        }
                    }
                    *cache = next;
                    drop(cache);
                    self.synced.send_replace(true);
                }
                Ok(watcher::Event::Apply(entry)) => {
                    if let Some(value) = decode(&entry) {
                        self.remember(&entry.spec.path, version_of(&entry), Some(value));
                    }
                }
                Ok(watcher::Event::Delete(entry)) => {
                    let version = version_of(&entry);
                    let mut cache = self.cache.write();
                    if cache.get(&entry.spec.path).is_none_or(|c| c.version <= version) {
                        cache.remove(&entry.spec.path);
                    }
                }
                Err(error) => tracing::warn!(%error, "Watching the storage entries; retrying"),
            }
        }
    }

    /// Takes `value` at `version` unless the cache already has something newer.
    fn remember(&self, path: &str, version: u64, value: Option<Arc<[u8]>>) {
        let mut cache = self.cache.write();
        match cache.get(path) {
            Some(current) if current.version > version => {}
            _ => {
                cache.insert(path.to_owned(), Cached { version, value });
            }
        }
    }

    fn entry(path: &str, value: &[u8], version: Option<u64>) -> StorageEntry {
        StorageEntry {
            metadata: ObjectMeta {
                name: Some(object_name(path)),
                resource_version: version.map(|v| v.to_string()),
                ..Default::default()
            },
            spec: StorageEntrySpec {
                path: path.to_owned(),
                value: B64.encode(value),
            },
        }
    }

    async fn fetch(&self, path: &str) -> Result<Option<Stored>, StorageError> {
        check_path(path)?;
        match self.api.get_opt(&object_name(path)).await.map_err(unavailable)? {
            Some(entry) if entry.spec.path == path => {
                let version = version_of(&entry);
                let value = decode(&entry);
                self.remember(path, version, value.clone());
                Ok(value.map(|value| Stored { value, version }))
            }
            Some(entry) => Err(StorageError::Unavailable(format!(
                "object {} holds path {:?}, not {path:?}",
                object_name(path),
                entry.spec.path
            ))),
            None => Ok(None),
        }
    }

    async fn write(
        &self,
        path: &str,
        value: Vec<u8>,
        precondition: Precondition,
    ) -> Result<u64, StorageError> {
        check_path(path)?;
        if value.len() > MAX_VALUE {
            return Err(StorageError::TooLarge {
                path: path.to_owned(),
                size: value.len(),
            });
        }
        let conflict = || StorageError::Conflict(path.to_owned());
        let pp = PostParams::default();
        let written = match precondition {
            Precondition::Absent => self
                .api
                .create(&pp, &Self::entry(path, &value, None))
                .await
                .map_err(|e| {
                    if is_code(&e, 409) {
                        conflict()
                    } else {
                        unavailable(e)
                    }
                })?,
            Precondition::Version(v) => self
                .api
                .replace(&object_name(path), &pp, &Self::entry(path, &value, Some(v)))
                .await
                .map_err(|e| {
                    if is_code(&e, 409) || is_code(&e, 404) {
                        conflict()
                    } else {
                        unavailable(e)
                    }
                })?,
            Precondition::None => {
                // Last writer wins, built from the two conditional writes.
                let mut known = self.get_cached(path).map(|s| s.version);
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    let result = match known {
                        Some(v) => {
                            self.api
                                .replace(&object_name(path), &pp, &Self::entry(path, &value, Some(v)))
                                .await
                        }
                        None => self.api.create(&pp, &Self::entry(path, &value, None)).await,
                    };
                    match result {
                        Ok(written) => break written,
                        Err(e) if attempts < 8 && (is_code(&e, 409) || is_code(&e, 404)) => {
                            known = self.fetch(path).await?.map(|s| s.version);
                        }
                        Err(e) => return Err(unavailable(e)),
                    }
                }
            }
        };
        let version = version_of(&written);
        self.remember(path, version, Some(value.into()));
        Ok(version)
    }

    fn get_cached(&self, path: &str) -> Option<Stored> {
        let cache = self.cache.read();
        let cached = cache.get(path)?;
        Some(Stored {
            value: cached.value.clone()?,
            version: cached.version,
        })
    }

    async fn remove(&self, path: &str, precondition: Precondition) -> Result<(), StorageError> {
        check_path(path)?;
        let version = match precondition {
            Precondition::Version(v) => Some(v),
            Precondition::None => None,
            Precondition::Absent => {
                return match self.fetch(path).await? {
                    None => Ok(()),
                    Some(_) => Err(StorageError::Conflict(path.to_owned())),
                };
            }
        };
        let params = DeleteParams {
            preconditions: version.map(|v| Preconditions {
                resource_version: Some(v.to_string()),
                uid: None,
            }),
            ..Default::default()
        };
        match self.api.delete(&object_name(path), &params).await {
            Ok(_) => {}
            Err(e) if is_code(&e, 404) => {}
            Err(e) if is_code(&e, 409) => return Err(StorageError::Conflict(path.to_owned())),
            Err(e) => return Err(unavailable(e)),
        }
        // A tombstone at the version deleted: older watch events cannot revive it.
        let at = version
            .or_else(|| self.get_cached(path).map(|s| s.version))
            .unwrap_or(0);
        self.remember(path, at, None);
        Ok(())
    }
}

impl Backend for KubeStorage {
    fn get<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Option<Stored>, StorageError>> {
        let result = check_path(path).map(|()| self.get_cached(path));
        std::future::ready(result).boxed()
    }

    fn get_fresh<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Option<Stored>, StorageError>> {
        self.fetch(path).boxed()
    }

    fn put<'a>(
        &'a self,
        path: &'a str,
        value: Vec<u8>,
        precondition: Precondition,
    ) -> BoxFuture<'a, Result<u64, StorageError>> {
        self.write(path, value, precondition).boxed()
    }

    fn delete<'a>(
        &'a self,
        path: &'a str,
        precondition: Precondition,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        self.remove(path, precondition).boxed()
    }

    fn paths<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StorageError>> {
        let cache = self.cache.read();
        let paths = cache
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(_, c)| c.value.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        std::future::ready(Ok(paths)).boxed()
    }
}
