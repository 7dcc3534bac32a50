//! `vsmp run`: run a guest ELF on one node under the ptrace monitor.
//!
//! Exit status: the guest's own status when it writes to the exit port; 1 when the run ends
//! any other way (a monitor-side error, a guest crash, a refused system call, an instruction
//! the monitor cannot emulate, a vCPU halted forever), with one `vsmp: ...` line saying why.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use vsmp_affinity::{CoreId, Placement};
use vsmp_monitor::marker::{MARKER_SECTION, Marker};
use vsmp_monitor::vm::elf::{GuestImage, LoadError};
use vsmp_monitor::vm::memory::MemSize;
use vsmp_monitor::vm::run::{MarkerSource, RunConfig, choose_marker, run_image};
use vsmp_monitor::vm::stats::TrapStats;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Guest RAM size: bytes, or with a K, M or G suffix (binary units).
    #[arg(long, value_name = "SIZE", default_value_t = MemSize::default())]
    mem: MemSize,
    /// Trap marker the guest was built with (ud2 or int3). Default: the guest's own
    /// `.vsmp.marker` section, else ud2. Refused if it disagrees with that section.
    #[arg(long, value_name = "MARKER")]
    marker: Option<Marker>,
    /// At exit, print traps by kind with count and mean/median/p99 time in the monitor.
    #[arg(long)]
    stats: bool,
    /// Do not pin the monitor thread and the VM process to one core.
    #[arg(long, conflicts_with = "core")]
    no_pin: bool,
    /// Pin the monitor thread and the VM process to this core (default: the first core this
    /// process may use).
    #[arg(long, value_name = "N")]
    core: Option<usize>,
    /// The guest: a static x86-64 ELF executable linked at 1 MiB (see `vsmp cc`).
    guest: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
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
    let placement = match (args.no_pin, args.core) {
        (true, _) => Placement::Unpinned,
        (false, Some(core)) => Placement::Together(CoreId(core)),
        (false, None) => Placement::for_local_rank(0)?,
    };
    let config = RunConfig {
        mem: args.mem,
        marker,
        placement,
    };
    let mut stats = args.stats.then(TrapStats::new);
    // The monitor runs on its own named thread: it is the ptrace tracer and the thread that
    // gets pinned, and it lives exactly as long as the VM process.
    let result = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("monitor-0".into())
            .spawn_scoped(scope, || {
                run_image(&image, &config, Box::new(std::io::stdout()), stats.as_mut())
            })
            .context("cannot start the monitor thread")?
            .join()
            .map_err(|_| anyhow::anyhow!("the monitor thread panicked"))
    })?;
    std::io::stdout()
        .flush()
        .context("cannot flush standard output")?;
    if let Some(stats) = &stats {
        stats
            .write_table(&mut std::io::stderr().lock())
            .context("cannot print the statistics")?;
    }
    Ok(ExitCode::from(result?))
}
