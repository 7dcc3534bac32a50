//! `cargo bench --bench trap`: the trap round trip through the monitor beside the raw ptrace
//! round trip, per marker and for the #GP path (the same code as `vsmp bench trap`).
//! `VSMP_BENCH_ITERATIONS` overrides the iteration count (default 20000).

use vsmp_affinity::Placement;
use vsmp_monitor::vm::bench::{TrapBenchConfig, run_trap_bench, write_table};

fn main() {
    // `cargo bench` passes harness flags such as `--bench`; this harness takes none.
    let iterations = std::env::var("VSMP_BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let placement = Placement::for_local_rank(0).expect("cannot choose a core");
    let config = TrapBenchConfig {
        iterations,
        placement,
    };
    let rows = run_trap_bench(&config).expect("trap benchmark failed");
    write_table(&rows, &config, &mut std::io::stdout().lock()).expect("cannot write stdout");
}
