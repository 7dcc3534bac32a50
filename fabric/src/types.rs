//! The nouns of the fabric contract.

use std::fmt;
use std::ops::Range;

use crate::{DeathCause, FabricError, MAX_MESSAGE_BYTES};

/// A node's rank in its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u16);

impl NodeId {
    /// The rank as an index into per-node tables.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {}", self.0)
    }
}

/// Names a registered region; the same id names the same-shaped region on every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionId(pub u32);

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "region {}", self.0)
    }
}

/// A byte offset inside a peer's region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteAddr {
    pub region: RegionId,
    pub offset: u64,
}

impl RemoteAddr {
    pub fn new(region: RegionId, offset: u64) -> RemoteAddr {
        RemoteAddr { region, offset }
    }
}

/// Bytes of one of this node's own registered regions: the source of a one-sided write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LocalSlice {
    pub region: RegionId,
    pub offset: u64,
    pub len: u64,
}

impl LocalSlice {
    pub fn new(region: RegionId, offset: u64, len: u64) -> LocalSlice {
        LocalSlice {
            region,
            offset,
            len,
        }
    }
}

/// Where a one-sided write takes its bytes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source<'a> {
    /// Registered memory of this node, read by the backend when it carries out the write
    /// (zero-copy: verbs from the memory region, shm one copy into the peer's mapping, tcp a
    /// vectored send from the mapping). The bytes must not change until the write completes.
    Region(LocalSlice),
    /// A few bytes copied at posting (at most [`crate::MAX_INLINE_BYTES`]), like verbs'
    /// inline sends; the slice may be reused as soon as the post returns.
    Inline(&'a [u8]),
    /// No bytes: with an immediate, a bare doorbell.
    Empty,
}

impl Source<'_> {
    /// Bytes the write carries.
    pub fn len(&self) -> u64 {
        match self {
            Source::Region(s) => s.len,
            Source::Inline(b) => b.len() as u64,
            Source::Empty => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether a posted operation reports its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A [`Completion`] is queued for `poll_completions` (and `wait`) when it completes.
    Always,
    /// Only a failure is reported; success completes silently (verbs' selective
    /// signalling). Completion order per peer still holds: a later signalled completion
    /// implies this one took effect.
    OnError,
}

/// Identifies a posted operation at its source; unique and increasing per endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WrId(pub u64);

/// Who may write where in a region. A write from a peer outside every grant is refused and
/// reported to the writer as [`crate::FabricError::AccessDenied`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The peer granted, or every peer.
    pub peer: Option<NodeId>,
    pub range: Range<u64>,
}

/// A region every node of the group registers: the *symmetric* layout (same ids, lengths and
/// grants on every node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionSpec {
    pub id: RegionId,
    pub len: usize,
    pub grants: Vec<Grant>,
}

impl RegionSpec {
    /// A region every peer may write anywhere in.
    pub fn open(id: RegionId, len: usize) -> RegionSpec {
        RegionSpec {
            id,
            len,
            grants: vec![Grant {
                peer: None,
                range: 0..len as u64,
            }],
        }
    }

    /// A region no peer may write (a node's private source buffer).
    pub fn private(id: RegionId, len: usize) -> RegionSpec {
        RegionSpec {
            id,
            len,
            grants: Vec::new(),
        }
    }

    /// Whether `peer` may write `len` bytes at `offset`.
    pub fn permits(&self, peer: NodeId, offset: u64, len: u64) -> bool {
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        end <= self.len as u64
            && self.grants.iter().any(|g| {
                g.peer.is_none_or(|p| p == peer) && g.range.start <= offset && end <= g.range.end
            })
    }
}

/// How a completed operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The effect is visible at the target.
    Done,
    /// A `fetch_add` took effect; the word's value before it.
    Fetched(u64),
    /// The target refused it: outside the writer's grants. Nothing changed there.
    Denied {
        region: RegionId,
        offset: u64,
        len: u64,
    },
    /// The peer died before the operation completed; it may or may not have taken effect.
    PeerDead(DeathCause),
}

/// A finished operation at its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub wr: WrId,
    pub peer: NodeId,
    pub status: Status,
}

impl Completion {
    /// A placeholder, for filling the caller's completion arrays.
    pub const EMPTY: Completion = Completion {
        wr: WrId(0),
        peer: NodeId(0),
        status: Status::Done,
    };

    /// Whether the operation succeeded.
    pub fn is_ok(&self) -> bool {
        matches!(self.status, Status::Done | Status::Fetched(_))
    }

    /// The outcome as a `Result`: the fetched value of a `fetch_add`, `None` for other
    /// successes, the contract's error for a failure.
    pub fn result(&self) -> Result<Option<u64>, FabricError> {
        match self.status {
            Status::Done => Ok(None),
            Status::Fetched(v) => Ok(Some(v)),
            Status::Denied {
                region,
                offset,
                len,
            } => Err(FabricError::AccessDenied {
                peer: self.peer,
                region,
                offset,
                len,
            }),
            Status::PeerDead(cause) => Err(FabricError::PeerDead {
                peer: self.peer,
                cause,
            }),
        }
    }
}

/// Something a peer sent to this node, owned (what the blocking [`crate::Fabric::recv`]
/// returns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A `write` with an immediate whose data is now visible here.
    Doorbell { from: NodeId, imm: u32 },
    /// A control message.
    Message { from: NodeId, data: Vec<u8> },
}

/// One item of an [`IncomingBatch`], borrowing the batch's storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncomingRef<'a> {
    /// A `write` with an immediate whose data is now visible here.
    Doorbell { from: NodeId, imm: u32 },
    /// A control message.
    Message { from: NodeId, data: &'a [u8] },
    /// `peer` died; reported once, after everything it delivered before dying.
    PeerDead { peer: NodeId, cause: DeathCause },
}

impl IncomingRef<'_> {
    /// The item as an owned value (`Err` for a death).
    pub fn to_owned(&self) -> Result<Incoming, FabricError> {
        match *self {
            IncomingRef::Doorbell { from, imm } => Ok(Incoming::Doorbell { from, imm }),
            IncomingRef::Message { from, data } => Ok(Incoming::Message {
                from,
                data: data.to_vec(),
            }),
            IncomingRef::PeerDead { peer, cause } => Err(FabricError::PeerDead { peer, cause }),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    Doorbell {
        from: NodeId,
        imm: u32,
    },
    Message {
        from: NodeId,
        start: usize,
        len: usize,
    },
    PeerDead {
        peer: NodeId,
        cause: DeathCause,
    },
}

/// Caller-owned storage that [`crate::Fabric::poll_incoming`] fills with doorbells, messages
/// (their bytes copied into the batch) and deaths, without allocating: its capacity is fixed
/// when it is made. Clear it between polls.
#[derive(Debug)]
pub struct IncomingBatch {
    slots: Vec<Slot>,
    bytes: Vec<u8>,
    max_items: usize,
    max_bytes: usize,
}

impl IncomingBatch {
    /// Room for `max_items` items (at least 1) and for message bytes of at least one maximal
    /// message.
    pub fn new(max_items: usize) -> IncomingBatch {
        IncomingBatch::with_capacity(max_items, MAX_MESSAGE_BYTES)
    }

    /// Room for `max_items` items (at least 1) and `max_bytes` bytes of messages (at least
    /// [`MAX_MESSAGE_BYTES`], so any message fits an empty batch).
    pub fn with_capacity(max_items: usize, max_bytes: usize) -> IncomingBatch {
        let max_items = max_items.max(1);
        let max_bytes = max_bytes.max(MAX_MESSAGE_BYTES);
        IncomingBatch {
            slots: Vec::with_capacity(max_items),
            bytes: Vec::with_capacity(max_bytes),
            max_items,
            max_bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Empties the batch, keeping its storage.
    pub fn clear(&mut self) {
        self.slots.clear();
        self.bytes.clear();
    }

    /// The items, in the order they were received.
    pub fn iter(&self) -> impl Iterator<Item = IncomingRef<'_>> + '_ {
        self.slots.iter().map(|s| match *s {
            Slot::Doorbell { from, imm } => IncomingRef::Doorbell { from, imm },
            Slot::Message { from, start, len } => IncomingRef::Message {
                from,
                data: &self.bytes[start..start + len],
            },
            Slot::PeerDead { peer, cause } => IncomingRef::PeerDead { peer, cause },
        })
    }

    /// Whether one more item carrying `message_len` bytes (0 for a doorbell or death) fits.
    pub fn has_room(&self, message_len: usize) -> bool {
        self.slots.len() < self.max_items && self.bytes.len() + message_len <= self.max_bytes
    }

    /// Appends a doorbell; callers checked `has_room(0)`.
    pub(crate) fn push_doorbell(&mut self, from: NodeId, imm: u32) {
        debug_assert!(self.has_room(0));
        self.slots.push(Slot::Doorbell { from, imm });
    }

    /// Appends a message, filled by `fill` with exactly `len` bytes; callers checked
    /// `has_room(len)`.
    pub(crate) fn push_message_with(
        &mut self,
        from: NodeId,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) {
        debug_assert!(self.has_room(len));
        let start = self.bytes.len();
        self.bytes.resize(start + len, 0);
        fill(&mut self.bytes[start..]);
        self.slots.push(Slot::Message { from, start, len });
    }

    /// Appends a message copied from `data`; callers checked `has_room(data.len())`.
    pub(crate) fn push_message(&mut self, from: NodeId, data: &[u8]) {
        self.push_message_with(from, data.len(), |b| b.copy_from_slice(data));
    }

    /// Appends a death; callers checked `has_room(0)`.
    pub(crate) fn push_dead(&mut self, peer: NodeId, cause: DeathCause) {
        debug_assert!(self.has_room(0));
        self.slots.push(Slot::PeerDead { peer, cause });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_region_permits_every_peer_inside_and_nothing_past_the_end() {
        let spec = RegionSpec::open(RegionId(1), 4096);
        assert!(spec.permits(NodeId(3), 0, 4096));
        assert!(!spec.permits(NodeId(3), 4095, 2));
        assert!(!spec.permits(NodeId(3), u64::MAX, 2));
    }

    #[test]
    fn a_grant_to_one_peer_refuses_the_others() {
        let spec = RegionSpec {
            id: RegionId(1),
            len: 4096,
            grants: vec![Grant {
                peer: Some(NodeId(1)),
                range: 1024..2048,
            }],
        };
        assert!(spec.permits(NodeId(1), 1024, 1024));
        assert!(!spec.permits(NodeId(1), 1000, 100));
        assert!(!spec.permits(NodeId(2), 1024, 8));
    }

    #[test]
    fn a_private_region_permits_nobody() {
        assert!(!RegionSpec::private(RegionId(1), 64).permits(NodeId(0), 0, 1));
    }

    #[test]
    fn a_batch_keeps_items_in_order_and_stops_at_its_capacity() {
        let mut b = IncomingBatch::with_capacity(3, MAX_MESSAGE_BYTES);
        b.push_doorbell(NodeId(1), 7);
        b.push_message(NodeId(2), b"hi");
        b.push_dead(NodeId(3), DeathCause::Silent);
        assert!(!b.has_room(0));
        let items: Vec<_> = b.iter().collect();
        assert_eq!(
            items,
            vec![
                IncomingRef::Doorbell {
                    from: NodeId(1),
                    imm: 7
                },
                IncomingRef::Message {
                    from: NodeId(2),
                    data: b"hi"
                },
                IncomingRef::PeerDead {
                    peer: NodeId(3),
                    cause: DeathCause::Silent
                },
            ]
        );
        b.clear();
        assert!(b.is_empty() && b.has_room(MAX_MESSAGE_BYTES));
        assert!(!b.has_room(MAX_MESSAGE_BYTES + 1));
    }

    #[test]
    fn a_completion_result_names_the_failure() {
        let c = Completion {
            wr: WrId(9),
            peer: NodeId(2),
            status: Status::Denied {
                region: RegionId(3),
                offset: 8,
                len: 4,
            },
        };
        assert!(!c.is_ok());
        let e = c.result().unwrap_err();
        assert!(e.to_string().contains("node 2"), "{e}");
        let f = Completion {
            status: Status::Fetched(41),
            ..c
        };
        assert_eq!(f.result().unwrap(), Some(41));
    }
}
