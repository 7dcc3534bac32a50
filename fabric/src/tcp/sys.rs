//! The system calls std does not offer: a send that never blocks, for the receive thread's
//! acknowledgements (see `conn.rs`: a receive thread that blocked on a full socket could
//! deadlock two nodes that both stopped reading), and a tighter timer slack for the thread
//! that releases delayed frames.

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
