//! The shm bootstrap: rank 0 listens on a Unix socket, every other rank connects, proves it
//! holds the group's secret (`crate::auth`), and sends its memory files (memfds, passed with
//! `SCM_RIGHTS`); rank 0 then sends every member the whole table.
//!
//! Each record is a fixed-size frame (so nothing is allocated from a length a peer sent) with
//! the file descriptors attached to it. Rank 0 refuses a join that fails the handshake or sends
//! a malformed record with one log line, and goes on waiting for the real members.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

use super::sys::adopt_received_fds;
use crate::auth::{Role, authenticate};
use crate::{FabricError, GroupConfig, NodeId, RegionSpec};

/// Bytes of one record frame.
const RECORD_BYTES: usize = 1024;
const MAGIC: &[u8; 8] = b"VSMPSHM1";
const FIXED_BYTES: usize = 32;
const REGION_ENTRY_BYTES: usize = 16;

/// Most regions one shm group may register (what fits a record frame).
pub(crate) const MAX_REGIONS: usize = (RECORD_BYTES - FIXED_BYTES) / REGION_ENTRY_BYTES;

/// Bound on each step with one joiner at rank 0, so a silent intruder cannot hold the
/// bootstrap for long.
const JOIN_STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause between attempts to reach a rank 0 that is not listening yet.
const CONNECT_RETRY: Duration = Duration::from_millis(10);

/// One member's shared memory, as the bootstrap hands it over.
#[derive(Debug)]
pub(crate) struct Member {
    pub rank: NodeId,
    pub pid: u32,
    pub inbox: File,
    pub regions: Vec<File>,
}

impl Member {
    fn fds(&self) -> Vec<RawFd> {
        std::iter::once(self.inbox.as_raw_fd())
            .chain(self.regions.iter().map(|f| f.as_raw_fd()))
            .collect()
    }
}

/// Exchanges memory files with the group; returns every member by rank (this node's own
/// entry is `own`).
pub(crate) fn exchange(
    cfg: &GroupConfig,
    own: Member,
    inbox_len: u64,
) -> Result<Vec<Member>, FabricError> {
    let deadline = Instant::now() + cfg.connect_timeout;
    if cfg.rank.0 == 0 {
        serve(cfg, own, inbox_len, deadline)
    } else {
        join(cfg, own, inbox_len, deadline)
    }
}

fn io_err(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> FabricError {
    let op = op.into();
    move |source| FabricError::Io { op, source }
}

fn remaining(deadline: Instant, what: &str, waited: Duration) -> Result<Duration, FabricError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(FabricError::Timeout {
            what: what.into(),
            waited,
        });
    }
    Ok(left)
}

fn set_timeouts(stream: &UnixStream, t: Duration) -> Result<(), FabricError> {
    stream
        .set_read_timeout(Some(t))
        .and_then(|()| stream.set_write_timeout(Some(t)))
        .map_err(io_err("setting timeouts on the shm bootstrap socket"))
}

fn serve(
    cfg: &GroupConfig,
    own: Member,
    inbox_len: u64,
    deadline: Instant,
) -> Result<Vec<Member>, FabricError> {
    let path = Path::new(&cfg.bootstrap);
    let listener = listen(path)?;
    let result = gather(cfg, own, inbox_len, deadline, &listener, path);
    // The socket file is only for this bootstrap; nobody may join later.
    let _ = std::fs::remove_file(path);
    result
}

fn gather(
    cfg: &GroupConfig,
    own: Member,
    inbox_len: u64,
    deadline: Instant,
    listener: &UnixListener,
    path: &Path,
) -> Result<Vec<Member>, FabricError> {
    let n = cfg.nodes;
    let mut members: Vec<Option<Member>> = (0..n).map(|_| None).collect();
    members[0] = Some(own);
    let mut streams = Vec::new();
    while streams.len() + 1 < n {
        let what = format!(
            "members to join at {} ({} of {} joined)",
            path.display(),
            streams.len(),
            n - 1
        );
        remaining(deadline, &what, cfg.connect_timeout)?;
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(CONNECT_RETRY);
                continue;
            }
            Err(e) => return Err(io_err(format!("accepting on {}", path.display()))(e)),
        };
        match admit(cfg, inbox_len, stream, &members) {
            Ok((member, stream)) => {
                tracing::debug!("shm bootstrap: {} joined (pid {})", member.rank, member.pid);
                let r = usize::from(member.rank.0);
                members[r] = Some(member);
                streams.push(stream);
            }
            Err(e) => tracing::warn!("shm bootstrap at {}: refused a join: {e}", path.display()),
        }
    }
    let members: Vec<Member> = members
        .into_iter()
        .map(|m| m.expect("all joined"))
        .collect();
    for mut stream in streams {
        set_timeouts(&stream, JOIN_STEP_TIMEOUT)?;
        for m in &members {
            send_record(&mut stream, &record(cfg, m, inbox_len), &m.fds())?;
        }
    }
    Ok(members)
}

fn listen(path: &Path) -> Result<UnixListener, FabricError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(FabricError::Config(format!(
                "the shm bootstrap path {} exists and is not a socket",
                path.display()
            )));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(FabricError::Config(format!(
                "another group is bootstrapping at {}",
                path.display()
            )));
        }
        // A stale socket left by a dead group.
        std::fs::remove_file(path).map_err(io_err(format!("removing stale {}", path.display())))?;
    }
    let listener =
        UnixListener::bind(path).map_err(io_err(format!("listening on {}", path.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(io_err("making the shm bootstrap listener non-blocking"))?;
    Ok(listener)
}

/// Authenticates one joiner and takes its record.
fn admit(
    cfg: &GroupConfig,
    inbox_len: u64,
    mut stream: UnixStream,
    members: &[Option<Member>],
) -> Result<(Member, UnixStream), FabricError> {
    stream
        .set_nonblocking(false)
        .map_err(io_err("making a joiner's socket blocking"))?;
    set_timeouts(&stream, JOIN_STEP_TIMEOUT)?;
    let rank = authenticate(
        &mut stream,
        &cfg.secret,
        Role::Acceptor,
        cfg.rank,
        cfg.nodes,
    )?;
    if members[usize::from(rank.0)].is_some() {
        return Err(FabricError::Handshake {
            peer: rank.to_string(),
            reason: "that rank already joined".into(),
        });
    }
    let (bytes, fds) = recv_record(&mut stream, &rank.to_string())?;
    let member = parse_record(cfg, inbox_len, &bytes, fds, &rank.to_string())?;
    if member.rank != rank {
        return Err(FabricError::Protocol {
            peer: rank.to_string(),
            reason: format!("its record claims {}", member.rank),
        });
    }
    Ok((member, stream))
}

fn join(
    cfg: &GroupConfig,
    own: Member,
    inbox_len: u64,
    deadline: Instant,
) -> Result<Vec<Member>, FabricError> {
    let path = Path::new(&cfg.bootstrap);
    let mut stream = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                let what = format!("rank 0 to listen at {}", path.display());
                remaining(deadline, &what, cfg.connect_timeout)?;
                std::thread::sleep(CONNECT_RETRY);
            }
            Err(e) => return Err(io_err(format!("connecting to {}", path.display()))(e)),
        }
    };
    set_timeouts(
        &stream,
        remaining(deadline, "the shm bootstrap", cfg.connect_timeout)?,
    )?;
    let peer = authenticate(&mut stream, &cfg.secret, Role::Joiner, cfg.rank, cfg.nodes)?;
    if peer.0 != 0 {
        return Err(FabricError::Handshake {
            peer: path.display().to_string(),
            reason: format!("the listener claims to be {peer}, not rank 0"),
        });
    }
    send_record(&mut stream, &record(cfg, &own, inbox_len), &own.fds())?;
    let mut members = Vec::with_capacity(cfg.nodes);
    for q in 0..cfg.nodes {
        let (bytes, fds) = recv_record(&mut stream, "node 0")?;
        let m = parse_record(cfg, inbox_len, &bytes, fds, "node 0")?;
        if usize::from(m.rank.0) != q {
            return Err(FabricError::Protocol {
                peer: "node 0".into(),
                reason: format!("table entry {q} is for {}", m.rank),
            });
        }
        members.push(if q == usize::from(cfg.rank.0) {
            Member {
                rank: own.rank,
                pid: own.pid,
                inbox: own
                    .inbox
                    .try_clone()
                    .map_err(io_err("duplicating the inbox fd"))?,
                regions: own
                    .regions
                    .iter()
                    .map(File::try_clone)
                    .collect::<Result<_, _>>()
                    .map_err(io_err("duplicating a region fd"))?,
            }
        } else {
            m
        });
    }
    Ok(members)
}

fn record(cfg: &GroupConfig, m: &Member, inbox_len: u64) -> [u8; RECORD_BYTES] {
    let mut b = [0u8; RECORD_BYTES];
    b[0..8].copy_from_slice(MAGIC);
    b[8..10].copy_from_slice(&m.rank.0.to_le_bytes());
    b[12..16].copy_from_slice(&(cfg.nodes as u32).to_le_bytes());
    b[16..20].copy_from_slice(&m.pid.to_le_bytes());
    b[20..24].copy_from_slice(&(cfg.regions.len() as u32).to_le_bytes());
    b[24..32].copy_from_slice(&inbox_len.to_le_bytes());
    for (i, r) in cfg.regions.iter().enumerate() {
        let at = FIXED_BYTES + i * REGION_ENTRY_BYTES;
        b[at..at + 4].copy_from_slice(&r.id.0.to_le_bytes());
        b[at + 8..at + 16].copy_from_slice(&(r.len as u64).to_le_bytes());
    }
    b
}

fn layout_matches(regions: &[RegionSpec], b: &[u8; RECORD_BYTES]) -> bool {
    let count = u32::from_le_bytes(b[20..24].try_into().expect("4 bytes")) as usize;
    count == regions.len()
        && regions.iter().enumerate().all(|(i, r)| {
            let at = FIXED_BYTES + i * REGION_ENTRY_BYTES;
            let id = u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
            let len = u64::from_le_bytes(b[at + 8..at + 16].try_into().expect("8 bytes"));
            id == r.id.0 && len == r.len as u64
        })
}

fn parse_record(
    cfg: &GroupConfig,
    inbox_len: u64,
    b: &[u8; RECORD_BYTES],
    fds: Vec<OwnedFd>,
    from: &str,
) -> Result<Member, FabricError> {
    let bad = |reason: String| FabricError::Protocol {
        peer: from.into(),
        reason,
    };
    if &b[0..8] != MAGIC {
        return Err(bad("not an shm bootstrap record".into()));
    }
    let rank = NodeId(u16::from_le_bytes([b[8], b[9]]));
    let nodes = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")) as usize;
    let pid = u32::from_le_bytes(b[16..20].try_into().expect("4 bytes"));
    let their_inbox = u64::from_le_bytes(b[24..32].try_into().expect("8 bytes"));
    if nodes != cfg.nodes || usize::from(rank.0) >= nodes {
        return Err(bad(format!("record for {rank} of a group of {nodes}")));
    }
    if !layout_matches(&cfg.regions, b) || their_inbox != inbox_len {
        return Err(FabricError::Config(format!(
            "{from} registers a different set of regions (every node must register the same)"
        )));
    }
    if fds.len() != 1 + cfg.regions.len() {
        return Err(bad(format!(
            "{} memory files sent, {} expected",
            fds.len(),
            1 + cfg.regions.len()
        )));
    }
    let mut files = fds.into_iter().map(File::from);
    let inbox = files.next().expect("length checked");
    Ok(Member {
        rank,
        pid,
        inbox,
        regions: files.collect(),
    })
}

fn send_record(
    stream: &mut UnixStream,
    bytes: &[u8; RECORD_BYTES],
    fds: &[RawFd],
) -> Result<(), FabricError> {
    let iov = [IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &iov,
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| io_err("sending memory files over the shm bootstrap socket")(e.into()))?;
    stream
        .write_all(&bytes[sent..])
        .map_err(io_err("sending a record over the shm bootstrap socket"))
}

fn recv_record(
    stream: &mut UnixStream,
    from: &str,
) -> Result<([u8; RECORD_BYTES], Vec<OwnedFd>), FabricError> {
    let mut bytes = [0u8; RECORD_BYTES];
    let mut got = 0;
    let mut fds = Vec::new();
    while got < RECORD_BYTES {
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_REGIONS + 1]);
        let mut iov = [IoSliceMut::new(&mut bytes[got..])];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| io_err(format!("receiving a record from {from}"))(e.into()))?;
        let n = msg.bytes;
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        for c in msg
            .cmsgs()
            .map_err(|e| io_err("reading ancillary data")(e.into()))?
        {
            if let ControlMessageOwned::ScmRights(raw) = c {
                fds.extend(adopt_received_fds(raw));
            }
        }
        if truncated {
            return Err(FabricError::Protocol {
                peer: from.into(),
                reason: "sent more file descriptors than a record carries".into(),
            });
        }
        if n == 0 {
            return Err(FabricError::Handshake {
                peer: from.into(),
                reason: "closed the connection during the bootstrap".into(),
            });
        }
        got += n;
    }
    Ok((bytes, fds))
}
