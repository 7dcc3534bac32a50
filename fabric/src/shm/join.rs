//! How an shm node joins its group: its card (pid, inbox size, every region's id and length,
//! with the inbox, the eventfd and the region memfds attached) goes through the rendezvous on
//! a Unix socket at `GroupConfig::bootstrap`, and every peer's card is checked against the
//! layout and mapped.
#![forbid(unsafe_code)]

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8};
use std::time::Instant;

use super::{BACKEND, Peer, inbox_len};
use crate::rendezvous::{self, CONNECT_RETRY, Card, Member};
use crate::sys::{Mapping, SpinLock};
use crate::{FabricError, GroupConfig, Memory, NodeId};

/// What this node tells its peers: its pid, the inbox size and every region's id and length
/// (checked against the layout), with the inbox, the eventfd and the region files attached.
pub(super) fn own_card(
    cfg: &GroupConfig,
    inbox: &File,
    efd: &File,
    memory: &[Arc<Memory>],
) -> Result<Card, FabricError> {
    let mut bytes = Vec::with_capacity(16 + 12 * memory.len());
    bytes.extend_from_slice(&std::process::id().to_le_bytes());
    bytes.extend_from_slice(&(inbox_len(cfg.nodes) as u64).to_le_bytes());
    for m in memory {
        bytes.extend_from_slice(&m.id().0.to_le_bytes());
        bytes.extend_from_slice(&(m.len() as u64).to_le_bytes());
    }
    let dup = |fd: BorrowedFd<'_>| {
        fd.try_clone_to_owned().map_err(FabricError::io(
            "duplicating a memory file for the rendezvous",
        ))
    };
    let mut fds: Vec<OwnedFd> = vec![dup(inbox.as_fd())?, dup(efd.as_fd())?];
    for m in memory {
        fds.push(dup(m.fd())?);
    }
    Ok(Card { bytes, fds })
}

/// Runs the rendezvous on the Unix socket at `cfg.bootstrap`.
pub(super) fn gather(cfg: &GroupConfig, card: Card) -> Result<Vec<Member>, FabricError> {
    let path = Path::new(&cfg.bootstrap);
    if cfg.rank == NodeId(0) {
        let listener = listen(path)?;
        let result = rendezvous::form(cfg, BACKEND, &listener, card);
        // The socket file is only for this rendezvous; nobody may join later.
        let _ = std::fs::remove_file(path);
        return result.map(|(members, _)| members);
    }
    let deadline = Instant::now() + cfg.connect_timeout;
    let conn = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(CONNECT_RETRY);
            }
            Err(e) => {
                return Err(FabricError::io(format!(
                    "connecting to the shm rendezvous at {}",
                    path.display()
                ))(e));
            }
        }
    };
    let label = path.display().to_string();
    rendezvous::join(cfg, BACKEND, conn, &label, card).map(|(members, _)| members)
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
        std::fs::remove_file(path).map_err(FabricError::io(format!(
            "removing stale {}",
            path.display()
        )))?;
    }
    UnixListener::bind(path).map_err(FabricError::io(format!("listening on {}", path.display())))
}

pub(super) fn own_peer(
    cfg: &GroupConfig,
    inbox: &File,
    efd: &File,
    memory: &[Arc<Memory>],
) -> Result<Peer, FabricError> {
    let inbox = Mapping::map(inbox, inbox_len(cfg.nodes))
        .map_err(FabricError::io("mapping this node's inbox"))?;
    Ok(Peer {
        rank: cfg.rank,
        pid: std::process::id(),
        regions: memory.to_vec(),
        inbox: Arc::new(inbox),
        efd: efd
            .try_clone()
            .map_err(FabricError::io("duplicating this node's eventfd"))?,
        link: SpinLock::new(1),
        dead: AtomicBool::new(false),
        cause: AtomicU8::new(0),
    })
}

/// Maps what a peer's card carries, checking it against the layout.
pub(super) fn peer(cfg: &GroupConfig, m: Member) -> Result<Peer, FabricError> {
    let who = m.rank.to_string();
    let bad = |reason: String| FabricError::Protocol {
        peer: who.clone(),
        reason,
    };
    let b = &m.card.bytes;
    let expected = 12 + 12 * cfg.regions.len();
    if b.len() != expected || m.card.fds.len() != 2 + cfg.regions.len() {
        return Err(bad(format!(
            "a card of {} bytes and {} descriptors, {expected} and {} expected",
            b.len(),
            m.card.fds.len(),
            2 + cfg.regions.len()
        )));
    }
    let pid = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes"));
    let their_inbox = u64::from_le_bytes(b[4..12].try_into().expect("8 bytes"));
    if their_inbox != inbox_len(cfg.nodes) as u64 {
        return Err(bad(format!("an inbox of {their_inbox} bytes")));
    }
    let mut fds = m.card.fds.into_iter().map(File::from);
    let inbox_file = fds.next().expect("count checked");
    let efd = fds.next().expect("count checked");
    let inbox = Mapping::map(&inbox_file, inbox_len(cfg.nodes))
        .map_err(FabricError::io(format!("mapping {who}'s inbox")))?;
    let mut regions = Vec::with_capacity(cfg.regions.len());
    for (i, (spec, file)) in cfg.regions.iter().zip(fds).enumerate() {
        let at = 12 + 12 * i;
        let id = u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let len = u64::from_le_bytes(b[at + 4..at + 12].try_into().expect("8 bytes"));
        if id != spec.id.0 || len < spec.len as u64 {
            return Err(bad(format!(
                "entry {i} is region {id} of {len} bytes; the layout has {} of {}",
                spec.id, spec.len
            )));
        }
        regions.push(Arc::new(Memory::from_file(spec.id, file)?));
    }
    Ok(Peer {
        rank: m.rank,
        pid,
        regions,
        inbox: Arc::new(inbox),
        efd,
        link: SpinLock::new(1),
        dead: AtomicBool::new(false),
        cause: AtomicU8::new(0),
    })
}
