//! One node of a vsmp machine: its vCPU (a VM process under ptrace), its replica of guest
//! RAM, and, when the machine has more than one node, its coherence engine and link.
//!
//! # The vCPU state machine
//! - **Running**: guest code runs natively. The monitor thread sleeps in one event loop
//!   ([`wait`]) over the tracee (SIGCHLD through a signalfd), the fabric's notifier and a
//!   timer (the periodic flush, the next allowed kick). When the engine needs the vCPU stopped
//!   (a batch from a peer whose turn came, an ownership order, a flush that fell due) the
//!   monitor interrupts it (`PTRACE_INTERRUPT`; the tracee is attached with `PTRACE_SEIZE`),
//!   at most once per kick interval.
//! - **Stopped**: at a trap (marker, write fault, the interrupt). The monitor serves the engine
//!   (applies what is applicable, serves orders, flushes if due), then resumes the vCPU as soon
//!   as the engine's gate opens and what the vCPU waits for ([`Pending`]) is done: an emulation
//!   to retry once its pages are writable, a locked instruction to single-step on owned pages,
//!   a fence.
//! - **Stepping**: one locked instruction runs natively (`PTRACE_SYSEMU_SINGLESTEP`); its
//!   SIGTRAP retires it and a fence follows.
//! - **Ended**: the vCPU's `main` returned or it wrote the exit port; the VM process never
//!   runs again, and the node keeps serving the engine (orders, batches) until the machine's
//!   end is decided in the global order.
//!
//! # Memory
//! Every access the monitor makes to guest RAM goes through [`platform::NodePlatform`], which
//! refuses a write to a page the node may not write (the emulation is then retried once the
//! engine has made the page writable: every emulated write happens before any side effect
//! that cannot be repeated), and through the engine's [`Replica`] for applied batches. A guest
//! write to a protected page faults ([`crate::vm::protect`]) and becomes the engine's write
//! fault, for every page the faulting instruction writes (decoded, lowest first).
//!
//! Threads: the node's monitor thread does everything here; it is the ptrace tracer.
#![deny(unsafe_code)]

pub mod console;
mod platform;
pub mod stats;
mod wait;

pub use wait::block_sigchld;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iced_x86::{InstructionInfoFactory, Mnemonic};
use nix::sys::signal::Signal;
use vsmp_affinity::Placement;
use vsmp_coherence::engine::{Config as EngineConfig, Engine, Gate, MachineEnd, Output, Replica};
use vsmp_coherence::fabric::{Fabric, Memory, NodeId, RegionSpec};
use vsmp_coherence::net::{self, Link, NetError, Sizes};
use vsmp_coherence::{Gpa, PAGE_BYTES, PageNo, pages_of};

use crate::devices::DeviceError;
use crate::emulate::footprint::written_memory;
use crate::emulate::{self, EmulateError, MAX_INSN_BYTES, Outcome, Trap};
use crate::marker::Marker;
use crate::platform::Regs;
use crate::vcpu::{Vcpu, VcpuConfig};
use crate::vm::elf::{ElfError, GuestImage};
use crate::vm::memory::{GuestMemory, MemoryError};
use crate::vm::process::{self, ProcessError};
use crate::vm::protect::{self, ProtectError, Protector};
use crate::vm::run::{InsnAt, RunError};
use crate::vm::stats::TrapKind;
use crate::vm::trace::{Event, TraceError, Tracee};
use console::{ConsoleOut, ConsoleTap};
use platform::NodePlatform;
use stats::{NodeStats, Waited};

/// `si_code` of a SIGSEGV the kernel raised itself (#GP: a privileged instruction).
const SI_KERNEL: i32 = 0x80;

/// The default periodic flush: the longest an unfenced store stays invisible to other nodes
/// (plus the time to carry and apply it). See `docs/coherence.md` for how it was chosen.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(2);

/// Kicks of a running vCPU allowed per flush interval: the shortest time between two kicks is
/// the flush interval divided by this (250 us by default), which bounds both the share of a
/// busy vCPU's time spent stopped and how long an applicable batch or an order waits.
pub const KICKS_PER_FLUSH: u32 = 8;

/// The default twin pool: the most pages a node has dirty at once (4 MiB of twins).
pub const DEFAULT_TWINS: usize = 1024;

/// Console bytes a node buffers before they force a publish.
const CONSOLE_BYTES: usize = 4096;

/// How long a node waits, after the machine's end, for its peers to say they ended too.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a node other than 0 waits for node 0's image.
const IMAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub marker: Marker,
    pub placement: Placement,
    /// The periodic flush (and the shortest time between two kicks of a running vCPU).
    pub flush_interval: Duration,
    pub twins: usize,
    pub protection: protect::Choice,
    /// Prefix each console line with the vCPU that wrote it (on the console node).
    pub label: bool,
}

impl NodeConfig {
    /// The engine of this node in a machine of `nodes` over `mem_bytes` of guest RAM.
    fn engine(&self, me: NodeId, nodes: usize, mem_bytes: u64) -> EngineConfig {
        EngineConfig {
            me,
            nodes,
            pages: (mem_bytes / PAGE_BYTES as u64) as usize,
            twins: self.twins.max(2),
            console_bytes: CONSOLE_BYTES,
            flush_interval: self.flush_interval.as_nanos() as u64,
            console_node: NodeId(0),
        }
    }
}

/// The regions a machine's nodes register with the fabric (the same on every node).
pub fn regions(cfg: &NodeConfig, nodes: usize, mem_bytes: u64) -> Vec<RegionSpec> {
    net::regions(sizes(cfg, nodes, mem_bytes))
}

fn sizes(cfg: &NodeConfig, nodes: usize, mem_bytes: u64) -> Sizes {
    Sizes {
        nodes,
        guest_bytes: mem_bytes as usize,
        max_batch: cfg.engine(NodeId(0), nodes, mem_bytes).max_batch(),
    }
}

/// Guest RAM as the fabric's `GUEST` region (the same memfd, mapped again), to register before
/// joining.
pub fn guest_region(memory: &GuestMemory) -> Result<Arc<Memory>, NodeError> {
    let file = std::fs::File::from(
        memory
            .memfd()
            .try_clone_to_owned()
            .map_err(|e| NodeError::Setup(format!("cannot duplicate the guest RAM memfd: {e}")))?,
    );
    Memory::from_file(net::GUEST, file)
        .map(Arc::new)
        .map_err(|e| NodeError::Setup(format!("cannot map guest RAM for the fabric: {e}")))
}

/// Why a node stopped other than by the machine's end.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("cannot protect guest pages in the VM process")]
    Protect(#[from] ProtectError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("{0}")]
    Setup(String),
    #[error("cannot write the console output")]
    Console(#[source] std::io::Error),
}

impl From<TraceError> for NodeError {
    fn from(e: TraceError) -> NodeError {
        NodeError::Run(RunError::Trace(e))
    }
}

impl From<ProcessError> for NodeError {
    fn from(e: ProcessError) -> NodeError {
        NodeError::Run(RunError::Spawn(e))
    }
}

impl From<EmulateError> for NodeError {
    fn from(e: EmulateError) -> NodeError {
        NodeError::Run(RunError::Emulate(e))
    }
}

impl From<ElfError> for NodeError {
    fn from(e: ElfError) -> NodeError {
        NodeError::Run(RunError::Load(e))
    }
}

impl From<MemoryError> for NodeError {
    fn from(e: MemoryError) -> NodeError {
        NodeError::Run(RunError::Memory(e))
    }
}

impl From<DeviceError> for NodeError {
    fn from(e: DeviceError) -> NodeError {
        NodeError::Run(RunError::Console(e))
    }
}

/// How a node's run ended.
#[derive(Debug)]
pub struct NodeReport {
    /// The machine's exit status (the same on every node).
    pub status: u8,
    /// How it ended (`None` on a machine of one node).
    pub end: Option<MachineEnd>,
    pub stats: NodeStats,
}

/// What the stopped vCPU waits for before it resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Nothing but the engine's gate (a fault's pages, a fence, applying).
    Resume,
    /// An emulation that needs pages writable: retried when the gate opens.
    Emulate(Trap),
    /// A locked instruction at `regs.rip`, to single-step once its pages are writable.
    Atomic,
}

/// The vCPU. (Its registers are held in the state while it is stopped: one node has one, so
/// the size of the variant does not matter.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum State {
    Running {
        kicked: bool,
    },
    Stopped {
        regs: Regs,
        /// The registers the tracee has (so an unchanged set is not written back).
        original: Regs,
        pending: Pending,
        since: Instant,
        waited: Waited,
        /// The trap that stopped it, if one did (for `--stats`).
        trap: Option<TrapKind>,
    },
    Stepping {
        since: Instant,
        trap: Option<TrapKind>,
    },
    Ended,
}

/// The coherence side of a node of a machine of several.
struct Dsm {
    engine: Engine,
    link: Link,
    replica: Arc<Memory>,
    protector: Protector,
    console: ConsoleOut,
}

impl std::fmt::Debug for Dsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dsm")
            .field("me", &self.engine.me())
            .finish()
    }
}

/// Guest RAM as the engine sees it: the fabric's mapping of the memfd (offset = address).
struct ReplicaOf<'a>(&'a Memory);

impl Replica for ReplicaOf<'_> {
    fn read(&self, gpa: Gpa, buf: &mut [u8]) {
        self.0
            .read(gpa.0, buf)
            .expect("the engine reads inside guest RAM");
    }
    fn write(&self, gpa: Gpa, data: &[u8]) {
        self.0
            .write(gpa.0, data)
            .expect("the engine writes inside guest RAM");
    }
}

/// A node's place in a machine of several: its fabric endpoint and guest RAM as the `GUEST`
/// region it registered ([`guest_region`]).
#[derive(Debug, Clone)]
pub struct Joined {
    pub fabric: Arc<dyn Fabric>,
    pub guest: Arc<Memory>,
}

/// Runs this node to the machine's end. `joined` is `None` for a machine of one node (no DSM:
/// guest RAM stays writable, fences and locked instructions run natively). Node 0 loads
/// `image` and replicates it; the others wait for it. The machine's console goes to `stdout`
/// on node 0.
pub fn run_node(
    image: &GuestImage,
    memory: GuestMemory,
    joined: Option<Joined>,
    cfg: &NodeConfig,
    stdout: Box<dyn Write + Send>,
) -> Result<NodeReport, NodeError> {
    let (me, nodes) = joined
        .as_ref()
        .map_or((NodeId(0), 1), |j| (j.fabric.rank(), j.fabric.nodes()));
    let start = Instant::now();
    let mem_bytes = memory.size().bytes();
    let mut link = joined
        .as_ref()
        .map(|j| Link::new(Arc::clone(&j.fabric), sizes(cfg, nodes, mem_bytes)));
    if me == NodeId(0) {
        image.load_into(&memory)?;
        if let Some(link) = &mut link {
            let range = crate::layout::IMAGE_BASE..image.end().next_multiple_of(4096);
            link.share_image(&[range], IMAGE_TIMEOUT)?;
        }
    }
    // The engine exists before the image is here: batches and requests from nodes that started
    // already may arrive with (or just after) the image's doorbell, and must not be lost.
    let mut engine = Engine::new(cfg.engine(me, nodes, mem_bytes));
    if let (Some(link), Some(j)) = (&mut link, &joined) {
        if me != NodeId(0) {
            wait_for_image(link, &mut engine, &j.guest)?;
        }
    }
    if let Placement::Together(core) = cfg.placement {
        vsmp_affinity::pin_current_thread(core).map_err(RunError::Pin)?;
    }
    let mut tracee = process::spawn_stopped(
        &memory,
        image.entry,
        cfg.placement,
        me.0.into(),
        nodes as u32,
    )?;
    let (vcpu_console, tap, dsm) = match (link, joined) {
        (Some(link), Some(j)) => {
            let protector = Protector::attach(
                cfg.protection,
                &mut tracee,
                memory.ram_start(),
                memory.ram_end(),
            )?;
            let tap = ConsoleTap::default();
            let dsm = Dsm {
                engine,
                link,
                replica: j.guest,
                protector,
                console: ConsoleOut::new(stdout, nodes, cfg.label),
            };
            (
                Box::new(tap.clone()) as Box<dyn Write + Send>,
                Some(tap),
                Some(dsm),
            )
        }
        _ => (stdout, None, None),
    };
    let vcpu = Vcpu::new(
        VcpuConfig {
            id: me.0.into(),
            count: nodes as u32,
        },
        vcpu_console,
    );
    let node = Node {
        tracee,
        memory: &memory,
        vcpu,
        dsm,
        tap,
        state: State::Running { kicked: false },
        marker: cfg.marker,
        start,
        kick_interval: (cfg.flush_interval / KICKS_PER_FLUSH).as_nanos() as u64,
        last_kick: 0,
        factory: InstructionInfoFactory::new(),
        stats: NodeStats::new(),
        waiter: wait::Waiter::new()?,
        solo_end: None,
    };
    node.run()
}

/// Polls until node 0 rang that this replica holds the image; whatever else arrives goes to
/// the engine, which queues it (its outputs are carried once the node runs).
fn wait_for_image(link: &mut Link, engine: &mut Engine, replica: &Memory) -> Result<(), NodeError> {
    let deadline = Instant::now() + IMAGE_TIMEOUT;
    while !link.image_ready() {
        if Instant::now() > deadline {
            return Err(NodeError::Setup(format!(
                "node 0 did not share the guest image within {IMAGE_TIMEOUT:?}"
            )));
        }
        if !link.poll(engine, &ReplicaOf(replica), 0)? {
            vsmp_coherence::fabric::sleep_on(link.fabric().notifier(), Duration::from_millis(5));
        }
    }
    Ok(())
}

struct Node<'m> {
    tracee: Tracee,
    memory: &'m GuestMemory,
    vcpu: Vcpu,
    dsm: Option<Dsm>,
    tap: Option<ConsoleTap>,
    state: State,
    marker: Marker,
    start: Instant,
    /// The shortest time between two kicks, in nanoseconds since `start`.
    kick_interval: u64,
    last_kick: u64,
    factory: InstructionInfoFactory,
    stats: NodeStats,
    waiter: wait::Waiter,
    /// A machine of one node: how it ended.
    solo_end: Option<u8>,
}

impl Node<'_> {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn run(mut self) -> Result<NodeReport, NodeError> {
        self.tracee.resume()?;
        let result = self.event_loop();
        self.tracee.kill_and_reap();
        let status = result?;
        if let Some(d) = &mut self.dsm {
            d.console.flush().map_err(NodeError::Console)?;
            self.stats.engine = d.engine.counters();
            self.stats.protect = d.protector.counters();
            self.stats.mechanism = Some(d.protector.mechanism());
        } else {
            self.vcpu.flush()?;
        }
        Ok(NodeReport {
            status,
            end: self.dsm.as_ref().and_then(|d| d.engine.machine_end()),
            stats: self.stats,
        })
    }

    /// The loop proper: returns the machine's exit status.
    fn event_loop(&mut self) -> Result<u8, NodeError> {
        loop {
            let mut progressed = false;
            while let Some(event) = self.tracee.try_wait()? {
                self.on_event(event)?;
                progressed = true;
            }
            if let Some(status) = self.solo_end {
                return Ok(status);
            }
            progressed |= self.poll_network()?;
            progressed |= self.service()?;
            if let Some(end) = self.dsm.as_ref().and_then(|d| d.engine.machine_end()) {
                self.goodbye()?;
                return Ok(end.status());
            }
            if !progressed {
                self.sleep()?;
            }
        }
    }

    fn poll_network(&mut self) -> Result<bool, NodeError> {
        let now = self.now();
        let Some(d) = &mut self.dsm else {
            return Ok(false);
        };
        let any = d.link.poll(&mut d.engine, &ReplicaOf(&d.replica), now)?;
        if any {
            self.carry()?;
        }
        Ok(any)
    }

    /// Carries the engine's outputs: network ones by the link, protection by the protector,
    /// console bytes to the console.
    fn carry(&mut self) -> Result<(), NodeError> {
        let Some(d) = &mut self.dsm else {
            return Ok(());
        };
        while let Some(o) = d.engine.next_output() {
            match d.link.handle(&mut d.engine, o)? {
                None => {}
                Some(Output::Protect { page, writable }) => d.protector.set(page.0, writable),
                Some(Output::Console { from, bytes }) => {
                    d.console.write(from, &bytes).map_err(NodeError::Console)?
                }
                Some(other) => unreachable!("the link carries {other:?}"),
            }
        }
        d.link.retry()?;
        if d.protector.pending() {
            if d.protector.needs_stopped() && matches!(self.state, State::Running { .. }) {
                // Protection changes happen only with the vCPU stopped (the engine's contract).
                return Err(NodeError::Setup(
                    "a protection change was asked for while the vCPU runs".into(),
                ));
            }
            d.protector.apply(&mut self.tracee)?;
        }
        Ok(())
    }

    /// Serves the engine and moves the vCPU on. Returns whether anything changed.
    fn service(&mut self) -> Result<bool, NodeError> {
        let now = self.now();
        let Some(d) = &mut self.dsm else {
            return self.solo_resume();
        };
        match &self.state {
            State::Running { kicked } => {
                let kicked = *kicked;
                d.engine
                    .serve_running(&ReplicaOf(&d.replica))
                    .map_err(|source| NetError::Protocol {
                        peer: d.engine.me(),
                        source,
                    })?;
                let needs = d.engine.needs_stop(now);
                self.carry()?;
                if needs && !kicked && now >= self.last_kick + self.kick_interval {
                    self.tracee.interrupt()?;
                    self.last_kick = now;
                    self.stats.kicks += 1;
                    self.state = State::Running { kicked: true };
                    return Ok(true);
                }
                Ok(false)
            }
            State::Stepping { .. } => Ok(false),
            State::Ended => {
                let before = d.engine.applied();
                serve(d, now)?;
                let after = d.engine.applied();
                self.carry()?;
                Ok(after != before)
            }
            State::Stopped { .. } => {
                serve(d, now)?;
                self.carry()?;
                self.advance_stopped()
            }
        }
    }

    /// A machine of one node: a stopped vCPU resumes at once.
    fn solo_resume(&mut self) -> Result<bool, NodeError> {
        if let State::Stopped { .. } = self.state {
            return self.advance_stopped();
        }
        Ok(false)
    }

    /// A stopped vCPU whose gate is open goes on with what it was waiting for.
    fn advance_stopped(&mut self) -> Result<bool, NodeError> {
        let State::Stopped {
            regs,
            original,
            pending,
            since,
            waited,
            trap,
        } = self.state
        else {
            return Ok(false);
        };
        let gate = self.dsm.as_ref().map_or(Gate::Go, |d| d.engine.gate());
        if gate == Gate::Wait {
            return Ok(false);
        }
        match pending {
            Pending::Resume => {
                if regs != original {
                    self.tracee.set_regs(regs.into())?;
                }
                self.stats.record(waited, trap, since.elapsed());
                self.tracee.resume()?;
                self.state = State::Running { kicked: false };
            }
            Pending::Emulate(trap) => {
                self.emulate(trap, original, since)?;
            }
            Pending::Atomic => {
                if self.dsm.is_none() {
                    // One node: the instruction simply runs natively.
                    if regs != original {
                        self.tracee.set_regs(regs.into())?;
                    }
                    self.stats.record(waited, trap, since.elapsed());
                    self.tracee.resume()?;
                    self.state = State::Running { kicked: false };
                } else {
                    if regs != original {
                        self.tracee.set_regs(regs.into())?;
                    }
                    self.tracee.single_step()?;
                    self.state = State::Stepping { since, trap };
                }
            }
        }
        Ok(true)
    }

    /// The end of the machine was decided: the VM process runs no more; every post completes
    /// and every peer is told, and heard from (or the wait times out).
    fn goodbye(&mut self) -> Result<(), NodeError> {
        self.tracee.kill_and_reap();
        self.state = State::Ended;
        let deadline = Instant::now() + GOODBYE_TIMEOUT;
        loop {
            let now = self.now();
            let Some(d) = &mut self.dsm else {
                return Ok(());
            };
            let any = d.link.poll(&mut d.engine, &ReplicaOf(&d.replica), now)?;
            serve(d, now)?;
            self.carry()?;
            let Some(d) = &mut self.dsm else {
                return Ok(());
            };
            if !d.link.busy() {
                d.link.say_ended()?;
                if d.link.all_ended() && !d.link.busy() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                tracing::warn!(
                    "the machine ended, but not every node confirmed it within {GOODBYE_TIMEOUT:?}"
                );
                return Ok(());
            }
            if !any {
                vsmp_coherence::fabric::sleep_on(
                    d.link.fabric().notifier(),
                    Duration::from_millis(1),
                );
            }
        }
    }

    /// Sleeps until the tracee stops, the network delivers, or a deadline passes. A stopped
    /// vCPU waiting on the network spins first where the fabric's polls are cheap.
    fn sleep(&mut self) -> Result<(), NodeError> {
        let now = self.now();
        let Some(d) = &mut self.dsm else {
            if self.waiter.wait(None, None)? {
                eprintln!("vsmp: node 0 (alone): vCPU {}", self.state_name());
            }
            return Ok(());
        };
        if let State::Stopped { since, .. } = self.state {
            if since.elapsed() < d.link.fabric().spin_before_sleep() {
                std::hint::spin_loop();
                return Ok(());
            }
        }
        let mut deadline = d.engine.flush_deadline();
        if matches!(self.state, State::Running { kicked: false }) && d.engine.needs_stop(now) {
            let next = self.last_kick + self.kick_interval;
            deadline = Some(deadline.map_or(next, |d| d.min(next)));
        }
        d.link.fabric().arm_notifier();
        // An arrival just before arming does not fire the notifier: look once more.
        if d.link.poll(&mut d.engine, &ReplicaOf(&d.replica), now)? {
            self.carry()?;
            return Ok(());
        }
        let timeout = deadline.map(|t| Duration::from_nanos(t.saturating_sub(now)));
        let fabric = Arc::clone(d.link.fabric());
        if self.waiter.wait(Some(fabric.notifier()), timeout)? {
            let d = self.dsm.as_ref().expect("a DSM node");
            eprintln!(
                "vsmp: node {}: vCPU {}, gate {:?}; engine: {}; link: {}",
                d.engine.me().0,
                self.state_name(),
                d.engine.gate(),
                d.engine.describe(),
                d.link.describe()
            );
        }
        Ok(())
    }

    /// What the vCPU is doing, for diagnostics.
    fn state_name(&self) -> String {
        match &self.state {
            State::Running { kicked } => format!("running (kicked: {kicked})"),
            State::Stopped { regs, pending, .. } => {
                format!("stopped at {:#x}, waiting to {pending:?}", regs.rip)
            }
            State::Stepping { .. } => "stepping a locked instruction".into(),
            State::Ended => "ended".into(),
        }
    }

    /// A stop of the tracee.
    fn on_event(&mut self, event: Event) -> Result<(), NodeError> {
        let since = Instant::now();
        self.stats.by_kind.stop_observed(since);
        match event {
            Event::Exited(status) => return Err(RunError::VmExited { status }.into()),
            Event::Killed(Signal::SIGSYS) => return Err(RunError::KilledBySeccomp.into()),
            Event::Killed(signal) => return Err(RunError::VmKilled { signal }.into()),
            Event::Syscall => {
                let regs = Regs::from(self.tracee.regs()?);
                return Err(refuse_syscall(&regs, self.memory).into());
            }
            Event::Interrupted | Event::GroupStop(_) => {
                if let State::Stepping { .. } = self.state {
                    // An interrupt that beat the step: step again.
                    self.tracee.single_step()?;
                    return Ok(());
                }
                let regs = Regs::from(self.tracee.regs()?);
                self.stop_here(regs, Pending::Resume, since, Waited::Kick);
            }
            Event::Signal(signal) => {
                let regs = Regs::from(self.tracee.regs()?);
                self.on_signal(signal, regs, since)?;
            }
        }
        Ok(())
    }

    fn stop_here(&mut self, regs: Regs, pending: Pending, since: Instant, waited: Waited) {
        if let Some(d) = &mut self.dsm {
            d.engine.stopped_at(regs.rip);
        }
        self.state = State::Stopped {
            regs,
            original: regs,
            pending,
            since,
            waited,
            trap: None,
        };
    }

    fn on_signal(&mut self, signal: Signal, regs: Regs, since: Instant) -> Result<(), NodeError> {
        let rip = regs.rip;
        if let State::Stepping { since, trap } = self.state {
            if signal == Signal::SIGTRAP {
                // The locked instruction retired: drain as a fence does.
                let now = self.now();
                let d = self.dsm.as_mut().expect("only a DSM node steps");
                d.engine.retired();
                d.engine.fence(&ReplicaOf(&d.replica), now);
                self.state = State::Stopped {
                    regs,
                    original: regs,
                    pending: Pending::Resume,
                    since,
                    waited: Waited::Atomic,
                    trap,
                };
                self.carry()?;
                return Ok(());
            }
        }
        match (signal, self.marker) {
            (Signal::SIGILL, Marker::Ud2) => {
                let mut b = [0u8; 2];
                if self.memory.read(rip, &mut b).is_ok() && b == [0x0f, 0x0b] {
                    return self.trap(Trap::Marker { insn: rip + 2 }, regs, since);
                }
            }
            (Signal::SIGTRAP, Marker::Int3) => {
                let mut b = [0u8; 1];
                if rip > 0 && self.memory.read(rip - 1, &mut b).is_ok() && b == [0xcc] {
                    return self.trap(Trap::Marker { insn: rip }, regs, since);
                }
            }
            _ => {}
        }
        let info = self.tracee.siginfo()?;
        let addr = crate::vm::si_addr(&info);
        if let Some(d) = &self.dsm {
            if d.protector.is_write_fault(signal, info.si_code, addr) {
                return self.write_fault(addr, regs, since);
            }
        }
        if signal == Signal::SIGSEGV && info.si_code == SI_KERNEL {
            return self.trap(Trap::Fault { insn: rip }, regs, since);
        }
        Err(RunError::GuestCrashed {
            signal,
            cause: crate::vm::signal_cause(signal, info.si_code),
            addr: if matches!(
                signal,
                Signal::SIGSEGV | Signal::SIGBUS | Signal::SIGILL | Signal::SIGFPE
            ) {
                addr
            } else {
                rip
            },
            insn: InsnAt::read(self.memory, rip),
        }
        .into())
    }

    /// The guest's write to a protected page: every page its instruction writes is asked for
    /// (lowest first); the vCPU resumes at the instruction once all are writable.
    fn write_fault(&mut self, addr: u64, regs: Regs, since: Instant) -> Result<(), NodeError> {
        let mut pages = [PageNo(0); 8];
        let n = self.footprint(regs.rip, &regs, Some(addr), &mut pages);
        let now = self.now();
        self.stop_here(regs, Pending::Resume, since, Waited::Fault);
        let d = self.dsm.as_mut().expect("a write fault on a DSM node");
        d.engine
            .write_fault(&ReplicaOf(&d.replica), &pages[..n], regs.rip, now);
        self.carry()
    }

    /// The guest pages the instruction at `rip` writes, ascending and deduplicated, with the
    /// faulting address's page; only pages of guest RAM.
    fn footprint(
        &mut self,
        rip: u64,
        regs: &Regs,
        fault: Option<u64>,
        out: &mut [PageNo; 8],
    ) -> usize {
        let mut n = 0;
        let ram = self.memory.ram_start()..self.memory.ram_end();
        let mut add = |p: PageNo, n: &mut usize| {
            let a = p.gpa().0;
            if ram.contains(&a) && *n < out.len() && !out[..*n].contains(&p) {
                out[*n] = p;
                *n += 1;
            }
        };
        if let Some(a) = fault {
            add(Gpa(a).page(), &mut n);
        }
        let mut bytes = [0u8; MAX_INSN_BYTES];
        let len = (1..=MAX_INSN_BYTES)
            .rev()
            .find(|l| self.memory.read(rip, &mut bytes[..*l]).is_ok())
            .unwrap_or(0);
        if len > 0 {
            if let Some(w) = written_memory(&bytes[..len], rip, regs, &mut self.factory) {
                for (addr, size) in w.iter() {
                    for p in pages_of(Gpa(addr), size) {
                        add(p, &mut n);
                    }
                }
            }
        }
        out[..n].sort_unstable();
        n
    }

    /// A trap at a marker or a native #GP: emulate it.
    fn trap(&mut self, trap: Trap, regs: Regs, since: Instant) -> Result<(), NodeError> {
        self.stop_here(regs, Pending::Resume, since, Waited::Trap);
        self.emulate(trap, regs, since)
    }

    fn emulate(&mut self, trap: Trap, regs: Regs, since: Instant) -> Result<(), NodeError> {
        let now = self.now();
        let mut platform =
            NodePlatform::new(regs, self.memory, self.dsm.as_ref().map(|d| &d.protector));
        let result = emulate::handle_trap(&mut self.vcpu, &mut platform, trap);
        let needs = platform.needs();
        let after = platform.regs;
        let emulated = match result {
            Ok(e) => e,
            Err(_) if needs.is_some() => {
                // It writes guest memory the node may not write yet: ask for the pages and
                // emulate again once they are writable.
                let (gpa, len) = needs.expect("checked");
                let mut pages = [PageNo(0); 8];
                let mut n = self.footprint(trap.insn(), &regs, None, &mut pages);
                for p in pages_of(Gpa(gpa), len as u64) {
                    if n < pages.len() && !pages[..n].contains(&p) {
                        pages[n] = p;
                        n += 1;
                    }
                }
                pages[..n].sort_unstable();
                self.state = State::Stopped {
                    regs,
                    original: regs,
                    pending: Pending::Emulate(trap),
                    since,
                    waited: Waited::Trap,
                    trap: None,
                };
                let d = self.dsm.as_mut().expect("only a DSM node refuses writes");
                d.engine
                    .write_fault(&ReplicaOf(&d.replica), &pages[..n], trap.insn(), now);
                return self.carry();
            }
            Err(e) => return Err(e.into()),
        };
        self.stats.traps += 1;
        let kind = match trap {
            Trap::Marker { .. } => TrapKind::Marker(emulated.mnemonic),
            Trap::Fault { .. } => TrapKind::Fault(emulated.mnemonic),
        };
        let port_io = is_port_io(emulated.mnemonic);
        if port_io {
            self.console_to_engine(now)?;
        }
        let mut waited = Waited::Trap;
        let pending = match emulated.outcome {
            Outcome::Resume => {
                if port_io {
                    // I/O is an ordering point: x86 drains stores before in/out.
                    self.fence(now);
                    waited = Waited::Fence;
                }
                Pending::Resume
            }
            Outcome::Fence => {
                self.fence(now);
                waited = Waited::Fence;
                Pending::Resume
            }
            Outcome::Atomic => {
                if self.dsm.is_some() {
                    let mut pages = [PageNo(0); 8];
                    let n = self.footprint(after.rip, &after, None, &mut pages);
                    let d = self.dsm.as_mut().expect("checked");
                    d.engine
                        .write_fault(&ReplicaOf(&d.replica), &pages[..n], after.rip, now);
                }
                Pending::Atomic
            }
            Outcome::Halt { .. } => {
                return Err(RunError::HaltedForever {
                    vcpu: self.vcpu.id(),
                    insn: halt_name(emulated.mnemonic),
                    rip: trap.insn(),
                }
                .into());
            }
            Outcome::Exit { status } | Outcome::Done { status } => {
                self.stats.record(Waited::Trap, Some(kind), since.elapsed());
                let machine = matches!(emulated.outcome, Outcome::Exit { .. });
                match &mut self.dsm {
                    None => {
                        self.solo_end = Some(status);
                    }
                    Some(d) => {
                        d.engine.end(&ReplicaOf(&d.replica), status, machine, now);
                    }
                }
                self.state = State::Ended;
                return self.carry();
            }
        };
        self.state = State::Stopped {
            regs: after,
            original: regs,
            pending,
            since,
            waited,
            trap: Some(kind),
        };
        self.carry()
    }

    fn fence(&mut self, now: u64) {
        if let Some(d) = &mut self.dsm {
            d.engine.fence(&ReplicaOf(&d.replica), now);
        }
    }

    /// Console bytes the UART produced go into the engine (in the node's next batch).
    fn console_to_engine(&mut self, now: u64) -> Result<(), NodeError> {
        let (Some(d), Some(tap)) = (&mut self.dsm, &self.tap) else {
            return Ok(());
        };
        self.vcpu.flush()?;
        tap.drain(|bytes| d.engine.console(&ReplicaOf(&d.replica), bytes, now));
        Ok(())
    }
}

/// Serves a DSM node's engine with the vCPU not running.
fn serve(d: &mut Dsm, now: u64) -> Result<(), NodeError> {
    d.engine
        .serve(&ReplicaOf(&d.replica), now)
        .map_err(|source| {
            NetError::Protocol {
                peer: d.engine.me(),
                source,
            }
            .into()
        })
}

fn is_port_io(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::In
            | Mnemonic::Out
            | Mnemonic::Insb
            | Mnemonic::Insw
            | Mnemonic::Insd
            | Mnemonic::Outsb
            | Mnemonic::Outsw
            | Mnemonic::Outsd
    )
}

fn halt_name(m: Mnemonic) -> &'static str {
    match m {
        Mnemonic::Hlt => "hlt",
        Mnemonic::Mwait => "mwait",
        Mnemonic::Mwaitx => "mwaitx",
        _ => "halt",
    }
}

/// The refusal of a guest system call (it has not run and will not).
fn refuse_syscall(regs: &Regs, memory: &GuestMemory) -> RunError {
    let insn_rip = regs.rip.wrapping_sub(2);
    let mut b = [0u8; 2];
    let via = match memory.read(insn_rip, &mut b).map(|_| b) {
        Ok([0x0f, 0x05]) => "syscall",
        Ok([0xcd, 0x80]) => "int $0x80",
        Ok([0x0f, 0x34]) => "sysenter",
        _ => "an unknown instruction",
    };
    let name = if via == "syscall" {
        crate::vm::run::syscall_name(regs.orig_rax)
    } else {
        "i386 system call table"
    };
    RunError::HostSyscall {
        nr: regs.orig_rax,
        name,
        via,
        rip: insn_rip,
    }
}
