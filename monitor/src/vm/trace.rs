//! ptrace stops of the VM process, as types: a [`Tracee`] owns the traced process (killed and
//! reaped on drop), [`Tracee::wait`] yields a [`StopEvent`], and a [`Stopped`] handle, which
//! borrows the tracee, is the only way to read or change registers; resuming consumes it. So no
//! code can touch registers of a running tracee or wait twice without resuming.
//!
//! Threads: ptrace requests are valid only from the thread that became the tracer (the one that
//! forked the VM process); a `Tracee` is therefore neither `Send` nor `Sync` in spirit and the
//! monitor keeps it on its one monitor thread.

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::sys;

/// A failed ptrace or wait request on the VM process.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("waitpid on the VM process {pid} failed")]
    Wait {
        pid: Pid,
        #[source]
        source: Errno,
    },
    #[error("PTRACE_SETOPTIONS on the VM process {pid} failed")]
    SetOptions {
        pid: Pid,
        #[source]
        source: Errno,
    },
    #[error("PTRACE_GETREGS on the VM process {pid} failed")]
    GetRegs {
        pid: Pid,
        #[source]
        source: Errno,
    },
    #[error("PTRACE_SETREGS on the VM process {pid} failed")]
    SetRegs {
        pid: Pid,
        #[source]
        source: Errno,
    },
    #[error("PTRACE_SETFPREGS on the VM process {pid} failed")]
    SetFpRegs {
        pid: Pid,
        #[source]
        source: Errno,
    },
    #[error("PTRACE_GETSIGINFO on the VM process {pid} failed")]
    GetSigInfo {
        pid: Pid,
        #[source]
        source: Errno,
    },
    #[error("resuming the VM process {pid} ({how}) failed")]
    Resume {
        pid: Pid,
        how: &'static str,
        #[source]
        source: Errno,
    },
    #[error("the VM process {pid} reported an unexpected wait status {status}")]
    UnexpectedStatus { pid: Pid, status: String },
}

/// The traced VM process. Dropping it kills the process (SIGKILL) and reaps it, so no path,
/// error or panic included, leaves a process behind.
#[derive(Debug)]
pub struct Tracee {
    pid: Pid,
    reaped: bool,
}

/// What `wait` observed.
#[derive(Debug)]
pub enum StopEvent<'t> {
    /// Signal-delivery-stop: the tracee is about to receive `signal` (not delivered unless the
    /// monitor says so; the monitor never does).
    Signal(Stopped<'t>, Signal),
    /// Syscall-entry stop under PTRACE_SYSEMU: the system call has not run and will not run.
    Syscall(Stopped<'t>),
    /// The VM process exited with this status.
    Exited(i32),
    /// The VM process was killed by this signal.
    Killed(Signal),
}

/// What a non-blocking wait saw ([`Tracee::try_wait`]); the tracee is stopped after the first
/// four, and the monitor's [`Tracee`] requests apply to it until it resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Signal-delivery-stop for `signal` (never delivered: the monitor resumes with 0).
    Signal(Signal),
    /// Syscall-entry stop under PTRACE_SYSEMU.
    Syscall,
    /// Stopped by the monitor's own PTRACE_INTERRUPT.
    Interrupted,
    /// Group-stop (someone sent the VM process `signal`, e.g. SIGSTOP).
    GroupStop(Signal),
    Exited(i32),
    Killed(Signal),
}

impl Tracee {
    /// The next stop or end, if one is pending; never blocks, never allocates (except in the
    /// error of an impossible wait status).
    pub fn try_wait(&mut self) -> Result<Option<Event>, TraceError> {
        self.wait_with(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)
    }

    /// Waits for the next stop or end, as [`Event`]s.
    pub fn wait_event(&mut self) -> Result<Event, TraceError> {
        loop {
            if let Some(e) = self.wait_with(WaitPidFlag::__WALL)? {
                return Ok(e);
            }
        }
    }

    /// Continues the stopped tracee with PTRACE_CONT (only to run the monitor's stub).
    pub fn cont(&self) -> Result<(), TraceError> {
        ptrace::cont(self.pid, None).map_err(|source| TraceError::Resume {
            pid: self.pid,
            how: "PTRACE_CONT",
            source,
        })
    }

    fn wait_with(&mut self, flags: WaitPidFlag) -> Result<Option<Event>, TraceError> {
        loop {
            let status = match waitpid(self.pid, Some(flags)) {
                Ok(s) => s,
                Err(Errno::EINTR) => continue,
                Err(source) => {
                    return Err(TraceError::Wait {
                        pid: self.pid,
                        source,
                    });
                }
            };
            return Ok(Some(match status {
                WaitStatus::StillAlive => return Ok(None),
                WaitStatus::Stopped(_, signal) => Event::Signal(signal),
                WaitStatus::PtraceSyscall(_) => Event::Syscall,
                WaitStatus::PtraceEvent(_, Signal::SIGTRAP, libc::PTRACE_EVENT_STOP) => {
                    Event::Interrupted
                }
                WaitStatus::PtraceEvent(_, signal, libc::PTRACE_EVENT_STOP) => {
                    Event::GroupStop(signal)
                }
                WaitStatus::Exited(_, code) => {
                    self.reaped = true;
                    Event::Exited(code)
                }
                WaitStatus::Signaled(_, signal, _) => {
                    self.reaped = true;
                    Event::Killed(signal)
                }
                other => {
                    return Err(TraceError::UnexpectedStatus {
                        pid: self.pid,
                        status: format!("{other:?}"),
                    });
                }
            }));
        }
    }

    /// Asks the running tracee to stop (PTRACE_INTERRUPT); [`Event::Interrupted`] follows,
    /// unless it stops for something else first (then the interrupt stop comes after the next
    /// resume, and is harmless).
    pub fn interrupt(&self) -> Result<(), TraceError> {
        ptrace::interrupt(self.pid).map_err(|source| TraceError::Resume {
            pid: self.pid,
            how: "PTRACE_INTERRUPT",
            source,
        })
    }

    /// The registers of the stopped tracee.
    pub fn regs(&self) -> Result<libc::user_regs_struct, TraceError> {
        ptrace::getregs(self.pid).map_err(|source| TraceError::GetRegs {
            pid: self.pid,
            source,
        })
    }

    /// Sets the registers of the stopped tracee.
    pub fn set_regs(&self, regs: libc::user_regs_struct) -> Result<(), TraceError> {
        ptrace::setregs(self.pid, regs).map_err(|source| TraceError::SetRegs {
            pid: self.pid,
            source,
        })
    }

    /// The siginfo of the stopped tracee's signal.
    pub fn siginfo(&self) -> Result<libc::siginfo_t, TraceError> {
        ptrace::getsiginfo(self.pid).map_err(|source| TraceError::GetSigInfo {
            pid: self.pid,
            source,
        })
    }

    /// Resumes the stopped tracee under PTRACE_SYSEMU, suppressing its signal.
    pub fn resume(&self) -> Result<(), TraceError> {
        ptrace::sysemu(self.pid, None).map_err(|source| TraceError::Resume {
            pid: self.pid,
            how: "PTRACE_SYSEMU",
            source,
        })
    }

    /// Executes one instruction of the stopped tracee (PTRACE_SYSEMU_SINGLESTEP: a `syscall`
    /// still stops before it runs); a SIGTRAP stop follows.
    pub fn single_step(&self) -> Result<(), TraceError> {
        ptrace::sysemu_step(self.pid, None).map_err(|source| TraceError::Resume {
            pid: self.pid,
            how: "PTRACE_SYSEMU_SINGLESTEP",
            source,
        })
    }

    /// Takes ownership of `pid`, a child of the calling thread that is or will become its tracee.
    pub fn adopt(pid: Pid) -> Tracee {
        Tracee { pid, reaped: false }
    }

    /// The process id.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Waits for the next stop or for the end of the process. Allocation-free.
    pub fn wait(&mut self) -> Result<StopEvent<'_>, TraceError> {
        loop {
            let status = match waitpid(self.pid, Some(WaitPidFlag::__WALL)) {
                Ok(s) => s,
                Err(Errno::EINTR) => continue,
                Err(source) => {
                    return Err(TraceError::Wait {
                        pid: self.pid,
                        source,
                    });
                }
            };
            let pid = self.pid;
            return match status {
                WaitStatus::Stopped(_, signal) => {
                    Ok(StopEvent::Signal(Stopped { pid, tracee: self }, signal))
                }
                WaitStatus::PtraceSyscall(_) => {
                    Ok(StopEvent::Syscall(Stopped { pid, tracee: self }))
                }
                WaitStatus::Exited(_, code) => {
                    self.reaped = true;
                    Ok(StopEvent::Exited(code))
                }
                WaitStatus::Signaled(_, signal, _) => {
                    self.reaped = true;
                    Ok(StopEvent::Killed(signal))
                }
                other => Err(TraceError::UnexpectedStatus {
                    pid: self.pid,
                    status: format!("{other:?}"),
                }),
            };
        }
    }

    /// Kills the process and reaps it. Idempotent.
    pub fn kill_and_reap(&mut self) {
        if self.reaped {
            return;
        }
        // ESRCH means it is already a zombie; waitpid below reaps it either way.
        let _ = kill(self.pid, Signal::SIGKILL);
        loop {
            match waitpid(self.pid, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(Errno::ECHILD) => break,
                Err(Errno::EINTR) | Ok(_) => continue,
                Err(_) => break,
            }
        }
        self.reaped = true;
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// A tracee in a ptrace-stop. Registers may be read and written only through this handle, and
/// resuming consumes it.
#[derive(Debug)]
pub struct Stopped<'t> {
    pid: Pid,
    tracee: &'t mut Tracee,
}

impl<'t> Stopped<'t> {
    /// The stopped process.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// PTRACE_GETREGS.
    pub fn regs(&self) -> Result<libc::user_regs_struct, TraceError> {
        ptrace::getregs(self.pid).map_err(|source| TraceError::GetRegs {
            pid: self.pid,
            source,
        })
    }

    /// PTRACE_SETREGS.
    pub fn set_regs(&self, regs: libc::user_regs_struct) -> Result<(), TraceError> {
        ptrace::setregs(self.pid, regs).map_err(|source| TraceError::SetRegs {
            pid: self.pid,
            source,
        })
    }

    /// Resets the x87/SSE registers to their power-on state.
    pub fn reset_fp_state(&self) -> Result<(), TraceError> {
        sys::reset_fp_state(self.pid).map_err(|source| TraceError::SetFpRegs {
            pid: self.pid,
            source,
        })
    }

    /// PTRACE_GETSIGINFO: the signal that caused this stop.
    pub fn siginfo(&self) -> Result<libc::siginfo_t, TraceError> {
        ptrace::getsiginfo(self.pid).map_err(|source| TraceError::GetSigInfo {
            pid: self.pid,
            source,
        })
    }

    /// PTRACE_SETOPTIONS.
    pub fn set_options(&self, options: ptrace::Options) -> Result<(), TraceError> {
        ptrace::setoptions(self.pid, options).map_err(|source| TraceError::SetOptions {
            pid: self.pid,
            source,
        })
    }

    /// Resumes under PTRACE_SYSEMU with no signal: the guest runs until its next trap, and a
    /// `syscall` it executes stops here instead of reaching the host kernel.
    pub fn resume_sysemu(self) -> Result<(), TraceError> {
        ptrace::sysemu(self.pid, None).map_err(|source| TraceError::Resume {
            pid: self.pid,
            how: "PTRACE_SYSEMU",
            source,
        })
    }

    /// Resumes with PTRACE_CONT and no signal: system calls execute. Used only to run the
    /// monitor's own stub code (an injected system call followed by `int3`), never guest code.
    /// Waits for the next stop and returns it.
    pub fn resume_cont_for_stub(self) -> Result<StopEvent<'t>, TraceError> {
        ptrace::cont(self.pid, None).map_err(|source| TraceError::Resume {
            pid: self.pid,
            how: "PTRACE_CONT",
            source,
        })?;
        self.tracee.wait()
    }
}
