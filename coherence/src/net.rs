//! Carries an [`Engine`]'s outputs over a fabric endpoint, and feeds it what arrives.
//!
//! Regions every node registers ([`regions`]):
//! - `TICKET`: the sequencer's word (node 0's is the one used): `fetch_add(1)` returns the
//!   previous count, so tickets are 1, 2, 3, ... in one global order.
//! - `LOG`: one slot per sender, written only by that sender (its grant): the per-sender log
//!   its batches are written into, each entry followed by a doorbell.
//! - `ACK`: one word per receiver, written only by it: how many bytes of this node's log slot
//!   at that receiver it has applied, so this node knows the space it may reuse.
//! - `BATCH`: private, the slots a published batch is written from (zero-copy on every
//!   backend); a slot is reused once every peer's write of it completed.
//! - `GUEST`: the guest RAM replica (the node's own memfd), granted to node 0 alone, which
//!   writes the loaded image into every replica before any vCPU starts.
//!
//! A log entry is an 8-byte header (the batch's length) and the batch, padded to 8 bytes; it
//! is staged in a `BATCH` slot in that form, so each peer gets one write with its doorbell.
//! An entry never wraps: when it does not fit at the end of the slot, a wrap marker (length
//! `u32::MAX`) tells the receiver to go back to the start.
//!
//! Flow control cannot deadlock the ordered apply: each sender has its own log at each target
//! (a batch never waits behind another sender's), a log slot holds two of the largest batches,
//! log space comes back as batches are applied, and doorbell credits come back as the target
//! polls (which it does in every state). A batch waiting for space is always its sender's
//! newest at that target, so the oldest such batch waits on nothing but batches before it in
//! the order, which every node can apply (`docs/coherence.md`, flow control).
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vsmp_fabric::{
    Completion, Fabric, FabricError, Grant, IncomingBatch, IncomingRef, LocalSlice, NodeId,
    RegionId, RegionSpec, RemoteAddr, Signal, Source, Status, WrId,
};

use crate::engine::{Engine, Msg, Output, ProtocolError, Replica};

/// The sequencer's word.
pub const TICKET: RegionId = RegionId(1);
/// Per-sender logs.
pub const LOG: RegionId = RegionId(2);
/// Per-receiver applied counts.
pub const ACK: RegionId = RegionId(3);
/// The slots published batches are written from.
pub const BATCH: RegionId = RegionId(4);
/// The guest RAM replica.
pub const GUEST: RegionId = RegionId(5);

/// The doorbell that follows a log entry.
pub const DOORBELL_BATCH: u32 = 1;
/// The doorbell node 0 rings once a replica holds the image.
pub const DOORBELL_IMAGE: u32 = 2;

/// Batch slots in `BATCH`: batches published and not yet written everywhere. More published
/// batches wait in an overflow queue (copied: they are rare, a node publishes faster than its
/// writes complete only while a peer lags).
pub const BATCH_SLOTS: usize = 4;

/// A log entry's header: the batch's length (u32) and four bytes of padding.
const ENTRY_HEADER: usize = 8;
/// The length that tells a receiver the rest of the slot is skipped.
const WRAP: u32 = u32::MAX;

/// The sizes of the regions of a machine.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub nodes: usize,
    pub guest_bytes: usize,
    /// The largest batch an engine can publish.
    pub max_batch: usize,
}

impl Sizes {
    /// The bytes of the largest entry.
    fn max_entry(&self) -> usize {
        (ENTRY_HEADER + self.max_batch).next_multiple_of(8)
    }

    /// Bytes of one sender's log at a target: two of the largest entries, page-rounded.
    pub fn log_slot(&self) -> usize {
        (2 * self.max_entry()).next_multiple_of(4096)
    }

    fn batch_slot(&self) -> usize {
        self.max_entry().next_multiple_of(4096)
    }
}

/// The regions every node of a machine registers.
pub fn regions(sizes: Sizes) -> Vec<RegionSpec> {
    let n = sizes.nodes;
    let slot = sizes.log_slot() as u64;
    let per = |width: u64| -> Vec<Grant> {
        (0..n)
            .map(|s| Grant {
                peer: Some(NodeId(s as u16)),
                range: s as u64 * width..(s as u64 + 1) * width,
            })
            .collect()
    };
    vec![
        RegionSpec::open(TICKET, 64),
        RegionSpec {
            id: LOG,
            len: n * sizes.log_slot(),
            grants: per(slot),
        },
        RegionSpec {
            id: ACK,
            len: 8 * n,
            grants: per(8),
        },
        RegionSpec::private(BATCH, BATCH_SLOTS * sizes.batch_slot()),
        RegionSpec {
            id: GUEST,
            len: sizes.guest_bytes,
            grants: vec![Grant {
                peer: Some(NodeId(0)),
                range: 0..sizes.guest_bytes as u64,
            }],
        },
    ]
}

/// Why a link stopped working.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Fabric(#[from] FabricError),
    #[error("{peer} broke the coherence protocol: {source}")]
    Protocol {
        peer: NodeId,
        #[source]
        source: ProtocolError,
    },
    #[error("{peer}'s log entry is malformed: {reason}")]
    Log { peer: NodeId, reason: &'static str },
}

impl NetError {
    /// The peer this error blames, if any.
    pub fn peer(&self) -> Option<NodeId> {
        match self {
            NetError::Fabric(FabricError::PeerDead { peer, .. }) => Some(*peer),
            NetError::Protocol { peer, .. } | NetError::Log { peer, .. } => Some(*peer),
            NetError::Fabric(_) => None,
        }
    }
}

/// A staged batch waiting to be written to some peers.
#[derive(Debug)]
struct Slot {
    /// The entry's bytes (header and batch, padded).
    len: usize,
    /// Peers this entry still has to be posted to.
    unposted: Vec<NodeId>,
    /// Posts not yet completed.
    in_flight: usize,
    /// Queued for posting (it leaves the queue once posted to every peer).
    queued: bool,
}

impl Slot {
    fn free(&self) -> bool {
        !self.queued && self.in_flight == 0
    }
}

/// One node's link to the machine.
#[derive(Debug)]
pub struct Link {
    fabric: Arc<dyn Fabric>,
    me: NodeId,
    nodes: usize,
    sizes: Sizes,
    /// Per peer: bytes written into this node's slot of its log.
    written: Vec<u64>,
    /// Per sender: this node's read position in its slot of this node's log, and the sizes of
    /// entries read and not yet applied (for the applied count sent back).
    read: Vec<u64>,
    unapplied: Vec<VecDeque<u64>>,
    applied_bytes: Vec<u64>,
    /// Per sender: an applied count to send back.
    ack_due: Vec<bool>,
    slots: Vec<Slot>,
    /// Staged slots waiting to be posted, in ticket order.
    queue: VecDeque<usize>,
    /// Published batches waiting for a free slot, in ticket order (already framed).
    overflow: VecDeque<Vec<u8>>,
    /// Work requests of entry posts, to their slot.
    posts: VecDeque<(WrId, usize)>,
    /// Tickets asked for and not yet arrived, in order.
    tickets: VecDeque<WrId>,
    messages: VecDeque<(NodeId, Msg)>,
    /// Per peer: it said the machine ended there (its death is then its departure).
    ended: Vec<bool>,
    said_ended: bool,
    image_ready: bool,
    incoming: Option<IncomingBatch>,
    completions: Vec<Completion>,
    scratch: Vec<u8>,
}

impl Link {
    pub fn new(fabric: Arc<dyn Fabric>, sizes: Sizes) -> Link {
        let nodes = fabric.nodes();
        assert_eq!(nodes, sizes.nodes, "the sizes are the group's");
        Link {
            me: fabric.rank(),
            fabric,
            nodes,
            sizes,
            written: vec![0; nodes],
            read: vec![0; nodes],
            unapplied: (0..nodes).map(|_| VecDeque::with_capacity(64)).collect(),
            applied_bytes: vec![0; nodes],
            ack_due: vec![false; nodes],
            slots: (0..BATCH_SLOTS)
                .map(|_| Slot {
                    len: 0,
                    unposted: Vec::with_capacity(nodes),
                    in_flight: 0,
                    queued: false,
                })
                .collect(),
            queue: VecDeque::with_capacity(BATCH_SLOTS),
            overflow: VecDeque::new(),
            posts: VecDeque::with_capacity(BATCH_SLOTS * nodes),
            tickets: VecDeque::with_capacity(8),
            messages: VecDeque::with_capacity(256),
            ended: vec![false; nodes],
            said_ended: false,
            image_ready: nodes == 1,
            incoming: Some(IncomingBatch::new(64)),
            completions: vec![Completion::EMPTY; 64],
            scratch: Vec::with_capacity(sizes.max_batch),
        }
    }

    pub fn fabric(&self) -> &Arc<dyn Fabric> {
        &self.fabric
    }

    /// Carries out what the engine asked for (its network outputs), handing the others
    /// (`Protect`, `Console`) to `local` in order, then posts what it can.
    pub fn carry(
        &mut self,
        engine: &mut Engine,
        mut local: impl FnMut(Output),
    ) -> Result<(), NetError> {
        while let Some(o) = engine.next_output() {
            if let Some(o) = self.handle(engine, o)? {
                local(o);
            }
        }
        self.flush()
    }

    /// Carries out one output if it is the network's (posting may wait for [`Link::retry`]);
    /// hands back the others.
    pub fn handle(&mut self, engine: &mut Engine, o: Output) -> Result<Option<Output>, NetError> {
        match o {
            Output::TakeTicket => {
                let wr = self
                    .fabric
                    .post_fetch_add(NodeId(0), RemoteAddr::new(TICKET, 0), 1)?;
                self.tickets.push_back(wr);
            }
            Output::Publish { ticket } => self.stage(engine.take_batch(ticket))?,
            Output::Send { to, msg } => self.messages.push_back((to, msg)),
            Output::Applied { from } => {
                let len = self.unapplied[from.index()]
                    .pop_front()
                    .expect("an applied batch was read from the log");
                self.applied_bytes[from.index()] += len;
                self.ack_due[from.index()] = true;
            }
            other => return Ok(Some(other)),
        }
        Ok(None)
    }

    /// Frames a published batch into a free batch slot (or the overflow queue) and queues it
    /// for every peer.
    fn stage(&mut self, batch: &[u8]) -> Result<(), NetError> {
        if self.nodes == 1 {
            return Ok(());
        }
        let header = (batch.len() as u64).to_le_bytes();
        let free = self.slots.iter().position(Slot::free);
        match free {
            Some(i) if self.overflow.is_empty() => {
                let mem = self.fabric.memory(BATCH)?;
                let at = (i * self.sizes.batch_slot()) as u64;
                mem.write(at, &header)?;
                mem.write(at + ENTRY_HEADER as u64, batch)?;
                self.queue_slot(i, batch.len());
            }
            _ => {
                let mut framed = Vec::with_capacity(ENTRY_HEADER + batch.len());
                framed.extend_from_slice(&header);
                framed.extend_from_slice(batch);
                self.overflow.push_back(framed);
            }
        }
        Ok(())
    }

    fn queue_slot(&mut self, i: usize, batch_len: usize) {
        let me = self.me;
        let s = &mut self.slots[i];
        s.len = (ENTRY_HEADER + batch_len).next_multiple_of(8);
        s.unposted.clear();
        s.unposted
            .extend((0..self.nodes as u16).map(NodeId).filter(|p| *p != me));
        s.queued = true;
        self.queue.push_back(i);
    }

    /// Posts what waits: overflowed batches into freed slots, entries (in order, to each peer
    /// as its log has room), applied counts, messages.
    fn flush(&mut self) -> Result<(), NetError> {
        while !self.overflow.is_empty() {
            let Some(i) = self.slots.iter().position(Slot::free) else {
                break;
            };
            let framed = self.overflow.pop_front().expect("not empty");
            self.fabric
                .memory(BATCH)?
                .write((i * self.sizes.batch_slot()) as u64, &framed)?;
            self.queue_slot(i, framed.len() - ENTRY_HEADER);
        }
        while let Some(&i) = self.queue.front() {
            let mut k = 0;
            while k < self.slots[i].unposted.len() {
                let peer = self.slots[i].unposted[k];
                match self.post_entry(peer, i)? {
                    Some(wr) => {
                        let s = &mut self.slots[i];
                        s.unposted.swap_remove(k);
                        s.in_flight += 1;
                        self.posts.push_back((wr, i));
                    }
                    None => k += 1,
                }
            }
            if !self.slots[i].unposted.is_empty() {
                // Later entries wait behind this one: each log stays in ticket order.
                break;
            }
            self.slots[i].queued = false;
            self.queue.pop_front();
        }
        for from in 0..self.nodes {
            if !self.ack_due[from] {
                continue;
            }
            let at = RemoteAddr::new(ACK, 8 * self.me.index() as u64);
            let bytes = self.applied_bytes[from].to_le_bytes();
            match self.fabric.post_write(
                NodeId(from as u16),
                at,
                Source::Inline(&bytes),
                None,
                Signal::OnError,
            ) {
                Ok(_) => self.ack_due[from] = false,
                Err(FabricError::WouldBlock { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        while let Some(&(to, msg)) = self.messages.front() {
            match self.fabric.post_send(to, &msg.encode(), Signal::OnError) {
                Ok(_) => {
                    self.messages.pop_front();
                }
                Err(FabricError::WouldBlock { .. }) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Posts slot `i`'s entry to this node's log at `peer`, with its doorbell; `None` when
    /// that log has no room now or the fabric would block (retried later).
    fn post_entry(&mut self, peer: NodeId, i: usize) -> Result<Option<WrId>, NetError> {
        let slot = self.sizes.log_slot() as u64;
        let base = self.me.index() as u64 * slot;
        let total = self.slots[i].len as u64;
        let acked = self.fabric.memory(ACK)?.load_u64(8 * peer.index() as u64)?;
        let w = self.written[peer.index()];
        let pos = w % slot;
        let skip = if pos + total > slot { slot - pos } else { 0 };
        if w + skip + total - acked > slot || self.fabric.credits(peer)? == 0 {
            return Ok(None);
        }
        if skip > 0 {
            let wrap = u64::from(WRAP).to_le_bytes();
            let marker = RemoteAddr::new(LOG, base + pos);
            match self
                .fabric
                .post_write(peer, marker, Source::Inline(&wrap), None, Signal::OnError)
            {
                Ok(_) => self.written[peer.index()] += skip,
                Err(FabricError::WouldBlock { .. }) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
        let at = self.written[peer.index()] % slot;
        let src = Source::Region(LocalSlice::new(
            BATCH,
            (i * self.sizes.batch_slot()) as u64,
            total,
        ));
        match self.fabric.post_write(
            peer,
            RemoteAddr::new(LOG, base + at),
            src,
            Some(DOORBELL_BATCH),
            Signal::Always,
        ) {
            Ok(wr) => {
                self.written[peer.index()] += total;
                Ok(Some(wr))
            }
            Err(FabricError::WouldBlock { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn complete_post(&mut self, wr: WrId) {
        // Completions come in order per peer, but posts to different peers interleave.
        if let Some(k) = self.posts.iter().position(|(w, _)| *w == wr) {
            let (_, i) = self.posts.remove(k).expect("found");
            self.slots[i].in_flight -= 1;
        }
    }

    /// Takes what arrived and feeds the engine (tickets, batches, messages); the driver then
    /// carries the engine's outputs. Returns whether anything arrived. A peer's death is an error unless
    /// it said the machine had ended.
    pub fn poll(
        &mut self,
        engine: &mut Engine,
        replica: &dyn Replica,
        now: u64,
    ) -> Result<bool, NetError> {
        let mut any = false;
        loop {
            let n = self.fabric.poll_completions(&mut self.completions);
            for k in 0..n {
                let c = self.completions[k];
                if self.tickets.front() == Some(&c.wr) {
                    self.tickets.pop_front();
                    let Status::Fetched(old) = c.status else {
                        c.result()?;
                        unreachable!("a fetch_add completes with its value or an error");
                    };
                    engine.ticket(replica, old + 1, now);
                    continue;
                }
                c.result()?;
                self.complete_post(c.wr);
            }
            any |= n > 0;
            if n < self.completions.len() {
                break;
            }
        }
        let mut incoming = self.incoming.take().expect("the link is not re-entered");
        incoming.clear();
        self.fabric.poll_incoming(&mut incoming);
        let r = self.take_incoming(&incoming, engine, replica, now);
        any |= !incoming.is_empty();
        self.incoming = Some(incoming);
        r?;
        Ok(any)
    }

    fn take_incoming(
        &mut self,
        incoming: &IncomingBatch,
        engine: &mut Engine,
        replica: &dyn Replica,
        now: u64,
    ) -> Result<(), NetError> {
        for item in incoming.iter() {
            match item {
                IncomingRef::Doorbell {
                    from,
                    imm: DOORBELL_BATCH,
                } => self.read_entry(engine, from)?,
                IncomingRef::Doorbell {
                    from: NodeId(0),
                    imm: DOORBELL_IMAGE,
                } => self.image_ready = true,
                IncomingRef::Doorbell { from, .. } => {
                    return Err(NetError::Log {
                        peer: from,
                        reason: "an unknown doorbell",
                    });
                }
                IncomingRef::Message { from, data } => {
                    let msg = Msg::decode(data, self.nodes, engine.config().pages)
                        .map_err(|source| NetError::Protocol { peer: from, source })?;
                    if msg == Msg::Ended {
                        self.ended[from.index()] = true;
                        continue;
                    }
                    engine
                        .message(replica, from, msg, now)
                        .map_err(|source| NetError::Protocol { peer: from, source })?;
                }
                IncomingRef::PeerDead { peer, cause } => {
                    if !self.ended[peer.index()] {
                        return Err(FabricError::PeerDead { peer, cause }.into());
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads the entry `from` just rang for out of its slot of this node's log.
    fn read_entry(&mut self, engine: &mut Engine, from: NodeId) -> Result<(), NetError> {
        let slot = self.sizes.log_slot() as u64;
        let base = from.index() as u64 * slot;
        let mem = self.fabric.memory(LOG)?;
        let bad = |reason| NetError::Log { peer: from, reason };
        let mut skipped = 0;
        let mut pos = self.read[from.index()] % slot;
        let mut h = [0u8; ENTRY_HEADER];
        mem.read(base + pos, &mut h)?;
        if u32::from_le_bytes(h[0..4].try_into().expect("4 bytes")) == WRAP {
            skipped = slot - pos;
            pos = 0;
            mem.read(base, &mut h)?;
        }
        let len = u64::from_le_bytes(h);
        let total = (ENTRY_HEADER as u64 + len).next_multiple_of(8);
        if len == 0 || len > self.sizes.max_batch as u64 || pos + total > slot {
            return Err(bad("an entry that does not fit the log"));
        }
        self.scratch.resize(len as usize, 0);
        mem.read(base + pos + ENTRY_HEADER as u64, &mut self.scratch)?;
        self.read[from.index()] += skipped + total;
        self.unapplied[from.index()].push_back(skipped + total);
        engine
            .receive(from, &self.scratch)
            .map_err(|source| NetError::Protocol { peer: from, source })
    }

    /// Whether the link has work in flight or waiting for room (the driver keeps polling).
    pub fn busy(&self) -> bool {
        !self.queue.is_empty()
            || !self.overflow.is_empty()
            || !self.posts.is_empty()
            || !self.tickets.is_empty()
            || !self.messages.is_empty()
            || self.ack_due.iter().any(|d| *d)
    }

    /// A one-line account of what the link holds, for diagnosing a stuck machine.
    pub fn describe(&self) -> String {
        format!(
            "queued entries {:?}, overflow {}, posts in flight {}, tickets asked {}, messages {}, \
             acks due {:?}, written {:?}, read {:?}, ended {:?}",
            self.queue,
            self.overflow.len(),
            self.posts.len(),
            self.tickets.len(),
            self.messages.len(),
            self.ack_due,
            self.written,
            self.read,
            self.ended
        )
    }

    /// Retries what waits for room (after polling).
    pub fn retry(&mut self) -> Result<(), NetError> {
        self.flush()
    }

    /// Tells every peer the machine ended here (call once the link is no longer busy), so
    /// that this node's exit is not taken for a failure.
    pub fn say_ended(&mut self) -> Result<(), NetError> {
        if !self.said_ended {
            self.said_ended = true;
            for p in (0..self.nodes as u16).map(NodeId).filter(|p| *p != self.me) {
                self.messages.push_back((p, Msg::Ended));
            }
        }
        self.flush()
    }

    /// Whether every peer said the machine ended there.
    pub fn all_ended(&self) -> bool {
        (0..self.nodes).all(|p| p == self.me.index() || self.ended[p])
    }

    /// Whether node 0 has rung that this replica holds the image (always, at node 0).
    pub fn image_ready(&self) -> bool {
        self.image_ready || self.me == NodeId(0)
    }

    /// Node 0: writes `ranges` of its replica (the loaded image) into every peer's replica and
    /// rings each when its copy is complete. Returns once every write completed, or fails
    /// after `timeout`.
    pub fn share_image(
        &mut self,
        ranges: &[std::ops::Range<u64>],
        timeout: Duration,
    ) -> Result<(), NetError> {
        assert_eq!(self.me, NodeId(0), "node 0 loads and shares the image");
        const CHUNK: u64 = 1 << 20;
        let deadline = Instant::now() + timeout;
        for peer in (1..self.nodes as u16).map(NodeId) {
            for r in ranges {
                let mut at = r.start;
                while at < r.end {
                    let n = CHUNK.min(r.end - at);
                    let src = Source::Region(LocalSlice::new(GUEST, at, n));
                    let dst = RemoteAddr::new(GUEST, at);
                    self.post_blocking(deadline, |f| {
                        f.post_write(peer, dst, src, None, Signal::OnError)
                    })?;
                    at += n;
                }
            }
            let bell = self.post_blocking(deadline, |f| {
                f.post_write(
                    peer,
                    RemoteAddr::new(GUEST, 0),
                    Source::Empty,
                    Some(DOORBELL_IMAGE),
                    Signal::Always,
                )
            })?;
            let left = deadline.saturating_duration_since(Instant::now());
            self.fabric.wait(bell, left)?;
        }
        Ok(())
    }

    fn post_blocking(
        &mut self,
        deadline: Instant,
        mut post: impl FnMut(&dyn Fabric) -> Result<WrId, FabricError>,
    ) -> Result<WrId, NetError> {
        loop {
            match post(&*self.fabric) {
                Err(FabricError::WouldBlock { .. }) if Instant::now() < deadline => {
                    let n = self.fabric.poll_completions(&mut self.completions);
                    for c in &self.completions[..n] {
                        c.result()?;
                    }
                    std::thread::yield_now();
                }
                r => return Ok(r?),
            }
        }
    }
}
