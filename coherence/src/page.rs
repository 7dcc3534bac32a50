//! Addresses of guest memory: guest-physical addresses and page numbers.

use std::fmt;

/// Bytes of a guest page: the DSM's unit of ownership, twinning and protection.
pub const PAGE_BYTES: usize = 4096;

/// A guest-physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gpa(pub u64);

impl Gpa {
    /// The page holding this address.
    pub fn page(self) -> PageNo {
        PageNo((self.0 / PAGE_BYTES as u64) as u32)
    }

    /// The offset of this address inside its page.
    pub fn offset(self) -> usize {
        (self.0 % PAGE_BYTES as u64) as usize
    }
}

impl fmt::Display for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A guest page number: `gpa / PAGE_BYTES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageNo(pub u32);

impl PageNo {
    /// The page's first address.
    pub fn gpa(self) -> Gpa {
        Gpa(u64::from(self.0) * PAGE_BYTES as u64)
    }

    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for PageNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "page {:#x}", self.gpa().0)
    }
}

/// The pages `len` bytes at `gpa` touch, lowest first (one or two for an instruction).
pub fn pages_of(gpa: Gpa, len: u64) -> impl Iterator<Item = PageNo> {
    let first = gpa.0 / PAGE_BYTES as u64;
    let last = (gpa.0 + len.max(1) - 1) / PAGE_BYTES as u64;
    (first..=last).map(|p| PageNo(p as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_split_into_pages_and_offsets() {
        let a = Gpa(0x10_2345);
        assert_eq!(a.page(), PageNo(0x102));
        assert_eq!(a.offset(), 0x345);
        assert_eq!(PageNo(0x102).gpa(), Gpa(0x10_2000));
    }

    #[test]
    fn an_access_across_a_page_boundary_touches_both_pages_lowest_first() {
        let p: Vec<_> = pages_of(Gpa(0x1ffc), 8).collect();
        assert_eq!(p, vec![PageNo(1), PageNo(2)]);
        let q: Vec<_> = pages_of(Gpa(0x1000), 4096).collect();
        assert_eq!(q, vec![PageNo(1)]);
    }
}
