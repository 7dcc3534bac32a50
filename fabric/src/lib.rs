//! How bytes move between vsmp nodes.
//!
//! The model is RDMA verbs over reliable-connected queue pairs (see `docs/fabric.md`, the
//! contract every backend honours): each node registers memory *regions* (memfds: its guest
//! RAM replica, its logs, or fresh memory) and grants peers access to ranges of them; a peer
//! writes into them one-sidedly *from its own registered memory* (or a few inline bytes),
//! rings *doorbells* (a write with a 32-bit immediate, delivered to the target only after the
//! data is visible), performs a `fetch_add` on a 64-bit word, and exchanges small two-sided
//! control messages. Doorbells and messages consume *receive credits*.
//!
//! Nothing on the data path blocks: posts return at once (or `WouldBlock` when a window is
//! full), completions and incoming items are polled into caller storage without allocating,
//! and a notifier file descriptor lets the caller's event loop sleep on the fabric beside
//! other descriptors. The blocking [`Fabric::wait`] and [`Fabric::recv`] are conveniences
//! built on those calls.
//!
//! Ordering: operations from one node to one peer take effect at the peer in the order they
//! were posted; there is no order across peers. Visibility: when an operation completes at the
//! source, its effect is visible at the target.
//!
//! The crate knows nothing of pages, guests or ptrace.
//!
//! Backends: [`sim`] (one process, deterministic: tick-driven and seeded), [`shm`] (nodes on
//! one host), [`tcp`] (everywhere); [`delay::Delayed`] injects latency over any of them. A
//! verbs backend follows on the same contract.
//!
//! Shared pieces, one of each: argument checks (`checks.rs`), work-request ids
//! (`wr_code.rs`), the completion queue (`cq.rs`), the notifier (`notifier.rs`), the
//! rendezvous that forms a group (`rendezvous.rs`), authentication (`auth.rs`).
//!
//! `unsafe` is confined to `sys.rs`, each block with a `// SAFETY:` comment; the rest of the
//! crate may not use it.
#![deny(unsafe_code)]

pub mod auth;
mod checks;
mod config;
pub mod conformance;
mod cq;
pub mod delay;
mod error;
mod inbound;
mod join;
mod memory;
mod notifier;
pub mod rendezvous;
pub mod shm;
pub mod sim;
#[allow(unsafe_code)] // The one module that may: every block has a SAFETY comment.
mod sys;
pub mod tcp;
mod types;
mod wire;
mod wr_code;

pub use config::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT, GroupConfig, MIN_SECRET_BYTES, SECRET_ENV,
    Secret,
};
pub use error::{DeathCause, FabricError, Resource, Waiting};
pub use join::{Backend, Pending, join, listen};
pub use memory::Memory;
pub use types::{
    Completion, Grant, Incoming, IncomingBatch, IncomingRef, LocalSlice, NodeId, RegionId,
    RegionSpec, RemoteAddr, Signal, Source, Status, WrId,
};

use std::cell::RefCell;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

/// The largest control message (and so each receive buffer a verbs target posts).
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// The most bytes a write may carry inline ([`Source::Inline`]).
pub const MAX_INLINE_BYTES: usize = 256;

/// Operations to one peer that may be in flight or have a completion not yet taken.
pub const SEND_WINDOW: usize = 256;

/// Completions an endpoint may owe in all (in flight or waiting to be taken): the size of a
/// verbs send completion queue.
pub const COMPLETION_QUEUE_DEPTH: usize = 4096;

/// Doorbells and messages from one source that a target may hold before it polls them: the
/// receives a verbs target keeps posted for each peer. A source without credit gets
/// `WouldBlock`; the target returns credit as it polls.
pub const RECV_CREDITS: usize = 64;

/// One node's endpoint in a group of `nodes()` nodes.
///
/// Every node of a group registers the same set of regions (same ids, lengths and grants:
/// the "symmetric" layout SHMEM uses), fixed when the endpoint is built; grants say which peer
/// may write where. An endpoint is shared between threads (`Send + Sync`).
pub trait Fabric: Send + Sync {
    /// This node's rank, `0..nodes()`.
    fn rank(&self) -> NodeId;

    /// How many nodes the group has.
    fn nodes(&self) -> usize;

    /// This node's own memory of a registered region.
    fn memory(&self, region: RegionId) -> Result<&Memory, FabricError>;

    /// Posts a one-sided write of `src`'s bytes to `dst` in `peer`'s region; with `imm`, a
    /// doorbell delivered to `peer` once the bytes are visible there (consuming one of its
    /// receive credits). Bytes from a [`Source::Region`] must stay unchanged until the write
    /// completes.
    fn post_write(
        &self,
        peer: NodeId,
        dst: RemoteAddr,
        src: Source<'_>,
        imm: Option<u32>,
        signal: Signal,
    ) -> Result<WrId, FabricError>;

    /// Posts an atomic add of `add` to the little-endian 64-bit word at `dst` (8-byte aligned)
    /// in `peer`'s region; the completion (always signalled) carries the word's previous value.
    fn post_fetch_add(&self, peer: NodeId, dst: RemoteAddr, add: u64) -> Result<WrId, FabricError>;

    /// How many more doorbells and messages this node may post to `peer` now: its receive
    /// credits left there (they come back as `peer` polls).
    fn credits(&self, peer: NodeId) -> Result<usize, FabricError>;

    /// Posts a control message to `peer` (at most [`MAX_MESSAGE_BYTES`], copied at posting;
    /// consumes one receive credit).
    fn post_send(&self, peer: NodeId, msg: &[u8], signal: Signal) -> Result<WrId, FabricError>;

    /// Moves up to `out.len()` completions into `out`, oldest first; how many. Never blocks
    /// nor allocates.
    fn poll_completions(&self, out: &mut [Completion]) -> usize;

    /// Takes the completion of the signalled operation `wr` if it has completed (`Ok(None)`
    /// while it is in flight; `UnknownWr` if it is not pending). Never blocks.
    fn poll_completion(&self, wr: WrId) -> Result<Option<Completion>, FabricError>;

    /// Appends the doorbells, messages and deaths that arrived (as many as fit `out`); how
    /// many. Items from one peer come in posting order; a peer's death comes once, after
    /// everything it delivered. Never blocks nor allocates.
    fn poll_incoming(&self, out: &mut IncomingBatch) -> usize;

    /// A file descriptor that becomes readable when a completion or an incoming item arrives
    /// after [`Fabric::arm_notifier`], for `poll`/`epoll` beside other descriptors.
    fn notifier(&self) -> BorrowedFd<'_>;

    /// Asks the notifier to fire on the next arrival. Poll once more after arming and sleep
    /// only if that poll found nothing: an item that arrived just before arming does not fire.
    fn arm_notifier(&self);

    /// How long the blocking calls spin before they sleep on the notifier: a backend whose
    /// polls are memory reads (shm) spins; one whose polls are system calls does not.
    fn spin_before_sleep(&self) -> Duration {
        Duration::ZERO
    }

    /// Waits until the signalled operation `wr` completes, at most `timeout`; its completion,
    /// or its failure as an error (`AccessDenied`, `PeerDead`).
    fn wait(&self, wr: WrId, timeout: Duration) -> Result<Completion, FabricError> {
        let found = block_on(self, timeout, || self.poll_completion(wr))?;
        match found {
            Some(c) => c.result().map(|_| c),
            None => Err(FabricError::Timeout {
                waiting_for: Waiting::Completion(wr),
                waited: timeout,
            }),
        }
    }

    /// The next doorbell or message for this node, waiting at most `timeout` (`Ok(None)` when
    /// it passed); `Err(PeerDead)` once per dead peer.
    fn recv(&self, timeout: Duration) -> Result<Option<Incoming>, FabricError> {
        RECV_BATCH.with(|b| {
            let mut batch = b.borrow_mut();
            block_on(self, timeout, || {
                batch.clear();
                if self.poll_incoming(&mut batch) == 0 {
                    return Ok(None);
                }
                let item = batch.iter().next().map(|i| i.to_owned());
                item.transpose()
            })
        })
    }
}

impl std::fmt::Debug for dyn Fabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fabric({} of {})", self.rank(), self.nodes())
    }
}

thread_local! {
    /// `recv`'s one-item batch, kept per thread so `recv` allocates only the item it returns.
    static RECV_BATCH: RefCell<IncomingBatch> = RefCell::new(IncomingBatch::new(1));
}

/// The longest single sleep of a blocking call: timeouts and deaths are looked at this often.
const MAX_SLEEP: Duration = Duration::from_millis(50);

/// Polls with `attempt` until it yields, spinning for `ep.spin_before_sleep()` and then
/// sleeping on the notifier (arm, poll again, sleep); `Ok(None)` after `timeout`.
pub fn block_on<F, T>(
    ep: &F,
    timeout: Duration,
    mut attempt: impl FnMut() -> Result<Option<T>, FabricError>,
) -> Result<Option<T>, FabricError>
where
    F: Fabric + ?Sized,
{
    if let Some(v) = attempt()? {
        return Ok(Some(v));
    }
    let start = Instant::now();
    let spin = ep.spin_before_sleep();
    loop {
        // Poll a batch before looking at the clock: an answer is noticed within one poll.
        for _ in 0..64 {
            if let Some(v) = attempt()? {
                return Ok(Some(v));
            }
            if spin.is_zero() {
                break;
            }
            std::hint::spin_loop();
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Ok(None);
        }
        if waited < spin {
            continue;
        }
        ep.arm_notifier();
        if let Some(v) = attempt()? {
            return Ok(Some(v));
        }
        sleep_on(ep.notifier(), (timeout - waited).min(MAX_SLEEP));
    }
}

/// Sleeps until `fd` is readable or `timeout` passed (interruptions end the sleep early).
pub fn sleep_on(fd: BorrowedFd<'_>, timeout: Duration) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    // Rounded up, so a short timeout does not become a busy loop.
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let _ = poll(
        &mut fds,
        PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
    );
}
