//! Mutual challenge-response authentication of a connection between two group members.
//!
//! Every connection a fabric accepts or opens (the bootstrap join, each mesh link, the shm
//! control socket) starts with this handshake, so nobody without the group's [`Secret`] can
//! write into a node's memory. It works over any `Read + Write` byte stream.
//!
//! # Protocol (version [`AUTH_VERSION`], every message of fixed size)
//! 1. Both sides send a [`HELLO_BYTES`]-byte hello: magic `VSMPAUTH`, version, role, the
//!    sender's claimed rank, the group size, and 32 fresh random bytes (the nonce).
//! 2. The joiner checks the acceptor's hello (version, opposite role, group size, rank in
//!    range and not its own), then sends a verdict byte (a refusal reason code, so the
//!    acceptor can say why) and its proof: `HMAC-SHA256(secret, CONTEXT || role ||
//!    acceptor nonce || joiner nonce || rank || group size)` with its own role and rank.
//! 3. The acceptor checks the joiner's hello the same way and verifies its proof in constant
//!    time (`hmac`'s `verify_slice`). It answers a verdict byte and, when it accepts, its own
//!    proof (the same MAC with its role and rank); when it refuses, a reason code instead, so
//!    the joiner can say why.
//! 4. The joiner verifies the acceptor's proof and sends a final verdict byte, so that both
//!    sides return `Ok` only when both proofs verified.
//!
//! The joiner proves itself first, so an unauthenticated party never obtains a MAC computed
//! by the acceptor over a nonce it chose. Both nonces are in every MAC, so neither a replayed
//! nor a reflected proof verifies; the role byte stops the acceptor's proof from being
//! replayed as a joiner's.
//!
//! # Bounds
//! Every message has a fixed size, so nothing is allocated from a length the peer sent. The
//! handshake never waits on its own: set a read and write timeout on the socket before calling
//! [`authenticate`] (`TcpStream::set_read_timeout`, `UnixStream::set_read_timeout`); a
//! timeout becomes a [`FabricError::Handshake`] saying which message was awaited.

#![forbid(unsafe_code)]

use std::io::{self, Read, Write};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::{FabricError, NodeId, Secret};

/// Version of the handshake; both sides must speak the same.
pub const AUTH_VERSION: u16 = 1;

/// Size of the hello each side sends first.
pub const HELLO_BYTES: usize = 8 + 2 + 1 + 1 + 2 + 4 + NONCE_BYTES;

/// Size of a proof (an HMAC-SHA256 tag).
pub const PROOF_BYTES: usize = 32;

/// Size of each side's random challenge.
pub const NONCE_BYTES: usize = 32;

const MAGIC: &[u8; 8] = b"VSMPAUTH";

/// Domain separation: a MAC made for this handshake is useless anywhere else.
const CONTEXT: &[u8] = b"vsmp-fabric-auth-v1\0";

type HmacSha256 = Hmac<Sha256>;

/// Which end of the connection this side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that accepted the connection (listened).
    Acceptor,
    /// The side that opened the connection.
    Joiner,
}

impl Role {
    fn code(self) -> u8 {
        match self {
            Role::Acceptor => 1,
            Role::Joiner => 2,
        }
    }

    fn opposite(self) -> Role {
        match self {
            Role::Acceptor => Role::Joiner,
            Role::Joiner => Role::Acceptor,
        }
    }
}

/// Why the acceptor refused, sent to the joiner as one byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Accepted = 0,
    BadProof = 1,
    BadVersion = 2,
    SizeMismatch = 3,
    BadRank = 4,
    BadHello = 5,
}

impl Verdict {
    fn from_code(code: u8) -> Option<Verdict> {
        Some(match code {
            0 => Verdict::Accepted,
            1 => Verdict::BadProof,
            2 => Verdict::BadVersion,
            3 => Verdict::SizeMismatch,
            4 => Verdict::BadRank,
            5 => Verdict::BadHello,
            _ => return None,
        })
    }

    fn describe(self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::BadProof => "wrong secret or tampered handshake",
            Verdict::BadVersion => "protocol version mismatch",
            Verdict::SizeMismatch => "group size mismatch",
            Verdict::BadRank => "rank out of range",
            Verdict::BadHello => "malformed hello",
        }
    }
}

/// A parsed hello.
#[derive(Debug, Clone, Copy)]
struct Hello {
    version: u16,
    role: u8,
    rank: u16,
    nodes: u32,
    nonce: [u8; NONCE_BYTES],
}

impl Hello {
    fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut b = [0u8; HELLO_BYTES];
        b[0..8].copy_from_slice(MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10] = self.role;
        b[11] = 0;
        b[12..14].copy_from_slice(&self.rank.to_le_bytes());
        b[14..18].copy_from_slice(&self.nodes.to_le_bytes());
        b[18..].copy_from_slice(&self.nonce);
        b
    }

    /// Parses the fixed layout; `None` when the magic is wrong.
    fn decode(b: &[u8; HELLO_BYTES]) -> Option<Hello> {
        if &b[0..8] != MAGIC {
            return None;
        }
        let mut nonce = [0u8; NONCE_BYTES];
        nonce.copy_from_slice(&b[18..]);
        Some(Hello {
            version: u16::from_le_bytes([b[8], b[9]]),
            role: b[10],
            rank: u16::from_le_bytes([b[12], b[13]]),
            nodes: u32::from_le_bytes([b[14], b[15], b[16], b[17]]),
            nonce,
        })
    }
}

/// Authenticates the peer at the other end of `stream` and proves this side to it.
///
/// `my_rank` and `nodes` are this node's; the peer must claim the same group size and a rank
/// inside it other than `my_rank`. Returns the peer's authenticated rank. Every failure is a
/// [`FabricError::Handshake`] whose reason says what went wrong (wrong secret or tampered
/// handshake, rank out of range, group size mismatch, protocol version mismatch, peer closed,
/// timed out). Set socket timeouts first: this function does not bound its own waits.
pub fn authenticate<S: Read + Write>(
    stream: &mut S,
    secret: &Secret,
    role: Role,
    my_rank: NodeId,
    nodes: usize,
) -> Result<NodeId, FabricError> {
    let nodes_u32 = u32::try_from(nodes)
        .ok()
        .filter(|n| *n > 0 && usize::from(my_rank.0) < nodes)
        .ok_or_else(|| {
            FabricError::Config(format!(
                "cannot authenticate as rank {} of a group of {nodes} nodes",
                my_rank.0
            ))
        })?;
    let mut nonce = [0u8; NONCE_BYTES];
    rand::rngs::OsRng
        .try_fill_bytes(&mut nonce)
        .map_err(|e| FabricError::Io {
            op: "drawing a handshake nonce from the OS".into(),
            source: io::Error::other(e.to_string()),
        })?;
    let mine = Hello {
        version: AUTH_VERSION,
        role: role.code(),
        rank: my_rank.0,
        nodes: nodes_u32,
        nonce,
    };
    send(stream, &mine.encode(), "hello")?;
    let mut raw = [0u8; HELLO_BYTES];
    recv(stream, &mut raw, "hello")?;
    let theirs = Hello::decode(&raw);
    let checked = check_hello(theirs.as_ref(), role, my_rank, nodes_u32);
    match role {
        Role::Joiner => joiner(stream, secret, &mine, checked),
        Role::Acceptor => acceptor(stream, secret, &mine, checked),
    }
}

/// The joiner's half after the hellos were exchanged.
fn joiner<S: Read + Write>(
    stream: &mut S,
    secret: &Secret,
    mine: &Hello,
    checked: Result<Hello, Verdict>,
) -> Result<NodeId, FabricError> {
    let theirs = match checked {
        Ok(h) => h,
        Err(v) => {
            // Tell the acceptor why, best effort: we are failing anyway.
            let _ = stream.write_all(&refusal(v));
            return Err(refused(v.describe(), None));
        }
    };
    let peer = NodeId(theirs.rank);
    let (acc_nonce, join_nonce) = (&theirs.nonce, &mine.nonce);
    let mut proof = [0u8; 1 + PROOF_BYTES];
    proof[0] = Verdict::Accepted as u8;
    let own = mac(
        secret,
        Role::Joiner,
        acc_nonce,
        join_nonce,
        mine.rank,
        mine.nodes,
    );
    proof[1..].copy_from_slice(&own.finalize().into_bytes());
    send(stream, &proof, "proof")?;
    let mut answer = [0u8; 1 + PROOF_BYTES];
    recv(stream, &mut answer, "verdict")?;
    match Verdict::from_code(answer[0]) {
        Some(Verdict::Accepted) => {}
        Some(v) => {
            return Err(refused(
                &format!("the acceptor refused us: {}", v.describe()),
                Some(peer),
            ));
        }
        None => return Err(refused("the acceptor sent an unknown verdict", Some(peer))),
    }
    let verified = mac(
        secret,
        Role::Acceptor,
        acc_nonce,
        join_nonce,
        theirs.rank,
        theirs.nodes,
    )
    .verify_slice(&answer[1..]);
    if verified.is_err() {
        // Tell the acceptor, best effort: we are failing anyway.
        let _ = stream.write_all(&[Verdict::BadProof as u8]);
        return Err(refused(Verdict::BadProof.describe(), Some(peer)));
    }
    send(stream, &[Verdict::Accepted as u8], "final verdict")?;
    Ok(peer)
}

/// The acceptor's half after the hellos were exchanged.
fn acceptor<S: Read + Write>(
    stream: &mut S,
    secret: &Secret,
    mine: &Hello,
    checked: Result<Hello, Verdict>,
) -> Result<NodeId, FabricError> {
    // Read the proof even when the hello was refused, so that closing the socket does not
    // reset it with unread data and lose the verdict on its way to the joiner.
    let mut proof = [0u8; 1 + PROOF_BYTES];
    recv(stream, &mut proof, "proof")?;
    let theirs = match checked {
        Ok(h) => h,
        Err(v) => {
            let _ = stream.write_all(&refusal(v));
            return Err(refused(v.describe(), None));
        }
    };
    match Verdict::from_code(proof[0]) {
        Some(Verdict::Accepted) => {}
        Some(v) => {
            return Err(refused(
                &format!("the joiner refused us: {}", v.describe()),
                Some(NodeId(theirs.rank)),
            ));
        }
        None => {
            return Err(refused(
                "the joiner sent an unknown verdict",
                Some(NodeId(theirs.rank)),
            ));
        }
    }
    let peer = NodeId(theirs.rank);
    let (acc_nonce, join_nonce) = (&mine.nonce, &theirs.nonce);
    let verified = mac(
        secret,
        Role::Joiner,
        acc_nonce,
        join_nonce,
        theirs.rank,
        theirs.nodes,
    )
    .verify_slice(&proof[1..]);
    if verified.is_err() {
        let _ = stream.write_all(&refusal(Verdict::BadProof));
        return Err(refused(Verdict::BadProof.describe(), Some(peer)));
    }
    let mut answer = [0u8; 1 + PROOF_BYTES];
    answer[0] = Verdict::Accepted as u8;
    let own = mac(
        secret,
        Role::Acceptor,
        acc_nonce,
        join_nonce,
        mine.rank,
        mine.nodes,
    );
    answer[1..].copy_from_slice(&own.finalize().into_bytes());
    send(stream, &answer, "verdict")?;
    let mut last = [0u8; 1];
    recv(stream, &mut last, "final verdict")?;
    match Verdict::from_code(last[0]) {
        Some(Verdict::Accepted) => Ok(peer),
        Some(v) => Err(refused(
            &format!("the joiner refused us: {}", v.describe()),
            Some(peer),
        )),
        None => Err(refused("the joiner sent an unknown verdict", Some(peer))),
    }
}

/// Checks a peer's hello against this side's expectations.
fn check_hello(
    h: Option<&Hello>,
    role: Role,
    my_rank: NodeId,
    nodes: u32,
) -> Result<Hello, Verdict> {
    let h = h.ok_or(Verdict::BadHello)?;
    if h.version != AUTH_VERSION {
        return Err(Verdict::BadVersion);
    }
    if h.role != role.opposite().code() {
        return Err(Verdict::BadHello);
    }
    if h.nodes != nodes {
        return Err(Verdict::SizeMismatch);
    }
    if u32::from(h.rank) >= nodes || h.rank == my_rank.0 {
        return Err(Verdict::BadRank);
    }
    Ok(*h)
}

fn refusal(v: Verdict) -> [u8; 1 + PROOF_BYTES] {
    let mut b = [0u8; 1 + PROOF_BYTES];
    b[0] = v as u8;
    b
}

/// The keyed MAC a `prover` presents, fed with everything both sides agreed on.
fn mac(
    secret: &Secret,
    prover: Role,
    acceptor_nonce: &[u8; NONCE_BYTES],
    joiner_nonce: &[u8; NONCE_BYTES],
    prover_rank: u16,
    nodes: u32,
) -> HmacSha256 {
    // HMAC takes keys of any length, so this cannot fail.
    let mut m = <HmacSha256 as Mac>::new_from_slice(secret.expose())
        .expect("HMAC-SHA256 accepts a key of any length");
    m.update(CONTEXT);
    m.update(&[prover.code()]);
    m.update(acceptor_nonce);
    m.update(joiner_nonce);
    m.update(&prover_rank.to_le_bytes());
    m.update(&nodes.to_le_bytes());
    m
}

fn refused(reason: &str, peer: Option<NodeId>) -> FabricError {
    FabricError::Handshake {
        peer: peer_label(peer),
        reason: reason.to_string(),
    }
}

fn peer_label(peer: Option<NodeId>) -> String {
    match peer {
        Some(p) => format!("peer claiming to be {p}"),
        None => "peer".to_string(),
    }
}

fn send<S: Write>(stream: &mut S, bytes: &[u8], what: &str) -> Result<(), FabricError> {
    stream
        .write_all(bytes)
        .and_then(|()| stream.flush())
        .map_err(|e| io_failure(&e, &format!("sending our {what}")))
}

fn recv<S: Read>(stream: &mut S, buf: &mut [u8], what: &str) -> Result<(), FabricError> {
    stream
        .read_exact(buf)
        .map_err(|e| io_failure(&e, &format!("waiting for the peer's {what}")))
}

fn io_failure(e: &io::Error, doing: &str) -> FabricError {
    let reason = match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted => {
            format!("the peer closed the connection while {doing}")
        }
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!("timed out {doing}"),
        _ => format!("{doing}: {e}"),
    };
    FabricError::Handshake {
        peer: "peer".into(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::thread;
    use std::time::Duration;

    fn secret(s: &str) -> Secret {
        Secret::from_bytes(s.as_bytes().to_vec()).unwrap()
    }

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        (a, b)
    }

    /// Runs an acceptor (rank `acc_rank`) and a joiner (rank `join_rank`) against each other.
    fn run(
        acc_secret: Secret,
        join_secret: Secret,
        acc: (u16, usize),
        join: (u16, usize),
    ) -> (Result<NodeId, FabricError>, Result<NodeId, FabricError>) {
        let (mut a, mut b) = pair();
        let t = thread::spawn(move || {
            authenticate(&mut a, &acc_secret, Role::Acceptor, NodeId(acc.0), acc.1)
        });
        let j = authenticate(&mut b, &join_secret, Role::Joiner, NodeId(join.0), join.1);
        (t.join().unwrap(), j)
    }

    fn reason(r: Result<NodeId, FabricError>) -> String {
        match r {
            Err(FabricError::Handshake { reason, .. }) => reason,
            other => panic!("expected a handshake error, got {other:?}"),
        }
    }

    #[test]
    fn the_right_secret_authenticates_both_sides_and_names_the_peer() {
        let s = secret("0123456789abcdef");
        let (a, j) = run(s.clone(), s, (0, 4), (3, 4));
        assert_eq!(a.unwrap(), NodeId(3));
        assert_eq!(j.unwrap(), NodeId(0));
    }

    #[test]
    fn a_wrong_secret_is_refused_on_both_sides() {
        let (a, j) = run(
            secret("0123456789abcdef"),
            secret("fedcba9876543210"),
            (0, 2),
            (1, 2),
        );
        assert!(reason(a).contains("wrong secret"));
        assert!(reason(j).contains("wrong secret"));
    }

    #[test]
    fn a_group_size_mismatch_is_refused_on_both_sides() {
        let s = secret("0123456789abcdef");
        let (a, j) = run(s.clone(), s, (0, 2), (1, 3));
        assert!(reason(a).contains("group size mismatch"));
        assert!(reason(j).contains("group size mismatch"));
    }

    #[test]
    fn a_peer_claiming_our_own_rank_is_refused() {
        let s = secret("0123456789abcdef");
        let (a, j) = run(s.clone(), s, (1, 3), (1, 3));
        assert!(reason(a).contains("rank out of range"));
        assert!(reason(j).contains("rank out of range"));
    }

    #[test]
    fn garbage_instead_of_a_hello_is_refused() {
        let (mut a, mut b) = pair();
        let t = thread::spawn(move || {
            let s = secret("0123456789abcdef");
            authenticate(&mut a, &s, Role::Acceptor, NodeId(0), 2)
        });
        b.write_all(&[0x5a; HELLO_BYTES + 1 + PROOF_BYTES]).unwrap();
        let err = reason(t.join().unwrap());
        assert!(err.contains("malformed hello"), "{err}");
    }

    #[test]
    fn a_truncated_hello_is_refused_as_a_closed_connection() {
        let (mut a, mut b) = pair();
        let t = thread::spawn(move || {
            let s = secret("0123456789abcdef");
            authenticate(&mut a, &s, Role::Acceptor, NodeId(0), 2)
        });
        b.write_all(&MAGIC[..]).unwrap();
        b.shutdown(std::net::Shutdown::Write).unwrap();
        let err = reason(t.join().unwrap());
        assert!(err.contains("closed"), "{err}");
    }

    #[test]
    fn a_protocol_version_mismatch_is_refused() {
        let (mut a, mut b) = pair();
        let t = thread::spawn(move || {
            let s = secret("0123456789abcdef");
            authenticate(&mut a, &s, Role::Acceptor, NodeId(0), 2)
        });
        let hello = Hello {
            version: AUTH_VERSION + 1,
            role: Role::Joiner.code(),
            rank: 1,
            nodes: 2,
            nonce: [7; NONCE_BYTES],
        };
        b.write_all(&hello.encode()).unwrap();
        b.write_all(&[0; 1 + PROOF_BYTES]).unwrap();
        let err = reason(t.join().unwrap());
        assert!(err.contains("version mismatch"), "{err}");
        let mut verdict = [0u8; HELLO_BYTES + 1];
        b.read_exact(&mut verdict).unwrap();
        assert_eq!(verdict[HELLO_BYTES], Verdict::BadVersion as u8);
    }

    #[test]
    fn a_replayed_proof_from_another_session_is_refused() {
        // Record a joiner proof made for one acceptor nonce, replay it against a fresh one.
        let s = secret("0123456789abcdef");
        let old = mac(&s, Role::Joiner, &[1; 32], &[2; 32], 1, 2)
            .finalize()
            .into_bytes();
        let (mut a, mut b) = pair();
        let t = thread::spawn(move || authenticate(&mut a, &s, Role::Acceptor, NodeId(0), 2));
        let hello = Hello {
            version: AUTH_VERSION,
            role: Role::Joiner.code(),
            rank: 1,
            nodes: 2,
            nonce: [2; NONCE_BYTES],
        };
        b.write_all(&hello.encode()).unwrap();
        b.write_all(&[Verdict::Accepted as u8]).unwrap();
        b.write_all(&old).unwrap();
        assert!(reason(t.join().unwrap()).contains("wrong secret"));
    }

    #[test]
    fn a_silent_peer_times_out_instead_of_hanging() {
        let (mut a, _b) = pair();
        a.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let s = secret("0123456789abcdef");
        let err = reason(authenticate(&mut a, &s, Role::Acceptor, NodeId(0), 2));
        assert!(err.contains("timed out"), "{err}");
    }
}
