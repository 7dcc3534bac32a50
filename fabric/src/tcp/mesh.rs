//! How a tcp group connects: the rendezvous (`crate::rendezvous`) with each joiner's data
//! address on its card, then the full mesh.
//!
//! Every rank but 0 binds a data listener on the address it reaches rank 0 from (port chosen
//! by the kernel) and puts it on its card. The connection to rank 0 is the rendezvous
//! connection itself; for every other pair the lower rank accepts and the higher rank
//! connects, each connection authenticated again. Every wait is bounded by
//! `connect_timeout`.
#![forbid(unsafe_code)]

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::thread;
use std::time::{Duration, Instant};

use crate::auth::{self, Role};
use crate::rendezvous::{self, CONNECT_RETRY, Card, Member};
use crate::{FabricError, GroupConfig, NodeId};

/// The name this backend gives the rendezvous (nodes of other backends cannot join).
pub(crate) const BACKEND: &str = "tcp";

/// The authenticated connections of one node: `conns[p]` to peer `p`, `None` at its own rank.
#[derive(Debug)]
pub(crate) struct Mesh {
    pub conns: Vec<Option<TcpStream>>,
}

/// Rank 0's side: admits everyone on `listener`; its mesh is the rendezvous connections.
pub(crate) fn form(cfg: &GroupConfig, listener: &TcpListener) -> Result<Mesh, FabricError> {
    let (_, conns) = rendezvous::form(cfg, BACKEND, listener, Card::default())?;
    Ok(Mesh { conns })
}

/// A joiner's side: the rendezvous, then connections to every lower rank and from every
/// higher one.
pub(crate) fn join(cfg: &GroupConfig) -> Result<Mesh, FabricError> {
    cfg.validate()?;
    let deadline = Instant::now() + cfg.connect_timeout;
    let me = cfg.rank;
    let boot = connect_retrying(&cfg.bootstrap, deadline)?;
    let local_ip = boot
        .local_addr()
        .map_err(FabricError::io(
            "reading the bootstrap connection's local address",
        ))?
        .ip();
    let data = TcpListener::bind((local_ip, 0)).map_err(FabricError::io(format!(
        "binding a data listener on {local_ip}"
    )))?;
    let data_addr = data
        .local_addr()
        .map_err(FabricError::io("reading the data listener's address"))?;
    let card = Card {
        bytes: rendezvous::encode_addr(data_addr).to_vec(),
        fds: Vec::new(),
    };
    let (members, boot) = rendezvous::join(cfg, BACKEND, boot, &cfg.bootstrap, card)?;
    let table = addresses(&members)?;
    let handshake_err = |peer: String, reason: String| FabricError::Handshake { peer, reason };

    let mut conns: Vec<Option<TcpStream>> = (0..cfg.nodes).map(|_| None).collect();
    conns[0] = Some(boot);
    for (lower, addr) in table.iter().enumerate().take(me.index()).skip(1) {
        let addr = addr.ok_or_else(|| {
            handshake_err(
                cfg.bootstrap.clone(),
                format!("the table's address for node {lower} is malformed"),
            )
        })?;
        let mut s = connect_retrying(&addr.to_string(), deadline)?;
        rendezvous::Channel::set_timeouts(&s, rendezvous::HANDSHAKE_TIMEOUT)
            .map_err(FabricError::io("setting handshake timeouts"))?;
        let got = auth::authenticate(&mut s, &cfg.secret, Role::Joiner, me, cfg.nodes)
            .map_err(|e| rendezvous::relabel(e, &addr.to_string()))?;
        if got.index() != lower {
            return Err(handshake_err(
                addr.to_string(),
                format!("expected node {lower} there, it proved to be {got}"),
            ));
        }
        conns[lower] = Some(s);
    }
    let higher = cfg.nodes - 1 - me.index();
    if higher > 0 {
        let secret = cfg.secret.clone();
        let nodes = cfg.nodes;
        let greet = move |mut s: TcpStream, addr: String| {
            let peer = auth::authenticate(&mut s, &secret, Role::Acceptor, me, nodes)
                .map_err(|e| rendezvous::relabel(e, &addr))?;
            Ok((peer, s, ()))
        };
        let mut seen = vec![false; cfg.nodes];
        let admit = |peer: NodeId, _: &mut TcpStream, _: &()| {
            if peer <= me {
                return Err(format!(
                    "{peer} must not connect to {me} (the lower rank accepts)"
                ));
            }
            if std::mem::replace(&mut seen[peer.index()], true) {
                return Err(format!("{peer} is already connected"));
            }
            Ok(())
        };
        for (peer, s, ()) in
            rendezvous::accept_authenticated(&data, deadline, higher, greet, admit)?
        {
            conns[peer.index()] = Some(s);
        }
    }
    for s in conns.iter().flatten() {
        // The handshakes' timeouts must not linger on the data path.
        s.set_read_timeout(None)
            .map_err(FabricError::io("clearing the handshake timeouts"))?;
    }
    Ok(Mesh { conns })
}

/// Every member's data address (rank 0 has none: its connections are the rendezvous ones).
fn addresses(members: &[Member]) -> Result<Vec<Option<SocketAddr>>, FabricError> {
    members
        .iter()
        .map(|m| {
            if m.rank == NodeId(0) {
                return Ok(None);
            }
            rendezvous::decode_addr(&m.card.bytes)
                .map(Some)
                .ok_or_else(|| FabricError::Protocol {
                    peer: m.rank.to_string(),
                    reason: "its card holds no valid data address".into(),
                })
        })
        .collect()
}

/// Connects to `addr`, retrying while nobody listens there yet, until `deadline`.
pub(crate) fn connect_retrying(addr: &str, deadline: Instant) -> Result<TcpStream, FabricError> {
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
