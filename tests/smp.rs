//! N-node machines end to end: the examples in `guest/examples/` (each checks its own result
//! and exits non-zero on a mismatch) built with `vsmp cc` and run by `vsmp run --nodes N` at 2
//! and 4 nodes, on the shm and the tcp fabric; the machine's exit rules (vsmp_exit, returns
//! from main, the first non-zero status); and dead nodes (killed, crashed, stopped): the
//! others stop with a message naming the node, the run fails with 125, nothing is left.
//!
//! Every run tracks the processes `vsmp` starts (node processes and their VM processes, found
//! by parent while they live) and checks after the run that none of them is left.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::processes_where;

const VSMP: &str = env!("CARGO_BIN_EXE_vsmp");

/// Liveness bound of a run (not a performance assertion: generous, for a loaded machine).
const RUN_LIMIT: Duration = Duration::from_secs(180);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Where the examples are built, once per test process.
fn build_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

/// Builds `guest/examples/NAME.c` (once) with `vsmp cc -O2` and `defines`.
fn example(name: &str, defines: &[&str]) -> PathBuf {
    let tag = defines.join("_").replace(['=', '-'], "");
    let elf = build_dir().join(format!("{name}{tag}.elf"));
    if elf.exists() {
        return elf;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("guest/examples/{name}.c"));
    let tmp = elf.with_extension(format!("{}.tmp", std::process::id()));
    let out = Command::new(VSMP)
        .args(["cc", "-O2"])
        .args(defines)
        .arg("-o")
        .arg(&tmp)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vsmp cc {name}: {}",
        text(&out.stderr)
    );
    std::fs::rename(&tmp, &elf).unwrap();
    elf
}

/// `vsmp` in a process group of its own (so a terminal's signals do not reach it).
fn spawn(args: &[&str]) -> Child {
    Command::new(VSMP)
        .args(args)
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Every process whose parent chain leads to `root` (found while they are alive).
fn descendants(root: i32) -> Vec<i32> {
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        for child in processes_where(1, found[i]) {
            if !found.contains(&child) {
                found.push(child);
            }
        }
        i += 1;
    }
    found.remove(0);
    found
}

struct Run {
    code: Option<i32>,
    out: String,
    err: String,
}

/// Runs `vsmp ARGS` to its end and checks that every process it started is gone.
fn run(args: &[&str]) -> Run {
    let mut child = spawn(args);
    let pid = child.id() as i32;
    let mut seen = Vec::new();
    let deadline = Instant::now() + RUN_LIMIT;
    loop {
        for p in descendants(pid) {
            if !seen.contains(&p) {
                seen.push(p);
            }
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "vsmp {args:?} did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let left = wait_gone(&seen);
    assert!(
        left.is_empty(),
        "processes left behind by vsmp {args:?}: {left:?}"
    );
    Run {
        code: out.status.code(),
        out: text(&out.stdout),
        err: text(&out.stderr),
    }
}

/// Waits a little for `pids` to be gone (a killed process takes a moment); those still alive.
fn wait_gone(pids: &[i32]) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|p| common::alive(*p)).collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn check_example(name: &str, nodes: usize, fabric: &str, expect: &str) {
    let elf = example(name, &[]);
    let n = nodes.to_string();
    let r = run(&[
        "run",
        "--nodes",
        &n,
        "--fabric",
        fabric,
        elf.to_str().unwrap(),
    ]);
    assert_eq!(
        r.code,
        Some(0),
        "{name} at {nodes} nodes on {fabric}:\n{}\n{}",
        r.out,
        r.err
    );
    assert!(
        r.out.contains(expect),
        "{name} at {nodes} nodes on {fabric}: {:?}",
        r.out
    );
}

fn every_example(nodes: usize, fabric: &str) {
    let n = nodes.to_string();
    check_example(
        "counter",
        nodes,
        fabric,
        &format!("{n} vCPUs x 300 increments"),
    );
    check_example(
        "barrier",
        nodes,
        fabric,
        &format!("{n} vCPUs, 50 rounds: ok"),
    );
    check_example(
        "prodcons",
        nodes,
        fabric,
        "pair 0 passed 2000 items in order: ok",
    );
    check_example("reduction", nodes, fabric, &format!("on {n} vCPUs: ok"));
    check_example(
        "stencil",
        nodes,
        fabric,
        &format!("{n} vCPUs matches the serial sweep"),
    );
}

#[test]
fn every_example_is_correct_on_two_nodes_over_shm() {
    every_example(2, "shm");
}

#[test]
fn every_example_is_correct_on_four_nodes_over_shm() {
    every_example(4, "shm");
}

#[test]
fn every_example_is_correct_on_two_nodes_over_tcp() {
    every_example(2, "tcp");
}

#[test]
fn every_example_is_correct_on_four_nodes_over_tcp() {
    every_example(4, "tcp");
}

/// A guest whose vCPUs each return `base + id` from main (or call vsmp_exit).
fn statuses_guest(body: &str) -> PathBuf {
    let dir = build_dir();
    let name = format!("status{:x}", fxhash(body));
    let elf = dir.join(format!("{name}.elf"));
    if !elf.exists() {
        let src = dir.join(format!("{name}.c"));
        std::fs::write(
            &src,
            format!("#include <vsmp.h>\nint main(void) {{\n{body}\n}}\n"),
        )
        .unwrap();
        let out = Command::new(VSMP)
            .args(["cc", "-O2", "-o"])
            .arg(&elf)
            .arg(&src)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    elf
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[test]
fn the_machine_ends_when_every_vcpu_returned_with_the_first_nonzero_status() {
    // vCPU 1 returns 7 after vCPU 2 returned 9 (it waits for a flag vCPU 2 sets just before
    // returning); vCPU 0 and 3 return 0 late: the first non-zero status in the global order is 9.
    let elf = statuses_guest(
        "static volatile int two_done;\n\
         unsigned id = vsmp_cpu_id();\n\
         if (id == 2) { two_done = 1; return 9; }\n\
         if (id == 1) { while (!two_done) vsmp_cpu_relax(); for (volatile int i = 0; i < 100000; i++); return 7; }\n\
         for (volatile int i = 0; i < 300000; i++);\n\
         return 0;",
    );
    let r = run(&["run", "--nodes", "4", elf.to_str().unwrap()]);
    assert_eq!(r.code, Some(9), "{}", r.err);
    let r = run(&[
        "run",
        "--nodes",
        "2",
        statuses_guest("return 0;").to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.err);
}

#[test]
fn vsmp_exit_on_any_vcpu_stops_the_whole_machine_with_its_status() {
    // vCPU 1 exits the machine with 42 while vCPU 0 spins forever.
    let elf = statuses_guest(
        "if (vsmp_cpu_id() == 1) vsmp_exit(42);\n\
         for (;;) vsmp_cpu_relax();",
    );
    let r = run(&["run", "--nodes", "2", elf.to_str().unwrap()]);
    assert_eq!(r.code, Some(42), "{}", r.err);
}

#[test]
fn console_lines_can_be_labelled_by_vcpu() {
    let elf = example("hello", &[]);
    let r = run(&["run", "--nodes", "3", "--label", elf.to_str().unwrap()]);
    assert_eq!(r.code, Some(0), "{}", r.err);
    for id in 0..3 {
        assert!(
            r.out.contains(&format!("{id}: hello from vCPU {id} of 3")),
            "{:?}",
            r.out
        );
    }
}

#[test]
fn stats_report_every_node_as_text_and_json() {
    let elf = example("counter", &[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("stats.json");
    let r = run(&[
        "run",
        "--nodes",
        "2",
        "--stats",
        "--stats-json",
        json.to_str().unwrap(),
        elf.to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.err);
    for needle in [
        "node 0:",
        "node 1:",
        "write faults",
        "batches published",
        "fence",
        "median",
    ] {
        assert!(r.err.contains(needle), "{needle}: {}", r.err);
    }
    let j = std::fs::read_to_string(&json).unwrap();
    assert!(
        j.starts_with('[') && j.contains("\"node\":1") && j.contains("\"fence_latency\""),
        "{j}"
    );
}

/// A machine whose vCPUs run for a long time (until the test kills something).
fn long_guest() -> PathBuf {
    example("reduction", &["-DSTEPS=40000000000L"])
}

/// Starts a long machine of `nodes`, waits for every VM process, hands the node processes'
/// pids (in rank order) to `hurt`, and returns how the run ended and how long the launcher
/// took to end after `hurt`.
fn hurt_a_node(nodes: usize, hurt: impl FnOnce(&[i32])) -> (Run, Duration) {
    let elf = long_guest();
    let n = nodes.to_string();
    let mut child = spawn(&["run", "--nodes", &n, "--no-pin", elf.to_str().unwrap()]);
    let pid = child.id() as i32;
    let deadline = Instant::now() + RUN_LIMIT;
    // Each node process has one VM process (its child) once it runs its guest.
    let node_pids = loop {
        let mut nodes_now = processes_where(1, pid);
        nodes_now.sort();
        if nodes_now.len() == nodes && nodes_now.iter().all(|p| !processes_where(1, *p).is_empty())
        {
            break nodes_now;
        }
        assert!(Instant::now() < deadline, "the machine never started");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Rank order: the node processes were started in rank order.
    let all: Vec<i32> = node_pids
        .iter()
        .flat_map(|p| std::iter::once(*p).chain(descendants(*p)))
        .collect();
    let hurt_at = Instant::now();
    hurt(&node_pids);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the machine did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = hurt_at.elapsed();
    let out = child.wait_with_output().unwrap();
    let left = wait_gone(&all);
    assert!(left.is_empty(), "processes left behind: {left:?}");
    (
        Run {
            code: out.status.code(),
            out: text(&out.stdout),
            err: text(&out.stderr),
        },
        took,
    )
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

#[test]
fn a_killed_node_stops_the_others_with_a_message_naming_it() {
    let (r, took) = hurt_a_node(3, |nodes| {
        signal(nodes[1], nix::sys::signal::Signal::SIGKILL)
    });
    assert_eq!(r.code, Some(125), "{}", r.err);
    assert!(r.err.contains("node 1"), "{}", r.err);
    eprintln!("the machine stopped {took:?} after node 1 was killed");
}

#[test]
fn a_stopped_node_is_taken_for_dead_and_the_rest_stop() {
    let (r, took) = hurt_a_node(2, |nodes| {
        signal(nodes[1], nix::sys::signal::Signal::SIGSTOP)
    });
    assert_eq!(r.code, Some(125), "{}", r.err);
    assert!(r.err.contains("node 1"), "{}", r.err);
    eprintln!("the machine stopped {took:?} after node 1 was stopped");
}

#[test]
fn a_node_whose_guest_crashes_stops_the_machine() {
    // vCPU 1 writes through a wild pointer; vCPU 0 computes on.
    let elf = statuses_guest(
        "if (vsmp_cpu_id() == 1) *(volatile int *)0x7fff0000 = 1;\n\
         for (;;) vsmp_cpu_relax();",
    );
    let r = run(&["run", "--nodes", "2", elf.to_str().unwrap()]);
    assert_eq!(r.code, Some(125), "{}", r.err);
    assert!(r.err.contains("guest crashed"), "{}", r.err);
    assert!(r.err.contains("node 1"), "{}", r.err);
}
