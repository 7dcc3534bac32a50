//! The tcp backend: one authenticated TCP connection per pair of nodes.
//!
//! # How the contract holds
//! - **Regions** are this node's registered memory; a peer's write travels as frames
//!   (`crate::wire`) that this node's *driver* (`driver.rs`) applies. A write leaves the source
//!   in one vectored system call straight from its registered memory (no staging copy).
//! - **Visibility at completion**: the target acknowledges an operation only after applying it
//!   (and, for a doorbell, after queueing it for `poll_incoming`); the source completes on that
//!   ack. Acks are cumulative: one ack completes every earlier request on the connection.
//! - **Per-peer order**: one connection per pair; a poster holds the connection's write lock
//!   from numbering its work request to the end of its frames, so numbers, wire order and
//!   apply order agree.
//! - **Grants** are checked at the target; a refused operation is answered with a nack and
//!   logged once there, and the writer's completion says `Denied`.
//! - **Credits**: a source sends at most `RECV_CREDITS` doorbells and messages the target has
//!   not polled; the target returns credits in `Credit` frames as its owner polls, and cuts off
//!   a source that sends past them.
//! - **fetch_add** is served by the owner's driver with an atomic add on the word.
//! - **Loopback** (operations to one's own rank) goes through an in-process socket pair with
//!   the same frames, threads and acks as any peer.
//! - **Failures**: every connection sends a heartbeat every `heartbeat_timeout / 4`; a peer
//!   whose connection ends, fails, carries a malformed frame, or stays silent past
//!   `heartbeat_timeout` is dead: its connection is dropped with a log line, operations in
//!   flight to it complete with `PeerDead`, posts to it fail, `poll_incoming` reports it once
//!   after everything it delivered, and the other peers are unaffected.
//!
//! # Who reads the sockets
//! See `driver.rs`: the thread that polls (completions or incoming items) reads the sockets
//! itself, without blocking, so an arriving frame is handled by the very thread that wants it;
//! a background thread covers when nobody has polled for a while. The notifier is an epoll
//! instance over every socket and an eventfd, so the caller's event loop wakes for frames as
//! they arrive.
//!
//! # Threads (`<p>` the peer's rank)
//! `fabric-rx` (the background driver and the silence watch); `fabric-tx-<p>` per connection
//! (heartbeats and the answers the driver could not send at once, see `conn.rs`). Loopback has
//! two connections (`self-a/b`).
//!
//! Lock order: a connection's write lock, then the completion queue; the incoming queue and
//! a connection's receive state are taken alone (a driver holds one receive state while it
//! pushes to the queues).

#![forbid(unsafe_code)]

mod conn;
mod driver;
mod mesh;

/// The frame format, public so that fuzzers and tools can drive the decoder.
pub mod frame {
    pub use crate::wire::*;
}

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

use crate::checks::{check_message, check_peer, check_word, check_write};
use crate::cq::Cq;
use crate::notifier::{Notifier, new_eventfd};
use crate::sys::{RawIo, SpinLock};
use crate::wire::{FLAG_MORE, Header, Kind, MAX_WRITE_PAYLOAD};
use crate::wr_code::WrCode;
use crate::{
    Completion, DeathCause, Fabric, FabricError, GroupConfig, IncomingBatch, Memory, NodeId,
    RECV_CREDITS, RegionId, RegionSpec, RemoteAddr, Resource, Signal, Source, WrId,
};

use conn::{Conn, Stream};
use driver::{Incoming, Rx};
use mesh::Mesh;

/// What this node knows of one peer as a source of operations to it.
#[derive(Debug)]
struct Link {
    peer: NodeId,
    conn: Arc<Conn>,
    /// Doorbells and messages sent to the peer (under the write lock).
    sent: AtomicU64,
    /// Credits the peer returned (cumulative, from its `Credit` frames).
    returned: AtomicU64,
    dead: AtomicBool,
    /// Why it died, once `dead`.
    cause: Mutex<Option<DeathCause>>,
}

impl Link {
    fn death(&self) -> Option<FabricError> {
        // Acquire: pairs with `Shared::peer_failed`'s release, after the cause was stored.
        if !self.dead.load(Ordering::Acquire) {
            return None;
        }
        let cause = self
            .cause
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(DeathCause::Closed);
        Some(FabricError::PeerDead {
            peer: self.peer,
            cause,
        })
    }
}

#[derive(Debug)]
struct Shared {
    rank: NodeId,
    nodes: usize,
    heartbeat: Duration,
    regions: Vec<RegionSpec>,
    memory: Vec<Arc<Memory>>,
    links: Vec<Link>,
    /// The loopback pair's accepting end (requests to self arrive here).
    loop_server: Arc<Conn>,
    /// Every connection's receiving side (the links' in rank order, then the loopback server).
    rxs: Vec<Rx>,
    next_counter: AtomicU64,
    cq: Cq,
    notifier: Arc<Notifier>,
    inbound: SpinLock<Incoming>,
    /// The caller's notifier: every socket and the notifier's eventfd.
    app_epoll: Epoll,
    /// The background driver's wait: every socket and `handover`.
    bg_epoll: Epoll,
    /// Written by a poller that found the background thread driving: it lets go.
    handover: std::fs::File,
    /// The driver role: whoever holds it reads the sockets and applies what arrives.
    driver: SpinLock<()>,
    bg_driving: AtomicBool,
    /// When a caller last polled, in nanoseconds since `epoch`.
    last_poll_ns: AtomicU64,
    epoch: Instant,
    shutdown: AtomicBool,
}

/// A tcp endpoint. Dropping it closes every connection (peers then see it dead) and joins its
/// threads.
#[derive(Debug)]
pub struct TcpFabric {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// Rank 0's bound bootstrap listener, before the group forms.
#[derive(Debug)]
pub struct Listener {
    listener: TcpListener,
    cfg: GroupConfig,
}

impl Listener {
    /// Waits for every other rank to join and returns rank 0's endpoint.
    pub fn accept_group(self) -> Result<TcpFabric, FabricError> {
        let mesh = mesh::form(&self.cfg, &self.listener)?;
        TcpFabric::from_mesh(&self.cfg, mesh)
    }
}

/// The epoll data of the caller's notifier eventfd and of the background thread's handover.
const NOTIFIER_TAG: u64 = u64::MAX;

/// Joins the group `cfg` describes as a member without an endpoint, returning its raw,
/// authenticated connections (`[p]` to peer `p`, `None` at its own rank). For tests and tools
/// that speak the wire format themselves, such as a rogue member in failure tests.
pub fn connect_raw(cfg: &GroupConfig) -> Result<Vec<Option<std::net::TcpStream>>, FabricError> {
    if cfg.rank == NodeId(0) {
        return Err(FabricError::Config(
            "rank 0 forms the group; it cannot join raw".into(),
        ));
    }
    mesh::join(cfg).map(|m| m.conns)
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
            let mesh = mesh::join(&cfg)?;
            TcpFabric::from_mesh(&cfg, mesh)
        }
    }

    /// Rank 0 only: binds `cfg.bootstrap` (port 0 picks a free port) and returns the bound
    /// address, so the other ranks can be told where to join before [`Listener::accept_group`].
    pub fn listen(cfg: GroupConfig) -> Result<(Listener, SocketAddr), FabricError> {
        cfg.validate()?;
        if cfg.rank != NodeId(0) {
            return Err(FabricError::Config(format!(
                "only rank 0 listens for the group, not {}",
                cfg.rank
            )));
        }
        let listener = TcpListener::bind(&cfg.bootstrap).map_err(FabricError::io(format!(
            "binding the bootstrap address {}",
            cfg.bootstrap
        )))?;
        let addr = listener
            .local_addr()
            .map_err(FabricError::io("reading the bootstrap listener's address"))?;
        Ok((Listener { listener, cfg }, addr))
    }

    /// A whole group on this host, one endpoint per rank, formed on `127.0.0.1` with a free
    /// port (`template.rank` and `template.bootstrap` are ignored; so is registered memory,
    /// which belongs to one node: every rank gets fresh memory). For tests and benchmarks.
    pub fn local_group(template: &GroupConfig) -> Result<Vec<TcpFabric>, FabricError> {
        let mut cfg0 = template.clone();
        cfg0.rank = NodeId(0);
        cfg0.bootstrap = "127.0.0.1:0".into();
        cfg0.memory.clear();
        let (listener, addr) = TcpFabric::listen(cfg0)?;
        let joiners: Vec<_> = (1..template.nodes)
            .map(|r| {
                let mut cfg = template.clone();
                cfg.rank = NodeId(r as u16);
                cfg.bootstrap = addr.to_string();
                cfg.memory.clear();
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
        let io = |op: &str| FabricError::io(op.to_string());
        let hb = cfg.heartbeat_timeout;
        let write_timeout = (hb * 2).max(Duration::from_secs(2));
        let (a, b) = UnixStream::pair().map_err(io("creating the loopback socket pair"))?;
        let loop_client = Conn::new(cfg.rank, "self".into(), Stream::Unix(a))
            .map_err(io("setting up the loopback connection"))?;
        let loop_server = Arc::new(
            Conn::new(cfg.rank, "self".into(), Stream::Unix(b))
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
                        Conn::new(peer, format!("{peer} ({addr})"), Stream::Tcp(s))
                            .map_err(io("setting up a connection"))?,
                    )
                }
            };
            links.push(Link {
                peer,
                conn,
                sent: AtomicU64::new(0),
                returned: AtomicU64::new(0),
                dead: AtomicBool::new(false),
                cause: Mutex::new(None),
            });
        }
        let mut rxs = Vec::with_capacity(links.len() + 1);
        for conn in links
            .iter()
            .map(|l| Arc::clone(&l.conn))
            .chain(std::iter::once(Arc::clone(&loop_server)))
        {
            let stream = conn.reader().map_err(io("cloning a socket"))?;
            // The send timeout is the socket's, shared with the posters' handle.
            stream
                .set_write_timeout(Some(write_timeout))
                .map_err(io("setting socket timeouts"))?;
            rxs.push(Rx::new(conn, stream));
        }
        let notifier = Arc::new(Notifier::new()?);
        let epoll = || {
            Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
                .map_err(|e| FabricError::io("creating an epoll instance")(e.into()))
        };
        let (app_epoll, bg_epoll) = (epoll()?, epoll()?);
        let handover = new_eventfd()?;
        for (i, rx) in rxs.iter().enumerate() {
            for ep in [&app_epoll, &bg_epoll] {
                ep.add(rx.fd(), EpollEvent::new(EpollFlags::EPOLLIN, i as u64))
                    .map_err(|e| FabricError::io("watching a socket")(e.into()))?;
            }
        }
        let tagged = EpollEvent::new(EpollFlags::EPOLLIN, NOTIFIER_TAG);
        app_epoll
            .add(notifier.fd(), tagged)
            .and_then(|()| bg_epoll.add(handover.as_fd(), tagged))
            .map_err(|e| FabricError::io("watching the notifier")(e.into()))?;
        let shared = Arc::new(Shared {
            rank: cfg.rank,
            nodes: cfg.nodes,
            heartbeat: hb,
            regions: cfg.regions.clone(),
            memory: cfg.region_memory()?,
            links,
            loop_server,
            rxs,
            next_counter: AtomicU64::new(1),
            cq: Cq::new(cfg.nodes, Arc::clone(&notifier)),
            notifier,
            inbound: SpinLock::new(Incoming::new(cfg.nodes)),
            app_epoll,
            bg_epoll,
            handover,
            driver: SpinLock::new(()),
            bg_driving: AtomicBool::new(false),
            last_poll_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            shutdown: AtomicBool::new(false),
        });
        let mut fabric = TcpFabric {
            shared: Arc::clone(&shared),
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
                (Arc::clone(&l.conn), name)
            })
            .collect();
        conns.push((Arc::clone(&shared.loop_server), "self-b".into()));
        let sh = Arc::clone(&shared);
        let rx = thread::Builder::new()
            .name("fabric-rx".into())
            .spawn(move || sh.background())
            .map_err(io("spawning the background driver thread"))?;
        fabric.threads.push(rx);
        for (conn, name) in conns {
            let (sh, c) = (Arc::clone(&shared), conn);
            let tx = thread::Builder::new()
                .name(format!("fabric-tx-{name}"))
                .spawn(move || {
                    if let Err(e) = c.run_helper(sh.heartbeat / 4) {
                        sh.peer_failed(&c, DeathCause::ConnectionFailed(e.kind()));
                    }
                })
                .map_err(io("spawning a send thread"))?;
            fabric.threads.push(tx);
        }
        Ok(fabric)
    }

    fn link(&self, peer: NodeId) -> Result<&Link, FabricError> {
        check_peer(peer, self.shared.nodes)?;
        let link = &self.shared.links[peer.index()];
        match link.death() {
            Some(e) => Err(e),
            None => Ok(link),
        }
    }

    /// Numbers a request to `link`'s peer and sends its frames, in posting order: one
    /// header per frame, the payload of frame `i` being `payload(i)`.
    fn post(
        &self,
        link: &Link,
        headers: &mut [Header],
        payload: impl Fn(usize) -> RawIo,
        signal: Signal,
        credit: bool,
    ) -> Result<WrId, FabricError> {
        let shared = &self.shared;
        let mut sending = link.conn.lock();
        if let Some(e) = link.death() {
            return Err(e);
        }
        if credit
            && link.sent.load(Ordering::Relaxed) - link.returned.load(Ordering::Acquire)
                >= RECV_CREDITS as u64
        {
            return Err(FabricError::WouldBlock {
                peer: link.peer,
                resource: Resource::ReceiveCredits,
            });
        }
        let counter = shared.next_counter.fetch_add(1, Ordering::Relaxed);
        shared.cq.begin(link.peer, counter, signal)?;
        if credit {
            // Counted before the frame leaves: the peer may return this credit at once.
            link.sent.fetch_add(1, Ordering::Release);
        }
        for (i, h) in headers.iter_mut().enumerate() {
            h.wr = counter;
            if let Err(e) = sending.send(h, payload(i)) {
                drop(sending);
                shared.peer_failed(&link.conn, DeathCause::ConnectionFailed(e.kind()));
                return Err(FabricError::PeerDead {
                    peer: link.peer,
                    cause: DeathCause::ConnectionFailed(e.kind()),
                });
            }
        }
        Ok(WrCode::encode(counter, link.peer))
    }
}

/// How long closing an endpoint waits for queued answers.
const CLOSE_FLUSH: Duration = Duration::from_millis(100);

impl Drop for TcpFabric {
    fn drop(&mut self) {
        // Let answers already made reach the peers first.
        for l in &self.shared.links {
            l.conn.flush(CLOSE_FLUSH);
        }
        self.shared.loop_server.flush(CLOSE_FLUSH);
        // Pairs with the Acquire loads in the drivers and `peer_failed`: a thread that
        // sees it treats every connection failure from here on as our own closing.
        self.shared.shutdown.store(true, Ordering::Release);
        for l in &self.shared.links {
            l.conn.close();
        }
        self.shared.loop_server.close();
        self.shared.wake_background();
        for t in self.threads.drain(..) {
            // A panicked thread already reported through its panic message.
            let _ = t.join();
        }
    }
}

/// The frames of a write of `len` bytes at `dst`: one, or chunks of `MAX_WRITE_PAYLOAD`, all
/// but the last flagged `FLAG_MORE`, the first carrying the total length.
fn write_headers(dst: RemoteAddr, len: u64, imm: Option<u32>, out: &mut [Header]) -> usize {
    let last_kind = if imm.is_some() {
        Kind::WriteImm
    } else {
        Kind::Write
    };
    let chunks = (len as usize).div_ceil(MAX_WRITE_PAYLOAD).max(1);
    for (i, h) in out.iter_mut().take(chunks).enumerate() {
        let last = i + 1 == chunks;
        let start = (i * MAX_WRITE_PAYLOAD) as u64;
        let mut f = Header::new(if last { last_kind } else { Kind::Write });
        f.flags = if last { 0 } else { FLAG_MORE };
        f.len = (len - start).min(MAX_WRITE_PAYLOAD as u64) as u32;
        f.region = dst.region.0;
        f.offset = dst.offset + start;
        f.arg = if chunks > 1 { len } else { 0 };
        f.imm = if last { imm.unwrap_or(0) } else { 0 };
        *h = f;
    }
    chunks
}

/// Writes of at most this many chunks are posted without allocating (larger ones are rare:
/// a region of more than 16 MiB written at once).
const INLINE_CHUNKS: usize = 16;

impl Fabric for TcpFabric {
    fn rank(&self) -> NodeId {
        self.shared.rank
    }

    fn nodes(&self) -> usize {
        self.shared.nodes
    }

    fn memory(&self, region: RegionId) -> Result<&Memory, FabricError> {
        crate::memory::find(&self.shared.memory, region)
    }

    fn post_write(
        &self,
        peer: NodeId,
        dst: RemoteAddr,
        src: Source<'_>,
        imm: Option<u32>,
        signal: Signal,
    ) -> Result<WrId, FabricError> {
        let w = check_write(&self.shared.regions, dst, &src)?;
        let link = self.link(peer)?;
        let chunks = (w.len as usize).div_ceil(MAX_WRITE_PAYLOAD).max(1);
        let mut small = [Header::new(Kind::Write); INLINE_CHUNKS];
        let mut large = Vec::new();
        let headers: &mut [Header] = if chunks <= INLINE_CHUNKS {
            &mut small[..chunks]
        } else {
            large.resize(chunks, Header::new(Kind::Write));
            &mut large
        };
        write_headers(dst, w.len, imm, headers);
        let memory = &self.shared.memory;
        let piece = |i: usize| {
            let start = i * MAX_WRITE_PAYLOAD;
            let len = (w.len as usize - start.min(w.len as usize)).min(MAX_WRITE_PAYLOAD);
            match src {
                Source::Region(s) => {
                    let m = &memory[w.src_index.expect("a region source has an index")];
                    m.mapping().io_range(s.offset as usize + start, len)
                }
                Source::Inline(b) => RawIo::slice(&b[start.min(b.len())..][..len]),
                Source::Empty => RawIo::slice(&[]),
            }
        };
        self.post(link, headers, piece, signal, imm.is_some())
    }

    fn post_fetch_add(&self, peer: NodeId, dst: RemoteAddr, add: u64) -> Result<WrId, FabricError> {
        check_word(&self.shared.regions, dst)?;
        let link = self.link(peer)?;
        let mut h = Header::new(Kind::FetchAdd);
        h.region = dst.region.0;
        h.offset = dst.offset;
        h.arg = add;
        self.post(link, &mut [h], |_| RawIo::slice(&[]), Signal::Always, false)
    }

    fn credits(&self, peer: NodeId) -> Result<usize, FabricError> {
        let link = self.link(peer)?;
        let held = link.sent.load(Ordering::Relaxed) - link.returned.load(Ordering::Acquire);
        Ok(RECV_CREDITS.saturating_sub(held as usize))
    }

    fn post_send(&self, peer: NodeId, msg: &[u8], signal: Signal) -> Result<WrId, FabricError> {
        check_message(msg.len())?;
        let link = self.link(peer)?;
        let mut h = Header::new(Kind::Send);
        h.len = msg.len() as u32;
        self.post(link, &mut [h], |_| RawIo::slice(msg), signal, true)
    }

    fn poll_completions(&self, out: &mut [Completion]) -> usize {
        self.shared.drive_now();
        self.shared.cq.poll(out)
    }

    fn poll_completion(&self, wr: WrId) -> Result<Option<Completion>, FabricError> {
        self.shared.drive_now();
        self.shared.cq.poll_one(wr)
    }

    fn poll_incoming(&self, out: &mut IncomingBatch) -> usize {
        self.shared.drive_now();
        self.shared.take_incoming(out)
    }

    fn notifier(&self) -> BorrowedFd<'_> {
        self.shared.app_epoll.0.as_fd()
    }

    fn arm_notifier(&self) {
        // About to sleep: credits and answers deferred for a post that is not coming must
        // leave now.
        self.shared.return_credits();
        self.shared.flush_answers();
        self.shared.notifier.arm();
    }
}
