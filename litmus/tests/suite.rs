//! The whole litmus suite through the parser and the reference model: every test in
//! `INDEX.tsv` parses, the model's state set is exactly herd7's `.expected` one (states, their
//! order and formatting, witnesses, condition, observation), and the verdicts agree.
//!
//! The suite lives outside the repository (`../shared/litmus` from the repository root, or
//! `$VSMP_LITMUS_DIR`); if it is absent this test FAILS rather than passing vacuously.

use std::path::Path;

use vsmp_litmus::herd::{comparable_expected, judge, report};
use vsmp_litmus::model::{MemoryModel, Scope, explore};
use vsmp_litmus::suite::{locate, read_index};

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crate lives inside the repository")
}

#[test]
fn every_suite_test_matches_herd7_expected_output_exactly() {
    let dir = locate(repo_root()).unwrap_or_else(|e| panic!("{e}"));
    let index = read_index(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        index.len() >= 200,
        "INDEX.tsv lists only {} tests",
        index.len()
    );
    // Check tests on every core: the suite is independent per test.
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let all_failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(entry) = index.get(i) else { break };
                    let failures = check_entry(&dir, entry);
                    all_failures.lock().unwrap().extend(failures);
                }
            });
        }
    });
    let failures = all_failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} checks failed over {} tests:\n{}",
        failures.len(),
        index.len(),
        failures.join("\n")
    );
}

/// Checks one suite entry; returns a message per failed check.
fn check_entry(dir: &Path, entry: &vsmp_litmus::suite::Entry) -> Vec<String> {
    let mut failures = Vec::new();
    {
        let path = dir.join(&entry.file);
        let test = match vsmp_litmus::parse_file(&path) {
            Ok(t) => t,
            Err(e) => {
                failures.push(format!("parse: {e}"));
                return failures;
            }
        };
        let set = match explore(&test, MemoryModel::Tso, Scope::Condition) {
            Ok(s) => s,
            Err(e) => {
                failures.push(format!("model: {e}"));
                return failures;
            }
        };
        let expected_path = path.with_file_name(format!(
            "{}.expected",
            path.file_name().unwrap().to_string_lossy()
        ));
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        let ours = report(&test, &set);
        if ours != comparable_expected(&expected) {
            failures.push(format!(
                "{}: output differs\n--- herd7\n{}--- model\n{}",
                entry.file.display(),
                comparable_expected(&expected),
                ours
            ));
        }
        let j = judge(&test, &set);
        if j.verdict.as_str() != entry.expected {
            failures.push(format!(
                "{}: verdict {} but INDEX.tsv says {}",
                entry.file.display(),
                j.verdict.as_str(),
                entry.expected
            ));
        }
        let obs = format!("{} {} {}", j.observation.as_str(), j.positive, j.negative);
        if obs != entry.observation_tso {
            failures.push(format!(
                "{}: observation '{obs}' but INDEX.tsv says '{}'",
                entry.file.display(),
                entry.observation_tso
            ));
        }
        if test.threads.len() != entry.threads {
            failures.push(format!(
                "{}: {} threads but INDEX.tsv says {}",
                entry.file.display(),
                test.threads.len(),
                entry.threads
            ));
        }
        // Under SC the model must give INDEX.tsv's SC verdict, and TSO-only outcomes are exactly
        // those SC forbids and TSO allows.
        let sc =
            explore(&test, MemoryModel::Sc, Scope::Condition).expect("SC is a sub-space of TSO");
        let sc_verdict = judge(&test, &sc).verdict;
        if sc_verdict.as_str() != entry.expected_under_sc {
            failures.push(format!(
                "{}: SC verdict {} but INDEX.tsv says {}",
                entry.file.display(),
                sc_verdict.as_str(),
                entry.expected_under_sc
            ));
        }
        let relaxed = j.verdict.as_str() == "Allowed" && sc_verdict.as_str() == "Forbidden";
        if relaxed != entry.tso_only_relaxed {
            failures.push(format!(
                "{}: tso_only_relaxed {relaxed} but INDEX.tsv says {}",
                entry.file.display(),
                entry.tso_only_relaxed
            ));
        }
    }
    failures
}
