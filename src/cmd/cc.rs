//! `vsmp cc`: being built (see the open issue); until then it refuses to run.

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Arguments, accepted verbatim until this subcommand is built.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    rest: Vec<String>,
}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("'vsmp cc' is not built yet")
}
