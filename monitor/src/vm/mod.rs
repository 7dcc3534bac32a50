//! The VM process and everything in the monitor that touches the host for it.
//!
//! # The VM process
//! The guest runs natively in a forked child of the monitor, traced with ptrace
//! (`PTRACE_O_EXITKILL`, and `PR_SET_PDEATHSIG` as a second guard, so it dies with the monitor).
//! After set-up ([`process`]) its address space holds exactly:
//!
//! | range | what | protection |
//! |---|---|---|
//! | `[0, layout::NULL_GUARD_END)` | nothing (null-pointer guard) | - |
//! | `[layout::NULL_GUARD_END, mem)` | guest RAM: the memfd, VA == GPA, shared with the monitor | rwx |
//! | [`process::STUB_ADDR`], one page | the monitor's stub: `syscall; int3`, rest `int3` | r-x |
//! | `0xffffffffff600000`, one page | the kernel's `[vsyscall]` page (cannot be unmapped) | --x |
//!
//! Everything the fork inherited (the vsmp binary, libc, heap, stacks, vdso, vvar, the monitor's
//! own view of guest RAM) is unmapped by `munmap` calls the monitor injects through the stub,
//! and it holds no file descriptor. The stub page is **kept**: the DSM will change page
//! protections in the VM process with `mprotect` injected the same way, and keeping it costs
//! the guest nothing: guest code that jumps into it executes a `syscall` under `PTRACE_SYSEMU`,
//! which stops in the monitor and is refused like any other guest system call.
//!
//! Before its first stop the child also unregisters glibc's rseq area (the kernel writes it
//! on every return to user mode and would raise SIGSEGV once the TLS holding it is unmapped),
//! resets every signal disposition and closes every descriptor.
//!
//! # The guest's state at entry
//! RIP = the ELF entry, RSP = `layout::boot_stack_top(mem, 0)` (the top of RAM), RFLAGS =
//! 0x202 (the host needs IF; the guest's virtual IF lives in the vCPU), every other general
//! register, FS/GS base and data selector 0, CS/SS the host's 64-bit user selectors, x87/SSE
//! state as after reset (FCW 0x37f, MXCSR 0x1f80, registers zero).
//!
//! # Confinement
//! The guest always runs under `PTRACE_SYSEMU`: a `syscall` (or `int 0x80`, `sysenter`) stops
//! in the monitor *before* the kernel runs it, and the monitor ends the run with an error naming
//! the call; the call is never executed. The monitor resumes with `PTRACE_CONT` only to run its
//! own stub during set-up, with RIP pointing at the stub.
//!
//! A seccomp filter (installed by the child before its first stop) is the second line of
//! defence: it allows a system call only when the instruction pointer is just past the stub's
//! `syscall` and kills the VM process (SIGSYS) otherwise. Under `PTRACE_SYSEMU` a guest
//! `syscall` stops in the monitor before seccomp runs, so the filter sees only what escapes
//! ptrace: the monitor's own injected calls (allowed), a monitor bug that resumed the guest
//! without SYSEMU, and the kernel's `[vsyscall]` emulation (a guest jump to
//! `0xffffffffff600000` would emulate `gettimeofday` without a ptrace stop; the filter kills
//! it, and the run ends with an error saying so).
//!
//! # The trap path
//! The node's event loop ([`crate::node`]) waits for a stop, classifies it (ud2 -> SIGILL,
//! int3 -> SIGTRAP, a privileged instruction executed natively -> SIGSEGV with `SI_KERNEL`, a
//! write to a protected page -> SIGBUS or SIGSEGV), reads the registers, calls
//! [`crate::emulate::handle_trap`] with a platform whose memory accesses are plain copies from
//! the monitor's mapping of guest RAM ([`memory`]), writes the registers back if they changed
//! and resumes with signal 0. Nothing on that path allocates.
//!
//! Threads: one monitor thread does all of it; it is the ptrace tracer (only the thread that
//! seized the VM process may issue ptrace requests for it). No locks.
//!
//! Modules: [`elf`] (loader), [`memory`] (guest RAM), [`process`] (spawn + confine, injected
//! system calls), [`protect`] (page protection), [`trace`] (ptrace stops as types), [`run`]
//! (one node, run errors), [`stats`] (`--stats`), [`bench`](mod@bench) (the trap benchmark),
//! `sys` (the only `unsafe`).
#![deny(unsafe_code)]

pub mod bench;
pub mod elf;
pub mod memory;
pub mod process;
pub mod protect;
pub mod run;
pub mod stats;
mod sys;
pub mod trace;

/// The faulting address of a SIGSEGV, SIGBUS, SIGILL or SIGFPE siginfo.
pub fn si_addr(info: &libc::siginfo_t) -> u64 {
    sys::si_addr(info)
}

pub use run::signal_cause;
