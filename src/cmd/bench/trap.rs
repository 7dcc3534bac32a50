//! `vsmp bench trap`: the trap round trip per marker (and the #GP path) through the monitor,
//! beside the raw ptrace round trip of the same trap measured in the same run, as a ratio;
//! plus decode + emulate alone. The measurement is `vsmp_monitor::vm::bench`, shared with
//! `cargo bench --bench trap`.

use std::process::ExitCode;

use vsmp_affinity::{CoreId, Placement};
use vsmp_monitor::vm::bench::{TrapBenchConfig, run_trap_bench, write_table};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Trapped instructions per path and measurement.
    #[arg(long, default_value_t = 20_000)]
    iterations: u32,
    /// Leave the monitor thread and the VM process unpinned.
    #[arg(long, conflicts_with = "core")]
    no_pin: bool,
    /// Pin the monitor thread and the VM process to this core (default: the first usable).
    #[arg(long, value_name = "N")]
    core: Option<usize>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let placement = match (args.no_pin, args.core) {
        (true, _) => Placement::Unpinned,
        (false, Some(core)) => Placement::Together(CoreId(core)),
        (false, None) => Placement::for_local_rank(0)?,
    };
    let config = TrapBenchConfig {
        iterations: args.iterations,
        placement,
    };
    let rows = run_trap_bench(&config)?;
    write_table(&rows, &config, &mut std::io::stdout().lock())?;
    Ok(ExitCode::SUCCESS)
}
