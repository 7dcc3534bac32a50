//! How a node joins its group: rank, size, the regions every node registers (and the memory
//! this node registers for them), where the bootstrap happens, the shared secret that
//! authenticates every join, and the heartbeat timeout.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::{FabricError, Memory, NodeId, RegionId, RegionSpec};

/// Default bound after which a silent peer is declared dead.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);

/// Default bound on the whole bootstrap (every peer connected and authenticated).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The environment variable that carries the group's shared secret.
pub const SECRET_ENV: &str = "VSMP_SECRET";

/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

/// The group's shared secret. Every join answers a challenge keyed with it, so nobody who
/// lacks it can write into guest memory. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// A secret from raw bytes (at least [`MIN_SECRET_BYTES`]).
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Result<Secret, FabricError> {
        let bytes = bytes.into();
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(FabricError::Config(format!(
                "the shared secret has {} bytes; at least {MIN_SECRET_BYTES} are required",
                bytes.len()
            )));
        }
        Ok(Secret(bytes))
    }

    /// The secret in `$VSMP_SECRET`, if set.
    pub fn from_env() -> Result<Option<Secret>, FabricError> {
        match std::env::var_os(SECRET_ENV) {
            None => Ok(None),
            Some(v) => Secret::from_bytes(v.into_encoded_bytes()).map(Some),
        }
    }

    /// The secret stored in a file (surrounding white space ignored).
    pub fn from_file(path: &Path) -> Result<Secret, FabricError> {
        let raw = std::fs::read(path).map_err(|source| FabricError::Io {
            op: format!("reading the secret file {}", path.display()),
            source,
        })?;
        Secret::from_bytes(raw.trim_ascii().to_vec())
    }

    /// A fresh random secret, as the local launcher makes one per run, hex-encoded so that it
    /// can travel in an environment variable.
    pub fn generate() -> Result<Secret, FabricError> {
        let mut raw = [0u8; 32];
        getrandom(&mut raw)?;
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        Secret::from_bytes(hex.into_bytes())
    }

    /// The secret's bytes, for keying the handshake.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes>)", self.0.len())
    }
}

fn getrandom(buf: &mut [u8]) -> Result<(), FabricError> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(|source| FabricError::Io {
            op: "reading /dev/urandom for a fresh secret".into(),
            source,
        })
}

/// Everything a node needs to join its group on any backend.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    pub rank: NodeId,
    pub nodes: usize,
    /// The regions every node registers, identical on every node.
    pub regions: Vec<RegionSpec>,
    /// Where rank 0 listens for joins: `host:port` for tcp, a Unix socket path for shm.
    pub bootstrap: String,
    pub secret: Secret,
    /// Memory this node registers for some of the regions (for example its guest RAM
    /// replica); every other region gets fresh zeroed memory from the fabric. Local to this
    /// node: not part of the layout the group agrees on.
    pub memory: Vec<Arc<Memory>>,
    /// A peer silent for longer than this is declared dead.
    pub heartbeat_timeout: Duration,
    /// Bound on the whole bootstrap.
    pub connect_timeout: Duration,
}

impl GroupConfig {
    /// A configuration with the default timeouts, every region in fresh memory.
    pub fn new(
        rank: NodeId,
        nodes: usize,
        regions: Vec<RegionSpec>,
        bootstrap: impl Into<String>,
        secret: Secret,
    ) -> GroupConfig {
        GroupConfig {
            rank,
            nodes,
            regions,
            bootstrap: bootstrap.into(),
            secret,
            memory: Vec::new(),
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// Registers `memory` for its region (replacing fresh memory from the fabric).
    pub fn register(mut self, memory: Arc<Memory>) -> GroupConfig {
        self.memory.retain(|m| m.id() != memory.id());
        self.memory.push(memory);
        self
    }

    /// The memory this node uses for every region, in the order of `regions`: what was
    /// registered, else fresh zeroed memory.
    pub fn region_memory(&self) -> Result<Vec<Arc<Memory>>, FabricError> {
        self.regions
            .iter()
            .map(
                |spec| match self.memory.iter().find(|m| m.id() == spec.id) {
                    Some(m) => Ok(Arc::clone(m)),
                    None => Memory::create(spec.id, spec.len).map(Arc::new),
                },
            )
            .collect()
    }

    /// The layout entry of region `id`.
    pub fn spec(&self, id: RegionId) -> Option<&RegionSpec> {
        self.regions.iter().find(|r| r.id == id)
    }

    /// Checks what every backend relies on: a rank inside the group, at most 2^16 nodes,
    /// unique region ids, and registered memory that exists in the layout and is large
    /// enough.
    pub fn validate(&self) -> Result<(), FabricError> {
        if self.nodes == 0 || self.nodes > usize::from(u16::MAX) + 1 {
            return Err(FabricError::Config(format!(
                "a group has 1 to 65536 nodes, not {}",
                self.nodes
            )));
        }
        if usize::from(self.rank.0) >= self.nodes {
            return Err(FabricError::Config(format!(
                "rank {} is outside a group of {} nodes",
                self.rank.0, self.nodes
            )));
        }
        let mut ids: Vec<_> = self.regions.iter().map(|r| r.id).collect();
        ids.sort();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(FabricError::Config(format!("{} is registered twice", w[0])));
        }
        for m in &self.memory {
            let spec = self.spec(m.id()).ok_or_else(|| {
                FabricError::Config(format!(
                    "memory was registered for {}, which is not in the region layout",
                    m.id()
                ))
            })?;
            if m.len() < spec.len {
                return Err(FabricError::Config(format!(
                    "the memory registered for {} has {} bytes; the layout needs {}",
                    m.id(),
                    m.len(),
                    spec.len
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RegionId;

    fn secret() -> Secret {
        Secret::from_bytes(b"0123456789abcdef".to_vec()).unwrap()
    }

    #[test]
    fn a_short_secret_is_refused() {
        assert!(Secret::from_bytes(b"short".to_vec()).is_err());
    }

    #[test]
    fn generated_secrets_differ_and_never_print() {
        let a = Secret::generate().unwrap();
        let b = Secret::generate().unwrap();
        assert_ne!(a, b);
        assert!(!format!("{a:?}").contains(std::str::from_utf8(a.expose()).unwrap()));
    }

    #[test]
    fn validate_refuses_a_rank_outside_the_group_and_duplicate_regions() {
        let r = RegionSpec::open(RegionId(7), 64);
        let cfg = GroupConfig::new(NodeId(2), 2, vec![], "x", secret());
        assert!(cfg.validate().is_err());
        let cfg = GroupConfig::new(NodeId(0), 2, vec![r.clone(), r], "x", secret());
        assert!(cfg.validate().unwrap_err().to_string().contains("region 7"));
    }

    #[test]
    fn registered_memory_must_be_in_the_layout_and_large_enough() {
        let cfg = GroupConfig::new(
            NodeId(0),
            1,
            vec![RegionSpec::open(RegionId(1), 8192)],
            "x",
            secret(),
        );
        let small = Arc::new(Memory::create(RegionId(1), 4096).unwrap());
        assert!(cfg.clone().register(small).validate().is_err());
        let stray = Arc::new(Memory::create(RegionId(2), 4096).unwrap());
        assert!(cfg.clone().register(stray).validate().is_err());
        let fits = Arc::new(Memory::create(RegionId(1), 8192).unwrap());
        let cfg = cfg.register(Arc::clone(&fits));
        cfg.validate().unwrap();
        let mem = cfg.region_memory().unwrap();
        assert!(Arc::ptr_eq(&mem[0], &fits));
    }
}
