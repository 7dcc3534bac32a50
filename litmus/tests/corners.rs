//! Hand-written corner cases for the parser and the reference model, independent of the shared
//! suite: each states the exact set of final states x86-TSO allows.

use std::path::Path;

use vsmp_litmus::herd::{Verdict, judge, report, state_line};
use vsmp_litmus::model::{MemoryModel, Scope, explore, explore_bounded};

fn states(src: &str) -> Vec<String> {
    let test =
        vsmp_litmus::parse_str(Path::new("corner.litmus"), src).unwrap_or_else(|e| panic!("{e}"));
    let set = explore(&test, MemoryModel::Tso, Scope::Condition).unwrap_or_else(|e| panic!("{e}"));
    set.states
        .iter()
        .map(|s| state_line(&test, &set.keys, s))
        .collect()
}

fn verdict(src: &str, model: MemoryModel) -> Verdict {
    let test =
        vsmp_litmus::parse_str(Path::new("corner.litmus"), src).unwrap_or_else(|e| panic!("{e}"));
    let set = explore(&test, model, Scope::Condition).unwrap_or_else(|e| panic!("{e}"));
    judge(&test, &set).verdict
}

#[test]
fn store_buffering_is_allowed_under_tso_but_not_sc() {
    let sb = "X86_64 SB\n{ }\n P0 | P1 ;\n movl $1,(x) | movl $1,(y) ;\n movl (y),%eax | movl (x),%eax ;\nexists (0:rax=0 /\\ 1:rax=0)\n";
    assert_eq!(verdict(sb, MemoryModel::Tso), Verdict::Allowed);
    assert_eq!(verdict(sb, MemoryModel::Sc), Verdict::Forbidden);
    assert_eq!(states(sb).len(), 4);
}

#[test]
fn mfence_forbids_store_buffering() {
    let sb = "X86 SB+mfences\n{ }\n P0 | P1 ;\n MOV [x],$1 | MOV [y],$1 ;\n MFENCE | MFENCE ;\n MOV EAX,[y] | MOV EAX,[x] ;\nexists (0:EAX=0 /\\ 1:EAX=0)\n";
    assert_eq!(verdict(sb, MemoryModel::Tso), Verdict::Forbidden);
    assert_eq!(
        states(sb),
        [
            "0:EAX=0; 1:EAX=1;",
            "0:EAX=1; 1:EAX=0;",
            "0:EAX=1; 1:EAX=1;"
        ]
    );
}

#[test]
fn a_load_sees_its_own_buffered_store_before_anyone_else() {
    // P0 reads its own store of x by forwarding while P1 may still see x=0.
    let src = "X86_64 fwd\n{ }\n P0 | P1 ;\n movl $1,(x) | movl $1,(y) ;\n movl (x),%eax | movl (y),%eax ;\n movl (y),%ebx | movl (x),%ebx ;\nexists (0:rax=1 /\\ 0:rbx=0 /\\ 1:rax=1 /\\ 1:rbx=0)\n";
    assert_eq!(verdict(src, MemoryModel::Tso), Verdict::Allowed);
    assert!(
        states(src)
            .iter()
            .all(|s| s.contains("0:rax=1;") && s.contains("1:rax=1;"))
    );
}

#[test]
fn forwarding_takes_the_newest_buffered_byte_of_mixed_size_stores() {
    // A 4-byte store then a 1-byte store to the same location: a 4-byte load on the same thread
    // merges both (byte 0 from the newer store), before either reaches memory.
    let src = "X86_64 mixed\n{ uint64_t x; }\n P0 ;\n movl $0x11223344,(x) ;\n movb $0x55,(x) ;\n movl (x),%eax ;\nforall (0:rax=0x11223355 /\\ [x]=0x11223355)\n";
    assert_eq!(verdict(src, MemoryModel::Tso), Verdict::Required);
    assert_eq!(states(src), ["0:rax=287454037; [x]=287454037;"]);
}

#[test]
fn xchg_is_atomic_and_fencing() {
    // SB with xchg for both stores: the relaxed outcome disappears.
    let src = "X86_64 SB+xchgs\n{ }\n P0 | P1 ;\n movl $1,%ebx | movl $1,%ebx ;\n xchgl (x),%ebx | xchgl (y),%ebx ;\n movl (y),%eax | movl (x),%eax ;\nexists (0:rax=0 /\\ 1:rax=0)\n";
    assert_eq!(verdict(src, MemoryModel::Tso), Verdict::Forbidden);
    // Two xchgs on one location never both read the initial value.
    let src = "X86_64 xchg-atomic\n{ }\n P0 | P1 ;\n movl $1,%eax | movl $2,%eax ;\n xchgl (x),%eax | xchgl (x),%eax ;\nexists (0:rax=0 /\\ 1:rax=0)\n";
    assert_eq!(verdict(src, MemoryModel::Tso), Verdict::Forbidden);
    assert_eq!(states(src), ["0:rax=0; 1:rax=1;", "0:rax=2; 1:rax=0;"]);
}

#[test]
fn locked_add_increments_atomically() {
    let src =
        "X86 inc\n{ x=0; }\n P0 | P1 ;\n LOCK ADD [x],$1 | LOCK ADD [x],$1 ;\nforall ([x]=2)\n";
    assert_eq!(verdict(src, MemoryModel::Tso), Verdict::Required);
    // Without lock the two read-modify-writes may overlap and lose an update.
    let src = "X86 inc-nolock\n{ x=0; }\n P0 | P1 ;\n ADD [x],$1 | ADD [x],$1 ;\nforall ([x]=2)\n";
    assert_eq!(verdict(src, MemoryModel::Tso), Verdict::NotRequired);
    assert_eq!(states(src), ["[x]=1;", "[x]=2;"]);
}

#[test]
fn four_thread_iriw_is_forbidden_on_x86() {
    let src = "X86_64 IRIW\n{ }\n P0 | P1 | P2 | P3 ;\n movq $1,(x) | movq (x),%rax | movq $1,(y) | movq (y),%rax ;\n | movq (y),%rbx | | movq (x),%rbx ;\nexists (1:rax=1 /\\ 1:rbx=0 /\\ 3:rax=1 /\\ 3:rbx=0)\n";
    assert_eq!(verdict(src, MemoryModel::Tso), Verdict::Forbidden);
    assert_eq!(states(src).len(), 15);
}

#[test]
fn sixty_four_bit_values_survive_stores_and_loads() {
    let src = "X86_64 wide\n{ uint64_t x; uint64_t 1:rax; }\n P0 | P1 ;\n movq $0x123456789abcdef0,%rbx | movq (x),%rax ;\n movq %rbx,(x) | ;\nexists (1:rax=0x123456789abcdef0)\n";
    assert_eq!(verdict(src, MemoryModel::Tso), Verdict::Allowed);
    assert_eq!(states(src), ["1:rax=0;", "1:rax=1311768467463790320;"]);
    // A 32-bit register write zero-extends; a signed type prints negative.
    let src = "X86_64 neg\n{ int64_t 0:rax; 0:rax=-1; }\n P0 ;\n movl $-1,%eax ;\nforall (0:rax=4294967295)\n";
    assert_eq!(verdict(src, MemoryModel::Tso), Verdict::Required);
    let src = "X86_64 neg64\n{ int64_t 0:rcx; }\n P0 ;\n movq $-1,%rcx ;\nforall (0:rcx=-1)\n";
    assert_eq!(states(src), ["0:rcx=-1;"]);
}

#[test]
fn a_forall_condition_is_required_only_when_every_state_satisfies_it() {
    let src = "X86_64 CoRR\n{ }\n P0 | P1 ;\n movq $1,(x) | movq (x),%rax ;\n | movq (x),%rbx ;\nforall (1:rax=0 \\/ 1:rbx=1)\n";
    assert_eq!(verdict(src, MemoryModel::Tso), Verdict::Required);
    let src = "X86_64 CoRR-not\n{ }\n P0 | P1 ;\n movq $1,(x) | movq (x),%rax ;\n | movq (x),%rbx ;\nforall (1:rax=1)\n";
    assert_eq!(verdict(src, MemoryModel::Tso), Verdict::NotRequired);
}

#[test]
fn branches_follow_the_value_read() {
    let src = "X86_64 br\n{ }\n P0 | P1 ;\n movl $1,(y) | movl (y),%eax ;\n | cmpl $1,%eax ;\n | jne Lskip ;\n | movl $1,(z) ;\n | Lskip: ;\n | ret ;\nexists ([z]=1 /\\ 1:rax=0)\n";
    assert_eq!(states(src), ["1:rax=0; [z]=0;", "1:rax=1; [z]=1;"]);
}

#[test]
fn the_report_prints_witness_counts_per_execution() {
    let src = "X86_64 2W\n{ }\n P0 | P1 ;\n movq $1,(x) | movq $3,(x) ;\n movq $2,(x) | movq $4,(x) ;\nexists (not ([x]=2 \\/ [x]=4))\n";
    let test = vsmp_litmus::parse_str(Path::new("c.litmus"), src).unwrap();
    let set = explore(&test, MemoryModel::Tso, Scope::Condition).unwrap();
    let text = report(&test, &set);
    // Six coherence orders, two final values.
    assert!(
        text.contains("States 2\n[x]=2;\n[x]=4;\nNo\nWitnesses\nPositive: 0 Negative: 6\n"),
        "{text}"
    );
    assert!(
        text.contains("Condition exists (not ([x]=2 \\/ [x]=4))"),
        "{text}"
    );
}

#[test]
fn a_looping_thread_is_stopped_by_the_state_bound_not_a_hang() {
    let src = "X86_64 spin\n{ }\n P0 ;\n L: ;\n addq $1,%rax ;\n jmp L ;\nexists (0:rax=1)\n";
    let test = vsmp_litmus::parse_str(Path::new("spin.litmus"), src).unwrap();
    let err = explore_bounded(&test, MemoryModel::Tso, Scope::Condition, 10_000).unwrap_err();
    assert!(err.to_string().contains("more than 10000 states"), "{err}");
}
