//! `vsmp patch` end to end: real `gcc -S` output of C with inline privileged assembly, patched
//! by the built binary, assembled by the real `as`, and checked in the disassembly.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use vsmp_monitor::marker::Marker;
use vsmp_monitor::patch::verify;

const VSMP: &str = env!("CARGO_BIN_EXE_vsmp");

/// C with inline sensitive instructions, compiler-generated ones (atomics, fences) and
/// look-alikes that must stay unmarked.
const SOURCE: &str = r#"
struct __attribute__((packed)) dtr { unsigned short limit; unsigned long base; };
static struct dtr gdt = { 0x17, 0x1000 };
volatile int counter;
volatile long word;
unsigned char str; /* a symbol named like an instruction */

static inline void outb(unsigned short port, unsigned char v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline unsigned char inb(unsigned short port)
{
    unsigned char v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

unsigned long privileged(const char *buf, unsigned long n)
{
    unsigned long cr3, flags, msr_lo, msr_hi, r = 0;
    struct dtr idt;
    outb(0x3f8, 'x');
    r += inb(0x3fd);
    __asm__ volatile("rep outsb" : "+S"(buf), "+c"(n) : "d"(0x3f8) : "memory");
    __asm__ volatile("cli; sti");
    __asm__ volatile("lgdt %0" : : "m"(gdt));
    __asm__ volatile("sidt %0" : "=m"(idt));
    __asm__ volatile("lidt %0" : : "m"(idt));
    __asm__ volatile("sgdt %0" : "=m"(gdt));
    __asm__ volatile("mov %%cr3, %0\n\tmov %0, %%cr3" : "=r"(cr3) : : "memory");
    __asm__ volatile("mov %0, %%dr7" : : "r"(cr3));
    __asm__ volatile("invlpg (%0)" : : "r"(buf) : "memory");
    __asm__ volatile("wbinvd\n\tinvd");
    __asm__ volatile("rdmsr" : "=a"(msr_lo), "=d"(msr_hi) : "c"(0xc0000080));
    __asm__ volatile("wrmsr" : : "a"(msr_lo), "d"(msr_hi), "c"(0xc0000080));
    __asm__ volatile("swapgs");
    __asm__ volatile("pushfq\n\tpopq %0" : "=r"(flags));
    __asm__ volatile("pushq %0\n\tpopfq" : : "r"(flags) : "cc");
    __asm__ volatile("movw %0, %%ds\n\tmov %0, %%es" : : "r"((unsigned short)0x10));
    __asm__ volatile("mov %%ss, %0\n\tpushq %%fs\n\tpopq %%gs" : "=r"(r));
    __asm__ volatile("smsw %0\n\tstr %w0\n\tsldt %w0" : "=r"(r));
    __asm__ volatile("lmsw %w0\n\tltr %w0\n\tlldt %w0\n\tclts" : : "r"(r));
    __asm__ volatile("cpuid" : "+a"(r) : : "rbx", "rcx", "rdx");
    __asm__ volatile("xsetbv\n\tmonitor\n\tmwait" : : "a"(0), "c"(0), "d"(0));
    __asm__ volatile("invpcid (%0), %1" : : "r"(buf), "r"(0UL) : "memory");
    __asm__ volatile("1: hlt\n\tjmp 1b");
    __asm__ volatile("lock\n\tincl %0" : "+m"(counter));
    __asm__ volatile("lock; decl %0" : "+m"(counter));
    __asm__ volatile("xchg %0, %1" : "+r"(r), "+m"(word));
    __asm__ volatile("mfence; sfence; lfence");
    return r + cr3 + flags + msr_hi;
}

unsigned long lookalikes(unsigned long a, unsigned long b)
{
    __asm__ volatile("xchg %0, %1" : "+r"(a), "+r"(b));
    __asm__ volatile("instr_label%=: outer%=: inc %0" : "+r"(a));
    __asm__ volatile(".pushsection .rodata\n\t.string \"hlt; cli # in\"\n\t.popsection");
    __asm__ volatile("movl %%fs:0, %%eax" : : : "eax");
    __asm__ volatile("movq %%gs:8, %0" : "=r"(b));
    return a + b + str;
}

int compiled_atomics(int v)
{
    int old = __atomic_exchange_n(&counter, v, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&counter, 1, __ATOMIC_SEQ_CST);
    __sync_synchronize();
    __atomic_compare_exchange_n(&counter, &old, 3, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return old;
}
"#;

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn gcc_s(dir: &Path, opt: &str) -> std::path::PathBuf {
    let c = dir.join("priv.c");
    std::fs::write(&c, SOURCE).unwrap();
    let s = dir.join(format!("priv{opt}.s"));
    run(Command::new("gcc")
        .args([
            "-S",
            opt,
            "-ffreestanding",
            "-fno-pie",
            "-mno-red-zone",
            "-o",
        ])
        .arg(&s)
        .arg(&c));
    s
}

fn patch_file(input: &Path, output: &Path, marker: Marker) -> String {
    let out = run(Command::new(VSMP)
        .args(["patch", "--marker", marker.name(), "-o"])
        .arg(output)
        .arg(input));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn disassemble(dir: &Path, asm: &Path) -> String {
    let obj = dir.join("out.o");
    run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(asm));
    let out = run(Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(&obj));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn gcc_output_gets_a_marker_before_every_sensitive_instruction_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    for opt in ["-O0", "-O2"] {
        let asm = gcc_s(dir.path(), opt);
        for marker in Marker::ALL {
            let patched = dir.path().join(format!("patched{opt}-{marker}.s"));
            let report = patch_file(&asm, &patched, marker);
            let listing = disassemble(dir.path(), &patched);
            let checked = verify::check(&listing, marker)
                .unwrap_or_else(|v| panic!("{opt} {marker}: {v:#?}\n{listing}"));
            // 44 sensitive instructions in the inline asm, plus the 4 gcc emits for the
            // atomics (xchg, lock add, mfence or lock or, lock cmpxchg).
            assert_eq!(
                checked.sensitive, 48,
                "{opt} {marker}: {checked:?}\n{listing}"
            );
            assert!(report.contains("marker(s) inserted"), "{report}");
        }
    }
}

#[test]
fn patching_real_gcc_output_twice_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let asm = gcc_s(dir.path(), "-O2");
    let once = dir.path().join("once.s");
    let twice = dir.path().join("twice.s");
    patch_file(&asm, &once, Marker::Ud2);
    let report = patch_file(&once, &twice, Marker::Ud2);
    assert_eq!(
        std::fs::read(&once).unwrap(),
        std::fs::read(&twice).unwrap()
    );
    assert!(report.contains(" 0 marker(s) inserted"), "{report}");
}

#[test]
fn patch_reads_standard_input_and_writes_standard_output() {
    let mut child = Command::new(VSMP)
        .args(["patch", "--quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"foo:\thlt\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "foo:\tud2 /* vsmp-marker */; hlt\n"
    );
    assert!(out.stderr.is_empty());
}

#[test]
fn malformed_assembly_fails_with_the_line_number() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.s");
    std::fs::write(&bad, "\tnop\n\thlt\n/* no end\n").unwrap();
    let out = Command::new(VSMP).arg("patch").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3: unterminated /* comment"), "{err}");
}

#[test]
fn in_place_patching_rewrites_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.s");
    std::fs::write(&file, "\tcli\n").unwrap();
    run(Command::new(VSMP)
        .args(["patch", "-q", "--marker", "int3", "--in-place"])
        .arg(&file));
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "\tint3 /* vsmp-marker */; cli\n"
    );
}
