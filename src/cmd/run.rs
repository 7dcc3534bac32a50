//! `vsmp run`: run a guest ELF on a vsmp machine of one or more nodes.
//!
//! - `vsmp run GUEST.elf`: one node, in this process.
//! - `vsmp run --nodes N GUEST.elf`: N node processes on this host (this process launches and
//!   supervises them), joined by the shm fabric (or `--fabric tcp`), with a fresh secret.
//! - `vsmp run --rank R --nodes N --bootstrap ADDR GUEST.elf`: this process is node R of a
//!   machine someone else launches (the shared secret in `$VSMP_SECRET`).
//!
//! Exit status: the machine's status (the exit port's value, or the first non-zero return
//! of `main` in the machine's global order, else 0); [`VSMP_FAILURE`] when vsmp itself failed
//! (a monitor error, a guest crash, a refused system call, a dead node), with `vsmp: ...`
//! lines saying why.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vsmp_affinity::{CoreId, Placement};
use vsmp_coherence::fabric::{Backend, GroupConfig, NodeId, SECRET_ENV, Secret};
use vsmp_monitor::marker::{MARKER_SECTION, Marker};
use vsmp_monitor::node::{self, Joined, NodeConfig, NodeReport};
use vsmp_monitor::vm::elf::{GuestImage, LoadError};
use vsmp_monitor::vm::memory::{GuestMemory, MemSize};
use vsmp_monitor::vm::protect;
use vsmp_monitor::vm::run::{MarkerSource, choose_marker};

/// The exit status of `vsmp run` when vsmp itself failed (as `docker run` and `env` use it),
/// distinct from any status a guest can choose... except 125 itself, which a guest should not.
pub const VSMP_FAILURE: u8 = 125;

/// How long the other nodes get to stop by themselves after one failed, before the launcher
/// kills them.
const FAILURE_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of nodes (one vCPU each): vCPU i runs on node i.
    #[arg(long, short = 'n', value_name = "N", default_value_t = 1)]
    nodes: usize,
    /// The fabric between the nodes: shm (nodes on this host) or tcp.
    #[arg(long, value_name = "BACKEND", default_value = "shm")]
    fabric: Backend,
    /// Guest RAM size: bytes, or with a K, M or G suffix (binary units).
    #[arg(long, value_name = "SIZE", default_value_t = MemSize::default())]
    mem: MemSize,
    /// Trap marker the guest was built with (ud2 or int3). Default: the guest's own
    /// `.vsmp.marker` section, else ud2. Refused if it disagrees with that section.
    #[arg(long, value_name = "MARKER")]
    marker: Option<Marker>,
    /// The periodic flush: the longest a store stays invisible to other nodes without a fence
    /// (and the shortest time between two interruptions of a running vCPU), e.g. 2ms, 500us.
    #[arg(long, value_name = "TIME", default_value = "2ms", value_parser = humantime::parse_duration)]
    flush_interval: Duration,
    /// Twin pool: the most pages a node has written and not yet published.
    #[arg(long, value_name = "PAGES", default_value_t = node::DEFAULT_TWINS)]
    twins: usize,
    /// How guest pages are write-protected: uffd (userfaultfd), mprotect, or auto.
    #[arg(long, value_name = "HOW", default_value_t = protect::Choice::Auto)]
    protect: protect::Choice,
    /// Prefix each console line with the vCPU that wrote it (like `srun -l`).
    #[arg(long, short = 'l')]
    label: bool,
    /// At exit, print per node: write faults, twins, diffs, batches, flushes, fences, and
    /// fault and fence latency (median, p99).
    #[arg(long)]
    stats: bool,
    /// Write the statistics of every node as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    stats_json: Option<PathBuf>,
    /// Do not pin the monitor thread and the VM process to one core.
    #[arg(long, conflicts_with = "core")]
    no_pin: bool,
    /// Pin the monitor thread and the VM process to this core (one node only; default: the
    /// core for this node's local rank among those this process may use).
    #[arg(long, value_name = "N")]
    core: Option<usize>,
    /// Run as node R of a machine launched elsewhere (needs --nodes, --bootstrap and the
    /// shared secret in $VSMP_SECRET).
    #[arg(long, value_name = "R", requires = "bootstrap")]
    rank: Option<u16>,
    /// Where node 0 gathers the machine: a Unix socket path (shm) or host:port (tcp).
    #[arg(long, value_name = "ADDR", requires = "rank")]
    bootstrap: Option<String>,
    /// Internal: where a launched node writes its result for the launcher.
    #[arg(long, hide = true, value_name = "FILE")]
    internal_report: Option<PathBuf>,
    /// The guest: a static x86-64 ELF executable linked at 1 MiB (see `vsmp cc`).
    guest: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    if args.nodes > usize::from(u16::MAX) + 1 {
        bail!("--nodes must be at most 65536");
    }
    if args.rank.is_some() {
        return run_one_node(&args);
    }
    if args.nodes > 1 {
        if args.core.is_some() {
            bail!("--core pins one node; with --nodes the nodes spread over the cores themselves");
        }
        return launch(&args);
    }
    run_alone(&args)
}

fn node_config(args: &Args, marker: Marker, placement: Placement) -> NodeConfig {
    NodeConfig {
        marker,
        placement,
        flush_interval: args.flush_interval,
        twins: args.twins,
        protection: args.protect,
        label: args.label,
    }
}

/// Reads the guest and decides its marker; checks it fits.
fn load_guest(args: &Args) -> anyhow::Result<(GuestImage, Marker)> {
    let image = GuestImage::from_file(&args.guest)?;
    let (marker, source) = choose_marker(image.marker, args.marker)
        .with_context(|| format!("cannot run guest {}", args.guest.display()))?;
    if source == MarkerSource::Default {
        tracing::warn!(
            "{} has no {MARKER_SECTION} section and no --marker was given: assuming {marker}",
            args.guest.display()
        );
    }
    image.check_fits(args.mem).map_err(|source| LoadError {
        path: args.guest.clone(),
        source,
    })?;
    Ok((image, marker))
}

fn placement(args: &Args, local_rank: usize) -> anyhow::Result<Placement> {
    Ok(match (args.no_pin, args.core) {
        (true, _) => Placement::Unpinned,
        (false, Some(core)) => Placement::Together(CoreId(core)),
        (false, None) => Placement::for_local_rank(local_rank)?,
    })
}

/// Runs `node` (everything a node does, from creating guest RAM on) on the node's own named
/// monitor thread: the ptrace tracer, the thread that gets pinned.
fn monitor_thread(
    rank: u16,
    node: impl FnOnce() -> anyhow::Result<NodeReport> + Send,
) -> anyhow::Result<NodeReport> {
    let report = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name(format!("monitor-{rank}"))
            .spawn_scoped(scope, node)
            .context("cannot start the monitor thread")?
            .join()
            .map_err(|_| anyhow::anyhow!("the monitor thread panicked"))
    })?;
    std::io::stdout()
        .flush()
        .context("cannot flush standard output")?;
    report
}

/// One node, no DSM.
fn run_alone(args: &Args) -> anyhow::Result<ExitCode> {
    node::block_sigchld()?;
    let (image, marker) = load_guest(args)?;
    let cfg = node_config(args, marker, placement(args, 0)?);
    let report = monitor_thread(0, || {
        let memory = GuestMemory::new(args.mem)?;
        Ok(node::run_node(
            &image,
            memory,
            None,
            &cfg,
            Box::new(std::io::stdout()),
        )?)
    })?;
    finish_stats(args, &[report_stats(0, &report)])?;
    Ok(ExitCode::from(report.status))
}

/// The statistics of one node, as text and JSON.
fn report_stats(rank: u16, report: &NodeReport) -> (String, String) {
    (report.stats.text(rank), report.stats.json(rank))
}

/// Prints (`--stats`) and writes (`--stats-json`) the statistics of every node.
fn finish_stats(args: &Args, stats: &[(String, String)]) -> anyhow::Result<()> {
    if args.stats {
        let mut err = std::io::stderr().lock();
        for (text, _) in stats {
            err.write_all(text.as_bytes())?;
        }
    }
    if let Some(path) = &args.stats_json {
        let body: Vec<&str> = stats.iter().map(|(_, j)| j.as_str()).collect();
        std::fs::write(path, format!("[{}]\n", body.join(",\n")))
            .with_context(|| format!("cannot write the statistics to {}", path.display()))?;
    }
    Ok(())
}

/// This process is one node of a machine.
fn run_one_node(args: &Args) -> anyhow::Result<ExitCode> {
    node::block_sigchld()?;
    let rank = args.rank.expect("checked by the caller");
    let nodes = args.nodes;
    if usize::from(rank) >= nodes {
        bail!("--rank {rank} is outside a machine of {nodes} nodes");
    }
    let bootstrap = args.bootstrap.clone().expect("clap requires it");
    let (image, marker) = load_guest(args)?;
    let local_rank = std::env::var("SLURM_LOCALID")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(usize::from(rank));
    let cfg = node_config(args, marker, placement(args, local_rank)?);
    let secret = Secret::from_env()?.with_context(|| {
        format!("{SECRET_ENV} is not set: every node of a machine needs the same secret")
    })?;
    let report = monitor_thread(rank, || {
        let memory = GuestMemory::new(args.mem)?;
        let guest = node::guest_region(&memory)?;
        let regions = node::regions(&cfg, nodes, args.mem.bytes());
        let gcfg = GroupConfig::new(NodeId(rank), nodes, regions, bootstrap, secret)
            .register(std::sync::Arc::clone(&guest));
        let fabric = vsmp_coherence::fabric::join(args.fabric, gcfg, Duration::ZERO)
            .with_context(|| format!("node {rank} cannot join the machine"))?;
        let joined = Joined { fabric, guest };
        let stdout: Box<dyn Write + Send> = Box::new(std::io::stdout());
        Ok(node::run_node(&image, memory, Some(joined), &cfg, stdout)?)
    })
    .with_context(|| format!("node {rank} of {nodes} stopped"))?;
    let stats = report_stats(rank, &report);
    match &args.internal_report {
        Some(path) => {
            let text = format!("status {}\n{}\n{}", report.status, stats.1, stats.0);
            std::fs::write(path, text)
                .with_context(|| format!("cannot write the node report {}", path.display()))?;
        }
        None => finish_stats(args, &[stats])?,
    }
    Ok(ExitCode::from(report.status))
}

/// A launched node process, killed (and reaped) if the launcher leaves early.
struct NodeProcess {
    rank: usize,
    child: Child,
    exit: Option<std::process::ExitStatus>,
    report: PathBuf,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The launcher's scratch directory (the bootstrap socket, the reports), removed at the end.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_tcp_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free local port")?;
    Ok(l.local_addr()?.port())
}

/// `--nodes N`: starts N node processes on this host and supervises them.
fn launch(args: &Args) -> anyhow::Result<ExitCode> {
    // Refuse a bad guest before starting anything.
    load_guest(args)?;
    let exe = std::env::current_exe().context("finding the vsmp binary to start the nodes")?;
    let secret = Secret::generate()?;
    let scratch = Scratch(unique_dir()?);
    let bootstrap = match args.fabric {
        Backend::Shm => scratch.0.join("bootstrap.sock").display().to_string(),
        Backend::Tcp => format!("127.0.0.1:{}", free_tcp_port()?),
    };
    let mut nodes = Vec::with_capacity(args.nodes);
    for rank in 0..args.nodes {
        let report = scratch.0.join(format!("node{rank}.report"));
        let mut cmd = Command::new(&exe);
        cmd.arg("run")
            .arg(format!("--nodes={}", args.nodes))
            .arg(format!("--rank={rank}"))
            .arg(format!("--fabric={}", args.fabric))
            .arg(format!("--bootstrap={bootstrap}"))
            .arg(format!("--mem={}", args.mem))
            .arg(format!(
                "--flush-interval={}",
                humantime::format_duration(args.flush_interval)
            ))
            .arg(format!("--twins={}", args.twins))
            .arg(format!("--protect={}", args.protect))
            .arg("--internal-report")
            .arg(&report)
            .env(SECRET_ENV, std::str::from_utf8(secret.expose())?)
            .stdin(Stdio::null())
            .stdout(if rank == 0 {
                Stdio::inherit()
            } else {
                Stdio::null()
            });
        if let Some(m) = args.marker {
            cmd.arg(format!("--marker={m}"));
        }
        if args.label {
            cmd.arg("--label");
        }
        if args.no_pin {
            cmd.arg("--no-pin");
        }
        cmd.arg(&args.guest);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start node {rank}"))?;
        nodes.push(NodeProcess {
            rank,
            child,
            exit: None,
            report,
        });
    }
    supervise(&mut nodes)?;
    let mut statuses = Vec::new();
    let mut stats = Vec::new();
    let mut with_error = Vec::new();
    let mut lost = Vec::new();
    for n in &nodes {
        match read_report(&n.report) {
            Some((status, json, text)) => {
                statuses.push(status);
                stats.push((text, json));
            }
            None => match n.exit.map(|e| e.code()) {
                // The node said why itself (above).
                Some(Some(code)) if code == i32::from(VSMP_FAILURE) => with_error.push(n.rank),
                _ => lost.push(format!(
                    "node {} {}",
                    n.rank,
                    n.exit.map_or("was lost".to_string(), describe_exit)
                )),
            },
        }
    }
    finish_stats(args, &stats)?;
    if !with_error.is_empty() || !lost.is_empty() {
        let mut why = lost;
        if !with_error.is_empty() {
            let list: Vec<String> = with_error.iter().map(|r| r.to_string()).collect();
            why.push(format!(
                "node {} stopped with an error (above)",
                list.join(", ")
            ));
        }
        eprintln!("vsmp: the machine failed: {}", why.join("; "));
        return Ok(ExitCode::from(VSMP_FAILURE));
    }
    if statuses.windows(2).any(|w| w[0] != w[1]) {
        eprintln!("vsmp: the nodes disagree on the machine's exit status: {statuses:?}");
        return Ok(ExitCode::from(VSMP_FAILURE));
    }
    Ok(ExitCode::from(statuses[0]))
}

/// Waits for every node; once one fails, the others get [`FAILURE_GRACE`] to notice and stop
/// by themselves (they do, within about a second, by the fabric's heartbeat), then are killed.
fn supervise(nodes: &mut [NodeProcess]) -> anyhow::Result<()> {
    let mut failed_at: Option<Instant> = None;
    loop {
        let mut running = 0;
        for n in nodes.iter_mut() {
            if n.exit.is_some() {
                continue;
            }
            match n.child.try_wait().context("waiting for a node")? {
                Some(status) => {
                    n.exit = Some(status);
                    if read_report(&n.report).is_none() && failed_at.is_none() {
                        failed_at = Some(Instant::now());
                    }
                }
                None => running += 1,
            }
        }
        if running == 0 {
            return Ok(());
        }
        if failed_at.is_some() {
            // A stopped node (SIGSTOP, ^Z) cannot stop by itself: once the machine failed, it
            // is only in the way.
            for n in nodes.iter_mut().filter(|n| n.exit.is_none()) {
                if process_state(n.child.id()) == Some('T') {
                    eprintln!("vsmp: node {} is stopped; killing it", n.rank);
                    let _ = n.child.kill();
                    n.exit = n.child.wait().ok();
                }
            }
        }
        if failed_at.is_some_and(|t| t.elapsed() > FAILURE_GRACE) {
            for n in nodes.iter_mut().filter(|n| n.exit.is_none()) {
                eprintln!(
                    "vsmp: node {} did not stop within {FAILURE_GRACE:?} of a failure; killing it",
                    n.rank
                );
                let _ = n.child.kill();
                n.exit = n.child.wait().ok();
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The state letter of process `pid` (`R`, `S`, `T` for stopped, ...).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!(
            "was killed by {}",
            nix::sys::signal::Signal::try_from(sig)
                .map_or(format!("signal {sig}"), |s| s.to_string())
        ),
        _ => "ended".to_string(),
    }
}

/// A node's report: its status, its statistics as JSON and as text.
fn read_report(path: &Path) -> Option<(u8, String, String)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.splitn(3, '\n');
    let status = lines.next()?.strip_prefix("status ")?.parse().ok()?;
    let json = lines.next()?.to_string();
    Some((status, json, lines.next().unwrap_or("").to_string()))
}

fn unique_dir() -> anyhow::Result<PathBuf> {
    let base = std::env::temp_dir();
    for attempt in 0..100u32 {
        let dir = base.join(format!("vsmp-run-{}-{attempt}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot create {}", dir.display()));
            }
        }
    }
    bail!("cannot create a scratch directory in {}", base.display())
}
