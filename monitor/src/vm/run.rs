//! Running a guest on a machine of one node ([`run_image`], over the node's event loop in
//! [`crate::node`]), the marker choice, and the errors that end a run: each names what happened
//! (guest RIP, instruction bytes, disassembly where relevant).

use std::fmt;
use std::io::Write;

use iced_x86::{Decoder, DecoderOptions};
use nix::sys::signal::Signal;
use vsmp_affinity::{AffinityError, Placement};

use super::elf::{ElfError, GuestImage};
use super::memory::{GuestMemory, MemSize, MemoryError};
use super::process::ProcessError;
use super::stats::TrapStats;
use super::trace::TraceError;
use crate::devices::DeviceError;
use crate::emulate::{EmulateError, InsnSite, MAX_INSN_BYTES};
use crate::marker::Marker;

/// `si_code` of a fault the kernel raised itself: for SIGSEGV, a #GP (e.g. a privileged
/// instruction executed in user mode).
const SI_KERNEL: i32 = 0x80;

/// How to run a guest.
#[derive(Debug, Clone, Copy)]
pub struct RunConfig {
    pub mem: MemSize,
    pub marker: Marker,
    pub placement: Placement,
}

/// Where the marker came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkerSource {
    /// The image's `.vsmp.marker` section.
    Image,
    /// `--marker`.
    Flag,
    /// Neither: the default (`ud2`).
    Default,
}

/// The image's marker and `--marker` disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the guest was built with marker {image} (its {} section) but --marker {flag} was given",
    crate::marker::MARKER_SECTION
)]
pub struct MarkerConflict {
    pub image: Marker,
    pub flag: Marker,
}

/// Chooses the marker from the image's section and `--marker`: they must agree if both are
/// present; with neither the default applies.
pub fn choose_marker(
    image: Option<Marker>,
    flag: Option<Marker>,
) -> Result<(Marker, MarkerSource), MarkerConflict> {
    match (image, flag) {
        (Some(image), Some(flag)) if image != flag => Err(MarkerConflict { image, flag }),
        (Some(m), _) => Ok((m, MarkerSource::Image)),
        (None, Some(m)) => Ok((m, MarkerSource::Flag)),
        (None, None) => Ok((Marker::default(), MarkerSource::Default)),
    }
}

/// Why a run ended other than by the guest writing to the exit port.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot create guest memory")]
    Memory(#[from] MemoryError),
    #[error("cannot load the guest image")]
    Load(#[from] ElfError),
    #[error("cannot pin the monitor thread")]
    Pin(#[from] AffinityError),
    #[error("cannot start the VM process")]
    Spawn(#[from] ProcessError),
    #[error("tracing the VM process failed")]
    Trace(#[from] TraceError),
    #[error(
        "guest attempted host system call {nr} ({name}) with {via} at RIP {rip:#x}; it was not executed"
    )]
    HostSyscall {
        nr: u64,
        name: &'static str,
        via: &'static str,
        rip: u64,
    },
    #[error("guest crashed: {signal} ({cause}) at address {addr:#x}, {insn}")]
    GuestCrashed {
        signal: Signal,
        cause: &'static str,
        addr: u64,
        insn: InsnAt,
    },
    #[error(transparent)]
    Emulate(#[from] EmulateError),
    #[error("the emulator asked to run natively an instruction that faulted natively: {insn}")]
    NativeRetryOfFault { insn: InsnAt },
    #[error("vCPU {vcpu} halted forever ({insn} at RIP {rip:#x} with no interrupt source)")]
    HaltedForever {
        vcpu: u32,
        insn: &'static str,
        rip: u64,
    },
    #[error("the VM process exited unexpectedly with status {status}")]
    VmExited { status: i32 },
    #[error(
        "the VM process was killed by its seccomp filter (SIGSYS): a system call escaped \
         PTRACE_SYSEMU, e.g. through the kernel's [vsyscall] page"
    )]
    KilledBySeccomp,
    #[error("the VM process was killed unexpectedly by {signal}")]
    VmKilled { signal: Signal },
    #[error("cannot write the guest's console output")]
    Console(#[source] DeviceError),
}

/// An instruction the guest stopped at, for error messages: its site (bytes and disassembly)
/// when its bytes lie in guest RAM, otherwise just its address.
#[derive(Debug, Clone, Copy)]
pub enum InsnAt {
    Readable(InsnSite),
    Unreadable { rip: u64 },
}

impl InsnAt {
    /// Reads the instruction at `rip`: its bytes if it decodes, else as many of the 15 bytes
    /// there as lie in guest RAM.
    pub fn read(memory: &GuestMemory, rip: u64) -> InsnAt {
        let mut buf = [0u8; MAX_INSN_BYTES];
        for len in (1..=MAX_INSN_BYTES).rev() {
            if memory.read(rip, &mut buf[..len]).is_ok() {
                let insn = Decoder::with_ip(64, &buf[..len], rip, DecoderOptions::NONE).decode();
                let len = if insn.is_invalid() { len } else { insn.len() };
                return InsnAt::Readable(InsnSite::new(rip, &buf[..len]));
            }
        }
        InsnAt::Unreadable { rip }
    }
}

impl fmt::Display for InsnAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InsnAt::Readable(site) => site.fmt(f),
            InsnAt::Unreadable { rip } => {
                write!(
                    f,
                    "guest rip {rip:#x} (outside guest RAM: no instruction bytes)"
                )
            }
        }
    }
}

/// Runs `image` to its end on a machine of one node (the node's event loop,
/// [`crate::node::run_node`], with no DSM): loads it into fresh guest RAM, starts the VM
/// process, and traps and emulates until the guest writes its exit status (returned) or
/// something ends the run. The console UART writes to `console`; `stats`, if given, receives
/// every trap by kind and the stop-to-stop intervals.
pub fn run_image(
    image: &GuestImage,
    config: &RunConfig,
    console: Box<dyn Write + Send>,
    stats: Option<&mut TrapStats>,
) -> Result<u8, crate::node::NodeError> {
    let memory = GuestMemory::new(config.mem)?;
    let cfg = crate::node::NodeConfig {
        marker: config.marker,
        placement: config.placement,
        flush_interval: crate::node::DEFAULT_FLUSH_INTERVAL,
        twins: crate::node::DEFAULT_TWINS,
        protection: crate::vm::protect::Choice::Auto,
        label: false,
    };
    let report = crate::node::run_node(image, memory, None, &cfg, console)?;
    if let Some(s) = stats {
        *s = report.stats.by_kind;
    }
    Ok(report.status)
}

/// The kernel's reason for a fault signal, from its `si_code`.
pub fn signal_cause(signal: Signal, code: i32) -> &'static str {
    match (signal, code) {
        (_, SI_KERNEL) => "general protection fault",
        (Signal::SIGSEGV, 1) => "address not mapped",
        (Signal::SIGSEGV, 2) => "access not permitted",
        (Signal::SIGBUS, 1) => "invalid address alignment",
        (Signal::SIGBUS, 2) => "nonexistent physical address",
        (Signal::SIGBUS, 3) => "object-specific hardware error",
        (Signal::SIGILL, 1) => "illegal opcode",
        (Signal::SIGILL, 2) => "invalid opcode (#UD)",
        (Signal::SIGILL, 5) => "privileged opcode",
        (Signal::SIGFPE, 1) => "integer divide by zero",
        (Signal::SIGFPE, 2) => "integer overflow",
        (Signal::SIGFPE, 3..=8) => "floating-point exception",
        (Signal::SIGTRAP, _) => "breakpoint or trace trap not at a marker",
        _ => "unexpected signal",
    }
}

/// The name of x86-64 system call `nr` (the common ones).
pub fn syscall_name(nr: u64) -> &'static str {
    const FIRST: [&str; 63] = [
        "read",
        "write",
        "open",
        "close",
        "stat",
        "fstat",
        "lstat",
        "poll",
        "lseek",
        "mmap",
        "mprotect",
        "munmap",
        "brk",
        "rt_sigaction",
        "rt_sigprocmask",
        "rt_sigreturn",
        "ioctl",
        "pread64",
        "pwrite64",
        "readv",
        "writev",
        "access",
        "pipe",
        "select",
        "sched_yield",
        "mremap",
        "msync",
        "mincore",
        "madvise",
        "shmget",
        "shmat",
        "shmctl",
        "dup",
        "dup2",
        "pause",
        "nanosleep",
        "getitimer",
        "alarm",
        "setitimer",
        "getpid",
        "sendfile",
        "socket",
        "connect",
        "accept",
        "sendto",
        "recvfrom",
        "sendmsg",
        "recvmsg",
        "shutdown",
        "bind",
        "listen",
        "getsockname",
        "getpeername",
        "socketpair",
        "setsockopt",
        "getsockopt",
        "clone",
        "fork",
        "vfork",
        "execve",
        "exit",
        "wait4",
        "kill",
    ];
    if let Some(name) = usize::try_from(nr).ok().and_then(|i| FIRST.get(i)) {
        return name;
    }
    match nr {
        72 => "fcntl",
        78 => "getdents",
        79 => "getcwd",
        80 => "chdir",
        82 => "rename",
        83 => "mkdir",
        84 => "rmdir",
        85 => "creat",
        86 => "link",
        87 => "unlink",
        89 => "readlink",
        90 => "chmod",
        92 => "chown",
        96 => "gettimeofday",
        102 => "getuid",
        158 => "arch_prctl",
        186 => "gettid",
        200 => "tkill",
        201 => "time",
        202 => "futex",
        217 => "getdents64",
        218 => "set_tid_address",
        228 => "clock_gettime",
        230 => "clock_nanosleep",
        231 => "exit_group",
        234 => "tgkill",
        257 => "openat",
        262 => "newfstatat",
        263 => "unlinkat",
        273 => "set_robust_list",
        293 => "pipe2",
        302 => "prlimit64",
        309 => "getcpu",
        318 => "getrandom",
        319 => "memfd_create",
        322 => "execveat",
        334 => "rseq",
        435 => "clone3",
        436 => "close_range",
        437 => "openat2",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_marker_wins_and_a_conflicting_flag_is_refused() {
        assert_eq!(
            choose_marker(Some(Marker::Int3), None),
            Ok((Marker::Int3, MarkerSource::Image))
        );
        assert_eq!(
            choose_marker(Some(Marker::Int3), Some(Marker::Int3)),
            Ok((Marker::Int3, MarkerSource::Image))
        );
        assert_eq!(
            choose_marker(None, Some(Marker::Int3)),
            Ok((Marker::Int3, MarkerSource::Flag))
        );
        assert_eq!(
            choose_marker(None, None),
            Ok((Marker::Ud2, MarkerSource::Default))
        );
        let err = choose_marker(Some(Marker::Ud2), Some(Marker::Int3)).unwrap_err();
        assert!(err.to_string().contains("--marker int3"), "{err}");
    }

    #[test]
    fn common_system_calls_have_names() {
        assert_eq!(syscall_name(2), "open");
        assert_eq!(syscall_name(62), "kill");
        assert_eq!(syscall_name(257), "openat");
        assert_eq!(syscall_name(100_000), "unknown");
    }
}
