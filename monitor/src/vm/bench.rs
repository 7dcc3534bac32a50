//! The trap benchmark (`vsmp bench trap`, `cargo bench --bench trap`): the round trip of one
//! trapped instruction through the full monitor, beside the raw ptrace round trip of the same
//! trap measured in the same run, and the cost of decode + emulate alone.
//!
//! The guest is a flat image looping N times over `xor %eax,%eax; MARKER; cpuid` (for the #GP
//! path: `cli` executed natively, with no marker), then exiting through the exit port.
//! - **raw**: the same VM process set-up; on each stop the tracer does the minimum: waitpid,
//!   PTRACE_GETREGS, PTRACE_SETREGS with RIP past the trapped instruction (no decode, no
//!   emulation: the `cpuid` is skipped), PTRACE_SYSEMU.
//! - **vsmp**: the real run loop ([`super::run::run_image`]): classify, read registers, decode
//!   and emulate `cpuid` against a real [`Vcpu`], write registers, resume.
//!
//! Both figures are the interval between consecutive stops as the monitor observes them
//! (guest code + kernel + monitor work), so their ratio is the monitor's overhead over the bare
//! primitive. Raw and vsmp alternate in `ROUNDS` (10) rounds (a fresh VM process each) so that
//! load from elsewhere falls on both alike. Monitor thread and VM process are placed as the [`Placement`] says (by default
//! both on one core).

use std::io::{self, Write};
use std::time::Instant;

use hdrhistogram::Histogram;
use nix::sys::signal::Signal;
use vsmp_affinity::Placement;

use super::elf::GuestImage;
use super::memory::{GuestMemory, MemSize, MemoryError};
use super::process::{self, ProcessError};
use super::run::{RunConfig, run_image};
use super::stats::TrapStats;
use super::trace::{StopEvent, TraceError};
use crate::emulate::{self, Trap};
use crate::layout;
use crate::marker::Marker;
use crate::platform::mock::MockPlatform;
use crate::vcpu::{Vcpu, VcpuConfig};

/// Calls of decode + emulate timed together (one clock read is ~20-30 ns: amortise it).
const EMULATE_BATCH: u32 = 100;

/// Most iterations accepted (keeps the guest's loop counter in 31 bits and runs bounded).
pub const MAX_ITERATIONS: u32 = 10_000_000;

/// Which trap is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapPath {
    /// A marker before `cpuid`.
    Marker(Marker),
    /// `cli` executed natively, faulting with #GP.
    GeneralProtection,
}

impl TrapPath {
    /// Every path, in table order.
    pub const ALL: [TrapPath; 3] = [
        TrapPath::Marker(Marker::Ud2),
        TrapPath::Marker(Marker::Int3),
        TrapPath::GeneralProtection,
    ];

    fn label(self) -> &'static str {
        match self {
            TrapPath::Marker(Marker::Ud2) => "ud2 + cpuid",
            TrapPath::Marker(Marker::Int3) => "int3 + cpuid",
            TrapPath::GeneralProtection => "#GP (native cli)",
        }
    }

    /// The bytes between `xor %eax,%eax` and the loop's `dec`.
    fn trapped_bytes(self) -> &'static [u8] {
        match self {
            TrapPath::Marker(Marker::Ud2) => &[0x0f, 0x0b, 0x0f, 0xa2],
            TrapPath::Marker(Marker::Int3) => &[0xcc, 0x0f, 0xa2],
            TrapPath::GeneralProtection => &[0xfa],
        }
    }

    /// The signal each trap stops with.
    fn signal(self) -> Signal {
        match self {
            TrapPath::Marker(Marker::Ud2) => Signal::SIGILL,
            TrapPath::Marker(Marker::Int3) => Signal::SIGTRAP,
            TrapPath::GeneralProtection => Signal::SIGSEGV,
        }
    }

    /// How far the raw tracer moves RIP at a stop to pass the trapped instruction.
    fn raw_skip(self) -> u64 {
        match self {
            TrapPath::Marker(Marker::Ud2) => 4, // RIP at ud2: skip ud2 + cpuid
            TrapPath::Marker(Marker::Int3) => 2, // RIP after int3: skip cpuid
            TrapPath::GeneralProtection => 1,   // RIP at cli
        }
    }

    fn marker(self) -> Marker {
        match self {
            TrapPath::Marker(m) => m,
            TrapPath::GeneralProtection => Marker::Int3,
        }
    }

    /// The guest: `mov $n,%r12d; 1: xor %eax,%eax; TRAPPED; dec %r12d; jnz 1b`, then
    /// `xor %eax,%eax; MARKER; out %al,$0xf4; hlt` (the #GP guest's `out` faults natively).
    fn guest(self, iterations: u32) -> Vec<u8> {
        let mut code = vec![0x41, 0xbc];
        code.extend_from_slice(&iterations.to_le_bytes());
        let top = code.len();
        code.extend_from_slice(&[0x31, 0xc0]);
        code.extend_from_slice(self.trapped_bytes());
        code.extend_from_slice(&[0x41, 0xff, 0xcc]);
        let rel = top as i64 - (code.len() as i64 + 2);
        code.extend_from_slice(&[0x75, rel as i8 as u8]);
        code.extend_from_slice(&[0x31, 0xc0]);
        if let TrapPath::Marker(m) = self {
            code.extend_from_slice(m.bytes());
        }
        code.extend_from_slice(&[0xe6, 0xf4, 0xf4]);
        code
    }
}

/// Why the benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("iterations must be in 1..={MAX_ITERATIONS}, not {0}")]
    Iterations(u32),
    #[error("cannot create guest memory")]
    Memory(#[from] MemoryError),
    #[error("cannot start the VM process")]
    Spawn(#[from] ProcessError),
    #[error("tracing the VM process failed")]
    Trace(#[from] TraceError),
    #[error("cannot pin the monitor thread")]
    Pin(#[from] vsmp_affinity::AffinityError),
    #[error("the raw {path} loop stopped unexpectedly: {what}")]
    UnexpectedStop { path: &'static str, what: String },
    #[error("the {path} guest under the monitor failed")]
    Run {
        path: &'static str,
        #[source]
        source: crate::node::NodeError,
    },
    #[error("the {path} guest under the monitor exited with status {status}, not 0")]
    GuestStatus { path: &'static str, status: u8 },
    #[error("decode + emulate of the {path} instruction failed")]
    Emulate {
        path: &'static str,
        #[source]
        source: emulate::EmulateError,
    },
}

/// How to run the benchmark.
#[derive(Debug, Clone, Copy)]
pub struct TrapBenchConfig {
    pub iterations: u32,
    pub placement: Placement,
}

/// Median and 99th percentile of a histogram, in its unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub p99: f64,
    pub count: u64,
}

impl Summary {
    fn of(h: &Histogram<u64>, scale: f64) -> Summary {
        Summary {
            median: h.value_at_quantile(0.5) as f64 / scale,
            p99: h.value_at_quantile(0.99) as f64 / scale,
            count: h.len(),
        }
    }
}

/// One row: a trap path measured raw and through the monitor.
#[derive(Debug, Clone, Copy)]
pub struct TrapBenchRow {
    pub path: TrapPath,
    /// Raw ptrace round trip (us).
    pub raw_us: Summary,
    /// Round trip through the monitor (us).
    pub vsmp_us: Summary,
    /// Decode + emulate alone against the mock platform (ns).
    pub emulate_ns: Summary,
}

impl TrapBenchRow {
    /// vsmp / raw, medians.
    pub fn ratio_median(&self) -> f64 {
        self.vsmp_us.median / self.raw_us.median
    }

    /// vsmp / raw, 99th percentiles.
    pub fn ratio_p99(&self) -> f64 {
        self.vsmp_us.p99 / self.raw_us.p99
    }
}

/// Runs every path. Pins the calling thread if the placement says so.
pub fn run_trap_bench(config: &TrapBenchConfig) -> Result<Vec<TrapBenchRow>, BenchError> {
    if config.iterations == 0 || config.iterations > MAX_ITERATIONS {
        return Err(BenchError::Iterations(config.iterations));
    }
    if let Placement::Together(core) = config.placement {
        vsmp_affinity::pin_current_thread(core)?;
    }
    let per_round = config.iterations.div_ceil(ROUNDS);
    TrapPath::ALL
        .iter()
        .map(|&path| {
            let mut raw = round_trip_histogram();
            let mut vsmp = round_trip_histogram();
            for _ in 0..ROUNDS {
                raw.add(measure_raw(path, per_round, config.placement)?)
                    .expect("same bounds");
                vsmp.add(measure_vsmp(path, per_round, config.placement)?)
                    .expect("same bounds");
            }
            Ok(TrapBenchRow {
                path,
                raw_us: Summary::of(&raw, 1e3),
                vsmp_us: Summary::of(&vsmp, 1e3),
                emulate_ns: measure_emulate(path, config.iterations)?,
            })
        })
        .collect()
}

/// Raw and vsmp measurements alternate in this many rounds, so that load from elsewhere on
/// a shared machine falls on both alike rather than on whichever ran during it.
const ROUNDS: u32 = 10;

fn round_trip_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000_000, 3).expect("valid bounds")
}

fn measure_raw(
    path: TrapPath,
    iterations: u32,
    placement: Placement,
) -> Result<Histogram<u64>, BenchError> {
    let unexpected = |what: String| BenchError::UnexpectedStop {
        path: path.label(),
        what,
    };
    let stops = u64::from(iterations);
    let memory = GuestMemory::new(MemSize::new(layout::MIN_MEM_BYTES).expect("in bounds"))?;
    let image = GuestImage::flat(&path.guest(stops as u32), path.marker());
    image
        .load_into(&memory)
        .map_err(|e| unexpected(e.to_string()))?;
    let mut tracee = process::spawn(&memory, image.entry, placement)?;
    let mut stats = TrapStats::new();
    for i in 0..stops {
        let event = tracee.wait()?;
        let observed = Instant::now();
        stats.stop_observed(observed);
        let stopped = match event {
            StopEvent::Signal(stopped, signal) if signal == path.signal() => stopped,
            other => return Err(unexpected(format!("{other:?} at stop {i}"))),
        };
        let mut regs = stopped.regs()?;
        regs.rip += path.raw_skip();
        stopped.set_regs(regs)?;
        stopped.resume_sysemu()?;
    }
    tracee.kill_and_reap();
    Ok(stats.stop_to_stop_ns().clone())
}

fn measure_vsmp(
    path: TrapPath,
    iterations: u32,
    placement: Placement,
) -> Result<Histogram<u64>, BenchError> {
    let image = GuestImage::flat(&path.guest(iterations), path.marker());
    let run_config = RunConfig {
        mem: MemSize::new(layout::MIN_MEM_BYTES).expect("in bounds"),
        marker: path.marker(),
        placement,
    };
    let mut stats = TrapStats::new();
    let status = run_image(&image, &run_config, Box::new(io::sink()), Some(&mut stats)).map_err(
        |source| BenchError::Run {
            path: path.label(),
            source,
        },
    )?;
    if status != 0 {
        return Err(BenchError::GuestStatus {
            path: path.label(),
            status,
        });
    }
    Ok(stats.stop_to_stop_ns().clone())
}

fn measure_emulate(path: TrapPath, iterations: u32) -> Result<Summary, BenchError> {
    let base = layout::IMAGE_BASE;
    let (code, trap): (&[u8], Trap) = match path {
        TrapPath::Marker(_) => (&[0x0f, 0xa2], Trap::Marker { insn: base }),
        TrapPath::GeneralProtection => (&[0xfa], Trap::Fault { insn: base }),
    };
    let mut platform = MockPlatform::with_code(base, 64, code);
    let mut vcpu = Vcpu::new(VcpuConfig { id: 0, count: 1 }, Box::new(io::sink()));
    let mut h = Histogram::<u64>::new_with_bounds(1, 1_000_000_000, 3).expect("valid bounds");
    let batches = (iterations / EMULATE_BATCH).max(10);
    for _ in 0..batches {
        let start = Instant::now();
        for _ in 0..EMULATE_BATCH {
            platform.regs.rip = base;
            platform.regs.rax = 0;
            emulate::handle_trap(&mut vcpu, &mut platform, trap).map_err(|source| {
                BenchError::Emulate {
                    path: path.label(),
                    source,
                }
            })?;
        }
        let ns = start.elapsed().as_nanos() as u64 / u64::from(EMULATE_BATCH);
        h.saturating_record(ns.max(1));
    }
    Ok(Summary::of(&h, 1.0))
}

/// Writes the results as a table.
pub fn write_table(
    rows: &[TrapBenchRow],
    config: &TrapBenchConfig,
    out: &mut dyn Write,
) -> io::Result<()> {
    let placement = match config.placement {
        Placement::Together(core) => format!("monitor and VM process together on {core}"),
        Placement::Unpinned => "unpinned".to_string(),
    };
    writeln!(
        out,
        "trap round trip, {} iterations per path, {placement}",
        config.iterations
    )?;
    writeln!(
        out,
        "{:<18} {:>11} {:>11} {:>12} {:>12} {:>10} {:>10} {:>14} {:>14}",
        "path",
        "raw_med_us",
        "raw_p99_us",
        "vsmp_med_us",
        "vsmp_p99_us",
        "ratio_med",
        "ratio_p99",
        "emulate_med_ns",
        "emulate_p99_ns"
    )?;
    for r in rows {
        writeln!(
            out,
            "{:<18} {:>11.2} {:>11.2} {:>12.2} {:>12.2} {:>10.2} {:>10.2} {:>14.0} {:>14.0}",
            r.path.label(),
            r.raw_us.median,
            r.raw_us.p99,
            r.vsmp_us.median,
            r.vsmp_us.p99,
            r.ratio_median(),
            r.ratio_p99(),
            r.emulate_ns.median,
            r.emulate_ns.p99
        )?;
    }
    writeln!(
        out,
        "raw = waitpid + GETREGS + SETREGS(rip past the instruction) + SYSEMU, no emulation; \
         vsmp = the full monitor trap path; goal: ratio <= 1.2"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_benchmark_guests_loop_back_to_their_first_instruction() {
        for path in TrapPath::ALL {
            let code = path.guest(5);
            let jnz = code.iter().rposition(|&b| b == 0x75).unwrap();
            let target = (jnz as i64 + 2) + i64::from(code[jnz + 1] as i8);
            assert_eq!(target, 6, "{path:?}");
            assert_eq!(&code[6..8], &[0x31, 0xc0]);
        }
    }

    #[test]
    fn a_short_benchmark_runs_every_path_end_to_end() {
        let config = TrapBenchConfig {
            iterations: 200,
            placement: Placement::Unpinned,
        };
        let rows = run_trap_bench(&config).unwrap();
        assert_eq!(rows.len(), 3);
        for r in &rows {
            assert!(r.raw_us.count >= 190 && r.vsmp_us.count >= 190, "{r:?}");
            assert!(r.emulate_ns.count >= 10);
        }
        let mut out = Vec::new();
        write_table(&rows, &config, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("int3 + cpuid") && text.contains("ratio_med"),
            "{text}"
        );
    }
}
