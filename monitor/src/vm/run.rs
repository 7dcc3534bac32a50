//! The run loop of one vCPU: wait for a stop, classify it, emulate, resume.
//!
//! The loop is a small state machine over [`StopEvent`]s; every stop either resumes the guest
//! or ends the run with a [`RunError`] that names what happened (guest RIP, instruction bytes,
//! disassembly where relevant). From `waitpid` to the resume call nothing allocates: registers
//! live on the stack, guest memory is read through the monitor's mapping of guest RAM, the
//! statistics were allocated before the guest started.

use std::fmt;
use std::io::Write;
use std::time::Instant;

use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use nix::sys::signal::Signal;
use vsmp_affinity::{AffinityError, Placement};

use super::elf::{ElfError, GuestImage};
use super::memory::{GuestMemory, MemSize, MemoryError};
use super::process::{self, ProcessError};
use super::stats::{TrapKind, TrapStats};
use super::trace::{StopEvent, Stopped, TraceError, Tracee};
use crate::devices::DeviceError;
use crate::emulate::{self, EmulateError, InsnSite, MAX_INSN_BYTES, Outcome, Trap};
use crate::marker::Marker;
use crate::platform::{MemFault, Platform, Regs};
use crate::vcpu::{Vcpu, VcpuConfig};

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

/// The [`Platform`] of a stopped VM process: its registers (from PTRACE_GETREGS) and guest
/// memory through the monitor's mapping. Guest-virtual == guest-physical (no guest paging yet).
#[derive(Debug)]
pub struct PtracePlatform<'m> {
    pub regs: Regs,
    memory: &'m GuestMemory,
}

impl<'m> PtracePlatform<'m> {
    pub fn new(regs: Regs, memory: &'m GuestMemory) -> PtracePlatform<'m> {
        PtracePlatform { regs, memory }
    }
}

impl Platform for PtracePlatform<'_> {
    fn regs(&mut self) -> &mut Regs {
        &mut self.regs
    }

    fn read_mem(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), MemFault> {
        let len = buf.len();
        self.memory.read(gva, buf).map_err(|_| MemFault {
            gva,
            len,
            write: false,
        })
    }

    fn write_mem(&mut self, gva: u64, data: &[u8]) -> Result<(), MemFault> {
        self.memory.write(gva, data).map_err(|_| MemFault {
            gva,
            len: data.len(),
            write: true,
        })
    }
}

/// Runs `image` to its end: loads it into fresh guest RAM, starts the VM process, and traps
/// and emulates until the guest writes its exit status (returned) or something ends the run.
/// The console UART writes to `console`; `stats`, if given, records every trap.
pub fn run_image(
    image: &GuestImage,
    config: &RunConfig,
    console: Box<dyn Write + Send>,
    stats: Option<&mut TrapStats>,
) -> Result<u8, RunError> {
    let memory = GuestMemory::new(config.mem)?;
    image.load_into(&memory)?;
    if let Placement::Together(core) = config.placement {
        vsmp_affinity::pin_current_thread(core)?;
    }
    let mut tracee = process::spawn(&memory, image.entry, config.placement)?;
    let mut vcpu = Vcpu::new(VcpuConfig { id: 0, count: 1 }, console);
    let result = run_loop(&mut tracee, &memory, &mut vcpu, config.marker, stats);
    tracee.kill_and_reap();
    let flushed = vcpu.flush().map_err(RunError::Console);
    let status = result?;
    flushed?;
    Ok(status)
}

/// The loop proper. Returns the guest's exit status.
fn run_loop(
    tracee: &mut Tracee,
    memory: &GuestMemory,
    vcpu: &mut Vcpu,
    marker: Marker,
    mut stats: Option<&mut TrapStats>,
) -> Result<u8, RunError> {
    loop {
        let event = tracee.wait()?;
        let observed = Instant::now();
        if let Some(s) = stats.as_deref_mut() {
            s.stop_observed(observed);
        }
        let (stopped, signal) = match event {
            StopEvent::Signal(stopped, signal) => (stopped, signal),
            StopEvent::Syscall(stopped) => {
                if let Some(s) = stats.as_deref_mut() {
                    s.record(TrapKind::Syscall, observed.elapsed());
                }
                return Err(refuse_syscall(&stopped, memory)?);
            }
            StopEvent::Exited(status) => return Err(RunError::VmExited { status }),
            StopEvent::Killed(Signal::SIGSYS) => return Err(RunError::KilledBySeccomp),
            StopEvent::Killed(signal) => return Err(RunError::VmKilled { signal }),
        };
        let user_regs = stopped.regs()?;
        let before = Regs::from(user_regs);
        let trap = classify(&stopped, signal, &before, memory, marker)?;
        let mut platform = PtracePlatform::new(before, memory);
        let emulated = emulate::handle_trap(vcpu, &mut platform, trap)?;
        let kind = match trap {
            Trap::Marker { .. } => TrapKind::Marker(emulated.mnemonic),
            Trap::Fault { .. } => TrapKind::Fault(emulated.mnemonic),
        };
        if let (Some(s), Outcome::Halt { .. } | Outcome::Exit { .. } | Outcome::Done { .. }) =
            (stats.as_deref_mut(), emulated.outcome)
        {
            s.record(kind, observed.elapsed());
        }
        match emulated.outcome {
            Outcome::Resume | Outcome::Fence => {}
            Outcome::Atomic => {
                if let Trap::Fault { insn } = trap {
                    return Err(RunError::NativeRetryOfFault {
                        insn: InsnAt::read(memory, insn),
                    });
                }
                platform.regs.rip = trap.insn();
            }
            Outcome::Halt { .. } => {
                return Err(RunError::HaltedForever {
                    vcpu: vcpu.id(),
                    insn: mnemonic_name(emulated.mnemonic),
                    rip: trap.insn(),
                });
            }
            Outcome::Exit { status } | Outcome::Done { status } => return Ok(status),
        }
        if platform.regs != before {
            stopped.set_regs(platform.regs.into())?;
        }
        if let Some(s) = stats.as_deref_mut() {
            s.record(kind, observed.elapsed());
        }
        stopped.resume_sysemu()?;
    }
}

/// Turns a signal-delivery-stop into the trap it is, or into the guest crash it is.
fn classify(
    stopped: &Stopped<'_>,
    signal: Signal,
    regs: &Regs,
    memory: &GuestMemory,
    marker: Marker,
) -> Result<Trap, RunError> {
    let rip = regs.rip;
    match (signal, marker) {
        (Signal::SIGILL, Marker::Ud2) => {
            let mut b = [0u8; 2];
            if memory.read(rip, &mut b).is_ok() && b == [0x0f, 0x0b] {
                return Ok(Trap::Marker { insn: rip + 2 });
            }
        }
        (Signal::SIGTRAP, Marker::Int3) => {
            let mut b = [0u8; 1];
            if rip > 0 && memory.read(rip - 1, &mut b).is_ok() && b == [0xcc] {
                return Ok(Trap::Marker { insn: rip });
            }
        }
        _ => {}
    }
    let info = stopped.siginfo()?;
    if signal == Signal::SIGSEGV && info.si_code == SI_KERNEL {
        return Ok(Trap::Fault { insn: rip });
    }
    Err(crash(signal, &info, rip, memory))
}

fn crash(signal: Signal, info: &libc::siginfo_t, rip: u64, memory: &GuestMemory) -> RunError {
    let fault_signal = matches!(
        signal,
        Signal::SIGSEGV | Signal::SIGBUS | Signal::SIGILL | Signal::SIGFPE
    );
    // si_addr is meaningful for the fault signals only.
    let addr = if fault_signal {
        super::sys::si_addr(info)
    } else {
        rip
    };
    RunError::GuestCrashed {
        signal,
        cause: signal_cause(signal, info.si_code),
        addr,
        insn: InsnAt::read(memory, rip),
    }
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

/// Builds the refusal of a guest system call at a syscall-entry stop (it has not run and will
/// not: the run ends).
fn refuse_syscall(stopped: &Stopped<'_>, memory: &GuestMemory) -> Result<RunError, RunError> {
    let regs = stopped.regs()?;
    let insn_rip = regs.rip.wrapping_sub(2);
    let mut b = [0u8; 2];
    let via = match memory.read(insn_rip, &mut b).map(|_| b) {
        Ok([0x0f, 0x05]) => "syscall",
        Ok([0xcd, 0x80]) => "int $0x80",
        Ok([0x0f, 0x34]) => "sysenter",
        _ => "an unknown instruction",
    };
    let name = if via == "syscall" {
        syscall_name(regs.orig_rax)
    } else {
        "i386 system call table"
    };
    Ok(RunError::HostSyscall {
        nr: regs.orig_rax,
        name,
        via,
        rip: insn_rip,
    })
}

fn mnemonic_name(m: Mnemonic) -> &'static str {
    match m {
        Mnemonic::Hlt => "hlt",
        Mnemonic::Mwait => "mwait",
        Mnemonic::Mwaitx => "mwaitx",
        _ => "halt",
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

    #[test]
    fn the_ptrace_platform_faults_outside_guest_ram() {
        let memory = GuestMemory::new(MemSize::new(2 << 20).unwrap()).unwrap();
        let mut p = PtracePlatform::new(Regs::default(), &memory);
        p.write_mem(0x10_0000, &[1, 2, 3]).unwrap();
        let mut b = [0u8; 3];
        p.read_mem(0x10_0000, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3]);
        let f = p.read_mem(0x8, &mut b).unwrap_err();
        assert_eq!((f.gva, f.len, f.write), (0x8, 3, false));
        assert!(p.write_mem(2 << 20, &[0]).unwrap_err().write);
    }
}
