//! The tcp backend: one authenticated TCP connection per pair of nodes.
//!
//! # How the contract holds
//! - **Regions** are memory the endpoint owns ([`region`]); a peer's write travels as frames
//!   ([`frame`]) that this node's receive thread applies.
//! - **Visibility at completion**: the target acknowledges an operation only after applying it
//!   (and, for `write_imm`, after queueing its doorbell); `wait` returns on that ack.
//! - **Per-peer order**: one connection per pair; a poster holds the connection's write lock
//!   from numbering its work request to the end of its frames, so numbers, wire order and
//!   apply order agree; acks come back in that order, so an ack completes every earlier
//!   request to that peer.
//! - **Grants** are checked at the target; a refused operation is answered with a nack and
//!   logged once there, and the writer's `wait` returns `AccessDenied`.
//! - **fetch_add** is served by the owner's receive thread with an atomic add on the word.
//! - **Loopback** (operations to one's own rank) goes through an in-process socket pair with
//!   the same frames, threads and acks as any peer.
//! - **Failures**: every connection sends a heartbeat every `heartbeat_timeout / 4`; a peer
//!   whose connection ends, fails, carries a malformed frame, or stays silent past
//!   `heartbeat_timeout` is dead: its connection is dropped with a log line, calls involving it
//!   return `PeerDead`, `recv` reports it once after everything it delivered, and the other
//!   peers are unaffected.
//! - **Delay**: every frame (requests and acks) leaves `delay` after it was sent, in order.
//!
//! # Threads (per connection, `<p>` the peer's rank)
//! `fabric-rx-<p>` reads and applies frames; `fabric-tx-<p>` sends heartbeats, delayed frames
//! and the acks the receive thread could not send at once (see `conn.rs` for why the receive
//! thread never blocks on a socket). Loopback has two connections (`fabric-rx-self-a/b`).
//! Posters write on the socket themselves when no delay is injected.
//!
//! Lock order: a connection's write lock, then its link state, then its tx queue; the
//! incoming queue is taken alone.

// `unsafe` only in `sys` (which allows it); every other file here forbids it.
#![deny(unsafe_code)]

mod conn;
pub mod region;
mod sys;

/// The frame format, public so that fuzzers and tools can drive the decoder.
pub mod frame {
    pub use crate::wire::*;
}

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::bootstrap::{self, Mesh, Rendezvous};
use crate::wire::{FLAG_MORE, FrameReader, Header, Kind, MAX_WRITE_PAYLOAD, NackReason, ReadError};
use crate::{
    Completion, Fabric, FabricError, GroupConfig, Incoming, LocalRegion, MAX_MESSAGE_BYTES, NodeId,
    RegionId, RemoteAddr, WrId,
};

use conn::{Conn, Stream};
use region::Region;

/// Requests to one peer that may be posted and not yet acknowledged. Bounds the acks a target
/// must buffer for us and the frames a dead peer strands; large enough to keep a link busy.
/// (Concurrent posters may exceed it by at most their number.)
pub const WINDOW: usize = 256;

/// Doorbells and messages queued for `recv`. A full queue stops the receive threads reading,
/// which stops their peers' acks and so, through the window, their posts.
pub const INCOMING_CAPACITY: usize = 4096;

/// Results of `fetch_add`s and refusals kept for a later `wait`; the oldest are forgotten past
/// this (their `wait` then reports `UnknownWr`).
pub const RESULTS_KEPT: usize = 1 << 16;

/// Bits of a `WrId` below its sequence number: the peer (16) and whether it is a fetch_add.
const WR_PEER_BITS: u32 = 16;
const WR_FETCH_BIT: u64 = 1 << WR_PEER_BITS;
const WR_SEQ_SHIFT: u32 = WR_PEER_BITS + 1;

/// An operation's outcome at the target, as the source remembers it.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Denied { region: u32, offset: u64, len: u64 },
    UnknownRegion { region: u32 },
}

/// The source's view of its requests to one peer.
#[derive(Debug, Default)]
struct LinkState {
    /// Sequence numbers posted and not yet acknowledged, ascending.
    inflight: VecDeque<u64>,
    /// The last sequence number posted to this peer.
    last_posted: u64,
    /// Answers received from this peer: a poster waiting for room sees progress by it.
    answers: u64,
    fetched: BTreeMap<u64, u64>,
    refused: BTreeMap<u64, Refusal>,
    dead: Option<String>,
}

#[derive(Debug)]
struct Link {
    peer: NodeId,
    conn: Arc<Conn>,
    state: Mutex<LinkState>,
    cv: Condvar,
}

impl Link {
    fn state(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug)]
enum Item {
    In(Incoming),
    Dead { peer: NodeId, reason: String },
}

#[derive(Debug)]
struct Shared {
    rank: NodeId,
    nodes: usize,
    heartbeat: Duration,
    regions: Vec<Region>,
    links: Vec<Link>,
    /// The loopback pair's accepting end (requests to self arrive here).
    loop_server: Arc<Conn>,
    incoming: Mutex<VecDeque<Item>>,
    incoming_cv: Condvar,
    next_seq: AtomicU64,
    shutdown: AtomicBool,
}

/// A tcp endpoint. Dropping it closes every connection (peers then see it dead) and joins its
/// threads.
#[derive(Debug)]
pub struct TcpFabric {
    shared: Arc<Shared>,
    delay: Duration,
    threads: Vec<JoinHandle<()>>,
}

/// Rank 0's bound bootstrap listener, before the group forms.
#[derive(Debug)]
pub struct Listener {
    rendezvous: Rendezvous,
    cfg: GroupConfig,
}

impl Listener {
    /// Waits for every other rank to join and returns rank 0's endpoint.
    pub fn accept_group(self) -> Result<TcpFabric, FabricError> {
        let mesh = self.rendezvous.form_group(&self.cfg)?;
        TcpFabric::from_mesh(&self.cfg, mesh)
    }
}

impl TcpFabric {
    /// Joins the group `cfg` describes: rank 0 binds `cfg.bootstrap` and waits for the others;
    /// the others connect to it. Returns once every node joined (or fails within
    /// `cfg.connect_timeout`).
    pub fn join(cfg: GroupConfig) -> Result<TcpFabric, FabricError> {
        cfg.validate()?;
        if cfg.rank == NodeId(0) {
            let (listener, _) = TcpFabric::listen(cfg)?;
            listener.accept_group()
        } else {
            let mesh = bootstrap::join(&cfg)?;
            TcpFabric::from_mesh(&cfg, mesh)
        }
    }

    /// Rank 0 only: binds `cfg.bootstrap` (port 0 picks a free port) and returns the bound
    /// address, so the other ranks can be told where to join before [`Listener::accept_group`].
    pub fn listen(cfg: GroupConfig) -> Result<(Listener, SocketAddr), FabricError> {
        let rendezvous = Rendezvous::bind(&cfg)?;
        let addr = rendezvous.local_addr();
        Ok((Listener { rendezvous, cfg }, addr))
    }

    /// A whole group on this host, one endpoint per rank, formed on `127.0.0.1` with a free
    /// port (`template.rank` and `template.bootstrap` are ignored). For tests and benchmarks.
    pub fn local_group(template: &GroupConfig) -> Result<Vec<TcpFabric>, FabricError> {
        let mut cfg0 = template.clone();
        cfg0.rank = NodeId(0);
        cfg0.bootstrap = "127.0.0.1:0".into();
        let (listener, addr) = TcpFabric::listen(cfg0)?;
        let joiners: Vec<_> = (1..template.nodes)
            .map(|r| {
                let mut cfg = template.clone();
                cfg.rank = NodeId(r as u16);
                cfg.bootstrap = addr.to_string();
                thread::Builder::new()
                    .name(format!("fabric-join-{r}"))
                    .spawn(move || TcpFabric::join(cfg))
            })
            .collect();
        let first = listener.accept_group();
        let mut all = vec![first];
        for j in joiners {
            let r = match j {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    Err(FabricError::Config("a joining thread panicked".into()))
                }),
                Err(source) => Err(FabricError::Io {
                    op: "spawning a joining thread".into(),
                    source,
                }),
            };
            all.push(r);
        }
        all.into_iter().collect()
    }

    fn from_mesh(cfg: &GroupConfig, mesh: Mesh) -> Result<TcpFabric, FabricError> {
        let io = |op: &str| {
            let op = op.to_string();
            move |source| FabricError::Io { op, source }
        };
        let hb = cfg.heartbeat_timeout;
        let tick = (hb / 8).clamp(Duration::from_millis(2), Duration::from_millis(100));
        let write_timeout = (hb * 2).max(Duration::from_secs(2));
        let (a, b) = UnixStream::pair().map_err(io("creating the loopback socket pair"))?;
        let loop_client = Conn::new(cfg.rank, "self".into(), Stream::Unix(a), cfg.delay)
            .map_err(io("setting up the loopback connection"))?;
        let loop_server = Arc::new(
            Conn::new(cfg.rank, "self".into(), Stream::Unix(b), cfg.delay)
                .map_err(io("setting up the loopback connection"))?,
        );
        let mut loop_client = Some(Arc::new(loop_client));
        let mut links = Vec::with_capacity(cfg.nodes);
        for (p, s) in mesh.conns.into_iter().enumerate() {
            let peer = NodeId(p as u16);
            let conn = match s {
                None => loop_client.take().ok_or_else(|| {
                    FabricError::Config("the mesh has no connection for a peer".into())
                })?,
                Some(s) => {
                    let addr = s
                        .peer_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_else(|_| "?".into());
                    s.set_nodelay(true).map_err(io("setting TCP_NODELAY"))?;
                    Arc::new(
                        Conn::new(peer, format!("{peer} ({addr})"), Stream::Tcp(s), cfg.delay)
                            .map_err(io("setting up a connection"))?,
                    )
                }
            };
            links.push(Link {
                peer,
                conn,
                state: Mutex::new(LinkState::default()),
                cv: Condvar::new(),
            });
        }
        let shared = Arc::new(Shared {
            rank: cfg.rank,
            nodes: cfg.nodes,
            heartbeat: hb,
            regions: cfg.regions.iter().cloned().map(Region::new).collect(),
            links,
            loop_server,
            incoming: Mutex::new(VecDeque::new()),
            incoming_cv: Condvar::new(),
            next_seq: AtomicU64::new(1),
            shutdown: AtomicBool::new(false),
        });
        let mut fabric = TcpFabric {
            shared: shared.clone(),
            delay: cfg.delay,
            threads: Vec::new(),
        };
        let mut conns: Vec<(Arc<Conn>, String)> = shared
            .links
            .iter()
            .map(|l| {
                let name = if l.peer == cfg.rank {
                    "self-a".to_string()
                } else {
                    l.peer.0.to_string()
                };
                (l.conn.clone(), name)
            })
            .collect();
        conns.push((shared.loop_server.clone(), "self-b".into()));
        for (conn, name) in conns {
            let reader = conn.reader().map_err(io("cloning a socket"))?;
            reader
                .set_read_timeout(Some(tick))
                .and_then(|()| reader.set_write_timeout(Some(write_timeout)))
                .map_err(io("setting socket timeouts"))?;
            let (sh, c) = (shared.clone(), conn.clone());
            let rx = thread::Builder::new()
                .name(format!("fabric-rx-{name}"))
                .spawn(move || receive_loop(&sh, &c, reader))
                .map_err(io("spawning a receive thread"))?;
            fabric.threads.push(rx);
            let (sh, c) = (shared.clone(), conn);
            let tx = thread::Builder::new()
                .name(format!("fabric-tx-{name}"))
                .spawn(move || {
                    if let Err(e) = c.run_helper(sh.heartbeat / 4) {
                        sh.peer_failed(&c, &format!("sending to it failed: {e}"));
                    }
                })
                .map_err(io("spawning a send thread"))?;
            fabric.threads.push(tx);
        }
        Ok(fabric)
    }

    fn region_of(&self, id: RegionId) -> Result<&Region, FabricError> {
        self.shared.region(id.0)
    }

    fn link(&self, peer: NodeId) -> Result<&Link, FabricError> {
        self.shared
            .links
            .get(usize::from(peer.0))
            .ok_or(FabricError::UnknownPeer {
                peer,
                nodes: self.shared.nodes,
            })
    }

    /// Numbers a request to `link`'s peer and sends its frames, in posting order.
    fn post(
        &self,
        link: &Link,
        frames: &[(Header, &[u8])],
        fetch: bool,
    ) -> Result<WrId, FabricError> {
        let deadline = Instant::now() + self.shared.heartbeat;
        loop {
            self.wait_for_room(link, deadline)?;
            let mut sending = link.conn.lock();
            let mut st = link.state();
            if let Some(reason) = &st.dead {
                return Err(dead(link.peer, reason));
            }
            if st.inflight.len() >= WINDOW + 64 {
                // Many threads raced for the last slots; wait again outside the write lock.
                continue;
            }
            let seq = self.shared.next_seq.fetch_add(1, Ordering::Relaxed);
            st.inflight.push_back(seq);
            st.last_posted = seq;
            drop(st);
            for (h, payload) in frames {
                let mut h = *h;
                h.wr = seq;
                if let Err(e) = sending.send(&h, payload) {
                    drop(sending);
                    let reason = format!("sending to it failed: {e}");
                    self.shared.peer_failed(&link.conn, &reason);
                    return Err(dead(link.peer, &reason));
                }
            }
            let fetch_bit = if fetch { WR_FETCH_BIT } else { 0 };
            return Ok(WrId(
                (seq << WR_SEQ_SHIFT) | fetch_bit | u64::from(link.peer.0),
            ));
        }
    }

    /// Waits until the window to `link`'s peer has room. Gives up with `Timeout` only when
    /// the peer answered nothing for a whole heartbeat timeout (a slow but progressing peer
    /// is waited for).
    fn wait_for_room(&self, link: &Link, mut deadline: Instant) -> Result<(), FabricError> {
        let mut st = link.state();
        let mut answers = st.answers;
        loop {
            if st.answers != answers {
                answers = st.answers;
                deadline = Instant::now() + self.shared.heartbeat;
            }
            if let Some(reason) = &st.dead {
                return Err(dead(link.peer, reason));
            }
            if st.inflight.len() < WINDOW {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(FabricError::Timeout {
                    what: format!(
                        "room in the {WINDOW}-request window to {} (it is alive but not acknowledging)",
                        link.peer
                    ),
                    waited: self.shared.heartbeat,
                });
            }
            st = link
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn write_frames<'a>(
        &self,
        dst: RemoteAddr,
        data: &'a [u8],
        imm: Option<u32>,
    ) -> Vec<(Header, &'a [u8])> {
        let last_kind = if imm.is_some() {
            Kind::WriteImm
        } else {
            Kind::Write
        };
        if data.len() <= MAX_WRITE_PAYLOAD {
            let mut h = Header::new(last_kind);
            h.len = data.len() as u32;
            h.region = dst.region.0;
            h.offset = dst.offset;
            h.imm = imm.unwrap_or(0);
            return vec![(h, data)];
        }
        let chunks = data.chunks(MAX_WRITE_PAYLOAD);
        let n = chunks.len();
        chunks
            .enumerate()
            .map(|(i, chunk)| {
                let last = i + 1 == n;
                let mut h = Header::new(if last { last_kind } else { Kind::Write });
                h.flags = if last { 0 } else { FLAG_MORE };
                h.len = chunk.len() as u32;
                h.region = dst.region.0;
                h.offset = dst.offset + (i * MAX_WRITE_PAYLOAD) as u64;
                h.arg = data.len() as u64;
                h.imm = if last { imm.unwrap_or(0) } else { 0 };
                (h, chunk)
            })
            .collect()
    }

    fn post_any_write(
        &self,
        peer: NodeId,
        dst: RemoteAddr,
        data: &[u8],
        imm: Option<u32>,
    ) -> Result<WrId, FabricError> {
        let link = self.link(peer)?;
        self.region_of(dst.region)?.check(dst.offset, data.len())?;
        let frames = self.write_frames(dst, data, imm);
        self.post(link, &frames, false)
    }
}

/// How long closing an endpoint waits for queued frames beyond the injected delay.
const CLOSE_FLUSH: Duration = Duration::from_millis(100);

impl Drop for TcpFabric {
    fn drop(&mut self) {
        // Let acknowledgements and delayed frames already made reach the peers first.
        let bound = self.delay + CLOSE_FLUSH;
        for l in &self.shared.links {
            l.conn.flush(bound);
        }
        self.shared.loop_server.flush(bound);
        // Pairs with the Acquire loads in the receive threads and `peer_failed`: a thread that
        // sees it treats every connection failure from here on as our own closing.
        self.shared.shutdown.store(true, Ordering::Release);
        for l in &self.shared.links {
            l.conn.close();
            l.cv.notify_all();
        }
        self.shared.loop_server.close();
        self.shared.incoming_cv.notify_all();
        for t in self.threads.drain(..) {
            // A panicked thread already reported through its panic message.
            let _ = t.join();
        }
    }
}

impl Shared {
    fn region(&self, id: u32) -> Result<&Region, FabricError> {
        self.regions
            .iter()
            .find(|r| r.id().0 == id)
            .ok_or(FabricError::UnknownRegion {
                region: RegionId(id),
            })
    }

    fn link_of(&self, conn: &Conn) -> &Link {
        // Every connection's peer is a rank of the group: links has one entry per rank.
        &self.links[usize::from(conn.peer.0)]
    }

    /// Declares the peer behind `conn` dead (first reason wins) and drops the connection.
    fn peer_failed(&self, conn: &Conn, reason: &str) {
        if self.shutdown.load(Ordering::Acquire) {
            conn.close();
            return;
        }
        let link = self.link_of(conn);
        let mut st = link.state();
        if st.dead.is_none() {
            if conn.peer != self.rank {
                tracing::warn!(peer = %conn.label, "dropping the connection: {reason}");
            }
            st.dead = Some(reason.to_string());
        }
        drop(st);
        link.cv.notify_all();
        conn.close();
    }

    fn incoming(&self) -> MutexGuard<'_, VecDeque<Item>> {
        self.incoming.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an incoming item, waiting while the queue is full (not for dead-peer notices).
    /// `false` when the endpoint shut down first.
    /// With `notify` false the caller wakes `recv` itself (see `receive_loop`).
    fn deliver(&self, item: Item, notify: bool) -> bool {
        let mut q = self.incoming();
        if matches!(item, Item::In(_)) {
            while q.len() >= INCOMING_CAPACITY {
                if self.shutdown.load(Ordering::Acquire) {
                    return false;
                }
                q = self
                    .incoming_cv
                    .wait_timeout(q, Duration::from_millis(50))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        q.push_back(item);
        drop(q);
        if notify {
            self.incoming_cv.notify_all();
        }
        true
    }
}

/// Per-connection state of a chunked write being received.
#[derive(Debug, Clone, Copy)]
struct Chunked {
    wr: u64,
    region: u32,
    start: u64,
    next: u64,
    end: u64,
    refusal: Option<(NackReason, u64)>,
}

/// The receive thread of one connection: reads frames, applies requests, completes acks.
fn receive_loop(shared: &Shared, conn: &Conn, mut stream: Stream) {
    let mut reader = FrameReader::new();
    let mut chunk: Option<Chunked> = None;
    let mut last_heard = Instant::now();
    let reason = loop {
        if shared.shutdown.load(Ordering::Acquire) || conn.is_closed() {
            break "the connection was closed".to_string();
        }
        match reader.poll(&mut stream) {
            Ok(Some(h)) => {
                let payload = reader.payload();
                let handled = handle_frame(shared, conn, &h, payload, &mut chunk);
                // Doorbells and messages were queued quietly and acknowledged; wake `recv`
                // only now, just before this thread goes back to (usually) blocking in read,
                // so the woken thread can take this CPU rather than need another one.
                if matches!(h.kind, Kind::WriteImm | Kind::Send) {
                    shared.incoming_cv.notify_all();
                }
                if let Err(reason) = handled {
                    tracing::warn!(peer = %conn.label, "protocol violation: {reason}");
                    let e = FabricError::Protocol {
                        peer: conn.label.clone(),
                        reason,
                    };
                    break e.to_string();
                }
                // Stamped after handling: time spent waiting for room in the incoming queue
                // is ours, not the peer's silence.
                last_heard = Instant::now();
            }
            Ok(None) => {
                let silent = last_heard.elapsed();
                if silent > shared.heartbeat {
                    break format!(
                        "silent for {silent:?} (heartbeat timeout {:?})",
                        shared.heartbeat
                    );
                }
            }
            Err(ReadError::Frame(e)) => {
                let e = FabricError::Protocol {
                    peer: conn.label.clone(),
                    reason: e.to_string(),
                };
                tracing::warn!(peer = %conn.label, "{e}");
                break e.to_string();
            }
            Err(e @ ReadError::Closed { .. }) => break e.to_string(),
            Err(ReadError::Io(e)) => break format!("the connection failed: {e}"),
        }
    };
    shared.peer_failed(conn, &reason);
    let is_self = conn.peer == shared.rank;
    if !is_self && !shared.shutdown.load(Ordering::Acquire) {
        shared.deliver(
            Item::Dead {
                peer: conn.peer,
                reason,
            },
            true,
        );
    }
}

/// Handles one frame; `Err` is a protocol violation that ends the connection.
fn handle_frame(
    shared: &Shared,
    conn: &Conn,
    h: &Header,
    payload: &[u8],
    chunk: &mut Option<Chunked>,
) -> Result<(), String> {
    let peer = conn.peer;
    match h.kind {
        Kind::Heartbeat => Ok(()),
        Kind::Ack | Kind::AckFetch | Kind::Nack => complete(shared, conn, h),
        Kind::Write | Kind::WriteImm => {
            let final_frame = !h.more();
            let state = match *chunk {
                Some(c) => {
                    if c.wr != h.wr || c.region != h.region || c.next != h.offset {
                        return Err(format!(
                            "chunk of wr {} at {} does not continue wr {} at {}",
                            h.wr, h.offset, c.wr, c.next
                        ));
                    }
                    c
                }
                None => {
                    let total = if h.more() { h.arg } else { u64::from(h.len) };
                    let end = h.offset.checked_add(total).ok_or_else(|| {
                        format!("write of {total} bytes at {} overflows", h.offset)
                    })?;
                    let refusal = match shared.region(h.region) {
                        Err(_) => Some((NackReason::UnknownRegion, total)),
                        Ok(r) => {
                            let bare_doorbell = h.kind == Kind::WriteImm && total == 0;
                            if bare_doorbell || r.spec().permits(peer, h.offset, total) {
                                None
                            } else {
                                Some((NackReason::AccessDenied, total))
                            }
                        }
                    };
                    Chunked {
                        wr: h.wr,
                        region: h.region,
                        start: h.offset,
                        next: h.offset,
                        end,
                        refusal,
                    }
                }
            };
            let next = state.next + u64::from(h.len);
            if next > state.end || (final_frame && next != state.end) {
                return Err(format!(
                    "chunks of wr {} do not add up to its {} bytes",
                    h.wr,
                    state.end - state.start
                ));
            }
            if state.refusal.is_none() {
                let region = shared.region(h.region).map_err(|e| e.to_string())?;
                region.store(h.offset, payload).map_err(|e| e.to_string())?;
            }
            if !final_frame {
                *chunk = Some(Chunked { next, ..state });
                return Ok(());
            }
            *chunk = None;
            if let Some((reason, len)) = state.refusal {
                return refuse(conn, h.wr, h.region, state.start, len, reason);
            }
            if h.kind == Kind::WriteImm
                && !shared.deliver(
                    Item::In(Incoming::Doorbell {
                        from: peer,
                        imm: h.imm,
                    }),
                    false,
                )
            {
                return Ok(());
            }
            ack(conn, Kind::Ack, h.wr, 0)
        }
        Kind::FetchAdd => {
            not_mid_write(chunk, h)?;
            let region = match shared.region(h.region) {
                Ok(r) => r,
                Err(_) => {
                    return refuse(conn, h.wr, h.region, h.offset, 8, NackReason::UnknownRegion);
                }
            };
            if !region.spec().permits(peer, h.offset, 8) {
                return refuse(conn, h.wr, h.region, h.offset, 8, NackReason::AccessDenied);
            }
            let old = region
                .fetch_add(h.offset, h.arg)
                .map_err(|e| e.to_string())?;
            ack(conn, Kind::AckFetch, h.wr, old)
        }
        Kind::Send => {
            not_mid_write(chunk, h)?;
            let msg = Incoming::Message {
                from: peer,
                data: payload.to_vec(),
            };
            if !shared.deliver(Item::In(msg), false) {
                return Ok(());
            }
            ack(conn, Kind::Ack, h.wr, 0)
        }
    }
}

fn not_mid_write(chunk: &Option<Chunked>, h: &Header) -> Result<(), String> {
    match chunk {
        Some(c) => Err(format!(
            "{:?} wr {} arrived inside chunked write wr {}",
            h.kind, h.wr, c.wr
        )),
        None => Ok(()),
    }
}

fn ack(conn: &Conn, kind: Kind, wr: u64, arg: u64) -> Result<(), String> {
    let mut a = Header::new(kind);
    a.wr = wr;
    a.arg = arg;
    conn.reply(&a)
        .map_err(|e| format!("acknowledging failed: {e}"))
}

fn refuse(
    conn: &Conn,
    wr: u64,
    region: u32,
    offset: u64,
    len: u64,
    reason: NackReason,
) -> Result<(), String> {
    tracing::warn!(
        peer = %conn.label,
        "refused an operation on region {region} at offset {offset} ({len} bytes): {}",
        match reason {
            NackReason::AccessDenied => "outside its grants",
            NackReason::UnknownRegion => "no such region",
        }
    );
    let mut n = Header::new(Kind::Nack);
    n.wr = wr;
    n.region = region;
    n.offset = offset;
    n.arg = len;
    n.imm = reason as u32;
    conn.reply(&n).map_err(|e| format!("refusing failed: {e}"))
}

/// Completes our request `h.wr` (and every earlier one) to the peer behind `conn`.
fn complete(shared: &Shared, conn: &Conn, h: &Header) -> Result<(), String> {
    let link = shared.link_of(conn);
    let mut st = link.state();
    if !st.inflight.contains(&h.wr) {
        return Err(format!("an answer for wr {} that is not in flight", h.wr));
    }
    while let Some(seq) = st.inflight.pop_front() {
        if seq == h.wr {
            break;
        }
    }
    st.answers += 1;
    match h.kind {
        Kind::AckFetch => {
            st.fetched.insert(h.wr, h.arg);
            if st.fetched.len() > RESULTS_KEPT {
                st.fetched.pop_first();
            }
        }
        Kind::Nack => {
            let refusal = match NackReason::from_code(h.imm) {
                Some(NackReason::UnknownRegion) => Refusal::UnknownRegion { region: h.region },
                _ => Refusal::Denied {
                    region: h.region,
                    offset: h.offset,
                    len: h.arg,
                },
            };
            st.refused.insert(h.wr, refusal);
            if st.refused.len() > RESULTS_KEPT {
                st.refused.pop_first();
            }
        }
        _ => {}
    }
    drop(st);
    link.cv.notify_all();
    Ok(())
}

fn dead(peer: NodeId, reason: &str) -> FabricError {
    FabricError::PeerDead {
        peer,
        reason: reason.to_string(),
    }
}

impl Fabric for TcpFabric {
    fn rank(&self) -> NodeId {
        self.shared.rank
    }

    fn nodes(&self) -> usize {
        self.shared.nodes
    }

    fn region(&self, id: RegionId) -> Result<&dyn LocalRegion, FabricError> {
        Ok(self.region_of(id)?)
    }

    fn post_write(&self, peer: NodeId, dst: RemoteAddr, data: &[u8]) -> Result<WrId, FabricError> {
        self.post_any_write(peer, dst, data, None)
    }

    fn post_write_imm(
        &self,
        peer: NodeId,
        dst: RemoteAddr,
        data: &[u8],
        imm: u32,
    ) -> Result<WrId, FabricError> {
        self.post_any_write(peer, dst, data, Some(imm))
    }

    fn post_fetch_add(&self, peer: NodeId, dst: RemoteAddr, add: u64) -> Result<WrId, FabricError> {
        let link = self.link(peer)?;
        let region = self.region_of(dst.region)?;
        if dst.offset % 8 != 0 {
            return Err(FabricError::Misaligned { offset: dst.offset });
        }
        region.check(dst.offset, 8)?;
        let mut h = Header::new(Kind::FetchAdd);
        h.region = dst.region.0;
        h.offset = dst.offset;
        h.arg = add;
        self.post(link, &[(h, &[])], true)
    }

    fn post_send(&self, peer: NodeId, msg: &[u8]) -> Result<WrId, FabricError> {
        let link = self.link(peer)?;
        if msg.len() > MAX_MESSAGE_BYTES {
            return Err(FabricError::MessageTooLarge {
                len: msg.len(),
                max: MAX_MESSAGE_BYTES,
            });
        }
        let mut h = Header::new(Kind::Send);
        h.len = msg.len() as u32;
        self.post(link, &[(h, msg)], false)
    }

    fn wait(&self, wr: WrId, timeout: Duration) -> Result<Completion, FabricError> {
        let peer = NodeId((wr.0 & 0xffff) as u16);
        let fetch = wr.0 & WR_FETCH_BIT != 0;
        let seq = wr.0 >> WR_SEQ_SHIFT;
        let unknown = FabricError::UnknownWr { wr };
        let Some(link) = self.shared.links.get(usize::from(peer.0)) else {
            return Err(unknown);
        };
        let deadline = Instant::now() + timeout;
        let mut st = link.state();
        loop {
            if seq == 0 || seq > st.last_posted {
                return Err(unknown);
            }
            if let Some(r) = st.refused.get(&seq) {
                return Err(match *r {
                    Refusal::Denied {
                        region,
                        offset,
                        len,
                    } => FabricError::AccessDenied {
                        peer,
                        region: RegionId(region),
                        offset,
                        len,
                    },
                    Refusal::UnknownRegion { region } => FabricError::UnknownRegion {
                        region: RegionId(region),
                    },
                });
            }
            if !st.inflight.contains(&seq) {
                let fetched = if fetch {
                    Some(st.fetched.remove(&seq).ok_or(unknown)?)
                } else {
                    None
                };
                return Ok(Completion { wr, peer, fetched });
            }
            if let Some(reason) = &st.dead {
                return Err(dead(peer, reason));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(FabricError::Timeout {
                    what: format!("{wr:?} to {peer}"),
                    waited: timeout,
                });
            }
            st = link
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn recv(&self, timeout: Duration) -> Result<Option<Incoming>, FabricError> {
        let deadline = Instant::now() + timeout;
        let mut q = self.shared.incoming();
        loop {
            if let Some(item) = q.pop_front() {
                drop(q);
                self.shared.incoming_cv.notify_all();
                return match item {
                    Item::In(i) => Ok(Some(i)),
                    Item::Dead { peer, reason } => Err(dead(peer, &reason)),
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            q = self
                .shared
                .incoming_cv
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}
