//! Stored ACL policies (`sys/policies/acl/<name>`) and the compiled ACL of a set of
//! them. `root` is built in and cannot be written; `default` is built in until someone
//! writes their own. Compiled ACLs are cached by (name, storage version) of every policy
//! in the set, so a change by any replica is seen at its next request.

use crate::{
    declared::Declared,
    policy::{Acl, DEFAULT_POLICY, Policy},
    store::logical::{Logical, LogicalError},
    store::storage::Precondition,
};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use std::{collections::HashMap, sync::Arc};

const PREFIX: &str = "sys/policy/";

#[derive(Serialize, Deserialize)]
struct StoredPolicy {
    name: String,
    policy: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyStoreError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot {0} the root policy")]
    Root(&'static str),
    #[error("policy {0:?} is declared by a SecretPolicy object; change it there")]
    Declared(String),
    #[error(transparent)]
    Storage(#[from] LogicalError),
}

type CacheKey = Vec<(String, u64)>;

#[derive(Clone)]
pub struct Policies {
    logical: Logical,
    declared: Arc<Declared>,
    cache: Arc<RwLock<HashMap<CacheKey, Arc<Acl>>>>,
}

/// Policy names are case-insensitive in Vault: stored and matched lowercased.
pub fn canonical(name: &str) -> String {
    name.trim().to_lowercase()
}

impl Policies {
    pub fn new(logical: Logical, declared: Arc<Declared>) -> Self {
        Self {
            logical,
            declared,
            cache: Arc::default(),
        }
    }

    fn path(name: &str) -> String {
        format!("{PREFIX}{name}")
    }

    pub async fn write(&self, name: &str, text: &str) -> Result<(), PolicyStoreError> {
        let name = canonical(name);
        if name == "root" {
            return Err(PolicyStoreError::Root("write"));
        }
        if self.declared.policy(&name).is_some() {
            return Err(PolicyStoreError::Declared(name));
        }
        // Parsing validates the name (no `/`, `..`, control characters) and the rules.
        Policy::parse(&name, text).map_err(|e| PolicyStoreError::Invalid(e.to_string()))?;
        self.logical
            .put(
                &Self::path(&name),
                &StoredPolicy {
                    name: name.clone(),
                    policy: text.to_owned(),
                },
                Precondition::None,
            )
            .await?;
        Ok(())
    }

    pub async fn read(&self, name: &str) -> Result<Option<String>, PolicyStoreError> {
        let name = canonical(name);
        if name == "root" {
            return Ok(Some(String::new()));
        }
        if let Some((_, text)) = self.declared.policy(&name) {
            return Ok(Some(text));
        }
        if Policy::parse(&name, "").is_err() {
            return Ok(None);
        }
        let stored = self.logical.get::<StoredPolicy>(&Self::path(&name)).await?;
        Ok(match stored {
            Some(s) => Some(s.value.policy),
            None if name == "default" => Some(DEFAULT_POLICY.to_owned()),
            None => None,
        })
    }

    pub async fn delete(&self, name: &str) -> Result<(), PolicyStoreError> {
        let name = canonical(name);
        match name.as_str() {
            "root" => Err(PolicyStoreError::Root("delete")),
            "default" => Err(PolicyStoreError::Invalid(
                "cannot delete the default policy".into(),
            )),
            _ => {
                if Policy::parse(&name, "").is_err() {
                    return Ok(());
                }
                self.logical
                    .delete(&Self::path(&name), Precondition::None)
                    .await?;
                Ok(())
            }
        }
    }

    pub async fn list(&self) -> Result<Vec<String>, PolicyStoreError> {
        let mut names = self.logical.list(PREFIX).await?;
        names.extend(["default".to_owned(), "root".to_owned()]);
        names.extend(self.declared.policy_names());
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// The ACL a token with `names` has. Unknown names grant nothing. The texts are only
    /// parsed when the ACL of these policy versions is not cached yet, so they are held as
    /// found, not copied.
    pub async fn acl(&self, names: &[String]) -> Result<Arc<Acl>, PolicyStoreError> {
        if names.iter().any(|n| n == "root") {
            static ROOT: std::sync::LazyLock<Arc<Acl>> = std::sync::LazyLock::new(|| Arc::new(Acl::root()));
            return Ok(ROOT.clone());
        }
        let mut key: CacheKey = Vec::with_capacity(names.len());
        let mut texts = Vec::with_capacity(names.len());
        for name in names {
            let name = canonical(name);
            if let Some((_, text)) = self.declared.policy(&name) {
                // Declared text changes are told apart by their hash (no storage version).
                let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
                let version =
                    u64::from_be_bytes(digest.as_ref()[..8].try_into().unwrap_or_default()) | 1 << 63;
                key.push((name.clone(), version));
                texts.push((name, Some(Text::Declared(text))));
                continue;
            }
            let stored = self
                .logical
                .get_shared::<StoredPolicy>(&Self::path(&name))
                .await?;
            let (version, text) = match stored {
                Some(s) => (s.version, Some(Text::Stored(s.value))),
                None if name == "default" => (0, Some(Text::Default)),
                None => (0, None),
            };
            key.push((name.clone(), version));
            texts.push((name, text));
        }
        key.sort();
        if let Some(acl) = self.cache.read().get(&key) {
            return Ok(acl.clone());
        }
        let policies: Vec<Policy> = texts
            .into_iter()
            .filter_map(|(name, text)| {
                let text = text?;
                match Policy::parse(&name, text.as_str()) {
                    Ok(p) => Some(p),
                    Err(error) => {
                        // Stored policies were parsed when written; one that no longer
                        // parses (an older engine wrote it) grants nothing.
                        tracing::error!(policy = %name, %error, "A stored policy does not parse; it grants nothing");
                        None
                    }
                }
            })
            .collect();
        let acl = Arc::new(Acl::new(&policies));
        let mut cache = self.cache.write();
        if cache.len() > 4096 {
            cache.clear();
        }
        cache.insert(key, acl.clone());
        Ok(acl)
    }
}

/// A policy's text as found for an ACL.
enum Text {
    Declared(String),
    /// Shared with the decoded-value cache.
    Stored(Arc<StoredPolicy>),
    Default,
}

impl Text {
    fn as_str(&self) -> &str {
        match self {
            Self::Declared(text) => text,
            Self::Stored(stored) => &stored.policy,
            Self::Default => DEFAULT_POLICY,
        }
    }
}
