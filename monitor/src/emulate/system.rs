//! `hlt`, `monitor`, `mwait`, `iretq`, `sysret`, and the mode-changing instructions vsmp
//! does not offer (`docs/guest-platform.md`, "Other privileged instructions").
//!
//! - `hlt` ends in [`Outcome::Halt`] with the virtual IF; RIP is after it. The run loop
//!   decides (with no interrupt source: "halted forever").
//! - `monitor` has no effect (the address in RAX is only recorded in
//!   [`Vcpu::monitor_address`]); `mwait` returns at once: it is a hint.
//! - `iretq` pops RIP, CS, RFLAGS, RSP, SS (8 bytes each), loads RIP and RSP, loads RFLAGS as
//!   `popf` does ([`super::flags::apply_popped_flags`]), and stores CS and SS as virtual
//!   selectors. A non-canonical RIP is a `#GP`; a stack that is not readable, an operand
//!   fault (nothing changes).
//! - `sysret` and `sysretq`: RIP = RCX (a non-canonical RCX is a `#GP`), RFLAGS = R11 as
//!   `popf` loads it; there is no privilege change.
//! - `iret`/`iretl`/`iretw` and `sysexit`: `#UD` (no 32-bit or 16-bit frames).
//! - `syscall`/`sysenter`: refused as unsupported. They are not in the marker table (the VM
//!   process is confined, so a guest `syscall` stops in the run loop, never in the host
//!   kernel); they reach here only after a hand-written marker.
#![forbid(unsafe_code)]

use iced_x86::{Code, Mnemonic};

use super::flags::apply_popped_flags;
use super::operand::is_canonical;
use super::{EmulateError, Insn, Outcome};
use crate::platform::Platform;
use crate::vcpu::Vcpu;

/// Bytes of an `iretq` frame: RIP, CS, RFLAGS, RSP, SS.
const IRETQ_FRAME_BYTES: usize = 40;

pub(crate) fn emulate(
    vcpu: &mut Vcpu,
    p: &mut impl Platform,
    insn: &mut Insn,
) -> Result<Outcome, EmulateError> {
    match insn.instr.mnemonic() {
        Mnemonic::Hlt => Ok(Outcome::Halt {
            interrupts_enabled: vcpu.interrupts_enabled(),
        }),
        Mnemonic::Monitor => {
            let rax = p.regs().rax;
            vcpu.monitor_address = if insn.instr.code() == Code::Monitord {
                rax & 0xffff_ffff
            } else {
                rax
            };
            Ok(Outcome::Resume)
        }
        Mnemonic::Mwait => Ok(Outcome::Resume),
        Mnemonic::Iretq => iretq(vcpu, p, insn),
        Mnemonic::Sysret | Mnemonic::Sysretq => {
            let regs = p.regs();
            if !is_canonical(regs.rcx) {
                return Err(insn.general_protection("sysret to a non-canonical rip in rcx"));
            }
            insn.next_rip = regs.rcx;
            let r11 = regs.r11;
            apply_popped_flags(vcpu, &mut regs.eflags, r11);
            Ok(Outcome::Resume)
        }
        Mnemonic::Iret | Mnemonic::Iretd => {
            Err(insn.invalid_opcode("only the 64-bit iretq frame is supported"))
        }
        Mnemonic::Sysexit | Mnemonic::Sysexitq => {
            Err(insn.invalid_opcode("sysexit is not offered"))
        }
        Mnemonic::Syscall | Mnemonic::Sysenter => {
            Err(insn
                .unsupported("system call entry: there is no guest kernel entry to emulate yet"))
        }
        _ => Err(EmulateError::NotSensitive {
            site: insn.site,
            trap: insn.trap,
        }),
    }
}

fn iretq(vcpu: &mut Vcpu, p: &mut impl Platform, insn: &mut Insn) -> Result<Outcome, EmulateError> {
    let rsp = p.regs().rsp;
    let mut frame = [0u8; IRETQ_FRAME_BYTES];
    p.read_mem(rsp, &mut frame)
        .map_err(|f| insn.operand_fault(f))?;
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&frame[8 * i..8 * i + 8]);
        u64::from_le_bytes(b)
    };
    let (rip, cs, rflags, new_rsp, ss) = (word(0), word(1), word(2), word(3), word(4));
    if !is_canonical(rip) {
        return Err(insn.general_protection("iretq to a non-canonical rip"));
    }
    insn.next_rip = rip;
    vcpu.selectors.cs = cs as u16;
    vcpu.selectors.ss = ss as u16;
    let regs = p.regs();
    regs.rsp = new_rsp;
    apply_popped_flags(vcpu, &mut regs.eflags, rflags);
    Ok(Outcome::Resume)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulate::flags::{RFLAGS_CF, RFLAGS_IF};
    use crate::emulate::test_util::*;
    use crate::emulate::{Exception, Trap, handle_trap};

    #[test]
    fn hlt_halts_with_the_virtual_interrupt_flag_and_rip_after_it() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0xf4]);
        let e = run(&mut vcpu, &mut p).unwrap();
        assert_eq!(
            (e.outcome, e.mnemonic, p.regs.rip),
            (
                Outcome::Halt {
                    interrupts_enabled: true
                },
                Mnemonic::Hlt,
                CODE + 1
            )
        );
        vcpu.interrupt_flag = false;
        p.regs.rip = CODE;
        assert_eq!(
            run(&mut vcpu, &mut p).unwrap().outcome,
            Outcome::Halt {
                interrupts_enabled: false
            }
        );
    }

    #[test]
    fn monitor_has_no_effect_and_mwait_returns_at_once() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x0f, 0x01, 0xc8, 0x0f, 0x01, 0xc9]); // monitor; mwait
        p.regs.rax = DATA;
        let before = p.regs;
        run_ok(&mut vcpu, &mut p, 3);
        assert_eq!(vcpu.monitor_address, DATA);
        let e = handle_trap(&mut vcpu, &mut p, Trap::Marker { insn: CODE + 3 }).unwrap();
        assert_eq!((e.outcome, e.mnemonic), (Outcome::Resume, Mnemonic::Mwait));
        assert_eq!(
            p.regs,
            crate::platform::Regs {
                rip: CODE + 6,
                ..before
            }
        );
    }

    #[test]
    fn iretq_pops_the_frame_and_loads_the_virtual_interrupt_flag() {
        let mut vcpu = vcpu();
        vcpu.interrupt_flag = false;
        let mut p = platform(&[0x48, 0xcf]); // iretq
        let rsp = p.regs.rsp;
        for (i, v) in [0x10_2000u64, 0x10, RFLAGS_IF | RFLAGS_CF | 2, DATA, 0x18]
            .iter()
            .enumerate()
        {
            p.poke(rsp + 8 * i as u64, &v.to_le_bytes());
        }
        let e = run(&mut vcpu, &mut p).unwrap();
        assert_eq!((e.outcome, e.mnemonic), (Outcome::Resume, Mnemonic::Iretq));
        assert_eq!((p.regs.rip, p.regs.rsp), (0x10_2000, DATA));
        assert!(vcpu.interrupts_enabled());
        assert_eq!(p.regs.eflags, 0x202 | RFLAGS_CF);
        assert_eq!((vcpu.selectors.cs, vcpu.selectors.ss), (0x10, 0x18));
    }

    #[test]
    fn iretq_with_an_unmapped_stack_is_an_operand_fault_and_changes_nothing() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x48, 0xcf]);
        p.regs.rsp = CODE + MEM as u64 - 16;
        let before = p.regs;
        assert!(matches!(
            run(&mut vcpu, &mut p),
            Err(EmulateError::AccessOperand { .. })
        ));
        assert_eq!(p.regs, before);
    }

    #[test]
    fn iretq_to_a_non_canonical_rip_is_a_general_protection_fault() {
        let mut vcpu = vcpu();
        let mut p = platform(&[0x48, 0xcf]);
        let rsp = p.regs.rsp;
        p.poke(rsp, &0x8000_0000_0000u64.to_le_bytes());
        match run(&mut vcpu, &mut p) {
            Err(EmulateError::GuestException { exception, .. }) => {
                assert_eq!(exception, Exception::GeneralProtection)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sysretq_jumps_to_rcx_and_loads_flags_from_r11() {
        for code in [&[0x48, 0x0f, 0x07][..], &[0x0f, 0x07]] {
            let mut vcpu = vcpu();
            let mut p = platform(code);
            p.regs.rcx = 0x10_3000;
            p.regs.r11 = RFLAGS_CF | 2;
            run(&mut vcpu, &mut p).unwrap();
            assert_eq!((p.regs.rip, p.regs.eflags), (0x10_3000, 0x202 | RFLAGS_CF));
            assert!(!vcpu.interrupts_enabled(), "IF comes from r11");
        }
    }

    #[test]
    fn sysretq_to_a_non_canonical_rcx_is_refused() {
        let mut p = platform(&[0x48, 0x0f, 0x07]);
        p.regs.rcx = 0x8000_0000_0000;
        assert!(matches!(
            run(&mut vcpu(), &mut p),
            Err(EmulateError::GuestException { .. })
        ));
    }

    #[test]
    fn iretl_iretw_and_sysexit_are_invalid_opcodes_with_a_clear_error() {
        for (code, name) in [
            (&[0xcf][..], "iret"),
            (&[0x66, 0xcf], "iretw"),
            (&[0x0f, 0x35], "sysexit"),
        ] {
            let mut p = platform(code);
            let err = run(&mut vcpu(), &mut p).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("#UD") && msg.contains(name), "{msg}");
            assert_eq!(p.regs.rip, CODE);
        }
    }

    #[test]
    fn syscall_after_a_marker_is_refused() {
        let mut p = platform(&[0x0f, 0x05]);
        let err = run(&mut vcpu(), &mut p).unwrap_err();
        assert!(
            matches!(err, EmulateError::Unsupported { .. }) && err.to_string().contains("syscall"),
            "{err}"
        );
    }

    #[test]
    fn sysenter_after_a_marker_is_refused() {
        let mut p = platform(&[0x0f, 0x34]);
        let err = run(&mut vcpu(), &mut p).unwrap_err();
        assert!(
            matches!(err, EmulateError::Unsupported { .. }) && err.to_string().contains("sysenter"),
            "{err}"
        );
    }
}
