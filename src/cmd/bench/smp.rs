//! The DSM's benchmarks, each beside the raw parts it is built on, measured in the same run:
//!
//! - `vsmp bench fence`: a fence after K dirty pages, on a vCPU whose node is not the
//!   sequencer's (so its ticket is a real round trip), against the sum of its parts: a trap
//!   round trip (a `cpuid` in the same guest), the fabric's `fetch_add` and write round trips
//!   (`vsmp bench fabric`'s figures, measured in this run between two processes), twin and diff
//!   of K pages and the protection change of K pages (measured in this process). And a
//!   spinlock handed between two nodes (half a ping-pong) against its parts: the releaser's
//!   publish and the acquirer's fence (each the fence above) and an ownership transfer (a
//!   request and an order, each a message, a ticket, the transfer's write, the owner's stop).
//! - `vsmp bench fault`: the write-fault cycle with userfaultfd write-protect and with
//!   `mprotect` injected through the stub, beside the raw ptrace stop/resume.
//! - `vsmp bench speedup`: the reduction and the stencil examples at 1 and 2 nodes (the same
//!   binary; runs of at least 10 s at one node, median of 5).
//!
//! Times come from the guest's TSC (not trapped; every node of this host shares it), converted
//! with a calibration against the monotonic clock made here.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use vsmp_coherence::fabric::Backend;
use vsmp_coherence::{PAGE_BYTES, diff};

use super::fabric::{self, report::Row};

const FENCE_GUEST: &str = include_str!("guests/fence.c");

/// The goal the issue sets for the fence and the handoff: at most this times their parts.
const GOAL: f64 = 1.3;

#[derive(Debug, clap::Args)]
pub struct FenceArgs {
    /// Nodes of the machine (the fence runs on vCPU 1, the handoff between vCPU 0 and 1).
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// The fabric between the nodes.
    #[arg(long, default_value = "shm")]
    fabric: Backend,
    /// Pages written before each fence.
    #[arg(long, value_name = "K", default_value_t = 1)]
    dirty_pages: usize,
    /// Fences timed (and handoffs sampled).
    #[arg(long, default_value_t = 2000)]
    samples: usize,
    /// Periodic flush passed to `vsmp run`.
    #[arg(long, value_name = "TIME", default_value = "2ms")]
    flush_interval: String,
}

#[derive(Debug, clap::Args)]
pub struct FaultArgs {
    /// Fault cycles timed per mechanism.
    #[arg(long, default_value_t = 5000)]
    iterations: usize,
}

#[derive(Debug, clap::Args)]
pub struct SpeedupArgs {
    /// Integration steps of the reduction (the default runs at least 10 s on one node here).
    #[arg(long, default_value_t = 12_000_000_000)]
    steps: u64,
    /// Jacobi iterations of the stencil (on a 1024 x 512 grid).
    #[arg(long, default_value_t = 3000)]
    stencil_iterations: u64,
    /// Runs of each configuration (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The fabric between the nodes.
    #[arg(long, default_value = "shm")]
    fabric: Backend,
}

/// A scratch directory, removed at the end.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch() -> anyhow::Result<Scratch> {
    let dir = std::env::temp_dir().join(format!("vsmp-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(Scratch(dir))
}

fn vsmp() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("cannot find the vsmp executable")
}

/// Builds `source` (a guest in C) with `vsmp cc -O2 defines`.
fn build(dir: &Path, name: &str, source: &Path, defines: &[String]) -> anyhow::Result<PathBuf> {
    let elf = dir.join(format!("{name}.elf"));
    let out = Command::new(vsmp()?)
        .args(["cc", "-O2"])
        .args(defines)
        .arg("-o")
        .arg(&elf)
        .arg(source)
        .output()
        .context("cannot run vsmp cc")?;
    if !out.status.success() {
        bail!(
            "vsmp cc {name} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(elf)
}

/// Runs `vsmp run ARGS ELF`; its standard output and how long it took.
fn run_guest(args: &[String], elf: &Path) -> anyhow::Result<(String, Duration)> {
    let t = Instant::now();
    let out = Command::new(vsmp()?)
        .arg("run")
        .args(args)
        .arg(elf)
        .output()
        .context("cannot run vsmp run")?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!(
            "vsmp run {} failed ({}):\n{}{}",
            elf.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), took))
}

/// TSC ticks per microsecond, against the monotonic clock.
fn tsc_per_us() -> f64 {
    // SAFETY: rdtsc has no preconditions on x86-64.
    let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), tsc());
    std::thread::sleep(Duration::from_millis(200));
    let (c1, t1) = (tsc(), Instant::now());
    (c1 - c0) as f64 / (t1 - t0).as_secs_f64() / 1e6
}

/// `NAME median p99` lines of the guest, in microseconds.
fn parse_figures(out: &str, ticks_per_us: f64) -> anyhow::Result<Vec<(String, f64, f64)>> {
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [name, m, p] => Ok((
                    name.to_string(),
                    m.parse::<f64>()? / ticks_per_us,
                    p.parse::<f64>()? / ticks_per_us,
                )),
                _ => bail!("unexpected guest output line {l:?}"),
            }
        })
        .collect()
}

fn us(h: &Histogram<u64>) -> (f64, f64) {
    (
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
    )
}

/// The fabric's median (and p99) of the latency row named `name`, in microseconds.
fn fabric_row(rows: &[Row], name: &str) -> anyhow::Result<(f64, f64)> {
    rows.iter()
        .find_map(|r| match r {
            Row::Latency {
                name: n, fabric, ..
            } if n == name => Some(us(fabric)),
            _ => None,
        })
        .with_context(|| format!("the fabric benchmark has no row {name:?}"))
}

/// Median time (us) of twin + diff of `k` pages with one changed byte each.
fn twin_and_diff(k: usize, iterations: usize) -> f64 {
    let pages: Vec<Vec<u8>> = (0..k).map(|i| vec![i as u8; PAGE_BYTES]).collect();
    let mut twins: Vec<Vec<u8>> = (0..k).map(|_| vec![0; PAGE_BYTES]).collect();
    let mut out = Vec::with_capacity(k * diff::MAX_DIFF_BYTES);
    let mut h = fabric::report::histogram();
    for it in 0..iterations {
        let t = Instant::now();
        for (twin, page) in twins.iter_mut().zip(&pages) {
            twin.copy_from_slice(page);
        }
        out.clear();
        for (j, (twin, page)) in twins.iter().zip(&pages).enumerate() {
            let mut changed = page.clone();
            changed[64] = changed[64].wrapping_add(1 + (it + j) as u8 % 7);
            diff::encode(twin, &changed, &mut out);
        }
        let _ = h.record((t.elapsed().as_nanos() as u64).max(1));
    }
    us(&h).0
}

/// A VM process (a flat guest) to measure page protection on.
struct ProtectRig {
    memory: vsmp_monitor::vm::memory::GuestMemory,
    tracee: vsmp_monitor::vm::trace::Tracee,
}

/// Where the fault benchmark's guest writes (a page of guest RAM).
const FAULT_PAGE: u64 = 0x20_0000;

impl ProtectRig {
    fn new() -> anyhow::Result<ProtectRig> {
        use vsmp_monitor::layout::IMAGE_BASE;
        use vsmp_monitor::marker::Marker;
        use vsmp_monitor::vm::elf::GuestImage;
        use vsmp_monitor::vm::memory::{GuestMemory, MemSize};
        let memory = GuestMemory::new(MemSize::new(8 << 20)?)?;
        // movb $1, FAULT_PAGE; ud2
        let mut code = vec![0xc6, 0x04, 0x25];
        code.extend_from_slice(&(FAULT_PAGE as u32).to_le_bytes());
        code.extend_from_slice(&[0x01, 0x0f, 0x0b]);
        GuestImage::flat(&code, Marker::Ud2).load_into(&memory)?;
        let tracee = vsmp_monitor::vm::process::spawn_stopped(
            &memory,
            IMAGE_BASE,
            vsmp_affinity::Placement::for_local_rank(0)?,
            0,
            1,
        )?;
        Ok(ProtectRig { memory, tracee })
    }
}

/// Median time (us) of write-protecting `k` contiguous pages of a VM process with uffd.
fn protect_pages(k: usize, iterations: usize) -> anyhow::Result<f64> {
    use vsmp_monitor::vm::protect::{Choice, Mechanism, Protector};
    let mut rig = ProtectRig::new()?;
    let mut p = Protector::attach(
        Choice::Only(Mechanism::Uffd),
        &mut rig.tracee,
        rig.memory.ram_start(),
        rig.memory.ram_end(),
    )?;
    let first = (FAULT_PAGE / PAGE_BYTES as u64) as u32;
    let mut h = fabric::report::histogram();
    for _ in 0..iterations {
        for i in 0..k as u32 {
            p.set(first + i, true);
        }
        p.apply(&mut rig.tracee)?;
        let t = Instant::now();
        for i in 0..k as u32 {
            p.set(first + i, false);
        }
        p.apply(&mut rig.tracee)?;
        let _ = h.record((t.elapsed().as_nanos() as u64).max(1));
    }
    Ok(us(&h).0)
}

pub fn fence(args: FenceArgs) -> anyhow::Result<ExitCode> {
    if args.nodes < 2 {
        bail!(
            "--nodes {}: a fence's ticket crosses nodes only with 2 or more",
            args.nodes
        );
    }
    if args.dirty_pages == 0 || args.dirty_pages > 256 || args.samples < 100 {
        bail!("--dirty-pages must be 1 to 256 and --samples at least 100");
    }
    let ticks = tsc_per_us();
    let dir = scratch()?;
    let src = dir.0.join("fence.c");
    std::fs::write(&src, FENCE_GUEST)?;
    let elf = build(
        &dir.0,
        "fence",
        &src,
        &[
            format!("-DPAGES={}", args.dirty_pages),
            format!("-DSAMPLES={}", args.samples),
            format!("-DHANDOFFS={}", args.samples.max(1000)),
        ],
    )?;
    let run_args = vec![
        format!("--nodes={}", args.nodes),
        format!("--fabric={}", args.fabric),
        format!("--flush-interval={}", args.flush_interval),
    ];
    let (out, _) = run_guest(&run_args, &elf)?;
    let figures = parse_figures(&out, ticks)?;
    let get = |name: &str| {
        figures
            .iter()
            .find(|f| f.0 == name)
            .map(|f| (f.1, f.2))
            .with_context(|| format!("the guest did not report {name}"))
    };
    let (fence, fence99) = get("fence")?;
    let (trap, trap99) = get("trap")?;
    let (fault, fault99) = get("fault")?;
    let (handoff, handoff99) = get("handoff")?;
    // The raw parts, in this run.
    let rows = fabric::measure(args.fabric, 5000, Duration::ZERO, false)?;
    let (fetch_add, _) = fabric_row(&rows, "fetch_add round trip")?;
    let (write, _) = fabric_row(&rows, "write 8 B from memory + wait")?;
    let (doorbell, _) = fabric_row(&rows, "doorbell round trip (blocking)")?;
    let twin_diff = twin_and_diff(args.dirty_pages, 5000);
    let protect = protect_pages(args.dirty_pages, 2000)?;
    let parts = trap + fetch_add + write + twin_diff + protect;
    println!(
        "vsmp bench fence: {} nodes, fabric {}, {} dirty page(s) per fence, {} samples, TSC {:.0} MHz",
        args.nodes, args.fabric, args.dirty_pages, args.samples, ticks
    );
    println!();
    println!(
        "{:<44} {:>10} {:>10}",
        "measured in the guest (vCPU 1)", "median_us", "p99_us"
    );
    println!(
        "{:<44} {fault:>10.2} {fault99:>10.2}",
        format!("write {} page(s) (faults)", args.dirty_pages)
    );
    println!("{:<44} {fence:>10.2} {fence99:>10.2}", "mfence");
    println!(
        "{:<44} {trap:>10.2} {trap99:>10.2}",
        "trap round trip (cpuid)"
    );
    println!(
        "{:<44} {handoff:>10.2} {handoff99:>10.2}",
        "spinlock handoff between nodes"
    );
    println!();
    println!(
        "{:<44} {:>10}",
        "raw parts, measured in this run", "median_us"
    );
    println!("{:<44} {trap:>10.2}", "trap round trip");
    println!(
        "{:<44} {fetch_add:>10.2}",
        format!("fetch_add round trip ({})", args.fabric)
    );
    println!(
        "{:<44} {write:>10.2}",
        format!("write round trip, 8 B ({})", args.fabric)
    );
    println!(
        "{:<44} {twin_diff:>10.2}",
        format!("twin + diff of {} page(s)", args.dirty_pages)
    );
    println!(
        "{:<44} {protect:>10.2}",
        format!("protect {} page(s) (userfaultfd)", args.dirty_pages)
    );
    println!("{:<44} {parts:>10.2}", "sum of the fence's parts");
    println!();
    let ratio = fence / parts;
    println!(
        "fence / its parts: {ratio:.2}x (goal {GOAL}x: {})",
        if ratio <= GOAL { "met" } else { "not met" }
    );
    // A handoff: the releaser publishes (a fence's worth), its node receives the request and
    // the order (two messages: a doorbell round trip), hands the page on (its stop, a ticket,
    // the write), and the acquirer's locked instruction fences.
    let transfer = doorbell + trap + fetch_add + write;
    let handoff_parts = fence + transfer + fence;
    println!(
        "handoff / its parts (publish {fence:.2} + transfer {transfer:.2} + fence {fence:.2} = \
         {handoff_parts:.2} us): {:.2}x (goal {GOAL}x: {})",
        handoff / handoff_parts,
        if handoff / handoff_parts <= GOAL {
            "met"
        } else {
            "not met"
        }
    );
    Ok(ExitCode::SUCCESS)
}

pub fn fault(args: FaultArgs) -> anyhow::Result<ExitCode> {
    use vsmp_monitor::layout::IMAGE_BASE;
    use vsmp_monitor::vm::protect::{Choice, Mechanism, Protector};
    use vsmp_monitor::vm::trace::Event;
    if args.iterations < 100 {
        bail!("--iterations must be at least 100");
    }
    let page = (FAULT_PAGE / PAGE_BYTES as u64) as u32;
    // One cycle: resume at the write; with protection, the write faults, the page is made
    // writable, the guest resumes; the ud2 stops it; the page is protected again.
    let cycle = |rig: &mut ProtectRig, p: Option<&mut Protector>| -> anyhow::Result<(u64, u64)> {
        let mut regs = rig.tracee.regs()?;
        regs.rip = IMAGE_BASE;
        rig.tracee.set_regs(regs)?;
        let t0 = Instant::now();
        rig.tracee.resume()?;
        let mut p = p;
        loop {
            match rig.tracee.wait_event()? {
                Event::Signal(nix::sys::signal::Signal::SIGILL) => break,
                Event::Signal(_) => {
                    let p = p.as_deref_mut().context("a fault without protection")?;
                    p.set(page, true);
                    p.apply(&mut rig.tracee)?;
                    rig.tracee.resume()?;
                }
                other => bail!("unexpected {other:?}"),
            }
        }
        let t1 = Instant::now();
        if let Some(p) = p {
            p.set(page, false);
            p.apply(&mut rig.tracee)?;
        }
        let t2 = Instant::now();
        Ok(((t1 - t0).as_nanos() as u64, (t2 - t1).as_nanos() as u64))
    };
    let mut raw = fabric::report::histogram();
    let mut rows = Vec::new();
    for mech in [Mechanism::Uffd, Mechanism::Mprotect] {
        let mut rig = ProtectRig::new()?;
        let mut p = Protector::attach(
            Choice::Only(mech),
            &mut rig.tracee,
            rig.memory.ram_start(),
            rig.memory.ram_end(),
        )?;
        let mut fault = fabric::report::histogram();
        let mut protect = fabric::report::histogram();
        for i in 0..args.iterations + args.iterations / 10 {
            // Raw and protected cycles alternate: both see the same host.
            p.set(page, true);
            p.apply(&mut rig.tracee)?;
            let (r, _) = cycle(&mut rig, None)?;
            p.set(page, false);
            p.apply(&mut rig.tracee)?;
            let (f, pr) = cycle(&mut rig, Some(&mut p))?;
            if i >= args.iterations / 10 {
                let _ = raw.record(r.max(1));
                let _ = fault.record(f.max(1));
                let _ = protect.record(pr.max(1));
            }
        }
        rows.push((mech, fault, protect));
    }
    let (raw50, raw99) = us(&raw);
    println!(
        "vsmp bench fault: the guest's write to a protected page, {} cycles per mechanism",
        args.iterations
    );
    println!();
    println!(
        "{:<52} {:>10} {:>10} {:>8}",
        "", "median_us", "p99_us", "x raw"
    );
    println!(
        "{:<52} {raw50:>10.2} {raw99:>10.2} {:>8}",
        "raw: resume, stop at ud2 (no fault)", "1.00"
    );
    for (mech, fault, protect) in &rows {
        let (f50, f99) = us(fault);
        let (p50, p99) = us(protect);
        println!(
            "{:<52} {f50:>10.2} {f99:>10.2} {:>8.2}",
            format!("{mech}: resume, fault, unprotect, resume, stop"),
            f50 / raw50
        );
        println!(
            "{:<52} {p50:>10.2} {p99:>10.2}",
            format!("{mech}: protect the page again")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn speedup(args: SpeedupArgs) -> anyhow::Result<ExitCode> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let dir = scratch()?;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/examples");
    let reduction = build(
        &dir.0,
        "reduction",
        &examples.join("reduction.c"),
        &[format!("-DSTEPS={}L", args.steps)],
    )?;
    let stencil = build(
        &dir.0,
        "stencil",
        &examples.join("stencil.c"),
        &[
            format!("-DITERS={}", args.stencil_iterations),
            "-DROWS=1024".into(),
        ],
    )?;
    println!(
        "vsmp bench speedup: the same binary at 1 and 2 nodes ({}), median of {} runs (wall time \
         of vsmp run)",
        args.fabric, args.runs
    );
    println!();
    println!(
        "{:<12} {:>12} {:>12} {:>9}",
        "example", "1 node s", "2 nodes s", "speedup"
    );
    for (name, elf) in [("reduction", &reduction), ("stencil", &stencil)] {
        let mut one = Vec::new();
        let mut two = Vec::new();
        for _ in 0..args.runs {
            one.push(run_guest(&["--nodes=1".into()], elf)?.1.as_secs_f64());
            two.push(
                run_guest(
                    &["--nodes=2".into(), format!("--fabric={}", args.fabric)],
                    elf,
                )?
                .1
                .as_secs_f64(),
            );
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (a, b) = (median(&mut one), median(&mut two));
        println!("{name:<12} {a:>12.2} {b:>12.2} {:>8.2}x", a / b);
    }
    Ok(ExitCode::SUCCESS)
}
