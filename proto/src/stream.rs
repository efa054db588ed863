//! The signalling byte stream between a client and the manager: frames over plain TCP, or
//! over TLS 1.3 (RFC 8446) through rustls's sans-IO connection object, so both IO drivers
//! (and the manager's shards) get the TLS layer once, here.
//!
//! A [`FrameStream`] takes the bytes the socket received ([`FrameStream::receive`]: for TLS,
//! ciphertext), yields whole frames ([`FrameStream::next_frame`]), takes frames to send
//! ([`FrameStream::send_frame`]) and gives back the bytes to write to the socket
//! ([`FrameStream::take_outgoing`]: for TLS, records, handshake messages included). It owns
//! no socket: the driver moves the bytes.
//!
//! A TLS stream is ready for frames once its handshake completed
//! ([`FrameStream::just_established`] says so once); then [`FrameStream::binding`] is the
//! connection's exporter value (RFC 8446 section 7.5, label [`EXPORTER_LABEL`]) that a
//! registration token is bound to ([`crate::auth::bind`]). A server stream refuses a
//! plaintext client: if the first byte is not a TLS handshake record (0x16), it queues one
//! plaintext ERROR `Unauthorized` ([`PLAINTEXT_REFUSED`]) for the driver to send before it
//! closes, so an old client learns why.
//!
//! The configurations (`Arc<rustls::ClientConfig>`, `Arc<rustls::ServerConfig>`) are built
//! by the caller (the engine reads the PEM files); this module reads no file.

use std::io::{self, Read, Write};
use std::sync::Arc;

use rustls::pki_types::ServerName;

use crate::wire::frame::{ErrorCode, Frame, FrameDecoder, FrameError};

/// The ALPN protocol id both sides must negotiate (RFC 7301).
pub const ALPN: &[u8] = b"nullpunch/1";

/// The exporter label of the registration binding (RFC 8446 section 7.5; no context).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-nullpunch-register";

/// The message of the plaintext ERROR a TLS manager sends to a plaintext client.
pub const PLAINTEXT_REFUSED: &str = "this manager requires TLS (peer --tls)";

/// The first byte of a TLS handshake record (RFC 8446 section 5.1, ContentType handshake).
const TLS_HANDSHAKE: u8 = 0x16;

/// Why a stream cannot go on. After any of these the connection should be closed (once the
/// bytes [`FrameStream::take_outgoing`] still gives, an alert or the refusal, are written).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// A frame did not decode.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The TLS layer failed (handshake, certificate, record); rustls's text, with a hint
    /// for the certificate problems a set-up meets.
    #[error("tls: {}", describe(.0))]
    Tls(#[from] rustls::Error),
    /// A plaintext client on a manager that requires TLS (the first byte was not a TLS
    /// handshake record).
    #[error("plaintext client refused: this manager requires TLS (first byte {first:#04x})")]
    Plaintext {
        /// The first byte received.
        first: u8,
    },
    /// A TLS client's first byte from the server was not a TLS record: the server speaks
    /// plain frames (a manager without a certificate).
    #[error("the manager answered in plaintext, not TLS (first byte {first:#04x}): it has no --tls-cert")]
    NotTls {
        /// The first byte received.
        first: u8,
    },
    /// The handshake completed without the ALPN protocol [`ALPN`].
    #[error("tls: the peer did not negotiate ALPN {}", String::from_utf8_lossy(ALPN))]
    Alpn,
    /// Reading records failed (rustls's buffer of unprocessed records is full).
    #[error("tls: {0}")]
    Io(#[from] io::Error),
}

/// rustls's text for `e`, the inner error of a verifier's own (a pin mismatch) shown as
/// text, and a hint for the usual certificate problems.
fn describe(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    let rustls::Error::InvalidCertificate(c) = e else { return e.to_string() };
    let (what, hint) = match c {
        C::Other(o) => {
            let inner = o.to_string();
            let hint = if inner.contains("CaUsedAsEndEntity") {
                " (the manager's certificate is a CA certificate: a self-signed one used with --ca must \
                 say basicConstraints CA:FALSE; or use --pin)"
            } else {
                ""
            };
            (inner, hint)
        }
        C::UnknownIssuer | C::BadSignature => (c.to_string(), " (not signed by a certificate in --ca)"),
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            (c.to_string(), " (the certificate does not name the manager's host as given)")
        }
        _ => (c.to_string(), ""),
    };
    format!("invalid peer certificate: {what}{hint}")
}

/// One side of a signalling connection: plain frames or frames over TLS.
#[derive(Debug)]
pub struct FrameStream {
    /// None: plain TCP. Boxed: a TLS connection object is large, a plain stream small.
    tls: Option<Box<rustls::Connection>>,
    decoder: FrameDecoder,
    /// Plain: encoded frames to write. TLS: the plaintext refusal, if any.
    out: Vec<u8>,
    /// TLS: frames sent since the last [`FrameStream::take_outgoing`], which puts them in
    /// one record (one AEAD seal for a burst of frames, not one per frame).
    scratch: Vec<u8>,
    binding: Option<[u8; 32]>,
    /// Ready for frames (plain from the start; TLS once the handshake completed).
    ready: bool,
    /// [`FrameStream::just_established`] said so already.
    reported: bool,
    /// A byte was received (a server checks the first one).
    started: bool,
    failed: bool,
}

impl FrameStream {
    /// A plain TCP stream: frames as they are.
    pub fn plain() -> FrameStream {
        FrameStream::with(None)
    }

    /// The client side of a TLS connection to `server_name` (a DNS name or an IP address, as
    /// the certificate must name it). Its ClientHello waits in [`FrameStream::take_outgoing`].
    pub fn client(config: Arc<rustls::ClientConfig>, server_name: ServerName<'static>) -> Result<Self, StreamError> {
        let c = rustls::ClientConnection::new(config, server_name)?;
        Ok(FrameStream::with(Some(rustls::Connection::Client(c))))
    }

    /// The server side of a TLS connection (the manager's, for an accepted connection).
    pub fn server(config: Arc<rustls::ServerConfig>) -> Result<Self, StreamError> {
        let c = rustls::ServerConnection::new(config)?;
        Ok(FrameStream::with(Some(rustls::Connection::Server(c))))
    }

    fn with(tls: Option<rustls::Connection>) -> FrameStream {
        let ready = tls.is_none();
        let tls = tls.map(|mut c| {
            // Frames queued while the handshake runs (a shard's early ERROR) wait in rustls;
            // the drivers bound what they queue per connection.
            c.set_buffer_limit(None);
            Box::new(c)
        });
        FrameStream {
            tls,
            decoder: FrameDecoder::new(),
            out: Vec::new(),
            scratch: Vec::new(),
            binding: None,
            ready,
            reported: false,
            started: false,
            failed: false,
        }
    }

    /// True for a TLS stream.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// True while a TLS handshake is under way (never for a plain stream).
    pub fn is_handshaking(&self) -> bool {
        !self.ready && !self.failed && self.tls.is_some()
    }

    /// True once, at the first call after the stream became ready for frames: at once for a
    /// plain stream, when the handshake completed for TLS. The driver then tells the core
    /// (`Client::handle_connected`, `Shard::conn_secured`) with [`FrameStream::binding`].
    pub fn just_established(&mut self) -> bool {
        if self.ready && !self.reported && !self.failed {
            self.reported = true;
            return true;
        }
        false
    }

    /// The TLS exporter value this connection's registration is bound to (32 bytes,
    /// [`EXPORTER_LABEL`], no context), once the handshake completed; None for plain TCP.
    pub fn binding(&self) -> Option<[u8; 32]> {
        self.binding
    }

    /// True if the TLS handshake resumed an earlier session (a ticket, RFC 8446 section 2.2).
    pub fn is_resumed(&self) -> bool {
        self.tls.as_ref().and_then(|c| c.handshake_kind()) == Some(rustls::HandshakeKind::Resumed)
    }

    /// Bytes received and decrypted but not yet taken as frames.
    pub fn pending(&self) -> usize {
        self.decoder.pending()
    }

    /// Bytes the socket received (ciphertext for TLS). Frames they complete are taken with
    /// [`FrameStream::next_frame`], which the caller drains after every call (so at most one
    /// partial frame stays buffered beyond what one call brought, as with [`FrameDecoder`]).
    /// On an error, write what [`FrameStream::take_outgoing`] still gives (a TLS alert, or a
    /// plaintext client's ERROR) and close.
    pub fn receive(&mut self, mut data: &[u8]) -> Result<(), StreamError> {
        let Some(conn) = self.tls.as_mut() else {
            self.decoder.push(data);
            return Ok(());
        };
        if self.failed {
            return Ok(());
        }
        if !self.started && !data.is_empty() {
            self.started = true;
            let first = data[0];
            match **conn {
                rustls::Connection::Server(_) if first != TLS_HANDSHAKE => {
                    self.failed = true;
                    let refusal = Frame::Error { code: ErrorCode::Unauthorized, message: PLAINTEXT_REFUSED.into() };
                    refusal.encode(&mut self.out);
                    return Err(StreamError::Plaintext { first });
                }
                // A TLS record starts with a content type of 20 to 23 (alert, handshake, ...);
                // a frame with a length below 1024 starts with 0 to 4.
                rustls::Connection::Client(_) if !(0x14..=0x17).contains(&first) => {
                    self.failed = true;
                    return Err(StreamError::NotTls { first });
                }
                _ => {}
            }
        }
        let mut plain = [0u8; 4096];
        while !data.is_empty() {
            let n = match conn.read_tls(&mut data) {
                Ok(n) => n,
                Err(e) => {
                    self.failed = true;
                    return Err(StreamError::Io(e));
                }
            };
            if let Err(e) = conn.process_new_packets() {
                // rustls queued an alert saying why; take_outgoing gives it.
                self.failed = true;
                return Err(StreamError::Tls(e));
            }
            loop {
                match conn.reader().read(&mut plain) {
                    // The peer's close_notify: the end of the stream follows.
                    Ok(0) => break,
                    Ok(k) => self.decoder.push(&plain[..k]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        self.failed = true;
                        return Err(StreamError::Io(e));
                    }
                }
            }
            if !self.ready && !conn.is_handshaking() {
                if conn.alpn_protocol() != Some(ALPN) {
                    self.failed = true;
                    return Err(StreamError::Alpn);
                }
                let mut b = [0u8; 32];
                conn.export_keying_material(&mut b, EXPORTER_LABEL, None)?;
                self.binding = Some(b);
                self.ready = true;
            }
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed, or the decode error (after
    /// which the stream is out of sync and should be closed).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        self.decoder.next_frame()
    }

    /// Queue a frame; its bytes come out of [`FrameStream::take_outgoing`]. Over TLS the
    /// frames queued between two calls of it are sealed there in one record (or wait in
    /// rustls until the handshake completed).
    pub fn send_frame(&mut self, frame: &Frame) {
        match self.tls {
            None => frame.encode(&mut self.out),
            Some(_) if self.failed => {}
            Some(_) => frame.encode(&mut self.scratch),
        }
    }

    /// True if [`FrameStream::take_outgoing`] has bytes to give.
    pub fn wants_write(&self) -> bool {
        !self.out.is_empty() || !self.scratch.is_empty() || self.tls.as_ref().is_some_and(|c| c.wants_write())
    }

    /// Append the bytes to write to the socket (frames; for TLS, records, handshake messages
    /// and alerts included) to `out`.
    pub fn take_outgoing(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.out);
        if let Some(conn) = self.tls.as_mut() {
            if !self.scratch.is_empty() {
                // Unlimited buffer (see `with`): the write takes everything.
                let _ = conn.writer().write_all(&self.scratch);
                self.scratch.clear();
            }
            while conn.wants_write() {
                match conn.write_tls(out) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
    }
}
