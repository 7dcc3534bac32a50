//! `vsmp bench fabric`: the fabric's write latency, doorbell and `fetch_add` round trips and
//! write bandwidth between two node processes on this host, each beside the raw primitive the
//! backend is built on, measured in the same run, as a ratio.
//!
//! This process is node 0 (the driver); it re-executes the `vsmp` binary as node 1 (hidden
//! `--internal-*` flags) with a fresh secret in `VSMP_SECRET`. First the raw primitive runs
//! between the two processes (`raw.rs`), then the fabric group forms (through the
//! backend-neutral `vsmp_fabric::join`) and the same shapes run through the `Fabric` trait as
//! a latency-bound user drives it: writes made from registered memory, doorbells unsignalled,
//! completions and incoming items polled; node 1 answers doorbells. `report.rs` measures and
//! prints.

mod raw;
pub(super) mod report;

use std::process::{Child, Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use vsmp_fabric::shm::SharedMemory;
use vsmp_fabric::{
    Backend, Completion, Fabric, FabricError, GroupConfig, IncomingBatch, IncomingRef, LocalSlice,
    NodeId, RegionId, RegionSpec, RemoteAddr, SECRET_ENV, Secret, Signal, Source, WrId,
};

use raw::Raw;
use report::{Row, bandwidth_pair, histogram, human_bytes, time};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    Shm,
    Tcp,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Backend {
        match b {
            BackendArg::Shm => Backend::Shm,
            BackendArg::Tcp => Backend::Tcp,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Which fabric to measure.
    #[arg(long, value_enum, default_value = "shm")]
    backend: BackendArg,
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
/// Each node's private source memory: every write is made from it.
const SRC: RegionId = RegionId(3);
const MAX_WRITE: usize = 1 << 20;
const WRITE_SIZES: [usize; 3] = [8, 4096, 65536];
const BANDWIDTH_SIZES: [usize; 3] = [65536, 256 * 1024, MAX_WRITE];
const PING: u32 = 1;
const PONG: u32 = 2;
const DONE: &[u8] = b"done";
/// Tells node 1 to stop busy-polling and block in `recv`.
const BLOCK: &[u8] = b"block";
const OP_TIMEOUT: Duration = Duration::from_secs(10);
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
        RegionSpec::private(SRC, MAX_WRITE),
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
    let rows = measure(
        Backend::from(args.backend),
        args.iterations,
        args.delay,
        true,
    )?;
    report::print_table(
        &format!(
            "vsmp bench fabric: backend {}, 2 node processes, {} iterations, injected delay {}",
            Backend::from(args.backend),
            args.iterations,
            humantime::format_duration(args.delay)
        ),
        &rows,
    );
    Ok(())
}

/// The fabric's latency figures (write + wait, doorbell and `fetch_add` round trips, each
/// beside the raw primitive) between this process and a second node process, for other
/// benchmarks that put their figures beside the fabric's; `bandwidth` adds the bandwidth rows.
pub(super) fn measure(
    backend: Backend,
    n: u64,
    delay: Duration,
    bandwidth: bool,
) -> anyhow::Result<Vec<Row>> {
    let args = Args {
        backend: match backend {
            Backend::Shm => BackendArg::Shm,
            Backend::Tcp => BackendArg::Tcp,
        },
        nodes: 2,
        iterations: n,
        delay,
        internal_node: false,
        internal_raw: None,
        internal_bootstrap: None,
    };
    let args = &args;
    let secret = Secret::generate()?;
    let exe = std::env::current_exe().context("finding the vsmp binary to start node 1")?;
    let spawn = |raw: &str, bootstrap: &str| -> anyhow::Result<NodeGuard> {
        let child = Command::new(&exe)
            .args(["bench", "fabric", "--internal-node", "--backend"])
            .arg(backend.to_string())
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
    let mut rows = Vec::new();
    let bootstrap = match backend {
        Backend::Shm => std::env::temp_dir()
            .join(format!("vsmp-bench-{}.sock", std::process::id()))
            .display()
            .to_string(),
        Backend::Tcp => "127.0.0.1:0".to_string(),
    };
    let cfg = GroupConfig::new(NodeId(0), 2, regions(), bootstrap, secret.clone());
    let (pending, addr) = vsmp_fabric::listen(backend, cfg, args.delay)?;
    let _node1 = match backend {
        Backend::Shm => {
            let raw = SharedMemory::create("vsmp-bench-raw", raw::RAW_SHM_BYTES)?;
            let node1 = spawn(&raw.proc_path().display().to_string(), &addr)?;
            let raws = raw::shm_driver(&raw, n)?;
            let ep = pending.finish()?;
            fabric_driver(&*ep, n, raws, Local::Shm(&raw), bandwidth, &mut rows)?;
            node1
        }
        Backend::Tcp => {
            let raw =
                std::net::TcpListener::bind("127.0.0.1:0").context("binding the raw socket")?;
            let node1 = spawn(&raw.local_addr()?.to_string(), &addr)?;
            let (stream, _) = raw.accept().context("accepting node 1's raw socket")?;
            let (raws, mut stream) = raw::tcp_driver(stream, n)?;
            let ep = pending.finish()?;
            fabric_driver(&*ep, n, raws, Local::Tcp(&mut stream), bandwidth, &mut rows)?;
            raw::tcp_finish(stream)?;
            node1
        }
    };
    Ok(rows)
}

fn at(region: RegionId, offset: u64) -> RemoteAddr {
    RemoteAddr::new(region, offset)
}

/// The first `len` bytes of this node's source memory.
fn src(len: usize) -> Source<'static> {
    Source::Region(LocalSlice::new(SRC, 0, len as u64))
}

/// Posts, retrying while the window is full: takes completions (which must all be
/// successes: nothing here is signalled but what is waited for) and tries again.
fn post(ep: &dyn Fabric, mut f: impl FnMut() -> Result<WrId, FabricError>) -> anyhow::Result<WrId> {
    let deadline = Instant::now() + OP_TIMEOUT;
    let mut done = [Completion::EMPTY; 64];
    loop {
        match f() {
            Err(FabricError::WouldBlock { .. }) if Instant::now() < deadline => {
                let k = ep.poll_completions(&mut done);
                if let Some(c) = done[..k].iter().find(|c| !c.is_ok()) {
                    bail!("an operation failed: {c:?}");
                }
            }
            r => return Ok(r?),
        }
    }
}

fn doorbell(ep: &dyn Fabric, peer: NodeId, imm: u32) -> anyhow::Result<()> {
    post(ep, || {
        ep.post_write(peer, at(DATA, 0), Source::Empty, Some(imm), Signal::OnError)
    })
    .map(drop)
}

/// The raw primitive still reachable while the fabric runs, for figures whose samples
/// alternate with the fabric's.
enum Local<'a> {
    Shm(&'a SharedMemory),
    Tcp(&'a mut std::net::TcpStream),
}

fn fabric_driver(
    ep: &dyn Fabric,
    n: u64,
    raw: Raw,
    mut local: Local<'_>,
    bandwidth: bool,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let local_raw = match &local {
        Local::Shm(mem) => Some(*mem),
        Local::Tcp(_) => None,
    };
    let peer = NodeId(1);
    let mut batch = IncomingBatch::new(16);
    ep.memory(SRC)?.write(0, &vec![0x5a; MAX_WRITE])?;
    // shm: both nodes first busy-poll, as a latency-bound user polls a completion queue: the
    // fabric's data path without the sleep policy. (Not on tcp: a poller would steal the
    // core the peer's driving needs.)
    let mut raw_seq = 0u64;
    if let Some(mem) = local_raw {
        let (fabric, raw_h) = interleaved(ep, mem, &mut raw_seq, n, || {
            doorbell(ep, peer, PING)?;
            expect_pong(poll(ep, &mut batch)?)
        })?;
        rows.push(Row::Latency {
            name: "doorbell round trip (polling)".into(),
            fabric,
            raw: raw_h,
            raw_name: raw.round_trip_name,
        });
    }
    let wr = ep.post_send(peer, BLOCK, Signal::Always)?;
    ep.wait(wr, OP_TIMEOUT)?;
    for (&size, raw_h) in WRITE_SIZES.iter().zip(raw.writes) {
        let fabric = time(n, || {
            let wr = post(ep, || {
                ep.post_write(peer, at(DATA, 0), src(size), None, Signal::Always)
            })?;
            ep.wait(wr, OP_TIMEOUT)?;
            Ok(())
        })?;
        rows.push(Row::Latency {
            name: format!("write {} from memory + wait", human_bytes(size)),
            fabric,
            raw: raw_h,
            raw_name: raw.write_name,
        });
    }
    // Blocking: both nodes call `recv` with a timeout (spin, then sleep on the notifier).
    let mut blocking = || {
        doorbell(ep, peer, PING)?;
        expect_pong(ep.recv(OP_TIMEOUT)?.map(heard))
    };
    let (fabric, raw_h) = match local_raw {
        Some(mem) => interleaved(ep, mem, &mut raw_seq, n, blocking)?,
        None => (time(n, &mut blocking)?, raw.round_trip),
    };
    rows.push(Row::Latency {
        name: "doorbell round trip (blocking)".into(),
        fabric,
        raw: raw_h,
        raw_name: raw.round_trip_name,
    });
    let fabric = time(n, || {
        let wr = post(ep, || ep.post_fetch_add(peer, at(WORDS, 0), 1))?;
        ep.wait(wr, OP_TIMEOUT)?;
        Ok(())
    })?;
    rows.push(Row::Latency {
        name: "fetch_add round trip".into(),
        fabric,
        raw: raw.fetch_add,
        raw_name: raw.fetch_add_name,
    });
    let sizes: &[usize] = if bandwidth { &BANDWIDTH_SIZES } else { &[] };
    for &size in sizes {
        let fabric_writes = |count: usize| {
            for k in 0..count {
                let signal = if k + 1 == count {
                    Signal::Always
                } else {
                    Signal::OnError
                };
                let wr = post(ep, || {
                    ep.post_write(peer, at(DATA, 0), src(size), None, signal)
                })?;
                if k + 1 == count {
                    ep.wait(wr, OP_TIMEOUT)?;
                }
            }
            Ok(())
        };
        // The raw transfer's samples alternate with the fabric's (the host's memory and
        // loopback bandwidth come and go).
        let buf = vec![0xa5u8; size];
        let (fabric, raw_bw) = match &mut local {
            Local::Shm(mem) => bandwidth_pair(size, fabric_writes, |count| {
                for _ in 0..count {
                    mem.copy_in(raw::RAW_COPY, &buf);
                }
                Ok(())
            })?,
            Local::Tcp(stream) => bandwidth_pair(size, fabric_writes, |count| {
                raw::tcp_stream(stream, &buf, count)
            })?,
        };
        rows.push(Row::Bandwidth {
            name: format!("write bandwidth, {} writes", human_bytes(size)),
            fabric,
            raw: raw_bw,
            raw_name: raw.bandwidth_name,
        });
    }
    let wr = ep.post_send(peer, DONE, Signal::Always)?;
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
    let ping = mem.word(raw::RAW_PING);
    let pong = mem.word(raw::RAW_PONG);
    let chunk = (n / ROUND_TRIP_CHUNKS).max(1);
    let mut fabric = histogram();
    let mut raw_h = histogram();
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
        let wr = ep.post_send(NodeId(1), RAW, Signal::Always)?;
        ep.wait(wr, OP_TIMEOUT)?;
        for k in 0..=iters {
            *seq += 1;
            let i = *seq;
            let t = Instant::now();
            ping.store(i, Ordering::Release);
            raw::wait_pong(pong, i)?;
            if record && k > 0 {
                raw_h.record((t.elapsed().as_nanos() as u64).max(1))?;
            }
        }
        ping.store(raw::RAW_BACK, Ordering::Release);
    }
    Ok((fabric, raw_h))
}

/// What node 1 answers with or is told.
#[derive(Debug, PartialEq, Eq)]
enum Heard {
    Pong,
    Ping(NodeId),
    Message(Vec<u8>),
}

/// Busy-polls `poll_incoming` until something arrives (or `OP_TIMEOUT`).
fn poll(ep: &dyn Fabric, batch: &mut IncomingBatch) -> anyhow::Result<Option<Heard>> {
    let deadline = Instant::now() + OP_TIMEOUT;
    loop {
        for _ in 0..POLLS_PER_CLOCK {
            batch.clear();
            if ep.poll_incoming(batch) == 0 {
                // As the raw loop does: a spinning poller tells the core it spins.
                std::hint::spin_loop();
                continue;
            }
            let item = batch.iter().next().expect("one item");
            return Ok(Some(match item {
                IncomingRef::Doorbell { imm: PONG, .. } => Heard::Pong,
                IncomingRef::Doorbell { from, imm: PING } => Heard::Ping(from),
                IncomingRef::Message { data, .. } => Heard::Message(data.to_vec()),
                other => bail!("unexpected {other:?}"),
            }));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
    }
}

/// What a blocking `recv` returned, as `poll` names it.
fn heard(item: vsmp_fabric::Incoming) -> Heard {
    match item {
        vsmp_fabric::Incoming::Doorbell { imm: PONG, .. } => Heard::Pong,
        vsmp_fabric::Incoming::Doorbell { from, .. } => Heard::Ping(from),
        vsmp_fabric::Incoming::Message { data, .. } => Heard::Message(data),
    }
}

fn expect_pong(item: Option<Heard>) -> anyhow::Result<()> {
    match item {
        Some(Heard::Pong) => Ok(()),
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
    let cfg = GroupConfig::new(NodeId(1), 2, regions(), bootstrap, secret);
    let backend = Backend::from(args.backend);
    let mut raw_shm = None;
    let mut last = 0;
    match backend {
        Backend::Shm => {
            let mem = raw_shm.insert(SharedMemory::open(raw.as_ref(), raw::RAW_SHM_BYTES)?);
            raw::shm_node1(mem, &mut last)?;
        }
        Backend::Tcp => {
            // Served for the whole run: node 0 alternates raw and fabric bandwidth samples.
            let addr = raw.to_string();
            std::thread::Builder::new()
                .name("raw-tcp".into())
                .spawn(move || raw::tcp_node1(&addr))
                .context("starting the raw socket server")?;
        }
    }
    let ep: Arc<dyn Fabric> = vsmp_fabric::join(backend, cfg, args.delay)?;
    // shm busy-polls until told to block (see `fabric_driver`); tcp always blocks.
    let mut polling = backend == Backend::Shm;
    let mut batch = IncomingBatch::new(16);
    let mut last_heard = Instant::now();
    loop {
        let item = if polling {
            poll(&*ep, &mut batch)?
        } else {
            ep.recv(OP_TIMEOUT)?.map(heard)
        };
        match item {
            Some(Heard::Ping(from)) => doorbell(&*ep, from, PONG)?,
            Some(Heard::Message(data)) if data == BLOCK => polling = false,
            Some(Heard::Message(data)) if data == RAW => {
                let mem = raw_shm
                    .as_ref()
                    .context("a raw chunk outside the shm benchmark")?;
                raw::shm_node1(mem, &mut last)?;
            }
            Some(Heard::Message(data)) if data == DONE => return Ok(()),
            Some(other) => bail!("node 1: unexpected {other:?}"),
            None if last_heard.elapsed() > 6 * OP_TIMEOUT => bail!("node 1: node 0 went quiet"),
            None => continue,
        }
        last_heard = Instant::now();
    }
}
