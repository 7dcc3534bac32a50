//! The reference model: an exhaustive operational explorer of x86-TSO.
//!
//! The machine is the classic x86-TSO abstract machine (Sewell et al., "x86-TSO: a rigorous and
//! usable programmer's model", CACM 2010): each thread executes its instructions in order; its
//! stores go into its own FIFO store buffer; a load takes, byte by byte, the newest value for that
//! byte in its own buffer (store-to-load forwarding) or else the value in shared memory; at any
//! moment the oldest entry of any buffer may be written to memory. `mfence` waits until its
//! thread's buffer is empty. A locked instruction and `xchg` with memory wait for an empty buffer
//! and then read and write memory in one atomic step (so they also act as fences).
//!
//! Memory is byte-addressed, so tests whose accesses differ in size or overlap (herd7's
//! mixed-size model) are handled by the same rules.
//!
//! The explorer is a depth-first search over machine states with a visited set, so every
//! reachable state is expanded once. Steps that touch nothing shared (register moves, jumps,
//! `mfence` on an empty buffer) commute with every other step, so when one is enabled it is the
//! only step taken from that state (a sound partial-order reduction).

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use crate::cond::Lval;
use crate::error::ModelError;
use crate::instr::{AluOp, Cc, Fence, Instr, Mem, Operand};
use crate::reg::{REG_COUNT, Reg};
use crate::test::{InitValue, LitmusTest, LocId, ThreadId, Width};

/// Most machine states the explorer visits before giving up (a runaway loop guard; the largest
/// test in the suite needs well under 100k).
pub const MAX_STATES: usize = 2_000_000;

/// Longest store buffer the explorer allows (a loop that only stores would grow it forever).
pub const MAX_BUFFER: usize = 64;

/// Where test addresses start, so that a location's address is never 0.
pub const ADDR_BASE: u64 = 0x1_0000;

/// Which memory model to explore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryModel {
    /// x86-TSO: store buffers, forwarding, fences.
    Tso,
    /// Sequential consistency: every store reaches memory at once.
    Sc,
}

/// Which places a final state records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The places the final condition mentions (what herd7 prints).
    Condition,
    /// Every register a thread writes or the condition names, and every scalar location.
    Full,
}

/// The set of final states a test allows, over an ordered list of places.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSet {
    pub keys: Vec<Lval>,
    /// Raw values, one per key, sorted the way herd7 sorts its state list.
    pub states: Vec<Vec<u64>>,
    /// For each state, how many distinct executions (reads-from and coherence choices) end in
    /// it; herd7's witness counts are sums of these.
    pub executions: Vec<usize>,
    /// Machine states explored.
    pub explored: usize,
}

/// The byte layout of a test's locations in the model's flat memory.
#[derive(Debug, Clone)]
pub struct Layout {
    offsets: Vec<usize>,
    size: usize,
}

impl Layout {
    pub fn new(test: &LitmusTest) -> Layout {
        let mut offsets = Vec::with_capacity(test.locations.len());
        let mut size = 0;
        for loc in &test.locations {
            offsets.push(size);
            size += loc.size_bytes().next_multiple_of(8);
        }
        Layout { offsets, size }
    }

    pub fn addr(&self, id: LocId) -> u64 {
        ADDR_BASE + self.offsets[id.0] as u64
    }

    fn value(&self, v: InitValue) -> u64 {
        match v {
            InitValue::Int(n) => n,
            InitValue::Addr(id) => self.addr(id),
        }
    }
}

/// The places a final state records for `test`, in herd7's order: registers by thread then
/// name, then locations by name.
pub fn observed_keys(test: &LitmusTest, scope: Scope) -> Vec<Lval> {
    let mut keys = Vec::new();
    test.condition.prop.lvals(&mut keys);
    if scope == Scope::Full {
        for (t, prog) in test.threads.iter().enumerate() {
            for instr in &prog.instrs {
                for reg in written_regs(instr) {
                    let k = Lval::Reg(ThreadId(t), reg);
                    if !keys.contains(&k) {
                        keys.push(k);
                    }
                }
            }
        }
        for (i, loc) in test.locations.iter().enumerate() {
            let k = Lval::Loc(LocId(i));
            if loc.len == 1 && !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    keys.sort_by_key(|k| match *k {
        Lval::Reg(t, r) => (0, t.0, r.herd_name(test.arch)),
        Lval::Loc(id) => (1, 0, test.location(id).name.clone()),
    });
    keys
}

/// Registers an instruction writes.
pub fn written_regs(instr: &Instr) -> Vec<Reg> {
    let reg_of = |o: &Operand| match o {
        Operand::Reg(r, _) => Some(*r),
        _ => None,
    };
    match instr {
        Instr::Mov { dst, .. } => reg_of(dst).into_iter().collect(),
        Instr::Alu { op, dst, .. } if op.writes_dst() => reg_of(dst).into_iter().collect(),
        Instr::Xchg { dst, src, .. } | Instr::Xadd { dst, src, .. } => {
            reg_of(dst).into_iter().chain([*src]).collect()
        }
        Instr::Cmpxchg { dst, .. } => reg_of(dst).into_iter().chain([Reg::RAX]).collect(),
        _ => Vec::new(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Pending {
    thread: u8,
    id: u16,
    addr: u64,
    width: Width,
    value: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Thread {
    pc: usize,
    zf: bool,
}

/// A fast non-cryptographic hasher for the visited set (a multiply-rotate word hash): machine
/// states are not attacker-chosen, and SipHash dominated the explorer's time.
#[derive(Debug, Clone, Copy, Default)]
struct FastHash;

impl std::hash::BuildHasher for FastHash {
    type Hasher = WordHasher;
    fn build_hasher(&self) -> WordHasher {
        WordHasher(0)
    }
}

#[derive(Debug)]
struct WordHasher(u64);

impl WordHasher {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(Self::K);
    }
}

impl std::hash::Hasher for WordHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let mut tail = [0u8; 8];
        let rest = chunks.remainder();
        tail[..rest.len()].copy_from_slice(rest);
        self.add(u64::from_le_bytes(tail) ^ ((rest.len() as u64) << 56));
    }
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64);
    }
    fn write_u16(&mut self, i: u16) {
        self.add(i as u64);
    }
    fn write_u32(&mut self, i: u32) {
        self.add(i as u64);
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
}

/// Identifies the initial write of every location in the witness.
const INIT_WRITER: u16 = u16::MAX;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Machine {
    threads: Vec<Thread>,
    /// The registers each thread uses, flattened (see `Explorer::slots`): hashing only these
    /// keeps the visited set small and fast.
    regs: Vec<u64>,
    /// Every thread's store buffer, grouped by thread (ascending), oldest first within a group.
    /// One vector for all threads keeps a machine to a handful of allocations.
    bufs: Vec<Pending>,
    mem: Vec<u8>,
    /// Which store wrote each byte of memory last.
    writer: Vec<u16>,
    /// Reads-from, grouped by thread: for each load in execution order, the stores its bytes
    /// came from.
    rf: Vec<(u8, u16)>,
    /// Coherence, grouped by location: the stores in the order they reached memory.
    co: Vec<(u16, u16)>,
}

impl Machine {
    fn buffer(&self, t: usize) -> impl DoubleEndedIterator<Item = &Pending> {
        self.bufs.iter().filter(move |p| p.thread as usize == t)
    }

    fn buffer_empty(&self, t: usize) -> bool {
        self.buffer(t).next().is_none()
    }
}

/// Inserts `item` at the end of its group in a vector grouped by ascending `key`.
fn push_grouped<T, K: Ord>(v: &mut Vec<T>, item: T, key: impl Fn(&T) -> K) {
    let k = key(&item);
    let at = v.partition_point(|x| key(x) <= k);
    v.insert(at, item);
}

/// Explores every execution of `test` under `model` and returns its final states.
pub fn explore(
    test: &LitmusTest,
    model: MemoryModel,
    scope: Scope,
) -> Result<StateSet, ModelError> {
    explore_bounded(test, model, scope, MAX_STATES)
}

/// [`explore`] with an explicit bound on the machine states visited.
pub fn explore_bounded(
    test: &LitmusTest,
    model: MemoryModel,
    scope: Scope,
    max_states: usize,
) -> Result<StateSet, ModelError> {
    let layout = Layout::new(test);
    let keys = observed_keys(test, scope);
    let (slots, slot_count) = register_slots(test);
    let ex = Explorer {
        test,
        layout: &layout,
        model,
        slots,
        slot_count,
    };
    let start = ex.initial();
    // States are shared between the visited set and the stack, not copied.
    let mut visited: HashSet<Rc<Machine>, FastHash> = HashSet::default();
    let mut finals: HashMap<Vec<u64>, usize> = HashMap::new();
    // A state is marked visited when first discovered, so each is pushed and expanded once.
    let start = Rc::new(start);
    visited.insert(Rc::clone(&start));
    let mut stack = vec![start];
    while let Some(m) = stack.pop() {
        let succ = ex.successors(&m)?;
        if succ.is_empty() {
            *finals
                .entry(keys.iter().map(|k| ex.observe(&m, *k)).collect())
                .or_default() += 1;
        }
        for s in succ {
            if !visited.contains(&s) {
                if visited.len() >= max_states {
                    return Err(ModelError::StateLimit {
                        test: test.name.clone(),
                        limit: max_states,
                    });
                }
                let s = Rc::new(s);
                visited.insert(Rc::clone(&s));
                stack.push(s);
            }
        }
    }
    let mut states: Vec<(Vec<u64>, usize)> = finals.into_iter().collect();
    let sort_keys: Vec<_> = keys.iter().map(|k| value_type(test, *k)).collect();
    states.sort_by_cached_key(|(s, _)| {
        s.iter()
            .zip(&sort_keys)
            .map(|(v, ty)| order_value(*ty, *v))
            .collect::<Vec<i128>>()
    });
    let (states, executions) = states.into_iter().unzip();
    Ok(StateSet {
        keys,
        states,
        executions,
        explored: visited.len(),
    })
}

/// The type a place's value is printed (and sorted) with.
pub fn value_type(test: &LitmusTest, k: Lval) -> crate::test::ValueType {
    match k {
        Lval::Reg(t, r) => test.reg_type(t, r),
        Lval::Loc(id) => test.location(id).ty,
    }
}

fn order_value(ty: crate::test::ValueType, raw: u64) -> i128 {
    let v = raw & ty.width.mask();
    if ty.signed {
        let shift = 64 - 8 * ty.width.bytes() as u32;
        (((v << shift) as i64) >> shift) as i128
    } else {
        v as i128
    }
}

struct Explorer<'a> {
    test: &'a LitmusTest,
    layout: &'a Layout,
    model: MemoryModel,
    /// For each thread and register, its index in `Machine::regs` if the thread uses it.
    slots: Vec<[Option<u16>; REG_COUNT]>,
    slot_count: usize,
}

/// Assigns a slot in the flat register vector to every register a thread mentions.
fn register_slots(test: &LitmusTest) -> (Vec<[Option<u16>; REG_COUNT]>, usize) {
    let mut slots = vec![[None; REG_COUNT]; test.threads.len()];
    let mut next = 0u16;
    let mut give = |slots: &mut Vec<[Option<u16>; REG_COUNT]>, t: usize, r: Reg| {
        let s = &mut slots[t][r.0 as usize];
        if s.is_none() {
            *s = Some(next);
            next += 1;
        }
    };
    for (t, prog) in test.threads.iter().enumerate() {
        for instr in &prog.instrs {
            for r in mentioned_regs(instr) {
                give(&mut slots, t, r);
            }
        }
    }
    for init in &test.reg_inits {
        give(&mut slots, init.thread.0, init.reg);
    }
    let mut lvals = Vec::new();
    test.condition.prop.lvals(&mut lvals);
    for l in lvals {
        if let Lval::Reg(t, r) = l {
            give(&mut slots, t.0, r);
        }
    }
    (slots, next as usize)
}

/// Every register an instruction reads or writes, including address registers.
fn mentioned_regs(instr: &Instr) -> Vec<Reg> {
    let mut out = written_regs(instr);
    let mut operand = |o: &Operand| match o {
        Operand::Reg(r, _) => out.push(*r),
        Operand::Mem(m) => {
            out.extend(m.base);
            out.extend(m.index.map(|(r, _)| r));
        }
        Operand::Imm(_) => {}
    };
    match instr {
        Instr::Mov { dst, src, .. } | Instr::Alu { dst, src, .. } => {
            operand(dst);
            operand(src);
        }
        Instr::Xchg { dst, .. } | Instr::Xadd { dst, .. } | Instr::Cmpxchg { dst, .. } => {
            operand(dst)
        }
        _ => {}
    }
    if matches!(instr, Instr::Cmpxchg { .. }) {
        out.push(Reg::RAX);
    }
    out
}

/// What one thread's next instruction needs.
enum Step {
    /// Touches nothing shared: take it alone.
    Local(Machine),
    /// A visible step.
    Shared(Machine),
    /// Not enabled now (a fence or locked instruction waiting for its buffer to drain).
    Blocked,
    /// The thread has finished.
    Done,
}

impl Explorer<'_> {
    fn slot(&self, t: usize, r: Reg) -> Option<usize> {
        self.slots[t][r.0 as usize].map(usize::from)
    }

    /// A register's value (a register the thread never mentions is zero).
    fn reg(&self, m: &Machine, t: usize, r: Reg) -> u64 {
        self.slot(t, r).map(|i| m.regs[i]).unwrap_or(0)
    }

    fn initial(&self) -> Machine {
        let mut mem = vec![0u8; self.layout.size];
        for (i, loc) in self.test.locations.iter().enumerate() {
            let base = self.layout.offsets[i];
            let elem = if loc.len == 1 {
                8
            } else {
                loc.ty.width.bytes()
            };
            for (k, v) in loc.init.iter().enumerate() {
                let bytes = self.layout.value(*v).to_le_bytes();
                mem[base + k * elem..base + (k + 1) * elem].copy_from_slice(&bytes[..elem]);
            }
        }
        let threads = (0..self.test.threads.len())
            .map(|_| Thread { pc: 0, zf: false })
            .collect();
        let mut regs = vec![0u64; self.slot_count];
        for init in &self.test.reg_inits {
            if let Some(i) = self.slot(init.thread.0, init.reg) {
                regs[i] = self.layout.value(init.value);
            }
        }
        let writer = vec![INIT_WRITER; mem.len()];
        Machine {
            threads,
            regs,
            bufs: Vec::new(),
            mem,
            writer,
            rf: Vec::new(),
            co: Vec::new(),
        }
    }

    fn observe(&self, m: &Machine, k: Lval) -> u64 {
        match k {
            Lval::Reg(t, r) => self.reg(m, t.0, r) & value_type(self.test, k).width.mask(),
            Lval::Loc(id) => {
                let w = self.test.location(id).ty.width;
                let off = self.layout.offsets[id.0];
                let mut b = [0u8; 8];
                b[..w.bytes()].copy_from_slice(&m.mem[off..off + w.bytes()]);
                u64::from_le_bytes(b)
            }
        }
    }

    fn successors(&self, m: &Machine) -> Result<Vec<Machine>, ModelError> {
        let mut out = Vec::new();
        for t in 0..m.threads.len() {
            match self.step(m, t)? {
                Step::Local(next) => return Ok(vec![next]),
                Step::Shared(next) => out.push(next),
                Step::Blocked | Step::Done => {}
            }
        }
        for t in 0..m.threads.len() {
            if let Some(at) = m.bufs.iter().position(|p| p.thread as usize == t) {
                let mut next = m.clone();
                let p = next.bufs.remove(at);
                self.write_mem(&mut next, p.id, p.addr, p.width, p.value);
                out.push(next);
            }
        }
        Ok(out)
    }

    fn step(&self, m: &Machine, t: usize) -> Result<Step, ModelError> {
        let prog = &self.test.threads[t];
        let th = &m.threads[t];
        let Some(instr) = prog.instrs.get(th.pc) else {
            return Ok(Step::Done);
        };
        let atomic = instr.is_atomic_rmw() || matches!(instr, Instr::Fence(Fence::M));
        if atomic && !m.buffer_empty(t) {
            return Ok(Step::Blocked);
        }
        let mut next = m.clone();
        next.threads[t].pc += 1;
        let shared = instr.accesses_memory() && !matches!(instr, Instr::Fence(_));
        match *instr {
            Instr::Mov { dst, src, width } => {
                let v = self.read(&mut next, t, src, width)?;
                self.write(&mut next, t, dst, width, v)?;
            }
            Instr::Alu {
                op,
                dst,
                src,
                width,
                ..
            } => {
                let a = self.read(&mut next, t, dst, width)?;
                let b = self.read(&mut next, t, src, width)?;
                let r = op.apply(a, b, width);
                next.threads[t].zf = r == 0;
                if op.writes_dst() {
                    self.write(&mut next, t, dst, width, r)?;
                }
            }
            Instr::Xchg { dst, src, width } => {
                let old = self.read(&mut next, t, dst, width)?;
                let v = self.read(&mut next, t, Operand::Reg(src, width), width)?;
                self.write(&mut next, t, dst, width, v)?;
                self.write(&mut next, t, Operand::Reg(src, width), width, old)?;
            }
            Instr::Xadd {
                dst, src, width, ..
            } => {
                let old = self.read(&mut next, t, dst, width)?;
                let v = self.read(&mut next, t, Operand::Reg(src, width), width)?;
                let sum = AluOp::Add.apply(old, v, width);
                next.threads[t].zf = sum == 0;
                self.write(&mut next, t, dst, width, sum)?;
                self.write(&mut next, t, Operand::Reg(src, width), width, old)?;
            }
            Instr::Cmpxchg {
                dst, src, width, ..
            } => {
                let old = self.read(&mut next, t, dst, width)?;
                let acc = self.read(&mut next, t, Operand::Reg(Reg::RAX, width), width)?;
                if old == acc {
                    next.threads[t].zf = true;
                    let v = self.read(&mut next, t, Operand::Reg(src, width), width)?;
                    self.write(&mut next, t, dst, width, v)?;
                } else {
                    next.threads[t].zf = false;
                    self.write(&mut next, t, Operand::Reg(Reg::RAX, width), width, old)?;
                }
            }
            Instr::Fence(_) | Instr::Nop => {}
            Instr::Jump { cond, target } => {
                let taken = match cond {
                    None => true,
                    Some(Cc::Eq) => th.zf,
                    Some(Cc::Ne) => !th.zf,
                };
                if taken {
                    next.threads[t].pc = target;
                }
            }
            Instr::Ret => next.threads[t].pc = prog.instrs.len(),
        }
        if next.buffer(t).count() > MAX_BUFFER {
            return Err(ModelError::BufferLimit {
                test: self.test.name.clone(),
                limit: MAX_BUFFER,
            });
        }
        Ok(if shared {
            Step::Shared(next)
        } else {
            Step::Local(next)
        })
    }

    fn address(&self, m: &Machine, t: usize, mem: Mem, width: Width) -> Result<u64, ModelError> {
        let mut a = mem.disp as u64;
        if let Some(s) = mem.sym {
            a = a.wrapping_add(self.layout.addr(s));
        }
        if let Some(b) = mem.base {
            a = a.wrapping_add(self.reg(m, t, b));
        }
        if let Some((i, scale)) = mem.index {
            a = a.wrapping_add(self.reg(m, t, i).wrapping_mul(scale as u64));
        }
        let end = ADDR_BASE + self.layout.size as u64;
        if a < ADDR_BASE || a.checked_add(width.bytes() as u64).is_none_or(|e| e > end) {
            return Err(ModelError::OutOfBounds {
                test: self.test.name.clone(),
                thread: t,
                addr: a,
            });
        }
        Ok(a)
    }

    fn read(
        &self,
        m: &mut Machine,
        t: usize,
        op: Operand,
        width: Width,
    ) -> Result<u64, ModelError> {
        Ok(match op {
            Operand::Imm(v) => v & width.mask(),
            Operand::Reg(r, w) => self.reg(m, t, r) & w.mask(),
            Operand::Mem(mem) => {
                let a = self.address(m, t, mem, width)?;
                let mut bytes = [0u8; 8];
                let mut last_source = None;
                for (j, byte) in bytes.iter_mut().enumerate().take(width.bytes()) {
                    let addr = a + j as u64;
                    let buffered = m
                        .buffer(t)
                        .rev()
                        .find(|p| addr >= p.addr && addr < p.addr + p.width.bytes() as u64);
                    let off = (addr - ADDR_BASE) as usize;
                    let (value, source) = match buffered {
                        Some(p) => (p.value.to_le_bytes()[(addr - p.addr) as usize], p.id),
                        None => (m.mem[off], m.writer[off]),
                    };
                    *byte = value;
                    if last_source != Some(source) {
                        push_grouped(&mut m.rf, (t as u8, source), |e| e.0);
                        last_source = Some(source);
                    }
                }
                u64::from_le_bytes(bytes)
            }
        })
    }

    /// Writes an operand. A memory write of a locked instruction, or any write under SC, goes
    /// straight to memory; other memory writes go to the thread's store buffer.
    fn write(
        &self,
        m: &mut Machine,
        t: usize,
        op: Operand,
        width: Width,
        v: u64,
    ) -> Result<(), ModelError> {
        match op {
            Operand::Imm(_) => {}
            Operand::Reg(r, w) => {
                // Every register an instruction writes has a slot (see `register_slots`).
                let Some(i) = self.slot(t, r) else {
                    return Ok(());
                };
                let slot = &mut m.regs[i];
                *slot = match w {
                    // x86-64: a 32-bit register write zero-extends.
                    Width::W8 | Width::W4 => v & w.mask(),
                    _ => (*slot & !w.mask()) | (v & w.mask()),
                };
            }
            Operand::Mem(mem) => {
                let a = self.address(m, t, mem, width)?;
                let pc = m.threads[t].pc - 1;
                let instr = self.test.threads[t].instrs[pc];
                let id = ((t as u16) << 10) | (pc as u16 & 0x3ff);
                if self.model == MemoryModel::Sc || instr.is_atomic_rmw() {
                    self.write_mem(m, id, a, width, v);
                } else {
                    let p = Pending {
                        thread: t as u8,
                        id,
                        addr: a,
                        width,
                        value: v & width.mask(),
                    };
                    push_grouped(&mut m.bufs, p, |e| e.thread);
                }
            }
        }
        Ok(())
    }

    fn write_mem(&self, m: &mut Machine, id: u16, addr: u64, width: Width, v: u64) {
        let off = (addr - ADDR_BASE) as usize;
        m.mem[off..off + width.bytes()].copy_from_slice(&v.to_le_bytes()[..width.bytes()]);
        m.writer[off..off + width.bytes()].fill(id);
        let loc = self.layout.offsets.partition_point(|o| *o <= off) - 1;
        push_grouped(&mut m.co, (loc as u16, id), |e| e.0);
    }
}

/// Counts how many of a state set's states satisfy the test's condition proposition.
pub fn positive_count(test: &LitmusTest, set: &StateSet) -> usize {
    let layout = Layout::new(test);
    let index: HashMap<Lval, usize> = set.keys.iter().enumerate().map(|(i, k)| (*k, i)).collect();
    set.states
        .iter()
        .zip(&set.executions)
        .filter(|(s, _)| {
            test.condition.prop.eval(&|l, v| {
                let ty = value_type(test, l);
                let actual = index.get(&l).map(|i| s[*i]).unwrap_or(0);
                (actual & ty.width.mask()) == (layout.value(v) & ty.width.mask())
            })
        })
        .map(|(_, n)| n)
        .sum()
}
