//! The notifier: a file descriptor that becomes readable when something an endpoint's owner
//! polls for arrives, so a node's event loop can sleep on the fabric beside a pidfd and a
//! signalfd (`epoll`), as on verbs it sleeps on a completion channel.
//!
//! The protocol is verbs' `ibv_req_notify_cq` then poll again: [`Notifier::arm`] drains the
//! eventfd and raises the *armed* word; the caller then looks at its queues once more and
//! sleeps only if they are still empty. A producer first publishes its item, then looks at
//! the armed word (both SeqCst, or ordered by the queue's lock); if it is raised, the producer
//! lowers it and writes the eventfd. So either the consumer's last look sees the item or the
//! producer sees the consumer armed, and while nobody is armed producers make no system call.
//!
//! The armed word lives where every producer can reach it: in this process for the sim and
//! tcp backends, in the node's shared inbox on shm (producers in other processes then write
//! the eventfd they received at the bootstrap).
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::FabricError;
use crate::sys::Mapping;

/// Where the armed word lives.
#[derive(Debug)]
enum Armed {
    Local(AtomicU32),
    /// A 4-byte word of a shared mapping, at this offset.
    Shared(Arc<Mapping>, usize),
}

impl Armed {
    fn word(&self) -> &AtomicU32 {
        match self {
            Armed::Local(w) => w,
            Armed::Shared(map, offset) => map.u32_at(*offset),
        }
    }
}

/// One endpoint's notifier.
#[derive(Debug)]
pub(crate) struct Notifier {
    efd: File,
    armed: Armed,
}

/// A fresh non-blocking eventfd.
pub(crate) fn new_eventfd() -> Result<File, FabricError> {
    let fd: OwnedFd =
        EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(|e| FabricError::io("creating the notifier's eventfd")(e.into()))?
            .into();
    Ok(File::from(fd))
}

impl Notifier {
    /// A notifier whose producers are all in this process.
    pub fn new() -> Result<Notifier, FabricError> {
        Ok(Notifier {
            efd: new_eventfd()?,
            armed: Armed::Local(AtomicU32::new(0)),
        })
    }

    /// A notifier over `efd` whose armed word is at `offset` in `map`, where producers in
    /// other processes see it.
    pub fn shared(efd: File, map: Arc<Mapping>, offset: usize) -> Notifier {
        Notifier {
            efd,
            armed: Armed::Shared(map, offset),
        }
    }

    /// The file descriptor that becomes readable once something arrives after `arm`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.efd.as_fd()
    }

    /// Drains the eventfd and asks to be woken. The caller must look at its queues once more
    /// after this and sleep only if they are empty.
    pub fn arm(&self) {
        let mut sink = [0u8; 8];
        // Non-blocking: `WouldBlock` when nothing was pending; anything else changes nothing.
        let _ = (&self.efd).read(&mut sink);
        // SeqCst: pairs with the producer's SeqCst load in `wake_if_armed`, after its publish.
        self.armed.word().store(1, Ordering::SeqCst);
    }

    /// Whether the owner armed and has not been woken since (it is about to sleep, or sleeps).
    pub fn is_armed(&self) -> bool {
        self.armed.word().load(Ordering::SeqCst) != 0
    }

    /// Called after publishing something the owner polls for.
    #[inline]
    pub fn notify(&self) {
        wake_if_armed(self.armed.word(), &self.efd);
    }
}

/// Wakes a consumer that armed `word`, through `efd`. One atomic load when it did not.
#[inline]
pub(crate) fn wake_if_armed(word: &AtomicU32, efd: &File) {
    // SeqCst: the caller's publish (a SeqCst store or a lock release) comes first, pairing with
    // the consumer's SeqCst store in `arm` before its last look.
    if word.load(Ordering::SeqCst) != 0 && word.swap(0, Ordering::SeqCst) != 0 {
        wake(efd);
    }
}

#[cold]
fn wake(efd: &File) {
    // An eventfd write fails only if the counter would overflow, which the consumer's drain
    // in `arm` prevents; a failure leaves the consumer to its timeout.
    let _ = (&*efd).write(&1u64.to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn readable(fd: BorrowedFd<'_>) -> bool {
        let mut p = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        nix::poll::poll(&mut p, nix::poll::PollTimeout::ZERO).unwrap() == 1
    }

    #[test]
    fn an_unarmed_notifier_stays_quiet_and_an_armed_one_wakes_once() {
        let n = Notifier::new().unwrap();
        n.notify();
        assert!(!readable(n.fd()));
        n.arm();
        n.notify();
        assert!(readable(n.fd()));
        n.arm();
        assert!(!readable(n.fd()), "arm drains the previous wake-up");
        assert!(n.fd().as_raw_fd() >= 0);
    }
}
