//! `vsmp bench`: benchmarks of vsmp's hot paths, each reported beside the raw primitive it is
//! built on, measured in the same run, as a ratio. One module per benchmark family.

use std::process::ExitCode;

mod fabric;
mod smp;
mod trap;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// Trap round trip per marker under the monitor, beside the raw ptrace stop/resume.
    Trap(trap::Args),
    /// Fabric write, doorbell, fetch_add and bandwidth, beside a raw ping-pong.
    Fabric(fabric::Args),
    /// A DSM fence and a cross-node spinlock handoff, beside the sum of their raw parts.
    Fence(smp::FenceArgs),
    /// The write-fault cycle with userfaultfd and with mprotect, beside a raw ptrace stop.
    Fault(smp::FaultArgs),
    /// The reduction and stencil examples at 1 and 2 nodes.
    Speedup(smp::SpeedupArgs),
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.what {
        What::Trap(a) => trap::run(a),
        What::Fabric(a) => fabric::run(a),
        What::Fence(a) => smp::fence(a),
        What::Fault(a) => smp::fault(a),
        What::Speedup(a) => smp::speedup(a),
    }
}
