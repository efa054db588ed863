//! Target `frame_decode`: the signalling frame decoder (`engine/src/wire/frame.rs`).
//!
//! Input layout: `k | s_1 .. s_k | stream`, where `k = input[0] & 7` and the `s_i` are chunk
//! sizes (bytes, used in turn, cycling); `k = 0` feeds the whole stream in one push. A chunk
//! size of 0 first pushes an empty slice, then one byte.
//!
//! Properties checked, for any input:
//! 1. `Frame::decode` run repeatedly over the stream never panics; each frame it returns
//!    consumed `4..=2 + MAX_FRAME_LEN` bytes, re-encodes to exactly those bytes (the encoding
//!    is canonical) and decodes again to itself.
//! 2. `FrameDecoder`, fed the stream in the chunks above and drained after every push, yields
//!    exactly the same frames and the same first error as (1): chunking changes nothing.
//!    After a drain it holds less than one whole frame (`pending() < 2 + MAX_FRAME_LEN`);
//!    after the last drain without an error it holds exactly the undecoded tail.
//! 3. `Frame::decode_body` over the stream (as if it were one frame body) never panics, and a
//!    body it accepts re-encodes to the same body.

use proto::wire::frame::{Frame, FrameDecoder, FrameError, MAX_FRAME_LEN};

use crate::assert_frame_round_trips;

/// Split the input into chunk sizes and the byte stream.
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((&h, rest)) = data.split_first() else { return (&[], &[]) };
    let k = ((h & 7) as usize).min(rest.len());
    rest.split_at(k)
}

/// Run the target on one input.
pub fn run(data: &[u8]) {
    let (sizes, stream) = split(data);

    // 1. One shot, straight from the slice.
    let mut reference: Vec<Result<Frame, FrameError>> = Vec::new();
    let mut pos = 0;
    loop {
        match Frame::decode(&stream[pos..]) {
            Ok(Some((f, n))) => {
                assert!((4..=2 + MAX_FRAME_LEN).contains(&n), "frame of {n} bytes");
                assert!(n <= stream.len() - pos, "consumed {n} bytes of {}", stream.len() - pos);
                let raw = &stream[pos..pos + n];
                assert_eq!(f.type_byte(), raw[3], "type byte of {f:?}");
                let again = assert_frame_round_trips(&f);
                assert_eq!(again, raw, "{} re-encodes differently (non-canonical encoding)", f.name());
                reference.push(Ok(f));
                pos += n;
            }
            Ok(None) => break,
            Err(e) => {
                reference.push(Err(e));
                break;
            }
        }
    }
    let failed = matches!(reference.last(), Some(Err(_)));

    // 2. Streaming, in chunks.
    let mut dec = FrameDecoder::new();
    let mut got: Vec<Result<Frame, FrameError>> = Vec::new();
    let mut off = 0;
    let mut i = 0;
    let mut stopped = false;
    let drain = |dec: &mut FrameDecoder, got: &mut Vec<Result<Frame, FrameError>>| -> bool {
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => got.push(Ok(f)),
                Ok(None) => {
                    assert!(dec.pending() < 2 + MAX_FRAME_LEN, "decoder holds {} bytes after a drain", dec.pending());
                    return false;
                }
                Err(e) => {
                    got.push(Err(e));
                    return true;
                }
            }
        }
    };
    while off < stream.len() && !stopped {
        let n = if sizes.is_empty() {
            stream.len()
        } else {
            let s = sizes[i % sizes.len()] as usize;
            i += 1;
            if s == 0 {
                dec.push(&[]);
                if drain(&mut dec, &mut got) {
                    break;
                }
            }
            s.max(1)
        };
        let n = n.min(stream.len() - off);
        dec.push(&stream[off..off + n]);
        off += n;
        stopped = drain(&mut dec, &mut got);
    }
    assert_eq!(got, reference, "chunked decoding differs from one-shot decoding");
    if !failed {
        assert_eq!(dec.pending(), stream.len() - pos, "undecoded tail");
    }

    // 3. The body decoder on its own.
    if let Ok(f) = Frame::decode_body(stream) {
        let enc = assert_frame_round_trips(&f);
        assert_eq!(&enc[2..], stream, "{} body re-encodes differently", f.name());
    }
}
