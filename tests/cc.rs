//! `vsmp cc` end to end: builds the example guests with the built binary and checks the ELF
//! it produces (header, segments, the `.vsmp.marker` section) and its disassembly (every
//! sensitive instruction right after the marker).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vsmp_monitor::layout;
use vsmp_monitor::marker::{MARKER_SECTION, Marker};
use vsmp_monitor::patch::verify;

const VSMP: &str = env!("CARGO_BIN_EXE_vsmp");

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("guest/examples")
        .join(name)
}

/// Runs `vsmp cc` with a private TMPDIR (so a test can see that scratch files are removed).
fn vsmp_cc(tmp: &Path, args: &[&str]) -> Output {
    let scratch = tmp.join("tmp");
    std::fs::create_dir_all(&scratch).unwrap();
    Command::new(VSMP)
        .arg("cc")
        .args(args)
        .env("TMPDIR", &scratch)
        .current_dir(tmp)
        .output()
        .expect("run vsmp cc")
}

fn build(tmp: &Path, marker: Marker, src: &Path, out: &str) -> PathBuf {
    let output = vsmp_cc(
        tmp,
        &["--marker", marker.name(), "-o", out, src.to_str().unwrap()],
    );
    assert!(
        output.status.success(),
        "vsmp cc {} failed: {}",
        src.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    tmp.join(out)
}

/// The parts of an ELF64 file the tests look at.
#[derive(Debug)]
struct Elf {
    bytes: Vec<u8>,
}

#[derive(Debug)]
struct Section {
    name: String,
    flags: u64,
    offset: usize,
    size: usize,
}

const SHF_ALLOC: u64 = 2;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PT_LOAD: u32 = 1;

impl Elf {
    fn read(path: &Path) -> Elf {
        Elf {
            bytes: std::fs::read(path).unwrap(),
        }
    }
    fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes(self.bytes[at..at + 2].try_into().unwrap())
    }
    fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.bytes[at..at + 4].try_into().unwrap())
    }
    fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.bytes[at..at + 8].try_into().unwrap())
    }
    fn entry(&self) -> u64 {
        self.u64(24)
    }
    /// (type, vaddr, memsz) of every program header.
    fn segments(&self) -> Vec<(u32, u64, u64)> {
        let (off, size, n) = (self.u64(32) as usize, self.u16(54) as usize, self.u16(56));
        (0..n as usize)
            .map(|i| {
                let p = off + i * size;
                (self.u32(p), self.u64(p + 16), self.u64(p + 40))
            })
            .collect()
    }
    fn sections(&self) -> Vec<Section> {
        let (off, size, n, strndx) = (
            self.u64(40) as usize,
            self.u16(58) as usize,
            self.u16(60) as usize,
            self.u16(62) as usize,
        );
        let header = |i: usize| off + i * size;
        let strtab = self.u64(header(strndx) + 24) as usize;
        (0..n)
            .map(|i| {
                let h = header(i);
                let name_at = strtab + self.u32(h) as usize;
                let end = self.bytes[name_at..].iter().position(|&b| b == 0).unwrap();
                Section {
                    name: String::from_utf8_lossy(&self.bytes[name_at..name_at + end]).into(),
                    flags: self.u64(h + 8),
                    offset: self.u64(h + 24) as usize,
                    size: self.u64(h + 32) as usize,
                }
            })
            .collect()
    }
}

fn check_guest_elf(path: &Path, marker: Marker) {
    let elf = Elf::read(path);
    assert_eq!(
        &elf.bytes[..4],
        b"\x7fELF",
        "{}: not an ELF file",
        path.display()
    );
    assert_eq!(elf.bytes[4], 2, "ELFCLASS64");
    assert_eq!(elf.bytes[5], 1, "little-endian");
    assert_eq!(elf.u16(16), 2, "ET_EXEC (static, not PIE)");
    assert_eq!(elf.u16(18), 62, "EM_X86_64");

    let segments = elf.segments();
    assert!(
        segments
            .iter()
            .all(|s| s.0 != PT_INTERP && s.0 != PT_DYNAMIC),
        "a static guest has no interpreter and no dynamic section: {segments:?}"
    );
    let loads: Vec<_> = segments.iter().filter(|s| s.0 == PT_LOAD).collect();
    assert!(!loads.is_empty());
    let start = loads.iter().map(|s| s.1).min().unwrap();
    let end = loads.iter().map(|s| s.1 + s.2).max().unwrap();
    assert_eq!(
        start,
        layout::IMAGE_BASE,
        "the image is linked at IMAGE_BASE"
    );
    assert!(
        (start..end).contains(&elf.entry()),
        "entry {:#x} outside the image",
        elf.entry()
    );
    assert!(
        end < layout::MIN_MEM_BYTES - layout::BOOT_STACK_BYTES,
        "image too large: {end:#x}"
    );

    let sections = elf.sections();
    let marker_section = sections
        .iter()
        .find(|s| s.name == MARKER_SECTION)
        .unwrap_or_else(|| panic!("no {MARKER_SECTION} section"));
    assert_eq!(
        &elf.bytes[marker_section.offset..marker_section.offset + marker_section.size],
        marker.name().as_bytes()
    );
    assert_eq!(
        marker_section.flags & SHF_ALLOC,
        0,
        "{MARKER_SECTION} must not be loaded"
    );

    let listing = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(path)
        .output()
        .expect("run objdump");
    assert!(listing.status.success());
    let listing = String::from_utf8(listing.stdout).unwrap();
    let checked =
        verify::check(&listing, marker).unwrap_or_else(|v| panic!("{}: {v:#?}", path.display()));
    assert!(checked.sensitive > 0, "{checked:?}");
}

#[test]
fn hello_and_tour_build_into_marked_static_elfs_with_both_markers() {
    let tmp = tempfile::tempdir().unwrap();
    for marker in Marker::ALL {
        for name in ["hello", "tour"] {
            let elf = build(
                tmp.path(),
                marker,
                &example(&format!("{name}.c")),
                &format!("{name}-{marker}.elf"),
            );
            check_guest_elf(&elf, marker);
        }
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path().join("tmp")).unwrap().collect();
    assert!(left.is_empty(), "scratch directories left behind: {left:?}");
}

#[test]
fn separately_compiled_objects_and_assembly_sources_link() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("main.c"),
        "#include <vsmp.h>\nint twice(int);\nint main(void) { return twice(vsmp_cpu_id()); }\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("twice.S"),
        "#define SHIFT 1\n\t.globl twice\ntwice:\tmovl %edi, %eax\n\tshll $SHIFT, %eax\n\tcpuid_label: cpuid\n\tmovl %edi, %eax\n\tshll $SHIFT, %eax\n\tret\n",
    )
    .unwrap();
    let out = vsmp_cc(dir, &["-c", "-O1", "main.c"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.join("main.o").is_file());
    let out = vsmp_cc(dir, &["-o", "prog.elf", "main.o", "twice.S"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_guest_elf(&dir.join("prog.elf"), Marker::Ud2);
}

#[test]
fn an_object_with_an_unmarked_sensitive_instruction_is_refused_at_link() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("raw.s"), "\t.globl main\nmain:\thlt\n\tret\n").unwrap();
    let assembled = Command::new("as")
        .arg("--64")
        .arg("-o")
        .arg(dir.join("raw.o"))
        .arg(dir.join("raw.s"))
        .status()
        .unwrap();
    assert!(assembled.success());
    let out = vsmp_cc(dir, &["-o", "raw.elf", "raw.o"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without a ud2 marker") && err.contains("hlt"),
        "{err}"
    );
}

#[test]
fn an_object_built_with_the_other_marker_is_refused_at_link() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("m.c"),
        "int main(void) { __asm__ volatile(\"cli\"); return 0; }\n",
    )
    .unwrap();
    assert!(
        vsmp_cc(dir, &["-c", "--marker", "int3", "m.c"])
            .status
            .success()
    );
    let out = vsmp_cc(dir, &["--marker", "ud2", "-o", "m.elf", "m.o"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cli"), "{err}");
}

#[test]
fn a_compile_error_shows_the_compiler_message_and_fails() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("bad.c"),
        "int main(void) { return undeclared; }\n",
    )
    .unwrap();
    let out = vsmp_cc(tmp.path(), &["-o", "bad.elf", "bad.c"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("undeclared"), "gcc's message is shown: {err}");
    assert!(
        err.contains("cannot compile") && err.contains("bad.c"),
        "{err}"
    );
    assert!(!tmp.path().join("bad.elf").exists());
}

#[test]
fn a_missing_compiler_is_named_in_the_error() {
    let tmp = tempfile::tempdir().unwrap();
    let scratch = tmp.path().join("tmp");
    std::fs::create_dir_all(&scratch).unwrap();
    let out = Command::new(VSMP)
        .args(["cc", "-o", "x.elf"])
        .arg(example("hello.c"))
        .env("VSMP_GCC", "/nonexistent/gcc")
        .env("TMPDIR", &scratch)
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot run /nonexistent/gcc") && err.contains("installed"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&scratch).unwrap().count(),
        0,
        "scratch removed on error"
    );
}

#[test]
fn usage_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let hello = example("hello.c");
    let hello = hello.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&[hello], "no output file"),
        (
            &["--marker", "nop", "-o", "x", hello],
            "unknown trap marker \"nop\"",
        ),
        (&["-o", "x", "missing.c"], "missing.c: no such source file"),
        (&["-o", "x", "prog.rs"], "unsupported source"),
        (
            &["-o", "x", "-shared", hello],
            "unsupported option \"-shared\"",
        ),
        (&["-o", "x", "-flto", hello], "-flto is not supported"),
    ];
    for (args, expected) in cases {
        let out = vsmp_cc(tmp.path(), args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}

/// Builds the runtime's portable parts natively (host gcc, host libc) with a test driver.
fn host_build(dir: &Path, driver: &str, extra: &[&str]) -> PathBuf {
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest");
    std::fs::write(dir.join("driver.c"), driver).unwrap();
    let exe = dir.join("driver");
    let out = Command::new("gcc")
        .args(["-O2", "-Wall", "-o"])
        .arg(&exe)
        .arg("-I")
        .arg(guest.join("include"))
        .arg(dir.join("driver.c"))
        .arg(guest.join("runtime/console.c"))
        .arg(guest.join("runtime/cpu.c"))
        .arg(guest.join("runtime/string.c"))
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

fn run_host(exe: &Path) {
    let out = Command::new(exe).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn runtime_printf_formats_like_the_c_library() {
    let tmp = tempfile::tempdir().unwrap();
    let driver = r#"
#include <stdio.h>
#include <string.h>
#include <vsmp.h>
static int failures;
#define CHECK(...) do { \
    char want[256], got[256]; \
    int wn = snprintf(want, sizeof want, __VA_ARGS__); \
    int gn = vsmp_snprintf(got, sizeof got, __VA_ARGS__); \
    if (wn != gn || strcmp(want, got) != 0) { \
        printf("MISMATCH %s: want [%s] (%d), got [%s] (%d)\n", #__VA_ARGS__, want, wn, got, gn); \
        failures++; } } while (0)
int main(void) {
    CHECK("plain %% text");
    CHECK("%d %i %d %d", 0, -1, 2147483647, -2147483647 - 1);
    CHECK("%u %x %X", 4294967295u, 0xdeadbeefu, 0xabcdefu);
    CHECK("%ld %lu %lx", -9223372036854775807L - 1, 18446744073709551615UL, 0x123456789abcdefUL);
    CHECK("%lld %llu %llx", -5LL, 5ULL, 0xffffffffffffffffULL);
    CHECK("%zu %zx %zd", (size_t)12345, (size_t)0xfff, (size_t)7);
    CHECK("%hhd %hhu %hd %hu", 300, 300, 70000, 70000);
    CHECK("[%5d] [%-5d] [%05d] [%05d] [%-05d]", 42, 42, 42, -42, 42);
    CHECK("[%08x] [%8X] [%-8x] [%2x]", 0xbeefu, 0xbeefu, 0xbeefu, 0xbeefu);
    CHECK("[%.3d] [%8.3d] [%.0d] [%-6.2x]", 7, -7, 0, 0xau);
    CHECK("[%s] [%10s] [%-10s] [%.2s] [%*s] [%-*s]", "abc", "abc", "abc", "abc", 6, "ab", 6, "ab");
    CHECK("[%c] [%3c] [%-3c]", 'x', 'y', 'z');
    CHECK("%p %p", (void *)0x1000, (void *)0xffffffffff600000UL);
    CHECK("[%*d] [%-*d] [%.*d]", 6, 1, 6, 1, 4, 1);
    char small[5];
    int n = vsmp_snprintf(small, sizeof small, "%s", "truncated");
    if (n != 9 || strcmp(small, "trun") != 0) { printf("truncation: %d [%s]\n", n, small); failures++; }
    if (vsmp_snprintf(NULL, 0, "%d", 12345) != 5) { printf("size 0\n"); failures++; }
    return failures != 0;
}
"#;
    let exe = host_build(tmp.path(), driver, &[]);
    run_host(&exe);
}

#[test]
fn runtime_spinlock_and_barrier_hold_under_real_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let driver = r#"
#include <pthread.h>
#include <stdio.h>
#include <vsmp.h>
#define THREADS 2
#define ROUNDS 300
static vsmp_spinlock_t lock = VSMP_SPINLOCK_INIT;
static vsmp_barrier_t barrier;
static volatile long counter;
static volatile int phase[THREADS];
static volatile int errors;
static void *worker(void *arg) {
    long me = (long)arg;
    for (int r = 0; r < ROUNDS; r++) {
        vsmp_spin_lock(&lock);
        long c = counter; /* a non-atomic read-modify-write, safe only under the lock */
        counter = c + 1;
        vsmp_spin_unlock(&lock);
        phase[me] = r;
        vsmp_barrier_wait(&barrier);
        for (int t = 0; t < THREADS; t++)
            if (phase[t] < r) errors++; /* someone passed the barrier early */
        vsmp_barrier_wait(&barrier);
    }
    return NULL;
}
int main(void) {
    pthread_t t[THREADS];
    vsmp_barrier_init(&barrier, THREADS);
    for (long i = 0; i < THREADS; i++) pthread_create(&t[i], NULL, worker, (void *)i);
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    if (counter != (long)THREADS * ROUNDS || errors != 0) {
        printf("counter %ld (want %d), barrier errors %d\n", counter, THREADS * ROUNDS, errors);
        return 1;
    }
    return 0;
}
"#;
    let exe = host_build(tmp.path(), driver, &["-pthread"]);
    run_host(&exe);
}

/// How long a guest may run before the test gives up on it: a hang guard, not a performance
/// bound (hello and tour take well under a second).
const RUN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

/// Runs `vsmp run GUEST` and returns (exit code, stdout, stderr), killing it at the deadline.
fn vsmp_run(guest: &Path) -> (Option<i32>, String, String) {
    use std::io::Read;
    let mut child = Command::new(VSMP)
        .args(["run", "--log", "error"])
        .arg(guest)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn vsmp run");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > RUN_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "vsmp run {} did not finish within {RUN_DEADLINE:?}",
                guest.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code(), out, err)
}

#[test]
fn hello_and_tour_run_to_success_under_the_monitor_with_both_markers() {
    let tmp = tempfile::tempdir().unwrap();
    for marker in Marker::ALL {
        let hello = build(
            tmp.path(),
            marker,
            &example("hello.c"),
            &format!("hello-{marker}.elf"),
        );
        let (code, out, err) = vsmp_run(&hello);
        assert_eq!(code, Some(0), "hello ({marker}): {out}{err}");
        assert!(
            out.contains("hello from vCPU 0"),
            "hello ({marker}): {out}{err}"
        );

        let tour = build(
            tmp.path(),
            marker,
            &example("tour.c"),
            &format!("tour-{marker}.elf"),
        );
        let (code, out, err) = vsmp_run(&tour);
        assert_eq!(code, Some(0), "tour ({marker}): {out}{err}");
        assert!(
            out.contains("tour: all") && !out.contains("MISMATCH"),
            "tour ({marker}): {out}"
        );
    }
}

#[test]
fn main_return_value_and_vsmp_exit_become_the_run_exit_status() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("ret.c"), "int main(void) { return 3; }\n").unwrap();
    std::fs::write(
        dir.join("bye.c"),
        "#include <vsmp.h>\nstatic void deep(int n) { if (n == 0) vsmp_exit(42); deep(n - 1); }\n\
         int main(void) { vsmp_puts(\"leaving\"); deep(5); return 0; }\n",
    )
    .unwrap();
    let ret = build(dir, Marker::Int3, &dir.join("ret.c"), "ret.elf");
    assert_eq!(vsmp_run(&ret).0, Some(3));
    let bye = build(dir, Marker::Ud2, &dir.join("bye.c"), "bye.elf");
    let (code, out, _) = vsmp_run(&bye);
    assert_eq!((code, out.as_str()), (Some(42), "leaving\n"));
}

#[test]
fn a_tour_mismatch_names_the_check_and_fails_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let source = std::fs::read_to_string(example("tour.c")).unwrap();
    let broken = source.replace("READ_CR(4), 0x20)", "READ_CR(4), 0x21)");
    assert_ne!(
        broken, source,
        "the tour's CR4 check moved: update this test"
    );
    let path = tmp.path().join("broken_tour.c");
    std::fs::write(&path, broken).unwrap();
    let elf = build(tmp.path(), Marker::Ud2, &path, "broken.elf");
    let (code, out, _) = vsmp_run(&elf);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("MISMATCH cr4 at boot: got 0x20, expected 0x21"),
        "{out}"
    );
}
