//! How a group forms, for every backend: rank 0 listens, every other member connects and
//! authenticates ([`crate::auth`]), sends its *card* (what the backend needs its peers to know:
//! tcp a data address, shm its memory files, verbs its queue pairs and memory keys), and once
//! every rank has joined rank 0 sends every member the whole table of cards.
//!
//! 1. A joiner connects (retrying until `connect_timeout`, since rank 0 may start later),
//!    authenticates, and sends its record: a fixed header (magic, rank, group size, a digest
//!    of the region layout and the backend's name, the card's length and descriptor count)
//!    and the card, its file descriptors attached (`SCM_RIGHTS`) on a Unix socket.
//! 2. Rank 0 refuses a joiner whose layout or backend differs or whose rank already joined
//!    (one verdict byte, then it closes); a refused or failed handshake is logged with the
//!    address and does not take a rank's place.
//! 3. Once every rank joined, rank 0 sends each member every card in rank order.
//!
//! Handshakes at rank 0 run on their own short-lived threads (at most
//! [`MAX_PENDING_HANDSHAKES`] at once), so a silent or slow stranger cannot stall the group.
//! Nothing is allocated from a length a peer sent before it was checked against
//! [`MAX_CARD_BYTES`].
#![forbid(unsafe_code)]

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use sha2::{Digest, Sha256};

use crate::auth::{self, Role};
use crate::sys::adopt_received_fds;
use crate::{FabricError, GroupConfig, NodeId, Waiting};

/// Largest card a member may send.
pub const MAX_CARD_BYTES: usize = 64 * 1024;

/// Most file descriptors one card carries.
pub const MAX_CARD_FDS: usize = 64;

/// Bound on handshakes in progress at rank 0; more strangers are dropped at once.
pub const MAX_PENDING_HANDSHAKES: usize = 32;

/// Bound on one handshake, so a silent connection frees its slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between attempts to reach a rank 0 that is not listening yet.
pub(crate) const CONNECT_RETRY: Duration = Duration::from_millis(10);

const MAGIC: &[u8; 8] = b"VSMPRDV1";
/// magic, rank (u16), reserved (u16), nodes (u32), digest (32), card length (u32), fd count (u32).
const HEADER_BYTES: usize = 8 + 2 + 2 + 4 + 32 + 4 + 4;

/// Rank 0's answer to a join record.
const JOIN_OK: u8 = 0;
const JOIN_RANK_TAKEN: u8 = 1;
const JOIN_LAYOUT_DIFFERS: u8 = 2;

/// What a member tells the group.
#[derive(Debug, Default)]
pub struct Card {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// One member's card, as the table hands it out.
#[derive(Debug)]
pub struct Member {
    pub rank: NodeId,
    pub card: Card,
}

/// A byte stream the rendezvous runs over.
pub trait Channel: Read + Write + Send + 'static {
    /// Sends `bytes` with `fds` attached (none on a stream that cannot carry them).
    fn send_with_fds(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()>;
    /// Fills `buf`, taking any descriptors sent with it (at most `max_fds`).
    fn recv_with_fds(&mut self, buf: &mut [u8], max_fds: usize) -> io::Result<Vec<OwnedFd>>;
    /// Bounds every later read and write.
    fn set_timeouts(&self, t: Duration) -> io::Result<()>;
}

/// Where rank 0 waits for members.
pub trait Listen {
    type Conn: Channel;
    /// A connection waiting to be accepted, without blocking; its address for logs.
    fn try_accept(&self) -> io::Result<Option<(Self::Conn, String)>>;
}

impl Channel for TcpStream {
    fn send_with_fds(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if !fds.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a TCP connection cannot carry file descriptors",
            ));
        }
        self.write_all(bytes)
    }

    fn recv_with_fds(&mut self, buf: &mut [u8], _max_fds: usize) -> io::Result<Vec<OwnedFd>> {
        self.read_exact(buf).map(|()| Vec::new())
    }

    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        let t = Some(t.max(Duration::from_millis(1)));
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

impl Channel for UnixStream {
    fn send_with_fds(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let iov = [IoSlice::new(bytes)];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
        let sent = sendmsg::<()>(self.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
        self.write_all(&bytes[sent..])
    }

    fn recv_with_fds(&mut self, buf: &mut [u8], max_fds: usize) -> io::Result<Vec<OwnedFd>> {
        let mut got = 0;
        let mut fds = Vec::new();
        while got < buf.len() {
            let mut space = nix::cmsg_space!([RawFd; MAX_CARD_FDS]);
            let mut iov = [IoSliceMut::new(&mut buf[got..])];
            let msg = recvmsg::<()>(
                self.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )?;
            let n = msg.bytes;
            let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
            for c in msg.cmsgs()? {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    fds.extend(adopt_received_fds(raw));
                }
            }
            if truncated || fds.len() > max_fds {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "more file descriptors than announced",
                ));
            }
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            got += n;
        }
        Ok(fds)
    }

    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        let t = Some(t.max(Duration::from_millis(1)));
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

impl Listen for TcpListener {
    type Conn = TcpStream;
    fn try_accept(&self) -> io::Result<Option<(TcpStream, String)>> {
        self.set_nonblocking(true)?;
        match self.accept() {
            Ok((s, addr)) => {
                s.set_nonblocking(false)?;
                Ok(Some((s, addr.to_string())))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Listen for UnixListener {
    type Conn = UnixStream;
    fn try_accept(&self) -> io::Result<Option<(UnixStream, String)>> {
        self.set_nonblocking(true)?;
        match self.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                let who =
                    nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)
                        .map(|c| format!("pid {}", c.pid()))
                        .unwrap_or_else(|_| "a local process".into());
                Ok(Some((s, who)))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A digest of everything the group's nodes must agree on: the backend, the group size, and
/// every region with its grants.
pub fn layout_digest(cfg: &GroupConfig, backend: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"vsmp-layout-v2");
    h.update((backend.len() as u64).to_le_bytes());
    h.update(backend.as_bytes());
    h.update((cfg.nodes as u64).to_le_bytes());
    for r in &cfg.regions {
        h.update(r.id.0.to_le_bytes());
        h.update((r.len as u64).to_le_bytes());
        h.update((r.grants.len() as u64).to_le_bytes());
        for g in &r.grants {
            match g.peer {
                Some(p) => h.update([1, (p.0 & 0xff) as u8, (p.0 >> 8) as u8]),
                None => h.update([0, 0, 0]),
            }
            h.update(g.range.start.to_le_bytes());
            h.update(g.range.end.to_le_bytes());
        }
    }
    h.finalize().into()
}

/// A record's fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    rank: NodeId,
    nodes: u32,
    digest: [u8; 32],
    card_len: u32,
    fds: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(MAGIC);
        b[8..10].copy_from_slice(&self.rank.0.to_le_bytes());
        b[12..16].copy_from_slice(&self.nodes.to_le_bytes());
        b[16..48].copy_from_slice(&self.digest);
        b[48..52].copy_from_slice(&self.card_len.to_le_bytes());
        b[52..56].copy_from_slice(&self.fds.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_BYTES]) -> Result<Header, String> {
        if &b[0..8] != MAGIC {
            return Err("not a vsmp rendezvous record".into());
        }
        let word = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let h = Header {
            rank: NodeId(u16::from_le_bytes([b[8], b[9]])),
            nodes: word(12),
            digest: b[16..48].try_into().expect("32 bytes"),
            card_len: word(48),
            fds: word(52),
        };
        if h.card_len as usize > MAX_CARD_BYTES {
            return Err(format!(
                "a card of {} bytes (at most {MAX_CARD_BYTES})",
                h.card_len
            ));
        }
        if h.fds as usize > MAX_CARD_FDS {
            return Err(format!(
                "{} file descriptors (at most {MAX_CARD_FDS})",
                h.fds
            ));
        }
        if h.rank.0 as u32 >= h.nodes {
            return Err(format!("{} in a group of {}", h.rank, h.nodes));
        }
        Ok(h)
    }
}

fn send_record<C: Channel>(c: &mut C, header: Header, card: &Card) -> io::Result<()> {
    let fds: Vec<BorrowedFd<'_>> = card.fds.iter().map(|f| f.as_fd()).collect();
    c.send_with_fds(&header.encode(), &fds)?;
    c.write_all(&card.bytes)
}

fn recv_record<C: Channel>(c: &mut C, from: &str) -> Result<(Header, Card), FabricError> {
    let bad = |reason: String| FabricError::Protocol {
        peer: from.to_string(),
        reason,
    };
    let mut raw = [0u8; HEADER_BYTES];
    let fds = c
        .recv_with_fds(&mut raw, MAX_CARD_FDS)
        .map_err(|e| handshake(from, format!("reading its record: {e}")))?;
    let h = Header::decode(&raw).map_err(bad)?;
    if fds.len() != h.fds as usize {
        return Err(bad(format!(
            "{} file descriptors arrived, {} announced",
            fds.len(),
            h.fds
        )));
    }
    let mut bytes = vec![0u8; h.card_len as usize];
    c.read_exact(&mut bytes)
        .map_err(|e| handshake(from, format!("reading its card: {e}")))?;
    Ok((h, Card { bytes, fds }))
}

fn handshake(peer: &str, reason: String) -> FabricError {
    FabricError::Handshake {
        peer: peer.to_string(),
        reason,
    }
}

fn header_for(cfg: &GroupConfig, digest: [u8; 32], card: &Card) -> Result<Header, FabricError> {
    if card.bytes.len() > MAX_CARD_BYTES || card.fds.len() > MAX_CARD_FDS {
        return Err(FabricError::Config(format!(
            "a card of {} bytes and {} descriptors is too large",
            card.bytes.len(),
            card.fds.len()
        )));
    }
    Ok(Header {
        rank: cfg.rank,
        nodes: cfg.nodes as u32,
        digest,
        card_len: card.bytes.len() as u32,
        fds: card.fds.len() as u32,
    })
}

/// The group's table, and rank 0's connection to every member (`None` at rank 0 itself).
pub type Formed<C> = (Vec<Member>, Vec<Option<C>>);

/// Rank 0: admits every other rank through `listener`, sends every member the table, and
/// returns the table with rank 0's connection to each member (for backends that keep it).
pub fn form<L: Listen>(
    cfg: &GroupConfig,
    backend: &str,
    listener: &L,
    own: Card,
) -> Result<Formed<L::Conn>, FabricError> {
    cfg.validate()?;
    if cfg.rank != NodeId(0) {
        return Err(FabricError::Config(format!(
            "only rank 0 forms the group, not {}",
            cfg.rank
        )));
    }
    let deadline = Instant::now() + cfg.connect_timeout;
    let digest = layout_digest(cfg, backend);
    let nodes = cfg.nodes;
    let secret = cfg.secret.clone();
    let greet = move |mut c: L::Conn, addr: String| {
        let peer = auth::authenticate(&mut c, &secret, Role::Acceptor, NodeId(0), nodes)
            .map_err(|e| relabel(e, &addr))?;
        let label = format!("{addr} ({peer})");
        let (h, card) = recv_record(&mut c, &label)?;
        if h.rank != peer {
            return Err(FabricError::Protocol {
                peer: label,
                reason: format!("authenticated as {peer}, its record claims {}", h.rank),
            });
        }
        Ok((peer, c, (h, card)))
    };
    let mut cards: Vec<Option<Card>> = (0..nodes).map(|_| None).collect();
    let mut conns: Vec<Option<L::Conn>> = (0..nodes).map(|_| None).collect();
    let mut seen = vec![false; nodes];
    seen[0] = true;
    let admit = |peer: NodeId, c: &mut L::Conn, (h, _): &(Header, Card)| {
        let (verdict, reason) = if h.digest != digest || h.nodes as usize != nodes {
            (
                JOIN_LAYOUT_DIFFERS,
                "its backend, region layout or group size differs from rank 0's",
            )
        } else if seen[peer.index()] {
            (JOIN_RANK_TAKEN, "that rank already joined")
        } else {
            (JOIN_OK, "")
        };
        // Best effort: a refused joiner learns why; an admitted one that vanished now fails
        // the table send below.
        let _ = c.write_all(&[verdict]);
        if verdict != JOIN_OK {
            return Err(reason.to_string());
        }
        seen[peer.index()] = true;
        Ok(())
    };
    let admitted = accept_authenticated(listener, deadline, nodes - 1, greet, admit)?;
    cards[0] = Some(own);
    for (peer, c, (_, card)) in admitted {
        cards[peer.index()] = Some(card);
        conns[peer.index()] = Some(c);
    }
    let members: Vec<Member> = cards
        .into_iter()
        .enumerate()
        .map(|(r, card)| Member {
            rank: NodeId(r as u16),
            card: card.expect("every rank joined"),
        })
        .collect();
    for (rank, c) in conns.iter_mut().enumerate() {
        let Some(c) = c else { continue };
        c.set_timeouts(HANDSHAKE_TIMEOUT)
            .map_err(FabricError::io("setting the table's send timeout"))?;
        for m in &members {
            let h = Header {
                rank: m.rank,
                ..header_for(cfg, digest, &m.card)?
            };
            send_record(c, h, &m.card).map_err(FabricError::io(format!(
                "sending the group table to node {rank}"
            )))?;
        }
    }
    Ok((members, conns))
}

/// A joining rank: authenticates over `conn` (already connected to rank 0's listener, at
/// `label` for messages), sends `own`, and returns the whole table and the connection.
pub fn join<C: Channel>(
    cfg: &GroupConfig,
    backend: &str,
    mut conn: C,
    label: &str,
    own: Card,
) -> Result<(Vec<Member>, C), FabricError> {
    cfg.validate()?;
    let deadline = Instant::now() + cfg.connect_timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    conn.set_timeouts(left().min(HANDSHAKE_TIMEOUT))
        .map_err(FabricError::io("setting handshake timeouts"))?;
    let peer = auth::authenticate(&mut conn, &cfg.secret, Role::Joiner, cfg.rank, cfg.nodes)
        .map_err(|e| relabel(e, label))?;
    if peer != NodeId(0) {
        return Err(handshake(
            label,
            format!("the bootstrap address answered as {peer}, not node 0"),
        ));
    }
    let boot = format!("{label} (node 0)");
    let digest = layout_digest(cfg, backend);
    send_record(&mut conn, header_for(cfg, digest, &own)?, &own)
        .map_err(|e| handshake(&boot, format!("sending our record: {e}")))?;
    let mut verdict = [0u8; 1];
    conn.read_exact(&mut verdict)
        .map_err(|e| handshake(&boot, format!("waiting for rank 0's answer: {e}")))?;
    match verdict[0] {
        JOIN_OK => {}
        JOIN_RANK_TAKEN => {
            return Err(handshake(
                &boot,
                format!("rank 0 refused the join: {} already joined", cfg.rank),
            ));
        }
        JOIN_LAYOUT_DIFFERS => {
            return Err(handshake(
                &boot,
                "rank 0 refused the join: our backend, region layout or group size differs".into(),
            ));
        }
        other => return Err(handshake(&boot, format!("rank 0 answered {other}"))),
    }
    // Rank 0 sends the table once every rank joined: wait up to the deadline.
    conn.set_timeouts(left())
        .map_err(FabricError::io("setting the table's timeout"))?;
    let mut members = Vec::with_capacity(cfg.nodes);
    for q in 0..cfg.nodes {
        let (h, mut card) = recv_record(&mut conn, &boot)?;
        if h.rank.index() != q || h.digest != digest {
            return Err(FabricError::Protocol {
                peer: boot,
                reason: format!("table entry {q} is for {} or another layout", h.rank),
            });
        }
        if q == cfg.rank.index() {
            // Our own entry: keep what we sent (the descriptors came back as duplicates).
            card = Card {
                bytes: own.bytes.clone(),
                fds: card.fds,
            };
        }
        members.push(Member { rank: h.rank, card });
    }
    Ok((members, conn))
}

/// Names the address in a handshake error.
pub(crate) fn relabel(e: FabricError, label: &str) -> FabricError {
    match e {
        FabricError::Handshake { peer, reason } => FabricError::Handshake {
            peer: format!("{label} ({peer})"),
            reason,
        },
        other => other,
    }
}

/// A result of a handshake thread: the peer's rank, its connection and what else it sent.
type Greeted<C, T> = (NodeId, C, T);

/// Accepts until `needed` connections were authenticated and admitted, or the deadline.
/// `greet` runs on its own thread per connection; `admit` decides on the accepting thread (so
/// it may keep state) and may refuse with a reason, which is logged.
pub(crate) fn accept_authenticated<L, T, G, A>(
    listener: &L,
    deadline: Instant,
    needed: usize,
    greet: G,
    mut admit: A,
) -> Result<Vec<Greeted<L::Conn, T>>, FabricError>
where
    L: Listen,
    T: Send + 'static,
    G: Fn(L::Conn, String) -> Result<Greeted<L::Conn, T>, FabricError> + Send + Sync + 'static,
    A: FnMut(NodeId, &mut L::Conn, &T) -> Result<(), String>,
{
    let started = Instant::now();
    let greet = Arc::new(greet);
    type Outcome<C, T> = (String, Result<Greeted<C, T>, FabricError>);
    let (tx, rx) = mpsc::channel::<Outcome<L::Conn, T>>();
    let mut pending = 0usize;
    let mut admitted = Vec::with_capacity(needed);
    while admitted.len() < needed {
        let now = Instant::now();
        if now >= deadline {
            tracing::warn!("{} of {needed} peers joined in time", admitted.len());
            return Err(FabricError::Timeout {
                waiting_for: Waiting::Join,
                waited: started.elapsed(),
            });
        }
        match listener.try_accept() {
            Ok(Some((c, addr))) => {
                if pending >= MAX_PENDING_HANDSHAKES {
                    tracing::warn!(%addr, "refused a connection: {MAX_PENDING_HANDSHAKES} handshakes already in progress");
                } else if let Err(e) = c.set_timeouts(
                    deadline
                        .saturating_duration_since(now)
                        .min(HANDSHAKE_TIMEOUT),
                ) {
                    tracing::warn!(%addr, "dropped a connection: {e}");
                } else {
                    pending += 1;
                    let (tx, greet) = (tx.clone(), Arc::clone(&greet));
                    let spawned =
                        thread::Builder::new()
                            .name("fabric-auth".into())
                            .spawn(move || {
                                let r = greet(c, addr.clone());
                                let _ = tx.send((addr, r));
                            });
                    if let Err(e) = spawned {
                        pending -= 1;
                        tracing::warn!("dropped a connection: no thread for its handshake: {e}");
                    }
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("accepting a connection failed: {e}"),
        }
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok((addr, result)) => {
                pending -= 1;
                match result {
                    Ok((peer, mut c, extra)) => match admit(peer, &mut c, &extra) {
                        Ok(()) => admitted.push((peer, c, extra)),
                        Err(reason) => {
                            tracing::warn!(%addr, %peer, "refused an authenticated join: {reason}");
                        }
                    },
                    Err(e) => tracing::warn!(%addr, "refused a connection: {e}"),
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout | mpsc::RecvTimeoutError::Disconnected) => {}
        }
    }
    Ok(admitted)
}

/// Bytes an address takes in a card: family (4 or 6), 16 address bytes, port.
pub(crate) const ADDR_BYTES: usize = 1 + 16 + 2;

pub(crate) fn encode_addr(a: SocketAddr) -> [u8; ADDR_BYTES] {
    let mut b = [0u8; ADDR_BYTES];
    match a.ip() {
        IpAddr::V4(ip) => {
            b[0] = 4;
            b[1..5].copy_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            b[0] = 6;
            b[1..17].copy_from_slice(&ip.octets());
        }
    }
    b[17..19].copy_from_slice(&a.port().to_le_bytes());
    b
}

pub(crate) fn decode_addr(b: &[u8]) -> Option<SocketAddr> {
    if b.len() != ADDR_BYTES {
        return None;
    }
    let port = u16::from_le_bytes([b[17], b[18]]);
    let ip = match b[0] {
        4 => IpAddr::from([b[1], b[2], b[3], b[4]]),
        6 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[1..17]);
            IpAddr::from(o)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RegionId, RegionSpec, Secret};

    fn cfg(rank: u16, nodes: usize, secret: &Secret) -> GroupConfig {
        let mut c = GroupConfig::new(
            NodeId(rank),
            nodes,
            vec![RegionSpec::open(RegionId(1), 64)],
            "unused",
            secret.clone(),
        );
        c.connect_timeout = Duration::from_secs(10);
        c
    }

    #[test]
    fn addresses_round_trip_through_the_card_encoding() {
        for a in ["10.231.0.2:4000", "[::1]:65535", "127.0.0.1:1"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(decode_addr(&encode_addr(a)), Some(a));
        }
        assert_eq!(decode_addr(&[9; ADDR_BYTES]), None);
    }

    #[test]
    fn the_layout_digest_changes_with_any_region_the_size_or_the_backend() {
        let s = Secret::generate().unwrap();
        let a = cfg(0, 2, &s);
        let mut b = a.clone();
        b.regions[0].len = 128;
        let mut c = a.clone();
        c.nodes = 3;
        assert_ne!(layout_digest(&a, "tcp"), layout_digest(&b, "tcp"));
        assert_ne!(layout_digest(&a, "tcp"), layout_digest(&c, "tcp"));
        assert_ne!(layout_digest(&a, "tcp"), layout_digest(&a, "shm"));
        assert_eq!(layout_digest(&a, "tcp"), layout_digest(&a.clone(), "tcp"));
    }

    #[test]
    fn a_record_header_refuses_oversized_cards_and_ranks_outside_the_group() {
        let h = Header {
            rank: NodeId(1),
            nodes: 2,
            digest: [7; 32],
            card_len: 10,
            fds: 1,
        };
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        let big = Header {
            card_len: MAX_CARD_BYTES as u32 + 1,
            ..h
        };
        assert!(Header::decode(&big.encode()).is_err());
        let outside = Header {
            rank: NodeId(2),
            ..h
        };
        assert!(Header::decode(&outside.encode()).is_err());
        let mut junk = h.encode();
        junk[0] = b'X';
        assert!(Header::decode(&junk).is_err());
    }

    #[test]
    fn three_members_exchange_cards_and_descriptors_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("boot");
        let listener = UnixListener::bind(&path).unwrap();
        let secret = Secret::generate().unwrap();
        let joiners: Vec<_> = (1..3u16)
            .map(|r| {
                let (path, secret) = (path.clone(), secret.clone());
                thread::spawn(move || {
                    let conn = UnixStream::connect(&path).unwrap();
                    let file = crate::memory::memfd("card", 4096).unwrap();
                    let own = Card {
                        bytes: vec![r as u8; 3],
                        fds: vec![OwnedFd::from(file)],
                    };
                    join(&cfg(r, 3, &secret), "test", conn, "boot", own).map(|(m, _)| m)
                })
            })
            .collect();
        let (members, conns) =
            form(&cfg(0, 3, &secret), "test", &listener, Card::default()).unwrap();
        assert_eq!(members.len(), 3);
        assert!(conns[0].is_none() && conns[1].is_some());
        for j in joiners {
            let m = j.join().unwrap().unwrap();
            assert_eq!(m[2].card.bytes, vec![2; 3]);
            assert_eq!(m[1].card.fds.len(), 1);
            assert!(m[0].card.fds.is_empty());
        }
    }

    #[test]
    fn a_joiner_with_another_layout_is_refused_and_told_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("boot");
        let listener = UnixListener::bind(&path).unwrap();
        let secret = Secret::generate().unwrap();
        let s2 = secret.clone();
        let p2 = path.clone();
        let stranger = thread::spawn(move || {
            let conn = UnixStream::connect(&p2).unwrap();
            let mut c = cfg(1, 2, &s2);
            c.regions[0].len = 128;
            join(&c, "test", conn, "boot", Card::default())
        });
        let mut short = cfg(0, 2, &secret);
        short.connect_timeout = Duration::from_secs(2);
        assert!(matches!(
            form(&short, "test", &listener, Card::default()),
            Err(FabricError::Timeout { .. })
        ));
        let err = stranger.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("layout"), "{err}");
    }
}
