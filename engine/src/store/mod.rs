//! Where the engine keeps everything, from the bottom up: `storage` holds opaque bytes in
//! StorageEntry objects, the `barrier` encrypts every value with the keyring, the `seal`
//! keeps the keyring's root key (its unseal key split by `shamir`), and `logical` is the
//! barrier-backed view the rest of the engine reads and writes. Nothing above this module
//! sees ciphertext, and nothing below the barrier sees plaintext.

pub mod barrier;
pub mod clock;
pub mod dev_unseal;
pub mod logical;
pub mod seal;
pub mod shamir;
pub mod storage;
