//! The native generator renders every supported instruction correctly: single-thread programs
//! using each instruction family are compiled with gcc, run, and must end in exactly the one
//! state the model computes; a two-thread locked-increment test must never lose an update.

use std::path::Path;

use vsmp_litmus::model::{MemoryModel, Scope, explore};
use vsmp_litmus::native::{build, execute, judge, scratch_dir};

fn run_native(src: &str, iterations: u64) -> vsmp_litmus::native::Verdict {
    let test =
        vsmp_litmus::parse_str(Path::new("gen.litmus"), src).unwrap_or_else(|e| panic!("{e}"));
    let allowed = explore(&test, MemoryModel::Tso, Scope::Full).unwrap();
    let sc = explore(&test, MemoryModel::Sc, Scope::Full).unwrap();
    let dir = scratch_dir().unwrap();
    let exe = build(&test, "gen", dir.path(), iterations).unwrap_or_else(|e| panic!("{e}"));
    let observed = execute(&test, &exe, allowed.keys.len()).unwrap_or_else(|e| panic!("{e}"));
    let v = judge(&test, &allowed, &sc, &observed);
    assert!(
        v.forbidden.is_empty(),
        "forbidden states observed:\n{}",
        v.text
    );
    assert_eq!(v.total, iterations.div_ceil(4) * 4, "{}", v.text);
    v
}

#[test]
fn every_instruction_family_runs_natively_as_the_model_says() {
    let cases = [
        // 64-bit immediates, to a register and (through r11) to memory; zero-extending movl.
        "X86_64 wide\n{ }\n P0 ;\n movq $0x123456789abcdef0,%rax ;\n movq $0x7edcba9876543210,(x) ;\n movq (x),%rbx ;\n movl $-1,%ecx ;\nexists (0:rax=0)\n",
        // ALU with memory and register operands, shifts, byte and word widths.
        "X86_64 alu\n{ x=5; }\n P0 ;\n addq $3,(x) ;\n movq (x),%rax ;\n shl 2,%eax ;\n subl $1,%eax ;\n xorq %rbx,%rbx ;\n orw $0x101,%bx ;\n andb $0xf0,%bl ;\n movb %bl,(y) ;\nexists (0:rax=0)\n",
        // Locked instructions: lock add, xadd, cmpxchg (both outcomes), xchg.
        "X86_64 locked\n{ x=1; }\n P0 ;\n lock addq $2,(x) ;\n movq $10,%rbx ;\n lock xaddq %rbx,(x) ;\n movq $13,%rax ;\n movq $7,%rcx ;\n lock cmpxchgq %rcx,(x) ;\n movq $99,%rax ;\n lock cmpxchgq %rcx,(x) ;\n movq $4,%rdx ;\n xchgq %rdx,(y) ;\nexists (0:rax=0)\n",
        // Intel dialect, fences, branches taken and not taken, ret.
        "X86 branches\n{ x=1; }\n P0 ;\n MOV EAX,[x] ;\n CMP EAX,$1 ;\n JNE Lskip ;\n MOV [y],$2 ;\n Lskip: ;\n MFENCE ;\n CMP EAX,$2 ;\n JE Lend ;\n MOV EBX,$3 ;\n JMP Lend ;\n MOV EBX,$4 ;\n Lend: ;\n RET ;\nexists (0:EAX=0)\n",
        // Indexed addressing through a register holding an address.
        "X86_64 A009\n{\nint64_t t[2]={1,-1};\n0:rax=t;\n0:rbx=1;\nint64_t 0:rcx;\n}\n P0 ;\n movq 0(%rax,%rbx,8),%rcx ;\nforall 0:rcx = -1\n",
    ];
    for src in cases {
        let test = vsmp_litmus::parse_str(Path::new("gen.litmus"), src).unwrap();
        let allowed = explore(&test, MemoryModel::Tso, Scope::Full).unwrap();
        assert_eq!(
            allowed.states.len(),
            1,
            "{src}: a single-thread test has one final state"
        );
        let v = run_native(src, 8);
        assert!(
            v.text.lines().count() == 1,
            "{src}: more than one state:\n{}",
            v.text
        );
    }
}

#[test]
fn two_threads_incrementing_with_lock_never_lose_an_update() {
    let src = "X86_64 inc\n{ }\n P0 | P1 ;\n lock addq $1,(x) | lock addq $1,(x) ;\n lock addq $1,(x) | lock addq $1,(x) ;\nforall ([x]=4)\n";
    let v = run_native(src, 400);
    assert_eq!(v.condition_hits, v.total, "{}", v.text);
}
