//! How bytes move between vsmp nodes.
//!
//! The model is RDMA verbs over reliable-connected queue pairs (see `docs/fabric.md`, the
//! contract every backend honours): each node registers memory *regions* and grants peers
//! access to ranges of them; a peer writes into them one-sidedly, rings *doorbells* (a write
//! with a 32-bit immediate, delivered to the target only after the data is visible), performs a
//! `fetch_add` on a 64-bit word, and exchanges small two-sided control messages.
//!
//! Ordering: operations from one node to one peer take effect at the peer in the order they
//! were posted; there is no order across peers. Visibility: when an operation completes at the
//! source, its effect is visible at the target.
//!
//! The crate knows nothing of pages, guests or ptrace.
//!
//! Backends: [`sim`] (in-process, seeded, models exactly the contract), [`shm`] (nodes on one
//! host), [`tcp`] (everywhere). A verbs backend follows on the same contract.
//!
//! `unsafe` is confined to the backends' `sys` modules (`shm/sys.rs`, `tcp/sys.rs`), each
//! block with a `// SAFETY:` comment; the rest of the crate may not use it.
#![deny(unsafe_code)]

pub mod auth;
pub mod bootstrap;
mod checks;
mod config;
pub mod conformance;
mod error;
pub mod shm;
pub mod sim;
pub mod tcp;
mod types;
mod wire;
mod wr_code;

pub use config::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT, GroupConfig, MIN_SECRET_BYTES, SECRET_ENV,
    Secret,
};
pub use error::FabricError;
pub use types::{Completion, Grant, Incoming, NodeId, RegionId, RegionSpec, RemoteAddr, WrId};

use std::time::Duration;

/// One node's endpoint in a group of `nodes()` nodes.
///
/// Every node of a group registers the same set of regions (same ids and lengths, the
/// "symmetric" layout SHMEM uses), fixed when the endpoint is built; grants say which peer may
/// write where. Posting copies the caller's bytes before it returns, so the slice may be reused
/// at once. An endpoint is shared between threads (`Send + Sync`): typically the monitor thread
/// posts and waits, and a receiver thread takes doorbells and messages.
pub trait Fabric: Send + Sync {
    /// This node's rank, `0..nodes()`.
    fn rank(&self) -> NodeId;

    /// How many nodes the group has.
    fn nodes(&self) -> usize;

    /// This node's own copy of a registered region.
    fn region(&self, id: RegionId) -> Result<&dyn LocalRegion, FabricError>;

    /// Posts a one-sided write of `data` to `dst` in `peer`'s region.
    fn post_write(&self, peer: NodeId, dst: RemoteAddr, data: &[u8]) -> Result<WrId, FabricError>;

    /// Posts a write that, once `data` is visible at `peer`, delivers `imm` to `peer` as an
    /// [`Incoming::Doorbell`]. `data` may be empty (a bare doorbell).
    fn post_write_imm(
        &self,
        peer: NodeId,
        dst: RemoteAddr,
        data: &[u8],
        imm: u32,
    ) -> Result<WrId, FabricError>;

    /// Posts an atomic add of `add` to the little-endian 64-bit word at `dst` (8-byte aligned)
    /// in `peer`'s region; the completion carries the word's previous value.
    fn post_fetch_add(&self, peer: NodeId, dst: RemoteAddr, add: u64) -> Result<WrId, FabricError>;

    /// Posts a small two-sided control message to `peer` (at most [`MAX_MESSAGE_BYTES`]).
    fn post_send(&self, peer: NodeId, msg: &[u8]) -> Result<WrId, FabricError>;

    /// Waits until `wr` has completed (its effect visible at the target), for at most
    /// `timeout`. Completing `wr` implies every earlier operation to the same peer completed.
    fn wait(&self, wr: WrId, timeout: Duration) -> Result<Completion, FabricError>;

    /// The next doorbell or control message addressed to this node, waiting at most `timeout`
    /// (`Ok(None)` when it passed). Incoming items from one peer arrive in posting order.
    fn recv(&self, timeout: Duration) -> Result<Option<Incoming>, FabricError>;
}

/// The largest control message a backend must carry.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// This node's view of one of its own registered regions. Peers write into it concurrently,
/// so every access is a copy (never a Rust reference into the bytes), and the 64-bit words that
/// `fetch_add` targets are reached atomically.
pub trait LocalRegion: Send + Sync {
    /// The region's length in bytes.
    fn len(&self) -> usize;

    /// Whether the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `buf.len()` bytes at `offset` out of the region.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), FabricError>;

    /// Copies `data` into the region at `offset` (a local store, visible to peers only through
    /// their own reads of nothing: regions are written remotely, read locally).
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), FabricError>;

    /// Atomically loads the 64-bit word at `offset` (8-byte aligned) with acquire ordering,
    /// pairing with the release a remote write or `fetch_add` performs.
    fn load_u64(&self, offset: u64) -> Result<u64, FabricError>;
}
