//! The keyring: numbered key terms, one of them active for writing; every term stays
//! readable until the keyring is rebuilt without it.

use super::{BarrierError, KEYRING_PATH, KeyBytes, RootKey, envelope};
use aes_gcm::Aes256Gcm;
use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};
use zeroize::Zeroizing;

/// The default bound of encryptions under one term. NIST SP 800-38D allows 2^32
/// encryptions with random 96-bit nonces under one key. The count is kept in memory
/// only, so it is the bound for the whole term only because no term is ever written by
/// more than one process: each process rotates to a term of its own when it unseals
/// (`crate::store::seal`), and never adopts another replica's term for writing. Half of 2^32
/// is a margin, not a share for another writer (V5).
pub const DEFAULT_MAX_OPERATIONS: u64 = 1 << 31;
const _: () = assert!(
    DEFAULT_MAX_OPERATIONS < 1 << 32,
    "V5: never 2^32 encryptions under one key"
);

/// The serialized keyring starts with this, so a different plaintext that somehow
/// authenticated under the root key is refused rather than misread.
const MAGIC: &[u8; 4] = b"CKR\x01";
const ENTRY_LEN: usize = 4 + 8 + super::KEY_LEN;
/// Far more terms than rotation could ever add, small enough to refuse absurd counts.
const MAX_TERMS: usize = 1 << 20;

struct Term {
    key: KeyBytes,
    cipher: Aes256Gcm,
    /// Seconds since the Unix epoch.
    created: u64,
}

impl Term {
    fn new(key: KeyBytes, created: u64) -> Self {
        let cipher = key.cipher();
        Self { key, cipher, created }
    }
}

/// What is counted for the active term: shared by every copy of the keyring that
/// writes under that term in this process (`with_terms_of`), so a copy swapped in by
/// `Seal::refresh` goes on from the same count while requests holding the old one finish.
#[derive(Default)]
struct Counter {
    encryptions: AtomicU64,
    /// Set once a rotation away from the active term was started (`claim_rotation`).
    rotation_claimed: AtomicBool,
}

pub struct Keyring {
    terms: BTreeMap<u32, Term>,
    active: u32,
    /// Encryptions under the active term by this process; a new one with each rotation.
    counter: Arc<Counter>,
    max_operations: u64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Keyring {
    /// A keyring with one fresh term, 1. Panics only if the OS random number generator
    /// fails (`try_generate` returns that as an error).
    pub fn generate() -> Self {
        Self::try_generate().expect("the OS random number generator failed")
    }

    pub fn try_generate() -> Result<Self, BarrierError> {
        let mut terms = BTreeMap::new();
        terms.insert(1, Term::new(KeyBytes::generate()?, now_secs()));
        Ok(Self {
            terms,
            active: 1,
            counter: Arc::default(),
            max_operations: DEFAULT_MAX_OPERATIONS,
        })
    }

    /// Sets the bound of encryptions under one term (V5); `seal` refuses beyond it and
    /// `needs_rotation` turns true at seven eighths of it.
    pub fn with_max_operations(mut self, max: u64) -> Self {
        self.max_operations = max.max(1);
        self
    }

    pub fn max_operations(&self) -> u64 {
        self.max_operations
    }

    pub fn active_term(&self) -> u32 {
        self.active
    }

    /// Every term held, ascending.
    pub fn terms(&self) -> Vec<u32> {
        self.terms.keys().copied().collect()
    }

    /// When `term` was created, in seconds since the Unix epoch.
    pub fn term_created(&self, term: u32) -> Option<u64> {
        self.terms.get(&term).map(|t| t.created)
    }

    /// Adds term n+1 (n the highest term) with a fresh key and makes it active; older
    /// terms stay for reading. Panics only if the OS random number generator fails or
    /// all 2^32 terms are used (`try_rotate` returns those as errors).
    pub fn rotate(&mut self) -> u32 {
        self.try_rotate().expect("keyring rotation failed")
    }

    pub fn try_rotate(&mut self) -> Result<u32, BarrierError> {
        let highest = self.terms.keys().next_back().copied().unwrap_or(0);
        let next = highest.checked_add(1).ok_or(BarrierError::TermOverflow)?;
        self.terms
            .insert(next, Term::new(KeyBytes::generate()?, now_secs()));
        self.active = next;
        self.counter = Arc::default();
        Ok(next)
    }

    /// This keyring's active term and count, with every term `stored` holds added for
    /// reading (keys of terms both hold are taken from `stored`, which they equal). For a
    /// replica that meets a term another replica added: it reads that term and goes on
    /// writing under its own, so no term is ever written by two processes (V5).
    pub fn with_terms_of(&self, stored: Keyring) -> Result<Keyring, BarrierError> {
        let mut terms = stored.terms;
        for (number, term) in &self.terms {
            if !terms.contains_key(number) {
                terms.insert(
                    *number,
                    Term::new(KeyBytes::from_slice(term.key.as_bytes())?, term.created),
                );
            }
        }
        Ok(Keyring {
            terms,
            active: self.active,
            counter: self.counter.clone(),
            max_operations: self.max_operations,
        })
    }

    /// Encryptions under the active term by this process (V5).
    pub fn encryptions(&self) -> u64 {
        self.counter
            .encryptions
            .load(Ordering::Relaxed)
            .min(self.max_operations)
    }

    /// True once the active term has done seven eighths of its bound of encryptions:
    /// rotate then, and the last eighth covers the writes that go on while the new
    /// keyring is persisted and swapped in.
    pub fn needs_rotation(&self) -> bool {
        self.counter.encryptions.load(Ordering::Relaxed) >= self.rotation_threshold()
    }

    /// True for exactly one caller once `needs_rotation` holds (until
    /// `release_rotation`): the writers past the threshold start one rotation, not one
    /// each (every rotation adds a term for good).
    pub fn claim_rotation(&self) -> bool {
        self.needs_rotation() && !self.counter.rotation_claimed.swap(true, Ordering::AcqRel)
    }

    /// Gives the claim back after a rotation that failed, so a later write tries again.
    pub fn release_rotation(&self) {
        self.counter.rotation_claimed.store(false, Ordering::Release);
    }

    fn rotation_threshold(&self) -> u64 {
        self.max_operations - self.max_operations / 8
    }

    /// Seals `plaintext` for storage at `path` under the active term.
    pub fn seal(&self, path: &str, plaintext: &[u8]) -> Result<Vec<u8>, BarrierError> {
        // Count first: two tasks racing at the bound cannot both pass it.
        let done = self.counter.encryptions.fetch_add(1, Ordering::Relaxed);
        if done >= self.max_operations {
            return Err(BarrierError::TermExhausted {
                term: self.active,
                max: self.max_operations,
            });
        }
        let term = self
            .terms
            .get(&self.active)
            .ok_or(BarrierError::UnknownTerm(self.active))?;
        envelope::seal(&term.cipher, self.active, path, plaintext)
    }

    /// Opens an envelope `seal` made for `path`, under whichever term it names. Any
    /// change to the envelope, or another path, gives `Integrity` (or `UnknownTerm`).
    pub fn open(&self, path: &str, envelope: &[u8]) -> Result<Vec<u8>, BarrierError> {
        let header = envelope::parse_header(envelope)?;
        let term = self
            .terms
            .get(&header.term)
            .ok_or(BarrierError::UnknownTerm(header.term))?;
        envelope::open(&term.cipher, path, envelope)
    }

    /// The keyring serialized and sealed under the root key, for the caller to store at
    /// [`KEYRING_PATH`]. The encryption counter and bound are per process and not kept.
    pub fn seal_with(&self, root: &RootKey) -> Result<Vec<u8>, BarrierError> {
        let mut plain = Zeroizing::new(Vec::with_capacity(12 + self.terms.len() * ENTRY_LEN));
        plain.extend_from_slice(MAGIC);
        plain.extend_from_slice(&self.active.to_be_bytes());
        let count = u32::try_from(self.terms.len()).map_err(|_| BarrierError::TermOverflow)?;
        plain.extend_from_slice(&count.to_be_bytes());
        for (number, term) in &self.terms {
            plain.extend_from_slice(&number.to_be_bytes());
            plain.extend_from_slice(&term.created.to_be_bytes());
            plain.extend_from_slice(term.key.as_bytes());
        }
        root.wrap(KEYRING_PATH, &plain)
    }

    /// The keyring back from `seal_with`'s output, with the default bound of
    /// encryptions and a counter at zero.
    pub fn open_with(root: &RootKey, sealed: &[u8]) -> Result<Keyring, BarrierError> {
        let plain = Zeroizing::new(root.unwrap(KEYRING_PATH, sealed)?);
        Self::parse(&plain)
    }

    fn parse(plain: &[u8]) -> Result<Keyring, BarrierError> {
        let rest = plain
            .strip_prefix(MAGIC.as_slice())
            .ok_or(BarrierError::Keyring("bad magic"))?;
        if rest.len() < 8 {
            return Err(BarrierError::Keyring("truncated header"));
        }
        let (head, mut entries) = rest.split_at(8);
        let active = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let count = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
        if count == 0 || count > MAX_TERMS || entries.len() != count * ENTRY_LEN {
            return Err(BarrierError::Keyring("bad term count"));
        }
        let mut terms = BTreeMap::new();
        while let Some((entry, tail)) = entries.split_at_checked(ENTRY_LEN) {
            entries = tail;
            let number = u32::from_be_bytes([entry[0], entry[1], entry[2], entry[3]]);
            let mut created = [0u8; 8];
            created.copy_from_slice(&entry[4..12]);
            let key = KeyBytes::from_slice(&entry[12..])?;
            if number == 0 {
                return Err(BarrierError::Keyring("term 0"));
            }
            if terms
                .insert(number, Term::new(key, u64::from_be_bytes(created)))
                .is_some()
            {
                return Err(BarrierError::Keyring("duplicate term"));
            }
        }
        if !terms.contains_key(&active) {
            return Err(BarrierError::Keyring("active term missing"));
        }
        Ok(Keyring {
            terms,
            active,
            counter: Arc::default(),
            max_operations: DEFAULT_MAX_OPERATIONS,
        })
    }

    /// A copy of the keyring (same terms, a counter that starts from this one's), e.g.
    /// to rotate and persist it before swapping it in. Nonces are random, so the copy
    /// and the original may both seal.
    pub fn try_clone(&self) -> Result<Keyring, BarrierError> {
        let mut terms = BTreeMap::new();
        for (number, term) in &self.terms {
            terms.insert(
                *number,
                Term::new(KeyBytes::from_slice(term.key.as_bytes())?, term.created),
            );
        }
        Ok(Keyring {
            terms,
            active: self.active,
            counter: Arc::new(Counter {
                encryptions: AtomicU64::new(self.counter.encryptions.load(Ordering::Relaxed)),
                rotation_claimed: AtomicBool::new(false),
            }),
            max_operations: self.max_operations,
        })
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("active", &self.active)
            .field("terms", &self.terms())
            .field("encryptions", &self.encryptions())
            .field("max_operations", &self.max_operations)
            .field("keys", &"[redacted]")
            .finish()
    }
}
