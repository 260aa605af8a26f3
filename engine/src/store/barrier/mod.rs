//! The barrier: everything the engine stores passes through AES-256-GCM under a
//! keyring of terms, bound to its storage path (DESIGN decision 7: tampering and moving
//! ciphertext between paths are detected; rollback is out of scope, as in Vault).
//!
//! Three keys, as in Vault:
//! - the **unseal key**, which Shamir splits into shares (`crate::store::shamir`) and which
//!   only ever seals the root key (`seal_root` / `open_root`);
//! - the **root key**, which seals the keyring (`Keyring::seal_with`, stored at
//!   [`KEYRING_PATH`]);
//! - the **keyring**'s term keys, which seal every entry (`Keyring::seal`). Rotating
//!   the keyring adds a term and never changes the root key, so the shares stay valid.
//!
//! Pure: no storage, no clock beyond a term's creation time, no I/O but the OS random
//! number generator. Key bytes are zeroized when dropped, and no `Debug` or error
//! message ever carries key or plaintext bytes.

mod envelope;
mod keyring;

pub(crate) use envelope::fill_random;
pub use envelope::{ENVELOPE_VERSION, EnvelopeHeader, MIN_ENVELOPE_LEN, parse_header};
pub use keyring::{DEFAULT_MAX_OPERATIONS, Keyring};

use aes_gcm::{
    Aes256Gcm,
    aead::{KeyInit, array::Array},
};
use std::fmt;
use zeroize::Zeroize;

/// The length of every key here (AES-256).
pub const KEY_LEN: usize = 32;
/// Where the caller stores the sealed keyring; also the associated data it is sealed with.
pub const KEYRING_PATH: &str = "core/keyring";
/// Where the caller stores the sealed root key; also the associated data it is sealed with.
pub const ROOT_KEY_PATH: &str = "core/root-key";
/// The term written in the header of the keyring and root-key envelopes: no keyring
/// term is 0, so a keyring never opens them as entries.
const WRAP_TERM: u32 = 0;

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum BarrierError {
    /// The envelope was changed, truncated, moved to another path or sealed under
    /// another key. The reason is fixed text, never data from the envelope.
    #[error("barrier integrity check failed: {0}")]
    Integrity(&'static str),
    /// The envelope names a term this keyring does not hold.
    #[error("barrier envelope names unknown key term {0}")]
    UnknownTerm(u32),
    #[error("a key must be {KEY_LEN} bytes, got {0}")]
    KeyLength(usize),
    /// The active term reached its bound of encryptions (V5): rotate first.
    #[error("key term {term} reached its bound of {max} encryptions; rotate the keyring")]
    TermExhausted { term: u32, max: u64 },
    #[error("the keyring holds no more terms (u32 exhausted)")]
    TermOverflow,
    /// A sealed keyring that authenticated but does not parse (a bug or another format).
    #[error("malformed keyring: {0}")]
    Keyring(&'static str),
    #[error("the OS random number generator failed")]
    Random,
    #[error("plaintext too large for AES-GCM")]
    TooLarge,
}

impl BarrierError {
    /// True when the stored data was tampered with or cannot belong here (count these
    /// in a metric and log them: V1).
    pub fn is_integrity(&self) -> bool {
        matches!(self, Self::Integrity(_) | Self::UnknownTerm(_))
    }

    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Integrity(_) => "integrity",
            Self::UnknownTerm(_) => "unknown_term",
            Self::KeyLength(_) => "key_length",
            Self::TermExhausted { .. } => "term_exhausted",
            Self::TermOverflow => "term_overflow",
            Self::Keyring(_) => "keyring",
            Self::Random => "random",
            Self::TooLarge => "too_large",
        }
    }
}

/// 32 key bytes on the heap (so moving the owner leaves no copy behind), wiped on drop.
pub(crate) struct KeyBytes(Box<[u8; KEY_LEN]>);

impl KeyBytes {
    pub(crate) fn generate() -> Result<Self, BarrierError> {
        let mut key = Box::new([0u8; KEY_LEN]);
        envelope::fill_random(&mut key[..])?;
        Ok(Self(key))
    }

    pub(crate) fn from_slice(bytes: &[u8]) -> Result<Self, BarrierError> {
        if bytes.len() != KEY_LEN {
            return Err(BarrierError::KeyLength(bytes.len()));
        }
        let mut key = Box::new([0u8; KEY_LEN]);
        key.copy_from_slice(bytes);
        Ok(Self(key))
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0[..]
    }

    pub(crate) fn cipher(&self) -> Aes256Gcm {
        // Aes256Gcm (with aes-gcm's `zeroize` feature) wipes its key schedule on drop;
        // the key is borrowed in place, so no unwiped copy is left on the stack.
        let key: &Array<u8, _> = (&*self.0).into();
        Aes256Gcm::new(key)
    }
}

impl Drop for KeyBytes {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A 256-bit key that seals other keys: the root key (which seals the keyring) or the
/// unseal key (which seals the root key and is what Shamir splits).
pub struct RootKey(KeyBytes);

impl RootKey {
    /// A fresh random key. Panics only if the OS random number generator fails, when
    /// no key could be made at all; `try_generate` returns that as an error instead.
    pub fn generate() -> Self {
        Self::try_generate().expect("the OS random number generator failed")
    }

    pub fn try_generate() -> Result<Self, BarrierError> {
        KeyBytes::generate().map(Self)
    }

    /// A key from exactly 32 bytes (e.g. the output of `shamir::combine`).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, BarrierError> {
        KeyBytes::from_slice(bytes).map(Self)
    }

    /// The key bytes, e.g. to split the unseal key into shares. Do not log them.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// Seals `plaintext` under this key with `label` as associated data.
    pub(crate) fn wrap(&self, label: &str, plaintext: &[u8]) -> Result<Vec<u8>, BarrierError> {
        envelope::seal(&self.0.cipher(), WRAP_TERM, label, plaintext)
    }

    pub(crate) fn unwrap(&self, label: &str, sealed: &[u8]) -> Result<Vec<u8>, BarrierError> {
        let header = parse_header(sealed)?;
        if header.term != WRAP_TERM {
            return Err(BarrierError::Integrity("not sealed under a root or unseal key"));
        }
        envelope::open(&self.0.cipher(), label, sealed)
    }
}

impl fmt::Debug for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RootKey([redacted])")
    }
}

/// The root key sealed under the unseal key (stored by the caller at [`ROOT_KEY_PATH`]).
pub fn seal_root(unseal: &RootKey, root: &RootKey) -> Result<Vec<u8>, BarrierError> {
    unseal.wrap(ROOT_KEY_PATH, root.as_bytes())
}

/// The root key back from `seal_root`'s output. A wrong unseal key (wrong or
/// previous-generation shares) fails here with `BarrierError::Integrity`.
pub fn open_root(unseal: &RootKey, sealed: &[u8]) -> Result<RootKey, BarrierError> {
    let mut bytes = unseal.unwrap(ROOT_KEY_PATH, sealed)?;
    let key = RootKey::from_bytes(&bytes);
    bytes.zeroize();
    key
}

#[cfg(test)]
mod tests;
