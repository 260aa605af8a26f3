//! The ciphertext envelope every barrier entry is stored in, and the AES-256-GCM calls
//! behind it. Layout (`ENVELOPE_VERSION` 0x02, as Vault's AESGCMVersion2):
//!
//! ```text
//! [version u8 = 0x02][term u32 big-endian][nonce 12 bytes][ciphertext][tag 16 bytes]
//! ```
//!
//! The associated data is the 5-byte header followed by the storage path, so neither the
//! version, nor the term, nor the path can be changed without the tag failing (V1, V2).
//! The header has a fixed length, so header and path cannot be confused with one another.

use super::BarrierError;
use aes_gcm::{
    Aes256Gcm,
    aead::{AeadInOut, array::Array},
};
use ring::rand::SecureRandom;
use std::cell::RefCell;
use zeroize::Zeroize;

/// The only envelope version written and read.
pub const ENVELOPE_VERSION: u8 = 0x02;
pub(crate) const HEADER_LEN: usize = 1 + 4;
pub(crate) const NONCE_LEN: usize = 12;
pub(crate) const TAG_LEN: usize = 16;
/// The smallest envelope: the sealing of an empty plaintext.
pub const MIN_ENVELOPE_LEN: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;

/// Nonces are random (96 bits from the OS generator). One getrandom call per
/// encryption would cost about as much as sealing 1 KiB, so each thread draws them
/// from a buffer it refills 128 nonces at a time. Nonces are public; nothing here is
/// secret, and a buffer never hands out the same bytes twice.
const NONCE_BUFFER: usize = NONCE_LEN * 128;

thread_local! {
    static NONCES: RefCell<NoncePool> = const { RefCell::new(NoncePool { bytes: [0; NONCE_BUFFER], used: NONCE_BUFFER }) };
}

struct NoncePool {
    bytes: [u8; NONCE_BUFFER],
    used: usize,
}

fn random_nonce() -> Result<[u8; NONCE_LEN], BarrierError> {
    NONCES.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.used + NONCE_LEN > NONCE_BUFFER {
            ring::rand::SystemRandom::new()
                .fill(&mut pool.bytes)
                .map_err(|_| BarrierError::Random)?;
            pool.used = 0;
        }
        let mut nonce = [0u8; NONCE_LEN];
        let start = pool.used;
        nonce.copy_from_slice(&pool.bytes[start..start + NONCE_LEN]);
        // Wipe what was handed out, so the pool never holds a nonce already used.
        pool.bytes[start..start + NONCE_LEN].fill(0);
        pool.used += NONCE_LEN;
        Ok(nonce)
    })
}

/// Fills `buf` from the OS generator.
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), BarrierError> {
    ring::rand::SystemRandom::new()
        .fill(buf)
        .map_err(|_| BarrierError::Random)
}

fn header(term: u32) -> [u8; HEADER_LEN] {
    let t = term.to_be_bytes();
    [ENVELOPE_VERSION, t[0], t[1], t[2], t[3]]
}

/// Runs `f` on header ‖ path. Paths are short, so the bytes are put together on the stack
/// when they fit (an allocation per call was a tenth of the cost of sealing 1 KiB).
fn with_associated_data<T>(header: &[u8], path: &str, f: impl FnOnce(&[u8]) -> T) -> T {
    let len = header.len() + path.len();
    let mut stack = [0u8; 256];
    let mut heap = Vec::new();
    let aad: &mut [u8] = if len <= stack.len() {
        &mut stack[..len]
    } else {
        heap.resize(len, 0);
        &mut heap
    };
    aad[..header.len()].copy_from_slice(header);
    aad[header.len()..].copy_from_slice(path.as_bytes());
    f(aad)
}

/// Seals `plaintext` for `path` under `cipher`, labelled with `term`.
pub(crate) fn seal(
    cipher: &Aes256Gcm,
    term: u32,
    path: &str,
    plaintext: &[u8],
) -> Result<Vec<u8>, BarrierError> {
    let header = header(term);
    let nonce = random_nonce()?;
    let mut out = Vec::with_capacity(MIN_ENVELOPE_LEN + plaintext.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let body = &mut out[HEADER_LEN + NONCE_LEN..];
    let sealed = with_associated_data(&header, path, |aad| {
        cipher.encrypt_inout_detached(&Array::from(nonce), aad, body.into())
    });
    let tag = match sealed {
        Ok(tag) => tag,
        Err(_) => {
            // Only a plaintext beyond GCM's 64 GiB limit gets here; wipe the copy of it.
            out.zeroize();
            return Err(BarrierError::TooLarge);
        }
    };
    out.extend_from_slice(&tag);
    Ok(out)
}

/// The parsed, unauthenticated header of an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvelopeHeader {
    pub version: u8,
    pub term: u32,
}

/// Reads the header of `envelope` without authenticating anything (to pick the key).
pub fn parse_header(envelope: &[u8]) -> Result<EnvelopeHeader, BarrierError> {
    if envelope.len() < MIN_ENVELOPE_LEN {
        return Err(BarrierError::Integrity("envelope too short"));
    }
    if envelope[0] != ENVELOPE_VERSION {
        return Err(BarrierError::Integrity("unknown envelope version"));
    }
    let term = u32::from_be_bytes([envelope[1], envelope[2], envelope[3], envelope[4]]);
    Ok(EnvelopeHeader {
        version: envelope[0],
        term,
    })
}

/// Opens an envelope whose header was checked with `parse_header` and whose term
/// selected `cipher`.
pub(crate) fn open(cipher: &Aes256Gcm, path: &str, envelope: &[u8]) -> Result<Vec<u8>, BarrierError> {
    parse_header(envelope)?;
    let (header, rest) = envelope.split_at(HEADER_LEN);
    let (nonce, rest) = rest.split_at(NONCE_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    let nonce: [u8; NONCE_LEN] = nonce
        .try_into()
        .map_err(|_| BarrierError::Integrity("bad nonce"))?;
    let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| BarrierError::Integrity("bad tag"))?;
    let mut plaintext = ciphertext.to_vec();
    let opened = with_associated_data(header, path, |aad| {
        cipher.decrypt_inout_detached(
            &Array::from(nonce),
            aad,
            plaintext.as_mut_slice().into(),
            &Array::from(tag),
        )
    });
    match opened {
        Ok(()) => Ok(plaintext),
        Err(_) => {
            // Whatever the buffer holds now is unauthenticated: never let it out.
            plaintext.zeroize();
            Err(BarrierError::Integrity("authentication failed"))
        }
    }
}
