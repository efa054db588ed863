//! TEMPORARY STUB (replaced by the real transform before commit).
#![allow(missing_docs, unused)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    AeadAes128Gcm,
    AesCm128HmacSha1_80,
}
impl Suite {
    pub fn from_code(c: u8) -> Option<Suite> {
        match c {
            1 => Some(Suite::AeadAes128Gcm),
            2 => Some(Suite::AesCm128HmacSha1_80),
            _ => None,
        }
    }
    pub fn rtp_overhead(self) -> usize {
        match self {
            Suite::AeadAes128Gcm => 16,
            _ => 10,
        }
    }
}
pub struct MasterKey {
    pub key: [u8; 16],
    pub salt: [u8; 14],
    pub suite: Suite,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SrtpError {
    TooShort,
    BadHeader,
    AuthFailed,
    Replayed,
    TooOld,
    BufferTooSmall,
}
pub struct SrtpSender {
    o: usize,
}
impl SrtpSender {
    pub fn new(mk: &MasterKey) -> Self {
        SrtpSender { o: mk.suite.rtp_overhead() }
    }
    pub fn protect_rtp(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SrtpError> {
        if buf.len() < len + self.o {
            return Err(SrtpError::BufferTooSmall);
        }
        buf[len..len + self.o].fill(0xAA);
        Ok(len + self.o)
    }
}
pub struct SrtpReceiver {
    o: usize,
}
impl SrtpReceiver {
    pub fn new(mk: &MasterKey) -> Self {
        SrtpReceiver { o: mk.suite.rtp_overhead() }
    }
    pub fn unprotect_rtp(&mut self, buf: &mut [u8]) -> Result<usize, SrtpError> {
        if buf.len() < 12 + self.o || buf[buf.len() - self.o..].iter().any(|&b| b != 0xAA) {
            return Err(SrtpError::AuthFailed);
        }
        Ok(buf.len() - self.o)
    }
}
