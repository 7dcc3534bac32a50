//! The raw primitives the fabric is built on, measured between the same two processes: on shm
//! a spin ping-pong on shared memory, memcpy into it, a hardware `lock xadd` on it; on tcp an
//! 8-byte socket ping-pong with TCP_NODELAY, N bytes answered by 8, a pipelined stream. The
//! bandwidth samples alternate with the fabric's (`mod.rs`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use vsmp_fabric::shm::SharedMemory;

use super::report::{per_size, time};
use super::{MAX_WRITE, OP_TIMEOUT, POLLS_PER_CLOCK, WRITE_SIZES};

/// Raw shm words, each on its own cache line and 128-byte line pair (as the fabric's rings
/// are: the adjacent-line prefetcher must not couple them); the copy area follows.
pub const RAW_PING: usize = 0;
pub const RAW_PONG: usize = 1024;
const RAW_WORD: usize = 2048;
pub const RAW_COPY: usize = 4096;
pub const RAW_SHM_BYTES: usize = RAW_COPY + MAX_WRITE;
const RAW_END: u64 = u64::MAX;
/// Stored in the raw ping word: node 1 goes back to the fabric (see `interleaved`).
pub const RAW_BACK: u64 = u64::MAX - 1;

/// The raw primitive's figures, in the order the fabric's rows use them.
pub struct Raw {
    pub writes: Vec<Histogram<u64>>,
    pub write_name: &'static str,
    pub round_trip: Histogram<u64>,
    pub round_trip_name: &'static str,
    pub fetch_add: Histogram<u64>,
    pub fetch_add_name: &'static str,
    /// Bandwidth is measured later, alternating with the fabric's samples.
    pub bandwidth_name: &'static str,
}

pub fn shm_driver(raw: &SharedMemory, n: u64) -> anyhow::Result<Raw> {
    let ping = raw.word(RAW_PING);
    let pong = raw.word(RAW_PONG);
    let mut i = 0u64;
    let round_trip = time(n, || {
        i += 1;
        ping.store(i, Ordering::Release);
        wait_pong(pong, i)
    })?;
    ping.store(RAW_END, Ordering::Release);
    let writes = per_size(&WRITE_SIZES, 0x5a, |buf| {
        time(n, || {
            raw.copy_in(RAW_COPY, buf);
            std::sync::atomic::fence(Ordering::Release);
            Ok(())
        })
    })?;
    let word = raw.word(RAW_WORD);
    let fetch_add = time(n, || {
        std::hint::black_box(word.fetch_add(1, Ordering::SeqCst));
        Ok(())
    })?;
    Ok(Raw {
        writes,
        write_name: "memcpy into shared memory",
        round_trip,
        round_trip_name: "shared-memory spin ping-pong",
        fetch_add,
        fetch_add_name: "lock xadd on shared memory",
        bandwidth_name: "memcpy into shared memory",
    })
}

/// Node 1's side of the raw ping-pong: answers every new value of the ping word until node 0
/// stores `RAW_END` or `RAW_BACK` there; `last` is the last value answered, across calls.
pub fn shm_node1(raw: &SharedMemory, last: &mut u64) -> anyhow::Result<()> {
    let ping = raw.word(RAW_PING);
    let pong = raw.word(RAW_PONG);
    let mut idle = Instant::now();
    loop {
        // Polls as the fabric's pollers do: a batch of loads between looks at the clock.
        for _ in 0..POLLS_PER_CLOCK {
            let v = ping.load(Ordering::Acquire);
            if v == RAW_END || v == RAW_BACK {
                return Ok(());
            }
            if v != *last && v != 0 {
                pong.store(v, Ordering::Release);
                *last = v;
                idle = Instant::now();
            }
            std::hint::spin_loop();
        }
        if idle.elapsed() > 6 * OP_TIMEOUT {
            bail!("node 0 never finished the raw ping-pong");
        }
    }
}

/// Spins until the raw pong word holds `i`, polling as the fabric's pollers do.
pub fn wait_pong(pong: &AtomicU64, i: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + OP_TIMEOUT;
    loop {
        for _ in 0..POLLS_PER_CLOCK {
            if pong.load(Ordering::Acquire) == i {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        if Instant::now() > deadline {
            bail!("node 1 stopped answering the raw shared-memory ping-pong");
        }
    }
}

/// Raw tcp frames: a u32 length, then that many bytes; the answer is 8 bytes. Length 0 ends.
/// The latency figures are measured here; the bandwidth samples later, alternating with the
/// fabric's (see [`tcp_stream`]), on the stream this returns.
pub fn tcp_driver(mut s: TcpStream, n: u64) -> anyhow::Result<(Raw, TcpStream)> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(OP_TIMEOUT))?;
    let mut ack = [0u8; 8];
    let mut exchange = |s: &mut TcpStream, buf: &[u8]| -> anyhow::Result<()> {
        s.write_all(&(buf.len() as u32).to_le_bytes())?;
        s.write_all(buf)?;
        s.read_exact(&mut ack)?;
        Ok(())
    };
    let ping = [0u8; 8];
    let round_trip = time(n, || exchange(&mut s, &ping))?;
    let writes = per_size(&WRITE_SIZES, 0x5a, |buf| time(n, || exchange(&mut s, buf)))?;
    let raw = Raw {
        writes,
        write_name: "N bytes on a socket, 8 back",
        fetch_add: round_trip.clone(),
        fetch_add_name: "8-byte socket ping-pong",
        round_trip,
        round_trip_name: "8-byte socket ping-pong",
        bandwidth_name: "pipelined socket stream",
    };
    Ok((raw, s))
}

/// One raw bandwidth sample: `count` frames of `buf` pipelined (node 1 answers every frame;
/// the answers, 8 bytes each and far below the socket buffer, are read at the end).
pub fn tcp_stream(s: &mut TcpStream, buf: &[u8], count: usize) -> anyhow::Result<()> {
    for _ in 0..count {
        s.write_all(&(buf.len() as u32).to_le_bytes())?;
        s.write_all(buf)?;
    }
    let mut acks = vec![0u8; 8 * count];
    s.read_exact(&mut acks)?;
    Ok(())
}

/// Ends node 1's raw server.
pub fn tcp_finish(mut s: TcpStream) -> anyhow::Result<()> {
    s.write_all(&0u32.to_le_bytes())?;
    Ok(())
}

pub fn tcp_node1(addr: &str) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(6 * OP_TIMEOUT))?;
    let mut buf = vec![0u8; MAX_WRITE];
    loop {
        let mut len = [0u8; 4];
        s.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 {
            return Ok(());
        }
        if len > MAX_WRITE {
            bail!("raw frame of {len} bytes");
        }
        s.read_exact(&mut buf[..len])?;
        s.write_all(&[0u8; 8])?;
    }
}
