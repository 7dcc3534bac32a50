//! Page protection of guest RAM in the VM process: how the DSM learns of the guest's first
//! write to a page (the page is write-protected, the write faults, the monitor sees the fault
//! as a ptrace stop) and how it lets the write go on (the page is unprotected).
//!
//! Two mechanisms, measured side by side by `vsmp bench fault` (`docs/coherence.md`, write
//! detection):
//! - **userfaultfd write-protect** (the default): the VM process creates a userfaultfd (a
//!   system call the monitor injects through the stub) whose descriptor the monitor takes
//!   (`pidfd_getfd`) and holds; guest RAM is registered for write-protect faults delivered as
//!   SIGBUS (`UFFD_FEATURE_SIGBUS`), so a write to a protected page is a signal-delivery-stop
//!   with the guest's registers at hand, exactly like a native fault; and the monitor changes
//!   protection with an `ioctl` of its own, with no stop of the VM process at all.
//! - **`mprotect` injected through the stub**: a write to a read-only page is a SIGSEGV
//!   (`SEGV_ACCERR`); every protection change is a system call run in the VM process, two
//!   extra ptrace stops. The fallback where userfaultfd is unavailable (a container whose
//!   seccomp profile refuses it).
//!
//! Pages stay readable and executable either way: code pages keep running, and an
//! instruction fetch never faults as a write.
//!
//! Changes are queued ([`Protector::set`]) and carried out together ([`Protector::apply`]),
//! adjacent pages with the same protection in one operation.
#![deny(unsafe_code)]

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::str::FromStr;

use nix::errno::Errno;
use nix::sys::signal::Signal;

use super::process::{self, ProcessError};
use super::sys;
use super::trace::Tracee;

const PAGE: u64 = 4096;

/// `si_code` of a SIGSEGV for an access the page's protection does not permit.
const SEGV_ACCERR: i32 = 2;
/// `si_code` of the SIGBUS a userfaultfd in SIGBUS mode raises.
const BUS_ADRERR: i32 = 2;
/// `userfaultfd(2)` flag: handle faults from user mode only.
const UFFD_USER_MODE_ONLY: u64 = 1;

/// Which mechanism to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// userfaultfd write-protect held by the monitor.
    Uffd,
    /// `mprotect` injected through the VM process's stub.
    Mprotect,
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mechanism::Uffd => "uffd",
            Mechanism::Mprotect => "mprotect",
        })
    }
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Choice {
    /// userfaultfd where it works, else `mprotect` (with a warning saying why).
    #[default]
    Auto,
    Only(Mechanism),
}

impl FromStr for Choice {
    type Err = String;
    fn from_str(s: &str) -> Result<Choice, String> {
        match s {
            "auto" => Ok(Choice::Auto),
            "uffd" => Ok(Choice::Only(Mechanism::Uffd)),
            "mprotect" => Ok(Choice::Only(Mechanism::Mprotect)),
            other => Err(format!(
                "unknown protection mechanism {other:?} (auto, uffd or mprotect)"
            )),
        }
    }
}

impl fmt::Display for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Choice::Auto => f.write_str("auto"),
            Choice::Only(m) => m.fmt(f),
        }
    }
}

/// Why page protection could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    #[error("cannot create a userfaultfd in the VM process: {0}")]
    UffdCreate(Errno),
    #[error("cannot take the VM process's userfaultfd (pidfd_getfd)")]
    UffdTake(#[source] Errno),
    #[error("cannot register guest RAM for userfaultfd write-protection")]
    UffdRegister(#[source] Errno),
    #[error("userfaultfd write-protect of {start:#x}+{len:#x} failed")]
    UffdProtect {
        start: u64,
        len: u64,
        #[source]
        source: Errno,
    },
    #[error("mprotect({start:#x}, {len:#x}) in the VM process failed")]
    Mprotect {
        start: u64,
        len: u64,
        #[source]
        source: Errno,
    },
    #[error(transparent)]
    Process(#[from] ProcessError),
}

#[derive(Debug)]
enum Backend {
    Uffd(OwnedFd),
    Mprotect,
}

/// Protection counters, for `--stats` and the benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProtectCounters {
    /// Pages whose protection changed.
    pub pages: u64,
    /// Operations (ioctls or injected calls) that changed them.
    pub operations: u64,
}

/// The protection of every page of guest RAM in one VM process.
#[derive(Debug)]
pub struct Protector {
    backend: Backend,
    ram_start: u64,
    ram_end: u64,
    /// Per page (by guest page number): what the guest may write, as last asked.
    writable: Vec<bool>,
    /// What the VM process has now.
    applied: Vec<bool>,
    /// Pages asked to change since the last apply.
    touched: Vec<u32>,
    counters: ProtectCounters,
}

impl Protector {
    /// Write-protects all of guest RAM `[ram_start, ram_end)` in the stopped VM process with
    /// the chosen mechanism.
    pub fn attach(
        choice: Choice,
        tracee: &mut Tracee,
        ram_start: u64,
        ram_end: u64,
    ) -> Result<Protector, ProtectError> {
        let backend = match choice {
            Choice::Only(Mechanism::Uffd) => {
                Backend::Uffd(create_uffd(tracee, ram_start, ram_end)?)
            }
            Choice::Only(Mechanism::Mprotect) => Backend::Mprotect,
            Choice::Auto => match create_uffd(tracee, ram_start, ram_end) {
                Ok(fd) => Backend::Uffd(fd),
                Err(e) => {
                    tracing::warn!(
                        "userfaultfd write-protection is unavailable ({e}); protecting guest \
                         pages with mprotect injected into the VM process, which costs two \
                         ptrace stops per change"
                    );
                    Backend::Mprotect
                }
            },
        };
        let pages = (ram_end / PAGE) as usize;
        let mut p = Protector {
            backend,
            ram_start,
            ram_end,
            writable: vec![false; pages],
            applied: vec![true; pages],
            touched: Vec::with_capacity(4096),
            counters: ProtectCounters::default(),
        };
        p.change(tracee, ram_start, ram_end - ram_start, false)?;
        p.applied.fill(false);
        Ok(p)
    }

    pub fn mechanism(&self) -> Mechanism {
        match self.backend {
            Backend::Uffd(_) => Mechanism::Uffd,
            Backend::Mprotect => Mechanism::Mprotect,
        }
    }

    /// Whether changes need the VM process stopped (injected calls do).
    pub fn needs_stopped(&self) -> bool {
        matches!(self.backend, Backend::Mprotect)
    }

    pub fn counters(&self) -> ProtectCounters {
        self.counters
    }

    /// Whether the guest may write page `page` (as last asked; what the monitor's own writes
    /// check too).
    pub fn writable(&self, page: u32) -> bool {
        self.writable.get(page as usize).copied().unwrap_or(false)
    }

    /// Asks for `page` to become writable or read only (carried out by [`Protector::apply`]).
    pub fn set(&mut self, page: u32, writable: bool) {
        let i = page as usize;
        if i >= self.writable.len() || u64::from(page) * PAGE < self.ram_start {
            return;
        }
        if self.writable[i] != writable {
            self.writable[i] = writable;
            self.touched.push(page);
        }
    }

    /// Whether changes are waiting.
    pub fn pending(&self) -> bool {
        !self.touched.is_empty()
    }

    /// Carries out the queued changes, adjacent pages of one protection together. The VM
    /// process must be stopped if [`Protector::needs_stopped`].
    pub fn apply(&mut self, tracee: &mut Tracee) -> Result<(), ProtectError> {
        if self.touched.is_empty() {
            return Ok(());
        }
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        let mut k = 0;
        let mut result = Ok(());
        while k < touched.len() {
            let first = touched[k] as usize;
            let want = self.writable[first];
            let mut end = first;
            while k < touched.len() && touched[k] as usize == end && self.writable[end] == want {
                end += 1;
                k += 1;
            }
            let run = first..end;
            if self.applied[run.clone()].iter().all(|a| *a == want) {
                continue;
            }
            if let Err(e) = self.change(
                tracee,
                first as u64 * PAGE,
                (end - first) as u64 * PAGE,
                want,
            ) {
                result = Err(e);
                break;
            }
            self.applied[run].fill(want);
            self.counters.pages += (end - first) as u64;
        }
        touched.clear();
        self.touched = touched;
        result
    }

    fn change(
        &mut self,
        tracee: &mut Tracee,
        start: u64,
        len: u64,
        writable: bool,
    ) -> Result<(), ProtectError> {
        self.counters.operations += 1;
        match &self.backend {
            Backend::Uffd(fd) => sys::uffd_write_protect(fd.as_fd(), start, len, !writable)
                .map_err(|source| ProtectError::UffdProtect { start, len, source }),
            Backend::Mprotect => {
                let prot =
                    libc::PROT_READ | libc::PROT_EXEC | if writable { libc::PROT_WRITE } else { 0 };
                let ret = process::inject(
                    tracee,
                    libc::SYS_mprotect as u64,
                    [start, len, prot as u64, 0, 0, 0],
                )?;
                if ret < 0 {
                    return Err(ProtectError::Mprotect {
                        start,
                        len,
                        source: Errno::from_raw(-ret as i32),
                    });
                }
                Ok(())
            }
        }
    }

    /// Whether a fault signal of the VM process is a write to a page this protector holds
    /// read only: the guest's first write to it, for the DSM.
    pub fn is_write_fault(&self, signal: Signal, si_code: i32, addr: u64) -> bool {
        let ours = match self.backend {
            Backend::Uffd(_) => signal == Signal::SIGBUS && si_code == BUS_ADRERR,
            Backend::Mprotect => signal == Signal::SIGSEGV && si_code == SEGV_ACCERR,
        };
        ours && addr >= self.ram_start
            && addr < self.ram_end
            && !self.applied[(addr / PAGE) as usize]
    }
}

/// Creates a userfaultfd in the stopped VM process, takes it into the monitor, closes the VM
/// process's copy, and registers guest RAM for write-protect faults as SIGBUS.
fn create_uffd(tracee: &mut Tracee, start: u64, end: u64) -> Result<OwnedFd, ProtectError> {
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | UFFD_USER_MODE_ONLY;
    let fd = process::inject(tracee, libc::SYS_userfaultfd as u64, [flags, 0, 0, 0, 0, 0])?;
    if fd < 0 {
        return Err(ProtectError::UffdCreate(Errno::from_raw(-fd as i32)));
    }
    let taken = sys::take_fd_of(tracee.pid(), fd as i32);
    // The VM process keeps no descriptor, whatever happened.
    process::inject(tracee, libc::SYS_close as u64, [fd as u64, 0, 0, 0, 0, 0])?;
    let uffd = taken.map_err(ProtectError::UffdTake)?;
    sys::uffd_register_wp(uffd.as_fd(), start, end - start).map_err(ProtectError::UffdRegister)?;
    Ok(uffd)
}
