//! Where a node's monitor thread sleeps: one `epoll` over the tracee's stops (SIGCHLD through
//! a signalfd), the fabric's notifier and a timer with nanosecond resolution.
//!
//! SIGCHLD must be blocked in every thread of the node process before any thread starts
//! ([`block_sigchld`]), or a thread that leaves it unblocked takes (and discards) it and the
//! signalfd never sees it. SIGUSR1 is taken the same way: it asks the node to print where it
//! stands (`kill -USR1 PID`), for diagnosing a machine that does not move.
#![forbid(unsafe_code)]

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use super::NodeError;

/// Longest single sleep: deaths and timeouts are looked at this often.
const MAX_SLEEP: Duration = Duration::from_millis(100);

const TRACEE: u64 = 1;
const FABRIC: u64 = 2;
const TIMER: u64 = 3;

fn signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.add(Signal::SIGUSR1);
    set
}

/// Blocks SIGCHLD (and SIGUSR1) in the calling thread (call it first thing in the node
/// process, so every thread inherits it).
pub fn block_sigchld() -> Result<(), nix::Error> {
    signals().thread_block()
}

#[derive(Debug)]
pub struct Waiter {
    sigchld: SignalFd,
    timer: TimerFd,
    epoll: Epoll,
    /// The fabric notifier's descriptor, once added.
    fabric: Option<i32>,
}

fn setup(e: nix::Error) -> NodeError {
    NodeError::Setup(format!("cannot set up the node's event loop: {e}"))
}

impl Waiter {
    pub fn new() -> Result<Waiter, NodeError> {
        block_sigchld().map_err(setup)?;
        let sigchld =
            SignalFd::with_flags(&signals(), SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
                .map_err(setup)?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(setup)?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(setup)?;
        epoll
            .add(
                sigchld.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TRACEE),
            )
            .map_err(setup)?;
        epoll
            .add(timer.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, TIMER))
            .map_err(setup)?;
        Ok(Waiter {
            sigchld,
            timer,
            epoll,
            fabric: None,
        })
    }

    /// Sleeps until the tracee changes state, `fabric` (armed by the caller) fires, or
    /// `timeout` passes (at most [`MAX_SLEEP`]). Returns whether SIGUSR1 arrived.
    pub fn wait(
        &mut self,
        fabric: Option<BorrowedFd<'_>>,
        timeout: Option<Duration>,
    ) -> Result<bool, NodeError> {
        if let Some(fd) = fabric {
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
            if self.fabric != Some(raw) {
                self.epoll
                    .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, FABRIC))
                    .map_err(setup)?;
                self.fabric = Some(raw);
            }
        }
        let timeout = timeout.unwrap_or(MAX_SLEEP).min(MAX_SLEEP);
        if timeout.is_zero() {
            return Ok(false);
        }
        self.timer
            .set(
                Expiration::OneShot(TimeSpec::from_duration(timeout)),
                TimerSetTimeFlags::empty(),
            )
            .map_err(setup)?;
        let mut events = [EpollEvent::empty(); 3];
        match self.epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(setup(e)),
        }
        // Drain what fired: SIGCHLD's pending signals and the timer's count (both
        // nonblocking; the tracee itself is looked at with waitpid by the caller).
        let mut usr1 = false;
        while let Ok(Some(info)) = self.sigchld.read_signal() {
            usr1 |= info.ssi_signo == Signal::SIGUSR1 as u32;
        }
        let _ = self.timer.unset();
        Ok(usr1)
    }
}
