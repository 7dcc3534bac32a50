//! Guest RAM: one memfd of `--mem` bytes, mapped in the VM process at VA == GPA (above the null
//! guard) and in the monitor anywhere, so that the monitor reads and writes guest memory on the
//! trap path with plain copies, without a system call.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::str::FromStr;

use nix::sys::memfd::{MemFdCreateFlag, memfd_create};

use super::sys::SharedMapping;
use crate::layout;

/// Guest page size; RAM sizes are multiples of it.
pub const PAGE_BYTES: u64 = 4096;

/// A guest RAM size, within [`layout::MIN_MEM_BYTES`, `layout::MAX_MEM_BYTES`] and a multiple of
/// [`PAGE_BYTES`]. Parsed from `65536`, `512K`, `64M`, `1G` (binary units; `KiB`/`MiB`/`GiB`
/// and a trailing `B` are accepted too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemSize(u64);

impl MemSize {
    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// Checks `bytes` against the bounds.
    pub fn new(bytes: u64) -> Result<MemSize, MemSizeError> {
        if !(layout::MIN_MEM_BYTES..=layout::MAX_MEM_BYTES).contains(&bytes) {
            return Err(MemSizeError::OutOfBounds { bytes });
        }
        if bytes % PAGE_BYTES != 0 {
            return Err(MemSizeError::NotPageMultiple { bytes });
        }
        Ok(MemSize(bytes))
    }
}

impl Default for MemSize {
    fn default() -> MemSize {
        MemSize(layout::DEFAULT_MEM_BYTES)
    }
}

impl fmt::Display for MemSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b % (1 << 30) == 0 {
            write!(f, "{}G", b >> 30)
        } else if b % (1 << 20) == 0 {
            write!(f, "{}M", b >> 20)
        } else if b % (1 << 10) == 0 {
            write!(f, "{}K", b >> 10)
        } else {
            write!(f, "{b}")
        }
    }
}

/// Why a memory size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemSizeError {
    #[error("invalid memory size {text:?}: expected a number with an optional K, M or G suffix")]
    Parse { text: String },
    #[error(
        "memory size {bytes} bytes is outside [{}, {}]",
        MemSize(layout::MIN_MEM_BYTES),
        MemSize(layout::MAX_MEM_BYTES)
    )]
    OutOfBounds { bytes: u64 },
    #[error("memory size {bytes} bytes is not a multiple of the {PAGE_BYTES}-byte page")]
    NotPageMultiple { bytes: u64 },
}

impl FromStr for MemSize {
    type Err = MemSizeError;

    fn from_str(text: &str) -> Result<MemSize, MemSizeError> {
        let parse_err = || MemSizeError::Parse {
            text: text.to_string(),
        };
        let t = text.trim();
        let t = t
            .strip_suffix("iB")
            .or_else(|| t.strip_suffix('B'))
            .unwrap_or(t);
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, suffix) = t.split_at(digits_end);
        let number: u64 = digits.parse().map_err(|_| parse_err())?;
        let shift = match suffix {
            "" => 0,
            "k" | "K" => 10,
            "m" | "M" => 20,
            "g" | "G" => 30,
            _ => return Err(parse_err()),
        };
        let bytes = number
            .checked_mul(1 << shift)
            .ok_or(MemSizeError::OutOfBounds { bytes: u64::MAX })?;
        MemSize::new(bytes)
    }
}

/// Failure to create guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the guest RAM memfd")]
    Create(#[source] nix::Error),
    #[error("cannot size the guest RAM memfd to {size}")]
    Resize {
        size: MemSize,
        #[source]
        source: nix::Error,
    },
    #[error("cannot map guest RAM ({size}) into the monitor")]
    Map {
        size: MemSize,
        #[source]
        source: nix::Error,
    },
}

/// A guest-physical range outside guest RAM (below the null guard or past the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest-physical range {gpa:#x}+{len:#x} is outside guest RAM [{start:#x}, {end:#x})")]
pub struct OutsideRam {
    pub gpa: u64,
    pub len: u64,
    pub start: u64,
    pub end: u64,
}

/// Guest RAM: the memfd and the monitor's mapping of it.
#[derive(Debug)]
pub struct GuestMemory {
    memfd: OwnedFd,
    mapping: SharedMapping,
    size: MemSize,
}

impl GuestMemory {
    /// Creates zero-filled guest RAM of `size` bytes.
    pub fn new(size: MemSize) -> Result<GuestMemory, MemoryError> {
        let memfd = memfd_create(c"vsmp-guest-ram", MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(MemoryError::Create)?;
        nix::unistd::ftruncate(&memfd, size.bytes() as i64)
            .map_err(|source| MemoryError::Resize { size, source })?;
        let mapping = SharedMapping::map(memfd.as_fd(), size.bytes() as usize)
            .map_err(|source| MemoryError::Map { size, source })?;
        Ok(GuestMemory {
            memfd,
            mapping,
            size,
        })
    }

    /// The RAM size.
    pub fn size(&self) -> MemSize {
        self.size
    }

    /// First guest-physical address backed by RAM (the end of the null guard).
    pub const fn ram_start(&self) -> u64 {
        layout::NULL_GUARD_END
    }

    /// One past the last guest-physical address backed by RAM.
    pub fn ram_end(&self) -> u64 {
        self.size.bytes()
    }

    /// The memfd, for mapping into the VM process.
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// The offset of `[gpa, gpa + len)` in the memfd, if it lies inside RAM.
    pub fn offset_of(&self, gpa: u64, len: usize) -> Result<usize, OutsideRam> {
        let outside = OutsideRam {
            gpa,
            len: len as u64,
            start: self.ram_start(),
            end: self.ram_end(),
        };
        let end = gpa.checked_add(len as u64).ok_or(outside)?;
        if gpa < self.ram_start() || end > self.ram_end() {
            return Err(outside);
        }
        Ok(gpa as usize)
    }

    /// Copies guest RAM at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutsideRam> {
        let offset = self.offset_of(gpa, buf.len())?;
        self.mapping.read(offset, buf);
        Ok(())
    }

    /// Copies `data` into guest RAM at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), OutsideRam> {
        let offset = self.offset_of(gpa, data.len())?;
        self.mapping.write(offset, data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!("64M".parse::<MemSize>().unwrap().bytes(), 64 << 20);
        assert_eq!("1G".parse::<MemSize>().unwrap().bytes(), 1 << 30);
        assert_eq!("1GiB".parse::<MemSize>().unwrap().bytes(), 1 << 30);
        assert_eq!("4096K".parse::<MemSize>().unwrap().bytes(), 4 << 20);
        assert_eq!("2097152".parse::<MemSize>().unwrap().bytes(), 2 << 20);
    }

    #[test]
    fn sizes_outside_the_bounds_or_malformed_are_refused() {
        assert!(matches!(
            "1M".parse::<MemSize>(),
            Err(MemSizeError::OutOfBounds { .. })
        ));
        assert!(matches!(
            "4G".parse::<MemSize>(),
            Err(MemSizeError::OutOfBounds { .. })
        ));
        assert!(matches!(
            "99999999999999999999G".parse::<MemSize>(),
            Err(MemSizeError::Parse { .. })
        ));
        assert!(matches!(
            "64X".parse::<MemSize>(),
            Err(MemSizeError::Parse { .. })
        ));
        assert!(matches!(
            "".parse::<MemSize>(),
            Err(MemSizeError::Parse { .. })
        ));
        assert!(matches!(
            "2097153".parse::<MemSize>(),
            Err(MemSizeError::NotPageMultiple { .. })
        ));
        assert!(matches!(
            "18446744073709551615K".parse::<MemSize>(),
            Err(MemSizeError::OutOfBounds { .. })
        ));
    }

    #[test]
    fn sizes_display_in_their_largest_unit() {
        assert_eq!(MemSize::new(64 << 20).unwrap().to_string(), "64M");
        assert_eq!(MemSize::new(1 << 30).unwrap().to_string(), "1G");
    }

    #[test]
    fn guest_ram_round_trips_bytes_at_its_edges() {
        let mem = GuestMemory::new(MemSize::new(2 << 20).unwrap()).unwrap();
        mem.write(layout::NULL_GUARD_END, b"ab").unwrap();
        mem.write((2 << 20) - 2, b"yz").unwrap();
        let mut b = [0u8; 2];
        mem.read(layout::NULL_GUARD_END, &mut b).unwrap();
        assert_eq!(&b, b"ab");
        mem.read((2 << 20) - 2, &mut b).unwrap();
        assert_eq!(&b, b"yz");
    }

    #[test]
    fn accesses_in_the_null_guard_or_past_ram_are_refused() {
        let mem = GuestMemory::new(MemSize::new(2 << 20).unwrap()).unwrap();
        let mut b = [0u8; 2];
        assert!(mem.read(8, &mut b).is_err());
        assert!(mem.read(layout::NULL_GUARD_END - 1, &mut b).is_err());
        assert!(mem.read((2 << 20) - 1, &mut b).is_err());
        assert!(mem.write(u64::MAX, &b).is_err());
        let err = mem.read(2 << 20, &mut b).unwrap_err();
        assert!(err.to_string().contains("0x200000"), "{err}");
    }
}
