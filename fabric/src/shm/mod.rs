//! The shm backend: the nodes of a group are processes on one host that map each other's
//! memory.
//!
//! Every node creates one memfd per registered region and one *inbox* memfd (heartbeat word,
//! futex word, and one SPSC ring per source for doorbells and control messages), and hands
//! them to the others at bootstrap (`join`: a Unix socket at `GroupConfig::bootstrap`, every
//! join authenticated). After that no system call is on the data path:
//!
//! - `write` copies straight into the target's region mapping, then a release fence;
//! - `write_imm` does the same and then pushes a doorbell on the (source, target) ring, whose
//!   release store of the entry's header publishes the data with it;
//! - `fetch_add` is a hardware atomic add on the word in the target's mapping;
//! - `send` pushes a message on the ring;
//! - completion is immediate: the source performed the effect itself, so it is visible at the
//!   target when the post returns (with an injected delay, each operation is applied `delay`
//!   after posting and completed `delay` later, by whichever thread is waiting in `recv` or
//!   `wait` at that moment, or else, a little late, by a sleeping fallback thread).
//!
//! Per-peer order: one lock per (source, target) link serialises posting, so copies and ring
//! pushes to one peer happen in posting order. `recv` spins briefly, then sleeps on a futex in
//! its inbox, which producers wake only when a sleeper is registered (so an idle node burns no
//! core and a busy one makes no system call).
//!
//! Failure detection: each node's heartbeat thread bumps its inbox's heartbeat word and
//! watches its peers'; a word that has not moved for `heartbeat_timeout` (the process was
//! killed, stopped, or dropped its endpoint) marks the peer dead.
//!
//! Trust: a peer maps the target's memory, so grants are enforced at the source (a post outside
//! them is refused with `AccessDenied`), not against a hostile process; shm trusts the
//! processes of one host once they authenticated (see `docs/fabric.md`).
//!
//! Threads: callers of the endpoint; `fabric-hb-<rank>` (heartbeats and death watch);
//! `fabric-delay-<rank>` when a delay is injected. Lock order: a link lock, then the delay
//! queue lock; the receive lock is never held with either.
#![deny(unsafe_code)]

mod join;
mod ring;
#[allow(unsafe_code)] // The one place this backend needs it; every block has a SAFETY comment.
mod sys;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::checks::{check_message, check_peer, check_range, check_word, local_range};
use crate::wr_code::WrCode;
use crate::{
    Completion, Fabric, FabricError, GroupConfig, Incoming, LocalRegion, NodeId, RegionId,
    RegionSpec, RemoteAddr, WrId,
};
use ring::{Entry, RING_STRIDE, Ring};
use sys::{Mapping, PostLock};

/// Inbox layout: the heartbeat counter, the futex word and the sleeper count each on their
/// own cache line, then one ring per source.
const HEARTBEAT: usize = 0;
const WAKE: usize = 64;
const SLEEPERS: usize = 128;
const RINGS: usize = 4096;

/// How long `recv` and `wait` spin before they sleep: long enough to catch a reply on the
/// other core without a system call even when the host is busy, short enough that an idle
/// node sleeps soon (it burns at most this much CPU after its last message). Measured with
/// `vsmp bench fabric` on a loaded 2-core host: with 30 us or 200 us the answering node fell
/// asleep between doorbells and the blocking round trip was 100-900x the raw ping-pong; with
/// 1 ms it matches the busy-polling round trip.
const SPIN: Duration = Duration::from_micros(1000);

/// Read ring space is handed back to the producer at least every this many bytes, so a
/// receiver that is never idle still keeps its producers flowing.
const RELEASE_BYTES: u64 = (ring::RING_BYTES / 4) as u64;

/// Bound on payload bytes posted with an injected delay and not yet applied: the window a
/// link would have. Posting past it helps apply due operations until there is room again.
const DELAYED_BYTES_IN_FLIGHT: u64 = 8 << 20;

/// How late a delayed operation may be before the fallback delay thread applies it: callers
/// waiting in `recv` or `wait` apply operations on time; the thread only covers for a poster
/// that went off doing something else (its operations then land up to this much, plus timer
/// slack, after their due time).
const FALLBACK_SLACK: Duration = Duration::from_micros(100);

/// Ring polls between two looks at the clock while spinning.
const POLLS_PER_CLOCK: usize = 64;

/// Longest single futex sleep; deaths and deadlines are rechecked at least this often.
const MAX_SLEEP: Duration = Duration::from_millis(50);

fn inbox_len(nodes: usize) -> usize {
    RINGS + nodes * RING_STRIDE
}

fn ring_base(src: usize) -> usize {
    RINGS + src * RING_STRIDE
}

fn map_len(len: usize) -> usize {
    len.max(1).next_multiple_of(4096)
}

/// One node's endpoint on the shm fabric.
#[derive(Debug)]
pub struct ShmFabric {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Debug)]
struct Inner {
    rank: NodeId,
    regions: Vec<RegionSpec>,
    delay: Duration,
    heartbeat_timeout: Duration,
    peers: Vec<Peer>,
    own: Vec<ShmRegion>,
    next_counter: AtomicU64,
    /// Results of `fetch_add`s not yet handed out by `wait`.
    fetched: PostLock<HashMap<WrId, u64, BuildHasherDefault<WrHasher>>>,
    /// Failures of delayed operations, reported by `wait` (empty without a delay).
    failed: Mutex<HashMap<WrId, FabricError>>,
    rx: PostLock<Receiver>,
    delayed: Delayed,
    /// Signalled when a delayed operation completes or a peer dies.
    completed: (Mutex<()>, Condvar),
    stop: AtomicBool,
}

/// What this node knows of one peer (itself included: loopback).
#[derive(Debug)]
struct Peer {
    rank: NodeId,
    pid: u32,
    regions: Vec<Arc<Mapping>>,
    inbox: Arc<Mapping>,
    /// Serialises posts to this peer, so they take effect in posting order (a lock whose
    /// uncontended round is one compare-exchange and a plain store: it is on every post).
    link: PostLock<()>,
    /// Highest work-request counter to this peer that has completed.
    done: AtomicU64,
    dead: AtomicBool,
}

#[derive(Debug)]
struct Receiver {
    /// Where the next round-robin scan of the rings starts, for fairness across sources.
    next: usize,
    /// Per source ring: the read position (entries before it are taken, maybe not released).
    read: Vec<u64>,
    /// Deaths already reported by `recv`.
    reported: Vec<bool>,
}

/// An operation, borrowing its bytes when applied at once and owning them when delayed.
#[derive(Debug)]
enum Op<D> {
    Write {
        index: usize,
        offset: u64,
        data: D,
        imm: Option<u32>,
    },
    FetchAdd {
        index: usize,
        offset: u64,
        add: u64,
    },
    Send {
        data: D,
    },
}

impl<D: AsRef<[u8]>> Op<D> {
    /// Payload bytes carried.
    fn bytes(&self) -> usize {
        match self {
            Op::Write { data, .. } | Op::Send { data } => data.as_ref().len(),
            Op::FetchAdd { .. } => 8,
        }
    }
}

impl Op<&[u8]> {
    fn to_owned(&self) -> Op<Vec<u8>> {
        match *self {
            Op::Write {
                index,
                offset,
                data,
                imm,
            } => Op::Write {
                index,
                offset,
                data: data.to_vec(),
                imm,
            },
            Op::FetchAdd { index, offset, add } => Op::FetchAdd { index, offset, add },
            Op::Send { data } => Op::Send {
                data: data.to_vec(),
            },
        }
    }
}

impl ShmFabric {
    /// Joins the group `cfg` describes: creates this node's memory, exchanges it with every
    /// peer through the authenticated bootstrap, and starts the heartbeat thread.
    pub fn join(cfg: &GroupConfig) -> Result<ShmFabric, FabricError> {
        cfg.validate()?;
        if cfg.regions.len() > join::MAX_REGIONS {
            return Err(FabricError::Config(format!(
                "the shm backend carries at most {} regions, not {}",
                join::MAX_REGIONS,
                cfg.regions.len()
            )));
        }
        if cfg.heartbeat_timeout.is_zero() {
            return Err(FabricError::Config("the heartbeat timeout is zero".into()));
        }
        let n = cfg.nodes;
        let own = join::Member {
            rank: cfg.rank,
            pid: std::process::id(),
            inbox: memfd(&format!("vsmp-{}-inbox", cfg.rank.0), inbox_len(n))?,
            regions: cfg
                .regions
                .iter()
                .map(|r| memfd(&format!("vsmp-{}-region-{}", cfg.rank.0, r.id.0), r.len))
                .collect::<Result<_, _>>()?,
        };
        let members = join::exchange(cfg, own, inbox_len(n) as u64)?;
        let peers = members
            .iter()
            .map(|m| peer(cfg, m))
            .collect::<Result<Vec<_>, _>>()?;
        let me = usize::from(cfg.rank.0);
        let own = cfg
            .regions
            .iter()
            .zip(&peers[me].regions)
            .map(|(spec, map)| ShmRegion {
                id: spec.id,
                len: spec.len,
                map: Arc::clone(map),
            })
            .collect();
        let inner = Arc::new(Inner {
            rank: cfg.rank,
            regions: cfg.regions.clone(),
            delay: cfg.delay,
            heartbeat_timeout: cfg.heartbeat_timeout,
            peers,
            own,
            next_counter: AtomicU64::new(1),
            fetched: PostLock::new(HashMap::default()),
            failed: Mutex::new(HashMap::new()),
            rx: PostLock::new(Receiver {
                next: 0,
                read: vec![0; n],
                reported: vec![false; n],
            }),
            delayed: Delayed::new(n),
            completed: (Mutex::new(()), Condvar::new()),
            stop: AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        let hb = Arc::clone(&inner);
        threads.push(spawn(format!("fabric-hb-{}", cfg.rank.0), move || {
            hb.heartbeat()
        })?);
        if !cfg.delay.is_zero() {
            let d = Arc::clone(&inner);
            threads.push(spawn(format!("fabric-delay-{}", cfg.rank.0), move || {
                d.run_delayed()
            })?);
        }
        Ok(ShmFabric { inner, threads })
    }
}

impl Drop for ShmFabric {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.inner.delayed.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, FabricError> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(f)
        .map_err(|source| FabricError::Io {
            op: format!("spawning thread {name}"),
            source,
        })
}

fn memfd(name: &str, len: usize) -> Result<File, FabricError> {
    let io = |op: String| move |source| FabricError::Io { op, source };
    let cname = std::ffi::CString::new(name).map_err(|_| FabricError::Config(name.into()))?;
    let fd = nix::sys::memfd::memfd_create(&cname, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
        .map_err(|e| io(format!("creating memfd {name}"))(e.into()))?;
    let file = File::from(fd);
    file.set_len(map_len(len) as u64)
        .map_err(io(format!("sizing memfd {name}")))?;
    Ok(file)
}

fn peer(cfg: &GroupConfig, m: &join::Member) -> Result<Peer, FabricError> {
    let map = |f: &File, len: usize, what: String| {
        Mapping::map(f, len)
            .map(Arc::new)
            .map_err(|source| FabricError::Io {
                op: format!("mapping {}'s {what}", m.rank),
                source,
            })
    };
    Ok(Peer {
        rank: m.rank,
        pid: m.pid,
        inbox: map(&m.inbox, inbox_len(cfg.nodes), "inbox".into())?,
        regions: cfg
            .regions
            .iter()
            .zip(&m.regions)
            .map(|(spec, f)| map(f, map_len(spec.len), spec.id.to_string()))
            .collect::<Result<_, _>>()?,
        link: PostLock::new(()),
        done: AtomicU64::new(0),
        dead: AtomicBool::new(false),
    })
}

/// Hashes the `WrId`s of the `fetched` table: they are unique integers, so a multiply and a
/// fold spread them well enough, at a fraction of SipHash's cost on the `fetch_add` path.
#[derive(Debug, Default)]
struct WrHasher(u64);

impl Hasher for WrHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, v: u64) {
        let h = (self.0 ^ v ^ (v >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 32);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn dead(peer: NodeId) -> FabricError {
    FabricError::PeerDead {
        peer,
        reason: "its heartbeat stopped (killed, stopped or gone)".into(),
    }
}

impl Inner {
    fn peer(&self, p: NodeId) -> Result<&Peer, FabricError> {
        check_peer(p, self.peers.len())?;
        Ok(&self.peers[usize::from(p.0)])
    }

    /// Grants are enforced at the source on shm (see the module doc).
    fn check_grant(&self, peer: NodeId, dst: RemoteAddr, len: u64) -> Result<(), FabricError> {
        let spec = self
            .regions
            .iter()
            .find(|r| r.id == dst.region)
            .ok_or(FabricError::UnknownRegion { region: dst.region })?;
        if spec.permits(self.rank, dst.offset, len) {
            return Ok(());
        }
        tracing::warn!(
            "refused a write from {} to {peer}'s {} at offset {} ({len} bytes): outside its grants",
            self.rank,
            dst.region,
            dst.offset
        );
        Err(FabricError::AccessDenied {
            peer,
            region: dst.region,
            offset: dst.offset,
            len,
        })
    }

    fn post(&self, p: NodeId, op: Op<&[u8]>) -> Result<WrId, FabricError> {
        let peer = self.peer(p)?;
        let fetch = matches!(op, Op::FetchAdd { .. });
        let _link = peer.link.lock();
        if peer.dead.load(Ordering::Acquire) {
            return Err(dead(p));
        }
        // Taken under the link lock, so counters to one peer increase in posting order.
        let counter = self.next_counter.fetch_add(1, Ordering::Relaxed);
        let wr = WrCode::encode(counter, fetch, p);
        if self.delay.is_zero() {
            let fetched = self.execute(peer, &op)?;
            if let Some(v) = fetched {
                self.fetched.lock().insert(wr, v);
            }
            // Release: pairs with `wait`'s acquire load of `done`.
            peer.done.store(counter, Ordering::Release);
        } else {
            // A bounded window of delayed bytes, as a link has: past it, help apply (which
            // frees the window as operations fall due) instead of queueing without bound.
            let mut start = None;
            while self.delayed.bytes_in_flight() > DELAYED_BYTES_IN_FLIGHT {
                self.help(false);
                if start.get_or_insert_with(Instant::now).elapsed() > self.heartbeat_timeout {
                    return Err(FabricError::Timeout {
                        what: format!("room in the delayed-operation window to {p}"),
                        waited: self.heartbeat_timeout,
                    });
                }
                std::hint::spin_loop();
            }
            self.delayed.push(p, wr, op.to_owned(), self.delay);
        }
        Ok(wr)
    }

    /// Performs `op` on `peer`'s memory; the fetched value of a `fetch_add`.
    fn execute<D: AsRef<[u8]>>(&self, peer: &Peer, op: &Op<D>) -> Result<Option<u64>, FabricError> {
        match op {
            Op::Write {
                index,
                offset,
                data,
                imm,
            } => {
                let data = data.as_ref();
                if !data.is_empty() {
                    peer.regions[*index].copy_in(*offset as usize, data);
                }
                // Release: the copy is visible before anything that follows it (the ring's
                // tail store, the completion), pairing with the target's acquire loads.
                fence(Ordering::Release);
                if let Some(imm) = imm {
                    self.push(peer, |r| r.push_doorbell(*imm))?;
                }
                Ok(None)
            }
            Op::FetchAdd { index, offset, add } => {
                // SeqCst: a hardware `lock xadd`, ordered with every other node's.
                let old = peer.regions[*index]
                    .u64_at(*offset as usize)
                    .fetch_add(*add, Ordering::SeqCst);
                Ok(Some(old))
            }
            Op::Send { data } => {
                self.push(peer, |r| r.push_message(data.as_ref()))?;
                Ok(None)
            }
        }
    }

    /// Pushes onto this node's ring in `peer`'s inbox, waiting (bounded) while it is full,
    /// then wakes the peer if it sleeps.
    fn push(&self, peer: &Peer, f: impl Fn(&Ring<'_>) -> bool) -> Result<(), FabricError> {
        let ring = Ring::at(&peer.inbox, ring_base(usize::from(self.rank.0)));
        let mut start = None;
        while !f(&ring) {
            // Full: only now look at the clock (the common case makes no clock read).
            let start = *start.get_or_insert_with(Instant::now);
            if peer.dead.load(Ordering::Acquire) {
                return Err(dead(peer.rank));
            }
            let waited = start.elapsed();
            if waited > self.heartbeat_timeout {
                return Err(FabricError::Timeout {
                    what: format!("room in {}'s ring from {}", peer.rank, self.rank),
                    waited,
                });
            }
            if waited > SPIN {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::hint::spin_loop();
            }
        }
        // SeqCst: the entry was published by a SeqCst swap, so this load cannot pass it; it
        // pairs with `recv`'s SeqCst increment of the sleeper count and fence before its last
        // look at the rings: either we see the sleeper or it sees our entry.
        if peer.inbox.u32_at(SLEEPERS).load(Ordering::SeqCst) > 0 {
            peer.inbox.u32_at(WAKE).fetch_add(1, Ordering::Release);
            peer.inbox.futex_wake(WAKE);
        }
        Ok(())
    }

    fn declare_dead(&self, p: usize, why: &str) {
        let peer = &self.peers[p];
        if !peer.dead.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                "{}: {} (pid {}) is dead: {why}",
                self.rank,
                peer.rank,
                peer.pid
            );
            let inbox = &self.peers[usize::from(self.rank.0)].inbox;
            inbox.u32_at(WAKE).fetch_add(1, Ordering::Release);
            inbox.futex_wake(WAKE);
            let _g = lock(&self.completed.0);
            self.completed.1.notify_all();
        }
    }

    /// The heartbeat thread: beat, and watch every peer's beat.
    fn heartbeat(&self) {
        let me = usize::from(self.rank.0);
        let period = (self.heartbeat_timeout / 8).clamp(Duration::from_millis(1), MAX_SLEEP);
        let mut last: Vec<(u64, Instant)> = self
            .peers
            .iter()
            .map(|p| {
                (
                    p.inbox.u64_at(HEARTBEAT).load(Ordering::Relaxed),
                    Instant::now(),
                )
            })
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
                let beat = self.peers[p]
                    .inbox
                    .u64_at(HEARTBEAT)
                    .load(Ordering::Relaxed);
                if beat != seen.0 || !watched {
                    *seen = (beat, now);
                } else if now.duration_since(seen.1) > self.heartbeat_timeout {
                    self.declare_dead(p, "its heartbeat stopped");
                }
            }
            std::thread::sleep(period);
        }
    }

    /// The delay thread: a fallback that applies jobs when they fall due and no caller of
    /// `recv` or `wait` is there to help (it sleeps rather than spins, so it costs no core).
    fn run_delayed(&self) {
        while !self.stop.load(Ordering::Acquire) {
            self.delayed.sleep_until_due(&self.stop);
            // Only jobs overdue by the slack, and only if no helper is at it: a fallback
            // preempted while holding `exec` must not stall helpers that are on time.
            let Ok(_exec) = self.delayed.exec.try_lock() else {
                continue;
            };
            while let Some(job) = self.delayed.pop_due(None, FALLBACK_SLACK) {
                self.run_job(job);
            }
        }
    }

    /// Runs every due delayed job now, from a thread that is waiting anyway (`recv`, `wait`),
    /// unless another thread is at it. This is what makes short delays accurate. From `recv`
    /// (`receiving`), a loopback push is left to others: it might wait for room in a ring only
    /// this receiver drains.
    fn help(&self, receiving: bool) {
        if self.delay.is_zero() {
            return;
        }
        let Ok(_exec) = self.delayed.exec.try_lock() else {
            return;
        };
        let skip = receiving.then_some(self.rank);
        while let Some(job) = self.delayed.pop_due(skip, Duration::ZERO) {
            self.run_job(job);
        }
    }

    fn run_job(&self, job: Job) {
        match job {
            Job::Apply { peer, wr, op } => {
                let target = &self.peers[usize::from(peer.0)];
                let result = if target.dead.load(Ordering::Acquire) {
                    Err(dead(peer))
                } else {
                    self.execute(target, &op)
                };
                self.delayed.push_ack(peer, wr, result, self.delay);
            }
            Job::Ack { peer, wr, result } => {
                match result {
                    Ok(Some(v)) => {
                        self.fetched.lock().insert(wr, v);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        lock(&self.failed).insert(wr, e);
                    }
                }
                let counter = WrCode::decode(wr).counter;
                // Release: pairs with `wait`'s acquire load of `done`.
                self.peers[usize::from(peer.0)]
                    .done
                    .fetch_max(counter, Ordering::Release);
                let _g = lock(&self.completed.0);
                self.completed.1.notify_all();
            }
        }
    }

    fn poll_rings(&self, rx: &mut Receiver) -> Option<Result<Incoming, FabricError>> {
        let n = self.peers.len();
        let inbox = &self.peers[usize::from(self.rank.0)].inbox;
        // Round robin from `rx.next`, without a division (this runs on every poll).
        let start = rx.next.min(n - 1);
        for s in (start..n).chain(0..start) {
            let ring = Ring::at(inbox, ring_base(s));
            match ring.pop(&mut rx.read[s]) {
                Ok(Some(entry)) => {
                    rx.next = if s + 1 == n { 0 } else { s + 1 };
                    if ring.unreleased(rx.read[s]) >= RELEASE_BYTES {
                        ring.release(rx.read[s]);
                    }
                    let from = self.peers[s].rank;
                    return Some(Ok(match entry {
                        Entry::Doorbell(imm) => Incoming::Doorbell { from, imm },
                        Entry::Message(data) => Incoming::Message { from, data },
                    }));
                }
                Ok(None) => {}
                Err(reason) => {
                    tracing::warn!(
                        "{}: damaged ring from {}: {reason}",
                        self.rank,
                        self.peers[s].rank
                    );
                    self.declare_dead(s, "it damaged its ring");
                    rx.reported[s] = true;
                    return Some(Err(FabricError::Protocol {
                        peer: self.peers[s].rank.to_string(),
                        reason,
                    }));
                }
            }
        }
        // Deaths are reported after everything the dead peer delivered (its ring is empty).
        for (p, reported) in rx.reported.iter_mut().enumerate() {
            if !*reported && self.peers[p].dead.load(Ordering::Acquire) {
                *reported = true;
                return Some(Err(dead(self.peers[p].rank)));
            }
        }
        None
    }

    /// Hands every ring's read space back to its producer (when nothing is waiting, so the
    /// zeroing is off the fast path).
    fn release_rings(&self, rx: &Receiver) {
        let inbox = &self.peers[usize::from(self.rank.0)].inbox;
        for (s, &read) in rx.read.iter().enumerate() {
            let ring = Ring::at(inbox, ring_base(s));
            if ring.unreleased(read) > 0 {
                ring.release(read);
            }
        }
    }

    fn anything_pending(&self, rx: &Receiver) -> bool {
        let inbox = &self.peers[usize::from(self.rank.0)].inbox;
        (0..self.peers.len()).any(|s| {
            !Ring::at(inbox, ring_base(s)).is_empty(rx.read[s])
                || (!rx.reported[s] && self.peers[s].dead.load(Ordering::Acquire))
        })
    }
}

impl Fabric for ShmFabric {
    fn rank(&self) -> NodeId {
        self.inner.rank
    }

    fn nodes(&self) -> usize {
        self.inner.peers.len()
    }

    fn region(&self, id: RegionId) -> Result<&dyn LocalRegion, FabricError> {
        self.inner
            .own
            .iter()
            .find(|r| r.id == id)
            .map(|r| r as &dyn LocalRegion)
            .ok_or(FabricError::UnknownRegion { region: id })
    }

    fn post_write(&self, peer: NodeId, dst: RemoteAddr, data: &[u8]) -> Result<WrId, FabricError> {
        self.post_write_inner(peer, dst, data, None)
    }

    fn post_write_imm(
        &self,
        peer: NodeId,
        dst: RemoteAddr,
        data: &[u8],
        imm: u32,
    ) -> Result<WrId, FabricError> {
        self.post_write_inner(peer, dst, data, Some(imm))
    }

    fn post_fetch_add(&self, peer: NodeId, dst: RemoteAddr, add: u64) -> Result<WrId, FabricError> {
        let inner = &self.inner;
        check_peer(peer, inner.peers.len())?;
        let index = check_word(&inner.regions, dst)?;
        inner.check_grant(peer, dst, 8)?;
        let op = Op::FetchAdd {
            index,
            offset: dst.offset,
            add,
        };
        inner.post(peer, op)
    }

    fn post_send(&self, peer: NodeId, msg: &[u8]) -> Result<WrId, FabricError> {
        check_peer(peer, self.inner.peers.len())?;
        check_message(msg.len())?;
        self.inner.post(peer, Op::Send { data: msg })
    }

    fn wait(&self, wr: WrId, timeout: Duration) -> Result<Completion, FabricError> {
        let inner = &self.inner;
        let code = WrCode::decode(wr);
        if usize::from(code.peer.0) >= inner.peers.len()
            || code.counter == 0
            || code.counter >= inner.next_counter.load(Ordering::Relaxed)
        {
            return Err(FabricError::UnknownWr { wr });
        }
        let peer = &inner.peers[usize::from(code.peer.0)];
        let mut start = None;
        loop {
            inner.help(false);
            // Acquire: pairs with the release store of `done` after the effect.
            if peer.done.load(Ordering::Acquire) >= code.counter {
                // Only delayed operations fail after posting.
                if !inner.delay.is_zero()
                    && let Some(e) = lock(&inner.failed).remove(&wr)
                {
                    return Err(e);
                }
                let fetched = if code.fetch {
                    Some(
                        inner
                            .fetched
                            .lock()
                            .remove(&wr)
                            .ok_or(FabricError::UnknownWr { wr })?,
                    )
                } else {
                    None
                };
                return Ok(Completion {
                    wr,
                    peer: code.peer,
                    fetched,
                });
            }
            if peer.dead.load(Ordering::Acquire) {
                return Err(dead(code.peer));
            }
            let waited = start.get_or_insert_with(Instant::now).elapsed();
            if waited >= timeout {
                return Err(FabricError::Timeout {
                    what: format!("completion of {wr:?} to {}", code.peer),
                    waited,
                });
            }
            if waited < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let g = lock(&inner.completed.0);
            if peer.done.load(Ordering::Acquire) < code.counter {
                let _ = inner
                    .completed
                    .1
                    .wait_timeout(g, (timeout - waited).min(MAX_SLEEP));
            }
        }
    }

    fn recv(&self, timeout: Duration) -> Result<Option<Incoming>, FabricError> {
        let inner = &self.inner;
        let inbox = &inner.peers[usize::from(inner.rank.0)].inbox;
        let mut rx = inner.rx.lock();
        inner.help(true);
        if let Some(r) = inner.poll_rings(&mut rx) {
            return r.map(Some);
        }
        // A poller (zero timeout) comes back at once. Read space is handed back every quarter
        // ring (in `poll_rings`) and when idle (below), not on every empty poll: zeroing the
        // entry just read would pull the cache line the producer writes next away from it.
        if timeout.is_zero() {
            return Ok(None);
        }
        let start = Instant::now();
        loop {
            // Poll a batch before looking at the clock: a reply is noticed within one poll.
            for _ in 0..POLLS_PER_CLOCK {
                inner.help(true);
                if let Some(r) = inner.poll_rings(&mut rx) {
                    return r.map(Some);
                }
                std::hint::spin_loop();
            }
            let waited = start.elapsed();
            if waited >= timeout {
                inner.release_rings(&rx);
                return Ok(None);
            }
            if waited < SPIN {
                continue;
            }
            // Idle: hand the read space back before sleeping.
            inner.release_rings(&rx);
            let seq = inbox.u32_at(WAKE).load(Ordering::Acquire);
            inbox.u32_at(SLEEPERS).fetch_add(1, Ordering::SeqCst);
            // SeqCst fence: pairs with the producer's fence between publishing an entry and
            // its sleeper check, so either it sees us sleeping or we see its entry.
            fence(Ordering::SeqCst);
            if !inner.anything_pending(&rx) {
                inbox.futex_wait(WAKE, seq, (timeout - waited).min(MAX_SLEEP));
            }
            inbox.u32_at(SLEEPERS).fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl ShmFabric {
    fn post_write_inner(
        &self,
        peer: NodeId,
        dst: RemoteAddr,
        data: &[u8],
        imm: Option<u32>,
    ) -> Result<WrId, FabricError> {
        let inner = &self.inner;
        check_peer(peer, inner.peers.len())?;
        let index = check_range(&inner.regions, dst, data.len() as u64)?;
        if !data.is_empty() {
            inner.check_grant(peer, dst, data.len() as u64)?;
        }
        let op = Op::Write {
            index,
            offset: dst.offset,
            data,
            imm,
        };
        inner.post(peer, op)
    }
}

/// Plain memory shared between processes of one host, outside any group: the raw primitive
/// the shm backend is built on, for benchmarks that measure it beside the fabric. Another
/// process maps the same memory by opening [`SharedMemory::proc_path`].
#[derive(Debug)]
pub struct SharedMemory {
    map: Mapping,
    file: File,
}

impl SharedMemory {
    /// Fresh zeroed shared memory of at least `len` bytes.
    pub fn create(name: &str, len: usize) -> Result<SharedMemory, FabricError> {
        let file = memfd(name, len)?;
        SharedMemory::from_file(file, len)
    }

    /// Maps the shared memory another process created, by its [`SharedMemory::proc_path`].
    pub fn open(path: &std::path::Path, len: usize) -> Result<SharedMemory, FabricError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| FabricError::Io {
                op: format!("opening shared memory {}", path.display()),
                source,
            })?;
        SharedMemory::from_file(file, len)
    }

    fn from_file(file: File, len: usize) -> Result<SharedMemory, FabricError> {
        let map = Mapping::map(&file, map_len(len)).map_err(|source| FabricError::Io {
            op: "mapping shared memory".into(),
            source,
        })?;
        Ok(SharedMemory { map, file })
    }

    /// A path under `/proc` through which another process of this host can open this memory
    /// while this process lives.
    pub fn proc_path(&self) -> std::path::PathBuf {
        use std::os::fd::AsRawFd;
        format!("/proc/{}/fd/{}", std::process::id(), self.file.as_raw_fd()).into()
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is mapped (never: mappings are at least a page).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The 64-bit word at `offset` (8-byte aligned, in range; panics otherwise).
    pub fn word(&self, offset: usize) -> &AtomicU64 {
        self.map.u64_at(offset)
    }

    /// Copies `data` in at `offset` (in range; panics otherwise).
    pub fn copy_in(&self, offset: usize, data: &[u8]) {
        self.map.copy_in(offset, data);
    }
}

/// This node's copy of a region.
#[derive(Debug)]
struct ShmRegion {
    id: RegionId,
    len: usize,
    map: Arc<Mapping>,
}

impl LocalRegion for ShmRegion {
    fn len(&self) -> usize {
        self.len
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), FabricError> {
        let range = local_range(self.id, offset, buf.len(), self.len)?;
        // Acquire: pairs with the writer's release fence, for reads ordered after a doorbell
        // or a load of a word.
        fence(Ordering::Acquire);
        self.map.copy_out(range.start, buf);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), FabricError> {
        let range = local_range(self.id, offset, data.len(), self.len)?;
        self.map.copy_in(range.start, data);
        Ok(())
    }

    fn load_u64(&self, offset: u64) -> Result<u64, FabricError> {
        if offset % 8 != 0 {
            return Err(FabricError::Misaligned { offset });
        }
        let range = local_range(self.id, offset, 8, self.len)?;
        // Acquire: pairs with the release after a remote write and with fetch_add.
        Ok(self.map.u64_at(range.start).load(Ordering::Acquire))
    }
}

/// Operations waiting for their injected delay, in due order.
#[derive(Debug)]
struct Delayed {
    queue: Mutex<DelayQueue>,
    wake: Condvar,
    /// Held while running jobs, so they run one at a time, in due order.
    exec: Mutex<()>,
    /// Payload bytes of `Apply` jobs queued.
    in_flight: AtomicU64,
}

#[derive(Debug)]
struct DelayQueue {
    jobs: BTreeMap<(Instant, u64), Job>,
    next: u64,
    /// Last due time per peer for effects and for acknowledgements, so each stays FIFO.
    apply_due: Vec<Option<Instant>>,
    ack_due: Vec<Option<Instant>>,
}

#[derive(Debug)]
enum Job {
    Apply {
        peer: NodeId,
        wr: WrId,
        op: Op<Vec<u8>>,
    },
    Ack {
        peer: NodeId,
        wr: WrId,
        result: Result<Option<u64>, FabricError>,
    },
}

impl Delayed {
    fn new(nodes: usize) -> Delayed {
        Delayed {
            queue: Mutex::new(DelayQueue {
                jobs: BTreeMap::new(),
                next: 0,
                apply_due: vec![None; nodes],
                ack_due: vec![None; nodes],
            }),
            wake: Condvar::new(),
            exec: Mutex::new(()),
            in_flight: AtomicU64::new(0),
        }
    }

    fn schedule(&self, ack: bool, peer: NodeId, delay: Duration, job: Job) {
        let mut q = lock(&self.queue);
        let p = usize::from(peer.0);
        let last = if ack {
            &mut q.ack_due[p]
        } else {
            &mut q.apply_due[p]
        };
        let due = last.map_or(Instant::now() + delay, |l| l.max(Instant::now() + delay));
        *last = Some(due);
        let key = (due, q.next);
        q.next += 1;
        q.jobs.insert(key, job);
        self.wake.notify_one();
    }

    fn push(&self, peer: NodeId, wr: WrId, op: Op<Vec<u8>>, delay: Duration) {
        self.in_flight
            .fetch_add(op.bytes() as u64, Ordering::Relaxed);
        self.schedule(false, peer, delay, Job::Apply { peer, wr, op });
    }

    /// Payload bytes posted and not yet applied.
    fn bytes_in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn push_ack(
        &self,
        peer: NodeId,
        wr: WrId,
        result: Result<Option<u64>, FabricError>,
        delay: Duration,
    ) {
        self.schedule(true, peer, delay, Job::Ack { peer, wr, result });
    }

    /// Takes the first job if it is due (by `slack` already), unless it is an effect on `skip`'s memory (so that
    /// the order of jobs is kept, the caller then stops).
    fn pop_due(&self, skip: Option<NodeId>, slack: Duration) -> Option<Job> {
        let mut q = lock(&self.queue);
        let (&(due, _), job) = q.jobs.first_key_value()?;
        if due + slack > Instant::now()
            || matches!(job, Job::Apply { peer, .. } if Some(*peer) == skip)
        {
            return None;
        }
        let job = q.jobs.pop_first().map(|(_, j)| j);
        if let Some(Job::Apply { op, .. }) = &job {
            self.in_flight
                .fetch_sub(op.bytes() as u64, Ordering::Relaxed);
        }
        job
    }

    /// Sleeps until the first job is overdue by `FALLBACK_SLACK` (or something is scheduled,
    /// or `MAX_SLEEP` passed).
    fn sleep_until_due(&self, stop: &AtomicBool) {
        let q = lock(&self.queue);
        if stop.load(Ordering::Acquire) {
            return;
        }
        let wait = match q.jobs.keys().next() {
            None => MAX_SLEEP,
            Some(&(due, _)) => (due + FALLBACK_SLACK)
                .saturating_duration_since(Instant::now())
                .min(MAX_SLEEP),
        };
        if !wait.is_zero() {
            let _ = self.wake.wait_timeout(q, wait);
        }
    }
}
