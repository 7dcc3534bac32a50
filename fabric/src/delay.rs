//! Injected latency over any backend (`docs/fabric.md`, injected delay), since `netem` is not
//! available here: [`Delayed`] wraps an endpoint so that every operation takes effect at its
//! target `delay` after it was posted (one way), and its completion reaches the source `delay`
//! after the inner backend completed it (the acknowledgement travelling back). A write and
//! its wait therefore cost at least `2 * delay`, as a doorbell ping-pong and a `fetch_add` do;
//! per-peer order is kept, and posting never blocks for the delay.
//!
//! How: a post is checked at once (a bad one has no effect and fails as on any backend), then
//! queued; it is issued to the inner backend when due, always signalled, and its inner
//! completion is held until it is due at the source. Whoever polls the decorated endpoint (and
//! so every blocking `wait`/`recv` while it spins) issues and releases what is due, which is
//! what makes short delays accurate; the `fabric-delay` thread covers, up to `FALLBACK_SLACK`
//! late, for a poster that went off doing something else. The notifier is an epoll instance
//! over the inner notifier, a timer armed for the next due time, and the decorator's own
//! completion notifier. Incoming items pass straight through: they were delayed at their
//! source.
//!
//! A delayed inline write or message is copied into the queue (the delay is a measuring tool;
//! its posts allocate). Bytes from a registered region are read by the inner backend when the
//! write is issued, as a NIC would: they must stay unchanged until the completion.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use crate::checks::{check_message, check_peer, check_word, check_write};
use crate::cq::Cq;
use crate::notifier::Notifier;
use crate::wr_code::WrCode;
use crate::{
    Completion, Fabric, FabricError, IncomingBatch, LocalSlice, Memory, NodeId, RegionId,
    RegionSpec, RemoteAddr, SEND_WINDOW, Signal, Source, Status, WrId,
};

/// How late a due operation may be before the fallback thread issues it (callers polling
/// issue on time; the thread covers for a poster that polls nothing).
const FALLBACK_SLACK: Duration = Duration::from_micros(100);

/// Completions taken from the inner backend per round.
const INNER_BATCH: usize = 64;

/// An endpoint whose every operation is delayed.
#[derive(Debug)]
pub struct Delayed {
    state: Arc<State>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct State {
    inner: Arc<dyn Fabric>,
    regions: Vec<RegionSpec>,
    delay: Duration,
    cq: Cq,
    notifier: Arc<Notifier>,
    queue: Mutex<Queue>,
    epoll: Epoll,
    timer: TimerFd,
    stop: AtomicBool,
}

#[derive(Debug)]
struct Queue {
    next_counter: u64,
    /// Posted, not yet issued, in posting (and so due) order.
    posts: VecDeque<Pending>,
    /// Per peer, in posting order: operations issued to the inner backend, `None` until it
    /// completes them (or at once, with their failure, when issuing failed).
    issued: Vec<VecDeque<Option<Status>>>,
    /// Inner completions waiting to be due at the source, in order.
    held: VecDeque<(Instant, NodeId, Status)>,
}

#[derive(Debug)]
struct Pending {
    due: Instant,
    peer: NodeId,
    op: Op,
}

#[derive(Debug)]
enum Op {
    Write {
        dst: RemoteAddr,
        src: Bytes,
        imm: Option<u32>,
    },
    FetchAdd {
        dst: RemoteAddr,
        add: u64,
    },
    Send {
        msg: Vec<u8>,
    },
}

impl Op {
    fn uses_credit(&self) -> bool {
        matches!(self, Op::Write { imm: Some(_), .. } | Op::Send { .. })
    }
}

#[derive(Debug)]
enum Bytes {
    Region(LocalSlice),
    Copied(Vec<u8>),
}

impl Delayed {
    /// Wraps `inner` (whose group registers `regions`) so that every operation is delayed
    /// by `delay` each way.
    pub fn new(
        inner: Arc<dyn Fabric>,
        regions: Vec<RegionSpec>,
        delay: Duration,
    ) -> Result<Delayed, FabricError> {
        let notifier = Arc::new(Notifier::new()?);
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| FabricError::io("creating the delay's epoll instance")(e.into()))?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(|e| FabricError::io("creating the delay's timer")(e.into()))?;
        let watch = EpollEvent::new(EpollFlags::EPOLLIN, 0);
        epoll
            .add(inner.notifier(), watch)
            .and_then(|()| epoll.add(notifier.fd(), watch))
            .and_then(|()| epoll.add(timer.as_fd(), watch))
            .map_err(|e| FabricError::io("watching the delay's notifiers")(e.into()))?;
        let nodes = inner.nodes();
        let state = Arc::new(State {
            cq: Cq::new(nodes, Arc::clone(&notifier)),
            notifier,
            queue: Mutex::new(Queue {
                next_counter: 1,
                posts: VecDeque::with_capacity(SEND_WINDOW),
                issued: (0..nodes).map(|_| VecDeque::new()).collect(),
                held: VecDeque::new(),
            }),
            inner,
            regions,
            delay,
            epoll,
            timer,
            stop: AtomicBool::new(false),
        });
        let fallback = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("fabric-delay".into())
            .spawn(move || fallback.run_fallback())
            .map_err(FabricError::io("spawning the delay thread"))?;
        Ok(Delayed {
            state,
            thread: Some(thread),
        })
    }

    /// The decorated endpoint.
    pub fn inner(&self) -> &Arc<dyn Fabric> {
        &self.state.inner
    }
}

impl Drop for Delayed {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Doorbells and messages to `peer` posted and not yet issued.
    fn queued_credits(q: &Queue, peer: NodeId) -> usize {
        q.posts
            .iter()
            .filter(|p| p.peer == peer && p.op.uses_credit())
            .count()
    }

    fn post(&self, peer: NodeId, op: Op, signal: Signal) -> Result<WrId, FabricError> {
        let mut q = self.lock();
        if op.uses_credit() && self.inner.credits(peer)? <= State::queued_credits(&q, peer) {
            return Err(FabricError::WouldBlock {
                peer,
                resource: crate::Resource::ReceiveCredits,
            });
        }
        let counter = q.next_counter;
        self.cq.begin(peer, counter, signal)?;
        q.next_counter += 1;
        q.posts.push_back(Pending {
            due: Instant::now() + self.delay,
            peer,
            op,
        });
        Ok(WrCode::encode(counter, peer))
    }

    /// Issues what is due, takes the inner completions, releases what is due at the source.
    fn pump(&self) {
        let mut q = self.lock();
        let now = Instant::now();
        let mut blocked = 0u64;
        let mut i = 0;
        while i < q.posts.len() {
            if q.posts[i].due > now {
                break;
            }
            let peer = q.posts[i].peer;
            // A peer that refused for now (window, credits) keeps the rest of its posts back
            // (past 64 peers, everything behind the refusal waits).
            if peer.index() >= 64 && blocked != 0 || blocked & (1 << peer.index().min(63)) != 0 {
                i += 1;
                continue;
            }
            let p = &q.posts[i];
            let issued = match &p.op {
                Op::Write { dst, src, imm } => {
                    let src = match src {
                        Bytes::Region(s) => Source::Region(*s),
                        Bytes::Copied(b) if b.is_empty() => Source::Empty,
                        Bytes::Copied(b) => Source::Inline(b),
                    };
                    self.inner.post_write(peer, *dst, src, *imm, Signal::Always)
                }
                Op::FetchAdd { dst, add } => self.inner.post_fetch_add(peer, *dst, *add),
                Op::Send { msg } => self.inner.post_send(peer, msg, Signal::Always),
            };
            let slot = match issued {
                Ok(_) => None,
                Err(FabricError::WouldBlock { .. }) => {
                    blocked |= 1 << peer.index().min(63);
                    i += 1;
                    continue;
                }
                // Failed at issue: its failure travels back like a completion, in its place.
                Err(FabricError::AccessDenied {
                    region,
                    offset,
                    len,
                    ..
                }) => Some(Status::Denied {
                    region,
                    offset,
                    len,
                }),
                Err(FabricError::PeerDead { cause, .. }) => Some(Status::PeerDead(cause)),
                Err(other) => {
                    tracing::warn!("a delayed operation failed when issued: {other}");
                    Some(Status::PeerDead(crate::DeathCause::Closed))
                }
            };
            q.posts.remove(i);
            q.issued[peer.index()].push_back(slot);
            self.release_ready(&mut q, peer);
        }
        let mut out = [Completion::EMPTY; INNER_BATCH];
        loop {
            let n = self.inner.poll_completions(&mut out);
            for c in &out[..n] {
                // The inner backend completes each peer in the order they were issued.
                if let Some(slot) = q.issued[c.peer.index()].iter_mut().find(|s| s.is_none()) {
                    *slot = Some(c.status);
                }
                self.release_ready(&mut q, c.peer);
            }
            if n < out.len() {
                break;
            }
        }
        let now = Instant::now();
        while q.held.front().is_some_and(|(due, _, _)| *due <= now) {
            let (_, peer, status) = q.held.pop_front().expect("front exists");
            self.cq.complete_next(peer, status);
        }
    }

    /// Moves `peer`'s completed operations, in posting order, onto their way back.
    fn release_ready(&self, q: &mut Queue, peer: NodeId) {
        while let Some(Some(status)) = q.issued[peer.index()].front().copied() {
            q.issued[peer.index()].pop_front();
            q.held
                .push_back((Instant::now() + self.delay, peer, status));
        }
    }

    /// The next instant something falls due.
    fn next_due(&self) -> Option<Instant> {
        let q = self.lock();
        let a = q.posts.front().map(|p| p.due);
        let b = q.held.front().map(|(d, _, _)| *d);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn has_work(&self) -> bool {
        let q = self.lock();
        !q.posts.is_empty() || !q.held.is_empty() || q.issued.iter().any(|i| !i.is_empty())
    }

    fn run_fallback(&self) {
        crate::sys::tighten_timer_slack();
        while !self.stop.load(Ordering::Acquire) {
            let wait = match self.next_due() {
                Some(due) => (due + FALLBACK_SLACK).saturating_duration_since(Instant::now()),
                None if self.has_work() => FALLBACK_SLACK,
                None => Duration::from_millis(5),
            };
            std::thread::sleep(wait.min(Duration::from_millis(5)));
            if self.has_work() {
                self.pump();
            }
        }
    }
}

impl Fabric for Delayed {
    fn rank(&self) -> NodeId {
        self.state.inner.rank()
    }

    fn nodes(&self) -> usize {
        self.state.inner.nodes()
    }

    fn memory(&self, region: RegionId) -> Result<&Memory, FabricError> {
        self.state.inner.memory(region)
    }

    fn post_write(
        &self,
        peer: NodeId,
        dst: RemoteAddr,
        src: Source<'_>,
        imm: Option<u32>,
        signal: Signal,
    ) -> Result<WrId, FabricError> {
        let st = &self.state;
        check_peer(peer, st.inner.nodes())?;
        check_write(&st.regions, dst, &src)?;
        let src = match src {
            Source::Region(s) => Bytes::Region(s),
            Source::Inline(b) => Bytes::Copied(b.to_vec()),
            Source::Empty => Bytes::Copied(Vec::new()),
        };
        st.post(peer, Op::Write { dst, src, imm }, signal)
    }

    fn post_fetch_add(&self, peer: NodeId, dst: RemoteAddr, add: u64) -> Result<WrId, FabricError> {
        let st = &self.state;
        check_peer(peer, st.inner.nodes())?;
        check_word(&st.regions, dst)?;
        st.post(peer, Op::FetchAdd { dst, add }, Signal::Always)
    }

    fn credits(&self, peer: NodeId) -> Result<usize, FabricError> {
        let st = &self.state;
        let q = st.lock();
        let left = st.inner.credits(peer)?;
        Ok(left.saturating_sub(State::queued_credits(&q, peer)))
    }

    fn post_send(&self, peer: NodeId, msg: &[u8], signal: Signal) -> Result<WrId, FabricError> {
        let st = &self.state;
        check_peer(peer, st.inner.nodes())?;
        check_message(msg.len())?;
        st.post(peer, Op::Send { msg: msg.to_vec() }, signal)
    }

    fn poll_completions(&self, out: &mut [Completion]) -> usize {
        self.state.pump();
        self.state.cq.poll(out)
    }

    fn poll_completion(&self, wr: WrId) -> Result<Option<Completion>, FabricError> {
        self.state.pump();
        self.state.cq.poll_one(wr)
    }

    fn poll_incoming(&self, out: &mut IncomingBatch) -> usize {
        self.state.pump();
        self.state.inner.poll_incoming(out)
    }

    fn notifier(&self) -> BorrowedFd<'_> {
        self.state.epoll.0.as_fd()
    }

    fn arm_notifier(&self) {
        let st = &self.state;
        // Drain an expired timer, then arm it for the next due time.
        let _ = st.timer.unset();
        if let Some(due) = st.next_due() {
            let left = due.saturating_duration_since(Instant::now());
            let left = TimeSpec::from_duration(left.max(Duration::from_nanos(1)));
            let _ = st
                .timer
                .set(Expiration::OneShot(left), TimerSetTimeFlags::empty());
        }
        st.notifier.arm();
        st.inner.arm_notifier();
    }

    fn spin_before_sleep(&self) -> Duration {
        self.state.inner.spin_before_sleep()
    }
}
