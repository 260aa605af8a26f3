//! The KV version 2 secrets engine: every write makes a new version; the newest
//! `max_versions` are kept; versions can be soft-deleted (and undeleted) or destroyed
//! (data gone for good); metadata (custom keys, max versions, check-and-set) per key.
//! A key and all its versions are one storage entry, so each write is one conditional
//! update: two writers never get the same version number and neither update is lost.

use crate::{
    store::logical::{Logical, LogicalError},
    store::storage::Precondition,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Versions kept per key when neither the key nor the mount says (Vault's default).
pub const DEFAULT_MAX_VERSIONS: u64 = 10;

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct MountConfig {
    /// 0: the default (10).
    #[serde(default)]
    pub max_versions: u64,
    #[serde(default)]
    pub cas_required: bool,
    /// Versions are soft-deleted this long after they are written ("0s": never).
    #[serde(default = "zero_duration")]
    pub delete_version_after: String,
}

fn zero_duration() -> String {
    "0s".into()
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct VersionEntry {
    pub created_time: String,
    /// Empty when not deleted.
    pub deletion_time: String,
    pub destroyed: bool,
    /// None once destroyed.
    pub data: Option<Map<String, Value>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct KeyEntry {
    pub current_version: u64,
    pub oldest_version: u64,
    /// 0: the mount's setting.
    pub max_versions: u64,
    pub cas_required: bool,
    pub delete_version_after: String,
    pub created_time: String,
    pub updated_time: String,
    pub custom_metadata: BTreeMap<String, String>,
    pub versions: BTreeMap<u64, VersionEntry>,
}

/// A version's metadata as the API shows it (no data).
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct VersionMetadata {
    pub created_time: String,
    pub custom_metadata: Option<BTreeMap<String, String>>,
    pub deletion_time: String,
    pub destroyed: bool,
    pub version: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error(transparent)]
    Storage(#[from] LogicalError),
    /// 400 with this message (Vault's wording where it has one).
    #[error("{0}")]
    Invalid(String),
    #[error("check-and-set parameter did not match the current version")]
    CasMismatch,
    #[error("check-and-set parameter required for this call")]
    CasRequired,
}

/// Options of a write (`options` in the request body).
#[derive(Deserialize, Default, Debug)]
pub struct WriteOptions {
    pub cas: Option<u64>,
}

/// What a read finds.
pub enum Read {
    /// No such key, or no such version.
    Missing,
    /// The version exists; `data` is None when it is deleted or destroyed.
    Found {
        data: Option<Map<String, Value>>,
        metadata: VersionMetadata,
    },
}

#[derive(Clone)]
pub struct Kv {
    logical: Logical,
    mount: String,
}

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

/// Key names: what a path below `data/` may be.
fn check_key(key: &str) -> Result<(), KvError> {
    let bad = key.is_empty()
        || key.ends_with('/')
        || key.split('/').any(|s| s.is_empty() || s == "." || s == "..")
        || key.chars().any(char::is_control);
    if bad {
        return Err(KvError::Invalid(format!("invalid key {key:?}")));
    }
    Ok(())
}

impl KeyEntry {
    fn metadata_of(&self, version: u64) -> Option<VersionMetadata> {
        self.versions.get(&version).map(|v| VersionMetadata {
            created_time: v.created_time.clone(),
            custom_metadata: Some(self.custom_metadata.clone()).filter(|m| !m.is_empty()),
            deletion_time: v.deletion_time.clone(),
            destroyed: v.destroyed,
            version,
        })
    }

    /// The metadata endpoint's view.
    pub fn to_json(&self) -> Value {
        let versions: Map<String, Value> = self
            .versions
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    serde_json::json!({
                        "created_time": v.created_time,
                        "deletion_time": v.deletion_time,
                        "destroyed": v.destroyed,
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "cas_required": self.cas_required,
            "created_time": self.created_time,
            "current_version": self.current_version,
            "custom_metadata": if self.custom_metadata.is_empty() { Value::Null } else { serde_json::to_value(&self.custom_metadata).unwrap_or_default() },
            "delete_version_after": self.delete_version_after,
            "max_versions": self.max_versions,
            "oldest_version": self.oldest_version,
            "updated_time": self.updated_time,
            "versions": versions,
        })
    }
}

impl Kv {
    pub fn new(logical: Logical, mount: &str) -> Self {
        Self {
            logical,
            mount: mount.trim_end_matches('/').to_owned(),
        }
    }

    pub fn mount(&self) -> &str {
        &self.mount
    }

    fn path(&self, key: &str) -> String {
        format!("logical/{}/{key}", self.mount)
    }

    fn config_path(&self) -> String {
        format!("config/{}/kv", self.mount)
    }

    pub async fn config(&self) -> Result<MountConfig, KvError> {
        Ok(self
            .logical
            .get::<MountConfig>(&self.config_path())
            .await?
            .map(|v| v.value)
            .unwrap_or_else(|| MountConfig {
                delete_version_after: zero_duration(),
                ..Default::default()
            }))
    }

    pub async fn set_config(&self, config: MountConfig) -> Result<(), KvError> {
        self.logical
            .put(&self.config_path(), &config, Precondition::None)
            .await?;
        Ok(())
    }

    pub async fn exists(&self, key: &str) -> Result<bool, KvError> {
        check_key(key)?;
        Ok(self.logical.get::<KeyEntry>(&self.path(key)).await?.is_some())
    }

    pub async fn write(
        &self,
        key: &str,
        data: Map<String, Value>,
        options: WriteOptions,
    ) -> Result<VersionMetadata, KvError> {
        check_key(key)?;
        let config = self.config().await?;
        let time = now();
        let written = self
            .logical
            .update::<KeyEntry, KvError, _>(&self.path(key), |current| {
                let mut entry = current.unwrap_or_else(|| KeyEntry {
                    created_time: time.clone(),
                    delete_version_after: zero_duration(),
                    ..Default::default()
                });
                match options.cas {
                    Some(cas) if cas != entry.current_version => return Err(KvError::CasMismatch),
                    None if config.cas_required || entry.cas_required => return Err(KvError::CasRequired),
                    _ => {}
                }
                entry.current_version += 1;
                let version = entry.current_version;
                entry.versions.insert(
                    version,
                    VersionEntry {
                        created_time: time.clone(),
                        deletion_time: String::new(),
                        destroyed: false,
                        data: Some(data.clone()),
                    },
                );
                entry.updated_time = time.clone();
                let max = match (entry.max_versions, config.max_versions) {
                    (0, 0) => DEFAULT_MAX_VERSIONS,
                    (0, m) | (m, _) => m,
                };
                while entry.versions.len() as u64 > max {
                    entry.versions.pop_first();
                }
                entry.oldest_version = entry.versions.keys().next().copied().unwrap_or(version);
                Ok(Some(entry))
            })
            .await??
            .expect("a write stores an entry");
        Ok(written
            .metadata_of(written.current_version)
            .expect("the version just written"))
    }

    /// A version (0 or None: the current one).
    pub async fn read(&self, key: &str, version: Option<u64>) -> Result<Read, KvError> {
        check_key(key)?;
        // Shared: a key read over and over is decrypted and decoded once per version.
        let Some(entry) = self.logical.get_shared::<KeyEntry>(&self.path(key)).await? else {
            return Ok(Read::Missing);
        };
        let entry = entry.value;
        let version = version.filter(|v| *v > 0).unwrap_or(entry.current_version);
        let Some(metadata) = entry.metadata_of(version) else {
            return Ok(Read::Missing);
        };
        let stored = &entry.versions[&version];
        let data = if stored.destroyed || !stored.deletion_time.is_empty() {
            None
        } else {
            stored.data.clone()
        };
        Ok(Read::Found { data, metadata })
    }

    async fn change_versions(
        &self,
        key: &str,
        versions: &[u64],
        change: impl Fn(&mut VersionEntry, &str),
    ) -> Result<(), KvError> {
        check_key(key)?;
        if versions.is_empty() {
            return Err(KvError::Invalid("no versions provided".into()));
        }
        let time = now();
        self.logical
            .update::<KeyEntry, KvError, _>(&self.path(key), |current| {
                let Some(mut entry) = current else { return Ok(None) };
                for v in versions {
                    if let Some(version) = entry.versions.get_mut(v) {
                        change(version, &time);
                    }
                }
                entry.updated_time = time.clone();
                Ok(Some(entry))
            })
            .await??;
        Ok(())
    }

    /// Soft-deletes versions (recoverable with `undelete`).
    pub async fn delete_versions(&self, key: &str, versions: &[u64]) -> Result<(), KvError> {
        self.change_versions(key, versions, |v, time| {
            if v.deletion_time.is_empty() && !v.destroyed {
                v.deletion_time = time.to_owned();
            }
        })
        .await
    }

    /// Soft-deletes the current version.
    pub async fn delete_latest(&self, key: &str) -> Result<(), KvError> {
        check_key(key)?;
        let Some(entry) = self.logical.get::<KeyEntry>(&self.path(key)).await? else {
            return Ok(());
        };
        self.delete_versions(key, &[entry.value.current_version]).await
    }

    pub async fn undelete_versions(&self, key: &str, versions: &[u64]) -> Result<(), KvError> {
        self.change_versions(key, versions, |v, _| {
            if !v.destroyed {
                v.deletion_time.clear();
            }
        })
        .await
    }

    /// Destroys versions: their data is removed from storage for good.
    pub async fn destroy_versions(&self, key: &str, versions: &[u64]) -> Result<(), KvError> {
        self.change_versions(key, versions, |v, _| {
            v.destroyed = true;
            v.data = None;
        })
        .await
    }

    pub async fn metadata(&self, key: &str) -> Result<Option<KeyEntry>, KvError> {
        check_key(key)?;
        Ok(self
            .logical
            .get::<KeyEntry>(&self.path(key))
            .await?
            .map(|v| v.value))
    }

    /// Sets the key's own settings (creating an empty key if needed).
    pub async fn write_metadata(
        &self,
        key: &str,
        max_versions: Option<u64>,
        cas_required: Option<bool>,
        delete_version_after: Option<String>,
        custom_metadata: Option<BTreeMap<String, String>>,
    ) -> Result<(), KvError> {
        check_key(key)?;
        let time = now();
        self.logical
            .update::<KeyEntry, KvError, _>(&self.path(key), |current| {
                let mut entry = current.unwrap_or_else(|| KeyEntry {
                    created_time: time.clone(),
                    delete_version_after: zero_duration(),
                    ..Default::default()
                });
                if let Some(m) = max_versions {
                    entry.max_versions = m;
                }
                if let Some(c) = cas_required {
                    entry.cas_required = c;
                }
                if let Some(d) = &delete_version_after {
                    entry.delete_version_after = d.clone();
                }
                if let Some(custom) = &custom_metadata {
                    entry.custom_metadata = custom.clone();
                }
                entry.updated_time = time.clone();
                Ok(Some(entry))
            })
            .await??;
        Ok(())
    }

    /// Removes the key, every version and its metadata.
    pub async fn delete_metadata(&self, key: &str) -> Result<(), KvError> {
        check_key(key)?;
        self.logical.delete(&self.path(key), Precondition::None).await?;
        Ok(())
    }

    /// The keys and folders directly below `prefix` ("" or ending in `/`).
    pub async fn list(&self, folder: &str) -> Result<Vec<String>, KvError> {
        let folder = folder.trim_end_matches('/');
        if !folder.is_empty() {
            check_key(folder)?;
        }
        let prefix = if folder.is_empty() {
            format!("logical/{}/", self.mount)
        } else {
            format!("logical/{}/{folder}/", self.mount)
        };
        Ok(self.logical.list(&prefix).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    async fn kv() -> Kv {
        Kv::new(crate::auth::token::tests::unsealed().await, "secret")
    }

    fn data(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[tokio::test]
    async fn versions_soft_delete_undelete_destroy() {
        let kv = kv().await;
        for i in 1..=3 {
            let m = kv
                .write(
                    "app/db",
                    data(json!({"password": format!("p{i}")})),
                    WriteOptions::default(),
                )
                .await
                .unwrap();
            assert_eq!(m.version, i);
        }
        let Read::Found {
            data: Some(d),
            metadata,
        } = kv.read("app/db", None).await.unwrap()
        else {
            panic!()
        };
        assert_eq!((d["password"].as_str(), metadata.version), (Some("p3"), 3));
        let Read::Found { data: Some(d), .. } = kv.read("app/db", Some(1)).await.unwrap() else {
            panic!()
        };
        assert_eq!(d["password"], "p1");

        kv.delete_latest("app/db").await.unwrap();
        let Read::Found { data: None, metadata } = kv.read("app/db", None).await.unwrap() else {
            panic!()
        };
        assert!(!metadata.deletion_time.is_empty());
        kv.undelete_versions("app/db", &[3]).await.unwrap();
        assert!(matches!(
            kv.read("app/db", None).await.unwrap(),
            Read::Found { data: Some(_), .. }
        ));
        kv.destroy_versions("app/db", &[2]).await.unwrap();
        let Read::Found { data: None, metadata } = kv.read("app/db", Some(2)).await.unwrap() else {
            panic!()
        };
        assert!(metadata.destroyed);
        kv.undelete_versions("app/db", &[2]).await.unwrap();
        assert!(
            matches!(
                kv.read("app/db", Some(2)).await.unwrap(),
                Read::Found { data: None, .. }
            ),
            "destroyed stays destroyed"
        );
        assert_eq!(kv.list("").await.unwrap(), ["app/"]);
        assert_eq!(kv.list("app/").await.unwrap(), ["db"]);
        kv.delete_metadata("app/db").await.unwrap();
        assert!(matches!(kv.read("app/db", None).await.unwrap(), Read::Missing));
    }

    #[tokio::test]
    async fn check_and_set_and_max_versions() {
        let kv = kv().await;
        kv.write("k", data(json!({"a": 1})), WriteOptions { cas: Some(0) })
            .await
            .unwrap();
        assert!(matches!(
            kv.write("k", data(json!({"a": 2})), WriteOptions { cas: Some(0) })
                .await,
            Err(KvError::CasMismatch)
        ));
        kv.write("k", data(json!({"a": 2})), WriteOptions { cas: Some(1) })
            .await
            .unwrap();
        kv.write_metadata("k", Some(2), Some(true), None, None)
            .await
            .unwrap();
        assert!(matches!(
            kv.write("k", data(json!({"a": 3})), WriteOptions::default())
                .await,
            Err(KvError::CasRequired)
        ));
        kv.write("k", data(json!({"a": 3})), WriteOptions { cas: Some(2) })
            .await
            .unwrap();
        let meta = kv.metadata("k").await.unwrap().unwrap();
        assert_eq!(
            (meta.current_version, meta.oldest_version, meta.versions.len()),
            (3, 2, 2)
        );
        assert!(matches!(kv.read("k", Some(1)).await.unwrap(), Read::Missing));
    }

    #[tokio::test]
    async fn concurrent_writers_lose_no_version() {
        let kv = kv().await;
        let writers: Vec<_> = (0..16)
            .map(|i| {
                let kv = kv.clone();
                tokio::spawn(async move {
                    kv.write("race", data(json!({"writer": i})), WriteOptions::default())
                        .await
                        .unwrap()
                        .version
                })
            })
            .collect();
        let mut versions = Vec::new();
        for w in writers {
            versions.push(w.await.unwrap());
        }
        versions.sort();
        assert_eq!(versions, (1..=16).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn bad_keys_are_refused() {
        let kv = kv().await;
        for key in ["", "a/", "a//b", "../x", "a/../b"] {
            assert!(
                matches!(kv.read(key, None).await, Err(KvError::Invalid(_))),
                "{key:?}"
            );
        }
    }
}
