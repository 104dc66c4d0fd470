//! Mesh identity: this sidecar's SPIFFE certificate, the trust bundle, and the rustls
//! configurations of mutual TLS between sidecars.
//!
//! Inbound, a client certificate chaining to the bundle is required (rustls'
//! `WebPkiClientVerifier`). Outbound, the server's chain is verified against the bundle
//! and, instead of a DNS name, its SPIFFE ID (the one URI SAN) is checked: equal to the
//! cluster's `server_identity`, or in our trust domain when none is configured.
//! TLS 1.3 only unless `min_tls: "1.2"`; rustls offers AEAD suites only.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme, SupportedProtocolVersion,
};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{IdentityConfig, MinTls};
use crate::tls::{read_certs, read_key};

/// A SPIFFE ID, `spiffe://<trust-domain>/<path>`, kept as text with its trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeId {
    pub uri: Arc<str>,
    domain_end: usize,
}

impl SpiffeId {
    pub fn parse(uri: &str) -> Result<Self, String> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("{uri:?} is not a SPIFFE ID (spiffe://<trust-domain>/<path>)"))?;
        let domain = rest.split('/').next().unwrap_or_default();
        let path = &rest[domain.len()..];
        if domain.is_empty()
            || !domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
            || path.len() < 2
            || path.split('/').skip(1).any(str::is_empty)
        {
            return Err(format!("{uri:?} is not a SPIFFE ID (spiffe://<trust-domain>/<path>)"));
        }
        Ok(Self { uri: uri.into(), domain_end: "spiffe://".len() + domain.len() })
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri["spiffe://".len()..self.domain_end]
    }

    /// The SPIFFE ID of a certificate: its one `spiffe://` URI SAN.
    pub fn of_certificate(cert: &CertificateDer<'_>) -> Result<Self, String> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| format!("cannot parse the certificate: {e}"))?;
        let san =
            parsed.subject_alternative_name().map_err(|e| format!("bad subjectAltName extension: {e}"))?;
        let uris: Vec<&str> = san
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
                        _ => None,
                    })
                    .filter(|uri| uri.get(..9).is_some_and(|s| s.eq_ignore_ascii_case("spiffe://")))
                    .collect()
            })
            .unwrap_or_default();
        match uris.as_slice() {
            [uri] => Self::parse(uri),
            [] => Err("the certificate has no spiffe:// URI SAN".to_owned()),
            _ => Err(format!("the certificate has {} spiffe:// URI SANs, expected exactly one", uris.len())),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

/// This sidecar's identity as loaded from its files, with everything built from it.
pub struct Identity {
    pub id: SpiffeId,
    certified: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    versions: &'static [&'static SupportedProtocolVersion],
    /// Server side of mTLS listeners: a client certificate is required.
    pub acceptor: TlsAcceptor,
}

static TLS13_ONLY: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
static TLS13_AND_12: [&SupportedProtocolVersion; 2] = [&rustls::version::TLS13, &rustls::version::TLS12];

impl Identity {
    /// Reads and checks the files. Errors name the field at fault (`identity.cert: ...`).
    pub fn load(config: &IdentityConfig) -> Result<Self, String> {
        let chain = read_certs(&config.cert).map_err(|e| format!("identity.cert: {e}"))?;
        let id = SpiffeId::of_certificate(&chain[0]).map_err(|e| format!("identity.cert: {e}"))?;
        let key = read_key(&config.key).map_err(|e| format!("identity.key: {e}"))?;
        let provider = crate::tls::crypto_provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("identity.key: unusable private key: {e}"))?;
        let certified = CertifiedKey::new(chain, signing_key);
        certified.keys_match().map_err(|e| {
            format!("identity.cert: the certificate does not match the key in {}: {e}", config.key)
        })?;
        let mut roots = RootCertStore::empty();
        for cert in read_certs(&config.bundle).map_err(|e| format!("identity.bundle: {e}"))? {
            roots.add(cert).map_err(|e| format!("identity.bundle: unusable CA certificate: {e}"))?;
        }
        let roots = Arc::new(roots);
        let versions: &'static [&'static SupportedProtocolVersion] = match config.min_tls {
            MinTls::Tls13 => &TLS13_ONLY,
            MinTls::Tls12 => &TLS13_AND_12,
        };
        let certified = Arc::new(certified);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| format!("identity.bundle: {e}"))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| format!("identity: {e}"))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(SingleCert(certified.clone())));
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        server.ignore_client_order = true;
        // No resumption: every connection presents and verifies a certificate (an expired
        // one is not let back in through a session resumed after its end).
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        Ok(Self { id, certified, roots, provider, versions, acceptor: TlsAcceptor::from(Arc::new(server)) })
    }

    /// The client side towards a `tls: mesh` cluster, one configuration per ALPN offer.
    pub fn connector(&self, server_identity: Option<&str>) -> Result<MeshConnector, String> {
        let expected = match server_identity {
            Some(uri) => Expected::Exactly(SpiffeId::parse(uri)?),
            None => Expected::TrustDomain(self.id.trust_domain().to_owned()),
        };
        let verifier = Arc::new(MeshServerVerifier {
            roots: self.roots.clone(),
            provider: self.provider.clone(),
            expected,
        });
        let base = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(self.versions)
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(SingleCert(self.certified.clone())));
        let with_alpn = |alpn: &[&[u8]]| {
            let mut config = base.clone();
            config.resumption = rustls::client::Resumption::disabled();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            TlsConnector::from(Arc::new(config))
        };
        Ok(MeshConnector {
            http1: with_alpn(&[b"http/1.1"]),
            http2: with_alpn(&[b"h2"]),
            opaque: with_alpn(&[]),
        })
    }
}

/// What an upstream connection will carry, which decides the ALPN offered: the
/// protocol the pool is about to speak, so both sidecars agree on it.
#[derive(Clone, Copy)]
pub enum Carrying {
    Http1,
    Http2,
    Opaque,
}

/// Opens mTLS connections to a cluster's endpoints.
pub struct MeshConnector {
    http1: TlsConnector,
    http2: TlsConnector,
    opaque: TlsConnector,
}

impl MeshConnector {
    /// The TLS handshake over an open TCP connection to `address` (host:port).
    pub async fn connect(
        &self,
        stream: TcpStream,
        address: &str,
        carrying: Carrying,
    ) -> Result<TlsStream<TcpStream>, String> {
        let connector = match carrying {
            Carrying::Http1 => &self.http1,
            Carrying::Http2 => &self.http2,
            Carrying::Opaque => &self.opaque,
        };
        // Only the SPIFFE ID is checked; the name just fills in the ClientHello.
        let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned())
            .unwrap_or_else(|_| ServerName::try_from("mesh.invalid").expect("a valid DNS name"));
        connector.connect(name, stream).await.map_err(|e| format!("TLS handshake failed: {}", describe(&e)))
    }
}

/// A TLS error as a sentence: rustls' own text, and the verifiers' reasons as written
/// (rustls shows a custom certificate error in its Debug form).
pub fn describe(error: &std::io::Error) -> String {
    let Some(inner) = error.get_ref() else { return error.to_string() };
    match inner.downcast_ref::<rustls::Error>() {
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(reason))) => {
            format!("invalid peer certificate: {reason}")
        }
        _ => inner.to_string(),
    }
}

/// The peer's SPIFFE ID after an mTLS handshake (the verifier already checked the chain).
pub fn peer_identity(connection: &rustls::CommonState) -> Result<SpiffeId, String> {
    let certs = connection.peer_certificates().ok_or("the peer presented no certificate")?;
    let leaf = certs.first().ok_or("the peer presented no certificate")?;
    SpiffeId::of_certificate(leaf)
}

#[derive(Debug)]
struct SingleCert(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for SingleCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for SingleCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[derive(Debug)]
enum Expected {
    Exactly(SpiffeId),
    TrustDomain(String),
}

/// Verifies an upstream sidecar: the chain against the bundle (validity dates,
/// signatures, serverAuth usage), then its SPIFFE ID instead of a DNS name.
#[derive(Debug)]
struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    expected: Expected,
}

fn identity_error(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(std::io::Error::other(
        message,
    )))))
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )
        .inspect_err(|e| tracing::debug!(error = %e, "upstream certificate refused"))?;
        let id = SpiffeId::of_certificate(end_entity).map_err(|e| {
            tracing::debug!(error = %e, "upstream certificate refused");
            identity_error(e)
        })?;
        let refused = match &self.expected {
            Expected::Exactly(expected) if id != *expected => {
                Some(format!("peer identity {id} is not the expected {expected}"))
            }
            Expected::TrustDomain(domain) if id.trust_domain() != domain => {
                Some(format!("peer identity {id} is not in the trust domain {domain}"))
            }
            _ => None,
        };
        if let Some(message) = refused {
            tracing::debug!(peer = %id, "upstream certificate refused: {message}");
            return Err(identity_error(message));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_are_parsed_with_their_trust_domain() {
        let id = SpiffeId::parse("spiffe://example.org/ns/shop/sa/web").unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.to_string(), "spiffe://example.org/ns/shop/sa/web");
        for bad in [
            "https://example.org/x",
            "spiffe://",
            "spiffe://example.org",
            "spiffe://Ex.org/a",
            "spiffe://e.org/a//b",
            "spiffe://e.org/",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
