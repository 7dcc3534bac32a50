//! The completion queue every backend uses: which operations are in flight to each peer, the
//! completions waiting to be taken, and the bounds that make a full queue back-pressure
//! instead of an overrun (`docs/fabric.md`, flow control).
//!
//! A signalled operation's completion, and any operation's failure, is queued once and taken
//! once, by `poll_completions` or by `wait` on its id. Backends whose operations complete
//! asynchronously (tcp, sim, the delay decorator) record each post with [`Cq::begin`] and
//! complete them in posting order per peer; shm completes at posting ([`Cq::immediate`]).
//!
//! Bounds: per peer, at most [`SEND_WINDOW`] operations in flight or with a completion not
//! taken; in all, at most [`COMPLETION_QUEUE_DEPTH`] completions owed (in flight or waiting).
//! The queue of waiting completions is allocated once at that depth, so completing never
//! allocates. Threads: any poster, the thread that completes (the poster itself on shm, the
//! socket driver on tcp), and the pollers, under one spin lock.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::Arc;

use crate::notifier::Notifier;
use crate::sys::{SpinGuard, SpinLock};
use crate::wr_code::WrCode;
use crate::{
    COMPLETION_QUEUE_DEPTH, Completion, DeathCause, FabricError, NodeId, Resource, SEND_WINDOW,
    Signal, Status, WrId,
};

#[derive(Debug, Clone, Copy)]
struct InFlight {
    counter: u64,
    signal: Signal,
}

#[derive(Debug, Default)]
struct PeerOps {
    /// Posted and not completed, in posting order (grows to at most `SEND_WINDOW`).
    inflight: VecDeque<InFlight>,
    /// Completions for this peer waiting in `ready`.
    waiting: usize,
}

#[derive(Debug)]
struct State {
    peers: Vec<PeerOps>,
    ready: VecDeque<Completion>,
    /// Operations in flight to every peer.
    inflight: usize,
}

/// One endpoint's completion queue.
#[derive(Debug)]
pub(crate) struct Cq {
    state: SpinLock<State>,
    notifier: Arc<Notifier>,
}

/// What `take` found for a work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Take {
    Ready(Completion),
    Pending,
    Unknown,
}

/// Room for one completion, held under the queue's lock (see [`Cq::reserve`]).
pub(crate) struct Slot<'a> {
    cq: &'a Cq,
    st: SpinGuard<'a, State>,
    peer: NodeId,
}

impl Slot<'_> {
    /// Queues the completion of operation `counter`.
    #[inline]
    pub fn complete(mut self, counter: u64, status: Status) {
        Cq::push(&mut self.st, self.peer, counter, status);
        let cq = self.cq;
        drop(self);
        cq.notifier.notify();
    }
}

impl Cq {
    pub fn new(nodes: usize, notifier: Arc<Notifier>) -> Cq {
        Cq {
            state: SpinLock::new(State {
                peers: (0..nodes).map(|_| PeerOps::default()).collect(),
                ready: VecDeque::with_capacity(COMPLETION_QUEUE_DEPTH),
                inflight: 0,
            }),
            notifier,
        }
    }

    fn room(st: &State, peer: NodeId) -> Result<(), FabricError> {
        let p = &st.peers[peer.index()];
        if p.inflight.len() + p.waiting >= SEND_WINDOW {
            return Err(FabricError::WouldBlock {
                peer,
                resource: Resource::SendWindow,
            });
        }
        if st.inflight + st.ready.len() >= COMPLETION_QUEUE_DEPTH {
            return Err(FabricError::WouldBlock {
                peer,
                resource: Resource::CompletionQueue,
            });
        }
        Ok(())
    }

    /// Records a posted operation that completes later (in posting order per peer). The
    /// caller numbers operations to one peer in increasing order under its own link lock.
    pub fn begin(&self, peer: NodeId, counter: u64, signal: Signal) -> Result<(), FabricError> {
        let mut st = self.state.lock();
        Cq::room(&st, peer)?;
        st.peers[peer.index()]
            .inflight
            .push_back(InFlight { counter, signal });
        st.inflight += 1;
        Ok(())
    }

    /// For an operation to `peer` that completes at posting (shm) and is signalled: checks
    /// room and holds the queue until [`Slot::complete`] queues its completion, so the post
    /// takes the queue's lock once.
    #[inline]
    pub fn reserve(&self, peer: NodeId) -> Result<Slot<'_>, FabricError> {
        let st = self.state.lock();
        Cq::room(&st, peer)?;
        Ok(Slot { cq: self, st, peer })
    }

    fn push(st: &mut State, peer: NodeId, counter: u64, status: Status) {
        let wr = WrCode::encode(counter, peer);
        st.ready.push_back(Completion { wr, peer, status });
        st.peers[peer.index()].waiting += 1;
    }

    /// Completes the oldest operation in flight to `peer` with `status`; its counter, or
    /// `None` when nothing was in flight (a peer answering what we never sent).
    pub fn complete_next(&self, peer: NodeId, status: Status) -> Option<u64> {
        let mut st = self.state.lock();
        let op = st.peers[peer.index()].inflight.pop_front()?;
        st.inflight -= 1;
        let queued = op.signal == Signal::Always || !matches!(status, Status::Done);
        if queued {
            Cq::push(&mut st, peer, op.counter, status);
        }
        drop(st);
        if queued {
            self.notifier.notify();
        }
        Some(op.counter)
    }

    /// Completes every operation to `peer` up to and including `counter` (the earlier ones
    /// `Done`, that one with `status`). `false` if `counter` was not in flight.
    pub fn complete_through(&self, peer: NodeId, counter: u64, status: Status) -> bool {
        let mut st = self.state.lock();
        if !st.peers[peer.index()]
            .inflight
            .iter()
            .any(|op| op.counter == counter)
        {
            return false;
        }
        let mut queued = false;
        while let Some(op) = st.peers[peer.index()].inflight.pop_front() {
            st.inflight -= 1;
            let last = op.counter == counter;
            let s = if last { status } else { Status::Done };
            if op.signal == Signal::Always || !matches!(s, Status::Done) {
                Cq::push(&mut st, peer, op.counter, s);
                queued = true;
            }
            if last {
                break;
            }
        }
        drop(st);
        if queued {
            self.notifier.notify();
        }
        true
    }

    /// Fails everything in flight to a dead peer (verbs' flush): each gets a `PeerDead`
    /// completion, signalled or not.
    pub fn fail_peer(&self, peer: NodeId, cause: DeathCause) {
        let mut st = self.state.lock();
        let mut any = false;
        while let Some(op) = st.peers[peer.index()].inflight.pop_front() {
            st.inflight -= 1;
            Cq::push(&mut st, peer, op.counter, Status::PeerDead(cause));
            any = true;
        }
        drop(st);
        if any {
            self.notifier.notify();
        }
    }

    /// Moves up to `out.len()` waiting completions into `out`, oldest first.
    #[inline]
    pub fn poll(&self, out: &mut [Completion]) -> usize {
        if out.is_empty() {
            return 0;
        }
        let mut st = self.state.lock();
        let mut n = 0;
        while n < out.len() {
            let Some(c) = st.ready.pop_front() else { break };
            st.peers[c.peer.index()].waiting -= 1;
            out[n] = c;
            n += 1;
        }
        n
    }

    /// The contract's `poll_completion`: `wr`'s completion if it is waiting, `None` while it
    /// is in flight, `UnknownWr` otherwise.
    pub fn poll_one(&self, wr: WrId) -> Result<Option<Completion>, FabricError> {
        match self.take(wr) {
            Take::Ready(c) => Ok(Some(c)),
            Take::Pending => Ok(None),
            Take::Unknown => Err(FabricError::UnknownWr { wr }),
        }
    }

    /// Takes `wr`'s completion if it is waiting; says whether it may still come otherwise.
    fn take(&self, wr: WrId) -> Take {
        let code = WrCode::decode(wr);
        let mut st = self.state.lock();
        if code.peer.index() >= st.peers.len() {
            return Take::Unknown;
        }
        // The completion waited for is most often the newest.
        if st.ready.back().is_some_and(|c| c.wr == wr) {
            let c = st.ready.pop_back().expect("back exists");
            st.peers[c.peer.index()].waiting -= 1;
            return Take::Ready(c);
        }
        if let Some(i) = st.ready.iter().position(|c| c.wr == wr) {
            let c = st.ready.remove(i).expect("position is in range");
            st.peers[c.peer.index()].waiting -= 1;
            return Take::Ready(c);
        }
        let pending = st.peers[code.peer.index()]
            .inflight
            .iter()
            .any(|op| op.counter == code.counter && op.signal == Signal::Always);
        if pending {
            Take::Pending
        } else {
            Take::Unknown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cq(nodes: usize) -> Cq {
        Cq::new(nodes, Arc::new(Notifier::new().unwrap()))
    }

    #[test]
    fn completions_come_out_once_in_order_and_unsignalled_successes_not_at_all() {
        let q = cq(2);
        let p = NodeId(1);
        q.begin(p, 1, Signal::Always).unwrap();
        q.begin(p, 2, Signal::OnError).unwrap();
        q.begin(p, 3, Signal::Always).unwrap();
        assert!(q.complete_through(p, 3, Status::Fetched(7)));
        let mut out = [Completion::EMPTY; 4];
        assert_eq!(q.poll(&mut out), 2);
        assert_eq!(out[0].wr, WrCode::encode(1, p));
        assert_eq!(out[1].status, Status::Fetched(7));
        assert_eq!(q.poll(&mut out), 0);
    }

    #[test]
    fn a_dead_peer_fails_every_operation_in_flight_signalled_or_not() {
        let q = cq(2);
        let p = NodeId(1);
        q.begin(p, 1, Signal::OnError).unwrap();
        q.begin(p, 2, Signal::Always).unwrap();
        q.fail_peer(p, DeathCause::Silent);
        let mut out = [Completion::EMPTY; 4];
        assert_eq!(q.poll(&mut out), 2);
        assert!(
            out[..2]
                .iter()
                .all(|c| c.status == Status::PeerDead(DeathCause::Silent))
        );
    }

    #[test]
    fn a_full_window_is_back_pressure_until_completions_are_taken() {
        let q = cq(2);
        let p = NodeId(1);
        for c in 1..=SEND_WINDOW as u64 {
            q.begin(p, c, Signal::Always).unwrap();
        }
        assert!(matches!(
            q.begin(p, 999, Signal::Always),
            Err(FabricError::WouldBlock {
                resource: Resource::SendWindow,
                ..
            })
        ));
        q.complete_through(p, SEND_WINDOW as u64, Status::Done);
        // Completed but not taken: still owed.
        assert!(q.reserve(p).is_err());
        let mut out = vec![Completion::EMPTY; SEND_WINDOW];
        assert_eq!(q.poll(&mut out), SEND_WINDOW);
        assert!(q.reserve(p).is_ok());
        // Other peers were never blocked.
        assert!(q.reserve(NodeId(0)).is_ok());
    }

    #[test]
    fn take_finds_one_completion_and_tells_pending_from_unknown() {
        let q = cq(2);
        let p = NodeId(1);
        q.begin(p, 1, Signal::Always).unwrap();
        q.begin(p, 2, Signal::Always).unwrap();
        q.begin(p, 3, Signal::OnError).unwrap();
        assert_eq!(q.take(WrCode::encode(2, p)), Take::Pending);
        assert_eq!(q.take(WrCode::encode(3, p)), Take::Unknown);
        q.complete_through(p, 2, Status::Done);
        assert!(matches!(q.take(WrCode::encode(2, p)), Take::Ready(_)));
        assert_eq!(q.take(WrCode::encode(2, p)), Take::Unknown);
        let mut out = [Completion::EMPTY; 4];
        assert_eq!(q.poll(&mut out), 1, "wr 1 stays for poll");
        assert_eq!(q.take(WrCode::encode(9, NodeId(7))), Take::Unknown);
    }

    #[test]
    fn an_answer_for_nothing_in_flight_is_noticed() {
        let q = cq(2);
        assert_eq!(q.complete_next(NodeId(1), Status::Done), None);
        assert!(!q.complete_through(NodeId(1), 5, Status::Done));
    }
}
