//! Vault ACL policies (in progress).
