//! TLS with rustls (the `ring` provider), TLS 1.2 and 1.3 only: the
//! server's configuration from PEM files, and the SDK's from a CA
//! certificate or the Mozilla roots.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}: {detail}")]
    Pem {
        what: &'static str,
        path: String,
        detail: String,
    },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The client listener's configuration: the certificate chain and key in
/// PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let pem = |what, path: &Path, detail: String| TlsError::Pem {
        what,
        path: path.display().to_string(),
        detail,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem("certificates", cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem("certificates", cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem("certificates", cert, "no certificate in it".into()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| pem("a private key", key, e.to_string()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// A client configuration that trusts the CA certificates in `pem`.
pub fn client_config_with_ca(pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| TlsError::Pem {
            what: "CA certificates",
            path: "the given PEM".into(),
            detail: e.to_string(),
        })?;
        roots.add(cert)?;
    }
    client_config(roots)
}

/// A client configuration that trusts the Mozilla root certificates.
pub fn client_config_with_webpki_roots() -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    client_config(roots)
}

fn client_config(roots: rustls::RootCertStore) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
