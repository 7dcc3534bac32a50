//! The simulated backend: every node of a group in one process, modelling exactly the written
//! contract (`docs/fabric.md`) and nothing more, deterministically.
//!
//! Why: the DSM's protocol is tested on this backend, so any ordering the contract does not
//! promise must actually happen here, and a failing run must replay exactly from its seed.
//! There is no wall clock and no thread deciding delivery order: time is a tick counter that
//! advances only when an event is delivered; every operation becomes an event due `delay`
//! plus a seeded jitter after posting, never before an earlier event on the same (source,
//! target) link, and its completion another `delay` plus jitter later, in order per link. So
//! operations to different peers, and from different sources to one target, interleave in an
//! order the seed decides. Grants are checked at the target (the harder path for callers: the
//! refusal arrives as a completion). Doorbells and messages consume receive credits; a target
//! returns each credit, as a message of its own, when it polls the item. [`SimGroup::kill`]
//! silences a node; survivors learn of it after a seeded lag below the heartbeat timeout.
//!
//! Who delivers: in the default *auto* mode, every poll on an endpoint (and so every blocking
//! `wait`/`recv`) first delivers everything pending, in due order, so ordinary multi-threaded
//! code runs on the simulator unchanged. In *manual* mode ([`SimOptions::manual`]) nothing is
//! delivered until the test calls [`SimGroup::step`], which delivers exactly one event: a
//! single-threaded harness then decides, from its own seeded schedule, when each node acts and
//! when the network moves, and two runs from one seed produce the same [`SimGroup::log`].
//!
//! Threads: any number of callers. One lock (`Net::state`) guards all scheduling state and the
//! regions' bytes are written under it; each endpoint's completion queue has its own lock,
//! always taken after `state` when both are held.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::checks::{check_message, check_peer, check_word, check_write};
use crate::cq::Cq;
use crate::inbound::Inbound;
use crate::notifier::Notifier;
use crate::wr_code::WrCode;
use crate::{
    Completion, DeathCause, Fabric, FabricError, IncomingBatch, Memory, NodeId, RECV_CREDITS,
    RegionSpec, RemoteAddr, Resource, Signal, Source, Status, WrId,
};

/// How a simulated group behaves. Times are in ticks (think of a tick as a nanosecond).
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Names the run: the jitter draws and so the order of events; printed by failing tests
    /// and replayed from.
    pub seed: u64,
    /// One-way latency added to every operation and acknowledgement.
    pub delay: u64,
    /// Each operation's and each acknowledgement's extra latency is drawn in `0..=jitter`.
    pub jitter: u64,
    /// Survivors learn of a killed node within this many ticks.
    pub heartbeat_timeout: u64,
    /// Polls deliver pending events themselves (auto) or only [`SimGroup::step`] does.
    pub auto_step: bool,
}

impl SimOptions {
    /// Auto-stepping timings for `seed`: no delay, up to 1000 ticks of jitter.
    pub fn seeded(seed: u64) -> SimOptions {
        SimOptions {
            seed,
            delay: 0,
            jitter: 1000,
            heartbeat_timeout: 1_000_000,
            auto_step: true,
        }
    }

    /// As [`SimOptions::seeded`], but only [`SimGroup::step`] delivers.
    pub fn manual(seed: u64) -> SimOptions {
        SimOptions {
            auto_step: false,
            ..SimOptions::seeded(seed)
        }
    }
}

/// One delivered event, as [`SimGroup::log`] records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogEntry {
    /// The tick it was delivered at.
    pub tick: u64,
    pub kind: LogKind,
    /// The operation's source (for a death: the victim).
    pub src: NodeId,
    /// Where it took effect (for a completion or credit: where it arrived).
    pub dst: NodeId,
    /// The operation's counter at its source (0 for credits and deaths).
    pub counter: u64,
}

/// What a [`LogEntry`] delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogKind {
    Write,
    FetchAdd,
    Send,
    Complete,
    Credit,
    Death,
}

/// A simulated group: hands out one endpoint per rank and lets tests move the network.
#[derive(Debug)]
pub struct SimGroup {
    net: Arc<Net>,
    endpoints: Vec<Arc<SimFabric>>,
}

/// One rank's endpoint in a simulated group.
#[derive(Debug)]
pub struct SimFabric {
    net: Arc<Net>,
    rank: NodeId,
    memory: Vec<Arc<Memory>>,
    cq: Arc<Cq>,
    notifier: Arc<Notifier>,
}

#[derive(Debug)]
struct Net {
    nodes: usize,
    regions: Vec<RegionSpec>,
    options: SimOptions,
    state: Mutex<State>,
    /// `memory[node][region index]`.
    memory: Vec<Vec<Arc<Memory>>>,
    cqs: Vec<Arc<Cq>>,
    notifiers: Vec<Arc<Notifier>>,
}

#[derive(Debug)]
struct State {
    rng: SplitMix64,
    now: u64,
    next_event: u64,
    /// Scheduled events by (due tick, scheduling order): equal due ticks keep posting order.
    events: BTreeMap<(u64, u64), Event>,
    /// Last effect due tick per link `src * nodes + dst`, so a link stays FIFO.
    link_due: Vec<u64>,
    /// Last completion/credit due tick per link, so they stay in order too.
    back_due: Vec<u64>,
    node: Vec<NodeState>,
    log: Vec<LogEntry>,
}

#[derive(Debug)]
struct NodeState {
    next_counter: u64,
    killed: bool,
    /// Per peer: this node learnt the peer is dead.
    dead: Vec<bool>,
    incoming: Inbound,
    /// Per peer as target: doorbells and messages we sent it, and the credits it returned.
    sent: Vec<u64>,
    returned: Vec<u64>,
}

#[derive(Debug)]
enum Event {
    Apply {
        src: NodeId,
        dst: NodeId,
        counter: u64,
        op: Op,
    },
    Complete {
        src: NodeId,
        dst: NodeId,
        counter: u64,
        status: Status,
    },
    /// `target` returns one receive credit to `source`.
    Credit {
        source: NodeId,
        target: NodeId,
    },
    Detect {
        victim: NodeId,
    },
}

#[derive(Debug)]
enum Op {
    Write {
        dst: RemoteAddr,
        dst_index: usize,
        data: Data,
        imm: Option<u32>,
    },
    FetchAdd {
        dst: RemoteAddr,
        dst_index: usize,
        add: u64,
    },
    Send {
        data: Vec<u8>,
    },
}

/// A write's bytes: read from the source's region when the write is carried out (as a NIC's
/// DMA would, so a source changed before completion shows), or copied at posting.
#[derive(Debug)]
enum Data {
    Region { index: usize, offset: u64, len: u64 },
    Inline(Vec<u8>),
}

/// Bound on events delivered by one auto-step, against a runaway (no event schedules an
/// unbounded chain: an operation makes one completion, a poll one credit).
const AUTO_STEP_BOUND: usize = 1 << 24;

impl SimGroup {
    /// Builds a group of `nodes` endpoints that all register `regions` in fresh memory.
    pub fn new(
        nodes: usize,
        regions: Vec<RegionSpec>,
        options: SimOptions,
    ) -> Result<SimGroup, FabricError> {
        SimGroup::with_memory(nodes, regions, options, |_, _| None)
    }

    /// As [`SimGroup::new`], with `memory(rank, spec)` supplying the memory a node registers
    /// for a region (`None`: fresh memory).
    pub fn with_memory(
        nodes: usize,
        regions: Vec<RegionSpec>,
        options: SimOptions,
        mut memory: impl FnMut(NodeId, &RegionSpec) -> Option<Arc<Memory>>,
    ) -> Result<SimGroup, FabricError> {
        if nodes == 0 || nodes > usize::from(u16::MAX) + 1 {
            return Err(FabricError::Config(format!(
                "a group has 1 to 65536 nodes, not {nodes}"
            )));
        }
        let mut ids: Vec<_> = regions.iter().map(|r| r.id).collect();
        ids.sort();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(FabricError::Config(format!("{} is registered twice", w[0])));
        }
        let mut mem = Vec::with_capacity(nodes);
        for r in 0..nodes {
            let mut own = Vec::with_capacity(regions.len());
            for spec in &regions {
                let m = match memory(node_id(r), spec) {
                    Some(m) if m.id() == spec.id && m.len() >= spec.len => m,
                    Some(m) => {
                        return Err(FabricError::Config(format!(
                            "memory for {} ({} bytes) does not fit {} of {} bytes",
                            m.id(),
                            m.len(),
                            spec.id,
                            spec.len
                        )));
                    }
                    None => Arc::new(Memory::create(spec.id, spec.len)?),
                };
                own.push(m);
            }
            mem.push(own);
        }
        let notifiers: Vec<Arc<Notifier>> = (0..nodes)
            .map(|_| Notifier::new().map(Arc::new))
            .collect::<Result<_, _>>()?;
        let cqs: Vec<Arc<Cq>> = notifiers
            .iter()
            .map(|n| Arc::new(Cq::new(nodes, Arc::clone(n))))
            .collect();
        let net = Arc::new(Net {
            nodes,
            regions,
            state: Mutex::new(State {
                rng: SplitMix64(options.seed),
                now: 0,
                next_event: 0,
                events: BTreeMap::new(),
                link_due: vec![0; nodes * nodes],
                back_due: vec![0; nodes * nodes],
                node: (0..nodes).map(|_| NodeState::new(nodes)).collect(),
                log: Vec::new(),
            }),
            options,
            memory: mem,
            cqs,
            notifiers,
        });
        let endpoints = (0..nodes)
            .map(|r| {
                Arc::new(SimFabric {
                    net: Arc::clone(&net),
                    rank: node_id(r),
                    memory: net.memory[r].clone(),
                    cq: Arc::clone(&net.cqs[r]),
                    notifier: Arc::clone(&net.notifiers[r]),
                })
            })
            .collect();
        Ok(SimGroup { net, endpoints })
    }

    /// Every endpoint, in rank order.
    pub fn endpoints(&self) -> Vec<Arc<dyn Fabric>> {
        self.endpoints
            .iter()
            .map(|e| Arc::clone(e) as Arc<dyn Fabric>)
            .collect()
    }

    /// The endpoint of `rank`.
    pub fn endpoint(&self, rank: NodeId) -> &Arc<SimFabric> {
        &self.endpoints[rank.index()]
    }

    /// The seed this group's schedule comes from.
    pub fn seed(&self) -> u64 {
        self.net.options.seed
    }

    /// Kills `rank` as if its process died: its calls fail from now on, its operations not
    /// yet delivered are lost, and survivors learn of its death after a seeded lag no longer
    /// than the heartbeat timeout.
    pub fn kill(&self, rank: NodeId) {
        self.net.kill(rank);
    }

    /// Delivers the next event (advancing the tick to its due time); `false` when none is
    /// pending.
    pub fn step(&self) -> bool {
        let mut st = self.net.lock();
        self.net.step(&mut st)
    }

    /// Delivers events until none is pending or `max` were delivered; how many.
    pub fn run_until_idle(&self, max: usize) -> usize {
        let mut st = self.net.lock();
        let mut n = 0;
        while n < max && self.net.step(&mut st) {
            n += 1;
        }
        n
    }

    /// Events scheduled and not yet delivered.
    pub fn pending(&self) -> usize {
        self.net.lock().events.len()
    }

    /// The current tick.
    pub fn now(&self) -> u64 {
        self.net.lock().now
    }

    /// Every event delivered so far, in delivery order.
    pub fn log(&self) -> Vec<LogEntry> {
        self.net.lock().log.clone()
    }
}

impl NodeState {
    fn new(nodes: usize) -> NodeState {
        NodeState {
            next_counter: 1,
            killed: false,
            dead: vec![false; nodes],
            incoming: Inbound::new(nodes),
            sent: vec![0; nodes],
            returned: vec![0; nodes],
        }
    }
}

impl Net {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn draw(&self, st: &mut State) -> u64 {
        let j = self.options.jitter;
        if j == 0 {
            0
        } else {
            st.rng.next_u64() % (j + 1)
        }
    }

    fn schedule(&self, st: &mut State, due: u64, event: Event) {
        let key = (due, st.next_event);
        st.next_event += 1;
        st.events.insert(key, event);
        if self.options.auto_step {
            // Whoever sleeps on a notifier must come back and deliver.
            for n in &self.notifiers {
                n.notify();
            }
        }
    }

    /// The due tick of the next event on link `link` of `table`, kept FIFO.
    fn due_on(&self, st: &mut State, back: bool, link: usize) -> u64 {
        let jitter = self.draw(st);
        let mut due = st.now + self.options.delay + jitter;
        let last = if back {
            &mut st.back_due[link]
        } else {
            &mut st.link_due[link]
        };
        due = due.max(*last);
        *last = due;
        due
    }

    fn link(&self, src: NodeId, dst: NodeId) -> usize {
        src.index() * self.nodes + dst.index()
    }

    fn post(
        &self,
        src: NodeId,
        dst: NodeId,
        op: Op,
        signal: Signal,
        cq: &Cq,
    ) -> Result<WrId, FabricError> {
        let mut st = self.lock();
        let me = src.index();
        if st.node[me].killed {
            return Err(FabricError::Closed);
        }
        if st.node[me].dead[dst.index()] {
            return Err(FabricError::PeerDead {
                peer: dst,
                cause: DeathCause::Killed,
            });
        }
        let consumes_credit = matches!(op, Op::Write { imm: Some(_), .. } | Op::Send { .. });
        if consumes_credit {
            let node = &st.node[me];
            if node.sent[dst.index()] - node.returned[dst.index()] >= RECV_CREDITS as u64 {
                return Err(FabricError::WouldBlock {
                    peer: dst,
                    resource: Resource::ReceiveCredits,
                });
            }
        }
        let counter = st.node[me].next_counter;
        cq.begin(dst, counter, signal)?;
        st.node[me].next_counter += 1;
        if consumes_credit {
            st.node[me].sent[dst.index()] += 1;
        }
        let link = self.link(src, dst);
        let due = self.due_on(&mut st, false, link);
        self.schedule(
            &mut st,
            due,
            Event::Apply {
                src,
                dst,
                counter,
                op,
            },
        );
        Ok(WrCode::encode(counter, dst))
    }

    fn kill(&self, victim: NodeId) {
        let mut st = self.lock();
        let v = victim.index();
        if v >= self.nodes || st.node[v].killed {
            return;
        }
        st.node[v].killed = true;
        // Operations the victim posted that have not reached their targets die with it.
        st.events
            .retain(|_, e| !matches!(e, Event::Apply { src, .. } if *src == victim));
        let hb = self.options.heartbeat_timeout;
        let lag = hb / 4 + st.rng.next_u64() % (hb / 2 + 1);
        let due = st.now + lag;
        self.schedule(&mut st, due, Event::Detect { victim });
    }

    /// Delivers the earliest event.
    fn step(&self, st: &mut State) -> bool {
        let Some(((due, _), event)) = st.events.pop_first() else {
            return false;
        };
        st.now = st.now.max(due);
        self.handle(st, event);
        true
    }

    fn record(st: &mut State, kind: LogKind, src: NodeId, dst: NodeId, counter: u64) {
        let tick = st.now;
        st.log.push(LogEntry {
            tick,
            kind,
            src,
            dst,
            counter,
        });
    }

    fn handle(&self, st: &mut State, event: Event) {
        match event {
            Event::Apply {
                src,
                dst,
                counter,
                op,
            } => {
                let kind = match op {
                    Op::Write { .. } => LogKind::Write,
                    Op::FetchAdd { .. } => LogKind::FetchAdd,
                    Op::Send { .. } => LogKind::Send,
                };
                Net::record(st, kind, src, dst, counter);
                if st.node[dst.index()].killed {
                    // Lost with the target; the source learns at detection.
                    return;
                }
                let status = self.apply(st, src, dst, op);
                let link = self.link(src, dst);
                let due = self.due_on(st, true, link);
                self.schedule(
                    st,
                    due,
                    Event::Complete {
                        src,
                        dst,
                        counter,
                        status,
                    },
                );
            }
            Event::Complete {
                src,
                dst,
                counter,
                status,
            } => {
                Net::record(st, LogKind::Complete, dst, src, counter);
                if st.node[src.index()].killed || st.node[src.index()].dead[dst.index()] {
                    return;
                }
                let done = self.cqs[src.index()].complete_next(dst, status);
                assert_eq!(
                    done,
                    Some(counter),
                    "the simulator completes each link in posting order"
                );
            }
            Event::Credit { source, target } => {
                Net::record(st, LogKind::Credit, target, source, 0);
                st.node[source.index()].returned[target.index()] += 1;
            }
            Event::Detect { victim } => {
                Net::record(st, LogKind::Death, victim, victim, 0);
                for r in 0..self.nodes {
                    let node = &mut st.node[r];
                    if r == victim.index() || node.killed || node.dead[victim.index()] {
                        continue;
                    }
                    node.dead[victim.index()] = true;
                    node.incoming.push_dead(victim, DeathCause::Killed);
                    self.cqs[r].fail_peer(victim, DeathCause::Killed);
                    self.notifiers[r].notify();
                }
            }
        }
    }

    /// Carries out `op` at `dst`, checking grants there.
    fn apply(&self, st: &mut State, src: NodeId, dst: NodeId, op: Op) -> Status {
        let memory = &self.memory[dst.index()];
        match op {
            Op::Write {
                dst: at,
                dst_index,
                data,
                imm,
            } => {
                let len = match &data {
                    Data::Region { len, .. } => *len,
                    Data::Inline(b) => b.len() as u64,
                };
                let bare = imm.is_some() && len == 0;
                if !bare && !self.regions[dst_index].permits(src, at.offset, len) {
                    return refuse(src, dst, at, len);
                }
                match data {
                    Data::Region { index, offset, len } => {
                        let from = &self.memory[src.index()][index];
                        from.mapping().copy_to(
                            offset as usize,
                            memory[dst_index].mapping(),
                            at.offset as usize,
                            len as usize,
                        );
                    }
                    Data::Inline(bytes) => memory[dst_index]
                        .write(at.offset, &bytes)
                        .expect("the range was checked at posting"),
                }
                if let Some(imm) = imm {
                    st.node[dst.index()]
                        .incoming
                        .push_doorbell(src, imm)
                        .expect("the simulator holds sources to their credits");
                    self.notifiers[dst.index()].notify();
                }
                Status::Done
            }
            Op::FetchAdd {
                dst: at,
                dst_index,
                add,
            } => {
                if !self.regions[dst_index].permits(src, at.offset, 8) {
                    return refuse(src, dst, at, 8);
                }
                let old = memory[dst_index]
                    .fetch_add_u64(at.offset, add)
                    .expect("the word was checked at posting");
                Status::Fetched(old)
            }
            Op::Send { data } => {
                st.node[dst.index()]
                    .incoming
                    .push_message(src, &data)
                    .expect("the simulator holds sources to their credits");
                self.notifiers[dst.index()].notify();
                Status::Done
            }
        }
    }

    fn auto_step(&self) {
        if self.options.auto_step {
            let mut st = self.lock();
            for _ in 0..AUTO_STEP_BOUND {
                if !self.step(&mut st) {
                    break;
                }
            }
        }
    }
}

#[cold]
fn refuse(src: NodeId, dst: NodeId, at: RemoteAddr, len: u64) -> Status {
    tracing::warn!(
        "{dst} refused a write from {src} to {} at offset {} ({len} bytes): outside its grants",
        at.region,
        at.offset
    );
    Status::Denied {
        region: at.region,
        offset: at.offset,
        len,
    }
}

fn node_id(rank: usize) -> NodeId {
    NodeId(u16::try_from(rank).expect("group size was checked to fit u16 ranks"))
}

impl SimFabric {
    fn killed(&self) -> bool {
        self.net.lock().node[self.rank.index()].killed
    }
}

impl Fabric for SimFabric {
    fn rank(&self) -> NodeId {
        self.rank
    }

    fn nodes(&self) -> usize {
        self.net.nodes
    }

    fn memory(&self, region: crate::RegionId) -> Result<&Memory, FabricError> {
        crate::memory::find(&self.memory, region)
    }

    fn post_write(
        &self,
        peer: NodeId,
        dst: RemoteAddr,
        src: Source<'_>,
        imm: Option<u32>,
        signal: Signal,
    ) -> Result<WrId, FabricError> {
        let net = &self.net;
        check_peer(peer, net.nodes)?;
        let w = check_write(&net.regions, dst, &src)?;
        let data = match src {
            Source::Region(s) => Data::Region {
                index: w.src_index.expect("a region source has an index"),
                offset: s.offset,
                len: s.len,
            },
            Source::Inline(b) => Data::Inline(b.to_vec()),
            Source::Empty => Data::Inline(Vec::new()),
        };
        let op = Op::Write {
            dst,
            dst_index: w.dst_index,
            data,
            imm,
        };
        net.post(self.rank, peer, op, signal, &self.cq)
    }

    fn post_fetch_add(&self, peer: NodeId, dst: RemoteAddr, add: u64) -> Result<WrId, FabricError> {
        let net = &self.net;
        check_peer(peer, net.nodes)?;
        let dst_index = check_word(&net.regions, dst)?;
        let op = Op::FetchAdd {
            dst,
            dst_index,
            add,
        };
        net.post(self.rank, peer, op, Signal::Always, &self.cq)
    }

    fn credits(&self, peer: NodeId) -> Result<usize, FabricError> {
        check_peer(peer, self.net.nodes)?;
        let st = self.net.lock();
        let node = &st.node[self.rank.index()];
        let held = node.sent[peer.index()] - node.returned[peer.index()];
        Ok(RECV_CREDITS - held as usize)
    }

    fn post_send(&self, peer: NodeId, msg: &[u8], signal: Signal) -> Result<WrId, FabricError> {
        let net = &self.net;
        check_peer(peer, net.nodes)?;
        check_message(msg.len())?;
        let op = Op::Send { data: msg.to_vec() };
        net.post(self.rank, peer, op, signal, &self.cq)
    }

    fn poll_completions(&self, out: &mut [Completion]) -> usize {
        self.net.auto_step();
        self.cq.poll(out)
    }

    fn poll_completion(&self, wr: WrId) -> Result<Option<Completion>, FabricError> {
        self.net.auto_step();
        if self.killed() {
            return Err(FabricError::Closed);
        }
        self.cq.poll_one(wr)
    }

    fn poll_incoming(&self, out: &mut IncomingBatch) -> usize {
        self.net.auto_step();
        let net = &self.net;
        let mut st = net.lock();
        let me = self.rank.index();
        if st.node[me].killed {
            return 0;
        }
        let mut consumed = Vec::new();
        let n = st.node[me]
            .incoming
            .take(out, |source| consumed.push(source));
        for source in consumed {
            // The credit travels back like any message.
            let link = net.link(self.rank, source);
            let due = net.due_on(&mut st, true, link);
            net.schedule(
                &mut st,
                due,
                Event::Credit {
                    source,
                    target: self.rank,
                },
            );
        }
        n
    }

    fn notifier(&self) -> BorrowedFd<'_> {
        self.notifier.fd()
    }

    fn arm_notifier(&self) {
        self.notifier.arm();
        if self.net.options.auto_step && self.net.lock().events.is_empty() {
            return;
        }
        if self.net.options.auto_step {
            // Events are pending: the caller must come back and deliver them, not sleep.
            self.notifier.notify();
        }
    }
}

/// A small seeded generator (SplitMix64): enough for schedules, and replayable.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A draw in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IncomingRef, LocalSlice, RegionId};
    use std::time::Duration;

    const R: RegionId = RegionId(1);

    fn group(nodes: usize, options: SimOptions) -> SimGroup {
        SimGroup::new(nodes, vec![RegionSpec::open(R, 4096)], options).unwrap()
    }

    #[test]
    fn a_completed_write_is_visible_in_the_target_region() {
        let g = group(2, SimOptions::seeded(1));
        let eps = g.endpoints();
        let at = RemoteAddr::new(R, 8);
        let wr = eps[0]
            .post_write(
                NodeId(1),
                at,
                Source::Inline(b"hello"),
                None,
                Signal::Always,
            )
            .unwrap();
        eps[0].wait(wr, Duration::from_secs(5)).unwrap();
        let mut buf = [0; 5];
        eps[1].memory(R).unwrap().read(8, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[test]
    fn a_write_from_a_region_reads_the_source_when_it_is_carried_out() {
        let g = group(2, SimOptions::manual(2));
        let a = g.endpoint(NodeId(0));
        a.memory(R).unwrap().write(0, b"old").unwrap();
        let src = Source::Region(LocalSlice::new(R, 0, 3));
        a.post_write(
            NodeId(1),
            RemoteAddr::new(R, 100),
            src,
            None,
            Signal::Always,
        )
        .unwrap();
        // Changing the source before completion is the caller's bug; the model shows it.
        a.memory(R).unwrap().write(0, b"new").unwrap();
        g.run_until_idle(100);
        let mut buf = [0; 3];
        g.endpoint(NodeId(1))
            .memory(R)
            .unwrap()
            .read(100, &mut buf)
            .unwrap();
        assert_eq!(&buf, b"new");
    }

    #[test]
    fn manual_mode_delivers_only_when_stepped() {
        let g = group(2, SimOptions::manual(3));
        let a = g.endpoint(NodeId(0));
        let wr = a
            .post_write(
                NodeId(1),
                RemoteAddr::new(R, 0),
                Source::Empty,
                Some(5),
                Signal::Always,
            )
            .unwrap();
        assert_eq!(a.poll_completion(wr).unwrap(), None);
        let mut batch = IncomingBatch::new(4);
        assert_eq!(g.endpoint(NodeId(1)).poll_incoming(&mut batch), 0);
        assert!(g.step());
        assert_eq!(g.endpoint(NodeId(1)).poll_incoming(&mut batch), 1);
        assert_eq!(
            batch.iter().next(),
            Some(IncomingRef::Doorbell {
                from: NodeId(0),
                imm: 5
            })
        );
        assert!(g.step());
        assert!(a.poll_completion(wr).unwrap().is_some());
    }

    #[test]
    fn a_sender_without_credit_is_told_to_wait_until_the_target_polls() {
        let g = group(2, SimOptions::manual(4));
        let a = g.endpoint(NodeId(0));
        let at = RemoteAddr::new(R, 0);
        for _ in 0..RECV_CREDITS {
            a.post_write(NodeId(1), at, Source::Empty, Some(1), Signal::OnError)
                .unwrap();
        }
        let e = a
            .post_write(NodeId(1), at, Source::Empty, Some(1), Signal::OnError)
            .unwrap_err();
        assert!(matches!(
            e,
            FabricError::WouldBlock {
                resource: Resource::ReceiveCredits,
                ..
            }
        ));
        g.run_until_idle(10_000);
        let mut batch = IncomingBatch::new(RECV_CREDITS);
        assert_eq!(
            g.endpoint(NodeId(1)).poll_incoming(&mut batch),
            RECV_CREDITS
        );
        // Still no credit until the returns travel back.
        assert!(a.post_send(NodeId(1), b"x", Signal::OnError).is_err());
        g.run_until_idle(10_000);
        a.post_send(NodeId(1), b"x", Signal::OnError).unwrap();
    }

    #[test]
    fn a_killed_node_is_reported_to_a_waiting_receiver() {
        let mut opts = SimOptions::seeded(3);
        opts.heartbeat_timeout = 100;
        let g = SimGroup::new(2, vec![], opts).unwrap();
        let eps = g.endpoints();
        g.kill(NodeId(1));
        let err = eps[0].recv(Duration::from_secs(5)).unwrap_err();
        assert!(matches!(
            err,
            FabricError::PeerDead {
                peer: NodeId(1),
                ..
            }
        ));
    }
}
