//! TLS on the manager's TCP port, with the real `manager` and `peer` binaries on loopback
//! and openssl's tools: the handshake (TLS 1.3, ALPN nullpunch/1), the refusal of a
//! plaintext peer, of a wrong CA and of a wrong pin, and peers that trust the manager by
//! its CA or its pin registering and calling each other with tokens bound to their
//! connections.

mod common;
use common::*;

/// A self-signed P-256 certificate for 127.0.0.1 and localhost (not a CA, so it can be its
/// own trust anchor for `--ca`), and its key, in `dir` as `NAME.crt` / `NAME.key`.
fn make_cert(dir: &Scratch, name: &str) -> (String, String) {
    let (crt, key) = (dir.path(&format!("{name}.crt")), dir.path(&format!("{name}.key")));
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-days",
            "1",
            "-keyout",
            &key,
            "-out",
            &crt,
        ],
    );
    (crt, key)
}

/// The certificate's SHA-256 fingerprint as openssl prints it (`AB:CD:...`).
fn fingerprint(crt: &str) -> String {
    let out = run("openssl", &["x509", "-in", crt, "-noout", "-fingerprint", "-sha256"]);
    out.trim().rsplit_once('=').expect("openssl prints NAME=FINGERPRINT").1.to_string()
}

#[test]
fn a_tls_manager_speaks_tls13_with_alpn_and_refuses_plaintext_and_untrusted_peers() {
    let dir = Scratch::new("tls");
    let (crt, key) = make_cert(&dir, "manager");
    let (other_crt, _) = make_cert(&dir, "other");
    let secret = dir.path("manager.secret");
    std::fs::write(&secret, "a-test-secret-of-more-than-16-bytes\n").unwrap();
    let m = start_manager_with(&["--tls-cert", &crt, "--tls-key", &key, "--secret-file", &secret]);
    let token = |who: &str| {
        run(bin("manager").to_str().unwrap(), &["--secret-file", &secret, "token", "--id", who, "--ttl", "600"])
            .trim()
            .to_string()
    };

    // (1) openssl negotiates TLS 1.3 and ALPN nullpunch/1.
    let mut s = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &m.addr, "-alpn", "nullpunch/1", "-tls1_3", "-CAfile", &crt])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl s_client (the README's test command installs openssl)");
    let out = {
        let mut out = String::new();
        std::io::Read::read_to_string(s.stdout.as_mut().unwrap(), &mut out).unwrap();
        let _ = s.wait();
        out
    };
    assert!(out.contains("TLSv1.3"), "no TLS 1.3 handshake:\n{out}");
    assert!(out.contains("ALPN protocol: nullpunch/1"), "no ALPN nullpunch/1:\n{out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "certificate not verified:\n{out}");

    // (2) A peer without --tls: refused, exit 2, told to use TLS.
    let (code, _, err) =
        peer(&m.addr, "plain", &["--token", &token("plain"), "listen", "--calls", "1"]).finish(Duration::from_secs(20));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("this manager requires TLS (peer --tls)"), "{err}");

    // (3) A wrong CA and a wrong pin: refused, exit 2, the certificate problem named.
    let wrong_pin = fingerprint(&other_crt);
    for (args, says) in [
        (vec!["--tls", "--ca", other_crt.as_str()], "invalid peer certificate"),
        (vec!["--tls", "--pin", wrong_pin.as_str()], "not the pinned"),
        (vec!["--tls"], "--tls needs --ca PEM or --pin SHA256"),
    ] {
        let mut a = args.clone();
        a.extend(["listen", "--calls", "1"]);
        let (code, _, err) = peer(&m.addr, "mallory", &a).finish(Duration::from_secs(20));
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }

    // (4) Trusted by CA and by pin: they register (tokens bound to their connections) and
    // media flows both ways.
    let pin = fingerprint(&crt);
    let (bob_token, alice_token) = (token("bob"), token("alice"));
    let bob = peer(&m.addr, "bob", &["--tls", "--ca", &crt, "--token", &bob_token, "listen", "--calls", "1", "--json"]);
    settle();
    let alice = peer(
        &m.addr,
        "alice",
        &["--tls", "--pin", &pin, "--token", &alice_token, "call", "bob", "--duration", "1", "--json"],
    );
    let (a_code, a_out, a_err) = alice.finish(Duration::from_secs(30));
    let (b_code, b_out, b_err) = bob.finish(Duration::from_secs(30));
    assert_eq!(a_code, 0, "alice: {a_err}");
    assert_eq!(b_code, 0, "bob: {b_err}");
    for (who, out) in [("alice", &a_out), ("bob", &b_out)] {
        let r = json_line(out);
        assert_eq!(r["result"], "ok", "{who}: {r}");
        assert!(r["received"].as_u64().unwrap() > 10, "{who}: little media: {r}");
    }
    let c = m.stop();
    assert!(c["tls_handshakes"].as_u64().unwrap() >= 3, "{c}");
    assert_eq!(c["tls_plaintext_refused"], 1, "{c}");
    assert!(c["tls_handshake_failed"].as_u64().unwrap() >= 2, "{c}");
    assert_eq!(c["auth_unbound"], 0, "{c}");
    assert_eq!(c["registrations"].as_u64(), Some(2), "{c}");
}
