//! Transport security: rustls with the ring provider installed explicitly,
//! optional mutual TLS, and the client certificate's SPKI hash for registry pins.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};
use x509_cert::der::{Decode, Encode};

use crate::config::TlsSettings;

/// SHA-256 of the client certificate's SubjectPublicKeyInfo, kept per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSpki(pub [u8; 32]);

/// SHA-256 of a DER certificate's SubjectPublicKeyInfo (what registry pins name).
pub fn spki_sha256(cert_der: &[u8]) -> Option<[u8; 32]> {
    let cert = x509_cert::Certificate::from_der(cert_der).ok()?;
    let spki = cert.tbs_certificate.subject_public_key_info.to_der().ok()?;
    Some(Sha256::digest(spki).into())
}

/// Why the TLS configuration cannot be built (the cause is kept as the error's source).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls: cert_file and key_file are required")]
    Missing,
    #[error("tls: cannot read {what} {}", path.display())]
    Pem {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("tls: {what}")]
    Rustls {
        what: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("tls: the client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// Builds the server's rustls configuration.
pub fn server_config(tls: &TlsSettings) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // One provider for the whole process, chosen explicitly (not by feature guessing).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (Some(cert_file), Some(key_file)) = (&tls.cert_file, &tls.key_file) else {
        return Err(TlsError::Missing);
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|source| TlsError::Pem {
            what: "the certificate",
            path: cert_file.clone(),
            source,
        })?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|source| TlsError::Pem {
        what: "the private key",
        path: key_file.clone(),
        source,
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            what: "protocol versions",
            source,
        })?;
    let builder = match &tls.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let mut roots = rustls::RootCertStore::empty();
            let pem = |source| TlsError::Pem {
                what: "the client CA",
                path: ca_file.clone(),
                source,
            };
            for cert in CertificateDer::pem_file_iter(ca_file).map_err(pem)? {
                roots.add(cert.map_err(pem)?).map_err(|source| TlsError::Rustls {
                    what: "the client CA",
                    source,
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if tls.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(verifier.build().map_err(TlsError::Verifier)?)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Rustls {
            what: "the certificate and key",
            source,
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsMode;

    /// A certificate that cannot be read is named, and the I/O error stays its cause.
    #[test]
    fn a_missing_certificate_keeps_its_cause() {
        let tls = TlsSettings {
            mode: TlsMode::Native,
            cert_file: Some("/nonexistent/cert.pem".into()),
            key_file: Some("/nonexistent/key.pem".into()),
            client_ca_file: None,
            require_client_cert: false,
        };
        let err = server_config(&tls).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::Pem {
                    what: "the certificate",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
        let cause = std::error::Error::source(&err)
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(cause.contains("No such file"), "the cause is kept: {cause:?}");
    }
}
