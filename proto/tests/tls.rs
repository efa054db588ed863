//! The TLS layer of the signalling stream, sans IO: two [`FrameStream`]s over in-memory
//! buffers, a real [`Client`] and a real [`Shard`]. A REGISTER captured from one TLS
//! connection is refused on another (its token is bound to the first connection's
//! exporter), and a client that reconnects with the same configuration resumes its session.

use std::sync::Arc;
use std::time::Instant;

use proto::auth::Secret;
use proto::client::{Client, ClientConfig, Output as ClientOutput};
use proto::shard::stats::Stats;
use proto::shard::{Output, Shard, ShardConfig, ShardInit};
use proto::stream::{FrameStream, ALPN};
use proto::wire::frame::{ClientId, ErrorCode, Frame};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A throwaway certificate for 127.0.0.1, a server configuration with it (TLS 1.3, ALPN,
/// tickets) and a client configuration trusting it.
fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    server.alpn_protocols = vec![ALPN.to_vec()];
    server.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![ALPN.to_vec()];
    (Arc::new(server), Arc::new(client))
}

/// A client stream and a server stream, connected.
struct Pair {
    client: FrameStream,
    server: FrameStream,
}

impl Pair {
    fn new(server: &Arc<rustls::ServerConfig>, client: &Arc<rustls::ClientConfig>) -> Pair {
        let name = ServerName::try_from("127.0.0.1").unwrap();
        Pair {
            client: FrameStream::client(client.clone(), name).unwrap(),
            server: FrameStream::server(server.clone()).unwrap(),
        }
    }

    /// Move bytes both ways until neither side has any (the handshake, then the tickets).
    fn pump(&mut self) {
        for _ in 0..16 {
            let (mut c2s, mut s2c) = (Vec::new(), Vec::new());
            self.client.take_outgoing(&mut c2s);
            self.server.take_outgoing(&mut s2c);
            if c2s.is_empty() && s2c.is_empty() {
                return;
            }
            self.server.receive(&c2s).unwrap();
            self.client.receive(&s2c).unwrap();
        }
        panic!("the streams never went quiet");
    }

    /// A frame from the client, as the server decodes it.
    fn send_to_server(&mut self, f: &Frame) -> Frame {
        self.client.send_frame(f);
        let mut bytes = Vec::new();
        self.client.take_outgoing(&mut bytes);
        self.server.receive(&bytes).unwrap();
        self.server.next_frame().unwrap().expect("a whole frame")
    }
}

fn shard(secret: &Secret) -> (Shard, Arc<Stats>) {
    let stats = Arc::new(Stats::default());
    let init = ShardInit { index: 0, n: 1, seed: 1, token_key: [3; 32], unix_secs: 1_000, node: 0 };
    let cfg = ShardConfig { secret: Some(Arc::new(secret.clone())), ..Default::default() };
    (Shard::new(init, cfg, stats.clone()), stats)
}

/// The ERROR codes the shard sent to `conn` (and whether it closed it), draining its output.
fn errors_to(shard: &mut Shard, conn: u64) -> (Vec<ErrorCode>, bool, bool) {
    let (mut errors, mut registered, mut closed) = (Vec::new(), false, false);
    while let Some(o) = shard.poll_output() {
        match o {
            Output::Frame { conn: c, frame: Frame::Error { code, .. } } if c == conn => errors.push(code),
            Output::Frame { conn: c, frame: Frame::Registered { .. } } if c == conn => registered = true,
            Output::Close { conn: c } if c == conn => closed = true,
            _ => {}
        }
    }
    (errors, registered, closed)
}

/// What a client with `token` sends as REGISTER once its connection is up with `binding`.
fn register_frame(id: &ClientId, secret: &Secret, binding: Option<[u8; 32]>) -> Frame {
    let mut cfg = ClientConfig::new(id.clone(), 40_000);
    cfg.stun_server = None;
    cfg.auth = Some(secret.mint(id, 5_000));
    let mut c = Client::new(cfg, 7);
    c.handle_connected(Instant::now(), binding);
    let mut buf = vec![0u8; 2048];
    loop {
        match c.poll_output(&mut buf).unwrap() {
            ClientOutput::Frame(f @ Frame::Register { .. }) => return f,
            ClientOutput::Timeout(_) => panic!("no REGISTER"),
            _ => {}
        }
    }
}

#[test]
fn both_ends_of_a_tls_stream_agree_on_the_binding_and_frames_pass() {
    let (server, client) = configs();
    let mut p = Pair::new(&server, &client);
    assert!(p.client.is_handshaking() && p.server.is_handshaking());
    assert!(!p.client.just_established());
    p.pump();
    assert!(p.client.just_established() && p.server.just_established());
    assert!(!p.client.just_established(), "said once");
    let b = p.client.binding().expect("a binding once the handshake completed");
    assert_eq!(p.server.binding(), Some(b));
    assert_eq!(p.send_to_server(&Frame::Ping { nonce: 9 }), Frame::Ping { nonce: 9 });
    // Another connection, another binding.
    let mut q = Pair::new(&server, &client);
    q.pump();
    assert_ne!(q.client.binding(), Some(b));
    // A plain stream has none.
    assert_eq!(FrameStream::plain().binding(), None);
}

#[test]
fn a_replayed_register_is_refused_on_another_tls_connection_and_counted() {
    let (server, client) = configs();
    let secret = Secret::new(b"0123456789abcdef-secret".to_vec()).unwrap();
    let (mut sh, stats) = shard(&secret);
    let id = ClientId::new("alice").unwrap();
    let now = Instant::now();
    let peer = "127.0.0.1:5000".parse().unwrap();

    // Alice registers on connection A: her REGISTER carries the token bound to A.
    let mut a = Pair::new(&server, &client);
    a.pump();
    let conn_a = sh.conn_opened(now, peer, 0);
    sh.conn_secured(now, conn_a, a.server.binding().unwrap(), a.server.is_resumed());
    let captured = a.send_to_server(&register_frame(&id, &secret, a.client.binding()));
    let Frame::Register { auth: Some(bound), .. } = &captured else { panic!("REGISTER with a token") };
    assert_ne!(bound.mac, secret.mint(&id, 5_000).mac, "the raw token went on the wire");
    sh.conn_frame(now, conn_a, captured.clone());
    assert_eq!(errors_to(&mut sh, conn_a), (vec![], true, false), "alice registers on her connection");

    // Mallory replays the captured REGISTER on her own TLS connection B: refused, counted.
    let mut b = Pair::new(&server, &client);
    b.pump();
    let conn_b = sh.conn_opened(now, peer, 1);
    sh.conn_secured(now, conn_b, b.server.binding().unwrap(), false);
    let replayed = b.send_to_server(&captured);
    sh.conn_frame(now, conn_b, replayed.clone());
    assert_eq!(errors_to(&mut sh, conn_b), (vec![ErrorCode::Unauthorized], false, true));
    assert_eq!(stats.auth_unbound.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(stats.auth_invalid.load(std::sync::atomic::Ordering::Relaxed), 0);

    // The binding check is what refused it: the same frame is a good credential on a
    // connection the shard takes to have A's binding (as a manager that checked the token
    // but not which connection it is bound to would).
    let conn_c = sh.conn_opened(now, peer, 2);
    sh.conn_secured(now, conn_c, a.server.binding().unwrap(), false);
    sh.conn_frame(now, conn_c, replayed);
    let (errors, registered, _) = errors_to(&mut sh, conn_c);
    assert!(errors.is_empty() && registered, "the captured token itself was not valid: {errors:?}");

    // A raw token (as sent to a plaintext manager, or found in a log) on TLS: refused too.
    let mut d = Pair::new(&server, &client);
    d.pump();
    let conn_d = sh.conn_opened(now, peer, 3);
    sh.conn_secured(now, conn_d, d.server.binding().unwrap(), false);
    sh.conn_frame(now, conn_d, register_frame(&id, &secret, None));
    assert_eq!(errors_to(&mut sh, conn_d), (vec![ErrorCode::Unauthorized], false, true));
    assert_eq!(stats.auth_unbound.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(stats.tls_handshakes.load(std::sync::atomic::Ordering::Relaxed), 4);
}

#[test]
fn a_client_that_reconnects_with_its_configuration_resumes() {
    let (server, client) = configs();
    let mut first = Pair::new(&server, &client);
    first.pump();
    assert!(!first.client.is_resumed() && !first.server.is_resumed(), "a first connection is a full handshake");
    let mut again = Pair::new(&server, &client);
    again.pump();
    assert!(again.client.is_resumed() && again.server.is_resumed(), "the reconnect did not resume");
    assert!(again.client.binding().is_some());
    assert_ne!(again.client.binding(), first.client.binding(), "a resumed connection has its own binding");
    // The shard counts it.
    let (mut sh, stats) = shard(&Secret::new(vec![1; 16]).unwrap());
    let conn = sh.conn_opened(Instant::now(), "127.0.0.1:1".parse().unwrap(), 0);
    sh.conn_secured(Instant::now(), conn, again.server.binding().unwrap(), again.server.is_resumed());
    assert_eq!(stats.tls_resumed.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn a_plaintext_client_gets_one_plaintext_error_and_a_tls_client_learns_of_a_plain_server() {
    let (server, client) = configs();
    let mut s = FrameStream::server(server).unwrap();
    let mut ping = Vec::new();
    Frame::Ping { nonce: 1 }.encode(&mut ping);
    let e = s.receive(&ping).unwrap_err();
    assert!(e.to_string().contains("requires TLS"), "{e}");
    let mut out = Vec::new();
    s.take_outgoing(&mut out);
    let (f, n) = Frame::decode(&out).unwrap().unwrap();
    assert_eq!(n, out.len(), "one frame, nothing else");
    assert!(matches!(f, Frame::Error { code: ErrorCode::Unauthorized, ref message } if message.contains("peer --tls")));

    let mut c = FrameStream::client(client, ServerName::try_from("127.0.0.1").unwrap()).unwrap();
    let mut err = Vec::new();
    Frame::Error { code: ErrorCode::Oversized, message: String::new() }.encode(&mut err);
    let e = c.receive(&err).unwrap_err();
    assert!(e.to_string().contains("not TLS"), "{e}");
}
