//! The SDP (RFC 8866) describing an RTP stream, so that ffmpeg, GStreamer or any SDP-driven
//! receiver can consume it.

use std::net::IpAddr;

/// One RTP stream as SDP sees it.
#[derive(Debug, Clone)]
pub struct SdpStream {
    /// `audio` or `video`.
    pub media: &'static str,
    /// Where the stream arrives.
    pub addr: IpAddr,
    /// Its UDP port.
    pub port: u16,
    /// Payload type.
    pub payload_type: u8,
    /// `encoding/clock[/channels]`, e.g. `opus/48000/2`, `VP8/90000`.
    pub rtpmap: String,
    /// Format parameters (`a=fmtp`), if any.
    pub fmtp: Option<String>,
    /// Packet duration, ms (`a=ptime`), if known.
    pub ptime: Option<u32>,
    /// SDES keying (RFC 4568) of an SRTP stream: `SUITE inline:BASE64(key|salt)`, written as
    /// `a=crypto:1 ...` with the profile `RTP/SAVP`. No lifetime or MKI (ffmpeg reads neither).
    pub crypto: Option<String>,
}

impl SdpStream {
    /// An Opus stream (RFC 7587: always `opus/48000/2` in SDP, whatever the channel count).
    pub fn opus(addr: IpAddr, port: u16, payload_type: u8, frame_ms: u32) -> SdpStream {
        SdpStream {
            media: "audio",
            addr,
            port,
            payload_type,
            rtpmap: "opus/48000/2".into(),
            fmtp: Some("minptime=10;useinbandfec=0".into()),
            ptime: Some(frame_ms),
            crypto: None,
        }
    }

    /// Media type for an encoding name: `video` for the usual video codecs, else `audio`.
    pub fn media_for(rtpmap: &str) -> &'static str {
        let enc = rtpmap.split('/').next().unwrap_or("").to_ascii_uppercase();
        match enc.as_str() {
            "VP8" | "VP9" | "H264" | "H265" | "AV1" | "JPEG" | "MP4V-ES" | "THEORA" | "RAW" => "video",
            _ => "audio",
        }
    }

    /// The SDP text (CRLF line ends, as RFC 8866 asks).
    pub fn to_sdp(&self, session_id: u64) -> String {
        let ipv = if self.addr.is_ipv4() { "IP4" } else { "IP6" };
        let mut s = String::new();
        s.push_str("v=0\r\n");
        s.push_str(&format!("o=- {session_id} 1 IN {ipv} {}\r\n", self.addr));
        s.push_str("s=nullpunch\r\n");
        s.push_str(&format!("c=IN {ipv} {}\r\n", self.addr));
        s.push_str("t=0 0\r\n");
        let profile = if self.crypto.is_some() { "RTP/SAVP" } else { "RTP/AVP" };
        s.push_str(&format!("m={} {} {profile} {}\r\n", self.media, self.port, self.payload_type));
        s.push_str(&format!("a=rtpmap:{} {}\r\n", self.payload_type, self.rtpmap));
        if let Some(f) = &self.fmtp {
            s.push_str(&format!("a=fmtp:{} {f}\r\n", self.payload_type));
        }
        if let Some(p) = self.ptime {
            s.push_str(&format!("a=ptime:{p}\r\n"));
        }
        if let Some(c) = &self.crypto {
            s.push_str(&format!("a=crypto:1 {c}\r\n"));
        }
        s.push_str("a=recvonly\r\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opus_and_video_descriptions() {
        let s = SdpStream::opus("127.0.0.1".parse().unwrap(), 5004, 111, 20).to_sdp(7);
        assert_eq!(
            s,
            "v=0\r\no=- 7 1 IN IP4 127.0.0.1\r\ns=nullpunch\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
             m=audio 5004 RTP/AVP 111\r\na=rtpmap:111 opus/48000/2\r\n\
             a=fmtp:111 minptime=10;useinbandfec=0\r\na=ptime:20\r\na=recvonly\r\n"
        );
        assert_eq!(SdpStream::media_for("VP8/90000"), "video");
        assert_eq!(SdpStream::media_for("opus/48000/2"), "audio");
    }
}
