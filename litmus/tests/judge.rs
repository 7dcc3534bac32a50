//! Judging observed outcomes: a state outside the model's allowed set is reported as forbidden,
//! whatever the condition says; SC-forbidden but TSO-allowed states are marked relaxed.

use std::path::Path;

use vsmp_litmus::model::{MemoryModel, Scope, explore};
use vsmp_litmus::native::{Observed, judge, parse_counts};

const MP: &str = "X86_64 MP\n{ }\n P0 | P1 ;\n movq $1,(x) | movq (y),%rax ;\n movq $1,(y) | movq (x),%rbx ;\nexists (1:rax=1 /\\ 1:rbx=0)\n";
const SB: &str = "X86_64 SB\n{ }\n P0 | P1 ;\n movq $1,(x) | movq $1,(y) ;\n movq (y),%rax | movq (x),%rax ;\nexists (0:rax=0 /\\ 1:rax=0)\n";

#[test]
fn a_state_outside_the_allowed_set_is_forbidden() {
    let test = vsmp_litmus::parse_str(Path::new("mp.litmus"), MP).unwrap();
    let allowed = explore(&test, MemoryModel::Tso, Scope::Full).unwrap();
    let sc = explore(&test, MemoryModel::Sc, Scope::Full).unwrap();
    // Keys: 1:rax, 1:rbx, [x], [y].
    assert_eq!(allowed.keys.len(), 4);
    let obs = parse_counts(&test, "CORES 2\n90 0 0 1 1\n7 1 0 1 1\n3 1 1 1 1\n", 4).unwrap();
    let v = judge(&test, &allowed, &sc, &obs);
    assert_eq!(v.forbidden, vec![(vec![1, 0, 1, 1], 7)]);
    assert_eq!(v.condition_hits, 7);
    assert_eq!(v.total, 100);
    assert!(
        v.text
            .contains(" 7  1:rax=1; 1:rbx=0; [x]=1; [y]=1;  <- condition, FORBIDDEN"),
        "{}",
        v.text
    );
    // A final memory value no execution produces is forbidden too, though the condition
    // does not mention memory.
    let obs = Observed {
        counts: vec![(vec![0, 0, 0, 1], 1)],
        cores: 2,
    };
    assert_eq!(judge(&test, &allowed, &sc, &obs).forbidden.len(), 1);
}

#[test]
fn store_buffering_outcome_is_allowed_and_marked_relaxed() {
    let test = vsmp_litmus::parse_str(Path::new("sb.litmus"), SB).unwrap();
    let allowed = explore(&test, MemoryModel::Tso, Scope::Full).unwrap();
    let sc = explore(&test, MemoryModel::Sc, Scope::Full).unwrap();
    let obs = parse_counts(&test, "5 0 0 1 1\n5 0 1 1 1\n", 4).unwrap();
    let v = judge(&test, &allowed, &sc, &obs);
    assert!(v.forbidden.is_empty());
    assert_eq!((v.condition_hits, v.relaxed_hits), (5, 5));
    assert!(v.text.contains("<- condition, relaxed"), "{}", v.text);
}

#[test]
fn malformed_program_output_is_an_error() {
    let test = vsmp_litmus::parse_str(Path::new("sb.litmus"), SB).unwrap();
    assert!(parse_counts(&test, "5 0 0 1\n", 4).is_err());
    assert!(parse_counts(&test, "five 0 0 1 1\n", 4).is_err());
}
