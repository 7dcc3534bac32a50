//! The simulated backend: every node of a group in one process, modelling exactly the written
//! contract (`docs/fabric.md`) and nothing more, with seeded delays that reorder operations
//! across peers while keeping each (source, target) link FIFO.
//!
//! Why: the DSM's protocol is tested on this backend, so any ordering it does not promise must
//! actually happen here. Each operation takes effect at its target after `delay` plus a seeded
//! jitter, never before an earlier operation on the same link; its completion reaches the
//! source after another `delay` plus jitter, again in order per link. Grants are checked at the
//! target (the harder path for callers: `AccessDenied` arrives at `wait`). `SimGroup::kill`
//! silences a node; survivors learn of it after a seeded detection lag below the heartbeat
//! timeout. The seed names a run: a failing test prints it and `SimOptions::seed` replays it
//! (thread scheduling still varies, the injected timings do not).
//!
//! Threads: the callers of each endpoint, and one delivery thread per group (`fabric-sim`)
//! that applies due events. One lock (`Net::state`) guards all scheduling state; region bytes
//! have their own lock each, always taken after `state` when both are held.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::checks::{check_message, check_peer, check_range, check_word, local_range};
use crate::wr_code::WrCode;
use crate::{
    Completion, DEFAULT_HEARTBEAT_TIMEOUT, Fabric, FabricError, Incoming, LocalRegion, NodeId,
    RegionId, RegionSpec, RemoteAddr, WrId,
};

/// How a simulated group behaves.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Names the run's timings; printed by failing tests and replayed from.
    pub seed: u64,
    /// One-way latency added to every operation (the contract's injected delay).
    pub delay: Duration,
    /// Each operation's and each acknowledgement's extra latency is drawn in `0..=jitter`.
    pub jitter: Duration,
    /// Survivors learn of a killed node within this bound.
    pub heartbeat_timeout: Duration,
}

impl SimOptions {
    /// Default timings for `seed`: no injected delay, up to 200 us of jitter.
    pub fn seeded(seed: u64) -> SimOptions {
        SimOptions {
            seed,
            delay: Duration::ZERO,
            jitter: Duration::from_micros(200),
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
        }
    }
}

/// A simulated group: owns the delivery thread; hands out one endpoint per rank.
#[derive(Debug)]
pub struct SimGroup {
    shared: Arc<Shared>,
    endpoints: Vec<Arc<SimFabric>>,
}

impl SimGroup {
    /// Builds a group of `nodes` endpoints that all register `regions`.
    pub fn new(
        nodes: usize,
        regions: Vec<RegionSpec>,
        options: SimOptions,
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
        let memory = (0..nodes)
            .map(|_| {
                regions
                    .iter()
                    .map(|r| SimRegion {
                        id: r.id,
                        bytes: Mutex::new(vec![0; r.len]),
                    })
                    .collect()
            })
            .collect();
        let net = Arc::new(Net {
            nodes,
            regions,
            options: options.clone(),
            state: Mutex::new(State {
                rng: SplitMix64(options.seed),
                next_event: 0,
                events: BTreeMap::new(),
                link_due: vec![None; nodes * nodes],
                ack_due: vec![None; nodes * nodes],
                node: (0..nodes).map(|_| NodeState::new(nodes)).collect(),
                shutdown: false,
            }),
            changed: Condvar::new(),
            work: Condvar::new(),
            memory,
        });
        let delivery = Arc::clone(&net);
        std::thread::Builder::new()
            .name("fabric-sim".into())
            .spawn(move || delivery.deliver())
            .map_err(|source| FabricError::Io {
                op: "spawning the simulator's delivery thread".into(),
                source,
            })?;
        let shared = Arc::new(Shared { net });
        let endpoints = (0..nodes)
            .map(|r| {
                Arc::new(SimFabric {
                    shared: Arc::clone(&shared),
                    rank: node_id(r),
                })
            })
            .collect();
        Ok(SimGroup { shared, endpoints })
    }

    /// Every endpoint, in rank order.
    pub fn endpoints(&self) -> Vec<Arc<dyn Fabric>> {
        self.endpoints
            .iter()
            .map(|e| Arc::clone(e) as Arc<dyn Fabric>)
            .collect()
    }

    /// The seed this group's timings come from.
    pub fn seed(&self) -> u64 {
        self.shared.net.options.seed
    }

    /// Kills `rank` as if its process died: its calls fail from now on, its in-flight
    /// operations are lost, and survivors learn of its death after a seeded lag no longer
    /// than the heartbeat timeout.
    pub fn kill(&self, rank: NodeId) {
        self.shared.net.kill(rank);
    }
}

/// Ends the delivery thread when the group and all its endpoints are gone.
#[derive(Debug)]
struct Shared {
    net: Arc<Net>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.net.lock().shutdown = true;
        self.net.work.notify_all();
    }
}

/// One rank's endpoint in a simulated group.
#[derive(Debug)]
pub struct SimFabric {
    shared: Arc<Shared>,
    rank: NodeId,
}

#[derive(Debug)]
struct Net {
    nodes: usize,
    regions: Vec<RegionSpec>,
    options: SimOptions,
    state: Mutex<State>,
    /// Signalled when a completion, incoming item or death is recorded.
    changed: Condvar,
    /// Signalled when an event is scheduled (wakes the delivery thread).
    work: Condvar,
    /// `memory[node][region index]`.
    memory: Vec<Vec<SimRegion>>,
}

#[derive(Debug)]
struct State {
    rng: SplitMix64,
    next_event: u64,
    /// Scheduled events by (due time, scheduling order): equal due times keep posting order.
    events: BTreeMap<(Instant, u64), Event>,
    /// Last effect due time per link `src * nodes + dst`, so a link stays FIFO.
    link_due: Vec<Option<Instant>>,
    /// Last completion due time per link, so completions stay in order too.
    ack_due: Vec<Option<Instant>>,
    node: Vec<NodeState>,
    shutdown: bool,
}

#[derive(Debug)]
struct NodeState {
    /// The next work request counter (starts at 1, see `WrCode`).
    next_counter: u64,
    /// Per peer: the highest counter whose completion reached this node.
    done: Vec<u64>,
    /// Results of completed operations that carry one: fetch_add values and failures.
    results: HashMap<WrId, Result<u64, FabricError>>,
    incoming: VecDeque<Result<Incoming, NodeId>>,
    killed: bool,
    /// Per peer: whether this node has learnt the peer is dead.
    dead: Vec<bool>,
}

impl NodeState {
    fn new(nodes: usize) -> NodeState {
        NodeState {
            next_counter: 1,
            done: vec![0; nodes],
            results: HashMap::new(),
            incoming: VecDeque::new(),
            killed: false,
            dead: vec![false; nodes],
        }
    }
}

#[derive(Debug)]
enum Event {
    Apply {
        src: NodeId,
        dst: NodeId,
        wr: WrId,
        op: Op,
    },
    Complete {
        src: NodeId,
        dst: NodeId,
        wr: WrId,
        result: Option<Result<u64, FabricError>>,
    },
    Detect {
        victim: NodeId,
    },
}

#[derive(Debug)]
enum Op {
    Write {
        dst: RemoteAddr,
        data: Vec<u8>,
        imm: Option<u32>,
    },
    FetchAdd {
        dst: RemoteAddr,
        add: u64,
    },
    Send {
        data: Vec<u8>,
    },
}

impl Net {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spec(&self, region: RegionId) -> Result<(usize, &RegionSpec), FabricError> {
        self.regions
            .iter()
            .enumerate()
            .find(|(_, r)| r.id == region)
            .ok_or(FabricError::UnknownRegion { region })
    }

    fn draw_jitter(&self, st: &mut State) -> Duration {
        let max = self.options.jitter.as_nanos() as u64;
        if max == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(st.rng.next() % (max + 1))
    }

    fn schedule(&self, st: &mut State, due: Instant, event: Event) {
        let key = (due, st.next_event);
        st.next_event += 1;
        st.events.insert(key, event);
        self.work.notify_one();
    }

    fn post(&self, src: NodeId, dst: NodeId, op: Op, fetch: bool) -> Result<WrId, FabricError> {
        let mut st = self.lock();
        let me = usize::from(src.0);
        if st.node[me].killed {
            return Err(killed(src));
        }
        if st.node[me].dead[usize::from(dst.0)] {
            return Err(dead(dst));
        }
        let counter = st.node[me].next_counter;
        st.node[me].next_counter += 1;
        let wr = WrCode::encode(counter, fetch, dst);
        let link = me * self.nodes + usize::from(dst.0);
        let jitter = self.draw_jitter(&mut st);
        let mut due = Instant::now() + self.options.delay + jitter;
        if let Some(last) = st.link_due[link] {
            due = due.max(last);
        }
        st.link_due[link] = Some(due);
        self.schedule(&mut st, due, Event::Apply { src, dst, wr, op });
        Ok(wr)
    }

    fn kill(&self, victim: NodeId) {
        let mut st = self.lock();
        let v = usize::from(victim.0);
        if v >= self.nodes || st.node[v].killed {
            return;
        }
        st.node[v].killed = true;
        // Operations the victim posted and that have not reached their targets die with it.
        st.events
            .retain(|_, e| !matches!(e, Event::Apply { src, .. } if *src == victim));
        let hb = self.options.heartbeat_timeout.as_nanos() as u64;
        let lag = Duration::from_nanos(hb / 4 + st.rng.next() % (hb / 2 + 1));
        self.schedule(&mut st, Instant::now() + lag, Event::Detect { victim });
        self.changed.notify_all();
    }

    /// The delivery thread: applies every event when it falls due.
    fn deliver(&self) {
        let mut st = self.lock();
        loop {
            if st.shutdown {
                return;
            }
            let Some((&(due, _), _)) = st.events.first_key_value() else {
                st = self.work.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            let now = Instant::now();
            if due > now {
                st = self
                    .work
                    .wait_timeout(st, due - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
            let Some((_, event)) = st.events.pop_first() else {
                continue;
            };
            self.handle(&mut st, event);
            self.changed.notify_all();
        }
    }

    fn handle(&self, st: &mut State, event: Event) {
        match event {
            Event::Apply { src, dst, wr, op } => {
                if st.node[usize::from(dst.0)].killed {
                    // Lost with the target; the source learns at detection.
                    return;
                }
                let result = self.apply(st, src, dst, op);
                let link = usize::from(src.0) * self.nodes + usize::from(dst.0);
                let jitter = self.draw_jitter(st);
                let mut due = Instant::now() + self.options.delay + jitter;
                if let Some(last) = st.ack_due[link] {
                    due = due.max(last);
                }
                st.ack_due[link] = Some(due);
                self.schedule(
                    st,
                    due,
                    Event::Complete {
                        src,
                        dst,
                        wr,
                        result,
                    },
                );
            }
            Event::Complete {
                src,
                dst,
                wr,
                result,
            } => {
                let node = &mut st.node[usize::from(src.0)];
                if node.killed {
                    return;
                }
                node.done[usize::from(dst.0)] = WrCode::decode(wr).counter;
                if let Some(r) = result {
                    node.results.insert(wr, r);
                }
            }
            Event::Detect { victim } => {
                for (r, node) in st.node.iter_mut().enumerate() {
                    if r != usize::from(victim.0) && !node.killed {
                        node.dead[usize::from(victim.0)] = true;
                        node.incoming.push_back(Err(victim));
                    }
                }
            }
        }
    }

    /// Applies `op` at `dst`, checking grants there; the result the source's completion
    /// carries, if any (a fetched value or a refusal).
    fn apply(
        &self,
        st: &mut State,
        src: NodeId,
        dst: NodeId,
        op: Op,
    ) -> Option<Result<u64, FabricError>> {
        let memory = &self.memory[usize::from(dst.0)];
        match op {
            Op::Write { dst: at, data, imm } => {
                if !data.is_empty() {
                    let (index, spec) = self.spec(at.region).ok()?;
                    if !spec.permits(src, at.offset, data.len() as u64) {
                        return Some(Err(self.refuse(src, dst, at, data.len() as u64)));
                    }
                    memory[index].copy_in(at.offset, &data);
                }
                if let Some(imm) = imm {
                    st.node[usize::from(dst.0)]
                        .incoming
                        .push_back(Ok(Incoming::Doorbell { from: src, imm }));
                }
                None
            }
            Op::FetchAdd { dst: at, add } => {
                let (index, spec) = self.spec(at.region).ok()?;
                if !spec.permits(src, at.offset, 8) {
                    return Some(Err(self.refuse(src, dst, at, 8)));
                }
                Some(Ok(memory[index].fetch_add(at.offset, add)))
            }
            Op::Send { data } => {
                st.node[usize::from(dst.0)]
                    .incoming
                    .push_back(Ok(Incoming::Message { from: src, data }));
                None
            }
        }
    }

    fn refuse(&self, src: NodeId, dst: NodeId, at: RemoteAddr, len: u64) -> FabricError {
        tracing::warn!(
            "{dst} refused a write from {src} to {} at offset {} ({len} bytes): outside its grants",
            at.region,
            at.offset
        );
        FabricError::AccessDenied {
            peer: dst,
            region: at.region,
            offset: at.offset,
            len,
        }
    }
}

fn killed(me: NodeId) -> FabricError {
    FabricError::PeerDead {
        peer: me,
        reason: "this endpoint was killed".into(),
    }
}

fn dead(peer: NodeId) -> FabricError {
    FabricError::PeerDead {
        peer,
        reason: "silent past the heartbeat timeout".into(),
    }
}

fn node_id(rank: usize) -> NodeId {
    NodeId(u16::try_from(rank).expect("group size was checked to fit u16 ranks"))
}

impl Fabric for SimFabric {
    fn rank(&self) -> NodeId {
        self.rank
    }

    fn nodes(&self) -> usize {
        self.shared.net.nodes
    }

    fn region(&self, id: RegionId) -> Result<&dyn LocalRegion, FabricError> {
        let net = &self.shared.net;
        let (index, _) = net.spec(id)?;
        Ok(&net.memory[usize::from(self.rank.0)][index])
    }

    fn post_write(&self, peer: NodeId, dst: RemoteAddr, data: &[u8]) -> Result<WrId, FabricError> {
        let net = &self.shared.net;
        check_peer(peer, net.nodes)?;
        check_range(&net.regions, dst, data.len() as u64)?;
        let op = Op::Write {
            dst,
            data: data.to_vec(),
            imm: None,
        };
        net.post(self.rank, peer, op, false)
    }

    fn post_write_imm(
        &self,
        peer: NodeId,
        dst: RemoteAddr,
        data: &[u8],
        imm: u32,
    ) -> Result<WrId, FabricError> {
        let net = &self.shared.net;
        check_peer(peer, net.nodes)?;
        check_range(&net.regions, dst, data.len() as u64)?;
        let op = Op::Write {
            dst,
            data: data.to_vec(),
            imm: Some(imm),
        };
        net.post(self.rank, peer, op, false)
    }

    fn post_fetch_add(&self, peer: NodeId, dst: RemoteAddr, add: u64) -> Result<WrId, FabricError> {
        let net = &self.shared.net;
        check_peer(peer, net.nodes)?;
        check_word(&net.regions, dst)?;
        net.post(self.rank, peer, Op::FetchAdd { dst, add }, true)
    }

    fn post_send(&self, peer: NodeId, msg: &[u8]) -> Result<WrId, FabricError> {
        let net = &self.shared.net;
        check_peer(peer, net.nodes)?;
        check_message(msg.len())?;
        let op = Op::Send { data: msg.to_vec() };
        net.post(self.rank, peer, op, false)
    }

    fn wait(&self, wr: WrId, timeout: Duration) -> Result<Completion, FabricError> {
        let net = &self.shared.net;
        let code = WrCode::decode(wr);
        let me = usize::from(self.rank.0);
        let deadline = Instant::now() + timeout;
        let mut st = net.lock();
        if usize::from(code.peer.0) >= net.nodes || code.counter >= st.node[me].next_counter {
            return Err(FabricError::UnknownWr { wr });
        }
        let p = usize::from(code.peer.0);
        loop {
            let node = &mut st.node[me];
            if node.killed {
                return Err(killed(self.rank));
            }
            if node.done[p] >= code.counter {
                let completion = |fetched| Completion {
                    wr,
                    peer: code.peer,
                    fetched,
                };
                return match node.results.remove(&wr) {
                    Some(Ok(v)) => Ok(completion(Some(v))),
                    Some(Err(e)) => Err(e),
                    None if code.fetch => Err(FabricError::UnknownWr { wr }),
                    None => Ok(completion(None)),
                };
            }
            if node.dead[p] {
                return Err(dead(code.peer));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(FabricError::Timeout {
                    what: format!("completion of {wr:?} to {}", code.peer),
                    waited: timeout,
                });
            }
            st = net
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn recv(&self, timeout: Duration) -> Result<Option<Incoming>, FabricError> {
        let net = &self.shared.net;
        let me = usize::from(self.rank.0);
        let deadline = Instant::now() + timeout;
        let mut st = net.lock();
        loop {
            let node = &mut st.node[me];
            if node.killed {
                return Err(killed(self.rank));
            }
            match node.incoming.pop_front() {
                Some(Ok(item)) => return Ok(Some(item)),
                Some(Err(victim)) => return Err(dead(victim)),
                None => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            st = net
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// A simulated node's copy of one region.
#[derive(Debug)]
struct SimRegion {
    id: RegionId,
    bytes: Mutex<Vec<u8>>,
}

impl SimRegion {
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Callers checked the range against the region's length.
    fn copy_in(&self, offset: u64, data: &[u8]) {
        let start = offset as usize;
        self.lock()[start..start + data.len()].copy_from_slice(data);
    }

    /// Callers checked alignment and range.
    fn fetch_add(&self, offset: u64, add: u64) -> u64 {
        let start = offset as usize;
        let mut bytes = self.lock();
        let word = &mut bytes[start..start + 8];
        let old = u64::from_le_bytes(word.try_into().expect("an 8-byte slice"));
        word.copy_from_slice(&old.wrapping_add(add).to_le_bytes());
        old
    }

    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>, FabricError> {
        let region_len = self.lock().len();
        local_range(self.id, offset, len, region_len)
    }
}

impl LocalRegion for SimRegion {
    fn len(&self) -> usize {
        self.lock().len()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), FabricError> {
        let range = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.lock()[range]);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), FabricError> {
        let range = self.range(offset, data.len())?;
        self.lock()[range].copy_from_slice(data);
        Ok(())
    }

    fn load_u64(&self, offset: u64) -> Result<u64, FabricError> {
        if offset % 8 != 0 {
            return Err(FabricError::Misaligned { offset });
        }
        let range = self.range(offset, 8)?;
        let bytes = self.lock();
        Ok(u64::from_le_bytes(
            bytes[range].try_into().expect("an 8-byte slice"),
        ))
    }
}

/// A small seeded generator (SplitMix64): enough for timings, and replayable.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(seed: u64) -> SimGroup {
        SimGroup::new(
            2,
            vec![RegionSpec::open(RegionId(1), 64)],
            SimOptions::seeded(seed),
        )
        .unwrap()
    }

    #[test]
    fn a_completed_write_is_visible_in_the_target_region() {
        let g = group(1);
        let eps = g.endpoints();
        let at = RemoteAddr {
            region: RegionId(1),
            offset: 8,
        };
        let wr = eps[0].post_write(NodeId(1), at, b"hello").unwrap();
        eps[0].wait(wr, Duration::from_secs(5)).unwrap();
        let mut buf = [0; 5];
        eps[1]
            .region(RegionId(1))
            .unwrap()
            .read(8, &mut buf)
            .unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[test]
    fn a_fetch_add_result_is_handed_out_once() {
        let g = group(2);
        let eps = g.endpoints();
        let at = RemoteAddr {
            region: RegionId(1),
            offset: 0,
        };
        let wr = eps[0].post_fetch_add(NodeId(1), at, 3).unwrap();
        let c = eps[0].wait(wr, Duration::from_secs(5)).unwrap();
        assert_eq!(c.fetched, Some(0));
        assert!(matches!(
            eps[0].wait(wr, Duration::from_secs(5)),
            Err(FabricError::UnknownWr { .. })
        ));
    }

    #[test]
    fn a_killed_node_is_reported_to_a_waiting_receiver() {
        let mut opts = SimOptions::seeded(3);
        opts.heartbeat_timeout = Duration::from_millis(100);
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
