//! End-to-end call keys: an X25519 exchange between the two peers, carried in the signalling
//! frames ([`KeyShare`] in CALL/INCOMING and PUNCHED/START), so a manager that relays the
//! frames learns only public keys and cannot decrypt the media or forge a null packet.
//!
//! Per call, each side makes a fresh X25519 key pair (from [`KeyGen`], a generator seeded
//! with 32 bytes of the kernel's CSPRNG by the driver; a simulation seeds it with fixed bytes).
//! The shared secret goes through HKDF-SHA256 (RFC 5869):
//!
//! ```text
//! salt = "nullpunch-e2e-v1"
//! ikm  = X25519(own private, peer public)
//! info = caller public (32) | callee public (32) | call id (u64) | token (u64) | suite (u8)
//! okm  = 92 bytes: caller->callee SRTP master key (16) and salt (14),
//!                  callee->caller SRTP master key (16) and salt (14),
//!                  null packet MAC key (32)
//! ```
//!
//! Binding the call id, the token and the chosen suite into `info` means keys of one call
//! never serve another, and a suite downgrade by the manager gives the two sides different
//! keys (the call fails instead of running weaker).
//!
//! **Identities** (optional): a peer with a long-term Ed25519 key signs its key share:
//! `"nullpunch-e2e-v1 sign\0" | role (1 caller, 2 callee) | own public | suites`, and the
//! callee adds the caller's public key (its answer is bound to that offer). A peer told the
//! other's identity key (`--peer-key`) refuses a call whose share is not signed by it: a
//! manager that swaps the public keys (a man in the middle) cannot sign.

use crate::wire::frame::{CallId, Identity, KeyShare};
use aws_lc_rs::{agreement, hkdf, hmac, signature};

/// SRTP suite code: plain RTP (only with `--no-srtp` on both sides, to measure the cost).
pub const SUITE_NONE: u8 = 0;
/// SRTP suite code: AEAD_AES_128_GCM (RFC 7714), the default.
pub const SUITE_AES_128_GCM: u8 = 1;
/// SRTP suite code: AES_CM_128_HMAC_SHA1_80 (RFC 3711).
pub const SUITE_AES_CM_SHA1_80: u8 = 2;

/// The name of a suite code.
pub fn suite_name(code: u8) -> &'static str {
    match code {
        SUITE_NONE => "none",
        SUITE_AES_128_GCM => "AEAD_AES_128_GCM",
        SUITE_AES_CM_SHA1_80 => "AES_CM_128_HMAC_SHA1_80",
        _ => "unknown",
    }
}

/// The suite code of a name (as `--srtp-suite` takes it; case-insensitive, `none` too).
pub fn suite_from_name(name: &str) -> Option<u8> {
    [SUITE_NONE, SUITE_AES_128_GCM, SUITE_AES_CM_SHA1_80]
        .into_iter()
        .find(|&c| suite_name(c).eq_ignore_ascii_case(name))
}

const HKDF_SALT: &[u8] = b"nullpunch-e2e-v1";
const SIGN_CONTEXT: &[u8] = b"nullpunch-e2e-v1 sign\0";
const KEYGEN_CONTEXT: &[u8] = b"nullpunch-e2e-v1 keygen\0";

/// Why a call's keys could not be agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum E2eError {
    /// The other side sent no key share.
    #[error("the peer sent no key share")]
    Missing,
    /// No suite of the offer is one this side accepts (or the answer is not one offered).
    #[error("no common SRTP suite")]
    NoCommonSuite,
    /// The peer's public key is not a valid X25519 key (or the exchange failed).
    #[error("invalid key share")]
    BadKey,
    /// The share's identity signature does not verify.
    #[error("identity signature invalid")]
    BadSignature,
    /// This side pins the peer's identity and the share carries no identity or another one.
    #[error("peer identity does not match the pinned key")]
    WrongIdentity,
}

/// A generator of per-call secrets: HMAC-SHA256 keyed with a 32-byte seed over a counter (a
/// deterministic generator in the manner of NIST SP 800-90A's HMAC_DRBG, without reseeding:
/// the seed comes from the kernel's CSPRNG once per client).
pub struct KeyGen {
    key: hmac::Key,
    n: u64,
}

impl std::fmt::Debug for KeyGen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyGen({} drawn)", self.n)
    }
}

impl KeyGen {
    /// A generator seeded with `seed` (32 bytes from a CSPRNG).
    pub fn new(seed: &[u8; 32]) -> KeyGen {
        KeyGen { key: hmac::Key::new(hmac::HMAC_SHA256, seed), n: 0 }
    }

    /// The next 32 secret bytes.
    pub fn draw(&mut self) -> [u8; 32] {
        self.n += 1;
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(KEYGEN_CONTEXT);
        ctx.update(&self.n.to_be_bytes());
        let tag = ctx.sign();
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// A fresh X25519 key pair.
    pub fn ephemeral(&mut self) -> Ephemeral {
        // Any 32 bytes are a valid X25519 private key (RFC 7748 clamps them).
        let secret = self.draw();
        let private = agreement::PrivateKey::from_private_key(&agreement::X25519, &secret)
            .expect("32 bytes are an X25519 private key");
        let mut public = [0u8; 32];
        public.copy_from_slice(private.compute_public_key().expect("X25519 public key").as_ref());
        Ephemeral { private, public }
    }
}

/// One call's X25519 key pair.
pub struct Ephemeral {
    private: agreement::PrivateKey,
    /// The public half, sent in the key share.
    pub public: [u8; 32],
}

impl std::fmt::Debug for Ephemeral {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ephemeral({:02x}{:02x}..)", self.public[0], self.public[1])
    }
}

/// A long-term Ed25519 identity (`--identity FILE`: the file holds its 32-byte seed).
pub struct IdentityKey {
    pair: signature::Ed25519KeyPair,
    public: [u8; 32],
}

impl std::fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdentityKey({:02x}{:02x}..)", self.public[0], self.public[1])
    }
}

impl IdentityKey {
    /// The identity of a 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> IdentityKey {
        let pair = signature::Ed25519KeyPair::from_seed_unchecked(seed).expect("32 bytes are an Ed25519 seed");
        let mut public = [0u8; 32];
        public.copy_from_slice(signature::KeyPair::public_key(&pair).as_ref());
        IdentityKey { pair, public }
    }

    /// The public key (what the other side pins).
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    fn sign(&self, msg: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.pair.sign(msg).as_ref());
        out
    }
}

/// The bytes an identity signs (see the module docs).
fn signed_bytes(caller: bool, own: &[u8; 32], suites: &[u8], offer: Option<&[u8; 32]>) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGN_CONTEXT.len() + 1 + 32 + suites.len() + 32);
    m.extend_from_slice(SIGN_CONTEXT);
    m.push(if caller { 1 } else { 2 });
    m.extend_from_slice(own);
    m.extend_from_slice(suites);
    if let Some(o) = offer {
        m.extend_from_slice(o);
    }
    m
}

/// The caller's key share: its offer of `suites` (best first).
pub fn offer(eph: &Ephemeral, suites: &[u8], identity: Option<&IdentityKey>) -> KeyShare {
    let identity =
        identity.map(|id| Identity { key: id.public(), sig: id.sign(&signed_bytes(true, &eph.public, suites, None)) });
    KeyShare { public: eph.public, suites: suites.to_vec(), identity }
}

/// The callee's answer to `offer`: the first suite of the callee's preference `accepted` that
/// the offer contains.
pub fn answer(
    eph: &Ephemeral,
    offer: &KeyShare,
    accepted: &[u8],
    identity: Option<&IdentityKey>,
) -> Result<KeyShare, E2eError> {
    let suite = accepted.iter().copied().find(|s| offer.suites.contains(s)).ok_or(E2eError::NoCommonSuite)?;
    let identity = identity.map(|id| Identity {
        key: id.public(),
        sig: id.sign(&signed_bytes(false, &eph.public, &[suite], Some(&offer.public))),
    });
    Ok(KeyShare { public: eph.public, suites: vec![suite], identity })
}

/// Check the identity of the peer's `share` (sent by the caller if `from_caller`; the
/// callee's answer is bound to `offer`, the caller's public key): a signature present must
/// verify, and with `pinned` the share must be signed by that key. Returns the peer's identity
/// key, if it sent one.
pub fn check_identity(
    share: &KeyShare,
    from_caller: bool,
    offer: Option<&[u8; 32]>,
    pinned: Option<&[u8; 32]>,
) -> Result<Option<[u8; 32]>, E2eError> {
    match (&share.identity, pinned) {
        (None, Some(_)) => Err(E2eError::WrongIdentity),
        (None, None) => Ok(None),
        (Some(id), pinned) => {
            let msg = signed_bytes(from_caller, &share.public, &share.suites, offer);
            signature::UnparsedPublicKey::new(&signature::ED25519, &id.key)
                .verify(&msg, &id.sig)
                .map_err(|_| E2eError::BadSignature)?;
            match pinned {
                Some(p) if *p != id.key => Err(E2eError::WrongIdentity),
                _ => Ok(Some(id.key)),
            }
        }
    }
}

/// One direction's SRTP master key and salt (the salt's first 12 bytes for GCM, all 14 for
/// AES-CM).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MasterKeys {
    /// Master key.
    pub key: [u8; 16],
    /// Master salt.
    pub salt: [u8; 14],
}

impl std::fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKeys(..)")
    }
}

/// A call's keys, derived by both sides alike.
pub struct CallKeys {
    /// The suite the callee chose.
    pub suite: u8,
    /// Caller -> callee media.
    pub caller_to_callee: MasterKeys,
    /// Callee -> caller media.
    pub callee_to_caller: MasterKeys,
    /// The key of both sides' null packets ([`crate::wire::null::null_mac`]).
    pub null_key: hmac::Key,
}

impl std::fmt::Debug for CallKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CallKeys({})", suite_name(self.suite))
    }
}

struct Okm;
impl hkdf::KeyType for Okm {
    fn len(&self) -> usize {
        OKM_LEN
    }
}
const OKM_LEN: usize = 92;

/// Derive call `call_id`'s keys from this side's key pair and the peer's public key.
/// `caller_public` and `callee_public` are the two shares' keys (one of them is `eph`'s).
pub fn derive(
    eph: &Ephemeral,
    peer_public: &[u8; 32],
    caller_public: &[u8; 32],
    callee_public: &[u8; 32],
    call_id: CallId,
    token: u64,
    suite: u8,
) -> Result<CallKeys, E2eError> {
    let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, peer_public);
    let mut okm = [0u8; OKM_LEN];
    agreement::agree(&eph.private, peer, E2eError::BadKey, |shared| {
        // An all-zero result means a small-order public key (RFC 7748 section 6.1).
        if shared.iter().all(|&b| b == 0) {
            return Err(E2eError::BadKey);
        }
        let mut info = [0u8; 32 + 32 + 8 + 8 + 1];
        info[..32].copy_from_slice(caller_public);
        info[32..64].copy_from_slice(callee_public);
        info[64..72].copy_from_slice(&call_id.0.to_be_bytes());
        info[72..80].copy_from_slice(&token.to_be_bytes());
        info[80] = suite;
        let info = [&info[..]];
        hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT)
            .extract(shared)
            .expand(&info, Okm)
            .and_then(|o| o.fill(&mut okm))
            .map_err(|_| E2eError::BadKey)
    })?;
    let mk = |b: &[u8]| {
        let mut m = MasterKeys { key: [0; 16], salt: [0; 14] };
        m.key.copy_from_slice(&b[..16]);
        m.salt.copy_from_slice(&b[16..30]);
        m
    };
    Ok(CallKeys {
        suite,
        caller_to_callee: mk(&okm[..30]),
        callee_to_caller: mk(&okm[30..60]),
        null_key: hmac::Key::new(hmac::HMAC_SHA256, &okm[60..92]),
    })
}

/// One side of a call's key exchange played outside a [`crate::client::Client`]: for tests,
/// benchmarks and fuzzers that act as the peer by hand, and for hostile tools that forge.
/// It does what a client does with the keys (sign null packets, protect and unprotect RTP)
/// without the call state around it.
pub struct HandPeer {
    eph: Ephemeral,
    share: KeyShare,
    caller: bool,
    keys: Option<CallKeys>,
    tx: Option<crate::srtp::SrtpSender>,
    rx: Option<crate::srtp::SrtpReceiver>,
    null_ctr: u32,
}

impl std::fmt::Debug for HandPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HandPeer(caller: {}, keys: {:?})", self.caller, self.keys)
    }
}

impl HandPeer {
    /// A caller offering `suites`, its key pair drawn from `seed`.
    pub fn offer(seed: &[u8; 32], suites: &[u8]) -> HandPeer {
        let eph = KeyGen::new(seed).ephemeral();
        let share = offer(&eph, suites, None);
        HandPeer { eph, share, caller: true, keys: None, tx: None, rx: None, null_ctr: 0 }
    }

    /// A callee answering `offered` (its first suite among `accepted`) for call `call_id`.
    pub fn answer(
        seed: &[u8; 32],
        offered: &KeyShare,
        accepted: &[u8],
        call_id: CallId,
        token: u64,
    ) -> Result<HandPeer, E2eError> {
        let eph = KeyGen::new(seed).ephemeral();
        let share = answer(&eph, offered, accepted, None)?;
        let keys = derive(&eph, &offered.public, &offered.public, &eph.public, call_id, token, share.suites[0])?;
        let mut p = HandPeer { eph, share, caller: false, keys: None, tx: None, rx: None, null_ctr: 0 };
        p.install(keys);
        Ok(p)
    }

    /// Caller: the callee's answer arrived; derive the keys of call `call_id`.
    pub fn complete(&mut self, answered: &KeyShare, call_id: CallId, token: u64) -> Result<(), E2eError> {
        let suite = match answered.suites[..] {
            [s] if self.share.suites.contains(&s) => s,
            _ => return Err(E2eError::NoCommonSuite),
        };
        let keys = derive(&self.eph, &answered.public, &self.eph.public, &answered.public, call_id, token, suite)?;
        self.install(keys);
        Ok(())
    }

    fn install(&mut self, keys: CallKeys) {
        let (tx, rx) = if self.caller {
            (keys.caller_to_callee, keys.callee_to_caller)
        } else {
            (keys.callee_to_caller, keys.caller_to_callee)
        };
        let mk = |m: MasterKeys| {
            crate::srtp::Suite::from_code(keys.suite).map(|suite| crate::srtp::MasterKey {
                key: m.key,
                salt: m.salt,
                suite,
            })
        };
        self.tx = mk(tx).as_ref().map(crate::srtp::SrtpSender::new);
        self.rx = mk(rx).as_ref().map(crate::srtp::SrtpReceiver::new);
        self.keys = Some(keys);
    }

    /// Whether this side is the caller.
    pub fn is_caller(&self) -> bool {
        self.caller
    }

    /// The SSRC this side sends with in a call with `token` (the caller the token's low
    /// half, the callee its high half).
    pub fn ssrc(&self, token: u64) -> u32 {
        if self.caller {
            token as u32
        } else {
            (token >> 32) as u32
        }
    }

    /// This side's key share (its offer or answer).
    pub fn share(&self) -> &KeyShare {
        &self.share
    }

    /// The agreed keys, once both shares are known.
    pub fn keys(&self) -> Option<&CallKeys> {
        self.keys.as_ref()
    }

    /// Give the null packet in `pkt` (parsed, [`crate::wire::null::NULL_LEN`] bytes) this
    /// side's next counter and a valid MAC. Without keys it is left as it is.
    pub fn sign_null(&mut self, pkt: &mut [u8]) {
        let (Some(k), Ok(mut p)) = (&self.keys, crate::wire::null::NullPacket::parse(pkt)) else { return };
        self.null_ctr += 1;
        p.counter = self.null_ctr;
        p.emit(&k.null_key, pkt);
    }

    /// Protect the plain RTP packet in `pkt` as this side would send it (nothing for plain
    /// RTP or without keys).
    pub fn protect(&mut self, pkt: &mut Vec<u8>) {
        if let Some(tx) = self.tx.as_mut() {
            let len = pkt.len();
            pkt.resize(len + 64, 0);
            match tx.protect_rtp(pkt, len) {
                Ok(n) => pkt.truncate(n),
                Err(_) => pkt.truncate(len),
            }
        }
    }

    /// Unprotect an SRTP packet the other side sent; returns the plain length.
    pub fn unprotect(&mut self, pkt: &mut [u8]) -> Result<usize, crate::srtp::SrtpError> {
        match self.rx.as_mut() {
            Some(rx) => rx.unprotect_rtp(pkt),
            None => Ok(pkt.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(seed: u8) -> (KeyGen, Ephemeral) {
        let mut g = KeyGen::new(&[seed; 32]);
        let e = g.ephemeral();
        (g, e)
    }

    #[test]
    fn both_sides_derive_the_same_keys_and_a_third_does_not() {
        let (_, a) = pair(1);
        let (_, b) = pair(2);
        let (_, m) = pair(3);
        let offer = offer(&a, &[SUITE_AES_128_GCM, SUITE_AES_CM_SHA1_80], None);
        let ans = answer(&b, &offer, &[SUITE_AES_CM_SHA1_80, SUITE_AES_128_GCM], None).unwrap();
        assert_eq!(ans.suites, vec![SUITE_AES_CM_SHA1_80], "the callee's preference among those offered");
        let ka = derive(&a, &b.public, &a.public, &b.public, CallId(5), 9, ans.suites[0]).unwrap();
        let kb = derive(&b, &a.public, &a.public, &b.public, CallId(5), 9, ans.suites[0]).unwrap();
        assert_eq!(ka.caller_to_callee, kb.caller_to_callee);
        assert_eq!(ka.callee_to_caller, kb.callee_to_caller);
        assert_ne!(ka.caller_to_callee, ka.callee_to_caller, "each direction has its own key");
        // A manager that swaps in its own key shares agrees with each side on a different key.
        let km = derive(&m, &b.public, &a.public, &b.public, CallId(5), 9, ans.suites[0]).unwrap();
        assert_ne!(km.caller_to_callee, ka.caller_to_callee);
        // Another call id, token or suite: other keys.
        for (id, tok, s) in [(6, 9, ans.suites[0]), (5, 10, ans.suites[0]), (5, 9, SUITE_AES_128_GCM)] {
            let k = derive(&a, &b.public, &a.public, &b.public, CallId(id), tok, s).unwrap();
            assert_ne!(k.caller_to_callee, ka.caller_to_callee);
        }
    }

    #[test]
    fn keys_are_fresh_per_call_and_per_seed() {
        let mut g = KeyGen::new(&[1; 32]);
        let (x, y) = (g.ephemeral(), g.ephemeral());
        assert_ne!(x.public, y.public);
        let mut h = KeyGen::new(&[2; 32]);
        assert_ne!(h.ephemeral().public, x.public);
        let mut g2 = KeyGen::new(&[1; 32]);
        assert_eq!(g2.ephemeral().public, x.public, "reproducible from the seed (simulations)");
    }

    #[test]
    fn a_small_order_public_key_is_refused() {
        let (_, a) = pair(1);
        let zero = [0u8; 32];
        let one = {
            let mut k = [0u8; 32];
            k[0] = 1;
            k
        };
        for bad in [zero, one] {
            assert_eq!(derive(&a, &bad, &a.public, &bad, CallId(1), 1, 1).unwrap_err(), E2eError::BadKey);
        }
    }

    #[test]
    fn no_common_suite_is_refused() {
        let (_, a) = pair(1);
        let (_, b) = pair(2);
        let o = offer(&a, &[SUITE_NONE], None);
        assert_eq!(answer(&b, &o, &[SUITE_AES_128_GCM], None).unwrap_err(), E2eError::NoCommonSuite);
        let o = offer(&a, &[77, SUITE_AES_128_GCM], None);
        assert_eq!(answer(&b, &o, &[SUITE_AES_128_GCM], None).unwrap().suites, vec![SUITE_AES_128_GCM]);
    }

    #[test]
    fn identities_sign_and_pinning_defeats_a_key_swap() {
        let (_, a) = pair(1);
        let (_, b) = pair(2);
        let (_, m) = pair(3);
        let ida = IdentityKey::from_seed(&[10; 32]);
        let idb = IdentityKey::from_seed(&[11; 32]);
        let o = offer(&a, &[SUITE_AES_128_GCM], Some(&ida));
        assert_eq!(check_identity(&o, true, None, Some(&ida.public())), Ok(Some(ida.public())));
        assert_eq!(check_identity(&o, true, None, None), Ok(Some(ida.public())));
        assert_eq!(check_identity(&o, true, None, Some(&idb.public())), Err(E2eError::WrongIdentity));
        // A manager swapping the public key keeps the signature: it no longer verifies.
        let swapped = KeyShare { public: m.public, ..o.clone() };
        assert_eq!(check_identity(&swapped, true, None, Some(&ida.public())), Err(E2eError::BadSignature));
        // ... and dropping the identity fails a pinning peer.
        let stripped = KeyShare { public: m.public, identity: None, ..o.clone() };
        assert_eq!(check_identity(&stripped, true, None, Some(&ida.public())), Err(E2eError::WrongIdentity));
        assert_eq!(check_identity(&stripped, true, None, None), Ok(None));
        // The answer is bound to the offer it answers.
        let ans = answer(&b, &o, &[SUITE_AES_128_GCM], Some(&idb)).unwrap();
        assert_eq!(check_identity(&ans, false, Some(&a.public), Some(&idb.public())), Ok(Some(idb.public())));
        assert_eq!(check_identity(&ans, false, Some(&m.public), None), Err(E2eError::BadSignature));
        // A suite downgrade in the signed answer is caught too.
        let downgraded = KeyShare { suites: vec![SUITE_NONE], ..ans };
        assert_eq!(check_identity(&downgraded, false, Some(&a.public), None), Err(E2eError::BadSignature));
    }

    #[test]
    fn suite_names_round_trip() {
        for c in [SUITE_NONE, SUITE_AES_128_GCM, SUITE_AES_CM_SHA1_80] {
            assert_eq!(suite_from_name(suite_name(c)), Some(c));
        }
        assert_eq!(suite_from_name("aead_aes_128_gcm"), Some(SUITE_AES_128_GCM));
        assert_eq!(suite_from_name("rot13"), None);
    }
}
