//! Byte formats. Every format has a checked parser that never panics on any input and an
//! emitter that writes into a caller-owned buffer.

pub mod demux;
pub mod frame;
pub mod null;
pub mod portmap;
pub mod rtp;
pub mod stun;

pub use demux::{classify, DatagramKind};
pub use frame::{Addr, ClientId, Frame, FrameDecoder, FrameError};
pub use null::NullPacket;
