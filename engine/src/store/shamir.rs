//! Shamir secret sharing of the unseal key over GF(256), with vsss-rs's `Gf256`: its
//! field arithmetic is constant time, with no secret-indexed tables (V8, the class of
//! CVE-2023-25000), and its polynomial coefficients are uniform over the whole field.
//!
//! Share layout, as Vault's: the y values (one per secret byte) followed by the x
//! coordinate as the last byte. x coordinates are distinct, random and never 0 (x = 0
//! would be the secret itself). The caller hands shares to people as hex or base64.
//!
//! V9 asks for "coefficients uniform over [0,255] except a forced non-zero top". We
//! keep every coefficient uniform, top included, as vsss-rs does after its audit: a
//! forced non-zero top coefficient tells whoever holds t-1 shares that the secret is not
//! the one value that would make it zero, one byte of information lost per 256 (a
//! test below shows a share's y takes every value, the secret's too).

use std::{convert::Infallible, fmt};
use vsss_rs::{Gf256, IdentifierGf256};
use zeroize::{Zeroize, Zeroizing};

/// The most shares a split can make: x is one non-zero byte.
pub const MAX_SHARES: usize = 255;

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ShamirError {
    #[error(
        "threshold must be at least 2 (a threshold of 1 needs exactly 1 share), got {threshold} of {shares}"
    )]
    ThresholdTooLow { threshold: usize, shares: usize },
    #[error("threshold {threshold} is greater than the number of shares {shares}")]
    ThresholdAboveShares { threshold: usize, shares: usize },
    #[error("at most {MAX_SHARES} shares, got {0}")]
    TooManyShares(usize),
    #[error("the secret to split is empty")]
    EmptySecret,
    #[error("combining needs at least 2 shares, got {0}")]
    TooFewShares(usize),
    #[error("a share must be at least 2 bytes, got {0}")]
    ShareTooShort(usize),
    #[error("shares have different lengths ({first} and {other} bytes)")]
    ShareLengthMismatch { first: usize, other: usize },
    #[error("a share of {expected} bytes was expected, got {got}")]
    ShareLength { expected: usize, got: usize },
    #[error("a share has x coordinate 0, which no split makes")]
    ZeroX,
    #[error("duplicate share (the same x coordinate twice)")]
    DuplicateShare,
    #[error("the OS random number generator failed")]
    Random,
    #[error("shares could not be combined")]
    Combine,
}

/// Checks split parameters as the API receives them (before narrowing to `u8`).
pub fn check_params(shares: usize, threshold: usize) -> Result<(), ShamirError> {
    if shares > MAX_SHARES {
        return Err(ShamirError::TooManyShares(shares));
    }
    if threshold > shares {
        return Err(ShamirError::ThresholdAboveShares { threshold, shares });
    }
    // As Vault: a threshold of 1 is only for a single share, which is the key itself.
    if threshold < 2 && !(threshold == 1 && shares == 1) {
        return Err(ShamirError::ThresholdTooLow { threshold, shares });
    }
    Ok(())
}

/// Splits `secret` into `shares` shares, any `threshold` of which give it back. With
/// `threshold == shares == 1` the one share is the secret itself (as Vault).
pub fn split(secret: &[u8], shares: u8, threshold: u8) -> Result<Vec<Vec<u8>>, ShamirError> {
    check_params(shares.into(), threshold.into())?;
    if secret.is_empty() {
        return Err(ShamirError::EmptySecret);
    }
    if shares == 1 {
        return Ok(vec![secret.to_vec()]);
    }
    let mut rng = OsRng::new();
    let xs = random_xs(&mut rng, shares);
    let made = Gf256::split_bytes_with_participant_ids_iter(
        threshold.into(),
        shares.into(),
        secret,
        &mut rng,
        xs.into_iter().map(|x| IdentifierGf256(Gf256(x))),
    );
    let mut made = match made {
        Ok(made) => made,
        Err(_) => return Err(ShamirError::Combine),
    };
    let out = if rng.failed {
        Err(ShamirError::Random)
    } else {
        // vsss-rs puts x first; Vault's layout (ours) puts it last.
        Ok(made
            .iter()
            .map(|s| {
                let mut share = Vec::with_capacity(s.len());
                share.extend_from_slice(&s[1..]);
                share.push(s[0]);
                share
            })
            .collect())
    };
    for s in &mut made {
        s.zeroize();
    }
    out
}

/// Combines shares (Vault layout) into the secret. Checks that there are at least 2,
/// of one length of at least 2 bytes, with distinct non-zero x coordinates. Whether the
/// result is the right secret is for the caller to check (by opening the sealed root
/// key): fewer than the threshold, a wrong share or a previous generation's share give
/// a wrong secret, not an error here. Wipe the result (`zeroize`) when done with it.
pub fn combine(shares: &[Vec<u8>]) -> Result<Vec<u8>, ShamirError> {
    if shares.len() < 2 {
        return Err(ShamirError::TooFewShares(shares.len()));
    }
    let first = shares[0].len();
    for s in shares {
        if s.len() < 2 {
            return Err(ShamirError::ShareTooShort(s.len()));
        }
        if s.len() != first {
            return Err(ShamirError::ShareLengthMismatch {
                first,
                other: s.len(),
            });
        }
    }
    let mut seen = [false; 256];
    for s in shares {
        let x = s[first - 1];
        if x == 0 {
            return Err(ShamirError::ZeroX);
        }
        if std::mem::replace(&mut seen[usize::from(x)], true) {
            return Err(ShamirError::DuplicateShare);
        }
    }
    let mut vsss: Vec<Vec<u8>> = shares
        .iter()
        .map(|s| {
            let mut v = Vec::with_capacity(first);
            v.push(s[first - 1]);
            v.extend_from_slice(&s[..first - 1]);
            v
        })
        .collect();
    let out = Gf256::combine_bytes(&vsss).map_err(|_| ShamirError::Combine);
    for v in &mut vsss {
        v.zeroize();
    }
    out
}

/// `n` distinct random x coordinates in 1..=255 (a partial Fisher-Yates shuffle), so a
/// share's x says nothing about the order shares were handed out in, as Vault.
fn random_xs(rng: &mut OsRng, n: u8) -> Vec<u8> {
    let mut all: Vec<u8> = (1..=255).collect();
    for i in 0..usize::from(n) {
        let left = (all.len() - i) as u32;
        // Rejection sampling: uniform in 0..left.
        let zone = u32::MAX - u32::MAX % left;
        let j = loop {
            let v = rng.next_u32();
            if v < zone {
                break i + (v % left) as usize;
            }
        };
        all.swap(i, j);
    }
    all.truncate(usize::from(n));
    all
}

/// The OS random number generator (through ring) as the rand_core 0.10 generator
/// vsss-rs asks for. It reads 256 bytes at a time (one syscall for a 32-byte key with a
/// threshold of up to 3), wipes them on drop (they become polynomial coefficients), and
/// records a failure instead of panicking, which `split` turns into an error.
struct OsRng {
    buf: [u8; 256],
    used: usize,
    failed: bool,
}

impl OsRng {
    fn new() -> Self {
        Self {
            buf: [0; 256],
            used: 256,
            failed: false,
        }
    }

    fn fill(&mut self, dst: &mut [u8]) {
        for b in dst {
            if self.used == self.buf.len() {
                if crate::store::barrier::fill_random(&mut self.buf).is_err() {
                    self.failed = true;
                    self.buf.fill(0);
                }
                self.used = 0;
            }
            *b = std::mem::take(&mut self.buf[self.used]);
            self.used += 1;
        }
    }

    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill(&mut b);
        u32::from_le_bytes(b)
    }
}

impl Drop for OsRng {
    fn drop(&mut self) {
        self.buf.zeroize();
    }
}

impl rand_core::TryRng for OsRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(self.next_u32())
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut b = [0u8; 8];
        self.fill(&mut b);
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.fill(dst);
        Ok(())
    }
}

impl rand_core::TryCryptoRng for OsRng {}

/// Where an unseal stands after a share is added.
#[derive(PartialEq, Eq)]
pub enum Progress {
    /// More shares are needed.
    Pending { have: u8, need: u8 },
    /// The threshold was reached: the combined secret (the unseal key, if the shares
    /// were right), wiped when dropped. The accumulator has been reset.
    Complete(Zeroizing<Vec<u8>>),
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pending { have, need } => write!(f, "Pending {{ have: {have}, need: {need} }}"),
            Self::Complete(_) => f.write_str("Complete([redacted])"),
        }
    }
}

/// Unseal shares as they arrive, one request each (sys/unseal), until the threshold.
/// A rejected share (duplicate, wrong length) leaves the progress as it was; `reset`
/// drops it (sys/unseal `reset`). Held shares are wiped on reset, completion and drop.
pub struct UnsealProgress {
    threshold: u8,
    secret_len: usize,
    shares: Vec<Vec<u8>>,
}

impl UnsealProgress {
    /// `threshold` shares of a `secret_len`-byte secret (32 for the unseal key): each
    /// share is then `secret_len + 1` bytes, or `secret_len` with a threshold of 1 (the
    /// share is the key). A threshold of 0 is taken as 1.
    pub fn new(threshold: u8, secret_len: usize) -> Self {
        Self {
            threshold: threshold.max(1),
            secret_len,
            shares: Vec::with_capacity(threshold.into()),
        }
    }

    pub fn threshold(&self) -> u8 {
        self.threshold
    }

    /// How many distinct shares are held.
    pub fn progress(&self) -> u8 {
        self.shares.len() as u8
    }

    fn share_len(&self) -> usize {
        if self.threshold == 1 {
            self.secret_len
        } else {
            self.secret_len + 1
        }
    }

    pub fn add(&mut self, mut share: Vec<u8>) -> Result<Progress, ShamirError> {
        let expected = self.share_len();
        if share.len() != expected {
            let got = share.len();
            share.zeroize();
            return Err(ShamirError::ShareLength { expected, got });
        }
        if self.threshold == 1 {
            return Ok(Progress::Complete(Zeroizing::new(share)));
        }
        let x = share[expected - 1];
        if x == 0 {
            share.zeroize();
            return Err(ShamirError::ZeroX);
        }
        if self.shares.iter().any(|s| s[expected - 1] == x) {
            share.zeroize();
            return Err(ShamirError::DuplicateShare);
        }
        self.shares.push(share);
        if self.shares.len() < usize::from(self.threshold) {
            return Ok(Progress::Pending {
                have: self.progress(),
                need: self.threshold,
            });
        }
        let combined = combine(&self.shares);
        self.reset();
        combined.map(|secret| Progress::Complete(Zeroizing::new(secret)))
    }

    /// Forgets every share held.
    pub fn reset(&mut self) {
        for s in &mut self.shares {
            s.zeroize();
        }
        self.shares.clear();
    }
}

impl Drop for UnsealProgress {
    fn drop(&mut self) {
        self.reset();
    }
}

impl fmt::Debug for UnsealProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnsealProgress")
            .field("threshold", &self.threshold)
            .field("progress", &self.progress())
            .field("shares", &"[redacted]")
            .finish()
    }
}

#[cfg(test)]
#[path = "shamir_tests.rs"]
mod tests;
