//! `vsmp run` end to end: real guests (hand-written assembly, assembled and linked here with
//! GNU `as` and `ld` at the image base) under the real monitor, real ptrace, real processes.
//!
//! Every run starts `vsmp` in its own process group; the VM process inherits it, so after each
//! run the test checks that no process of that group is left.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{alive, processes_where};

const VSMP: &str = env!("CARGO_BIN_EXE_vsmp");

const LINKER_SCRIPT: &str = "ENTRY(_start)
SECTIONS {
  . = 0x100000;
  .text : { *(.text*) }
  .rodata : { *(.rodata*) }
  .data : { *(.data*) }
  .bss : { *(.bss*) *(COMMON) }
}
";

/// Assembles `asm` (with `MARK` replaced by the marker mnemonic, and the marker recorded in
/// `.vsmp.marker` when `record` is set) into a static ELF in `dir`.
fn build_guest(dir: &Path, name: &str, asm: &str, marker: &str, record: bool) -> PathBuf {
    let mut src = asm.replace("MARK", marker);
    if record {
        src.push_str(&format!(
            "\n.section .vsmp.marker,\"\",@progbits\n.ascii \"{marker}\"\n"
        ));
    }
    let s = dir.join(format!("{name}.s"));
    let o = dir.join(format!("{name}.o"));
    let elf = dir.join(format!("{name}.elf"));
    let ld = dir.join("guest.ld");
    fs::write(&s, src).unwrap();
    fs::write(&ld, LINKER_SCRIPT).unwrap();
    let status = Command::new("as")
        .arg("--64")
        .arg("-o")
        .arg(&o)
        .arg(&s)
        .status()
        .unwrap();
    assert!(status.success(), "as failed on {name}");
    let status = Command::new("ld")
        .args([
            "-static",
            "-nostdlib",
            "--build-id=none",
            "-z",
            "noexecstack",
            "-T",
        ])
        .arg(&ld)
        .arg("-o")
        .arg(&elf)
        .arg(&o)
        .status()
        .unwrap();
    assert!(status.success(), "ld failed on {name}");
    elf
}

/// Pids of the live processes in process group `pgid`.
fn processes_in_group(pgid: i32) -> Vec<i32> {
    processes_where(2, pgid)
}

fn vsmp(args: &[&str]) -> Output {
    let child = Command::new(VSMP)
        .args(args)
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pgid = child.id() as i32;
    let out = child.wait_with_output().unwrap();
    let left = processes_in_group(pgid);
    assert!(
        left.is_empty(),
        "processes left behind by vsmp {args:?}: {left:?}"
    );
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run_guest(elf: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    let mut args: Vec<&str> = vec!["run"];
    args.extend_from_slice(extra);
    args.push(elf.to_str().unwrap());
    let out = vsmp(&args);
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// Prints `hello from vCPU 0` through the UART (one marked `outb` per byte) and exits with the
/// status in EXIT_STATUS through the exit port.
const HELLO: &str = r#"
.section .rodata
msg: .ascii "hello from vCPU 0\n"
msg_end:
.text
.globl _start
_start:
    lea msg(%rip), %rsi
    lea msg_end(%rip), %rdi
    mov $0x3f8, %dx
1:  movb (%rsi), %al
    MARK
    outb %al, %dx
    inc %rsi
    cmp %rdi, %rsi
    jne 1b
    mov $EXIT_STATUS, %eax
    MARK
    outb %al, $0xf4
    hlt
"#;

#[test]
fn hello_prints_and_exits_zero_with_either_marker() {
    let dir = tempfile::tempdir().unwrap();
    for marker in ["ud2", "int3"] {
        let asm = HELLO.replace("EXIT_STATUS", "0");
        let elf = build_guest(dir.path(), &format!("hello-{marker}"), &asm, marker, true);
        let (code, out, err) = run_guest(&elf, &["--no-pin"]);
        assert_eq!(code, Some(0), "marker {marker}: stderr: {err}");
        assert!(
            out.contains("hello from vCPU 0"),
            "marker {marker}: stdout: {out:?}"
        );
    }
}

#[test]
fn the_guest_exit_status_becomes_the_exit_status_of_vsmp() {
    let dir = tempfile::tempdir().unwrap();
    let asm = HELLO.replace("EXIT_STATUS", "7");
    let elf = build_guest(dir.path(), "exit7", &asm, "int3", true);
    let (code, _, err) = run_guest(&elf, &[]);
    assert_eq!(code, Some(7), "{err}");
}

#[test]
fn a_guest_without_a_marker_section_defaults_to_ud2_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let asm = HELLO.replace("EXIT_STATUS", "0");
    let elf = build_guest(dir.path(), "nosection", &asm, "ud2", false);
    let (code, out, err) = run_guest(&elf, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("hello from vCPU 0"));
    assert!(err.contains("assuming ud2"), "{err}");
    let (code, out, err) = run_guest(&elf, &["--marker", "ud2"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("hello from vCPU 0"));
    assert!(!err.contains("assuming"), "{err}");
}

#[test]
fn a_marker_flag_that_contradicts_the_guest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let asm = HELLO.replace("EXIT_STATUS", "0");
    let elf = build_guest(dir.path(), "conflict", &asm, "int3", true);
    let (code, out, err) = run_guest(&elf, &["--marker", "ud2"]);
    assert_eq!(code, Some(125), "{err}");
    assert!(out.is_empty());
    assert!(
        err.contains("built with marker int3") && err.contains("--marker ud2"),
        "{err}"
    );
}

#[test]
fn a_raw_host_system_call_is_refused_and_never_executed() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("created-by-guest");
    let asm = format!(
        r#"
.section .rodata
path: .asciz "{}"
.text
.globl _start
_start:
    lea path(%rip), %rdi
    mov $0x41, %esi      # O_CREAT | O_WRONLY
    mov $0644, %edx
    mov $2, %eax         # open
    syscall
    hlt
"#,
        victim.display()
    );
    let elf = build_guest(dir.path(), "syscall", &asm, "ud2", true);
    let (code, _, err) = run_guest(&elf, &[]);
    assert_eq!(code, Some(125), "{err}");
    assert!(
        !victim.exists(),
        "the guest's open(O_CREAT) reached the host"
    );
    assert!(
        err.contains("guest attempted host system call 2 (open)"),
        "{err}"
    );
    assert!(err.contains("with syscall at RIP 0x100016"), "{err}");
}

#[test]
fn a_wild_pointer_write_names_the_address_and_rip() {
    let dir = tempfile::tempdir().unwrap();
    for (name, target, addr) in [
        ("null", "0x8", "0x8"),
        ("beyond", "0x10000000", "0x10000000"),
    ] {
        let asm = format!(
            ".text\n.globl _start\n_start:\n    mov ${target}, %rax\n    movq $1, (%rax)\n    hlt\n"
        );
        let elf = build_guest(dir.path(), name, &asm, "ud2", true);
        let (code, _, err) = run_guest(&elf, &[]);
        assert_eq!(code, Some(125), "{err}");
        assert!(err.contains("guest crashed: SIGSEGV"), "{err}");
        assert!(err.contains(&format!("at address {addr}")), "{err}");
        assert!(err.contains("guest rip 0x100007"), "{err}");
        assert!(
            err.contains("48 c7 00 01 00 00 00 (movq $1,(%rax))"),
            "{err}"
        );
    }
}

#[test]
fn malformed_foreign_and_oversized_elves_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.elf");
    fs::write(&garbage, b"this is not an ELF file at all").unwrap();
    let (code, _, err) = run_guest(&garbage, &[]);
    assert_eq!(code, Some(125));
    assert!(
        err.contains("garbage.elf") && err.contains("not a valid ELF"),
        "{err}"
    );

    // An aarch64 ELF64 header (EM_AARCH64 = 183) with no program headers.
    let mut arm = vec![0u8; 64];
    arm[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    arm[16] = 2; // ET_EXEC
    arm[18] = 183;
    arm[20] = 1;
    arm[52] = 64;
    let arm_path = dir.path().join("arm.elf");
    fs::write(&arm_path, &arm).unwrap();
    let (code, _, err) = run_guest(&arm_path, &[]);
    assert_eq!(code, Some(125));
    assert!(
        err.contains("arm.elf") && err.contains("not an x86-64 ELF"),
        "{err}"
    );

    let mut i386 = arm.clone();
    i386[4] = 1; // ELFCLASS32
    let i386_path = dir.path().join("i386.elf");
    fs::write(&i386_path, &i386).unwrap();
    let (_, _, err) = run_guest(&i386_path, &[]);
    assert!(err.contains("not a 64-bit ELF"), "{err}");

    let asm = ".text\n.globl _start\n_start:\n    hlt\n.bss\n.skip 0x400000\n";
    let big = build_guest(dir.path(), "big", asm, "ud2", true);
    let (code, _, err) = run_guest(&big, &["--mem", "2M"]);
    assert_eq!(code, Some(125));
    assert!(
        err.contains("big.elf") && err.contains("--mem is 2M"),
        "{err}"
    );
}

#[test]
fn a_marker_before_an_instruction_the_monitor_does_not_emulate_shows_bytes_and_disassembly() {
    let dir = tempfile::tempdir().unwrap();
    let asm = ".text\n.globl _start\n_start:\n    MARK\n    add %rbx, %rax\n    hlt\n";
    let elf = build_guest(dir.path(), "unsupported", asm, "ud2", true);
    let (code, _, err) = run_guest(&elf, &[]);
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("guest rip 0x100002"), "{err}");
    assert!(err.contains("48 01 d8"), "{err}");
    assert!(err.contains("add %rbx,%rax"), "{err}");
}

#[test]
fn hlt_with_no_interrupt_source_is_reported_as_halted_forever() {
    let dir = tempfile::tempdir().unwrap();
    let asm = ".text\n.globl _start\n_start:\n    nop\n    MARK\n    hlt\n";
    for marker in ["ud2", "int3"] {
        let elf = build_guest(dir.path(), &format!("hlt-{marker}"), asm, marker, true);
        let (code, _, err) = run_guest(&elf, &[]);
        assert_eq!(code, Some(125), "{err}");
        let at = if marker == "ud2" {
            "0x100003"
        } else {
            "0x100002"
        };
        assert!(
            err.contains(&format!(
                "vCPU 0 halted forever (hlt at RIP {at} with no interrupt source)"
            )),
            "{err}"
        );
    }
}

#[test]
fn a_native_privileged_instruction_is_trapped_as_a_fault_and_emulated() {
    let dir = tempfile::tempdir().unwrap();
    // `cli` without a marker faults natively (#GP) and is emulated; then exit 3.
    let asm =
        ".text\n.globl _start\n_start:\n    cli\n    mov $3, %al\n    MARK\n    outb %al, $0xf4\n";
    let elf = build_guest(dir.path(), "gp", asm, "int3", true);
    let (code, _, err) = run_guest(&elf, &["--stats"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("cli (fault)"), "{err}");
}

#[test]
fn stats_print_a_table_of_traps_by_kind() {
    let dir = tempfile::tempdir().unwrap();
    let asm = HELLO.replace("EXIT_STATUS", "0");
    let elf = build_guest(dir.path(), "stats", &asm, "int3", true);
    let (code, out, err) = run_guest(&elf, &["--stats"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("hello from vCPU 0"));
    assert!(err.contains("median_us") && err.contains("p99_us"), "{err}");
    // 18 bytes of "hello from vCPU 0\n" plus the exit: 19 `out`s.
    let row = err
        .lines()
        .find(|l| l.starts_with("out "))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(row.split_whitespace().nth(1) == Some("19"), "{row}");
}

#[test]
fn the_vm_process_dies_with_a_killed_monitor() {
    let dir = tempfile::tempdir().unwrap();
    let asm = ".text\n.globl _start\n_start:\n    jmp _start\n";
    let elf = build_guest(dir.path(), "spin", asm, "ud2", true);
    let mut child = Command::new(VSMP)
        .args(["run", "--no-pin", elf.to_str().unwrap()])
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    // Liveness bounds, not performance assertions: generous so a loaded machine passes.
    let deadline = Instant::now() + Duration::from_secs(30);
    // The VM process is the monitor's child (in a process group of its own).
    let vm = loop {
        if let Some(vm) = processes_where(1, pid).first() {
            break *vm;
        }
        assert!(Instant::now() < deadline, "the VM process never appeared");
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    while alive(vm) {
        assert!(
            Instant::now() < deadline,
            "the VM process outlived its monitor"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Builds `guest/examples/NAME.c` with `vsmp cc --marker MARKER`.
fn build_example(dir: &Path, name: &str, marker: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("guest/examples/{name}.c"));
    let elf = dir.join(format!("{name}-{marker}.elf"));
    let out = vsmp(&[
        "cc",
        "--marker",
        marker,
        "-o",
        elf.to_str().unwrap(),
        src.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "vsmp cc {name}: {}",
        text(&out.stderr)
    );
    elf
}

#[test]
fn the_hello_example_built_by_vsmp_cc_runs_with_both_markers() {
    let dir = tempfile::tempdir().unwrap();
    for marker in ["ud2", "int3"] {
        let elf = build_example(dir.path(), "hello", marker);
        let (code, out, err) = run_guest(&elf, &[]);
        assert_eq!(code, Some(0), "marker {marker}: {err}");
        assert!(
            out.contains("hello from vCPU 0"),
            "marker {marker}: {out:?}"
        );
        assert!(
            !err.contains("assuming"),
            "the marker section was not read: {err}"
        );
    }
}

#[test]
fn the_instruction_tour_built_by_vsmp_cc_passes_with_both_markers() {
    let dir = tempfile::tempdir().unwrap();
    for marker in ["ud2", "int3"] {
        let elf = build_example(dir.path(), "tour", marker);
        let (code, out, err) = run_guest(&elf, &["--stats"]);
        assert_eq!(code, Some(0), "marker {marker}: {out}\n{err}");
        assert!(err.contains("cpuid") && err.contains("wrmsr"), "{err}");
    }
}

#[test]
fn a_vsyscall_that_bypasses_ptrace_is_killed_by_the_seccomp_filter() {
    let dir = tempfile::tempdir().unwrap();
    // gettimeofday(NULL, NULL) through the legacy vsyscall page: the kernel emulates it
    // without a ptrace stop, so only seccomp sees it.
    let asm = ".text\n.globl _start\n_start:\n    xor %edi, %edi\n    xor %esi, %esi\n    \
               mov $0xffffffffff600000, %rax\n    call *%rax\n    mov $5, %al\n    MARK\n    \
               outb %al, $0xf4\n";
    let elf = build_guest(dir.path(), "vsyscall", asm, "int3", true);
    let (code, _, err) = run_guest(&elf, &[]);
    if fs::read_to_string("/proc/self/maps")
        .unwrap()
        .contains("[vsyscall]")
    {
        assert_eq!(code, Some(125), "{err}");
        assert!(err.contains("killed by its seccomp filter"), "{err}");
    } else {
        eprintln!("SKIPPED the seccomp check: this kernel has no [vsyscall] page (vsyscall=none)");
        assert!(err.contains("SIGSEGV"), "{err}");
    }
}

#[test]
fn an_i386_int_0x80_system_call_is_refused_too() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("created-by-int80");
    let asm = format!(
        r#"
.section .rodata
path: .asciz "{}"
.text
.globl _start
_start:
    lea path(%rip), %rbx
    mov $0x41, %ecx      # O_CREAT | O_WRONLY
    mov $0644, %edx
    mov $5, %eax         # i386 open
    int $0x80
    hlt
"#,
        victim.display()
    );
    let elf = build_guest(dir.path(), "int80", &asm, "ud2", true);
    let (code, _, err) = run_guest(&elf, &[]);
    assert_eq!(code, Some(125), "{err}");
    assert!(
        !victim.exists(),
        "the guest's int $0x80 open reached the host"
    );
    assert!(
        err.contains("guest attempted host system call 5") && err.contains("with int $0x80"),
        "{err}"
    );
}

#[test]
fn a_jump_outside_guest_ram_is_a_crash_without_instruction_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let asm = ".text\n.globl _start\n_start:\n    mov $0x10000000, %rax\n    jmp *%rax\n";
    let elf = build_guest(dir.path(), "wildjump", asm, "ud2", true);
    let (code, _, err) = run_guest(&elf, &[]);
    assert_eq!(code, Some(125), "{err}");
    assert!(
        err.contains("SIGSEGV (address not mapped) at address 0x10000000"),
        "{err}"
    );
    assert!(
        err.contains("outside guest RAM: no instruction bytes"),
        "{err}"
    );
}

#[test]
fn a_ud2_in_a_guest_built_with_int3_is_a_crash_not_a_trap() {
    let dir = tempfile::tempdir().unwrap();
    let asm = ".text\n.globl _start\n_start:\n    ud2\n    cpuid\n    hlt\n";
    let elf = build_guest(dir.path(), "strayud2", asm, "int3", true);
    let (code, _, err) = run_guest(&elf, &[]);
    assert_eq!(code, Some(125), "{err}");
    assert!(
        err.contains("guest crashed: SIGILL (invalid opcode (#UD))"),
        "{err}"
    );
    assert!(err.contains("0f 0b (ud2)"), "{err}");
}
