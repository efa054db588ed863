//! SRTP and SRTCP (RFC 3711, RFC 7714): an in-place packet transform on aws-lc-rs primitives.
//!
//! Two suites:
//! * `AEAD_AES_128_GCM` (RFC 7714): AES-128-GCM, the RTP header (with CSRCs and extension) as
//!   associated data, a 16-byte tag;
//! * `AES_CM_128_HMAC_SHA1_80` (RFC 3711): AES-128 in counter mode, HMAC-SHA1 over the packet
//!   and the rollover counter, cut to 80 bits.
//!
//! Both derive their session keys from a master key and salt with the AES-CM PRF of RFC 3711
//! section 4.3 (key derivation rate 0: one set of session keys for the key's life), once, when
//! an [`SrtpSender`] or [`SrtpReceiver`] is built. After that a packet costs no allocation: the
//! AES key schedules, the GCM context and the HMAC key are prepared, and every transform works
//! in the caller's buffer.
//!
//! One sender or receiver serves one SSRC stream: it holds the stream's rollover counter
//! (SRTP) or index (SRTCP) and replay window. The caller picks the stream by SSRC before
//! calling, as it does for statistics. Both ends start a stream at rollover counter 0 (they
//! are built with the call); a receiver built after its sender passed a sequence number wrap
//! cannot learn the counter and fails authentication.
//!
//! Packet layouts (`|` separates what is encrypted from what is only authenticated):
//!
//! ```text
//! SRTP      header (12 + 4*CC [+ extension]) | payload ......... | tag (16 GCM / 10 HMAC)
//! SRTCP GCM header (8)                       | rest of compound  | tag (16) | E|index (4)
//! SRTCP CM  header (8)                       | rest of compound  | E|index (4) | tag (10)
//! ```
//!
//! What is checked on receipt, in order: the header's length and version (`TooShort`,
//! `BadHeader`); the packet index against the 64-packet replay window (`Replayed`, `TooOld`);
//! the tag (`AuthFailed`). Only a packet that passes all three moves the window and the
//! rollover counter (RFC 3711 sections 3.3.1 and 3.3.2), so forged or replayed packets cannot
//! push a stream's state anywhere.
//!
//! Not implemented: MKI, key derivation rates other than 0, the 32-bit HMAC tag, AES-256,
//! NULL cipher on send, encrypted header extensions (RFC 6904) and cryptex.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use aws_lc_rs::cipher::{EncryptingKey, EncryptionContext, UnboundCipherKey, AES_128};
use aws_lc_rs::constant_time::verify_slices_are_equal;
use aws_lc_rs::hmac;

/// A protection profile (crypto suite).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Suite {
    /// `AEAD_AES_128_GCM` (RFC 7714): AES-128-GCM with a 16-byte tag and a 12-byte salt.
    AeadAes128Gcm,
    /// `AES_CM_128_HMAC_SHA1_80` (RFC 3711, RFC 4568): AES-128 counter mode and an 80-bit
    /// HMAC-SHA1 tag, with a 14-byte salt.
    AesCm128HmacSha1_80,
}

impl Suite {
    /// The suite's name as SDP security descriptions (RFC 4568) spell it.
    pub fn name(self) -> &'static str {
        match self {
            Suite::AeadAes128Gcm => "AEAD_AES_128_GCM",
            Suite::AesCm128HmacSha1_80 => "AES_CM_128_HMAC_SHA1_80",
        }
    }

    /// The suite named `s` (ASCII case-insensitive), if it is one of ours.
    pub fn from_name(s: &str) -> Option<Suite> {
        [Suite::AeadAes128Gcm, Suite::AesCm128HmacSha1_80].into_iter().find(|x| x.name().eq_ignore_ascii_case(s))
    }

    /// The suite's code on the wire: GCM = 1, AES_CM = 2.
    pub fn code(self) -> u8 {
        match self {
            Suite::AeadAes128Gcm => 1,
            Suite::AesCm128HmacSha1_80 => 2,
        }
    }

    /// The suite with wire code `c`.
    pub fn from_code(c: u8) -> Option<Suite> {
        match c {
            1 => Some(Suite::AeadAes128Gcm),
            2 => Some(Suite::AesCm128HmacSha1_80),
            _ => None,
        }
    }

    /// Master key length in bytes (16 for both).
    pub fn master_key_len(self) -> usize {
        16
    }

    /// Master salt length in bytes: 12 for GCM (RFC 7714 section 12), 14 for AES_CM.
    pub fn master_salt_len(self) -> usize {
        match self {
            Suite::AeadAes128Gcm => 12,
            Suite::AesCm128HmacSha1_80 => 14,
        }
    }

    /// Bytes SRTP adds to an RTP packet: the tag (16 GCM, 10 HMAC-SHA1-80).
    pub fn rtp_overhead(self) -> usize {
        match self {
            Suite::AeadAes128Gcm => GCM_TAG_LEN,
            Suite::AesCm128HmacSha1_80 => HMAC_TAG_LEN,
        }
    }

    /// Bytes SRTCP adds to an RTCP packet: the tag and the 4-byte E flag and index.
    pub fn rtcp_overhead(self) -> usize {
        self.rtp_overhead() + SRTCP_INDEX_LEN
    }
}

/// A master key and salt, as keying (SDES, DTLS-SRTP or our signalling) hands them over.
#[derive(Clone, PartialEq, Eq)]
pub struct MasterKey {
    /// The 16-byte master key.
    pub key: [u8; 16],
    /// The master salt: the first [`Suite::master_salt_len`] bytes count, the rest is ignored.
    pub salt: [u8; 14],
    /// The suite the key is for.
    pub suite: Suite,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKey").field("suite", &self.suite).finish_non_exhaustive()
    }
}

/// Why a packet was not protected or not accepted.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum SrtpError {
    /// Shorter than the fixed header (plus the tag and index on receipt).
    #[error("srtp packet too short")]
    TooShort,
    /// Not version 2, or the CSRCs or header extension it declares run past its end.
    #[error("srtp packet header malformed")]
    BadHeader,
    /// The authentication tag does not match: forged, corrupted or under another key.
    #[error("srtp authentication failed")]
    AuthFailed,
    /// Its index was already accepted (receiver) or already used (sender).
    #[error("srtp packet replayed")]
    Replayed,
    /// Its index is behind the 64-packet replay window, or past the last index the key may
    /// protect (2^48 SRTP, 2^31 SRTCP packets; RFC 3711 section 9.2: rekey before).
    #[error("srtp packet index outside the window")]
    TooOld,
    /// The buffer has no room for the tag (and index), or `len` exceeds it.
    #[error("srtp buffer too small")]
    BufferTooSmall,
}

const GCM_TAG_LEN: usize = 16;
const HMAC_TAG_LEN: usize = 10;
const SRTCP_INDEX_LEN: usize = 4;
const RTP_HEADER_LEN: usize = 12;
/// The part of an RTCP packet SRTCP leaves in clear: V/P/RC, PT, length and the sender SSRC.
const RTCP_HEADER_LEN: usize = 8;
/// The E flag of SRTCP's trailer: the packet is encrypted.
const SRTCP_E: u32 = 0x8000_0000;
/// The largest SRTCP index (31 bits).
const SRTCP_INDEX_MAX: u32 = 0x7FFF_FFFF;
/// Replay window size in packets (RFC 3711 section 3.3.2 asks for at least 64).
const WINDOW: u64 = 64;

// Key derivation labels (RFC 3711 section 4.3.2).
const LABEL_RTP_ENC: u8 = 0;
const LABEL_RTP_AUTH: u8 = 1;
const LABEL_RTP_SALT: u8 = 2;
const LABEL_RTCP_ENC: u8 = 3;
const LABEL_RTCP_AUTH: u8 = 4;
const LABEL_RTCP_SALT: u8 = 5;

/// Prepared session keys for one packet kind (SRTP or SRTCP).
enum SessionKeys {
    Gcm {
        key: LessSafeKey,
        salt: [u8; 12],
    },
    /// Boxed: the AES key schedule and the HMAC context take about 1.7 KB.
    Cm(Box<CmKeys>),
}

struct CmKeys {
    key: EncryptingKey,
    salt: [u8; 14],
    auth: hmac::Key,
}

/// The session keys of a stream, derived once.
struct Keys {
    suite: Suite,
    rtp: SessionKeys,
    rtcp: SessionKeys,
}

fn aes_ctr_key(key: &[u8; 16]) -> EncryptingKey {
    let k = UnboundCipherKey::new(&AES_128, key).expect("16 bytes is an AES-128 key");
    EncryptingKey::ctr(k).expect("AES-128 supports CTR")
}

/// XOR the AES counter-mode keystream starting at counter block `iv` into `data`.
fn aes_ctr(key: &EncryptingKey, iv: [u8; 16], data: &mut [u8]) {
    // CTR takes any length and a 128-bit IV; this fails only for a context of another size.
    key.less_safe_encrypt(data, EncryptionContext::Iv128(iv.into())).expect("AES-CTR with a 128-bit IV");
}

/// The AES-CM PRF of RFC 3711 section 4.3.3 with key derivation rate 0 (section 4.3.1):
/// x = label at byte 7 (key_id = label || r, r = 0, right-aligned) XOR master salt; the output
/// is the keystream for counter block x * 2^16.
fn kdf(master: &EncryptingKey, master_salt: &[u8; 14], label: u8, out: &mut [u8]) {
    let mut iv = [0u8; 16];
    iv[..14].copy_from_slice(master_salt);
    iv[7] ^= label;
    out.fill(0);
    aes_ctr(master, iv, out);
}

impl Keys {
    fn derive(mk: &MasterKey) -> Keys {
        let master = aes_ctr_key(&mk.key);
        // A 12-byte salt (GCM) sits left-aligned in the PRF's 14 bytes, zero-padded (RFC 7714
        // section 11; libsrtp does the same).
        let mut master_salt = [0u8; 14];
        let n = mk.suite.master_salt_len();
        master_salt[..n].copy_from_slice(&mk.salt[..n]);
        let derive = |enc: u8, auth: u8, salt: u8| -> SessionKeys {
            let mut key = [0u8; 16];
            kdf(&master, &master_salt, enc, &mut key);
            match mk.suite {
                Suite::AeadAes128Gcm => {
                    let mut s = [0u8; 12];
                    kdf(&master, &master_salt, salt, &mut s);
                    SessionKeys::gcm(&key, s)
                }
                Suite::AesCm128HmacSha1_80 => {
                    let mut s = [0u8; 14];
                    kdf(&master, &master_salt, salt, &mut s);
                    let mut a = [0u8; 20];
                    kdf(&master, &master_salt, auth, &mut a);
                    SessionKeys::cm(&key, s, &a)
                }
            }
        };
        Keys {
            suite: mk.suite,
            rtp: derive(LABEL_RTP_ENC, LABEL_RTP_AUTH, LABEL_RTP_SALT),
            rtcp: derive(LABEL_RTCP_ENC, LABEL_RTCP_AUTH, LABEL_RTCP_SALT),
        }
    }
}

impl SessionKeys {
    fn gcm(key: &[u8; 16], salt: [u8; 12]) -> SessionKeys {
        let k = UnboundKey::new(&AES_128_GCM, key).expect("16 bytes is an AES-128-GCM key");
        SessionKeys::Gcm { key: LessSafeKey::new(k), salt }
    }

    fn cm(key: &[u8; 16], salt: [u8; 14], auth: &[u8; 20]) -> SessionKeys {
        let auth = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, auth);
        SessionKeys::Cm(Box::new(CmKeys { key: aes_ctr_key(key), salt, auth }))
    }
}

/// The AES-CM counter block of RFC 3711 section 4.1.1: (salt * 2^16) XOR (SSRC * 2^64) XOR
/// (index * 2^16), the last two bytes the block counter.
fn cm_iv(salt: &[u8; 14], ssrc: u32, index: u64) -> [u8; 16] {
    let mut iv = [0u8; 16];
    iv[..14].copy_from_slice(salt);
    for (d, s) in iv[4..8].iter_mut().zip(ssrc.to_be_bytes()) {
        *d ^= s;
    }
    for (d, s) in iv[8..14].iter_mut().zip(&index.to_be_bytes()[2..]) {
        *d ^= s;
    }
    iv
}

/// The GCM nonce of RFC 7714 sections 8.1 and 9.1: (0x0000 || SSRC || 48-bit index) XOR salt,
/// where the SRTP index is ROC || SEQ and the SRTCP index is 0x0000 || 0 || 31-bit index.
fn gcm_nonce(salt: &[u8; 12], ssrc: u32, index: u64) -> Nonce {
    let mut iv = *salt;
    for (d, s) in iv[2..6].iter_mut().zip(ssrc.to_be_bytes()) {
        *d ^= s;
    }
    for (d, s) in iv[6..12].iter_mut().zip(&index.to_be_bytes()[2..]) {
        *d ^= s;
    }
    Nonce::assume_unique_for_key(iv)
}

/// The 80-bit HMAC-SHA1 tag over `parts`, in order.
fn hmac_tag(key: &hmac::Key, parts: &[&[u8]]) -> [u8; HMAC_TAG_LEN] {
    let mut ctx = hmac::Context::with_key(key);
    for p in parts {
        ctx.update(p);
    }
    let mut tag = [0u8; HMAC_TAG_LEN];
    tag.copy_from_slice(&ctx.sign().as_ref()[..HMAC_TAG_LEN]);
    tag
}

/// The length of the RTP header at the start of `pkt`: 12 bytes, the CSRCs and the header
/// extension (RFC 3550 section 5.3.1). Checks version 2 and that everything declared is there.
fn rtp_header_len(pkt: &[u8]) -> Result<usize, SrtpError> {
    if pkt.len() < RTP_HEADER_LEN {
        return Err(SrtpError::TooShort);
    }
    if pkt[0] >> 6 != 2 {
        return Err(SrtpError::BadHeader);
    }
    let mut off = RTP_HEADER_LEN + 4 * (pkt[0] & 0x0F) as usize;
    if pkt[0] & 0x10 != 0 {
        let ext = pkt.get(off..off + 4).ok_or(SrtpError::BadHeader)?;
        off += 4 + 4 * u16::from_be_bytes([ext[2], ext[3]]) as usize;
    }
    if off > pkt.len() {
        return Err(SrtpError::BadHeader);
    }
    Ok(off)
}

fn rtp_seq_ssrc(pkt: &[u8]) -> (u16, u32) {
    (u16::from_be_bytes([pkt[2], pkt[3]]), u32::from_be_bytes([pkt[8], pkt[9], pkt[10], pkt[11]]))
}

fn rtcp_check(pkt: &[u8]) -> Result<u32, SrtpError> {
    if pkt.len() < RTCP_HEADER_LEN {
        return Err(SrtpError::TooShort);
    }
    if pkt[0] >> 6 != 2 {
        return Err(SrtpError::BadHeader);
    }
    Ok(u32::from_be_bytes([pkt[4], pkt[5], pkt[6], pkt[7]]))
}

/// The packet indices seen on a stream: the highest and a bitmap of the 64 below it
/// (RFC 3711 section 3.3.2). Bit `k` of `seen` is index `top - k`.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    top: u64,
    seen: u64,
    started: bool,
}

impl Window {
    /// The SRTP index of a packet with sequence number `seq` (RFC 3711 section 3.3.1 and
    /// appendix A): the rollover counter guessed from the highest sequence number so far
    /// (`s_l`). The first packet of a stream has rollover counter 0. `None` when the guess
    /// falls before 0 or past the 48-bit index space.
    fn estimate(&self, seq: u16) -> Option<u64> {
        if !self.started {
            return Some(seq as u64);
        }
        let roc = (self.top >> 16) as i64;
        let s_l = self.top as u16 as i64;
        let seq_i = seq as i64;
        let v = if s_l < 32768 {
            if seq_i - s_l > 32768 {
                roc - 1
            } else {
                roc
            }
        } else if s_l - 32768 > seq_i {
            roc + 1
        } else {
            roc
        };
        if !(0..=u32::MAX as i64).contains(&v) {
            return None;
        }
        Some((v as u64) << 16 | seq as u64)
    }

    /// Whether `index` is new and not behind the window; changes nothing.
    fn check(&self, index: u64) -> Result<(), SrtpError> {
        if !self.started || index > self.top {
            return Ok(());
        }
        let back = self.top - index;
        if back >= WINDOW {
            Err(SrtpError::TooOld)
        } else if self.seen & (1 << back) != 0 {
            Err(SrtpError::Replayed)
        } else {
            Ok(())
        }
    }

    /// Record `index` as seen (after [`Window::check`] and authentication passed).
    fn commit(&mut self, index: u64) {
        if !self.started {
            *self = Window { top: index, seen: 1, started: true };
        } else if index > self.top {
            let ahead = index - self.top;
            self.seen = if ahead >= WINDOW { 1 } else { self.seen << ahead | 1 };
            self.top = index;
        } else {
            self.seen |= 1 << (self.top - index);
        }
    }
}

/// Protects one outgoing SSRC stream: SRTP for its RTP, SRTCP for its RTCP.
///
/// It tracks the rollover counter from the sequence numbers it is given (the same estimate a
/// receiver makes, so a packet sent late keeps its index) and refuses to protect an index
/// twice ([`SrtpError::Replayed`]): the same index under the same key would reuse keystream,
/// and for GCM the nonce, which gives away the authentication key.
pub struct SrtpSender {
    keys: Keys,
    rtp: Window,
    /// The SRTCP index of the next packet (RFC 3711 section 3.4: 0 first).
    rtcp_index: u32,
}

impl std::fmt::Debug for SrtpSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrtpSender")
            .field("suite", &self.keys.suite)
            .field("rtp_top_index", &self.rtp.top)
            .field("rtcp_index", &self.rtcp_index)
            .finish_non_exhaustive()
    }
}

impl SrtpSender {
    /// A sender with session keys derived from `mk`.
    pub fn new(mk: &MasterKey) -> Self {
        SrtpSender::with_keys(Keys::derive(mk))
    }

    fn with_keys(keys: Keys) -> Self {
        SrtpSender { keys, rtp: Window::default(), rtcp_index: 0 }
    }

    /// The suite this sender protects with.
    pub fn suite(&self) -> Suite {
        self.keys.suite
    }

    /// Protect in place: `buf[..len]` is a plain RTP packet; writes the SRTP packet
    /// (ciphertext + tag) into `buf` and returns its new length, `len` +
    /// [`Suite::rtp_overhead`]. `buf.len()` must have room for the tag (else
    /// `BufferTooSmall`). Tracks the rollover counter itself from the RTP sequence numbers it
    /// is given. On error `buf` is unchanged.
    pub fn protect_rtp(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SrtpError> {
        let pkt = buf.get(..len).ok_or(SrtpError::BufferTooSmall)?;
        let off = rtp_header_len(pkt)?;
        let (seq, ssrc) = rtp_seq_ssrc(pkt);
        let out_len = len + self.keys.suite.rtp_overhead();
        if out_len > buf.len() {
            return Err(SrtpError::BufferTooSmall);
        }
        let index = self.rtp.estimate(seq).ok_or(SrtpError::TooOld)?;
        self.rtp.check(index)?;
        match &self.keys.rtp {
            SessionKeys::Gcm { key, salt } => {
                let (header, rest) = buf.split_at_mut(off);
                let (payload, tail) = rest.split_at_mut(len - off);
                let tag = key
                    .seal_in_place_separate_tag(gcm_nonce(salt, ssrc, index), Aad::from(&*header), payload)
                    .map_err(|_| SrtpError::BufferTooSmall)?;
                tail[..GCM_TAG_LEN].copy_from_slice(tag.as_ref());
            }
            SessionKeys::Cm(k) => {
                let CmKeys { key, salt, auth } = &**k;
                aes_ctr(key, cm_iv(salt, ssrc, index), &mut buf[off..len]);
                let roc = ((index >> 16) as u32).to_be_bytes();
                let tag = hmac_tag(auth, &[&buf[..len], &roc]);
                buf[len..out_len].copy_from_slice(&tag);
            }
        }
        self.rtp.commit(index);
        Ok(out_len)
    }

    /// Protect an RTCP (compound) packet in place: `buf[..len]` is plain RTCP; encrypts all
    /// after the first 8 bytes, appends the tag and the E flag with this stream's 31-bit SRTCP
    /// index (RFC 3711 section 3.4, RFC 7714 section 9), and returns the new length, `len` +
    /// [`Suite::rtcp_overhead`]. On error `buf` is unchanged.
    pub fn protect_rtcp(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SrtpError> {
        let pkt = buf.get(..len).ok_or(SrtpError::BufferTooSmall)?;
        let ssrc = rtcp_check(pkt)?;
        let out_len = len + self.keys.suite.rtcp_overhead();
        if out_len > buf.len() {
            return Err(SrtpError::BufferTooSmall);
        }
        let index = self.rtcp_index;
        if index > SRTCP_INDEX_MAX {
            return Err(SrtpError::TooOld);
        }
        let e_index = (SRTCP_E | index).to_be_bytes();
        match &self.keys.rtcp {
            SessionKeys::Gcm { key, salt } => {
                // AAD: the 8-byte header, then E || index (RFC 7714 section 9.2).
                let mut aad = [0u8; RTCP_HEADER_LEN + SRTCP_INDEX_LEN];
                aad[..RTCP_HEADER_LEN].copy_from_slice(&buf[..RTCP_HEADER_LEN]);
                aad[RTCP_HEADER_LEN..].copy_from_slice(&e_index);
                let tag = key
                    .seal_in_place_separate_tag(
                        gcm_nonce(salt, ssrc, index as u64),
                        Aad::from(aad),
                        &mut buf[RTCP_HEADER_LEN..len],
                    )
                    .map_err(|_| SrtpError::BufferTooSmall)?;
                buf[len..len + GCM_TAG_LEN].copy_from_slice(tag.as_ref());
                buf[len + GCM_TAG_LEN..out_len].copy_from_slice(&e_index);
            }
            SessionKeys::Cm(k) => {
                let CmKeys { key, salt, auth } = &**k;
                aes_ctr(key, cm_iv(salt, ssrc, index as u64), &mut buf[RTCP_HEADER_LEN..len]);
                buf[len..len + SRTCP_INDEX_LEN].copy_from_slice(&e_index);
                let tag = hmac_tag(auth, &[&buf[..len + SRTCP_INDEX_LEN]]);
                buf[len + SRTCP_INDEX_LEN..out_len].copy_from_slice(&tag);
            }
        }
        self.rtcp_index = index + 1;
        Ok(out_len)
    }
}

/// Unprotects one incoming SSRC stream: SRTP for its RTP, SRTCP for its RTCP.
pub struct SrtpReceiver {
    keys: Keys,
    rtp: Window,
    rtcp: Window,
}

impl std::fmt::Debug for SrtpReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrtpReceiver")
            .field("suite", &self.keys.suite)
            .field("rtp_top_index", &self.rtp.top)
            .field("rtcp_top_index", &self.rtcp.top)
            .finish_non_exhaustive()
    }
}

impl SrtpReceiver {
    /// A receiver with session keys derived from `mk`.
    pub fn new(mk: &MasterKey) -> Self {
        SrtpReceiver::with_keys(Keys::derive(mk))
    }

    fn with_keys(keys: Keys) -> Self {
        SrtpReceiver { keys, rtp: Window::default(), rtcp: Window::default() }
    }

    /// The suite this receiver expects.
    pub fn suite(&self) -> Suite {
        self.keys.suite
    }

    /// Unprotect an SRTP packet in place (`buf` is the whole packet); returns the plain RTP
    /// length, the packet now being `buf[..n]`. Estimates the index (RFC 3711 section 3.3.1),
    /// checks the 64-packet replay window (section 3.3.2) before and commits it only after
    /// authentication succeeds. On error the stream's state is unchanged; `buf` is unchanged
    /// too except after a failed GCM authentication, which may leave the payload scrambled.
    pub fn unprotect_rtp(&mut self, buf: &mut [u8]) -> Result<usize, SrtpError> {
        let tag_len = self.keys.suite.rtp_overhead();
        if buf.len() < RTP_HEADER_LEN + tag_len {
            return Err(SrtpError::TooShort);
        }
        let len = buf.len() - tag_len;
        let off = rtp_header_len(&buf[..len])?;
        let (seq, ssrc) = rtp_seq_ssrc(buf);
        let index = self.rtp.estimate(seq).ok_or(SrtpError::TooOld)?;
        self.rtp.check(index)?;
        match &self.keys.rtp {
            SessionKeys::Gcm { key, salt } => {
                let (header, rest) = buf.split_at_mut(off);
                key.open_in_place(gcm_nonce(salt, ssrc, index), Aad::from(&*header), rest)
                    .map_err(|_| SrtpError::AuthFailed)?;
            }
            SessionKeys::Cm(k) => {
                let CmKeys { key, salt, auth } = &**k;
                let roc = ((index >> 16) as u32).to_be_bytes();
                let tag = hmac_tag(auth, &[&buf[..len], &roc]);
                verify_slices_are_equal(&tag, &buf[len..]).map_err(|_| SrtpError::AuthFailed)?;
                aes_ctr(key, cm_iv(salt, ssrc, index), &mut buf[off..len]);
            }
        }
        self.rtp.commit(index);
        Ok(len)
    }

    /// Unprotect an SRTCP packet in place (`buf` is the whole packet); returns the plain RTCP
    /// length. The index comes from the packet's trailer; the replay window is checked before
    /// and committed after authentication as for SRTP. A packet with the E flag clear
    /// (authenticated, not encrypted) is accepted too. On error the stream's state is
    /// unchanged; `buf` may be rearranged or scrambled.
    pub fn unprotect_rtcp(&mut self, buf: &mut [u8]) -> Result<usize, SrtpError> {
        let overhead = self.keys.suite.rtcp_overhead();
        if buf.len() < RTCP_HEADER_LEN + overhead {
            return Err(SrtpError::TooShort);
        }
        let ssrc = rtcp_check(buf)?;
        let len = buf.len() - overhead;
        let index_at = match self.keys.rtcp {
            SessionKeys::Gcm { .. } => buf.len() - SRTCP_INDEX_LEN,
            SessionKeys::Cm(_) => len,
        };
        let e_index = u32::from_be_bytes(buf[index_at..index_at + 4].try_into().expect("4 bytes"));
        let encrypted = e_index & SRTCP_E != 0;
        let index = (e_index & SRTCP_INDEX_MAX) as u64;
        self.rtcp.check(index)?;
        match &self.keys.rtcp {
            SessionKeys::Gcm { key, salt } => {
                let nonce = gcm_nonce(salt, ssrc, index);
                if encrypted {
                    let mut aad = [0u8; RTCP_HEADER_LEN + SRTCP_INDEX_LEN];
                    aad[..RTCP_HEADER_LEN].copy_from_slice(&buf[..RTCP_HEADER_LEN]);
                    aad[RTCP_HEADER_LEN..].copy_from_slice(&e_index.to_be_bytes());
                    let body = &mut buf[RTCP_HEADER_LEN..index_at];
                    key.open_in_place(nonce, Aad::from(aad), body).map_err(|_| SrtpError::AuthFailed)?;
                } else {
                    // Authenticated only: the AAD is the whole packet, then E || index, and the
                    // tag sits between them. Swap tag and trailer so the AAD is contiguous.
                    buf[len..].rotate_left(GCM_TAG_LEN);
                    let (aad, tag) = buf.split_at_mut(len + SRTCP_INDEX_LEN);
                    key.open_in_place(nonce, Aad::from(&*aad), tag).map_err(|_| SrtpError::AuthFailed)?;
                }
            }
            SessionKeys::Cm(k) => {
                let CmKeys { key, salt, auth } = &**k;
                let tag = hmac_tag(auth, &[&buf[..len + SRTCP_INDEX_LEN]]);
                verify_slices_are_equal(&tag, &buf[len + SRTCP_INDEX_LEN..]).map_err(|_| SrtpError::AuthFailed)?;
                if encrypted {
                    aes_ctr(key, cm_iv(salt, ssrc, index), &mut buf[RTCP_HEADER_LEN..len]);
                }
            }
        }
        self.rtcp.commit(index);
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
        assert_eq!(s.len() & 1, 0, "odd hex length");
        s.chunks(2).map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap()).collect()
    }

    fn arr<const N: usize>(s: &str) -> [u8; N] {
        hex(s).try_into().unwrap()
    }

    fn master(suite: Suite, key: &str, salt: &str) -> MasterKey {
        let mut s = [0u8; 14];
        let salt = hex(salt);
        s[..salt.len()].copy_from_slice(&salt);
        MasterKey { key: arr(key), salt: s, suite }
    }

    /// A master key per suite for the behaviour tests.
    fn test_key(suite: Suite) -> MasterKey {
        MasterKey { key: [0x11; 16], salt: [0x22; 14], suite }
    }

    const SUITES: [Suite; 2] = [Suite::AeadAes128Gcm, Suite::AesCm128HmacSha1_80];

    /// An RTP packet (header, 2 CSRCs, a one-word extension, then payload) in a buffer with
    /// room for the tag; returns the buffer and the plain length.
    fn rtp(seq: u16, payload_len: usize) -> (Vec<u8>, usize) {
        let mut p = vec![0x80 | 0x10 | 2, 0x80 | 111];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&(seq as u32 * 960).to_be_bytes());
        p.extend_from_slice(&0x1122_3344u32.to_be_bytes());
        p.extend_from_slice(&[0xCA, 0xFE, 0, 1, 0xCA, 0xFE, 0, 2]);
        p.extend_from_slice(&[0xBE, 0xDE, 0, 1, 0x10, 0xAA, 0, 0]);
        p.extend((0..payload_len).map(|i| (seq as usize + i) as u8));
        let n = p.len();
        p.resize(n + 16, 0);
        (p, n)
    }

    fn rtcp_sr() -> Vec<u8> {
        hex("80c8000611223344e1f2a3b40102030400abcdef0000002a00001068")
    }

    fn protect(s: &mut SrtpSender, seq: u16) -> Vec<u8> {
        let (mut b, n) = rtp(seq, 21);
        let m = s.protect_rtp(&mut b, n).unwrap();
        b.truncate(m);
        b
    }

    fn unprotect(r: &mut SrtpReceiver, p: &[u8]) -> Result<Vec<u8>, SrtpError> {
        let mut b = p.to_vec();
        let n = r.unprotect_rtp(&mut b)?;
        b.truncate(n);
        Ok(b)
    }

    // ---- Known-answer vectors ----

    /// RFC 3711 appendix B.2: the AES-CM keystream for session key 2B7E...3C, salt F0F1...FD,
    /// SSRC 0, ROC 0, SEQ 0 (counter blocks 0000 to FF01).
    #[test]
    fn rfc3711_b2_aes_cm_keystream() {
        let key = aes_ctr_key(&arr("2B7E151628AED2A6ABF7158809CF4F3C"));
        let iv = cm_iv(&arr("F0F1F2F3F4F5F6F7F8F9FAFBFCFD"), 0, 0);
        assert_eq!(iv, arr("F0F1F2F3F4F5F6F7F8F9FAFBFCFD0000"));
        let mut ks = vec![0u8; 0xFF02 * 16];
        aes_ctr(&key, iv, &mut ks);
        let block = |i: usize| &ks[i * 16..i * 16 + 16];
        assert_eq!(block(0), hex("E03EAD0935C95E80E166B16DD92B4EB4"));
        assert_eq!(block(1), hex("D23513162B02D0F72A43A2FE4A5F97AB"));
        assert_eq!(block(2), hex("41E95B3BB0A2E8DD477901E4FCA894C0"));
        assert_eq!(block(0xFEFF), hex("EC8CDF7398607CB0F2D21675EA9EA1E4"));
        assert_eq!(block(0xFF00), hex("362B7C3C6773516318A077D7FC5073AE"));
        assert_eq!(block(0xFF01), hex("6A2CC3787889374FBEB4C81B17BA6C44"));
    }

    /// RFC 3711 appendix B.3: key derivation (labels 0, 1, 2), plus the SRTCP labels 3, 4, 5
    /// for the same master key.
    #[test]
    fn rfc3711_b3_key_derivation() {
        let master = aes_ctr_key(&arr("E1F97A0D3E018BE0D64FA32C06DE4139"));
        let salt: [u8; 14] = arr("0EC675AD498AFEEBB6960B3AABE6");
        let derive = |label, n| {
            let mut out = vec![0u8; n];
            kdf(&master, &salt, label, &mut out);
            out
        };
        assert_eq!(derive(LABEL_RTP_ENC, 16), hex("C61E7A93744F39EE10734AFE3FF7A087"));
        assert_eq!(derive(LABEL_RTP_SALT, 14), hex("30CBBC08863D8C85D49DB34A9AE1"));
        assert_eq!(derive(LABEL_RTP_AUTH, 20), hex("CEBE321F6FF7716B6FD4AB49AF256A156D38BAA4"));
        assert_eq!(derive(LABEL_RTCP_ENC, 16), hex("4C1AA45A81F73D61C800BBB00FBB1EAA"));
        assert_eq!(derive(LABEL_RTCP_AUTH, 20), hex("8D54534FEB49AE8E7993A6BD0B844FC323A93DFD"));
        assert_eq!(derive(LABEL_RTCP_SALT, 14), hex("9581C7AD87B3E530BF3E4454A8B3"));
    }

    /// libsrtp's reference packets (test/srtp_driver.c, `srtp_validate`) for
    /// AES_CM_128_HMAC_SHA1_80 with the RFC 3711 B.3 master key: SRTP with SSRC CAFEBABE,
    /// SEQ 1234, and SRTCP with index 1 (libsrtp's first; ours is 0, so the second packet).
    #[test]
    fn libsrtp_aes_cm_reference_packets() {
        let mk = master(Suite::AesCm128HmacSha1_80, "E1F97A0D3E018BE0D64FA32C06DE4139", "0EC675AD498AFEEBB6960B3AABE6");
        let plain = hex("800f1234decafbadcafebabeabababababababababababababababab");
        let want = hex("800f1234decafbadcafebabe4e55dc4ce79978d88ca4d215949d2402b78d6acc99ea179b8dbb");
        let mut tx = SrtpSender::new(&mk);
        let mut b = plain.clone();
        b.resize(64, 0);
        let n = tx.protect_rtp(&mut b, plain.len()).unwrap();
        assert_eq!(&b[..n], &want[..]);
        let mut rx = SrtpReceiver::new(&mk);
        assert_eq!(unprotect(&mut rx, &want).unwrap(), plain);

        let rtcp = hex("81c8000bcafebabeabababababababababababababababab");
        let want = hex("81c8000bcafebabe7128035be487b9bdbef89041f977a5a880000001993e08cd54d6c1230798");
        for _ in 0..2 {
            b[..rtcp.len()].copy_from_slice(&rtcp);
            let n = tx.protect_rtcp(&mut b, rtcp.len()).unwrap();
            b.truncate(n);
        }
        assert_eq!(b, want);
        let n = rx.unprotect_rtcp(&mut b).unwrap();
        assert_eq!(&b[..n], &rtcp[..]);
    }

    /// libsrtp's reference packets for AEAD_AES_128_GCM (`srtp_validate_gcm`): master key
    /// 000102..0F, master salt A0A1..AB, through our key derivation.
    #[test]
    fn libsrtp_gcm_reference_packets() {
        let mk = master(Suite::AeadAes128Gcm, "000102030405060708090a0b0c0d0e0f", "a0a1a2a3a4a5a6a7a8a9aaab");
        let plain = hex("800f1234decafbadcafebabeabababababababababababababababab");
        let want = hex("800f1234decafbadcafebabec5002ede04cfdd2eb91159e0880aa06ed2976826f796b201df3131a127e8a392");
        let mut tx = SrtpSender::new(&mk);
        let mut b = plain.clone();
        b.resize(64, 0);
        let n = tx.protect_rtp(&mut b, plain.len()).unwrap();
        assert_eq!(&b[..n], &want[..]);
        let mut rx = SrtpReceiver::new(&mk);
        assert_eq!(unprotect(&mut rx, &want).unwrap(), plain);

        let rtcp = hex("81c8000bcafebabeabababababababababababababababab");
        let want = hex("81c8000bcafebabec98b8b5df0392a55852b6c21ac8e7025c52c6fbea2b3b446ea31123ba88ce61e80000001");
        for _ in 0..2 {
            b[..rtcp.len()].copy_from_slice(&rtcp);
            let n = tx.protect_rtcp(&mut b, rtcp.len()).unwrap();
            b.truncate(n);
        }
        assert_eq!(b, want);
        let n = rx.unprotect_rtcp(&mut b).unwrap();
        assert_eq!(&b[..n], &rtcp[..]);
    }

    /// RFC 7714 section 16 and 17 session keys: key 000102..0F, salt "Quid pro quo" (the
    /// vectors start after key derivation).
    fn rfc7714_keys() -> Keys {
        let key = arr("000102030405060708090a0b0c0d0e0f");
        let salt = arr("517569642070726f2071756f");
        Keys { suite: Suite::AeadAes128Gcm, rtp: SessionKeys::gcm(&key, salt), rtcp: SessionKeys::gcm(&key, salt) }
    }

    /// RFC 7714 section 16.1.1: AEAD_AES_128_GCM SRTP, SSRC 5501A0B2, ROC 0, SEQ F17B.
    #[test]
    fn rfc7714_16_srtp_gcm() {
        let plain = hex("8040f17b 8041f8d3 5501a0b2 47616c6c 69612065 7374206f 6d6e6973 20646976
             69736120 696e2070 61727465 73207472 6573");
        let want = hex("8040f17b 8041f8d3 5501a0b2 f24de3a3 fb34de6c acba861c 9d7e4bca be633bd5
             0d294e6f 42a5f47a 51c7d19b 36de3adf 8833899d 7f27beb1 6a9152cf 765ee439 0cce");
        let mut b = plain.clone();
        b.resize(plain.len() + 16, 0);
        let mut tx = SrtpSender::with_keys(rfc7714_keys());
        assert_eq!(tx.protect_rtp(&mut b, plain.len()), Ok(want.len()));
        assert_eq!(b, want);
        let mut rx = SrtpReceiver::with_keys(rfc7714_keys());
        assert_eq!(rx.unprotect_rtp(&mut b), Ok(plain.len()));
        assert_eq!(&b[..plain.len()], &plain[..]);
    }

    /// RFC 7714 section 17.1: AEAD_AES_128_GCM SRTCP, SSRC "Mars", index 5D4, encrypted and
    /// (on receipt) authenticated only.
    #[test]
    fn rfc7714_17_srtcp_gcm() {
        let plain = hex("81c8000d 4d617273 4e545031 4e545032 52545020 0000042a 0000e930 4c756e61
             deadbeef deadbeef deadbeef deadbeef deadbeef");
        let want = hex("81c8000d 4d617273 63e94885 dcdab67c a727d766 2f6b7e99 7ff5c0f7 6c06f32d
             c676a5f1 730d6fda 4ce09b46 86303ded 0bb9275b c84aa458 96cf4d2f c5abf872
             45d9eade 800005d4");
        let mut tx = SrtpSender::with_keys(rfc7714_keys());
        tx.rtcp_index = 0x5d4;
        let mut b = plain.clone();
        b.resize(plain.len() + 20, 0);
        assert_eq!(tx.protect_rtcp(&mut b, plain.len()), Ok(want.len()));
        assert_eq!(b, want);
        let mut rx = SrtpReceiver::with_keys(rfc7714_keys());
        assert_eq!(rx.unprotect_rtcp(&mut b), Ok(plain.len()));
        assert_eq!(&b[..plain.len()], &plain[..]);

        let auth_only = hex("81c8000d 4d617273 4e545031 4e545032 52545020 0000042a 0000e930 4c756e61
             deadbeef deadbeef deadbeef deadbeef deadbeef 841dd968 3dd78ec9 2ae58790
             125f62b3 000005d4");
        let mut rx = SrtpReceiver::with_keys(rfc7714_keys());
        let mut b = auth_only.clone();
        assert_eq!(rx.unprotect_rtcp(&mut b), Ok(plain.len()));
        assert_eq!(&b[..plain.len()], &plain[..]);
        let mut b = auth_only.clone();
        b[10] ^= 1;
        let mut rx = SrtpReceiver::with_keys(rfc7714_keys());
        assert_eq!(rx.unprotect_rtcp(&mut b), Err(SrtpError::AuthFailed));
    }

    /// Packets libsrtp 2.7.0 (inside pylibsrtp 1.0.0) protected with master key 40..4F and salt
    /// A0..: RTP with 2 CSRCs and an extension at SEQ 65535 (ROC 0) and 1 (ROC 1), and an
    /// SRTCP sender report with libsrtp's first index, 1. Ours must produce the same bytes
    /// and take libsrtp's back.
    #[test]
    fn libsrtp_interop_across_rollover() {
        let cases = [
            (
                Suite::AesCm128HmacSha1_80,
                "92efffff03bffc4011223344cafe0001cafe0002bede000110aa000016e0115ebc9d7ac353f055ea49385e3f9cb7459808cc7e893aa1babbb74972",
                "92ef0001000003c011223344cafe0001cafe0002bede000110aa0000a4a5fe90fe30b39fc9d835dd5ac8f1b0a43a3d4cc64e5faf66f7d8bc9171d1",
                "80c80006112233440a1b3dc607b1c39481ad5888f5e726d689c4fd058000000129f289768d638d21b5b8",
            ),
            (
                Suite::AeadAes128Gcm,
                "92efffff03bffc4011223344cafe0001cafe0002bede000110aa000001564227094fe7b1e7c2d86951ff79b9d6eb0bd26c64aa648cf0be4fe492548a22b5ad92bd",
                "92ef0001000003c011223344cafe0001cafe0002bede000110aa000064d84c75e96c14c264a04434b704b5d614ff81b11d9cf6fd5d9be81c41824064ffa7d18911",
                "80c8000611223344b86c414b1bee0f54a4eb03eae3d1b080575ff80f04193203e2398febbbd6d5fefb24da8d80000001",
            ),
        ];
        for (suite, p65535, p1, srtcp) in cases {
            let mk = master(suite, "404142434445464748494a4b4c4d4e4f", "a0a1a2a3a4a5a6a7a8a9aaabacad");
            let mut tx = SrtpSender::new(&mk);
            assert_eq!(protect(&mut tx, 65535), hex(p65535), "{suite:?} seq 65535");
            assert_eq!(protect(&mut tx, 1), hex(p1), "{suite:?} seq 1, roc 1");
            let mut rx = SrtpReceiver::new(&mk);
            let (plain, n) = rtp(65535, 21);
            assert_eq!(unprotect(&mut rx, &hex(p65535)).unwrap(), &plain[..n]);
            let (plain, n) = rtp(1, 21);
            assert_eq!(unprotect(&mut rx, &hex(p1)).unwrap(), &plain[..n]);

            let sr = rtcp_sr();
            let mut b = Vec::new();
            for _ in 0..2 {
                b = sr.clone();
                b.resize(sr.len() + 20, 0);
                let n = tx.protect_rtcp(&mut b, sr.len()).unwrap();
                b.truncate(n);
            }
            assert_eq!(b, hex(srtcp), "{suite:?} srtcp");
            assert_eq!(rx.unprotect_rtcp(&mut b), Ok(sr.len()));
            assert_eq!(&b[..sr.len()], &sr[..]);
        }
    }

    #[test]
    fn rfc7714_nonces() {
        let salt = arr("517569642070726f2071756f");
        assert_eq!(gcm_nonce(&salt, 0x5501_a0b2, 0xf17b).as_ref(), &hex("51753c6580c2726f20718414")[..]);
        assert_eq!(gcm_nonce(&salt, 0x4d61_7273, 0x5d4).as_ref(), &hex("517524055203726f207170bb")[..]);
    }

    // ---- Behaviour ----

    #[test]
    fn suite_names_and_codes() {
        for s in SUITES {
            assert_eq!(Suite::from_name(s.name()), Some(s));
            assert_eq!(Suite::from_name(&s.name().to_ascii_lowercase()), Some(s));
            assert_eq!(Suite::from_code(s.code()), Some(s));
            assert_eq!(s.master_key_len(), 16);
            assert_eq!(s.rtcp_overhead(), s.rtp_overhead() + 4);
        }
        assert_eq!((Suite::AeadAes128Gcm.code(), Suite::AesCm128HmacSha1_80.code()), (1, 2));
        assert_eq!(Suite::AeadAes128Gcm.master_salt_len(), 12);
        assert_eq!(Suite::AesCm128HmacSha1_80.master_salt_len(), 14);
        assert_eq!((Suite::AeadAes128Gcm.rtp_overhead(), Suite::AesCm128HmacSha1_80.rtp_overhead()), (16, 10));
        assert_eq!(Suite::from_name("AES_CM_128_HMAC_SHA1_32"), None);
        assert_eq!(Suite::from_code(0), None);
        assert_eq!(Suite::from_code(3), None);
        assert!(!format!("{:?}", test_key(Suite::AeadAes128Gcm)).contains("17"), "Debug must not show the key");
    }

    #[test]
    fn round_trip_rtp_and_rtcp() {
        for suite in SUITES {
            let mut tx = SrtpSender::new(&test_key(suite));
            let mut rx = SrtpReceiver::new(&test_key(suite));
            for (seq, payload) in (100..107u16).zip([0, 1, 15, 16, 17, 160, 1200]) {
                let (mut b, n) = rtp(seq, payload);
                let plain = b[..n].to_vec();
                let m = tx.protect_rtp(&mut b, n).unwrap();
                assert_eq!(m, n + suite.rtp_overhead());
                assert_eq!(b[..28], plain[..28], "header stays in clear");
                if payload > 0 {
                    assert_ne!(b[28..n], plain[28..], "payload is encrypted");
                }
                assert_eq!(unprotect(&mut rx, &b[..m]).unwrap(), plain, "{suite:?} payload {payload}");
            }
            let sr = rtcp_sr();
            for i in 0..5u32 {
                let mut b = sr.clone();
                b.resize(sr.len() + suite.rtcp_overhead(), 0);
                let m = tx.protect_rtcp(&mut b, sr.len()).unwrap();
                assert_eq!(m, sr.len() + suite.rtcp_overhead());
                assert_eq!(b[..8], sr[..8]);
                assert_ne!(b[8..sr.len()], sr[8..]);
                let idx_at = match suite {
                    Suite::AeadAes128Gcm => m - 4,
                    Suite::AesCm128HmacSha1_80 => sr.len(),
                };
                assert_eq!(b[idx_at..idx_at + 4], (0x8000_0000 | i).to_be_bytes());
                assert_eq!(rx.unprotect_rtcp(&mut b), Ok(sr.len()));
                assert_eq!(b[..sr.len()], sr[..]);
            }
        }
    }

    #[test]
    fn plain_header_without_csrc_or_extension() {
        for suite in SUITES {
            let mut tx = SrtpSender::new(&test_key(suite));
            let mut rx = SrtpReceiver::new(&test_key(suite));
            let mut b = vec![0u8; 172 + 16];
            crate::wire::rtp::RtpHeader { marker: false, payload_type: 111, seq: 9, timestamp: 1, ssrc: 5 }
                .emit(&mut b);
            let plain = b[..172].to_vec();
            let m = tx.protect_rtp(&mut b, 172).unwrap();
            assert_eq!(unprotect(&mut rx, &b[..m]).unwrap(), plain);
        }
    }

    #[test]
    fn tampering_fails_authentication() {
        for suite in SUITES {
            let mut tx = SrtpSender::new(&test_key(suite));
            let p = protect(&mut tx, 1000);
            // Header (seq, ssrc, CSRC, extension), payload and tag, one bit each.
            for at in [1, 3, 7, 11, 14, 26, 28, 40, p.len() - 1] {
                let mut rx = SrtpReceiver::new(&test_key(suite));
                let mut bad = p.clone();
                bad[at] ^= 0x04;
                assert_eq!(unprotect(&mut rx, &bad), Err(SrtpError::AuthFailed), "{suite:?} byte {at}");
                // The genuine packet still passes: the failure changed nothing.
                assert!(unprotect(&mut rx, &p).is_ok());
            }
            // A packet under another key.
            let mut other = SrtpReceiver::new(&MasterKey { key: [0x12; 16], ..test_key(suite) });
            assert_eq!(unprotect(&mut other, &p), Err(SrtpError::AuthFailed));

            let sr = rtcp_sr();
            let mut b = sr.clone();
            b.resize(sr.len() + 20, 0);
            let m = tx.protect_rtcp(&mut b, sr.len()).unwrap();
            for at in [1, 5, 9, m - 12, m - 1] {
                let mut rx = SrtpReceiver::new(&test_key(suite));
                let mut bad = b[..m].to_vec();
                bad[at] ^= 0x01;
                assert_eq!(rx.unprotect_rtcp(&mut bad), Err(SrtpError::AuthFailed), "{suite:?} rtcp byte {at}");
            }
            // Clearing the E flag (claiming the body is in clear) must not pass either.
            let idx_at = if suite == Suite::AeadAes128Gcm { m - 4 } else { sr.len() };
            let mut bad = b[..m].to_vec();
            bad[idx_at] &= 0x7F;
            let mut rx = SrtpReceiver::new(&test_key(suite));
            assert_eq!(rx.unprotect_rtcp(&mut bad), Err(SrtpError::AuthFailed));
        }
    }

    #[test]
    fn replay_is_refused() {
        for suite in SUITES {
            let mut tx = SrtpSender::new(&test_key(suite));
            let mut rx = SrtpReceiver::new(&test_key(suite));
            let p = protect(&mut tx, 500);
            assert!(unprotect(&mut rx, &p).is_ok());
            assert_eq!(unprotect(&mut rx, &p), Err(SrtpError::Replayed));
            let q = protect(&mut tx, 501);
            assert!(unprotect(&mut rx, &q).is_ok());
            assert_eq!(unprotect(&mut rx, &p), Err(SrtpError::Replayed));
            assert_eq!(unprotect(&mut rx, &q), Err(SrtpError::Replayed));

            let sr = rtcp_sr();
            let mut b = sr.clone();
            b.resize(sr.len() + 20, 0);
            let m = tx.protect_rtcp(&mut b, sr.len()).unwrap();
            let c = b[..m].to_vec();
            assert!(rx.unprotect_rtcp(&mut c.clone()).is_ok());
            assert_eq!(rx.unprotect_rtcp(&mut c.clone()), Err(SrtpError::Replayed));
        }
    }

    #[test]
    fn sender_refuses_to_reuse_an_index() {
        for suite in SUITES {
            let mut tx = SrtpSender::new(&test_key(suite));
            protect(&mut tx, 10);
            protect(&mut tx, 12);
            let (mut b, n) = rtp(10, 21);
            let before = b.clone();
            assert_eq!(tx.protect_rtp(&mut b, n), Err(SrtpError::Replayed));
            assert_eq!(b, before, "a refused packet is left as it was");
            protect(&mut tx, 11); // late, but new: allowed
            protect(&mut tx, 200);
            let (mut b, n) = rtp(12, 21);
            assert_eq!(tx.protect_rtp(&mut b, n), Err(SrtpError::TooOld));
        }
    }

    #[test]
    fn older_than_the_window_is_too_old() {
        for suite in SUITES {
            let mut tx = SrtpSender::new(&test_key(suite));
            let mut rx = SrtpReceiver::new(&test_key(suite));
            let old = protect(&mut tx, 1000);
            let edge = protect(&mut tx, 1001);
            for seq in 1002..=1064 {
                protect(&mut tx, seq);
            }
            let top = protect(&mut tx, 1065);
            assert!(unprotect(&mut rx, &top).is_ok());
            // 1001 is 64 behind 1065: the window holds 1002..=1065.
            assert_eq!(unprotect(&mut rx, &old), Err(SrtpError::TooOld));
            assert_eq!(unprotect(&mut rx, &edge), Err(SrtpError::TooOld));

            // SRTCP: index 0 is 64 behind index 64.
            let sr = rtcp_sr();
            let mut packets = Vec::new();
            for _ in 0..=64 {
                let mut b = sr.clone();
                b.resize(sr.len() + 20, 0);
                let m = tx.protect_rtcp(&mut b, sr.len()).unwrap();
                b.truncate(m);
                packets.push(b);
            }
            assert!(rx.unprotect_rtcp(&mut packets[64].clone()).is_ok());
            assert!(rx.unprotect_rtcp(&mut packets[1].clone()).is_ok());
            assert_eq!(rx.unprotect_rtcp(&mut packets[0].clone()), Err(SrtpError::TooOld));
        }
    }

    #[test]
    fn reordering_inside_the_window_is_accepted_once() {
        for suite in SUITES {
            let mut tx = SrtpSender::new(&test_key(suite));
            let mut rx = SrtpReceiver::new(&test_key(suite));
            let packets: Vec<Vec<u8>> = (0..80u16).map(|i| protect(&mut tx, 3000 + i)).collect();
            // Arrival order: 10 ahead first, then a shuffle of the rest (deterministic).
            let mut order: Vec<usize> = (0..80).collect();
            order.swap(0, 10);
            for i in (1..80).step_by(3) {
                order.swap(i, (i * 7 + 3) % 80);
            }
            let mut accepted = [false; 80];
            let mut top = 0usize;
            for &i in &order {
                let r = unprotect(&mut rx, &packets[i]);
                if i + 64 <= top {
                    assert_eq!(r, Err(SrtpError::TooOld), "{suite:?} {i} behind {top}");
                } else {
                    assert!(r.is_ok(), "{suite:?} packet {i}: {r:?}");
                    accepted[i] = true;
                    top = top.max(i);
                }
                assert!(unprotect(&mut rx, &packets[i]).is_err(), "{suite:?} {i} twice");
            }
            assert!(accepted.iter().filter(|a| **a).count() > 70);
        }
    }

    #[test]
    fn rollover_across_seq_wrap() {
        for suite in SUITES {
            let mut tx = SrtpSender::new(&test_key(suite));
            let mut rx = SrtpReceiver::new(&test_key(suite));
            // 65530 .. 65535, 0 .. 9 in order, then a straggler from before the wrap and one
            // after, then a second wrap.
            let before: Vec<Vec<u8>> = (65530..=65535u16).map(|s| protect(&mut tx, s)).collect();
            let after: Vec<Vec<u8>> = (0..10u16).map(|s| protect(&mut tx, s)).collect();
            assert_eq!(tx.rtp.top >> 16, 1, "sender rolled over");
            for p in before.iter().take(5).chain(after.iter().skip(1)) {
                assert!(unprotect(&mut rx, p).is_ok());
            }
            assert_eq!(rx.rtp.top, 1 << 16 | 9);
            // Late packets from both sides of the wrap, out of order.
            assert!(unprotect(&mut rx, &after[0]).is_ok(), "seq 0 of roc 1 late");
            assert!(unprotect(&mut rx, &before[5]).is_ok(), "seq 65535 of roc 0 after the wrap");
            assert_eq!(unprotect(&mut rx, &before[5]), Err(SrtpError::Replayed));
            // Walk to the next wrap in big steps (within half the sequence space).
            for s in (10..=65535u16).step_by(20000).chain([65535]) {
                let p = protect(&mut tx, s);
                assert!(unprotect(&mut rx, &p).is_ok());
            }
            let p = protect(&mut tx, 3);
            assert_eq!(tx.rtp.top >> 16, 2);
            assert!(unprotect(&mut rx, &p).is_ok());
            assert_eq!(rx.rtp.top, 2 << 16 | 3);
            // A receiver that started at seq 0 (ROC 0) cannot place 65535 before it: ROC -1 is
            // outside the index space. A sender refuses the same.
            let mut rx2 = SrtpReceiver::new(&test_key(suite));
            let mut tx2 = SrtpSender::new(&test_key(suite));
            assert!(unprotect(&mut rx2, &protect(&mut tx2, 0)).is_ok());
            let other = protect(&mut SrtpSender::new(&test_key(suite)), 65535);
            assert_eq!(unprotect(&mut rx2, &other), Err(SrtpError::TooOld));
            let (mut b, n) = rtp(65535, 21);
            assert_eq!(tx2.protect_rtp(&mut b, n), Err(SrtpError::TooOld));
        }
    }

    #[test]
    fn failed_authentication_does_not_move_the_window() {
        for suite in SUITES {
            let mut tx = SrtpSender::new(&test_key(suite));
            let mut rx = SrtpReceiver::new(&test_key(suite));
            let first = protect(&mut tx, 65000);
            assert!(unprotect(&mut rx, &first).is_ok());
            // A forgery ahead, and one past the wrap that would move the ROC to 1.
            let mut ahead = protect(&mut tx, 65030);
            let last = ahead.len() - 1;
            ahead[last] ^= 1;
            assert_eq!(unprotect(&mut rx, &ahead), Err(SrtpError::AuthFailed));
            let mut forged = first.clone();
            forged[2..4].copy_from_slice(&10u16.to_be_bytes());
            assert_eq!(unprotect(&mut rx, &forged), Err(SrtpError::AuthFailed));
            assert_eq!(rx.rtp.top, 65000);
            // The stream goes on at ROC 0, right after 65000.
            for seq in [65001, 65002] {
                assert!(unprotect(&mut rx, &protect(&mut tx, seq)).is_ok());
            }
            assert_eq!(rx.rtp.top, 65002);

            let sr = rtcp_sr();
            let mut b = sr.clone();
            b.resize(sr.len() + 20, 0);
            let m = tx.protect_rtcp(&mut b, sr.len()).unwrap();
            let mut bad = b[..m].to_vec();
            bad[m - 1] ^= 1;
            assert_eq!(rx.unprotect_rtcp(&mut bad), Err(SrtpError::AuthFailed));
            assert!(!rx.rtcp.started);
            assert_eq!(rx.unprotect_rtcp(&mut b[..m]), Ok(sr.len()));
        }
    }

    #[test]
    fn malformed_headers() {
        for suite in SUITES {
            let mut tx = SrtpSender::new(&test_key(suite));
            let mut rx = SrtpReceiver::new(&test_key(suite));
            let mut b = [0u8; 64];
            b[0] = 0x40; // version 1
            assert_eq!(tx.protect_rtp(&mut b, 20), Err(SrtpError::BadHeader));
            assert_eq!(tx.protect_rtcp(&mut b, 20), Err(SrtpError::BadHeader));
            assert_eq!(rx.unprotect_rtp(&mut b[..40]), Err(SrtpError::BadHeader));
            assert_eq!(rx.unprotect_rtcp(&mut b[..40]), Err(SrtpError::BadHeader));
            b[0] = 0x80 | 15; // 15 CSRCs: 72 bytes of header
            assert_eq!(tx.protect_rtp(&mut b, 40), Err(SrtpError::BadHeader));
            assert_eq!(rx.unprotect_rtp(&mut b[..60]), Err(SrtpError::BadHeader));
            b[0] = 0x90; // extension of 0xFFFF words
            b[12..16].copy_from_slice(&[0xBE, 0xDE, 0xFF, 0xFF]);
            assert_eq!(tx.protect_rtp(&mut b, 40), Err(SrtpError::BadHeader));
            assert_eq!(rx.unprotect_rtp(&mut b[..60]), Err(SrtpError::BadHeader));
            b[0] = 0x90; // extension header itself cut off
            assert_eq!(tx.protect_rtp(&mut b, 14), Err(SrtpError::BadHeader));
            b[0] = 0x80;
            assert_eq!(tx.protect_rtp(&mut b, 11), Err(SrtpError::TooShort));
            assert_eq!(tx.protect_rtcp(&mut b, 7), Err(SrtpError::TooShort));
            // No room for the tag, or `len` beyond the buffer.
            assert_eq!(tx.protect_rtp(&mut b[..30], 30 - suite.rtp_overhead() + 1), Err(SrtpError::BufferTooSmall));
            assert_eq!(tx.protect_rtp(&mut b[..30], 31), Err(SrtpError::BufferTooSmall));
            assert_eq!(tx.protect_rtcp(&mut b[..30], 30 - suite.rtcp_overhead() + 1), Err(SrtpError::BufferTooSmall));
            // A header-only packet is fine (empty payload).
            assert_eq!(tx.protect_rtp(&mut b, 12), Ok(12 + suite.rtp_overhead()));
        }
    }

    /// Every length 0..=40 of zeros, of 0x80-led garbage and of cut-off genuine packets, to
    /// both unprotect paths of both suites: an error, never a panic, never a bogus success.
    #[test]
    fn truncated_and_garbage_inputs_are_errors() {
        for suite in SUITES {
            let mut tx = SrtpSender::new(&test_key(suite));
            let genuine = protect(&mut tx, 42);
            let sr = rtcp_sr();
            let mut c = sr.clone();
            c.resize(sr.len() + 20, 0);
            let m = tx.protect_rtcp(&mut c, sr.len()).unwrap();
            c.truncate(m);
            for len in 0..=40usize {
                let garbage: Vec<u8> = (0..len).map(|i| if i == 0 { 0x80 } else { (i * 37 + 11) as u8 }).collect();
                for input in [vec![0u8; len], garbage, genuine[..len.min(genuine.len() - 1)].to_vec()] {
                    let mut rx = SrtpReceiver::new(&test_key(suite));
                    assert!(rx.unprotect_rtp(&mut input.clone()).is_err(), "{suite:?} rtp {input:02x?}");
                    assert!(rx.unprotect_rtcp(&mut input.clone()).is_err(), "{suite:?} rtcp {input:02x?}");
                }
                let mut rx = SrtpReceiver::new(&test_key(suite));
                let cut = c[..len.min(c.len() - 1)].to_vec();
                assert!(rx.unprotect_rtcp(&mut cut.clone()).is_err());
                assert!(rx.unprotect_rtp(&mut cut.clone()).is_err());
                // protect on garbage: no panic; an error or a packet that round-trips.
                let mut buf = vec![0u8; len + 20];
                buf[..len].copy_from_slice(&genuine[..len.min(genuine.len())]);
                let _ = SrtpSender::new(&test_key(suite)).protect_rtp(&mut buf, len);
                let _ = SrtpSender::new(&test_key(suite)).protect_rtcp(&mut buf, len);
            }
        }
    }

    #[test]
    fn srtcp_index_runs_out() {
        let mut tx = SrtpSender::new(&test_key(Suite::AesCm128HmacSha1_80));
        tx.rtcp_index = SRTCP_INDEX_MAX;
        let sr = rtcp_sr();
        let mut b = sr.clone();
        b.resize(sr.len() + 20, 0);
        assert!(tx.protect_rtcp(&mut b, sr.len()).is_ok());
        b.truncate(sr.len());
        b.resize(sr.len() + 20, 0);
        assert_eq!(tx.protect_rtcp(&mut b, sr.len()), Err(SrtpError::TooOld));
    }
}
