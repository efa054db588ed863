//! Registration tokens: HMAC-SHA256 over the client id and an expiry, keyed with the
//! manager's secret. A manager started with a secret accepts a REGISTER only with a token
//! minted for that id that has not expired; the connection then speaks for that id alone
//! (every CALL, PUNCHED, REJECT and HANGUP is checked against the connection's registered
//! id), so a client cannot register, hang up or receive calls as another id.
//!
//! On plain TCP the token travels as it is, so a REGISTER seen on the wire (or in a log) can
//! be replayed on another connection until the token expires. On TLS the client sends it
//! bound to its connection ([`bind`]): `HMAC-SHA256(key = mac, "nullpunch-register-bound-v1"
//! || exporter)`, where the exporter value is the connection's ([`crate::stream::FrameStream::binding`]).
//! The manager recomputes the MAC from its secret and checks the bound one, so a captured
//! REGISTER is worth nothing on any other connection.

use crate::wire::frame::{AuthToken, ClientId};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Domain separation for the MAC input.
const CONTEXT: &[u8] = b"nullpunch-register-v1\0";

/// Domain separation for a token bound to a TLS connection ([`bind`]).
const BOUND_CONTEXT: &[u8] = b"nullpunch-register-bound-v1";

/// Smallest secret accepted (bytes).
pub const MIN_SECRET: usize = 16;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No token in REGISTER.
    Missing,
    /// Expired.
    Expired,
    /// Not minted for this id with this secret.
    Invalid,
    /// On a TLS connection: a raw token (not bound to the connection), or one bound to
    /// another connection (a replayed REGISTER).
    Unbound,
}

impl AuthError {
    /// Message for the ERROR frame.
    pub fn message(self) -> &'static str {
        match self {
            AuthError::Missing => "this manager requires a token (manager token --id ID)",
            AuthError::Expired => "token expired",
            AuthError::Invalid => "token not valid for this id",
            AuthError::Unbound => "token not bound to this TLS connection (a replayed REGISTER?)",
        }
    }
}

/// The manager's secret.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl Secret {
    /// A secret from bytes (at least [`MIN_SECRET`]).
    pub fn new(bytes: Vec<u8>) -> Result<Secret, String> {
        if bytes.len() < MIN_SECRET {
            return Err(format!("secret is {} bytes; at least {MIN_SECRET} are needed", bytes.len()));
        }
        Ok(Secret(bytes))
    }

    /// A secret from a secret file's contents: its bytes, with one trailing newline (LF or
    /// CRLF) removed. (The drivers read the file: `engine::sys::read_secret`.)
    pub fn from_file_contents(mut b: Vec<u8>) -> Result<Secret, String> {
        if b.last() == Some(&b'\n') {
            b.pop();
            if b.last() == Some(&b'\r') {
                b.pop();
            }
        }
        Secret::new(b)
    }

    fn mac(&self, id: &ClientId, expires_unix: u64) -> Hmac<Sha256> {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(CONTEXT);
        m.update(&[id.as_str().len() as u8]);
        m.update(id.as_str().as_bytes());
        m.update(&expires_unix.to_be_bytes());
        m
    }

    /// A token for `id`, valid until `expires_unix`.
    pub fn mint(&self, id: &ClientId, expires_unix: u64) -> AuthToken {
        let mac = self.mac(id, expires_unix).finalize().into_bytes();
        AuthToken { expires_unix, mac: mac.into() }
    }

    /// Check `token` for `id` at `now_unix` (the MAC comparison takes constant time), as
    /// sent on plain TCP.
    pub fn verify(&self, id: &ClientId, token: Option<&AuthToken>, now_unix: u64) -> Result<(), AuthError> {
        self.verify_on(id, token, now_unix, None)
    }

    /// Check `token` for `id` at `now_unix` on a connection: plain TCP (`binding` None) takes
    /// the token as minted; TLS (`binding`: the connection's exporter value) takes only the
    /// token bound to it ([`bind`]). Comparisons take constant time.
    pub fn verify_on(
        &self,
        id: &ClientId,
        token: Option<&AuthToken>,
        now_unix: u64,
        binding: Option<&[u8; 32]>,
    ) -> Result<(), AuthError> {
        let t = token.ok_or(AuthError::Missing)?;
        let mac: [u8; 32] = self.mac(id, t.expires_unix).finalize().into_bytes().into();
        let expected = match binding {
            None => mac,
            Some(b) => bind(&AuthToken { expires_unix: t.expires_unix, mac }, b).mac,
        };
        if !constant_time_eq(&expected, &t.mac) {
            // On TLS a raw token, a replayed one (bound to another connection) and a wrong
            // one look alike: none is bound to this connection.
            return Err(if binding.is_some() { AuthError::Unbound } else { AuthError::Invalid });
        }
        if now_unix > t.expires_unix {
            return Err(AuthError::Expired);
        }
        Ok(())
    }
}

/// The token bound to one TLS connection: the same expiry, and
/// `HMAC-SHA256(key = token.mac, "nullpunch-register-bound-v1" || exporter)` in place of the
/// MAC. What a client sends on TLS; only the holder of the raw token (or the secret) can
/// make it, and it is valid on that connection alone.
pub fn bind(token: &AuthToken, exporter: &[u8; 32]) -> AuthToken {
    let mut m = Hmac::<Sha256>::new_from_slice(&token.mac).expect("HMAC takes any key length");
    m.update(BOUND_CONTEXT);
    m.update(exporter);
    AuthToken { expires_unix: token.expires_unix, mac: m.finalize().into_bytes().into() }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ClientId {
        ClientId::new(s).unwrap()
    }

    #[test]
    fn tokens_bind_id_expiry_and_secret() {
        let s = Secret::new(b"0123456789abcdef-secret".to_vec()).unwrap();
        let t = s.mint(&id("alice"), 1_000);
        assert_eq!(s.verify(&id("alice"), Some(&t), 999), Ok(()));
        assert_eq!(s.verify(&id("alice"), Some(&t), 1_000), Ok(()));
        assert_eq!(s.verify(&id("alice"), Some(&t), 1_001), Err(AuthError::Expired));
        assert_eq!(s.verify(&id("bob"), Some(&t), 999), Err(AuthError::Invalid));
        assert_eq!(s.verify(&id("alice"), None, 999), Err(AuthError::Missing));
        // A later expiry with the old MAC does not verify.
        let stretched = AuthToken { expires_unix: 5_000, ..t };
        assert_eq!(s.verify(&id("alice"), Some(&stretched), 999), Err(AuthError::Invalid));
        // Another secret's token does not verify.
        let other = Secret::new(b"another-secret-of-16+".to_vec()).unwrap();
        assert_eq!(s.verify(&id("alice"), Some(&other.mint(&id("alice"), 1_000)), 999), Err(AuthError::Invalid));
        // Known answer, computed with Python's hmac over the documented input bytes
        // ("nullpunch-register-v1" 0x00, len(id), id, expiry as u64 big-endian).
        assert_eq!(
            s.mint(&id("alice"), 1_000).to_string(),
            "1000.4135dfb633cadca8d42ec0feb8dd1ec18228ee9088a942fb7e9fca514b8c7f7f"
        );
        assert!(Secret::new(b"short".to_vec()).is_err());
    }

    #[test]
    fn a_bound_token_is_valid_on_its_connection_alone() {
        let s = Secret::new(b"0123456789abcdef-secret".to_vec()).unwrap();
        let t = s.mint(&id("alice"), 1_000);
        let (here, there) = ([7u8; 32], [8u8; 32]);
        let bound = bind(&t, &here);
        assert_eq!(s.verify_on(&id("alice"), Some(&bound), 999, Some(&here)), Ok(()));
        assert_eq!(s.verify_on(&id("alice"), Some(&bound), 999, Some(&there)), Err(AuthError::Unbound));
        // The raw token on TLS, and the bound one on plain TCP, are refused.
        assert_eq!(s.verify_on(&id("alice"), Some(&t), 999, Some(&here)), Err(AuthError::Unbound));
        assert_eq!(s.verify_on(&id("alice"), Some(&bound), 999, None), Err(AuthError::Invalid));
        assert_eq!(s.verify_on(&id("alice"), Some(&bound), 1_001, Some(&here)), Err(AuthError::Expired));
        assert_eq!(s.verify_on(&id("bob"), Some(&bind(&t, &here)), 999, Some(&here)), Err(AuthError::Unbound));
    }
}
