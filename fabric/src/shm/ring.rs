//! A single-producer single-consumer byte ring in shared memory: how doorbells and control
//! messages travel from one node to another on one host.
//!
//! One ring per ordered pair (source, target) lives in the target's inbox memfd. The source
//! process is the only producer (its per-peer link lock serialises its threads); the target's
//! receive lock makes it the only consumer.
//!
//! An entry is an 8-byte header word (kind, a magic, and a length, or for a doorbell its
//! immediate) and its payload padded to 8 bytes; an entry never wraps: a pad entry fills the end of the ring instead. A zero header
//! means "nothing here yet". The producer writes the payload, then the header with a release
//! store; the consumer polls the header at its position with an acquire load, copies the
//! payload out and moves its private read position on; later, off the fast path (when idle,
//! or every quarter ring), it zeroes what it read and publishes its position (`head`,
//! release) so the producer may reuse the space. The producer keeps its own position (`tail`) and its last
//! view of `head` on a line only it touches, and reloads `head` (acquire) only when the ring
//! looks full: in steady state a doorbell moves one cache line each way, as a raw ping-pong
//! does.
//!
//! The consumer validates every header, so a damaged ring is an error naming the source, never
//! a panic or an out-of-range copy.
#![forbid(unsafe_code)]

use std::sync::atomic::Ordering;

use super::sys::Mapping;
use crate::MAX_MESSAGE_BYTES;

/// Payload bytes of one ring: room for a few maximal messages or thousands of doorbells.
/// A full ring makes the producer wait (bounded by the heartbeat timeout).
pub(crate) const RING_BYTES: usize = 256 * 1024;

/// The ring's header: the consumer's `head` on one cache line; the producer's `tail` and its
/// cached view of `head` on another, which only the producer touches.
const HEADER_BYTES: usize = 128;
const HEAD: usize = 0;
const TAIL: usize = 64;
const HEAD_SEEN: usize = 72;

/// Bytes one ring occupies in an inbox.
pub(crate) const RING_STRIDE: usize = HEADER_BYTES + RING_BYTES;

const ENTRY_HEADER: usize = 8;
const KIND_PAD: u64 = 1;
const KIND_DOORBELL: u64 = 2;
const KIND_MESSAGE: u64 = 3;
/// Bits 8..32 of every header: a zeroed or stale word is never taken for an entry.
const MAGIC: u64 = 0x5a_a55a << 8;

// Every entry size is a multiple of 8 and the ring one too, so a header never straddles the end.
const _: () = assert!(RING_BYTES % 8 == 0 && RING_BYTES >= ENTRY_HEADER + MAX_MESSAGE_BYTES);

/// What a ring carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    Doorbell(u32),
    Message(Vec<u8>),
}

/// One ring at `base` inside a mapping.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ring<'a> {
    map: &'a Mapping,
    base: usize,
}

fn padded(len: usize) -> usize {
    ENTRY_HEADER + len.next_multiple_of(8)
}

fn header(kind: u64, upper: u32) -> u64 {
    kind | MAGIC | u64::from(upper) << 32
}

impl<'a> Ring<'a> {
    /// The ring at `base`; panics if it does not fit the mapping (callers size inboxes).
    pub fn at(map: &'a Mapping, base: usize) -> Ring<'a> {
        assert!(
            base + RING_STRIDE <= map.len(),
            "ring at {base} outside its inbox"
        );
        Ring { map, base }
    }

    fn data(&self, pos: u64) -> usize {
        self.base + HEADER_BYTES + (pos % RING_BYTES as u64) as usize
    }

    /// Appends a doorbell; `false` when the ring is full.
    pub fn push_doorbell(&self, imm: u32) -> bool {
        // The immediate rides in the header's upper half: a doorbell is one 8-byte store.
        self.push(KIND_DOORBELL, imm, &[])
    }

    /// Appends a message (at most `MAX_MESSAGE_BYTES`); `false` when the ring is full.
    pub fn push_message(&self, data: &[u8]) -> bool {
        assert!(
            data.len() <= MAX_MESSAGE_BYTES,
            "message checked before posting"
        );
        self.push(KIND_MESSAGE, data.len() as u32, data)
    }

    /// Appends an entry whose header carries `kind` and `upper` (a length, or an immediate).
    fn push(&self, kind: u64, upper: u32, payload: &[u8]) -> bool {
        // Only this producer touches tail and its view of head.
        let tail_word = self.map.u64_at(self.base + TAIL);
        let seen_word = self.map.u64_at(self.base + HEAD_SEEN);
        let mut tail = tail_word.load(Ordering::Relaxed);
        let size = padded(payload.len());
        let pos = (tail % RING_BYTES as u64) as usize;
        let pad = if pos + size > RING_BYTES {
            RING_BYTES - pos
        } else {
            0
        };
        let need = (pad + size) as u64;
        let fits = |head: u64| tail.wrapping_sub(head) + need <= RING_BYTES as u64;
        if !fits(seen_word.load(Ordering::Relaxed)) {
            // Acquire: pairs with the consumer's release of head, after which the space it
            // freed is zeroed and no longer read.
            let head = self.map.u64_at(self.base + HEAD).load(Ordering::Acquire);
            seen_word.store(head, Ordering::Relaxed);
            if !fits(head) {
                return false;
            }
        }
        if pad > 0 {
            // Release: the consumer may see the pad before the entry after it.
            self.header_word(tail).store(
                header(KIND_PAD, (pad - ENTRY_HEADER) as u32),
                Ordering::Release,
            );
            tail += pad as u64;
        }
        if !payload.is_empty() {
            self.map.copy_in(self.data(tail) + ENTRY_HEADER, payload);
        }
        // SeqCst swap (one locked instruction on x86): publishes the payload (and every write
        // into regions before it) to the consumer's acquire load of this header, and is a full
        // barrier before the producer's check for a sleeping consumer (see `recv`).
        self.header_word(tail)
            .swap(header(kind, upper), Ordering::SeqCst);
        tail_word.store(tail + size as u64, Ordering::Relaxed);
        true
    }

    fn header_word(&self, pos: u64) -> &'a std::sync::atomic::AtomicU64 {
        self.map.u64_at(self.data(pos))
    }

    fn head(&self) -> u64 {
        // Only this consumer writes head.
        self.map.u64_at(self.base + HEAD).load(Ordering::Relaxed)
    }

    /// Whether no entry is waiting at the consumer's read position `read`.
    pub fn is_empty(&self, read: u64) -> bool {
        self.header_word(read).load(Ordering::Acquire) == 0
    }

    /// Bytes read but not yet released to the producer.
    pub fn unreleased(&self, read: u64) -> u64 {
        read.wrapping_sub(self.head())
    }

    /// Takes the entry at the consumer's read position `read` (advancing it): `Ok(None)` when
    /// empty, `Err(reason)` when the ring is damaged. The space stays the consumer's until
    /// [`Ring::release`], so the zeroing that makes it reusable stays off the fast path.
    pub fn pop(&self, read: &mut u64) -> Result<Option<Entry>, String> {
        loop {
            let at = *read;
            if at % 8 != 0 || self.unreleased(at) > RING_BYTES as u64 {
                return Err(format!("ring read position {at} is inconsistent"));
            }
            // Acquire: pairs with the producer's publication of the header; the payload is
            // whole.
            let h = self.header_word(at).load(Ordering::Acquire);
            if h == 0 {
                return Ok(None);
            }
            let kind = h & 0xff;
            let upper = (h >> 32) as u32;
            // A doorbell's upper half is its immediate; otherwise it is the payload length.
            let len = if kind == KIND_DOORBELL {
                0
            } else {
                upper as usize
            };
            let pos = (at % RING_BYTES as u64) as usize;
            let size = padded(len);
            let fits = h & 0xffff_ff00 == MAGIC && pos + size <= RING_BYTES;
            let entry = match kind {
                KIND_PAD if fits && pos + size == RING_BYTES => None,
                KIND_DOORBELL if fits => Some(Entry::Doorbell(upper)),
                KIND_MESSAGE if fits && len <= MAX_MESSAGE_BYTES => {
                    let mut data = vec![0u8; len];
                    self.map.copy_out(self.data(at) + ENTRY_HEADER, &mut data);
                    Some(Entry::Message(data))
                }
                _ => return Err(format!("bad ring entry at {at}: header {h:#018x}")),
            };
            *read = at + size as u64;
            if entry.is_some() {
                return Ok(entry);
            }
        }
    }

    /// Zeroes everything read up to `read` (so no stale byte is ever taken for a header) and
    /// hands the space back to the producer.
    pub fn release(&self, read: u64) {
        let head = self.head();
        let len = read.wrapping_sub(head) as usize;
        if len == 0 || len > RING_BYTES {
            return;
        }
        let pos = (head % RING_BYTES as u64) as usize;
        let first = len.min(RING_BYTES - pos);
        self.map.fill_zero(self.data(head), first);
        if first < len {
            self.map.fill_zero(self.data(0), len - first);
        }
        // Release: the space was read and zeroed before the producer may reuse it.
        self.map
            .u64_at(self.base + HEAD)
            .store(read, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    fn ring_map() -> Mapping {
        let fd = nix::sys::memfd::memfd_create(
            c"vsmp-ring-test",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .unwrap();
        let f = File::from(fd);
        f.set_len(RING_STRIDE as u64).unwrap();
        Mapping::map(&f, RING_STRIDE).unwrap()
    }

    #[test]
    fn entries_come_out_in_order_across_many_wraps() {
        let map = ring_map();
        let ring = Ring::at(&map, 0);
        let mut expected = std::collections::VecDeque::new();
        let mut read = 0;
        for i in 0..20_000u32 {
            let e = if i % 3 == 0 {
                Entry::Doorbell(i)
            } else {
                Entry::Message(vec![i as u8; (i as usize * 7) % 3000])
            };
            let pushed = match &e {
                Entry::Doorbell(imm) => ring.push_doorbell(*imm),
                Entry::Message(m) => ring.push_message(m),
            };
            if pushed {
                expected.push_back(e);
            } else {
                // Full: drain half and retry once.
                for _ in 0..expected.len() / 2 {
                    assert_eq!(ring.pop(&mut read).unwrap(), expected.pop_front());
                }
                ring.release(read);
            }
        }
        while let Some(e) = expected.pop_front() {
            assert_eq!(ring.pop(&mut read).unwrap(), Some(e));
        }
        assert_eq!(ring.pop(&mut read).unwrap(), None);
        assert!(ring.is_empty(read));
    }

    #[test]
    fn a_full_ring_refuses_instead_of_overwriting() {
        let map = ring_map();
        let ring = Ring::at(&map, 0);
        let big = vec![1u8; MAX_MESSAGE_BYTES];
        let mut n = 0;
        while ring.push_message(&big) {
            n += 1;
        }
        assert_eq!(n, RING_BYTES / padded(MAX_MESSAGE_BYTES));
        let mut read = 0;
        assert_eq!(
            ring.pop(&mut read).unwrap(),
            Some(Entry::Message(big.clone()))
        );
        // Read but not released: still no room.
        assert!(!ring.push_message(&big));
        ring.release(read);
        assert!(ring.push_message(&big));
    }

    #[test]
    fn a_damaged_header_is_an_error_not_a_panic() {
        let map = ring_map();
        let ring = Ring::at(&map, 0);
        assert!(ring.push_doorbell(1));
        map.copy_in(HEADER_BYTES + 1, &[0xee]);
        assert!(ring.pop(&mut 0).is_err());
        map.u64_at(HEADER_BYTES).store(u64::MAX, Ordering::Release);
        assert!(ring.pop(&mut 0).is_err());
        map.u64_at(HEADER_BYTES)
            .store(header(KIND_MESSAGE, u32::MAX), Ordering::Release);
        assert!(ring.pop(&mut 0).is_err());
        assert!(ring.pop(&mut 3).is_err());
    }
}
