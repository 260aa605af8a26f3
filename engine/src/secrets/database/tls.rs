//! TLS to PostgreSQL, through rustls (no OpenSSL in the binary), set as libpq and Vault
//! read it: `sslmode`, `sslrootcert` and a client certificate (`sslcert`, `sslkey`), PEM
//! files on the engine (e.g. a mounted Secret), in the connection URL's query. The files
//! are read at each new connection, so a certificate renewed in place is picked up.
//!
//! One difference from libpq, on purpose: a TLS connection is always verified. libpq's
//! `require` and `prefer` encrypt without checking who answers, which a man in the middle
//! defeats; here they check the chain against `sslrootcert` or the system's trust store.
//! `verify-ca` skips only the host name; `verify-full` checks it too. `disable` is plain
//! text (refuse it at the server with a `hostnossl ... reject` line in pg_hba.conf).

use super::DatabaseError;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
    server::ParsedCertificate,
};
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub mode: Mode,
    pub root_cert: Option<PathBuf>,
    /// The client certificate (chain) and its key, for servers that ask for one
    /// (pg_hba.conf's `cert` method or `clientcert=verify-ca|verify-full`).
    pub client_cert: Option<ClientCert>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Takes the TLS settings out of the URL's query (tokio-postgres knows neither
/// `verify-*` nor the file parameters); the rest of the URL is left as it was.
pub fn split_url(url: &str) -> Result<(String, Settings), DatabaseError> {
    let mut settings = Settings {
        mode: Mode::Prefer,
        root_cert: None,
        client_cert: None,
    };
    let (mut cert, mut key_file) = (None, None);
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), settings));
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslmode" => {
                settings.mode = match value {
                    "disable" => Mode::Disable,
                    "allow" | "prefer" => Mode::Prefer,
                    "require" => Mode::Require,
                    "verify-ca" => Mode::VerifyCa,
                    "verify-full" => Mode::VerifyFull,
                    _ => {
                        return Err(DatabaseError::Invalid(format!(
                            "connection_url: sslmode {value:?} is not one of disable, prefer, require, verify-ca, verify-full"
                        )));
                    }
                }
            }
            "sslrootcert" => settings.root_cert = Some(path(key, value)?),
            "sslcert" => cert = Some(path(key, value)?),
            "sslkey" => key_file = Some(path(key, value)?),
            "sslpassword" => {
                return Err(DatabaseError::Invalid(
                    "connection_url: sslpassword is not supported: give sslkey an unencrypted key file (PKCS#8, SEC1 or PKCS#1 PEM)".into(),
                ));
            }
            "sslcrl" | "sslcrldir" => {
                return Err(DatabaseError::Invalid(format!(
                    "connection_url: {key} is not supported"
                )));
            }
            _ => kept.push(pair),
        }
    }
    settings.client_cert = match (cert, key_file) {
        (Some(cert), Some(key)) => Some(ClientCert { cert, key }),
        (None, None) => None,
        _ => {
            return Err(DatabaseError::Invalid(
                "connection_url: sslcert and sslkey go together".into(),
            ));
        }
    };
    if settings.mode == Mode::Disable {
        for (set, name) in [
            (settings.root_cert.is_some(), "sslrootcert"),
            (settings.client_cert.is_some(), "sslcert"),
        ] {
            if set {
                return Err(DatabaseError::Invalid(format!(
                    "connection_url: {name} with sslmode=disable"
                )));
            }
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, settings))
}

/// A file parameter's value, percent-decoded as in any URL query. A `%` not followed by
/// two hex digits is refused, as libpq refuses it (the decoder would keep it as text).
fn path(key: &str, value: &str) -> Result<PathBuf, DatabaseError> {
    let malformed = value.match_indices('%').any(|(i, _)| {
        value
            .get(i + 1..i + 3)
            .is_none_or(|hex| !hex.bytes().all(|b| b.is_ascii_hexdigit()))
    });
    if malformed {
        return Err(DatabaseError::Invalid(format!(
            "connection_url: {key} has a malformed percent-encoding"
        )));
    }
    percent_encoding::percent_decode_str(value)
        .decode_utf8()
        .map(|path| PathBuf::from(path.as_ref()))
        .map_err(|_| DatabaseError::Invalid(format!("connection_url: {key} is not UTF-8")))
}

impl Settings {
    pub fn ssl_mode(&self) -> SslMode {
        match self.mode {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
        }
    }

    /// The rustls connector for these settings (used only when TLS is negotiated).
    pub fn connector(&self) -> Result<MakeRustlsConnect, DatabaseError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(self.roots()?);
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| DatabaseError::Invalid(e.to_string()))?;
        let webpki = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| DatabaseError::Invalid(format!("sslrootcert: {e}")))?;
        let builder = if self.mode == Mode::VerifyFull {
            builder.with_webpki_verifier(webpki)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly {
                    roots,
                    provider,
                    webpki,
                }))
        };
        let config = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some(client) => {
                let (chain, key) = client.load()?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    DatabaseError::Invalid(format!(
                        "sslcert {} with sslkey {}: {e}",
                        client.cert.display(),
                        client.key.display()
                    ))
                })?
            }
        };
        Ok(MakeRustlsConnect::new(config))
    }

    fn roots(&self) -> Result<RootCertStore, DatabaseError> {
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                let (added, _) = roots.add_parsable_certificates(certificates("sslrootcert", path)?);
                if added == 0 {
                    return Err(DatabaseError::Invalid(format!(
                        "sslrootcert {}: no certificate in it",
                        path.display()
                    )));
                }
            }
            None => {
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            }
        }
        Ok(roots)
    }
}

impl ClientCert {
    /// The certificate chain and key from their files. Errors name the file and what is
    /// wrong with it, never its contents.
    fn load(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), DatabaseError> {
        let chain = certificates("sslcert", &self.cert)?;
        if chain.is_empty() {
            return Err(DatabaseError::Invalid(format!(
                "sslcert {}: no certificate in it",
                self.cert.display()
            )));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| {
            DatabaseError::Invalid(format!(
                "sslkey {}: {}",
                self.key.display(),
                pem_error(&e, "not a PEM private key")
            ))
        })?;
        Ok((chain, key))
    }
}

/// The certificates of a PEM file named by the URL's parameter `param`.
fn certificates(param: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, DatabaseError> {
    CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            DatabaseError::Invalid(format!(
                "{param} {}: {}",
                path.display(),
                pem_error(&e, "not a PEM certificate file")
            ))
        })
}

/// What is wrong with a PEM file, without any of its bytes: the parser's own errors quote
/// the offending line, which in a file pasted onto one line is all of it, key included.
fn pem_error(error: &rustls::pki_types::pem::Error, otherwise: &str) -> String {
    use rustls::pki_types::pem::Error;
    match error {
        Error::NoItemsFound => "no unencrypted private key in it (PKCS#8, SEC1 or PKCS#1 PEM)".into(),
        Error::Io(e) => e.to_string(),
        _ => otherwise.into(),
    }
}

/// verify-ca, require and prefer: the chain must end at a trusted root, the host name is
/// not compared (a database reached through an address its certificate does not name).
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    webpki: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_parameters_are_taken_out_of_the_url() {
        let (url, s) = split_url(
            "postgresql://{{username}}:{{password}}@db:5432/app?sslmode=verify-full&sslrootcert=/etc/pg/ca%20x.pem&connect_timeout=5",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgresql://{{username}}:{{password}}@db:5432/app?connect_timeout=5"
        );
        assert_eq!(s.mode, Mode::VerifyFull);
        assert_eq!(s.root_cert, Some(PathBuf::from("/etc/pg/ca x.pem")));
        assert_eq!(s.ssl_mode(), SslMode::Require);

        let (url, s) = split_url("postgresql://u@db/app").unwrap();
        assert_eq!((url.as_str(), s.mode), ("postgresql://u@db/app", Mode::Prefer));
        let (url, s) = split_url("postgresql://u@db/app?sslmode=disable").unwrap();
        assert_eq!(
            (url.as_str(), s.ssl_mode()),
            ("postgresql://u@db/app", SslMode::Disable)
        );
    }

    #[test]
    fn unsupported_or_contradictory_settings_are_refused() {
        for url in [
            "postgresql://db/app?sslmode=sometimes",
            "postgresql://db/app?sslcert=/c.pem",
            "postgresql://db/app?sslkey=/k.pem",
            "postgresql://db/app?sslcert=/c.pem&sslkey=/k.pem&sslpassword=x",
            "postgresql://db/app?sslmode=disable&sslcert=/c.pem&sslkey=/k.pem",
            "postgresql://db/app?sslcrl=/crl.pem",
            "postgresql://db/app?sslmode=disable&sslrootcert=/ca.pem",
            "postgresql://db/app?sslrootcert=%ff",
            "postgresql://db/app?sslrootcert=%zz",
            "postgresql://db/app?sslrootcert=/ca%2",
            "postgresql://db/app?sslrootcert=/ca%",
        ] {
            assert!(split_url(url).is_err(), "{url}");
        }
    }

    #[test]
    fn a_client_certificate_is_taken_from_the_url_and_loaded() {
        let dir = std::env::temp_dir().join(format!("capstan-client-cert-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["capstan_admin".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("client.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("ca.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("client key.pem"), key.serialize_pem()).unwrap();
        let url = format!(
            "postgresql://db/app?sslmode=verify-full&sslrootcert={d}/ca.crt&sslcert={d}/client.crt&sslkey={d}/client%20key.pem",
            d = dir.display()
        );
        let (rest, settings) = split_url(&url).unwrap();
        assert_eq!(rest, "postgresql://db/app");
        assert_eq!(
            settings.client_cert,
            Some(ClientCert {
                cert: dir.join("client.crt"),
                key: dir.join("client key.pem"),
            })
        );
        settings.connector().expect("a certificate and its key load");

        // Another certificate's key.
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::write(dir.join("client key.pem"), other.serialize_pem()).unwrap();
        let error = settings.connector().err().expect("refused").to_string();
        assert!(error.contains("with sslkey"), "{error}");

        // A key pasted onto one line, named as the key and as the certificate: the
        // parser's error quotes the line (as a list of byte values); ours names the file.
        let one_line = key.serialize_pem().replace('\n', " ");
        std::fs::write(dir.join("client key.pem"), &one_line).unwrap();
        let error = settings.connector().err().expect("refused").to_string();
        assert!(error.contains("client key.pem: not a PEM private key"), "{error}");
        assert!(!error.contains('['), "the error quotes the file: {error}");
        std::fs::write(dir.join("client key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("client.crt"), &one_line).unwrap();
        let error = settings.connector().err().expect("refused").to_string();
        assert!(
            error.contains("client.crt: not a PEM certificate file"),
            "{error}"
        );
        assert!(!error.contains('['), "the error quotes the file: {error}");
        // A certificate file with no certificate in it.
        std::fs::write(dir.join("client.crt"), "nothing\n").unwrap();
        let error = settings.connector().err().expect("refused").to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            error.starts_with("sslcert") || error.contains(": sslcert"),
            "{error}"
        );
        assert!(error.contains("no certificate"), "{error}");
    }

    #[test]
    fn a_root_file_without_certificates_is_refused() {
        let path = std::env::temp_dir().join(format!("capstan-empty-{:08x}.pem", rand::random::<u32>()));
        std::fs::write(&path, "not a certificate\n").unwrap();
        let settings = Settings {
            mode: Mode::VerifyCa,
            root_cert: Some(path.clone()),
            client_cert: None,
        };
        let error = settings.connector().err().expect("refused").to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(error.contains("no certificate"), "{error}");
    }
}
