//! Tokens: what every authenticated request carries. A token is a random string the
//! caller holds; the engine stores only its SHA-256 (a leaked storage dump holds no
//! usable token), with its policies, its lifetime, and its parent: revoking a token
//! revokes every token created under it. An accessor names a token without being one.

use crate::{
    store::clock::now,
    store::logical::{Logical, LogicalError},
    store::storage::Precondition,
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use serde::{Deserialize, Serialize};
use std::{collections::BTreeMap, sync::Arc};

const ID_PREFIX: &str = "sys/token/id/";
const ACCESSOR_PREFIX: &str = "sys/token/accessor/";
const PARENT_PREFIX: &str = "sys/token/parent/";
/// `sys/token/pod/<pod uid>/<id hash>`: the tokens issued to one pod, so revoking a pod's
/// credentials reads its own entries, not every token.
const POD_PREFIX: &str = "sys/token/pod/";

/// The system-wide maximum lifetime (Vault's default, 32 days).
pub const MAX_TTL: u64 = 768 * 3600;

/// A stored token. `id_hash` is the SHA-256 of the token; the token itself is never
/// stored, logged or returned after its creation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TokenEntry {
    pub id_hash: String,
    pub accessor: String,
    pub policies: Vec<String>,
    /// The parent's `id_hash`; None for root and orphan tokens.
    pub parent: Option<String>,
    /// The path that created it (`auth/token/root`, `auth/token/create`,
    /// `auth/kubernetes/login`).
    pub path: String,
    pub display_name: String,
    pub meta: BTreeMap<String, String>,
    /// Unix seconds.
    pub creation_time: i64,
    /// The TTL last granted, seconds (0: never expires; only root tokens).
    pub ttl: u64,
    /// When it expires, unix seconds (None: never).
    pub expire_time: Option<i64>,
    /// The latest it may ever be renewed to, unix seconds (None: no bound).
    pub max_expire_time: Option<i64>,
    pub renewable: bool,
    /// Uses left (Vault's `num_uses`); 0: unlimited. Each authenticated request spends
    /// one; the request that spends the last is served and revokes the token.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub num_uses: u64,
    /// The UID of the pod a Kubernetes login's bound ServiceAccount token belonged to:
    /// `revoke_pod` revokes the token when that pod stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl TokenEntry {
    pub fn is_root(&self) -> bool {
        self.policies.iter().any(|p| p == "root")
    }

    pub fn expired(&self, now: i64) -> bool {
        self.expire_time.is_some_and(|t| t <= now)
    }

    /// Seconds left (0 for a token that never expires, as Vault reports it).
    pub fn ttl_left(&self, now: i64) -> u64 {
        self.expire_time.map_or(0, |t| (t - now).max(0) as u64)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("permission denied")]
    Invalid,
    #[error("{0}")]
    Request(String),
    #[error(transparent)]
    Storage(#[from] LogicalError),
}

/// What creating a token asks for.
#[derive(Clone, Debug, Default)]
pub struct NewToken {
    pub policies: Vec<String>,
    pub parent: Option<String>,
    pub path: String,
    pub display_name: String,
    pub meta: BTreeMap<String, String>,
    /// Requested TTL (0: the default).
    pub ttl: u64,
    /// Requested max TTL (0: the system maximum).
    pub max_ttl: u64,
    pub renewable: bool,
    /// Root tokens only: no expiry.
    pub no_expiry: bool,
    /// How many requests it may make (0: unlimited).
    pub num_uses: u64,
    /// The pod it is issued to (a Kubernetes login with a pod-bound token).
    pub pod_uid: Option<String>,
}

/// Whether `uid` can name a pod in a storage path: Kubernetes UIDs are UUIDs; anything
/// with a separator or beyond a UUID's alphabet is refused rather than escaped.
pub fn valid_pod_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= 64 && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn pod_path(pod_uid: &str, id_hash: &str) -> String {
    format!("{POD_PREFIX}{pod_uid}/{id_hash}")
}

pub fn hash(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    // Every request hashes its token: a table encode into a buffer, not `hex::encode`'s
    // char-by-char iterator. The buffer is exactly twice the digest, so it cannot fail.
    let mut out = [0u8; 64];
    let _ = hex::encode_to_slice(digest.as_ref(), &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn random(len: usize) -> String {
    let bytes: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
    B64URL.encode(bytes)
}

/// A token after `Tokens::spend_use`: its entry as the request sees it (the uses left
/// after this one) and whether it had a use limit at all.
#[derive(Debug)]
pub struct Spent {
    pub entry: Arc<TokenEntry>,
    /// The token has (had) a use limit, this request possibly its last use: a limited
    /// token whose last use this is shows `num_uses` 0, as an unlimited one does.
    pub limited: bool,
}

#[derive(Serialize, Deserialize)]
struct AccessorEntry {
    id_hash: String,
}

#[derive(Clone)]
pub struct Tokens {
    logical: Logical,
}

impl Tokens {
    pub fn new(logical: Logical) -> Self {
        Self { logical }
    }

    /// Creates a token; returns the token (shown once) and its entry. A child never
    /// outlives its parent.
    pub async fn create(
        &self,
        request: NewToken,
        parent: Option<&TokenEntry>,
    ) -> Result<(String, TokenEntry), TokenError> {
        if request.pod_uid.as_deref().is_some_and(|uid| !valid_pod_uid(uid)) {
            return Err(TokenError::Request("invalid pod uid".into()));
        }
        let now = now();
        let system_max = MAX_TTL;
        let max_ttl = if request.max_ttl == 0 {
            system_max
        } else {
            request.max_ttl.min(system_max)
        };
        let ttl = if request.ttl == 0 {
            max_ttl
        } else {
            request.ttl.min(max_ttl)
        };
        let (mut expire_time, mut max_expire_time) = if request.no_expiry {
            (None, None)
        } else {
            (Some(now + ttl as i64), Some(now + max_ttl as i64))
        };
        if let Some(parent) = parent
            && let Some(parent_max) = parent.expire_time
        {
            expire_time = Some(expire_time.map_or(parent_max, |t| t.min(parent_max)));
            max_expire_time = Some(max_expire_time.map_or(parent_max, |t| t.min(parent_max)));
        }
        let token = format!("hvs.{}", random(24));
        let entry = TokenEntry {
            id_hash: hash(&token),
            accessor: random(18),
            policies: request.policies,
            parent: request.parent,
            path: request.path,
            display_name: request.display_name,
            meta: request.meta,
            creation_time: now,
            ttl: expire_time.map_or(0, |t| (t - now).max(0) as u64),
            expire_time,
            max_expire_time,
            renewable: request.renewable && !request.no_expiry,
            num_uses: request.num_uses,
            pod_uid: request.pod_uid,
        };
        // The indexes first: a crash after them leaves an index pointing at nothing
        // (harmless), never a child its parent's revocation cannot find, nor a pod's
        // token `revoke_pod` cannot.
        if let Some(pod_uid) = &entry.pod_uid {
            self.logical
                .put(&pod_path(pod_uid, &entry.id_hash), &(), Precondition::None)
                .await?;
        }
        if let Some(parent) = &entry.parent {
            self.logical
                .put(
                    &format!("{PARENT_PREFIX}{parent}/{}", entry.id_hash),
                    &(),
                    Precondition::None,
                )
                .await?;
        }
        self.logical
            .put(
                &format!("{ACCESSOR_PREFIX}{}", entry.accessor),
                &AccessorEntry {
                    id_hash: entry.id_hash.clone(),
                },
                Precondition::Absent,
            )
            .await?;
        self.logical
            .put(
                &format!("{ID_PREFIX}{}", entry.id_hash),
                &entry,
                Precondition::Absent,
            )
            .await?;
        // The parent must still be live and unlimited now that the child is stored. Its
        // revocation (or its last use, which writes it expired before revoking it) may
        // have listed its children before this one's index existed, and a child found by
        // nobody would live on until its own expiry. Read from storage, not the cache: a
        // parent written expired before this read is seen here, and one written expired
        // after it is revoked with this child, whose index came first.
        if let Some(parent) = &entry.parent {
            let live = self
                .logical
                .get_fresh::<TokenEntry>(&format!("{ID_PREFIX}{parent}"))
                .await?
                .is_some_and(|p| !p.value.expired(crate::store::clock::now()) && p.value.num_uses == 0);
            if !live {
                self.revoke_hash(&entry.id_hash).await?;
                return Err(TokenError::Invalid);
            }
        }
        Ok((token, entry))
    }

    /// Every request looks its token up: the decoded entry is shared while storage
    /// holds the same version of it (a revocation or renewal is a new version, or none).
    async fn by_hash(&self, id_hash: &str) -> Result<Option<Arc<TokenEntry>>, TokenError> {
        if id_hash.len() != 64 || !id_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        Ok(self
            .logical
            .get_shared::<TokenEntry>(&format!("{ID_PREFIX}{id_hash}"))
            .await?
            .map(|v| v.value))
    }

    /// Whether a token (by hash) is still stored; an expired one not yet swept counts
    /// as gone.
    pub async fn exists_hash(&self, id_hash: &str) -> Result<bool, TokenError> {
        Ok(self.by_hash(id_hash).await?.is_some_and(|e| !e.expired(now())))
    }

    /// The live entry of `token`; an expired token is revoked here and refused.
    pub async fn lookup(&self, token: &str) -> Result<Arc<TokenEntry>, TokenError> {
        self.live(&hash(token)).await
    }

    async fn live(&self, id_hash: &str) -> Result<Arc<TokenEntry>, TokenError> {
        let entry = self.by_hash(id_hash).await?.ok_or(TokenError::Invalid)?;
        if entry.expired(now()) {
            let _ = self.revoke_hash(id_hash).await;
            return Err(TokenError::Invalid);
        }
        Ok(entry)
    }

    /// Spends one use of a limited-use token (Vault's `num_uses`; unlimited tokens are
    /// returned as they are, with no write). The count goes down under a conditional
    /// write, so two requests (on one replica or two) never spend the same use. The last
    /// use is claimed the same way, by writing the entry back expired (a conditional
    /// delete would not do: storage answers a delete of an entry already gone as done, so
    /// every request that saw the last use would think it had spent it); then the token
    /// is revoked with its children, accessor and parent index. The request that spent
    /// it is still served, as in Vault; the next one is refused.
    ///
    /// The entry returned shows the uses left, so after the last one its `num_uses` is 0,
    /// which on a stored entry means unlimited: whether the token was limited is
    /// `Spent::limited`, never the returned count.
    pub async fn spend_use(&self, token: &str, entry: Arc<TokenEntry>) -> Result<Spent, TokenError> {
        self.spend(&hash(token), entry).await
    }

    /// What every authenticated request does with the token it carries: `lookup`, then
    /// `spend_use`, hashing the token once.
    pub async fn authenticate(&self, token: &str) -> Result<Spent, TokenError> {
        let id_hash = hash(token);
        let entry = self.live(&id_hash).await?;
        self.spend(&id_hash, entry).await
    }

    async fn spend(&self, id_hash: &str, entry: Arc<TokenEntry>) -> Result<Spent, TokenError> {
        if entry.num_uses == 0 {
            return Ok(Spent {
                entry,
                limited: false,
            });
        }
        let now = now();
        let mut served: Option<TokenEntry> = None;
        self.logical
            .update::<TokenEntry, TokenError, _>(&format!("{ID_PREFIX}{id_hash}"), |current| {
                let mut entry = current.ok_or(TokenError::Invalid)?;
                // A stored count of 0 would mean unlimited: a limited token never gets
                // there unexpired, so it is refused rather than trusted.
                if entry.expired(now) || entry.num_uses == 0 {
                    return Err(TokenError::Invalid);
                }
                entry.num_uses -= 1;
                served = Some(entry.clone());
                if entry.num_uses == 0 {
                    entry.expire_time = Some(now);
                    entry.ttl = 0;
                }
                Ok(Some(entry))
            })
            .await??;
        let served = served.ok_or(TokenError::Invalid)?;
        if served.num_uses == 0 {
            self.revoke_hash(id_hash).await?;
        }
        Ok(Spent {
            entry: Arc::new(served),
            limited: true,
        })
    }

    pub async fn lookup_accessor(&self, accessor: &str) -> Result<Arc<TokenEntry>, TokenError> {
        let id_hash = self.accessor_hash(accessor).await?;
        self.live(&id_hash).await
    }

    async fn accessor_hash(&self, accessor: &str) -> Result<String, TokenError> {
        if accessor.is_empty() || accessor.contains('/') || accessor.len() > 64 {
            return Err(TokenError::Invalid);
        }
        Ok(self
            .logical
            .get::<AccessorEntry>(&format!("{ACCESSOR_PREFIX}{accessor}"))
            .await?
            .ok_or(TokenError::Invalid)?
            .value
            .id_hash)
    }

    /// Extends a token by `increment` seconds (0: its original TTL), never past its max.
    pub async fn renew(&self, token: &str, increment: u64) -> Result<TokenEntry, TokenError> {
        let path = format!("{ID_PREFIX}{}", hash(token));
        let now = now();
        let result = self
            .logical
            .update::<TokenEntry, TokenError, _>(&path, |current| {
                let mut entry = current.ok_or(TokenError::Invalid)?;
                if entry.expired(now) {
                    return Err(TokenError::Invalid);
                }
                if !entry.renewable {
                    return Err(TokenError::Request("this token is not renewable".into()));
                }
                let increment = if increment == 0 {
                    entry.ttl.max(1)
                } else {
                    increment
                };
                let max = entry.max_expire_time.unwrap_or(i64::MAX);
                if max <= now {
                    return Err(TokenError::Request("this token is past its max TTL".into()));
                }
                let expire = (now + increment as i64).min(max);
                entry.expire_time = Some(expire);
                entry.ttl = (expire - now) as u64;
                Ok(Some(entry))
            })
            .await?;
        result.map(|e| e.expect("renew writes an entry"))
    }

    /// Revokes `token` and every token created under it.
    pub async fn revoke(&self, token: &str) -> Result<(), TokenError> {
        self.revoke_hash(&hash(token)).await
    }

    pub async fn revoke_accessor(&self, accessor: &str) -> Result<(), TokenError> {
        let id_hash = self.accessor_hash(accessor).await?;
        self.revoke_hash(&id_hash).await
    }

    /// Children first, depth first: if revocation stops half way, what remains is still
    /// reachable from the parent, and revoking it again finishes the job.
    pub async fn revoke_hash(&self, id_hash: &str) -> Result<(), TokenError> {
        self.revoke_tree(id_hash, &mut Vec::new()).await
    }

    /// `revoke_hash`, adding to `revoked` the hash of every token it found stored (the
    /// token and its descendants), whose leases the caller revokes.
    fn revoke_tree<'a>(
        &'a self,
        id_hash: &'a str,
        revoked: &'a mut Vec<String>,
    ) -> futures::future::BoxFuture<'a, Result<(), TokenError>> {
        Box::pin(async move {
            let children_prefix = format!("{PARENT_PREFIX}{id_hash}/");
            for child in self.logical.list(&children_prefix).await? {
                self.revoke_tree(child.trim_end_matches('/'), revoked).await?;
                self.logical
                    .delete(&format!("{children_prefix}{child}"), Precondition::None)
                    .await?;
            }
            let path = format!("{ID_PREFIX}{id_hash}");
            if let Some(entry) = self.by_hash(id_hash).await? {
                self.logical
                    .delete(
                        &format!("{ACCESSOR_PREFIX}{}", entry.accessor),
                        Precondition::None,
                    )
                    .await?;
                if let Some(parent) = &entry.parent {
                    self.logical
                        .delete(&format!("{PARENT_PREFIX}{parent}/{id_hash}"), Precondition::None)
                        .await?;
                }
                if let Some(pod_uid) = &entry.pod_uid {
                    self.logical
                        .delete(&pod_path(pod_uid, id_hash), Precondition::None)
                        .await?;
                }
                revoked.push(id_hash.to_owned());
            }
            self.logical.delete(&path, Precondition::None).await?;
            Ok(())
        })
    }

    /// Revokes every token issued to pod `pod_uid`, with their descendants; returns the
    /// hashes of the tokens revoked (none when the pod has none left: asking again is
    /// harmless). Each token leaves the index with its own revocation, so a revocation
    /// that stops half way is finished by the next call.
    pub async fn revoke_pod(&self, pod_uid: &str) -> Result<Vec<String>, TokenError> {
        if !valid_pod_uid(pod_uid) {
            return Err(TokenError::Request("invalid pod uid".into()));
        }
        let mut revoked = Vec::new();
        for id_hash in self.logical.list(&format!("{POD_PREFIX}{pod_uid}/")).await? {
            let id_hash = id_hash.trim_end_matches('/');
            self.revoke_tree(id_hash, &mut revoked).await?;
            // An index a crashed creation left behind names no stored token.
            self.logical
                .delete(&pod_path(pod_uid, id_hash), Precondition::None)
                .await?;
        }
        Ok(revoked)
    }

    /// Every stored token entry.
    pub async fn entries(&self) -> Result<Vec<TokenEntry>, TokenError> {
        let mut entries = Vec::new();
        for id_hash in self.logical.list(ID_PREFIX).await? {
            if let Some(entry) = self.by_hash(&id_hash).await? {
                entries.push(TokenEntry::clone(&entry));
            }
        }
        Ok(entries)
    }

    /// Revokes every expired token (the sweeper calls this; lookups refuse them anyway).
    pub async fn sweep(&self) -> Result<usize, TokenError> {
        let now = now();
        let mut revoked = 0;
        for id_hash in self.logical.list(ID_PREFIX).await? {
            if let Some(entry) = self.by_hash(&id_hash).await?
                && entry.expired(now)
            {
                self.revoke_hash(&id_hash).await?;
                revoked += 1;
            }
        }
        Ok(revoked)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{store::seal::Seal, store::storage::memory::Memory};
    use std::sync::Arc;

    pub(crate) async fn unsealed() -> Logical {
        let backend: Arc<dyn crate::store::storage::Backend> = Arc::new(Memory::default());
        let seal = Arc::new(Seal::new(backend.clone()));
        let init = seal.init(1, 1, false).await.unwrap();
        seal.unseal(init.shares[0].clone()).await.unwrap();
        Logical::new(backend, seal, Default::default())
    }

    fn child(policies: &[&str], parent: &TokenEntry, ttl: u64) -> NewToken {
        NewToken {
            policies: policies.iter().map(|p| p.to_string()).collect(),
            parent: Some(parent.id_hash.clone()),
            path: "auth/token/create".into(),
            ttl,
            renewable: true,
            ..Default::default()
        }
    }

    /// Vault's num_uses (issue 15 item 11): each use spends one, the last is served and
    /// revokes the token (accessor too); two replicas racing for the last use cannot
    /// both have it.
    #[tokio::test]
    async fn a_limited_token_is_spent_once_per_use_across_replicas() {
        let (a, b) = crate::store::logical::tests::two_replicas().await;
        let (on_a, on_b) = (Tokens::new(a), Tokens::new(b));
        let (token, entry) = on_a
            .create(
                NewToken {
                    policies: vec!["app".into()],
                    ttl: 600,
                    num_uses: 3,
                    ..Default::default()
                },
                None,
            )
            .await
            .unwrap();
        let first = on_a
            .spend_use(&token, on_a.lookup(&token).await.unwrap())
            .await
            .unwrap();
        assert_eq!((first.entry.num_uses, first.limited), (2, true));
        let second = on_b
            .spend_use(&token, on_b.lookup(&token).await.unwrap())
            .await
            .unwrap();
        assert_eq!((second.entry.num_uses, second.limited), (1, true));
        // Both replicas saw one use left; only one may spend it.
        let (seen_a, seen_b) = (
            on_a.lookup(&token).await.unwrap(),
            on_b.lookup(&token).await.unwrap(),
        );
        let (x, y) = tokio::join!(on_a.spend_use(&token, seen_a), on_b.spend_use(&token, seen_b));
        assert_eq!(
            [x.is_ok(), y.is_ok()].iter().filter(|ok| **ok).count(),
            1,
            "{x:?} {y:?}"
        );
        // The last use shows 0 uses left, which alone would read as unlimited.
        let last = x.or(y).unwrap();
        assert_eq!((last.entry.num_uses, last.limited), (0, true));
        for tokens in [&on_a, &on_b] {
            assert!(matches!(tokens.lookup(&token).await, Err(TokenError::Invalid)));
            assert!(matches!(
                tokens.lookup_accessor(&entry.accessor).await,
                Err(TokenError::Invalid)
            ));
        }
        // Unlimited tokens are not written per use.
        let (free, _) = on_a
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
        for _ in 0..3 {
            let entry = on_a.lookup(&free).await.unwrap();
            let spent = on_a.spend_use(&free, entry).await.unwrap();
            assert_eq!((spent.entry.num_uses, spent.limited), (0, false));
        }
    }

    /// A child is stored only under a parent that is still live and unlimited when the
    /// child is: the entry the request holds (spent, revoked, limited) is not trusted.
    #[tokio::test]
    async fn no_child_is_left_under_a_spent_revoked_or_limited_parent() {
        let tokens = Tokens::new(unsealed().await);
        let ids = |tokens: &Tokens| {
            let tokens = tokens.clone();
            async move {
                let mut ids: Vec<String> = tokens
                    .entries()
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|e| e.id_hash)
                    .collect();
                ids.sort();
                ids
            }
        };
        let limited = |uses| NewToken {
            policies: vec!["app".into()],
            ttl: 600,
            num_uses: uses,
            ..Default::default()
        };
        // Spent by its last use: the request that spent it holds an entry showing 0 uses.
        let (one, _) = tokens.create(limited(1), None).await.unwrap();
        let spent = tokens
            .spend_use(&one, tokens.lookup(&one).await.unwrap())
            .await
            .unwrap();
        assert!(spent.limited);
        let before = ids(&tokens).await;
        let refused = tokens
            .create(child(&["app"], &spent.entry, 600), Some(&spent.entry))
            .await;
        assert!(matches!(refused, Err(TokenError::Invalid)), "{refused:?}");
        assert_eq!(ids(&tokens).await, before, "no child stored");
        // Still limited (two uses, one spent).
        let (two, _) = tokens.create(limited(2), None).await.unwrap();
        let entry = tokens
            .spend_use(&two, tokens.lookup(&two).await.unwrap())
            .await
            .unwrap()
            .entry;
        let before = ids(&tokens).await;
        assert!(
            tokens
                .create(child(&["app"], &entry, 600), Some(&entry))
                .await
                .is_err()
        );
        assert_eq!(ids(&tokens).await, before, "no child stored");
        // Revoked after its entry was read.
        let (parent, parent_entry) = tokens.create(limited(0), None).await.unwrap();
        tokens.revoke(&parent).await.unwrap();
        let before = ids(&tokens).await;
        assert!(
            tokens
                .create(child(&["app"], &parent_entry, 600), Some(&parent_entry))
                .await
                .is_err()
        );
        assert_eq!(ids(&tokens).await, before, "no child stored");
        // A live unlimited parent still has children.
        let (_, live) = tokens.create(limited(0), None).await.unwrap();
        tokens
            .create(child(&["app"], &live, 600), Some(&live))
            .await
            .unwrap();
    }

    /// RELIABILITY N2: a pod's logins, with what was created under them, are revoked by
    /// its uid, found through the pod index (not a scan of every token); other pods'
    /// tokens stay; asking again finds nothing; any revocation clears the index.
    #[tokio::test]
    async fn a_pods_tokens_are_revoked_by_its_uid_and_only_they() {
        let logical = unsealed().await;
        let tokens = Tokens::new(logical.clone());
        let login = |pod: &str| NewToken {
            policies: vec!["app".into()],
            path: "auth/kubernetes/login".into(),
            ttl: 600,
            renewable: true,
            pod_uid: Some(pod.into()),
            ..Default::default()
        };
        let pod = "5c0bde3e-2b4f-4d8e-9a51-0c1e8f7e6a21";
        let other = "9d2a4f10-77aa-4c1b-8e0e-3f6b2d9c1a44";
        let (first, first_entry) = tokens.create(login(pod), None).await.unwrap();
        let (second, _) = tokens.create(login(pod), None).await.unwrap();
        let (grandchild, child_entry) = tokens
            .create(child(&["app"], &first_entry, 600), Some(&first_entry))
            .await
            .unwrap();
        let (kept, _) = tokens.create(login(other), None).await.unwrap();
        let mut revoked = tokens.revoke_pod(pod).await.unwrap();
        revoked.sort();
        let mut expected = vec![
            first_entry.id_hash.clone(),
            hash(&second),
            child_entry.id_hash.clone(),
        ];
        expected.sort();
        assert_eq!(revoked, expected, "the pod's two logins and the child of one");
        for gone in [&first, &second, &grandchild] {
            assert!(matches!(tokens.lookup(gone).await, Err(TokenError::Invalid)));
        }
        tokens.lookup(&kept).await.unwrap();
        assert!(
            logical
                .list(&format!("{POD_PREFIX}{pod}/"))
                .await
                .unwrap()
                .is_empty()
        );
        assert!(tokens.revoke_pod(pod).await.unwrap().is_empty(), "idempotent");
        // Revoked another way (the agent's revoke-self), it leaves the index too.
        tokens.revoke(&kept).await.unwrap();
        assert!(
            logical
                .list(&format!("{POD_PREFIX}{other}/"))
                .await
                .unwrap()
                .is_empty()
        );
        // A uid that could step out of the index is refused, at login and revocation.
        for bad in ["", "a/b", "..", "x y", &"a".repeat(65)] {
            assert!(
                matches!(tokens.revoke_pod(bad).await, Err(TokenError::Request(_))),
                "{bad:?}"
            );
            assert!(matches!(
                tokens.create(login(bad), None).await,
                Err(TokenError::Request(_))
            ));
        }
    }

    #[test]
    fn tokens_are_stored_by_their_sha256_in_lowercase_hex() {
        // Stored entries are named by this: a change of format would lose every token.
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[tokio::test]
    async fn revoking_a_parent_revokes_its_descendants() {
        let tokens = Tokens::new(unsealed().await);
        let (root, root_entry) = tokens
            .create(
                NewToken {
                    policies: vec!["root".into()],
                    no_expiry: true,
                    path: "auth/token/root".into(),
                    ..Default::default()
                },
                None,
            )
            .await
            .unwrap();
        let (a, a_entry) = tokens
            .create(child(&["app"], &root_entry, 600), Some(&root_entry))
            .await
            .unwrap();
        let (b, b_entry) = tokens
            .create(child(&["app"], &a_entry, 600), Some(&a_entry))
            .await
            .unwrap();
        let (c, _) = tokens
            .create(child(&["app"], &b_entry, 600), Some(&b_entry))
            .await
            .unwrap();
        let (other, _) = tokens
            .create(child(&["app"], &root_entry, 600), Some(&root_entry))
            .await
            .unwrap();
        tokens.revoke(&a).await.unwrap();
        for gone in [&a, &b, &c] {
            assert!(matches!(tokens.lookup(gone).await, Err(TokenError::Invalid)));
        }
        tokens.lookup(&other).await.unwrap();
        tokens.lookup(&root).await.unwrap();
        assert!(matches!(
            tokens.lookup_accessor(&b_entry.accessor).await,
            Err(TokenError::Invalid)
        ));
    }

    #[tokio::test]
    async fn a_child_never_outlives_its_parent_and_renewal_stops_at_max_ttl() {
        let tokens = Tokens::new(unsealed().await);
        let (_, parent) = tokens
            .create(
                NewToken {
                    policies: vec!["app".into()],
                    ttl: 100,
                    max_ttl: 100,
                    renewable: true,
                    ..Default::default()
                },
                None,
            )
            .await
            .unwrap();
        let (child_token, entry) = tokens
            .create(child(&["app"], &parent, 10_000), Some(&parent))
            .await
            .unwrap();
        assert!(entry.expire_time <= parent.expire_time);
        assert!(entry.ttl <= 100);
        let renewed = tokens.renew(&child_token, 1_000_000).await.unwrap();
        assert!(
            renewed.expire_time <= parent.max_expire_time,
            "renewal clamped at max TTL"
        );
        let (short, _) = tokens
            .create(
                NewToken {
                    policies: vec!["app".into()],
                    ttl: 1,
                    max_ttl: 1,
                    renewable: true,
                    ..Default::default()
                },
                None,
            )
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        assert!(
            matches!(tokens.lookup(&short).await, Err(TokenError::Invalid)),
            "expired tokens are refused"
        );
        assert!(tokens.renew(&short, 10).await.is_err(), "and cannot be renewed");
    }
}
