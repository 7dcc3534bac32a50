//! How a tcp group forms: rank 0's rendezvous, the peer table, and the full mesh.
//!
//! 1. Rank 0 listens on `GroupConfig::bootstrap`. Every other rank binds a data listener on the
//!    address it reaches rank 0 from (port chosen by the kernel), connects to rank 0 (retrying
//!    until `connect_timeout`, since rank 0 may start later), and authenticates
//!    ([`crate::auth`]); its rank is the one the handshake proved.
//! 2. The joiner sends a [`JOIN_INFO_BYTES`]-byte join record: a digest of the group's region
//!    layout and its data listener's address. Rank 0 refuses a joiner whose layout differs or
//!    whose rank already joined (one status byte, then it closes); a refused or failed
//!    handshake is logged with the address and does not take a rank's place.
//! 3. Once every rank joined, rank 0 sends each the peer table (rank -> data address).
//! 4. The mesh: the connection to rank 0 is the bootstrap connection itself; for every other
//!    pair the lower rank accepts and the higher rank connects, each connection authenticated
//!    again. Every wait is bounded by `connect_timeout`.
//!
//! Handshakes on an accepting side run on their own short-lived threads (at most
//! [`MAX_PENDING_HANDSHAKES`] at once), so a silent or slow stranger cannot stall the group.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::auth::{self, Role};
use crate::{FabricError, GroupConfig, NodeId};

/// Size of a joiner's record: layout digest, then its data address.
pub const JOIN_INFO_BYTES: usize = 32 + ADDR_BYTES;

/// An address on the wire: family (4 or 6), 16 address bytes, port.
const ADDR_BYTES: usize = 1 + 16 + 2;

/// Bound on handshakes in progress at an accepting node; more strangers are dropped at once.
pub const MAX_PENDING_HANDSHAKES: usize = 32;

/// Bound on one handshake, so a silent connection frees its slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between attempts to reach a node that is not listening yet.
const CONNECT_RETRY: Duration = Duration::from_millis(25);

/// Rank 0's answer to a join record.
const JOIN_OK: u8 = 0;
const JOIN_RANK_TAKEN: u8 = 1;
const JOIN_LAYOUT_DIFFERS: u8 = 2;

/// The authenticated connections of one node: `conns[p]` to peer `p`, `None` at its own rank.
#[derive(Debug)]
pub struct Mesh {
    pub conns: Vec<Option<TcpStream>>,
}

/// Rank 0's listener, bound before the group forms (so tests can bind port 0 and hand the
/// address to the others).
#[derive(Debug)]
pub struct Rendezvous {
    listener: TcpListener,
    addr: SocketAddr,
}

impl Rendezvous {
    /// Binds `cfg.bootstrap` (rank 0 only).
    pub fn bind(cfg: &GroupConfig) -> Result<Rendezvous, FabricError> {
        cfg.validate()?;
        if cfg.rank != NodeId(0) {
            return Err(FabricError::Config(format!(
                "only rank 0 listens for the group, not {}",
                cfg.rank
            )));
        }
        let listener = TcpListener::bind(&cfg.bootstrap).map_err(|source| FabricError::Io {
            op: format!("binding the bootstrap address {}", cfg.bootstrap),
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| FabricError::Io {
            op: "reading the bootstrap listener's address".into(),
            source,
        })?;
        Ok(Rendezvous { listener, addr })
    }

    /// The bound address (with the kernel's port when `:0` was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Admits every other rank, sends the peer table, and returns the mesh (rank 0's
    /// connections are the bootstrap connections).
    pub fn form_group(self, cfg: &GroupConfig) -> Result<Mesh, FabricError> {
        let deadline = Instant::now() + cfg.connect_timeout;
        let digest = layout_digest(cfg);
        let secret = cfg.secret.clone();
        let nodes = cfg.nodes;
        let handshake = move |mut s: TcpStream, addr: SocketAddr| {
            let peer = auth::authenticate(&mut s, &secret, Role::Acceptor, NodeId(0), nodes)
                .map_err(|e| at_addr(e, addr))?;
            let mut info = [0u8; JOIN_INFO_BYTES];
            s.read_exact(&mut info)
                .map_err(|e| FabricError::Handshake {
                    peer: format!("{addr} ({peer})"),
                    reason: format!("reading its join record: {e}"),
                })?;
            Ok((peer, s, info))
        };
        let mut table = vec![SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0); nodes];
        let mut joined: Vec<Option<TcpStream>> = (0..nodes).map(|_| None).collect();
        let mut seen = vec![false; nodes];
        let admit = |peer: NodeId, s: &mut TcpStream, info: &[u8; JOIN_INFO_BYTES]| {
            let taken = seen[usize::from(peer.0)];
            let (verdict, reason) = if info[..32] != digest[..] {
                (
                    JOIN_LAYOUT_DIFFERS,
                    "its region layout or group size differs from rank 0's",
                )
            } else if taken {
                (JOIN_RANK_TAKEN, "that rank already joined")
            } else {
                (JOIN_OK, "")
            };
            let addr = decode_addr(&info[32..]);
            let (verdict, reason) = if verdict == JOIN_OK && addr.is_none() {
                (JOIN_LAYOUT_DIFFERS, "its data address is malformed")
            } else {
                (verdict, reason)
            };
            // Best effort: a refused joiner learns why; an admitted one that vanished now will
            // fail the table send below.
            let _ = s.write_all(&[verdict]);
            if verdict != JOIN_OK {
                return Err(reason.to_string());
            }
            if let Some(a) = addr {
                table[usize::from(peer.0)] = a;
            }
            seen[usize::from(peer.0)] = true;
            Ok(())
        };
        let admitted = accept_authenticated(
            &self.listener,
            deadline,
            nodes - 1,
            "joins",
            handshake,
            admit,
        )?;
        for (peer, s, _) in admitted {
            joined[usize::from(peer.0)] = Some(s);
        }
        let mut wire_table = Vec::with_capacity(4 + nodes * ADDR_BYTES);
        wire_table.extend_from_slice(&(nodes as u32).to_le_bytes());
        for a in &table {
            wire_table.extend_from_slice(&encode_addr(*a));
        }
        for (rank, s) in joined.iter_mut().enumerate() {
            if let Some(s) = s {
                s.write_all(&wire_table).map_err(|source| FabricError::Io {
                    op: format!("sending the peer table to node {rank}"),
                    source,
                })?;
            }
        }
        Ok(Mesh { conns: joined })
    }
}

/// Joins the group as a rank other than 0 and builds this node's side of the mesh.
pub fn join(cfg: &GroupConfig) -> Result<Mesh, FabricError> {
    cfg.validate()?;
    let deadline = Instant::now() + cfg.connect_timeout;
    let me = cfg.rank;
    let mut boot = connect_retrying(&cfg.bootstrap, deadline)?;
    let local_ip = boot
        .local_addr()
        .map_err(|source| FabricError::Io {
            op: "reading the bootstrap connection's local address".into(),
            source,
        })?
        .ip();
    let data = TcpListener::bind((local_ip, 0)).map_err(|source| FabricError::Io {
        op: format!("binding a data listener on {local_ip}"),
        source,
    })?;
    let data_addr = data.local_addr().map_err(|source| FabricError::Io {
        op: "reading the data listener's address".into(),
        source,
    })?;
    set_timeouts(&boot, deadline)?;
    let boot_addr = cfg.bootstrap.clone();
    let peer = auth::authenticate(&mut boot, &cfg.secret, Role::Joiner, me, cfg.nodes)
        .map_err(|e| at_label(e, &boot_addr))?;
    if peer != NodeId(0) {
        return Err(FabricError::Handshake {
            peer: boot_addr,
            reason: format!("the bootstrap address answered as {peer}, not node 0"),
        });
    }
    let mut info = [0u8; JOIN_INFO_BYTES];
    info[..32].copy_from_slice(&layout_digest(cfg));
    info[32..].copy_from_slice(&encode_addr(data_addr));
    let handshake_err = |reason: String| FabricError::Handshake {
        peer: format!("{boot_addr} (node 0)"),
        reason,
    };
    boot.write_all(&info)
        .map_err(|e| handshake_err(format!("sending our join record: {e}")))?;
    let mut verdict = [0u8; 1];
    boot.read_exact(&mut verdict)
        .map_err(|e| handshake_err(format!("waiting for rank 0's answer: {e}")))?;
    match verdict[0] {
        JOIN_OK => {}
        JOIN_RANK_TAKEN => {
            return Err(handshake_err(format!(
                "rank 0 refused the join: {me} already joined"
            )));
        }
        JOIN_LAYOUT_DIFFERS => {
            return Err(handshake_err(
                "rank 0 refused the join: our region layout or group size differs".into(),
            ));
        }
        other => return Err(handshake_err(format!("rank 0 answered {other}"))),
    }
    // Rank 0 sends the table once every rank joined: wait up to the deadline.
    set_read_deadline(&boot, deadline)?;
    let mut count = [0u8; 4];
    boot.read_exact(&mut count)
        .map_err(|e| handshake_err(format!("waiting for the peer table: {e}")))?;
    if u32::from_le_bytes(count) as usize != cfg.nodes {
        return Err(handshake_err(format!(
            "the peer table has {} entries for a group of {}",
            u32::from_le_bytes(count),
            cfg.nodes
        )));
    }
    let mut raw = vec![0u8; cfg.nodes * ADDR_BYTES];
    boot.read_exact(&mut raw)
        .map_err(|e| handshake_err(format!("reading the peer table: {e}")))?;
    let table: Vec<Option<SocketAddr>> = raw.chunks_exact(ADDR_BYTES).map(decode_addr).collect();

    let mut conns: Vec<Option<TcpStream>> = (0..cfg.nodes).map(|_| None).collect();
    conns[0] = Some(boot);
    for lower in 1..usize::from(me.0) {
        let addr = table[lower].ok_or_else(|| {
            handshake_err(format!(
                "the peer table's entry for node {lower} is malformed"
            ))
        })?;
        let mut s = connect_retrying(&addr.to_string(), deadline)?;
        set_timeouts(&s, deadline)?;
        let got = auth::authenticate(&mut s, &cfg.secret, Role::Joiner, me, cfg.nodes)
            .map_err(|e| at_addr(e, addr))?;
        if usize::from(got.0) != lower {
            return Err(FabricError::Handshake {
                peer: addr.to_string(),
                reason: format!("expected node {lower} there, it proved to be {got}"),
            });
        }
        conns[lower] = Some(s);
    }
    let higher = cfg.nodes - 1 - usize::from(me.0);
    if higher > 0 {
        let secret = cfg.secret.clone();
        let nodes = cfg.nodes;
        let handshake = move |mut s: TcpStream, addr: SocketAddr| {
            let peer = auth::authenticate(&mut s, &secret, Role::Acceptor, me, nodes)
                .map_err(|e| at_addr(e, addr))?;
            Ok((peer, s, ()))
        };
        let mut seen = vec![false; cfg.nodes];
        let admit = |peer: NodeId, _: &mut TcpStream, _: &()| {
            let i = usize::from(peer.0);
            if peer <= me {
                return Err(format!(
                    "{peer} must not connect to {me} (the lower rank accepts)"
                ));
            }
            if std::mem::replace(&mut seen[i], true) {
                return Err(format!("{peer} is already connected"));
            }
            Ok(())
        };
        for (peer, s, ()) in
            accept_authenticated(&data, deadline, higher, "mesh", handshake, admit)?
        {
            conns[usize::from(peer.0)] = Some(s);
        }
    }
    Ok(Mesh { conns })
}

/// A result of a handshake thread: the peer's rank, its stream and what else it sent.
type Handshaken<T> = (NodeId, TcpStream, T);

/// Accepts until `needed` connections were authenticated and admitted, or the deadline.
/// `handshake` runs on its own thread per connection; `admit` decides on the accepting
/// thread (so it may keep state) and may refuse with a reason, which is logged.
fn accept_authenticated<T, H, A>(
    listener: &TcpListener,
    deadline: Instant,
    needed: usize,
    what: &str,
    handshake: H,
    mut admit: A,
) -> Result<Vec<Handshaken<T>>, FabricError>
where
    T: Send + 'static,
    H: Fn(TcpStream, SocketAddr) -> Result<Handshaken<T>, FabricError> + Send + Sync + 'static,
    A: FnMut(NodeId, &mut TcpStream, &T) -> Result<(), String>,
{
    let started = Instant::now();
    let handshake = Arc::new(handshake);
    let (tx, rx) = mpsc::channel::<(SocketAddr, Result<Handshaken<T>, FabricError>)>();
    let mut pending = 0usize;
    let mut admitted = Vec::with_capacity(needed);
    listener
        .set_nonblocking(true)
        .map_err(|source| FabricError::Io {
            op: "making the listener non-blocking".into(),
            source,
        })?;
    while admitted.len() < needed {
        let now = Instant::now();
        if now >= deadline {
            return Err(FabricError::Timeout {
                what: format!("{what}: {} of {needed} peers joined", admitted.len()),
                waited: started.elapsed(),
            });
        }
        match listener.accept() {
            Ok((s, addr)) => {
                if pending >= MAX_PENDING_HANDSHAKES {
                    tracing::warn!(%addr, "refused a connection: {MAX_PENDING_HANDSHAKES} handshakes already in progress");
                    continue;
                }
                let budget = deadline
                    .saturating_duration_since(now)
                    .min(HANDSHAKE_TIMEOUT);
                let ready = s
                    .set_nonblocking(false)
                    .and_then(|()| s.set_read_timeout(Some(budget.max(Duration::from_millis(1)))))
                    .and_then(|()| s.set_write_timeout(Some(budget.max(Duration::from_millis(1)))));
                if let Err(e) = ready {
                    tracing::warn!(%addr, "dropped a connection: {e}");
                    continue;
                }
                pending += 1;
                let (tx, handshake) = (tx.clone(), handshake.clone());
                let spawned = thread::Builder::new()
                    .name("fabric-auth".into())
                    .spawn(move || {
                        let r = handshake(s, addr);
                        let _ = tx.send((addr, r));
                    });
                if let Err(e) = spawned {
                    pending -= 1;
                    tracing::warn!(%addr, "dropped a connection: no thread for its handshake: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => tracing::warn!("accepting a connection failed: {e}"),
        }
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok((addr, result)) => {
                pending -= 1;
                match result {
                    Ok((peer, mut s, extra)) => match admit(peer, &mut s, &extra) {
                        Ok(()) => admitted.push((peer, s, extra)),
                        Err(reason) => {
                            tracing::warn!(%addr, %peer, "refused an authenticated {what} connection: {reason}");
                        }
                    },
                    Err(e) => tracing::warn!(%addr, "refused a {what} connection: {e}"),
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
    }
    Ok(admitted)
}

/// Connects to `addr`, retrying while nobody listens there yet, until `deadline`.
pub fn connect_retrying(addr: &str, deadline: Instant) -> Result<TcpStream, FabricError> {
    loop {
        let last = match addr.to_socket_addrs() {
            Ok(addrs) => {
                let mut last = None;
                for a in addrs {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match TcpStream::connect_timeout(&a, left.max(Duration::from_millis(1))) {
                        Ok(s) => return Ok(s),
                        Err(e) => last = Some(e),
                    }
                }
                last
            }
            Err(e) => Some(e),
        };
        if Instant::now() + CONNECT_RETRY >= deadline {
            return Err(FabricError::Io {
                op: format!("connecting to {addr} (retried until the connect timeout)"),
                source: last.unwrap_or_else(|| std::io::Error::other("no address")),
            });
        }
        thread::sleep(CONNECT_RETRY);
    }
}

/// A digest of everything the group's nodes must agree on: the group size and every region
/// with its grants.
pub fn layout_digest(cfg: &GroupConfig) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"vsmp-layout-v1");
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

fn encode_addr(a: SocketAddr) -> [u8; ADDR_BYTES] {
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

fn decode_addr(b: &[u8]) -> Option<SocketAddr> {
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

fn set_timeouts(s: &TcpStream, deadline: Instant) -> Result<(), FabricError> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .min(HANDSHAKE_TIMEOUT)
        .max(Duration::from_millis(1));
    s.set_read_timeout(Some(left))
        .and_then(|()| s.set_write_timeout(Some(left)))
        .map_err(|source| FabricError::Io {
            op: "setting handshake timeouts".into(),
            source,
        })
}

fn set_read_deadline(s: &TcpStream, deadline: Instant) -> Result<(), FabricError> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    s.set_read_timeout(Some(left))
        .map_err(|source| FabricError::Io {
            op: "setting the peer-table timeout".into(),
            source,
        })
}

fn at_addr(e: FabricError, addr: SocketAddr) -> FabricError {
    at_label(e, &addr.to_string())
}

fn at_label(e: FabricError, label: &str) -> FabricError {
    match e {
        FabricError::Handshake { peer, reason } => FabricError::Handshake {
            peer: format!("{label} ({peer})"),
            reason,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RegionId, RegionSpec, Secret};

    #[test]
    fn addresses_round_trip_through_the_peer_table_encoding() {
        for a in ["10.231.0.2:4000", "[::1]:65535", "127.0.0.1:1"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(decode_addr(&encode_addr(a)), Some(a));
        }
        assert_eq!(decode_addr(&[9; ADDR_BYTES]), None);
    }

    #[test]
    fn the_layout_digest_changes_with_any_region_or_the_group_size() {
        let s = Secret::from_bytes(b"0123456789abcdef".to_vec()).unwrap();
        let a = GroupConfig::new(
            NodeId(0),
            2,
            vec![RegionSpec::open(RegionId(1), 64)],
            "x",
            s,
        );
        let mut b = a.clone();
        b.regions[0].len = 128;
        let mut c = a.clone();
        c.nodes = 3;
        assert_ne!(layout_digest(&a), layout_digest(&b));
        assert_ne!(layout_digest(&a), layout_digest(&c));
        assert_eq!(layout_digest(&a), layout_digest(&a.clone()));
    }
}
