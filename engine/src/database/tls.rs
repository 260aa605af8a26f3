//! TLS to PostgreSQL, through rustls (no OpenSSL in the binary), set as libpq and Vault
//! read it: `sslmode` and `sslrootcert` (a PEM file on the engine, e.g. a mounted Secret)
//! in the connection URL's query.
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
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject as _},
    server::ParsedCertificate,
};
use std::{path::PathBuf, sync::Arc};
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
}

/// Takes `sslmode` and `sslrootcert` out of the URL's query (tokio-postgres knows neither
/// `verify-*` nor `sslrootcert`); the rest of the URL is left as it was.
pub fn split_url(url: &str) -> Result<(String, Settings), DatabaseError> {
    let mut settings = Settings {
        mode: Mode::Prefer,
        root_cert: None,
    };
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
            "sslrootcert" => settings.root_cert = Some(PathBuf::from(percent_decode(value)?)),
            "sslcert" | "sslkey" | "sslpassword" | "sslcrl" => {
                return Err(DatabaseError::Invalid(format!(
                    "connection_url: {key} is not supported (client certificates are not, yet)"
                )));
            }
            _ => kept.push(pair),
        }
    }
    if settings.root_cert.is_some() && settings.mode == Mode::Disable {
        return Err(DatabaseError::Invalid(
            "connection_url: sslrootcert with sslmode=disable".into(),
        ));
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, settings))
}

fn percent_decode(value: &str) -> Result<String, DatabaseError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| DatabaseError::Invalid("connection_url: bad percent-encoding".into()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| DatabaseError::Invalid("connection_url: sslrootcert is not UTF-8".into()))
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
        let config = if self.mode == Mode::VerifyFull {
            builder.with_webpki_verifier(webpki).with_no_client_auth()
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly {
                    roots,
                    provider,
                    webpki,
                }))
                .with_no_client_auth()
        };
        Ok(MakeRustlsConnect::new(config))
    }

    fn roots(&self) -> Result<RootCertStore, DatabaseError> {
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| DatabaseError::Invalid(format!("sslrootcert {}: {e}", path.display())))?;
                let (added, _) = roots.add_parsable_certificates(certs);
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
            "postgresql://db/app?sslmode=disable&sslrootcert=/ca.pem",
            "postgresql://db/app?sslrootcert=%zz",
        ] {
            assert!(split_url(url).is_err(), "{url}");
        }
    }

    #[test]
    fn a_root_file_without_certificates_is_refused() {
        let path = std::env::temp_dir().join(format!("capstan-empty-{:08x}.pem", rand::random::<u32>()));
        std::fs::write(&path, "not a certificate\n").unwrap();
        let settings = Settings {
            mode: Mode::VerifyCa,
            root_cert: Some(path.clone()),
        };
        let error = settings.connector().err().expect("refused").to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(error.contains("no certificate"), "{error}");
    }
}
