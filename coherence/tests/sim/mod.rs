//! The deterministic simulation: litmus tests run through real coherence engines and links
//! over the simulated fabric, thread i on node i, on schedules a seed decides, and every final
//! state is judged against the reference model's allowed set.
//!
//! One run: a [`SimGroup`] in manual mode (nothing moves unless the harness steps it), one
//! engine and link per node, guest memory in each node's `GUEST` region (the replica), and a
//! small interpreter executing the test's instructions against its node's replica. Protection
//! is modelled: a node writes a page only while its driver has been told (an
//! [`Output::Protect`]) that it is writable, exactly as the VM process's page tables would
//! allow. At every step the seed picks what happens next: a thread executes an instruction, the
//! network delivers one event, a node's vCPU is stopped and served (a trap or a kick), or time
//! passes (the periodic flush). A vCPU that waits (a fence, a page it does not own) is stopped,
//! so its driver serves it after every poll, as the monitor does.
//!
//! A run ends when every vCPU has returned, the machine's end was decided on every node, every
//! link is idle and every node said goodbye; then the replicas must be byte-identical, and the
//! final state (registers, and memory read from node 0) must be one the model allows.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;

use vsmp_coherence::engine::{Config, Engine, Gate, Output, Replica};
use vsmp_coherence::fabric::sim::{SimGroup, SimOptions, SplitMix64};
use vsmp_coherence::fabric::{Memory, NodeId};
use vsmp_coherence::net::{self, Link, Sizes};
use vsmp_coherence::{Gpa, PAGE_BYTES, PageNo, pages_of};
use vsmp_litmus::cond::Lval;
use vsmp_litmus::instr::{AluOp, Cc, Fence, Instr, Mem, Operand};
use vsmp_litmus::model::{Layout, value_type};
use vsmp_litmus::reg::{REG_COUNT, Reg};
use vsmp_litmus::test::{InitValue, LitmusTest, LocId, Width};

/// Where the test's locations live in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Each location on its own page (so relaxed outcomes such as SB's can appear).
    Spread,
    /// Every location on one page, as the model lays them out (several writers of one page,
    /// neighbouring bytes written by different nodes).
    Packed,
}

/// What one run is.
#[derive(Debug, Clone, Copy)]
pub struct RunSpec {
    pub seed: u64,
    pub placement: Placement,
    /// Before the test starts, each location's page is moved to the first thread that writes
    /// it (what a real guest's warm-up does), so the test starts with no transfer pending.
    pub warm: bool,
}

impl RunSpec {
    /// The run a seed names: placement and warm-up are drawn from it too.
    pub fn from_seed(seed: u64) -> RunSpec {
        let mut r = SplitMix64(seed ^ 0x005e_ed0f_5eed);
        RunSpec {
            seed,
            placement: if r.below(4) == 0 {
                Placement::Packed
            } else {
                Placement::Spread
            },
            warm: r.below(2) == 0,
        }
    }
}

/// A finished run: the final values of the condition's places (in the model's encoding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub values: Vec<u64>,
    pub steps: usize,
    pub batches: u64,
}

/// A replica over a node's `GUEST` region.
struct Ram<'a>(&'a Memory);

impl Replica for Ram<'_> {
    fn read(&self, gpa: Gpa, buf: &mut [u8]) {
        self.0.read(gpa.0, buf).expect("inside guest memory");
    }
    fn write(&self, gpa: Gpa, data: &[u8]) {
        self.0.write(gpa.0, data).expect("inside guest memory");
    }
}

/// One thread's architectural state.
#[derive(Debug, Clone)]
struct Thread {
    pc: usize,
    regs: [u64; REG_COUNT],
    zf: bool,
    state: ThreadState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ThreadState {
    /// Executing (its next instruction at `pc`).
    Running,
    /// Waiting for its engine (the instruction at `pc` is retried when the gate opens).
    Retry,
    /// Its atomic instruction ran; it waits for the fence that follows.
    Fencing,
    /// Its program ended; its end is being published.
    Ending,
    Done,
}

struct Node {
    engine: Engine,
    link: Link,
    guest: Arc<Memory>,
    /// What the driver has made writable (from `Protect` outputs only).
    writable: Vec<bool>,
}

/// Runs `test` once as `spec` says, with `max_steps` as the liveness bound.
pub fn run(test: &LitmusTest, spec: RunSpec, max_steps: usize) -> Result<Outcome, String> {
    Harness::new(test, spec)?.run(max_steps)
}

struct Harness<'t> {
    test: &'t LitmusTest,
    spec: RunSpec,
    model: Layout,
    addrs: Vec<u64>,
    group: SimGroup,
    nodes: Vec<Node>,
    threads: Vec<Thread>,
    rng: SplitMix64,
    now: u64,
    pages: usize,
}

impl<'t> Harness<'t> {
    fn new(test: &'t LitmusTest, spec: RunSpec) -> Result<Harness<'t>, String> {
        let n = test.threads.len().max(1);
        let model = Layout::new(test);
        let mut rng = SplitMix64(spec.seed);
        // Location addresses: page 0 is left unused so no address is 0.
        let addrs: Vec<u64> = (0..test.locations.len())
            .map(|i| match spec.placement {
                Placement::Spread => ((i + 1) * PAGE_BYTES) as u64,
                Placement::Packed => {
                    PAGE_BYTES as u64 + (model.addr(LocId(i)) - vsmp_litmus::model::ADDR_BASE)
                }
            })
            .collect();
        let end = test
            .locations
            .iter()
            .zip(&addrs)
            .map(|(l, a)| a + l.size_bytes() as u64)
            .max()
            .unwrap_or(PAGE_BYTES as u64);
        let pages = (end as usize).div_ceil(PAGE_BYTES) + 1;
        let twins = 2 + rng.below(3) as usize;
        let cfg = |me: usize| Config {
            me: NodeId(me as u16),
            nodes: n,
            pages,
            twins,
            console_bytes: 64,
            flush_interval: 1 + rng.below(64),
            console_node: NodeId(0),
        };
        let cfgs: Vec<Config> = (0..n).map(cfg).collect();
        let sizes = Sizes {
            nodes: n,
            guest_bytes: pages * PAGE_BYTES,
            max_batch: cfgs[0].max_batch(),
        };
        let mut options = SimOptions::manual(spec.seed);
        options.jitter = 1 + rng.below(2000);
        let guests: Vec<Arc<Memory>> = (0..n)
            .map(|_| Memory::create(net::GUEST, sizes.guest_bytes).map(Arc::new))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let group = SimGroup::with_memory(n, net::regions(sizes), options, |rank, spec| {
            (spec.id == net::GUEST).then(|| Arc::clone(&guests[rank.index()]))
        })
        .map_err(|e| e.to_string())?;
        let nodes: Vec<Node> = cfgs
            .into_iter()
            .zip(group.endpoints())
            .zip(guests)
            .map(|((cfg, ep), guest)| Node {
                engine: Engine::new(cfg),
                link: Link::new(ep, sizes),
                guest,
                // Every page starts read only (node 0's are owned but clean).
                writable: vec![false; pages],
            })
            .collect();
        let threads = (0..test.threads.len())
            .map(|t| {
                let mut regs = [0u64; REG_COUNT];
                for init in test.reg_inits.iter().filter(|i| i.thread.0 == t) {
                    regs[init.reg.0 as usize] = match init.value {
                        InitValue::Int(v) => v,
                        InitValue::Addr(id) => addrs[id.0],
                    };
                }
                Thread {
                    pc: 0,
                    regs,
                    zf: false,
                    state: ThreadState::Running,
                }
            })
            .collect();
        let mut h = Harness {
            test,
            spec,
            model,
            addrs,
            group,
            nodes,
            threads,
            rng,
            now: 0,
            pages,
        };
        h.load_image();
        Ok(h)
    }

    /// Writes the initial values into every replica (the image, identical everywhere).
    fn load_image(&mut self) {
        for node in &self.nodes {
            for (i, loc) in self.test.locations.iter().enumerate() {
                let elem = if loc.len == 1 {
                    8
                } else {
                    loc.ty.width.bytes()
                };
                for (k, v) in loc.init.iter().enumerate() {
                    let raw = match *v {
                        InitValue::Int(x) => x,
                        InitValue::Addr(id) => self.addrs[id.0],
                    };
                    node.guest
                        .write(
                            self.addrs[i] + (k * elem) as u64,
                            &raw.to_le_bytes()[..elem],
                        )
                        .expect("inside guest memory");
                }
            }
        }
    }

    fn run(mut self, max_steps: usize) -> Result<Outcome, String> {
        if self.spec.warm {
            self.warm_up(max_steps)?;
        }
        let mut steps = 0;
        loop {
            if self.finished() {
                break;
            }
            steps += 1;
            if steps > max_steps {
                return Err(format!(
                    "no end after {max_steps} steps (threads: {:?})",
                    self.threads
                        .iter()
                        .map(|t| (t.pc, t.state))
                        .collect::<Vec<_>>()
                ));
            }
            self.step()?;
        }
        self.check_replicas()?;
        Ok(Outcome {
            values: self.observe(),
            steps,
            batches: self.nodes[0].engine.applied(),
        })
    }

    /// Moves each location's page to the first thread that writes it, and waits until every
    /// node has applied every transfer.
    fn warm_up(&mut self, max_steps: usize) -> Result<(), String> {
        let mut wanted: Vec<(usize, PageNo)> = Vec::new();
        for (t, prog) in self.test.threads.iter().enumerate() {
            for instr in &prog.instrs {
                if let Some(Operand::Mem(m)) = written_operand(instr) {
                    if let Some(sym) = m.sym {
                        let page = Gpa(self.addrs[sym.0]).page();
                        if !wanted.iter().any(|(_, p)| *p == page) {
                            wanted.push((t, page));
                        }
                    }
                }
            }
        }
        for (t, page) in wanted {
            let mut steps = 0;
            while !self.nodes[t].engine.owns(page) {
                let now = self.now;
                let node = &mut self.nodes[t];
                let ram = Ram(&node.guest);
                if !node.engine.write_fault(&ram, &[page], u64::MAX, now) {
                    // The grant comes through the network.
                }
                node.engine.retired();
                // Every vCPU is stopped during the warm-up: each node serves.
                for i in 0..self.nodes.len() {
                    self.serve(i)?;
                }
                self.drive_all()?;
                self.network_or_time();
                steps += 1;
                if steps > max_steps {
                    return Err(format!("warm-up: {page} never reached node {t}"));
                }
            }
        }
        // Publish the (empty) warm-up writes and let every node apply everything.
        let mut steps = 0;
        loop {
            let last = self
                .nodes
                .iter()
                .map(|n| n.engine.last_ticket())
                .max()
                .unwrap_or(0);
            let busy = self
                .nodes
                .iter()
                .any(|n| n.link.busy() || !n.engine.drained());
            if !busy && self.nodes.iter().all(|n| n.engine.applied() >= last) {
                break;
            }
            for i in 0..self.nodes.len() {
                let node = &mut self.nodes[i];
                node.engine.flush_now(&Ram(&node.guest));
                self.serve(i)?;
            }
            self.drive_all()?;
            self.network_or_time();
            steps += 1;
            if steps > max_steps {
                return Err("warm-up never quiesced".into());
            }
        }
        Ok(())
    }

    fn network_or_time(&mut self) {
        if !self.group.step() {
            self.now += 1;
        }
    }

    fn finished(&self) -> bool {
        self.threads.iter().all(|t| t.state == ThreadState::Done)
            && self
                .nodes
                .iter()
                .all(|n| n.engine.machine_end().is_some() && !n.link.busy() && n.link.all_ended())
            && self.group.pending() == 0
    }

    /// One scheduling decision.
    fn step(&mut self) -> Result<(), String> {
        let runnable: Vec<usize> = (0..self.threads.len())
            .filter(|t| {
                matches!(
                    self.threads[*t].state,
                    ThreadState::Running | ThreadState::Retry
                ) && self.nodes[*t].engine.gate() == Gate::Go
            })
            .collect();
        let pending = self.group.pending() > 0;
        let roll = self.rng.below(10);
        match roll {
            0..=3 if !runnable.is_empty() => {
                let t = runnable[self.rng.below(runnable.len() as u64) as usize];
                if tracing() {
                    eprintln!("t={} thread {t} at {}", self.now, self.threads[t].pc);
                }
                self.execute(t)?;
            }
            4..=7 if pending => {
                self.group.step();
            }
            8 => {
                // A stop of a running vCPU: a trap, or a kick the driver decided on.
                let i = self.rng.below(self.nodes.len() as u64) as usize;
                self.serve(i)?;
            }
            _ => {
                if runnable.is_empty() && !pending {
                    // Nothing can move but time: let the flush fall due.
                    self.now += 1 + self.rng.below(64);
                } else {
                    self.now += self.rng.below(4);
                }
            }
        }
        self.drive_all()
    }

    /// Every node's driver: poll the link, carry the outputs; a vCPU that is not running is
    /// stopped, so its driver serves it; a machine that ended says goodbye once idle.
    fn drive_all(&mut self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            self.drive(i)?;
        }
        Ok(())
    }

    fn drive(&mut self, i: usize) -> Result<(), String> {
        let now = self.now;
        let stopped = self.threads.get(i).is_none_or(|t| {
            t.state != ThreadState::Running || self.nodes[i].engine.gate() == Gate::Wait
        });
        let node = &mut self.nodes[i];
        let ram = Ram(&node.guest);
        node.link
            .poll(&mut node.engine, &ram, now)
            .map_err(|e| format!("node {i}: {e}"))?;
        if stopped {
            node.engine
                .serve(&ram, now)
                .map_err(|e| format!("node {i}: {e}"))?;
        } else {
            node.engine
                .serve_running(&ram)
                .map_err(|e| format!("node {i}: {e}"))?;
        }
        carry(node, i)?;
        if node.engine.machine_end().is_some() && !node.link.busy() {
            node.link
                .say_ended()
                .map_err(|e| format!("node {i}: {e}"))?;
        }
        // A thread waiting on its engine moves on once the gate opens.
        if let Some(t) = self.threads.get_mut(i) {
            if self.nodes[i].engine.gate() == Gate::Go || self.nodes[i].engine.vcpu_ended() {
                match t.state {
                    ThreadState::Fencing if self.nodes[i].engine.gate() == Gate::Go => {
                        t.state = ThreadState::Running
                    }
                    ThreadState::Ending if self.nodes[i].engine.drained() => {
                        t.state = ThreadState::Done
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// A stop of node `i`'s vCPU between instructions: applies, serves orders, flushes if due.
    fn serve(&mut self, i: usize) -> Result<(), String> {
        let now = self.now;
        let node = &mut self.nodes[i];
        node.engine
            .serve(&Ram(&node.guest), now)
            .map_err(|e| format!("node {i}: {e}"))?;
        carry(node, i)
    }

    /// Executes thread `t`'s next instruction on node `t`, or starts waiting for what it needs.
    fn execute(&mut self, t: usize) -> Result<(), String> {
        let now = self.now;
        let test = self.test;
        let prog = &test.threads[t];
        let Some(instr) = prog.instrs.get(self.threads[t].pc).copied() else {
            return self.end_thread(t);
        };
        if matches!(instr, Instr::Ret) {
            return self.end_thread(t);
        }
        if let Instr::Fence(Fence::M) = instr {
            self.threads[t].pc += 1;
            let node = &mut self.nodes[t];
            node.engine.fence(&Ram(&node.guest), now);
            carry(node, t)?;
            self.threads[t].state = if node.engine.gate() == Gate::Go {
                ThreadState::Running
            } else {
                ThreadState::Fencing
            };
            return Ok(());
        }
        // Writes need their pages writable here: fault, as the hardware would.
        if let Some(op) = written_operand(&instr) {
            let Operand::Mem(m) = op else { unreachable!() };
            let width = instr_width(&instr);
            let a = self.address(t, m);
            let footprint: Vec<PageNo> = pages_of(Gpa(a), width.bytes() as u64).collect();
            if footprint.iter().any(|p| p.index() >= self.pages) {
                return Err(format!("thread {t} writes outside memory at {a:#x}"));
            }
            if footprint.iter().any(|p| !self.nodes[t].writable[p.index()]) {
                let node = &mut self.nodes[t];
                let rip = self.threads[t].pc as u64;
                node.engine
                    .write_fault(&Ram(&node.guest), &footprint, rip, now);
                carry(node, t)?;
                self.threads[t].state = ThreadState::Retry;
                return Ok(());
            }
        }
        self.threads[t].state = ThreadState::Running;
        let atomic = instr.is_atomic_rmw();
        self.interpret(t, instr)?;
        let node = &mut self.nodes[t];
        node.engine.retired();
        if atomic {
            node.engine.fence(&Ram(&node.guest), now);
            carry(node, t)?;
            if node.engine.gate() == Gate::Wait {
                self.threads[t].state = ThreadState::Fencing;
            }
        }
        Ok(())
    }

    fn end_thread(&mut self, t: usize) -> Result<(), String> {
        let now = self.now;
        let node = &mut self.nodes[t];
        node.engine.end(&Ram(&node.guest), 0, false, now);
        carry(node, t)?;
        self.threads[t].state = ThreadState::Ending;
        Ok(())
    }

    fn address(&self, t: usize, m: Mem) -> u64 {
        let th = &self.threads[t];
        let mut a = m.disp as u64;
        if let Some(s) = m.sym {
            a = a.wrapping_add(self.addrs[s.0]);
        }
        if let Some(b) = m.base {
            a = a.wrapping_add(th.regs[b.0 as usize]);
        }
        if let Some((i, scale)) = m.index {
            a = a.wrapping_add(th.regs[i.0 as usize].wrapping_mul(u64::from(scale)));
        }
        a
    }

    fn read(&self, t: usize, op: Operand, width: Width) -> Result<u64, String> {
        Ok(match op {
            Operand::Imm(v) => v & width.mask(),
            Operand::Reg(r, w) => self.threads[t].regs[r.0 as usize] & w.mask(),
            Operand::Mem(m) => {
                let a = self.address(t, m);
                if a + width.bytes() as u64 > (self.pages * PAGE_BYTES) as u64 {
                    return Err(format!("thread {t} reads outside memory at {a:#x}"));
                }
                let mut b = [0u8; 8];
                self.nodes[t]
                    .guest
                    .read(a, &mut b[..width.bytes()])
                    .map_err(|e| e.to_string())?;
                u64::from_le_bytes(b)
            }
        })
    }

    fn write(&mut self, t: usize, op: Operand, width: Width, v: u64) -> Result<(), String> {
        match op {
            Operand::Imm(_) => {}
            Operand::Reg(r, w) => {
                let slot = &mut self.threads[t].regs[r.0 as usize];
                *slot = match w {
                    Width::W8 | Width::W4 => v & w.mask(),
                    _ => (*slot & !w.mask()) | (v & w.mask()),
                };
            }
            Operand::Mem(m) => {
                let a = self.address(t, m);
                for p in pages_of(Gpa(a), width.bytes() as u64) {
                    assert!(
                        self.nodes[t].writable[p.index()],
                        "thread {t} writes {p}, which its node did not make writable"
                    );
                }
                self.nodes[t]
                    .guest
                    .write(a, &v.to_le_bytes()[..width.bytes()])
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// One instruction's effect on registers and this node's replica (the caller made its
    /// written pages writable).
    fn interpret(&mut self, t: usize, instr: Instr) -> Result<(), String> {
        self.threads[t].pc += 1;
        match instr {
            Instr::Mov { dst, src, width } => {
                let v = self.read(t, src, width)?;
                self.write(t, dst, width, v)?;
            }
            Instr::Alu {
                op,
                dst,
                src,
                width,
                ..
            } => {
                let a = self.read(t, dst, width)?;
                let b = self.read(t, src, width)?;
                let r = op.apply(a, b, width);
                self.threads[t].zf = r == 0;
                if op.writes_dst() {
                    self.write(t, dst, width, r)?;
                }
            }
            Instr::Xchg { dst, src, width } => {
                let old = self.read(t, dst, width)?;
                let v = self.read(t, Operand::Reg(src, width), width)?;
                self.write(t, dst, width, v)?;
                self.write(t, Operand::Reg(src, width), width, old)?;
            }
            Instr::Xadd {
                dst, src, width, ..
            } => {
                let old = self.read(t, dst, width)?;
                let v = self.read(t, Operand::Reg(src, width), width)?;
                let sum = AluOp::Add.apply(old, v, width);
                self.threads[t].zf = sum == 0;
                self.write(t, dst, width, sum)?;
                self.write(t, Operand::Reg(src, width), width, old)?;
            }
            Instr::Cmpxchg {
                dst,
                src,
                width,
                locked,
            } => {
                let old = self.read(t, dst, width)?;
                let acc = self.read(t, Operand::Reg(Reg::RAX, width), width)?;
                if old == acc {
                    self.threads[t].zf = true;
                    let v = self.read(t, Operand::Reg(src, width), width)?;
                    self.write(t, dst, width, v)?;
                } else {
                    self.threads[t].zf = false;
                    if locked {
                        // A locked cmpxchg writes the old value back (a silent store; it
                        // needs the page as a successful one does).
                        self.write(t, dst, width, old)?;
                    }
                    self.write(t, Operand::Reg(Reg::RAX, width), width, old)?;
                }
            }
            Instr::Fence(_) | Instr::Nop => {}
            Instr::Jump { cond, target } => {
                let zf = self.threads[t].zf;
                let taken = match cond {
                    None => true,
                    Some(Cc::Eq) => zf,
                    Some(Cc::Ne) => !zf,
                };
                if taken {
                    self.threads[t].pc = target;
                }
            }
            Instr::Ret => unreachable!("handled by execute"),
        }
        Ok(())
    }

    /// Every replica holds the same bytes.
    fn check_replicas(&self) -> Result<(), String> {
        let len = self.pages * PAGE_BYTES;
        let mut first = vec![0u8; len];
        self.nodes[0]
            .guest
            .read(0, &mut first)
            .map_err(|e| e.to_string())?;
        for (i, n) in self.nodes.iter().enumerate().skip(1) {
            let mut other = vec![0u8; len];
            n.guest.read(0, &mut other).map_err(|e| e.to_string())?;
            if let Some(at) = (0..len).find(|k| first[*k] != other[*k]) {
                return Err(format!(
                    "replicas differ at quiescence: node 0 and node {i} at {:#x}",
                    at
                ));
            }
        }
        Ok(())
    }

    /// The condition's places, in the model's encoding (addresses mapped back to its layout).
    fn observe(&self) -> Vec<u64> {
        let keys = vsmp_litmus::model::observed_keys(self.test, vsmp_litmus::model::Scope::Full);
        let to_model: HashMap<u64, u64> = self
            .addrs
            .iter()
            .enumerate()
            .map(|(i, a)| (*a, self.model.addr(LocId(i))))
            .collect();
        keys.iter()
            .map(|k| {
                let w = value_type(self.test, *k).width;
                let raw = match *k {
                    Lval::Reg(t, r) => self.threads[t.0].regs[r.0 as usize],
                    Lval::Loc(id) => {
                        let mut b = [0u8; 8];
                        self.nodes[0]
                            .guest
                            .read(self.addrs[id.0], &mut b[..w.bytes()])
                            .expect("inside guest memory");
                        u64::from_le_bytes(b)
                    }
                };
                let v = raw & w.mask();
                to_model.get(&v).copied().unwrap_or(v)
            })
            .collect()
    }
}

fn tracing() -> bool {
    std::env::var_os("VSMP_SIM_TRACE").is_some()
}

/// Carries a node's outputs: the network ones by its link, protection into its map.
fn carry(node: &mut Node, i: usize) -> Result<(), String> {
    let trace = tracing();
    let fail = |e: net::NetError| format!("node {i}: {e}");
    while let Some(o) = node.engine.next_output() {
        if trace {
            eprintln!("  node {i}: {o:?}");
        }
        match node.link.handle(&mut node.engine, o).map_err(fail)? {
            None => {}
            Some(Output::Protect { page, writable }) => node.writable[page.index()] = writable,
            Some(Output::Console { .. }) => {}
            Some(other) => unreachable!("the link carries {other:?}"),
        }
    }
    node.link.retry().map_err(fail)
}

/// The memory operand an instruction writes, if any (a locked RMW writes even when its
/// comparison fails).
fn written_operand(instr: &Instr) -> Option<Operand> {
    let dst = match *instr {
        Instr::Mov { dst, .. } => dst,
        Instr::Alu { op, dst, .. } if op.writes_dst() => dst,
        Instr::Xchg { dst, .. } | Instr::Xadd { dst, .. } => dst,
        Instr::Cmpxchg { dst, locked, .. } if locked => dst,
        _ => return None,
    };
    dst.is_mem().then_some(dst)
}

fn instr_width(instr: &Instr) -> Width {
    match *instr {
        Instr::Mov { width, .. }
        | Instr::Alu { width, .. }
        | Instr::Xchg { width, .. }
        | Instr::Xadd { width, .. }
        | Instr::Cmpxchg { width, .. } => width,
        _ => Width::W8,
    }
}
