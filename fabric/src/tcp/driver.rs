//! The tcp backend's receiving side: who reads the sockets, and what a frame does.
//!
//! One thread at a time holds the endpoint's *driver* role: it reads what every readable
//! socket holds without blocking and applies it (writes into regions, acks completing our
//! requests, doorbells and messages queued for `poll_incoming`, `fetch_add`s answered, credit
//! returns). A thread that polls (completions or incoming items) takes the role itself, like
//! polling a verbs completion queue, so an arriving frame is handled by the very thread that
//! wants it, with no hand-off between threads (on a busy 2-core VM each hand-off cost 20-30
//! us). Its acks are deferred until it posts to that peer (then they leave in the same system
//! call as the post, usually the answering doorbell), polls again, or arms its notifier to
//! sleep. The background thread `fabric-rx` drives whenever nobody has polled for `HANDBACK`,
//! so a node whose owner does not poll still applies writes, answers, and detects dead peers;
//! a poller that finds it driving tells it to let go (the `handover` eventfd). `fabric-rx`
//! also watches for silent peers, whoever drives.
#![forbid(unsafe_code)]

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::sys::epoll::{EpollEvent, EpollTimeout};

use super::conn::{Conn, Stream};
use super::{NOTIFIER_TAG, Shared};
use crate::inbound::{Inbound, Overrun};
use crate::sys::{self, SpinLock};
use crate::wire::{FrameReader, Header, Kind, NackReason, ReadError};
use crate::{DeathCause, IncomingBatch, NodeId, RECV_CREDITS, Status};

/// Frames one connection's reading applies before the driver looks at the others.
const PUMP_FRAMES: usize = 256;

/// After a caller last polled, how long the background thread leaves the sockets to it (it
/// usually comes back within microseconds): frames arriving while nobody drives wait at most
/// about this long.
const HANDBACK: Duration = Duration::from_micros(500);

/// The background thread's longest wait in `epoll`; silent peers are looked for this often.
const TICK: Duration = Duration::from_millis(10);

/// Credits are returned once this many were consumed since the last return.
const CREDIT_BATCH: u64 = (RECV_CREDITS / 4) as u64;

/// Sockets one `epoll_wait` reports at most.
const EVENTS: usize = 64;

/// Reads a socket without blocking (its file description stays blocking for posters).
struct NonBlocking<'a>(BorrowedFd<'a>);

impl Read for NonBlocking<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        sys::recv_nonblocking(self.0, buf)
    }
}

/// One connection's receiving side, read by whichever thread drives.
#[derive(Debug)]
pub(super) struct Rx {
    conn: Arc<Conn>,
    /// A handle on the socket for polling and non-blocking reads.
    stream: Stream,
    state: SpinLock<RxState>,
}

#[derive(Debug)]
struct RxState {
    reader: FrameReader,
    chunk: Option<Chunked>,
    last_heard: Instant,
    /// The highest request applied and not yet acknowledged (acks are cumulative).
    unacked: Option<u64>,
    /// The connection failed or ended and was reported; nothing more is read.
    ended: bool,
}

/// Per-connection state of a chunked write being received.
#[derive(Debug, Clone, Copy)]
struct Chunked {
    wr: u64,
    region: u32,
    start: u64,
    next: u64,
    end: u64,
    refusal: Option<(NackReason, u64)>,
}

impl Rx {
    pub fn new(conn: Arc<Conn>, stream: Stream) -> Rx {
        Rx {
            conn,
            stream,
            state: SpinLock::new(RxState {
                reader: FrameReader::new(),
                chunk: None,
                last_heard: Instant::now(),
                unacked: None,
                ended: false,
            }),
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.stream.fd()
    }
}

/// Doorbells, messages and deaths waiting for `poll_incoming`, and how many each source's
/// owner consumed and was given back as credit.
#[derive(Debug)]
pub(super) struct Incoming {
    queue: Inbound,
    consumed: Vec<u64>,
    returned: Vec<u64>,
}

impl Incoming {
    pub fn new(nodes: usize) -> Incoming {
        Incoming {
            queue: Inbound::new(nodes),
            consumed: vec![0; nodes],
            returned: vec![0; nodes],
        }
    }
}

/// Why reading a connection stopped for good.
#[derive(Debug)]
enum Ended {
    /// Our own shutdown.
    Closing,
    Peer(DeathCause),
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// A poller's turn at the sockets: takes the driver role if it is free and applies what
    /// the readable sockets hold, without blocking.
    pub(super) fn drive_now(&self) {
        self.last_poll_ns.store(self.now_ns(), Ordering::Relaxed);
        let Some(_role) = self.driver.try_lock() else {
            if self.bg_driving.load(Ordering::Relaxed) {
                self.wake_background();
            }
            return;
        };
        self.flush_answers();
        let mut events = [EpollEvent::empty(); EVENTS];
        let n = match self.app_epoll.wait(&mut events, EpollTimeout::ZERO) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("looking at the fabric's sockets failed: {e}");
                return;
            }
        };
        // A caller that armed its notifier polls once more and then sleeps: what this poll
        // answers must leave now, not wait for a post that is not coming.
        let defer = !self.notifier.is_armed();
        for ev in &events[..n] {
            if let Some(rx) = self.rxs.get(ev.data() as usize) {
                self.pump(rx, defer);
            }
        }
        if !defer {
            self.flush_answers();
        }
    }

    /// Tells the background driver to let go of the role (or to look at its queues now).
    pub(super) fn wake_background(&self) {
        use std::io::Write;
        // An eventfd write fails only when its counter is full: a wake-up is pending anyway.
        let _ = (&self.handover).write(&1u64.to_ne_bytes());
    }

    /// Sends the answers a poller deferred.
    pub(super) fn flush_answers(&self) {
        for rx in &self.rxs {
            if let Err(e) = rx.conn.flush_backlog() {
                self.peer_failed(&rx.conn, DeathCause::ConnectionFailed(e.kind()));
            }
        }
    }

    /// The background thread: drives when nobody polls, and watches for silent peers.
    pub(super) fn background(&self) {
        let mut events = [EpollEvent::empty(); EVENTS];
        let mut last_watch = Instant::now();
        while !self.shutdown.load(Ordering::Acquire) {
            let since_poll = self
                .now_ns()
                .saturating_sub(self.last_poll_ns.load(Ordering::Relaxed));
            let polled_recently = since_poll < HANDBACK.as_nanos() as u64;
            if last_watch.elapsed() >= TICK {
                last_watch = Instant::now();
                self.watch_silence();
                for rx in &self.rxs {
                    if rx.conn.backlog_age().is_some_and(|a| a >= HANDBACK) {
                        let _ = rx.conn.flush_backlog();
                    }
                }
            }
            if polled_recently {
                std::thread::sleep(HANDBACK);
                continue;
            }
            let Some(role) = self.driver.try_lock() else {
                std::thread::sleep(HANDBACK);
                continue;
            };
            self.bg_driving.store(true, Ordering::Relaxed);
            let timeout = EpollTimeout::try_from(TICK).unwrap_or(EpollTimeout::NONE);
            let n = self.bg_epoll.wait(&mut events, timeout).unwrap_or(0);
            for ev in &events[..n] {
                if ev.data() == NOTIFIER_TAG {
                    let mut sink = [0u8; 8];
                    let _ = (&self.handover).read(&mut sink);
                } else if let Some(rx) = self.rxs.get(ev.data() as usize) {
                    self.pump(rx, false);
                }
            }
            self.flush_answers();
            self.bg_driving.store(false, Ordering::Relaxed);
            drop(role);
        }
    }

    /// Reads and applies the frames `rx`'s socket holds now (at most `PUMP_FRAMES`), then
    /// acknowledges what it applied (deferred when `defer`).
    fn pump(&self, rx: &Rx, defer: bool) {
        let mut guard = rx.state.lock();
        let st = &mut *guard;
        if st.ended {
            return;
        }
        // Readable: the peer sent something (or hung up, which the read reports).
        st.last_heard = Instant::now();
        let mut ended = None;
        for _ in 0..PUMP_FRAMES {
            if self.shutdown.load(Ordering::Acquire) || rx.conn.is_closed() {
                ended = Some(Ended::Closing);
                break;
            }
            match st.reader.poll(&mut NonBlocking(rx.stream.fd())) {
                Ok(Some(h)) => {
                    let payload = st.reader.payload();
                    if let Err(reason) =
                        self.handle_frame(&rx.conn, &h, payload, &mut st.chunk, &mut st.unacked)
                    {
                        tracing::warn!(peer = %rx.conn.label, "protocol violation: {reason}");
                        ended = Some(Ended::Peer(DeathCause::Protocol));
                        break;
                    }
                }
                Ok(None) => break,
                Err(ReadError::Frame(e)) => {
                    tracing::warn!(peer = %rx.conn.label, "malformed frame: {e}");
                    ended = Some(Ended::Peer(DeathCause::Protocol));
                    break;
                }
                Err(ReadError::Closed { .. }) => {
                    ended = Some(Ended::Peer(DeathCause::Closed));
                    break;
                }
                Err(ReadError::Io(e)) => {
                    ended = Some(Ended::Peer(DeathCause::ConnectionFailed(e.kind())));
                    break;
                }
            }
        }
        if let Some(wr) = st.unacked.take() {
            let mut a = Header::new(Kind::Ack);
            a.wr = wr;
            if let Err(e) = rx.conn.reply(&a, defer) {
                ended.get_or_insert(Ended::Peer(DeathCause::ConnectionFailed(e.kind())));
            }
        }
        if let Some(why) = ended {
            st.ended = true;
            drop(guard);
            self.connection_ended(&rx.conn, why);
        }
    }

    /// Declares the peer of every connection silent past the heartbeat timeout dead. A
    /// socket with unread bytes is not silent (its driver was busy elsewhere).
    fn watch_silence(&self) {
        for rx in &self.rxs {
            let Some(mut st) = rx.state.try_lock() else {
                continue;
            };
            let silent = st.last_heard.elapsed();
            if st.ended || silent <= self.heartbeat || readable(rx.fd()) {
                continue;
            }
            st.ended = true;
            drop(st);
            tracing::warn!(
                peer = %rx.conn.label,
                "silent for {silent:?} (heartbeat timeout {:?})",
                self.heartbeat
            );
            self.connection_ended(&rx.conn, Ended::Peer(DeathCause::Silent));
        }
    }

    fn connection_ended(&self, conn: &Conn, why: Ended) {
        match why {
            Ended::Closing => conn.close(),
            Ended::Peer(cause) => self.peer_failed(conn, cause),
        }
    }

    /// Declares the peer behind `conn` dead (the first cause wins) and drops the connection:
    /// its operations in flight fail, and `poll_incoming` reports it after what it delivered.
    pub(super) fn peer_failed(&self, conn: &Conn, cause: DeathCause) {
        if self.shutdown.load(Ordering::Acquire) {
            conn.close();
            return;
        }
        let link = &self.links[conn.peer.index()];
        {
            let mut c = link.cause.lock().unwrap_or_else(|p| p.into_inner());
            if c.is_some() {
                conn.close();
                return;
            }
            *c = Some(cause);
        }
        // Release: pairs with `Link::death`'s acquire, after the cause.
        link.dead.store(true, Ordering::Release);
        if conn.peer != self.rank {
            // The application hears of the death (`PeerDead`) and decides whether it is a
            // failure or a departure: here it is only worth a debug line.
            tracing::debug!(peer = %conn.label, "dropping the connection: {cause}");
            self.inbound.lock().queue.push_dead(conn.peer, cause);
        }
        conn.close();
        self.cq.fail_peer(conn.peer, cause);
        self.notifier.notify();
    }

    /// Handles one frame; `Err` is a protocol violation that ends the connection.
    fn handle_frame(
        &self,
        conn: &Conn,
        h: &Header,
        payload: &[u8],
        chunk: &mut Option<Chunked>,
        unacked: &mut Option<u64>,
    ) -> Result<(), String> {
        let peer = conn.peer;
        match h.kind {
            Kind::Heartbeat => Ok(()),
            Kind::Ack | Kind::AckFetch | Kind::Nack => self.complete(conn, h),
            Kind::Credit => {
                let link = &self.links[peer.index()];
                if h.arg > link.sent.load(Ordering::Acquire) {
                    return Err(format!(
                        "it returned {} credits for {} doorbells and messages",
                        h.arg,
                        link.sent.load(Ordering::Relaxed)
                    ));
                }
                // Release: pairs with the poster's acquire when it checks its credits.
                link.returned.fetch_max(h.arg, Ordering::Release);
                Ok(())
            }
            Kind::Write | Kind::WriteImm => {
                let state = self.chunk_state(peer, h, chunk)?;
                let next = state.next + u64::from(h.len);
                let final_frame = !h.more();
                if next > state.end || (final_frame && next != state.end) {
                    return Err(format!(
                        "chunks of wr {} do not add up to its {} bytes",
                        h.wr,
                        state.end - state.start
                    ));
                }
                if state.refusal.is_none() && !payload.is_empty() {
                    let m = self.memory_of(h.region).ok_or("a write to no region")?;
                    m.write(h.offset, payload).map_err(|e| e.to_string())?;
                }
                if !final_frame {
                    *chunk = Some(Chunked { next, ..state });
                    return Ok(());
                }
                *chunk = None;
                if let Some((reason, len)) = state.refusal {
                    *unacked = None;
                    return refuse(conn, h.wr, h.region, state.start, len, reason);
                }
                if h.kind == Kind::WriteImm {
                    self.deliver(|q| q.push_doorbell(peer, h.imm))?;
                }
                *unacked = Some(h.wr);
                Ok(())
            }
            Kind::FetchAdd => {
                not_mid_write(chunk, h)?;
                let region = self.regions.iter().position(|r| r.id.0 == h.region);
                let Some(index) = region else {
                    *unacked = None;
                    return refuse(conn, h.wr, h.region, h.offset, 8, NackReason::UnknownRegion);
                };
                if !self.regions[index].permits(peer, h.offset, 8) {
                    *unacked = None;
                    return refuse(conn, h.wr, h.region, h.offset, 8, NackReason::AccessDenied);
                }
                let old = self.memory[index]
                    .fetch_add_u64(h.offset, h.arg)
                    .map_err(|e| e.to_string())?;
                // This answer carries a value and covers every earlier request.
                *unacked = None;
                let mut a = Header::new(Kind::AckFetch);
                a.wr = h.wr;
                a.arg = old;
                conn.reply(&a, true)
                    .map_err(|e| format!("acknowledging failed: {e}"))
            }
            Kind::Send => {
                not_mid_write(chunk, h)?;
                self.deliver(|q| q.push_message(peer, payload))?;
                *unacked = Some(h.wr);
                Ok(())
            }
        }
    }

    fn memory_of(&self, region: u32) -> Option<&crate::Memory> {
        self.memory
            .iter()
            .find(|m| m.id().0 == region)
            .map(|m| &**m)
    }

    /// The state of the write `h` belongs to: a new one, or the chunked write it continues.
    fn chunk_state(
        &self,
        peer: NodeId,
        h: &Header,
        chunk: &Option<Chunked>,
    ) -> Result<Chunked, String> {
        if let Some(c) = *chunk {
            if c.wr != h.wr || c.region != h.region || c.next != h.offset {
                return Err(format!(
                    "chunk of wr {} at {} does not continue wr {} at {}",
                    h.wr, h.offset, c.wr, c.next
                ));
            }
            return Ok(c);
        }
        let total = if h.more() { h.arg } else { u64::from(h.len) };
        let end = h
            .offset
            .checked_add(total)
            .ok_or_else(|| format!("write of {total} bytes at {} overflows", h.offset))?;
        let refusal = match self.regions.iter().find(|r| r.id.0 == h.region) {
            None => Some((NackReason::UnknownRegion, total)),
            Some(r) => {
                let bare_doorbell = h.kind == Kind::WriteImm && total == 0;
                if bare_doorbell || r.permits(peer, h.offset, total) {
                    None
                } else {
                    Some((NackReason::AccessDenied, total))
                }
            }
        };
        Ok(Chunked {
            wr: h.wr,
            region: h.region,
            start: h.offset,
            next: h.offset,
            end,
            refusal,
        })
    }

    /// Queues a doorbell or message, holding its source to its credits.
    fn deliver(
        &self,
        push: impl FnOnce(&mut Inbound) -> Result<(), Overrun>,
    ) -> Result<(), String> {
        let pushed = push(&mut self.inbound.lock().queue);
        if pushed.is_err() {
            return Err(format!(
                "it sent more than its {RECV_CREDITS} receive credits"
            ));
        }
        self.notifier.notify();
        Ok(())
    }

    /// Completes our request `h.wr` (and every earlier one) to the peer behind `conn`.
    fn complete(&self, conn: &Conn, h: &Header) -> Result<(), String> {
        let status = match h.kind {
            Kind::AckFetch => Status::Fetched(h.arg),
            Kind::Nack => Status::Denied {
                region: crate::RegionId(h.region),
                offset: h.offset,
                len: h.arg,
            },
            _ => Status::Done,
        };
        if self.cq.complete_through(conn.peer, h.wr, status) {
            Ok(())
        } else {
            Err(format!("an answer for wr {} that is not in flight", h.wr))
        }
    }

    /// Returns every credit consumed and not yet returned (before sleeping).
    pub(super) fn return_credits(&self) {
        let mut inb = self.inbound.lock();
        for s in 0..self.nodes {
            if inb.consumed[s] > inb.returned[s] {
                inb.returned[s] = inb.consumed[s];
                self.send_credit(NodeId(s as u16), inb.consumed[s]);
            }
        }
    }

    fn send_credit(&self, to: NodeId, consumed: u64) {
        let mut c = Header::new(Kind::Credit);
        c.arg = consumed;
        let conn = if to == self.rank {
            &self.loop_server
        } else {
            &self.links[to.index()].conn
        };
        if let Err(e) = conn.reply(&c, false) {
            tracing::warn!(peer = %conn.label, "returning credits failed: {e}");
        }
    }

    /// Moves waiting items into `out` and returns credits for what was consumed.
    pub(super) fn take_incoming(&self, out: &mut IncomingBatch) -> usize {
        let mut guard = self.inbound.lock();
        let inb = &mut *guard;
        let (consumed, returned) = (&mut inb.consumed, &mut inb.returned);
        inb.queue.take(out, |from| {
            let s = from.index();
            consumed[s] += 1;
            if consumed[s] - returned[s] >= CREDIT_BATCH {
                returned[s] = consumed[s];
                self.send_credit(from, consumed[s]);
            }
        })
    }
}

fn not_mid_write(chunk: &Option<Chunked>, h: &Header) -> Result<(), String> {
    match chunk {
        Some(c) => Err(format!(
            "{:?} wr {} arrived inside chunked write wr {}",
            h.kind, h.wr, c.wr
        )),
        None => Ok(()),
    }
}

fn refuse(
    conn: &Conn,
    wr: u64,
    region: u32,
    offset: u64,
    len: u64,
    reason: NackReason,
) -> Result<(), String> {
    tracing::warn!(
        peer = %conn.label,
        "refused an operation on region {region} at offset {offset} ({len} bytes): {}",
        match reason {
            NackReason::AccessDenied => "outside its grants",
            NackReason::UnknownRegion => "no such region",
        }
    );
    let mut n = Header::new(Kind::Nack);
    n.wr = wr;
    n.region = region;
    n.offset = offset;
    n.arg = len;
    n.imm = reason as u32;
    conn.reply(&n, true)
        .map_err(|e| format!("refusing failed: {e}"))
}

/// Whether `fd` has bytes (or a hang-up) to read now.
fn readable(fd: BorrowedFd<'_>) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut p = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut p, PollTimeout::ZERO), Ok(n) if n > 0)
}
