//! Plain memory shared between processes of one host, outside any group: the raw primitive
//! the shm backend is built on, for benchmarks that measure it beside the fabric.
#![forbid(unsafe_code)]

use std::fs::File;
use std::sync::atomic::AtomicU64;

use crate::FabricError;
use crate::memory::memfd;
use crate::sys::Mapping;

/// Shared memory another process maps by opening [`SharedMemory::proc_path`].
#[derive(Debug)]
pub struct SharedMemory {
    map: Mapping,
    file: File,
}

impl SharedMemory {
    /// Fresh zeroed shared memory of at least `len` bytes.
    pub fn create(name: &str, len: usize) -> Result<SharedMemory, FabricError> {
        let file = memfd(name, len)?;
        SharedMemory::from_file(file, len)
    }

    /// Maps the shared memory another process created, by its [`SharedMemory::proc_path`].
    pub fn open(path: &std::path::Path, len: usize) -> Result<SharedMemory, FabricError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(FabricError::io(format!(
                "opening shared memory {}",
                path.display()
            )))?;
        SharedMemory::from_file(file, len)
    }

    fn from_file(file: File, len: usize) -> Result<SharedMemory, FabricError> {
        let map = Mapping::map(&file, len.max(1).next_multiple_of(4096))
            .map_err(FabricError::io("mapping shared memory"))?;
        Ok(SharedMemory { map, file })
    }

    /// A path under `/proc` through which another process of this host can open this memory
    /// while this process lives.
    pub fn proc_path(&self) -> std::path::PathBuf {
        use std::os::fd::AsRawFd;
        format!("/proc/{}/fd/{}", std::process::id(), self.file.as_raw_fd()).into()
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is mapped (never: mappings are at least a page).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The 64-bit word at `offset` (8-byte aligned, in range; panics otherwise).
    pub fn word(&self, offset: usize) -> &AtomicU64 {
        self.map.u64_at(offset)
    }

    /// Copies `data` in at `offset` (in range; panics otherwise).
    pub fn copy_in(&self, offset: usize, data: &[u8]) {
        self.map.copy_in(offset, data);
    }
}
