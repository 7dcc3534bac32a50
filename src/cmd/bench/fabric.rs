//! `vsmp bench fabric`: the fabric's write latency, doorbell and `fetch_add` round trips and
//! write bandwidth between two node processes on this host, each beside the raw primitive the
//! backend is built on, measured in the same run, as a ratio.
//!
//! This process is node 0 (the driver); it re-executes the `vsmp` binary as node 1 (hidden
//! `--internal-*` flags) with a fresh secret in `VSMP_SECRET`. First the raw primitive runs
//! between the two processes (shm: a spin ping-pong on shared memory, memcpy into it, a
//! hardware fetch_add on it; tcp: an 8-byte ping-pong on a loopback socket with TCP_NODELAY,
//! N bytes answered by 8, a pipelined stream), then the fabric group forms and the same
//! shapes run through the `Fabric` trait, node 1 answering doorbells.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use vsmp_fabric::shm::{SharedMemory, ShmFabric};
use vsmp_fabric::tcp::TcpFabric;
use vsmp_fabric::{
    Fabric, GroupConfig, Incoming, NodeId, RegionId, RegionSpec, RemoteAddr, SECRET_ENV, Secret,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Shm,
    Tcp,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Which fabric to measure.
    #[arg(long, value_enum, default_value = "shm")]
    backend: Backend,
    /// Node processes to start (the benchmark pairs two nodes).
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Timed iterations per latency figure.
    #[arg(long, default_value_t = 20_000)]
    iterations: u64,
    /// Injected one-way fabric delay (e.g. 2us), to emulate a slower link on one host; the raw
    /// primitive is never delayed.
    #[arg(
        long = "fabric-delay",
        visible_alias = "delay",
        value_name = "DURATION",
        value_parser = humantime::parse_duration,
        default_value = "0s"
    )]
    delay: Duration,
    /// Internal: run as node 1 of a benchmark, driven by node 0.
    #[arg(long, hide = true)]
    internal_node: bool,
    /// Internal: where node 0 serves the raw primitive (shm: a /proc path; tcp: an address).
    #[arg(long, hide = true)]
    internal_raw: Option<String>,
    /// Internal: the fabric's bootstrap address.
    #[arg(long, hide = true)]
    internal_bootstrap: Option<String>,
}

const DATA: RegionId = RegionId(1);
const WORDS: RegionId = RegionId(2);
const MAX_WRITE: usize = 1 << 20;
const WRITE_SIZES: [usize; 3] = [8, 4096, 65536];
const BANDWIDTH_SIZES: [usize; 3] = [65536, 256 * 1024, MAX_WRITE];
/// Bytes moved per bandwidth sample, and samples per size (the median is reported).
const BANDWIDTH_BYTES: usize = 256 << 20;
const BANDWIDTH_SAMPLES: usize = 11;
const PING: u32 = 1;
const PONG: u32 = 2;
const DONE: &[u8] = b"done";
/// Tells node 1 to stop busy-polling and block in `recv`.
const BLOCK: &[u8] = b"block";
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Raw shm words, each on its own cache line and 128-byte line pair (as the fabric's rings
/// are: the adjacent-line prefetcher must not couple them); the copy area follows.
const RAW_PING: usize = 0;
const RAW_PONG: usize = 1024;
const RAW_WORD: usize = 2048;
const RAW_COPY: usize = 4096;
const RAW_SHM_BYTES: usize = RAW_COPY + MAX_WRITE;
const RAW_END: u64 = u64::MAX;
/// Stored in the raw ping word: node 1 goes back to the fabric (see `interleaved`).
const RAW_BACK: u64 = u64::MAX - 1;
/// Tells node 1 (through the fabric) to answer the raw ping-pong until `RAW_BACK`.
const RAW: &[u8] = b"raw";
/// Chunks in which the fabric's and the raw round trips alternate.
const ROUND_TRIP_CHUNKS: u64 = 20;
/// Polls between two looks at the clock, in the raw and the fabric ping-pong loops alike.
const POLLS_PER_CLOCK: usize = 1024;

fn regions() -> Vec<RegionSpec> {
    vec![
        RegionSpec::open(DATA, MAX_WRITE),
        RegionSpec::open(WORDS, 4096),
    ]
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.internal_node {
        return node1(&args).map(|()| ExitCode::SUCCESS);
    }
    if args.nodes != 2 {
        bail!(
            "--nodes {}: the fabric benchmark measures a pair of nodes (--nodes 2)",
            args.nodes
        );
    }
    if args.iterations < 100 {
        bail!(
            "--iterations {}: at least 100 are needed for a p99",
            args.iterations
        );
    }
    driver(&args).map(|()| ExitCode::SUCCESS)
}

/// A measured figure: fabric and raw, latency histograms (ns) or bandwidth (bytes/s).
enum Row {
    Latency {
        name: String,
        fabric: Histogram<u64>,
        raw: Histogram<u64>,
        raw_name: &'static str,
    },
    Bandwidth {
        name: String,
        fabric: f64,
        raw: f64,
        raw_name: &'static str,
    },
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

/// Times `iterations` calls of `f` after a warm-up of a tenth as many.
fn time(
    iterations: u64,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Histogram<u64>> {
    for _ in 0..iterations / 10 {
        f()?;
    }
    let mut h = histogram();
    for _ in 0..iterations {
        let t = Instant::now();
        f()?;
        h.record((t.elapsed().as_nanos() as u64).max(1))?;
    }
    Ok(h)
}

/// Median bytes per second of `BANDWIDTH_SAMPLES` runs of `f(count)`, each moving `count`
/// buffers of `size` bytes.
fn bandwidth(size: usize, mut f: impl FnMut(usize) -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let count = (BANDWIDTH_BYTES / size).max(8);
    f(count / 4)?;
    let mut samples: Vec<f64> = (0..BANDWIDTH_SAMPLES)
        .map(|_| {
            let t = Instant::now();
            f(count)?;
            Ok((count * size) as f64 / t.elapsed().as_secs_f64())
        })
        .collect::<anyhow::Result<_>>()?;
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

/// Like [`bandwidth`] for two transfers whose samples alternate, so that both see the same
/// host conditions (the machine is shared; its memory bandwidth comes and goes).
fn bandwidth_pair(
    size: usize,
    mut a: impl FnMut(usize) -> anyhow::Result<()>,
    mut b: impl FnMut(usize) -> anyhow::Result<()>,
) -> anyhow::Result<(f64, f64)> {
    let count = (BANDWIDTH_BYTES / size).max(8);
    a(count / 4)?;
    b(count / 4)?;
    let mut sa = Vec::new();
    let mut sb = Vec::new();
    for _ in 0..BANDWIDTH_SAMPLES {
        for (f, samples) in [
            (
                &mut a as &mut dyn FnMut(usize) -> anyhow::Result<()>,
                &mut sa,
            ),
            (&mut b, &mut sb),
        ] {
            let t = Instant::now();
            f(count)?;
            samples.push((count * size) as f64 / t.elapsed().as_secs_f64());
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(&mut sa), median(&mut sb)))
}

/// Kills and reaps node 1 however the driver ends.
struct NodeGuard(Child);

impl Drop for NodeGuard {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn driver(args: &Args) -> anyhow::Result<()> {
    let secret = Secret::generate()?;
    let exe = std::env::current_exe().context("finding the vsmp binary to start node 1")?;
    let mut cfg = GroupConfig::new(NodeId(0), 2, regions(), "", secret.clone());
    cfg.delay = args.delay;
    let spawn = |raw: &str, bootstrap: &str| -> anyhow::Result<NodeGuard> {
        let child = Command::new(&exe)
            .args(["bench", "fabric", "--internal-node", "--backend"])
            .arg(match args.backend {
                Backend::Shm => "shm",
                Backend::Tcp => "tcp",
            })
            .arg(format!(
                "--fabric-delay={}",
                humantime::format_duration(args.delay)
            ))
            .arg(format!("--internal-raw={raw}"))
            .arg(format!("--internal-bootstrap={bootstrap}"))
            .env(SECRET_ENV, std::str::from_utf8(secret.expose())?)
            .spawn()
            .context("starting node 1")?;
        Ok(NodeGuard(child))
    };
    let n = args.iterations;
    let mut rows = Vec::new();
    let _node1 = match args.backend {
        Backend::Shm => {
            let raw = SharedMemory::create("vsmp-bench-raw", RAW_SHM_BYTES)?;
            let sock = std::env::temp_dir().join(format!("vsmp-bench-{}.sock", std::process::id()));
            let node1 = spawn(
                &raw.proc_path().display().to_string(),
                &sock.display().to_string(),
            )?;
            let raws = raw_shm_driver(&raw, n)?;
            cfg.bootstrap = sock.display().to_string();
            let ep: Arc<dyn Fabric> = Arc::new(ShmFabric::join(&cfg)?);
            fabric_driver(&*ep, n, raws, Some(&raw), &mut rows)?;
            node1
        }
        Backend::Tcp => {
            let raw = TcpListener::bind("127.0.0.1:0").context("binding the raw socket")?;
            cfg.bootstrap = "127.0.0.1:0".into();
            let (listener, addr) = TcpFabric::listen(cfg.clone())?;
            let node1 = spawn(&raw.local_addr()?.to_string(), &addr.to_string())?;
            let (stream, _) = raw.accept().context("accepting node 1's raw socket")?;
            let raws = raw_tcp_driver(stream, n)?;
            let ep: Arc<dyn Fabric> = Arc::new(listener.accept_group()?);
            fabric_driver(&*ep, n, raws, None, &mut rows)?;
            node1
        }
    };
    print_table(args, &rows);
    Ok(())
}

/// The raw primitive's figures, in the order the fabric's rows use them.
struct Raw {
    writes: Vec<Histogram<u64>>,
    write_name: &'static str,
    round_trip: Histogram<u64>,
    round_trip_name: &'static str,
    fetch_add: Histogram<u64>,
    fetch_add_name: &'static str,
    bandwidth: Vec<f64>,
    bandwidth_name: &'static str,
}

fn raw_shm_driver(raw: &SharedMemory, n: u64) -> anyhow::Result<Raw> {
    let ping = raw.word(RAW_PING);
    let pong = raw.word(RAW_PONG);
    // Wait for node 1 to be spinning (it answers 0 with 0 once it runs).
    let mut i = 0u64;
    let round_trip = time(n, || {
        i += 1;
        ping.store(i, Ordering::Release);
        raw_wait(pong, i)
    })?;
    ping.store(RAW_END, Ordering::Release);
    let writes = WRITE_SIZES
        .iter()
        .map(|&size| {
            let buf = vec![0x5au8; size];
            time(n, || {
                raw.copy_in(RAW_COPY, &buf);
                std::sync::atomic::fence(Ordering::Release);
                Ok(())
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let word = raw.word(RAW_WORD);
    let fetch_add = time(n, || {
        std::hint::black_box(word.fetch_add(1, Ordering::SeqCst));
        Ok(())
    })?;
    let bandwidth = BANDWIDTH_SIZES
        .iter()
        .map(|&size| {
            let buf = vec![0xa5u8; size];
            self::bandwidth(size, |count| {
                for _ in 0..count {
                    raw.copy_in(RAW_COPY, &buf);
                }
                Ok(())
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Raw {
        writes,
        write_name: "memcpy into shared memory",
        round_trip,
        round_trip_name: "shared-memory spin ping-pong",
        fetch_add,
        fetch_add_name: "lock xadd on shared memory",
        bandwidth,
        bandwidth_name: "memcpy into shared memory",
    })
}

/// Node 1's side of the raw ping-pong: answers every new value of the ping word until node 0
/// stores `RAW_END` or `RAW_BACK` there; `last` is the last value answered, across calls.
fn raw_shm_node1(raw: &SharedMemory, last: &mut u64) -> anyhow::Result<()> {
    let ping = raw.word(RAW_PING);
    let pong = raw.word(RAW_PONG);
    let mut idle = Instant::now();
    loop {
        // Polls as `poll` does the fabric: a batch of loads between looks at the clock.
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

/// Raw tcp frames: a u32 length, then that many bytes; the answer is 8 bytes. Length 0 ends.
fn raw_tcp_driver(mut s: TcpStream, n: u64) -> anyhow::Result<Raw> {
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
    let writes = WRITE_SIZES
        .iter()
        .map(|&size| {
            let buf = vec![0x5au8; size];
            time(n, || exchange(&mut s, &buf))
        })
        .collect::<anyhow::Result<_>>()?;
    let bandwidth = BANDWIDTH_SIZES
        .iter()
        .map(|&size| {
            let buf = vec![0xa5u8; size];
            self::bandwidth(size, |count| {
                // Pipelined: node 1 answers every frame; the answers are read at the end
                // (8 bytes each, far below the socket buffer).
                for _ in 0..count {
                    s.write_all(&(size as u32).to_le_bytes())?;
                    s.write_all(&buf)?;
                }
                let mut acks = vec![0u8; 8 * count];
                s.read_exact(&mut acks)?;
                Ok(())
            })
        })
        .collect::<anyhow::Result<_>>()?;
    s.write_all(&0u32.to_le_bytes())?;
    Ok(Raw {
        writes,
        write_name: "N bytes on a socket, 8 back",
        fetch_add: round_trip.clone(),
        fetch_add_name: "8-byte socket ping-pong",
        round_trip,
        round_trip_name: "8-byte socket ping-pong",
        bandwidth,
        bandwidth_name: "pipelined socket stream",
    })
}

fn raw_tcp_node1(addr: &str) -> anyhow::Result<()> {
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

fn at(region: RegionId, offset: u64) -> RemoteAddr {
    RemoteAddr { region, offset }
}

fn fabric_driver(
    ep: &dyn Fabric,
    n: u64,
    raw: Raw,
    local_raw: Option<&SharedMemory>,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let peer = NodeId(1);
    // shm: both nodes first busy-poll `recv` with a zero timeout, as a latency-bound user
    // polls a completion queue: the fabric's data path without the sleep policy. (Not on
    // tcp: a poller would steal the core its receive thread needs.)
    let mut raw_seq = 0u64;
    if let Some(mem) = local_raw {
        let (fabric, raw_h) = interleaved(ep, mem, &mut raw_seq, n, || {
            ep.post_write_imm(peer, at(DATA, 0), &[], PING)?;
            expect_pong(poll(ep)?)
        })?;
        rows.push(Row::Latency {
            name: "doorbell round trip (polling)".into(),
            fabric,
            raw: raw_h,
            raw_name: raw.round_trip_name,
        });
    }
    let wr = ep.post_send(peer, BLOCK)?;
    ep.wait(wr, OP_TIMEOUT)?;
    for ((&size, raw_h), i) in WRITE_SIZES.iter().zip(raw.writes).zip(0..) {
        let buf = vec![i as u8; size];
        let fabric = time(n, || {
            let wr = ep.post_write(peer, at(DATA, 0), &buf)?;
            ep.wait(wr, OP_TIMEOUT)?;
            Ok(())
        })?;
        rows.push(Row::Latency {
            name: format!("write {} + wait", human_bytes(size)),
            fabric,
            raw: raw_h,
            raw_name: raw.write_name,
        });
    }
    // Blocking: both nodes call `recv` with a timeout (spin, then sleep).
    let blocking = || {
        ep.post_write_imm(peer, at(DATA, 0), &[], PING)?;
        expect_pong(ep.recv(OP_TIMEOUT)?)
    };
    let (fabric, raw_h) = match local_raw {
        Some(mem) => interleaved(ep, mem, &mut raw_seq, n, blocking)?,
        None => (time(n, blocking)?, raw.round_trip),
    };
    rows.push(Row::Latency {
        name: "doorbell round trip (blocking)".into(),
        fabric,
        raw: raw_h,
        raw_name: raw.round_trip_name,
    });
    let fabric = time(n, || {
        let wr = ep.post_fetch_add(peer, at(WORDS, 0), 1)?;
        ep.wait(wr, OP_TIMEOUT)?;
        Ok(())
    })?;
    rows.push(Row::Latency {
        name: "fetch_add round trip".into(),
        fabric,
        raw: raw.fetch_add,
        raw_name: raw.fetch_add_name,
    });
    for (&size, raw_bw) in BANDWIDTH_SIZES.iter().zip(raw.bandwidth) {
        let buf = vec![0xa5u8; size];
        let fabric_writes = |count| {
            let mut last = None;
            for _ in 0..count {
                last = Some(ep.post_write(peer, at(DATA, 0), &buf)?);
            }
            if let Some(wr) = last {
                ep.wait(wr, OP_TIMEOUT)?;
            }
            Ok(())
        };
        // shm: the raw copy needs no peer, so its samples alternate with the fabric's.
        let (fabric, raw_bw) = match local_raw {
            Some(mem) => bandwidth_pair(size, fabric_writes, |count| {
                for _ in 0..count {
                    mem.copy_in(RAW_COPY, &buf);
                }
                Ok(())
            })?,
            None => (bandwidth(size, fabric_writes)?, raw_bw),
        };
        rows.push(Row::Bandwidth {
            name: format!("write bandwidth, {} writes", human_bytes(size)),
            fabric,
            raw: raw_bw,
            raw_name: raw.bandwidth_name,
        });
    }
    let wr = ep.post_send(peer, DONE)?;
    ep.wait(wr, OP_TIMEOUT)?;
    Ok(())
}

/// shm: times `n` fabric round trips `f` and `n` raw spin ping-pongs, alternating in chunks,
/// so that both see the same host conditions (on a shared host the cost of moving a cache line
/// between the two processes changes from minute to minute with where they run). Node 1
/// answers the raw chunks on a `RAW` message, until `RAW_BACK`.
fn interleaved(
    ep: &dyn Fabric,
    mem: &SharedMemory,
    seq: &mut u64,
    n: u64,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(Histogram<u64>, Histogram<u64>)> {
    let ping = mem.word(RAW_PING);
    let pong = mem.word(RAW_PONG);
    let chunk = (n / ROUND_TRIP_CHUNKS).max(1);
    let mut fabric = histogram();
    let mut raw = histogram();
    for c in 0..=ROUND_TRIP_CHUNKS {
        // The first chunk of each is a warm-up, not recorded.
        let record = c > 0;
        let iters = if record { chunk } else { chunk.max(n / 10) };
        // Each chunk's first round trip also covers node 1 switching over: not recorded.
        for k in 0..=iters {
            let t = Instant::now();
            f()?;
            if record && k > 0 {
                fabric.record((t.elapsed().as_nanos() as u64).max(1))?;
            }
        }
        // Node 1 leaves its raw loop only on RAW_BACK, so the word is cleared before it is
        // told to enter it (the message is published after this store).
        ping.store(0, Ordering::Release);
        let wr = ep.post_send(NodeId(1), RAW)?;
        ep.wait(wr, OP_TIMEOUT)?;
        for k in 0..=iters {
            *seq += 1;
            let i = *seq;
            let t = Instant::now();
            ping.store(i, Ordering::Release);
            raw_wait(pong, i)?;
            if record && k > 0 {
                raw.record((t.elapsed().as_nanos() as u64).max(1))?;
            }
        }
        ping.store(RAW_BACK, Ordering::Release);
    }
    Ok((fabric, raw))
}

/// Spins until the raw pong word holds `i`, polling as `poll` does the fabric.
fn raw_wait(pong: &std::sync::atomic::AtomicU64, i: u64) -> anyhow::Result<()> {
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

/// Busy-polls `recv` with a zero timeout until something arrives (or `OP_TIMEOUT`).
fn poll(ep: &dyn Fabric) -> anyhow::Result<Option<Incoming>> {
    let deadline = Instant::now() + OP_TIMEOUT;
    loop {
        for _ in 0..POLLS_PER_CLOCK {
            if let Some(item) = ep.recv(Duration::ZERO)? {
                return Ok(Some(item));
            }
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
    }
}

fn expect_pong(item: Option<Incoming>) -> anyhow::Result<()> {
    match item {
        Some(Incoming::Doorbell { imm: PONG, .. }) => Ok(()),
        Some(other) => bail!("unexpected {other:?} from node 1"),
        None => bail!("node 1 did not answer a doorbell"),
    }
}

fn node1(args: &Args) -> anyhow::Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .context("arranging to die with node 0")?;
    let raw = args
        .internal_raw
        .as_deref()
        .context("--internal-raw is missing")?;
    let bootstrap = args
        .internal_bootstrap
        .clone()
        .context("--internal-bootstrap is missing")?;
    let secret = Secret::from_env()?.with_context(|| format!("{SECRET_ENV} is not set"))?;
    let mut cfg = GroupConfig::new(NodeId(1), 2, regions(), bootstrap, secret);
    cfg.delay = args.delay;
    let mut raw_shm = None;
    let mut last = 0;
    let ep: Arc<dyn Fabric> = match args.backend {
        Backend::Shm => {
            let mem = raw_shm.insert(SharedMemory::open(raw.as_ref(), RAW_SHM_BYTES)?);
            raw_shm_node1(mem, &mut last)?;
            Arc::new(ShmFabric::join(&cfg)?)
        }
        Backend::Tcp => {
            raw_tcp_node1(raw)?;
            Arc::new(TcpFabric::join(cfg)?)
        }
    };
    // shm busy-polls until told to block (see `fabric_driver`); tcp always blocks.
    let mut polling = args.backend == Backend::Shm;
    let mut heard = Instant::now();
    loop {
        let item = if polling {
            poll(&*ep)?
        } else {
            ep.recv(OP_TIMEOUT)?
        };
        match item {
            Some(Incoming::Doorbell { from, imm: PING }) => {
                ep.post_write_imm(from, at(DATA, 0), &[], PONG)?;
            }
            Some(Incoming::Message { data, .. }) if data == BLOCK => polling = false,
            Some(Incoming::Message { data, .. }) if data == RAW => {
                let mem = raw_shm
                    .as_ref()
                    .context("a raw chunk outside the shm benchmark")?;
                raw_shm_node1(mem, &mut last)?;
            }
            Some(Incoming::Message { data, .. }) if data == DONE => return Ok(()),
            Some(other) => bail!("node 1: unexpected {other:?}"),
            None if heard.elapsed() > 6 * OP_TIMEOUT => bail!("node 1: node 0 went quiet"),
            None => continue,
        }
        heard = Instant::now();
    }
}

fn human_bytes(n: usize) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

fn us(ns: u64) -> String {
    format!("{:.2} us", ns as f64 / 1000.0)
}

fn print_table(args: &Args, rows: &[Row]) {
    println!(
        "vsmp bench fabric: backend {:?}, 2 node processes, {} iterations, injected delay {}",
        args.backend,
        args.iterations,
        humantime::format_duration(args.delay)
    );
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>12} {:>8}  raw primitive",
        "operation", "fabric p50", "fabric p99", "raw p50", "raw p99", "ratio"
    );
    for row in rows {
        match row {
            Row::Latency {
                name,
                fabric,
                raw,
                raw_name,
            } => {
                let (f50, r50) = (fabric.value_at_quantile(0.5), raw.value_at_quantile(0.5));
                println!(
                    "{:<34} {:>12} {:>12} {:>12} {:>12} {:>7.2}x  {raw_name}",
                    name,
                    us(f50),
                    us(fabric.value_at_quantile(0.99)),
                    us(r50),
                    us(raw.value_at_quantile(0.99)),
                    f50 as f64 / r50.max(1) as f64,
                );
            }
            Row::Bandwidth {
                name,
                fabric,
                raw,
                raw_name,
            } => {
                println!(
                    "{:<34} {:>12} {:>12} {:>12} {:>12} {:>7.0}%  {raw_name}",
                    name,
                    format!("{:.2} GiB/s", fabric / (1u64 << 30) as f64),
                    "",
                    format!("{:.2} GiB/s", raw / (1u64 << 30) as f64),
                    "",
                    100.0 * fabric / raw,
                );
            }
        }
    }
    println!(
        "latency ratio = fabric p50 / raw p50 (goal: doorbell round trip <= 1.3x); \
         bandwidth ratio = fabric / raw (goal: >= 80%)"
    );
}
