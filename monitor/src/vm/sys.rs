//! The only code in the monitor that uses `unsafe`: mapping guest RAM into the monitor,
//! copying to and from it, forking the VM process and the child's own set-up before it stops
//! for the monitor, and the few ptrace requests nix does not wrap.
//!
//! Every block does one thing and names the invariant it relies on.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::unistd::Pid;

/// A shared, read-write mapping of the whole guest-RAM memfd in the monitor's own address
/// space. Guest reads and writes on the trap path are plain memory copies through it.
///
/// The VM process maps the same memfd, so the guest writes these very pages. The monitor only
/// copies while the VM process is stopped (one vCPU, traced by the calling thread), so no
/// copy ever races with a guest store.
#[derive(Debug)]
pub struct SharedMapping {
    base: NonNull<u8>,
    len: usize,
}

impl SharedMapping {
    /// Maps `len` bytes of `fd` from offset 0, shared, read-write, anywhere.
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> Result<SharedMapping, Errno> {
        assert!(len > 0, "an empty guest RAM mapping");
        // SAFETY: a fresh mapping at an address the kernel chooses (no MAP_FIXED), so no
        // existing Rust object is affected; `fd` is a live descriptor borrowed for the call.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        let base = NonNull::new(addr.cast::<u8>()).ok_or(Errno::EINVAL)?;
        Ok(SharedMapping { base, len })
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`. Panics if the range leaves the mapping
    /// (callers bounds-check guest input first; this assertion guards that invariant).
    pub fn read(&self, offset: usize, buf: &mut [u8]) {
        assert!(offset <= self.len && buf.len() <= self.len - offset);
        // SAFETY: the source range lies inside the live mapping (asserted above), `buf` is a
        // distinct Rust allocation so the ranges do not overlap, and the VM process is stopped
        // while the monitor copies (see the type's doc), so nothing writes the source meanwhile.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
    }

    /// Copies `data` to `offset`. Panics if the range leaves the mapping.
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset <= self.len && data.len() <= self.len - offset);
        // SAFETY: the destination lies inside the live, writable mapping (asserted above) and
        // no Rust reference into the mapping exists (it is only reached through these copies);
        // `data` is a distinct allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.base.as_ptr().add(offset),
                data.len(),
            );
        }
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` describe exactly the mapping created in `map`, and no reference
        // into it outlives `self` (all access copies).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// What the forked child needs to set itself up; plain data, so the child touches no heap.
#[derive(Debug, Clone, Copy)]
pub struct ChildSpec {
    /// The monitor's pid, to detect that it died before PR_SET_PDEATHSIG took effect.
    pub parent: i32,
    /// The guest-RAM memfd (inherited across fork).
    pub memfd: i32,
    /// Guest RAM mapped at VA == GPA over `[ram_start, ram_end)`, from file offset `ram_start`.
    pub ram_start: u64,
    pub ram_end: u64,
    /// Address of the stub page and the code to put at its start.
    pub stub_addr: u64,
    pub stub_code: [u8; 4],
    /// The read end of a pipe: the monitor writes one byte once it has seized the child.
    pub seized_fd: i32,
}

/// The step of the child's set-up that failed; the child exits with `CHILD_EXIT_BASE + step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ChildStep {
    DeathSignal = 1,
    ParentGone = 2,
    Seize = 3,
    MapRam = 4,
    MapStub = 5,
    ProtectStub = 6,
    Rseq = 7,
    Seccomp = 8,
}

/// Exit statuses `CHILD_EXIT_BASE + ChildStep` report which set-up step failed.
pub const CHILD_EXIT_BASE: i32 = 100;

impl ChildStep {
    /// The step a child exit status names, if any.
    pub fn from_exit_status(status: i32) -> Option<ChildStep> {
        use ChildStep::*;
        [
            DeathSignal,
            ParentGone,
            Seize,
            MapRam,
            MapStub,
            ProtectStub,
            Rseq,
            Seccomp,
        ]
        .into_iter()
        .find(|s| CHILD_EXIT_BASE + *s as i32 == status)
    }

    /// What the step does, for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            ChildStep::DeathSignal => "prctl(PR_SET_PDEATHSIG)",
            ChildStep::ParentGone => "the monitor exited during set-up",
            ChildStep::Seize => "waiting for the monitor to seize it (PTRACE_SEIZE)",
            ChildStep::MapRam => "mapping guest RAM at its guest-physical address",
            ChildStep::MapStub => "mapping the syscall stub page",
            ChildStep::ProtectStub => "making the stub page read-execute",
            ChildStep::Seccomp => "installing its seccomp filter",
            ChildStep::Rseq => "unregistering glibc's rseq area",
        }
    }
}

/// Forks the VM process. The child waits until the caller has seized it (see [`seize`]), sets
/// itself up (see [`child_main`]) and stops with SIGTRAP at the stub's `int3`; the parent gets
/// its pid.
pub fn fork_vm_process(spec: &ChildSpec) -> Result<Pid, Errno> {
    // SAFETY: after fork the child runs only `child_main`, which calls async-signal-safe
    // functions (raw syscalls through libc), touches no heap and no lock, and never returns
    // into Rust code of the parent (it stops, then the monitor replaces its registers; every
    // failure ends in `_exit`). That is what fork in a multi-threaded process requires.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(Errno::last()),
        0 => child_main(spec),
        pid => Ok(Pid::from_raw(pid)),
    }
}

fn child_exit(step: ChildStep) -> ! {
    // SAFETY: `_exit` is async-signal-safe and ends the child without running destructors or
    // atexit handlers that belong to the parent's state.
    unsafe { libc::_exit(CHILD_EXIT_BASE + step as i32) }
}

/// The forked child's set-up: dies with the monitor, becomes its tracee, maps guest RAM and the
/// stub page, drops every descriptor and signal handler, installs its seccomp filter and stops
/// at the stub's `int3`. The monitor then unmaps everything else (see `process.rs`) and points
/// RIP at the guest entry.
fn child_main(spec: &ChildSpec) -> ! {
    // SAFETY: prctl with integer arguments only.
    if unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    } != 0
    {
        child_exit(ChildStep::DeathSignal);
    }
    // SAFETY: getppid has no arguments and cannot fail.
    if unsafe { libc::getppid() } != spec.parent {
        child_exit(ChildStep::ParentGone);
    }
    // Its own process group: the terminal's ^C and ^Z reach the node processes, which own
    // the machine, and never the guest.
    // SAFETY: setpgid with integer arguments only.
    unsafe { libc::setpgid(0, 0) };
    // Wait until the monitor has seized this process (PTRACE_SEIZE, so that it can interrupt
    // the running guest): it writes one byte, or closes the pipe if it failed.
    let mut byte = 0u8;
    // SAFETY: reads one byte into a live local.
    if unsafe { libc::read(spec.seized_fd, (&mut byte as *mut u8).cast(), 1) } != 1 {
        child_exit(ChildStep::Seize);
    }
    if !unregister_rseq() {
        child_exit(ChildStep::Rseq);
    }
    let ram_len = (spec.ram_end - spec.ram_start) as usize;
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping (it fails with EEXIST
    // instead), so no memory this child still uses is affected.
    let ram = unsafe {
        libc::mmap(
            spec.ram_start as *mut libc::c_void,
            ram_len,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE,
            spec.memfd,
            spec.ram_start as libc::off_t,
        )
    };
    if ram as u64 != spec.ram_start {
        child_exit(ChildStep::MapRam);
    }
    // SAFETY: as above, MAP_FIXED_NOREPLACE cannot clobber an existing mapping.
    let stub = unsafe {
        libc::mmap(
            spec.stub_addr as *mut libc::c_void,
            STUB_PAGE_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if stub as u64 != spec.stub_addr {
        child_exit(ChildStep::MapStub);
    }
    // SAFETY: the stub page was just mapped read-write with STUB_PAGE_BYTES bytes; fill it
    // with int3 and put the stub code at its start.
    unsafe {
        std::ptr::write_bytes(stub.cast::<u8>(), 0xcc, STUB_PAGE_BYTES);
        std::ptr::copy_nonoverlapping(
            spec.stub_code.as_ptr(),
            stub.cast::<u8>(),
            spec.stub_code.len(),
        );
    }
    // SAFETY: changes the protection of the page mapped above only.
    if unsafe { libc::mprotect(stub, STUB_PAGE_BYTES, libc::PROT_READ | libc::PROT_EXEC) } != 0 {
        child_exit(ChildStep::ProtectStub);
    }
    // Default dispositions and an empty mask: the monitor never delivers a signal, but a
    // handler left over from the monitor's runtime would point into unmapped code.
    for sig in 1..=libc::SIGRTMAX() {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: SIG_DFL is always a valid disposition; failures (invalid numbers) are
            // harmless and ignored.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
    // SAFETY: a zeroed sigset_t is the empty set after sigemptyset, which initialises it.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
    // Drop every descriptor, the memfd included (the mapping keeps guest RAM alive).
    // SAFETY: close_range takes integers only; on failure fall back to closing one by one.
    if unsafe { libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) } != 0 {
        for fd in 0..CLOSE_FALLBACK_MAX_FD {
            // SAFETY: closing a descriptor number; EBADF for unused ones is ignored.
            unsafe { libc::close(fd) };
        }
    }
    if !install_seccomp_filter(spec.stub_addr + STUB_SYSCALL_END) {
        child_exit(ChildStep::Seccomp);
    }
    // From here on a system call is allowed only from the stub. Stop for the monitor by running
    // the stub: a harmless getpid, then its int3 (SIGTRAP).
    // SAFETY: the stub page is mapped read-execute at `stub_addr` and holds `syscall; int3`;
    // the int3 stops this process for the monitor, which never resumes it here (it points RIP
    // at the stub again or at the guest), so control never returns from this jump.
    unsafe {
        std::arch::asm!(
            "jmp {stub}",
            stub = in(reg) spec.stub_addr,
            in("rax") libc::SYS_getpid,
            options(noreturn)
        )
    }
}

/// Offset just past the stub's `syscall` instruction: the instruction pointer seccomp sees for
/// a system call made by the stub.
pub const STUB_SYSCALL_END: u64 = 2;

const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// Offsets in `struct seccomp_data`.
const SECCOMP_DATA_ARCH: u32 = 4;
const SECCOMP_DATA_IP_LO: u32 = 8;
const SECCOMP_DATA_IP_HI: u32 = 12;

const fn bpf(code: u32, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// The second line of defence behind PTRACE_SYSEMU: a seccomp filter that lets a system call
/// through only when it was made by the stub's `syscall` (instruction pointer `allowed_ip`)
/// and kills the process otherwise. PTRACE_SYSEMU stops a guest `syscall` before seccomp runs,
/// so the filter only sees what escapes it: the monitor's own injected calls, a bug that
/// resumed the guest without SYSEMU, or the kernel's `[vsyscall]` emulation.
fn install_seccomp_filter(allowed_ip: u64) -> bool {
    use libc::{BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W};
    let program = [
        bpf(BPF_LD | BPF_W | BPF_ABS, 0, 0, SECCOMP_DATA_ARCH),
        bpf(BPF_JMP | BPF_JEQ | BPF_K, 0, 5, AUDIT_ARCH_X86_64),
        bpf(BPF_LD | BPF_W | BPF_ABS, 0, 0, SECCOMP_DATA_IP_LO),
        bpf(BPF_JMP | BPF_JEQ | BPF_K, 0, 3, allowed_ip as u32),
        bpf(BPF_LD | BPF_W | BPF_ABS, 0, 0, SECCOMP_DATA_IP_HI),
        bpf(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, (allowed_ip >> 32) as u32),
        bpf(BPF_RET | BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW),
        bpf(BPF_RET | BPF_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
    ];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return false;
    }
    // SAFETY: the kernel copies the program from `fprog`, which points to `program`; both
    // live on this stack frame for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    rc == 0
}

// glibc's description of the calling thread's rseq registration (glibc >= 2.35).
unsafe extern "C" {
    static __rseq_size: u32;
    static __rseq_offset: isize;
}

/// The signature glibc registers rseq areas with on x86.
const RSEQ_SIG: u32 = 0x5305_3053;
const RSEQ_FLAG_UNREGISTER: i32 = 1;
const ARCH_GET_FS: i32 = 0x1003;
const AT_RSEQ_FEATURE_SIZE: libc::c_ulong = 27;
const AT_RSEQ_ALIGN: libc::c_ulong = 28;

/// Unregisters the thread's restartable-sequences area, which glibc keeps in the thread's TLS:
/// the kernel writes it on every return to user mode and raises SIGSEGV when it cannot, which
/// it could not once the monitor unmaps the TLS. Returns false if it stays registered.
fn unregister_rseq() -> bool {
    // SAFETY: reading two constants glibc initialises before any user code runs.
    let (size, offset) = unsafe { (__rseq_size, __rseq_offset) };
    if size == 0 {
        return true; // glibc did not register (e.g. glibc.pthread.rseq=0)
    }
    let mut fs_base: u64 = 0;
    // SAFETY: ARCH_GET_FS writes one u64 through the pointer, which points to a live local.
    if unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_GET_FS, &mut fs_base as *mut u64) } != 0 {
        return false;
    }
    let area = (fs_base as i64 + offset as i64) as u64;
    // The length must equal the registered one: glibc <= 2.40 registers 32 bytes, later ones
    // the kernel's feature size rounded up to its alignment.
    // SAFETY: getauxval reads the auxiliary vector; unknown types return 0.
    let (feature, align) = unsafe {
        (
            libc::getauxval(AT_RSEQ_FEATURE_SIZE),
            libc::getauxval(AT_RSEQ_ALIGN),
        )
    };
    let rounded = if align > 0 {
        feature.div_ceil(align) * align
    } else {
        feature
    };
    for len in [32, size as u64, rounded] {
        // SAFETY: rseq(UNREGISTER) only compares its arguments with the registration and
        // clears it; it dereferences nothing on failure.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_rseq,
                area,
                len as u32,
                RSEQ_FLAG_UNREGISTER,
                RSEQ_SIG,
            )
        };
        if rc == 0 {
            return true;
        }
    }
    false
}

/// Size of the stub page.
pub const STUB_PAGE_BYTES: usize = 4096;

/// Descriptors closed one by one when close_range(2) is unavailable.
const CLOSE_FALLBACK_MAX_FD: i32 = 4096;

/// Resets the x87/SSE state of the stopped tracee `pid` to the power-on defaults, so the guest
/// does not start with register contents left over from the monitor at fork time.
pub fn reset_fp_state(pid: Pid) -> Result<(), Errno> {
    // SAFETY: user_fpregs_struct is plain integers; all-zero is a valid value.
    let mut fp: libc::user_fpregs_struct = unsafe { std::mem::zeroed() };
    fp.cwd = 0x037f; // x87 control word after FNINIT
    fp.mxcsr = 0x1f80; // MXCSR after reset: all exceptions masked
    fp.mxcr_mask = 0xffff;
    // SAFETY: PTRACE_SETFPREGS reads one user_fpregs_struct from the pointer, which points to
    // a live, initialised value for the duration of the call; `pid` is a stopped tracee of
    // this thread (the caller holds its stopped handle).
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_SETFPREGS,
            pid.as_raw(),
            std::ptr::null_mut::<libc::c_void>(),
            &fp as *const libc::user_fpregs_struct,
        )
    };
    if rc == -1 { Err(Errno::last()) } else { Ok(()) }
}

/// Seizes the forked VM process `pid` (PTRACE_SEIZE with `options`) and tells it so through
/// `seized` (the write end of its pipe).
pub fn seize(pid: Pid, options: libc::c_int, seized: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: PTRACE_SEIZE takes the options in `data` and nothing else.
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_SEIZE,
            pid.as_raw(),
            std::ptr::null_mut::<libc::c_void>(),
            options as libc::c_long as *mut libc::c_void,
        )
    };
    if rc == -1 {
        return Err(Errno::last());
    }
    nix::unistd::write(seized, &[1]).map(|_| ())
}

/// The faulting address of a SIGSEGV, SIGBUS, SIGILL or SIGFPE siginfo.
pub fn si_addr(info: &libc::siginfo_t) -> u64 {
    // SAFETY: for the fault signals the kernel fills the `si_addr` member of the union, which
    // is what this reads; callers check the signal first (for others the value is meaningless
    // but still an initialised integer-sized field of a kernel-filled struct).
    unsafe { info.si_addr() as u64 }
}

// ---- userfaultfd write-protection, held by the monitor for the VM process ----

/// `struct uffdio_api`.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_SIGBUS: u64 = 1 << 7;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

nix::ioctl_readwrite!(uffdio_api, 0xAA, 0x3F, UffdioApi);
nix::ioctl_readwrite!(uffdio_register, 0xAA, 0x00, UffdioRegister);
nix::ioctl_readwrite!(uffdio_writeprotect, 0xAA, 0x06, UffdioWriteprotect);

/// Takes a duplicate of descriptor `fd` of process `pid` (pidfd_open + pidfd_getfd; the caller
/// must be allowed to ptrace it, as its tracer is).
pub fn take_fd_of(pid: Pid, fd: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes a pid and flags; it returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if pidfd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: pidfd_getfd takes descriptors and flags; it returns a new descriptor or -1.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(Errno::last());
    }
    // SAFETY: as above, a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(got as i32) })
}

/// Enables a userfaultfd (created by the VM process) for write-protect faults delivered as
/// SIGBUS, and registers `[start, start + len)` for them.
pub fn uffd_register_wp(uffd: BorrowedFd<'_>, start: u64, len: u64) -> Result<(), Errno> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features: UFFD_FEATURE_SIGBUS | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one uffdio_api through the pointer, a live local.
    unsafe { uffdio_api(uffd.as_raw_fd(), &mut api) }?;
    let mut reg = UffdioRegister {
        range: UffdioRange { start, len },
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register, a live local.
    unsafe { uffdio_register(uffd.as_raw_fd(), &mut reg) }?;
    Ok(())
}

/// Write-protects (or unprotects) `[start, start + len)` of the VM process through its
/// userfaultfd; unprotecting wakes nothing (the monitor resumes the vCPU itself).
pub fn uffd_write_protect(
    uffd: BorrowedFd<'_>,
    start: u64,
    len: u64,
    protect: bool,
) -> Result<(), Errno> {
    let mut wp = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode: if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        },
    };
    // SAFETY: UFFDIO_WRITEPROTECT reads and writes one uffdio_writeprotect, a live local.
    unsafe { uffdio_writeprotect(uffd.as_raw_fd(), &mut wp) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_shared_mapping_copies_in_and_out() {
        let fd = nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .unwrap();
        nix::unistd::ftruncate(&fd, 8192).unwrap();
        let m = SharedMapping::map(fd.as_fd(), 8192).unwrap();
        m.write(8190, &[1, 2]);
        let mut b = [0u8; 3];
        m.read(8189, &mut b);
        assert_eq!(b, [0, 1, 2]);
    }

    #[test]
    #[should_panic]
    fn a_copy_past_the_end_of_the_mapping_is_refused() {
        let fd = nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .unwrap();
        nix::unistd::ftruncate(&fd, 4096).unwrap();
        let m = SharedMapping::map(fd.as_fd(), 4096).unwrap();
        m.write(4095, &[1, 2]);
    }

    #[test]
    fn child_exit_statuses_name_their_step() {
        assert_eq!(ChildStep::from_exit_status(104), Some(ChildStep::MapRam));
        assert_eq!(ChildStep::from_exit_status(0), None);
    }
}
