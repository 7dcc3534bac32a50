//! `vsmp`: a distributed virtual SMP machine monitor.
//!
//! One file per subcommand under `cmd/`; this file only parses the command line, sets up
//! logging and dispatches. Errors reach the user as one `vsmp: ...` line per cause.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

/// vsmp turns N Linux machines into one virtual x86-64 shared-memory multiprocessor: a
/// paravirtualised guest runs natively under a ptrace monitor on every node, with one vCPU per
/// node.
#[derive(Debug, Parser)]
#[command(name = "vsmp", version, propagate_version = true, max_term_width = 100)]
struct Cli {
    /// Log verbosity (also RUST_LOG): error, warn, info, debug, trace.
    #[arg(long, global = true, default_value = "warn", value_name = "LEVEL")]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Insert trap markers before sensitive instructions in GNU `as` (AT&T) assembly.
    Patch(cmd::patch::Args),
    /// Compile C and assembly into a vsmp guest (like mpicc: gcc -S, patch, assemble, link).
    Cc(cmd::cc::Args),
    /// Run a guest ELF under the vsmp monitor.
    Run(cmd::run::Args),
    /// Run x86 litmus tests natively, under vsmp, or through the x86-TSO reference model.
    Litmus(cmd::litmus::Args),
    /// Measure vsmp's hot paths beside the raw primitives they are built on.
    Bench(cmd::bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let mut failure = ExitCode::FAILURE;
    let result = match cli.command {
        Command::Patch(args) => cmd::patch::run(args),
        Command::Cc(args) => cmd::cc::run(args),
        Command::Run(args) => {
            failure = ExitCode::from(cmd::run::VSMP_FAILURE);
            cmd::run::run(args)
        }
        Command::Litmus(args) => cmd::litmus::run(args),
        Command::Bench(args) => cmd::bench::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("vsmp: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("vsmp:   caused by: {cause}");
            }
            failure
        }
    }
}

fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
