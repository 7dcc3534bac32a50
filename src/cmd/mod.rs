//! One module per `vsmp` subcommand. Each has an `Args` (clap) and a
//! `run(Args) -> anyhow::Result<ExitCode>`.

pub mod bench;
pub mod cc;
pub mod litmus;
pub mod patch;
pub mod run;
