//! `vsmp cc`: build a vsmp guest, in the spirit of `mpicc`.
//!
//! For each C source: `gcc -S` (freestanding, non-PIE, no red zone), `vsmp patch`, `as`. For
//! `.S`: `gcc -E`, patch, `as`; for `.s`: patch, `as`. The guest runtime (`guest/`, embedded in
//! this binary so `vsmp cc` works from any directory) is built the same way in a scratch
//! directory, an object records the marker in `.vsmp.marker`, and `ld` links everything with
//! `guest.ld` into a static x86-64 ELF. Last, the linked code is disassembled and every
//! sensitive instruction checked to carry a marker (this catches unpatched objects and
//! libgcc routines, which never went through the translator).
//!
//! Tools come from `VSMP_GCC`, `VSMP_AS`, `VSMP_LD`, `VSMP_OBJDUMP` (default `gcc`, `as`,
//! `ld`, `objdump`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, bail, ensure};
use vsmp_monitor::marker::{MARKER_SECTION, Marker};
use vsmp_monitor::patch::{self, verify};

const HELP: &str = "\
Usage: vsmp cc [--marker ud2|int3] [-v] [-c] [--keep-temps] [gcc options] -o OUT SOURCE...

SOURCE: .c (compiled with gcc -S), .S (preprocessed), .s (assembled as is) or .o (from
`vsmp cc -c`). Every source is patched: a trap marker goes before each sensitive instruction.

Options:
  --marker ud2|int3   trap marker (default ud2); recorded in the ELF section .vsmp.marker
  -o OUT              output file (required)
  -c                  compile each source to an object only (no runtime, no link)
  -v                  print every command run and what the translator patched
  --keep-temps        keep the scratch directory and print its path
  -O* -g* -W* -f* -m* -std=*  passed to gcc (default -O2)
  -I DIR, -D NAME[=V], -U NAME  passed to gcc and to the preprocessor of .S files
  -Wa,ARGS  -Wl,ARGS  passed to as / ld

Always used: -ffreestanding -fno-pie -fno-pic -mno-red-zone -fno-stack-protector
-fcf-protection=none -fno-asynchronous-unwind-tables -fno-unwind-tables; linked with
ld -static -nostdlib -T guest.ld (image at 0x100000), the vsmp runtime and libgcc.
`#include <vsmp.h>` gives the runtime API (docs/guest-platform.md).";

#[derive(Debug, clap::Args)]
#[command(after_help = HELP, disable_help_flag = true)]
pub struct Args {
    /// gcc-style options and sources (see below).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    args: Vec<String>,
}

/// Flags every guest translation unit is compiled with.
const BASE_CFLAGS: &[&str] = &[
    "-ffreestanding",
    "-fno-pie",
    "-fno-pic",
    "-mno-red-zone",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
];

/// The runtime, embedded: (path under the scratch directory, contents).
const RUNTIME_FILES: &[(&str, &str)] = &[
    ("include/vsmp.h", include_str!("../../guest/include/vsmp.h")),
    (
        "runtime/start.S",
        include_str!("../../guest/runtime/start.S"),
    ),
    (
        "runtime/console.c",
        include_str!("../../guest/runtime/console.c"),
    ),
    ("runtime/cpu.c", include_str!("../../guest/runtime/cpu.c")),
    (
        "runtime/string.c",
        include_str!("../../guest/runtime/string.c"),
    ),
    (
        "runtime/guest.ld",
        include_str!("../../guest/runtime/guest.ld"),
    ),
];

/// How many scratch directory names to try before giving up (names carry the pid and the
/// time, so a clash means something else is wrong).
const SCRATCH_ATTEMPTS: u32 = 16;

#[derive(Debug, Default)]
struct Options {
    marker: Marker,
    verbose: bool,
    compile_only: bool,
    keep_temps: bool,
    output: Option<PathBuf>,
    /// Options for gcc when compiling C.
    cflags: Vec<String>,
    /// Options for the preprocessor of `.S` files (-I, -D, -U).
    cppflags: Vec<String>,
    asflags: Vec<String>,
    ldflags: Vec<String>,
    optimise_given: bool,
    inputs: Vec<PathBuf>,
}

fn parse(args: Vec<String>) -> anyhow::Result<Options> {
    let mut o = Options::default();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .with_context(|| format!("option {name} needs a value"))
        };
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            "--marker" => o.marker = value("--marker")?.parse()?,
            "-v" => o.verbose = true,
            "-c" => o.compile_only = true,
            "--keep-temps" => o.keep_temps = true,
            "-o" => o.output = Some(value("-o")?.into()),
            "-I" | "-D" | "-U" => {
                let v = value(&arg)?;
                o.cflags.extend([arg.clone(), v.clone()]);
                o.cppflags.extend([arg, v]);
            }
            _ => {
                if let Some(m) = arg.strip_prefix("--marker=") {
                    o.marker = m.parse()?;
                } else if let Some(out) = arg.strip_prefix("-o").filter(|s| !s.is_empty()) {
                    o.output = Some(out.into());
                } else if ["-I", "-D", "-U"].iter().any(|p| arg.starts_with(p)) {
                    o.cflags.push(arg.clone());
                    o.cppflags.push(arg);
                } else if let Some(list) = arg.strip_prefix("-Wa,") {
                    o.asflags.extend(list.split(',').map(str::to_string));
                } else if let Some(list) = arg.strip_prefix("-Wl,") {
                    o.ldflags.extend(list.split(',').map(str::to_string));
                } else if arg.starts_with("-flto") {
                    bail!(
                        "{arg} is not supported: link-time optimisation emits no assembly for \
                         the translator to patch"
                    );
                } else if arg.starts_with("-O") {
                    o.optimise_given = true;
                    o.cflags.push(arg);
                } else if ["-g", "-W", "-f", "-m", "-std="]
                    .iter()
                    .any(|p| arg.starts_with(p))
                {
                    o.cflags.push(arg);
                } else if arg.starts_with('-') && arg != "-" {
                    bail!("unsupported option {arg:?} (see `vsmp cc --help`)");
                } else {
                    o.inputs.push(arg.into());
                }
            }
        }
    }
    ensure!(
        !o.inputs.is_empty(),
        "no source files (usage: vsmp cc [options] -o OUT SOURCE...)"
    );
    if !o.compile_only {
        ensure!(o.output.is_some(), "no output file: name it with -o OUT");
    } else {
        ensure!(
            o.output.is_none() || o.inputs.len() == 1,
            "-c with -o takes exactly one source (got {})",
            o.inputs.len()
        );
    }
    Ok(o)
}

/// What kind of file a source is, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    C,
    AsmCpp,
    Asm,
    Object,
}

fn kind_of(path: &Path) -> anyhow::Result<Kind> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("c") => Ok(Kind::C),
        Some("S") => Ok(Kind::AsmCpp),
        Some("s") => Ok(Kind::Asm),
        Some("o") => Ok(Kind::Object),
        _ => bail!(
            "{}: unsupported source (expected .c, .S, .s or .o)",
            path.display()
        ),
    }
}

/// The external tools, overridable through the environment.
#[derive(Debug)]
struct Tools {
    gcc: OsString,
    assembler: OsString,
    linker: OsString,
    objdump: OsString,
}

impl Tools {
    fn from_env() -> Tools {
        let get =
            |var: &str, default: &str| std::env::var_os(var).unwrap_or_else(|| default.into());
        Tools {
            gcc: get("VSMP_GCC", "gcc"),
            assembler: get("VSMP_AS", "as"),
            linker: get("VSMP_LD", "ld"),
            objdump: get("VSMP_OBJDUMP", "objdump"),
        }
    }
}

/// A scratch directory removed on drop (unless kept).
#[derive(Debug)]
struct Scratch {
    path: PathBuf,
    keep: bool,
}

impl Scratch {
    fn create(keep: bool) -> anyhow::Result<Scratch> {
        let base = std::env::temp_dir();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let mut last_err = None;
        for attempt in 0..SCRATCH_ATTEMPTS {
            let path = base.join(format!("vsmp-cc-{}-{nanos}-{attempt}", std::process::id()));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(Scratch { path, keep }),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err
            .map(anyhow::Error::from)
            .unwrap_or_else(|| anyhow::anyhow!("no attempt")))
        .with_context(|| format!("cannot create a scratch directory in {}", base.display()))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("vsmp cc: kept scratch directory {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// One build: options, tools and the scratch directory.
#[derive(Debug)]
struct Build {
    opts: Options,
    tools: Tools,
    scratch: Scratch,
    units: usize,
}

impl Build {
    fn run_tool(&self, cmd: &mut Command, what: &str) -> anyhow::Result<()> {
        if self.opts.verbose {
            eprintln!("vsmp cc: {}", render(cmd));
        }
        let program = cmd.get_program().to_string_lossy().into_owned();
        let status = cmd.stdin(Stdio::null()).status().map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::NotFound {
                " (is it installed? binutils and gcc are needed)"
            } else {
                ""
            };
            anyhow::anyhow!("cannot run {program}{hint}: {e}")
        })?;
        ensure!(status.success(), "{what}: {program} failed ({status})");
        Ok(())
    }

    fn scratch_file(&mut self, stem: &str, ext: &str) -> PathBuf {
        self.units += 1;
        self.scratch
            .path
            .join(format!("{:03}-{stem}.{ext}", self.units))
    }

    fn include_dir(&self) -> PathBuf {
        self.scratch.path.join("include")
    }

    /// Compiles (or preprocesses) `src` to assembly, patches it, assembles it to `obj`.
    fn compile(&mut self, src: &Path, kind: Kind, runtime: bool, obj: &Path) -> anyhow::Result<()> {
        let stem = src
            .file_stem()
            .map_or("unit".into(), |s| s.to_string_lossy().into_owned());
        let what = format!("{}", src.display());
        let asm = match kind {
            Kind::C => {
                let out = self.scratch_file(&stem, "s");
                let mut cmd = Command::new(&self.tools.gcc);
                cmd.arg("-S").args(BASE_CFLAGS);
                if runtime {
                    cmd.args(["-O2", "-Wall"]);
                } else {
                    if !self.opts.optimise_given {
                        cmd.arg("-O2");
                    }
                    cmd.args(&self.opts.cflags);
                }
                cmd.arg("-I")
                    .arg(self.include_dir())
                    .arg("-o")
                    .arg(&out)
                    .arg(src);
                self.run_tool(&mut cmd, &format!("cannot compile {what}"))?;
                out
            }
            Kind::AsmCpp => {
                let out = self.scratch_file(&stem, "s");
                let mut cmd = Command::new(&self.tools.gcc);
                cmd.args(["-E", "-x", "assembler-with-cpp"]);
                if !runtime {
                    cmd.args(&self.opts.cppflags);
                }
                cmd.arg("-I")
                    .arg(self.include_dir())
                    .arg("-o")
                    .arg(&out)
                    .arg(src);
                self.run_tool(&mut cmd, &format!("cannot preprocess {what}"))?;
                out
            }
            Kind::Asm => src.to_path_buf(),
            Kind::Object => bail!("{what}: an object is linked, not compiled"),
        };
        let source = std::fs::read_to_string(&asm)
            .with_context(|| format!("cannot read {}", asm.display()))?;
        let patched = patch::patch(&source, self.opts.marker)
            .with_context(|| format!("cannot patch the assembly of {what} ({})", asm.display()))?;
        if self.opts.verbose {
            eprintln!("vsmp cc: patched {what}: {}", patched.report);
        }
        let patched_path = self.scratch_file(&stem, "patched.s");
        std::fs::write(&patched_path, &patched.text)
            .with_context(|| format!("cannot write {}", patched_path.display()))?;
        let mut cmd = Command::new(&self.tools.assembler);
        cmd.arg("--64").args(if runtime {
            &[][..]
        } else {
            &self.opts.asflags[..]
        });
        cmd.arg("-o").arg(obj).arg(&patched_path);
        self.run_tool(&mut cmd, &format!("cannot assemble {what}"))
    }

    fn write_runtime(&self) -> anyhow::Result<()> {
        for (rel, contents) in RUNTIME_FILES {
            let path = self.scratch.path.join(rel);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            std::fs::write(&path, contents)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(())
    }

    /// The object holding `.vsmp.marker`: the marker's name, not allocated.
    fn marker_object(&mut self) -> anyhow::Result<PathBuf> {
        let src = self.scratch_file("marker", "s");
        let text = format!(
            "\t.section {MARKER_SECTION},\"\",@progbits\n\t.ascii \"{}\"\n",
            self.opts.marker.name()
        );
        std::fs::write(&src, text).with_context(|| format!("cannot write {}", src.display()))?;
        let obj = src.with_extension("o");
        let mut cmd = Command::new(&self.tools.assembler);
        cmd.arg("--64").arg("-o").arg(&obj).arg(&src);
        self.run_tool(&mut cmd, "cannot assemble the marker section")?;
        Ok(obj)
    }

    fn libgcc(&self) -> Option<PathBuf> {
        let out = Command::new(&self.tools.gcc)
            .arg("-print-libgcc-file-name")
            .output()
            .ok()?;
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        (out.status.success() && path.is_file()).then_some(path)
    }

    /// Checks that every sensitive instruction in `elf` carries the marker.
    fn check_markers(&self, elf: &Path) -> anyhow::Result<verify::Checked> {
        let mut cmd = Command::new(&self.tools.objdump);
        cmd.args(["-d", "--no-show-raw-insn"]).arg(elf);
        if self.opts.verbose {
            eprintln!("vsmp cc: {}", render(&cmd));
        }
        let out = cmd
            .output()
            .with_context(|| format!("cannot run {}", self.tools.objdump.to_string_lossy()))?;
        ensure!(
            out.status.success(),
            "cannot disassemble {}: {}",
            elf.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let listing = String::from_utf8_lossy(&out.stdout);
        let (checked, violations) = verify::scan(&listing, self.opts.marker);
        // Stray markers are allowed: a hand-written `ud2` (`__builtin_trap()`) is guest code.
        let unmarked: Vec<String> = violations
            .iter()
            .filter_map(|v| match v {
                verify::Violation::Unmarked(i) => Some(format!("{:>8}: {}", i.address, i.text)),
                verify::Violation::Stray(_) => None,
            })
            .collect();
        ensure!(
            unmarked.is_empty(),
            "{}: {} sensitive instruction(s) without a {} marker (objects not built by \
             `vsmp cc --marker {}`, or library code):\n{}",
            elf.display(),
            unmarked.len(),
            self.opts.marker,
            self.opts.marker,
            unmarked.join("\n")
        );
        Ok(checked)
    }
}

fn render(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let opts = parse(args.args)?;
    let kinds: Vec<Kind> = opts
        .inputs
        .iter()
        .map(|p| kind_of(p))
        .collect::<Result<_, _>>()?;
    for input in &opts.inputs {
        ensure!(input.is_file(), "{}: no such source file", input.display());
    }
    let scratch = Scratch::create(opts.keep_temps)?;
    let mut build = Build {
        opts,
        tools: Tools::from_env(),
        scratch,
        units: 0,
    };
    build.write_runtime()?;

    if build.opts.compile_only {
        let inputs = build.opts.inputs.clone();
        for (input, kind) in inputs.iter().zip(&kinds) {
            ensure!(
                *kind != Kind::Object,
                "{}: -c needs a source, not an object",
                input.display()
            );
            let obj = match &build.opts.output {
                Some(out) => out.clone(),
                None => PathBuf::from(input.file_stem().unwrap_or(input.as_os_str()))
                    .with_extension("o"),
            };
            build.compile(input, *kind, false, &obj)?;
        }
        return Ok(ExitCode::SUCCESS);
    }

    let mut objects = Vec::new();
    let start = build.scratch.path.join("runtime/start.S");
    let start_obj = build.scratch_file("start", "o");
    build.compile(&start, Kind::AsmCpp, true, &start_obj)?;
    objects.push(start_obj);
    let inputs = build.opts.inputs.clone();
    for (input, kind) in inputs.iter().zip(&kinds) {
        if *kind == Kind::Object {
            objects.push(input.clone());
            continue;
        }
        let stem = input
            .file_stem()
            .map_or("unit".into(), |s| s.to_string_lossy().into_owned());
        let obj = build.scratch_file(&stem, "o");
        build.compile(input, *kind, false, &obj)?;
        objects.push(obj);
    }
    for name in ["console", "cpu", "string"] {
        let src = build.scratch.path.join(format!("runtime/{name}.c"));
        let obj = build.scratch_file(name, "o");
        build.compile(&src, Kind::C, true, &obj)?;
        objects.push(obj);
    }
    objects.push(build.marker_object()?);

    let output = build
        .opts
        .output
        .clone()
        .context("no output file: name it with -o OUT")?;
    let mut ld = Command::new(&build.tools.linker);
    ld.args(["-static", "-nostdlib", "-z", "noexecstack", "-T"])
        .arg(build.scratch.path.join("runtime/guest.ld"))
        .args(&build.opts.ldflags)
        .arg("-o")
        .arg(&output)
        .args(&objects);
    if let Some(libgcc) = build.libgcc() {
        ld.arg(libgcc);
    }
    build.run_tool(&mut ld, &format!("cannot link {}", output.display()))?;

    let checked = build.check_markers(&output)?;
    if build.opts.verbose {
        eprintln!(
            "vsmp cc: {}: {} instructions, {} sensitive, all marked with {}",
            output.display(),
            checked.instructions,
            checked.sensitive,
            build.opts.marker
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_are_sorted_into_gcc_cpp_as_and_ld_flags() {
        let o = parse(args(&[
            "--marker",
            "int3",
            "-O0",
            "-g",
            "-Wall",
            "-Iinc",
            "-D",
            "X=1",
            "-Wl,--gc-sections",
            "-Wa,--noexecstack",
            "-o",
            "out.elf",
            "a.c",
            "b.S",
        ]))
        .unwrap();
        assert_eq!(o.marker, Marker::Int3);
        assert!(o.optimise_given);
        assert_eq!(o.cflags, ["-O0", "-g", "-Wall", "-Iinc", "-D", "X=1"]);
        assert_eq!(o.cppflags, ["-Iinc", "-D", "X=1"]);
        assert_eq!(o.ldflags, ["--gc-sections"]);
        assert_eq!(o.asflags, ["--noexecstack"]);
        assert_eq!(o.output, Some(PathBuf::from("out.elf")));
        assert_eq!(o.inputs, [PathBuf::from("a.c"), PathBuf::from("b.S")]);
    }

    #[test]
    fn a_missing_output_an_unknown_option_and_a_bad_marker_are_refused() {
        let err = parse(args(&["a.c"])).unwrap_err().to_string();
        assert!(err.contains("-o OUT"), "{err}");
        let err = parse(args(&["-o", "x", "-shared", "a.c"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"-shared\""), "{err}");
        let err = parse(args(&["--marker=hlt", "-o", "x", "a.c"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown trap marker"), "{err}");
        let err = parse(args(&["-o", "x"])).unwrap_err().to_string();
        assert!(err.contains("no source files"), "{err}");
    }

    #[test]
    fn sources_are_recognised_by_extension() {
        assert_eq!(kind_of(Path::new("x.c")).unwrap(), Kind::C);
        assert_eq!(kind_of(Path::new("x.S")).unwrap(), Kind::AsmCpp);
        assert_eq!(kind_of(Path::new("x.s")).unwrap(), Kind::Asm);
        assert_eq!(kind_of(Path::new("x.o")).unwrap(), Kind::Object);
        assert!(kind_of(Path::new("x.cpp")).is_err());
    }
}
