//! `vsmp litmus` end to end through the binary: the model's output against herd7's files, a
//! short native run over a handful of tests, the vsmp mode's refusal, and error reporting.
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
fn vsmp_mode_generates_guest_programs_then_says_it_needs_a_multi_vcpu_monitor() {
    let dir = suite();
    let emit = tempfile::tempdir().unwrap();
    let sb = dir.join("herdtools7/catalogue/x86/tests/SB.litmus");
    let out = vsmp(&[
        "litmus",
        "--nodes",
        "2",
        "--emit",
        emit.path().to_str().unwrap(),
        sb.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("needs a monitor with one vCPU per node"),
        "{}",
        text(&out.stderr)
    );
    let generated: Vec<_> = std::fs::read_dir(emit.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(generated.len(), 1);
    let c = std::fs::read_to_string(&generated[0]).unwrap();
    assert!(
        c.contains("#include <vsmp.h>")
            && c.contains("vsmp_barrier_wait(&bar)")
            && c.contains("vsmp_cpu_id()")
    );
    // The two-thread guest program builds with the guest toolchain.
    let elf = emit.path().join("sb.elf");
    let cc = vsmp(&[
        "cc",
        "-o",
        elf.to_str().unwrap(),
        generated[0].to_str().unwrap(),
    ]);
    assert!(cc.status.success(), "vsmp cc failed: {}", text(&cc.stderr));
    let out = vsmp(&["litmus", "--nodes", "1", sb.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("needs 2 vCPUs"),
        "{}",
        text(&out.stderr)
    );
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
