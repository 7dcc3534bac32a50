//! `vsmp patch`: insert trap markers before sensitive instructions in GNU `as` (AT&T) assembly.
//!
//! A thin shell over `vsmp_monitor::patch`: read the input (a file or standard input), patch
//! it, write the result (a file, the input itself with `--in-place`, or standard output) and
//! report what was patched on standard error.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use vsmp_monitor::marker::Marker;
use vsmp_monitor::patch;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Trap marker to insert: ud2 (the seed's, the default) or int3 (cheaper under KVM).
    #[arg(long, default_value = "ud2", value_name = "MARKER")]
    marker: Marker,

    /// Write the patched assembly here (default: standard output).
    #[arg(short, long, value_name = "OUT", conflicts_with = "in_place")]
    output: Option<PathBuf>,

    /// Rewrite INPUT in place.
    #[arg(short, long, requires = "input")]
    in_place: bool,

    /// Do not print the report of what was patched.
    #[arg(short, long)]
    quiet: bool,

    /// Assembly to patch ("-" or absent: standard input).
    #[arg(value_name = "INPUT")]
    input: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let stdin_input = args.input.as_ref().is_none_or(|p| p.as_os_str() == "-");
    let (source, name) = if stdin_input {
        anyhow::ensure!(
            !args.in_place,
            "--in-place needs an INPUT file, not standard input"
        );
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read standard input")?;
        (s, "<stdin>".to_string())
    } else {
        let path = args.input.clone().unwrap_or_default();
        let s = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        (s, path.display().to_string())
    };

    let patched =
        patch::patch(&source, args.marker).with_context(|| format!("cannot patch {name}"))?;

    let target = if args.in_place {
        args.input.clone()
    } else {
        args.output.clone()
    };
    match target {
        Some(path) => std::fs::write(&path, &patched.text)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(patched.text.as_bytes())
                .context("cannot write standard output")?;
            out.flush().context("cannot write standard output")?;
        }
    }
    if !args.quiet {
        eprintln!(
            "vsmp patch: {name} ({} marker): {}",
            args.marker, patched.report
        );
    }
    Ok(ExitCode::SUCCESS)
}
