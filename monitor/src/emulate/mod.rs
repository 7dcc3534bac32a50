//! Decode and emulate the guest's sensitive instructions.
//!
//! At each trap the run loop calls [`handle_trap`] with the vCPU, a [`Platform`] (the guest's
//! registers and memory) and where the instruction starts. It fetches up to 15 bytes there,
//! decodes one instruction with iced-x86, dispatches on its mnemonic to one handler family
//! per file, and returns what the run loop must do next ([`Outcome`]), or an [`EmulateError`]
//! that ends the run with a message naming the guest RIP, the bytes and the disassembly.
//!
//! | file | instructions |
//! |------|--------------|
//! | [`cpuid`] | `cpuid` |
//! | [`msr`] | `rdmsr`, `wrmsr` |
//! | [`control`] | `mov` to/from `%crN`/`%drN`, `clts`, `lmsw`, `smsw`, `invlpg`, `invpcid`, `wbinvd`, `wbnoinvd`, `invd`, `xsetbv` |
//! | [`descriptor`] | `lgdt`, `lidt`, `lldt`, `ltr`, `sgdt`, `sidt`, `sldt`, `str` |
//! | [`flags`] | `cli`, `sti`, `pushf`, `popf` |
//! | [`port`] | `in`, `out`, `ins`, `outs` (with `rep`) |
//! | [`segment`] | `mov` to/from segment registers, `push`/`pop` `%fs`/`%gs`, `lfs`/`lgs`/`lss`, `swapgs` |
//! | [`system`] | `hlt`, `monitor`, `mwait`, `iretq`, `sysret`; `iret`/`iretl`/`iretw`/`sysexit` raise `#UD`; `syscall`/`sysenter` are refused |
//!
//! The semantics are those of `docs/guest-platform.md`; each handler file documents its part.
//! | [`ordering`] | `mfence`, `lfence`, `sfence`, `serialize`, `lock`-prefixed instructions, `xchg` with memory |
//!
//! The trap path does not allocate: the instruction is fetched into a stack buffer, decoded
//! with a [`Decoder`] over it, and errors carry the bytes in a fixed array; the disassembly is
//! produced only when an error is displayed. This module and its handlers are pure code over
//! [`Platform`] and [`Vcpu`]: only the monitor thread calls them, and every instruction is
//! unit-tested from its raw bytes against [`crate::platform::mock::MockPlatform`].
//!
//! Every file here is `#![forbid(unsafe_code)]` except `sys.rs`, which reads the host TSC.

pub mod control;
pub mod cpuid;
pub mod descriptor;
pub mod flags;
pub mod footprint;
pub mod msr;
mod operand;
pub mod ordering;
pub mod port;
pub mod segment;
mod sys;
pub mod system;

use std::fmt;

use iced_x86::{
    Decoder, DecoderError, DecoderOptions, Formatter, GasFormatter, Instruction, Mnemonic,
};

use crate::devices::DeviceError;
use crate::platform::{MemFault, Platform};
use crate::vcpu::Vcpu;

/// Longest x86 instruction, in bytes.
pub const MAX_INSN_BYTES: usize = 15;

/// Where the monitor stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trap {
    /// The VM process stopped on a marker; the sensitive instruction starts at `insn` (just
    /// after the marker).
    Marker { insn: u64 },
    /// A privileged instruction faulted natively (#GP, seen as SIGSEGV) at `insn`.
    Fault { insn: u64 },
}

impl Trap {
    /// Guest address of the instruction to emulate.
    pub const fn insn(self) -> u64 {
        match self {
            Trap::Marker { insn } | Trap::Fault { insn } => insn,
        }
    }
}

impl fmt::Display for Trap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trap::Marker { .. } => f.write_str("a trap marker stopped the guest"),
            Trap::Fault { .. } => f.write_str("the instruction faulted natively"),
        }
    }
}

/// What the run loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Emulated; resume the guest at `regs.rip`. That is after the instruction, except for a
    /// `rep ins`/`rep outs` stopped after [`port::MAX_REP_ITERATIONS`] iterations: then RIP is
    /// the instruction itself, with RCX/RSI/RDI advanced, so it runs again natively, faults
    /// again, and continues (like a hardware interrupt between iterations).
    Resume,
    /// A locked read-modify-write (or `xchg` with memory): `regs.rip` is the instruction (not
    /// the marker). The monitor runs it natively on pages its node owns (single-stepped) and
    /// then drains the store buffer as a fence does; on one node it just resumes there.
    Atomic,
    /// `mfence` or `serialize`: emulated as nothing; `regs.rip` is after it. The monitor drains
    /// this node's store buffer before the vCPU goes on.
    Fence,
    /// The guest halted (`hlt`, `mwait`) with interrupts as given; `regs.rip` is after the
    /// instruction, where it continues when woken. With no interrupt source the monitor
    /// reports "halted forever".
    Halt { interrupts_enabled: bool },
    /// The guest wrote its exit status to the exit port; `regs.rip` is after the `out`.
    Exit { status: u8 },
    /// This vCPU's `main` returned `status` (the vCPU-done port); `regs.rip` is after the
    /// `out`. The vCPU runs no more.
    Done { status: u8 },
}

/// The result of one trap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Emulated {
    pub outcome: Outcome,
    /// The instruction's mnemonic, which keys the `--stats` table.
    pub mnemonic: Mnemonic,
}

/// An instruction as the emulator saw it: its address and the bytes fetched there.
///
/// Displayed as `rip 0x...: 0f 32 (rdmsr)`, the disassembly in AT&T syntax, produced only
/// when displayed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct InsnSite {
    /// Guest address of the instruction.
    pub rip: u64,
    bytes: [u8; MAX_INSN_BYTES],
    len: u8,
}

impl InsnSite {
    /// The site of `bytes` (at most [`MAX_INSN_BYTES`] are kept) at `rip`.
    pub fn new(rip: u64, bytes: &[u8]) -> InsnSite {
        let len = bytes.len().min(MAX_INSN_BYTES);
        let mut site = InsnSite {
            rip,
            bytes: [0; MAX_INSN_BYTES],
            len: len as u8,
        };
        site.bytes[..len].copy_from_slice(&bytes[..len]);
        site
    }

    /// The instruction's bytes (for an undecodable one, all the bytes fetched).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    fn decode(&self) -> Instruction {
        Decoder::with_ip(64, self.bytes(), self.rip, DecoderOptions::NONE).decode()
    }

    /// The instruction's mnemonic (`Mnemonic::INVALID` if it does not decode).
    pub fn mnemonic(&self) -> Mnemonic {
        self.decode().mnemonic()
    }

    /// The instruction in AT&T syntax, or `(bad)` if it does not decode.
    pub fn disassembly(&self) -> String {
        let instr = self.decode();
        if instr.is_invalid() {
            return "(bad)".to_string();
        }
        let mut out = String::new();
        GasFormatter::new().format(&instr, &mut out);
        out
    }
}

impl fmt::Display for InsnSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest rip {:#x}: ", self.rip)?;
        for (i, b) in self.bytes().iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{b:02x}")?;
        }
        write!(f, " ({})", self.disassembly())
    }
}

impl fmt::Debug for InsnSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InsnSite({self})")
    }
}

/// A guest exception the emulator raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Exception {
    /// `#UD`, vector 6.
    InvalidOpcode,
    /// `#GP`, vector 13.
    GeneralProtection,
}

impl Exception {
    /// The exception's vector number.
    pub const fn vector(self) -> u8 {
        match self {
            Exception::InvalidOpcode => 6,
            Exception::GeneralProtection => 13,
        }
    }
}

impl fmt::Display for Exception {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Exception::InvalidOpcode => "#UD (invalid opcode)",
            Exception::GeneralProtection => "#GP (general protection)",
        })
    }
}

/// Why an instruction could not be emulated. Each of these ends the run; the message names
/// the guest RIP, the instruction bytes and the disassembly.
#[derive(Debug, thiserror::Error)]
pub enum EmulateError {
    /// Not even one byte of the instruction could be read, or the readable bytes end in the
    /// middle of an instruction.
    #[error("fetching the instruction at guest rip {rip:#x} failed: {fault}")]
    FetchInstruction { rip: u64, fault: MemFault },
    /// The bytes are not a valid x86-64 instruction.
    #[error("cannot decode the instruction at {site}")]
    DecodeInstruction { site: InsnSite },
    /// The guest stopped at an instruction the monitor does not emulate: a marker before a
    /// non-sensitive instruction, or a native fault of an instruction that is not privileged
    /// (typically a bad memory access).
    #[error(
        "{trap}, but the monitor does not emulate this instruction (a bad memory access?) at {site}"
    )]
    NotSensitive { site: InsnSite, trap: Trap },
    /// A sensitive instruction this monitor deliberately does not support yet.
    #[error("unsupported instruction ({what}) at {site}")]
    Unsupported { site: InsnSite, what: &'static str },
    /// A memory operand of the instruction is not in guest memory.
    #[error("the memory operand faulted ({fault}) in the instruction at {site}")]
    AccessOperand { site: InsnSite, fault: MemFault },
    /// `rdmsr` of an MSR the vCPU does not have: a guest `#GP`.
    #[error("guest exception #GP: rdmsr of unknown msr {msr:#x} at {site}")]
    ReadMsr { site: InsnSite, msr: u32 },
    /// `wrmsr` of an unknown MSR or of a value it does not accept: a guest `#GP`.
    #[error(
        "guest exception #GP: wrmsr of {value:#x} to msr {msr:#x} refused ({reason}) at {site}"
    )]
    WriteMsr {
        site: InsnSite,
        msr: u32,
        value: u64,
        reason: &'static str,
    },
    /// The instruction raises a guest exception (`#GP`, `#UD`) as `docs/guest-platform.md`
    /// says; the reason says why. The guest has no IDT to deliver it to yet, so the run ends.
    #[error("guest exception {exception} ({reason}) at {site}")]
    GuestException {
        site: InsnSite,
        exception: Exception,
        reason: &'static str,
    },
    /// A device failed to complete the port access.
    #[error("port i/o failed at {site}")]
    Device {
        site: InsnSite,
        #[source]
        source: DeviceError,
    },
}

impl EmulateError {
    /// Guest address of the instruction the error is about.
    pub fn rip(&self) -> u64 {
        match self {
            EmulateError::FetchInstruction { rip, .. } => *rip,
            EmulateError::DecodeInstruction { site }
            | EmulateError::NotSensitive { site, .. }
            | EmulateError::Unsupported { site, .. }
            | EmulateError::AccessOperand { site, .. }
            | EmulateError::ReadMsr { site, .. }
            | EmulateError::WriteMsr { site, .. }
            | EmulateError::GuestException { site, .. }
            | EmulateError::Device { site, .. } => site.rip,
        }
    }

    /// The instruction as fetched, when there is one (every error but a failed fetch).
    pub fn site(&self) -> Option<&InsnSite> {
        match self {
            EmulateError::FetchInstruction { .. } => None,
            EmulateError::DecodeInstruction { site }
            | EmulateError::NotSensitive { site, .. }
            | EmulateError::Unsupported { site, .. }
            | EmulateError::AccessOperand { site, .. }
            | EmulateError::ReadMsr { site, .. }
            | EmulateError::WriteMsr { site, .. }
            | EmulateError::GuestException { site, .. }
            | EmulateError::Device { site, .. } => Some(site),
        }
    }
}

/// An instruction being emulated: the decoded form, its site and where the guest continues.
pub(crate) struct Insn {
    pub(crate) instr: Instruction,
    pub(crate) site: InsnSite,
    pub(crate) trap: Trap,
    /// Where `Outcome::Resume` continues: after the instruction unless the handler says
    /// otherwise.
    pub(crate) next_rip: u64,
}

impl Insn {
    pub(crate) fn unsupported(&self, what: &'static str) -> EmulateError {
        EmulateError::Unsupported {
            site: self.site,
            what,
        }
    }

    pub(crate) fn general_protection(&self, reason: &'static str) -> EmulateError {
        EmulateError::GuestException {
            site: self.site,
            exception: Exception::GeneralProtection,
            reason,
        }
    }

    pub(crate) fn invalid_opcode(&self, reason: &'static str) -> EmulateError {
        EmulateError::GuestException {
            site: self.site,
            exception: Exception::InvalidOpcode,
            reason,
        }
    }

    pub(crate) fn operand_fault(&self, fault: MemFault) -> EmulateError {
        EmulateError::AccessOperand {
            site: self.site,
            fault,
        }
    }
}

/// Builds iced-x86's decoder tables, which it allocates lazily on the first decode, so that
/// no trap pays for them (or allocates). [`Vcpu::new`] calls it; calling it again is cheap.
pub fn warm_up() {
    let cpuid = [0x0f, 0xa2];
    let instr = Decoder::with_ip(64, &cpuid, 0, DecoderOptions::NONE).decode();
    assert_eq!(instr.mnemonic(), Mnemonic::Cpuid, "iced-x86 decodes cpuid");
}

/// Fetches the instruction at `rip`: up to 15 bytes, fewer if the readable memory ends
/// sooner. Returns the buffer and how many bytes were read.
fn fetch(
    platform: &mut impl Platform,
    rip: u64,
) -> Result<([u8; MAX_INSN_BYTES], usize), EmulateError> {
    let mut buf = [0u8; MAX_INSN_BYTES];
    let mut first_fault = None;
    for len in (1..=MAX_INSN_BYTES).rev() {
        match platform.read_mem(rip, &mut buf[..len]) {
            Ok(()) => return Ok((buf, len)),
            Err(fault) => {
                first_fault.get_or_insert(fault);
            }
        }
    }
    let fault = first_fault.unwrap_or(MemFault {
        gva: rip,
        len: MAX_INSN_BYTES,
        write: false,
    });
    Err(EmulateError::FetchInstruction {
        rip,
        fault: MemFault { len: 1, ..fault },
    })
}

/// Decodes and emulates the instruction at the trap, against `vcpu` and `platform`.
///
/// On success the registers in `platform` are what the guest resumes with (see [`Outcome`]).
/// On error the registers are unchanged except where a partly done `rep` string instruction
/// advanced its counters.
pub fn handle_trap(
    vcpu: &mut Vcpu,
    platform: &mut impl Platform,
    trap: Trap,
) -> Result<Emulated, EmulateError> {
    let rip = trap.insn();
    let (buf, fetched) = fetch(platform, rip)?;
    let mut decoder = Decoder::with_ip(64, &buf[..fetched], rip, DecoderOptions::NONE);
    let instr = decoder.decode();
    if instr.is_invalid() {
        if decoder.last_error() == DecoderError::NoMoreBytes && fetched < MAX_INSN_BYTES {
            let gva = rip.wrapping_add(fetched as u64);
            return Err(EmulateError::FetchInstruction {
                rip,
                fault: MemFault {
                    gva,
                    len: 1,
                    write: false,
                },
            });
        }
        return Err(EmulateError::DecodeInstruction {
            site: InsnSite::new(rip, &buf[..fetched]),
        });
    }
    let mut insn = Insn {
        instr,
        site: InsnSite::new(rip, &buf[..instr.len()]),
        trap,
        next_rip: instr.next_ip(),
    };
    let outcome = dispatch(vcpu, platform, &mut insn)?;
    let regs = platform.regs();
    regs.rip = match outcome {
        Outcome::Atomic => rip,
        Outcome::Resume
        | Outcome::Fence
        | Outcome::Halt { .. }
        | Outcome::Exit { .. }
        | Outcome::Done { .. } => insn.next_rip,
    };
    Ok(Emulated {
        outcome,
        mnemonic: instr.mnemonic(),
    })
}

fn dispatch(
    vcpu: &mut Vcpu,
    p: &mut impl Platform,
    insn: &mut Insn,
) -> Result<Outcome, EmulateError> {
    if ordering::is_ordering(&insn.instr) {
        return ordering::emulate(insn);
    }
    match insn.instr.mnemonic() {
        Mnemonic::Cpuid => cpuid::emulate(vcpu, p),
        Mnemonic::Rdmsr => msr::rdmsr(vcpu, p, insn),
        Mnemonic::Wrmsr => msr::wrmsr(vcpu, p, insn),
        Mnemonic::Mov if control::is_mov_cr_or_dr(&insn.instr) => {
            control::mov_cr_or_dr(vcpu, p, insn)
        }
        Mnemonic::Mov if segment::is_mov_sreg(&insn.instr) => segment::mov_sreg(vcpu, p, insn),
        Mnemonic::Clts
        | Mnemonic::Lmsw
        | Mnemonic::Smsw
        | Mnemonic::Invlpg
        | Mnemonic::Invpcid
        | Mnemonic::Wbinvd
        | Mnemonic::Wbnoinvd
        | Mnemonic::Invd
        | Mnemonic::Xsetbv => control::emulate(vcpu, p, insn),
        Mnemonic::Lgdt
        | Mnemonic::Lidt
        | Mnemonic::Lldt
        | Mnemonic::Ltr
        | Mnemonic::Sgdt
        | Mnemonic::Sidt
        | Mnemonic::Sldt
        | Mnemonic::Str => descriptor::emulate(vcpu, p, insn),
        Mnemonic::Cli
        | Mnemonic::Sti
        | Mnemonic::Pushf
        | Mnemonic::Pushfd
        | Mnemonic::Pushfq
        | Mnemonic::Popf
        | Mnemonic::Popfd
        | Mnemonic::Popfq => flags::emulate(vcpu, p, insn),
        Mnemonic::In
        | Mnemonic::Out
        | Mnemonic::Insb
        | Mnemonic::Insw
        | Mnemonic::Insd
        | Mnemonic::Outsb
        | Mnemonic::Outsw
        | Mnemonic::Outsd => port::emulate(vcpu, p, insn),
        Mnemonic::Swapgs => segment::swapgs(vcpu, p),
        Mnemonic::Lfs | Mnemonic::Lgs | Mnemonic::Lss => segment::load_far_pointer(vcpu, p, insn),
        Mnemonic::Push | Mnemonic::Pop if segment::is_push_pop_fs_gs(&insn.instr) => {
            segment::push_pop_fs_gs(vcpu, p, insn)
        }
        Mnemonic::Hlt
        | Mnemonic::Monitor
        | Mnemonic::Mwait
        | Mnemonic::Iret
        | Mnemonic::Iretd
        | Mnemonic::Iretq
        | Mnemonic::Sysret
        | Mnemonic::Sysretq
        | Mnemonic::Sysexit
        | Mnemonic::Sysexitq
        | Mnemonic::Syscall
        | Mnemonic::Sysenter => system::emulate(vcpu, p, insn),
        _ => Err(EmulateError::NotSensitive {
            site: insn.site,
            trap: insn.trap,
        }),
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Shared setup for the instruction tests.
    use super::*;
    use crate::devices::tests::SharedConsole;
    use crate::platform::mock::MockPlatform;
    use crate::vcpu::VcpuConfig;

    /// Where test code is placed.
    pub const CODE: u64 = 0x10_0000;
    /// Size of the mock's memory.
    pub const MEM: usize = 0x1_0000;
    /// A data area inside the mock's memory.
    pub const DATA: u64 = CODE + 0x8000;
    /// An address outside the mock's memory.
    pub const UNMAPPED: u64 = 0xdead_0000;

    pub fn vcpu() -> Vcpu {
        Vcpu::new(VcpuConfig { id: 0, count: 1 }, Box::new(std::io::sink()))
    }

    pub fn vcpu_with_console() -> (Vcpu, SharedConsole) {
        let console = SharedConsole::default();
        let vcpu = Vcpu::new(VcpuConfig { id: 0, count: 1 }, Box::new(console.clone()));
        (vcpu, console)
    }

    pub fn platform(code: &[u8]) -> MockPlatform {
        let mut p = MockPlatform::with_code(CODE, MEM, code);
        p.regs.rsp = CODE + MEM as u64 - 0x100;
        p.regs.eflags = 0x202;
        p
    }

    /// Emulates `code` as if a marker preceded it.
    pub fn run(vcpu: &mut Vcpu, p: &mut MockPlatform) -> Result<Emulated, EmulateError> {
        handle_trap(vcpu, p, Trap::Marker { insn: CODE })
    }

    /// Emulates `code`, expects `Resume`, and checks RIP moved past `code`.
    pub fn run_ok(vcpu: &mut Vcpu, p: &mut MockPlatform, code_len: usize) -> Emulated {
        let e = run(vcpu, p).unwrap_or_else(|err| panic!("emulation failed: {err}"));
        assert_eq!(e.outcome, Outcome::Resume);
        assert_eq!(
            p.regs.rip,
            CODE + code_len as u64,
            "rip not advanced past the instruction"
        );
        e
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;
    use crate::platform::mock::MockPlatform;

    #[test]
    fn an_error_displays_the_rip_the_bytes_and_the_gas_disassembly() {
        let mut p = platform(&[0x0f, 0x01, 0x10]); // lgdt (%rax)
        p.regs.rax = UNMAPPED;
        let err = run(&mut vcpu(), &mut p).unwrap_err();
        assert_eq!(err.rip(), CODE);
        assert_eq!(
            err.site().map(InsnSite::bytes),
            Some(&[0x0f, 0x01, 0x10][..])
        );
        assert_eq!(err.site().map(InsnSite::mnemonic), Some(Mnemonic::Lgdt));
        let msg = err.to_string();
        assert!(
            msg.contains("guest rip 0x100000: 0f 01 10 (lgdt (%rax))"),
            "{msg}"
        );
        assert!(
            msg.contains("read of 10 bytes at guest address 0xdead0000 faulted"),
            "{msg}"
        );
    }

    #[test]
    fn a_privileged_instruction_that_faulted_natively_resumes_after_it() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0xfa]); // cli, no marker
        let e = handle_trap(&mut vcpu, &mut p, Trap::Fault { insn: CODE }).unwrap();
        assert_eq!(
            (e.outcome, e.mnemonic, p.regs.rip),
            (Outcome::Resume, Mnemonic::Cli, CODE + 1)
        );
        assert!(!vcpu.interrupts_enabled());
    }

    #[test]
    fn a_rip_relative_operand_is_relative_to_the_next_instruction() {
        let mut vcpu = vcpu();
        // lgdt 0x100(%rip): the operand is at CODE + 7 + 0x100.
        let mut p = platform(&[0x0f, 0x01, 0x15, 0x00, 0x01, 0x00, 0x00]);
        let mut d = [0u8; 10];
        d[..2].copy_from_slice(&0x27u16.to_le_bytes());
        d[2..].copy_from_slice(&0x20_1000u64.to_le_bytes());
        p.poke(CODE + 7 + 0x100, &d);
        run_ok(&mut vcpu, &mut p, 7);
        assert_eq!(
            (vcpu.tables.gdtr.base, vcpu.tables.gdtr.limit),
            (0x20_1000, 0x27)
        );
    }

    #[test]
    fn a_32_bit_address_size_operand_wraps_at_4_gib() {
        let mut vcpu = vcpu();
        // addr32 sgdt (%eax) with RAX's upper half set: only EAX counts.
        let mut p = platform(&[0x67, 0x0f, 0x01, 0x00]);
        p.regs.rax = 0xffff_ffff_0000_0000 | DATA;
        run_ok(&mut vcpu, &mut p, 4);
        assert_eq!(p.peek(DATA, 10), &[0; 10]);
        p.poke(DATA, &[0xaa; 10]);
        p.regs.rip = CODE;
        run_ok(&mut vcpu, &mut p, 4);
        assert_eq!(p.peek(DATA, 10), &[0; 10], "sgdt wrote at EAX, not RAX");
    }

    #[test]
    fn an_undecodable_instruction_reports_its_bytes() {
        let mut vcpu = vcpu();
        // 0f 0b 0f 0b ... : ud2 decodes; use an invalid opcode: 0f 04.
        let mut p = platform(&[0x0f, 0x04]);
        let err = run(&mut vcpu, &mut p).unwrap_err();
        assert!(
            matches!(err, EmulateError::DecodeInstruction { .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("0x100000") && msg.starts_with("cannot decode") && msg.contains("0f 04"),
            "{msg}"
        );
        assert!(msg.contains("(bad)"), "{msg}");
    }

    #[test]
    fn fetch_across_the_end_of_memory_decodes_the_short_instruction() {
        // cpuid (0f a2) in the last two bytes of memory.
        let mut p = MockPlatform::new(CODE, 0x100);
        let at = CODE + 0x100 - 2;
        p.poke(at, &[0x0f, 0xa2]);
        let mut vcpu = vcpu();
        let e = handle_trap(&mut vcpu, &mut p, Trap::Marker { insn: at }).unwrap();
        assert_eq!((e.outcome, e.mnemonic), (Outcome::Resume, Mnemonic::Cpuid));
        assert_eq!(p.regs.rip, at + 2);
    }

    #[test]
    fn an_instruction_cut_by_the_end_of_memory_is_a_fetch_fault() {
        // The first byte of wrmsr (0f 30) as the last byte of memory.
        let mut p = MockPlatform::new(CODE, 0x100);
        let at = CODE + 0xff;
        p.poke(at, &[0x0f]);
        let err = handle_trap(&mut vcpu(), &mut p, Trap::Marker { insn: at }).unwrap_err();
        match err {
            EmulateError::FetchInstruction { rip, fault } => {
                assert_eq!((rip, fault.gva), (at, CODE + 0x100))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_trap_at_unmapped_memory_is_a_fetch_fault_naming_the_rip() {
        let mut p = platform(&[]);
        let err = handle_trap(&mut vcpu(), &mut p, Trap::Fault { insn: UNMAPPED }).unwrap_err();
        assert!(
            matches!(err, EmulateError::FetchInstruction { rip: UNMAPPED, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("0xdead0000"), "{err}");
    }

    #[test]
    fn a_marker_before_an_ordinary_instruction_is_not_sensitive() {
        // mov %rax,%rbx
        let mut p = platform(&[0x48, 0x89, 0xc3]);
        let err = run(&mut vcpu(), &mut p).unwrap_err();
        assert!(matches!(err, EmulateError::NotSensitive { .. }), "{err:?}");
        assert!(err.to_string().contains("mov %rax,%rbx"), "{err}");
    }

    #[test]
    fn a_native_fault_of_a_plain_load_is_reported_as_a_bad_memory_access() {
        // mov (%rax),%rbx
        let mut p = platform(&[0x48, 0x8b, 0x18]);
        let err = handle_trap(&mut vcpu(), &mut p, Trap::Fault { insn: CODE }).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("faulted natively") && msg.contains("bad memory access"),
            "{msg}"
        );
    }
}
