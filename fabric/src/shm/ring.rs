//! A single-producer single-consumer byte ring in shared memory: how doorbells and control
//! messages travel from one node to another on one host.
//!
//! One ring per ordered pair (source, target) lives in the target's inbox memfd. The source
//! process is the only producer (its per-peer link lock serialises its threads); the target's
//! receive lock makes it the only consumer.
//!
//! An entry is an 8-byte header word (kind, a magic, and a length, or for a doorbell its
//! immediate) and its payload padded to 8 bytes; an entry never wraps: a pad entry fills the
//! end of the ring instead. A zero header means "nothing here yet". The producer writes the
//! payload, then the header with a release store; the consumer polls the header at its
//! position with an acquire load, copies the payload out into the caller's batch and moves its
//! private read position on; later, off the fast path (when idle, or every quarter of the
//! credits), it zeroes what it read and publishes its position (`head`) and the count of
//! entries it took (`released`, release) so the producer may reuse the space and the credits.
//! The producer keeps its own position (`tail`), its count of entries sent and its last view of
//! the consumer's words on a line only it touches, and reloads them (acquire) only when it
//! looks out of credit or room: in steady state a doorbell moves one cache line each way, as a
//! raw ping-pong does.
//!
//! Credits: at most [`RECV_CREDITS`] entries may be sent and not released. The ring holds that
//! many maximal entries plus one pad (a span shorter than the ring crosses its end at most
//! once), so a producer within its credits never finds the ring full.
//!
//! The consumer validates every header, so a damaged ring is an error naming the source, never
//! a panic or an out-of-range copy.
#![forbid(unsafe_code)]

use std::sync::atomic::Ordering;

use crate::sys::Mapping;
use crate::{IncomingBatch, MAX_MESSAGE_BYTES, NodeId, RECV_CREDITS};

const ENTRY_HEADER: usize = 8;

/// Payload bytes of one ring: room for every credit's maximal entry and one pad, rounded up
/// to a power of two so that positions wrap with a mask.
pub(crate) const RING_BYTES: usize =
    ((RECV_CREDITS + 1) * (ENTRY_HEADER + MAX_MESSAGE_BYTES)).next_power_of_two();

/// The ring's header: the consumer's `head` and `released` on one cache line; the producer's
/// `tail`, `sent` and its cached views of the consumer's words on another, which only the
/// producer touches.
const HEADER_BYTES: usize = 128;
const HEAD: usize = 0;
const RELEASED: usize = 8;
const TAIL: usize = 64;
const SENT: usize = 72;
const HEAD_SEEN: usize = 80;
const RELEASED_SEEN: usize = 88;

/// Bytes one ring occupies in an inbox.
pub(crate) const RING_STRIDE: usize = HEADER_BYTES + RING_BYTES;

const KIND_PAD: u64 = 1;
const KIND_DOORBELL: u64 = 2;
const KIND_MESSAGE: u64 = 3;
/// Bits 8..32 of every header: a zeroed or stale word is never taken for an entry.
const MAGIC: u64 = 0x5a_a55a << 8;

// Every entry size is a multiple of 8 and the ring one too, so a header never straddles the end.
const _: () = assert!(RING_BYTES % 8 == 0 && RING_BYTES.is_power_of_two());

/// Why a push did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The consumer holds every credit.
    NoCredit,
}

/// What a pop did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Popped {
    Empty,
    /// One entry moved into the batch.
    Taken,
    /// An entry is waiting but does not fit the batch.
    NoRoom,
}

/// The consumer's private position in one ring.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ReadPos {
    /// Byte position of the next entry.
    pub at: u64,
    /// Entries taken so far (what `released` will say once released).
    pub taken: u64,
    /// Where the ring starts in its mapping (fixed), so the poll's first look is one load.
    pub base: usize,
}

impl ReadPos {
    pub fn at_base(base: usize) -> ReadPos {
        ReadPos {
            at: 0,
            taken: 0,
            base,
        }
    }

    /// Whether an entry waits at this position of the ring in `map`: one load, the poll's
    /// fast path (the offset is masked into the ring, which `Ring::at` checked fits).
    #[inline]
    pub fn waiting(&self, map: &Mapping) -> bool {
        let offset = self.base + HEADER_BYTES + (self.at as usize & (RING_BYTES - 1));
        // Acquire: pairs with the producer's publication of the header.
        map.u64_at(offset).load(Ordering::Acquire) != 0
    }
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
    #[inline]
    pub fn at(map: &'a Mapping, base: usize) -> Ring<'a> {
        assert!(
            base + RING_STRIDE <= map.len(),
            "ring at {base} outside its inbox"
        );
        Ring { map, base }
    }

    #[inline]
    fn data(&self, pos: u64) -> usize {
        self.base + HEADER_BYTES + (pos & (RING_BYTES as u64 - 1)) as usize
    }

    /// Appends a doorbell.
    #[inline]
    pub fn push_doorbell(&self, imm: u32) -> Result<(), Refused> {
        // The immediate rides in the header's upper half: a doorbell is one 8-byte store.
        self.push(KIND_DOORBELL, imm, &[])
    }

    /// Appends a message (at most `MAX_MESSAGE_BYTES`).
    pub fn push_message(&self, data: &[u8]) -> Result<(), Refused> {
        assert!(
            data.len() <= MAX_MESSAGE_BYTES,
            "message checked before posting"
        );
        self.push(KIND_MESSAGE, data.len() as u32, data)
    }

    /// The producer's credits left (reloading the consumer's count).
    pub fn credits(&self) -> usize {
        let sent = self.map.u64_at(self.base + SENT).load(Ordering::Relaxed);
        // Acquire: pairs with the consumer's release of `released`.
        let released = self
            .map
            .u64_at(self.base + RELEASED)
            .load(Ordering::Acquire);
        self.map
            .u64_at(self.base + RELEASED_SEEN)
            .store(released, Ordering::Relaxed);
        RECV_CREDITS.saturating_sub(sent.wrapping_sub(released) as usize)
    }

    /// Whether the producer has a credit left (reloading the consumer's count only when it
    /// looks out of them).
    #[inline]
    pub fn has_credit(&self) -> bool {
        let sent = self.map.u64_at(self.base + SENT).load(Ordering::Relaxed);
        let seen_word = self.map.u64_at(self.base + RELEASED_SEEN);
        if sent - seen_word.load(Ordering::Relaxed) < RECV_CREDITS as u64 {
            return true;
        }
        // Acquire: pairs with the consumer's release of `released`.
        let released = self
            .map
            .u64_at(self.base + RELEASED)
            .load(Ordering::Acquire);
        seen_word.store(released, Ordering::Relaxed);
        sent.wrapping_sub(released) < RECV_CREDITS as u64
    }

    /// Appends an entry whose header carries `kind` and `upper` (a length, or an immediate).
    #[inline]
    fn push(&self, kind: u64, upper: u32, payload: &[u8]) -> Result<(), Refused> {
        if !self.has_credit() {
            return Err(Refused::NoCredit);
        }
        // Only this producer touches tail, sent and its views.
        let tail_word = self.map.u64_at(self.base + TAIL);
        let seen_word = self.map.u64_at(self.base + HEAD_SEEN);
        let mut tail = tail_word.load(Ordering::Relaxed);
        let size = padded(payload.len());
        let pos = (tail & (RING_BYTES as u64 - 1)) as usize;
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
            // Within the credits the ring cannot be full (see the module doc): only a consumer
            // that damaged its own words gets here, and it gets no more entries.
            if !fits(head) {
                return Err(Refused::NoCredit);
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
        // barrier before the producer's look at the consumer's armed word (see `notifier.rs`).
        self.header_word(tail)
            .swap(header(kind, upper), Ordering::SeqCst);
        tail_word.store(tail + size as u64, Ordering::Relaxed);
        let sent = self.map.u64_at(self.base + SENT);
        sent.store(sent.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        Ok(())
    }

    #[inline]
    fn header_word(&self, pos: u64) -> &'a std::sync::atomic::AtomicU64 {
        self.map.u64_at(self.data(pos))
    }

    fn head(&self) -> u64 {
        // Only this consumer writes head.
        self.map.u64_at(self.base + HEAD).load(Ordering::Relaxed)
    }

    /// Whether `read` is a position this consumer could hold (for checking it where it is not
    /// on the fast path).
    fn consistent(&self, read: &ReadPos) -> bool {
        read.at % 8 == 0 && read.at.wrapping_sub(self.head()) <= RING_BYTES as u64
    }

    /// Whether no entry is waiting at the consumer's read position (one load: the poll's
    /// fast path).
    #[inline]
    pub fn is_empty(&self, read: &ReadPos) -> bool {
        self.header_word(read.at).load(Ordering::Acquire) == 0
    }

    /// Entries taken but not yet released to the producer.
    pub fn unreleased(&self, read: &ReadPos) -> u64 {
        read.taken.wrapping_sub(
            self.map
                .u64_at(self.base + RELEASED)
                .load(Ordering::Relaxed),
        )
    }

    /// Moves the entry at the consumer's read position into `out` (as sent by `from`),
    /// advancing the position; `Err(reason)` when the ring is damaged. The space and the
    /// credit stay the consumer's until [`Ring::release`], so the zeroing that makes the space
    /// reusable stays off the fast path.
    #[inline]
    pub fn pop(
        &self,
        read: &mut ReadPos,
        from: NodeId,
        out: &mut IncomingBatch,
    ) -> Result<Popped, String> {
        loop {
            // The position is the consumer's own (never in shared memory), a multiple of 8 by
            // construction: only the header at it is peer-written and needs checking.
            let at = read.at;
            // Acquire: pairs with the producer's publication of the header; the payload is
            // whole.
            let h = self.header_word(at).load(Ordering::Acquire);
            if h == 0 {
                return Ok(Popped::Empty);
            }
            let kind = h & 0xff;
            let upper = (h >> 32) as u32;
            // A doorbell's upper half is its immediate; otherwise it is the payload length.
            let len = if kind == KIND_DOORBELL {
                0
            } else {
                upper as usize
            };
            let pos = (at & (RING_BYTES as u64 - 1)) as usize;
            let size = padded(len);
            let fits = h & 0xffff_ff00 == MAGIC && pos + size <= RING_BYTES;
            match kind {
                KIND_PAD if fits && pos + size == RING_BYTES => {
                    read.at = at + size as u64;
                    continue;
                }
                KIND_DOORBELL if fits => {
                    if !out.has_room(0) {
                        return Ok(Popped::NoRoom);
                    }
                    out.push_doorbell(from, upper);
                }
                KIND_MESSAGE if fits && len <= MAX_MESSAGE_BYTES => {
                    if !out.has_room(len) {
                        return Ok(Popped::NoRoom);
                    }
                    let start = self.data(at) + ENTRY_HEADER;
                    out.push_message_with(from, len, |buf| self.map.copy_out(start, buf));
                }
                _ => return Err(format!("bad ring entry at {at}: header {h:#018x}")),
            }
            read.at = at + size as u64;
            read.taken += 1;
            return Ok(Popped::Taken);
        }
    }

    /// Zeroes everything read up to the consumer's position (so no stale byte is ever taken
    /// for a header) and hands the space and the credits back to the producer.
    pub fn release(&self, read: &ReadPos) {
        assert!(self.consistent(read), "a ring read position went astray");
        let head = self.head();
        let len = read.at.wrapping_sub(head) as usize;
        if len == 0 || len > RING_BYTES {
            return;
        }
        let pos = (head & (RING_BYTES as u64 - 1)) as usize;
        let first = len.min(RING_BYTES - pos);
        self.map.fill_zero(self.data(head), first);
        if first < len {
            self.map.fill_zero(self.data(0), len - first);
        }
        // Release: the space was read and zeroed before the producer may reuse it.
        self.map
            .u64_at(self.base + HEAD)
            .store(read.at, Ordering::Release);
        // Release: pairs with the producer's acquire in `has_credit`.
        self.map
            .u64_at(self.base + RELEASED)
            .store(read.taken, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IncomingRef;
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

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum E {
        Doorbell(u32),
        Message(Vec<u8>),
    }

    fn pop_one(ring: &Ring<'_>, read: &mut ReadPos) -> Option<E> {
        let mut b = IncomingBatch::new(1);
        match ring.pop(read, NodeId(1), &mut b).unwrap() {
            Popped::Empty => None,
            Popped::NoRoom => panic!("an empty batch has room"),
            Popped::Taken => Some(match b.iter().next().unwrap() {
                IncomingRef::Doorbell { imm, .. } => E::Doorbell(imm),
                IncomingRef::Message { data, .. } => E::Message(data.to_vec()),
                IncomingRef::PeerDead { .. } => unreachable!(),
            }),
        }
    }

    #[test]
    fn entries_come_out_in_order_across_many_wraps_within_the_credits() {
        let map = ring_map();
        let ring = Ring::at(&map, 0);
        let mut expected = std::collections::VecDeque::new();
        let mut read = ReadPos::at_base(0);
        for i in 0..20_000u32 {
            let e = if i % 3 == 0 {
                E::Doorbell(i)
            } else {
                E::Message(vec![i as u8; (i as usize * 7) % MAX_MESSAGE_BYTES])
            };
            let pushed = match &e {
                E::Doorbell(imm) => ring.push_doorbell(*imm),
                E::Message(m) => ring.push_message(m),
            };
            match pushed {
                Ok(()) => expected.push_back(e),
                Err(Refused::NoCredit) => {
                    assert_eq!(expected.len(), RECV_CREDITS);
                    for _ in 0..expected.len() / 2 {
                        assert_eq!(pop_one(&ring, &mut read), expected.pop_front());
                    }
                    ring.release(&read);
                }
            }
        }
        while let Some(e) = expected.pop_front() {
            assert_eq!(pop_one(&ring, &mut read), Some(e));
        }
        assert_eq!(pop_one(&ring, &mut read), None);
        assert!(ring.is_empty(&read));
    }

    #[test]
    fn credits_run_out_until_the_consumer_releases() {
        let map = ring_map();
        let ring = Ring::at(&map, 0);
        let big = vec![1u8; MAX_MESSAGE_BYTES];
        for _ in 0..RECV_CREDITS {
            ring.push_message(&big).unwrap();
        }
        assert_eq!(ring.push_doorbell(1), Err(Refused::NoCredit));
        let mut read = ReadPos::at_base(0);
        assert_eq!(pop_one(&ring, &mut read), Some(E::Message(big.clone())));
        // Read but not released: still no credit.
        assert_eq!(ring.unreleased(&read), 1);
        assert_eq!(ring.push_doorbell(1), Err(Refused::NoCredit));
        ring.release(&read);
        ring.push_doorbell(1).unwrap();
    }

    #[test]
    fn an_entry_that_does_not_fit_the_batch_stays_for_the_next_poll() {
        let map = ring_map();
        let ring = Ring::at(&map, 0);
        ring.push_doorbell(1).unwrap();
        ring.push_doorbell(2).unwrap();
        let mut b = IncomingBatch::new(1);
        let mut read = ReadPos::at_base(0);
        assert_eq!(
            ring.pop(&mut read, NodeId(0), &mut b).unwrap(),
            Popped::Taken
        );
        assert_eq!(
            ring.pop(&mut read, NodeId(0), &mut b).unwrap(),
            Popped::NoRoom
        );
        assert_eq!(pop_one(&ring, &mut read), Some(E::Doorbell(2)));
    }

    #[test]
    fn a_damaged_header_is_an_error_not_a_panic() {
        let map = ring_map();
        let ring = Ring::at(&map, 0);
        let mut b = IncomingBatch::new(4);
        ring.push_doorbell(1).unwrap();
        map.copy_in(HEADER_BYTES + 1, &[0xee]);
        assert!(
            ring.pop(&mut ReadPos::at_base(0), NodeId(0), &mut b)
                .is_err()
        );
        map.u64_at(HEADER_BYTES).store(u64::MAX, Ordering::Release);
        assert!(
            ring.pop(&mut ReadPos::at_base(0), NodeId(0), &mut b)
                .is_err()
        );
        map.u64_at(HEADER_BYTES)
            .store(header(KIND_MESSAGE, u32::MAX), Ordering::Release);
        assert!(
            ring.pop(&mut ReadPos::at_base(0), NodeId(0), &mut b)
                .is_err()
        );
        let header = map.u64_at(HEADER_BYTES).load(Ordering::Relaxed);
        assert_ne!(header, 0);
    }
}
