//! The protocol of one node, as a state machine with no I/O of its own: the driver (the
//! monitor over the real fabric, or a simulation) feeds it events (a write fault, a fence, a
//! ticket, a batch or a message from a peer, the passing of time) and carries out the
//! [`Output`]s it queues (change a page's protection, take a ticket, publish a batch, send a
//! message, print console bytes). Why it is exactly x86-TSO is argued in `docs/coherence.md`.
//!
//! In short:
//! - **One writer per page.** A page is written only by its owner; everyone else maps it read
//!   only. The first write of an owned page after a publish takes a twin; a publish diffs every
//!   dirty page against its twin.
//! - **One global order.** Every batch takes a ticket from the sequencer (a `fetch_add` at node
//!   0) and every node applies batches strictly in ticket order, its vCPU stopped. A batch is a
//!   program-order prefix of its node's effects: all its dirty pages, the pages it hands on,
//!   its console bytes, its end.
//! - **The store buffer** is the node's unpublished writes plus its own published batches it has
//!   not yet applied; a fence (and a locked instruction, I/O, the exit) publishes and then waits
//!   until the node's applied prefix reaches its last ticket.
//! - **Ownership moves in the global order.** A write fault on a page the node does not own
//!   asks the page's manager (`page % nodes`), which forwards an order to the last owner it
//!   granted; that owner hands the page on in a batch of its own (its whole store buffer, one
//!   ticket), and the new owner may write only after applying the whole prefix through it.
//!   Pages granted for a faulting instruction are held until that instruction retires, and an
//!   instruction's pages are acquired one at a time in ascending order.
//!
//! The driver's contract: the replica is touched (by [`Engine::serve`], and by every call that
//! takes a replica) only while the vCPU is stopped, except [`Engine::serve_running`]; the vCPU
//! runs only while [`Engine::gate`] says [`Gate::Go`]; a running vCPU is stopped when
//! [`Engine::needs_stop`] says so (the driver decides how soon, which bounds visibility).
//!
//! Nothing here allocates on the fault or fence path once the engine is built: the twins come
//! from a bounded pool, the batch is built in a buffer sized for the largest batch, batch
//! buffers are recycled, and the queues are preallocated.
#![forbid(unsafe_code)]

use std::collections::VecDeque;

use vsmp_fabric::NodeId;

use crate::batch::{self, Batch, BatchError, BatchWriter, Record};
use crate::twin_pool::{Twin, TwinPool};
use crate::{Gpa, PAGE_BYTES, PageNo};

/// A node's view of guest memory: its replica, read and written by copies.
pub trait Replica {
    fn read(&self, gpa: Gpa, buf: &mut [u8]);
    fn write(&self, gpa: Gpa, data: &[u8]);
}

/// The most pages one batch hands on; more orders wait for the next batch.
pub const MAX_TRANSFERS: usize = 64;

/// How a node's engine is set up.
#[derive(Debug, Clone)]
pub struct Config {
    pub me: NodeId,
    pub nodes: usize,
    /// Guest pages, `0..pages`.
    pub pages: usize,
    /// Twins in the pool: the most pages dirty at once.
    pub twins: usize,
    /// Console bytes buffered before they force a publish.
    pub console_bytes: usize,
    /// The longest an unpublished store waits before a publish (the periodic flush), in the
    /// driver's time unit (nanoseconds in the monitor, ticks in the simulation).
    pub flush_interval: u64,
    /// The node whose driver prints the machine's console output.
    pub console_node: NodeId,
}

impl Config {
    /// The largest batch this configuration can publish.
    pub fn max_batch(&self) -> usize {
        batch::max_len(self.twins, self.console_bytes, MAX_TRANSFERS)
    }
}

/// What the engine asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Make `page` writable in the VM process, or read only (it stays readable and
    /// executable either way).
    Protect { page: PageNo, writable: bool },
    /// Take a ticket from the sequencer and report it with [`Engine::ticket`]. Tickets are
    /// reported in the order they were asked for.
    TakeTicket,
    /// Publish the batch with this ticket ([`Engine::take_batch`]) to every peer.
    Publish { ticket: u64 },
    /// Send a control message.
    Send { to: NodeId, msg: Msg },
    /// A batch from `from` was applied: its log space may be returned.
    Applied { from: NodeId },
    /// Console bytes of the machine written by `from`'s vCPU, in the global order (only on the
    /// console node).
    Console { from: NodeId, bytes: Vec<u8> },
}

/// A control message between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg {
    /// To a page's manager: this node wants to own `page`.
    Request { page: PageNo },
    /// From a page's manager to its last granted owner: hand `page` to `to`.
    Order { page: PageNo, to: NodeId },
    /// The machine ended here and every post of this node completed: its death from now on
    /// is its departure (handled by the link, not the engine).
    Ended,
}

impl Msg {
    /// Bytes of an encoded message.
    pub const BYTES: usize = 8;

    pub fn encode(&self) -> [u8; Msg::BYTES] {
        let mut b = [0u8; Msg::BYTES];
        match *self {
            Msg::Request { page } => {
                b[0] = 1;
                b[4..8].copy_from_slice(&page.0.to_le_bytes());
            }
            Msg::Order { page, to } => {
                b[0] = 2;
                b[2..4].copy_from_slice(&to.0.to_le_bytes());
                b[4..8].copy_from_slice(&page.0.to_le_bytes());
            }
            Msg::Ended => b[0] = 3,
        }
        b
    }

    /// Decodes a message from a peer, checking it against the machine.
    pub fn decode(b: &[u8], nodes: usize, pages: usize) -> Result<Msg, ProtocolError> {
        let bad = ProtocolError::Message;
        if b.len() != Msg::BYTES || b[1] != 0 {
            return Err(bad);
        }
        let page = PageNo(u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")));
        let to = NodeId(u16::from_le_bytes([b[2], b[3]]));
        match b[0] {
            1 if to.0 == 0 && page.index() < pages => Ok(Msg::Request { page }),
            2 if to.index() < nodes && page.index() < pages => Ok(Msg::Order { page, to }),
            3 if b[2..8] == [0; 6] => Ok(Msg::Ended),
            _ => Err(bad),
        }
    }
}

/// A peer broke the protocol (a garbled or impossible batch or message): the driver treats
/// the peer as failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("a malformed batch: {0}")]
    Batch(#[from] BatchError),
    #[error("a malformed control message")]
    Message,
    #[error("ticket {ticket} arrived out of order (ticket {applied} is applied here)")]
    StaleTicket { ticket: u64, applied: u64 },
    #[error("a diff of {page} from {from}, which does not own it (its owner is {owner})")]
    NotOwner {
        page: PageNo,
        from: NodeId,
        owner: NodeId,
    },
    #[error("{page} handed to {to}, but {from} does not own it (its owner is {owner})")]
    TransferNotOwner {
        page: PageNo,
        from: NodeId,
        to: NodeId,
        owner: NodeId,
    },
    #[error("an order to hand on {page}, which this node neither owns nor asked for")]
    StrayOrder { page: PageNo },
    #[error("a request for {page}, which this node does not manage")]
    NotManager { page: PageNo },
    #[error("more batches queued from {from} than its log can hold")]
    Flooded { from: NodeId },
}

/// What a node's vCPU may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Run.
    Go,
    /// Stay stopped: waiting for ownership, a ticket or the applied prefix, or the machine
    /// ended.
    Wait,
}

/// Why the machine ends, as every node decides it from the global order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineEnd {
    /// A vCPU wrote the exit port.
    Exit { status: u8, by: NodeId },
    /// Every vCPU's `main` returned; the first non-zero status in the global order, else 0.
    AllDone { status: u8 },
}

impl MachineEnd {
    pub fn status(&self) -> u8 {
        match *self {
            MachineEnd::Exit { status, .. } | MachineEnd::AllDone { status } => status,
        }
    }
}

/// Counters for `--stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub write_faults: u64,
    pub twins: u64,
    pub twin_pool_dry: u64,
    pub diffs: u64,
    pub diff_bytes: u64,
    pub batches_published: u64,
    pub batches_applied: u64,
    pub batch_bytes: u64,
    pub flushes: u64,
    pub fences: u64,
    pub ownership_requests: u64,
    pub transfers_out: u64,
    pub transfers_in: u64,
}

/// A page at this node.
#[derive(Debug)]
enum Local {
    /// Not ours: mapped read only.
    ReadOnly,
    /// Ours, clean since the last publish: mapped read only (a write takes a twin).
    Clean,
    /// Ours and written since the last publish: writable, with its twin.
    Dirty(Twin),
}

/// What the vCPU waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    None,
    /// Ownership of the pages in `want`, acquired lowest first.
    Pages,
    /// A fence: publish what is pending, then the applied prefix reaching the last ticket.
    Fence,
}

/// A batch of this node's, captured, waiting for its ticket and then its turn in the order.
#[derive(Debug)]
struct OwnBatch {
    /// 0 until the ticket arrives.
    ticket: u64,
    bytes: Vec<u8>,
    /// The driver has taken it to publish (until then it is not applied here either).
    taken: bool,
}

/// Own batches in flight at once without growing a queue (more only cost an allocation).
const OWN_IN_FLIGHT: usize = 64;

/// Most batches a peer may have queued here (its log holds no more, see `net.rs`).
pub const QUEUED_PER_PEER: usize = 4096;

/// One node's protocol state.
#[derive(Debug)]
pub struct Engine {
    cfg: Config,
    local: Vec<Local>,
    /// Each page's owner as of the applied prefix.
    owner: Vec<NodeId>,
    /// For the pages this node manages: the last owner it granted.
    granted: Vec<NodeId>,
    /// Pages this node asked for and has not been granted.
    requested: Vec<bool>,
    dirty: Vec<PageNo>,
    twins: TwinPool,
    /// Every ticket up to this one is applied here.
    applied: u64,
    /// This node's last ticket.
    last_ticket: u64,
    /// Captured batches: without a ticket yet (the newest), or waiting for their turn.
    own: VecDeque<OwnBatch>,
    /// Recycled batch buffers (own and received).
    spare: Vec<Vec<u8>>,
    /// Remote batches waiting for their turn, per sender (each in ticket order).
    queued: Vec<VecDeque<(u64, Vec<u8>)>>,
    writer: BatchWriter,
    /// Transfer orders not served yet (the page is not ours yet, or is held).
    orders: VecDeque<(PageNo, NodeId)>,
    /// Pages granted for the instruction at `pinned_at`, held until it retires.
    pinned: Vec<PageNo>,
    pinned_at: Option<u64>,
    wait: Wait,
    /// The pages the waiting instruction writes, ascending.
    want: Vec<PageNo>,
    console: Vec<u8>,
    /// The vCPU's end, not yet captured.
    end_pending: Option<EndRecord>,
    ended: bool,
    /// Per node: finished (`main` returned), as applied in order.
    done: Vec<bool>,
    first_failure: Option<u8>,
    machine_end: Option<MachineEnd>,
    /// When the oldest unpublished effect was made (the flush deadline runs from it).
    pending_since: Option<u64>,
    out: VecDeque<Output>,
    scratch: Box<[u8; PAGE_BYTES]>,
    counters: Counters,
}

#[derive(Debug, Clone, Copy)]
enum EndRecord {
    Done(u8),
    Exit(u8),
}

impl Engine {
    /// A node's engine at the machine's start: node 0 owns every page (it loaded the image),
    /// every other node maps every page read only.
    pub fn new(cfg: Config) -> Engine {
        assert!(cfg.me.index() < cfg.nodes, "a rank inside the group");
        assert!(
            cfg.console_bytes > 0 && cfg.twins >= 2,
            "a usable configuration (an instruction may need two twins)"
        );
        let owner0 = cfg.me == NodeId(0);
        let pages = cfg.pages;
        let max_batch = cfg.max_batch();
        Engine {
            local: (0..pages)
                .map(|_| {
                    if owner0 {
                        Local::Clean
                    } else {
                        Local::ReadOnly
                    }
                })
                .collect(),
            owner: vec![NodeId(0); pages],
            granted: vec![NodeId(0); pages],
            requested: vec![false; pages],
            dirty: Vec::with_capacity(cfg.twins),
            twins: TwinPool::new(cfg.twins),
            applied: 0,
            last_ticket: 0,
            own: VecDeque::with_capacity(OWN_IN_FLIGHT),
            spare: (0..8).map(|_| Vec::with_capacity(max_batch)).collect(),
            queued: (0..cfg.nodes)
                .map(|_| VecDeque::with_capacity(16))
                .collect(),
            writer: BatchWriter::with_capacity(max_batch),
            orders: VecDeque::with_capacity(2 * MAX_TRANSFERS),
            pinned: Vec::with_capacity(16),
            pinned_at: None,
            wait: Wait::None,
            want: Vec::with_capacity(16),
            console: Vec::with_capacity(cfg.console_bytes),
            end_pending: None,
            ended: false,
            done: vec![false; cfg.nodes],
            first_failure: None,
            machine_end: None,
            pending_since: None,
            out: VecDeque::with_capacity(1024),
            scratch: Box::new([0u8; PAGE_BYTES]),
            counters: Counters::default(),
            cfg,
        }
    }

    pub fn me(&self) -> NodeId {
        self.cfg.me
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The next thing to do, if any.
    pub fn next_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The bytes of the batch to publish (after [`Output::Publish`]); from then on it may be
    /// applied here too, so the driver copies them out before its next call.
    pub fn take_batch(&mut self, ticket: u64) -> &[u8] {
        let b = self
            .own
            .iter_mut()
            .find(|b| b.ticket == ticket)
            .expect("Publish names a captured batch");
        b.taken = true;
        &b.bytes
    }

    /// Whether the vCPU may run now.
    pub fn gate(&self) -> Gate {
        if self.wait == Wait::None && self.machine_end.is_none() && !self.ended {
            Gate::Go
        } else {
            Gate::Wait
        }
    }

    /// How the machine ended, once it did (decided in the global order: the same everywhere).
    pub fn machine_end(&self) -> Option<MachineEnd> {
        self.machine_end
    }

    /// Whether this vCPU ended (its `main` returned or it wrote the exit port).
    pub fn vcpu_ended(&self) -> bool {
        self.ended
    }

    /// Every ticket up to this one is applied here.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// This node's last ticket (0: none yet).
    pub fn last_ticket(&self) -> u64 {
        self.last_ticket
    }

    /// Whether `page` is writable here now (owned and dirty).
    pub fn writable(&self, page: PageNo) -> bool {
        matches!(self.local[page.index()], Local::Dirty(_))
    }

    /// Whether this node owns `page` now.
    pub fn owns(&self, page: PageNo) -> bool {
        matches!(self.local[page.index()], Local::Clean | Local::Dirty(_))
    }

    /// The owner of `page` as of this node's applied prefix.
    pub fn owner_view(&self, page: PageNo) -> NodeId {
        self.owner[page.index()]
    }

    /// A one-line account of where the engine stands, for diagnosing a stuck machine.
    pub fn describe(&self) -> String {
        let next = self.applied + 1;
        let queued: Vec<String> = self
            .queued
            .iter()
            .enumerate()
            .filter_map(|(i, q)| {
                q.front()
                    .map(|(t, _)| format!("node {i}: {t} (+{})", q.len() - 1))
            })
            .collect();
        let own: Vec<u64> = self.own.iter().map(|b| b.ticket).collect();
        format!(
            "applied {} (next {next}), last ticket {}, own batches {own:?}, queued [{}], \
             wait {:?} for {:?}, orders {:?}, pinned {:?}, dirty {}, ended {}, machine end {:?}",
            self.applied,
            self.last_ticket,
            queued.join(", "),
            self.wait,
            self.want,
            self.orders,
            self.pinned,
            self.dirty.len(),
            self.ended,
            self.machine_end
        )
    }

    /// Whether nothing of this node's is unpublished or unapplied (its store buffer is empty).
    pub fn drained(&self) -> bool {
        self.nothing_to_capture() && self.own.is_empty()
    }

    /// Whether the engine has work that needs the vCPU stopped now: a batch from a peer whose
    /// turn came, an order it can serve, or a flush that fell due at `now`. The driver stops
    /// a running vCPU for it (how soon is the visibility bound) and calls [`Engine::serve`].
    pub fn needs_stop(&self, now: u64) -> bool {
        // An order for a page held by the instruction the vCPU is running counts: that
        // instruction has most likely retired by the time the vCPU stops.
        matches!(self.next_applicable(), Some(Some(_)))
            || self.orders.iter().any(|(p, _)| self.owns(*p))
            || self.flush_due(now)
    }

    /// When the periodic flush falls due, if anything is unpublished.
    pub fn flush_deadline(&self) -> Option<u64> {
        self.pending_since
            .map(|t| t.saturating_add(self.cfg.flush_interval))
    }

    fn flush_due(&self, now: u64) -> bool {
        self.flush_deadline().is_some_and(|d| now >= d)
    }

    fn nothing_to_capture(&self) -> bool {
        self.dirty.is_empty() && self.console.is_empty() && self.end_pending.is_none()
    }

    /// While the vCPU runs: applies this node's own batches whose turn came. They change
    /// nothing in the replica, which holds their stores already (only the owner view, the
    /// console and the machine's end), so a flush needs no second stop to be accounted.
    pub fn serve_running(&mut self, replica: &dyn Replica) -> Result<(), ProtocolError> {
        while let Some(None) = self.next_applicable() {
            self.apply_next(replica, None)?;
        }
        Ok(())
    }

    /// With the vCPU stopped: applies every batch whose turn came, serves the orders it can,
    /// flushes if due, and moves the vCPU's wait along. Call it at every stop.
    pub fn serve(&mut self, replica: &dyn Replica, now: u64) -> Result<(), ProtocolError> {
        self.apply_ready(replica)?;
        // The waiting instruction takes (and holds) the pages it was granted before any order
        // can hand them on again: each grant lets at least one instruction retire.
        self.advance_wait(replica, now);
        if self.flush_due(now) {
            self.counters.flushes += 1;
            self.capture(replica);
        } else if self.serviceable_order() {
            self.capture(replica);
        }
        self.advance_wait(replica, now);
        Ok(())
    }

    /// The vCPU stopped at `rip`: pages held for another instruction are released.
    pub fn stopped_at(&mut self, rip: u64) {
        if self.pinned_at.is_some_and(|at| at != rip) {
            self.retired();
        }
    }

    /// The instruction the held pages were granted for retired.
    pub fn retired(&mut self) {
        self.pinned.clear();
        self.pinned_at = None;
    }

    /// The vCPU's instruction at `rip` writes `pages` (its footprint, ascending: one page,
    /// or two for an access across a boundary), and a write faulted; or the monitor is about
    /// to write them for an instruction it emulates. Returns whether the write may proceed
    /// now; if not, the vCPU waits ([`Engine::gate`]) until every page is writable here.
    pub fn write_fault(
        &mut self,
        replica: &dyn Replica,
        pages: &[PageNo],
        rip: u64,
        now: u64,
    ) -> bool {
        debug_assert!(pages.windows(2).all(|w| w[0] < w[1]), "a footprint ascends");
        self.counters.write_faults += 1;
        if self.pinned_at != Some(rip) {
            self.retired();
            self.pinned_at = Some(rip);
        }
        self.want.clear();
        self.want.extend_from_slice(pages);
        self.wait = Wait::Pages;
        self.advance_wait(replica, now);
        self.wait == Wait::None
    }

    /// Asks for ownership of `page` (once).
    fn request(&mut self, page: PageNo) {
        if self.requested[page.index()] || self.owns(page) {
            return;
        }
        self.requested[page.index()] = true;
        self.counters.ownership_requests += 1;
        let manager = NodeId((page.index() % self.cfg.nodes) as u16);
        if manager == self.cfg.me {
            self.on_request(self.cfg.me, page);
        } else {
            self.out.push_back(Output::Send {
                to: manager,
                msg: Msg::Request { page },
            });
        }
    }

    /// Makes an owned page writable (taking its twin) and holds it for the current
    /// instruction; `false` if the page is not ours.
    fn make_writable(&mut self, replica: &dyn Replica, page: PageNo, now: u64) -> bool {
        match self.local[page.index()] {
            Local::ReadOnly => return false,
            Local::Dirty(_) => {}
            Local::Clean => {
                let twin = match self.twins.take() {
                    Some(t) => t,
                    None => {
                        // The pool ran dry: publish what is dirty, which returns every twin
                        // (the pages held for this instruction stay ours).
                        self.counters.twin_pool_dry += 1;
                        self.capture(replica);
                        self.twins.take().expect("a capture returns every twin")
                    }
                };
                let mut twin = twin;
                replica.read(page.gpa(), &mut twin[..]);
                self.local[page.index()] = Local::Dirty(twin);
                self.dirty.push(page);
                self.pending_since.get_or_insert(now);
                self.counters.twins += 1;
                self.out.push_back(Output::Protect {
                    page,
                    writable: true,
                });
            }
        }
        if self.pinned_at.is_some() && !self.pinned.contains(&page) {
            self.pinned.push(page);
        }
        true
    }

    /// A fence by the vCPU (`mfence`, a locked instruction after it ran, I/O): publish what
    /// is pending and wait until this node's applied prefix reaches its last ticket.
    pub fn fence(&mut self, replica: &dyn Replica, now: u64) {
        self.counters.fences += 1;
        self.wait = Wait::Fence;
        self.advance_wait(replica, now);
    }

    /// Console output by the vCPU, carried in this node's next batch so that it reaches the
    /// terminal in the global order.
    pub fn console(&mut self, replica: &dyn Replica, bytes: &[u8], now: u64) {
        for chunk in bytes.chunks(self.cfg.console_bytes) {
            if self.console.len() + chunk.len() > self.cfg.console_bytes {
                self.capture(replica);
            }
            self.console.extend_from_slice(chunk);
            self.pending_since.get_or_insert(now);
        }
    }

    /// Publishes what is pending now, without waiting (the driver's own needs).
    pub fn flush_now(&mut self, replica: &dyn Replica) {
        self.capture(replica);
    }

    /// The vCPU's `main` returned with `status` (`machine: false`; it runs no more), or it
    /// wrote the exit port (`machine: true`). Published as a fence.
    pub fn end(&mut self, replica: &dyn Replica, status: u8, machine: bool, now: u64) {
        self.end_pending = Some(if machine {
            EndRecord::Exit(status)
        } else {
            EndRecord::Done(status)
        });
        self.ended = true;
        self.fence(replica, now);
    }

    /// The ticket the driver took for the oldest captured batch without one.
    pub fn ticket(&mut self, replica: &dyn Replica, ticket: u64, now: u64) {
        assert!(
            ticket > self.last_ticket,
            "tickets of one node increase ({ticket} after {})",
            self.last_ticket
        );
        let b = self
            .own
            .iter_mut()
            .find(|b| b.ticket == 0)
            .expect("a ticket arrived with no batch waiting for it");
        b.ticket = ticket;
        batch::set_ticket(&mut b.bytes, ticket);
        self.last_ticket = ticket;
        self.out.push_back(Output::Publish { ticket });
        self.advance_wait(replica, now);
    }

    /// A batch from a peer, checked and queued for its turn (applied by [`Engine::serve`]).
    pub fn receive(&mut self, from: NodeId, bytes: &[u8]) -> Result<(), ProtocolError> {
        let b = Batch::parse(bytes, from, self.cfg.nodes, self.cfg.pages)?;
        let stale = ProtocolError::StaleTicket {
            ticket: b.ticket,
            applied: self.applied,
        };
        if b.ticket <= self.applied || from == self.cfg.me {
            return Err(stale);
        }
        let q = &self.queued[from.index()];
        if q.len() >= QUEUED_PER_PEER {
            return Err(ProtocolError::Flooded { from });
        }
        if q.back().is_some_and(|(t, _)| *t >= b.ticket) {
            return Err(stale);
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(bytes);
        self.queued[from.index()].push_back((b.ticket, buf));
        Ok(())
    }

    /// A control message from a peer (or the driver's own, for [`Msg::Ended`], which the link
    /// handles and never passes here).
    pub fn message(
        &mut self,
        replica: &dyn Replica,
        from: NodeId,
        msg: Msg,
        now: u64,
    ) -> Result<(), ProtocolError> {
        match msg {
            Msg::Request { page } => {
                if page.index() % self.cfg.nodes != self.cfg.me.index() {
                    return Err(ProtocolError::NotManager { page });
                }
                self.on_request(from, page);
            }
            Msg::Order { page, to } => {
                if !self.requested[page.index()] && !self.owns(page) {
                    return Err(ProtocolError::StrayOrder { page });
                }
                self.orders.push_back((page, to));
            }
            Msg::Ended => return Err(ProtocolError::Message),
        }
        self.advance_wait(replica, now);
        Ok(())
    }

    /// At the manager: `from` wants `page`; order its last granted owner to hand it on.
    fn on_request(&mut self, from: NodeId, page: PageNo) {
        let last = self.granted[page.index()];
        if last == from {
            // Already granted: its transfer is on its way (or already applied there).
            return;
        }
        self.granted[page.index()] = from;
        if last == self.cfg.me {
            self.orders.push_back((page, from));
        } else {
            self.out.push_back(Output::Send {
                to: last,
                msg: Msg::Order { page, to: from },
            });
        }
    }

    /// Whether an order can be served now (the page is ours and not held).
    fn serviceable_order(&self) -> bool {
        self.orders
            .iter()
            .any(|(p, _)| self.owns(*p) && !self.pinned.contains(p))
    }

    /// Captures a batch, with the vCPU stopped so that it is a program-order prefix of its
    /// effects: every dirty page's diff (made read only again, its twin returned), the pages
    /// it can hand on, the console bytes and the vCPU's end; then asks for its ticket.
    fn capture(&mut self, replica: &dyn Replica) {
        self.writer.begin(self.cfg.me);
        for i in 0..self.dirty.len() {
            let page = self.dirty[i];
            let twin = match std::mem::replace(&mut self.local[page.index()], Local::Clean) {
                Local::Dirty(t) => t,
                _ => unreachable!("the dirty list holds dirty pages only"),
            };
            replica.read(page.gpa(), &mut self.scratch[..]);
            let before = self.writer.bytes().len();
            if self.writer.diff(page, &twin[..], &self.scratch[..]) {
                self.counters.diffs += 1;
                self.counters.diff_bytes += (self.writer.bytes().len() - before) as u64;
            }
            self.twins.give(twin);
            self.out.push_back(Output::Protect {
                page,
                writable: false,
            });
        }
        self.dirty.clear();
        let mut handed = 0;
        let mut i = 0;
        while i < self.orders.len() && handed < MAX_TRANSFERS {
            let (page, to) = self.orders[i];
            if self.owns(page) && !self.pinned.contains(&page) {
                self.orders.remove(i);
                // Ours and clean now (every dirty page was just captured): hand it on.
                self.local[page.index()] = Local::ReadOnly;
                self.writer.transfer(page, to);
                self.counters.transfers_out += 1;
                handed += 1;
            } else {
                i += 1;
            }
        }
        self.writer.console(&self.console);
        self.console.clear();
        match self.end_pending.take() {
            Some(EndRecord::Done(s)) => self.writer.vcpu_done(s),
            Some(EndRecord::Exit(s)) => self.writer.exit(s),
            None => {}
        }
        self.pending_since = None;
        if self.writer.is_empty() {
            return;
        }
        let mut bytes = self.spare.pop().unwrap_or_default();
        bytes.clear();
        bytes.extend_from_slice(self.writer.finish());
        self.counters.batches_published += 1;
        self.counters.batch_bytes += bytes.len() as u64;
        self.own.push_back(OwnBatch {
            ticket: 0,
            bytes,
            taken: false,
        });
        self.out.push_back(Output::TakeTicket);
    }

    /// Moves the vCPU's wait along: a page wait acquires the wanted pages lowest first and
    /// ends when all are writable; a fence captures what is pending and ends when every
    /// captured batch has its ticket and the applied prefix reaches the last.
    fn advance_wait(&mut self, replica: &dyn Replica, now: u64) {
        match self.wait {
            Wait::None => {}
            Wait::Pages => {
                for i in 0..self.want.len() {
                    let page = self.want[i];
                    if !self.make_writable(replica, page, now) {
                        // Lowest first: no higher page is held while a lower one is awaited.
                        self.request(page);
                        return;
                    }
                }
                self.want.clear();
                self.wait = Wait::None;
            }
            Wait::Fence => {
                if !self.nothing_to_capture() || self.serviceable_order() {
                    self.capture(replica);
                }
                let ticketed = self.own.back().is_none_or(|b| b.ticket != 0);
                if ticketed && self.applied >= self.last_ticket {
                    self.wait = Wait::None;
                }
            }
        }
    }

    /// Whose batch comes next in the order, if it is here: this node's own (`Some(None)`) or
    /// a peer's.
    fn next_applicable(&self) -> Option<Option<NodeId>> {
        let next = self.applied + 1;
        if self
            .own
            .front()
            .is_some_and(|b| b.ticket == next && b.taken)
        {
            return Some(None);
        }
        self.queued
            .iter()
            .position(|q| q.front().is_some_and(|(t, _)| *t == next))
            .map(|s| Some(NodeId(s as u16)))
    }

    /// Applies every batch whose turn came, in ticket order (the vCPU stopped).
    fn apply_ready(&mut self, replica: &dyn Replica) -> Result<(), ProtocolError> {
        while let Some(from) = self.next_applicable() {
            self.apply_next(replica, from)?;
        }
        Ok(())
    }

    /// Applies the next batch in the order: this node's own (`None`) or `from`'s.
    fn apply_next(
        &mut self,
        replica: &dyn Replica,
        from: Option<NodeId>,
    ) -> Result<(), ProtocolError> {
        match from {
            None => {
                let b = self.own.pop_front().expect("an own batch is next");
                let r = self.apply(replica, self.cfg.me, &b.bytes, true);
                self.spare.push(b.bytes);
                r?;
            }
            Some(s) => {
                let (_, bytes) = self.queued[s.index()].pop_front().expect("queued");
                let r = self.apply(replica, s, &bytes, false);
                self.spare.push(bytes);
                r?;
                self.out.push_back(Output::Applied { from: s });
            }
        }
        self.applied += 1;
        self.counters.batches_applied += 1;
        Ok(())
    }

    fn apply(
        &mut self,
        replica: &dyn Replica,
        from: NodeId,
        bytes: &[u8],
        own: bool,
    ) -> Result<(), ProtocolError> {
        let b = Batch::parse(bytes, from, self.cfg.nodes, self.cfg.pages)?;
        // Ownership is checked for the whole batch before any of it takes effect.
        for rec in b.records() {
            if let Record::Diff { page, .. } = rec {
                let owner = self.owner[page.index()];
                if owner != from {
                    return Err(ProtocolError::NotOwner { page, from, owner });
                }
            }
        }
        for rec in b.records() {
            match rec {
                Record::Diff { page, diff } => {
                    if own {
                        continue; // Already in this replica: they are this node's stores.
                    }
                    debug_assert!(
                        !self.owns(page),
                        "{page}: a remote diff of a page owned here"
                    );
                    for run in crate::diff::runs(diff) {
                        let (offset, data) = run.expect("a checked batch");
                        replica.write(Gpa(page.gpa().0 + offset as u64), data);
                    }
                }
                Record::Transfer { page, to } => {
                    let owner = self.owner[page.index()];
                    if owner != from {
                        return Err(ProtocolError::TransferNotOwner {
                            page,
                            from,
                            to,
                            owner,
                        });
                    }
                    self.owner[page.index()] = to;
                    if to == self.cfg.me {
                        self.requested[page.index()] = false;
                        self.local[page.index()] = Local::Clean;
                        self.counters.transfers_in += 1;
                    }
                }
                Record::Console(data) => {
                    if self.cfg.me == self.cfg.console_node {
                        self.out.push_back(Output::Console {
                            from,
                            bytes: data.to_vec(),
                        });
                    }
                }
                Record::VcpuDone(status) => {
                    self.done[from.index()] = true;
                    if status != 0 && self.first_failure.is_none() {
                        self.first_failure = Some(status);
                    }
                    if self.machine_end.is_none() && self.done.iter().all(|d| *d) {
                        self.machine_end = Some(MachineEnd::AllDone {
                            status: self.first_failure.unwrap_or(0),
                        });
                    }
                }
                Record::Exit(status) => {
                    if self.machine_end.is_none() {
                        self.machine_end = Some(MachineEnd::Exit { status, by: from });
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct Ram(RefCell<Vec<u8>>);

    impl Replica for Ram {
        fn read(&self, gpa: Gpa, buf: &mut [u8]) {
            let a = gpa.0 as usize;
            buf.copy_from_slice(&self.0.borrow()[a..a + buf.len()]);
        }
        fn write(&self, gpa: Gpa, data: &[u8]) {
            let a = gpa.0 as usize;
            self.0.borrow_mut()[a..a + data.len()].copy_from_slice(data);
        }
    }

    fn cfg(me: u16, nodes: usize) -> Config {
        Config {
            me: NodeId(me),
            nodes,
            pages: 8,
            twins: 4,
            console_bytes: 64,
            flush_interval: 1000,
            console_node: NodeId(0),
        }
    }

    fn ram() -> Ram {
        Ram(RefCell::new(vec![0; 8 * PAGE_BYTES]))
    }

    fn drain(e: &mut Engine) -> Vec<Output> {
        std::iter::from_fn(|| e.next_output()).collect()
    }

    #[test]
    fn node_zero_owns_everything_at_first_and_a_write_takes_a_twin() {
        let r = ram();
        let mut e = Engine::new(cfg(0, 2));
        assert!(e.write_fault(&r, &[PageNo(3)], 0x10, 0));
        assert_eq!(
            drain(&mut e),
            vec![Output::Protect {
                page: PageNo(3),
                writable: true
            }]
        );
        assert!(e.writable(PageNo(3)));
        assert_eq!(e.gate(), Gate::Go);
    }

    #[test]
    fn a_fence_publishes_and_waits_for_its_own_ticket_to_be_applied() {
        let r = ram();
        let mut e = Engine::new(cfg(0, 2));
        e.write_fault(&r, &[PageNo(1)], 0, 0);
        r.write(Gpa(0x1000), b"x");
        drain(&mut e);
        e.fence(&r, 5);
        assert_eq!(e.gate(), Gate::Wait);
        let out = drain(&mut e);
        assert!(out.contains(&Output::TakeTicket));
        assert!(out.contains(&Output::Protect {
            page: PageNo(1),
            writable: false
        }));
        e.ticket(&r, 1, 6);
        assert_eq!(drain(&mut e), vec![Output::Publish { ticket: 1 }]);
        let b = Batch::parse(e.take_batch(1), NodeId(0), 2, 8).unwrap();
        assert_eq!(b.ticket, 1);
        assert_eq!(e.gate(), Gate::Wait, "not applied yet");
        e.serve(&r, 7).unwrap();
        assert_eq!(e.gate(), Gate::Go);
        assert_eq!(e.applied(), 1);
    }

    #[test]
    fn a_fence_with_nothing_pending_and_nothing_in_flight_passes_at_once() {
        let r = ram();
        let mut e = Engine::new(cfg(1, 2));
        e.fence(&r, 0);
        assert_eq!(e.gate(), Gate::Go);
        assert!(drain(&mut e).is_empty());
    }

    #[test]
    fn a_write_to_a_page_owned_elsewhere_asks_its_manager_and_waits() {
        let r = ram();
        let mut e = Engine::new(cfg(1, 2));
        // Page 2's manager is node 0 (2 % 2).
        assert!(!e.write_fault(&r, &[PageNo(2)], 0x40, 0));
        assert_eq!(e.gate(), Gate::Wait);
        assert_eq!(
            drain(&mut e),
            vec![Output::Send {
                to: NodeId(0),
                msg: Msg::Request { page: PageNo(2) }
            }]
        );
        // Page 3's manager is this node: it orders node 0 directly.
        assert!(!e.write_fault(&r, &[PageNo(3)], 0x40, 0));
        assert_eq!(
            drain(&mut e),
            vec![Output::Send {
                to: NodeId(0),
                msg: Msg::Order {
                    page: PageNo(3),
                    to: NodeId(1)
                }
            }]
        );
    }

    #[test]
    fn an_unfenced_store_falls_due_for_publishing_one_flush_interval_after_it() {
        let r = ram();
        let mut e = Engine::new(cfg(0, 2)); // flush_interval 1000
        assert_eq!(e.flush_deadline(), None, "nothing to publish: never due");
        assert!(
            !e.needs_stop(1_000_000),
            "a node with nothing to do is not stopped"
        );
        e.write_fault(&r, &[PageNo(1)], 0x10, 500);
        r.write(Gpa(0x1000), b"x");
        assert_eq!(e.flush_deadline(), Some(1500));
        assert!(!e.needs_stop(1499));
        assert!(e.needs_stop(1500), "the periodic flush is due");
        drain(&mut e);
        e.serve(&r, 1500).unwrap();
        assert!(drain(&mut e).contains(&Output::TakeTicket), "published");
        assert_eq!(e.flush_deadline(), None);
        assert_eq!(e.counters().flushes, 1);
    }

    #[test]
    fn a_batch_whose_turn_came_asks_for_the_vcpu_at_once() {
        let r = ram();
        let mut writer = Engine::new(cfg(0, 2));
        let mut reader = Engine::new(cfg(1, 2));
        writer.write_fault(&r, &[PageNo(1)], 0, 0);
        r.write(Gpa(0x1000), b"x");
        writer.fence(&r, 0);
        writer.ticket(&r, 1, 0);
        let batch = writer.take_batch(1).to_vec();
        assert!(!reader.needs_stop(0));
        reader.receive(NodeId(0), &batch).unwrap();
        assert!(
            reader.needs_stop(0),
            "applicable now: stop the running vCPU"
        );
        reader.serve(&r, 0).unwrap();
        assert!(!reader.needs_stop(0));
        assert_eq!(reader.applied(), 1);
    }

    #[test]
    fn batches_are_applied_only_in_ticket_order() {
        let r = ram();
        let mut a = Engine::new(cfg(0, 3));
        let mut c = Engine::new(cfg(2, 3));
        // Two batches of node 0 with tickets 1 and 3; ticket 2 (node 1's) is missing.
        for t in [1, 3] {
            a.flush_now(&r);
            a.console(&r, b"x", 0);
            a.flush_now(&r);
            a.ticket(&r, t, 0);
            let b = a.take_batch(t).to_vec();
            c.receive(NodeId(0), &b).unwrap();
        }
        c.serve(&r, 0).unwrap();
        assert_eq!(c.applied(), 1, "ticket 2 has not arrived: 3 waits");
        assert!(
            c.receive(NodeId(0), &a.take_batch(3).to_vec()).is_err(),
            "a replay is refused"
        );
    }

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        for m in [
            Msg::Request { page: PageNo(7) },
            Msg::Order {
                page: PageNo(1),
                to: NodeId(1),
            },
        ] {
            assert_eq!(Msg::decode(&m.encode(), 2, 8), Ok(m));
        }
        assert!(Msg::decode(&[9; 8], 2, 8).is_err());
        assert!(Msg::decode(&Msg::Request { page: PageNo(8) }.encode(), 2, 8).is_err());
        assert!(Msg::decode(&[1, 0, 0], 2, 8).is_err());
    }
}
