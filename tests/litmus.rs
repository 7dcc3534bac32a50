//! `vsmp litmus` end to end through the binary: the model's output against herd7's files, a
//! short native run over a handful of tests, the whole suite under the DSM at 2 and 4 nodes
//! (over shm; a selection over tcp) with zero forbidden states and SB's relaxed outcome seen,
//! and error reporting. `VSMP_LITMUS_ITERATIONS=K` runs the suites longer.
//!
//! The litmus suite lives beside the repository (`../shared/litmus`, or `$VSMP_LITMUS_DIR`);
//! without it these tests FAIL with a message saying where they looked.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn suite() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    vsmp_litmus::suite::locate(root).unwrap_or_else(|e| panic!("{e}"))
}

fn vsmp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vsmp"))
        .args(args)
        .output()
        .expect("the vsmp binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn model_output_is_identical_to_herd7_expected_files() {
    let dir = suite();
    let files = [
        "herdtools7/catalogue/x86/tests/SB.litmus",
        "diy7-generated-xchg/IRIW+AA.litmus",
        "litmus-tests-x86/tests/non-mixed-size/CO/CO-SBI.litmus",
        "herdtools7/herd/tests/instructions/X86_64/A006.litmus",
        "litmus-tests-x86/tests/non-mixed-size/CO/2+2W+poss.litmus",
    ];
    for f in files {
        let path = dir.join(f);
        let out = vsmp(&["litmus", "--model", path.to_str().unwrap()]);
        assert!(out.status.success(), "{f}: {}", text(&out.stderr));
        let expected = std::fs::read_to_string(format!("{}.expected", path.display())).unwrap();
        let expected = vsmp_litmus::herd::comparable_expected(&expected);
        assert_eq!(text(&out.stdout).trim_end(), expected.trim_end(), "{f}");
    }
}

#[test]
fn a_short_native_run_shows_no_forbidden_state_and_prints_counts() {
    let dir = suite();
    let files = [
        "herdtools7/catalogue/x86/tests/SB.litmus",
        "litmus-tests-x86/tests/non-mixed-size/BASIC_2_THREAD/MP.litmus",
        "litmus-tests-x86/tests/non-mixed-size/BASIC_4_THREAD/IRIW+mfences.litmus",
        "diy7-generated-xchg/SB+mfenceana+po.litmus",
    ];
    let paths: Vec<String> = files
        .iter()
        .map(|f| dir.join(f).display().to_string())
        .collect();
    let mut args = vec!["litmus", "--native", "--iterations", "4000"];
    args.extend(paths.iter().map(String::as_str));
    let out = vsmp(&args);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(!stdout.contains("FORBIDDEN"), "{stdout}");
    for (name, expected) in [
        ("SB", "Allowed"),
        ("MP", "Forbidden"),
        ("IRIW+mfences", "Forbidden"),
        ("SB+mfenceana+po", "Allowed"),
    ] {
        let header = format!("Test {name} (");
        let start = stdout
            .find(&header)
            .unwrap_or_else(|| panic!("no block for {name}:\n{stdout}"));
        let block = &stdout[start..];
        let block = &block[..block.find("\n\n").unwrap_or(block.len())];
        let mut lines = block.lines();
        let first = lines.next().unwrap();
        assert!(
            first.contains(&format!("expected {expected}: 4000 iterations")),
            "{first}"
        );
        let mut counted = 0u64;
        for line in lines
            .clone()
            .take_while(|l| !l.trim_start().starts_with(['e', '~', 'f']))
        {
            let mut parts = line.split_whitespace();
            counted += parts
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("bad count line '{line}'"));
            let state: Vec<&str> = parts.take_while(|p| *p != "<-").collect();
            assert!(
                !state.is_empty() && state.iter().all(|e| e.ends_with(';') && e.contains('=')),
                "bad state '{line}'"
            );
        }
        assert_eq!(counted, 4000, "{block}");
        assert_eq!(block.lines().last(), Some("ok"), "{block}");
    }
    assert!(
        stdout.contains("Summary: 4 tests, 4 ok, 0 with a forbidden state, 0 errors"),
        "{stdout}"
    );
}

#[test]
fn vsmp_mode_runs_each_test_on_its_own_nodes_and_sees_sbs_relaxed_outcome() {
    let dir = suite();
    let emit = tempfile::tempdir().unwrap();
    let sb = dir.join("herdtools7/catalogue/x86/tests/SB.litmus");
    let out = vsmp(&[
        "litmus",
        "--nodes",
        "2",
        "--iterations",
        "2000",
        "--emit",
        emit.path().to_str().unwrap(),
        sb.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.contains("2 thread(s) on 2 vCPU(s) under vsmp (shm)"),
        "{stdout}"
    );
    // The DSM is TSO, not SC by accident: both loads read 0 in some iterations.
    assert!(
        stdout.contains("Summary: 1 tests, 1 ok, 0 with a forbidden state, 0 errors; relaxed (non-SC) outcome seen in 1"),
        "{stdout}"
    );
    let generated: Vec<_> = std::fs::read_dir(emit.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(generated.len(), 1);
    let c = std::fs::read_to_string(&generated[0]).unwrap();
    assert!(c.contains("#include <vsmp.h>") && c.contains("vsmp_barrier_wait(&bar)"));
}

/// Iterations per test of the suite runs under the DSM in CI (`VSMP_LITMUS_ITERATIONS`).
fn suite_iterations(default: u32) -> String {
    std::env::var("VSMP_LITMUS_ITERATIONS").unwrap_or_else(|_| default.to_string())
}

fn whole_suite_under_the_dsm(nodes: &str, fabric: &str, iterations: u32) {
    let index = suite().join("INDEX.tsv");
    let iterations = suite_iterations(iterations);
    let out = vsmp(&[
        "litmus",
        "--nodes",
        nodes,
        "--fabric",
        fabric,
        "--iterations",
        &iterations,
        index.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    let summary = stdout.lines().last().unwrap_or("");
    assert!(
        out.status.success(),
        "{}\n{summary}\n{}",
        stdout
            .split("\n\n")
            .filter(|b| b.contains("FORBIDDEN") || b.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n\n"),
        text(&out.stderr)
    );
    assert!(
        summary.contains("0 with a forbidden state, 0 errors"),
        "{summary}"
    );
    eprintln!("{nodes} nodes over {fabric}: {summary}");
}

#[test]
fn the_whole_suite_at_two_nodes_over_shm_shows_no_forbidden_state() {
    whole_suite_under_the_dsm("2", "shm", 40);
}

#[test]
fn the_whole_suite_at_four_nodes_over_shm_shows_no_forbidden_state() {
    whole_suite_under_the_dsm("4", "shm", 10);
}

#[test]
fn tests_of_two_to_four_threads_over_tcp_show_no_forbidden_state() {
    let dir = suite();
    let files = [
        "herdtools7/catalogue/x86/tests/SB.litmus",
        "litmus-tests-x86/tests/non-mixed-size/BASIC_2_THREAD/MP.litmus",
        "herdtools7/catalogue/x86_64/tests/WRC.litmus",
        "litmus-tests-x86/tests/non-mixed-size/BASIC_4_THREAD/IRIW+mfences.litmus",
        "diy7-generated-xchg/SB+mfenceana+po.litmus",
        "diy7-generated-xchg/IRIW+AA.litmus",
        "herdtools7/catalogue/x86/tests/SB+mfences.litmus",
    ];
    let paths: Vec<String> = files
        .iter()
        .map(|f| dir.join(f).display().to_string())
        .collect();
    let iterations = suite_iterations(200);
    let mut args = vec![
        "litmus",
        "--nodes",
        "2",
        "--fabric",
        "tcp",
        "--iterations",
        &iterations,
    ];
    args.extend(paths.iter().map(String::as_str));
    let out = vsmp(&args);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.contains(&format!(
            "Summary: {} tests, {} ok, 0 with a forbidden state",
            files.len(),
            files.len()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("under vsmp (tcp)"), "{stdout}");
}

#[test]
fn single_thread_tests_run_under_the_vsmp_monitor() {
    let dir = suite();
    let files = [
        dir.join("herdtools7/herd/tests/instructions/X86_64/A009.litmus"),
        dir.join("herdtools7/doc/CoRWR.litmus"),
        dir.join("litmus-tests-x86/tests/non-mixed-size/CO/CoWR0.litmus"),
    ];
    let mut args = vec!["litmus", "--nodes", "1", "--iterations", "40"];
    args.extend(files.iter().map(|f| f.to_str().unwrap()));
    let out = vsmp(&args);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.contains("Test A009 (") && stdout.contains("on 1 vCPU(s) under vsmp"),
        "{stdout}"
    );
    assert!(stdout.contains("  40  0:rcx=-1;  <- condition"), "{stdout}");
    assert!(
        stdout.contains("Summary: 3 tests, 3 ok, 0 with a forbidden state, 0 errors"),
        "{stdout}"
    );
}

#[test]
fn an_unsupported_instruction_is_reported_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.litmus");
    std::fs::write(
        &bad,
        "X86_64 bad\n{ }\n P0 ;\n movl $1,(x) ;\n cpuid ;\nexists ([x]=1)\n",
    )
    .unwrap();
    let out = vsmp(&["litmus", "--model", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("bad.litmus:5: P0: unsupported instruction 'cpuid'"),
        "{err}"
    );
}
