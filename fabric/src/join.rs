//! Joining a group without naming a backend type: what the launchers and benchmarks use.
#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::delay::Delayed;
use crate::shm::ShmFabric;
use crate::tcp::{self, TcpFabric};
use crate::{Fabric, FabricError, GroupConfig, NodeId};

/// A fabric backend that forms groups of processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Processes on one host, sharing memory (`bootstrap` is a Unix socket path).
    Shm,
    /// Any hosts, one TCP connection per pair (`bootstrap` is rank 0's `host:port`).
    Tcp,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Shm => "shm",
            Backend::Tcp => "tcp",
        })
    }
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Backend, String> {
        match s {
            "shm" => Ok(Backend::Shm),
            "tcp" => Ok(Backend::Tcp),
            other => Err(format!("unknown fabric backend {other:?} (shm or tcp)")),
        }
    }
}

/// Rank 0's half-formed group: its bootstrap address is known (to hand to the others) before
/// the group forms.
#[derive(Debug)]
pub struct Pending {
    kind: PendingKind,
    delay: Duration,
    regions: Vec<crate::RegionSpec>,
}

#[derive(Debug)]
enum PendingKind {
    Shm(GroupConfig),
    Tcp(tcp::Listener),
}

/// Rank 0: prepares the group's rendezvous and returns the address the other ranks join at
/// (tcp: `cfg.bootstrap` may end in `:0` for a free port, and the address says which).
pub fn listen(
    backend: Backend,
    cfg: GroupConfig,
    delay: Duration,
) -> Result<(Pending, String), FabricError> {
    cfg.validate()?;
    if cfg.rank != NodeId(0) {
        return Err(FabricError::Config(format!(
            "only rank 0 listens for the group, not {}",
            cfg.rank
        )));
    }
    let regions = cfg.regions.clone();
    let (kind, addr) = match backend {
        Backend::Shm => {
            let addr = cfg.bootstrap.clone();
            (PendingKind::Shm(cfg), addr)
        }
        Backend::Tcp => {
            let (listener, addr) = TcpFabric::listen(cfg)?;
            (PendingKind::Tcp(listener), addr.to_string())
        }
    };
    Ok((
        Pending {
            kind,
            delay,
            regions,
        },
        addr,
    ))
}

impl Pending {
    /// Waits for every other rank and returns rank 0's endpoint.
    pub fn finish(self) -> Result<Arc<dyn Fabric>, FabricError> {
        let ep: Arc<dyn Fabric> = match self.kind {
            PendingKind::Shm(cfg) => Arc::new(ShmFabric::join(&cfg)?),
            PendingKind::Tcp(l) => Arc::new(l.accept_group()?),
        };
        wrap(ep, self.regions, self.delay)
    }
}

/// Joins the group `cfg` describes on `backend` (any rank; rank 0 listens and waits), with
/// `delay` injected each way when it is not zero.
pub fn join(
    backend: Backend,
    cfg: GroupConfig,
    delay: Duration,
) -> Result<Arc<dyn Fabric>, FabricError> {
    if cfg.rank == NodeId(0) {
        return listen(backend, cfg, delay)?.0.finish();
    }
    let regions = cfg.regions.clone();
    let ep: Arc<dyn Fabric> = match backend {
        Backend::Shm => Arc::new(ShmFabric::join(&cfg)?),
        Backend::Tcp => Arc::new(TcpFabric::join(cfg)?),
    };
    wrap(ep, regions, delay)
}

fn wrap(
    ep: Arc<dyn Fabric>,
    regions: Vec<crate::RegionSpec>,
    delay: Duration,
) -> Result<Arc<dyn Fabric>, FabricError> {
    if delay.is_zero() {
        return Ok(ep);
    }
    Ok(Arc::new(Delayed::new(ep, regions, delay)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_parse_from_their_names_and_print_them() {
        for b in [Backend::Shm, Backend::Tcp] {
            assert_eq!(b.to_string().parse::<Backend>(), Ok(b));
        }
        assert!(
            "verbs"
                .parse::<Backend>()
                .unwrap_err()
                .contains("shm or tcp")
        );
    }
}
