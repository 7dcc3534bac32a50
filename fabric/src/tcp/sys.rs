//! The system calls std does not offer: a send that never blocks, for the driver's
//! acknowledgements (see `conn.rs`: a driver that blocked on a full socket could deadlock two
//! nodes that both stopped reading), a receive that never blocks and `poll(2)` over several
//! sockets (for the driver, see `mod.rs`), and a tighter timer slack for the thread that
//! releases delayed frames.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Sends as much of `bytes` as the socket takes right now (`MSG_DONTWAIT`), never raising
/// SIGPIPE (`MSG_NOSIGNAL`). Returns the count sent; 0 when the socket is full.
pub fn send_nonblocking(fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `fd` is a borrowed, open socket for the duration of the call, and the pointer
        // and length describe `bytes`, a live slice the kernel only reads.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(0),
            _ => return Err(e),
        }
    }
}

/// Reads what the socket holds right now (`MSG_DONTWAIT`) without changing the blocking
/// mode of the file description, which posters share. `WouldBlock` when it holds nothing.
pub fn recv_nonblocking(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `fd` is a borrowed, open socket for the duration of the call, and the pointer
        // and length describe `buf`, a live exclusive slice the kernel writes at most
        // `buf.len()` bytes into.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits at most `timeout` until one of `fds` is readable (or hung up, or failed: a read then
/// reports it) and sets `ready[i]` for each such `fds[i]`. An interrupted wait returns with
/// nothing ready.
pub fn poll_readable(
    fds: &[BorrowedFd<'_>],
    timeout: std::time::Duration,
    ready: &mut [bool],
) -> io::Result<()> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // Rounded up, so a short timeout does not become a busy loop.
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfds` is a live, exclusive array of `pfds.len()` pollfd structures built from
    // borrowed open descriptors; the kernel only writes their `revents`.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(());
        }
        return Err(e);
    }
    for (r, p) in ready.iter_mut().zip(&pfds) {
        *r = p.revents != 0;
    }
    Ok(())
}

/// Asks the kernel to wake this thread's timed waits within 1 ns of their deadline instead of
/// the default 50 us slack (for the thread that releases delayed frames). Best effort.
pub fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and only changes this thread's
    // timer slack; no memory is passed.
    let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_full_socket_takes_nothing_instead_of_blocking() {
        let (a, _b) = UnixStream::pair().unwrap();
        let chunk = vec![0u8; 1 << 16];
        let mut total = 0usize;
        for _ in 0..10_000 {
            let n = send_nonblocking(a.as_fd(), &chunk).unwrap();
            if n == 0 {
                return;
            }
            total += n;
        }
        panic!("the socket took {total} bytes without ever filling");
    }
}
