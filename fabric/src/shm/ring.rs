//! A single-producer single-consumer byte ring in shared memory: how doorbells and control
//! messages travel from one node to another on one host.
//!
//! One ring per ordered pair (source, target) lives in the target's inbox memfd. The source
//! process is the only producer (its per-peer link lock serialises its threads); the target's
//! receive lock makes it the only consumer. Positions are free-running byte counters; the
//! producer publishes an entry with a release store of `tail` (pairing with the consumer's
//! acquire load), the consumer frees space with a release store of `head` (pairing with the
//! producer's acquire load). An entry is an 8-byte header (kind, length) and its payload
//! padded to 8 bytes; an entry never wraps: a pad entry fills the end of the ring instead.
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

/// The ring's header: `head` and `tail` on their own cache lines.
const HEADER_BYTES: usize = 128;
const HEAD: usize = 0;
const TAIL: usize = 64;

/// Bytes one ring occupies in an inbox.
pub(crate) const RING_STRIDE: usize = HEADER_BYTES + RING_BYTES;

const ENTRY_HEADER: usize = 8;
const KIND_PAD: u32 = 1;
const KIND_DOORBELL: u32 = 2;
const KIND_MESSAGE: u32 = 3;

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
        self.push(KIND_DOORBELL, &imm.to_le_bytes())
    }

    /// Appends a message (at most `MAX_MESSAGE_BYTES`); `false` when the ring is full.
    pub fn push_message(&self, data: &[u8]) -> bool {
        assert!(
            data.len() <= MAX_MESSAGE_BYTES,
            "message checked before posting"
        );
        self.push(KIND_MESSAGE, data)
    }

    fn push(&self, kind: u32, payload: &[u8]) -> bool {
        let head_word = self.map.u64_at(self.base + HEAD);
        let tail_word = self.map.u64_at(self.base + TAIL);
        // Only this producer writes tail.
        let mut tail = tail_word.load(Ordering::Relaxed);
        // Acquire: pairs with the consumer's release of head, so the space is really free.
        let head = head_word.load(Ordering::Acquire);
        let size = padded(payload.len());
        let pos = (tail % RING_BYTES as u64) as usize;
        let pad = if pos + size > RING_BYTES {
            RING_BYTES - pos
        } else {
            0
        };
        if tail.wrapping_sub(head) + (pad + size) as u64 > RING_BYTES as u64 {
            return false;
        }
        if pad > 0 {
            self.write_header(tail, KIND_PAD, (pad - ENTRY_HEADER) as u32);
            tail += pad as u64;
        }
        self.write_header(tail, kind, payload.len() as u32);
        self.map.copy_in(self.data(tail) + ENTRY_HEADER, payload);
        // Release: publishes the entry (and every write into regions before it) to the
        // consumer's acquire load of tail.
        tail_word.store(tail + size as u64, Ordering::Release);
        true
    }

    fn write_header(&self, pos: u64, kind: u32, len: u32) {
        let mut h = [0u8; ENTRY_HEADER];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[4..].copy_from_slice(&len.to_le_bytes());
        self.map.copy_in(self.data(pos), &h);
    }

    /// Whether an entry is waiting.
    pub fn is_empty(&self) -> bool {
        let head = self.map.u64_at(self.base + HEAD).load(Ordering::Relaxed);
        self.map.u64_at(self.base + TAIL).load(Ordering::Acquire) == head
    }

    /// Takes the next entry, `Ok(None)` when empty, `Err(reason)` when the ring is damaged.
    pub fn pop(&self) -> Result<Option<Entry>, String> {
        let head_word = self.map.u64_at(self.base + HEAD);
        // Only this consumer writes head.
        let mut head = head_word.load(Ordering::Relaxed);
        loop {
            // Acquire: pairs with the producer's release of tail; the entry is complete.
            let tail = self.map.u64_at(self.base + TAIL).load(Ordering::Acquire);
            let avail = tail.wrapping_sub(head);
            if avail == 0 {
                return Ok(None);
            }
            if avail > RING_BYTES as u64 || avail < ENTRY_HEADER as u64 || head % 8 != 0 {
                return Err(format!(
                    "ring positions head {head} tail {tail} are inconsistent"
                ));
            }
            let mut h = [0u8; ENTRY_HEADER];
            self.map.copy_out(self.data(head), &mut h);
            let kind = u32::from_le_bytes(h[..4].try_into().expect("4 bytes"));
            let len = u32::from_le_bytes(h[4..].try_into().expect("4 bytes")) as usize;
            let pos = (head % RING_BYTES as u64) as usize;
            let size = padded(len);
            let fits = size as u64 <= avail && pos + size <= RING_BYTES;
            let entry = match kind {
                KIND_PAD if fits && pos + size == RING_BYTES => None,
                KIND_DOORBELL if fits && len == 4 => {
                    let mut imm = [0u8; 4];
                    self.map.copy_out(self.data(head) + ENTRY_HEADER, &mut imm);
                    Some(Entry::Doorbell(u32::from_le_bytes(imm)))
                }
                KIND_MESSAGE if fits && len <= MAX_MESSAGE_BYTES => {
                    let mut data = vec![0u8; len];
                    self.map.copy_out(self.data(head) + ENTRY_HEADER, &mut data);
                    Some(Entry::Message(data))
                }
                _ => {
                    return Err(format!(
                        "bad ring entry at {head}: kind {kind}, length {len}, {avail} bytes published"
                    ));
                }
            };
            head += size as u64;
            // Release: the entry's bytes were read before the producer may reuse them.
            head_word.store(head, Ordering::Release);
            if entry.is_some() {
                return Ok(entry);
            }
        }
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
                    assert_eq!(ring.pop().unwrap(), expected.pop_front());
                }
            }
        }
        while let Some(e) = expected.pop_front() {
            assert_eq!(ring.pop().unwrap(), Some(e));
        }
        assert_eq!(ring.pop().unwrap(), None);
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
        assert_eq!(ring.pop().unwrap(), Some(Entry::Message(big)));
    }

    #[test]
    fn a_damaged_header_is_an_error_not_a_panic() {
        let map = ring_map();
        let ring = Ring::at(&map, 0);
        assert!(ring.push_doorbell(1));
        map.copy_in(HEADER_BYTES + 4, &u32::MAX.to_le_bytes());
        assert!(ring.pop().is_err());
        map.u64_at(TAIL).store(u64::MAX, Ordering::Release);
        assert!(ring.pop().is_err());
    }
}
