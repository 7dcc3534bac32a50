//! What can go wrong on the fabric. Variants are named after what failed; the ones the data
//! path can return carry no `String`, so reporting them neither formats nor allocates (the
//! text is made only when an error is displayed). Strings appear only in errors of setting up
//! a group (the bootstrap, configuration, system calls made once).

use std::fmt;
use std::time::Duration;

use crate::{NodeId, RegionId, WrId};

#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    #[error("{peer} is dead: {cause}")]
    PeerDead { peer: NodeId, cause: DeathCause },
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
        region_len: u64,
    },
    #[error("fetch_add target offset {offset} is not 8-byte aligned")]
    Misaligned { offset: u64 },
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    MessageTooLarge { len: usize, max: usize },
    #[error("inline write of {len} bytes exceeds the {max}-byte limit (write from a region)")]
    InlineTooLarge { len: usize, max: usize },
    #[error("cannot post to {peer} now: {resource}")]
    WouldBlock { peer: NodeId, resource: Resource },
    #[error("timed out after {waited:?} waiting for {waiting_for}")]
    Timeout {
        waiting_for: Waiting,
        waited: Duration,
    },
    #[error(
        "work request {wr:?} is not pending on this endpoint (never posted, unsignalled, or its completion was already taken)"
    )]
    UnknownWr { wr: WrId },
    #[error("this endpoint is closed")]
    Closed,
    #[error("handshake with {peer} failed: {reason}")]
    Handshake { peer: String, reason: String },
    #[error("malformed message from {peer}: {reason}")]
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

/// Why a peer is considered dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathCause {
    /// Nothing was heard from it (heartbeats included) for the heartbeat timeout: killed,
    /// stopped, or cut off.
    Silent,
    /// Its connection ended (it exited, closed its endpoint, or was killed).
    Closed,
    /// Its connection failed with this error.
    ConnectionFailed(std::io::ErrorKind),
    /// It sent something malformed (logged in detail where it was found); it is cut off.
    Protocol,
    /// The simulator killed it.
    Killed,
}

impl fmt::Display for DeathCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeathCause::Silent => write!(f, "silent past the heartbeat timeout"),
            DeathCause::Closed => write!(f, "its connection ended"),
            DeathCause::ConnectionFailed(kind) => write!(f, "its connection failed ({kind})"),
            DeathCause::Protocol => write!(f, "it broke the wire protocol and was cut off"),
            DeathCause::Killed => write!(f, "killed"),
        }
    }
}

/// What a post that would block is short of (see `docs/fabric.md`, flow control).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// [`crate::SEND_WINDOW`] operations to this peer are in flight or their completions
    /// not yet taken: poll completions.
    SendWindow,
    /// [`crate::COMPLETION_QUEUE_DEPTH`] completions are owed in all: poll completions.
    CompletionQueue,
    /// The peer holds [`crate::RECV_CREDITS`] of our doorbells and messages it has not
    /// polled yet: it returns credits as it polls.
    ReceiveCredits,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::SendWindow => write!(
                f,
                "its send window of {} operations is full (take completions)",
                crate::SEND_WINDOW
            ),
            Resource::CompletionQueue => write!(
                f,
                "the completion queue of {} entries is full (take completions)",
                crate::COMPLETION_QUEUE_DEPTH
            ),
            Resource::ReceiveCredits => write!(
                f,
                "it holds {} unread doorbells and messages from us (no receive credit left)",
                crate::RECV_CREDITS
            ),
        }
    }
}

/// What a blocking call waited for when it timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// The completion of this work request.
    Completion(WrId),
    /// Room to post to a peer (a window or credits).
    Room(NodeId),
    /// The group to form.
    Join,
}

impl fmt::Display for Waiting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Waiting::Completion(wr) => write!(f, "the completion of {wr:?}"),
            Waiting::Room(peer) => write!(f, "room to post to {peer}"),
            Waiting::Join => write!(f, "the group to form"),
        }
    }
}

impl FabricError {
    /// The error of a failed system call made while setting up.
    pub(crate) fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> FabricError {
        let op = op.into();
        move |source| FabricError::Io { op, source }
    }
}
