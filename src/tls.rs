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

/// Builds the server's rustls configuration.
pub fn server_config(tls: &TlsSettings) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // One provider for the whole process, chosen explicitly (not by feature guessing).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (Some(cert_file), Some(key_file)) = (&tls.cert_file, &tls.key_file) else {
        return Err("tls: cert_file and key_file are required".into());
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("tls: cannot read {}: {e}", cert_file.display()))?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("tls: cannot read the private key {}: {e}", key_file.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?;
    let builder = match &tls.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in
                CertificateDer::pem_file_iter(ca_file).map_err(|e| format!("tls: {}: {e}", ca_file.display()))?
            {
                let cert = cert.map_err(|e| format!("tls: {}: {e}", ca_file.display()))?;
                roots.add(cert).map_err(|e| format!("tls: client CA: {e}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if tls.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| format!("tls: client verifier: {e}"))?)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls: certificate/key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
