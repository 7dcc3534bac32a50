//! The shm backend: the nodes of a group are processes on one host that map each other's
//! memory.
//!
//! Every node has one memfd per registered region (its own memory, or fresh), one *inbox*
//! memfd (heartbeat word, armed word, and one SPSC ring per source for doorbells and control
//! messages) and an eventfd (its notifier), and hands them to the others at the rendezvous (a
//! Unix socket at `GroupConfig::bootstrap`, every join authenticated, the descriptors passed
//! with `SCM_RIGHTS`). After that no system call is on the data path:
//!
//! - a write copies once, from the source's registered memory (or the inline bytes) straight
//!   into the target's region mapping, then a release fence;
//! - a doorbell does the same and then pushes its immediate on the (source, target) ring,
//!   whose header store publishes the data with it;
//! - `fetch_add` is a hardware atomic add on the word in the target's mapping;
//! - `send` pushes a message on the ring;
//! - completion is immediate: the source performed the effect itself, so it is visible at the
//!   target when the post returns.
//!
//! Per-peer order: one spin lock per (source, target) link serialises posting, so copies and
//! ring pushes to one peer happen in posting order. Credits are the ring's own: the consumer
//! hands back space and credits every quarter of the credits it took, and before it sleeps.
//! A consumer that sleeps arms its notifier; a producer that finds it armed writes its
//! eventfd (see `notifier.rs`), so an idle node burns no core and a busy one makes no system
//! call.
//!
//! Failure detection: each node's heartbeat thread bumps its inbox's heartbeat word and
//! watches its peers'; a word that has not moved for `heartbeat_timeout` (the process was
//! killed, stopped, or dropped its endpoint) marks the peer dead.
//!
//! Trust: a peer maps the target's memory, so grants are enforced at the source (a post outside
//! them is refused with `AccessDenied`), not against a hostile process; shm trusts the
//! processes of one host once they authenticated (see `docs/fabric.md`).
//!
//! Threads: callers of the endpoint; `fabric-hb-<rank>` (heartbeats and death watch). Lock
//! order: a link lock, then the completion queue's; the receive lock is never held with a link
//! lock.
#![forbid(unsafe_code)]

mod join;
mod raw;
mod ring;

pub use raw::SharedMemory;

use std::fs::File;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering, fence};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::checks::{check_grant, check_message, check_peer, check_word, check_write};
use crate::cq::Cq;
use crate::memory::memfd;
use crate::notifier::{Notifier, new_eventfd, wake_if_armed};
use crate::rendezvous::{self};
use crate::sys::{Mapping, SpinLock};
use crate::wr_code::WrCode;
use crate::{
    Completion, DeathCause, Fabric, FabricError, GroupConfig, IncomingBatch, Memory, NodeId,
    RECV_CREDITS, RegionId, RegionSpec, RemoteAddr, Resource, Signal, Source, Status, WrId,
};
use ring::{Popped, RING_STRIDE, ReadPos, Refused, Ring};

/// Inbox layout: the heartbeat counter and the armed word each on their own cache line, then
/// one ring per source.
const HEARTBEAT: usize = 0;
const ARMED: usize = 64;
const RINGS: usize = 4096;

/// How long the blocking calls spin before they sleep: long enough to catch a reply on the
/// other core without a system call even when the host is busy, short enough that an idle
/// node sleeps soon (it burns at most this much CPU after its last message). Measured with
/// `vsmp bench fabric` on a loaded 2-core host: with 30 us or 200 us the answering node fell
/// asleep between doorbells and the blocking round trip was 100-900x the raw ping-pong; with
/// 1 ms it matches the busy-polling round trip.
const SPIN: Duration = Duration::from_millis(1);

/// The consumer hands space and credits back at least every this many entries, so a
/// receiver that is never idle still keeps its producers flowing.
const RELEASE_ENTRIES: u64 = (RECV_CREDITS / 4) as u64;

/// The name this backend gives the rendezvous (nodes of other backends cannot join).
const BACKEND: &str = "shm";

fn inbox_len(nodes: usize) -> usize {
    RINGS + nodes * RING_STRIDE
}

fn ring_base(src: usize) -> usize {
    RINGS + src * RING_STRIDE
}

/// One node's endpoint on the shm fabric.
#[derive(Debug)]
pub struct ShmFabric {
    inner: Arc<Inner>,
    heartbeat: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Inner {
    rank: NodeId,
    regions: Vec<RegionSpec>,
    heartbeat_timeout: Duration,
    peers: Vec<Peer>,
    cq: Cq,
    notifier: Arc<Notifier>,
    rx: SpinLock<Receiver>,
    /// Peers declared dead so far, so a poll looks for deaths to report only when it grew.
    deaths: AtomicU64,
    stop: AtomicBool,
}

/// What this node knows of one peer (itself included: loopback).
#[derive(Debug)]
struct Peer {
    rank: NodeId,
    pid: u32,
    regions: Vec<Arc<Memory>>,
    inbox: Arc<Mapping>,
    /// The peer's notifier, written when it sleeps armed.
    efd: File,
    /// Serialises posts to this peer, so they take effect in posting order; holds the next
    /// work-request counter to it.
    link: SpinLock<u64>,
    dead: AtomicBool,
    /// Why it died (a `Cause` code), once `dead`.
    cause: AtomicU8,
}

#[derive(Debug)]
struct Receiver {
    /// Where the next round-robin scan of the rings starts, for fairness across sources.
    next: usize,
    /// Per source ring: the consumer's position.
    read: Vec<ReadPos>,
    /// Deaths already reported by `poll_incoming`.
    reported: Vec<bool>,
    /// `deaths` when every death up to it was reported.
    deaths_reported: u64,
}

const CAUSE_SILENT: u8 = 1;
const CAUSE_PROTOCOL: u8 = 2;

fn cause_code(c: DeathCause) -> u8 {
    match c {
        DeathCause::Protocol => CAUSE_PROTOCOL,
        _ => CAUSE_SILENT,
    }
}

fn cause_of(code: u8) -> DeathCause {
    match code {
        CAUSE_PROTOCOL => DeathCause::Protocol,
        _ => DeathCause::Silent,
    }
}

impl ShmFabric {
    /// Joins the group `cfg` describes: creates this node's inbox and notifier, exchanges its
    /// memory with every peer through the authenticated rendezvous, and starts the heartbeat
    /// thread.
    pub fn join(cfg: &GroupConfig) -> Result<ShmFabric, FabricError> {
        cfg.validate()?;
        if cfg.heartbeat_timeout.is_zero() {
            return Err(FabricError::Config("the heartbeat timeout is zero".into()));
        }
        if cfg.regions.len() + 2 > rendezvous::MAX_CARD_FDS {
            return Err(FabricError::Config(format!(
                "the shm backend carries at most {} regions, not {}",
                rendezvous::MAX_CARD_FDS - 2,
                cfg.regions.len()
            )));
        }
        let n = cfg.nodes;
        let own_memory = cfg.region_memory()?;
        let inbox = memfd(&format!("vsmp-{}-inbox", cfg.rank.0), inbox_len(n))?;
        let efd = new_eventfd()?;
        let card = join::own_card(cfg, &inbox, &efd, &own_memory)?;
        let members = join::gather(cfg, card)?;
        let peers = members
            .into_iter()
            .map(|m| {
                if m.rank == cfg.rank {
                    join::own_peer(cfg, &inbox, &efd, &own_memory)
                } else {
                    join::peer(cfg, m)
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let me = cfg.rank.index();
        let notifier = Arc::new(Notifier::shared(efd, Arc::clone(&peers[me].inbox), ARMED));
        let inner = Arc::new(Inner {
            rank: cfg.rank,
            regions: cfg.regions.clone(),
            heartbeat_timeout: cfg.heartbeat_timeout,
            peers,
            cq: Cq::new(n, Arc::clone(&notifier)),
            notifier,
            rx: SpinLock::new(Receiver {
                next: 0,
                read: (0..n).map(|s| ReadPos::at_base(ring_base(s))).collect(),
                reported: vec![false; n],
                deaths_reported: 0,
            }),
            deaths: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let hb = Arc::clone(&inner);
        let heartbeat = std::thread::Builder::new()
            .name(format!("fabric-hb-{}", cfg.rank.0))
            .spawn(move || hb.heartbeat())
            .map_err(FabricError::io("spawning the shm heartbeat thread"))?;
        Ok(ShmFabric {
            inner,
            heartbeat: Some(heartbeat),
        })
    }
}

impl Drop for ShmFabric {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        if let Some(t) = self.heartbeat.take() {
            let _ = t.join();
        }
    }
}

impl Inner {
    #[inline]
    fn peer(&self, p: NodeId) -> Result<&Peer, FabricError> {
        check_peer(p, self.peers.len())?;
        let peer = &self.peers[p.index()];
        // Acquire: pairs with `declare_dead`'s release of the cause before the flag.
        if peer.dead.load(Ordering::Acquire) {
            return Err(FabricError::PeerDead {
                peer: p,
                cause: cause_of(peer.cause.load(Ordering::Relaxed)),
            });
        }
        Ok(peer)
    }

    /// This node's ring in `peer`'s inbox.
    #[inline]
    fn ring_to<'a>(&self, peer: &'a Peer) -> Ring<'a> {
        Ring::at(&peer.inbox, ring_base(self.rank.index()))
    }

    /// Numbers a post that took effect (under its link lock, so counters to one peer increase
    /// in posting order) and queues its completion if it is signalled.
    #[inline]
    fn complete(
        &self,
        next: &mut u64,
        peer: NodeId,
        slot: Option<crate::cq::Slot<'_>>,
        status: Status,
    ) -> WrId {
        let counter = *next;
        *next += 1;
        if let Some(slot) = slot {
            slot.complete(counter, status);
        }
        WrCode::encode(counter, peer)
    }

    fn declare_dead(&self, p: usize, cause: DeathCause) {
        let peer = &self.peers[p];
        peer.cause.store(cause_code(cause), Ordering::Relaxed);
        // Release: the cause is visible to whoever sees the flag.
        if !peer.dead.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                "{}: {} (pid {}) is dead: {cause}",
                self.rank,
                peer.rank,
                peer.pid
            );
            self.cq.fail_peer(peer.rank, cause);
            // Release: pairs with the poll's acquire, after the flag.
            self.deaths.fetch_add(1, Ordering::Release);
            self.notifier.notify();
        }
    }

    /// The heartbeat thread: beat, and watch every peer's beat.
    fn heartbeat(&self) {
        let me = self.rank.index();
        let period =
            (self.heartbeat_timeout / 8).clamp(Duration::from_millis(1), Duration::from_millis(50));
        let beat = |p: &Peer| p.inbox.u64_at(HEARTBEAT).load(Ordering::Relaxed);
        let mut last: Vec<(u64, Instant)> = self
            .peers
            .iter()
            .map(|p| (beat(p), Instant::now()))
            .collect();
        let mut previous = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            self.peers[me]
                .inbox
                .u64_at(HEARTBEAT)
                .fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            // If this thread itself was not scheduled for a while, it did not watch: silence
            // it did not see is no evidence against the peers, so the clocks restart.
            let watched = now.duration_since(previous) <= 4 * period;
            previous = now;
            for (p, seen) in last.iter_mut().enumerate() {
                if p == me || self.peers[p].dead.load(Ordering::Relaxed) {
                    continue;
                }
                let b = beat(&self.peers[p]);
                if b != seen.0 || !watched {
                    *seen = (b, now);
                } else if now.duration_since(seen.1) > self.heartbeat_timeout {
                    self.declare_dead(p, DeathCause::Silent);
                }
            }
            std::thread::sleep(period);
        }
    }

    /// Pushes on this node's ring to `peer` and wakes it if it sleeps armed.
    #[inline]
    fn push(
        &self,
        peer: &Peer,
        f: impl FnOnce(&Ring<'_>) -> Result<(), Refused>,
    ) -> Result<(), FabricError> {
        match f(&self.ring_to(peer)) {
            Ok(()) => {
                wake_if_armed(peer.inbox.u32_at(ARMED), &peer.efd);
                Ok(())
            }
            Err(Refused::NoCredit) => Err(FabricError::WouldBlock {
                peer: peer.rank,
                resource: Resource::ReceiveCredits,
            }),
        }
    }

    /// Takes what the rings hold into `out`, round robin across sources, then deaths.
    fn poll_rings(&self, rx: &mut Receiver, out: &mut IncomingBatch) -> usize {
        let n = self.peers.len();
        let inbox = &self.peers[self.rank.index()].inbox;
        let start = rx.next.min(n - 1);
        // The common case on a busy poller: nothing anywhere, seen with one load per ring.
        // What is waiting is noted (for the first 64 sources; past them, every ring is looked
        // at again below).
        let mut waiting = 0u64;
        for (s, r) in rx.read.iter().enumerate() {
            if r.waiting(inbox) {
                waiting |= 1 << s.min(63);
            }
        }
        let deaths = self.deaths.load(Ordering::Acquire);
        if waiting == 0 && deaths == rx.deaths_reported {
            return 0;
        }
        let mut taken = 0;
        // One pass, round robin from `rx.next` (for fairness across sources), draining each
        // ring while the batch has room; no division on this path (it runs on every poll).
        'rings: for k in 0..n {
            let s = if start + k < n {
                start + k
            } else {
                start + k - n
            };
            if waiting & (1 << s.min(63)) == 0 {
                continue;
            }
            let ring = Ring::at(inbox, ring_base(s));
            let read = &mut rx.read[s];
            let from = self.peers[s].rank;
            loop {
                match ring.pop(read, from, out) {
                    Ok(Popped::Taken) => {
                        taken += 1;
                        rx.next = if s + 1 == n { 0 } else { s + 1 };
                        if ring.unreleased(read) >= RELEASE_ENTRIES {
                            ring.release(read);
                        }
                    }
                    Ok(Popped::Empty) => break,
                    Ok(Popped::NoRoom) => break 'rings,
                    Err(reason) => {
                        tracing::warn!(
                            "{}: damaged ring from {}: {reason}",
                            self.rank,
                            self.peers[s].rank
                        );
                        self.declare_dead(s, DeathCause::Protocol);
                        break;
                    }
                }
            }
        }
        // Deaths are reported after everything the dead peer delivered (its ring is empty).
        if deaths == rx.deaths_reported {
            return taken;
        }
        let mut all_reported = true;
        for p in 0..n {
            let peer = &self.peers[p];
            if !out.has_room(0) {
                all_reported = false;
                break;
            }
            if !rx.reported[p]
                && peer.dead.load(Ordering::Acquire)
                && (Ring::at(inbox, ring_base(p)).is_empty(&rx.read[p])
                    || peer.cause.load(Ordering::Relaxed) == CAUSE_PROTOCOL)
            {
                rx.reported[p] = true;
                out.push_dead(peer.rank, cause_of(peer.cause.load(Ordering::Relaxed)));
                taken += 1;
            }
            all_reported &= rx.reported[p] || !peer.dead.load(Ordering::Relaxed);
        }
        if all_reported {
            rx.deaths_reported = deaths;
        }
        taken
    }

    /// Hands every ring's read space and credits back to its producer.
    fn release_rings(&self, rx: &Receiver) {
        let inbox = &self.peers[self.rank.index()].inbox;
        for (s, read) in rx.read.iter().enumerate() {
            let ring = Ring::at(inbox, ring_base(s));
            if ring.unreleased(read) > 0 {
                ring.release(read);
            }
        }
    }
}

impl Fabric for ShmFabric {
    fn rank(&self) -> NodeId {
        self.inner.rank
    }

    fn nodes(&self) -> usize {
        self.inner.peers.len()
    }

    fn memory(&self, region: RegionId) -> Result<&Memory, FabricError> {
        let inner = &self.inner;
        crate::memory::find(&inner.peers[inner.rank.index()].regions, region)
    }

    #[inline]
    fn post_write(
        &self,
        peer: NodeId,
        dst: RemoteAddr,
        src: Source<'_>,
        imm: Option<u32>,
        signal: Signal,
    ) -> Result<WrId, FabricError> {
        let inner = &self.inner;
        check_peer(peer, inner.peers.len())?;
        let w = check_write(&inner.regions, dst, &src)?;
        let bare = imm.is_some() && w.len == 0;
        check_grant(
            &inner.regions[w.dst_index],
            inner.rank,
            peer,
            dst,
            w.len,
            bare,
        )?;
        let p = inner.peer(peer)?;
        let mut link = p.link.lock();
        let slot = match signal {
            Signal::Always => Some(inner.cq.reserve(peer)?),
            Signal::OnError => None,
        };
        // A write with a doorbell needs its credit before its bytes land (a post that fails
        // has no effect); a bare doorbell's push checks it itself.
        if imm.is_some() && w.len > 0 && !inner.ring_to(p).has_credit() {
            return Err(FabricError::WouldBlock {
                peer,
                resource: Resource::ReceiveCredits,
            });
        }
        let target = p.regions[w.dst_index].mapping();
        match src {
            Source::Region(s) => {
                let from = &inner.peers[inner.rank.index()].regions
                    [w.src_index.expect("a region source has an index")];
                from.mapping().copy_to(
                    s.offset as usize,
                    target,
                    dst.offset as usize,
                    s.len as usize,
                );
            }
            Source::Inline(bytes) => target.copy_in(dst.offset as usize, bytes),
            Source::Empty => {}
        }
        // Release: the copy is visible before anything that follows it (the ring's header
        // store, the completion), pairing with the target's acquire loads.
        fence(Ordering::Release);
        if let Some(imm) = imm {
            inner.push(p, |r| r.push_doorbell(imm))?;
        }
        Ok(inner.complete(&mut link, peer, slot, Status::Done))
    }

    fn post_fetch_add(&self, peer: NodeId, dst: RemoteAddr, add: u64) -> Result<WrId, FabricError> {
        let inner = &self.inner;
        check_peer(peer, inner.peers.len())?;
        let index = check_word(&inner.regions, dst)?;
        check_grant(&inner.regions[index], inner.rank, peer, dst, 8, false)?;
        let p = inner.peer(peer)?;
        let mut link = p.link.lock();
        let slot = inner.cq.reserve(peer)?;
        let old = p.regions[index].fetch_add_u64(dst.offset, add)?;
        Ok(inner.complete(&mut link, peer, Some(slot), Status::Fetched(old)))
    }

    fn credits(&self, peer: NodeId) -> Result<usize, FabricError> {
        let inner = &self.inner;
        let p = inner.peer(peer)?;
        let _link = p.link.lock();
        Ok(inner.ring_to(p).credits())
    }

    fn post_send(&self, peer: NodeId, msg: &[u8], signal: Signal) -> Result<WrId, FabricError> {
        let inner = &self.inner;
        check_peer(peer, inner.peers.len())?;
        check_message(msg.len())?;
        let p = inner.peer(peer)?;
        let mut link = p.link.lock();
        let slot = match signal {
            Signal::Always => Some(inner.cq.reserve(peer)?),
            Signal::OnError => None,
        };
        inner.push(p, |r| r.push_message(msg))?;
        Ok(inner.complete(&mut link, peer, slot, Status::Done))
    }

    #[inline]
    fn poll_completions(&self, out: &mut [Completion]) -> usize {
        self.inner.cq.poll(out)
    }

    fn poll_completion(&self, wr: WrId) -> Result<Option<Completion>, FabricError> {
        self.inner.cq.poll_one(wr)
    }

    #[inline]
    fn poll_incoming(&self, out: &mut IncomingBatch) -> usize {
        let inner = &self.inner;
        let mut rx = inner.rx.lock();
        inner.poll_rings(&mut rx, out)
    }

    fn notifier(&self) -> BorrowedFd<'_> {
        self.inner.notifier.fd()
    }

    fn arm_notifier(&self) {
        let inner = &self.inner;
        // Idle: hand space and credits back before sleeping, so producers are never starved
        // by a consumer that sleeps.
        if let Some(rx) = inner.rx.try_lock() {
            inner.release_rings(&rx);
        }
        inner.notifier.arm();
    }

    fn spin_before_sleep(&self) -> Duration {
        SPIN
    }
}
