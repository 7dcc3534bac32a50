//! Spawning and confining the VM process.
//!
//! 1. The monitor forks and seizes the child (PTRACE_SEIZE, so that it can interrupt the
//!    running guest) with PTRACE_O_EXITKILL (the child dies with the monitor) and
//!    PTRACE_O_TRACESYSGOOD; the child (`sys::child_main`) sets PR_SET_PDEATHSIG, moves to its
//!    own process group, waits until it is seized, maps guest RAM at VA == GPA over
//!    `[NULL_GUARD_END, mem)` with MAP_FIXED_NOREPLACE, maps the stub page at [`STUB_ADDR`] (`syscall; int3`), resets its
//!    signal handlers, closes every descriptor, installs a seccomp filter that allows system
//!    calls only from the stub's `syscall` (and kills the process for any other), and stops
//!    by jumping into the stub (a getpid, then the `int3`: SIGTRAP).
//! 2. The monitor pins the child beside itself, then reads `/proc/PID/maps` and unmaps
//!    every other mapping (the vsmp binary, libc, heap, stacks, vdso, vvar, the monitor's own
//!    view of guest RAM) by injecting `munmap` through the stub: RIP = stub, RAX = SYS_munmap,
//!    PTRACE_CONT, the `int3` after the `syscall` stops it again.
//! 3. It checks that only guest RAM, the stub and the kernel's `[vsyscall]` page remain, resets
//!    the x87/SSE state and all registers, points RIP at the guest entry and RSP at the boot
//!    stack, and resumes under PTRACE_SYSEMU.

use std::fs;

use nix::errno::Errno;
use nix::sys::ptrace::Options;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use vsmp_affinity::{AffinityError, Placement};

use super::memory::GuestMemory;
use super::sys::{self, ChildSpec, ChildStep};
use super::trace::{Event, StopEvent, Stopped, TraceError, Tracee};
use crate::layout;

/// Where the stub page lives in the VM process: far above guest RAM (which ends below 3 GiB) and
/// the APIC page, and below where Linux puts PIE executables (0x5555...) and mmap areas
/// (0x7f...), so MAP_FIXED_NOREPLACE cannot collide with what the forked child still holds.
pub const STUB_ADDR: u64 = 0x3f00_0000_0000;

/// The stub: `syscall; int3; int3`. The monitor injects its own system calls through it.
const STUB_CODE: [u8; 4] = [0x0f, 0x05, 0xcc, 0xcc];

/// Mappings at or above this address are in the kernel's half (`[vsyscall]`): munmap cannot
/// remove them.
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;

/// Most mappings the forked child can hold that the monitor will try to unmap.
const MAX_STRIPPED_MAPPINGS: usize = 4096;

/// The initial RFLAGS of the guest: IF (the host requires it in user mode) and the reserved bit 1.
const INITIAL_RFLAGS: u64 = 0x202;

/// The x86-64 user code and stack segment selectors Linux gives 64-bit processes.
const USER_CS: u64 = 0x33;
const USER_SS: u64 = 0x2b;

/// Why the VM process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot fork the VM process")]
    Fork(#[source] Errno),
    #[error("cannot seize the VM process (PTRACE_SEIZE)")]
    Seize(#[source] Errno),
    #[error("the VM process failed while {}", step.describe())]
    ChildSetup { step: ChildStep },
    #[error("the VM process exited during set-up with status {status}")]
    ChildExited { status: i32 },
    #[error("the VM process was killed during set-up by {signal}")]
    ChildKilled { signal: Signal },
    #[error("the VM process stopped with {signal} during set-up")]
    UnexpectedSetupStop { signal: Signal },
    #[error("the VM process stopped for a system call during set-up")]
    UnexpectedSyscallStop,
    #[error("cannot pin the VM process")]
    Pin(#[source] AffinityError),
    #[error("cannot read /proc/{pid}/maps")]
    ReadMaps {
        pid: Pid,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse /proc/{pid}/maps line {line:?}")]
    ParseMaps { pid: Pid, line: String },
    #[error("the VM process holds more than {MAX_STRIPPED_MAPPINGS} mappings")]
    TooManyMappings,
    #[error("munmap({start:#x}, {len:#x}) in the VM process failed")]
    Munmap {
        start: u64,
        len: u64,
        #[source]
        source: Errno,
    },
    #[error("the VM process still maps {line:?} after stripping")]
    LeftoverMapping { line: String },
    #[error(transparent)]
    Trace(#[from] TraceError),
}

/// Forks the VM process over `memory`, strips it down to guest RAM and the stub, pins it as
/// `placement` says, sets the guest's initial registers (entry, boot stack) and resumes it
/// under PTRACE_SYSEMU, as vCPU 0 of 1. The returned tracee is running.
pub fn spawn(
    memory: &GuestMemory,
    entry: u64,
    placement: Placement,
) -> Result<Tracee, ProcessError> {
    let tracee = spawn_stopped(memory, entry, placement, 0, 1)?;
    tracee.resume()?;
    Ok(tracee)
}

/// As [`spawn`], for vCPU `vcpu` of `vcpus`, and leaves the tracee stopped at the entry (the
/// monitor sets up page protection first).
pub fn spawn_stopped(
    memory: &GuestMemory,
    entry: u64,
    placement: Placement,
    vcpu: u32,
    vcpus: u32,
) -> Result<Tracee, ProcessError> {
    let (seized_rx, seized_tx) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(ProcessError::Fork)?;
    let spec = ChildSpec {
        parent: std::process::id() as i32,
        memfd: std::os::fd::AsRawFd::as_raw_fd(&memory.memfd()),
        ram_start: memory.ram_start(),
        ram_end: memory.ram_end(),
        stub_addr: STUB_ADDR,
        stub_code: STUB_CODE,
        seized_fd: std::os::fd::AsRawFd::as_raw_fd(&seized_rx),
    };
    let pid = sys::fork_vm_process(&spec).map_err(ProcessError::Fork)?;
    drop(seized_rx);
    // From here on, dropping `tracee` kills and reaps the child on every error path.
    let mut tracee = Tracee::adopt(pid);
    let options = Options::PTRACE_O_EXITKILL | Options::PTRACE_O_TRACESYSGOOD;
    sys::seize(pid, options.bits(), std::os::fd::AsFd::as_fd(&seized_tx))
        .map_err(ProcessError::Seize)?;
    drop(seized_tx);
    let stopped = expect_signal_stop(tracee.wait()?, Signal::SIGTRAP)?;
    if let Placement::Together(core) = placement {
        vsmp_affinity::pin_process(pid.as_raw(), core).map_err(ProcessError::Pin)?;
    }
    let stopped = strip_mappings(stopped, memory)?;
    check_only_guest_mappings(pid, memory)?;
    stopped.reset_fp_state()?;
    stopped.set_regs(initial_regs(entry, memory.ram_end(), vcpu, vcpus))?;
    Ok(tracee)
}

/// The guest's registers at its entry (the boot convention of `docs/guest-platform.md`): RIP at
/// the entry, RSP at vCPU `vcpu`'s boot stack, RDI = `vcpu`, RSI = `vcpus`, RFLAGS and the user
/// segment selectors; everything else zero. FS/GS bases are zero: the child's TLS is gone.
fn initial_regs(entry: u64, mem_bytes: u64, vcpu: u32, vcpus: u32) -> libc::user_regs_struct {
    libc::user_regs_struct {
        r15: 0,
        r14: 0,
        r13: 0,
        r12: 0,
        rbp: 0,
        rbx: 0,
        r11: 0,
        r10: 0,
        r9: 0,
        r8: 0,
        rax: 0,
        rcx: 0,
        rdx: 0,
        rsi: u64::from(vcpus),
        rdi: u64::from(vcpu),
        orig_rax: u64::MAX,
        rip: entry,
        cs: USER_CS,
        eflags: INITIAL_RFLAGS,
        rsp: layout::boot_stack_top(mem_bytes, vcpu),
        ss: USER_SS,
        fs_base: 0,
        gs_base: 0,
        ds: 0,
        es: 0,
        fs: 0,
        gs: 0,
    }
}

fn expect_signal_stop(event: StopEvent<'_>, want: Signal) -> Result<Stopped<'_>, ProcessError> {
    match event {
        StopEvent::Signal(stopped, signal) if signal == want => Ok(stopped),
        StopEvent::Signal(_, signal) => Err(ProcessError::UnexpectedSetupStop { signal }),
        StopEvent::Syscall(_) => Err(ProcessError::UnexpectedSyscallStop),
        StopEvent::Exited(status) => Err(match ChildStep::from_exit_status(status) {
            Some(step) => ProcessError::ChildSetup { step },
            None => ProcessError::ChildExited { status },
        }),
        StopEvent::Killed(signal) => Err(ProcessError::ChildKilled { signal }),
    }
}

/// A mapping in `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MapsEntry {
    start: u64,
    end: u64,
    line: String,
}

fn read_maps(pid: Pid) -> Result<Vec<MapsEntry>, ProcessError> {
    let text = fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|source| ProcessError::ReadMaps { pid, source })?;
    parse_maps(&text).ok_or_else(|| ProcessError::ParseMaps {
        pid,
        line: text
            .lines()
            .find(|l| parse_maps_line(l).is_none())
            .unwrap_or("")
            .to_string(),
    })
}

fn parse_maps_line(line: &str) -> Option<MapsEntry> {
    let range = line.split_whitespace().next()?;
    let (start, end) = range.split_once('-')?;
    Some(MapsEntry {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        line: line.to_string(),
    })
}

fn parse_maps(text: &str) -> Option<Vec<MapsEntry>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_maps_line)
        .collect()
}

/// Whether a mapping belongs to the final VM process: guest RAM, the stub, or `[vsyscall]`.
fn is_kept(entry: &MapsEntry, memory: &GuestMemory) -> bool {
    let in_ram = entry.start >= memory.ram_start() && entry.end <= memory.ram_end();
    let is_stub = entry.start == STUB_ADDR && entry.end == STUB_ADDR + sys::STUB_PAGE_BYTES as u64;
    in_ram || is_stub || entry.start >= KERNEL_HALF
}

fn strip_mappings<'t>(
    mut stopped: Stopped<'t>,
    memory: &GuestMemory,
) -> Result<Stopped<'t>, ProcessError> {
    let pid = stopped.pid();
    let doomed: Vec<MapsEntry> = read_maps(pid)?
        .into_iter()
        .filter(|e| !is_kept(e, memory))
        .collect();
    if doomed.len() > MAX_STRIPPED_MAPPINGS {
        return Err(ProcessError::TooManyMappings);
    }
    let saved = stopped.regs()?;
    for entry in doomed {
        let len = entry.end - entry.start;
        let (next, ret) =
            inject_syscall(stopped, saved, libc::SYS_munmap as u64, [entry.start, len])?;
        stopped = next;
        if ret < 0 {
            return Err(ProcessError::Munmap {
                start: entry.start,
                len,
                source: Errno::from_raw(-ret as i32),
            });
        }
    }
    Ok(stopped)
}

/// Runs system call `nr` with `args` in the stopped VM process through the stub and returns
/// the process stopped again at the stub's `int3`, with the call's return value.
fn inject_syscall<'t>(
    stopped: Stopped<'t>,
    template: libc::user_regs_struct,
    nr: u64,
    args: [u64; 2],
) -> Result<(Stopped<'t>, i64), ProcessError> {
    let regs = libc::user_regs_struct {
        rip: STUB_ADDR,
        rax: nr,
        orig_rax: u64::MAX,
        rdi: args[0],
        rsi: args[1],
        ..template
    };
    stopped.set_regs(regs)?;
    let stopped = expect_signal_stop(stopped.resume_cont_for_stub()?, Signal::SIGTRAP)?;
    let after = stopped.regs()?;
    Ok((stopped, after.rax as i64))
}

/// Runs system call `nr` with `args` in the VM process, which is stopped (at any kind of
/// stop), through the stub, and leaves it stopped with its registers as they were. Returns
/// the call's return value. Two ptrace stops: costly, see `docs/coherence.md`.
pub fn inject(tracee: &mut Tracee, nr: u64, args: [u64; 6]) -> Result<i64, ProcessError> {
    let saved = tracee.regs()?;
    let regs = libc::user_regs_struct {
        rip: STUB_ADDR,
        rax: nr,
        orig_rax: u64::MAX,
        rdi: args[0],
        rsi: args[1],
        rdx: args[2],
        r10: args[3],
        r8: args[4],
        r9: args[5],
        ..saved
    };
    tracee.set_regs(regs)?;
    tracee.cont()?;
    loop {
        match tracee.wait_event()? {
            Event::Signal(Signal::SIGTRAP) => break,
            // An interrupt the monitor asked for earlier: let the stub run.
            Event::Interrupted | Event::GroupStop(_) => tracee.cont()?,
            Event::Signal(signal) => return Err(ProcessError::UnexpectedSetupStop { signal }),
            Event::Syscall => return Err(ProcessError::UnexpectedSyscallStop),
            Event::Exited(status) => return Err(ProcessError::ChildExited { status }),
            Event::Killed(signal) => return Err(ProcessError::ChildKilled { signal }),
        }
    }
    let ret = tracee.regs()?.rax as i64;
    tracee.set_regs(saved)?;
    Ok(ret)
}

fn check_only_guest_mappings(pid: Pid, memory: &GuestMemory) -> Result<(), ProcessError> {
    match read_maps(pid)?.into_iter().find(|e| !is_kept(e, memory)) {
        Some(e) => Err(ProcessError::LeftoverMapping { line: e.line }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_regs_follow_the_boot_convention() {
        let mem = layout::DEFAULT_MEM_BYTES;
        let regs = initial_regs(0x10_0040, mem, 1, 2);
        assert_eq!(regs.rip, 0x10_0040);
        assert_eq!(regs.rdi, 1, "RDI carries the vCPU id");
        assert_eq!(regs.rsi, 2, "RSI carries the vCPU count");
        assert_eq!(regs.rsp, layout::boot_stack_top(mem, 1));
        assert_eq!(
            regs.rax | regs.rbx | regs.rcx | regs.rdx | regs.r8 | regs.r15,
            0
        );
    }

    #[test]
    fn maps_lines_parse_into_ranges() {
        let e = parse_maps_line("7f00-7f10 r-xp 00000000 08:01 123  /usr/lib/libc.so.6").unwrap();
        assert_eq!((e.start, e.end), (0x7f00, 0x7f10));
        assert!(parse_maps_line("garbage").is_none());
        assert!(parse_maps("10000-20000 rw-s 0 0:1 2 /memfd:x\n\n").is_some());
    }

    #[test]
    fn the_stub_sits_far_from_guest_ram_and_the_apic() {
        const { assert!(STUB_ADDR > layout::APIC_BASE + 0x1000) };
        const { assert!(STUB_ADDR < 0x5555_0000_0000) };
    }

    #[test]
    fn a_spawned_vm_process_holds_only_guest_ram_the_stub_and_vsyscall() {
        use crate::vm::elf::GuestImage;
        use crate::vm::memory::MemSize;
        let mem = GuestMemory::new(MemSize::new(2 << 20).unwrap()).unwrap();
        // ud2 at the entry: the guest stops at once with SIGILL.
        GuestImage::flat(&[0x0f, 0x0b], crate::marker::Marker::Ud2)
            .load_into(&mem)
            .unwrap();
        let mut tracee = spawn(&mem, layout::IMAGE_BASE, Placement::Unpinned).unwrap();
        let pid = tracee.pid();
        let maps = read_maps(pid).unwrap();
        assert!(maps.iter().all(|e| is_kept(e, &mem)), "{maps:#?}");
        assert!(maps.iter().any(|e| e.start == STUB_ADDR), "{maps:#?}");
        assert!(
            maps.iter().any(|e| e.start == layout::NULL_GUARD_END),
            "{maps:#?}"
        );
        let fds = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
        assert_eq!(fds, 0);
        match tracee.wait().unwrap() {
            StopEvent::Signal(stopped, Signal::SIGILL) => {
                let regs = stopped.regs().unwrap();
                assert_eq!(regs.rip, layout::IMAGE_BASE);
                assert_eq!(regs.rsp, mem.ram_end());
            }
            other => panic!("unexpected {other:?}"),
        }
        drop(tracee);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
}
