//! The PKI secrets engine: a CA of its own per mount (generated inside the engine; its
//! key never leaves the barrier), roles that say which names a certificate may carry and
//! for how long, and `issue`: a fresh ECDSA P-256 key and a certificate for it. The mesh
//! CA is the other PKI mount (`/v1/mesh/`, `crate::mesh_ca`), which signs workload
//! identities only; this one never issues SPIFFE IDs, so nothing it signs can pass for a
//! mesh workload.

use crate::{
    mesh_ca::signing::{is_dns_name, pem_of, random_serial},
    secrets::named::Named,
    store::logical::{Logical, LogicalError},
    store::storage::Precondition,
};
use parking_lot::RwLock;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use serde::{Deserialize, Serialize};
use std::{net::IpAddr, sync::Arc, time::Duration};
use time::OffsetDateTime;

const BACKDATE: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize, Clone)]
struct StoredCa {
    certificate_pem: String,
    key_pem: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Role {
    pub allowed_domains: Vec<String>,
    pub allow_subdomains: bool,
    pub allow_bare_domains: bool,
    /// `allowed_domains` entries with `*` match as globs (`*` spans any characters,
    /// dots included, as Vault's `glob.Glob` does).
    #[serde(default)]
    pub allow_glob_domains: bool,
    pub allow_localhost: bool,
    pub allow_ip_sans: bool,
    pub allow_any_name: bool,
    pub server_flag: bool,
    pub client_flag: bool,
    /// Seconds (0: the mount's default, 72h as Vault's system default is too long here).
    pub ttl: u64,
    pub max_ttl: u64,
}

impl Role {
    fn max(&self) -> u64 {
        if self.max_ttl == 0 {
            30 * 24 * 3600
        } else {
            self.max_ttl
        }
    }

    fn ttl_for(&self, asked: u64) -> u64 {
        let default = if self.ttl == 0 { 72 * 3600 } else { self.ttl };
        if asked == 0 { default } else { asked }.min(self.max())
    }

    /// Whether `name` may be in a certificate of this role.
    pub fn allows_name(&self, name: &str) -> bool {
        if self.allow_any_name {
            return is_dns_name(name);
        }
        if name == "localhost" {
            return self.allow_localhost;
        }
        if !is_dns_name(name) {
            return false;
        }
        // Vault's semantics (builtin/logical/pki/cert_util.go validateNames): a name is
        // allowed by an entry when it is the entry itself (allow_bare_domains), ends in
        // `.<entry>` (allow_subdomains, any depth), or matches the entry as a glob
        // (allow_glob_domains, entries holding `*`).
        let name = name.to_ascii_lowercase();
        self.allowed_domains.iter().any(|domain| {
            let domain = domain.to_ascii_lowercase();
            (self.allow_bare_domains && name == domain)
                || (self.allow_subdomains && name.ends_with(&format!(".{domain}")))
                || (self.allow_glob_domains && domain.contains('*') && glob(&domain, &name))
        })
    }
}

/// `pattern` (with `*` matching any run of characters) against all of `name`.
fn glob(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0}")]
    Invalid(String),
    #[error("unknown role {0:?}")]
    UnknownRole(String),
    #[error("this mount has no CA yet: generate one at <mount>/root/generate/internal")]
    NoCa,
    #[error("this mount already has a CA")]
    HasCa,
    #[error("signing failed")]
    Sign,
    #[error(transparent)]
    Storage(#[from] LogicalError),
}

/// A certificate just issued.
pub struct IssuedCert {
    pub certificate: String,
    pub issuing_ca: String,
    pub private_key: String,
    pub serial_number: String,
    pub expiration: i64,
}

struct Loaded {
    version: u64,
    issuer: Arc<Issuer<'static, KeyPair>>,
    certificate_pem: String,
    not_after: OffsetDateTime,
}

#[derive(Clone)]
pub struct Pki {
    logical: Logical,
    mount: String,
    roles: Named,
    loaded: Arc<RwLock<Option<Loaded>>>,
}

fn serial_hex(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| {
            c.raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        })
        .unwrap_or_default()
}

impl Pki {
    pub fn new(logical: Logical, mount: &str) -> Self {
        let mount = mount.trim_end_matches('/').to_owned();
        Self {
            roles: Named::new(logical.clone(), &mount, "role"),
            logical,
            mount,
            loaded: Arc::default(),
        }
    }

    pub fn mount(&self) -> &str {
        &self.mount
    }

    fn ca_path(&self) -> String {
        format!("logical/{}/ca", self.mount)
    }

    /// Generates the mount's root (once). Returns its certificate.
    pub async fn generate_root(&self, common_name: &str, ttl: u64) -> Result<String, PkiError> {
        if common_name.is_empty() || common_name.len() > 64 || common_name.chars().any(char::is_control) {
            return Err(PkiError::Invalid(
                "common_name is required (at most 64 characters)".into(),
            ));
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|_| PkiError::Sign)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, common_name);
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now - BACKDATE;
        let ttl = if ttl == 0 { 10 * 365 * 24 * 3600 } else { ttl };
        params.not_after = now + Duration::from_secs(ttl);
        params.serial_number = Some(random_serial());
        let certificate = params.self_signed(&key).map_err(|_| PkiError::Sign)?;
        let stored = StoredCa {
            certificate_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
        };
        match self
            .logical
            .put(&self.ca_path(), &stored, Precondition::Absent)
            .await
        {
            Ok(_) => Ok(stored.certificate_pem),
            Err(LogicalError::Storage(crate::store::storage::StorageError::Conflict(_))) => {
                Err(PkiError::HasCa)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The CA in force, parsed once per stored version.
    async fn ca(&self) -> Result<(Arc<Issuer<'static, KeyPair>>, String, OffsetDateTime), PkiError> {
        let stored = self
            .logical
            .get::<StoredCa>(&self.ca_path())
            .await?
            .ok_or(PkiError::NoCa)?;
        if let Some(loaded) = &*self.loaded.read()
            && loaded.version == stored.version
        {
            return Ok((
                loaded.issuer.clone(),
                loaded.certificate_pem.clone(),
                loaded.not_after,
            ));
        }
        let key = KeyPair::from_pem(&stored.value.key_pem).map_err(|_| PkiError::Sign)?;
        let issuer = Arc::new(
            Issuer::from_ca_cert_pem(&stored.value.certificate_pem, key).map_err(|_| PkiError::Sign)?,
        );
        let (_, pem) = x509_parser::pem::parse_x509_pem(stored.value.certificate_pem.as_bytes())
            .map_err(|_| PkiError::Sign)?;
        let not_after = pem
            .parse_x509()
            .ok()
            .and_then(|c| OffsetDateTime::from_unix_timestamp(c.validity().not_after.timestamp()).ok())
            .ok_or(PkiError::Sign)?;
        *self.loaded.write() = Some(Loaded {
            version: stored.version,
            issuer: issuer.clone(),
            certificate_pem: stored.value.certificate_pem.clone(),
            not_after,
        });
        Ok((issuer, stored.value.certificate_pem, not_after))
    }

    pub async fn ca_pem(&self) -> Result<String, PkiError> {
        Ok(self.ca().await?.1)
    }

    pub async fn role(&self, name: &str) -> Result<Option<Role>, PkiError> {
        Ok(self.roles.get::<Role>(name).await?.map(|v| v.value))
    }

    pub async fn write_role(&self, name: &str, role: Role) -> Result<(), PkiError> {
        if !crate::store::storage::valid_name(name) {
            return Err(PkiError::Invalid(format!("invalid role name {name:?}")));
        }
        if !role.allow_any_name && role.allowed_domains.is_empty() && !role.allow_localhost {
            return Err(PkiError::Invalid(
                "allowed_domains is required unless allow_any_name is set".into(),
            ));
        }
        if role.max_ttl > 0 && role.ttl > role.max_ttl {
            return Err(PkiError::Invalid("ttl cannot be greater than max_ttl".into()));
        }
        self.roles.put(name, &role).await?;
        Ok(())
    }

    pub async fn delete_role(&self, name: &str) -> Result<(), PkiError> {
        Ok(self.roles.delete(name).await?)
    }

    pub async fn list_roles(&self) -> Result<Vec<String>, PkiError> {
        Ok(self.roles.list().await?)
    }

    /// A new key and a certificate for `common_name` (+ `alt_names`, `ip_sans`) under
    /// `role`'s rules; every name is checked, none is dropped quietly.
    pub async fn issue(
        &self,
        role_name: &str,
        common_name: &str,
        alt_names: &[String],
        ip_sans: &[String],
        ttl: u64,
    ) -> Result<IssuedCert, PkiError> {
        let role = self
            .role(role_name)
            .await?
            .ok_or_else(|| PkiError::UnknownRole(role_name.to_owned()))?;
        let mut sans = Vec::new();
        for name in std::iter::once(common_name).chain(alt_names.iter().map(String::as_str)) {
            if !role.allows_name(name) {
                return Err(PkiError::Invalid(format!(
                    "{name:?} is not allowed by role {role_name:?}"
                )));
            }
            sans.push(SanType::DnsName(
                name.to_owned()
                    .try_into()
                    .map_err(|_| PkiError::Invalid(format!("invalid name {name:?}")))?,
            ));
        }
        for ip in ip_sans {
            if !role.allow_ip_sans {
                return Err(PkiError::Invalid(format!(
                    "IP SANs are not allowed by role {role_name:?}"
                )));
            }
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| PkiError::Invalid(format!("invalid IP {ip:?}")))?;
            sans.push(SanType::IpAddress(ip));
        }
        let (issuer, ca_pem, ca_not_after) = self.ca().await?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|_| PkiError::Sign)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, common_name);
        params.distinguished_name = name;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let mut usages = Vec::new();
        if role.server_flag || !role.client_flag {
            usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if role.client_flag {
            usages.push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = (now + Duration::from_secs(role.ttl_for(ttl))).min(ca_not_after);
        params.serial_number = Some(random_serial());
        let not_after = params.not_after;
        let certificate = params.signed_by(&key, &issuer).map_err(|_| PkiError::Sign)?;
        Ok(IssuedCert {
            serial_number: serial_hex(certificate.der()),
            certificate: pem_of(certificate.der()),
            issuing_ca: ca_pem,
            private_key: key.serialize_pem(),
            expiration: not_after.unix_timestamp(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names() {
        let role = Role {
            allowed_domains: vec!["example.com".into()],
            allow_subdomains: true,
            ..Default::default()
        };
        assert!(role.allows_name("api.example.com"));
        assert!(role.allows_name("a.b.EXAMPLE.com"));
        assert!(!role.allows_name("example.com"), "bare domain not allowed");
        assert!(!role.allows_name("evil-example.com"));
        assert!(!role.allows_name("example.com.evil.org"));
        assert!(!role.allows_name("localhost"));
        assert!(!role.allows_name("*.example.com"));
        assert!(!role.allows_name("spiffe://cluster.local/ns/a/sa/b"));
    }

    /// Vault's semantics for `allowed_domains=example.internal allow_subdomains=true`
    /// (issue 15, item 10d), bare domains and globs.
    #[test]
    fn domains_as_vault_reads_them() {
        let sub = Role {
            allowed_domains: vec!["example.internal".into()],
            allow_subdomains: true,
            ..Role::default()
        };
        assert!(sub.allows_name("a.example.internal"));
        assert!(sub.allows_name("a.b.example.internal"));
        assert!(!sub.allows_name("example.internal"));
        assert!(!sub.allows_name("aexample.internal"));
        let bare = Role {
            allow_bare_domains: true,
            ..sub.clone()
        };
        assert!(bare.allows_name("example.internal"));
        let glob = Role {
            allowed_domains: vec!["web-*.example.internal".into()],
            allow_glob_domains: true,
            ..Role::default()
        };
        assert!(glob.allows_name("web-1.example.internal"));
        assert!(
            glob.allows_name("web-a.b.example.internal"),
            "* spans dots, as in Vault"
        );
        assert!(!glob.allows_name("db-1.example.internal"));
        assert!(!glob.allows_name("web-1.example.internal.evil.org"));
        let no_glob = Role {
            allow_glob_domains: false,
            ..glob.clone()
        };
        assert!(!no_glob.allows_name("web-1.example.internal"));
    }

    #[tokio::test]
    async fn issues_within_the_role_and_refuses_outside() {
        let pki = Pki::new(crate::auth::token::tests::unsealed().await, "pki");
        assert!(matches!(
            pki.issue("web", "a.example.com", &[], &[], 0).await,
            Err(PkiError::UnknownRole(_))
        ));
        pki.write_role(
            "web",
            Role {
                allowed_domains: vec!["example.com".into()],
                allow_subdomains: true,
                max_ttl: 3600,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert!(matches!(
            pki.issue("web", "a.example.com", &[], &[], 0).await,
            Err(PkiError::NoCa)
        ));
        let root = pki.generate_root("Test Root", 0).await.unwrap();
        assert!(matches!(
            pki.generate_root("Again", 0).await,
            Err(PkiError::HasCa)
        ));
        let issued = pki
            .issue("web", "a.example.com", &["b.example.com".into()], &[], 999_999)
            .await
            .unwrap();
        assert_eq!(issued.issuing_ca, root);
        assert!(
            issued.expiration <= OffsetDateTime::now_utc().unix_timestamp() + 3600,
            "clamped to max_ttl"
        );
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.certificate.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let (_, ca_pem) = x509_parser::pem::parse_x509_pem(root.as_bytes()).unwrap();
        let ca = ca_pem.parse_x509().unwrap();
        cert.verify_signature(Some(ca.public_key())).unwrap();
        assert!(!cert.is_ca());
        for refused in [
            ("evil.org", vec![]),
            ("a.example.com", vec!["evil.org".to_owned()]),
        ] {
            assert!(matches!(
                pki.issue("web", refused.0, &refused.1, &[], 0).await,
                Err(PkiError::Invalid(_))
            ));
        }
        assert!(matches!(
            pki.issue("web", "a.example.com", &[], &["10.0.0.1".into()], 0)
                .await,
            Err(PkiError::Invalid(_))
        ));
    }
}
