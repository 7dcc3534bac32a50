//! The translator on every syntax case it must handle, and on every table entry.

use super::*;

const M: &str = "ud2 /* vsmp-marker */; ";

fn ud2(src: &str) -> String {
    patch(src, Marker::Ud2).unwrap().text
}

#[test]
fn a_marker_is_inserted_before_a_privileged_instruction() {
    assert_eq!(ud2("\thlt\n"), format!("\t{M}hlt\n"));
}

#[test]
fn the_int3_marker_is_inserted_when_chosen() {
    let out = patch("cli\n", Marker::Int3).unwrap().text;
    assert_eq!(out, "int3 /* vsmp-marker */; cli\n");
}

#[test]
fn every_always_sensitive_mnemonic_of_the_table_gets_a_marker() {
    for entry in table::TABLE.iter().filter(|e| e.rule == Rule::Always) {
        for m in entry.mnemonics {
            let src = format!("\t{m}\n");
            assert_eq!(ud2(&src), format!("\t{M}{m}\n"), "{m}");
        }
    }
}

#[test]
fn instructions_with_operands_from_the_list_get_a_marker() {
    let cases = [
        "inb $0x60, %al",
        "inb %dx, %al",
        "in %dx, %eax",
        "outb %al, $0xf4",
        "outl %eax, %dx",
        "out %al, %dx",
        "rep insb",
        "rep outsw",
        "rep; outsl",
        "lgdt (%rax)",
        "lidtq idt_desc(%rip)",
        "lldt %ax",
        "ltr %ax",
        "movq %rax, %cr3",
        "mov %cr0, %rax",
        "movq %cr4, %rdi",
        "mov %rax, %dr7",
        "mov %dr6, %rcx",
        "invlpg (%rdi)",
        "invpcid (%rax), %rbx",
        "iretq",
        "sysretq",
        "lmsw %ax",
        "pushfq",
        "popfq",
        "pushfw",
        "sgdt (%rsp)",
        "sidt 6(%rsp)",
        "sldt %eax",
        "str %eax",
        "strw (%rdi)",
        "smsw %eax",
        "movw %ax, %ds",
        "movl %eax, %es",
        "mov %ax, %ss",
        "movw %dx, %fs",
        "mov %eax, %gs",
        "mov (%rax), %ds",
        "popq %fs",
        "mov %ds, %ax",
        "movw %gs, (%rdi)",
        "pushq %fs",
        "lss (%rax), %esp",
        "mfence",
        "sfence",
        "lfence",
        "lock addl $1, (%rax)",
        "lock cmpxchgq %rcx, (%rdi)",
        "lock; incl counter(%rip)",
        "lock xaddl %eax, 4(%rdi)",
        "xchg %eax, (%rdi)",
        "xchgl (%rdi), %eax",
        "xchgq %rax, lock_word(%rip)",
        "xchgb %al, %gs:0x10",
    ];
    for case in cases {
        let src = format!("\t{case}\n");
        assert_eq!(ud2(&src), format!("\t{M}{case}\n"), "{case}");
    }
}

#[test]
fn non_sensitive_look_alikes_are_left_alone() {
    let src = "\
instr_label:
outer:
hlt_here: nop
str:
\t.string \"hlt\"
\t.ascii \"cli; sti # in\"
\tmovl %eax, %ebx
\tmovl %eax, %fs:0x10
\tmovq %fs:0, %rax
\txchg %eax, %ebx
\txchgq %rax, %rax
\tinc %eax
\tincl (%rax)
\tint $0x80
\tinsertps $0, %xmm1, %xmm2
\tcall str
\tleaq str(%rip), %rax
\tmovq str, %rax
\tcmpxchgl %ecx, (%rdi)
\trep stosq
\trep ret
\tpushq %fs:8
\tpopq %rbx
\trdtsc
\tud2
\tint3
\t.set cli, 1
hlt = 5
\t.globl\toutb
# hlt in a comment
/* cli in a block comment */
";
    let patched = patch(src, Marker::Ud2).unwrap();
    assert_eq!(patched.text, src);
    assert_eq!(patched.report, Report::default());
}

#[test]
fn a_label_stays_before_the_marker() {
    assert_eq!(ud2("foo: hlt\n"), format!("foo: {M}hlt\n"));
    assert_eq!(ud2("1:\tcli\n"), format!("1:\t{M}cli\n"));
    assert_eq!(ud2(".L3: .L4: sti"), format!(".L3: .L4: {M}sti"));
}

#[test]
fn each_semicolon_separated_statement_is_patched() {
    assert_eq!(ud2("\tcli; nop; sti\n"), format!("\t{M}cli; nop; {M}sti\n"));
}

#[test]
fn the_marker_goes_before_every_prefix() {
    assert_eq!(
        ud2("\tlock; addl $1,(%rax)\n"),
        format!("\t{M}lock; addl $1,(%rax)\n")
    );
    assert_eq!(
        ud2("\tlock\n\tcmpxchgl %ecx,(%rdi)\n"),
        format!("\t{M}lock\n\tcmpxchgl %ecx,(%rdi)\n")
    );
    assert_eq!(
        ud2("\tdata16 rep outsb\n"),
        format!("\t{M}data16 rep outsb\n")
    );
    assert_eq!(
        ud2("\txacquire lock xaddl %eax,(%rdx)\n"),
        format!("\t{M}xacquire lock xaddl %eax,(%rdx)\n")
    );
}

#[test]
fn a_prefix_statement_followed_by_a_harmless_instruction_is_not_patched() {
    let src = "\trep\n\tstosb\n\trep; movsq\n";
    assert_eq!(ud2(src), src);
}

#[test]
fn comments_around_instructions_are_kept() {
    assert_eq!(ud2("\thlt # stop\n"), format!("\t{M}hlt # stop\n"));
    assert_eq!(
        ud2("/* a */ cli /* b */\n"),
        format!("/* a */ {M}cli /* b */\n")
    );
    assert_eq!(
        ud2("/* multi\n line */ sti\n"),
        format!("/* multi\n line */ {M}sti\n")
    );
}

#[test]
fn directives_pass_through_and_macro_bodies_are_patched() {
    let src =
        "\t.macro EXIT_WITH port\n\tmovb $1, %al\n\toutb %al, $\\port\n\t.endm\n\tEXIT_WITH 0xf4\n";
    let expected = format!(
        "\t.macro EXIT_WITH port\n\tmovb $1, %al\n\t{M}outb %al, $\\port\n\t.endm\n\tEXIT_WITH 0xf4\n"
    );
    assert_eq!(ud2(src), expected);
}

#[test]
fn a_macro_named_like_an_instruction_is_a_call_not_an_instruction() {
    let src = "\t.macro CLI\n\tnop\n\t.endm\n\tcli\n";
    assert_eq!(ud2(src), src);
}

#[test]
fn inline_asm_blocks_are_patched() {
    let src = "\tmovl $1, %eax\n#APP\n# 5 \"x.c\" 1\n\tcli\n\tmovq %rax, %cr3\n# 0 \"\" 2\n#NO_APP\n\tret\n";
    let expected = format!(
        "\tmovl $1, %eax\n#APP\n# 5 \"x.c\" 1\n\t{M}cli\n\t{M}movq %rax, %cr3\n# 0 \"\" 2\n#NO_APP\n\tret\n"
    );
    assert_eq!(ud2(src), expected);
}

#[test]
fn mnemonics_match_case_insensitively() {
    assert_eq!(ud2("\tHLT\n"), format!("\t{M}HLT\n"));
    assert_eq!(
        ud2("\tLOCK ADDL $1,(%rax)\n"),
        format!("\t{M}LOCK ADDL $1,(%rax)\n")
    );
}

#[test]
fn patching_twice_changes_nothing() {
    let src = "foo: hlt\n\tlock\n\tincl (%rax)\n\tcli; sti\n\trep outsb\n\tmovq %rax,%cr3\n";
    let once = patch(src, Marker::Ud2).unwrap();
    let twice = patch(&once.text, Marker::Ud2).unwrap();
    assert_eq!(twice.text, once.text);
    assert_eq!(twice.report.inserted_total(), 0);
    assert_eq!(twice.report.already_marked, once.report.inserted_total());
}

#[test]
fn a_hash_comment_tag_is_recognised_as_a_marker_too() {
    let src = "\tint3 # vsmp-marker\n\thlt\n";
    let out = patch(src, Marker::Int3).unwrap();
    assert_eq!(out.text, src);
    assert_eq!(out.report.already_marked, 1);
}

#[test]
fn a_hand_written_ud2_is_not_taken_for_a_marker() {
    assert_eq!(ud2("\tud2; hlt\n"), format!("\tud2; {M}hlt\n"));
    assert_eq!(ud2("\tud2\n\thlt\n"), format!("\tud2\n\t{M}hlt\n"));
}

#[test]
fn a_label_between_marker_and_instruction_needs_a_new_marker() {
    let src = format!("\t{M}\nfoo: hlt\n");
    assert_eq!(ud2(&src), format!("\t{M}\nfoo: {M}hlt\n"));
}

#[test]
fn repatching_with_the_other_marker_is_an_error_naming_the_line() {
    let once = ud2("nop\nhlt\n");
    let err = patch(&once, Marker::Int3).unwrap_err();
    assert_eq!(
        err,
        PatchError::MarkerMismatch {
            line: 2,
            found: Marker::Ud2,
            wanted: Marker::Int3
        }
    );
    assert!(err.to_string().contains("line 2"), "{err}");
}

#[test]
fn malformed_input_is_an_error_naming_the_line() {
    let err = patch("nop\nnop\n/* never closed\nhlt\n", Marker::Ud2).unwrap_err();
    assert_eq!(err.to_string(), "line 3: unterminated /* comment");
    let err = patch("\t.intel_syntax noprefix\n\thlt\n", Marker::Ud2).unwrap_err();
    assert_eq!(err, PatchError::IntelSyntax { line: 1 });
}

#[test]
fn the_report_counts_per_mnemonic() {
    let report = patch(
        "cli\nhlt\ncli\nlock addl $1,(%rax)\nlock; incq (%rdi)\n",
        Marker::Ud2,
    )
    .unwrap()
    .report;
    let counts: Vec<(&str, usize)> = report
        .inserted
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        counts,
        [("cli", 2), ("hlt", 1), ("lock addl", 1), ("lock incq", 1)]
    );
    assert!(
        report.to_string().starts_with("5 marker(s) inserted"),
        "{report}"
    );
}

#[test]
fn non_ascii_text_in_comments_and_strings_survives() {
    let src = "\t.string \"héllo\" # ünïcode\n\thlt\n";
    assert_eq!(
        ud2(src),
        format!("\t.string \"héllo\" # ünïcode\n\t{M}hlt\n")
    );
}

#[test]
fn a_prefix_statement_still_applies_across_directives_and_labels() {
    assert_eq!(
        ud2("\tlock\n\t.loc 1 5 3\n\tincl (%rax)\n"),
        format!("\t{M}lock\n\t.loc 1 5 3\n\tincl (%rax)\n")
    );
    let once = ud2("\trep\nagain:\toutsb\n");
    assert_eq!(once, format!("\t{M}rep\nagain:\toutsb\n"));
    assert_eq!(ud2(&once), once);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    const FRAGMENTS: &[&str] = &[
        "hlt",
        "nop",
        "cli",
        "lock",
        "addl $1,(%rax)",
        "foo:",
        "1:",
        ".loc 1 2 3",
        "# a comment",
        "/* a\ncomment */",
        "rep",
        "outsb",
        "movl %eax,%ebx",
        "xchg %eax,(%rdi)",
        "xchg %eax,%ebx",
        "mov %rax,%cr3",
        ".string \"hlt; cli\"",
        "ud2",
        "int3",
        "str",
        "str:",
        "#APP",
        "#NO_APP",
        ".macro M\n",
        ".endm",
        "pushfq",
        "movw %ax,%ds",
        "x = 3",
    ];
    const SEPARATORS: &[&str] = &["\n", "; ", " ", "\n\t"];

    fn source() -> impl Strategy<Value = String> {
        prop::collection::vec(
            (
                prop::sample::select(FRAGMENTS),
                prop::sample::select(SEPARATORS),
            ),
            0..40,
        )
        .prop_map(|parts| parts.into_iter().map(|(f, s)| format!("{f}{s}")).collect())
    }

    proptest! {
        #[test]
        fn patching_is_idempotent_and_only_inserts_markers(src in source()) {
            for marker in Marker::ALL {
                let once = patch(&src, marker).unwrap();
                let twice = patch(&once.text, marker).unwrap();
                prop_assert_eq!(&twice.text, &once.text);
                prop_assert_eq!(twice.report.inserted_total(), 0);
                prop_assert_eq!(once.text.replace(&marker_text(marker), ""), src.clone());
            }
        }

        #[test]
        fn arbitrary_text_never_panics(src in "\\PC{0,200}") {
            let _ = patch(&src, Marker::Ud2);
        }
    }
}
