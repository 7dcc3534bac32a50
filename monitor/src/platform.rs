//! What the emulator may touch of the guest besides its virtual CPU: the general registers and
//! guest memory.
//!
//! The emulator ([`crate::emulate`]) is pure code over the [`Platform`] trait. The VM side
//! implements it with ptrace (registers from `PTRACE_GETREGS`, memory through the guest RAM
//! mapping); tests, benchmarks and fuzzers use [`mock::MockPlatform`]. Only one thread, the
//! node's monitor thread, touches a platform at a time.
#![forbid(unsafe_code)]

use std::fmt;

/// The guest's general registers as ptrace sees them.
///
/// The fields carry exactly the names of `libc::user_regs_struct` (hence `eflags`, which holds
/// all of RFLAGS, and `orig_rax`), and [`From`] converts both ways, so the VM side can hand
/// over what `PTRACE_GETREGS` returned and write back what the emulator changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Regs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    /// RFLAGS (ptrace calls it `eflags`).
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

macro_rules! convert_regs {
    ($from:ident => $to:ident { $($f:ident),* $(,)? }) => {
        $to { $($f: $from.$f,)* }
    };
}

impl From<libc::user_regs_struct> for Regs {
    fn from(r: libc::user_regs_struct) -> Regs {
        convert_regs!(r => Regs {
            r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax,
            rip, cs, eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs,
        })
    }
}

impl From<Regs> for libc::user_regs_struct {
    fn from(r: Regs) -> libc::user_regs_struct {
        convert_regs!(r => user_regs_struct {
            r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax,
            rip, cs, eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs,
        })
    }
}

use libc::user_regs_struct;

/// A guest memory access that faulted (unmapped, or outside guest RAM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemFault {
    /// First guest-virtual address of the access.
    pub gva: u64,
    /// Length of the access in bytes.
    pub len: usize,
    /// Whether the access was a write.
    pub write: bool,
}

impl fmt::Display for MemFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.write { "write" } else { "read" };
        write!(
            f,
            "{kind} of {} bytes at guest address {:#x} faulted",
            self.len, self.gva
        )
    }
}

impl std::error::Error for MemFault {}

/// What the emulator may touch of the guest besides the vCPU: its registers and memory.
///
/// Implementations must not allocate in these calls: they sit on the trap path.
pub trait Platform {
    /// The guest's registers, to read and change. Whatever the emulator leaves here is what
    /// the guest resumes with.
    fn regs(&mut self) -> &mut Regs;
    /// Reads `buf.len()` bytes of guest memory at guest-virtual address `gva`. All or nothing.
    fn read_mem(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), MemFault>;
    /// Writes `data` to guest memory at `gva`. On a fault, nothing has been written.
    fn write_mem(&mut self, gva: u64, data: &[u8]) -> Result<(), MemFault>;
}

pub mod mock {
    //! A platform for tests, benchmarks and fuzzing: registers plus one contiguous block of
    //! guest memory at a base address; everything else faults.

    use super::{MemFault, Platform, Regs};

    /// Registers and a `Vec<u8>` of guest memory at `base`.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct MockPlatform {
        pub regs: Regs,
        pub base: u64,
        pub mem: Vec<u8>,
    }

    impl MockPlatform {
        /// `len` zeroed bytes of memory at guest address `base`, all registers zero.
        pub fn new(base: u64, len: usize) -> MockPlatform {
            MockPlatform {
                regs: Regs::default(),
                base,
                mem: vec![0; len],
            }
        }

        /// Memory at `base` holding `code` followed by zeros up to `len` bytes, with RIP at
        /// `base`: the usual setup of an instruction test.
        pub fn with_code(base: u64, len: usize, code: &[u8]) -> MockPlatform {
            let mut p = MockPlatform::new(base, len.max(code.len()));
            p.mem[..code.len()].copy_from_slice(code);
            p.regs.rip = base;
            p
        }

        /// The slice of `mem` for `[gva, gva + len)`, if it lies wholly inside it.
        fn range(&self, gva: u64, len: usize) -> Option<std::ops::Range<usize>> {
            let start = usize::try_from(gva.checked_sub(self.base)?).ok()?;
            let end = start.checked_add(len)?;
            (end <= self.mem.len()).then_some(start..end)
        }

        /// Reads memory for a test's assertions; panics outside the block.
        pub fn peek(&self, gva: u64, len: usize) -> &[u8] {
            let r = self.range(gva, len).expect("peek outside mock memory");
            &self.mem[r]
        }

        /// Writes memory for a test's setup; panics outside the block.
        pub fn poke(&mut self, gva: u64, data: &[u8]) {
            let r = self
                .range(gva, data.len())
                .expect("poke outside mock memory");
            self.mem[r].copy_from_slice(data);
        }
    }

    impl Platform for MockPlatform {
        fn regs(&mut self) -> &mut Regs {
            &mut self.regs
        }

        fn read_mem(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), MemFault> {
            let fault = MemFault {
                gva,
                len: buf.len(),
                write: false,
            };
            let r = self.range(gva, buf.len()).ok_or(fault)?;
            buf.copy_from_slice(&self.mem[r]);
            Ok(())
        }

        fn write_mem(&mut self, gva: u64, data: &[u8]) -> Result<(), MemFault> {
            let fault = MemFault {
                gva,
                len: data.len(),
                write: true,
            };
            let r = self.range(gva, data.len()).ok_or(fault)?;
            self.mem[r].copy_from_slice(data);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mock::MockPlatform;
    use super::*;

    #[test]
    fn regs_convert_to_and_from_ptrace_registers_field_by_field() {
        let regs = Regs {
            rax: 1,
            r15: 2,
            eflags: 0x202,
            fs_base: 3,
            gs: 4,
            ..Regs::default()
        };
        let user: libc::user_regs_struct = regs.into();
        assert_eq!(
            (user.rax, user.r15, user.eflags, user.fs_base, user.gs),
            (1, 2, 0x202, 3, 4)
        );
        assert_eq!(Regs::from(user), regs);
    }

    #[test]
    fn the_mock_faults_outside_its_memory_and_names_the_access() {
        let mut p = MockPlatform::new(0x1000, 16);
        let mut buf = [0u8; 4];
        assert!(p.read_mem(0x100c, &mut buf).is_ok());
        let fault = p.read_mem(0x100d, &mut buf).unwrap_err();
        assert_eq!(
            fault,
            MemFault {
                gva: 0x100d,
                len: 4,
                write: false
            }
        );
        assert!(p.write_mem(0xfff, &[1]).unwrap_err().write);
        assert!(fault.to_string().contains("0x100d"), "{fault}");
    }
}
