//! TLS configurations for the manager connection (rustls with the aws-lc-rs provider, TLS
//! 1.3 only, ALPN [`proto::stream::ALPN`]), built from PEM files or DER. The TLS layer
//! itself is sans-IO, in [`proto::stream::FrameStream`]; this module only makes its
//! configurations (proto reads no file).
//!
//! A client trusts the manager's certificate through a CA file (`--ca PEM`: webpki
//! verification against those roots, for the host name or IP address it dials) or a pin
//! (`--pin SHA256`: the SHA-256 of the certificate's DER, as `openssl x509 -noout
//! -fingerprint -sha256` prints it; the handshake signature is still checked with the
//! provider's algorithms). There are no system roots: one of the two is required.
//!
//! Resumption: a server issues one TLS 1.3 ticket per handshake (a ticketer from the
//! provider: stateless, no per-client memory); a client keeps its tickets in its
//! configuration's session cache, so a reconnect with the same [`ClientTls`] resumes. 0-RTT
//! (early data) is off on both sides: a replayable REGISTER is what the binding prevents.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proto::stream::{FrameStream, StreamError, ALPN};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the configuration (a key that does not match, an unsupported key).
    #[error("tls configuration: {0}")]
    Config(#[from] rustls::Error),
    /// Not a SHA-256 fingerprint.
    #[error("--pin {0:?}: expected a SHA-256 fingerprint, 64 hex digits (colons allowed)")]
    Pin(String),
    /// Not a host name or IP address a certificate can name.
    #[error("{0:?} is not a host name or IP address to check the manager's certificate against")]
    ServerName(String),
}

/// How a client trusts the manager's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The CA certificates in this PEM file (the manager's own certificate will do).
    Ca(PathBuf),
    /// The SHA-256 of the manager certificate's DER.
    Pin([u8; 32]),
    /// These CA certificates (DER), for a certificate made in this process.
    Certs(Vec<CertificateDer<'static>>),
}

/// The provider every configuration uses.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A TLS client's configuration and the name it checks the manager's certificate against.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// TLS 1.3, ALPN `nullpunch/1`, its own session cache (for resumption).
    pub config: Arc<rustls::ClientConfig>,
    /// The manager's host as given (a DNS name, or an IP address).
    pub server_name: ServerName<'static>,
}

impl ClientTls {
    /// A configuration trusting the manager as `trust` says, for the manager `host` (as given
    /// on the command line, without the port).
    pub fn new(trust: &Trust, host: &str) -> Result<ClientTls, TlsError> {
        Ok(ClientTls { config: client_config(trust)?, server_name: server_name(host)? })
    }

    /// A stream for one connection to the manager (its ClientHello waits in
    /// [`FrameStream::take_outgoing`]).
    pub fn stream(&self) -> Result<FrameStream, StreamError> {
        FrameStream::client(self.config.clone(), self.server_name.clone())
    }

    /// The same trust with a session cache of its own: one per simulated client, so that a
    /// client resumes only its own sessions (and each new client makes a full handshake).
    pub fn for_one_client(&self) -> ClientTls {
        let mut c = (*self.config).clone();
        c.resumption = rustls::client::Resumption::in_memory_sessions(4);
        ClientTls { config: Arc::new(c), server_name: self.server_name.clone() }
    }
}

/// A stream for one manager connection: TLS with `tls`, else plain.
pub fn client_stream(tls: Option<&ClientTls>) -> Result<FrameStream, StreamError> {
    match tls {
        Some(t) => t.stream(),
        None => Ok(FrameStream::plain()),
    }
}

/// The name a certificate must carry for `host` (an IP address, or a DNS name; brackets of
/// an IPv6 literal are removed).
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(h.to_string()).map_err(|_| TlsError::ServerName(host.to_string()))
}

/// The host part of `HOST:PORT` (`[v6]:PORT` too), for [`server_name`].
pub fn host_of(addr: &str) -> &str {
    match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    }
}

/// Parse a SHA-256 fingerprint: 64 hex digits, colons allowed (`openssl x509 -fingerprint
/// -sha256` prints `sha256 Fingerprint=AB:CD:...`; the part after `=` is taken).
pub fn parse_pin(s: &str) -> Result<[u8; 32], TlsError> {
    let t = s.rsplit_once('=').map_or(s, |(_, v)| v);
    let hex: String = t.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(TlsError::Pin(s.to_string()));
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| TlsError::Pin(s.to_string()))?;
    }
    Ok(out)
}

/// The SHA-256 of a certificate's DER (what `--pin` names).
pub fn fingerprint(cert: &[u8]) -> [u8; 32] {
    Sha256::digest(cert).into()
}

/// A fingerprint as `AB:CD:...` (the form openssl prints).
pub fn fingerprint_text(fp: &[u8; 32]) -> String {
    fp.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// Certificates from a PEM file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |message: String| TlsError::Pem { path: path.to_path_buf(), message };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("no CERTIFICATE in this file".into()));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem { path: path.to_path_buf(), message: e.to_string() })
}

/// A client configuration: TLS 1.3 only, ALPN `nullpunch/1`, trusting as `trust` says, with
/// an in-memory session cache (tickets for resumption), no early data.
pub fn client_config(trust: &Trust) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder =
        rustls::ClientConfig::builder_with_provider(provider()).with_protocol_versions(&[&rustls::version::TLS13])?;
    let roots = |certs: Vec<CertificateDer<'static>>, path: &Path| {
        let mut roots = rustls::RootCertStore::empty();
        for c in certs {
            roots.add(c).map_err(|e| TlsError::Pem { path: path.to_path_buf(), message: e.to_string() })?;
        }
        Ok::<_, TlsError>(roots)
    };
    let mut cfg = match trust {
        Trust::Ca(path) => builder.with_root_certificates(roots(read_certs(path)?, path)?).with_no_client_auth(),
        Trust::Certs(certs) => {
            builder.with_root_certificates(roots(certs.clone(), Path::new("(certificate)"))?).with_no_client_auth()
        }
        Trust::Pin(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier { pin: *fp, provider: provider() }))
            .with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.enable_early_data = false;
    Ok(Arc::new(cfg))
}

/// A server configuration: TLS 1.3 only, ALPN `nullpunch/1`, the certificate chain and key
/// given, one resumption ticket per handshake from the provider's ticketer, no early data.
pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    cfg.send_tls13_tickets = 1;
    cfg.max_early_data_size = 0;
    Ok(Arc::new(cfg))
}

/// [`server_config`] from a certificate chain and a key in PEM files (`manager --tls-cert
/// --tls-key`).
pub fn server_config_from_pem(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config(read_certs(cert)?, read_key(key)?)
}

/// Trusts the one certificate whose DER has the pinned SHA-256, whatever signed it, and
/// still checks the handshake's signature with it (so only the holder of its key passes).
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl fmt::Debug for PinVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PinVerifier({})", fingerprint_text(&self.pin))
    }
}

/// The certificate is not the pinned one.
#[derive(Debug)]
struct PinMismatch {
    got: [u8; 32],
    want: [u8; 32],
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the certificate's SHA-256 is {}, not the pinned {}",
            fingerprint_text(&self.got),
            fingerprint_text(&self.want)
        )
    }
}

impl std::error::Error for PinMismatch {}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint(end_entity);
        // (The fingerprint is public: no need for a constant-time comparison.)
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            let e = PinMismatch { got, want: self.pin };
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e)))))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_as_openssl_prints_them() {
        let hex = "AB:".repeat(31) + "CD";
        assert_eq!(parse_pin(&hex).unwrap()[31], 0xcd);
        assert_eq!(parse_pin(&format!("sha256 Fingerprint={hex}")).unwrap()[0], 0xab);
        assert_eq!(parse_pin(&"ab".repeat(32)).unwrap(), [0xab; 32]);
        assert!(parse_pin("abcd").is_err());
        assert!(parse_pin(&"zz".repeat(32)).is_err());
        assert_eq!(fingerprint_text(&[0xab; 32]), hex.replace("CD", "AB"));
    }

    #[test]
    fn server_names_are_hosts_or_ip_addresses() {
        assert!(matches!(server_name("127.0.0.1"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(server_name("[::1]"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(server_name("localhost"), Ok(ServerName::DnsName(_))));
        assert_eq!(host_of("127.0.0.1:7480"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7480"), "[::1]");
        assert_eq!(host_of("manager.example:80"), "manager.example");
    }
}
