//! The nouns of the fabric contract.

use std::fmt;
use std::ops::Range;

/// A node's rank in its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u16);

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

/// Identifies a posted operation at its source; unique and increasing per endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WrId(pub u64);

/// Who may write where in a region. A write from a peer outside every grant is refused at the
/// target and reported to the writer as [`crate::FabricError::AccessDenied`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The peer granted, or every peer.
    pub peer: Option<NodeId>,
    pub range: Range<u64>,
}

/// A region every node of the group registers.
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

/// A finished operation at its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub wr: WrId,
    pub peer: NodeId,
    /// For `fetch_add`, the word's value before the add.
    pub fetched: Option<u64>,
}

/// Something a peer sent to this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A `write_imm` whose data is now visible here.
    Doorbell { from: NodeId, imm: u32 },
    /// A control message.
    Message { from: NodeId, data: Vec<u8> },
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
}
