//! New TLS connections per second against one server, for `python -m bench churn`.
//!
//! `--connections` tasks on one thread each loop: connect, handshake (TLS 1.3, X25519),
//! send close_notify, read until the server closes. Reading to the server's close proves
//! it finished its side of the handshake, so the rate counts handshakes both ends
//! completed. Sessions are not resumed unless `--resume`. Prints one JSON object:
//! handshakes, seconds, errors and the first error.
//!
//! `--verify chain` (the default) checks the server's chain against `--ca` and its
//! handshake signature, not its name: the bench's certificates are mesh workload
//! certificates, whose only name is a SPIFFE URI. `signature` skips the chain, `none` the
//! signature too. Each ECDSA P-256 verification skipped is a quarter to a third of the CPU
//! the client spends per handshake, while the server does the same whatever the client
//! checks: with `none`, one client core can keep one server core busy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, Resumption};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const USAGE: &str =
    "usage: meshpy-tlsload --connect IP:PORT [--ca BUNDLE.pem] [--cert CERT.pem --key KEY.pem] \
[--connections N (default 16)] [--seconds S (default 5)] [--resume] [--verify chain|signature|none]";

/// What the client checks of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Verify {
    /// The chain against `--ca` and the handshake signature.
    Chain,
    /// The handshake signature only.
    Signature,
    None,
}

struct Args {
    connect: SocketAddr,
    /// Needed by `--verify chain` only.
    ca: Option<String>,
    client_cert: Option<(String, String)>,
    connections: usize,
    seconds: f64,
    resume: bool,
    verify: Verify,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut connect, mut ca, mut cert, mut key) = (None, None, None, None);
    let (mut connections, mut seconds, mut resume, mut verify) = (16, 5.0, false, Verify::Chain);
    while let Some(flag) = args.next() {
        if flag == "--resume" {
            resume = true;
            continue;
        }
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--connect" => connect = Some(value.parse().map_err(|e| bad(&e))?),
            "--ca" => ca = Some(value),
            "--cert" => cert = Some(value),
            "--key" => key = Some(value),
            "--connections" => connections = value.parse().map_err(|e| bad(&e))?,
            "--seconds" => seconds = value.parse().map_err(|e| bad(&e))?,
            "--verify" => {
                verify = match value.as_str() {
                    "chain" => Verify::Chain,
                    "signature" => Verify::Signature,
                    "none" => Verify::None,
                    _ => return Err(bad(&"expected chain, signature or none")),
                }
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    let client_cert = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => return Err("--cert and --key go together".into()),
    };
    if connections == 0 || seconds <= 0.0 {
        return Err("--connections and --seconds must be positive".into());
    }
    if verify == Verify::Chain && ca.is_none() {
        return Err("--verify chain (the default) needs --ca".into());
    }
    Ok(Args {
        connect: connect.ok_or("--connect is required")?,
        ca,
        client_cert,
        connections,
        seconds,
        resume,
        verify,
    })
}

fn read_pem(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    rustls_pemfile::certs(&mut pem.as_slice()).collect::<Result<_, _>>().map_err(|e| format!("{path}: {e}"))
}

fn read_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| format!("{path}: {e}"))?
        .ok_or(format!("{path}: no private key"))
}

/// Checks what `verify` asks: the server's chain against the roots (dates, signatures,
/// serverAuth) and its handshake signature, never its name.
#[derive(Debug)]
struct LoadVerifier {
    roots: RootCertStore,
    provider: Arc<CryptoProvider>,
    verify: Verify,
}

impl ServerCertVerifier for LoadVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.verify == Verify::Chain {
            let algorithms = self.provider.signature_verification_algorithms.all;
            let cert = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(&cert, &self.roots, intermediates, now, algorithms)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    /// Never called: the client offers TLS 1.3 only.
    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("meshpy-tlsload offers TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if self.verify == Verify::None {
            return Ok(HandshakeSignatureValid::assertion());
        }
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config(args: &Args) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    if let Some(ca) = &args.ca {
        for cert in read_pem(ca)? {
            roots.add(cert).map_err(|e| format!("{ca}: {e}"))?;
        }
    }
    let verifier = Arc::new(LoadVerifier { roots, provider: provider.clone(), verify: args.verify });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &args.client_cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(read_pem(cert)?, read_key(key)?)
            .map_err(|e| format!("{cert}: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    if !args.resume {
        config.resumption = Resumption::disabled();
    }
    Ok(config)
}

/// One connection: handshake, close_notify, then wait for the server to close.
async fn one_connection(connector: &TlsConnector, addr: SocketAddr) -> std::io::Result<()> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut tls = connector.connect(ServerName::IpAddress(addr.ip().into()), tcp).await?;
    tls.shutdown().await?;
    let mut sink = [0u8; 1024];
    loop {
        match tls.read(&mut sink).await {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            // A server that closes without close_notify has still finished the handshake.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

#[derive(Default)]
struct Tally {
    handshakes: u64,
    errors: u64,
    first_error: Option<String>,
}

async fn run(args: Args) -> Result<(Tally, f64), String> {
    let connector = TlsConnector::from(Arc::new(client_config(&args)?));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let tasks: Vec<_> = (0..args.connections)
        .map(|_| {
            let connector = connector.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                while Instant::now() < deadline {
                    match one_connection(&connector, args.connect).await {
                        Ok(()) => tally.handshakes += 1,
                        Err(e) => {
                            tally.errors += 1;
                            tally.first_error.get_or_insert(e.to_string());
                        }
                    }
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for task in tasks {
        let tally = task.await.map_err(|e| e.to_string())?;
        total.handshakes += tally.handshakes;
        total.errors += tally.errors;
        if total.first_error.is_none() {
            total.first_error = tally.first_error;
        }
    }
    Ok((total, start.elapsed().as_secs_f64()))
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("meshpy-tlsload: {message}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    match runtime.block_on(run(args)) {
        Ok((tally, seconds)) => println!(
            "{}",
            serde_json::json!({
                "handshakes": tally.handshakes,
                "seconds": (seconds * 1000.0).round() / 1000.0,
                "errors": tally.errors,
                "first_error": tally.first_error,
            })
        ),
        Err(message) => {
            eprintln!("meshpy-tlsload: {message}");
            std::process::exit(1);
        }
    }
}
