//! One connection's sending side: who may write on the socket, and when.
//!
//! Three kinds of thread write on a connection: posters (the user's threads), the driver (the
//! thread reading the sockets, see `driver.rs`: acknowledgements and credit returns) and the
//! connection's `fabric-tx-<peer>` helper (heartbeats, and answers the driver could not send
//! at once).
//!
//! **The driver never blocks on the socket.** If it did, two nodes sending much to each other
//! could fill both directions while both drivers wait to send an ack, and neither would read
//! again. So it appends its answer to the connection's backlog and, only if it gets the write
//! lock without waiting, sends what the socket takes right now; whatever remains is the
//! helper's to send, blocking. A driver may instead defer its answers (`reply(.., true)`):
//! they then leave with the next post to that peer (in the same system call) or at
//! `flush_backlog`. Whoever next holds the write lock sends the backlog before anything else
//! (in the same vectored write as its own frame), so a frame is never split by another.
//!
//! Posters send payloads straight from registered memory (a vectored write over the
//! mapping), so a write is never staged in a buffer of ours.
//!
//! Lock order: `out` (the write lock) before `backlog`. The driver takes `backlog` and then
//! only *tries* `out`.

#![forbid(unsafe_code)]

use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::NodeId;
use crate::sys::{self, RawIo};
use crate::wire::{HEADER_BYTES, Header, Kind};

/// A connection's socket: TCP to a peer, or one end of the in-process loopback pair.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    pub fn shutdown(&self) {
        // Already shut down or reset: nothing more to do either way.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

/// Writes every byte of `pieces` (blocking, bounded by the socket's send timeout).
fn write_all(fd: BorrowedFd<'_>, pieces: &mut [RawIo]) -> io::Result<()> {
    let mut first = 0;
    while first < pieces.len() {
        let mut n = sys::writev(fd, &pieces[first..], true)?;
        if n == 0 && pieces[first..].iter().any(|p| p.len() > 0) {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while first < pieces.len() && n >= pieces[first].len() {
            n -= pieces[first].len();
            first += 1;
        }
        if first < pieces.len() {
            pieces[first] = pieces[first].advance(n);
        }
    }
    Ok(())
}

/// The writer's side of the socket, behind the write lock.
#[derive(Debug)]
struct Out {
    stream: Stream,
    /// The backlog's bytes are swapped into this buffer to be written, so neither side
    /// allocates once both have grown.
    spare: Vec<u8>,
}

/// What waits to be written, besides what posters write directly.
#[derive(Debug, Default)]
struct Backlog {
    /// Answers not sent yet; they go out before any other frame.
    bytes: Vec<u8>,
    /// When the oldest of them was queued.
    since: Option<Instant>,
}

/// The sending side of one connection.
#[derive(Debug)]
pub struct Conn {
    pub peer: NodeId,
    /// Names the peer in logs and errors: rank and address.
    pub label: String,
    /// The write lock; whoever holds it sends the backlog first.
    out: Mutex<Out>,
    /// A handle for shutting the socket down without the write lock.
    ctl: Stream,
    backlog: Mutex<Backlog>,
    /// Wakes the helper.
    helper_cv: Condvar,
    closed: AtomicBool,
}

/// The write lock, held while a poster sends its frames (so they stay in posting order).
pub struct Sending<'a> {
    conn: &'a Conn,
    out: MutexGuard<'a, Out>,
}

impl std::fmt::Debug for Sending<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sending({})", self.conn.label)
    }
}

impl Conn {
    pub fn new(peer: NodeId, label: String, stream: Stream) -> io::Result<Conn> {
        let ctl = stream.try_clone()?;
        Ok(Conn {
            peer,
            label,
            out: Mutex::new(Out {
                stream,
                spare: Vec::new(),
            }),
            ctl,
            backlog: Mutex::new(Backlog::default()),
            helper_cv: Condvar::new(),
            closed: AtomicBool::new(false),
        })
    }

    /// A second handle on the socket for the driver.
    pub fn reader(&self) -> io::Result<Stream> {
        self.ctl.try_clone()
    }

    /// Takes the write lock (blocking while another poster or the helper writes).
    pub fn lock(&self) -> Sending<'_> {
        Sending {
            conn: self,
            out: self.out.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Shuts the socket down: the driver sees the end, writers fail, the helper stops.
    pub fn close(&self) {
        // Pairs with the Acquire in `is_closed`: whoever sees the flag also sees the socket
        // already shut down, so it will not wait on it.
        self.closed.store(true, Ordering::Release);
        self.ctl.shutdown();
        self.helper_cv.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn queue(&self) -> MutexGuard<'_, Backlog> {
        self.backlog.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends an answer from the receive side without ever blocking on the socket. `defer`
    /// only queues it (it then leaves with the next post to this peer, or at
    /// `flush_backlog`, which the driver calls before it next waits).
    pub fn reply(&self, header: &Header, defer: bool) -> io::Result<()> {
        let mut q = self.queue();
        q.bytes.extend_from_slice(&header.encode());
        q.since.get_or_insert_with(Instant::now);
        if defer {
            return Ok(());
        }
        self.send_backlog(q)
    }

    /// Sends deferred answers now, without blocking (what the socket does not take is the
    /// helper's to send).
    pub fn flush_backlog(&self) -> io::Result<()> {
        let q = self.queue();
        if q.bytes.is_empty() {
            return Ok(());
        }
        self.send_backlog(q)
    }

    /// How long the oldest deferred answer has waited.
    pub fn backlog_age(&self) -> Option<Duration> {
        self.queue().since.map(|t| t.elapsed())
    }

    fn send_backlog(&self, mut q: MutexGuard<'_, Backlog>) -> io::Result<()> {
        if let Ok(out) = self.out.try_lock() {
            let n = sys::writev(out.stream.fd(), &[RawIo::slice(&q.bytes)], false)?;
            q.bytes.drain(..n);
            if q.bytes.is_empty() {
                q.since = None;
            }
        }
        if !q.bytes.is_empty() {
            self.helper_cv.notify_all();
        }
        Ok(())
    }

    /// The helper's loop: a heartbeat every `heartbeat`, and the backlog, blocking. Returns
    /// when the connection is closed, or the error of a write that failed.
    pub fn run_helper(&self, heartbeat: Duration) -> io::Result<()> {
        let mut next_beat = Instant::now();
        loop {
            let mut q = self.queue();
            loop {
                if self.is_closed() {
                    return Ok(());
                }
                let now = Instant::now();
                if !q.bytes.is_empty() || now >= next_beat {
                    break;
                }
                let (g, _) = self
                    .helper_cv
                    .wait_timeout(q, next_beat - now)
                    .unwrap_or_else(|p| p.into_inner());
                q = g;
            }
            drop(q);
            let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
            let mut q = self.queue();
            let Out { stream, spare } = &mut *out;
            spare.clear();
            std::mem::swap(spare, &mut q.bytes);
            q.since = None;
            drop(q);
            let now = Instant::now();
            let beat = now >= next_beat;
            if beat {
                next_beat = now + heartbeat;
            }
            let hb = Header::new(Kind::Heartbeat).encode();
            let hb: &[u8] = if beat { &hb } else { &[] };
            write_all(stream.fd(), &mut [RawIo::slice(spare), RawIo::slice(hb)])?;
        }
    }

    /// Waits (at most `bound`) until the backlog was handed to the socket, so closing does not
    /// swallow answers already made.
    pub fn flush(&self, bound: Duration) {
        let deadline = Instant::now() + bound;
        while !self.queue().bytes.is_empty() && !self.is_closed() && Instant::now() < deadline {
            self.helper_cv.notify_all();
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Sending<'_> {
    /// Sends one frame in posting order, after any backlog, in one system call when the
    /// socket takes it: the header, then `payload` (bytes of a slice or of registered memory,
    /// which the caller keeps alive and unchanged for the call).
    pub fn send(&mut self, header: &Header, payload: RawIo) -> io::Result<()> {
        let conn = self.conn;
        if conn.is_closed() {
            return Err(io::ErrorKind::NotConnected.into());
        }
        let head: [u8; HEADER_BYTES] = header.encode();
        let Out { stream, spare } = &mut *self.out;
        spare.clear();
        {
            let mut q = conn.queue();
            std::mem::swap(spare, &mut q.bytes);
            q.since = None;
        }
        write_all(
            stream.fd(),
            &mut [RawIo::slice(spare), RawIo::slice(&head), payload],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::decode_all;

    #[test]
    fn deferred_answers_leave_before_the_next_frame_in_order() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let conn = Conn::new(NodeId(1), "peer".into(), Stream::Unix(a)).unwrap();
        let mut ack = Header::new(Kind::Ack);
        ack.wr = 7;
        conn.reply(&ack, true).unwrap();
        assert!(conn.backlog_age().is_some());
        let mut w = Header::new(Kind::Write);
        w.len = 3;
        conn.lock().send(&w, RawIo::slice(b"abc")).unwrap();
        assert!(conn.backlog_age().is_none());
        let mut got = vec![0u8; 2 * HEADER_BYTES + 3];
        b.read_exact(&mut got).unwrap();
        assert_eq!(decode_all(&got).0, 2);
        assert_eq!(
            Header::decode(got[..HEADER_BYTES].try_into().unwrap())
                .unwrap()
                .wr,
            7
        );
    }
}
