//! The native runner: compile a generated program with gcc, run it on the host, read back the
//! outcome counts, and judge every observed final state against the model.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cgen::{Target, generate};
use crate::cond::Lval;
use crate::error::RunError;
use crate::herd::state_line;
use crate::model::StateSet;
use crate::test::LitmusTest;

/// Iterations per test when the user gives none: SB's relaxed outcome shows in most iterations
/// on a 2-core host, and the whole suite takes a few minutes.
pub const DEFAULT_ITERATIONS: u64 = 50_000;

/// Default iterations for a test with more threads than the host has cores: every iteration
/// then costs futex sleeps and context switches, and since its threads cannot all run at once
/// such a test rarely shows a relaxed outcome however long it runs.
pub const OVERSUBSCRIBED_ITERATIONS: u64 = 10_000;

/// The default iteration count for a test with `threads` threads on a host with `cores` cores.
pub fn default_iterations(threads: usize, cores: usize) -> u64 {
    if threads > cores {
        OVERSUBSCRIBED_ITERATIONS
    } else {
        DEFAULT_ITERATIONS
    }
}

/// Writes the generated native program for `test` into `dir` and compiles it with
/// `gcc -O2 -pthread`; returns the executable.
pub fn build(
    test: &LitmusTest,
    stem: &str,
    dir: &Path,
    iterations: u64,
) -> Result<PathBuf, RunError> {
    let source = generate(test, Target::Native, iterations)?;
    let c_path = dir.join(format!("{stem}.c"));
    std::fs::write(&c_path, source).map_err(|source| RunError::Write {
        path: c_path.clone(),
        source,
    })?;
    let exe = dir.join(stem);
    let out = Command::new("gcc")
        .args(["-O2", "-pthread", "-std=gnu11", "-o"])
        .arg(&exe)
        .arg(&c_path)
        .output()
        .map_err(|source| RunError::Spawn {
            program: "gcc".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(RunError::Compile {
            test: test.name.clone(),
            path: c_path,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(exe)
}

/// Counts of each observed final state, over [`crate::model::Scope::Full`] keys.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub counts: Vec<(Vec<u64>, u64)>,
    pub cores: usize,
}

/// Runs a compiled program and parses its `COUNT v1 v2 ...` lines.
pub fn execute(test: &LitmusTest, exe: &Path, nkeys: usize) -> Result<Observed, RunError> {
    let out = Command::new(exe)
        .output()
        .map_err(|source| RunError::Spawn {
            program: exe.display().to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(RunError::Execute {
            test: test.name.clone(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    parse_counts(test, &String::from_utf8_lossy(&out.stdout), nkeys)
}

/// Parses a generated program's output (also used for guest output).
pub fn parse_counts(test: &LitmusTest, text: &str, nkeys: usize) -> Result<Observed, RunError> {
    let mut obs = Observed::default();
    let bad = |line: &str| RunError::Output {
        test: test.name.clone(),
        line: line.to_string(),
    };
    for line in text.lines() {
        if let Some(c) = line.strip_prefix("CORES ") {
            obs.cores = c.trim().parse().map_err(|_| bad(line))?;
            continue;
        }
        let nums = line
            .split_whitespace()
            .map(str::parse::<u64>)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad(line))?;
        if nums.len() != nkeys.max(1) + 1 {
            return Err(bad(line));
        }
        obs.counts.push((nums[1..=nkeys].to_vec(), nums[0]));
    }
    Ok(obs)
}

/// The judgement of one native run.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// Observed states outside the model's allowed set, with their counts.
    pub forbidden: Vec<(Vec<u64>, u64)>,
    /// Iterations whose final state satisfies the condition's proposition.
    pub condition_hits: u64,
    /// Iterations whose final state sequential consistency forbids (a relaxed outcome).
    pub relaxed_hits: u64,
    pub total: u64,
    /// The printed report.
    pub text: String,
}

/// Judges observed outcomes against the allowed TSO states (and SC ones, to spot relaxed
/// outcomes), both computed over the same keys, and formats the report.
pub fn judge(test: &LitmusTest, allowed: &StateSet, sc: &StateSet, obs: &Observed) -> Verdict {
    let allowed_set: HashSet<&Vec<u64>> = allowed.states.iter().collect();
    let sc_set: HashSet<&Vec<u64>> = sc.states.iter().collect();
    let layout = crate::model::Layout::new(test);
    let mut counts = obs.counts.clone();
    counts.sort_by(|a, b| a.0.cmp(&b.0));
    let holds = |state: &[u64]| {
        test.condition.prop.eval(&|l: Lval, v| {
            let ty = crate::model::value_type(test, l);
            let i = allowed.keys.iter().position(|k| *k == l);
            let actual = i.map(|i| state[i]).unwrap_or(0);
            let want = match v {
                crate::test::InitValue::Int(n) => n,
                crate::test::InitValue::Addr(id) => layout.addr(id),
            };
            actual & ty.width.mask() == want & ty.width.mask()
        })
    };
    let mut text = String::new();
    let mut forbidden = Vec::new();
    let (mut condition_hits, mut relaxed_hits, mut total) = (0, 0, 0);
    let width = counts
        .iter()
        .map(|(_, n)| n.to_string().len())
        .max()
        .unwrap_or(1);
    for (state, n) in &counts {
        total += n;
        let ok = allowed_set.contains(state);
        let relaxed = !sc_set.contains(state);
        let cond = holds(state);
        if cond {
            condition_hits += n;
        }
        if relaxed {
            relaxed_hits += n;
        }
        let mut marks = Vec::new();
        if cond {
            marks.push("condition");
        }
        if relaxed && ok {
            marks.push("relaxed");
        }
        if !ok {
            marks.push("FORBIDDEN");
            forbidden.push((state.clone(), *n));
        }
        let mark = if marks.is_empty() {
            String::new()
        } else {
            format!("  <- {}", marks.join(", "))
        };
        let _ = writeln!(
            text,
            "  {n:>width$}  {}{mark}",
            state_line(test, &allowed.keys, state)
        );
    }
    Verdict {
        forbidden,
        condition_hits,
        relaxed_hits,
        total,
        text,
    }
}

pub use tempfile::TempDir;

/// A fresh temporary directory for generated programs (removed when dropped).
pub fn scratch_dir() -> Result<TempDir, RunError> {
    tempfile::Builder::new()
        .prefix("vsmp-litmus-")
        .tempdir()
        .map_err(RunError::TempDir)
}
