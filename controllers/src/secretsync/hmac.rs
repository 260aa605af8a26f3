//! HMAC-SHA256 of a target Secret's data, under a key only the controller holds.
//!
//! The digest goes into status (`secretHmac`), which anyone who may read the SecretSync
//! sees: a plain hash of a low-entropy value (a short password) could be brute-forced
//! from it; an HMAC under a 256-bit key cannot. The key lives in a Secret of the
//! controller's namespace (`capstan-controller-secretsync-hmac`), created once by
//! whichever replica gets there first, so every replica and restart computes the same
//! digest.

use super::template::Data;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use ring::{aead, hmac, rand::SecureRandom};
use std::collections::BTreeMap;

pub const KEY_SECRET: &str = "capstan-controller-secretsync-hmac";
const KEY_FIELD: &str = "key";

#[derive(Clone)]
pub struct Key(hmac::Key);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("hmac::Key(..)")
    }
}

impl Key {
    pub fn new(bytes: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// The digest of `data` (hex). Keys and values are length-prefixed, so no two
    /// different maps encode alike (`{"ab": "c"}` vs `{"a": "bc"}`).
    pub fn digest(&self, data: &Data) -> String {
        let mut ctx = hmac::Context::with_key(&self.0);
        for (key, value) in data {
            ctx.update(&(key.len() as u64).to_be_bytes());
            ctx.update(key.as_bytes());
            ctx.update(&(value.len() as u64).to_be_bytes());
            ctx.update(value);
        }
        hex(ctx.sign().as_ref())
    }

    /// The digest of a Secret's data as the API returns it.
    pub fn digest_secret(&self, secret: &Secret) -> String {
        self.digest(&secret_data(secret))
    }

    /// `plain` encrypted (ChaCha20-Poly1305, random nonce) under a key derived from this
    /// one, bound to `context` (a SecretSync UID: a sealed value copied into another
    /// SecretSync's record does not open). Hex, nonce first. For the login token a lease
    /// record holds while a credential is being issued: only the controller can use it.
    pub fn seal(&self, context: &str, plain: &[u8]) -> String {
        let mut nonce = [0u8; aead::NONCE_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system RNG works");
        let mut sealed = plain.to_vec();
        self.aead()
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(context.as_bytes()),
                &mut sealed,
            )
            .expect("sealing a short value cannot fail");
        hex(&[&nonce[..], &sealed].concat())
    }

    /// What `seal` sealed under this key and `context`; None if it was not.
    pub fn open(&self, context: &str, sealed: &str) -> Option<Vec<u8>> {
        let bytes = unhex(sealed)?;
        if bytes.len() < aead::NONCE_LEN + aead::CHACHA20_POLY1305.tag_len() {
            return None;
        }
        let (nonce, rest) = bytes.split_at(aead::NONCE_LEN);
        let mut rest = rest.to_vec();
        let plain = self
            .aead()
            .open_in_place(
                aead::Nonce::try_assume_unique_for_key(nonce).ok()?,
                aead::Aad::from(context.as_bytes()),
                &mut rest,
            )
            .ok()?;
        Some(plain.to_vec())
    }

    /// The sealing key: HMAC of a fixed label under the HMAC key, so the two uses never
    /// share a key.
    fn aead(&self) -> aead::LessSafeKey {
        let derived = hmac::sign(&self.0, b"capstan secretsync seal v1");
        aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::CHACHA20_POLY1305, derived.as_ref()).expect("a 32-byte key"),
        )
    }
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

pub fn secret_data(secret: &Secret) -> Data {
    secret
        .data
        .as_ref()
        .map(|d| d.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
        .unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading or creating Secret {KEY_SECRET}")]
    Api(#[from] kube::Error),
    #[error("Secret {KEY_SECRET} holds no 32-byte key under {KEY_FIELD:?}; delete it to have a new one made")]
    Unusable,
}

/// Reads the key, creating it if no replica has yet.
pub async fn load_or_create(api: &Api<Secret>) -> Result<Key, KeyError> {
    loop {
        if let Some(secret) = api.get_opt(KEY_SECRET).await? {
            if let Some(key) = secret.data.as_ref().and_then(|d| d.get(KEY_FIELD))
                && key.0.len() >= 32
            {
                return Ok(Key::new(&key.0));
            }
            // A Secret without a usable key is not ours to repair silently.
            return Err(KeyError::Unusable);
        }
        let mut bytes = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .expect("the system RNG works");
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(KEY_SECRET.into()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "capstan-controller".to_owned(),
                )])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                KEY_FIELD.to_owned(),
                ByteString(bytes.to_vec()),
            )])),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(secret = KEY_SECRET, "Created the SecretSync HMAC key");
                return Ok(Key::new(&bytes));
            }
            // Another replica created it first: read theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> Data {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn digest_changes_with_any_byte_and_with_the_key() {
        let key = Key::new(&[7; 32]);
        let base = key.digest(&data(&[("password", "hunter2"), ("username", "app")]));
        assert_eq!(base.len(), 64);
        assert_eq!(
            base,
            key.digest(&data(&[("username", "app"), ("password", "hunter2")]))
        );
        assert_ne!(
            base,
            key.digest(&data(&[("password", "hunter3"), ("username", "app")]))
        );
        assert_ne!(base, key.digest(&data(&[("password", "hunter2")])));
        assert_ne!(
            base,
            key.digest(&data(&[("password", "hunter2"), ("username", "app"), ("x", "")]))
        );
        assert_ne!(
            base,
            Key::new(&[8; 32]).digest(&data(&[("password", "hunter2"), ("username", "app")]))
        );
        // Length prefixes: moving a byte between key and value changes the digest.
        assert_ne!(
            key.digest(&data(&[("ab", "c")])),
            key.digest(&data(&[("a", "bc")]))
        );
        // The digest is not a plain SHA-256 of anything it covers.
        assert!(!base.contains("hunter2"));
    }

    #[test]
    fn sealed_values_open_only_under_the_same_key_and_context() {
        let key = Key::new(&[3; 32]);
        let sealed = key.seal("uid-1", b"hvs.token");
        assert!(!sealed.contains("hvs"));
        assert_ne!(sealed, key.seal("uid-1", b"hvs.token"), "a fresh nonce each time");
        assert_eq!(key.open("uid-1", &sealed).as_deref(), Some(&b"hvs.token"[..]));
        assert_eq!(key.open("uid-2", &sealed), None);
        assert_eq!(Key::new(&[4; 32]).open("uid-1", &sealed), None);
        let mut tampered = sealed.clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(key.open("uid-1", std::str::from_utf8(&tampered).unwrap()), None);
        assert_eq!(key.open("uid-1", "zz"), None);
        assert_eq!(key.open("uid-1", ""), None);
    }

    #[test]
    fn a_secret_digests_as_its_data() {
        let key = Key::new(&[1; 32]);
        let d = data(&[("k", "v")]);
        let secret = Secret {
            data: Some(
                d.iter()
                    .map(|(k, v)| (k.clone(), ByteString(v.clone())))
                    .collect(),
            ),
            ..Default::default()
        };
        assert_eq!(key.digest_secret(&secret), key.digest(&d));
        assert_eq!(key.digest_secret(&Secret::default()), key.digest(&Data::new()));
    }
}
