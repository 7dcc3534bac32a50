//! Registered memory: a memfd mapped shared into this process, the one kind of memory a node
//! registers as a region.
//!
//! Why memfds: on shm the peers map the same file, so a one-sided write is one copy into the
//! target's memory; on tcp the owner sends straight from the mapping; on verbs a `MAP_SHARED`
//! mapping can be registered with the HCA and stays correct across the `fork` that starts the
//! VM process (private pages under copy-on-write would not). A node registers memory it
//! created itself, such as the guest RAM replica, with [`Memory::from_file`], or lets the
//! fabric make fresh zeroed memory with [`Memory::create`].
//!
//! Peers write into a region concurrently with the owner's reads, so every access is a copy
//! (never a Rust reference into the bytes), and the 64-bit words `fetch_add` targets are
//! reached atomically.
#![forbid(unsafe_code)]

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{Ordering, fence};

use crate::sys::Mapping;
use crate::{FabricError, RegionId};

/// A region's memory on this node.
#[derive(Debug)]
pub struct Memory {
    id: RegionId,
    len: usize,
    file: File,
    map: Mapping,
}

/// The granule memfds are sized in.
const PAGE: usize = 4096;

impl Memory {
    /// Fresh zero-filled memory for region `id` of `len` bytes (a new memfd).
    pub fn create(id: RegionId, len: usize) -> Result<Memory, FabricError> {
        let file = memfd(&format!("vsmp-region-{}", id.0), len)?;
        let map = Mapping::map(&file, len.max(1).next_multiple_of(PAGE))
            .map_err(FabricError::io(format!("mapping the memory of {id}")))?;
        Ok(Memory { id, len, file, map })
    }

    /// Memory this node created itself (a memfd, or any file that can be mapped shared), for
    /// region `id`: the whole file, as long as it is now.
    pub fn from_file(id: RegionId, file: File) -> Result<Memory, FabricError> {
        let len = file
            .metadata()
            .map_err(FabricError::io(format!(
                "reading the size of {id}'s memory file"
            )))?
            .len() as usize;
        if len == 0 {
            return Err(FabricError::Config(format!(
                "the memory file for {id} is empty"
            )));
        }
        let map = Mapping::map(&file, len)
            .map_err(FabricError::io(format!("mapping the memory of {id}")))?;
        Ok(Memory { id, len, file, map })
    }

    /// The region this memory is for.
    pub fn id(&self) -> RegionId {
        self.id
    }

    /// Usable bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The byte range `len` bytes at `offset` occupy, or the contract's `OutOfBounds`.
    pub fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, FabricError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len as u64 => Ok(offset as usize..end as usize),
            _ => Err(FabricError::OutOfBounds {
                region: self.id,
                offset,
                len,
                region_len: self.len as u64,
            }),
        }
    }

    /// Copies `buf.len()` bytes at `offset` out.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), FabricError> {
        let r = self.range(offset, buf.len() as u64)?;
        // Acquire: pairs with the release that ends every remote write (shm) or with the
        // applying thread's release (tcp, sim), for reads ordered after a doorbell or a word.
        fence(Ordering::Acquire);
        self.map.copy_out(r.start, buf);
        Ok(())
    }

    /// Copies `data` in at `offset`: a local store, not propagated anywhere.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), FabricError> {
        let r = self.range(offset, data.len() as u64)?;
        self.map.copy_in(r.start, data);
        // Release: a local write that is then the source of a one-sided write is complete
        // before the backend reads it (another thread may carry the write out).
        fence(Ordering::Release);
        Ok(())
    }

    /// Atomically loads the 64-bit word at `offset` (8-byte aligned), acquire: pairs with the
    /// release a remote write or `fetch_add` performs.
    pub fn load_u64(&self, offset: u64) -> Result<u64, FabricError> {
        let r = self.word(offset)?;
        Ok(self.map.u64_at(r).load(Ordering::Acquire))
    }

    /// Atomically stores the 64-bit word at `offset` (8-byte aligned), release.
    pub fn store_u64(&self, offset: u64, value: u64) -> Result<(), FabricError> {
        let r = self.word(offset)?;
        self.map.u64_at(r).store(value, Ordering::Release);
        Ok(())
    }

    /// Atomically adds to the 64-bit word at `offset` (wrapping); its previous value. SeqCst:
    /// a hardware `lock xadd`, ordered with every other node's on the same word.
    pub fn fetch_add_u64(&self, offset: u64, add: u64) -> Result<u64, FabricError> {
        let r = self.word(offset)?;
        Ok(self.map.u64_at(r).fetch_add(add, Ordering::SeqCst))
    }

    fn word(&self, offset: u64) -> Result<usize, FabricError> {
        if offset % 8 != 0 {
            return Err(FabricError::Misaligned { offset });
        }
        Ok(self.range(offset, 8)?.start)
    }

    /// The memory file, for handing to peers on one host.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    pub(crate) fn mapping(&self) -> &Mapping {
        &self.map
    }
}

/// The memory of region `region` among a node's, or the contract's `UnknownRegion`.
pub(crate) fn find(
    memory: &[std::sync::Arc<Memory>],
    region: RegionId,
) -> Result<&Memory, FabricError> {
    memory
        .iter()
        .find(|m| m.id() == region)
        .map(|m| &**m)
        .ok_or(FabricError::UnknownRegion { region })
}

/// A fresh memfd of at least `len` bytes (a whole number of pages), close-on-exec.
pub(crate) fn memfd(name: &str, len: usize) -> Result<File, FabricError> {
    let cname = std::ffi::CString::new(name)
        .map_err(|_| FabricError::Config(format!("memory name {name:?} holds a NUL")))?;
    let fd = nix::sys::memfd::memfd_create(&cname, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
        .map_err(|e| FabricError::io(format!("creating memfd {name}"))(e.into()))?;
    let file = File::from(fd);
    file.set_len(len.max(1).next_multiple_of(PAGE) as u64)
        .map_err(FabricError::io(format!("sizing memfd {name}")))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_memory_reads_zero_and_keeps_what_is_written() {
        let m = Memory::create(RegionId(4), 100).unwrap();
        assert_eq!(m.len(), 100);
        let mut buf = [9u8; 10];
        m.read(90, &mut buf).unwrap();
        assert_eq!(buf, [0; 10]);
        m.write(90, b"0123456789").unwrap();
        m.read(90, &mut buf).unwrap();
        assert_eq!(&buf, b"0123456789");
    }

    #[test]
    fn an_access_past_the_end_is_refused_and_names_the_region() {
        let m = Memory::create(RegionId(4), 100).unwrap();
        let e = m.write(95, &[0; 6]).unwrap_err();
        assert!(matches!(
            e,
            FabricError::OutOfBounds {
                region: RegionId(4),
                offset: 95,
                len: 6,
                region_len: 100
            }
        ));
        assert!(m.read(u64::MAX, &mut [0; 2]).is_err());
    }

    #[test]
    fn words_are_atomic_and_must_be_aligned() {
        let m = Memory::create(RegionId(1), 64).unwrap();
        assert_eq!(m.fetch_add_u64(8, 5).unwrap(), 0);
        assert_eq!(m.fetch_add_u64(8, u64::MAX).unwrap(), 5);
        assert_eq!(m.load_u64(8).unwrap(), 4);
        m.store_u64(16, 7).unwrap();
        assert_eq!(m.load_u64(16).unwrap(), 7);
        assert!(matches!(
            m.load_u64(4),
            Err(FabricError::Misaligned { offset: 4 })
        ));
    }

    #[test]
    fn memory_from_a_callers_memfd_shows_the_callers_bytes() {
        use std::io::Write;
        let mut f = memfd("caller", 4096).unwrap();
        f.write_all(b"guest ram").unwrap();
        let m = Memory::from_file(RegionId(2), f).unwrap();
        assert_eq!(m.len(), 4096);
        let mut buf = [0u8; 9];
        m.read(0, &mut buf).unwrap();
        assert_eq!(&buf, b"guest ram");
    }
}
