//! One connection's sending side: who may write on the socket, and when.
//!
//! Three kinds of thread write on a connection: posters (the user's threads), the driver (the
//! thread reading the sockets, see `mod.rs`: acknowledgements) and the connection's
//! `fabric-tx-<peer>` helper (heartbeats, delayed frames, and acknowledgements the driver
//! could not send at once).
//!
//! **The driver never blocks on the socket.** If it did, two nodes sending much to each other
//! could fill both directions while both drivers wait to send an ack, and neither would read
//! again. So it appends its ack to the connection's backlog and, only if it gets the write
//! lock without waiting, sends what the socket takes right now (`sys::send_nonblocking`);
//! whatever remains is the helper's to send, blocking. A driver that is a thread in
//! `recv`/`wait` may instead defer its acks (`reply(.., true)`): they then leave with that
//! thread's next post to the peer, or at `flush_backlog`. Whoever next holds the write lock
//! sends the backlog before anything else (in the same vectored write as its own frame), so a
//! frame is never split by another.
//!
//! With an injected delay every frame is queued with its due time (post time + delay) and the
//! helper writes it then: one-way latency, per-connection order kept, posting never blocked.
//!
//! Lock order: `out` (the write lock) before `tx` (backlog and delayed frames). The driver
//! takes `tx` and then only *tries* `out`.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::NodeId;
use crate::wire::{HEADER_BYTES, Header, Kind};

use super::sys;

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

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes every byte of `bufs` with vectored writes (header and payload in one system call).
pub fn write_all_vectored<W: Write>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What waits to be written, besides what posters write directly.
#[derive(Debug, Default)]
struct TxQueue {
    /// Bytes that must go out before any other frame (acks not sent yet).
    backlog: Vec<u8>,
    /// Frames with their due times (only with an injected delay), in posting order.
    delayed: VecDeque<(Instant, Vec<u8>)>,
    /// The helper is writing frames it took out of this queue.
    writing: bool,
}

/// The sending side of one connection.
#[derive(Debug)]
pub struct Conn {
    pub peer: NodeId,
    /// Names the peer in logs and errors: rank and address.
    pub label: String,
    delay: Duration,
    /// The write lock; whoever holds it sends the backlog first.
    out: Mutex<Stream>,
    /// A handle for shutting the socket down without the write lock.
    ctl: Stream,
    tx: Mutex<TxQueue>,
    tx_cv: Condvar,
    closed: AtomicBool,
}

/// The write lock, held while a poster sends its frames (so they stay in posting order).
pub struct Sending<'a> {
    conn: &'a Conn,
    out: MutexGuard<'a, Stream>,
}

impl std::fmt::Debug for Sending<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sending({})", self.conn.label)
    }
}

impl Conn {
    pub fn new(peer: NodeId, label: String, stream: Stream, delay: Duration) -> io::Result<Conn> {
        let ctl = stream.try_clone()?;
        Ok(Conn {
            peer,
            label,
            delay,
            out: Mutex::new(stream),
            ctl,
            tx: Mutex::new(TxQueue::default()),
            tx_cv: Condvar::new(),
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
        self.tx_cv.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn queue(&self) -> MutexGuard<'_, TxQueue> {
        self.tx.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends an answer from the receive side without ever blocking on the socket. `defer`
    /// only queues it (for a thread in `recv`/`wait`, which usually posts to this peer soon:
    /// the answer then leaves in the same system call; see `flush_backlog` for the bounds).
    pub fn reply(&self, header: &Header, defer: bool) -> io::Result<()> {
        let bytes = header.encode();
        let mut q = self.queue();
        if !self.delay.is_zero() {
            q.delayed
                .push_back((Instant::now() + self.delay, bytes.to_vec()));
            self.tx_cv.notify_all();
            return Ok(());
        }
        q.backlog.extend_from_slice(&bytes);
        if defer {
            return Ok(());
        }
        self.send_backlog(q)
    }

    /// Sends deferred answers now, without blocking (what the socket does not take is the
    /// helper's to send).
    pub fn flush_backlog(&self) -> io::Result<()> {
        let q = self.queue();
        if q.backlog.is_empty() || !self.delay.is_zero() {
            return Ok(());
        }
        self.send_backlog(q)
    }

    fn send_backlog(&self, mut q: MutexGuard<'_, TxQueue>) -> io::Result<()> {
        if let Ok(out) = self.out.try_lock() {
            let n = sys::send_nonblocking(out.fd(), &q.backlog)?;
            q.backlog.drain(..n);
        }
        if !q.backlog.is_empty() {
            self.tx_cv.notify_all();
        }
        Ok(())
    }

    /// The helper's loop: heartbeats every `heartbeat`, the backlog, delayed frames at their
    /// due times. Returns when the connection is closed or a write fails (the error).
    pub fn run_helper(&self, heartbeat: Duration) -> io::Result<()> {
        if !self.delay.is_zero() {
            // Delayed frames are due at precise instants: the default 50 us timer slack
            // would add up to that much to every delayed hop.
            sys::tighten_timer_slack();
        }
        let mut next_beat = Instant::now();
        loop {
            let mut q = self.queue();
            loop {
                if self.is_closed() {
                    return Ok(());
                }
                let now = Instant::now();
                let due = q.delayed.front().is_some_and(|(t, _)| *t <= now);
                if !q.backlog.is_empty() || due || now >= next_beat {
                    break;
                }
                let mut wake = next_beat;
                if let Some((t, _)) = q.delayed.front() {
                    wake = wake.min(*t);
                }
                let (g, _) = self
                    .tx_cv
                    .wait_timeout(q, wake.saturating_duration_since(now))
                    .unwrap_or_else(|p| p.into_inner());
                q = g;
            }
            drop(q);
            let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
            let mut q = self.queue();
            let backlog = std::mem::take(&mut q.backlog);
            let now = Instant::now();
            let mut frames = Vec::new();
            while q.delayed.front().is_some_and(|(t, _)| *t <= now) {
                if let Some((_, frame)) = q.delayed.pop_front() {
                    frames.push(frame);
                }
            }
            q.writing = true;
            drop(q);
            let beat = now >= next_beat;
            if beat {
                next_beat = now + heartbeat;
            }
            let written = (|| {
                out.write_all(&backlog)?;
                for f in &frames {
                    out.write_all(f)?;
                }
                if beat {
                    out.write_all(&Header::new(Kind::Heartbeat).encode())?;
                }
                Ok::<(), io::Error>(())
            })();
            drop(out);
            self.queue().writing = false;
            // Wakes `flush` waiting for the queue to empty.
            self.tx_cv.notify_all();
            written?;
        }
    }

    /// Waits (at most `bound`) until every queued frame (backlog and delayed frames, at their
    /// due times) was handed to the socket, so closing does not swallow acks already made.
    pub fn flush(&self, bound: Duration) {
        let deadline = Instant::now() + bound;
        let mut q = self.queue();
        loop {
            let idle = q.backlog.is_empty() && q.delayed.is_empty() && !q.writing;
            if idle || self.is_closed() {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            self.tx_cv.notify_all();
            q = self
                .tx_cv
                .wait_timeout(q, (deadline - now).min(Duration::from_millis(10)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Sending<'_> {
    /// Sends one frame in posting order (after any backlog), or queues it for its due time
    /// when a delay is injected (copying the payload, so the caller may reuse it at once).
    pub fn send(&mut self, header: &Header, payload: &[u8]) -> io::Result<()> {
        let conn = self.conn;
        if conn.is_closed() {
            return Err(io::ErrorKind::NotConnected.into());
        }
        let head = header.encode();
        if !conn.delay.is_zero() {
            let mut frame = Vec::with_capacity(HEADER_BYTES + payload.len());
            frame.extend_from_slice(&head);
            frame.extend_from_slice(payload);
            let mut q = conn.queue();
            q.delayed.push_back((Instant::now() + conn.delay, frame));
            conn.tx_cv.notify_all();
            return Ok(());
        }
        // Answers queued before this frame leave with it, in one system call.
        let backlog = std::mem::take(&mut conn.queue().backlog);
        write_all_vectored(
            &mut *self.out,
            &mut [
                IoSlice::new(&backlog),
                IoSlice::new(&head),
                IoSlice::new(payload),
            ],
        )
    }
}
