//! The tcp backend: one authenticated TCP connection per pair of nodes.
//!
//! # How the contract holds
//! - **Regions** are memory the endpoint owns ([`region`]); a peer's write travels as frames
//!   ([`frame`]) that this node's *driver* (below) applies.
//! - **Visibility at completion**: the target acknowledges an operation only after applying it
//!   (and, for `write_imm`, after queueing its doorbell); `wait` returns on that ack.
//! - **Per-peer order**: one connection per pair; a poster holds the connection's write lock
//!   from numbering its work request to the end of its frames, so numbers, wire order and
//!   apply order agree; acks come back in that order, so an ack completes every earlier
//!   request to that peer.
//! - **Grants** are checked at the target; a refused operation is answered with a nack and
//!   logged once there, and the writer's `wait` returns `AccessDenied`.
//! - **fetch_add** is served by the owner's driver with an atomic add on the word.
//! - **Loopback** (operations to one's own rank) goes through an in-process socket pair with
//!   the same frames, threads and acks as any peer.
//! - **Failures**: every connection sends a heartbeat every `heartbeat_timeout / 4`; a peer
//!   whose connection ends, fails, carries a malformed frame, or stays silent past
//!   `heartbeat_timeout` is dead: its connection is dropped with a log line, calls involving it
//!   return `PeerDead`, `recv` reports it once after everything it delivered, and the other
//!   peers are unaffected.
//! - **Delay**: every frame (requests and acks) leaves `delay` after it was sent, in order.
//!
//! # Who reads the sockets: the driver role
//! One thread at a time holds the endpoint's *driver* role: it waits in `poll(2)` over every
//! connection's socket, reads what arrived without blocking, and applies it (writes, acks,
//! doorbells and messages queued for `recv`, `fetch_add`s answered, silent peers declared
//! dead). A thread in `recv` or `wait` whose answer is not there yet takes the role itself
//! (like polling a verbs completion queue), so an arriving frame wakes the very thread that
//! wants it, with no hand-off between threads (on a busy 2-core VM each hand-off cost 20-30
//! us). Its acks of doorbells and messages are deferred until it posts to that peer (then
//! they leave in the same system call as the post, usually the answering doorbell) or waits
//! again; the background thread `fabric-rx` sends any
//! still pending every `HANDBACK`. `fabric-rx` drives whenever no thread in `recv`/`wait`
//! has for `HANDBACK`, so a node that never calls them still serves writes and `fetch_add`s,
//! answers, and detects dead peers; a thread wanting the role wakes it out of `poll` through
//! a socket pair. Other threads in `recv`/`wait` sleep on condition variables, woken by what
//! the driver applies or when it lets go.
//!
//! # Threads (per connection, `<p>` the peer's rank)
//! `fabric-tx-<p>` sends heartbeats, delayed frames and the acks the driver could not send at
//! once (see `conn.rs` for why the driver never blocks on a socket). Loopback has two
//! connections (`self-a/b`). Posters write on the socket themselves when no delay is injected.
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
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::bootstrap::{self, Mesh, Rendezvous};
use crate::wire::{FLAG_MORE, FrameReader, Header, Kind, MAX_WRITE_PAYLOAD, NackReason, ReadError};
use crate::{
    Completion, Fabric, FabricError, GroupConfig, Incoming, LocalRegion, NodeId, RegionId,
    RemoteAddr, WrId,
};

use conn::{Conn, Stream};
use region::Region;

/// Requests to one peer that may be posted and not yet acknowledged. Bounds the acks a target
/// must buffer for us and the frames a dead peer strands; large enough to keep a link busy.
/// (Concurrent posters may exceed it by at most their number.)
pub const WINDOW: usize = 256;

/// Doorbells and messages queued for `recv`. A full queue stops the driver reading,
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

/// One connection's receiving side, read by whichever thread drives the sockets.
#[derive(Debug)]
struct Rx {
    conn: Arc<Conn>,
    /// A handle on the socket for polling and non-blocking reads.
    stream: Stream,
    state: Mutex<RxState>,
}

#[derive(Debug)]
struct RxState {
    reader: FrameReader,
    chunk: Option<Chunked>,
    last_heard: Instant,
    /// The connection failed or ended and was reported; nothing more is read.
    ended: bool,
}

impl Rx {
    fn state(&self) -> MutexGuard<'_, RxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Reads a socket without blocking (its file description stays blocking for posters).
struct NonBlocking<'a>(BorrowedFd<'a>);

impl Read for NonBlocking<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        sys::recv_nonblocking(self.0, buf)
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
    /// Every connection's receiving side (the links' in rank order, then the loopback server).
    rxs: Vec<Rx>,
    /// The driver role: whoever holds it polls the sockets and applies what arrives.
    driver: Mutex<()>,
    /// The background thread holds the driver role (and may sleep in `poll` on `wake_rx`).
    bg_driving: AtomicBool,
    /// Threads in `recv`/`wait` that want the driver role or are driving.
    app_drivers: AtomicUsize,
    /// When a thread in `recv`/`wait` last stopped driving.
    app_left: Mutex<Instant>,
    /// A byte on `wake_tx` tells the background driver to hand over.
    wake_tx: UnixStream,
    wake_rx: UnixStream,
    /// The longest a driver sleeps in `poll` before checking for silent peers.
    tick: Duration,
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
        let mut rxs = Vec::with_capacity(links.len() + 1);
        for conn in links
            .iter()
            .map(|l| l.conn.clone())
            .chain(std::iter::once(loop_server.clone()))
        {
            let stream = conn.reader().map_err(io("cloning a socket"))?;
            // The send timeout is the socket's, shared with the posters' handle.
            stream
                .set_write_timeout(Some(write_timeout))
                .map_err(io("setting socket timeouts"))?;
            rxs.push(Rx {
                conn,
                stream,
                state: Mutex::new(RxState {
                    reader: FrameReader::new(),
                    chunk: None,
                    last_heard: Instant::now(),
                    ended: false,
                }),
            });
        }
        let (wake_tx, wake_rx) =
            UnixStream::pair().map_err(io("creating the driver's wake-up socket pair"))?;
        wake_tx
            .set_nonblocking(true)
            .and_then(|()| wake_rx.set_nonblocking(true))
            .map_err(io("setting up the driver's wake-up socket pair"))?;
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
            rxs,
            driver: Mutex::new(()),
            bg_driving: AtomicBool::new(false),
            app_drivers: AtomicUsize::new(0),
            app_left: Mutex::new(Instant::now()),
            wake_tx,
            wake_rx,
            tick,
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
        let sh = shared.clone();
        let rx = thread::Builder::new()
            .name("fabric-rx".into())
            .spawn(move || background_driver(&sh))
            .map_err(io("spawning the background driver thread"))?;
        fabric.threads.push(rx);
        for (conn, name) in conns {
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
        // Pairs with the Acquire loads in the drivers and `peer_failed`: a thread that
        // sees it treats every connection failure from here on as our own closing.
        self.shared.shutdown.store(true, Ordering::Release);
        for l in &self.shared.links {
            l.conn.close();
            l.cv.notify_all();
        }
        self.shared.loop_server.close();
        self.shared.incoming_cv.notify_all();
        // The background driver may sleep in poll; a full pipe already holds a wake-up.
        let _ = (&self.shared.wake_tx).write(&[1]);
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

/// Frames one connection's reading applies before the driver looks at the others.
const PUMP_FRAMES: usize = 256;

/// After a thread in `recv`/`wait` stopped driving, how long the background thread leaves the
/// sockets to it (it usually comes back within microseconds): frames arriving while nobody
/// drives wait at most this long.
const HANDBACK: Duration = Duration::from_micros(500);

/// How long a thread in `recv`/`wait` that could not take the driver role sleeps before
/// trying again (it is woken earlier by what it waits for or by the driver letting go).
const WAITER_SLICE: Duration = Duration::from_millis(1);

/// The background thread: drives the sockets whenever no thread in `recv`/`wait` does, so a
/// node that does not call them still applies writes, answers, heartbeats and detects deaths.
fn background_driver(shared: &Shared) {
    while !shared.shutdown.load(Ordering::Acquire) {
        let app_left = *shared.app_left.lock().unwrap_or_else(|p| p.into_inner());
        if shared.app_drivers.load(Ordering::SeqCst) > 0 || app_left.elapsed() < HANDBACK {
            thread::sleep(HANDBACK);
            shared.flush_answers();
            continue;
        }
        let guard = match shared.driver.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                thread::sleep(HANDBACK);
                continue;
            }
        };
        // Pairs with the SeqCst increment in `drive_or_wait`: either we see its thread
        // wanting the role, or it sees us driving and wakes our poll.
        shared.bg_driving.store(true, Ordering::SeqCst);
        if shared.app_drivers.load(Ordering::SeqCst) == 0 {
            shared.drive(shared.tick, true);
        }
        shared.bg_driving.store(false, Ordering::SeqCst);
        drop(guard);
        if shared.app_drivers.load(Ordering::SeqCst) > 0 {
            shared.notify_waiters();
        }
    }
}

impl Shared {
    /// One round of driving: waits at most `timeout` for a socket to become readable, reads
    /// and applies what the readable ones hold, and declares silent peers dead. Only the
    /// holder of the driver role calls it. `background` also wakes for `wake_rx`, and may
    /// block while the incoming queue is full (a thread in `recv`/`wait` never does).
    fn drive(&self, timeout: Duration, background: bool) {
        self.flush_answers();
        let live: Vec<&Rx> = self.rxs.iter().filter(|r| !r.conn.is_closed()).collect();
        let mut fds: Vec<BorrowedFd<'_>> = live.iter().map(|r| r.stream.fd()).collect();
        if background {
            fds.push(std::os::fd::AsFd::as_fd(&self.wake_rx));
        }
        let mut ready = vec![false; fds.len()];
        if let Err(e) = sys::poll_readable(&fds, timeout, &mut ready) {
            tracing::warn!("waiting for the fabric's sockets failed: {e}");
            thread::sleep(timeout.min(WAITER_SLICE));
            return;
        }
        if background && ready.last() == Some(&true) {
            let mut sink = [0u8; 64];
            while matches!((&self.wake_rx).read(&mut sink), Ok(n) if n > 0) {}
        }
        for (rx, &readable) in live.iter().zip(&ready) {
            if readable {
                self.pump(rx, background);
            } else {
                self.check_silence(rx);
            }
        }
    }

    /// Reads and applies the frames `rx`'s socket holds now (at most `PUMP_FRAMES`).
    fn pump(&self, rx: &Rx, may_block: bool) {
        let mut guard = rx.state();
        let st = &mut *guard;
        if st.ended {
            return;
        }
        // Readable: the peer sent something (or hung up, which the read reports).
        st.last_heard = Instant::now();
        let mut failure = None;
        for _ in 0..PUMP_FRAMES {
            if self.shutdown.load(Ordering::Acquire) || rx.conn.is_closed() {
                failure = Some("the connection was closed".to_string());
                break;
            }
            // A thread in `recv`/`wait` must not block on a full incoming queue (it would
            // miss its deadline, or wait for itself): the frames stay in the socket.
            if !may_block && self.incoming().len() >= INCOMING_CAPACITY {
                break;
            }
            match st.reader.poll(&mut NonBlocking(rx.stream.fd())) {
                Ok(Some(h)) => {
                    let conn = &rx.conn;
                    let handled = handle_frame(
                        self,
                        conn,
                        &h,
                        st.reader.payload(),
                        &mut st.chunk,
                        // Only a doorbell's or message's answer waits for the thread it
                        // wakes (which usually answers it, see `conn.rs`); the others leave
                        // at once, with any deferred before them.
                        !may_block && matches!(h.kind, Kind::WriteImm | Kind::Send),
                    );
                    // Doorbells and messages were queued quietly and acknowledged; wake
                    // `recv` only now.
                    if matches!(h.kind, Kind::WriteImm | Kind::Send) {
                        self.incoming_cv.notify_all();
                    }
                    if let Err(reason) = handled {
                        tracing::warn!(peer = %conn.label, "protocol violation: {reason}");
                        let e = FabricError::Protocol {
                            peer: conn.label.clone(),
                            reason,
                        };
                        failure = Some(e.to_string());
                        break;
                    }
                    // Stamped after handling: time spent waiting for room in the incoming
                    // queue is ours, not the peer's silence.
                    st.last_heard = Instant::now();
                }
                Ok(None) => break,
                Err(ReadError::Frame(e)) => {
                    let e = FabricError::Protocol {
                        peer: rx.conn.label.clone(),
                        reason: e.to_string(),
                    };
                    tracing::warn!(peer = %rx.conn.label, "{e}");
                    failure = Some(e.to_string());
                    break;
                }
                Err(e @ ReadError::Closed { .. }) => {
                    failure = Some(e.to_string());
                    break;
                }
                Err(ReadError::Io(e)) => {
                    failure = Some(format!("the connection failed: {e}"));
                    break;
                }
            }
        }
        if let Some(reason) = failure {
            st.ended = true;
            drop(guard);
            self.connection_ended(&rx.conn, reason);
        }
    }

    /// Declares `rx`'s peer dead if its socket, found not readable just now, has carried
    /// nothing for `heartbeat` (heartbeats that arrived while nobody read would make it
    /// readable, so a driver that was busy elsewhere never mistakes that for silence).
    fn check_silence(&self, rx: &Rx) {
        let Ok(mut st) = rx.state.try_lock() else {
            return;
        };
        let silent = st.last_heard.elapsed();
        if st.ended || silent <= self.heartbeat {
            return;
        }
        st.ended = true;
        drop(st);
        let reason = format!(
            "silent for {silent:?} (heartbeat timeout {:?})",
            self.heartbeat
        );
        self.connection_ended(&rx.conn, reason);
    }

    fn connection_ended(&self, conn: &Conn, reason: String) {
        self.peer_failed(conn, &reason);
        let is_self = conn.peer == self.rank;
        if !is_self && !self.shutdown.load(Ordering::Acquire) {
            self.deliver(
                Item::Dead {
                    peer: conn.peer,
                    reason,
                },
                true,
            );
        }
    }

    /// Sends the answers a thread in `recv`/`wait` deferred. Called before every wait in
    /// `poll` and by the background thread every `HANDBACK`, so an answer is deferred at most
    /// about that long even if its thread neither posts nor waits again.
    fn flush_answers(&self) {
        for rx in &self.rxs {
            if let Err(e) = rx.conn.flush_backlog() {
                self.peer_failed(&rx.conn, &format!("acknowledging failed: {e}"));
            }
        }
    }

    /// Wakes every thread waiting in `recv` or `wait`, so one of them takes the driver role.
    fn notify_waiters(&self) {
        self.incoming_cv.notify_all();
        for l in &self.links {
            l.cv.notify_all();
        }
    }

    /// Called by `recv`/`wait` when what they wait for is not there yet (and `deadline` has
    /// not passed): drives the sockets for a while, or, when another thread in
    /// `recv`/`wait` drives them, waits on `cv` (with `guard`'s lock) until woken.
    /// Returns the lock again; the caller re-checks its condition.
    fn drive_or_wait<'a, T>(
        &self,
        mut guard: MutexGuard<'a, T>,
        cv: &Condvar,
        mutex: &'a Mutex<T>,
        deadline: Instant,
    ) -> MutexGuard<'a, T> {
        let slice = deadline
            .saturating_duration_since(Instant::now())
            .min(self.tick);
        self.app_drivers.fetch_add(1, Ordering::SeqCst);
        if self.bg_driving.load(Ordering::SeqCst) {
            // The background thread may sleep in poll: tell it to hand over. A full pipe
            // already holds a wake-up.
            let _ = (&self.wake_tx).write(&[1]);
        }
        let role = match self.driver.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        match role {
            Some(role) => {
                drop(guard);
                self.drive(slice, false);
                drop(role);
                guard = mutex.lock().unwrap_or_else(|p| p.into_inner());
            }
            None => {
                guard = cv
                    .wait_timeout(guard, slice.min(WAITER_SLICE))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        *self.app_left.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        if self.app_drivers.fetch_sub(1, Ordering::SeqCst) > 1 {
            self.notify_waiters();
        }
        guard
    }
}

/// Handles one frame; `Err` is a protocol violation that ends the connection.
fn handle_frame(
    shared: &Shared,
    conn: &Conn,
    h: &Header,
    payload: &[u8],
    chunk: &mut Option<Chunked>,
    defer: bool,
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
                return refuse(defer, conn, h.wr, h.region, state.start, len, reason);
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
            ack(conn, Kind::Ack, h.wr, 0, defer)
        }
        Kind::FetchAdd => {
            not_mid_write(chunk, h)?;
            let region = match shared.region(h.region) {
                Ok(r) => r,
                Err(_) => {
                    return refuse(
                        defer,
                        conn,
                        h.wr,
                        h.region,
                        h.offset,
                        8,
                        NackReason::UnknownRegion,
                    );
                }
            };
            if !region.spec().permits(peer, h.offset, 8) {
                return refuse(
                    defer,
                    conn,
                    h.wr,
                    h.region,
                    h.offset,
                    8,
                    NackReason::AccessDenied,
                );
            }
            let old = region
                .fetch_add(h.offset, h.arg)
                .map_err(|e| e.to_string())?;
            ack(conn, Kind::AckFetch, h.wr, old, defer)
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
            ack(conn, Kind::Ack, h.wr, 0, defer)
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

fn ack(conn: &Conn, kind: Kind, wr: u64, arg: u64, defer: bool) -> Result<(), String> {
    let mut a = Header::new(kind);
    a.wr = wr;
    a.arg = arg;
    conn.reply(&a, defer)
        .map_err(|e| format!("acknowledging failed: {e}"))
}

fn refuse(
    defer: bool,
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
    conn.reply(&n, defer)
        .map_err(|e| format!("refusing failed: {e}"))
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
        crate::checks::check_message(msg.len())?;
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
            st = self
                .shared
                .drive_or_wait(st, &link.cv, &link.state, deadline);
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
            q = self.shared.drive_or_wait(
                q,
                &self.shared.incoming_cv,
                &self.shared.incoming,
                deadline,
            );
        }
    }
}
