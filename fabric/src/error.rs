//! What can go wrong on the fabric. Variants are named after the operation that failed.

use crate::{NodeId, RegionId, WrId};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    #[error("{peer} is dead: {reason}")]
    PeerDead { peer: NodeId, reason: String },
    #[error(
        "{peer} refused access to {region} at offset {offset} ({len} bytes): outside its grants"
    )]
    AccessDenied {
        peer: NodeId,
        region: RegionId,
        offset: u64,
        len: u64,
    },
    #[error("{region} is not registered")]
    UnknownRegion { region: RegionId },
    #[error("{peer} is not in this group of {nodes} nodes")]
    UnknownPeer { peer: NodeId, nodes: usize },
    #[error("offset {offset} (+{len} bytes) is outside {region} of {region_len} bytes")]
    OutOfBounds {
        region: RegionId,
        offset: u64,
        len: u64,
        region_len: usize,
    },
    #[error("fetch_add target offset {offset} is not 8-byte aligned")]
    Misaligned { offset: u64 },
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    MessageTooLarge { len: usize, max: usize },
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout { what: String, waited: Duration },
    #[error("work request {wr:?} was never posted on this endpoint, or was already reaped")]
    UnknownWr { wr: WrId },
    #[error("handshake with {peer} failed: {reason}")]
    Handshake { peer: String, reason: String },
    #[error("malformed frame from {peer}: {reason}")]
    Protocol { peer: String, reason: String },
    #[error("{op} failed")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bad fabric configuration: {0}")]
    Config(String),
}
