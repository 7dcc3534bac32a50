//! Malformed input never panics: every truncation and every single-character deletion of a set
//! of suite files either parses (and then explores within a bound) or is a clean error.

use std::path::Path;

use vsmp_litmus::model::{MemoryModel, Scope, explore_bounded};
use vsmp_litmus::suite::{locate, read_index};

/// States each mutated test may explore (mutations can create loops).
const MUTANT_STATE_BOUND: usize = 5_000;

fn check(text: &str) {
    if let Ok(test) = vsmp_litmus::parse_str(Path::new("mutant.litmus"), text) {
        let _ = explore_bounded(&test, MemoryModel::Tso, Scope::Full, MUTANT_STATE_BOUND);
        let _ = vsmp_litmus::cgen::generate(&test, vsmp_litmus::cgen::Target::Native, 4);
    }
}

#[test]
fn truncated_or_damaged_litmus_files_are_errors_not_panics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("inside the repository");
    let dir = locate(root).unwrap_or_else(|e| panic!("{e}"));
    let index = read_index(&dir).unwrap_or_else(|e| panic!("{e}"));
    // A spread of dialects and features: Intel, AT&T, xchg, branches, arrays, forall.
    let picks = [
        "SB",
        "IRIW+AA",
        "A006",
        "A009",
        "CO-SBI",
        "A005",
        "2+2W+poana+poaa",
    ];
    let mut checked = 0;
    for entry in index.iter().filter(|e| picks.contains(&e.name.as_str())) {
        let text = std::fs::read_to_string(dir.join(&entry.file)).unwrap();
        let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
        for (k, &i) in bounds.iter().enumerate() {
            check(&text[..i]);
            let next = bounds.get(k + 1).copied().unwrap_or(text.len());
            check(&format!("{}{}", &text[..i], &text[next..]));
            checked += 2;
        }
    }
    assert!(checked > 1000, "only {checked} mutants checked");
}
