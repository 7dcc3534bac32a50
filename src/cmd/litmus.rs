//! `vsmp litmus`: run x86 litmus tests natively, under vsmp, or through the x86-TSO reference
//! model, and judge every observed final state against the states x86-TSO allows.
//!
//! Modes:
//! - `--model FILES`: print herd7's report (allowed states, witnesses, condition, observation)
//!   for each test, so it can be diffed against herd7's `.expected` files.
//! - `--native FILES`: compile each test to a host C program (gcc -O2 -pthread), run it
//!   `--iterations` times, print the counts of each observed final state and `ok` or
//!   `FORBIDDEN OBSERVED`; exit non-zero if any test fails.
//! - default / `--nodes N`: generate the vsmp guest program of each test (thread i on vCPU i),
//!   build it with `vsmp cc`, run it with `vsmp run --nodes max(N, T)` for a test of T threads
//!   (`--fabric shm|tcp`), and judge every observed final state like a native run.
//!
//! A path named `INDEX.tsv` stands for every test the index lists.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context as _;
use vsmp_litmus::LitmusTest;
use vsmp_litmus::cgen::{Target, generate};
use vsmp_litmus::cond::condition_text;
use vsmp_litmus::herd::{judge, report};
use vsmp_litmus::model::{MemoryModel, Scope, StateSet, explore};
use vsmp_litmus::native;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Run each test natively on this host (the real processor is the reference).
    #[arg(long, conflicts_with_all = ["model", "nodes"])]
    native: bool,
    /// Print the reference model's allowed final states in herd7's format.
    #[arg(long, conflicts_with_all = ["native", "nodes", "iterations"])]
    model: bool,
    /// Run under vsmp on N nodes, one vCPU each (the default mode): a test with T threads
    /// runs on max(N, T) nodes. Default: each test on as many nodes as it has threads.
    #[arg(long, value_name = "N")]
    nodes: Option<usize>,
    /// The fabric between the nodes under vsmp: shm or tcp.
    #[arg(long, value_name = "BACKEND", default_value = "shm", conflicts_with_all = ["native", "model"])]
    fabric: vsmp_coherence::fabric::Backend,
    /// Iterations per test (native default: 50000, or 10000 for a test with more threads than
    /// the host has cores; vsmp default: 1000).
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    iterations: Option<u64>,
    /// Also write each generated C program into DIR (NAME.c for native, NAME.guest.c for vsmp).
    #[arg(long, value_name = "DIR")]
    emit: Option<PathBuf>,
    /// Parallel gcc jobs when compiling the programs (default: number of cores).
    #[arg(long, value_name = "J")]
    jobs: Option<usize>,
    /// Litmus files (`.litmus`), or an `INDEX.tsv` standing for all the tests it lists.
    #[arg(required = true, value_name = "FILES")]
    files: Vec<PathBuf>,
}

/// Iterations per test in vsmp mode when none is given (each iteration is a DSM round trip).
const GUEST_DEFAULT_ITERATIONS: u64 = 1000;

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let paths = expand(&args.files)?;
    if args.model {
        return run_model(&paths);
    }
    if args.native {
        return run_native(&args, &paths);
    }
    run_vsmp(&args, &paths)
}

/// Expands `INDEX.tsv` arguments into the files they list.
fn expand(files: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for f in files {
        if f.file_name().is_some_and(|n| n == "INDEX.tsv") {
            let dir = f.parent().unwrap_or(Path::new("."));
            let index = vsmp_litmus::suite::read_index(dir)?;
            out.extend(index.into_iter().map(|e| dir.join(e.file)));
        } else {
            out.push(f.clone());
        }
    }
    Ok(out)
}

fn parse_all(paths: &[PathBuf]) -> anyhow::Result<Vec<LitmusTest>> {
    paths
        .iter()
        .map(|p| vsmp_litmus::parse_file(p).map_err(anyhow::Error::from))
        .collect()
}

fn run_model(paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    for test in parse_all(paths)? {
        let set = explore(&test, MemoryModel::Tso, Scope::Condition)?;
        match writeln!(out, "{}", report(&test, &set)) {
            Ok(()) => {}
            // The reader went away (`| head`): stop quietly, like other filters.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
            Err(e) => return Err(e).context("cannot write to standard output"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A short unique file stem for test `i` (names repeat across the suite's folders).
fn stem(i: usize, test: &LitmusTest) -> String {
    let clean: String = test
        .name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{i:03}-{clean}")
}

fn run_vsmp(args: &Args, paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let tests = parse_all(paths)?;
    let iterations = args.iterations.unwrap_or(GUEST_DEFAULT_ITERATIONS);
    let nodes = args.nodes.unwrap_or(1).max(1);
    let dir = native::scratch_dir()?;
    let mut sources = Vec::new();
    for (i, test) in tests.iter().enumerate() {
        let source = generate(test, Target::Guest, iterations)?;
        let c_path = dir.path().join(format!("{}.guest.c", stem(i, test)));
        std::fs::write(&c_path, &source)
            .with_context(|| format!("cannot write {}", c_path.display()))?;
        if let Some(emit) = &args.emit {
            std::fs::create_dir_all(emit)
                .with_context(|| format!("cannot create {}", emit.display()))?;
            let path = emit.join(format!("{}.guest.c", stem(i, test)));
            std::fs::write(&path, source)
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!("generated {} for {}", path.display(), test.name);
        }
        sources.push(c_path);
    }
    // `vsmp cc`, then `vsmp run` on max(N, T) nodes.
    let me = std::env::current_exe().context("cannot find the vsmp executable")?;
    // Build every guest first, in parallel; the runs then have every core to themselves.
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let built: Vec<Mutex<Option<std::io::Result<std::process::Output>>>> =
        sources.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..jobs.min(sources.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(c_path) = sources.get(i) else { break };
                    let out = Command::new(&me)
                        .arg("cc")
                        .arg("-o")
                        .arg(c_path.with_extension("elf"))
                        .arg(c_path)
                        .output();
                    if let Ok(mut slot) = built[i].lock() {
                        *slot = Some(out);
                    }
                }
            });
        }
    });
    let mut outcomes = Vec::new();
    for (i, ((test, c_path), path)) in tests.iter().zip(&sources).zip(paths).enumerate() {
        let elf = c_path.with_extension("elf");
        let cc = built[i]
            .lock()
            .ok()
            .and_then(|mut s| s.take())
            .context("a guest was not built")?
            .context("cannot run vsmp cc")?;
        if !cc.status.success() {
            println!(
                "Test {} ({})\nERROR vsmp cc failed on {}:\n{}\n",
                test.name,
                path.display(),
                c_path.display(),
                String::from_utf8_lossy(&cc.stderr)
            );
            outcomes.push(Outcome::Error);
            continue;
        }
        let test_nodes = nodes.max(test.threads.len());
        let run = |nkeys: usize| -> Result<native::Observed, vsmp_litmus::RunError> {
            let out = Command::new(&me)
                .arg("run")
                .arg(format!("--nodes={test_nodes}"))
                .arg(format!("--fabric={}", args.fabric))
                .arg(&elf)
                .output()
                .map_err(|source| vsmp_litmus::RunError::Spawn {
                    program: "vsmp run".into(),
                    source,
                })?;
            if !out.status.success() {
                return Err(vsmp_litmus::RunError::Execute {
                    test: test.name.clone(),
                    status: out.status.to_string(),
                    stderr: format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ),
                });
            }
            native::parse_counts(test, &String::from_utf8_lossy(&out.stdout), nkeys)
        };
        let placement = |_: &native::Observed| {
            format!(
                "{} thread(s) on {test_nodes} vCPU(s) under vsmp ({})",
                test.threads.len(),
                args.fabric
            )
        };
        outcomes.push(run_one(path, test, &placement, run));
    }
    Ok(summarize(&outcomes))
}

/// What happened to one test in a native run.
enum Outcome {
    Ok { relaxed: bool, condition: bool },
    Forbidden,
    Error,
}

fn run_native(args: &Args, paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let iterations = |t: &LitmusTest| {
        args.iterations
            .unwrap_or_else(|| native::default_iterations(t.threads.len(), cores))
    };
    let dir = native::scratch_dir()?;
    let mut parsed = Vec::new();
    let mut outcomes = Vec::new();
    for p in paths {
        match vsmp_litmus::parse_file(p) {
            Ok(t) => parsed.push((p.clone(), t)),
            Err(e) => {
                println!("ERROR {e}\n");
                outcomes.push(Outcome::Error);
            }
        }
    }
    // Compile everything first, in parallel; the runs then have every core to themselves.
    let jobs = args
        .jobs
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);
    let built: Vec<Mutex<Option<Result<PathBuf, vsmp_litmus::RunError>>>> =
        parsed.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for j in 0..jobs.min(parsed.len().max(1)) {
            let (parsed, built, next, dir, iterations) =
                (&parsed, &built, &next, dir.path(), &iterations);
            std::thread::Builder::new()
                .name(format!("litmus-gcc-{j}"))
                .spawn_scoped(s, move || {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((_, test)) = parsed.get(i) else {
                            break;
                        };
                        let r = native::build(test, &stem(i, test), dir, iterations(test));
                        if let Ok(mut slot) = built[i].lock() {
                            *slot = Some(r);
                        }
                    }
                })
                .map(|_| ())
                .unwrap_or_else(|e| eprintln!("vsmp litmus: cannot start a compile thread: {e}"));
        }
    });
    if let Some(emit) = &args.emit {
        std::fs::create_dir_all(emit)
            .with_context(|| format!("cannot create {}", emit.display()))?;
        for (i, (_, test)) in parsed.iter().enumerate() {
            let from = dir.path().join(format!("{}.c", stem(i, test)));
            let to = emit.join(format!("{}.c", stem(i, test)));
            if from.exists() {
                std::fs::copy(&from, &to)
                    .with_context(|| format!("cannot write {}", to.display()))?;
            }
        }
    }
    for (i, (path, test)) in parsed.iter().enumerate() {
        let exe = built[i].lock().ok().and_then(|mut s| s.take());
        let outcome = match exe {
            Some(Ok(exe)) => {
                let placement = |o: &native::Observed| {
                    format!("{} threads on {} cores", test.threads.len(), o.cores)
                };
                run_one(path, test, &placement, |nkeys| {
                    native::execute(test, &exe, nkeys)
                })
            }
            Some(Err(e)) => {
                println!("Test {} ({})\nERROR {e}\n", test.name, path.display());
                Outcome::Error
            }
            None => {
                println!(
                    "Test {} ({})\nERROR not compiled\n",
                    test.name,
                    path.display()
                );
                Outcome::Error
            }
        };
        outcomes.push(outcome);
    }
    Ok(summarize(&outcomes))
}

/// Prints the summary line and gives the exit status (success only if every test was ok).
fn summarize(outcomes: &[Outcome]) -> ExitCode {
    let total = outcomes.len();
    let ok = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Ok { .. }))
        .count();
    let forbidden = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Forbidden))
        .count();
    let errors = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Error))
        .count();
    let relaxed = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Ok { relaxed: true, .. }))
        .count();
    let condition = outcomes
        .iter()
        .filter(|o| {
            matches!(
                o,
                Outcome::Ok {
                    condition: true,
                    ..
                }
            )
        })
        .count();
    println!(
        "Summary: {total} tests, {ok} ok, {forbidden} with a forbidden state, {errors} errors; \
         relaxed (non-SC) outcome seen in {relaxed}; condition seen in {condition}"
    );
    if ok == total {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs one compiled test through `execute` (given the number of outcome keys), judges what it
/// observed against the model, and prints the test's block.
fn run_one(
    path: &Path,
    test: &LitmusTest,
    placement: &dyn Fn(&native::Observed) -> String,
    execute: impl FnOnce(usize) -> Result<native::Observed, vsmp_litmus::RunError>,
) -> Outcome {
    let models = || -> Result<(StateSet, StateSet, StateSet), vsmp_litmus::ModelError> {
        Ok((
            explore(test, MemoryModel::Tso, Scope::Full)?,
            explore(test, MemoryModel::Sc, Scope::Full)?,
            explore(test, MemoryModel::Tso, Scope::Condition)?,
        ))
    };
    let (allowed, sc, cond_set) = match models() {
        Ok(m) => m,
        Err(e) => {
            println!("Test {} ({})\nERROR {e}\n", test.name, path.display());
            return Outcome::Error;
        }
    };
    let expected = judge(test, &cond_set).verdict;
    let observed = match execute(allowed.keys.len()) {
        Ok(o) => o,
        Err(e) => {
            println!("Test {} ({})\nERROR {e}\n", test.name, path.display());
            return Outcome::Error;
        }
    };
    let v = native::judge(test, &allowed, &sc, &observed);
    println!(
        "Test {} ({}) expected {}: {} iterations, {}",
        test.name,
        path.display(),
        expected.as_str(),
        v.total,
        placement(&observed)
    );
    print!("{}", v.text);
    println!(
        "  {}: seen {} times; relaxed (non-SC) outcomes: {}",
        condition_text(test, &test.condition),
        v.condition_hits,
        v.relaxed_hits
    );
    if v.forbidden.is_empty() {
        println!("ok\n");
        Outcome::Ok {
            relaxed: v.relaxed_hits > 0,
            condition: v.condition_hits > 0,
        }
    } else {
        println!("FORBIDDEN OBSERVED\n");
        Outcome::Forbidden
    }
}
