//! Frames on the tcp backend's byte streams.
//!
//! Every frame is a fixed [`HEADER_BYTES`]-byte header followed by `len` payload bytes. The
//! header is little-endian:
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 0..2 | magic | [`MAGIC`] |
//! | 2 | version | [`VERSION`] |
//! | 3 | kind | [`Kind`] |
//! | 4..6 | flags | [`FLAG_MORE`] on a non-final chunk of a large write, else 0 |
//! | 6..8 | reserved | 0 |
//! | 8..12 | len | payload length |
//! | 12..16 | region | target region id |
//! | 16..24 | wr | the source's work-request number (acks name the one they complete) |
//! | 24..32 | offset | byte offset in the region |
//! | 32..40 | arg | fetch_add: the addend; ack of a fetch_add: the old value; nack: refused length; first chunk of a chunked write: its total length; credit: the count of doorbells and messages the sender has polled from us |
//! | 40..44 | imm | write_imm: the immediate; nack: a [`NackReason`] |
//! | 44..48 | reserved | 0 |
//!
//! Decoding trusts nothing: the kind must be known, the flags and reserved fields valid for it,
//! the payload length within the named bound for the kind ([`MAX_WRITE_PAYLOAD`],
//! [`MAX_MESSAGE_BYTES`], zero for the rest), and `offset + len` must not overflow. Only then is
//! the payload buffer sized, so a length field never makes the reader allocate more than the
//! bound. A violation is a [`FrameError`]; the tcp backend turns it into
//! [`crate::FabricError::Protocol`] naming the peer and drops that one connection.

#![forbid(unsafe_code)]

use std::io::{self, Read};

use crate::MAX_MESSAGE_BYTES;

/// Size of every frame header.
pub const HEADER_BYTES: usize = 48;

/// First two bytes of every frame.
pub const MAGIC: u16 = 0x7376; // "vs"

/// Version of the frame format (2: cumulative acks, credit returns).
pub const VERSION: u8 = 2;

/// Largest payload one write frame carries. Larger writes travel as several chunk frames (all
/// but the last flagged [`FLAG_MORE`]); this bounds the receive buffer a peer can make us
/// allocate, while keeping a frame big enough that the per-frame cost vanishes in bandwidth.
pub const MAX_WRITE_PAYLOAD: usize = 1 << 20;

/// Set on every chunk of a chunked write except the last, which carries the write's own kind.
pub const FLAG_MORE: u16 = 1;

/// What a frame asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Copy the payload into the region.
    Write = 1,
    /// Copy the payload, then deliver `imm` as a doorbell.
    WriteImm = 2,
    /// Atomically add `arg` to the 64-bit word at `offset`.
    FetchAdd = 3,
    /// Queue the payload as a control message.
    Send = 4,
    /// The operation `wr` and every earlier one on this connection took effect (one ack may
    /// answer many requests).
    Ack = 5,
    /// The fetch_add `wr` took effect; `arg` is the old value.
    AckFetch = 6,
    /// The operation `wr` was refused; `imm` says why.
    Nack = 7,
    /// Nothing: proves the sender is alive.
    Heartbeat = 8,
    /// Receive credits returned: `arg` is how many of our doorbells and messages the sender
    /// has polled so far (cumulative).
    Credit = 9,
}

impl Kind {
    fn from_code(code: u8) -> Option<Kind> {
        Some(match code {
            1 => Kind::Write,
            2 => Kind::WriteImm,
            3 => Kind::FetchAdd,
            4 => Kind::Send,
            5 => Kind::Ack,
            6 => Kind::AckFetch,
            7 => Kind::Nack,
            8 => Kind::Heartbeat,
            9 => Kind::Credit,
            _ => return None,
        })
    }

    /// The largest payload a frame of this kind may carry.
    pub fn max_payload(self) -> usize {
        match self {
            Kind::Write | Kind::WriteImm => MAX_WRITE_PAYLOAD,
            Kind::Send => MAX_MESSAGE_BYTES,
            Kind::FetchAdd
            | Kind::Ack
            | Kind::AckFetch
            | Kind::Nack
            | Kind::Heartbeat
            | Kind::Credit => 0,
        }
    }

    /// Whether the frame is a request the receiver must answer with an ack or a nack.
    pub fn is_request(self) -> bool {
        matches!(
            self,
            Kind::Write | Kind::WriteImm | Kind::FetchAdd | Kind::Send
        )
    }
}

/// Why a target refused an operation (the `imm` of a [`Kind::Nack`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NackReason {
    /// Outside every grant for the writer (or past the region's end).
    AccessDenied = 1,
    /// The region is not registered at the target.
    UnknownRegion = 2,
}

impl NackReason {
    pub fn from_code(code: u32) -> Option<NackReason> {
        match code {
            1 => Some(NackReason::AccessDenied),
            2 => Some(NackReason::UnknownRegion),
            _ => None,
        }
    }
}

/// A decoded, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub flags: u16,
    pub len: u32,
    pub region: u32,
    pub wr: u64,
    pub offset: u64,
    pub arg: u64,
    pub imm: u32,
}

/// Why bytes from a peer are not a valid frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {0:#06x}")]
    Magic(u16),
    #[error("unsupported frame version {0} (this node speaks {VERSION})")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("flags {flags:#x} are not valid on a {kind:?} frame")]
    Flags { kind: Kind, flags: u16 },
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("{kind:?} frame of {len} payload bytes exceeds its {max}-byte bound")]
    Oversized { kind: Kind, len: u32, max: usize },
    #[error("offset {offset} + {len} bytes overflows")]
    Overflow { offset: u64, len: u64 },
    #[error("fetch_add offset {0} is not 8-byte aligned")]
    Misaligned(u64),
    #[error("nack with unknown reason {0}")]
    NackReason(u32),
}

impl Header {
    /// A header with every field zero but the kind.
    pub fn new(kind: Kind) -> Header {
        Header {
            kind,
            flags: 0,
            len: 0,
            region: 0,
            wr: 0,
            offset: 0,
            arg: 0,
            imm: 0,
        }
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        b[2] = VERSION;
        b[3] = self.kind as u8;
        b[4..6].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..16].copy_from_slice(&self.region.to_le_bytes());
        b[16..24].copy_from_slice(&self.wr.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.arg.to_le_bytes());
        b[40..44].copy_from_slice(&self.imm.to_le_bytes());
        b
    }

    /// Parses and validates a header; never panics, whatever the bytes.
    pub fn decode(b: &[u8; HEADER_BYTES]) -> Result<Header, FrameError> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let magic = u16_at(0);
        if magic != MAGIC {
            return Err(FrameError::Magic(magic));
        }
        if b[2] != VERSION {
            return Err(FrameError::Version(b[2]));
        }
        let kind = Kind::from_code(b[3]).ok_or(FrameError::Kind(b[3]))?;
        let flags = u16_at(4);
        let allowed = if kind == Kind::Write { FLAG_MORE } else { 0 };
        if flags & !allowed != 0 {
            return Err(FrameError::Flags { kind, flags });
        }
        if u16_at(6) != 0 || u32_at(44) != 0 {
            return Err(FrameError::Reserved);
        }
        let h = Header {
            kind,
            flags,
            len: u32_at(8),
            region: u32_at(12),
            wr: u64_at(16),
            offset: u64_at(24),
            arg: u64_at(32),
            imm: u32_at(40),
        };
        let max = kind.max_payload();
        if h.len as usize > max {
            return Err(FrameError::Oversized {
                kind,
                len: h.len,
                max,
            });
        }
        let span = if kind == Kind::FetchAdd {
            8
        } else {
            u64::from(h.len)
        };
        if h.offset.checked_add(span).is_none() {
            return Err(FrameError::Overflow {
                offset: h.offset,
                len: span,
            });
        }
        if kind == Kind::FetchAdd && h.offset % 8 != 0 {
            return Err(FrameError::Misaligned(h.offset));
        }
        if kind == Kind::Nack && NackReason::from_code(h.imm).is_none() {
            return Err(FrameError::NackReason(h.imm));
        }
        Ok(h)
    }

    /// Whether this is a non-final chunk of a chunked write.
    pub fn more(&self) -> bool {
        self.flags & FLAG_MORE != 0
    }
}

/// Why reading a frame from a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes are not a frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer closed the stream, between frames or inside one.
    #[error("the connection was closed{}", if *.mid_frame { " in the middle of a frame" } else { "" })]
    Closed { mid_frame: bool },
    /// The stream failed.
    #[error("reading a frame failed")]
    Io(#[from] io::Error),
}

/// Bytes the reader asks the socket for at once when it is collecting headers.
pub const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Reassembles frames from a byte stream whose reads may time out: a timeout keeps what was
/// read so far (unlike `read_exact`), so the caller can check deadlines between reads.
#[derive(Debug)]
pub struct FrameReader {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    header: Option<Header>,
    payload: Vec<u8>,
    payload_len: usize,
    filled: usize,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader::new()
    }
}

impl FrameReader {
    pub fn new() -> FrameReader {
        FrameReader {
            buf: vec![0u8; READ_BUFFER_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
            header: None,
            payload: Vec::new(),
            payload_len: 0,
            filled: 0,
        }
    }

    /// The payload of the frame [`FrameReader::poll`] last returned.
    pub fn payload(&self) -> &[u8] {
        &self.payload[..self.payload_len]
    }

    /// The next whole frame, or `Ok(None)` when a read timed out first (what was read is kept).
    pub fn poll<R: Read>(&mut self, r: &mut R) -> Result<Option<Header>, ReadError> {
        loop {
            if self.header.is_none() && self.end - self.start >= HEADER_BYTES {
                let mut raw = [0u8; HEADER_BYTES];
                raw.copy_from_slice(&self.buf[self.start..self.start + HEADER_BYTES]);
                self.start += HEADER_BYTES;
                let h = Header::decode(&raw)?;
                // The length was bounded by `decode`: this allocation is at most the bound.
                self.payload_len = h.len as usize;
                if self.payload.len() < self.payload_len {
                    self.payload.resize(self.payload_len, 0);
                }
                self.filled = 0;
                self.header = Some(h);
            }
            if let Some(h) = self.header {
                let n = (self.end - self.start).min(self.payload_len - self.filled);
                self.payload[self.filled..self.filled + n]
                    .copy_from_slice(&self.buf[self.start..self.start + n]);
                self.filled += n;
                self.start += n;
                if self.filled == self.payload_len {
                    self.header = None;
                    return Ok(Some(h));
                }
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            }
            let got = if self.header.is_some() && self.start == self.end {
                // Large payloads are read straight into place.
                let target = &mut self.payload[self.filled..self.payload_len];
                read_some(r, target)
            } else {
                if self.start > 0 {
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                }
                read_some(r, &mut self.buf[self.end..])
            };
            match got {
                Ok(Some(0)) => {
                    let mid_frame = self.header.is_some() || self.end > self.start;
                    return Err(ReadError::Closed { mid_frame });
                }
                Ok(Some(n)) => {
                    if self.header.is_some() && self.start == self.end {
                        self.filled += n;
                    } else {
                        self.end += n;
                    }
                }
                Ok(None) => return Ok(None),
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }
}

/// One read; `Ok(None)` when it timed out.
fn read_some<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match r.read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Decodes every frame in `bytes` until the first error or the end, with the same reader the
/// backend uses; what the fuzzer and the proptests drive. Returns how many frames were valid
/// and the error that stopped decoding, if any (`None` when the bytes ended between frames).
pub fn decode_all(bytes: &[u8]) -> (usize, Option<ReadError>) {
    let mut cursor = io::Cursor::new(bytes);
    let mut reader = FrameReader::new();
    let mut frames = 0;
    loop {
        match reader.poll(&mut cursor) {
            Ok(Some(_)) => frames += 1,
            Ok(None) => return (frames, None),
            Err(ReadError::Closed { mid_frame: false }) => return (frames, None),
            Err(e) => return (frames, Some(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn write_frame(offset: u64, payload: &[u8]) -> Vec<u8> {
        let mut h = Header::new(Kind::Write);
        h.len = payload.len() as u32;
        h.region = 3;
        h.wr = 77;
        h.offset = offset;
        let mut v = h.encode().to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn a_header_round_trips_through_its_bytes() {
        let h = Header {
            kind: Kind::WriteImm,
            flags: 0,
            len: 12,
            region: 9,
            wr: u64::MAX - 1,
            offset: 4096,
            arg: 5,
            imm: 0xdead_beef,
        };
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn an_oversized_write_is_refused_before_any_allocation() {
        let mut h = Header::new(Kind::Write);
        h.len = MAX_WRITE_PAYLOAD as u32 + 1;
        let err = Header::decode(&h.encode()).unwrap_err();
        assert!(matches!(err, FrameError::Oversized { .. }), "{err}");
    }

    #[test]
    fn an_oversized_message_is_refused() {
        let mut h = Header::new(Kind::Send);
        h.len = MAX_MESSAGE_BYTES as u32 + 1;
        assert!(Header::decode(&h.encode()).is_err());
    }

    #[test]
    fn an_ack_with_a_payload_is_refused() {
        let mut h = Header::new(Kind::Ack);
        h.len = 1;
        assert!(Header::decode(&h.encode()).is_err());
    }

    #[test]
    fn an_offset_that_overflows_is_refused() {
        let mut h = Header::new(Kind::Write);
        h.len = 16;
        h.offset = u64::MAX - 3;
        let err = Header::decode(&h.encode()).unwrap_err();
        assert!(matches!(err, FrameError::Overflow { .. }), "{err}");
    }

    #[test]
    fn a_misaligned_fetch_add_and_unknown_kinds_and_flags_are_refused() {
        let mut h = Header::new(Kind::FetchAdd);
        h.offset = 4;
        assert_eq!(
            Header::decode(&h.encode()).unwrap_err(),
            FrameError::Misaligned(4)
        );
        let mut b = Header::new(Kind::Heartbeat).encode();
        b[3] = 99;
        assert_eq!(Header::decode(&b).unwrap_err(), FrameError::Kind(99));
        let mut h = Header::new(Kind::Send);
        h.flags = FLAG_MORE;
        assert!(matches!(
            Header::decode(&h.encode()).unwrap_err(),
            FrameError::Flags { .. }
        ));
    }

    #[test]
    fn a_stream_of_frames_decodes_until_a_truncated_one() {
        let mut bytes = write_frame(0, b"hello");
        bytes.extend(write_frame(8, b"world"));
        let full = bytes.len();
        bytes.extend(write_frame(16, b"cut short"));
        bytes.truncate(full + HEADER_BYTES + 2);
        let (n, err) = decode_all(&bytes);
        assert_eq!(n, 2);
        assert!(matches!(err, Some(ReadError::Closed { mid_frame: true })));
    }

    /// A reader that hands out at most `chunk` bytes per read and times out every other read.
    struct Trickle<'a> {
        bytes: &'a [u8],
        chunk: usize,
        tick: bool,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.tick = !self.tick;
            if self.tick {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = self.chunk.min(buf.len()).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    #[test]
    fn frames_survive_reads_that_time_out_mid_frame() {
        let big = vec![0xabu8; 200_000];
        let mut bytes = write_frame(0, b"first");
        bytes.extend(write_frame(8, &big));
        bytes.extend(write_frame(16, b"third"));
        let mut src = Trickle {
            bytes: &bytes,
            chunk: 7,
            tick: false,
        };
        let mut reader = FrameReader::new();
        let mut got = Vec::new();
        for _ in 0..1_000_000 {
            match reader.poll(&mut src) {
                Ok(Some(h)) => got.push((h.offset, reader.payload().to_vec())),
                Ok(None) => continue,
                Err(ReadError::Closed { mid_frame: false }) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got.len(), 3);
        assert_eq!(got[1], (8, big));
        assert_eq!(got[2], (16, b"third".to_vec()));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn random_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let (n, _) = decode_all(&bytes);
            prop_assert!(n * HEADER_BYTES <= bytes.len());
        }

        #[test]
        fn garbled_valid_frames_never_panic_the_decoder(
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            offset in any::<u64>(),
            flips in proptest::collection::vec((0usize..HEADER_BYTES + 64, any::<u8>()), 1..8),
        ) {
            let mut bytes = write_frame(offset, &payload);
            for (at, x) in flips {
                if let Some(b) = bytes.get_mut(at) {
                    *b ^= x;
                }
            }
            let total = bytes.len();
            let (n, _) = decode_all(&bytes);
            prop_assert!(n * HEADER_BYTES <= total);
        }

        #[test]
        fn every_valid_header_round_trips(
            kind in 1u8..=9, len in 0u32..64, region in any::<u32>(), wr in any::<u64>(),
            offset in 0u64..(1 << 40), arg in any::<u64>(), imm in 1u32..=2,
        ) {
            let kind = Kind::from_code(kind).unwrap();
            let h = Header {
                kind,
                flags: 0,
                len: if kind.max_payload() == 0 { 0 } else { len },
                region,
                wr,
                offset: if kind == Kind::FetchAdd { offset & !7 } else { offset },
                arg,
                imm,
            };
            prop_assert_eq!(Header::decode(&h.encode()), Ok(h));
        }
    }
}
